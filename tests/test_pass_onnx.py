"""The Relax rewrite pass and escort_tvm.build on ONNX models, checked against onnxruntime."""
from __future__ import annotations

import json

import numpy as np
import pytest
from onnx import helper

import escort_tvm
from escort_tvm import ConvSpec
from escort_tvm.models import small_pruned_cnn
from _helpers import assert_close, onnx_model, ort_reference, pruned, randn


def build_onnx(model, target="llvm", **kw):
    mod, params = escort_tvm.from_onnx(model)
    return escort_tvm.build(mod, params, target, **kw)


def by_index(report):
    assert [r.index for r in report] == list(range(len(report)))
    return report


# ---------------------------------------------------------------- (a) constant pruned / dense / graph-input weight
@pytest.fixture(scope="module")
def mixed_model():
    rng = np.random.default_rng(1234)
    w_sparse = pruned(rng, (8, 4, 3, 3), 0.85)
    b_sparse = randn(rng, (8,), 0.5)
    w_dense = randn(rng, (8, 8, 3, 3), 0.3)
    nodes = [
        helper.make_node("Conv", ["x", "w_sparse", "b_sparse"], ["a"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a"], ["a_relu"]),
        helper.make_node("Conv", ["a_relu", "w_dense"], ["b"], pads=[1, 0, 1, 2], strides=[1, 2]),
        helper.make_node("Conv", ["b", "w_input"], ["y"]),
    ]
    model = onnx_model(nodes, [("x", [1, 4, 10, 9]), ("w_input", [6, 8, 1, 1])], [("y", [1, 6, 10, 5])],
                       {"w_sparse": w_sparse, "b_sparse": b_sparse, "w_dense": w_dense})
    return model, w_sparse


def test_mixed_weights_report(mixed_model):
    model, w_sparse = mixed_model
    built = build_onnx(model)
    rep = by_index(built.report)
    assert len(rep) == 3

    sparse, dense, dyn = rep
    assert sparse.kernel == "sparse" and sparse.reason == ""
    assert sparse.name == "w_sparse"
    assert sparse.fused == ["bias", "relu"]
    assert sparse.nnz == np.count_nonzero(w_sparse)
    assert sparse.sparsity == pytest.approx(1 - np.count_nonzero(w_sparse) / w_sparse.size, abs=1e-4)
    assert tuple(sparse.weight_shape) == (8, 4, 3, 3) and tuple(sparse.input_shape) == (1, 4, 10, 9)
    assert tuple(sparse.output_shape) == (1, 8, 10, 9)
    assert sparse.schedule.startswith("cpu.row_vector")

    assert dense.kernel == "dense" and dense.name == "w_dense"
    assert "min_sparsity" in dense.reason
    assert dense.sparsity == 0.0 and dense.nnz == 8 * 8 * 9 and dense.fused == []
    assert tuple(dense.attrs["stride"]) == (1, 2) and tuple(dense.attrs["pad"]) == (1, 0, 1, 2)

    assert dyn.kernel == "dense" and dyn.fused == []
    assert "not a constant" in dyn.reason
    assert dyn.sparsity is None and dyn.nnz is None

    text = built.report_text()
    assert text.splitlines()[0] == "3 conv2d: 1 sparse, 2 dense"
    assert "not a constant" in text and "min_sparsity" in text
    assert built.inputs == [("x", (1, 4, 10, 9), "float32"), ("w_input", (6, 8, 1, 1), "float32")]


def test_mixed_weights_numerics(mixed_model, rng):
    model, _ = mixed_model
    built = build_onnx(model)
    for _ in range(2):  # two fresh inputs, including a fresh run-time weight
        x = randn(rng, (1, 4, 10, 9))
        w_in = randn(rng, (6, 8, 1, 1))
        assert_close(built(x, w_in), ort_reference(model, {"x": x, "w_input": w_in}))


# ---------------------------------------------------------------- (b) weights computed from constants
def test_weight_from_constant_subgraph_becomes_sparse(rng):
    w1 = pruned(rng, (6, 4, 3, 3), 0.8)
    scale = (rng.random((6, 1, 1, 1)) + 0.5).astype(np.float32)
    w2_t = pruned(rng, (3, 5, 6, 6), 0.85)  # Transpose(perm=[2, 3, 0, 1]) -> (6, 6, 3, 5) OIHW
    nodes = [
        helper.make_node("Mul", ["w1", "scale"], ["w1_scaled"]),
        helper.make_node("Conv", ["x", "w1_scaled"], ["a"], pads=[1, 1, 1, 1]),
        helper.make_node("Transpose", ["w2_t"], ["w2"], perm=[2, 3, 0, 1]),
        helper.make_node("Conv", ["a", "w2"], ["y"], pads=[1, 2, 1, 2]),
    ]
    model = onnx_model(nodes, [("x", [1, 4, 9, 8])], [("y", [1, 6, 9, 8])], {"w1": w1, "scale": scale, "w2_t": w2_t})
    built = build_onnx(model)
    rep = by_index(built.report)
    assert [r.kernel for r in rep] == ["sparse", "sparse"], built.report_text()
    assert rep[0].nnz == np.count_nonzero(w1) and rep[1].nnz == np.count_nonzero(w2_t)
    assert tuple(rep[1].weight_shape) == (6, 6, 3, 5)
    x = randn(rng, (1, 4, 9, 8))
    assert_close(built(x), ort_reference(model, {"x": x}))


# ---------------------------------------------------------------- (c) auto_pad
@pytest.mark.parametrize("auto_pad,kernel,stride,hw", [
    ("SAME_UPPER", 3, 2, (10, 11)),  # odd total padding: the extra row/column goes at the end
    ("SAME_UPPER", 4, 1, (9, 7)),
    ("SAME_LOWER", 4, 1, (9, 7)),  # the extra one goes at the beginning
])
def test_auto_pad(rng, auto_pad, kernel, stride, hw):
    w = pruned(rng, (5, 3, kernel, kernel), 0.8)
    b = randn(rng, (5,), 0.5)
    oh, ow = -(-hw[0] // stride), -(-hw[1] // stride)
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], auto_pad=auto_pad, strides=[stride, stride]),
             helper.make_node("Relu", ["c"], ["y"])]
    model = onnx_model(nodes, [("x", [1, 3, *hw])], [("y", [1, 5, oh, ow])], {"w": w, "b": b})
    built = build_onnx(model)
    rep = built.report
    assert len(rep) == 1 and rep[0].kernel == "sparse", built.report_text()
    assert rep[0].fused == ["bias", "relu"]
    x = randn(rng, (1, 3, *hw))
    assert_close(built(x), ort_reference(model, {"x": x}))


