"""CPU (llvm) kernel specialised to one pruned weight tensor: the same unrolled program as the CUDA one.

Parallel over (image, channel group); per output row tile of ``vector_width`` pixels, each tap is one
vector load from the padded input and one vector FMA per channel of the group that has a nonzero
there, the weight a constant. It runs every numeric path of the specialised program (grouping,
taps, epilogue) on CPU-only CI, and is available with ``build(..., kernel="specialized")``; it is not
part of the automatic choice on CPU (``in_auto``) until it is measured there.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from escort_tvm.compute import Epilogue
from escort_tvm.conv_spec import ConvSpec
from escort_tvm.sparse_format import SparseConvWeight

from .base import KernelPlan, Knobs, SparseConvRule
from .cpu import SparseConvCPU
from .cuda_specialized import _tree
from .unrolled import ChannelGroup, unrolled_program


# LLVM's compile time on one large unrolled function is minutes at this size; not measured beyond.
MAX_NONZEROS = 32768


@dataclass(frozen=True)
class SpecializedCPUKnobs(Knobs):
    channels_per_thread: int = 4  # vector accumulators per task
    vector_width: int = 8  # output pixels of one row per vector
    SPACE: ClassVar = {"channels_per_thread": (1, 2, 4, 8, 16), "vector_width": (4, 8, 16)}


class SpecializedCPU(SparseConvRule):
    name = "cpu.specialized"
    kernel = "specialized"
    in_auto = False
    Knobs = SpecializedCPUKnobs

    def is_target(self, target) -> bool:
        return target.kind.name == "llvm"

    def default_knobs(self, spec: ConvSpec, weight: SparseConvWeight) -> SpecializedCPUKnobs:
        return SpecializedCPUKnobs(channels_per_thread=4, vector_width=16 if spec.OW >= 12 else 8 if spec.OW >= 6 else 4)

    def apply(self, spec, weight, epilogue: Epilogue, knobs=None) -> KernelPlan:
        if weight.nnz > MAX_NONZEROS:
            raise ValueError(f"{weight.nnz} nonzeros exceed the specialised kernel's limit of {MAX_NONZEROS} "
                             "(code size and compile time grow with every nonzero)")
        knobs = knobs or self.default_knobs(spec, weight)
        knobs.validate()
        hp, wp = SparseConvCPU.pitch(spec, knobs)  # rows wide enough for the tail vector
        groups = unrolled_program(weight, knobs.channels_per_thread)
        func = specialized_cpu_kernel(spec, groups, epilogue, hp, wp, knobs.vector_width)
        return KernelPlan(func, hp, wp, (), self.name, knobs, spec)


def specialized_cpu_kernel(spec: ConvSpec, groups: list[ChannelGroup], epilogue: Epilogue, hp: int, wp: int, VW: int):
    """``(x_pad[N, C*hp*wp], bias[K], [residual[N,K,OH,OW]], y[N,K,OH,OW])``."""
    import tvm
    from tvm.script.ir_builder import IRBuilder
    from tvm.tirx.script.builder import ir as T

    N, K, OH, OW = spec.output_shape
    (sh, sw), (dh, dw) = spec.stride, spec.dilation
    CHW = spec.C * hp * wp
    OWT = -(-OW // VW)
    G = len(groups)
    KG = max(g.size for g in groups)
    residual = getattr(epilogue, "residual", False)
    f32 = lambda v: tvm.tirx.FloatImm("float32", v)  # noqa: E731

    with IRBuilder() as ib:
        with T.prim_func():
            T.func_name("escort_specialized_conv_cpu")
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
            x = T.arg("x", T.buffer((N, CHW), "float32"))
            bias = T.arg("bias", T.buffer((K,), "float32"))
            res = T.arg("residual", T.buffer((N, K, OH, OW), "float32")) if residual else None
            y = T.arg("y", T.buffer((N, K, OH, OW), "float32"))
            with T.parallel(0, N * G) as ng:
                n, gv = ng // G, ng % G
                with T.serial(0, OH) as oh, T.serial(0, OWT) as owo:
                    acc = T.alloc_buffer((KG * VW,), "float32", scope="local")
                    val = T.alloc_buffer((VW,), "float32", scope="local")
                    base = oh * (sh * wp) + owo * (VW * sw)
                    for j in range(KG):
                        with T.vectorized(0, VW) as v:
                            T.buffer_store(acc, f32(0.0), [j * VW + v])

                    def taps(gi):
                        for t in groups[gi].taps:
                            off = (t.c * hp + t.kh * dh) * wp + t.kw * dw
                            with T.vectorized(0, VW) as v:
                                T.buffer_store(val, x[n, base + off + v * sw], [v])
                            for j, w in t.fmas:
                                with T.vectorized(0, VW) as v:
                                    T.buffer_store(acc, acc[j * VW + v] + val[v] * f32(w), [j * VW + v])

                    with_taps = [gi for gi, g in enumerate(groups) if g.taps]
                    if with_taps:
                        _tree(T, gv, with_taps, taps, exact=len(with_taps) < G)

                    def store(gi):
                        g = groups[gi]
                        for j in range(g.size):
                            kk = g.first + j
                            with T.serial(0, VW) as v:
                                ow = owo * VW + v
                                with T.If(ow < OW):
                                    with T.Then():
                                        o = acc[j * VW + v] + bias[kk]
                                        if residual:
                                            o = o + res[n, kk, oh, ow]
                                        if epilogue.relu:
                                            o = T.max(o, f32(0.0))
                                        T.buffer_store(y, o, [n, kk, oh, ow])

                    _tree(T, gv, list(range(G)), store, exact=False)
    return ib.get()
