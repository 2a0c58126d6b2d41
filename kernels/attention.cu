// Attention, fp16 in/out, fp32 softmax and accumulation, online softmax (never the full score matrix).
//  - flash_attn_prefill_f16: tiled prefill, causal (text; with an offset so a suffix can attend a cached prefix)
//    or full (vision tower); GQA/MQA by mapping query head h to kv head h / (heads_q / heads_kv). `window` > 0
//    (causal only): a query sees just the last `window` keys up to its own (Mistral's and Qwen2's sliding window).
//  - attn_decode_f16: one new token per sequence against a shared prefix cache (the image and prompt, computed
//    once for the n answers of a prompt) plus the sequence's own suffix cache; keys split into chunks across
//    blocks (flash-decoding), partial softmax states merged by the last block of each head to finish (or by
//    attn_decode_combine_f16).
//  - kv_store_f16: writes the keys and values of a fused QKV buffer into a cache (prefill or n-sequence decode);
//    rope_kv_store_f16: RoPE on q and k and that store in one kernel.
// head_dim <= 128 (LLaVA-1.5: 128 in the decoder, 64 in CLIP ViT-L).
#include "common.cuh"

#define MAX_D 128
#define DPL (MAX_D / WARP)   // accumulator elements per lane
#define BC 32                // keys per tile: one per lane when scoring
#define QROWS 16             // query rows per block
#define WARPS 4              // 128 threads per block
#define RPW (QROWS / WARPS)  // query rows per warp

// q: [n_q, heads_q, D] rows of q_stride elements; k, v: [n_k, heads_kv, D] rows of kv_stride; out: rows of o_stride.
// lse (may be null): [n_q, heads_q] log-sum-exp of each row's scaled scores, for the backward pass.
// grid (ceil(n_q / 16), heads_q), block 128.
extern "C" __global__ void __launch_bounds__(128) flash_attn_prefill_f16(
    __half* __restrict__ out, const __half* __restrict__ q, const __half* __restrict__ k, const __half* __restrict__ v,
    int n_q, int n_k, int heads_q, int heads_kv, int head_dim, int q_stride, int kv_stride, int o_stride, float scale, int causal,
    float* __restrict__ lse, int window) {
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
    // With a window, the block's first query sees nothing before q0 + offset - window + 1.
    const int kmin = causal && window > 0 ? max(0, q0 + offset - window + 1) / BC * BC : 0;
    for (int k0 = kmin; k0 < kmax; k0 += BC) {
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
            const bool valid = kj < n_k && (!causal || (kj <= qi + offset && (window <= 0 || kj > qi + offset - window)));
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
        // The softmax statistics the backward pass recomputes probabilities from (scaled-score domain).
        if (lse && lane == 0) lse[(long long)qi * heads_q + h] = l[rr] > 0.0f ? m[rr] + logf(l[rr]) : -INFINITY;
    }
}

// One query token per sequence b (flash-decoding). Keys 0..prefix_len-1 come from the shared prefix cache (rows
// of prefix_stride elements), keys prefix_len..prefix_len+suf_len[b]-1 from sequence b's suffix cache (sequence b
// starts at b * suf_seq_stride, rows of suf_stride). The keys are split into chunks of `chunk`, one block each, so
// a single sequence still fills the GPU; within a block each warp takes every 4th key, loads 8 such keys' rows at
// once (KPW; a lane holds elements 4 lane .. 4 lane + 3, one 8-byte load per row), then scores them in order.
// grid (B, heads_q, nsplit), block 128.
// nsplit == 1: the block writes out directly. Otherwise it writes its partial softmax state to
// part[((b * heads_q + h) * nsplit + s) * (head_dim + 2) ..] = (max, sum, acc[head_dim]), and the chunks are merged
// either by attn_decode_combine_f16 (combine_here == 0) or, combine_here != 0, by the last of the nsplit blocks of
// (b, h) to finish: each takes a ticket of the counter at (unsigned) part[B * heads_q * nsplit * (head_dim + 2) +
// b * heads_q + h] after a fence, and the one that takes the last ticket merges the chunks (the same arithmetic as
// attn_decode_combine_f16) and resets the counter. Those counters are 0 before the launch and after it.
// pf (may be null): bytes to prefetch into L2 for the op after this one (the o projection's weights).
// window > 0: the query sees only the last `window` keys of its sequence (sliding-window attention).
static_assert(DPL == 4, "attn_decode_f16 unpacks 4 head elements per lane");
// Element i (0..3) of 4 halves packed in a uint2 (the first in the low bits of x), widened.
__device__ __forceinline__ float half4_at(uint2 w, int i) {
    const unsigned u = i < 2 ? w.x : w.y;
    return __half2float(__ushort_as_half((unsigned short)(i % 2 == 0 ? u & 0xffffu : u >> 16)));
}
#define KPW 8  // keys each warp of attn_decode_f16 loads before it scores them (memory requests in flight)

// The nsplit partial states pb[s * (head_dim + 2) ..] = (max, sum, acc[head_dim]) of one (sequence, head) merged
// into its output row: thread d makes head element d (blockDim.x == WARPS * WARP >= head_dim). The states come
// through L2 (__ldcg): the blocks that wrote them may have run on other SMs in this very launch. The merge is on
// the launch's critical path and bound by L2 latency, so its loads are independent, not a chain per split: each
// thread loads one split's (max, sum) (a loop only past 128 splits), the weights exp(max_s - M) are computed once
// into shared memory, and the weighted rows are loaded 8 splits at a time. The sums run over s in order, as a
// loop over s would add them.
__device__ __forceinline__ void attn_decode_merge(__half* __restrict__ orow, const float* __restrict__ pb, int nsplit, int head_dim) {
    constexpr int TILE = WARPS * WARP;
    __shared__ float sw[TILE], sl[TILE], scratch[WARP];
    const int t = threadIdx.x, stride = head_dim + 2;
    float m0 = -INFINITY, l0 = 0.0f;
    if (t < nsplit) {
        m0 = __ldcg(pb + t * stride);
        l0 = __ldcg(pb + t * stride + 1);
    }
    float mx = m0;
    for (int s = t + TILE; s < nsplit; s += TILE) mx = fmaxf(mx, __ldcg(pb + (long long)s * stride));
    const float M = block_max(mx, scratch);
    float L = 0.0f, o = 0.0f;
    for (int base = 0; base < nsplit; base += TILE) {
        float ms = m0, ls = l0;
        if (base > 0) {
            const int s = base + t;
            ms = s < nsplit ? __ldcg(pb + (long long)s * stride) : -INFINITY;
            ls = s < nsplit ? __ldcg(pb + (long long)s * stride + 1) : 0.0f;
            __syncthreads();  // every thread is done with the previous tile's weights
        }
        // A split without keys (max -inf) adds nothing.
        sw[t] = ms == -INFINITY ? 0.0f : __expf(ms - M);
        sl[t] = ms == -INFINITY ? 0.0f : ls;
        __syncthreads();
        const int n = min(TILE, nsplit - base);
        for (int i = 0; i < n; i++) L += sl[i] * sw[i];
        if (t < head_dim) {
            const float* col = pb + (long long)base * stride + 2 + t;
#pragma unroll 8
            for (int i = 0; i < n; i++) o += __ldcg(col + (long long)i * stride) * sw[i];
        }
    }
    if (t < head_dim) orow[t] = __float2half_rn(o * (L > 0.0f ? 1.0f / L : 0.0f));
}

