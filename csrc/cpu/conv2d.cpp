// CPU kernels for cnn_ext.conv2d and its backward ops, as GEMMs (gemm.h), parallelised with OpenMP. float32
// convolutions that conv2d_lanes.h's suits() accepts (small ones, 16+ images, AVX-512) go to the batch-in-lanes
// kernels instead; the entry points at the end of this file choose.
//
// Names follow checks.h (CUTLASS): input N×C×H×W, weight K×(C/G)×R×S, output N×K×P×Q, G groups; per group
// Cg = C/G input and Kg = K/G output channels. "col" is the im2col matrix of one image and group: row (c, r, s),
// column (p, q), value input[c][p*stride_h - pad_h + r*dil_h][q*stride_w - pad_w + s*dil_w] (0 in the padding).
//
//   fprop  Y_g[Kg × PQ]     = W_g[Kg × CgRS] · col[CgRS × PQ]          (+ bias)
//   dgrad  dX_g             = the fprop of dY with the kernel flipped and transposed (stride 1), or
//          dcol[CgRS × PQ]  = W_g^T · dY_g[Kg × PQ], then col2im scatter-adds dcol into dX (otherwise)
//   wgrad  dW_g[Kg × CgRS] += dY_g[Kg × PQ] · col^T, summed over images
//
// Stride-1 convolutions (the common case) never build col ("implicit im2col"). The input planes are copied once
// into a zero-padded window W + 2*pad_w wide; then col row (c, r, s) is simply window plane c read from offset
// r*dil_h*width + s*dil_w, if output (p, q) is stored at column p*width + q. The GEMM reads its B rows in place
// through that per-row offset table, computing width - Q wasted columns per output row that are dropped when
// the result is copied out. For small images im2col costs more than the GEMM itself, and the window copy is
// RS times smaller. dgrad is the same product on the zero-padded dY with flipped taps, so it needs no col2im
// either (used when Cg fills the GEMM's row tiles; tiny Cg such as a 1-channel input keeps the dcol form, whose
// GEMM has Cg*RS rows). When the implicit dgrad would waste most of its columns (valid convolutions on small
// images: dX windows W + (S-1)*dil wide for Q-wide dY rows), dgrad is dcol = W_g^T · dY_g read in place, with
// col2im as contiguous row adds into a padded dX plane. wgrad reduces along the output positions of both dY and
// the shifted windows; with few output channels (or a 1×1 kernel) it uses the dot-tile kernel on the same windows,
// with dY copied to the window layout and zeros in the wasted columns. Otherwise (strided, or many output
// channels) the convolutions use explicit im2col, and wgrad gathers col^T rows from a channels-last copy of the
// input, where one kernel tap's channels (and, for dilation 1, a whole kernel row's) are one contiguous run.
//
// The fused conv2d_maxpool_relu runs the fprop a chunk of pooled output rows at a time into item scratch and
// pools + ReLUs from there (see its section below), so the convolution's output is never stored.
//
// Parallelism and determinism: fprop and dgrad split the work into independent items (image × group × row or
// channel chunk) that write disjoint outputs, so any schedule gives the same bits. wgrad splits its reduction
// axis (images and output rows) into one fixed range per thread, each summed into its own partial weight
// gradient; the partials are then added in thread order. The result therefore depends only on the thread count.
// No atomics anywhere.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include "../checks.h"
#include "../composite.h"
#include "conv2d_lanes.h"
#include "gemm.h"
#include "window_axis.h"

namespace cnn_ext {
namespace {

using cpu::gemm;
using cpu::MicroKernel;
using cpu::pack_a;
using cpu::packed_a_size;
using cpu::pick_micro_kernel;
using cpu::row_offsets;
using cpu::WindowAxis;

// Scratch (im2col and friends) per work item is kept to about this size so it stays in the 2 MiB L2 alongside
// the packed weights.
constexpr int64_t kScratchBytes = 512 * 1024;
// wgrad's dot tiles end with horizontal sums, so it batches more segments per tile: each batch of windows is
// re-read once per tile of output channels, so it should still fit in L2.
constexpr int64_t kWgradScratchBytes = 1536 * 1024;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Smallest i >= 0 with i*step + offset >= bound (step > 0): the first output index whose input index reaches
// `bound`. Used to find the output positions whose input lies inside [0, size).
int64_t first_reaching(int64_t bound, int64_t offset, int64_t step) {
  const int64_t d = bound - offset;
  return d <= 0 ? 0 : ceil_div(d, step);
}

// Per-group sizes and hyper-parameters of one convolution.
struct Conv {
  int64_t n, c, h, w, k, r, s, p, q, groups;
  int64_t sh, sw, ph, pw, dh, dw;
  int64_t cg, kg;  // channels per group
  int64_t rs, crs, hw, pq;

  explicit Conv(const ConvShape<int64_t>& x)
      : n(x.n), c(x.c), h(x.h), w(x.w), k(x.k), r(x.r), s(x.s), p(x.p), q(x.q), groups(x.groups),
        sh(x.stride_h), sw(x.stride_w), ph(x.pad_h), pw(x.pad_w), dh(x.dil_h), dw(x.dil_w),
        cg(x.c / x.groups), kg(x.k / x.groups), rs(x.r * x.s), crs(cg * x.r * x.s), hw(x.h * x.w),
        pq(x.p * x.q) {}

