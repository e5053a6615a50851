"""The straight-line program of a kernel specialised to one pruned weight tensor.

Output channels are cut into groups; one thread of a group holds an accumulator per channel of the
group. For every input tap (c, kh, kw) where some channel of the group has a nonzero, the kernel
loads the input once and issues one FMA per such channel, with the weight as an immediate: zero
weights cost nothing and no index structure exists at run time (the code-generation paper and
SparseRT, ../shared/PAPERS.md). The CUDA and CPU emitters both walk this list; they differ only in
how a tap's input value is fetched.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from escort_tvm.sparse_format import SparseConvWeight


@dataclass(frozen=True)
class Tap:
    """One input position of the group's taps and the FMAs its value feeds."""

    c: int  # absolute input channel
    kh: int
    kw: int
    fmas: tuple[tuple[int, float], ...]  # (accumulator slot in the group, exact float32 weight)


@dataclass(frozen=True)
class ChannelGroup:
    first: int  # first output channel
    size: int  # channels (the last group may be short)
    taps: tuple[Tap, ...]  # sorted by (c, kh, kw), so they can be served channel chunk by chunk

    @property
    def fma_count(self) -> int:
        return sum(len(t.fmas) for t in self.taps)

    def chunks(self, chunk: int) -> list[tuple[int, tuple[Tap, ...]]]:
        """(chunk index, taps) for each block of ``chunk`` input channels that has taps."""
        out: dict[int, list[Tap]] = {}
        for t in self.taps:
            out.setdefault(t.c // chunk, []).append(t)
        return [(i, tuple(ts)) for i, ts in sorted(out.items())]


def unrolled_program(weight: SparseConvWeight, channels_per_group: int) -> list[ChannelGroup]:
    """Groups of ``channels_per_group`` consecutive output channels with their merged taps.

    Groups never straddle a conv group (``weight.groups``), so a group's taps stay within the input
    channels its output channels see.
    """
    if channels_per_group < 1:
        raise ValueError(f"channels_per_group must be >= 1, got {channels_per_group}")
    K = weight.K
    kg = K // weight.groups
    rows = np.repeat(np.arange(K), weight.row_lengths())
    groups = []
    for g0 in range(0, K, kg):  # conv groups
        for first in range(g0, g0 + kg, channels_per_group):
            size = min(channels_per_group, g0 + kg - first)
            sel = (rows >= first) & (rows < first + size)
            taps: dict[tuple[int, int, int], list[tuple[int, float]]] = {}
            for k, c, h, w, v in zip(rows[sel], weight.channel[sel], weight.kh[sel], weight.kw[sel],
                                     weight.values[sel]):
                taps.setdefault((int(c), int(h), int(w)), []).append((int(k - first), float(v)))
            groups.append(ChannelGroup(first, size, tuple(Tap(c, h, w, tuple(f)) for (c, h, w), f in
                                                          sorted(taps.items()))))
    return groups


def program_stats(groups: list[ChannelGroup]) -> dict:
    """Loads and FMAs the program issues per output pixel, summed over groups (what code size scales with)."""
    taps = sum(len(g.taps) for g in groups)
    fmas = sum(g.fma_count for g in groups)
    return {"groups": len(groups), "taps": taps, "fmas": fmas, "fmas_per_load": fmas / taps if taps else 0.0}
