"""Tuning records: which knobs were fastest for a conv shape, written by scripts/tune.py, read by build."""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from .conv_spec import ConvSpec


def spec_key(spec: ConvSpec) -> dict:
    """The spec as it reads back from JSON (tuples become lists), so records compare equal."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(spec).items()}


class TuningLog:
    """JSON lines: {"rule", "spec", "sparsity", "knobs", "time_ms"}; lookup takes the fastest record of the
    same rule and conv shape, at the nearest sparsity."""

    def __init__(self, records: list[dict]):
        self.records = records

    @classmethod
    def load(cls, path) -> "TuningLog":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tuning log {path} does not exist")
        records = []
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                rec["spec"], rec["rule"], rec["knobs"], rec["time_ms"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{i}: not a tuning record ({e})") from None
            records.append(rec)
        return cls(records)

    def lookup(self, spec: ConvSpec, weight, rule: str) -> dict | None:
        key = spec_key(spec)
        cands = [r for r in self.records if r["rule"] == rule and r["spec"] == key]
        if not cands:
            return None
        best = min(cands, key=lambda r: (abs(r.get("sparsity", 0) - weight.sparsity), r["time_ms"]))
        return best["knobs"]

    @staticmethod
    def record(spec: ConvSpec, sparsity: float, rule: str, knobs: dict, time_ms: float) -> str:
        return json.dumps({"rule": rule, "spec": spec_key(spec), "sparsity": round(sparsity, 4), "knobs": knobs,
                           "time_ms": time_ms})
