// Small kernels that test the emulator itself (tests/test_emulator.py), as operators in the namespace
// cnn_ext_emulator_test: shared memory and barriers, the documented semantics of warp operations, and the misuse
// the emulator must report instead of computing garbage.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <string>

#include "../cuda/runtime.cuh"

namespace cnn_ext::emu {
namespace {

using gpu::launch;

constexpr int kBlock = 256;

// Each block reverses its kBlock elements through shared memory: every thread reads what another one wrote, so
// the barrier between the writes and the reads is essential.
__global__ void block_reverse_kernel(const float* in, float* out) {
  __shared__ float buffer[kBlock];
  const unsigned base = blockIdx.x * kBlock;
  buffer[threadIdx.x] = in[base + threadIdx.x];
  __syncthreads();
  out[base + threadIdx.x] = buffer[kBlock - 1 - threadIdx.x];
}

at::Tensor block_reverse(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 1 && x.numel() % kBlock == 0 && x.scalar_type() == at::kFloat && x.is_contiguous());
  at::Tensor out = at::empty_like(x);
  launch<block_reverse_kernel>({static_cast<unsigned>(x.numel() / kBlock), kBlock}, x.const_data_ptr<float>(),
         out.mutable_data_ptr<float>());
  return out;
}

// The classic tiled transpose through a 16×17 shared tile; with `wrong_index` it reads tile[y][x] where it must read
// tile[x][y] (each tile comes out untransposed).
constexpr int kTile = 16;

__global__ void tiled_transpose_kernel(const float* in, float* out, int rows, int cols, bool wrong_index) {
  __shared__ float tile[kTile][kTile + 1];
  int col = blockIdx.x * kTile + threadIdx.x, row = blockIdx.y * kTile + threadIdx.y;
  if (row < rows && col < cols) tile[threadIdx.y][threadIdx.x] = in[row * cols + col];
  __syncthreads();
  col = blockIdx.y * kTile + threadIdx.x, row = blockIdx.x * kTile + threadIdx.y;
  if (row < cols && col < rows) {
    out[row * rows + col] = wrong_index ? tile[threadIdx.y][threadIdx.x] : tile[threadIdx.x][threadIdx.y];
  }
}

at::Tensor tiled_transpose(const at::Tensor& x, bool wrong_index) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous());
  const int rows = static_cast<int>(x.size(0)), cols = static_cast<int>(x.size(1));
  at::Tensor out = at::empty({cols, rows}, x.options());
  const dim3 grid((cols + kTile - 1) / kTile, (rows + kTile - 1) / kTile);
  launch<tiled_transpose_kernel>({grid, dim3(kTile, kTile)}, x.const_data_ptr<float>(), out.mutable_data_ptr<float>(),
         rows, cols, wrong_index);
  return out;
}

// One warp operation by every thread of one block whose lane is in `mask` (the others write -1).
enum Op : int { kShfl, kShflUp, kShflDown, kShflXor, kBallot, kAny, kAll, kSyncwarp };

__global__ void warp_op_kernel(const int* values, int* out, int op, int arg, unsigned mask, int width) {
  const unsigned lane = threadIdx.x % warpSize;
  const int v = values[threadIdx.x];
  int result = -1;
  if (mask >> lane & 1u) {
    switch (op) {
      case kShfl: result = __shfl_sync(mask, v, arg, width); break;
      case kShflUp: result = __shfl_up_sync(mask, v, static_cast<unsigned>(arg), width); break;
      case kShflDown: result = __shfl_down_sync(mask, v, static_cast<unsigned>(arg), width); break;
      case kShflXor: result = __shfl_xor_sync(mask, v, arg, width); break;
      case kBallot: result = static_cast<int>(__ballot_sync(mask, v)); break;
      case kAny: result = __any_sync(mask, v); break;
      case kAll: result = __all_sync(mask, v); break;
      case kSyncwarp: __syncwarp(mask); result = v; break;
    }
  }
  out[threadIdx.x] = result;
}

