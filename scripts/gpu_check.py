"""Correctness on a real GPU, split in two because the GPU machine has no TVM compiler.

    python scripts/gpu_check.py prepare [--dir .gpu/check]     # here: build .so files + float64 references
    source .devbundle/activate && python3 scripts/gpu_check.py run --dir .gpu/check --out $OUT   # GPU host

``prepare`` builds (1) small pruned CNNs through escort_tvm.build for CUDA, exported as .so, with
onnxruntime references, and (2) the CUDA sparse kernel on every conv attribute case and a spread of
knob settings, all in one .so, with float64 numpy references. ``run`` loads everything with the TVM
runtime alone, poisons outputs with NaN, runs, and compares by relative error.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# (name, N, C, H, W, K, KH, KW, stride, pad(t,l,b,r), dilation, groups, sparsity, relu)
CASES = [
    ("3x3", 1, 32, 14, 14, 48, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1, 0.9, True),
    ("3x3_batch", 5, 16, 13, 13, 24, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1, 0.8, False),
    ("1x1", 3, 64, 7, 7, 40, 1, 1, (1, 1), (0, 0, 0, 0), (1, 1), 1, 0.95, True),
    ("1x1_stride2", 2, 32, 15, 15, 16, 1, 1, (2, 2), (0, 0, 0, 0), (1, 1), 1, 0.9, False),
    ("5x5", 2, 16, 27, 27, 32, 5, 5, (1, 1), (2, 2, 2, 2), (1, 1), 1, 0.9, True),
    ("7x7_s2", 1, 3, 37, 37, 16, 7, 7, (2, 2), (3, 3, 3, 3), (1, 1), 1, 0.7, True),
    ("11x11_s4", 2, 3, 67, 67, 24, 11, 11, (4, 4), (2, 2, 2, 2), (1, 1), 1, 0.8, True),
    ("5x3_asym", 2, 12, 19, 23, 20, 5, 3, (2, 1), (1, 0, 2, 1), (1, 1), 1, 0.85, False),
    ("dilated", 1, 16, 20, 20, 16, 3, 3, (1, 1), (2, 2, 2, 2), (2, 2), 1, 0.9, True),
    ("grouped", 2, 32, 12, 12, 32, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 4, 0.8, True),
    ("depthwise", 3, 24, 10, 10, 24, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 24, 0.6, False),
    ("empty_rows", 2, 16, 9, 9, 16, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1, 0.9, True),
    ("all_zero", 1, 8, 8, 8, 8, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1, 1.0, False),
    ("wide_batch32", 32, 32, 14, 14, 64, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1, 0.9, True),
]


def _variants(rule, spec, weight, n):
    """The default knobs plus n-1 seeded random settings (small chunks included, to hit the multi-chunk path)."""
    from schedules import CUDAKnobs

    out = [rule.default_knobs(spec, weight)]
    rng = np.random.default_rng(len(out) + spec.K)
    while len(out) < n:
        kw = {name: vals[rng.integers(len(vals))] for name, vals in CUDAKnobs.SPACE.items()}
        try:
            out.append(CUDAKnobs.from_dict(kw))
        except ValueError:
            continue
    return out


def prepare(d: Path, variants: int) -> None:
    import onnxruntime as ort
    import tvm

    import escort_tvm
    from escort_tvm.compute import Epilogue, conv2d_reference
    from escort_tvm.conv_spec import ConvSpec
    from escort_tvm.cuda_toolchain import carries_gpu_binary, prepare_cuda_build
    from escort_tvm.models import magnitude_prune, small_pruned_cnn
    from escort_tvm.sparse_format import SparseConvWeight
    from schedules import SparseConvCUDA

    d.mkdir(parents=True, exist_ok=True)
    manifest = {"models": [], "kernels": []}
    rng = np.random.default_rng(2026)
    for batch in (1, 4):
        model = small_pruned_cnn(batch=batch, sparsity=0.9, seed=batch)
        mod, params = escort_tvm.from_onnx(model)
        cm = escort_tvm.build(mod, params, "cuda")
        so = cm.export_library(d / f"small_cnn_b{batch}.so")
        assert carries_gpu_binary(so), "exported CUDA model carries no fatbin"
        x = rng.standard_normal(cm.inputs[0][1]).astype(np.float32)
        ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
        np.savez(d / f"small_cnn_b{batch}.npz", x=x, ref=ref)
        manifest["models"].append({"so": so.name, "data": f"small_cnn_b{batch}.npz",
                                   "sparse_convs": sum(r.kernel == "sparse" for r in cm.report)})
    rule = SparseConvCUDA()
    funcs = {}
    for (name, N, C, H, W, K, KH, KW, st, pad, dil, g, sp, relu) in CASES:
        spec = ConvSpec(N, C, H, W, K, KH, KW, st, pad, dil, g)
        w = magnitude_prune(rng.standard_normal(spec.weight_shape).astype(np.float32), min(sp, 1.0))
        if name == "empty_rows":
            w[::3] = 0
        if sp >= 1.0:
            w[:] = 0
        weight = SparseConvWeight.from_dense(w, g)
        x = rng.standard_normal(spec.input_shape).astype(np.float32)
        b = rng.standard_normal(K).astype(np.float32)
        ref = conv2d_reference(x, w, spec, b, relu)
        np.savez(d / f"case_{name}.npz", x=x, b=b, ref=ref)
        for vi, knobs in enumerate(_variants(rule, spec, weight, variants)):
            plan = rule.apply(spec, weight, Epilogue(relu=relu), knobs)
            sym = f"k_{name}_{vi}"
            funcs[sym] = plan.func.with_attr("global_symbol", sym)
            f = f"{sym}.npz"
            np.savez(d / f, **{f"w{i}": a for i, a in enumerate(plan.weight_arrays)})
            manifest["kernels"].append({"case": name, "symbol": sym, "data": f, "knobs": knobs.as_dict(),
                                        "spec": spec.to_dict(), "hp": plan.hp, "wp": plan.wp,
                                        "padded_input": plan.padded_input, "extra_images": plan.extra_images,
                                        "n_weight_arrays": len(plan.weight_arrays), "out_shape": spec.output_shape})
    target = tvm.target.Target({"kind": "cuda", "arch": "sm_90"})
    prepare_cuda_build()
    t0 = time.time()
    with target:
        ex = tvm.compile(tvm.IRModule(funcs), target=target)
    ex.export_library(str(d / "kernels.so"))
    assert carries_gpu_binary(d / "kernels.so")
    (d / "manifest.json").write_text(json.dumps(manifest, indent=1))
    print(f"prepared {len(manifest['models'])} models and {len(funcs)} kernels in {d} "
          f"(kernel compile {time.time() - t0:.1f} s)")


def run(d: Path, out: Path | None) -> int:
    import tvm

    import escort_tvm
    from escort_tvm.compute import padded_input
    from escort_tvm.conv_spec import ConvSpec
    from escort_tvm.cuda_toolchain import load_cuda_runtime

    def rel(a, b):
        return float(np.linalg.norm(a.astype(np.float64) - b) / max(np.linalg.norm(b), 1e-30))

    manifest = json.loads((d / "manifest.json").read_text())
    rows, ok = [], True
    for m in manifest["models"]:
        model = escort_tvm.load(d / m["so"])
        data = np.load(d / m["data"])
        y = model(data["x"])
        e = rel(y, data["ref"])
        good = bool(np.isfinite(y).all() and e < 1e-4)
        ok &= good
        rows.append({"what": m["so"], "rel_err": e, "ok": good, "sparse_convs": m["sparse_convs"]})
        print(f"model {m['so']:24s} sparse convs {m['sparse_convs']}  rel err vs onnxruntime {e:.2e}  "
              f"{'PASS' if good else 'FAIL'}")
    load_cuda_runtime(allow_stub=False)
    lib = tvm.runtime.load_module(str(d / "kernels.so"))
    dev = tvm.cuda(0)
    for k in manifest["kernels"]:
        data, case = np.load(d / k["data"]), np.load(d / f"case_{k['case']}.npz")
        spec = ConvSpec(**{n: tuple(v) if isinstance(v, list) else v for n, v in k["spec"].items()})
        x = case["x"]
        if k["padded_input"]:
            x = padded_input(x, spec, k["hp"], k["wp"])
            x = np.concatenate([x, np.zeros((k["extra_images"], x.shape[1]), x.dtype)])
        args = [x] + [data[f"w{i}"] for i in range(k["n_weight_arrays"])] + [case["b"]]
        args = [tvm.runtime.tensor(a, dev) for a in args]
        y = tvm.runtime.tensor(np.full(k["out_shape"], np.nan, np.float32), dev)
        lib[k["symbol"]](*args, y)
        dev.sync()
        yn = y.numpy()
        ref = case["ref"]
        e = rel(yn, ref) if np.abs(ref).max() > 0 else float(np.abs(yn - ref).max())
        good = bool(np.isfinite(yn).all() and e < 1e-4)
        ok &= good
        rows.append({"what": k["symbol"], "case": k["case"], "knobs": k["knobs"], "rel_err": e, "ok": good})
        print(f"kernel {k['symbol']:22s} {json.dumps(k['knobs'])}  err {e:.2e}  {'PASS' if good else 'FAIL'}")
    n_fail = sum(not r["ok"] for r in rows)
    print(f"{len(rows)} checks, {n_fail} failed on {tvm.cuda(0).device_name}")
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / "gpu_check.json").write_text(json.dumps(rows, indent=1))
    return 0 if ok else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["prepare", "run"])
    ap.add_argument("--dir", type=Path, default=Path(".gpu/check"))
    ap.add_argument("--variants", type=int, default=6, help="knob settings per conv case (prepare)")
    ap.add_argument("--out", type=Path, default=Path(os.environ["OUT"]) if os.environ.get("OUT") else None)
    a = ap.parse_args()
    if a.command == "prepare":
        prepare(a.dir, a.variants)
        return 0
    return run(a.dir, a.out)


if __name__ == "__main__":
    sys.exit(main())
