"""CUDA builds on a machine without a GPU: the device code must be compiled into a fatbin.

Nothing here runs a kernel (see test_gpu.py for that); it checks that the sparse kernels become
__global__ functions of the CUDA module and that an export embeds GPU machine code, not source.
"""
from __future__ import annotations

import re

import numpy as np
import pytest
import tvm

import escort_tvm
from escort_tvm import ConvSpec, Epilogue, SparseConvWeight
from escort_tvm.cuda_toolchain import carries_gpu_binary
from escort_tvm.models import small_pruned_cnn
from schedules import CUDAKnobs, SparseConvCUDA, SpecializedCUDA
from _helpers import (CONV_CASES, GLOBAL_FN, all_modules, cover_shape, cuda_source, func_name, knob_cover, pruned,
                      randn)


def _has_gpu():
    return bool(tvm.cuda(0).exist)


@pytest.fixture(scope="module")
def cuda_cnn():
    model = small_pruned_cnn(batch=2, size=16, seed=3)
    mod, params = escort_tvm.from_onnx(model)
    return model, escort_tvm.build(mod, params, "cuda")


def test_cuda_build_compiles_every_sparse_kernel_for_the_device(cuda_cnn):
    _, built = cuda_cnn
    assert built.target.kind.name == "cuda"
    rep = built.report
    sparse = [r for r in rep if r.kernel != "dense"]
    assert [r.index for r in sparse] == [1, 2, 3, 4, 5], built.report_text()
    assert all(r.schedule.startswith(SpecializedCUDA.name) and r.kernel == "specialized" for r in sparse)  # auto: all fit
    kinds = [m.kind for m in all_modules(built.executable.mod)]
    assert "cuda" in kinds
    globals_ = set(re.findall(GLOBAL_FN, cuda_source(built.executable)))
    for r in sparse:
        assert f"escort_sparse_conv{r.index}_kernel" in globals_, sorted(globals_)
    assert "escort_sparse_conv0_kernel" not in globals_  # the dense stem has no sparse kernel
    # each specialised kernel went through nvcc alone (escort_tvm.separate_compile): one CUDA module each
    per_module = [set(re.findall(GLOBAL_FN, m.inspect_source())) for m in all_modules(built.executable.mod)
                  if m.kind == "cuda"]
    for r in sparse:
        assert {f"escort_sparse_conv{r.index}_kernel"} in per_module, per_module


def test_cuda_build_at_batch_1_takes_the_staged_input_form_through_the_graph(tmp_path):
    """At batch 1 the dilated 5x3 conv on 15x15 outputs gets the CSR kernel's staged-input form, whose int64
    nonzero words reach the kernel as int64 constants (relax.const alone would make them int32, and the call
    would not type-check), and the model exports with a fatbin."""
    built = escort_tvm.build(*escort_tvm.from_onnx(small_pruned_cnn(batch=1, seed=1)), "cuda")
    staged = [r for r in built.report if r.kernel == "sparse" and "'stage_input': True" in r.schedule]
    assert [r.index for r in staged] == [5], built.report_text()
    assert "staged-input form" in " ".join(staged[0].notes)
    assert "escort_sparse_conv5_kernel" in set(re.findall(GLOBAL_FN, cuda_source(built.executable)))
    assert carries_gpu_binary(built.export_library(tmp_path / "m.so"))


def test_cuda_export_embeds_fatbin_not_source(cuda_cnn, tmp_path):
    _, built = cuda_cnn
    so = built.export_library(tmp_path / "cnn_cuda.so")
    data = so.read_bytes()
    assert data[:4] == b"\x7fELF"
    assert carries_gpu_binary(so) is True
    assert b"__global__" not in data, "the export carries CUDA source: it would need a compiler to run"
    assert b"escort_sparse_conv1_kernel" in data  # the kernel's symbol is in the fatbin / launch table


