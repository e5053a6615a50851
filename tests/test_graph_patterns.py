"""Graph patterns of real networks: BatchNormalization folded into the sparse kernel, residual add and
ReLU fused into its epilogue (ResNet), grouped convs (AlexNet's two towers).

Every model is built with onnx.helper and checked on llvm against onnxruntime and against a float64
numpy evaluation of the same ONNX graph (``np_forward``), both within 1e-4 relative error.
"""
from __future__ import annotations

import re

import numpy as np
import pytest
import tvm
from onnx import helper

import escort_tvm
from escort_tvm import ConvSpec, Epilogue, SparseConvWeight, conv2d_reference
from escort_tvm.compute import padded_input, sparse_conv_definition
from schedules import CPUKnobs, CUDAKnobs, SparseConvCPU, SparseConvCUDA
from schedules.base import csr_arrays
from _helpers import (CONV_CASES, GLOBAL_FN, assert_close, conv_data, cuda_source, func_name, kernel_input,
                      knob_cover, onnx_model, ort_reference, pruned, randn, cover_shape)

CASES = {name: (spec, sp) for name, spec, sp in CONV_CASES}


# ---------------------------------------------------------------- float64 evaluation of an ONNX graph
def _attr(node, name, default):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def np_forward(model, feeds: dict) -> np.ndarray:
    """The model's first output in float64, for the ops these tests use (Conv, BatchNormalization, Add, Relu)."""
    from onnx import numpy_helper

    env = {k: np.asarray(v, np.float64) for k, v in feeds.items()}
    env.update({t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer})
    for node in model.graph.node:
        ins = [env[i] for i in node.input]
        if node.op_type == "Conv":
            x, w = ins[0], ins[1]
            pads = list(_attr(node, "pads", [0, 0, 0, 0]))
            spec = ConvSpec(N=x.shape[0], C=x.shape[1], H=x.shape[2], W=x.shape[3], K=w.shape[0], KH=w.shape[2],
                            KW=w.shape[3], stride=tuple(_attr(node, "strides", [1, 1])),
                            pad=(pads[0], pads[1], pads[2], pads[3]), dilation=tuple(_attr(node, "dilations", [1, 1])),
                            groups=_attr(node, "group", 1))
            out = conv2d_reference(x, w, spec, ins[2] if len(ins) > 2 else None)
        elif node.op_type == "BatchNormalization":
            x, g, b, m, v = ins
            c = (1, -1, 1, 1)
            out = (x - m.reshape(c)) / np.sqrt(v.reshape(c) + _attr(node, "epsilon", 1e-5)) * g.reshape(c) + b.reshape(c)
        elif node.op_type == "Add":
            out = ins[0] + ins[1]
        elif node.op_type == "Relu":
            out = np.maximum(ins[0], 0.0)
        else:
            raise NotImplementedError(node.op_type)
        env[node.output[0]] = out
    return env[model.graph.output[0].name]


def check_numerics(built, model, feeds):
    out = built(*feeds.values())
    assert_close(out, ort_reference(model, feeds))
    assert_close(out, np_forward(model, feeds))
    return out


def build_onnx(model, target="llvm", **kw):
    mod, params = escort_tvm.from_onnx(model)
    return escort_tvm.build(mod, params, target, **kw)


def bn_params(rng, K, prefix):
    """BatchNormalization parameters of an inference model: scale, bias, running mean and variance."""
    return {f"{prefix}_s": (rng.random(K) + 0.5).astype(np.float32) * rng.choice([-1, 1], K).astype(np.float32),
            f"{prefix}_b": randn(rng, (K,), 0.5), f"{prefix}_m": randn(rng, (K,), 0.5),
            f"{prefix}_v": (rng.random(K) + 0.2).astype(np.float32)}


def bn_node(inp, out, prefix, eps=1e-5):
    return helper.make_node("BatchNormalization", [inp] + [f"{prefix}_{p}" for p in "sbmv"], [out], epsilon=eps)


