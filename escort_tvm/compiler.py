"""``escort_tvm.build``: bind params, fold constants, rewrite pruned convs, compile with TVM."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import tvm
from tvm import relax

from relay_passes import rewrite_sparse_convs
from relay_passes.sparse_conv_rewrite import conv_weight_names
from relay_passes.split_k import MatmulSplit, split_k_matmuls

from .report import ConvReport, format_report
from .runtime import METADATA_FUNC, Model, _all_modules
from .separate_compile import compile_each, link_external, split_out
from .tuning_log import TuningLog


def _default_cuda_arch() -> str:
    """The visible GPU's architecture, else sm_90 (the H200/H100 this project targets)."""
    dev = tvm.cuda(0)
    return "sm_" + dev.compute_version.replace(".", "") if dev.exist else "sm_90"


def resolve_target(target) -> tvm.target.Target:
    """None -> cuda if a GPU is visible else llvm; "llvm"/"cuda", a JSON-style dict or a Target."""
    if target is None:
        target = "cuda" if tvm.cuda(0).exist else "llvm"
    if isinstance(target, tvm.target.Target):
        return target
    if isinstance(target, str):
        if target == "llvm":
            return tvm.target.Target({"kind": "llvm"})
        if target == "cuda":
            return tvm.target.Target({"kind": "cuda", "arch": _default_cuda_arch()})
        raise ValueError(f"unknown target {target!r}: use 'llvm', 'cuda', a dict such as "
                         "{'kind': 'cuda', 'arch': 'sm_90'}, or a tvm.target.Target")
    if isinstance(target, dict):
        if target.get("kind") not in ("llvm", "cuda"):
            raise ValueError(f"unknown target kind {target.get('kind')!r}: escort_tvm builds for 'llvm' and 'cuda'")
        if target["kind"] == "cuda" and "arch" not in target:
            target = {**target, "arch": _default_cuda_arch()}
        return tvm.target.Target(target)
    raise TypeError(f"target must be None, a str, a dict or a tvm.target.Target, got {type(target).__name__}")


def _signature(func: relax.Function, num_inputs: int):
    sig = []
    for p in list(func.params)[:num_inputs]:
        shape = getattr(p.ty, "shape", None)
        try:
            shape = [int(d) for d in shape]
        except (TypeError, ValueError):
            raise ValueError(f"input {p.name!r} has no static shape ({p.ty}); give shapes to from_onnx") from None
        sig.append((p.name, shape, str(p.ty.dtype)))
    return sig


def bind_params(mod: tvm.IRModule, params: dict | None) -> tuple[tvm.IRModule, int]:
    """Bind ``params`` to main's weight parameters, checking names, shapes and dtypes; returns (mod, #inputs)."""
    func = mod["main"]
    names = [p.name for p in func.params]
    n_in = int(func.attrs["num_input"]) if func.attrs and "num_input" in func.attrs else len(names)
    weights = {p.name: p for p in list(func.params)[n_in:]}
    params = dict(params or {})
    unknown = sorted(set(params) - set(weights))
    if unknown:
        raise ValueError(f"params names not in the module: {unknown}; its weight parameters are {sorted(weights)}")
    missing = sorted(set(weights) - set(params))
    if missing:
        raise ValueError(f"no value in params for the module's weight parameters {missing}")
    bound = {}
    for name, value in params.items():
        value = value.numpy() if hasattr(value, "numpy") else np.asarray(value)
        ty = weights[name].ty
        want = tuple(int(d) for d in ty.shape)
        if value.shape != want:
            raise ValueError(f"param {name!r} has shape {value.shape}, the module expects {want}")
        if value.dtype != np.dtype(str(ty.dtype)):
            raise ValueError(f"param {name!r} has dtype {value.dtype}, the module expects {ty.dtype}")
        bound[name] = tvm.runtime.tensor(value)
    if bound:
        mod = relax.transform.BindParams("main", bound)(mod)
        func = mod["main"].without_attr("num_input")
        mod["main"] = func.with_attr("num_input", n_in) if n_in < len(func.params) else func
    return mod, n_in


def _metadata_func(meta: dict) -> relax.Function:
    data = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    bb = relax.BlockBuilder()
    with bb.function(METADATA_FUNC, []):
        bb.emit_func_output(relax.const(data))
    return bb.get()[METADATA_FUNC]


