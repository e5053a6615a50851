"""Bad input gives a clear exception that names the problem."""
from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest
import tvm
from onnx import TensorProto, helper

import escort_tvm
from escort_tvm.compiler import resolve_target
from _helpers import onnx_model, pruned, randn


@pytest.fixture(scope="module")
def conv_model():
    rng = np.random.default_rng(5)
    w = pruned(rng, (6, 3, 3, 3), 0.8)
    b = randn(rng, (6,))
    model = onnx_model([helper.make_node("Conv", ["x", "w", "b"], ["y"], pads=[1, 1, 1, 1])],
                       [("x", [1, 3, 8, 8])], [("y", [1, 6, 8, 8])], {"w": w, "b": b})
    mod, params = escort_tvm.from_onnx(model)
    return model, mod, params


@pytest.fixture(scope="module")
def built(conv_model):
    _, mod, params = conv_model
    return escort_tvm.build(mod, params, "llvm")


# ---------------------------------------------------------------- params
def test_params_are_named_after_the_onnx_initializers(conv_model):
    _, _, params = conv_model
    assert sorted(params) == ["b", "w"]
    assert params["w"].shape == (6, 3, 3, 3) and params["w"].dtype == np.float32


def test_params_unknown_name(conv_model):
    _, mod, params = conv_model
    with pytest.raises(ValueError, match="not_a_weight"):
        escort_tvm.build(mod, {**params, "not_a_weight": np.zeros(3, np.float32)}, "llvm")


def test_params_wrong_shape(conv_model):
    _, mod, params = conv_model
    with pytest.raises(ValueError, match=r"'w'.*shape.*\(6, 3, 3, 3\)"):
        escort_tvm.build(mod, {**params, "w": np.zeros((6, 3, 5, 5), np.float32)}, "llvm")


def test_params_wrong_dtype(conv_model):
    _, mod, params = conv_model
    with pytest.raises(ValueError, match=r"'b'.*dtype.*float64"):
        escort_tvm.build(mod, {**params, "b": params["b"].astype(np.float64)}, "llvm")


def test_params_missing(conv_model):
    _, mod, params = conv_model
    with pytest.raises(ValueError, match=r"no value in params.*'b'"):
        escort_tvm.build(mod, {"w": params["w"]}, "llvm")
    with pytest.raises(ValueError, match=r"no value in params"):
        escort_tvm.build(mod, None, "llvm")


def test_params_accept_tvm_tensors(conv_model, rng):
    model, mod, params = conv_model
    from _helpers import assert_close, ort_reference

    m = escort_tvm.build(mod, {k: tvm.runtime.tensor(v) for k, v in params.items()}, "llvm")
    x = randn(rng, (1, 3, 8, 8))
    assert_close(m(x), ort_reference(model, {"x": x}))


def test_build_rejects_non_module():
    with pytest.raises(TypeError, match="IRModule"):
        escort_tvm.build("model.onnx", {}, "llvm")


# ---------------------------------------------------------------- targets
@pytest.mark.parametrize("target", ["cpu", "opencl", "llvm -mcpu=skylake", "CUDA", ""])
def test_unknown_target_string(conv_model, target):
    _, mod, params = conv_model
    with pytest.raises(ValueError, match="unknown target"):
        escort_tvm.build(mod, params, target)


@pytest.mark.parametrize("target", [{"kind": "rocm"}, {"kind": "opencl"}, {"arch": "sm_90"}])
def test_unknown_target_dict_kind(conv_model, target):
    _, mod, params = conv_model
    with pytest.raises(ValueError, match="unknown target kind"):
        escort_tvm.build(mod, params, target)


