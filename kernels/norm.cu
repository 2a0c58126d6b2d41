// RMSNorm (LLaMA) and LayerNorm (CLIP): one block per row, statistics in fp32.
#include "common.cuh"

// y = x / sqrt(mean(x^2) + eps) * w
extern "C" __global__ void rmsnorm_f16(__half* __restrict__ y, const __half* __restrict__ x, const __half* __restrict__ w, int cols, float eps) {
    __shared__ float scratch[32];
    const long long row = blockIdx.x;
    const __half* xr = x + row * cols;
    float ss = 0.0f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        float v = __half2float(xr[c]);
        ss += v * v;
    }
    const float inv = rsqrtf(block_sum(ss, scratch) / cols + eps);
    for (int c = threadIdx.x; c < cols; c += blockDim.x)
        y[row * cols + c] = __float2half_rn(__half2float(xr[c]) * inv * __half2float(w[c]));
}

// y = (x - mean) / sqrt(var + eps) * w + b   (biased variance, as torch.nn.LayerNorm)
extern "C" __global__ void layernorm_f16(__half* __restrict__ y, const __half* __restrict__ x, const __half* __restrict__ w,
                                         const __half* __restrict__ b, int cols, float eps) {
    __shared__ float scratch[32];
    const long long row = blockIdx.x;
    const __half* xr = x + row * cols;
    float s = 0.0f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) s += __half2float(xr[c]);
    const float mean = block_sum(s, scratch) / cols;
    float sq = 0.0f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        float d = __half2float(xr[c]) - mean;
        sq += d * d;
    }
    const float inv = rsqrtf(block_sum(sq, scratch) / cols + eps);
    for (int c = threadIdx.x; c < cols; c += blockDim.x)
        y[row * cols + c] = __float2half_rn((__half2float(xr[c]) - mean) * inv * __half2float(w[c]) + __half2float(b[c]));
}
