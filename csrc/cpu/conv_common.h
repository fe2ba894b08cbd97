// The machinery the CPU convolution kernels share: conv_fprop.cpp, conv_dgrad.cpp, conv_wgrad.cpp and
// conv_fused.cpp compute convolutions as GEMMs (gemm.h), parallelised with OpenMP; dispatch.cpp chooses between their
// algorithms and the batch-in-lanes kernels of conv2d_lanes.cpp.
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
// fprop never builds col ("implicit im2col"). For stride 1 the input planes are copied once into a zero-padded
// window W + 2*pad_w wide; then col row (c, r, s) is simply window plane c read from offset r*dil_h*width + s*dil_w,
// if output (p, q) is stored at column p*width + q. The GEMM reads its B rows in place through that per-row offset
// table, computing width - Q wasted columns per output row that are dropped when the result is copied out. For
// small images im2col costs more than the GEMM itself, and the window copy is RS times smaller. A strided
// convolution copies each plane as its stride phases (rows a, a + sh, ...; columns b, b + sw, ...), in which every
// tap again reads one contiguous run (Window). fprop's weights are GEMM A read in place (rows_fn), never packed.
// dgrad is the same product on the zero-padded dY with flipped taps, so it needs no col2im either (used when Cg
// fills the GEMM's row tiles; tiny Cg such as a 1-channel input keeps the dcol form, whose GEMM has Cg*RS rows).
// When the implicit dgrad would waste most of its columns (valid convolutions on small images: dX windows
// W + (S-1)*dil wide for Q-wide dY rows), dgrad is dcol = W_g^T · dY_g read in place, with col2im as contiguous
// row adds into a padded dX plane; strided dgrad is dcol in panels (explicit). wgrad reduces along the output
// positions of both dY and the shifted windows; with few output channels (or a 1×1 kernel) it uses the dot-tile
// kernel on the same windows, with dY copied to the window layout and zeros in the wasted columns. Otherwise
// (many output channels) wgrad gathers col^T rows from a channels-last copy of the input, where one kernel tap's
// channels (and, for dilation 1, a whole kernel row's) are one contiguous run.
//
// The fused conv2d_maxpool_relu runs the fprop a chunk of pooled output rows at a time into item scratch and
// pools + ReLUs from there (conv_fused.cpp), so the convolution's output is never stored.
//
// Parallelism and determinism: fprop and dgrad split the work into independent items (image × group × row or
// channel chunk) that write disjoint outputs, so any schedule gives the same bits. wgrad splits its reduction
// axis (images and output rows) into one fixed range per thread, each summed into its own partial weight
// gradient; the partials are then added in thread order. The result therefore depends only on the thread count.
// No atomics anywhere.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <type_traits>
#include <utility>
#include <vector>

#include "../checks.h"
#include "gemm.h"
#include "isa.h"
#include "scratch.h"
#include "winograd.h"

#if CNN_EXT_X86
#include <immintrin.h>
#endif

namespace cnn_ext::cpu {

// Scratch (im2col and friends) per work item is kept to about this size so it stays in the 2 MiB L2 alongside
// the packed weights.
constexpr int64_t kScratchBytes = 512 * 1024;

// The transposed wgrad's threads share out the input channels, not the positions, where the kernel has more than this
// many weights per output position (of all the images): their partial sums would outweigh the products. The dispatch
// rule prefers it below that, or above it where the channel split pays (conv_wgrad.cpp, dispatch.cpp).
constexpr int64_t kTransposedWeightsPerPosition = 128;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Smallest i >= 0 with i*step + offset >= bound (step > 0): the first output index whose input index reaches
// `bound`. Used to find the output positions whose input lies inside [0, size).
inline int64_t first_reaching(int64_t bound, int64_t offset, int64_t step) {
  const int64_t d = bound - offset;
  return d <= 0 ? 0 : ceil_div(d, step);
}

// Per-group sizes and hyper-parameters of one convolution.
struct Conv {
  int64_t n, c, h, w, k, r, s, p, q, groups;
  int64_t stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;
  int64_t cg, kg;  // channels per group
  int64_t rs, crs, hw, pq;

  explicit Conv(const ConvShape<int64_t>& x)
      : n(x.n), c(x.c), h(x.h), w(x.w), k(x.k), r(x.r), s(x.s), p(x.p), q(x.q), groups(x.groups),
        stride_h(x.stride_h), stride_w(x.stride_w), pad_h(x.pad_h), pad_w(x.pad_w), dil_h(x.dil_h), dil_w(x.dil_w),
        cg(x.c / x.groups), kg(x.k / x.groups), rs(x.r * x.s), crs(cg * x.r * x.s), hw(x.h * x.w),
        pq(x.p * x.q) {}

