// Winograd F(2x2, 3x3): see winograd.h for the method. The transforms' inner loops run along a row of tiles in
// whole vectors (the input's even and odd columns split, the output's two columns merged, by vector shuffles) and
// are compiled per ISA; the 16 products per item run on gemm.h's micro-kernels.
#include "winograd.h"

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "conv_common.h"
#include "isa.h"

namespace cnn_ext::cpu {
namespace {

// The transforms use GCC vector types of `Bytes` bytes (gemm.h's VecOf): 64 on AVX-512, 32 on AVX2, 16 in the
// portable build. Their loops run over n tile columns, n a multiple of 16 (so of every vector's lane count): the
// columns past a row's tq compute values nobody uses, reading and writing buffer slack.
template <typename T, int Bytes>
struct Vec {
  using V = typename detail::VecOf<T, Bytes>::type;
  static constexpr int kLanes = Bytes / sizeof(T);
  using Index = std::conditional_t<sizeof(T) == 4, int32_t, int64_t>;
  typedef Index Mask __attribute__((vector_size(Bytes)));

  static inline __attribute__((always_inline)) V load(const T* p) {
    V v;
    std::memcpy(&v, p, sizeof(V));
    return v;
  }
  static inline __attribute__((always_inline)) void store(T* p, V v) { std::memcpy(p, &v, sizeof(V)); }
  static inline __attribute__((always_inline)) V splat(T x) { return V{} + x; }

