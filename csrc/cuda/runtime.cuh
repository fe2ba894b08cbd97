// What the CUDA kernels and their launch code need from the CUDA runtime, in one place, so that the same sources
// build for a GPU (nvcc) and for the CPU emulator (the host compiler with CNN_EXT_CUDA_EMULATION; see
// csrc/emulator/cuda_emulator.h): launching a kernel, the device's multiprocessor count, the current stream's
// capture state, the device guard and the operator registration.
//
// Header note: ATen/cuda/CUDAContext.h pulls in cuBLAS/cuSPARSE headers, which the toolkit used to build this
// project need not have, so only the c10/cuda headers are used.
#pragma once

#include <torch/library.h>

#include <cstdlib>
#include <utility>

#ifdef CNN_EXT_CUDA_EMULATION
#include "../emulator/cuda_emulator.h"
#include "../emulator/registration.h"
#else
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#endif

namespace cnn_ext::gpu {

// Where a launch is written, for error messages (default arguments are evaluated at the call site).
struct LaunchShape {
  dim3 grid, block;
  const char* file = __builtin_FILE();
  int line = __builtin_LINE();
};

#ifdef CNN_EXT_CUDA_EMULATION

// kernel<<<grid, block>>>(args...) on the emulator.
template <auto kernel, typename... Args>
void launch(const LaunchShape& shape, Args&&... args) {
  emu::launch_kernel(kernel, emu::kernel_name<kernel>(), shape.grid, shape.block, shape.file, shape.line,
                     std::forward<Args>(args)...);
}

inline int multiprocessor_count() { return emu::multiprocessor_count(); }
inline bool stream_is_capturing() { return false; }
inline bool force_int64_indices() { return emu::force_int64_indices(); }

struct DeviceGuard {
  explicit DeviceGuard(const c10::Device&) {}
};

// CNN_EXT_CUDA_KERNELS(m) { m.impl(...); }: the emulator's registration (installed by cnn_ext.cuda_emulation).
#define CNN_EXT_CUDA_KERNELS(m) CNN_EXT_EMULATED_KERNELS(m)

#else

// kernel<<<grid, block, 0, current stream>>>(args...), checked.
template <auto kernel, typename... Args>
void launch(const LaunchShape& shape, Args&&... args) {
  kernel<<<shape.grid, shape.block, 0, c10::cuda::getCurrentCUDAStream()>>>(std::forward<Args>(args)...);
  c10::cuda::c10_cuda_check_implementation(static_cast<int32_t>(cudaGetLastError()), shape.file, "launch",
                                           static_cast<uint32_t>(shape.line), true);
}

inline int multiprocessor_count() {
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, c10::cuda::current_device()));
  return count;
}

// Whether the current stream is being captured into a CUDA graph (where nothing may wait for the device).
inline bool stream_is_capturing() {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(c10::cuda::getCurrentCUDAStream(), &status));
  return status != cudaStreamCaptureStatusNone;
}

// CNN_EXT_CUDA_INT64_INDICES=1 makes the kernels use 64-bit indices even where 32 bits suffice (read once).
inline bool force_int64_indices() {
  static const bool forced = [] {
    const char* value = std::getenv("CNN_EXT_CUDA_INT64_INDICES");
    return value != nullptr && value[0] == '1';
  }();
  return forced;
}

using DeviceGuard = c10::cuda::CUDAGuard;

#define CNN_EXT_CUDA_KERNELS(m) TORCH_LIBRARY_IMPL(cnn_ext, CUDA, m)

#endif

}  // namespace cnn_ext::gpu