  bool unit_stride() const { return stride_h == 1 && stride_w == 1; }
};

// The stride-1 3x3 convolution cv is, as Winograd's forward and weight gradient see it (winograd.h).
inline Winograd3x3 winograd_problem(const Conv& cv) {
  return {cv.n, cv.groups, cv.cg, cv.kg, cv.h, cv.w, cv.p, cv.q, cv.pad_h, cv.pad_w};
}

inline int num_threads() { return at::get_num_threads(); }

// Calls fn(q_begin, q_end, row, first, last) for each output row met by the flattened output positions
// [pq0, pq1) when sampling input rows with kernel tap (r, s): `row` is the input row (nullptr in the padding)
// offset so that row[q*sw] is the input element of output column q, and [first, last) the columns whose input
// lies inside the image. Shared by im2col and col2im so both walk the exact same positions.
template <typename T, typename Fn>
void for_each_output_row(const Conv& cv, T* plane, int64_t r, int64_t s, int64_t pq0, int64_t pq1, Fn&& fn) {
  const int64_t w_off = s * cv.dil_w - cv.pad_w;
  const int64_t q_first = first_reaching(0, w_off, cv.stride_w);
  const int64_t q_last = first_reaching(cv.w, w_off, cv.stride_w);
  int64_t out_p = pq0 / cv.q;
  int64_t qa = pq0 - out_p * cv.q;
  for (int64_t pos = pq0; pos < pq1; ++out_p, qa = 0) {
    const int64_t qb = std::min(cv.q, qa + (pq1 - pos));
    const int64_t in_h = out_p * cv.stride_h - cv.pad_h + r * cv.dil_h;
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
// fills its buffer strictly left to right) or in 64 bytes of slack after the buffer; longer ones by copy_row. A
// libc memmove call per run would cost more than the copy. An empty run's src may point outside the source (a
// window wholly in the padding), so it reads nothing.
template <typename T>
inline T* copy_run(T* dst, const T* src, int64_t n, const T* src_end) {
  constexpr int64_t kBlock = 64 / sizeof(T);
  if (n <= 0) return dst;
  if (n <= kBlock && src + kBlock <= src_end) {
    std::memcpy(dst, src, 64);
  } else {
    copy_row(dst, src, n);
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
                              if (cv.stride_w == 1) {
                                copy_run(d + first, row + first, last - first, x_end);
                              } else {
                                for (int64_t j = first; j < last; ++j) d[j] = row[j * cv.stride_w];
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
                              if (cv.stride_w == 1) {
                                for (int64_t j = first; j < last; ++j) row[j] += g[j];
                              } else {
                                for (int64_t j = first; j < last; ++j) row[j * cv.stride_w] += g[j];
                              }
                            });
      }
    }
  }
}

// dst[j*ld_dst + i] = src[i*ld_src + j] for i < rows, j < cols: 8x8 blocks through vector registers (three rounds
// of interleaving row i with row i + 4 turn the block's rows into its columns), the edges element by element.
// Compiled per ISA (PerIsa): a transposing gather element by element cost as much as a fifth of the GEMM it fed.
template <typename T>
inline __attribute__((always_inline)) void transpose_body(const T* src, int64_t ld_src, int64_t rows, int64_t cols,
                                                          T* dst, int64_t ld_dst) {
  typedef T V __attribute__((vector_size(8 * sizeof(T))));
  typedef std::conditional_t<sizeof(T) == 4, int32_t, int64_t> Index __attribute__((vector_size(8 * sizeof(T))));
  constexpr Index kLow = {0, 8, 1, 9, 2, 10, 3, 11}, kHigh = {4, 12, 5, 13, 6, 14, 7, 15};
  int64_t i0 = 0;
  for (; i0 + 8 <= rows; i0 += 8) {
    int64_t j0 = 0;
    for (; j0 + 8 <= cols; j0 += 8) {
      V r[8];
      for (int i = 0; i < 8; ++i) r[i] = load_as<V>(src + (i0 + i) * ld_src + j0);
      for (int round = 0; round < 3; ++round) {
        V next[8];
        for (int i = 0; i < 4; ++i) {
          next[2 * i] = __builtin_shuffle(r[i], r[i + 4], kLow);
          next[2 * i + 1] = __builtin_shuffle(r[i], r[i + 4], kHigh);
        }
        for (int i = 0; i < 8; ++i) r[i] = next[i];
      }
      for (int j = 0; j < 8; ++j) store_as(dst + (j0 + j) * ld_dst + i0, r[j]);
    }
    for (; j0 < cols; ++j0) {
      for (int64_t i = i0; i < i0 + 8; ++i) dst[j0 * ld_dst + i] = src[i * ld_src + j0];
    }
  }
  for (; i0 < rows; ++i0) {
    for (int64_t j = 0; j < cols; ++j) dst[j * ld_dst + i0] = src[i0 * ld_src + j];
  }
}

template <typename T>
void transpose(const T* src, int64_t ld_src, int64_t rows, int64_t cols, T* dst, int64_t ld_dst) {
  PerIsa<&transpose_body<T>>::pick()(src, ld_src, rows, cols, dst, ld_dst);
}

