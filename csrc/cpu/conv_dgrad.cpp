// CPU dgrad (cnn_ext.conv2d_backward_input): direct depthwise kernels (conv_depthwise.h), Winograd F(2x2, 3x3) or
// F(4x4, 3x3) on dY with the kernel flipped (winograd.h), dcol = Wᵀ·dY with col2im as row adds, the fprop machinery on
// dY's flipped windows (implicit), Wᵀ·dY panels with col2im (explicit), or the batch-in-lanes kernels; dispatch.cpp
// chooses.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <memory>
#include <type_traits>
#include <vector>

#include "conv2d_lanes.h"
#include "conv_common.h"
#include "conv_depthwise.h"
#include "dispatch.h"
#include "isa.h"
#include "output_cache.h"
#include "winograd.h"

namespace cnn_ext::cpu {
namespace {

// ---------------------------------------------------------------------------------------------------------------
// dgrad, stride 1 with enough channels: one item = (image, group, chunk of dX rows), an implicit-im2col product
// A_g[Cg × KgRS] · windows of dY, where A_g[c][(k, r, s)] = W[g*Kg + k][c][r][s] and the windows' taps are
// mirrored (Window, flip = true).
// ---------------------------------------------------------------------------------------------------------------
template <typename T>
void conv2d_backward_input_implicit(const Conv& cv, const T* dy, const T* w, T* dx) {
  const ImplicitSplit split = dgrad_split(cv, sizeof(T));
  const Window win(cv, true, split.rows);
  const MicroKernel<T> uk = pick_micro_kernel<T>(ceil_div(cv.cg, split.m_parts), win.rows_per_item * win.cols);
  // A 1x1 kernel's A_g = W_g^T, element (c, k) at w[(g*Kg + k)*Cg + c], is read in place. Otherwise A_g is packed
  // straight from W, read in memory order (a row of W, (g, k), goes to one slice of every panel) and spread across
  // the threads: batch 1 with many channels packs megabytes per call. Every element is written, so the buffer
  // (scratch.h) needs no zeroing.
  CallScratch scratch;
  MatrixA<T> a{w, MatrixA<T>::kColumns, cv.cg};
  int64_t a_panel = cv.kg * cv.cg;
  if (cv.rs != 1) {
    const int mr = uk.mr;
    const int64_t a_k = cv.kg * cv.rs;
    a_panel = packed_a_size(cv.cg, a_k, mr);
    T* const a_packed = scratch.whole<T>(cv.groups * a_panel);
    a = {a_packed, MatrixA<T>::kPacked, 0};
#pragma omp parallel for num_threads(num_threads()) schedule(static)
    for (int64_t gk = 0; gk < cv.groups * cv.kg; ++gk) {
      const int64_t g = gk / cv.kg, kk = gk % cv.kg;
      const T* src = w + gk * cv.crs;
      for (int64_t c0 = 0; c0 < cv.cg; c0 += mr) {
        T* d = a_packed + g * a_panel + c0 * a_k + kk * cv.rs * mr;
        const int64_t rows = std::min<int64_t>(mr, cv.cg - c0);
        transpose(src + c0 * cv.rs, cv.rs, rows, cv.rs, d, mr);  // d[t*mr + i] = src[(c0 + i)*RS + t]
        for (int64_t t = 0; t < cv.rs; ++t) std::fill(d + t * mr + rows, d + (t + 1) * mr, T(0));
      }
    }
  }
  run_implicit_items(
      cv, win, uk, cv.cg, split.m_parts, a, a_panel,
      [&](int64_t img, int64_t g) { return dy + (img * cv.k + g * cv.kg) * cv.pq; },
      [&](int64_t img, int64_t g) { return dx + (img * cv.c + g * cv.cg) * cv.hw; },
      static_cast<const T*>(nullptr), scratch);
}

// The A operand of the col2im forms (explicit and dcol) for input channels [c0, ...) of group g: W_g^T read in
// place (gemm_a_in_place), element (i, k) = w[(g*Kg + k)*CgRS + c0*RS + i].
template <typename T>
const T* transposed_weights(const Conv& cv, const T* w, int64_t g, int64_t c0) {
  return w + g * cv.kg * cv.crs + c0 * cv.rs;
}

// ---------------------------------------------------------------------------------------------------------------
// dgrad otherwise: one item = (image, group, chunk of input channels), so col2im of different items never touches
// the same dX plane. Inside an item the output positions are walked in chunks that keep dcol within budget.
// ---------------------------------------------------------------------------------------------------------------
template <typename T>
void conv2d_backward_input_explicit(const Conv& cv, const T* dy, const T* w, T* dx) {
  const int threads = num_threads();
  const int64_t channel_chunks = std::min(cv.cg, ceil_div(2 * threads, cv.n * cv.groups));
  const int64_t cc = ceil_div(cv.cg, channel_chunks);  // channels per item
  const int64_t rows = cc * cv.rs;                      // GEMM M for a full chunk
  int64_t width = std::max<int64_t>(64, kScratchBytes / std::max<int64_t>(1, rows * sizeof(T)));
  const MicroKernel<T> uk = pick_micro_kernel<T>(rows, std::min(width, cv.pq));
  width = std::min(cv.pq, ceil_div(width, uk.nr) * uk.nr);
  const std::vector<int64_t> dy_rows = row_offsets(cv.kg, cv.pq);


  const int64_t items = cv.n * cv.groups * channel_chunks;
  CallScratch scratch;
  const auto dcols = scratch.per_thread<T>(threads, rows * width);  // scratch.h; every element written by the GEMM
#pragma omp parallel num_threads(threads)
  {
    T* const dcol = dcols.get();
#pragma omp for schedule(dynamic)
    for (int64_t item = 0; item < items; ++item) {
      const int64_t img = item / (cv.groups * channel_chunks), g = item / channel_chunks % cv.groups;
      const int64_t ci = item % channel_chunks;
      const int64_t c0 = ci * cc, c1 = std::min(cv.cg, c0 + cc);
      if (c0 >= c1) continue;
      const T* a = transposed_weights(cv, w, g, c0);
      const T* dyg = dy + (img * cv.k + g * cv.kg) * cv.pq;
      T* dxc = dx + (img * cv.c + g * cv.cg + c0) * cv.hw;
      std::fill_n(dxc, (c1 - c0) * cv.hw, T(0));
      for (int64_t pq0 = 0; pq0 < cv.pq; pq0 += width) {
        const int64_t pq1 = std::min(cv.pq, pq0 + width);
        gemm_a_in_place(uk, (c1 - c0) * cv.rs, pq1 - pq0, cv.kg, a, cv.crs, dyg + pq0, dy_rows.data(), dcol,
                        pq1 - pq0, false);
        col2im(cv, dcol, c1 - c0, pq0, pq1, dxc);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// dgrad, stride 1, when the implicit product would waste most of its columns (valid convolutions on small images:
// its dX windows are W + (S-1)*dil wide but dY only Q): dcol = W_g^T · dY_g, a GEMM with no wasted columns that
// reads dY in place (one image) or its rows gathered (several: their planes side by side, so that planes of a few
// values still fill the GEMM's column tiles; interleaved where their rows are short, see DcolPlan), then col2im
// into a zero-padded dX plane (Hp × Wp = (H + 2*ph) × (W + 2*pw)), where every (c, r, s) row of dcol adds its P rows
// of Q values at plane offset r*dh*Wp + s*dw: P contiguous vector adds. One item = (block of images, group, chunk
// of input channels): items write disjoint dX planes, in a fixed order.
// ---------------------------------------------------------------------------------------------------------------

// dst[i*dst_stride + j] += src[i*src_stride + j] for i < rows, j < len. Compiled per ISA (PerIsa).
template <typename T>
inline __attribute__((always_inline)) void add_rows_body(T* __restrict dst, int64_t dst_stride,
                                                         const T* __restrict src, int64_t src_stride, int64_t rows,
                                                         int64_t len) {
  for (int64_t i = 0; i < rows; ++i) {
    T* __restrict d = dst + i * dst_stride;
    const T* __restrict s = src + i * src_stride;
    for (int64_t j = 0; j < len; ++j) d[j] += s[j];
  }
}

template <typename T>
void conv2d_backward_input_dcol(const Conv& cv, const T* dy, const T* w, T* dx) {
  const DcolPlan d = dcol_plan(cv, sizeof(T));
  const int64_t rows = d.cc * cv.rs;  // GEMM M for a full chunk
  const int64_t ld = d.images * cv.pq;  // columns of a full item: its images' dY planes side by side
  const MicroKernel<T> uk = pick_micro_kernel<T>(rows, ld);
  const std::vector<int64_t> dy_rows = row_offsets(cv.kg, ld);
  const bool padded = cv.pad_h != 0 || cv.pad_w != 0;  // dX planes are the padded planes unless there is no padding
  const auto add_rows = PerIsa<&add_rows_body<T>>::pick();
  // col2im of one input channel's dcol rows (the R·S rows from `rows`, this image's columns from `col`) into its
  // zero-padded plane at acc, whose positions hold `lanes` interleaved values each (1, or the images of an
  // interleaved item): every tap adds P runs of Q*lanes values, taps in (r, s) order.
  const auto col2im_channel = [&](const T* rows, int64_t col, int64_t lanes, T* acc) {
    std::fill_n(acc, d.hp * d.wp * lanes, T(0));
    for (int64_t r = 0; r < cv.r; ++r) {
      for (int64_t s = 0; s < cv.s; ++s) {
        add_rows(acc + (r * cv.dil_h * d.wp + s * cv.dil_w) * lanes, d.wp * lanes, rows + (r * cv.s + s) * ld + col,
                 cv.q * lanes, cv.p, cv.q * lanes);
      }
    }
  };
  // A dX plane from col2im's sums on its zero-padded plane (Hp × Wp).
  const auto unpad = [&](const T* sums, T* plane) {
    for (int64_t y = 0; y < cv.h; ++y) copy_row(plane + y * cv.w, sums + (y + cv.pad_h) * d.wp + cv.pad_w, cv.w);
  };

  const int64_t image_blocks = ceil_div(cv.n, d.images);
  const int64_t items = image_blocks * cv.groups * d.channel_chunks;
  const int threads = num_threads();
  // Scratch (scratch.h): dY's rows gathered (every element read is written), dcol written by the GEMM, the padded
  // plane(s) zeroed per channel below, and (several images, padded) their planes transposed back.
  CallScratch scratch;
  const int64_t padded_plane = d.hp * d.wp;
  const auto dybs = scratch.per_thread<T>(threads, d.images > 1 ? cv.kg * ld : 0);
  const auto dcols = scratch.per_thread<T>(threads, rows * ld);
  const auto dxps = scratch.per_thread<T>(threads, d.interleaved ? d.images * padded_plane : padded ? padded_plane : 0);
  const auto backs = scratch.per_thread<T>(threads, d.interleaved && padded ? d.images * padded_plane : 0);
#pragma omp parallel num_threads(threads)
  {
    T* const dyb = dybs.get();
    T* const dcol = dcols.get();
    T* const dxp = dxps.get();
    T* const back = backs.get();
#pragma omp for schedule(dynamic)
    for (int64_t item = 0; item < items; ++item) {
      const int64_t block = item / (cv.groups * d.channel_chunks), g = item / d.channel_chunks % cv.groups;
      const int64_t ci = item % d.channel_chunks;
      const int64_t c0 = ci * d.cc, c1 = std::min(cv.cg, c0 + d.cc);
      const int64_t img0 = block * d.images, images = std::min(d.images, cv.n - img0);
      if (c0 >= c1) continue;
      // B: row k holds channel g*Kg + k of each image's dY, one plane after another (read in place for one
      // image), or interleaved (DcolPlan): position p of image i at column p*images + i.
      const T* b = dy + (img0 * cv.k + g * cv.kg) * cv.pq;
      if (d.images > 1) {
        for (int64_t k = 0; k < cv.kg; ++k) {
          const T* row = dy + (img0 * cv.k + g * cv.kg + k) * cv.pq;
          if (d.interleaved) {
            transpose(row, cv.k * cv.pq, images, cv.pq, dyb + k * ld, images);
            continue;
          }
          for (int64_t i = 0; i < images; ++i) copy_row(dyb + k * ld + i * cv.pq, row + i * cv.k * cv.pq, cv.pq);
        }
        b = dyb;
      }
      gemm_a_in_place(uk, (c1 - c0) * cv.rs, images * cv.pq, cv.kg, transposed_weights(cv, w, g, c0), cv.crs, b,
                      dy_rows.data(), dcol, ld, false);
      if (d.interleaved) {
        // col2im into the images' padded planes, interleaved as dcol's columns are (plane position x of image i at
        // x*images + i), then transposed back into dX (through `back` where the planes are padded).
        for (int64_t c = c0; c < c1; ++c) {
          col2im_channel(dcol + (c - c0) * cv.rs * ld, 0, images, dxp);
          T* const planes = dx + (img0 * cv.c + g * cv.cg + c) * cv.hw;  // image i's at planes + i*C*H*W
          if (!padded) {
            transpose(dxp, images, cv.hw, images, planes, cv.c * cv.hw);
            continue;
          }
          transpose(dxp, images, padded_plane, images, back, padded_plane);
          for (int64_t i = 0; i < images; ++i) unpad(back + i * padded_plane, planes + i * cv.c * cv.hw);
        }
        continue;
      }
      for (int64_t i = 0; i < images; ++i) {
        for (int64_t c = c0; c < c1; ++c) {
          T* plane = dx + ((img0 + i) * cv.c + g * cv.cg + c) * cv.hw;
          T* acc = padded ? dxp : plane;
          col2im_channel(dcol + (c - c0) * cv.rs * ld, i * cv.pq, 1, acc);
          if (padded) unpad(acc, plane);
        }
      }
    }
  }
}

template <typename T>
void conv2d_backward_input(const ConvShape<int64_t>& shape, Dgrad algorithm, const T* dy, const T* w, T* dx) {
  const Conv cv(shape);
  switch (algorithm) {
    case Dgrad::kLanes:
      if constexpr (std::is_same_v<T, float>) return lanes::conv2d_backward_input(shape, dy, w, dx);
      break;
    case Dgrad::kDepthwise:
      return depthwise_backward_input(cv, dy, w, dx);
    case Dgrad::kWinograd4x4:
    case Dgrad::kWinograd:  // the fprop of dY with the kernel flipped and transposed, padded by 2 - pad
      return winograd_3x3(Winograd3x3{cv.n, cv.groups, cv.kg, cv.cg, cv.p, cv.q, cv.h, cv.w, 2 - cv.pad_h,
                                      2 - cv.pad_w},
                          algorithm == Dgrad::kWinograd4x4 ? 4 : 2, dy, w, true, static_cast<const T*>(nullptr), dx);
    case Dgrad::kDcol:
      return conv2d_backward_input_dcol(cv, dy, w, dx);
    case Dgrad::kImplicit:
      return conv2d_backward_input_implicit(cv, dy, w, dx);
    case Dgrad::kExplicit:
      return conv2d_backward_input_explicit(cv, dy, w, dx);
  }
  TORCH_INTERNAL_ASSERT(false, "cnn_ext.conv2d_backward_input: no CPU dgrad ", static_cast<int>(algorithm),
                        " for this dtype");
}

at::Tensor conv2d_backward_input_cpu(const at::Tensor& grad_output, const at::Tensor& weight,
                                     c10::IntArrayRef input_size, c10::IntArrayRef stride, c10::IntArrayRef padding,
                                     c10::IntArrayRef dilation, int64_t groups) {
  constexpr const char* op = "cnn_ext.conv2d_backward_input";
  const auto shape = check_conv2d_backward_input<int64_t>(op, grad_output, weight, input_size, stride, padding,
                                                          dilation, groups);
  check_backend_dtype(op, grad_output, "grad_output", {at::kFloat, at::kDouble}, "CPU");
  at::Tensor grad_input = empty_output(shape.input_sizes(), grad_output.options());
  if (grad_input.numel() == 0) return grad_input;
  if (grad_output.numel() == 0) return grad_input.zero_();  // no output channels: nothing flows back
  const at::Tensor dy = grad_output.contiguous(), w = weight.contiguous();
  const Dgrad algorithm = choose_dgrad(shape, grad_output.scalar_type());
  AT_DISPATCH_FLOATING_TYPES(grad_output.scalar_type(), "cnn_ext_conv2d_backward_input_cpu", [&] {
    conv2d_backward_input<scalar_t>(shape, algorithm, dy.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(),
                                    grad_input.mutable_data_ptr<scalar_t>());
  });
  return grad_input;
}

}  // namespace

TORCH_LIBRARY_IMPL(cnn_ext, CPU, m) {
  m.impl("conv2d_backward_input", &conv2d_backward_input_cpu);
}

}  // namespace cnn_ext::cpu