class CompiledModel(Model):
    """A model built by ``escort_tvm.build``: call it, read ``report``, export it."""

    def __init__(self, executable, meta: dict, target: tvm.target.Target):
        super().__init__(executable, meta, "cuda" if target.kind.name == "cuda" else "cpu")
        self.executable, self.target = executable, target

    def export_library(self, path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.executable.export_library(str(path))
        return path

    def report_text(self) -> str:
        lines = [format_report(self.report)]
        lines += [MatmulSplit(**m).line() for m in self.meta.get("matmuls", [])]
        return "\n".join(lines)


def build(mod: tvm.IRModule, params: dict | None = None, target=None, *, min_sparsity: float = 0.7,
          tuning_log=None, kernel: str = "auto", specialized_budget: int | None = None,
          jobs: int | None = None, split_matmuls: bool = True) -> CompiledModel:
    """Compile a Relax module; every constant conv2d weight with sparsity >= min_sparsity gets a sparse kernel.

    ``kernel``: "auto" (a tuning log's fastest, else the cost rule of relay_passes.kernel_choice),
    or force "sparse" (CSR), "specialized" (weights in the code; falls back to CSR where it cannot)
    or "dense". The report says per conv which kernel it got and why. ``jobs``: specialised kernels
    compiled side by side (default: one per core). ``split_matmuls``: on CUDA, small-batch dense layers
    (matmul) get their reduction split across blocks (relay_passes.split_k); the report lists each matmul.
    """
    if not isinstance(mod, tvm.IRModule) or "main" not in [g.name_hint for g in mod.get_global_vars()]:
        raise TypeError("build expects a Relax IRModule with a 'main' function (see escort_tvm.from_onnx)")
    if not min_sparsity >= 0.0:  # values above 1 mean "keep every conv dense"
        raise ValueError(f"min_sparsity must be >= 0, got {min_sparsity}")
    target = resolve_target(target)
    log = TuningLog.load(tuning_log) if tuning_log is not None else None
    names = conv_weight_names(mod["main"])
    mod, n_in = bind_params(mod, params)
    signature = _signature(mod["main"], n_in)
    if len(mod["main"].params) != n_in:
        raise ValueError("the module still has unbound weight parameters")
    mod = relax.transform.FoldConstant()(mod)
    mod, report = rewrite_sparse_convs(mod, target, min_sparsity, None, names, kernel=kernel, tuning_log=log,
                                       specialized_budget=specialized_budget)
    matmuls = []
    if target.kind.name == "cuda":
        from .cuda_toolchain import prepare_cuda_build

        prepare_cuda_build()
        if split_matmuls:
            mod, matmuls = split_k_matmuls(mod)
    mod = _compile_specialized_apart(mod, report, target, jobs)
    meta = {"inputs": signature, "target": str(target.kind.name), "report": [r.as_dict() for r in report],
            "matmuls": [m.as_dict() for m in matmuls]}
    mod[METADATA_FUNC] = _metadata_func(meta)
    with target:
        ex = tvm.compile(mod, target=target)
    if target.kind.name == "cuda":
        check_device_kernels(ex, report)
    return CompiledModel(ex, meta, target)


def _compile_specialized_apart(mod, report: list[ConvReport], target, jobs) -> tvm.IRModule:
    """Each specialised kernel in its own module and nvcc call (memory, and all cores); the rest stays
    for ``tvm.compile``. Records each kernel's compile seconds in its convs' reports."""
    nnz = {}
    for r in report:
        if r.kernel == "specialized":
            nnz[r.function] = max(nnz.get(r.function, 0), r.nnz or 0)
    if not nnz:
        return mod
    mod, funcs = split_out(mod, sorted(nnz, key=lambda n: -nnz[n]))
    libs, seconds = compile_each(funcs, target, jobs)
    for r in report:
        if r.kernel == "specialized":
            r.compile_s = round(seconds[r.function], 2)
    return link_external(mod, libs.values())


def check_device_kernels(ex, report: list[ConvReport]) -> None:
    """TVM compiles an unscheduled PrimFunc for the host without a word: make sure ours went to the GPU."""
    source = "".join(m.inspect_source() for m in _all_modules(ex.mod) if m.kind == "cuda")
    for r in report:
        if r.kernel != "dense" and f"{r.function or f'escort_sparse_conv{r.index}'}_kernel" not in source:
            raise RuntimeError(f"sparse kernel for conv {r.index} was not compiled as a GPU kernel")
