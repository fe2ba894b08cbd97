// CPU kernels for max_pool2d and avg_pool2d, forward and backward.
//
// Semantics follow torch.nn.functional exactly (ATen's MaxPoolKernel.cpp / AvgPoolKernel.cpp):
//  * max: windows are clipped to the input, so padding is never selected; a value replaces the running maximum
//    when it is greater or NaN, so ties keep the first element in row-major window order and the last NaN wins.
//    Indices are h*W + w within each (n, c) plane.
//  * avg: the sum over the clipped window is divided by divisor_override if given, else by the window's size
//    clipped to the padded input (count_include_pad) or to the input.
// Values are accumulated in the same order as ATen, so float64 results match torch's bit for bit.
//
// The forward kernels work on one output row at a time. Columns whose window lies wholly inside the input (the
// interior) need no bounds checks: for the common 2×2 and 3×3 windows each output is computed in registers in one
// pass, otherwise taps are processed one at a time as a pass over the row; both loops vectorise. Columns near the
// edges use a plain clipped loop per output. The backward kernels work on whole (n, c) planes, so no two tasks
// write the same element.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <mutex>
#include <type_traits>
#include <vector>

#include "../checks.h"
#include "../max_rule.h"
#include "dispatch.h"
#include "gemm.h"
#include "isa.h"
#include "output_cache.h"
#include "pool2d.h"
#include "window_axis.h"

