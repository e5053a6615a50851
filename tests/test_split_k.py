"""relay_passes.split_k: small-batch dense layers with their reduction split across blocks (CUDA builds)."""
from __future__ import annotations

import re

import numpy as np
import pytest
import tvm
from onnx import helper
from tvm import relax

import escort_tvm
from relay_passes.split_k import MAX_SLICE, MIN_SLICE, MIN_WEIGHT, choose_split, split_k_matmuls
from _helpers import GLOBAL_FN, assert_close, cuda_source, onnx_model, ort_reference, randn


@pytest.mark.parametrize("mkn, split", [
    ((32, 25088, 4096), 32),  # VGG-16 fc6: 64 blocks as it was, each walking K = 25088
    ((32, 4096, 4096), 8),  # fc7: 64 blocks -> 512
    ((32, 4096, 1000), 16),  # fc8: 16 blocks -> 256 (slices of 256, the shortest allowed)
    ((32, 2048, 1000), 8),  # ResNet-50's classifier
    ((1, 25088, 4096), 1),  # M = 1: dlight's GEMV rule
    ((512, 4096, 4096), 1),  # large batch: the M tiles fill the GPU
    ((8, 512, 10), 1),  # too small a weight to pay for two more launches
    ((8, 2048, 1000), 8),  # ResNet-50's classifier at batch 8: 0.082 -> 0.019 ms (bench/mm_small)
    ((2, 1024, 1000), 4),  # GoogLeNet's at batch 2: the same K walk as at 32, whatever M is
    ((32, 257 * 4, 4096), 4),  # 1028 = 4 x 257: the only split that keeps slices >= 256
    ((32, 509, 4096), 1),  # a prime K: no slice divides it
])
def test_choose_split(mkn, split):
    s, reason = choose_split(*mkn)
    assert s == split, reason
    assert (s == 1) == bool(reason)
    if s > 1:
        assert mkn[1] % s == 0 and mkn[1] // s >= MIN_SLICE


def test_slices_stay_short_where_the_gpu_is_already_full():
    s, _ = choose_split(64, 8192, 16384)  # 512 blocks without a split, but each would walk K = 8192
    assert 8192 // s <= MAX_SLICE


def _matmul_module(M, K, N, weight=None):
    """main(x[M, K], w[K, N] or a constant, b[N]) = relu(x @ w + b)"""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((M, K), "float32"))
    b = relax.Var("b", relax.TensorType((N,), "float32"))
    params = [x] + ([relax.Var("w", relax.TensorType((K, N), "float32"))] if weight is None else []) + [b]
    w = params[1] if weight is None else relax.const(weight)
    with bb.function("main", params):
        with bb.dataflow():
            out = bb.emit_output(bb.emit(relax.op.nn.relu(relax.op.add(relax.op.matmul(x, w), b))))
        bb.emit_func_output(out)
    return bb.get()


@pytest.mark.parametrize("weight_kind", ["input", "constant"])
def test_split_matmul_matches_float64(weight_kind, rng):
    M, K, N = 4, 2048, 500  # 8 blocks as it is; slices of 256 (a weight just over MIN_WEIGHT)
    x, w, b = randn(rng, (M, K)), randn(rng, (K, N)), randn(rng, (N,))
    mod = _matmul_module(M, K, N, w if weight_kind == "constant" else None)
    new, seen = split_k_matmuls(mod)
    assert K * N >= MIN_WEIGHT and [(m.shape, m.split) for m in seen] == [((M, K, N), 8)]
    text = new["main"].script()
    assert "R.memory.view" in text and "R.sum" in text  # the weight is viewed as [S, K/S, N], not copied
    ex = tvm.compile(new, target="llvm")
    vm = relax.VirtualMachine(ex, tvm.cpu())
    args = [x] + ([w] if weight_kind == "input" else []) + [b]
    out = vm["main"](*[tvm.runtime.tensor(a) for a in args]).numpy()
    ref = np.maximum(x.astype(np.float64) @ w.astype(np.float64) + b, 0.0)
    assert_close(out, ref)


def test_module_without_a_matmul_to_split_is_returned_as_is(rng):
    mod = _matmul_module(1, 4096, 1000)
    new, seen = split_k_matmuls(mod)
    assert new is mod and [m.split for m in seen] == [1]


