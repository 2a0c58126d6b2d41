// cuemu's fibers: every CUDA thread of a block is a fiber with its own stack, switched by a few instructions of
// assembly (x86-64 System V). A fiber runs until it reaches a barrier (__syncthreads, a warp shuffle or
// __syncwarp) or ends; the block's scheduler runs the fibers round robin until all have ended. A thread that has
// ended no longer counts at barriers (as on the hardware). If a whole round passes without any thread arriving at
// a barrier, leaving one or ending, the threads wait at barriers that can never complete: the launch fails with
// where each thread waits.
#include <cstdlib>
#include <map>
#include <mutex>
#include <sstream>
#include <vector>

#include "check.h"
#include "fiber.h"
#include "runtime.h"

extern "C" void cuemu_switch(void** save_sp, void* to_sp);
asm(R"(
.text
.globl cuemu_switch
.hidden cuemu_switch
.type cuemu_switch,@function
cuemu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
.size cuemu_switch, .-cuemu_switch
)");

namespace cuemu {

CUEMU_TLS ThreadView* cur = nullptr;

static const float* build_half_table() {
    static float t[65536];
    for (uint32_t i = 0; i < 65536; i++) {
        const uint16_t b = uint16_t(i);
        _Float16 f;
        std::memcpy(&f, &b, 2);
        t[i] = (float)f;
    }
    return t;
}
const float* const half_table = build_half_table();

CUEMU_TLS Block* blk = nullptr;
CUEMU_TLS Fiber* fib = nullptr;

namespace {

constexpr size_t STACK = 64 << 10;

CUEMU_TLS void* sched_sp = nullptr;
CUEMU_TLS const Call* body = nullptr;
CUEMU_TLS std::vector<unsigned char>* stacks = nullptr;

std::map<std::string, Kernel>& registry() {
    static std::map<std::string, Kernel> r;
    return r;
}

void to_scheduler() { cuemu_switch(&fib->sp, sched_sp); }

// Ends a warp barrier: remembers which lanes took part (the live ones: every one of them has arrived), for the
// checker's shuffle and mma.sync checks, and releases them.
void release_warp(Warp& w) {
    w.members[w.gen & 1] = w.live_lanes;
    w.count = 0;
    w.gen++;
}

[[noreturn]] void fiber_main() {
    (*body)();
    Block& b = *blk;
    Warp& w = b.warps[fib->view.warp];
    fib->done = true;
    b.live--;
    w.live--;
    w.live_lanes &= ~(1u << fib->view.lane);
    b.events++;
    if (b.count > 0 && b.count == b.live) {
        b.count = 0;
        b.gen++;
    }
    if (w.count > 0 && w.count == w.live) release_warp(w);
    to_scheduler();
    std::abort();  // an ended fiber is never resumed
}

// A fresh stack whose first switch "returns" into fiber_main with the ABI's alignment.
void* init_stack(unsigned char* base) {
    uintptr_t top = (reinterpret_cast<uintptr_t>(base) + STACK) & ~uintptr_t(15);
    uint64_t* sp = reinterpret_cast<uint64_t*>(top);
    *--sp = 0;                                            // fiber_main's (never used) return address
    *--sp = reinterpret_cast<uint64_t>(&fiber_main);      // popped by `ret`
    for (int i = 0; i < 6; i++) *--sp = 0;                // rbp rbx r12 r13 r14 r15
    *--sp = uint64_t(0x1F80) | (uint64_t(0x037F) << 32);  // mxcsr, x87 control word
    return sp;
}

}  // namespace

Registrar::Registrar(const char* name, const char* file, Binder bind) {
    static bool first = true;
    if (first) register_kernel_module(reinterpret_cast<const void*>(bind));  // the module holding the kernels
    first = false;
    registry()[name] = Kernel{name, file, bind};
}

const Kernel* find_kernel(const std::string& name) {
    auto it = registry().find(name);
    return it == registry().end() ? nullptr : &it->second;
}

// Arrives at a barrier of `live` threads (count and generation given) and waits until all have arrived.
static void barrier(int& count, int live, uint64_t& gen, Wait kind) {
    const uint64_t g = gen;
    blk->events++;
    if (++count == live) {
        count = 0;
        gen++;
        return;
    }
    fib->wait = kind;
    while (gen == g) to_scheduler();
    fib->wait = NONE;
}

void syncthreads() { barrier(blk->count, blk->live, blk->gen, BLOCK_BARRIER); }

void syncwarp() {
    Warp& w = blk->warps[cur->warp];
    const uint64_t g = w.gen;
    blk->events++;
    if (++w.count == w.live) {
        release_warp(w);
        return;
    }
    fib->wait = WARP_BARRIER;
    while (w.gen == g) to_scheduler();
    fib->wait = NONE;
}

int warp_parity() { return int(blk->warps[cur->warp].gen & 1); }

uint64_t* warp_slots() {
    Warp& w = blk->warps[cur->warp];
    return w.slots[w.gen & 1];
}

uint32_t* warp_exchange() {
    Warp& w = blk->warps[cur->warp];
    return w.exchange[w.gen & 1];
}

void* dyn_smem() { return blk->smem.data(); }

std::string run_grid(const std::string& name, const Call& call, dim3 grid, dim3 block, size_t smem) {
    const int n = int(block.x * block.y * block.z);
    if (n <= 0 || n > 1024 || grid.x == 0 || grid.y == 0 || grid.z == 0) {
        std::ostringstream m;
        m << name << ": invalid launch (grid " << grid.x << "x" << grid.y << "x" << grid.z << ", block " << block.x << "x" << block.y << "x"
          << block.z << ")";
        return m.str();
    }
    if (!stacks) stacks = new std::vector<unsigned char>();
    if (stacks->size() < size_t(n) * STACK) stacks->resize(size_t(n) * STACK);
    const int nwarps = (n + WARP_SIZE - 1) / WARP_SIZE;
    Block b;
    b.fibers.resize(n);
    b.warps.resize(nwarps);
    Block* saved_blk = blk;
    Fiber* saved_fib = fib;
    ThreadView* saved_cur = cur;
    const Call* saved_body = body;
    blk = &b;
    body = &call;
    check_launch_begin(name);
    std::string failure;
    for (unsigned bz = 0; bz < grid.z && failure.empty(); bz++)
        for (unsigned by = 0; by < grid.y && failure.empty(); by++)
            for (unsigned bx = 0; bx < grid.x && failure.empty(); bx++) {
                b.live = n;
                b.count = 0;
                b.events = 0;
                // Shared memory starts as garbage on the GPU: NaN-like bytes catch a read before a write.
                // (Past it, a guard the checker watches: reads and writes there are out of bounds.)
                b.smem.assign(smem + DYN_GUARD, 0xff);
                for (int w = 0; w < nwarps; w++) {
                    b.warps[w].live = std::min(WARP_SIZE, n - w * WARP_SIZE);
                    b.warps[w].live_lanes = b.warps[w].live == WARP_SIZE ? ~0u : (1u << b.warps[w].live) - 1;
                    b.warps[w].count = 0;
                }
                for (int t = 0; t < n; t++) {
                    Fiber& f = b.fibers[t];
                    f.done = false;
                    f.wait = NONE;
                    f.view.tid = uint3{unsigned(t) % block.x, (unsigned(t) / block.x) % block.y, unsigned(t) / (block.x * block.y)};
                    f.view.bid = uint3{bx, by, bz};
                    f.view.bdim = block;
                    f.view.gdim = grid;
                    f.view.lane = t % WARP_SIZE;
                    f.view.warp = t / WARP_SIZE;
                    f.sp = init_stack(stacks->data() + size_t(t) * STACK);
                }
                check_block_begin();
                while (b.live > 0) {
                    const uint64_t before = b.events;
                    for (auto& f : b.fibers) {
                        if (f.done) continue;
                        fib = &f;
                        cur = &f.view;
                        cuemu_switch(&sched_sp, f.sp);
                    }
                    if (b.live > 0 && b.events == before) {
                        std::ostringstream m;
                        m << name << ": deadlock in block (" << bx << "," << by << "," << bz << "): ";
                        int shown = 0;
                        for (int t = 0; t < n && shown < 8; t++) {
                            const Fiber& f = b.fibers[t];
                            if (f.done) continue;
                            m << "thread " << t << (f.wait == BLOCK_BARRIER ? " at __syncthreads; " : " at a warp barrier; ");
                            shown++;
                        }
                        m << b.live << " threads still running, " << (n - b.live) << " ended";
                        failure = m.str();
                        break;
                    }
                }
            }
    std::string violation = check_launch_end();
    if (failure.empty()) failure = violation;
    blk = saved_blk;
    fib = saved_fib;
    cur = saved_cur;
    body = saved_body;
    return failure;
}

}  // namespace cuemu
