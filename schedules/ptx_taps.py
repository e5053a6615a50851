"""A run of unrolled taps as one inline-PTX block: loads at immediate offsets, FMAs with immediate weights.

Why: written as one C statement per FMA, nvcc's front end (cicc) spends ~1 ms on every nonzero and
dominates the specialised kernel's compile time; the same instructions inside one ``asm`` statement
cost cicc next to nothing, and ptxas, which schedules and allocates registers for them anyway, is
~7x faster per instruction (docs/notes/specialized-codegen.md). The block is emitted through TVM's
``cuda_func_call`` as a macro, so the kernel stays a TIR PrimFunc and the accumulators stay TIR buffers.
"""
from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

import numpy as np

# Inline asm takes a bounded number of operands: 32 channels x 4 rows of accumulators plus the base
# (129, checked to compile with nvcc 13.0).
MAX_OPERANDS = 129
INT32_MAX = 2**31 - 1


@dataclass(frozen=True)
class TapRun:
    """Straight-line taps that read one memory space relative to one base address."""

    space: str  # "shared" (staged tile) or "global" (read-only path)
    # (byte offset, ((acc slot, weight), ...)); with width > 1, ((acc slot, weight, lane), ...): the load brings
    # ``width`` consecutive floats (offset aligned to width * 4 bytes from an aligned base) and each FMA names one
    taps: tuple[tuple[int, tuple[tuple, ...]], ...]
    # The base comes with a condition, and the macro takes a second address read from where it is false (a zero
    # page, for a kernel position that falls in the padding): the select is one C expression outside the block.
    guarded: bool = False
    width: int = 1  # floats per load: 1, 2 or 4 (ld.*.v2/v4)
    # Global loads marked evict-first (ld.global.cs) instead of the read-only path: for input read once, so it
    # does not push out of L1/L2 what is read again (and, measured on H200, streams faster: notes v18).
    evict_first: bool = False

    @property
    def slots(self) -> list[int]:
        return sorted({f[0] for _, fm in self.taps for f in fm})


def _imm(w: float) -> str:
    """A float32 as a PTX immediate (exact bits)."""
    return "0f" + struct.pack(">f", np.float32(w)).hex().upper()


def render(run: TapRun) -> tuple[str, str]:
    """(macro name, ``#define``) of the block; the macro's arguments are the used accumulators, then the base.

    The name is a hash of the text, so blocks from different convs of one module never collide.
    """
    slots = run.slots
    if len(slots) + 1 > MAX_OPERANDS:  # (the guard and fallback fold into the one address operand)
        raise ValueError(f"a tap run with {len(slots)} accumulators exceeds the inline-asm operand limit")
    op = {j: i for i, j in enumerate(slots)}
    base = len(slots)
    if run.space == "shared":
        load, ptr = "ld.shared.f32", '"r"((unsigned)__cvta_generic_to_shared(p))'
    elif run.space == "global":
        load = "ld.global.cs.f32" if run.evict_first else "ld.global.nc.f32"
        ptr = '"l"((c) ? (p) : (z))' if run.guarded else '"l"(p)'
    else:
        raise ValueError(f"unknown memory space {run.space!r}")
    if run.width not in (1, 2, 4):
        raise ValueError(f"tap loads are 1, 2 or 4 floats wide, not {run.width}")
    # one float lands in t; a vector in t0 .. t{width-1}, each FMA naming its lane
    lanes = ["t"] if run.width == 1 else [f"t{i}" for i in range(run.width)]
    dest = lanes[0] if run.width == 1 else "{" + ", ".join(lanes) + "}"
    if run.width > 1:
        load = load.replace(".f32", f".v{run.width}.f32")
    body = []
    for off, fmas in run.taps:
        if not 0 <= off <= INT32_MAX:
            raise ValueError(f"tap offset {off} bytes does not fit a PTX immediate offset")
        if run.width > 1 and off % (4 * run.width):
            raise ValueError(f"a {run.width}-float tap load at byte offset {off} is not {4 * run.width}-byte aligned")
        body.append(f"{load} {dest}, [%{base}+{off}];")
        body += [f"fma.rn.f32 %{op[f[0]]}, {lanes[f[2] if run.width > 1 else 0]}, {_imm(f[1])}, %{op[f[0]]};"
                 for f in fmas]
    regs = ", ".join(lanes)
    text = "{ .reg .f32 " + regs + "; " + " ".join(body) + " }"
    if run.guarded and run.space != "global":
        raise ValueError("a guarded base (zero page) is for global loads")
    if run.evict_first and run.space != "global":
        raise ValueError("evict_first is a hint for global loads")
    key = f"{run.space}|guarded|{text}" if run.guarded else f"{run.space}|{text}"
    name = "escort_taps_" + hashlib.sha1(key.encode()).hexdigest()[:16]
    args = ", ".join([f"a{i}" for i in range(len(slots))] + (["c", "p", "z"] if run.guarded else ["p"]))
    outs = ", ".join(f'"+f"(a{i})' for i in range(len(slots)))
    return name, f'#define {name}({args}) asm volatile("{text}" : {outs} : {ptr} : "memory")\n'


