"""The specialised kernel (weights compiled into the code) on llvm, and the per-conv kernel choice.

The CPU rule walks the same unrolled program as the CUDA rule (schedules/unrolled.py), so these
numeric checks cover its grouping, taps and epilogue on CPU-only CI; the CUDA rendering is compiled
in tests/test_specialized_cuda.py and run on the GPU by scripts/gpu_check.py.
"""
from __future__ import annotations

import re

import numpy as np
import pytest
import tvm

import escort_tvm
from escort_tvm import ConvSpec, Epilogue, SparseConvWeight, conv2d_reference
from relay_passes.kernel_choice import KernelChooser
from schedules import SparseConvCPU, SpecializedCPU, SpecializedCPUKnobs, SpecializedCUDA, rules_for
from schedules import cuda_specialized
from schedules.unrolled import program_stats, unrolled_program
from _helpers import assert_close, case_params, conv_data, knob_cover, onnx_model, ort_reference, pruned, randn


def run_specialized(spec, w, b, x, epilogue=Epilogue(), residual=None, knobs=None):
    plan = SpecializedCPU().apply(spec, SparseConvWeight.from_dense(w, spec.groups), epilogue, knobs)
    assert plan.weight_arrays == () and plan.rule == "cpu.specialized"
    lib = tvm.compile(tvm.IRModule({"k": plan.func.with_attr("global_symbol", "k")}), target="llvm")
    dev = tvm.cpu()
    y = tvm.runtime.tensor(np.full(spec.output_shape, np.nan, np.float32), dev)  # poisoned
    args = [plan.prepare_input(x), b] + ([residual] if residual is not None else [])
    lib["k"](*[tvm.runtime.tensor(a, dev) for a in args], y)
    return y.numpy()


# long_rows (C=64 at 30% sparsity, ~3k nonzeros) exists for the CSR kernel's chunking; unrolled, its LLVM
# compile takes minutes on CI, and its paths are covered by the smaller cases.
@pytest.mark.parametrize("spec,sparsity", [p for p in case_params() if p.id != "long_rows"])
def test_every_conv_case(rng, spec, sparsity):
    x, w, b = conv_data(rng, spec, sparsity)
    assert_close(run_specialized(spec, w, b, x), conv2d_reference(x, w, spec, b))


@pytest.mark.parametrize("sparsity", [0.5, 0.9, 0.99])
@pytest.mark.parametrize("relu,residual", [(False, False), (True, False), (True, True)])
def test_sparsities_and_epilogues(rng, sparsity, relu, residual):
    spec = ConvSpec(N=2, C=16, H=9, W=10, K=12, KH=3, KW=3, pad=(1, 1, 1, 1))
    x, w, b = conv_data(rng, spec, sparsity)
    w[3] = 0  # an all-zero output channel: bias (+ residual) only
    r = randn(rng, spec.output_shape) if residual else None
    ref = conv2d_reference(x, w, spec, b)
    ref = np.maximum(ref + (r if residual else 0), 0) if relu else ref + (r if residual else 0)
    assert_close(run_specialized(spec, w, b, x, Epilogue(relu=relu, residual=residual), r), ref)


@pytest.mark.parametrize("what", ["all_zero", "single_nonzero"])
def test_all_zero_and_single_nonzero(rng, what):
    spec = ConvSpec(N=1, C=5, H=8, W=9, K=6, KH=3, KW=3, pad=(1, 1, 1, 1))
    x, b = randn(rng, spec.input_shape), randn(rng, (spec.K,))
    w = np.zeros(spec.weight_shape, np.float32)
    if what == "single_nonzero":
        w[4, 2, 0, 2] = 1.75
    assert_close(run_specialized(spec, w, b, x), conv2d_reference(x, w, spec, b))


@pytest.mark.parametrize("knobs", knob_cover(SpecializedCPUKnobs), ids=str)
def test_every_knob_value(rng, knobs):
    spec = ConvSpec(N=2, C=8, H=7, W=19, K=10, KH=3, KW=3, pad=(1, 1, 1, 1))  # K not a multiple of the group
    x, w, b = conv_data(rng, spec, 0.8)
    assert_close(run_specialized(spec, w, b, x, knobs=knobs), conv2d_reference(x, w, spec, b))


