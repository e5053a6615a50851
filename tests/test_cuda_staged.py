"""The CSR kernel's staged-input form (schedules/cuda_staged.py) on a machine without a GPU.

Its arrays and band geometry are checked by replaying the kernel's arithmetic in numpy (staged planes built
from the input by definition, each nonzero's packed offset applied to every band position) against the float64
reference; every setting compiles to a device kernel with nvcc. The GPU run is in scripts/gpu_check.py.
"""
from __future__ import annotations

import re

import numpy as np
import pytest
import tvm

from escort_tvm import ConvSpec, Epilogue, SparseConvWeight
from escort_tvm.compute import conv2d_reference
from schedules import CUDAKnobs, SparseConvCUDA
from schedules.cuda_staged import StagedGeometry, longest_run, staged_arrays, staged_run_ptr
from _helpers import GLOBAL_FN, cuda_source, func_name, pruned, randn

STAGED = CUDAKnobs(threads_x=32, threads_y=2, pixels_per_thread=2, channels_per_block=4, channel_slots=2,
                   stage_input=True, stage_channels=4, unroll=8)
CASES = {
    "3x3_pad1": (ConvSpec(N=1, C=6, H=10, W=11, K=8, KH=3, KW=3, pad=(1, 1, 1, 1)), 0.8, STAGED),
    "5x5_pad2_ragged_rounds": (ConvSpec(N=1, C=7, H=12, W=13, K=5, KH=5, KW=5, pad=(2, 2, 2, 2)), 0.9, STAGED),
    "asym_pad": (ConvSpec(N=1, C=4, H=8, W=9, K=6, KH=3, KW=3, pad=(0, 2, 3, 1)), 0.8, STAGED),
    "dilation_2x3": (ConvSpec(N=1, C=4, H=14, W=15, K=4, KH=5, KW=3, pad=(4, 2, 3, 1), dilation=(2, 3)), 0.8, STAGED),
    "grouped": (ConvSpec(N=1, C=6, H=9, W=10, K=9, KH=3, KW=3, pad=(1, 1, 1, 1), groups=3), 0.7, STAGED),
    "batch3_1x1": (ConvSpec(N=3, C=8, H=7, W=9, K=12, KH=1, KW=1), 0.5, STAGED.with_(stage_channels=8)),
    # several bands, a ragged last one, and more positions per slot than a band uses
    "bands": (ConvSpec(N=2, C=16, H=23, W=20, K=6, KH=3, KW=3, pad=(1, 1, 1, 1)), 0.85,
              STAGED.with_(threads_y=1, channels_per_block=2, pixels_per_thread=4)),
    "no_pad": (ConvSpec(N=1, C=5, H=9, W=12, K=7, KH=3, KW=3), 0.6, STAGED),
    # each channel's nonzeros shared by 4 slices (partial sums through shared memory), a ragged channel group
    "split4": (ConvSpec(N=1, C=12, H=13, W=13, K=6, KH=3, KW=3, pad=(1, 1, 1, 1)), 0.7,
               STAGED.with_(nonzero_split=4, channel_slots=4, threads_y=1, stage_channels=8)),
    "all_zero": (ConvSpec(N=1, C=8, H=6, W=6, K=4, KH=3, KW=3, pad=(1, 1, 1, 1)), 1.0, STAGED),
    # 8 slices' partial sums (8 channels x 8 pixels x 32 threads each) outgrow two rounds of 4 small planes
    "split8_partials": (ConvSpec(N=1, C=9, H=8, W=8, K=16, KH=3, KW=3, pad=(1, 1, 1, 1)), 0.6,
                        STAGED.with_(threads_y=1, pixels_per_thread=8, channels_per_block=8, channel_slots=1,
                                     nonzero_split=8, stage_channels=4)),
}


