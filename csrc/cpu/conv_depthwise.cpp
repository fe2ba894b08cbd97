// Depthwise convolutions (see conv_depthwise.h for the method). Every routine works on one plane (forward, input
// gradient) or one channel (weight gradient) at a time, through phase-split copies of its rows in thread scratch;
// the row loops run in whole vectors of the ISA in use (GCC vector types, as in gemm.h), compiled per ISA.
#include "conv_depthwise.h"

#include <algorithm>
#include <vector>

#include "gemm.h"
#include "isa.h"

namespace cnn_ext::cpu {
namespace {

// d[j] = src[j*sw] for j < n, the stride a template argument where it is 2 (so the copy vectorises).
template <int SW, typename T>
inline __attribute__((always_inline)) void strided_copy(T* d, const T* src, int64_t n, int64_t sw) {
  const int64_t step = SW > 0 ? SW : sw;
  for (int64_t j = 0; j < n; ++j) d[j] = src[j * step];
}

// Output rows are computed kRows at a time, with a register accumulator per row, so that the multiply-adds of
// consecutive taps do not wait on each other (one vector per row on small planes would otherwise chain all R·S of
// them). The row blocks past the last output row read zero rows of the scratch copies and are not stored.
constexpr int64_t kRows = 4;

// The phase-split copy of one input plane read by the forward and the weight gradient: row a is padded row a
// (input row a - pad_h), each of its sw phases `len` elements long, zero outside the input. Tap (r, s) of output
// row p reads row p·sh + r·dh, phase (s·dw) % sw, from element (s·dw) / sw: `tap[r*S + s]` is that position's
// offset for p = 0 and `row_step` its increment per output row. Rows cover whole blocks of kRows output rows.
// Every plane fills the same interior positions, so a zeroed buffer keeps its zero border from plane to plane.
struct PhaseWindow {
  int64_t rows, phases, len, row_step;
  std::vector<int64_t> tap;
  std::vector<int64_t> first, last;  // per phase: the elements [first, last) that lie inside the input's columns

  PhaseWindow(const Conv& cv, int64_t q_vec)
      : rows((detail::round_up(cv.p, kRows) - 1) * cv.stride_h + (cv.r - 1) * cv.dil_h + 1),
        phases(cv.stride_w),
        len((cv.s - 1) * cv.dil_w / cv.stride_w + q_vec),
        row_step(cv.stride_h * cv.stride_w * len),
        tap(cv.rs),
        first(phases),
        last(phases) {
    for (int64_t r = 0; r < cv.r; ++r) {
      for (int64_t s = 0; s < cv.s; ++s) {
        const int64_t u = s * cv.dil_w;
        tap[r * cv.s + s] = (r * cv.dil_h * phases + u % phases) * len + u / phases;
      }
    }
    for (int64_t ph = 0; ph < phases; ++ph) {  // element j is input column j·sw + ph - pad_w
      first[ph] = std::min(len, first_reaching(0, ph - cv.pad_w, cv.stride_w));
      last[ph] = std::clamp(first_reaching(cv.w, ph - cv.pad_w, cv.stride_w), first[ph], len);
    }
  }
  int64_t size() const { return rows * phases * len; }

