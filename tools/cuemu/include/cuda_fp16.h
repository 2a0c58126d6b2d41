// cuemu: the part of the CUDA device API that rlaifd's kernels use, for compiling kernels/*.cu as C++ and running
// them on the CPU (tests only, see tools/cuemu/README.md). Each CUDA thread is a fiber; one block runs at a time on
// the launching host thread, so `__shared__` variables can be statics, one copy per host thread. Barriers and warp shuffles switch
// fibers (driver.cpp). Not used by the daemon: NVRTC compiles the same sources for real GPUs.
#pragma once
#include <math.h>
#include <cmath>
#include <cstdint>
#include <cstring>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define CUEMU 1
#define __shared__ static thread_local
#define __align__(n) __attribute__((aligned(n)))

struct uint3 {
    unsigned x, y, z;
};
struct dim3 {
    unsigned x, y, z;
};
namespace cuemu {
// The checker (check.cpp): a vector load or store of `n` bytes at `p` (a GPU faults unless p is n-aligned).
void note_vector(const void* p, unsigned n);
}
// Copies note their address: a 16-byte vector access (`*reinterpret_cast<const uint4*>(p)`) is split into four
// 4-byte accesses on the host, so the checker could not see its alignment otherwise.
struct alignas(16) uint4 {
    unsigned x, y, z, w;
    uint4() = default;
    uint4(unsigned a, unsigned b, unsigned c, unsigned d) : x(a), y(b), z(c), w(d) {}
    uint4(const uint4& o) : x(o.x), y(o.y), z(o.z), w(o.w) { cuemu::note_vector(&o, 16); }
    uint4& operator=(const uint4& o) {
        cuemu::note_vector(&o, 16);
        cuemu::note_vector(this, 16);
        x = o.x;
        y = o.y;
        z = o.z;
        w = o.w;
        return *this;
    }
};
// The same for an 8-byte vector access.
struct alignas(8) uint2 {
    unsigned x, y;
    uint2() = default;
    uint2(unsigned a, unsigned b) : x(a), y(b) {}
    uint2(const uint2& o) : x(o.x), y(o.y) { cuemu::note_vector(&o, 8); }
    uint2& operator=(const uint2& o) {
        cuemu::note_vector(&o, 8);
        cuemu::note_vector(this, 8);
        x = o.x;
        y = o.y;
        return *this;
    }
};
struct alignas(8) float2 {
    float x, y;
};
inline uint2 make_uint2(unsigned x, unsigned y) { return uint2(x, y); }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4(x, y, z, w); }
inline float2 make_float2(float x, float y) { return float2{x, y}; }

// fp16 storage with IEEE round-to-nearest-even conversions (GCC's _Float16).
struct __half {
    uint16_t bits;
};
struct alignas(4) __half2 {
    __half x, y;
};
namespace cuemu {
extern const float* const half_table;  // all 65536 fp16 values as floats (driver-side, built once)
}
inline float __half2float(__half h) { return cuemu::half_table[h.bits]; }
inline __half __float2half_rn(float v) {
    _Float16 f = (_Float16)v;
    __half h;
    std::memcpy(&h.bits, &f, 2);
    return h;
}
inline __half __float2half(float v) { return __float2half_rn(v); }
inline unsigned short __half_as_ushort(__half h) { return h.bits; }
inline __half __ushort_as_half(unsigned short b) { return __half{b}; }
inline float2 __half22float2(__half2 h) { return float2{__half2float(h.x), __half2float(h.y)}; }
inline __half2 __floats2half2_rn(float a, float b) { return __half2{__float2half_rn(a), __float2half_rn(b)}; }

