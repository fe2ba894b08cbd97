// The batch-in-lanes kernels (see conv2d_lanes.cpp), written once against a vector type `Vec` (lanes_vec.h: Avx512
// with 16 lanes, Avx2 with 8) and compiled once per ISA: conv2d_lanes.cpp includes this file twice, inside the
// namespaces avx512 and avx2, with `Vec` and LANES_TARGET (the ISA's target attribute) defined. Not a header to
// include elsewhere: it has no include guard on purpose, and includes nothing.

namespace {

using V = Vec::V;
using VI = Vec::VI;
using Mask = Vec::Mask;
constexpr int64_t L = Vec::L;  // images per block: the float lanes of a vector
// Register tiles: accumulators + operands within the register file.
constexpr int kFpropChannels = Vec::kFpropChannels;
constexpr int kWgradChannels = Vec::kWgradChannels;
constexpr int kWgradTaps = Vec::kWgradTaps;
constexpr int kDgradChannels = Vec::kDgradChannels;

// fn(n0, nb, i0, i1) for every item of a pass, across the threads: the block of nb <= L images from image n0 and
// rows [i0, i1) of `rows`, in chunks of `chunk` rows. Items write disjoint outputs, so any schedule gives the same
// bits.
template <typename Fn>
void for_each_item(int64_t n, int64_t rows, int64_t chunk, Fn&& fn) {
  const int64_t chunks = ceil_div(rows, chunk), items = ceil_div(n, L) * chunks;
#pragma omp parallel for schedule(dynamic) num_threads(at::get_num_threads())
  for (int64_t item = 0; item < items; ++item) {
    const int64_t n0 = item / chunks * L, i0 = item % chunks * chunk;
    fn(n0, std::min(L, n - n0), i0, std::min(rows, i0 + chunk));
  }
}

// The items of for_each_item in a fixed partition, for passes that reduce over them (wgrad): share t < threads takes
// items [items*t/threads, items*(t+1)/threads) in order, after begin(t), as fn(t, n0, nb, i0, i1); fn returns false
// to end its share early. Each share sums into its own partial, so results depend only on the thread count.
template <typename Begin, typename Fn>
void for_each_share(int64_t threads, int64_t n, int64_t rows, int64_t chunk, Begin&& begin, Fn&& fn) {
  const int64_t chunks = ceil_div(rows, chunk), items = ceil_div(n, L) * chunks;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t t = 0; t < threads; ++t) {
    begin(t);
    for (int64_t item = items * t / threads; item < items * (t + 1) / threads; ++item) {
      const int64_t n0 = item / chunks * L, i0 = item % chunks * chunk;
      if (!fn(t, n0, std::min(L, n - n0), i0, std::min(rows, i0 + chunk))) break;
    }
  }
}

// dst[ch][row - row0][col][lane] = image `lane` of src at plane ch, position (row - top, col - left); 0 in the
// padding and in lanes >= nb. Images are image_stride elements apart, planes h*w. Each run of L columns is L
// masked row loads (one per image) transposed in registers.
template <typename T>
LANES_TARGET void pack(const T* src, int64_t nb, int64_t image_stride, int64_t planes, int64_t h, int64_t w,
                        int64_t top, int64_t left, int64_t row0, int64_t row1, int64_t cols, float* dst) {
  const V zero = Vec::zero();
  if (top == 0 && left == 0 && cols == w && row0 >= 0 && row1 <= h) {
    // No padding: each plane's rows are one contiguous run on both sides, packed L positions at a time
    // regardless of row ends (short rows would otherwise leave most of each L-column group empty).
    const int64_t run = (row1 - row0) * w;
    for (int64_t ch = 0; ch < planes; ++ch, dst += run * L) {
      const T* s = src + (ch * h + row0) * w;
      for (int64_t i = 0; i < run; i += L) {
        if constexpr (std::is_same_v<T, float>) {
          if (nb == L && i + L <= run) {  // all L images and positions present: no masks needed
            for (int c = 0; c < L / 4; ++c) {
              V v[4];
              Vec::load_transposed_quarter(s + i, image_stride, c, v);
#pragma GCC unroll 4
              for (int d = 0; d < 4; ++d) Vec::store(dst + (i + 4 * c + d) * L, v[d]);
            }
            continue;
          }
        }
        const Mask m = Vec::first(std::min(L, run - i));
        V v[L];
        // Constant trip counts, fully unrolled, so that v[] stays in registers (a run-time index would spill it).
#pragma GCC unroll 16
        for (int lane = 0; lane < L; ++lane) v[lane] = lane < nb ? Vec::load_masked(s + lane * image_stride + i, m) : zero;
        Vec::transpose(v);
        const int64_t n = std::min(L, run - i);
#pragma GCC unroll 16
        for (int j = 0; j < L; ++j) {
          if (j < n) Vec::store(dst + (i + j) * L, v[j]);
        }
      }
    }
    return;
  }
  for (int64_t ch = 0; ch < planes; ++ch) {
    for (int64_t row = row0; row < row1; ++row, dst += cols * L) {
      const int64_t ih = row - top;
      if (ih < 0 || ih >= h) {
        for (int64_t col = 0; col < cols; ++col) Vec::store(dst + col * L, zero);
        continue;
      }
      const T* s = src + (ch * h + ih) * w;
      for (int64_t col0 = 0; col0 < cols; col0 += L) {
        // Columns col0 + j inside the image: left <= col0 + j < left + w.
        const int64_t lo = std::clamp<int64_t>(left - col0, 0, L), hi = std::clamp<int64_t>(left + w - col0, 0, L);
        const Mask inside = Vec::lanes(lo, hi);
        V v[L];
#pragma GCC unroll 16
        for (int lane = 0; lane < L; ++lane) {
          // Masked-off columns are not read, so the (possibly out-of-row) base address is never dereferenced there.
          v[lane] = lane < nb && hi > lo ? Vec::load_masked(s + lane * image_stride + (col0 - left), inside) : zero;
        }
        Vec::transpose(v);
        const int64_t n = std::min(L, cols - col0);
#pragma GCC unroll 16
        for (int j = 0; j < L; ++j) {
          if (j < n) Vec::store(dst + (col0 + j) * L, v[j]);
        }
      }
    }
  }
}

