"""The specialised CUDA kernel (schedules.SpecializedCUDA) compiled for sm_90 with nvcc, no GPU needed.

Its point is that the weights live in the instruction stream: the device code must read no index
array (only x, bias, [residual] and y are kernel parameters, and every global load is a float load),
and every nonzero weight must appear as an immediate. Every knob value of ``SpecializedKnobs.SPACE``
(one knob at a time from the default) must compile to a device kernel or be refused with the rule's
documented ValueError. Layers are tiny so each compile takes seconds.
"""
from __future__ import annotations

import re
import struct
import subprocess

import numpy as np
import pytest
import tvm

from escort_tvm import ConvSpec, Epilogue, SparseConvWeight
from escort_tvm.compute import conv2d_reference
from schedules import SpecializedCUDA, SpecializedKnobs
from schedules.cuda_specialized import MAX_NONZEROS, uses_zero_page
from _helpers import GLOBAL_FN, assert_close, cuda_source, pruned, randn

RULE = SpecializedCUDA()

# (id, spec, sparsity, epilogue, knob changes from the default)
SIGNATURE_CASES = [
    ("3x3_staged", ConvSpec(N=1, C=4, H=9, W=10, K=8, KH=3, KW=3, pad=(1, 1, 1, 1)), 0.7,
     Epilogue(relu=True), {"stage_input": True}),
    ("3x3_direct", ConvSpec(N=2, C=4, H=9, W=10, K=8, KH=3, KW=3, pad=(1, 1, 1, 1)), 0.7,
     Epilogue(), {"stage_input": False}),
    ("1x1_flat_residual", ConvSpec(N=2, C=8, H=5, W=7, K=8, KH=1, KW=1), 0.7,
     Epilogue(relu=True, residual=True), {}),
    ("5x3_s2_asym_groups2_residual", ConvSpec(N=1, C=4, H=11, W=9, K=4, KH=5, KW=3, stride=(2, 2),
                                              pad=(1, 0, 2, 1), groups=2), 0.6, Epilogue(residual=True), {}),
    ("3x3_sm_affine", ConvSpec(N=2, C=8, H=9, W=10, K=16, KH=3, KW=3, pad=(1, 1, 1, 1)), 0.7,
     Epilogue(relu=True), {"sm_affine": True}),
    ("3x3_image_tile_b16", ConvSpec(N=16, C=8, H=13, W=13, K=16, KH=3, KW=3, pad=(1, 1, 1, 1)), 0.8,
     Epilogue(relu=True), {}),
    ("1x1_span_b17", ConvSpec(N=17, C=16, H=7, W=7, K=8, KH=1, KW=1), 0.7, Epilogue(), {}),
    # the row layout of a KxK conv (unstaged, the batch's pixels as one row): padding from the zero page, or
    # (pad_input) from the graph's pad op
    ("3x3_span_b5", ConvSpec(N=5, C=16, H=7, W=7, K=16, KH=3, KW=3, pad=(1, 1, 1, 1)), 0.7,
     Epilogue(relu=True, residual=True), ("span", {})),
    ("3x3_span_pad_input_b5", ConvSpec(N=5, C=16, H=7, W=7, K=16, KH=3, KW=3, pad=(1, 1, 1, 1)), 0.7,
     Epilogue(relu=True), ("span", {"pad_input": True})),
    ("5x3_s2_span_b3", ConvSpec(N=3, C=8, H=11, W=9, K=8, KH=5, KW=3, stride=(2, 2), pad=(1, 0, 2, 1)), 0.6,
     Epilogue(), ("span", {"channels_per_thread": 4})),
    ("7x7_span_b2", ConvSpec(N=2, C=3, H=15, W=15, K=8, KH=7, KW=7, stride=(2, 2), pad=(3, 3, 3, 3)), 0.5,
     Epilogue(), ("span", {})),  # over 5x5: no zero page, the graph pads
    # 64 channels per thread split 4 ways: one round of partial sums would take 96 KB, so they go in 3 rounds
    ("1x1_cpt64_split4_rounds", ConvSpec(N=4, C=64, H=8, W=8, K=80, KH=1, KW=1), 0.9,
     Epilogue(relu=True, residual=True), {"channels_per_thread": 64, "channel_split": 4, "threads_y": 1}),
    # resnet50.l4.3x3's layout: the row layout split 4 ways in 256-thread rows, its partial sums (96 KB in one
    # round) in 3 rounds
    ("3x3_span_split4_256_rounds", ConvSpec(N=4, C=64, H=7, W=7, K=32, KH=3, KW=3, pad=(1, 1, 1, 1)), 0.9,
     Epilogue(relu=True), ("span", {"channels_per_thread": 32, "channel_split": 4, "threads_y": 2})),
    # 2 neighbouring pixels per thread in the row layout: v2 loads of the graph's padded input; and a 1x1 row with
    # 4 pixels per thread and evict-first loads
    ("3x3_span_px2_b3", ConvSpec(N=3, C=16, H=8, W=8, K=16, KH=3, KW=3, pad=(1, 1, 1, 1)), 0.7,
     Epilogue(relu=True, residual=True), ("span", {"pixels_per_thread": 2, "pad_input": True})),
    ("1x1_span_px4_evict_b3", ConvSpec(N=3, C=16, H=6, W=6, K=8, KH=1, KW=1), 0.7,
     Epilogue(relu=True), {"pixels_per_thread": 4, "evict_first": True}),
    # block_split: a whole-image block per (group, run of input chunks); partial sums through the workspace
    ("3x3_block_split_image_tile", ConvSpec(N=1, C=32, H=9, W=10, K=8, KH=3, KW=3, pad=(1, 1, 1, 1)), 0.7,
     Epilogue(relu=True, residual=True), {"image_tile": True, "block_split": 4, "channel_chunk": 4,
                                          "channels_per_thread": 4, "channel_split": 1}),
]


