"""CUDA schedule: threads over output pixels, a block's output channels' CSR rows staged in shared memory.

Escort's mapping, generalised: block (pixel tile, channel group, image); each thread owns one output
pixel (consecutive threads take consecutive pixels of a row, so loads and stores coalesce) and
``channels_per_block`` accumulators. The group's nonzeros (stretched offset, value) are copied to
shared memory in chunks and read back as broadcasts by every thread of the block.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from escort_tvm.compute import Epilogue
from escort_tvm.conv_spec import ConvSpec
from escort_tvm.sparse_format import SparseConvWeight

from .base import KernelPlan, Knobs, SparseConvRule, csr_arrays


@dataclass(frozen=True)
class CUDAKnobs(Knobs):
    threads: int = 128  # output pixels per block (one per thread)
    channels_per_block: int = 4  # output channels whose rows share one staged chunk
    chunk: int = 512  # nonzeros staged in shared memory at a time
    SPACE: ClassVar = {"threads": (64, 128, 256), "channels_per_block": (1, 2, 4, 8), "chunk": (256, 512, 1024)}


class SparseConvCUDA(SparseConvRule):
    name = "cuda.pixel_threads"
    Knobs = CUDAKnobs

    def is_target(self, target) -> bool:
        return target.kind.name == "cuda"

    def default_knobs(self, spec: ConvSpec, weight: SparseConvWeight) -> CUDAKnobs:
        P = spec.OH * spec.OW
        threads = 64 if P <= 64 else 128 if P <= 4096 else 256
        return CUDAKnobs(threads=threads, channels_per_block=4 if spec.K >= 4 else 1, chunk=512)

    def apply(self, spec, weight, epilogue: Epilogue, knobs=None) -> KernelPlan:
        knobs = knobs or self.default_knobs(spec, weight)
        knobs.validate()
        hp, wp = spec.Hp, spec.Wp
        arrays = csr_arrays(weight, spec, hp, wp)
        func = _cuda_kernel(spec, len(arrays[1]), epilogue, hp, wp, knobs)
        return KernelPlan(func, hp, wp, arrays, self.name, knobs, spec)


def _cuda_kernel(spec: ConvSpec, nnz: int, epilogue: Epilogue, hp: int, wp: int, knobs: CUDAKnobs):
    from tvm.script import tirx as T

    N, K, OH, OW = spec.output_shape
    sh, sw = spec.stride
    CHW = spec.C * hp * wp
    P = OH * OW
    TP, KB, CH = knobs.threads, knobs.channels_per_block, knobs.chunk
    PB = -(-P // TP)
    KG = -(-K // KB)
    LOADS = -(-CH // TP)
    relu = epilogue.relu

    @T.prim_func(s_tir=True)
    def sparse_conv2d_cuda(x: T.Buffer((N, CHW), "float32"), row_ptr: T.Buffer((K + 1,), "int32"),
                           offset: T.Buffer((nnz,), "int32"), value: T.Buffer((nnz,), "float32"),
                           bias: T.Buffer((K,), "float32"), y: T.Buffer((N, K, OH, OW), "float32")):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        for n in T.thread_binding(N, thread="blockIdx.z"):
            for kg in T.thread_binding(KG, thread="blockIdx.y"):
                for pb in T.thread_binding(PB, thread="blockIdx.x"):
                    for tx in T.thread_binding(TP, thread="threadIdx.x"):
                        with T.sblock("conv"):
                            T.reads(x[n, 0:CHW], row_ptr[0:K + 1], offset[0:nnz], value[0:nnz], bias[0:K])
                            T.writes(y[n, 0:K, 0:OH, 0:OW])
                            s_off = T.alloc_buffer((CH,), "int32", scope="shared")
                            s_val = T.alloc_buffer((CH,), "float32", scope="shared")
                            acc = T.alloc_buffer((KB,), "float32", scope="local")
                            p = T.min(pb * TP + tx, P - 1)
                            base = (p // OW) * (sh * wp) + (p % OW) * sw
                            start = row_ptr[kg * KB]
                            end = row_ptr[T.min(kg * KB + KB, K)]
                            for kb in T.unroll(KB):
                                acc[kb] = bias[T.min(kg * KB + kb, K - 1)]
                            for c in T.serial((end - start + (CH - 1)) // CH):
                                for i in T.serial(LOADS):
                                    if i * TP + tx < CH and start + c * CH + i * TP + tx < end:
                                        s_off[i * TP + tx] = offset[start + c * CH + i * TP + tx]
                                        s_val[i * TP + tx] = value[start + c * CH + i * TP + tx]
                                T.tvm_storage_sync("shared")
                                for kb in T.unroll(KB):
                                    for j in T.serial(
                                            T.max(row_ptr[T.min(kg * KB + kb, K)] - start - c * CH, 0),
                                            T.min(row_ptr[T.min(kg * KB + kb + 1, K)] - start - c * CH, CH)):
                                        acc[kb] = acc[kb] + s_val[j] * x[n, s_off[j] + base]
                                T.tvm_storage_sync("shared")
                            for kb in T.unroll(KB):
                                if kg * KB + kb < K and pb * TP + tx < P:
                                    if relu:
                                        y[n, kg * KB + kb, p // OW, p % OW] = T.max(acc[kb], T.float32(0))
                                    else:
                                        y[n, kg * KB + kb, p // OW, p % OW] = acc[kb]

    return sparse_conv2d_cuda
