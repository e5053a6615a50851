"""The model zoo: architectures, torchvision names, seeded weights, and every net built by TVM vs onnxruntime."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import escort_tvm
from escort_tvm import zoo
from _helpers import assert_close, ort_reference, randn

# name, kwargs, smallest CI size, #convs, #params in torchvision's state_dict (num_batches_tracked excluded)
NETS = [
    ("alexnet", {}, 64, 5, 16),
    ("alexnet_grouped", {"grouped": True}, 64, 5, 16),
    ("vgg16", {}, 32, 13, 32),
    ("resnet50", {}, 32, 53, 53 + 53 * 4 + 2),
    ("googlenet", {}, 32, 57, 57 + 57 * 4 + 2),
]
NET_IDS = [n[0] for n in NETS]


@pytest.fixture(scope="module")
def models():
    """name -> the net at batch 2, its CI size, 90% sparsity, seed 1 (built once: VGG-16 alone is 550 MB)."""
    cache = {}

    def get(name):
        if name not in cache:
            _, kw, size, _, _ = next(n for n in NETS if n[0] == name)
            cache[name] = zoo.build(name.replace("_grouped", ""), batch=2, image_size=size, sparsity=0.9, seed=1, **kw)
        return cache[name]

    yield get
    cache.clear()


def _inits(model):
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


@pytest.mark.parametrize("name,kw,size,n_conv,n_params", NETS, ids=NET_IDS)
def test_every_zoo_net_matches_onnxruntime_sparse_and_dense(name, kw, size, n_conv, n_params, rng, models):
    """Both builds (rewrite on, and off with min_sparsity=2.0) against onnxruntime, at batch 2 and a small input.

    The logits are compared whole and centred over the batch (their input-dependent part: with random
    weights a net's biases can dominate its logits, and a bug in the data path must still show)."""
    model = models(name)
    mod, params = escort_tvm.from_onnx(model)
    x = randn(rng, (2, 3, size, size))
    ref = ort_reference(model, {"input": x})
    assert ref.shape == (2, 1000)
    for min_sparsity in (0.7, 2.0):
        built = escort_tvm.build(mod, params, "llvm", min_sparsity=min_sparsity)
        assert len(built.report) == n_conv
        n_sparse = sum(r.kernel != "dense" for r in built.report)
        if min_sparsity > 1:
            assert n_sparse == 0
        else:  # loosely: the first conv stays dense, most others are at 90% (which ones may change with fusion work)
            assert built.report[0].kernel == "dense" and n_sparse >= n_conv // 2, built.report_text()
        y = built(x)
        assert_close(y, ref)
        assert_close(y - y.mean(0), ref - ref.mean(0))


@pytest.mark.parametrize("name,kw,size,n_conv,n_params", NETS, ids=NET_IDS)
def test_names_shapes_and_sparsity(name, kw, size, n_conv, n_params, models):
    model = models(name)
    onnx.checker.check_model(model)
    inits = _inits(model)
    params = {k: v for k, v in inits.items() if not k.startswith("avgpool.")}
    assert len(params) == n_params
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    assert len(convs) == n_conv
    for i, n in enumerate(convs):
        w = inits[n.input[1]]
        assert n.input[1].endswith(".weight") and w.ndim == 4
        sp = 1 - np.count_nonzero(w) / w.size
        assert (sp < 1e-5) if i == 0 else abs(sp - 0.9) < 1e-3, (n.input[1], sp)
    for n in model.graph.node:
        if n.op_type == "Gemm":
            w = inits[n.input[1]]  # linears stay dense (a float32 normal draw is exactly 0 about once in 10^7)
            assert np.count_nonzero(w) > w.size * (1 - 1e-5)
    assert [d.dim_value for d in model.graph.output[0].type.tensor_type.shape.dim] == [2, 1000]
    for t in model.graph.initializer:
        assert numpy_helper.to_array(t).dtype == np.float32


def test_torchvision_state_dict_keys(models):
    """Spot checks of torchvision's naming (the full key lists are what torchvision.models prints)."""
    alex = _inits(models("alexnet"))
    assert list(alex)[:4] == ["features.0.weight", "features.0.bias", "features.3.weight", "features.3.bias"]
    assert alex["classifier.1.weight"].shape == (4096, 9216) and alex["classifier.6.weight"].shape == (1000, 4096)
    assert alex["features.0.weight"].shape == (64, 3, 11, 11)
    vgg = _inits(models("vgg16"))
    assert [k for k in vgg if k.startswith("features") and k.endswith("weight")] == [
        f"features.{i}.weight" for i in (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)]
    assert vgg["classifier.0.weight"].shape == (4096, 25088) and "classifier.3.bias" in vgg
    r50 = zoo.weights("resnet50", num_classes=10)
    for k, shape in [("conv1.weight", (64, 3, 7, 7)), ("bn1.running_var", (64,)),
                     ("layer1.0.downsample.0.weight", (256, 64, 1, 1)), ("layer1.0.downsample.1.running_mean", (256,)),
                     ("layer2.0.conv2.weight", (128, 128, 3, 3)), ("layer4.2.bn3.weight", (2048,)),
                     ("fc.weight", (10, 2048)), ("fc.bias", (10,))]:
        assert r50[k].shape == shape, k
    assert "layer1.1.downsample.0.weight" not in r50 and "conv1.bias" not in r50
    g = zoo.weights("googlenet", num_classes=10)
    for k, shape in [("conv1.conv.weight", (64, 3, 7, 7)), ("conv1.bn.running_var", (64,)),
                     ("conv3.conv.weight", (192, 64, 3, 3)), ("inception3a.branch1.conv.weight", (64, 192, 1, 1)),
                     ("inception3a.branch3.1.conv.weight", (32, 16, 3, 3)),  # torchvision's 3x3 "5x5" branch
                     ("inception3a.branch4.1.bn.bias", (32,)), ("inception5b.branch2.1.conv.weight", (384, 192, 3, 3)),
                     ("fc.weight", (10, 1024))]:
        assert g[k].shape == shape, k
    assert not any(k.startswith("aux") for k in g)
    grouped = _inits(models("alexnet_grouped"))
    assert grouped["features.4.weight"].shape == (256, 48, 5, 5)
    assert grouped["features.12.weight"].shape == (256, 192, 3, 3)


def test_bn_statistics_sane():
    for name in ("resnet50", "googlenet"):
        w = zoo.weights(name)
        for k, v in w.items():
            if k.endswith("running_var"):
                assert v.min() > 0, k
        model = zoo.build(name, image_size=32)
        eps = {n.attribute[0].f for n in model.graph.node if n.op_type == "BatchNormalization"}
        assert eps == {np.float32(1e-5) if name == "resnet50" else np.float32(1e-3)}


def test_weights_match_build_and_are_seeded():
    model = zoo.build("googlenet", batch=3, image_size=40, sparsity=0.9, seed=7)
    inits = _inits(model)
    w = zoo.weights("googlenet", sparsity=0.9, seed=7)
    assert set(w) <= set(inits)
    for k, v in w.items():
        np.testing.assert_array_equal(v, inits[k])
    again = zoo.weights("googlenet", sparsity=0.9, seed=7)
    other = zoo.weights("googlenet", sparsity=0.9, seed=8)
    assert all(np.array_equal(again[k], w[k]) for k in w)
    assert not np.array_equal(other["inception4a.branch2.1.conv.weight"], w["inception4a.branch2.1.conv.weight"])


def test_pruned_weights_are_prune_output_rescaled():
    """Same zero pattern as escort_tvm.prune on the dense zoo model; survivors scaled by one factor per layer."""
    dense = zoo.build("resnet50", image_size=32, seed=2)
    via_prune, _ = escort_tvm.prune(dense, 0.9)
    zp = zoo.build("resnet50", image_size=32, seed=2, sparsity=0.9)
    a, b, d = _inits(via_prune), _inits(zp), _inits(dense)
    for n in dense.graph.node[1:]:
        if n.op_type != "Conv":
            continue
        k = n.input[1]
        np.testing.assert_array_equal(a[k] != 0, b[k] != 0)
        ratio = b[k][b[k] != 0] / a[k][a[k] != 0]
        assert np.ptp(ratio) < 1e-5 * ratio.mean() and ratio.mean() > 1
        assert np.sum(b[k].astype(np.float64) ** 2) == pytest.approx(np.sum(d[k].astype(np.float64) ** 2), rel=1e-5)


def test_shapes_agree_with_onnx_shape_inference():
    for name, size in [("googlenet", 37), ("googlenet", 224), ("resnet50", 45)]:
        net, out = zoo._make(name, 2, size, None, 0, 10)
        inferred = onnx.shape_inference.infer_shapes(net.to_onnx(out, {}), strict_mode=True)
        vi = {v.name: tuple(d.dim_value for d in v.type.tensor_type.shape.dim) for v in inferred.graph.value_info}
        checked = [k for k in net.shapes if k in vi]
        assert len(checked) > 10
        for k in checked:
            assert vi[k] == net.shapes[k], (name, size, k)


def _adaptive_avg_pool_ref(x, size):
    """PyTorch's AdaptiveAvgPool2d, written out (bins floor(i*H/s) .. ceil((i+1)*H/s))."""
    n, c, h, w = x.shape
    out = np.zeros((n, c, size, size))
    for i in range(size):
        for j in range(size):
            h0, h1 = (i * h) // size, -(-((i + 1) * h) // size)
            w0, w1 = (j * w) // size, -(-((j + 1) * w) // size)
            out[:, :, i, j] = x[:, :, h0:h1, w0:w1].mean(axis=(2, 3))
    return out


@pytest.mark.parametrize("hw", [(1, 1), (3, 3), (4, 5), (13, 9), (6, 6)])
def test_adaptive_pool_matches_pytorch_bins(hw, rng):
    import onnxruntime as ort
    from onnx import TensorProto, helper

    net = zoo._Net("pool", 2, 8, 0)
    net.shapes["x"] = (2, 3, *hw)
    y = net.adaptive_avgpool("x", 6)
    if hw == (6, 6):
        assert y == "x" and not net.nodes
        return
    g = helper.make_graph([helper.make_node(op, i, o, **a) for op, i, o, a in net.nodes], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, *hw])],
                          [helper.make_tensor_value_info(y, TensorProto.FLOAT, None)],
                          initializer=[numpy_helper.from_array(v, k) for k, v in net.consts.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    x = randn(rng, (2, 3, *hw))
    got = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, _adaptive_avg_pool_ref(x.astype(np.float64), 6), rtol=1e-6, atol=1e-6)


