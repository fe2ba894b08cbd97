// CPU kernels of the fused conv2d + bias + max_pool2d + ReLU (cnn_ext.conv2d_maxpool_relu) and its backward ops:
// the fprop machinery a chunk of pooled rows at a time, pooled from item scratch (gemm_pool), or the batch-in-lanes
// kernels; dispatch.cpp chooses.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <limits>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "../composite.h"
#include "../max_rule.h"
#include "conv2d_lanes.h"
#include "conv_common.h"
#include "dispatch.h"
#include "isa.h"
#include "output_cache.h"
#include "window_axis.h"

#if CNN_EXT_X86
#include <immintrin.h>
#endif

namespace cnn_ext::cpu {
namespace {

// ---------------------------------------------------------------------------------------------------------------
// Fused conv2d + max_pool2d + ReLU (cnn_ext.conv2d_maxpool_relu). One item = (image, group, chunk of pooled output
// rows): the convolution rows those pooling windows read are computed into item-local scratch by the fprop
// machinery (implicit im2col, strided convolutions through stride-phase windows), bias added, and pooled + ReLU'd from
// there, so the convolution's output never reaches memory. Chunks of pooled rows write disjoint outputs; when pooling
// windows overlap (pool stride < window) the conv rows they share are recomputed by both chunks, which gives the
// same bits (a C element's sum does not depend on the GEMM's tiling). The pooling follows pool2d.cpp exactly:
// windows clipped to the conv output, a value takes over when greater or NaN (ties keep the first tap in row-major
// window order), a window wholly in padding gives -inf (ReLU: 0) and index -1.
// ---------------------------------------------------------------------------------------------------------------

// Plane offset of a 2×2 window's winning tap, in an integer as wide as T so that the selects vectorise.
template <typename T>
using tap_t = std::conditional_t<sizeof(T) == 4, int32_t, int64_t>;

// n adjacent 2×2 stride-2 windows over rows r0 and r1 (conv values, plus b): out[k] = relu(max), tap[k] = the
// winner's offset from the window's first tap (0, 1, row_w, row_w + 1). Taps in row-major window order; a value
// takes over when greater or NaN. Compiled per ISA (PerIsa): the build has no -m flags.
template <typename T>
inline __attribute__((always_inline)) void max2x2_body(const T* __restrict r0, const T* __restrict r1, int64_t n,
                                                       T b, tap_t<T> row_w, T* __restrict out,
                                                       tap_t<T>* __restrict tap) {
  // Whole blocks of L windows (no scalar tail): out and tap have room for n rounded up to L, and the rows are
  // readable that far (the caller's slack); the extra results are never used.
  constexpr int64_t L = 64 / sizeof(T);
  for (int64_t k0 = 0; k0 < n; k0 += L) {
#pragma GCC unroll 1
    for (int64_t k = k0; k < k0 + L; ++k) {
      T best = r0[2 * k] + b;
      tap_t<T> t = 0;
      T v = r0[2 * k + 1] + b;
      bool take = takes_over(v, best);
      best = take ? v : best;
      t = take ? tap_t<T>(1) : t;
      v = r1[2 * k] + b;
      take = takes_over(v, best);
      best = take ? v : best;
      t = take ? row_w : t;
      v = r1[2 * k + 1] + b;
      take = takes_over(v, best);
      best = take ? v : best;
      t = take ? tap_t<T>(row_w + 1) : t;
      out[k] = relu(best);
      tap[k] = t;
    }
  }
}

// Row r < rows of the 2×2 kernel's results (values/taps, rows ld apart) to the pooled planes: out[r*q + ow] =
// values[r*ld + ow], idx[r*q + ow] = first + r*first_step + 2*ow + taps[r*ld + ow], for ow < cols.
template <typename T>
inline __attribute__((always_inline)) void store_pooled_rows_body(const T* values, const tap_t<T>* taps,
                                                                  int64_t rows, int64_t ld, int64_t cols,
                                                                  int64_t first, int64_t first_step, T* out,
                                                                  int64_t* idx, int64_t q) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* __restrict v = values + r * ld;
    const tap_t<T>* __restrict t = taps + r * ld;
    T* __restrict o_row = out + r * q;
    int64_t* __restrict i_row = idx + r * q;
    const int64_t base = first + r * first_step;
    for (int64_t ow = 0; ow < cols; ++ow) {
      o_row[ow] = v[ow];
      i_row[ow] = base + 2 * ow + t[ow];
    }
  }
}

