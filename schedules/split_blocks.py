"""Split-K across the blocks of one launch: partial sums in a global workspace, the last block finishes.

A specialised kernel with ``block_split`` S gives each work item (group, image, tile) S blocks, each running
the group's code over its own run of input-channel chunks. A block stores its partial sums in slot s of the
workspace (plain stores: no atomics on the data, so the sum is the same whichever block ends last), fences
them, and one of its threads counts the block in on the work item's arrival counter. The block that brings
the count to S adds the S slots in order, applies the epilogue, writes ``y`` and sets the counter back to
zero, so the counter array the graph holds as a constant stays zero between runs (as schedules.work_queue's).
The workspace needs no zeroing: every slot is written before it is read.

This is CUTLASS's split-K with a semaphore-free "last block reduces" fixup (the CUDA samples'
threadFenceReduction pattern): no block waits on another, so it is safe whatever the grid's residency.
"""
from __future__ import annotations

FENCE = "#define escort_fence() __threadfence()\n"
# Partial sums are read through L2 (ld.global.cg): another SM wrote them during this launch.
LOAD_PARTIAL = "#define escort_load_partial(p) __ldcg(p)\n"
ARRIVE = "#define escort_arrive(c, out) { (out) = atomicAdd((c), 1); }\n"


def emit_fence(T) -> None:
    """Every thread: its stores so far become visible to the whole device before it goes on."""
    from tvm.backend.cuda.op import cuda_func_call

    T.evaluate(cuda_func_call("escort_fence", source_code=FENCE))


def emit_arrive(T, counter_ptr, out) -> None:
    """One thread: ``out`` = how many of the work item's blocks had arrived before this one."""
    from tvm.backend.cuda.op import cuda_func_call

    T.evaluate(cuda_func_call("escort_arrive", counter_ptr, out, source_code=ARRIVE))


def load_partial(ptr):
    from tvm.backend.cuda.op import cuda_func_call

    return cuda_func_call("escort_load_partial", ptr, return_type="float32", source_code=LOAD_PARTIAL)
