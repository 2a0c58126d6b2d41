// Elementwise: SwiGLU, GELU (erf, the projector's), quick_gelu (OpenAI CLIP's), bias and residual adds.
#include "common.cuh"

#define GRID_STRIDE(i, n) for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < (n); i += (long long)gridDim.x * blockDim.x)

// out[r, c] = silu(gate[r, c]) * up[r, c]; gate and up may be halves of one fused [rows, 2*cols] buffer (in_stride).
extern "C" __global__ void swiglu_f16(__half* __restrict__ out, const __half* __restrict__ gate, const __half* __restrict__ up,
                                      long long rows, int cols, int in_stride) {
    GRID_STRIDE(i, rows * cols) {
        const long long r = i / cols, c = i % cols;
        const float g = __half2float(gate[r * in_stride + c]), u = __half2float(up[r * in_stride + c]);
        out[i] = __float2half_rn(g / (1.0f + __expf(-g)) * u);
    }
}

extern "C" __global__ void gelu_f16(__half* __restrict__ x, long long n) {
    GRID_STRIDE(i, n) {
        const float v = __half2float(x[i]);
        x[i] = __float2half_rn(0.5f * v * (1.0f + erff(v * 0.70710678118654752f)));
    }
}

extern "C" __global__ void quick_gelu_f16(__half* __restrict__ x, long long n) {
    GRID_STRIDE(i, n) {
        const float v = __half2float(x[i]);
        x[i] = __float2half_rn(v / (1.0f + __expf(-1.702f * v)));
    }
}

// x[r, c] += b[c]
extern "C" __global__ void bias_add_f16(__half* __restrict__ x, const __half* __restrict__ b, long long rows, int cols) {
    GRID_STRIDE(i, rows * cols) x[i] = __float2half_rn(__half2float(x[i]) + __half2float(b[i % cols]));
}

// y += x
extern "C" __global__ void residual_add_f16(__half* __restrict__ y, const __half* __restrict__ x, long long n) {
    GRID_STRIDE(i, n) y[i] = __float2half_rn(__half2float(y[i]) + __half2float(x[i]));
}