// to[x] = from[x] + b for x < n: the implicit products' copy into the output rows, and the bias added to rows a
// GEMM wrote in place. Compiled per ISA (add_rows): in the portable build's 16-byte vectors, the stem's bias pass
// (batch 1, 64 planes of 112x112) took 4% of its forward.
template <typename T>
inline __attribute__((always_inline)) void add_plain(T* to, const T* from, int64_t n, T b) {
  for (int64_t x = 0; x < n; ++x) to[x] = from[x] + b;
}
// How many of n elements from `to` come before an address that is a multiple of `bytes`.
template <typename T>
int64_t unaligned_head(const T* to, int64_t n, int64_t bytes) {
  const int64_t misaligned = int64_t(reinterpret_cast<uintptr_t>(to) % bytes);
  return std::min(n, misaligned == 0 ? 0 : (bytes - misaligned) / int64_t(sizeof(T)));
}
// to[x] = from[x] + b for x < n with non-temporal stores, which bypass the caches: for outputs far larger than the
// cores' L2, whose lines an ordinary store first reads from memory only to overwrite them all. Measured on the
// stem's 26 MB output at batch 8: the convolution 9-10% faster, with the batch norm, ReLU and pooling after it
// 2-3% faster in all; at batch 1 (3 MB) the next op found the output in cache, 2% slower streamed. The writer
// calls stream_fence() before other threads may read what it streamed. One function per ISA: GCC compiles the
// streaming intrinsics only inside a function of their ISA, never in a shared always-inline body.
#if CNN_EXT_X86
template <typename T>
CNN_EXT_TARGET_AVX512 void add_streaming_avx512(T* to, const T* from, int64_t n, T b) {
  int64_t x = unaligned_head(to, n, 64);
  add_plain(to, from, x, b);
  for (; x + 64 / int64_t(sizeof(T)) <= n; x += 64 / int64_t(sizeof(T))) {
    if constexpr (std::is_same_v<T, float>) {
      _mm512_stream_ps(to + x, _mm512_add_ps(_mm512_loadu_ps(from + x), _mm512_set1_ps(b)));
    } else {
      _mm512_stream_pd(to + x, _mm512_add_pd(_mm512_loadu_pd(from + x), _mm512_set1_pd(b)));
    }
  }
  add_plain(to + x, from + x, n - x, b);
}
template <typename T>
CNN_EXT_TARGET_AVX2 void add_streaming_avx2(T* to, const T* from, int64_t n, T b) {
  int64_t x = unaligned_head(to, n, 32);
  add_plain(to, from, x, b);
  for (; x + 32 / int64_t(sizeof(T)) <= n; x += 32 / int64_t(sizeof(T))) {
    if constexpr (std::is_same_v<T, float>) {
      _mm256_stream_ps(to + x, _mm256_add_ps(_mm256_loadu_ps(from + x), _mm256_set1_ps(b)));
    } else {
      _mm256_stream_pd(to + x, _mm256_add_pd(_mm256_loadu_pd(from + x), _mm256_set1_pd(b)));
    }
  }
  add_plain(to + x, from + x, n - x, b);
}
#endif
// add_streaming's variant for the ISA in use (the portable one stores normally).
template <typename T>
auto add_streaming() {
#if CNN_EXT_X86
  return by_isa(&add_streaming_avx512<T>, &add_streaming_avx2<T>, &PerIsa<&add_plain<T>>::portable);
#else
  return &PerIsa<&add_plain<T>>::portable;
#endif
}
// add_plain for the ISA in use.
template <typename T>
auto add_rows() {
  return PerIsa<&add_plain<T>>::pick();
}
inline void stream_fence() {
#if CNN_EXT_X86
  _mm_sfence();
#endif
}
// Outputs of at least this many bytes per call are written by add_streaming.
constexpr int64_t kStreamBytes = int64_t(16) << 20;

// dst[a][b] = src[a - top][b - left] for a < rows, b < cols; 0 where that falls outside the h × w plane src.
template <typename T>
inline __attribute__((always_inline)) void copy_window_body(const T* src, int64_t h, int64_t w, int64_t top,
                                                            int64_t left, int64_t rows, int64_t cols, T* dst) {
  const int64_t b0 = std::clamp<int64_t>(left, 0, cols), b1 = std::clamp<int64_t>(left + w, b0, cols);
  for (int64_t a = 0; a < rows; ++a, dst += cols) {
    const int64_t sa = a - top;
    if (sa < 0 || sa >= h) {
      zero_row(dst, cols);
      continue;
    }
    zero_row(dst, b0);
    copy_row(dst + b0, src + sa * w + b0 - left, b1 - b0);
    zero_row(dst + b1, cols - b1);
  }
}

// copy_window_body for the ISA in use: its row copies and zero fills on that ISA's vectors (in the portable build's
// 16-byte moves, DeepMNIST's 14x14 and 28x28 Winograd forward and input gradient took 1-2% longer).
template <typename T>
void copy_window(const T* src, int64_t h, int64_t w, int64_t top, int64_t left, int64_t rows, int64_t cols,
                 T* dst) {
  PerIsa<&copy_window_body<T>>::pick()(src, h, w, top, left, rows, cols, dst);
}

