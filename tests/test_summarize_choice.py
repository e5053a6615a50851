"""scripts/summarize_choice.py: the build's choice per layer, from measured bench rows."""
from __future__ import annotations

import json
from types import SimpleNamespace
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _row(layer, n, nnz, hw, spec_ms, csr_default_ms, csr_best_ms, pad_ms):
    spec = {"N": n, "C": 64, "H": hw, "W": hw, "K": 64, "KH": 3, "KW": 3, "stride": [1, 1], "pad": [1, 1, 1, 1],
            "dilation": [1, 1], "groups": 1}
    return {"layer": layer, "batch": n, "sparsity": 0.9, "nnz": nnz, "spec": spec, "floor_ms": 0.001,
            "pad_ms": pad_ms, "csr_ms": csr_best_ms + pad_ms, "spec_ms": spec_ms,
            "variants": [{"default": True, "ms": csr_default_ms}, {"default": False, "ms": csr_best_ms}],
            "specialized": {"variants": [{"default": True, "ms": spec_ms}]},
            "baselines": {"cudnn_fp32": {"ms": 0.1}, "cudnn_tf32": 0.05}}


def test_choice_follows_the_cost_rule_with_default_knobs(tmp_path):
    rows = [_row("small", 1, 1000, 8, 0.010, 0.030, 0.020, 0.005),  # <= 32768 nonzeros: specialised
            _row("big_small_image", 1, 60000, 14, 0.010, 0.030, 0.020, 0.005),  # CSR default + pad
            _row("big_large_image", 1, 60000, 56, 0.010, 0.030, 0.020, 0.005)]  # specialised
    f = tmp_path / "bench.json"
    f.write_text(json.dumps({"rows": rows}))
    p = subprocess.run([sys.executable, str(ROOT / "scripts" / "summarize_choice.py"), str(f)],
                       capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 0, p.stderr
    lines = {ln.split("|")[1].strip(): ln for ln in p.stdout.splitlines() if ln.startswith("| ")}
    # the rows carry no knobs, so each falls back to the run's default variant and says so
    assert "| specialised (run's default knobs) | 0.0100 |" in lines["small"]
    assert "| CSR + pad (run's default knobs) | 0.0350 | 0.0100 |" in lines["big_small_image"]  # 0.030 + pad
    assert "| specialised (run's default knobs) | 0.0100 |" in lines["big_large_image"]
    assert "geomean" in p.stdout


def test_choice_takes_the_variant_with_todays_default_knobs(tmp_path):
    from escort_tvm import ConvSpec
    from schedules.cuda import SparseConvCUDA

    row = _row("big_small_image", 1, 60000, 14, 0.010, 0.030, 0.020, 0.005)
    spec = ConvSpec.from_dict(row["spec"])
    weight = SimpleNamespace(nnz=row["nnz"])  # default knobs read nnz only
    row["variants"][1]["knobs"] = SparseConvCUDA().default_knobs(spec, weight).as_dict()  # the 0.020 one
    f = tmp_path / "bench.json"
    f.write_text(json.dumps({"rows": [row]}))
    p = subprocess.run([sys.executable, str(ROOT / "scripts" / "summarize_choice.py"), str(f)],
                       capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 0, p.stderr
    assert "| CSR + pad | 0.0250 |" in p.stdout  # 0.020 + pad, not the run's default 0.030
