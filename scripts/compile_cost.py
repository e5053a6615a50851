"""Compile cost of whole pruned networks with specialised kernels: seconds, nonzeros, binary size.

The specialised kernel compiles every nonzero into the instruction stream, so its cost grows with the
model. This builds zoo networks for CUDA (sm_90, on a machine without a GPU too) as a user would
(``kernel="auto"``: the cost rule and the default specialised-nonzero budget; ``--kernel specialized
--budget N`` to force more) and records wall and CPU seconds of the whole ``escort_tvm.build``, how
many convs got which kernel, the specialised nonzeros, the size of the exported library, the peak
memory of the build and of its largest compiler process (ptxas), and the slowest specialised kernels
(each is compiled on its own, ``--jobs`` at a time). Usage::

    python scripts/compile_cost.py --models resnet50 --batch 32 --out docs/bench/compile_cost.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def cpu_seconds() -> float:
    """CPU seconds of this process and its finished children (nvcc, cicc, ptxas)."""
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def peak_rss_mb() -> tuple[float, float]:
    """Peak resident memory of this process, and of its largest finished child (Linux reports KiB)."""
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return round(s.ru_maxrss / 1024, 1), round(c.ru_maxrss / 1024, 1)


def measure(model: str, sparsity: float, batch: int, kernel: str, budget: int | None, jobs: int | None) -> dict:
    import escort_tvm
    from escort_tvm import zoo

    mod, params = escort_tvm.from_onnx(zoo.build(model, batch=batch, sparsity=sparsity))
    t0, c0 = time.perf_counter(), cpu_seconds()
    built = escort_tvm.build(mod, params, target={"kind": "cuda", "arch": "sm_90"}, kernel=kernel,
                             specialized_budget=budget, jobs=jobs)
    wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    with tempfile.TemporaryDirectory() as td:
        so = built.export_library(Path(td) / "model.so")
        so_bytes = so.stat().st_size
    kinds: dict[str, int] = {}
    for r in built.report:
        kinds[r.kernel] = kinds.get(r.kernel, 0) + 1
    spec = sorted((r for r in built.report if r.kernel == "specialized"), key=lambda r: -(r.compile_s or 0))
    spec_nnz = sum(r.nnz for r in spec)
    self_mb, child_mb = peak_rss_mb()
    return {"model": model, "sparsity": sparsity, "batch": batch, "kernel": kernel, "budget": budget,
            "build_s": round(wall, 1),
            "cpu_s": round(cpu, 1), "convs": kinds, "specialized_nnz": int(spec_nnz), "so_bytes": so_bytes,
            "ms_per_nonzero": round(1000 * wall / spec_nnz, 3) if spec_nnz else None,
            "jobs": jobs, "peak_rss_mb": self_mb, "peak_compiler_rss_mb": child_mb,
            "slowest_kernels": [{"conv": r.index, "name": r.name, "nnz": r.nnz, "compile_s": r.compile_s}
                                for r in spec[:5]]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="resnet50,vgg16")
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--kernel", default="auto", choices=["auto", "specialized", "sparse"])
    ap.add_argument("--budget", type=int, default=None, help="specialised nonzeros the build may compile "
                    "(default: relay_passes.kernel_choice.DEFAULT_SPECIALIZED_BUDGET)")
    ap.add_argument("--jobs", type=int, default=None, help="specialised kernels compiled side by side "
                    "(default: one per core)")
    ap.add_argument("--out", type=Path, help="JSON file to write (the rows, the machine, the date)")
    a = ap.parse_args()
    rows = []
    for model in [m.strip() for m in a.models.split(",") if m.strip()]:
        row = measure(model, a.sparsity, a.batch, a.kernel, a.budget, a.jobs)
        print(json.dumps(row), flush=True)
        rows.append(row)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        meta = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "cpus": os.cpu_count(),
                "machine": platform.processor() or platform.machine(), "command": " ".join(sys.argv)}
        a.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
