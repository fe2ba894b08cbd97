// Winograd F(2x2, 3x3) and F(4x4, 3x3), and their duals for the weight gradient: see winograd.h for the method.
// The transforms' inner loops run along a row of tiles in whole vectors (the input's tile columns split, the
// output's merged, by vector shuffles) and are compiled per ISA; the 16 or 36 products per item run on gemm.h's
// micro-kernels.
#include "winograd.h"

#include <algorithm>
#include <memory>
#include <type_traits>
#include <utility>
#include <vector>

#include "conv_common.h"
#include "isa.h"
#include "scratch.h"

namespace cnn_ext::cpu {
namespace {

// The transforms use GCC vector types of `Bytes` bytes (gemm.h's VecOf): up to 64 on AVX-512, 32 on AVX2, 16 in the
// portable build (Transforms::bytes). Their loops run over n tile columns, n a multiple of the vectors' lanes: the
// columns past a row's tq compute values nobody uses, reading and writing buffer slack. gemm.h's Vector carries the
// lane permutations the transforms shuffle with.
template <typename T, int Bytes>
using Vec = Vector<T, Bytes>;

// F(2x2, 3x3)'s matrices applied to a column of values (V: a GCC vector, or T). Bᵀ x: (x0 - x2, x1 + x2, x2 - x1,
// x1 - x3); Aᵀ x: (x0 + x1 + x2, x1 - x2 - x3); G x: (x0, (x0 + x1 + x2)/2, (x0 - x1 + x2)/2, x2).
template <typename V>
inline __attribute__((always_inline)) void times_bt4(const V (&x)[4], V (&y)[4]) {
  y[0] = x[0] - x[2];
  y[1] = x[1] + x[2];
  y[2] = x[2] - x[1];
  y[3] = x[1] - x[3];
}
template <typename V>
inline __attribute__((always_inline)) void times_at4(const V (&x)[4], V (&y)[2]) {
  y[0] = x[0] + x[1] + x[2];
  y[1] = x[1] - x[2] - x[3];
}
template <typename V, typename T>
inline __attribute__((always_inline)) void times_g4(const V (&x)[3], V (&y)[4]) {
  const V half = V{} + T(0.5);
  y[0] = x[0];
  y[1] = half * (x[0] + x[1] + x[2]);
  y[2] = half * (x[0] - x[1] + x[2]);
  y[3] = x[2];
}

// F(4x4, 3x3)'s matrices (winograd.h) applied to a column of values, as sums sharing their terms.
// Bᵀ x: (x0 - 2x2 + x4 + 1.5(x3 - x1), x1 - 2.5x2 + 0.5x3 + x4, 0.5x2 - x1 + 2.5x3 + x4, x4 - x2 + 2(x3 - x1),
// x4 - x2 - 0.5(x3 - x1), x1 - 2x3 + x5 + 1.5(x4 - x2)).
template <typename V, typename T>
inline __attribute__((always_inline)) void times_bt6(const V (&x)[6], V (&y)[6]) {
  const auto c = [](T value) { return V{} + value; };
  const V x31 = x[3] - x[1], x42 = x[4] - x[2];
  y[0] = x[0] - c(2) * x[2] + x[4] + c(1.5) * x31;
  y[1] = x[1] - c(2.5) * x[2] + c(0.5) * x[3] + x[4];
  y[2] = c(0.5) * x[2] - x[1] + c(2.5) * x[3] + x[4];
  y[3] = x42 + c(2) * x31;
  y[4] = x42 - c(0.5) * x31;
  y[5] = x[1] - c(2) * x[3] + x[5] + c(1.5) * x42;
}

// Aᵀ x: (x0 + x1 + x2 + x3 + x4, x2 - x1 + x3/2 - 2x4, x1 + x2 + x3/4 + 4x4, x2 - x1 + x3/8 - 8x4 + x5).
template <typename V, typename T>
inline __attribute__((always_inline)) void times_at6(const V (&x)[6], V (&y)[4]) {
  const auto c = [](T value) { return V{} + value; };
  const V s12 = x[1] + x[2], d21 = x[2] - x[1];
  y[0] = x[0] + s12 + x[3] + x[4];
  y[1] = d21 + c(0.5) * x[3] - c(2) * x[4];
  y[2] = s12 + c(0.25) * x[3] + c(4) * x[4];
  y[3] = d21 + c(0.125) * x[3] - c(8) * x[4] + x[5];
}

// G x: (x0, (x1 - x0 - x2)/3, (x0 + x1 + x2)/3, -(16x0 + 8x1 + 4x2)/15, (x0 - 2x1 + 4x2)/15, x2).
template <typename V, typename T>
inline __attribute__((always_inline)) void times_g6(const V (&x)[3], V (&y)[6]) {
  const auto c = [](T value) { return V{} + value; };
  const V third = c(T(1) / T(3)) * (x[0] + x[2]), middle = c(T(1) / T(3)) * x[1];
  y[0] = x[0];
  y[1] = middle - third;
  y[2] = middle + third;
  y[3] = c(T(-1) / T(15)) * (c(16) * x[0] + c(8) * x[1] + c(4) * x[2]);
  y[4] = c(T(1) / T(15)) * (x[0] - c(2) * x[1] + c(4) * x[2]);
  y[5] = x[2];
}

// Y = F X Fᵀ for F given as its action on a column (f: In values to Out), X's element (a, b) read by x(a, b) and Y's
// written by y(a, b, value): F applied to X's columns, then to the rows of the result.
template <int In, int Out, typename V, typename Fn, typename Load, typename Store>
inline __attribute__((always_inline)) void both_sides(Fn f, Load x, Store y) {
  V fx[Out][In];  // F X
  for (int b = 0; b < In; ++b) {
    V column[In], image[Out];
    for (int k = 0; k < In; ++k) column[k] = x(k, b);
    f(column, image);
    for (int a = 0; a < Out; ++a) fx[a][b] = image[a];
  }
  for (int a = 0; a < Out; ++a) {
    V image[Out];
    f(fx[a], image);
    for (int b = 0; b < Out; ++b) y(a, b, image[b]);
  }
}

// Bᵀ x and Aᵀ x of F(M x M, 3x3) on a column of M + 2 values.
template <int M, typename V, typename T>
inline __attribute__((always_inline)) void times_bt(const V (&x)[M + 2], V (&y)[M + 2]) {
  if constexpr (M == 2) {
    times_bt4(x, y);
  } else {
    times_bt6<V, T>(x, y);
  }
}
template <int M, typename V, typename T>
inline __attribute__((always_inline)) void times_at(const V (&x)[M + 2], V (&y)[M]) {
  if constexpr (M == 2) {
    times_at4(x, y);
  } else {
    times_at6<V, T>(x, y);
  }
}

// Lanes k, k + 4, k + 8, ... of the 4L values at p, for k = 0..3: a row's tile columns split by their offset.
template <typename T, int Bytes>
inline __attribute__((always_inline)) void deinterleave4(const T* p, typename Vec<T, Bytes>::V (&x)[4]) {
  using W = Vec<T, Bytes>;
  constexpr int L = W::kLanes;
  const typename W::V p0 = W::load(p), p1 = W::load(p + L), p2 = W::load(p + 2 * L), p3 = W::load(p + 3 * L);
  const typename W::V e01 = __builtin_shuffle(p0, p1, W::kEvens), o01 = __builtin_shuffle(p0, p1, W::kOdds);
  const typename W::V e23 = __builtin_shuffle(p2, p3, W::kEvens), o23 = __builtin_shuffle(p2, p3, W::kOdds);
  x[0] = __builtin_shuffle(e01, e23, W::kEvens);
  x[1] = __builtin_shuffle(o01, o23, W::kEvens);
  x[2] = __builtin_shuffle(e01, e23, W::kOdds);
  x[3] = __builtin_shuffle(o01, o23, W::kOdds);
}

// Columns 0 .. M + 1 of the tile columns' slices of a window row (slice j from column M*j; lane l of c[k]: column
// k of slice j + l), from the M*L + M + 2 columns at x: the even and odd columns split by vector shuffles (M = 4:
// twice, then columns 4 and 5 as 0 and 1 of the next slices).
template <typename T, int Bytes, int M>
inline __attribute__((always_inline)) void split_columns(const T* x, typename Vec<T, Bytes>::V (&c)[M + 2]) {
  using W = Vec<T, Bytes>;
  constexpr int L = W::kLanes;
  if constexpr (M == 2) {
    const typename W::V lo = W::load(x), hi = W::load(x + L), lo2 = W::load(x + 2), hi2 = W::load(x + 2 + L);
    c[0] = __builtin_shuffle(lo, hi, W::kEvens);
    c[1] = __builtin_shuffle(lo, hi, W::kOdds);
    c[2] = __builtin_shuffle(lo2, hi2, W::kEvens);
    c[3] = __builtin_shuffle(lo2, hi2, W::kOdds);
  } else {
    typename W::V next[4];
    deinterleave4<T, Bytes>(x, reinterpret_cast<typename W::V(&)[4]>(c));
    deinterleave4<T, Bytes>(x + 4, next);  // the shuffles of columns 2 and 3 go unused
    c[4] = next[0];
    c[5] = next[1];
  }
}

// The M vectors z (lane l of z[c]: output column M*(j + l) + c) interleaved into the M*L values at out.
template <typename T, int Bytes, int M>
inline __attribute__((always_inline)) void merge_columns(const typename Vec<T, Bytes>::V (&z)[M], T* out) {
  using W = Vec<T, Bytes>;
  constexpr int L = W::kLanes;
  if constexpr (M == 2) {
    W::store(out, __builtin_shuffle(z[0], z[1], W::kZipLow));
    W::store(out + L, __builtin_shuffle(z[0], z[1], W::kZipHigh));
  } else {  // two rounds: columns 0 and 2, 1 and 3, then the pairs
    const typename W::V lo02 = __builtin_shuffle(z[0], z[2], W::kZipLow);
    const typename W::V hi02 = __builtin_shuffle(z[0], z[2], W::kZipHigh);
    const typename W::V lo13 = __builtin_shuffle(z[1], z[3], W::kZipLow);
    const typename W::V hi13 = __builtin_shuffle(z[1], z[3], W::kZipHigh);
    W::store(out, __builtin_shuffle(lo02, lo13, W::kZipLow));
    W::store(out + L, __builtin_shuffle(lo02, lo13, W::kZipHigh));
    W::store(out + 2 * L, __builtin_shuffle(hi02, hi13, W::kZipLow));
    W::store(out + 3 * L, __builtin_shuffle(hi02, hi13, W::kZipHigh));
  }
}

// d B for one window row of F(M x M, 3x3)'s tiles (x: M*n + M readable columns): out[b*n + j] is column b of tile
// column j's (M + 2)-column slice times B.
template <typename T, int Bytes, int M>
inline __attribute__((always_inline)) void columns_times_b(const T* x, int64_t n, T* out) {
  using W = Vec<T, Bytes>;
  constexpr int L = W::kLanes;
  for (int64_t j = 0; j < n; j += L) {
    typename W::V c[M + 2], y[M + 2];
    split_columns<T, Bytes, M>(x + M * j, c);
    times_bt<M, typename W::V, T>(c, y);
    for (int b = 0; b < M + 2; ++b) W::store(out + b * n + j, y[b]);
  }
}

// Bᵀ d B of F(M x M, 3x3) for every tile of one channel's window (M*tile_rows + 2 rows of M*tq + 2 columns, plus
// slack): V_ξ(c, t) at v[ξ*v_stride + t] for tile t = i*tq + j and ξ = (M + 2)*a + b (`v` already offset to
// channel c's row). A row of tiles writes n values from t = i*tq, the excess landing where the next row of tiles
// (or channel, or the buffer's slack) is written later. `ring` holds (M + 2)² n elements: (d B) of the M + 2 window
// rows of a tile row, kept so that each window row is transformed once (tile rows overlap by two window rows).
template <typename T, int Bytes, int M>
inline __attribute__((always_inline)) void input_transform_body(const T* window, int64_t tile_rows, int64_t tq,
                                                                int64_t n, T* v, int64_t v_stride, T* ring) {
  using W = Vec<T, Bytes>;
  constexpr int L = W::kLanes, A = M + 2;
  const int64_t cols = M * tq + 2;
  const auto ring_row = [&](int64_t r) { return ring + r % A * A * n; };
  columns_times_b<T, Bytes, M>(window, n, ring_row(0));
  columns_times_b<T, Bytes, M>(window + cols, n, ring_row(1));
  for (int64_t i = 0; i < tile_rows; ++i) {
    const int64_t r = M * i;
    for (int64_t k = 2; k < A; ++k) columns_times_b<T, Bytes, M>(window + (r + k) * cols, n, ring_row(r + k));
    T* vt = v + i * tq;
    for (int64_t b = 0; b < A; ++b) {
      const T* x[A];
      for (int k = 0; k < A; ++k) x[k] = ring_row(r + k) + b * n;
      for (int64_t j = 0; j < n; j += L) {
        typename W::V a[A], y[A];
        for (int k = 0; k < A; ++k) a[k] = W::load(x[k] + j);
        times_bt<M, typename W::V, T>(a, y);
        for (int k = 0; k < A; ++k) W::store(vt + (A * k + b) * v_stride + j, y[k]);
      }
    }
  }
}

// Aᵀ M A of F(M x M, 3x3) for every tile of one output channel: M_ξ(o, t) at m[ξ*m_stride + t] -> output rows
// M*tile_row0 ... of the out_h × out_w plane y (+ bias), reading up to n - tq values past a row (the buffer has
// that slack). `line` holds M²n elements: a tile row's M output rows, each interleaved from its tiles' M columns.
template <typename T, int Bytes, int M>
inline __attribute__((always_inline)) void output_transform_body(const T* m, int64_t m_stride, int64_t tile_rows,
                                                                 int64_t tq, int64_t n, int64_t row0, int64_t out_h,
                                                                 int64_t out_w, T bias, T* y, T* line) {
  using W = Vec<T, Bytes>;
  constexpr int L = W::kLanes, A = M + 2;
  for (int64_t i = 0; i < tile_rows; ++i) {
    const T* mt = m + i * tq;
    const int64_t row = row0 + M * i;
    for (int64_t j = 0; j < n; j += L) {
      typename W::V s[M][A];  // Aᵀ M: row r of the tile's transformed rows, column b
      for (int b = 0; b < A; ++b) {
        typename W::V a[A], z[M];
        for (int k = 0; k < A; ++k) a[k] = W::load(mt + (A * k + b) * m_stride + j);
        times_at<M, typename W::V, T>(a, z);
        for (int r = 0; r < M; ++r) s[r][b] = z[r];
      }
      const typename W::V bv = W::splat(bias);
      for (int r = 0; r < M; ++r) {
        typename W::V z[M];
        times_at<M, typename W::V, T>(s[r], z);
        for (int c = 0; c < M; ++c) z[c] += bv;
        merge_columns<T, Bytes, M>(z, line + r * M * n + M * j);
      }
    }
    for (int64_t r = 0; r < M && row + r < out_h; ++r) copy_row(y + (row + r) * out_w, line + r * M * n, out_w);
  }
}

// The transforms compiled for the ISA in use, on vectors of `bytes` bytes (at most the ISA's width): their loops
// run over n = tq rounded up to whole vectors, so narrower vectors waste less on small planes.
template <typename T, int M>
struct Transforms {
  template <int Bytes>
  using In = PerIsa<&input_transform_body<T, Bytes, M>>;
  template <int Bytes>
  using Out = PerIsa<&output_transform_body<T, Bytes, M>>;

