"""The sparse weight format: one CSR row per output channel, with Escort's stretched offsets.

A nonzero w[k, c, kh, kw] is stored with its absolute input channel (group offset added), so a
kernel needs no group logic. ``stretched_offsets(hp, wp)`` turns each nonzero into one flat offset
into a padded input of pitch (hp, wp): output pixel (oh, ow) then reads
``x_pad[n, offset + oh*sh*wp + ow*sw]``. The pitch is the schedule's choice (it may pad wider than
the conv needs so that vector tails stay in bounds), so offsets are made for a pitch, not stored.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

INT32_MAX = 2**31 - 1


@dataclass(frozen=True, eq=False)
class SparseConvWeight:
    row_ptr: np.ndarray  # (K+1,) int32
    channel: np.ndarray  # (nnz,) int32, absolute input channel
    kh: np.ndarray  # (nnz,) int32
    kw: np.ndarray  # (nnz,) int32
    values: np.ndarray  # (nnz,) float32
    shape: tuple[int, int, int, int]  # dense OIHW shape (K, C/groups, KH, KW)
    groups: int = 1

    @classmethod
    def from_dense(cls, weight: np.ndarray, groups: int = 1) -> "SparseConvWeight":
        weight = np.asarray(weight)
        if weight.ndim != 4:
            raise ValueError(f"conv weight must be 4-D (K, C/groups, KH, KW), got shape {weight.shape}")
        if weight.dtype != np.float32:
            raise TypeError(f"conv weight must be float32, got {weight.dtype}")
        K, Cg, KH, KW = weight.shape
        if K % groups:
            raise ValueError(f"groups={groups} does not divide K={K}")
        k, c, h, w = np.nonzero(weight)  # row-major: sorted by k, then (c, kh, kw)
        row_ptr = np.zeros(K + 1, dtype=np.int64)
        np.add.at(row_ptr, k + 1, 1)
        group = k // (K // groups)
        return cls(
            row_ptr=np.cumsum(row_ptr).astype(np.int32),
            channel=(group * Cg + c).astype(np.int32),
            kh=h.astype(np.int32),
            kw=w.astype(np.int32),
            values=weight[k, c, h, w].astype(np.float32),
            shape=(K, Cg, KH, KW),
            groups=groups,
        )

    @property
    def nnz(self) -> int:
        return int(self.values.size)

    @property
    def K(self) -> int:
        return self.shape[0]

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nnz / float(np.prod(self.shape))

    def row_lengths(self) -> np.ndarray:
        return np.diff(self.row_ptr)

    def stretched_offsets(self, hp: int, wp: int, dilation=(1, 1)) -> np.ndarray:
        """Flat offset of each nonzero into a padded (C, hp, wp) input plane stack."""
        off = (self.channel.astype(np.int64) * hp + self.kh * dilation[0]) * wp + self.kw * dilation[1]
        if off.size and off.max() > INT32_MAX:
            raise OverflowError(f"stretched offsets exceed int32 for a {hp}x{wp} padded input")
        return off.astype(np.int32)

    def to_dense(self) -> np.ndarray:
        K, Cg, KH, KW = self.shape
        out = np.zeros(self.shape, dtype=np.float32)
        k = np.repeat(np.arange(K), self.row_lengths())
        out[k, self.channel - (k // (K // self.groups)) * Cg, self.kh, self.kw] = self.values
        return out
