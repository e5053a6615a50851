"""Split the reduction of small-batch dense layers across thread blocks (CUDA builds).

TVM's default GPU schedule for a matmul (dlight's ``Matmul`` rule) tiles M and N only, 32 x 64 per block.
A classifier at batch 32 then runs on a handful of blocks, each walking all of K: VGG-16's fc6
(x[32, 25088] @ W[25088, 4096]) is 64 blocks on a 132-SM H200 and took 1.55 ms end to end, where reading its
411 MB weight once takes 0.1 ms (docs/bench/e2e6ops). Written as S matmuls over K/S-long slices
(``x[S, M, K/S] @ W[S, K/S, N]``, one batched matmul, which dlight tiles into S times the blocks) and a sum
over S, it fills the GPU; the sum fuses with the bias and activation that follow.
"""
from __future__ import annotations

from dataclasses import dataclass, asdict

import tvm
from tvm import relax

from .sparse_conv_rewrite import _dtype, _static_shape

FILL_BLOCKS = 2 * 132  # blocks that keep every SM of an H200 busy (two per SM)
TILE_M, TILE_N = 32, 64  # dlight's Matmul tile (its fp32 CUDA config)
# dlight's Matmul block walks its K range 16 at a time with no software pipelining, so a block's time grows
# with its K range whatever the GPU's occupancy: past this many, cut K even where the blocks fill the GPU.
MAX_SLICE = 1024
MIN_SLICE = 256  # shortest K slice: the partial sums (S x M x N floats) must stay small next to the weight
# Weight elements (K x N) under which a matmul is left whole. Not multiply-adds: dlight's block walks all of K
# whatever M is, so at M = 2-8 a classifier takes as long as at 32 (H200, docs/bench/mm_small: 8 x 2048 @
# 2048 x 1000 0.082 ms whole, 0.019 split in 8; GoogLeNet's 1024 x 1000, the smallest measured, 0.042 -> 0.019 at
# M = 8, 0.035 -> 0.023 at M = 2). Below it the split is not measured.
MIN_WEIGHT = 1_000_000
MAX_M = 256  # larger batches: M tiles alone give enough blocks, and the partial sums grow with M
SPLITS = (2, 4, 8, 16, 32, 64)


@dataclass
class MatmulSplit:
    """One matmul the pass rewrote (or looked at), for the build report."""

    shape: tuple  # (M, K, N)
    split: int  # S; 1 = left as it was
    reason: str = ""

    def as_dict(self) -> dict:
        return {**asdict(self), "shape": list(self.shape)}  # as it reads back from an exported model's JSON

    def line(self) -> str:
        m, k, n = self.shape
        what = f"split K in {self.split}" if self.split > 1 else f"kept ({self.reason})"
        return f"matmul {m}x{k} @ {k}x{n}: {what}"


def choose_split(M: int, K: int, N: int) -> tuple[int, str]:
    """(S, reason): the fewest K slices of at most MAX_SLICE that give dlight's tiles FILL_BLOCKS blocks; S must
    divide K, and a slice be at least MIN_SLICE long. M == 1 is left to dlight's GEMV rule."""
    if M == 1:
        return 1, "M=1: dlight's GEMV rule"
    if M > MAX_M:
        return 1, f"M={M} > {MAX_M}"
    if K * N < MIN_WEIGHT:
        return 1, f"a {K}x{N} weight: small"
    blocks = -(-M // TILE_M) * -(-N // TILE_N)
    if blocks >= FILL_BLOCKS and K <= MAX_SLICE:
        return 1, f"{blocks} blocks fill the GPU, K={K} is short"
    usable = [s for s in SPLITS if K % s == 0 and K // s >= MIN_SLICE]
    if not usable:
        return 1, f"K={K} has no slice of >= {MIN_SLICE} that divides it"
    return next((s for s in usable if blocks * s >= FILL_BLOCKS and K // s <= MAX_SLICE), usable[-1]), ""


def _float32_2d(expr) -> tuple[int, int] | None:
    shape = _static_shape(expr)
    return shape if shape is not None and len(shape) == 2 and _dtype(expr) == "float32" else None


@relax.expr_functor.mutator
class _SplitK(relax.PyExprMutator):
    def __init__(self, mod, choose):
        super().__init__(mod)
        self.choose = choose
        self.seen: list[MatmulSplit] = []

    def visit_call_(self, call):
        call = super().visit_call_(call)
        if not isinstance(call.op, tvm.ir.Op) or call.op.name != "relax.matmul":
            return call
        a, b = _float32_2d(call.args[0]), _float32_2d(call.args[1])
        if a is None or b is None or a[1] != b[0]:
            return call
        (M, K), N = a, b[1]
        s, reason = self.choose(M, K, N)
        self.seen.append(MatmulSplit((M, K, N), s, reason))
        if s == 1:
            return call
        bb = self.builder_
        x = bb.emit(relax.op.permute_dims(relax.op.reshape(call.args[0], (M, s, K // s)), [1, 0, 2]))
        w = bb.emit(relax.op.memory.view(call.args[1], (s, K // s, N)))  # a view: no copy of the weight
        part = bb.emit(relax.op.matmul(x, w, out_dtype="float32"))  # [S, M, N]
        return relax.op.sum(part, axis=[0])


def split_k_matmuls(mod: tvm.IRModule, func_name: str = "main",
                    choose=choose_split) -> tuple[tvm.IRModule, list[MatmulSplit]]:
    """Rewrite every float32 2-D matmul of ``mod[func_name]`` that leaves the GPU idle; returns the module and
    what was done to each matmul. ``choose(M, K, N) -> (S, reason)`` picks the split (scripts/bench_matmul.py
    sweeps it)."""
    mutator = _SplitK(mod, choose)
    new_func = mutator.visit_expr(mod[func_name])
    if not any(m.split > 1 for m in mutator.seen):
        return mod, mutator.seen
    new_mod = mutator.builder_.get()
    new_mod[func_name] = new_func
    return new_mod, mutator.seen
