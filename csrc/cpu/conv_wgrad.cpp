// CPU wgrad (cnn_ext.conv2d_backward_weight): direct depthwise kernels (conv_depthwise.h), Winograd F(3x3, 2x2) or
// F(3x3, 4x4) (winograd.h), the transposed GEMM of the input windows against dYᵀ, dot tiles of dY against the input
// windows (few output channels), a GEMM of dY against a gathered colᵀ, or the batch-in-lanes kernels; dispatch.cpp
// chooses.
// And the bias gradient (cnn_ext.conv2d_backward_bias).
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
#include "scratch.h"
#include "winograd.h"

namespace cnn_ext::cpu {
namespace {

// wgrad's dot tiles end with horizontal sums, so it batches more segments per tile: each batch of windows is
// re-read once per tile of output channels, so it should still fit in L2.
constexpr int64_t kWgradScratchBytes = 1536 * 1024;

// dst[e] = part 0 + part 1 + ... for e < n (parts n elements apart), added in that order: the threads' partial sums
// of a reduction, so the result depends on the thread count only. dst may be part 0.
template <typename T>
void add_parts(const T* part, int64_t parts, int64_t n, T* dst) {
#pragma omp parallel for num_threads(num_threads())
  for (int64_t e = 0; e < n; ++e) {
    T sum = part[e];
    for (int64_t t = 1; t < parts; ++t) sum += part[t * n + e];
    dst[e] = sum;
  }
}

// colT[i][(r*S + s)*Cg + c] for output positions pq0 + i, from the channels-last image xn (H×W×C) and group g.
// Rows ld elements apart; colT needs 64 bytes of slack after its last row (see copy_run).
template <typename T>
void gather_col_t(const Conv& cv, const T* xn, int64_t g, int64_t pq0, int64_t pq1, int64_t ld, T* col_t) {
  const T* xn_end = xn + cv.hw * cv.c;
  const bool rows_contiguous = cv.dil_w == 1 && cv.cg == cv.c;  // a kernel row's taps are one run of S*C values
  int64_t out_p = pq0 / cv.q, out_q = pq0 % cv.q;
  for (int64_t i = 0; i < pq1 - pq0; ++i) {
    T* d = col_t + i * ld;
    const int64_t w_off = out_q * cv.stride_w - cv.pad_w;
    const int64_t s_first = std::min(cv.s, first_reaching(0, w_off, cv.dil_w));
    const int64_t s_last = std::clamp(first_reaching(cv.w, w_off, cv.dil_w), s_first, cv.s);
    for (int64_t r = 0; r < cv.r; ++r) {
      const int64_t in_h = out_p * cv.stride_h - cv.pad_h + r * cv.dil_h;
      if (in_h < 0 || in_h >= cv.h) {
        zero_row(d, cv.s * cv.cg);
        d += cv.s * cv.cg;
        continue;
      }
      const T* row = xn + (in_h * cv.w + w_off) * cv.c + g * cv.cg;  // row[s*dw*C + c] is tap s, channel c
      zero_row(d, s_first * cv.cg);
      d += s_first * cv.cg;
      if (rows_contiguous) {
        d = copy_run(d, row + s_first * cv.c, (s_last - s_first) * cv.c, xn_end);
      } else {
        for (int64_t s = s_first; s < s_last; ++s) d = copy_run(d, row + s * cv.dil_w * cv.c, cv.cg, xn_end);
      }
      zero_row(d, (cv.s - s_last) * cv.cg);
      d += (cv.s - s_last) * cv.cg;
    }
    if (++out_q == cv.q) {
      out_q = 0;
      ++out_p;
    }
  }
}

// As gather_col_t, in dW's own column order: colT[i][(c*R + r)*S + s] (for the GEMM that writes dW itself). Reads
// each tap's channels as one run, writes them R*S apart: for the few positions of the channel-split GEMM.
template <typename T>
void gather_col_t_dw_order(const Conv& cv, const T* xn, int64_t g, int64_t pq0, int64_t pq1, int64_t ld, T* col_t) {
  for (int64_t i = 0; i < pq1 - pq0; ++i) {
    T* d = col_t + i * ld;
    const int64_t p = (pq0 + i) / cv.q, q = (pq0 + i) % cv.q;
    for (int64_t r = 0; r < cv.r; ++r) {
      const int64_t in_h = p * cv.stride_h - cv.pad_h + r * cv.dil_h;
      for (int64_t s = 0; s < cv.s; ++s) {
        const int64_t in_w = q * cv.stride_w - cv.pad_w + s * cv.dil_w;
        T* dt = d + r * cv.s + s;
        if (in_h < 0 || in_h >= cv.h || in_w < 0 || in_w >= cv.w) {
          for (int64_t c = 0; c < cv.cg; ++c) dt[c * cv.rs] = T(0);
          continue;
        }
        const T* src = xn + (in_h * cv.w + in_w) * cv.c + g * cv.cg;
        for (int64_t c = 0; c < cv.cg; ++c) dt[c * cv.rs] = src[c];
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// wgrad with few output channels (any stride: Window's stride phases): segments = (image, chunk of output rows);
// thread t sums a fixed range of segments into partial[t] (K × CgRS, the layout of dW). Per batch of segments and
// group, the input windows and dY (in the window layout, zero in the wasted columns) are copied to scratch, then dot
// tiles reduce every (k, c, r, s) pair over the whole batch:
// dW[k][c][r][s] += sum_j dY'[k][j] * window_c[taps(c, r, s) + j].
// ---------------------------------------------------------------------------------------------------------------
template <typename T>
void conv2d_backward_weight_dot_tiles(const Conv& cv, const T* dy, const T* x, T* dw) {
  const cpu::DotKernel<T>& dk = cpu::dot_kernel<T>();
  const int64_t weight_numel = cv.k * cv.crs;
  const int64_t cols = Window::cols_of(cv, false);
  const int64_t bytes_per_row = (Window::row_elements(cv, false) + cv.kg * cols) * sizeof(T);  // x and dY windows
  const Window win(cv, false, rows_per_item(cv, false, cv.n, bytes_per_row));
  const int64_t chunks = win.items(), segments = cv.n * chunks;
  const int64_t parts = std::min<int64_t>(num_threads(), segments);
  const int64_t seg_len = cpu::detail::round_up(win.rows_per_item * cols, dk.lanes);  // dY' columns per channel
  const int64_t seg_x = win.span(), seg_dy = cv.kg * seg_len;  // scratch per segment
  const int64_t batch = std::clamp<int64_t>(kWgradScratchBytes / ((seg_x + seg_dy) * sizeof(T)), 1,
                                            ceil_div(segments, parts));

  // Scratch (scratch.h), zeroed: the dot tiles multiply the slack (and stale windows past a short last chunk) by
  // the zero columns of dY', so those must hold finite values (not what an earlier call left).
  CallScratch scratch;
  T* const partial = scratch.whole<T>(parts * weight_numel);
  std::fill_n(partial, parts * weight_numel, T(0));
  const auto all_windows = scratch.per_thread<T>(parts, batch * seg_x + win.slack());
  const auto all_dy_windows = scratch.per_thread<T>(parts, batch * seg_dy);
#pragma omp parallel for schedule(static, 1) num_threads(parts)
  for (int64_t t = 0; t < parts; ++t) {
    T* const windows = all_windows.slice(t);
    T* const dy_windows = all_dy_windows.slice(t);
    std::fill_n(windows, batch * seg_x + win.slack(), T(0));
    std::fill_n(dy_windows, batch * seg_dy, T(0));
    T* acc = partial + t * weight_numel;
    const int64_t end = segments * (t + 1) / parts;
    for (int64_t s0 = segments * t / parts; s0 < end; s0 += batch) {
      const int64_t count = std::min(batch, end - s0);
      for (int64_t g = 0; g < cv.groups; ++g) {
        for (int64_t i = 0; i < count; ++i) {
          const int64_t img = (s0 + i) / chunks;
          const auto [y0, y1] = win.fill(x + (img * cv.c + g * cv.cg) * cv.hw, (s0 + i) % chunks,
                                         windows + i * seg_x);
          T* d = dy_windows + i * seg_dy;
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
            dk.fn(count, seg_len / dk.lanes, dy_windows + k0 * seg_len, seg_len, seg_dy, windows,
                  win.taps.data() + t0, seg_x, static_cast<int>(std::min<int64_t>(dk.mr, cv.kg - k0)),
                  static_cast<int>(std::min<int64_t>(dk.nt, cv.crs - t0)), acc + (g * cv.kg + k0) * cv.crs + t0,
                  cv.crs);
          }
        }
      }
    }
  }

  add_parts(partial, parts, weight_numel, dw);
}

// ---------------------------------------------------------------------------------------------------------------
// wgrad otherwise: thread range t of the flattened (image, p, q) axis accumulates into partial[t]; chunks of at most
// `step` positions per GEMM keep colT within budget. Where dW outweighs colT (few positions, many channels: batch 1
// on small planes) the threads instead share out the output channels, each summing every position straight into its
// rows of dW: no K × CRS partial per thread to stream, add up and reorder, at the price of each thread gathering
// colT itself.
// ---------------------------------------------------------------------------------------------------------------
constexpr int64_t kColTBytes = 2 * 1024 * 1024;  // colT per thread

template <typename T>
void conv2d_backward_weight_gemm(const Conv& cv, const T* dy, const T* xn, T* dw) {
  const int64_t weight_numel = cv.k * cv.crs;
  const int64_t total = cv.n * cv.pq;
  const MicroKernel<T> uk = pick_micro_kernel<T>(cv.kg, cv.crs);
  const bool by_channels = weight_numel > total * cv.c * cv.rs && cv.kg >= 2 * uk.mr;  // dW outweighs colT
  const int64_t channel_chunk = detail::round_up(ceil_div(cv.kg, num_threads()), uk.mr);
  const int64_t parts = by_channels ? ceil_div(cv.kg, channel_chunk)
                                    : std::max<int64_t>(1, std::min<int64_t>(num_threads(), total));
  // Every GEMM reads and writes its rows of dW once per K block of the micro-kernels (256-512 positions), so chunks
  // are sized up to that (colT is streamed once, it need not stay in L2): 56 positions at 256 channels had made
  // dW's traffic the limit.
  const int64_t step = std::clamp<int64_t>(kColTBytes / std::max<int64_t>(1, cv.crs * sizeof(T)), 16, 512);
  // colT rows padded to whole micro-kernel panels so the GEMM reads them in place, plus copy_run's slack.
  const int64_t col_ld = cpu::padded_cols(cv.crs, uk.nr);
  const std::vector<int64_t> col_rows = row_offsets(step, col_ld);

  // partial[t] is K × RSCg with columns in (r, s, c) order. By channels, the threads write dW itself instead: colT
  // is gathered in dW's column order (or, for a 1x1 kernel without padding, read in place: the orders agree).
  // Every part has positions (or all of them), and its first GEMM stores rather than adds: no zeroing pass.
  TORCH_INTERNAL_ASSERT(total > 0, "empty inputs are answered before the kernels");
  // Scratch (scratch.h): colT's padding columns feed only the GEMM's columns past CgRS, never stored.
  CallScratch scratch;
  T* const partial = scratch.whole<T>(by_channels ? 0 : parts * weight_numel);
  // A 1x1 kernel without padding: colT's rows are the channels-last input's own, read in place at x_rows.
  const bool in_place = cv.rs == 1 && cv.pad_h == 0 && cv.pad_w == 0;
  const auto col_ts = scratch.per_thread<T>(parts, in_place ? 0 : step * col_ld + 64 / sizeof(T));
#pragma omp parallel for schedule(static, 1) num_threads(parts)
  for (int64_t t = 0; t < parts; ++t) {
    T* const col_t = col_ts.slice(t);
    std::vector<int64_t> x_rows(in_place ? step : 0);
    T* acc = by_channels ? dw : partial + t * weight_numel;
    const int64_t k0 = by_channels ? t * channel_chunk : 0;
    const int64_t k1 = by_channels ? std::min(cv.kg, k0 + channel_chunk) : cv.kg;
    const int64_t end = by_channels ? total : total * (t + 1) / parts;
    const int64_t start = by_channels ? 0 : total * t / parts;
    for (int64_t pos = start; pos < end;) {
      const int64_t img = pos / cv.pq, pq0 = pos % cv.pq;
      const int64_t pq1 = std::min({cv.pq, pq0 + step, pq0 + (end - pos)}), width = pq1 - pq0;
      for (int64_t g = 0; g < cv.groups; ++g) {
        const T* dyg = dy + (img * cv.k + g * cv.kg + k0) * cv.pq + pq0;  // dY's rows read in place
        T* acc_g = acc + (g * cv.kg + k0) * cv.crs;
        if (in_place) {
          for (int64_t i = 0; i < width; ++i) {
            const int64_t p = (pq0 + i) / cv.q, q = (pq0 + i) % cv.q;
            x_rows[i] = (p * cv.stride_h * cv.w + q * cv.stride_w) * cv.c;
          }
          gemm_a_rows(uk, k1 - k0, cv.cg, width, dyg, cv.pq, xn + img * cv.hw * cv.c + g * cv.cg, x_rows.data(),
                      acc_g, cv.crs, pos > start);
        } else {
          if (by_channels) {
            gather_col_t_dw_order(cv, xn + img * cv.hw * cv.c, g, pq0, pq1, col_ld, col_t);
          } else {
            gather_col_t(cv, xn + img * cv.hw * cv.c, g, pq0, pq1, col_ld, col_t);
          }
          gemm_a_rows(uk, k1 - k0, cv.crs, width, dyg, cv.pq, col_t, col_rows.data(), acc_g, cv.crs,
                      pos > start, Pad::kB);
        }
      }
      pos += width;
    }
  }

  if (by_channels) return;
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

// Output rows per chunk, at most `rows`, that give the busiest thread the fewest output rows when the threads take
// contiguous ranges of the (image, chunk) segments. With few images, ceil_div(P, rows) chunks rarely split evenly
// (the stem at batch 1: 11 chunks of 11 rows on 2 threads, or 12 of 10 rows with the last of 2, idled a thread for a
// tenth of the time; 14 of 8 do not). Beyond a few images per thread the split is even enough as it is.
inline int64_t balanced_rows(const Conv& cv, int64_t rows) {
  const int64_t threads = num_threads();
  if (cv.n % threads == 0 || cv.n > 4 * threads) return rows;
  int64_t best = rows, best_load = -1;
  for (int64_t r = rows; r >= std::max<int64_t>(1, rows / 2); --r) {
    const int64_t chunks = ceil_div(cv.p, r), segments = cv.n * chunks, parts = std::min(threads, segments);
    int64_t load = 0;
    for (int64_t t = 0; t < parts; ++t) {
      int64_t share = 0;
      for (int64_t seg = segments * t / parts; seg < segments * (t + 1) / parts; ++seg) {
        share += std::min(r, cv.p - seg % chunks * r);
      }
      load = std::max(load, share);
    }
    if (best_load < 0 || load < best_load) {
      best = r;
      best_load = load;
    }
  }
  return best;
}

// ---------------------------------------------------------------------------------------------------------------
// wgrad transposed: dWᵀ[(c, r, s)][k] = sum_j window_c[taps(c, r, s) + j] · dY'ᵀ[j][k], one GEMM per (image, chunk of
// output rows, group) whose A rows are read in place from the input's zero-padded windows (stride phases for a
// strided convolution; for a 1x1, stride-1, unpadded one, the input planes themselves) and whose B is dY transposed
// into the windows' column layout (j = (y - y0)*cols + q; zero rows for the wasted columns q >= Q). It gathers the
// windows (about Cg values per output position, none for such a 1x1) and dYᵀ (Kg), where the GEMM path gathers
// colᵀ (Cg·R·S) from a channels-last copy of the whole input. As in the dot tiles, thread t sums a fixed range of
// (image, chunk) into partial[t], and the parts are added in order at the end.
// ---------------------------------------------------------------------------------------------------------------
template <typename T>
void conv2d_backward_weight_transposed(const Conv& cv, const T* dy, const T* x, T* dw) {
  const MicroKernel<T> uk = pick_micro_kernel<T>(cv.crs, cv.kg);
  const int64_t ld = padded_cols(cv.kg, uk.nr);  // dYᵀ rows in whole micro-kernel panels (Pad::kB)
  const int64_t cols = Window::cols_of(cv, false), threads = num_threads();
  const int64_t bytes_per_row = (Window::row_elements(cv, false) + cols * ld) * int64_t(sizeof(T));
  // Where the kernel outweighs the positions (few images on small planes), per-thread partials of dWᵀ would cost
  // more than the products: the threads share out the input channels instead, each summing every position into its
  // own rows of dWᵀ from the windows of its channels (dYᵀ gathered by each). Otherwise they share out the (image,
  // chunk of output rows) segments and add up their partials in order at the end.
  const bool by_channels = threads > 1 && cv.cg > 1 && cv.crs * cv.kg > kTransposedWeightsPerPosition * cv.n * cv.pq;
  const int64_t channel_chunk = ceil_div(cv.cg, threads);
  const int64_t rows = by_channels ? rows_per_item(cv, false, 2 * threads, bytes_per_row)
                                   : balanced_rows(cv, rows_per_item(cv, false, cv.n, bytes_per_row));
  const Window win(cv, false, rows);
  const bool in_place = !win.source_rows.empty();
  const int64_t chunks = win.items(), segments = cv.n * chunks;
  const int64_t parts = by_channels ? ceil_div(cv.cg, channel_chunk) : std::min(threads, segments);
  const int64_t block = cv.crs * cv.kg;  // one group's dWᵀ
  const int64_t channel_span = win.span() / win.channels;  // one channel's windows
  const std::vector<int64_t> dy_t_rows = row_offsets(win.rows_per_item * cols, ld);
  CallScratch scratch;
  T* const partial = scratch.whole<T>((by_channels ? 1 : parts) * cv.groups * block);
  const int64_t window_size = in_place ? 0 : (by_channels ? channel_chunk : cv.cg) * channel_span + win.slack();
  const auto all_windows = scratch.per_thread<T>(parts, window_size);
  const auto dy_ts = scratch.per_thread<T>(parts, win.rows_per_item * cols * ld);
#pragma omp parallel for schedule(static, 1) num_threads(parts)
  for (int64_t t = 0; t < parts; ++t) {
    const int64_t c0 = by_channels ? t * channel_chunk : 0;
    const int64_t c1 = by_channels ? std::min(cv.cg, c0 + channel_chunk) : cv.cg;
    const int64_t m = (c1 - c0) * cv.rs;  // this part's rows of dWᵀ: taps c0*RS ...
    // A's rows: the windows of channels [c0, c1), channel c0's first (or the input planes themselves).
    std::vector<int64_t> a_rows(m);
    for (int64_t i = 0; i < m; ++i) {
      a_rows[i] = in_place ? win.source_rows[c0 + i] : win.taps[c0 * cv.rs + i] - c0 * channel_span;
    }
    // Scratch (scratch.h). dYᵀ is zeroed: its rows for the wasted columns are never written, and the GEMM sums them
    // times the windows (not what an earlier call left there); its padding columns feed only the GEMM's columns past
    // Kg, never stored. The windows are read only where this item's fill wrote them (every tap's run ends within
    // the rows filled).
    T* const windows = all_windows.slice(t);
    T* const dy_t = dy_ts.slice(t);
    std::fill_n(dy_t, win.rows_per_item * cols * ld, T(0));
    T* acc = partial + (by_channels ? c0 * cv.rs * cv.kg : t * cv.groups * block);
    const int64_t first = by_channels ? 0 : segments * t / parts;
    const int64_t end = by_channels ? segments : segments * (t + 1) / parts;
    for (int64_t seg = first; seg < end; ++seg) {
      const int64_t img = seg / chunks;
      const auto [y0, y1] = win.item_rows(seg % chunks);
      const int64_t positions = (y1 - y0 - 1) * cols + cv.q;  // the last row's wasted columns left out
      for (int64_t g = 0; g < cv.groups; ++g) {
        const T* src = x + (img * cv.c + g * cv.cg) * cv.hw;
        if (!in_place) win.fill_channels(src, y0, y1, c0, c1, windows);
        const T* dyg = dy + (img * cv.k + g * cv.kg) * cv.pq;
        for (int64_t y = y0; y < y1; ++y) {
          transpose(dyg + y * cv.q, cv.pq, cv.kg, cv.q, dy_t + (y - y0) * cols * ld, ld);
        }
        gemm_a_row_table(uk, m, cv.kg, positions, in_place ? src + y0 * cv.w : windows, a_rows.data(), dy_t,
                         dy_t_rows.data(), acc + g * block, cv.kg, seg > first, Pad::kB);
      }
    }
  }

  if (!by_channels) add_parts(partial, parts, cv.groups * block, partial);  // dWᵀ, into partial[0]
  // dw[g][k][crs] = dWᵀ[g][crs][k], a block of 64 rows of dWᵀ at a time.
  const int64_t row_blocks = ceil_div(cv.crs, 64);
#pragma omp parallel for num_threads(threads)
  for (int64_t gb = 0; gb < cv.groups * row_blocks; ++gb) {
    const int64_t g = gb / row_blocks, e0 = gb % row_blocks * 64, e1 = std::min(cv.crs, e0 + 64);
    transpose(partial + g * block + e0 * cv.kg, cv.kg, e1 - e0, cv.kg, dw + g * cv.kg * cv.crs + e0, cv.crs);
  }
}

// The output tiles (dY's blocks) of a Winograd algorithm.
int64_t winograd_tile(Wgrad algorithm) { return algorithm == Wgrad::kWinograd4x4 ? 4 : 2; }

// dw by `algorithm` from dY and x, NCHW or, as their flags say, channels-last (n × h × w × channels): Winograd reads
// either, the GEMM channels-last x, the others NCHW.
template <typename T>
void conv2d_backward_weight(const ConvShape<int64_t>& shape, Wgrad algorithm, const T* dy, bool dy_channels_last,
                            const T* x, bool x_channels_last, T* dw) {
  const Conv cv(shape);
  switch (algorithm) {
    case Wgrad::kLanes:
      if constexpr (std::is_same_v<T, float>) return lanes::conv2d_backward_weight(shape, dy, x, dw);
      break;
    case Wgrad::kDepthwise:
      return depthwise_backward_weight(cv, dy, x, dw);
    case Wgrad::kWinograd4x4:
    case Wgrad::kWinograd:
      return winograd_3x3_wgrad<T>(winograd_problem(cv), winograd_tile(algorithm), dy, dy_channels_last, x,
                                   x_channels_last, dw);
    case Wgrad::kTransposed:
      return conv2d_backward_weight_transposed(cv, dy, x, dw);
    case Wgrad::kDotTiles:
      return conv2d_backward_weight_dot_tiles(cv, dy, x, dw);
    case Wgrad::kGemm:
      return conv2d_backward_weight_gemm(cv, dy, x, dw);  // x channels-last: see gather_col_t
  }
  TORCH_INTERNAL_ASSERT(false, "cnn_ext.conv2d_backward_weight: no CPU wgrad ", static_cast<int>(algorithm),
                        " for this dtype");
}

// ---------------------------------------------------------------------------------------------------------------
// bias gradient: one output channel per task, summed in a fixed order.
// ---------------------------------------------------------------------------------------------------------------
// Accumulate in double (exactly as many bits for float64) across kLanes independent lanes, so the inner loop
// vectorises without reassociating anything. Compiled per ISA (PerIsa); every ISA adds in the same order, so the
// result does not depend on it.
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
void conv2d_backward_bias_impl(const T* dy, int64_t n, int64_t k, int64_t pq, T* db) {
  const auto sum = PerIsa<&bias_sum_body<T>>::pick();
#pragma omp parallel for num_threads(num_threads())
  for (int64_t kk = 0; kk < k; ++kk) db[kk] = static_cast<T>(sum(dy, n, k, kk, pq));
}

// Each image's C × HW matrix src transposed into dst's HW × C, in blocks of positions (8x8 register blocks,
// conv_common.h), images × blocks shared among the threads.
template <typename T>
void to_channels_last(const T* src, int64_t n, int64_t c, int64_t hw, T* dst) {
  constexpr int64_t kPositions = 64;  // per block: C rows of 64 contiguous values read, 64 rows written
  const int64_t blocks = ceil_div(hw, kPositions);
#pragma omp parallel for schedule(static) num_threads(num_threads())
  for (int64_t item = 0; item < n * blocks; ++item) {
    const int64_t img = item / blocks, p0 = item % blocks * kPositions;
    transpose(src + img * c * hw + p0, hw, c, std::min(kPositions, hw - p0), dst + (img * hw + p0) * c, c);
  }
}

// Channels-last copies up to this size are kept in scratch (scratch.h) from call to call: a fresh 13 MB tensor per
// call (DeepMNIST's 32-channel 28x28 layers at batch 128, when Winograd read whole copies) page-faulted ~1900 times,
// ~40% of that weight gradient's time. Larger ones are fresh tensors, so that scratch never holds more than a few.
constexpr int64_t kKeptCopyBytes = int64_t(64) << 20;

// t (N, C, H, W)'s elements as they lie where t is contiguous, NCHW or channels-last (channels_last set to which),
// else those of a contiguous NCHW copy held by `owner`.
template <typename T>
const T* as_it_lies(const at::Tensor& t, bool& channels_last, at::Tensor& owner) {
  channels_last = !t.is_contiguous() && t.permute({0, 2, 3, 1}).is_contiguous();
  if (channels_last || t.is_contiguous()) return t.const_data_ptr<T>();
  owner = t.contiguous();
  return owner.const_data_ptr<T>();
}

// t (N, C, H, W)'s elements in N×H×W×C order: t's own when it is channels-last already, else a copy in scratch (or
// in `owner`, past kKeptCopyBytes). Contiguous NCHW is copied by to_channels_last (aten's permute copy measured 2.5x
// the time of a plain copy of the same tensor: 0.80 against 0.31 ms for 128x64x14x14), any other layout by aten.
template <typename T>
const T* channels_last(const at::Tensor& t, CallScratch& scratch, at::Tensor& owner) {
  const at::Tensor permuted = t.permute({0, 2, 3, 1});
  if (permuted.is_contiguous()) return permuted.const_data_ptr<T>();
  if (!t.is_contiguous()) {
    owner = permuted.contiguous();
    return owner.const_data_ptr<T>();
  }
  T* copy;
  if (t.numel() * int64_t(sizeof(T)) <= kKeptCopyBytes) {
    copy = scratch.whole<T>(t.numel());
  } else {
    owner = at::empty(permuted.sizes(), t.options());
    copy = owner.mutable_data_ptr<T>();
  }
  to_channels_last<T>(t.const_data_ptr<T>(), t.size(0), t.size(1), t.size(2) * t.size(3), copy);
  return copy;
}

at::Tensor conv2d_backward_weight_cpu(const at::Tensor& grad_output, const at::Tensor& input,
                                      c10::IntArrayRef weight_size, c10::IntArrayRef stride,
                                      c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t groups) {
  constexpr const char* op = "cnn_ext.conv2d_backward_weight";
  const auto shape = check_conv2d_backward_weight<int64_t>(op, grad_output, input, weight_size, stride, padding,
                                                           dilation, groups);
  check_backend_dtype(op, input, "input", {at::kFloat, at::kDouble}, "CPU");
  at::Tensor grad_weight = at::empty(shape.weight_sizes(), input.options());
  if (grad_weight.numel() == 0) return grad_weight;
  if (grad_output.numel() == 0) return grad_weight.zero_();  // empty batch: nothing to sum
  const Wgrad algorithm = choose_wgrad(shape, input.scalar_type());
  const bool winograd = algorithm == Wgrad::kWinograd || algorithm == Wgrad::kWinograd4x4;
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "cnn_ext_conv2d_backward_weight_cpu", [&] {
    // Winograd transforms along the channels of channels-last x and dY: copies of the whole tensors where it
    // transforms every tile once (few tiles), else the rows its runs of tiles read, copied as it reaches them, from
    // the tensors as they lie. The GEMM gathers from a channels-last copy of x (see gather_col_t).
    const bool winograd_copies = winograd && winograd_wgrad_needs_channels_last<scalar_t>(
                                                 winograd_problem(Conv(shape)), winograd_tile(algorithm));
    CallScratch copies;  // the kernel's own CallScratch takes the slots after these
    at::Tensor dy_owner, x_owner;  // hold dY's and x's elements where neither the inputs nor scratch do
    bool dy_channels_last = false, x_channels_last = false;
    const scalar_t* dy_data;
    const scalar_t* x_data;
    if (winograd && !winograd_copies) {
      dy_data = as_it_lies<scalar_t>(grad_output, dy_channels_last, dy_owner);
      x_data = as_it_lies<scalar_t>(input, x_channels_last, x_owner);
    } else {
      dy_channels_last = winograd_copies;
      x_channels_last = winograd_copies || algorithm == Wgrad::kGemm;
      dy_data = dy_channels_last ? channels_last<scalar_t>(grad_output, copies, dy_owner)
                                 : (dy_owner = grad_output.contiguous()).const_data_ptr<scalar_t>();
      x_data = x_channels_last ? channels_last<scalar_t>(input, copies, x_owner)
                               : (x_owner = input.contiguous()).const_data_ptr<scalar_t>();
    }
    conv2d_backward_weight<scalar_t>(shape, algorithm, dy_data, dy_channels_last, x_data, x_channels_last,
                                     grad_weight.mutable_data_ptr<scalar_t>());
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

}  // namespace

TORCH_LIBRARY_IMPL(cnn_ext, CPU, m) {
  m.impl("conv2d_backward_weight", &conv2d_backward_weight_cpu);
  m.impl("conv2d_backward_bias", &conv2d_backward_bias_cpu);
}

}  // namespace cnn_ext::cpu
