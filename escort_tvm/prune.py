"""Unstructured magnitude pruning of an ONNX model's Conv weights (reproduces the Escort paper's setting).

Real users bring models pruned in PyTorch; this lets anyone make one from a dense ONNX model. The
numpy core (``magnitude_prune``, ``prune_weights``) imports neither onnx nor TVM, so the model zoo can
regenerate identical pruned weights on a machine that has only numpy.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np


def magnitude_prune(w: np.ndarray, sparsity: float) -> np.ndarray:
    """Zero the smallest-magnitude fraction ``sparsity`` of ``w`` (unstructured)."""
    return _prune_below(w, _threshold([w], sparsity))


def _threshold(weights: list[np.ndarray], sparsity: float) -> float | None:
    """The magnitude at or below which entries are zeroed so that a fraction ``sparsity`` of all is zero."""
    total = sum(w.size for w in weights)
    k = int(round(sparsity * total))
    if k <= 0:
        return None
    mags = np.concatenate([np.abs(w).ravel() for w in weights]) if len(weights) > 1 else np.abs(weights[0]).ravel()
    return float(np.partition(mags, k - 1)[k - 1])


def _prune_below(w: np.ndarray, thr: float | None) -> np.ndarray:
    if thr is None:
        return w.copy()
    return np.where(np.abs(w) > thr, w, 0).astype(w.dtype)


@dataclass
class ConvSite:
    """What pruning needs to know of one conv: its weight's name and how it is grouped."""

    node: str  # the conv node's name (or "conv<i>" when it has none)
    weight: str  # the weight initializer's name
    groups: int = 1


@dataclass
class PruneEntry:
    """One conv's line in the pruning report."""

    node: str
    weight: str
    shape: tuple
    groups: int
    before: float  # sparsity (fraction of exact zeros) before pruning
    after: float
    pruned: bool
    reason: str = ""  # why it was left alone

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class PruneReport:
    sparsity: float
    scope: str
    entries: list = field(default_factory=list)

    def pruned_sparsity(self) -> float:
        """Sparsity over the pruned convs' weights together."""
        size = sum(int(np.prod(e.shape)) for e in self.entries if e.pruned)
        zeros = sum(e.after * int(np.prod(e.shape)) for e in self.entries if e.pruned)
        return zeros / size if size else 0.0

    def text(self) -> str:
        n = sum(e.pruned for e in self.entries)
        lines = [f"pruned {n} of {len(self.entries)} conv weights to {self.sparsity:.3g} ({self.scope} scope); "
                 f"overall sparsity of the pruned convs {self.pruned_sparsity():.4f}"]
        for e in self.entries:
            what = f"{e.before:.4f} -> {e.after:.4f}" if e.pruned else f"{e.before:.4f} kept ({e.reason})"
            lines.append(f"  {e.weight:40.40s} {'x'.join(map(str, e.shape)):16s} g={e.groups:<4d} {what}")
        return "\n".join(lines)

    def as_dict(self) -> dict:
        return {"sparsity": self.sparsity, "scope": self.scope, "entries": [e.as_dict() for e in self.entries]}


def _check_args(sparsity, scope):
    try:
        sparsity = float(sparsity)
    except (TypeError, ValueError):
        raise TypeError(f"sparsity must be a number in [0, 1), got {sparsity!r}") from None
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    if scope not in ("layer", "global"):
        raise ValueError(f"scope must be 'layer' or 'global', got {scope!r}")
    return sparsity


