"""Sparse direct convolution kernels on llvm vs the float64 dense reference.

Both the unscheduled TIR definition (escort_tvm.compute.sparse_conv_definition) and the CPU schedule
(schedules.SparseConvCPU) run on every conv case, with and without a fused ReLU.
"""
from __future__ import annotations

import numpy as np
import pytest
import tvm

from escort_tvm import ConvSpec, Epilogue, SparseConvWeight, conv2d_reference
from escort_tvm.compute import padded_input, sparse_conv_definition
from schedules import CPUKnobs, SparseConvCPU
from schedules.base import csr_arrays
from _helpers import assert_close, case_params, conv_data, func_name, kernel_input, pruned, randn, run_kernel


def _run_definition(spec, w, b, x, relu, target):
    sw = SparseConvWeight.from_dense(w, spec.groups)
    hp, wp = spec.Hp, spec.Wp
    arrays = csr_arrays(sw, spec, hp, wp)
    func = sparse_conv_definition(spec, sw.nnz, Epilogue(relu=relu), hp, wp)
    lib = tvm.compile(func, target=target)
    return run_kernel(lib, func_name(func), spec, padded_input(x, spec, hp, wp), arrays, b)


def _run_cpu(spec, w, b, x, relu, target, knobs=None, x_pad=None):
    sw = SparseConvWeight.from_dense(w, spec.groups)
    plan = SparseConvCPU().apply(spec, sw, Epilogue(relu=relu), knobs)
    assert plan.rule == SparseConvCPU.name
    assert plan.hp >= spec.Hp and plan.wp >= spec.Wp
    lib = tvm.compile(plan.func, target=target)
    if x_pad is None:
        xp = kernel_input(plan, x, spec)
        np.testing.assert_array_equal(xp, padded_input(x, spec, plan.hp, plan.wp))  # the CPU rule reads x_pad
    else:
        xp = x_pad(plan)
    return run_kernel(lib, func_name(plan.func), spec, xp, plan.weight_arrays, b), plan


@pytest.mark.parametrize("relu", [False, True], ids=["bias", "bias_relu"])
@pytest.mark.parametrize("spec,sparsity", case_params())
def test_definition_matches_reference(rng, llvm_target, spec, sparsity, relu):
    x, w, b = conv_data(rng, spec, sparsity)
    out = _run_definition(spec, w, b, x, relu, llvm_target)
    assert_close(out, conv2d_reference(x, w, spec, b, relu))


@pytest.mark.parametrize("relu", [False, True], ids=["bias", "bias_relu"])
@pytest.mark.parametrize("spec,sparsity", case_params())
def test_cpu_schedule_matches_reference(rng, llvm_target, spec, sparsity, relu):
    x, w, b = conv_data(rng, spec, sparsity)
    out, _ = _run_cpu(spec, w, b, x, relu, llvm_target)
    ref = conv2d_reference(x, w, spec, b, relu)
    assert_close(out, ref)
    if relu:
        assert (out >= 0).all() and (ref == 0).any() and (ref > 0).any()


SPEC_TAILS = [
    # OW = 9 and 5: a partial last vector tile for every width; stride 2 / dilation widen the pitch
    ConvSpec(N=2, C=5, H=9, W=11, K=6, KH=3, KW=3, stride=(1, 1), pad=(1, 0, 1, 0)),
    ConvSpec(N=1, C=4, H=11, W=10, K=5, KH=3, KW=5, stride=(2, 2), pad=(1, 2, 1, 2), dilation=(1, 1), groups=1),
    ConvSpec(N=1, C=6, H=10, W=21, K=6, KH=3, KW=3, stride=(1, 3), pad=(2, 2, 2, 2), dilation=(2, 2), groups=3),
]


@pytest.mark.parametrize("width", CPUKnobs.SPACE["vector_width"])
@pytest.mark.parametrize("spec", SPEC_TAILS, ids=["tail_s1", "tail_s2", "tail_s3_dil2_grouped"])
def test_cpu_every_vector_width(rng, llvm_target, spec, width):
    x, w, b = conv_data(rng, spec, 0.8)
    out, plan = _run_cpu(spec, w, b, x, True, llvm_target, CPUKnobs(vector_width=width))
    assert plan.knobs == CPUKnobs(vector_width=width)
    assert_close(out, conv2d_reference(x, w, spec, b, relu=True))


def test_cpu_knob_space_is_every_width():
    assert [k.vector_width for k in CPUKnobs.space()] == list(CPUKnobs.SPACE["vector_width"])


