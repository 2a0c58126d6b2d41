// Unmerged LoRA on top of a base projection y = x W^T (cuBLASLt): y += scale * (x A^T) B^T, in two small kernels
// (rank r is 8-64, so these are bandwidth-bound reductions, not GEMMs worth a library call).
#include "common.cuh"

// t[m, j] = sum_k x[m, k] * a[j, k]  (fp32 out). grid (rows), block 128: warp w takes ranks w, w+4, ...; lanes split k.
extern "C" __global__ void __launch_bounds__(128) lora_down_f16(float* __restrict__ t, const __half* __restrict__ x, const __half* __restrict__ a,
                                                                int k, int rank, int x_stride) {
    const long long m = blockIdx.x;
    const int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP, warps = blockDim.x / WARP;
    const __half* xr = x + m * x_stride;
    for (int j = warp; j < rank; j += warps) {
        const __half* ar = a + (long long)j * k;
        float s = 0.0f;
        for (int c = lane; c < k; c += WARP) s += __half2float(xr[c]) * __half2float(ar[c]);
        s = warp_sum(s);
        if (lane == 0) t[m * rank + j] = s;
    }
}

// y[m, n] += scale * sum_j t[m, j] * b[n, j]. grid (ceil(n / 128), rows), block 128.
extern "C" __global__ void __launch_bounds__(128) lora_up_add_f16(__half* __restrict__ y, const float* __restrict__ t, const __half* __restrict__ b,
                                                                  int n, int rank, float scale, int y_stride) {
    extern __shared__ float tr[];  // rank floats
    const long long m = blockIdx.y;
    for (int j = threadIdx.x; j < rank; j += blockDim.x) tr[j] = t[m * rank + j];
    __syncthreads();
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= n) return;
    const __half* br = b + (long long)c * rank;
    float s = 0.0f;
    for (int j = 0; j < rank; j++) s += tr[j] * __half2float(br[j]);
    __half* yp = y + m * y_stride + c;
    *yp = __float2half_rn(__half2float(*yp) + scale * s);
}

// LoRA dropout (peft's lora_dropout, on the LoRA branch's input while training) with the CPU backend's masks
// (engine::adapter::Adapter::dropout_input): element i of one call's input is dropped when the top 53 bits of the
// first SplitMix64 output seeded with base ^ i * 0x9E3779B97F4A7C15 fall below thr = ceil(p * 2^53) (the CPU's
// `u < p` on the same bits, in integers); kept elements are scaled by keep = 1 / (1 - p). A pure function of
// (base, i), so the backward pass regenerates the forward's mask.
__device__ __forceinline__ bool lora_dropped(unsigned long long base, long long i, unsigned long long thr) {
    unsigned long long z = (base ^ ((unsigned long long)i * 0x9E3779B97F4A7C15ull)) + 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    return (z >> 11) < thr;
}

// out[i] = x[i] * keep, or 0 where dropped; i < n. 1-D grid.
extern "C" __global__ void lora_dropout_f16(__half* __restrict__ out, const __half* __restrict__ x, long long n, unsigned long long base,
                                            unsigned long long thr, float keep) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    out[i] = lora_dropped(base, i, thr) ? __float2half_rn(0.0f) : __float2half_rn(__half2float(x[i]) * keep);
}

// Backward through the mask: dx[i] += dxl[i] * keep where kept; i < n. 1-D grid.
extern "C" __global__ void lora_dropout_bwd_add_f16(__half* __restrict__ dx, const __half* __restrict__ dxl, long long n, unsigned long long base,
                                                    unsigned long long thr, float keep) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n || lora_dropped(base, i, thr)) return;
    dx[i] = __float2half_rn(__half2float(dx[i]) + __half2float(dxl[i]) * keep);
}
