"""Make CUDA builds carry compiled GPU code, also on a machine with no GPU driver.

TVM's CUDA runtime library links the driver (libcuda.so.1); where the driver is absent the runtime is
not loaded, and a CUDA build then silently embeds CUDA *source*, which a deployment machine can only
run with a compiler present. Here we load a real driver if there is one, else a do-nothing stub built
on first use, then TVM's CUDA runtime, so ``tvm.compile`` produces a fatbin (through nvcc unless the
NVRTC bindings are installed).
"""
from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from pathlib import Path

# The driver entry points TVM's CUDA runtime library resolves at load time.
_DRIVER_SYMBOLS = ("cuInit", "cuDriverGetVersion", "cuDeviceGetName", "cuFuncSetAttribute", "cuGetErrorName",
                   "cuGetErrorString", "cuLaunchKernelEx", "cuModuleGetFunction", "cuModuleLoadData",
                   "cuModuleUnload", "cuTensorMapEncodeTiled")
_ready = False


def tvm_lib_dir() -> Path:
    import tvm

    return Path(tvm.__file__).parent / "lib"


def cuda_runtime_loaded() -> bool:
    import tvm_ffi

    return tvm_ffi.get_global_func("ffi.Module.create.cuda", allow_missing=True) is not None


def load_cuda_runtime(allow_stub: bool) -> None:
    """Load TVM's CUDA runtime into this process (with the real driver, or the stub if allowed)."""
    if cuda_runtime_loaded():
        return
    try:
        ctypes.CDLL("libcuda.so.1", ctypes.RTLD_GLOBAL)
    except OSError:
        if not allow_stub:
            raise RuntimeError("no CUDA driver (libcuda.so.1) on this machine: cannot run CUDA code here") from None
        ctypes.CDLL(str(_driver_stub()), ctypes.RTLD_GLOBAL)
    lib = tvm_lib_dir() / "libtvm_runtime_cuda.so"
    if not lib.exists():
        raise RuntimeError(f"this TVM has no CUDA runtime ({lib} is missing)")
    ctypes.CDLL(str(lib), ctypes.RTLD_GLOBAL)


def _driver_stub() -> Path:
    cache = Path(os.environ.get("ESCORT_TVM_CACHE", Path.home() / ".cache" / "escort_tvm")) / "driver-stub"
    so = cache / "libcuda.so.1"
    if so.exists():
        return so
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("building for CUDA without a GPU driver needs a C compiler (cc/gcc) for a driver stub")
    cache.mkdir(parents=True, exist_ok=True)
    src = cache / "stub.c"
    src.write_text("".join(f"int {s}(void){{return 100;}}\n" for s in _DRIVER_SYMBOLS))
    tmp = cache / f"libcuda.so.1.{os.getpid()}"
    subprocess.run([cc, "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o", str(tmp), str(src)], check=True)
    tmp.replace(so)
    return so


# nvcc's default fatbin compression packs a kernel compiled on its own (escort_tvm.separate_compile) ~2.5x less
# tightly than this mode: a 14.7k-nonzero specialised kernel's fatbin is 683 KB by default, 272 KB with it
# (1.68 MB uncompressed); ResNet-50 at batch 1 exported 41 MB with one nvcc call per kernel, 29 MB with one
# call for all. The driver decompresses once, when the module loads.
FATBIN_COMPRESSION = "--compress-mode=size"


def _compile_with_size_compression(code):
    from tvm.support import nvcc

    if os.environ.get("TVM_CUDA_COMPILE_MODE", "nvrtc").lower() != "nvcc":
        return nvcc.tvm_callback_cuda_compile(code)  # TVM's own callback (NVRTC makes a cubin: nothing to pack)
    return nvcc.compile_cuda(code, target_format="fatbin", compiler="nvcc", options=[FATBIN_COMPRESSION])


def prepare_cuda_build() -> None:
    """Call before ``tvm.compile`` for a CUDA target."""
    global _ready
    if _ready:
        return
    try:
        import cuda.bindings  # noqa: F401  (TVM's default NVRTC path)
        have_nvrtc = True
    except ImportError:
        have_nvrtc = False
    if not have_nvrtc:
        if shutil.which("nvcc") is None:
            raise RuntimeError("building for CUDA needs nvcc on PATH (or the cuda-bindings package for NVRTC)")
        os.environ.setdefault("TVM_CUDA_COMPILE_MODE", "nvcc")
    load_cuda_runtime(allow_stub=True)
    import tvm.support.nvcc  # noqa: F401  (registers TVM's callback first, so ours replaces it)
    import tvm_ffi

    tvm_ffi.register_global_func("tvm_callback_cuda_compile", _compile_with_size_compression, override=True)
    _ready = True


# A fatbin container header: magic 0xBA55ED50, version 1, header size 16 (little endian).
FATBIN_MAGIC = b"\x50\xed\x55\xba\x01\x00\x10\x00"


def carries_gpu_binary(path) -> bool:
    """True if an exported library embeds a CUDA fatbin (not just CUDA source)."""
    return FATBIN_MAGIC in Path(path).read_bytes()
