"""``escort-tvm``: compile, run, inspect, prune, export zoo models and benchmark from the command line.

Results go to stdout, progress of long steps to stderr ("[2/4] building ..."). Errors print one line,
``escort-tvm: error: ...``, and exit with status 1 (2 for bad command-line usage, as argparse does);
``--traceback`` shows the Python traceback instead.
"""
from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

import numpy as np

PROG = "escort-tvm"


class UserError(Exception):
    """A problem with what the user asked for: reported as one line, no traceback."""


# ---------------------------------------------------------------------------- progress
class Steps:
    """Numbered progress lines on stderr; a step that runs long says it is still running."""

    def __init__(self, total: int, quiet: bool = False, stream=None, heartbeat_s: float = 30.0):
        self.total, self.quiet, self.i = total, quiet, 0
        self.stream = stream or sys.stderr
        self.heartbeat_s = heartbeat_s

    def __call__(self, msg: str):
        self.i += 1
        return _Step(self, f"[{self.i}/{self.total}] {msg}")

    def say(self, msg: str) -> None:
        if not self.quiet:
            print(msg, file=self.stream, flush=True)


class _Step:
    def __init__(self, steps: Steps, msg: str):
        self.steps, self.msg = steps, msg
        self._stop = threading.Event()

    def __enter__(self):
        self.t0 = time.perf_counter()
        self.steps.say(self.msg + " ...")
        if not self.steps.quiet:
            self._thread = threading.Thread(target=self._beat, daemon=True)
            self._thread.start()
        return self

    def _beat(self):
        while not self._stop.wait(self.steps.heartbeat_s):
            self.steps.say(f"      ... still running ({time.perf_counter() - self.t0:.0f} s)")

    def __exit__(self, exc_type, exc, tb):
        self._stop.set()
        self.seconds = time.perf_counter() - self.t0
        if exc_type is None:
            self.steps.say(f"      done in {self.seconds:.1f} s")
        return False


# ---------------------------------------------------------------------------- shared helpers
def parse_shapes(items) -> dict | None:
    """``NAME:1x3x224x224`` (repeatable) -> {NAME: [1, 3, 224, 224]}."""
    if not items:
        return None
    shapes = {}
    for item in items:
        name, sep, dims = item.rpartition(":")
        try:
            if not sep or not name:
                raise ValueError
            shapes[name] = [int(d) for d in dims.lower().split("x")]
            if any(d < 1 for d in shapes[name]):
                raise ValueError
        except ValueError:
            raise UserError(f"--input-shape {item!r}: expected NAME:DIMS such as input:1x3x224x224") from None
    return shapes


def parse_target(text):
    """--target: llvm, cuda, or a JSON target such as {"kind": "cuda", "arch": "sm_80"}; checked before any work."""
    from escort_tvm.compiler import resolve_target

    if text is not None and text.lstrip().startswith("{"):
        try:
            text = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"--target {text!r} is not valid JSON: {e}") from None
    return resolve_target(text)


