// The pooling windows along one spatial dimension, shared by the pooling kernels (pool2d.cpp) and the fused
// conv + max-pool + ReLU kernels (conv2d.cpp, conv2d_lanes.cpp), so that all of them clip windows the same way.
#pragma once

#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

namespace cnn_ext {
namespace cpu {

// For output position o, the input positions begin[o], begin[o] + dilation, ... up to (excluding) end[o], clipped
// to the input; begin >= end means the window is all padding. Outputs in [interior_begin, interior_end) have
// windows that lie wholly inside the input, so their taps need no clipping.
struct WindowAxis {
  std::vector<int64_t> begin, end;
  int64_t interior_begin = 0, interior_end = 0;

  WindowAxis(int64_t out_size, int64_t in_size, int64_t kernel, int64_t stride, int64_t pad, int64_t dilation)
      : begin(out_size), end(out_size) {
    const int64_t span = (kernel - 1) * dilation + 1;
    bool seen_interior = false;
    for (int64_t o = 0; o < out_size; ++o) {
      const int64_t start = o * stride - pad;
      int64_t first = start;
      while (first < 0) first += dilation;  // first tap inside the input, as ATen steps over the padding
      begin[o] = first;
      end[o] = std::min(start + span, in_size);
      if (start >= 0 && start + span <= in_size) {
        if (!seen_interior) interior_begin = o;
        interior_end = o + 1;
        seen_interior = true;
      }
    }
  }

  // The input positions [lo, hi) read by outputs [o0, o1); lo >= hi when they read none. Not simply
  // [begin[o0], end[o1 - 1]): with padding and dilation a later window can start before an earlier one (kernel 2,
  // dilation 2, padding 1: output 0 reads position 1 only, output 1 reads 0 and 2).
  std::pair<int64_t, int64_t> span(int64_t o0, int64_t o1) const {
    int64_t lo = 0, hi = 0;
    bool any = false;
    for (int64_t o = o0; o < o1; ++o) {
      if (begin[o] >= end[o]) continue;
      lo = any ? std::min(lo, begin[o]) : begin[o];
      hi = any ? std::max(hi, end[o]) : end[o];
      any = true;
    }
    return {lo, hi};
  }
};

}  // namespace cpu
}  // namespace cnn_ext