# ---------------------------------------------------------------- the epilogue, kernel by kernel
def test_epilogue_interface():
    assert Epilogue() == Epilogue(relu=False, residual=False)
    assert Epilogue(relu=True, residual=True).describe() == "bias + residual + relu"
    assert Epilogue(residual=True).describe() == "bias + residual"
    assert Epilogue(relu=True).describe() == "bias + relu"


def test_reference_residual_is_added_before_relu(rng):
    spec, sp = CASES["3x3_pad1"]
    x, w, b = conv_data(rng, spec, sp)
    r = randn(rng, spec.output_shape)
    np.testing.assert_allclose(conv2d_reference(x, w, spec, b, relu=True, residual=r),
                               np.maximum(conv2d_reference(x, w, spec, b) + r, 0.0))
    with pytest.raises(ValueError, match="residual shape"):
        conv2d_reference(x, w, spec, b, residual=r[:, :1])


def _run(lib, name, spec, args, dev=None):
    """Call a kernel with ``args`` then a NaN-poisoned output; returns the output."""
    dev = dev or tvm.cpu(0)
    y = np.full(spec.output_shape, np.nan, np.float32)
    targs = [tvm.runtime.tensor(np.ascontiguousarray(a), dev) for a in (*args, y)]
    lib[name](*targs)
    return targs[-1].numpy()


KERNEL_CASES = ["1x1", "3x3_pad1", "7x7_s2", "dilation2", "grouped", "batch3_grouped_s2", "narrow_out", "wide_out"]


@pytest.mark.parametrize("relu", [False, True], ids=["res", "res_relu"])
@pytest.mark.parametrize("case", KERNEL_CASES)
def test_kernels_with_residual(rng, llvm_target, case, relu):
    """The TIR definition and the CPU schedule both add the residual in the epilogue (before the ReLU)."""
    spec, sp = CASES[case]
    x, w, b = conv_data(rng, spec, sp)
    r = randn(rng, spec.output_shape)
    ref = conv2d_reference(x, w, spec, b, relu=relu, residual=r)
    sw = SparseConvWeight.from_dense(w, spec.groups)
    ep = Epilogue(relu=relu, residual=True)

    func = sparse_conv_definition(spec, sw.nnz, ep, spec.Hp, spec.Wp)
    assert [p.name for p in func.params][-2:] == ["residual", "y"]
    lib = tvm.compile(func, target=llvm_target)
    arrays = csr_arrays(sw, spec, spec.Hp, spec.Wp)
    assert_close(_run(lib, func_name(func), spec, [padded_input(x, spec, spec.Hp, spec.Wp), *arrays, b, r]), ref)

    for width in (4, 16):
        plan = SparseConvCPU().apply(spec, sw, ep, CPUKnobs(vector_width=width))
        assert [p.name for p in plan.func.params][-3:] == ["bias", "residual", "y"]
        lib = tvm.compile(plan.func, target=llvm_target)
        out = _run(lib, func_name(plan.func), spec, [kernel_input(plan, x, spec), *plan.weight_arrays, b, r])
        assert_close(out, ref)


def test_kernels_without_residual_have_no_residual_parameter(rng):
    spec, sp = CASES["3x3_pad1"]
    sw = SparseConvWeight.from_dense(pruned(rng, spec.weight_shape, sp))
    for func in (sparse_conv_definition(spec, sw.nnz, Epilogue(relu=True), spec.Hp, spec.Wp),
                 SparseConvCPU().apply(spec, sw, Epilogue(relu=True)).func,
                 SparseConvCUDA().apply(spec, sw, Epilogue(relu=True)).func):
        names = [p.name for p in func.params]
        assert "residual" not in names and names[-2:] == ["bias", "y"], names


CUDA_COVER = knob_cover(CUDAKnobs)
CUDA_SHAPES = ["3x3_s2", "batch3_grouped_s2", "long_rows", "11x11_s4"]