// dst[lane*image_stride + ch*plane_stride + i] = src[(ch*run + i)*L + lane] (+ bias[ch] when bias is not null)
// for lane < nb, ch < planes, i < run: the inverse of pack for destination planes whose run elements are
// contiguous. src needs L vectors of slack after its last plane (the last L-position group is loaded whole).
LANES_TARGET void unpack(const float* src, int64_t nb, int64_t planes, int64_t run, float* dst,
                          int64_t image_stride, int64_t plane_stride, const float* bias = nullptr) {
  for (int64_t ch = 0; ch < planes; ++ch) {
    const V b = Vec::set1(bias != nullptr ? bias[ch] : 0.0f);
    for (int64_t i = 0; i < run; i += L) {
      const Mask m = Vec::first(std::min(L, run - i));
      for (int c = 0; 4 * c < nb; ++c) {  // images 4c .. 4c + 3
        V v[4];
        Vec::load_transposed_quarter(src + (ch * run + i) * L, L, c, v);
#pragma GCC unroll 4
        for (int d = 0; d < 4; ++d) {
          const int64_t lane = 4 * c + d;
          if (lane < nb) {
            Vec::store_masked(dst + lane * image_stride + ch * plane_stride + i, m,
                                  bias != nullptr ? Vec::add(v[d], b) : v[d]);
          }
        }
      }
    }
  }
}

// unpack for int32 lanes widened to int64 (the pooling indices).
LANES_TARGET void unpack_index(const int32_t* src, int64_t nb, int64_t planes, int64_t run, int64_t* dst,
                                int64_t image_stride, int64_t plane_stride) {
  for (int64_t ch = 0; ch < planes; ++ch) {
    for (int64_t i = 0; i < run; i += L) {
      const Mask m = Vec::first(std::min(L, run - i));
      for (int c = 0; 4 * c < nb; ++c) {  // images 4c .. 4c + 3
        V v[4];
        Vec::load_transposed_quarter(reinterpret_cast<const float*>(src + (ch * run + i) * L), L, c, v);
#pragma GCC unroll 4
        for (int d = 0; d < 4; ++d) {
          const int64_t lane = 4 * c + d;
          if (lane >= nb) break;
          Vec::store_widened_masked(dst + lane * image_stride + ch * plane_stride + i, m, v[d]);
        }
      }
    }
  }
}

// The register tiles of fprop and dgrad: I × J accumulators, each step a rank-1 update acc[i][j] += b[j] * a[i]
// from J vectors at b, b + b_step, ... and I broadcast scalars a[0 .. I).
template <int I, int J>
LANES_TARGET inline void tile_zero(V (&acc)[I][J]) {
#pragma GCC unroll 16
  for (int i = 0; i < I; ++i) {
#pragma GCC unroll 4
    for (int j = 0; j < J; ++j) acc[i][j] = Vec::zero();
  }
}

template <int I, int J>
LANES_TARGET inline void tile_update(V (&acc)[I][J], const float* a, const float* b, int64_t b_step) {
  V bv[J];
#pragma GCC unroll 4
  for (int j = 0; j < J; ++j) bv[j] = Vec::load(b + j * b_step);
#pragma GCC unroll 16
  for (int i = 0; i < I; ++i) {
    const V av = Vec::set1(a[i]);
#pragma GCC unroll 4
    for (int j = 0; j < J; ++j) acc[i][j] = Vec::fma(bv[j], av, acc[i][j]);
  }
}

