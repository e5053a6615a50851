"""A sparse kernel's first argument as the graph pass lays out x for it, for the scripts that run kernels
outside the graph (``bench.py``, ``tune.py``).

``KernelPlan.prepare_input`` is the truth, but it runs on the build machine; the measuring side (the GPU
machine, TVM runtime only) rebuilds the argument from a small JSON description with one pad op (or a view).
``describe`` proves the description equal to ``prepare_input`` on a probe input, so a layout these
functions do not know fails when kernels are prepared, not as wrong numbers on the GPU.
"""
from __future__ import annotations


class LayoutError(ValueError):
    """``prepare_input`` makes a layout that ``to_numpy``/``to_torch`` cannot rebuild."""


_CACHE: dict = {}  # the probe is slow on large inputs; one per distinct (spec, layout parameters)


def describe(plan, spec) -> dict:
    """``{"padded": False, "shape": [...]}`` (x as it is, or a reshape of it) or ``{"padded": True, "rows",
    "hp", "wp", "top", "left", "shape"}`` (zero border to hp x wp, zero images up to rows)."""
    import numpy as np

    key = (spec, bool(plan.padded_input), bool(plan.needs_pad_op), int(plan.hp), int(plan.wp),
           int(getattr(plan, "extra_images", 0) or 0))
    if key in _CACHE:
        return dict(_CACHE[key])
    x = np.arange(int(np.prod(spec.input_shape)), dtype=np.float32).reshape(spec.input_shape) + 1.0
    got = np.asarray(plan.prepare_input(x))
    ok = True
    if plan.needs_pad_op:
        rows = int(got.shape[0]) if got.ndim == 2 else -1
        layout = {"padded": True, "rows": rows, "hp": int(plan.hp), "wp": int(plan.wp), "top": int(spec.pad[0]),
                  "left": int(spec.pad[1]), "shape": [rows, spec.C * int(plan.hp) * int(plan.wp)]}
        ok = rows >= spec.N and plan.hp >= spec.H + spec.pad[0] and plan.wp >= spec.W + spec.pad[1]
    elif plan.padded_input:  # no border needed, or made on chip: the graph pass emits a reshape only (a view)
        layout = {"padded": False, "shape": [spec.N, spec.C * spec.H * spec.W]}
    else:
        layout = {"padded": False, "shape": list(spec.input_shape)}
    if not ok or got.dtype != np.float32 or list(got.shape) != layout["shape"] \
            or not np.array_equal(got, to_numpy(x, layout)):
        raise LayoutError(f"plan.prepare_input gives {got.dtype} {list(got.shape)}, not the layout {layout}: "
                          "teach scripts/first_input.py the new layout")
    _CACHE[key] = dict(layout)
    return layout


def to_numpy(x, layout: dict):
    """The kernel's first argument for NCHW ``x`` (numpy)."""
    import numpy as np

    if not layout["padded"]:
        return np.ascontiguousarray(x).reshape(layout["shape"])
    N, C, H, W = x.shape
    top, left, hp, wp, rows = layout["top"], layout["left"], layout["hp"], layout["wp"], layout["rows"]
    xp = np.pad(x, ((0, rows - N), (0, 0), (top, hp - H - top), (left, wp - W - left)))
    return xp.reshape(rows, C * hp * wp)


def to_torch(F, x, layout: dict):
    """The same for a torch tensor (``F`` = torch.nn.functional): one F.pad on the GPU, or a view."""
    if not layout["padded"]:
        return x.contiguous().reshape(layout["shape"])
    N, C, H, W = x.shape
    top, left, hp, wp, rows = layout["top"], layout["left"], layout["hp"], layout["wp"], layout["rows"]
    xp = F.pad(x, (left, wp - W - left, top, hp - H - top, 0, 0, 0, rows - N))
    return xp.reshape(rows, C * hp * wp)
