"""examples/deploy_runtime_only.{py,cc}: an llvm .so run in fresh runtime-only processes (TVM_USE_RUNTIME_LIB=1,
Python with and without escort_tvm) and by a C++ program linked against TVM's runtime library alone."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import escort_tvm
from escort_tvm.models import small_pruned_cnn
from _helpers import assert_close, ort_reference, randn


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = small_pruned_cnn(batch=2, size=16, seed=31)
    built = escort_tvm.build(*escort_tvm.from_onnx(model), "llvm")
    d = tmp_path_factory.mktemp("deploy")
    return model, built, built.export_library(d / "model.so"), d


def test_python_example_with_escort_tvm_load(exported, repo_root, runtime_env, rng):
    model, built, so, d = exported
    x = randn(rng, (2, 3, 16, 16))
    np.save(d / "x.npy", x)
    proc = subprocess.run([sys.executable, str(repo_root / "examples" / "deploy_runtime_only.py"), str(so),
                           "--input", str(d / "x.npy"), "--output", str(d / "y.npy")],
                          env=runtime_env, capture_output=True, text=True, timeout=180, cwd=d)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "runtime only: True; tvm.relax loaded: False" in proc.stdout
    assert "('input', (2, 3, 16, 16), 'float32')" in proc.stdout
    y = np.load(d / "y.npy")
    assert_close(y, built(x).astype(np.float64), tol=1e-6)
    assert_close(y, ort_reference(model, {"input": x}))


def test_python_example_plain_tvm_runtime_without_escort_tvm(exported, repo_root, rng, tmp_path):
    model, built, so, _ = exported
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["TVM_USE_RUNTIME_LIB"] = "1"
    # a copy of the script alone, away from the checkout: escort_tvm cannot be imported there
    script = tmp_path / "deploy_runtime_only.py"
    shutil.copy(repo_root / "examples" / "deploy_runtime_only.py", script)
    check = subprocess.run([sys.executable, "-c", "import escort_tvm"], env=env, cwd=tmp_path,
                           capture_output=True, text=True)
    if check.returncode == 0:
        pytest.skip("escort_tvm is installed in this Python: cannot show the plain path does without it")
    x = randn(rng, (2, 3, 16, 16))
    np.save(tmp_path / "x.npy", x)
    proc = subprocess.run([sys.executable, str(script), str(so), "--plain", "--input", "x.npy", "--output", "y.npy"],
                          env=env, capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "runtime only: True; tvm.relax loaded: False" in proc.stdout
    assert_close(np.load(tmp_path / "y.npy"), ort_reference(model, {"input": x}))


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
def test_cpp_example_with_tvm_runtime_only(exported, repo_root, rng, tmp_path):
    """The C++ example links libtvm_runtime + libtvm_ffi only (not libtvm_compiler) and gives the same numbers."""
    import tvm
    import tvm_ffi

    model, built, so, _ = exported
    tvm_dir, ffi_dir = Path(tvm.__file__).parent, Path(tvm_ffi.__file__).parent
    exe = tmp_path / "deploy"
    cc = subprocess.run(["g++", "-std=c++17", "-O1", str(repo_root / "examples" / "deploy_runtime_only.cc"),
                         f"-I{tvm_dir / 'include'}", f"-I{ffi_dir / 'include'}", f"-L{tvm_dir / 'lib'}",
                         f"-L{ffi_dir / 'lib'}", "-ltvm_runtime", "-ltvm_ffi", f"-Wl,-rpath,{tvm_dir / 'lib'}",
                         f"-Wl,-rpath,{ffi_dir / 'lib'}", "-o", str(exe)], capture_output=True, text=True, timeout=300)
    assert cc.returncode == 0, cc.stderr[-3000:]
    ldd = subprocess.run(["ldd", str(exe)], capture_output=True, text=True).stdout
    assert "libtvm_runtime.so" in ldd and "libtvm_compiler" not in ldd
    x = randn(rng, (2, 3, 16, 16))
    x.tofile(tmp_path / "x.f32")
    proc = subprocess.run([str(exe), str(so), str(tmp_path / "x.f32"), "2", "3", "16", "16"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert '"inputs": [["input", [2, 3, 16, 16], "float32"]]' in proc.stdout
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("output"))
    head, values = line.split(":", 1)
    assert head == "output 2 10"
    y = np.array([float(v) for v in values.split()], np.float32).reshape(2, 10)
    assert_close(y, built(x).astype(np.float64), tol=1e-6)
    assert_close(y, ort_reference(model, {"input": x}))


def test_cli_run_works_runtime_only(exported, runtime_env, rng):
    model, built, so, d = exported
    x = randn(rng, (2, 3, 16, 16))
    np.save(d / "x_cli.npy", x)
    code = ("import sys; from escort_tvm.cli import main; rc = main(sys.argv[1:]); "
            "print('relax:', 'tvm.relax' in sys.modules, 'compiler:', 'escort_tvm.compiler' in sys.modules); "
            "sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code, "run", str(so), "--input", str(d / "x_cli.npy"), "--output",
                           str(d / "y_cli.npy"), "--repeat", "2", "--number", "1"], env=runtime_env,
                          capture_output=True, text=True, timeout=180, cwd=d)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "relax: False compiler: False" in proc.stdout and "latency" in proc.stdout
    assert_close(np.load(d / "y_cli.npy"), ort_reference(model, {"input": x}))
