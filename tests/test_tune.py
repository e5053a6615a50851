"""scripts/tune.py and escort_tvm.tuning_log: candidates over every rule, the llvm run end to end, the CUDA
prepare path (compiled here with nvcc; the GPU side checked in a runtime-only process without launching
anything), crash recovery of the measuring worker, and build picking tuned knobs and rules from the log."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import escort_tvm
from escort_tvm import ConvSpec, Epilogue, SparseConvWeight
from escort_tvm.models import small_pruned_cnn
from escort_tvm.tuning_log import TuningLog, weight_fingerprint
from schedules import CPUKnobs, CUDAKnobs, SparseConvCPU, SparseConvCUDA
from _helpers import assert_close, onnx_model, ort_reference, pruned, randn

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "tune.py"


def _tune():
    spec = importlib.util.spec_from_file_location("tune_script", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(args, env=None, timeout=600):
    p = subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                       timeout=timeout, cwd=ROOT, env=env)
    return p.returncode, p.stdout + p.stderr


def _records(path: Path) -> list[dict]:
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


# ---------------------------------------------------------------- the tuning log
SPEC = ConvSpec(N=1, C=8, H=7, W=20, K=8, KH=3, KW=3, pad=(1, 1, 1, 1))


def _write_log(path, lines):
    path.write_text("".join(ln + "\n" for ln in lines))
    return path


def test_log_round_trip_best_and_lookup(tmp_path, rng):
    w = SparseConvWeight.from_dense(pruned(rng, SPEC.weight_shape, 0.8))
    other_spec = ConvSpec(N=2, C=8, H=7, W=20, K=8, KH=3, KW=3, pad=(1, 1, 1, 1))
    path = _write_log(tmp_path / "log.jsonl", [
        TuningLog.record(SPEC, 0.8, "cuda.a", {"x": 1}, 2.0, device="gpu0", nnz=w.nnz),
        TuningLog.record(SPEC, 0.8, "cuda.a", {"x": 2}, 1.5),
        TuningLog.record(SPEC, 0.8, "cuda.b", {"y": 7}, 0.9),
        TuningLog.record(SPEC, 0.8, "cpu.c", {"z": 3}, 0.1),  # another target's rule: faster, other device
        TuningLog.record(other_spec, 0.8, "cuda.a", {"x": 9}, 0.01),  # another shape
    ])
    log = TuningLog.load(path)
    assert len(log.records) == 5 and log.records[0]["device"] == "gpu0" and log.records[0]["nnz"] == w.nnz
    assert log.records[0]["spec"]["pad"] == [1, 1, 1, 1]
    assert log.best(SPEC, w, ["cuda.a", "cuda.b"]) == ("cuda.b", {"y": 7}, 0.9)
    assert log.best(SPEC, w, ["cuda.a"]) == ("cuda.a", {"x": 2}, 1.5)
    assert log.best(SPEC, w) == ("cpu.c", {"z": 3}, 0.1)  # no rule filter: any rule
    assert log.lookup(SPEC, w, "cuda.a") == {"x": 2}
    assert log.lookup(SPEC, w, "cuda.none") is None
    assert log.best(ConvSpec(N=3, C=8, H=7, W=20, K=8, KH=3, KW=3), w) is None
    assert log.best(other_spec, w, ["cuda.a"])[1] == {"x": 9}
    # what the build's knob lookup gets: a dict it can turn into Knobs
    assert TuningLog.append(path, [TuningLog.record(SPEC, 0.8, "cuda.a", {"x": 3}, 0.5)]) == 1
    assert TuningLog.load(path).lookup(SPEC, w, "cuda.a") == {"x": 3}


def test_log_exact_weight_beats_nearest_sparsity(tmp_path, rng):
    a = SparseConvWeight.from_dense(pruned(rng, SPEC.weight_shape, 0.8))
    b = SparseConvWeight.from_dense(pruned(rng, SPEC.weight_shape, 0.8))
    assert weight_fingerprint(a) != weight_fingerprint(b)
    assert weight_fingerprint(a) == weight_fingerprint(SparseConvWeight.from_dense(a.to_dense()))
    log = TuningLog([json.loads(x) for x in [
        TuningLog.record(SPEC, 0.8, "r", {"k": "b"}, 0.1, weight=weight_fingerprint(b)),
        TuningLog.record(SPEC, 0.8, "r", {"k": "a"}, 5.0, weight=weight_fingerprint(a)),
        TuningLog.record(SPEC, 0.5, "r", {"k": "far"}, 0.01),
    ]])
    assert log.lookup(SPEC, a, "r") == {"k": "a"}  # timed on this very weight
    assert log.lookup(SPEC, b, "r") == {"k": "b"}
    c = SparseConvWeight.from_dense(pruned(rng, SPEC.weight_shape, 0.8))
    assert log.lookup(SPEC, c, "r") == {"k": "b"}  # no exact record: the fastest at the nearest sparsity
    d = SparseConvWeight.from_dense(pruned(rng, SPEC.weight_shape, 0.45))
    assert log.best(SPEC, d) == ("r", {"k": "far"}, 0.01)


@pytest.mark.parametrize("line, what", [
    ('{"rule": "r", "spec": {}, "knobs": {}}', "time_ms"),
    ('{"rule": "r", "spec": {}, "knobs": [1], "time_ms": 1}', "knobs"),
    ('{"rule": "r", "spec": {}, "knobs": {}, "time_ms": "fast"}', "fast"),
    ("not json", "JSONDecodeError"),
])
def test_log_bad_lines_name_file_and_line(tmp_path, line, what):
    path = tmp_path / "bad.jsonl"
    path.write_text(TuningLog.record(SPEC, 0.8, "r", {}, 1.0) + "\n\n" + line + "\n")
    with pytest.raises(ValueError, match=rf"bad.jsonl:3: .*{what}"):
        TuningLog.load(path)


def test_build_picks_tuned_knob_for_this_weight(tmp_path, rng):
    """A record timed on the model's own weight wins over a faster one from another weight of the same shape."""
    from onnx import helper

    w = pruned(rng, SPEC.weight_shape, 0.8)
    model = onnx_model([helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])],
                       [("x", [1, 8, 7, 20])], [("y", [1, 8, 7, 20])], {"w": w})
    sw = SparseConvWeight.from_dense(w)
    default = SparseConvCPU().default_knobs(SPEC, sw)
    tuned = next(v for v in CPUKnobs.SPACE["vector_width"] if v != default.vector_width)
    log = _write_log(tmp_path / "log.jsonl", [
        TuningLog.record(SPEC, sw.sparsity, "cpu.row_vector", {"vector_width": tuned}, 3.0, weight=weight_fingerprint(sw)),
        TuningLog.record(SPEC, sw.sparsity, "cpu.row_vector", default.as_dict(), 0.5, weight="0" * 16),
    ])
    mod, params = escort_tvm.from_onnx(model)
    built = escort_tvm.build(mod, params, "llvm", tuning_log=log)
    assert built.report[0].kernel == "sparse"
    assert built.report[0].schedule == f"cpu.row_vector {{'vector_width': {tuned}}}", built.report_text()
    x = randn(rng, (1, 8, 7, 20))
    assert_close(built(x), ort_reference(model, {"x": x}))


