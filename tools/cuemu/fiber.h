// cuemu's fibers and blocks, shared by the scheduler (runtime.cpp) and the checker (check.cpp). Internal to
// libcuemu_rt.so.
#pragma once
#include <cstdint>
#include <vector>

#include "include/cuda_fp16.h"

// The runtime's per-thread pointers use the initial-exec TLS model (a few words of the static TLS block), so each
// access is one instruction rather than a __tls_get_addr call: they are read at every barrier and every checked
// memory access.
#define CUEMU_TLS thread_local __attribute__((tls_model("initial-exec")))

namespace cuemu {

constexpr int WARP_SIZE = 32;

enum Wait { NONE = 0, BLOCK_BARRIER = 1, WARP_BARRIER = 2 };

struct Fiber {
    void* sp = nullptr;
    ThreadView view{};
    bool done = false;
    Wait wait = NONE;
};

struct Warp {
    int live = 0, count = 0;
    uint64_t gen = 0;  // warp barriers passed (__syncwarp, shuffles, mma.sync)
    uint32_t live_lanes = 0;   // lanes that exist and have not ended
    uint32_t members[2] = {};  // the lanes that took part in the barrier that ended a generation (by parity)
    uint64_t slots[2][WARP_SIZE] = {};
    uint32_t exchange[2][WARP_SIZE * 16] = {};
};

struct Block {
    std::vector<Fiber> fibers;
    std::vector<Warp> warps;
    int live = 0, count = 0;
    uint64_t gen = 0;     // __syncthreads passed
    uint64_t events = 0;  // arrivals, releases and ends: progress
    std::vector<unsigned char> smem;
};

// The block being run on this host thread and the fiber running now (null outside a launch).
extern CUEMU_TLS Block* blk;
extern CUEMU_TLS Fiber* fib;

}  // namespace cuemu
