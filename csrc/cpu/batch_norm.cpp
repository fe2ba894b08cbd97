// CPU batch normalisation (cnn_ext.batch_norm, cnn_ext.batch_norm_backward) over dimension 1 of an (N, C, ...)
// input, and with the ReLU after it fused (cnn_ext.batch_norm_relu: the forward clamps as it writes and records a
// byte per value saying whether ReLU kept it; the backward, given that mask, masks dy as it reads it, so ReLU's own
// backward pass and its 12.8 MB gradient (DeepMNIST's 32-channel layers) are gone), and with a max-pooling after
// that too (cnn_ext.batch_norm_relu_max_pool2d: planes normalised into a buffer and pooled from it; the backward
// rebuilds dY plane by plane from the pooled gradient). One task per channel: its N planes of L = H·W·... values
// are summed in a fixed order (vector lanes, blocks of them added in double), so results do not depend on the
// thread count, and a task's passes re-read its channel from L2 where it fits (DeepMNIST's widest layer: 400 KB per
// channel of x; the backward reads dY too). torch's own kernels took 2.2 ms (forward) and 1.4 ms (backward) for
// 128x32x28x28 on the 2-core AMD machine, a plain copy of it 0.19 ms; these 0.43-0.56 and 0.52-1.04 ms.
//
//   forward, training:  mean = Σx / M, var = Σ(x - mean)² / M (two passes: no cancellation), M = N·L
//   forward:            y = (x - mean) · (weight · invstd) + bias,  invstd = 1 / sqrt(var + eps)
//   backward, training: dx = (dy - Σdy / M - (x - mean) · invstd² · Σdy(x - mean) / M) · weight · invstd
//   backward, eval:     dx = dy · weight · invstd
//   dweight = Σdy(x - mean) · invstd,  dbias = Σdy
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../checks.h"
#include "conv_common.h"
#include "isa.h"
#include "output_cache.h"
#include "pool2d.h"