@pytest.mark.skipif(_has_gpu(), reason="checks the behaviour without a GPU; test_gpu.py runs it with one")
def test_cuda_build_without_gpu_refuses_to_run(cuda_cnn, tmp_path, rng):
    _, built = cuda_cnn
    x = randn(rng, (2, 3, 16, 16))
    with pytest.raises(RuntimeError, match="CUDA"):
        built(x)
    so = built.export_library(tmp_path / "cnn_cuda.so")
    with pytest.raises(RuntimeError, match="CUDA"):
        escort_tvm.load(so)


@pytest.mark.skipif(_has_gpu(), reason="checks the behaviour without a GPU; test_gpu.py runs it with one")
def test_cuda_export_in_fresh_process_without_driver(cuda_cnn, tmp_path, runtime_env):
    """A runtime-only process on a machine with no CUDA driver gets a clear error, not a crash."""
    import subprocess
    import sys

    _, built = cuda_cnn
    so = built.export_library(tmp_path / "cnn_cuda.so")
    code = ("import sys, escort_tvm\n"
            "try:\n"
            "    escort_tvm.load(sys.argv[1])\n"
            "except RuntimeError as e:\n"
            "    print('RuntimeError:', e)\n"
            "    sys.exit(3)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(so)], env=runtime_env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 3, (proc.returncode, proc.stdout, proc.stderr[-2000:])
    assert "CUDA" in proc.stdout


@pytest.mark.parametrize("target", [{"kind": "cuda", "arch": "sm_80"}, {"kind": "cuda", "arch": "sm_90"}])
def test_cuda_build_with_explicit_arch(target, rng, tmp_path):
    from onnx import helper

    from _helpers import onnx_model

    w = pruned(rng, (8, 4, 3, 3), 0.9)
    model = onnx_model([helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])],
                       [("x", [1, 4, 9, 9])], [("y", [1, 8, 9, 9])], {"w": w})
    mod, params = escort_tvm.from_onnx(model)
    built = escort_tvm.build(mod, params, target)
    assert str(built.target.attrs["arch"]) == target["arch"]
    assert built.report[0].kernel == "specialized"  # auto: a small layer gets the kernel with weights in code
    assert "escort_sparse_conv0_kernel" in set(re.findall(GLOBAL_FN, cuda_source(built.executable)))
    assert carries_gpu_binary(built.export_library(tmp_path / "m.so"))


# ---------------------------------------------------------------- schedule variants
COVER = knob_cover(CUDAKnobs)
SHAPES = {name: (spec, sp) for name, spec, sp in CONV_CASES}
VARIANT_SHAPES = ["3x3_s2", "dilation_2x3_5x3", "batch3_grouped_s2", "11x11_s4", "depthwise"]


def test_knob_cover_covers_the_space():
    assert 1 <= len(COVER) <= 8
    for name, vals in CUDAKnobs.SPACE.items():
        assert {getattr(k, name) for k in COVER} == set(vals), name


@pytest.mark.parametrize("i", range(len(COVER)), ids=[f"cover{i}" for i in range(len(COVER))])
def test_cuda_schedule_variants_compile_to_device_kernels(cuda_target, rng, tmp_path, i):
    knobs = COVER[i]
    spec, sparsity = SHAPES[cover_shape(knobs, SHAPES, VARIANT_SHAPES, i)]
    lib = _compile_and_check(cuda_target, rng, spec, sparsity, knobs, relu=bool(i % 2))
    lib.export_library(str(tmp_path / "k.so"))
    data = (tmp_path / "k.so").read_bytes()
    assert carries_gpu_binary(tmp_path / "k.so") and b"__global__" not in data


@pytest.mark.parametrize("case", ["1x1", "7x7_s2", "asym_pad", "batch3"])
def test_cuda_schedule_default_knobs_compile(cuda_target, rng, case):
    spec, sparsity = SHAPES[case]
    _compile_and_check(cuda_target, rng, spec, sparsity, None, relu=True)


