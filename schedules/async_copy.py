"""``cp.async`` (sm_80+): global -> shared copies that hold no registers while in flight.

Why: a kernel that stages its next round through registers holds one register per element in flight (the
staged-input CSR kernel at 64 channels a round: 34 floats and 34 addresses per thread, 128 registers, one
block per SM); an asynchronous copy goes straight to shared memory. ``ok`` false copies nothing and zero-fills
(src-size 0), which is how padding is written. Emitted through TVM's ``cuda_func_call`` as macros, so the
kernel stays a TIR PrimFunc.
"""
from __future__ import annotations

CP_ASYNC = (
    '#define escort_cp_async4(d, s, ok) asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;" :: '
    '"r"((unsigned)__cvta_generic_to_shared(d)), "l"(s), "r"((ok) ? 4 : 0) : "memory")\n'
    '#define escort_cp_async8(d, s, ok) asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;" :: '
    '"r"((unsigned)__cvta_generic_to_shared(d)), "l"(s), "r"((ok) ? 8 : 0) : "memory")\n'
    '#define escort_cp_async_commit() asm volatile("cp.async.commit_group;" ::: "memory")\n'
    '#define escort_cp_async_wait(n) asm volatile("cp.async.wait_group %0;" :: "n"(n) : "memory")\n'
)


def _call(name, *args):
    from tvm.backend.cuda.op import cuda_func_call

    return cuda_func_call(name, *args, source_code=CP_ASYNC)


def copy4(dst_ptr, src_ptr, ok):
    """4 bytes from global ``src_ptr`` to shared ``dst_ptr``, or 4 zero bytes where ``ok`` is 0."""
    return _call("escort_cp_async4", dst_ptr, src_ptr, ok)


def copy8(dst_ptr, src_ptr, ok):
    """8 bytes (8-byte aligned at both ends), or 8 zero bytes where ``ok`` is 0."""
    return _call("escort_cp_async8", dst_ptr, src_ptr, ok)


def commit():
    """Close the group of this thread's copies issued so far."""
    return _call("escort_cp_async_commit")


def wait(pending: int):
    """Wait until at most ``pending`` of this thread's groups are still in flight (then a barrier publishes them)."""
    return _call("escort_cp_async_wait", pending)
