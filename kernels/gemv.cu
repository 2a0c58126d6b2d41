// Decode-step products at batch 1: y[c] = sum_k x[k] * w[c, k] for c < n output features, w row-major [n, k] as a
// linear layer stores it. A decode step is a stream over the weights, so this is bandwidth-bound: `split` warps per
// output feature (1, 2, 4 or 8), each reading every split-th stretch of 128 16-byte vectors (8 halves) of the
// weight row, four vectors in flight per lane; the partial sums meet in shared memory. More warps per feature keep
// more loads in flight for short, wide matrices (LLaVA-7B's down projection: 4096 features of 11008); which split
// (or cuBLASLt) is fastest for a shape is measured on the device when a large decoder loads (`Gpu::tune_gemv`).
// gemv_swiglu_m1_f16 is the gate/up projection with SwiGLU as its epilogue; gemv_add_rmsnorm_m1_f16 a projection
// followed, in its last block, by the residual add and RMSNorm that come after it.
// x is small and stays in L1/L2. fp32 accumulation. Requires k % 8 == 0 and 16-byte aligned rows (the launcher
// checks k; cudarc allocations are 256-byte aligned). block 256 (8 warps: 8 / split features), grid
// ceil(n * split / 8).
#include "common.cuh"

#define VEC_IN_FLIGHT 4
#define GEMV_WARPS 8

// One warp's share of x . w_row: every split-th stretch of 4 x 32 vectors from stretch p on, summed across the warp.
__device__ __forceinline__ float gemv_part(const __half* __restrict__ x, const __half* __restrict__ w_row, int kv, int split, int p, int lane) {
    const uint4* wr = reinterpret_cast<const uint4*>(w_row);
    const uint4* xr = reinterpret_cast<const uint4*>(x);
    float acc = 0.0f;
    for (int i0 = p * VEC_IN_FLIGHT * WARP + lane; i0 < kv; i0 += split * VEC_IN_FLIGHT * WARP) {
        uint4 wv[VEC_IN_FLIGHT], xv[VEC_IN_FLIGHT];
#pragma unroll
        for (int u = 0; u < VEC_IN_FLIGHT; u++) {
            const int i = i0 + u * WARP;
            wv[u] = i < kv ? __ldg(wr + i) : make_uint4(0, 0, 0, 0);
            xv[u] = i < kv ? __ldg(xr + i) : make_uint4(0, 0, 0, 0);
        }
#pragma unroll
        for (int u = 0; u < VEC_IN_FLIGHT; u++) {
            const __half2* wh = reinterpret_cast<const __half2*>(&wv[u]);
            const __half2* xh = reinterpret_cast<const __half2*>(&xv[u]);
#pragma unroll
            for (int j = 0; j < 4; j++) {
                const float2 wf = __half22float2(wh[j]);
                const float2 xf = __half22float2(xh[j]);
                acc += xf.x * wf.x + xf.y * wf.y;
            }
        }
    }
    return warp_sum(acc);
}

// The block's share of y = W x: GEMV_WARPS / split output features, `split` warps each. Every thread returns
// (no early exit), so a caller can still synchronise the block.
__device__ __forceinline__ void gemv_block(__half* __restrict__ y, const __half* __restrict__ x, const __half* __restrict__ w, int k, int n, int split, float* part) {
    const int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP;
    const int g = blockIdx.x * GEMV_WARPS + warp;
    const int c = g / split, p = g % split;
    // uniform across the warp
    const float acc = c < n ? gemv_part(x, w + (long long)c * k, k / 8, split, p, lane) : 0.0f;
    if (split == 1) {
        if (c < n && lane == 0) y[c] = __float2half_rn(acc);
        return;
    }
    if (lane == 0) part[warp] = acc;
    __syncthreads();
    if (c < n && p == 0 && lane == 0) {
        float s = 0.0f;
        for (int q = 0; q < split; q++) s += part[warp + q];
        y[c] = __float2half_rn(s);
    }
}

