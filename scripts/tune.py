#!/usr/bin/env python3
"""Per-layer knob tuner: time every sparse-conv schedule rule at sampled knob settings, write a tuning log.

    # CPU (llvm): everything here; records are appended to --log
    python scripts/tune.py run MODEL.onnx --target llvm --log tune.jsonl [--trials 16]

    # CUDA: build here (nvcc, no GPU needed), check and time on the GPU machine (TVM runtime only + torch)
    python scripts/tune.py prepare MODEL.onnx [--dir .gpu/tune] [--trials 32]
    python scripts/tune.py prepare --layers all --batches 1,32 --sparsity 0.9   # scripts/bench.py's layers
    #   device: carry [".devbundle", ".gpu/tune"]
    source .devbundle/activate && python3 scripts/tune.py measure --dir .gpu/tune --out $OUT
    python scripts/tune.py measure --dir .gpu/tune --dry-run     # consistency only, no GPU (runtime-only safe)

A *task* is one distinct sparse conv as escort_tvm's pass would plan it (its ConvSpec, sparse weight and
fused epilogue; identical convs of a model are tuned once). For every rule of ``schedules.RULES`` that
takes the target, ``prepare`` samples up to ``--trials`` knob settings (the rule's defaults first, then
one-knob neighbours of the defaults interleaved with seeded random points of ``Knobs.space()``), schedules each with
``rule.apply`` (a ValueError there skips the setting, with the reason in the manifest), compiles all
candidates into a few ``.so`` files (one global symbol per candidate) and writes them with
``manifest.json`` and the weight arrays (``weights_<task>.npz``).

``measure`` imports neither ``tvm.relax`` nor the compiler: it loads the libraries with the TVM runtime,
makes seeded random inputs, computes the float64 reference (numpy ``conv2d_reference`` on CPU, torch
``F.conv2d`` on the GPU), checks every candidate with its output poisoned with NaN first (relative L2 error
< 1e-4, no non-finite value), times the passing ones (warm-up, median; CPU: TVM ``time_evaluator``; GPU:
CUDA events around each launch, L2 flushed before each) and writes under ``--out``: ``tune.jsonl`` (the
tuning log: one escort_tvm.tuning_log record per passing candidate), ``summary.md``, ``results.json`` and
``raw.jsonl``. The work runs in a child process; a candidate that kills it (a lost CUDA context, a
segfault) is recorded as a CRASH and the run goes on in a fresh child.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from scripts import first_input  # noqa: E402  (the kernels' first-argument layout, shared with the other script)

DEFAULT_DIR = ROOT / ".gpu" / "tune"
TOL = 1e-4
SIZE_WARN_MB = 35.0  # .devbundle (~23 MiB) + the prepared folder must fit one 64 MiB carry
INT32_LIMIT = 2**31
MEASURE_CMD = "source .devbundle/activate && python3 scripts/tune.py measure --dir .gpu/tune --out $OUT"
# Modules the measuring side must not load: they need TVM's compiler library.
COMPILER_MODULES = ("tvm.relax", "tvm.s_tir", "escort_tvm.compiler", "escort_tvm.frontend",
                    "relay_passes", "schedules")


# ====================================================================== shared helpers (stdlib + numpy)
def log(msg: str) -> None:
    print(msg, flush=True)


def short_error(e: BaseException, limit: int = 400) -> str:
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    return (f"{type(e).__name__}: " + (lines[-1] if lines else ""))[:limit]


def read_records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut short by a crash
                pass
    return out


def append_record(path: Path, rec: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(rec) + "\n")
        f.flush()
        os.fsync(f.fileno())


def git_info() -> dict:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                    capture_output=True, text=True).stdout.strip())
        return {"commit": sha, "dirty": dirty}
    except OSError:
        return {}


def bench_layers() -> dict:
    """scripts/bench.py's LAYERS table (name -> (C, K, H, W, R, stride, pad)), read from that file."""
    spec = importlib.util.spec_from_file_location("_escort_bench_layers", ROOT / "scripts" / "bench.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return dict(mod.LAYERS)


def task_inputs(task: dict):
    """The seeded random input (and residual, when the epilogue adds one) that check and timing use."""
    import numpy as np

    s = task["spec"]
    rng = np.random.default_rng(1000 + task["index"])
    x = rng.standard_normal((s["N"], s["C"], s["H"], s["W"]), dtype=np.float32)
    res = None
    if task["epilogue"].get("residual"):
        res = rng.standard_normal(tuple(task["output_shape"]), dtype=np.float32)
    return x, res


def reference_numpy(task: dict, x, dense, bias, res):
    """float64 y = relu?(conv(x, w) + bias (+ residual)), via escort_tvm.compute.conv2d_reference."""
    import numpy as np

    from escort_tvm.compute import conv2d_reference
    from escort_tvm.conv_spec import ConvSpec

    spec = ConvSpec.from_dict(task["spec"])
    ref = conv2d_reference(x, dense, spec, bias=bias, relu=False)
    if res is not None:
        ref = ref + res.astype(np.float64)
    if task["epilogue"].get("relu"):
        ref = np.maximum(ref, 0.0)
    return ref


def rel_err_numpy(out, ref) -> tuple[float, int]:
    """(relative L2 error, number of non-finite output elements)."""
    import numpy as np

    out = np.asarray(out, dtype=np.float64)
    bad = int(np.count_nonzero(~np.isfinite(out)))
    if bad:
        return float("inf"), bad
    den = float(np.linalg.norm(ref))
    num = float(np.linalg.norm(out - ref))
    return (num / den if den > 0 else num), 0


def median(vals):
    vals = sorted(vals)
    n = len(vals)
    return None if n == 0 else (vals[n // 2] if n % 2 else 0.5 * (vals[n // 2 - 1] + vals[n // 2]))


# ====================================================================== tasks (here: TVM compiler)
def _epilogue_dict(epilogue) -> dict:
    from dataclasses import asdict, is_dataclass

    d = asdict(epilogue) if is_dataclass(epilogue) else {"relu": bool(getattr(epilogue, "relu", False))}
    d.setdefault("relu", False)
    d.setdefault("residual", False)
    return {k: (v if isinstance(v, (bool, int, float, str)) or v is None else str(v)) for k, v in d.items()}


def make_task(label, convs, spec, weight, bias, epilogue) -> dict:
    """A task as prepare uses it (numpy arrays and objects); only JSON-able parts go to the manifest."""
    import numpy as np

    from escort_tvm.tuning_log import weight_fingerprint

    return {"label": label, "convs": list(convs), "spec": spec, "weight": weight,
            "dense": weight.to_dense(), "bias": np.ascontiguousarray(bias, dtype=np.float32),
            "epilogue": epilogue, "fingerprint": weight_fingerprint(weight)}


def tasks_from_model(path, shape_dict=None, min_sparsity=None, group_by="conv") -> tuple[list[dict], list[str]]:
    """The model's sparse convs as the pass plans them (bound params, folded constants), deduplicated;
    returns (tasks, report lines of the convs that stay dense)."""
    from tvm import relax

    import escort_tvm
    from escort_tvm.compiler import bind_params
    from relay_passes.sparse_conv_rewrite import conv_weight_names, plan_sites

    if min_sparsity is None:
        min_sparsity = default_min_sparsity()
    mod, params = escort_tvm.from_onnx(path, shape_dict)
    names = conv_weight_names(mod["main"])
    mod, _ = bind_params(mod, params)
    mod = relax.transform.FoldConstant()(mod)
    report, sites = plan_sites(mod["main"], min_sparsity, names)
    tasks, index = [], {}
    for site in sorted(sites.values(), key=lambda s: s.report.index):
        t = make_task("", [], site.spec, site.weight, site.bias, site.epilogue)
        if group_by == "shape":
            key = (site.spec, json.dumps(_epilogue_dict(site.epilogue), sort_keys=True),
                   round(site.weight.sparsity, 2))
        else:
            key = (site.spec, json.dumps(_epilogue_dict(site.epilogue), sort_keys=True), t["fingerprint"])
        name = f"#{site.report.index} {site.report.name}"
        if key in index:
            tasks[index[key]]["convs"].append(name)
            continue
        index[key] = len(tasks)
        t["convs"] = [name]
        tasks.append(t)
    for t in tasks:
        t["label"] = t["convs"][0] + (f" (+{len(t['convs']) - 1} alike)" if len(t["convs"]) > 1 else "")
    dense = [f"#{r.index} {r.name}: {r.reason}" for r in report if r.kernel != "sparse"]
    return tasks, dense


def default_min_sparsity() -> float:
    """build()'s default threshold, so that tune sees the convs a default build rewrites."""
    import inspect

    from escort_tvm.compiler import build

    d = inspect.signature(build).parameters["min_sparsity"].default
    return float(d) if isinstance(d, (int, float)) else 0.7


def layer_weights(layer: str, shape: tuple, sparsity: float):
    """scripts/bench.py's seeded weights of a layer (same seed recipe, so the same weight and bias)."""
    import numpy as np

    from escort_tvm.models import magnitude_prune

    seed = zlib.crc32(f"{layer}|{sparsity}".encode())
    rng = np.random.default_rng(seed)
    dense = magnitude_prune(rng.standard_normal(shape, dtype=np.float32), sparsity)
    bias = (rng.standard_normal(shape[0]) * 0.1).astype(np.float32)
    return dense, bias


def tasks_from_layers(layers: list[str], batches: list[int], sparsity: float, table: dict | None = None) -> list[dict]:
    from escort_tvm.compute import Epilogue
    from escort_tvm.conv_spec import ConvSpec
    from escort_tvm.sparse_format import SparseConvWeight

    table = table or bench_layers()
    tasks = []
    for b in batches:
        for layer in layers:
            C, K, H, W, R, s, p = table[layer]
            spec = ConvSpec(N=b, C=C, H=H, W=W, K=K, KH=R, KW=R, stride=(s, s), pad=(p,) * 4)
            dense, bias = layer_weights(layer, spec.weight_shape, sparsity)
            t = make_task(f"{layer} N={b}", [layer], spec, SparseConvWeight.from_dense(dense), bias, Epilogue())
            tasks.append(t)
    return tasks


# ====================================================================== candidates
def _valid(knobs) -> bool:
    try:
        knobs.validate()
        return True
    except ValueError:
        return False


def knob_candidates(rule, spec, weight, seed: int):
    """Knob settings in the order to try them: the rule's defaults, then one-knob neighbours of the defaults
    (nearest values first, round robin over knobs) interleaved with seeded random points of the space."""
    import numpy as np

    default = rule.default_knobs(spec, weight)
    yield default
    cls = rule.Knobs
    space = dict(cls.SPACE)
    seen = {default}
    d = default.as_dict()
    per_knob = []
    for name, cands in space.items():
        cands = list(cands)
        i = cands.index(d[name]) if d.get(name) in cands else 0
        order = sorted((v for v in cands if v != d.get(name)), key=lambda v: (abs(cands.index(v) - i), cands.index(v)))
        per_knob.append([default.with_(**{name: v}) for v in order])
    neighbours = []
    for r in range(max((len(p) for p in per_knob), default=0)):
        for p in per_knob:
            if r < len(p) and p[r] not in seen and _valid(p[r]):
                seen.add(p[r])
                neighbours.append(p[r])
    rng = np.random.default_rng(seed)
    size = math.prod(len(v) for v in space.values()) if space else 0

    def randoms():
        if size <= 50000:  # enumerate, then a seeded permutation
            pool = [k for k in cls.space() if _valid(k)]
            for j in rng.permutation(len(pool)):
                yield pool[int(j)]
        else:  # too many to list: draw each knob independently
            names = list(space)
            for _ in range(20 * 1000):
                yield cls(**{n: space[n][int(rng.integers(len(space[n])))] for n in names})

    rand = (k for k in randoms() if k not in seen and _valid(k))  # neighbours are in ``seen`` already
    for k in _interleave(iter(neighbours), rand):
        seen.add(k)
        yield k


def _interleave(a, b):
    a_done = b_done = False
    while not (a_done and b_done):
        for it, which in ((a, "a"), (b, "b")):
            if (which == "a" and a_done) or (which == "b" and b_done):
                continue
            try:
                yield next(it)
            except StopIteration:
                if which == "a":
                    a_done = True
                else:
                    b_done = True


def rules_for(target, names: list[str] | None = None) -> list:
    """Every rule of schedules.RULES (read now, so rules added later take part) that takes ``target``.

    Without ``names``, rules that stay out of build's automatic choice (``in_auto`` False: the CPU
    specialised kernel, whose LLVM compile takes minutes per layer) are left out; name them to tune them.
    """
    import schedules

    rules = [r for r in schedules.RULES if r.is_target(target)]
    if names:
        known = {r.name for r in rules}
        unknown = [n for n in names if n not in known]
        if unknown:
            raise SystemExit(f"rule(s) {unknown} do not take target {target.kind.name}; these do: {sorted(known)}")
        rules = [r for r in rules if r.name in names]
    else:
        rules = [r for r in rules if getattr(r, "in_auto", True)]
    if not rules:
        raise SystemExit(f"no schedule rule in schedules.RULES takes target {target.kind.name}")
    return rules


def _signature(func) -> list:
    return [[str(p.name), [int(d) for d in p.ty.shape], str(p.ty.dtype)] for p in func.params]


def check_plan(plan, spec, epilogue: dict) -> tuple[dict, list]:
    """(first-input layout, signature) after checking that the kernel's parameters are
    (first, *weight_arrays, bias[K], [residual], y) and its indexing fits 32 bits; raises ValueError."""
    import numpy as np

    layout = first_input.describe(plan, spec)
    sig = _signature(plan.func)
    arrays = [np.asarray(a) for a in plan.weight_arrays]
    want = [[layout["shape"], "float32"]] + [[list(a.shape), str(a.dtype)] for a in arrays] + [[[spec.K], "float32"]]
    if epilogue.get("residual"):
        want.append([list(spec.output_shape), "float32"])
    want.append([list(spec.output_shape), "float32"])
    if [[s[1], s[2]] for s in sig] != want:
        raise ValueError(f"kernel parameters {sig} are not (first input, *weight arrays, bias, "
                         f"{'residual, ' if epilogue.get('residual') else ''}y) = {want}")
    if max(math.prod(layout["shape"]), math.prod(spec.output_shape)) >= INT32_LIMIT:
        raise ValueError("input or output too large for the kernel's 32-bit indexing (the pass keeps it dense)")
    return layout, sig


def make_candidates(task: dict, rules: list, trials: int, seed: int, max_attempts: int | None = None):
    """Up to ``trials`` scheduled candidates per rule: (list of (rule, knobs, plan, layout, sig), skipped list)."""
    spec, weight, epi = task["spec"], task["weight"], task["epilogue"]
    epi_d = _epilogue_dict(epi)
    out, skipped = [], []
    for r_i, rule in enumerate(rules):
        got, attempts = 0, 0
        limit = max_attempts or 3 * trials + 8
        try:
            stream = knob_candidates(rule, spec, weight, seed + 7919 * r_i)
            for knobs in stream:
                if got >= trials or attempts >= limit:
                    break
                attempts += 1
                t0 = time.time()
                try:
                    plan = rule.apply(spec, weight, epi, knobs)
                    layout, sig = check_plan(plan, spec, epi_d)
                except ValueError as e:
                    skipped.append({"rule": rule.name, "knobs": _jsonable(knobs.as_dict()), "reason": short_error(e)})
                    continue
                finally:
                    if time.time() - t0 > 10:  # say what takes long (specialised kernels of big layers)
                        log(f"    {rule.name} {_jsonable(knobs.as_dict())}: scheduled in {time.time() - t0:.0f} s")
                out.append((rule, knobs, plan, layout, sig))
                got += 1
        except ValueError as e:  # default_knobs itself refused the conv
            skipped.append({"rule": rule.name, "knobs": None, "reason": short_error(e)})
    return out, skipped


def _jsonable(d: dict) -> dict:
    return {k: (v if isinstance(v, (int, float, str, bool)) or v is None else str(v)) for k, v in d.items()}


# ====================================================================== prepare
def resolve_target(target):
    """As build resolves it ("cuda": the visible GPU's arch, else sm_90); a JSON dict string is accepted too."""
    from escort_tvm.compiler import resolve_target as _resolve

    if isinstance(target, str) and target.strip().startswith("{"):
        try:
            target = json.loads(target)
        except json.JSONDecodeError as e:
            raise SystemExit(f"--target {target!r} is not valid JSON: {e}") from None
    try:
        return _resolve(target)
    except (ValueError, TypeError) as e:
        raise SystemExit(f"tune.py: {e}") from None


def _array_key(a) -> str:
    h = hashlib.sha1()
    h.update(str(a.dtype).encode() + str(a.shape).encode())
    h.update(a.tobytes())
    return "a_" + h.hexdigest()[:16]


def _all_modules(mod):
    yield mod
    for m in mod.imports:
        yield from _all_modules(m)


def _compile(funcs: dict, target):
    import tvm

    with target:
        return tvm.compile(tvm.IRModule(funcs), target=target)


def compile_lib(funcs: dict, target, path: Path) -> tuple[set, dict]:
    """Compile candidates into one exported library; returns (symbols in it, {symbol: why dropped})."""
    dropped = {}
    try:
        ex = _compile(funcs, target)
    except Exception as e:
        log(f"  compiling {len(funcs)} kernels together failed ({short_error(e)}); compiling one by one")
        for sym, f in list(funcs.items()):
            try:
                _compile({sym: f}, target)
            except Exception as e2:
                dropped[sym] = f"does not compile: {short_error(e2)}"
        funcs = {s: f for s, f in funcs.items() if s not in dropped}
        if not funcs:
            return set(), dropped
        ex = _compile(funcs, target)
    if target.kind.name == "cuda":  # an unscheduled PrimFunc is compiled for the host without a word
        source = "".join(m.inspect_source() for m in _all_modules(ex.mod) if m.kind == "cuda")
        for sym in list(funcs):
            if f"{sym}_kernel" not in source:
                dropped[sym] = "not compiled as a GPU kernel"
    ex.export_library(str(path))
    if target.kind.name == "cuda":
        from escort_tvm.cuda_toolchain import carries_gpu_binary

        if not carries_gpu_binary(path):
            raise RuntimeError(f"{path.name} carries no CUDA fatbin (was the CUDA runtime loaded before the build?)")
    return set(funcs) - set(dropped), dropped


def prepare(out_dir: Path, tasks: list[dict], target, trials: int = 32, seed: int = 0, rule_names=None,
            kernels_per_lib: int = 256, command: str = "", source: dict | None = None) -> dict:
    """Schedule and compile every task's candidates into ``out_dir`` (replaced as a whole); returns the manifest."""
    import numpy as np
    import tvm

    t_start = time.time()
    target = resolve_target(target)
    if target.kind.name == "cuda":
        from escort_tvm.cuda_toolchain import prepare_cuda_build

        prepare_cuda_build()
    rules = rules_for(target, rule_names)
    if trials < 1:
        raise SystemExit("--trials must be >= 1")
    if not tasks:
        raise SystemExit("nothing to tune: no conv is rewritten to a sparse kernel (see the dense reasons above)")
    out_dir = Path(out_dir)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    log(f"target {target.kind.name}: rules {[r.name for r in rules]}, up to {trials} knob setting(s) per rule, "
        f"{len(tasks)} task(s)")

    entries, pending, libs = [], {}, []
    t_compile = 0.0

    def flush():
        nonlocal t_compile
        if not pending:
            return
        name = f"kernels_{len(libs)}.so"
        t0 = time.time()
        have, dropped = compile_lib({s: f for s, (f, _) in pending.items()}, target, tmp / name)
        t_compile += time.time() - t0
        log(f"  compiled {len(have)} kernel(s) into {name} in {time.time() - t0:.1f} s"
            + (f"; {len(dropped)} dropped" if dropped else ""))
        libs.append(name)
        for sym, (_, cand) in pending.items():
            cand["lib"] = name
            if sym in dropped:
                cand["dropped"] = dropped[sym]
        pending.clear()

    for ti, task in enumerate(tasks):
        t0 = time.time()
        spec = task["spec"]
        cands, skipped = make_candidates(task, rules, trials, seed + 104729 * ti)
        arrays_store = {"dense": task["dense"], "bias": task["bias"]}
        centries = []
        for ci, (rule, knobs, plan, layout, sig) in enumerate(cands):
            sym = f"escort_tune_t{ti}_c{ci}"
            keys = []
            for a in plan.weight_arrays:
                a = np.ascontiguousarray(a)
                k = _array_key(a)
                arrays_store.setdefault(k, a)
                keys.append({"key": k, "shape": list(a.shape), "dtype": str(a.dtype)})
            default = rule.default_knobs(spec, task["weight"]) == knobs
            cand = {"index": ci, "symbol": sym, "rule": rule.name, "knobs": _jsonable(knobs.as_dict()),
                    "default": bool(default), "first_input": layout, "arrays": keys, "params": sig}
            centries.append(cand)
            pending[sym] = (plan.func.with_attr("global_symbol", sym), cand)
        wfile = f"weights_{ti}.npz"
        np.savez_compressed(tmp / wfile, **arrays_store)
        w = task["weight"]
        entries.append({"index": ti, "label": task["label"], "convs": task["convs"], "spec": spec.to_dict(),
                        "describe": spec.describe(), "output_shape": list(spec.output_shape),
                        "sparsity": round(float(w.sparsity), 6), "nnz": int(w.nnz), "weight": task["fingerprint"],
                        "epilogue": _epilogue_dict(task["epilogue"]), "weights": wfile, "dense_key": "dense",
                        "bias_key": "bias", "candidates": centries, "skipped": skipped})
        by_rule = {}
        for c in centries:
            by_rule[c["rule"]] = by_rule.get(c["rule"], 0) + 1
        log(f"task {ti:3d} {task['label'][:40]:40s} {spec.describe()} sp={w.sparsity:.3f}: "
            + ", ".join(f"{r} {n}" for r, n in by_rule.items())
            + (f"; {len(skipped)} setting(s) skipped" if skipped else "") + f" ({time.time() - t0:.1f} s)")
        for s in skipped[:3]:
            log(f"    skipped {s['rule']} {s['knobs']}: {s['reason']}")
        if len(pending) >= kernels_per_lib:
            flush()
    flush()
    for e in entries:  # drop what did not compile, keeping the reason
        keep = []
        for c in e["candidates"]:
            if "dropped" in c:
                e["skipped"].append({"rule": c["rule"], "knobs": c["knobs"], "reason": c.pop("dropped")})
            else:
                keep.append(c)
        e["candidates"] = keep
    manifest = {
        "kind": "escort-tune", "version": 1,
        "prepared_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command, "git": git_info(), "tvm": getattr(tvm, "__version__", "?"),
        "target": json.loads(json.dumps(dict(target.export()), default=str)) if hasattr(target, "export")
        else {"kind": target.kind.name}, "target_kind": target.kind.name, "rules": [r.name for r in rules],
        "trials": trials, "seed": seed, "source": source or {}, "libs": libs,
        "input_seed": "numpy.random.default_rng(1000 + task index): x, then residual",
        "tasks": entries,
    }
    manifest["timings_s"] = {"compile": round(t_compile, 1), "total": round(time.time() - t_start, 1)}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
    manifest["files"] = {p.name: p.stat().st_size for p in sorted(tmp.iterdir())}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    total_mb = sum(manifest["files"].values()) / 1e6
    n = sum(len(e["candidates"]) for e in entries)
    log(f"wrote {out_dir}: {len(entries)} task(s), {n} candidate kernel(s) in {len(libs)} librar(ies), "
        f"{total_mb:.1f} MB, in {time.time() - t_start:.1f} s")
    if target.kind.name == "cuda" and total_mb > SIZE_WARN_MB:
        log(f"WARNING: {out_dir} is {total_mb:.1f} MB; with .devbundle it may not fit the 64 MiB carry: prepare "
            "fewer tasks at a time (--convs / --layers), fewer --trials, or --group-by shape")
    return manifest


# ====================================================================== measure backends (TVM runtime only)
class CpuBackend:
    """llvm libraries on the host: numpy inputs, conv2d_reference, TVM's time_evaluator (median of repeats)."""

    name = "cpu"

    def __init__(self, repeat: int = 10, min_repeat_ms: int = 10):
        import tvm

        self.tvm, self.dev = tvm, tvm.cpu(0)
        self.repeat, self.min_repeat_ms = repeat, min_repeat_ms

    def info(self) -> dict:
        import platform

        return {"device": f"cpu {platform.processor() or platform.machine()}", "cpus": os.cpu_count(),
                "timer": f"tvm time_evaluator(repeat={self.repeat}, min_repeat_ms={self.min_repeat_ms}), median"}

    def load(self, path: Path):
        return self.tvm.runtime.load_module(str(path))

    def begin_task(self, task, x, dense, bias, res):
        self.x, self.ref = x, reference_numpy(task, x, dense, bias, res)
        self.bias = self.tvm.runtime.tensor(bias, self.dev)
        self.res = None if res is None else self.tvm.runtime.tensor(res, self.dev)

    def args(self, cand, arrays, out_shape):
        import numpy as np

        t = self.tvm.runtime.tensor
        xin = t(first_input.to_numpy(self.x, cand["first_input"]), self.dev)
        y = t(np.full(out_shape, np.nan, np.float32), self.dev)
        return [xin] + [t(np.ascontiguousarray(a), self.dev) for a in arrays] + [self.bias] \
            + ([self.res] if self.res is not None else []) + [y]

    def call(self, fn, args):
        fn(*args)

    def check(self, args):
        return rel_err_numpy(args[-1].numpy(), self.ref)

    def time_ms(self, lib, symbol, fn, args) -> float:
        ev = lib.time_evaluator(symbol, self.dev, number=1, repeat=self.repeat, min_repeat_ms=int(self.min_repeat_ms))
        return float(median(list(ev(*args).results))) * 1e3

    def healthy(self) -> bool:
        return True

    def end_task(self):
        self.x = self.ref = self.bias = self.res = None


def load_cuda_tvm(allow_stub: bool = False):
    """TVM's CUDA runtime (driver first, a stub where allowed), then ``tvm`` (runtime-only under TVM_USE_RUNTIME_LIB=1)."""
    from escort_tvm.cuda_toolchain import load_cuda_runtime

    load_cuda_runtime(allow_stub=allow_stub)
    import tvm

    return tvm


class CudaBackend:
    """CUDA libraries on the GPU machine: torch for inputs, the float64 F.conv2d reference and CUDA events."""

    name = "cuda"

    def __init__(self, warmup_ms: float = 10.0, rep_ms: float = 50.0, min_reps: int = 10, max_reps: int = 200,
                 flush_l2: bool = True):
        import torch
        import torch.nn.functional as F

        if not torch.cuda.is_available():
            raise RuntimeError("measuring CUDA kernels needs a CUDA GPU visible to torch")
        torch.cuda.init()
        self.torch, self.F = torch, F
        self.tvm = load_cuda_tvm(allow_stub=False)
        self.dev = self.tvm.cuda(0)
        self.warmup_ms, self.rep_ms, self.min_reps, self.max_reps = warmup_ms, rep_ms, min_reps, max_reps
        self.flush = torch.empty(int(256e6 // 4), dtype=torch.int, device="cuda") if flush_l2 else None
        if torch.cuda.current_stream().cuda_stream != 0:
            log("WARNING: torch's current stream is not the default stream; TVM launches on the default stream")

    def info(self) -> dict:
        torch = self.torch
        return {"device": torch.cuda.get_device_name(0),
                "capability": ".".join(map(str, torch.cuda.get_device_capability(0))), "torch": torch.__version__,
                "cuda": torch.version.cuda,
                "timer": f"CUDA events around each launch, {'L2 flushed before each, ' if self.flush is not None else ''}"
                         f"median of {self.min_reps}-{self.max_reps} launches after ~{self.warmup_ms:g} ms warm-up"}

    def load(self, path: Path):
        return self.tvm.runtime.load_module(str(path))

    def begin_task(self, task, x, dense, bias, res):
        torch, F = self.torch, self.F
        s = task["spec"]
        pt, pl, pb, pr = s["pad"]
        self.x = torch.from_numpy(x).cuda()
        self.bias = torch.from_numpy(bias).cuda()
        self.res = None if res is None else torch.from_numpy(res).cuda()
        w = torch.from_numpy(dense).cuda().double()
        xd = F.pad(self.x.double(), (pl, pr, pt, pb))
        ref = F.conv2d(xd, w, stride=tuple(s["stride"]), dilation=tuple(s["dilation"]), groups=s["groups"])
        ref = ref + self.bias.double().view(1, -1, 1, 1)
        if self.res is not None:
            ref = ref + self.res.double()
        if task["epilogue"].get("relu"):
            ref = torch.clamp_min(ref, 0.0)
        self.ref = ref
        self.ref_norm = float(ref.norm())
        del w, xd

    def args(self, cand, arrays, out_shape):
        torch = self.torch
        xin = first_input.to_torch(self.F, self.x, cand["first_input"])
        y = torch.full(tuple(out_shape), float("nan"), device="cuda")
        return [xin] + [torch.from_numpy(a.copy()).cuda() for a in arrays] + [self.bias] \
            + ([self.res] if self.res is not None else []) + [y]

    def _targs(self, args):
        return [self.tvm.runtime.from_dlpack(a) for a in args]

    def call(self, fn, args):
        fn(*self._targs(args))
        self.torch.cuda.synchronize()

    def check(self, args):
        y = args[-1]
        bad = int((~self.torch.isfinite(y)).sum())
        if bad:
            return float("inf"), bad
        num = float((y.double() - self.ref).norm())
        return (num / self.ref_norm if self.ref_norm > 0 else num), 0

    def time_ms(self, lib, symbol, fn, args) -> float:
        torch = self.torch
        targs = self._targs(args)
        torch.cuda.synchronize()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(3):
            fn(*targs)
        e.record()
        torch.cuda.synchronize()
        est = max(s.elapsed_time(e) / 3, 1e-3)
        for _ in range(int(min(1000, max(2, self.warmup_ms / est)))):
            fn(*targs)
        n = int(min(self.max_reps, max(self.min_reps, self.rep_ms / est)))
        ss = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        es = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        for i in range(n):
            if self.flush is not None:
                self.flush.zero_()
            ss[i].record()
            fn(*targs)
            es[i].record()
        torch.cuda.synchronize()
        return float(median([a.elapsed_time(b) for a, b in zip(ss, es)]))

    def healthy(self) -> bool:
        try:
            t = self.torch.ones(1, device="cuda") + 1
            self.torch.cuda.synchronize()
            return float(t.item()) == 2.0
        except Exception:
            return False

    def end_task(self):
        self.x = self.bias = self.res = self.ref = None
        self.torch.cuda.empty_cache()


def make_backend(manifest: dict, args):
    if manifest["target_kind"] == "llvm":
        return CpuBackend(repeat=args.repeat, min_repeat_ms=args.min_repeat_ms)
    if manifest["target_kind"] == "cuda":
        return CudaBackend(warmup_ms=args.warmup_ms, rep_ms=args.rep_ms, flush_l2=not args.no_flush)
    raise SystemExit(f"no measuring backend for target {manifest['target_kind']!r}")


# ====================================================================== measure worker and driver
def _load_manifest(d: Path) -> dict:
    p = Path(d) / "manifest.json"
    if not p.is_file():
        raise SystemExit(f"{p} does not exist: run `tune.py prepare` first (or pass --dir)")
    m = json.loads(p.read_text())
    if m.get("kind") != "escort-tune":
        raise SystemExit(f"{p} is not a tune.py manifest")
    return m


def _selected(manifest: dict, only: str | None) -> list[dict]:
    if not only:
        return manifest["tasks"]
    want = {s.strip() for s in only.split(",") if s.strip()}
    return [t for t in manifest["tasks"] if str(t["index"]) in want or t["label"] in want]


def measure_worker(args) -> int:
    """Check and time every candidate; one record per candidate in raw.jsonl (resumes after a crash)."""
    import numpy as np

    d, out = Path(args.dir), Path(args.out)
    manifest = _load_manifest(d)
    raw, progress = out / "raw.jsonl", out / "progress.json"
    records = read_records(raw)
    done = {(r["task"], r.get("cand")) for r in records if r.get("type") in ("cand", "task_end", "task_skip")}
    t0 = float(os.environ.get("TUNE_T0", time.time()))
    be = make_backend(manifest, args)
    append_record(raw, {"type": "env", **be.info()})
    libs = {}

    def emit(rec):
        records.append(rec)
        append_record(raw, rec)

    def mark(task, cand):
        progress.write_text(json.dumps({"task": task, "cand": cand, "t": time.time()}))

    fault = os.environ.get("ESCORT_TUNE_FAULT")  # test hook: "task,cand" makes the worker die there once
    fault = tuple(int(v) for v in fault.split(",")) if fault else None
    for t in _selected(manifest, args.tasks):
        i = t["index"]
        if (i, None) in done:
            continue
        if any(r.get("type") == "task_start" and r["task"] == i for r in records) and \
                not any(r.get("type") == "task_ready" and r["task"] == i for r in records):
            emit({"type": "task_skip", "task": i, "cand": None, "reason": "the worker died setting the task up"})
            continue
        if time.time() - t0 > args.budget_s:
            emit({"type": "task_skip", "task": i, "cand": None,
                  "reason": f"time budget {args.budget_s:.0f} s spent: measure it with --tasks {i}"})
            continue
        tt = time.time()
        mark(i, None)
        emit({"type": "task_start", "task": i})
        z = np.load(d / t["weights"])
        dense, bias = z[t["dense_key"]], z[t["bias_key"]]
        x, res = task_inputs(t)
        be.begin_task(t, x, dense, bias, res)
        emit({"type": "task_ready", "task": i, "setup_s": round(time.time() - tt, 2)})
        for c in t["candidates"]:
            if (i, c["index"]) in done:
                continue
            mark(i, c["index"])
            if fault == (i, c["index"]) and not any(r.get("type") == "fault" for r in records):
                emit({"type": "fault", "task": i, "cand": c["index"]})
                os._exit(7)
            rec = {"type": "cand", "task": i, "cand": c["index"], "symbol": c["symbol"], "rule": c["rule"],
                   "knobs": c["knobs"], "default": c["default"]}
            try:
                if c["lib"] not in libs:
                    libs[c["lib"]] = be.load(d / c["lib"])
                lib = libs[c["lib"]]
                fn = lib[c["symbol"]]
                a = be.args(c, [z[k["key"]] for k in c["arrays"]], t["output_shape"])
                be.call(fn, a)
                err, bad = be.check(a)
                ok = bad == 0 and err < TOL
                rec.update(rel_err=err if math.isfinite(err) else None, nonfinite=bad, status="ok" if ok else "FAIL")
                if ok:
                    rec["time_ms"] = be.time_ms(lib, c["symbol"], fn, a)
                    err2, bad2 = be.check(a)  # still right after many launches?
                    if bad2 or not err2 < TOL:
                        rec.update(status="FAIL", rel_err_after_timing=err2 if math.isfinite(err2) else None,
                                   nonfinite_after_timing=bad2)
                        rec.pop("time_ms")
                del a, fn
            except Exception as e:
                rec.update(status="FAIL", error=short_error(e))
                if not be.healthy():
                    rec["status"] = "CRASH"
                    emit(rec)
                    log(f"  task {i} candidate {c['index']}: device lost ({short_error(e)}); restarting")
                    sys.exit(3)
            emit(rec)
        be.end_task()
        cands = [r for r in records if r.get("type") == "cand" and r["task"] == i]
        ok = [r for r in cands if r.get("status") == "ok"]
        best = min(ok, key=lambda r: r["time_ms"]) if ok else None
        emit({"type": "task_end", "task": i, "cand": None, "s": round(time.time() - tt, 1)})
        log(f"task {i:3d} {t['label'][:36]:36s} {len(ok)}/{len(t['candidates'])} ok"
            + (f", best {best['rule']} {best['time_ms']:.4f} ms {json.dumps(best['knobs'])}" if best else "")
            + f" ({time.time() - tt:.1f} s)")
    emit({"type": "worker_end", "compiler_modules_loaded": _compiler_modules()})
    if progress.exists():
        progress.unlink()
    return 0


def _compiler_modules() -> list[str]:
    return sorted(m for m in sys.modules if any(m == p or m.startswith(p + ".") for p in COMPILER_MODULES))


def measure_driver(args) -> int:
    """Run the worker in a child process, restarting it after a crash; then write the log and the summary."""
    d, out = Path(args.dir), Path(args.out)
    manifest = _load_manifest(d)
    out.mkdir(parents=True, exist_ok=True)
    raw, progress = out / "raw.jsonl", out / "progress.json"
    for p in (raw, progress):
        if p.exists() and not args.resume:
            p.unlink()
    t0 = time.time()
    cmd = [sys.executable, str(Path(__file__).resolve()), "measure", "--worker"] + _measure_flags(args)
    env = dict(os.environ, TUNE_T0=str(t0))
    restarts, crashed = 0, set()
    while True:
        child = subprocess.Popen(cmd, env=env)
        rc, last = None, time.time()
        while rc is None:
            try:
                rc = child.wait(timeout=5)
            except subprocess.TimeoutExpired:
                mt = progress.stat().st_mtime if progress.exists() else last
                if time.time() - max(mt, last) > args.stall_s:
                    log(f"worker made no progress for {args.stall_s:.0f} s: killing it")
                    child.kill()
                    rc = child.wait()
        if rc == 0:
            break
        prog = json.loads(progress.read_text()) if progress.exists() else None
        recs = read_records(raw)
        if prog is not None:
            key = (prog["task"], prog["cand"])
            seen = any(r.get("task") == key[0] and r.get("cand") == key[1]
                       and r.get("type") in ("cand", "task_skip", "task_end") for r in recs)
            if not seen:
                if key[1] is None:
                    append_record(raw, {"type": "task_skip", "task": key[0], "cand": None,
                                        "reason": f"the worker died (exit {rc}) setting the task up"})
                else:
                    c = _candidate(manifest, *key)
                    append_record(raw, {"type": "cand", "task": key[0], "cand": key[1], "symbol": c["symbol"],
                                        "rule": c["rule"], "knobs": c["knobs"], "default": c["default"],
                                        "status": "CRASH", "error": f"worker died (exit {rc}) running this candidate"})
        restarts += 1
        if prog is None or (prog["task"], prog["cand"]) in crashed or restarts > args.max_restarts:
            log(f"worker failed (exit {rc}); giving up after {restarts} restart(s)")
            break
        crashed.add((prog["task"], prog["cand"]))
        log(f"worker exited {rc} at task {prog['task']} candidate {prog['cand']}: restarting "
            f"({restarts}/{args.max_restarts})")
    if progress.exists():
        progress.unlink()
    result = write_outputs(out, manifest, args)
    log("")
    log(result["table"])
    n_fail = sum(1 for t in result["tasks"] if t["measured"] and t["winner"] is None)
    n_left = sum(not t["measured"] for t in result["tasks"])
    log(f"wrote {out / 'tune.jsonl'} ({result['records']} records), {out / 'summary.md'}, {out / 'results.json'} "
        f"in {time.time() - t0:.0f} s; {n_fail} task(s) without a passing candidate, {n_left} not measured")
    # failure: a task where nothing passed, or a worker that gave up; tasks left for lack of time are not one
    return 1 if n_fail or rc != 0 or not any(t["measured"] for t in result["tasks"]) else 0


def _measure_flags(args) -> list[str]:
    flags = ["--dir", str(args.dir), "--out", str(args.out), "--budget-s", str(args.budget_s),
             "--repeat", str(args.repeat), "--min-repeat-ms", str(args.min_repeat_ms),
             "--warmup-ms", str(args.warmup_ms), "--rep-ms", str(args.rep_ms)]
    if args.tasks:
        flags += ["--tasks", args.tasks]
    if args.no_flush:
        flags.append("--no-flush")
    return flags


def _candidate(manifest: dict, task: int, cand: int) -> dict:
    t = next(t for t in manifest["tasks"] if t["index"] == task)
    return next(c for c in t["candidates"] if c["index"] == cand)


def _f(v, nd=4) -> str:
    return "-" if v is None else f"{v:.{nd}f}"


def write_outputs(out: Path, manifest: dict, args) -> dict:
    """tune.jsonl (passing candidates as tuning records), results.json and summary.md from raw.jsonl."""
    from escort_tvm.tuning_log import TuningLog

    records = read_records(out / "raw.jsonl")
    env = next((r for r in reversed(records) if r.get("type") == "env"), {})
    env = {k: v for k, v in env.items() if k != "type"}
    date = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    lines, tasks = [], []
    for t in manifest["tasks"]:
        cands = {r["cand"]: r for r in records if r.get("type") == "cand" and r["task"] == t["index"]}
        skip = next((r for r in records if r.get("type") == "task_skip" and r["task"] == t["index"]), None)
        rules = {}
        for c in t["candidates"]:
            r = cands.get(c["index"])
            st = rules.setdefault(c["rule"], {"candidates": 0, "ok": 0, "failed": 0, "crashed": 0, "default_ms": None,
                                              "best_ms": None, "best_knobs": None})
            st["candidates"] += 1
            if r is None:
                continue
            if r.get("status") == "ok":
                st["ok"] += 1
                if c["default"]:
                    st["default_ms"] = r["time_ms"]
                if st["best_ms"] is None or r["time_ms"] < st["best_ms"]:
                    st["best_ms"], st["best_knobs"] = r["time_ms"], c["knobs"]
                lines.append(TuningLog.record(t["spec"], t["sparsity"], c["rule"], c["knobs"], r["time_ms"],
                                              weight=t["weight"], nnz=t["nnz"], epilogue=t["epilogue"],
                                              target=manifest["target_kind"], device=env.get("device"), date=date,
                                              task=t["label"]))
            elif r.get("status") == "CRASH":
                st["crashed"] += 1
            else:
                st["failed"] += 1
        for s in t["skipped"]:
            st = rules.setdefault(s["rule"], {"candidates": 0, "ok": 0, "failed": 0, "crashed": 0,
                                              "default_ms": None, "best_ms": None, "best_knobs": None})
            st["skipped"] = st.get("skipped", 0) + 1
        timed = {n: s for n, s in rules.items() if s["best_ms"] is not None}
        winner = min(timed, key=lambda n: timed[n]["best_ms"]) if timed else None
        measured = skip is None and bool(cands)
        tasks.append({"index": t["index"], "label": t["label"], "convs": t["convs"], "describe": t["describe"],
                      "sparsity": t["sparsity"], "measured": measured, "skip_reason": skip and skip.get("reason"),
                      "rules": rules, "winner": winner,
                      "best_ms": timed[winner]["best_ms"] if winner else None,
                      "failures": [{"cand": r["cand"], "rule": r["rule"], "knobs": r["knobs"],
                                    "status": r["status"], "rel_err": r.get("rel_err"), "error": r.get("error")}
                                   for r in cands.values() if r.get("status") != "ok"]})
    (out / "tune.jsonl").write_text("".join(ln + "\n" for ln in lines))
    table = summary_table(tasks, manifest["rules"])
    md = [f"# Tuning results ({manifest['target_kind']})", "",
          f"- device: {env.get('device', '?')}; timer: {env.get('timer', '?')}",
          f"- prepared {manifest.get('prepared_at')} at {manifest.get('git', {}).get('commit', '?')[:12]}"
          f"{' (dirty)' if manifest.get('git', {}).get('dirty') else ''} with `{manifest.get('command', '')}`",
          f"- measured {date}; rules {', '.join(manifest['rules'])}; up to {manifest['trials']} knob setting(s) per "
          f"rule; each candidate checked (NaN-poisoned output, relative L2 error < {TOL:g} vs float64) before timing",
          "", table, ""]
    problems = []
    for t in tasks:
        if not t["measured"]:
            problems.append(f"- task {t['index']} {t['label']}: not measured ({t['skip_reason'] or 'no record'})")
        for f in t["failures"]:
            problems.append(f"- task {t['index']} {t['label']} {f['rule']} {json.dumps(f['knobs'])}: {f['status']}"
                            f" (rel err {f['rel_err']}) {f['error'] or ''}".rstrip())
    if problems:
        md += ["## Failures and tasks not measured", ""] + problems + [""]
    (out / "summary.md").write_text("\n".join(md))
    result = {"env": env, "date": date, "manifest": {k: manifest.get(k) for k in
                                                      ("prepared_at", "git", "command", "target", "rules", "trials")},
              "tasks": tasks, "records": len(lines), "table": table}
    (out / "results.json").write_text(json.dumps(result, indent=1))
    return result


def summary_table(tasks: list[dict], rule_names: list[str]) -> str:
    head = ["task", "conv", "sparsity"]
    for r in rule_names:
        head += [f"{r} default ms", f"{r} best ms", f"{r} ok/n"]
    head += ["winner", "best knobs"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for t in tasks:
        row = [f"{t['index']} {t['label']}", t["describe"], f"{t['sparsity']:.3f}"]
        for r in rule_names:
            s = t["rules"].get(r)
            row += ([_f(s["default_ms"]), _f(s["best_ms"]), f"{s['ok']}/{s['candidates']}"] if s else ["-", "-", "-"])
        w = t["winner"]
        row += [w or ("not measured" if not t["measured"] else "none passed"),
                json.dumps(t["rules"][w]["best_knobs"]) if w else ""]
        rows.append("| " + " | ".join(row) + " |")
    return "\n".join(rows)


# ====================================================================== dry run (no kernel is launched)
def dry_run(d: Path, allow_stub: bool = True) -> dict:
    """What measure would load, checked without running a kernel: libraries and symbols (TVM runtime), arrays vs
    kernel signatures, input layouts, the numpy side of the reference. Works under TVM_USE_RUNTIME_LIB=1."""
    import numpy as np

    manifest = _load_manifest(d)
    problems = []
    if manifest["target_kind"] == "cuda":
        tvm = load_cuda_tvm(allow_stub=allow_stub)
    else:
        import tvm
    libs = {}
    for name in manifest["libs"]:
        try:
            libs[name] = tvm.runtime.load_module(str(d / name))
        except Exception as e:
            problems.append(f"{name} does not load with the TVM runtime: {short_error(e)}")
    n = 0
    for t in manifest["tasks"]:
        z = np.load(d / t["weights"])
        dense, bias = z[t["dense_key"]], z[t["bias_key"]]
        s = t["spec"]
        if list(dense.shape) != [s["K"], s["C"] // s["groups"], s["KH"], s["KW"]] or dense.dtype != np.float32:
            problems.append(f"task {t['index']}: dense weight {dense.shape} {dense.dtype}")
        if int(np.count_nonzero(dense)) != t["nnz"]:
            problems.append(f"task {t['index']}: dense weight has {np.count_nonzero(dense)} nonzeros, manifest {t['nnz']}")
        if list(bias.shape) != [s["K"]]:
            problems.append(f"task {t['index']}: bias shape {bias.shape}")
        x, res = task_inputs(t)
        if list(x.shape) != [s["N"], s["C"], s["H"], s["W"]] or not np.isfinite(x).all():
            problems.append(f"task {t['index']}: input {x.shape}")
        for c in t["candidates"]:
            n += 1
            lib = libs.get(c["lib"])
            if lib is not None and not lib.implements_function(c["symbol"]):
                problems.append(f"{c['lib']} lacks {c['symbol']}")
            arrays = [z[a["key"]] for a in c["arrays"]]
            params = c["params"]
            want = [c["first_input"]["shape"]] + [list(a.shape) for a in arrays] + [[s["K"]]] \
                + ([t["output_shape"]] if res is not None else []) + [t["output_shape"]]
            if [p[1] for p in params] != want:
                problems.append(f"{c['symbol']}: parameters {params} vs arrays/layout {want}")
            if [str(a.dtype) for a in arrays] != [p[2] for p in params[1:1 + len(arrays)]]:
                problems.append(f"{c['symbol']}: array dtypes differ from the kernel's")
            if list(first_input.to_numpy(x, c["first_input"]).shape) != c["first_input"]["shape"]:
                problems.append(f"{c['symbol']}: first input layout gives another shape")
    mods = _compiler_modules()
    return {"tasks": len(manifest["tasks"]), "candidates": n, "libs": len(libs), "problems": problems,
            "compiler_modules_loaded": mods, "runtime_only": os.environ.get("TVM_USE_RUNTIME_LIB") == "1",
            "target_kind": manifest["target_kind"]}


# ====================================================================== CLI
def _parse_shapes(items) -> dict | None:
    if not items:
        return None
    out = {}
    for it in items:
        name, sep, dims = it.partition("=")
        try:
            if not sep:
                raise ValueError
            out[name] = [int(v) for v in dims.split(",")]
        except ValueError:
            raise SystemExit(f"--shape {it!r}: expected NAME=D0,D1,... (e.g. input=1,3,224,224)") from None
    return out


def _tasks_from_args(a) -> tuple[list[dict], dict]:
    if bool(a.model) == bool(a.layers):
        raise SystemExit("give a MODEL.onnx or --layers (not both)")
    if a.model:
        try:
            tasks, dense = tasks_from_model(a.model, _parse_shapes(a.shape), a.min_sparsity, a.group_by)
        except (FileNotFoundError, ValueError) as e:
            raise SystemExit(f"tune.py: {e}") from None
        for line in dense:
            log(f"dense (not tuned): {line}")
        source = {"model": str(a.model), "group_by": a.group_by, "min_sparsity": a.min_sparsity}
    else:
        table = bench_layers()
        layers = list(table) if a.layers == "all" else [s.strip() for s in a.layers.split(",") if s.strip()]
        unknown = [x for x in layers if x not in table]
        if unknown:
            raise SystemExit(f"unknown layer(s) {unknown}; known (scripts/bench.py LAYERS): {', '.join(table)}")
        try:
            batches = [int(b) for b in a.batches.split(",")]
        except ValueError:
            raise SystemExit(f"--batches {a.batches!r}: expected comma-separated integers") from None
        tasks = tasks_from_layers(layers, batches, a.sparsity, table)
        source = {"layers": layers, "batches": batches, "sparsity": a.sparsity}
    if a.convs:
        want = {s.strip() for s in a.convs.split(",")}
        tasks = [t for i, t in enumerate(tasks)
                 if str(i) in want or any(c.split(" ", 1)[-1] in want for c in t["convs"])]
        if not tasks:
            raise SystemExit(f"--convs {a.convs!r} selects no task")
    return tasks, source


def _add_source_args(p):
    p.add_argument("model", nargs="?", help="ONNX model whose sparse convs to tune")
    p.add_argument("--layers", help="instead of a model: 'all' or comma-separated names of scripts/bench.py's LAYERS")
    p.add_argument("--batches", default="1", help="with --layers: comma-separated batch sizes (default 1)")
    p.add_argument("--sparsity", type=float, default=0.9, help="with --layers: pruned fraction (default 0.9)")
    p.add_argument("--shape", action="append", help="with a model: input shape NAME=D0,D1,... (repeatable)")
    p.add_argument("--min-sparsity", type=float, default=None, help="convs below stay dense (default: build's)")
    p.add_argument("--group-by", choices=["conv", "shape"], default="conv",
                   help="conv: identical convs tuned once (default); shape: one task per shape and sparsity")
    p.add_argument("--convs", help="only these tasks: task indices or conv names (as the build report names them)")
    p.add_argument("--trials", type=int, default=32, help="knob settings per rule and task (default 32)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rules", help="comma-separated rule names (default: every rule that takes the target)")
    p.add_argument("--kernels-per-lib", type=int, default=256, help="candidates per .so (default 256)")


def _add_measure_args(p):
    p.add_argument("--tasks", help="only these task indices or labels (comma-separated)")
    p.add_argument("--budget-s", type=float, default=480.0, help="start no task after this many seconds")
    p.add_argument("--stall-s", type=float, default=120.0, help="kill a worker that makes no progress this long")
    p.add_argument("--max-restarts", type=int, default=8)
    p.add_argument("--repeat", type=int, default=10, help="CPU: time_evaluator repeats (median)")
    p.add_argument("--min-repeat-ms", type=int, default=10, help="CPU: time_evaluator min_repeat_ms")
    p.add_argument("--warmup-ms", type=float, default=10.0, help="GPU: warm-up launches, in ms")
    p.add_argument("--rep-ms", type=float, default=50.0, help="GPU: timed launches, in ms (10 to 200 launches)")
    p.add_argument("--no-flush", action="store_true", help="GPU: do not flush L2 before each timed launch")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="schedule and compile the candidates (needs TVM's compiler; nvcc for cuda)")
    _add_source_args(p)
    p.add_argument("--target", default="cuda", help="cuda (sm_90, default), llvm, or a JSON target dict")
    p.add_argument("--dir", default=str(DEFAULT_DIR), help=f"output folder (default {DEFAULT_DIR.relative_to(ROOT)})")
    m = sub.add_parser("measure", help="check and time the prepared candidates (TVM runtime only; torch on GPU)")
    m.add_argument("--dir", default=str(DEFAULT_DIR))
    m.add_argument("--out", default=os.environ.get("OUT") or "tune-out")
    m.add_argument("--dry-run", action="store_true", help="check the folder without running any kernel (no GPU)")
    m.add_argument("--resume", action="store_true", help="keep --out's raw.jsonl and continue it")
    m.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    _add_measure_args(m)
    r = sub.add_parser("run", help="prepare + measure here, then append the records to --log")
    _add_source_args(r)
    r.add_argument("--target", default="llvm", help="llvm (default); cuda needs a GPU, torch and TVM's compiler here")
    r.add_argument("--log", required=True, help="tuning log to append the records to (JSON lines)")
    r.add_argument("--dir", help="keep the prepared folder here (default: a temporary folder)")
    r.add_argument("--out", help="keep raw.jsonl / summary.md / results.json here (default: temporary)")
    _add_measure_args(r)
    a = ap.parse_args(argv)
    cmd = "python scripts/tune.py " + " ".join(sys.argv[1:] if argv is None else argv)

    if a.cmd == "prepare":
        tasks, source = _tasks_from_args(a)
        prepare(Path(a.dir), tasks, a.target, a.trials, a.seed, a.rules.split(",") if a.rules else None,
                a.kernels_per_lib, cmd, source)
        if "cuda" in str(a.target):
            log(f"next, on the GPU machine (carry .devbundle and {a.dir}): "
                f"source .devbundle/activate && python3 scripts/tune.py measure --dir {a.dir} --out $OUT")
        return 0
    if a.cmd == "measure":
        if a.worker:
            return measure_worker(a)
        if a.dry_run:
            info = dry_run(Path(a.dir))
            print(json.dumps(info))
            ok = not info["problems"] and not info["compiler_modules_loaded"]
            log(f"dry run {'passed' if ok else 'FAILED'}: {info['tasks']} task(s), {info['candidates']} candidate(s)"
                + "".join(f"\n  {p}" for p in info["problems"]))
            return 0 if ok else 1
        return measure_driver(a)
    if a.cmd == "run":
        if "cuda" in str(a.target):
            try:
                import torch

                have_gpu = torch.cuda.is_available()
            except ImportError:
                have_gpu = False
            if not have_gpu:
                raise SystemExit("tune.py run --target cuda measures here and needs a GPU and torch: use `prepare` "
                                 "here and `measure` on the GPU machine (see docs/tuning.md)")
        tasks, source = _tasks_from_args(a)
        with tempfile.TemporaryDirectory(prefix="escort-tune-") as td:
            a.dir = a.dir or str(Path(td) / "prepared")
            a.out = a.out or str(Path(td) / "out")
            a.resume, a.worker = False, False
            prepare(Path(a.dir), tasks, a.target, a.trials, a.seed, a.rules.split(",") if a.rules else None,
                    a.kernels_per_lib, cmd, source)
            rc = measure_driver(a)
            from escort_tvm.tuning_log import TuningLog

            lines = (Path(a.out) / "tune.jsonl").read_text().splitlines()
            n = TuningLog.append(a.log, lines)
            log(f"appended {n} record(s) to {a.log}")
        return rc
    return 2


if __name__ == "__main__":
    sys.exit(main())
