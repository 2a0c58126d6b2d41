// cuemu's checker (check.cpp): device memory with exact bounds, and the launch bookkeeping of the access checks
// that GCC's ThreadSanitizer instrumentation of the kernels calls. Internal to libcuemu.
#pragma once
#include <cstddef>
#include <string>

namespace cuemu {

// Device memory from cuemu's arena: page-aligned, followed by a red-zone page, freed pages never handed out
// again. Null when the arena is full (or could not be reserved: then `arena_reserved()` is false and the driver
// uses the heap, without bounds checks).
void* device_alloc(size_t bytes);
// Frees an allocation of device_alloc; returns its size, or -1 when `p` starts no live allocation.
long device_free(void* p);
// "" when [p, p + n) lies inside one live allocation of the arena (or outside the arena), else why not.
std::string device_range_error(const void* p, size_t n);
bool arena_reserved();

// The module whose TLS block holds the kernels' `__shared__` arrays (cuda_fp16.h makes them static thread_local):
// any module with a code address `anchor`. The registrar calls it for libcuemu.so; the self-test for itself.
void register_kernel_module(const void* anchor);

// Bytes past the end of every block's dynamic shared memory that the checker watches (runtime.cpp allocates them).
constexpr size_t DYN_GUARD = 4096;

// Around every launch and block (runtime.cpp). check_launch_end returns the first violation found, or "".
void check_launch_begin(const std::string& name);
void check_block_begin();
std::string check_launch_end();

}  // namespace cuemu
