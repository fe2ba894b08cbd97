// The vector operations the batch-in-lanes kernels (conv2d_lanes_kernels.h) are written in, for AVX-512 (16 float
// lanes: 16 images per block) and AVX2 (8 lanes). Each struct's functions carry its ISA's target attribute, so they
// inline into the kernels compiled for that ISA. Masks select lanes: a __mmask16 on AVX-512, a vector of all-ones
// or zero 32-bit lanes on AVX2.
#pragma once

#include <cstdint>
#include <limits>

#include "isa.h"

#if CNN_EXT_X86
#include <immintrin.h>

namespace cnn_ext::cpu::lanes {

struct Avx512 {
  using V = __m512;
  using VI = __m512i;  // int32 lanes
  using Mask = __mmask16;
  static constexpr int64_t L = 16;
  // Register tiles: accumulators + operands within the 32 vector registers.
  static constexpr int kFpropChannels = 12;  // fprop: 12 output channels × 2 output columns
  static constexpr int kWgradChannels = 5;   // wgrad: up to 5 output channels × 5 kernel taps
  static constexpr int kWgradTaps = 5;
  static constexpr int kDgradChannels = 12;  // dgrad: 12 input channels × 2 input columns

  CNN_EXT_TARGET_AVX512 static V zero() { return _mm512_setzero_ps(); }
  CNN_EXT_TARGET_AVX512 static V set1(float x) { return _mm512_set1_ps(x); }
  CNN_EXT_TARGET_AVX512 static VI set1i(int32_t x) { return _mm512_set1_epi32(x); }
  CNN_EXT_TARGET_AVX512 static V load(const float* p) { return _mm512_loadu_ps(p); }
  CNN_EXT_TARGET_AVX512 static VI loadi(const int32_t* p) { return _mm512_loadu_si512(p); }
  CNN_EXT_TARGET_AVX512 static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  CNN_EXT_TARGET_AVX512 static void storei(int32_t* p, VI v) { _mm512_storeu_si512(p, v); }
  CNN_EXT_TARGET_AVX512 static V add(V a, V b) { return _mm512_add_ps(a, b); }
  CNN_EXT_TARGET_AVX512 static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }  // a*b + c

  // Masks: the first n lanes; lanes whose value takes over `best` (greater, or NaN); ReLU's "keep" (> 0 or NaN);
  // lanes of a equal to b.
  static Mask first(int64_t n) { return static_cast<Mask>((1u << n) - 1u); }
  static Mask lanes(int64_t lo, int64_t hi) { return static_cast<Mask>(first(hi) & ~first(lo)); }  // [lo, hi)
  CNN_EXT_TARGET_AVX512 static Mask takes_over(V v, V best) {
    return _mm512_cmp_ps_mask(v, best, _CMP_GT_OQ) | _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  }
  CNN_EXT_TARGET_AVX512 static Mask keeps(V v) { return _mm512_cmp_ps_mask(v, zero(), _CMP_NLE_UQ); }
  CNN_EXT_TARGET_AVX512 static Mask equal(VI a, VI b) { return _mm512_cmpeq_epi32_mask(a, b); }
  static Mask mask_and(Mask a, Mask b) { return a & b; }
  static Mask mask_or(Mask a, Mask b) { return a | b; }
  // Whether some lane of `lanes` is missing from m.
  static bool misses(Mask m, Mask lanes) { return (~m & lanes) != 0; }

  CNN_EXT_TARGET_AVX512 static V select(Mask m, V a, V b) { return _mm512_mask_mov_ps(b, m, a); }  // m ? a : b
  CNN_EXT_TARGET_AVX512 static VI selecti(Mask m, VI a, VI b) { return _mm512_mask_mov_epi32(b, m, a); }
  CNN_EXT_TARGET_AVX512 static V masked(Mask m, V a) { return _mm512_maskz_mov_ps(m, a); }  // m ? a : 0
  CNN_EXT_TARGET_AVX512 static V load_masked(const float* p, Mask m) { return _mm512_maskz_loadu_ps(m, p); }
  CNN_EXT_TARGET_AVX512 static void store_masked(float* p, Mask m, V v) { _mm512_mask_storeu_ps(p, m, v); }

