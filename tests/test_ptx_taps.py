"""schedules.ptx_taps: the inline-PTX blocks the specialised CUDA kernel is made of.

The GPU checks (scripts/gpu_check.py, the benchmark) run these blocks for real; here, without a GPU, a
small interpreter of the two PTX instructions a block uses executes the rendered text against numpy
memory, so a wrong offset unit, operand number or weight encoding fails in CI.
"""
from __future__ import annotations

import re
import struct

import numpy as np
import pytest

from escort_tvm import ConvSpec, Epilogue, SparseConvWeight
from schedules import SpecializedCUDA
from schedules.ptx_taps import MAX_OPERANDS, TapRun, render
from _helpers import pruned

_LD = re.compile(r"ld\.(shared|global\.nc|global\.cs)(?:\.v(\d))?\.f32 (t|\{t0(?:, t\d)*\}), \[%(\d+)\+(\d+)\];")
_FMA = re.compile(r"fma\.rn\.f32 %(\d+), t(\d?), 0f([0-9A-F]{8}), %\1;")


def run_block(define: str, acc: list[float], memory: np.ndarray, base: int) -> list[float]:
    """Execute a rendered ``#define`` on float32 ``memory`` (byte address ``base`` = the pointer operand)."""
    text = re.search(r'asm volatile\("\{ \.reg \.f32 t(?:0(?:, t\d)*)?; (.*) \}"', define).group(1)
    acc = [np.float32(a) for a in acc]
    t = {}
    for ins in [s.strip() + ";" for s in text.split(";") if s.strip()]:
        if m := _LD.fullmatch(ins):
            width = int(m.group(2) or 1)
            assert (m.group(3) == "t") == (width == 1), f"destination registers do not match the width: {ins}"
            assert int(m.group(4)) == len(acc), "the load's base must be the operand after the accumulators"
            addr = base + int(m.group(5))
            assert addr % (4 * width) == 0, f"a {width}-float load at byte {addr} is misaligned"
            t = {("" if width == 1 else str(i)): memory[addr // 4 + i] for i in range(width)}
        elif m := _FMA.fullmatch(ins):
            w = np.float32(struct.unpack(">f", bytes.fromhex(m.group(3)))[0])
            i, v = int(m.group(1)), t[m.group(2)]
            acc[i] = np.float32(np.fma(v, w, acc[i]) if hasattr(np, "fma") else v * w + acc[i])
        else:
            raise AssertionError(f"unexpected instruction {ins!r}")
    return acc


def test_block_computes_the_taps(rng):
    mem = rng.standard_normal(64).astype(np.float32)
    run = TapRun("shared", ((0, ((3, 0.5), (7, -2.0))), (12, ((7, 1.25),)), (40, ((0, 3.0), (3, -0.75)))))
    name, define = render(run)
    assert define.startswith(f"#define {name}(a0, a1, a2, p) ")
    assert '"r"((unsigned)__cvta_generic_to_shared(p))' in define and '"memory"' in define
    base = 8  # bytes
    got = run_block(define, [1.0, 2.0, 3.0], mem, base)  # slots 0, 3, 7 -> operands 0, 1, 2
    m = lambda off: mem[(base + off) // 4]  # noqa: E731
    want = [1.0 + 3.0 * m(40), 2.0 + 0.5 * m(0) - 0.75 * m(40), 3.0 - 2.0 * m(0) + 1.25 * m(12)]
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_global_block_and_exact_weight_bits():
    w = float(np.float32(0.1))
    _, define = render(TapRun("global", ((4, ((0, w),)),)))
    assert "ld.global.nc.f32" in define and '"l"(p)' in define
    assert "0f" + struct.pack(">f", np.float32(w)).hex().upper() in define


def test_vector_block_reads_each_lane_for_its_taps(rng):
    """width 2: one aligned v2 load per pair of floats, each FMA naming its lane (pixel e of a thread reads
    element offset + e, so lane = (offset + e) % 2)."""
    mem = rng.standard_normal(64).astype(np.float32)
    run = TapRun("global", ((0, ((0, 0.5, 1), (2, -2.0, 0))), (24, ((1, 1.25, 0), (0, 3.0, 1)))), width=2)
    name, define = render(run)
    assert "ld.global.nc.v2.f32 {t0, t1}, [%3+0];" in define and ".reg .f32 t0, t1;" in define
    base = 16
    got = run_block(define, [1.0, 2.0, 3.0], mem, base)
    m = lambda off: mem[(base + off) // 4]  # noqa: E731
    want = [1.0 + 0.5 * m(4) + 3.0 * m(28), 2.0 + 1.25 * m(24), 3.0 - 2.0 * m(0)]
    np.testing.assert_allclose(got, want, rtol=1e-6)
    with pytest.raises(AssertionError, match="misaligned"):  # the interpreter does check alignment
        run_block(define, [1.0, 2.0, 3.0], mem, base + 4)


def test_evict_first_marks_the_global_loads():
    _, plain = render(TapRun("global", ((0, ((0, 1.0),)),)))
    _, scalar = render(TapRun("global", ((0, ((0, 1.0),)),), evict_first=True))
    _, vector = render(TapRun("global", ((16, ((0, 1.0, 3),)),), width=4, evict_first=True))
    assert "ld.global.nc.f32" in plain and "ld.global.cs.f32 t," in scalar
    assert "ld.global.cs.v4.f32 {t0, t1, t2, t3}" in vector
    one = ((0, ((0, 1.0),)),)
    assert render(TapRun("global", one, evict_first=True))[0] != render(TapRun("global", one))[0]  # names differ


def test_names_are_content_hashes():
    a = render(TapRun("shared", ((0, ((0, 1.0),)),)))
    assert render(TapRun("shared", ((0, ((0, 1.0),)),))) == a
    assert render(TapRun("shared", ((0, ((0, 2.0),)),)))[0] != a[0]
    assert render(TapRun("global", ((0, ((0, 1.0),)),)))[0] != a[0]


@pytest.mark.parametrize("run,match", [
    (TapRun("shared", ((-4, ((0, 1.0),)),)), "offset"),
    (TapRun("shared", ((2**31, ((0, 1.0),)),)), "offset"),
    (TapRun("local", ((0, ((0, 1.0),)),)), "memory space"),
    (TapRun("shared", ((0, tuple((j, 1.0) for j in range(MAX_OPERANDS))),)), "operand limit"),
    (TapRun("global", ((4, ((0, 1.0, 0),)),), width=2), "aligned"),
    (TapRun("global", ((0, ((0, 1.0, 0),)),), width=3), "1, 2 or 4"),
    (TapRun("shared", ((0, ((0, 1.0),)),), evict_first=True), "global loads"),
])
def test_bad_runs_are_refused(run, match):
    with pytest.raises(ValueError, match=match):
        render(run)


@pytest.mark.parametrize("knobs", [{}, {"input_parts": 2}, {"input_parts": 4, "channel_chunk": 4},
                                   {"input_parts": 2, "stage_input": False}],
                         ids=["one_kernel", "input_parts_2", "input_parts_4", "input_parts_2_direct"])
def test_kernel_issues_every_nonzero_as_one_ptx_fma(rng, knobs):
    """The whole unrolled program goes through PTX blocks: one ``fma.rn.f32`` per nonzero, none in C; cut
    into input pieces (one kernel each), every nonzero is still issued exactly once."""
    spec = ConvSpec(N=1, C=16, H=8, W=8, K=16, KH=3, KW=3, pad=(0, 0, 0, 0) if knobs.get("stage_input") is False
                    else (1, 1, 1, 1))
    weight = SparseConvWeight.from_dense(pruned(rng, spec.weight_shape, 0.8))
    rule = SpecializedCUDA()
    plan = rule.apply(spec, weight, Epilogue(), rule.default_knobs(spec, weight).with_(**knobs))
    script = plan.func.script()  # each cuda_func_call carries its block's #define once
    assert script.count("fma.rn.f32") == weight.nnz
    assert not re.search(r"\* T\.float32\(", script), "an FMA was emitted as a TIR multiply"


_MOVE = re.compile(r"(?:st\.shared\.f32 \[%(\d+)\+(\d+)\], %(\d+)|ld\.shared\.f32 %(\d+), \[%(\d+)\+(\d+)\]);")


def run_park(define: str, acc: list[float], memory: np.ndarray, base: int) -> list[float]:
    """Execute a rendered park/unpark ``#define`` on float32 ``memory``; returns the accumulators after it."""
    text = re.search(r'asm volatile\("\{ (.*) \}"', define).group(1)
    acc = [np.float32(a) for a in acc]
    for ins in [s.strip() + ";" for s in text.split(";") if s.strip()]:
        m = _MOVE.fullmatch(ins)
        assert m, f"unexpected instruction {ins!r}"
        if m.group(1) is not None:  # store
            assert int(m.group(1)) == len(acc)
            memory[(base + int(m.group(2))) // 4] = acc[int(m.group(3))]
        else:
            assert int(m.group(5)) == len(acc)
            acc[int(m.group(4))] = memory[(base + int(m.group(6))) // 4]
    return acc


def test_park_and_unpark_round_trip_at_the_stride():
    from schedules.ptx_taps import render_park

    mem = np.zeros(64, np.float32)
    _, store = render_park(3, 64, store=True)  # slot i at base + 64 * i bytes
    _, load = render_park(3, 64, store=False)
    assert '"f"(a0)' in store and '"=f"(a0)' in load and '"memory"' in store and '"memory"' in load
    run_park(store, [1.5, -2.0, 3.25], mem, 8)
    assert mem[2] == 1.5 and mem[2 + 16] == -2.0 and mem[2 + 32] == 3.25 and np.count_nonzero(mem) == 3
    assert run_park(load, [0.0, 0.0, 0.0], mem, 8) == [1.5, -2.0, 3.25]
    with pytest.raises(ValueError, match="cannot park"):
        render_park(MAX_OPERANDS, 4, store=True)