  // Copies the plane's interior into `win` (zero-initialised before its first plane).
  template <typename T>
  inline __attribute__((always_inline)) void fill(const Conv& cv, const T* plane, T* win) const {
    const int64_t sw = cv.stride_w;
    for (int64_t h = 0; h < cv.h && h + cv.pad_h < rows; ++h) {
      const T* row = plane + h * cv.w;
      for (int64_t ph = 0; ph < phases; ++ph) {
        const int64_t n = last[ph] - first[ph];
        if (n <= 0) continue;
        T* d = win + ((h + cv.pad_h) * phases + ph) * len + first[ph];
        const T* src = row + first[ph] * sw + ph - cv.pad_w;
        if (sw == 1) {
          copy_row(d, src, n);
        } else if (sw == 2) {
          strided_copy<2>(d, src, n, sw);
        } else {
          strided_copy<0>(d, src, n, sw);
        }
      }
    }
  }
};

// The output row length the forward and weight gradient compute: Q rounded up to whole vectors.
template <typename T, int Bytes>
int64_t q_vec(const Conv& cv) {
  return detail::round_up(cv.q, Vector<T, Bytes>::kLanes);
}

// One output plane: y[p][q] = bias + sum over taps of w[tap] * window(tap, p)[q]; `lines` holds kRows rows of qv.
template <typename T, int Bytes>
inline __attribute__((always_inline)) void forward_plane(const Conv& cv, const PhaseWindow& pw, const T* x,
                                                         const T* w, T bias, T* y, T* win, T* lines) {
  using L = Vector<T, Bytes>;
  using V = typename L::V;
  const int64_t qv = q_vec<T, Bytes>(cv);
  pw.fill(cv, x, win);
  for (int64_t p0 = 0; p0 < cv.p; p0 += kRows) {
    const T* base = win + p0 * pw.row_step;
    for (int64_t q = 0; q < qv; q += L::kLanes) {
      V acc[kRows];
#pragma GCC unroll 4
      for (int64_t i = 0; i < kRows; ++i) acc[i] = V{} + bias;
      for (int64_t t = 0; t < cv.rs; ++t) {
        const T* src = base + pw.tap[t] + q;
        const T wt = w[t];
#pragma GCC unroll 4
        for (int64_t i = 0; i < kRows; ++i) acc[i] += L::load(src + i * pw.row_step) * wt;
      }
#pragma GCC unroll 4
      for (int64_t i = 0; i < kRows; ++i) L::store(lines + i * qv + q, acc[i]);
    }
    for (int64_t i = 0; i < std::min(kRows, cv.p - p0); ++i) {
      copy_row(y + (p0 + i) * cv.q, lines + i * qv, cv.q);
    }
  }
}

// The input gradient's geometry. dX's padded column u = j·sw + φ, j < j_vec. dY's rows are copied with `lead`
// zeros before and zeros after (dy_len in all), so that tap s (offset (s·dw) / sw) reads dY's column j - offset
// at lead - offset + j; and with `top` zero rows before and zero rows after (dy_rows in all), so that every row
// block reads whole rows.
struct GradGeometry {
  int64_t lead, j_vec, dy_len, top, dy_rows;

