"""scripts/bench_e2e.py on a tiny llvm configuration: prepare here, measure in a runtime-only process."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, repo_root):
    sys.path.insert(0, str(repo_root / "scripts"))
    import bench_e2e

    out = tmp_path_factory.mktemp("e2e")
    # prepare checks each llvm build (weights passed at run time) against onnxruntime itself, and raises if off
    bench_e2e.prepare(out, ["resnet50"], [2], 32, 0.9, 0, "llvm")
    return bench_e2e, out


def test_prepare_writes_small_libraries_and_manifest(prepared):
    bench_e2e, out = prepared
    d = out / "resnet50_b2"
    man = json.loads((d / "manifest.json").read_text())
    assert man["model"] == "resnet50" and man["target"] == {"kind": "llvm"}
    (case,) = man["cases"]
    ours, dense = case["builds"]["escort-tvm"], case["builds"]["TVM dense"]
    assert [r["key"] for r in ours["runtime_inputs"]] == ["fc.weight"]  # only the classifier is a runtime input
    assert ours["runtime_inputs"][0]["transpose"] and ours["runtime_inputs"][0]["shape"] == [2048, 1000]
    assert len(dense["runtime_inputs"]) == 53 + 1  # every conv weight and the classifier
    assert ours["sparse_convs"] == 52 and dense["sparse_convs"] == 0
    # weights live outside: the dense library is small, ours holds only the sparse convs' arrays
    assert dense["bytes"] < 3e6 and ours["bytes"] < 30e6
    assert len(man["weights"]["sha256"]) == 53 + 53 * 4 + 2
    assert np.load(d / case["reference"]).shape == (2, 1000)


def test_measure_runtime_only(prepared, repo_root, runtime_env, tmp_path):
    bench_e2e, out = prepared
    proc = subprocess.run([sys.executable, str(repo_root / "scripts" / "bench_e2e.py"), "measure", "--dir", str(out),
                           "--out", str(tmp_path), "--no-torch", "--warmup", "1", "--number", "1", "--repeat", "2",
                           "--op-times"],
                          env=runtime_env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "e2e.json").read_text())
    assert res["env"]["runtime_only"] is True
    (row,) = res["rows"]
    assert row["reference"] == "onnxruntime fp32 (prepared)"
    assert row["errors"]["escort-tvm"] < 1e-4 and row["errors"]["TVM dense"] < 1e-4
    assert set(row["median_ms"]) == {"escort-tvm", "TVM dense"} and all(len(v) == 2 for v in row["times_ms"].values())
    # --op-times: every VM call of our build, per symbol (CSR convs of one shape share a function): the 52
    # sparse convs are 52 calls per run
    ops = row["op_ms"]["escort-tvm"]
    sparse = [o for o in ops if o["symbol"].startswith("escort_sparse_conv")]
    assert sum(o["calls"] for o in sparse) == 52 and all(o["ms"] > 0 for o in sparse), ops[:5]
    assert [o["ms"] for o in ops] == sorted((o["ms"] for o in ops), reverse=True)
    md = (tmp_path / "e2e.md").read_text()
    assert "| resnet50 | 2 | 0 / 52 / 1 |" in md  # llvm: CSR on every pruned conv, the stem dense
    merged = tmp_path / "merged.md"
    assert bench_e2e.main(["report", str(tmp_path / "e2e.json"), str(tmp_path / "e2e.json"), "--md", str(merged)]) == 0
    assert merged.read_text().count("| resnet50 | 2 |") == 2


def test_measure_refuses_weights_that_differ(prepared, tmp_path):
    bench_e2e, out = prepared
    import shutil

    d = tmp_path / "resnet50_b2"
    shutil.copytree(out / "resnet50_b2", d)
    man = json.loads((d / "manifest.json").read_text())
    man["weights"]["sha256"]["layer1.0.conv1.weight"] = "0" * 64
    (d / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(RuntimeError, match="regenerated weights differ"):
        bench_e2e.measure_dir(d, 1, 1, 1, use_torch=False)


def test_externalize_keeps_the_function(repo_root, rng):
    """The externalized model (weights as inputs, Linear weights transposed) computes what the zoo model does."""
    sys.path.insert(0, str(repo_root / "scripts"))
    import bench_e2e
    from escort_tvm import zoo
    from _helpers import assert_close, ort_run, randn

    model = zoo.build("alexnet", 1, 64, 0.9, 0)
    ext, rt = bench_e2e.externalize(model, conv_weights=True)
    assert [r["key"] for r in rt] == ["features.0.weight", "features.3.weight", "features.6.weight",
                                      "features.8.weight", "features.10.weight", "classifier.1.weight",
                                      "classifier.4.weight", "classifier.6.weight"]
    w = zoo.weights("alexnet", sparsity=0.9, seed=0)
    x = randn(rng, (1, 3, 64, 64))
    feeds = {"input": x, **{r["name"]: a for r, a in zip(rt, bench_e2e.runtime_arrays(w, rt))}}
    assert_close(ort_run(ext, feeds)[0], ort_run(model, {"input": x})[0], tol=1e-5)  # summation order only
