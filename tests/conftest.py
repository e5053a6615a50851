"""Shared fixtures for the escort_tvm suite.

The repository root goes first on sys.path so the tests exercise this checkout (CI also installs it).
GPU tests carry ``@pytest.mark.gpu`` and skip unless TVM sees a CUDA device.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))


def _gpu_present() -> bool:
    import tvm

    try:
        return bool(tvm.cuda(0).exist)
    except Exception:
        return False


def pytest_collection_modifyitems(config, items):
    if not any(item.get_closest_marker("gpu") for item in items):
        return
    if _gpu_present():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (tvm.cuda(0).exist is False)")
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(skip)


@pytest.fixture
def rng(request):
    """A generator seeded from the test's id, so every test gets its own reproducible data."""
    import zlib

    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture(scope="session")
def llvm_target():
    import tvm

    return tvm.target.Target({"kind": "llvm"})


@pytest.fixture(scope="session")
def cuda_target():
    import tvm

    from escort_tvm.cuda_toolchain import prepare_cuda_build

    prepare_cuda_build()
    dev = tvm.cuda(0)
    arch = "sm_" + dev.compute_version.replace(".", "") if dev.exist else "sm_90"
    return tvm.target.Target({"kind": "cuda", "arch": arch})


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return ROOT


@pytest.fixture
def runtime_env():
    """Environment for a fresh runtime-only Python process that imports this checkout."""
    env = dict(os.environ)
    env["TVM_USE_RUNTIME_LIB"] = "1"
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env