// Each lane holds head elements lane * DPL .. lane * DPL + DPL - 1 (one 8-byte load per key row when head_dim % 4 == 0).
extern "C" __global__ void __launch_bounds__(128) attn_decode_f16(
    __half* __restrict__ out, const __half* __restrict__ q, const __half* __restrict__ pk, const __half* __restrict__ pv,
    int prefix_len, int prefix_stride, const __half* __restrict__ sk, const __half* __restrict__ sv, const int* __restrict__ suf_len,
    long long suf_seq_stride, int suf_stride, int heads_q, int heads_kv, int head_dim, int q_stride, int o_stride, float scale,
    float* __restrict__ part, int chunk, int combine_here, const char* __restrict__ pf, long long pf_bytes, int window) {
    __shared__ float wm[WARPS], wl[WARPS];
    __shared__ float wacc[WARPS][MAX_D];
    const int b = blockIdx.x, h = blockIdx.y, s = blockIdx.z, nsplit = gridDim.z, hk = h / (heads_q / heads_kv);
    const int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP;
    const bool vec = head_dim % 4 == 0;  // rows 8-byte aligned: every row offset is a multiple of head_dim
    float qv[DPL];
#pragma unroll
    for (int i = 0; i < DPL; i++) {
        const int d = lane * DPL + i;
        qv[i] = d < head_dim ? __half2float(q[(long long)b * q_stride + h * head_dim + d]) * scale : 0.0f;
    }
    const int total = prefix_len + suf_len[b];
    // window > 0: only the last `window` keys (the query's own among them); a chunk before them has no keys.
    const int lo = window > 0 ? max(0, total - window) : 0;
    const int j0 = max(s * chunk, lo), j1 = min(s * chunk + chunk, total);
    float m = -INFINITY, l = 0.0f, acc[DPL];
#pragma unroll
    for (int i = 0; i < DPL; i++) acc[i] = 0.0f;
    // Keys j0 + warp, + WARPS, + 2 WARPS, ... in order; KPW of them loaded at once, then scored one by one.
    for (int jb = j0 + warp; jb < j1; jb += WARPS * KPW) {
        // Kept as loaded (4 halves in a uint2 per key), widened where they are used: half the registers.
        uint2 kw[KPW], vw[KPW];
#pragma unroll
        for (int t = 0; t < KPW; t++) {
            const int j = jb + t * WARPS;
            kw[t] = vw[t] = make_uint2(0u, 0u);
            if (j >= j1) continue;  // uniform across the warp
            const long long at = j < prefix_len ? (long long)j * prefix_stride + hk * head_dim
                                                : (long long)b * suf_seq_stride + (long long)(j - prefix_len) * suf_stride + hk * head_dim;
            const __half* kr = (j < prefix_len ? pk : sk) + at;
            const __half* vr = (j < prefix_len ? pv : sv) + at;
            const int d0 = lane * DPL;
            if (vec && d0 < head_dim) {
                kw[t] = __ldg(reinterpret_cast<const uint2*>(kr + d0));
                vw[t] = __ldg(reinterpret_cast<const uint2*>(vr + d0));
            } else if (!vec) {
                __half kh[DPL], vh[DPL];
#pragma unroll
                for (int i = 0; i < DPL; i++) {
                    const int d = d0 + i;
                    kh[i] = d < head_dim ? kr[d] : __float2half_rn(0.0f);
                    vh[i] = d < head_dim ? vr[d] : __float2half_rn(0.0f);
                }
                kw[t] = make_uint2(pack_h2(kh[0], kh[1]), pack_h2(kh[2], kh[3]));
                vw[t] = make_uint2(pack_h2(vh[0], vh[1]), pack_h2(vh[2], vh[3]));
            }
        }
        float dot[KPW];
#pragma unroll
        for (int t = 0; t < KPW; t++) {
            dot[t] = 0.0f;
#pragma unroll
            for (int i = 0; i < DPL; i++) dot[t] += qv[i] * half4_at(kw[t], i);
            dot[t] = warp_sum(dot[t]);
        }
#pragma unroll
        for (int t = 0; t < KPW; t++) {
            if (jb + t * WARPS >= j1) break;  // uniform across the warp
            const float m_new = fmaxf(m, dot[t]);
            const float corr = __expf(m - m_new), p = __expf(dot[t] - m_new);
            l = l * corr + p;
#pragma unroll
            for (int i = 0; i < DPL; i++) acc[i] = acc[i] * corr + p * half4_at(vw[t], i);
            m = m_new;
        }
    }
    // pf != null: the next op's weights (pf_bytes of them) warmed into L2 while the GPU waits on this launch's
    // chains of loads; each thread prefetches every (threads of the launch)-th 128-byte line, after its own loads
    // so none queues ahead of them.
    if (pf) {
        const long long threads = (long long)gridDim.x * gridDim.y * gridDim.z * blockDim.x;
        const long long id = (((long long)blockIdx.z * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x) * blockDim.x + threadIdx.x;
        for (long long off = id * 128; off < pf_bytes; off += threads * 128) prefetch_l2(pf + off);
    }
    if (lane == 0) {
        wm[warp] = m;
        wl[warp] = l;
    }
#pragma unroll
    for (int i = 0; i < DPL; i++) {
        const int d = lane * DPL + i;
        if (d < head_dim) wacc[warp][d] = acc[i];
    }
    __syncthreads();
    float M = -INFINITY;
    for (int w = 0; w < WARPS; w++) M = fmaxf(M, wm[w]);
    float f[WARPS], L = 0.0f;
    for (int w = 0; w < WARPS; w++) {
        f[w] = wm[w] == -INFINITY ? 0.0f : __expf(wm[w] - M);
        L += wl[w] * f[w];
    }
    if (nsplit == 1) {
        const float inv = L > 0.0f ? 1.0f / L : 0.0f;
        for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
            float o = 0.0f;
            for (int w = 0; w < WARPS; w++) o += wacc[w][d] * f[w];
            out[(long long)b * o_stride + h * head_dim + d] = __float2half_rn(o * inv);
        }
        return;
    }
    float* ps = part + ((long long)(b * heads_q + h) * nsplit + s) * (head_dim + 2);
    if (threadIdx.x == 0) {
        ps[0] = M;
        ps[1] = L;
    }
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
        float o = 0.0f;
        for (int w = 0; w < WARPS; w++) o += wacc[w][d] * f[w];
        ps[2 + d] = o;
    }
    if (!combine_here) return;
    unsigned* counter = reinterpret_cast<unsigned*>(part + (long long)gridDim.x * heads_q * nsplit * (head_dim + 2)) + b * heads_q + h;
    if (!last_to_arrive(counter, nsplit)) return;
    attn_decode_merge(out + (long long)b * o_stride + h * head_dim, part + (long long)(b * heads_q + h) * nsplit * (head_dim + 2), nsplit, head_dim);
    if (threadIdx.x == 0) *counter = 0;
}