def test_cuda_dict_without_arch_builds(conv_model, tmp_path):
    """Regression: {'kind': 'cuda'} without an arch fell back to sm_50, which nvcc 13 rejects."""
    from escort_tvm.cuda_toolchain import carries_gpu_binary

    _, mod, params = conv_model
    built = escort_tvm.build(mod, params, {"kind": "cuda"})
    want = ("sm_" + tvm.cuda(0).compute_version.replace(".", "")) if tvm.cuda(0).exist else "sm_90"
    assert str(built.target.attrs["arch"]) == want
    assert built.report[0].kernel in ("sparse", "specialized")
    assert carries_gpu_binary(built.export_library(tmp_path / "m.so"))


def test_target_of_wrong_type():
    with pytest.raises(TypeError, match="target"):
        resolve_target(42)


def test_target_forms_resolve():
    assert resolve_target("llvm").kind.name == "llvm"
    assert resolve_target({"kind": "llvm"}).kind.name == "llvm"
    t = resolve_target({"kind": "cuda", "arch": "sm_80"})
    assert t.kind.name == "cuda" and str(t.attrs["arch"]) == "sm_80"
    tt = tvm.target.Target({"kind": "llvm"})
    assert resolve_target(tt) is tt
    assert resolve_target(None).kind.name == ("cuda" if tvm.cuda(0).exist else "llvm")


# ---------------------------------------------------------------- call-time inputs
def test_call_wrong_shape(built, rng):
    with pytest.raises(ValueError, match=r"'x'.*\(1, 3, 8, 9\).*\(1, 3, 8, 8\)"):
        built(randn(rng, (1, 3, 8, 9)))


def test_call_wrong_dtype(built, rng):
    with pytest.raises(TypeError, match=r"'x'.*float64.*float32"):
        built(randn(rng, (1, 3, 8, 8)).astype(np.float64))


def test_call_wrong_number_of_inputs(built, rng):
    x = randn(rng, (1, 3, 8, 8))
    with pytest.raises(TypeError, match=r"1 input.*got 2"):
        built(x, x)
    with pytest.raises(TypeError, match=r"got 0"):
        built()


@pytest.mark.parametrize("value", [[[0.5] * 8] * 8, 3.0, "x"])
def test_call_non_numpy(built, value):
    with pytest.raises(TypeError, match="numpy array"):
        built(value)


def test_call_accepts_non_contiguous(built, rng):
    from _helpers import assert_close

    x = randn(rng, (1, 3, 8, 16))[:, :, :, ::2]
    assert not x.flags["C_CONTIGUOUS"]
    assert_close(built(x), built(np.ascontiguousarray(x)), tol=1e-7)


def test_time_checks_inputs_too(built, rng):
    with pytest.raises(ValueError, match="shape"):
        built.time(randn(rng, (1, 3, 9, 8)), number=1, repeat=1)


# ---------------------------------------------------------------- load
def test_load_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.so"):
        escort_tvm.load(tmp_path / "nope.so")
    with pytest.raises(FileNotFoundError):
        escort_tvm.load(tmp_path)  # a directory is not a model


def test_load_non_elf(tmp_path):
    p = tmp_path / "model.so"
    p.write_bytes(b"this is not a shared library\n" * 10)
    with pytest.raises(ValueError, match="ELF"):
        escort_tvm.load(p)
    empty = tmp_path / "empty.so"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="ELF"):
        escort_tvm.load(empty)


def test_load_executable_elf(tmp_path):
    ls = shutil.which("ls")
    assert ls
    for name in ("ls_copy", "ls_copy.so"):
        p = tmp_path / name
        shutil.copy(ls, p)
        with pytest.raises(ValueError, match=name):
            escort_tvm.load(p)


def test_load_plain_c_shared_library(tmp_path):
    cc = shutil.which("cc") or shutil.which("gcc")
    assert cc, "the CUDA toolchain path of escort_tvm needs a C compiler anyway"
    src = tmp_path / "plain.c"
    src.write_text("int add(int a, int b) { return a + b; }\n")
    so = tmp_path / "plain.so"
    subprocess.run([cc, "-shared", "-fPIC", "-o", str(so), str(src)], check=True)
    with pytest.raises(ValueError, match="not an escort_tvm model"):
        escort_tvm.load(so)


