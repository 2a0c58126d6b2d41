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
    gemv_block(t, x, w, k, n, split, part);
    if (!last_to_arrive(counter, gridDim.x)) return;
    add_rmsnorm_row(out, h, t, norm_w, n, eps, scratch);
    if (threadIdx.x == 0) *counter = 0;
}

// Output features taken in pairs, 2 * split warps a pair (GEMV_WARPS / (2 split) pairs a block): the pair this
// warp works on.
__device__ __forceinline__ int gemv_pair_index(int split) { return (blockIdx.x * GEMV_WARPS + threadIdx.x / WARP) / (2 * split); }

// The two dot products of a pair, x . wa and x . wb (rows of k; `valid` false: a pair past the end), the first
// `split` warps of the pair on wa, the next on wb. Every thread reaches the block barrier; returns true in the one
// thread that holds the sums (sa, sb), each added in the order gemv_m1_f16 adds them.
__device__ __forceinline__ bool gemv_pair(const __half* __restrict__ x, const __half* __restrict__ wa, const __half* __restrict__ wb, int k, int split,
                                         bool valid, float* part, float& sa, float& sb) {
    const int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP;
    const int r = (blockIdx.x * GEMV_WARPS + warp) % (2 * split), which = r / split, p = r % split;
    // uniform across the warp
    const float acc = valid ? gemv_part(x, which ? wb : wa, k / 8, split, p, lane) : 0.0f;
    if (lane == 0) part[warp] = acc;
    __syncthreads();
    if (!valid || r != 0 || lane != 0) return false;
    sa = sb = 0.0f;
    for (int q = 0; q < split; q++) {
        sa += part[warp + q];
        sb += part[warp + split + q];
    }
    return true;
}

// The fused gate/up projection of a batch-1 decode step with SwiGLU as its epilogue: w is [gate (inter rows) |
// up (inter rows)] of k each, and act[c] = silu(gate_c) * up_c, where gate_c = x . w[c] and up_c = x . w[inter + c]
// are rounded to fp16 first, exactly as gemv_m1_f16 stores them and swiglu_f16 reads them (the same numbers,
// without the [gate | up] buffer and the swiglu_f16 launch). 2 * split warps per feature (split 1, 2 or 4):
// grid ceil(inter * 2 * split / 8), block 256.
extern "C" __global__ void __launch_bounds__(256) gemv_swiglu_m1_f16(__half* __restrict__ act, const __half* __restrict__ x, const __half* __restrict__ w, int k, int inter, int split) {
    __shared__ float part[GEMV_WARPS];
    const int c = gemv_pair_index(split);
    float gs, us;
    if (!gemv_pair(x, w + (long long)c * k, w + ((long long)inter + c) * k, k, split, c < inter, part, gs, us)) return;
    const float gv = __half2float(__float2half_rn(gs)), uv = __half2float(__float2half_rn(us));
    act[c] = __float2half_rn(gv / (1.0f + __expf(-gv)) * uv);
}

// The fused q/k/v projection of a batch-1 decode step with RoPE and the cache store as its epilogue: what
// gemv_m1_f16 (qkv = W x, `split` warps per feature) followed by rope_kv_store_f16 do, in one launch, the same fp16
// numbers. The output features go in pairs, 2 * split warps a pair: (d, d + head_dim / 2) of a q or k head, which
// RoPE rotates together (position pos[0], tables cos/sin as rope_f16), and (d, d + 1) of a v head. Each pair is
// rounded to fp16 as gemv_m1_f16 stores it, then rotated as rope_kv_store_f16 rotates it; q and k go back into
// qkv (rows [q heads | k heads | v heads]), k and v into the caches at row lens[0] - 1 (lens != null: a decode
// step) or `start` (lens == null). split 1, 2 or 4: grid ceil(features * split / 8), block 256.
extern "C" __global__ void __launch_bounds__(256) gemv_qkv_rope_m1_f16(__half* __restrict__ qkv, __half* __restrict__ kc, __half* __restrict__ vc,
                                                                       const __half* __restrict__ x, const __half* __restrict__ w, int k, int heads_q,
                                                                       int heads_kv, int head_dim, int split, const int* __restrict__ pos,
                                                                       const float* __restrict__ cos_t, const float* __restrict__ sin_t,
                                                                       const int* __restrict__ lens, int start) {
    __shared__ float part[GEMV_WARPS];
    const int half_d = head_dim / 2, kvw = heads_kv * head_dim;
    const int rot_pairs = (heads_q + heads_kv) * half_d, pairs = rot_pairs + kvw / 2;
    const int u = gemv_pair_index(split);
    // The pair's two features: a q or k head's (i, i + half_d), or a v head's (2 v, 2 v + 1).
    int fa = 0, fb = 0;
    if (u < rot_pairs) {
        const int head = u / half_d, i = u % half_d;
        fa = head * head_dim + i;
        fb = fa + half_d;
    } else if (u < pairs) {
        fa = (heads_q + heads_kv) * head_dim + 2 * (u - rot_pairs);
        fb = fa + 1;
    }
    float sa, sb;
    if (!gemv_pair(x, w + (long long)fa * k, w + (long long)fb * k, k, split, u < pairs, part, sa, sb)) return;
    const __half ya = __float2half_rn(sa), yb = __float2half_rn(sb);
    const long long dst = lens ? (long long)(lens[0] - 1) * kvw : (long long)start * kvw;
    if (u < rot_pairs) {
        const int head = u / half_d, i = u % half_d, at = pos[0];
        const float c = cos_t[(long long)at * half_d + i], s = sin_t[(long long)at * half_d + i];
        const float x1 = __half2float(ya), x2 = __half2float(yb);
        const __half y1 = __float2half_rn(x1 * c - x2 * s), y2 = __float2half_rn(x2 * c + x1 * s);
        qkv[fa] = y1;
        qkv[fb] = y2;
        if (head >= heads_q) {
            const int j = head - heads_q;
            kc[dst + j * head_dim + i] = y1;
            kc[dst + j * head_dim + i + half_d] = y2;
        }
    } else {
        const int e = fa - (heads_q + heads_kv) * head_dim;  // within the v heads
        qkv[fa] = ya;
        qkv[fb] = yb;
        vc[dst + e] = ya;
        vc[dst + e + 1] = yb;
    }
}