def test_224_models_have_no_pool_matmul():
    for name in ("alexnet", "vgg16"):
        net, _ = zoo._make(name, 1, 224, None, 0, 10)
        assert not net.consts and not any(op == "MatMul" for op, *_ in net.nodes)


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown zoo model 'lenet'"):
        zoo.build("lenet")
    with pytest.raises(ValueError, match="image_size 32 is too small for alexnet"):
        zoo.alexnet(image_size=32)
    with pytest.raises(ValueError, match="batch must be a positive integer"):
        zoo.resnet50(batch=0)
    with pytest.raises(ValueError, match="sparsity must be in"):
        zoo.googlenet(image_size=32, sparsity=1.0)
    with pytest.raises(ValueError, match="only for alexnet"):
        zoo.build("vgg16", grouped=True)
    with pytest.raises(ValueError, match="num_classes"):
        zoo.resnet50(num_classes=0)


def test_zoo_imports_neither_onnx_nor_tvm(repo_root):
    """weights() must work where only numpy is installed (the GPU machine regenerates weights with it)."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['onnx'] = None; sys.modules['tvm'] = None\n"
            "import types; pkg = types.ModuleType('escort_tvm'); pkg.__path__ = ['escort_tvm']\n"
            "sys.modules['escort_tvm'] = pkg\n"
            "from escort_tvm import zoo\n"
            "w = zoo.weights('resnet50', sparsity=0.9)\n"
            "print(len(w))\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=repo_root, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == str(53 + 53 * 4 + 2)