  // 16 int64 at p (lanes of m), saturated to int32, as float bits (a saturated index matches no position, so a
  // corrupt one is still caught). maskz forms: GCC 12's unmasked ones warn about their undefined pass-through.
  CNN_EXT_TARGET_AVX512 static V load_masked(const int64_t* p, Mask m) {
    const __m256i lo = _mm512_maskz_cvtsepi64_epi32(0xFF, _mm512_maskz_loadu_epi64(static_cast<__mmask8>(m), p));
    const __m256i hi =
        _mm512_maskz_cvtsepi64_epi32(0xFF, _mm512_maskz_loadu_epi64(static_cast<__mmask8>(m >> 8), p + 8));
    const __m512i both =
        _mm512_maskz_inserti64x4(0xFF, _mm512_maskz_inserti64x4(0xFF, _mm512_setzero_si512(), lo, 0), hi, 1);
    return _mm512_castsi512_ps(both);
  }

  // The int32 lanes of v (as float bits), widened to int64, to the lanes of m at p.
  CNN_EXT_TARGET_AVX512 static void store_widened_masked(int64_t* p, Mask m, V v) {
    const __m512i x = _mm512_castps_si512(v);
    const __m256i lo = _mm512_maskz_extracti64x4_epi64(0xF, x, 0);
    const __m256i hi = _mm512_maskz_extracti64x4_epi64(0xF, x, 1);
    _mm512_mask_storeu_epi64(p, static_cast<__mmask8>(m), _mm512_maskz_cvtepi32_epi64(0xFF, lo));
    _mm512_mask_storeu_epi64(p + 8, static_cast<__mmask8>(m >> 8), _mm512_maskz_cvtepi32_epi64(0xFF, hi));
  }

  // Transposes the 16 × 16 matrix whose rows are v[0..15] (row i, column j -> row j, column i).
  CNN_EXT_TARGET_AVX512 static void transpose(V v[16]) {
    constexpr __mmask16 kAll = 0xFFFF;
    V t[16];
#pragma GCC unroll 16
    for (int i = 0; i < 16; i += 2) {
      t[i] = _mm512_maskz_unpacklo_ps(kAll, v[i], v[i + 1]);
      t[i + 1] = _mm512_maskz_unpackhi_ps(kAll, v[i], v[i + 1]);
    }
#pragma GCC unroll 16
    for (int i = 0; i < 16; i += 4) {
      v[i] = _mm512_shuffle_ps(t[i], t[i + 2], 0x44);
      v[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], 0xEE);
      v[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0x44);
      v[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
    }
#pragma GCC unroll 16
    for (int i = 0; i < 4; ++i) {
      t[i] = _mm512_maskz_shuffle_f32x4(kAll, v[i], v[i + 4], 0x88);
      t[i + 4] = _mm512_maskz_shuffle_f32x4(kAll, v[i], v[i + 4], 0xDD);
      t[i + 8] = _mm512_maskz_shuffle_f32x4(kAll, v[i + 8], v[i + 12], 0x88);
      t[i + 12] = _mm512_maskz_shuffle_f32x4(kAll, v[i + 8], v[i + 12], 0xDD);
    }
#pragma GCC unroll 16
    for (int i = 0; i < 8; ++i) {
      v[i] = _mm512_maskz_shuffle_f32x4(kAll, t[i], t[i + 8], 0x88);
      v[i + 8] = _mm512_maskz_shuffle_f32x4(kAll, t[i], t[i + 8], 0xDD);
    }
  }

  // v[d] = column 4c + d (d < 4) of the 16 × 16 matrix whose row i is the 16 floats at src + i*stride: a quarter of
  // a transpose, cheaper than loading the rows and calling transpose: each vector takes block c of 4 rows while
  // loading (a load and three inserts from memory), leaving the in-block 4 × 4 transposes. Done a quarter at a
  // time so that the caller stores each result at once: a whole transpose's 64 loads would be hoisted and spilled.
  CNN_EXT_TARGET_AVX512 static void load_transposed_quarter(const float* src, int64_t stride, int c, V v[4]) {
    constexpr __mmask16 kAll = 0xFFFF;
    V u[4];
#pragma GCC unroll 4
    for (int k = 0; k < 4; ++k) {  // u[k], 128-bit lane g = block c of row 4g + k
      const float* block = src + k * stride + 4 * c;
      V t = _mm512_zextps128_ps512(_mm_loadu_ps(block));
      t = _mm512_mask_insertf32x4(t, kAll, t, _mm_loadu_ps(block + 4 * stride), 1);
      t = _mm512_mask_insertf32x4(t, kAll, t, _mm_loadu_ps(block + 8 * stride), 2);
      u[k] = _mm512_mask_insertf32x4(t, kAll, t, _mm_loadu_ps(block + 12 * stride), 3);
    }
    const V t0 = _mm512_maskz_unpacklo_ps(kAll, u[0], u[1]), t1 = _mm512_maskz_unpackhi_ps(kAll, u[0], u[1]);
    const V t2 = _mm512_maskz_unpacklo_ps(kAll, u[2], u[3]), t3 = _mm512_maskz_unpackhi_ps(kAll, u[2], u[3]);
    v[0] = _mm512_shuffle_ps(t0, t2, 0x44);
    v[1] = _mm512_shuffle_ps(t0, t2, 0xEE);
    v[2] = _mm512_shuffle_ps(t1, t3, 0x44);
    v[3] = _mm512_shuffle_ps(t1, t3, 0xEE);
  }
};

