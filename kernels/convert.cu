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
