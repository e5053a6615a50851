"""CUDA schedule of the sparse direct convolution: register-tiled Escort.

Block = (tile of output rows x columns, group of output channels, group of images). The group's CSR
rows (stretched offset, value) are staged in shared memory in chunks and read back as warp-wide
broadcasts. Each thread owns ``pixels_per_thread`` output columns (strided by the block's width, so
every load of a warp is one coalesced run) times ``images_per_thread`` images, in registers: one
staged nonzero then feeds that many FMAs, and their input addresses differ by compile-time
constants, so the inner loop is loads at immediate offsets from one per-thread base.

The padded input carries extra zero rows/columns (and images) so that threads past the output edge
read in bounds and need no predicate in the inner loop; only their stores are guarded. A conv without
padding needs no pad op at all: there, threads past the edge read the last row, column and image instead
(clamped bases, still constant offsets in the inner loop), so the kernel reads the input as it is. With
``pad_on_chip`` a padded conv needs none either: each nonzero's offset carries its (kh, kw) in its top
byte and every load is predicated on the pixel being inside the image (zero outside), a few integer
instructions per nonzero instead of a pad op's launch and round trip through memory; with ``tap_mask`` the
offset carries the kernel position's index in its low 5 bits instead, tested against a per-pixel bit mask.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from escort_tvm.compute import Epilogue, drop_unused_residual
from escort_tvm.conv_spec import ConvSpec
from escort_tvm.sparse_format import SparseConvWeight

from .base import LARGE_BATCH, KernelPlan, Knobs, SparseConvRule, csr_arrays
from .cuda_staged import StagedGeometry, longest_run, staged_arrays, staged_kernel, staged_run_ptr
from .ptx_taps import l2_prefetch


STATIC_SHARED_BYTES = 48 * 1024  # a kernel's static __shared__ limit


@dataclass(frozen=True)
class CUDAKnobs(Knobs):
    threads_x: int = 32  # threads along the output row
    threads_y: int = 4  # threads along output rows
    pixels_per_thread: int = 1  # output columns per thread, strided by threads_x
    images_per_thread: int = 1  # images per thread (input planes at a constant stride)
    channels_per_block: int = 4  # output channels whose CSR rows one block stages and walks in turn
    chunk: int = 1024  # nonzeros staged in shared memory at a time
    pad_on_chip: bool = False  # padded conv: predicated loads of the plain input instead of a pad op
    tap_mask: bool = False  # pad_on_chip: one bit test of a per-pixel mask of in-image kernel positions per load
    nonzero_split: int = 1  # threadIdx.z slices sharing a channel's nonzeros (partial sums through shared memory)
    unroll: int = 1  # nonzeros a thread loads before their FMAs (1: the plain loop, which nvcc unrolls 4x)
    # Every thread first asks L2 for one 128-byte line of the input and of the CSR arrays (the grid covers them
    # all), so their trips from HBM overlap the row-pointer load. Within the noise on the 7 batch-1 CSR layers
    # (docs/benchmarks.md, twelfth session): no default takes it; a knob for the tuner.
    prefetch_l2: bool = False
    # The staged-input form (schedules/cuda_staged.py, stride 1): bands of input rows staged in shared memory,
    # stage_channels input channels per round, read by channel_slots (threadIdx.z) x channels_per_block /
    # channel_slots channels per thread; pixels_per_thread positions per thread, threads_x * threads_y per slot.
    stage_input: bool = False
    stage_channels: int = 8
    channel_slots: int = 1
    SPACE: ClassVar = {
        "threads_x": (8, 16, 32),
        "threads_y": (1, 2, 4, 8, 16),
        "pixels_per_thread": (1, 2, 4, 8),
        "images_per_thread": (1, 2, 4, 8),
        "channels_per_block": (1, 2, 4, 8, 16),
        "chunk": (256, 512, 1024, 2048),
        "pad_on_chip": (False, True),
        "tap_mask": (False, True),
        "nonzero_split": (1, 2, 4, 8),
        "unroll": (1, 8, 16),
        "prefetch_l2": (False, True),
        "stage_input": (False, True),
        "stage_channels": (4, 8, 16, 32, 64),
        "channel_slots": (1, 2, 4, 8),
    }

    def validate(self) -> None:
        super().validate()
        if self.stage_input:
            self._validate_staged()
            return
        if not 32 <= self.threads_x * self.threads_y * self.nonzero_split <= 1024:
            raise ValueError(f"threads_x*threads_y*nonzero_split="
                             f"{self.threads_x * self.threads_y * self.nonzero_split} must be in [32, 1024]")
        if self.tap_mask and not self.pad_on_chip:
            raise ValueError("tap_mask is a way of pad_on_chip: it needs pad_on_chip=True")
        if self.shared_bytes() > STATIC_SHARED_BYTES:
            raise ValueError(f"chunk={self.chunk} and nonzero_split={self.nonzero_split} need {self.shared_bytes()} "
                             f"bytes of shared memory (staged nonzeros + partial sums), more than a kernel's static "
                             f"{STATIC_SHARED_BYTES}")

    def _validate_staged(self) -> None:
        """What the staged form reads. It stages no nonzeros and pads on chip its own way, so chunk, pad_on_chip,
        tap_mask and prefetch_l2 are not read there (as stage_channels and channel_slots are not in the gathering
        form); several images per thread it cannot take. nonzero_split slices share each channel's nonzeros as in
        the gathering form (partial sums through shared memory at the end)."""
        if self.images_per_thread != 1:
            raise ValueError(f"stage_input=True takes images_per_thread=1 (got {self.images_per_thread})")
        slot = self.threads_x * self.threads_y
        if slot % 32:
            raise ValueError(f"stage_input: threads_x*threads_y={slot} must be a multiple of 32 (a warp walks one "
                             "channel's nonzeros)")
        if not slot * self.channel_slots * self.nonzero_split <= 1024:
            raise ValueError(f"stage_input: {slot} x channel_slots={self.channel_slots} x nonzero_split="
                             f"{self.nonzero_split} threads exceed 1024")
        if self.channels_per_block % self.channel_slots:
            raise ValueError(f"stage_input: channel_slots={self.channel_slots} must divide "
                             f"channels_per_block={self.channels_per_block}")

    def partial_sum_floats(self) -> int:
        """Shared memory for the partial sums of slices 1.. of nonzero_split (each thread's accumulators)."""
        per_thread = self.images_per_thread * self.pixels_per_thread
        return (self.nonzero_split - 1) * per_thread * self.threads_x * self.threads_y

    def shared_bytes(self) -> int:
        return 8 * self.chunk + 4 * self.partial_sum_floats()


# Where the CSR kernel beats the build's dense path (TVM's conv2d), from the sparsity sweep at batch 32
# (docs/benchmarks.md): on a 56x56-output layer (vgg16.conv3_2) it loses at 70% and 80% (9.2 and 8.1 vs
# 7.6 ms) and wins at 90% (5.4): crossover ~82%; on a 14x14-output layer (resnet50.l3.3x3) it ties at 70%
# and wins from 80%. The boundary between the two shapes (28x28 outputs) is not measured. At batch 1
# (90%) it beat TVM dense by 1.8-20x on 3x3 layers and tied on two 1x1 layers; no batch-1 sweep exists,
# so the rule applies from batch 16 only.
MIN_SPARSITY_LARGE_OUTPUT = 0.85
LARGE_OUTPUT_PIXELS = 28 * 28


def _pow2_at_least(n: int) -> int:
    p = 1
    while p < n:
        p *= 2
    return p


class SparseConvCUDA(SparseConvRule):
    name = "cuda.register_tiled"
    kernel = "sparse"
    Knobs = CUDAKnobs

    def is_target(self, target) -> bool:
        return target.kind.name == "cuda"

    def pays(self, spec: ConvSpec, weight: SparseConvWeight) -> str | None:
        """Whether it beats the dense path (the sweep above)."""
        large = spec.N >= LARGE_BATCH and spec.OH * spec.OW >= LARGE_OUTPUT_PIXELS
        if not large or weight.sparsity >= MIN_SPARSITY_LARGE_OUTPUT:
            return None
        return (f"cost rule: at batch {spec.N} on {spec.OH}x{spec.OW} outputs the CSR kernel needs sparsity >= "
                f"{MIN_SPARSITY_LARGE_OUTPUT} to beat the dense path (this weight: {weight.sparsity:.3f})")

    def default_knobs(self, spec: ConvSpec, weight: SparseConvWeight) -> CUDAKnobs:
        OH, OW = spec.OH, spec.OW
        tx = 32 if OW >= 24 else 16 if OW >= 12 else 8
        vw = max(1, min(4, OW // tx)) if OW >= 2 * tx else 1
        vw = 4 if vw >= 3 else vw
        ty = max(32 // tx, min(_pow2_at_least(OH), 128 // tx))
        vn = next(v for v in (8, 4, 2, 1) if v <= spec.N and spec.N % v == 0)
        vn = min(vn, max(1, 8 // vw))  # at most 8 accumulators per thread
        tiles = -(-OW // (tx * vw)) * -(-OH // ty) * -(-spec.N // vn)
        kb = 1
        for cand in (16, 8, 4, 2):  # more channels per block amortise staging, if the grid stays full
            if tiles * -(-spec.K // cand) >= 4 * 132:
                kb = cand
                break
        if spec.N == 1:
            # Batch 1 (H200, docs/bench/b1_v3 and b1_final, one knob changed from these defaults): a second
            # accumulator per thread, even one past the row's end, was 27-43% faster on the 6 layers of >= 14
            # output columns whose blocks walk 2+ channels (vgg16.conv3_2 0.290 -> 0.166 ms, conv4_2 0.280 ->
            # 0.177, resnet50.l1.3x3, l1.1x1in, l3.1x1out, alexnet.conv2) and 25-64% slower on the 4 whose
            # blocks walk one (resnet50.l2.3x3, l3.3x3, vgg16.conv5_2; and alexnet's 13x13 layers); on 7x7
            # outputs, blocks of one warp were 31% faster than two (resnet50.l4.*).
            if vw == 1 and OW >= 14 and kb >= 2:
                vw = 2
            if OH <= 7 and tx * ty > 32:
                ty = max(1, 32 // tx)
        knobs = CUDAKnobs(threads_x=tx, threads_y=ty, pixels_per_thread=vw, images_per_thread=vn,
                          channels_per_block=kb, chunk=1024)
        if spec.N >= LARGE_BATCH:
            return knobs
        return staged_batch1_knobs(spec, weight) or _small_batch_latency(spec, weight, knobs)

    @staticmethod
    def warps(spec: ConvSpec, k: CUDAKnobs) -> int:
        tiles = -(-spec.OW // (k.threads_x * k.pixels_per_thread)) * -(-spec.OH // k.threads_y)
        blocks = tiles * -(-spec.K // k.channels_per_block) * -(-spec.N // k.images_per_thread)
        return blocks * -(-k.threads_x * k.threads_y * k.nonzero_split // 32)

    @staticmethod
    def layout(spec: ConvSpec, k: CUDAKnobs) -> tuple[int, int, int]:
        """Padded input pitch (hp, wp) and extra images, so every thread's reads stay in bounds."""
        if _reads_clamped(spec) or k.pad_on_chip or k.stage_input:
            return spec.H, spec.W, 0
        owt = -(-spec.OW // (k.threads_x * k.pixels_per_thread)) * k.threads_x * k.pixels_per_thread
        oht = -(-spec.OH // k.threads_y) * k.threads_y
        wp = max(spec.Wp, (owt - 1) * spec.stride[1] + (spec.KW - 1) * spec.dilation[1] + 1)
        hp = max(spec.Hp, (oht - 1) * spec.stride[0] + (spec.KH - 1) * spec.dilation[0] + 1)
        extra = -(-spec.N // k.images_per_thread) * k.images_per_thread - spec.N
        return hp, wp, extra

    def apply(self, spec, weight, epilogue: Epilogue, knobs=None) -> KernelPlan:
        knobs = knobs or self.default_knobs(spec, weight)
        knobs.validate()
        hp, wp, extra = self.layout(spec, knobs)
        if knobs.stage_input:  # the staged form reads the plain input and pads on chip
            geometry = StagedGeometry(spec, knobs)
            arrays = staged_arrays(weight, spec, geometry)
            run = longest_run(arrays[0], geometry)
            geometry.check_run(run, spec)
            func = staged_kernel(spec, weight.nnz, epilogue, knobs, geometry, run)
            return KernelPlan(func, hp, wp, arrays, self.name, knobs, spec)
        arrays = csr_arrays(weight, spec, hp, wp)
        if _reads_predicated(spec, knobs):
            arrays = (arrays[0], _packed_offsets(spec, weight, arrays[1], knobs.tap_mask)) + arrays[2:]
        func = _cuda_kernel(spec, len(arrays[1]), epilogue, hp, wp, extra, knobs)
        return KernelPlan(func, hp, wp, arrays, self.name, knobs, spec, extra_images=extra)


# Below LARGE_BATCH the kernel is bound by each thread's chain of dependent gathers, not by any throughput
# (notes/cuda-sparse-conv.md, eleventh session). Measured at batch 1 (H200, docs/bench/b1s, 18 variants of
# each of the 16 layers side by side, every one checked against float64):
# - unroll 8 (8 loads in flight, not nvcc's 4): part of the best variant on 15 of 16 layers (the other a tie).
# - padding on chip by tap mask: on 10 of the 13 padded layers it beats both the pad op and the compare-based
#   predicates (resnet50.l4.3x3 25.7 -> 17.7 us, l2.3x3 30.5 -> 15.0, alexnet.conv2 72.3 -> 31.5 with the
#   others; alexnet.conv3 19.6 -> 17.1 over the compares); ties on vgg16.conv5_2 (41.3 vs 40.7); loses on
#   vgg16.conv3_2 and conv4_2 (+17%, +9%: two pixels and 4-8 channels per thread), which batch 1 gives the
#   specialised kernel. Beyond 32 kernel positions (7x7, 11x11) the compares stay, on the old rule.
# - nonzero_split: more slices while the grid stays within ~2 waves of resident warps (16384) and blocks
#   within 512 threads: the best or within 5% on the 7 layers batch 1 gives CSR (alexnet.conv3-5,
#   resnet50.l3.3x3: 4 slices, 21.6 -> 17.1, 30.1 -> 19.6, 21.5 -> 15.5, 22.7 -> 15.6 us; l4.3x3 and
#   l4.1x1in: 8, 25.7 -> 17.7 and 11.5 -> 9.7; vgg16.conv5_2: 4, 43.5 -> 41.3); 7% off on resnet50.l2.3x3.
SMALL_BATCH_UNROLL = 8
FILL_WARPS = 16384
SPLIT_BLOCK_THREADS = 512


# The staged-input form at batch 1 (H200, docs/bench/stgF-stgH, 2026-12-04, every variant checked against float64;
# 8 settings of each of the 16 layers against the defaults in the same calls, us): it beats both other kernels on
# the stride-1 KxK convs of 13x13-28x28 outputs: vgg16.conv5_2 27.6 (gathering CSR 35.8), conv4_2 67.7 (specialised
# 74 in final3_b1, gathering 148), alexnet.conv3 13.5 (18.7), conv2 15.3 (specialised 17.3), resnet50.l2.3x3 11.6
# (specialised 13.8), resnet50.l1.3x3 (56x56, 64 channels) 11.2 (specialised 12.2-12.6 in other calls); ties on
# alexnet.conv5 and resnet50.l3.3x3 (13.8 / 14.3 against 14.4 / 13.5) and loses 5% on alexnet.conv4 (18.0 against
# 17.2). It loses on 7x7 (resnet50.l4.3x3 16.5 against 13.8), on 56x56 with more channels and larger (vgg16
# conv1_2-conv3_2: the specialised kernel's row layout is 1.4-2.3x faster) and on the 1x1 convs. Its settings: 8
# channels a block, one per thread (8 slots), where that grid has 96+ blocks, else 4 (a narrower one). On
# 13x13/14x14, one warp of 4 pixels a thread per slot, each channel's nonzeros split over 4 slices, 64 input
# channels a round (docs/bench/stgN, against the settings before in one call, us: vgg16.conv5_2 27.0 -> 24.4,
# alexnet.conv5 13.9 -> 12.6, conv3/conv4/resnet50.l3.3x3 within 2%; those before, 2 pixels a thread over 2 warps,
# had given alexnet.conv4 18.8 -> 16.8 and resnet50.l3.3x3 14.5 -> 12.5 over 4 slots unsplit, stgI/stgJ).
# On 27x27/28x28, 4 pixels a thread and 32 input channels a round; the narrow one 2 pixels (resnet50.l2.3x3).
# Other batches are not measured.
STAGED_PIXELS = (13 * 13, 56 * 56)
STAGED_WIDE_MAX_CHANNELS = 64  # past 28x28 outputs only this few input channels (resnet50.l1.3x3, not vgg16.conv3_2)
STAGED_MIN_BLOCKS = 96
PORTABLE_SHARED_BYTES = 99 * 1024  # a default must launch on sm_80-sm_89 too


def staged_batch1_knobs(spec: ConvSpec, weight: SparseConvWeight) -> CUDAKnobs | None:
    """The staged-input form's knobs where batch 1 measured it fastest (above), else None."""
    pixels = spec.OH * spec.OW
    if (spec.N != 1 or spec.stride != (1, 1) or spec.groups != 1 or spec.KH * spec.KW == 1
            or not STAGED_PIXELS[0] <= pixels <= STAGED_PIXELS[1]
            or (pixels > STAGED_PIXELS[1] // 4 and spec.C > STAGED_WIDE_MAX_CHANNELS)):
        return None
    base = CUDAKnobs(threads_x=32, threads_y=2, unroll=SMALL_BATCH_UNROLL, stage_input=True)
    if pixels <= 14 * 14:
        wide = base.with_(threads_y=1, pixels_per_thread=4, channels_per_block=8, channel_slots=8, stage_channels=64,
                          nonzero_split=4)
        narrow = wide.with_(channels_per_block=4, channel_slots=4)
    elif pixels <= 28 * 28:
        wide = base.with_(pixels_per_thread=4, channels_per_block=8, channel_slots=8, stage_channels=32)
        narrow = wide.with_(pixels_per_thread=2)
    else:  # 56x56 with few channels: one warp of 8 pixels a thread per slot, nonzeros over 2 slices (stgP: 11.8 -> 9.5)
        wide = base.with_(threads_y=1, pixels_per_thread=8, channels_per_block=8, channel_slots=8, stage_channels=32,
                          nonzero_split=2)
        narrow = wide.with_(pixels_per_thread=4)
    wide_geo = StagedGeometry(spec, wide)
    blocks = wide_geo.BANDS * wide_geo.KG
    cands = ([wide] if blocks >= STAGED_MIN_BLOCKS else []) + [narrow]
    for k in cands:
        try:
            geo = StagedGeometry(spec, k)
        except ValueError:
            continue
        if geo.shared_bytes(_longest_run(spec, weight, geo)) <= PORTABLE_SHARED_BYTES:
            return k
    return None


def _longest_run(spec: ConvSpec, weight, geo: StagedGeometry) -> int:
    """The most nonzeros a block stages in one round: counted where the weight is at hand, else (a cost rule
    given the nonzero count only, scripts/summarize_choice.py) its mean + 4 sqrt(mean) + 16, which bounds the
    count on the 8 layers the rule takes (magnitude-pruned to 90%: 1.04-1.25x the mean)."""
    if hasattr(weight, "row_ptr"):
        return longest_run(staged_run_ptr(weight, geo), geo)
    mean = geo.KB * weight.nnz * min(geo.CC, spec.C) / (spec.K * spec.C)
    return int(mean + 4 * mean ** 0.5 + 16)


def _small_batch_latency(spec: ConvSpec, weight: SparseConvWeight, k: CUDAKnobs) -> CUDAKnobs:
    """Batch-1-style knobs: more nonzeros in flight per thread and more threads per channel (rule above)."""
    k = k.with_(unroll=SMALL_BATCH_UNROLL)
    if any(spec.pad) and spec.KH * spec.KW <= MASK_TAPS:
        k = k.with_(pad_on_chip=True, tap_mask=True)
    elif any(spec.pad):
        # Compare-based predicates (H200, batch 1, docs/bench/csr_b1 and sm_b1): 3-11% faster than the pad op
        # on padded 13x13/14x14 outputs under 2^17 nonzeros, slower on larger outputs and weights.
        k = k.with_(pad_on_chip=weight.nnz < 1 << 17 and spec.OH * spec.OW <= 14 * 14)
    base = SparseConvCUDA.warps(spec, k)
    for ks in (8, 4, 2):
        if base * ks <= FILL_WARPS and k.threads_x * k.threads_y * ks <= SPLIT_BLOCK_THREADS:
            return k.with_(nonzero_split=ks)
    return k


def _reads_clamped(spec: ConvSpec) -> bool:
    """Threads past the output edge read clamped pixels instead of a zero border: only where the conv has
    no padding of its own (else the pad op is needed anyway and the border comes with it)."""
    return not any(spec.pad)


def _reads_predicated(spec: ConvSpec, k: CUDAKnobs) -> bool:
    return k.pad_on_chip and not _reads_clamped(spec)


TAP_SHIFT = 24  # packed offset: bits 0-23 the unpadded offset; 24-27 kh * dh, 28-31 kw * dw
MASK_TAPS = 32  # tap_mask: one bit per kernel position in an int32
# tap_mask packs offset << MASK_SHIFT | kh * KW + kw: the bit test is mask & (1 << (o & 31)) (SHF.L.W, whose shift
# amount wraps at 32, and a LOP3 into a predicate) and the offset one shift folded into the address (LEA.HI), where
# the index in the top byte took 3 + 2 instructions per nonzero and pixel (notes/cuda-sparse-conv.md, twelfth session)
MASK_SHIFT = 5
TAP_BIT = "#define escort_tap_bit(m, o) ((m) & (1 << ((o) & 31)))\n"


def _packed_offsets(spec: ConvSpec, weight: SparseConvWeight, offsets, tap_mask: bool = False):
    """Offsets into the plain (C, H, W) input with each nonzero's kernel position in the top byte: its row and
    column scaled by the dilation, or (``tap_mask``) its index kh * KW + kw."""
    import numpy as np

    (dh, dw) = spec.dilation
    limit = 31 - MASK_SHIFT if tap_mask else TAP_SHIFT
    if spec.C * spec.H * spec.W >= 1 << limit:
        raise ValueError(f"pad_on_chip packs offsets below 2^{limit}: {spec.describe()} has C*H*W = "
                         f"{spec.C * spec.H * spec.W}")
    if tap_mask and spec.KH * spec.KW > MASK_TAPS:
        raise ValueError(f"tap_mask keeps one bit per kernel position in {MASK_TAPS} bits: {spec.describe()} has "
                         f"{spec.KH * spec.KW}")
    if not tap_mask and ((spec.KH - 1) * dh > 15 or (spec.KW - 1) * dw > 15):
        raise ValueError(f"pad_on_chip packs (kh, kw) * dilation below 16: {spec.describe()} does not fit")
    if weight.nnz == 0:
        return offsets
    kh, kw = weight.kh.astype(np.int64), weight.kw.astype(np.int64)
    if tap_mask:
        return ((offsets.astype(np.int64) << MASK_SHIFT) | (kh * spec.KW + kw)).astype(np.int32)
    tap = (kh * dh << TAP_SHIFT) | (kw * dw << (TAP_SHIFT + 4))
    return (offsets.astype(np.int64) | tap).astype(np.uint32).view(np.int32)


def _cuda_kernel(spec: ConvSpec, nnz: int, epilogue: Epilogue, hp: int, wp: int, extra: int, k: CUDAKnobs):
    from tvm.script import tirx as T

    N, K, OH, OW = spec.output_shape
    NP = N + extra
    sh, sw = spec.stride
    CHW = spec.C * hp * wp
    TX, TY, VW, VN, KB, CH = (k.threads_x, k.threads_y, k.pixels_per_thread, k.images_per_thread,
                              k.channels_per_block, k.chunk)
    KS, U = k.nonzero_split, k.unroll
    NT0 = TX * TY  # threads of one slice
    NT = NT0 * KS
    A = VN * VW  # accumulators per thread
    COLS = -(-OW // (TX * VW))  # column tiles per row tile
    TILES = COLS * -(-OH // TY)
    KG = -(-K // KB)
    NG = -(-N // VN)  # (NP // VN where the images are padded; with clamped reads the last group is ragged)
    LOADS = -(-CH // NT)
    relu, res = epilogue.relu, epilogue.residual
    clamp, predicated = _reads_clamped(spec), _reads_predicated(spec, k)
    masked = predicated and k.tap_mask
    pt, pl = spec.pad[0], spec.pad[1]
    (dh, dw) = spec.dilation
    GRID = NG * KG * TILES * NT  # threads of the grid
    LINES_X, LINES_W = -(-NP * CHW // 32), -(-nnz // 32)  # 128-byte lines of the input and of each CSR array

    def in_image(oh, ow0, v, dy, dx):
        """Whether pixel v of the thread reads inside the image at (dy, dx) = (kh * dh, kw * dw) from its corner."""
        from tvm import tirx

        ih, iw = oh * sh - pt + dy, (ow0 + v * TX) * sw - pl + dx
        return tirx.all(ih >= 0, ih < spec.H, iw >= 0, iw < spec.W)

    def inside_bit(oh, ow0, v, kh, kw):
        """Bit kh * KW + kw of pixel v's mask: set where that kernel position reads inside the image."""
        from tvm import tirx

        bit = tirx.const(1, "int32") << (kh * spec.KW + kw)
        return tirx.if_then_else(in_image(oh, ow0, v, kh * dh, kw * dw), bit, tirx.const(0, "int32"))

    def tap_value(x, masks, ng, i, oh, ow0, v, off):
        """The input a thread's accumulator (i, v) multiplies by the nonzero at (stretched) offset ``off``."""
        if not (clamp or predicated):
            return x[ng * VN + i, off + oh * (sh * wp) + ow0 * sw + v * (TX * sw)]
        from tvm import tirx

        if clamp:
            return x[tirx.min(ng * VN + i, N - 1),
                     off + tirx.min(oh, OH - 1) * (sh * wp) + tirx.min(ow0 + v * TX, OW - 1) * sw]
        inside = in_image(oh, ow0, v, (off >> TAP_SHIFT) & 15, (off >> (TAP_SHIFT + 4)) & 15)
        return tirx.if_then_else(inside, plain_read(x, ng, i, oh, ow0, v, off & ((1 << TAP_SHIFT) - 1)),
                                 tirx.const(0.0, "float32"))

    def plain_read(x, ng, i, oh, ow0, v, rel):
        """pad_on_chip: the plain input at offset ``rel`` from pixel v's first kernel position (which may lie in
        the padding: read only where the tap is inside the image)."""
        from tvm import tirx

        return x[tirx.min(ng * VN + i, N - 1), rel + (oh * sh - pt) * wp + (ow0 + v * TX) * sw - pl]

    def tap_bit(mask, off):
        """tap_mask: 1 where the nonzero's kernel position reads inside the image for this pixel, else 0."""
        from tvm.backend.cuda.op import cuda_func_call

        return cuda_func_call("escort_tap_bit", mask, off, return_type="int32", source_code=TAP_BIT)

    @T.macro
    def fma_nonzero(acc, masks, x, ng, oh, ow0, s_nz, j, nz):
        if masked:  # (a shared load may not sit in a condition: the nonzero goes through registers)
            nz[0] = s_nz[2 * j]
            nz[1] = s_nz[2 * j + 1]
        for i in T.unroll(VN):
            for v in T.unroll(VW):
                if masked:  # a predicated load and FMA, nothing where the bit is clear
                    if tap_bit(masks[v], nz[0]) != 0:
                        acc[i * VW + v] = acc[i * VW + v] + T.reinterpret("float32", nz[1]) * plain_read(
                            x, ng, i, oh, ow0, v, nz[0] >> MASK_SHIFT)
                else:
                    acc[i * VW + v] = acc[i * VW + v] + T.reinterpret("float32", s_nz[2 * j + 1]) * tap_value(
                        x, masks, ng, i, oh, ow0, v, s_nz[2 * j])

    @T.prim_func(s_tir=True)
    def sparse_conv2d_cuda(x: T.Buffer((NP, CHW), "float32"), row_ptr: T.Buffer((K + 1,), "int32"),
                           offset: T.Buffer((nnz,), "int32"), value: T.Buffer((nnz,), "float32"),
                           bias: T.Buffer((K,), "float32"), residual: T.Buffer((N, K, OH, OW), "float32"),
                           y: T.Buffer((N, K, OH, OW), "float32")):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        for ng in T.thread_binding(NG, thread="blockIdx.z"):
            for kg in T.thread_binding(KG, thread="blockIdx.y"):
                for tile in T.thread_binding(TILES, thread="blockIdx.x"):
                    for tz in T.thread_binding(KS, thread="threadIdx.z"):
                        for ty in T.thread_binding(TY, thread="threadIdx.y"):
                            for tx in T.thread_binding(TX, thread="threadIdx.x"):
                                with T.sblock("conv"):
                                    if res:
                                        T.reads(x[0:NP, 0:CHW], row_ptr[0:K + 1], offset[0:nnz], value[0:nnz],
                                                bias[0:K], residual[0:N, 0:K, 0:OH, 0:OW])
                                    else:
                                        T.reads(x[0:NP, 0:CHW], row_ptr[0:K + 1], offset[0:nnz], value[0:nnz],
                                                bias[0:K])
                                    T.writes(y[0:N, 0:K, 0:OH, 0:OW])
                                    # the staged nonzeros as (offset, value bits) pairs: one 8-byte shared load each
                                    s_nz = T.alloc_buffer((2 * CH,), "int32", scope="shared")
                                    if KS > 1:
                                        s_part = T.alloc_buffer((k.partial_sum_floats(),), "float32", scope="shared")
                                    acc = T.alloc_buffer((A,), "float32", scope="local")
                                    masks = T.alloc_buffer((VW,), "int32", scope="local")
                                    nz = T.alloc_buffer((2,), "int32", scope="local")  # a nonzero (offset, value bits)
                                    lid = (tz * TY + ty) * TX + tx
                                    if k.prefetch_l2:  # line gid (and every GRID-th after it) of each array
                                        gid = ((ng * KG + kg) * TILES + tile) * NT + lid
                                        for r in T.unroll(-(-LINES_X // GRID)):
                                            if gid + r * GRID < LINES_X:
                                                T.evaluate(l2_prefetch(T.address_of(
                                                    x[(gid + r * GRID) * 32 // CHW, (gid + r * GRID) * 32 % CHW])))
                                        for r in T.unroll(-(-LINES_W // GRID)):
                                            if gid + r * GRID < LINES_W:
                                                T.evaluate(l2_prefetch(T.address_of(offset[(gid + r * GRID) * 32])))
                                                T.evaluate(l2_prefetch(T.address_of(value[(gid + r * GRID) * 32])))
                                    oh = (tile // COLS) * TY + ty
                                    ow0 = (tile % COLS) * (TX * VW) + tx
                                    if masked:
                                        for v in T.unroll(VW):
                                            masks[v] = 0
                                            for kh in T.unroll(spec.KH):
                                                for kw in T.unroll(spec.KW):
                                                    masks[v] = masks[v] | inside_bit(oh, ow0, v, kh, kw)
                                    start = row_ptr[kg * KB]
                                    end = row_ptr[T.min(kg * KB + KB, K)]
                                    if end - start <= CH:  # the whole group fits: stage it once
                                        for i in T.serial(LOADS):
                                            if i * NT + lid < end - start:
                                                s_nz[2 * (i * NT + lid)] = offset[start + i * NT + lid]
                                                s_nz[2 * (i * NT + lid) + 1] = T.reinterpret(
                                                    "int32", value[start + i * NT + lid])
                                        T.tvm_storage_sync("shared")
                                    for kb in T.serial(KB):
                                        for a in T.unroll(A):  # slice 0 starts from the bias, the others from 0
                                            acc[a] = T.if_then_else(tz == 0, bias[T.min(kg * KB + kb, K - 1)],
                                                                    T.float32(0))
                                        lo = row_ptr[T.min(kg * KB + kb, K)] - start
                                        hi = row_ptr[T.min(kg * KB + kb + 1, K)] - start
                                        # (a loop starting at lo // CH lost that start in the j bounds below
                                        # after TVM's loop normalisation, so start at 0 and skip instead)
                                        for c in T.serial((hi + (CH - 1)) // CH):
                                            if c >= lo // CH and end - start > CH:  # block-uniform: stage chunk c
                                                T.tvm_storage_sync("shared")
                                                for i in T.serial(LOADS):
                                                    if i * NT + lid < CH and start + c * CH + i * NT + lid < end:
                                                        s_nz[2 * (i * NT + lid)] = offset[start + c * CH + i * NT + lid]
                                                        s_nz[2 * (i * NT + lid) + 1] = T.reinterpret(
                                                            "int32", value[start + c * CH + i * NT + lid])
                                                T.tvm_storage_sync("shared")
                                            j0 = T.max(lo - c * CH, 0)
                                            if KS == 1 and U == 1:
                                                for j in T.serial(j0, T.min(hi - c * CH, CH)):
                                                    fma_nonzero(acc, masks, x, ng, oh, ow0, s_nz, j, nz)
                                            else:
                                                # slice tz takes every KS-th nonzero; U loads issue before their FMAs
                                                cnt = (T.max(T.min(hi - c * CH, CH) - j0, 0) - tz + (KS - 1)) // KS
                                                for t in T.serial(cnt // U):
                                                    for u in T.unroll(U):
                                                        fma_nonzero(acc, masks, x, ng, oh, ow0, s_nz,
                                                                    j0 + tz + KS * (t * U + u), nz)
                                                for t in T.serial(cnt % U):
                                                    fma_nonzero(acc, masks, x, ng, oh, ow0, s_nz,
                                                                j0 + tz + KS * ((cnt // U) * U + t), nz)
                                        if KS > 1:  # slices 1.. hand their sums to slice 0 through shared memory
                                            T.tvm_storage_sync("shared")
                                            if tz > 0:
                                                for a in T.unroll(A):
                                                    s_part[((tz - 1) * A + a) * NT0 + ty * TX + tx] = acc[a]
                                            T.tvm_storage_sync("shared")
                                            if tz == 0:
                                                for z in T.unroll(KS - 1):
                                                    for a in T.unroll(A):
                                                        acc[a] = acc[a] + s_part[(z * A + a) * NT0 + ty * TX + tx]
                                        for i in T.unroll(VN):
                                            for v in T.unroll(VW):
                                                if (tz == 0 and kg * KB + kb < K and ng * VN + i < N and oh < OH
                                                        and ow0 + v * TX < OW):
                                                    if res:
                                                        acc[i * VW + v] = acc[i * VW + v] + residual[
                                                            ng * VN + i, kg * KB + kb, oh, ow0 + v * TX]
                                                    if relu:
                                                        y[ng * VN + i, kg * KB + kb, oh, ow0 + v * TX] = T.max(
                                                            acc[i * VW + v], T.float32(0))
                                                    else:
                                                        y[ng * VN + i, kg * KB + kb, oh, ow0 + v * TX] = acc[i * VW + v]

    return drop_unused_residual(sparse_conv2d_cuda, epilogue)
