// cuemu's own tests: the emulated primitives the kernels rely on, against what CUDA specifies. Run by
// tools/cuemu/build.sh after every build; exits non-zero on the first failure.
#include <unistd.h>

#include <thread>

#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "check.h"
#include "common.cuh"
#include "runtime.h"

extern "C" {
int cuMemAlloc_v2(uint64_t* p, size_t n);
int cuMemFree_v2(uint64_t p);
int cuMemcpyHtoD_v2(uint64_t dst, const void* src, size_t n);
int cuMemcpyDtoH_v2(void* dst, uint64_t src, size_t n);
struct NcclId {
    char internal[128];
};
int ncclGetUniqueId(NcclId* id);
int ncclCommInitRank(void** comm, int nranks, NcclId id, int rank);
int ncclCommInitAll(void** comms, int ndev, const int* devlist);
int ncclAllReduce(const void* send, void* recv, size_t count, int type, int op, void* comm, void* stream);
int ncclGroupStart();
int ncclGroupEnd();
int ncclCommDestroy(void* comm);
int cublasLtMatmulDescCreate(void** d, int compute, int scale);
int cublasLtMatmulDescDestroy(void* d);
int cublasLtMatrixLayoutCreate(void** l, int type, uint64_t rows, uint64_t cols, int64_t ld);
int cublasLtMatrixLayoutDestroy(void* l);
int cublasLtMatmul(void*, void* desc, const void* alpha, const void* a, void* adesc, const void* b, void* bdesc, const void* beta, const void* c,
                   void* cdesc, void* d, void* ddesc, const void*, void*, size_t, void* stream);
}

// An 8x8x8 fp16 GEMM through the cuBLASLt stand-in on device buffers a, b, d; 0 when it ran.
static int gemm8(uint64_t a, uint64_t b, uint64_t d) {
    void *desc = nullptr, *l = nullptr;
    cublasLtMatmulDescCreate(&desc, 68, 0);
    cublasLtMatrixLayoutCreate(&l, 2, 8, 8, 8);
    const float one = 1.0f, zero = 0.0f;
    const void *pa = reinterpret_cast<void*>(a), *pb = reinterpret_cast<void*>(b);
    void* pd = reinterpret_cast<void*>(d);
    const int r = cublasLtMatmul(nullptr, desc, &one, pa, l, pb, l, &zero, pd, l, pd, l, nullptr, nullptr, 0, nullptr);
    cublasLtMatrixLayoutDestroy(l);
    cublasLtMatmulDescDestroy(desc);
    return r;
}

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
    // (and those reads of what no thread wrote fail the launch: the checker reports them)
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

// The checker's cases (check.cpp). `mode` picks the pattern; each is a race or not as the comment says.
static void shared_patterns(int mode, int* out) {
    __shared__ int buf[64];
    __shared__ int counter;
    const int t = threadIdx.x;
    if (mode != 7) {  // every slot written first, so what follows is about the race alone
        buf[t] = -1;
        __syncthreads();
    }
    switch (mode) {
        case 0:  // write, no barrier, read another thread's slot: a race (read after write)
            buf[t] = t;
            out[t] = buf[(t + 1) % 64];
            break;
        case 1:  // the same with __syncthreads: fine
            buf[t] = t;
            __syncthreads();
            out[t] = buf[(t + 1) % 64];
            break;
        case 2:  // within a warp, ordered by __syncwarp: fine
            buf[t] = t;
            __syncwarp();
            out[t] = buf[(t & ~31) + (t + 1) % 32];
            break;
        case 3:  // across warps, only __syncwarp between: a race
            buf[t] = t;
            __syncwarp();
            out[t] = buf[(t + 32) % 64];
            break;
        case 4:  // read, then another thread overwrites what was read, no barrier: a race (write after read)
            out[t] = buf[t ^ 1];
            buf[t] = t;
            break;
        case 5:  // every thread adds to one counter atomically: fine
            if (t == 0) counter = 0;
            __syncthreads();
            atomicAdd(&counter, 1);
            __syncthreads();
            out[t] = counter;
            break;
        case 6:  // a value shared through a shuffle, then shared memory read after __syncthreads: fine
            buf[t] = __shfl_xor_sync(FULL_MASK, t, 1);
            __syncthreads();
            out[t] = buf[63 - t];
            break;
        case 7:  // a read of what no thread of this block wrote (here: the previous launch's values): an error
            out[t] = buf[t];
            break;
    }
}