  // The narrowest vectors that take as few iterations over tq tile columns as the ISA's widest (a 7-column row of
  // tiles: one 8-lane vector instead of one 16-lane one, 7/8 of it used instead of 7/16).
  static int bytes(int64_t tq) {
    const int widest = vector_bytes();
    const auto iterations = [&](int b) { return ceil_div(tq, int64_t(b / sizeof(T))); };
    int b = widest;
    while (b > 16 && iterations(b / 2) == iterations(widest)) b /= 2;
    return b;
  }
  // Only the variants an ISA can take are compiled (bytes() gives 64 only on AVX-512, 32 on AVX-512 or AVX2).
  template <template <int> class F>
  static typename F<16>::Fn pick(int bytes) {
    const bool avx512 = isa() == Isa::kAvx512;
    return bytes == 64 ? &F<64>::avx512 : bytes == 32 ? (avx512 ? &F<32>::avx512 : &F<32>::avx2) : F<16>::pick();
  }
  static typename In<16>::Fn input(int bytes) { return pick<In>(bytes); }
  static typename Out<16>::Fn output(int bytes) { return pick<Out>(bytes); }
};

// U = G g Gᵀ of F(M x M, 3x3) for the filters from j (V: a GCC vector of filters, or T for one): tap (r, s) of
// filter j at taps[(3*r + s)*ld + j] (at taps[(8 - 3*r - s)*ld + j] when flipped: rotated by 180 degrees); U_ξ,
// ξ = (M + 2)*a + b, at u[ξ*u_stride + j]. One filter's taps as they lie in the kernel: ld = 1, j = 0.
template <int M, typename V, typename T>
inline __attribute__((always_inline)) void filter_values(const T* taps, int64_t ld, bool flip, int64_t j, T* u,
                                                         int64_t u_stride) {
  constexpr int A = M + 2;
  const auto times_g = [](const V(&x)[3], V(&y)[A]) {
    if constexpr (M == 2) {
      times_g4<V, T>(x, y);
    } else {
      times_g6<V, T>(x, y);
    }
  };
  const auto tap = [&](int r, int s) { return load_as<V>(taps + (flip ? 8 - 3 * r - s : 3 * r + s) * ld + j); };
  both_sides<3, A, V>(times_g, tap, [&](int a, int b, V value) { store_as(u + (A * a + b) * u_stride + j, value); });
}

template <typename T, int Bytes, int M>
inline __attribute__((always_inline)) void filter_block_body(const T* taps, int64_t ld, int64_t count, bool flip,
                                                             T* u, int64_t u_stride) {
  using V = typename detail::VecOf<T, Bytes>::type;
  constexpr int64_t L = Bytes / sizeof(T);
  int64_t j = 0;
  for (; j + L <= count; j += L) filter_values<M, V>(taps, ld, flip, j, u, u_stride);
  for (; j < count; ++j) filter_values<M, T>(taps, ld, flip, j, u, u_stride);
}

// filter_block_body on the widest vectors of the ISA in use.
template <typename T, int M>
auto filter_block() {
  return by_isa(&PerIsa<&filter_block_body<T, 64, M>>::avx512, &PerIsa<&filter_block_body<T, 32, M>>::avx2,
                &PerIsa<&filter_block_body<T, 16, M>>::portable);
}

// U_ξ for `runs` runs of `count` filters of the kernel (filter j of run r is filter r*run_step + j*filter_step;
// a filter is 9 taps): filter j of run r at u[ξ*u_stride + r*ld + j], for the GEMMs to read in place. Runs of
// consecutive filters (filter_step 1: a plain kernel's output channels, a flipped one's input channels), or of
// filters filter_step apart with the runs adjacent (run_step 1: a plain kernel's input channels, each run its
// output channels). Blocks of filters are transposed to tap-major (conv_common.h's transpose), then transformed
// along the filters in vectors.
template <typename T, int M>
void transform_filters(const T* weights, int64_t runs, int64_t run_step, int64_t filter_step, int64_t count, bool flip,
                       T* u, int64_t ld, int64_t u_stride) {
  constexpr int64_t kBlock = 128;
  const auto transform = filter_block<T, M>();
  T taps[9 * kBlock];
  if (filter_step == 1) {
    for (int64_t r = 0; r < runs; ++r) {
      for (int64_t f0 = 0; f0 < count; f0 += kBlock) {
        const int64_t filters = std::min(kBlock, count - f0);
        transpose(weights + (r * run_step + f0) * 9, 9, filters, 9, taps, kBlock);
        transform(taps, kBlock, filters, flip, u + r * ld + f0, u_stride);
      }
    }
    return;
  }
  // A run's filters far apart (9*in apart), the runs adjacent: 16 filters of 8 runs at a time, each filter's 72
  // consecutive taps transposed as whole 8x8 blocks. Run by run, a filter's 9 taps took a line apart from the
  // next filter's, an 8x8 block plus a column element by element: the transform took a third of a 256-channel
  // batch-1 forward instead of a sixth.
  TORCH_INTERNAL_ASSERT(run_step == 1, "cnn_ext: strided filters need adjacent runs");
  constexpr int64_t kGroup = 16, kRuns = 8;
  static_assert(kGroup * kRuns <= kBlock, "taps holds the group's filters");
  for (int64_t f0 = 0; f0 < count; f0 += kGroup) {
    const int64_t filters = std::min(kGroup, count - f0);
    for (int64_t r0 = 0; r0 < runs; r0 += kRuns) {
      const int64_t n = std::min(kRuns, runs - r0);
      transpose(weights + (r0 + f0 * filter_step) * 9, 9 * filter_step, filters, 9 * n, taps, kGroup);
      for (int64_t r = 0; r < n; ++r) {
        transform(taps + 9 * r * kGroup, kGroup, filters, flip, u + (r0 + r) * ld + f0, u_stride);
      }
    }
  }
}

// The (M + 2)² GEMM A operands U_ξ of every group, as pack_a's panels of mr output channels (element (o, i) of a
// panel at i*mr + o % mr; zeros in the last panel's rows past `out`). Runs of a panel's filters in its order are
// gathered tap-major (zeros for the rows past `out`) and transformed along the run in vectors, which write the
// panel's values in place: the F(4x4, 3x3) transform costs too much arithmetic to run filter by filter (a third of
// a 256-channel call).
template <typename T, int M>
void transform_weights(const Winograd3x3& wp, const T* weights, bool flip, int mr, T* packed) {
  constexpr int64_t kPositions = (M + 2) * (M + 2), kRun = 256;
  const int64_t panel = packed_a_size(wp.out, wp.in, mr), panels = ceil_div(wp.out, int64_t(mr));
  const int64_t channels = std::max<int64_t>(1, kRun / mr);  // input channels per run
  const auto transform = filter_block<T, M>();
#pragma omp parallel for schedule(static) num_threads(num_threads())
  for (int64_t gp = 0; gp < wp.groups * panels; ++gp) {
    const int64_t g = gp / panels, o0 = gp % panels * mr, rows = std::min<int64_t>(mr, wp.out - o0);
    T taps[9 * kRun];
    for (int64_t i0 = 0; i0 < wp.in; i0 += channels) {
      const int64_t i1 = std::min(wp.in, i0 + channels), count = (i1 - i0) * mr;
      for (int64_t i = i0; i < i1; ++i) {
        T* to = taps + (i - i0) * mr;
        for (int64_t r = 0; r < mr; ++r) {
          const int64_t filter = flip ? (g * wp.in + i) * wp.out + o0 + r : (g * wp.out + o0 + r) * wp.in + i;
          for (int t = 0; t < 9; ++t) to[t * kRun + r] = r < rows ? weights[filter * 9 + t] : T(0);
        }
      }
      transform(taps, kRun, count, flip, packed + g * kPositions * panel + o0 * wp.in + i0 * mr, panel);
    }
  }
}

// Prefetches the n elements from p, a line at a time (for writing, or reading). An item reads its tile rows of
// every input channel and writes them in every output plane: streams of a few rows each (a kilobyte or two), each
// over before the hardware prefetchers catch it, so the window copies and the output transform waited on memory
// (perf: a third of a batch-8 3x3_64 forward). Fetching the next channel's rows while this one's are transformed:
// batch 8, forward 64@56 3.8-4.1 -> 3.2-3.5 ms, 128@28 3.5 -> 3.2, 256@14 6.5 -> 6.0, input gradient 64@56 5.5 ->
// 4.8 ms, 256@14 6.0 -> 5.5 (batch 1 unchanged: its input and output stay in cache).
template <typename T>
inline void prefetch_range(const T* p, int64_t n, bool write) {
  const char* b = reinterpret_cast<const char*>(p);
  const int64_t bytes = n * int64_t(sizeof(T));
  for (int64_t i = 0; i < bytes; i += 64) {
    if (write) {
      __builtin_prefetch(b + i, 1);
    } else {
      __builtin_prefetch(b + i, 0);
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Few tiles, many channels (a deep layer at batch 1 or 2: 256 channels on 14x14 are 49 tiles of 2x2): the GEMMs
// turned round, M_ξ[tiles × out] = V_ξ[tiles × in] · U_ξ[in × out], so that the tiles are their rows. 49 tiles as
// columns filled 64 (four 16-lane vectors: a quarter of the products on padding); as rows they fill the 5-row
// micro-kernel's panels to 50. The transforms run along the channels, in whole vectors whatever the plane's width.
// ---------------------------------------------------------------------------------------------------------------

// Bᵀ d B of F(M x M, 3x3) along the channels for one tile: the window's element (a, b) is the cin channels at
// window[(M + 2)*a + b] (a channels-last pixel, or zeros past the input); V_ξ's row for the tile at v + ξ*v_stride.
template <typename T, int Bytes, int M>
inline __attribute__((always_inline)) void channels_input_body(const T* const* window, int64_t cin, T* v,
                                                               int64_t v_stride) {
  using W = Vec<T, Bytes>;
  using V = typename W::V;
  constexpr int A = M + 2;
  const auto times = [](const V(&x)[A], V(&y)[A]) { times_bt<M, V, T>(x, y); };
  for (int64_t c = 0; c < cin; c += W::kLanes) {
    both_sides<A, A, V>(
        times, [&](int a, int b) { return W::load(window[A * a + b] + c); },
        [&](int a, int b, V value) { W::store(v + (A * a + b) * v_stride + c, value); });
  }
}

// Aᵀ M A of F(M x M, 3x3) along `count` output channels (whole vectors) for one tile: M_ξ's row for the tile at
// m + ξ*m_stride; output pixel (a, b) of the tile, plus bias, at y + a*row_step + b*pixel_step, for a < rows and
// b < cols (the tiles past the plane's last row or column).
template <typename T, int Bytes, int M>
inline __attribute__((always_inline)) void channels_output_body(const T* m, int64_t m_stride, int64_t count,
                                                                const T* bias, int64_t rows, int64_t cols, T* y,
                                                                int64_t row_step, int64_t pixel_step) {
  using W = Vec<T, Bytes>;
  using V = typename W::V;
  constexpr int A = M + 2;
  const auto times = [](const V(&x)[A], V(&y)[M]) { times_at<M, V, T>(x, y); };
  for (int64_t c = 0; c < count; c += W::kLanes) {
    const V b = W::load(bias + c);
    both_sides<A, M, V>(
        times, [&](int i, int j) { return W::load(m + (A * i + j) * m_stride + c); },
        [&](int i, int j, V value) {
          if (i < rows && j < cols) W::store(y + i * row_step + j * pixel_step + c, value + b);
        });
  }
}

// The channel transforms on the ISA's widest vectors.
template <typename T, int M>
struct ChannelTransforms {
  static int64_t lanes() { return vector_bytes() / int64_t(sizeof(T)); }
  static auto input() {
    return by_isa(&PerIsa<&channels_input_body<T, 64, M>>::avx512, &PerIsa<&channels_input_body<T, 32, M>>::avx2,
                  &PerIsa<&channels_input_body<T, 16, M>>::portable);
  }
  static auto output() {
    return by_isa(&PerIsa<&channels_output_body<T, 64, M>>::avx512, &PerIsa<&channels_output_body<T, 32, M>>::avx2,
                  &PerIsa<&channels_output_body<T, 16, M>>::portable);
  }
};

// A stride of n elements or more that is an odd number of cache lines: the P blocks a transform writes (or reads)
// together then fall in different sets of the L1 cache. U's blocks 32 KiB apart all fell in one set (12 ways for
// 16 blocks): a 256-channel batch-1 forward on one thread 0.86 -> 0.75 ms one line further apart.
template <typename T>
int64_t odd_lines(int64_t n) {
  constexpr int64_t kLine = 64 / int64_t(sizeof(T));
  const int64_t lines = ceil_div(n, kLine);
  return (lines | 1) * kLine;
}

// U's chunk of input channels in winograd_channels: within 512 KiB, unless M is large (see there); whole vectors
// of 8 channels, at least one.
constexpr int64_t kChannelsChunkBytes = 512 << 10;
template <typename T>
int64_t channels_chunk(int64_t budget, int64_t p, int64_t block) {
  return std::max<int64_t>(8, budget / (p * block * int64_t(sizeof(T))) / 8 * 8);
}
// Where every input channel's U fits that chunk, an item's M (its run of tile rows' P blocks) is kept within this:
// more runs then cost no more filter transforms (a thread's items share their block's U), and M stays in L2 from
// the GEMMs through the output transform. DeepMNIST's 64 -> 128 on 7x7 at batch 128 (one run per block: 4.7 MiB of
// M per thread) measured 1.44-1.59 -> 1.31-1.33 ms in separate processes; 512 KiB measured about the same, 1 MiB
// slower.
constexpr int64_t kChannelsRunBytes = 256 << 10;

// Whether one chunk of U within kChannelsChunkBytes holds every input channel: then winograd_channels' runs keep M
// within kChannelsRunBytes (and so V's rows for a run within in / nr times that).
template <typename T, int M>
bool channels_u_whole(const Winograd3x3& wp, int64_t block) {
  return wp.in <= channels_chunk<T>(kChannelsChunkBytes, (M + 2) * (M + 2), block);
}

// winograd_channels' runs of tile rows per (group, block), as the tile rows in a run: as many runs as the threads
// need (where the blocks are fewer), more where U is held whole and M would outgrow kChannelsRunBytes. There, of
// the run lengths from that longest down to half of it, the one whose GEMMs take the fewest row panels of `mr`
// tiles on the busiest thread (the items, groups x blocks x runs, split as OpenMP's static schedule splits them; a
// ragged panel costs a whole one, and is packed and written through a buffer), the longest of equals. Batch 1
// 128@28 (14 rows of 14 tiles, 6-row panels): runs of 4 rows took 35 panels per block (56 tiles: 9 whole panels
// and 2 rows), of 3 rows 33 (42 tiles: 7 whole panels); measured in one process, alternating, median ms, forward
// 0.600 -> 0.571, input gradient 0.588 -> 0.570, and 128 -> 256@28 1.075 -> 1.042; unchanged on 1x256@14, 1x and
// 2x128@14, 4x256@14, 1x192@28, 8x128@7. A row's sums do not depend on its panel: the results are unchanged.
template <typename T, int M>
int64_t winograd_channel_run_rows(const Winograd3x3& wp, int64_t blocks, int64_t block, int64_t mr, int threads) {
  constexpr int64_t P = (M + 2) * (M + 2);
  const int64_t tq = ceil_div(wp.out_w, M), total_rows = wp.n * ceil_div(wp.out_h, M);
  int64_t runs = std::min(total_rows, ceil_div(threads, wp.groups * blocks));
  if (!channels_u_whole<T, M>(wp, block)) return ceil_div(total_rows, runs);
  const int64_t m_bytes = P * total_rows * tq * block * int64_t(sizeof(T));
  runs = std::min(total_rows, std::max(runs, ceil_div(m_bytes, kChannelsRunBytes)));
  // The busiest thread's row panels with runs of `rows` tile rows.
  const auto busiest = [&](int64_t rows) {
    const int64_t n_runs = ceil_div(total_rows, rows), items = wp.groups * blocks * n_runs;
    const int64_t each = items / threads, extra = items % threads;  // the first `extra` threads take one more
    int64_t most = 0;
    for (int64_t t = 0, item = 0; t < std::min<int64_t>(threads, items); ++t) {
      int64_t panels = 0;
      for (const int64_t end = item + each + (t < extra ? 1 : 0); item < end; ++item) {
        const int64_t r0 = item % n_runs * rows;
        panels += ceil_div(std::min(rows, total_rows - r0) * tq, mr);
      }
      most = std::max(most, panels);
    }
    return most;
  };
  const int64_t longest = ceil_div(total_rows, runs);
  int64_t best = longest, best_panels = busiest(longest);
  for (int64_t rows = longest - 1; 2 * rows >= longest && rows >= 1; --rows) {
    const int64_t panels = busiest(rows);
    if (panels < best_panels) best = rows, best_panels = panels;
  }
  return best;
}

// Each thread's own V: an item transforms its run's tiles into its thread's buffer right before its GEMMs read them
// (unless that buffer holds them already: the thread's previous item was another block of the same run), where U is
// held whole (within kChannelsChunkBytes, so the runs' V too) and each thread has at most two blocks of output channels
// (every block's items transform every tile: blocks times the transforms), or where U is not held whole and a run's V
// is within 1 MiB (runs are then as few as the threads need: with as many blocks as threads, one run, which each thread
// transforms once). V then stays in the core's L2; made once and shared by the threads (1.6 MiB at batch 1 128@28) it
// was mostly written to memory (read for ownership first) and read back by the other core. Measured in one process,
// alternating, median ms, 2 threads (shared -> own): batch 1 128@28 forward 0.568 -> 0.489, input gradient 0.571 ->
// 0.496, 128@14 0.178 -> 0.166, batch 2 0.306 -> 0.270, 128 -> 256@28 1.008 -> 0.916, 64 -> 256@14 0.170 -> 0.162,
// batch 8 128@7 0.377 -> 0.363, batch 128 64 -> 128 on 5x5 1.514 -> 1.367; 256@14 0.593 -> 0.571 / 0.636 -> 0.617,
// 256@7 0.288 -> 0.275 / 0.338 -> 0.320, batch 2 0.429 -> 0.413 / 0.475 -> 0.464, 256 -> 512@7 0.554 -> 0.536 / 0.690
// -> 0.681, 512@7 unchanged; where a run's V is larger, slower (every tile, per item: batch 4 and 8 256@14 5-7%, 192@28
// 3%); one thread, 128@28 0.924 -> 0.909, but 128 -> 256@28 (4 blocks, each item a run of its own) 1.697 -> 1.759.
template <typename T, int M>
bool channels_v_own(const Winograd3x3& wp, const MicroKernel<T>& uk, int64_t run_rows, int threads) {
  constexpr int64_t P = (M + 2) * (M + 2);
  const int64_t cin = detail::round_up(wp.in, ChannelTransforms<T, M>::lanes()), tq = ceil_div(wp.out_w, M);
  const int64_t run_v_bytes = P * run_rows * tq * cin * int64_t(sizeof(T));
  return channels_u_whole<T, M>(wp, uk.nr) ? ceil_div(wp.out, uk.nr) <= 2 * threads
                                           : run_v_bytes <= (int64_t(1) << 20);
}

// winograd_3x3 for F(M x M, 3x3) with the tiles as the GEMMs' rows, `uk` the micro-kernel for tiles × out. The
// input is copied channels-last (a pixel's cin = in rounded up to whole vectors), each tile's window transformed
// into V_ξ's row (tiles × in; every group's V made once, shared by the items, or each thread's own: see v_own).
// An item is a block of nr output channels of one group over a run of tile rows (the runs where the blocks are
// fewer than the threads, or where U is held whole: winograd_channel_run_rows): its U (the GEMMs' B: input channel
// c's transformed filters along the block's channels), transformed and multiplied a chunk of input channels at a
// time (U's chunk, within 512 KiB or half of L2, stays in L2 for its P GEMMs; kept for the next item of the same
// block where one chunk holds every input channel), then M's rows transformed back into a channels-last block of
// the output rows and transposed into its planes.
template <typename T, int M>
void winograd_channels(const Winograd3x3& wp, const MicroKernel<T>& uk, const T* src, const T* weights, bool flip,
                       const T* bias, T* dst) {
  constexpr int64_t A = M + 2, P = A * A;
  const int64_t tp = ceil_div(wp.out_h, M), tq = ceil_div(wp.out_w, M), tiles = wp.n * tp * tq;
  const int64_t lanes = ChannelTransforms<T, M>::lanes(), cin = detail::round_up(wp.in, lanes);
  const int64_t in_plane = wp.in_h * wp.in_w, out_plane = wp.out_h * wp.out_w, filters = wp.in * wp.out;
  const int64_t planes = wp.n * wp.groups;
  const int threads = num_threads();
  const int64_t block = uk.nr, blocks = ceil_div(wp.out, block);
  constexpr int64_t kMostBlock = 64;  // the bias buffer's length: every micro-kernel's nr (gemm.h)
  TORCH_INTERNAL_ASSERT(block <= kMostBlock, "cnn_ext: Winograd's output blocks exceed their bias buffer");
  const int64_t total_rows = wp.n * tp;
  const int64_t run_rows = winograd_channel_run_rows<T, M>(wp, blocks, block, uk.mr, threads);
  const int64_t runs = ceil_div(total_rows, run_rows), items = wp.groups * blocks * runs;
  // U's chunk within 512 KiB, or within half of one core's L2 where an item's M is a quarter of L2 or more: every
  // chunk after the first re-reads and re-writes M. On the Intel Xeon (2 MiB of L2), side by side in one process,
  // 512 KiB -> 1 MiB, forward / input gradient in ms: batch 8 256@14 (an M of 1.6 MiB) 4.22 -> 3.94 / 4.15 -> 4.01,
  // batch 4 2.17 -> 2.05 / 2.19 -> 2.08, batch 3 1.77 -> 1.68 / 1.79 -> 1.67, batch 1 256@28 2.20 -> 2.07 / 2.22
  // -> 2.11, batch 8 512@7 6.20 -> 6.12 / 6.48 -> 6.31; with small M the larger chunk measured slower (batch 2-4
  // 512@7, M of 128-256 KiB: up to 10% forward). Unchanged on a 1 MiB L2. Either way each output sums its input
  // channels in order, so the chunks do not change the results.
  const int64_t m_item = P * run_rows * tq * block * int64_t(sizeof(T));
  const int64_t u_budget =
      std::max<int64_t>(kChannelsChunkBytes, 4 * m_item >= l2_cache_bytes() ? l2_cache_bytes() / 2 : 0);
  const int64_t chunk = channels_chunk<T>(u_budget, P, block);
  const bool v_own = channels_v_own<T, M>(wp, uk, run_rows, threads);
  // The P blocks of V, U and M an odd number of lines apart (odd_lines).
  const int64_t v_stride = odd_lines<T>((v_own ? run_rows * tq : tiles) * cin);
  const int64_t m_stride = odd_lines<T>(run_rows * tq * block);
  const int64_t u_stride = odd_lines<T>(chunk * block);
  // The channels-last copy's jobs: (plane, run of input channels), runs whole transposing blocks of 8.
  const int64_t part = detail::round_up(ceil_div(wp.in, ceil_div(2 * threads, planes)), 8);
  const int64_t parts = ceil_div(wp.in, part);

  CallScratch scratch;
  T* const x_cl = scratch.whole<T>(planes * in_plane * cin + cin);  // and cin zeros: the padding's pixel
  // V: every group's, shared (slice 0), or each thread's own (v_own).
  const auto vs = scratch.per_thread<T>(v_own ? threads : 1, (v_own ? 1 : wp.groups) * P * v_stride);
  const auto us = scratch.per_thread<T>(threads, P * u_stride);
  const auto ms = scratch.per_thread<T>(threads, P * m_stride);
  const auto ys = scratch.per_thread<T>(threads, wp.n * out_plane * block);
  const std::vector<int64_t> u_rows = row_offsets(chunk, block);
  T* const zeros = x_cl + planes * in_plane * cin;
  std::fill_n(zeros, cin, T(0));
  const auto in_fn = ChannelTransforms<T, M>::input();
  const auto out_fn = ChannelTransforms<T, M>::output();
  // Tile t of group g, transformed: into V_ξ's row at to + ξ*v_stride.
  const auto transform_tile = [&](int64_t g, int64_t t, T* to) {
    const int64_t img = t / (tp * tq), tr = t / tq % tp, tc = t % tq;
    const T* const plane = x_cl + (img * wp.groups + g) * in_plane * cin;
    const T* window[P];
    for (int64_t a = 0; a < A; ++a) {
      const int64_t row = M * tr - wp.pad_h + a;
      for (int64_t b = 0; b < A; ++b) {
        const int64_t col = M * tc - wp.pad_w + b;
        const bool inside = row >= 0 && row < wp.in_h && col >= 0 && col < wp.in_w;
        window[A * a + b] = inside ? plane + (row * wp.in_w + col) * cin : zeros;
      }
    }
    in_fn(window, cin, to, v_stride);
  };
#pragma omp parallel num_threads(threads)
  {
    // The input channels-last: channel c of pixel p of plane (image, group) at x_cl[(plane*in_plane + p)*cin + c]
    // (the channels past `in` zeros: V's columns past `in` are never multiplied, but transformed).
#pragma omp for schedule(static)
    for (int64_t job = 0; job < planes * parts; ++job) {
      const int64_t plane = job / parts, c0 = job % parts * part, c1 = std::min(wp.in, c0 + part);
      T* const to = x_cl + plane * in_plane * cin;
      transpose(src + (plane * wp.in + c0) * in_plane, in_plane, c1 - c0, in_plane, to + c0, cin);
      if (c1 == wp.in && cin > wp.in) {
        for (int64_t p = 0; p < in_plane; ++p) std::fill(to + p * cin + wp.in, to + (p + 1) * cin, T(0));
      }
    }
    // V shared: tile t = (image*tp + tile row)*tq + tile column of group g at v[(g*P + ξ)*v_stride + t*cin].
    if (!v_own) {
#pragma omp for schedule(static)
      for (int64_t gt = 0; gt < wp.groups * tiles; ++gt) {
        const int64_t g = gt / tiles, t = gt % tiles;
        transform_tile(g, t, vs.slice(0) + g * P * v_stride + t * cin);
      }
    }
    T* const u = us.get();
    T* const m = ms.get();
    T* const y = ys.get();
    int64_t u_block = -1;  // the (group, block) whose whole U this thread holds, if any
    int64_t v_run = -1;    // the (group, run) whose V this thread holds, if any (v_own)
    // Items (group, block, run of tile rows), runs fastest; a thread's are consecutive (static schedule).
#pragma omp for schedule(static)
    for (int64_t item = 0; item < items; ++item) {
      const int64_t gb = item / runs, g = gb / blocks, o0 = gb % blocks * block, count = std::min(block, wp.out - o0);
      const int64_t r0 = item % runs * run_rows, r1 = std::min(total_rows, r0 + run_rows);
      if (r0 >= r1) continue;
      const int64_t t0 = r0 * tq, rows = (r1 - r0) * tq;  // the run's tiles, the GEMMs' rows
      // The run's rows of V_ξ at vg + ξ*v_stride: the thread's own, transformed here, or the group's.
      T* const vg = v_own ? vs.get() : vs.slice(0) + g * P * v_stride + t0 * cin;
      if (v_own && v_run != g * runs + item % runs) {
        v_run = g * runs + item % runs;
        for (int64_t i = 0; i < rows; ++i) transform_tile(g, t0 + i, vg + i * cin);
      }
      for (int64_t c0 = 0; c0 < wp.in; c0 += chunk) {
        const int64_t k = std::min(chunk, wp.in - c0);
        if (u_block != gb) {
          // U_ξ's rows c0.. (input channels) along the block's output channels: filter (o, c) is filter o*in + c
          // of the kernel, c*out + o flipped.
          const T* const first = weights + (g * filters + (flip ? c0 * wp.out + o0 : o0 * wp.in + c0)) * 9;
          transform_filters<T, M>(first, k, flip ? wp.out : 1, flip ? 1 : wp.in, count, flip, u, block, u_stride);
        }
        for (int64_t xi = 0; xi < P; ++xi) {
          gemm_a_rows(uk, rows, count, k, vg + xi * v_stride + c0, cin, u + xi * u_stride, u_rows.data(),
                      m + xi * m_stride, block, c0 > 0, Pad::kBC);
        }
      }
      u_block = wp.in <= chunk ? gb : -1;
      T bias_block[kMostBlock] = {};
      if (bias != nullptr) std::copy_n(bias + g * wp.out + o0, count, bias_block);
      const int64_t width = detail::round_up(count, lanes);
      for (int64_t i = 0; i < rows; ++i) {
        const int64_t t = t0 + i, img = t / (tp * tq), tr = t / tq % tp, tc = t % tq;
        T* const at = y + (img * out_plane + M * tr * wp.out_w + M * tc) * block;
        out_fn(m + i * block, m_stride, width, bias_block, std::min<int64_t>(M, wp.out_h - M * tr),
               std::min<int64_t>(M, wp.out_w - M * tc), at, wp.out_w * block, block);
      }
      // Each image's output rows of the run, into the planes.
      for (int64_t r = r0; r < r1;) {
        const int64_t img = r / tp, tr = r % tp, n_rows = std::min(tp - tr, r1 - r);
        const int64_t p0 = M * tr * wp.out_w, p1 = std::min(wp.out_h, M * (tr + n_rows)) * wp.out_w;
        transpose(y + (img * out_plane + p0) * block, block, p1 - p0, count,
                  dst + ((img * wp.groups + g) * wp.out + o0) * out_plane + p0, out_plane);
        r += n_rows;
      }
    }
  }
}

// winograd_3x3 for F(M x M, 3x3) with the tiles as the GEMMs' columns: P = (M + 2)² GEMMs.
template <typename T, int M>
void winograd_tiles(const Winograd3x3& wp, const T* src, const T* weights, bool flip, const T* bias, T* dst) {
  constexpr int64_t P = (M + 2) * (M + 2);
  const int64_t tp = ceil_div(wp.out_h, M), tq = ceil_div(wp.out_w, M);
  const int bytes = Transforms<T, M>::bytes(tq);
  const int64_t n = detail::round_up(tq, bytes / int64_t(sizeof(T)));  // the transforms' loops: whole vectors
  const int threads = num_threads();
  // An item is a run of consecutive tile rows of one group, across images (row R of the group is tile row R % tp
  // of image R / tp), so that small images still make long GEMMs. Its tiles are the GEMMs' columns: a multiple of
  // the micro-kernel's width with V and M (P × (in + out) × tiles) within about 1 MiB (half this machine's L2,
  // rounded up), or a tile per 8 KiB of U where more (each item re-reads all of U), but V and M within 2 MiB and
  // at least that width (4x4 tiles with 256 channels each side: 28 tiles measured 3-5% slower than 64, each item
  // re-reading U's 9 MiB). Side by side against 2 MiB for all: 64 and 32 channels each side (and 32 -> 64) 6-11%
  // faster forward and input gradient (128 tiles instead of 256, 256 instead of 512), 128 each side at 1 MiB (64
  // tiles, a 1 MiB U per item) 6-10% slower, hence U's bound; 128 -> 256, 64 -> 128 and 256 each side unchanged.
  // Where there are fewer than two items per thread, the runs are shortened.
  const int64_t total_rows = wp.n * tp;
  const int64_t nr_guess = 64 / int64_t(sizeof(T)) * 4;  // the AVX-512 6x4 micro-kernel's columns
  const int64_t u_bytes = P * wp.in * wp.out * int64_t(sizeof(T));
  const int64_t per_tile = P * int64_t(sizeof(T)) * (wp.in + wp.out);  // V's and M's bytes
  const int64_t most = std::max(nr_guess, 4 * kScratchBytes / per_tile / nr_guess * nr_guess);
  const int64_t wide = detail::round_up(std::max(2 * kScratchBytes / per_tile, u_bytes / 8192), nr_guess);
  const int64_t target = std::clamp(wide, nr_guess, most);
  int64_t tile_rows = std::clamp<int64_t>((target + tq / 2) / tq, 1, total_rows);
  tile_rows = std::min(tile_rows, ceil_div(total_rows, ceil_div(2 * threads, wp.groups)));
  const int64_t chunks = ceil_div(total_rows, tile_rows), max_tiles = tile_rows * tq;
  const int64_t items = wp.groups * chunks;  // (group, chunk), chunks fastest

  // GEMM per ξ: M_ξ[out × tiles] = U_ξ[out × in] · V_ξ[in × tiles], V read in place (rows padded to whole panels).
  const MicroKernel<T> uk = pick_micro_kernel<T>(wp.out, max_tiles);
  const int64_t ld = padded_cols(max_tiles, uk.nr);
  // Scratch (scratch.h); the transforms' and GEMMs' reads past the tiles (slack, padding columns) reach only
  // columns nobody uses: a GEMM's columns are independent. U is transformed once, before the items, into pack_a's
  // panels (a packed A reads faster than one in place: 10-30% on these GEMMs).
  const int64_t u_panel = packed_a_size(wp.out, wp.in, uk.mr);
  CallScratch scratch;
  T* const u = scratch.whole<T>(P * wp.groups * u_panel);
  transform_weights<T, M>(wp, weights, flip, uk.mr, u);
  const std::vector<int64_t> v_rows = row_offsets(wp.in, ld);
  // V's P blocks are n elements apart beyond their in × ld rows: a channel's last row of tiles may overflow its
  // row by up to n - tq values (see input_transform_body), which must not reach the next block's first channel.
  // M's blocks an odd number of lines apart (odd_lines), as the output transform reads a tile's P values at once:
  // 32 output channels on 28x28 planes put them 36 KiB apart, all in one L1 set.
  const int64_t v_stride = wp.in * ld + n, m_stride = odd_lines<T>(wp.out * ld);
  const int64_t win_cols = M * tq + 2, win_rows = M * std::min(tile_rows, tp) + 2;
  const int64_t slack = M * n + M;  // read past the windows' and M's last rows
  const int64_t in_plane = wp.in_h * wp.in_w, out_plane = wp.out_h * wp.out_w;

  const auto in_fn = Transforms<T, M>::input(bytes);
  const auto out_fn = Transforms<T, M>::output(bytes);

  const auto windows = scratch.per_thread<T>(threads, win_rows * win_cols + slack);
  const auto rings = scratch.per_thread<T>(threads, P * n);
  const auto lines = scratch.per_thread<T>(threads, M * M * n);
  const auto vs = scratch.per_thread<T>(threads, P * v_stride + slack);
  const auto ms = scratch.per_thread<T>(threads, P * m_stride + slack);
#pragma omp parallel num_threads(threads)
  {
    T* const window = windows.get();
    T* const ring = rings.get();
    T* const line = lines.get();
    T* const v = vs.get();
    T* const m = ms.get();
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < items; ++item) {
      const int64_t g = item / chunks;
      const int64_t r0 = item % chunks * tile_rows, r1 = std::min(total_rows, r0 + tile_rows), tiles = (r1 - r0) * tq;
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
          // Window row a is input row M*tr - pad_h + a; column b is input column b - pad_w.
          const T* x = src + ((img * wp.groups + g) * wp.in + c) * in_plane;
          if (c + 1 < wp.in) {  // the next channel's rows: see prefetch_range
            const int64_t h0 = std::max<int64_t>(0, M * tr - wp.pad_h);
            const int64_t h1 = std::min(wp.in_h, M * (tr + rows) + 2 - wp.pad_h);
            prefetch_range(x + in_plane + h0 * wp.in_w, (h1 - h0) * wp.in_w, false);
          }
          copy_window(x, wp.in_h, wp.in_w, wp.pad_h - M * tr, wp.pad_w, M * rows + 2, win_cols, window);
          in_fn(window, rows, tq, n, v + c * ld + col, v_stride, ring);
        });
      }
      for (int64_t xi = 0; xi < P; ++xi) {
        gemm(uk, wp.out, tiles, wp.in, u + (g * P + xi) * u_panel, v + xi * v_stride, v_rows.data(),
             m + xi * m_stride, ld, false, Pad::kBC);
      }
      for_each_image([&](int64_t img, int64_t tr, int64_t rows, int64_t col) {
        T* y = dst + (img * wp.groups + g) * wp.out * out_plane;
        for (int64_t o = 0; o < wp.out; ++o) {
          if (o + 1 < wp.out) {  // the next plane's rows, to be written
            const int64_t h0 = M * tr, h1 = std::min(wp.out_h, M * (tr + rows));
            prefetch_range(y + (o + 1) * out_plane + h0 * wp.out_w, (h1 - h0) * wp.out_w, true);
          }
          out_fn(m + o * ld + col, m_stride, rows, tq, n, M * tr, wp.out_h, wp.out_w,
                 bias != nullptr ? bias[g * wp.out + o] : T(0), y + o * out_plane, line);
        }
      });
    }
  }
}

// The two orientations' rule: the tiles as the GEMMs' rows (winograd_channels) where the output channels outnumber
// twice the tiles (as columns, few tiles padded to whole vectors, 49 to 64), or where both sides have 128 channels
// or more and an item's M over all the tiles (P × tiles × nr) stays within 1 MiB, or with 256 or more each side
// below one core's L2 (l2_cache_bytes); else as columns (winograd_tiles: many tiles, whose M and V per item the
// channel blocks would each re-read from beyond L2). The L2 bound, on the Intel Xeon (2 MiB of L2 per core),
// alternating runs, columns -> rows, forward / input gradient in ms: batch 8 256@14 (392 tiles, an M of 1.6 MiB)
// 4.68-4.73 -> 4.31-4.38 / 4.92-5.11 -> 4.31-4.32, batch 6 3.92-3.98 -> 3.14-3.19 / 4.03-4.20 -> 3.17-3.20, batch
// 8 256 -> 512@14 9.6-10.2 -> 9.2 / 10.3-10.7 -> 8.6-8.7, batch 24 512@7 17.9-18.2 -> 15.5-15.7 / 19.0-19.2 ->
// 15.6-16.1; at 2 MiB (batch 32 512@7) 23.0-23.5 -> 24.4-24.7 forward, hence below; with 128 channels M beyond
// 1 MiB lost there too (batch 2 128@28: 1.16-1.21 -> 1.42-1.49), hence 256. On the AMD machine (1 MiB of L2)
// the rule is the 1 MiB one, as measured there (below). Measured side by side
// on the 2-core AVX-512 machine, forward / input gradient in ms, columns -> rows: batch 1 256@14 0.61 -> 0.45 /
// 0.64 -> 0.46, batch 2 1.17 -> 0.76 / 1.27 -> 0.80, batch 4 1.71 -> 1.33 / 1.86 -> 1.33, batch 1 128@28 0.44 ->
// 0.34 / 0.46 -> 0.37, 128@7 0.17 -> 0.08 / 0.31 -> 0.10, 512@7 1.50 -> 0.75 / 2.61 -> 0.90; batch 8 256@14 and
// batch 2 128@28 (392 tiles) a tie, batch 1 64@28 0.14 -> 0.18 / 0.19 -> 0.24, 64@56 0.50 -> 0.80. Also as rows
// where a row has fewer than 4 tiles (5x5 or 6x6 outputs on 2x2 tiles): as columns its transforms run on 4-lane
// vectors, a lane of them empty. Two runs each, forward / input gradient: 128 x 64 -> 128 on 7x7, unpadded (5x5
// outputs; DeepMNIST's last layer) 1.77, 1.48 -> 0.96, 1.26 / -, 64 x 128 -> 128 on 5x5 1.71, 1.35 -> 0.86, 0.85
// / 1.35, 1.32 -> 0.84, 0.84; on 4x4 tiles, 128 x 64 -> 128 on 7x7 unpadded 3.9, 3.6 -> 2.9, 2.2 / 2.3, 2.6 ->
// 1.5, 1.4, 32 x 64 -> 64 on 10x10 0.87, 0.85 -> 0.39, 0.66 / 0.81, 0.96 -> 0.38, 0.61. With 4 tiles a row (7x7 or
// 8x8 outputs) neither won throughout (128 x 64 -> 64 on 8x8 1.40, 1.28 -> 1.50, 1.53 forward, 2.40, 2.13 -> 1.22,
// 1.14 input gradient).
// Where each thread transforms its own V (channels_v_own) whatever the thread count (U held whole, at most two blocks
// of output channels: the orientation, and so the results' bits, must not depend on the threads), the rows also win
// on 2x2 tiles with 32+ channels each side, up to 640 tiles and a V (P x tiles x in) within 5 MiB ("modest"). On
// AVX-512, in one process, alternating, median ms, forward (input gradient), columns -> rows: batch 2 128@28 1.30 ->
// 1.07 (1.27 -> 1.09), batch 3 1.64 -> 1.35 (1.72 -> 1.34), batch 8 128@14 1.38 -> 1.10 (1.41 -> 1.12), batch 12
// 1.72 -> 1.35, batch 2 64@28 0.337 -> 0.285 (0.349 -> 0.292), batch 1 0.199 -> 0.189, 64 -> 128@28 0.640 -> 0.596,
// 32@28 (0.129 -> 0.105), batch 4 32 -> 64@28 (0.358 -> 0.304); from 784 tiles a tie or slower (batch 4 128@28 2.08
// -> 2.09, batch 16 128@14 2.02 -> 2.02, batch 8 128@28 3.92 -> 3.99, 64@56 0.59 -> 0.68), in float64 on 4x4 tiles
// mixed (batch 8 128@14 2.11 -> 2.26, batch 2 128@28 1.91 -> 1.70), and with V shared, as on AVX2's narrower blocks,
// slower (batch 2 64@28 0.448 -> 0.470). Faster on two threads but left as columns, since their V is shared on one:
// batch 2 128 -> 256@28 (4 blocks) 2.16 -> 1.85, 192@28 (U not held whole) 2.48 -> 2.25 (2.60 -> 2.26).
template <typename T, int M>
void winograd_oriented(const Winograd3x3& wp, const T* src, const T* weights, bool flip, const T* bias, T* dst) {
  constexpr int64_t P = (M + 2) * (M + 2);
  const int64_t tiles = wp.n * ceil_div(wp.out_h, M) * ceil_div(wp.out_w, M);
  const MicroKernel<T> uk = pick_micro_kernel<T>(tiles, wp.out);
  const bool few_tiles = wp.out > 2 * tiles, narrow = ceil_div(wp.out_w, M) < 4;
  const int64_t m_bytes = P * tiles * uk.nr * int64_t(sizeof(T)), channels = std::min(wp.in, wp.out);
  const bool m_fits =
      channels >= 128 && (m_bytes <= (int64_t(1) << 20) || (channels >= 256 && m_bytes < l2_cache_bytes()));
  const int64_t v_bytes = P * tiles * wp.in * int64_t(sizeof(T));
  const bool modest = M == 2 && channels >= 32 && tiles <= 640 && v_bytes <= (int64_t(5) << 20) &&
                      channels_u_whole<T, M>(wp, uk.nr) && ceil_div(wp.out, uk.nr) <= 2;
  if (few_tiles || m_fits || narrow || modest) {
    winograd_channels<T, M>(wp, uk, src, weights, flip, bias, dst);
  } else {
    winograd_tiles<T, M>(wp, src, weights, flip, bias, dst);
  }
}

}  // namespace