extern "C" __global__ void __launch_bounds__(256) gemv_m1_f16(__half* __restrict__ y, const __half* __restrict__ x, const __half* __restrict__ w, int k, int n, int split) {
    __shared__ float part[GEMV_WARPS];
    gemv_block(y, x, w, k, n, split, part);
}

// gemv_m1_f16 (t = W x) followed by what add_rmsnorm_f16 does with t, in the same launch: the residual stream
// h += t in place, then out = h / sqrt(mean(h^2) + eps) * norm_w (the o projection and the norm after attention;
// the down projection and the next layer's input norm). The block that takes the last ticket of `counter` (after
// a fence: the others' t is then visible to it) does the row's add and norm, then resets the counter for the next
// launch; so no launch of its own, nor the wait for one, between the projection and the next. The same fp16
// roundings as the pair (t rounded as stored, h + t rounded before squaring); the sum of squares is added in
// another order (256 threads, not 1024). counter: one unsigned int, 0 before the launch (and after it).
extern "C" __global__ void __launch_bounds__(256) gemv_add_rmsnorm_m1_f16(__half* __restrict__ out, __half* __restrict__ h, __half* __restrict__ t,
                                                                          const __half* __restrict__ norm_w, const __half* __restrict__ x,
                                                                          const __half* __restrict__ w, int k, int n, int split, float eps,
                                                                          unsigned* __restrict__ counter) {
    __shared__ float part[GEMV_WARPS];
    __shared__ float scratch[32];
    __shared__ bool last;
    gemv_block(t, x, w, k, n, split, part);
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) last = atomicAdd(counter, 1u) == gridDim.x - 1;
    __syncthreads();
    if (!last) return;  // uniform across the block
    __threadfence();
    float ss = 0.0f;
    for (int c = threadIdx.x; c < n; c += blockDim.x) {
        const __half s = __float2half_rn(__half2float(h[c]) + __half2float(__ldcg(t + c)));
        h[c] = s;
        const float v = __half2float(s);
        ss += v * v;
    }
    const float inv = rsqrtf(block_sum(ss, scratch) / n + eps);
    for (int c = threadIdx.x; c < n; c += blockDim.x) out[c] = __float2half_rn(__half2float(h[c]) * inv * __half2float(norm_w[c]));
    if (threadIdx.x == 0) *counter = 0;
}

// The fused gate/up projection of a batch-1 decode step with SwiGLU as its epilogue: w is [gate (inter rows) |
// up (inter rows)] of k each, and act[c] = silu(gate_c) * up_c, where gate_c = x . w[c] and up_c = x . w[inter + c]
// are rounded to fp16 first, exactly as gemv_m1_f16 stores them and swiglu_f16 reads them (the same numbers,
// without the [gate | up] buffer and the swiglu_f16 launch). 2 * split warps per feature (split 1, 2 or 4):
// grid ceil(inter * 2 * split / 8), block 256.
extern "C" __global__ void __launch_bounds__(256) gemv_swiglu_m1_f16(__half* __restrict__ act, const __half* __restrict__ x, const __half* __restrict__ w, int k, int inter, int split) {
    __shared__ float part[GEMV_WARPS];
    const int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP;
    const int g = blockIdx.x * GEMV_WARPS + warp;
    const int c = g / (2 * split), r = g % (2 * split), which = r / split, p = r % split;
    const float acc = c < inter ? gemv_part(x, w + ((long long)which * inter + c) * k, k / 8, split, p, lane) : 0.0f;
    if (lane == 0) part[warp] = acc;
    __syncthreads();
    if (c < inter && r == 0 && lane == 0) {
        float gs = 0.0f, us = 0.0f;
        for (int q = 0; q < split; q++) {
            gs += part[warp + q];
            us += part[warp + split + q];
        }
        const float gv = __half2float(__float2half_rn(gs)), uv = __half2float(__float2half_rn(us));
        act[c] = __float2half_rn(gv / (1.0f + __expf(-gv)) * uv);
    }
}