def load_model(path, shapes=None):
    """(onnx ModelProto, Relax module, params) for an ONNX file."""
    import escort_tvm
    from escort_tvm.frontend import _load_onnx

    model = _load_onnx(path)
    mod, params = escort_tvm.from_onnx(model, shapes)
    return model, mod, params


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        return float("inf")
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def random_inputs(signature, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    for _, shape, dtype in signature:
        if np.issubdtype(np.dtype(dtype), np.floating):
            out.append(rng.standard_normal(shape).astype(dtype))
        else:
            out.append(rng.integers(0, 10, shape).astype(dtype))
    return out


def summarize(y, name="output") -> str:
    y = np.asarray(y)
    lines = [f"{name}: shape {'x'.join(map(str, y.shape))} {y.dtype}"]
    if y.size and np.issubdtype(y.dtype, np.number):
        f = y.astype(np.float64)
        lines[0] += f"  min {f.min():.5g}  max {f.max():.5g}  mean {f.mean():.5g}  std {f.std():.5g}"
        if not np.isfinite(f).all():
            lines.append(f"  WARNING: {np.count_nonzero(~np.isfinite(f))} non-finite values")
        if y.ndim == 2:
            for i, row in enumerate(f[:4]):
                top = np.argsort(-row)[:5]
                lines.append(f"  [{i}] top-5 " + ", ".join(f"{int(k)}:{row[k]:.4g}" for k in top))
            if y.shape[0] > 4:
                lines.append(f"  ... ({y.shape[0] - 4} more rows)")
    return "\n".join(lines)


def time_summary(times) -> str:
    t = np.asarray(times) * 1e3
    return f"median {np.median(t):.3f} ms (min {t.min():.3f}, max {t.max():.3f}; {len(t)} measurements)"


def _outputs(y) -> list:
    return list(y) if isinstance(y, tuple) else [y]


# ---------------------------------------------------------------------------- commands
def cmd_compile(a) -> int:
    import escort_tvm

    target, shapes = parse_target(a.target), parse_shapes(a.input_shape)
    if a.tuning_log is not None and not Path(a.tuning_log).is_file():
        raise UserError(f"tuning log {a.tuning_log} does not exist")
    steps = Steps(3, a.quiet)
    with steps(f"importing {a.model}"):
        _, mod, params = load_model(a.model, shapes)
    with steps(f"building for {target.kind.name} (sparse rewrite of pruned convs, then TVM compile)"):
        built = escort_tvm.build(mod, params, target, min_sparsity=a.min_sparsity, tuning_log=a.tuning_log,
                                 kernel=a.kernel, specialized_budget=a.specialized_budget, jobs=a.jobs)
    with steps(f"exporting {a.output}"):
        path = built.export_library(a.output)
    print(built.report_text())
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB, target {target.kind.name})")
    return 0


def _read_inputs(specs, signature) -> list[np.ndarray]:
    names = [n for n, _, _ in signature]
    given = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            if len(names) != 1:
                raise UserError(f"the model has inputs {names}: give --input NAME=FILE.npy for each")
            name, path = names[0], spec
        if name not in names:
            raise UserError(f"--input {spec!r}: the model has no input {name!r} (its inputs: {names})")
        p = Path(path)
        if not p.is_file():
            raise UserError(f"input file {p} does not exist")
        try:
            given[name] = np.load(p, allow_pickle=False)
        except Exception as e:
            raise UserError(f"cannot read {p} as a .npy array: {e}") from None
    missing = [n for n in names if n not in given]
    if missing:
        raise UserError(f"no --input for {missing}")
    return [given[n] for n in names]


def cmd_run(a) -> int:
    import escort_tvm

    model = escort_tvm.load(a.model, device=a.device)
    sig = model.inputs
    if a.input:
        xs = _read_inputs(a.input, sig)
        src = "from " + ", ".join(a.input)
    else:
        xs = random_inputs(sig, a.seed)
        src = f"random normal, seed {a.seed}"
    for (name, shape, dtype), x in zip(sig, xs):
        print(f"input {name}: {'x'.join(map(str, shape))} {dtype} ({src})")
    ys = _outputs(model(*xs))
    for i, y in enumerate(ys):
        print(summarize(y, f"output {i}" if len(ys) > 1 else "output"))
    if a.output:
        np.save(a.output, ys[0])
        print(f"wrote {a.output}")
    if a.repeat > 0:
        times = model.time(*xs, number=a.number, repeat=a.repeat)
        print(f"latency ({model.device}): {time_summary(times)}, {a.number} run(s) each")
    return 0


