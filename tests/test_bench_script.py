"""scripts/bench.py: `prepare --quick` builds a consistent folder for the GPU side; the report code runs on records."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "bench.py"


def _bench_module():
    spec = importlib.util.spec_from_file_location("bench_script", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def quick_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench") / "bench"
    p = subprocess.run([sys.executable, str(SCRIPT), "prepare", "--quick", "--bench-dir", str(d)],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return d


def test_prepare_quick_manifest(quick_dir):
    from escort_tvm.cuda_toolchain import carries_gpu_binary

    bench = _bench_module()
    m = json.loads((quick_dir / "manifest.json").read_text())
    assert [(c["layer"], c["batch"], c["sparsity"]) for c in m["cases"]] == [(bench.QUICK_LAYER, 1, 0.9)]
    case = m["cases"][0]
    C, K, H, W, R, s, p = bench.LAYERS[bench.QUICK_LAYER]
    assert case["spec"]["C"] == C and case["spec"]["K"] == K and case["spec"]["KH"] == R
    assert case["nnz"] == round(0.1 * K * C * R * R)
    assert case["floor_ms"] > 0
    v = case["variants"][0]
    assert v["default"] and v["symbol"] and v["knobs"]
    assert len(v["params"]) == len(v["arrays"]) + 3  # first input, weight arrays, bias, y
    assert v["params"][-1][1] == [1, K, H, W]
    assert v["first_input"]["shape"] == v["params"][0][1]
    for f in (m["kernels_so"], m["dense_so"]):
        assert carries_gpu_binary(quick_dir / f), f"{f} has no fatbin"
    import numpy as np

    z = np.load(quick_dir / case["weights"])
    assert int(np.count_nonzero(z[case["dense_key"]])) == case["nnz"]
    assert all(a["key"] in z.files for a in v["arrays"])
    res = (quick_dir / "resources.txt").read_text()
    assert f"{v['symbol']}_kernel" in res
    assert v["resources"] and all("registers" in r for r in v["resources"].values())


def test_prepare_quick_loads_runtime_only(quick_dir):
    """What `measure` does before touching the GPU: load both libraries with the TVM runtime alone."""
    env = dict(os.environ, TVM_USE_RUNTIME_LIB="1")
    p = subprocess.run([sys.executable, str(SCRIPT), "_inspect", "--bench-dir", str(quick_dir), "--allow-stub"],
                       capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    info = json.loads(p.stdout.strip().splitlines()[-1])
    assert info["runtime_only"] and info["dense_is_vm"]
    assert not info["missing_kernels"] and not info["missing_dense"]
    assert not info["tvm_relax_imported"] and not info["compiler_imported"]


def test_reports_from_records(tmp_path):
    """The aggregation and markdown code, on made-up records (no GPU, no torch)."""
    bench = _bench_module()
    spec = {"N": 1, "C": 8, "H": 6, "W": 6, "K": 4, "KH": 3, "KW": 3, "stride": [1, 1], "pad": [1, 1, 1, 1],
            "dilation": [1, 1], "groups": 1}
    var = lambda j: {"index": j, "symbol": f"s{j}", "default": j == 0, "knobs": {"a": j, "b": 2},
                     "first_input": {"padded": True}, "resources": {}}
    manifest = {"cases": [{"index": 0, "layer": "x.conv", "batch": 1, "sparsity": 0.9, "group": "main", "nnz": 29,
                           "actual_sparsity": 0.9, "floor_ms": 0.001, "spec": spec, "variants": [var(0), var(1)]},
                          {"index": 1, "layer": "x.conv", "batch": 1, "sparsity": 0.7, "group": "sweep", "nnz": 86,
                           "actual_sparsity": 0.7, "floor_ms": 0.002, "spec": spec, "variants": [var(0)]}]}
    recs = [{"type": "env", "gpu": "Fake", "capability": "9.0", "l2_bytes": 2**20},
            {"type": "variant", "case": 0, "part": "v0", "variant": 0, "status": "ok", "rel_err": 1e-7, "screen_ms": 0.02},
            {"type": "variant", "case": 0, "part": "v1", "variant": 1, "status": "FAIL", "rel_err": 0.3},
            {"type": "final", "case": 0, "part": "final", "times": {"0": 0.01}},
            {"type": "stream", "case": 0, "part": "stream", "variant": 0, "ms": 0.008, "n_buffers": 3},
            {"type": "pad", "case": 0, "part": "pad", "variant": 0, "ms": 0.002},
            {"type": "baseline", "case": 0, "part": "cudnn_fp32", "name": "cudnn_fp32", "status": "ok", "ms": 0.024},
            {"type": "crash", "case": 0, "part": "tvm_dense", "status": "CRASH", "error": "boom"},
            {"type": "skipped", "case": 1, "part": "done", "reason": "time budget"}]
    (tmp_path / "raw.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    res = bench.write_reports(tmp_path, manifest, "dobench", bench.MEASURE_CMD)
    row = res["rows"][0]
    assert row["best_variant"] == 0 and row["ours_kernel_ms"] == 0.01
    assert row["ours_ms"] == pytest.approx(0.012) and row["speedup"]["cudnn_fp32"] == pytest.approx(2.0)
    assert row["floor_fraction"] == pytest.approx(0.001 / 0.012)
    assert res["summary"]["1"]["speedup_cudnn_fp32"] == pytest.approx(2.0)
    md = (tmp_path / "bench.md").read_text()
    assert "| x.conv | 1 | 0.90 |" in md and "2.00x" in md and "FAIL" in md and "CRASH" in md and "time budget" in md
    assert json.loads((tmp_path / "bench.json").read_text())["rows"][1]["skipped"] == "time budget"