// Merges attn_decode_f16's nsplit partial states of (b, h) into out. grid (B, heads_q), block 128.
extern "C" __global__ void __launch_bounds__(128) attn_decode_combine_f16(__half* __restrict__ out, const float* __restrict__ part, int nsplit,
                                                                          int heads_q, int head_dim, int o_stride) {
    const int b = blockIdx.x, h = blockIdx.y;
    attn_decode_merge(out + (long long)b * o_stride + h * head_dim, part + (long long)(b * heads_q + h) * nsplit * (head_dim + 2), nsplit, head_dim);
}

// Stores the keys and values of a fused QKV buffer (rows of qkv_stride: q, then k at k_off, v at v_off, w elements
// each) into the caches. lens != null (decoding n sequences): row r is sequence r's newest token, stored at
// position lens[r] - 1 of sequence r (sequences seq_stride apart; positions read on the device, so a captured CUDA
// graph replays every step). lens == null (prefill of one sequence): row r goes to position start + r.
extern "C" __global__ void kv_store_f16(__half* __restrict__ kc, __half* __restrict__ vc, const __half* __restrict__ qkv, int rows, int w,
                                        int qkv_stride, int k_off, int v_off, long long seq_stride, const int* __restrict__ lens, int start) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)rows * w) return;
    const int r = i / w, e = i % w;
    const long long dst = lens ? r * seq_stride + (long long)(lens[r] - 1) * w + e : (long long)(start + r) * w + e;
    kc[dst] = qkv[(long long)r * qkv_stride + k_off + e];
    vc[dst] = qkv[(long long)r * qkv_stride + v_off + e];
}

// RoPE and the cache store in one pass (what rope_f16 on the q and k heads of a fused QKV buffer, then kv_store_f16,
// do): q heads are rotated in place; k heads are rotated, written back and stored in the key cache; v heads are
// stored in the value cache. The stored values are the same fp16 numbers the two kernels would store. Rows, the
// cache destination (lens / start) and strides as kv_store_f16; pos, cos and sin as rope_f16.
// grid (rows, heads_q + heads_kv), block 64.
extern "C" __global__ void rope_kv_store_f16(__half* __restrict__ qkv, __half* __restrict__ kc, __half* __restrict__ vc, const int* __restrict__ pos,
                                             const float* __restrict__ cos_t, const float* __restrict__ sin_t, int heads_q, int heads_kv, int head_dim,
                                             int qkv_stride, long long seq_stride, const int* __restrict__ lens, int start) {
    const int r = blockIdx.x, h = blockIdx.y;
    const int half_d = head_dim / 2, w = heads_kv * head_dim;
    const int p = pos[r];
    __half* x = qkv + (long long)r * qkv_stride + (long long)h * head_dim;  // q head h, or k head h - heads_q
    const bool is_k = h >= heads_q;
    const long long dst = lens ? r * seq_stride + (long long)(lens[r] - 1) * w : (long long)(start + r) * w;
    const int j = h - heads_q;  // kv head, when is_k
    for (int i = threadIdx.x; i < half_d; i += blockDim.x) {
        const float c = cos_t[(long long)p * half_d + i], s = sin_t[(long long)p * half_d + i];
        const float x1 = __half2float(x[i]), x2 = __half2float(x[i + half_d]);
        const __half y1 = __float2half_rn(x1 * c - x2 * s), y2 = __float2half_rn(x2 * c + x1 * s);
        x[i] = y1;
        x[i + half_d] = y2;
        if (is_k) {
            kc[dst + j * head_dim + i] = y1;
            kc[dst + j * head_dim + i + half_d] = y2;
        }
    }
    if (is_k) {
        const __half* v = qkv + (long long)r * qkv_stride + (long long)(heads_q + heads_kv + j) * head_dim;
        for (int i = threadIdx.x; i < head_dim; i += blockDim.x) vc[dst + j * head_dim + i] = v[i];
    }
}

// ---- Tensor-core prefill (sm_80+): flash_attn_mma_d64_f16 and flash_attn_mma_d128_f16, the same contract as
// flash_attn_prefill_f16 (and the same log-sum-exp for the backward pass) for head sizes 64 (CLIP) and 128 (LLaMA).
// A block takes 64 query rows of one head, 16 per warp, kept in registers as mma A fragments. For each tile of 64
// keys (K and V staged in shared memory, 16-byte loads): S = Q K^T with mma.sync m16n8k16 (fp32), scaled and
// masked, an online softmax over the rows (each row's values sit in the 4 lanes of a quad: two shuffles), and
// O += P V with P taken straight from the score registers as fp16 A fragments (the layout of two 8-column C tiles
// is that of one 16-column A tile). Needs 16-byte aligned k and v rows (the launcher checks).
#define MMA_Q 64
#define MMA_K 64
#define MMA_PAD 8  // halves of padding per shared row: rows 16 bytes off the bank pattern

// Helpers of the tensor-core kernels (a lane's g = lane / 4 and t = lane % 4 as in mma_16816).

// Rows r0..r0+63 of a [rows, D] operand (rows `stride` elements apart, columns from `col`) into a shared tile,
// zeros past row n; 16-byte loads, the whole block.
template <int D>
__device__ __forceinline__ void stage_tile(__half (*dst)[D + MMA_PAD], const __half* __restrict__ src, int r0, int n, int stride, int col) {
    for (int idx = threadIdx.x; idx < 64 * (D / 8); idx += blockDim.x) {
        const int j = idx / (D / 8), c = (idx % (D / 8)) * 8, r = r0 + j;
        uint4 x = make_uint4(0, 0, 0, 0);
        if (r < n) x = *reinterpret_cast<const uint4*>(src + (long long)r * stride + col + c);
        *reinterpret_cast<uint4*>(&dst[j][c]) = x;
    }
}