namespace cnn_ext::cpu {
namespace {

// One channel's values: N planes of L, `stride` apart.
template <typename T>
struct Channel {
  const T* x;
  int64_t n, l, stride;
};

// Sums run in T, in vectors of 64 bytes (two accumulators), each lane adding at most kBlock / 32 = 16 terms so that
// float32's rounding stays that of short sums; then the lanes add into double, in a fixed order (the same vectors on
// every ISA: GCC splits them for AVX2 and the portable build). A plane's values go two vectors at a time, the last
// ones (fewer than 32 floats) as vectors filled up with zeros; blocks run across planes, so a channel of small
// planes (DeepMNIST's last layer: 5x5) is summed as fast as one long plane. Summing in double throughout measured 2x
// the time: every value converted, half the values per vector.
constexpr int64_t kBlock = 512;

template <typename T>
struct VecOf;
template <>
struct VecOf<float> {
  typedef float type __attribute__((vector_size(64)));
  typedef int32_t lane;
  typedef lane lanes __attribute__((vector_size(64)));
};
template <>
struct VecOf<double> {
  typedef double type __attribute__((vector_size(64)));
  typedef int64_t lane;
  typedef lane lanes __attribute__((vector_size(64)));
};
template <typename T>
using Vec = typename VecOf<T>::type;
template <typename T>
constexpr int64_t kWidth = 64 / sizeof(T);

template <typename T>
inline __attribute__((always_inline)) Vec<T> load(const T* p) {
  Vec<T> v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// v with lanes from `count` on set to 0. The mask comes from a shift (index - count is negative below count), not a
// comparison: GCC 12 lowers a vector comparison in these ISA-generic bodies, compiled in the baseline context before
// they are inlined into each ISA's variant, into a branch per lane.
template <typename T>
inline __attribute__((always_inline)) Vec<T> keep_first(Vec<T> v, int64_t count) {
  using Lanes = typename VecOf<T>::lanes;
  Lanes index;
  for (int64_t k = 0; k < kWidth<T>; ++k) index[k] = k;
  const Lanes below = (index - static_cast<typename VecOf<T>::lane>(count)) >> (8 * sizeof(T) - 1);
  return reinterpret_cast<Vec<T>>(reinterpret_cast<Lanes>(v) & below);
}

// The first `count` (0 to kWidth) values at p in lanes 0 .. count - 1, zeros in the others; nothing outside
// [p - before, p + count) is read. Where those reach a whole vector, the one ending at p + count, its lanes rotated
// down; else a copy of `count` values, which GCC compiles to a libc call: one per plane's last values cost
// DeepMNIST's training step 330k calls (its 5x5 and 14x14 planes, forward and backward).
template <typename T>
inline __attribute__((always_inline)) Vec<T> load_first(const T* p, int64_t count, int64_t before) {
  constexpr int64_t w = kWidth<T>;
  if (count == w) return load(p);
  if (count == 0) return Vec<T>{};
  if (before + count >= w) {
    typename VecOf<T>::lanes index;  // lane k from lane k + w - count (modulo w, as __builtin_shuffle reads it)
    for (int64_t k = 0; k < w; ++k) index[k] = static_cast<typename VecOf<T>::lane>(k + w - count);
    return keep_first<T>(__builtin_shuffle(load(p + count - w), index), count);
  }
  Vec<T> v{};
  std::memcpy(&v, p, count * sizeof(T));
  return v;
}

template <typename T>
inline __attribute__((always_inline)) double lane_sum(Vec<T> v) {
  double sum = 0;
  for (int64_t k = 0; k < kWidth<T>; ++k) sum += double(v[k]);
  return sum;
}

// Vector accumulators of one or two sums, emptied into double every kBlock values.
template <typename T>
struct BlockSums {
  Vec<T> a0{}, a1{}, b0{}, b1{};
  int64_t filled = 0;
  double a = 0, b = 0;

  // Two vectors of values (x0, x1) into the first sum and, if second, (y0, y1) into the second.
  inline __attribute__((always_inline)) void add(Vec<T> x0, Vec<T> x1, Vec<T> y0, Vec<T> y1, bool second) {
    a0 += x0;
    a1 += x1;
    if (second) {
      b0 += y0;
      b1 += y1;
    }
    filled += 2 * kWidth<T>;
    if (filled >= kBlock) flush(second);
  }
  inline __attribute__((always_inline)) void flush(bool second) {
    a += lane_sum<T>(a0 + a1);
    if (second) b += lane_sum<T>(b0 + b1);
    a0 = a1 = b0 = b1 = Vec<T>{};
    filled = 0;
  }
};

// Fetches the lines of the n values at p (towards L2; for writing if kWrite). A channel is N planes far apart, each
// a short stream (a 28x28 plane: 49 lines) that the hardware prefetchers catch late: the first pass over a channel
// fetches the next plane while it sums this one.
template <bool kWrite = false, typename T>
inline __attribute__((always_inline)) void prefetch(const T* p, int64_t n) {
  const uintptr_t end = reinterpret_cast<uintptr_t>(p + n);
  for (uintptr_t b = reinterpret_cast<uintptr_t>(p) & ~uintptr_t(63); b < end; b += 64)
    __builtin_prefetch(reinterpret_cast<const void*>(b), kWrite, 2);
}

// Planes of at most this many bytes have the lines their results go to fetched during the first pass, plane by
// plane (write_ahead): they are output memory no op has touched since a previous step (a training step keeps its
// activations for the backward), and a store that misses waits a memory latency per line, where plane after plane
// of 1-16 lines was too short a stream for the hardware to fetch ahead. DeepMNIST's training step, batch 128
// (Intel Xeon, 2 threads): 128x64x14x14 forward 1.56 -> 0.94 ms, backward 1.40 -> 1.00; 128x128x5x5 1.40 -> 0.56,
// 0.75 -> 0.47; the step 2-4% faster. 28x28 planes (3 KiB) measured no faster, up to 8% slower: their stores
// stream well enough.
constexpr int64_t kWriteAheadPlaneBytes = 1024;

template <typename T>
bool write_ahead(int64_t l) {
  return l * int64_t(sizeof(T)) <= kWriteAheadPlaneBytes;
}

// Σ (x - shift), and Σ (x - shift)² if kSquares, over one channel; y and kept (if not null) are the channel's
// outputs, fetched plane by plane for writing (kWriteAheadPlaneBytes).
template <typename T, bool kSquares>
inline __attribute__((always_inline)) void channel_sums_body(Channel<T> ch, T shift, double* sum, double* squares,
                                                             const T* y, const uint8_t* kept) {
  constexpr int64_t w = kWidth<T>;
  const Vec<T> centre = Vec<T>{} + shift;
  BlockSums<T> acc;
  for (int64_t i = 0; i < ch.n; ++i) {
    const T* row = ch.x + i * ch.stride;
    if (!kSquares && i + 1 < ch.n) prefetch(row + ch.stride, ch.l);  // the first pass
    if (y) prefetch<true>(y + i * ch.stride, ch.l);
    if (kept) prefetch<true>(kept + i * ch.stride, ch.l);
    int64_t j = 0;
    for (; j + 2 * w <= ch.l; j += 2 * w) {
      const Vec<T> d0 = load(row + j) - centre, d1 = load(row + j + w) - centre;
      acc.add(d0, d1, d0 * d0, d1 * d1, kSquares);
    }
    if (j < ch.l) {  // the plane's last values; the zeros filling the vectors are masked out of the differences
      const int64_t n0 = std::min(w, ch.l - j), n1 = ch.l - j - n0;
      const Vec<T> d0 = keep_first<T>(load_first(row + j, n0, j) - centre, n0);
      const Vec<T> d1 = keep_first<T>(load_first(row + j + w, n1, j + w) - centre, n1);
      acc.add(d0, d1, d0 * d0, d1 * d1, kSquares);
    }
  }
  acc.flush(kSquares);
  *sum = acc.a;
  *squares = acc.b;
}

// y = (x - centre) · scale + shift over one channel; with kRelu, y = relu(that), and kept[j] says whether ReLU kept
// the value (not clamped to 0: above 0, or NaN, which torch.relu keeps too): the mask the backward reads in place of y.
// kMask false: no mask (the fused max-pool's backward finds what ReLU kept from the pooled output).
template <typename T, bool kRelu, bool kMask = kRelu>
inline __attribute__((always_inline)) void normalize_body(Channel<T> ch, T centre, T scale, T shift, T* y,
                                                          uint8_t* kept) {
  for (int64_t i = 0; i < ch.n; ++i) {
    const T* src = ch.x + i * ch.stride;
    T* dst = y + i * ch.stride;
    if constexpr (kRelu) {
      uint8_t* m = kMask ? kept + i * ch.stride : nullptr;
      for (int64_t j = 0; j < ch.l; ++j) {
        const T v = (src[j] - centre) * scale + shift;
        const bool clamped = v <= T(0);
        dst[j] = clamped ? T(0) : v;
        if constexpr (kMask) m[j] = !clamped;
      }
    } else {
      for (int64_t j = 0; j < ch.l; ++j) dst[j] = (src[j] - centre) * scale + shift;
    }
  }
}

// dY's values as the batch norm's backward sees them: with a ReLU after it (kept given), dY where ReLU kept its
// output, else 0 (a NaN too), as torch's threshold_backward. The mask's byte (0 or 1) becomes a bit mask ANDed with
// dY's bits: no branch (a select compiled as one in the loops' scalar tails, mispredicted on every other value: 4x
// the time of the whole backward on 5x5 planes), and the loops vectorise.
template <typename T, bool kRelu>
inline __attribute__((always_inline)) T grad_at(const T* g, const uint8_t* kept, int64_t j) {
  T value = g[j];
  if constexpr (kRelu) {
    using Bits = std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>;
    Bits bits;
    std::memcpy(&bits, &value, sizeof bits);
    bits &= Bits(0) - Bits(kept[j]);
    std::memcpy(&value, &bits, sizeof bits);
  }
  return value;
}

// Σ dy and Σ dy · (x - mean) over a block of len (up to kBlock) values, g of dy and v of x, into acc.
template <typename T>
inline __attribute__((always_inline)) void block_grad_sums(BlockSums<T>& acc, const T* g, const T* v, int64_t len,
                                                           Vec<T> centre) {
  constexpr int64_t w = kWidth<T>;
  int64_t j = 0;
  for (; j + 2 * w <= len; j += 2 * w) {
    const Vec<T> g0 = load(g + j), g1 = load(g + j + w);
    acc.add(g0, g1, g0 * (load(v + j) - centre), g1 * (load(v + j + w) - centre), true);
  }
  if (j < len) {  // the zeros filling dy's vectors zero their products
    const int64_t n0 = std::min(w, len - j), n1 = len - j - n0;
    const Vec<T> g0 = load_first(g + j, n0, j), g1 = load_first(g + j + w, n1, j + w);
    const Vec<T> v0 = load_first(v + j, n0, j), v1 = load_first(v + j + w, n1, j + w);
    acc.add(g0, g1, g0 * (v0 - centre), g1 * (v1 - centre), true);
  }
}

// Σ dy and Σ dy · (x - mean) over one channel, in blocks as channel_sums_body; `kept` (kRelu) masks dy, a segment
// of a plane at a time into a buffer. dx (if not null): the channel's input gradient, fetched plane by plane for
// writing.
template <typename T, bool kRelu>
inline __attribute__((always_inline)) void grad_sums_body(Channel<T> dy, const T* x, const uint8_t* kept, T mean,
                                                          double* sum, double* dot, const T* dx) {
  const Vec<T> centre = Vec<T>{} + mean;
  alignas(64) T masked[kRelu ? kBlock : 1];
  BlockSums<T> acc;
  for (int64_t i = 0; i < dy.n; ++i) {
    if (i + 1 < dy.n) {
      const int64_t next = (i + 1) * dy.stride;
      prefetch(dy.x + next, dy.l);
      prefetch(x + next, dy.l);
      if constexpr (kRelu) prefetch(kept + next, dy.l);
    }
    if (dx) prefetch<true>(dx + i * dy.stride, dy.l);
    for (int64_t j0 = 0; j0 < dy.l; j0 += kBlock) {
      const T* g = dy.x + i * dy.stride + j0;
      const T* v = x + i * dy.stride + j0;
      const int64_t len = std::min(kBlock, dy.l - j0);
      if constexpr (kRelu) {
        const uint8_t* m = kept + i * dy.stride + j0;
        for (int64_t j = 0; j < len; ++j) masked[j] = grad_at<T, true>(g, m, j);
        g = masked;
      }
      block_grad_sums(acc, g, v, len, centre);
    }
  }
  acc.flush(true);
  *sum = acc.a;
  *dot = acc.b;
}

// dx = (dy - mean_dy - (x - mean) · proj) · scale over l values of a plane (training); `m` (kRelu) masks dy.
template <typename T, bool kRelu>
inline __attribute__((always_inline)) void grad_input_plane(const T* g, const uint8_t* m, const T* v, int64_t l, T mean,
                                                            T mean_dy, T proj, T scale, T* dst) {
  for (int64_t j = 0; j < l; ++j) dst[j] = (grad_at<T, kRelu>(g, m, j) - mean_dy - (v[j] - mean) * proj) * scale;
}

// grad_input_plane over one channel; `kept` (kRelu) masks dy.
template <typename T, bool kRelu>
inline __attribute__((always_inline)) void grad_input_body(Channel<T> dy, const T* x, const uint8_t* kept, T mean,
                                                           T mean_dy, T proj, T scale, T* dx) {
  for (int64_t i = 0; i < dy.n; ++i) {
    grad_input_plane<T, kRelu>(dy.x + i * dy.stride, kRelu ? kept + i * dy.stride : nullptr, x + i * dy.stride, dy.l,
                               mean, mean_dy, proj, scale, dx + i * dy.stride);
  }
}

// dx = dy · scale over one channel (evaluation: the statistics are constants); `kept` (kRelu) masks dy.
template <typename T, bool kRelu>
inline __attribute__((always_inline)) void grad_input_eval_body(Channel<T> dy, const uint8_t* kept, T scale,
                                                                T* dx) {
  for (int64_t i = 0; i < dy.n; ++i) {
    const T* g = dy.x + i * dy.stride;
    const uint8_t* m = kRelu ? kept + i * dy.stride : nullptr;
    T* dst = dx + i * dy.stride;
    for (int64_t j = 0; j < dy.l; ++j) dst[j] = grad_at<T, kRelu>(g, m, j) * scale;
  }
}

// The forward's parameters: the arguments every channel shares.
template <typename T>
struct ForwardArgs {
  const T *weight, *bias, *running_mean, *running_var;
  bool training;
  double eps;
};

// y = (x - centre) · scale + shift normalises a channel.
template <typename T>
struct Affine {
  T centre, scale, shift;
};

// Channel ch's statistics (the batch's when training, into mean[ch] and var[ch]) and the affine map they give.
// y and kept (either may be null): the channel's outputs, fetched for writing by the first pass (write_ahead).
template <typename T>
Affine<T> channel_affine(const Channel<T>& values, int64_t ch, const ForwardArgs<T>& a, T* mean, T* var, const T* y,
                         const uint8_t* kept) {
  const auto sums = PerIsa<&channel_sums_body<T, false>>::pick();
  const auto centered_sums = PerIsa<&channel_sums_body<T, true>>::pick();
  const double count = double(values.n * values.l);
  // x is centred on a value of T, and the rest of the mean (below T's precision) goes into the shift: a float32
  // mean of 300 is off by up to 1.5e-5, as much as a spread of 0.05 resolves.
  T centre;
  double m, v;
  if (a.training) {
    // The corrected two-pass formulas: about any centre a, mean = a + Σ(x - a) / M and
    // M · var = Σ(x - a)² - (Σ(x - a))² / M, so the rounding of a = T(Σx / M) cancels.
    double sum, unused;
    sums(values, T(0), &sum, &unused, y, kept);
    centre = T(sum / count);
    double centered, squares;
    centered_sums(values, centre, &centered, &squares, nullptr, nullptr);
    m = double(centre) + centered / count;
    v = std::max(0.0, (squares - centered * centered / count) / count);
  } else {
    centre = a.running_mean[ch];
    m = double(centre);
    v = double(a.running_var[ch]);
  }
  mean[ch] = T(m);
  var[ch] = T(v);
  const double scale = (a.weight ? double(a.weight[ch]) : 1.0) / std::sqrt(v + a.eps);
  const double shift = (a.bias ? double(a.bias[ch]) : 0.0) - (m - double(centre)) * scale;
  return {centre, T(scale), T(shift)};
}

template <typename T>
void batch_norm_forward(const T* x, int64_t n, int64_t c, int64_t l, const ForwardArgs<T>& args, T* y, T* mean,
                        T* var, uint8_t* kept) {
  const auto normalize =
      kept ? PerIsa<&normalize_body<T, true>>::pick() : PerIsa<&normalize_body<T, false>>::pick();
  const bool ahead = write_ahead<T>(l);
#pragma omp parallel for schedule(static) num_threads(num_threads())
  for (int64_t ch = 0; ch < c; ++ch) {
    const Channel<T> values{x + ch * l, n, l, c * l};
    const Affine<T> f = channel_affine<T>(values, ch, args, mean, var, ahead ? y + ch * l : nullptr,
                                          ahead && kept ? kept + ch * l : nullptr);
    normalize(values, f.centre, f.scale, f.shift, y + ch * l, kept ? kept + ch * l : nullptr);
  }
}

// relu(batch norm) max-pooled: each channel's statistics as batch_norm_forward's, then plane by plane its
// normalised and clamped values into a buffer of one plane (the values batch_norm_relu writes, bit for bit), pooled
// from there (MaxPoolRows: max_pool2d's kernels, values and indices). The normalised planes never reach memory.
template <typename T>
void batch_norm_relu_max_pool_forward(const T* x, const PoolShape<int64_t>& s, const ForwardArgs<T>& args, T* y,
                                      int64_t* indices, T* mean, T* var) {
  const auto normalize = PerIsa<&normalize_body<T, true, false>>::pick();
  const MaxPoolRows<T> pool(s);
  const int64_t l = s.h * s.w, pq = s.p * s.q;
  const bool ahead = write_ahead<T>(pq);
  constexpr int64_t kSlack = MaxPoolRows<T>::kSlack;
#pragma omp parallel num_threads(num_threads())
  {
    // One plane's values, outputs and indices, with the room that lets a plane's last rows pool in vectors too.
    std::vector<T> plane(l + kSlack), pooled(pq + kSlack);
    std::vector<int64_t> winners(pq + kSlack);
#pragma omp for schedule(static)
    for (int64_t ch = 0; ch < s.c; ++ch) {
      const Channel<T> values{x + ch * l, s.n, l, s.c * l};
      const Affine<T> f = channel_affine<T>(values, ch, args, mean, var, nullptr, nullptr);
      for (int64_t i = 0; i < s.n; ++i) {
        const int64_t at = i * s.c + ch;
        if (ahead && i + 1 < s.n) {  // the next plane's outputs, as write_ahead fetches batch_norm's
          prefetch<true>(y + (at + s.c) * pq, pq);
          prefetch<true>(indices + (at + s.c) * pq, pq);
        }
        normalize(Channel<T>{x + at * l, 1, l, l}, f.centre, f.scale, f.shift, plane.data(), nullptr);
        pool.rows(plane.data(), pooled.data(), winners.data(), 0, s.p, true);
        std::copy_n(pooled.data(), pq, y + at * pq);
        std::copy_n(winners.data(), pq, indices + at * pq);
      }
    }
  }
}

// One plane of dY as batch_norm_relu's backward sees it behind max_pool2d's: zeroed, then each pooled output's
// gradient added at its window's winner, in output order (max_pool2d_backward's sums), where ReLU kept the output
// (above 0, or NaN: the winner's value; its mask), else +0 (all the outputs of one winner share its mask, so a
// winner ReLU clamped stays +0, as batch_norm_relu's mask leaves it). The mask is applied to the gradient's bits,
// not branched on: a branch per output, mispredicted on about half of them, took most of the backward's time.
// Returns the first output whose index is neither a position of the plane's l nor -1 (a window with no tap), or -1.
template <typename T>
inline __attribute__((always_inline)) int64_t pooled_grad_plane(const T* g, const T* out, const int64_t* idx,
                                                                 int64_t pq, int64_t l, T* dense) {
  using Bits = std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>;
  std::fill_n(dense, l, T(0));
  int64_t bad = -1;
  for (int64_t o = 0; o < pq; ++o) {
    const int64_t i = idx[o];
    Bits bits;
    std::memcpy(&bits, g + o, sizeof bits);
    bits &= Bits(0) - Bits(!(out[o] <= T(0)));
    T value;
    std::memcpy(&value, &bits, sizeof bits);
    if (static_cast<uint64_t>(i) < static_cast<uint64_t>(l)) {
      dense[i] += value;
    } else if (i != -1 && bad < 0) {
      bad = o;
    }
  }
  return bad;
}

// One channel of the pooled gradients: g, out and idx (the forward's output and indices) N planes of pq,
// g_stride apart, over x's N planes of l.
template <typename T>
struct Pooled {
  const T* g;
  const T* out;
  const int64_t* idx;
  int64_t pq, stride;
};

// grad_sums_body of the channel's dY rebuilt plane by plane (pooled_grad_plane) into `dense` (l values): the same
// blocks, so the same sums as batch_norm_relu's backward after max_pool2d_backward's. *bad: the first bad index's
// position (plane i's output o: i*pq + o), if any.
template <typename T>
inline __attribute__((always_inline)) void pooled_grad_sums_body(Channel<T> x, Pooled<T> dy, T mean, T* dense,
                                                                 double* sum, double* dot, int64_t* bad, const T* dx) {
  const Vec<T> centre = Vec<T>{} + mean;
  BlockSums<T> acc;
  for (int64_t i = 0; i < x.n; ++i) {
    const T* v = x.x + i * x.stride;
    if (i + 1 < x.n) {  // the next plane's x and pooled gradients, outputs and indices
      const int64_t next = (i + 1) * dy.stride;
      prefetch(v + x.stride, x.l);
      prefetch(dy.g + next, dy.pq);
      prefetch(dy.out + next, dy.pq);
      prefetch(dy.idx + next, dy.pq);
    }
    if (dx) prefetch<true>(dx + i * x.stride, x.l);
    const int64_t b = pooled_grad_plane(dy.g + i * dy.stride, dy.out + i * dy.stride, dy.idx + i * dy.stride, dy.pq,
                                        x.l, dense);
    if (b >= 0 && *bad < 0) *bad = i * dy.pq + b;
    for (int64_t j0 = 0; j0 < x.l; j0 += kBlock) {
      block_grad_sums(acc, dense + j0, v + j0, std::min(kBlock, x.l - j0), centre);
    }
  }
  acc.flush(true);
  *sum = acc.a;
  *dot = acc.b;
}

// dx over one channel from its pooled gradients (dY rebuilt plane by plane into `dense`): grad_input_body's
// formula when training, else dY · scale.
template <typename T, bool kTraining>
inline __attribute__((always_inline)) void pooled_grad_input_body(Channel<T> x, Pooled<T> dy, T mean, T mean_dy,
                                                                  T proj, T scale, T* dense, T* dx, int64_t* bad) {
  for (int64_t i = 0; i < x.n; ++i) {
    const int64_t b = pooled_grad_plane(dy.g + i * dy.stride, dy.out + i * dy.stride, dy.idx + i * dy.stride, dy.pq,
                                        x.l, dense);
    if (b >= 0 && *bad < 0) *bad = i * dy.pq + b;
    T* dst = dx + i * x.stride;
    if constexpr (kTraining) {
      grad_input_plane<T, false>(dense, nullptr, x.x + i * x.stride, x.l, mean, mean_dy, proj, scale, dst);
    } else {
      for (int64_t j = 0; j < x.l; ++j) dst[j] = dense[j] * scale;
    }
  }
}

template <typename T>
void batch_norm_backward(const T* dy, const T* x, int64_t n, int64_t c, int64_t l, const T* weight, const T* mean,
                         const T* var, const uint8_t* kept, bool training, double eps, T* dx, T* dweight,
                         T* dbias) {
  const bool relu = kept != nullptr;
  const auto sums = relu ? PerIsa<&grad_sums_body<T, true>>::pick() : PerIsa<&grad_sums_body<T, false>>::pick();
  const auto grad_input =
      relu ? PerIsa<&grad_input_body<T, true>>::pick() : PerIsa<&grad_input_body<T, false>>::pick();
  const auto grad_input_eval =
      relu ? PerIsa<&grad_input_eval_body<T, true>>::pick() : PerIsa<&grad_input_eval_body<T, false>>::pick();
  const double count = double(n * l);
  const bool ahead = dx && write_ahead<T>(l);
#pragma omp parallel for schedule(static) num_threads(num_threads())
  for (int64_t ch = 0; ch < c; ++ch) {
    const Channel<T> grads{dy + ch * l, n, l, c * l};
    const uint8_t* kept_ch = relu ? kept + ch * l : nullptr;
    const double invstd = 1.0 / std::sqrt(double(var[ch]) + eps);
    double sum = 0, dot = 0;
    if (dweight || dbias || training) {
      sums(grads, x + ch * l, kept_ch, mean[ch], &sum, &dot, ahead ? dx + ch * l : nullptr);
    }
    if (dweight) dweight[ch] = T(dot * invstd);
    if (dbias) dbias[ch] = T(sum);
    if (!dx) continue;
    const double scale = (weight ? double(weight[ch]) : 1.0) * invstd;
    if (training) {
      grad_input(grads, x + ch * l, kept_ch, mean[ch], T(sum / count), T(dot / count * invstd * invstd),
                 T(scale), dx + ch * l);
    } else {
      grad_input_eval(grads, kept_ch, T(scale), dx + ch * l);
    }
  }
}

// The backward of relu(batch norm) max-pooled, from the pooled gradients: batch_norm_backward's passes over x with
// dY rebuilt plane by plane from g, the forward's output and its indices (pooled_grad_plane), never written out.
// Returns the flat position in the indices of the first that is neither a position of its plane nor -1, or -1
// (the passes skip such indices; the caller raises).
template <typename T>
int64_t batch_norm_relu_max_pool_backward(const T* g, const T* out, const int64_t* idx, const T* x, int64_t n,
                                          int64_t c, int64_t l, int64_t pq, const T* weight, const T* mean,
                                          const T* var, bool training, double eps, T* dx, T* dweight, T* dbias) {
  const auto sums = PerIsa<&pooled_grad_sums_body<T>>::pick();
  const auto grad_input = training ? PerIsa<&pooled_grad_input_body<T, true>>::pick()
                                   : PerIsa<&pooled_grad_input_body<T, false>>::pick();
  const double count = double(n * l);
  const bool ahead = dx && write_ahead<T>(l);
  int64_t first_bad = -1;
#pragma omp parallel num_threads(num_threads())
  {
    std::vector<T> dense(l);
    int64_t thread_bad = -1;
#pragma omp for schedule(static)
    for (int64_t ch = 0; ch < c; ++ch) {
      const Channel<T> values{x + ch * l, n, l, c * l};
      const Pooled<T> dy{g + ch * pq, out + ch * pq, idx + ch * pq, pq, c * pq};
      const double invstd = 1.0 / std::sqrt(double(var[ch]) + eps);
      int64_t bad = -1;
      double sum = 0, dot = 0;
      if (dweight || dbias || training) {
        sums(values, dy, mean[ch], dense.data(), &sum, &dot, &bad, ahead ? dx + ch * l : nullptr);
      }
      if (dweight) dweight[ch] = T(dot * invstd);
      if (dbias) dbias[ch] = T(sum);
      if (dx) {
        const double scale = (weight ? double(weight[ch]) : 1.0) * invstd;
        grad_input(values, dy, mean[ch], T(sum / count), T(dot / count * invstd * invstd), T(scale), dense.data(),
                   dx + ch * l, &bad);
      }
      if (bad >= 0) {  // plane i's output o: flat position (i*c + ch)*pq + o
        const int64_t position = (bad / pq * c + ch) * pq + bad % pq;
        if (thread_bad < 0 || position < thread_bad) thread_bad = position;
      }
    }
#pragma omp critical(cnn_ext_pooled_bad_index)
    if (thread_bad >= 0 && (first_bad < 0 || thread_bad < first_bad)) first_bad = thread_bad;
  }
  return first_bad;
}

template <typename T>
const T* data_or_null(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? t->const_data_ptr<T>() : nullptr;
}

template <typename T>
ForwardArgs<T> forward_args(const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
                            const c10::optional<at::Tensor>& running_mean,
                            const c10::optional<at::Tensor>& running_var, bool training, double eps) {
  return {data_or_null<T>(weight), data_or_null<T>(bias), data_or_null<T>(running_mean), data_or_null<T>(running_var),
          training, eps};
}

// A bool tensor's values as bytes (0 or 1), as the kernels read and write them.
const uint8_t* kept_bytes(const at::Tensor& t) { return reinterpret_cast<const uint8_t*>(t.const_data_ptr<bool>()); }
uint8_t* kept_bytes(at::Tensor& t) { return reinterpret_cast<uint8_t*>(t.mutable_data_ptr<bool>()); }

// (N, C, L): the input's sizes around its channel dimension.
std::tuple<int64_t, int64_t, int64_t> channel_view(const at::Tensor& t) {
  return {t.size(0), t.size(1), t.numel() / std::max<int64_t>(1, t.size(0) * t.size(1))};
}

c10::optional<at::Tensor> contiguous(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? c10::optional<at::Tensor>(t->contiguous()) : c10::nullopt;
}

// The forward of batch_norm, and of batch_norm_relu when `relu` (then also the mask of kept outputs).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_forward_cpu(
    const char* op, const at::Tensor& input_, const c10::optional<at::Tensor>& weight_,
    const c10::optional<at::Tensor>& bias_, const c10::optional<at::Tensor>& running_mean_,
    const c10::optional<at::Tensor>& running_var_, bool training, double eps, bool relu) {
  check_batch_norm<int64_t>(op, input_, weight_, bias_, running_mean_, running_var_, training, eps);
  check_backend_dtype(op, input_, "input", {at::kFloat, at::kDouble}, "CPU");
  const at::Tensor input = input_.contiguous();
  const auto weight = contiguous(weight_), bias = contiguous(bias_);
  const auto running_mean = contiguous(running_mean_), running_var = contiguous(running_var_);
  const auto [n, c, l] = channel_view(input);
  at::Tensor output = empty_output(input.sizes(), input.options());
  at::Tensor kept = empty_output(relu ? input.sizes() : c10::IntArrayRef{0}, input.options().dtype(at::kBool));
  at::Tensor mean = at::zeros({c}, input.options()), var = at::zeros({c}, input.options());
  // An empty batch: nothing to normalise (statistics reported as 0).
  if (n * l == 0) return {output, mean, var, kept};
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "cnn_ext_batch_norm_cpu", [&] {
    batch_norm_forward<scalar_t>(input.const_data_ptr<scalar_t>(), n, c, l,
                                 forward_args<scalar_t>(weight, bias, running_mean, running_var, training, eps),
                                 output.mutable_data_ptr<scalar_t>(), mean.mutable_data_ptr<scalar_t>(),
                                 var.mutable_data_ptr<scalar_t>(), relu ? kept_bytes(kept) : nullptr);
  });
  return {output, mean, var, kept};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_cpu(
    const at::Tensor& input, const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& running_mean, const c10::optional<at::Tensor>& running_var, bool training,
    double eps) {
  auto [output, mean, var, unused] = batch_norm_forward_cpu("cnn_ext.batch_norm", input, weight, bias, running_mean,
                                                            running_var, training, eps, false);
  return {output, mean, var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_relu_cpu(
    const at::Tensor& input, const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& running_mean, const c10::optional<at::Tensor>& running_var, bool training,
    double eps) {
  return batch_norm_forward_cpu("cnn_ext.batch_norm_relu", input, weight, bias, running_mean, running_var, training,
                                eps, true);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_backward_cpu(
    const at::Tensor& grad_output_, const at::Tensor& input_, const c10::optional<at::Tensor>& weight_,
    const at::Tensor& mean_, const at::Tensor& var_, bool training, double eps, std::array<bool, 3> output_mask,
    const c10::optional<at::Tensor>& kept_) {
  constexpr const char* op = "cnn_ext.batch_norm_backward";
  check_batch_norm_backward<int64_t>(op, grad_output_, input_, weight_, mean_, var_, eps, kept_);
  check_backend_dtype(op, input_, "input", {at::kFloat, at::kDouble}, "CPU");
  const at::Tensor grad_output = grad_output_.contiguous(), input = input_.contiguous();
  const at::Tensor mean = mean_.contiguous(), var = var_.contiguous();
  const auto weight = contiguous(weight_), kept = contiguous(kept_);
  const auto [n, c, l] = channel_view(input);
  const auto options = input.options();
  at::Tensor grad_input = output_mask[0] ? empty_output(input.sizes(), options) : at::empty({0}, options);
  at::Tensor grad_weight = output_mask[1] ? at::zeros({c}, options) : at::empty({0}, options);
  at::Tensor grad_bias = output_mask[2] ? at::zeros({c}, options) : at::empty({0}, options);
  if (n * l == 0) return {grad_input, grad_weight, grad_bias};
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "cnn_ext_batch_norm_backward_cpu", [&] {
    const auto out = [](bool wanted, at::Tensor& t) { return wanted ? t.mutable_data_ptr<scalar_t>() : nullptr; };
    batch_norm_backward<scalar_t>(grad_output.const_data_ptr<scalar_t>(), input.const_data_ptr<scalar_t>(), n, c, l,
                                  data_or_null<scalar_t>(weight), mean.const_data_ptr<scalar_t>(),
                                  var.const_data_ptr<scalar_t>(), kept ? kept_bytes(*kept) : nullptr, training, eps,
                                  out(output_mask[0], grad_input), out(output_mask[1], grad_weight),
                                  out(output_mask[2], grad_bias));
  });
  return {grad_input, grad_weight, grad_bias};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_relu_max_pool2d_cpu(
    const at::Tensor& input_, const c10::optional<at::Tensor>& weight_, const c10::optional<at::Tensor>& bias_,
    const c10::optional<at::Tensor>& running_mean_, const c10::optional<at::Tensor>& running_var_, bool training,
    double eps, c10::IntArrayRef kernel_size, c10::IntArrayRef stride, c10::IntArrayRef padding,
    c10::IntArrayRef dilation, bool ceil_mode) {
  constexpr const char* op = "cnn_ext.batch_norm_relu_max_pool2d";
  const auto s = check_batch_norm_relu_max_pool2d<int64_t>(op, input_, weight_, bias_, running_mean_, running_var_,
                                                           training, eps, kernel_size, stride, padding, dilation,
                                                           ceil_mode);
  check_backend_dtype(op, input_, "input", {at::kFloat, at::kDouble}, "CPU");
  const at::Tensor input = input_.contiguous();
  const auto weight = contiguous(weight_), bias = contiguous(bias_);
  const auto running_mean = contiguous(running_mean_), running_var = contiguous(running_var_);
  const auto out_sizes = s.output_sizes();
  at::Tensor output = empty_output(out_sizes, input.options());
  at::Tensor indices = empty_output(out_sizes, input.options().dtype(at::kLong));
  at::Tensor mean = at::zeros({s.c}, input.options()), var = at::zeros({s.c}, input.options());
  if (s.n == 0) return {output, mean, var, indices};  // an empty batch (statistics reported as 0)
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "cnn_ext_batch_norm_relu_max_pool2d_cpu", [&] {
    batch_norm_relu_max_pool_forward<scalar_t>(
        input.const_data_ptr<scalar_t>(), s,
        forward_args<scalar_t>(weight, bias, running_mean, running_var, training, eps),
        output.mutable_data_ptr<scalar_t>(), indices.mutable_data_ptr<int64_t>(), mean.mutable_data_ptr<scalar_t>(),
        var.mutable_data_ptr<scalar_t>());
  });
  return {output, mean, var, indices};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_relu_max_pool2d_backward_cpu(
    const at::Tensor& grad_output_, const at::Tensor& output_, const at::Tensor& indices_, const at::Tensor& input_,
    const c10::optional<at::Tensor>& weight_, const at::Tensor& mean_, const at::Tensor& var_, bool training,
    double eps, std::array<bool, 3> output_mask) {
  constexpr const char* op = "cnn_ext.batch_norm_relu_max_pool2d_backward";
  check_batch_norm_relu_max_pool2d_backward<int64_t>(op, grad_output_, output_, indices_, input_, weight_, mean_,
                                                     var_, eps);
  check_backend_dtype(op, input_, "input", {at::kFloat, at::kDouble}, "CPU");
  const at::Tensor grad_output = grad_output_.contiguous(), output = output_.contiguous();
  const at::Tensor indices = indices_.contiguous(), input = input_.contiguous();
  const at::Tensor mean = mean_.contiguous(), var = var_.contiguous();
  const auto weight = contiguous(weight_);
  const auto [n, c, l] = channel_view(input);
  const int64_t pq = grad_output.size(2) * grad_output.size(3);
  const auto options = input.options();
  at::Tensor grad_input = output_mask[0] ? empty_output(input.sizes(), options) : at::empty({0}, options);
  at::Tensor grad_weight = output_mask[1] ? at::zeros({c}, options) : at::empty({0}, options);
  at::Tensor grad_bias = output_mask[2] ? at::zeros({c}, options) : at::empty({0}, options);
  if (n * l == 0) return {grad_input, grad_weight, grad_bias};
  int64_t bad = -1;
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "cnn_ext_batch_norm_relu_max_pool2d_backward_cpu", [&] {
    const auto out = [](bool wanted, at::Tensor& t) { return wanted ? t.mutable_data_ptr<scalar_t>() : nullptr; };
    bad = batch_norm_relu_max_pool_backward<scalar_t>(
        grad_output.const_data_ptr<scalar_t>(), output.const_data_ptr<scalar_t>(),
        indices.const_data_ptr<int64_t>(), input.const_data_ptr<scalar_t>(), n, c, l, pq,
        data_or_null<scalar_t>(weight), mean.const_data_ptr<scalar_t>(), var.const_data_ptr<scalar_t>(), training,
        eps, out(output_mask[0], grad_input), out(output_mask[1], grad_weight), out(output_mask[2], grad_bias));
  });
  if (bad >= 0) {
    PoolShape<int64_t> s{};
    s.n = n;
    s.c = c;
    s.h = input.size(2);
    s.w = input.size(3);
    s.p = grad_output.size(2);
    s.q = grad_output.size(3);
    fail_bad_max_pool_index(op, s, bad, indices.const_data_ptr<int64_t>()[bad], "input plane", "H*W");
  }
  return {grad_input, grad_weight, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(cnn_ext, CPU, m) {
  m.impl("batch_norm_relu_max_pool2d", &batch_norm_relu_max_pool2d_cpu);
  m.impl("batch_norm_relu_max_pool2d_backward", &batch_norm_relu_max_pool2d_backward_cpu);
  m.impl("batch_norm", &batch_norm_cpu);
  m.impl("batch_norm_relu", &batch_norm_relu_cpu);
  m.impl("batch_norm_backward", &batch_norm_backward_cpu);
}

}  // namespace cnn_ext::cpu
