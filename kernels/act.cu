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

// Backward of swiglu_f16: with s = sigmoid(g), dg = dout * u * s * (1 + g (1 - s)), du = dout * g * s.
extern "C" __global__ void swiglu_bwd_f16(__half* __restrict__ dg, __half* __restrict__ du, const __half* __restrict__ dout,
                                          const __half* __restrict__ gate, const __half* __restrict__ up, long long n) {
    GRID_STRIDE(i, n) {
        const float g = __half2float(gate[i]), u = __half2float(up[i]), d = __half2float(dout[i]);
        const float s = 1.0f / (1.0f + __expf(-g));
        dg[i] = __float2half_rn(d * u * s * (1.0f + g * (1.0f - s)));
        du[i] = __float2half_rn(d * g * s);
    }
}

// Backward of gelu_f16 (erf form): dx = dout * (Phi(x) + x phi(x)), x the saved pre-activation.
extern "C" __global__ void gelu_bwd_f16(__half* __restrict__ dx, const __half* __restrict__ dout, const __half* __restrict__ x, long long n) {
    GRID_STRIDE(i, n) {
        const float v = __half2float(x[i]);
        const float cdf = 0.5f * (1.0f + erff(v * 0.70710678118654752f));
        const float pdf = __expf(-0.5f * v * v) * 0.39894228040143268f;
        dx[i] = __float2half_rn(__half2float(dout[i]) * (cdf + v * pdf));
    }
}

// Backward of quick_gelu_f16: with s = sigmoid(1.702 x), dx = dout * (s + 1.702 x s (1 - s)).
extern "C" __global__ void quick_gelu_bwd_f16(__half* __restrict__ dx, const __half* __restrict__ dout, const __half* __restrict__ x, long long n) {
    GRID_STRIDE(i, n) {
        const float v = __half2float(x[i]);
        const float s = 1.0f / (1.0f + __expf(-1.702f * v));
        dx[i] = __float2half_rn(__half2float(dout[i]) * (s + 1.702f * v * s * (1.0f - s)));
    }
}

// swiglu_bwd_f16 on the fused [rows, 2 cols] gate/up layout: dgu[r, c] = dgate, dgu[r, cols + c] = dup, from
// dout [rows, cols] and the saved gu.
extern "C" __global__ void swiglu_bwd_fused_f16(__half* __restrict__ dgu, const __half* __restrict__ dout, const __half* __restrict__ gu,
                                                long long rows, int cols) {
    GRID_STRIDE(i, rows * cols) {
        const long long r = i / cols, c = i % cols;
        const long long gi = r * 2 * cols + c, ui = gi + cols;
        const float g = __half2float(gu[gi]), u = __half2float(gu[ui]), d = __half2float(dout[i]);
        const float s = 1.0f / (1.0f + __expf(-g));
        dgu[gi] = __float2half_rn(d * u * s * (1.0f + g * (1.0f - s)));
        dgu[ui] = __float2half_rn(d * g * s);
    }
}