# ---------------------------------------------------------------- candidates
def _cpu_task(tune, rng, spec=SPEC, sparsity=0.8, relu=True):
    w = pruned(rng, spec.weight_shape, sparsity)
    return tune.make_task("t", ["t"], spec, SparseConvWeight.from_dense(w, spec.groups), randn(rng, (spec.K,)),
                          Epilogue(relu=relu))


def test_knob_candidates_default_first_valid_distinct(rng):
    tune = _tune()
    spec = ConvSpec(N=2, C=16, H=14, W=14, K=32, KH=3, KW=3, pad=(1, 1, 1, 1))
    w = SparseConvWeight.from_dense(pruned(rng, spec.weight_shape, 0.9))
    rule = SparseConvCUDA()
    first = [k for _, k in zip(range(40), tune.knob_candidates(rule, spec, w, seed=5))]
    assert first[0] == rule.default_knobs(spec, w)
    assert len(set(first)) == 40
    for k in first:
        k.validate()
    diff = [sum(a != b for a, b in zip(k.as_dict().values(), first[0].as_dict().values())) for k in first[1:]]
    assert 1 in diff and max(diff) > 1  # one-knob neighbours and random points
    again = [k for _, k in zip(range(40), tune.knob_candidates(rule, spec, w, seed=5))]
    assert again == first
    assert [k for _, k in zip(range(40), tune.knob_candidates(rule, spec, w, seed=6))] != first
    # a small space is exhausted without repeats
    cpu = list(tune.knob_candidates(SparseConvCPU(), spec, w, seed=0))
    assert sorted(k.vector_width for k in cpu) == sorted(CPUKnobs.SPACE["vector_width"])