# ---------------------------------------------------------------- epilogue fusion rules
def test_fusion_only_for_per_channel_adds(rng):
    """Add of a (W,)-shaped constant with W == K broadcasts over columns, not channels: never fused as bias.
    Add of a scalar is a per-channel bias. A conv output with two users fuses nothing."""
    K = W = 6
    w = [pruned(rng, (K, 3 if i == 0 else K, 3, 3), 0.8) for i in range(4)]
    col = randn(rng, (W,))
    scalar = np.array(0.7, np.float32)
    chan = randn(rng, (1, K, 1, 1))
    nodes = [
        helper.make_node("Conv", ["x", "w0"], ["c0"], pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c0", "col"], ["a0"]),  # column add: not a bias
        helper.make_node("Conv", ["a0", "w1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["scalar", "c1"], ["a1"]),  # scalar, constant first
        helper.make_node("Relu", ["a1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"]),  # c2 has two users: nothing fused
        helper.make_node("Add", ["r2", "c2"], ["s2"]),
        helper.make_node("Conv", ["s2", "w3"], ["c3"], pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c3", "chan"], ["y"]),
    ]
    model = onnx_model(nodes, [("x", [1, 3, 7, W])], [("y", [1, K, 7, W])],
                       {"w0": w[0], "col": col, "w1": w[1], "scalar": scalar, "w2": w[2], "w3": w[3], "chan": chan})
    built = build_onnx(model)
    rep = by_index(built.report)
    assert [r.kernel for r in rep] == ["sparse"] * 4, built.report_text()
    assert [r.fused for r in rep] == [[], ["bias", "relu"], [], ["bias"]]
    x = randn(rng, (1, 3, 7, W))
    assert_close(built(x), ort_reference(model, {"x": x}))


# ---------------------------------------------------------------- (d) the package's pruned CNN
@pytest.mark.parametrize("batch", [1, 2])
def test_small_pruned_cnn_vs_onnxruntime(rng, batch):
    model = small_pruned_cnn(batch=batch, size=24, seed=batch)
    built = build_onnx(model)
    rep = by_index(built.report)
    assert len(rep) == 6
    assert rep[0].kernel == "dense" and "min_sparsity" in rep[0].reason  # the unpruned stem
    assert [r.kernel for r in rep[1:]] == ["sparse"] * 5, built.report_text()
    assert [r.fused for r in rep] == [[], ["bias", "relu"], ["bias", "relu"], ["bias"], ["relu"], ["bias", "relu"]]
    assert [r.attrs["groups"] for r in rep] == [1, 1, 4, 32, 1, 1]
    assert tuple(rep[5].attrs["dilation"]) == (2, 2) and tuple(rep[5].attrs["pad"]) == (4, 2, 3, 1)
    for r in rep[1:]:
        assert r.sparsity == pytest.approx(0.9, abs=0.01)
    x = randn(rng, (batch, 3, 24, 24))
    out = built(x)
    assert out.shape == (batch, 10)
    assert_close(out, ort_reference(model, {"input": x}))


def test_small_pruned_cnn_dense_build_agrees(rng):
    """min_sparsity above 1 keeps every conv dense: the same model must give the same numbers."""
    model = small_pruned_cnn(batch=1, size=16, seed=7)
    mod, params = escort_tvm.from_onnx(model)
    dense = escort_tvm.build(mod, params, "llvm", min_sparsity=2.0)
    assert [r.kernel for r in dense.report] == ["dense"] * 6
    assert all("min_sparsity" in r.reason for r in dense.report)
    x = randn(rng, (1, 3, 16, 16))
    assert_close(dense(x), ort_reference(model, {"input": x}))


# ---------------------------------------------------------------- (e) min_sparsity
def _single_conv(w, hw=(7, 8)):
    K, C, KH, KW = w.shape
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], pads=[KH // 2, KW // 2, KH // 2, KW // 2])]
    return onnx_model(nodes, [("x", [1, C, *hw])], [("y", [1, K, *hw])], {"w": w})


@pytest.mark.parametrize("min_sparsity,kernel", [(0.0, "sparse"), (0.5, "sparse"), (0.75, "sparse"),
                                                 (0.7501, "dense"), (0.9, "dense"), (1.5, "dense")])
def test_min_sparsity_threshold(rng, min_sparsity, kernel):
    w = pruned(rng, (8, 8, 3, 3), 0.75)  # exactly 432 of 576 zeros: sparsity 0.75
    assert np.count_nonzero(w) == 144
    model = _single_conv(w)
    built = build_onnx(model, min_sparsity=min_sparsity)
    (r,) = built.report
    assert r.kernel == kernel and r.sparsity == 0.75
    if kernel == "dense":
        assert "min_sparsity" in r.reason
    x = randn(rng, (1, 8, 7, 8))
    assert_close(built(x), ort_reference(model, {"x": x}))


def test_min_sparsity_zero_takes_a_dense_weight(rng):
    w = randn(rng, (4, 3, 3, 3))
    model = _single_conv(w)
    built = build_onnx(model, min_sparsity=0.0)
    assert built.report[0].kernel == "sparse" and built.report[0].sparsity == 0.0
    x = randn(rng, (1, 3, 7, 8))
    assert_close(built(x), ort_reference(model, {"x": x}))


def test_min_sparsity_compares_exact_sparsity(rng):
    """Regression: the threshold was compared with the sparsity rounded to 4 decimals."""
    w = pruned(rng, (16, 16, 3, 3), 1727 / 2304)  # true sparsity 0.749566, reported (rounded) 0.7496
    assert 1 - np.count_nonzero(w) / w.size < 0.74958
    built = build_onnx(_single_conv(w), min_sparsity=0.74958)
    assert built.report[0].kernel == "dense", "sparsity 0.749566 is below min_sparsity 0.74958"


@pytest.mark.parametrize("bad", [-0.1, float("nan")])
def test_min_sparsity_rejects_bad_values(bad):
    w = pruned(np.random.default_rng(0), (4, 3, 3, 3), 0.8)
    mod, params = escort_tvm.from_onnx(_single_conv(w))
    with pytest.raises(ValueError, match="min_sparsity"):
        escort_tvm.build(mod, params, "llvm", min_sparsity=bad)


# ---------------------------------------------------------------- tuning log
def test_tuning_log_picks_recorded_knobs(tmp_path, rng):
    from escort_tvm.tuning_log import TuningLog

    w = pruned(rng, (8, 8, 3, 3), 0.8)
    model = _single_conv(w, hw=(7, 20))
    spec = ConvSpec(N=1, C=8, H=7, W=20, K=8, KH=3, KW=3, pad=(1, 1, 1, 1))
    log = tmp_path / "tune.jsonl"
    log.write_text("\n".join([
        TuningLog.record(spec, 0.8, "cpu.row_vector", {"vector_width": 32}, 1.0),
        TuningLog.record(spec, 0.8, "cpu.row_vector", {"vector_width": 4}, 2.0),  # slower: not picked
        TuningLog.record(spec, 0.8, "cuda.pixel_threads", {"threads": 64, "channels_per_block": 1, "chunk": 256},
                         0.1),  # another rule: ignored on llvm
    ]) + "\n")
    built = build_onnx(model, tuning_log=log)
    assert built.report[0].kernel == "sparse"
    assert "'vector_width': 32" in built.report[0].schedule
    default = build_onnx(model)
    assert "'vector_width': 32" not in default.report[0].schedule
    x = randn(rng, (1, 8, 7, 20))
    assert_close(built(x), ort_reference(model, {"x": x}))


def test_tuning_log_bad_record(tmp_path):
    log = tmp_path / "bad.jsonl"
    log.write_text(json.dumps({"rule": "cpu.row_vector"}) + "\n")
    w = pruned(np.random.default_rng(0), (4, 3, 3, 3), 0.8)
    mod, params = escort_tvm.from_onnx(_single_conv(w))
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        escort_tvm.build(mod, params, "llvm", tuning_log=log)


# ---------------------------------------------------------------- more graph shapes
def test_weight_from_constant_node_and_shared_weight(rng):
    """A weight held in a Constant node (no parameter name) and one initializer used by two convs."""
    from onnx import numpy_helper

    w_const = pruned(rng, (6, 3, 3, 3), 0.8)
    w_shared = pruned(rng, (6, 6, 1, 1), 0.75)
    nodes = [
        helper.make_node("Constant", [], ["w_const"], value=numpy_helper.from_array(w_const, "w_const")),
        helper.make_node("Conv", ["x", "w_const"], ["a"], pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["a", "w_shared"], ["b"]),
        helper.make_node("Relu", ["b"], ["br"]),
        helper.make_node("Conv", ["br", "w_shared"], ["y"], strides=[2, 2]),
    ]
    model = onnx_model(nodes, [("x", [1, 3, 9, 9])], [("y", [1, 6, 5, 5])], {"w_shared": w_shared})
    built = build_onnx(model)
    rep = by_index(built.report)
    assert [r.kernel for r in rep] == ["sparse"] * 3, built.report_text()
    assert rep[0].name == "conv2d_0" and rep[1].name == rep[2].name == "w_shared"
    assert rep[1].fused == ["relu"] and rep[2].fused == []
    x = randn(rng, (1, 3, 9, 9))
    assert_close(built(x), ort_reference(model, {"x": x}))


def test_two_outputs(rng):
    from _helpers import ort_run

    w1, w2 = pruned(rng, (4, 3, 3, 3), 0.8), pruned(rng, (5, 4, 1, 1), 0.8)
    nodes = [helper.make_node("Conv", ["x", "w1"], ["y"], pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["y", "w2"], ["z"])]
    model = onnx_model(nodes, [("x", [2, 3, 6, 7])], [("y", [2, 4, 6, 7]), ("z", [2, 5, 6, 7])], {"w1": w1, "w2": w2})
    built = build_onnx(model)
    assert [r.kernel for r in built.report] == ["sparse", "sparse"]
    x = randn(rng, (2, 3, 6, 7))
    out = built(x)
    assert isinstance(out, tuple) and len(out) == 2
    for got, ref in zip(out, ort_run(model, {"x": x})):
        assert_close(got, ref.astype(np.float64))


def test_float16_conv_stays_dense_with_reason(rng):
    from onnx import TensorProto, numpy_helper

    w = pruned(rng, (4, 3, 3, 3), 0.8).astype(np.float16)
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [1, 4, 8, 8])],
                              initializer=[numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    built = build_onnx(model)
    (r,) = built.report
    assert r.kernel == "dense" and "float16" in r.reason and "float32" in r.reason
    assert r.sparsity == pytest.approx(1 - np.count_nonzero(w) / w.size, abs=1e-4)


def test_initializer_listed_as_graph_input(rng):
    """Valid ONNX (older exporters, keep_initializers_as_inputs): the weight is also a graph input. Regression:
    from_onnx made two Relax params named 'w' and build died in BindParams."""
    from onnx import TensorProto, numpy_helper

    w = pruned(rng, (4, 3, 3, 3), 0.8)
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8]),
                               helper.make_tensor_value_info("w", TensorProto.FLOAT, [4, 3, 3, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])],
                              initializer=[numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    built = build_onnx(model)
    assert built.report[0].kernel == "sparse"
    x = randn(rng, (1, 3, 8, 8))
    assert_close(built(x), ort_reference(model, {"x": x}))


def test_tuning_log_prefers_nearest_sparsity(tmp_path, rng):
    from escort_tvm.tuning_log import TuningLog

    w = pruned(rng, (8, 8, 3, 3), 0.9)
    model = _single_conv(w, hw=(6, 9))
    spec = ConvSpec(N=1, C=8, H=6, W=9, K=8, KH=3, KW=3, pad=(1, 1, 1, 1))
    other = ConvSpec(N=1, C=8, H=6, W=10, K=8, KH=3, KW=3, pad=(1, 1, 1, 1))
    log = tmp_path / "t.jsonl"
    log.write_text("\n".join([
        TuningLog.record(spec, 0.5, "cpu.row_vector", {"vector_width": 32}, 0.5),
        TuningLog.record(spec, 0.9, "cpu.row_vector", {"vector_width": 4}, 3.0),  # nearest sparsity wins
        TuningLog.record(other, 0.9, "cpu.row_vector", {"vector_width": 16}, 0.1),  # other shape: ignored
    ]) + "\n\n")
    built = build_onnx(model, tuning_log=log)
    assert "'vector_width': 4}" in built.report[0].schedule
    x = randn(rng, (1, 8, 6, 9))
    assert_close(built(x), ort_reference(model, {"x": x}))


def test_shape_dict_overrides_a_static_batch(rng):
    """from_onnx(model, shape_dict) rebuilds a batch-1 model for batch 3; same weights as the batch-3 model."""
    m1 = small_pruned_cnn(batch=1, size=16, seed=5)
    m3 = small_pruned_cnn(batch=3, size=16, seed=5)
    mod, params = escort_tvm.from_onnx(m1, {"input": [3, 3, 16, 16]})
    built = escort_tvm.build(mod, params, "llvm")
    assert built.inputs == [("input", (3, 3, 16, 16), "float32")]
    assert [r.kernel for r in built.report] == ["dense"] + ["sparse"] * 5
    x = randn(rng, (3, 3, 16, 16))
    assert_close(built(x), ort_reference(m3, {"input": x}))


# ---------------------------------------------------------------- strided 1x1 convs (ResNet's downsamples)
def _strided_1x1(rng, stride, hw=(9, 8)):
    w = pruned(rng, (12, 8, 1, 1), 0.8)
    b = randn(rng, (12,), 0.5)
    oh, ow = -(-hw[0] // stride), -(-hw[1] // stride)
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], strides=[stride, stride]),
             helper.make_node("Relu", ["c"], ["y"])]
    return onnx_model(nodes, [("x", [2, 8, *hw])], [("y", [2, 12, oh, ow])], {"w": w, "b": b})