def test_program_merges_taps_across_a_group():
    w = np.zeros((4, 2, 1, 1), np.float32)
    w[0, 1], w[2, 1], w[3, 0] = 1.0, 2.0, 3.0
    (g,) = unrolled_program(SparseConvWeight.from_dense(w), 4)
    assert [(t.c, t.fmas) for t in g.taps] == [(0, ((3, 3.0),)), (1, ((0, 1.0), (2, 2.0)))]  # one load feeds 2 FMAs
    assert program_stats([g]) == {"groups": 1, "taps": 2, "fmas": 3, "fmas_per_load": 1.5}


def test_groups_do_not_straddle_conv_groups():
    w = np.ones((6, 2, 1, 1), np.float32)
    groups = unrolled_program(SparseConvWeight.from_dense(w, groups=2), 4)
    assert [(g.first, g.size) for g in groups] == [(0, 3), (3, 3)]
    assert {t.c for t in groups[1].taps} == {2, 3}  # conv group 1 reads input channels 2..3


# --------------------------------------------------------------------------- the choice of kernel
def _conv_onnx(rng, w, x_shape, pads=(1, 1, 1, 1)):
    from onnx import helper

    out = [x_shape[0], w.shape[0], x_shape[2] + pads[0] + pads[2] - w.shape[2] + 1,
           x_shape[3] + pads[1] + pads[3] - w.shape[3] + 1]
    return onnx_model([helper.make_node("Conv", ["x", "w"], ["y"], pads=list(pads))], [("x", list(x_shape))],
                      [("y", out)], {"w": w})


def test_build_kernel_specialized_on_llvm_matches_onnxruntime(rng):
    w = pruned(rng, (8, 6, 3, 3), 0.85)
    model = _conv_onnx(rng, w, (2, 6, 9, 10))
    mod, params = escort_tvm.from_onnx(model)
    built = escort_tvm.build(mod, params, "llvm", kernel="specialized")
    (r,) = built.report
    assert r.kernel == "specialized" and r.schedule.startswith("cpu.specialized"), built.report_text()
    x = randn(rng, (2, 6, 9, 10))
    assert_close(built(x), ort_reference(model, {"x": x}))
    auto = escort_tvm.build(mod, params, "llvm")  # CPU auto keeps the CSR kernel until measured
    assert auto.report[0].kernel == "sparse"


def test_forced_specialized_falls_back_to_csr_with_reason(rng, monkeypatch):
    monkeypatch.setattr(cuda_specialized, "MAX_NONZEROS", 10)
    monkeypatch.setattr("schedules.cpu_specialized.MAX_NONZEROS", 10)
    w = pruned(rng, (8, 6, 3, 3), 0.5)
    mod, params = escort_tvm.from_onnx(_conv_onnx(rng, w, (1, 6, 9, 10)))
    built = escort_tvm.build(mod, params, "llvm", kernel="specialized", min_sparsity=0.5)
    (r,) = built.report
    assert r.kernel == "sparse" and any("exceed the specialised kernel's limit of 10" in n for n in r.notes), r.line()


def test_forced_dense_and_bad_kernel(rng):
    w = pruned(rng, (8, 6, 3, 3), 0.9)
    mod, params = escort_tvm.from_onnx(_conv_onnx(rng, w, (1, 6, 9, 10)))
    built = escort_tvm.build(mod, params, "llvm", kernel="dense")
    assert built.report[0].kernel == "dense" and "kernel='dense'" in built.report[0].reason
    with pytest.raises(ValueError, match="kernel must be one of"):
        escort_tvm.build(mod, params, "llvm", kernel="fast")
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match="specialized_budget must be a non-negative integer"):
            escort_tvm.build(mod, params, "llvm", specialized_budget=bad)


def test_auto_on_cuda_spends_the_specialized_budget_then_uses_csr(rng):
    spec = ConvSpec(N=1, C=16, H=8, W=8, K=16, KH=3, KW=3, pad=(1, 1, 1, 1))
    weight = SparseConvWeight.from_dense(pruned(rng, spec.weight_shape, 0.9))
    chooser = KernelChooser(rules_for(tvm.target.Target({"kind": "cuda", "arch": "sm_90"})),
                            specialized_budget=weight.nnz + 1)
    first, notes1 = chooser.plan(spec, weight, Epilogue())
    second, notes2 = chooser.plan(spec, weight, Epilogue())
    assert first.rule == SpecializedCUDA.name and notes1 == []
    assert second.rule == "cuda.register_tiled" and "budget" in notes2[0]
    forced = KernelChooser(rules_for(tvm.target.Target({"kind": "cuda", "arch": "sm_90"})), kernel="specialized",
                           specialized_budget=0)
    plan, notes = forced.plan(spec, weight, Epilogue())
    assert plan.rule == "cuda.register_tiled" and "budget (0 nonzeros left)" in notes[0]