// dst[b] = src[2*b] for b < n, on vectors of Bytes bytes: two loads and a shuffle of their even lanes. It reads
// src[0 .. 2n - 2] only (the last vector stops short of src[2n - 1]: a plane's last row may end there).
template <typename T, int Bytes>
inline __attribute__((always_inline)) void gather_evens(T* dst, const T* src, int64_t n) {
  using W = Vector<T, Bytes>;
  constexpr int L = W::kLanes;
  int64_t b = 0;
  for (; b + L < n; b += L) {
    W::store(dst + b, __builtin_shuffle(W::load(src + 2 * b), W::load(src + 2 * b + L), W::kEvens));
  }
  for (; b < n; ++b) dst[b] = src[2 * b];
}

// dst[a][b] = src[a*step_h + row0][b*step_w + col0] for a < rows, b < cols; 0 outside the h × w plane src. One
// stride phase of a strided window (see Window). Stride 2 gathers in vectors (gather_evens, compiled per ISA: the
// element-by-element loop was a third of the stem's window copies, which took 7% of its batch-1 forward).
template <typename T, int Bytes>
inline __attribute__((always_inline)) void copy_window_phase_body(const T* src, int64_t h, int64_t w, int64_t row0,
                                                                  int64_t step_h, int64_t col0, int64_t step_w,
                                                                  int64_t rows, int64_t cols, T* dst) {
  if (step_h == 1 && step_w == 1) return copy_window_body(src, h, w, -row0, -col0, rows, cols, dst);
  // Columns b0 <= b < b1 read inside the plane: col0 + b*step_w in [0, w).
  const int64_t b0 = std::min(cols, first_reaching(0, col0, step_w));
  const int64_t b1 = std::max(b0, std::min(cols, first_reaching(w, col0, step_w)));
  for (int64_t a = 0; a < rows; ++a, dst += cols) {
    const int64_t sa = row0 + a * step_h;
    if (sa < 0 || sa >= h) {
      zero_row(dst, cols);
      continue;
    }
    zero_row(dst, b0);
    const T* from = src + sa * w + col0 + b0 * step_w;
    if (step_w == 2) {
      gather_evens<T, Bytes>(dst + b0, from, b1 - b0);
    } else {
      for (int64_t b = 0; b < b1 - b0; ++b) dst[b0 + b] = from[b * step_w];
    }
    zero_row(dst + b1, cols - b1);
  }
}
// copy_window_phase_body for the ISA in use, on its widest vectors.
template <typename T>
void copy_window_phase(const T* src, int64_t h, int64_t w, int64_t row0, int64_t step_h, int64_t col0,
                       int64_t step_w, int64_t rows, int64_t cols, T* dst) {
  by_isa(&PerIsa<&copy_window_phase_body<T, 64>>::avx512, &PerIsa<&copy_window_phase_body<T, 32>>::avx2,
         &PerIsa<&copy_window_phase_body<T, 16>>::portable)(src, h, w, row0, step_h, col0, step_w, rows, cols, dst);
}

// The distinct values of (i*dil) % stride for i < taps, in order of first appearance: the stride phases a strided
// window axis needs (a 1x1 kernel with stride 2 needs one, a 3x3 needs two per axis).
inline std::vector<int64_t> axis_phases(int64_t taps, int64_t dil, int64_t stride) {
  std::vector<int64_t> phases;
  for (int64_t i = 0; i < taps; ++i) {
    const int64_t ph = i * dil % stride;
    if (std::find(phases.begin(), phases.end(), ph) == phases.end()) phases.push_back(ph);
  }
  return phases;
}

// Implicit im2col (see the top of the file): an item covers output rows [y0, y1) of an out_h × out_w plane and
// copies `channels` source planes (src_h × src_w) into windows of rows_per_item + halo rows × `cols` columns,
// `plane` elements apart; output (y, x) is GEMM column (y - y0)*cols + x. A strided product (fprop and wgrad only)
// splits each source plane into its stride phases: window (channel, a, b) holds rows y0*sh + a + i*sh and columns
// b + j*sw of the padded source, so tap (r, s) reads phase ((r*dh) % sh, (s*dw) % sw) shifted by
// ((r*dh) / sh, (s*dw) / sw) and every GEMM row is again one contiguous run.
struct Window {
  int64_t channels, src_h, src_w, out_h, out_w;
  int64_t top, left;  // window row 0 (for y0 = 0) and column 0 sit at padded source row -top and column -left
  int64_t stride_h, stride_w;
  std::vector<int64_t> row_phases, col_phases;
  int64_t cols, halo, rows_per_item, plane;
  std::vector<int64_t> taps;  // GEMM B row (channel, r, s) starts taps[(channel*R + r)*S + s] into the window
  // A 1x1 kernel with stride 1 and no padding: the windows would be copies of the source rows, so the products
  // read the source in place instead, channel c's row at source_rows[c] (else empty).
  std::vector<int64_t> source_rows;

