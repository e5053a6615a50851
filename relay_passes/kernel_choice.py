"""Which sparse kernel a conv gets: the CSR kernel ("sparse") or one specialised to its weights.

Order of authority: a kernel the user forces (``build(..., kernel=...)``), then the fastest record of a
tuning log for this conv, then the cost rules: the specialised kernel where its rule's ``pays`` and
``apply`` accept the layer, while the build's compile-time budget lasts; the CSR kernel otherwise,
where its ``pays`` does; else the conv stays dense. Each rule's ``pays`` states what the measurements
in ``docs/benchmarks.md`` and ``docs/notes/`` support. Every fallback is said in the conv's report.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from escort_tvm.conv_spec import ConvSpec
from escort_tvm.sparse_format import SparseConvWeight

KERNELS = ("auto", "sparse", "specialized", "dense")
# Nonzeros per build that may go to specialised kernels: each costs ~0.3-0.7 ms of compile time on the
# 2-core build machine (ptxas; two kernels built at a time). 2^22 takes all of a 90%-pruned ResNet-50
# (2.35M): 788-1326 s to build at batch 32, 4.91 ms on the H200 against 6.40 ms for the old 2^20, which left
# layer4 on the CSR kernel (PyTorch TF32: 5.29 ms; docs/bench/e2e5, docs/notes/specialized-codegen.md v10).
DEFAULT_SPECIALIZED_BUDGET = 1 << 22
@dataclass
class Choice:
    rule: object | None  # None: stay dense
    knobs: object | None = None  # the rule's Knobs; None: its defaults
    notes: list = field(default_factory=list)


class KernelChooser:
    """Stateful over one build: it spends the specialised-kernel budget in graph order."""

    def __init__(self, rules, kernel: str = "auto", tuning_log=None, knob_lookup=None,
                 specialized_budget: int = DEFAULT_SPECIALIZED_BUDGET):
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
        self.rules = {r.kernel: r for r in rules}
        self.rules_by_name = {r.name: r for r in rules}
        if "sparse" not in self.rules:
            raise ValueError("the target has no CSR ('sparse') rule")
        self.kernel = kernel
        self.log = tuning_log
        self.knob_lookup = knob_lookup or (tuning_log.lookup if tuning_log is not None else None)
        if isinstance(specialized_budget, bool) or not isinstance(specialized_budget, int) or specialized_budget < 0:
            raise ValueError(f"specialized_budget must be a non-negative integer, got {specialized_budget!r}")
        self.budget = specialized_budget

    def _knobs(self, rule, spec, weight):
        tuned = self.knob_lookup(spec, weight, rule.name) if self.knob_lookup else None
        return rule.Knobs.from_dict(tuned) if tuned else None

    def _try(self, kind: str, spec: ConvSpec, weight: SparseConvWeight, epilogue, knobs=None):
        """(plan, None) or (None, reason) for the rule of ``kind``."""
        rule = self.rules.get(kind)
        if rule is None:
            return None, f"no {kind} kernel for this target"
        if kind == "specialized" and weight.nnz > self.budget:
            return None, (f"the build's specialised-kernel budget ({self.budget} nonzeros left) cannot take "
                          f"{weight.nnz} more")
        try:
            plan = rule.apply(spec, weight, epilogue, knobs if knobs is not None else self._knobs(rule, spec, weight))
        except ValueError as e:
            return None, str(e)
        if kind == "specialized":
            self.budget -= weight.nnz
        return plan, None

    def takes_dense(self, spec: ConvSpec, weight: SparseConvWeight) -> str | None:
        """The kernel kind that the automatic choice gives a conv below min_sparsity, if a rule claims it
        (``takes_dense``: measured faster than TVM's dense schedule there), else None."""
        if self.kernel != "auto":
            return None
        return next((k for k, r in self.rules.items() if getattr(r, "in_auto", True) and r.takes_dense(spec, weight)),
                    None)

    def plan(self, spec: ConvSpec, weight: SparseConvWeight, epilogue,
             only: str | None = None) -> tuple[object | None, list[str]]:
        """(KernelPlan, notes), or (None, [reason]) when the conv should stay dense. ``only``: that kernel kind
        or dense (a conv a rule claimed through ``takes_dense``: no other sparse kernel would beat dense)."""
        if self.kernel == "dense":
            return None, ["kernel='dense' was requested"]
        notes = []
        if self.kernel == "auto":  # rules may opt out of the automatic choice until measured (in_auto)
            order = [k for k in ("specialized", "sparse") if k in self.rules and getattr(self.rules[k], "in_auto", True)
                     and only in (None, k)]
        else:
            order = list(dict.fromkeys([self.kernel, "sparse"]))  # a forced kernel falls back to CSR
        if self.kernel == "auto" and self.log is not None and only is None:
            best = self.log.best(spec, weight, [r.name for r in self.rules.values()])
            if best is not None:
                kind = next(k for k, r in self.rules.items() if r.name == best[0])
                plan, why = self._try(kind, spec, weight, epilogue, self.rules[kind].Knobs.from_dict(best[1]))
                if plan is not None:
                    return plan, [f"tuning log: {best[0]} fastest ({best[2]:.4g} ms)"]
                notes.append(f"tuning log's choice {best[0]} not usable: {why}")
        for kind in order:
            # The cost rules steer the automatic choice only; a forced kernel or a tuning log overrides them.
            why = self.rules[kind].pays(spec, weight) if self.kernel == "auto" else None
            plan = None
            if why is None:
                plan, why = self._try(kind, spec, weight, epilogue)
            if plan is not None:
                return plan, notes
            notes.append(f"{kind} kernel not used: {why}")
        return None, notes
