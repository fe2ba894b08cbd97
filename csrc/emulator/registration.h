// How the CUDA sources' operator registrations reach the emulator. On a GPU build, CNN_EXT_CUDA_KERNELS(m) is
// TORCH_LIBRARY_IMPL(cnn_ext, CUDA, m); in the emulator it records the same block of m.impl(...) calls, which
// cnn_ext.cuda_emulation replays onto a library that, while the emulation is on, serves cnn_ext's ops for CPU
// tensors.
#pragma once

#include <c10/macros/Macros.h>
#include <torch/library.h>

namespace cnn_ext::emu {

using Registration = void (*)(torch::Library&);

// Adds a block of registrations (at load time); returns true so that it can initialise a static.
bool add_registration(Registration registration);

}  // namespace cnn_ext::emu

#define CNN_EXT_EMULATED_KERNELS_IMPL(m, uid)                                                                   \
  static void C10_CONCATENATE(cnn_ext_emulated_kernels_, uid)(torch::Library&);                                 \
  [[maybe_unused]] static const bool C10_CONCATENATE(cnn_ext_emulated_kernels_added_, uid) =                    \
      ::cnn_ext::emu::add_registration(&C10_CONCATENATE(cnn_ext_emulated_kernels_, uid));                       \
  static void C10_CONCATENATE(cnn_ext_emulated_kernels_, uid)(torch::Library & m)

#define CNN_EXT_EMULATED_KERNELS(m) CNN_EXT_EMULATED_KERNELS_IMPL(m, __LINE__)
