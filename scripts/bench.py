#!/usr/bin/env python3
"""Benchmark the sparse direct-convolution CUDA kernels against dense and lowering baselines.

Built here, timed on the GPU machine (which has PyTorch but only TVM's runtime). One prepared folder per
batch keeps each within one device call's carry (64 MiB with .devbundle's ~24 MB):

    python scripts/bench.py prepare --batches 1 --bench-dir .gpu/bench_b1 --variants 4 [--spec-variants ...]
    python scripts/bench.py prepare --batches 32 --bench-dir .gpu/bench_b32 --variants 4
    # GPU machine, carry [".devbundle", ".gpu/bench_b1"] (then the same with bench_b32):
    source .devbundle/activate && python3 scripts/bench.py measure --bench-dir .gpu/bench_b1 --out $OUT
    python scripts/bench.py merge out_b1/ out_b32/ --out docs/bench                  # one report
    python scripts/bench.py check                                                  # self-check, no GPU

``prepare`` makes a seeded random weight per (layer, sparsity), prunes it by magnitude, and builds our two
kernels for every case: the CSR kernel (``schedules.SparseConvCUDA``), one per knob variant, compiled all
at once into ``kernels.so`` (sm_90 fatbin); and, where the layer has at most MAX_NONZEROS nonzeros, the
kernel specialised to the weights (``schedules.SpecializedCUDA``: default knobs and one-knob changes of
them, ``--spec-variants``), each compiled in a ``tvm.compile`` of its own (in child processes, ``--jobs``
at a time, through a content-keyed cache, ``--spec-cache``), recording its compile seconds, code size and
ptxas report, exported and carried as ``spec_<symbol>.so.xz``. It also compiles TVM's own dense conv2d
(Relax, default dlight pipeline) for every shape into ``dense.so``, and writes ``manifest.json``, the
weights (``weights_<g>.npz``: the dense pruned weight, the bias and every CSR kernel weight array, shared by
the cases and variants that use them) and the kernels' nvcc resource usage (``resources.txt``;
``kernels.cu``/``kernels.cubin`` of the CSR kernels too).

``measure`` imports neither ``tvm.relax`` nor ``escort_tvm.compiler``: it loads the libraries with the TVM
runtime, makes the inputs with torch, checks every kernel variant against a float64 ``F.conv2d`` on the
dense pruned weight (output poisoned with NaN first), times the passing ones and the baselines of
``../shared/anchors/measure_anchors.py`` in the same process, and writes ``bench.json``, ``bench.md`` and
``speedup.png`` under ``--out``: per layer the CSR kernel (+ the pad op it needs), the specialised kernel
(which pads on chip, or with ``pad_input`` reads the graph's padded input: + that pad op), the best of the two,
and issue 3's targets checked on the best. The timed work runs
in a child process; a CUDA error that kills the context is recorded as a crash of that kernel and the run
continues in a fresh child. ``merge`` makes one report of several runs' ``bench.json``.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from scripts import first_input  # noqa: E402  (the kernels' first-argument layout, shared with the other script)

# The anchor layers (../shared/anchors/measure_anchors.py): name -> (C, K, H, W, R, stride, pad).
LAYERS = {
    "alexnet.conv2": (64, 192, 27, 27, 5, 1, 2),
    "alexnet.conv3": (192, 384, 13, 13, 3, 1, 1),
    "alexnet.conv4": (384, 256, 13, 13, 3, 1, 1),
    "alexnet.conv5": (256, 256, 13, 13, 3, 1, 1),
    "vgg16.conv1_2": (64, 64, 224, 224, 3, 1, 1),
    "vgg16.conv2_2": (128, 128, 112, 112, 3, 1, 1),
    "vgg16.conv3_2": (256, 256, 56, 56, 3, 1, 1),
    "vgg16.conv4_2": (512, 512, 28, 28, 3, 1, 1),
    "vgg16.conv5_2": (512, 512, 14, 14, 3, 1, 1),
    "resnet50.l1.3x3": (64, 64, 56, 56, 3, 1, 1),
    "resnet50.l2.3x3": (128, 128, 28, 28, 3, 1, 1),
    "resnet50.l3.3x3": (256, 256, 14, 14, 3, 1, 1),
    "resnet50.l4.3x3": (512, 512, 7, 7, 3, 1, 1),
    "resnet50.l1.1x1in": (256, 64, 56, 56, 1, 1, 0),
    "resnet50.l3.1x1out": (256, 1024, 14, 14, 1, 1, 0),
    "resnet50.l4.1x1in": (2048, 512, 7, 7, 1, 1, 0),
}
MAIN_SPARSITY = 0.9
BATCHES = (1, 32)
SWEEP_LAYERS = ("vgg16.conv3_2", "resnet50.l3.3x3")
SWEEP_SPARSITIES = (0.7, 0.8, 0.9, 0.95)
SWEEP_BATCH = 32
QUICK_LAYER = "resnet50.l1.3x3"
# `check`: two small cases with few nonzeros (name -> layer tuple, batch, sparsity).
CHECK_LAYERS = {"check.3x3": (16, 24, 12, 12, 3, 1, 1), "check.1x1s2": (32, 16, 9, 9, 1, 2, 0)}
CHECK_CASES = (("check.3x3", 1, 0.9), ("check.1x1s2", 3, 0.95))

FP32_PEAK = 67e12  # H200 SXM non-tensor fp32, datasheet (as in measure_anchors.py)
BW = 4.3e12  # measured device-to-device copy on the workplace's H200 (as in measure_anchors.py)
TARGET = {"kind": "cuda", "arch": "sm_90"}
DEFAULT_BENCH_DIR = ROOT / ".gpu" / "bench"
SIZE_WARN_MB = 38.0  # .devbundle (~24 MB) + the working tree (~2 MB) + one bench dir must fit one 64 MiB carry
TOL_FP32 = 1e-4
TOL_REDUCED = 1e-2  # TF32 and fp16 baselines: 10-bit mantissas give ~1e-3 relative error here
# cudnn_tf32_tuned: the same TF32 conv with torch.backends.cudnn.benchmark on (cuDNN tries its algorithms on the
# first call of a shape and keeps the fastest), as a user who sets it gets; the issue's targets use the default.
BASELINES = ("cudnn_fp32", "cudnn_tf32", "cudnn_tf32_tuned", "cudnn_fp16", "im2col_cublas", "im2col_cusparse",
             "tvm_dense")
BASELINE_TITLES = {"cudnn_fp32": "cuDNN fp32", "cudnn_tf32": "cuDNN TF32", "cudnn_tf32_tuned": "cuDNN TF32 (benchmark)",
                   "cudnn_fp16": "cuDNN fp16", "im2col_cublas": "im2col+cuBLAS", "im2col_cusparse": "im2col+cuSPARSE",
                   "tvm_dense": "TVM dense"}
SPEEDUP_VS = ("cudnn_fp32", "cudnn_tf32", "cudnn_tf32_tuned", "im2col_cublas", "im2col_cusparse")
MEASURE_CMD = "source .devbundle/activate && python3 scripts/bench.py measure --out $OUT"
# kernel kind -> record parts: variant prefix, final timing, back-to-back timing ("csr": the register-tiled CSR
# kernel, schedules.SparseConvCUDA; "spec": the kernel specialised to the weights, schedules.SpecializedCUDA)
FAMILY_PARTS = {"csr": ("v", "final", "stream"), "spec": ("s", "sfinal", "sstream")}
FAMILY_TITLES = {"csr": "CSR", "spec": "specialized"}


# ====================================================================== shared helpers (no TVM, no torch)
def log(msg: str) -> None:
    print(msg, flush=True)


def make_cases(layers, batches, sweep: bool = True, table=LAYERS) -> list[dict]:
    """The benchmark cases in run order: every layer at 90% for each batch, then the sparsity sweep."""
    cases, seen = [], set()

    def add(layer, batch, sp, group):
        if (layer, batch, sp) in seen:
            return
        seen.add((layer, batch, sp))
        C, K, H, W, R, s, p = table[layer]
        cases.append({"layer": layer, "batch": int(batch), "sparsity": float(sp), "group": group,
                      "conv": {"C": C, "K": K, "H": H, "W": W, "R": R, "stride": s, "pad": p}})

    for b in batches:
        for layer in layers:
            add(layer, b, MAIN_SPARSITY, "main")
    if sweep and SWEEP_BATCH in batches:
        for sp in SWEEP_SPARSITIES:
            for layer in SWEEP_LAYERS:
                if layer in layers:
                    add(layer, SWEEP_BATCH, sp, "sweep")
    return cases


def floor_ms(spec: dict, nnz: int) -> float:
    """measure_anchors.py's roofline floor of the sparse work (fp32 flops or bytes, whichever is larger)."""
    N, C, H, W, K = spec["N"], spec["C"], spec["H"], spec["W"], spec["K"]
    OH, OW = out_hw(spec)
    flops = 2.0 * nnz * OH * OW * N
    bytes_ = 4.0 * (N * C * H * W + N * K * OH * OW + 2 * nnz)
    return max(flops / FP32_PEAK, bytes_ / BW) * 1e3


def out_hw(spec: dict) -> tuple[int, int]:
    pt, pl, pb, pr = spec["pad"]
    (sh, sw), (dh, dw) = spec["stride"], spec["dilation"]
    OH = (spec["H"] + pt + pb - dh * (spec["KH"] - 1) - 1) // sh + 1
    OW = (spec["W"] + pl + pr - dw * (spec["KW"] - 1) - 1) // sw + 1
    return OH, OW


def geomean(vals):
    vals = [v for v in vals if v is not None and v > 0 and math.isfinite(v)]
    return math.exp(sum(math.log(v) for v in vals) / len(vals)) if vals else None


def read_records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut short by a crash
                pass
    return out


def append_record(path: Path, rec: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(rec) + "\n")
        f.flush()
        os.fsync(f.fileno())


def short_error(e: BaseException, limit: int = 400) -> str:
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    msg = f"{type(e).__name__}: " + (lines[-1] if lines else "")
    return msg[:limit]


def git_info() -> dict:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                    capture_output=True, text=True).stdout.strip())
        return {"commit": sha, "dirty": dirty}
    except OSError:
        return {}


# ====================================================================== prepare (here: TVM compiler + nvcc)
def knob_variants(rule, spec, weight, how: str, seed: int) -> list:
    """The default knobs first, then alternatives: ``all`` valid settings, N in total (one-knob neighbours
    of the default, nearest values first and round-robin over knobs, then seeded random ones), or a list of
    changes of the default (``default,nonzero_split=2,nonzero_split=2+unroll=8``: each entry sets knobs by
    name; an invalid or repeated setting is left out)."""
    import numpy as np

    default = rule.default_knobs(spec, weight)
    if how == "default":
        return [default]
    cls = type(default)
    if "=" in how:
        return _listed_variants(default, how)

    def valid(k):
        try:
            k.validate()
            return True
        except ValueError:
            return False

    if how == "all":
        return [default] + [k for k in cls.space() if k != default and valid(k)]
    n = int(how)
    if n < 1:
        raise ValueError("--variants N needs N >= 1")
    out, seen = [default], {default}
    d = default.as_dict()
    per_knob = []
    for name, cands in cls.SPACE.items():
        cands = list(cands)
        i = cands.index(d[name]) if d[name] in cands else 0
        order = sorted((v for v in cands if v != d[name]), key=lambda v: (abs(cands.index(v) - i), cands.index(v)))
        per_knob.append([default.with_(**{name: v}) for v in order])
    for r in range(max((len(p) for p in per_knob), default=0)):
        for p in per_knob:
            if r < len(p) and p[r] not in seen and valid(p[r]):
                seen.add(p[r])
                out.append(p[r])
    out = out[:n]
    if len(out) < n:
        space = [k for k in cls.space() if k not in seen and valid(k)]
        rng = np.random.default_rng(seed)
        for j in rng.permutation(len(space))[: n - len(out)]:
            out.append(space[int(j)])
    return out


def _listed_variants(default, how: str) -> list:
    out = [default]
    for entry in [e.strip() for e in how.split(",") if e.strip() and e.strip() != "default"]:
        changes = {}
        for step in entry.split("+"):
            name, sep, value = step.partition("=")
            if not sep or name not in type(default).SPACE:
                raise ValueError(f"variant {entry!r}: {step!r} is not knob=value for a knob of "
                                 f"{type(default).__name__} ({', '.join(type(default).SPACE)})")
            cands = type(default).SPACE[name]
            changes[name] = next((c for c in cands if str(c) == value), None)
            if changes[name] is None:
                raise ValueError(f"variant {entry!r}: {name}={value} is not one of {cands}")
        knobs = default.with_(**changes)
        try:
            knobs.validate()
        except ValueError:
            continue
        if knobs not in out:
            out.append(knobs)
    return out


def _signature(func) -> list:
    return [[str(p.name), [int(d) for d in p.ty.shape], str(p.ty.dtype)] for p in func.params]


def _array_key(a) -> str:
    h = hashlib.sha1()
    h.update(str(a.dtype).encode() + str(a.shape).encode())
    h.update(a.tobytes())
    return "a_" + h.hexdigest()[:16]


def _all_modules(mod):
    yield mod
    for m in mod.imports:
        yield from _all_modules(m)


def cuda_source(executable) -> str:
    return "".join(m.inspect_source() for m in _all_modules(executable.mod) if m.kind == "cuda")


def _compile(funcs: dict, target):
    import tvm

    with target:
        return tvm.compile(tvm.IRModule(funcs), target=target)


def nvcc_flags(fmt: str, arch: str) -> list[str]:
    """TVM's own nvcc command line (tvm.support.nvcc._compile_cuda_nvcc, nvcc mode) for ``fmt`` up to ``-o``."""
    try:
        from tvm.support.nvcc import _ptxas_option_flags  # what TVM passes itself (private: fall back)

        ptxas = _ptxas_option_flags()
    except Exception:
        ptxas = ["-v", "--register-usage-level=10", "--warn-on-local-memory-usage"]
    if "-v" not in ptxas:
        ptxas = ["-v", *ptxas]
    fast_math = [] if os.environ.get("TVM_CUDA_NVCC_NO_FAST_MATH") else ["--use_fast_math"]
    sm = arch[3:] if arch.startswith("sm_") else arch
    return ["nvcc", f"--{fmt}", "-O3", "-gencode", f"arch=compute_{sm},code=sm_{sm}", "-U__CUDA_NO_HALF_OPERATORS__",
            "-U__CUDA_NO_HALF_CONVERSIONS__", "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
            "-U__CUDA_NO_BFLOAT162_OPERATORS__", "-U__CUDA_NO_BFLOAT162_CONVERSIONS__", "--expt-relaxed-constexpr",
            "--expt-extended-lambda", *fast_math, f"--ptxas-options={','.join(ptxas)}"]


def parse_ptxas(text: str) -> dict:
    """ptxas -v's report per entry function: registers, spills, stack, smem, barriers, cmem[0]."""
    res, cur = {}, None
    for line in text.splitlines():
        m = re.search(r"(?:Compiling entry function|Function properties for) '?([A-Za-z_]\w*)'?", line)
        if m:
            cur = m.group(1)
            res.setdefault(cur, {})
            continue
        if cur is None:
            continue
        r = res[cur]
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            r.update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        for key, pat in (("registers", r"Used (\d+) registers"), ("barriers", r"used (\d+) barriers"),
                         ("smem", r"(\d+) bytes smem"), ("cmem0", r"(\d+) bytes cmem\[0\]")):
            m = re.search(pat, line)
            if m:
                r[key] = int(m.group(1))
    return res


def nvcc_resources(source: str, workdir: Path) -> tuple[dict, str]:
    """Compile the kernels' CUDA source to a cubin with TVM's nvcc flags plus -Xptxas -v; parse ptxas' report."""
    cu, cubin = workdir / "kernels.cu", workdir / "kernels.cubin"
    cu.write_text(source)
    cmd = nvcc_flags("cubin", TARGET["arch"]) + ["-o", str(cubin), str(cu)]
    p = subprocess.run(cmd, capture_output=True, text=True)
    text = p.stdout + p.stderr
    if p.returncode != 0:
        raise RuntimeError(f"nvcc failed on the kernels' source:\n{text[-3000:]}")
    return parse_ptxas(text), " ".join(cmd[:-3] + ["-o", "kernels.cubin", "kernels.cu"])


