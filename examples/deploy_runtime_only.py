"""Run a model exported by escort-tvm on a machine with only the TVM runtime (no compiler, no nvcc).

    TVM_USE_RUNTIME_LIB=1 python3 deploy_runtime_only.py model.so [--input x.npy] [--output y.npy] [--plain]

Two ways, same result:
- ``escort_tvm.load`` (the default): the package's loader, which checks inputs against the signature
  embedded in the .so and loads TVM's CUDA runtime when the .so carries GPU code;
- ``--plain``: TVM's runtime API and nothing of escort_tvm, for a deployment that ships only the .so.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TVM_USE_RUNTIME_LIB", "1")  # before tvm is imported: the runtime library alone

import numpy as np


def run_with_escort_tvm(path: str, x: np.ndarray | None, device: str | None):
    import escort_tvm

    model = escort_tvm.load(path, device=device)  # reads the signature and report embedded in the .so
    if x is None:
        (_, shape, dtype), = model.inputs
        x = np.random.default_rng(0).standard_normal(shape).astype(dtype)
    return model.inputs, x, model(x)


def run_with_plain_tvm(path: str, x: np.ndarray | None, device: str | None):
    import tvm
    import tvm.runtime.vm

    use_cuda = (device or "").startswith("cuda")
    if use_cuda:  # with TVM_USE_RUNTIME_LIB=1 the CUDA backend is not loaded by itself
        ctypes.CDLL(str(Path(tvm.__file__).parent / "lib" / "libtvm_runtime_cuda.so"), ctypes.RTLD_GLOBAL)
    lib = tvm.runtime.load_module(path)
    dev = tvm.cuda(int(device.partition(":")[2] or 0)) if use_cuda else tvm.cpu(0)
    vm = tvm.runtime.vm.VirtualMachine(lib, dev)
    meta = json.loads(bytes(vm["escort_tvm_metadata"]().numpy()).decode())  # embedded by escort_tvm.build
    (name, shape, dtype), = meta["inputs"]
    if x is None:
        x = np.random.default_rng(0).standard_normal(shape).astype(dtype)
    if list(x.shape) != shape or str(x.dtype) != dtype:
        sys.exit(f"input must be {dtype} {shape}, got {x.dtype} {list(x.shape)}")
    y = vm["main"](tvm.runtime.tensor(x, dev))
    return [(name, tuple(shape), dtype)], x, y.numpy()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="a .so written by escort-tvm compile / CompiledModel.export_library")
    ap.add_argument("--input", help=".npy input (default: seeded random normal of the model's input shape)")
    ap.add_argument("--output", help="save the output as .npy")
    ap.add_argument("--device", default=None, help="cpu or cuda[:N] (default: what the model was built for; "
                                                    "--plain: cpu unless given)")
    ap.add_argument("--plain", action="store_true", help="use TVM's runtime API only, not escort_tvm")
    a = ap.parse_args(argv)
    x = np.load(a.input) if a.input else None
    run = run_with_plain_tvm if a.plain else run_with_escort_tvm
    inputs, x, y = run(a.model, x, a.device)
    import tvm.base

    print(f"runtime only: {bool(tvm.base._RUNTIME_ONLY)}; tvm.relax loaded: {'tvm.relax' in sys.modules}")
    print(f"inputs: {inputs}")
    print(f"output: shape {y.shape}, first values {np.round(y.ravel()[:5], 5).tolist()}")
    if a.output:
        np.save(a.output, y)
    return 0


if __name__ == "__main__":
    sys.exit(main())
