"""The CSR kernel's staged-input form: a band of input rows staged in shared memory, shared by a block's channels.

Why: at batch 1 the gathering CSR kernel reads every tap from L1/L2 and waits on those loads (ncu, twelfth
session: long scoreboard, 71% L1 hits), while the specialised kernel on 59k-236k nonzeros waits on its own code.
Here a block owns a band of full-width output rows and ``channels_per_block`` output channels; it walks the input
channels ``stage_channels`` at a time, copying each round's band (with its halo, zero-padded on the way) into
shared memory, and every thread then reads its taps from there at a constant offset from its own position:
one shared load and one FMA per nonzero and pixel, conflict-free, no bounds test in the inner loop.

Layout of a staged round (stride 1): plane ``cl`` of the round holds input rows ``r0 - pad .. r0 - pad + ROWS``
at pitch ``SP = OW + (KW - 1) * dw``. Output position ``q = r * SP + c`` (row ``r`` of the band, column ``c``; the
``c >= OW`` ones are computed and dropped) reads nonzero (cl, kh, kw) at ``q + cl * PLANE + kh * dh * SP + kw * dw``,
so one packed offset per nonzero serves every position. Thread ``t`` of a channel slot owns positions
``t + p * NTP`` (p < pixels_per_thread): consecutive threads read consecutive words, one wavefront per warp.
``channel_slots`` slots (threadIdx.z) take different channels; with ``nonzero_split`` KS slices also share each
channel's nonzeros (every KS-th), and slices 1.. hand their sums to slice 0 through shared memory at the end.

Each nonzero is one 8-byte word (staged offset, value bits), stored so that a block's nonzeros of one round
(its channels' runs in turn) are one contiguous run; ``run_ptr[(kg * ROUNDS + r) * KB + m]`` is where channel m of
group kg starts in round r (a block reads its bounds into shared memory once). Round r + 1's band and run go
from global to shared memory by ``cp.async`` (schedules/async_copy.py) while round r is computed from the other
of two buffers, so the compute loop waits on no global load and no register holds a copy in flight. (Two
earlier forms measured slower, docs/notes/cuda-sparse-conv.md, thirteenth session: reading each round's bounds
and nonzeros from global memory in the loop, 2-3x; the next round through registers, 128 registers a thread at
64 channels a round, one block and 16 warps per SM.)
"""
from __future__ import annotations

import numpy as np

from escort_tvm.compute import Epilogue, drop_unused_residual
from escort_tvm.conv_spec import ConvSpec
from escort_tvm.sparse_format import SparseConvWeight

# The two rounds' planes and runs live in dynamic shared memory (the TVM runtime raises a kernel's limit past
# the static 48 KB as its launch needs): up to sm_90's per-block 227 KB. Defaults stay within 99 KB, which
# sm_80-sm_89 also allow; a setting past what the GPU has fails at launch, naming dynamic shared memory.
SHARED_BYTES = 227 * 1024
MAX_COPIES = 256  # asynchronous copies a thread issues per round (one unrolled instruction each)
MAX_RUN_LOADS = 8  # (8-byte) nonzeros a thread copies of a round's run


