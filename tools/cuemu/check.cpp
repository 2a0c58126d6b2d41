// cuemu's checker. The kernels are compiled with GCC's ThreadSanitizer instrumentation (build.sh:
// -fsanitize=thread, without its runtime): every load and store of kernel code calls one of the __tsan_* hooks
// below with the address and the size. The hooks check, while a fiber runs:
//  - device memory: the access lies inside one live allocation, by the requested size, not the rounded one.
//    Device memory comes from one reserved arena: each allocation starts on a fresh page and is followed by a
//    red-zone page, and a freed allocation's pages are never handed out again, so an overrun and a use after free
//    land on pages this file can name;
//  - shared memory (static `__shared__` arrays, which cuda_fp16.h makes thread_local, and the launch's dynamic
//    shared memory): two accesses by different threads of a block to the same bytes, at least one a write, with
//    no barrier between them that both passed (__syncthreads, or a warp barrier when both are in one warp:
//    __syncwarp, a shuffle, mma.sync). The fibers run one at a time, so such a race gives the answer of one
//    interleaving here and may give another on a GPU. A read of shared memory that no thread of the block has
//    written is an error too (garbage on a GPU; here an earlier block's values). Dynamic shared memory is also
//    checked for bounds;
//  - alignment: a load or store of device or shared memory not aligned to its size (a GPU faults);
//  - warps: a shuffle reading a lane that has exited (or does not exist), an mma.sync without all 32 lanes;
//  - device memory written by kernels: two blocks of one launch touching the same bytes, at least one writing
//    (atomics aside). Blocks run one after another here, in any order and at once on a GPU. Only pages a kernel
//    has written are tracked (weights, uploaded once, are not), from the first launch that writes them.
// The first violation of a launch fails it, naming the kernel, block, threads, variable and code address;
// `CUEMU_CHECK=0` turns the checks off (the arena stays).
#include <cxxabi.h>
#include <dlfcn.h>
#include <elf.h>
#include <link.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <mutex>
#include <set>
#include <sstream>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "check.h"
#include "fiber.h"

extern "C" void* __tls_get_addr(void*);

namespace cuemu {
namespace {

constexpr size_t PAGE = 4096;
constexpr uint32_t MAX_RECORDS = 1u << 24;

struct Record {
    uintptr_t start;
    size_t size;  // as requested
    size_t span;  // pages, red zone included
    bool live;
};

// The arena, reserved once when the library loads (never unmapped).
// What the checker remembers of two bytes of device memory in the last launch that touched them: which block
// wrote them and which read them (block numbers + 1 modulo 65534; 0 none, MANY_BLOCKS more than one).
struct GlobalCell {
    uint32_t launch;
    uint16_t w, r;
};
constexpr uint16_t MANY_BLOCKS = 0xffff;
constexpr size_t CELLS_PER_PAGE = PAGE / 2;

struct Arena {
    uintptr_t base = 0;
    size_t size = 0;
    size_t bump = 0;
    uint32_t* owner = nullptr;  // per page: the record it belongs to (0: never allocated)
    std::atomic<GlobalCell*>* cells = nullptr;  // per page: its cells, from the first kernel write to it
    Record* records = nullptr;  // records[0] unused
    uint32_t count = 1;
    bool enabled = true;
    std::mutex m;

