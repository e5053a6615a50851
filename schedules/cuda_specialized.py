"""CUDA kernel specialised to one pruned weight tensor: nonzeros as immediates, no index arrays.

Block = (tile of ``threads_y`` x ``threads_x`` threads, one group of output channels, one image),
optionally ``channel_split`` slices deep; thread = ``rows_per_thread`` output pixels of one column x
``channels_per_thread`` channels in registers. ``blockIdx.z`` (the slowest grid index, so resident
blocks share code) selects the group's code through a binary tree of block-uniform branches; each
group's code is the straight-line list of ``schedules.unrolled``, emitted as inline-PTX blocks
(``schedules.ptx_taps``): per distinct input element one load, then one FMA per (row, channel) that
has a nonzero there. With ``stage_input`` the input tile and its halo are staged in shared memory,
``channel_chunk`` input channels at a time (the next chunk prefetched into registers), zero-filled
outside the image (this is where the padding happens: no pad op, no predicate in the inner code), and
every tap is a shared load at an immediate offset from one per-thread base. Without staging, taps are
global loads, predicated only where the conv pads. A 1x1 stride-1 unpadded conv is run as one long
row of pixels (flat mode), which may run on across the batch (``span_images``); with ``image_tile`` a
block instead covers one whole image, one thread per output pixel. The ``channel_split`` slices of a
block take different input channels and add their partial sums through shared memory. A large layer
is cut into several kernels (``kernel_parts``, over output channels; ``input_parts``, over input ones).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from escort_tvm.compute import Epilogue
from escort_tvm.conv_spec import ConvSpec
from escort_tvm.sparse_format import SparseConvWeight

from . import ptx_taps, split_blocks, work_queue
from .cuda import staged_batch1_knobs
from .base import LARGE_BATCH, KernelPlan, Knobs, SparseConvRule
from .unrolled import ChannelGroup, unrolled_program

SHARED_LIMIT = 48 * 1024  # static shared memory per block without opt-in
SMS = 132  # H200 (and H100 SXM): the rules' wave counts
WARPS_TO_FILL = SMS * 16  # 16 resident warps per SM hide most load latency
# Code size grows with the nonzeros (one FMA instruction each), and so does compile time: with PTX
# blocks ~0.07 ms of TVM lowering and ~0.2 ms of nvcc (mostly ptxas) per nonzero in kernels of
# KERNEL_NONZEROS on the 2-core build machine, more in larger ones (docs/notes/specialized-codegen.md).
# A layer is cut into kernels of about KERNEL_NONZEROS (see kernel_parts); above MAX_NONZEROS (VGG-16's
# 512x512x3x3 layers at 90% have 236k) the rule refuses and the layer takes the CSR kernel.
KERNEL_NONZEROS = 16384
# A kernel part may grow to this many times KERNEL_NONZEROS to fill the GPU. 4 cost batch 32 dearly
# (vgg16.conv5_2 0.40 -> 0.65 ms, resnet50.l4.3x3 0.19 -> 0.27 ms: more, smaller launches); 16 leaves every
# bench layer uncapped and only bounds batch-1 builds, which the cost rule keeps on CSR above 32768 anyway.
PART_GROWTH = 16
MAX_NONZEROS = 262144
# Nonzeros one kernel function may hold before the default cuts the input channels into launches
# (input_parts) to bring each under FUNCTION_NONZEROS: nvcc's front end (cicc) and ptxas are superlinear in a
# function's size. ResNet-50's layer4 downsample (1x1 stride 2, 209k nonzeros at 90%) was one function at
# batch 32 (7x7 outputs: every group is needed to fill the GPU, so kernel_parts cannot cut it), and cicc ran
# 16 minutes on it before it was stopped; the same layer's 3x3 conv, cut in 4 launches of 59k, took 189 s.
# At batch 8 the same downsample as one function ran cicc 19 minutes before it was stopped (the 236k 3x3
# layers there: 200-311 s each as one function, docs/bench/b8; 425 s at batch 4), so the cut applies from
# ALL_LAYERS_BATCH (below), where every layer becomes a candidate. Not at batch 1, where vgg16.conv4_2 (236k,
# 16 channels per thread) compiled in 234 s as one function and was measured that way
# (docs/bench/b1_final_conv4_2).
FUNCTION_NONZEROS = 1 << 16
# Where the specialised kernel pays (H200, docs/benchmarks.md): at batch 32 it beat the CSR kernel on
# all 16 bench layers (2-8x); at batch 1 it won every layer up to 30720 nonzeros. Larger layers at batch
# 1, since the grid runs one group's blocks together (bench/b1_big, b1_final_conv*): where an image has
# many output pixels, many warps run each group's code and it wins big: vgg16.conv3_2 (58982 nonzeros,
# 56x56 outputs) 72.9 vs 177.5 us on CSR + pad, vgg16.conv4_2 (235930, 28x28) 70.5 vs 186.8 us (234 s
# of compile). On 13x13/14x14 outputs it is only 10% faster (alexnet.conv3 20.5 vs 23.0 us,
# resnet50.l3.3x3 22.2 vs 24.5) for 1.5-4 minutes of ptxas each, which a ResNet-50 build would pay six
# times: those stay on CSR. At batch 8 (docs/bench/b8, all 16 layers side by side) the CSR kernel gains
# almost nothing from its 8 images (alexnet.conv3 147.7 us against 21.7 at batch 1) while the specialised kernel
# runs 8 images in 2-4x its batch-1 time: it wins every layer, 1.65-7.1x, the 7 that batch 1 keeps on CSR by
# 1.8-5.3x (vgg16.conv5_2 101 vs 188 us, resnet50.l4.3x3 64 vs 115, l3.3x3 36 vs 185). At batch 4 (docs/bench/b4,
# those 7) it wins them all by 1.57-2.36x. So from ALL_LAYERS_BATCH on it takes every layer; batches 2-3 are not
# measured and take the batch-1 rule.
SMALL_BATCH_MAX_NONZEROS = 32768
ALL_LAYERS_BATCH = 4
# An unstaged padded conv reads its taps from one base address per kernel position (kh, kw), each pointing at
# the input or, where that position falls in the padding, at a zero page (a zeroed C*H*W array): no predicate,
# no pad op. Two registers per base, so up to 5x5 kernels; larger ones keep predicated loads.
ZERO_PAGE_TAPS = 25
# Where the row layout (span_knobs) replaces staged tiles at batch >= LARGE_BATCH: (most kernel positions, most
# output pixels per image). At batch 32 (H200, against the staged default in the same call; notes v16-v17):
# up to 14x14 with up to 5x5 kernels (docs/bench/span3_b32: alexnet.conv3-5 (13x13) -17..-35%, resnet50.l3.3x3 (14x14)
# -13%, vgg16.conv5_2 -6%, resnet50.l4.3x3 (7x7) -12%), and up to 112x112 with 3x3 kernels (docs/bench/row28, row56:
# vgg16.conv4_2 (28x28) -10%, resnet50.l2.3x3 -4%, vgg16.conv3_2 (56x56) -19%, all three with sm_affine; conv2_2
# (112x112) -9%); a 5x5 kernel on 27x27 was 4% slower (alexnet.conv2: the staged tile serves each element to 25
# taps), so it stays staged; 224x224 (vgg16.conv1_2) is not measured in the row layout.
ROW_LAYOUT = ((5 * 5, 14 * 14), (3 * 3, 112 * 112))
# A staged chunk's element with evict_first: loaded with __ldcs (SASS LDG.E.EF) where it lies in the image, else 0.
LDCS_OR_ZERO = "#define escort_ldcs_or_zero(c, p) ((c) ? __ldcs(p) : 0.0f)\n"
# The SM a block runs on (rotate_chunks' offset: blocks resident on one SM share it, and so their fetched code)
SMID = ("static __device__ __forceinline__ int escort_smid() { unsigned s_; "
        "asm volatile(\"mov.u32 %0, %%smid;\" : \"=r\"(s_)); return (int)s_; }\n")
# At batch 1 the staged tiles are bound by instruction fetch (ncu on vgg16.conv2_2, docs/bench/final_b1: 9.7 of
# 14.1 cycles per issued instruction stall on "no instruction"; the L2 flush leaves the code in HBM). The row
# layout, with sm_affine where a group has many work items (its blocks then share one SM's instruction cache),
# measured against the tiles in one call (H200, docs/bench/b1x): vgg16.conv2_2 (112x112) 46.3 -> 31.7 us,
# conv3_2 (56x56) 51.0 -> 43.3 (sm_affine -9% on both), resnet50.l2.3x3 (28x28, 7 items per group) 16.3 -> 13.3
# without sm_affine (+56% with it). alexnet.conv2 (5x5, 27x27) and the 1x1 rows stay (span 12% slower on conv2;
# sm_affine 2-18x slower on the 1x1s). Above ROW_BATCH1_NONZEROS the row layout is one function too large to
# compile (vgg16.conv4_2, 236k: cicc still running after 16 minutes), so those keep tiles.
ROW_BATCH1_PIXELS = (28 * 28, 112 * 112)
ROW_BATCH1_NONZEROS = 65536
ROW_BATCH1_AFFINE_ITEMS = 16
SM_AFFINE_ITEMS = 1024  # the row layout takes sm_affine up to this many work items per group (see default_knobs)
# The row layout's tap blocks take 16 channels each (one base select per 16 taps instead of 8) up to this many
# output pixels per image: batch 32, against 8 in the same call (docs/bench/exp5, exp6): alexnet.conv3-5 -4..-5%,
# vgg16.conv5_2 -4%, conv4_2 -4%, resnet50.l2.3x3 -3%, l3.3x3 -2%, l4.3x3 -6%, and 25-55% less compile time;
# vgg16.conv3_2 (56x56) +3%.
ROW_WIDE_CHUNK_PIXELS = 28 * 28
LARGE_IMAGE = 28 * 28  # output pixels per image from which a small batch takes any size
STEM_BATCH = 8  # from which the rule takes a network's dense stem (takes_dense; measured at 8 and 32)


@dataclass(frozen=True)
class SpecializedKnobs(Knobs):
    channels_per_thread: int = 8  # accumulators per thread: input reuse across channels vs parallelism
    threads_x: int = 32  # threads along the output row (all threads, in flat mode)
    threads_y: int = 4  # threads along output rows (ignored in flat mode)
    stage_input: bool = True  # input tile + halo through shared memory (else global loads)
    channel_chunk: int = 8  # input channels staged per barrier pair
    prefetch: bool = True  # load the next chunk into registers before computing this one (hides latency)
    channel_split: int = 1  # slices of the block (threadIdx.z) that take every split-th chunk; summed at the end
    rows_per_thread: int = 1  # output rows per thread: a staged input row feeds the kh taps of every row
    group_major: bool = True  # grid runs one group's blocks together (shares code) vs one image's (shares input)
    images_per_block: int = 1  # images a block computes side by side: more warps run each fetched instruction
    # Tiles a block runs in turn through each staged chunk, their accumulators parked in shared memory:
    # a chunk's code (a few KB) is then executed tiles_per_block times back to back from the instruction
    # cache instead of once per block (the large layers stall on instruction fetch; see the notes).
    tiles_per_block: int = 1
    # Kernels the input channels are cut into, launched in turn, each adding its partial sums to y (the last
    # applies the epilogue): a launch runs 1/input_parts of each group's code, so the blocks resident on an SM
    # share a smaller instruction footprint, for one more read and write of y per extra launch.
    input_parts: int = 1
    # Blocks take their work from their SM's home group (schedules.work_queue), so the blocks resident on one
    # SM run one group's code; needs a zeroed int32 array of counters (the plan's one weight array).
    sm_affine: bool = False
    # Flat mode (1x1 stride-1 unpadded): the row of pixels runs on across the batch instead of one tile row per
    # image, so a 7x7 output (49 pixels) does not leave 79 of a 128-thread tile idle. Unstaged KxK convs too
    # (each thread's (image, row, column) from its place in the row), their padding from the zero page (up to
    # ZERO_PAGE_TAPS kernel positions) or the graph's pad op (pad_input).
    span_images: bool = False
    # The graph pads the input (one pad op before the kernel), so an unstaged kernel reads an unpadded conv: its
    # taps are unpredicated loads at immediate offsets (PTX blocks) instead of one guarded C statement each.
    pad_input: bool = False
    # Staged mode: a block covers one whole image with one thread per output pixel, numbered along its rows
    # (threads_x/threads_y ignored), so an output narrower than a 2-D tile leaves no idle columns (13x13 in
    # 16x8 tiles: 66% of the threads busy; 169 threads in 192: 88%).
    image_tile: bool = False
    # Row layout (span_images), stride 1: each thread takes this many neighbouring output pixels of a row, so one
    # vector load (ld.global.nc.v2/v4) brings the inputs of several (pixel, kernel column) taps: 2 loads serve a
    # 3x3 row's 3 columns for 2 pixels where 6 scalar loads did (a padded conv then takes pad_input: the zero page
    # is chosen per pixel and kernel position, which neighbouring pixels do not share). Slower on every bench layer
    # tried at batch 32 (the code per group doubles; notes v18), so no default takes it: a knob for the tuner.
    pixels_per_thread: int = 1
    # The input's global loads (unstaged: the taps; staged: the chunk copies) are marked evict-first (ld.global.cs):
    # for a kernel that reads each input element once (one group of a 1x1 row), so the stream neither waits on nor
    # displaces cached lines.
    evict_first: bool = False
    # Blocks the input channels are cut into within one launch (schedules.split_blocks): each block of a work item
    # runs 1/block_split of its group's code on its own run of channel chunks, leaves its partial sums in a global
    # workspace, and the last of them to finish adds them up and applies the epilogue, so a block can hold a whole
    # image while the grid still fills the GPU. At batch 1 (notes v20) 8-12% faster than the default tiles on 14x14
    # outputs (still behind the CSR kernel there), slower on larger outputs and the 1x1 rows: a knob for the tuner.
    block_split: int = 1
    # Every thread first asks L2 for one 128-byte line of the input (the grid covers all of it), so the chunk
    # loads and taps that follow find it there instead of each waiting for HBM when first touched. A wash at
    # batch 1 (notes/specialized-codegen.md v20): no default takes it; a knob for the tuner.
    prefetch_l2: bool = False
    # Each block walks its channel chunks starting at a different one (an offset from the SM it runs on), so the
    # SMs running one group fetch different parts of the group's code at once: with the code cold in HBM (the
    # first wave; the L2 flushed before every timed call), they all waited on the same line.
    rotate_chunks: bool = False
    SPACE: ClassVar = {
        "channels_per_thread": (1, 2, 4, 8, 16, 32, 48, 64),
        "threads_x": (8, 16, 32, 64, 128),
        "threads_y": (1, 2, 4, 8, 16),
        "stage_input": (True, False),
        "channel_chunk": (4, 8, 16, 32),
        "prefetch": (True, False),
        "channel_split": (1, 2, 4, 8),
        "rows_per_thread": (1, 2, 4),
        "group_major": (True, False),
        "images_per_block": (1, 2, 4),
        "tiles_per_block": (1, 2, 4),
        "input_parts": (1, 2, 4, 8),
        "sm_affine": (False, True),
        "span_images": (False, True),
        "pad_input": (False, True),
        "image_tile": (False, True),
        "pixels_per_thread": (1, 2, 4),
        "evict_first": (False, True),
        "block_split": (1, 2, 4, 8),
        "prefetch_l2": (False, True),
        "rotate_chunks": (False, True),
    }

    def validate(self) -> None:
        super().validate()
        if not 32 <= self.threads_x * self.threads_y <= 1024:
            raise ValueError(f"threads_x*threads_y={self.threads_x * self.threads_y} must be in [32, 1024]")
        depth = self.channel_split * self.images_per_block
        if self.threads_x * self.threads_y * depth > 1024:
            threads = self.threads_x * self.threads_y * depth
            raise ValueError(f"threads_x*threads_y*channel_split*images_per_block={threads} exceeds 1024 threads "
                             "per block")
        if self.rows_per_thread > 1 and not self.stage_input:
            raise ValueError("rows_per_thread > 1 needs stage_input (rows share staged input)")
        if self.tiles_per_block > 1 and not self.stage_input:
            raise ValueError("tiles_per_block > 1 needs stage_input (the tiles loop inside the staged chunk loop)")
        if self.tiles_per_block > 1 and self.channel_split * self.images_per_block > 1:
            raise ValueError("tiles_per_block > 1 needs channel_split == images_per_block == 1 (their shared "
                             "memory holds the parked accumulators)")
        if self.span_images and (self.stage_input or self.images_per_block > 1):
            raise ValueError("span_images needs stage_input=False and images_per_block == 1 (the pixel row, not "
                             "the grid, runs over the images)")
        if self.pad_input and self.stage_input:
            raise ValueError("pad_input needs stage_input=False (a staged kernel pads on chip, for free)")
        if self.span_images and self.image_tile:
            raise ValueError("span_images and image_tile are two different layouts of the threads")
        if self.pixels_per_thread > 1 and not self.span_images:
            raise ValueError("pixels_per_thread > 1 needs span_images (the row layout: unstaged, threads along a row "
                             "of pixels)")
        if self.block_split > 1 and (self.sm_affine or self.tiles_per_block > 1):
            raise ValueError("block_split > 1 needs sm_affine=False and tiles_per_block == 1 (a work item's blocks are "
                             "found by their grid index; each stores its partial sums once)")
        if self.image_tile and (self.rows_per_thread > 1 or self.tiles_per_block > 1):
            raise ValueError("image_tile needs rows_per_thread == tiles_per_block == 1 (one thread per pixel of "
                             "one image)")


@dataclass(frozen=True)
class _Geometry:
    """Output pixels as the kernel tiles them (flat mode: one row of OH*OW pixels)."""

    flat: bool
    OH: int
    OW: int
    TX: int
    TY: int
    PY: int = 1  # output rows per thread
    # Thread tiles per block, run in turn: stacked down the rows (flat mode: along the row) where the image
    # has that many, else one per image (small images: 7x7 to 14x14 outputs)
    TB: int = 1
    row_images: int = 1  # flat mode: images along the pixel row (N with span_images)
    linear: bool = False  # image_tile: threads numbered along the image's rows, TX = all of them, TY = 1
    span_ow: int = 0  # span_images on a KxK conv: the row is OH*OW pixels per image, row r // span_ow of it
    PX: int = 1  # row layout: neighbouring pixels of the row per thread

    @classmethod
    def of(cls, spec: ConvSpec, k: SpecializedKnobs) -> "_Geometry":
        flat = is_flat(spec)
        if flat:
            return cls(True, 1, spec.OH * spec.OW, k.threads_x * k.threads_y, 1, 1, k.tiles_per_block,
                       row_images=spec.N if k.span_images else 1, PX=k.pixels_per_thread)
        if k.span_images:  # a KxK conv's pixels as one row running on across the batch, like flat mode's
            return cls(False, 1, spec.OH * spec.OW, k.threads_x * k.threads_y, 1, row_images=spec.N, span_ow=spec.OW,
                       PX=k.pixels_per_thread)
        if k.image_tile:
            return cls(False, spec.OH, spec.OW, -(-spec.OH * spec.OW // 32) * 32, 1, linear=True)
        return cls(False, spec.OH, spec.OW, k.threads_x, k.threads_y, k.rows_per_thread, k.tiles_per_block)

    @property
    def spans(self) -> bool:
        """Threads take their (image, pixel) from their place in a row over the batch (a KxK row even at N=1)."""
        return self.row_images > 1 or self.span_ow > 0

    @property
    def NT(self) -> int:
        """Threads of one tile."""
        return self.TX * self.TY

    @property
    def stack_images(self) -> bool:
        """The block's tiles are images (the image is too small to stack TB tiles in it)."""
        along = -(-self.OW // (self.TX * self.PX)) if self.flat else -(-self.OH // (self.TY * self.PY))
        return self.TB > 1 and along < self.TB

    @property
    def images(self) -> int:
        """Images one block covers in turn."""
        return self.TB if self.stack_images else 1

    @property
    def block_rows(self) -> int:
        if self.linear:
            return self.OH
        return self.TY * self.PY * (1 if self.flat or self.stack_images else self.TB)

    @property
    def block_cols(self) -> int:
        if self.linear:
            return self.OW
        return self.TX * self.PX * (self.TB if self.flat and not self.stack_images else 1)

    @property
    def tiles_x(self) -> int:
        return -(-self.OW * self.row_images // self.block_cols)

    @property
    def tiles(self) -> int:
        """Blocks per (image, group)."""
        return self.tiles_x * -(-self.OH // self.block_rows)

    def blocks_per_group(self, N: int, images_per_block: int) -> int:
        """Blocks (work items) of one channel group over a batch of ``N``."""
        return self.tiles * -(-N // (images_per_block * self.images * self.row_images))

    def halo(self, spec: ConvSpec) -> tuple[int, int]:
        """Rows and columns of the input tile a block stages."""
        (sh, sw), (dh, dw) = spec.stride, spec.dilation
        return ((self.block_rows - 1) * sh + (spec.KH - 1) * dh + 1,
                (self.block_cols - 1) * sw + (spec.KW - 1) * dw + 1)


def staged_floats(spec: ConvSpec, k: SpecializedKnobs) -> int:
    """Shared memory floats of one staged chunk (each thread owns whole slots, so it is rounded up)."""
    geo = _Geometry.of(spec, k)
    rows, cols = geo.halo(spec)
    nt = geo.NT
    return min(k.channel_chunk, spec.C) * -(-rows * cols // nt) * nt


def partial_floats(spec: ConvSpec, k: SpecializedKnobs, rounds: bool) -> int:
    """The split slices' partial sums: in one round, a share from each slice but the one that finishes an
    accumulator; in rounds, one share, which the slices fill in turn."""
    if k.channel_split == 1:
        return 0
    shares = 1 if rounds else k.channel_split - 1
    per_share = k.images_per_block * min(k.channels_per_thread, spec.K) * k.rows_per_thread * k.pixels_per_thread
    return shares * per_share * _Geometry.of(spec, k).NT


def _staging_floats(spec: ConvSpec, k: SpecializedKnobs, rounds: bool) -> int:
    partials = partial_floats(spec, k, rounds)
    if not k.stage_input:
        return partials
    depth = k.channel_split * k.images_per_block * _Geometry.of(spec, k).images
    return max(depth * staged_floats(spec, k), partials)


def reduces_in_rounds(spec: ConvSpec, k: SpecializedKnobs) -> bool:
    """Whether the split's partial sums go through shared memory in channel_split - 1 rounds (two barriers
    each) instead of one: only where one round's KS-1 shares would not fit, e.g. 64 channels per thread split
    4 ways (96 KB), or sm_affine's one int beside a 32-channel 4-way split (48 KB + 4 bytes)."""
    if k.channel_split <= 2:  # one share either way
        return False
    one_round = _staging_floats(spec, k, False) + parked_floats(spec, k) + int(k.sm_affine) + int(k.block_split > 1)
    return one_round * 4 > SHARED_LIMIT


def staging_floats(spec: ConvSpec, k: SpecializedKnobs) -> int:
    """The staging buffer: a chunk per (image, slice), reused for the split slices' partial sums."""
    return _staging_floats(spec, k, reduces_in_rounds(spec, k))


def parked_floats(spec: ConvSpec, k: SpecializedKnobs) -> int:
    """Accumulators parked in shared memory while a block's other tiles run (tiles_per_block > 1)."""
    if k.tiles_per_block == 1:
        return 0
    return k.tiles_per_block * min(k.channels_per_thread, spec.K) * k.rows_per_thread * _Geometry.of(spec, k).NT


def shared_floats(spec: ConvSpec, k: SpecializedKnobs) -> int:
    """Shared memory of a block, in floats (and sm_affine's one int: the work item the block took)."""
    return staging_floats(spec, k) + parked_floats(spec, k) + int(k.sm_affine) + int(k.block_split > 1)


def check_shape(spec: ConvSpec, k: SpecializedKnobs) -> None:
    """Refuse (ValueError, naming the reason) knobs that are valid on their own but not for this conv."""
    geo = _Geometry.of(spec, k)
    if k.rows_per_thread > 1 and geo.flat:
        raise ValueError("rows_per_thread > 1 does not apply to a 1x1 stride-1 unpadded conv (flat mode)")
    if k.span_images and not geo.flat and any(spec.pad) and not k.pad_input and not uses_zero_page(spec, k):
        raise ValueError(f"span_images on a padded {spec.KH}x{spec.KW} conv needs pad_input (over {ZERO_PAGE_TAPS} "
                         "kernel positions there is no zero page; the row's taps are unpredicated loads)")
    if k.pad_input and not any(spec.pad):
        raise ValueError("pad_input applies only to a padded conv")
    if k.evict_first and not k.stage_input and any(spec.pad) and not k.pad_input and not uses_zero_page(spec, k):
        raise ValueError("evict_first marks the PTX tap loads, which a padded conv over "
                         f"{ZERO_PAGE_TAPS} kernel positions reads only with pad_input (else predicated C loads)")
    if k.pixels_per_thread > 1:
        px, row = k.pixels_per_thread, spec.OH * spec.OW if geo.flat else spec.OW
        if not geo.flat and (spec.stride != (1, 1) or spec.dilation != (1, 1)):
            raise ValueError(f"pixels_per_thread={px} needs stride 1 and dilation 1 (neighbouring output pixels read "
                             f"neighbouring inputs); this conv has stride {spec.stride}, dilation {spec.dilation}")
        if row % px:
            raise ValueError(f"pixels_per_thread={px} must divide the row of {row} output pixels (a thread's pixels "
                             "stay in one row of one image)")
        if uses_zero_page(spec, k):
            raise ValueError(f"pixels_per_thread={px} on a padded conv needs pad_input (the zero page is chosen per "
                             "pixel and kernel position)")
    if k.image_tile:
        if geo.flat:
            raise ValueError("image_tile does not apply to a 1x1 stride-1 unpadded conv (flat mode)")
        threads = geo.NT * k.channel_split * k.images_per_block
        if threads > 1024:
            raise ValueError(f"image_tile on {spec.OH}x{spec.OW} outputs needs {threads} threads per block "
                             "(channel_split and images_per_block included; limit 1024)")
    if shared_floats(spec, k) * 4 > SHARED_LIMIT:
        raise ValueError(f"{k} stages {shared_floats(spec, k) * 4} bytes of shared memory "
                         f"(limit {SHARED_LIMIT}) for {spec.describe()}")


def is_flat(spec: ConvSpec) -> bool:
    """A 1x1 stride-1 unpadded conv: its pixels run as one row (flat mode), every tap at the thread's own pixel."""
    return (spec.KH, spec.KW, spec.stride, spec.pad) == (1, 1, (1, 1), (0, 0, 0, 0))


def uses_zero_page(spec: ConvSpec, k: SpecializedKnobs) -> bool:
    """Whether the kernel reads padding from a zero page (see ZERO_PAGE_TAPS): an unstaged padded conv."""
    return not k.stage_input and not k.pad_input and any(spec.pad) and spec.KH * spec.KW <= ZERO_PAGE_TAPS


def _valid(spec: ConvSpec, k: SpecializedKnobs) -> bool:
    """Whether ``k`` is in the knob space and its block within the thread and shared-memory limits."""
    try:
        k.validate()
        check_shape(spec, k)
    except ValueError:
        return False
    return True


def _tall_split_rows(spec: ConvSpec, k: SpecializedKnobs) -> SpecializedKnobs:
    """A row (span_images) split 4+ ways in 256-thread rows where that is valid, else ``k``: each slice's code is then
    run by 8 warps of the block, half the blocks, and the partial sums (96 KB in one round at 32 channels) go in
    rounds. Batch 32, H200, against 128-thread rows in the same call: resnet50.l4.3x3 0.1115 -> 0.0896 ms (-20%;
    64-thread rows +26%, half the split +16%; docs/bench/exp7), resnet50.l4.1x1in 0.0445 -> 0.0393 (-12%; half the
    split 0.0556; docs/bench/ex8). Split 2 ways, doubling the split to take them was 38-142% slower (docs/bench/exp9)."""
    tall = k.with_(threads_y=2)
    return tall if k.span_images and k.channel_split >= 4 and _valid(spec, tall) else k


def _fits(spec: ConvSpec, k: SpecializedKnobs) -> bool:
    """Whether the default rule may take ``k`` in general: valid, and its split's partial sums in one round (rounds
    cost 6-14% where they only made room for sm_affine or 64 channels, notes v17; see default_knobs for the one
    place the rule takes them)."""
    return _valid(spec, k) and not reduces_in_rounds(spec, k)


class SpecializedCUDA(SparseConvRule):
    name = "cuda.specialized"
    kernel = "specialized"
    Knobs = SpecializedKnobs

    def __init__(self, kernel_nonzeros: int = KERNEL_NONZEROS, fill_warps: int = WARPS_TO_FILL):
        self.kernel_nonzeros = kernel_nonzeros  # a layer is cut into kernels of about this many (compile time)
        self.fill_warps = fill_warps  # ... each with enough groups for this many warps (0: cut by nonzeros only)

    def is_target(self, target) -> bool:
        return target.kind.name == "cuda"

    def pays(self, spec: ConvSpec, weight: SparseConvWeight) -> str | None:
        """Whether it beats the CSR kernel by enough to pay for its compile time (the measurements above)."""
        if staged_batch1_knobs(spec, weight) is not None:  # (cuda.py: STAGED_PIXELS, measured at batch 1)
            return (f"cost rule: at batch 1 a stride-1 {spec.KH}x{spec.KW} conv on {spec.OH}x{spec.OW} outputs runs "
                    f"faster on the CSR kernel's staged-input form")
        if spec.N >= ALL_LAYERS_BATCH or weight.nnz <= SMALL_BATCH_MAX_NONZEROS or spec.OH * spec.OW >= LARGE_IMAGE:
            return None
        return (f"cost rule: at batch {spec.N} (< {ALL_LAYERS_BATCH}) a layer of {weight.nnz} nonzeros on "
                f"{spec.OH}x{spec.OW} outputs runs faster on the CSR kernel (or not enough faster specialised to "
                f"pay for its compile time)")

    def takes_dense(self, spec: ConvSpec, weight: SparseConvWeight) -> bool:
        """A network's dense stem (at most 4 input channels: the image) at batch >= STEM_BATCH. Every tap then
        feeds all 32 channels of a thread, and TVM's default dense conv2d schedule is untuned (H200, per call,
        batch 32, docs/bench/e2e7 and e2e8: AlexNet's 11x11 stride-4 conv1 0.303 -> 0.252 ms, GoogLeNet's and
        ResNet-50's 7x7 stride-2 conv1 0.529 -> 0.213 / 0.215 ms, VGG-16's 3x3 conv1_1 0.558 -> 0.157 ms; batch 8,
        docs/bench/e2e11: GoogLeNet's 0.147 -> 0.064 ms, AlexNet's 0.090 -> 0.095, a tie end to end)."""
        return (spec.N >= STEM_BATCH and spec.C <= 4 and spec.groups == 1
                and weight.nnz <= SMALL_BATCH_MAX_NONZEROS)

    @staticmethod
    def _blocks(spec: ConvSpec, k: SpecializedKnobs) -> int:
        """Blocks of the whole grid: work items x channel groups."""
        return _Geometry.of(spec, k).blocks_per_group(spec.N, k.images_per_block) * -(-spec.K // k.channels_per_thread)

    @staticmethod
    def _warps(spec: ConvSpec, k: SpecializedKnobs) -> int:
        """Warps of the whole grid (what the fill rule counts)."""
        geo = _Geometry.of(spec, k)
        return SpecializedCUDA._blocks(spec, k) * (geo.NT * k.channel_split * k.images_per_block // 32)

    @staticmethod
    def _fill(spec: ConvSpec, base: SpecializedKnobs, reuse: bool) -> tuple[int, int]:
        """(channels_per_thread, channel_split): enough warps to fill the GPU (132 SMs x 16), with as many
        channels per thread as that allows; a kernel may split its input channels across channel_split
        slices of the block to get there (batch 1: few pixels, long reductions), keeping 4+ chunks per slice."""
        geo = _Geometry.of(spec, base)
        chunks = -(-spec.Cg // 8)
        # Unstaged (1x1) only at large batch: there it lets 32 channels per thread, and so a quarter of the L2
        # reads of 8, fill the GPU (resnet50.l4.1x1in re-reads its 12.8 MB input once per channel group).
        splittable = reuse or spec.N >= LARGE_BATCH
        splits = [ks for ks in (1, 2, 4, 8) if ks == 1 or (splittable and chunks >= 4 * ks and geo.NT * ks <= 512)]
        for cand in (32, 16, 8, 4, 2):
            warps = [SpecializedCUDA._warps(spec, base.with_(channels_per_thread=cand, channel_split=s))
                     for s in splits]
            if any(w >= WARPS_TO_FILL for w in warps):
                return cand, next(s for s, w in zip(splits, warps) if w >= WARPS_TO_FILL)
        return 1, max(splits)

    def default_knobs(self, spec: ConvSpec, weight: SparseConvWeight) -> SpecializedKnobs:
        flat = is_flat(spec)
        # A conv of at most 64 output channels stays on tiles, where 64 channels per thread make it one group (below):
        # resnet50.l1.3x3 at batch 32 (docs/bench/exp4) 0.035 ms staged against 0.050 in the row layout (0.035 with
        # 64 channels there too); vgg16.conv1_2 0.395 against 0.58-0.64.
        if (spec.N >= LARGE_BATCH and not flat and spec.K > 64
                and any(spec.KH * spec.KW <= taps and spec.OH * spec.OW <= pixels for taps, pixels in ROW_LAYOUT)):
            row = self.span_knobs(spec, weight)
            if spec.OH * spec.OW <= ROW_WIDE_CHUNK_PIXELS:
                row = row.with_(channel_chunk=16)
            tall = _tall_split_rows(spec, row)
            if tall is not row:
                return tall
            # sm_affine where groups are few (v7) and their work items not thousands (vgg16.conv3_2, 784 items per
            # group: -4% on the row layout; conv2_2, 3136: +9%, the atomics queue up; docs/bench/row56), and where its
            # one shared int fits beside the split's partial sums in one round (resnet50.l4.3x3, 4-way split: with the
            # partial sums in rounds to make room, +6%, docs/bench/l4row; with 64-thread rows, +6%)
            affine = row.with_(sm_affine=True)
            items = _Geometry.of(spec, row).blocks_per_group(spec.N, 1)
            if -(-spec.K // row.channels_per_thread) <= 32 and items <= SM_AFFINE_ITEMS and _fits(spec, affine):
                return affine
            return row
        if (spec.N == 1 and not flat and spec.K > 64 and spec.KH * spec.KW <= 3 * 3
                and ROW_BATCH1_PIXELS[0] <= spec.OH * spec.OW <= ROW_BATCH1_PIXELS[1]
                and weight.nnz <= ROW_BATCH1_NONZEROS):
            row = self.span_knobs(spec, weight)
            affine = row.with_(sm_affine=True)
            if _Geometry.of(spec, row).blocks_per_group(1, 1) >= ROW_BATCH1_AFFINE_ITEMS:
                return affine  # (conv3_2's partial sums then take two rounds; measured so)
            return row
        return self.tile_knobs(spec, weight)

    def tile_knobs(self, spec: ConvSpec, weight: SparseConvWeight) -> SpecializedKnobs:
        """The tiled layout: 2-D tiles (staged where taps share input), whole-image blocks, or the flat 1x1 row;
        what every conv takes outside the row layout's reach (ROW_LAYOUT) and at small batch."""
        flat = is_flat(spec)
        if flat:
            tx, ty = 128, 1
        else:
            tx = 32 if spec.OW >= 24 else 16 if spec.OW >= 12 else 8
            ty = max(1, min(128 // tx, 1 << max(0, (spec.OH - 1).bit_length())))
            while tx * ty < 32:
                ty *= 2
        reuse = spec.KH * spec.KW > 1 or spec.stride != (1, 1)
        # Busy threads: a 1x1 flat row runs on across the batch (a 7x7 output is 49 pixels of a 128-thread
        # row: resnet50.l4.1x1in 8% faster at batch 32, l3.1x1out 4%; docs/bench/span_b32), and at large batch a
        # staged output of at most 1024 pixels takes one block of one thread per pixel where 2-D tiles would
        # leave threads idle, if the block stays unsplit and still stages 8 channels per barrier (batch 32,
        # H200, against 2-D tiles in the same run, docs/bench/v8_b32: vgg16.conv5_2 -39%, alexnet.conv2 -20%,
        # alexnet.conv3 -4%: fewer blocks walk each group's code; split in two, alexnet.conv4/5 +7% and
        # resnet50.l3.3x3 +77%, unsplit with fewer channels +31-84% (v8c_b32); 28x28 outputs, whose whole-image
        # halo only fits 4 channels, resnet50.l2.3x3 +15% and vgg16.conv4_2 +35% (v8b_b32)). Small batch keeps
        # its 2-D tiles: 128-thread blocks split 4 ways on a grid of a few blocks.
        image_threads = -(-spec.OH * spec.OW // 32) * 32
        tiled_threads = -(-spec.OH // ty) * ty * -(-spec.OW // tx) * tx
        base = SpecializedKnobs(threads_x=tx, threads_y=ty, stage_input=reuse, span_images=flat and not reuse)
        kg, ks = self._fill(spec, base, reuse)
        if reuse and spec.N >= LARGE_BATCH and image_threads <= 1024 and image_threads < tiled_threads:
            whole = base.with_(image_tile=True)
            kg_whole, ks_whole = self._fill(spec, whole, reuse)
            if ks_whole == 1 and _fits(spec, whole.with_(channels_per_thread=kg_whole, channel_chunk=8)):
                # ... each SM walking its group's chunks from its own first one (rotate_chunks): the first wave
                # no longer waits on one cold code line per group. Batch 32, H200, against the same knobs in
                # one call, twice (docs/bench/rot_b32, rot2_b32): alexnet.conv2 119.4 -> 103.2 and 122.6 -> 107.3
                # us. Only these whole-image blocks (one per SM): on the layouts with several blocks of a group
                # per SM it lost everywhere measured (+21% to 3.4x: notes/specialized-codegen.md v21).
                base, kg, ks = whole.with_(rotate_chunks=True), kg_whole, ks_whole
                # ... and 48 channels a thread where 32 leave a part-filled second wave of these one-per-SM blocks
                # and 48 fit in one: batch 32, H200, same call (docs/bench/c48_b32): alexnet.conv2 (192 -> 128
                # blocks on 132 SMs) 106.9 -> 64.9 us; 64 channels (96 blocks, spilling) 88.0.
                wide = whole.with_(rotate_chunks=True, channels_per_thread=48, channel_chunk=8)
                if (kg == 32 and self._blocks(spec, base.with_(channels_per_thread=32)) > SMS
                        and self._blocks(spec, wide) <= SMS and _fits(spec, wide)):
                    kg = 48
        knobs = base.with_(channels_per_thread=kg, channel_chunk=8, channel_split=ks)
        # 64 channels per thread at batch >= 16 where it still fills the GPU unsplit, on a 1x1 flat row (half the
        # input re-reads and loads per FMA of 32) or where it makes a staged conv one group (its input read once):
        # batch 32, H200, against 32 in the same call (docs/bench/c64_1x1, c64_vgg, c64b): resnet50.l3.1x1out -21%,
        # l1.1x1in a tie (DRAM-bound either way), vgg16.conv1_2 -19%, resnet50.l1.3x3 -13%. Not on staged convs of
        # more groups (128 registers: half the warps; vgg16.conv2_2 +34%, conv3_2 +38%), nor split ones (the split's
        # partial sums then go in rounds: resnet50.l4.1x1in +14%).
        wide = knobs.with_(channels_per_thread=64)
        if (spec.N >= LARGE_BATCH and ks == 1 and (flat or (reuse and spec.K <= 64))
                and self._warps(spec, wide) >= WARPS_TO_FILL and _fits(spec, wide)):
            knobs = wide
        # Evict-first tap loads where the kernel reads each input element once: a 1x1 row whose conv group's output
        # channels are one group. Batch 32, H200, against the default in the same call (docs/bench/x1b, ev_b):
        # resnet50.l1.1x1in 0.0607 -> 0.0389 ms (-36%); where groups re-read the input from L2 or neighbouring taps
        # share L1 lines it loses: l3.1x1out +7%, l4.1x1in +16%, the 3x3 row layouts +17..+57%. Small batch, where
        # these layers take many groups, is not measured.
        if (spec.N >= LARGE_BATCH and flat and not knobs.stage_input
                and -(-(spec.K // spec.groups) // knobs.channels_per_thread) == 1):
            knobs = knobs.with_(evict_first=True)
        while knobs.stage_input and shared_floats(spec, knobs) * 4 > SHARED_LIMIT and knobs.channel_chunk > 4:
            knobs = knobs.with_(channel_chunk=knobs.channel_chunk // 2)
        # a split whose partial sums would need rounds is halved instead (rounds were slower where measured: notes v17)
        while ((shared_floats(spec, knobs) * 4 > SHARED_LIMIT or reduces_in_rounds(spec, knobs))
               and knobs.channel_split > 1):
            knobs = knobs.with_(channel_split=knobs.channel_split // 2)
        # Prefetch holds a chunk's share per thread in registers: worth it up to 32 of them, except with 16+
        # channels per thread in a block split in two, where it costs more occupancy than it hides (batch 32,
        # H200: off is 24-26% faster on all three such layers measured, alexnet.conv4/5 and resnet50.l3.3x3,
        # 79-80 -> 64 registers; on unsplit layers off was 8-15% slower or tied). Split in four
        # (resnet50.l4.3x3) is not measured: ptxas ran 9 minutes on it without prefetch and was stopped.
        # Below batch 16 the grid is small and occupancy is not the limit: vgg16.conv3_2 at batch 1 (split
        # in two, 32 channels) was 8% slower without prefetch (0.0789 vs 0.0729 ms).
        # group_major stays on (vgg16.conv4_2: 2.45 -> 0.90 ms at batch 32 with it and the part sizes);
        # image-major won on vgg16.conv1_2 (0.49 vs 0.66 ms) but lost or tied on most others: a tuning knob.
        fits = staged_floats(spec, knobs) // _Geometry.of(spec, knobs).NT <= 32
        split_wide = knobs.channel_split == 2 and knobs.channels_per_thread >= 16 and spec.N >= 16
        knobs = knobs.with_(prefetch=fits and not split_wide)
        if spec.N >= LARGE_BATCH:  # a 1x1 row split 4+ ways (the KxK rows take it in default_knobs)
            knobs = _tall_split_rows(spec, knobs)
        # Where the fill rule split the chunk loop 4+ ways at large batch, 2 images per block and half the slices:
        # as many warps per block, but each slice's code (the slices walk different chunks) is run by twice the
        # warps. resnet50.l4.3x3 at batch 32 (H200, docs/bench/x3_b32): 0.1322 vs 0.1719 ms (-23%).
        paired = knobs.with_(images_per_block=2, channel_split=knobs.channel_split // 2)
        if spec.N >= LARGE_BATCH and knobs.channel_split >= 4 and _fits(spec, paired):
            knobs = paired
        # Taller blocks at small batch, where they fit the thread and shared-memory limits (batch 1, H200,
        # docs/bench/ip_b1 and sm_b1, two runs each): 6-9% faster on alexnet.conv2, 5-11% on resnet50.l3.1x1out,
        # 1-9% on l1.1x1in, 1-3% on l1.3x3; on 224x224 outputs (vgg16.conv1_2) 1-4% slower, so not there.
        taller = knobs.with_(threads_y=knobs.threads_y * 2)
        if spec.N < LARGE_BATCH and spec.OH * spec.OW <= 56 * 56 and not knobs.image_tile and _fits(spec, taller):
            knobs = taller
        # SM-affine work queues at batch >= 16 (H200, docs/bench/sm_b32a, against the default in
        # the same run): 20-24% faster on the staged layers with at most 256 work items per group (13x13 and
        # 14x14 outputs: alexnet.conv3-5, resnet50.l3.3x3; 4-5% on the 28x28 ones), whose whole grid fits in
        # one wave so that the hardware's dealing gives every SM blocks of several groups; 6% on vgg16.conv3_2
        # (800 items per group), but 9-28% slower on layers with thousands of items on a few counters
        # (vgg16.conv2_2, resnet50.l1.3x3: the atomics queue up) and 8-11% slower on two unstaged 1x1 layers;
        # alexnet.conv2 (5x5, 224 items) +2%, which the rule takes anyway. On layers of 2^17 nonzeros or more
        # ptxas takes far longer on it as one kernel (vgg16.conv4_2 at batch 32: 497 s against 270 s;
        # resnet50.l4.3x3 and vgg16.conv5_2 were still in ptxas after 15 minutes and were stopped), so there it
        # comes with the input cut into 4 launches (input_parts), which also bounds ptxas (vgg16.conv5_2: 290 s
        # against 1045 s for the default): 12% faster on vgg16.conv5_2 and 7% on resnet50.l4.3x3 (64 and 32
        # items per group; docs/bench/smip_b32), 12% slower on vgg16.conv4_2 (224 items), so up to 64 items.
        geo = _Geometry.of(spec, knobs)
        items = geo.blocks_per_group(spec.N, knobs.images_per_block)
        if (spec.N >= LARGE_BATCH and knobs.stage_input and not geo.flat and items <= 256
                and -(-spec.K // knobs.channels_per_thread) <= 32):
            if weight.nnz < 1 << 17:
                affine = knobs.with_(sm_affine=True)
            elif items <= 64 and spec.Cg >= 4 * knobs.channel_chunk:
                affine = knobs.with_(sm_affine=True, input_parts=4)
            else:
                affine = knobs
            knobs = affine if _fits(spec, affine) else knobs
        return self._cut_functions(spec, weight, knobs)

    def span_knobs(self, spec: ConvSpec, weight: SparseConvWeight) -> SpecializedKnobs:
        """The row layout for a KxK conv: unstaged, the output pixels of the whole batch as one row (every thread
        busy, where 2-D tiles of a 7x7 to 14x14 output leave 23-34% idle), every tap an unpredicated global load at
        an immediate offset (padding from the zero page; over 5x5, from the graph's pad op); channels and slices
        from the fill rule."""
        flat = is_flat(spec)
        if flat:  # flat mode's tiles are this layout already
            return self.tile_knobs(spec, weight)
        base = SpecializedKnobs(threads_x=128, threads_y=1, stage_input=False, span_images=True)
        if any(spec.pad) and not uses_zero_page(spec, base):  # over 5x5: the graph pads
            base = base.with_(pad_input=True)
        kg, ks = self._fill(spec, base, reuse=True)
        return self._cut_functions(spec, weight, base.with_(channels_per_thread=kg, channel_split=ks))

    @staticmethod
    def _cut_functions(spec: ConvSpec, weight: SparseConvWeight, knobs: SpecializedKnobs) -> SpecializedKnobs:
        """input_parts so that no kernel function holds much over FUNCTION_NONZEROS (compile time)."""
        if spec.N >= ALL_LAYERS_BATCH and largest_launch_nonzeros(spec, weight, knobs) > 2 * FUNCTION_NONZEROS:
            chunks = -(-spec.Cg // min(knobs.channel_chunk, spec.C))
            for pieces in (p for p in (2, 4, 8) if knobs.input_parts < p <= chunks):
                knobs = knobs.with_(input_parts=pieces)
                if largest_launch_nonzeros(spec, weight, knobs) <= FUNCTION_NONZEROS:
                    break
        return knobs

    def apply(self, spec, weight, epilogue: Epilogue, knobs=None) -> KernelPlan:
        if weight.nnz > MAX_NONZEROS:
            raise ValueError(f"{weight.nnz} nonzeros exceed the specialised kernel's limit of {MAX_NONZEROS} "
                             "(code size and compile time grow with every nonzero)")
        knobs = knobs or self.default_knobs(spec, weight)
        knobs.validate()
        check_shape(spec, knobs)
        chunks = -(-spec.Cg // min(knobs.channel_chunk, spec.C))
        if knobs.input_parts * knobs.block_split > chunks:
            raise ValueError(f"input_parts*block_split={knobs.input_parts * knobs.block_split} exceeds the {chunks} "
                             f"channel chunks of a conv group ({spec.Cg} input channels, "
                             f"channel_chunk={knobs.channel_chunk})")
        groups = unrolled_program(weight, knobs.channels_per_thread)
        # pad_input: the kernel computes the unpadded conv of the padded input x_pad[N, C*Hp*Wp] (the graph pads)
        kspec = dataclasses.replace(spec, H=spec.Hp, W=spec.Wp, pad=(0, 0, 0, 0)) if knobs.pad_input else spec
        func = specialized_cuda_kernel(kspec, groups, epilogue, knobs, self.kernel_nonzeros, self.fill_warps)
        params = {p.name: p for p in func.params}
        size = lambda name: int(params[name].ty.shape[0])  # noqa: E731
        arrays = (np.zeros(size("work"), np.int32),) if "work" in params else ()
        if knobs.block_split > 1:  # arrival counts (kept zero between runs) and the partial sums' workspace
            arrays += (np.zeros(size("arrivals"), np.int32), np.zeros(size("partials"), np.float32))
        if uses_zero_page(kspec, knobs):  # the zero page: read where a tap falls in the padding
            arrays += (np.zeros(spec.C * spec.H * spec.W, np.float32),)
        return KernelPlan(func, kspec.H, kspec.W, arrays, self.name, knobs, spec, padded_input=knobs.pad_input)


def _spread(n: int) -> int:
    """A stride coprime to ``n`` near n / golden ratio: SM j starts at (j * stride) mod n, so neighbouring SMs
    (which the work queues give the same group) start far apart and every start is used."""
    s = max(1, round(n * 0.6180339887))
    while math.gcd(s, n) != 1:
        s += 1
    return s


def _tree(T, var, keys: list[int], leaf, exact: bool):
    """Binary tree of block-uniform branches on ``var`` over sorted ``keys``; ``leaf(key)`` emits a case.

    ``exact``: ``var`` may take values outside ``keys``, so each leaf also checks equality.
    """
    if len(keys) == 1:
        if exact:
            with T.If(var == keys[0]):
                with T.Then():
                    leaf(keys[0])
        else:
            leaf(keys[0])
        return
    mid = len(keys) // 2
    with T.If(var < keys[mid]):
        with T.Then():
            _tree(T, var, keys[:mid], leaf, exact)
        with T.Else():
            _tree(T, var, keys[mid:], leaf, exact)


def kernel_parts(groups: list[ChannelGroup], limit: int, min_groups: int = 1) -> list[list[int]]:
    """Consecutive runs of group indices with about ``limit`` nonzeros each (a group is never cut).

    ptxas is superlinear in a function's size (docs/notes/specialized-codegen.md), so a large layer
    compiles faster as several kernels over output-channel ranges, launched in turn. But each kernel
    must still fill the GPU on its own: a part takes at least ``min_groups`` groups (the last part
    joins the one before it when it is smaller than that), up to ``PART_GROWTH`` times ``limit``
    nonzeros (a forced batch-1 build would otherwise make one kernel of a whole large layer:
    alexnet.conv5 took 281 s of nvcc as one kernel).
    """
    parts: list[list[int]] = [[]]
    sizes = [0]  # nonzeros of each part
    for gi, g in enumerate(groups):
        grown = sizes[-1] + g.fma_count
        full = len(parts[-1]) >= min_groups or grown > PART_GROWTH * limit
        if parts[-1] and full and grown > limit:
            parts.append([])
            sizes.append(0)
        parts[-1].append(gi)
        sizes[-1] += g.fma_count
    if len(parts) > 1 and len(parts[-1]) < min_groups and sizes[-2] + sizes[-1] <= PART_GROWTH * limit:
        tail = parts.pop()  # a short tail joins the part before it (popped first: parts[-2] += parts.pop()
        parts[-1] += tail   # would store into the wrong slot)
    return parts


def _launch_parts(spec: ConvSpec, groups, k: SpecializedKnobs, kernel_nonzeros: int | None,
                  fill_warps: int) -> list[list[int]]:
    """The output-channel parts the kernel is cut into (each then launched input_parts times)."""
    geo = _Geometry.of(spec, k)
    warps_per_block = -(-geo.NT * k.channel_split * k.images_per_block // 32)
    min_groups = max(1, -(-fill_warps // (geo.blocks_per_group(spec.N, k.images_per_block) * warps_per_block)))
    return kernel_parts(groups, kernel_nonzeros or KERNEL_NONZEROS, min_groups)


@dataclass(frozen=True)
class _GroupSize:
    fma_count: int


def largest_launch_nonzeros(spec: ConvSpec, weight: SparseConvWeight, k: SpecializedKnobs,
                            kernel_nonzeros: int | None = None, fill_warps: int = WARPS_TO_FILL) -> int:
    """Nonzeros in the largest kernel function these knobs make (what cicc and ptxas pay for at once): exact
    over the output-channel parts, then divided evenly by input_parts (the pieces cut chunks, not nonzeros);
    times the pixels each thread of the row layout carries (each nonzero is that many FMA instructions)."""
    rows = weight.row_lengths()
    kg = weight.K // weight.groups
    sizes = [_GroupSize(int(rows[first:min(first + k.channels_per_thread, g0 + kg)].sum()))
             for g0 in range(0, weight.K, kg) for first in range(g0, g0 + kg, k.channels_per_thread)]
    parts = _launch_parts(spec, sizes, k, kernel_nonzeros, fill_warps)
    largest = -(-max(sum(sizes[gi].fma_count for gi in part) for part in parts) // k.input_parts)
    return largest * k.pixels_per_thread  # one FMA instruction per nonzero and pixel of the thread


def specialized_cuda_kernel(spec: ConvSpec, groups: list[ChannelGroup], epilogue: Epilogue, k: SpecializedKnobs,
                            kernel_nonzeros: int | None = None, fill_warps: int = WARPS_TO_FILL):
    """Emit the PrimFunc ``(x[N,C,H,W], bias[K], [residual[N,K,OH,OW]], y[N,K,OH,OW])``.

    One CUDA kernel per part of ``kernel_parts`` (launched in order by the host code TVM generates).
    Staged: a run-time loop over the group's channel chunks stages each chunk once (one copy of that
    code), then branches to the group's taps of that chunk, so code size is the taps plus a constant.
    Accumulators are separate one-element local buffers, not one array: nvcc's front end is ~4x slower
    on a large kernel that indexes one local array (measured in the notes).
    """
    import tvm
    from tvm.backend.cuda.op import cuda_func_call
    from tvm.script.ir_builder import IRBuilder
    from tvm.tirx.script.builder import ir as T

    N, C, H, W = spec.input_shape
    K, OH, OW = spec.K, spec.OH, spec.OW
    HW = H * W
    (sh, sw), (dh, dw) = spec.stride, spec.dilation
    pt, pl = spec.pad[0], spec.pad[1]
    geo = _Geometry.of(spec, k)
    HE, WE = (1, HW) if geo.flat else (H, W)  # the input as the kernel indexes it
    TX, TY, NT, PY, PX = geo.TX, geo.TY, geo.NT, geo.PY, geo.PX
    PT = PY * PX  # output pixels per thread: rows of a column (staged) or neighbours in a row (row layout)
    step = lambda q: (0, q) if PX > 1 else (q, 0)  # noqa: E731  (rows, columns) from a thread's first pixel to its q-th
    CC = min(k.channel_chunk, C)
    SR, SC = geo.halo(spec)
    NS = -(-SR * SC // NT)  # staging slots per thread
    PP = NS * NT  # staged floats per channel
    residual = getattr(epilogue, "residual", False)
    f32 = lambda v: tvm.tirx.FloatImm("float32", v)  # noqa: E731
    i32 = lambda v: tvm.tirx.IntImm("int32", v)  # noqa: E731
    Cg, Kg = spec.Cg, spec.K // spec.groups

    def staged_loads(taps, chunk: int) -> tuple:
        """A chunk's taps as distinct shared loads: ``(byte offset, ((acc slot, weight), ...))``.

        Output row q of a thread reads input row q * sh + kh * dh, so with several rows per thread one
        loaded element feeds every (q, kh) pair that lands on it, for all channels of the group.
        """
        loads: dict[int, list] = {}
        for t in taps:
            for q in range(PY):
                off = 4 * ((t.c - chunk * CC) * PP + (q * sh + t.kh * dh) * SC + t.kw * dw)
                loads.setdefault(off, []).extend((j * PY + q, w) for j, w in t.fmas)
        return tuple((off, tuple(f)) for off, f in loads.items())

    KS, IB, TB, TI = k.channel_split, k.images_per_block, geo.TB, geo.images
    # Vector width of the row layout's loads: the thread's first element (image, channel and row starts included)
    # must sit on a VW-float boundary, so VW divides PX, H*W and (a KxK row) W.
    VW = max(v for v in (1, 2, 4) if PX % v == 0 and HW % v == 0 and (geo.flat or W % v == 0))

    zero_page = uses_zero_page(spec, k)

    def emit_part(xf, bias, rf, yf, part: list[ChannelGroup], piece: int, work=None, work_at: int = 0, zf=None,
                  arrivals=None, arrive_at: int = 0, partials=None):
        """One kernel: blockIdx.z picks a group of ``part``; threadIdx.z a slice of its chunk loop. It covers
        input piece ``piece`` of ``k.input_parts`` (a contiguous run of each conv group's channel chunks).
        With block_split S, blockIdx.z = group * S + s, and block s takes run s of the piece's chunks."""
        KG = max(g.size for g in part)
        first_piece, last_piece = piece == 0, piece == k.input_parts - 1
        S = k.block_split
        whole = part  # the groups; below, ``part`` lists each S times (one entry per input run)
        part = [g for g in whole for _ in range(S)]

        def chunk_range_of(g: ChannelGroup, run: int) -> tuple[int, int]:
            """The group's chunks in this piece's run ``run``: its conv group's input channels, cut into
            input_parts runs, each cut into block_split runs."""
            lo, hi = (g.first // Kg) * Cg // CC, -(-((g.first // Kg) + 1) * Cg // CC)
            lo, hi = lo + (hi - lo) * piece // k.input_parts, lo + (hi - lo) * (piece + 1) // k.input_parts
            return lo + (hi - lo) * run // S, lo + (hi - lo) * (run + 1) // S

        chunk_range = [chunk_range_of(g, gi % S) for gi, g in enumerate(part)]

        def taps_of(gi: int) -> tuple:
            lo, hi = chunk_range[gi]
            return tuple(t for t in part[gi].taps if lo <= t.c // CC < hi)

        items = geo.blocks_per_group(N, IB)  # work items per group
        tz, ty, tx = T.env_thread("threadIdx.z"), T.env_thread("threadIdx.y"), T.env_thread("threadIdx.x")
        if k.sm_affine:  # one block per work item; which one it takes is decided at run time
            blocks = [(T.env_thread("blockIdx.x"), len(part) * items)]
        else:
            # Group slowest: the blocks resident at one time run few groups' code (instruction cache); image
            # slowest: they read few images' input (L2), which pays when the code is small.
            grp, img = T.env_thread("blockIdx.z"), T.env_thread("blockIdx.y")
            if not k.group_major:
                grp, img = img, grp
            tile = T.env_thread("blockIdx.x")
            blocks = [(img, items // geo.tiles), (grp, len(part)), (tile, geo.tiles)]
        with contextlib.ExitStack() as launch:
            for var, extent in blocks + ([(tz, KS * IB)] if KS * IB > 1 else []) + [(ty, TY), (tx, TX)]:
                launch.enter_context(T.launch_thread(var, extent))
            lead = tvm.tirx.all(ty == 0, tx == 0, *([tz == 0] if KS * IB > 1 else []))
            if k.prefetch_l2:  # line gid of the input, and every grid-th after it
                block, n_blocks = blocks[0]
                for var, extent in blocks[1:]:
                    block, n_blocks = block * extent + var, n_blocks * extent
                grid = n_blocks * NT * KS * IB
                gid = (block * (KS * IB) + (tz if KS * IB > 1 else 0)) * NT + ty * TX + tx
                lines = -(-N * C * H * W // 32)
                for r_ in range(-(-lines // grid)):
                    with T.If(gid + r_ * grid < lines):
                        with T.Then():
                            T.evaluate(ptx_taps.l2_prefetch(T.address_of(xf[(gid + r_ * grid) * 32])))
            if k.sm_affine:
                took = T.alloc_buffer((1,), "int32", scope="shared")
                with T.If(lead):
                    with T.Then():
                        work_queue.emit_take(T, len(part), items, T.address_of(work[work_at]), took[0])
                T.evaluate(T.tvm_storage_sync("shared"))
                item = T.alloc_buffer((1,), "int32", scope="local")
                T.buffer_store(item, took[0], [i32(0)])
                grp, img, tile = item[0] // items, item[0] % items // geo.tiles, item[0] % geo.tiles
            if k.rotate_chunks:  # this block's SM: its first chunk or segment (blocks on one SM share their code)
                smid = T.alloc_buffer((1,), "int32", scope="local")
                T.buffer_store(smid, cuda_func_call("escort_smid", source_code=SMID, return_type="int32"), [i32(0)])
            # threadIdx.z = (image of the block) * KS + (slice of the chunk loop)
            sz = (tz % KS if IB > 1 else tz) if KS > 1 else i32(0)
            sub = (tz // KS if KS > 1 else tz) if IB > 1 else i32(0)
            n = img * IB + sub

            tile_r, tile_c = tile // geo.tiles_x, tile % geo.tiles_x
            tid = ty * TX + tx
            if geo.spans:  # span_images: pixel g of the flat row is pixel g % OW of image g // OW (and g + 1 ..
                g_row = (tile_c * TX + tx) * PX  # g + PX - 1 of the same row: PX divides the row, check_shape)
                g_in = T.min(g_row, N * geo.OW - PX)  # threads past the batch's end read in bounds

            def image(t):
                """Tile ``t``'s image: (index, stored?, index to load). An image past N (in the last block)
                loads image N - 1 and stores nothing."""
                if geo.spans:
                    return g_in // geo.OW, g_row < N * geo.OW, g_in // geo.OW
                n_t = img * TI + t if TI > 1 else n
                if N % (IB * TI) == 0:
                    return n_t, tvm.tirx.const(True), n_t
                return n_t, n_t < N, T.min(n_t, N - 1)

            nl = image(i32(0))[2]

            def pixel(t):
                """This thread's pixels in the block's tile ``t``: rows oh .. oh + PY - 1 of column ow (flat mode:
                oh == 0, ow is the pixel). Tiles stack down the rows (flat mode: along the row)."""
                tr = 1 if TI > 1 else TB  # tiles stacked in the image
                if TI > 1:
                    t = i32(0)
                if geo.linear:  # idle threads past the image's last pixel take it as theirs (reads in bounds)
                    p = T.min(tid, geo.OH * geo.OW - 1)
                    return p // geo.OW, p % geo.OW
                if geo.spans:
                    p = g_in % geo.OW
                    return (p // geo.span_ow, p % geo.span_ow) if geo.span_ow else (i32(0), p)
                if geo.flat:
                    return i32(0), (tile_c * tr + t) * TX + tx
                return ((tile_r * tr + t) * TY + ty) * PY, tile_c * TX + tx

            oh, ow = pixel(i32(0))

            rounds = reduces_in_rounds(spec, k.with_(channels_per_thread=KG))

            def partial(rank, a_i):
                """Where the ``rank``-th of the slices that do not finish accumulator ``a_i`` leaves it (split
                reduction; the finishing slice keeps its own share in its register). In rounds, one place."""
                return ((sub * (1 if rounds else KS - 1) + rank) * KG * PT + a_i) * NT + tid

            acc = [T.alloc_buffer((1,), "float32", scope="local") for _ in range(KG * PT)]  # slot j * PT + q
            if TB > 1:
                parked = T.alloc_buffer((parked_floats(spec, k.with_(channels_per_thread=KG)),), "float32",
                                        scope="shared")

                def parked_at(t, a_i=0):
                    """Tile ``t``'s accumulator ``a_i`` of this thread: private, conflict-free (stride NT)."""
                    return t * (KG * PT * NT) + a_i * NT + tid

                def park(t, store: bool):
                    ptx_taps.emit_park(T, acc, T.address_of(parked[parked_at(t)]), 4 * NT, store)
            val = T.alloc_buffer((1,), "float32", scope="local")
            for a in acc:
                T.buffer_store(a, f32(0.0), [i32(0)])

            def fmas(t, tap_value):
                T.buffer_store(val, tap_value, [i32(0)])
                for j, w in t.fmas:
                    T.buffer_store(acc[j], acc[j][0] + val[0] * f32(w), [i32(0)])

            if k.stage_input or KS > 1:  # staged chunks, and/or the split slices' partial sums
                sm = T.alloc_buffer((staging_floats(spec, k.with_(channels_per_thread=KG)),), "float32",
                                    scope="shared")
            if k.stage_input:
                # this group's chunk range (and with rotate_chunks, the stride of its first chunk over the SMs)
                lim = T.alloc_buffer((3 if k.rotate_chunks else 2,), "int32", scope="local")

                def set_range(gi):
                    T.buffer_store(lim, i32(chunk_range[gi][0]), [i32(0)])
                    T.buffer_store(lim, i32(chunk_range[gi][1]), [i32(1)])
                    if k.rotate_chunks:
                        trips_g = -(-(chunk_range[gi][1] - chunk_range[gi][0]) // KS)
                        T.buffer_store(lim, i32(_spread(max(trips_g, 1))), [i32(2)])

                _tree(T, grp, list(range(len(part))), set_range, exact=False)
                row0, col0 = tile_r * (geo.block_rows * sh) - pt, tile_c * (geo.block_cols * sw) - pl
                def mine(t):
                    """This (image, slice)'s chunk in shared memory."""
                    return ((sub * KS + sz) * TI + (t if TI > 1 else 0)) * (CC * PP)

                def sbase(t):
                    """This thread's first staged element in tile ``t``."""
                    r, c = pixel(t)
                    return mine(t) + (r - tile_r * geo.block_rows) * sh * SC + (c - tile_c * geo.block_cols) * sw

                def chunk_value(ci, slot, cc, t):
                    """This thread's element ``slot`` of channel ``cc`` of chunk ``ci`` (0 outside the image)."""
                    p = tid + slot * NT
                    gh, gw = row0 + p // SC, col0 + p % SC
                    ok = tvm.tirx.all(p < SR * SC, gh >= 0, gh < HE, gw >= 0, gw < WE, ci * CC + cc < C)
                    n_load = image(t)[2]
                    at = (n_load * C + ci * CC + cc) * HW + gh * WE + gw
                    if k.evict_first:  # the address is formed outside the image too, but read only where ok
                        return cuda_func_call("escort_ldcs_or_zero", ok, T.address_of(xf[at]), return_type="float32",
                                              source_code=LDCS_OR_ZERO)
                    return tvm.tirx.if_then_else(ok, xf[at], f32(0.0))

                slots = [(slot, cc, ti) for ti in range(TI) for slot in range(NS) for cc in range(CC)]
                if TB > 1:  # every tile starts at zero (plain stores: they also tell TVM the buffer's full extent,
                    # which it would otherwise shrink to the addresses it sees passed to the PTX moves)
                    for t in range(TB):
                        for a_i in range(KG * PT):
                            T.buffer_store(parked, f32(0.0), [parked_at(t, a_i)])
                trips = (lim[1] - lim[0] + (KS - 1)) // KS
                if k.rotate_chunks:  # trip i takes the group's (i + first)-th chunk of this slice, wrapping
                    first = T.alloc_buffer((1,), "int32", scope="local")
                    T.buffer_store(first, T.truncmod(smid[0] * lim[2], T.max(trips, 1)), [i32(0)])

                def chunk_at(i):
                    """Slice sz's chunk of trip ``i``: lim[0] + sz, + KS, ... (rotated: from its ``first``-th)."""
                    if k.rotate_chunks:
                        i = T.truncmod(i + first[0], trips)
                    return lim[0] + i * KS + sz

                if k.prefetch:  # registers carry the next chunk while this one is computed
                    pre = [T.alloc_buffer((1,), "float32", scope="local") for _ in slots]
                    for r, (slot, cc, ti) in zip(pre, slots):
                        first_chunk = chunk_at(i32(0)) if k.rotate_chunks else lim[0] + sz
                        T.buffer_store(r, chunk_value(first_chunk, slot, cc, i32(ti)), [i32(0)])
                # Every slice runs the same trip count (barriers).
                with T.serial(0, trips) as i:
                    ci = chunk_at(i)
                    for r, (slot, cc, ti) in enumerate(slots):
                        v = pre[r][0] if k.prefetch else chunk_value(ci, slot, cc, i32(ti))
                        T.buffer_store(sm, v, [mine(i32(ti)) + cc * PP + tid + slot * NT])
                    T.evaluate(T.tvm_storage_sync("shared"))
                    # the next chunk while trips remain (rotated: a ragged slice's chunk past the group has no taps)
                    if k.prefetch:
                        with T.If(i + 1 < trips if k.rotate_chunks else ci + KS < lim[1]):
                            with T.Then():
                                nxt = chunk_at(i + 1) if k.rotate_chunks else ci + KS
                                for r, (slot, cc, ti) in zip(pre, slots):
                                    T.buffer_store(r, chunk_value(nxt, slot, cc, i32(ti)), [i32(0)])

                    def group_chunks(gi, t):
                        lo, hi = chunk_range[gi]
                        per_chunk = {c: ts for c, ts in part[gi].chunks(CC) if lo <= c < hi}

                        def chunk_taps(chunk):
                            run = ptx_taps.TapRun("shared", staged_loads(per_chunk[chunk], chunk))
                            ptx_taps.emit(T, run, acc, T.address_of(sm[sbase(t)]))

                        if per_chunk:  # a slice past the group's last chunk matches no case
                            _tree(T, ci, sorted(per_chunk), chunk_taps, exact=True)

                    def chunk_code(t):
                        with_taps = [gi for gi in range(len(part)) if taps_of(gi)]
                        _tree(T, grp, with_taps or [0], lambda gi: group_chunks(gi, t),
                              exact=len(with_taps) < len(part))

                    if TB == 1:
                        chunk_code(i32(0))
                    else:  # the same chunk code, tile after tile, each with its own accumulators
                        with T.serial(0, TB) as t:
                            park(t, store=False)
                            chunk_code(t)
                            park(t, store=True)
                    T.evaluate(T.tvm_storage_sync("shared"))
            else:
                if geo.span_ow:  # already in bounds: threads past the batch's end took its last pixel
                    ohc, owc = oh, ow
                else:
                    ohc, owc = T.min(oh, geo.OH - 1), T.min(ow, geo.OW - 1)  # edge threads read in bounds
                padded = any(spec.pad)

                def load_direct(t):
                    if geo.flat:
                        return xf[(nl * C + t.c) * HW + owc]
                    ih, iw = ohc * sh + (t.kh * dh - pt), owc * sw + (t.kw * dw - pl)
                    v = xf[(nl * C + t.c) * HW + ih * W + iw]
                    if not padded:
                        return v
                    return tvm.tirx.if_then_else(tvm.tirx.all(ih >= 0, ih < H, iw >= 0, iw < W), v, f32(0.0))

                def slice_taps(gi, slice_):
                    """The group's taps of slice ``slice_``: a contiguous run of its input channels' chunks."""
                    lo, hi = chunk_range[gi]
                    a, b = lo + (hi - lo) * slice_ // KS, lo + (hi - lo) * (slice_ + 1) // KS
                    return tuple(t for t in taps_of(gi) if a <= t.c // CC < b)

                def group_taps(gi):
                    if KS > 1:  # slice sz (warp-uniform: threadIdx.z) takes its run of the input channels
                        slices = [s_ for s_ in range(KS) if slice_taps(gi, s_)]
                        if slices:
                            _tree(T, sz, slices, lambda s_: slice_code(gi, slice_taps(gi, s_)),
                                  exact=len(slices) < KS)
                        return
                    slice_code(gi, taps_of(gi))

                def slice_code(gi, taps):
                    """The taps' code, one segment per channel chunk (rotate_chunks: a run-time loop over the
                    segments from its SM's own first one; else straight-line, in chunk order)."""
                    chunks = sorted({t.c // CC for t in taps})
                    if not k.rotate_chunks or len(chunks) < 2:
                        chunk_code(taps)
                        return
                    n_seg = len(chunks)
                    seg = T.alloc_buffer((1,), "int32", scope="local")
                    with T.serial(0, n_seg) as i:
                        T.buffer_store(seg, T.truncmod(i + smid[0] * _spread(n_seg), n_seg), [i32(0)])
                        _tree(T, seg[0], list(range(n_seg)),
                              lambda j: chunk_code(tuple(t for t in taps if t.c // CC == chunks[j])), exact=False)

                def chunk_code(taps):
                    if zero_page:  # a base per kernel position: in the input, or (in the padding) the zero page
                        # One block per (chunk of CC channels, position), so one base register is live at a time
                        # (nine at once took 80 registers against 48 on a 3x3 conv), and a chunk's positions run back
                        # to back, so the cache lines one position loads are still in L1 for its neighbours (position-
                        # major over all channels was 15-50% slower: notes v16). An outside position's address is
                        # formed, never read.
                        blocks: dict[tuple, list] = {}
                        for t in taps:
                            blocks.setdefault((t.c // CC, t.kh, t.kw), []).append((4 * t.c * HW, t.fmas))
                        for (_, kh, kw), block in sorted(blocks.items()):
                            ih, iw = ohc * sh + (kh * dh - pt), owc * sw + (kw * dw - pl)
                            run = ptx_taps.TapRun("global", tuple(block), guarded=True, evict_first=k.evict_first)
                            ptx_taps.emit(T, run, acc, T.address_of(xf[nl * C * HW + ih * W + iw]),
                                          tvm.tirx.all(ih >= 0, ih < H, iw >= 0, iw < W), T.address_of(zf[0]))
                        return
                    if padded and not geo.flat:  # predicated loads: one C statement per tap and FMA
                        for t in taps:
                            fmas(t, load_direct(t))
                        return
                    # Unpadded: every tap is a fixed offset from this thread's first input element.
                    if geo.flat:
                        base, offs = xf[nl * C * HW + owc], lambda t: t.c * HW
                    else:
                        base = xf[nl * C * HW + ohc * sh * W + owc * sw]
                        offs = lambda t: t.c * HW + t.kh * dh * W + t.kw * dw  # noqa: E731
                    if PX == 1:
                        run = ptx_taps.TapRun("global", tuple((4 * offs(t), t.fmas) for t in taps),
                                              evict_first=k.evict_first)
                    else:  # pixel e of the thread's PX reads element offs + e (stride 1), in aligned vectors
                        vec: dict[int, list] = {}
                        for t in taps:
                            for e in range(PX):
                                o = offs(t) + e
                                vec.setdefault(o // VW, []).extend((j * PX + e, w, o % VW) for j, w in t.fmas)
                        run = ptx_taps.TapRun("global", tuple((4 * VW * v, tuple(f)) for v, f in vec.items()), width=VW,
                                              evict_first=k.evict_first)
                    ptx_taps.emit(T, run, acc, T.address_of(base))

                with_taps = [gi for gi in range(len(part)) if taps_of(gi)]
                if with_taps:
                    _tree(T, grp, with_taps, group_taps, exact=len(with_taps) < len(part))
            owner = lambda a_i: (a_i // PT) % KS  # noqa: E731  slice s finishes channels s, s + KS, ...
            if KS > 1 and not rounds:  # partial sums through shared memory, all slices at once
                for a_i, a in enumerate(acc):
                    with T.If(sz != owner(a_i)):
                        with T.Then():
                            T.buffer_store(sm, a[0], [partial(T.if_then_else(sz > owner(a_i), sz - 1, sz), a_i)])
                T.evaluate(T.tvm_storage_sync("shared"))
            if KS > 1 and rounds:  # round r: slice s hands over the channels slice s + r finishes, which adds them
                for r_ in range(1, KS):
                    for s_ in range(KS):
                        with T.If(sz == s_):
                            with T.Then():
                                for a_i, a in enumerate(acc):
                                    if owner(a_i) == (s_ + r_) % KS:
                                        T.buffer_store(sm, a[0], [partial(0, a_i)])
                    T.evaluate(T.tvm_storage_sync("shared"))
                    for s_ in range(KS):
                        with T.If(sz == s_):
                            with T.Then():
                                for a_i, a in enumerate(acc):
                                    if owner(a_i) == s_:
                                        T.buffer_store(a, a[0] + sm[partial(0, a_i)], [i32(0)])
                    T.evaluate(T.tvm_storage_sync("shared"))

            def total(a_i):
                if KS == 1 or rounds:
                    return acc[a_i][0]
                v = acc[a_i][0]  # the finishing slice's own share, then the other slices' in rank order
                for r_ in range(KS - 1):
                    v = v + sm[partial(r_, a_i)]
                return v

            NKO = N * K * OH * OW

            def store_one(g, j, q, t, run):
                """Accumulator (j, q) of tile ``t`` to y; with block_split, ``run`` >= 0 leaves it in the workspace
                slot of this block's input run, and ``run`` None finishes it from all slots."""
                kk = g.first + j
                oh_t, ow_t = pixel(t)
                qy, qx = step(q)
                n_t = image(t)[0]
                o = (n_t * K + kk) * (OH * OW) + (ow_t + qx if geo.flat else (oh_t + qy) * OW + ow_t + qx)
                if S > 1 and run is not None:
                    T.buffer_store(partials, total(j * PT + q), [run * NKO + o])
                    return
                v = total(j * PT + q) if S == 1 else split_blocks.load_partial(T.address_of(partials[o]))
                for r_ in range(1, S):  # the runs' sums in a fixed order (the same result whichever block ends last)
                    v = v + split_blocks.load_partial(T.address_of(partials[r_ * NKO + o]))
                # the first piece starts from the bias, later ones from the sum the pieces before left in y
                v = v + (bias[kk] if first_piece else yf[o])
                if residual and last_piece:
                    v = v + rf[o]
                if epilogue.relu and last_piece:
                    v = T.max(v, f32(0.0))
                T.buffer_store(yf, v, [o])

            def store(g, t, run=None):
                oh_t, ow_t = pixel(t)
                stored = image(t)[1]
                if geo.linear:
                    stored = tvm.tirx.all(stored, tid < geo.OH * geo.OW)
                for q in range(PT):
                    qy, qx = step(q)
                    inside = [] if geo.span_ow else [oh_t + qy < geo.OH, ow_t + qx < geo.OW]
                    with T.If(tvm.tirx.all(*inside, stored)):
                        with T.Then():
                            for j in range(g.size):
                                if KS == 1:
                                    store_one(g, j, q, t, run)
                                    continue
                                with T.If(sz == j % KS):
                                    with T.Then():
                                        store_one(g, j, q, t, run)

            runs = S > 1
            if TB == 1:
                _tree(T, grp, list(range(len(part))), lambda gi: store(part[gi], i32(0), gi % S if runs else None),
                      exact=False)
            else:
                with T.serial(0, TB) as t:
                    park(t, store=False)
                    _tree(T, grp, list(range(len(part))), lambda gi: store(part[gi], t), exact=False)
            if runs:  # count this block in; the work item's last block adds the runs' sums and stores y
                split_blocks.emit_fence(T)
                T.evaluate(T.tvm_storage_sync("shared"))
                arrived = T.alloc_buffer((1,), "int32", scope="shared")
                counter = arrive_at + (grp // S) * items + img * geo.tiles + tile
                with T.If(lead):
                    with T.Then():
                        split_blocks.emit_arrive(T, T.address_of(arrivals[counter]), arrived[0])
                T.evaluate(T.tvm_storage_sync("shared"))
                before = T.alloc_buffer((1,), "int32", scope="local")  # (a shared load may not sit in a condition)
                T.buffer_store(before, arrived[0], [i32(0)])
                with T.If(before[0] == S - 1):
                    with T.Then():
                        split_blocks.emit_fence(T)
                        _tree(T, grp // S, list(range(len(whole))), lambda gi: store(whole[gi], i32(0)), exact=False)
                        with T.If(lead):
                            with T.Then():
                                T.buffer_store(arrivals, i32(0), [counter])
            if k.sm_affine:  # every block took its item before this: the last one zeroes the counters
                with T.If(lead):
                    with T.Then():
                        work_queue.emit_finish(T, len(part), len(part) * items, T.address_of(work[work_at]))

    with IRBuilder() as ib:
        with T.prim_func():
            T.func_name("escort_specialized_conv")
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
            # pad_input: x_pad[N, C*Hp*Wp] as the graph pass hands it over (pad + reshape)
            x = T.arg("x", T.buffer((N, C * H * W) if k.pad_input else (N, C, H, W), "float32"))
            parts = _launch_parts(spec, groups, k, kernel_nonzeros, fill_warps)
            launches = [(part, piece) for part in parts for piece in range(k.input_parts)]  # in this order
            if k.sm_affine:  # each launch's work counters, one after the other
                at = np.cumsum([0] + [work_queue.counters(len(part)) for part, _ in launches])
                work = T.arg("work", T.buffer((int(at[-1]),), "int32"))
            if k.block_split > 1:  # each launch's arrival counters (one per work item), and one shared workspace
                items = _Geometry.of(spec, k).blocks_per_group(N, k.images_per_block)
                arrive_at = np.cumsum([0] + [len(part) * items for part, _ in launches])
                arrivals = T.arg("arrivals", T.buffer((int(arrive_at[-1]),), "int32"))
                partials = T.arg("partials", T.buffer((k.block_split * N * K * OH * OW,), "float32"))
            zeros = T.arg("zeros", T.buffer((C * H * W,), "float32")) if zero_page else None
            bias = T.arg("bias", T.buffer((K,), "float32"))
            res = T.arg("residual", T.buffer((N, K, OH, OW), "float32")) if residual else None
            y = T.arg("y", T.buffer((N, K, OH, OW), "float32"))
            xf = T.decl_buffer((N * C * H * W,), "float32", data=x.data)
            yf = T.decl_buffer((N * K * OH * OW,), "float32", data=y.data)
            rf = T.decl_buffer((N * K * OH * OW,), "float32", data=res.data) if residual else None
            for li, (part, piece) in enumerate(launches):  # each input piece adds to the one before
                if k.sm_affine:
                    emit_part(xf, bias, rf, yf, [groups[gi] for gi in part], piece, work, int(at[li]), zf=zeros)
                elif k.block_split > 1:
                    emit_part(xf, bias, rf, yf, [groups[gi] for gi in part], piece, zf=zeros, arrivals=arrivals,
                              arrive_at=int(arrive_at[li]), partials=partials)
                else:
                    emit_part(xf, bias, rf, yf, [groups[gi] for gi in part], piece, zf=zeros)
    return ib.get()
