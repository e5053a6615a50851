"""Streaming probe (not a product kernel): read x[32,256,56,56] in several per-thread patterns, under the
layer bench's timing (triton do_bench, L2 flushed before every run), against a copy and cuDNN on the same shape.

Build here: nvcc -cubin -O3 -arch=sm_90 scripts/probes/stream_1x1.cu -o scripts/probes/stream_1x1.cubin
Run there: python3 scripts/probes/stream_1x1.py $OUT   (CuPy, PyTorch, Triton; no TVM). Results: docs/bench/stream.
"""
import json, os, sys
import cupy as cp, torch, triton
here = os.path.dirname(os.path.abspath(__file__))
mod = cp.RawModule(path=os.path.join(here, "stream_1x1.cubin"))
N, C, K, HW = 32, 256, 64, 3136
x = cp.random.standard_normal((N, C, 56, 56), dtype=cp.float32)
y = cp.empty((N, K, 56, 56), cp.float32)
rd, wr = x.nbytes, y.nbytes
out = {}
def run(name, V, KV, regs_note=""):
    f = mod.get_function(name)
    grid = ((N * HW // V + 127) // 128, K // KV)
    call = lambda: f(grid, (128,), (x, y))
    call(); cp.cuda.Device().synchronize()
    ms = triton.testing.do_bench(call, warmup=50, rep=300, return_mode="median")
    by = rd * (K // KV) + wr
    out[name] = {"ms": ms, "TBps_unique": (rd + wr) / ms / 1e9, "groups": K // KV}
    print(f"{name:8s} {ms*1e3:8.1f} us  {(rd+wr)/ms/1e9:5.2f} TB/s unique bytes  ({K//KV} groups)", flush=True)
run("p1", 1, 64); run("p1cg", 1, 64); run("p1cs", 1, 64); run("p1lu", 1, 64); run("p1k64", 1, 64); run("p2k64", 2, 64); run("p2k32", 2, 32); run("p4k32", 4, 32); run("p4k16", 4, 16)
f = mod.get_function("r1"); call = lambda: f(((N * HW + 127) // 128,), (128,), (x, y))
ms = triton.testing.do_bench(call, warmup=50, rep=300, return_mode="median"); out["r1"] = {"ms": ms}
print(f"r1 (read only) {ms*1e3:8.1f} us {rd/ms/1e9:5.2f} TB/s", flush=True)
tx = torch.randn(N, C, 56, 56, device="cuda"); ty = torch.empty(N, C, 56, 56, device="cuda")
ms = triton.testing.do_bench(lambda: ty.copy_(tx), warmup=50, rep=300, return_mode="median"); out["copy"] = {"ms": ms}
print(f"torch copy 103MB {ms*1e3:8.1f} us {2*rd/ms/1e9:5.2f} TB/s", flush=True)
w = torch.randn(K, C, 1, 1, device="cuda")
for tf in (False, True):
    torch.backends.cudnn.allow_tf32 = tf
    torch.nn.functional.conv2d(tx, w)
    ms = triton.testing.do_bench(lambda: torch.nn.functional.conv2d(tx, w), warmup=50, rep=300, return_mode="median")
    out[f"cudnn_{'tf32' if tf else 'fp32'}"] = {"ms": ms}
    print(f"cudnn {'tf32' if tf else 'fp32'} {ms*1e3:8.1f} us {(rd+wr)/ms/1e9:5.2f} TB/s", flush=True)
f = mod.get_function("empty_kernel")
for grid in (1, 132, 1024):
    call = lambda: f((grid,), (128,), (x, y))
    ms = triton.testing.do_bench(call, warmup=50, rep=300, return_mode="median"); out[f"empty_{grid}"] = {"ms": ms}
    print(f"empty kernel, {grid} blocks: {ms*1e3:6.2f} us", flush=True)
json.dump(out, open(os.path.join(sys.argv[1], "stream.json"), "w"), indent=1)
