"""Running a built model: the call interface, and ``load`` for exported libraries.

Needs only TVM's runtime (works with ``TVM_USE_RUNTIME_LIB=1``): nothing here imports ``tvm.relax``.
The model's input signature and build report travel inside the ``.so`` as a tiny Relax function
returning their JSON as a uint8 tensor, so one file is all a deployment needs.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

METADATA_FUNC = "escort_tvm_metadata"


def _device(kind: str, device=None):
    import tvm

    if device is None:
        device = kind
    if isinstance(device, str):
        name, _, idx = device.partition(":")
        if name not in ("cpu", "llvm", "cuda", "gpu"):
            raise ValueError(f"unknown device {device!r}: use 'cpu' or 'cuda[:N]'")
        device = tvm.cpu(0) if name in ("cpu", "llvm") else tvm.cuda(int(idx or 0))
    if device.dlpack_device_type() == 2 and not device.exist:  # kDLCUDA
        raise RuntimeError("this model was built for CUDA but no CUDA GPU is visible here")
    return device


def _to_numpy(out):
    if hasattr(out, "numpy"):
        return out.numpy()
    return tuple(_to_numpy(o) for o in out)


class Model:
    """A built model on one device: ``model(*numpy_inputs)`` returns numpy output(s)."""

    def __init__(self, vm_module, meta: dict, device_kind: str, device=None):
        self.meta = meta
        self._module, self._device_kind, self._device_arg = vm_module, device_kind, device
        self._dev = self._vm_obj = None

    @property
    def device(self):
        if self._dev is None:
            self._dev = _device(self._device_kind, self._device_arg)
        return self._dev

    @property
    def _vm(self):
        """The VM is made on first use, so a CUDA build can be made and exported on a machine without a GPU."""
        if self._vm_obj is None:
            import tvm.runtime.vm

            self._vm_obj = tvm.runtime.vm.VirtualMachine(self._module, self.device)
        return self._vm_obj

    @property
    def inputs(self) -> list[tuple[str, tuple, str]]:
        return [(n, tuple(s), d) for n, s, d in self.meta["inputs"]]

    @property
    def report(self):
        from .report import ConvReport

        return [ConvReport(**r) for r in self.meta.get("report", [])]

    def _check(self, inputs) -> list[np.ndarray]:
        sig = self.inputs
        if len(inputs) != len(sig):
            names = ", ".join(n for n, _, _ in sig)
            raise TypeError(f"model takes {len(sig)} input(s) ({names}), got {len(inputs)}")
        arrays = []
        for value, (name, shape, dtype) in zip(inputs, sig):
            if not isinstance(value, np.ndarray):
                raise TypeError(f"input {name!r} must be a numpy array, got {type(value).__name__}")
            if value.dtype != np.dtype(dtype):
                raise TypeError(f"input {name!r} has dtype {value.dtype}, the model expects {dtype}")
            if tuple(value.shape) != shape:
                raise ValueError(f"input {name!r} has shape {tuple(value.shape)}, the model expects {shape}")
            arrays.append(np.ascontiguousarray(value))
        return arrays

    def __call__(self, *inputs):
        import tvm

        args = [tvm.runtime.tensor(a, self.device) for a in self._check(inputs)]
        return _to_numpy(self._vm["main"](*args))

    def time(self, *inputs, number: int = 10, repeat: int = 5) -> list[float]:
        """Median-ready per-call times in seconds (device-synchronised, through TVM's time_evaluator)."""
        import tvm

        args = [tvm.runtime.tensor(a, self.device) for a in self._check(inputs)]
        res = self._vm.time_evaluator("main", self.device, number=number, repeat=repeat)(*args)
        return list(res.results)


def read_metadata(vm_module, device) -> dict:
    import tvm.runtime.vm

    vm = tvm.runtime.vm.VirtualMachine(vm_module, device)
    return json.loads(bytes(vm[METADATA_FUNC]().numpy()).decode())


def _all_modules(mod):
    yield mod
    for m in mod.imports:
        yield from _all_modules(m)


def load(path, device=None) -> Model:
    """Load a library written by ``CompiledModel.export_library`` (TVM runtime alone suffices)."""
    import tvm

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no exported model at {path}")
    if path.read_bytes()[:4] != b"\x7fELF":
        raise ValueError(f"{path} is not a shared library (no ELF header): not an exported escort_tvm model")
    from .cuda_toolchain import FATBIN_MAGIC, load_cuda_runtime

    if FATBIN_MAGIC in path.read_bytes():  # TVM's CUDA runtime must be registered before the load
        load_cuda_runtime(allow_stub=False)
    try:
        lib = tvm.runtime.load_module(str(path))
    except Exception as e:  # TVM raises its own error types
        raise ValueError(f"cannot load {path} as a TVM library: {str(e).splitlines()[-1]}") from None
    kind = "cuda" if any(m.kind == "cuda" for m in _all_modules(lib)) else "cpu"
    dev = _device(kind, device)
    try:
        meta = read_metadata(lib, dev)
    except Exception:
        raise ValueError(f"{path} is a TVM library but not an escort_tvm model (no {METADATA_FUNC})") from None
    return Model(lib, meta, kind, dev)