// A fragments of this warp's 16 rows (r0 = its first row + g, and r0 + 8) of a [rows, D] operand in global memory
// (rows `stride` apart, columns from `col`), zeros past row n.
template <int D>
__device__ __forceinline__ void load_a_rows(unsigned f[D / 16][4], const __half* __restrict__ src, int r0, int n, int stride, int col) {
    const int t = threadIdx.x % 4;
    auto pair = [&](int row, int c) -> unsigned { return row < n ? *reinterpret_cast<const unsigned*>(src + (long long)row * stride + col + c) : 0u; };
#pragma unroll
    for (int kk = 0; kk < D / 16; kk++) {
        const int c = kk * 16 + 2 * t;
        f[kk][0] = pair(r0, c);
        f[kk][1] = pair(r0 + 8, c);
        f[kk][2] = pair(r0, c + 8);
        f[kk][3] = pair(r0 + 8, c + 8);
    }
}

// The same from a shared tile, rows w0 + g and w0 + g + 8, columns kk * 16 on.
template <int D>
__device__ __forceinline__ void tile_a(unsigned a[4], const __half (*tile)[D + MMA_PAD], int w0, int kk) {
    const int g = (threadIdx.x % WARP) / 4, c = kk * 16 + 2 * (threadIdx.x % 4);
    a[0] = *reinterpret_cast<const unsigned*>(&tile[w0 + g][c]);
    a[1] = *reinterpret_cast<const unsigned*>(&tile[w0 + g + 8][c]);
    a[2] = *reinterpret_cast<const unsigned*>(&tile[w0 + g][c + 8]);
    a[3] = *reinterpret_cast<const unsigned*>(&tile[w0 + g + 8][c + 8]);
}

// B = tile^T (k runs along a row: B[k][n] = tile[n0 + n][kk * 16 + k]): two 32-bit loads.
template <int D>
__device__ __forceinline__ void tile_b_t(unsigned b[2], const __half (*tile)[D + MMA_PAD], int n0, int kk) {
    const int g = (threadIdx.x % WARP) / 4, c = kk * 16 + 2 * (threadIdx.x % 4);
    b[0] = *reinterpret_cast<const unsigned*>(&tile[n0 + g][c]);
    b[1] = *reinterpret_cast<const unsigned*>(&tile[n0 + g][c + 8]);
}

// B = tile (k runs down a column: B[k][n] = tile[k0 + k][n0 + n]): four 16-bit loads.
template <int D>
__device__ __forceinline__ void tile_b(unsigned b[2], const __half (*tile)[D + MMA_PAD], int k0, int n0) {
    const int g = (threadIdx.x % WARP) / 4, k = k0 + 2 * (threadIdx.x % 4), c = n0 + g;
    b[0] = pack_h2(tile[k][c], tile[k + 1][c]);
    b[1] = pack_h2(tile[k + 8][c], tile[k + 9][c]);
}

// P (or dS) of two 8-column C tiles as the A fragment of one 16-column k step.
__device__ __forceinline__ void c_to_a(unsigned a[4], const float x[2][4]) {
    a[0] = pack_f2(x[0][0], x[0][1]);
    a[1] = pack_f2(x[0][2], x[0][3]);
    a[2] = pack_f2(x[1][0], x[1][1]);
    a[3] = pack_f2(x[1][2], x[1][3]);
}

// acc[n] += a . tile[k0..k0+15][n*8..n*8+7] for every 8-column block of D: O += P V, dQ += dS K, dK += dS^T Q,
// dV += P^T dO.
template <int D>
__device__ __forceinline__ void mma_rows(float acc[D / 8][4], const unsigned a[4], const __half (*tile)[D + MMA_PAD], int k0) {
#pragma unroll
    for (int n = 0; n < D / 8; n++) {
        unsigned b[2];
        tile_b<D>(b, tile, k0, n * 8);
        mma_16816(acc[n], a, b, acc[n]);
    }
}

// This lane's accumulators of rows r0 and r0 + 8, times `scale`, as fp16 pairs into rows `stride` apart, rows
// past n skipped.
template <int D>
__device__ __forceinline__ void store_rows(__half* __restrict__ dst, int stride, int r0, int n, const float acc[D / 8][4], float s0, float s1) {
    const int t = threadIdx.x % 4;
#pragma unroll
    for (int j = 0; j < D / 8; j++) {
        const int c = j * 8 + 2 * t;
        if (r0 < n) *reinterpret_cast<unsigned*>(dst + (long long)r0 * stride + c) = pack_f2(acc[j][0] * s0, acc[j][1] * s0);
        if (r0 + 8 < n) *reinterpret_cast<unsigned*>(dst + (long long)(r0 + 8) * stride + c) = pack_f2(acc[j][2] * s1, acc[j][3] * s1);
    }
}