@pytest.mark.parametrize("i", range(len(CUDA_COVER)), ids=[f"cover{i}" for i in range(len(CUDA_COVER))])
def test_cuda_kernel_with_residual_compiles_for_the_device(cuda_target, rng, i):
    """Every knob value, with the residual epilogue (ReLU on and off), still compiles to a __global__ kernel
    that takes the residual pointer (device runs are in the GPU check)."""
    knobs = CUDA_COVER[i]
    spec, sp = CASES[cover_shape(knobs, CASES, CUDA_SHAPES, i)]
    sw = SparseConvWeight.from_dense(pruned(rng, spec.weight_shape, sp), spec.groups)
    plan = SparseConvCUDA().apply(spec, sw, Epilogue(relu=bool(i % 2), residual=True), knobs)
    assert [p.name for p in plan.func.params][-3:] == ["bias", "residual", "y"]
    with cuda_target:
        lib = tvm.compile(plan.func, target=cuda_target)
    src = cuda_source(lib)
    name = f"{func_name(plan.func)}_kernel"
    assert name in re.findall(GLOBAL_FN, src)
    signature = src[src.index(name):].split(")", 1)[0]
    assert "residual" in signature, signature


# ---------------------------------------------------------------- BatchNormalization folding
def test_conv_bn_relu_folds_into_sparse_kernel(rng):
    K = 8
    w = pruned(rng, (K, 4, 3, 3), 0.85)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), bn_node("c", "bn", "bn"),
             helper.make_node("Relu", ["bn"], ["y"])]
    model = onnx_model(nodes, [("x", [2, 4, 9, 10])], [("y", [2, K, 9, 10])], {"w": w, **bn_params(rng, K, "bn")})
    built = build_onnx(model)
    (r,) = built.report
    assert r.kernel == "sparse" and r.fused == ["bn", "relu"], built.report_text()
    assert r.nnz == np.count_nonzero(w) and r.notes == []  # scaling kept every zero and every nonzero
    assert "sparse (bn + relu)" in built.report_text()
    check_numerics(built, model, {"x": randn(rng, (2, 4, 9, 10))})


def test_conv_bias_bn_folds_and_bias_goes_through_bn(rng):
    """Conv with a bias, then BN with a non-default epsilon, no ReLU: (w*s, (b - mean)*s + beta)."""
    K = 6
    w, b = pruned(rng, (K, 5, 3, 3), 0.8), randn(rng, (K,))
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[0, 1, 2, 1], strides=[2, 1]),
             bn_node("c", "y", "bn", eps=1e-3)]
    model = onnx_model(nodes, [("x", [1, 5, 11, 8])], [("y", [1, K, 6, 8])], {"w": w, "b": b, **bn_params(rng, K, "bn")})
    built = build_onnx(model)
    (r,) = built.report
    assert r.kernel == "sparse" and r.fused == ["bn", "bias"], built.report_text()
    check_numerics(built, model, {"x": randn(rng, (1, 5, 11, 8))})


def test_bn_after_dense_conv_stays_with_tvm(rng):
    """A conv below min_sparsity keeps its BN as a separate op (TVM legalizes it); nothing is reported fused."""
    K = 6
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), bn_node("c", "bn", "bn"),
             helper.make_node("Relu", ["bn"], ["y"])]
    model = onnx_model(nodes, [("x", [1, 3, 7, 7])], [("y", [1, K, 7, 7])],
                       {"w": randn(rng, (K, 3, 3, 3)), **bn_params(rng, K, "bn")})
    built = build_onnx(model)
    (r,) = built.report
    assert r.kernel == "dense" and r.fused == [] and "min_sparsity" in r.reason
    check_numerics(built, model, {"x": randn(rng, (1, 3, 7, 7))})


