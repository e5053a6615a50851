"""scripts/bench.py: `prepare --quick` builds a consistent folder for the GPU side; the report code runs on records."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
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
    # the specialised kernel: its own .so.xz, (x, bias, y), compile cost, code size, resources, no index arrays
    sp = case["specialized"]
    assert sp["reason"] is None and [s["name"] for s in sp["variants"]] == ["default"], sp
    s0 = sp["variants"][0]
    assert s0["default"] and s0["rule"] == "cuda.specialized" and (quick_dir / s0["so"]).exists()
    assert [p[1] for p in s0["params"]] == [[1, C, H, W], [K], [1, K, H, W]] and s0["arrays"] == []
    assert s0["compile"]["compile_s"] > 0 and s0["compile"]["nvcc_s"] > 0
    assert 0 < s0["code"]["text_bytes"] <= s0["code"]["cubin_bytes"] and s0["code"]["xz_bytes"] > 0
    assert all("registers" in r for r in s0["resources"].values()) and s0["resources"]
    assert len(s0["device_params"]) == 3 and all(p.startswith("float*") for p in s0["device_params"])
    assert s0["ptx_global_loads"] and all(op.endswith(".f32") for op in s0["ptx_global_loads"])
    assert f"{s0['symbol']}_kernel" in res and m["specialized"]["kernels"] == 1


def test_prepare_quick_loads_runtime_only(quick_dir):
    """What `measure` does before touching the GPU: load both libraries with the TVM runtime alone."""
    env = dict(os.environ, TVM_USE_RUNTIME_LIB="1")
    p = subprocess.run([sys.executable, str(SCRIPT), "_inspect", "--bench-dir", str(quick_dir), "--allow-stub"],
                       capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    info = json.loads(p.stdout.strip().splitlines()[-1])
    assert info["runtime_only"] and info["dense_is_vm"] and info["spec_kernels"] == 1
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


def _spec_manifest():
    spec = {"N": 32, "C": 8, "H": 6, "W": 6, "K": 4, "KH": 3, "KW": 3, "stride": [1, 1], "pad": [1, 1, 1, 1],
            "dilation": [1, 1], "groups": 1}
    csr = lambda j: {"index": j, "symbol": f"c{j}", "default": j == 0, "knobs": {"a": j}, "first_input": {"padded": True},
                     "resources": {}}
    spv = lambda j, name: {"index": j, "symbol": f"s{j}", "name": name, "default": j == 0, "so": f"spec_s{j}.so.xz",
                           "knobs": {"channels_per_thread": 8 >> j}, "first_input": {"padded": False}, "arrays": [],
                           "resources": {"s_kernel": {"registers": 40, "spill_stores": 0, "spill_loads": 0, "smem": 0}},
                           "compile": {"schedule_s": 0.1, "lower_s": 1.0, "nvcc_s": 2.0, "compile_s": 3.1 + j},
                           "code": {"text_bytes": 4096, "cubin_bytes": 8192, "xz_bytes": 2048},
                           "program": {"fmas_per_load": 2.5}}

    def case(i, layer, nnz, sp_variants, reason=None):
        return {"index": i, "layer": layer, "batch": 32, "sparsity": 0.9, "group": "main", "nnz": nnz,
                "actual_sparsity": 0.9, "floor_ms": 0.001, "spec": spec, "variants": [csr(0)],
                "specialized": {"rule": "cuda.specialized", "max_nnz": 100, "variants": sp_variants, "skipped": [],
                                "reason": reason}}

    return {"cases": [case(0, "a.conv", 29, [spv(0, "default"), spv(1, "cpt_half")]),
                      case(1, "b.conv", 29, [spv(0, "default")]),
                      case(2, "c.conv", 290, [], reason="290 nonzeros > 100 (--spec-max-nnz)")]}


def _spec_records(case, csr_ms, spec, baselines):
    recs = [{"type": "variant", "case": case, "part": "v0", "variant": 0, "status": "ok", "rel_err": 1e-7, "ms": csr_ms},
            {"type": "pad", "case": case, "part": "pad", "variant": 0, "ms": 0.0}]
    for j, (status, ms) in enumerate(spec):
        recs.append({"type": "variant", "family": "spec", "case": case, "part": f"s{j}", "variant": j, "status": status,
                     "rel_err": 1e-7 if status == "ok" else 0.5, ("screen_ms" if len(spec) > 1 else "ms"): ms})
    if len(spec) > 1:
        recs.append({"type": "final", "family": "spec", "case": case, "part": "sfinal",
                     "times": {str(j): ms for j, (st, ms) in enumerate(spec) if st == "ok"}})
    for b, ms in baselines.items():
        recs.append({"type": "baseline", "case": case, "part": b, "name": b, "status": "ok", "ms": ms})
    return recs


def test_reports_best_of_ours_and_targets(tmp_path):
    """Best of CSR and specialised per layer, geomeans over all layers and over those with both, issue-3 targets."""
    bench = _bench_module()
    manifest = _spec_manifest()
    base = {"cudnn_fp32": 0.4, "cudnn_tf32": 0.1, "im2col_cublas": 0.8, "im2col_cusparse": 0.9}
    recs = ([{"type": "env", "gpu": "Fake", "capability": "9.0", "l2_bytes": 2**20}]
            + _spec_records(0, 0.2, [("ok", 0.05), ("FAIL", None)], base)  # specialised wins 4x (v1 fails)
            + _spec_records(1, 0.1, [("ok", 0.2)], base)  # CSR wins 2x
            + _spec_records(2, 0.1, [], base))  # no specialised kernel
    (tmp_path / "raw.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    res = bench.write_reports(tmp_path, manifest, "dobench", bench.MEASURE_CMD)
    r0, r1, r2 = res["rows"]
    assert (r0["best_kernel"], r0["best_ms"], r0["specialized"]["best_name"]) == ("spec", 0.05, "default")
    assert r0["specialized"]["variants"][1]["status"] == "FAIL" and r0["csr_over_spec"] == pytest.approx(4.0)
    assert (r1["best_kernel"], r1["best_ms"]) == ("csr", 0.1)
    assert (r2["best_kernel"], r2["specialized"], r2["both"]) == ("csr", None, False)
    assert r0["speedup_best"]["cudnn_fp32"] == pytest.approx(8.0) and r0["speedup"]["cudnn_fp32"] == pytest.approx(2.0)
    g = res["summary"]["32"]["best"]
    assert g["all"]["cases"] == 3 and g["both"]["cases"] == 2 and g["all"]["spec_wins"] == 1
    assert g["both"]["best_ms"] == pytest.approx((0.05 * 0.1) ** 0.5)
    assert g["all"]["best_ms"] == pytest.approx((0.05 * 0.1 * 0.1) ** (1 / 3))
    t = {x["baseline"]: x for x in g["all"]["targets"]}
    assert set(t) == {"cudnn_fp32", "cudnn_tf32", "im2col_cublas", "im2col_cusparse"}
    assert t["cudnn_fp32"]["value"] == pytest.approx((8.0 * 4.0 * 4.0) ** (1 / 3)) and t["cudnn_fp32"]["met"]
    assert t["im2col_cublas"]["value"] == pytest.approx(8.0) and t["im2col_cublas"]["met"]  # lowest layer: 0.8/0.1
    assert t["cudnn_tf32"]["value"] == pytest.approx((2.0 * 1.0 * 1.0) ** (1 / 3)) and t["cudnn_tf32"]["met"]
    md = (tmp_path / "bench.md").read_text()
    assert "specialized 4.00x" in md and "CSR 2.00x" in md and "290 nonzeros > 100" in md
    assert "cpt_half" in md and "FAIL" in md and "**met**" in md
    # `report` rebuilds the same from raw.jsonl and the prepared folder's manifest (no GPU)
    bdir = tmp_path / "prepared"
    bdir.mkdir()
    (bdir / "manifest.json").write_text(json.dumps(manifest))
    (tmp_path / "bench.md").unlink()
    assert bench.main(["report", "--bench-dir", str(bdir), "--out", str(tmp_path)]) == 0
    assert "specialized 4.00x" in (tmp_path / "bench.md").read_text()
    # a second run (another batch, as from a second prepared folder) merges into one report
    other = tmp_path / "b1"
    other.mkdir()
    m1 = json.loads(json.dumps(manifest))
    for c in m1["cases"]:
        c["batch"] = 1
    (other / "raw.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    bench.write_reports(other, m1, "dobench", bench.MEASURE_CMD)
    merged = bench.merge_reports([tmp_path / "bench.json", other / "bench.json"], tmp_path / "merged", plot=False)
    assert sorted(merged["summary"]) == ["1", "32"] and len(merged["rows"]) == 6
    assert [x["baseline"] for x in merged["summary"]["1"]["best"]["all"]["targets"]] == ["cudnn_fp32", "cudnn_tf32"]
    with pytest.raises(ValueError, match="more than one input"):
        bench.merge_reports([tmp_path / "bench.json", tmp_path / "bench.json"], tmp_path / "m2", plot=False)


def test_specialized_variants_are_one_knob_changes():
    bench = _bench_module()
    from schedules import SpecializedKnobs

    d = SpecializedKnobs(channels_per_thread=64, threads_x=32, threads_y=4, stage_input=True, channel_chunk=8)
    vs = bench.specialized_variants(d, "default,cpt_x2,cpt_half,stage_flip,chunk_half")
    assert [v["name"] for v in vs] == ["default", "cpt_x2", "cpt_half", "stage_flip", "chunk_half"]
    assert vs[0]["knobs"] == d and vs[1]["knobs"] is None and "outside" in vs[1]["reason"]  # 128 is not in SPACE
    assert vs[2]["knobs"] == d.with_(channels_per_thread=32) and vs[3]["knobs"] == d.with_(stage_input=False)
    # knob=value steps set a knob outright, after or instead of named changes
    vs = bench.specialized_variants(d, "default,block_split=4+image_tile=True,cpt_half+block_split=2")
    assert vs[1]["knobs"] == d.with_(block_split=4, image_tile=True)
    assert vs[2]["knobs"] == d.with_(channels_per_thread=32, block_split=2)
    with pytest.raises(ValueError, match="not knob=value"):
        bench.specialized_variants(d, "default,block_split=3")
    with pytest.raises(ValueError, match="unknown"):
        bench.specialized_variants(d, "default,bogus")
    with pytest.raises(ValueError, match="start with 'default'"):
        bench.specialized_variants(d, "stage_flip")


def test_csr_variants_listed_by_knob_changes():
    bench = _bench_module()
    from escort_tvm.conv_spec import ConvSpec
    from escort_tvm.sparse_format import SparseConvWeight
    from schedules import SparseConvCUDA

    rng = np.random.default_rng(0)
    spec = ConvSpec(N=32, C=16, H=13, W=13, K=32, KH=3, KW=3, pad=(1, 1, 1, 1))  # defaults: no split, no unroll
    w = rng.standard_normal(spec.weight_shape).astype(np.float32) * (rng.random(spec.weight_shape) < 0.1)
    weight = SparseConvWeight.from_dense(w)
    rule = SparseConvCUDA()
    d = rule.default_knobs(spec, weight)
    how = "default,nonzero_split=2,nonzero_split=2+unroll=8,unroll=16,nonzero_split=2,threads_y=16+nonzero_split=8"
    vs = bench.knob_variants(rule, spec, weight, how, seed=0)
    # the repeat and the 16 x 16 x 8 = 2048-thread block are left out
    assert vs == [d, d.with_(nonzero_split=2), d.with_(nonzero_split=2, unroll=8), d.with_(unroll=16)]
    with pytest.raises(ValueError, match="not knob=value"):
        bench.knob_variants(rule, spec, weight, "default,bogus=2", seed=0)
    with pytest.raises(ValueError, match="not one of"):
        bench.knob_variants(rule, spec, weight, "default,unroll=3", seed=0)


def test_elf_section_sizes_reads_a_cubin(tmp_path):
    """The code-size figure: the kernel's .text section of a cubin nvcc makes here."""
    bench = _bench_module()
    cu = tmp_path / "k.cu"
    cu.write_text('extern "C" __global__ void k_kernel(float* a) { a[threadIdx.x] = a[threadIdx.x] * 1.5f + 2.0f; }\n')
    p = subprocess.run(["nvcc", "--cubin", "-arch=sm_90", "-o", str(tmp_path / "k.cubin"), str(cu)],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    secs = bench.elf_section_sizes((tmp_path / "k.cubin").read_bytes())
    assert 0 < secs[".text.k_kernel"] < (tmp_path / "k.cubin").stat().st_size
    assert secs[".text.k_kernel"] % 16 == 0  # sm_90 instructions are 16 bytes


def test_specialized_build_timeout_is_recorded_and_cached(tmp_path):
    """A build past --spec-timeout is killed and reported (and not retried under the same limit)."""
    bench = _bench_module()
    spec = {"N": 1, "C": 4, "H": 6, "W": 6, "K": 4, "KH": 3, "KW": 3, "stride": [1, 1], "pad": [1, 1, 1, 1],
            "dilation": [1, 1], "groups": 1}
    import numpy as np

    np.savez(tmp_path / "w.npz", dense=np.ones((4, 4, 3, 3), np.float32))
    job = {"key": "k0", "label": "tiny", "nnz": 144, "dest": str(tmp_path / "x.so.xz"),
           "build": {"spec": spec, "weights": str(tmp_path / "w.npz"), "knobs": {}, "symbol": "s0",
                     "epilogue": {"relu": False, "residual": False}, "target": bench.TARGET}}
    (res,) = bench.build_specialized_all([job], tmp_path / "cache", 1, timeout_s=0.5)  # TVM's import alone is longer
    assert res["status"] == "timeout" and "killed" in res["reason"], res
    assert json.loads((tmp_path / "cache" / "k0.json").read_text())["timeout_s"] == 0.5
    (again,) = bench.build_specialized_all([job], tmp_path / "cache", 1, timeout_s=0.5)
    assert again["status"] == "timeout" and again["cached"]
    assert not (tmp_path / "x.so.xz").exists()
