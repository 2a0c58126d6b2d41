// Skinny products for decoding: y[r, c] = sum_k x[r, k] * w[c, k] for r < m rows (m <= MAXM, the decode batch)
// and c < n output features, w row-major [n, k] as a linear layer stores it. At batch 1-16 a decode step is a
// stream over the weights, so this is bandwidth-bound: one warp per output feature reads its weight row once in
// 16-byte vectors (8 halves) and uses it for every row of x (x is small and stays in L1/L2). fp32 accumulation.
// Requires k % 8 == 0 and 16-byte aligned rows (the launcher checks k; cudarc allocations are 256-byte aligned).
// block 256 (8 features), grid ceil(n / 8).
#include "common.cuh"

template <int MAXM>
__device__ __forceinline__ void gemv_body(__half* __restrict__ y, const __half* __restrict__ x, const __half* __restrict__ w, int m, int k, int n) {
    const int warps = blockDim.x / WARP, lane = threadIdx.x % WARP;
    const int c = blockIdx.x * warps + threadIdx.x / WARP;
    if (c >= n) return;  // uniform across the warp
    const uint4* wr = reinterpret_cast<const uint4*>(w + (long long)c * k);
    const int kv = k / 8;
    float acc[MAXM];
#pragma unroll
    for (int r = 0; r < MAXM; r++) acc[r] = 0.0f;
#pragma unroll 4
    for (int i = lane; i < kv; i += WARP) {
        const uint4 wv = __ldg(wr + i);
        const __half2* wh = reinterpret_cast<const __half2*>(&wv);
        float2 wf[4];
#pragma unroll
        for (int j = 0; j < 4; j++) wf[j] = __half22float2(wh[j]);
#pragma unroll
        for (int r = 0; r < MAXM; r++) {
            if (r < m) {
                const uint4 xv = __ldg(reinterpret_cast<const uint4*>(x + (long long)r * k) + i);
                const __half2* xh = reinterpret_cast<const __half2*>(&xv);
                float s = 0.0f;
#pragma unroll
                for (int j = 0; j < 4; j++) {
                    const float2 xf = __half22float2(xh[j]);
                    s += xf.x * wf[j].x + xf.y * wf[j].y;
                }
                acc[r] += s;
            }
        }
    }
#pragma unroll
    for (int r = 0; r < MAXM; r++) {
        if (r < m) {
            const float s = warp_sum(acc[r]);
            if (lane == 0) y[(long long)r * n + c] = __float2half_rn(s);
        }
    }
}

extern "C" __global__ void __launch_bounds__(256) gemv_m1_f16(__half* y, const __half* x, const __half* w, int m, int k, int n) {
    gemv_body<1>(y, x, w, m, k, n);
}
extern "C" __global__ void __launch_bounds__(256) gemv_m4_f16(__half* y, const __half* x, const __half* w, int m, int k, int n) {
    gemv_body<4>(y, x, w, m, k, n);
}
extern "C" __global__ void __launch_bounds__(256) gemv_m16_f16(__half* y, const __half* x, const __half* w, int m, int k, int n) {
    gemv_body<16>(y, x, w, m, k, n);
}
