#!/usr/bin/env python3
"""End-to-end benchmark of whole pruned networks: our build vs TVM's dense build vs PyTorch cuDNN fp32.

Built here, timed on the GPU machine (PyTorch, but only TVM's runtime):

    python scripts/bench_e2e.py prepare --out .gpu/e2e [--models alexnet,vgg16,resnet50,googlenet] [--batches 1,32]
    source .devbundle/activate && python3 scripts/bench_e2e.py measure --dir .gpu/e2e/resnet50_b32 --out $OUT
    python scripts/bench_e2e.py report $OUT1/e2e.json $OUT2/e2e.json ... --md docs/bench/e2e.md

**Weights stay out of the libraries.** VGG-16 has 553 MB of fp32 weights (494 MB in its classifier) and
AlexNet 244 MB; a carry to the GPU machine holds 60 MB. So:

- the zoo's weights are *regenerated* on the GPU machine by ``escort_tvm.zoo.weights`` (numpy only,
  seeded) and checked there against SHA-256 digests that ``prepare`` wrote into the manifest;
- ``escort-tvm`` (our build): the conv weights are constants (the sparse kernels' CSR arrays, BatchNorm
  folded in, the dense first conv), the classifier's Linear weights are runtime inputs;
- ``TVM dense``: TVM's dense build of the same model (``min_sparsity`` 2.0), with every conv and Linear
  weight a runtime input; biases and BatchNorm parameters stay constants, so TVM folds them as usual;
- a Linear weight is passed pre-transposed (ONNX ``Gemm`` with ``transB=0`` on ``W.T``), which is what
  constant folding would have done to ``transB=1`` with a constant ``W``, so no transpose runs per call.

Weights as inputs cost nothing per call (the VM passes device pointers). Each (model, batch) gets its
own folder (``<out>/<model>_b<batch>``, 2 to 21 MB) so that carries stay under the limit; ``prepare``
prints the sizes and a grouping into carries (with ``.devbundle``) of at most 60 MB.

``measure`` imports no TVM compiler part (it runs with ``TVM_USE_RUNTIME_LIB=1``): it loads each .so
with ``escort_tvm.load``, regenerates weights and the seeded input, builds torchvision's network with the
same weights (fp32, TF32 off) when torch and torchvision import, checks all outputs against a float64
reference (torchvision in fp64 on the GPU; without torch, the onnxruntime output stored by ``prepare``),
times only the implementations that pass (warm-up, then CUDA-event or ``time_evaluator`` medians), and
writes ``e2e.json`` and ``e2e.md`` under ``--out``. It also runs on CPU (llvm builds) for the tests.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

MODELS = ("alexnet", "vgg16", "resnet50", "googlenet")
TOL = 1e-4
# PyTorch with TF32 (its default for cuDNN convolutions: torch.backends.cudnn.allow_tf32): 10-bit mantissas, so
# checked at the layer bench's reduced tolerance.
TOL_TF32 = 1e-2
CARRY_LIMIT_MB = 60


def log(msg: str) -> None:
    print(f"[bench_e2e {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def sha256(a: np.ndarray) -> str:
    a = np.ascontiguousarray(a)
    h = hashlib.sha256(str(a.dtype).encode() + str(a.shape).encode())
    h.update(a.view(np.uint8).reshape(-1) if a.size else b"")
    return h.hexdigest()


def make_input(batch: int, image_size: int, seed: int) -> np.ndarray:
    return np.random.default_rng(1000 + seed).standard_normal((batch, 3, image_size, image_size), dtype=np.float32)


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape or not np.isfinite(a).all():
        return float("inf")
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def git_info() -> dict:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout
        return {"commit": rev.strip(), "dirty": bool(dirty.strip())}
    except Exception:
        return {}


# ====================================================================== prepare (here: TVM compiler + nvcc)
def externalize(model, conv_weights: bool):
    """A copy of the zoo model whose Linear weights (and, with ``conv_weights``, conv weights) are graph inputs.

    Returns (model, runtime_inputs): each runtime input as {"name", "key" (state_dict key), "transpose", "shape"},
    in the order the built model takes them after the image.
    """
    import onnx
    from onnx import helper, numpy_helper

    m = onnx.ModelProto.FromString(model.SerializeToString())
    inits = {t.name: t for t in m.graph.initializer}
    moved: list[dict] = []
    for node in m.graph.node:
        if node.op_type == "Gemm":
            attrs = {a.name: a for a in node.attribute}
            key = node.input[1]
            w = numpy_helper.to_array(inits[key])
            if attrs.get("transB") is None or attrs["transB"].i != 1:
                raise ValueError(f"Gemm {node.name}: expected transB=1 (torchvision's Linear)")
            attrs["transB"].i = 0
            name = key + ".T"
            node.input[1] = name
            moved.append({"name": name, "key": key, "transpose": True, "shape": [w.shape[1], w.shape[0]]})
        elif node.op_type == "Conv" and conv_weights:
            key = node.input[1]
            moved.append({"name": key, "key": key, "transpose": False, "shape": list(inits[key].dims)})
    keys = {r["key"] for r in moved}
    keep = [t for t in m.graph.initializer if t.name not in keys]
    del m.graph.initializer[:]
    m.graph.initializer.extend(keep)
    for r in moved:
        m.graph.input.append(helper.make_tensor_value_info(r["name"], onnx.TensorProto.FLOAT, r["shape"]))
    return m, moved


def runtime_arrays(weights: dict, runtime_inputs: list[dict]) -> list[np.ndarray]:
    """The runtime inputs' arrays from state_dict-keyed weights (Linear weights transposed)."""
    out = []
    for r in runtime_inputs:
        w = weights[r["key"]]
        out.append(np.ascontiguousarray(w.T) if r["transpose"] else w)
        if list(out[-1].shape) != list(r["shape"]):
            raise ValueError(f"runtime input {r['name']}: shape {out[-1].shape}, expected {r['shape']}")
    return out