  template <typename T, int Bytes>
  static GradGeometry of(const Conv& cv) {
    const int64_t lead = (cv.s - 1) * cv.dil_w / cv.stride_w;
    const int64_t j_vec = detail::round_up(ceil_div(cv.w + cv.pad_w, cv.stride_w), Vector<T, Bytes>::kLanes);
    const int64_t top = ceil_div((cv.r - 1) * cv.dil_h, cv.stride_h);
    const int64_t rows = top + std::max(cv.p, (cv.h - 1 + cv.pad_h) / cv.stride_h + kRows);
    return {lead, j_vec, lead + std::max(j_vec, cv.q), top, rows};
  }
};

// One input-gradient plane. dX's rows h ≡ ρ (mod sh) are taken kRows at a time (h0, h0 + sh, ...): they share their
// taps r (those with (h0 + pad_h - r·dh) a multiple of sh), which read consecutive dY rows p0, p0 + 1, ...; per
// phase φ of the columns, the taps s with (s·dw) % sw = φ. The phases are then interleaved into dX's rows.
// `dy_rows` is zero-initialised before the first plane (planes copy the same interior); `lines` holds kRows × sw
// rows of j_vec, then 2·j_vec for merging two phases.
template <typename T, int Bytes>
inline __attribute__((always_inline)) void backward_input_plane(const Conv& cv, const GradGeometry& gg,
                                                                const T* dy, const T* w, T* dx, T* dy_rows,
                                                                T* lines) {
  using L = Vector<T, Bytes>;
  using V = typename L::V;
  const int64_t sh = cv.stride_h, sw = cv.stride_w;
  for (int64_t p = 0; p < cv.p; ++p) copy_row(dy_rows + (gg.top + p) * gg.dy_len + gg.lead, dy + p * cv.q, cv.q);
  for (int64_t rho = 0; rho < std::min(sh, cv.h); ++rho) {
    for (int64_t h0 = rho; h0 < cv.h; h0 += kRows * sh) {
      for (int64_t phase = 0; phase < sw; ++phase) {
        for (int64_t j = 0; j < gg.j_vec; j += L::kLanes) {
          V acc[kRows] = {};
          for (int64_t r = 0; r < cv.r; ++r) {
            const int64_t shifted = h0 + cv.pad_h - r * cv.dil_h + gg.top * sh;  // >= 0: top covers ·dh
            if (shifted % sh != 0) continue;
            const T* row = dy_rows + shifted / sh * gg.dy_len + gg.lead + j;
            for (int64_t s = 0; s < cv.s; ++s) {
              const int64_t u = s * cv.dil_w;
              if (u % sw != phase) continue;
              const T* src = row - u / sw;
              const T wt = w[r * cv.s + s];
#pragma GCC unroll 4
              for (int64_t i = 0; i < kRows; ++i) acc[i] += L::load(src + i * gg.dy_len) * wt;
            }
          }
#pragma GCC unroll 4
          for (int64_t i = 0; i < kRows; ++i) L::store(lines + (i * sw + phase) * gg.j_vec + j, acc[i]);
        }
      }
      for (int64_t i = 0; i < kRows && h0 + i * sh < cv.h; ++i) {
        T* out = dx + (h0 + i * sh) * cv.w;
        const T* block = lines + i * sw * gg.j_vec;
        if (sw == 1) {
          copy_row(out, block + cv.pad_w, cv.w);
          continue;
        }
        if (sw == 2) {  // interleave the two phases (a loop that vectorises), then copy the row out
          T* merged = lines + kRows * sw * gg.j_vec;
          const T* even = block;
          const T* odd = block + gg.j_vec;
          for (int64_t j = 0; j < gg.j_vec; ++j) {
            merged[2 * j] = even[j];
            merged[2 * j + 1] = odd[j];
          }
          copy_row(out, merged + cv.pad_w, cv.w);
          continue;
        }
        for (int64_t phase = 0; phase < sw; ++phase) {  // dX column u - pad_w for u = j·sw + phase
          const T* line = block + phase * gg.j_vec;
          for (int64_t j = first_reaching(0, phase - cv.pad_w, sw), col = j * sw + phase - cv.pad_w; col < cv.w;
               ++j, col += sw) {
            out[col] = line[j];
          }
        }
      }
    }
  }
}

// One image's share of the weight gradient of one channel: acc[tap] (a vector of lane sums) += the dot product of
// dY's rows with the window rows the tap reads. Taps go kTaps at a time, so each dY vector loaded serves kTaps
// products (`taps` is PhaseWindow::tap padded to whole groups with tap 0, whose extra sums are dropped).
// `dy_rows` holds round_up(P, kRows) rows of qv, zero past P × Q.
constexpr int64_t kTaps = 3;

template <typename T, int Bytes>
inline __attribute__((always_inline)) void backward_weight_image(const Conv& cv, const PhaseWindow& pw,
                                                                 const int64_t* taps, const T* dy, const T* x, T* acc,
                                                                 T* win, T* dy_rows) {
  using L = Vector<T, Bytes>;
  using V = typename L::V;
  const int64_t qv = q_vec<T, Bytes>(cv);
  pw.fill(cv, x, win);
  for (int64_t p = 0; p < cv.p; ++p) copy_row(dy_rows + p * qv, dy + p * cv.q, cv.q);
  for (int64_t t0 = 0; t0 < cv.rs; t0 += kTaps) {
    V sums[kTaps][kRows] = {};
    for (int64_t p0 = 0; p0 < cv.p; p0 += kRows) {
      const T* src[kTaps];
#pragma GCC unroll 4
      for (int64_t k = 0; k < kTaps; ++k) src[k] = win + p0 * pw.row_step + taps[t0 + k];
      const T* d = dy_rows + p0 * qv;
      for (int64_t q = 0; q < qv; q += L::kLanes) {
#pragma GCC unroll 4
        for (int64_t i = 0; i < kRows; ++i) {
          const V dv = L::load(d + i * qv + q);
#pragma GCC unroll 4
          for (int64_t k = 0; k < kTaps; ++k) sums[k][i] += dv * L::load(src[k] + i * pw.row_step + q);
        }
      }
    }
    for (int64_t k = 0; k < kTaps && t0 + k < cv.rs; ++k) {
      V total = L::load(acc + (t0 + k) * L::kLanes);
      for (int64_t i = 0; i < kRows; ++i) total += sums[k][i];
      L::store(acc + (t0 + k) * L::kLanes, total);
    }
  }
}

// The three routines compiled per vector width (PerIsa): 64 bytes with AVX-512, 32 with AVX2, 16 portable.
template <typename T>
struct Kernels {
  // The vector width for rows of `row` elements: the ISA's, or half of it (still a width this CPU runs) when a
  // row fits in half a vector, so that short rows (7x7 planes) do not waste most of every vector.
  static int bytes(int64_t row) {
    const int widest = vector_bytes();
    return widest > 16 && row * static_cast<int64_t>(sizeof(T)) <= widest / 2 ? widest / 2 : widest;
  }
  template <typename Fn>
  static Fn of_width(int bytes, Fn at64, Fn at32, Fn at16) {
    return bytes == 64 ? at64 : bytes == 32 ? at32 : at16;
  }
  // Body<64> compiled for AVX-512, Body<32> for AVX2, Body<16> portable: the variant for `bytes`.
  template <auto Body64, auto Body32, auto Body16>
  static auto variant(int bytes) {
    return of_width(bytes, &PerIsa<Body64>::avx512, &PerIsa<Body32>::avx2, &PerIsa<Body16>::portable);
  }
  static auto forward(int bytes) {
    return variant<&forward_plane<T, 64>, &forward_plane<T, 32>, &forward_plane<T, 16>>(bytes);
  }
  static auto backward_input(int bytes) {
    return variant<&backward_input_plane<T, 64>, &backward_input_plane<T, 32>, &backward_input_plane<T, 16>>(bytes);
  }
  static auto backward_weight(int bytes) {
    return variant<&backward_weight_image<T, 64>, &backward_weight_image<T, 32>, &backward_weight_image<T, 16>>(
        bytes);
  }
  static GradGeometry grad_geometry(int bytes, const Conv& cv) {
    return of_width(bytes, &GradGeometry::of<T, 64>, &GradGeometry::of<T, 32>, &GradGeometry::of<T, 16>)(cv);
  }
};

}  // namespace

bool depthwise_serves(const Conv& cv) {
  if (cv.cg != 1 || cv.kg != 1) return false;
  // PhaseWindow's and GradGeometry's sizes, in double (no overflow whatever the stride, padding or dilation), with a
  // vector's worth of padding per row.
  const double sh = double(cv.stride_h), sw = double(cv.stride_w), vec = 16;
  const double reach_h = double(cv.r - 1) * double(cv.dil_h), reach_w = double(cv.s - 1) * double(cv.dil_w);
  const double window = (double(cv.p + kRows) * sh + reach_h + 1) * sw * (reach_w / sw + double(cv.q) + vec);
  const double j_vec = (double(cv.w) + double(cv.pad_w)) / sw + 1 + vec;
  const double grad = (reach_h / sh + 1 + std::max(double(cv.p), (double(cv.h) + double(cv.pad_h)) / sh + kRows)) *
                          (reach_w / sw + std::max(j_vec, double(cv.q))) +
                      (kRows + 2) * sw * j_vec;
  const double limit = 4 * double(cv.hw + cv.pq) + 65536;
  return window <= limit && grad <= limit;
}

template <typename T>
void depthwise_forward(const Conv& cv, const T* x, const T* w, const T* bias, T* y) {
  const int bytes = Kernels<T>::bytes(cv.q);
  const int64_t qv = detail::round_up(cv.q, bytes / int64_t(sizeof(T)));
  const PhaseWindow pw(cv, qv);
  const auto fn = Kernels<T>::forward(bytes);
  const int64_t planes = cv.n * cv.c;
#pragma omp parallel num_threads(num_threads())
  {
    std::vector<T> win(pw.size()), lines(kRows * qv);
#pragma omp for schedule(static)
    for (int64_t plane = 0; plane < planes; ++plane) {
      const int64_t c = plane % cv.c;
      fn(cv, pw, x + plane * cv.hw, w + c * cv.rs, bias != nullptr ? bias[c] : T(0), y + plane * cv.pq, win.data(),
         lines.data());
    }
  }
}

template <typename T>
void depthwise_backward_input(const Conv& cv, const T* dy, const T* w, T* dx) {
  const int bytes = Kernels<T>::bytes(ceil_div(cv.w + cv.pad_w, cv.stride_w));  // GradGeometry's row
  const GradGeometry gg = Kernels<T>::grad_geometry(bytes, cv);
  const auto fn = Kernels<T>::backward_input(bytes);
  const int64_t planes = cv.n * cv.c;
#pragma omp parallel num_threads(num_threads())
  {
    std::vector<T> rows(gg.dy_rows * gg.dy_len), lines((kRows + 2) * cv.stride_w * gg.j_vec);
#pragma omp for schedule(static)
    for (int64_t plane = 0; plane < planes; ++plane) {
      fn(cv, gg, dy + plane * cv.pq, w + plane % cv.c * cv.rs, dx + plane * cv.hw, rows.data(), lines.data());
    }
  }
}

template <typename T>
void depthwise_backward_weight(const Conv& cv, const T* dy, const T* x, T* dw) {
  const int bytes = Kernels<T>::bytes(cv.q);
  const int64_t lanes = bytes / int64_t(sizeof(T)), qv = detail::round_up(cv.q, lanes);
  const PhaseWindow pw(cv, qv);
  const auto fn = Kernels<T>::backward_weight(bytes);
  std::vector<int64_t> taps(pw.tap);
  taps.resize(detail::round_up(cv.rs, kTaps), pw.tap[0]);
  // Task (c, chunk) sums the images of its chunk into partial[chunk][c] (lane sums per tap); with few channels the
  // images are split into chunks so that every thread has work. Chunks and lanes are added in a fixed order.
  const int64_t chunks = std::clamp<int64_t>(ceil_div(2 * num_threads(), cv.c), 1, cv.n);
  const int64_t per_channel = cv.rs * lanes;
  std::vector<T> partial(chunks * cv.c * per_channel, T(0));
#pragma omp parallel num_threads(num_threads())
  {
    std::vector<T> win(pw.size()), dy_rows(detail::round_up(cv.p, kRows) * qv);  // zero past P × Q
#pragma omp for schedule(static)
    for (int64_t task = 0; task < chunks * cv.c; ++task) {
      const int64_t chunk = task / cv.c, c = task % cv.c;
      T* acc = partial.data() + task * per_channel;
      for (int64_t img = cv.n * chunk / chunks; img < cv.n * (chunk + 1) / chunks; ++img) {
        const int64_t plane = img * cv.c + c;
        fn(cv, pw, taps.data(), dy + plane * cv.pq, x + plane * cv.hw, acc, win.data(), dy_rows.data());
      }
    }
  }
#pragma omp parallel for num_threads(num_threads())
  for (int64_t c = 0; c < cv.c; ++c) {
    for (int64_t t = 0; t < cv.rs; ++t) {
      T sum = T(0);
      for (int64_t chunk = 0; chunk < chunks; ++chunk) {
        const T* lane = partial.data() + (chunk * cv.c + c) * per_channel + t * lanes;
        for (int64_t l = 0; l < lanes; ++l) sum += lane[l];
      }
      dw[c * cv.rs + t] = sum;
    }
  }
}

template void depthwise_forward<float>(const Conv&, const float*, const float*, const float*, float*);
template void depthwise_forward<double>(const Conv&, const double*, const double*, const double*, double*);
template void depthwise_backward_input<float>(const Conv&, const float*, const float*, float*);
template void depthwise_backward_input<double>(const Conv&, const double*, const double*, double*);
template void depthwise_backward_weight<float>(const Conv&, const float*, const float*, float*);
template void depthwise_backward_weight<double>(const Conv&, const double*, const double*, double*);

}  // namespace cnn_ext::cpu
