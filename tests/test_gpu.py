"""On a CUDA GPU: the CUDA schedule and whole CUDA builds vs float64 / onnxruntime references.

Every test here is marked ``gpu`` and skipped when ``tvm.cuda(0).exist`` is False (see conftest.py).
"""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import tvm

import escort_tvm
from escort_tvm import ConvSpec, Epilogue, SparseConvWeight, conv2d_reference
from escort_tvm.cuda_toolchain import carries_gpu_binary
from escort_tvm.models import small_pruned_cnn
from schedules import CUDAKnobs, SparseConvCUDA
from _helpers import (CONV_CASES, assert_close, case_params, conv_data, func_name, kernel_input, knob_cover,
                      ort_reference, randn, run_kernel)

pytestmark = pytest.mark.gpu


def _run_cuda(target, spec, w, b, x, relu, knobs=None):
    sw = SparseConvWeight.from_dense(w, spec.groups)
    plan = SparseConvCUDA().apply(spec, sw, Epilogue(relu=relu), knobs)
    with target:
        lib = tvm.compile(plan.func, target=target)
    return run_kernel(lib, func_name(plan.func), spec, kernel_input(plan, x, spec), plan.weight_arrays, b,
                      dev=tvm.cuda(0))


@pytest.mark.parametrize("relu", [False, True], ids=["bias", "bias_relu"])
@pytest.mark.parametrize("spec,sparsity", case_params())
def test_cuda_schedule_matches_reference(cuda_target, rng, spec, sparsity, relu):
    x, w, b = conv_data(rng, spec, sparsity)
    out = _run_cuda(cuda_target, spec, w, b, x, relu)
    assert_close(out, conv2d_reference(x, w, spec, b, relu))


COVER = knob_cover(CUDAKnobs)
VARIANT_CASES = ["3x3_s2", "batch3_grouped_s2", "dilation_2x3_5x3", "long_rows", "wide_out"]
_BY_NAME = {name: (spec, sp) for name, spec, sp in CONV_CASES}


@pytest.mark.parametrize("case", VARIANT_CASES)
@pytest.mark.parametrize("i", range(len(COVER)), ids=[f"cover{i}" for i in range(len(COVER))])
def test_cuda_every_knob_value(cuda_target, rng, case, i):
    spec, sparsity = _BY_NAME[case]
    x, w, b = conv_data(rng, spec, sparsity)
    out = _run_cuda(cuda_target, spec, w, b, x, True, COVER[i])
    assert_close(out, conv2d_reference(x, w, spec, b, relu=True))


@pytest.mark.parametrize("knobs", [
    CUDAKnobs(threads_x=32, threads_y=1, channels_per_block=1, chunk=256),  # one channel's row > one chunk
    CUDAKnobs(threads_x=8, threads_y=4, channels_per_block=4, chunk=512, images_per_thread=4),
    CUDAKnobs(threads_x=16, threads_y=2, channels_per_block=16, chunk=1024, pixels_per_thread=4),
], ids=["kb1_chunk256", "kb4_chunk512_vn4", "kb16_chunk1024_vw4"])
def test_cuda_rows_longer_than_a_chunk(cuda_target, rng, knobs):
    spec = ConvSpec(N=3, C=96, H=7, W=9, K=20, KH=3, KW=3, pad=(1, 1, 1, 1))
    x, w, b = conv_data(rng, spec, 0.2)  # ~690 nonzeros per output channel
    w[[0, 7, 19]] = 0.0  # and some empty rows in between
    rp = SparseConvWeight.from_dense(w).row_ptr
    kb = knobs.channels_per_block
    group_nnz = [rp[min(g + kb, spec.K)] - rp[g] for g in range(0, spec.K, kb)]
    assert max(group_nnz) > knobs.chunk, "the case must stage more than one chunk per block"
    out = _run_cuda(cuda_target, spec, w, b, x, False, knobs)
    assert_close(out, conv2d_reference(x, w, spec, b))


def test_cuda_empty_rows_and_zero_weight(cuda_target, rng):
    spec = ConvSpec(N=2, C=6, H=9, W=8, K=10, KH=3, KW=3, pad=(1, 1, 1, 1))
    x, w, b = conv_data(rng, spec, 0.7)
    w[[0, 4, 5, 9]] = 0.0
    assert_close(_run_cuda(cuda_target, spec, w, b, x, False), conv2d_reference(x, w, spec, b))
    z = np.zeros_like(w)
    out = _run_cuda(cuda_target, spec, z, b, x, False)
    assert_close(out, conv2d_reference(x, z, spec, b))
    np.testing.assert_array_equal(out, np.broadcast_to(b.reshape(1, -1, 1, 1), out.shape))


# ---------------------------------------------------------------- whole models
@pytest.mark.parametrize("batch", [1, 2, 5])
def test_small_pruned_cnn_cuda_vs_onnxruntime(rng, batch, tmp_path):
    model = small_pruned_cnn(batch=batch, size=24, seed=batch)
    mod, params = escort_tvm.from_onnx(model)
    built = escort_tvm.build(mod, params, "cuda")
    assert [r.kernel for r in built.report] == ["dense"] + ["sparse"] * 5
    x = randn(rng, (batch, 3, 24, 24))
    ref = ort_reference(model, {"input": x})
    assert_close(built(x), ref)
    so = built.export_library(tmp_path / "cnn.so")
    assert carries_gpu_binary(so)
    loaded = escort_tvm.load(so)
    assert loaded.device.dlpack_device_type() == 2
    assert_close(loaded(x), ref)


def test_cuda_export_runs_in_fresh_runtime_only_process(rng, tmp_path, runtime_env):
    model = small_pruned_cnn(batch=2, size=16, seed=9)
    mod, params = escort_tvm.from_onnx(model)
    so = escort_tvm.build(mod, params, "cuda").export_library(tmp_path / "cnn.so")
    x = randn(rng, (2, 3, 16, 16))
    np.save(tmp_path / "x.npy", x)
    code = ("import sys, json, numpy as np, escort_tvm\n"
            "m = escort_tvm.load(sys.argv[1])\n"
            "np.save(sys.argv[3], m(np.load(sys.argv[2])))\n"
            "json.dump({'relax': 'tvm.relax' in sys.modules, 'dev': m.device.dlpack_device_type()},"
            " open(sys.argv[4], 'w'))\n")
    proc = subprocess.run([sys.executable, "-c", code, str(so), str(tmp_path / "x.npy"), str(tmp_path / "y.npy"),
                           str(tmp_path / "info.json")], env=runtime_env, capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads((tmp_path / "info.json").read_text())
    assert info == {"relax": False, "dev": 2}
    assert_close(np.load(tmp_path / "y.npy"), ort_reference(model, {"input": x}))