def elf_section_sizes(data: bytes) -> dict[str, int]:
    """Section name -> size of a 64-bit little-endian ELF (a cubin): ``.text.<kernel>`` is the kernel's SASS."""
    import struct

    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ValueError("not a 64-bit little-endian ELF file")
    shoff = struct.unpack_from("<Q", data, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    secs = [struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize) for i in range(shnum)]
    strtab = secs[shstrndx][4]

    def name(off):
        start = strtab + off
        return data[start:data.index(b"\0", start)].decode(errors="replace")

    return {name(s[0]): int(s[5]) for s in secs}


class NvccCapture:
    """Within ``with``, TVM's CUDA compile callback runs TVM's own nvcc command (same flags, fatbin) with
    ``--keep``, and records per compile what TVM discards: the ptxas report, the PTX, the cubin's size and
    section sizes, and nvcc's wall and CPU seconds (``self.compiles``)."""

    NAME = "tvm_callback_cuda_compile"

    def __init__(self, arch: str | None = None):
        self.arch = arch
        self.compiles: list[dict] = []

    def __enter__(self):
        import tvm_ffi

        self._orig = tvm_ffi.get_global_func(self.NAME)
        tvm_ffi.register_global_func(self.NAME, self._compile, override=True)
        return self

    def __exit__(self, *exc):
        import tvm_ffi

        tvm_ffi.register_global_func(self.NAME, self._orig, override=True)
        return False

    def _compile(self, code):
        import resource

        arch = self.arch
        if arch is None:
            import tvm

            arch = str(tvm.target.Target.current().attrs["arch"])
        with tempfile.TemporaryDirectory(prefix="escort-nvcc-") as td:
            cu, fatbin = Path(td) / "k.cu", Path(td) / "k.fatbin"
            cu.write_text(code)
            cmd = nvcc_flags("fatbin", arch) + ["--keep", f"--keep-dir={td}", "-o", str(fatbin), str(cu)]
            r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
            t0 = time.perf_counter()
            p = subprocess.run(cmd, capture_output=True, text=True)
            wall = time.perf_counter() - t0
            r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
            if p.returncode != 0:
                raise RuntimeError(f"nvcc failed:\n{(p.stdout + p.stderr)[-3000:]}")
            data = fatbin.read_bytes()
            cubin = next(Path(td).glob("*.cubin"), None)
            cub = cubin.read_bytes() if cubin else b""
            ptx = next(Path(td).glob("*.ptx"), None)
            self.compiles.append({
                "nvcc_s": wall, "nvcc_cpu_s": (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime),
                "report": p.stdout + p.stderr, "resources": parse_ptxas(p.stdout + p.stderr),
                "fatbin_bytes": len(data), "cubin_bytes": len(cub),
                "sections": elf_section_sizes(cub) if cub else {}, "ptx": ptx.read_text() if ptx else "",
                "source_bytes": len(code.encode()), "command": " ".join(cmd[:-5])})
        return bytearray(data)


