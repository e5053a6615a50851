"""SM-affine work queues: the blocks resident on one SM take their work from one channel group.

A specialised kernel is straight-line code, one body per channel group, and it stalls on instruction
fetch unless the blocks an SM runs execute the same group's code. The hardware deals blocks to SMs in
turn, so in a grid that fits in one wave every SM gets blocks of as many groups as it holds blocks. Here a
block instead asks which SM it is on (``%smid``), takes the next work item (tile, images) of that SM's home
group from a global counter, and moves on to the next groups only once its home group is used up. The
grid has exactly one block per work item, so every block finds one (each successful take consumes an
item; a block that found none would mean all items went to the other blocks, which are one fewer).

The counters live in an int32 array that must be zero when a kernel starts, and the last block to finish
sets them back to zero, so the array the graph holds as a constant stays zero between runs.
Layout per kernel: ``groups`` take counters, then one count of finished blocks.
"""
from __future__ import annotations


def counters(groups: int) -> int:
    """Counters a kernel of ``groups`` channel groups needs."""
    return groups + 1


def render_take(groups: int, items: int) -> tuple[str, str]:
    """(macro name, ``#define``): ``out`` = this block's work item ``group * items + index``.

    Called by one thread; ``w`` points at the kernel's counters."""
    name = f"escort_take_{groups}_{items}"
    body = ("{ unsigned s_, n_; asm volatile(\"mov.u32 %0, %%smid;\" : \"=r\"(s_)); "
            "asm volatile(\"mov.u32 %0, %%nsmid;\" : \"=r\"(n_)); "
            f"int g_ = (int)((unsigned long long)s_ * {groups} / (n_ > s_ ? n_ : s_ + 1)); int it_ = -1; "
            f"for (int t_ = 0; t_ < {groups} && it_ < 0; ++t_) {{ int q_ = (g_ + t_) % {groups}; "
            f"int v_ = atomicAdd(&(w)[q_], 1); if (v_ < {items}) it_ = q_ * {items} + v_; }} (out) = it_; }}")
    return name, f"#define {name}(w, out) {body}\n"


def render_finish(groups: int, blocks: int) -> tuple[str, str]:
    """(macro name, ``#define``): count this block finished; the last one zeroes the counters.

    Called by one thread after the block's last store; every other block has taken its item by then."""
    name = f"escort_finish_{groups}_{blocks}"
    body = (f"{{ __threadfence(); if (atomicAdd(&(w)[{groups}], 1) == {blocks - 1}) {{ "
            f"for (int g_ = 0; g_ <= {groups}; ++g_) (w)[g_] = 0; __threadfence(); }} }}")
    return name, f"#define {name}(w) {body}\n"


def emit_take(T, groups: int, items: int, work_ptr, out) -> None:
    from tvm.backend.cuda.op import cuda_func_call

    name, source = render_take(groups, items)
    T.evaluate(cuda_func_call(name, work_ptr, out, source_code=source))


def emit_finish(T, groups: int, blocks: int, work_ptr) -> None:
    from tvm.backend.cuda.op import cuda_func_call

    name, source = render_finish(groups, blocks)
    T.evaluate(cuda_func_call(name, work_ptr, source_code=source))