template <int D>
__device__ __forceinline__ void flash_attn_mma_body(
    __half* __restrict__ out, const __half* __restrict__ q, const __half* __restrict__ k, const __half* __restrict__ v,
    int n_q, int n_k, int heads_q, int heads_kv, int q_stride, int kv_stride, int o_stride, float scale, int causal,
    float* __restrict__ lse, int window) {
    __shared__ __align__(16) __half ks[MMA_K][D + MMA_PAD];
    __shared__ __align__(16) __half vs[MMA_K][D + MMA_PAD];
    const int h = blockIdx.y, hk = h / (heads_q / heads_kv);
    const int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP, t = lane % 4;
    const int q0 = blockIdx.x * MMA_Q, r0 = q0 + warp * 16 + lane / 4, r1 = r0 + 8;
    const int offset = n_k - n_q;  // causal: query i sees keys j <= i + offset
    unsigned qf[D / 16][4];
    load_a_rows<D>(qf, q, r0, n_q, q_stride, h * D);
    float o[D / 8][4];
#pragma unroll
    for (int n = 0; n < D / 8; n++) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
    float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.0f, l1 = 0.0f;
    const int kmax = causal ? min(n_k, q0 + MMA_Q + offset) : n_k;
    // With a window, the block's first query sees nothing before q0 + offset - window + 1.
    const int kmin = causal && window > 0 ? max(0, q0 + offset - window + 1) / MMA_K * MMA_K : 0;
    const int last_row = q0 + warp * 16 + 15;
    for (int k0 = kmin; k0 < kmax; k0 += MMA_K) {
        __syncthreads();
        stage_tile<D>(ks, k, k0, n_k, kv_stride, hk * D);
        stage_tile<D>(vs, v, k0, n_k, kv_stride, hk * D);
        __syncthreads();
        if (causal && k0 > last_row + offset) continue;  // the whole tile is in this warp's future (uniform)
        float s[MMA_K / 8][4];
#pragma unroll
        for (int n = 0; n < MMA_K / 8; n++) {
            s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
#pragma unroll
            for (int kk = 0; kk < D / 16; kk++) {
                unsigned b[2];
                tile_b_t<D>(b, ks, n * 8, kk);
                mma_16816(s[n], qf[kk], b, s[n]);
            }
        }
        float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
        for (int n = 0; n < MMA_K / 8; n++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int col = k0 + n * 8 + 2 * t + (e & 1), row = e < 2 ? r0 : r1;
                const bool ok =
                    col < n_k && (!causal || (col <= row + offset && (window <= 0 || col > row + offset - window)));
                s[n][e] = ok ? s[n][e] * scale : -INFINITY;
                if (e < 2) mx0 = fmaxf(mx0, s[n][e]);
                else mx1 = fmaxf(mx1, s[n][e]);
            }
        // Each row's values sit in the 4 lanes of a quad.
        mx0 = fmaxf(mx0, __shfl_xor_sync(FULL_MASK, mx0, 1));
        mx0 = fmaxf(mx0, __shfl_xor_sync(FULL_MASK, mx0, 2));
        mx1 = fmaxf(mx1, __shfl_xor_sync(FULL_MASK, mx1, 1));
        mx1 = fmaxf(mx1, __shfl_xor_sync(FULL_MASK, mx1, 2));
        const float mn0 = fmaxf(m0, mx0), mn1 = fmaxf(m1, mx1);
        // A row with no visible key yet keeps p = 0 (exp(-inf)) against a finite base.
        const float b0 = mn0 == -INFINITY ? 0.0f : mn0, b1 = mn1 == -INFINITY ? 0.0f : mn1;
        const float c0 = __expf(m0 - b0), c1 = __expf(m1 - b1);
        float sum0 = 0.0f, sum1 = 0.0f;
#pragma unroll
        for (int n = 0; n < MMA_K / 8; n++) {
            s[n][0] = __expf(s[n][0] - b0);
            s[n][1] = __expf(s[n][1] - b0);
            s[n][2] = __expf(s[n][2] - b1);
            s[n][3] = __expf(s[n][3] - b1);
            sum0 += s[n][0] + s[n][1];
            sum1 += s[n][2] + s[n][3];
        }
        sum0 += __shfl_xor_sync(FULL_MASK, sum0, 1);
        sum0 += __shfl_xor_sync(FULL_MASK, sum0, 2);
        sum1 += __shfl_xor_sync(FULL_MASK, sum1, 1);
        sum1 += __shfl_xor_sync(FULL_MASK, sum1, 2);
        l0 = l0 * c0 + sum0;
        l1 = l1 * c1 + sum1;
#pragma unroll
        for (int n = 0; n < D / 8; n++) {
            o[n][0] *= c0;
            o[n][1] *= c0;
            o[n][2] *= c1;
            o[n][3] *= c1;
        }
#pragma unroll
        for (int kk = 0; kk < MMA_K / 16; kk++) {
            unsigned a[4];
            c_to_a(a, &s[2 * kk]);
            mma_rows<D>(o, a, vs, kk * 16);
        }
        m0 = mn0;
        m1 = mn1;
    }
    store_rows<D>(out + h * D, o_stride, r0, n_q, o, l0 > 0.0f ? 1.0f / l0 : 0.0f, l1 > 0.0f ? 1.0f / l1 : 0.0f);
    if (lse && t == 0) {
        if (r0 < n_q) lse[(long long)r0 * heads_q + h] = l0 > 0.0f ? m0 + logf(l0) : -INFINITY;
        if (r1 < n_q) lse[(long long)r1 * heads_q + h] = l1 > 0.0f ? m1 + logf(l1) : -INFINITY;
    }
}

// grid (ceil(n_q / 64), heads_q), block 128; arguments as flash_attn_prefill_f16 without head_dim.
extern "C" __global__ void __launch_bounds__(128) flash_attn_mma_d64_f16(
    __half* __restrict__ out, const __half* __restrict__ q, const __half* __restrict__ k, const __half* __restrict__ v,
    int n_q, int n_k, int heads_q, int heads_kv, int q_stride, int kv_stride, int o_stride, float scale, int causal, float* __restrict__ lse,
    int window) {
    flash_attn_mma_body<64>(out, q, k, v, n_q, n_k, heads_q, heads_kv, q_stride, kv_stride, o_stride, scale, causal, lse, window);
}
extern "C" __global__ void __launch_bounds__(128) flash_attn_mma_d128_f16(
    __half* __restrict__ out, const __half* __restrict__ q, const __half* __restrict__ k, const __half* __restrict__ v,
    int n_q, int n_k, int heads_q, int heads_kv, int q_stride, int kv_stride, int o_stride, float scale, int causal, float* __restrict__ lse,
    int window) {
    flash_attn_mma_body<128>(out, q, k, v, n_q, n_k, heads_q, heads_kv, q_stride, kv_stride, o_stride, scale, causal, lse, window);
}

// ---- Backward (training): flash-style, the probabilities recomputed from the forward's saved log-sum-exp.
// With P = softmax(scale Q K^T) (masked), dP = dO V^T, delta_i = sum_d dO[i, d] O[i, d]:
// dS = P o (dP - delta), dQ = scale dS K, dK = scale dS^T Q, dV = P^T dO. Two kernels, no atomics: one over query
// tiles for dQ, one over key tiles for dK and dV (summed over the query heads of a GQA group). `window` masks as in
// the forward kernels (a masked pair has P = 0, so it adds nothing).

// delta[i, h] = sum_d dout[i, h, d] * out[i, h, d]. grid (n_q, heads_q), block 32.
extern "C" __global__ void attn_bwd_delta_f16(float* __restrict__ delta, const __half* __restrict__ dout, const __half* __restrict__ out,
                                              int heads_q, int head_dim, int stride) {
    const long long i = blockIdx.x;
    const int h = blockIdx.y;
    float s = 0.0f;
    for (int d = threadIdx.x; d < head_dim; d += WARP)
        s += __half2float(dout[i * stride + h * head_dim + d]) * __half2float(out[i * stride + h * head_dim + d]);
    s = warp_sum(s);
    if (threadIdx.x == 0) delta[i * heads_q + h] = s;
}

