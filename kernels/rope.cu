// Rotary position embedding, transformers' LLaMA layout (rotate_half: pairs (i, i + d/2)), in place on
// x[tokens, heads, head_dim] (row stride `stride` elements, so q and k of a fused QKV buffer work). cos/sin are
// fp32 tables [max_pos, head_dim/2] computed on the host (default, linear or llama3 scaling alike). Each row has
// `pos_stride` positions: 1, or Qwen2-VL's multimodal RoPE with 3 (temporal, height, width), where frequency pair
// i follows the first for i < s0, the second for i < s1, else the third (transformers' mrope_section).
#include "common.cuh"

__device__ __forceinline__ int rope_pos(const int* __restrict__ pos, int t, int i, int pos_stride, int s0, int s1) {
    const int c = pos_stride == 1 ? 0 : (i < s0 ? 0 : (i < s1 ? 1 : 2));
    return pos[(long long)t * pos_stride + c];
}

extern "C" __global__ void rope_f16(__half* __restrict__ x, const int* __restrict__ pos, const float* __restrict__ cos_t,
                                    const float* __restrict__ sin_t, int tokens, int heads, int head_dim, int stride,
                                    int pos_stride, int s0, int s1) {
    const int t = blockIdx.x, h = blockIdx.y;
    if (t >= tokens || h >= heads) return;
    const int half_d = head_dim / 2;
    __half* v = x + (long long)t * stride + (long long)h * head_dim;
    for (int i = threadIdx.x; i < half_d; i += blockDim.x) {
        const int p = rope_pos(pos, t, i, pos_stride, s0, s1);
        const float c = cos_t[(long long)p * half_d + i], s = sin_t[(long long)p * half_d + i];
        const float x1 = __half2float(v[i]), x2 = __half2float(v[i + half_d]);
        v[i] = __float2half_rn(x1 * c - x2 * s);
        v[i + half_d] = __float2half_rn(x2 * c + x1 * s);
    }
}

// Backward of rope_f16, in place on the gradient: the rotation is orthogonal, so this is the rotation by the
// negative angle (same tables).
extern "C" __global__ void rope_bwd_f16(__half* __restrict__ dx, const int* __restrict__ pos, const float* __restrict__ cos_t,
                                        const float* __restrict__ sin_t, int tokens, int heads, int head_dim, int stride,
                                        int pos_stride, int s0, int s1) {
    const int t = blockIdx.x, h = blockIdx.y;
    if (t >= tokens || h >= heads) return;
    const int half_d = head_dim / 2;
    __half* v = dx + (long long)t * stride + (long long)h * head_dim;
    for (int i = threadIdx.x; i < half_d; i += blockDim.x) {
        const int p = rope_pos(pos, t, i, pos_stride, s0, s1);
        const float c = cos_t[(long long)p * half_d + i], s = sin_t[(long long)p * half_d + i];
        const float x1 = __half2float(v[i]), x2 = __half2float(v[i + half_d]);
        v[i] = __float2half_rn(x1 * c + x2 * s);
        v[i + half_d] = __float2half_rn(x2 * c - x1 * s);
    }
}