def test_auto_follows_the_tuning_log(rng, tmp_path):
    from escort_tvm.tuning_log import TuningLog

    w = pruned(rng, (8, 6, 3, 3), 0.9)
    model = _conv_onnx(rng, w, (1, 6, 9, 10))
    mod, params = escort_tvm.from_onnx(model)
    spec = ConvSpec(N=1, C=6, H=9, W=10, K=8, KH=3, KW=3, pad=(1, 1, 1, 1))
    log = tmp_path / "t.jsonl"
    TuningLog.append(log, [TuningLog.record(spec, 0.9, "cpu.specialized", {"channels_per_thread": 2, "vector_width": 4}, 0.01),
                           TuningLog.record(spec, 0.9, "cpu.row_vector", {"vector_width": 8}, 0.02)])
    built = escort_tvm.build(mod, params, "llvm", tuning_log=log)
    (r,) = built.report
    assert r.kernel == "specialized" and "'channels_per_thread': 2" in r.schedule and "tuning log" in r.notes[0]
    x = randn(rng, (1, 6, 9, 10))
    assert_close(built(x), ort_reference(model, {"x": x}))


def test_auto_cost_rule_keeps_large_layers_on_csr_at_small_batch(rng):
    from schedules.cuda_specialized import ALL_LAYERS_BATCH, LARGE_BATCH, SMALL_BATCH_MAX_NONZEROS

    target = tvm.target.Target({"kind": "cuda", "arch": "sm_90"})
    w = pruned(rng, (128, 128, 3, 3), 0.7)
    weight = SparseConvWeight.from_dense(w)
    assert weight.nnz > SMALL_BATCH_MAX_NONZEROS
    small = ConvSpec(N=1, C=128, H=4, W=4, K=128, KH=3, KW=3, pad=(1, 1, 1, 1))
    plan, notes = KernelChooser(rules_for(target)).plan(small, weight, Epilogue())
    assert plan.rule == "cuda.register_tiled" and "cost rule" in notes[0]
    forced, _ = KernelChooser(rules_for(target), kernel="specialized").plan(small, weight, Epilogue())
    assert forced.rule == SpecializedCUDA.name  # the rule only steers "auto"
    for batch in (ALL_LAYERS_BATCH, LARGE_BATCH):  # every layer from batch 4 on (docs/bench/b4, b8)
        large = ConvSpec(N=batch, C=128, H=4, W=4, K=128, KH=3, KW=3, pad=(1, 1, 1, 1))
        plan, notes = KernelChooser(rules_for(target)).plan(large, weight, Epilogue())
        assert plan.rule == SpecializedCUDA.name and notes == []
    below = ConvSpec(N=ALL_LAYERS_BATCH - 1, C=128, H=4, W=4, K=128, KH=3, KW=3, pad=(1, 1, 1, 1))
    plan, notes = KernelChooser(rules_for(target)).plan(below, weight, Epilogue())
    assert plan.rule == "cuda.register_tiled" and "cost rule" in notes[0]