// Blocks of one launch sharing device memory (`p`: 64 ints). `mode` picks the pattern, as in shared_patterns.
static void block_patterns(int mode, int* p) {
    const int b = blockIdx.x, t = threadIdx.x;
    switch (mode) {
        case 0:  // every block writes the same word: a race
            if (t == 0) p[0] = b;
            break;
        case 1:  // each block reads its neighbour's word, then writes its own: a race
            if (t == 0) p[b] = p[(b + 1) % 4] + 1;
            break;
        case 2:  // each block its own words: fine
            p[b * 16 + t % 16] = b;
            break;
        case 3:  // every block adds to one word atomically: fine
            if (t == 0) atomicAdd(p, 1);
            break;
        case 4:  // every block reads one word no block writes: fine
            p[16 + b] = p[0];
            break;
        case 5:  // the last block (by an atomic ticket, after a fence) reads every block's word and resets: fine
        case 6:  // the same without the fence: a race
            if (t == 0) {
                p[b] = b + 1;
                if (mode == 5) __threadfence();
                if (atomicAdd(reinterpret_cast<unsigned*>(p + 63), 1u) == gridDim.x - 1) {
                    if (mode == 5) __threadfence();
                    int sum = 0;
                    for (int i = 0; i < (int)gridDim.x; i++) sum += p[i];
                    p[32] = sum;
                    p[63] = 0;
                }
            }
            break;
    }
}

// Shuffles after some lanes exited: reading an exited lane is an error (mode 0), reading live ones is not (1).
static void exited_lanes(int mode, int* out) {
    const int t = threadIdx.x;
    if (t >= 20) return;
    out[t] = mode == 0 ? __shfl_xor_sync(FULL_MASK, t, 16) : __shfl_xor_sync(FULL_MASK, t, 1);
}

// A 16-byte vector load from `p` + `offset` bytes, and a 4-byte one: a GPU needs both aligned to their size.
static void vector_load(const unsigned char* p, int offset, int wide, unsigned* out) {
    if (threadIdx.x != 0) return;
    if (wide)
        *reinterpret_cast<uint4*>(out) = *reinterpret_cast<const uint4*>(p + offset);
    else
        *out = *reinterpret_cast<const unsigned*>(p + offset);
}

static void read_at(const int* p, int i, int* out) {
    if (threadIdx.x == 0) *out = p[i];
}

static void dyn_read(int i, int* out) {
    int* d = static_cast<int*>(cuemu::dyn_smem());
    if (threadIdx.x == 0) {
        d[i] = 1;
        *out = d[i];
    }
}

extern "C" {
int cuModuleLoadData(void** m, const void* image);
int cuModuleGetFunction(void** f, void* m, const char* name);
int cuFuncSetAttribute(void* f, int attr, int v);
int cuLaunchKernel(void* f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz, unsigned smem, void* s, void** params,
                   void** extra);
}

