// Streaming probe for resnet50.l1.1x1in at batch 32 (x[32,256,56,56] -> y[32,64,56,56], NCHW fp32):
// how fast can one pass read the input in each access pattern, with 64 accumulators' worth of stores?
// Not a conv: each input value feeds a few FMAs into accumulators (enough to keep the loads live).
#define N 32
#define C 256
#define K 64
#define HW 3136
// one pixel per thread, channel loop unrolled (the specialised flat kernel's pattern); LD is the load's cache hint
struct LdNc { static __device__ float ld(const float* p) { return __ldg(p); } };    // LDG.E.CONSTANT
struct LdCg { static __device__ float ld(const float* p) { return __ldcg(p); } };   // L2 only
struct LdCs { static __device__ float ld(const float* p) { return __ldcs(p); } };   // evict-first, LDG.E.EF
struct LdLu { static __device__ float ld(const float* p) { return __ldlu(p); } };   // last use, LDG.E.LU
template <class LD>
__device__ void one_pixel(const float* __restrict__ x, float* __restrict__ y) {
  int g = blockIdx.x * 128 + threadIdx.x;
  if (g >= N * HW) return;
  int n = g / HW, p = g % HW;
  const float* xp = x + (size_t)n * C * HW + p;
  float acc[K];
#pragma unroll
  for (int j = 0; j < K; ++j) acc[j] = 0.f;
#pragma unroll
  for (int c = 0; c < C; ++c) {
    float v = LD::ld(xp + c * HW);
#pragma unroll
    for (int r = 0; r < 6; ++r) acc[(c * 7 + r * 13) % K] += v * (1.0f + r);
  }
  float* yp = y + (size_t)n * K * HW + p;
#pragma unroll
  for (int j = 0; j < K; ++j) yp[j * HW] = acc[j];
}
extern "C" __global__ void __launch_bounds__(128) p1(const float* __restrict__ x, float* __restrict__ y) { one_pixel<LdNc>(x, y); }
extern "C" __global__ void __launch_bounds__(128) p1cg(const float* __restrict__ x, float* __restrict__ y) { one_pixel<LdCg>(x, y); }
extern "C" __global__ void __launch_bounds__(128) p1cs(const float* __restrict__ x, float* __restrict__ y) { one_pixel<LdCs>(x, y); }
extern "C" __global__ void __launch_bounds__(128) p1lu(const float* __restrict__ x, float* __restrict__ y) { one_pixel<LdLu>(x, y); }
// V pixels per thread (vector loads), KV accumulators per pixel, KG = K / KV groups of channels (grid.y)
template <int V, int KV>
__device__ void pv(const float* __restrict__ x, float* __restrict__ y) {
  int g = (blockIdx.x * blockDim.x + threadIdx.x) * V;
  if (g >= N * HW) return;
  int n = g / HW, p = g % HW;  // HW % V == 0
  int k0 = blockIdx.y * KV;
  const float* xp = x + (size_t)n * C * HW + p;
  float acc[KV][V];
#pragma unroll
  for (int j = 0; j < KV; ++j)
#pragma unroll
    for (int e = 0; e < V; ++e) acc[j][e] = 0.f;
#pragma unroll
  for (int c = 0; c < C; ++c) {
    float v[V];
    if (V == 4) { float4 t = __ldg((const float4*)(xp + c * HW)); v[0] = t.x; v[1] = t.y; v[2] = t.z; v[3] = t.w; }
    else if (V == 2) { float2 t = __ldg((const float2*)(xp + c * HW)); v[0] = t.x; v[1] = t.y; }
    else v[0] = __ldg(xp + c * HW);
#pragma unroll
    for (int r = 0; r < 6 * KV / K + 1; ++r)
#pragma unroll
      for (int e = 0; e < V; ++e) acc[(c * 7 + r * 13) % KV][e] += v[e] * (1.0f + r);
  }
  float* yp = y + (size_t)n * K * HW + (size_t)k0 * HW + p;
#pragma unroll
  for (int j = 0; j < KV; ++j) {
    if (V == 4) *(float4*)(yp + j * HW) = make_float4(acc[j][0], acc[j][1], acc[j][2], acc[j][3]);
    else if (V == 2) *(float2*)(yp + j * HW) = make_float2(acc[j][0], acc[j][1]);
    else yp[j * HW] = acc[j][0];
  }
}
extern "C" __global__ void __launch_bounds__(128) p2k32(const float* __restrict__ x, float* __restrict__ y) { pv<2, 32>(x, y); }
extern "C" __global__ void __launch_bounds__(128) p4k16(const float* __restrict__ x, float* __restrict__ y) { pv<4, 16>(x, y); }
extern "C" __global__ void __launch_bounds__(128) p2k64(const float* __restrict__ x, float* __restrict__ y) { pv<2, 64>(x, y); }
extern "C" __global__ void __launch_bounds__(128) p4k32(const float* __restrict__ x, float* __restrict__ y) { pv<4, 32>(x, y); }
extern "C" __global__ void __launch_bounds__(128) p1k64(const float* __restrict__ x, float* __restrict__ y) { pv<1, 64>(x, y); }
// read-only: the same 1-pixel pattern, the sum of all channels stored once (no 64-channel store burst)
extern "C" __global__ void __launch_bounds__(128) r1(const float* __restrict__ x, float* __restrict__ y) {
  int g = blockIdx.x * 128 + threadIdx.x;
  if (g >= N * HW) return;
  int n = g / HW, p = g % HW;
  const float* xp = x + (size_t)n * C * HW + p;
  float s = 0.f;
#pragma unroll 32
  for (int c = 0; c < C; ++c) s += __ldg(xp + c * HW);
  y[g] = s;
}
extern "C" __global__ void empty_kernel(const float* __restrict__ x, float* __restrict__ y) {}
