"""CPU (llvm) schedule: parallel over (image, output channel), vectorised along the output row."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from escort_tvm.compute import Epilogue, drop_unused_residual
from escort_tvm.conv_spec import ConvSpec
from escort_tvm.sparse_format import SparseConvWeight

from .base import KernelPlan, Knobs, SparseConvRule, csr_arrays


@dataclass(frozen=True)
class CPUKnobs(Knobs):
    vector_width: int = 8  # output pixels of one row held in one vector accumulator
    SPACE: ClassVar = {"vector_width": (4, 8, 16, 32)}


class SparseConvCPU(SparseConvRule):
    """Each task owns one (n, k) pair; per output-row tile, the CSR row is walked once and every
    nonzero updates ``vector_width`` accumulators from one contiguous (stride 1) input run."""

    name = "cpu.row_vector"
    kernel = "sparse"
    Knobs = CPUKnobs

    def is_target(self, target) -> bool:
        return target.kind.name == "llvm"

    def default_knobs(self, spec: ConvSpec, weight: SparseConvWeight) -> CPUKnobs:
        # Widest vector that the row fills at least half of: AVX-512 holds 16 floats.
        width = 16 if spec.OW >= 12 else 8 if spec.OW >= 6 else 4
        return CPUKnobs(vector_width=width)

    @staticmethod
    def pitch(spec: ConvSpec, knobs: CPUKnobs) -> tuple[int, int]:
        # Pad each row wide enough that the tail tile's unused lanes read inside the same row.
        owt = -(-spec.OW // knobs.vector_width) * knobs.vector_width
        need = (owt - 1) * spec.stride[1] + (spec.KW - 1) * spec.dilation[1] + 1
        return spec.Hp, max(spec.Wp, need)

    def apply(self, spec, weight, epilogue: Epilogue, knobs=None) -> KernelPlan:
        knobs = knobs or self.default_knobs(spec, weight)
        knobs.validate()
        hp, wp = self.pitch(spec, knobs)
        arrays = csr_arrays(weight, spec, hp, wp)
        func = _cpu_kernel(spec, len(arrays[1]), epilogue, hp, wp, knobs.vector_width)
        return KernelPlan(func, hp, wp, arrays, self.name, knobs, spec)


def _cpu_kernel(spec: ConvSpec, nnz: int, epilogue: Epilogue, hp: int, wp: int, VW: int):
    from tvm.script import tirx as T

    N, K, OH, OW = spec.output_shape
    sh, sw = spec.stride
    CHW = spec.C * hp * wp
    OWT = -(-OW // VW)
    relu, res = epilogue.relu, epilogue.residual

    @T.prim_func(s_tir=True)
    def sparse_conv2d_cpu(x: T.Buffer((N, CHW), "float32"), row_ptr: T.Buffer((K + 1,), "int32"),
                          offset: T.Buffer((nnz,), "int32"), value: T.Buffer((nnz,), "float32"),
                          bias: T.Buffer((K,), "float32"), residual: T.Buffer((N, K, OH, OW), "float32"),
                          y: T.Buffer((N, K, OH, OW), "float32")):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        for nk in T.parallel(N * K):
            for oh, owo in T.grid(OH, OWT):
                with T.sblock("conv"):
                    n = T.axis.spatial(N, nk // K)
                    k = T.axis.spatial(K, nk % K)
                    voh, vowo = T.axis.remap("SS", [oh, owo])
                    if res:
                        T.reads(x[n, 0:CHW], row_ptr[k:k + 2], offset[0:nnz], value[0:nnz], bias[k],
                                residual[n, k, voh, vowo * VW:vowo * VW + VW])
                    else:
                        T.reads(x[n, 0:CHW], row_ptr[k:k + 2], offset[0:nnz], value[0:nnz], bias[k])
                    T.writes(y[n, k, voh, vowo * VW:vowo * VW + VW])
                    acc = T.alloc_buffer((VW,), "float32", scope="local")
                    for v in T.vectorized(VW):
                        acc[v] = bias[k]
                    for j in T.serial(row_ptr[k], row_ptr[k + 1]):
                        for v in T.vectorized(VW):
                            acc[v] = acc[v] + value[j] * x[n, offset[j] + voh * (sh * wp) + (vowo * VW + v) * sw]
                    for v in T.serial(VW):
                        if vowo * VW + v < OW:
                            if res:
                                acc[v] = acc[v] + residual[n, k, voh, vowo * VW + v]
                            if relu:
                                y[n, k, voh, vowo * VW + v] = T.max(acc[v], T.float32(0))
                            else:
                                y[n, k, voh, vowo * VW + v] = acc[v]

    return drop_unused_residual(sparse_conv2d_cpu, epilogue)