#if CNN_EXT_X86
// float with AVX-512: each row as masked 16-lane stores (pooled rows are short, 4 to 12 columns for MNIST, so a
// scalar tail per row would dominate).
CNN_EXT_TARGET_AVX512 void store_pooled_rows_avx512(const float* values, const int32_t* taps,
                                                                 int64_t rows, int64_t ld, int64_t cols,
                                                                 int64_t first, int64_t first_step, float* out,
                                                                 int64_t* idx, int64_t q) {
  const __m512i lanes_lo = _mm512_set_epi64(14, 12, 10, 8, 6, 4, 2, 0);
  const __m512i lanes_hi = _mm512_set_epi64(30, 28, 26, 24, 22, 20, 18, 16);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t base = first + r * first_step;
    for (int64_t ow = 0; ow < cols; ow += 16) {
      const int64_t n = std::min<int64_t>(16, cols - ow);
      const __mmask16 m = static_cast<__mmask16>((1u << n) - 1u);
      _mm512_mask_storeu_ps(out + r * q + ow, m, _mm512_maskz_loadu_ps(m, values + r * ld + ow));
      const __mmask8 m_lo = static_cast<__mmask8>(m & 0xFF), m_hi = static_cast<__mmask8>(m >> 8);
      const __m512i t_lo = _mm512_maskz_cvtepi32_epi64(0xFF, _mm256_maskz_loadu_epi32(m_lo, taps + r * ld + ow));
      const __m512i t_hi = _mm512_maskz_cvtepi32_epi64(0xFF, _mm256_maskz_loadu_epi32(m_hi, taps + r * ld + ow + 8));
      const __m512i b = _mm512_set1_epi64(base + 2 * ow);
      _mm512_mask_storeu_epi64(idx + r * q + ow, m_lo, _mm512_add_epi64(_mm512_add_epi64(b, lanes_lo), t_lo));
      _mm512_mask_storeu_epi64(idx + r * q + ow + 8, m_hi, _mm512_add_epi64(_mm512_add_epi64(b, lanes_hi), t_hi));
    }
  }
}
#endif

template <typename T>
void store_pooled_rows(const T* values, const tap_t<T>* taps, int64_t rows, int64_t ld, int64_t cols, int64_t first,
                       int64_t first_step, T* out, int64_t* idx, int64_t q) {
#if CNN_EXT_X86
  if constexpr (std::is_same_v<T, float>) {
    if (isa() == Isa::kAvx512) {
      store_pooled_rows_avx512(values, taps, rows, ld, cols, first, first_step, out, idx, q);
      return;
    }
  }
#endif
  store_pooled_rows_body<T>(values, taps, rows, ld, cols, first, first_step, out, idx, q);
}

// Whether the pooling is 2×2 windows with stride 2 and no padding or dilation (the MNIST pattern), whose full
// windows go through the vector kernel.
template <typename T>
bool is_two_by_two(const PoolShape<int64_t>& ps) {
  return ps.kh == 2 && ps.kw == 2 && ps.stride_h == 2 && ps.stride_w == 2 && ps.pad_h == 0 && ps.pad_w == 0 &&
         ps.dil_h == 1 && ps.dil_w == 1 && ps.h * ps.w < std::numeric_limits<tap_t<T>>::max();
}