class _PickyCPU(SparseConvCPU):
    """A second llvm rule (as a new rule in schedules.RULES would be) that refuses wide vectors."""

    name = "cpu.picky"

    def apply(self, spec, weight, epilogue, knobs=None):
        if knobs is not None and knobs.vector_width >= 16:
            raise ValueError(f"vector_width {knobs.vector_width} does not fit this layer")
        return super().apply(spec, weight, epilogue, knobs)

    def default_knobs(self, spec, weight):
        return CPUKnobs(vector_width=16)  # refused too: the default is skipped like any other setting


def test_candidates_cover_every_rule_of_the_target_and_skip_misfits(monkeypatch, rng):
    import tvm

    import schedules

    tune = _tune()
    monkeypatch.setattr(schedules, "RULES", schedules.RULES + (_PickyCPU(),))
    rules = tune.rules_for(tvm.target.Target({"kind": "llvm"}))
    assert [r.name for r in rules] == ["cpu.row_vector", "cpu.picky"]
    task = _cpu_task(tune, rng)
    cands, skipped = tune.make_candidates(task, rules, trials=3, seed=0)
    names = [r.name for r, *_ in cands]
    assert names.count("cpu.row_vector") == 3 and names.count("cpu.picky") == 2  # only 4 and 8 fit
    assert {k.vector_width for r, k, *_ in cands if r.name == "cpu.picky"} == {4, 8}
    assert {(s["rule"], s["knobs"]["vector_width"]) for s in skipped} == {("cpu.picky", 16), ("cpu.picky", 32)}
    assert all("does not fit" in s["reason"] for s in skipped)
    for _, _, plan, layout, sig in cands:
        assert layout["shape"] == sig[0][1] and sig[-1][1] == list(SPEC.output_shape)
    with pytest.raises(SystemExit, match="cpu.nope"):
        tune.rules_for(tvm.target.Target({"kind": "llvm"}), ["cpu.nope"])


def test_layer_tasks_use_bench_weights():
    tune = _tune()
    (t,) = tune.tasks_from_layers(["resnet50.l4.3x3"], [2], 0.9)
    assert t["spec"] == ConvSpec(N=2, C=512, H=7, W=7, K=512, KH=3, KW=3, pad=(1, 1, 1, 1))
    assert abs(t["weight"].sparsity - 0.9) < 1e-6 and t["label"] == "resnet50.l4.3x3 N=2"
    dense, bias = tune.layer_weights("resnet50.l4.3x3", (512, 512, 3, 3), 0.9)
    assert np.array_equal(t["dense"], dense) and np.array_equal(t["bias"], bias)