def prune_weights(sites: list[ConvSite], weights: dict[str, np.ndarray], sparsity: float, *, scope: str = "layer",
                  skip_first: bool = True, skip_depthwise: bool = True) -> tuple[dict, PruneReport]:
    """Prune the conv weights named by ``sites`` (in graph order) in ``weights``; returns (new weights, report).

    ``layer`` scope prunes every conv to ``sparsity``; ``global`` picks one magnitude threshold over all
    pruned convs together (layers then end up with different sparsities). The first conv and depthwise
    convs (one input channel per group) are left alone unless asked, as pruning practice does.
    """
    sparsity = _check_args(sparsity, scope)
    if not sites:
        raise ValueError("the model has no Conv to prune")
    out = dict(weights)
    entries, chosen, seen = [], [], set()
    for i, s in enumerate(sites):
        w = weights[s.weight]
        before = 1.0 - np.count_nonzero(w) / w.size
        e = PruneEntry(s.node, s.weight, tuple(int(d) for d in w.shape), s.groups, round(before, 6), round(before, 6),
                       False)
        entries.append(e)
        if skip_first and i == 0:
            e.reason = "first conv (skip_first)"
        elif skip_depthwise and s.groups > 1 and w.ndim == 4 and w.shape[1] == 1:
            e.reason = "depthwise (skip_depthwise)"
        elif s.weight in seen:
            e.reason = "weight shared with an earlier conv"
        elif not np.issubdtype(w.dtype, np.floating):
            e.reason = f"weight dtype {w.dtype} is not floating point"
        else:
            chosen.append(e)
        seen.add(s.weight)
    if not chosen:
        raise ValueError("no conv weight left to prune: " + "; ".join(f"{e.node}: {e.reason}" for e in entries))
    if scope == "global":
        thr = _threshold([weights[e.weight] for e in chosen], sparsity)
        thresholds = {e.weight: thr for e in chosen}
    else:
        thresholds = {e.weight: _threshold([weights[e.weight]], sparsity) for e in chosen}
    for e in chosen:
        w = _prune_below(weights[e.weight], thresholds[e.weight])
        out[e.weight] = w
        e.pruned, e.after = True, round(1.0 - np.count_nonzero(w) / w.size, 6)
    return out, PruneReport(sparsity, scope, entries)


def _conv_sites(model) -> list[ConvSite]:
    """The graph's Conv nodes in order, each with its weight initializer; raises where a weight is not one."""
    inits = {t.name for t in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    sites = []
    for i, n in enumerate(model.graph.node):
        if n.op_type != "Conv" or n.domain not in ("", "ai.onnx"):
            continue
        name = n.name or f"conv{i}"
        if len(n.input) < 2 or n.input[1] not in inits:
            src = producers.get(n.input[1]) if len(n.input) > 1 else None
            how = f"computed by a {src.op_type} node" if src is not None else "a graph input"
            raise ValueError(f"Conv {name!r}: its weight {n.input[1] if len(n.input) > 1 else '?'!r} is not an "
                             f"initializer ({how}); only initializer weights can be pruned")
        groups = next((a.i for a in n.attribute if a.name == "group"), 1)
        sites.append(ConvSite(name, n.input[1], int(groups)))
    return sites


def prune(model_or_path, sparsity: float, *, scope: str = "layer", skip_first: bool = True,
          skip_depthwise: bool = True, output=None):
    """Magnitude-prune an ONNX model's Conv weights; returns (new onnx.ModelProto, PruneReport).

    ``model_or_path``: an onnx.ModelProto or a path. With ``output`` the pruned model is also saved there.
    The input model is not modified.
    """
    import onnx
    from onnx import numpy_helper

    from .frontend import _load_onnx

    sparsity = _check_args(sparsity, scope)
    model = _load_onnx(model_or_path)
    model = onnx.ModelProto.FromString(model.SerializeToString())  # never touch the caller's proto
    sites = _conv_sites(model)
    if not sites:
        raise ValueError("the model has no Conv node: nothing to prune")
    inits = {t.name: t for t in model.graph.initializer}
    weights = {s.weight: numpy_helper.to_array(inits[s.weight]) for s in sites}
    new, report = prune_weights(sites, weights, sparsity, scope=scope, skip_first=skip_first,
                                skip_depthwise=skip_depthwise)
    for e in report.entries:
        if e.pruned:
            inits[e.weight].CopyFrom(numpy_helper.from_array(new[e.weight], e.weight))
    if output is not None:
        output = Path(output)
        output.parent.mkdir(parents=True, exist_ok=True)
        onnx.save(model, str(output))
    return model, report