def cmd_inspect(a) -> int:
    from escort_tvm.report import format_report

    from tvm import relax

    from relay_passes import rewrite_sparse_convs
    from relay_passes.sparse_conv_rewrite import conv_weight_names

    from escort_tvm.compiler import bind_params

    target = parse_target(a.target)
    if a.tuning_log is not None and not Path(a.tuning_log).is_file():
        raise UserError(f"tuning log {a.tuning_log} does not exist")
    model, mod, params = load_model(a.model, parse_shapes(a.input_shape))
    names = conv_weight_names(mod["main"])
    bound, n_in = bind_params(mod, params)
    bound = relax.transform.FoldConstant()(bound)
    # The build's own planning (rewrite without compiling): the report is what `compile` would produce.
    log = None
    if a.tuning_log is not None:
        from escort_tvm.tuning_log import TuningLog

        log = TuningLog.load(a.tuning_log)
    _, report = rewrite_sparse_convs(bound, target, a.min_sparsity, None, names, kernel=a.kernel, tuning_log=log)
    if a.json:
        print(json.dumps({"model": str(a.model), "target": target.kind.name, "min_sparsity": a.min_sparsity,
                          "inputs": [[p.name, [int(d) for d in p.ty.shape], str(p.ty.dtype)]
                                     for p in list(mod["main"].params)[:n_in]],
                          "convs": [r.as_dict() for r in report]}, indent=1, default=list))
        return 0
    ops = {}
    for n in model.graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    print(f"model {a.model}: {len(model.graph.node)} nodes ({', '.join(f'{k} {v}' for k, v in sorted(ops.items()))})")
    for p in list(mod["main"].params)[:n_in]:
        print(f"input {p.name}: {'x'.join(str(int(d)) for d in p.ty.shape)} {p.ty.dtype}")
    total = sum(int(np.prod(r.weight_shape)) for r in report if r.weight_shape)
    nnz = sum(r.nnz or 0 for r in report)
    print(f"conv weights: {total} values, {nnz} nonzero (overall sparsity {1 - nnz / max(total, 1):.4f})")
    print(f"plan for target {target.kind.name}, min_sparsity {a.min_sparsity:g}:")
    print(format_report(report))
    return 0


def cmd_prune(a) -> int:
    import escort_tvm

    steps = Steps(1, a.quiet)
    with steps(f"pruning {a.model} to sparsity {a.sparsity:g}"):
        _, report = escort_tvm.prune(a.model, a.sparsity, scope="global" if a.global_scope else "layer",
                                     skip_first=not a.prune_first, skip_depthwise=not a.prune_depthwise,
                                     output=a.output)
    print(report.text())
    print(f"wrote {a.output}")
    return 0


def cmd_zoo(a) -> int:
    import onnx

    from escort_tvm import zoo

    steps = Steps(1, a.quiet)
    with steps(f"making {a.name} (batch {a.batch}, {a.image_size}x{a.image_size}, seed {a.seed})"):
        model = zoo.build(a.name, a.batch, a.image_size, a.sparsity, a.seed, a.num_classes, grouped=a.grouped)
        Path(a.output).parent.mkdir(parents=True, exist_ok=True)
        onnx.save(model, a.output)
    convs = sum(n.op_type == "Conv" for n in model.graph.node)
    n_params = sum(int(np.prod(t.dims)) for t in model.graph.initializer)
    sp = "dense" if a.sparsity is None else f"convs pruned to {a.sparsity:g} (first conv dense)"
    print(f"wrote {a.output}: {a.name}{' (two-tower)' if a.grouped else ''}, {convs} convs, "
          f"{n_params / 1e6:.1f} M parameters, {sp}, input 'input' {a.batch}x3x{a.image_size}x{a.image_size}")
    return 0


def cmd_bench(a) -> int:
    from .endtoend import compare

    res = compare(a.model, target=parse_target(a.target), shapes=parse_shapes(a.input_shape),
                  min_sparsity=a.min_sparsity, tuning_log=a.tuning_log, number=a.number, repeat=a.repeat,
                  seed=a.seed, torch=not a.no_torch, steps=Steps(5, a.quiet), kernel=a.kernel)
    print(res.text(report=not a.no_report))
    if a.json:
        Path(a.json).write_text(json.dumps(res.as_dict(), indent=1))
        print(f"wrote {a.json}")
    return 0 if res.ok else 1


# ---------------------------------------------------------------------------- parser
def _nonneg_int(s):
    v = int(s)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {s}")
    return v