def test_model_tasks_dedupe_identical_convs(tmp_path, rng):
    """Two convs sharing one weight (and epilogue) are one task; --group-by shape merges same-shape convs too."""
    import onnx
    from onnx import helper

    w1, w2 = pruned(rng, (8, 8, 3, 3), 0.8), pruned(rng, (8, 8, 3, 3), 0.8)
    nodes = []
    x = "x"
    for i, w in enumerate(["w1", "w2", "w1"]):
        nodes += [helper.make_node("Conv", [x, w], [f"c{i}"], pads=[1, 1, 1, 1]),
                  helper.make_node("Relu", [f"c{i}"], [f"r{i}"])]
        x = f"r{i}"
    model = onnx_model(nodes, [("x", [1, 8, 6, 6])], [("r2", [1, 8, 6, 6])], {"w1": w1, "w2": w2})
    onnx.save(model, str(tmp_path / "m.onnx"))
    tune = _tune()
    tasks, dense = tune.tasks_from_model(tmp_path / "m.onnx")
    assert dense == [] and [t["convs"] for t in tasks] == [["#0 w1", "#2 w1"], ["#1 w2"]]
    assert tasks[0]["label"] == "#0 w1 (+1 alike)"
    assert np.array_equal(tasks[1]["dense"], w2) and tasks[0]["epilogue"].relu
    shape_tasks, _ = tune.tasks_from_model(tmp_path / "m.onnx", group_by="shape")
    assert [t["convs"] for t in shape_tasks] == [["#0 w1", "#1 w2", "#2 w1"]]
    few, dense = tune.tasks_from_model(tmp_path / "m.onnx", min_sparsity=0.9)
    assert few == [] and len(dense) == 3 and "below min_sparsity" in dense[0]


@pytest.mark.parametrize("args, msg", [
    (["prepare"], "MODEL.onnx or --layers"),
    (["prepare", "--layers", "vgg16.conv9"], "unknown layer"),
    (["prepare", "--layers", "resnet50.l4.3x3", "--batches", "one"], "--batches"),
    (["measure", "--dir", "/nonexistent/tune"], "prepare"),
    (["run", "/nonexistent/model.onnx", "--log", "x.jsonl"], "does not exist"),
])
def test_cli_errors_are_one_clear_line(args, msg):
    rc, out = _run(args, timeout=120)
    assert rc != 0 and msg in out, out[-2000:]
    assert "Traceback" not in out, out[-2000:]


# ---------------------------------------------------------------- llvm: run end to end
@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    import onnx

    d = tmp_path_factory.mktemp("tune-model")
    model = small_pruned_cnn(batch=1, size=16, seed=3)
    onnx.save(model, str(d / "tiny.onnx"))
    return model, d / "tiny.onnx"


@pytest.fixture(scope="module")
def llvm_run(tiny_model, tmp_path_factory):
    _, path = tiny_model
    d = tmp_path_factory.mktemp("tune-llvm")
    log = d / "tune.jsonl"
    log.write_text(TuningLog.record(SPEC, 0.5, "cpu.row_vector", {"vector_width": 8}, 9.0) + "\n")  # kept: appended
    rc, out = _run(["run", path, "--target", "llvm", "--log", log, "--trials", "3", "--dir", d / "prepared",
                    "--out", d / "out", "--repeat", "3", "--min-repeat-ms", "2"])
    assert rc == 0, out[-4000:]
    return d, log, out


def test_run_llvm_writes_a_checked_log(llvm_run, tiny_model):
    d, log, out = llvm_run
    manifest = json.loads((d / "prepared" / "manifest.json").read_text())
    mod, params = escort_tvm.from_onnx(tiny_model[1])
    sparse = [r for r in escort_tvm.build(mod, params, "llvm").report if r.kernel == "sparse"]
    assert [t["convs"][0].split(" ", 1)[1] for t in manifest["tasks"]] == [r.name for r in sparse]
    assert all(len(t["candidates"]) == 3 and t["candidates"][0]["default"] for t in manifest["tasks"])
    raw = _records(d / "out" / "raw.jsonl")
    cands = [r for r in raw if r["type"] == "cand"]
    assert len(cands) == 3 * len(sparse)
    assert all(r["status"] == "ok" and r["rel_err"] < 1e-4 and r["nonfinite"] == 0 and r["time_ms"] > 0
               for r in cands), [r for r in cands if r["status"] != "ok"]
    recs = _records(log)
    assert recs[0]["time_ms"] == 9.0 and len(recs) == 1 + len(cands)
    by_spec = {json.dumps(t["spec"], sort_keys=True): t for t in manifest["tasks"]}
    for r in recs[1:]:
        t = by_spec[json.dumps(r["spec"], sort_keys=True)]
        assert r["rule"] == "cpu.row_vector" and r["weight"] == t["weight"] and r["target"] == "llvm"
        CPUKnobs.from_dict(r["knobs"])
    summary = (d / "out" / "summary.md").read_text()
    assert "cpu.row_vector best ms" in summary and "winner" in summary
    assert "appended 15 record(s)" in out