def emit(T, run: TapRun, acc, base_ptr, guard=None, fallback=None) -> None:
    """Emit the run as one statement. ``acc``: one-element local buffers per slot; ``base_ptr``: address; a
    ``guarded`` run reads from ``fallback`` instead where ``guard`` is false."""
    from tvm.backend.cuda.op import cuda_func_call

    if not run.taps:
        return
    if run.guarded != (guard is not None and fallback is not None):
        raise ValueError("a guarded run needs its guard and fallback address (and only a guarded one)")
    name, source = render(run)
    args = [acc[j][0] for j in run.slots] + ([guard, base_ptr, fallback] if run.guarded else [base_ptr])
    T.evaluate(cuda_func_call(name, *args, source_code=source))


def render_park(slots: int, stride: int, store: bool) -> tuple[str, str]:
    """(macro name, ``#define``) moving ``slots`` accumulators to (``store``) or from shared memory at
    ``p + i * stride`` bytes.

    Written as PTX rather than TIR buffer accesses: each thread only touches its own slots, but TVM's
    barrier planner cannot see that and would put a ``__syncthreads`` around every move.
    """
    if not 0 < slots < MAX_OPERANDS:
        raise ValueError(f"cannot park {slots} accumulators in one inline-asm statement")
    if not 0 <= stride * (slots - 1) <= INT32_MAX:
        raise ValueError(f"parking stride {stride} bytes does not fit a PTX immediate offset")
    op = "st.shared.f32 [%{b}+{o}], %{i};" if store else "ld.shared.f32 %{i}, [%{b}+{o}];"
    text = "{ " + " ".join(op.format(b=slots, o=i * stride, i=i) for i in range(slots)) + " }"
    name = f"escort_{'park' if store else 'unpark'}_{slots}_{stride}"
    args = ", ".join([f"a{i}" for i in range(slots)] + ["p"])
    vals = ", ".join(f'"{"f" if store else "=f"}"(a{i})' for i in range(slots))
    ptr = '"r"((unsigned)__cvta_generic_to_shared(p))'
    if store:
        return name, f'#define {name}({args}) asm volatile("{text}" : : {vals}, {ptr} : "memory")\n'
    return name, f'#define {name}({args}) asm volatile("{text}" : {vals} : {ptr} : "memory")\n'


def emit_park(T, acc, base_ptr, stride: int, store: bool) -> None:
    """Move every slot of ``acc`` to (or from) shared memory at ``base_ptr + i * stride`` bytes."""
    from tvm.backend.cuda.op import cuda_func_call

    name, source = render_park(len(acc), stride, store)
    T.evaluate(cuda_func_call(name, *[a[0] for a in acc], base_ptr, source_code=source))


L2_PREFETCH = '#define escort_prefetch_l2(p) asm volatile("prefetch.global.L2 [%0];" :: "l"(p))\n'


def l2_prefetch(ptr):
    """``prefetch.global.L2`` of the line at ``ptr``: the line comes from HBM into L2 while the thread goes on."""
    from tvm.backend.cuda.op import cuda_func_call

    return cuda_func_call("escort_prefetch_l2", ptr, source_code=L2_PREFETCH)
