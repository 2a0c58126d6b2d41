// cuemu's own tests: the emulated primitives the kernels rely on, against what CUDA specifies. Run by
// tools/cuemu/build.sh after every build; exits non-zero on the first failure.
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "common.cuh"
#include "runtime.h"

static int failures = 0;
#define EXPECT(cond, ...)                               \
    do {                                                \
        if (!(cond)) {                                  \
            std::fprintf(stderr, "cuemu selftest: ");   \
            std::fprintf(stderr, __VA_ARGS__);          \
            std::fprintf(stderr, "\n");                 \
            failures++;                                 \
        }                                               \
    } while (0)

// Every shuffle flavour, with the full warp and with 8-lane segments.
static void shuffles(int* out) {
    const int t = threadIdx.x, lane = t % 32;
    const int v = 1000 * t;
    out[t * 8 + 0] = __shfl_xor_sync(FULL_MASK, v, 5);
    out[t * 8 + 1] = __shfl_sync(FULL_MASK, v, 7);
    out[t * 8 + 2] = __shfl_down_sync(FULL_MASK, v, 3);
    out[t * 8 + 3] = __shfl_up_sync(FULL_MASK, v, 3);
    out[t * 8 + 4] = __shfl_xor_sync(FULL_MASK, v, 5, 8);
    out[t * 8 + 5] = __shfl_sync(FULL_MASK, v, 3, 8);
    out[t * 8 + 6] = __shfl_down_sync(FULL_MASK, v, 3, 8);
    out[t * 8 + 7] = int(warp_sum(float(lane)));
}

// A block sum over 96 threads (three warps) through common.cuh's shared scratch, twice per block, on a grid of 3.
static void block_sums(float* out) {
    __shared__ float scratch[32];
    const float a = block_sum(float(threadIdx.x + 1), scratch);
    const float b = block_sum(float(blockIdx.x), scratch);
    if (threadIdx.x == 0) {
        out[blockIdx.x * 2] = a;
        out[blockIdx.x * 2 + 1] = b;
    }
}

// Threads that end early no longer count at __syncthreads.
static void early_exit(int* out) {
    int* seen = static_cast<int*>(cuemu::dyn_smem());  // `extern __shared__ int seen[];` as build.sh rewrites it
    if (threadIdx.x % 3 == 0) return;
    seen[threadIdx.x] = int(threadIdx.x);
    __syncthreads();
    out[threadIdx.x] = seen[(threadIdx.x + 1) % blockDim.x];  // poisoned (0xffffffff = -1) where the thread ended
}

// Threads of one warp at different barriers: the launch must fail, not hang.
static void divergent(int* out) {
    if (threadIdx.x == 33)
        __syncthreads();
    else
        out[threadIdx.x] = __shfl_sync(FULL_MASK, int(threadIdx.x), 0);
}

// One mma.sync m16n8k16: every lane builds its fragments from row-major A (16x16), B (16x8) and C (16x8) by the
// PTX ISA layout and writes its four results back to D.
static void mma(const float* a, const float* b, const float* c, float* d) {
    const int lane = threadIdx.x, g = lane / 4, t = lane % 4;
    auto pa = [&](int r, int k) { return pack_f2(a[r * 16 + k], a[r * 16 + k + 1]); };
    auto pb = [&](int k, int n) { return pack_f2(b[k * 8 + n], b[(k + 1) * 8 + n]); };
    const unsigned af[4] = {pa(g, 2 * t), pa(g + 8, 2 * t), pa(g, 2 * t + 8), pa(g + 8, 2 * t + 8)};
    const unsigned bf[2] = {pb(2 * t, g), pb(2 * t + 8, g)};
    const float cf[4] = {c[g * 8 + 2 * t], c[g * 8 + 2 * t + 1], c[(g + 8) * 8 + 2 * t], c[(g + 8) * 8 + 2 * t + 1]};
    float df[4];
    mma_16816(df, af, bf, cf);
    d[g * 8 + 2 * t] = df[0];
    d[g * 8 + 2 * t + 1] = df[1];
    d[(g + 8) * 8 + 2 * t] = df[2];
    d[(g + 8) * 8 + 2 * t + 1] = df[3];
}

