// An emulation of CUDA's execution model on the CPU, so that the kernels in csrc/cuda/ run, unchanged, where there
// is no GPU (CI, laptops) and can be tested and debugged there: the same idea as Triton's interpreter
// (TRITON_INTERPRET=1) and Numba's CUDA simulator, for CUDA C++.
//
// The kernel sources are compiled a second time, by the host compiler, with CNN_EXT_CUDA_EMULATION defined; this
// header then supplies what CUDA's compiler and runtime would:
//   * qualifiers: __global__, __device__ and __host__ vanish; __shared__ variables are thread_local statics, so the
//     CUDA threads of a block, which all run on one OS thread, share them, and blocks on other OS threads do not;
//   * the built-in variables threadIdx, blockIdx, blockDim, gridDim and warpSize;
//   * __syncthreads() (and its _count/_and/_or forms): every CUDA thread of a block is a fiber with its own stack,
//     and a barrier really waits: each thread runs until it reaches the barrier, and none passes it before all
//     have arrived. Between barriers the threads run one after another, in an order the tests choose (forward,
//     reverse or seeded random), so a missing barrier shows up as a wrong result in one order or another;
//   * warp operations with their documented semantics: __syncwarp, __shfl_sync and its up/down/xor forms,
//     __ballot_sync, __any_sync, __all_sync. A lane waits until every lane its mask names has arrived;
//   * integer intrinsics (__umulhi, __popc, ...), fences and atomics.
// Misuse that is undefined behaviour on a GPU is reported as an error naming the block and thread: a barrier that
// some threads of the block never reach, a warp operation whose mask omits the caller or names lanes that never
// arrive or that disagree on the operation.
//
// What it cannot show: timing, the memory model between blocks (blocks run in any order, on several OS threads,
// and see each other's writes at once), real warp scheduling (lanes never run in lockstep here), resource limits
// (registers, shared-memory capacity) and the arithmetic of the GPU's instructions (no fused multiply-add
// contraction unless the host compiler chooses it; half-precision conversions are c10's).
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __launch_bounds__(...)
#define __shared__ static thread_local

struct uint3 {
  unsigned int x, y, z;
};

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
};

// The built-in variables of the running CUDA thread, set by the emulator whenever it switches to that thread.
extern thread_local uint3 threadIdx;
extern thread_local uint3 blockIdx;
extern thread_local dim3 blockDim;
extern thread_local dim3 gridDim;
constexpr int warpSize = 32;

namespace cnn_ext::emu {

enum class WarpOp : int { kSync, kShfl, kShflUp, kShflDown, kShflXor, kBallot, kAny, kAll };
enum class BarrierOp : int { kSync, kCount, kAnd, kOr };

// The barrier: returns the number of threads of the block whose predicate was non-zero.
int block_barrier(BarrierOp op, int predicate);
// A warp collective: every lane in `mask` contributes `value` (and `arg`: a lane, delta or lane mask); each gets
// its result once all have arrived.
uint64_t warp_collective(WarpOp op, unsigned mask, uint64_t value, int arg, int width);

// Runs thread_body(context) as every CUDA thread of every block of the grid; throws c10::Error on misuse.
void run_grid(const char* kernel, dim3 grid, dim3 block, const char* file, int line, void (*thread_body)(void*),
              void* context);

// The name of a kernel with its template arguments, as the compiler spells it, without this project's namespaces
// (for the launch record and error messages).
std::string tidy_kernel_name(const char* pretty_function);

template <auto kernel>
const char* kernel_name() {
  static const std::string name = tidy_kernel_name(__PRETTY_FUNCTION__);
  return name.c_str();
}

// The emulated device: its multiprocessor count feeds the launch configuration, as the real one does on a GPU.
int multiprocessor_count();
// Whether the kernels must use 64-bit indices even where 32 bits suffice (to test those paths on small shapes).
bool force_int64_indices();

template <typename T>
uint64_t to_bits(T value) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= sizeof(uint64_t), "warp operations move <= 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  return bits;
}

template <typename T>
T from_bits(uint64_t bits) {
  T value;
  std::memcpy(&value, &bits, sizeof(T));
  return value;
}

// A launch: kernel(args...) on every thread of grid×block. Each CUDA thread gets its own copy of the parameters,
// converted to the kernel's parameter types, as a real launch passes them by value.
template <typename... Params, typename... Args>
void launch_kernel(void (*kernel)(Params...), const char* name, dim3 grid, dim3 block, const char* file, int line,
                   Args&&... args) {
  using Values = std::tuple<std::decay_t<Params>...>;
  struct Launch {
    void (*kernel)(Params...);
    Values values;
  } launch{kernel, Values(std::forward<Args>(args)...)};
  run_grid(name, grid, block, file, line,
           [](void* context) {
             auto* l = static_cast<Launch*>(context);
             Values copy = l->values;
             std::apply(l->kernel, std::move(copy));
           },
           &launch);
}

}  // namespace cnn_ext::emu