class StagedGeometry:
    """The band and staging sizes a conv and the knobs imply (raises ValueError for what the kernel cannot take)."""

    def __init__(self, spec: ConvSpec, k):
        if spec.stride != (1, 1):
            raise ValueError(f"stage_input needs stride 1 (positions are flattened rows): {spec.describe()}")
        (dh, dw) = spec.dilation
        self.NTP = k.threads_x * k.threads_y  # threads of one channel slot
        self.KS = k.nonzero_split
        self.NT = self.NTP * k.channel_slots * self.KS
        self.P = k.pixels_per_thread
        self.CC = k.stage_channels
        self.SP = spec.OW + (spec.KW - 1) * dw
        max_rows = self.NTP * self.P // self.SP
        if max_rows < 1:
            raise ValueError(f"stage_input: {self.NTP} threads x {self.P} pixels cover less than one padded row of "
                             f"{self.SP} ({spec.describe()})")
        self.BANDS = -(-spec.OH // max_rows)
        self.TH = -(-spec.OH // self.BANDS)  # balanced bands
        self.ROWS = self.TH + (spec.KH - 1) * dh
        self.PLANE = self.ROWS * self.SP
        self.ROUNDS = -(-spec.C // self.CC)
        halo = (spec.KH - 1) * dh * self.SP + (spec.KW - 1) * dw
        # positions past the band (c >= OW, or past TH rows) read junk, but inside their round's buffer
        self.SIZE = max(self.CC * self.PLANE, (self.CC - 1) * self.PLANE + halo + self.NTP * self.P)
        self.COPIES = -(-self.PLANE // self.NT) * self.CC
        self.S4 = -(-self.SIZE // 4) * 4  # one round's buffer, rounded to 16 bytes
        self.KB = k.channels_per_block
        self.KG = -(-spec.K // self.KB)  # channel groups: blockIdx.y
        self.BOUNDS = self.ROUNDS * self.KB + 1  # a block's run bounds
        self.PARTIALS = (self.KS - 1) * self.KB * self.P * self.NTP  # slices 1..'s sums, at the end
        if 4 * max(2 * self.S4, self.PARTIALS) > SHARED_BYTES:
            raise ValueError(f"stage_input: two rounds of {self.CC} planes of {self.ROWS}x{self.SP} need "
                             f"{4 * max(2 * self.S4, self.PARTIALS)} bytes of shared memory, more than {SHARED_BYTES} "
                             f"({spec.describe()})")
        if self.COPIES > MAX_COPIES:
            raise ValueError(f"stage_input: each thread would copy {self.COPIES} inputs per round (at most "
                             f"{MAX_COPIES}); use more threads or fewer stage_channels ({spec.describe()})")

    def words(self, run: int) -> int:
        """The kernel's shared buffer in 4-byte words: two rounds' planes and runs of ``run`` nonzeros, and the run
        bounds; or the slices' partial sums, which reuse the buffer after the last round, where they need more."""
        return max(2 * self.S4 + 4 * run + self.BOUNDS, self.PARTIALS)

    def shared_bytes(self, run: int) -> int:
        return 4 * self.words(run)

    def check_run(self, run: int, spec: ConvSpec) -> None:
        """The run of nonzeros a block stages per round must fit beside the planes (and in a few copies)."""
        if self.shared_bytes(run) > SHARED_BYTES:
            raise ValueError(f"stage_input: two rounds of {self.CC} planes of {self.ROWS}x{self.SP} and runs of "
                             f"{run} nonzeros need {self.shared_bytes(run)} bytes of shared memory, more "
                             f"than {SHARED_BYTES} ({spec.describe()})")
        if -(-run // self.NT) > MAX_RUN_LOADS:
            raise ValueError(f"stage_input: a round's run of {run} nonzeros is more than {MAX_RUN_LOADS} per thread "
                             f"({spec.describe()})")


def _round_cuts(weight: SparseConvWeight, g: StagedGeometry) -> np.ndarray:
    """cut[k, r]: where row k's nonzeros of round r start (rows past K, up to whole channel groups, are empty).
    The rows are sorted by (channel, kh, kw), so a channel's nonzeros of one round are one run of its row."""
    bounds = np.arange(g.ROUNDS + 1, dtype=np.int64) * g.CC
    cut = np.zeros((g.KG * g.KB, g.ROUNDS + 1), np.int64)  # row k's nonzeros of round r: [cut[k, r], cut[k, r + 1])
    for k in range(weight.K):
        lo, hi = int(weight.row_ptr[k]), int(weight.row_ptr[k + 1])
        cut[k] = lo + np.searchsorted(weight.channel[lo:hi], bounds, side="left")
    return cut


def _run_ptr(cut: np.ndarray, g: StagedGeometry) -> np.ndarray:
    lengths = (cut[:, 1:] - cut[:, :-1]).reshape(g.KG, g.KB, g.ROUNDS).transpose(0, 2, 1)  # (group, round, channel)
    run_ptr = np.concatenate([[0], np.cumsum(lengths.reshape(-1))]).astype(np.int64)
    if run_ptr[-1] > np.iinfo(np.int32).max:
        raise ValueError(f"stage_input: {run_ptr[-1]} nonzeros exceed int32 indices")
    return run_ptr.astype(np.int32)


def staged_run_ptr(weight: SparseConvWeight, g: StagedGeometry) -> np.ndarray:
    """The run bounds of staged_arrays alone: what sizing a block's shared run needs, without the reordering."""
    return _run_ptr(_round_cuts(weight, g), g)


def staged_arrays(weight: SparseConvWeight, spec: ConvSpec, g: StagedGeometry):
    """run_ptr[KG * ROUNDS * KB + 1] and the nonzeros as int64 (offset in the round's planes | value bits << 32),
    ordered by (channel group, round, channel): a block's nonzeros of one round are one run."""
    (dh, dw) = spec.dilation
    KB = g.KB
    cut = _round_cuts(weight, g)
    run_ptr = _run_ptr(cut, g)
    order = np.concatenate([np.arange(cut[kg * KB + m, r], cut[kg * KB + m, r + 1])
                            for kg in range(g.KG) for r in range(g.ROUNDS) for m in range(KB)]).astype(np.int64)
    if weight.nnz == 0:
        return run_ptr, np.zeros(1, np.int64)
    off = ((weight.channel.astype(np.int64) % g.CC) * g.PLANE + weight.kh.astype(np.int64) * dh * g.SP
           + weight.kw.astype(np.int64) * dw)
    bits = weight.values.astype(np.float32).view(np.uint32).astype(np.int64)
    return run_ptr, (off | (bits << 32))[order]


def longest_run(run_ptr: np.ndarray, g: StagedGeometry) -> int:
    """The most nonzeros one block stages in one round (the shared buffer's size; at least 1)."""
    starts = run_ptr[::g.KB].astype(np.int64)
    return max(1, int(np.diff(starts).max())) if starts.size > 1 else 1


def staged_kernel(spec: ConvSpec, nnz: int, epilogue: Epilogue, k, g: StagedGeometry, max_run: int):
    from tvm.script import tirx as T

    from . import async_copy

    N, K, OH, OW = spec.output_shape
    C, H, W = spec.C, spec.H, spec.W
    HW = H * W
    KB, KZ, U, KS = k.channels_per_block, k.channel_slots, k.unroll, k.nonzero_split
    CPT = KB // KZ  # channels each thread walks
    NTP, NT, P, CC, SP = g.NTP, g.NT, g.P, g.CC, g.SP
    TH, PLANE, ROUNDS, KG = g.TH, g.PLANE, g.ROUNDS, g.KG
    NPTR = KG * ROUNDS * KB + 1
    RUN = max_run
    RL = -(-RUN // NT)  # a thread's share of a round's run
    TP = -(-PLANE // NT)  # band positions a thread copies (each for every channel of the round)
    BPTR, S4 = g.BOUNDS, g.S4
    # one dynamic shared buffer (float32 words): band 0 | band 1 | run 0 | run 1 | run bounds (int bits)
    NZ = 2 * S4
    PT = NZ + 4 * RUN
    WORDS = g.words(RUN)
    pt, pl = spec.pad[0], spec.pad[1]
    relu, res = epilogue.relu, epilogue.residual
    NNZ = max(nnz, 1)

    def stage_offset(band, j):
        """Band position j's input relative to its channel plane: ih * W + iw, or -1 in the padding (or past the
        band): computed once per thread, the same for every channel and round."""
        from tvm import tirx

        ih = band * TH - pt + j // SP
        iw = j % SP - pl
        inside = tirx.all(j < PLANE, ih >= 0, ih < H, iw >= 0, iw < W)
        return tirx.if_then_else(inside, ih * W + iw, -1)

    def band_source(x, n, r, cl, src):
        """Address of channel cl's element of round r at stage offset src (a valid address where src < 0)."""
        from tvm import tirx

        at = (r * CC + cl) * HW + tirx.max(src, 0)
        return T.address_of(x[n, at if C % CC == 0 else tirx.min(at, C * HW - 1)])

    def band_ok(r, cl, src):
        from tvm import tirx

        return tirx.Cast("int32", src >= 0 if C % CC == 0 else tirx.all(src >= 0, r * CC + cl < C))

    def bound(smem, i):
        return T.reinterpret("int32", smem[PT + i])

    def Q(ty, tx, p):
        """Band position of a thread's accumulator p (row Q // SP, column Q % SP)."""
        return ty * k.threads_x + tx + p * NTP

    @T.macro
    def issue(x, pairs, smem, src, n, r, lid):
        """This thread's copies of round r (its band positions for every channel, its share of the run)."""
        for t in T.unroll(TP):
            if t * NT + lid < PLANE:
                for cl in T.unroll(CC):
                    T.evaluate(async_copy.copy4(T.address_of(smem[(r % 2) * S4 + cl * PLANE + t * NT + lid]),
                                                band_source(x, n, r, cl, src[t]), band_ok(r, cl, src[t])))
        for e in T.unroll(RL):
            if e * NT + lid < RUN:
                T.evaluate(async_copy.copy8(
                    T.address_of(smem[NZ + (r % 2) * (2 * RUN) + 2 * (e * NT + lid)]),
                    T.address_of(pairs[T.min(bound(smem, r * KB) + e * NT + lid, NNZ - 1)]),
                    T.Cast("int32", bound(smem, r * KB) + e * NT + lid < bound(smem, (r + 1) * KB))))
        T.evaluate(async_copy.commit())

    @T.macro
    def fma_nonzero(acc, smem, r, m, pos, j):
        wv = smem[NZ + (r % 2) * (2 * RUN) + 2 * j + 1]
        off = T.reinterpret("int32", smem[NZ + (r % 2) * (2 * RUN) + 2 * j])
        for p in T.unroll(P):
            acc[m * P + p] = acc[m * P + p] + wv * smem[(r % 2) * S4 + off + pos + p * NTP]

    @T.prim_func(s_tir=True)
    def sparse_conv2d_staged(x: T.Buffer((N, C * HW), "float32"), run_ptr: T.Buffer((NPTR,), "int32"),
                             pairs: T.Buffer((NNZ,), "int64"), bias: T.Buffer((K,), "float32"),
                             residual: T.Buffer((N, K, OH, OW), "float32"), y: T.Buffer((N, K, OH, OW), "float32")):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        for n in T.thread_binding(N, thread="blockIdx.z"):
            for kg in T.thread_binding(KG, thread="blockIdx.y"):
                for band in T.thread_binding(g.BANDS, thread="blockIdx.x"):
                    for tz in T.thread_binding(KZ * KS, thread="threadIdx.z"):
                        for ty in T.thread_binding(k.threads_y, thread="threadIdx.y"):
                            for tx in T.thread_binding(k.threads_x, thread="threadIdx.x"):
                                with T.sblock("conv"):
                                    if res:
                                        T.reads(x[0:N, 0:C * HW], run_ptr[0:NPTR], pairs[0:NNZ], bias[0:K],
                                                residual[0:N, 0:K, 0:OH, 0:OW])
                                    else:
                                        T.reads(x[0:N, 0:C * HW], run_ptr[0:NPTR], pairs[0:NNZ], bias[0:K])
                                    T.writes(y[0:N, 0:K, 0:OH, 0:OW])
                                    smem = T.alloc_buffer((WORDS,), "float32", scope="shared.dyn")
                                    src = T.alloc_buffer((TP,), "int32", scope="local")
                                    acc = T.alloc_buffer((CPT * P,), "float32", scope="local")
                                    for m in T.unroll(CPT):  # slice 0 starts from the bias, the others from 0
                                        for p in T.unroll(P):
                                            acc[m * P + p] = T.if_then_else(
                                                tz < KZ, bias[T.min(kg * KB + m * KZ + tz % KZ, K - 1)], T.float32(0))
                                    for t in T.unroll(TP):
                                        src[t] = stage_offset(band, t * NT + tz * NTP + ty * k.threads_x + tx)
                                    for i in T.serial(-(-BPTR // NT)):
                                        if i * NT + tz * NTP + ty * k.threads_x + tx < BPTR:
                                            smem[PT + i * NT + tz * NTP + ty * k.threads_x + tx] = T.reinterpret(
                                                "float32", run_ptr[kg * (ROUNDS * KB) + i * NT + tz * NTP
                                                                   + ty * k.threads_x + tx])
                                    T.tvm_storage_sync("shared.dyn")
                                    issue(x, pairs, smem, src, n, 0, tz * NTP + ty * k.threads_x + tx)
                                    for r in T.serial(ROUNDS):
                                        if r + 1 < ROUNDS:  # round r + 1 streams in while round r is computed
                                            issue(x, pairs, smem, src, n, r + 1, tz * NTP + ty * k.threads_x + tx)
                                            T.evaluate(async_copy.wait(1))
                                        else:
                                            T.evaluate(async_copy.wait(0))
                                        T.tvm_storage_sync("shared.dyn")
                                        for m in T.unroll(CPT):  # slice tz // KZ takes every KS-th nonzero
                                            lo = bound(smem, r * KB + m * KZ + tz % KZ) - bound(smem, r * KB) + tz // KZ
                                            cnt = (bound(smem, r * KB + m * KZ + tz % KZ + 1)
                                                   - bound(smem, r * KB + m * KZ + tz % KZ) - tz // KZ + (KS - 1)) // KS
                                            for t in T.serial(cnt // U):
                                                for u in T.unroll(U):
                                                    fma_nonzero(acc, smem, r, m, ty * k.threads_x + tx,
                                                                lo + (t * U + u) * KS)
                                            for t in T.serial(cnt % U):
                                                fma_nonzero(acc, smem, r, m, ty * k.threads_x + tx,
                                                            lo + (cnt // U * U + t) * KS)
                                        T.tvm_storage_sync("shared.dyn")  # round r's buffers are free for round r + 2
                                    if KS > 1:  # slices 1.. hand their sums to slice 0 through the band buffers
                                        if tz >= KZ:
                                            for m in T.unroll(CPT):
                                                for p in T.unroll(P):
                                                    smem[(((tz - KZ) * CPT + m) * P + p) * NTP + ty * k.threads_x
                                                         + tx] = acc[m * P + p]
                                        T.tvm_storage_sync("shared.dyn")
                                        if tz < KZ:
                                            for z in T.unroll(KS - 1):
                                                for m in T.unroll(CPT):
                                                    for p in T.unroll(P):
                                                        acc[m * P + p] = acc[m * P + p] + smem[
                                                            ((((z * KZ + tz) * CPT + m) * P + p) * NTP)
                                                            + ty * k.threads_x + tx]
                                    for m in T.unroll(CPT):
                                        for p in T.unroll(P):
                                            if (tz < KZ and kg * KB + m * KZ + tz < K and Q(ty, tx, p) % SP < OW
                                                    and Q(ty, tx, p) // SP < TH
                                                    and band * TH + Q(ty, tx, p) // SP < OH):
                                                if res:
                                                    acc[m * P + p] = acc[m * P + p] + residual[
                                                        n, kg * KB + m * KZ + tz, band * TH + Q(ty, tx, p) // SP,
                                                        Q(ty, tx, p) % SP]
                                                if relu:
                                                    y[n, kg * KB + m * KZ + tz, band * TH + Q(ty, tx, p) // SP,
                                                      Q(ty, tx, p) % SP] = T.max(acc[m * P + p], T.float32(0))
                                                else:
                                                    y[n, kg * KB + m * KZ + tz, band * TH + Q(ty, tx, p) // SP,
                                                      Q(ty, tx, p) % SP] = acc[m * P + p]

    return drop_unused_residual(sparse_conv2d_staged, epilogue)
