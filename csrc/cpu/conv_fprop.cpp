// CPU fprop (cnn_ext.conv2d): direct depthwise kernels (conv_depthwise.h), Winograd F(2x2, 3x3) or F(4x4, 3x3) for
// stride-1 3x3 kernels (winograd.h), implicit im2col at any stride (conv_common.h has the shared machinery), explicit
// im2col (the reference form, when forced), or the batch-in-lanes kernels; dispatch.cpp chooses.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "conv2d_lanes.h"
#include "conv_common.h"
#include "conv_depthwise.h"
#include "dispatch.h"
#include "output_cache.h"
#include "winograd.h"

namespace cnn_ext::cpu {
namespace {

// ---------------------------------------------------------------------------------------------------------------
// fprop: one item = (group, part of the output channels, image, chunk of output rows) by implicit im2col
// (run_implicit_items), or (image, group, chunk of output positions) by explicit im2col.
// ---------------------------------------------------------------------------------------------------------------

template <typename T>
void conv2d_forward_implicit(const Conv& cv, const T* x, const T* w, const T* bias, T* y) {
  const ImplicitSplit split = implicit_split(cv, false, cv.n * cv.groups, Window::row_elements(cv, false) * sizeof(T),
                                             cv.kg * cv.crs * sizeof(T), sizeof(T));
  const int64_t m = ceil_div(cv.kg, split.m_parts);  // output channels per part
  Window win(cv, false, split.rows);
  const MicroKernel<T> uk = pick_micro_kernel<T>(m, win.rows_per_item * win.cols);
  if (const int64_t rows = row_by_row_item_rows(win); implicit_row_by_row(win, uk, m) && rows < split.rows) {
    win = Window(cv, false, rows);
  }
  CallScratch scratch;
  run_implicit_items(
      cv, win, uk, cv.kg, split.m_parts, MatrixA<T>{w, MatrixA<T>::kRows, cv.crs}, cv.kg * cv.crs,
      [&](int64_t img, int64_t g) { return x + (img * cv.c + g * cv.cg) * cv.hw; },
      [&](int64_t img, int64_t g) { return y + (img * cv.k + g * cv.kg) * cv.pq; }, bias, scratch);
}

template <typename T>
void conv2d_forward_explicit(const Conv& cv, const T* x, const T* w, const T* bias, T* y) {
  const int threads = num_threads();
  // Column chunk: im2col scratch within budget, and enough items to keep every thread busy.
  int64_t chunk = std::max<int64_t>(64, kScratchBytes / std::max<int64_t>(1, cv.crs * sizeof(T)));
  chunk = std::min(chunk, ceil_div(cv.pq, ceil_div(2 * threads, cv.n * cv.groups)));
  const MicroKernel<T> uk = pick_micro_kernel<T>(cv.kg, std::min(chunk, cv.pq));
  chunk = std::min(cv.pq, ceil_div(chunk, uk.nr) * uk.nr);
  const int64_t chunks = ceil_div(cv.pq, chunk);
  // Rows padded to whole micro-kernel panels so the GEMM reads B in place, plus copy_run's slack.
  const int64_t col_ld = cpu::padded_cols(chunk, uk.nr);
  const std::vector<int64_t> col_rows = row_offsets(cv.crs, col_ld);

  const int64_t items = cv.n * cv.groups * chunks;
#pragma omp parallel num_threads(threads)
  {
    std::vector<T> col(cv.crs * col_ld + 64 / sizeof(T));
#pragma omp for schedule(dynamic)
    for (int64_t item = 0; item < items; ++item) {
      const int64_t img = item / (cv.groups * chunks), g = item / chunks % cv.groups, part = item % chunks;
      const int64_t pq0 = part * chunk, pq1 = std::min(cv.pq, pq0 + chunk), width = pq1 - pq0;
      T* yg = y + (img * cv.k + g * cv.kg) * cv.pq + pq0;
      im2col(cv, x + (img * cv.c + g * cv.cg) * cv.hw, x + cv.n * cv.c * cv.hw, pq0, pq1, col_ld, col.data());
      gemm_a_rows(uk, cv.kg, width, cv.crs, w + g * cv.kg * cv.crs, cv.crs, col.data(), col_rows.data(), yg, cv.pq,
                  false, Pad::kB);
      if (bias != nullptr) {
        for (int64_t kk = 0; kk < cv.kg; ++kk) {
          const T bk = bias[g * cv.kg + kk];
          T* row = yg + kk * cv.pq;
          for (int64_t j = 0; j < width; ++j) row[j] += bk;
        }
      }
    }
  }
}

template <typename T>
void conv2d_forward(const ConvShape<int64_t>& shape, Fprop algorithm, const T* x, const T* w, const T* bias, T* y) {
  const Conv cv(shape);
  switch (algorithm) {
    case Fprop::kLanes:
      if constexpr (std::is_same_v<T, float>) return lanes::conv2d_forward(shape, x, w, bias, y);
      break;
    case Fprop::kDepthwise:
      return depthwise_forward(cv, x, w, bias, y);
    case Fprop::kWinograd4x4:
    case Fprop::kWinograd:
      return winograd_3x3(winograd_problem(cv), algorithm == Fprop::kWinograd4x4 ? 4 : 2, x, w, false, bias, y);
    case Fprop::kImplicit:
      return conv2d_forward_implicit(cv, x, w, bias, y);
    case Fprop::kExplicit:
      return conv2d_forward_explicit(cv, x, w, bias, y);
  }
  TORCH_INTERNAL_ASSERT(false, "cnn_ext.conv2d: no CPU fprop ", static_cast<int>(algorithm), " for this dtype");
}

at::Tensor conv2d_cpu(const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                      c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t groups) {
  constexpr const char* op = "cnn_ext.conv2d";
  const auto shape = check_conv2d<int64_t>(op, input, weight, bias, stride, padding, dilation, groups);
  check_backend_dtype(op, input, "input", {at::kFloat, at::kDouble}, "CPU");
  at::Tensor out = empty_output(shape.output_sizes(), input.options());
  if (out.numel() == 0) return out;
  const at::Tensor x = input.contiguous(), w = weight.contiguous();
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  const Fprop algorithm = choose_fprop(shape, input.scalar_type());
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "cnn_ext_conv2d_cpu", [&] {
    conv2d_forward<scalar_t>(shape, algorithm, x.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(),
                             b.defined() ? b.const_data_ptr<scalar_t>() : nullptr, out.mutable_data_ptr<scalar_t>());
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(cnn_ext, CPU, m) {
  m.impl("conv2d", &conv2d_cpu);
}

}  // namespace cnn_ext::cpu