def _knobs(spec, weight, change):
    """The default knobs with ``change`` (a dict), or ``("span", change)``: the row layout's with it."""
    if isinstance(change, tuple):
        return RULE.span_knobs(spec, weight).with_(**change[1])
    return RULE.default_knobs(spec, weight).with_(**change)


def _ptx(source: str, tmp_path) -> str:
    cu, ptx = tmp_path / "k.cu", tmp_path / "k.ptx"
    cu.write_text(source)
    p = subprocess.run(["nvcc", "--ptx", "-O3", "-arch=sm_90", "--use_fast_math", "-o", str(ptx), str(cu)],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
    return ptx.read_text()


def _entry_params(source: str, kernel: str) -> list[str]:
    m = re.search(r"__global__\s+void\s+(?:__launch_bounds__\(\s*\d+\s*\)\s+)?" + re.escape(kernel)
                  + r"\s*\(([^)]*)\)\s*\{", source)
    assert m, f"no definition of {kernel} in the CUDA source"
    return [p.strip() for p in m.group(1).split(",")]


def _ptx_imm(v: float) -> str:
    return "0f" + struct.pack(">f", np.float32(v)).hex().upper()


@pytest.mark.parametrize("name,spec,sparsity,epilogue,change", SIGNATURE_CASES, ids=[c[0] for c in SIGNATURE_CASES])
def test_specialized_device_code_reads_no_index_array(cuda_target, rng, tmp_path, name, spec, sparsity, epilogue,
                                                      change):
    w = pruned(rng, spec.weight_shape, sparsity)
    weight = SparseConvWeight.from_dense(w, spec.groups)
    knobs = _knobs(spec, weight, change)
    plan = RULE.apply(spec, weight, epilogue, knobs)
    # sm_affine's only array: the work-queue counters, zero (they are not an index structure: see below)
    # ... and an unstaged padded conv's zero page (float32, read where a tap falls in the padding), zero too
    assert all(str(a.dtype) in ("int32", "float32") and not a.any() for a in plan.weight_arrays)
    # pad_input: x is x_pad[N, C*Hp*Wp] (the graph pass pads and reshapes), else the NCHW input
    assert plan.padded_input == knobs.pad_input and plan.needs_pad_op == knobs.pad_input
    x_shape = [int(d) for d in plan.func.params[0].ty.shape]
    assert x_shape == ([spec.N, spec.C * spec.Hp * spec.Wp] if knobs.pad_input else list(spec.input_shape))
    zero_page = uses_zero_page(spec, knobs)
    assert zero_page == (not knobs.stage_input and any(spec.pad) and not knobs.pad_input and spec.KH * spec.KW <= 25)
    split = knobs.block_split > 1
    assert len(plan.weight_arrays) == int(knobs.sm_affine) + int(zero_page) + 2 * int(split)
    want = ["x"] + (["work"] if knobs.sm_affine else []) + (["arrivals", "partials"] if split else []) + \
        (["zeros"] if zero_page else []) + ["bias"] + (["residual"] if epilogue.residual else []) + ["y"]
    assert [p.name for p in plan.func.params] == want
    sym = f"spec_{name}"
    with cuda_target:
        lib = tvm.compile(tvm.IRModule({sym: plan.func.with_attr("global_symbol", sym)}), target=cuda_target)
    source = cuda_source(lib)
    kernel = f"{sym}_kernel"
    assert kernel in re.findall(GLOBAL_FN, source)
    params = _entry_params(source, kernel)
    assert len(params) == len(want), params
    counters = ("int* __restrict__ work_ptr", "int* __restrict__ arrivals_ptr")
    floats = [p for p in params if p not in counters]
    assert len(floats) == len(want) - int(knobs.sm_affine) - int(split), params
    assert all(re.fullmatch(r"float\*\s+__restrict__\s+\w+", p) for p in floats), params
    body = re.sub(r"int\* __restrict__ (?:work|arrivals)_ptr", "", source)
    assert not re.search(r"\b(?:u?int(?:8|16|32|64)?_t|int|unsigned|long)\s*\*", body), \
        "the device code declares an integer pointer"
    # the counters are only taken (atomicAdd) and reset inside the work-queue macros, never indexed by the FMAs
    uses = [ln.strip() for ln in source.splitlines() if "work_ptr" in ln and "__global__" not in ln]
    assert all(re.match(r"escort_(?:take|finish)_\d+_\d+\(", u) for u in uses), uses
    # block_split's arrival counters: counted in (atomicAdd) and reset by the last block; its workspace: partial sums
    # stored, and read back (through L2) only by the last block's sums
    uses = [ln.strip() for ln in source.splitlines() if "arrivals_ptr" in ln and "__global__" not in ln]
    assert all(re.match(r"escort_arrive\(\(&\(arrivals_ptr\[.*\]\)\), \w+\[0\]\);$|arrivals_ptr\[.*\] = 0;$", u)
               for u in uses), uses
    assert bool(uses) == split
    uses = [ln.strip() for ln in source.splitlines() if "partials_ptr" in ln and "__global__" not in ln]
    reads = re.findall(r"escort_load_partial\(\(&\(partials_ptr\[", source)
    assert all(u.startswith("partials_ptr[") or "escort_load_partial((&(partials_ptr[" in u for u in uses), uses[:3]
    assert (len(reads) == knobs.block_split * spec.K) if split else not uses
    # the zero page is only ever the fallback address of a tap block (read where a position is in the padding)
    uses = [ln.strip() for ln in source.splitlines() if "zeros" in ln and "__global__" not in ln]
    assert all(re.match(r"escort_taps_\w+\(.*\(&\(zeros_ptr\[0\]\)\)\);$", u) for u in uses), uses[:3]
    assert bool(uses) == zero_page
    ptx = _ptx(source, tmp_path)
    entry = re.search(r"\.entry\s+" + kernel + r"\s*\((.*?)\)", ptx, re.S)
    assert entry and entry.group(1).count(".param") == len(want), entry.group(1) if entry else ptx[:2000]
    loads = set(re.findall(r"\b(ld\.global[\w.]*)\s", ptx))
    assert loads, "no global loads at all: the check below would be empty"
    assert all(op.endswith(".f32") for op in loads), f"non-float global loads: {sorted(loads)}"
    # the weights are in the code: every nonzero value is an immediate operand (possibly negated)
    missing = [float(v) for v in weight.values if _ptx_imm(v) not in ptx and _ptx_imm(-v) not in ptx]
    assert not missing, f"{len(missing)} of {weight.nnz} nonzero weights are not immediates in the PTX: {missing[:5]}"


# ---------------------------------------------------------------- the knob space, one knob at a time
KNOB_CASES = [
    ("3x3", ConvSpec(N=1, C=4, H=9, W=10, K=8, KH=3, KW=3, pad=(1, 1, 1, 1)), 0.7),
    ("1x1_flat", ConvSpec(N=2, C=8, H=5, W=7, K=8, KH=1, KW=1), 0.7),
    ("5x3_s2_asym_groups2", ConvSpec(N=1, C=4, H=11, W=9, K=4, KH=5, KW=3, stride=(2, 2), pad=(1, 0, 2, 1),
                                     groups=2), 0.6),
    ("3x3_deep", ConvSpec(N=1, C=64, H=6, W=6, K=8, KH=3, KW=3, pad=(1, 1, 1, 1)), 0.95),  # 8 chunks: input_parts
    # from the row layout (span_knobs) rather than the default: its knob values (pad_input) and their changes
    ("3x3_span", ConvSpec(N=3, C=16, H=7, W=7, K=8, KH=3, KW=3, pad=(1, 1, 1, 1)), 0.7),
    # a 1x1 row of an even length: pixels_per_thread and evict_first are one-knob changes of its default
    ("1x1_flat_even", ConvSpec(N=2, C=8, H=6, W=6, K=8, KH=1, KW=1), 0.7),
]
REFUSALS = ("threads_x*threads_y", "shared memory",
            "rows_per_thread > 1 needs stage_input", "rows_per_thread > 1 does not apply",
            "tiles_per_block > 1 needs stage_input", "tiles_per_block > 1 needs channel_split",
            "channel chunks of a conv group", "span_images needs", "image_tile needs",
            "image_tile does not apply", "threads per block (channel_split and images_per_block included",
            "pad_input needs stage_input", "pad_input applies only", "span_images and image_tile",
            "span_images on a padded conv needs pad_input", "pixels_per_thread > 1 needs span_images",
            "must divide the row", "on a padded conv needs pad_input", "needs stride 1",
            "evict_first marks the PTX tap loads")


def _one_knob_changes(default: SpecializedKnobs):
    for field, values in SpecializedKnobs.SPACE.items():
        for v in values:
            if v != getattr(default, field):
                yield field, v, default.with_(**{field: v})


@pytest.fixture(scope="module")
def knob_results(cuda_target):
    """Per KNOB_CASES case, one module with every one-knob change of the default that the rule accepts."""
    out = {}
    rng = np.random.default_rng(7)
    for name, spec, sparsity in KNOB_CASES:
        weight = SparseConvWeight.from_dense(pruned(rng, spec.weight_shape, sparsity), spec.groups)
        default = RULE.span_knobs(spec, weight) if name.endswith("_span") else RULE.default_knobs(spec, weight)
        funcs, compiled, refused = {}, [], []
        for i, (field, v, knobs) in enumerate([("default", None, default), *_one_knob_changes(default)]):
            try:
                plan = RULE.apply(spec, weight, Epilogue(relu=bool(i % 2)), knobs)
            except ValueError as e:
                refused.append((field, v, str(e)))
                continue
            sym = f"knob_{name}_{i}"
            funcs[sym] = plan.func.with_attr("global_symbol", sym)
            compiled.append((field, v, sym))
        with cuda_target:
            lib = tvm.compile(tvm.IRModule(funcs), target=cuda_target)
        out[name] = (default, compiled, refused, set(re.findall(GLOBAL_FN, cuda_source(lib))))
    return out


def test_every_knob_value_compiles_to_a_device_kernel(knob_results):
    covered = set()
    for name, (default, compiled, refused, kernels) in knob_results.items():
        assert compiled[0][0] == "default", f"{name}: the default knobs were refused: {refused}"
        not_device = [(f, v) for f, v, sym in compiled if f"{sym}_kernel" not in kernels]
        assert not not_device, f"{name}: compiled for the host, not the GPU: {not_device}"
        for f, v, why in refused:
            assert any(r in why for r in REFUSALS), f"{name}: {f}={v} refused for another reason: {why}"
        covered |= {(f, getattr(default, f)) for f in SpecializedKnobs.SPACE}
        covered |= {(f, v) for f, v, _ in compiled if f != "default"}
    never = [(f, v) for f, vals in SpecializedKnobs.SPACE.items() for v in vals if (f, v) not in covered]
    assert not never, f"knob values no case compiled: {never}"


def test_specialized_refuses_too_many_nonzeros():
    spec = ConvSpec(N=1, C=256, H=2, W=2, K=256, KH=3, KW=3, pad=(1, 1, 1, 1))
    w = np.ones(spec.weight_shape, np.float32)
    assert w.size > MAX_NONZEROS
    with pytest.raises(ValueError, match="nonzeros exceed"):
        RULE.apply(spec, SparseConvWeight.from_dense(w), Epilogue())


def test_specialized_refuses_staged_tile_over_shared_memory(rng):
    spec = ConvSpec(N=1, C=32, H=64, W=600, K=8, KH=11, KW=11, stride=(4, 4), pad=(2, 2, 2, 2))
    weight = SparseConvWeight.from_dense(pruned(rng, spec.weight_shape, 0.99))
    knobs = SpecializedKnobs(channels_per_thread=8, threads_x=128, threads_y=8, stage_input=True, channel_chunk=32)
    with pytest.raises(ValueError, match="shared memory"):
        RULE.apply(spec, weight, Epilogue(), knobs)


@pytest.mark.gpu
@pytest.mark.parametrize("name,spec,sparsity,epilogue,change", SIGNATURE_CASES, ids=[c[0] for c in SIGNATURE_CASES])
def test_specialized_matches_reference_on_gpu(cuda_target, rng, name, spec, sparsity, epilogue, change):
    w = pruned(rng, spec.weight_shape, sparsity)
    weight = SparseConvWeight.from_dense(w, spec.groups)
    knobs = _knobs(spec, weight, change)
    plan = RULE.apply(spec, weight, epilogue, knobs)
    with cuda_target:
        lib = tvm.compile(tvm.IRModule({"k": plan.func.with_attr("global_symbol", "k")}), target=cuda_target)
    dev = tvm.cuda(0)
    x, b = randn(rng, spec.input_shape), randn(rng, (spec.K,), 0.5)
    res = randn(rng, spec.output_shape) if epilogue.residual else None
    args = [plan.prepare_input(x), b] + ([res] if epilogue.residual else []) + [np.full(spec.output_shape, np.nan,
                                                                                         np.float32)]
    targs = [tvm.runtime.tensor(a, dev) for a in args]
    lib["k"](*targs)
    dev.sync()
    assert_close(targs[-1].numpy(), conv2d_reference(x, w, spec, b, epilogue.relu, res))


def test_split_partial_sums_go_in_rounds_only_where_one_round_does_not_fit(cuda_target, rng):
    """A 4-way split keeps KS-1 shares of partial sums per accumulator in one round (one barrier), and only where
    that exceeds 48 KB one share reused over KS-1 rounds: 64 channels per thread (96 KB), or sm_affine's int beside
    32 channels (48 KB + 4 bytes; resnet50.l4.3x3's row layout)."""
    from schedules.cuda_specialized import SHARED_LIMIT, partial_floats, reduces_in_rounds, shared_floats

    spec = ConvSpec(N=32, C=512, H=7, W=7, K=512, KH=3, KW=3, pad=(1, 1, 1, 1))
    row = RULE.span_knobs(spec, SparseConvWeight.from_dense(pruned(rng, spec.weight_shape, 0.9)))
    assert (row.channels_per_thread, row.channel_split, row.threads_x) == (32, 4, 128)
    assert not reduces_in_rounds(spec, row) and shared_floats(spec, row) * 4 == SHARED_LIMIT
    for k in (row.with_(sm_affine=True), row.with_(channels_per_thread=64)):
        assert reduces_in_rounds(spec, k) and shared_floats(spec, k) * 4 <= SHARED_LIMIT
        assert partial_floats(spec, k, rounds=True) * 3 == partial_floats(spec, k, rounds=False)
    assert not reduces_in_rounds(spec, row.with_(channels_per_thread=64, channel_split=2))
    # the rounds are in the kernel: two barriers each, against one for the single round
    small = ConvSpec(N=4, C=64, H=8, W=8, K=80, KH=1, KW=1)
    weight = SparseConvWeight.from_dense(pruned(rng, small.weight_shape, 0.9))
    syncs = {}
    for cpt in (32, 64):
        knobs = RULE.default_knobs(small, weight).with_(channels_per_thread=cpt, channel_split=4, threads_y=1)
        assert reduces_in_rounds(small, knobs) == (cpt == 64)
        func = RULE.apply(small, weight, Epilogue(), knobs).func
        with cuda_target:
            lib = tvm.compile(tvm.IRModule({"k": func.with_attr("global_symbol", "k")}), target=cuda_target)
        syncs[cpt] = cuda_source(lib).count("__syncthreads()")
    assert (syncs[32], syncs[64]) == (1, 6)  # one launch, unstaged: one barrier for one round, 3 rounds x 2


def test_kernel_parts_cut_by_nonzeros_but_keep_enough_groups():
    from schedules.cuda_specialized import kernel_parts
    from schedules.unrolled import ChannelGroup, Tap

    groups = [ChannelGroup(i, 1, tuple(Tap(c, 0, 0, ((0, 1.0),)) for c in range(10))) for i in range(10)]
    assert kernel_parts(groups, 25) == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    assert kernel_parts(groups, 25, min_groups=3) == [[0, 1, 2], [3, 4, 5], [6, 7, 8, 9]]
    assert kernel_parts(groups, 1000, min_groups=3) == [list(range(10))]
    assert kernel_parts(groups, 5) == [[i] for i in range(10)]  # a group is never cut


def test_kernel_parts_stop_growing_for_compile_time():
    from schedules.cuda_specialized import PART_GROWTH, kernel_parts
    from schedules.unrolled import ChannelGroup, Tap

    per_part = PART_GROWTH * 2  # groups of 10 nonzeros, limit 20
    groups = [ChannelGroup(i, 1, tuple(Tap(c, 0, 0, ((0, 1.0),)) for c in range(10))) for i in range(3 * per_part + 1)]
    parts = kernel_parts(groups, 20, min_groups=10**6)  # the groups could never fill the GPU
    assert [len(p) for p in parts] == [per_part] * 3 + [1]  # the short tail cannot join a full part


def test_defaults_keep_threads_busy_at_large_batch(rng):
    """Batch >= 16: outputs up to 14x14 (up to 5x5 kernels) and 112x112 (3x3) take the row layout (every thread a
    pixel of the batch, padding from the zero page, sm_affine where groups and their items are few and its int
    fits beside one round of partial sums, 256-thread rows where the split is 4 ways), unless 64 output channels or fewer make the conv one group on tiles; a
    27x27 5x5 conv and a 224x224 3x3 one stay on tiles; a 7x7 1x1 conv runs one flat row over the batch; batch 1
    keeps the 2-D tiles it was measured with."""
    from schedules.cuda_specialized import _Geometry, reduces_in_rounds

    def default(spec):
        return RULE.default_knobs(spec, SparseConvWeight.from_dense(pruned(rng, spec.weight_shape, 0.9)))

    for spec, affine in ((ConvSpec(N=32, C=192, H=13, W=13, K=384, KH=3, KW=3, pad=(1, 1, 1, 1)), True),  # conv3
                         (ConvSpec(N=32, C=512, H=7, W=7, K=512, KH=3, KW=3, pad=(1, 1, 1, 1)), False),  # l4.3x3
                         (ConvSpec(N=32, C=512, H=14, W=14, K=512, KH=3, KW=3, pad=(1, 1, 1, 1)), True),  # conv5_2
                         (ConvSpec(N=32, C=256, H=14, W=14, K=256, KH=3, KW=3, pad=(1, 1, 1, 1)), True),  # l3.3x3
                         (ConvSpec(N=32, C=512, H=28, W=28, K=512, KH=3, KW=3, pad=(1, 1, 1, 1)), True),  # conv4_2
                         (ConvSpec(N=32, C=128, H=28, W=28, K=128, KH=3, KW=3, pad=(1, 1, 1, 1)), True),  # l2.3x3
                         (ConvSpec(N=32, C=256, H=56, W=56, K=256, KH=3, KW=3, pad=(1, 1, 1, 1)), True),  # conv3_2
                         # 3136 work items per group: the queues would be slower than the hardware's dealing
                         (ConvSpec(N=32, C=128, H=112, W=112, K=128, KH=3, KW=3, pad=(1, 1, 1, 1)), False)):  # conv2_2
        knobs = default(spec)
        assert knobs.span_images and not knobs.stage_input and not knobs.pad_input, spec
        assert knobs.sm_affine == affine and not knobs.rotate_chunks, spec
        assert knobs.channel_chunk == (16 if spec.OH * spec.OW <= 28 * 28 else 8), spec  # tap blocks of 16 channels
        assert uses_zero_page(spec, knobs)
        row = knobs.threads_x * knobs.threads_y
        assert _Geometry.of(spec, knobs).blocks_per_group(32, 1) == -(-32 * spec.OH * spec.OW // row)
        # split 4 ways (l4.3x3): 256-thread rows, the partial sums in rounds; else 128-thread rows in one round
        assert (row, reduces_in_rounds(spec, knobs)) == ((256, True) if knobs.channel_split >= 4 else (128, False))
    for spec in (ConvSpec(N=32, C=64, H=224, W=224, K=128, KH=3, KW=3, pad=(1, 1, 1, 1)),  # past the row layout
                 ConvSpec(N=32, C=96, H=27, W=27, K=256, KH=5, KW=5, pad=(2, 2, 2, 2)),  # alexnet.conv2: 5x5
                 ConvSpec(N=32, C=64, H=56, W=56, K=64, KH=3, KW=3, pad=(1, 1, 1, 1))):  # l1.3x3: one group
        knobs = default(spec)
        assert knobs.stage_input and not knobs.span_images, spec
        # whole-image blocks (alexnet.conv2) walk their chunks from their SM's own first one (notes v21)
        assert knobs.rotate_chunks == knobs.image_tile == (spec.KH == 5), spec
    # 48 channels a thread where 32 would leave a part-filled second wave of one-per-SM image blocks (notes v23):
    # alexnet.conv2 as the bench prunes it (64 -> 192 channels: 192 blocks at 32, 128 at 48); the 96 -> 256 one
    # above stays at 32 (256 blocks, and 192 at 48: two waves either way)
    conv2 = default(ConvSpec(N=32, C=64, H=27, W=27, K=192, KH=5, KW=5, pad=(2, 2, 2, 2)))
    assert conv2.image_tile and conv2.rotate_chunks and conv2.channels_per_thread == 48
    assert default(ConvSpec(N=32, C=96, H=27, W=27, K=256, KH=5, KW=5, pad=(2, 2, 2, 2))).channels_per_thread == 32
    b1 = default(ConvSpec(N=1, C=192, H=13, W=13, K=384, KH=3, KW=3, pad=(1, 1, 1, 1)))
    assert not b1.image_tile and not b1.span_images and not b1.rotate_chunks
    spec = ConvSpec(N=32, C=256, H=7, W=7, K=64, KH=1, KW=1)
    flat = default(spec)
    row = flat.threads_x * flat.threads_y  # 256 where the rule splits the row 4 ways (next test)
    assert flat.span_images and _Geometry.of(spec, flat).blocks_per_group(32, 1) == -(-32 * 49 // row)


def test_defaults_take_64_channels_per_thread_where_measured(rng):
    """64 accumulators per thread at batch >= 16 on unsplit flat 1x1 rows and on staged convs it makes one group;
    32 on staged convs of more groups, on split 1x1 rows, and at batch 1."""
    def default(spec):
        return RULE.default_knobs(spec, SparseConvWeight.from_dense(pruned(rng, spec.weight_shape, 0.9)))

    wide = {"l3.1x1out": ConvSpec(N=32, C=256, H=14, W=14, K=1024, KH=1, KW=1),
            "l1.1x1in": ConvSpec(N=32, C=256, H=56, W=56, K=64, KH=1, KW=1),
            "l1.3x3": ConvSpec(N=32, C=64, H=56, W=56, K=64, KH=3, KW=3, pad=(1, 1, 1, 1))}
    narrow = {"l4.1x1in": ConvSpec(N=32, C=2048, H=7, W=7, K=512, KH=1, KW=1),  # split 4 ways
              "conv2_2": ConvSpec(N=32, C=128, H=112, W=112, K=128, KH=3, KW=3, pad=(1, 1, 1, 1)),  # 2 groups of 64
              "l1.3x3_b1": ConvSpec(N=1, C=64, H=56, W=56, K=64, KH=3, KW=3, pad=(1, 1, 1, 1))}
    for name, spec in wide.items():
        knobs = default(spec)
        assert (knobs.channels_per_thread, knobs.channel_split) == (64, 1), name
    for name, spec in narrow.items():
        assert default(spec).channels_per_thread <= 32, name


def test_defaults_mark_loads_evict_first_only_where_the_input_is_read_once(rng):
    """Evict-first tap loads on a 1x1 row whose output channels are one group (its input read once), at batch >= 16:
    not where several groups re-read the input, not on KxK rows (neighbouring taps share lines), not at batch 1."""
    def default(spec):
        return RULE.default_knobs(spec, SparseConvWeight.from_dense(pruned(rng, spec.weight_shape, 0.9), spec.groups))

    once = {"l1.1x1in": ConvSpec(N=32, C=256, H=56, W=56, K=64, KH=1, KW=1),
            "grouped": ConvSpec(N=32, C=128, H=28, W=28, K=128, KH=1, KW=1, groups=4)}  # 32 channels per conv group
    again = {"l3.1x1out": ConvSpec(N=32, C=256, H=14, W=14, K=1024, KH=1, KW=1),
             "l2.3x3": ConvSpec(N=32, C=128, H=28, W=28, K=128, KH=3, KW=3, pad=(1, 1, 1, 1)),
             "l1.1x1in_b1": ConvSpec(N=1, C=256, H=56, W=56, K=64, KH=1, KW=1)}
    for name, spec in once.items():
        knobs = default(spec)
        assert knobs.evict_first and -(-(spec.K // spec.groups) // knobs.channels_per_thread) == 1, (name, knobs)
    for name, spec in again.items():
        assert not default(spec).evict_first, name


def test_defaults_take_the_row_layout_at_batch_1_where_tiles_wait_on_instruction_fetch(rng):
    """At batch 1, 3x3 convs of 28x28 to 112x112 outputs up to ROW_BATCH1_NONZEROS take the row layout, with
    sm_affine where a group has ROW_BATCH1_AFFINE_ITEMS+ work items; larger weights (one function too large to
    compile), 5x5 kernels, 64-channel convs and other batches keep tiles."""
    from schedules.cuda_specialized import ROW_BATCH1_NONZEROS

    def default(spec, sparsity=0.9):
        return RULE.default_knobs(spec, SparseConvWeight.from_dense(pruned(rng, spec.weight_shape, sparsity)))

    conv2_2 = default(ConvSpec(N=1, C=128, H=112, W=112, K=128, KH=3, KW=3, pad=(1, 1, 1, 1)))
    assert conv2_2.span_images and conv2_2.sm_affine and not conv2_2.stage_input
    l2 = default(ConvSpec(N=1, C=128, H=28, W=28, K=128, KH=3, KW=3, pad=(1, 1, 1, 1)))  # 7 work items per group
    assert l2.span_images and not l2.sm_affine
    conv4_2 = ConvSpec(N=1, C=512, H=28, W=28, K=512, KH=3, KW=3, pad=(1, 1, 1, 1))
    assert conv4_2.C * conv4_2.K * 9 // 10 > ROW_BATCH1_NONZEROS and not default(conv4_2).span_images
    for spec in (ConvSpec(N=1, C=96, H=27, W=27, K=256, KH=5, KW=5, pad=(2, 2, 2, 2)),  # alexnet.conv2
                 ConvSpec(N=1, C=64, H=56, W=56, K=64, KH=3, KW=3, pad=(1, 1, 1, 1)),  # resnet50.l1.3x3
                 ConvSpec(N=4, C=128, H=28, W=28, K=128, KH=3, KW=3, pad=(1, 1, 1, 1))):
        assert not default(spec).span_images, spec.describe()


def test_defaults_run_256_thread_rows_where_a_row_is_split_4_ways(rng):
    """At batch >= 16 a row split 4+ ways (the 1x1 row of resnet50.l4.1x1in, the 3x3 row of l4.3x3) runs 256-thread
    rows, its partial sums in rounds; split less, or at batch 1, 128-thread rows."""
    from schedules.cuda_specialized import reduces_in_rounds

    def default(spec):
        return RULE.default_knobs(spec, SparseConvWeight.from_dense(pruned(rng, spec.weight_shape, 0.9)))

    for spec in (ConvSpec(N=32, C=2048, H=7, W=7, K=512, KH=1, KW=1),
                 ConvSpec(N=32, C=512, H=7, W=7, K=512, KH=3, KW=3, pad=(1, 1, 1, 1))):
        knobs = default(spec)
        assert knobs.span_images and knobs.channel_split == 4 and knobs.threads_x * knobs.threads_y == 256, knobs
        assert reduces_in_rounds(spec, knobs)
    for spec in (ConvSpec(N=32, C=256, H=14, W=14, K=1024, KH=1, KW=1),  # unsplit
                 ConvSpec(N=32, C=256, H=14, W=14, K=256, KH=3, KW=3, pad=(1, 1, 1, 1))):  # split 2 ways
        knobs = default(spec)
        assert knobs.channel_split < 4 and knobs.threads_x * knobs.threads_y == 128, knobs


def test_largest_launch_nonzeros_matches_the_kernels_it_emits(cuda_target, rng):
    """The compile-size estimate the defaults use must count the launches the kernel really makes."""
    from schedules.cuda_specialized import _launch_parts, largest_launch_nonzeros
    from schedules.unrolled import unrolled_program

    rule = SpecializedCUDA(kernel_nonzeros=60, fill_warps=0)  # small parts, so the layer is cut several times
    spec = ConvSpec(N=2, C=16, H=6, W=6, K=16, KH=3, KW=3, pad=(1, 1, 1, 1))
    weight = SparseConvWeight.from_dense(pruned(rng, spec.weight_shape, 0.7))
    knobs = rule.default_knobs(spec, weight).with_(channels_per_thread=2, input_parts=2, channel_chunk=4)
    groups = unrolled_program(weight, 2)
    parts = _launch_parts(spec, groups, knobs, 60, 0)
    assert len(parts) >= 3
    largest = max(sum(groups[gi].fma_count for gi in p) for p in parts)
    assert largest_launch_nonzeros(spec, weight, knobs, 60, 0) == -(-largest // 2)
    plan = rule.apply(spec, weight, Epilogue(), knobs)
    with cuda_target:
        lib = tvm.compile(tvm.IRModule({"k": plan.func.with_attr("global_symbol", "k")}), target=cuda_target)
    assert len(set(re.findall(GLOBAL_FN, cuda_source(lib)))) == 2 * len(parts)  # each part once per input piece


@pytest.mark.parametrize("batch", [32, 8, 4])
def test_defaults_cut_a_huge_function_where_every_layer_is_a_candidate(rng, batch):
    """ResNet-50's layer4 downsample at batch 32 or 8 would be one 209k-nonzero function (cicc ran 16 and 19
    minutes on it; batch 4 is not measured): from ALL_LAYERS_BATCH the defaults cut its input channels until each launch is under
    FUNCTION_NONZEROS; below it the layer is the CSR kernel's anyway, and batch 1 was measured uncut."""
    from schedules.cuda_specialized import ALL_LAYERS_BATCH, FUNCTION_NONZEROS, largest_launch_nonzeros

    w = SparseConvWeight.from_dense(pruned(rng, (2048, 1024, 1, 1), 0.9))
    ds = ConvSpec(N=batch, C=1024, H=14, W=14, K=2048, KH=1, KW=1, stride=(2, 2))
    knobs = RULE.default_knobs(ds, w)
    assert knobs.input_parts >= 2 and largest_launch_nonzeros(ds, w, knobs) <= FUNCTION_NONZEROS
    assert largest_launch_nonzeros(ds, w, knobs.with_(input_parts=1)) > 2 * FUNCTION_NONZEROS
    below = ConvSpec(N=ALL_LAYERS_BATCH - 1, C=1024, H=14, W=14, K=2048, KH=1, KW=1, stride=(2, 2))
    assert RULE.default_knobs(below, w).input_parts == 1
    assert "cost rule" in RULE.pays(below, w) and RULE.pays(ds, w) is None


def _stem_model(rng, batch, sparse_next=True):
    """A dense 3-channel stem (7x7 stride 2, as ResNet-50's and GoogLeNet's) then a 90%-pruned 3x3 conv."""
    from onnx import helper

    from _helpers import onnx_model

    stem = randn(rng, (16, 3, 7, 7))
    nxt = pruned(rng, (16, 16, 3, 3), 0.9 if sparse_next else 0.0)
    nodes = [helper.make_node("Conv", ["x", "w0"], ["a"], strides=[2, 2], pads=[3, 3, 3, 3]),
             helper.make_node("Relu", ["a"], ["r"]),
             helper.make_node("Conv", ["r", "w1"], ["y"], pads=[1, 1, 1, 1])]
    return onnx_model(nodes, [("x", [batch, 3, 16, 16])], [("y", [batch, 16, 8, 8])], {"w0": stem, "w1": nxt})


@pytest.mark.parametrize("batch, options, stem", [
    (16, {}, "specialized"),  # batch >= 8: the rule's takes_dense claims the dense stem
    (8, {}, "specialized"),
    (4, {}, "dense"),  # smaller batches: not measured, so TVM's dense conv
    (16, {"min_sparsity": 2.0}, "dense"),  # "keep every conv dense" wins over the claim
    (16, {"kernel": "sparse"}, "dense"),  # a forced kernel: only convs past min_sparsity get it
])
def test_dense_stem_is_claimed_only_where_measured(rng, batch, options, stem):
    import escort_tvm

    mod, params = escort_tvm.from_onnx(_stem_model(rng, batch))
    built = escort_tvm.build(mod, params, {"kind": "cuda", "arch": "sm_90"}, **options)
    r0 = built.report[0]
    assert r0.sparsity == 0.0 and r0.kernel == stem, built.report_text()
    if stem == "specialized":
        assert r0.fused == ["relu"] and any("takes_dense" in n for n in r0.notes), r0.notes
        assert f"{r0.function}_kernel" in cuda_source(built.executable)
    else:
        assert "below min_sparsity" in r0.reason and not r0.notes, built.report_text()


def test_dense_stem_claim_needs_few_input_channels():
    dense = SparseConvWeight.from_dense(np.ones((16, 3, 7, 7), np.float32))
    wide = SparseConvWeight.from_dense(np.ones((16, 8, 3, 3), np.float32))
    assert RULE.takes_dense(ConvSpec(N=32, C=3, H=224, W=224, K=16, KH=7, KW=7, stride=(2, 2), pad=(3,) * 4), dense)
    assert not RULE.takes_dense(ConvSpec(N=32, C=8, H=56, W=56, K=16, KH=3, KW=3, pad=(1,) * 4), wide)
    assert not RULE.takes_dense(ConvSpec(N=7, C=3, H=224, W=224, K=16, KH=7, KW=7, stride=(2, 2), pad=(3,) * 4), dense)
