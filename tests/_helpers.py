"""Helpers shared by the test modules: conv cases, random pruned weights, kernel runners, ONNX builders."""
from __future__ import annotations

import numpy as np
import pytest

from escort_tvm import ConvSpec

TOL = 1e-4


def rel_err(out, ref) -> float:
    out = np.asarray(out, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    assert out.shape == ref.shape, f"shape {out.shape} != reference shape {ref.shape}"
    assert np.isfinite(out).all(), f"{np.count_nonzero(~np.isfinite(out))} non-finite output elements (unwritten?)"
    ref_norm = np.linalg.norm(ref)
    assert ref_norm > 0, "reference is all zeros: the check would be meaningless"
    return float(np.linalg.norm(out - ref) / ref_norm)


def assert_close(out, ref, tol=TOL):
    err = rel_err(out, ref)
    assert err < tol, f"relative error {err:.3e} >= {tol}"


def pruned(rng, shape, sparsity) -> np.ndarray:
    """A float32 tensor with exactly round(sparsity * size) zeros at random positions, other entries nonzero."""
    size = int(np.prod(shape))
    w = rng.standard_normal(size).astype(np.float32)
    w[w == 0] = 1.0
    n_zero = int(round(sparsity * size))
    w[rng.permutation(size)[:n_zero]] = 0.0
    return w.reshape(shape)


def randn(rng, shape, scale=1.0) -> np.ndarray:
    return (rng.standard_normal(shape) * scale).astype(np.float32)


# (id, spec, sparsity): the conv cases every kernel (definition, CPU schedule, CUDA schedule) is checked on.
CONV_CASES = [
    ("1x1", ConvSpec(N=1, C=8, H=7, W=9, K=12, KH=1, KW=1), 0.5),
    ("3x3_pad1", ConvSpec(N=1, C=6, H=10, W=11, K=8, KH=3, KW=3, pad=(1, 1, 1, 1)), 0.8),
    ("5x5_pad2", ConvSpec(N=1, C=4, H=12, W=13, K=5, KH=5, KW=5, pad=(2, 2, 2, 2)), 0.9),
    ("7x7_s2", ConvSpec(N=1, C=3, H=17, W=15, K=8, KH=7, KW=7, stride=(2, 2), pad=(3, 3, 3, 3)), 0.7),
    ("11x11_s4", ConvSpec(N=1, C=3, H=35, W=39, K=6, KH=11, KW=11, stride=(4, 4), pad=(2, 2, 2, 2)), 0.95),
    ("5x3_nonsquare", ConvSpec(N=1, C=5, H=9, W=14, K=7, KH=5, KW=3, pad=(2, 1, 2, 1)), 0.6),
    ("3x3_s2", ConvSpec(N=1, C=8, H=15, W=16, K=8, KH=3, KW=3, stride=(2, 2), pad=(1, 1, 1, 1)), 0.75),
    ("3x3_s2x1", ConvSpec(N=1, C=4, H=13, W=10, K=6, KH=3, KW=3, stride=(2, 1), pad=(1, 0, 0, 1)), 0.7),
    ("asym_pad", ConvSpec(N=1, C=4, H=8, W=9, K=6, KH=3, KW=3, pad=(0, 2, 3, 1)), 0.8),
    ("dilation2", ConvSpec(N=1, C=5, H=12, W=11, K=6, KH=3, KW=3, pad=(2, 2, 2, 2), dilation=(2, 2)), 0.85),
    ("dilation_2x3_5x3", ConvSpec(N=1, C=4, H=14, W=15, K=4, KH=5, KW=3, pad=(4, 2, 3, 1), dilation=(2, 3)), 0.8),
    ("grouped", ConvSpec(N=1, C=6, H=9, W=10, K=9, KH=3, KW=3, pad=(1, 1, 1, 1), groups=3), 0.7),
    ("depthwise", ConvSpec(N=1, C=8, H=11, W=9, K=8, KH=3, KW=3, pad=(1, 1, 1, 1), groups=8), 0.6),
    ("depthwise_mult2_s2", ConvSpec(N=1, C=4, H=10, W=10, K=8, KH=3, KW=3, stride=(2, 2), pad=(1, 1, 1, 1),
                                    groups=4), 0.5),
    ("batch3", ConvSpec(N=3, C=5, H=8, W=10, K=7, KH=3, KW=3, pad=(1, 1, 1, 1)), 0.8),
    ("batch3_grouped_s2", ConvSpec(N=3, C=8, H=12, W=9, K=4, KH=3, KW=3, stride=(2, 2), pad=(0, 1, 1, 0),
                                   groups=2), 0.9),
    ("sparsity99", ConvSpec(N=1, C=32, H=9, W=9, K=16, KH=3, KW=3, pad=(1, 1, 1, 1)), 0.99),
    ("narrow_out", ConvSpec(N=1, C=3, H=5, W=3, K=4, KH=3, KW=3), 0.5),  # OW = 1: every vector lane past 0 is tail
    ("wide_out", ConvSpec(N=1, C=2, H=3, W=70, K=3, KH=1, KW=3, pad=(0, 1, 0, 1)), 0.5),  # OW = 70: many tiles
    # ~400 nonzeros per output channel: a CUDA block's CSR rows exceed one staged chunk
    ("long_rows", ConvSpec(N=2, C=64, H=6, W=7, K=8, KH=3, KW=3, pad=(1, 1, 1, 1)), 0.3),
]
CASE_IDS = [c[0] for c in CONV_CASES]


def case_params():
    return [pytest.param(spec, sp, id=name) for name, spec, sp in CONV_CASES]


def conv_data(rng, spec: ConvSpec, sparsity: float):
    """(x, dense pruned weight, bias), all float32 and nonzero where it matters."""
    x = randn(rng, spec.input_shape)
    w = pruned(rng, spec.weight_shape, sparsity)
    b = randn(rng, (spec.K,), 0.5)
    return x, w, b


def run_kernel(lib, name, spec: ConvSpec, x_pad, arrays, bias, dev=None) -> np.ndarray:
    """Call a compiled sparse-conv kernel with its output poisoned with NaN; returns the output."""
    import tvm

    dev = dev or tvm.cpu(0)
    y = np.full(spec.output_shape, np.nan, np.float32)
    args = [tvm.runtime.tensor(np.ascontiguousarray(a), dev) for a in (x_pad, *arrays, bias, y)]
    lib[name](*args)
    if dev.dlpack_device_type() != 1:
        dev.sync()
    return args[-1].numpy()


def kernel_input(plan, x, spec: ConvSpec) -> np.ndarray:
    """The kernel's first argument for NCHW input ``x``: the padded (N, C*hp*wp) input a KernelPlan reads
    (``plan.prepare_input`` where the plan has it, since a schedule may choose to read plain NCHW)."""
    from escort_tvm.compute import padded_input

    if hasattr(plan, "prepare_input") and getattr(plan, "spec", None) is not None:
        return plan.prepare_input(x)
    return padded_input(x, spec, plan.hp, plan.wp)


def func_name(func) -> str:
    return str(func.attrs["global_symbol"])


def all_modules(mod):
    yield mod
    for m in mod.imports:
        yield from all_modules(m)


def cuda_source(executable) -> str:
    """Concatenated CUDA source of every module of kind 'cuda' under an executable's module tree."""
    mods = [m for m in all_modules(executable.mod) if m.kind == "cuda"]
    return "".join(m.inspect_source() for m in mods)


# ---------------------------------------------------------------- ONNX
def onnx_model(nodes, inputs, outputs, initializers, opset=17):
    """inputs/outputs: [(name, shape)] (float32); initializers: {name: array}."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        nodes, "test_graph",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in outputs],
        initializer=[numpy_helper.from_array(np.asarray(v), k) for k, v in initializers.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def ort_run(model, feeds: dict):
    import onnxruntime as ort

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def ort_reference(model, feeds: dict) -> np.ndarray:
    """The first output of ``model`` under onnxruntime (CPU; its Conv has no float64 kernel), as float64."""
    return np.asarray(ort_run(model, feeds)[0], dtype=np.float64)


# ---------------------------------------------------------------- knob covers
def knob_cover(knobs_cls, valid=None, max_listed: int = 200_000, draws: int = 60_000):
    """A small list of valid knob sets in which every value of every knob appears at least once (greedy
    cover over the rule's declared space, deterministic: the whole space where it is small, else seeded
    draws of each knob independently)."""
    import math

    def ok(k):
        try:
            k.validate()
        except ValueError:
            return False
        return valid(k) if valid else True

    space = knobs_cls.SPACE
    names = list(space)
    uncovered = {(n, v) for n, vals in space.items() for v in vals}
    if math.prod(len(v) for v in space.values()) <= max_listed:
        cands = [k for k in knobs_cls.space() if ok(k)]
    else:
        rng = np.random.default_rng(0)
        picks = [rng.integers(len(space[n]), size=draws) for n in names]
        cands = list(dict.fromkeys(k for k in (knobs_cls(**{n: space[n][int(p[i])] for n, p in zip(names, picks)})
                                               for i in range(draws)) if ok(k)))
    chosen = []
    while uncovered:
        best = max(cands, key=lambda k: sum((n, getattr(k, n)) in uncovered for n in space))
        gain = {(n, getattr(best, n)) for n in space} & uncovered
        assert gain, f"values {sorted(uncovered)} of {knobs_cls.__name__} appear in no valid knob set"
        uncovered -= gain
        chosen.append(best)
    return chosen


STAGED_SHAPES = ("long_rows", "3x3_pad1", "batch3", "sparsity99", "5x5_pad2", "dilation2")


def staged_shape(knobs, shapes) -> str:
    """The first stride-1 case of CONV_CASES whose band and rounds a staged-input knob set can take (its shared
    memory and copies per thread depend on the shape)."""
    from schedules.cuda_staged import StagedGeometry

    for name in STAGED_SHAPES:
        try:
            StagedGeometry(shapes[name][0], knobs)
            return name
        except ValueError:
            continue
    raise AssertionError(f"no case of {STAGED_SHAPES} takes {knobs}")


def cover_shape(knobs, shapes, names, i: int) -> str:
    """The case a CSR knob set of a cover compiles on: a staged-input one on a stride-1 case it can take, else the
    i-th (cyclically) of ``names`` it can take (tap_mask has one bit per kernel position, at most MASK_TAPS)."""
    from schedules.cuda import MASK_TAPS

    if knobs.stage_input:
        return staged_shape(knobs, shapes)
    takes = [n for n in names if not (knobs.tap_mask and shapes[n][0].KH * shapes[n][0].KW > MASK_TAPS)]
    return takes[i % len(takes)]


GLOBAL_FN = r"__global__\s+void\s+(?:__launch_bounds__\(\s*\d+\s*\)\s+)?(\w+)\s*\("