def replay(spec: ConvSpec, geo: StagedGeometry, run_ptr, pairs, x, bias, knobs) -> np.ndarray:
    """What the staged kernel computes, block by block and round by round, in float64."""
    N, K, OH, OW = spec.output_shape
    KB = knobs.channels_per_block
    pt, pl = spec.pad[0], spec.pad[1]
    off = (pairs & 0xFFFFFFFF).astype(np.int64)
    val = (pairs >> 32).astype(np.uint32).view(np.float32).astype(np.float64)
    y = np.full(spec.output_shape, np.nan)
    q = np.arange(geo.NTP * geo.P)
    rows, cols = q // geo.SP, q % geo.SP
    for n in range(N):
        for band in range(geo.BANDS):
            acc = np.repeat(bias[:, None].astype(np.float64), q.size, axis=1)
            for r in range(geo.ROUNDS):
                s = np.zeros(geo.SIZE)  # (the kernel leaves the tail past CC planes unwritten: junk positions only)
                for cl in range(geo.CC):
                    c = r * geo.CC + cl
                    for rr in range(geo.ROWS):
                        ih = band * geo.TH - pt + rr
                        for cc in range(geo.SP):
                            iw = cc - pl
                            if c < spec.C and 0 <= ih < spec.H and 0 <= iw < spec.W:
                                s[cl * geo.PLANE + rr * geo.SP + cc] = x[n, c, ih, iw]
                for k in range(K):
                    at = ((k // KB) * geo.ROUNDS + r) * KB + k % KB
                    for j in range(run_ptr[at], run_ptr[at + 1]):
                        acc[k] += val[j] * s[off[j] + q]
            keep = (cols < OW) & (rows < geo.TH) & (band * geo.TH + rows < OH)
            y[n, :, band * geo.TH + rows[keep], cols[keep]] = acc[:, keep].T
    return y


@pytest.mark.parametrize("case", list(CASES))
def test_staged_arrays_replay_the_reference(rng, case):
    spec, sparsity, knobs = CASES[case]
    w = pruned(rng, spec.weight_shape, min(sparsity, 1.0))
    if sparsity >= 1.0:
        w[:] = 0
    weight = SparseConvWeight.from_dense(w, spec.groups)
    x, bias = randn(rng, spec.input_shape), randn(rng, (spec.K,), 0.5)
    geo = StagedGeometry(spec, knobs)
    KB = knobs.channels_per_block
    run_ptr, pairs = staged_arrays(weight, spec, geo)
    KG = -(-spec.K // KB)
    assert run_ptr.dtype == np.int32 and pairs.dtype == np.int64 and run_ptr.size == KG * geo.ROUNDS * KB + 1
    assert run_ptr[-1] == weight.nnz and np.all(np.diff(run_ptr) >= 0)
    assert np.array_equal(staged_run_ptr(weight, geo), run_ptr)  # what the rule sizes shared memory from
    runs = np.diff(run_ptr[::KB].astype(np.int64))
    assert longest_run(run_ptr, geo) == max(1, runs.max())
    got = replay(spec, geo, run_ptr, pairs, x, bias, knobs)
    ref = conv2d_reference(x, w, spec, bias)
    assert not np.isnan(got).any(), "an output position no band covers"
    assert np.linalg.norm(got - ref) <= 1e-6 * max(np.linalg.norm(ref), 1.0)


def test_staged_form_refuses_what_it_cannot_take(rng):
    spec = ConvSpec(N=1, C=8, H=15, W=16, K=8, KH=3, KW=3, stride=(2, 2), pad=(1, 1, 1, 1))
    weight = SparseConvWeight.from_dense(pruned(rng, spec.weight_shape, 0.8))
    with pytest.raises(ValueError, match="stride 1"):
        SparseConvCUDA().apply(spec, weight, Epilogue(), STAGED)
    wide = ConvSpec(N=1, C=64, H=60, W=200, K=8, KH=3, KW=3, pad=(1, 1, 1, 1))
    with pytest.raises(ValueError, match="shared memory|less than one padded row"):
        StagedGeometry(wide, STAGED.with_(stage_channels=32))
    for bad in (dict(nonzero_split=8, threads_y=4), dict(images_per_thread=2), dict(threads_x=16, threads_y=1),
                dict(channel_slots=8, channels_per_block=4)):
        with pytest.raises(ValueError, match="stage_input"):
            STAGED.with_(**bad).validate()


def test_partial_sums_size_the_buffer_where_they_outgrow_the_rounds(rng):
    spec, sparsity, knobs = CASES["split8_partials"]
    geo = StagedGeometry(spec, knobs)
    run_ptr, _ = staged_arrays(SparseConvWeight.from_dense(pruned(rng, spec.weight_shape, sparsity)), spec, geo)
    run = longest_run(run_ptr, geo)
    assert geo.PARTIALS == 7 * 8 * 8 * 32 > 2 * geo.S4 + 4 * run + geo.BOUNDS
    assert geo.words(run) == geo.PARTIALS


@pytest.mark.parametrize("case", ["3x3_pad1", "dilation_2x3", "batch3_1x1", "bands", "split4", "split8_partials"])
def test_staged_kernel_compiles_to_a_device_kernel(cuda_target, rng, case):
    spec, sparsity, knobs = CASES[case]
    weight = SparseConvWeight.from_dense(pruned(rng, spec.weight_shape, sparsity), spec.groups)
    plan = SparseConvCUDA().apply(spec, weight, Epilogue(relu=True, residual=case == "bands"), knobs)
    assert not plan.needs_pad_op and plan.knobs.stage_input
    with cuda_target:
        lib = tvm.compile(plan.func, target=cuda_target)
    src = cuda_source(lib)
    assert f"{func_name(plan.func)}_kernel" in re.findall(GLOBAL_FN, src)
    assert "__shared__" in src and "__syncthreads" in src