def test_bn_underflow_is_counted_on_the_folded_weight(rng):
    """BN scaling cannot create zeros, but it can underflow a tiny weight to zero: the report's sparsity
    and nnz are of the folded weight (what the kernel walks) and a note says how many underflowed."""
    K = 4
    w = pruned(rng, (K, 4, 3, 3), 0.7)
    nz = np.flatnonzero(w)
    w.flat[nz[:5]] = 1e-40  # times a BN scale of 1e-6: below the smallest float32 subnormal (1.4e-45)
    params = bn_params(rng, K, "bn")
    params["bn_s"] = np.full(K, 1e-6, np.float32) * np.sign(params["bn_s"])
    params["bn_v"] = np.ones(K, np.float32) - 1e-5
    params["bn_b"] = params["bn_m"] = np.zeros(K, np.float32)  # the output is the scaled conv alone
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), bn_node("c", "y", "bn")]
    model = onnx_model(nodes, [("x", [1, 4, 6, 6])], [("y", [1, K, 6, 6])], {"w": w, **params})
    built = build_onnx(model, min_sparsity=0.7)
    (r,) = built.report
    assert r.kernel == "sparse" and r.fused == ["bn"]
    assert r.nnz == np.count_nonzero(w) - 5
    assert r.sparsity == pytest.approx(1 - r.nnz / w.size, abs=1e-4)
    assert len(r.notes) == 1 and "underflowed 5" in r.notes[0] and "underflowed 5" in built.report_text()
    check_numerics(built, model, {"x": randn(rng, (1, 4, 6, 6))})


def test_bn_whose_input_has_two_uses_is_not_folded(rng):
    K = 6
    w = pruned(rng, (K, 3, 3, 3), 0.8)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), bn_node("c", "bn", "bn"),
             helper.make_node("Add", ["bn", "c"], ["y"])]
    model = onnx_model(nodes, [("x", [1, 3, 7, 7])], [("y", [1, K, 7, 7])], {"w": w, **bn_params(rng, K, "bn")})
    built = build_onnx(model)
    (r,) = built.report
    assert r.kernel == "sparse" and r.fused == [] and r.nnz == np.count_nonzero(w)
    check_numerics(built, model, {"x": randn(rng, (1, 3, 7, 7))})