// dQ. Same tiling as the forward: grid (ceil(n_q / 16), heads_q), block 128, a warp per 4 query rows, a lane per key.
// q and dq rows of q_stride, k and v rows of kv_stride, dout rows of o_stride (q, k, v may sit in one fused buffer).
extern "C" __global__ void __launch_bounds__(128) flash_attn_bwd_dq_f16(
    __half* __restrict__ dq, const __half* __restrict__ q, const __half* __restrict__ k, const __half* __restrict__ v,
    const __half* __restrict__ dout, const float* __restrict__ lse, const float* __restrict__ delta,
    int n_q, int n_k, int heads_q, int heads_kv, int head_dim, int q_stride, int kv_stride, int o_stride, float scale, int causal,
    int window) {
    __shared__ float qs[QROWS][MAX_D];
    __shared__ float dos[QROWS][MAX_D];
    __shared__ __half ks[BC][MAX_D + 2];
    __shared__ __half vs[BC][MAX_D + 2];
    const int h = blockIdx.y, hk = h / (heads_q / heads_kv);
    const int q0 = blockIdx.x * QROWS;
    const int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP;
    const int offset = n_k - n_q;
    for (int idx = threadIdx.x; idx < QROWS * head_dim; idx += blockDim.x) {
        const int r = idx / head_dim, d = idx % head_dim, qi = q0 + r;
        const long long at = (long long)qi * q_stride + h * head_dim + d;
        qs[r][d] = qi < n_q ? __half2float(q[at]) * scale : 0.0f;
        dos[r][d] = qi < n_q ? __half2float(dout[(long long)qi * o_stride + h * head_dim + d]) : 0.0f;
    }
    float acc[RPW][DPL], li[RPW], di[RPW];
#pragma unroll
    for (int rr = 0; rr < RPW; rr++) {
        const int qi = q0 + warp + rr * WARPS;
        li[rr] = qi < n_q ? lse[(long long)qi * heads_q + h] : 0.0f;
        di[rr] = qi < n_q ? delta[(long long)qi * heads_q + h] : 0.0f;
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
            const bool valid = kj < n_k && (!causal || (kj <= qi + offset && (window <= 0 || kj > qi + offset - window)));
            float ds = 0.0f;
            if (valid) {
                float s = 0.0f, dp = 0.0f;
                for (int d = 0; d < head_dim; d++) {
                    s += qs[r][d] * __half2float(ks[lane][d]);
                    dp += dos[r][d] * __half2float(vs[lane][d]);
                }
                const float p = __expf(s - li[rr]);
                ds = p * (dp - di[rr]);
            }
            for (int j = 0; j < BC; j++) {
                const float dsj = __shfl_sync(FULL_MASK, ds, j);
#pragma unroll
                for (int i = 0; i < DPL; i++) {
                    const int d = lane + WARP * i;
                    if (d < head_dim) acc[rr][i] += dsj * __half2float(ks[j][d]);
                }
            }
        }
    }
#pragma unroll
    for (int rr = 0; rr < RPW; rr++) {
        const int qi = q0 + warp + rr * WARPS;
        if (qi >= n_q) continue;
#pragma unroll
        for (int i = 0; i < DPL; i++) {
            const int d = lane + WARP * i;
            if (d < head_dim) dq[(long long)qi * q_stride + h * head_dim + d] = __float2half_rn(acc[rr][i] * scale);
        }
    }
}

// dK and dV. grid (ceil(n_k / 16), heads_kv), block 128: a warp per 4 key rows, a lane per query of a 32-query
// tile; every query head of the group is visited. dk, dv rows of kv_stride.
extern "C" __global__ void __launch_bounds__(128) flash_attn_bwd_dkdv_f16(
    __half* __restrict__ dk, __half* __restrict__ dv, const __half* __restrict__ q, const __half* __restrict__ k,
    const __half* __restrict__ v, const __half* __restrict__ dout, const float* __restrict__ lse, const float* __restrict__ delta,
    int n_q, int n_k, int heads_q, int heads_kv, int head_dim, int q_stride, int kv_stride, int o_stride, float scale, int causal,
    int window) {
    __shared__ float kr[QROWS][MAX_D];
    __shared__ float vr[QROWS][MAX_D];
    __shared__ __half qt[BC][MAX_D + 2];
    __shared__ __half dot[BC][MAX_D + 2];
    __shared__ float lt[BC], dt[BC];
    const int hk = blockIdx.y, group = heads_q / heads_kv;
    const int j0 = blockIdx.x * QROWS;
    const int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP;
    const int offset = n_k - n_q;
    for (int idx = threadIdx.x; idx < QROWS * head_dim; idx += blockDim.x) {
        const int r = idx / head_dim, d = idx % head_dim, kj = j0 + r;
        const long long at = (long long)kj * kv_stride + hk * head_dim + d;
        kr[r][d] = kj < n_k ? __half2float(k[at]) * scale : 0.0f;
        vr[r][d] = kj < n_k ? __half2float(v[at]) : 0.0f;
    }
    float ak[RPW][DPL], av[RPW][DPL];
#pragma unroll
    for (int rr = 0; rr < RPW; rr++)
#pragma unroll
        for (int i = 0; i < DPL; i++) ak[rr][i] = av[rr][i] = 0.0f;
    // causal: key j is seen by queries i >= j - offset
    const int qmin = causal ? max(0, j0 - offset) : 0;
    for (int h = hk * group; h < (hk + 1) * group; h++) {
        for (int i0 = (qmin / BC) * BC; i0 < n_q; i0 += BC) {
            __syncthreads();
            for (int idx = threadIdx.x; idx < BC * head_dim; idx += blockDim.x) {
                const int r = idx / head_dim, d = idx % head_dim, qi = i0 + r;
                qt[r][d] = qi < n_q ? q[(long long)qi * q_stride + h * head_dim + d] : __float2half(0.0f);
                dot[r][d] = qi < n_q ? dout[(long long)qi * o_stride + h * head_dim + d] : __float2half(0.0f);
            }
            if (threadIdx.x < BC) {
                const int qi = i0 + threadIdx.x;
                lt[threadIdx.x] = qi < n_q ? lse[(long long)qi * heads_q + h] : 0.0f;
                dt[threadIdx.x] = qi < n_q ? delta[(long long)qi * heads_q + h] : 0.0f;
            }
            __syncthreads();
#pragma unroll
            for (int rr = 0; rr < RPW; rr++) {
                const int r = warp + rr * WARPS, kj = j0 + r;
                if (kj >= n_k) continue;  // uniform across the warp
                const int qi = i0 + lane;
                const bool valid = qi < n_q && (!causal || (kj <= qi + offset && (window <= 0 || kj > qi + offset - window)));
                float p = 0.0f, ds = 0.0f;
                if (valid) {
                    float s = 0.0f, dp = 0.0f;
                    for (int d = 0; d < head_dim; d++) {
                        s += kr[r][d] * __half2float(qt[lane][d]);
                        dp += vr[r][d] * __half2float(dot[lane][d]);
                    }
                    p = __expf(s - lt[lane]);
                    ds = p * (dp - dt[lane]);
                }
                for (int j = 0; j < BC; j++) {
                    const float pj = __shfl_sync(FULL_MASK, p, j), dsj = __shfl_sync(FULL_MASK, ds, j);
#pragma unroll
                    for (int i = 0; i < DPL; i++) {
                        const int d = lane + WARP * i;
                        if (d < head_dim) {
                            av[rr][i] += pj * __half2float(dot[j][d]);
                            ak[rr][i] += dsj * __half2float(qt[j][d]);
                        }
                    }
                }
            }
        }
    }
#pragma unroll
    for (int rr = 0; rr < RPW; rr++) {
        const int kj = j0 + warp + rr * WARPS;
        if (kj >= n_k) continue;
#pragma unroll
        for (int i = 0; i < DPL; i++) {
            const int d = lane + WARP * i;
            if (d < head_dim) {
                dk[(long long)kj * kv_stride + hk * head_dim + d] = __float2half_rn(ak[rr][i] * scale);
                dv[(long long)kj * kv_stride + hk * head_dim + d] = __float2half_rn(av[rr][i]);
            }
        }
    }
}