// Pooled rows [u0, u1) of one channel: relu(max over each window of conv + b). Conv row y sits at
// buf + (y - y0)*ld_row (the rows the windows read are all there); out and idx are the channel's pooled plane.
// values/taps: scratch of at least two_by_two_scratch(...) elements for the 2×2 kernel.
template <typename T>
void pool_relu_rows(const PoolShape<int64_t>& ps, const WindowAxis& prow, const WindowAxis& pcol, int64_t u0,
                    int64_t u1, const T* buf, int64_t y0, int64_t ld_row, T b, T* __restrict out,
                    int64_t* __restrict idx, T* values, tap_t<T>* taps) {
  const T lowest = -std::numeric_limits<T>::infinity();
  const int64_t plane_w = ps.w;  // conv output width: indices are h*Q + w
  int64_t generic_from = u0;     // pooled rows from here on take the generic loop (all columns)
  int64_t generic_col = 0;       // ... and rows before it the columns from here on
  if (is_two_by_two<T>(ps)) {
    // The pooled rows with full windows are a prefix of [u0, u1) (only a ceil_mode last row can be cut short),
    // reading conv row pairs y0 + 2*(oh - u0) + {0, 1}. Window J of row pair j at column ow = J - j*ld_row reads
    // buf[2J], buf[2J + 1], buf[ld_row + 2J], buf[ld_row + 2J + 1]: one kernel call covers every full row, with
    // the J past each row's last window computing discarded values.
    int64_t rows = 0;
    while (u0 + rows < u1 && prow.end[u0 + rows] - prow.begin[u0 + rows] == 2) ++rows;
    const int64_t cols = std::min(ps.q, plane_w / 2);
    if (rows > 0 && cols > 0) {
      PerIsa<&max2x2_body<T>>::pick()(buf, buf + ld_row, (rows - 1) * ld_row + cols, b, static_cast<tap_t<T>>(plane_w), values,
                         taps);
      store_pooled_rows<T>(values, taps, rows, ld_row, cols, prow.begin[u0] * plane_w, 2 * plane_w, out + u0 * ps.q,
                           idx + u0 * ps.q, ps.q);
      generic_from = u0 + rows;
      generic_col = cols;
    }
  }
  for (int64_t oh = u0; oh < u1; ++oh) {
    T* o_row = out + oh * ps.q;
    int64_t* i_row = idx + oh * ps.q;
    const int64_t hb = prow.begin[oh], he = prow.end[oh];
    for (int64_t ow = oh < generic_from ? generic_col : 0; ow < ps.q; ++ow) {
      const int64_t wb = pcol.begin[ow], we = pcol.end[ow];
      if (hb >= he || wb >= we) {
        o_row[ow] = relu(lowest);
        i_row[ow] = -1;
        continue;
      }
      T best = lowest;
      int64_t best_index = hb * plane_w + wb;
      for (int64_t h = hb; h < he; h += ps.dil_h) {
        const T* row = buf + (h - y0) * ld_row;
        for (int64_t w = wb; w < we; w += ps.dil_w) {
          const T v = row[w] + b;
          if (takes_over(v, best)) {
            best = v;
            best_index = h * plane_w + w;
          }
        }
      }
      o_row[ow] = relu(best);
      i_row[ow] = best_index;
    }
  }
}