# ---------------------------------------------------------------- residual add
def _bottleneck(rng, N=2, C=8, H=10, W=9, mid=4, K=16, stride=2, sparsity=0.85):
    """A ResNet bottleneck with a projection shortcut (all five convs pruned, each followed by BN), then an
    identity block whose shortcut is the first block's output."""
    OH, OW = -(-H // stride), -(-W // stride)
    inits, nodes = {}, []

    def conv_bn(inp, out, name, cin, cout, k, s=1, relu=True):
        inits[f"{name}_w"] = pruned(rng, (cout, cin, k, k), sparsity)
        inits.update(bn_params(rng, cout, name))
        p = k // 2
        nodes.append(helper.make_node("Conv", [inp, f"{name}_w"], [f"{name}_c"], pads=[p] * 4, strides=[s, s]))
        nodes.append(bn_node(f"{name}_c", out if not relu else f"{name}_bn", name))
        if relu:
            nodes.append(helper.make_node("Relu", [f"{name}_bn"], [out]))

    conv_bn("x", "a1", "b1c1", C, mid, 1)
    conv_bn("a1", "a2", "b1c2", mid, mid, 3, stride)
    conv_bn("a2", "a3", "b1c3", mid, K, 1, relu=False)
    conv_bn("x", "sc", "b1sc", C, K, 1, stride, relu=False)  # projection shortcut, also pruned
    nodes += [helper.make_node("Add", ["a3", "sc"], ["s1"]), helper.make_node("Relu", ["s1"], ["o1"])]
    conv_bn("o1", "d1", "b2c1", K, mid, 1)
    conv_bn("d1", "d2", "b2c2", mid, mid, 3)
    conv_bn("d2", "d3", "b2c3", mid, K, 1, relu=False)
    nodes += [helper.make_node("Add", ["o1", "d3"], ["s2"]), helper.make_node("Relu", ["s2"], ["y"])]
    model = onnx_model(nodes, [("x", [N, C, H, W])], [("y", [N, K, OH, OW])], inits)
    return model, (N, C, H, W)


def test_resnet_bottleneck_bn_residual_relu(rng):
    model, xshape = _bottleneck(rng)
    built = build_onnx(model)
    rep = built.report
    assert [r.name for r in rep] == ["b1c1_w", "b1c2_w", "b1c3_w", "b1sc_w", "b2c1_w", "b2c2_w", "b2c3_w"]
    assert [r.kernel for r in rep] == ["sparse"] * 7, built.report_text()
    # The first conv in graph order of the two feeding the add takes it; the shortcut conv's output is
    # then its residual operand, computed by its own sparse kernel (BN folded, nothing else).
    assert [r.fused for r in rep] == [["bn", "relu"], ["bn", "relu"], ["bn", "residual", "relu"], ["bn"],
                                      ["bn", "relu"], ["bn", "relu"], ["bn", "residual", "relu"]]
    assert "sparse (bn + residual + relu)" in built.report_text()
    check_numerics(built, model, {"x": randn(rng, xshape)})


def test_resnet_bottleneck_dense_build_agrees(rng):
    model, xshape = _bottleneck(rng, N=1)
    built = build_onnx(model, min_sparsity=2.0)
    assert all(r.kernel == "dense" and r.fused == [] for r in built.report)
    check_numerics(built, model, {"x": randn(rng, xshape)})


def test_shortcut_conv_dense_main_conv_sparse(rng):
    """Only the main branch is pruned enough: it takes the add, its residual is the dense shortcut's BN output."""
    model, xshape = _bottleneck(rng, N=1, sparsity=0.85)
    from onnx import numpy_helper

    for t in model.graph.initializer:
        if t.name == "b1sc_w":
            t.CopyFrom(numpy_helper.from_array(randn(rng, tuple(t.dims)), "b1sc_w"))
    built = build_onnx(model)
    rep = {r.name: r for r in built.report}
    assert rep["b1sc_w"].kernel == "dense" and rep["b1sc_w"].fused == []
    assert rep["b1c3_w"].kernel == "sparse" and rep["b1c3_w"].fused == ["bn", "residual", "relu"]
    check_numerics(built, model, {"x": randn(rng, xshape)})


def test_conv_bias_plus_input_tensor_relu(rng):
    """conv + bias + another graph input of the output's shape, then ReLU: all in the kernel."""
    K = 6
    w, b = pruned(rng, (K, 4, 3, 3), 0.8), randn(rng, (K,))
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["skip", "c"], ["s"]),  # residual operand first
             helper.make_node("Relu", ["s"], ["y"])]
    model = onnx_model(nodes, [("x", [2, 4, 7, 9]), ("skip", [2, K, 7, 9])], [("y", [2, K, 7, 9])], {"w": w, "b": b})
    built = build_onnx(model)
    (r,) = built.report
    assert r.kernel == "sparse" and r.fused == ["bias", "residual", "relu"], built.report_text()
    check_numerics(built, model, {"x": randn(rng, (2, 4, 7, 9)), "skip": randn(rng, (2, K, 7, 9))})


def test_identity_shortcut_is_the_conv_input(rng):
    """y = relu(conv(x) + x): the residual operand is the conv's own input."""
    w = pruned(rng, (5, 5, 3, 3), 0.8)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["c", "x"], ["s"]), helper.make_node("Relu", ["s"], ["y"])]
    model = onnx_model(nodes, [("x", [1, 5, 6, 8])], [("y", [1, 5, 6, 8])], {"w": w})
    built = build_onnx(model)
    assert built.report[0].fused == ["residual", "relu"]
    check_numerics(built, model, {"x": randn(rng, (1, 5, 6, 8))})