template <typename T>
void winograd_3x3(const Winograd3x3& wp, int64_t tile, const T* src, const T* weights, bool flip, const T* bias,
                  T* dst) {
  TORCH_INTERNAL_ASSERT(tile == 2 || tile == 4, "cnn_ext: Winograd has no F(", tile, "x", tile, ", 3x3)");
  return tile == 2 ? winograd_oriented<T, 2>(wp, src, weights, flip, bias, dst)
                   : winograd_oriented<T, 4>(wp, src, weights, flip, bias, dst);
}

// ---------------------------------------------------------------------------------------------------------------
// Weight gradient, F(3x3, 2x2) and F(3x3, 4x4) (winograd.h): per item (a run of tiles of one group), V_ξ = Bᵀ d B
// and U_ξ = A dy Aᵀ for every tile and channel, vectorised along the channels of channels-last x and dY, then per ξ
// one GEMM with the item's tiles as its reduction accumulates M_ξ += U_ξ · V_ξ; G' M G gives dW at the end.
// ---------------------------------------------------------------------------------------------------------------

namespace {

// The weight gradient's matrices applied to a column of values (V: a GCC vector, or T): A (forward's Aᵀ
// transposed) and G' (forward's G transposed). F(3x3, 2x2): A (y0, y1) = (y0, y0 + y1, y0 - y1, -y1),
// G' (m0, m1, m2, m3) = (m0 + (m1 + m2)/2, (m1 - m2)/2, (m1 + m2)/2 + m3). F(3x3, 4x4): A (y0, y1, y2, y3) =
// (y0, y0 - y1 + y2 - y3, y0 + y1 + y2 + y3, y0 + y1/2 + y2/4 + y3/8, y0 - 2y1 + 4y2 - 8y3, y3),
// G' (m0 .. m5) = (m0 + (m2 - m1)/3 + (m4 - 16m3)/15, (m1 + m2)/3 - (8m3 + 2m4)/15, (m2 - m1)/3 + 4(m4 - m3)/15 + m5).
template <typename V>
inline __attribute__((always_inline)) void times_a4(const V (&y)[2], V (&z)[4]) {
  z[0] = y[0];
  z[1] = y[0] + y[1];
  z[2] = y[0] - y[1];
  z[3] = -y[1];
}

template <typename V, typename T>
inline __attribute__((always_inline)) void times_gt4(const V (&m)[4], V (&w)[3]) {
  const V half = V{} + T(0.5);
  const V half_sum = half * (m[1] + m[2]);
  w[0] = m[0] + half_sum;
  w[1] = half * (m[1] - m[2]);
  w[2] = half_sum + m[3];
}

template <typename V, typename T>
inline __attribute__((always_inline)) void times_a6(const V (&y)[4], V (&z)[6]) {
  const auto c = [](T value) { return V{} + value; };
  const V even = y[0] + y[2], odd = y[1] + y[3];
  z[0] = y[0];
  z[1] = even - odd;
  z[2] = even + odd;
  z[3] = y[0] + c(0.5) * y[1] + c(0.25) * y[2] + c(0.125) * y[3];
  z[4] = y[0] - c(2) * y[1] + c(4) * y[2] - c(8) * y[3];
  z[5] = y[3];
}

template <typename V, typename T>
inline __attribute__((always_inline)) void times_gt6(const V (&m)[6], V (&w)[3]) {
  const auto c = [](T value) { return V{} + value; };
  const V third = c(T(1) / T(3)), fifteenth = c(T(1) / T(15));
  const V diff = third * (m[2] - m[1]);
  w[0] = m[0] + diff + fifteenth * (m[4] - c(16) * m[3]);
  w[1] = third * (m[1] + m[2]) - fifteenth * (c(8) * m[3] + c(2) * m[4]);
  w[2] = diff + c(4) * fifteenth * (m[4] - m[3]) + m[5];
}

// Bᵀ d B of F(3x3, M x M) for the channels from c of one tile (V: a GCC vector of channels, or T for the channels
// past the last whole vector): pixel (a, b) of its (M + 2)² input tile at at[(M + 2)a + b] (zeros outside the
// input); V_ξ's row for the tile at v + ξ*v_stride.
template <int M, typename V, typename T>
inline __attribute__((always_inline)) void input_tile(const T* const* at, int64_t c, T* v, int64_t v_stride) {
  constexpr int A = M + 2;
  both_sides<A, A, V>([](const V(&x)[A], V(&y)[A]) { times_bt<M, V, T>(x, y); },
                      [&](int a, int b) { return load_as<V>(at[A * a + b] + c); },
                      [&](int a, int b, V value) { store_as(v + (A * a + b) * v_stride + c, value); });
}

// A dy Aᵀ for the channels from k of one tile's M x M block of dY (pixel (a, b) at at[M*a + b], zeros outside dY).
template <int M, typename V, typename T>
inline __attribute__((always_inline)) void grad_tile(const T* const* at, int64_t k, T* u, int64_t u_stride) {
  constexpr int A = M + 2;
  const auto times_a = [](const V(&y)[M], V(&z)[A]) {
    if constexpr (M == 2) {
      times_a4(y, z);
    } else {
      times_a6<V, T>(y, z);
    }
  };
  both_sides<M, A, V>(times_a, [&](int a, int b) { return load_as<V>(at[M * a + b] + k); },
                      [&](int a, int b, V value) { store_as(u + (A * a + b) * u_stride + k, value); });
}

// dW = G' m G for the (output, input) channel pairs from e (V: a GCC vector of pairs, or T for one): m_ξ of pair e
// at m[ξ*m_stride + e], tap t of its 3x3 filter written at dw[t*dw_stride + e].
template <int M, typename V, typename T>
inline __attribute__((always_inline)) void filter_gradient(const T* m, int64_t m_stride, int64_t e, T* dw,
                                                           int64_t dw_stride) {
  constexpr int A = M + 2;
  const auto times_gt = [](const V(&x)[A], V(&w)[3]) {
    if constexpr (M == 2) {
      times_gt4<V, T>(x, w);
    } else {
      times_gt6<V, T>(x, w);
    }
  };
  both_sides<A, 3, V>(times_gt, [&](int a, int b) { return load_as<V>(m + (A * a + b) * m_stride + e); },
                      [&](int r, int s, V value) { store_as(dw + (3 * r + s) * dw_stride + e, value); });
}

// The transforms of tiles [t0, t1) of group g by F(3x3, M x M) (tile t is column t % tq of tile row t / tq % tp of
// image t / (tp*tq)): row t - t0 of V_ξ (ldv apart, blocks v_stride apart; none where v is null) and, for the
// group's output channels [k0, k1), of U_ξ (ldu, u_stride; channel k0 first; none where u is null).
template <typename T, int Bytes, int M>
inline __attribute__((always_inline)) void wgrad_transforms_body(const Winograd3x3& wp, const T* x, const T* dy,
                                                                 int64_t g, int64_t t0, int64_t t1, const T* zeros,
                                                                 T* v, int64_t v_stride, int64_t ldv, T* u,
                                                                 int64_t u_stride, int64_t ldu, int64_t k0,
                                                                 int64_t k1) {
  using V = typename detail::VecOf<T, Bytes>::type;
  constexpr int64_t L = Bytes / sizeof(T), A = M + 2;
  const int64_t tp = ceil_div(wp.out_h, M), tq = ceil_div(wp.out_w, M);
  const int64_t x_channels = wp.groups * wp.in, dy_channels = wp.groups * wp.out;
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t img = t / (tp * tq), i = t / tq % tp, j = t % tq;
    if (v != nullptr) {
      const T* xs[A * A];
      for (int64_t a = 0; a < A; ++a) {
        const int64_t h = M * i - wp.pad_h + a;
        for (int64_t b = 0; b < A; ++b) {
          const int64_t w = M * j - wp.pad_w + b;
          const bool inside = h >= 0 && h < wp.in_h && w >= 0 && w < wp.in_w;
          xs[A * a + b] = inside ? x + ((img * wp.in_h + h) * wp.in_w + w) * x_channels + g * wp.in : zeros;
        }
      }
      T* vt = v + (t - t0) * ldv;
      int64_t c = 0;
      for (; c + L <= wp.in; c += L) input_tile<M, V>(xs, c, vt, v_stride);
      for (; c < wp.in; ++c) input_tile<M, T>(xs, c, vt, v_stride);
    }
    if (u != nullptr) {
      const T* ys[M * M];  // from channel k0 on
      for (int64_t a = 0; a < M; ++a) {
        for (int64_t b = 0; b < M; ++b) {
          const int64_t h = M * i + a, w = M * j + b;
          const bool inside = h < wp.out_h && w < wp.out_w;
          ys[M * a + b] =
              (inside ? dy + ((img * wp.out_h + h) * wp.out_w + w) * dy_channels + g * wp.out : zeros) + k0;
        }
      }
      T* ut = u + (t - t0) * ldu;
      int64_t k = 0;
      for (; k + L <= k1 - k0; k += L) grad_tile<M, V>(ys, k, ut, u_stride);
      for (; k < k1 - k0; ++k) grad_tile<M, T>(ys, k, ut, u_stride);
    }
  }
}