// ---------------------------------------------------------------------------------------------------------------
// Synchronisation and warp intrinsics.
// ---------------------------------------------------------------------------------------------------------------

inline void __syncthreads() { cnn_ext::emu::block_barrier(cnn_ext::emu::BarrierOp::kSync, 0); }
inline int __syncthreads_count(int predicate) {
  return cnn_ext::emu::block_barrier(cnn_ext::emu::BarrierOp::kCount, predicate);
}
inline int __syncthreads_and(int predicate) {
  return cnn_ext::emu::block_barrier(cnn_ext::emu::BarrierOp::kAnd, predicate);
}
inline int __syncthreads_or(int predicate) {
  return cnn_ext::emu::block_barrier(cnn_ext::emu::BarrierOp::kOr, predicate);
}

inline void __syncwarp(unsigned mask = 0xffffffffu) {
  cnn_ext::emu::warp_collective(cnn_ext::emu::WarpOp::kSync, mask, 0, 0, warpSize);
}

template <typename T>
T __shfl_sync(unsigned mask, T var, int src_lane, int width = warpSize) {
  using namespace cnn_ext::emu;
  return from_bits<T>(warp_collective(WarpOp::kShfl, mask, to_bits(var), src_lane, width));
}
template <typename T>
T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = warpSize) {
  using namespace cnn_ext::emu;
  return from_bits<T>(warp_collective(WarpOp::kShflUp, mask, to_bits(var), static_cast<int>(delta), width));
}
template <typename T>
T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = warpSize) {
  using namespace cnn_ext::emu;
  return from_bits<T>(warp_collective(WarpOp::kShflDown, mask, to_bits(var), static_cast<int>(delta), width));
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = warpSize) {
  using namespace cnn_ext::emu;
  return from_bits<T>(warp_collective(WarpOp::kShflXor, mask, to_bits(var), lane_mask, width));
}
inline unsigned __ballot_sync(unsigned mask, int predicate) {
  using namespace cnn_ext::emu;
  return static_cast<unsigned>(warp_collective(WarpOp::kBallot, mask, predicate != 0, 0, warpSize));
}
inline int __any_sync(unsigned mask, int predicate) {
  using namespace cnn_ext::emu;
  return static_cast<int>(warp_collective(WarpOp::kAny, mask, predicate != 0, 0, warpSize));
}
inline int __all_sync(unsigned mask, int predicate) {
  using namespace cnn_ext::emu;
  return static_cast<int>(warp_collective(WarpOp::kAll, mask, predicate != 0, 0, warpSize));
}

// ---------------------------------------------------------------------------------------------------------------
// Integer intrinsics, fences and atomics. Blocks may run concurrently on several OS threads, so atomics are real
// host atomics.
// ---------------------------------------------------------------------------------------------------------------

inline unsigned int __umulhi(unsigned int a, unsigned int b) {
  return static_cast<unsigned int>((static_cast<uint64_t>(a) * b) >> 32);
}
inline int __mulhi(int a, int b) { return static_cast<int>((static_cast<int64_t>(a) * b) >> 32); }
inline unsigned long long __umul64hi(unsigned long long a, unsigned long long b) {
  return static_cast<unsigned long long>((static_cast<unsigned __int128>(a) * b) >> 64);
}
inline int __popc(unsigned int x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
inline int __ffs(int x) { return __builtin_ffs(x); }

inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_block() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

template <typename T>
T atomicAdd(T* address, T value) {
  if constexpr (std::is_integral_v<T>) {
    return __atomic_fetch_add(address, value, __ATOMIC_RELAXED);
  } else {
    T old, desired;
    __atomic_load(address, &old, __ATOMIC_RELAXED);
    do {
      desired = old + value;
    } while (!__atomic_compare_exchange(address, &old, &desired, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED));
    return old;
  }
}
template <typename T>
T atomicMin(T* address, T value) {
  T old = __atomic_load_n(address, __ATOMIC_RELAXED);
  while (value < old && !__atomic_compare_exchange_n(address, &old, value, false, __ATOMIC_RELAXED,
                                                     __ATOMIC_RELAXED)) {
  }
  return old;
}
template <typename T>
T atomicMax(T* address, T value) {
  T old = __atomic_load_n(address, __ATOMIC_RELAXED);
  while (old < value && !__atomic_compare_exchange_n(address, &old, value, false, __ATOMIC_RELAXED,
                                                     __ATOMIC_RELAXED)) {
  }
  return old;
}
template <typename T>
T atomicExch(T* address, T value) {
  return __atomic_exchange_n(address, value, __ATOMIC_RELAXED);
}
template <typename T>
T atomicCAS(T* address, T compare, T value) {
  __atomic_compare_exchange_n(address, &compare, value, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED);
  return compare;
}