@pytest.mark.parametrize("other_shape,out_shape", [
    ((1, 6, 7, 9), (2, 6, 7, 9)),  # broadcast over the batch
    ((2, 6, 1, 9), (2, 6, 7, 9)),  # broadcast over rows
    ((3, 2, 6, 7, 9), (3, 2, 6, 7, 9)),  # the conv output is the broadcast side
])
def test_add_of_another_shape_is_not_fused(rng, other_shape, out_shape):
    K = 6
    w, b = pruned(rng, (K, 4, 3, 3), 0.8), randn(rng, (K,))
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["c", "other"], ["s"]), helper.make_node("Relu", ["s"], ["y"])]
    model = onnx_model(nodes, [("x", [2, 4, 7, 9]), ("other", list(other_shape))], [("y", list(out_shape))],
                       {"w": w, "b": b})
    built = build_onnx(model)
    (r,) = built.report
    assert r.kernel == "sparse" and r.fused == ["bias"], built.report_text()
    feeds = {"x": randn(rng, (2, 4, 7, 9)), "other": randn(rng, other_shape)}
    assert_close(built(*feeds.values()), ort_reference(model, feeds))


def test_relu_before_add_fuses_relu_only(rng):
    """relu(conv) + skip is not relu(conv + skip): the kernel takes the ReLU and stops."""
    w = pruned(rng, (5, 5, 3, 3), 0.8)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Add", ["r", "x"], ["y"])]
    model = onnx_model(nodes, [("x", [1, 5, 6, 8])], [("y", [1, 5, 6, 8])], {"w": w})
    built = build_onnx(model)
    assert built.report[0].fused == ["relu"]
    check_numerics(built, model, {"x": randn(rng, (1, 5, 6, 8))})


def test_sum_of_two_sparse_convs_is_claimed_once(rng):
    """add(conv_a, conv_b) with both pruned: one kernel takes the add, the other becomes its residual."""
    wa, wb = pruned(rng, (6, 4, 3, 3), 0.8), pruned(rng, (6, 4, 1, 1), 0.75)
    nodes = [helper.make_node("Conv", ["x", "wa"], ["a"], pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["x", "wb"], ["b"]),
             helper.make_node("Add", ["a", "b"], ["s"]), helper.make_node("Relu", ["s"], ["y"])]
    model = onnx_model(nodes, [("x", [1, 4, 7, 7])], [("y", [1, 6, 7, 7])], {"wa": wa, "wb": wb})
    built = build_onnx(model)
    assert [r.fused for r in built.report] == [["residual", "relu"], []], built.report_text()
    check_numerics(built, model, {"x": randn(rng, (1, 4, 7, 7))})


# ---------------------------------------------------------------- grouped convs (AlexNet's two towers)
def test_alexnet_two_tower_grouped_convs(rng):
    """AlexNet's original conv2/4/5 are groups=2 (one group per GPU): the sparse path takes them, with the
    bias, BN and ReLU after them."""
    N = 2
    inits = {"w1": randn(rng, (16, 3, 5, 5), 0.3), "b1": randn(rng, (16,)),
             "w2": pruned(rng, (24, 8, 5, 5), 0.9), "b2": randn(rng, (24,)),
             "w3": pruned(rng, (16, 24, 3, 3), 0.9), "b3": randn(rng, (16,)),
             "w4": pruned(rng, (16, 8, 3, 3), 0.9), **bn_params(rng, 16, "bn4")}
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[2] * 4, strides=[2, 2]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[2] * 4, group=2),
             helper.make_node("Relu", ["c2"], ["r2"]),
             helper.make_node("Conv", ["r2", "w3", "b3"], ["c3"], pads=[1] * 4),  # ungrouped, like AlexNet conv3
             helper.make_node("Relu", ["c3"], ["r3"]),
             helper.make_node("Conv", ["r3", "w4"], ["c4"], pads=[1] * 4, group=2),
             bn_node("c4", "bn4", "bn4"), helper.make_node("Relu", ["bn4"], ["y"])]
    model = onnx_model(nodes, [("x", [N, 3, 19, 17])], [("y", [N, 16, 10, 9])], inits)
    built = build_onnx(model)
    rep = built.report
    assert [r.kernel for r in rep] == ["dense", "sparse", "sparse", "sparse"], built.report_text()
    assert [r.attrs["groups"] for r in rep] == [1, 2, 1, 2]
    assert [r.fused for r in rep[1:]] == [["bias", "relu"], ["bias", "relu"], ["bn", "relu"]]
    check_numerics(built, model, {"x": randn(rng, (N, 3, 19, 17))})