@pytest.mark.parametrize("width", CPUKnobs.SPACE["vector_width"])
def test_cpu_kernel_reads_nothing_of_the_pitch_padding(rng, llvm_target, width):
    """The CPU pitch may be wider than the conv's own padding (vector tail lanes). Those extra columns are
    never needed by a valid output pixel: fill them with NaN and the output must still be exact."""
    spec = ConvSpec(N=1, C=3, H=7, W=10, K=4, KH=3, KW=3, stride=(1, 2), pad=(1, 1, 1, 1))
    x, w, b = conv_data(rng, spec, 0.5)

    def poisoned(plan):
        xp = padded_input(x, spec, plan.hp, plan.wp).reshape(spec.N, spec.C, plan.hp, plan.wp)
        xp[:, :, spec.Hp:, :] = np.nan
        xp[:, :, :, spec.Wp:] = np.nan
        return xp.reshape(spec.N, -1)

    out, plan = _run_cpu(spec, w, b, x, False, llvm_target, CPUKnobs(vector_width=width), x_pad=poisoned)
    assert_close(out, conv2d_reference(x, w, spec, b))


@pytest.mark.parametrize("runner", ["definition", "cpu"])
def test_empty_output_channel_gives_bias_only(rng, llvm_target, runner):
    spec = ConvSpec(N=2, C=4, H=8, W=9, K=6, KH=3, KW=3, pad=(1, 1, 1, 1))
    x, w, b = conv_data(rng, spec, 0.6)
    w[[0, 2, 5]] = 0.0
    b[2] = -abs(b[2]) - 0.1  # with relu this empty channel must come out as exact zeros
    for relu in (False, True):
        if runner == "definition":
            out = _run_definition(spec, w, b, x, relu, llvm_target)
        else:
            out, _ = _run_cpu(spec, w, b, x, relu, llvm_target)
        ref = conv2d_reference(x, w, spec, b, relu)
        assert_close(out, ref)
        for k in (0, 2, 5):
            want = max(b[k], 0.0) if relu else b[k]
            np.testing.assert_array_equal(out[:, k], np.full(out[:, k].shape, want, np.float32))


@pytest.mark.parametrize("runner", ["definition", "cpu"])
def test_fully_zero_weight(rng, llvm_target, runner):
    spec = ConvSpec(N=1, C=3, H=6, W=7, K=5, KH=3, KW=3, pad=(1, 1, 1, 1), groups=1)
    x = randn(rng, spec.input_shape)
    w = np.zeros(spec.weight_shape, np.float32)
    b = randn(rng, (spec.K,), 0.5)
    if runner == "definition":
        out = _run_definition(spec, w, b, x, False, llvm_target)
    else:
        out, plan = _run_cpu(spec, w, b, x, False, llvm_target)
        assert plan.weight_arrays[1].shape == (1,) and plan.weight_arrays[2].shape == (1,)
    assert_close(out, conv2d_reference(x, w, spec, b))
    np.testing.assert_array_equal(out, np.broadcast_to(b.reshape(1, -1, 1, 1), out.shape))


def test_cpu_weight_arrays_are_csr_with_stretched_offsets(rng):
    spec = ConvSpec(N=1, C=4, H=6, W=7, K=6, KH=3, KW=3, stride=(1, 2), pad=(1, 1, 1, 1), dilation=(1, 2),
                    groups=2)
    w = pruned(rng, spec.weight_shape, 0.7)
    sw = SparseConvWeight.from_dense(w, spec.groups)
    plan = SparseConvCPU().apply(spec, sw, Epilogue(), CPUKnobs(vector_width=8))
    row_ptr, off, val = plan.weight_arrays
    np.testing.assert_array_equal(row_ptr, sw.row_ptr)
    np.testing.assert_array_equal(off, sw.stretched_offsets(plan.hp, plan.wp, spec.dilation))
    np.testing.assert_array_equal(val, sw.values)


def test_cpu_default_knobs_are_in_the_space(rng):
    rule = SparseConvCPU()
    for ow in (3, 7, 30):
        spec = ConvSpec(N=1, C=2, H=4, W=ow, K=3, KH=1, KW=1)
        knobs = rule.default_knobs(spec, SparseConvWeight.from_dense(pruned(rng, spec.weight_shape, 0.5)))
        knobs.validate()


def test_cpu_rejects_knob_outside_space():
    spec = ConvSpec(N=1, C=2, H=4, W=4, K=3, KH=1, KW=1)
    sw = SparseConvWeight.from_dense(np.ones(spec.weight_shape, np.float32))
    with pytest.raises(ValueError, match="vector_width"):
        SparseConvCPU().apply(spec, sw, Epilogue(), CPUKnobs(vector_width=5))
    with pytest.raises(ValueError, match="unknown knobs"):
        CPUKnobs.from_dict({"vector_width": 8, "tile": 2})