def test_load_tvm_library_that_is_not_an_escort_model(tmp_path, llvm_target):
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True)
    def add_one(a: T.Buffer((4,), "float32"), b: T.Buffer((4,), "float32")):
        for i in range(4):
            with T.sblock("b"):
                vi = T.axis.remap("S", [i])
                b[vi] = a[vi] + T.float32(1)

    lib = tvm.compile(add_one, target=llvm_target)
    so = tmp_path / "add_one.so"
    lib.export_library(str(so))
    with pytest.raises(ValueError, match="not an escort_tvm model"):
        escort_tvm.load(so)


def test_load_unknown_device(built, tmp_path):
    so = built.export_library(tmp_path / "m.so")
    with pytest.raises(ValueError, match="unknown device"):
        escort_tvm.load(so, device="tpu")


# ---------------------------------------------------------------- from_onnx
def test_from_onnx_garbage_file(tmp_path):
    p = tmp_path / "garbage.onnx"
    p.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ValueError, match="garbage.onnx"):
        escort_tvm.from_onnx(p)


def test_from_onnx_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.onnx"):
        escort_tvm.from_onnx(tmp_path / "missing.onnx")


def test_from_onnx_invalid_model():
    graph = helper.make_graph([helper.make_node("NoSuchOp", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(ValueError, match="invalid ONNX model"):
        escort_tvm.from_onnx(model)


def _dynamic_batch_model(rng):
    w = pruned(rng, (4, 3, 3, 3), 0.8)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["data", "w"], ["y"], pads=[1, 1, 1, 1])], "g",
        [helper.make_tensor_value_info("data", TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4, 8, 8])],
        initializer=[__import__("onnx").numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_from_onnx_dynamic_batch_needs_shape_dict(rng):
    model = _dynamic_batch_model(rng)
    with pytest.raises(ValueError, match=r"'data'.*dynamic.*shape_dict"):
        escort_tvm.from_onnx(model)


def test_from_onnx_dynamic_batch_with_shape_dict_builds(rng):
    from _helpers import assert_close, ort_reference

    model = _dynamic_batch_model(rng)
    mod, params = escort_tvm.from_onnx(model, {"data": [3, 3, 8, 8]})
    m = escort_tvm.build(mod, params, "llvm")
    assert m.inputs == [("data", (3, 3, 8, 8), "float32")] and m.report[0].kernel == "sparse"
    x = randn(rng, (3, 3, 8, 8))
    assert_close(m(x), ort_reference(model, {"data": x}))


def test_from_onnx_shape_dict_unknown_name(rng):
    with pytest.raises(ValueError, match="not_an_input"):
        escort_tvm.from_onnx(_dynamic_batch_model(rng), {"data": [1, 3, 8, 8], "not_an_input": [1]})


# ---------------------------------------------------------------- tuning log
def test_tuning_log_missing(conv_model, tmp_path):
    _, mod, params = conv_model
    with pytest.raises(FileNotFoundError, match="no_such_log.jsonl"):
        escort_tvm.build(mod, params, "llvm", tuning_log=tmp_path / "no_such_log.jsonl")


def test_tuning_log_with_unknown_knob(conv_model, tmp_path):
    from escort_tvm import ConvSpec
    from escort_tvm.tuning_log import TuningLog

    _, mod, params = conv_model
    spec = ConvSpec(N=1, C=3, H=8, W=8, K=6, KH=3, KW=3, pad=(1, 1, 1, 1))
    log = tmp_path / "log.jsonl"
    log.write_text(TuningLog.record(spec, 0.8, "cpu.row_vector", {"vector_width": 8, "unroll": 2}, 1.0) + "\n")
    with pytest.raises(ValueError, match="unroll"):
        escort_tvm.build(mod, params, "llvm", tuning_log=log)
