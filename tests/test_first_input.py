"""scripts/first_input.py: the layout the measuring scripts rebuild a kernel's first argument from must
equal ``KernelPlan.prepare_input`` for every plan the rules make, and an unknown layout must fail loudly."""
from __future__ import annotations

import numpy as np
import pytest

from escort_tvm import ConvSpec, Epilogue, SparseConvWeight
from schedules import SparseConvCUDA, SpecializedCUDA
from scripts import first_input
from _helpers import pruned

# (spec, rule, knob changes, extra zero images?): padding on chip (a view), a pad op, a pad op with a zero image
# for a ragged last image pair, the plain input of an unpadded conv, the specialised kernel's x
CASES = [
    (ConvSpec(N=3, C=8, H=9, W=10, K=8, KH=3, KW=3, pad=(1, 1, 1, 1)), SparseConvCUDA(), {"pad_on_chip": True}),
    (ConvSpec(N=3, C=8, H=9, W=10, K=8, KH=3, KW=3, pad=(1, 1, 1, 1)), SparseConvCUDA(), {"pad_on_chip": False, "tap_mask": False}),
    (ConvSpec(N=3, C=8, H=9, W=10, K=8, KH=3, KW=3, pad=(1, 1, 1, 1)), SparseConvCUDA(),
     {"pad_on_chip": False, "tap_mask": False, "images_per_thread": 2}),
    (ConvSpec(N=2, C=8, H=7, W=7, K=8, KH=1, KW=1), SparseConvCUDA(), {}),
    (ConvSpec(N=2, C=8, H=9, W=10, K=8, KH=3, KW=3, pad=(1, 1, 1, 1)), SpecializedCUDA(), {}),
]


@pytest.mark.parametrize("spec,rule,change", CASES)
def test_layout_rebuilds_prepare_input(rng, spec, rule, change):
    weight = SparseConvWeight.from_dense(pruned(rng, spec.weight_shape, 0.8))
    knobs = rule.default_knobs(spec, weight)
    knobs = knobs.with_(**change)
    plan = rule.apply(spec, weight, Epilogue(), knobs)
    layout = first_input.describe(plan, spec)
    x = rng.standard_normal(spec.input_shape).astype(np.float32)
    want = np.asarray(plan.prepare_input(x))
    assert layout["padded"] == plan.needs_pad_op
    assert layout["shape"] == list(want.shape)
    assert (want.shape[0] > spec.N) == (change.get("images_per_thread") == 2)  # the extra zero image
    assert np.array_equal(first_input.to_numpy(x, layout), want)


def test_unknown_layout_fails_loudly(rng):
    spec = ConvSpec(N=2, C=8, H=9, W=10, K=8, KH=3, KW=3, pad=(1, 1, 1, 1))
    weight = SparseConvWeight.from_dense(pruned(rng, spec.weight_shape, 0.8))
    plan = SparseConvCUDA().apply(spec, weight, Epilogue())

    class Transposed:  # a layout the scripts do not know: channels last
        def __getattr__(self, name):
            return getattr(plan, name)

        def prepare_input(self, x):
            return np.ascontiguousarray(plan.prepare_input(x)[:, ::-1])

    first_input._CACHE.clear()  # a layout proven earlier for the same key would skip the probe
    with pytest.raises(first_input.LayoutError, match="teach scripts/first_input.py"):
        first_input.describe(Transposed(), spec)