def _compile_and_check(target, rng, spec, sparsity, knobs, relu):
    w = pruned(rng, spec.weight_shape, sparsity)
    sw = SparseConvWeight.from_dense(w, spec.groups)
    plan = SparseConvCUDA().apply(spec, sw, Epilogue(relu=relu), knobs)
    if knobs is not None:
        assert plan.knobs == knobs
    x = randn(rng, spec.input_shape)
    from _helpers import kernel_input

    xin = kernel_input(plan, x, spec)
    assert xin.shape[0] >= spec.N and np.isfinite(xin).all()
    with target:
        lib = tvm.compile(plan.func, target=target)
    kernels = re.findall(GLOBAL_FN, cuda_source(lib))
    assert f"{func_name(plan.func)}_kernel" in kernels, kernels
    host = [m for m in all_modules(lib.mod) if m.kind == "llvm"]
    assert host, "no host module"
    return lib


def test_sparse_cuda_kernel_input_fits_int32(rng):
    """A conv whose CUDA kernel input (N+extra)*C*hp*wp would pass 2**31 elements stays dense. Regression: the
    pass bounded N*C*(Hp+1)*(Wp+64), less than the CUDA pitch. Compile-only: 4.4 GB of input never allocated."""
    from onnx import helper

    from _helpers import onnx_model

    w = pruned(rng, (8, 1024, 3, 3), 0.9)
    model = onnx_model([helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])],
                       [("x", [64, 1024, 129, 129])], [("y", [64, 8, 129, 129])], {"w": w})
    mod, params = escort_tvm.from_onnx(model)
    built = escort_tvm.build(mod, params, "cuda", kernel="sparse")  # the CSR kernel's padded pitch is the issue
    (r,) = built.report
    spec = ConvSpec(N=64, C=1024, H=129, W=129, K=8, KH=3, KW=3, pad=(1, 1, 1, 1))
    assert spec.N * spec.C * (spec.Hp + 1) * (spec.Wp + 64) < 2**31  # the old guard let this through
    plan = SparseConvCUDA().apply(spec, SparseConvWeight.from_dense(w), Epilogue())
    assert (spec.N + plan.extra_images) * spec.C * plan.hp * plan.wp >= 2**31
    assert r.kernel == "dense" and "32-bit" in r.reason, built.report_text()


def test_sparse_cuda_kernel_output_fits_int32(rng):
    """Compile-only: N=128, K=4096, 64x64 output (8 GiB) is never allocated."""
    from onnx import helper

    from _helpers import onnx_model

    w = pruned(rng, (4096, 16, 1, 1), 0.9)
    model = onnx_model([helper.make_node("Conv", ["x", "w"], ["y"])],
                       [("x", [128, 16, 64, 64])], [("y", [128, 4096, 64, 64])], {"w": w})
    mod, params = escort_tvm.from_onnx(model)
    built = escort_tvm.build(mod, params, "cuda")
    (r,) = built.report
    assert 128 * 4096 * 64 * 64 >= 2**31
    assert r.kernel == "dense" and "32-bit" in r.reason, (
        "sparse kernel writes 2**31 output elements; its source indexes y as: "
        + next((ln.strip()[:160] for ln in cuda_source(built.executable).splitlines() if "y_ptr[" in ln), "?"))