template <typename T>
void conv2d_maxpool_relu_gemm_pool(const Conv& cv, const PoolShape<int64_t>& ps, const T* x, const T* w, const T* bias,
                              T* out, int64_t* idx) {
  const WindowAxis prow(ps.p, ps.h, ps.kh, ps.stride_h, ps.pad_h, ps.dil_h);
  const WindowAxis pcol(ps.q, ps.w, ps.kw, ps.stride_w, ps.pad_w, ps.dil_w);
  const int64_t row_len = Window::cols_of(cv, false);  // scratch row stride of a conv row
  const int64_t bytes_per_row = (cv.kg * row_len + Window::row_elements(cv, false)) * sizeof(T);

  // Pooled rows per item: enough items for every thread, and the conv rows of one item within the scratch budget.
  int64_t urows = ceil_div(ps.p, ceil_div(2 * num_threads(), cv.n * cv.groups));
  while (urows > 1 && ((urows - 1) * ps.stride_h + (ps.kh - 1) * ps.dil_h + 1) * bytes_per_row > kScratchBytes) {
    --urows;
  }
  const int64_t chunks = ceil_div(ps.p, urows);
  int64_t rows_cap = 1;  // most conv rows any item needs
  for (int64_t ci = 0; ci < chunks; ++ci) {
    const auto [y0, y1] = prow.span(ci * urows, std::min(ps.p, (ci + 1) * urows));
    rows_cap = std::max(rows_cap, y1 - y0);
  }

  const Window win(cv, false, rows_cap);
  const MicroKernel<T> uk = pick_micro_kernel<T>(cv.kg, rows_cap * row_len);
  const int64_t ld = rows_cap * row_len;  // scratch plane of one output channel

  const int64_t pool_scratch = is_two_by_two<T>(ps) ? (rows_cap / 2 + 1) * row_len + 64 : 0;

  const int64_t items = cv.n * cv.groups * chunks;
#pragma omp parallel num_threads(num_threads())
  {
    std::vector<T> window(win.buffer_size());
    // Slack: the 2×2 pooling kernel reads a row and whole vector blocks past the last row pair's last window.
    std::vector<T> product(cv.kg * ld + row_len + 2 * 64);
    // Its results, one per window position of the item's row pairs, rounded up to whole vector blocks.
    std::vector<T> pool_values(pool_scratch);
    std::vector<tap_t<T>> pool_taps(pool_scratch);
#pragma omp for schedule(dynamic)
    for (int64_t item = 0; item < items; ++item) {
      const int64_t img = item / (cv.groups * chunks), g = item / chunks % cv.groups, ci = item % chunks;
      const int64_t u0 = ci * urows, u1 = std::min(ps.p, u0 + urows);
      const auto [y0, y1] = prow.span(u0, u1);
      const T* xg = x + (img * cv.c + g * cv.cg) * cv.hw;
      const MatrixA<T> a{w + g * cv.kg * cv.crs, MatrixA<T>::kRows, cv.crs};  // the weights read in place
      if (y0 < y1) {
        win.fill_rows(xg, y0, y1, window.data());
        gemm(uk, cv.kg, (y1 - y0 - 1) * win.cols + cv.q, static_cast<int64_t>(win.taps.size()), a, window.data(),
             win.taps.data(), product.data(), ld, false, Pad::kB);
      }
      for (int64_t i = 0; i < cv.kg; ++i) {
        const int64_t ch = g * cv.kg + i;
        const int64_t plane = (img * cv.k + ch) * ps.p * ps.q;
        pool_relu_rows(ps, prow, pcol, u0, u1, product.data() + i * ld, y0, row_len,
                       bias != nullptr ? bias[ch] : T(0), out + plane, idx + plane, pool_values.data(),
                       pool_taps.data());
      }
    }
  }
}

std::tuple<at::Tensor, at::Tensor> conv2d_maxpool_relu_cpu(
    const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t groups,
    c10::IntArrayRef pool_kernel_size, c10::IntArrayRef pool_stride, c10::IntArrayRef pool_padding,
    c10::IntArrayRef pool_dilation, bool ceil_mode) {
  constexpr const char* op = "cnn_ext.conv2d_maxpool_relu";
  const auto shape = check_conv2d_maxpool_relu<int64_t>(op, input, weight, bias, stride, padding, dilation, groups,
                                                        pool_kernel_size, pool_stride, pool_padding, pool_dilation,
                                                        ceil_mode);
  check_backend_dtype(op, input, "input", {at::kFloat, at::kDouble}, "CPU");
  const auto sizes = shape.pool.output_sizes();
  at::Tensor out = empty_output(sizes, input.options());
  at::Tensor indices = empty_output(sizes, input.options().dtype(at::kLong));
  if (out.numel() == 0) return {out, indices};
  const at::Tensor x = input.contiguous(), w = weight.contiguous();
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  const FusedForward algorithm = choose_fused_forward(shape.conv, input.scalar_type());
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "cnn_ext_conv2d_maxpool_relu_cpu", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* wp = w.const_data_ptr<scalar_t>();
    const scalar_t* bp = b.defined() ? b.const_data_ptr<scalar_t>() : nullptr;
    if (algorithm == FusedForward::kLanes) {  // float32 only
      lanes::conv2d_maxpool_relu(shape.conv, shape.pool, x.const_data_ptr<float>(), w.const_data_ptr<float>(),
                                 b.defined() ? b.const_data_ptr<float>() : nullptr, out.mutable_data_ptr<float>(),
                                 indices.mutable_data_ptr<int64_t>());
      return;
    }
    conv2d_maxpool_relu_gemm_pool<scalar_t>(Conv(shape.conv), shape.pool, xp, wp, bp,
                                            out.mutable_data_ptr<scalar_t>(), indices.mutable_data_ptr<int64_t>());
  });
  return {out, indices};
}


