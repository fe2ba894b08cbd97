// Winograd F(2x2, 3x3): see winograd.h for the method. The transforms' inner loops run along a row of tiles in
// whole vectors (the input's even and odd columns split, the output's two columns merged, by vector shuffles) and
// are compiled per ISA; the 16 products per item run on gemm.h's micro-kernels.
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
// columns past a row's tq compute values nobody uses, reading and writing buffer slack.
// gemm.h's Vector, plus the lane permutations the transforms shuffle with.
template <typename T, int Bytes>
struct Vec : Vector<T, Bytes> {
  using typename Vector<T, Bytes>::V;
  static constexpr int kLanes = Vector<T, Bytes>::kLanes;
  using Index = std::conditional_t<sizeof(T) == 4, int32_t, int64_t>;
  typedef Index Mask __attribute__((vector_size(Bytes)));

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

// The transforms compiled for the ISA in use, on vectors of `bytes` bytes (at most the ISA's width): their loops
// run over n = tq rounded up to whole vectors, so narrower vectors waste less on small planes.
template <typename T>
struct Transforms {
  template <int Bytes>
  using In = PerIsa<&input_transform_body<T, Bytes>>;
  template <int Bytes>
  using Out = PerIsa<&output_transform_body<T, Bytes>>;

  // The narrowest vectors that take as few iterations over tq tile columns as the ISA's widest (a 7-column row of
  // tiles: one 8-lane vector instead of one 16-lane one, 7/8 of it used instead of 7/16).
  static int bytes(int64_t tq) {
    const int widest = by_isa(64, 32, 16);
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

// U = G g Gᵀ for the filters from j (V: a GCC vector of filters, or T for one): tap (r, s) of filter j at
// taps[(3*r + s)*ld + j] (at taps[(8 - 3*r - s)*ld + j] when flipped: rotated by 180 degrees); U_ξ, ξ = 4*a + b,
// at u[ξ*u_stride + j]. One filter's taps as they lie in the kernel: ld = 1, j = 0.
template <typename V, typename T>
inline __attribute__((always_inline)) void filter_values(const T* taps, int64_t ld, bool flip, int64_t j, T* u,
                                                         int64_t u_stride) {
  const auto tap = [&](int t) { return load_as<V>(taps + (flip ? 8 - t : t) * ld + j); };
  const V half = V{} + T(0.5);
  for (int a = 0; a < 4; ++a) {
    V row[3];  // row a of G g: G's row a applied to the filter's columns
    for (int s = 0; s < 3; ++s) {
      const V k0 = tap(s), k1 = tap(3 + s), k2 = tap(6 + s);
      row[s] = a == 0 ? k0 : a == 3 ? k2 : a == 1 ? half * (k0 + k1 + k2) : half * (k0 - k1 + k2);
    }
    T* ua = u + 4 * a * u_stride + j;  // (G g) Gᵀ: Gᵀ's columns applied to the row
    store_as(ua, row[0]);
    store_as(ua + u_stride, half * (row[0] + row[1] + row[2]));
    store_as(ua + 2 * u_stride, half * (row[0] - row[1] + row[2]));
    store_as(ua + 3 * u_stride, row[2]);
  }
}

template <typename T, int Bytes>
inline __attribute__((always_inline)) void filter_block_body(const T* taps, int64_t ld, int64_t count, bool flip,
                                                             T* u, int64_t u_stride) {
  using V = typename detail::VecOf<T, Bytes>::type;
  constexpr int64_t L = Bytes / sizeof(T);
  int64_t j = 0;
  for (; j + L <= count; j += L) filter_values<V>(taps, ld, flip, j, u, u_stride);
  for (; j < count; ++j) filter_values<T>(taps, ld, flip, j, u, u_stride);
}

// U_ξ for `runs` runs of `count` consecutive filters of the kernel (run r from filter r*run_step; a filter is 9
// taps): filter j of run r at u[ξ*u_stride + r*ld + j], for the GEMMs to read in place: a plain kernel's runs are
// output channels (U_ξ row-major out × in), a flipped one's input channels (its transpose). Blocks of filters are
// transposed to tap-major (conv_common.h's transpose), then transformed along the filters in vectors.
template <typename T>
void transform_filters(const T* weights, int64_t runs, int64_t run_step, int64_t count, bool flip, T* u, int64_t ld,
                       int64_t u_stride) {
  constexpr int64_t kBlock = 128;
  const auto transform = by_isa(&PerIsa<&filter_block_body<T, 64>>::avx512, &PerIsa<&filter_block_body<T, 32>>::avx2,
                                &PerIsa<&filter_block_body<T, 16>>::portable);
  T taps[9 * kBlock];
  for (int64_t r = 0; r < runs; ++r) {
    for (int64_t f0 = 0; f0 < count; f0 += kBlock) {
      const int64_t filters = std::min(kBlock, count - f0);
      transpose(weights + (r * run_step + f0) * 9, 9, filters, 9, taps, kBlock);
      transform(taps, kBlock, filters, flip, u + r * ld + f0, u_stride);
    }
  }
}

// The 16 GEMM A operands U_ξ of every group, as pack_a's panels of mr output channels (element (o, i) of a panel
// at i*mr + o % mr; zeros in the last panel's rows past `out`). A panel at a time, input channel by input channel,
// so the kernel is read and the panels written in memory order (the flipped kernel's mr output channels are
// contiguous for each input channel, the plain kernel's mr rows each advance 9 elements); filter by filter, as
// scalars (vectorised along the filters, the panels' interleaving would cost a scattered store per value).
template <typename T>
void transform_weights(const Winograd3x3& wp, const T* weights, bool flip, int mr, T* packed) {
  const int64_t panel = packed_a_size(wp.out, wp.in, mr), panels = ceil_div(wp.out, int64_t(mr));
#pragma omp parallel for schedule(static) num_threads(num_threads())
  for (int64_t gp = 0; gp < wp.groups * panels; ++gp) {
    const int64_t g = gp / panels, o0 = gp % panels * mr;
    T* to = packed + g * 16 * panel + o0 * wp.in;
    for (int64_t i = 0; i < wp.in; ++i) {
      for (int64_t r = 0; r < mr; ++r) {
        T* u = to + i * mr + r;
        const int64_t o = o0 + r;
        if (o >= wp.out) {
          for (int64_t xi = 0; xi < 16; ++xi) u[xi * panel] = T(0);
        } else {
          const int64_t filter = flip ? (g * wp.in + i) * wp.out + o : (g * wp.out + o) * wp.in + i;
          filter_values<T>(weights + filter * 9, 1, flip, 0, u, panel);
        }
      }
    }
  }
}

}  // namespace

template <typename T>
void winograd_3x3(const Winograd3x3& wp, const T* src, const T* weights, bool flip, const T* bias, T* dst) {
  const int64_t tp = ceil_div(wp.out_h, 2), tq = ceil_div(wp.out_w, 2);
  const int bytes = Transforms<T>::bytes(tq);
  const int64_t n = detail::round_up(tq, bytes / int64_t(sizeof(T)));  // the transforms' loops: whole vectors
  const int threads = num_threads();
  // An item is a run of consecutive tile rows of one group, across images (row R of the group is tile row R % tp
  // of image R / tp), so that small images still make long GEMMs, and a block of output channels. Its tiles are
  // the GEMMs' columns: about a multiple of the micro-kernel's width, with V and M (16 × (in + out) × tiles) within
  // about 2 MiB. The output channels are split only where they outnumber twice the tiles (U, 16 × in × out, then
  // outweighs V, 16 × in × tiles): into blocks of 64 or more, enough for two items per thread and U's blocks
  // within about 1 MiB each, which each thread transforms where its items use them. Where there are still fewer
  // than two items per thread, the runs are shortened.
  const int64_t total_rows = wp.n * tp;
  const int64_t budget = std::max<int64_t>(16, 4 * kScratchBytes / (16 * int64_t(sizeof(T)) * (wp.in + wp.out)));
  const int64_t nr_guess = 64 / int64_t(sizeof(T)) * 4;  // the AVX-512 6x4 micro-kernel's columns
  const int64_t target = budget >= nr_guess ? budget / nr_guess * nr_guess : budget;
  int64_t tile_rows = std::clamp<int64_t>((target + tq / 2) / tq, 1, total_rows);
  const int64_t wanted = 2 * threads;
  const int64_t filters = wp.in * wp.out, u_bytes = 16 * filters * int64_t(sizeof(T));
  const bool split = wp.out > 2 * total_rows * tq;
  const int64_t most_blocks = std::max<int64_t>(1, wp.out / 64);  // each block's items transform V again
  const int64_t blocks =
      split ? std::clamp(std::max(ceil_div(wanted, wp.groups * ceil_div(total_rows, tile_rows)),
                                  ceil_div(u_bytes, 2 * kScratchBytes)),
                         int64_t(1), most_blocks)
            : 1;
  tile_rows = std::min(tile_rows, ceil_div(total_rows, ceil_div(wanted, wp.groups * blocks)));
  const int64_t chunks = ceil_div(total_rows, tile_rows), max_tiles = tile_rows * tq;

  // GEMM per ξ: M_ξ[out × tiles] = U_ξ[out × in] · V_ξ[in × tiles], V read in place (rows padded to whole panels).
  const MicroKernel<T> uk = pick_micro_kernel<T>(wp.out, max_tiles);
  const int64_t ld = padded_cols(max_tiles, uk.nr);
  const int64_t block = detail::round_up(ceil_div(wp.out, blocks), uk.mr), block_count = ceil_div(wp.out, block);
  const int64_t items = wp.groups * block_count * chunks;  // (group, block, chunk), chunks fastest
  // Scratch (scratch.h), every U element written before it is read; the transforms' and GEMMs' reads past the
  // tiles (slack, padding columns) reach only columns nobody uses: a GEMM's columns are independent.
  // Without a split, U is transformed once, before the items, into pack_a's panels (a packed A reads faster than
  // one in place: 10-30% on these GEMMs); split, each thread transforms its blocks of U, read in place.
  const int64_t u_panel = packed_a_size(wp.out, wp.in, uk.mr);
  const PerThread<T> us(0, split ? threads : 1, 16 * (split ? block * wp.in : wp.groups * u_panel));
  if (!split) transform_weights(wp, weights, flip, uk.mr, us.slice(0));
  const std::vector<int64_t> v_rows = row_offsets(wp.in, ld);
  // V's 16 blocks are n elements apart beyond their in × ld rows: a channel's last row of tiles may overflow its
  // row by up to n - tq values (see input_transform_body), which must not reach the next block's first channel.
  const int64_t v_stride = wp.in * ld + n, m_stride = wp.out * ld;
  const int64_t win_cols = 2 * tq + 2, win_rows = 2 * std::min(tile_rows, tp) + 2;
  const int64_t slack = 2 * n + 2;  // read past the windows' and M's last rows
  const int64_t in_plane = wp.in_h * wp.in_w, out_plane = wp.out_h * wp.out_w;

  const auto in_fn = Transforms<T>::input(bytes);
  const auto out_fn = Transforms<T>::output(bytes);

  const PerThread<T> windows(1, threads, win_rows * win_cols + slack), rings(2, threads, 16 * n);
  const PerThread<T> lines(3, threads, 4 * n), vs(4, threads, 16 * v_stride + slack);
  const PerThread<T> ms(5, threads, 16 * m_stride + slack);
#pragma omp parallel num_threads(threads)
  {
    T* const window = windows.get();
    T* const ring = rings.get();
    T* const line = lines.get();
    T* const v = vs.get();
    T* const m = ms.get();
    int64_t u_block = -1;  // split: the (group, block) whose U this thread holds
    int64_t v_chunk = -1;  // the (group, chunk) whose V it holds (the next block's item may reuse it)
    // Split, a thread takes consecutive items (its share at once), so that it transforms few blocks of U.
#pragma omp for schedule(dynamic, split ? ceil_div(items, threads) : 1)
    for (int64_t item = 0; item < items; ++item) {
      const int64_t g = item / (block_count * chunks), b = item / chunks % block_count;
      const int64_t o0 = b * block, o1 = std::min(wp.out, o0 + block);
      const int64_t r0 = item % chunks * tile_rows, r1 = std::min(total_rows, r0 + tile_rows), tiles = (r1 - r0) * tq;
      // The GEMMs' A, U_ξ's rows o0..o1 of group g: packed (at a + ξ*a_stride), or this thread's block read in
      // place, lda apart (plain) or as its transpose's columns (flipped).
      const T* a = us.slice(0) + g * 16 * u_panel + o0 * wp.in;
      int64_t a_stride = u_panel, lda = 0;
      if (split) {
        // The block's runs of filters: its output channels (plain), or every input channel's run of its output
        // channels (flipped), each run lda long.
        const int64_t runs = flip ? wp.in : o1 - o0, run_step = flip ? wp.out : wp.in;
        lda = flip ? o1 - o0 : wp.in;
        a = us.get();
        a_stride = (o1 - o0) * wp.in;
        if (u_block != item / chunks) {
          u_block = item / chunks;
          const T* first = weights + (g * filters + (flip ? o0 : o0 * wp.in)) * 9;
          transform_filters(first, runs, run_step, lda, flip, us.get(), lda, a_stride);
        }
      }
      // Calls fn(image, its first tile row, rows, first column of V) for each image's share of rows [r0, r1).
      auto for_each_image = [&](auto&& fn) {
        for (int64_t r = r0; r < r1;) {
          const int64_t img = r / tp, tr = r % tp, rows = std::min(tp - tr, r1 - r);
          fn(img, tr, rows, (r - r0) * tq);
          r += rows;
        }
      };
      const int64_t chunk = g * chunks + item % chunks;
      for (int64_t c = 0; c < wp.in && v_chunk != chunk; ++c) {
        for_each_image([&](int64_t img, int64_t tr, int64_t rows, int64_t col) {
          // Window row a is input row 2*tr - pad_h + a; column b is input column b - pad_w.
          const T* x = src + ((img * wp.groups + g) * wp.in + c) * in_plane;
          copy_window(x, wp.in_h, wp.in_w, wp.pad_h - 2 * tr, wp.pad_w, 2 * rows + 2, win_cols, window);
          in_fn(window, rows, tq, n, v + c * ld + col, v_stride, ring);
        });
      }
      v_chunk = chunk;
      for (int64_t xi = 0; xi < 16; ++xi) {
        T* c = m + xi * m_stride + o0 * ld;
        if (!split) {
          gemm(uk, o1 - o0, tiles, wp.in, a + xi * a_stride, v + xi * v_stride, v_rows.data(), c, ld, false, Pad::kBC);
        } else if (flip) {
          gemm_a_in_place(uk, o1 - o0, tiles, wp.in, a + xi * a_stride, lda, v + xi * v_stride, v_rows.data(), c,
                          ld, false, Pad::kBC);
        } else {
          gemm_a_rows(uk, o1 - o0, tiles, wp.in, a + xi * a_stride, lda, v + xi * v_stride, v_rows.data(), c, ld,
                      false, Pad::kBC);
        }
      }
      for_each_image([&](int64_t img, int64_t tr, int64_t rows, int64_t col) {
        T* y = dst + (img * wp.groups + g) * wp.out * out_plane;
        for (int64_t o = o0; o < o1; ++o) {
          out_fn(m + o * ld + col, m_stride, rows, tq, n, 2 * tr, wp.out_h, wp.out_w,
                 bias != nullptr ? bias[g * wp.out + o] : T(0), y + o * out_plane, line);
        }
      });
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Weight gradient, F(3x3, 2x2) (winograd.h): per item (a run of tiles of one group), V_ξ = Bᵀ d B and
// U_ξ = A dy Aᵀ for every tile and channel, vectorised along the channels of channels-last x and dY, then per ξ
// one GEMM with the item's tiles as its reduction accumulates M_ξ += U_ξ · V_ξ; G' M G gives dW at the end.
// ---------------------------------------------------------------------------------------------------------------

namespace {

// Bᵀ d B for the channels from c of one tile (V: a GCC vector of channels, or T for the channels past the last
// whole vector): pixel (a, b) of its 4x4 input tile at at[4a + b] (zeros outside the input); V_ξ's row for the tile
// at v + ξ*v_stride.
template <typename V, typename T>
inline __attribute__((always_inline)) void input_tile(const T* const* at, int64_t c, T* v, int64_t v_stride) {
  V e[4][4];  // Bᵀ d
  for (int b = 0; b < 4; ++b) {
    const V d0 = load_as<V>(at[b] + c), d1 = load_as<V>(at[4 + b] + c);
    const V d2 = load_as<V>(at[8 + b] + c), d3 = load_as<V>(at[12 + b] + c);
    e[0][b] = d0 - d2;
    e[1][b] = d1 + d2;
    e[2][b] = d2 - d1;
    e[3][b] = d1 - d3;
  }
  for (int a = 0; a < 4; ++a) {
    store_as(v + (4 * a + 0) * v_stride + c, e[a][0] - e[a][2]);
    store_as(v + (4 * a + 1) * v_stride + c, e[a][1] + e[a][2]);
    store_as(v + (4 * a + 2) * v_stride + c, e[a][2] - e[a][1]);
    store_as(v + (4 * a + 3) * v_stride + c, e[a][1] - e[a][3]);
  }
}

// A dy Aᵀ for the channels from k of one tile's 2x2 block of dY (pixel (a, b) at at[2a + b], zeros outside dY);
// A applied to a pair (y0, y1) is (y0, y0 + y1, y0 - y1, -y1).
template <typename V, typename T>
inline __attribute__((always_inline)) void grad_tile(const T* const* at, int64_t k, T* u, int64_t u_stride) {
  const V y00 = load_as<V>(at[0] + k), y01 = load_as<V>(at[1] + k);
  const V y10 = load_as<V>(at[2] + k), y11 = load_as<V>(at[3] + k);
  const V z0[4] = {y00, y00 + y01, y00 - y01, -y01};
  const V z1[4] = {y10, y10 + y11, y10 - y11, -y11};
  for (int b = 0; b < 4; ++b) {
    store_as(u + (0 + b) * u_stride + k, z0[b]);
    store_as(u + (4 + b) * u_stride + k, z0[b] + z1[b]);
    store_as(u + (8 + b) * u_stride + k, z0[b] - z1[b]);
    store_as(u + (12 + b) * u_stride + k, -z1[b]);
  }
}

// The transforms of tiles [t0, t1) of group g (tile t is column t % tq of tile row t / tq % tp of image
// t / (tp*tq)): row t - t0 of V_ξ (ldv apart, blocks v_stride apart) and of U_ξ (ldu, u_stride).
template <typename T, int Bytes>
inline __attribute__((always_inline)) void wgrad_transforms_body(const Winograd3x3& wp, const T* x, const T* dy,
                                                                 int64_t g, int64_t t0, int64_t t1, const T* zeros,
                                                                 T* v, int64_t v_stride, int64_t ldv, T* u,
                                                                 int64_t u_stride, int64_t ldu) {
  using V = typename detail::VecOf<T, Bytes>::type;
  constexpr int64_t L = Bytes / sizeof(T);
  const int64_t tp = ceil_div(wp.out_h, 2), tq = ceil_div(wp.out_w, 2);
  const int64_t x_channels = wp.groups * wp.in, dy_channels = wp.groups * wp.out;
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t img = t / (tp * tq), i = t / tq % tp, j = t % tq;
    const T* xs[16];
    for (int64_t a = 0; a < 4; ++a) {
      const int64_t h = 2 * i - wp.pad_h + a;
      for (int64_t b = 0; b < 4; ++b) {
        const int64_t w = 2 * j - wp.pad_w + b;
        const bool inside = h >= 0 && h < wp.in_h && w >= 0 && w < wp.in_w;
        xs[4 * a + b] = inside ? x + ((img * wp.in_h + h) * wp.in_w + w) * x_channels + g * wp.in : zeros;
      }
    }
    const T* ys[4];
    for (int64_t a = 0; a < 2; ++a) {
      for (int64_t b = 0; b < 2; ++b) {
        const int64_t h = 2 * i + a, w = 2 * j + b;
        const bool inside = h < wp.out_h && w < wp.out_w;
        ys[2 * a + b] = inside ? dy + ((img * wp.out_h + h) * wp.out_w + w) * dy_channels + g * wp.out : zeros;
      }
    }
    T* vt = v + (t - t0) * ldv;
    int64_t c = 0;
    for (; c + L <= wp.in; c += L) input_tile<V>(xs, c, vt, v_stride);
    for (; c < wp.in; ++c) input_tile<T>(xs, c, vt, v_stride);
    T* ut = u + (t - t0) * ldu;
    int64_t k = 0;
    for (; k + L <= wp.out; k += L) grad_tile<V>(ys, k, ut, u_stride);
    for (; k < wp.out; ++k) grad_tile<T>(ys, k, ut, u_stride);
  }
}

// dW = G' m G for the (output, input) channel pairs from e (V: a GCC vector of pairs, or T for one): m_ξ of pair e
// at m[ξ*m_stride + e], tap t of its 3x3 filter written at dw[t*dw_stride + e]. G' applied to a column
// (m0, m1, m2, m3) is (m0 + (m1 + m2)/2, (m1 - m2)/2, (m1 + m2)/2 + m3).
template <typename V, typename T>
inline __attribute__((always_inline)) void filter_gradient(const T* m, int64_t m_stride, int64_t e, T* dw,
                                                           int64_t dw_stride) {
  const auto at = [&](int xi) { return load_as<V>(m + xi * m_stride + e); };
  const V half = V{} + T(0.5);
  V r[3][4];
  for (int b = 0; b < 4; ++b) {
    const V half_sum = half * (at(4 + b) + at(8 + b));
    r[0][b] = at(b) + half_sum;
    r[1][b] = half * (at(4 + b) - at(8 + b));
    r[2][b] = half_sum + at(12 + b);
  }
  for (int a = 0; a < 3; ++a) {
    const V half_sum = half * (r[a][1] + r[a][2]);
    store_as(dw + (3 * a + 0) * dw_stride + e, r[a][0] + half_sum);
    store_as(dw + (3 * a + 1) * dw_stride + e, half * (r[a][1] - r[a][2]));
    store_as(dw + (3 * a + 2) * dw_stride + e, half_sum + r[a][3]);
  }
}

// dW for `count` consecutive pairs of one group: M = the parts' sums added in order (part p's M_ξ of the group
// at partial + p*part_stride + ξ*m_stride), transformed in vectors of pairs into tap-major rows, which an 8x8
// register transpose (conv_common.h) turns into the filters' 9 consecutive taps.
template <typename T, int Bytes>
inline __attribute__((always_inline)) void filter_gradients_body(const T* partial, int64_t parts, int64_t part_stride,
                                                                 int64_t m_stride, int64_t count, T* dw) {
  using V = typename detail::VecOf<T, Bytes>::type;
  constexpr int64_t L = Bytes / sizeof(T);
  alignas(64) T m[16 * L], taps[9 * L];
  int64_t e = 0;
  for (; e + L <= count; e += L) {
    for (int xi = 0; xi < 16; ++xi) {
      V sum = load_as<V>(partial + xi * m_stride + e);
      for (int64_t p = 1; p < parts; ++p) sum += load_as<V>(partial + p * part_stride + xi * m_stride + e);
      store_as(m + xi * L, sum);
    }
    filter_gradient<V>(m, L, 0, taps, L);
    transpose_body(taps, L, 9, L, dw + e * 9, 9);
  }
  for (; e < count; ++e) {
    for (int xi = 0; xi < 16; ++xi) {
      T sum = partial[xi * m_stride + e];
      for (int64_t p = 1; p < parts; ++p) sum += partial[p * part_stride + xi * m_stride + e];
      m[xi] = sum;
    }
    filter_gradient<T>(m, 1, 0, dw + e * 9, 1);
  }
}

}  // namespace

template <typename T>
void winograd_3x3_wgrad(const Winograd3x3& wp, const T* dy, const T* x, T* dw) {
  const int64_t tiles = wp.n * ceil_div(wp.out_h, 2) * ceil_div(wp.out_w, 2);
  const int threads = num_threads();
  // GEMM per ξ: M_ξ[out × in] += U_ξ[out × tiles] · V_ξ[tiles × in], both read in place: U_ξ's columns are the
  // rows of the transform's tile × out array.
  const MicroKernel<T> uk = pick_micro_kernel<T>(wp.out, wp.in);
  const int64_t ldv = padded_cols(wp.in, uk.nr), ldu = wp.out;
  // An item is a run of consecutive tiles of one group (across images), with V and U within about 512 KiB (so they
  // stay in L2 from the transforms through the GEMMs: measured faster than 128 KiB-2 MiB on ResNet and DeepMNIST
  // layers) but about 64 tiles or more (each GEMM reads and writes its out × in block of M once per item: with
  // many channels, shorter runs spend more on M than on the products). The runs are as many per thread (a
  // multiple of the threads, as near that budget as may be), so the threads' shares of tiles are equal: 196 tiles
  // as 64 + 64 | 64 + 4 kept one thread waiting for half its time.
  const int64_t budget = std::max<int64_t>(64, kScratchBytes / (16 * int64_t(sizeof(T)) * (ldv + ldu)));
  const int64_t per_thread = std::max<int64_t>(1, (tiles + threads * budget / 2) / (threads * budget));
  const int64_t run = ceil_div(tiles, std::min(tiles, threads * per_thread));
  const int64_t chunks = ceil_div(tiles, run), items = wp.groups * chunks;
  const int64_t parts = std::min<int64_t>(threads, items);
  // Part p sums the items [items*p/parts, items*(p+1)/parts) into its own M (every group's 16 blocks), and the parts
  // are added in order at the end: the result depends on the thread count only, not on the schedule.
  const int64_t m_size = wp.groups * 16 * wp.out * wp.in;
  // Scratch (scratch.h): a part's first item of a group writes its M (the GEMMs without accumulating), and the
  // groups a part has no item of are zeroed; V's padding columns (in..ldv) feed only M columns past `in`, never
  // stored; U and V rows past an item's tiles are never read.
  T* const partial = slot_scratch<T>(0, parts * m_size);
  const PerThread<T> vs(1, parts, 16 * run * ldv), us(2, parts, 16 * run * ldu);
  const std::vector<int64_t> v_rows = row_offsets(run, ldv);
  const auto transforms = by_isa(&PerIsa<&wgrad_transforms_body<T, 64>>::avx512,
                                 &PerIsa<&wgrad_transforms_body<T, 32>>::avx2,
                                 &PerIsa<&wgrad_transforms_body<T, 16>>::portable);

#pragma omp parallel for schedule(static, 1) num_threads(parts)
  for (int64_t p = 0; p < parts; ++p) {
    T* const v = vs.slice(p);
    T* const u = us.slice(p);
    const std::vector<T> zeros(std::max(wp.in, wp.out) + 64 / sizeof(T), T(0));  // plus a vector's read slack
    T* acc = partial + p * m_size;
    const int64_t first = items * p / parts, last = items * (p + 1) / parts;
    for (int64_t item = first; item < last; ++item) {
      const int64_t g = item / chunks, t0 = item % chunks * run, t1 = std::min(tiles, t0 + run);
      const bool accumulate = item > first && (item - 1) / chunks == g;
      transforms(wp, x, dy, g, t0, t1, zeros.data(), v, run * ldv, ldv, u, run * ldu, ldu);
      for (int64_t xi = 0; xi < 16; ++xi) {
        gemm_a_in_place(uk, wp.out, wp.in, t1 - t0, u + xi * run * ldu, ldu, v + xi * run * ldv,
                        v_rows.data(), acc + (g * 16 + xi) * wp.out * wp.in, wp.in, accumulate, Pad::kB);
      }
    }
    const int64_t group_size = 16 * wp.out * wp.in;
    for (int64_t g = 0; g < wp.groups; ++g) {
      const bool touched = first < last && g >= first / chunks && g <= (last - 1) / chunks;
      if (!touched) std::fill_n(acc + g * group_size, group_size, T(0));
    }
  }

  // The pairs in blocks of 256 per group, across the threads.
  constexpr int64_t kPairs = 256;
  const int64_t pairs = wp.out * wp.in, blocks = ceil_div(pairs, kPairs);
  const auto finish = by_isa(&PerIsa<&filter_gradients_body<T, 64>>::avx512,
                             &PerIsa<&filter_gradients_body<T, 32>>::avx2,
                             &PerIsa<&filter_gradients_body<T, 16>>::portable);
#pragma omp parallel for num_threads(threads)
  for (int64_t gb = 0; gb < wp.groups * blocks; ++gb) {
    const int64_t g = gb / blocks, e0 = gb % blocks * kPairs;
    finish(partial + g * 16 * pairs + e0, parts, m_size, pairs, std::min(kPairs, pairs - e0),
           dw + (g * pairs + e0) * 9);
  }
}

template void winograd_3x3<float>(const Winograd3x3&, const float*, const float*, bool, const float*, float*);
template void winograd_3x3<double>(const Winograd3x3&, const double*, const double*, bool, const double*, double*);
template void winograd_3x3_wgrad<float>(const Winograd3x3&, const float*, const float*, float*);
template void winograd_3x3_wgrad<double>(const Winograd3x3&, const double*, const double*, double*);

}  // namespace cnn_ext::cpu
