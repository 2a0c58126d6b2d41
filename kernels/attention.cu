// Attention, fp16 in/out, fp32 softmax and accumulation, online softmax (never the full score matrix).
//  - flash_attn_prefill_f16: tiled prefill, causal (text; with an offset so a suffix can attend a cached prefix)
//    or full (vision tower); GQA/MQA by mapping query head h to kv head h / (heads_q / heads_kv).
//  - attn_decode_f16: one new token per sequence against a shared prefix cache (the image and prompt, computed
//    once for the n answers of a prompt) plus the sequence's own suffix cache; keys split across the block's
//    warps, partial softmax states combined at the end.
// head_dim <= 128 (LLaVA-1.5: 128 in the decoder, 64 in CLIP ViT-L).
#include "common.cuh"

#define MAX_D 128
#define DPL (MAX_D / WARP)   // accumulator elements per lane
#define BC 32                // keys per tile: one per lane when scoring
#define QROWS 16             // query rows per block
#define WARPS 4              // 128 threads per block
#define RPW (QROWS / WARPS)  // query rows per warp

// q: [n_q, heads_q, D] rows of q_stride elements; k, v: [n_k, heads_kv, D] rows of kv_stride; out: rows of o_stride.
// grid (ceil(n_q / 16), heads_q), block 128.
extern "C" __global__ void __launch_bounds__(128) flash_attn_prefill_f16(
    __half* __restrict__ out, const __half* __restrict__ q, const __half* __restrict__ k, const __half* __restrict__ v,
    int n_q, int n_k, int heads_q, int heads_kv, int head_dim, int q_stride, int kv_stride, int o_stride, float scale, int causal) {
    __shared__ float qs[QROWS][MAX_D];
    __shared__ __half ks[BC][MAX_D + 2];
    __shared__ __half vs[BC][MAX_D];
    const int h = blockIdx.y, hk = h / (heads_q / heads_kv);
    const int q0 = blockIdx.x * QROWS;
    const int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP;
    const int offset = n_k - n_q;  // causal: query i sees keys j <= i + offset
    for (int idx = threadIdx.x; idx < QROWS * head_dim; idx += blockDim.x) {
        const int r = idx / head_dim, d = idx % head_dim, qi = q0 + r;
        qs[r][d] = qi < n_q ? __half2float(q[(long long)qi * q_stride + h * head_dim + d]) * scale : 0.0f;
    }
    float m[RPW], l[RPW], acc[RPW][DPL];
#pragma unroll
    for (int rr = 0; rr < RPW; rr++) {
        m[rr] = -INFINITY;
        l[rr] = 0.0f;
#pragma unroll
        for (int i = 0; i < DPL; i++) acc[rr][i] = 0.0f;
    }
    const int kmax = causal ? min(n_k, q0 + QROWS + offset) : n_k;
    for (int k0 = 0; k0 < kmax; k0 += BC) {
        __syncthreads();
        for (int idx = threadIdx.x; idx < BC * head_dim; idx += blockDim.x) {
            const int j = idx / head_dim, d = idx % head_dim, kj = k0 + j;
            const long long at = (long long)kj * kv_stride + hk * head_dim + d;
            ks[j][d] = kj < n_k ? k[at] : __float2half(0.0f);
            vs[j][d] = kj < n_k ? v[at] : __float2half(0.0f);
        }
        __syncthreads();
#pragma unroll
        for (int rr = 0; rr < RPW; rr++) {
            const int r = warp + rr * WARPS, qi = q0 + r;
            if (qi >= n_q) continue;  // uniform across the warp
            const int kj = k0 + lane;
            const bool valid = kj < n_k && (!causal || kj <= qi + offset);
            float s = -INFINITY;
            if (valid) {
                float dot = 0.0f;
                for (int d = 0; d < head_dim; d++) dot += qs[r][d] * __half2float(ks[lane][d]);
                s = dot;
            }
            const float m_new = fmaxf(m[rr], warp_max(s));
            if (m_new == -INFINITY) continue;  // no visible key yet (uniform)
            const float p = valid ? __expf(s - m_new) : 0.0f;
            const float corr = __expf(m[rr] - m_new);
            l[rr] = l[rr] * corr + warp_sum(p);
#pragma unroll
            for (int i = 0; i < DPL; i++) acc[rr][i] *= corr;
            for (int j = 0; j < BC; j++) {
                const float pj = __shfl_sync(FULL_MASK, p, j);
#pragma unroll
                for (int i = 0; i < DPL; i++) {
                    const int d = lane + WARP * i;
                    if (d < head_dim) acc[rr][i] += pj * __half2float(vs[j][d]);
                }
            }
            m[rr] = m_new;
        }
    }
#pragma unroll
    for (int rr = 0; rr < RPW; rr++) {
        const int qi = q0 + warp + rr * WARPS;
        if (qi >= n_q) continue;
        const float inv = l[rr] > 0.0f ? 1.0f / l[rr] : 0.0f;
#pragma unroll
        for (int i = 0; i < DPL; i++) {
            const int d = lane + WARP * i;
            if (d < head_dim) out[(long long)qi * o_stride + h * head_dim + d] = __float2half_rn(acc[rr][i] * inv);
        }
    }
}