    Arena() {
        const char* e = std::getenv("CUEMU_CHECK");
        enabled = !(e && std::strcmp(e, "0") == 0);
        const int flags = MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE;
        for (size_t want = size_t(1) << 40; want >= (size_t(16) << 30); want /= 2) {
            void* a = mmap(nullptr, want, PROT_READ | PROT_WRITE, flags, -1, 0);
            if (a == MAP_FAILED) continue;
            void* o = mmap(nullptr, want / PAGE * sizeof(uint32_t), PROT_READ | PROT_WRITE, flags, -1, 0);
            void* r = mmap(nullptr, size_t(MAX_RECORDS) * sizeof(Record), PROT_READ | PROT_WRITE, flags, -1, 0);
            void* c = mmap(nullptr, want / PAGE * sizeof(void*), PROT_READ | PROT_WRITE, flags, -1, 0);
            if (o == MAP_FAILED || r == MAP_FAILED || c == MAP_FAILED) {
                munmap(a, want);
                if (o != MAP_FAILED) munmap(o, want / PAGE * sizeof(uint32_t));
                if (r != MAP_FAILED) munmap(r, size_t(MAX_RECORDS) * sizeof(Record));
                if (c != MAP_FAILED) munmap(c, want / PAGE * sizeof(void*));
                continue;
            }
            cells = static_cast<std::atomic<GlobalCell*>*>(c);
            base = reinterpret_cast<uintptr_t>(a);
            size = want;
            bump = PAGE;  // a first page no allocation owns: a read before the first allocation is caught
            owner = static_cast<uint32_t*>(o);
            records = static_cast<Record*>(r);
            return;
        }
        std::fprintf(stderr, "cuemu: could not reserve a device-memory arena (mmap with MAP_NORESERVE failed): device memory comes from the heap, without bounds checks\n");
    }
};
Arena arena;

// The modules holding kernels' static shared arrays (their TLS blocks), found once.
struct Module {
    size_t modid;
    size_t tls_size;
    std::string path;
    size_t tls_align;
};
std::mutex modules_m;
std::vector<Module> modules;
std::atomic<size_t> modules_count{0};

// What the checker remembers of the last write and the last reads of two bytes of shared memory.
enum : uint8_t { MULTI = 1, MULTI_WARP = 2 };
struct Access {
    uint32_t block;  // the host thread's block serial (0: never)
    uint32_t B;      // __syncthreads passed by the block
    uint32_t W;      // warp barriers passed by the thread's warp
    uint16_t tid;
    uint8_t warp;
    uint8_t flags;  // reads: MULTI (another thread read too), MULTI_WARP (readers in more than one warp)
};
struct Cell {
    Access w, r;
};

struct Region {
    uintptr_t lo = 0;
    size_t size = 0;
    std::vector<Cell> shadow;
    size_t module = 0;  // index into `modules` (static regions)
};

// Per host thread: the static shared regions, the dynamic one, the block serial and the launch's first failure.
struct ThreadState {
    std::vector<Region> statics;
    Region dyn;
    uint32_t serial = 0;
    uint32_t launch = 0;  // global launch number
    uint16_t block = 0;   // the block's number + 1, modulo 65534
    const std::string* name = nullptr;
    std::string failure;
    uint64_t violations = 0;
    uint64_t device = 0, shared = 0, blocks = 0;  // accesses and blocks checked in this launch
    // Release and acquire between blocks (__threadfence, then an atomic): per address of this launch's atomics,
    // the blocks that had fenced before theirs; the blocks whose writes the running block has acquired (an atomic
    // of its own on an address they released at); whether the running block has fenced.
    std::unordered_map<uintptr_t, std::vector<uint16_t>> released;
    std::unordered_set<uint16_t> acquired;
    bool fenced = false;
};

// Totals over the process, printed at exit when CUEMU_CHECK_STATS is set. The names of the kernels launched
// are appended, one per line, to the file CUEMU_LAUNCHED names (scripts/emu-check: kernels no test launched).
struct Totals {
    std::atomic<uint64_t> launches{0}, blocks{0}, device{0}, shared{0}, pages{0}, failed{0};
    std::mutex names_m;
    std::set<std::string> names;
    ~Totals() {
        if (const char* f = std::getenv("CUEMU_LAUNCHED")) {
            std::string all;
            for (const std::string& n : names) all += n + "\n";
            const int fd = open(f, O_WRONLY | O_APPEND | O_CREAT, 0644);
            if (fd >= 0) {
                if (write(fd, all.data(), all.size()) != ssize_t(all.size())) std::fprintf(stderr, "cuemu: could not append to %s\n", f);
                close(fd);
            }
        }
        if (!std::getenv("CUEMU_CHECK_STATS")) return;
        std::fprintf(stderr,
                     "cuemu checker: %llu launches, %llu blocks; %llu device-memory and %llu shared-memory accesses checked; %llu device pages "
                     "tracked for races between blocks; %llu launches failed a check\n",
                     (unsigned long long)launches, (unsigned long long)blocks, (unsigned long long)device, (unsigned long long)shared,
                     (unsigned long long)pages, (unsigned long long)failed);
    }
};
Totals totals;
CUEMU_TLS ThreadState* ts = nullptr;

ThreadState& state() {
    if (!ts) ts = new ThreadState();
    return *ts;
}

// The demangled name of the TLS symbol (a kernel's static shared array) at `offset` of a module's TLS block.
std::string shared_name(const Module& m, size_t offset) {
    std::ifstream f(m.path, std::ios::binary);
    std::vector<char> bytes((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
    if (bytes.size() < sizeof(Elf64_Ehdr)) return "";
    const auto* eh = reinterpret_cast<const Elf64_Ehdr*>(bytes.data());
    if (eh->e_shoff + size_t(eh->e_shnum) * sizeof(Elf64_Shdr) > bytes.size()) return "";
    const auto* sh = reinterpret_cast<const Elf64_Shdr*>(bytes.data() + eh->e_shoff);
    for (int i = 0; i < eh->e_shnum; i++) {
        if (sh[i].sh_type != SHT_SYMTAB || sh[i].sh_link >= eh->e_shnum) continue;
        const Elf64_Shdr& strs = sh[sh[i].sh_link];
        if (sh[i].sh_offset + sh[i].sh_size > bytes.size() || strs.sh_offset + strs.sh_size > bytes.size()) return "";
        const auto* syms = reinterpret_cast<const Elf64_Sym*>(bytes.data() + sh[i].sh_offset);
        for (size_t j = 0; j < sh[i].sh_size / sizeof(Elf64_Sym); j++) {
            const Elf64_Sym& s = syms[j];
            // A TLS symbol's value is its offset in the module's TLS block.
            if (ELF64_ST_TYPE(s.st_info) != STT_TLS || offset < s.st_value || offset >= s.st_value + std::max<size_t>(s.st_size, 1)) continue;
            if (s.st_name >= strs.sh_size) return "";
            const char* raw = bytes.data() + strs.sh_offset + s.st_name;
            int st = 0;
            char* d = abi::__cxa_demangle(raw, nullptr, nullptr, &st);
            std::ostringstream o;
            o << "`" << (d ? d : raw) << "` (byte " << (offset - s.st_value) << " of " << s.st_size << ")";
            std::free(d);
            return o.str();
        }
    }
    return "";
}

std::string code_at(const void* ret) {
    Dl_info info;
    std::ostringstream o;
    if (ret && dladdr(ret, &info) && info.dli_fname) {
        const uintptr_t off = reinterpret_cast<uintptr_t>(ret) - reinterpret_cast<uintptr_t>(info.dli_fbase);
        if (info.dli_sname) o << "code in " << info.dli_sname << " ";
        o << "(source line: addr2line -f -i -C -e " << info.dli_fname << " 0x" << std::hex << off << ")";
    }
    return o.str();
}

std::string where() {
    std::ostringstream o;
    const ThreadView& v = *cur;
    o << "block (" << v.bid.x << "," << v.bid.y << "," << v.bid.z << "), thread (" << v.tid.x << "," << v.tid.y << "," << v.tid.z << ")";
    return o.str();
}

// Counts a violation; true for the launch's first, the only one described (describing reads files).
bool first_violation() { return state().violations++ == 0; }

void fail(const std::string& what, const void* ret) {
    ThreadState& s = state();
    s.failure = (s.name ? *s.name : std::string("kernel")) + ": " + what + "; " + code_at(ret);
}

std::string describe_device(uintptr_t a, size_t n) {
    if (!arena.size || a - arena.base >= arena.size) {
        std::ostringstream o;
        o << n << " bytes at 0x" << std::hex << a << ", which is not device memory";
        return o.str();
    }
    const uint32_t id = arena.owner[(a - arena.base) / PAGE];
    std::ostringstream o;
    if (id == 0) {
        o << n << " bytes at 0x" << std::hex << a << ", where no device allocation ever was";
        return o.str();
    }
    const Record& r = arena.records[id];
    const long long at = (long long)(a - r.start);
    o << n << " bytes at byte " << at << " of " << (r.live ? "a " : "a freed ") << r.size << "-byte device allocation";
    if (r.live && a + n > r.start + r.size) {
        o << " (" << (a + n - r.start - r.size) << " bytes past its end";
        if ((a - r.start) / PAGE + 1 == r.span / PAGE) o << ", or before the start of the allocation that follows";
        o << ")";
    }
    return o.str();
}

inline bool inside(uintptr_t a, size_t n) {
    const uint32_t id = arena.owner[(a - arena.base) / PAGE];
    const Record& r = arena.records[id];
    return id != 0 && r.live && a >= r.start && a + n <= r.start + r.size;
}

inline bool ordered(const Access& a, uint32_t B, uint32_t W, uint8_t warp) {
    if (a.B != B) return true;  // a __syncthreads between them
    if (a.flags & MULTI_WARP) return false;
    return a.warp == warp && a.W != W;  // a warp barrier between them, both in one warp
}

// "dynamic shared memory at byte N" or "static shared memory `name` (byte N of M)".
std::string describe_shared(const Region& r, uintptr_t a) {
    std::ostringstream o;
    if (&r == &state().dyn) {
        o << "dynamic shared memory at byte " << (a - r.lo);
    } else {
        std::string nm;
        {
            std::lock_guard<std::mutex> g(modules_m);
            nm = shared_name(modules[r.module], a - r.lo);
        }
        o << "static shared memory " << (nm.empty() ? "(unnamed)" : nm);
    }
    return o.str();
}

void unwritten(size_t n, const Region& r, uintptr_t a, const void* ret) {
    if (!first_violation()) return;
    std::ostringstream o;
    o << "read of unwritten shared memory in " << where() << ": it reads " << n << " bytes of " << describe_shared(r, a)
      << " that no thread of this block has written (shared memory starts as garbage on a GPU; here it may hold an earlier block's values)";
    fail(o.str(), ret);
}

void race(const char* verb, size_t n, const Region& r, uintptr_t a, const char* other, uint16_t tid, bool multi, const void* ret) {
    if (!first_violation()) return;
    std::ostringstream o;
    o << "shared-memory race in " << where() << ": it " << verb << " " << n << " bytes of " << describe_shared(r, a);
    o << ", which thread " << tid << (multi ? " (and others)" : "") << " " << other
      << " with no barrier both passed in between (__syncthreads; __syncwarp within a warp)";
    fail(o.str(), ret);
}

void shared_access(Region& r, uintptr_t a, size_t n, bool write, const void* ret) {
    ThreadState& s = state();
    s.shared++;
    const uint16_t tid = uint16_t(fib - blk->fibers.data());
    const uint8_t warp = uint8_t(cur->warp);
    const uint32_t B = uint32_t(blk->gen), W = uint32_t(blk->warps[warp].gen), S = s.serial;
    const size_t first = (a - r.lo) / 2, last = std::min((a + n - 1 - r.lo) / 2, r.shadow.size() - 1);
    for (size_t u = first; u <= last; u++) {
        Cell& c = r.shadow[u];
        if (c.w.block == S && c.w.tid != tid && !ordered(c.w, B, W, warp)) {
            race(write ? "writes" : "reads", n, r, a, "wrote", c.w.tid, false, ret);
            break;
        }
        if (write) {
            if (c.r.block == S && (c.r.tid != tid || (c.r.flags & MULTI)) && !ordered(c.r, B, W, warp)) {
                race("writes", n, r, a, "read", c.r.tid, c.r.tid == tid, ret);
                break;
            }
        } else if (c.w.block != S) {
            unwritten(n, r, a, ret);
            break;
        }
    }
    for (size_t u = first; u <= last; u++) {
        Cell& c = r.shadow[u];
        if (write) {
            c.w = Access{S, B, W, tid, warp, 0};
        } else if (c.r.block == S && c.r.B == B) {
            uint8_t f = c.r.flags;
            // Same warp, a warp barrier since the earlier reads: they are ordered before anything this warp does
            // from here on, so only this read counts.
            if (!(f & MULTI_WARP) && c.r.warp == warp && c.r.W != W) f = 0;
            if (c.r.tid != tid) f |= MULTI;
            if (c.r.warp != warp) f |= MULTI_WARP;
            c.r = Access{S, B, W, tid, warp, f};
        } else {
            c.r = Access{S, B, W, tid, warp, 0};
        }
    }
}

std::atomic<uint32_t> launches{0};

void cross_block(const char* verb, uintptr_t a, size_t n, uint16_t other, const char* what, const void* ret) {
    if (!first_violation()) return;
    std::ostringstream o;
    o << "race between blocks in " << where() << ": it " << verb << " " << describe_device(a, n) << ", which "
      << (other == MANY_BLOCKS ? std::string("other blocks") : "block number " + std::to_string(other - 1) + " (modulo 65534)") << " of this launch " << what
      << " (blocks run in any order and at once on a GPU; atomics aside, a launch's blocks must not share bytes that one of them writes)";
    fail(o.str(), ret);
}

// Whether the running block has acquired what block `b` (MANY_BLOCKS: several blocks; then every block that ran
// before it in this launch) did before its release.
bool acquired(const ThreadState& s, uint16_t b) {
    if (s.acquired.empty()) return false;
    return b == MANY_BLOCKS ? s.acquired.size() + 1 >= s.blocks : s.acquired.count(b) > 0;
}

void global_access(uintptr_t a, size_t n, bool write, const void* ret) {
    ThreadState& s = state();
    s.device++;
    const size_t first = (a - arena.base) / 2, last = (a + n - 1 - arena.base) / 2;
    for (size_t u = first; u <= last; u++) {
        std::atomic<GlobalCell*>& slot = arena.cells[u / CELLS_PER_PAGE];
        GlobalCell* page = slot.load(std::memory_order_acquire);
        if (!page) {
            if (!write) continue;  // never written by a kernel: not tracked
            GlobalCell* fresh = static_cast<GlobalCell*>(std::calloc(CELLS_PER_PAGE, sizeof(GlobalCell)));
            if (!fresh) return;
            if (!slot.compare_exchange_strong(page, fresh))
                std::free(fresh);
            else
                totals.pages++;
            page = slot.load(std::memory_order_acquire);
        }
        GlobalCell& c = page[u % CELLS_PER_PAGE];
        if (c.launch != s.launch) c = GlobalCell{s.launch, 0, 0};
        if (c.w && c.w != s.block && !acquired(s, c.w)) return cross_block(write ? "writes" : "reads", a, n, c.w, "wrote", ret);
        if (write) {
            if (c.r && c.r != s.block && !acquired(s, c.r)) return cross_block("writes", a, n, c.r, "read", ret);
            c.w = s.block;
        } else {
            c.r = (c.r == 0 || c.r == s.block) ? s.block : MANY_BLOCKS;
        }
    }
}

// A GPU faults on a load or store that is not aligned to its size ("misaligned address").
void misaligned(uintptr_t a, size_t n, const char* kind, const char* space, const void* ret) {
    if (!first_violation()) return;
    std::ostringstream o;
    o << "misaligned " << n << "-byte " << kind << " of " << space << " in " << where() << ": address 0x" << std::hex << a
      << " is not a multiple of " << std::dec << n << " (a GPU faults)";
    fail(o.str(), ret);
}

// `aligned`: the instrumentation's plain hooks (an access of a naturally aligned type); its "unaligned" hooks come
// from code the compiler knows may be unaligned on the host (merged or vectorized accesses) and are not checked.
inline void check(const void* p, size_t n, bool write, const void* ret, bool aligned = false) {
    if (!fib || !arena.enabled) return;
    const uintptr_t a = reinterpret_cast<uintptr_t>(p);
    if (a - arena.base < arena.size) {
        if (!inside(a, n)) {
            if (first_violation()) fail(std::string(write ? "out-of-bounds write in " : "out-of-bounds read in ") + where() + ": " + describe_device(a, n), ret);
            return;
        }
        if (aligned && (a & (n - 1))) return misaligned(a, n, write ? "write" : "read", "device memory", ret);
        return global_access(a, n, write, ret);
    }
    ThreadState& s = state();
    for (Region& r : s.statics)
        if (a - r.lo < r.size) {
            if (aligned && (a & (n - 1))) return misaligned(a, n, write ? "write" : "read", "shared memory", ret);
            return shared_access(r, a, n, write, ret);
        }
    Region& d = s.dyn;
    if (a - d.lo < d.size) {
        if (aligned && (a & (n - 1))) return misaligned(a, n, write ? "write" : "read", "dynamic shared memory", ret);
        return shared_access(d, a, n, write, ret);
    }
    if (a - d.lo < d.size + DYN_GUARD && d.lo && first_violation()) {
        std::ostringstream o;
        o << "out-of-bounds " << (write ? "write" : "read") << " of dynamic shared memory in " << where() << ": " << n << " bytes at byte " << (a - d.lo)
          << " of the launch's " << d.size << " bytes";
        fail(o.str(), ret);
    }
}

}  // namespace

bool arena_reserved() { return arena.size != 0; }

// The lanes of `mask` that the running thread's warp lacks: exited, or no such thread (a block size not a multiple
// of 32).
static std::string gone_lanes(uint32_t mask) {
    const int base = cur->warp * WARP_SIZE, n = int(blk->fibers.size());
    std::string gone;
    for (int l = 0; l < WARP_SIZE; l++) {
        if (!(mask >> l & 1)) continue;
        gone += (gone.empty() ? "" : ", ") + std::to_string(l) + (base + l >= n ? " (no such thread)" : " (exited)");
    }
    return gone;
}

__attribute__((noinline)) void note_shuffle(int src, int parity) {
    if (!arena.enabled || (blk->warps[cur->warp].members[parity] >> src & 1)) return;
    if (!first_violation()) return;
    fail("shuffle from a missing lane in " + where() + ": it reads lane " + gone_lanes(1u << src) +
             " of its warp, which did not take part, so the value is undefined on a GPU",
         __builtin_return_address(0));
}

__attribute__((noinline)) void note_vector(const void* p, unsigned n) {
    if (!fib || !arena.enabled) return;
    const uintptr_t a = reinterpret_cast<uintptr_t>(p);
    if (!(a & (n - 1))) return;
    const char* space = nullptr;
    if (a - arena.base < arena.size) space = "device memory";
    for (const Region& r : state().statics)
        if (a - r.lo < r.size) space = "shared memory";
    if (a - state().dyn.lo < state().dyn.size) space = "dynamic shared memory";
    if (space) misaligned(a, n, "vector access", space, __builtin_return_address(0));
}

__attribute__((noinline)) void note_mma(int parity) {
    const uint32_t missing = ~blk->warps[cur->warp].members[parity];
    if (!arena.enabled || missing == 0 || !first_violation()) return;
    fail("mma.sync without the whole warp in " + where() + ": lanes " + gone_lanes(missing) + " do not take part (mma.sync needs all 32)", __builtin_return_address(0));
}

void note_fence() {
    if (fib) state().fenced = true;
}

void note_atomic(const void* p, size_t n, const void* ret) {
    if (!fib || !arena.enabled) return;
    const uintptr_t a = reinterpret_cast<uintptr_t>(p);
    {
        ThreadState& s = state();
        std::vector<uint16_t>& rel = s.released[a];
        s.acquired.insert(rel.begin(), rel.end());
        if (s.fenced && (rel.empty() || rel.back() != s.block)) rel.push_back(s.block);
    }
    if (a - arena.base < arena.size && !inside(a, n) && first_violation()) fail(std::string("out-of-bounds atomic in ") + where() + ": " + describe_device(a, n), ret);
}

void* device_alloc(size_t bytes) {
    if (!arena.size) return nullptr;
    std::lock_guard<std::mutex> g(arena.m);
    const size_t data = (std::max<size_t>(bytes, 1) + PAGE - 1) / PAGE * PAGE, span = data + PAGE;
    if (arena.bump + span > arena.size || arena.count >= MAX_RECORDS) return nullptr;
    const uintptr_t start = arena.base + arena.bump;
    arena.bump += span;
    const uint32_t id = arena.count++;
    arena.records[id] = Record{start, bytes, span, true};
    std::atomic_thread_fence(std::memory_order_release);
    for (size_t i = 0; i < span / PAGE; i++) arena.owner[(start - arena.base) / PAGE + i] = id;
    return reinterpret_cast<void*>(start);
}

long device_free(void* p) {
    const uintptr_t a = reinterpret_cast<uintptr_t>(p);
    if (!arena.size || a - arena.base >= arena.size) return -1;
    std::lock_guard<std::mutex> g(arena.m);
    const uint32_t id = arena.owner[(a - arena.base) / PAGE];
    Record& r = arena.records[id];
    if (id == 0 || !r.live || r.start != a) return -1;
    r.live = false;
    for (size_t i = 0; i < r.span / PAGE; i++) std::free(arena.cells[(a - arena.base) / PAGE + i].exchange(nullptr));
    madvise(p, r.span, MADV_DONTNEED);  // the memory goes back; the pages stay reserved and named
    return long(r.size);
}

std::string device_range_error(const void* p, size_t n) {
    const uintptr_t a = reinterpret_cast<uintptr_t>(p);
    if (!arena.size || !arena.enabled || n == 0) return "";
    if (a - arena.base < arena.size && inside(a, n)) return "";
    return describe_device(a, n);
}

void register_kernel_module(const void* anchor) {
    struct Find {
        uintptr_t anchor;
        Module found{0, 0, "", 0};
    } f{reinterpret_cast<uintptr_t>(anchor)};
    dl_iterate_phdr(
        [](dl_phdr_info* info, size_t, void* data) {
            Find& f = *static_cast<Find*>(data);
            bool mine = false;
            const ElfW(Phdr)* tls = nullptr;
            for (int i = 0; i < info->dlpi_phnum; i++) {
                const ElfW(Phdr)& ph = info->dlpi_phdr[i];
                if (ph.p_type == PT_LOAD && f.anchor >= info->dlpi_addr + ph.p_vaddr && f.anchor < info->dlpi_addr + ph.p_vaddr + ph.p_memsz) mine = true;
                if (ph.p_type == PT_TLS) tls = &ph;
            }
            if (!mine || !tls) return 0;
            std::string path = info->dlpi_name && info->dlpi_name[0] ? info->dlpi_name : "/proc/self/exe";
            f.found = Module{info->dlpi_tls_modid, tls->p_memsz, path, tls->p_align};
            return 1;
        },
        &f);
    if (!f.found.tls_size) return;
    std::lock_guard<std::mutex> g(modules_m);
    for (const Module& m : modules)
        if (m.modid == f.found.modid) return;
    modules.push_back(f.found);
    modules_count.store(modules.size());
}

void check_launch_begin(const std::string& name) {
    ThreadState& s = state();
    s.name = &name;
    s.launch = launches.fetch_add(1) + 1;
    s.released.clear();
    {
        std::lock_guard<std::mutex> g(totals.names_m);
        totals.names.insert(name);
    }
    if (s.launch == 0) s.launch = launches.fetch_add(1) + 1;  // 0 marks cells no launch touched
    s.failure.clear();
    s.violations = 0;
    if (s.statics.size() != modules_count.load()) {
        std::lock_guard<std::mutex> g(modules_m);
        s.statics.resize(modules.size());
        for (size_t i = 0; i < modules.size(); i++) {
            struct {
                unsigned long mod, off;
            } idx{modules[i].modid, 0};
            Region& r = s.statics[i];
            r.lo = reinterpret_cast<uintptr_t>(__tls_get_addr(&idx));  // allocates this thread's block if needed
            r.size = modules[i].tls_size;
            r.module = i;
            r.shadow.assign(r.size / 2 + 1, Cell{});
        }
    }
}

void check_block_begin() {
    ThreadState& s = state();
    s.blocks++;
    if (++s.serial == 0) {  // after 2^32 blocks on this thread: forget everything rather than confuse serials
        for (Region& r : s.statics) std::fill(r.shadow.begin(), r.shadow.end(), Cell{});
        std::fill(s.dyn.shadow.begin(), s.dyn.shadow.end(), Cell{});
        s.serial = 1;
    }
    const ThreadView& v = blk->fibers[0].view;
    const uint64_t linear = (uint64_t(v.bid.z) * v.gdim.y + v.bid.y) * v.gdim.x + v.bid.x;
    s.block = uint16_t(linear % 65534 + 1);
    s.acquired.clear();
    s.fenced = false;
    s.dyn.lo = reinterpret_cast<uintptr_t>(blk->smem.data());
    s.dyn.size = blk->smem.size() - DYN_GUARD;
    if (s.dyn.shadow.size() < s.dyn.size / 2 + 1) s.dyn.shadow.resize(s.dyn.size / 2 + 1);
}

std::string check_launch_end() {
    ThreadState& s = state();
    s.name = nullptr;
    s.dyn.lo = 0;
    s.dyn.size = 0;
    if (s.violations > 1) s.failure += " (and " + std::to_string(s.violations - 1) + " more violations in this launch)";
    totals.launches++;
    totals.blocks += s.blocks;
    totals.device += s.device;
    totals.shared += s.shared;
    totals.failed += s.violations ? 1 : 0;
    s.blocks = s.device = s.shared = 0;
    std::string f;
    f.swap(s.failure);
    return f;
}

}  // namespace cuemu

using cuemu::check;

// The instrumentation's entry points (GCC, -fsanitize=thread, --param=tsan-instrument-func-entry-exit=0).
extern "C" {
void __tsan_init() {}
void __tsan_func_entry(void*) {}
void __tsan_func_exit() {}
#define CUEMU_HOOKS(N)                                                                                                          \
    void __tsan_read##N(void* p) { check(p, N, false, __builtin_return_address(0), true); }                                    \
    void __tsan_write##N(void* p) { check(p, N, true, __builtin_return_address(0), true); }                                    \
    void __tsan_unaligned_read##N(void* p) { check(p, N, false, __builtin_return_address(0)); }                                \
    void __tsan_unaligned_write##N(void* p) { check(p, N, true, __builtin_return_address(0)); }                                \
    void __tsan_volatile_read##N(void* p) { check(p, N, false, __builtin_return_address(0)); }                                 \
    void __tsan_volatile_write##N(void* p) { check(p, N, true, __builtin_return_address(0)); }
CUEMU_HOOKS(1)
CUEMU_HOOKS(2)
CUEMU_HOOKS(4)
CUEMU_HOOKS(8)
CUEMU_HOOKS(16)
void __tsan_read_range(void* p, unsigned long n) {
    if (n) check(p, n, false, __builtin_return_address(0));
}
void __tsan_write_range(void* p, unsigned long n) {
    if (n) check(p, n, true, __builtin_return_address(0));
}
void __tsan_vptr_update(void**, void*) {}
void __tsan_vptr_read(void**) {}
}