// acc[i][j] to out + i*row_step + j*L.
template <int I, int J>
LANES_TARGET inline void tile_store(const V (&acc)[I][J], float* out, int64_t row_step) {
#pragma GCC unroll 16
  for (int i = 0; i < I; ++i) {
#pragma GCC unroll 4
    for (int j = 0; j < J; ++j) Vec::store(out + i * row_step + j * L, acc[i][j]);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// fprop: y[k][p][q] = sum over taps (c, r, s) of W[k][c][r][s] * X_t[c][p*sh + r*dh][q*sw + s*dw] (+ bias[k]).
// ---------------------------------------------------------------------------------------------------------------

// Output channels [k0, k0 + KB) × columns [q, q + QB) of one output row: x is X_t at channel 0 and that output
// position's first tap (x_plane elements per channel, x_row per row), wt the packed weights at channel k0, y the
// first output vector (y_plane elements per channel). The bias is added later (unpack, or the pooling), off the
// FMA ports this loop saturates.
template <int KB, int QB>
LANES_TARGET void fprop_tile(const Geo& g, const float* x, int64_t x_plane, int64_t x_row, const float* wt,
                              float* y, int64_t y_plane) {
  V acc[KB][QB];
  tile_zero(acc);
  for (int64_t c = 0; c < g.c; ++c) {
    for (int64_t r = 0; r < g.r; ++r) {
      const float* xr = x + c * x_plane + r * g.dil_h * x_row;
      for (int64_t s = 0; s < g.s; ++s, wt += g.k) tile_update(acc, wt, xr + s * g.dil_w * L, g.stride_w * L);
    }
  }
  tile_store(acc, y, y_plane);
}

using FpropTile = void (*)(const Geo&, const float*, int64_t, int64_t, const float*, float*, int64_t);

template <int QB, int... KB>
constexpr std::array<FpropTile, sizeof...(KB)> fprop_tiles(std::integer_sequence<int, KB...>) {
  return {&fprop_tile<KB + 1, QB>...};
}

// Output rows [p0, p1) of a block into y_t[k][p - p0][q][lane] (no bias), from x_t holding the padded input rows
// from in_begin(p0) on (x_rows of them per channel).
void fprop_rows(const Geo& g, const float* x_t, int64_t x_rows, const float* wt, int64_t p0, int64_t p1,
                float* y_t) {
  static const auto pairs = fprop_tiles<2>(std::make_integer_sequence<int, kFpropChannels>());
  static const auto singles = fprop_tiles<1>(std::make_integer_sequence<int, kFpropChannels>());
  const int64_t x_row = g.wp * L, x_plane = x_rows * x_row, y_plane = (p1 - p0) * g.q * L;
  const int64_t k_step = ceil_div(g.k, ceil_div(g.k, kFpropChannels));  // even channel blocks
  for (int64_t p = p0; p < p1; ++p) {
    const float* xp = x_t + (p - p0) * g.stride_h * x_row;
    for (int64_t k0 = 0; k0 < g.k; k0 += k_step) {
      const int64_t kn = std::min(k_step, g.k - k0);
      float* yp = y_t + k0 * y_plane + (p - p0) * g.q * L;
      for (int64_t q = 0; q < g.q; q += 2) {
        const auto& tiles = g.q - q >= 2 ? pairs : singles;
        tiles[kn - 1](g, xp + q * g.stride_w * L, x_plane, x_row, wt + k0, yp + q * L, y_plane);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Fused max-pool + ReLU over conv rows in the lanes layout, with conv2d.cpp's pool_relu_rows semantics: windows
// clipped to the conv output, a value takes over when greater or NaN (ties keep the first tap in row-major window
// order), ReLU keeps NaN, a window wholly in padding gives 0 and index -1.
// ---------------------------------------------------------------------------------------------------------------

// Pooled rows [u0, u1) of every channel into out_t/idx_t[k][oh - u0][ow][lane], from conv rows y0, y0 + 1, ... in
// y_t (K planes of `rows` rows × Q × lanes, bias not yet added).
LANES_TARGET void pool_relu_rows(const Geo& g, const PoolShape<int64_t>& ps, const WindowAxis& prow,
                                  const WindowAxis& pcol, const float* y_t, int64_t y0, int64_t rows,
                                  const float* bias, int64_t u0, int64_t u1, float* out_t, int32_t* idx_t) {
  const V lowest = Vec::set1(-std::numeric_limits<float>::infinity());
  const V zero = Vec::zero();
  for (int64_t k = 0; k < g.k; ++k) {
    const V b = Vec::set1(bias != nullptr ? bias[k] : 0.0f);
    const float* plane = y_t + k * rows * g.q * L;
    for (int64_t oh = u0; oh < u1; ++oh) {
      const int64_t hb = prow.begin[oh], he = prow.end[oh];
      for (int64_t ow = 0; ow < ps.q; ++ow, out_t += L, idx_t += L) {
        const int64_t wb = pcol.begin[ow], we = pcol.end[ow];
        if (hb >= he || wb >= we) {
          Vec::store(out_t, zero);
          Vec::storei(idx_t, Vec::set1i(-1));
          continue;
        }
        V best = lowest;
        VI best_index = Vec::set1i(static_cast<int32_t>(hb * g.q + wb));
        for (int64_t h = hb; h < he; h += ps.dil_h) {
          for (int64_t w = wb; w < we; w += ps.dil_w) {
            const V v = Vec::add(Vec::load(plane + ((h - y0) * g.q + w) * L), b);
            const Mask take = Vec::takes_over(v, best);
            best = Vec::select(take, v, best);
            best_index = Vec::selecti(take, Vec::set1i(static_cast<int32_t>(h * g.q + w)), best_index);
          }
        }
        // ReLU: keep values > 0 and NaN (not <= 0, unordered), else +0.
        Vec::store(out_t, Vec::masked(Vec::keeps(best), best));
        Vec::storei(idx_t, best_index);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// wgrad: dW[k][c][r][s] = sum over images, output rows and columns of dY_t[k][p][q] * X_t[c][p*sh + r*dh][q*sw + s*dw].
// ---------------------------------------------------------------------------------------------------------------

// The lanes of v added pairwise in a fixed order.
LANES_TARGET inline float sum_lanes(V v) {
  float lane[L];
  Vec::store(lane, v);
  for (int64_t width = L / 2; width > 0; width /= 2) {
    for (int64_t i = 0; i < width; ++i) lane[i] += lane[i + width];
  }
  return lane[0];
}

// dw[kk*ldk + j] (a vector of per-lane sums: the lanes are added up once, at the end) += the sum for output
// channels [k0, k0 + KB) and taps (c, r, s0 + j), j < SB, over `rows`
// output rows: dy is dY_t at channel k0 and column 0 (dy_plane elements per channel, dy_row per row), x is X_t
// at channel c, padded row r*dh, column s0*dw (x_row elements per row).
template <int KB, int SB>
LANES_TARGET void wgrad_tile(const Geo& g, int64_t rows, const float* dy, int64_t dy_plane, int64_t dy_row,
                              const float* x, int64_t x_row, float* dw, int64_t ldk) {
  V acc[KB][SB];
  tile_zero(acc);
  for (int64_t i = 0; i < rows; ++i) {
    const float* dyi = dy + i * dy_row;
    const float* xi = x + i * g.stride_h * x_row;
    for (int64_t q = 0; q < g.q; ++q) {
      V d[KB];
#pragma GCC unroll 8
      for (int kk = 0; kk < KB; ++kk) d[kk] = Vec::load(dyi + kk * dy_plane + q * L);
      const float* xq = xi + q * g.stride_w * L;
#pragma GCC unroll 8
      for (int j = 0; j < SB; ++j) {
        const V xv = Vec::load(xq + j * g.dil_w * L);
#pragma GCC unroll 8
        for (int kk = 0; kk < KB; ++kk) acc[kk][j] = Vec::fma(d[kk], xv, acc[kk][j]);
      }
    }
  }
#pragma GCC unroll 8
  for (int kk = 0; kk < KB; ++kk) {
#pragma GCC unroll 8
    for (int j = 0; j < SB; ++j) {
      float* at = dw + (kk * ldk + j) * L;
      Vec::store(at, Vec::add(Vec::load(at), acc[kk][j]));
    }
  }
}

using WgradTile = void (*)(const Geo&, int64_t, const float*, int64_t, int64_t, const float*, int64_t, float*,
                           int64_t);

template <int KB, int... SB>
constexpr std::array<WgradTile, sizeof...(SB)> wgrad_tiles_row(std::integer_sequence<int, SB...>) {
  return {&wgrad_tile<KB, SB + 1>...};
}

template <int... KB>
constexpr std::array<std::array<WgradTile, kWgradTaps>, sizeof...(KB)> wgrad_tiles(std::integer_sequence<int, KB...>) {
  return {wgrad_tiles_row<KB + 1>(std::make_integer_sequence<int, kWgradTaps>())...};
}

// Adds one unit's contribution (output rows p0 + [0, rows) of a block, dy_t and x_t packed from those rows) to dw,
// K*C*R*S vectors of per-lane partial sums. dy_t rows are dy_cols columns wide, output column q at column dy_left + q.
void wgrad_unit(const Geo& g, int64_t rows, const float* dy_t, int64_t dy_cols, int64_t dy_left, const float* x_t,
                int64_t x_rows, float* dw) {
  static const auto tiles = wgrad_tiles(std::make_integer_sequence<int, kWgradChannels>());
  const int64_t dy_row = dy_cols * L, dy_plane = rows * dy_row, x_row = g.wp * L, x_plane = x_rows * x_row;
  const int64_t rs = g.r * g.s, ldk = g.c * rs;
  const int64_t k_step = ceil_div(g.k, ceil_div(g.k, kWgradChannels));  // even channel blocks
  for (int64_t k0 = 0; k0 < g.k; k0 += k_step) {
    const int64_t kn = std::min(k_step, g.k - k0);
    for (int64_t c = 0; c < g.c; ++c) {
      for (int64_t r = 0; r < g.r; ++r) {
        for (int64_t s0 = 0; s0 < g.s; s0 += kWgradTaps) {
          const int64_t sn = std::min<int64_t>(kWgradTaps, g.s - s0);
          tiles[kn - 1][sn - 1](g, rows, dy_t + k0 * dy_plane + dy_left * L, dy_plane, dy_row,
                                x_t + c * x_plane + r * g.dil_h * x_row + s0 * g.dil_w * L, x_row,
                                dw + (k0 * ldk + c * rs + r * g.s + s0) * L, ldk);
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// dgrad (stride 1): dX[c][h][w] = sum over the taps (r, s) and then k, with p = h + ph - r*dh in [0, P) and
// q = w + pw - s*dw in [0, Q) of W[k][c][r][s] * dY_t[k][p][q]. dY_t carries (S-1)*dw zero columns on the left
// (and zeros on the right), so a tile of two adjacent columns w, w + 1 can run the union of their taps: the
// taps only one of them has read zeros for the other.
// ---------------------------------------------------------------------------------------------------------------

// Input channels [c0, c0 + CB) × columns [w, w + WB) of one dX row over the taps r in [r0, r1), s in [s0, s1):
// at is the offset in dy_t of the tap (0, 0) for column w (the row p = h + ph, column q = w + pw, shifted by
// dY_t's left padding); wd is the packed weights at channel c0.
template <int CB, int WB>
LANES_TARGET void dgrad_tile(const Geo& g, const float* dy_t, int64_t at, int64_t dy_plane, int64_t dy_row,
                              int64_t r0, int64_t r1, int64_t s0, int64_t s1, const float* wd, float* dx,
                              int64_t dx_plane) {
  V acc[CB][WB];
  tile_zero(acc);
  // Output channels innermost: their count is fixed, while the tap ranges change from tile to tile (a short
  // inner loop of varying length would end in a mispredicted branch every few iterations).
  const int64_t w_step = g.r * g.s * g.c;
  for (int64_t r = r0; r < r1; ++r) {
    for (int64_t s = s0; s < s1; ++s) {
      const float* d = dy_t + at - r * g.dil_h * dy_row - s * g.dil_w * L;
      const float* wk = wd + (r * g.s + s) * g.c;
      for (int64_t k = 0; k < g.k; ++k, d += dy_plane, wk += w_step) tile_update(acc, wk, d, L);
    }
  }
  tile_store(acc, dx, dx_plane);
}

using DgradTile = void (*)(const Geo&, const float*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                           const float*, float*, int64_t);

template <int WB, int... CB>
constexpr std::array<DgradTile, sizeof...(CB)> dgrad_tiles(std::integer_sequence<int, CB...>) {
  return {&dgrad_tile<CB + 1, WB>...};
}

// dX rows [h0, h1) of a block into dx_t[c][h - h0][w][lane], from dy_t holding dY rows [p_lo, ...) with
// dy_cols columns of which the first (S-1)*dw are padding.
void dgrad_rows(const Geo& g, const float* dy_t, int64_t dy_rows, int64_t p_lo, int64_t dy_cols, const float* wd,
                int64_t h0, int64_t h1, float* dx_t) {
  static const auto pairs = dgrad_tiles<2>(std::make_integer_sequence<int, kDgradChannels>());
  static const auto singles = dgrad_tiles<1>(std::make_integer_sequence<int, kDgradChannels>());
  const int64_t dy_row = dy_cols * L, dy_plane = dy_rows * dy_row, dx_plane = (h1 - h0) * g.w * L;
  const int64_t left = (g.s - 1) * g.dil_w;
  const int64_t c_step = ceil_div(g.c, ceil_div(g.c, kDgradChannels));
  for (int64_t h = h0; h < h1; ++h) {
    const auto [r0, r1] = valid_taps(h, g.pad_h, g.dil_h, g.r, g.p);
    for (int64_t c0 = 0; c0 < g.c; c0 += c_step) {
      const int64_t cn = std::min(c_step, g.c - c0);
      float* dxh = dx_t + c0 * dx_plane + (h - h0) * g.w * L;
      for (int64_t w = 0; w < g.w; w += 2) {
        const int64_t wn = std::min<int64_t>(2, g.w - w);
        // The union of the columns' taps: [first tap of w, last tap of w + wn - 1].
        const int64_t s0 = valid_taps(w, g.pad_w, g.dil_w, g.s, g.q).first;
        const int64_t s1 = std::max(s0, valid_taps(w + wn - 1, g.pad_w, g.dil_w, g.s, g.q).second);
        const int64_t at = (h + g.pad_h - p_lo) * dy_row + (w + g.pad_w + left) * L;
        (wn == 2 ? pairs : singles)[cn - 1](g, dy_t, at, dy_plane, dy_row, r0, r1, s0, s1, wd + c0, dxh + w * L,
                                            dx_plane);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Fused backward of conv + max-pool + ReLU: the convolution's output gradient dY is built in the lanes layout
// straight from the pooled gradient (never as an NCHW tensor), then wgrad, the bias gradient and dgrad read it.
// ---------------------------------------------------------------------------------------------------------------

// dy_t[k][h][dy_left + w][lane] = the sum, in pooled-output order, of go over the pooled outputs of channel k whose
// index is h*Q + w and whose output is > 0 or NaN (ReLU's derivative, then max_pool2d_backward: the same adds in
// the same order as the unfused ops); every other element of dy_t is 0. Only the window's own taps are compared,
// so an index elsewhere (not -1) cannot be placed: returns false, and the caller takes the general path, which
// places or reports it. When the windows tile the plane (kernel = stride, no padding or dilation: MNIST's 2×2
// pooling) each position has at most one window, so its value is stored directly and only the positions outside
// every window are zeroed first; otherwise dy_t is zeroed and each window adds into it.
LANES_TARGET bool unpool_relu(const Geo& g, const PoolShape<int64_t>& ps, const WindowAxis& prow,
                               const WindowAxis& pcol, int64_t nb, const float* go_t, const float* out_t,
                               const float* idx_t, int64_t dy_cols, int64_t dy_left, float* dy_t) {
  const V zero = Vec::zero();
  const Mask used = Vec::first(nb);
  const int64_t dy_row = dy_cols * L, dy_plane = g.p * dy_row;
  const bool tiled = ps.kh == ps.stride_h && ps.kw == ps.stride_w && ps.pad_h == 0 && ps.pad_w == 0 &&
                     ps.dil_h == 1 && ps.dil_w == 1;
  if (tiled) {
    // Rows [0, rows) and columns [dy_left, dy_left + cols) are covered by windows.
    const int64_t rows = ps.p > 0 ? prow.end[ps.p - 1] : 0, cols = ps.q > 0 ? pcol.end[ps.q - 1] : 0;
    for (int64_t k = 0; k < g.k; ++k) {
      for (int64_t h = 0; h < g.p; ++h) {
        float* row = dy_t + k * dy_plane + h * dy_row;
        for (int64_t col = 0; col < dy_cols; ++col) {
          if (h >= rows || col < dy_left || col >= dy_left + cols) Vec::store(row + col * L, zero);
        }
      }
    }
  } else {
    for (int64_t i = 0; i < g.k * dy_plane; i += L) Vec::store(dy_t + i, zero);
  }
  for (int64_t k = 0; k < g.k; ++k) {
    float* plane = dy_t + k * dy_plane + dy_left * L;
    for (int64_t oh = 0; oh < ps.p; ++oh) {
      for (int64_t ow = 0; ow < ps.q; ++ow, go_t += L, out_t += L, idx_t += L) {
        const V grad = Vec::load(go_t);
        const VI index = Vec::loadi(reinterpret_cast<const int32_t*>(idx_t));
        const Mask keep = Vec::keeps(Vec::load(out_t));
        Mask placed = Vec::equal(index, Vec::set1i(-1));
        for (int64_t h = prow.begin[oh]; h < prow.end[oh]; h += ps.dil_h) {
          for (int64_t w = pcol.begin[ow]; w < pcol.end[ow]; w += ps.dil_w) {
            const Mask hit = Vec::equal(index, Vec::set1i(static_cast<int32_t>(h * g.q + w)));
            placed = Vec::mask_or(placed, hit);
            // Unconditionally (lanes that miss store 0, or their old value): which tap wins is data, a branch on
            // it would be mispredicted.
            float* at = plane + h * dy_row + w * L;
            if (tiled) {
              Vec::store(at, Vec::masked(Vec::mask_and(hit, keep), grad));
            } else {
              const V old = Vec::load(at);
              Vec::store(at, Vec::select(Vec::mask_and(hit, keep), Vec::add(old, grad), old));
            }
          }
        }
        if (Vec::misses(placed, used)) return false;
      }
    }
  }
  return true;
}

// db[k] (a vector of per-lane sums) += the sum of dy_t's channel k (rows of dy_cols columns, zero outside the
// output).
LANES_TARGET void bias_sums(const Geo& g, const float* dy_t, int64_t dy_cols, float* db) {
  const int64_t dy_plane = g.p * dy_cols * L;
  for (int64_t k = 0; k < g.k; ++k) {
    V acc = Vec::load(db + k * L);
    for (int64_t i = 0; i < dy_plane; i += L) acc = Vec::add(acc, Vec::load(dy_t + k * dy_plane + i));
    Vec::store(db + k * L, acc);
  }
}

// out[i] = the sum of vector i over the first `parts` slices of partial (slice order), then of its lanes (fixed
// pairwise order), for i < n; nothing when out is null.
LANES_TARGET void add_partials(const PerThread<float>& partial, int64_t parts, int64_t n, float* out) {
  if (out == nullptr) return;
  for (int64_t i = 0; i < n; ++i) {
    V v = Vec::load(partial.slice(0) + i * L);
    for (int64_t t = 1; t < parts; ++t) v = Vec::add(v, Vec::load(partial.slice(t) + i * L));
    out[i] = sum_lanes(v);
  }
}

}  // namespace

// The entry points, as conv2d_lanes.h declares them, for this ISA.
void conv2d_forward(const ConvShape<int64_t>& cs, const float* x, const float* w, const float* bias, float* y) {
  const Geo g(cs);
  const std::vector<float> wt = pack_taps(g, w);
  const int64_t rows = rows_per_item(ceil_div(g.n, L), g.p), x_rows = g.in_end(rows) - g.in_begin(0);
  const int threads = at::get_num_threads();
  CallScratch scratch;
  const auto x_ts = scratch.per_thread<float>(threads, g.c * x_rows * g.wp * L);
  const auto y_ts = scratch.per_thread<float>(threads, g.k * rows * g.q * L + kSlack);
  for_each_item(g.n, g.p, rows, [&](int64_t n0, int64_t nb, int64_t p0, int64_t p1) {
    float* x_t = x_ts.get();
    float* y_t = y_ts.get();
    const int64_t r0 = g.in_begin(p0), r1 = g.in_end(p1);
    pack(x + n0 * g.c * g.h * g.w, nb, g.c * g.h * g.w, g.c, g.h, g.w, g.pad_h, g.pad_w, r0, r1, g.wp, x_t);
    fprop_rows(g, x_t, r1 - r0, wt.data(), p0, p1, y_t);
    unpack(y_t, nb, g.k, (p1 - p0) * g.q, y + n0 * g.k * g.p * g.q + p0 * g.q, g.k * g.p * g.q, g.p * g.q, bias);
  });
}

void conv2d_maxpool_relu(const ConvShape<int64_t>& cs, const PoolShape<int64_t>& ps, const float* x, const float* w,
                         const float* bias, float* out, int64_t* idx) {
  const Geo g(cs);
  const WindowAxis prow(ps.p, ps.h, ps.kh, ps.stride_h, ps.pad_h, ps.dil_h);
  const WindowAxis pcol(ps.q, ps.w, ps.kw, ps.stride_w, ps.pad_w, ps.dil_w);
  const std::vector<float> wt = pack_taps(g, w);
  const int64_t urows = rows_per_item(ceil_div(g.n, L), ps.p), chunks = ceil_div(ps.p, urows);
  int64_t rows_cap = 1;  // most conv rows any item needs
  for (int64_t ci = 0; ci < chunks; ++ci) {
    const auto [y0, y1] = prow.span(ci * urows, std::min(ps.p, (ci + 1) * urows));
    rows_cap = std::max(rows_cap, y1 - y0);
  }
  const int64_t x_rows = g.in_end(rows_cap) - g.in_begin(0);
  const int64_t out_plane = ps.p * ps.q;
  const int threads = at::get_num_threads();
  CallScratch scratch;
  const auto x_ts = scratch.per_thread<float>(threads, g.c * x_rows * g.wp * L);
  const auto y_ts = scratch.per_thread<float>(threads, g.k * rows_cap * g.q * L);
  const auto out_ts = scratch.per_thread<float>(threads, g.k * urows * ps.q * L + kSlack);
  const auto idx_ts = scratch.per_thread<int32_t>(threads, g.k * urows * ps.q * L + kSlack);
  for_each_item(g.n, ps.p, urows, [&](int64_t n0, int64_t nb, int64_t u0, int64_t u1) {
    float* x_t = x_ts.get();
    float* y_t = y_ts.get();
    float* out_t = out_ts.get();
    int32_t* idx_t = idx_ts.get();
    const auto [y0, y1] = prow.span(u0, u1);
    if (y0 < y1) {
      const int64_t r0 = g.in_begin(y0), r1 = g.in_end(y1);
      pack(x + n0 * g.c * g.h * g.w, nb, g.c * g.h * g.w, g.c, g.h, g.w, g.pad_h, g.pad_w, r0, r1, g.wp, x_t);
      fprop_rows(g, x_t, r1 - r0, wt.data(), y0, y1, y_t);
    }
    pool_relu_rows(g, ps, prow, pcol, y_t, y0, y1 - y0, bias, u0, u1, out_t, idx_t);
    const int64_t at = n0 * g.k * out_plane + u0 * ps.q, run = (u1 - u0) * ps.q;
    unpack(out_t, nb, g.k, run, out + at, g.k * out_plane, out_plane);
    unpack_index(idx_t, nb, g.k, run, idx + at, g.k * out_plane, out_plane);
  });
}

void conv2d_backward_input(const ConvShape<int64_t>& cs, const float* dy, const float* w, float* dx) {
  const Geo g(cs);
  const std::vector<float> wd = pack_taps_dgrad(g, w);
  const int64_t rows = rows_per_item(ceil_div(g.n, L), g.h);
  const int64_t left = (g.s - 1) * g.dil_w, dy_cols = g.w + g.pad_w + 2 * left;
  const int64_t dy_rows_cap = std::min(g.p, rows + (g.r - 1) * g.dil_h);
  const int threads = at::get_num_threads();
  CallScratch scratch;
  const auto dy_ts = scratch.per_thread<float>(threads, g.k * dy_rows_cap * dy_cols * L);
  const auto dx_ts = scratch.per_thread<float>(threads, g.c * rows * g.w * L + kSlack);
  for_each_item(g.n, g.h, rows, [&](int64_t n0, int64_t nb, int64_t h0, int64_t h1) {
    float* dy_t = dy_ts.get();
    float* dx_t = dx_ts.get();
    // The dY rows these dX rows read.
    const int64_t p_lo = std::clamp<int64_t>(h0 + g.pad_h - (g.r - 1) * g.dil_h, 0, g.p);
    const int64_t p_hi = std::clamp<int64_t>(h1 + g.pad_h, p_lo, g.p);
    pack(dy + n0 * g.k * g.p * g.q, nb, g.k * g.p * g.q, g.k, g.p, g.q, 0, left, p_lo, p_hi, dy_cols, dy_t);
    dgrad_rows(g, dy_t, p_hi - p_lo, p_lo, dy_cols, wd.data(), h0, h1, dx_t);
    unpack(dx_t, nb, g.c, (h1 - h0) * g.w, dx + n0 * g.c * g.h * g.w + h0 * g.w, g.c * g.h * g.w, g.h * g.w);
  });
}

void conv2d_backward_weight(const ConvShape<int64_t>& cs, const float* dy, const float* x, float* dw) {
  const Geo g(cs);
  const int64_t rows = rows_per_item(ceil_div(g.n, L), g.p), size = g.k * g.c * g.r * g.s;
  const int64_t x_rows = g.in_end(rows) - g.in_begin(0);
  const int64_t threads = at::get_num_threads();
  CallScratch scratch;
  const auto partial = scratch.per_thread<float>(threads, size * L);
  const auto x_ts = scratch.per_thread<float>(threads, g.c * x_rows * g.wp * L);
  const auto dy_ts = scratch.per_thread<float>(threads, g.k * rows * g.q * L);
  for_each_share(
      threads, g.n, g.p, rows, [&](int64_t t) { std::fill_n(partial.slice(t), size * L, 0.0f); },
      [&](int64_t t, int64_t n0, int64_t nb, int64_t p0, int64_t p1) {
        float* x_t = x_ts.get();
        float* dy_t = dy_ts.get();
        const int64_t r0 = g.in_begin(p0), r1 = g.in_end(p1);
        pack(dy + n0 * g.k * g.p * g.q, nb, g.k * g.p * g.q, g.k, g.p, g.q, 0, 0, p0, p1, g.q, dy_t);
        pack(x + n0 * g.c * g.h * g.w, nb, g.c * g.h * g.w, g.c, g.h, g.w, g.pad_h, g.pad_w, r0, r1, g.wp, x_t);
        wgrad_unit(g, p1 - p0, dy_t, g.q, 0, x_t, r1 - r0, partial.slice(t));
        return true;
      });
  add_partials(partial, threads, size, dw);
}

bool conv2d_maxpool_relu_backward(const ConvShape<int64_t>& cs, const PoolShape<int64_t>& ps, const float* go,
                                  const float* out, const int64_t* idx, const float* x, const float* w, float* dx,
                                  float* dw, float* db) {
  const Geo g(cs);
  const WindowAxis prow(ps.p, ps.h, ps.kh, ps.stride_h, ps.pad_h, ps.dil_h);
  const WindowAxis pcol(ps.q, ps.w, ps.kw, ps.stride_w, ps.pad_w, ps.dil_w);
  const std::vector<float> wd = dx != nullptr ? pack_taps_dgrad(g, w) : std::vector<float>();
  // dY rows as dgrad reads them (zero columns either side) when it runs, else just the Q columns.
  const int64_t dy_left = dx != nullptr ? (g.s - 1) * g.dil_w : 0;
  const int64_t dy_cols = dx != nullptr ? g.w + g.pad_w + 2 * dy_left : g.q;
  const int64_t pooled = g.k * ps.p * ps.q, x_rows = g.hp, crs = g.c * g.r * g.s;
  const int64_t threads = at::get_num_threads();
  // Whole blocks per item (dY_t is built once per block); wgrad and bias partials per share, as in
  // conv2d_backward_weight.
  CallScratch scratch;
  const auto partial_w = scratch.per_thread<float>(threads, dw != nullptr ? g.k * crs * L : 0);
  const auto partial_b = scratch.per_thread<float>(threads, db != nullptr ? g.k * L : 0);
  std::atomic<bool> placed{true};
  const auto go_ts = scratch.per_thread<float>(threads, pooled * L);
  const auto out_ts = scratch.per_thread<float>(threads, pooled * L);
  const auto idx_ts = scratch.per_thread<float>(threads, pooled * L);
  const auto dy_ts = scratch.per_thread<float>(threads, g.k * g.p * dy_cols * L);
  const auto x_ts = scratch.per_thread<float>(threads, dw != nullptr ? g.c * x_rows * g.wp * L : 0);
  const auto dx_ts = scratch.per_thread<float>(threads, dx != nullptr ? g.c * g.h * g.w * L + kSlack : 0);
  for_each_share(
      threads, g.n, g.p, g.p,
      [&](int64_t t) {
        if (dw != nullptr) std::fill_n(partial_w.slice(t), g.k * crs * L, 0.0f);
        if (db != nullptr) std::fill_n(partial_b.slice(t), g.k * L, 0.0f);
      },
      [&](int64_t t, int64_t n0, int64_t nb, int64_t, int64_t) {
        float* go_t = go_ts.get();
        float* out_t = out_ts.get();
        float* idx_t = idx_ts.get();
        float* dy_t = dy_ts.get();
        pack(go + n0 * pooled, nb, pooled, g.k, ps.p, ps.q, 0, 0, 0, ps.p, ps.q, go_t);
        pack(out + n0 * pooled, nb, pooled, g.k, ps.p, ps.q, 0, 0, 0, ps.p, ps.q, out_t);
        pack(idx + n0 * pooled, nb, pooled, g.k, ps.p, ps.q, 0, 0, 0, ps.p, ps.q, idx_t);
        if (!placed || !unpool_relu(g, ps, prow, pcol, nb, go_t, out_t, idx_t, dy_cols, dy_left, dy_t)) {
          placed = false;
          return false;
        }
        if (db != nullptr) bias_sums(g, dy_t, dy_cols, partial_b.slice(t));
        if (dw != nullptr) {
          float* x_t = x_ts.get();
          pack(x + n0 * g.c * g.h * g.w, nb, g.c * g.h * g.w, g.c, g.h, g.w, g.pad_h, g.pad_w, 0, x_rows, g.wp, x_t);
          wgrad_unit(g, g.p, dy_t, dy_cols, dy_left, x_t, x_rows, partial_w.slice(t));
        }
        if (dx != nullptr) {
          float* dx_t = dx_ts.get();
          dgrad_rows(g, dy_t, g.p, 0, dy_cols, wd.data(), 0, g.h, dx_t);
          unpack(dx_t, nb, g.c, g.h * g.w, dx + n0 * g.c * g.h * g.w, g.c * g.h * g.w, g.h * g.w);
        }
        return true;
      });
  if (!placed) return false;
  add_partials(partial_w, threads, g.k * crs, dw);
  add_partials(partial_b, threads, g.k, db);
  return true;
}