// dW for `count` consecutive pairs of one group: M = the parts' sums added in order (part p's M_ξ of the group
// at partial + p*part_stride + ξ*m_stride), transformed in vectors of pairs into tap-major rows, which an 8x8
// register transpose (conv_common.h) turns into the filters' 9 consecutive taps.
template <typename T, int Bytes, int M>
inline __attribute__((always_inline)) void filter_gradients_body(const T* partial, int64_t parts, int64_t part_stride,
                                                                 int64_t m_stride, int64_t count, T* dw) {
  using V = typename detail::VecOf<T, Bytes>::type;
  constexpr int64_t L = Bytes / sizeof(T), P = (M + 2) * (M + 2);
  alignas(64) T m[P * L], taps[9 * L];
  int64_t e = 0;
  for (; e + L <= count; e += L) {
    for (int xi = 0; xi < P; ++xi) {
      V sum = load_as<V>(partial + xi * m_stride + e);
      for (int64_t p = 1; p < parts; ++p) sum += load_as<V>(partial + p * part_stride + xi * m_stride + e);
      store_as(m + xi * L, sum);
    }
    filter_gradient<M, V>(m, L, 0, taps, L);
    transpose_body(taps, L, 9, L, dw + e * 9, 9);
  }
  for (; e < count; ++e) {
    for (int xi = 0; xi < P; ++xi) {
      T sum = partial[xi * m_stride + e];
      for (int64_t p = 1; p < parts; ++p) sum += partial[p * part_stride + xi * m_stride + e];
      m[xi] = sum;
    }
    filter_gradient<M, T>(m, 1, 0, dw + e * 9, 1);
  }
}

