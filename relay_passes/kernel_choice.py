"""Which sparse kernel a conv gets: the CSR kernel ("sparse") or one specialised to its weights.

Order of authority: a kernel the user forces (``build(..., kernel=...)``), then the fastest record of a
tuning log for this conv, then the cost rule below. The cost rule is what the measurements in
``docs/benchmarks.md`` and ``docs/notes/specialized-codegen.md`` support: the specialised kernel where
``specialized_pays`` and its rule accept the layer, while the build's compile-time budget lasts; the
CSR kernel otherwise, where ``csr_pays``; else the conv stays dense. Every fallback is said in the
conv's report.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from escort_tvm.conv_spec import ConvSpec
from escort_tvm.sparse_format import SparseConvWeight
from schedules.cuda import SparseConvCUDA

KERNELS = ("auto", "sparse", "specialized", "dense")
# Nonzeros per build that may go to specialised kernels: each costs ~0.2-0.4 ms of compile time on
# the 2-core build machine (PTX blocks; docs/notes/specialized-codegen.md), so this is a few minutes.
DEFAULT_SPECIALIZED_BUDGET = 1 << 20
# Where the specialised kernel pays (H200, docs/benchmarks.md): at batch 32 it beat the CSR kernel on
# all 16 bench layers (2-8x); at batch 1 it won every layer up to 30720 nonzeros. Larger layers at batch
# 1, since the grid runs one group's blocks together (bench/b1_big, b1_final_conv*): where an image has
# many output pixels, many warps run each group's code and it wins big: vgg16.conv3_2 (58982 nonzeros,
# 56x56 outputs) 72.9 vs 177.5 us on CSR + pad, vgg16.conv4_2 (235930, 28x28) 70.5 vs 186.8 us (234 s
# of compile). On 13x13/14x14 outputs it is only 10% faster (alexnet.conv3 20.5 vs 23.0 us,
# resnet50.l3.3x3 22.2 vs 24.5) for 1.5-4 minutes of ptxas each, which a ResNet-50 build would pay six
# times: those stay on CSR. Batches 2-15 were not measured; they take the batch-1 rule.
SPECIALIZED_MAX_NNZ_SMALL_BATCH = 32768
SPECIALIZED_LARGE_BATCH = 16
SPECIALIZED_LARGE_IMAGE = 28 * 28  # output pixels per image from which a small batch takes any size
# Where the CUDA CSR kernel beats the build's dense path (TVM's conv2d), from the sparsity sweep at batch
# 32 (docs/benchmarks.md): on a 56x56-output layer (vgg16.conv3_2) it loses at 70% and 80% (9.2 and 8.1
# vs 7.6 ms) and wins at 90% (5.4): crossover ~82%; on a 14x14-output layer (resnet50.l3.3x3) it ties at
# 70% and wins from 80%. The boundary between the two shapes (28x28 outputs) is not measured. At batch 1
# (90%) the CSR kernel beat TVM dense by 1.8-20x on 3x3 layers and tied on two 1x1 layers; no batch-1
# sweep exists, so the rule applies from batch 16 only.
CSR_MIN_SPARSITY_LARGE_OUTPUT = 0.85
CSR_LARGE_OUTPUT_PIXELS = 28 * 28


def specialized_pays(spec: ConvSpec, weight: SparseConvWeight) -> str | None:
    """None where the cost rule expects the specialised kernel to beat the CSR kernel, else why not."""
    if spec.N >= SPECIALIZED_LARGE_BATCH or weight.nnz <= SPECIALIZED_MAX_NNZ_SMALL_BATCH:
        return None
    if spec.OH * spec.OW >= SPECIALIZED_LARGE_IMAGE:
        return None
    return (f"cost rule: at batch {spec.N} (< {SPECIALIZED_LARGE_BATCH}) a layer of {weight.nnz} nonzeros on "
            f"{spec.OH}x{spec.OW} outputs runs faster on the CSR kernel (or not enough faster specialised to pay "
            f"for its compile time)")


def csr_pays(spec: ConvSpec, weight: SparseConvWeight) -> str | None:
    """None where the cost rule expects the CUDA CSR kernel to beat the dense path, else why not."""
    large = spec.N >= SPECIALIZED_LARGE_BATCH and spec.OH * spec.OW >= CSR_LARGE_OUTPUT_PIXELS
    if not large or weight.sparsity >= CSR_MIN_SPARSITY_LARGE_OUTPUT:
        return None
    return (f"cost rule: at batch {spec.N} on {spec.OH}x{spec.OW} outputs the CSR kernel needs sparsity >= "
            f"{CSR_MIN_SPARSITY_LARGE_OUTPUT} to beat the dense path (this weight: {weight.sparsity:.3f})")


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

    def plan(self, spec: ConvSpec, weight: SparseConvWeight, epilogue) -> tuple[object | None, list[str]]:
        """(KernelPlan, notes), or (None, [reason]) when the conv should stay dense."""
        if self.kernel == "dense":
            return None, ["kernel='dense' was requested"]
        notes = []
        if self.kernel == "auto":  # rules may opt out of the automatic choice until measured (in_auto)
            order = [k for k in ("specialized", "sparse") if k in self.rules and getattr(self.rules[k], "in_auto", True)]
        else:
            order = list(dict.fromkeys([self.kernel, "sparse"]))  # a forced kernel falls back to CSR
        if self.kernel == "auto" and self.log is not None:
            best = self.log.best(spec, weight, [r.name for r in self.rules.values()])
            if best is not None:
                kind = next(k for k, r in self.rules.items() if r.name == best[0])
                plan, why = self._try(kind, spec, weight, epilogue, self.rules[kind].Knobs.from_dict(best[1]))
                if plan is not None:
                    return plan, [f"tuning log: {best[0]} fastest ({best[2]:.4g} ms)"]
                notes.append(f"tuning log's choice {best[0]} not usable: {why}")
        for kind in order:
            # The cost rule steers the automatic choice only; a forced kernel or a tuning log overrides it.
            why = None
            if (kind, self.kernel) == ("specialized", "auto"):
                why = specialized_pays(spec, weight)
            elif (kind, self.kernel) == ("sparse", "auto") and isinstance(self.rules[kind], SparseConvCUDA):
                why = csr_pays(spec, weight)  # measured on the CUDA kernel only
            plan = None
            if why is None:
                plan, why = self._try(kind, spec, weight, epilogue)
            if plan is not None:
                return plan, notes
            notes.append(f"{kind} kernel not used: {why}")
        return None, notes
