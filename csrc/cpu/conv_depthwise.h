// Depthwise convolutions: one input and one output channel per group (groups = channels; MobileNet's 3x3 layers).
// Each output plane is the correlation of one input plane with its own R × S kernel, so there is no GEMM to form:
// the work is R·S multiply-adds per output, done directly along contiguous rows.
//
// Column strides: a row read with column stride sw is split into sw phases (phase φ holds the padded columns φ,
// φ + sw, φ + 2·sw, ...), so that tap s reads phase (s·dw) % sw from offset (s·dw) / sw, and output column q of
// every tap is element q + offset of one phase: whole vectors, whatever the stride. The input gradient reads the
// same way backwards: padded column u = j·sw + φ of dX gathers dY's column j - offset from the taps of phase φ, and
// its padded row u_h from the (r, p) with p·sh + r·dh = u_h.
#pragma once

#include "conv_common.h"

namespace cnn_ext::cpu {

// Whether the depthwise kernels serve a convolution: one input and one output channel per group, with scratch copies
// of a plane (padded, rows split into stride phases) within a few times the plane's own size. A huge stride or padding
// is left to the GEMM algorithms, whose scratch does not grow with them.
bool depthwise_serves(const Conv& cv);

// y = conv(x, w) (+ bias), w: C × 1 × R × S.
template <typename T>
void depthwise_forward(const Conv& cv, const T* x, const T* w, const T* bias, T* y);

// dx = the input gradient from dy.
template <typename T>
void depthwise_backward_input(const Conv& cv, const T* dy, const T* w, T* dx);

// dw = the weight gradient from dy and x.
template <typename T>
void depthwise_backward_weight(const Conv& cv, const T* dy, const T* x, T* dw);

}  // namespace cnn_ext::cpu
