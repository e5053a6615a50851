"""The graph pass: pruned conv2d (+ BN + bias + residual add + ReLU) -> pad -> call_tir(sparse conv).

Relax pass (Relay was removed from TVM in 0.20); the folder keeps the name the project was asked
for. It only rewrites convs whose weight is a constant and whose sparsity reaches the threshold;
everything else is left to TVM's normal pipeline, and every conv gets a report entry saying what it
became and why.

What follows a chosen conv is taken into its kernel, in this order, each step only when the value
before it has exactly one use (see ``_fuse_chain``):
  [add per-channel constant] [inference batch_norm] [add per-channel constant]
  [add tensor of the conv output's shape (residual)] [relu]
BatchNormalization folds into the weight (per-output-channel scale: zeros stay zeros) and the bias.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import tvm
from tvm import relax

from escort_tvm.compute import Epilogue
from escort_tvm.conv_spec import ConvSpec
from escort_tvm.report import ConvReport
from escort_tvm.sparse_format import SparseConvWeight
from schedules import rules_for

from .kernel_choice import KernelChooser

KnobLookup = Callable[[ConvSpec, SparseConvWeight, str], "dict | None"]  # (spec, weight, rule) -> knob values


@dataclass
class _Site:
    """A conv chosen for the sparse kernel, with the chain of ops fused into it."""

    report: ConvReport
    spec: ConvSpec
    data: relax.Expr
    weight: SparseConvWeight
    bias: np.ndarray
    epilogue: Epilogue
    plan: object = None  # schedules.KernelPlan
    residual: relax.Expr | None = None  # the add's other operand, defined before the add (SSA)
    subsample: tuple[int, int] | None = None  # a strided 1x1 conv: slice the input, run the kernel at stride 1


def _as_subsampled(spec: ConvSpec) -> ConvSpec | None:
    """A strided unpadded 1x1 conv as the 1x1 stride-1 conv of its subsampled input (ResNet's downsamples).
    The kernels' flat 1x1 path runs on across the batch and reads each input row once; staged, a stride-2 1x1
    walked 4x the input it used (H200, ResNet-50 at batch 8, docs/bench/e2e10: its three strided downsamples
    took 0.42 of the 2.2 ms of sparse convs, layer4's 0.17 ms, where layer4's stride-1 1x1 convs, half its work,
    took 0.027-0.037 ms each). The slice is one small copy (a quarter of the input)."""
    if (spec.KH, spec.KW) != (1, 1) or spec.stride == (1, 1) or any(spec.pad):
        return None
    return ConvSpec(N=spec.N, C=spec.C, H=spec.OH, W=spec.OW, K=spec.K, KH=1, KW=1, groups=spec.groups)


def _static_shape(expr) -> tuple[int, ...] | None:
    ty = getattr(expr, "ty", None) or getattr(expr, "struct_info", None)
    shape = getattr(ty, "shape", None)
    if shape is None:
        return None
    try:
        return tuple(int(d) for d in shape)
    except (TypeError, ValueError):
        return None


def _dtype(expr) -> str | None:
    ty = getattr(expr, "ty", None)
    return getattr(ty, "dtype", None)


def _is_const(expr) -> bool:
    return isinstance(expr, tvm.ir.expr.Constant)


def _per_channel(const, K: int) -> np.ndarray | None:
    """The constant as a (K,) bias if adding it to an NCHW conv output is a per-channel add."""
    if not _is_const(const):
        return None
    arr = const.value.numpy()
    if arr.dtype != np.float32 or arr.ndim > 4:
        return None
    shape = (1,) * (4 - arr.ndim) + arr.shape
    if shape[0] != 1 or shape[2] != 1 or shape[3] != 1 or shape[1] not in (1, K):
        return None
    return np.broadcast_to(arr.reshape(-1), (K,)).astype(np.float32)


def _conv_spec(call) -> tuple[ConvSpec | None, str]:
    """A ConvSpec for a relax.nn.conv2d call, or None and the reason it is not one we can take."""
    a = call.attrs
    if a.data_layout != "NCHW" or a.kernel_layout != "OIHW" or a.out_layout not in ("NCHW", ""):
        return None, f"layout {a.data_layout}/{a.kernel_layout} (only NCHW/OIHW is supported)"
    x, w = call.args
    xs, ws = _static_shape(x), _static_shape(w)
    if xs is None or ws is None:
        return None, "input or weight shape is not static"
    dt = (_dtype(x), _dtype(w), str(a.out_dtype) if a.out_dtype else "float32")
    if any(d != "float32" for d in dt):
        return None, f"dtype {dt[0]}/{dt[1]} -> {dt[2]} (only float32 is supported)"
    try:
        spec = ConvSpec(N=xs[0], C=xs[1], H=xs[2], W=xs[3], K=ws[0], KH=ws[2], KW=ws[3],
                        stride=tuple(int(s) for s in a.strides), pad=tuple(int(p) for p in a.padding),
                        dilation=tuple(int(d) for d in a.dilation), groups=int(a.groups))
    except ValueError as e:
        return None, f"unsupported conv attributes: {e}"
    if spec.weight_shape != ws:
        return None, f"weight shape {ws} does not match input channels / groups"
    return spec, ""


def _uses(func: relax.Function) -> tuple[dict, dict]:
    """var -> bound value, and var -> number of uses, over the whole function."""
    values, counts = {}, {}

    @relax.expr_functor.visitor
    class _Count(relax.PyExprVisitor):
        def visit_var_(self, v):
            counts[v] = counts.get(v, 0) + 1

        def visit_dataflow_var_(self, v):
            counts[v] = counts.get(v, 0) + 1

        def visit_var_binding_(self, b):
            values[b.var] = b.value
            self.visit_expr(b.value)

    _Count().visit_expr(func)
    return values, counts


def _op_name(value) -> str:
    op = getattr(value, "op", None)
    return op.name if isinstance(op, tvm.ir.Op) else ""


def _users(values: dict) -> dict:
    """var -> the vars whose bound value (a call or a tuple item) reads it."""
    users: dict = {}
    for var, value in values.items():
        if isinstance(value, relax.Call):
            args = value.args
        elif isinstance(value, relax.TupleGetItem):
            args = [value.tuple_value]
        else:
            continue
        for arg in args:
            if isinstance(arg, relax.Var):
                users.setdefault(arg, []).append(var)
    return users


# ---------------------------------------------------------------- the chain fused after a conv
@dataclass
class _Chain:
    """What follows a conv and goes into its kernel: BN folded into ``scale`` (of the weight) and
    ``bias``, an optional residual operand and ReLU. ``end`` is the var whose binding the kernel
    call replaces; ``add`` is the residual add's var, which no other conv may then claim."""

    end: relax.Var
    scale: np.ndarray  # (K,) float64, multiplies output channel k of the weight
    bias: np.ndarray  # (K,) float64
    bn: bool = False
    has_bias: bool = False
    residual: relax.Expr | None = None
    add: relax.Var | None = None
    relu: bool = False

    @property
    def fused(self) -> list[str]:
        return [n for n, on in (("bn", self.bn), ("bias", self.has_bias), ("residual", self.residual is not None),
                                ("relu", self.relu)) if on]

    def folded_weight(self, w: np.ndarray) -> np.ndarray:
        if not self.bn:
            return w
        return (w.astype(np.float64) * self.scale.reshape(-1, 1, 1, 1)).astype(np.float32)


def _only_user(var, values, counts, users, claimed):
    """(user var, its value) when ``var`` has exactly one use, a binding not yet taken by another kernel."""
    nxt = users.get(var, [])
    if counts.get(var, 0) != 1 or len(nxt) != 1 or nxt[0] in claimed:
        return None, None
    return nxt[0], values[nxt[0]]


def _add_operand(add, var):
    """The other operand of ``add(var, other)`` / ``add(other, var)``."""
    return add.args[1] if add.args[0].same_as(var) else add.args[0]


def _bn_affine(call, K: int):
    """(scale, shift) in float64 of an inference batch_norm over axis 1 with constant parameters, else None."""
    a = call.attrs
    if bool(a.training) or int(a.axis) != 1 or not all(_is_const(p) for p in call.args[1:5]):
        return None
    gamma, beta, mean, var = (p.value.numpy().astype(np.float64) for p in call.args[1:5])
    if any(p.shape != (K,) for p in (gamma, beta, mean, var)):
        return None
    gamma = gamma if bool(a.scale) else np.ones(K)
    beta = beta if bool(a.center) else np.zeros(K)
    with np.errstate(all="ignore"):
        scale = gamma / np.sqrt(var + float(a.epsilon))
        shift = beta - mean * scale
    if not (np.isfinite(scale).all() and np.isfinite(shift).all()):
        return None  # var + eps <= 0 or infinities: leave the BN to TVM
    return scale, shift


def _is_bn_item0(tup, values, counts, users):
    """``tup`` (a batch_norm result) is read only as item 0, once: returns that item's var, else None."""
    items = users.get(tup, [])
    if not items or not all(isinstance(values[u], relax.TupleGetItem) for u in items):
        return None
    first = [u for u in items if values[u].index == 0]
    rest = [u for u in items if values[u].index != 0]
    if len(first) != 1 or counts.get(tup, 0) != len(items) or any(counts.get(u, 0) for u in rest):
        return None
    return first[0]


def _kernel_weight(w: np.ndarray, chain: _Chain | None, entry: ConvReport) -> np.ndarray:
    """The weight the kernel runs: with a BN folded in where the chain has one. Sparsity is counted on
    it; scaling keeps every zero and can only add zeros by underflow, which the report's notes say."""
    if chain is None or not chain.bn:
        return w
    folded = chain.folded_weight(w)
    lost = int(np.count_nonzero(w)) - int(np.count_nonzero(folded))
    if lost:
        entry.notes.append(f"folding BatchNormalization underflowed {lost} nonzero weights to zero; "
                           "sparsity is of the folded weight")
    return folded


def _fuse_chain(var, spec: ConvSpec, values, counts, users, claimed) -> _Chain:
    """Walk the ops after conv ``var`` that its kernel can take (see the module docstring).

    A residual operand cannot depend on the conv's output: every var of the chain has exactly one
    use (the next step), so the only way out of the chain is through the add itself, and SSA
    defines the add's other operand before the add.
    """
    K = spec.K
    ch = _Chain(end=var, scale=np.ones(K), bias=np.zeros(K))

    def take_bias():
        nxt, val = _only_user(ch.end, values, counts, users, claimed)
        if _op_name(val) != "relax.add":
            return False
        b = _per_channel(_add_operand(val, ch.end), K)
        if b is None:
            return False
        ch.bias, ch.end, ch.has_bias = ch.bias + b.astype(np.float64), nxt, True
        return True

    take_bias()
    nxt, val = _only_user(ch.end, values, counts, users, claimed)
    if _op_name(val) == "relax.nn.batch_norm" and val.args[0].same_as(ch.end):
        affine = _bn_affine(val, K)
        item = _is_bn_item0(nxt, values, counts, users) if affine is not None else None
        if item is not None and item not in claimed:
            scale, shift = affine
            ch.scale, ch.bias, ch.end, ch.bn = scale, ch.bias * scale + shift, item, True
            take_bias()
    nxt, val = _only_user(ch.end, values, counts, users, claimed)
    if _op_name(val) == "relax.add":
        other = _add_operand(val, ch.end)
        if (isinstance(other, (relax.Var, tvm.ir.expr.Constant)) and not other.same_as(ch.end)
                and _static_shape(other) == spec.output_shape and _dtype(other) == "float32"):
            ch.residual, ch.add, ch.end = other, nxt, nxt
    nxt, val = _only_user(ch.end, values, counts, users, claimed)
    if _op_name(val) == "relax.nn.relu":
        ch.relu, ch.end = True, nxt
    return ch


def _conv_calls(func: relax.Function):
    values, _ = _uses(func)
    return [(v, c) for v, c in values.items() if _op_name(c) == "relax.nn.conv2d"]


def conv_weight_names(func: relax.Function) -> list[str | None]:
    """Each conv2d's weight parameter name (None where the weight is not a parameter), in graph order."""
    params = {p for p in func.params}
    return [c.args[1].name if c.args[1] in params else None for _, c in _conv_calls(func)]


def plan_sites(func: relax.Function, min_sparsity: float, param_names: list[str] | None = None,
               rule=None, knob_lookup: KnobLookup | None = None, chooser: KernelChooser | None = None,
               subsample_strided_1x1: bool = False):
    """Decide, for every conv2d in ``func``, which kernel; returns (report, {chain end var: site}).

    With a ``chooser`` (or a single schedule ``rule``, knobs from ``knob_lookup`` or its defaults),
    each site also gets its KernelPlan; a conv whose kernel input would not fit 32-bit indexing, or
    that no kernel takes, stays dense. Without either, sites are planned but not scheduled.
    ``subsample_strided_1x1``: plan a strided unpadded 1x1 conv as a stride-1 one on its subsampled input.
    """
    if chooser is None and rule is not None:
        chooser = KernelChooser([rule], kernel=rule.kernel, knob_lookup=knob_lookup)
    values, counts = _uses(func)
    users = _users(values)
    report, sites, claimed = [], {}, set()
    convs = _conv_calls(func)
    for i, (var, call) in enumerate(convs):
        name = param_names[i] if param_names and i < len(param_names) and param_names[i] else f"conv2d_{i}"
        entry = ConvReport(index=i, name=name, input_shape=_static_shape(call.args[0]),
                           weight_shape=_static_shape(call.args[1]), output_shape=_static_shape(var))
        report.append(entry)
        spec, why = _conv_spec(call)
        if spec is not None:
            entry.attrs = {"stride": spec.stride, "pad": spec.pad, "dilation": spec.dilation, "groups": spec.groups}
        weight = call.args[1]
        if not _is_const(weight):
            entry.reason = "weight is not a constant (computed at run time or a model input)"
            continue
        chain = _fuse_chain(var, spec, values, counts, users, claimed) if spec is not None else None
        w = _kernel_weight(weight.value.numpy(), chain, entry)
        entry.nnz = int(np.count_nonzero(w))
        sparsity = 1.0 - entry.nnz / w.size
        entry.sparsity = round(sparsity, 4)
        if spec is None:
            entry.reason = why
            continue
        subsampled = _as_subsampled(spec) if subsample_strided_1x1 else None
        subsample = spec.stride if subsampled is not None else None
        spec = subsampled or spec
        claim = None
        if sparsity < min_sparsity:
            # a rule may claim a dense conv it runs faster than TVM's dense schedule (a stem), unless the
            # build keeps every conv dense (min_sparsity > 1)
            if chooser is not None and min_sparsity <= 1.0:
                claim = chooser.takes_dense(spec, SparseConvWeight.from_dense(w, spec.groups))
            if claim is None:
                entry.reason = f"sparsity {sparsity:.4f} is below min_sparsity {min_sparsity:.4g}"
                continue
            entry.notes.append(f"below min_sparsity {min_sparsity:.4g}, but the {claim} kernel takes it (the rule's "
                               "takes_dense: faster than TVM's dense schedule)")
        weight_fmt = SparseConvWeight.from_dense(w, spec.groups)
        epilogue = Epilogue(relu=chain.relu, residual=chain.residual is not None)
        plan, kind = None, "sparse"
        if chooser is not None:
            plan, notes = chooser.plan(spec, weight_fmt, epilogue, only=claim)
            if plan is None:
                entry.reason = "; ".join(notes) or "no sparse kernel takes this conv"
                continue
            entry.notes.extend(notes)
            kind = chooser.rules_by_name[plan.rule].kernel
            if max((spec.N + plan.extra_images) * spec.C * plan.hp * plan.wp,
                   spec.N * spec.K * spec.OH * spec.OW) >= 2**31:
                entry.reason = "input or output too large for the kernel's 32-bit indexing"
                continue
        entry.kernel, entry.fused = kind, chain.fused
        if subsample is not None:
            entry.notes.append(f"1x1 stride {subsample[0]}x{subsample[1]}: the input is subsampled first (one strided "
                               "slice) and the kernel runs the conv at stride 1")
        if chain.add is not None:
            claimed.add(chain.add)
        sites[chain.end] = _Site(entry, spec, call.args[0], weight_fmt, chain.bias.astype(np.float32), epilogue,
                                 plan, chain.residual, subsample)
    return report, sites


@relax.expr_functor.mutator
class _Rewriter(relax.PyExprMutator):
    def __init__(self, mod, sites):
        super().__init__(mod)
        self.sites = sites

    def visit_var_binding_(self, binding):
        site = self.sites.get(binding.var)
        if site is None:
            return super().visit_var_binding_(binding)
        spec, bb, plan = site.spec, self.builder_, site.plan
        site.report.schedule = f"{plan.rule} {plan.knobs.as_dict()}"
        x = self.visit_expr(site.data)
        if site.subsample is not None:
            H, W = (int(d) for d in _static_shape(x)[2:])
            x = bb.emit(relax.op.strided_slice(x, axes=[2, 3], begin=[0, 0], end=[H, W], strides=list(site.subsample)))
        pt, pl = spec.pad[0], spec.pad[1]
        if plan.padded_input:
            if plan.needs_pad_op:
                x = bb.emit(relax.op.nn.pad(x, [0, plan.extra_images, 0, 0, pt, plan.hp - spec.H - pt,
                                                pl, plan.wp - spec.W - pl]))
            x = bb.emit(relax.op.reshape(x, (spec.N + plan.extra_images, spec.C * plan.hp * plan.wp)))
        func = plan.func.without_attr("global_symbol").with_attr("op_pattern", 8)
        # add_func returns the existing function when an identical kernel (same shape, nnz, epilogue and
        # knobs; the weights are arguments) was added for an earlier conv: the report names the one used.
        gvar = bb.add_func(func, f"escort_sparse_conv{site.report.index}")
        site.report.function = gvar.name_hint
        # (dtype given: relax.const turns an int64 array into int32 by default, and the staged-input kernel's
        # nonzeros are int64 words)
        args = [x] + [relax.const(a, str(a.dtype)) for a in plan.weight_arrays] + [relax.const(site.bias)]
        if site.residual is not None:
            args.append(self.visit_expr(site.residual))
        call = relax.call_tir(gvar, relax.Tuple(args), relax.TensorType(spec.output_shape, "float32"))
        bb.emit_normalized(relax.VarBinding(binding.var, bb.normalize(call)))


def rewrite_sparse_convs(mod: tvm.IRModule, target, min_sparsity: float = 0.7,
                         knob_lookup: KnobLookup | None = None, param_names: list[str] | None = None,
                         func_name: str = "main", *, kernel: str = "auto", tuning_log=None,
                         specialized_budget: int | None = None, subsample_strided_1x1: bool | None = None):
    """Rewrite ``mod[func_name]``; returns (new module, per-conv report).

    The module should already have its parameters bound and constants folded, so that weights
    computed from constant subgraphs are visible as constants. ``kernel`` forces one kind
    ("sparse", "specialized", "dense") or lets the chooser decide ("auto"). ``subsample_strided_1x1`` (default:
    on CUDA only, where it was measured) runs strided 1x1 convs at stride 1 on a subsampled input.
    """
    extra = {} if specialized_budget is None else {"specialized_budget": specialized_budget}
    chooser = KernelChooser(rules_for(target), kernel, tuning_log, knob_lookup, **extra)
    if subsample_strided_1x1 is None:
        subsample_strided_1x1 = tvm.target.Target(target).kind.name == "cuda"
    report, sites = plan_sites(mod[func_name], min_sparsity, param_names, chooser=chooser,
                               subsample_strided_1x1=subsample_strided_1x1)
    if not sites:
        return mod, report
    rewriter = _Rewriter(mod, sites)
    new_func = rewriter.visit_expr(mod[func_name])
    new_mod = rewriter.builder_.get()
    new_mod[func_name] = new_func
    new_mod = relax.transform.DeadCodeElimination([func_name])(new_mod)
    return new_mod, report