// wgrad_transforms_body and filter_gradients_body on the widest vectors of the ISA in use.
template <typename T, int M>
auto wgrad_transforms() {
  return by_isa(&PerIsa<&wgrad_transforms_body<T, 64, M>>::avx512, &PerIsa<&wgrad_transforms_body<T, 32, M>>::avx2,
                &PerIsa<&wgrad_transforms_body<T, 16, M>>::portable);
}
template <typename T, int M>
auto filter_gradients() {
  return by_isa(&PerIsa<&filter_gradients_body<T, 64, M>>::avx512, &PerIsa<&filter_gradients_body<T, 32, M>>::avx2,
                &PerIsa<&filter_gradients_body<T, 16, M>>::portable);
}

// The length of winograd_wgrad_blocks' rows of V (a tile's in values): whole column panels of the micro-kernel (nr;
// its GEMMs read them whole, Pad::kB), an odd number of cache lines (odd_lines), as U's rows are. Rows of 256
// channels, 1 KiB apart, put a GEMM's strip of B (a row's panel per tile) and A's columns (U's rows) in 16 of L1's
// 64 sets; one line longer, in one process, ms: batch 1 256@14 0.649-0.662 -> 0.614-0.620, batch 4 2.06-2.09 ->
// 1.94-1.98, batch 8 4.05-4.12 -> 3.83-3.93, batch 1 512@7 0.99 -> 0.95, batch 2 128@28 1.06-1.13 -> 1.01-1.09.
template <typename T>
int64_t blocks_v_row(const Winograd3x3& wp, int nr) {
  return odd_lines<T>(padded_cols(wp.in, nr));
}

