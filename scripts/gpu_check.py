"""Correctness on a real GPU, split in two because the GPU machine has no TVM compiler.

    python scripts/gpu_check.py prepare [--dir .gpu/check]     # here: build .so files + float64 references
    source .devbundle/activate && python3 scripts/gpu_check.py run --dir .gpu/check --out $OUT   # GPU host

``prepare`` builds (1) small pruned CNNs through escort_tvm.build for CUDA, exported as .so, with
onnxruntime references, (2) the CUDA CSR kernel on every conv attribute case and a spread of knob
settings, all in one .so, and (3) the specialised kernel (weights in the code) on SPEC_CASES, the default
knobs and one-knob changes of them, one .so per case, with float64 numpy references (``--parts`` picks
among the three). ``run`` loads everything with the TVM runtime alone, poisons outputs with NaN, runs,
and compares by relative error (< 1e-4).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# (name, N, C, H, W, K, KH, KW, stride, pad(t,l,b,r), dilation, groups, sparsity, relu)
CASES = [
    ("3x3", 1, 32, 14, 14, 48, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1, 0.9, True),
    ("3x3_batch", 5, 16, 13, 13, 24, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1, 0.8, False),
    ("1x1", 3, 64, 7, 7, 40, 1, 1, (1, 1), (0, 0, 0, 0), (1, 1), 1, 0.95, True),
    ("1x1_stride2", 2, 32, 15, 15, 16, 1, 1, (2, 2), (0, 0, 0, 0), (1, 1), 1, 0.9, False),
    ("3x3_valid", 3, 8, 13, 17, 16, 3, 3, (1, 1), (0, 0, 0, 0), (1, 1), 1, 0.8, True),
    ("5x5", 2, 16, 27, 27, 32, 5, 5, (1, 1), (2, 2, 2, 2), (1, 1), 1, 0.9, True),
    ("7x7_s2", 1, 3, 37, 37, 16, 7, 7, (2, 2), (3, 3, 3, 3), (1, 1), 1, 0.7, True),
    ("11x11_s4", 2, 3, 67, 67, 24, 11, 11, (4, 4), (2, 2, 2, 2), (1, 1), 1, 0.8, True),
    ("5x3_asym", 2, 12, 19, 23, 20, 5, 3, (2, 1), (1, 0, 2, 1), (1, 1), 1, 0.85, False),
    ("dilated", 1, 16, 20, 20, 16, 3, 3, (1, 1), (2, 2, 2, 2), (2, 2), 1, 0.9, True),
    ("grouped", 2, 32, 12, 12, 32, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 4, 0.8, True),
    ("depthwise", 3, 24, 10, 10, 24, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 24, 0.6, False),
    ("empty_rows", 2, 16, 9, 9, 16, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1, 0.9, True),
    ("all_zero", 1, 8, 8, 8, 8, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1, 1.0, False),
    ("wide_batch32", 32, 32, 14, 14, 64, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1, 0.9, True),
]


# The specialised kernel (schedules.SpecializedCUDA): weights baked into the code, so every case is a kernel
# of its own; small spatial sizes keep the compile (about ms per nonzero) short.
# (name, N, C, H, W, K, KH, KW, stride, pad(t,l,b,r), dilation, groups, weight, relu, residual)
# weight: a sparsity in [0, 1), "zero" (all-zero tensor), "single" (one nonzero), "zero_rows" (90% + every third
# output channel all zero)
SPEC_CASES = [
    ("3x3", 1, 8, 14, 14, 16, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1, 0.9, True, False),
    ("3x3_s2", 2, 8, 15, 15, 8, 3, 3, (2, 2), (1, 1, 1, 1), (1, 1), 1, 0.9, False, True),
    ("1x1_flat", 3, 32, 7, 9, 16, 1, 1, (1, 1), (0, 0, 0, 0), (1, 1), 1, 0.9, True, True),
    ("1x1_flat_long", 1, 16, 17, 19, 8, 1, 1, (1, 1), (0, 0, 0, 0), (1, 1), 1, 0.9, False, False),
    ("1x1_s2", 2, 16, 15, 15, 8, 1, 1, (2, 2), (0, 0, 0, 0), (1, 1), 1, 0.9, True, False),
    ("5x5", 1, 8, 19, 21, 8, 5, 5, (1, 1), (2, 2, 2, 2), (1, 1), 1, 0.9, True, False),
    ("7x7_s2_p3", 1, 3, 37, 37, 8, 7, 7, (2, 2), (3, 3, 3, 3), (1, 1), 1, 0.5, True, False),
    ("11x11_s4", 2, 3, 67, 67, 8, 11, 11, (4, 4), (2, 2, 2, 2), (1, 1), 1, 0.9, True, False),
    ("dilated", 1, 8, 20, 20, 8, 3, 3, (1, 1), (2, 2, 2, 2), (2, 2), 1, 0.9, False, True),
    ("5x3_asym_pad", 2, 8, 19, 23, 8, 5, 3, (2, 1), (1, 0, 2, 1), (1, 1), 1, 0.9, False, False),
    ("groups2", 2, 16, 12, 12, 16, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 2, 0.9, True, False),
    ("depthwise", 3, 16, 10, 10, 16, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 16, 0.5, False, True),
    ("odd_tiles", 1, 8, 13, 37, 12, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1, 0.9, True, True),
    ("sparsity50", 1, 8, 9, 11, 8, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1, 0.5, False, False),
    ("sparsity99", 1, 32, 9, 9, 32, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1, 0.99, True, False),
    ("all_zero", 2, 8, 8, 8, 8, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1, "zero", True, True),
    ("single_nonzero", 1, 8, 9, 9, 8, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1, "single", False, False),
    ("zero_out_channels", 2, 16, 9, 9, 16, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1, "zero_rows", True, False),
    ("batch32", 32, 16, 8, 8, 16, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1, 0.9, True, True),
    ("batch32_1x1_flat", 32, 16, 6, 6, 16, 1, 1, (1, 1), (0, 0, 0, 0), (1, 1), 1, 0.9, False, True),
    # batch >= 16 on a 13x13 output: the default takes image_tile (and sm_affine); 7x7 flat over a ragged batch
    ("batch16_13x13", 16, 16, 13, 13, 32, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1, 0.9, True, True),
    ("batch17_1x1_7x7", 17, 32, 7, 7, 16, 1, 1, (1, 1), (0, 0, 0, 0), (1, 1), 1, 0.9, True, False),
    # batch >= 16, unstaged 1x1: the default splits the input channels across slices of the block
    ("batch16_1x1_split", 16, 64, 5, 5, 24, 1, 1, (1, 1), (0, 0, 0, 0), (1, 1), 1, 0.9, True, True),
    ("3x3_nopad", 2, 8, 12, 13, 8, 3, 3, (1, 1), (0, 0, 0, 0), (1, 1), 1, 0.8, True, False),
    ("split_kernels", 2, 16, 10, 11, 32, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1, 0.8, True, True),
    # 64 channels per thread (cpt_64) over a ragged last group (80 = 64 + 16): the row layout and flat 1x1
    ("batch16_wide_3x3", 16, 24, 7, 7, 80, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1, 0.9, True, True),
    ("batch32_wide_1x1", 32, 48, 7, 7, 80, 1, 1, (1, 1), (0, 0, 0, 0), (1, 1), 1, 0.9, True, False),
    # a deep 7x7 input at batch 16: the default splits the row layout 4 ways and takes 256-thread rows
    ("batch16_deep_7x7", 16, 128, 7, 7, 80, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1, 0.95, True, True),
    # batch 1, deep and small: block_split cuts the input channels over the blocks of a work item (the last block
    # to finish adds the partial sums); with whole-image blocks, split slices, input parts, the row layout, 1x1
    ("batch1_block_split", 1, 64, 14, 14, 24, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1, 0.9, True, True),
    ("batch2_1x1_block_split", 2, 64, 7, 9, 24, 1, 1, (1, 1), (0, 0, 0, 0), (1, 1), 1, 0.9, True, True),
]
# Cases built with a small kernel_nonzeros, so one layer runs as several kernels launched in turn.
SPEC_SPLIT = {"split_kernels": 200}
# One-knob changes of the default (tiny layers default to one channel per thread, so wider channel groups,
# as the benchmark layers use, come from these): the staging flip and 4 channels per thread on every case,
# the rest on SPEC_KNOB_CASES (the kernel's code, and so the compile, grows with every variant).
SPEC_CHANGES = (("stage_flip", "stage_input", lambda v: not v), ("prefetch_flip", "prefetch", lambda v: not v),
                ("rows_2", "rows_per_thread", lambda v: 2), ("ib_2", "images_per_block", lambda v: 2),
                ("cpt_4", "channels_per_thread", lambda v: 4), ("sm_affine", "sm_affine", lambda v: True),
                ("ib_4_split", "images_per_block", lambda v: 4),
                ("rows_4", "rows_per_thread", lambda v: 4), ("order_flip", "group_major", lambda v: not v),
                ("cpt_16", "channels_per_thread", lambda v: 16), ("chunk_4", "channel_chunk", lambda v: 4),
                ("tx_32", "threads_x", lambda v: 32), ("split_4", "channel_split", lambda v: 4),
                ("split_2", "channel_split", lambda v: 2),
                # tiles per block need staging (1x1 flat defaults to unstaged)
                ("tb_2", "tiles_per_block", lambda v: 2, {"stage_input": True, "span_images": False}),
                ("tb_4", "tiles_per_block", lambda v: 4, {"stage_input": True, "span_images": False}),
                ("ip_2", "input_parts", lambda v: 2), ("ip_4", "input_parts", lambda v: 4),
                # input pieces of conv groups of 8 channels (groups2) need chunks of 4
                ("ip_2_chunk_4", "input_parts", lambda v: 2, {"channel_chunk": 4}),
                # work items with slices, as the large layers run them (refused where unstaged)
                ("sm_affine_split_2", "sm_affine", lambda v: True, {"channel_split": 2}),
                # one thread per pixel of a whole image (refused where flat or over 1024 threads); the flat row
                # over the batch, or per image (the flip of whichever the default took)
                ("image_tile", "image_tile", lambda v: not v), ("span_flip", "span_images", lambda v: not v),
                # one thread per pixel with global loads (predicated where padded), and unstaged split slices
                ("image_tile_direct", "image_tile", lambda v: True, {"stage_input": False, "span_images": False}),
                ("split_2_direct", "channel_split", lambda v: 2, {"stage_input": False, "span_images": False}),
                # 64 accumulators per thread (split in at most two: its partial sums must fit in 48 KB)
                ("cpt_64", "channels_per_thread", lambda v: 64, {"channel_split": 1}),
                ("cpt_64_split_2", "channels_per_thread", lambda v: 64, {"channel_split": 2}),
                # split 4 ways, the partial sums in 3 rounds through one share of shared memory (one round: 96 KB)
                ("cpt_64_split_4", "channels_per_thread", lambda v: 64, {"channel_split": 4}),
                ("cpt_64_split_4_affine", "channels_per_thread", lambda v: 64, {"channel_split": 4, "sm_affine": True}),
                # the taps' global loads marked evict-first (unstaged; refused where a padded conv has no PTX taps)
                ("evict_first", "evict_first", lambda v: True, {"stage_input": False}),
                ("evict_first_staged", "evict_first", lambda v: True, {"stage_input": True, "span_images": False,
                                                                        "pixels_per_thread": 1, "pad_input": False}),
                # block_split: each work item's blocks take runs of the input chunks; the last adds the partial sums
                ("block_split_2", "block_split", lambda v: 2),
                ("block_split_4_image_tile", "block_split", lambda v: 4,
                 {"image_tile": True, "channel_split": 1, "channel_chunk": 4, "channels_per_thread": 4}),
                ("block_split_2_split_2", "block_split", lambda v: 2, {"channel_split": 2, "channel_chunk": 4}),
                ("block_split_2_ip_2", "block_split", lambda v: 2, {"input_parts": 2, "channel_chunk": 4}),
                ("block_split_8_direct", "block_split", lambda v: 8, {"stage_input": False, "channel_chunk": 4}),
                # the grid asks L2 for the whole input first
                ("prefetch_l2", "prefetch_l2", lambda v: True),
                # each SM walks a group's chunks from its own first one: the staged loop, the unstaged taps'
                # segments, with split slices (each rotates its own run), and with block_split runs
                ("rotate", "rotate_chunks", lambda v: True),
                ("rotate_direct", "rotate_chunks", lambda v: True, {"stage_input": False, "span_images": False}),
                ("rotate_split_2", "rotate_chunks", lambda v: True, {"channel_split": 2}),
                ("rotate_split_2_direct", "rotate_chunks", lambda v: True,
                 {"channel_split": 2, "stage_input": False, "span_images": False}),
                ("rotate_block_split_2", "rotate_chunks", lambda v: True, {"block_split": 2, "channel_chunk": 4}),
                # 48 accumulators per thread (a ragged last group where K is no multiple of 48), and as the batch-16+
                # whole-image blocks take it (rotated)
                ("cpt_48", "channels_per_thread", lambda v: 48, {"channel_split": 1}),
                ("cpt_48_image_tile", "channels_per_thread", lambda v: 48,
                 {"channel_split": 1, "image_tile": True, "rotate_chunks": True, "stage_input": True,
                  "span_images": False, "pad_input": False, "pixels_per_thread": 1}))
SPEC_BASIC_CHANGES = 6
SPEC_KNOB_CASES = ("3x3", "1x1_flat", "11x11_s4", "5x3_asym_pad", "groups2", "odd_tiles", "batch32", "split_kernels",
                   "batch16_13x13", "batch16_wide_3x3", "batch32_wide_1x1", "batch1_block_split",
                   "batch2_1x1_block_split")


def _spec_weight(rng, spec, kind):
    """A pruned weight for a SPEC_CASES entry (magnitude pruning of a random tensor, or the special kinds)."""
    from escort_tvm.models import magnitude_prune

    w = rng.standard_normal(spec.weight_shape).astype(np.float32)
    if kind == "zero":
        return np.zeros_like(w)
    if kind == "single":
        out = np.zeros_like(w)
        idx = tuple(int(rng.integers(n)) for n in w.shape)
        out[idx] = 1.75
        return out
    if kind == "zero_rows":
        w = magnitude_prune(w, 0.9)
        w[::3] = 0
        return w
    return magnitude_prune(w, kind)


def _spec_variants(rule, spec, weight, all_changes: bool, only: set[str] | None = None):
    """(name, knobs, reason): the default and the SPEC_CHANGES changes of it (all, or the first few); a change's
    optional fourth element sets the other knobs it needs. ``only``: just these variants (every case), and the
    default."""
    from schedules import SpecializedKnobs

    d = rule.default_knobs(spec, weight)
    out, seen = [("default", d, None)], {d}
    changes = [c for c in SPEC_CHANGES if c[0] in only] if only is not None else \
        SPEC_CHANGES if all_changes else SPEC_CHANGES[:SPEC_BASIC_CHANGES]
    for name, field, change, *extra in changes:
        v = change(getattr(d, field))
        k = d.with_(**{field: v}, **(extra[0] if extra else {}))
        if v not in SpecializedKnobs.SPACE[field]:
            out.append((name, None, f"{field}={v} outside the knob space"))
        elif k in seen:
            out.append((name, None, "same knobs as an earlier variant"))
        else:
            seen.add(k)
            out.append((name, k, None))
    try:  # the row layout (unstaged, span_images, the graph's padded input): a whole other set of knobs
        span = rule.span_knobs(spec, weight)
        out.append(("span", span, None) if span not in seen else ("span", None, "same knobs as an earlier variant"))
    except ValueError as e:
        out.append(("span", None, f"span_knobs refused: {e}"))
        return out
    seen.add(span)
    # ... with 2 or 4 neighbouring pixels per thread (vector loads; a padded conv then reads the graph's padded
    # input): check_shape refuses strided convs and rows that the pixels do not divide; and rotated
    for vname, k in [(f"span_px_{px}", span.with_(pixels_per_thread=px, pad_input=any(spec.pad))) for px in (2, 4)] \
            + [("span_rotate", span.with_(rotate_chunks=True))]:
        out.append((vname, k, None) if k not in seen else (vname, None, "same knobs as an earlier variant"))
        seen.add(k)
    if only is not None:
        out = [v for v in out if v[0] == "default" or v[0] in only]
    return out


def prepare_specialized(d: Path, rng, spec_only: set[str] | None = None) -> list[dict]:
    """Every SPEC_CASES case: one module (and .so) per case holding its variants; float64 references."""
    import tvm

    from escort_tvm.compute import Epilogue, conv2d_reference
    from escort_tvm.conv_spec import ConvSpec
    from escort_tvm.cuda_toolchain import carries_gpu_binary
    from escort_tvm.sparse_format import SparseConvWeight
    from schedules import SpecializedCUDA

    target = tvm.target.Target({"kind": "cuda", "arch": "sm_90"})
    entries = []
    t_all = time.time()
    for (name, N, C, H, W, K, KH, KW, st, pad, dil, g, wkind, relu, residual) in SPEC_CASES:
        spec = ConvSpec(N, C, H, W, K, KH, KW, st, pad, dil, g)
        split = {"kernel_nonzeros": SPEC_SPLIT[name], "fill_warps": 0} if name in SPEC_SPLIT else {}
        rule = SpecializedCUDA(**split)
        w = _spec_weight(rng, spec, wkind)
        weight = SparseConvWeight.from_dense(w, g)
        x = rng.standard_normal(spec.input_shape).astype(np.float32)
        b = rng.standard_normal(K).astype(np.float32)
        res = rng.standard_normal(spec.output_shape).astype(np.float32) if residual else None
        ref = conv2d_reference(x, w, spec, b, relu, res)
        data = {"x": x, "b": b, "ref": ref}
        if residual:
            data["residual"] = res
        np.savez(d / f"spec_case_{name}.npz", **data)
        funcs, kernels = {}, []
        for vi, (vname, knobs, reason) in enumerate(_spec_variants(rule, spec, weight, name in SPEC_KNOB_CASES,
                                                                   spec_only)):
            sym = f"s_{name}_{vi}"
            entry = {"case": name, "symbol": sym, "variant": vname, "so": f"spec_{name}.so",
                     "data": f"spec_case_{name}.npz", "spec": spec.to_dict(), "nnz": int(weight.nnz),
                     "relu": relu, "residual": residual, "out_shape": spec.output_shape,
                     "knobs": knobs.as_dict() if knobs else None}
            if knobs is None:
                entries.append(dict(entry, skipped=reason))
                continue
            try:
                plan = rule.apply(spec, weight, Epilogue(relu=relu, residual=residual), knobs)
            except ValueError as e:  # e.g. a staged tile over 48 KB of shared memory
                entries.append(dict(entry, skipped=f"apply refused: {e}"))
                continue
            assert plan.padded_input == knobs.pad_input and not plan.extra_images, (name, vname)
            # sm_affine's work counters (int32) and the zero page of an unstaged padded conv (float32), all zero
            assert all(str(a.dtype) in ("int32", "float32") and not a.any() for a in plan.weight_arrays), (name, vname)
            funcs[sym] = plan.func.with_attr("global_symbol", sym)
            names = [str(prm.name) for prm in plan.func.params[1:1 + len(plan.weight_arrays)]]
            kernels.append(dict(entry, zeros=[[int(a.shape[0]), str(a.dtype), nm]
                                              for a, nm in zip(plan.weight_arrays, names)],
                                padded_input=plan.padded_input, hp=plan.hp, wp=plan.wp))
        t0 = time.time()
        with target:
            ex = tvm.compile(tvm.IRModule(funcs), target=target)
        src = "".join(m.inspect_source() for m in _modules(ex.mod) if m.kind == "cuda")
        for e in kernels:
            if f"{e['symbol']}_kernel" not in src:
                raise RuntimeError(f"{e['symbol']} was not compiled as a GPU kernel")
        so = d / f"spec_{name}.so"
        ex.export_library(str(so))
        assert carries_gpu_binary(so), f"{so} carries no fatbin"
        dt = time.time() - t0
        for e in kernels:
            e["module_compile_s"] = round(dt, 1)
        entries += kernels
        print(f"  specialised {name:18s} nnz={weight.nnz:<5d} {len(kernels)} kernel(s) compiled in {dt:.1f} s "
              f"[{time.time() - t_all:.0f} s]", flush=True)
    return entries


def _modules(mod):
    yield mod
    for m in mod.imports:
        yield from _modules(m)


def _variants(rule, spec, weight, n):
    """The default knobs, its padding flipped on or off chip, the nonzeros split 4 ways and unrolled over
    small chunks of 4 channels (the partial sums' shared memory reused across channels and chunks; a padded
    conv's padding on chip by tap mask; the arrays prefetched into L2 first), on stride-1 convs four settings of
    the staged-input form (nonzeros split 4 ways; split 8 ways, whose partial sums outgrow the round buffers),
    then seeded random settings up to n (small chunks included, to hit the multi-chunk path)."""
    from schedules import CUDAKnobs
    from schedules.cuda import MASK_TAPS

    out = [rule.default_knobs(spec, weight)]
    if n > 1 and any(spec.pad):  # the padded conv with its padding on chip (predicated loads)
        out.append(out[0].with_(pad_on_chip=not out[0].pad_on_chip, tap_mask=False))  # (the compares, if on chip)
    if n > len(out):
        split = out[0].with_(nonzero_split=4, unroll=8, chunk=256, channels_per_block=4, prefetch_l2=True)
        if any(spec.pad) and spec.KH * spec.KW <= MASK_TAPS:  # ... and the padding on chip by tap mask
            split = split.with_(pad_on_chip=True, tap_mask=True)
        while split.threads_x * split.threads_y * split.nonzero_split > 1024:
            split = split.with_(threads_y=split.threads_y // 2)
        out.append(split)
    if spec.stride == (1, 1):  # the staged-input form: several rounds (unrolled), then one ragged round, CPT 2
        staged = CUDAKnobs(threads_x=32, threads_y=2, pixels_per_thread=2, channels_per_block=4, channel_slots=2,
                           stage_input=True, stage_channels=4, unroll=8)
        out += [staged, staged.with_(threads_y=1, pixels_per_thread=4, channels_per_block=8, channel_slots=4,
                                     stage_channels=32, unroll=1),
                staged.with_(threads_y=1, nonzero_split=4, stage_channels=16),  # partial sums of 4 slices
                # 8 slices' partial sums of 8 channels x 8 pixels: more shared memory than two rounds of 4 planes
                staged.with_(threads_y=1, pixels_per_thread=8, channels_per_block=8, channel_slots=1,
                             nonzero_split=8, stage_channels=4)]
    rng = np.random.default_rng(len(out) + spec.K)
    while len(out) < n:
        kw = {name: vals[rng.integers(len(vals))] for name, vals in CUDAKnobs.SPACE.items()}
        try:
            out.append(CUDAKnobs.from_dict(kw))
        except ValueError:
            continue
    return out


def prepare(d: Path, variants: int, parts: set[str] = frozenset({"models", "csr", "specialized"}),
            spec_only: set[str] | None = None) -> None:
    import onnxruntime as ort
    import tvm

    import escort_tvm
    from escort_tvm.compute import Epilogue, conv2d_reference
    from escort_tvm.conv_spec import ConvSpec
    from escort_tvm.cuda_toolchain import carries_gpu_binary, prepare_cuda_build
    from escort_tvm.models import magnitude_prune, small_pruned_cnn
    from escort_tvm.sparse_format import SparseConvWeight
    from schedules import SparseConvCUDA

    if d.exists():  # a stale file from an earlier prepare must not be checked again
        for f in d.iterdir():
            if f.is_file():
                f.unlink()
    d.mkdir(parents=True, exist_ok=True)
    manifest = {"models": [], "kernels": [], "spec_kernels": []}
    rng = np.random.default_rng(2026)
    prepare_cuda_build()
    if "specialized" in parts:
        t0 = time.time()
        manifest["spec_kernels"] = prepare_specialized(d, np.random.default_rng(2027), spec_only)
        n = sum("skipped" not in e for e in manifest["spec_kernels"])
        print(f"prepared {n} specialised kernels over {len(SPEC_CASES)} cases in {time.time() - t0:.1f} s", flush=True)
    for batch in ((1, 4, 16) if "models" in parts else ()):  # 16: large-batch defaults (sm_affine)
        model = small_pruned_cnn(batch=batch, sparsity=0.9, seed=batch)
        mod, params = escort_tvm.from_onnx(model)
        cm = escort_tvm.build(mod, params, "cuda")
        so = cm.export_library(d / f"small_cnn_b{batch}.so")
        assert carries_gpu_binary(so), "exported CUDA model carries no fatbin"
        x = rng.standard_normal(cm.inputs[0][1]).astype(np.float32)
        ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
        np.savez(d / f"small_cnn_b{batch}.npz", x=x, ref=ref)
        manifest["models"].append({"so": so.name, "data": f"small_cnn_b{batch}.npz",
                                   "sparse_convs": sum(r.kernel == "sparse" for r in cm.report),
                                   "specialized_convs": sum(r.kernel == "specialized" for r in cm.report)})
    rule = SparseConvCUDA()
    funcs = {}
    for (name, N, C, H, W, K, KH, KW, st, pad, dil, g, sp, relu) in (CASES if "csr" in parts else ()):
        spec = ConvSpec(N, C, H, W, K, KH, KW, st, pad, dil, g)
        w = magnitude_prune(rng.standard_normal(spec.weight_shape).astype(np.float32), min(sp, 1.0))
        if name == "empty_rows":
            w[::3] = 0
        if sp >= 1.0:
            w[:] = 0
        weight = SparseConvWeight.from_dense(w, g)
        x = rng.standard_normal(spec.input_shape).astype(np.float32)
        b = rng.standard_normal(K).astype(np.float32)
        ref = conv2d_reference(x, w, spec, b, relu)
        np.savez(d / f"case_{name}.npz", x=x, b=b, ref=ref)
        for vi, knobs in enumerate(_variants(rule, spec, weight, variants)):
            try:
                plan = rule.apply(spec, weight, Epilogue(relu=relu), knobs)
            except ValueError as e:  # a setting this conv cannot take (e.g. tap_mask on a 7x7 kernel)
                print(f"  {name} variant {vi} refused: {e}", flush=True)
                manifest.setdefault("refused", []).append({"case": name, "knobs": knobs.as_dict(), "reason": str(e)})
                continue
            sym = f"k_{name}_{vi}"
            funcs[sym] = plan.func.with_attr("global_symbol", sym)
            f = f"{sym}.npz"
            np.savez(d / f, **{f"w{i}": a for i, a in enumerate(plan.weight_arrays)})
            manifest["kernels"].append({"case": name, "symbol": sym, "data": f, "knobs": knobs.as_dict(),
                                        "spec": spec.to_dict(), "hp": plan.hp, "wp": plan.wp,
                                        "padded_input": plan.padded_input, "extra_images": plan.extra_images,
                                        "n_weight_arrays": len(plan.weight_arrays), "out_shape": spec.output_shape})
    target = tvm.target.Target({"kind": "cuda", "arch": "sm_90"})
    t0 = time.time()
    if funcs:
        with target:
            ex = tvm.compile(tvm.IRModule(funcs), target=target)
        ex.export_library(str(d / "kernels.so"))
        assert carries_gpu_binary(d / "kernels.so")
    (d / "manifest.json").write_text(json.dumps(manifest, indent=1))
    n_spec = sum("skipped" not in e for e in manifest["spec_kernels"])
    print(f"prepared {len(manifest['models'])} models, {len(funcs)} CSR kernels and {n_spec} specialised kernels "
          f"in {d} (CSR kernel compile {time.time() - t0:.1f} s)")


def run(d: Path, out: Path | None) -> int:
    import tvm

    import escort_tvm
    from escort_tvm.compute import padded_input
    from escort_tvm.conv_spec import ConvSpec
    from escort_tvm.cuda_toolchain import load_cuda_runtime

    def rel(a, b):
        return float(np.linalg.norm(a.astype(np.float64) - b) / max(np.linalg.norm(b), 1e-30))

    manifest = json.loads((d / "manifest.json").read_text())
    rows, ok = [], True
    for m in manifest["models"]:
        model = escort_tvm.load(d / m["so"])
        data = np.load(d / m["data"])
        e, good = 0.0, True
        for _ in range(2):  # twice: kernels with work counters (sm_affine) must leave them as they found them
            y = model(data["x"])
            e = max(e, rel(y, data["ref"]))
            good &= bool(np.isfinite(y).all() and e < 1e-4)
        ok &= good
        rows.append({"what": m["so"], "rel_err": e, "ok": good, "sparse_convs": m["sparse_convs"],
                     "specialized_convs": m.get("specialized_convs")})
        print(f"model {m['so']:24s} CSR convs {m['sparse_convs']}, specialised {m.get('specialized_convs')}  "
              f"rel err vs onnxruntime (2 runs) {e:.2e}  {'PASS' if good else 'FAIL'}")
    load_cuda_runtime(allow_stub=False)
    dev = tvm.cuda(0)
    lib = tvm.runtime.load_module(str(d / "kernels.so")) if manifest["kernels"] else None
    for k in manifest["kernels"]:
        data, case = np.load(d / k["data"]), np.load(d / f"case_{k['case']}.npz")
        spec = ConvSpec.from_dict(k["spec"])
        x = case["x"]
        if k["padded_input"]:
            x = padded_input(x, spec, k["hp"], k["wp"])
            x = np.concatenate([x, np.zeros((k["extra_images"], x.shape[1]), x.dtype)])
        args = [x] + [data[f"w{i}"] for i in range(k["n_weight_arrays"])] + [case["b"]]
        args = [tvm.runtime.tensor(a, dev) for a in args]
        y = tvm.runtime.tensor(np.full(k["out_shape"], np.nan, np.float32), dev)
        lib[k["symbol"]](*args, y)
        dev.sync()
        yn = y.numpy()
        ref = case["ref"]
        e = rel(yn, ref) if np.abs(ref).max() > 0 else float(np.abs(yn - ref).max())
        good = bool(np.isfinite(yn).all() and e < 1e-4)
        ok &= good
        rows.append({"what": k["symbol"], "case": k["case"], "knobs": k["knobs"], "rel_err": e, "ok": good})
        print(f"kernel {k['symbol']:22s} {json.dumps(k['knobs'])}  err {e:.2e}  {'PASS' if good else 'FAIL'}")
    libs = {}
    for k in manifest.get("spec_kernels", []):
        what = f"spec {k['case']}/{k['variant']}"
        if "skipped" in k:
            rows.append({"what": k["symbol"], "case": k["case"], "variant": k["variant"], "kernel": "specialized",
                         "skipped": k["skipped"], "ok": True})
            print(f"{what:34s} not built: {k['skipped']}")
            continue
        rec = {"what": k["symbol"], "case": k["case"], "variant": k["variant"], "kernel": "specialized",
               "knobs": k["knobs"], "nnz": k["nnz"], "relu": k["relu"], "residual": k["residual"]}
        try:
            if k["so"] not in libs:
                libs[k["so"]] = tvm.runtime.load_module(str(d / k["so"]))
            case = np.load(d / k["data"])
            # sm_affine's counters, block_split's arrival counters and partial sums, the zero page
            work = [np.zeros(n, dt) for n, dt, *_ in k.get("zeros", [])]
            x = case["x"]
            if k.get("padded_input"):  # pad_input: the kernel reads x_pad[N, C*Hp*Wp], as the graph pass pads it
                x = padded_input(x, ConvSpec.from_dict(k["spec"]), k["hp"], k["wp"])
            args = [x, *work, case["b"]] + ([case["residual"]] if k["residual"] else [])
            args = [tvm.runtime.tensor(a, dev) for a in args]
            good, e, bad = True, 0.0, 0
            for _ in range(2):  # twice: a kernel must leave its work counters as it found them
                y = tvm.runtime.tensor(np.full(k["out_shape"], np.nan, np.float32), dev)
                libs[k["so"]][k["symbol"]](*args, y)
                dev.sync()
                yn, ref = y.numpy(), case["ref"]
                e = max(e, rel(yn, ref) if np.abs(ref).max() > 0 else float(np.abs(yn - ref).max()))
                bad += int((~np.isfinite(yn)).sum())
                good &= bool(np.isfinite(yn).all() and e < 1e-4)
            if work:  # the counters back at zero, the zero page still zero (a read-only page); not the workspace
                kept = [a for a, (*_, nm) in zip(args[1:1 + len(work)], k["zeros"]) if nm != "partials"]
                good &= all(not a.numpy().any() for a in kept)
            rec.update(rel_err=e, nonfinite=bad, ok=good)
        except Exception as ex:  # a launch failure is a failed check, not the end of the run
            good = False
            rec.update(error=f"{type(ex).__name__}: {str(ex).strip().splitlines()[-1] if str(ex).strip() else ''}",
                       ok=False)
        ok &= good
        rows.append(rec)
        err = f"{rec['rel_err']:.2e}" if "rel_err" in rec else rec.get("error", "?")
        print(f"{what:34s} nnz={k['nnz']:<5d} {json.dumps(k['knobs'])}  err {err}  {'PASS' if good else 'FAIL'}")
    n_fail = sum(not r["ok"] for r in rows)
    n_skip = sum("skipped" in r for r in rows)
    print(f"{len(rows) - n_skip} checks, {n_fail} failed ({n_skip} variants not built, listed above) on "
          f"{tvm.cuda(0).device_name}")
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / "gpu_check.json").write_text(json.dumps(rows, indent=1))
    return 0 if ok else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["prepare", "run"])
    ap.add_argument("--dir", type=Path, default=Path(".gpu/check"))
    ap.add_argument("--variants", type=int, default=6, help="knob settings per conv case (prepare)")
    ap.add_argument("--parts", default="models,csr,specialized",
                    help="what prepare builds: models (whole CNNs), csr (the CSR kernel cases), specialized")
    ap.add_argument("--spec-only", default=None,
                    help="specialised variants to build on every case besides the default (names from SPEC_CHANGES, "
                         "span, span_px_2, span_px_4, span_rotate), e.g. rotate,span_rotate")
    ap.add_argument("--out", type=Path, default=Path(os.environ["OUT"]) if os.environ.get("OUT") else None)
    a = ap.parse_args()
    if a.command == "prepare":
        parts = {x.strip() for x in a.parts.split(",") if x.strip()}
        unknown = parts - {"models", "csr", "specialized"}
        if unknown:
            ap.error(f"unknown --parts {sorted(unknown)}")
        only = {x.strip() for x in a.spec_only.split(",") if x.strip()} if a.spec_only else None
        known = {c[0] for c in SPEC_CHANGES} | {"span", "span_px_2", "span_px_4", "span_rotate"}
        if only and only - known:
            ap.error(f"unknown --spec-only {sorted(only - known)}")
        prepare(a.dir, a.variants, parts, only)
        return 0
    return run(a.dir, a.out)


if __name__ == "__main__":
    sys.exit(main())
