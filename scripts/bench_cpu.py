"""Does the specialised kernel pay on the CPU? Conv + bias + ReLU layers at batch 1 on the llvm target.

Per layer, one single-conv ONNX model (seeded weights pruned by magnitude), timed in one process:
onnxruntime (dense, all cores), our build with the CSR kernel (``kernel="sparse"``) and with the
specialised kernel (``kernel="specialized"``: rule cpu.specialized, weights in the code). Every output
is checked against onnxruntime first. Times are medians of ``--repeat`` runs of ``--number`` calls.
Compile seconds of each build are recorded too: LLVM's time on fully unrolled code is what keeps
cpu.specialized out of the automatic choice. Usage::

    python scripts/bench_cpu.py --layers resnet50.l1.3x3,resnet50.l2.3x3 --out docs/bench/cpu.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))


def conv_onnx(w: np.ndarray, b: np.ndarray, x_shape, stride: int, pad: int):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    n, c, h, wd = x_shape
    k = w.shape[0]
    oh, ow = (h + 2 * pad - w.shape[2]) // stride + 1, (wd + 2 * pad - w.shape[3]) // stride + 1
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], strides=[stride] * 2, pads=[pad] * 4),
             helper.make_node("Relu", ["c"], ["y"])]
    graph = helper.make_graph(nodes, "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [n, k, oh, ow])],
                              [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def median_ms(fn, number: int, repeat: int) -> float:
    fn()
    runs = []
    for _ in range(repeat):
        t = time.perf_counter()
        for _ in range(number):
            fn()
        runs.append((time.perf_counter() - t) / number)
    return 1000 * float(np.median(runs))


def one_layer(name: str, sparsity: float, number: int, repeat: int, kernels: list[str]) -> dict:
    import onnxruntime as ort

    import escort_tvm
    from bench import LAYERS
    from escort_tvm.prune import magnitude_prune

    cin, cout, h, w_, k, s, p = LAYERS[name]
    rng = np.random.default_rng(0)
    w = magnitude_prune(rng.standard_normal((cout, cin, k, k)).astype(np.float32), sparsity)
    b = rng.standard_normal(cout).astype(np.float32)
    x = rng.standard_normal((1, cin, h, w_)).astype(np.float32)
    model = conv_onnx(w, b, x.shape, s, p)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    ref = sess.run(None, {"x": x})[0]
    row = {"layer": name, "sparsity": sparsity, "nnz": int(np.count_nonzero(w)),
           "onnxruntime_ms": round(median_ms(lambda: sess.run(None, {"x": x}), number, repeat), 4)}
    for kernel in kernels:
        mod, params = escort_tvm.from_onnx(model)
        t0 = time.perf_counter()
        built = escort_tvm.build(mod, params, "llvm", kernel=kernel)
        row[f"{kernel}_compile_s"] = round(time.perf_counter() - t0, 1)
        got = built(x)
        err = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
        if not err < 1e-4:
            raise AssertionError(f"{name}: {kernel} differs from onnxruntime (relative error {err:.2e})")
        row[f"{kernel}_rule"] = built.report[0].schedule.split()[0] if built.report[0].schedule else built.report[0].kernel
        row[f"{kernel}_ms"] = round(1000 * float(np.median(built.time(x, number=number, repeat=repeat))), 4)
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", default="resnet50.l1.3x3,resnet50.l2.3x3,resnet50.l1.1x1in,vgg16.conv1_2")
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--kernels", default="sparse,specialized")
    ap.add_argument("--number", type=int, default=5)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    rows = []
    for name in [n.strip() for n in a.layers.split(",") if n.strip()]:
        rows.append(one_layer(name, a.sparsity, a.number, a.repeat, a.kernels.split(",")))
        print(json.dumps(rows[-1]), flush=True)
    if a.out:
        meta = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "cpus": os.cpu_count(),
                "command": " ".join(sys.argv)}
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