// winograd_wgrad_blocks' blocks of output channels: whole row panels of mr, M_ξ's block (P × block × in) about half
// of one core's L2 as the OS reports it (l2_cache_bytes; rounded up to whole panels), at least two blocks per
// thread and a multiple of the threads, the panels spread evenly over them. 256 rows as blocks of 36 (six 6-row
// panels) left a last block of 4 rows, one thread idle for most of a block: 7% of the call at batch 8 by perf; as 8
// blocks of 5-6 panels, side by side, batch 1 256@14 0.43 -> 0.41 ms, 512@7 1.6 -> 1.4 ms. Every block reads all
// of V, so the larger the blocks the less V is re-read: on the Intel Xeon (2 MiB of L2), blocks of 1 MiB instead of
// 512 KiB, alternating runs, ms: batch 8 256@14 5.17-5.41 -> 4.66-4.82, batch 8 512@7 7.9-9.1 -> 6.8-7.4, batch 1
// unchanged (0.76-0.83, 1.12-1.31).
template <typename T, int M>
int64_t wgrad_blocks(const Winograd3x3& wp, int mr, int threads) {
  constexpr int64_t P = (M + 2) * (M + 2);
  const int64_t panels = ceil_div(wp.out, int64_t(mr));
  const int64_t fit_rows = std::max<int64_t>(1, l2_cache_bytes() / 2 / (P * wp.in * int64_t(sizeof(T))));
  const int64_t fit_panels = ceil_div(fit_rows, int64_t(mr));
  const int64_t blocks = std::max(ceil_div(panels, fit_panels), std::min<int64_t>(panels, 2 * int64_t(threads)));
  return blocks < panels ? std::min(panels, detail::round_up(blocks, int64_t(threads))) : blocks;
}

