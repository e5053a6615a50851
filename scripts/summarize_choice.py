"""Per-layer table of what ``escort_tvm.build(kernel="auto")`` picks, from ``bench.py measure`` results.

The bench reports the best of our kernels and knob variants; a user gets the cost rule's kernel with its
default knobs. This reads one or more measured ``bench.json`` files, applies the specialised rule's cost rule (``SpecializedCUDA.pays``) to each 90% layer, and prints the
build's choice next to the best measured and the baselines: the measured variant whose knobs are the
rules' current defaults, from the last file that has one (with that run's baselines; marked where no run
has it, and the last run's default is shown instead), CSR time including its pad op.

    python scripts/summarize_choice.py docs/bench/final_b1/bench.json docs/bench/final_b1c/bench.json
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _ms(b):
    return b["ms"] if isinstance(b, dict) else b


def _timed(v):
    """A variant's median ms (a variant the screening pass dropped as slower keeps its screening time)."""
    return v.get("ms") or v.get("screen_ms")


def _current_default(variants, knobs):
    """The measured variant with today's default knobs (the rules' defaults may have changed since the run),
    else the run's default; (variant or None, whether the knobs matched)."""
    for v in variants or []:  # (a knob added since the run counts at its default value)
        if knobs is not None and v.get("knobs") and type(knobs)(**v["knobs"]) == knobs:
            return v, True
    return next((v for v in variants or [] if v.get("default")), None), False


def geomean(xs):
    xs = [x for x in xs if x]
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else None


def main() -> int:
    from escort_tvm.conv_spec import ConvSpec
    from schedules import SpecializedCUDA
    from schedules.cuda import SparseConvCUDA

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bench_json", nargs="+")
    a = ap.parse_args()
    runs = {}  # (layer, batch) -> its rows, in the order of the files given
    for f in a.bench_json:
        for r in json.loads(Path(f).read_text())["rows"]:
            if abs(r["sparsity"] - 0.9) < 1e-9:
                runs.setdefault((r["layer"], r["batch"]), []).append(r)
    cols = {"choice": [], "best": [], "fp32": [], "tf32": [], "floor": []}
    print("| layer | batch | nnz | build's choice | ms | best measured | cuDNN fp32 | cuDNN TF32 | x fp32 | x TF32 "
          "| floor/ours |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for (layer, n), rs in runs.items():
        spec = ConvSpec.from_dict(rs[-1]["spec"])

        weight = SimpleNamespace(nnz=rs[-1]["nnz"])  # the cost rules (and most default knobs) read nnz only
        specialised = SpecializedCUDA().pays(spec, weight) is None
        try:
            knobs = (SpecializedCUDA() if specialised else SparseConvCUDA()).default_knobs(spec, weight)
        except AttributeError:  # a rule that reads the weight's rows (batch >= 16 cuts): the run's default stands
            knobs = None

        def chosen(r):
            """(ms, knobs matched, pad op ms) of the cost rule's kernel in run row ``r`` (CSR: ms includes the pad
            op its input layout needs; runs before per-variant pads give the row's), ms None where not built."""
            if specialised:
                v, now = _current_default((r.get("specialized") or {}).get("variants"), knobs)
                return (_timed(v) if v else None), now, 0.0
            v, now = _current_default(r.get("variants"), knobs)
            ms = _timed(v) if v else None
            pad = (v.get("pad_ms", r.get("pad_ms")) if v else None) or 0.0
            return (ms + pad if ms else None), now, pad

        # the last run that measured today's default knobs (its own baselines), else the last run
        picks = [(r, *chosen(r)) for r in rs]
        r, ms, now, pad = next((p for p in reversed(picks) if p[1] and p[2]), picks[-1])
        kind = ("specialised" if specialised else "CSR + pad" if pad else "CSR") + ("" if now else " (run's default knobs)")
        best = min(x for x in (r.get("spec_ms"), r.get("csr_ms")) if x)
        fp32, tf32 = _ms(r["baselines"]["cudnn_fp32"]), _ms(r["baselines"]["cudnn_tf32"])
        for k, v in (("choice", ms), ("best", best), ("fp32", fp32), ("tf32", tf32), ("floor", r["floor_ms"])):
            cols[k].append(v)
        print(f"| {layer} | {n} | {r['nnz']} | {kind} | {ms:.4f} | {best:.4f} | {fp32:.4f} | {tf32:.4f} | "
              f"{fp32 / ms:.2f}x | {tf32 / ms:.2f}x | {r['floor_ms'] / ms:.2f} |")
    g = {k: geomean(v) for k, v in cols.items()}
    print(f"| **geomean** ({len(runs)} layers) | | | | {g['choice']:.4f} | {g['best']:.4f} | {g['fp32']:.4f} | "
          f"{g['tf32']:.4f} | {g['fp32'] / g['choice']:.2f}x | {g['tf32'] / g['choice']:.2f}x | "
          f"{g['floor'] / g['choice']:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
