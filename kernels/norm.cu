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

// Backward of rmsnorm_f16 for one row per block. With inv = 1/sqrt(mean(x^2)+eps) and g = dout * w:
// dx = inv * g - inv^3 / cols * x * sum(g * x); dw (fp32, may be null: frozen weights) += dout * x * inv.
extern "C" __global__ void rmsnorm_bwd_f16(__half* __restrict__ dx, float* __restrict__ dw, const __half* __restrict__ dout,
                                           const __half* __restrict__ x, const __half* __restrict__ w, int cols, float eps) {
    __shared__ float scratch[32];
    const long long row = blockIdx.x;
    const __half* xr = x + row * cols;
    const __half* dr = dout + row * cols;
    float ss = 0.0f, gx = 0.0f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        const float v = __half2float(xr[c]);
        ss += v * v;
        gx += __half2float(dr[c]) * __half2float(w[c]) * v;
    }
    ss = block_sum(ss, scratch);
    gx = block_sum(gx, scratch);
    const float inv = rsqrtf(ss / cols + eps);
    const float k = inv * inv * inv / cols * gx;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        const float v = __half2float(xr[c]), d = __half2float(dr[c]);
        dx[row * cols + c] = __float2half_rn(inv * d * __half2float(w[c]) - k * v);
        if (dw) atomicAdd(dw + c, d * v * inv);
    }
}

// Backward of layernorm_f16 for one row per block. With xhat = (x - mean) * inv and g = dout * w:
// dx = inv * (g - mean(g) - xhat * mean(g * xhat)); dw += dout * xhat, db += dout (fp32, each may be null).
extern "C" __global__ void layernorm_bwd_f16(__half* __restrict__ dx, float* __restrict__ dw, float* __restrict__ db,
                                             const __half* __restrict__ dout, const __half* __restrict__ x, const __half* __restrict__ w,
                                             int cols, float eps) {
    __shared__ float scratch[32];
    const long long row = blockIdx.x;
    const __half* xr = x + row * cols;
    const __half* dr = dout + row * cols;
    float s = 0.0f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) s += __half2float(xr[c]);
    const float mean = block_sum(s, scratch) / cols;
    float sq = 0.0f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        const float d = __half2float(xr[c]) - mean;
        sq += d * d;
    }
    const float inv = rsqrtf(block_sum(sq, scratch) / cols + eps);
    float sg = 0.0f, sgx = 0.0f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        const float g = __half2float(dr[c]) * __half2float(w[c]);
        sg += g;
        sgx += g * (__half2float(xr[c]) - mean) * inv;
    }
    const float mg = block_sum(sg, scratch) / cols, mgx = block_sum(sgx, scratch) / cols;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        const float d = __half2float(dr[c]), xh = (__half2float(xr[c]) - mean) * inv;
        dx[row * cols + c] = __float2half_rn(inv * (d * __half2float(w[c]) - mg - xh * mgx));
        if (dw) atomicAdd(dw + c, d * xh);
        if (db) atomicAdd(db + c, d);
    }
}

// Residual add fused with the next RMSNorm (one launch instead of two per norm in the decoder): x += r (the
// residual stream, in place), then y = x / sqrt(mean(x^2) + eps) * w. One block per row.
extern "C" __global__ void add_rmsnorm_f16(__half* __restrict__ y, __half* __restrict__ x, const __half* __restrict__ r,
                                           const __half* __restrict__ w, int cols, float eps) {
    __shared__ float scratch[32];
    const long long row = blockIdx.x;
    add_rmsnorm_row(y + row * cols, x + row * cols, r + row * cols, w, cols, eps, scratch);
}
