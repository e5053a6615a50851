"""The main job: build a small seeded pruned CNN, run it on the best device here, check it against a
dense build of the same model (and onnxruntime when installed), print what was rewritten."""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m escort_tvm", description=__doc__)
    ap.add_argument("--target", default=None, help="llvm or cuda (default: cuda if a GPU is visible, else llvm)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    import escort_tvm
    from escort_tvm.compiler import resolve_target
    from escort_tvm.models import small_pruned_cnn

    target = resolve_target(args.target)
    print(f"escort_tvm {escort_tvm.__version__}: target {target.kind.name}")
    model = small_pruned_cnn(batch=args.batch, sparsity=args.sparsity, seed=args.seed)
    mod, params = escort_tvm.from_onnx(model)
    t0 = time.perf_counter()
    sparse = escort_tvm.build(mod, params, target)
    print(f"built in {time.perf_counter() - t0:.1f} s\n{sparse.report_text()}")
    dense = escort_tvm.build(mod, params, target, min_sparsity=2.0)  # every conv dense: the reference

    x = np.random.default_rng(args.seed + 1).standard_normal(sparse.inputs[0][1]).astype(np.float32)
    y, ref = sparse(x), dense(x)
    err = float(np.linalg.norm(y - ref) / np.linalg.norm(ref))
    ok = err < 1e-4
    print(f"output {y.shape}: relative error vs dense TVM build {err:.2e}")
    try:
        import onnxruntime as ort

        ref_ort = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
        err_ort = float(np.linalg.norm(y - ref_ort) / np.linalg.norm(ref_ort))
        ok &= err_ort < 1e-4
        print(f"relative error vs onnxruntime {err_ort:.2e}")
    except ImportError:
        print("onnxruntime not installed: skipped that check")
    ts, td = np.median(sparse.time(x)), np.median(dense.time(x))
    print(f"latency: sparse build {ts * 1e3:.3f} ms, dense build {td * 1e3:.3f} ms ({target.kind.name})")
    print("check:", "PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