// Launches checked against a resource table (as scripts/check-kernels writes it): a made-up row for gelu_f16 of
// 100 registers and __launch_bounds__(512) on sm_90.
// The NCCL stand-in (nccl.cpp): two ranks as threads sum in place (both get the same bytes), the same through one
// thread's group, and ranks that disagree on a collective fail it instead of hanging.
static void nccl() {
    const size_t n = 1000;
    uint64_t buf[2];
    for (int r = 0; r < 2; r++) {
        std::vector<float> x(n);
        for (size_t i = 0; i < n; i++) x[i] = float(r + 1) * 0.5f + float(i);
        cuMemAlloc_v2(&buf[r], n * 4);
        cuMemcpyHtoD_v2(buf[r], x.data(), n * 4);
    }
    NcclId id;
    ncclGetUniqueId(&id);
    int rc[2] = {-1, -1};
    auto rank = [&](int r) {
        void* comm = nullptr;
        rc[r] = ncclCommInitRank(&comm, 2, id, r);
        if (rc[r] == 0) rc[r] = ncclAllReduce(reinterpret_cast<void*>(buf[r]), reinterpret_cast<void*>(buf[r]), n, 7, 0, comm, nullptr);
        ncclCommDestroy(comm);
    };
    std::thread t1(rank, 1);
    rank(0);
    t1.join();
    EXPECT(rc[0] == 0 && rc[1] == 0, "nccl: all-reduce between threads: %d %d", rc[0], rc[1]);
    for (int r = 0; r < 2; r++) {
        std::vector<float> y(n);
        cuMemcpyDtoH_v2(y.data(), buf[r], n * 4);
        for (size_t i = 0; i < n; i += 97) EXPECT(y[i] == 1.5f + 2.0f * float(i), "nccl: rank %d element %zu: %f", r, i, y[i]);
    }
    void* comms[2];
    int devs[2] = {0, 0};
    EXPECT(ncclCommInitAll(comms, 2, devs) == 0, "nccl: ncclCommInitAll");
    ncclGroupStart();
    for (int r = 0; r < 2; r++) ncclAllReduce(reinterpret_cast<void*>(buf[r]), reinterpret_cast<void*>(buf[r]), n, 7, 0, comms[r], nullptr);
    EXPECT(ncclGroupEnd() == 0, "nccl: a group of both ranks in one thread");
    std::vector<float> y(n);
    cuMemcpyDtoH_v2(y.data(), buf[1], n * 4);
    EXPECT(y[3] == 2.0f * (1.5f + 6.0f), "nccl: the grouped sum: %f", y[3]);
    ncclGroupStart();
    ncclAllReduce(reinterpret_cast<void*>(buf[0]), reinterpret_cast<void*>(buf[0]), n, 7, 0, comms[0], nullptr);
    ncclAllReduce(reinterpret_cast<void*>(buf[1]), reinterpret_cast<void*>(buf[1]), n - 1, 7, 0, comms[1], nullptr);
    EXPECT(ncclGroupEnd() != 0, "nccl: ranks with different counts were not refused");
    EXPECT(ncclAllReduce(reinterpret_cast<void*>(buf[0]), reinterpret_cast<void*>(buf[0]), n + 1, 7, 0, comms[0], nullptr) != 0,
           "nccl: a count past the buffer was not refused");
    for (auto c : comms) ncclCommDestroy(c);
    for (auto b : buf) cuMemFree_v2(b);
}

static void launch_limits() {
    const std::string name = "/tmp/cuemu-selftest-resources-" + std::to_string(getpid()) + ".tsv";
    const char* table = name.c_str();
    FILE* f = std::fopen(table, "w");
    std::fprintf(f, "# kernel arch registers static maxntid\ngelu_f16\tsm_90\t100\t1024\t512\n");
    std::fclose(f);
    setenv("CUEMU_RESOURCES", table, 1);  // read at the first cuLaunchKernel
    void *m = nullptr, *k = nullptr;
    EXPECT(cuModuleLoadData(&m, "// cuemu selftest") == 0 && cuModuleGetFunction(&k, m, "gelu_f16") == 0, "no gelu_f16 in the build");
    uint64_t buf = 0;
    cuMemAlloc_v2(&buf, 64);
    long long n = 0;
    void* params[] = {&buf, &n};
    auto launch = [&](unsigned threads, unsigned smem) { return cuLaunchKernel(k, 1, 1, 1, threads, 1, 1, smem, nullptr, params, nullptr); };
    std::fprintf(stderr, "cuemu selftest: the four refusals printed next are expected\n");
    EXPECT(launch(512, 0) == 0, "checker: 512 threads of 100 registers (51200 of 65536) were refused");
    EXPECT(launch(640, 0) != 0, "checker: 640 threads of 100 registers (more than 65536) were not refused");
    EXPECT(launch(256, 0) == 0 && launch(544, 0) != 0, "checker: __launch_bounds__(512): 256 threads refused or 544 not refused");
    EXPECT(launch(128, 48 * 1024 - 1024) == 0, "checker: 47 KiB of dynamic shared memory (+1 KiB static) were refused");
    EXPECT(launch(128, 48 * 1024) != 0, "checker: 48 KiB of dynamic shared memory (+1 KiB static) without opting in were not refused");
    cuFuncSetAttribute(k, 8, 100 * 1024);
    EXPECT(launch(128, 100 * 1024) == 0 && launch(128, 100 * 1024 + 4) != 0, "checker: opting in to 100 KiB of dynamic shared memory");
    cuMemFree_v2(buf);
    unsetenv("CUEMU_RESOURCES");
    std::remove(table);
}