def test_pad_on_chip_offsets_carry_each_nonzero_tap(rng):
    """The packed offset of pad_on_chip: the plain (C, H, W) offset below bit 24, kh * dh and kw * dw above; with
    tap_mask, the offset shifted up by MASK_SHIFT over the kernel position's index kh * KW + kw."""
    from schedules.cuda import MASK_SHIFT, TAP_SHIFT

    spec = ConvSpec(N=1, C=5, H=9, W=11, K=4, KH=3, KW=5, pad=(1, 2, 1, 2), dilation=(2, 1))
    sw = SparseConvWeight.from_dense(pruned(rng, spec.weight_shape, 0.6))
    rule = SparseConvCUDA()
    compares = rule.default_knobs(spec, sw).with_(pad_on_chip=True, tap_mask=False)
    plan = rule.apply(spec, sw, Epilogue(), compares)
    assert (plan.hp, plan.wp, plan.extra_images) == (spec.H, spec.W, 0)  # the graph pass emits no pad op
    packed = plan.weight_arrays[1].view(np.uint32).astype(np.int64)
    assert np.array_equal(packed & ((1 << TAP_SHIFT) - 1), sw.stretched_offsets(spec.H, spec.W, spec.dilation))
    assert np.array_equal((packed >> TAP_SHIFT) & 15, sw.kh * 2) and np.array_equal(packed >> (TAP_SHIFT + 4), sw.kw)
    masked = rule.apply(spec, sw, Epilogue(), compares.with_(tap_mask=True)).weight_arrays[1].astype(np.int64)
    assert np.array_equal(masked >> MASK_SHIFT, sw.stretched_offsets(spec.H, spec.W, spec.dilation))
    assert np.array_equal(masked & ((1 << MASK_SHIFT) - 1), sw.kh * spec.KW + sw.kw)
    seven = ConvSpec(N=1, C=3, H=12, W=12, K=4, KH=7, KW=7, pad=(3, 3, 3, 3))
    w7 = SparseConvWeight.from_dense(pruned(rng, seven.weight_shape, 0.5))
    with pytest.raises(ValueError, match="tap_mask keeps one bit per kernel position in 32 bits.*has 49"):
        rule.apply(seven, w7, Epilogue(), compares.with_(tap_mask=True))
    with pytest.raises(ValueError, match="tap_mask is a way of pad_on_chip"):
        compares.with_(pad_on_chip=False, tap_mask=True).validate()
    # the offsets' room: below 2^24 with the compares, below 2^26 with the mask (int32, 5 bits of index)
    for c, tap_mask in ((1 << 10, False), (1 << 12, True)):  # C*H*W = 2^24, 2^26
        big = ConvSpec(N=1, C=c, H=128, W=128, K=4, KH=3, KW=3, pad=(1, 1, 1, 1))
        wb = SparseConvWeight.from_dense(np.eye(4, c, dtype=np.float32)[:, :, None, None] * np.ones((3, 3), np.float32))
        knobs = SparseConvCUDA().default_knobs(big, wb).with_(pad_on_chip=True, tap_mask=tap_mask)
        with pytest.raises(ValueError, match=f"pad_on_chip packs offsets below 2\\^{26 if tap_mask else 24}"):
            SparseConvCUDA().apply(big, wb, Epilogue(), knobs)


def test_small_batch_defaults_put_more_nonzeros_in_flight(rng):
    """Below LARGE_BATCH: 8 loads in flight, padding on chip by tap mask up to 32 kernel positions (compares,
    on the old rule, beyond), and the nonzeros split while the grid stays under FILL_WARPS warps and blocks
    under 512 threads; at batch 32 none of it (measured at batch 1 only)."""
    from schedules.cuda import FILL_WARPS, SPLIT_BLOCK_THREADS

    rule = SparseConvCUDA()

    def knobs(spec):
        return rule.default_knobs(spec, SparseConvWeight.from_dense(pruned(rng, spec.weight_shape, 0.9)))

    # alexnet.conv3's shape at batch 2 (at batch 1 the staged-input form takes it: test_cuda_staged.py)
    conv3 = ConvSpec(N=2, C=256, H=13, W=13, K=384, KH=3, KW=3, pad=(1, 1, 1, 1))
    k = knobs(conv3)
    assert (k.unroll, k.pad_on_chip, k.tap_mask, k.nonzero_split) == (8, True, True, 4)
    assert rule.warps(conv3, k) <= FILL_WARPS < rule.warps(conv3, k.with_(nonzero_split=8)) or \
        k.threads_x * k.threads_y * 8 > SPLIT_BLOCK_THREADS
    l4 = ConvSpec(N=1, C=512, H=7, W=7, K=512, KH=3, KW=3, pad=(1, 1, 1, 1))  # resnet50.l4.3x3: one-warp blocks
    assert knobs(l4).nonzero_split == 8
    stem = knobs(ConvSpec(N=1, C=3, H=224, W=224, K=64, KH=7, KW=7, stride=(2, 2), pad=(3, 3, 3, 3)))
    assert not stem.tap_mask and not stem.pad_on_chip  # 49 positions: compares, and 112x112 is past their rule
    one = knobs(ConvSpec(N=1, C=1024, H=7, W=7, K=2048, KH=1, KW=1))
    assert not one.pad_on_chip and one.unroll == 8 and one.nonzero_split == 8
    big = knobs(ConvSpec(N=32, C=256, H=13, W=13, K=384, KH=3, KW=3, pad=(1, 1, 1, 1)))
    assert (big.unroll, big.pad_on_chip, big.tap_mask, big.nonzero_split) == (1, False, False, 1)


