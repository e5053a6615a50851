"""Tuning records: how fast each rule and knob setting ran a conv, written by scripts/tune.py, read by build.

A log is JSON lines, one measured candidate per line::

    {"rule": "cuda.register_tiled", "spec": {...ConvSpec...}, "sparsity": 0.9, "knobs": {...},
     "time_ms": 0.0123, "weight": "3f2a...", ...}

``rule``, ``spec``, ``knobs`` and ``time_ms`` are required; ``sparsity`` and ``weight`` (a fingerprint of
the exact sparse weight, see ``weight_fingerprint``) say which weight was timed; anything else (``nnz``,
``epilogue``, ``target``, ``device``, ``date``) is kept for people and ignored here.

Matching a conv: records of the same ConvSpec; among them the ones timed on this very weight if there
are any, else the ones at the sparsity nearest to the weight's. ``lookup`` then gives the fastest knobs
of one rule, ``best`` the fastest (rule, knobs) over several rules, so a build can choose the rule too.
Only pass ``best`` rules of one target: times are comparable only when measured on the same device.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, is_dataclass
from pathlib import Path

import numpy as np

from .conv_spec import ConvSpec

REQUIRED = ("rule", "spec", "knobs", "time_ms")


def spec_key(spec) -> dict:
    """The spec (a ConvSpec or its dict) as it reads back from JSON (tuples become lists), so records compare equal."""
    d = asdict(spec) if is_dataclass(spec) else dict(spec)
    return {k: list(v) if isinstance(v, (tuple, list)) else v for k, v in d.items()}


def weight_fingerprint(weight) -> str:
    """A short hash of a SparseConvWeight's exact content (shape, groups, positions and values)."""
    h = hashlib.sha1()
    h.update(json.dumps([list(map(int, weight.shape)), int(weight.groups)]).encode())
    for name in ("row_ptr", "channel", "kh", "kw", "values"):
        a = np.ascontiguousarray(getattr(weight, name))
        h.update(str(a.dtype).encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


class TuningLog:
    """The records of one or more tuning runs; ``lookup``/``best`` answer for one conv."""

    def __init__(self, records: list[dict]):
        self.records = records
        self._fp_cache: dict[int, tuple[object, str]] = {}

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
                missing = [k for k in REQUIRED if k not in rec]
                if missing:
                    raise KeyError(", ".join(missing))
                if not isinstance(rec["knobs"], dict) or not isinstance(rec["spec"], dict):
                    raise TypeError("spec and knobs must be JSON objects")
                float(rec["time_ms"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                raise ValueError(f"{path}:{i}: not a tuning record ({type(e).__name__}: {e})") from None
            records.append(rec)
        return cls(records)

    # ------------------------------------------------------------------ queries
    def _fingerprint(self, weight) -> str | None:
        if weight is None or not hasattr(weight, "row_ptr"):
            return None
        hit = self._fp_cache.get(id(weight))
        if hit is not None and hit[0] is weight:
            return hit[1]
        fp = weight_fingerprint(weight)
        self._fp_cache[id(weight)] = (weight, fp)
        return fp

    def matching(self, spec: ConvSpec, weight, rules=None) -> list[dict]:
        """The records that speak for this conv: same spec (and rule, if ``rules`` is given), timed on this
        exact weight if any were, else at the nearest recorded sparsity."""
        key = spec_key(spec)
        rules = None if rules is None else {rules} if isinstance(rules, str) else set(rules)
        cands = [r for r in self.records if r["spec"] == key and (rules is None or r["rule"] in rules)]
        if not cands:
            return []
        fp = self._fingerprint(weight)
        same = [r for r in cands if fp is not None and r.get("weight") == fp]
        if same:
            return same
        sparsity = getattr(weight, "sparsity", None)
        if sparsity is None:
            return cands
        dist = [abs(float(r.get("sparsity", 0.0)) - sparsity) for r in cands]
        near = min(dist)
        return [r for r, d in zip(cands, dist) if d <= near + 1e-9]

    def lookup(self, spec: ConvSpec, weight, rule: str) -> dict | None:
        """Knob values of the fastest matching record of ``rule`` (None if the log has none)."""
        best = self.best(spec, weight, [rule])
        return best[1] if best else None

    def best(self, spec: ConvSpec, weight, rules=None) -> tuple[str, dict, float] | None:
        """(rule name, knob values, time_ms) of the fastest matching record over ``rules`` (names; None: any).

        Give the names of one target's rules (e.g. ``[r.name for r in schedules.RULES if r.is_target(t)]``):
        a log may hold CPU and GPU records of the same conv, and their times do not compare."""
        cands = self.matching(spec, weight, rules)
        if not cands:
            return None
        r = min(cands, key=lambda r: float(r["time_ms"]))
        return r["rule"], dict(r["knobs"]), float(r["time_ms"])

    # ------------------------------------------------------------------ writing
    @staticmethod
    def record(spec, sparsity: float, rule: str, knobs: dict, time_ms: float, **extra) -> str:
        """One JSON line; ``extra`` fields (``weight``, ``nnz``, ``device``, ...) are stored as given."""
        rec = {"rule": rule, "spec": spec_key(spec), "sparsity": round(float(sparsity), 4), "knobs": dict(knobs),
               "time_ms": float(time_ms)}
        for k, v in extra.items():
            if k in rec:
                raise ValueError(f"extra field {k!r} would overwrite a required one")
            rec[k] = v
        return json.dumps(rec)

    @staticmethod
    def append(path, lines) -> int:
        """Append record lines (strings from ``record``) to the log at ``path``; returns how many."""
        lines = [ln for ln in lines if ln.strip()]
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            for ln in lines:
                f.write(ln.rstrip("\n") + "\n")
        return len(lines)