  // Columns and halo rows of the windows, and the elements per output row of an item's windows (for sizing items
  // before a Window exists).
  static int64_t cols_of(const Conv& cv, bool flip) {
    return (flip ? cv.w : cv.q) + (cv.s - 1) * cv.dil_w / (flip ? 1 : cv.stride_w);
  }
  static int64_t halo_of(const Conv& cv, bool flip) { return (cv.r - 1) * cv.dil_h / (flip ? 1 : cv.stride_h); }
  // Whether the products read the source planes in place (source_rows): a 1x1 kernel, stride 1, no padding.
  static bool reads_source(const Conv& cv) {
    return cv.rs == 1 && cv.unit_stride() && cv.pad_h == 0 && cv.pad_w == 0;
  }
  static int64_t row_elements(const Conv& cv, bool flip) {
    const int64_t phases = flip ? 1
                                : int64_t(axis_phases(cv.r, cv.dil_h, cv.stride_h).size() *
                                          axis_phases(cv.s, cv.dil_w, cv.stride_w).size());
    return (flip ? cv.kg : cv.cg) * phases * cols_of(cv, flip);
  }

  // fprop/wgrad (flip = false): windows of the input, padded by (pad_h, pad_w). dgrad (flip = true, stride 1 only):
  // windows of dY padded by (R-1)*dil - pad, with the taps mirrored: dX[h][w] sums dY[h + pad_h - r*dil_h][...].
  Window(const Conv& cv, bool flip, int64_t rows)
      : channels(flip ? cv.kg : cv.cg), src_h(flip ? cv.p : cv.h), src_w(flip ? cv.q : cv.w),
        out_h(flip ? cv.h : cv.p), out_w(flip ? cv.w : cv.q),
        top(flip ? (cv.r - 1) * cv.dil_h - cv.pad_h : cv.pad_h), left(flip ? (cv.s - 1) * cv.dil_w - cv.pad_w : cv.pad_w),
        stride_h(flip ? 1 : cv.stride_h), stride_w(flip ? 1 : cv.stride_w),
        row_phases(axis_phases(cv.r, cv.dil_h, stride_h)), col_phases(axis_phases(cv.s, cv.dil_w, stride_w)),
        cols(cols_of(cv, flip)), halo(halo_of(cv, flip)), rows_per_item(rows), plane((rows + halo) * cols),
        taps(channels * cv.rs) {
    TORCH_INTERNAL_ASSERT(!flip || cv.unit_stride(), "dgrad's implicit windows need stride 1");
    if (reads_source(cv)) {
      for (int64_t ch = 0; ch < channels; ++ch) source_rows.push_back(ch * src_h * src_w);
    }
    const auto index = [](const std::vector<int64_t>& phases, int64_t ph) {
      return int64_t(std::find(phases.begin(), phases.end(), ph) - phases.begin());
    };
    const int64_t n_col = int64_t(col_phases.size()), per_channel = int64_t(row_phases.size()) * n_col;
    for (int64_t ch = 0; ch < channels; ++ch) {
      for (int64_t r = 0; r < cv.r; ++r) {
        for (int64_t s = 0; s < cv.s; ++s) {
          const int64_t rr = (flip ? cv.r - 1 - r : r) * cv.dil_h, ss = (flip ? cv.s - 1 - s : s) * cv.dil_w;
          const int64_t phase = index(row_phases, rr % stride_h) * n_col + index(col_phases, ss % stride_w);
          taps[(ch * cv.r + r) * cv.s + s] = (ch * per_channel + phase) * plane + rr / stride_h * cols + ss / stride_w;
        }
      }
    }
  }

  // Elements of one item's windows, and the elements after them that GEMM and dot-tile reads may reach (whole
  // micro-kernel panels / vectors past the last output column); kept zero.
  int64_t span() const { return channels * int64_t(row_phases.size() * col_phases.size()) * plane; }
  int64_t slack() const { return cols + 64; }
  int64_t buffer_size() const { return span() + slack(); }
  int64_t items() const { return ceil_div(out_h, rows_per_item); }
  // Leading dimension of an item's product buffer: its rows_per_item*cols columns in whole panels of nr (Pad::kBC).
  int64_t product_ld(int nr) const { return padded_cols(rows_per_item * cols, nr); }

  // The output rows [y0, y1) of item `item`.
  std::pair<int64_t, int64_t> item_rows(int64_t item) const {
    const int64_t y0 = item * rows_per_item;
    return {y0, std::min(out_h, y0 + rows_per_item)};
  }

  // Copies the windows of item `item` of the planes at src into dst; returns its rows [y0, y1).
  template <typename T>
  std::pair<int64_t, int64_t> fill(const T* src, int64_t item, T* dst) const {
    const auto [y0, y1] = item_rows(item);
    fill_rows(src, y0, y1, dst);
    return {y0, y1};
  }

