// cuemu's driver internals shared with the fake cuBLASLt.
#pragma once
#include <mutex>
#include <string>

#include "runtime.h"

enum {
    CUDA_SUCCESS = 0,
    CUDA_ERROR_INVALID_VALUE = 1,
    CUDA_ERROR_OUT_OF_MEMORY = 2,
    CUDA_ERROR_INVALID_DEVICE = 101,
    CUDA_ERROR_INVALID_IMAGE = 200,
    CUDA_ERROR_ILLEGAL_STATE = 401,
    CUDA_ERROR_NOT_FOUND = 500,
    CUDA_ERROR_LAUNCH_FAILED = 719,
    CUDA_ERROR_NOT_SUPPORTED = 801,
    CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED = 900,
};

namespace cuemu {
// Devices cuemu can report: CUEMU_DEVICES of them (default 1). They share the host's memory; each has its own
// primary context, so code that keeps one context per device (cudarc, NCCL ranks) sees distinct devices.
constexpr int MAX_DEVICES = 16;
int device_count();
// The device of the calling thread's current context (0 without one).
int current_device();
// The lock of the memory bookkeeping (allocations, the pool statistics).
std::recursive_mutex& lock();
// Runs `op` on `stream` now, or records it while the stream captures a graph; a failed launch returns
// CUDA_ERROR_LAUNCH_FAILED after printing why.
int submit(void* stream, Call op);
// Fails the stream operation running now (submit then returns CUDA_ERROR_LAUNCH_FAILED after printing `why`).
void operation_failed(const std::string& why);
}  // namespace cuemu
