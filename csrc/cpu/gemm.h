// Small single-threaded kernels for the CPU convolution code: a GEMM C (+)= A·B, and a "dot tile" kernel that
// reduces rows of two matrices against each other (C += A·B^T, both read along rows).
//
// GEMM layout (BLIS/GotoBLAS vocabulary):
//   * A (M×K) is packed by pack_a into panels of `mr` rows; within a panel element (i, k) sits at k*mr + i, so
//     the micro-kernel reads one contiguous column of the panel per k step and broadcasts its mr values. Or A is
//     read in place (MatrixA): from its transpose, which has that same shape (gemm_a_in_place), or from its rows
//     (gemm_a_rows, the micro-kernels' rows_fn, broadcasting from mr rows): a convolution's weights are both, and
//     packing them on every call cost as much as the product at batch 1.
//   * B (K×N) is read in place: row k starts at b + b_off[k] and is contiguous. A dense row-major B has
//     b_off[k] = k*ldb (row_offsets); the convolutions' "implicit im2col" instead points every row (c, r, s) at
//     the padded input plane c shifted by the tap (r, s), so the im2col matrix is never materialised. Only the
//     ragged last column panel (N % nr columns) is copied into a zero-padded buffer, and not even that when the
//     caller says B's rows are readable up to round_up(N, nr) columns (Pad::kB): the extra columns only feed
//     C columns that are never written back, unless the caller says C's rows may be written there too (Pad::kBC),
//     when the ragged last column panel runs straight into C like every other.
//   * C (M×N) is row-major with leading dimension ldc.
// The micro-kernel keeps an mr × nr tile of C in vector registers (mr × nv vectors) and does one rank-1
// update per k step: nv vector loads of B, mr broadcasts of A, mr*nv FMAs.
//
// Instruction-set choice: the kernels are written once with GCC vector extensions and instantiated per ISA with
// isa.h's target attributes: 64-byte vectors for AVX-512 (32 registers), 32-byte for AVX2+FMA and 16-byte for the
// baseline (SSE2 on x86-64, NEON elsewhere). isa.h picks the ISA at run time, so the build needs no -m flags and
// the library runs on any x86-64 machine. Results are deterministic for a given ISA; different ISAs may differ in
// the last bits (FMA contraction, tiles, lane counts).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <cstdlib>
#include <type_traits>
#include <utility>
#include <vector>

#include "isa.h"

namespace cnn_ext {
namespace cpu {

template <typename T>
using MicroKernelFn = void (*)(int64_t kc, const T* a, int64_t lda, const T* b, const int64_t* b_off, T* c,
                               int64_t ldc, bool accumulate);
// A read from mr rows in place: element (i, k) at a_rows[i][k].
template <typename T>
using RowsKernelFn = void (*)(int64_t kc, const T* const* a_rows, const T* b, const int64_t* b_off, T* c,
                              int64_t ldc, bool accumulate);

// One micro-kernel: it computes an mr × nr tile of C, reading A's element (i, k) at a[k*lda + i] (fns: a packed
// panel, lda = mr) or at a_rows[i][k] (rows_fns: rows of a matrix read in place, anywhere in memory). nr is
// nr / lanes vectors of `lanes` columns; fns[v - 1] and rows_fns[v - 1] are its forms with v of those vectors, the
// narrower ones of the same mr for a ragged last column panel (70 columns cost 64 + 16, not 128).
template <typename T>
struct MicroKernel {
  static constexpr int kMaxVectors = 4;
  int mr;
  int nr;
  int lanes;
  MicroKernelFn<T> fns[kMaxVectors];
  RowsKernelFn<T> rows_fns[kMaxVectors];
};

namespace detail {

template <typename T, int Bytes>
struct VecOf;
template <>
struct VecOf<float, 16> { typedef float type __attribute__((vector_size(16))); };
template <>
struct VecOf<float, 32> { typedef float type __attribute__((vector_size(32))); };
template <>
struct VecOf<float, 64> { typedef float type __attribute__((vector_size(64))); };
template <>
struct VecOf<double, 16> { typedef double type __attribute__((vector_size(16))); };
template <>
struct VecOf<double, 32> { typedef double type __attribute__((vector_size(32))); };
template <>
struct VecOf<double, 64> { typedef double type __attribute__((vector_size(64))); };

// C[0:MR, 0:NV*L] (+)= sum_k A(i, k) * b[b_off[k] + j], A(i, k) = a[k*lda + i] (lda = MR for a packed panel) or,
// with kRows, a_rows[i][k]. Inlined into the per-ISA wrappers below, so the vector type V lowers to that ISA's
// registers. memcpy is an unaligned vector load/store.
template <typename V, typename T, int MR, int NV, bool kRows>
inline __attribute__((always_inline)) void micro_kernel_body(int64_t kc, const T* __restrict a, int64_t lda,
                                                             const T* const* a_rows, const T* __restrict b,
                                                             const int64_t* __restrict b_off, T* __restrict c,
                                                             int64_t ldc, bool accumulate) {
  constexpr int L = sizeof(V) / sizeof(T);
  const T* row[MR];
  if constexpr (kRows) {
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) row[i] = a_rows[i];
  }
  V acc[MR][NV];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) {
      if (accumulate) {
        std::memcpy(&acc[i][v], c + i * ldc + v * L, sizeof(V));
      } else {
        acc[i][v] = V{};
      }
    }
  }
  for (int64_t k = 0; k < kc; ++k) {
    V bv[NV];
    const T* bk = b + b_off[k];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) std::memcpy(&bv[v], bk + v * L, sizeof(V));
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      const T ai = kRows ? row[i][k] : a[k * lda + i];
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[i][v] += bv[v] * ai;  // contracted to FMA where the ISA has it
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) std::memcpy(c + i * ldc + v * L, &acc[i][v], sizeof(V));
  }
}