// winograd_3x3_wgrad by F(3x3, M x M) on few tiles: every tile's V transformed once (the threads sharing the
// tiles), then the items are blocks of output channels, each transforming its channels' U over all the tiles,
// computing its M_ξ rows and turning them into its filters' dW at once, while they are in L2. Nothing is summed
// across threads, and neither U nor M leaves the thread that made it.
template <typename T, int M>
void winograd_wgrad_blocks(const Winograd3x3& wp, const MicroKernel<T>& uk, const T* dy, const T* x, T* dw) {
  constexpr int64_t P = (M + 2) * (M + 2);
  const int64_t tiles = wp.n * ceil_div(wp.out_h, M) * ceil_div(wp.out_w, M);
  const int threads = num_threads();
  const int64_t ldv = blocks_v_row<T>(wp, uk.nr);
  // The transforms write a tile's P values at once: its blocks an odd number of lines apart (odd_lines).
  const int64_t v_stride = odd_lines<T>(tiles * ldv);
  const int64_t panels = ceil_div(wp.out, int64_t(uk.mr)), blocks = wgrad_blocks<T, M>(wp, uk.mr, threads);
  const int64_t block_rows = ceil_div(panels, blocks) * uk.mr, pairs = wp.out * wp.in;
  // M_ξ's blocks an odd number of lines apart (odd_lines), as G' M G reads a pair's P values at once: 64 rows of
  // 256 channels put them 64 KiB apart, all in one L1 set.
  const int64_t m_stride = odd_lines<T>(block_rows * wp.in);
  // U is transformed by each block for its own output channels, into the thread's own buffer (ldb apart, blocks
  // b_stride apart), from a whole vector's channel on: with every thread's U transformed once and shared, each
  // block's GEMMs read lines another core had just written, and the transforms barely gained from the second thread
  // (batch 1 128@28 by 4x4 tiles: 0.166 ms on one thread, 0.14 on two). Side by side, alternating processes, ms:
  // batch 1 128@28 0.648-0.661 -> 0.452-0.466, 64 -> 128@28 0.35-0.44 -> 0.255-0.268, 256@14 0.631-0.655 ->
  // 0.579-0.603, batch 4 2.08-2.20 -> 1.95-2.03, batch 8 3.97-4.49 -> 3.79-3.86, batch 8 512@7 3.75-3.90 -> 3.65-3.70.
  constexpr int64_t kAlign = 64 / sizeof(T);  // the widest vector's channels: U's transform runs whole vectors
  const int64_t ldb = odd_lines<T>(block_rows + 2 * kAlign), b_stride = odd_lines<T>(tiles * ldb);
  CallScratch scratch;
  T* const v = scratch.whole<T>(P * v_stride);
  const auto ms = scratch.per_thread<T>(threads, P * m_stride);
  const auto us = scratch.per_thread<T>(threads, P * b_stride);
  const std::vector<int64_t> v_rows = row_offsets(tiles, ldv);
  const auto transforms = wgrad_transforms<T, M>();
  const auto finish = filter_gradients<T, M>();
  const std::vector<T> zeros(std::max(wp.in, wp.out) + 64 / sizeof(T), T(0));  // plus a vector's read slack
  for (int64_t g = 0; g < wp.groups; ++g) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t part = 0; part < threads; ++part) {
      const int64_t t0 = tiles * part / threads, t1 = tiles * (part + 1) / threads;
      if (t0 < t1) transforms(wp, x, dy, g, t0, t1, zeros.data(), v + t0 * ldv, v_stride, ldv, nullptr, 0, 0, 0, 0);
    }
#pragma omp parallel for schedule(dynamic) num_threads(threads)
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t o0 = panels * b / blocks * uk.mr;
      const int64_t rows = std::min(panels * (b + 1) / blocks * uk.mr, wp.out) - o0, count = rows * wp.in;
      T* const m = ms.get();
      T* const u = us.get();
      const int64_t k0 = o0 / kAlign * kAlign, k1 = std::min(wp.out, detail::round_up(o0 + rows, kAlign));
      transforms(wp, x, dy, g, 0, tiles, zeros.data(), nullptr, 0, 0, u, b_stride, ldb, k0, k1);
      for (int64_t xi = 0; xi < P; ++xi) {
        gemm_a_in_place(uk, rows, wp.in, tiles, u + xi * b_stride + (o0 - k0), ldb, v + xi * v_stride,
                        v_rows.data(), m + xi * m_stride, wp.in, false, Pad::kB);
      }
      finish(m, 1, 0, m_stride, count, dw + (g * pairs + o0 * wp.in) * 9);
    }
  }
}

// winograd_3x3_wgrad by F(3x3, M x M) on few tiles, the GEMMs whole: every tile's V and U transformed once (the
// threads sharing the tiles), then the P GEMMs M_ξ[out × in] = U_ξ · V_ξ over all the tiles, their row panels shared
// out evenly among the threads, then the filters' transforms (the pairs shared out). Each GEMM reads U_ξ and V_ξ
// once, its strips of B serving all the output channels' panels, where winograd_wgrad_blocks re-reads all of V per
// block of output channels (from beyond L2 once V outgrows it) and transforms each block's U from dY again; the
// price is M, written whole (P × out × in) and read back by the filters' transforms. Same products in the same
// order as the blocks' (the same GEMMs by rows), so the same results. Side by side against the blocks on the Intel
// Xeon, ms, F(3x3, 2x2) / F(3x3, 4x4): batch 8 256@14 3.50 / 3.41 -> 2.87 / 2.37, batch 4 1.83 / 1.83 -> 1.49 /
// 1.36, batch 2 128@28 1.05 / 0.79 -> 1.06 / 0.68, batch 1 128@28 0.62 / 0.39 -> 0.50 / 0.40, batch 1 64->128@28
// 0.34 / 0.22 -> 0.28 / 0.19; slower where M outweighs V's re-reads: batch 1 256@14 by 4x4 tiles 0.53 -> 0.73,
// batch 1 512@7 0.89 / 1.21 -> 1.44 / 2.82 (wgrad_whole).
template <typename T, int M>
void winograd_wgrad_whole(const Winograd3x3& wp, const MicroKernel<T>& uk, const T* dy, const T* x, T* dw) {
  constexpr int64_t P = (M + 2) * (M + 2);
  const int64_t tiles = wp.n * ceil_div(wp.out_h, M) * ceil_div(wp.out_w, M);
  const int threads = num_threads();
  // V's and U's rows as the blocks' (blocks_v_row), their P blocks and M's an odd number of lines apart.
  const int64_t ldv = blocks_v_row<T>(wp, uk.nr), v_stride = odd_lines<T>(tiles * ldv);
  const int64_t ldu = odd_lines<T>(wp.out), u_stride = odd_lines<T>(tiles * ldu);
  const int64_t pairs = wp.out * wp.in, m_stride = odd_lines<T>(pairs);
  CallScratch scratch;
  T* const v = scratch.whole<T>(P * v_stride);
  T* const u = scratch.whole<T>(P * u_stride);
  T* const m = scratch.whole<T>(P * m_stride);
  const std::vector<int64_t> v_rows = row_offsets(tiles, ldv);
  const auto transforms = wgrad_transforms<T, M>();
  const auto finish = filter_gradients<T, M>();
  const std::vector<T> zeros(std::max(wp.in, wp.out) + 64 / sizeof(T), T(0));  // plus a vector's read slack
  const int64_t panels = ceil_div(wp.out, int64_t(uk.mr));
  constexpr int64_t kPairs = 256;  // the filters' transforms in blocks of pairs
  const int64_t pair_blocks = ceil_div(pairs, kPairs);
  for (int64_t g = 0; g < wp.groups; ++g) {
#pragma omp parallel num_threads(threads)
    {
      const int64_t part = omp_get_thread_num(), parts = omp_get_num_threads();
      const int64_t t0 = tiles * part / parts, t1 = tiles * (part + 1) / parts;
      if (t0 < t1) {
        transforms(wp, x, dy, g, t0, t1, zeros.data(), v + t0 * ldv, v_stride, ldv, u + t0 * ldu, u_stride, ldu, 0,
                   wp.out);
      }
#pragma omp barrier
      // This thread's share of the P × panels row panels, in order: the rest of one GEMM's panels, whole GEMMs, the
      // start of another's.
      const int64_t first = P * panels * part / parts, last = P * panels * (part + 1) / parts;
      for (int64_t at = first; at < last;) {
        const int64_t xi = at / panels, p0 = at % panels, p1 = std::min(panels, p0 + last - at);
        const int64_t o0 = p0 * uk.mr, rows = std::min(p1 * uk.mr, wp.out) - o0;
        gemm_a_in_place(uk, rows, wp.in, tiles, u + xi * u_stride + o0, ldu, v + xi * v_stride, v_rows.data(),
                        m + xi * m_stride + o0 * wp.in, wp.in, false, Pad::kB);
        at += p1 - p0;
      }
#pragma omp barrier
#pragma omp for schedule(static)
      for (int64_t b = 0; b < pair_blocks; ++b) {
        const int64_t e0 = b * kPairs;
        finish(m + e0, 1, 0, m_stride, std::min(kPairs, pairs - e0), dw + (g * pairs + e0) * 9);
      }
    }
  }
}

// Few tiles for the channels (up to twice the output channels: a ResNet layer at batch 1-8), V and U (every tile's;
// U now by the threads' blocks) within 16 MiB: winograd_wgrad_blocks, on channels-last x and dY. Measured against
// the runs of tiles (winograd_wgrad_tiles): batch 1 256 -> 256 on 14x14 0.82 -> 0.56 ms, 512 -> 512 on 7x7 4.5 ->
// 1.3 ms, 128 -> 128 on 28x28 by 4x4 tiles 0.85 -> 0.68 ms (batch 3: 1.15 -> 0.86), batch 8 256 -> 256 on 14x14 5.1
// -> 4.5 ms. With more tiles the runs are as fast or faster, each block re-reading all of V: batch 16 at 256
// channels equal, batch 32 at 512 channels on 7x7 (33 MiB of V and U) 14% faster, batch 2 64 -> 64 on 56x56 by 4x4
// tiles 24% faster.
template <typename T, int M>
bool wgrad_by_blocks(const Winograd3x3& wp) {
  constexpr int64_t P = (M + 2) * (M + 2);
  const int64_t tiles = wp.n * ceil_div(wp.out_h, M) * ceil_div(wp.out_w, M);
  const int64_t ldv = blocks_v_row<T>(wp, pick_micro_kernel<T>(wp.out, wp.in).nr);
  return tiles <= 2 * wp.out && P * tiles * (ldv + wp.out) * int64_t(sizeof(T)) <= (int64_t(16) << 20);
}

// Where wgrad_by_blocks holds, the GEMMs whole (winograd_wgrad_whole) where M (P × out × in, written and read
// back) is within 16 MiB and no larger than what the blocks would re-read of V, all but one block's worth of it
// (P × tiles × V's row, per block): M costs them both ways, the blocks' re-reads one, but those come with each
// block's transform of U. With a margin, M within 1/margin of those re-reads.
template <typename T, int M>
bool wgrad_whole(const Winograd3x3& wp, int64_t margin = 1) {
  constexpr int64_t P = (M + 2) * (M + 2);
  const int64_t tiles = wp.n * ceil_div(wp.out_h, M) * ceil_div(wp.out_w, M);
  const MicroKernel<T> uk = pick_micro_kernel<T>(wp.out, wp.in);
  const int64_t blocks = wgrad_blocks<T, M>(wp, uk.mr, num_threads());
  return P * wp.out * wp.in * int64_t(sizeof(T)) <= (int64_t(16) << 20) &&
         margin * wp.out * wp.in <= (blocks - 1) * tiles * blocks_v_row<T>(wp, uk.nr);
}