def ort_reference(model, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": x})[0]


def prepare(out: Path, models, batches, image_size: int, sparsity: float, seed: int, target, builds=("ours", "dense"),
            min_sparsity: float = 0.7, build_options: dict | None = None) -> list[Path]:
    """Build and export every (model, batch); ``build_options``: extra keyword arguments of escort_tvm.build
    for our build (e.g. {"kernel": "sparse"} where build takes it)."""
    import warnings

    from escort_tvm import zoo
    from escort_tvm.compiler import resolve_target

    warnings.filterwarnings("ignore", message="Renaming name")  # TVM's importer sanitises "features.0.weight"
    target = resolve_target(target)
    tdict = {"kind": target.kind.name, **({"arch": str(target.attrs["arch"])} if "arch" in target.attrs else {})}
    dirs = []
    for name in models:
        weights = zoo.weights(name, sparsity=sparsity, seed=seed)
        digests = {k: sha256(v) for k, v in weights.items()}
        for batch in batches:
            t0 = time.perf_counter()
            d = out / f"{name}_b{batch}"
            d.mkdir(parents=True, exist_ok=True)
            for old in d.glob("*.so"):
                old.unlink()
            manifest = {"model": name, "image_size": image_size, "sparsity": sparsity, "seed": seed,
                        "num_classes": 1000, "target": tdict, "min_sparsity": min_sparsity, "tolerance": TOL,
                        "build_options": build_options or {},
                        "git": git_info(), "date": _dt.datetime.now().isoformat(timespec="seconds"),
                        "weights": {"generator": "escort_tvm.zoo.weights",
                                    "args": {"name": name, "sparsity": sparsity, "seed": seed}, "sha256": digests},
                        "cases": [prepare_case(d, name, batch, image_size, sparsity, seed, target, weights, builds,
                                               min_sparsity, build_options or {})]}
            (d / "manifest.json").write_text(json.dumps(manifest, indent=1, default=_jsonable))
            log(f"{name} batch {batch}: {d} holds {folder_mb(d):.1f} MB, prepared in {time.perf_counter() - t0:.0f} s")
            dirs.append(d)
    suggest_carries(dirs)
    return dirs


def prepare_case(d: Path, name, batch, image_size, sparsity, seed, target, weights, builds, min_sparsity,
                 build_options: dict) -> dict:
    import escort_tvm
    from escort_tvm import zoo

    log(f"{name} batch {batch}: zoo model ({image_size}x{image_size}, sparsity {sparsity:g})")
    model = zoo.build(name, batch, image_size, sparsity, seed)
    x = make_input(batch, image_size, seed)
    case = {"batch": batch, "input_sha256": sha256(x), "builds": {}}
    log(f"{name} batch {batch}: onnxruntime reference")
    ref = ort_reference(model, x)
    np.save(d / f"ref_b{batch}.npy", ref)
    case["reference"] = f"ref_b{batch}.npy"
    for which in builds:
        ext, rt_inputs = externalize(model, conv_weights=(which == "dense"))
        mod, params = escort_tvm.from_onnx(ext)
        label = "escort-tvm" if which == "ours" else "TVM dense"
        log(f"{name} batch {batch}: building {label} for {target.kind.name}")
        tb = time.perf_counter()
        if which == "ours":
            built = escort_tvm.build(mod, params, target, min_sparsity=min_sparsity, **build_options)
        else:
            built = escort_tvm.build(mod, params, target, min_sparsity=2.0, split_matmuls=False)  # TVM as it is
        build_s = time.perf_counter() - tb
        names = [n for n, _, _ in built.inputs]
        if len(names) != 1 + len(rt_inputs):
            raise RuntimeError(f"{label}: the build takes inputs {names}, expected the image and "
                               f"{len(rt_inputs)} weights")
        fname = f"{name}_b{batch}_{which}.so"
        path = built.export_library(d / fname)
        if target.kind.name == "llvm":  # check the externalized build on the spot (cheap on CPU)
            err = rel_err(built(x, *runtime_arrays(weights, rt_inputs)), ref)
            if not err < TOL:
                raise RuntimeError(f"{label} {name} batch {batch}: relative error {err:.2e} vs onnxruntime")
        case["builds"][label] = {
            "file": fname, "bytes": path.stat().st_size, "build_s": round(build_s, 1),
            "runtime_inputs": rt_inputs, "signature": [[n, list(s), dt] for n, s, dt in built.inputs],
            "sparse_convs": sum(r.kernel != "dense" for r in built.report), "convs": len(built.report),
            "kernels": {k: sum(r.kernel == k for r in built.report) for k in sorted({r.kernel for r in built.report})},
            "report": [r.as_dict() for r in built.report], "matmuls": built.meta.get("matmuls", [])}
        log(f"{name} batch {batch}: {label}: {path.stat().st_size / 1e6:.1f} MB, built in {build_s:.0f} s")
    return case


def folder_mb(d: Path) -> float:
    return sum(f.stat().st_size for f in d.rglob("*") if f.is_file()) / 1e6


def suggest_carries(dirs: list[Path]) -> list[list[Path]]:
    """Group prepared folders into carries that fit, with .devbundle, under CARRY_LIMIT_MB (first fit)."""
    bundle = ROOT / ".devbundle"
    room = CARRY_LIMIT_MB - (folder_mb(bundle) if bundle.exists() else 25.0)
    groups: list[list] = []
    for d in sorted(dirs, key=folder_mb, reverse=True):
        size = folder_mb(d)
        for g in groups:
            if g[0] + size <= room:
                g[0] += size
                g[1].append(d)
                break
        else:
            groups.append([size, [d]])
            if size > room:
                log(f"WARNING: {d} alone ({size:.1f} MB) does not fit a carry with .devbundle ({room:.1f} MB left)")
    for size, g in groups:
        rel = [str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p) for p in g]
        log(f"carry ({size:.1f} MB + .devbundle): {json.dumps(['.devbundle'] + rel)}  then  measure "
            + " ".join(f"--dir {r}" for r in rel))
    return [g for _, g in groups]