def test_build_uses_the_tuned_log(llvm_run, tiny_model, rng):
    d, log, _ = llvm_run
    model, path = tiny_model
    mod, params = escort_tvm.from_onnx(path)
    built = escort_tvm.build(mod, params, "llvm", tuning_log=log)
    tl = TuningLog.load(log)
    sparse = [r for r in built.report if r.kernel == "sparse"]
    assert len(sparse) == 5
    manifest = json.loads((d / "prepared" / "manifest.json").read_text())
    for r, t in zip(sparse, manifest["tasks"]):
        spec = ConvSpec.from_dict(t["spec"])
        z = np.load(d / "prepared" / t["weights"])
        w = SparseConvWeight.from_dense(z["dense"], spec.groups)
        rule, knobs, ms = tl.best(spec, w, ["cpu.row_vector"])
        fastest = min(x["time_ms"] for x in tl.records if x.get("weight") == t["weight"])
        assert ms == fastest
        assert r.schedule == f"{rule} {knobs}", (r.schedule, knobs)
    x = randn(rng, (1, 3, 16, 16))
    assert_close(built(x), ort_reference(model, {"input": x}))


def test_measure_runtime_only_and_crash_recovery(llvm_run, runtime_env):
    """The measuring side in a runtime-only process; a worker that dies mid-task is restarted, the candidate it
    died on is recorded as a CRASH and left out of the log, and every other candidate is still measured."""
    d, _, _ = llvm_run
    out = d / "out-crash"
    env = dict(runtime_env, ESCORT_TUNE_FAULT="1,1")
    rc, text = _run(["measure", "--dir", d / "prepared", "--out", out, "--repeat", "2", "--min-repeat-ms", "1"],
                    env=env)
    assert rc == 0, text[-4000:]
    assert "restarting" in text
    raw = _records(out / "raw.jsonl")
    crash = [r for r in raw if r["type"] == "cand" and r["status"] == "CRASH"]
    assert [(r["task"], r["cand"]) for r in crash] == [(1, 1)]
    ok = [r for r in raw if r["type"] == "cand" and r["status"] == "ok"]
    assert len(ok) == 14
    assert all(r["compiler_modules_loaded"] == [] for r in raw if r["type"] == "worker_end")
    log = _records(out / "tune.jsonl")
    assert len(log) == 14
    crashed = next(r for r in raw if r["type"] == "cand" and r["status"] == "CRASH")
    assert not any(r["task"].startswith("#2 ") and r["knobs"] == crashed["knobs"] for r in log)
    assert "CRASH" in (out / "summary.md").read_text()


# ---------------------------------------------------------------- cuda: prepare here, dry-run the GPU side
@pytest.fixture(scope="module")
def cuda_prepared(tmp_path_factory):
    from onnx import helper

    d = tmp_path_factory.mktemp("tune-cuda")
    rng = np.random.default_rng(11)
    w = pruned(rng, (12, 6, 3, 3), 0.85)
    b = randn(rng, (12,))
    model = onnx_model([helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1], strides=[1, 1]),
                        helper.make_node("Relu", ["c"], ["y"])],
                       [("x", [2, 6, 9, 11])], [("y", [2, 12, 9, 11])], {"w": w, "b": b})
    import onnx

    onnx.save(model, str(d / "layer.onnx"))
    rc, out = _run(["prepare", d / "layer.onnx", "--trials", "3", "--dir", d / "prepared"])
    assert rc == 0, out[-4000:]
    return d / "prepared", w, b


