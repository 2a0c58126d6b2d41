// cuemu's kernel registry and launcher, shared by the fake driver, cuBLASLt and NVRTC (one library, libcuemu.so).
#pragma once
#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

#include "include/cuda_fp16.h"

namespace cuemu {

// A launch's kernel with its arguments copied (as cuLaunchKernel reads them at launch, or at graph capture).
using Call = std::function<void()>;
using Binder = Call (*)(void** params);

struct Kernel {
    std::string name;
    std::string file;
    Binder bind;
};

struct Registrar {
    Registrar(const char* name, const char* file, Binder bind);
};

// The registered kernel called `name`, or null.
const Kernel* find_kernel(const std::string& name);

template <class... A, std::size_t... I>
Call bind_args(void (*f)(A...), void** p, std::index_sequence<I...>) {
    return [f, args = std::make_tuple(*static_cast<std::decay_t<A>*>(p[I])...)]() { std::apply(f, args); };
}
template <class... A>
Call bind_args(void (*f)(A...), void** p) {
    return bind_args(f, p, std::index_sequence_for<A...>{});
}

// Runs a grid on the calling host thread, block after block; every CUDA thread of a block is a fiber. Returns
// an empty string, or why the launch failed (a deadlock: threads waiting at different barriers).
std::string run_grid(const std::string& name, const Call& body, dim3 grid, dim3 block, size_t smem);

}  // namespace cuemu

#define CUEMU_KERNEL(k) \
    static cuemu::Registrar cuemu_reg_##k(#k, CUEMU_FILE, [](void** p) { return cuemu::bind_args(&k, p); });
