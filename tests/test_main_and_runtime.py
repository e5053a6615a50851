"""The package's main job (python -m escort_tvm) and the Model helpers."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

import escort_tvm
from escort_tvm.models import magnitude_prune, small_pruned_cnn
from _helpers import assert_close, ort_reference, randn


def test_main_job_passes_on_llvm(repo_root):
    env = dict(os.environ)
    env["PYTHONPATH"] = str(repo_root) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    # small flags keep it fast; the README runs it at 224x224
    proc = subprocess.run([sys.executable, "-m", "escort_tvm", "--target", "llvm", "--seed", "3", "--image-size", "32",
                           "--batch", "2", "--repeat", "2"], env=env, capture_output=True, text=True, timeout=300,
                          cwd=repo_root)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    out = proc.stdout
    assert "resnet50 pruned to 0.9, batch 2, 32x32, target llvm" in out
    assert "check: PASS" in out
    assert "53 conv2d:" in out and " 0 conv1.weight " in out and "layer4.2.conv3.weight" in out
    assert "relative error escort-tvm vs onnxruntime (CPU)" in out and "relative error escort-tvm vs TVM dense" in out
    assert "x vs TVM dense" in out and "latency, median of 2 measurements" in out
    assert "[1/6] making resnet50 from the zoo" in proc.stderr and "[6/6] timing" in proc.stderr


def test_main_job_bad_flag_is_one_line(repo_root):
    env = dict(os.environ)
    env["PYTHONPATH"] = str(repo_root)
    proc = subprocess.run([sys.executable, "-m", "escort_tvm", "--target", "llvm", "--model", "alexnet",
                           "--image-size", "32"], env=env, capture_output=True, text=True, timeout=120, cwd=repo_root)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "escort-tvm: error: image_size 32 is too small for alexnet" in proc.stderr


def test_model_time_and_repeat_calls(rng):
    model = small_pruned_cnn(batch=1, size=12, seed=4)
    mod, params = escort_tvm.from_onnx(model)
    built = escort_tvm.build(mod, params, "llvm")
    x = randn(rng, (1, 3, 12, 12))
    times = built.time(x, number=2, repeat=3)
    assert len(times) == 3 and all(t > 0 for t in times)
    ref = ort_reference(model, {"input": x})
    # the VM keeps no state between calls: the same input gives the same answer, a new one a new answer
    a, b = built(x), built(x)
    np.testing.assert_array_equal(a, b)
    assert_close(a, ref)
    x2 = randn(rng, (1, 3, 12, 12))
    assert_close(built(x2), ort_reference(model, {"input": x2}))


def test_magnitude_prune():
    w = np.random.default_rng(0).standard_normal((16, 8, 3, 3)).astype(np.float32)
    p = magnitude_prune(w, 0.9)
    assert p.dtype == np.float32
    assert np.count_nonzero(p) == round(0.1 * w.size)
    kept = p != 0
    np.testing.assert_array_equal(p[kept], w[kept])
    assert np.abs(w[~kept]).max() <= np.abs(w[kept]).min()
    np.testing.assert_array_equal(magnitude_prune(w, 0.0), w)


@pytest.mark.parametrize("batch,size", [(1, 32), (3, 20)])
def test_small_pruned_cnn_model_is_valid(batch, size):
    import onnx

    model = small_pruned_cnn(batch=batch, size=size, sparsity=0.8, seed=2)
    onnx.checker.check_model(model)
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    assert len(convs) == 6
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    for n in convs[1:]:
        w = inits[n.input[1]]
        assert abs((1 - np.count_nonzero(w) / w.size) - 0.8) < 0.01
    assert np.count_nonzero(inits[convs[0].input[1]]) == inits[convs[0].input[1]].size
