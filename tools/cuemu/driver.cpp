// cuemu's CUDA driver API: the functions cudarc calls for rlaifd, on host memory. One emulated device, "sm_90";
// device addresses are host addresses (256-byte aligned, like cudaMalloc's); every stream runs its work at once,
// in order, on the calling thread; a captured graph is the list of captured calls, replayed in order. Freshly
// allocated memory is filled with 0xff bytes (NaN in fp16 and fp32), so a kernel that reads what nobody wrote
// shows NaN instead of a lucky zero. Memory bookkeeping is under one lock; kernels run on the calling thread, so
// threads with their own streams (parallel tests) run their kernels at the same time.
#include <dlfcn.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <vector>

#include "check.h"
#include "driver.h"

namespace cuemu {

std::recursive_mutex& lock() {
    static std::recursive_mutex m;
    return m;
}

int device_count() {
    static const int n = [] {
        const char* e = std::getenv("CUEMU_DEVICES");
        if (!e || !*e) return 1;
        char* end = nullptr;
        const long v = std::strtol(e, &end, 10);
        if (*end || v < 1 || v > MAX_DEVICES) {
            std::fprintf(stderr, "cuemu: CUEMU_DEVICES=%s is not a device count from 1 to %d; using 1\n", e, MAX_DEVICES);
            return 1;
        }
        return int(v);
    }();
    return n;
}

namespace {

struct Graph {
    std::vector<Call> ops;
};

struct Stream {
    Graph* capture = nullptr;  // non-null while capturing
};

struct Event {
    double t = 0;
};

struct Module {
    int unused = 0;
};

std::map<uintptr_t, size_t>& allocations() {
    static std::map<uintptr_t, size_t> a;
    return a;
}
size_t used_now = 0, used_high = 0;
// The current context of this thread: 1 + the device's ordinal, 0 for none. Each device's primary context is the
// address of its slot in ctx_tokens.
thread_local int current_ctx = 0;
int ctx_tokens[MAX_DEVICES];
Stream default_stream;
thread_local std::string last_launch_error;

constexpr size_t TOTAL_MEMORY = size_t(16) << 30;

Stream* stream_of(void* s) { return s ? static_cast<Stream*>(s) : &default_stream; }

double now_ms() {
    using namespace std::chrono;
    return duration<double, std::milli>(steady_clock::now().time_since_epoch()).count();
}

int alloc(uint64_t* out, size_t bytes) {
    const size_t size = ((bytes ? bytes : 1) + 255) / 256 * 256;
    // From the checker's arena (exact bounds, see check.cpp), or from the heap where no arena could be reserved.
    void* p = arena_reserved() ? device_alloc(bytes) : std::aligned_alloc(256, size);
    if (!p) return CUDA_ERROR_OUT_OF_MEMORY;
    std::memset(p, 0xff, size);
    allocations()[reinterpret_cast<uintptr_t>(p)] = size;
    used_now += size;
    if (used_now > used_high) used_high = used_now;
    *out = reinterpret_cast<uint64_t>(p);
    return CUDA_SUCCESS;
}

int release(uint64_t ptr) {
    auto& a = allocations();
    auto it = a.find(uintptr_t(ptr));
    if (it == a.end()) return ptr == 0 ? CUDA_SUCCESS : CUDA_ERROR_INVALID_VALUE;
    used_now -= it->second;
    a.erase(it);
    if (arena_reserved())
        device_free(reinterpret_cast<void*>(ptr));
    else
        std::free(reinterpret_cast<void*>(ptr));
    return CUDA_SUCCESS;
}

// A copy or fill whose device range is not inside one live allocation fails with the reason on stderr (on a GPU
// it would fault, or silently write over a neighbour).
bool bad_range(const char* op, uint64_t p, size_t n) {
    const std::string e = device_range_error(reinterpret_cast<const void*>(p), n);
    if (e.empty()) return false;
    std::fprintf(stderr, "cuemu: %s %s\n", op, e.c_str());
    return true;
}

// What ptxas says a kernel needs on one architecture (scripts/check-kernels writes the table).
struct Resources {
    std::string arch;
    int registers = 0, static_smem = 0, max_threads = 0;
};

// target/kernel-resources.tsv (next to this library's directory), or the file CUEMU_RESOURCES names; read once.
const std::multimap<std::string, Resources>& resource_table() {
    static std::multimap<std::string, Resources> table;
    static std::once_flag once;
    std::call_once(once, [] {
        std::string path;
        if (const char* e = std::getenv("CUEMU_RESOURCES")) {
            path = e;
        } else {
            Dl_info info;
            if (dladdr(reinterpret_cast<const void*>(&resource_table), &info) && info.dli_fname) {
                path = info.dli_fname;
                path = path.substr(0, path.rfind('/') + 1) + "../kernel-resources.tsv";
            }
        }
        std::ifstream f(path);
        std::string line;
        while (std::getline(f, line)) {
            if (line.empty() || line[0] == '#') continue;
            std::istringstream row(line);
            std::string name;
            Resources r;
            if (row >> name >> r.arch >> r.registers >> r.static_smem >> r.max_threads) table.emplace(name, r);
        }
        if (table.empty())
            std::fprintf(stderr,
                         "cuemu: no kernel resource table at %s (run scripts/check-kernels): launches are not checked against registers, shared "
                         "memory and __launch_bounds__\n",
                         path.c_str());
    });
    return table;
}

std::map<const void*, int>& max_dynamic_smem() {  // cuFuncSetAttribute(MAX_DYNAMIC_SHARED_SIZE_BYTES) per kernel
    static std::map<const void*, int> m;
    return m;
}

// Why a GPU of an architecture in the table would refuse this launch, or "". Limits: 65536 registers per block
// (allocated per warp in units of 256, i.e. per thread rounded up to a multiple of 8); shared memory 48 KiB per
// block unless the kernel opts in to more dynamic memory, at most 163 KiB (sm_80) or 227 KiB (sm_90) in all; no
// more threads than __launch_bounds__ allows.
std::string refused_launch(const Kernel* k, unsigned threads, unsigned smem) {
    int opt_in = -1;
    {
        std::lock_guard<std::recursive_mutex> g(lock());
        auto it = max_dynamic_smem().find(k);
        if (it != max_dynamic_smem().end()) opt_in = it->second;
    }
    auto range = resource_table().equal_range(k->name);
    for (auto it = range.first; it != range.second; ++it) {
        const Resources& r = it->second;
        const long regs = long((r.registers + 7) / 8 * 8) * 32 * long((threads + 31) / 32);
        const long max_total = r.arch == "sm_80" ? 166912 : 232448;
        std::ostringstream o;
        if (regs > 65536)
            o << threads << " threads of " << r.registers << " registers need " << regs << " registers, more than a block's 65536";
        else if (r.max_threads && int(threads) > r.max_threads)
            o << threads << " threads, more than its __launch_bounds__ of " << r.max_threads;
        else if (opt_in < 0 && long(smem) + r.static_smem > 49152)
            o << smem << " bytes of dynamic shared memory with " << r.static_smem
              << " static exceed 48 KiB without cuFuncSetAttribute(CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES)";
        else if (opt_in >= 0 && long(smem) > opt_in)
            o << smem << " bytes of dynamic shared memory, more than the " << opt_in << " the kernel opted in to";
        else if (long(smem) + r.static_smem > max_total)
            o << smem << " + " << r.static_smem << " bytes of shared memory, more than a block's " << max_total;
        if (!o.str().empty()) return k->name + " on " + r.arch + ": " + o.str();
    }
    return "";
}

}  // namespace

void operation_failed(const std::string& why) {
    if (last_launch_error.empty()) last_launch_error = why;
}

// Runs `op` now, or records it when the stream is capturing a graph.
int submit(void* stream, Call op) {
    Stream* s = stream_of(stream);
    if (s->capture) {
        s->capture->ops.push_back(std::move(op));
        return CUDA_SUCCESS;
    }
    op();
    if (!last_launch_error.empty()) {
        std::fprintf(stderr, "cuemu: %s\n", last_launch_error.c_str());
        last_launch_error.clear();
        return CUDA_ERROR_LAUNCH_FAILED;
    }
    return CUDA_SUCCESS;
}

int current_device() { return current_ctx ? current_ctx - 1 : 0; }

}  // namespace cuemu

