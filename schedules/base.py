"""What every sparse-conv schedule rule provides, and the knob declaration both defaults and tuner read.

A rule is one small class in the manner of TVM's dlight rules: it says where it applies, declares
its knobs once (``Knob`` entries with their candidate values), picks defaults from the conv's shape
and sparsity, and renders a scheduled PrimFunc plus the weight arrays in the layout it reads.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from itertools import product
from typing import Any, ClassVar

import numpy as np

from escort_tvm.compute import Epilogue
from escort_tvm.conv_spec import ConvSpec
from escort_tvm.sparse_format import SparseConvWeight

# The batch from which the CUDA rules make their large-batch choices (all measured at batch 32); batches
# 2-15 take the batch-1 knobs (measured at 4 and 8 only for which kernel pays: cuda_specialized.ALL_LAYERS_BATCH).
LARGE_BATCH = 16


@dataclass(frozen=True)
class Knobs:
    """Base of a rule's knob set: subclasses declare fields and ``SPACE`` (field -> candidates)."""

    SPACE: ClassVar[dict[str, tuple]] = {}

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def with_(self, **kw) -> "Knobs":
        return replace(self, **kw)

    @classmethod
    def from_dict(cls, d: dict) -> "Knobs":
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown knobs for {cls.__name__}: {sorted(unknown)}")
        knobs = cls(**d)
        knobs.validate()
        return knobs

    @classmethod
    def space(cls):
        """Every knob combination (the tuner's search space)."""
        names = list(cls.SPACE)
        for values in product(*(cls.SPACE[n] for n in names)):
            yield cls(**dict(zip(names, values)))

    def validate(self) -> None:
        for name, cands in self.SPACE.items():
            if getattr(self, name) not in cands:
                raise ValueError(f"{type(self).__name__}.{name}={getattr(self, name)!r} is not one of {cands}")


@dataclass(frozen=True)
class KernelPlan:
    """A scheduled kernel and what it needs: the padded input pitch and its constant weight arrays.

    The kernel's parameters are ``(x, *weight_arrays, bias[K], [residual[N, K, OH, OW]], y[N, K, OH, OW])``:
    ``x`` is ``x_pad[N, C*hp*wp]`` when ``padded_input`` (with ``(hp, wp) == (H, W)``: the plain input,
    flattened, even for a padded conv, whose border the kernel then makes itself) else the NCHW input,
    and the residual is there only when the epilogue adds one.
    """

    func: Any  # tvm.tirx.PrimFunc
    hp: int
    wp: int
    weight_arrays: tuple[np.ndarray, ...]
    rule: str
    knobs: Knobs
    spec: ConvSpec | None = None
    # True: the kernel reads x_pad[N, C*hp*wp] (the pass emits pad + reshape); False: it reads the
    # plain NCHW input and handles padding on chip.
    padded_input: bool = True
    # Zero images appended to the batch so a thread's images per block tile the batch exactly.
    extra_images: int = 0

    @property
    def needs_pad_op(self) -> bool:
        """Whether the graph must pad the input before the kernel (else a reshape, or nothing, hands it over)."""
        return self.padded_input and ((self.hp, self.wp) != (self.spec.H, self.spec.W) or bool(self.extra_images))

    def prepare_input(self, x: np.ndarray) -> np.ndarray:
        """The kernel's first argument for an NCHW input (what the graph pass emits)."""
        from escort_tvm.compute import padded_input

        if not self.padded_input:
            return x
        xp = padded_input(x, self.spec, self.hp, self.wp)
        return np.concatenate([xp, np.zeros((self.extra_images, xp.shape[1]), xp.dtype)]) if self.extra_images else xp


class SparseConvRule:
    name: ClassVar[str]
    kernel: ClassVar[str]  # the kind the report names: "sparse" (CSR arrays) or "specialized" (weights in code)
    Knobs: ClassVar[type[Knobs]]

    def is_target(self, target) -> bool:
        raise NotImplementedError

    def default_knobs(self, spec: ConvSpec, weight: SparseConvWeight) -> Knobs:
        raise NotImplementedError

    def pays(self, spec: ConvSpec, weight: SparseConvWeight) -> str | None:
        """The cost rule: None where build's automatic choice should take this kernel, else why not (said
        in the report). Rules state only what their measurements support; a forced kernel or a tuning log
        is not subject to it."""
        return None

    def takes_dense(self, spec: ConvSpec, weight: SparseConvWeight) -> bool:
        """Whether the automatic choice should give this kernel a conv below min_sparsity (dense or nearly):
        only where it measured faster than TVM's default dense schedule for such a conv."""
        return False

    def apply(self, spec: ConvSpec, weight: SparseConvWeight, epilogue: Epilogue,
              knobs: Knobs | None = None) -> KernelPlan:
        raise NotImplementedError


def csr_arrays(weight: SparseConvWeight, spec: ConvSpec, hp: int, wp: int):
    """row_ptr, stretched offsets and values; an all-zero weight keeps one dummy slot (buffers can't be empty)."""
    off = weight.stretched_offsets(hp, wp, spec.dilation)
    val = weight.values
    if weight.nnz == 0:
        off, val = np.zeros(1, np.int32), np.zeros(1, np.float32)
    return weight.row_ptr, off, val