at::Tensor warp_op(const at::Tensor& values, const std::string& op, int64_t arg, int64_t mask, int64_t width) {
  TORCH_CHECK(values.dim() == 1 && values.scalar_type() == at::kInt && values.is_contiguous());
  static const char* names[] = {"shfl", "shfl_up", "shfl_down", "shfl_xor", "ballot", "any", "all", "syncwarp"};
  int code = -1;
  for (int i = 0; i < 8; ++i) {
    if (op == names[i]) code = i;
  }
  TORCH_CHECK(code >= 0, "unknown warp op ", op);
  at::Tensor out = at::empty_like(values);
  launch<warp_op_kernel>({1, static_cast<unsigned>(values.numel())}, values.const_data_ptr<int>(),
         out.mutable_data_ptr<int>(), code, static_cast<int>(arg), static_cast<unsigned>(mask),
         static_cast<int>(width));
  return out;
}

// __syncthreads_count/_and/_or over a per-thread flag; thread 0 writes the three results.
__global__ void barrier_reductions_kernel(const int* flags, int* out) {
  const int flag = flags[threadIdx.x];
  const int count = __syncthreads_count(flag);
  const int all = __syncthreads_and(flag);
  const int any = __syncthreads_or(flag);
  if (threadIdx.x == 0) out[0] = count, out[1] = all, out[2] = any;
}

at::Tensor barrier_reductions(const at::Tensor& flags) {
  TORCH_CHECK(flags.dim() == 1 && flags.scalar_type() == at::kInt && flags.is_contiguous());
  at::Tensor out = at::empty({3}, flags.options());
  launch<barrier_reductions_kernel>({1, static_cast<unsigned>(flags.numel())}, flags.const_data_ptr<int>(),
         out.mutable_data_ptr<int>());
  return out;
}

// Kernels that are undefined behaviour on a GPU; the emulator must refuse each with an error.
__global__ void misuse_kernel(int kind, int* sink) {
  const unsigned lane = threadIdx.x % warpSize;
  int v = static_cast<int>(threadIdx.x);
  switch (kind) {
    case 0:  // a barrier that half the block never reaches
      if (threadIdx.x % 2) return;
      __syncthreads();
      break;
    case 1:  // a full-warp shuffle that half the lanes never reach
      if (lane >= 16) return;
      v = __shfl_sync(0xffffffffu, v, 0);
      break;
    case 2:  // a mask that omits the calling lane
      v = __shfl_sync(0x1u, v, 0);
      break;
    case 3:  // lanes of one mask making different calls
      v = lane % 2 ? __shfl_sync(0xffffffffu, v, 0) : static_cast<int>(__ballot_sync(0xffffffffu, v));
      break;
    case 4:  // a shuffle reading a lane outside its mask
      if (lane < 16) v = __shfl_sync(0x0000ffffu, v, 20);
      break;
  }
  sink[threadIdx.x] = v;
}

void misuse(const std::string& kind) {
  static const char* kinds[] = {"divergent_barrier",          "warp_deadlock",   "mask_omits_caller", "mismatched_ops",
                                "shuffle_from_inactive_lane", "too_many_threads"};
  int code = -1;
  for (int i = 0; i < 6; ++i) {
    if (kind == kinds[i]) code = i;
  }
  TORCH_CHECK(code >= 0, "unknown misuse ", kind);
  const unsigned threads = kind == "too_many_threads" ? 1025 : 64;  // a GPU's blocks hold at most 1024 threads
  at::Tensor sink = at::empty({threads}, at::kInt);
  launch<misuse_kernel>({1, threads}, code, sink.mutable_data_ptr<int>());
}

}  // namespace

TORCH_LIBRARY(cnn_ext_emulator_test, m) {
  m.def("block_reverse(Tensor x) -> Tensor", &block_reverse);
  m.def("tiled_transpose(Tensor x, bool wrong_index) -> Tensor", &tiled_transpose);
  m.def("warp_op(Tensor values, str op, int arg, int mask, int width) -> Tensor", &warp_op);
  m.def("barrier_reductions(Tensor flags) -> Tensor", &barrier_reductions);
  m.def("misuse(str kind) -> ()", &misuse);
}

}  // namespace cnn_ext::emu
