"""End to end on one model: our build against TVM's dense build of the same model (and onnxruntime, and
PyTorch where installed), first checked for agreement, then timed. Used by ``escort-tvm bench`` and the
main job (``python -m escort_tvm``)."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

TOL = 1e-4  # relative error (L2) accepted between any two implementations


@dataclass
class Result:
    model: str
    target: str
    inputs: list
    report: list = field(default_factory=list)  # ConvReport of our build
    errors: dict = field(default_factory=dict)  # "sparse vs dense" -> relative error
    times_ms: dict = field(default_factory=dict)  # implementation -> list of per-run ms
    build_s: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)
    timed: bool = True

    @property
    def ok(self) -> bool:
        return bool(self.errors) and all(e < TOL for e in self.errors.values())

    def median(self, key) -> float:
        return float(np.median(self.times_ms[key]))

    def as_dict(self) -> dict:
        return {"model": self.model, "target": self.target, "inputs": self.inputs, "ok": self.ok, "tol": TOL,
                "errors": self.errors, "times_ms": self.times_ms,
                "median_ms": {k: self.median(k) for k in self.times_ms}, "build_s": self.build_s,
                "notes": self.notes, "report": [r.as_dict() for r in self.report]}

    def text(self, report: bool = True) -> str:
        from .report import format_report

        lines = []
        if report and self.report:
            lines += [format_report(self.report), ""]
        shapes = ", ".join(f"{n} {'x'.join(map(str, s))}" for n, s, _ in self.inputs)
        lines.append(f"model {self.model}, target {self.target}, input {shapes}")
        for k, e in self.errors.items():
            lines.append(f"  relative error {k:34s} {e:.2e}  {'ok' if e < TOL else 'FAIL'} (tolerance {TOL:g})")
        for n in self.notes:
            lines.append(f"  note: {n}")
        if self.times_ms:
            n_sparse = sum(r.kernel != "dense" for r in self.report)  # CSR or specialized
            base = self.median("TVM dense") if "TVM dense" in self.times_ms else None
            lines.append(f"latency, median of {len(next(iter(self.times_ms.values())))} measurements:")
            for k in self.times_ms:
                label = f"{k} ({n_sparse}/{len(self.report)} convs sparse)" if k == "escort-tvm" else k
                ratio = "" if base is None or k == "TVM dense" else f"  {base / self.median(k):.2f}x vs TVM dense"
                lines.append(f"  {label:40s} {self.median(k):10.3f} ms{ratio}")
        if self.report:
            kinds = sorted({r.kernel for r in self.report})
            lines.append("kernels: " + ", ".join(f"{sum(r.kernel == k for r in self.report)} {k}" for k in kinds))
        lines.append("check: " + ("PASS" if self.ok else "FAIL"))
        return "\n".join(lines)


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        return float("inf")
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _first(y):
    return y[0] if isinstance(y, tuple) else y


def compare(model_or_path, target=None, *, shapes=None, min_sparsity=0.7, tuning_log=None, number=3, repeat=10,
            seed=0, torch=True, steps=None, time_it=True, name=None, kernel="auto") -> Result:
    """Build sparse and dense, check agreement (onnxruntime, PyTorch where present), then time them."""
    import escort_tvm
    from escort_tvm.compiler import resolve_target
    from escort_tvm.frontend import _load_onnx

    from .cli import Steps, random_inputs

    steps = steps or Steps(5, quiet=True)
    target = resolve_target(target)
    if target.kind.name == "cuda":
        import tvm

        if not tvm.cuda(0).exist:
            raise RuntimeError("benchmarking a CUDA build needs a CUDA GPU here (none is visible): use --target llvm, "
                               "or compile here and run the .so on the GPU machine")
    with steps(f"importing {name or model_or_path}"):
        model = _load_onnx(model_or_path)
        mod, params = escort_tvm.from_onnx(model, shapes)
    with steps(f"building for {target.kind.name} with the sparse rewrite (min_sparsity {min_sparsity:g})") as s:
        sparse = escort_tvm.build(mod, params, target, min_sparsity=min_sparsity, tuning_log=tuning_log, kernel=kernel)
    build_s = {"escort-tvm": round(s.seconds, 2)}
    with steps(f"building TVM's dense build of the same model (for {target.kind.name})") as s:
        dense = escort_tvm.build(mod, params, target, min_sparsity=2.0, split_matmuls=False)  # TVM as it is
    build_s["TVM dense"] = round(s.seconds, 2)
    res = Result(str(name or model_or_path), target.kind.name, [[n, list(sh), d] for n, sh, d in sparse.inputs],
                 sparse.report, build_s=build_s, timed=time_it)
    xs = random_inputs(sparse.inputs, seed)
    torch_impl = None
    with steps("running and checking (sparse vs dense, onnxruntime, PyTorch where present)"):
        y = _first(sparse(*xs))
        res.errors["escort-tvm vs TVM dense"] = _rel(y, _first(dense(*xs)))
        try:
            import onnxruntime as ort

            sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
            feeds = {n: x for (n, _, _), x in zip(sparse.inputs, xs)}
            res.errors["escort-tvm vs onnxruntime (CPU)"] = _rel(y, sess.run(None, feeds)[0])
        except ImportError:
            res.notes.append("onnxruntime not installed: no onnxruntime check")
        if torch:
            from .torch_ref import TorchUnavailable, torch_for_onnx

            try:
                torch_impl = torch_for_onnx(model, "cuda" if target.kind.name == "cuda" else "cpu")
                res.errors["escort-tvm vs PyTorch"] = _rel(y, torch_impl.run(xs[0]))
            except TorchUnavailable as e:
                res.notes.append(f"PyTorch: {e}")
    if target.kind.name == "llvm":
        res.notes.append("TVM dense on llvm is TVM's default build without tuning: its conv2d is a plain loop nest")
    if time_it:
        with steps(f"timing ({repeat} measurements of {number} runs each)"):
            res.times_ms["escort-tvm"] = [t * 1e3 for t in sparse.time(*xs, number=number, repeat=repeat)]
            res.times_ms["TVM dense"] = [t * 1e3 for t in dense.time(*xs, number=number, repeat=repeat)]
            if torch_impl is not None:
                res.times_ms[f"PyTorch {torch_impl.label}"] = torch_impl.time(xs[0], number=number, repeat=repeat)
    return res
