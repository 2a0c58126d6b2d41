// Shared helpers of rlaifd's kernels: fp16 storage, fp32 accumulation. Compiled with NVRTC (no host code).
#pragma once
#include <cuda_fp16.h>

// NVRTC has no C library headers: the float constants we need.
#ifndef INFINITY
#define INFINITY __int_as_float(0x7f800000)
#endif
#ifndef NAN
#define NAN __int_as_float(0x7fffffff)
#endif

#define WARP 32
#define FULL_MASK 0xffffffffu

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = WARP / 2; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = WARP / 2; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, o));
    return v;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
__device__ __forceinline__ float block_sum(float v, float* scratch /* >= 32 floats */) {
    const int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP, warps = blockDim.x / WARP;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float t = lane < warps ? scratch[lane] : 0.0f;
    return warp_sum(t);
}

__device__ __forceinline__ float block_max(float v, float* scratch) {
    const int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP, warps = blockDim.x / WARP;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float t = lane < warps ? scratch[lane] : -INFINITY;
    return warp_max(t);
}

// One row's residual add and RMSNorm by the whole block: x[c] = round(x[c] + r[c]) in place (the residual stream),
// then y[c] = round(x[c] * rsqrt(mean(x^2) + eps) * w[c]); every thread gets there (block barriers inside). r is
// read through L2 (__ldcg), so other blocks of the same launch may have written it (after a fence). With cols % 8
// == 0 and 16-byte aligned rows, 8 halves per 16-byte load and 4 loads per thread in flight: a row of 4096 is one
// round of loads per pass (a chain of one load per element would be several round trips on the decode step's
// critical path). Each thread adds its squares in increasing column order.
__device__ __forceinline__ void add_rmsnorm_row(__half* __restrict__ y, __half* __restrict__ x, const __half* __restrict__ r, const __half* __restrict__ w,
                                                int cols, float eps, float* scratch /* >= 32 floats */) {
    const bool vec = cols % 8 == 0 && ((reinterpret_cast<unsigned long long>(x) | reinterpret_cast<unsigned long long>(r) |
                                        reinterpret_cast<unsigned long long>(w) | reinterpret_cast<unsigned long long>(y)) % 16) == 0;
    float ss = 0.0f;
    if (vec) {
        uint4* x8 = reinterpret_cast<uint4*>(x);
        const uint4* r8 = reinterpret_cast<const uint4*>(r);
#pragma unroll 4
        for (int c = threadIdx.x; c < cols / 8; c += blockDim.x) {
            uint4 xv = x8[c];
            const uint4 rv = __ldcg(r8 + c);
            __half2* xh = reinterpret_cast<__half2*>(&xv);
            const __half2* rh = reinterpret_cast<const __half2*>(&rv);
#pragma unroll
            for (int j = 0; j < 4; j++) {
                const float2 a = __half22float2(xh[j]), b = __half22float2(rh[j]);
                xh[j] = __floats2half2_rn(a.x + b.x, a.y + b.y);
                const float2 v = __half22float2(xh[j]);
                ss += v.x * v.x;
                ss += v.y * v.y;
            }
            x8[c] = xv;
        }
    } else {
        for (int c = threadIdx.x; c < cols; c += blockDim.x) {
            const __half s = __float2half_rn(__half2float(x[c]) + __half2float(__ldcg(r + c)));
            x[c] = s;
            const float v = __half2float(s);
            ss += v * v;
        }
    }
    const float inv = rsqrtf(block_sum(ss, scratch) / cols + eps);
    if (vec) {
        const uint4* x8 = reinterpret_cast<const uint4*>(x);
        const uint4* w8 = reinterpret_cast<const uint4*>(w);
        uint4* y8 = reinterpret_cast<uint4*>(y);
#pragma unroll 4
        for (int c = threadIdx.x; c < cols / 8; c += blockDim.x) {
            const uint4 xv = x8[c], wv = w8[c];
            uint4 yv;
            const __half2* xh = reinterpret_cast<const __half2*>(&xv);
            const __half2* wh = reinterpret_cast<const __half2*>(&wv);
            __half2* yh = reinterpret_cast<__half2*>(&yv);
#pragma unroll
            for (int j = 0; j < 4; j++) {
                const float2 a = __half22float2(xh[j]), b = __half22float2(wh[j]);
                yh[j] = __floats2half2_rn(a.x * inv * b.x, a.y * inv * b.y);
            }
            y8[c] = yv;
        }
    } else {
        for (int c = threadIdx.x; c < cols; c += blockDim.x) y[c] = __float2half_rn(__half2float(x[c]) * inv * __half2float(w[c]));
    }
}

// The "last block" pattern: each of `arrivals` blocks calls this after its writes; it returns true (in every
// thread) only in the block that arrives last, which then sees the others' writes (read them with __ldcg: they
// may sit in another SM's L1 no more than in this one's). Fence, then a ticket of `counter` (0 before the first
// arrival); the last block must set it back to 0 for the next launch. Every thread of the block must call it.
__device__ __forceinline__ bool last_to_arrive(unsigned* counter, unsigned arrivals) {
    __shared__ bool last;
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) last = atomicAdd(counter, 1u) == arrivals - 1;
    __syncthreads();
    if (last) __threadfence();
    return last;
}

// Two halves in one 32-bit register, the first in the low 16 bits (the operand layout of mma.sync).
__device__ __forceinline__ unsigned pack_h2(__half lo, __half hi) {
    return (unsigned)__half_as_ushort(lo) | ((unsigned)__half_as_ushort(hi) << 16);
}
__device__ __forceinline__ unsigned pack_f2(float lo, float hi) { return pack_h2(__float2half_rn(lo), __float2half_rn(hi)); }

// A hint to bring the 128-byte line holding p into L2: nothing is written, nothing waits for it. cuemu reads the
// byte instead, so its checker catches an address out of bounds.
__device__ __forceinline__ void prefetch_l2(const void* p) {
#if defined(CUEMU)
    (void)*static_cast<const volatile char*>(p);
#else
    asm volatile("prefetch.global.L2 [%0];" ::"l"(p));
#endif
}

// d = a b + c on the tensor cores, one warp: A 16x16 (row-major), B 16x8 (column-major), fp16 operands, fp32 C and
// D. Fragments as the PTX ISA lays them out for mma.m16n8k16 (lane l, g = l / 4, t = l % 4): a0 = A[g][2t, 2t+1],
// a1 = A[g+8][2t..], a2 = A[g][2t+8..], a3 = A[g+8][2t+8..]; b0 = B[2t, 2t+1][g], b1 = B[2t+8, 2t+9][g];
// c0, c1 = C[g][2t, 2t+1], c2, c3 = C[g+8][2t, 2t+1]. sm_80 and later only (the launchers check).
__device__ __forceinline__ void mma_16816(float d[4], const unsigned a[4], const unsigned b[2], const float c[4]) {
#if defined(CUEMU)
    cuemu::mma_m16n8k16(d, a, b, c);
#elif __CUDA_ARCH__ >= 800
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%10, %11, %12, %13};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
#else
    __trap();
#endif
}