  // The windows for output rows [y0, y1) (at most rows_per_item of them).
  template <typename T>
  void fill_rows(const T* src, int64_t y0, int64_t y1, T* dst) const {
    fill_channels(src, y0, y1, 0, channels, dst);
  }

  // As fill_rows, for channels [ch0, ch1) only: channel ch0's windows first in dst.
  template <typename T>
  void fill_channels(const T* src, int64_t y0, int64_t y1, int64_t ch0, int64_t ch1, T* dst) const {
    for (int64_t ch = ch0; ch < ch1; ++ch) {
      for (const int64_t a : row_phases) {
        for (const int64_t b : col_phases) {
          copy_window_phase(src + ch * src_h * src_w, src_h, src_w, y0 * stride_h + a - top, stride_h, b - left,
                            stride_w, y1 - y0 + halo, cols, dst);
          dst += plane;
        }
      }
    }
  }
};

// Output rows per item for `units` independent (image, group) units: split the rows into enough items to keep
// every thread busy, and keep each item's windows within the scratch budget.
inline int64_t rows_per_item(const Conv& cv, bool flip, int64_t units, int64_t bytes_per_row) {
  const int64_t out_h = flip ? cv.h : cv.p;
  const int64_t halo = Window::halo_of(cv, flip);
  int64_t rows = ceil_div(out_h, ceil_div(2 * num_threads(), units));
  rows = std::min(rows, std::max<int64_t>(1, kScratchBytes / std::max<int64_t>(1, bytes_per_row) - halo));
  return std::max<int64_t>(1, rows);
}

// How an implicit pass (fprop, dgrad) splits its (image, group) units into items: output rows per item, and into
// how many parts its M output planes go. Every item reads its rows of A (M × K_gemm, a_bytes in all) once, so where
// A outweighs the windows of a whole plane (many channels on a small image, e.g. batch 1 at 512 channels on 7x7)
// and the units alone cannot keep every thread busy, the threads share out the planes, not the rows: A is then read
// once in all, and each GEMM keeps its full width. (Splitting A further into parts that stay in L2 from one image
// to the next measured no faster at batch 8-32: 0.25-2 MiB parts against none.)
struct ImplicitSplit {
  int64_t rows;
  int64_t m_parts;
};

// Where an implicit pass reads its source planes in place and its GEMM writes the output rows in place (a 1x1
// kernel, stride 1, no padding: Window::source_rows), item rows [y0, y1) are B's and C's columns from y0 * out_w on:
// unless that offset is a whole number of cache lines, every vector load and store of the item straddles two lines.
// So, where the planes themselves are whole lines, the items' rows go in multiples of the rows that make one (2 for
// 56 floats, 4 for 28), rounded down, and, among those down to half as many rows, as many items per thread as can
// be had (batch 1 on 56x56: 8 rows made 7 items for 2 threads, 6 make 10). Side by side in one process, forward /
// input gradient in ms, before -> after: batch 8 256 -> 64 on 56x56 3.37-3.68 -> 3.01-3.17 / 2.61-2.84 ->
// 2.58, batch 1 0.433-0.439 -> 0.373-0.377 / 0.36 -> 0.33-0.36; 64 -> 256 on 56x56 batch 8 2.59-2.62 (unchanged)
// / 3.38-3.71 -> 3.12-3.16, batch 1 0.38 / 0.434-0.439 -> 0.383-0.389; 512 -> 128 on 28x28 batch 8 3.14-3.25 ->
// 2.68-2.74 / 2.60 (unchanged), batch 1 0.418-0.430 -> 0.384-0.395 / 0.39-0.41; 128 -> 512 on 28x28 batch 8 2.34
// / 3.23-3.26 -> 2.81-2.83, batch 1 0.34 / 0.483-0.487 -> 0.424-0.436. (14x14 planes, 784 bytes, are not whole
// lines: rounding their rows measured up to 7% slower, hence the condition.) The sums keep their order.
inline int64_t line_aligned_rows(const Conv& cv, bool flip, int64_t rows, int64_t units, int64_t element_bytes) {
  const int64_t out_h = flip ? cv.h : cv.p, out_w = flip ? cv.w : cv.q;
  if (!Window::reads_source(cv) || out_h * out_w * element_bytes % 64 != 0) return rows;
  const int64_t aligned = 64 / std::gcd<int64_t>(64, out_w * element_bytes);
  if (rows < aligned || rows >= out_h) return rows;
  rows = rows / aligned * aligned;
  for (int64_t r = rows; r >= aligned && 2 * r >= rows; r -= aligned) {
    if (units * ceil_div(out_h, r) % num_threads() == 0) return r;
  }
  return rows;
}