// grad planes (plane_in each) = sum of go over the outputs whose index points there and whose output is > 0 (or
// NaN); first_bad[plane] = the first output with an index neither in [0, plane_in) nor -1.
template <typename T>
void unpool_relu_backward(const T* go, const T* out, const int64_t* idx, int64_t planes, int64_t plane_out,
                          int64_t plane_in, T* grad, int64_t* first_bad) {
#pragma omp parallel for schedule(static) num_threads(num_threads())
  for (int64_t plane = 0; plane < planes; ++plane) {
    T* g = grad + plane * plane_in;
    std::fill_n(g, plane_in, T(0));
    const int64_t base = plane * plane_out;
    for (int64_t o = 0; o < plane_out; ++o) {
      const int64_t i = idx[base + o];
      if (static_cast<uint64_t>(i) < static_cast<uint64_t>(plane_in)) {
        if (!(out[base + o] <= T(0))) g[i] += go[base + o];
      } else if (i != -1 && first_bad[plane] < 0) {
        first_bad[plane] = o;
      }
    }
  }
}

// The gradient of the fused op's convolution output (the CompositeExplicitAutograd op in ops.cpp is ReLU's
// threshold_backward followed by max_pool2d_backward): one pass per (image, channel) plane that zeroes it and adds
// grad_output[o] at indices[o] where output[o] > 0 (or NaN), in output order as max_pool2d_backward does, so the
// result is the same bits. Invalid indices are reported as max_pool2d_backward reports them.
// check_conv2d_maxpool_relu_backward, for the CPU kernels' dtypes.
std::pair<ConvShape<int64_t>, PoolShape<int64_t>> check_fused_backward(
    const char* op, const at::Tensor& grad_output, const at::Tensor& output, const at::Tensor& indices,
    const at::Tensor& input, const at::Tensor& weight, c10::IntArrayRef stride, c10::IntArrayRef padding,
    c10::IntArrayRef dilation, int64_t groups, c10::IntArrayRef pool_kernel_size, c10::IntArrayRef pool_stride,
    c10::IntArrayRef pool_padding, c10::IntArrayRef pool_dilation, bool ceil_mode) {
  const auto shape = check_conv2d_maxpool_relu_backward<int64_t>(op, grad_output, output, indices, input, weight,
                                                                 stride, padding, dilation, groups, pool_kernel_size,
                                                                 pool_stride, pool_padding, pool_dilation, ceil_mode);
  check_backend_dtype(op, grad_output, "grad_output", {at::kFloat, at::kDouble}, "CPU");
  return {shape.conv, shape.pool};
}

at::Tensor conv2d_maxpool_relu_backward_pool_cpu(const at::Tensor& grad_output_, const at::Tensor& output_,
                                                 const at::Tensor& indices_, const at::Tensor& input,
                                                 const at::Tensor& weight, c10::IntArrayRef stride,
                                                 c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t groups,
                                                 c10::IntArrayRef pool_kernel_size, c10::IntArrayRef pool_stride,
                                                 c10::IntArrayRef pool_padding, c10::IntArrayRef pool_dilation,
                                                 bool ceil_mode) {
  constexpr const char* op = "cnn_ext.conv2d_maxpool_relu_backward_pool";
  const auto [conv, ps] = check_fused_backward(op, grad_output_, output_, indices_, input, weight, stride, padding,
                                               dilation, groups, pool_kernel_size, pool_stride, pool_padding,
                                               pool_dilation, ceil_mode);
  const auto conv_out = conv.output_sizes();
  const at::Tensor grad_output = grad_output_.contiguous(), output = output_.contiguous();
  const at::Tensor indices = indices_.contiguous();
  at::Tensor grad = empty_output(conv_out, grad_output.options());
  if (grad.numel() == 0) return grad;
  const int64_t plane_in = ps.h * ps.w, plane_out = ps.p * ps.q, planes = ps.n * ps.c;
  std::vector<int64_t> first_bad(planes, -1);  // per plane, so the first bad index overall is reported
  AT_DISPATCH_FLOATING_TYPES(grad_output.scalar_type(), "cnn_ext_conv2d_maxpool_relu_backward_pool_cpu", [&] {
    unpool_relu_backward<scalar_t>(grad_output.const_data_ptr<scalar_t>(), output.const_data_ptr<scalar_t>(),
                                   indices.const_data_ptr<int64_t>(), planes, plane_out, plane_in,
                                   grad.mutable_data_ptr<scalar_t>(), first_bad.data());
  });
  for (int64_t plane = 0; plane < planes; ++plane) {
    if (first_bad[plane] < 0) continue;
    const int64_t position = plane * plane_out + first_bad[plane];
    fail_bad_max_pool_index(op, ps, position, indices.const_data_ptr<int64_t>()[position],
                            "convolution's output plane", "P*Q");
  }
  return grad;
}

