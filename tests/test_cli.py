"""The escort-tvm command line: every subcommand, progress on stderr, one-line errors with exit codes."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from escort_tvm.cli import main
from escort_tvm.models import small_pruned_cnn
from _helpers import assert_close, onnx_model, ort_reference, pruned, randn

SUBCOMMANDS = ["compile", "run", "inspect", "prune", "zoo", "bench"]


def cli(*argv, env=None, cwd=None, timeout=300):
    """Run ``python -m escort_tvm.cli`` in a fresh process (what the console script runs)."""
    from conftest import ROOT

    e = dict(os.environ if env is None else env)
    e["PYTHONPATH"] = str(ROOT) + (os.pathsep + e["PYTHONPATH"] if e.get("PYTHONPATH") else "")
    return subprocess.run([sys.executable, "-m", "escort_tvm.cli", *map(str, argv)], env=e, cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def cnn_file(tmp_path_factory):
    model = small_pruned_cnn(batch=2, size=16, seed=21)
    path = tmp_path_factory.mktemp("cli") / "cnn.onnx"
    onnx.save(model, str(path))
    return model, path


def test_help_lists_commands_and_each_command_has_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for c in SUBCOMMANDS:
        assert c in out
    for c in SUBCOMMANDS:
        with pytest.raises(SystemExit) as e:
            main([c, "--help"])
        assert e.value.code == 0
        assert f"usage: escort-tvm {c}" in capsys.readouterr().out


def test_compile_then_run_matches_onnxruntime(cnn_file, tmp_path, rng, capsys):
    model, path = cnn_file
    so = tmp_path / "out" / "cnn.so"
    assert main(["compile", str(path), "-o", str(so), "--target", "llvm"]) == 0
    cap = capsys.readouterr()
    assert so.is_file()
    assert "6 conv2d: 5 sparse, 1 dense" in cap.out and f"wrote {so}" in cap.out
    assert "[1/3] importing" in cap.err and "[2/3] building for llvm" in cap.err and "[3/3] exporting" in cap.err
    x = randn(rng, (2, 3, 16, 16))
    np.save(tmp_path / "x.npy", x)
    assert main(["run", str(so), "--input", str(tmp_path / "x.npy"), "--output", str(tmp_path / "y.npy"),
                 "--repeat", "2", "--number", "1"]) == 0
    out = capsys.readouterr().out
    assert "output: shape 2x10 float32" in out and "top-5" in out and "latency (cpu" in out
    assert "2 measurements" in out
    assert_close(np.load(tmp_path / "y.npy"), ort_reference(model, {"input": x}))
    # named input form, and no timing
    assert main(["run", str(so), "--input", f"input={tmp_path / 'x.npy'}", "--repeat", "0"]) == 0
    assert "latency" not in capsys.readouterr().out


def test_inspect_plans_like_compile(cnn_file, capsys):
    _, path = cnn_file
    assert main(["inspect", str(path), "--target", "llvm", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    kernels = [c["kernel"] for c in info["convs"]]
    assert kernels == ["dense"] + ["sparse"] * 5
    assert "below min_sparsity" in info["convs"][0]["reason"]
    assert info["inputs"] == [["input", [2, 3, 16, 16], "float32"]]
    assert main(["inspect", str(path), "--min-sparsity", "0.95", "--target", "llvm"]) == 0
    out = capsys.readouterr().out
    assert "6 conv2d: 0 sparse, 6 dense" in out and "Conv 6" in out and "input input: 2x3x16x16 float32" in out


def test_zoo_then_inspect_resnet50(tmp_path, capsys):
    out = tmp_path / "r50.onnx"
    assert main(["zoo", "resnet50", "-o", str(out), "--image-size", "32", "--sparsity", "0.9", "--batch", "2"]) == 0
    assert "53 convs" in capsys.readouterr().out
    m = onnx.load(str(out))
    assert [d.dim_value for d in m.graph.input[0].type.tensor_type.shape.dim] == [2, 3, 32, 32]
    assert main(["inspect", str(out), "--target", "llvm", "--json"]) == 0
    convs = json.loads(capsys.readouterr().out)["convs"]
    assert len(convs) == 53 and convs[0]["kernel"] == "dense" and convs[0]["name"] == "conv1.weight"
    assert sum(c["kernel"] == "sparse" for c in convs) >= 40
    assert all(abs(c["sparsity"] - 0.9) < 1e-3 for c in convs[1:])


def test_prune_command(cnn_file, tmp_path, capsys):
    model, path = cnn_file
    out = tmp_path / "p.onnx"
    assert main(["prune", str(path), "-o", str(out), "--sparsity", "0.95", "--global", "--prune-first"]) == 0
    text = capsys.readouterr().out
    assert "global scope" in text and f"wrote {out}" in text
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(out)).graph.initializer}
    assert np.count_nonzero(inits["stem.weight"]) < inits["stem.weight"].size
    before = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    np.testing.assert_array_equal(inits["conv3_depthwise.weight"], before["conv3_depthwise.weight"])
    assert "overall sparsity of the pruned convs 0.950" in text


def test_bench_command(cnn_file, tmp_path, capsys):
    _, path = cnn_file
    js = tmp_path / "b.json"
    assert main(["bench", str(path), "--target", "llvm", "--repeat", "2", "--number", "1", "--json", str(js)]) == 0
    cap = capsys.readouterr()
    assert "check: PASS" in cap.out and "TVM dense" in cap.out and "x vs TVM dense" in cap.out
    assert "[5/5] timing" in cap.err
    res = json.loads(js.read_text())
    assert res["ok"] and set(res["median_ms"]) >= {"escort-tvm", "TVM dense"}
    assert res["errors"]["escort-tvm vs onnxruntime (CPU)"] < 1e-4
    assert all(len(v) == 2 and min(v) > 0 for v in res["times_ms"].values())


def _dynamic_batch_model(rng, path):
    w = pruned(rng, (8, 4, 3, 3), 0.9)
    model = onnx_model([helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])],
                       [("x", [1, 4, 6, 6])], [("y", [1, 8, 6, 6])], {"w": w})
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "N"
    model.graph.output[0].type.tensor_type.shape.dim[0].dim_param = "N"
    onnx.save(model, str(path))
    return model


def test_dynamic_batch_needs_input_shape(tmp_path, rng, capsys):
    model = _dynamic_batch_model(rng, tmp_path / "dyn.onnx")
    assert main(["compile", str(tmp_path / "dyn.onnx"), "-o", str(tmp_path / "d.so"), "--target", "llvm", "-q"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("escort-tvm: error: input 'x' has a dynamic or missing shape ['N', 4, 6, 6]")
    assert len(err.strip().splitlines()) == 1
    assert main(["compile", str(tmp_path / "dyn.onnx"), "-o", str(tmp_path / "d.so"), "--target", "llvm", "-q",
                 "--input-shape", "x:3x4x6x6"]) == 0
    capsys.readouterr()
    x = randn(rng, (3, 4, 6, 6))
    np.save(tmp_path / "x.npy", x)
    assert main(["run", str(tmp_path / "d.so"), "--input", str(tmp_path / "x.npy"), "--output",
                 str(tmp_path / "y.npy"), "--repeat", "0"]) == 0
    assert_close(np.load(tmp_path / "y.npy"), ort_reference(model, {"x": x}))


@pytest.mark.parametrize("argv,rc,message", [
    (["compile", "{d}/missing.onnx", "-o", "{d}/m.so", "--target", "llvm"], 1,
     "ONNX model {d}/missing.onnx does not exist"),
    (["compile", "{d}/junk.onnx", "-o", "{d}/m.so", "--target", "llvm"], 1, "does not parse as an ONNX model"),
    (["compile", "{d}/cnn.onnx", "-o", "{d}/m.so", "--target", "tpu"], 1, "unknown target 'tpu'"),
    (["compile", "{d}/cnn.onnx", "-o", "{d}/m.so", "--target", "{{kind: cuda"], 1, "is not valid JSON"),
    (["compile", "{d}/cnn.onnx", "-o", "{d}/m.so", "--input-shape", "x=1x2"], 1, "expected NAME:DIMS"),
    (["compile", "{d}/cnn.onnx", "-o", "{d}/m.so", "--tuning-log", "{d}/no.jsonl"], 1, "tuning log"),
    (["compile", "{d}/cnn.onnx", "-o", "{d}/m.so", "--min-sparsity", "-1"], 2, "must be >= 0"),
    (["compile", "{d}/unsupported.onnx", "-o", "{d}/m.so", "--target", "llvm"], 1, "TVM cannot import this ONNX model"),
    (["inspect", "{d}/unsupported.onnx"], 1, "Det"),
    (["run", "{d}/cnn.onnx"], 1, "is not a shared library"),
    (["run", "{d}/nothere.so"], 1, "no exported model at"),
    (["prune", "{d}/cnn.onnx", "-o", "{d}/p.onnx", "--sparsity", "1"], 2, "must be in [0, 1)"),
    (["prune", "{d}/cnn.onnx", "-o", "{d}/p.onnx"], 2, "the following arguments are required: --sparsity"),
    (["zoo", "lenet", "-o", "{d}/z.onnx"], 2, "invalid choice: 'lenet'"),
    (["zoo", "alexnet", "-o", "{d}/z.onnx", "--image-size", "32"], 1, "image_size 32 is too small for alexnet"),
    (["bench", "{d}/missing.onnx", "--target", "llvm"], 1, "does not exist"),
    ([], 2, "the following arguments are required: COMMAND"),
])
def test_errors_are_one_line_with_exit_code(argv, rc, message, cnn_file, tmp_path):
    _, path = cnn_file
    d = tmp_path
    (d / "cnn.onnx").write_bytes(path.read_bytes())
    (d / "junk.onnx").write_bytes(b"\x00 not an onnx model")
    onnx.save(helper.make_model(
        helper.make_graph([helper.make_node("Det", ["x"], ["y"])], "g",  # Det: no TVM converter
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 3])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])]),
        opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(d / "unsupported.onnx"))
    proc = cli(*[a.format(d=d) for a in argv], timeout=120)
    assert proc.returncode == rc, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    # ours: "escort-tvm: error: ..."; argparse's usage errors: "escort-tvm COMMAND: error: ..." after the usage
    err_lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("escort-tvm") and ": error: " in ln]
    assert len(err_lines) == 1, proc.stderr
    assert message.format(d=d) in err_lines[0], proc.stderr


def test_traceback_flag_shows_traceback(tmp_path):
    proc = cli("run", tmp_path / "nothere.so", "--traceback")
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "FileNotFoundError" in proc.stderr


def test_wrong_input_shape_is_reported(cnn_file, tmp_path, capsys):
    _, path = cnn_file
    so = tmp_path / "m.so"
    assert main(["compile", str(path), "-o", str(so), "--target", "llvm", "-q"]) == 0
    np.save(tmp_path / "bad.npy", np.zeros((1, 3, 16, 16), np.float32))
    assert main(["run", str(so), "--input", str(tmp_path / "bad.npy")]) == 1
    assert "escort-tvm: error: input 'input' has shape (1, 3, 16, 16), the model expects (2, 3, 16, 16)" in \
        capsys.readouterr().err
    assert main(["run", str(so), "--input", f"image={tmp_path / 'bad.npy'}"]) == 1
    assert "has no input 'image'" in capsys.readouterr().err


@pytest.mark.skipif(bool(__import__("tvm").cuda(0).exist), reason="checks the message given without a GPU")
def test_bench_cuda_without_gpu_fails_early(cnn_file, capsys):
    _, path = cnn_file
    assert main(["bench", str(path), "--target", "cuda", "-q"]) == 1
    assert "benchmarking a CUDA build needs a CUDA GPU here" in capsys.readouterr().err


def test_kernel_choice_is_passed_through(cnn_file, capsys):
    _, path = cnn_file
    assert main(["inspect", str(path), "--target", "llvm", "--json", "--kernel", "dense"]) == 0
    assert [c["kernel"] for c in json.loads(capsys.readouterr().out)["convs"]] == ["dense"] * 6
    assert main(["inspect", str(path), "--target", "llvm", "--json", "--kernel", "sparse"]) == 0
    assert [c["kernel"] for c in json.loads(capsys.readouterr().out)["convs"]] == ["dense"] + ["sparse"] * 5
    with pytest.raises(SystemExit) as e:
        main(["compile", str(path), "-o", "x.so", "--kernel", "magic"])
    assert e.value.code == 2


def test_kernel_choices_match_the_pass():
    from relay_passes.kernel_choice import KERNELS
    from escort_tvm.cli import build_parser

    compile_parser = build_parser()._subparsers._group_actions[0].choices["compile"]
    kernel = next(a for a in compile_parser._actions if a.dest == "kernel")
    assert tuple(kernel.choices) == tuple(KERNELS)


def test_compile_takes_the_specialized_budget_and_jobs(cnn_file, tmp_path, capsys):
    _, path = cnn_file
    so = tmp_path / "cnn.so"
    assert main(["compile", str(path), "-o", str(so), "--target", "llvm", "--kernel", "specialized",
                 "--specialized-budget", "0", "--jobs", "1"]) == 0
    out = capsys.readouterr().out
    assert "6 conv2d: 5 sparse, 1 dense" in out and "specialised-kernel budget (0 nonzeros left)" in out, out
    for bad in (["--specialized-budget", "-1"], ["--jobs", "0"]):
        with pytest.raises(SystemExit):
            main(["compile", str(path), "-o", str(so), *bad])
