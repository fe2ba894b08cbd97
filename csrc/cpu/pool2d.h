// Max pooling of stacked (N*C) planes, as cnn_ext.max_pool2d computes it (pool2d.cpp), for callers that pool
// planes of their own: the fused batch norm + ReLU + max-pool (batch_norm.cpp) pools each normalised plane from a
// buffer of one plane, so the normalised values never reach memory.
#pragma once

#include <cstdint>

#include "../checks.h"
#include "dispatch.h"
#include "window_axis.h"

namespace cnn_ext::cpu {

// The max-pool forward of shape s, its algorithm chosen once (choose_max_pool_forward: recorded, and forced by
// cnn_ext.cpu_dispatch as for max_pool2d). rows() pools output rows [first, last) of the stacked planes (N*C*P rows
// of Q outputs; input plane r / P of H*W values) into output and indices (h*W + w within the plane, -1 for a
// window with no tap), on the calling thread. With `padded`, the input has kSlack readable elements past row
// last's plane, and output and indices kSlack writable ones past row last - 1's outputs (which the kernels may fill
// with garbage): then a plane's last rows run in vectors too, where otherwise they go one window at a time.
template <typename T>
class MaxPoolRows {
 public:
  static constexpr int64_t kSlack = 32;

  explicit MaxPoolRows(const PoolShape<int64_t>& s);
  void rows(const T* input, T* output, int64_t* indices, int64_t first, int64_t last, bool padded = false) const;
  // Whether the 2x2 tiled kernel runs (its rows cost 4 values per output).
  bool tiled() const { return tiled_ != nullptr; }

 private:
  PoolShape<int64_t> s_;
  WindowAxis row_axis_, col_axis_;
  void (*tiled_)(const PoolShape<int64_t>&, const T*, T*, int64_t*, int64_t, int64_t, bool) = nullptr;
  void (*windows_)(const PoolShape<int64_t>&, const WindowAxis&, const WindowAxis&, const T*, T*, int64_t*, int64_t,
                   int64_t) = nullptr;
};

}  // namespace cnn_ext::cpu