using namespace cuemu;

#define LOCK std::lock_guard<std::recursive_mutex> guard(cuemu::lock())

extern "C" {

int cuInit(unsigned) { return CUDA_SUCCESS; }
int cuDriverGetVersion(int* v) {
    *v = 13000;
    return CUDA_SUCCESS;
}
int cuDeviceGetCount(int* n) {
    *n = device_count();
    return CUDA_SUCCESS;
}
int cuDeviceGet(int* dev, int ordinal) {
    if (ordinal < 0 || ordinal >= device_count()) return CUDA_ERROR_INVALID_DEVICE;
    *dev = ordinal;
    return CUDA_SUCCESS;
}
int cuDeviceGetName(char* name, int len, int) {
    std::snprintf(name, size_t(len), "%s", "cuemu (CUDA emulated on the CPU, not a GPU)");
    return CUDA_SUCCESS;
}
int cuDeviceTotalMem_v2(size_t* bytes, int) {
    *bytes = TOTAL_MEMORY;
    return CUDA_SUCCESS;
}
int cuDeviceGetAttribute(int* v, int attr, int) {
    switch (attr) {
        case 16: *v = 4; break;      // multiprocessors
        case 75: *v = 9; break;      // compute capability major
        case 76: *v = 0; break;      // minor
        case 115: *v = 1; break;     // memory pools supported
        case 1: *v = 1024; break;    // max threads per block
        case 8: *v = 49152; break;   // shared memory per block
        case 10: *v = 32; break;     // warp size
        case 97: *v = 232448; break; // shared memory per block (opt-in)
        default: *v = 0;
    }
    return CUDA_SUCCESS;
}
int cuDevicePrimaryCtxRetain(void** ctx, int dev) {
    if (dev < 0 || dev >= device_count()) return CUDA_ERROR_INVALID_DEVICE;
    *ctx = &ctx_tokens[dev];
    return CUDA_SUCCESS;
}
int cuDevicePrimaryCtxRelease_v2(int) { return CUDA_SUCCESS; }
int cuCtxGetCurrent(void** ctx) {
    *ctx = current_ctx ? &ctx_tokens[current_ctx - 1] : nullptr;
    return CUDA_SUCCESS;
}
int cuCtxSetCurrent(void* ctx) {
    if (!ctx) {
        current_ctx = 0;
        return CUDA_SUCCESS;
    }
    const int* t = static_cast<const int*>(ctx);
    if (t < ctx_tokens || t >= ctx_tokens + device_count()) return CUDA_ERROR_INVALID_VALUE;
    current_ctx = int(t - ctx_tokens) + 1;
    return CUDA_SUCCESS;
}
int cuCtxGetDevice(int* dev) {
    if (!current_ctx) return CUDA_ERROR_INVALID_VALUE;
    *dev = current_ctx - 1;
    return CUDA_SUCCESS;
}
int cuCtxSynchronize() { return CUDA_SUCCESS; }
int cuCtxGetLimit(size_t* v, int) {
    *v = 0;
    return CUDA_SUCCESS;
}
int cuCtxSetLimit(int, size_t) { return CUDA_SUCCESS; }

int cuGetErrorName(int e, const char** s) {
    *s = e == CUDA_SUCCESS ? "CUDA_SUCCESS" : e == CUDA_ERROR_LAUNCH_FAILED ? "CUDA_ERROR_LAUNCH_FAILED" : "CUDA_ERROR (cuemu)";
    return CUDA_SUCCESS;
}
int cuGetErrorString(int e, const char** s) {
    *s = e == CUDA_SUCCESS ? "no error" : e == CUDA_ERROR_LAUNCH_FAILED ? "cuemu: a kernel launch failed (see stderr)" : "cuemu: error";
    return CUDA_SUCCESS;
}

int cuStreamCreate(void** s, unsigned) {
    *s = new Stream();
    return CUDA_SUCCESS;
}
int cuStreamCreateWithPriority(void** s, unsigned, int) { return cuStreamCreate(s, 0); }
int cuStreamDestroy_v2(void* s) {
    if (s && s != &default_stream) delete static_cast<Stream*>(s);
    return CUDA_SUCCESS;
}
int cuStreamSynchronize(void*) { return CUDA_SUCCESS; }
int cuStreamWaitEvent(void*, void*, unsigned) { return CUDA_SUCCESS; }
int cuStreamQuery(void*) { return CUDA_SUCCESS; }
int cuStreamIsCapturing(void* s, int* status) {
    *status = stream_of(s)->capture ? 1 : 0;
    return CUDA_SUCCESS;
}
int cuStreamBeginCapture_v2(void* s, int) {
        Stream* st = stream_of(s);
    if (st->capture) return CUDA_ERROR_ILLEGAL_STATE;
    st->capture = new Graph();
    return CUDA_SUCCESS;
}
int cuStreamEndCapture(void* s, void** graph) {
        Stream* st = stream_of(s);
    if (!st->capture) return CUDA_ERROR_ILLEGAL_STATE;
    *graph = st->capture;
    st->capture = nullptr;
    return CUDA_SUCCESS;
}
int cuGraphInstantiateWithFlags(void** exec, void* graph, unsigned long long) {
    *exec = new Graph(*static_cast<Graph*>(graph));
    return CUDA_SUCCESS;
}
int cuGraphUpload(void*, void*) { return CUDA_SUCCESS; }
int cuGraphLaunch(void* exec, void* stream) {
        for (auto& op : static_cast<Graph*>(exec)->ops) {
        int r = submit(stream, op);
        if (r != CUDA_SUCCESS) return r;
    }
    return CUDA_SUCCESS;
}
int cuGraphDestroy(void* g) {
    delete static_cast<Graph*>(g);
    return CUDA_SUCCESS;
}
int cuGraphExecDestroy(void* g) {
    delete static_cast<Graph*>(g);
    return CUDA_SUCCESS;
}

int cuEventCreate(void** e, unsigned) {
    *e = new Event();
    return CUDA_SUCCESS;
}
int cuEventDestroy_v2(void* e) {
    delete static_cast<Event*>(e);
    return CUDA_SUCCESS;
}
int cuEventRecord(void* e, void* s) {
        Event* ev = static_cast<Event*>(e);
    return submit(s, [ev] { ev->t = now_ms(); });
}
int cuEventRecordWithFlags(void* e, void* s, unsigned) { return cuEventRecord(e, s); }
int cuEventSynchronize(void*) { return CUDA_SUCCESS; }
int cuEventQuery(void*) { return CUDA_SUCCESS; }
int cuEventElapsedTime(float* ms, void* a, void* b) {
    *ms = float(static_cast<Event*>(b)->t - static_cast<Event*>(a)->t);
    return CUDA_SUCCESS;
}
int cuEventElapsedTime_v2(float* ms, void* a, void* b) { return cuEventElapsedTime(ms, a, b); }

int cuMemAlloc_v2(uint64_t* p, size_t n) {
    LOCK;
    return alloc(p, n);
}
int cuMemAllocAsync(uint64_t* p, size_t n, void* s) {
    LOCK;
    if (stream_of(s)->capture) return CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED;
    return alloc(p, n);
}
int cuMemFree_v2(uint64_t p) {
    LOCK;
    return release(p);
}
int cuMemFreeAsync(uint64_t p, void* s) {
    LOCK;
    if (stream_of(s)->capture) return CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED;
    return release(p);
}
int cuMemGetInfo_v2(size_t* free_b, size_t* total) {
    LOCK;
    *total = TOTAL_MEMORY;
    *free_b = TOTAL_MEMORY > used_now ? TOTAL_MEMORY - used_now : 0;
    return CUDA_SUCCESS;
}
int cuMemcpyHtoDAsync_v2(uint64_t dst, const void* src, size_t n, void* s) {
    if (bad_range("a host-to-device copy into", dst, n)) return CUDA_ERROR_INVALID_VALUE;
        return submit(s, [=] { std::memcpy(reinterpret_cast<void*>(dst), src, n); });
}
int cuMemcpyHtoD_v2(uint64_t dst, const void* src, size_t n) { return cuMemcpyHtoDAsync_v2(dst, src, n, nullptr); }
int cuMemcpyDtoHAsync_v2(void* dst, uint64_t src, size_t n, void* s) {
    if (bad_range("a device-to-host copy from", src, n)) return CUDA_ERROR_INVALID_VALUE;
        return submit(s, [=] { std::memcpy(dst, reinterpret_cast<const void*>(src), n); });
}
int cuMemcpyDtoH_v2(void* dst, uint64_t src, size_t n) { return cuMemcpyDtoHAsync_v2(dst, src, n, nullptr); }
int cuMemcpyDtoDAsync_v2(uint64_t dst, uint64_t src, size_t n, void* s) {
    if (bad_range("a device-to-device copy from", src, n) || bad_range("a device-to-device copy into", dst, n)) return CUDA_ERROR_INVALID_VALUE;
        return submit(s, [=] { std::memmove(reinterpret_cast<void*>(dst), reinterpret_cast<const void*>(src), n); });
}
int cuMemcpyDtoD_v2(uint64_t dst, uint64_t src, size_t n) { return cuMemcpyDtoDAsync_v2(dst, src, n, nullptr); }
int cuMemsetD8Async(uint64_t dst, unsigned char v, size_t n, void* s) {
    if (bad_range("a memset of", dst, n)) return CUDA_ERROR_INVALID_VALUE;
        return submit(s, [=] { std::memset(reinterpret_cast<void*>(dst), v, n); });
}
int cuMemsetD8_v2(uint64_t dst, unsigned char v, size_t n) { return cuMemsetD8Async(dst, v, n, nullptr); }
int cuMemsetD32Async(uint64_t dst, unsigned v, size_t n, void* s) {
    if (bad_range("a memset of", dst, n * 4)) return CUDA_ERROR_INVALID_VALUE;
        return submit(s, [=] {
        unsigned* p = reinterpret_cast<unsigned*>(dst);
        for (size_t i = 0; i < n; i++) p[i] = v;
    });
}

int cuDeviceGetDefaultMemPool(void** pool, int) {
    static int token;
    *pool = &token;
    return CUDA_SUCCESS;
}
int cuDeviceGetMemPool(void** pool, int d) { return cuDeviceGetDefaultMemPool(pool, d); }
int cuMemPoolSetAttribute(void*, int attr, void* v) {
    LOCK;
    if (attr == 8) used_high = *static_cast<uint64_t*>(v) ? used_high : used_now;  // reset the high-water mark
    return CUDA_SUCCESS;
}
int cuMemPoolGetAttribute(void*, int attr, void* v) {
    LOCK;
    uint64_t r = 0;
    if (attr == 7) r = used_now;
    if (attr == 8) r = used_high;
    if (attr == 5) r = used_now;
    if (attr == 6) r = used_high;
    *static_cast<uint64_t*>(v) = r;
    return CUDA_SUCCESS;
}
int cuMemPoolTrimTo(void*, size_t) { return CUDA_SUCCESS; }

int cuModuleLoadData(void** m, const void* image) {
    if (!image || std::strncmp(static_cast<const char*>(image), "// cuemu", 8) != 0) return CUDA_ERROR_INVALID_IMAGE;
    *m = new Module();
    return CUDA_SUCCESS;
}
int cuModuleUnload(void* m) {
    delete static_cast<Module*>(m);
    return CUDA_SUCCESS;
}
int cuModuleGetFunction(void** f, void*, const char* name) {
    const Kernel* k = find_kernel(name);
    if (!k) return CUDA_ERROR_NOT_FOUND;
    *f = const_cast<Kernel*>(k);
    return CUDA_SUCCESS;
}
int cuFuncGetAttribute(int* v, int attr, void*) {
    *v = attr == 0 ? 1024 : 0;  // max threads per block; registers, shared and local sizes unknown here
    return CUDA_SUCCESS;
}
// Blocks of `threads` threads that fit on one SM at once, as the occupancy calculator counts them: registers
// (allocated per warp in units of 256 of an SM's 65536), shared memory (an SM's 228 KiB on sm_90, 164 KiB on
// sm_80, 1 KiB reserved per block), threads (2048 per SM) and 32 blocks. With the kernel's resources from
// target/kernel-resources.tsv (the tighter arch where both are listed); without them, threads and blocks only.
int cuOccupancyMaxActiveBlocksPerMultiprocessorWithFlags(int* n, void* f, int threads, size_t smem, unsigned) {
    if (threads <= 0 || threads > 1024) return CUDA_ERROR_INVALID_VALUE;
    const Kernel* k = static_cast<const Kernel*>(f);
    const int warps = (threads + 31) / 32;
    int best = std::min(32, 64 / warps);
    auto range = resource_table().equal_range(k->name);
    for (auto it = range.first; it != range.second; ++it) {
        const Resources& r = it->second;
        const int per_warp = (r.registers * 32 + 255) / 256 * 256;
        const int by_regs = per_warp > 0 ? 65536 / per_warp / warps : 32;
        const long per_sm = r.arch == "sm_80" ? 167936 : 233472;
        const long by_smem = per_sm / (long(smem) + r.static_smem + 1024);
        best = std::min<long>(best, std::min<long>(by_regs, by_smem));
    }
    *n = best;
    return CUDA_SUCCESS;
}
int cuOccupancyMaxActiveBlocksPerMultiprocessor(int* n, void* f, int threads, size_t smem) {
    return cuOccupancyMaxActiveBlocksPerMultiprocessorWithFlags(n, f, threads, smem, 0);
}
int cuFuncSetAttribute(void* f, int attr, int v) {
    if (attr == 8) {  // CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
        LOCK;
        max_dynamic_smem()[f] = v;
    }
    return CUDA_SUCCESS;
}
int cuFuncSetCacheConfig(void*, int) { return CUDA_SUCCESS; }

int cuLaunchKernel(void* f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz, unsigned smem, void* s, void** params,
                   void** extra) {
        if (extra) return CUDA_ERROR_NOT_SUPPORTED;
    const Kernel* k = static_cast<const Kernel*>(f);
    const std::string refused = refused_launch(k, bx * by * bz, smem);
    if (!refused.empty()) {
        std::fprintf(stderr, "cuemu: a GPU would refuse this launch: %s\n", refused.c_str());
        return CUDA_ERROR_INVALID_VALUE;
    }
    Call call = k->bind(params);
    const dim3 grid{gx, gy, gz}, block{bx, by, bz};
    return submit(s, [=] {  // k points into the registry, which lives as long as the library
        std::string e = run_grid(k->name, call, grid, block, smem);
        if (!e.empty()) last_launch_error = e;
    });
}
int cuLaunchHostFunc(void* s, void (*fn)(void*), void* data) {
        return submit(s, [=] { fn(data); });
}

int cuProfilerStart() { return CUDA_SUCCESS; }
int cuProfilerStop() { return CUDA_SUCCESS; }

}  // extern "C"
