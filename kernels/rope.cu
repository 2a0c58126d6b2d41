// Rotary position embedding, transformers' LLaMA layout (rotate_half: pairs (i, i + d/2)), in place on
// x[tokens, heads, head_dim] (row stride `stride` elements, so q and k of a fused QKV buffer work). cos/sin are
// fp32 tables [max_pos, head_dim/2] computed on the host (default, linear or llama3 scaling alike).
#include "common.cuh"

extern "C" __global__ void rope_f16(__half* __restrict__ x, const int* __restrict__ pos, const float* __restrict__ cos_t,
                                    const float* __restrict__ sin_t, int tokens, int heads, int head_dim, int stride) {
    const int t = blockIdx.x, h = blockIdx.y;
    if (t >= tokens || h >= heads) return;
    const int half_d = head_dim / 2;
    const int p = pos[t];
    __half* v = x + (long long)t * stride + (long long)h * head_dim;
    for (int i = threadIdx.x; i < half_d; i += blockDim.x) {
        const float c = cos_t[(long long)p * half_d + i], s = sin_t[(long long)p * half_d + i];
        const float x1 = __half2float(v[i]), x2 = __half2float(v[i + half_d]);
        v[i] = __float2half_rn(x1 * c - x2 * s);
        v[i + half_d] = __float2half_rn(x2 * c + x1 * s);
    }
}

// Backward of rope_f16, in place on the gradient: the rotation is orthogonal, so this is the rotation by the
// negative angle (same tables).
extern "C" __global__ void rope_bwd_f16(__half* __restrict__ dx, const int* __restrict__ pos, const float* __restrict__ cos_t,
                                        const float* __restrict__ sin_t, int tokens, int heads, int head_dim, int stride) {
    const int t = blockIdx.x, h = blockIdx.y;
    if (t >= tokens || h >= heads) return;
    const int half_d = head_dim / 2;
    const int p = pos[t];
    __half* v = dx + (long long)t * stride + (long long)h * head_dim;
    for (int i = threadIdx.x; i < half_d; i += blockDim.x) {
        const float c = cos_t[(long long)p * half_d + i], s = sin_t[(long long)p * half_d + i];
        const float x1 = __half2float(v[i]), x2 = __half2float(v[i + half_d]);
        v[i] = __float2half_rn(x1 * c + x2 * s);
        v[i + half_d] = __float2half_rn(x2 * c - x1 * s);
    }
}