static void checker() {
    using cuemu::run_grid;
    std::vector<int> out(64);
    int* o = out.data();
    const char* shapes[] = {"read after write, no barrier", "__syncthreads", "__syncwarp in a warp", "__syncwarp across warps",
                            "write after read, no barrier", "atomicAdd", "shuffle then __syncthreads", "read before any write"};
    const bool racy[] = {true, false, false, true, true, false, false, true};
    for (int mode = 0; mode < 8; mode++) {
        const std::string e = run_grid("shared_patterns", [mode, o] { shared_patterns(mode, o); }, dim3{2, 1, 1}, dim3{64, 1, 1}, 0);
        const bool found = e.find(mode == 7 ? "read of unwritten shared memory" : "shared-memory race") != std::string::npos;
        if (std::getenv("CUEMU_SELFTEST_VERBOSE") && !e.empty()) std::printf("%s: %s\n", shapes[mode], e.c_str());
        EXPECT(found == racy[mode], "checker, %s: %s", shapes[mode], e.empty() ? "no race reported" : e.c_str());
        if (racy[mode]) EXPECT(e.find("shared_patterns(int, int*)::buf") != std::string::npos, "checker, %s: the report does not name `buf`: %s", shapes[mode], e.c_str());
    }
    if (!cuemu::arena_reserved()) {  // (device memory then comes from the heap, unchecked: nothing below applies)
        std::printf("cuemu selftest: no device-memory arena could be reserved here; its checks are not tested\n");
        return;
    }
    uint64_t dev = 0;
    EXPECT(cuMemAlloc_v2(&dev, 100) == 0, "cuMemAlloc_v2 failed");
    int* p = reinterpret_cast<int*>(dev);
    int* res = o;
    std::string e = run_grid("read_at", [p, res] { read_at(p, 24, res); }, dim3{1, 1, 1}, dim3{32, 1, 1}, 0);
    EXPECT(e.empty(), "checker: an in-bounds read was reported: %s", e.c_str());
    e = run_grid("read_at", [p, res] { read_at(p, 25, res); }, dim3{1, 1, 1}, dim3{32, 1, 1}, 0);
    EXPECT(e.find("out-of-bounds read") != std::string::npos && e.find("100-byte device allocation (4 bytes past its end)") != std::string::npos,
           "checker: a read past the end of a 100-byte allocation: %s", e.empty() ? "not reported" : e.c_str());
    if (std::getenv("CUEMU_SELFTEST_VERBOSE")) std::printf("%s\n", e.c_str());
    e = run_grid("read_at", [p, res] { read_at(p, -1, res); }, dim3{1, 1, 1}, dim3{32, 1, 1}, 0);
    if (std::getenv("CUEMU_SELFTEST_VERBOSE")) std::printf("%s\n", e.c_str());
    EXPECT(e.find("out-of-bounds read") != std::string::npos, "checker: a read before the start of an allocation: %s", e.empty() ? "not reported" : e.c_str());
    {
        uint64_t words = 0;
        EXPECT(cuMemAlloc_v2(&words, 64 * sizeof(int)) == 0, "cuMemAlloc_v2 failed");
        int* w = reinterpret_cast<int*>(words);
        const char* names[] = {"blocks writing one word", "blocks reading their neighbour's word", "blocks with their own words", "blocks adding atomically",
                               "blocks reading one word", "the last block reading the others' words after fences and a ticket",
                               "the last block reading the others' words without fences"};
        const bool bad[] = {true, true, false, false, false, false, true};
        for (int mode = 0; mode < 7; mode++) {
            if (mode >= 5) {
                const int zero = 0;
                EXPECT(cuMemcpyHtoD_v2(words + 63 * sizeof(int), &zero, sizeof(int)) == 0, "cuMemcpyHtoD_v2 failed");
            }
            const std::string r = run_grid("block_patterns", [mode, w] { block_patterns(mode, w); }, dim3{4, 1, 1}, dim3{32, 1, 1}, 0);
            if (std::getenv("CUEMU_SELFTEST_VERBOSE") && !r.empty()) std::printf("%s: %s\n", names[mode], r.c_str());
            EXPECT((r.find("race between blocks") != std::string::npos) == bad[mode], "checker, %s: %s", names[mode], r.empty() ? "no race reported" : r.c_str());
        }
        EXPECT(cuMemFree_v2(words) == 0, "cuMemFree_v2 failed");
    }
    for (int mode = 0; mode < 2; mode++) {
        const std::string r = run_grid("exited_lanes", [mode, o] { exited_lanes(mode, o); }, dim3{1, 1, 1}, dim3{32, 1, 1}, 0);
        if (std::getenv("CUEMU_SELFTEST_VERBOSE") && !r.empty()) std::printf("%s\n", r.c_str());
        EXPECT((r.find("shuffle from a missing lane") != std::string::npos) == (mode == 0), "checker, shuffles after lanes 20-31 exited (mode %d): %s", mode,
               r.empty() ? "nothing reported" : r.c_str());
    }
    {
        uint64_t buf = 0;
        cuMemAlloc_v2(&buf, 64);
        const unsigned char* src = reinterpret_cast<const unsigned char*>(buf);
        alignas(16) unsigned host[4];
        unsigned* dst = host;
        const int cases[4][3] = {{16, 1, 0}, {8, 1, 1}, {4, 0, 0}, {2, 0, 1}};  // offset, 16-byte?, misaligned?
        for (const auto& c : cases) {
            const int off = c[0], wide = c[1];
            const std::string r = run_grid("vector_load", [=] { vector_load(src, off, wide, dst); }, dim3{1, 1, 1}, dim3{32, 1, 1}, 0);
            if (std::getenv("CUEMU_SELFTEST_VERBOSE") && !r.empty()) std::printf("%s\n", r.c_str());
            EXPECT((r.find("misaligned") != std::string::npos) == bool(c[2]), "checker: a %d-byte load at byte %d: %s", wide ? 16 : 4, off,
                   r.empty() ? "nothing reported" : r.c_str());
        }
        cuMemFree_v2(buf);
    }
    std::fprintf(stderr, "cuemu selftest: the three refusals printed next are expected\n");
    {
        uint64_t a = 0, b = 0, small = 0, d = 0;
        cuMemAlloc_v2(&a, 128);
        cuMemAlloc_v2(&b, 128);
        cuMemAlloc_v2(&small, 64);
        cuMemAlloc_v2(&d, 128);
        EXPECT(gemm8(a, b, d) == 0, "checker: an 8x8x8 GEMM on 128-byte matrices was refused");
        EXPECT(gemm8(a, small, d) != 0, "checker: a GEMM reading 128 bytes of B from a 64-byte allocation was not refused");
        EXPECT(gemm8(a, b, a) != 0, "checker: a GEMM writing over its input A was not refused");
        for (uint64_t p : {a, b, small, d}) cuMemFree_v2(p);
    }
    int host[32] = {};
    EXPECT(cuMemcpyHtoD_v2(dev, host, 100) == 0, "checker: a 100-byte copy into 100 bytes was refused");
    EXPECT(cuMemcpyHtoD_v2(dev, host, 104) != 0, "checker: a 104-byte copy into 100 bytes was not refused");
    EXPECT(cuMemFree_v2(dev) == 0, "cuMemFree_v2 failed");
    e = run_grid("read_at", [p, res] { read_at(p, 0, res); }, dim3{1, 1, 1}, dim3{32, 1, 1}, 0);
    EXPECT(e.find("freed") != std::string::npos, "checker: a read of freed device memory: %s", e.empty() ? "not reported" : e.c_str());
    e = run_grid("dyn_read", [res] { dyn_read(9, res); }, dim3{1, 1, 1}, dim3{32, 1, 1}, 40);
    EXPECT(e.empty(), "checker: an in-bounds dynamic shared access was reported: %s", e.c_str());
    e = run_grid("dyn_read", [res] { dyn_read(10, res); }, dim3{1, 1, 1}, dim3{32, 1, 1}, 40);
    EXPECT(e.find("out-of-bounds write of dynamic shared memory") != std::string::npos, "checker: a write past 40 bytes of dynamic shared memory: %s",
           e.empty() ? "not reported" : e.c_str());
}

int main() {
    using cuemu::run_grid;
    cuemu::register_kernel_module(reinterpret_cast<const void*>(&checker));  // this program's `__shared__` arrays
    checker();
    launch_limits();
    nccl();
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
        EXPECT(e.find("read of unwritten shared memory") != std::string::npos, "early_exit: the reads of unwritten slots: %s", e.empty() ? "not reported" : e.c_str());
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
        // Half a warp: lanes 16-31 do not exist, which mma.sync does not allow.
        const std::string half = run_grid("mma", [=] { mma(pa, pb, pc, pd); }, dim3{1, 1, 1}, dim3{16, 1, 1}, 0);
        EXPECT(half.find("mma.sync without the whole warp") != std::string::npos && half.find("16 (no such thread)") != std::string::npos,
               "checker, mma.sync on half a warp: %s", half.empty() ? "nothing reported" : half.c_str());

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
    std::printf("cuemu selftest: shuffles, block sums, early exits, deadlock detection, mma.sync, fp16 rounding, the NCCL stand-in and the checker (races, bounds) pass\n");
    return 0;
}