template <typename T, int MR, int NV>
CNN_EXT_TARGET_AVX512 void micro_kernel_avx512(int64_t kc, const T* a, int64_t lda, const T* b, const int64_t* b_off,
                                               T* c, int64_t ldc, bool accumulate) {
  micro_kernel_body<typename VecOf<T, 64>::type, T, MR, NV, false>(kc, a, lda, nullptr, b, b_off, c, ldc, accumulate);
}
template <typename T, int MR, int NV>
CNN_EXT_TARGET_AVX512 void rows_kernel_avx512(int64_t kc, const T* const* a_rows, const T* b, const int64_t* b_off,
                                              T* c, int64_t ldc, bool accumulate) {
  micro_kernel_body<typename VecOf<T, 64>::type, T, MR, NV, true>(kc, nullptr, 0, a_rows, b, b_off, c, ldc, accumulate);
}

template <typename T, int MR, int NV>
CNN_EXT_TARGET_AVX2 void micro_kernel_avx2(int64_t kc, const T* a, int64_t lda, const T* b, const int64_t* b_off, T* c,
                                           int64_t ldc, bool accumulate) {
  micro_kernel_body<typename VecOf<T, 32>::type, T, MR, NV, false>(kc, a, lda, nullptr, b, b_off, c, ldc, accumulate);
}
template <typename T, int MR, int NV>
CNN_EXT_TARGET_AVX2 void rows_kernel_avx2(int64_t kc, const T* const* a_rows, const T* b, const int64_t* b_off, T* c,
                                          int64_t ldc, bool accumulate) {
  micro_kernel_body<typename VecOf<T, 32>::type, T, MR, NV, true>(kc, nullptr, 0, a_rows, b, b_off, c, ldc, accumulate);
}

template <typename T, int MR, int NV>
void micro_kernel_baseline(int64_t kc, const T* a, int64_t lda, const T* b, const int64_t* b_off, T* c, int64_t ldc,
                           bool accumulate) {
  micro_kernel_body<typename VecOf<T, 16>::type, T, MR, NV, false>(kc, a, lda, nullptr, b, b_off, c, ldc, accumulate);
}
template <typename T, int MR, int NV>
void rows_kernel_baseline(int64_t kc, const T* const* a_rows, const T* b, const int64_t* b_off, T* c, int64_t ldc,
                          bool accumulate) {
  micro_kernel_body<typename VecOf<T, 16>::type, T, MR, NV, true>(kc, nullptr, 0, a_rows, b, b_off, c, ldc, accumulate);
}

// The micro-kernel of the ISA whose vectors are Bytes wide, in both of its A forms.
template <typename T, int Bytes, int MR, int NV>
std::pair<MicroKernelFn<T>, RowsKernelFn<T>> kernel_fns() {
  if constexpr (Bytes == 64) {
    return {&micro_kernel_avx512<T, MR, NV>, &rows_kernel_avx512<T, MR, NV>};
  } else if constexpr (Bytes == 32) {
    return {&micro_kernel_avx2<T, MR, NV>, &rows_kernel_avx2<T, MR, NV>};
  } else {
    return {&micro_kernel_baseline<T, MR, NV>, &rows_kernel_baseline<T, MR, NV>};
  }
}