// ---- Tensor-core backward (sm_80+), head sizes 64 and 128: the same contract as flash_attn_bwd_dq_f16 and
// flash_attn_bwd_dkdv_f16 (attn_bwd_delta_f16 first). Scores, dP and the products run on mma.sync m16n8k16 with
// fp32 accumulation, 16 keys (dQ) or 16 queries (dK, dV) at a time, so each chunk's P and dS go from the score
// registers straight into A fragments.

// dQ: grid (ceil(n_q / 64), heads_q), block 128; a warp keeps its 16 rows of Q and dO as A fragments.
template <int D>
__device__ __forceinline__ void flash_attn_bwd_dq_mma_body(
    __half* __restrict__ dq, const __half* __restrict__ q, const __half* __restrict__ k, const __half* __restrict__ v,
    const __half* __restrict__ dout, const float* __restrict__ lse, const float* __restrict__ delta,
    int n_q, int n_k, int heads_q, int heads_kv, int q_stride, int kv_stride, int o_stride, float scale, int causal,
    int window) {
    __shared__ __align__(16) __half ks[MMA_K][D + MMA_PAD];
    __shared__ __align__(16) __half vs[MMA_K][D + MMA_PAD];
    const int h = blockIdx.y, hk = h / (heads_q / heads_kv);
    const int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP, t = lane % 4;
    const int q0 = blockIdx.x * MMA_Q, r0 = q0 + warp * 16 + lane / 4, r1 = r0 + 8;
    const int offset = n_k - n_q;
    unsigned qf[D / 16][4], df[D / 16][4];
    load_a_rows<D>(qf, q, r0, n_q, q_stride, h * D);
    load_a_rows<D>(df, dout, r0, n_q, o_stride, h * D);
    const float lse0 = r0 < n_q ? lse[(long long)r0 * heads_q + h] : 0.0f, lse1 = r1 < n_q ? lse[(long long)r1 * heads_q + h] : 0.0f;
    const float dl0 = r0 < n_q ? delta[(long long)r0 * heads_q + h] : 0.0f, dl1 = r1 < n_q ? delta[(long long)r1 * heads_q + h] : 0.0f;
    float acc[D / 8][4];
#pragma unroll
    for (int n = 0; n < D / 8; n++) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.0f;
    const int kmax = causal ? min(n_k, q0 + MMA_Q + offset) : n_k;
    const int last_row = q0 + warp * 16 + 15;
    for (int k0 = 0; k0 < kmax; k0 += MMA_K) {
        __syncthreads();
        stage_tile<D>(ks, k, k0, n_k, kv_stride, hk * D);
        stage_tile<D>(vs, v, k0, n_k, kv_stride, hk * D);
        __syncthreads();
        if (causal && k0 > last_row + offset) continue;  // uniform across the warp
#pragma unroll
        for (int ch = 0; ch < MMA_K / 16; ch++) {
            float s[2][4], dp[2][4];  // S and dP of this warp's rows against 16 keys
#pragma unroll
            for (int n = 0; n < 2; n++) {
                s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
                dp[n][0] = dp[n][1] = dp[n][2] = dp[n][3] = 0.0f;
#pragma unroll
                for (int kk = 0; kk < D / 16; kk++) {
                    unsigned bk[2], bv[2];
                    tile_b_t<D>(bk, ks, ch * 16 + n * 8, kk);
                    tile_b_t<D>(bv, vs, ch * 16 + n * 8, kk);
                    mma_16816(s[n], qf[kk], bk, s[n]);
                    mma_16816(dp[n], df[kk], bv, dp[n]);
                }
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    const int row = e < 2 ? r0 : r1, col = k0 + ch * 16 + n * 8 + 2 * t + (e & 1);
                    const bool ok = row < n_q && col < n_k &&
                                    (!causal || (col <= row + offset && (window <= 0 || col > row + offset - window)));
                    const float p = ok ? __expf(s[n][e] * scale - (e < 2 ? lse0 : lse1)) : 0.0f;
                    dp[n][e] = p * (dp[n][e] - (e < 2 ? dl0 : dl1));  // dS
                }
            }
            unsigned a[4];
            c_to_a(a, dp);
            mma_rows<D>(acc, a, ks, ch * 16);
        }
    }
    store_rows<D>(dq + h * D, q_stride, r0, n_q, acc, scale, scale);
}