  bool unit_stride() const { return sh == 1 && sw == 1; }
};

int num_threads() { return at::get_num_threads(); }

// Calls fn(q_begin, q_end, row, first, last) for each output row met by the flattened output positions
// [pq0, pq1) when sampling input rows with kernel tap (r, s): `row` is the input row (nullptr in the padding)
// offset so that row[q*sw] is the input element of output column q, and [first, last) the columns whose input
// lies inside the image. Shared by im2col and col2im so both walk the exact same positions.
template <typename T, typename Fn>
void for_each_output_row(const Conv& cv, T* plane, int64_t r, int64_t s, int64_t pq0, int64_t pq1, Fn&& fn) {
  const int64_t w_off = s * cv.dw - cv.pw;
  const int64_t q_first = first_reaching(0, w_off, cv.sw);
  const int64_t q_last = first_reaching(cv.w, w_off, cv.sw);
  int64_t out_p = pq0 / cv.q;
  int64_t qa = pq0 - out_p * cv.q;
  for (int64_t pos = pq0; pos < pq1; ++out_p, qa = 0) {
    const int64_t qb = std::min(cv.q, qa + (pq1 - pos));
    const int64_t in_h = out_p * cv.sh - cv.ph + r * cv.dh;
    if (in_h < 0 || in_h >= cv.h) {
      fn(qa, qb, static_cast<T*>(nullptr), qa, qa);
    } else {
      const int64_t first = std::clamp(q_first, qa, qb);
      const int64_t last = std::clamp(q_last, first, qb);
      fn(qa, qb, plane + in_h * cv.w + w_off, first, last);
    }
    pos += qb - qa;
  }
}

// Copies n elements. Short runs (the common case: one output row, a few channels or one kernel row) are moved as
// one 64-byte block when the source allows it; the bytes past n land on elements the caller writes later (it
// fills its buffer strictly left to right) or in 64 bytes of slack after the buffer. A libc memmove call per
// run would cost more than the copy. An empty run's src may point outside the source (a window wholly in the
// padding), so it reads nothing.
template <typename T>
inline T* copy_run(T* dst, const T* src, int64_t n, const T* src_end) {
  constexpr int64_t kBlock = 64 / sizeof(T);
  if (n <= 0) return dst;
  if (n <= kBlock && src + kBlock <= src_end) {
    std::memcpy(dst, src, 64);
  } else {
    std::copy_n(src, n, dst);
  }
  return dst + n;
}

// col[(c*R + r)*S + s][i] for output positions pq0 + i, i < pq1 - pq0, from the Cg planes at x (ending at
// x_end); rows ld elements apart. col needs 64 bytes of slack after its last row (see copy_run).
template <typename T>
void im2col(const Conv& cv, const T* x, const T* x_end, int64_t pq0, int64_t pq1, int64_t ld, T* col) {
  for (int64_t c = 0; c < cv.cg; ++c) {
    for (int64_t r = 0; r < cv.r; ++r) {
      for (int64_t s = 0; s < cv.s; ++s) {
        T* dst = col + ((c * cv.r + r) * cv.s + s) * ld;
        for_each_output_row(cv, x + c * cv.hw, r, s, pq0, pq1,
                            [&](int64_t qa, int64_t qb, const T* row, int64_t first, int64_t last) {
                              T* d = dst - qa;  // d[q] is output column q of this output row
                              dst += qb - qa;
                              if (row == nullptr) {
                                std::fill(d + qa, d + qb, T(0));
                                return;
                              }
                              std::fill(d + qa, d + first, T(0));
                              if (cv.sw == 1) {
                                copy_run(d + first, row + first, last - first, x_end);
                              } else {
                                for (int64_t j = first; j < last; ++j) d[j] = row[j * cv.sw];
                              }
                              std::fill(d + last, d + qb, T(0));
                            });
      }
    }
  }
}

// The adjoint of im2col: dx[c][...] += dcol[(c*R + r)*S + s][i] over every tap, for channels [0, channels).
template <typename T>
void col2im(const Conv& cv, const T* dcol, int64_t channels, int64_t pq0, int64_t pq1, T* dx) {
  const int64_t width = pq1 - pq0;
  for (int64_t c = 0; c < channels; ++c) {
    for (int64_t r = 0; r < cv.r; ++r) {
      for (int64_t s = 0; s < cv.s; ++s) {
        const T* src = dcol + ((c * cv.r + r) * cv.s + s) * width;
        for_each_output_row(cv, dx + c * cv.hw, r, s, pq0, pq1,
                            [&](int64_t qa, int64_t qb, T* row, int64_t first, int64_t last) {
                              const T* g = src - qa;
                              src += qb - qa;
                              if (row == nullptr) return;  // these taps fell in the padding
                              if (cv.sw == 1) {
                                for (int64_t j = first; j < last; ++j) row[j] += g[j];
                              } else {
                                for (int64_t j = first; j < last; ++j) row[j * cv.sw] += g[j];
                              }
                            });
      }
    }
  }
}

// colT[i][(r*S + s)*Cg + c] for output positions pq0 + i, from the channels-last image xn (H×W×C) and group g.
// Rows ld elements apart; colT needs 64 bytes of slack after its last row (see copy_run).
template <typename T>
void gather_col_t(const Conv& cv, const T* xn, int64_t g, int64_t pq0, int64_t pq1, int64_t ld, T* col_t) {
  const T* xn_end = xn + cv.hw * cv.c;
  const bool rows_contiguous = cv.dw == 1 && cv.cg == cv.c;  // a kernel row's taps are one run of S*C values
  int64_t out_p = pq0 / cv.q, out_q = pq0 % cv.q;
  for (int64_t i = 0; i < pq1 - pq0; ++i) {
    T* d = col_t + i * ld;
    const int64_t w_off = out_q * cv.sw - cv.pw;
    const int64_t s_first = std::min(cv.s, first_reaching(0, w_off, cv.dw));
    const int64_t s_last = std::clamp(first_reaching(cv.w, w_off, cv.dw), s_first, cv.s);
    for (int64_t r = 0; r < cv.r; ++r) {
      const int64_t in_h = out_p * cv.sh - cv.ph + r * cv.dh;
      if (in_h < 0 || in_h >= cv.h) {
        d = std::fill_n(d, cv.s * cv.cg, T(0));
        continue;
      }
      const T* row = xn + (in_h * cv.w + w_off) * cv.c + g * cv.cg;  // row[s*dw*C + c] is tap s, channel c
      d = std::fill_n(d, s_first * cv.cg, T(0));
      if (rows_contiguous) {
        d = copy_run(d, row + s_first * cv.c, (s_last - s_first) * cv.c, xn_end);
      } else {
        for (int64_t s = s_first; s < s_last; ++s) d = copy_run(d, row + s * cv.dw * cv.c, cv.cg, xn_end);
      }
      d = std::fill_n(d, (cv.s - s_last) * cv.cg, T(0));
    }
    if (++out_q == cv.q) {
      out_q = 0;
      ++out_p;
    }
  }
}

// Copies n elements with fixed-size (hence inlined) block moves, overlapping to cover any n: the rows copied into
// windows are short (one image row), and a libc memmove call per row would cost more than the copy itself.
template <typename T>
inline void copy_row(T* dst, const T* src, int64_t n) {
  char* d = reinterpret_cast<char*>(dst);
  const char* s = reinterpret_cast<const char*>(src);
  const int64_t bytes = n * static_cast<int64_t>(sizeof(T));
  if (bytes >= 64) {
    for (int64_t i = 0; i + 64 < bytes; i += 64) std::memcpy(d + i, s + i, 64);
    std::memcpy(d + bytes - 64, s + bytes - 64, 64);
  } else if (bytes >= 32) {
    std::memcpy(d, s, 32);
    std::memcpy(d + bytes - 32, s + bytes - 32, 32);
  } else if (bytes >= 16) {
    std::memcpy(d, s, 16);
    std::memcpy(d + bytes - 16, s + bytes - 16, 16);
  } else if (bytes >= 8) {
    std::memcpy(d, s, 8);
    std::memcpy(d + bytes - 8, s + bytes - 8, 8);
  } else if (bytes >= 4) {
    std::memcpy(d, s, 4);
  }
}

// dst[a][b] = src[a - top][b - left] for a < rows, b < cols; 0 where that falls outside the h × w plane src.
template <typename T>
void copy_window(const T* src, int64_t h, int64_t w, int64_t top, int64_t left, int64_t rows, int64_t cols,
                 T* dst) {
  const int64_t b0 = std::clamp<int64_t>(left, 0, cols), b1 = std::clamp<int64_t>(left + w, b0, cols);
  for (int64_t a = 0; a < rows; ++a, dst += cols) {
    const int64_t sa = a - top;
    if (sa < 0 || sa >= h) {
      std::fill_n(dst, cols, T(0));
      continue;
    }
    for (int64_t b = 0; b < b0; ++b) dst[b] = T(0);
    copy_row(dst + b0, src + sa * w + b0 - left, b1 - b0);
    for (int64_t b = b1; b < cols; ++b) dst[b] = T(0);
  }
}

// Implicit im2col of a stride-1 product (see the top of the file): an item covers output rows [y0, y1) of an
// out_h × out_w plane and copies `channels` source planes (src_h × src_w) into windows of rows_per_item + halo
// rows × `cols` columns, `plane` elements apart; output (y, x) is GEMM column (y - y0)*cols + x.
struct Window {
  int64_t channels, src_h, src_w, out_h, out_w;
  int64_t top, left;  // window row 0 (for y0 = 0) and column 0 sit at source row -top and column -left
  int64_t cols, halo, rows_per_item, plane;
  std::vector<int64_t> taps;  // GEMM B row (channel, r, s) starts taps[(channel*R + r)*S + s] into the window

  // fprop/wgrad (flip = false): windows of the input, padded by (pad_h, pad_w). dgrad (flip = true): windows of
  // dY padded by (R-1)*dil - pad, with the taps mirrored: dX[h][w] sums dY[h + pad_h - r*dil_h][...].
  Window(const Conv& cv, bool flip, int64_t rows)
      : channels(flip ? cv.kg : cv.cg), src_h(flip ? cv.p : cv.h), src_w(flip ? cv.q : cv.w),
        out_h(flip ? cv.h : cv.p), out_w(flip ? cv.w : cv.q),
        top(flip ? (cv.r - 1) * cv.dh - cv.ph : cv.ph), left(flip ? (cv.s - 1) * cv.dw - cv.pw : cv.pw),
        cols(out_w + (cv.s - 1) * cv.dw), halo((cv.r - 1) * cv.dh), rows_per_item(rows),
        plane((rows + halo) * cols), taps(channels * cv.rs) {
    for (int64_t ch = 0; ch < channels; ++ch) {
      for (int64_t r = 0; r < cv.r; ++r) {
        for (int64_t s = 0; s < cv.s; ++s) {
          const int64_t rr = flip ? cv.r - 1 - r : r, ss = flip ? cv.s - 1 - s : s;
          taps[(ch * cv.r + r) * cv.s + s] = ch * plane + rr * cv.dh * cols + ss * cv.dw;
        }
      }
    }
  }

