"""Specialised kernels are built one per module, in parallel, and called by name through the VM.

The numeric path runs on llvm (the CPU specialised kernel goes through the same split); the CUDA side
is checked in test_cuda_build.py (one CUDA module per specialised kernel, a fatbin in the export).
"""
from __future__ import annotations

import pytest
import tvm
from onnx import helper
from tvm import relax

import escort_tvm
from escort_tvm.compiler import bind_params
from escort_tvm.separate_compile import compile_each, split_out
from relay_passes import rewrite_sparse_convs
from relay_passes.sparse_conv_rewrite import conv_weight_names
from _helpers import all_modules, assert_close, onnx_model, ort_reference, pruned, randn


def _two_convs(rng):
    w0, w1 = pruned(rng, (8, 4, 3, 3), 0.9), pruned(rng, (6, 8, 1, 1), 0.8)
    nodes = [helper.make_node("Conv", ["x", "w0"], ["h"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Conv", ["r", "w1"], ["y"])]
    return onnx_model(nodes, [("x", [2, 4, 7, 6])], [("y", [2, 6, 7, 6])], {"w0": w0, "w1": w1}), w0


def test_specialized_kernel_built_apart_runs_exports_and_reports_its_compile_time(rng, tmp_path):
    model, w0 = _two_convs(rng)
    mod, params = escort_tvm.from_onnx(model)
    # The budget takes the first conv only; the forced kind falls back to CSR on the second.
    built = escort_tvm.build(mod, params, "llvm", kernel="specialized", specialized_budget=int((w0 != 0).sum()))
    r0, r1 = built.report
    assert (r0.kernel, r1.kernel) == ("specialized", "sparse"), built.report_text()
    assert r0.compile_s is not None and r0.compile_s > 0 and r1.compile_s is None
    assert "built in" in r0.line() and "built in" not in r1.line()
    owners = [m for m in all_modules(built.executable.mod) if m.implements_function(r0.function, False)]
    assert owners and not any(m.implements_function(r1.function, False) for m in owners), \
        "the specialised kernel should live in a module of its own, not with the CSR kernel"
    x = randn(rng, (2, 4, 7, 6))
    ref = ort_reference(model, {"x": x})
    assert_close(built(x), ref)
    loaded = escort_tvm.load(built.export_library(tmp_path / "m.so"))
    assert_close(loaded(x), ref)
    assert loaded.report[0].compile_s == r0.compile_s


def _rewritten(rng):
    model, _ = _two_convs(rng)
    mod, params = escort_tvm.from_onnx(model)
    names = conv_weight_names(mod["main"])
    mod, _ = bind_params(mod, params)
    mod = relax.transform.FoldConstant()(mod)
    target = tvm.target.Target({"kind": "llvm"})
    return rewrite_sparse_convs(mod, target, 0.7, None, names, kernel="sparse")


def test_split_out_calls_only_the_named_kernels_by_name(rng):
    mod, report = _rewritten(rng)
    f0, f1 = (r.function for r in report)
    new, funcs = split_out(mod, [f0])
    assert list(funcs) == [f0] and funcs[f0].attrs["global_symbol"] == f0
    names = {gv.name_hint for gv in new.get_global_vars()}
    assert f0 not in names and f1 in names
    text = new["main"].script()
    assert f'call_dps_packed("{f0}"' in text and f"call_tir({f1}," in text, text
    with pytest.raises(ValueError, match="no functions"):
        split_out(mod, ["escort_sparse_conv9"])


def test_compile_each_checks_jobs(rng):
    mod, report = _rewritten(rng)
    _, funcs = split_out(mod, [report[0].function])
    with pytest.raises(ValueError, match="jobs must be at least 1"):
        compile_each(funcs, tvm.target.Target({"kind": "llvm"}), jobs=0)


def test_default_jobs_is_bounded_by_cores_and_free_memory(monkeypatch):
    import os

    from escort_tvm import separate_compile as sc

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    pages = {"SC_PAGE_SIZE": 4096}
    monkeypatch.setattr(os, "sysconf", lambda name: pages[name] if name in pages else pages["free"])
    pages["free"] = 3 * sc.BUILD_MEMORY // 4096  # room for three builds
    assert sc.default_jobs() == 3
    pages["free"] = sc.BUILD_MEMORY // 8192  # not even one: still one
    assert sc.default_jobs() == 1
    pages["free"] = 100 * sc.BUILD_MEMORY // 4096
    assert sc.default_jobs() == 16
