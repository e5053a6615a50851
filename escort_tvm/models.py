"""Small seeded pruned CNNs as ONNX, for the demo and the tests (no downloads)."""
from __future__ import annotations

import numpy as np

from .prune import magnitude_prune  # noqa: F401  (kept importable from here)


def small_pruned_cnn(batch: int = 1, size: int = 32, sparsity: float = 0.9, seed: int = 0):
    """A 6-conv CNN covering the kernel's cases: dense stem, 3x3, strided, grouped, depthwise, 1x1, 5x5
    dilated, bias-free, then pooling and a classifier. The stem stays dense (as pruning practice does)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    inits, nodes = [], []

    def conv(x, cin, cout, k, name, stride=1, pad=None, groups=1, dilation=1, bias=True, relu=True, prune=True):
        kh, kw = (k, k) if isinstance(k, int) else k
        w = (rng.standard_normal((cout, cin // groups, kh, kw)) * np.sqrt(2.0 / (cin // groups * kh * kw)))
        w = w.astype(np.float32)
        if prune:
            w = magnitude_prune(w, sparsity)
        inits.append(numpy_helper.from_array(w, f"{name}.weight"))
        ins = [x, f"{name}.weight"]
        if bias:
            inits.append(numpy_helper.from_array(rng.standard_normal(cout).astype(np.float32) * 0.1, f"{name}.bias"))
            ins.append(f"{name}.bias")
        pads = pad if pad is not None else [dilation * (kh // 2), dilation * (kw // 2)] * 2
        nodes.append(helper.make_node("Conv", ins, [f"{name}.out"], name=name, strides=[stride, stride], pads=pads,
                                      group=groups, dilations=[dilation, dilation], kernel_shape=[kh, kw]))
        out = f"{name}.out"
        if relu:
            nodes.append(helper.make_node("Relu", [out], [f"{name}.relu"]))
            out = f"{name}.relu"
        return out

    x = conv("input", 3, 16, 3, "stem", prune=False)
    x = conv(x, 16, 32, 3, "conv1", stride=2)
    x = conv(x, 32, 32, 3, "conv2_grouped", groups=4)
    x = conv(x, 32, 32, 3, "conv3_depthwise", groups=32, relu=False)
    x = conv(x, 32, 64, 1, "conv4_1x1", bias=False)
    x = conv(x, 64, 32, (5, 3), "conv5_dilated", dilation=2, pad=[4, 2, 3, 1])
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["pool"]))
    nodes.append(helper.make_node("Flatten", ["pool"], ["flat"]))
    inits.append(numpy_helper.from_array(rng.standard_normal((10, 32)).astype(np.float32) * 0.1, "fc.weight"))
    inits.append(numpy_helper.from_array(np.zeros(10, np.float32), "fc.bias"))
    nodes.append(helper.make_node("Gemm", ["flat", "fc.weight", "fc.bias"], ["logits"], transB=1))
    graph = helper.make_graph(
        nodes, "small_pruned_cnn",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, 3, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 10])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="escort_tvm")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model