inline ImplicitSplit implicit_split(const Conv& cv, bool flip, int64_t units, int64_t bytes_per_row, int64_t a_bytes,
                                    int64_t element_bytes) {
  const int64_t out_h = flip ? cv.h : cv.p;
  const int64_t halo = Window::halo_of(cv, flip);
  const int64_t parts = ceil_div(2 * num_threads(), units);
  if (parts > 1 && a_bytes > (out_h + halo) * bytes_per_row) {
    const int64_t rows = rows_per_item(cv, flip, parts * units, bytes_per_row);
    return {line_aligned_rows(cv, flip, rows, parts * units, element_bytes), parts};
  }
  return {line_aligned_rows(cv, flip, rows_per_item(cv, flip, units, bytes_per_row), units, element_bytes), 1};
}

// One fprop/dgrad item by implicit im2col: rows [y0, y1) of the M output planes at dst (out_h*out_w apart) =
// A · windows (+ bias[i] on plane i); `product` holds M × rows_per_item*cols, the product with its wasted columns,
// copied out by `add` (add_plain, or add_streaming for a large output). Where the output rows are wide (two column
// panels or more, so a row's ragged last panel is a small share) and A small (few input channels, as a network's
// stem: 3 channels × 7x7 taps), each output row is a GEMM of its own writing the output in place instead: the stem
// (batch 1, 64 x 112x112 outputs) 0.79 -> 0.70 ms, 3 -> 32 and 3 -> 64 3x3 convolutions on 224x224 images 19-37%
// faster. Larger A measured slower row by row (each row's GEMM re-reads A, its last panel ragged): 64 -> 128 and
// 256 -> 512 at stride 2 10-200% slower, AlexNet's 11x11 stride 4 (55-column rows) 17% slower.
template <typename T>
bool implicit_row_by_row(const Window& win, const MicroKernel<T>& uk, int64_t m) {
  return win.out_w >= 2 * uk.nr && m * int64_t(win.taps.size() * sizeof(T)) <= 64 * 1024;
}

// The output rows of an item that goes row by row: at most batch 1's (the rows shared out as two items per thread).
// Each row's GEMM reads only its own rows of the windows, so a longer item gains nothing, while its windows crowd
// L2 and fewer items balance the threads less evenly: the stem at batch 8, items of 92 rows (524 KB of windows)
// -> 28 (171 KB), 5.3-5.6 -> 4.9-5.2 ms over four pairs of processes.
inline int64_t row_by_row_item_rows(const Window& win) {
  return std::min(win.rows_per_item, ceil_div(win.out_h, 2 * num_threads()));
}

template <typename T>
void implicit_conv_item(const Window& win, const MicroKernel<T>& uk, int64_t m, MatrixA<T> a, const T* src,
                        int64_t item, T* window, T* product, T* dst, const T* bias,
                        void (*add)(T*, const T*, int64_t, T)) {
  const int64_t k_gemm = static_cast<int64_t>(win.taps.size()), plane = win.out_h * win.out_w;
  const auto add_bias = add_rows<T>();  // to output rows a GEMM wrote in place
  if (win.cols == win.out_w) {  // no wasted columns (1x1 kernels): the GEMM writes the output rows in place
    const auto [y0, y1] = win.item_rows(item);
    T* out = dst + y0 * win.out_w;
    const int64_t n = (y1 - y0) * win.out_w;
    if (win.source_rows.empty()) {
      win.fill(src, item, window);
      gemm(uk, m, n, k_gemm, a, window, win.taps.data(), out, plane, false, Pad::kB);
    } else {  // the source planes are the windows
      gemm(uk, m, n, k_gemm, a, src + y0 * win.src_w, win.source_rows.data(), out, plane, false, Pad::kNone);
    }
    if (bias != nullptr) {
      for (int64_t i = 0; i < m; ++i) add_bias(out + i * plane, out + i * plane, n, bias[i]);
    }
    return;
  }
  const auto [y0, y1] = win.fill(src, item, window);
  if (implicit_row_by_row(win, uk, m)) {
    // One GEMM per output row, written in place, the bias added after it (as `add` does: the sums round the same
    // as every other path's, which the fused convolutions' results must equal bit for bit).
    for (int64_t y = y0; y < y1; ++y) {
      T* out = dst + y * win.out_w;
      gemm(uk, m, win.out_w, k_gemm, a, window + (y - y0) * win.cols, win.taps.data(), out, plane, false, Pad::kB);
      if (bias != nullptr) {
        for (int64_t i = 0; i < m; ++i) add_bias(out + i * plane, out + i * plane, win.out_w, bias[i]);
      }
    }
    return;
  }
  const int64_t ld = win.product_ld(uk.nr);
  gemm(uk, m, (y1 - y0 - 1) * win.cols + win.out_w, k_gemm, a, window, win.taps.data(), product, ld, false, Pad::kBC);
  for (int64_t i = 0; i < m; ++i) {
    const T b = bias != nullptr ? bias[i] : T(0);
    for (int64_t y = y0; y < y1; ++y) {
      add(dst + (i * win.out_h + y) * win.out_w, product + i * ld + (y - y0) * win.cols, win.out_w, b);
    }
  }
}

