"""Compile chosen kernels each in its own TVM module, in parallel, and link them into the executable.

Why: ``tvm.compile`` hands all of a network's device code to one nvcc call, so every specialised kernel
goes through one ptxas process on one core: a ResNet-50 at batch 32 with all its convs specialised ran
that process out of memory (21 GB) after 20 minutes. Built one per module, each kernel costs ptxas only
its own memory, and the builds run side by side (nvcc runs as a subprocess, so threads suffice).
The Relax function then calls each kernel as an external packed function (``call_dps_packed``), which
the VM resolves through the executable's imported modules, so the exported ``.so`` still holds it all.
"""
from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor

import tvm
from tvm import relax

_CALL_TIR = tvm.ir.Op.get("relax.call_tir")


# Memory one build may take: ptxas peaked at 5.3 GB on ResNet-50's largest kernels at batch 32.
BUILD_MEMORY = 6 << 30


def default_jobs() -> int:
    """One build per core this process may use, as far as the free memory holds one BUILD_MEMORY each."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    try:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return max(1, cores)
    return max(1, min(cores, free // BUILD_MEMORY))


@relax.expr_functor.mutator
class _CallsToExtern(relax.PyExprMutator):
    """call_tir(kernel, args) -> call_dps_packed("kernel", args) for the kernels named."""

    def __init__(self, mod, names):
        super().__init__(mod)
        self.names = names

    def visit_call_(self, call):
        call = super().visit_call_(call)
        if call.op.same_as(_CALL_TIR) and call.args[0].name_hint in self.names:
            return relax.call_dps_packed(relax.ExternFunc(call.args[0].name_hint), call.args[1], call.ty_args[0])
        return call


def split_out(mod: tvm.IRModule, names, func_name: str = "main"):
    """Take the PrimFuncs ``names`` out of ``mod``; returns (module calling them by name, {name: PrimFunc})."""
    gvars = {gv.name_hint: gv for gv in mod.get_global_vars()}
    missing = sorted(set(names) - set(gvars))
    if missing:
        raise ValueError(f"no functions {missing} in the module")
    funcs = {n: mod[gvars[n]].with_attr("global_symbol", n) for n in names}
    mutator = _CallsToExtern(mod, set(names))
    new_func = mutator.visit_expr(mod[func_name])
    new_mod = mutator.builder_.get()
    new_mod[func_name] = new_func
    new_mod = relax.transform.DeadCodeElimination([func_name])(new_mod)  # drops the PrimFuncs now unused
    left = sorted(set(names) & {gv.name_hint for gv in new_mod.get_global_vars()})
    if left:
        raise RuntimeError(f"functions {left} are still called through call_tir after the split")
    return new_mod, funcs


def compile_each(funcs: dict, target: tvm.target.Target, jobs: int | None = None):
    """Build every PrimFunc as its own module; returns ({name: module}, {name: seconds}).

    Builds start in ``funcs``' order: put the longest first, so no long one starts last.
    """
    jobs = default_jobs() if jobs is None else int(jobs)
    if jobs < 1:
        raise ValueError(f"jobs must be at least 1, got {jobs}")

    def one(name):
        t0 = time.perf_counter()
        with target:  # Target.current is per thread; nvcc takes the arch from it
            lib = tvm.tirx.build(tvm.IRModule({name: funcs[name]}), target=target)
        return name, lib, time.perf_counter() - t0

    order = list(funcs)
    with ThreadPoolExecutor(max_workers=min(jobs, max(1, len(order)))) as pool:
        results = list(pool.map(one, order))
    return {n: lib for n, lib, _ in results}, {n: s for n, _, s in results}


def link_external(mod: tvm.IRModule, libs) -> tvm.IRModule:
    """Attach compiled modules for ``tvm.compile`` to import into the executable."""
    old = list(mod.attrs["external_mods"]) if mod.attrs and "external_mods" in mod.attrs else []
    return mod.with_attr("external_mods", old + list(libs))