// The MR × NV micro-kernel with its narrower forms (V + 1 vectors for each V).
template <typename T, int Bytes, int MR, int NV, int... V>
MicroKernel<T> make(std::integer_sequence<int, V...>) {
  static_assert(Bytes == 64 || Bytes == 32 || Bytes == 16);
  static_assert(NV <= MicroKernel<T>::kMaxVectors);
  constexpr int lanes = Bytes / static_cast<int>(sizeof(T));
  return {MR, NV * lanes, lanes, {kernel_fns<T, Bytes, MR, V + 1>().first...},
          {kernel_fns<T, Bytes, MR, V + 1>().second...}};
}
template <typename T, int Bytes, int MR, int NV>
MicroKernel<T> make() {
  return make<T, Bytes, MR, NV>(std::make_integer_sequence<int, NV>());
}

// The tile shapes of each ISA, best first. Several shapes exist so that the small channel counts of convolutions
// (10, 20, 25, ...) waste little work on zero padding; all keep mr*nv accumulators plus nv B vectors and a broadcast
// within the register file (32 vector registers on AVX-512, 16 otherwise).
template <typename T>
const std::vector<MicroKernel<T>>& micro_kernels() {
  static const std::vector<MicroKernel<T>> avx512 = {make<T, 64, 6, 4>(), make<T, 64, 8, 3>(), make<T, 64, 12, 2>(),
                                                     make<T, 64, 5, 4>(), make<T, 64, 10, 2>()};
  static const std::vector<MicroKernel<T>> avx2 = {make<T, 32, 6, 2>(), make<T, 32, 4, 3>()};
  static const std::vector<MicroKernel<T>> portable = {make<T, 16, 6, 2>(), make<T, 16, 4, 3>()};
  return *by_isa(&avx512, &avx2, &portable);
}

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

}  // namespace detail

// Unaligned load and store of a GCC vector V of T elements (or of one T, for the scalar tail of a vectorised loop).
template <typename V, typename T>
inline __attribute__((always_inline)) V load_as(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}
template <typename V, typename T>
inline __attribute__((always_inline)) void store_as(T* p, V v) {
  std::memcpy(p, &v, sizeof(V));
}

// A GCC vector of Bytes bytes of T (64 on AVX-512, 32 on AVX2, 16 portable), its lane count, its loads and stores,
// and the lane permutations __builtin_shuffle takes (Mask: integers as wide as T, the type of V's comparisons too):
// what the vectorised loops outside the micro-kernels (Winograd's transforms, the depthwise rows, the tiled max
// pooling) work with.
template <typename T, int Bytes>
struct Vector {
  using V = typename detail::VecOf<T, Bytes>::type;
  static constexpr int kLanes = Bytes / static_cast<int>(sizeof(T));
  static inline __attribute__((always_inline)) V load(const T* p) { return load_as<V>(p); }
  static inline __attribute__((always_inline)) void store(T* p, V v) { store_as(p, v); }
  static inline __attribute__((always_inline)) V splat(T x) { return V{} + x; }

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
  // The even and odd elements of two vectors [lo, hi], and their interleaving.
  static constexpr Mask kEvens = evens(std::make_index_sequence<kLanes>());
  static constexpr Mask kOdds = odds(std::make_index_sequence<kLanes>());
  static constexpr Mask kZipLow = zip_low(std::make_index_sequence<kLanes>());
  static constexpr Mask kZipHigh = zip_high(std::make_index_sequence<kLanes>());
};

// The micro-kernel with the least modelled time for an M × N product, padding and edge panels included (ties go
// to the earlier, faster shape).
template <typename T>
MicroKernel<T> pick_micro_kernel(int64_t M, int64_t N) {
  const std::vector<MicroKernel<T>>& kernels = detail::micro_kernels<T>();
  MicroKernel<T> best = kernels.front();
  int64_t best_work = -1;
  for (const auto& k : kernels) {
    // Cost per k step and row panel, in half cycles of a core with two FMA and two load ports and a 4-cycle FMA
    // latency: an mr × v kernel issues mr·v FMAs and mr + v loads, and needs 8 accumulators to hide the latency.
    // A ragged last column panel runs on the edge kernel of fewer vectors (70 columns: 48 + 32 on 8x3).
    const auto cost = [](int64_t mr, int64_t vectors) { return std::max({mr * vectors, mr + vectors, int64_t(8)}); };
    const int64_t vectors = k.nr / k.lanes, edge = detail::round_up(N % k.nr, k.lanes) / k.lanes;
    const int64_t work = detail::round_up(M, k.mr) / k.mr *
                         (N / k.nr * cost(k.mr, vectors) + (edge > 0 ? cost(k.mr, edge) : 0));
    if (best_work < 0 || work < best_work) {
      best = k;
      best_work = work;
    }
  }
  return best;
}

