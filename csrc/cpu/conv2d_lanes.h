// float32 convolution kernels with 16 images in the vector lanes, for small planes and channel counts on AVX-512
// machines (see conv2d_lanes.cpp). dispatch.cpp asks supports() / suits() and otherwise runs the GEMMs of the
// conv_*.cpp files, which are the portable path.
#pragma once

#include <cstdint>

#include "../checks.h"

namespace cnn_ext {
namespace cpu {
namespace lanes {

// Whether the lanes kernels can compute this float32 convolution's fprop, fused conv + max-pool + ReLU (forward and
// backward) and wgrad on the ISA in use: one group, and each block's planes within their scratch.
bool supports(const ConvShape<int64_t>& cs);
// ... and its dgrad (stride 1, dY's padded rows within the scratch too).
bool supports_dgrad(const ConvShape<int64_t>& cs);
// Whether they are the better choice there (dispatch.cpp's rules): a full block of images, small channel counts.
bool suits(const ConvShape<int64_t>& cs);
bool suits_dgrad(const ConvShape<int64_t>& cs);

// Contiguous NCHW tensors; the same contracts as conv2d.cpp's kernels.
void conv2d_forward(const ConvShape<int64_t>& cs, const float* x, const float* w, const float* bias, float* y);
void conv2d_maxpool_relu(const ConvShape<int64_t>& cs, const PoolShape<int64_t>& ps, const float* x, const float* w,
                         const float* bias, float* out, int64_t* idx);
void conv2d_backward_input(const ConvShape<int64_t>& cs, const float* dy, const float* w, float* dx);
void conv2d_backward_weight(const ConvShape<int64_t>& cs, const float* dy, const float* x, float* dw);
// The gradients of conv2d_maxpool_relu from its pooled output's gradient go, output out and indices idx, for the
// non-null ones of dx (needs suits_dgrad), dw, db. Returns false when an index is not one of its pooling window's
// taps (nor -1); the outputs are then unspecified and the caller takes the general path.
bool conv2d_maxpool_relu_backward(const ConvShape<int64_t>& cs, const PoolShape<int64_t>& ps, const float* go,
                                  const float* out, const int64_t* idx, const float* x, const float* w, float* dx,
                                  float* dw, float* db);

}  // namespace lanes
}  // namespace cpu
}  // namespace cnn_ext