def test_auto_cost_rule_takes_large_images_specialised_at_small_batch(rng):
    from schedules.cuda_specialized import LARGE_IMAGE, SMALL_BATCH_MAX_NONZEROS

    pays = SpecializedCUDA().pays
    weight = SparseConvWeight.from_dense(pruned(rng, (128, 128, 3, 3), 0.5))
    assert weight.nnz > SMALL_BATCH_MAX_NONZEROS
    side = int(LARGE_IMAGE ** 0.5)
    big = ConvSpec(N=1, C=128, H=2 * side, W=2 * side, K=128, KH=3, KW=3, stride=(2, 2), pad=(1, 1, 1, 1))
    small = ConvSpec(N=1, C=128, H=side - 1, W=side - 1, K=128, KH=3, KW=3, stride=(2, 2), pad=(1, 1, 1, 1))
    assert (big.OH, small.OH) == (side, side // 2)
    assert pays(big, weight) is None
    assert "runs faster on the CSR kernel" in pays(small, weight)
    # stride 1 on 13x13-28x28 outputs at batch 1: the CSR kernel's staged-input form (cuda.py, STAGED_PIXELS)
    pruned90 = SparseConvWeight.from_dense(pruned(rng, (128, 128, 3, 3), 0.9))
    for hw in (13, side):
        staged = ConvSpec(N=1, C=128, H=hw, W=hw, K=128, KH=3, KW=3, pad=(1, 1, 1, 1))
        assert "staged-input form" in pays(staged, pruned90)
    assert pays(ConvSpec(N=1, C=128, H=56, W=56, K=128, KH=3, KW=3, pad=(1, 1, 1, 1)), weight) is None


def test_auto_keeps_a_large_output_layer_dense_below_the_csr_crossover(rng):
    from schedules.cuda import LARGE_BATCH, LARGE_OUTPUT_PIXELS, MIN_SPARSITY_LARGE_OUTPUT

    target = tvm.target.Target({"kind": "cuda", "arch": "sm_90"})
    side = int(LARGE_OUTPUT_PIXELS ** 0.5)
    spec = ConvSpec(N=LARGE_BATCH, C=8, H=side, W=side, K=8, KH=3, KW=3, pad=(1, 1, 1, 1))
    below = SparseConvWeight.from_dense(pruned(rng, spec.weight_shape, 0.75))
    above = SparseConvWeight.from_dense(pruned(rng, spec.weight_shape, 0.9))
    assert below.sparsity < MIN_SPARSITY_LARGE_OUTPUT <= above.sparsity
    no_spec = dict(specialized_budget=0)  # the specialised kernel out of the way, as when the budget is spent
    plan, notes = KernelChooser(rules_for(target), **no_spec).plan(spec, below, Epilogue())
    assert plan is None and "budget" in notes[0] and "needs sparsity >= 0.85" in notes[1]
    plan, _ = KernelChooser(rules_for(target), **no_spec).plan(spec, above, Epilogue())
    assert plan.rule == "cuda.register_tiled"
    small_batch = ConvSpec(N=1, C=8, H=side, W=side, K=8, KH=3, KW=3, pad=(1, 1, 1, 1))
    plan, _ = KernelChooser(rules_for(target), **no_spec).plan(small_batch, below, Epilogue())
    assert plan.rule == "cuda.register_tiled"  # no batch-1 sweep: the rule does not apply there
    forced, _ = KernelChooser(rules_for(target), kernel="sparse").plan(spec, below, Epilogue())
    assert forced.rule == "cuda.register_tiled"  # the rule only steers "auto"


def test_cuda_build_passes_the_work_counters_of_an_sm_affine_conv(rng):
    """At batch >= 16 a small-image layer defaults to the row layout with sm_affine; the graph pass hands its
    kernel the zeroed int32 counters and the float32 zero page as constants, and the whole model compiles for
    the GPU."""
    from onnx import helper

    from _helpers import GLOBAL_FN, cuda_source

    w = pruned(rng, (96, 16, 3, 3), 0.9)  # over 64 output channels: the row layout (64 or fewer stay on tiles)
    model = onnx_model([helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])],
                       [("x", [16, 16, 14, 14])], [("y", [16, 96, 14, 14])], {"w": w})
    mod, params = escort_tvm.from_onnx(model)
    built = escort_tvm.build(mod, params, {"kind": "cuda", "arch": "sm_90"})
    (r,) = built.report
    assert r.kernel == "specialized" and "'sm_affine': True" in r.schedule, r.schedule
    source = cuda_source(built.executable)
    assert "escort_sparse_conv0_kernel" in set(re.findall(GLOBAL_FN, source))
    assert "atomicAdd" in source and "%%smid" in source
    # the kernel takes (x, counters, bias, y): call_tir would not have built with a missing argument
    spec = ConvSpec(N=16, C=16, H=14, W=14, K=96, KH=3, KW=3, pad=(1, 1, 1, 1))
    plan = SpecializedCUDA().apply(spec, SparseConvWeight.from_dense(w), Epilogue())
    assert [p.name for p in plan.func.params] == ["x", "work", "zeros", "bias", "y"]
    counters, zero_page = plan.weight_arrays
    assert counters.dtype == np.int32 and counters.size >= 2 and not counters.any()
    assert zero_page.dtype == np.float32 and zero_page.size == 16 * 14 * 14 and not zero_page.any()