// Every implicit item of a pass, (group, part of the m planes, image, chunk of rows), across the threads, each
// thread with its own window and product buffers. Group g of image img reads src_of(img, g) and writes the m planes
// at dst_of(img, g), with a + g*a_panel as its A operand (m × K_gemm) and bias + g*m (if any) added. The planes go
// in m_parts parts of whole micro-kernel row panels. Its buffers come from the caller's `scratch`.
template <typename T, typename SrcOf, typename DstOf>
void run_implicit_items(const Conv& cv, const Window& win, const MicroKernel<T>& uk, int64_t m, int64_t m_parts,
                        MatrixA<T> a, int64_t a_panel, SrcOf src_of, DstOf dst_of, const T* bias,
                        CallScratch& scratch) {
  const int64_t m_chunk = detail::round_up(ceil_div(m, m_parts), uk.mr), m_chunks = ceil_div(m, m_chunk);
  const int64_t chunks = win.items(), items = cv.n * cv.groups * m_chunks * chunks;
  const int64_t k_gemm = static_cast<int64_t>(win.taps.size()), plane = win.out_h * win.out_w;
  // Scratch (scratch.h): the products' columns are independent, so what the windows' slack holds reaches only
  // the wasted product columns, never the output.
  const int threads = num_threads();
  const auto windows = scratch.per_thread<T>(threads, win.source_rows.empty() ? win.buffer_size() : 0);
  const auto products =
      scratch.per_thread<T>(threads, win.cols == win.out_w || implicit_row_by_row(win, uk, std::min(m, m_chunk))
                                         ? 0
                                         : std::min(m, m_chunk) * win.product_ld(uk.nr));
  const bool stream = cv.n * cv.groups * m * plane * int64_t(sizeof(T)) >= kStreamBytes;
  const auto add = stream ? add_streaming<T>() : add_rows<T>();
#pragma omp parallel num_threads(threads)
  {
    T* const window = windows.get();
    T* const product = products.get();
#pragma omp for schedule(dynamic)
    for (int64_t item = 0; item < items; ++item) {
      const int64_t g = item / (m_chunks * cv.n * chunks), img = item / chunks % cv.n;
      const int64_t m0 = item / (cv.n * chunks) % m_chunks * m_chunk, rows = std::min(m_chunk, m - m0);
      const MatrixA<T> a_g{a.a + g * a_panel, a.layout, a.ld};
      implicit_conv_item(win, uk, rows, a_g.from_row(m0, k_gemm), src_of(img, g), item % chunks, window, product,
                         dst_of(img, g) + m0 * plane, bias != nullptr ? bias + g * m + m0 : nullptr, add);
      if (stream) stream_fence();
    }
  }
}

// dgrad's dcol form (conv_dgrad.cpp): dX planes padded to hp × wp, input channels in channel_chunks chunks of cc.
struct DcolPlan {
  int64_t wp, hp, cc, channel_chunks;
  int64_t images;  // per item: their dY planes side by side as the GEMM's columns (dY's 5x5 planes: N = 25 each)
  // Several images with dY rows shorter than 16 values: the columns interleave the images (position p of image i
  // at p*images + i), so that col2im adds a row of every image at once, Q*images values instead of Q, and
  // transposes the planes back after. DeepMNIST's last layer (128 x 64 -> 128, 5x5 dY) 1.7-2.1 -> 1.2 ms; 24-value
  // rows (MNIST's first layer, 128 images) measured a little slower so, hence the bound.
  bool interleaved;
};

inline DcolPlan dcol_plan(const Conv& cv, int64_t element_bytes) {
  DcolPlan d{};
  d.wp = cv.w + 2 * cv.pad_w;
  d.hp = cv.h + 2 * cv.pad_h;
  d.channel_chunks = std::min(cv.cg, ceil_div(2 * num_threads(), cv.n * cv.groups));
  d.cc = ceil_div(cv.cg, d.channel_chunks);
  // As many images as keep 2 items per thread and dcol within 1 MiB, spread evenly over the blocks.
  const int64_t blocks = ceil_div(2 * num_threads(), cv.groups * d.channel_chunks);
  const int64_t fit = std::max<int64_t>(1, 2 * kScratchBytes / (d.cc * cv.rs * cv.pq * element_bytes));
  const int64_t most = std::max<int64_t>(1, std::min(fit, cv.n / blocks));
  d.images = ceil_div(cv.n, ceil_div(cv.n, most));
  d.interleaved = d.images > 1 && cv.q < 16;
  return d;
}

// How dgrad's implicit product (windows of dY's planes with the taps flipped; A = W_g^T, Cg × Kg·R·S) splits.
inline ImplicitSplit dgrad_split(const Conv& cv, int64_t element_bytes) {
  return implicit_split(cv, true, cv.n * cv.groups, Window::row_elements(cv, true) * element_bytes,
                        cv.cg * cv.kg * cv.rs * element_bytes, element_bytes);
}

}  // namespace cnn_ext::cpu