def test_cuda_builds_compress_the_fatbin_for_size(cuda_target, rng):
    """escort_tvm installs its nvcc callback (--compress-mode=size): a kernel compiled on its own would
    otherwise ship ~2.5x larger (escort_tvm.cuda_toolchain.FATBIN_COMPRESSION)."""
    import tvm_ffi
    from tvm.support import nvcc

    from escort_tvm import cuda_toolchain

    if cuda_toolchain.os.environ.get("TVM_CUDA_COMPILE_MODE", "nvrtc").lower() != "nvcc":
        pytest.skip("NVRTC builds make a cubin, not a fatbin")
    spec = ConvSpec(N=1, C=16, H=12, W=12, K=32, KH=3, KW=3, pad=(1, 1, 1, 1))
    plan = SpecializedCUDA().apply(spec, SparseConvWeight.from_dense(pruned(rng, spec.weight_shape, 0.7)), Epilogue())
    with cuda_target:
        lib = tvm.compile(tvm.IRModule({"k": plan.func.with_attr("global_symbol", "k")}), target=cuda_target)
        source = cuda_source(lib)
        ours = tvm_ffi.get_global_func("tvm_callback_cuda_compile")(source)  # what TVM's CUDA codegen calls
        default = nvcc.compile_cuda(source, target_format="fatbin", compiler="nvcc")  # TVM's own callback's
    # nvcc's default mode leaves a small fatbin as it is (59856 bytes here, as with --compress-mode=none): 12120
    assert bytes(ours[:8]) == cuda_toolchain.FATBIN_MAGIC and len(ours) < 0.5 * len(default), (len(ours), len(default))


@pytest.mark.parametrize("rule", ["csr", "specialized"])
def test_prefetch_l2_covers_the_input_and_csr_arrays_once(cuda_target, rng, rule):
    """prefetch_l2: the grid's threads ask L2 for every 128-byte line of the input (and of the CSR offsets and
    values), each line once: one guarded prefetch per thread and array, lines numbered by the thread's global id."""
    spec = ConvSpec(N=1, C=16, H=9, W=9, K=16, KH=3, KW=3, pad=(1, 1, 1, 1))
    sw = SparseConvWeight.from_dense(pruned(rng, spec.weight_shape, 0.8))
    r = SparseConvCUDA() if rule == "csr" else SpecializedCUDA()
    plan = r.apply(spec, sw, Epilogue(), r.default_knobs(spec, sw).with_(prefetch_l2=True))
    with cuda_target:
        src = cuda_source(tvm.compile(plan.func, target=cuda_target))
    calls = re.findall(r"escort_prefetch_l2\(\(&\((\w+)\[", src)
    assert sorted(calls) == (["offset_ptr", "value_ptr", "x_ptr"] if rule == "csr" else ["_ptr"]), calls
    input_lines = -(-int(np.prod(plan.func.params[0].ty.shape)) // 32)
    assert f"< {input_lines})" in src  # the input's lines, each prefetched by the thread of that global id
    plain = r.apply(spec, sw, Epilogue(), r.default_knobs(spec, sw))
    with cuda_target:
        assert "escort_prefetch_l2" not in cuda_source(tvm.compile(plain.func, target=cuda_target))