  template <size_t... I>
  static constexpr Mask evens(std::index_sequence<I...>) { return Mask{static_cast<Index>(2 * I)...}; }
  template <size_t... I>
  static constexpr Mask odds(std::index_sequence<I...>) { return Mask{static_cast<Index>(2 * I + 1)...}; }
  // Lanes 0, L, 1, L+1, ... (low half) and L/2, L + L/2, ... (high half) of two vectors: interleaving them.
  template <size_t... I>
  static constexpr Mask zip_low(std::index_sequence<I...>) {
    return Mask{static_cast<Index>(I / 2 + (I % 2) * kLanes)...};
  }
  template <size_t... I>
  static constexpr Mask zip_high(std::index_sequence<I...>) {
    return Mask{static_cast<Index>(kLanes / 2 + I / 2 + (I % 2) * kLanes)...};
  }
  static constexpr Mask kEvens = evens(std::make_index_sequence<kLanes>());
  static constexpr Mask kOdds = odds(std::make_index_sequence<kLanes>());
  static constexpr Mask kZipLow = zip_low(std::make_index_sequence<kLanes>());
  static constexpr Mask kZipHigh = zip_high(std::make_index_sequence<kLanes>());
};

// d B for one window row (x: 2n + 2 readable columns): out[b*n + j] is column b of tile column j's 4-column slice
// times B, i.e. (x[2j] - x[2j+2], x[2j+1] + x[2j+2], x[2j+2] - x[2j+1], x[2j+1] - x[2j+3]).
template <typename T, int Bytes>
inline __attribute__((always_inline)) void columns_times_b(const T* x, int64_t n, T* out) {
  using W = Vec<T, Bytes>;
  constexpr int L = W::kLanes;
  for (int64_t j = 0; j < n; j += L) {
    const typename W::V lo = W::load(x + 2 * j), hi = W::load(x + 2 * j + L);
    const typename W::V lo2 = W::load(x + 2 * j + 2), hi2 = W::load(x + 2 * j + 2 + L);
    const typename W::V x0 = __builtin_shuffle(lo, hi, W::kEvens), x1 = __builtin_shuffle(lo, hi, W::kOdds);
    const typename W::V x2 = __builtin_shuffle(lo2, hi2, W::kEvens), x3 = __builtin_shuffle(lo2, hi2, W::kOdds);
    W::store(out + j, x0 - x2);
    W::store(out + n + j, x1 + x2);
    W::store(out + 2 * n + j, x2 - x1);
    W::store(out + 3 * n + j, x1 - x3);
  }
}

// Bᵀ d B for every tile of one channel's window (2*tile_rows + 2 rows of 2*tq + 2 columns, plus slack): V_ξ(c, t)
// at v[ξ*v_stride + t] for tile t = i*tq + j and ξ = 4*a + b (`v` already offset to channel c's row). A row of
// tiles writes n values from t = i*tq, the excess landing where the next row of tiles (or channel, or the buffer's
// slack) is written later. `ring` holds 16*n elements: (d B) of the four window rows of a tile row, kept so that
// each window row is transformed once.
template <typename T, int Bytes>
inline __attribute__((always_inline)) void input_transform_body(const T* window, int64_t tile_rows, int64_t tq,
                                                                int64_t n, T* v, int64_t v_stride, T* ring) {
  using W = Vec<T, Bytes>;
  constexpr int L = W::kLanes;
  const int64_t cols = 2 * tq + 2;
  columns_times_b<T, Bytes>(window, n, ring);
  columns_times_b<T, Bytes>(window + cols, n, ring + 4 * n);
  for (int64_t i = 0; i < tile_rows; ++i) {
    const int64_t r = 2 * i;
    columns_times_b<T, Bytes>(window + (r + 2) * cols, n, ring + ((r + 2) % 4) * 4 * n);
    columns_times_b<T, Bytes>(window + (r + 3) * cols, n, ring + ((r + 3) % 4) * 4 * n);
    T* vt = v + i * tq;
    for (int64_t b = 0; b < 4; ++b) {
      const T* x0 = ring + (r % 4) * 4 * n + b * n;
      const T* x1 = ring + ((r + 1) % 4) * 4 * n + b * n;
      const T* x2 = ring + ((r + 2) % 4) * 4 * n + b * n;
      const T* x3 = ring + ((r + 3) % 4) * 4 * n + b * n;
      for (int64_t j = 0; j < n; j += L) {
        const typename W::V a0 = W::load(x0 + j), a1 = W::load(x1 + j), a2 = W::load(x2 + j), a3 = W::load(x3 + j);
        W::store(vt + (0 * 4 + b) * v_stride + j, a0 - a2);
        W::store(vt + (1 * 4 + b) * v_stride + j, a1 + a2);
        W::store(vt + (2 * 4 + b) * v_stride + j, a2 - a1);
        W::store(vt + (3 * 4 + b) * v_stride + j, a1 - a3);
      }
    }
  }
}

// Aᵀ M A for every tile of one output channel: M_ξ(o, t) at m[ξ*m_stride + t] -> output rows 2*tile_row0 ... of
// the out_h × out_w plane y (+ bias), reading up to n - tq values past a row (the buffer has that slack). `line`
// holds 4*n elements: a tile row's two output rows, each interleaved from its tiles' two columns.
template <typename T, int Bytes>
inline __attribute__((always_inline)) void output_transform_body(const T* m, int64_t m_stride, int64_t tile_rows,
                                                                 int64_t tq, int64_t n, int64_t row0, int64_t out_h,
                                                                 int64_t out_w, T bias, T* y, T* line) {
  using W = Vec<T, Bytes>;
  constexpr int L = W::kLanes;
  for (int64_t i = 0; i < tile_rows; ++i) {
    const T* mt = m + i * tq;
    const int64_t row = row0 + 2 * i;
    const bool second = row + 1 < out_h;
    T* line1 = line + 2 * n;  // the second output row
    for (int64_t j = 0; j < n; j += L) {
      typename W::V s0[4], s1[4];
      for (int b = 0; b < 4; ++b) {
        const typename W::V a0 = W::load(mt + (0 * 4 + b) * m_stride + j);
        const typename W::V a1 = W::load(mt + (1 * 4 + b) * m_stride + j);
        const typename W::V a2 = W::load(mt + (2 * 4 + b) * m_stride + j);
        const typename W::V a3 = W::load(mt + (3 * 4 + b) * m_stride + j);
        s0[b] = a0 + a1 + a2;
        s1[b] = a1 - a2 - a3;
      }
      const typename W::V bv = W::splat(bias);
      const typename W::V y00 = s0[0] + s0[1] + s0[2] + bv, y01 = s0[1] - s0[2] - s0[3] + bv;
      const typename W::V y10 = s1[0] + s1[1] + s1[2] + bv, y11 = s1[1] - s1[2] - s1[3] + bv;
      W::store(line + 2 * j, __builtin_shuffle(y00, y01, W::kZipLow));
      W::store(line + 2 * j + L, __builtin_shuffle(y00, y01, W::kZipHigh));
      W::store(line1 + 2 * j, __builtin_shuffle(y10, y11, W::kZipLow));
      W::store(line1 + 2 * j + L, __builtin_shuffle(y10, y11, W::kZipHigh));
    }
    copy_row(y + row * out_w, line, out_w);
    if (second) copy_row(y + (row + 1) * out_w, line1, out_w);
  }
}

// The transforms compiled for each ISA.
template <typename T>
struct Transforms {
  using InFn = void (*)(const T*, int64_t, int64_t, int64_t, T*, int64_t, T*);
  using OutFn = void (*)(const T*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, T, T*, T*);