// Elements pack_a writes for an M × K matrix.
inline int64_t packed_a_size(int64_t M, int64_t K, int mr) { return detail::round_up(M, mr) * K; }

// Packs A (element (i, k) at src[i*row_stride + k*col_stride]) into mr-row panels, zero-padding the last one.
template <typename T>
void pack_a(int64_t M, int64_t K, const T* src, int64_t row_stride, int64_t col_stride, int mr, T* dst) {
  for (int64_t i0 = 0; i0 < M; i0 += mr) {
    const int64_t rows = std::min<int64_t>(mr, M - i0);
    T* panel = dst + i0 * K;
    for (int64_t k = 0; k < K; ++k) {
      const T* s = src + i0 * row_stride + k * col_stride;
      T* d = panel + k * mr;
      int64_t i = 0;
      for (; i < rows; ++i) d[i] = s[i * row_stride];
      for (; i < mr; ++i) d[i] = T(0);
    }
  }
}

// What a GEMM may touch past column N of B and C, up to round_up(N, nr): nothing, B's rows (read), or B's rows and
// C's rows (written; the values there are garbage).
enum class Pad { kNone, kB, kBC };

// Columns a B or C buffer must have (its leading dimension) for gemm(..., Pad::kB / kBC).
inline int64_t padded_cols(int64_t N, int nr) { return detail::round_up(N, nr); }

// b_off for a dense row-major B with leading dimension ld.
inline std::vector<int64_t> row_offsets(int64_t rows, int64_t ld) {
  std::vector<int64_t> off(rows);
  for (int64_t k = 0; k < rows; ++k) off[k] = k * ld;
  return off;
}

// Copies n elements with fixed-size (hence inlined) block moves, overlapping to cover any n: the rows copied into
// windows are short (one image row), and a libc memmove call per row would cost more than the copy itself.
template <typename T>
inline __attribute__((always_inline)) void copy_row(T* dst, const T* src, int64_t n) {
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

// Zeros n elements as copy_row copies them, without a loop (GCC turns a loop of stores of zeros, even one element
// at a time, into a call of libc's memset): a window's padding columns and rows are short, and the calls, two a row
// for the padding columns, cost 5-8% of a 14x14 Winograd input gradient. Rows over 256 bytes call memset.
template <typename T>
inline __attribute__((always_inline)) void zero_row(T* dst, int64_t n) {
  char* d = reinterpret_cast<char*>(dst);
  const int64_t bytes = n * static_cast<int64_t>(sizeof(T));
  if (bytes > 256) {
    std::memset(d, 0, bytes);
  } else if (bytes >= 64) {
    std::memset(d, 0, 64);
    if (bytes > 128) std::memset(d + 64, 0, 64);
    if (bytes > 192) std::memset(d + 128, 0, 64);
    std::memset(d + bytes - 64, 0, 64);
  } else if (bytes >= 32) {
    std::memset(d, 0, 32);
    std::memset(d + bytes - 32, 0, 32);
  } else if (bytes >= 16) {
    std::memset(d, 0, 16);
    std::memset(d + bytes - 16, 0, 16);
  } else if (bytes >= 8) {
    std::memset(d, 0, 8);
    std::memset(d + bytes - 8, 0, 8);
  } else if (bytes >= 4) {
    std::memset(d, 0, 4);
  }
}

namespace detail {

// How gemm_impl finds A's element (i, k): in pack_a's panels, at a[(i / mr) * mr*K + k*mr + i % mr], or read in
// place at a[i*i_step + k*k_step], either from A's transpose (i_step = 1: each k's mr values are contiguous, as in a
// packed panel) or from a row-major A (k_step = 1: micro-kernel rows_fn), or at a[row_off[i] + k] (rows anywhere:
// row_off given, rows_fn).
struct ALayout {
  bool packed;
  int64_t i_step, k_step;
  const int64_t* row_off = nullptr;
};

// C (+)= A·B. Loop order: K blocks of kc (so a kc × nr strip of B stays in L1 while every A panel streams past it
// from L2), then column panels, then row panels. A read in place is never read past its M rows: the ragged last row
// panel is packed, once per K block.
template <typename T>
void gemm_impl(const MicroKernel<T>& uk, int64_t M, int64_t N, int64_t K, const T* a, ALayout layout, const T* b,
               const int64_t* b_off, T* c, int64_t ldc, bool accumulate, Pad pad) {
  if (M == 0 || N == 0) return;
  if (K == 0) {
    if (!accumulate) {
      for (int64_t i = 0; i < M; ++i) std::fill_n(c + i * ldc, N, T(0));
    }
    return;
  }
  const int mr = uk.mr, nr = uk.nr;
  // A B strip of kc_block rows × nr columns takes about 32 KiB of the 48 KiB L1.
  const int64_t kc_block = std::clamp<int64_t>(32768 / (nr * static_cast<int64_t>(sizeof(T))), 64, 512);
  std::vector<T> b_edge;          // zero-padded copy of the ragged last column panel ...
  std::vector<int64_t> edge_off;  // ... and its row offsets
  std::vector<T> a_edge;          // A read in place: its ragged last row panel, packed
  T tile[16 * 64];                // ragged C tiles (mr <= 16, nr <= 64 for every kernel above)
  const int64_t m_full = layout.packed ? M : M / mr * mr;
  const bool by_rows = !layout.packed && (layout.row_off != nullptr || layout.k_step == 1);  // else columns
  const auto row = [&](int64_t i) { return a + (layout.row_off != nullptr ? layout.row_off[i] : i * layout.i_step); };
  const T* panel_rows[16];
  const int64_t row_panels = (M + mr - 1) / mr;
  // A's rows read in place are mr short streams per call, too short for the hardware prefetchers where they come
  // from memory: the input's windows (a row table: a 1x1 wgrad's A, 8-9% slower unfetched) or weights beyond L2,
  // re-read per column panel (512 channels: 6%). Fetch the next panel's then; elsewhere A is in cache (small
  // weights, Winograd's U blocks) and the prefetches measured 1-4% slower.
  const bool prefetch_rows = layout.row_off != nullptr || M * K * int64_t(sizeof(T)) >= (int64_t(1) << 20);

  for (int64_t k0 = 0; k0 < K; k0 += kc_block) {
    const int64_t kc = std::min(kc_block, K - k0);
    const bool acc = accumulate || k0 > 0;
    if (m_full < M) {
      a_edge.assign(mr * kc, T(0));
      for (int64_t i = m_full; i < M; ++i) {
        for (int64_t k = 0; k < kc; ++k) {
          a_edge[k * mr + i - m_full] = by_rows ? row(i)[k0 + k] : a[i * layout.i_step + (k0 + k) * layout.k_step];
        }
      }
    }
    // B's rows far apart (2 KiB or more on average: input planes read in place, a 1x1 convolution's or dgrad's dY)
    // each start a new stream, which the hardware prefetchers do not catch in time: the row panels fetch the next
    // column panel's strip between them (1x1 forward and input gradient 5-11% faster; B in a compact buffer, as
    // Winograd's V, needs none).
    const bool prefetch_b =
        kc > 1 && std::abs(b_off[k0 + kc - 1] - b_off[k0]) * int64_t(sizeof(T)) >= 2048 * (kc - 1);
    for (int64_t j0 = 0; j0 < N; j0 += nr) {
      const int64_t cols = std::min<int64_t>(nr, N - j0);
      const int64_t vectors = (cols + uk.lanes - 1) / uk.lanes;  // the kernel width this panel needs
      const T* b_strip = b + j0;
      const int64_t* strip_off = b_off + k0;
      if (cols < nr && pad == Pad::kNone) {
        b_edge.assign(kc * nr, T(0));
        // (copy_row: std::copy_n was a libc call per row, 58k in a batch-1 mobilenet_v2 forward + backward)
        for (int64_t k = 0; k < kc; ++k) copy_row(b_edge.data() + k * nr, b_strip + strip_off[k], cols);
        if (edge_off.empty()) edge_off = row_offsets(kc_block, nr);
        b_strip = b_edge.data();
        strip_off = edge_off.data();
      }
      for (int64_t i0 = 0; i0 < M; i0 += mr) {
        const int64_t rows_here = std::min<int64_t>(mr, M - i0);
        const bool in_place = !layout.packed && i0 < m_full;
        if (in_place && by_rows) {
          for (int64_t r = 0; r < mr; ++r) panel_rows[r] = row(i0 + r) + k0;
          if (prefetch_rows && i0 + 2 * mr <= m_full) {
            for (int64_t r = 0; r < mr; ++r) {
              const T* next = row(i0 + mr + r) + k0;
              for (int64_t k = 0; k < kc; k += 64 / int64_t(sizeof(T))) __builtin_prefetch(next + k);
            }
          }
        }
        // A's columns read in place (Wᵀ as dgrad's A, Winograd's U) are not prefetched: a line per k step for the
        // next panel measured 5-11% slower on batch-8 weight and input gradients (perf: most of gemm_impl's own time
        // sat on the prefetches), and at most 3% faster on a batch-1 one.
        if (prefetch_b && j0 + nr < N) {
          // This row panel's share of the next column panel's strip (B's rows, a line at a time).
          const int64_t ka = i0 / mr * kc / row_panels, kb = (i0 / mr + 1) * kc / row_panels;
          for (int64_t k = ka; k < kb; ++k) {
            const T* next = b + strip_off[k] + j0 + nr;
            for (int64_t l = 0; l < nr; l += 64 / int64_t(sizeof(T))) __builtin_prefetch(next + l);
          }
        }
        const T* a_panel = layout.packed ? a + i0 * K + k0 * mr
                           : !in_place   ? a_edge.data()
                                         : a + i0 * layout.i_step + k0 * layout.k_step;  // (i_step = 1)
        const int64_t lda = in_place ? layout.k_step : mr;
        // C[i0:i0 + mr, j0:j0 + nr] (+)= this panel's product, into c_out (leading dimension ldo).
        const auto product = [&](T* c_out, int64_t ldo, bool add) {
          if (in_place && by_rows) {
            uk.rows_fns[vectors - 1](kc, panel_rows, b_strip, strip_off, c_out, ldo, add);
          } else {
            uk.fns[vectors - 1](kc, a_panel, lda, b_strip, strip_off, c_out, ldo, add);
          }
        };
        T* c_tile = c + i0 * ldc + j0;
        if (rows_here == mr && (cols == nr || pad == Pad::kBC)) {
          product(c_tile, ldc, acc);
          continue;
        }
        // Ragged tile: compute the full tile in a scratch buffer (C's values where accumulating, zeros around
        // them), then copy the valid part. By zero_row and copy_row, a row at a time: std::fill_n and copy_n
        // compiled to libc calls, about 10 a tile (DeepMNIST's 64-channel weight gradients, 64 rows on 5-row
        // panels, have 16k such tiles a training step).
        if (acc) {
          for (int64_t i = 0; i < mr; ++i) {
            const int64_t valid = i < rows_here ? cols : 0;
            copy_row(tile + i * nr, c_tile + i * ldc, valid);
            zero_row(tile + i * nr + valid, nr - valid);
          }
        }
        product(tile, nr, acc);
        for (int64_t i = 0; i < rows_here; ++i) copy_row(c_tile + i * ldc, tile + i * nr, cols);
      }
    }
  }
}

}  // namespace detail

// C[M×N] = A·B (accumulate = false) or C += A·B (accumulate = true); A packed by pack_a with uk.mr, row k of B
// at b + b_off[k].
template <typename T>
void gemm(const MicroKernel<T>& uk, int64_t M, int64_t N, int64_t K, const T* a_packed, const T* b,
          const int64_t* b_off, T* c, int64_t ldc, bool accumulate, Pad pad = Pad::kNone) {
  detail::gemm_impl(uk, M, N, K, a_packed, {true, 0, 0}, b, b_off, c, ldc, accumulate, pad);
}

// As gemm, with A read in place from its transpose: element (i, k) at a[k*lda + i], i.e. A's columns are the
// contiguous rows of an array (what a packed panel holds with lda = mr).
template <typename T>
void gemm_a_in_place(const MicroKernel<T>& uk, int64_t M, int64_t N, int64_t K, const T* a, int64_t lda, const T* b,
                     const int64_t* b_off, T* c, int64_t ldc, bool accumulate, Pad pad = Pad::kNone) {
  detail::gemm_impl(uk, M, N, K, a, {false, 1, lda}, b, b_off, c, ldc, accumulate, pad);
}

// As gemm, with A read in place from a row-major array: element (i, k) at a[i*lda + k] (a convolution's weights
// [K][C·R·S] as fprop's A), so no per-call packing pass.
template <typename T>
void gemm_a_rows(const MicroKernel<T>& uk, int64_t M, int64_t N, int64_t K, const T* a, int64_t lda, const T* b,
                 const int64_t* b_off, T* c, int64_t ldc, bool accumulate, Pad pad = Pad::kNone) {
  detail::gemm_impl(uk, M, N, K, a, {false, lda, 1}, b, b_off, c, ldc, accumulate, pad);
}

// As gemm, with A's row i read in place at a + row_off[i] (contiguous along k): the rows of a convolution's
// zero-padded input windows, one per (channel, tap), as the transposed wgrad's A.
template <typename T>
void gemm_a_row_table(const MicroKernel<T>& uk, int64_t M, int64_t N, int64_t K, const T* a, const int64_t* row_off,
                      const T* b, const int64_t* b_off, T* c, int64_t ldc, bool accumulate, Pad pad = Pad::kNone) {
  detail::gemm_impl(uk, M, N, K, a, {false, 0, 1, row_off}, b, b_off, c, ldc, accumulate, pad);
}

// A GEMM's A operand as the convolutions hand it over: pack_a's panels, or an array read in place, element (i, k)
// at a[i*ld + k] (kRows: the weights as fprop's A) or a[k*ld + i] (kColumns: their transpose, as a 1x1 dgrad's A).
template <typename T>
struct MatrixA {
  enum Layout { kPacked, kRows, kColumns };
  const T* a;
  Layout layout;
  int64_t ld;  // unused for kPacked

  // Rows [m0, M) of an M × K operand (m0 a multiple of mr for packed panels).
  MatrixA from_row(int64_t m0, int64_t K) const {
    const int64_t step = layout == kPacked ? K : layout == kRows ? ld : 1;
    return {a + m0 * step, layout, ld};
  }
};

template <typename T>
void gemm(const MicroKernel<T>& uk, int64_t M, int64_t N, int64_t K, MatrixA<T> a, const T* b, const int64_t* b_off,
          T* c, int64_t ldc, bool accumulate, Pad pad = Pad::kNone) {
  switch (a.layout) {
    case MatrixA<T>::kPacked:
      return gemm(uk, M, N, K, a.a, b, b_off, c, ldc, accumulate, pad);
    case MatrixA<T>::kRows:
      return gemm_a_rows(uk, M, N, K, a.a, a.ld, b, b_off, c, ldc, accumulate, pad);
    case MatrixA<T>::kColumns:
      return gemm_a_in_place(uk, M, N, K, a.a, a.ld, b, b_off, c, ldc, accumulate, pad);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Dot tiles: out[m][t] += sum_j a_m[j] * b_t[j] for an mr × nt tile of row pairs, where row m of A starts at
// a + m*lda and row t of B at b + b_off[t]. Used by the weight gradient, whose reduction runs along the rows of
// both operands (output positions), so neither side can be a GEMM B operand without a transposing gather.
// The rows are walked in `segments` pieces of `vecs` vectors each, piece i starting a_seg / b_seg elements after
// piece i-1 (several images or row chunks in one call, so the horizontal sums at the end are amortised). Each
// (m, t) keeps a vector of lane partial sums, added up in lane order at the end: fixed order, deterministic.
// Rows m >= rows and t >= taps of a ragged tile recompute the last valid row and are not stored.
// ---------------------------------------------------------------------------------------------------------------
template <typename T>
using DotKernelFn = void (*)(int64_t segments, int64_t vecs, const T* a, int64_t lda, int64_t a_seg, const T* b,
                             const int64_t* b_off, int64_t b_seg, int rows, int taps, T* out, int64_t ldo);

template <typename T>
struct DotKernel {
  int mr;     // A rows per tile
  int nt;     // B rows per tile
  int lanes;  // elements per vector: segment lengths are multiples of it
  DotKernelFn<T> fn;
};

namespace detail {

template <typename V, typename T, int MR, int NT>
inline __attribute__((always_inline)) void dot_kernel_body(int64_t segments, int64_t vecs, const T* a, int64_t lda,
                                                           int64_t a_seg, const T* b, const int64_t* b_off,
                                                           int64_t b_seg, int rows, int taps, T* out, int64_t ldo) {
  constexpr int L = sizeof(V) / sizeof(T);
  const T* a_row[MR];
  const T* b_row[NT];
#pragma GCC unroll 16
  for (int m = 0; m < MR; ++m) a_row[m] = a + std::min(m, rows - 1) * lda;
#pragma GCC unroll 16
  for (int t = 0; t < NT; ++t) b_row[t] = b + b_off[std::min(t, taps - 1)];
  V acc[MR][NT];
#pragma GCC unroll 16
  for (int m = 0; m < MR; ++m) {
#pragma GCC unroll 16
    for (int t = 0; t < NT; ++t) acc[m][t] = V{};
  }
  for (int64_t seg = 0; seg < segments; ++seg) {
    for (int64_t j = 0; j < vecs * L; j += L) {
      V av[MR];
#pragma GCC unroll 16
      for (int m = 0; m < MR; ++m) std::memcpy(&av[m], a_row[m] + j, sizeof(V));
#pragma GCC unroll 16
      for (int t = 0; t < NT; ++t) {
        V bv;
        std::memcpy(&bv, b_row[t] + j, sizeof(V));
#pragma GCC unroll 16
        for (int m = 0; m < MR; ++m) acc[m][t] += av[m] * bv;  // contracted to FMA where the ISA has it
      }
    }
#pragma GCC unroll 16
    for (int m = 0; m < MR; ++m) a_row[m] += a_seg;
#pragma GCC unroll 16
    for (int t = 0; t < NT; ++t) b_row[t] += b_seg;
  }
  for (int m = 0; m < rows; ++m) {
    for (int t = 0; t < taps; ++t) {
      T lane[L];  // pairwise sum of the lanes (fixed order)
      std::memcpy(lane, &acc[m][t], sizeof(V));
      for (int width = L / 2; width > 0; width /= 2) {
        for (int l = 0; l < width; ++l) lane[l] += lane[l + width];
      }
      out[m * ldo + t] += lane[0];
    }
  }
}

template <typename T, int MR, int NT>
CNN_EXT_TARGET_AVX512 void dot_kernel_avx512(int64_t segments, int64_t vecs, const T* a, int64_t lda, int64_t a_seg,
                                             const T* b, const int64_t* b_off, int64_t b_seg, int rows, int taps,
                                             T* out, int64_t ldo) {
  dot_kernel_body<typename VecOf<T, 64>::type, T, MR, NT>(segments, vecs, a, lda, a_seg, b, b_off, b_seg, rows,
                                                          taps, out, ldo);
}

template <typename T, int MR, int NT>
CNN_EXT_TARGET_AVX2 void dot_kernel_avx2(int64_t segments, int64_t vecs, const T* a, int64_t lda, int64_t a_seg,
                                         const T* b, const int64_t* b_off, int64_t b_seg, int rows, int taps, T* out,
                                         int64_t ldo) {
  dot_kernel_body<typename VecOf<T, 32>::type, T, MR, NT>(segments, vecs, a, lda, a_seg, b, b_off, b_seg, rows,
                                                          taps, out, ldo);
}

template <typename T, int MR, int NT>
void dot_kernel_baseline(int64_t segments, int64_t vecs, const T* a, int64_t lda, int64_t a_seg, const T* b,
                         const int64_t* b_off, int64_t b_seg, int rows, int taps, T* out, int64_t ldo) {
  dot_kernel_body<typename VecOf<T, 16>::type, T, MR, NT>(segments, vecs, a, lda, a_seg, b, b_off, b_seg, rows,
                                                          taps, out, ldo);
}

}  // namespace detail

// The dot kernel of the ISA in use: mr*nt accumulators + mr A vectors + one B vector fill the register file (32
// vectors on AVX-512, 16 otherwise).
template <typename T>
const DotKernel<T>& dot_kernel() {
  static const DotKernel<T> avx512 = {5, 5, 64 / static_cast<int>(sizeof(T)), &detail::dot_kernel_avx512<T, 5, 5>};
  static const DotKernel<T> avx2 = {3, 4, 32 / static_cast<int>(sizeof(T)), &detail::dot_kernel_avx2<T, 3, 4>};
  static const DotKernel<T> portable = {3, 4, 16 / static_cast<int>(sizeof(T)),
                                        &detail::dot_kernel_baseline<T, 3, 4>};
  return *by_isa(&avx512, &avx2, &portable);
}

}  // namespace cpu
}  // namespace cnn_ext