// One query token per sequence b. Keys 0..prefix_len-1 come from the shared prefix cache (rows of prefix_stride
// elements), keys prefix_len..prefix_len+suf_len[b]-1 from sequence b's suffix cache (sequence b starts at
// b * suf_seq_stride, rows of suf_stride). grid (B, heads_q), block 128.
extern "C" __global__ void __launch_bounds__(128) attn_decode_f16(
    __half* __restrict__ out, const __half* __restrict__ q, const __half* __restrict__ pk, const __half* __restrict__ pv,
    int prefix_len, int prefix_stride, const __half* __restrict__ sk, const __half* __restrict__ sv, const int* __restrict__ suf_len,
    long long suf_seq_stride, int suf_stride, int heads_q, int heads_kv, int head_dim, int q_stride, int o_stride, float scale) {
    __shared__ float qs[MAX_D];
    __shared__ float wm[WARPS], wl[WARPS];
    __shared__ float wacc[WARPS][MAX_D];
    const int b = blockIdx.x, h = blockIdx.y, hk = h / (heads_q / heads_kv);
    const int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP;
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) qs[d] = __half2float(q[(long long)b * q_stride + h * head_dim + d]) * scale;
    __syncthreads();
    const int total = prefix_len + suf_len[b];
    auto key_row = [&](const __half* pre, const __half* suf, int j) -> const __half* {
        return j < prefix_len ? pre + (long long)j * prefix_stride + hk * head_dim
                              : suf + (long long)b * suf_seq_stride + (long long)(j - prefix_len) * suf_stride + hk * head_dim;
    };
    float m = -INFINITY, l = 0.0f, acc[DPL];
#pragma unroll
    for (int i = 0; i < DPL; i++) acc[i] = 0.0f;
    for (int base = warp * WARP; base < total; base += WARPS * WARP) {
        const int j = base + lane;
        float s = -INFINITY;
        if (j < total) {
            const __half* kr = key_row(pk, sk, j);
            float dot = 0.0f;
            for (int d = 0; d < head_dim; d++) dot += qs[d] * __half2float(kr[d]);
            s = dot;
        }
        const float m_new = fmaxf(m, warp_max(s));  // finite: key `base` is valid
        const float p = j < total ? __expf(s - m_new) : 0.0f;
        const float corr = __expf(m - m_new);
        l = l * corr + warp_sum(p);
#pragma unroll
        for (int i = 0; i < DPL; i++) acc[i] *= corr;
        for (int jj = 0; jj < WARP; jj++) {
            const float pj = __shfl_sync(FULL_MASK, p, jj);
            const int key = base + jj;
            if (key >= total) break;  // uniform
            const __half* vr = key_row(pv, sv, key);
#pragma unroll
            for (int i = 0; i < DPL; i++) {
                const int d = lane + WARP * i;
                if (d < head_dim) acc[i] += pj * __half2float(vr[d]);
            }
        }
        m = m_new;
    }
    if (lane == 0) {
        wm[warp] = m;
        wl[warp] = l;
    }
#pragma unroll
    for (int i = 0; i < DPL; i++) {
        const int d = lane + WARP * i;
        if (d < head_dim) wacc[warp][d] = acc[i];
    }
    __syncthreads();
    if (warp == 0) {
        float M = -INFINITY;
        for (int w = 0; w < WARPS; w++) M = fmaxf(M, wm[w]);
        float L = 0.0f, f[WARPS];
        for (int w = 0; w < WARPS; w++) {
            f[w] = wm[w] == -INFINITY ? 0.0f : __expf(wm[w] - M);
            L += wl[w] * f[w];
        }
        const float inv = L > 0.0f ? 1.0f / L : 0.0f;
        for (int d = lane; d < head_dim; d += WARP) {
            float o = 0.0f;
            for (int w = 0; w < WARPS; w++) o += wacc[w][d] * f[w];
            out[(long long)b * o_stride + h * head_dim + d] = __float2half_rn(o * inv);
        }
    }
}