// The per-fiber and per-block state the driver keeps (driver.cpp).
namespace cuemu {
struct ThreadView {
    uint3 tid;
    uint3 bid;
    dim3 bdim;
    dim3 gdim;
    int lane;
    int warp;
};
extern thread_local ThreadView* cur __attribute__((tls_model("initial-exec")));
void syncthreads();
void syncwarp();
uint64_t* warp_slots();      // 32 words, one per lane; the other half of a pair after each warp barrier
uint32_t* warp_exchange();  // 32 lanes x 16 words, for warp-wide matrix operations; alternates likewise
void* dyn_smem();
// The checker (check.cpp), after a warp barrier: a shuffle that reads lane `src` (its value is undefined on a GPU
// when that lane has exited or does not exist), an mma.sync (every lane of the warp must take part).
void note_shuffle(int src, int parity);
void note_mma(int parity);
int warp_parity();  // of the warp barrier the running thread is about to reach

template <class T>
T shfl(T v, int src) {
    static_assert(sizeof(T) <= 8, "cuemu shuffles up to 8 bytes");
    // The warp's slots alternate between barriers, so one barrier per shuffle is enough: a lane cannot write
    // these slots again before every lane has passed the next barrier, that is, has read them.
    uint64_t* slots = warp_slots();
    const int parity = warp_parity();
    uint64_t b = 0;
    std::memcpy(&b, &v, sizeof(T));
    slots[cur->lane] = b;
    syncwarp();
    note_shuffle(src, parity);
    uint64_t s = slots[src];
    T r;
    std::memcpy(&r, &s, sizeof(T));
    return r;
}
// mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32, with the fragment layout of the PTX ISA: lane l, g = l / 4,
// t = l % 4. A (16x16, row-major): a0 = A[g][2t, 2t+1], a1 = A[g+8][2t..], a2 = A[g][2t+8..], a3 = A[g+8][2t+8..];
// B (16x8, column-major): b0 = B[2t, 2t+1][g], b1 = B[2t+8, 2t+9][g]; C and D (16x8): c0, c1 = C[g][2t, 2t+1],
// c2, c3 = C[g+8][2t, 2t+1]. Each register of A and B holds two halves, the lower-indexed one in the low 16 bits.
inline void mma_m16n8k16(float d[4], const uint32_t a[4], const uint32_t b[2], const float c[4]) {
    uint32_t* x = warp_exchange();
    const int parity = warp_parity();
    const int lane = cur->lane;
    for (int i = 0; i < 4; i++) x[lane * 16 + i] = a[i];
    for (int i = 0; i < 2; i++) x[lane * 16 + 4 + i] = b[i];
    syncwarp();
    note_mma(parity);
    auto half_at = [](uint32_t w, int hi) {
        __half h;
        h.bits = uint16_t(hi ? w >> 16 : w & 0xffff);
        return __half2float(h);
    };
    // A[r][k] and B[k][n] from the lanes that hold them.
    auto A = [&](int r, int k) {
        const int g = r % 8, t = (k % 8) / 2, reg = (r >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0);
        return half_at(x[(g * 4 + t) * 16 + reg], k % 2);
    };
    auto B = [&](int k, int n) {
        const int t = (k % 8) / 2, reg = k >= 8 ? 1 : 0;
        return half_at(x[(n * 4 + t) * 16 + 4 + reg], k % 2);
    };
    const int g = lane / 4, t = lane % 4;
    float out[4];
    for (int i = 0; i < 4; i++) {
        const int r = g + (i >= 2 ? 8 : 0), n = 2 * t + (i % 2);
        float s = 0.0f;
        for (int k = 0; k < 16; k++) s += A(r, k) * B(k, n);
        out[i] = c[i] + s;
    }
    for (int i = 0; i < 4; i++) d[i] = out[i];  // (the exchange alternates between barriers, as the slots do)
}
}  // namespace cuemu

#define threadIdx (cuemu::cur->tid)
#define blockIdx (cuemu::cur->bid)
#define blockDim (cuemu::cur->bdim)
#define gridDim (cuemu::cur->gdim)

inline void __syncthreads() { cuemu::syncthreads(); }
inline void __syncwarp(unsigned = 0xffffffffu) { cuemu::syncwarp(); }

// Lanes are grouped in segments of `width`; a source outside the caller's segment gives the caller's own value.
template <class T>
T __shfl_sync(unsigned, T v, int src, int width = 32) {
    const int lane = cuemu::cur->lane, base = lane & ~(width - 1);
    return cuemu::shfl(v, base + (src & (width - 1)));
}
template <class T>
T __shfl_xor_sync(unsigned, T v, int mask, int width = 32) {
    const int lane = cuemu::cur->lane, src = lane ^ mask;
    return cuemu::shfl(v, (src & ~(width - 1)) == (lane & ~(width - 1)) ? src : lane);
}
template <class T>
T __shfl_down_sync(unsigned, T v, unsigned delta, int width = 32) {
    const int lane = cuemu::cur->lane;
    return cuemu::shfl(v, (lane & (width - 1)) + (int)delta < width ? lane + (int)delta : lane);
}
template <class T>
T __shfl_up_sync(unsigned, T v, unsigned delta, int width = 32) {
    const int lane = cuemu::cur->lane;
    return cuemu::shfl(v, (lane & (width - 1)) >= (int)delta ? lane - (int)delta : lane);
}

// Fibers of one block run one at a time, so atomics are plain read-modify-writes. They are hidden from the
// checker's race detection (atomics do not race) but still checked for bounds (check.cpp).
// __threadfence before an atomic releases the block's earlier writes to whichever block's atomic on the same
// address comes later (which acquires them): the "last block" pattern, where the block that takes the last ticket
// of a counter reads what the others wrote. The checker then does not call those accesses a race between blocks.
namespace cuemu {
void note_atomic(const void* p, size_t n, const void* ret);
void note_fence();
}
inline void __threadfence() { cuemu::note_fence(); }
template <class T>
__attribute__((no_sanitize_thread, noinline)) T atomicAdd(T* p, T v) {
    cuemu::note_atomic(p, sizeof(T), __builtin_return_address(0));
    T o = *p;
    *p = o + v;
    return o;
}
template <class T>
__attribute__((no_sanitize_thread, noinline)) T atomicCAS(T* p, T cmp, T v) {
    cuemu::note_atomic(p, sizeof(T), __builtin_return_address(0));
    T o = *p;
    if (o == cmp) *p = v;
    return o;
}

template <class T>
inline T __ldg(const T* p) {
    return *p;
}
// A load that bypasses L1 (written by another block of the launch, seen after a fence and an atomic).
template <class T>
inline T __ldcg(const T* p) {
    return *p;
}

inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __int_as_float(int i) {
    float f;
    std::memcpy(&f, &i, 4);
    return f;
}
inline int __float_as_int(float f) {
    int i;
    std::memcpy(&i, &f, 4);
    return i;
}
inline float __saturatef(float x) { return x < 0.0f ? 0.0f : (x > 1.0f ? 1.0f : x); }
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }
