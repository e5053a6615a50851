"""What the sparse direct convolution computes: the float64 reference and the TIR definition.

The TIR definition is the unscheduled algorithm (one output element per block instance, a serial
loop over the channel's CSR row); the schedules in ``schedules/`` are faster renderings of it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .conv_spec import ConvSpec


@dataclass(frozen=True)
class Epilogue:
    """What is fused after the accumulation: ``y = relu?(acc + bias[k] + residual[n, k, oh, ow]?)``.

    The bias is always added (zeros when the model has none; a folded BatchNormalization lands in
    it too). With ``residual`` the kernel takes one more input, a tensor of the output's shape (a
    ResNet shortcut), between ``bias`` and ``y``.
    """

    relu: bool = False
    residual: bool = False

    def describe(self) -> str:
        return "bias" + (" + residual" if self.residual else "") + (" + relu" if self.relu else "")


def drop_unused_residual(func, epilogue: Epilogue):
    """The kernel without its ``residual`` parameter when the epilogue has none.

    Kernels are written once with every parameter (TVMScript signatures cannot vary); a static
    ``if`` keeps the body from touching ``residual``, so the parameter can simply be removed.
    """
    if epilogue.residual:
        return func
    from tvm import tirx

    params = [p for p in func.params if p.name != "residual"]
    if len(params) != len(func.params) - 1:
        raise ValueError(f"kernel parameters {[p.name for p in func.params]} have no single 'residual'")
    return tirx.PrimFunc(params, func.body, func.ret_type, func.attrs)


def conv2d_reference(x, weight, spec: ConvSpec, bias=None, relu=False, residual=None) -> np.ndarray:
    """Dense conv2d in float64 (the ground truth every kernel is checked against), then
    ``+ bias``, ``+ residual`` (the output's shape) and ReLU, in the epilogue's order."""
    x = np.asarray(x, dtype=np.float64)
    w = np.asarray(weight, dtype=np.float64)
    pt, pl, pb, pr = spec.pad
    (sh, sw), (dh, dw) = spec.stride, spec.dilation
    xp = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    out = np.zeros(spec.output_shape, dtype=np.float64)
    Kg, Cg = spec.K // spec.groups, spec.Cg
    for g in range(spec.groups):
        xs = xp[:, g * Cg:(g + 1) * Cg]
        for kh in range(spec.KH):
            for kw in range(spec.KW):
                patch = xs[:, :, kh * dh: kh * dh + sh * (spec.OH - 1) + 1: sh,
                           kw * dw: kw * dw + sw * (spec.OW - 1) + 1: sw]
                out[:, g * Kg:(g + 1) * Kg] += np.einsum("nchw,kc->nkhw", patch, w[g * Kg:(g + 1) * Kg, :, kh, kw])
    if bias is not None:
        out += np.asarray(bias, dtype=np.float64).reshape(1, -1, 1, 1)
    if residual is not None:
        residual = np.asarray(residual, dtype=np.float64)
        if residual.shape != out.shape:
            raise ValueError(f"residual shape {residual.shape} != conv output shape {out.shape}")
        out += residual
    if relu:
        out = np.maximum(out, 0.0)
    return out


def padded_input(x: np.ndarray, spec: ConvSpec, hp: int, wp: int) -> np.ndarray:
    """The (N, C*hp*wp) padded input a sparse kernel reads; extra rows/columns beyond the conv's pad are zeros.

    ``(hp, wp) == (H, W)`` is the plain input, flattened, even for a padded conv: the kernel needs no border
    or makes its own (the graph pass then emits no pad op either)."""
    if (hp, wp) == (spec.H, spec.W):
        return np.ascontiguousarray(x).reshape(spec.N, -1)
    pt, pl = spec.pad[0], spec.pad[1]
    out = np.zeros((spec.N, spec.C, hp, wp), dtype=x.dtype)
    out[:, :, pt:pt + spec.H, pl:pl + spec.W] = x
    return out.reshape(spec.N, -1)


def sparse_conv_definition(spec: ConvSpec, nnz: int, epilogue: Epilogue, hp: int, wp: int):
    """The unscheduled TIR of y = epilogue(sum over the CSR row of val * x_pad[offset + base]).

    Parameters: ``(x_pad, row_ptr, offset, value, bias, residual (only with epilogue.residual), y)``.
    """
    from tvm.script import tirx as T

    N, K, OH, OW = spec.output_shape
    sh, sw = spec.stride
    CHW = spec.C * hp * wp
    NNZ = max(nnz, 1)  # a zero-length buffer is not legal; an all-zero weight keeps one dummy slot
    relu, res = epilogue.relu, epilogue.residual

    @T.prim_func(s_tir=True)
    def sparse_conv2d(x: T.Buffer((N, CHW), "float32"), row_ptr: T.Buffer((K + 1,), "int32"),
                      offset: T.Buffer((NNZ,), "int32"), value: T.Buffer((NNZ,), "float32"),
                      bias: T.Buffer((K,), "float32"), residual: T.Buffer((N, K, OH, OW), "float32"),
                      y: T.Buffer((N, K, OH, OW), "float32")):
        T.func_attr({"tirx.noalias": True})
        for n, k, oh, ow in T.grid(N, K, OH, OW):
            with T.sblock("conv"):
                vn, vk, voh, vow = T.axis.remap("SSSS", [n, k, oh, ow])
                if res:
                    T.reads(x[vn, 0:CHW], row_ptr[vk:vk + 2], offset[0:NNZ], value[0:NNZ], bias[vk],
                            residual[vn, vk, voh, vow])
                else:
                    T.reads(x[vn, 0:CHW], row_ptr[vk:vk + 2], offset[0:NNZ], value[0:NNZ], bias[vk])
                T.writes(y[vn, vk, voh, vow])
                acc = T.alloc_buffer((1,), "float32", scope="local")
                acc[0] = bias[vk]
                for j in T.serial(row_ptr[vk], row_ptr[vk + 1]):
                    acc[0] = acc[0] + value[j] * x[vn, offset[j] + voh * (sh * wp) + vow * sw]
                if res:
                    acc[0] = acc[0] + residual[vn, vk, voh, vow]
                if relu:
                    y[vn, vk, voh, vow] = T.max(acc[0], T.float32(0))
                else:
                    y[vn, vk, voh, vow] = acc[0]

    return drop_unused_residual(sparse_conv2d, epilogue)
