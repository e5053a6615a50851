#!/usr/bin/env python3
"""Sweep of relay_passes.split_k's K split on the classifier matmuls of the zoo's networks, built here, timed there.

    python scripts/bench_matmul.py prepare --out .gpu/mm
    source .devbundle/activate && python3 scripts/bench_matmul.py measure --dir .gpu/mm --out $OUT

Each (shape, S) is ``relu(x @ W + b)`` with W a runtime input (as in bench_e2e.py), built for CUDA through
TVM's default pipeline with the K split forced to S (S = 1: TVM as it is). ``measure`` loads the libraries
with the TVM runtime only, checks each output against float64 numpy (relative error < 1e-4; a failing build
is not timed), times it with the VM's time_evaluator (median) and writes matmul.json and matmul.md.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

# (name, K, N): the classifier layers; M is the batch (--batches)
SHAPES = (("vgg16.fc6", 25088, 4096), ("alexnet.fc6", 9216, 4096), ("fc7", 4096, 4096),
          ("fc8", 4096, 1000), ("resnet50.fc", 2048, 1000), ("googlenet.fc", 1024, 1000))
SPLITS = (1, 4, 8, 16, 32, 64, 128)
MIN_SLICE = 64
TOL = 1e-4
SEED = 7


def _module(M, K, N):
    from tvm import relax

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((M, K), "float32"))
    w = relax.Var("w", relax.TensorType((K, N), "float32"))
    b = relax.Var("b", relax.TensorType((N,), "float32"))
    with bb.function("main", [x, w, b]):
        with bb.dataflow():
            out = bb.emit_output(bb.emit(relax.op.nn.relu(relax.op.add(relax.op.matmul(x, w), b))))
        bb.emit_func_output(out)
    return bb.get()


def cmd_prepare(a) -> int:
    import tvm

    from escort_tvm.cuda_toolchain import prepare_cuda_build
    from relay_passes.split_k import choose_split, split_k_matmuls

    prepare_cuda_build()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    target = tvm.target.Target({"kind": "cuda", "arch": "sm_90"})
    entries = []
    splits = [int(v) for v in a.splits.split(",")] if a.splits else SPLITS
    for M, (name, K, N) in ((int(m), shape) for m in a.batches.split(",") for shape in SHAPES):
        default = choose_split(M, K, N)[0]
        for s in sorted(set(splits) | {default}):
            if K % s or K // s < MIN_SLICE:
                continue
            mod, seen = split_k_matmuls(_module(M, K, N), choose=lambda *_: (s, "" if s > 1 else "forced"))
            assert seen[0].split == s
            t0 = time.perf_counter()
            with target:
                ex = tvm.compile(mod, target=target)
            f = f"{name}_m{M}_s{s}.so"
            ex.export_library(str(out / f))
            entries.append({"name": name, "M": M, "K": K, "N": N, "split": s, "default": s == default, "file": f})
            print(f"{name} M={M} S={s}: built in {time.perf_counter() - t0:.1f} s", flush=True)
    (out / "manifest.json").write_text(json.dumps({"shapes": entries, "seed": SEED}, indent=1))
    return 0


def cmd_measure(a) -> int:
    import tvm
    import tvm.runtime.vm

    from escort_tvm.cuda_toolchain import load_cuda_runtime

    load_cuda_runtime(allow_stub=False)
    dev = tvm.cuda(0)
    d = Path(a.dir)
    man = json.loads((d / "manifest.json").read_text())
    rows, data = [], {}
    for e in man["shapes"]:
        M, K, N = e["M"], e["K"], e["N"]
        if (M, K, N) not in data:
            rng = np.random.default_rng(man["seed"])
            x, w, b = (rng.standard_normal(s, dtype=np.float32) for s in ((M, K), (K, N), (N,)))
            ref = np.maximum(x.astype(np.float64) @ w.astype(np.float64) + b, 0.0)
            data[(M, K, N)] = (x, w, b, ref)
        x, w, b, ref = data[(M, K, N)]
        vm = tvm.runtime.vm.VirtualMachine(tvm.runtime.load_module(str(d / e["file"])), dev)
        args = [tvm.runtime.tensor(v, dev) for v in (x, w, b)]
        y = vm["main"](*args).numpy()
        err = float(np.linalg.norm(y - ref) / np.linalg.norm(ref))
        row = {**e, "rel_err": err}
        if err < TOL:
            res = vm.time_evaluator("main", dev, number=20, repeat=10, min_repeat_ms=50)(*args)
            row["ms"] = float(np.median(res.results)) * 1e3
        rows.append(row)
        print(f"{e['name']:12s} M={M:<3d} S={e['split']:3d} err {err:.1e} " + (f"{row['ms']:.4f} ms" if "ms" in row else "FAILED"),
              flush=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "matmul.json").write_text(json.dumps({"rows": rows, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                                 "command": " ".join(["python3", "scripts/bench_matmul.py"] + sys.argv[1:])},
                                                indent=1))
    lines = ["| layer | M x K x N | S | ms | weight-read floor ms (4.3 TB/s) |", "|---|---|---|---|---|"]
    for r in rows:
        floor = r["K"] * r["N"] * 4 / 4.3e12 * 1e3
        ms = f"{r['ms']:.4f}" if "ms" in r else "failed"
        lines.append(f"| {r['name']} | {r['M']}x{r['K']}x{r['N']} | {r['split']}{' (default)' if r['default'] else ''} "
                     f"| {ms} | {floor:.4f} |")
    (out / "matmul.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if all("ms" in r for r in rows) else 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="build every (shape, split) here")
    p.add_argument("--out", default=".gpu/mm")
    p.add_argument("--batches", default="32", help="comma-separated M (the batch)")
    p.add_argument("--splits", default="", help=f"comma-separated S to sweep (default {SPLITS}; the default S is "
                   "always built)")
    p.set_defaults(func=cmd_prepare)
    p = sub.add_parser("measure", help="check and time on the GPU machine (TVM runtime only)")
    p.add_argument("--dir", default=".gpu/mm")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_measure)
    a = ap.parse_args(argv)
    return a.func(a)


if __name__ == "__main__":
    sys.exit(main())