def test_report_fields_round_trip_through_export(rng, tmp_path):
    """fused and notes travel in the exported library's metadata."""
    model, xshape = _bottleneck(rng, N=1)
    built = build_onnx(model)
    so = built.export_library(tmp_path / "m.so")
    loaded = escort_tvm.load(so)
    assert [r.fused for r in loaded.report] == [r.fused for r in built.report]
    assert [r.notes for r in loaded.report] == [r.notes for r in built.report]
    x = randn(rng, xshape)
    assert_close(loaded(x), np_forward(model, {"x": x}))


# ---------------------------------------------------------------- the pass on hand-built Relax
def _conv_bn_relu_func(rng, training=False, use_mean=False):
    """conv -> batch_norm with all three tuple items bound (items 1, 2 unused unless use_mean) -> relu."""
    from tvm import relax

    K = 6
    x = relax.Var("x", relax.TensorType((1, 3, 7, 7), "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        with bb.dataflow():
            c = bb.emit(relax.op.nn.conv2d(x, relax.const(pruned(rng, (K, 3, 3, 3), 0.8)), padding=(1, 1)))
            p = bn_params(rng, K, "bn")
            t = bb.emit(relax.op.nn.batch_norm(c, *[relax.const(p[f"bn_{n}"]) for n in "sbmv"], axis=1,
                                               training=training))
            y0, y1 = bb.emit(relax.TupleGetItem(t, 0)), bb.emit(relax.TupleGetItem(t, 1))
            bb.emit(relax.TupleGetItem(t, 2))
            out = bb.emit_output(relax.Tuple([bb.emit(relax.op.nn.relu(y0)), y1]) if use_mean
                                 else bb.emit(relax.op.nn.relu(y0)))
        bb.emit_func_output(out)
    return bb.get()["main"]


@pytest.mark.parametrize("training,use_mean,fused", [
    (False, False, ["bn", "relu"]),  # unused mean/var items do not block the fold
    (False, True, []),  # the BN's running-mean output is read: the BN must stay
    (True, False, []),  # training-mode BN normalises with batch statistics: not foldable
])
def test_plan_sites_bn_tuple_items(rng, training, use_mean, fused):
    from relay_passes.sparse_conv_rewrite import plan_sites

    report, sites = plan_sites(_conv_bn_relu_func(rng, training, use_mean), min_sparsity=0.5)
    (r,) = report
    assert r.kernel == "sparse" and r.fused == fused and len(sites) == 1


def test_cuda_build_shares_identical_kernels(rng):
    """Convs with identical CSR kernels (same shape, nnz and epilogue; weights are arguments) share one function.
    Regression: the device-kernel check looked for one kernel per conv index and failed the whole build."""
    model, _ = _bottleneck(rng, N=1)
    built = build_onnx(model, "cuda", kernel="sparse")
    rep = built.report
    assert [r.kernel for r in rep] == ["sparse"] * 7
    functions = [r.function for r in rep]
    assert functions[2] == functions[6] == "escort_sparse_conv2", functions  # b1c3 and b2c3: same kernel
    assert len(set(functions)) < len(functions)
    kernels = set(re.findall(GLOBAL_FN, cuda_source(built.executable)))
    assert {f"{f}_kernel" for f in functions} <= kernels, sorted(kernels)