// dK and dV: grid (ceil(n_k / 64), heads_kv), block 128, dynamic shared memory 4 * 64 * (D + 8) halves (the block's
// keys and values, then a 64-query tile of Q and dO). A warp owns 16 keys; every query head of the group is
// visited.
template <int D>
__device__ __forceinline__ void flash_attn_bwd_dkdv_mma_body(
    __half* __restrict__ dk, __half* __restrict__ dv, const __half* __restrict__ q, const __half* __restrict__ k,
    const __half* __restrict__ v, const __half* __restrict__ dout, const float* __restrict__ lse, const float* __restrict__ delta,
    int n_q, int n_k, int heads_q, int heads_kv, int q_stride, int kv_stride, int o_stride, float scale, int causal, int window,
    __half* smem) {
    typedef __half Row[D + MMA_PAD];
    Row* kt = reinterpret_cast<Row*>(smem);
    Row* vt = kt + MMA_K;
    Row* qt = vt + MMA_K;
    Row* dt = qt + MMA_Q;
    __shared__ float lt[MMA_Q], dlt[MMA_Q];
    const int hk = blockIdx.y, group = heads_q / heads_kv;
    const int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP, t = lane % 4;
    const int j0 = blockIdx.x * MMA_K, kw = warp * 16, kr0 = j0 + kw + lane / 4, kr1 = kr0 + 8;
    const int offset = n_k - n_q;  // key j is seen by queries i >= j - offset
    stage_tile<D>(kt, k, j0, n_k, kv_stride, hk * D);
    stage_tile<D>(vt, v, j0, n_k, kv_stride, hk * D);
    float ak[D / 8][4], av[D / 8][4];
#pragma unroll
    for (int n = 0; n < D / 8; n++) ak[n][0] = ak[n][1] = ak[n][2] = ak[n][3] = av[n][0] = av[n][1] = av[n][2] = av[n][3] = 0.0f;
    const int qmin = causal ? max(0, j0 - offset) : 0;
    for (int h = hk * group; h < (hk + 1) * group; h++) {
        for (int i0 = (qmin / MMA_Q) * MMA_Q; i0 < n_q; i0 += MMA_Q) {
            __syncthreads();
            stage_tile<D>(qt, q, i0, n_q, q_stride, h * D);
            stage_tile<D>(dt, dout, i0, n_q, o_stride, h * D);
            if (threadIdx.x < MMA_Q) {
                const int qi = i0 + threadIdx.x;
                lt[threadIdx.x] = qi < n_q ? lse[(long long)qi * heads_q + h] : 0.0f;
                dlt[threadIdx.x] = qi < n_q ? delta[(long long)qi * heads_q + h] : 0.0f;
            }
            __syncthreads();
            if (causal && j0 + kw > i0 + MMA_Q - 1 + offset) continue;  // no query of the tile sees these keys (uniform)
#pragma unroll
            for (int ch = 0; ch < MMA_Q / 16; ch++) {
                float st[2][4], dpt[2][4];  // S^T and dP^T: this warp's 16 keys x 16 queries
#pragma unroll
                for (int n = 0; n < 2; n++) st[n][0] = st[n][1] = st[n][2] = st[n][3] = dpt[n][0] = dpt[n][1] = dpt[n][2] = dpt[n][3] = 0.0f;
#pragma unroll
                for (int kk = 0; kk < D / 16; kk++) {
                    unsigned a_k[4], a_v[4];
                    tile_a<D>(a_k, kt, kw, kk);
                    tile_a<D>(a_v, vt, kw, kk);
#pragma unroll
                    for (int n = 0; n < 2; n++) {
                        unsigned bq[2], bd[2];
                        tile_b_t<D>(bq, qt, ch * 16 + n * 8, kk);
                        tile_b_t<D>(bd, dt, ch * 16 + n * 8, kk);
                        mma_16816(st[n], a_k, bq, st[n]);
                        mma_16816(dpt[n], a_v, bd, dpt[n]);
                    }
                }
#pragma unroll
                for (int n = 0; n < 2; n++)
#pragma unroll
                    for (int e = 0; e < 4; e++) {
                        const int key = e < 2 ? kr0 : kr1, ql = ch * 16 + n * 8 + 2 * t + (e & 1), qi = i0 + ql;
                        const bool ok = qi < n_q && key < n_k &&
                                        (!causal || (key <= qi + offset && (window <= 0 || key > qi + offset - window)));
                        const float p = ok ? __expf(st[n][e] * scale - lt[ql]) : 0.0f;
                        st[n][e] = p;
                        dpt[n][e] = p * (dpt[n][e] - dlt[ql]);  // dS^T
                    }
                unsigned ap[4], as[4];
                c_to_a(ap, st);
                c_to_a(as, dpt);
                mma_rows<D>(av, ap, dt, ch * 16);
                mma_rows<D>(ak, as, qt, ch * 16);
            }
        }
    }
    store_rows<D>(dk + hk * D, kv_stride, kr0, n_k, ak, scale, scale);
    store_rows<D>(dv + hk * D, kv_stride, kr0, n_k, av, 1.0f, 1.0f);
}

#define DQ_MMA_ARGS                                                                                                            \
    __half *__restrict__ dq, const __half *__restrict__ q, const __half *__restrict__ k, const __half *__restrict__ v,          \
        const __half *__restrict__ dout, const float *__restrict__ lse, const float *__restrict__ delta, int n_q, int n_k, \
        int heads_q, int heads_kv, int q_stride, int kv_stride, int o_stride, float scale, int causal, int window
#define DKDV_MMA_ARGS                                                                                                           \
    __half *__restrict__ dk, __half *__restrict__ dv, const __half *__restrict__ q, const __half *__restrict__ k,            \
        const __half *__restrict__ v, const __half *__restrict__ dout, const float *__restrict__ lse,                       \
        const float *__restrict__ delta, int n_q, int n_k, int heads_q, int heads_kv, int q_stride, int kv_stride, int o_stride, \
        float scale, int causal, int window

extern "C" __global__ void __launch_bounds__(128) flash_attn_bwd_dq_mma_d64_f16(DQ_MMA_ARGS) {
    flash_attn_bwd_dq_mma_body<64>(dq, q, k, v, dout, lse, delta, n_q, n_k, heads_q, heads_kv, q_stride, kv_stride, o_stride, scale, causal, window);
}
extern "C" __global__ void __launch_bounds__(128) flash_attn_bwd_dq_mma_d128_f16(DQ_MMA_ARGS) {
    flash_attn_bwd_dq_mma_body<128>(dq, q, k, v, dout, lse, delta, n_q, n_k, heads_q, heads_kv, q_stride, kv_stride, o_stride, scale, causal, window);
}
extern "C" __global__ void __launch_bounds__(128) flash_attn_bwd_dkdv_mma_d64_f16(DKDV_MMA_ARGS) {
    extern __shared__ __half dkdv_smem64[];
    flash_attn_bwd_dkdv_mma_body<64>(dk, dv, q, k, v, dout, lse, delta, n_q, n_k, heads_q, heads_kv, q_stride, kv_stride, o_stride, scale, causal, window, dkdv_smem64);
}
extern "C" __global__ void __launch_bounds__(128) flash_attn_bwd_dkdv_mma_d128_f16(DKDV_MMA_ARGS) {
    extern __shared__ __half dkdv_smem128[];
    flash_attn_bwd_dkdv_mma_body<128>(dk, dv, q, k, v, dout, lse, delta, n_q, n_k, heads_q, heads_kv, q_stride, kv_stride, o_stride, scale, causal, window, dkdv_smem128);
}
