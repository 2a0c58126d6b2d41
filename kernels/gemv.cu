// Decode-step products at batch 1: y[c] = sum_k x[k] * w[c, k] for c < n output features, w row-major [n, k] as a
// linear layer stores it. A decode step is a stream over the weights, so this is bandwidth-bound: one warp per
// output feature reads its weight row once in 16-byte vectors (8 halves), four vectors in flight per lane; x is
// small and stays in L1/L2. fp32 accumulation. (At batch 2 and more cuBLASLt is as fast: measured in
// BENCHMARKS.md.) Requires k % 8 == 0 and 16-byte aligned rows (the launcher checks k; cudarc allocations are
// 256-byte aligned). block 256 (8 features), grid ceil(n / 8).
#include "common.cuh"

#define VEC_IN_FLIGHT 4

// y[c] = x . w[c], a warp per output feature. With SWIGLU, x is [gate | up] (2k values) and each input element is
// silu(gate) * up, rounded to fp16 exactly as swiglu_f16 stores it.
template <bool SWIGLU>
__device__ __forceinline__ void gemv_body(__half* __restrict__ y, const __half* __restrict__ x, const __half* __restrict__ w, int k, int n) {
    const int warps = blockDim.x / WARP, lane = threadIdx.x % WARP;
    const int c = blockIdx.x * warps + threadIdx.x / WARP;
    if (c >= n) return;  // uniform across the warp
    const uint4* wr = reinterpret_cast<const uint4*>(w + (long long)c * k);
    const uint4* xr = reinterpret_cast<const uint4*>(x);
    const uint4* ur = reinterpret_cast<const uint4*>(x + k);  // SWIGLU: the up half of [gate | up]
    const int kv = k / 8;
    float acc = 0.0f;
    for (int i0 = lane; i0 < kv; i0 += VEC_IN_FLIGHT * WARP) {
        uint4 wv[VEC_IN_FLIGHT], xv[VEC_IN_FLIGHT], uv[VEC_IN_FLIGHT];
#pragma unroll
        for (int u = 0; u < VEC_IN_FLIGHT; u++) {
            const int i = i0 + u * WARP;
            wv[u] = i < kv ? __ldg(wr + i) : make_uint4(0, 0, 0, 0);
            xv[u] = i < kv ? __ldg(xr + i) : make_uint4(0, 0, 0, 0);
            if (SWIGLU) uv[u] = i < kv ? __ldg(ur + i) : make_uint4(0, 0, 0, 0);
        }
#pragma unroll
        for (int u = 0; u < VEC_IN_FLIGHT; u++) {
            const __half2* wh = reinterpret_cast<const __half2*>(&wv[u]);
            const __half2* xh = reinterpret_cast<const __half2*>(&xv[u]);
            const __half2* uh = reinterpret_cast<const __half2*>(&uv[u]);
#pragma unroll
            for (int j = 0; j < 4; j++) {
                const float2 wf = __half22float2(wh[j]);
                float2 xf = __half22float2(xh[j]);
                if (SWIGLU) {
                    const float2 uf = __half22float2(uh[j]);
                    xf.x = __half2float(__float2half_rn(xf.x / (1.0f + __expf(-xf.x)) * uf.x));
                    xf.y = __half2float(__float2half_rn(xf.y / (1.0f + __expf(-xf.y)) * uf.y));
                }
                acc += xf.x * wf.x + xf.y * wf.y;
            }
        }
    }
    acc = warp_sum(acc);
    if (lane == 0) y[c] = __float2half_rn(acc);
}

extern "C" __global__ void __launch_bounds__(256) gemv_m1_f16(__half* __restrict__ y, const __half* __restrict__ x, const __half* __restrict__ w, int k, int n) {
    gemv_body<false>(y, x, w, k, n);
}

// The down projection of a batch-1 decode step with SwiGLU fused in: y[c] = sum_k act[k] * w[c, k] where
// act[k] = silu(gu[k]) * gu[k + k_total] is computed on the fly from the fused gate/up buffer (gu = [gate | up])
// instead of being written by swiglu_f16 and read back. act is rounded to fp16 exactly as swiglu_f16 stores it, so
// the result equals swiglu_f16 followed by gemv_m1_f16. Same launch shape and requirements as gemv_m1_f16.
extern "C" __global__ void __launch_bounds__(256) gemv_swiglu_m1_f16(__half* __restrict__ y, const __half* __restrict__ gu, const __half* __restrict__ w, int k, int n) {
    gemv_body<true>(y, gu, w, k, n);
}