// All the fused op's gradients at once. For float32 convolutions that the lanes kernels take, the convolution's
// output gradient is built block by block in their layout and never stored; otherwise, or when an index is not
// one of its window's taps, the general composite (backward_pool, then the convolution's backward ops).
std::tuple<at::Tensor, at::Tensor, at::Tensor> conv2d_maxpool_relu_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& output, const at::Tensor& indices, const at::Tensor& input,
    const at::Tensor& weight, c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef dilation,
    int64_t groups, c10::IntArrayRef pool_kernel_size, c10::IntArrayRef pool_stride, c10::IntArrayRef pool_padding,
    c10::IntArrayRef pool_dilation, bool ceil_mode, std::array<bool, 3> output_mask) {
  constexpr const char* op = "cnn_ext.conv2d_maxpool_relu_backward";
  const auto [conv, ps] = check_fused_backward(op, grad_output, output, indices, input, weight, stride, padding,
                                               dilation, groups, pool_kernel_size, pool_stride, pool_padding,
                                               pool_dilation, ceil_mode);
  const at::Tensor* operands[] = {&grad_output, &output, &input, &weight};
  const bool all_float = std::all_of(std::begin(operands), std::end(operands),
                                     [](const at::Tensor* t) { return t->scalar_type() == at::kFloat; });
  const FusedBackward algorithm =
      choose_fused_backward(conv, all_float ? at::kFloat : grad_output.scalar_type(), output_mask[0]);
  if (algorithm == FusedBackward::kLanes && grad_output.numel() > 0) {
    const auto options = input.options();
    at::Tensor grad_input = output_mask[0] ? empty_output(input.sizes(), options) : at::empty({0}, options);
    at::Tensor grad_weight = output_mask[1] ? at::empty(weight.sizes(), options) : at::empty({0}, options);
    at::Tensor grad_bias = output_mask[2] ? at::empty({conv.k}, options) : at::empty({0}, options);
    const at::Tensor go = grad_output.contiguous(), out = output.contiguous(), idx = indices.contiguous();
    const at::Tensor x = input.contiguous(), w = weight.contiguous();
    if (lanes::conv2d_maxpool_relu_backward(
            conv, ps, go.const_data_ptr<float>(), out.const_data_ptr<float>(), idx.const_data_ptr<int64_t>(),
            x.const_data_ptr<float>(), w.const_data_ptr<float>(),
            output_mask[0] ? grad_input.mutable_data_ptr<float>() : nullptr,
            output_mask[1] ? grad_weight.mutable_data_ptr<float>() : nullptr,
            output_mask[2] ? grad_bias.mutable_data_ptr<float>() : nullptr)) {
      return {grad_input, grad_weight, grad_bias};
    }
    record(Direction::kFusedBackward, static_cast<int>(FusedBackward::kComposite));  // an index outside its window
  }
  return conv2d_maxpool_relu_backward_composite(grad_output, output, indices, input, weight, stride, padding,
                                                dilation, groups, pool_kernel_size, pool_stride, pool_padding,
                                                pool_dilation, ceil_mode, output_mask);
}

}  // namespace

TORCH_LIBRARY_IMPL(cnn_ext, CPU, m) {
  m.impl("conv2d_maxpool_relu", &conv2d_maxpool_relu_cpu);
  m.impl("conv2d_maxpool_relu_backward_pool", &conv2d_maxpool_relu_backward_pool_cpu);
  m.impl("conv2d_maxpool_relu_backward", &conv2d_maxpool_relu_backward_cpu);
}

}  // namespace cnn_ext::cpu