// Rows [r0, r1) of image img's channels [c0, c0 + count) of an n × channels × h × w tensor (channels-last: n × h ×
// w × channels), channels-last into band: (row, col, c) at ((row - r0)*w + col)*count + c - c0. From NCHW by 8x8
// register transposes (conv_common.h), from channels-last as each position's run of channels.
template <typename T>
void band_channels_last(const T* src, bool channels_last, int64_t img, int64_t channels, int64_t h, int64_t w,
                        int64_t c0, int64_t count, int64_t r0, int64_t r1, T* band) {
  const int64_t positions = (r1 - r0) * w;
  if (positions <= 0) return;
  if (!channels_last) {
    transpose(src + ((img * channels + c0) * h + r0) * w, h * w, count, positions, band, count);
  } else if (count == channels) {
    std::copy_n(src + (img * h + r0) * w * channels, positions * channels, band);
  } else {
    const T* from = src + (img * h + r0) * w * channels + c0;
    for (int64_t pos = 0; pos < positions; ++pos) std::copy_n(from + pos * channels, count, band + pos * count);
  }
}

// winograd_3x3_wgrad by F(3x3, M x M): P = (M + 2)² GEMMs.
template <typename T, int M>
void winograd_wgrad_tiles(const Winograd3x3& wp, const T* dy, bool dy_channels_last, const T* x,
                          bool x_channels_last, T* dw) {
  constexpr int64_t P = (M + 2) * (M + 2);
  const int64_t tiles = wp.n * ceil_div(wp.out_h, M) * ceil_div(wp.out_w, M);
  const int threads = num_threads();
  // GEMM per ξ: M_ξ[out × in] += U_ξ[out × tiles] · V_ξ[tiles × in], both read in place: U_ξ's columns are the
  // transform's rows of `out` values, one per tile.
  const MicroKernel<T> uk = pick_micro_kernel<T>(wp.out, wp.in);
  const int64_t ldv = padded_cols(wp.in, uk.nr), ldu = wp.out;
  if (wgrad_by_blocks<T, M>(wp)) {
    TORCH_INTERNAL_ASSERT(dy_channels_last && x_channels_last, "cnn_ext: Winograd's wgrad by blocks needs NHWC");
    if (wgrad_whole<T, M>(wp)) return winograd_wgrad_whole<T, M>(wp, uk, dy, x, dw);
    return winograd_wgrad_blocks<T, M>(wp, uk, dy, x, dw);
  }
  // An item is a run of consecutive tiles of one group (across images), with V and U within about 512 KiB (so they
  // stay in L2 from the transforms through the GEMMs: measured faster than 128 KiB-2 MiB on ResNet and DeepMNIST
  // layers) but about 64 tiles or more (each GEMM reads and writes its out × in block of M once per item: with
  // many channels, shorter runs spend more on M than on the products). The runs are as many per thread (a
  // multiple of the threads, as near that budget as may be), so the threads' shares of tiles are equal: 196 tiles
  // as 64 + 64 | 64 + 4 kept one thread waiting for half its time.
  const int64_t budget = std::max<int64_t>(64, kScratchBytes / (P * int64_t(sizeof(T)) * (ldv + ldu)));
  const int64_t per_thread = std::max<int64_t>(1, (tiles + threads * budget / 2) / (threads * budget));
  const int64_t run = ceil_div(tiles, std::min(tiles, threads * per_thread));
  const int64_t chunks = ceil_div(tiles, run), items = wp.groups * chunks;
  const int64_t parts = std::min<int64_t>(threads, items);
  // Part p sums the items [items*p/parts, items*(p+1)/parts) into its own M (every group's P blocks), and the parts
  // are added in order at the end: the result depends on the thread count only, not on the schedule.
  const int64_t m_size = wp.groups * P * wp.out * wp.in;
  // Scratch (scratch.h): a part's first item of a group writes its M (the GEMMs without accumulating), and the
  // groups a part has no item of are zeroed; V's padding columns (in..ldv) feed only M columns past `in`, never
  // stored; U and V rows past an item's tiles are never read.
  CallScratch scratch;
  T* const partial = scratch.whole<T>(parts * m_size);
  // V and U tile by tile: tile t's P rows (V_ξ's at t*v_tile + ξ*ldv) in one run, so that its transforms write
  // two runs of memory, not 2P rows a run of tiles apart (P*2 streams on a handful of L1 sets); a cache line between
  // tiles keeps the GEMMs' rows of B (and A's columns) off 4 KiB strides (64 channels in F(3x3, 2x2): 16*64 floats).
  const int64_t v_tile = P * ldv + 64 / sizeof(T), u_tile = P * ldu + 64 / sizeof(T);
  const auto vs = scratch.per_thread<T>(parts, run * v_tile);
  const auto us = scratch.per_thread<T>(parts, run * u_tile);
  // An item's tiles read their input and dY rows from channels-last copies of those rows alone (band_channels_last),
  // made by the thread as it reaches them, image by image: they stay in L2 from the copy through the transforms.
  // Copies of the whole tensors before the call, and V and U as P rows of a run's tiles each, measured 1.7x the time
  // per image at batch 128 (25.6 MB of copies written to memory and read back) as at batch 8 (DeepMNIST's 32 -> 32
  // layer on 28x28 planes); with both changes, on one thread, that layer's weight gradient at batch 128 took 6.2-8.2
  // ms instead of 12.0-13.4, its 64 -> 64 on 14x14 6.0-8.2 instead of 8.2-11.0.
  const int64_t tp = ceil_div(wp.out_h, M), tq = ceil_div(wp.out_w, M), per_image = tp * tq;
  const int64_t band_tile_rows = std::min(tp, (run + 2 * tq - 2) / tq);  // the most an image's part of a run spans
  const int64_t x_band = (M * band_tile_rows + 2) * wp.in_w * wp.in;
  const auto bands = scratch.per_thread<T>(parts, x_band + M * band_tile_rows * wp.out_w * wp.out);
  const std::vector<int64_t> v_rows = row_offsets(run, v_tile);
  const auto transforms = wgrad_transforms<T, M>();

#pragma omp parallel for schedule(static, 1) num_threads(parts)
  for (int64_t p = 0; p < parts; ++p) {
    T* const v = vs.slice(p);
    T* const u = us.slice(p);
    T* const x_rows = bands.slice(p);
    T* const dy_rows = x_rows + x_band;
    const std::vector<T> zeros(std::max(wp.in, wp.out) + 64 / sizeof(T), T(0));  // plus a vector's read slack
    T* acc = partial + p * m_size;
    const int64_t first = items * p / parts, last = items * (p + 1) / parts;
    for (int64_t item = first; item < last; ++item) {
      const int64_t g = item / chunks, t0 = item % chunks * run, t1 = std::min(tiles, t0 + run);
      const bool accumulate = item > first && (item - 1) / chunks == g;
      for (int64_t s0 = t0, s1; s0 < t1; s0 = s1) {
        // Tiles [s0, s1) of image img, in its tile rows [i0, i1): input rows [r0, r1) (the others are padding)
        // and dY rows [M*i0, M*i0 + dy_h), transformed as the tiles of a one-image view of the copied rows.
        const int64_t img = s0 / per_image;
        s1 = std::min(t1, (img + 1) * per_image);
        const int64_t i0 = s0 % per_image / tq, i1 = (s1 - 1) % per_image / tq + 1;
        const int64_t r0 = std::max<int64_t>(0, M * i0 - wp.pad_h);
        const int64_t r1 = std::max(r0, std::min(wp.in_h, M * i1 - wp.pad_h + 2));
        const int64_t dy_h = std::min(M * (i1 - i0), wp.out_h - M * i0);
        band_channels_last(x, x_channels_last, img, wp.groups * wp.in, wp.in_h, wp.in_w, g * wp.in, wp.in, r0, r1,
                           x_rows);
        band_channels_last(dy, dy_channels_last, img, wp.groups * wp.out, wp.out_h, wp.out_w, g * wp.out, wp.out,
                           M * i0, M * i0 + dy_h, dy_rows);
        const Winograd3x3 rows{1, 1, wp.in, wp.out, r1 - r0, wp.in_w, dy_h, wp.out_w, r0 - (M * i0 - wp.pad_h),
                               wp.pad_w};
        const int64_t first_tile = img * per_image + i0 * tq;  // the view's tile 0
        transforms(rows, x_rows, dy_rows, 0, s0 - first_tile, s1 - first_tile, zeros.data(),
                   v + (s0 - t0) * v_tile, ldv, v_tile, u + (s0 - t0) * u_tile, ldu, u_tile, 0, wp.out);
      }
      for (int64_t xi = 0; xi < P; ++xi) {
        gemm_a_in_place(uk, wp.out, wp.in, t1 - t0, u + xi * ldu, u_tile, v + xi * ldv,
                        v_rows.data(), acc + (g * P + xi) * wp.out * wp.in, wp.in, accumulate, Pad::kB);
      }
    }
    const int64_t group_size = P * wp.out * wp.in;
    for (int64_t g = 0; g < wp.groups; ++g) {
      const bool touched = first < last && g >= first / chunks && g <= (last - 1) / chunks;
      if (!touched) std::fill_n(acc + g * group_size, group_size, T(0));
    }
  }

  // The pairs in blocks of 256 per group, across the threads.
  constexpr int64_t kPairs = 256;
  const int64_t pairs = wp.out * wp.in, blocks = ceil_div(pairs, kPairs);
  const auto finish = filter_gradients<T, M>();
#pragma omp parallel for num_threads(threads)
  for (int64_t gb = 0; gb < wp.groups * blocks; ++gb) {
    const int64_t g = gb / blocks, e0 = gb % blocks * kPairs;
    finish(partial + g * P * pairs + e0, parts, m_size, pairs, std::min(kPairs, pairs - e0),
           dw + (g * pairs + e0) * 9);
  }
}

}  // namespace

template <typename T>
bool winograd_wgrad_needs_channels_last(const Winograd3x3& wp, int64_t tile) {
  return tile == 2 ? wgrad_by_blocks<T, 2>(wp) : wgrad_by_blocks<T, 4>(wp);
}

template <typename T>
bool winograd_wgrad_whole_gemms(const Winograd3x3& wp, int64_t tile, int64_t margin) {
  return tile == 2 ? wgrad_by_blocks<T, 2>(wp) && wgrad_whole<T, 2>(wp, margin)
                   : wgrad_by_blocks<T, 4>(wp) && wgrad_whole<T, 4>(wp, margin);
}

template <typename T>
void winograd_3x3_wgrad(const Winograd3x3& wp, int64_t tile, const T* dy, bool dy_channels_last, const T* x,
                        bool x_channels_last, T* dw) {
  TORCH_INTERNAL_ASSERT(tile == 2 || tile == 4, "cnn_ext: Winograd has no F(3x3, ", tile, "x", tile, ")");
  return tile == 2 ? winograd_wgrad_tiles<T, 2>(wp, dy, dy_channels_last, x, x_channels_last, dw)
                   : winograd_wgrad_tiles<T, 4>(wp, dy, dy_channels_last, x, x_channels_last, dw);
}

template void winograd_3x3<float>(const Winograd3x3&, int64_t, const float*, const float*, bool, const float*,
                                  float*);
template void winograd_3x3<double>(const Winograd3x3&, int64_t, const double*, const double*, bool, const double*,
                                   double*);
template bool winograd_wgrad_needs_channels_last<float>(const Winograd3x3&, int64_t);
template bool winograd_wgrad_needs_channels_last<double>(const Winograd3x3&, int64_t);
template bool winograd_wgrad_whole_gemms<float>(const Winograd3x3&, int64_t, int64_t);
template bool winograd_wgrad_whole_gemms<double>(const Winograd3x3&, int64_t, int64_t);
template void winograd_3x3_wgrad<float>(const Winograd3x3&, int64_t, const float*, bool, const float*, bool, float*);
template void winograd_3x3_wgrad<double>(const Winograd3x3&, int64_t, const double*, bool, const double*, bool,
                                         double*);

}  // namespace cnn_ext::cpu