def test_cuda_prepare_manifest_and_libraries(cuda_prepared):
    from escort_tvm.cuda_toolchain import carries_gpu_binary

    d, w, b = cuda_prepared
    tune = _tune()
    m = json.loads((d / "manifest.json").read_text())
    assert m["target_kind"] == "cuda" and m["target"]["arch"] == "sm_90"
    assert "cuda.register_tiled" in m["rules"]
    (t,) = m["tasks"]
    assert t["epilogue"]["relu"] is True and t["spec"]["N"] == 2
    spec = ConvSpec.from_dict(t["spec"])
    by_rule = {}
    for c in t["candidates"]:
        by_rule.setdefault(c["rule"], []).append(c)
    for rule_name, cands in by_rule.items():
        assert len(cands) == 3 and cands[0]["default"] and not any(c["default"] for c in cands[1:])
    syms = [c["symbol"] for c in t["candidates"]]
    assert len(set(syms)) == len(syms)
    for lib in m["libs"]:
        data = (d / lib).read_bytes()
        assert carries_gpu_binary(d / lib) and b"__global__" not in data
    z = np.load(d / t["weights"])
    assert np.array_equal(z["dense"], w) and np.array_equal(z["bias"], b)
    # every candidate: the stored arrays and input layout are what the rule makes for these knobs
    sw = SparseConvWeight.from_dense(w)
    x = randn(np.random.default_rng(0), spec.input_shape)
    rule = SparseConvCUDA()
    for c in by_rule["cuda.register_tiled"]:
        plan = rule.apply(spec, sw, Epilogue(relu=True), CUDAKnobs.from_dict(c["knobs"]))
        assert all(np.array_equal(np.asarray(a), z[k["key"]]) for a, k in zip(plan.weight_arrays, c["arrays"]))
        assert np.array_equal(plan.prepare_input(x), tune.first_input.to_numpy(x, c["first_input"]))
        names = [p[0] for p in c["params"]]
        assert len(names) == len(c["arrays"]) + 3 and c["params"][-1][1] == [2, 12, 9, 11]


def test_cuda_measure_dry_run_runtime_only(cuda_prepared, runtime_env, tmp_path):
    d, _, _ = cuda_prepared
    rc, out = _run(["measure", "--dir", d, "--dry-run"], env=runtime_env, timeout=300)
    assert rc == 0, out[-3000:]
    info = json.loads(next(ln for ln in out.splitlines() if ln.startswith("{")))
    assert info["runtime_only"] and info["problems"] == [] and info["compiler_modules_loaded"] == []
    assert info["candidates"] >= 3 and info["libs"] >= 1
    # a library missing a symbol is caught
    m = json.loads((d / "manifest.json").read_text())
    bad = tmp_path / "bad"
    import shutil

    shutil.copytree(d, bad)
    m["tasks"][0]["candidates"][0]["symbol"] = "escort_tune_no_such_kernel"
    (bad / "manifest.json").write_text(json.dumps(m))
    rc, out = _run(["measure", "--dir", bad, "--dry-run"], env=runtime_env, timeout=300)
    assert rc == 1 and "lacks escort_tune_no_such_kernel" in out, out[-3000:]


@pytest.mark.gpu
def test_cuda_measure_on_gpu(cuda_prepared, tmp_path):
    """On a GPU machine with torch: every candidate passes the check and gets a time."""
    pytest.importorskip("torch")
    d, _, _ = cuda_prepared
    rc, out = _run(["measure", "--dir", d, "--out", tmp_path / "out"])
    assert rc == 0, out[-4000:]
    raw = _records(tmp_path / "out" / "raw.jsonl")
    assert all(r["status"] == "ok" for r in raw if r["type"] == "cand")
    assert len(_records(tmp_path / "out" / "tune.jsonl")) == sum(1 for r in raw if r["type"] == "cand")