namespace cnn_ext {
namespace {

using cpu::empty_output;
using cpu::WindowAxis;

constexpr const char* kMaxPool = "cnn_ext.max_pool2d";
constexpr const char* kMaxPoolBackward = "cnn_ext.max_pool2d_backward";
constexpr const char* kAvgPool = "cnn_ext.avg_pool2d";
constexpr const char* kAvgPoolBackward = "cnn_ext.avg_pool2d_backward";

// Index recorded for a max-pool window that holds no input element at all (possible only with dilation, when every
// tap lands on padding). Its output is -inf and the backward pass gives it no gradient.
constexpr int64_t kNoIndex = -1;

// The divisor of every avg-pool window, in output (P×Q) order; the forward and backward kernels share it.
template <typename scalar_t>
std::vector<scalar_t> avg_pool_divisors(const PoolShape<int64_t>& s, bool count_include_pad,
                                        c10::optional<int64_t> divisor_override) {
  std::vector<scalar_t> divisors(s.p * s.q);
  for (int64_t oh = 0; oh < s.p; ++oh) {
    for (int64_t ow = 0; ow < s.q; ++ow) {
      int64_t divisor;
      if (divisor_override.has_value()) {
        divisor = *divisor_override;
      } else {
        const int64_t h0 = oh * s.stride_h - s.pad_h, w0 = ow * s.stride_w - s.pad_w;
        // The window clipped to the padded input (count_include_pad) or to the input itself.
        const int64_t h1 = std::min(h0 + s.kh, s.h + s.pad_h), w1 = std::min(w0 + s.kw, s.w + s.pad_w);
        if (count_include_pad) {
          divisor = (h1 - h0) * (w1 - w0);
        } else {
          divisor = (std::min(h1, s.h) - std::max(h0, int64_t(0))) * (std::min(w1, s.w) - std::max(w0, int64_t(0)));
        }
      }
      divisors[oh * s.q + ow] = static_cast<scalar_t>(divisor);
    }
  }
  return divisors;
}

// at::parallel_for grain: enough items that each task does about as many element operations as ATen's GRAIN_SIZE
// (smaller tasks cost more to hand out than to run).
int64_t grain_for(int64_t work_per_item) {
  constexpr int64_t kWorkPerTask = 32768;
  return std::max<int64_t>(1, kWorkPerTask / std::max<int64_t>(1, work_per_item));
}

// The window shape as compile-time constants where it is common: Kernel is the side of a square, undilated window
// (2 or 3) and Stride the column stride (1 or 2); 0 means "not fixed, read it from the PoolShape at run time".
// With both fixed, each output of a row is computed in registers in one pass and the compiler vectorises across
// the row's windows; with only the stride fixed, the tap-by-tap loops still vectorise.
template <int Kernel, int Stride>
struct FixedWindow {
  static constexpr int kernel = Kernel, stride = Stride;
};

// f(FixedWindow<...>) for the window of s, or FixedWindow<0, 0> (nothing fixed) unless `fixed`.
template <typename F>
void dispatch_fixed_window(const PoolShape<int64_t>& s, bool fixed, F&& f) {
  const bool square_undilated = s.kh == s.kw && s.dil_h == 1 && s.dil_w == 1;
  const int64_t k = square_undilated && fixed ? s.kh : 0, sw = fixed ? s.stride_w : 0;
  if (k == 2 && sw == 1) return f(FixedWindow<2, 1>());
  if (k == 2 && sw == 2) return f(FixedWindow<2, 2>());
  if (k == 3 && sw == 1) return f(FixedWindow<3, 1>());
  if (k == 3 && sw == 2) return f(FixedWindow<3, 2>());
  if (sw == 1) return f(FixedWindow<0, 1>());
  if (sw == 2) return f(FixedWindow<0, 2>());
  f(FixedWindow<0, 0>());
}

// ---------------------------------------------------------------------------------------------------------------
// max_pool2d
// ---------------------------------------------------------------------------------------------------------------

// Plane offset of a max-pool window's winning tap relative to its first tap, in an integer as wide as scalar_t so
// that the compare-and-select vectorises.
template <typename scalar_t>
using tap_t = std::conditional_t<sizeof(scalar_t) == 4, int32_t, int64_t>;

// n adjacent K×K windows (Win fixed) lying wholly inside the input; src points at the first window's first tap.
template <typename scalar_t, typename Win>
__attribute__((always_inline)) inline void max_fixed_windows(const scalar_t* __restrict src, int64_t row_stride, int64_t n, scalar_t* __restrict best_value,
                       tap_t<scalar_t>* __restrict best_tap) {
  constexpr int K = Win::kernel, S = Win::stride;
  for (int64_t k = 0; k < n; ++k) {
    scalar_t best = -std::numeric_limits<scalar_t>::infinity();
    tap_t<scalar_t> tap = 0;
    for (int i = 0; i < K; ++i) {
      for (int j = 0; j < K; ++j) {
        const scalar_t v = src[i * row_stride + k * S + j];
        const bool take = takes_over(v, best);
        best = take ? v : best;
        tap = take ? static_cast<tap_t<scalar_t>>(i * row_stride + j) : tap;
      }
    }
    best_value[k] = best;
    best_tap[k] = tap;
  }
}

// One output row of max pooling.
template <typename scalar_t, typename Win>
__attribute__((always_inline)) inline void max_pool_row(const PoolShape<int64_t>& s, const WindowAxis& rows, const WindowAxis& cols, int64_t oh,
                  const scalar_t* __restrict plane, scalar_t* __restrict out, int64_t* __restrict indices) {
  const int64_t sw = Win::stride ? Win::stride : s.stride_w;
  const int64_t h_begin = rows.begin[oh], h_end = rows.end[oh];
  const scalar_t lowest = -std::numeric_limits<scalar_t>::infinity();

  // A window whose value is greater than the running maximum, or NaN, takes over.
  auto max_clipped_window = [&](int64_t ow) {
    const int64_t w_begin = cols.begin[ow], w_end = cols.end[ow];
    if (h_begin >= h_end || w_begin >= w_end) {
      out[ow] = lowest;
      indices[ow] = kNoIndex;
      return;
    }
    scalar_t best = lowest;
    int64_t best_index = h_begin * s.w + w_begin;
    for (int64_t h = h_begin; h < h_end; h += s.dil_h) {
      for (int64_t w = w_begin; w < w_end; w += s.dil_w) {
        const scalar_t v = plane[h * s.w + w];
        if (takes_over(v, best)) {
          best = v;
          best_index = h * s.w + w;
        }
      }
    }
    out[ow] = best;
    indices[ow] = best_index;
  };

  // Planes too large for tap_t offsets take the clipped path throughout.
  const bool taps_fit = s.h * s.w <= std::numeric_limits<tap_t<scalar_t>>::max();
  const int64_t q0 = taps_fit ? cols.interior_begin : s.q, q1 = taps_fit ? cols.interior_end : s.q;
  for (int64_t ow = 0; ow < q0; ++ow) max_clipped_window(ow);
  for (int64_t ow = q1; ow < s.q; ++ow) max_clipped_window(ow);
  if (q0 >= q1) return;
  if (h_begin >= h_end) {  // every row of these windows is padding
    std::fill(out + q0, out + q1, lowest);
    std::fill(indices + q0, indices + q1, kNoIndex);
    return;
  }

  // Interior, in blocks of windows. Unless the fixed-window kernel applies (the row's windows are not clipped at
  // the top or bottom), taps are visited in row-major window order, each as one pass over the block.
  const bool fixed = Win::kernel != 0 && h_end - h_begin == s.kh;
  constexpr int64_t kBlock = 256;
  tap_t<scalar_t> best_tap[kBlock];
  for (int64_t k0 = q0; k0 < q1; k0 += kBlock) {
    const int64_t n = std::min(kBlock, q1 - k0);
    const int64_t first_tap = h_begin * s.w + k0 * sw - s.pad_w;  // plane offset of window k0's first tap
    scalar_t* __restrict best = out + k0;
    if constexpr (Win::kernel != 0) {
      if (fixed) max_fixed_windows<scalar_t, Win>(plane + first_tap, s.w, n, best, best_tap);
    }
    if (!fixed) {
      std::fill(best, best + n, lowest);
      std::fill(best_tap, best_tap + n, 0);
      for (int64_t h = h_begin; h < h_end; h += s.dil_h) {
        for (int64_t j = 0; j < s.kw; ++j) {
          const auto tap = static_cast<tap_t<scalar_t>>((h - h_begin) * s.w + j * s.dil_w);
          const scalar_t* __restrict src = plane + first_tap + tap;
          for (int64_t k = 0; k < n; ++k) {
            const scalar_t v = src[k * sw];
            const bool take = takes_over(v, best[k]);
            best[k] = take ? v : best[k];
            best_tap[k] = take ? tap : best_tap[k];
          }
        }
      }
    }
    for (int64_t k = 0; k < n; ++k) indices[k0 + k] = first_tap + k * sw + best_tap[k];
  }
}

// Output rows [first, last) of all planes (N*C*P rows). Compiled per ISA (PerIsa), and run as AVX2 on AVX-512
// machines too: MNIST's rows are 4 to 12 windows, shorter than one 16-lane step, and GCC compiles the AVX-512
// variant's remainder loop with branches on the data (measured 3x slower than AVX2's 8-lane steps there).
template <typename scalar_t, typename Win>
__attribute__((always_inline)) inline void max_pool_rows(const PoolShape<int64_t>& s, const WindowAxis& rows,
                                                         const WindowAxis& cols, const scalar_t* input,
                                                         scalar_t* output, int64_t* indices, int64_t first,
                                                         int64_t last) {
  for (int64_t r = first; r < last; ++r) {
    const int64_t plane = r / s.p, oh = r % s.p;
    max_pool_row<scalar_t, Win>(s, rows, cols, oh, input + plane * s.h * s.w, output + r * s.q, indices + r * s.q);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// max_pool2d on 2x2 windows tiling the input (stride 2, no padding, H = 2P, W = 2Q: the MNIST models' pooling).
// Row pair m of the stacked planes (N*C*H rows) is output row m, and its Q windows are the lanes of 16- or 32-byte
// vectors (the narrower where it holds Q; tiled_bytes): the rows' even and odd columns deinterleaved, each row's two
// taps compared, then the rows' winners, which picks the tap the row-major scan picks (the first maximum, the last
// NaN) with no branch on the data. A row pair's vectors run past its Q windows into the next row pairs, which are
// computed after it; the last row pairs of a task, whose vectors would leave the task's rows, go one window at a
// time.
// ---------------------------------------------------------------------------------------------------------------

template <typename T, int Bytes>
struct TiledPairs {
  using Vec = cpu::Vector<T, Bytes>;
  using V = typename Vec::V;
  static constexpr int L = Vec::kLanes;
  using I = typename Vec::Index;  // lanes as wide as T's: V's comparison masks
  using IV = typename Vec::Mask;

  static inline __attribute__((always_inline)) IV takes(V v, V best) { return (v > best) | (v != v); }

  // Q windows of the row pair a, a + w (w = 2q); `base` is the in-plane offset of its first row.
  static inline __attribute__((always_inline)) void forward(const T* __restrict a, int64_t w, int64_t q, int64_t base,
                                                            T* __restrict out, int64_t* __restrict indices) {
    const T* __restrict b = a + w;
    for (int64_t j0 = 0; j0 < q; j0 += L) {
      const V a_lo = Vec::load(a + 2 * j0), a_hi = Vec::load(a + 2 * j0 + L);
      const V b_lo = Vec::load(b + 2 * j0), b_hi = Vec::load(b + 2 * j0 + L);
      const V a0 = __builtin_shuffle(a_lo, a_hi, Vec::kEvens), a1 = __builtin_shuffle(a_lo, a_hi, Vec::kOdds);
      const V b0 = __builtin_shuffle(b_lo, b_hi, Vec::kEvens), b1 = __builtin_shuffle(b_lo, b_hi, Vec::kOdds);
      const IV ta = takes(a1, a0), tb = takes(b1, b0);
      const V va = ta ? a1 : a0, vb = tb ? b1 : b0;
      const IV t = takes(vb, va);
      Vec::store(out + j0, t ? vb : va);
      // The winner's offset in its window: 0 or 1 in the first row, w or w + 1 in the second (masks are -1 or 0).
      I tap[L];
      cpu::store_as(tap, (t & ((IV{} + I(w)) - tb)) | (~t & -ta));
      for (int j = 0; j < L; ++j) indices[j0 + j] = base + 2 * (j0 + j) + tap[j];
    }
  }
};

// One window of the tiled pooling, tap by tap: a points at its first tap, `base` is that tap's in-plane offset.
template <typename T>
inline void max_tiled_window(const T* a, int64_t w, int64_t base, T* out, int64_t* index) {
  T best = a[0];
  int64_t best_tap = 0;
  for (const int64_t tap : {int64_t(1), w, w + 1}) {
    if (takes_over(a[tap], best)) {
      best = a[tap];
      best_tap = tap;
    }
  }
  *out = best;
  *index = base + best_tap;
}

// Row pairs [first, last) of the stacked planes (a task's). Compiled per ISA (PerIsa) and per vector width.
// padded: the buffers have MaxPoolRows' kSlack elements of room past the last row pair's, so it runs in vectors too.
template <typename T, int Bytes>
__attribute__((always_inline)) inline void max_tiled_rows(const PoolShape<int64_t>& s, const T* input, T* output,
                                                          int64_t* indices, int64_t first, int64_t last,
                                                          bool padded) {
  using Pairs = TiledPairs<T, Bytes>;
  const int64_t q = s.q, w = s.w, covered = cpu::detail::round_up(q, Pairs::L);  // outputs a row pair's vectors write
  // Past the last row pair's outputs, its vectors write covered - q < L values, and its second row's loads read
  // 2 (covered - q) past the plane.
  static_assert(2 * Pairs::L <= cpu::MaxPoolRows<T>::kSlack, "the padded buffers' room");
  for (int64_t m = first; m < last; ++m) {
    const T* a = input + m * 2 * w;
    const int64_t base = m % s.p * 2 * w;
    if (padded || m * q + covered <= last * q) {
      Pairs::forward(a, w, q, base, output + m * q, indices + m * q);
    } else {
      for (int64_t j = 0; j < q; ++j) {
        max_tiled_window(a + 2 * j, w, base + 2 * j, output + m * q + j, indices + m * q + j);
      }
    }
  }
}

// The vector width of the tiled kernel: the fewest bytes of 16 and 32 that hold Q lanes of T, within the ISA's
// vectors. Not 64: GCC 12 compiles the comparisons of 64-byte vectors into masks lane by lane.
int tiled_bytes(int64_t q, int64_t element_size) {
  return cpu::isa() != cpu::Isa::kDefault && q * element_size > 16 ? 32 : 16;
}

}  // namespace

template <typename T>
cpu::MaxPoolRows<T>::MaxPoolRows(const PoolShape<int64_t>& s)
    : s_(s),
      row_axis_(s.p, s.h, s.kh, s.stride_h, s.pad_h, s.dil_h),
      col_axis_(s.q, s.w, s.kw, s.stride_w, s.pad_w, s.dil_w) {
  const cpu::MaxPoolForward algorithm = cpu::choose_max_pool_forward(s);
  if (algorithm == cpu::MaxPoolForward::kTiled2x2) {
    using Rows16 = cpu::PerIsa<&max_tiled_rows<T, 16>>;
    using Rows32 = cpu::PerIsa<&max_tiled_rows<T, 32>>;
    tiled_ = tiled_bytes(s.q, sizeof(T)) == 32 ? Rows32::pick() : Rows16::pick();
    return;
  }
  dispatch_fixed_window(s, algorithm == cpu::MaxPoolForward::kFixedWindow, [&](auto window) {
    using Variants = cpu::PerIsa<&max_pool_rows<T, decltype(window)>>;
    windows_ = cpu::by_isa<typename Variants::Fn>(&Variants::avx2, &Variants::avx2, &Variants::portable);
  });
}

template <typename T>
void cpu::MaxPoolRows<T>::rows(const T* input, T* output, int64_t* indices, int64_t first, int64_t last,
                               bool padded) const {
  if (tiled_) return tiled_(s_, input, output, indices, first, last, padded);
  windows_(s_, row_axis_, col_axis_, input, output, indices, first, last);
}

template class cpu::MaxPoolRows<float>;
template class cpu::MaxPoolRows<double>;

namespace {

std::tuple<at::Tensor, at::Tensor> max_pool2d_cpu(const at::Tensor& input_, c10::IntArrayRef kernel_size,
                                                  c10::IntArrayRef stride, c10::IntArrayRef padding,
                                                  c10::IntArrayRef dilation, bool ceil_mode) {
  const auto s = check_pool2d<int64_t>(kMaxPool, input_, kernel_size, stride, padding, dilation, ceil_mode);
  check_backend_dtype(kMaxPool, input_, "input", {at::kFloat, at::kDouble}, "CPU");
  const at::Tensor input = input_.contiguous();
  auto out_sizes = s.output_sizes();
  at::Tensor output = empty_output(out_sizes, input.options());
  at::Tensor indices = empty_output(out_sizes, input.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "max_pool2d_cpu", [&] {
    const scalar_t* in = input.const_data_ptr<scalar_t>();
    scalar_t* out = output.mutable_data_ptr<scalar_t>();
    int64_t* idx = indices.mutable_data_ptr<int64_t>();
    const cpu::MaxPoolRows<scalar_t> pool(s);
    // The tiled kernel's rows are row pairs of the input, 4 values per output; the others' windows kh*kw.
    const int64_t work = pool.tiled() ? 4 * s.q : s.q * s.kh * s.kw;
    at::parallel_for(0, s.n * s.c * s.p, grain_for(work),
                     [&](int64_t first, int64_t last) { pool.rows(in, out, idx, first, last); });
  });
  return {output, indices};
}

at::Tensor max_pool2d_backward_cpu(const at::Tensor& grad_output_, const at::Tensor& indices_,
                                   c10::IntArrayRef input_size, c10::IntArrayRef kernel_size,
                                   c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef dilation,
                                   bool ceil_mode) {
  const auto s = check_max_pool2d_backward<int64_t>(kMaxPoolBackward, grad_output_, indices_, input_size,
                                                    kernel_size, stride, padding, dilation, ceil_mode);
  check_backend_dtype(kMaxPoolBackward, grad_output_, "grad_output", {at::kFloat, at::kDouble}, "CPU");
  const at::Tensor grad_output = grad_output_.contiguous();
  const at::Tensor indices = indices_.contiguous();
  at::Tensor grad_input = empty_output(s.input_sizes(), grad_output.options());

  const int64_t plane_in = s.h * s.w, plane_out = s.p * s.q;
  // The first invalid index (lowest flat position in indices), found inside the parallel region and raised after it.
  std::mutex bad_mutex;
  int64_t bad_position = -1;

  AT_DISPATCH_FLOATING_TYPES(grad_output.scalar_type(), "max_pool2d_backward_cpu", [&] {
    const scalar_t* go = grad_output.const_data_ptr<scalar_t>();
    const int64_t* idx = indices.const_data_ptr<int64_t>();
    scalar_t* gi = grad_input.mutable_data_ptr<scalar_t>();
    // Each task owns whole planes, so the scatter has no races and adds in output order, as ATen does.
    at::parallel_for(0, s.n * s.c, grain_for(plane_in + plane_out), [&](int64_t first, int64_t last) {
      int64_t first_bad = -1;
      for (int64_t plane = first; plane < last; ++plane) {
        scalar_t* gi_plane = gi + plane * plane_in;
        std::memset(gi_plane, 0, sizeof(scalar_t) * plane_in);
        const scalar_t* go_plane = go + plane * plane_out;
        const int64_t* idx_plane = idx + plane * plane_out;
        for (int64_t o = 0; o < plane_out; ++o) {
          const int64_t i = idx_plane[o];
          if (static_cast<uint64_t>(i) < static_cast<uint64_t>(plane_in)) {
            gi_plane[i] += go_plane[o];
          } else if (i != kNoIndex && first_bad < 0) {
            first_bad = plane * plane_out + o;
          }
        }
      }
      if (first_bad >= 0) {
        std::lock_guard<std::mutex> lock(bad_mutex);
        if (bad_position < 0 || first_bad < bad_position) bad_position = first_bad;
      }
    });
  });

  if (bad_position >= 0) {
    fail_bad_max_pool_index(kMaxPoolBackward, s, bad_position, indices.const_data_ptr<int64_t>()[bad_position],
                            "input plane", "H*W");
  }
  return grad_input;
}

// ---------------------------------------------------------------------------------------------------------------
// avg_pool2d
// ---------------------------------------------------------------------------------------------------------------

// n adjacent K×K windows (Win fixed) lying wholly inside the input; src points at the first window's first tap.
template <typename scalar_t, typename Win>
void sum_fixed_windows(const scalar_t* __restrict src, int64_t row_stride, int64_t n, scalar_t* __restrict sum) {
  constexpr int K = Win::kernel, S = Win::stride;
  for (int64_t k = 0; k < n; ++k) {
    scalar_t acc = 0;  // from 0, as ATen, so that a window of -0s sums to +0
    for (int i = 0; i < K; ++i) {
      for (int j = 0; j < K; ++j) acc += src[i * row_stride + k * S + j];
    }
    sum[k] = acc;
  }
}

// One output row of average pooling.
template <typename scalar_t, typename Win>
void avg_pool_row(const PoolShape<int64_t>& s, const WindowAxis& rows, const WindowAxis& cols, int64_t oh,
                  const scalar_t* __restrict plane, const scalar_t* __restrict divisors, scalar_t* __restrict out) {
  const int64_t sw = Win::stride ? Win::stride : s.stride_w;
  const int64_t h_begin = rows.begin[oh], h_end = rows.end[oh];

  auto sum_clipped_window = [&](int64_t ow) {
    scalar_t sum = 0;
    for (int64_t h = h_begin; h < h_end; ++h) {
      for (int64_t w = cols.begin[ow]; w < cols.end[ow]; ++w) sum += plane[h * s.w + w];
    }
    out[ow] = sum / divisors[ow];
  };

  const int64_t q0 = cols.interior_begin, q1 = cols.interior_end;
  for (int64_t ow = 0; ow < q0; ++ow) sum_clipped_window(ow);
  for (int64_t ow = q1; ow < s.q; ++ow) sum_clipped_window(ow);
  if (q0 >= q1) return;

  // Interior: sums accumulate in out, over taps in row-major window order (ATen's summation order); unless the
  // fixed-window kernel applies, each tap is one pass over the row.
  const int64_t n = q1 - q0;
  const scalar_t* first_tap = plane + h_begin * s.w + q0 * sw - s.pad_w;  // window q0's first tap
  scalar_t* __restrict sum = out + q0;
  const bool fixed = Win::kernel != 0 && h_end - h_begin == s.kh;
  if constexpr (Win::kernel != 0) {
    if (fixed) sum_fixed_windows<scalar_t, Win>(first_tap, s.w, n, sum);
  }
  if (!fixed) {
    std::fill(sum, sum + n, scalar_t(0));
    for (int64_t i = 0; i < h_end - h_begin; ++i) {
      for (int64_t j = 0; j < s.kw; ++j) {
        const scalar_t* __restrict src = first_tap + i * s.w + j;
        for (int64_t k = 0; k < n; ++k) sum[k] += src[k * sw];
      }
    }
  }
  for (int64_t k = 0; k < n; ++k) sum[k] /= divisors[q0 + k];
}

// out[m][j] = (((0 + a[2j]) + a[2j + 1]) + b[2j]) + b[2j + 1]) / 4 with a, b the rows of pair m: the generic path's
// summation order (from 0, taps in row-major order), so the same bits.
template <typename scalar_t>
void avg_pool_forward_tiled_2x2(const PoolShape<int64_t>& s, const scalar_t* input, scalar_t* output) {
  const int64_t pairs = s.n * s.c * s.p, q = s.q, w = s.w;
  at::parallel_for(0, pairs, grain_for(4 * q), [&](int64_t first, int64_t last) {
    for (int64_t m = first; m < last; ++m) {
      const scalar_t* __restrict a = input + m * 2 * w;
      const scalar_t* __restrict b = a + w;
      scalar_t* __restrict o = output + m * q;
      for (int64_t j = 0; j < q; ++j) o[j] = (((scalar_t(0) + a[2 * j]) + a[2 * j + 1]) + b[2 * j]) + b[2 * j + 1];
      for (int64_t j = 0; j < q; ++j) o[j] /= scalar_t(4);
    }
  });
}

template <typename scalar_t, typename Win>
void avg_pool_forward(const PoolShape<int64_t>& s, const scalar_t* input, const std::vector<scalar_t>& divisors,
                      scalar_t* output) {
  const WindowAxis rows(s.p, s.h, s.kh, s.stride_h, s.pad_h, 1);
  const WindowAxis cols(s.q, s.w, s.kw, s.stride_w, s.pad_w, 1);
  const int64_t num_rows = s.n * s.c * s.p;
  at::parallel_for(0, num_rows, grain_for(s.q * s.kh * s.kw), [&](int64_t first, int64_t last) {
    for (int64_t r = first; r < last; ++r) {
      const int64_t plane = r / s.p, oh = r % s.p;
      avg_pool_row<scalar_t, Win>(s, rows, cols, oh, input + plane * s.h * s.w, divisors.data() + oh * s.q,
                                  output + r * s.q);
    }
  });
}

at::Tensor avg_pool2d_cpu(const at::Tensor& input_, c10::IntArrayRef kernel_size, c10::IntArrayRef stride,
                          c10::IntArrayRef padding, bool ceil_mode, bool count_include_pad,
                          c10::optional<int64_t> divisor_override) {
  check_divisor_override(kAvgPool, divisor_override);
  const int64_t no_dilation[2] = {1, 1};
  const auto s = check_pool2d<int64_t>(kAvgPool, input_, kernel_size, stride, padding, no_dilation, ceil_mode);
  check_backend_dtype(kAvgPool, input_, "input", {at::kFloat, at::kDouble}, "CPU");
  const at::Tensor input = input_.contiguous();
  at::Tensor output = empty_output(s.output_sizes(), input.options());
  const cpu::AvgPoolForward algorithm = cpu::choose_avg_pool_forward(s, divisor_override);
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "avg_pool2d_cpu", [&] {
    const scalar_t* in = input.const_data_ptr<scalar_t>();
    scalar_t* out = output.mutable_data_ptr<scalar_t>();
    if (algorithm == cpu::AvgPoolForward::kTiled2x2) {
      avg_pool_forward_tiled_2x2<scalar_t>(s, in, out);
      return;
    }
    const auto divisors = avg_pool_divisors<scalar_t>(s, count_include_pad, divisor_override);
    dispatch_fixed_window(s, algorithm == cpu::AvgPoolForward::kFixedWindow, [&](auto window) {
      avg_pool_forward<scalar_t, decltype(window)>(s, in, divisors, out);
    });
  });
  return output;
}

// The outputs whose windows contain each input position along one dimension: [first[i], last[i]] (empty when
// first > last). Windows are not clipped for this: an input position is inside a window exactly when it lies
// between the window's unclipped start and end.
struct CoveringOutputs {
  std::vector<int64_t> first, last;

  CoveringOutputs(int64_t in_size, int64_t out_size, int64_t kernel, int64_t stride, int64_t pad)
      : first(in_size), last(in_size) {
    for (int64_t i = 0; i < in_size; ++i) {
      // o*stride - pad <= i < o*stride - pad + kernel
      const int64_t lo = i + pad - kernel + 1;
      first[i] = lo <= 0 ? 0 : (lo + stride - 1) / stride;
      last[i] = std::min<int64_t>(out_size - 1, (i + pad) / stride);
    }
  }
};

// Gradient of one plane. Each input position gathers the shares of the windows covering it, in output order, which
// is the order ATen's scatter adds them in; no two positions write the same element.
template <typename scalar_t, typename Win>
void avg_pool_backward_plane(const PoolShape<int64_t>& s, const CoveringOutputs& rows, const CoveringOutputs& cols,
                             const scalar_t* __restrict share, scalar_t* __restrict gi) {
  const bool disjoint_windows = s.stride_h == s.kh && s.stride_w == s.kw && s.pad_h == 0 && s.pad_w == 0;
  if (disjoint_windows) {
    // Each position lies in at most one window and takes that window's share (0 + share, as in ATen, which turns -0
    // into +0). Positions past the last window (floor mode) get zero; in ceil mode the last window may be cut short.
    const int64_t kw = Win::stride ? Win::stride : s.kw;  // stride == kernel here
    const int64_t full_windows = std::min(s.q, s.w / kw), covered_w = std::min(s.q * kw, s.w);
    for (int64_t h = 0; h < s.h; ++h) {
      scalar_t* __restrict row = gi + h * s.w;
      const int64_t oh = h / s.kh;
      if (oh >= s.p) {
        std::fill(row, row + s.w, scalar_t(0));
        continue;
      }
      const scalar_t* __restrict share_row = share + oh * s.q;
      for (int64_t ow = 0; ow < full_windows; ++ow) {
        for (int64_t j = 0; j < kw; ++j) row[ow * kw + j] = scalar_t(0) + share_row[ow];
      }
      for (int64_t w = full_windows * kw; w < covered_w; ++w) row[w] = scalar_t(0) + share_row[full_windows];
      std::fill(row + covered_w, row + s.w, scalar_t(0));
    }
    return;
  }
  for (int64_t h = 0; h < s.h; ++h) {
    for (int64_t w = 0; w < s.w; ++w) {
      scalar_t sum = 0;
      for (int64_t oh = rows.first[h]; oh <= rows.last[h]; ++oh) {
        for (int64_t ow = cols.first[w]; ow <= cols.last[w]; ++ow) sum += share[oh * s.q + ow];
      }
      gi[h * s.w + w] = sum;
    }
  }
}

at::Tensor avg_pool2d_backward_cpu(const at::Tensor& grad_output_, c10::IntArrayRef input_size,
                                   c10::IntArrayRef kernel_size, c10::IntArrayRef stride, c10::IntArrayRef padding,
                                   bool ceil_mode, bool count_include_pad, c10::optional<int64_t> divisor_override) {
  const auto s = check_avg_pool2d_backward<int64_t>(kAvgPoolBackward, grad_output_, input_size, kernel_size, stride,
                                                    padding, ceil_mode, divisor_override);
  check_backend_dtype(kAvgPoolBackward, grad_output_, "grad_output", {at::kFloat, at::kDouble}, "CPU");
  const at::Tensor grad_output = grad_output_.contiguous();
  at::Tensor grad_input = empty_output(s.input_sizes(), grad_output.options());
  const int64_t plane_in = s.h * s.w, plane_out = s.p * s.q;
  const cpu::AvgPoolBackward algorithm = cpu::choose_avg_pool_backward(s, divisor_override);
  AT_DISPATCH_FLOATING_TYPES(grad_output.scalar_type(), "avg_pool2d_backward_cpu", [&] {
    const auto divisors = avg_pool_divisors<scalar_t>(s, count_include_pad, divisor_override);
    const CoveringOutputs rows(s.h, s.p, s.kh, s.stride_h, s.pad_h);
    const CoveringOutputs cols(s.w, s.q, s.kw, s.stride_w, s.pad_w);
    const scalar_t* go = grad_output.const_data_ptr<scalar_t>();
    scalar_t* gi = grad_input.mutable_data_ptr<scalar_t>();
    if (algorithm == cpu::AvgPoolBackward::kTiled2x2) {
      // Each input element takes its window's share, 0 + go / 4, as the disjoint-window path below.
      const int64_t pairs = s.n * s.c * s.p, q = s.q, w = s.w;
      at::parallel_for(0, pairs, grain_for(4 * q), [&](int64_t first, int64_t last) {
        for (int64_t m = first; m < last; ++m) {
          const scalar_t* __restrict g = go + m * q;
          scalar_t* __restrict a = gi + m * 2 * w;
          scalar_t* __restrict b = a + w;
          for (int64_t j = 0; j < q; ++j) {
            const scalar_t share = scalar_t(0) + g[j] / scalar_t(4);
            a[2 * j] = a[2 * j + 1] = b[2 * j] = b[2 * j + 1] = share;
          }
        }
      });
      return;
    }
    dispatch_fixed_window(s, true, [&](auto window) {
      at::parallel_for(0, s.n * s.c, grain_for(plane_in + plane_out), [&](int64_t first, int64_t last) {
        std::vector<scalar_t> share(plane_out);  // each window's share of its gradient: grad_output / divisor
        for (int64_t plane = first; plane < last; ++plane) {
          const scalar_t* go_plane = go + plane * plane_out;
          for (int64_t o = 0; o < plane_out; ++o) share[o] = go_plane[o] / divisors[o];
          avg_pool_backward_plane<scalar_t, decltype(window)>(s, rows, cols, share.data(), gi + plane * plane_in);
        }
      });
    });
  });
  return grad_input;
}

}  // namespace

TORCH_LIBRARY_IMPL(cnn_ext, CPU, m) {
  m.impl("max_pool2d", &max_pool2d_cpu);
  m.impl("max_pool2d_backward", &max_pool2d_backward_cpu);
  m.impl("avg_pool2d", &avg_pool2d_cpu);
  m.impl("avg_pool2d_backward", &avg_pool2d_backward_cpu);
}

}  // namespace cnn_ext
