"""Hand-written schedules of the sparse direct convolution, one rule class per target."""
from .base import KernelPlan, Knobs, SparseConvRule
from .cpu import CPUKnobs, SparseConvCPU
from .cuda import CUDAKnobs, SparseConvCUDA
from .cpu_specialized import SpecializedCPU, SpecializedCPUKnobs
from .cuda_specialized import SpecializedCUDA, SpecializedKnobs

# Per target, the CSR rule comes first: it takes every conv; the specialised rule refuses some.
RULES: tuple[SparseConvRule, ...] = (SparseConvCUDA(), SpecializedCUDA(), SparseConvCPU(), SpecializedCPU())


def rule_for(target) -> SparseConvRule:
    """The sparse-conv rule for a tvm Target; raises for targets with no rule."""
    for rule in RULES:
        if rule.is_target(target):
            return rule
    raise ValueError(f"no sparse-conv schedule for target kind {target.kind.name!r}")


def rules_for(target) -> list[SparseConvRule]:
    """Every sparse-conv rule that takes a tvm Target (one per kernel kind)."""
    rules = [r for r in RULES if r.is_target(target)]
    if not rules:
        raise ValueError(f"no sparse-conv schedule for target kind {target.kind.name!r}")
    return rules


__all__ = ["rules_for", "KernelPlan", "Knobs", "SparseConvRule", "SparseConvCPU", "CPUKnobs",
           "SparseConvCUDA", "CUDAKnobs", "SpecializedCUDA", "SpecializedKnobs", "SpecializedCPU", "SpecializedCPUKnobs", "RULES", "rule_for"]