struct Avx2 {
  using V = __m256;
  using VI = __m256i;
  using Mask = __m256i;  // all-ones or zero int32 lanes
  static constexpr int64_t L = 8;
  // 16 vector registers: 6 × 2 accumulators + 2 operands + a broadcast; wgrad 3 × 3 + 3 + 1.
  static constexpr int kFpropChannels = 6;
  static constexpr int kWgradChannels = 3;
  static constexpr int kWgradTaps = 3;
  static constexpr int kDgradChannels = 6;

  CNN_EXT_TARGET_AVX2 static V zero() { return _mm256_setzero_ps(); }
  CNN_EXT_TARGET_AVX2 static V set1(float x) { return _mm256_set1_ps(x); }
  CNN_EXT_TARGET_AVX2 static VI set1i(int32_t x) { return _mm256_set1_epi32(x); }
  CNN_EXT_TARGET_AVX2 static V load(const float* p) { return _mm256_loadu_ps(p); }
  CNN_EXT_TARGET_AVX2 static VI loadi(const int32_t* p) { return _mm256_loadu_si256(reinterpret_cast<const VI*>(p)); }
  CNN_EXT_TARGET_AVX2 static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  CNN_EXT_TARGET_AVX2 static void storei(int32_t* p, VI v) { _mm256_storeu_si256(reinterpret_cast<VI*>(p), v); }
  CNN_EXT_TARGET_AVX2 static V add(V a, V b) { return _mm256_add_ps(a, b); }
  CNN_EXT_TARGET_AVX2 static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }

  CNN_EXT_TARGET_AVX2 static Mask first(int64_t n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int32_t>(n)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  CNN_EXT_TARGET_AVX2 static Mask lanes(int64_t lo, int64_t hi) { return _mm256_andnot_si256(first(lo), first(hi)); }
  CNN_EXT_TARGET_AVX2 static Mask takes_over(V v, V best) {
    return _mm256_castps_si256(_mm256_or_ps(_mm256_cmp_ps(v, best, _CMP_GT_OQ), _mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
  }
  CNN_EXT_TARGET_AVX2 static Mask keeps(V v) { return _mm256_castps_si256(_mm256_cmp_ps(v, zero(), _CMP_NLE_UQ)); }
  CNN_EXT_TARGET_AVX2 static Mask equal(VI a, VI b) { return _mm256_cmpeq_epi32(a, b); }
  CNN_EXT_TARGET_AVX2 static Mask mask_and(Mask a, Mask b) { return _mm256_and_si256(a, b); }
  CNN_EXT_TARGET_AVX2 static Mask mask_or(Mask a, Mask b) { return _mm256_or_si256(a, b); }
  CNN_EXT_TARGET_AVX2 static bool misses(Mask m, Mask lanes) { return !_mm256_testc_si256(m, lanes); }

  CNN_EXT_TARGET_AVX2 static V select(Mask m, V a, V b) { return _mm256_blendv_ps(b, a, _mm256_castsi256_ps(m)); }
  CNN_EXT_TARGET_AVX2 static VI selecti(Mask m, VI a, VI b) { return _mm256_blendv_epi8(b, a, m); }
  CNN_EXT_TARGET_AVX2 static V masked(Mask m, V a) { return _mm256_and_ps(_mm256_castsi256_ps(m), a); }
  // Masked-off lanes are not read (no fault past the end of a row) and load as 0.
  CNN_EXT_TARGET_AVX2 static V load_masked(const float* p, Mask m) { return _mm256_maskload_ps(p, m); }
  CNN_EXT_TARGET_AVX2 static void store_masked(float* p, Mask m, V v) { _mm256_maskstore_ps(p, m, v); }

  // 8 int64 at p (lanes of m), saturated to int32, as float bits.
  CNN_EXT_TARGET_AVX2 static V load_masked(const int64_t* p, Mask m) {
    const __m256i m_lo = _mm256_cvtepi32_epi64(_mm256_castsi256_si128(m));
    const __m256i m_hi = _mm256_cvtepi32_epi64(_mm256_extracti128_si256(m, 1));
    const auto* q = reinterpret_cast<const long long*>(p);
    const __m256i lo = saturate_to_int32(_mm256_maskload_epi64(q, m_lo));
    const __m256i hi = saturate_to_int32(_mm256_maskload_epi64(q + 4, m_hi));
    // The low 32 bits of each int64 lane, in order: lo's four, then hi's four.
    const __m256i pick = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
    const __m256i lo32 = _mm256_permutevar8x32_epi32(lo, pick), hi32 = _mm256_permutevar8x32_epi32(hi, pick);
    return _mm256_castsi256_ps(_mm256_permute2x128_si256(lo32, hi32, 0x20));
  }

  CNN_EXT_TARGET_AVX2 static void store_widened_masked(int64_t* p, Mask m, V v) {
    const __m256i x = _mm256_castps_si256(v);
    auto* q = reinterpret_cast<long long*>(p);
    _mm256_maskstore_epi64(q, _mm256_cvtepi32_epi64(_mm256_castsi256_si128(m)),
                           _mm256_cvtepi32_epi64(_mm256_castsi256_si128(x)));
    _mm256_maskstore_epi64(q + 4, _mm256_cvtepi32_epi64(_mm256_extracti128_si256(m, 1)),
                           _mm256_cvtepi32_epi64(_mm256_extracti128_si256(x, 1)));
  }

  // Transposes the 8 × 8 matrix whose rows are v[0..7].
  CNN_EXT_TARGET_AVX2 static void transpose(V v[8]) {
    V t[8];
#pragma GCC unroll 8
    for (int i = 0; i < 8; i += 2) {
      t[i] = _mm256_unpacklo_ps(v[i], v[i + 1]);
      t[i + 1] = _mm256_unpackhi_ps(v[i], v[i + 1]);
    }
#pragma GCC unroll 8
    for (int i = 0; i < 8; i += 4) {
      v[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
      v[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
      v[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
      v[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
    }
#pragma GCC unroll 4
    for (int i = 0; i < 4; ++i) {
      t[i] = _mm256_permute2f128_ps(v[i], v[i + 4], 0x20);
      t[i + 4] = _mm256_permute2f128_ps(v[i], v[i + 4], 0x31);
    }
#pragma GCC unroll 8
    for (int i = 0; i < 8; ++i) v[i] = t[i];
  }

  // v[d] = column 4c + d (d < 4) of the 8 × 8 matrix whose row i is the 8 floats at src + i*stride (c < 2).
  CNN_EXT_TARGET_AVX2 static void load_transposed_quarter(const float* src, int64_t stride, int c, V v[4]) {
    V u[4];
#pragma GCC unroll 4
    for (int k = 0; k < 4; ++k) {  // u[k], 128-bit lane g = block c of row 4g + k
      const float* block = src + k * stride + 4 * c;
      u[k] = _mm256_insertf128_ps(_mm256_castps128_ps256(_mm_loadu_ps(block)), _mm_loadu_ps(block + 4 * stride), 1);
    }
    const V t0 = _mm256_unpacklo_ps(u[0], u[1]), t1 = _mm256_unpackhi_ps(u[0], u[1]);
    const V t2 = _mm256_unpacklo_ps(u[2], u[3]), t3 = _mm256_unpackhi_ps(u[2], u[3]);
    v[0] = _mm256_shuffle_ps(t0, t2, 0x44);
    v[1] = _mm256_shuffle_ps(t0, t2, 0xEE);
    v[2] = _mm256_shuffle_ps(t1, t3, 0x44);
    v[3] = _mm256_shuffle_ps(t1, t3, 0xEE);
  }

 private:
  CNN_EXT_TARGET_AVX2 static __m256i saturate_to_int32(__m256i x) {
    const __m256i hi = _mm256_set1_epi64x(std::numeric_limits<int32_t>::max());
    const __m256i lo = _mm256_set1_epi64x(std::numeric_limits<int32_t>::min());
    x = _mm256_blendv_epi8(x, hi, _mm256_cmpgt_epi64(x, hi));
    return _mm256_blendv_epi8(x, lo, _mm256_cmpgt_epi64(lo, x));
  }
};

}  // namespace cnn_ext::cpu::lanes

#endif