def _jsonable(v):
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating,)):
        return float(v)
    if isinstance(v, tuple):
        return list(v)
    raise TypeError(f"not JSON serialisable: {type(v).__name__}")


# ====================================================================== measure (GPU machine: torch + TVM runtime)
def plan_counts(first_ms: float, warmup: int, number: int, repeat: int, budget_s: float) -> tuple[int, int, int]:
    """Warm-up calls, calls per measurement and measurements, shrunk so that one implementation's timing
    takes about ``budget_s`` at most (a slow dense build must not eat the GPU session); at least 1, 1,
    min(3, repeat)."""
    per = max(first_ms, 1e-3) / 1e3
    warmup = max(1, min(warmup, int(0.2 * budget_s / per)))
    number = max(1, min(number, int(0.8 * budget_s / per / max(repeat, 1))))
    repeat = min(repeat, max(3, int(0.8 * budget_s / per / number)))
    return warmup, number, repeat


class _Timer:
    """Medians of ``repeat`` measurements of ``number`` calls, after warm-up calls (counts from plan_counts)."""

    def __init__(self, device_kind: str, torch=None, budget_s: float = 6.0):
        self.kind, self.torch, self.budget_s = device_kind, torch, budget_s
        self.used: dict = {}

    def tvm(self, label, model, args, warmup: int, number: int, repeat: int) -> list[float]:
        vm, dev = model._vm, model.device
        t0 = time.perf_counter()
        vm["main"](*args)
        dev.sync()
        warmup, number, repeat = plan_counts((time.perf_counter() - t0) * 1e3, warmup, number, repeat, self.budget_s)
        self.used[label] = {"warmup": warmup, "number": number, "repeat": repeat}
        for _ in range(warmup):
            vm["main"](*args)
        dev.sync()
        res = vm.time_evaluator("main", dev, number=number, repeat=repeat)(*args)
        return [t * 1e3 for t in res.results]

    def torch_fn(self, label, fn, warmup: int, number: int, repeat: int) -> list[float]:
        torch = self.torch
        cuda = self.kind == "cuda"
        with torch.inference_mode():
            t0 = time.perf_counter()
            fn()
            if cuda:
                torch.cuda.synchronize()
            warmup, number, repeat = plan_counts((time.perf_counter() - t0) * 1e3, warmup, number, repeat,
                                                 self.budget_s)
            self.used[label] = {"warmup": warmup, "number": number, "repeat": repeat}
            for _ in range(warmup):
                fn()
            if cuda:
                torch.cuda.synchronize()
            out = []
            for _ in range(repeat):
                if cuda:
                    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    a.record()
                    for _ in range(number):
                        fn()
                    b.record()
                    b.synchronize()
                    out.append(a.elapsed_time(b) / number)
                else:
                    t0 = time.perf_counter()
                    for _ in range(number):
                        fn()
                    out.append((time.perf_counter() - t0) * 1e3 / number)
        return out