def test_cuda_build_splits_the_classifier_and_reports_it(rng, tmp_path):
    """A pruned conv followed by a classifier at batch 32, built for CUDA (nvcc here): the classifier's matmul
    becomes a batched matmul and a sum, both device kernels; the report says so."""
    N, C, K, HW, classes = 32, 16, 32, 8, 1000
    conv_w = randn(rng, (K, C, 3, 3))
    conv_w[np.abs(conv_w) < np.quantile(np.abs(conv_w), 0.9)] = 0.0
    fc_w = randn(rng, (classes, K * HW * HW), 0.05)
    nodes = [helper.make_node("Conv", ["x", "cw"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Flatten", ["r"], ["f"]),
             helper.make_node("Gemm", ["f", "fw", "fb"], ["y"], transB=1)]
    model = onnx_model(nodes, [("x", [N, C, HW, HW])], [("y", [N, classes])],
                       {"cw": conv_w, "fw": fc_w, "fb": randn(rng, (classes,))})
    mod, params = escort_tvm.from_onnx(model)
    built = escort_tvm.build(mod, params, {"kind": "cuda", "arch": "sm_90"}, kernel="sparse")
    assert built.meta["matmuls"] == [{"shape": [N, K * HW * HW, classes], "split": 8, "reason": ""}]
    assert "matmul 32x2048 @ 2048x1000: split K in 8" in built.report_text()
    kernels = set(re.findall(GLOBAL_FN, cuda_source(built.executable)))
    assert any("matmul" in k for k in kernels) and any("sum" in k for k in kernels), kernels
    kept = escort_tvm.build(mod, params, {"kind": "cuda", "arch": "sm_90"}, kernel="sparse", split_matmuls=False)
    assert kept.meta["matmuls"] == [] and "matmul" not in kept.report_text()
    # the same model on llvm is not split (the pass is for CUDA's dlight schedules) and matches onnxruntime
    cpu = escort_tvm.build(mod, params, "llvm")
    assert cpu.meta["matmuls"] == []
    x = randn(rng, (N, C, HW, HW))
    assert_close(cpu(x), ort_reference(model, {"x": x}))


@pytest.mark.gpu
@pytest.mark.parametrize("weight_kind", ["input", "constant"])
def test_split_matmul_on_the_gpu_matches_float64(weight_kind, rng, cuda_target):
    """The same rewrite run by dlight's CUDA schedules (the whole-network benchmarks also check it, vs torchvision)."""
    M, K, N = 32, 4096, 1000
    x, w, b = randn(rng, (M, K)), randn(rng, (K, N)), randn(rng, (N,))
    new, seen = split_k_matmuls(_matmul_module(M, K, N, w if weight_kind == "constant" else None))
    assert seen[0].split == 16
    with cuda_target:
        ex = tvm.compile(new, target=cuda_target)
    dev = tvm.cuda(0)
    vm = relax.VirtualMachine(ex, dev)
    args = [x] + ([w] if weight_kind == "input" else []) + [b]
    out = vm["main"](*[tvm.runtime.tensor(a, dev) for a in args]).numpy()
    assert_close(out, np.maximum(x.astype(np.float64) @ w.astype(np.float64) + b, 0.0))


def test_bench_matmul_prepares_every_split(repo_root, tmp_path, monkeypatch):
    """scripts/bench_matmul.py: one CUDA library per valid split (and S = 1, TVM as it is), the default marked."""
    import json
    import sys

    sys.path.insert(0, str(repo_root / "scripts"))
    import bench_matmul

    monkeypatch.setattr(bench_matmul, "SHAPES", (("fc", 1024, 1000),))
    assert bench_matmul.main(["prepare", "--out", str(tmp_path), "--batches", "32,8"]) == 0
    man = json.loads((tmp_path / "manifest.json").read_text())
    for m in (32, 8):
        rows = [e for e in man["shapes"] if e["M"] == m]
        assert [e["split"] for e in rows] == [1, 4, 8, 16]  # 1024 / 16 = 64, the shortest slice swept
        assert [e["split"] for e in rows if e["default"]] == [choose_split(m, 1024, 1000)[0]]
    assert all((tmp_path / e["file"]).stat().st_size > 0 for e in man["shapes"])