  // Elements after the last window that GEMM and dot-tile reads may reach (whole micro-kernel panels / vectors
  // past the last output column); kept zero.
  int64_t slack() const { return cols + 64; }
  int64_t buffer_size() const { return channels * plane + slack(); }
  int64_t items() const { return ceil_div(out_h, rows_per_item); }

  // Copies the windows of item `item` of the planes at src into dst; returns its rows [y0, y1).
  template <typename T>
  std::pair<int64_t, int64_t> fill(const T* src, int64_t item, T* dst) const {
    const int64_t y0 = item * rows_per_item, y1 = std::min(out_h, y0 + rows_per_item);
    fill_rows(src, y0, y1, dst);
    return {y0, y1};
  }

  // The windows for output rows [y0, y1) (at most rows_per_item of them).
  template <typename T>
  void fill_rows(const T* src, int64_t y0, int64_t y1, T* dst) const {
    for (int64_t ch = 0; ch < channels; ++ch) {
      copy_window(src + ch * src_h * src_w, src_h, src_w, top - y0, left, y1 - y0 + halo, cols, dst + ch * plane);
    }
  }
};

// Output rows per item for `units` independent (image, group) units: split the rows into enough items to keep
// every thread busy, and keep each item's windows within the scratch budget.
int64_t rows_per_item(const Conv& cv, bool flip, int64_t units, int64_t bytes_per_row) {
  const int64_t out_h = flip ? cv.h : cv.p;
  const int64_t halo = (cv.r - 1) * cv.dh;
  int64_t rows = ceil_div(out_h, ceil_div(2 * num_threads(), units));
  rows = std::min(rows, std::max<int64_t>(1, kScratchBytes / std::max<int64_t>(1, bytes_per_row) - halo));
  return std::max<int64_t>(1, rows);
}

// One fprop/dgrad item by implicit im2col: rows [y0, y1) of the M output planes at dst (out_h*out_w apart) =
// A · windows (+ bias[i] on plane i); `product` holds M × rows_per_item*cols.
template <typename T>
void implicit_conv_item(const Window& win, const MicroKernel<T>& uk, int64_t m, const T* a_packed, const T* src,
                        int64_t item, T* window, T* product, T* dst, const T* bias) {
  const auto [y0, y1] = win.fill(src, item, window);
  const int64_t ld = win.rows_per_item * win.cols;
  gemm(uk, m, (y1 - y0 - 1) * win.cols + win.out_w, static_cast<int64_t>(win.taps.size()), a_packed, window,
       win.taps.data(), product, ld, false, true);
  for (int64_t i = 0; i < m; ++i) {
    const T b = bias != nullptr ? bias[i] : T(0);
    for (int64_t y = y0; y < y1; ++y) {
      const T* from = product + i * ld + (y - y0) * win.cols;
      T* to = dst + (i * win.out_h + y) * win.out_w;
      for (int64_t x = 0; x < win.out_w; ++x) to[x] = from[x] + b;
    }
  }
}

// Every implicit item of a pass, (image, group, chunk of rows), across the threads, each with its own window and
// product buffers. Group g of image img reads src_of(img, g) and writes the m planes at dst_of(img, g), with
// a_packed + g*a_panel as its A operand and bias + g*m (if any) added.
template <typename T, typename SrcOf, typename DstOf>
void run_implicit_items(const Conv& cv, const Window& win, const MicroKernel<T>& uk, int64_t m, const T* a_packed,
                        int64_t a_panel, SrcOf src_of, DstOf dst_of, const T* bias) {
  const int64_t chunks = win.items(), items = cv.n * cv.groups * chunks;
#pragma omp parallel num_threads(num_threads())
  {
    std::vector<T> window(win.buffer_size()), product(m * win.rows_per_item * win.cols);
#pragma omp for schedule(dynamic)
    for (int64_t item = 0; item < items; ++item) {
      const int64_t img = item / (cv.groups * chunks), g = item / chunks % cv.groups;
      implicit_conv_item(win, uk, m, a_packed + g * a_panel, src_of(img, g), item % chunks, window.data(),
                         product.data(), dst_of(img, g), bias != nullptr ? bias + g * m : nullptr);
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// fprop: one item = (image, group, chunk of output rows) by implicit im2col for stride 1, (image, group, chunk of
// output positions) by explicit im2col otherwise.
// ---------------------------------------------------------------------------------------------------------------

// The packed weights, one panel per group: the A operand of every fprop item.
template <typename T>
std::vector<T> pack_weights(const Conv& cv, const T* w, int mr) {
  const int64_t panel = packed_a_size(cv.kg, cv.crs, mr);
  std::vector<T> packed(cv.groups * panel);
  for (int64_t g = 0; g < cv.groups; ++g) {
    pack_a(cv.kg, cv.crs, w + g * cv.kg * cv.crs, cv.crs, 1, mr, packed.data() + g * panel);
  }
  return packed;
}

template <typename T>
void conv2d_forward_implicit(const Conv& cv, const T* x, const T* w, const T* bias, T* y) {
  const Window win(cv, false, rows_per_item(cv, false, cv.n * cv.groups, cv.cg * (cv.w + 2 * cv.pw) * sizeof(T)));
  const MicroKernel<T> uk = pick_micro_kernel<T>(cv.kg, win.rows_per_item * win.cols);
  const std::vector<T> w_packed = pack_weights(cv, w, uk.mr);
  const int64_t w_panel = packed_a_size(cv.kg, cv.crs, uk.mr);
  run_implicit_items(
      cv, win, uk, cv.kg, w_packed.data(), w_panel,
      [&](int64_t img, int64_t g) { return x + (img * cv.c + g * cv.cg) * cv.hw; },
      [&](int64_t img, int64_t g) { return y + (img * cv.k + g * cv.kg) * cv.pq; }, bias);
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
  const std::vector<T> w_packed = pack_weights(cv, w, uk.mr);
  const int64_t w_panel = packed_a_size(cv.kg, cv.crs, uk.mr);
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
      gemm(uk, cv.kg, width, cv.crs, w_packed.data() + g * w_panel, col.data(), col_rows.data(), yg, cv.pq, false,
           true);
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
void conv2d_forward_impl(const Conv& cv, const T* x, const T* w, const T* bias, T* y) {
  if (cv.unit_stride()) {
    conv2d_forward_implicit(cv, x, w, bias, y);
  } else {
    conv2d_forward_explicit(cv, x, w, bias, y);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// dgrad, stride 1 with enough channels: one item = (image, group, chunk of dX rows), an implicit-im2col product
// A_g[Cg × KgRS] · windows of dY, where A_g[c][(k, r, s)] = W[g*Kg + k][c][r][s] and the windows' taps are
// mirrored (Window, flip = true).
// ---------------------------------------------------------------------------------------------------------------
template <typename T>
void conv2d_backward_input_implicit(const Conv& cv, const MicroKernel<T>& uk, const Window& win, const T* dy,
                                    const T* w, T* dx) {
  const int64_t a_panel = packed_a_size(cv.cg, cv.kg * cv.rs, uk.mr);
  std::vector<T> a_packed(cv.groups * a_panel);
  {
    std::vector<T> wt(cv.cg * cv.kg * cv.rs);  // W_g transposed to [c][k][r][s]
    for (int64_t g = 0; g < cv.groups; ++g) {
      for (int64_t c = 0; c < cv.cg; ++c) {
        for (int64_t kk = 0; kk < cv.kg; ++kk) {
          std::copy_n(w + ((g * cv.kg + kk) * cv.cg + c) * cv.rs, cv.rs, wt.data() + (c * cv.kg + kk) * cv.rs);
        }
      }
      pack_a(cv.cg, cv.kg * cv.rs, wt.data(), cv.kg * cv.rs, int64_t(1), uk.mr, a_packed.data() + g * a_panel);
    }
  }
  run_implicit_items(
      cv, win, uk, cv.cg, a_packed.data(), a_panel,
      [&](int64_t img, int64_t g) { return dy + (img * cv.k + g * cv.kg) * cv.pq; },
      [&](int64_t img, int64_t g) { return dx + (img * cv.c + g * cv.cg) * cv.hw; },
      static_cast<const T*>(nullptr));
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

  // A = W_g^T restricted to the chunk's rows: element (i, k) at w[(g*Kg + k)*CgRS + c0*RS + i].
  const int64_t a_panel = packed_a_size(rows, cv.kg, uk.mr);
  std::vector<T> a_packed(cv.groups * channel_chunks * a_panel);
  for (int64_t g = 0; g < cv.groups; ++g) {
    for (int64_t ci = 0; ci < channel_chunks; ++ci) {
      const int64_t c0 = ci * cc, c1 = std::min(cv.cg, c0 + cc);
      if (c0 >= c1) continue;
      pack_a((c1 - c0) * cv.rs, cv.kg, w + g * cv.kg * cv.crs + c0 * cv.rs, int64_t(1), cv.crs, uk.mr,
             a_packed.data() + (g * channel_chunks + ci) * a_panel);
    }
  }

  const int64_t items = cv.n * cv.groups * channel_chunks;
#pragma omp parallel num_threads(threads)
  {
    std::vector<T> dcol(rows * width);
#pragma omp for schedule(dynamic)
    for (int64_t item = 0; item < items; ++item) {
      const int64_t img = item / (cv.groups * channel_chunks), g = item / channel_chunks % cv.groups;
      const int64_t ci = item % channel_chunks;
      const int64_t c0 = ci * cc, c1 = std::min(cv.cg, c0 + cc);
      if (c0 >= c1) continue;
      const T* a = a_packed.data() + (g * channel_chunks + ci) * a_panel;
      const T* dyg = dy + (img * cv.k + g * cv.kg) * cv.pq;
      T* dxc = dx + (img * cv.c + g * cv.cg + c0) * cv.hw;
      std::fill_n(dxc, (c1 - c0) * cv.hw, T(0));
      for (int64_t pq0 = 0; pq0 < cv.pq; pq0 += width) {
        const int64_t pq1 = std::min(cv.pq, pq0 + width);
        gemm(uk, (c1 - c0) * cv.rs, pq1 - pq0, cv.kg, a, dyg + pq0, dy_rows.data(), dcol.data(), pq1 - pq0, false);
        col2im(cv, dcol.data(), c1 - c0, pq0, pq1, dxc);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// dgrad, stride 1, when the implicit product would waste most of its columns (valid convolutions on small images:
// its dX windows are W + (S-1)*dil wide but dY only Q): dcol = W_g^T · dY_g, a GEMM with no wasted columns that
// reads dY in place, then col2im into a zero-padded dX plane (Hp × Wp = (H + 2*ph) × (W + 2*pw)), where every
// (c, r, s) row of dcol adds its P rows of Q values at plane offset r*dh*Wp + s*dw: P contiguous vector adds.
// One item = (image, group, chunk of input channels): items write disjoint dX planes, in a fixed order.
// ---------------------------------------------------------------------------------------------------------------

// dst[i*dst_stride + j] += src[i*src_stride + j] for i < rows, j < len. Compiled per ISA (see gemm.h).
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
using AddRowsFn = void (*)(T*, int64_t, const T*, int64_t, int64_t, int64_t);

#if defined(__x86_64__) || defined(__i386__)
template <typename T>
__attribute__((target("avx512f,avx512vl"))) void add_rows_avx512(T* dst, int64_t dst_stride, const T* src,
                                                                 int64_t src_stride, int64_t rows, int64_t len) {
  add_rows_body<T>(dst, dst_stride, src, src_stride, rows, len);
}
template <typename T>
__attribute__((target("avx2"))) void add_rows_avx2(T* dst, int64_t dst_stride, const T* src, int64_t src_stride,
                                                   int64_t rows, int64_t len) {
  add_rows_body<T>(dst, dst_stride, src, src_stride, rows, len);
}
#endif
template <typename T>
void add_rows_baseline(T* dst, int64_t dst_stride, const T* src, int64_t src_stride, int64_t rows, int64_t len) {
  add_rows_body<T>(dst, dst_stride, src, src_stride, rows, len);
}

template <typename T>
AddRowsFn<T> add_rows_kernel() {
#if defined(__x86_64__) || defined(__i386__)
  static const AddRowsFn<T> fn = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl")
                                     ? &add_rows_avx512<T>
                                 : __builtin_cpu_supports("avx2") ? &add_rows_avx2<T>
                                                                  : &add_rows_baseline<T>;
  return fn;
#else
  return &add_rows_baseline<T>;
#endif
}

struct DcolPlan {
  int64_t wp, hp, cc, channel_chunks;
};

DcolPlan dcol_plan(const Conv& cv) {
  DcolPlan d{};
  d.wp = cv.w + 2 * cv.pw;
  d.hp = cv.h + 2 * cv.ph;
  d.channel_chunks = std::min(cv.cg, ceil_div(2 * num_threads(), cv.n * cv.groups));
  d.cc = ceil_div(cv.cg, d.channel_chunks);
  return d;
}

template <typename T>
void conv2d_backward_input_dcol(const Conv& cv, const DcolPlan& d, const T* dy, const T* w, T* dx) {
  const int64_t rows = d.cc * cv.rs;  // GEMM M for a full chunk
  const MicroKernel<T> uk = pick_micro_kernel<T>(rows, cv.pq);
  const std::vector<int64_t> dy_rows = row_offsets(cv.kg, cv.pq);
  const bool padded = cv.ph != 0 || cv.pw != 0;  // dX planes are the padded planes unless there is no padding
  const AddRowsFn<T> add_rows = add_rows_kernel<T>();

  // A = W_g^T restricted to the chunk's rows: element (i, k) at w[(g*Kg + k)*CgRS + c0*RS + i].
  const int64_t a_panel = packed_a_size(rows, cv.kg, uk.mr);
  std::vector<T> a_packed(cv.groups * d.channel_chunks * a_panel);
  for (int64_t g = 0; g < cv.groups; ++g) {
    for (int64_t ci = 0; ci < d.channel_chunks; ++ci) {
      const int64_t c0 = ci * d.cc, c1 = std::min(cv.cg, c0 + d.cc);
      if (c0 >= c1) continue;
      pack_a((c1 - c0) * cv.rs, cv.kg, w + g * cv.kg * cv.crs + c0 * cv.rs, int64_t(1), cv.crs, uk.mr,
             a_packed.data() + (g * d.channel_chunks + ci) * a_panel);
    }
  }

  const int64_t items = cv.n * cv.groups * d.channel_chunks;
#pragma omp parallel num_threads(num_threads())
  {
    std::vector<T> dcol(rows * cv.pq);
    std::vector<T> dxp(padded ? d.hp * d.wp : 0);
#pragma omp for schedule(dynamic)
    for (int64_t item = 0; item < items; ++item) {
      const int64_t img = item / (cv.groups * d.channel_chunks), g = item / d.channel_chunks % cv.groups;
      const int64_t ci = item % d.channel_chunks;
      const int64_t c0 = ci * d.cc, c1 = std::min(cv.cg, c0 + d.cc);
      if (c0 >= c1) continue;
      gemm(uk, (c1 - c0) * cv.rs, cv.pq, cv.kg, a_packed.data() + (g * d.channel_chunks + ci) * a_panel,
           dy + (img * cv.k + g * cv.kg) * cv.pq, dy_rows.data(), dcol.data(), cv.pq, false);
      for (int64_t c = c0; c < c1; ++c) {
        T* plane = dx + (img * cv.c + g * cv.cg + c) * cv.hw;
        T* acc = padded ? dxp.data() : plane;
        std::fill_n(acc, d.hp * d.wp, T(0));
        for (int64_t r = 0; r < cv.r; ++r) {
          for (int64_t s = 0; s < cv.s; ++s) {
            add_rows(acc + r * cv.dh * d.wp + s * cv.dw, d.wp, dcol.data() + (((c - c0) * cv.r + r) * cv.s + s) * cv.pq,
                     cv.q, cv.p, cv.q);
          }
        }
        if (padded) {
          for (int64_t y = 0; y < cv.h; ++y) std::copy_n(acc + (y + cv.ph) * d.wp + cv.pw, cv.w, plane + y * cv.w);
        }
      }
    }
  }
}

template <typename T>
void conv2d_backward_input_impl(const Conv& cv, const T* dy, const T* w, T* dx) {
  if (cv.unit_stride()) {
    // The dcol form when the implicit product's wasted columns cost more than half again the useful ones (valid
    // convolutions on small images), and its dcol stays within the scratch budget.
    const DcolPlan d = dcol_plan(cv);
    const double implicit_cols = double(cv.h) * (cv.w + (cv.s - 1) * cv.dw);
    if (implicit_cols > 1.5 * double(cv.pq) && d.cc * cv.rs * cv.pq * int64_t(sizeof(T)) <= 2 * kScratchBytes) {
      conv2d_backward_input_dcol(cv, d, dy, w, dx);
      return;
    }
    const int64_t bytes_per_row = cv.kg * (cv.w + (cv.s - 1) * cv.dw) * sizeof(T);
    const Window win(cv, true, rows_per_item(cv, true, cv.n * cv.groups, bytes_per_row));
    const MicroKernel<T> uk = pick_micro_kernel<T>(cv.cg, win.rows_per_item * win.cols);
    // The implicit product has only Cg GEMM rows: worth it unless most of each row tile would be padding.
    if (cpu::detail::round_up(cv.cg, uk.mr) <= 2 * cv.cg) {
      conv2d_backward_input_implicit(cv, uk, win, dy, w, dx);
      return;
    }
  }
  conv2d_backward_input_explicit(cv, dy, w, dx);
}

// ---------------------------------------------------------------------------------------------------------------
// wgrad, stride 1 and few output channels: segments = (image, chunk of output rows); thread t sums a fixed
// range of segments into partial[t] (K × CgRS, the layout of dW). Per batch of segments and group, the input
// windows and dY (in the window layout, zero in the wasted columns) are copied to scratch, then dot tiles reduce
// every (k, c, r, s) pair over the whole batch: dW[k][c][r][s] += sum_j dY'[k][j] * window_c[taps(c, r, s) + j].
// ---------------------------------------------------------------------------------------------------------------
template <typename T>
void conv2d_backward_weight_implicit(const Conv& cv, const T* dy, const T* x, T* dw) {
  const cpu::DotKernel<T>& dk = cpu::dot_kernel<T>();
  const int64_t weight_numel = cv.k * cv.crs;
  const int64_t cols = cv.q + (cv.s - 1) * cv.dw;
  const Window win(cv, false, rows_per_item(cv, false, cv.n, (cv.cg + cv.kg) * cols * sizeof(T)));
  const int64_t chunks = win.items(), segments = cv.n * chunks;
  const int64_t parts = std::min<int64_t>(num_threads(), segments);
  const int64_t seg_len = cpu::detail::round_up(win.rows_per_item * cols, dk.lanes);  // dY' columns per channel
  const int64_t seg_x = cv.cg * win.plane, seg_dy = cv.kg * seg_len;                  // scratch per segment
  const int64_t batch = std::clamp<int64_t>(kWgradScratchBytes / ((seg_x + seg_dy) * sizeof(T)), 1,
                                            ceil_div(segments, parts));

  std::vector<T> partial(parts * weight_numel, T(0));
#pragma omp parallel for schedule(static, 1) num_threads(parts)
  for (int64_t t = 0; t < parts; ++t) {
    // Zero-initialised: the dot tiles multiply the slack (and stale windows past a short last chunk) by the zero
    // columns of dY', so those must hold finite values.
    std::vector<T> windows(batch * seg_x + win.slack()), dy_windows(batch * seg_dy);
    T* acc = partial.data() + t * weight_numel;
    const int64_t end = segments * (t + 1) / parts;
    for (int64_t s0 = segments * t / parts; s0 < end; s0 += batch) {
      const int64_t count = std::min(batch, end - s0);
      for (int64_t g = 0; g < cv.groups; ++g) {
        for (int64_t i = 0; i < count; ++i) {
          const int64_t img = (s0 + i) / chunks;
          const auto [y0, y1] = win.fill(x + (img * cv.c + g * cv.cg) * cv.hw, (s0 + i) % chunks,
                                         windows.data() + i * seg_x);
          T* d = dy_windows.data() + i * seg_dy;
          // Only the columns past the rows copied below may hold stale values (a previous, longer chunk's rows);
          // the wasted columns inside each row are never written, so they are still zero.
          for (int64_t kk = 0; kk < cv.kg; ++kk) {
            std::fill(d + kk * seg_len + (y1 - y0) * cols, d + (kk + 1) * seg_len, T(0));
            for (int64_t y = y0; y < y1; ++y) {
              copy_row(d + kk * seg_len + (y - y0) * cols, dy + ((img * cv.k + g * cv.kg + kk) * cv.p + y) * cv.q,
                       cv.q);
            }
          }
        }
        for (int64_t k0 = 0; k0 < cv.kg; k0 += dk.mr) {
          for (int64_t t0 = 0; t0 < cv.crs; t0 += dk.nt) {
            dk.fn(count, seg_len / dk.lanes, dy_windows.data() + k0 * seg_len, seg_len, seg_dy, windows.data(),
                  win.taps.data() + t0, seg_x, static_cast<int>(std::min<int64_t>(dk.mr, cv.kg - k0)),
                  static_cast<int>(std::min<int64_t>(dk.nt, cv.crs - t0)), acc + (g * cv.kg + k0) * cv.crs + t0,
                  cv.crs);
          }
        }
      }
    }
  }

  // dw = sum over t, in order, of partial[t].
#pragma omp parallel for num_threads(num_threads())
  for (int64_t e = 0; e < weight_numel; ++e) {
    T sum = partial[e];
    for (int64_t t = 1; t < parts; ++t) sum += partial[t * weight_numel + e];
    dw[e] = sum;
  }
}

// ---------------------------------------------------------------------------------------------------------------
// wgrad otherwise: thread range t of the flattened (image, p, q) axis accumulates into partial[t]; chunks of at most
// `step` positions per GEMM keep colT within budget.
// ---------------------------------------------------------------------------------------------------------------
template <typename T>
void conv2d_backward_weight_explicit(const Conv& cv, const T* dy, const T* xn, T* dw) {
  const int64_t weight_numel = cv.k * cv.crs;
  const int64_t total = cv.n * cv.pq;
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(num_threads(), total));
  const MicroKernel<T> uk = pick_micro_kernel<T>(cv.kg, cv.crs);
  const int64_t step = std::clamp<int64_t>(kScratchBytes / std::max<int64_t>(1, cv.crs * sizeof(T)), 16, 512);
  // colT rows padded to whole micro-kernel panels so the GEMM reads them in place, plus copy_run's slack.
  const int64_t col_ld = cpu::padded_cols(cv.crs, uk.nr);
  const std::vector<int64_t> col_rows = row_offsets(step, col_ld);

  // partial[t] is K × RSCg with columns in (r, s, c) order.
  std::vector<T> partial(parts * weight_numel, T(0));
#pragma omp parallel for schedule(static, 1) num_threads(parts)
  for (int64_t t = 0; t < parts; ++t) {
    std::vector<T> a_packed(packed_a_size(cv.kg, step, uk.mr));
    std::vector<T> col_t(step * col_ld + 64 / sizeof(T));
    T* acc = partial.data() + t * weight_numel;
    const int64_t end = total * (t + 1) / parts;
    for (int64_t pos = total * t / parts; pos < end;) {
      const int64_t img = pos / cv.pq, pq0 = pos % cv.pq;
      const int64_t pq1 = std::min({cv.pq, pq0 + step, pq0 + (end - pos)}), width = pq1 - pq0;
      for (int64_t g = 0; g < cv.groups; ++g) {
        pack_a(cv.kg, width, dy + (img * cv.k + g * cv.kg) * cv.pq + pq0, cv.pq, int64_t(1), uk.mr,
               a_packed.data());
        gather_col_t(cv, xn + img * cv.hw * cv.c, g, pq0, pq1, col_ld, col_t.data());
        gemm(uk, cv.kg, cv.crs, width, a_packed.data(), col_t.data(), col_rows.data(), acc + g * cv.kg * cv.crs,
             cv.crs, true, true);
      }
      pos += width;
    }
  }

  // dw[k][c][r][s] = sum over t, in order, of partial[t][k][(r*S + s)*Cg + c].
#pragma omp parallel for num_threads(num_threads())
  for (int64_t kk = 0; kk < cv.k; ++kk) {
    for (int64_t c = 0; c < cv.cg; ++c) {
      for (int64_t tap = 0; tap < cv.rs; ++tap) {
        const int64_t src = kk * cv.crs + tap * cv.cg + c;
        T sum = partial[src];
        for (int64_t t = 1; t < parts; ++t) sum += partial[t * weight_numel + src];
        dw[(kk * cv.cg + c) * cv.rs + tap] = sum;
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// bias gradient: one output channel per task, summed in a fixed order.
// ---------------------------------------------------------------------------------------------------------------
// Accumulate in double (exactly as many bits for float64) across kLanes independent lanes, so the inner loop
// vectorises without reassociating anything. Compiled per ISA (see gemm.h); every ISA adds in the same order, so
// the result does not depend on it.
template <typename T>
inline __attribute__((always_inline)) double bias_sum_body(const T* dy, int64_t n, int64_t k, int64_t kk,
                                                           int64_t pq) {
  constexpr int64_t kLanes = 16;
  double lanes[kLanes] = {};
  for (int64_t img = 0; img < n; ++img) {
    const T* plane = dy + (img * k + kk) * pq;
    int64_t j = 0;
    for (; j + kLanes <= pq; j += kLanes) {
      for (int64_t l = 0; l < kLanes; ++l) lanes[l] += plane[j + l];
    }
    for (int64_t l = 0; j < pq; ++j, ++l) lanes[l] += plane[j];
  }
  double sum = 0;
  for (double v : lanes) sum += v;
  return sum;
}

template <typename T>
using BiasSumFn = double (*)(const T*, int64_t, int64_t, int64_t, int64_t);

#if defined(__x86_64__) || defined(__i386__)
template <typename T>
__attribute__((target("avx512f,avx512vl"))) double bias_sum_avx512(const T* dy, int64_t n, int64_t k, int64_t kk,
                                                                   int64_t pq) {
  return bias_sum_body<T>(dy, n, k, kk, pq);
}
template <typename T>
__attribute__((target("avx2"))) double bias_sum_avx2(const T* dy, int64_t n, int64_t k, int64_t kk, int64_t pq) {
  return bias_sum_body<T>(dy, n, k, kk, pq);
}
#endif
template <typename T>
double bias_sum_baseline(const T* dy, int64_t n, int64_t k, int64_t kk, int64_t pq) {
  return bias_sum_body<T>(dy, n, k, kk, pq);
}

template <typename T>
void conv2d_backward_bias_impl(const T* dy, int64_t n, int64_t k, int64_t pq, T* db) {
#if defined(__x86_64__) || defined(__i386__)
  static const BiasSumFn<T> sum = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl")
                                      ? &bias_sum_avx512<T>
                                  : __builtin_cpu_supports("avx2") ? &bias_sum_avx2<T>
                                                                   : &bias_sum_baseline<T>;
#else
  static const BiasSumFn<T> sum = &bias_sum_baseline<T>;
#endif
#pragma omp parallel for num_threads(num_threads())
  for (int64_t kk = 0; kk < k; ++kk) db[kk] = static_cast<T>(sum(dy, n, k, kk, pq));
}

// ---------------------------------------------------------------------------------------------------------------
// Fused conv2d + max_pool2d + ReLU (cnn_ext.conv2d_maxpool_relu). One item = (image, group, chunk of pooled output
// rows): the convolution rows those pooling windows read are computed into item-local scratch by the fprop
// machinery above (implicit im2col for stride 1, explicit im2col otherwise), bias added, and pooled + ReLU'd from
// there, so the convolution's output never reaches memory. Chunks of pooled rows write disjoint outputs; when pooling
// windows overlap (pool stride < window) the conv rows they share are recomputed by both chunks, which gives the
// same bits (a C element's sum does not depend on the GEMM's tiling). The pooling follows pool2d.cpp exactly:
// windows clipped to the conv output, a value takes over when greater or NaN (ties keep the first tap in row-major
// window order), a window wholly in padding gives -inf (ReLU: 0) and index -1.
// ---------------------------------------------------------------------------------------------------------------

template <typename T>
inline T relu(T v) {
  return v > T(0) || v != v ? v : T(0);  // NaN propagates, as torch.relu
}

// Plane offset of a 2×2 window's winning tap, in an integer as wide as T so that the selects vectorise.
template <typename T>
using tap_t = std::conditional_t<sizeof(T) == 4, int32_t, int64_t>;

// n adjacent 2×2 stride-2 windows over rows r0 and r1 (conv values, plus b): out[k] = relu(max), tap[k] = the
// winner's offset from the window's first tap (0, 1, row_w, row_w + 1). Taps in row-major window order; a value
// takes over when greater or NaN. Compiled per ISA (see gemm.h): the build has no -m flags.
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
      bool take = v > best || v != v;
      best = take ? v : best;
      t = take ? tap_t<T>(1) : t;
      v = r1[2 * k] + b;
      take = v > best || v != v;
      best = take ? v : best;
      t = take ? row_w : t;
      v = r1[2 * k + 1] + b;
      take = v > best || v != v;
      best = take ? v : best;
      t = take ? tap_t<T>(row_w + 1) : t;
      out[k] = best > T(0) || best != best ? best : T(0);
      tap[k] = t;
    }
  }
}

template <typename T>
using Max2x2Fn = void (*)(const T*, const T*, int64_t, T, tap_t<T>, T*, tap_t<T>*);

#if defined(__x86_64__) || defined(__i386__)
template <typename T>
__attribute__((target("avx512f,avx512bw,avx512dq,avx512vl"))) void max2x2_avx512(const T* r0, const T* r1, int64_t n,
                                                                                  T b, tap_t<T> row_w, T* out,
                                                                                  tap_t<T>* tap) {
  max2x2_body<T>(r0, r1, n, b, row_w, out, tap);
}
template <typename T>
__attribute__((target("avx2"))) void max2x2_avx2(const T* r0, const T* r1, int64_t n, T b, tap_t<T> row_w, T* out,
                                                 tap_t<T>* tap) {
  max2x2_body<T>(r0, r1, n, b, row_w, out, tap);
}
#endif
template <typename T>
void max2x2_baseline(const T* r0, const T* r1, int64_t n, T b, tap_t<T> row_w, T* out, tap_t<T>* tap) {
  max2x2_body<T>(r0, r1, n, b, row_w, out, tap);
}

template <typename T>
Max2x2Fn<T> max2x2_kernel() {
#if defined(__x86_64__) || defined(__i386__)
  static const Max2x2Fn<T> fn = __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
                                        __builtin_cpu_supports("avx512dq")
                                    ? &max2x2_avx512<T>
                                : __builtin_cpu_supports("avx2") ? &max2x2_avx2<T>
                                                                 : &max2x2_baseline<T>;
  return fn;
#else
  return &max2x2_baseline<T>;
#endif
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

#if defined(__x86_64__) || defined(__i386__)
// float with AVX-512: each row as masked 16-lane stores (pooled rows are short, 4 to 12 columns for MNIST, so a
// scalar tail per row would dominate).
__attribute__((target("avx512f,avx512vl"))) void store_pooled_rows_avx512(const float* values, const int32_t* taps,
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
#if defined(__x86_64__) || defined(__i386__)
  if constexpr (std::is_same_v<T, float>) {
    static const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl");
    if (avx512) {
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
      max2x2_kernel<T>()(buf, buf + ld_row, (rows - 1) * ld_row + cols, b, static_cast<tap_t<T>>(plane_w), values,
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
          if (v > best || v != v) {
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
void conv2d_maxpool_relu_impl(const Conv& cv, const PoolShape<int64_t>& ps, const T* x, const T* w, const T* bias,
                              T* out, int64_t* idx) {
  const WindowAxis prow(ps.p, ps.h, ps.kh, ps.stride_h, ps.pad_h, ps.dil_h);
  const WindowAxis pcol(ps.q, ps.w, ps.kw, ps.stride_w, ps.pad_w, ps.dil_w);
  const bool implicit = cv.unit_stride();
  const int64_t row_len = implicit ? cv.q + (cv.s - 1) * cv.dw : cv.q;  // scratch row stride of a conv row
  const int64_t bytes_per_row = (cv.kg * row_len + (implicit ? cv.cg * row_len : cv.crs * cv.q)) * sizeof(T);

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

  const Window win(cv, false, implicit ? rows_cap : 1);
  const MicroKernel<T> uk = pick_micro_kernel<T>(cv.kg, rows_cap * row_len);
  const std::vector<T> w_packed = pack_weights(cv, w, uk.mr);
  const int64_t w_panel = packed_a_size(cv.kg, cv.crs, uk.mr);
  const int64_t ld = rows_cap * row_len;  // scratch plane of one output channel
  const int64_t col_ld = implicit ? 0 : cpu::padded_cols(rows_cap * cv.q, uk.nr);
  const std::vector<int64_t> col_rows = implicit ? std::vector<int64_t>() : row_offsets(cv.crs, col_ld);
  const T* x_end = x + cv.n * cv.c * cv.hw;

  const int64_t pool_scratch = is_two_by_two<T>(ps) ? (rows_cap / 2 + 1) * row_len + 64 : 0;

  const int64_t items = cv.n * cv.groups * chunks;
#pragma omp parallel num_threads(num_threads())
  {
    std::vector<T> scratch(implicit ? win.buffer_size() : cv.crs * col_ld + 64 / sizeof(T));
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
      const T* a = w_packed.data() + g * w_panel;
      if (y0 < y1) {
        if (implicit) {
          win.fill_rows(xg, y0, y1, scratch.data());
          gemm(uk, cv.kg, (y1 - y0 - 1) * win.cols + cv.q, static_cast<int64_t>(win.taps.size()), a,
               scratch.data(), win.taps.data(), product.data(), ld, false, true);
        } else {
          im2col(cv, xg, x_end, y0 * cv.q, y1 * cv.q, col_ld, scratch.data());
          gemm(uk, cv.kg, (y1 - y0) * cv.q, cv.crs, a, scratch.data(), col_rows.data(), product.data(), ld, false,
               true);
        }
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

// ---------------------------------------------------------------------------------------------------------------
// Op entry points.
// ---------------------------------------------------------------------------------------------------------------
at::Tensor conv2d_cpu(const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                      c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t groups) {
  constexpr const char* op = "cnn_ext.conv2d";
  const auto shape = check_conv2d<int64_t>(op, input, weight, bias, stride, padding, dilation, groups);
  check_backend_dtype(op, input, "input", {at::kFloat, at::kDouble}, "CPU");
  const Conv cv(shape);
  at::Tensor out = at::empty(shape.output_sizes(), input.options());
  if (out.numel() == 0) return out;
  const at::Tensor x = input.contiguous(), w = weight.contiguous();
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "cnn_ext_conv2d_cpu", [&] {
    if constexpr (std::is_same_v<scalar_t, float>) {
      if (cpu::lanes::suits(shape)) {
        cpu::lanes::conv2d_forward(shape, x.data_ptr<float>(), w.data_ptr<float>(),
                                   b.defined() ? b.data_ptr<float>() : nullptr, out.data_ptr<float>());
        return;
      }
    }
    conv2d_forward_impl<scalar_t>(cv, x.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(),
                                  b.defined() ? b.data_ptr<scalar_t>() : nullptr, out.data_ptr<scalar_t>());
  });
  return out;
}

at::Tensor conv2d_backward_input_cpu(const at::Tensor& grad_output, const at::Tensor& weight,
                                     c10::IntArrayRef input_size, c10::IntArrayRef stride, c10::IntArrayRef padding,
                                     c10::IntArrayRef dilation, int64_t groups) {
  constexpr const char* op = "cnn_ext.conv2d_backward_input";
  const auto shape = check_conv2d_backward_input<int64_t>(op, grad_output, weight, input_size, stride, padding,
                                                          dilation, groups);
  check_backend_dtype(op, grad_output, "grad_output", {at::kFloat, at::kDouble}, "CPU");
  const Conv cv(shape);
  at::Tensor grad_input = at::empty(shape.input_sizes(), grad_output.options());
  if (grad_input.numel() == 0) return grad_input;
  if (grad_output.numel() == 0) return grad_input.zero_();  // no output channels: nothing flows back
  const at::Tensor dy = grad_output.contiguous(), w = weight.contiguous();
  AT_DISPATCH_FLOATING_TYPES(grad_output.scalar_type(), "cnn_ext_conv2d_backward_input_cpu", [&] {
    if constexpr (std::is_same_v<scalar_t, float>) {
      if (cpu::lanes::suits_dgrad(shape)) {
        cpu::lanes::conv2d_backward_input(shape, dy.data_ptr<float>(), w.data_ptr<float>(),
                                          grad_input.data_ptr<float>());
        return;
      }
    }
    conv2d_backward_input_impl<scalar_t>(cv, dy.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(),
                                         grad_input.data_ptr<scalar_t>());
  });
  return grad_input;
}

at::Tensor conv2d_backward_weight_cpu(const at::Tensor& grad_output, const at::Tensor& input,
                                      c10::IntArrayRef weight_size, c10::IntArrayRef stride,
                                      c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t groups) {
  constexpr const char* op = "cnn_ext.conv2d_backward_weight";
  const auto shape = check_conv2d_backward_weight<int64_t>(op, grad_output, input, weight_size, stride, padding,
                                                           dilation, groups);
  check_backend_dtype(op, input, "input", {at::kFloat, at::kDouble}, "CPU");
  const Conv cv(shape);
  at::Tensor grad_weight = at::empty(shape.weight_sizes(), input.options());
  if (grad_weight.numel() == 0) return grad_weight;
  if (grad_output.numel() == 0) return grad_weight.zero_();  // empty batch: nothing to sum
  const at::Tensor dy = grad_output.contiguous();
  // Dot tiles for stride 1 with few output channels. The colT GEMM pays a gather of PQ × CgRS elements per image,
  // which its GEMM reuses Kg times; the dot tiles copy only the input windows but pay the wasted columns and a
  // horizontal sum per tile and batch, which dominate for many channels on small images (measured: dot tiles
  // 1.4× faster at Kg = 20 on 8×8 outputs, GEMM 1.3–2× faster at Kg >= 64 on ResNet 3×3 shapes). A 1×1 kernel has
  // no wasted columns and its GEMM would pay the channels-last copy of the whole input: dot tiles measured 2.3×
  // faster on ResNet's 1×1 256->64 (8×256×56²).
  const bool dot_tiles = cv.unit_stride() && (cv.kg <= 32 || cv.rs == 1);
  const bool lanes = input.scalar_type() == at::kFloat && cpu::lanes::suits(shape);
  // The GEMM path gathers from a channels-last copy (see gather_col_t).
  const at::Tensor x = dot_tiles || lanes ? input.contiguous() : input.permute({0, 2, 3, 1}).contiguous();
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "cnn_ext_conv2d_backward_weight_cpu", [&] {
    if constexpr (std::is_same_v<scalar_t, float>) {
      if (lanes) {
        cpu::lanes::conv2d_backward_weight(shape, dy.data_ptr<float>(), x.data_ptr<float>(),
                                           grad_weight.data_ptr<float>());
        return;
      }
    }
    if (dot_tiles) {
      conv2d_backward_weight_implicit<scalar_t>(cv, dy.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(),
                                                grad_weight.data_ptr<scalar_t>());
    } else {
      conv2d_backward_weight_explicit<scalar_t>(cv, dy.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(),
                                                grad_weight.data_ptr<scalar_t>());
    }
  });
  return grad_weight;
}

at::Tensor conv2d_backward_bias_cpu(const at::Tensor& grad_output) {
  constexpr const char* op = "cnn_ext.conv2d_backward_bias";
  check_conv2d_backward_bias(op, grad_output);
  check_backend_dtype(op, grad_output, "grad_output", {at::kFloat, at::kDouble}, "CPU");
  const int64_t n = grad_output.size(0), k = grad_output.size(1), pq = grad_output.size(2) * grad_output.size(3);
  at::Tensor grad_bias = at::empty({k}, grad_output.options());
  if (k == 0) return grad_bias;
  const at::Tensor dy = grad_output.contiguous();
  AT_DISPATCH_FLOATING_TYPES(grad_output.scalar_type(), "cnn_ext_conv2d_backward_bias_cpu", [&] {
    conv2d_backward_bias_impl<scalar_t>(dy.data_ptr<scalar_t>(), n, k, pq, grad_bias.data_ptr<scalar_t>());
  });
  return grad_bias;
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
  const Conv cv(shape.conv);
  const auto sizes = shape.pool.output_sizes();
  at::Tensor out = at::empty(sizes, input.options());
  at::Tensor indices = at::empty(sizes, input.options().dtype(at::kLong));
  if (out.numel() == 0) return {out, indices};
  const at::Tensor x = input.contiguous(), w = weight.contiguous();
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "cnn_ext_conv2d_maxpool_relu_cpu", [&] {
    if constexpr (std::is_same_v<scalar_t, float>) {
      if (cpu::lanes::suits(shape.conv)) {
        cpu::lanes::conv2d_maxpool_relu(shape.conv, shape.pool, x.data_ptr<float>(), w.data_ptr<float>(),
                                        b.defined() ? b.data_ptr<float>() : nullptr, out.data_ptr<float>(),
                                        indices.data_ptr<int64_t>());
        return;
      }
    }
    conv2d_maxpool_relu_impl<scalar_t>(cv, shape.pool, x.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(),
                                       b.defined() ? b.data_ptr<scalar_t>() : nullptr, out.data_ptr<scalar_t>(),
                                       indices.data_ptr<int64_t>());
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
// The arguments of the fused op's backward ops, checked: the convolution's shape and the pooling's (over the
// convolution output).
std::pair<ConvShape<int64_t>, PoolShape<int64_t>> check_fused_backward(
    const char* op, const at::Tensor& grad_output, const at::Tensor& output, const at::Tensor& indices,
    const at::Tensor& input, const at::Tensor& weight, c10::IntArrayRef stride, c10::IntArrayRef padding,
    c10::IntArrayRef dilation, int64_t groups, c10::IntArrayRef pool_kernel_size, c10::IntArrayRef pool_stride,
    c10::IntArrayRef pool_padding, c10::IntArrayRef pool_dilation, bool ceil_mode) {
  const auto shape = check_conv2d_maxpool_relu<int64_t>(op, input, weight, c10::nullopt, stride, padding, dilation,
                                                        groups, pool_kernel_size, pool_stride, pool_padding,
                                                        pool_dilation, ceil_mode);
  const auto conv_out = shape.conv.output_sizes();
  const auto ps = check_max_pool2d_backward<int64_t>(op, grad_output, indices, c10::IntArrayRef(conv_out),
                                                     pool_kernel_size, pool_stride, pool_padding, pool_dilation,
                                                     ceil_mode);
  check_dim(op, output, "output", 4, "(N, K, P, Q)");
  check_same_dtype_device(op, {{&grad_output, "grad_output"}, {&output, "output"}});
  TORCH_CHECK_VALUE(output.sizes() == grad_output.sizes(), op, ": output has shape ", output.sizes(),
                    " but grad_output has shape ", grad_output.sizes());
  check_backend_dtype(op, grad_output, "grad_output", {at::kFloat, at::kDouble}, "CPU");
  return {shape.conv, ps};
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
  at::Tensor grad = at::empty(conv_out, grad_output.options());
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
  const bool all_float_cpu = std::all_of(std::begin(operands), std::end(operands), [](const at::Tensor* t) {
    return t->scalar_type() == at::kFloat && t->device().is_cpu();
  });
  if (all_float_cpu && grad_output.numel() > 0 && cpu::lanes::suits(conv) &&
      (!output_mask[0] || cpu::lanes::suits_dgrad(conv))) {
    const auto options = input.options();
    at::Tensor grad_input = output_mask[0] ? at::empty(input.sizes(), options) : at::empty({0}, options);
    at::Tensor grad_weight = output_mask[1] ? at::empty(weight.sizes(), options) : at::empty({0}, options);
    at::Tensor grad_bias = output_mask[2] ? at::empty({conv.k}, options) : at::empty({0}, options);
    const at::Tensor go = grad_output.contiguous(), out = output.contiguous(), idx = indices.contiguous();
    const at::Tensor x = input.contiguous(), w = weight.contiguous();
    if (cpu::lanes::conv2d_maxpool_relu_backward(
            conv, ps, go.data_ptr<float>(), out.data_ptr<float>(), idx.data_ptr<int64_t>(), x.data_ptr<float>(),
            w.data_ptr<float>(), output_mask[0] ? grad_input.data_ptr<float>() : nullptr,
            output_mask[1] ? grad_weight.data_ptr<float>() : nullptr,
            output_mask[2] ? grad_bias.data_ptr<float>() : nullptr)) {
      return {grad_input, grad_weight, grad_bias};
    }
  }
  return conv2d_maxpool_relu_backward_composite(grad_output, output, indices, input, weight, stride, padding,
                                                dilation, groups, pool_kernel_size, pool_stride, pool_padding,
                                                pool_dilation, ceil_mode, output_mask);
}

}  // namespace

TORCH_LIBRARY_IMPL(cnn_ext, CPU, m) {
  m.impl("conv2d", &conv2d_cpu);
  m.impl("conv2d_backward_input", &conv2d_backward_input_cpu);
  m.impl("conv2d_backward_weight", &conv2d_backward_weight_cpu);
  m.impl("conv2d_backward_bias", &conv2d_backward_bias_cpu);
  m.impl("conv2d_maxpool_relu", &conv2d_maxpool_relu_cpu);
  m.impl("conv2d_maxpool_relu_backward_pool", &conv2d_maxpool_relu_backward_pool_cpu);
  m.impl("conv2d_maxpool_relu_backward", &conv2d_maxpool_relu_backward_cpu);
}

}  // namespace cnn_ext