def _env(torch, device_kind: str) -> dict:
    import tvm

    info = {"python": sys.version.split()[0], "numpy": np.__version__, "tvm_runtime": getattr(tvm, "__version__", "?"),
            "runtime_only": bool(getattr(__import__("tvm.base").base, "_RUNTIME_ONLY", False)), "device": device_kind}
    if torch is not None:
        info.update(torch=torch.__version__, cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
        try:
            import torchvision

            info["torchvision"] = torchvision.__version__
        except Exception:
            pass
        if device_kind == "cuda":
            info["gpu"] = torch.cuda.get_device_name(0)
    try:
        p = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=20)
        if p.returncode == 0 and p.stdout.strip():
            info["nvidia_smi"] = p.stdout.strip().splitlines()[0]
    except Exception:
        pass
    return info


def op_times(vm, args, dev, runs: int = 5) -> list[dict]:
    """Wall time of each VM call (a kernel, a packed function such as a specialised conv, a builtin), summed per
    symbol and averaged over ``runs`` calls of ``main`` after one warm-up. The device is synchronised before
    and after every call, so a call's time includes ~10 us of sync and launch overhead: this says where the
    time goes, it is not the network's latency (that is the timed median)."""
    totals: dict[str, list] = {}
    start = [0.0]

    def instrument(func, symbol, before_run, ret_value, *call_args):
        dev.sync()
        now = time.perf_counter()
        if before_run:
            start[0] = now
        else:
            t = totals.setdefault(str(symbol), [0.0, 0])
            t[0] += now - start[0]
            t[1] += 1
        return 0  # VMInstrumentReturnKind: run the call as usual

    vm["main"](*args)
    vm.set_instrument(instrument)
    try:
        for _ in range(runs):
            vm["main"](*args)
    finally:
        vm.set_instrument(None)
    rows = [{"symbol": k, "ms": 1e3 * v[0] / runs, "calls": v[1] // runs} for k, v in totals.items()]
    return sorted(rows, key=lambda r: -r["ms"])


def measure_dir(d: Path, warmup: int, number: int, repeat: int, use_torch: bool,
                budget_s: float = 6.0, with_op_times: bool = False) -> tuple[list[dict], dict]:
    import escort_tvm
    from escort_tvm import zoo

    man = json.loads((d / "manifest.json").read_text())
    device_kind = "cuda" if man["target"]["kind"] == "cuda" else "cpu"
    torch = None
    if use_torch:
        from escort_tvm.torch_ref import TorchUnavailable, import_torch

        try:
            torch = import_torch()  # sets allow_tf32 = False for cuDNN and cuBLAS
            if device_kind == "cuda" and not torch.cuda.is_available():
                raise TorchUnavailable("torch sees no CUDA device")
        except TorchUnavailable as e:
            log(f"PyTorch unavailable: {e}")
            torch = None
    env = _env(torch, device_kind)
    log(f"{man['model']}: regenerating weights with numpy and checking their SHA-256")
    weights = zoo.weights(**man["weights"]["args"])
    bad = [k for k, h in man["weights"]["sha256"].items() if k not in weights or sha256(weights[k]) != h]
    if bad or set(weights) != set(man["weights"]["sha256"]):
        raise RuntimeError(f"regenerated weights differ from the prepared ones ({len(bad)} tensors, e.g. {bad[:3]}): "
                           "numpy's generator gave other numbers here; carry the weights instead")
    timer = _Timer(device_kind, torch, budget_s)
    net_cpu = None
    if torch is not None:
        from escort_tvm.torch_ref import torchvision_model

        net_cpu = torchvision_model(man["model"], weights, man["num_classes"], "cpu")
    rows = []
    for case in man["cases"]:
        batch = case["batch"]
        x = make_input(batch, man["image_size"], man["seed"])
        if sha256(x) != case["input_sha256"]:
            raise RuntimeError("the regenerated input differs from the prepared one")
        row = {"model": man["model"], "batch": batch, "image_size": man["image_size"], "sparsity": man["sparsity"],
               "errors": {}, "times_ms": {}, "median_ms": {}, "skipped": {}, "builds": {}}
        outputs = {}
        loaded = {}
        for label, b in case["builds"].items():
            model = escort_tvm.load(d / b["file"])
            args_np = [x] + runtime_arrays(weights, b["runtime_inputs"])
            args = [escort_tvm_tensor(a, model.device) for a in args_np]
            y = model._vm["main"](*args)
            outputs[label] = y.numpy()
            loaded[label] = (model, args)
            row["builds"][label] = {"sparse_convs": b["sparse_convs"], "convs": b["convs"], "bytes": b["bytes"],
                                    "kernels": b.get("kernels", {}), "build_s": b.get("build_s")}
        if torch is not None:
            dev = "cuda" if device_kind == "cuda" else "cpu"
            net = net_cpu.to(dev)
            xt = torch.from_numpy(x).to(dev)
            with torch.inference_mode():
                outputs["PyTorch"] = net(xt).float().cpu().numpy()
                if device_kind == "cuda":
                    with _tf32(torch):
                        outputs["PyTorch TF32"] = net(xt).float().cpu().numpy()
                net64 = torchvision_model(man["model"], weights, man["num_classes"], "cpu").double().to(dev)
                ref = net64(xt.double()).cpu().numpy()
                del net64
            ref_name = "torchvision float64"
        else:
            ref, ref_name = np.load(d / case["reference"]), "onnxruntime fp32 (prepared)"
        row["reference"] = ref_name
        for label, y in outputs.items():
            row["errors"][label] = rel_err(y, ref)
        if "escort-tvm" in outputs and "TVM dense" in outputs:
            row["errors"]["escort-tvm vs TVM dense"] = rel_err(outputs["escort-tvm"], outputs["TVM dense"])
        log(f"{man['model']} batch {batch}: errors vs {ref_name}: "
            + ", ".join(f"{k} {v:.2e}" for k, v in row["errors"].items()))
        row["tolerance"] = {label: (TOL_TF32 if label == "PyTorch TF32" else TOL) for label in outputs}
        for label, (model, args) in loaded.items():
            if not row["errors"][label] < TOL:
                row["skipped"][label] = f"output mismatch ({row['errors'][label]:.2e})"
                continue
            row["times_ms"][label] = timer.tvm(label, model, args, warmup, number, repeat)
            if with_op_times:
                ops = op_times(model._vm, args, model.device)
                row.setdefault("op_ms", {})[label] = ops
                log(f"{man['model']} batch {batch}: {label} per call (synchronised): "
                    + ", ".join(f"{o['symbol']} {o['ms']:.3f}" for o in ops[:12]))
        if torch is not None:
            if row["errors"]["PyTorch"] < TOL:
                with torch.inference_mode():
                    row["times_ms"]["PyTorch"] = timer.torch_fn("PyTorch", lambda: net(xt), warmup, number, repeat)
            else:
                row["skipped"]["PyTorch"] = f"output mismatch ({row['errors']['PyTorch']:.2e})"
            if "PyTorch TF32" in outputs and row["errors"]["PyTorch TF32"] < TOL_TF32:
                with torch.inference_mode(), _tf32(torch):
                    row["times_ms"]["PyTorch TF32"] = timer.torch_fn("PyTorch TF32", lambda: net(xt), warmup, number,
                                                                     repeat)
            elif "PyTorch TF32" in outputs:
                row["skipped"]["PyTorch TF32"] = f"output mismatch ({row['errors']['PyTorch TF32']:.2e})"
        else:
            row["skipped"]["PyTorch"] = "torch/torchvision not importable"
        row["median_ms"] = {k: float(np.median(v)) for k, v in row["times_ms"].items()}
        row["counts"], timer.used = timer.used, {}
        log(f"{man['model']} batch {batch}: " + ", ".join(f"{k} {v:.3f} ms" for k, v in row["median_ms"].items()))
        rows.append(row)
        loaded.clear()
    return rows, env


@contextlib.contextmanager
def _tf32(torch):
    """PyTorch's default for cuDNN convolutions (TF32 on), for the span of one check or timing."""
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


def escort_tvm_tensor(a, dev):
    import tvm

    return tvm.runtime.tensor(np.ascontiguousarray(a), dev)


def render_markdown(results: dict) -> str:
    tf32 = any("PyTorch TF32" in r["errors"] for r in results["rows"])
    torch_col = "PyTorch fp32 (cuDNN)" if results.get("env", {}).get("device") == "cuda" else "PyTorch fp32 (CPU)"
    lines = [f"# End-to-end latency, {results.get('env', {}).get('gpu', results.get('env', {}).get('device', '?'))}",
             "", f"Command: `{results.get('command', '?')}`", "",
             f"Environment: `{json.dumps(results.get('env', {}))}`", "",
             "Median ms per inference (fp32). Speedup = their time / ours. Outputs checked against the "
             "reference before timing (relative L2 error < 1e-4); a failing implementation is not timed.", "",
             f"| model | batch | convs: specialised / CSR / dense | escort-tvm | TVM dense | {torch_col} | x TVM dense | x PyTorch |"
             + (" PyTorch TF32 | x PyTorch TF32 |" if tf32 else "") + " max rel. error | reference |",
             "|---|---|---|---|---|---|---|---|---|---|" + ("---|---|" if tf32 else "")]
    for r in results["rows"]:
        med = r["median_ms"]
        ours = med.get("escort-tvm")

        def cell(k):
            return f"{med[k]:.3f}" if k in med else r["skipped"].get(k, "-")

        def ratio(k):
            return f"{med[k] / ours:.2f}x" if ours and k in med else "-"

        b = r["builds"].get("escort-tvm", {})
        errs = [v for k, v in r["errors"].items() if "vs" not in k and k != "PyTorch TF32"]
        extra = f" {cell('PyTorch TF32')} | {ratio('PyTorch TF32')} |" if tf32 else ""
        kinds = b.get("kernels")
        convs = (" / ".join(str(kinds.get(k, 0)) for k in ("specialized", "sparse", "dense")) if kinds else
                 f"{b.get('sparse_convs', '?')} sparse of {b.get('convs', '?')}")  # rows measured before 2026-12-02 15h
        lines.append(f"| {r['model']} | {r['batch']} | {convs} | "
                     f"{cell('escort-tvm')} | {cell('TVM dense')} | {cell('PyTorch')} | {ratio('TVM dense')} | "
                     f"{ratio('PyTorch')} |{extra} {max(errs):.1e} | {r['reference']} |")
    if tf32:
        lines.append("")
        lines.append(f"PyTorch TF32: the same network with TF32 on (PyTorch's default for cuDNN convolutions), "
                     f"checked at {TOL_TF32:g} relative error; its error is not in the max column.")
    return "\n".join(lines) + "\n"


def cmd_measure(a) -> int:
    rows, env = [], {}
    for d in a.dir:
        d = Path(d)
        subdirs = [d] if (d / "manifest.json").exists() else sorted(p.parent for p in d.glob("*/manifest.json"))
        if not subdirs:
            raise SystemExit(f"no manifest.json in {d} or its subfolders: run prepare first")
        for sd in subdirs:
            r, env = measure_dir(sd, a.warmup, a.number, a.repeat, not a.no_torch, a.budget_s, a.op_times)
            rows += r
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"command": " ".join(["python3", "scripts/bench_e2e.py"] + sys.argv[1:]), "env": env, "rows": rows,
               "date": _dt.datetime.now().isoformat(timespec="seconds"),
               "protocol": {"warmup": a.warmup, "number": a.number, "repeat": a.repeat, "budget_s": a.budget_s,
                            "tolerance": TOL, "timing": "TVM: VM time_evaluator; PyTorch: CUDA events (perf_counter "
                                                        "on CPU); median of the measurements"}}
    (out / "e2e.json").write_text(json.dumps(results, indent=1))
    (out / "e2e.md").write_text(render_markdown(results))
    print(render_markdown(results))
    return 0 if all(not r["skipped"] or set(r["skipped"]) == {"PyTorch"} and "not importable" in
                    r["skipped"]["PyTorch"] for r in rows) else 1


def cmd_report(a) -> int:
    merged = {"rows": [], "env": {}, "command": []}
    for f in a.results:
        r = json.loads(Path(f).read_text())
        merged["rows"] += r["rows"]
        merged["env"] = merged["env"] or r["env"]
        merged["command"].append(r.get("command", "?"))
    merged["command"] = "; ".join(merged["command"])
    md = render_markdown(merged)
    if a.md:
        Path(a.md).write_text(md)
    print(md)
    return 0


def cmd_prepare(a) -> int:
    target = json.loads(a.target) if a.target.strip().startswith("{") else a.target
    models = [m for m in a.models.split(",") if m]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        raise SystemExit(f"unknown models {unknown}: choose from {', '.join(MODELS)}")
    prepare(Path(a.out), models, [int(b) for b in a.batches.split(",")], a.image_size, a.sparsity, a.seed, target,
            min_sparsity=a.min_sparsity, build_options=json.loads(a.build_options) if a.build_options else None)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="build the zoo models (ours and TVM dense) here")
    p.add_argument("--out", default=".gpu/e2e")
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--batches", default="1,32")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--target", default='{"kind": "cuda", "arch": "sm_90"}')
    p.add_argument("--min-sparsity", type=float, default=0.7,
                   help="our build's min_sparsity (0: every conv, the dense stem too, is a sparse-kernel candidate)")
    p.add_argument("--build-options", metavar="JSON",
                   help='extra escort_tvm.build arguments for our build, e.g. \'{"kernel": "sparse"}\'')
    p.set_defaults(func=cmd_prepare)
    p = sub.add_parser("measure", help="check and time on the GPU machine (TVM runtime only)")
    p.add_argument("--dir", action="append", required=True, help="a prepared model folder, or their parent")
    p.add_argument("--out", required=True)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--number", type=int, default=10)
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--budget-s", type=float, default=6.0,
                   help="about how long one implementation's timing may take; counts shrink to fit (default 6)")
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--op-times", action="store_true",
                   help="also time each VM call of our builds (synchronised; written to e2e.json as op_ms)")
    p.set_defaults(func=cmd_measure)
    p = sub.add_parser("report", help="merge e2e.json files of several measure runs into one table")
    p.add_argument("results", nargs="+")
    p.add_argument("--md", help="write the table there too")
    p.set_defaults(func=cmd_report)
    a = ap.parse_args(argv)
    return a.func(a)


if __name__ == "__main__":
    sys.exit(main())