def _nonneg_float(s):
    v = float(s)
    if not v >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {s}")
    return v


def _sparsity(s):
    v = float(s)
    if not 0.0 <= v < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {s}")
    return v


def _pos_int(s):
    v = int(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {s}")
    return v


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .zoo import NAMES

    KERNELS = ("auto", "sparse", "specialized", "dense")  # relay_passes.kernel_choice.KERNELS (not imported: the
    # parser must not load the compiler, `run` works with the TVM runtime alone)

    ap = argparse.ArgumentParser(
        prog=PROG, description="Compile pruned CNNs (ONNX) with TVM so that their pruned convolutions run as "
                               "sparse direct convolutions (Escort).",
        epilog="Run 'escort-tvm COMMAND --help' for a command's options. Example:\n"
               "  escort-tvm zoo resnet50 --sparsity 0.9 -o r50.onnx\n"
               "  escort-tvm inspect r50.onnx\n"
               "  escort-tvm compile r50.onnx -o r50.so --target llvm\n"
               "  escort-tvm run r50.so --repeat 10",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    common.add_argument("--traceback", action="store_true", help="on error, show the Python traceback")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def model_opts(p, with_min=True):
        p.add_argument("--target", default=None,
                       help='llvm (CPU), cuda, or a JSON target such as \'{"kind": "cuda", "arch": "sm_80"}\'; '
                            "default: cuda if a GPU is visible, else llvm")
        p.add_argument("--input-shape", action="append", metavar="NAME:DIMS",
                       help="static shape for an input with a dynamic or missing one, e.g. input:1x3x224x224 "
                            "(repeatable)")
        if with_min:
            p.add_argument("--min-sparsity", type=_nonneg_float, default=0.7, metavar="F",
                           help="rewrite a conv when at least this fraction of its weights is zero (default 0.7; "
                                "above 1 keeps every conv dense)")
            p.add_argument("--kernel", choices=KERNELS, default="auto",
                           help="kernel for pruned convs: auto (a tuning log's fastest, else a cost rule), sparse "
                                "(CSR), specialized (weights compiled into the code), dense (default auto)")

    p = sub.add_parser("compile", parents=[common], help="compile an ONNX model into a deployable .so",
                       description="Compile an ONNX model: pruned convs become sparse kernels, the rest is TVM's "
                                   "dense code. Writes one .so that needs only the TVM runtime.")
    p.add_argument("model", metavar="MODEL.onnx")
    p.add_argument("-o", "--output", required=True, metavar="OUT.so")
    model_opts(p)
    p.add_argument("--tuning-log", metavar="FILE", help="knob settings from a tuning run (JSON lines)")
    p.add_argument("--specialized-budget", type=_nonneg_int, metavar="N",
                   help="nonzeros the build may compile into specialised kernels (default 2^22: all of a 90%%-pruned "
                        "ResNet-50, 13-22 minutes on 2 cores at batch 32; 2^20 builds it in 3.5)")
    p.add_argument("--jobs", type=_pos_int, metavar="N",
                   help="specialised kernels compiled side by side (default: one per core, as memory allows)")
    p.set_defaults(func=cmd_compile)

    p = sub.add_parser("run", parents=[common], help="run a compiled .so and time it",
                       description="Load a .so written by 'compile' (only the TVM runtime is needed), run it once, "
                                   "print a summary of the output, then time it.")
    p.add_argument("model", metavar="MODEL.so")
    p.add_argument("--input", action="append", metavar="[NAME=]FILE.npy",
                   help="input array (repeat for several inputs); default: random normal")
    p.add_argument("--seed", type=int, default=0, help="seed of the random input (default 0)")
    p.add_argument("--output", metavar="FILE.npy", help="save the (first) output there")
    p.add_argument("--device", default=None, help="cpu or cuda[:N] (default: what the model was built for)")
    p.add_argument("--repeat", type=int, default=10, metavar="N", help="timed measurements (default 10; 0: no timing)")
    p.add_argument("--number", type=_pos_int, default=3, metavar="N", help="runs per measurement (default 3)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("inspect", parents=[common], help="show each conv's shape, sparsity, and what compile would do",
                       description="Per conv: shapes, sparsity, and whether compile would rewrite it to the sparse "
                                   "kernel and why (the build's own planning, without compiling).")
    p.add_argument("model", metavar="MODEL.onnx")
    model_opts(p)
    p.add_argument("--tuning-log", metavar="FILE", help="knob settings from a tuning run (JSON lines)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("prune", parents=[common], help="magnitude-prune an ONNX model's conv weights",
                       description="Unstructured magnitude pruning of conv weights (initializers). The first conv "
                                   "and depthwise convs are left dense unless asked.")
    p.add_argument("model", metavar="MODEL.onnx")
    p.add_argument("-o", "--output", required=True, metavar="OUT.onnx")
    p.add_argument("--sparsity", type=_sparsity, required=True, metavar="F", help="target fraction of zeros, in [0, 1)")
    p.add_argument("--global", dest="global_scope", action="store_true",
                   help="one magnitude threshold over all pruned convs (default: each conv to the target)")
    p.add_argument("--prune-first", action="store_true", help="prune the first conv too")
    p.add_argument("--prune-depthwise", action="store_true", help="prune depthwise convs too")
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("zoo", parents=[common], help="export a seeded AlexNet/VGG-16/ResNet-50/GoogLeNet as ONNX",
                       description="Write one of the Escort paper's networks as ONNX, with generated seeded weights "
                                   "named as in torchvision (no downloads).")
    p.add_argument("name", choices=NAMES)
    p.add_argument("-o", "--output", required=True, metavar="OUT.onnx")
    p.add_argument("--batch", type=_pos_int, default=1)
    p.add_argument("--image-size", type=_pos_int, default=224)
    p.add_argument("--sparsity", type=_sparsity, default=None, metavar="F",
                   help="prune the convs (but the first) to this sparsity (default: dense)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-classes", type=_pos_int, default=1000)
    p.add_argument("--grouped", action="store_true", help="alexnet only: the original two-tower form (groups=2)")
    p.set_defaults(func=cmd_zoo)

    p = sub.add_parser("bench", parents=[common], help="end-to-end latency: our build vs TVM's dense build",
                       description="Build the model twice (sparse rewrite on, and TVM's dense build with it off), "
                                   "check that both agree (and with onnxruntime on CPU), time both; with PyTorch "
                                   "and torchvision installed, a zoo model is also run as torchvision's model "
                                   "with the same weights (cuDNN fp32, TF32 off).")
    p.add_argument("model", metavar="MODEL.onnx")
    model_opts(p)
    p.add_argument("--tuning-log", metavar="FILE")
    p.add_argument("--repeat", type=_pos_int, default=10, metavar="N", help="timed measurements (default 10)")
    p.add_argument("--number", type=_pos_int, default=3, metavar="N", help="runs per measurement (default 3)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random input")
    p.add_argument("--no-torch", action="store_true", help="do not try PyTorch")
    p.add_argument("--no-report", action="store_true", help="do not print the per-conv report")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    p.set_defaults(func=cmd_bench)
    return ap


def _one_line(e: BaseException) -> str:
    msg = str(e).strip() or type(e).__name__
    lines = [ln.strip() for ln in msg.splitlines() if ln.strip()]
    return lines[-1] if len(lines) > 1 and lines[-1] else (lines[0] if lines else msg)


def main(argv=None) -> int:
    ap = build_parser()
    a = ap.parse_args(argv)
    try:
        return a.func(a)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001  (one line for the user; --traceback for the details)
        if a.traceback:
            raise
        user = isinstance(e, (UserError, ValueError, TypeError, FileNotFoundError, OSError, RuntimeError))
        kind = "error" if user else f"internal error ({type(e).__name__}; run with --traceback for details)"
        print(f"{PROG}: {kind}: {_one_line(e)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