@pytest.mark.parametrize("stride,kernel", [(2, "sparse"), (3, "sparse"), (2, "specialized")])
def test_strided_1x1_runs_at_stride_1_on_a_subsampled_input(rng, stride, kernel):
    """The CUDA default, forced here on llvm so the numeric path runs: one strided slice, then the kernel at
    stride 1 on the slice (odd input sizes: the slice keeps the last row and column the conv reads)."""
    import tvm
    from tvm import relax

    from escort_tvm.compiler import bind_params
    from relay_passes import rewrite_sparse_convs
    from relay_passes.sparse_conv_rewrite import conv_weight_names

    model = _strided_1x1(rng, stride)
    mod, params = escort_tvm.from_onnx(model)
    names = conv_weight_names(mod["main"])
    mod, _ = bind_params(mod, params)
    mod = relax.transform.FoldConstant()(mod)
    new, (rep,) = rewrite_sparse_convs(mod, tvm.target.Target("llvm"), 0.7, None, names, kernel=kernel,
                                       subsample_strided_1x1=True)
    assert rep.kernel == kernel and "subsampled first" in rep.notes[-1], rep.line()
    assert "R.strided_slice" in new["main"].script()
    vm = relax.VirtualMachine(tvm.compile(new, target="llvm"), tvm.cpu())
    x = randn(rng, (2, 8, 9, 8))
    assert_close(vm["main"](tvm.runtime.tensor(x)).numpy(), ort_reference(model, {"x": x}))