  CNN_EXT_TARGET_AVX512 static void in_avx512(const T* w, int64_t r, int64_t tq, int64_t n, T* v, int64_t vs,
                                              T* ring) {
    input_transform_body<T, 64>(w, r, tq, n, v, vs, ring);
  }
  CNN_EXT_TARGET_AVX2 static void in_avx2(const T* w, int64_t r, int64_t tq, int64_t n, T* v, int64_t vs, T* ring) {
    input_transform_body<T, 32>(w, r, tq, n, v, vs, ring);
  }
  static void in_portable(const T* w, int64_t r, int64_t tq, int64_t n, T* v, int64_t vs, T* ring) {
    input_transform_body<T, 16>(w, r, tq, n, v, vs, ring);
  }
  CNN_EXT_TARGET_AVX512 static void out_avx512(const T* m, int64_t ms, int64_t r, int64_t tq, int64_t n,
                                               int64_t row0, int64_t oh, int64_t ow, T bias, T* y, T* line) {
    output_transform_body<T, 64>(m, ms, r, tq, n, row0, oh, ow, bias, y, line);
  }
  CNN_EXT_TARGET_AVX2 static void out_avx2(const T* m, int64_t ms, int64_t r, int64_t tq, int64_t n, int64_t row0,
                                           int64_t oh, int64_t ow, T bias, T* y, T* line) {
    output_transform_body<T, 32>(m, ms, r, tq, n, row0, oh, ow, bias, y, line);
  }
  static void out_portable(const T* m, int64_t ms, int64_t r, int64_t tq, int64_t n, int64_t row0, int64_t oh,
                           int64_t ow, T bias, T* y, T* line) {
    output_transform_body<T, 16>(m, ms, r, tq, n, row0, oh, ow, bias, y, line);
  }
  static InFn input() { return by_isa<InFn>(&in_avx512, &in_avx2, &in_portable); }
  static OutFn output() { return by_isa<OutFn>(&out_avx512, &out_avx2, &out_portable); }
};

// U_ξ = (G g Gᵀ)_ξ for input channel i and every output channel, written into the 16 GEMM A operands of a group
// (gemm.h's panels of mr output channels: element (o, i) of a panel at i*mr + o % mr). The transform runs along the
// output channels, as vectors, on the kernel's taps gathered as k[tap][o] (out_pad >= out columns, zero past out);
// `u` holds 16*out_pad elements.
template <typename T>
__attribute__((always_inline)) inline void weight_transform_body(int64_t in, int64_t i, int64_t out_pad, int64_t mr,
                                                                 int64_t panel, const T* k, T* u, T* packed) {
  for (int64_t a = 0; a < 4; ++a) {
    T* __restrict ua = u + a * 4 * out_pad;
    for (int64_t o = 0; o < out_pad; ++o) {
      T row[3];  // row a of G k: G's row a applied to the kernel's columns
      for (int s = 0; s < 3; ++s) {
        const T k0 = k[(0 * 3 + s) * out_pad + o], k1 = k[(1 * 3 + s) * out_pad + o], k2 = k[(2 * 3 + s) * out_pad + o];
        row[s] = a == 0 ? k0 : a == 3 ? k2 : a == 1 ? T(0.5) * (k0 + k1 + k2) : T(0.5) * (k0 - k1 + k2);
      }
      ua[o] = row[0];  // (G k) Gᵀ: Gᵀ's columns applied to the row
      ua[out_pad + o] = T(0.5) * (row[0] + row[1] + row[2]);
      ua[2 * out_pad + o] = T(0.5) * (row[0] - row[1] + row[2]);
      ua[3 * out_pad + o] = row[2];
    }
  }
  for (int64_t xi = 0; xi < 16; ++xi) {
    for (int64_t o0 = 0; o0 < out_pad; o0 += mr) {
      const T* from = u + xi * out_pad + o0;
      T* to = packed + xi * panel + o0 * in + i * mr;
      for (int64_t r = 0; r < mr; ++r) to[r] = from[r];
    }
  }
}

template <typename T>
std::vector<T> transform_weights(const Winograd3x3& wp, const T* weights, bool flip, int mr) {
  const int64_t panel = packed_a_size(wp.out, wp.in, mr), out_pad = detail::round_up(wp.out, mr);
  std::vector<T> packed(wp.groups * 16 * panel);
  const auto fn = PerIsa<&weight_transform_body<T>>::pick();
#pragma omp parallel num_threads(num_threads())
  {
    std::vector<T> k(9 * out_pad), u(16 * out_pad);  // zeros past `out`: the last panel's padding rows
#pragma omp for schedule(static)
    for (int64_t gi = 0; gi < wp.groups * wp.in; ++gi) {
      const int64_t g = gi / wp.in, i = gi % wp.in;
      for (int64_t o = 0; o < wp.out; ++o) {
        for (int64_t tap = 0; tap < 9; ++tap) {
          k[tap * out_pad + o] = flip ? weights[((g * wp.in + i) * wp.out + o) * 9 + 8 - tap]
                                      : weights[((g * wp.out + o) * wp.in + i) * 9 + tap];
        }
      }
      fn(wp.in, i, out_pad, mr, panel, k.data(), u.data(), packed.data() + g * 16 * panel);
    }
  }
  return packed;
}

}  // namespace

template <typename T>
void winograd_3x3(const Winograd3x3& wp, const T* src, const T* weights, bool flip, const T* bias, T* dst) {
  const int64_t tp = ceil_div(wp.out_h, 2), tq = ceil_div(wp.out_w, 2);
  const int64_t n = detail::round_up(tq, 16);  // the transforms' loops run over n tile columns: whole vectors
  const int threads = num_threads();
  // An item is a run of consecutive tile rows of one group, across images (row R of the group is tile row R % tp
  // of image R / tp), so that small images still make long GEMMs. Its tiles are the GEMMs' columns: about a
  // multiple of the micro-kernel's width, with V and M (16 × (in + out) × tiles) within about 2 MiB, and enough
  // items for every thread.
  const int64_t total_rows = wp.n * tp;
  const int64_t budget = std::max<int64_t>(16, 4 * kScratchBytes / (16 * int64_t(sizeof(T)) * (wp.in + wp.out)));
  const int64_t nr_guess = 64 / int64_t(sizeof(T)) * 4;  // the AVX-512 6x4 micro-kernel's columns
  const int64_t target = budget >= nr_guess ? budget / nr_guess * nr_guess : budget;
  int64_t tile_rows = std::clamp<int64_t>((target + tq / 2) / tq, 1, total_rows);
  tile_rows = std::min(tile_rows, ceil_div(total_rows, ceil_div(2 * threads, wp.groups)));
  const int64_t chunks = ceil_div(total_rows, tile_rows), items = wp.groups * chunks;
  const int64_t max_tiles = tile_rows * tq;

  // GEMM per ξ: M_ξ[out × tiles] = U_ξ[out × in] · V_ξ[in × tiles], V read in place (rows padded to whole panels).
  const MicroKernel<T> uk = pick_micro_kernel<T>(wp.out, max_tiles);
  const int64_t ld = padded_cols(max_tiles, uk.nr);
  const std::vector<T> u = transform_weights(wp, weights, flip, uk.mr);
  const int64_t u_panel = packed_a_size(wp.out, wp.in, uk.mr);
  const std::vector<int64_t> v_rows = row_offsets(wp.in, ld);
  // V's 16 blocks are n elements apart beyond their in × ld rows: a channel's last row of tiles may overflow its
  // row by up to n - tq values (see input_transform_body), which must not reach the next block's first channel.
  const int64_t v_stride = wp.in * ld + n, m_stride = wp.out * ld;
  const int64_t win_cols = 2 * tq + 2, win_rows = 2 * std::min(tile_rows, tp) + 2;
  const int64_t slack = 2 * n + 2;  // read past the windows' and M's last rows
  const int64_t in_plane = wp.in_h * wp.in_w, out_plane = wp.out_h * wp.out_w;

  const auto in_fn = Transforms<T>::input();
  const auto out_fn = Transforms<T>::output();

#pragma omp parallel num_threads(threads)
  {
    std::vector<T> window(win_rows * win_cols + slack), ring(16 * n), line(4 * n);
    std::vector<T> v(16 * v_stride + slack), m(16 * m_stride + slack);
#pragma omp for schedule(dynamic)
    for (int64_t item = 0; item < items; ++item) {
      const int64_t g = item / chunks, r0 = item % chunks * tile_rows, r1 = std::min(total_rows, r0 + tile_rows);
      const int64_t tiles = (r1 - r0) * tq;
      // Calls fn(image, its first tile row, rows, first column of V) for each image's share of rows [r0, r1).
      auto for_each_image = [&](auto&& fn) {
        for (int64_t r = r0; r < r1;) {
          const int64_t img = r / tp, tr = r % tp, rows = std::min(tp - tr, r1 - r);
          fn(img, tr, rows, (r - r0) * tq);
          r += rows;
        }
      };
      for (int64_t c = 0; c < wp.in; ++c) {
        for_each_image([&](int64_t img, int64_t tr, int64_t rows, int64_t col) {
          // Window row a is input row 2*tr - pad_h + a; column b is input column b - pad_w.
          const T* x = src + ((img * wp.groups + g) * wp.in + c) * in_plane;
          copy_window(x, wp.in_h, wp.in_w, wp.pad_h - 2 * tr, wp.pad_w, 2 * rows + 2, win_cols, window.data());
          in_fn(window.data(), rows, tq, n, v.data() + c * ld + col, v_stride, ring.data());
        });
      }
      for (int64_t xi = 0; xi < 16; ++xi) {
        gemm(uk, wp.out, tiles, wp.in, u.data() + (g * 16 + xi) * u_panel, v.data() + xi * v_stride,
             v_rows.data(), m.data() + xi * m_stride, ld, false, true);
      }
      for_each_image([&](int64_t img, int64_t tr, int64_t rows, int64_t col) {
        T* y = dst + (img * wp.groups + g) * wp.out * out_plane;
        for (int64_t o = 0; o < wp.out; ++o) {
          out_fn(m.data() + o * ld + col, m_stride, rows, tq, n, 2 * tr, wp.out_h, wp.out_w,
                 bias != nullptr ? bias[g * wp.out + o] : T(0), y + o * out_plane, line.data());
        }
      });
    }
  }
}

template void winograd_3x3<float>(const Winograd3x3&, const float*, const float*, bool, const float*, float*);
template void winograd_3x3<double>(const Winograd3x3&, const double*, const double*, bool, const double*, double*);

}  // namespace cnn_ext::cpu
