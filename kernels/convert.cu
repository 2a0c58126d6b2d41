// f32 <-> f16 conversion (weights are uploaded as fp16; losses and log-probs come back as f32).
#include "common.cuh"

extern "C" __global__ void f32_to_f16(__half* __restrict__ out, const float* __restrict__ in, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        out[i] = __float2half_rn(in[i]);
}

extern "C" __global__ void f16_to_f32(float* __restrict__ out, const __half* __restrict__ in, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        out[i] = __half2float(in[i]);
}

// out[i] = offset + scale * u(i), u uniform in [-1, 1) from a counter-based hash of (seed, i): random weights for
// benchmarks, generated on the device (a 7B model would take minutes to generate and upload from the host).
extern "C" __global__ void fill_uniform_f16(__half* __restrict__ out, long long n, unsigned long long seed, float scale, float offset) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        unsigned long long z = seed + 0x9e3779b97f4a7c15ull * (unsigned long long)(i + 1);
        z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
        z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
        z ^= z >> 31;
        const float u = (float)(z >> 40) * (1.0f / 16777216.0f) * 2.0f - 1.0f;
        out[i] = __float2half_rn(offset + scale * u);
    }
}