int main() {
    using cuemu::run_grid;
    {
        std::vector<int> out(64 * 8, -7);
        int* p = out.data();
        std::string e = run_grid("shuffles", [p] { shuffles(p); }, dim3{1, 1, 1}, dim3{64, 1, 1}, 0);
        EXPECT(e.empty(), "shuffles: %s", e.c_str());
        for (int t = 0; t < 64; t++) {
            const int lane = t % 32, w = t - lane, seg = lane & ~7;
            const int want[8] = {
                1000 * (w + (lane ^ 5)),
                1000 * (w + 7),
                1000 * (w + (lane + 3 < 32 ? lane + 3 : lane)),
                1000 * (w + (lane >= 3 ? lane - 3 : lane)),
                1000 * (w + seg + ((lane ^ 5) & 7)),
                1000 * (w + seg + 3),
                1000 * (w + ((lane & 7) + 3 < 8 ? lane + 3 : lane)),
                496,
            };
            for (int i = 0; i < 8; i++) EXPECT(out[t * 8 + i] == want[i], "shuffle %d of thread %d: %d, want %d", i, t, out[t * 8 + i], want[i]);
        }
    }
    {
        std::vector<float> out(6, -1.0f);
        float* p = out.data();
        std::string e = run_grid("block_sums", [p] { block_sums(p); }, dim3{3, 1, 1}, dim3{96, 1, 1}, 0);
        EXPECT(e.empty(), "block_sums: %s", e.c_str());
        for (int b = 0; b < 3; b++) {
            EXPECT(out[b * 2] == 96.0f * 97.0f / 2.0f, "block %d sum %f", b, out[b * 2]);
            EXPECT(out[b * 2 + 1] == 96.0f * b, "block %d second sum %f", b, out[b * 2 + 1]);
        }
    }
    {
        std::vector<int> out(40, -7);
        int* p = out.data();
        std::string e = run_grid("early_exit", [p] { early_exit(p); }, dim3{1, 1, 1}, dim3{40, 1, 1}, 40 * sizeof(int));
        EXPECT(e.empty(), "early_exit: %s", e.c_str());
        for (int t = 0; t < 40; t++) {
            const int n = (t + 1) % 40;
            const int want = t % 3 == 0 ? -7 : (n % 3 == 0 ? -1 : n);
            EXPECT(out[t] == want, "early_exit thread %d: %d, want %d", t, out[t], want);
        }
    }
    {
        std::vector<int> out(64, 0);
        int* p = out.data();
        std::string e = run_grid("divergent", [p] { divergent(p); }, dim3{1, 1, 1}, dim3{64, 1, 1}, 0);
        EXPECT(e.find("deadlock") != std::string::npos, "divergent barriers were not reported: '%s'", e.c_str());
    }
    {
        // Small integers: exact in fp16, so the product is exact in fp32.
        std::vector<float> a(256), b(128), c(128), d(128, -1.0f);
        for (int i = 0; i < 256; i++) a[i] = float((i * 7) % 11) - 5.0f;
        for (int i = 0; i < 128; i++) b[i] = float((i * 5) % 9) - 4.0f;
        for (int i = 0; i < 128; i++) c[i] = float(i % 13) * 0.5f;
        const float *pa = a.data(), *pb = b.data(), *pc = c.data();
        float* pd = d.data();
        std::string e = run_grid("mma", [=] { mma(pa, pb, pc, pd); }, dim3{1, 1, 1}, dim3{32, 1, 1}, 0);
        EXPECT(e.empty(), "mma: %s", e.c_str());
        for (int r = 0; r < 16; r++)
            for (int n = 0; n < 8; n++) {
                float want = c[r * 8 + n];
                for (int k = 0; k < 16; k++) want += a[r * 16 + k] * b[k * 8 + n];
                EXPECT(d[r * 8 + n] == want, "mma D[%d][%d] = %f, want %f", r, n, d[r * 8 + n], want);
            }
    }
    {
        const __half h = __float2half_rn(1.0f + 1.0f / 4096.0f);  // halfway between two fp16 values: to even
        EXPECT(__half2float(h) == 1.0f, "fp16 rounding: %f", __half2float(h));
        EXPECT(__half2float(__float2half_rn(65520.0f)) == INFINITY, "fp16 overflow");
        EXPECT(__half2float(__float2half_rn(5.96e-8f)) > 0.0f, "fp16 subnormal");
    }
    if (failures) {
        std::fprintf(stderr, "cuemu selftest: %d failures\n", failures);
        return 1;
    }
    std::printf("cuemu selftest: shuffles, block sums, early exits, deadlock detection, mma.sync and fp16 rounding pass\n");
    return 0;
}