# ---------------------------------------------------------------------- specialised kernels, one module each
SPEC_VARIANTS = "default,cpt_x2,cpt_half,prefetch_flip"
# name -> (knob, change from the default); every variant differs from the default in one knob
SPEC_CHANGES = {
    "cpt_x2": ("channels_per_thread", lambda v: v * 2), "cpt_half": ("channels_per_thread", lambda v: v // 2),
    "stage_flip": ("stage_input", lambda v: not v), "prefetch_flip": ("prefetch", lambda v: not v),
    "no_split": ("channel_split", lambda v: 1), "split_x2": ("channel_split", lambda v: v * 2),
    "split_half": ("channel_split", lambda v: max(1, v // 2)),
    "rows_2": ("rows_per_thread", lambda v: 2), "rows_4": ("rows_per_thread", lambda v: 4),
    "order_flip": ("group_major", lambda v: not v),
    "ib_2": ("images_per_block", lambda v: 2), "ib_4": ("images_per_block", lambda v: 4),
    "tx_x2": ("threads_x", lambda v: v * 2), "tx_half": ("threads_x", lambda v: v // 2),
    "ty_x2": ("threads_y", lambda v: v * 2), "ty_half": ("threads_y", lambda v: v // 2),
    "chunk_x2": ("channel_chunk", lambda v: v * 2), "chunk_half": ("channel_chunk", lambda v: v // 2),
    "tb_2": ("tiles_per_block", lambda v: 2), "tb_4": ("tiles_per_block", lambda v: 4),
    "staged": ("stage_input", lambda v: True),
    "ip_2": ("input_parts", lambda v: 2), "ip_4": ("input_parts", lambda v: 4), "ip_8": ("input_parts", lambda v: 8),
    "sm_affine": ("sm_affine", lambda v: True), "pad_on_chip": ("pad_on_chip", lambda v: True),
    "pad_input": ("pad_input", lambda v: not v),
    "image_tile_flip": ("image_tile", lambda v: not v), "span_flip": ("span_images", lambda v: not v),
    "px_2": ("pixels_per_thread", lambda v: 2), "px_4": ("pixels_per_thread", lambda v: 4),
    "evict_first": ("evict_first", lambda v: not v), "rotate": ("rotate_chunks", lambda v: not v),
}
DEFAULT_SPEC_CACHE = ROOT / ".gpu" / "spec-cache"
GLOBAL_FN = r"__global__\s+void\s+(?:__launch_bounds__\(\s*\d+\s*\)\s+)?(\w+)\s*\("


def specialized_variants(default, names: str, layouts: dict | None = None) -> list[dict]:
    """``[{name, knobs, reason}]``: the default knobs, then each named change of them (one SPEC_CHANGES entry or
    ``knob=value``, or several joined by '+', applied in turn); a change that leaves the knob space or repeats an
    earlier setting gets ``knobs=None`` and the reason. A name may start from one of ``layouts`` (name -> knobs: another
    whole layout the rule derives, e.g. ``span`` = ``SpecializedCUDA.span_knobs``) instead of the default."""
    out, seen = [], {}
    layouts = layouts or {}
    for name in [n.strip() for n in names.split(",") if n.strip()]:
        knobs, reason = default, None
        steps = [] if name == "default" else name.split("+")
        if steps and steps[0] in layouts:
            knobs, steps = layouts[steps[0]], steps[1:]
        for step in steps:
            if "=" in step:  # knob=value sets a knob outright
                field, _, text = step.partition("=")
                cands = type(default).SPACE.get(field)
                value = next((c for c in cands or () if str(c) == text), None)
                if value is None:
                    raise ValueError(f"specialised variant step {step!r}: not knob=value with a knob of "
                                     f"{type(default).__name__} and one of its values")
                knobs = knobs.with_(**{field: value})
                continue
            if step not in SPEC_CHANGES:
                raise ValueError(f"unknown specialised variant {step!r}; known: default, {', '.join(SPEC_CHANGES)}"
                                 + (f"; layouts (first step only): {', '.join(layouts)}" if layouts else ""))
            field, change = SPEC_CHANGES[step]
            value = change(getattr(knobs, field))
            if value not in type(default).SPACE[field]:
                knobs, reason = None, f"{field}={value} is outside {type(default).__name__}.SPACE"
                break
            knobs = knobs.with_(**{field: value})
        if knobs is not None and knobs in seen:
            knobs, reason = None, f"same knobs as {seen[knobs]}"
        if knobs is not None:
            seen[knobs] = name
        out.append({"name": name, "knobs": knobs, "reason": reason})
    if not out or out[0]["name"] != "default":
        raise ValueError("the specialised variants must start with 'default'")
    return out


_NVCC_VERSION = None


def _nvcc_version() -> str:
    global _NVCC_VERSION
    if _NVCC_VERSION is None:
        p = subprocess.run(["nvcc", "--version"], capture_output=True, text=True)
        _NVCC_VERSION = p.stdout.strip().splitlines()[-1] if p.returncode == 0 and p.stdout.strip() else "?"
    return _NVCC_VERSION


def tir_sha(func) -> str:
    """Hash of a PrimFunc's TVMScript: the whole kernel, its weights and inline PTX included."""
    return hashlib.sha1(func.script().encode()).hexdigest()


def spec_cache_key(tir: str, target: dict) -> str:
    """Content hash of one specialised kernel build: its TIR (``tir_sha``), the target, TVM, nvcc and its flags.

    Keyed on what is compiled rather than on the sources that rendered it, so an edit to the schedule
    rebuilds only the kernels whose code it changes."""
    import tvm

    h = hashlib.sha1()
    h.update(json.dumps({"tir": tir, "target": target, "tvm": getattr(tvm, "__version__", "?"),
                         "nvcc": _nvcc_version(), "flags": nvcc_flags("fatbin", target["arch"])},
                        sort_keys=True, default=str).encode())
    return h.hexdigest()[:20]


def _entry_params(source: str, kernel: str) -> list[str]:
    m = re.search(r"__global__\s+void\s+(?:__launch_bounds__\(\s*\d+\s*\)\s+)?" + re.escape(kernel) + r"\s*\(([^)]*)\)\s*\{",
                  source)
    return [p.strip() for p in m.group(1).split(",")] if m else []


def ptx_global_loads(ptx: str) -> dict[str, int]:
    """Count of ``ld.global*`` instructions in PTX by their full opcode (``ld.global.nc.f32``, ...)."""
    out: dict[str, int] = {}
    for m in re.finditer(r"\b(ld\.global[\w.]*)\s", ptx):
        out[m.group(1)] = out.get(m.group(1), 0) + 1
    return out


def _part_of(name: str, kernel: str) -> bool:
    """Whether ``name`` is ``kernel`` or one of its parts (a large layer is cut into ``kernel``, ``kernel_1``...)."""
    return name == kernel or name.startswith(kernel + "_")


def _kernel_text_bytes(sections: dict, kernel: str) -> int | None:
    """SASS bytes of a specialised kernel: the .text of each of its parts."""
    sizes = [v for k, v in sections.items() if _part_of(k, f".text.{kernel}")]
    return sum(sizes) if sizes else None


def build_specialized(job: dict) -> dict:
    """Schedule, compile (a module of its own), export and xz one specialised kernel; return what it cost.

    Times: ``schedule_s`` (rule.apply: the unrolled program and its TIR), ``lower_s`` (TVM's lowering and
    CUDA codegen: tvm.compile minus nvcc), ``nvcc_s`` (nvcc, the same command TVM runs) and their sum
    ``compile_s``, wall seconds of this process; ``cpu_s`` the CPU seconds of this process and nvcc. Sizes:
    ``text_bytes`` (the kernel's SASS, ``.text.<kernel>`` of the cubin), ``cubin_bytes``, ``fatbin_bytes`` (what
    the .so embeds), ``so_bytes``, ``xz_bytes`` (the file carried to the GPU), ``source_bytes`` (CUDA C)."""
    import lzma

    import numpy as np
    import tvm

    from escort_tvm.compute import Epilogue
    from escort_tvm.conv_spec import ConvSpec
    from escort_tvm.cuda_toolchain import carries_gpu_binary, prepare_cuda_build
    from escort_tvm.sparse_format import SparseConvWeight
    from schedules import SpecializedCUDA
    from schedules.unrolled import program_stats, unrolled_program

    prepare_cuda_build()
    rule = SpecializedCUDA()
    spec = ConvSpec.from_dict(job["spec"])
    dense = np.load(job["weights"])[job.get("weight_key", "dense")]
    weight = SparseConvWeight.from_dense(dense, spec.groups)
    sym = job["symbol"]
    out = {"symbol": sym, "nnz": int(weight.nnz), "knobs": job["knobs"]}
    c0, t0 = time.process_time(), time.perf_counter()
    try:
        knobs = rule.Knobs.from_dict(job["knobs"])
        plan = rule.apply(spec, weight, Epilogue(**job["epilogue"]), knobs)
    except ValueError as e:
        return {**out, "status": "refused", "reason": str(e)}
    t_apply = time.perf_counter() - t0
    if job.get("tir_sha") and tir_sha(plan.func) != job["tir_sha"]:
        return {**out, "status": "error",
                "error": "the kernel's TIR differs from the one prepare hashed: the sources changed mid-run "
                         "(its cache key would lie)"}
    # the work-queue counters of sm_affine (int32) and the zero page of an unstaged padded conv (float32), zeroed
    workspace = [[int(a.shape[0]), str(a.dtype)] for a in plan.weight_arrays]
    if any(str(a.dtype) not in ("int32", "float32") or a.ndim != 1 or a.any() for a in plan.weight_arrays):
        raise RuntimeError(f"{rule.name} plan has weight arrays {[a.dtype for a in plan.weight_arrays]}; bench.py "
                           "passes (x, [zeroed int32 counters], [zero page], bias, y)")
    # x as the graph pass lays it out: NCHW, or x_pad[N, C*Hp*Wp] after the pad op it emits (pad_input)
    out["first_input"] = (first_input.describe(plan, spec) if plan.padded_input
                          else {"padded": False, "shape": list(spec.input_shape)})
    sig = _signature(plan.func)
    stats = program_stats(unrolled_program(weight, knobs.channels_per_thread))
    target = tvm.target.Target(job["target"])
    with NvccCapture(job["target"]["arch"]) as cap:
        t1 = time.perf_counter()
        ex = _compile({sym: plan.func.with_attr("global_symbol", sym)}, target)
        t_compile = time.perf_counter() - t1
    cpu = time.process_time() - c0 + sum(c["nvcc_cpu_s"] for c in cap.compiles)
    source = cuda_source(ex)
    kernel = f"{sym}_kernel"
    kernels = [k for k in re.findall(GLOBAL_FN, source) if _part_of(k, kernel)]
    if kernel not in kernels:
        raise RuntimeError(f"{sym} was not compiled as a GPU kernel")
    if len(cap.compiles) != 1:
        raise RuntimeError(f"expected one nvcc run, saw {len(cap.compiles)}")
    cc = cap.compiles[0]
    dest = Path(job["out"])
    with tempfile.TemporaryDirectory(prefix="escort-spec-") as td:
        so = Path(td) / "k.so"
        ex.export_library(str(so))
        if not carries_gpu_binary(so):
            raise RuntimeError("the exported .so carries no CUDA fatbin")
        raw = so.read_bytes()
        tmp = dest.with_name(dest.name + f".tmp-{os.getpid()}")
        tmp.write_bytes(lzma.compress(raw, preset=6))
        tmp.replace(dest)
    nvcc_s = sum(c["nvcc_s"] for c in cap.compiles)
    params = _entry_params(source, kernel)
    return {**out, "status": "ok", "params": sig, "program": stats, "workspace": workspace,
            "compile": {"schedule_s": round(t_apply, 2), "lower_s": round(t_compile - nvcc_s, 2),
                        "nvcc_s": round(nvcc_s, 2), "compile_s": round(t_apply + t_compile, 2), "cpu_s": round(cpu, 2)},
            "code": {"text_bytes": _kernel_text_bytes(cc["sections"], kernel), "kernels": len(kernels),
                     "cubin_bytes": cc["cubin_bytes"],
                     "fatbin_bytes": cc["fatbin_bytes"], "so_bytes": len(raw), "xz_bytes": dest.stat().st_size,
                     "source_bytes": cc["source_bytes"], "ptx_bytes": len(cc["ptx"].encode())},
            "resources": {k: r for k, r in cc["resources"].items() if _part_of(k, kernel)},
            "device_params": params, "ptx_global_loads": ptx_global_loads(cc["ptx"]),
            "nvcc_command": cc["command"], "ptxas_report": cc["report"][-2000:]}


def build_specialized_all(jobs: list[dict], cache_dir: Path, n_jobs: int = 1, timeout_s: float | None = None) -> list[dict]:
    """Run ``build_specialized`` for every job in child processes (``n_jobs`` at a time; default variants first,
    then fewest nonzeros first),
    through a content-keyed cache in ``cache_dir``; each job's .so.xz is copied to ``job['dest']``. A build
    that runs past ``timeout_s`` is killed and recorded as ``timeout`` (cached with that limit: a later run
    with a longer limit tries again). Returns the results in job order."""
    import concurrent.futures as cf

    cache_dir.mkdir(parents=True, exist_ok=True)
    results: list[dict | None] = [None] * len(jobs)
    t_all = time.time()
    done = [0]

    def finish(k, res):
        job = jobs[k]
        if res.get("status") == "ok":
            shutil.copyfile(cache_dir / f"{job['key']}.so.xz", job["dest"])
        results[k] = res
        done[0] += 1
        c = res.get("compile", {})
        what = (f"compile {c.get('compile_s', 0):.1f} s (schedule {c.get('schedule_s', 0):.1f}, lower "
                f"{c.get('lower_s', 0):.1f}, nvcc {c.get('nvcc_s', 0):.1f}), SASS {res['code']['text_bytes'] or 0:,} B"
                if res.get("status") == "ok" else f"{res.get('status')}: {res.get('reason') or res.get('error')}")
        log(f"  spec {done[0]}/{len(jobs)} {job['label']} nnz={res.get('nnz')}: "
            f"{'cached, ' if res.get('cached') else ''}{what} [{time.time() - t_all:.0f} s]")

    def run_one(k):
        job = jobs[k]
        meta, so = cache_dir / f"{job['key']}.json", cache_dir / f"{job['key']}.so.xz"
        if meta.exists():
            res = json.loads(meta.read_text())
            if res.get("status") == "refused" or (res.get("status") == "ok" and so.exists()) or (
                    res.get("status") == "timeout" and timeout_s is not None and res["timeout_s"] >= timeout_s):
                return dict(res, cached=True)
        jf = cache_dir / f"{job['key']}.job.json"
        jf.write_text(json.dumps(dict(job["build"], out=str(so))))
        t0 = time.time()
        # a session of its own, so a timeout ends the build's whole process group (python, nvcc, cicc, ptxas)
        proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "_spec_build", "--job", str(jf)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                                start_new_session=True)
        try:
            stdout, stderr = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.communicate()
            jf.unlink(missing_ok=True)
            res = {"status": "timeout", "timeout_s": timeout_s, "nnz": job.get("nnz"),
                   "reason": f"build (schedule + TVM lowering + nvcc) still running after {timeout_s:.0f} s "
                             f"(wall, {n_jobs} build(s) at a time): killed"}
            meta.write_text(json.dumps(res, indent=1))
            return res
        jf.unlink(missing_ok=True)
        try:
            res = json.loads(stdout.strip().splitlines()[-1])
        except (IndexError, json.JSONDecodeError):
            return {"status": "error", "error": f"exit {proc.returncode} after {time.time() - t0:.0f} s: "
                                                f"{(stderr or stdout)[-1500:]}"}
        if res.get("status") in ("ok", "refused"):
            tmp = meta.with_name(meta.name + f".tmp-{os.getpid()}")
            tmp.write_text(json.dumps(res, indent=1))
            tmp.replace(meta)
        return res

    order = sorted(range(len(jobs)), key=lambda k: (jobs[k].get("name") != "default", jobs[k].get("nnz") or 0, k))
    with cf.ThreadPoolExecutor(max_workers=max(1, n_jobs)) as pool:
        futs = {pool.submit(run_one, k): k for k in order}
        for f in cf.as_completed(futs):
            k = futs[f]
            try:
                res = f.result()
            except Exception as e:
                res = {"status": "error", "error": short_error(e)}
            finish(k, res)
    return results


def prepare(bench_dir: Path, cases: list[dict], variants: str = "default", max_kernels: int = 1000,
            command: str = "", spec_variants: str = SPEC_VARIANTS, spec_max_nnz: int | None = None,
            jobs: int = 1, spec_cache: Path | None = None, spec_timeout_s: float | None = None,
            spec_variant_nnz: int | None = None) -> dict:
    """Build everything the GPU side needs into ``bench_dir`` (replaced as a whole); returns the manifest.

    ``spec_variants``: the specialised kernel's variants (``default`` first, then names of SPEC_CHANGES; ``none``:
    no specialised kernels), built for every case with at most ``spec_max_nnz`` nonzeros (default: the rule's
    MAX_NONZEROS), each in a module of its own, ``jobs`` at a time, through the cache ``spec_cache``; above
    ``spec_variant_nnz`` nonzeros only the default variant is built (nvcc's time grows faster than linearly
    with the kernel's length)."""
    t_start = time.time()
    import numpy as np
    import tvm
    from tvm import relax

    from escort_tvm.compute import Epilogue
    from escort_tvm.conv_spec import ConvSpec
    from escort_tvm.cuda_toolchain import carries_gpu_binary, prepare_cuda_build
    from escort_tvm.models import magnitude_prune
    from escort_tvm.sparse_format import SparseConvWeight
    from schedules import SparseConvCUDA, SpecializedCUDA
    from schedules.cuda_specialized import MAX_NONZEROS

    prepare_cuda_build()
    target = tvm.target.Target(TARGET)
    rule = SparseConvCUDA()
    srule = SpecializedCUDA()
    spec_max_nnz = MAX_NONZEROS if spec_max_nnz is None else min(int(spec_max_nnz), MAX_NONZEROS)
    use_spec = spec_variants.strip().lower() not in ("", "none")
    spec_jobs: list[dict] = []
    bench_dir = Path(bench_dir)
    tmp = bench_dir.parent / f".{bench_dir.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)

    groups: dict[tuple, dict] = {}  # (layer, sparsity) -> weights group
    funcs, entries, dense_specs = {}, [], {}
    t_sched = time.time()
    for i, case in enumerate(cases):
        cv = case["conv"]
        spec = ConvSpec(N=case["batch"], C=cv["C"], H=cv["H"], W=cv["W"], K=cv["K"], KH=cv["R"], KW=cv["R"],
                        stride=(cv["stride"],) * 2, pad=(cv["pad"],) * 4)
        gkey = (case["layer"], case["sparsity"])
        if gkey not in groups:
            seed = zlib.crc32(f"{case['layer']}|{case['sparsity']}".encode())
            rng = np.random.default_rng(seed)
            dense = magnitude_prune(rng.standard_normal(spec.weight_shape, dtype=np.float32), case["sparsity"])
            bias = (rng.standard_normal(spec.K) * 0.1).astype(np.float32)
            groups[gkey] = {"file": f"weights_{len(groups)}.npz", "seed": seed, "arrays": {"dense": dense, "bias": bias},
                            "sparse": SparseConvWeight.from_dense(dense), "nnz": int(np.count_nonzero(dense))}
        g = groups[gkey]
        weight = g["sparse"]
        knobs_list = knob_variants(rule, spec, weight, variants, seed=g["seed"] + case["batch"])
        if len(funcs) + len(knobs_list) > max_kernels:
            raise RuntimeError(f"more than --max-kernels {max_kernels} kernels ({len(knobs_list)} variants for case "
                               f"{i} alone): ask for fewer variants, layers or batches")
        ventries = []
        for j, knobs in enumerate(knobs_list):
            sym = f"escort_bench_c{i}_v{j}"
            try:
                plan = rule.apply(spec, weight, Epilogue(relu=False), knobs)
                sig = _signature(plan.func)
                arrays = [np.ascontiguousarray(a) for a in plan.weight_arrays]
                want = ([None] + [[list(a.shape), str(a.dtype)] for a in arrays]
                        + [[[spec.K], "float32"], [list(spec.output_shape), "float32"]])
                if len(sig) != len(want) or any(w is not None and [s[1], s[2]] != w for s, w in zip(sig, want)):
                    raise RuntimeError(f"kernel parameters {sig} are not (first_input, *weight_arrays, bias[K], "
                                       f"y{list(spec.output_shape)})")
                layout = first_input.describe(plan, spec)
                if [sig[0][1], sig[0][2]] != [layout["shape"], "float32"]:
                    raise RuntimeError(f"first parameter {sig[0]} does not match prepare_input's {layout['shape']}")
            except Exception as e:
                if j == 0:
                    raise RuntimeError(f"case {i} ({case['layer']} N={spec.N}): default knobs failed: {e}") from e
                log(f"  case {i} variant {j} {knobs.as_dict()} skipped: {short_error(e)}")
                continue
            keys = []
            for a in arrays:
                k = _array_key(a)
                g["arrays"].setdefault(k, a)
                keys.append({"key": k, "shape": list(a.shape), "dtype": str(a.dtype)})
            funcs[sym] = plan.func.with_attr("global_symbol", sym)
            ventries.append({"index": j, "symbol": sym, "default": j == 0, "rule": plan.rule,
                             "knobs": {k: (v if isinstance(v, (int, float, str, bool)) else str(v))
                                       for k, v in knobs.as_dict().items()},
                             "first_input": layout, "arrays": keys, "params": sig})
        dkey = spec
        if dkey not in dense_specs:
            dense_specs[dkey] = f"dense_{len(dense_specs)}"
        entries.append({"index": i, "layer": case["layer"], "batch": spec.N, "sparsity": case["sparsity"],
                        "group": case["group"], "spec": spec.to_dict(), "nnz": g["nnz"],
                        "actual_sparsity": round(1.0 - g["nnz"] / float(np.prod(spec.weight_shape)), 6),
                        "weights": g["file"], "dense_key": "dense", "bias_key": "bias",
                        "dense_func": dense_specs[dkey], "variants": ventries})
        entries[-1]["floor_ms"] = floor_ms(entries[-1]["spec"], g["nnz"])
        sp_entry = {"rule": srule.name, "max_nnz": spec_max_nnz, "variants": [], "skipped": [], "reason": None}
        entries[-1]["specialized"] = sp_entry
        if not use_spec:
            sp_entry["reason"] = "not built (--spec-variants none)"
        elif g["nnz"] > MAX_NONZEROS:
            sp_entry["reason"] = f"{g['nnz']} nonzeros > {MAX_NONZEROS} (the rule's MAX_NONZEROS)"
        elif g["nnz"] > spec_max_nnz:
            sp_entry["reason"] = f"{g['nnz']} nonzeros > {spec_max_nnz} (--spec-max-nnz; the rule allows {MAX_NONZEROS})"
        else:
            if "spec_weights" not in g:
                g["spec_weights"] = tmp / f".spec_{Path(g['file']).stem}.npz"
                np.savez(g["spec_weights"], dense=g["arrays"]["dense"])
            epi = {"relu": False, "residual": False}
            layouts = {"span": srule.span_knobs(spec, weight), "tiles": srule.tile_knobs(spec, weight)}
            for j, sv in enumerate(specialized_variants(srule.default_knobs(spec, weight), spec_variants, layouts)):
                if sv["knobs"] is not None and j > 0 and spec_variant_nnz is not None and g["nnz"] > spec_variant_nnz:
                    sv = dict(sv, knobs=None, reason=f"not built: {g['nnz']} nonzeros > --spec-variant-nnz "
                                                     f"{spec_variant_nnz} (only the default above that)")
                if sv["knobs"] is None:
                    sp_entry["skipped"].append({"index": j, "name": sv["name"], "knobs": None, "reason": sv["reason"]})
                    continue
                kd = sv["knobs"].as_dict()
                try:  # the cache key hashes the kernel's TIR (the build checks it renders the same)
                    sha = tir_sha(srule.apply(spec, weight, Epilogue(**epi), sv["knobs"]).func)
                except ValueError as e:
                    sp_entry["skipped"].append({"index": j, "name": sv["name"], "knobs": kd, "reason": str(e)})
                    continue
                key = spec_cache_key(sha, TARGET)
                sym = f"escort_spec_{key[:16]}"
                spec_jobs.append({"key": key, "case": i, "index": j, "name": sv["name"], "nnz": g["nnz"],
                                  "dest": str(tmp / f"spec_{sym}.so.xz"),
                                  "label": f"case {i} {case['layer']} N={spec.N} sp={case['sparsity']:.2f} {sv['name']}",
                                  "build": {"spec": spec.to_dict(), "weights": str(g["spec_weights"]), "knobs": kd,
                                            "epilogue": epi, "symbol": sym, "target": TARGET,
                                            "tir_sha": sha}})
        d0 = ventries[0]
        log(f"case {i:2d} {case['layer']:20s} N={spec.N:<3d} sp={case['sparsity']:.2f} nnz={g['nnz']:<8d} "
            f"{len(ventries)} variant(s), default {d0['knobs']} first input {d0['first_input']['shape']}")
    t_sched = time.time() - t_sched

    # ---- our kernels: one module, one compile
    t0 = time.time()
    try:
        ex = _compile(funcs, target)
    except Exception as e:
        log(f"compiling all {len(funcs)} kernels failed ({short_error(e)}); finding the failing variants")
        bad = []
        for sym, f in funcs.items():
            try:
                _compile({sym: f}, target)
            except Exception as e2:
                bad.append(sym)
                log(f"  {sym}: {short_error(e2)}")
        for ent in entries:
            if ent["variants"][0]["symbol"] in bad:
                raise RuntimeError(f"default kernel of case {ent['index']} does not compile") from e
            ent["variants"] = [v for v in ent["variants"] if v["symbol"] not in bad]
        funcs = {s: f for s, f in funcs.items() if s not in bad}
        ex = _compile(funcs, target)
    t_compile = time.time() - t0
    source = cuda_source(ex)
    for ent in entries:  # TVM compiles an unscheduled PrimFunc for the host without a word
        keep = []
        for v in ent["variants"]:
            if f"{v['symbol']}_kernel" in source:
                keep.append(v)
            elif v["default"]:
                raise RuntimeError(f"{v['symbol']} was not compiled as a GPU kernel")
            else:
                log(f"  {v['symbol']} dropped: not compiled as a GPU kernel")
        ent["variants"] = keep
    ex.export_library(str(tmp / "kernels.so"))
    if not carries_gpu_binary(tmp / "kernels.so"):
        raise RuntimeError("kernels.so carries no CUDA fatbin (was the CUDA runtime loaded before the build?)")
    log(f"compiled {len(funcs)} sparse kernels in {t_compile:.1f} s")

    # ---- TVM's dense conv2d, one Relax function per distinct shape, weight passed as an input
    t0 = time.time()
    bb = relax.BlockBuilder()
    for spec, name in dense_specs.items():
        x = relax.Var("x", relax.TensorType(spec.input_shape, "float32"))
        w = relax.Var("w", relax.TensorType(spec.weight_shape, "float32"))
        with bb.function(name, [x, w]):
            with bb.dataflow():
                y = bb.emit(relax.op.nn.conv2d(x, w, strides=list(spec.stride), padding=list(spec.pad),
                                               dilation=list(spec.dilation), groups=spec.groups))
                out = bb.emit_output(y)
            bb.emit_func_output(out)
    with target:
        dex = tvm.compile(bb.get(), target=target)
    dex.export_library(str(tmp / "dense.so"))
    if not carries_gpu_binary(tmp / "dense.so"):
        raise RuntimeError("dense.so carries no CUDA fatbin")
    t_dense = time.time() - t0
    log(f"compiled TVM dense conv2d for {len(dense_specs)} shapes in {t_dense:.1f} s")

    # ---- resources (nvcc -Xptxas -v on the same source), SASS if cuobjdump is here
    t0 = time.time()
    res, nvcc_cmd = nvcc_resources(source, tmp)
    lines = [f"# nvcc resource usage of the sparse kernels ({nvcc_cmd}); '*' marks the default variant",
             f"{'':1s} {'case':>4s} {'layer':20s} {'N':>3s} {'sp':>5s} {'var':>3s} {'regs':>5s} {'spill_st':>8s} "
             f"{'spill_ld':>8s} {'stack':>6s} {'smem':>6s}  kernel  knobs"]
    for ent in entries:
        for v in ent["variants"]:
            kern = {k: r for k, r in res.items() if k == f"{v['symbol']}_kernel" or k.startswith(f"{v['symbol']}_kernel_")}
            v["resources"] = {k: kern[k] for k in sorted(kern)}
            for k in sorted(kern):
                r = kern[k]
                lines.append(f"{'*' if v['default'] else ' '} {ent['index']:4d} {ent['layer']:20s} {ent['batch']:3d} "
                             f"{ent['sparsity']:5.2f} {v['index']:3d} {r.get('registers', -1):5d} "
                             f"{r.get('spill_stores', -1):8d} {r.get('spill_loads', -1):8d} {r.get('stack', -1):6d} "
                             f"{r.get('smem', -1):6d}  {k}  {json.dumps(v['knobs'])}")
    cuobjdump = shutil.which("cuobjdump")
    if cuobjdump:
        p = subprocess.run([cuobjdump, "--dump-sass", str(tmp / "kernels.cubin")], capture_output=True, text=True)
        (tmp / "sass.txt").write_text(p.stdout + p.stderr)
    else:
        lines.append("# no cuobjdump on this machine: no sass.txt here; `measure` dumps it from kernels.cubin "
                     "into $OUT/sass.txt where cuobjdump exists")
    (tmp / "resources.txt").write_text("\n".join(lines) + "\n")
    t_res = time.time() - t0

    # ---- specialised kernels: one module (and one .so.xz) each, built in child processes through the cache
    t0 = time.time()
    if spec_jobs:
        cache = Path(spec_cache) if spec_cache else DEFAULT_SPEC_CACHE
        log(f"building {len(spec_jobs)} specialised kernels, one module each, {jobs} at a time (cache {cache})")
        results = build_specialized_all(spec_jobs, cache, jobs, spec_timeout_s)
        lines += [f"# specialised kernels ({srule.name}), one module each, nvcc as TVM runs it "
                  f"({results[0].get('nvcc_command', '?') if results else ''}); SASS = .text of the kernel in its cubin",
                  f"{'':1s} {'case':>4s} {'layer':20s} {'N':>3s} {'sp':>5s} {'var':>10s} {'nnz':>6s} {'regs':>5s} "
                  f"{'spill_st':>8s} {'spill_ld':>8s} {'stack':>6s} {'smem':>6s} {'compile_s':>9s} {'SASS_B':>9s}  kernel  knobs"]
        by_case = {e["index"]: e for e in entries}
        for job, res in zip(spec_jobs, results):
            sp_entry = by_case[job["case"]]["specialized"]
            if res.get("status") != "ok":
                sp_entry["skipped"].append({"index": job["index"], "name": job["name"], "knobs": job["build"]["knobs"],
                                            "reason": f"{res.get('status')}: {res.get('reason') or res.get('error')}"})
                continue
            v = {"index": job["index"], "name": job["name"], "symbol": job["build"]["symbol"],
                 "default": job["name"] == "default", "rule": srule.name, "knobs": job["build"]["knobs"],
                 "so": Path(job["dest"]).name, "params": res["params"], "first_input":  # (an older cache entry has none: NCHW)
                 res.get("first_input") or {"padded": False, "shape": res["params"][0][1]},
                 "cached": bool(res.get("cached")),
                 "arrays": [{"key": f"zeros{j}", "shape": [n], "dtype": dt, "zeros": True}  # made on the GPU
                            for j, (n, dt) in enumerate([w if isinstance(w, list) else [w, "int32"]  # (older cache)
                                                         for w in res.get("workspace", [])])]}
            for k in ("program", "compile", "code", "resources", "device_params", "ptx_global_loads"):
                v[k] = res.get(k)
            sp_entry["variants"].append(v)
            e = by_case[job["case"]]
            for kname, r in sorted((v["resources"] or {}).items()):
                lines.append(f"{'*' if v['default'] else ' '} {e['index']:4d} {e['layer']:20s} {e['batch']:3d} "
                             f"{e['sparsity']:5.2f} {v['name']:>10s} {res['nnz']:6d} {r.get('registers', -1):5d} "
                             f"{r.get('spill_stores', -1):8d} {r.get('spill_loads', -1):8d} {r.get('stack', -1):6d} "
                             f"{r.get('smem', -1):6d} {v['compile']['compile_s']:9.1f} "
                             f"{v['code']['text_bytes'] or -1:9d}  {kname}  {json.dumps(v['knobs'])}")
        for e in entries:
            sp = e["specialized"]
            sp["variants"].sort(key=lambda v: v["index"])
            sp["skipped"].sort(key=lambda v: v["index"])
            if not sp["variants"] and sp["reason"] is None:
                sp["reason"] = "no variant built: " + "; ".join(f"{x['name']}: {x['reason']}" for x in sp["skipped"])
        (tmp / "resources.txt").write_text("\n".join(lines) + "\n")
    for g in groups.values():
        if "spec_weights" in g:
            Path(g["spec_weights"]).unlink(missing_ok=True)
    t_spec = time.time() - t0

    # ---- weights and manifest
    for g in groups.values():
        np.savez_compressed(tmp / g["file"], **g["arrays"])
    manifest = {
        "version": 1,
        "prepared_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command, "git": git_info(), "tvm": getattr(tvm, "__version__", "?"), "target": TARGET,
        "variants_mode": variants, "kernels_so": "kernels.so", "dense_so": "dense.so", "cubin": "kernels.cubin",
        "source": "kernels.cu", "input_seed": "torch.Generator('cuda').manual_seed(1000 + case index)",
        "floor": {"fp32_peak": FP32_PEAK, "bw": BW},
        "timings_s": {"schedule": round(t_sched, 1), "compile_kernels": round(t_compile, 1),
                      "compile_dense": round(t_dense, 1), "resources": round(t_res, 1),
                      "specialized": round(t_spec, 1)},
        "specialized": {"rule": srule.name, "variants": spec_variants if use_spec else "none",
                        "max_nnz": spec_max_nnz, "variant_nnz": spec_variant_nnz, "jobs": jobs,
                        "timeout_s": spec_timeout_s,
                        "cache_key": "sha1 of the kernel's TVMScript, target, TVM, nvcc and flags",
                        "kernels": sum(len(e["specialized"]["variants"]) for e in entries),
                        "files": "spec_<symbol>.so.xz: one exported .so per kernel, xz-compressed (lzma)"},
        "cases": entries,
    }
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
    sizes = {p.name: p.stat().st_size for p in sorted(tmp.iterdir())}
    manifest["files"] = sizes
    manifest["timings_s"]["total"] = round(time.time() - t_start, 1)
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
    if bench_dir.exists():
        shutil.rmtree(bench_dir)
    tmp.rename(bench_dir)
    total_mb = sum(sizes.values()) / 1e6
    log(f"wrote {bench_dir}: {len(entries)} cases, {len(funcs)} CSR kernels, "
        f"{manifest['specialized']['kernels']} specialised kernels, {total_mb:.1f} MB in {time.time() - t_start:.1f} s")
    if total_mb > SIZE_WARN_MB:
        log(f"WARNING: {bench_dir} is {total_mb:.1f} MB; with .devbundle it may not fit the 64 MiB carry")
    return manifest


# ====================================================================== runtime side (TVM runtime only)
def load_tvm_runtime(allow_stub: bool = False):
    """Load TVM's CUDA runtime (driver first), then return ``tvm`` (runtime-only under TVM_USE_RUNTIME_LIB=1)."""
    try:
        from escort_tvm.cuda_toolchain import load_cuda_runtime
    except ImportError:  # keep measure usable if the package grows compiler imports
        load_cuda_runtime = None
    if load_cuda_runtime is not None:
        load_cuda_runtime(allow_stub=allow_stub)
    else:
        import ctypes

        ctypes.CDLL("libcuda.so.1", ctypes.RTLD_GLOBAL)
        import tvm

        ctypes.CDLL(str(Path(tvm.__file__).parent / "lib" / "libtvm_runtime_cuda.so"), ctypes.RTLD_GLOBAL)
    import tvm

    return tvm


def unpack_spec_so(bench_dir: Path, v: dict, into: Path) -> Path:
    """The specialised kernel's .so, decompressed from the carried ``spec_<symbol>.so.xz`` into ``into``."""
    import lzma

    dest = Path(into) / Path(v["so"]).name.removesuffix(".xz")
    if not dest.exists():
        tmp = dest.with_name(dest.name + f".tmp-{os.getpid()}")
        tmp.write_bytes(lzma.decompress((Path(bench_dir) / v["so"]).read_bytes()))
        tmp.replace(dest)
    return dest


def spec_variants_of(case: dict) -> list[dict]:
    return (case.get("specialized") or {}).get("variants") or []


def inspect_bench(bench_dir: Path, allow_stub: bool) -> dict:
    """Load both libraries as the GPU side does and report which manifest symbols they lack."""
    manifest = json.loads((bench_dir / "manifest.json").read_text())
    tvm = load_tvm_runtime(allow_stub=allow_stub)
    import tvm.runtime.vm  # noqa: F401  (what measure uses for the dense baseline)

    klib = tvm.runtime.load_module(str(bench_dir / manifest["kernels_so"]))
    dlib = tvm.runtime.load_module(str(bench_dir / manifest["dense_so"]))
    stats = str(dlib["stats"]()) if dlib.implements_function("stats") else ""
    funcs_line = next((ln for ln in stats.splitlines() if "Globals" in ln), stats)
    dense_names = set(re.findall(r"[\w.]+", funcs_line))
    missing_k = [v["symbol"] for c in manifest["cases"] for v in c["variants"] if not klib.implements_function(v["symbol"])]
    missing_d = sorted({c["dense_func"] for c in manifest["cases"]} - dense_names)
    n_spec = 0
    with tempfile.TemporaryDirectory(prefix="bench-spec-") as td:
        for c in manifest["cases"]:
            for v in spec_variants_of(c):
                n_spec += 1
                try:
                    lib = tvm.runtime.load_module(str(unpack_spec_so(bench_dir, v, Path(td))))
                    if not lib.implements_function(v["symbol"]):
                        missing_k.append(v["symbol"])
                except Exception as e:
                    missing_k.append(f"{v['symbol']} ({short_error(e)})")
    return {"kernels": sum(len(c["variants"]) for c in manifest["cases"]), "spec_kernels": n_spec,
            "missing_kernels": missing_k,
            "missing_dense": missing_d, "dense_is_vm": dlib.implements_function("vm_load_executable"),
            "tvm_relax_imported": any(m == "tvm.relax" or m.startswith("tvm.relax.") for m in sys.modules),
            "compiler_imported": "escort_tvm.compiler" in sys.modules,
            "runtime_only": os.environ.get("TVM_USE_RUNTIME_LIB") == "1"}


def verify(bench_dir: Path, reapply: bool = True) -> list[str]:
    """Consistency of a prepared folder: files, arrays vs manifest, schedule re-application, symbols in the .so."""
    import numpy as np

    from escort_tvm.cuda_toolchain import carries_gpu_binary

    problems = []
    manifest = json.loads((bench_dir / "manifest.json").read_text())
    for f in (manifest["kernels_so"], manifest["dense_so"]):
        if not carries_gpu_binary(bench_dir / f):
            problems.append(f"{f} carries no fatbin")
    if reapply:
        from escort_tvm.compute import Epilogue
        from escort_tvm.conv_spec import ConvSpec
        from escort_tvm.sparse_format import SparseConvWeight
        from schedules import SparseConvCUDA

        rule = SparseConvCUDA()
    for c in manifest["cases"]:
        z = np.load(bench_dir / c["weights"])
        dense, bias = z[c["dense_key"]], z[c["bias_key"]]
        s = c["spec"]
        if dense.shape != (s["K"], s["C"] // s["groups"], s["KH"], s["KW"]) or dense.dtype != np.float32:
            problems.append(f"case {c['index']}: dense weight {dense.shape} {dense.dtype}")
        if int(np.count_nonzero(dense)) != c["nnz"]:
            problems.append(f"case {c['index']}: nnz {np.count_nonzero(dense)} != manifest {c['nnz']}")
        if abs(c["actual_sparsity"] - c["sparsity"]) > 1e-3:
            problems.append(f"case {c['index']}: sparsity {c['actual_sparsity']} != {c['sparsity']}")
        if bias.shape != (s["K"],):
            problems.append(f"case {c['index']}: bias shape {bias.shape}")
        if not c["variants"] or not c["variants"][0]["default"]:
            problems.append(f"case {c['index']}: no default variant")
        for v in c["variants"]:
            arrays = [z[a["key"]] for a in v["arrays"]]
            for a, meta, p in zip(arrays, v["arrays"], v["params"][1:]):
                if [list(a.shape), str(a.dtype)] != [meta["shape"], meta["dtype"]] or [p[1], p[2]] != [meta["shape"], meta["dtype"]]:
                    problems.append(f"{v['symbol']}: array {meta} vs stored {a.shape} {a.dtype} vs param {p}")
            if v["params"][0][1] != v["first_input"]["shape"]:
                problems.append(f"{v['symbol']}: first param {v['params'][0]} vs layout {v['first_input']}")
            if reapply:
                spec = ConvSpec.from_dict(s)
                knobs = rule.Knobs.from_dict(v["knobs"])
                plan = rule.apply(spec, SparseConvWeight.from_dense(dense, spec.groups), Epilogue(relu=False), knobs)
                if len(plan.weight_arrays) != len(arrays) or not all(
                        np.array_equal(np.asarray(a), b) and np.asarray(a).dtype == b.dtype
                        for a, b in zip(plan.weight_arrays, arrays)):
                    problems.append(f"{v['symbol']}: re-applying the schedule gives other weight arrays")
                if _signature(plan.func) != v["params"]:
                    problems.append(f"{v['symbol']}: re-applying the schedule gives another signature")
                x = np.random.default_rng(0).standard_normal(spec.input_shape).astype(np.float32)
                if not np.array_equal(np.asarray(plan.prepare_input(x)), first_input.to_numpy(x, v["first_input"])):
                    problems.append(f"{v['symbol']}: prepare_input differs from the manifest layout")
        sp = c.get("specialized")
        if sp is None:
            problems.append(f"case {c['index']}: no 'specialized' entry")
            continue
        if c["nnz"] <= sp["max_nnz"] and sp["reason"] is None and not sp["variants"]:
            problems.append(f"case {c['index']}: specialised kernel eligible but neither built nor explained")
        for v in sp["variants"]:
            lay = v["first_input"]
            want = [s["N"], s["C"], s["H"], s["W"]] if not lay["padded"] else [s["N"], s["C"] * lay["hp"] * lay["wp"]]
            oh, ow = out_hw(s)
            shapes = [p[1] for p in v["params"]]
            work = [a["shape"] for a in v["arrays"]]
            if shapes != [want, *work, [s["K"]], [s["N"], s["K"], oh, ow]] or not all(a.get("zeros") for a in v["arrays"]):
                problems.append(f"{v['symbol']}: params {v['params']} are not (x {want}, [counters], bias[K], y)")
            if not (bench_dir / v["so"]).exists():
                problems.append(f"{v['symbol']}: {v['so']} missing")
                continue
            with tempfile.TemporaryDirectory(prefix="bench-verify-") as td:
                if not carries_gpu_binary(unpack_spec_so(bench_dir, v, Path(td))):
                    problems.append(f"{v['symbol']}: {v['so']} carries no fatbin")
            loads = v.get("ptx_global_loads") or {}
            if any(not op.endswith(".f32") for op in loads):
                problems.append(f"{v['symbol']}: non-float global loads in its PTX: {loads}")
            if reapply:
                from schedules import SpecializedCUDA

                spec = ConvSpec.from_dict(s)
                plan = SpecializedCUDA().apply(spec, SparseConvWeight.from_dense(dense, spec.groups),
                                               Epilogue(relu=False), SpecializedCUDA.Knobs.from_dict(v["knobs"]))
                zeros = [[int(a.shape[0]), str(a.dtype)] for a in plan.weight_arrays if not a.any()]
                if _signature(plan.func) != v["params"] or zeros != [[a["shape"][0], a["dtype"]] for a in v["arrays"]] \
                        or len(zeros) != len(plan.weight_arrays):
                    problems.append(f"{v['symbol']}: re-applying the specialised schedule gives another signature")
    env = dict(os.environ, TVM_USE_RUNTIME_LIB="1")
    p = subprocess.run([sys.executable, str(Path(__file__).resolve()), "_inspect", "--bench-dir", str(bench_dir),
                        "--allow-stub"], capture_output=True, text=True, env=env, timeout=300)
    try:
        info = json.loads(p.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        problems.append(f"runtime-only inspection failed: {(p.stdout + p.stderr)[-2000:]}")
        return problems
    if info["missing_kernels"]:
        problems.append(f"kernels.so lacks {info['missing_kernels']}")
    if info["missing_dense"]:
        problems.append(f"dense.so lacks {info['missing_dense']}")
    if not info["dense_is_vm"]:
        problems.append("dense.so is not a Relax VM executable")
    if info["tvm_relax_imported"] or info["compiler_imported"]:
        problems.append(f"the measure-side loader imported the compiler: {info}")
    return problems


# ====================================================================== measure (GPU machine, torch + TVM runtime)
class _Gpu:
    """Everything that touches torch/TVM on the GPU machine, for one worker process."""

    def __init__(self, bench_dir: Path, manifest: dict):
        import torch
        import torch.nn.functional as F

        self.torch, self.F = torch, F
        if not torch.cuda.is_available():
            raise RuntimeError("measure needs a CUDA GPU visible to torch")
        torch.cuda.init()
        self.tvm = load_tvm_runtime(allow_stub=False)
        import tvm.runtime.vm

        self.dev = self.tvm.cuda(0)
        self.klib = self.tvm.runtime.load_module(str(bench_dir / manifest["kernels_so"]))
        dense = bench_dir / manifest.get("dense_so", "dense.so")
        self.vm = tvm.runtime.vm.VirtualMachine(self.tvm.runtime.load_module(str(dense)), self.dev) \
            if dense.exists() else None
        try:
            import triton.testing as tt

            self._do_bench = tt.do_bench
            self.bench_impl = "triton.testing.do_bench"
        except Exception:
            self._do_bench = None
            self.bench_impl = "do_bench clone (triton missing)"
        props = torch.cuda.get_device_properties(0)
        self.l2_bytes = max(int(getattr(props, "L2_cache_size", 0) or 0), 60 * 2**20)  # H200: 60 MB per spec
        self.sms = int(getattr(props, "multi_processor_count", 0))
        if torch.cuda.current_stream().cuda_stream != 0:
            log("WARNING: torch's current stream is not the default stream; TVM launches on the default stream")

        self.bench_dir = bench_dir
        self._spec_tmp = tempfile.mkdtemp(prefix="bench-spec-")
        self._spec_libs: dict[str, object] = {}

    def spec_function(self, v: dict):
        """The specialised kernel's function, from its own .so (decompressed once per worker)."""
        if v["so"] not in self._spec_libs:
            path = unpack_spec_so(self.bench_dir, v, Path(self._spec_tmp))
            self._spec_libs[v["so"]] = self.tvm.runtime.load_module(str(path))
        return self._spec_libs[v["so"]][v["symbol"]]

    # ---------------------------------------------------------------- timing
    def do_bench(self, fn, warmup=25, rep=100) -> float:
        """Median ms like measure_anchors.py: triton's do_bench (L2 flushed before every call)."""
        if self._do_bench is not None:
            return float(self._do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))
        torch = self.torch
        cache = torch.empty(int(256e6 // 4), dtype=torch.int, device="cuda")
        fn()
        torch.cuda.synchronize()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(5):
            cache.zero_()
            fn()
        e.record()
        torch.cuda.synchronize()
        est = s.elapsed_time(e) / 5
        for _ in range(max(1, int(warmup / est))):
            fn()
        n = max(1, int(rep / est))
        ss = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        es = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        for i in range(n):
            cache.zero_()
            ss[i].record()
            fn()
            es[i].record()
        torch.cuda.synchronize()
        times = sorted(a.elapsed_time(b) for a, b in zip(ss, es))
        return float(times[len(times) // 2])

    def stream_bench(self, call, nbuf: int, warmup=25.0, rep=100.0) -> dict:
        """Median per-launch ms over back-to-back launches between two CUDA events, rotating input buffers.
        A GPU sleep is queued first when launches are short, so the CPU's launch cost stays off the clock."""
        torch = self.torch
        it = iter(range(1 << 62))
        torch.cuda.synchronize()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(5):
            call(next(it) % nbuf)
        e.record()
        torch.cuda.synchronize()
        est = max(s.elapsed_time(e) / 5, 1e-4)
        for _ in range(min(5000, max(1, int(warmup / est)))):
            call(next(it) % nbuf)
        n = int(min(800, max(10, 2.0 / est)))  # launches per timed run: >= ~2 ms of work
        reps = int(min(200, max(5, rep / (n * est))))
        sleep = hasattr(torch.cuda, "_sleep") and est < 0.05
        evs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        torch.cuda.synchronize()
        for a, b in evs:
            if sleep:
                torch.cuda._sleep(int(n * 10e-6 * 2.0e9))  # ~10 us of GPU time per queued launch
            a.record()
            for _ in range(n):
                call(next(it) % nbuf)
            b.record()
        torch.cuda.synchronize()
        times = sorted(a.elapsed_time(b) / n for a, b in evs)
        return {"ms": float(times[len(times) // 2]), "launches_per_rep": n, "reps": reps, "gpu_sleep_first": sleep}

    def healthy(self) -> bool:
        try:
            t = self.torch.ones(1, device="cuda") + 1
            self.torch.cuda.synchronize()
            return float(t.item()) == 2.0
        except Exception:
            return False

    def t(self, x):
        return self.tvm.runtime.from_dlpack(x)

    def first_input(self, x, layout: dict):
        return first_input.to_torch(self.F, x, layout)


def _rel_err(torch, out, ref) -> tuple[float, int]:
    bad = int((~torch.isfinite(out)).sum())
    err = float((out.double() - ref).norm() / ref.norm())
    return err, bad


def _env_info(gpu: _Gpu) -> dict:
    torch = gpu.torch
    info = {"gpu": torch.cuda.get_device_name(0), "capability": ".".join(map(str, torch.cuda.get_device_capability(0))),
            "sms": gpu.sms, "l2_bytes": gpu.l2_bytes, "torch": torch.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(), "python": sys.version.split()[0],
            "tvm_runtime": getattr(gpu.tvm, "__version__", "?"), "bench_impl": gpu.bench_impl}
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception:
        info["triton"] = None
    driver = None
    try:
        p = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=20)
        driver = p.stdout.strip().splitlines()[0] if p.returncode == 0 and p.stdout.strip() else None
    except Exception:
        pass
    if driver is None:
        try:
            import ctypes

            v = ctypes.c_int()
            ctypes.CDLL("libcuda.so.1").cuDriverGetVersion(ctypes.byref(v))
            driver = f"CUDA driver API {v.value // 1000}.{(v.value % 1000) // 10}"
        except Exception:
            driver = "?"
    info["driver"] = driver
    return info


def measure_worker(args) -> int:
    import warnings

    import numpy as np

    warnings.filterwarnings("ignore", category=UserWarning)  # torch's "sparse CSR is beta", TF32 API notes

    bench_dir, out = Path(args.bench_dir), Path(args.out)
    manifest = json.loads((bench_dir / "manifest.json").read_text())
    raw = out / "raw.jsonl"
    progress = out / "progress.json"
    records = read_records(raw)
    done = {(r["case"], r["part"]) for r in records if "part" in r and "case" in r}
    t0 = float(os.environ.get("BENCH_T0", time.time()))
    gpu = _Gpu(bench_dir, manifest)
    torch, F = gpu.torch, gpu.F
    append_record(raw, {"type": "env", **_env_info(gpu)})
    only = set(args.cases.split(",")) if args.cases else None

    def emit(rec):
        records.append(rec)
        append_record(raw, rec)
        if "part" in rec:
            done.add((rec["case"], rec["part"]))

    def mark(case, part):
        progress.write_text(json.dumps({"case": case, "part": part, "t": time.time()}))

    def crash_exit(case, part, e):
        emit({"type": "crash", "case": case, "part": part, "status": "CRASH", "error": short_error(e)})
        log(f"  case {case} {part}: CUDA context lost ({short_error(e)}); restarting in a fresh process")
        sys.exit(3)

    for c in manifest["cases"]:
        i = c["index"]
        if only and str(i) not in only and c["layer"] not in only:
            continue
        if (i, "done") in done:
            continue
        if (i, "setup") in done:  # the worker died while loading this case's data: leave it out
            emit({"type": "skipped", "case": i, "part": "done", "reason": "the worker died setting the case up"})
            continue
        if time.time() - t0 > args.budget_s:
            emit({"type": "skipped", "case": i, "part": "done", "reason": f"time budget {args.budget_s:.0f} s spent"})
            continue
        tc = time.time()
        mark(i, "setup")
        s = c["spec"]
        N, C, H, W, K = s["N"], s["C"], s["H"], s["W"], s["K"]
        pt, pl, pb, pr = s["pad"]
        conv_kw = {"stride": tuple(s["stride"]), "dilation": tuple(s["dilation"]), "groups": s["groups"]}
        symmetric = pt == pb and pl == pr
        z = np.load(bench_dir / c["weights"])
        w = torch.from_numpy(np.ascontiguousarray(z[c["dense_key"]])).cuda()
        bias = torch.from_numpy(np.ascontiguousarray(z[c["bias_key"]])).cuda()
        g = torch.Generator(device="cuda").manual_seed(1000 + i)
        x = torch.randn(N, C, H, W, device="cuda", generator=g)

        def conv(xx, ww):
            if symmetric:
                return F.conv2d(xx, ww, padding=(pt, pl), **conv_kw)
            return F.conv2d(F.pad(xx, (pl, pr, pt, pb)), ww, padding=0, **conv_kw)

        ref = conv(x.double(), w.double())
        ref_b = ref + bias.double().view(1, -1, 1, 1)
        y_shape = (N, K) + tuple(ref.shape[2:])

        def kernel_call(v, family):
            fn = gpu.spec_function(v) if family == "spec" else gpu.klib[v["symbol"]]
            xin = gpu.first_input(x, v["first_input"])  # NCHW (pads on chip), or after the graph's pad op
            if list(xin.shape) != v["first_input"]["shape"]:
                raise RuntimeError(f"first input {list(xin.shape)} != manifest {v['first_input']['shape']}")
            arrays = [torch.zeros(a["shape"], dtype=getattr(torch, a.get("dtype", "int32")), device="cuda")  # counters,
                      if a.get("zeros")  # zero page
                      else torch.from_numpy(np.ascontiguousarray(z[a["key"]])).cuda() for a in v["arrays"]]
            y = torch.full(y_shape, float("nan"), device="cuda")
            targs = [gpu.t(t) for t in (xin, *arrays, bias, y)]
            return fn, xin, arrays, y, targs

        def run_family(family: str, variants: list[dict]):
            """Check and time every variant of one kernel kind; returns the best passing one (or None): by
            kernel time, plus the pad op its input layout needs."""
            vp, final_part, stream_part = FAMILY_PARTS[family]
            pads = _variant_pads([r for r in records if r.get("case") == i], family)

            def own_pad(v):
                return pads.get(v["index"]) or 0.0

            tag = {} if family == "csr" else {"family": family}
            multi = len(variants) > 1
            # ---- every variant: check (NaN-poisoned output, float64 reference), then time (short if several)
            for v in variants:
                part = f"{vp}{v['index']}"
                if (i, part) in done:
                    continue
                mark(i, part)
                rec = {"type": "variant", **tag, "case": i, "part": part, "variant": v["index"], "symbol": v["symbol"]}
                try:
                    fn, xin, arrays, y, targs = kernel_call(v, family)
                    fn(*targs)
                    torch.cuda.synchronize()
                    err, bad = _rel_err(torch, y, ref_b)
                    ok = bad == 0 and err < TOL_FP32
                    rec.update(rel_err=err, nonfinite=bad, status="ok" if ok else "FAIL")
                    if ok:
                        call = (lambda: fn(*targs))
                        key = "screen_ms" if multi else "ms"
                        rec[key] = gpu.do_bench(call, warmup=5, rep=20) if multi else gpu.do_bench(call)
                        err2, bad2 = _rel_err(torch, y, ref_b)  # the output after many launches: still right?
                        if bad2 or not err2 < TOL_FP32:
                            rec.update(status="FAIL", rel_err_after_timing=err2, nonfinite_after_timing=bad2)
                            rec.pop(key, None)
                    del fn, xin, arrays, y, targs
                except SystemExit:
                    raise
                except Exception as e:
                    rec.update(status="FAIL", error=short_error(e))
                    if not gpu.healthy():
                        crash_exit(i, part, e)
                emit(rec)

            vrecs = {r["variant"]: r for r in records if r.get("type") == "variant" and r["case"] == i
                     and r.get("family", "csr") == family}
            passing = [v for v in variants if vrecs.get(v["index"], {}).get("status") == "ok"]
            best = None
            # ---- several variants: the 3 fastest by screening, timed again with the full budget
            if multi and passing and (i, final_part) not in done:
                mark(i, final_part)
                cands = sorted(passing, key=lambda v: vrecs[v["index"]]["screen_ms"] + own_pad(v))[:3]
                times = {}
                for v in cands:
                    try:
                        fn, xin, arrays, y, targs = kernel_call(v, family)
                        times[v["index"]] = gpu.do_bench(lambda: fn(*targs))
                        del fn, xin, arrays, y, targs
                    except Exception as e:
                        if not gpu.healthy():
                            crash_exit(i, final_part, e)
                emit({"type": "final", **tag, "case": i, "part": final_part,
                      "times": {str(k): t for k, t in times.items()}})
            if passing:
                if multi:
                    fin = next((r for r in records if r.get("type") == "final" and r["case"] == i
                                and r.get("family", "csr") == family), None)
                    if fin and fin["times"]:
                        bi = int(min(fin["times"], key=lambda k: fin["times"][k] + own_pad({"index": int(k)})))
                        best = next(v for v in passing if v["index"] == bi)
                    else:
                        best = min(passing, key=lambda v: vrecs[v["index"]]["screen_ms"] + own_pad(v))
                else:
                    best = passing[0]

            # ---- the best variant back to back, cycling over input copies larger than L2 together
            if best is not None and not args.no_stream and (i, stream_part) not in done:
                mark(i, stream_part)
                rec = {"type": "stream", **tag, "case": i, "part": stream_part, "variant": best["index"]}
                try:
                    fn, xin, arrays, y, targs = kernel_call(best, family)
                    nbytes = xin.numel() * 4
                    nbuf = 1 if nbytes >= 2 * gpu.l2_bytes else int(math.ceil(2 * gpu.l2_bytes / nbytes))
                    bufs = [xin] + [xin.clone() for _ in range(nbuf - 1)]
                    rest = targs[1:]
                    tbufs = [gpu.t(b) for b in bufs]
                    st = gpu.stream_bench(lambda k: fn(tbufs[k], *rest), nbuf)
                    rec.update(st, n_buffers=nbuf, buffer_bytes=nbytes, rotated_bytes=nbytes * nbuf,
                               l2_bytes=gpu.l2_bytes)
                    del bufs, tbufs, fn, xin, arrays, y, targs, rest
                except Exception as e:
                    rec.update(status="FAIL", error=short_error(e))
                    if not gpu.healthy():
                        crash_exit(i, stream_part, e)
                emit(rec)
            return best

        # ---- the input padding the graph pass emits before a kernel that reads a padded input: timed once per
        # distinct layout among each kind's variants, so each variant is ranked by its kernel plus its own pad
        for family, fvariants, prefix in (("csr", c["variants"], "pad"), ("spec", spec_variants_of(c), "spad")):
            layouts: dict[str, list[int]] = {}
            for v in fvariants:
                layouts.setdefault(json.dumps(v["first_input"], sort_keys=True), []).append(v["index"])
            for j, (key, idx) in enumerate(layouts.items()):
                if (i, f"{prefix}{j}") in done:
                    continue
                mark(i, f"{prefix}{j}")
                lay = json.loads(key)
                rec = {"type": "pad", **({} if family == "csr" else {"family": family}), "case": i,
                       "part": f"{prefix}{j}", "variants": idx, "padded": lay["padded"]}
                try:
                    rec["ms"] = gpu.do_bench(lambda: gpu.first_input(x, lay)) if lay["padded"] else 0.0
                except Exception as e:
                    rec.update(status="FAIL", error=short_error(e))
                emit(rec)

        best = run_family("csr", c["variants"])
        if spec_variants_of(c):
            run_family("spec", spec_variants_of(c))

        # ---- baselines, each checked against the reference first (like measure_anchors.py)
        R = s["KH"]
        square = s["KH"] == s["KW"] and tuple(s["stride"])[0] == tuple(s["stride"])[1] and pt == pl == pb == pr \
            and tuple(s["dilation"]) == (1, 1) and s["groups"] == 1
        OH, OW = y_shape[2], y_shape[3]
        wm = w.reshape(K, -1)

        def set_tf32(conv_tf32: bool):
            torch.backends.cudnn.allow_tf32 = conv_tf32
            torch.backends.cuda.matmul.allow_tf32 = False

        def im2col_gemm():
            cols = F.unfold(x, R, padding=pt, stride=s["stride"][0])  # N, C*R*R, OH*OW
            return (wm @ cols).reshape(N, K, OH, OW)

        ws_holder = {}

        def im2col_cusparse():
            ws = ws_holder["ws"]
            cols = F.unfold(x, R, padding=pt, stride=s["stride"][0]).transpose(0, 1).reshape(C * R * R, -1)
            return (ws @ cols).reshape(K, N, OH * OW).transpose(0, 1).reshape(N, K, OH, OW)

        for name in BASELINES:
            if (i, name) in done:
                continue
            mark(i, name)
            rec = {"type": "baseline", "case": i, "part": name, "name": name}
            torch.backends.cudnn.benchmark = name == "cudnn_tf32_tuned"
            try:
                if name == "cudnn_fp32":
                    set_tf32(False)
                    fn, tol = (lambda: conv(x, w)), TOL_FP32
                elif name in ("cudnn_tf32", "cudnn_tf32_tuned"):
                    set_tf32(True)
                    fn, tol = (lambda: conv(x, w)), TOL_REDUCED
                elif name == "cudnn_fp16":
                    set_tf32(False)
                    xh, wh = x.half(), w.half()
                    fn, tol = (lambda: conv(xh, wh)), TOL_REDUCED
                elif name == "im2col_cublas":
                    set_tf32(False)
                    if not square:
                        raise NotImplementedError("im2col baselines need a square, undilated, ungrouped conv")
                    fn, tol = im2col_gemm, TOL_FP32
                elif name == "im2col_cusparse":
                    set_tf32(False)
                    if not square:
                        raise NotImplementedError("im2col baselines need a square, undilated, ungrouped conv")
                    ws_holder["ws"] = wm.to_sparse_csr()
                    fn, tol = im2col_cusparse, TOL_FP32
                else:  # tvm_dense
                    if gpu.vm is None:
                        raise FileNotFoundError("no dense.so")
                    f = gpu.vm[c["dense_func"]]
                    xt, wt = gpu.t(x), gpu.t(w)
                    fn, tol = (lambda: f(xt, wt)), TOL_FP32
                o = fn()
                torch.cuda.synchronize()
                if not isinstance(o, torch.Tensor):
                    o = torch.from_dlpack(o)
                err, bad = _rel_err(torch, o, ref)
                del o
                rec.update(rel_err=err, nonfinite=bad, tol=tol)
                if bad or not err < tol:
                    rec["status"] = "FAIL"
                else:
                    rec.update(status="ok", ms=gpu.do_bench(fn))
            except Exception as e:
                rec.update(status="FAIL", error=short_error(e))
                if not gpu.healthy():
                    crash_exit(i, name, e)
            finally:
                set_tf32(False)
                torch.backends.cudnn.benchmark = False
            emit(rec)
        ws_holder.clear()

        emit({"type": "case_done", "case": i, "part": "done", "seconds": round(time.time() - tc, 2)})
        try:
            row = next((r for r in build_rows(manifest, records, args.ours_metric) if r["index"] == i), None)
            if row:
                log(case_line(row))
        except Exception as e:  # reporting must never cost the measurements
            log(f"case {i}: summary line failed: {short_error(e)}")
        del x, w, bias, ref, ref_b, wm, z
        torch.cuda.empty_cache()
    return 0


# ---------------------------------------------------------------------- aggregation (pure python)
def build_rows(manifest: dict, records: list[dict], ours_metric: str = "dobench") -> list[dict]:
    by_case: dict[int, list] = {}
    for r in records:
        if "case" in r:
            by_case.setdefault(r["case"], []).append(r)
    rows = []
    for c in manifest["cases"]:
        recs = by_case.get(c["index"], [])
        if not recs:
            continue
        row = {k: c[k] for k in ("index", "layer", "batch", "sparsity", "group", "nnz", "actual_sparsity", "floor_ms")}
        row["spec"] = c["spec"]
        fam = _family_result(recs, c["variants"], "csr")
        row["variants"] = fam["variants"]
        row["best_variant"], row["best_knobs"], row["best_resources"] = fam["best_variant"], fam["best_knobs"], \
            fam["best_resources"]
        row["ours_kernel_ms"], row["ours_stream_ms"], row["stream"] = fam["kernel_ms"], fam["stream_ms"], fam["stream"]
        row["pad_ms"] = fam["pad_ms"]
        kern = row["ours_stream_ms"] if ours_metric == "stream" else row["ours_kernel_ms"]
        row["ours_ms"] = kern + (row["pad_ms"] or 0.0) if kern is not None else None
        row["baselines"] = {}
        for r in recs:
            if r.get("type") == "baseline" or (r.get("type") == "crash" and r["part"] in BASELINES):
                row["baselines"][r["part"]] = {k: r.get(k) for k in ("ms", "rel_err", "tol", "status", "error")}
        row["speedup"] = {}
        row["speedup_kernel_only"] = {}
        for b in BASELINES:
            bm = row["baselines"].get(b, {}).get("ms")
            row["speedup"][b] = bm / row["ours_ms"] if bm and row["ours_ms"] else None
            row["speedup_kernel_only"][b] = bm / kern if bm and kern else None
        row["floor_fraction"] = row["floor_ms"] / row["ours_ms"] if row["ours_ms"] else None
        row["skipped"] = next((r["reason"] for r in recs if r.get("type") == "skipped"), None)
        row["crashes"] = [{"part": r["part"], "error": r.get("error")} for r in recs if r.get("type") == "crash"]
        # ---- the specialised kernel (+ its pad op where it reads a padded input) and the best of our kernels
        sp = c.get("specialized") or {}
        row["specialized"] = None
        row["spec_reason"] = sp.get("reason")
        row["spec_max_nnz"] = sp.get("max_nnz")
        row["spec_skipped"] = sp.get("skipped", [])
        if sp.get("variants"):
            f = _family_result(recs, sp["variants"], "spec")
            meta = {v["index"]: v for v in sp["variants"]}
            for v in f["variants"]:
                m = meta.get(v["variant"], {})
                v.update(name=m.get("name"), compile=m.get("compile"), code=m.get("code"), program=m.get("program"))
            kern_ms = f["stream_ms"] if ours_metric == "stream" else f["kernel_ms"]
            f["ms"] = kern_ms + (f["pad_ms"] or 0.0) if kern_ms is not None else None
            best_meta = meta.get(f["best_variant"], {})
            default = next((v for v in sp["variants"] if v.get("default")), None)
            f["best_name"] = best_meta.get("name")
            f["best_compile"], f["best_code"] = best_meta.get("compile"), best_meta.get("code")
            f["default_compile"] = default.get("compile") if default else None
            f["default_code"] = default.get("code") if default else None
            row["specialized"] = f
        row["csr_ms"] = row["ours_ms"]
        row["spec_ms"] = row["specialized"]["ms"] if row["specialized"] else None
        cands = [(m, k) for m, k in ((row["csr_ms"], "csr"), (row["spec_ms"], "spec")) if m is not None]
        row["best_ms"], row["best_kernel"] = min(cands) if cands else (None, None)
        row["both"] = row["csr_ms"] is not None and row["spec_ms"] is not None
        row["csr_over_spec"] = row["csr_ms"] / row["spec_ms"] if row["both"] else None
        row["speedup_best"] = {}
        for b in BASELINES:
            bm = row["baselines"].get(b, {}).get("ms")
            row["speedup_best"][b] = bm / row["best_ms"] if bm and row["best_ms"] else None
        row["floor_fraction_best"] = row["floor_ms"] / row["best_ms"] if row["best_ms"] else None
        rows.append(row)
    return rows


def _variant_pads(recs: list[dict], family: str = "csr") -> dict[int, float]:
    """Variant index -> ms of the pad op its input layout needs (0 where the graph pass emits none)."""
    out = {}
    for r in recs:
        if r.get("type") == "pad" and "ms" in r and r.get("family", "csr") == family:
            for vi in r.get("variants", [r.get("variant")]):  # (older runs timed the best variant's pad only)
                out[vi] = r["ms"]
    return out


def _family_result(recs: list[dict], vmeta_list: list[dict], family: str) -> dict:
    """One kernel kind's variants of a case from the records: status, times, the best (by kernel time plus
    its pad op, for the CSR kernel) and its back-to-back time."""
    vp = FAMILY_PARTS[family][0]
    vmeta = {v["index"]: v for v in vmeta_list}
    variants = []
    for r in recs:
        if r.get("type") == "variant" and r.get("family", "csr") == family or (
                r.get("type") == "crash" and r["part"].startswith(vp) and r["part"][len(vp):].isdigit()):
            vi = r.get("variant", int(r["part"][len(vp):]))
            m = vmeta.get(vi, {})
            variants.append({"variant": vi, "default": m.get("default", False), "knobs": m.get("knobs"),
                             "symbol": m.get("symbol"), "status": r.get("status"), "rel_err": r.get("rel_err"),
                             "screen_ms": r.get("screen_ms"), "ms": r.get("ms"), "error": r.get("error"),
                             "resources": m.get("resources")})
    fin = next((r for r in recs if r.get("type") == "final" and r.get("family", "csr") == family), None)
    if fin:
        for v in variants:
            if str(v["variant"]) in fin["times"]:
                v["ms"] = fin["times"][str(v["variant"])]
    variants.sort(key=lambda v: v["variant"])
    if not any(v["ms"] is not None for v in variants):  # several variants, final timing missing
        for v in variants:
            v["ms"] = v["screen_ms"]
    pads = _variant_pads(recs, family)
    for v in variants:
        v["pad_ms"] = pads.get(v["variant"], 0.0 if family == "spec" else None)
    timed = [v for v in variants if v["status"] == "ok" and v["ms"] is not None]
    best = min(timed, key=lambda v: v["ms"] + (v["pad_ms"] or 0.0)) if timed else None
    st = next((r for r in recs if r.get("type") == "stream" and r.get("family", "csr") == family and "ms" in r), None)
    return {"variants": variants, "best_variant": best["variant"] if best else None,
            "best_knobs": best["knobs"] if best else None, "best_resources": best["resources"] if best else None,
            "kernel_ms": best["ms"] if best else None, "pad_ms": best["pad_ms"] if best else None,
            "stream_ms": st["ms"] if st and best and st.get("variant") == best["variant"] else None,
            "stream": {k: st[k] for k in ("n_buffers", "buffer_bytes", "rotated_bytes", "l2_bytes", "launches_per_rep",
                                          "reps", "gpu_sleep_first") if k in st} if st else None}


# Issue 3's targets, checked on the best of our kernels per layer: (batch, baseline, bound, how).
# "geomean": the geometric mean of the per-layer speedups must reach the bound (strictly exceed it for ">");
# "every": every layer's speedup must reach it.
TARGETS = ((32, "cudnn_fp32", 3.0, "geomean"), (32, "cudnn_tf32", 1.0, "geomean>"),
           (32, "im2col_cublas", 2.63, "every"), (32, "im2col_cusparse", 3.07, "every"),
           (1, "cudnn_fp32", 3.0, "geomean"), (1, "cudnn_tf32", 1.5, "geomean"))


def target_checks(rs: list[dict], batch: int) -> list[dict]:
    """Issue 3's targets for ``batch`` over rows ``rs``, on best-of-ours (``speedup_best``)."""
    out = []
    for b, base, bound, how in TARGETS:
        if b != batch:
            continue
        vals = [(r["layer"], r["speedup_best"].get(base)) for r in rs]
        have = [(lay, v) for lay, v in vals if v is not None]
        missing = [lay for lay, v in vals if v is None]
        if how.startswith("geomean"):
            value = geomean([v for _, v in have])
            met = value is not None and (value > bound if how.endswith(">") else value >= bound)
            failing = []
        else:
            value = min((v for _, v in have), default=None)
            failing = [lay for lay, v in have if v < bound]
            met = bool(have) and not failing
        sym = ">" if how.endswith(">") else ">="
        out.append({"target": f"{'geomean' if how.startswith('geomean') else 'every layer'} x {BASELINE_TITLES[base]} "
                              f"{sym} {bound:g}", "baseline": base, "bound": bound, "how": how.rstrip(">"),
                    "value": value, "met": bool(met and not missing), "layers": len(have), "missing": missing,
                    "failing": failing})
    return out


def summarize(rows: list[dict]) -> dict:
    out = {}
    for b in sorted({r["batch"] for r in rows if r["group"] == "main"}):
        rs = [r for r in rows if r["group"] == "main" and r["batch"] == b]
        g = {"cases": len(rs), "ours_ms": geomean([r["ours_ms"] for r in rs]),
             "ours_kernel_ms": geomean([r["ours_kernel_ms"] for r in rs]),
             "ours_stream_ms": geomean([r["ours_stream_ms"] for r in rs]),
             "floor_ms": geomean([r["floor_ms"] for r in rs]),
             "floor_fraction": geomean([r["floor_fraction"] for r in rs])}
        for base in BASELINES:
            g[base] = geomean([r["baselines"].get(base, {}).get("ms") for r in rs])
            g[f"speedup_{base}"] = geomean([r["speedup"].get(base) for r in rs])
        g["counted"] = sum(r["ours_ms"] is not None for r in rs)
        # best of our kernels per layer: over every layer (CSR alone where the specialised one is missing) and
        # over the layers that have both
        g["best"] = {}
        for subset, sel in (("all", rs), ("both", [r for r in rs if r["both"]])):
            h = {"cases": len(sel), "counted": sum(r["best_ms"] is not None for r in sel),
                 "csr_ms": geomean([r["csr_ms"] for r in sel]), "spec_ms": geomean([r["spec_ms"] for r in sel]),
                 "best_ms": geomean([r["best_ms"] for r in sel]),
                 "spec_wins": sum(r["best_kernel"] == "spec" for r in sel),
                 "floor_ms": geomean([r["floor_ms"] for r in sel]),
                 "floor_fraction": geomean([r["floor_fraction_best"] for r in sel])}
            for base in BASELINES:
                h[base] = geomean([r["baselines"].get(base, {}).get("ms") for r in sel])
                h[f"speedup_{base}"] = geomean([r["speedup_best"].get(base) for r in sel])
            h["targets"] = target_checks(sel, b)
            g["best"][subset] = h
        out[str(b)] = g
    return out


def _f(v, nd=4):
    return "-" if v is None else f"{v:.{nd}f}"


def _x(v):
    return "-" if v is None else f"{v:.2f}x"


def _winner(r: dict) -> str:
    if r["best_kernel"] is None:
        return "-"
    if not r["both"]:
        return FAMILY_TITLES[r["best_kernel"]] + (" (only)" if r["best_kernel"] == "spec" else "")
    ratio = max(r["csr_ms"], r["spec_ms"]) / min(r["csr_ms"], r["spec_ms"])
    return f"{FAMILY_TITLES[r['best_kernel']]} {ratio:.2f}x"


def case_line(r: dict) -> str:
    bl = " ".join(f"{b}={_f(r['baselines'].get(b, {}).get('ms'))}" for b in BASELINES)
    fails = sum(v["status"] != "ok" for v in r["variants"])
    sp = r.get("specialized")
    spec = (f"spec={_f(sp['kernel_ms'])} stream={_f(sp['stream_ms'])} ({sp['best_name'] or 'FAIL'}, "
            f"{sum(v['status'] != 'ok' for v in sp['variants'])} fail)" if sp else "spec=-")
    return (f"case {r['index']:2d} {r['layer']:20s} N={r['batch']:<3d} sp={r['sparsity']:.2f} "
            f"csr={_f(r['ours_kernel_ms'])}+pad {_f(r['pad_ms'])} stream={_f(r['ours_stream_ms'])} "
            f"(v{r['best_variant']}, {fails} fail) {spec} best={_winner(r)} {bl} floor={_f(r['floor_ms'])}")


def _md_table(rows: list[dict], knob_names: list[str]) -> list[str]:
    head = (["layer", "N", "sparsity", "nnz", "CSR", "CSR kernel", "pad", "CSR kernel (stream)", "specialized",
             "specialized (stream)", "best of ours", "winner"]
            + [BASELINE_TITLES[b] for b in BASELINES] + ["floor"]
            + [f"x {BASELINE_TITLES[b]}" for b in SPEEDUP_VS] + ["floor/best", "CSR variant", "/".join(knob_names),
                                                                 "spec variant"])
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        var = "FAIL" if r["best_variant"] is None else f"v{r['best_variant']}"
        knobs = "/".join(str(v) for v in r["best_knobs"].values()) if r["best_knobs"] else "-"
        sp = r.get("specialized")
        svar = (sp["best_name"] or "FAIL") if sp else "-"
        cells = ([r["layer"], str(r["batch"]), f"{r['sparsity']:.2f}", str(r["nnz"]), _f(r["ours_ms"]),
                  _f(r["ours_kernel_ms"]), _f(r["pad_ms"]), _f(r["ours_stream_ms"]),
                  _f(sp["kernel_ms"]) if sp else "-", _f(sp["stream_ms"]) if sp else "-", _f(r["best_ms"]), _winner(r)]
                 + [_f(r["baselines"].get(b, {}).get("ms")) for b in BASELINES] + [_f(r["floor_ms"])]
                 + [_x(r["speedup_best"].get(b)) for b in SPEEDUP_VS]
                 + [_f(r["floor_fraction_best"], 3), var, knobs, svar])
        out.append("| " + " | ".join(cells) + " |")
    return out


def _kb(v):
    return "-" if v is None else f"{v / 1024:.0f}"


def _spec_table(rows: list[dict]) -> list[str]:
    """Per case with a specialised kernel: its time against the CSR kernel, compile cost, code size, resources."""
    head = ["layer", "N", "sparsity", "nnz", "specialized", "CSR", "CSR/spec", "best variant", "knobs (cpt/tx/ty/stage/chunk)",
            "compile s (schedule+lower+nvcc)", "default compile s", "SASS KiB", "cubin KiB", ".so.xz KiB", "regs",
            "spill st/ld", "smem", "FMAs/load"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        sp = r.get("specialized")
        if not sp:
            continue
        best = next((v for v in sp["variants"] if v["variant"] == sp["best_variant"]), None)
        v = best or next((v for v in sp["variants"] if v["default"]), None) or (sp["variants"] or [None])[0]
        if v is None:
            continue
        c, code, prog = v.get("compile") or {}, v.get("code") or {}, v.get("program") or {}
        res = next(iter((v.get("resources") or {}).values()), {})
        knobs = "/".join(str(int(x) if isinstance(x, bool) else x) for x in (v.get("knobs") or {}).values())
        dc = sp.get("default_compile") or {}
        cells = [r["layer"], str(r["batch"]), f"{r['sparsity']:.2f}", str(r["nnz"]), _f(sp["kernel_ms"]),
                 _f(r["ours_ms"]), _x(r["csr_over_spec"]), (v.get("name") or "?") + ("" if best else " (none passed)"),
                 knobs, f"{c.get('compile_s', 0):.1f} ({c.get('schedule_s', 0):.1f}+{c.get('lower_s', 0):.1f}+"
                        f"{c.get('nvcc_s', 0):.1f})" if c else "-",
                 f"{dc['compile_s']:.1f}" if dc else "-", _kb(code.get("text_bytes")), _kb(code.get("cubin_bytes")),
                 _kb(code.get("xz_bytes")), str(res.get("registers", "-")),
                 f"{res.get('spill_stores', '-')}/{res.get('spill_loads', '-')}", str(res.get("smem", "-")),
                 f"{prog['fmas_per_load']:.2f}" if prog.get("fmas_per_load") is not None else "-"]
        out.append("| " + " | ".join(cells) + " |")
    return out


def _best_summary_lines(summary: dict) -> list[str]:
    head = (["batch", "layers", "specialized wins", "CSR", "specialized", "best of ours"]
            + [BASELINE_TITLES[b] for b in BASELINES] + ["floor"] + [f"x {BASELINE_TITLES[b]}" for b in SPEEDUP_VS]
            + ["floor/best"])
    L = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    targets = []
    for b, g in summary.items():
        for subset, title in (("all", "all"), ("both", "with both kernels")):
            h = g.get("best", {}).get(subset)
            if not h:
                continue
            L.append("| " + " | ".join([b, f"{h['counted']}/{h['cases']} ({title})", str(h["spec_wins"]),
                                        _f(h["csr_ms"]), _f(h["spec_ms"]), _f(h["best_ms"])]
                                       + [_f(h[x]) for x in BASELINES] + [_f(h["floor_ms"])]
                                       + [_x(h[f"speedup_{x}"]) for x in SPEEDUP_VS] + [_f(h["floor_fraction"], 3)]) + " |")
            for t in h["targets"]:
                val = "-" if t["value"] is None else f"{t['value']:.2f}x" + (" (lowest layer)" if t["how"] == "every" else "")
                extra = ""
                if t["failing"]:
                    extra += f"; below on {len(t['failing'])}: {', '.join(t['failing'])}"
                if t["missing"]:
                    extra += f"; no time for {', '.join(t['missing'])}"
                targets.append(f"- batch {b}, {title} ({t['layers']} layers): {t['target']}: {val} "
                               f"**{'met' if t['met'] else 'not met'}**{extra}")
    return L + [""] + targets


def render_markdown(env: dict, manifest: dict, rows: list[dict], summary: dict, ours_metric: str,
                    command: str) -> str:
    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d")
    knob_names = next((list(r["best_knobs"]) for r in rows if r["best_knobs"]), [])
    git = manifest.get("git") or {}
    L = [f"## Sparse direct convolution on {env.get('gpu', '?')} ({date})", "",
         f"GPU {env.get('gpu', '?')} (sm_{env.get('capability', '?').replace('.', '')}, {env.get('sms', '?')} SMs, "
         f"L2 {env.get('l2_bytes', 0) / 2**20:.0f} MiB), driver {env.get('driver', '?')}; PyTorch {env.get('torch', '?')} "
         f"(CUDA {env.get('cuda', '?')}), cuDNN {env.get('cudnn', '?')}, Triton {env.get('triton', '?')}; "
         f"TVM runtime {env.get('tvm_runtime', '?')}. Kernels prepared {manifest.get('prepared_at', '?')} from commit "
         f"`{git.get('commit', '?')[:10]}`{' (dirty tree)' if git.get('dirty') else ''} "
         f"(variants: {manifest.get('variants_mode', '?')}).", "",
         f"Commands: `python scripts/bench.py prepare` on the build machine, then on the GPU machine "
         f"(carry `.devbundle` and the prepared folder): `{command}`.", "",
         "Method: conv layers of `measure_anchors.py`, fp32 NCHW, seeded random weights pruned by magnitude, "
         "random bias (kernel only; the baselines have none). Times are medians in ms. "
         f"Baselines and `kernel` are timed with {env.get('bench_impl', 'do_bench')} (warm-up 25 ms, 100 ms of "
         "repeats, L2 flushed before every call), exactly as in `measure_anchors.py`; `pad` is the zero padding "
         "(and reshape) the graph pass emits before a kernel that reads a padded input, timed the same way; "
         f"`ours` = {'kernel (stream)' if ours_metric == 'stream' else 'kernel'} + pad, and every speedup "
         "(baseline / ours) and floor/ours uses it. `kernel (stream)`: the same kernel launched back to back "
         "between two CUDA events (median per launch), cycling over copies of the input whose total exceeds "
         "twice the L2, weights L2-resident. Each kernel variant and baseline is checked before it is timed "
         f"(output poisoned with NaN; relative L2 error vs float64 `F.conv2d`: < {TOL_FP32:g} for fp32, "
         f"< {TOL_REDUCED:g} for TF32 and fp16); a failing variant is never timed. The floor is the larger of "
         "2*nnz*OH*OW*N flops at 67 TFLOP/s and the bytes (input, output, CSR) at 4.3 TB/s.", "",
         "Two kernels of ours: `CSR` is `cuda.register_tiled` (CSR arrays, reads the padded input: its time is "
         "kernel + pad); `specialized` is `cuda.specialized` (weights as immediates in the code, no index arrays, "
         "pads on chip: its time is the kernel alone, or kernel + pad where it reads a padded input, `pad_input`), "
         "built for layers with at most "
         f"{next((r['spec_max_nnz'] for r in rows if r.get('spec_max_nnz')), 'MAX_NONZEROS')} nonzeros, each "
         "kernel in a module of its own, and timed the same way. `best of ours` is the faster of the two per layer "
         "(the CSR kernel where the specialised one is missing); the speedups `x ...` and floor/best in the "
         "per-layer tables use it. Compile seconds are wall time on the build machine.", ""]
    L.append("### Best of our kernels, geometric means over the layers at 90% sparsity, and the targets of issue 3")
    L.append("")
    L += _best_summary_lines(summary) + [""]
    L.append("### CSR kernel alone, geometric means over the layers at 90% sparsity (`layers`: how many have a "
             "passing kernel; `ours` = CSR kernel + pad)")
    L.append("")
    head = (["batch", "layers", "ours", "kernel", "kernel (stream)"] + [BASELINE_TITLES[b] for b in BASELINES]
            + ["floor"] + [f"x {BASELINE_TITLES[b]}" for b in SPEEDUP_VS] + ["floor/ours"])
    L += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for b, g in summary.items():
        L.append("| " + " | ".join([b, f"{g['counted']}/{g['cases']}", _f(g["ours_ms"]), _f(g["ours_kernel_ms"]),
                                    _f(g["ours_stream_ms"])] + [_f(g[x]) for x in BASELINES] + [_f(g["floor_ms"])]
                                   + [_x(g[f"speedup_{x}"]) for x in SPEEDUP_VS] + [_f(g["floor_fraction"], 3)]) + " |")
    L.append("")
    main = [r for r in rows if r["group"] == "main"]
    if main:
        L += ["### Per layer, 90% sparsity", ""] + _md_table(main, knob_names) + [""]
    sweep_keys = {(r["layer"], r["batch"]) for r in rows if r["group"] == "sweep"}
    sweep = sorted([r for r in rows if (r["layer"], r["batch"]) in sweep_keys], key=lambda r: (r["layer"], r["sparsity"]))
    if sweep:
        batches = ", ".join(str(b) for b in sorted({b for _, b in sweep_keys}))
        L += [f"### Sparsity sweep, batch {batches}", ""] + _md_table(sweep, knob_names) + [""]
    spec_rows = [r for r in main + [r for r in sweep if r["group"] == "sweep"] if r.get("specialized")]
    if spec_rows:
        L += ["### Specialised kernel: time, compile cost, code size", "",
              "The variant shown is the fastest passing one (else the default). Compile s: `rule.apply` (the "
              "unrolled program as TIR) + TVM lowering and codegen + nvcc (TVM's own command), wall seconds on the "
              "build machine, each kernel in its own `tvm.compile`; `default compile s`: the default variant's. "
              "SASS: the kernel's `.text` section in its cubin; `.so.xz`: what is carried to the GPU. Registers, "
              "spills and shared memory: ptxas -v of that compile.", ""] + _spec_table(spec_rows) + [""]
    not_built = [f"- {r['layer']} N={r['batch']} sp={r['sparsity']:.2f} (nnz {r['nnz']}): {r['spec_reason']}"
                 for r in main + [r for r in sweep if r["group"] == "sweep"] if r.get("spec_reason")]
    if not_built:
        L += ["### Layers without a specialised kernel", ""] + not_built + [""]
    problems = []
    for r in rows:
        sp = r.get("specialized") or {"variants": []}
        for fam, vs in (("CSR", r["variants"]), ("specialized", sp["variants"])):
            for v in vs:
                if v["status"] != "ok":
                    err = "-" if v["rel_err"] is None else f"{v['rel_err']:.2e}"
                    name = f" {v['name']}" if v.get("name") else ""
                    problems.append(f"- {r['layer']} N={r['batch']} sp={r['sparsity']:.2f} {fam} variant "
                                    f"v{v['variant']}{name} {json.dumps(v['knobs'])}: {v['status']} (rel err {err}) "
                                    f"{v['error'] or ''}".rstrip())
        for x in r.get("spec_skipped") or []:
            problems.append(f"- {r['layer']} N={r['batch']} sp={r['sparsity']:.2f} specialized variant {x['name']} "
                            f"not built: {x['reason']}")
        for b, x in r["baselines"].items():
            if x.get("status") != "ok":
                problems.append(f"- {r['layer']} N={r['batch']} sp={r['sparsity']:.2f} {BASELINE_TITLES.get(b, b)}: "
                                f"{x.get('status')} {x.get('error') or ''} (rel err {x.get('rel_err')})".rstrip())
        if r["skipped"]:
            problems.append(f"- {r['layer']} N={r['batch']} sp={r['sparsity']:.2f}: skipped, {r['skipped']}")
    if problems:
        L += ["### Failures and skips", ""] + problems + [""]
    return "\n".join(L)


def write_reports(out: Path, manifest: dict, ours_metric: str, command: str, plot: bool = False) -> dict:
    records = read_records(out / "raw.jsonl")
    env = next((r for r in reversed(records) if r.get("type") == "env"), {})
    env = {k: v for k, v in env.items() if k != "type"}
    rows = build_rows(manifest, records, ours_metric)
    summary = summarize(rows)
    result = {"env": env, "command": command, "ours_metric": ours_metric,
              "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
              "prepared": {k: manifest.get(k) for k in ("prepared_at", "git", "tvm", "target", "variants_mode",
                                                        "specialized", "timings_s")},
              "method": {"baselines": "triton.testing.do_bench(warmup=25, rep=100, return_mode='median'), L2 flushed "
                                      "before every call (as measure_anchors.py)",
                         "kernel": "same do_bench as the baselines", "pad": "same do_bench; F.pad + reshape",
                         "specialized": "same do_bench, kernel (+ pad where pad_input: the pad op the graph emits)",
                         "best": "per layer the faster of CSR (kernel + pad) and specialized (kernel [+ pad])",
                         "kernel_stream": "median per-launch time of back-to-back launches between CUDA events, "
                                          "input rotated over copies totalling > 2x L2 (see rows[].stream), "
                                          "weights L2-resident",
                         "tolerance": {"fp32": TOL_FP32, "tf32_fp16": TOL_REDUCED},
                         "floor": "max(2*nnz*OH*OW*N / 67e12, 4*(x + y + 2*nnz) / 4.3e12)"},
              "summary": summary, "rows": rows}
    (out / "bench.json").write_text(json.dumps(result, indent=1))
    (out / "bench.md").write_text(render_markdown(env, manifest, rows, summary, ours_metric, command) + "\n")
    if plot:
        try:
            plot_speedups(rows, out / "speedup.png", env.get("gpu", ""))
        except Exception as e:
            log(f"no plot: {short_error(e)}")
    return result


def plot_speedups(rows: list[dict], path: Path, gpu: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:
        log(f"no plot: matplotlib unavailable ({short_error(e)})")
        return
    batches = sorted({r["batch"] for r in rows if r["group"] == "main"})
    if not batches:
        return
    fig, axes = plt.subplots(len(batches), 1, figsize=(14, 4.2 * len(batches)), squeeze=False)
    for ax, b in zip(axes[:, 0], batches):
        rs = [r for r in rows if r["group"] == "main" and r["batch"] == b]
        width = 0.8 / len(SPEEDUP_VS)
        for j, base in enumerate(SPEEDUP_VS):
            vals = [(r.get("speedup_best") or r["speedup"]).get(base) or 0.0 for r in rs]
            ax.bar([k + (j - (len(SPEEDUP_VS) - 1) / 2) * width for k in range(len(rs))], vals, width,
                   label=f"vs {BASELINE_TITLES[base]}")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_yscale("log")
        ax.set_xticks(range(len(rs)))
        ax.set_xticklabels([r["layer"] for r in rs], rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("speedup (baseline / best of ours)")
        ax.set_title(f"sparse direct conv (best of CSR and specialised per layer), 90% sparsity, batch {b} ({gpu})")
        ax.legend(fontsize=8, ncol=4)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    log(f"wrote {path}")


def merge_reports(inputs: list[Path], out: Path, plot: bool = True) -> dict:
    """One report from the ``bench.json`` of several measure runs (say one per batch, each from its own prepared
    folder so each fits a carry): rows concatenated, geomeans and target checks recomputed."""
    results = [json.loads(Path(p).read_text()) for p in inputs]
    rows, seen = [], set()
    for res in results:
        for r in res["rows"]:
            key = (r["layer"], r["batch"], r["sparsity"])
            if key in seen:
                raise ValueError(f"{key} appears in more than one input")
            seen.add(key)
            rows.append(r)
    gpus = {res["env"].get("gpu") for res in results}
    if len(gpus) > 1:
        raise ValueError(f"inputs were measured on different GPUs: {sorted(map(str, gpus))}")
    metrics = {res["ours_metric"] for res in results}
    if len(metrics) > 1:
        raise ValueError(f"inputs use different --ours-metric: {sorted(metrics)}")
    rows.sort(key=lambda r: (r["group"] != "main", r["batch"], r["index"]))
    env, metric = results[0]["env"], results[0]["ours_metric"]
    prepared = dict(results[0]["prepared"])
    dates = sorted({str(res["prepared"].get("prepared_at")) for res in results})
    prepared["prepared_at"] = " and ".join(dates)
    command = " ; ".join(res["command"] for res in results)
    summary = summarize(rows)
    result = {"env": env, "command": command, "ours_metric": metric, "merged_from": [str(p) for p in inputs],
              "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "prepared": prepared,
              "inputs_prepared": [res["prepared"] for res in results], "method": results[0].get("method"),
              "summary": summary, "rows": rows}
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(result, indent=1))
    (out / "bench.md").write_text(render_markdown(env, prepared, rows, summary, metric, command) + "\n")
    if plot:
        try:
            plot_speedups(rows, out / "speedup.png", env.get("gpu", ""))
        except Exception as e:
            log(f"no plot: {short_error(e)}")
    return result


def measure_driver(args) -> int:
    bench_dir, out = Path(args.bench_dir), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    manifest = json.loads((bench_dir / "manifest.json").read_text())
    raw, progress = out / "raw.jsonl", out / "progress.json"
    if not args.resume:
        for p in (raw, progress):
            if p.exists():
                p.unlink()
    t0 = time.time()
    cubin = bench_dir / manifest.get("cubin", "kernels.cubin")
    cuobjdump = shutil.which("cuobjdump")
    if cuobjdump and cubin.exists():
        p = subprocess.run([cuobjdump, "--dump-sass", str(cubin)], capture_output=True, text=True)
        (out / "sass.txt").write_text((p.stdout + p.stderr)[: 8 * 2**20])
    for name in ("resources.txt",):
        if (bench_dir / name).exists():
            shutil.copy(bench_dir / name, out / name)
    command = MEASURE_CMD.replace(" measure ", f" measure --bench-dir {args.bench_dir} ")
    for flag, val in (("--cases", args.cases), ("--budget-s", args.budget_s), ("--ours-metric", args.ours_metric)):
        if val is not None:
            command += f" {flag} {val}"
    cmd = [sys.executable, str(Path(__file__).resolve()), "measure", "--worker", "--bench-dir", str(bench_dir),
           "--out", str(out), "--budget-s", str(args.budget_s), "--ours-metric", args.ours_metric]
    if args.cases:
        cmd += ["--cases", args.cases]
    if args.no_stream:
        cmd += ["--no-stream"]
    env = dict(os.environ, BENCH_T0=str(t0))
    restarts, crashed_parts = 0, set()
    while True:
        child = subprocess.Popen(cmd, env=env)
        last = time.time()
        rc = None
        while rc is None:
            try:
                rc = child.wait(timeout=5)
            except subprocess.TimeoutExpired:
                mt = progress.stat().st_mtime if progress.exists() else last
                if time.time() - max(mt, last) > args.stall_s:
                    log(f"worker made no progress for {args.stall_s:.0f} s: killing it")
                    child.kill()
                    rc = child.wait()
        if rc == 0:
            break
        prog = json.loads(progress.read_text()) if progress.exists() else None
        recs = read_records(raw)
        if prog and not any(r.get("case") == prog["case"] and r.get("part") == prog["part"] for r in recs):
            append_record(raw, {"type": "crash", "case": prog["case"], "part": prog["part"], "status": "CRASH",
                                "error": f"worker died (exit {rc}) in this step"})
        key = (prog or {}).get("case"), (prog or {}).get("part")
        restarts += 1
        if prog is None or key in crashed_parts or restarts > args.max_restarts:
            log(f"worker failed (exit {rc}); giving up after {restarts} restart(s)")
            break
        crashed_parts.add(key)
        log(f"worker exited {rc} in case {key[0]} {key[1]}: restarting ({restarts}/{args.max_restarts})")
    if progress.exists():
        progress.unlink()
    result = write_reports(out, manifest, args.ours_metric, command, plot=True)
    rows = result["rows"]
    log("")
    log(f"{'layer':20s} {'N':>3s} {'sp':>5s} {'csr':>8s} {'kernel':>8s} {'pad':>7s} {'stream':>8s} {'spec':>8s} "
        f"{'best':>8s} {'winner':>16s} " + " ".join(f"{b[:12]:>12s}" for b in BASELINES) + f" {'floor':>7s} "
        + " ".join(f"{'x' + b[:10]:>11s}" for b in SPEEDUP_VS) + f" {'fl/best':>7s}")
    for r in rows:
        log(f"{r['layer']:20s} {r['batch']:3d} {r['sparsity']:5.2f} {_f(r['ours_ms']):>8s} {_f(r['ours_kernel_ms']):>8s} "
            f"{_f(r['pad_ms']):>7s} {_f(r['ours_stream_ms']):>8s} {_f(r['spec_ms']):>8s} {_f(r['best_ms']):>8s} "
            f"{_winner(r):>16s} " + " ".join(f"{_f(r['baselines'].get(b, {}).get('ms')):>12s}" for b in BASELINES)
            + f" {_f(r['floor_ms']):>7s} " + " ".join(f"{_x(r['speedup_best'].get(b)):>11s}" for b in SPEEDUP_VS)
            + f" {_f(r['floor_fraction_best'], 3):>7s}")
    for b, g in result["summary"].items():
        log(f"geomean batch {b} CSR ({g['counted']}/{g['cases']} layers): {_f(g['ours_ms'])} ms, "
            + ", ".join(f"{BASELINE_TITLES[x]} {_f(g[x])}" for x in BASELINES)
            + "; speedup " + ", ".join(f"{_x(g['speedup_' + x])} vs {BASELINE_TITLES[x]}" for x in SPEEDUP_VS))
        for subset, h in g["best"].items():
            log(f"geomean batch {b} best of ours over {subset} ({h['counted']}/{h['cases']} layers, specialised wins "
                f"{h['spec_wins']}): {_f(h['best_ms'])} ms (CSR {_f(h['csr_ms'])}, specialised {_f(h['spec_ms'])}); "
                + ", ".join(f"{_x(h['speedup_' + x])} vs {BASELINE_TITLES[x]}" for x in SPEEDUP_VS))
            for t in h["targets"]:
                val = "-" if t["value"] is None else f"{t['value']:.2f}"
                log(f"  target {t['target']}: {val} {'met' if t['met'] else 'NOT met'}")
    n_skip = sum(bool(r["skipped"]) for r in rows)
    n_fail = sum(r["best_variant"] is None and not r["skipped"] for r in rows)
    n_fail_spec = sum(bool(r["specialized"]) and r["specialized"]["best_variant"] is None and not r["skipped"]
                      for r in rows)
    log(f"wrote {out / 'bench.json'}, {out / 'bench.md'} in {time.time() - t0:.0f} s; "
        f"{n_fail} case(s) without a passing CSR kernel, {n_fail_spec} without a passing specialised kernel "
        f"(of those that have one), {n_skip} skipped")
    return 1 if n_fail or n_fail_spec else 0


# ====================================================================== CLI
def _cases_from_args(a) -> list[dict]:
    if a.quick:
        return make_cases([QUICK_LAYER], [1], sweep=False)
    layers = a.layers.split(",") if a.layers else list(LAYERS)
    unknown = [x for x in layers if x not in LAYERS]
    if unknown:
        raise SystemExit(f"unknown layer(s) {unknown}; known: {', '.join(LAYERS)}")
    batches = [int(b) for b in a.batches.split(",")] if a.batches else list(BATCHES)
    return make_cases(layers, batches, sweep=not a.no_sweep)


def cmd_check(a) -> int:
    t0 = time.time()
    table = dict(LAYERS, **CHECK_LAYERS)
    cases = []
    for layer, batch, sp in CHECK_CASES:
        cases += [dict(c, group="main") for c in make_cases([layer], [batch], sweep=False, table=table)]
        cases[-1]["sparsity"] = sp
    with tempfile.TemporaryDirectory(prefix="bench-check-") as td:
        d = Path(td) / "bench"
        manifest = prepare(d, cases, variants=a.variants or "3", command="bench.py check",
                           spec_variants=a.spec_variants, jobs=a.jobs, spec_cache=Path(td) / "spec-cache")
        problems = verify(d, reapply=True)
        n = sum(len(c["variants"]) for c in manifest["cases"])
    if problems:
        log("check FAILED:\n  " + "\n  ".join(problems))
        return 1
    n_spec = manifest["specialized"]["kernels"]
    log(f"check passed: {len(manifest['cases'])} cases, {n} CSR + {n_spec} specialised kernels, manifest/npz/so "
        f"consistent, symbols found by a runtime-only TVM ({time.time() - t0:.1f} s)")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="build kernels, dense baselines, weights and manifest (needs TVM + nvcc)")
    p.add_argument("--bench-dir", default=str(DEFAULT_BENCH_DIR))
    p.add_argument("--layers", help="comma-separated layer names (default: all 16)")
    p.add_argument("--batches", help="comma-separated batch sizes (default: 1,32)")
    p.add_argument("--variants", default="default",
                   help="default | all | N (default + N-1 alternatives) | a list of knob changes, e.g. "
                        "default,nonzero_split=2,nonzero_split=2+unroll=8")
    p.add_argument("--no-sweep", action="store_true", help="leave out the sparsity sweep")
    p.add_argument("--quick", action="store_true", help=f"one small case: {QUICK_LAYER}, batch 1")
    p.add_argument("--max-kernels", type=int, default=1000, help="refuse to build more kernels than this")
    p.add_argument("--spec-variants", default=None,
                   help=f"specialised kernel variants, 'default' first, then one-knob changes of it "
                        f"({', '.join(SPEC_CHANGES)}); 'none' builds none (default: {SPEC_VARIANTS}; --quick: default)")
    p.add_argument("--spec-max-nnz", type=int, default=None,
                   help="build the specialised kernel only for layers with at most this many nonzeros "
                        "(default and upper bound: schedules.cuda_specialized.MAX_NONZEROS)")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                   help="specialised kernels compiled at a time (child processes)")
    p.add_argument("--spec-variant-nnz", type=int, default=None,
                   help="above this many nonzeros build only the default specialised variant (default: no limit)")
    p.add_argument("--spec-timeout", type=float, default=1800.0,
                   help="wall seconds one specialised kernel's build may take before it is killed and reported")
    p.add_argument("--spec-cache", default=str(DEFAULT_SPEC_CACHE),
                   help="compile cache of specialised kernels (content-keyed; keep it out of the carried folder)")
    m = sub.add_parser("measure", help="check and time on the GPU machine (TVM runtime only)")
    m.add_argument("--bench-dir", default=str(DEFAULT_BENCH_DIR))
    m.add_argument("--out", default=os.environ.get("OUT") or "bench-out")
    m.add_argument("--cases", help="comma-separated case indices or layer names")
    m.add_argument("--budget-s", type=float, default=330.0, help="stop starting new cases after this many seconds")
    m.add_argument("--stall-s", type=float, default=75.0, help="kill a worker that makes no progress this long")
    m.add_argument("--max-restarts", type=int, default=8)
    m.add_argument("--ours-metric", choices=["dobench", "stream"], default="dobench",
                   help="kernel time used for speedups: do_bench like the baselines (default) or back-to-back")
    m.add_argument("--no-stream", action="store_true", help="skip the back-to-back timing")
    m.add_argument("--resume", action="store_true", help="keep $OUT/raw.jsonl and continue it")
    m.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    c = sub.add_parser("check", help="prepare two small cases into a temp dir and verify consistency (no GPU)")
    c.add_argument("--variants", default="3")
    c.add_argument("--spec-variants", default=SPEC_VARIANTS)
    c.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    sb = sub.add_parser("_spec_build", help=argparse.SUPPRESS)
    sb.add_argument("--job", required=True)
    rp = sub.add_parser("report", help="rebuild bench.json/bench.md from a measure output's raw.jsonl (no GPU)")
    rp.add_argument("--bench-dir", default=str(DEFAULT_BENCH_DIR))
    rp.add_argument("--out", required=True, help="the measure output folder (holds raw.jsonl)")
    rp.add_argument("--ours-metric", choices=["dobench", "stream"], default="dobench")
    mg = sub.add_parser("merge", help="one report from several measure outputs (bench.json files)")
    mg.add_argument("inputs", nargs="+", help="bench.json files (or folders holding one)")
    mg.add_argument("--out", required=True)
    i = sub.add_parser("_inspect", help=argparse.SUPPRESS)
    i.add_argument("--bench-dir", default=str(DEFAULT_BENCH_DIR))
    i.add_argument("--allow-stub", action="store_true")
    a = ap.parse_args(argv)

    if a.cmd == "prepare":
        cases = _cases_from_args(a)
        cmd = "python scripts/bench.py " + " ".join(sys.argv[1:] if argv is None else argv)
        sv = a.spec_variants or ("default" if a.quick else SPEC_VARIANTS)
        prepare(Path(a.bench_dir), cases, variants=a.variants, max_kernels=a.max_kernels, command=cmd,
                spec_variants=sv, spec_max_nnz=a.spec_max_nnz, jobs=a.jobs, spec_cache=Path(a.spec_cache),
                spec_timeout_s=a.spec_timeout, spec_variant_nnz=a.spec_variant_nnz)
        return 0
    if a.cmd == "_spec_build":
        try:
            res = build_specialized(json.loads(Path(a.job).read_text()))
        except Exception as e:
            import traceback

            res = {"status": "error", "error": short_error(e), "traceback": traceback.format_exc()[-3000:]}
        print(json.dumps(res))
        return 0
    if a.cmd == "measure":
        return measure_worker(a) if a.worker else measure_driver(a)
    if a.cmd == "check":
        return cmd_check(a)
    if a.cmd == "report":
        manifest = json.loads((Path(a.bench_dir) / "manifest.json").read_text())
        cmd = MEASURE_CMD.replace(" measure ", f" measure --bench-dir {a.bench_dir} ") + " (report rebuilt from raw.jsonl)"
        res = write_reports(Path(a.out), manifest, a.ours_metric, cmd, plot=True)
        log(f"wrote {Path(a.out) / 'bench.md'}: {len(res['rows'])} rows")
        return 0
    if a.cmd == "merge":
        ins = [Path(x) / "bench.json" if Path(x).is_dir() else Path(x) for x in a.inputs]
        res = merge_reports(ins, Path(a.out))
        log(f"wrote {Path(a.out) / 'bench.md'}: {len(res['rows'])} rows from {len(ins)} runs")
        return 0
    if a.cmd == "_inspect":
        print(json.dumps(inspect_bench(Path(a.bench_dir), a.allow_stub)))
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
