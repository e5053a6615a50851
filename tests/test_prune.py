"""escort_tvm.prune: magnitude pruning of an ONNX model's conv weights, per layer and global."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import escort_tvm
from escort_tvm.models import small_pruned_cnn
from escort_tvm.prune import magnitude_prune
from _helpers import assert_close, onnx_model, ort_reference, randn


def _inits(model):
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _sparsity(w):
    return 1.0 - np.count_nonzero(w) / w.size


@pytest.fixture
def dense_cnn():
    """small_pruned_cnn at sparsity 0: every weight dense (the prune function reads nothing else)."""
    return small_pruned_cnn(batch=1, size=16, sparsity=0.0, seed=5)


def test_layer_scope_prunes_each_conv_but_first_and_depthwise(dense_cnn, tmp_path):
    before = _inits(dense_cnn)
    out = tmp_path / "p" / "pruned.onnx"
    model, report = escort_tvm.prune(dense_cnn, 0.8, output=out)
    assert out.is_file()
    onnx.checker.check_model(onnx.load(str(out)))
    after = _inits(model)
    assert all(np.array_equal(before[k], v) for k, v in _inits(dense_cnn).items())  # input untouched
    by_weight = {e.weight: e for e in report.entries}
    assert list(by_weight) == ["stem.weight", "conv1.weight", "conv2_grouped.weight", "conv3_depthwise.weight",
                               "conv4_1x1.weight", "conv5_dilated.weight"]
    assert not by_weight["stem.weight"].pruned and "first" in by_weight["stem.weight"].reason
    assert not by_weight["conv3_depthwise.weight"].pruned and "depthwise" in by_weight["conv3_depthwise.weight"].reason
    for name in ("stem.weight", "conv3_depthwise.weight", "fc.weight", "conv1.bias"):
        np.testing.assert_array_equal(after[name], before[name])
    for name in ("conv1.weight", "conv2_grouped.weight", "conv4_1x1.weight", "conv5_dilated.weight"):
        w, w0 = after[name], before[name]
        assert abs(_sparsity(w) - 0.8) < 1.0 / w.size + 1e-9, name
        assert by_weight[name].pruned and by_weight[name].after == pytest.approx(_sparsity(w), abs=1e-6)
        kept = w != 0
        np.testing.assert_array_equal(w[kept], w0[kept])  # survivors unchanged
        assert np.abs(w0[~kept]).max() <= np.abs(w0[kept]).min()  # the smallest went
    assert "conv1.weight" in report.text() and "kept (first conv" in report.text()


def test_input_model_untouched_and_path_input(dense_cnn, tmp_path):
    path = tmp_path / "dense.onnx"
    onnx.save(dense_cnn, str(path))
    snapshot = dense_cnn.SerializeToString()
    m1, _ = escort_tvm.prune(dense_cnn, 0.5)
    m2, _ = escort_tvm.prune(path, 0.5)
    assert dense_cnn.SerializeToString() == snapshot
    assert m1.SerializeToString() == m2.SerializeToString()


def test_global_scope_one_threshold(dense_cnn):
    model, report = escort_tvm.prune(dense_cnn, 0.7, scope="global")
    after, before = _inits(model), _inits(dense_cnn)
    pruned = [e.weight for e in report.entries if e.pruned]
    assert pruned == ["conv1.weight", "conv2_grouped.weight", "conv4_1x1.weight", "conv5_dilated.weight"]
    total = sum(after[n].size for n in pruned)
    zeros = sum(after[n].size - np.count_nonzero(after[n]) for n in pruned)
    assert abs(zeros / total - 0.7) <= 1.0 / total
    assert report.pruned_sparsity() == pytest.approx(zeros / total, abs=1e-5)
    kept_min = min(np.abs(after[n][after[n] != 0]).min() for n in pruned)
    cut_max = max(np.abs(before[n][after[n] == 0]).max() for n in pruned)
    assert cut_max <= kept_min
    # layers of different fan-in (He init scales) end up at different sparsities: the scope is really global
    assert len({round(_sparsity(after[n]), 2) for n in pruned}) > 1


def test_flags_prune_first_and_depthwise(dense_cnn):
    model, report = escort_tvm.prune(dense_cnn, 0.5, skip_first=False, skip_depthwise=False)
    assert all(e.pruned for e in report.entries)
    after = _inits(model)
    assert abs(_sparsity(after["stem.weight"]) - 0.5) < 0.01
    assert abs(_sparsity(after["conv3_depthwise.weight"]) - 0.5) < 0.01


def test_pruned_model_runs_and_gets_sparse_kernels(dense_cnn, rng):
    model, _ = escort_tvm.prune(dense_cnn, 0.9)
    mod, params = escort_tvm.from_onnx(model)
    built = escort_tvm.build(mod, params, "llvm")
    kernels = {r.name: r.kernel for r in built.report}
    assert kernels["stem.weight"] == "dense" and kernels["conv1.weight"] == "sparse"
    x = randn(rng, (1, 3, 16, 16))
    assert_close(built(x), ort_reference(model, {"input": x}))


def test_already_sparse_layer_and_zero_target(dense_cnn):
    model, _ = escort_tvm.prune(dense_cnn, 0.9)
    again, report = escort_tvm.prune(model, 0.5)  # already sparser than asked: stays as it is
    for e in report.entries:
        if e.pruned:
            assert e.before == pytest.approx(e.after) and e.after >= 0.89
    same, report0 = escort_tvm.prune(dense_cnn, 0.0)
    assert all(e.after == e.before for e in report0.entries)
    assert _inits(same).keys() == _inits(dense_cnn).keys()


def test_magnitude_prune_counts_and_dtype():
    w = np.random.default_rng(0).standard_normal((16, 8, 3, 3)).astype(np.float16)
    p = magnitude_prune(w, 0.75)
    assert p.dtype == np.float16 and np.count_nonzero(p) == round(0.25 * w.size)


@pytest.mark.parametrize("sparsity", [1.0, -0.1, 1.5, float("nan")])
def test_bad_sparsity(dense_cnn, sparsity):
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\)"):
        escort_tvm.prune(dense_cnn, sparsity)


def test_bad_arguments(dense_cnn, tmp_path):
    with pytest.raises(TypeError, match="sparsity must be a number"):
        escort_tvm.prune(dense_cnn, "lots")
    with pytest.raises(ValueError, match="scope must be 'layer' or 'global'"):
        escort_tvm.prune(dense_cnn, 0.5, scope="model")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        escort_tvm.prune(tmp_path / "nope.onnx", 0.5)
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"this is not protobuf")
    with pytest.raises(ValueError, match="does not parse"):
        escort_tvm.prune(bad, 0.5)


def test_no_conv_and_nothing_left(rng):
    relu_only = onnx_model([helper.make_node("Relu", ["x"], ["y"])], [("x", [1, 2])], [("y", [1, 2])], {})
    with pytest.raises(ValueError, match="no Conv node"):
        escort_tvm.prune(relu_only, 0.5)
    one_conv = onnx_model([helper.make_node("Conv", ["x", "w"], ["y"])], [("x", [1, 3, 5, 5])], [("y", [1, 4, 3, 3])],
                          {"w": randn(rng, (4, 3, 3, 3))})
    with pytest.raises(ValueError, match=r"no conv weight left to prune: .*first conv"):
        escort_tvm.prune(one_conv, 0.5)
    model, report = escort_tvm.prune(one_conv, 0.5, skip_first=False)
    assert report.entries[0].pruned


def test_weight_not_an_initializer(rng):
    nodes = [helper.make_node("Identity", ["w0"], ["w"]), helper.make_node("Conv", ["x", "w"], ["y"], name="c")]
    model = onnx_model(nodes, [("x", [1, 3, 5, 5])], [("y", [1, 4, 3, 3])], {"w0": randn(rng, (4, 3, 3, 3))})
    with pytest.raises(ValueError, match=r"Conv 'c': its weight 'w' is not an initializer \(computed by a Identity"):
        escort_tvm.prune(model, 0.5)
    as_input = onnx_model([helper.make_node("Conv", ["x", "w"], ["y"])], [("x", [1, 3, 5, 5]), ("w", [4, 3, 3, 3])],
                          [("y", [1, 4, 3, 3])], {})
    with pytest.raises(ValueError, match="a graph input"):
        escort_tvm.prune(as_input, 0.5)


def test_shared_weight_pruned_once(rng):
    nodes = [helper.make_node("Conv", ["x", "w0"], ["a"], pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["a", "w"], ["b"], pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["b", "w"], ["y"], pads=[1, 1, 1, 1])]
    model = onnx_model(nodes, [("x", [1, 4, 6, 6])], [("y", [1, 4, 6, 6])],
                       {"w0": randn(rng, (4, 4, 3, 3)), "w": randn(rng, (4, 4, 3, 3))})
    new, report = escort_tvm.prune(model, 0.5)
    assert [e.pruned for e in report.entries] == [False, True, False]
    assert "shared" in report.entries[2].reason
    assert abs(_sparsity(_inits(new)["w"]) - 0.5) < 0.02
    x = randn(rng, (1, 4, 6, 6))
    assert np.isfinite(ort_reference(new, {"x": x})).all()
