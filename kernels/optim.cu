// Optimizer kernels for mixed-precision LoRA training: fp32 master weights and AdamW moments, fp16 copies for the
// forward pass, gradients unscaled (dynamic loss scaling) and clipped inside the update.
#include "common.cuh"

#define GRID_STRIDE(i, n) for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < (n); i += (long long)gridDim.x * blockDim.x)

// acc[i] += g[i] (fp16 gradient of one micro-batch into the fp32 accumulator).
extern "C" __global__ void grad_accumulate_f32(float* __restrict__ acc, const __half* __restrict__ g, long long n) {
    GRID_STRIDE(i, n) acc[i] += __half2float(g[i]);
}

// *sumsq += sum g[i]^2 in fp64; a NaN or inf anywhere makes the sum non-finite (the loss-scale overflow check).
// block 256; *sumsq zeroed by the caller.
extern "C" __global__ void grad_sumsq_f32(double* __restrict__ sumsq, const float* __restrict__ g, long long n) {
    __shared__ float scratch[32];
    float s = 0.0f;
    GRID_STRIDE(i, n) s += g[i] * g[i];
    s = block_sum(s, scratch);
    if (threadIdx.x == 0) atomicAdd(sumsq, (double)s);
}

// AdamW on fp32 master weights p with moments m, v and the accumulated, loss-scaled gradient g:
// g' = g * gscale (gscale = clip factor / loss scale), m = b1 m + (1 - b1) g', v = b2 v + (1 - b2) g'^2,
// p -= lr (m / bc1 / (sqrt(v / bc2) + eps) + wd p); p16 (may be null) gets the fp16 copy; g is zeroed.
extern "C" __global__ void adamw_f32(float* __restrict__ p, float* __restrict__ m, float* __restrict__ v, float* __restrict__ g,
                                     __half* __restrict__ p16, long long n, float lr, float b1, float b2, float eps, float wd,
                                     float bc1, float bc2, float gscale) {
    GRID_STRIDE(i, n) {
        const float gi = g[i] * gscale;
        const float mi = b1 * m[i] + (1.0f - b1) * gi;
        const float vi = b2 * v[i] + (1.0f - b2) * gi * gi;
        m[i] = mi;
        v[i] = vi;
        const float pi = p[i] - lr * (mi / bc1 / (sqrtf(vi / bc2) + eps) + wd * p[i]);
        p[i] = pi;
        if (p16) p16[i] = __float2half_rn(pi);
        g[i] = 0.0f;
    }
}