def test_strided_1x1_is_subsampled_on_cuda_only(rng):
    model = _strided_1x1(rng, 2)
    built = build_onnx(model)  # llvm: the conv keeps its stride
    assert not any("subsampled" in n for n in built.report[0].notes)
    mod, params = escort_tvm.from_onnx(model)
    cuda = escort_tvm.build(mod, params, {"kind": "cuda", "arch": "sm_90"}, kernel="specialized")
    assert "subsampled first" in cuda.report[0].notes[-1], cuda.report_text()


@pytest.mark.parametrize("pad_input", [True, False])
def test_specialized_row_layout_gets_its_padding(rng, pad_input):
    """The row layout (SpecializedCUDA.span_knobs) of a padded conv reads its padding from a zero page that the
    pass hands over as a constant, or (pad_input) x_pad[N, C*Hp*Wp], for which the pass emits the pad and the
    reshape before the kernel. The whole graph must compile for CUDA (the numerics run in gpu_check.py and the
    GPU-marked tests: the kernel is CUDA only)."""
    import tvm
    from tvm import relax

    from escort_tvm.compiler import bind_params
    from relay_passes import rewrite_sparse_convs
    from relay_passes.sparse_conv_rewrite import conv_weight_names
    from schedules import SpecializedCUDA

    w = pruned(rng, (8, 8, 3, 3), 0.8)
    model = _single_conv(w, hw=(7, 7))
    mod, params = escort_tvm.from_onnx(model)
    names = conv_weight_names(mod["main"])
    mod, _ = bind_params(mod, params)
    mod = relax.transform.FoldConstant()(mod)
    rule = SpecializedCUDA()

    def lookup(spec, weight, name):
        return rule.span_knobs(spec, weight).with_(pad_input=pad_input).as_dict() if name == rule.name else None

    target = tvm.target.Target({"kind": "cuda", "arch": "sm_90"})
    new, (rep,) = rewrite_sparse_convs(mod, target, 0.7, lookup, names, kernel="specialized")
    assert rep.kernel == "specialized" and f"'pad_input': {pad_input}" in rep.schedule, rep.line()
    script = new["main"].script()
    assert ("R.nn.pad" in script) == pad_input, script
    if pad_input:
        assert "R.reshape" in script and script.index("R.nn.pad") < script.index("R.call_tir"), script
    kernel = next(f for gv, f in new.functions.items() if gv.name_hint == rep.function)
    assert [p.name for p in kernel.params][:2] == (["x", "bias"] if pad_input else ["x", "zeros"])
    with target:
        tvm.compile(new, target=target)
