// The rules every max-pooling kernel follows (torch's), CPU and CUDA alike.
#pragma once

#include <c10/macros/Macros.h>

namespace cnn_ext {

// Whether `value` takes over a window's running maximum `best`: when greater, or NaN. Taps are visited in row-major
// window order, so ties keep the first one and the last NaN wins.
template <typename T>
C10_HOST_DEVICE inline bool takes_over(T value, T best) {
  return value > best || value != value;
}

// ReLU as torch.relu: NaN passes through.
template <typename T>
C10_HOST_DEVICE inline T relu(T value) {
  return value > T(0) || value != value ? value : T(0);
}

}  // namespace cnn_ext
