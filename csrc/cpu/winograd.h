// Winograd F(2x2, 3x3) and F(4x4, 3x3) for stride-1, undilated 3x3 convolutions (Lavin & Gray, "Fast Algorithms
// for Convolutional Neural Networks", 2016): in F(2x2, 3x3) each 2x2 block of outputs is computed from a 4x4 tile
// of input with 16 multiplications per (input, output) channel pair instead of 36, i.e. 2.25x fewer.
//
//   Y = Aᵀ [ Σ_c (G g_kc Gᵀ) ⊙ (Bᵀ d_c B) ] A
//
//   Bᵀ = | 1  0 -1  0 |   G = |  1    0    0  |   Aᵀ = | 1  1  1  0 |
//        | 0  1  1  0 |       | 1/2  1/2  1/2 |        | 0  1 -1 -1 |
//        | 0 -1  1  0 |       | 1/2 -1/2  1/2 |
//        | 0  1  0 -1 |       |  0    0    1  |
//
// The sum over channels is, for each of the 16 positions ξ of the transformed tile (36 in F(4x4, 3x3)), one GEMM:
// M_ξ[out × tiles] = U_ξ[out × in] · V_ξ[in × tiles], on gemm.h's micro-kernels with U_ξ transformed once per
// call into packed panels; or, where the tiles are few for the channels or a row of them is short (5x5 outputs),
// with the tiles as the GEMMs' rows, M_ξ[tiles × out] = V_ξ[tiles × in] · U_ξ[in × out], U transformed block by
// block of output channels by the threads that use it and the transforms run along the channels (winograd.cpp's
// winograd_oriented).
// With the tiles as columns an item is (group, a run of tile rows across images): its input rows are copied into
// zero-padded windows (conv_common.h's copy_window), transformed into V (16 × in × tiles), multiplied, and
// transformed back into the output rows; as rows, (group, block of output channels, run of tile rows). Either
// way items write disjoint outputs, each summed in one order, so results do not depend on the schedule.
//
// F(4x4, 3x3) computes each 4x4 block of outputs from a 6x6 tile with 36 multiplications instead of 144 (4x fewer;
// 1.78x fewer than F(2x2, 3x3)), through 36 GEMMs, with the interpolation points 0, ±1, 1/2, -2 (Barabasz et al.,
// "Error analysis and improving the accuracy of Winograd convolution for deep neural networks", 2020) instead of
// the usual 0, ±1, ±2, which measured 2-3x less float32 error here:
//
//   Bᵀ = | 1  -3/2   -2   3/2  1  0 |   G = |    1      0      0   |   Aᵀ = | 1  1  1   1    1  0 |
//        | 0    1   -5/2  1/2  1  0 |       |  -1/3    1/3  -1/3  |        | 0 -1  1  1/2  -2  0 |
//        | 0   -1    1/2  5/2  1  0 |       |   1/3    1/3   1/3  |        | 0  1  1  1/4   4  0 |
//        | 0   -2    -1    2   1  0 |       | -16/15 -8/15 -4/15  |        | 0 -1  1  1/8  -8  1 |
//        | 0   1/2   -1  -1/2  1  0 |       |  1/15  -2/15  4/15  |
//        | 0    1   -3/2  -2  3/2 1 |       |    0      0     1   |
//
// The same routine serves the input gradient of a stride-1 3x3 convolution with padding <= 2: dX is the
// convolution of dY with the kernel flipped and its channel axes swapped, padded by 2 - pad (flip = true).
//
// The weight gradient uses the dual algorithm F(3x3, 2x2) (Lavin & Gray, section 5): each 2x2 block of dY and the
// 4x4 input tile it saw contribute to all nine taps through 16 products,
//
//   dW_kc = G' [ Σ_tiles (A dy_k A') ⊙ (B' d_c B) ] G      (A' = Aᵀ above, B' = Bᵀ above, G' = Gᵀ)
//
// so the sum over tiles and images is, per ξ, one GEMM with the tiles as its reduction: M_ξ[out × in] =
// U_ξ[out × tiles] · V_ξ[tiles × in]. Its transforms run along the channels of channels-last x and dY: copies of
// the whole tensors where each tile is transformed once across the threads (few tiles), else of the rows each run of
// tiles reads, made by its thread as it reaches them. On few tiles the GEMMs run by blocks of output channels (each
// in L2 from its products to its filters), or, where V outgrows what the blocks can share, whole, their row panels
// shared out among the threads.
// F(3x3, 4x4) is the same with F(4x4, 3x3)'s matrices: 4x4 blocks of dY, 6x6 input tiles, 36 GEMMs.
//
// Error: F(2x2, 3x3)'s coefficients are ±1 and ±1/2, so its float32 error stays within a small multiple of the
// direct product's, below the implicit GEMM's; the 4x4 tiles' larger coefficients cancel more (2-3.5x the GEMMs'
// error, about 2.5e-6 of the outputs' scale), past the suite's float32 tolerance on outputs of scale 40 and more,
// so float32 takes them only below 'highest' matmul precision (dispatch.cpp); tests/test_winograd.py measures the
// error against float64 per shape class (README "CPU kernels").
#pragma once

#include <cstdint>

namespace cnn_ext::cpu {

// One stride-1 3x3 convolution of `groups` groups, per group `in` input and `out` output channels;
// out_h = in_h + 2*pad_h - 2, out_w likewise.
struct Winograd3x3 {
  int64_t n, groups, in, out, in_h, in_w, out_h, out_w, pad_h, pad_w;
};

// dst = conv(src, weights) (+ bias[channel]) by F(tile x tile, 3x3), tile 2 or 4. Without flip, weights are
// K × in × 3 × 3 (K = groups*out, the fprop layout); with flip they are the fprop weights of the convolution whose
// input gradient this computes: (groups*in) × out × 3 × 3, read transposed and rotated by 180 degrees.
template <typename T>
void winograd_3x3(const Winograd3x3& wp, int64_t tile, const T* src, const T* weights, bool flip, const T* bias,
                  T* dst);

// dw (K × in × 3 × 3) = the weight gradient of that convolution by F(3x3, tile x tile), tile 2 or 4, from dY
// (n × K × out_h × out_w, or channels-last: n × out_h × out_w × K) and x (n × groups*in × in_h × in_w, or
// channels-last), each in the layout its flag says; both channels-last where winograd_wgrad_needs_channels_last.
template <typename T>
void winograd_3x3_wgrad(const Winograd3x3& wp, int64_t tile, const T* dy, bool dy_channels_last, const T* x,
                        bool x_channels_last, T* dw);

// Whether winograd_3x3_wgrad reads x and dY channels-last only: on few tiles it transforms each tile once, the
// threads sharing them out; its runs of tiles copy the rows they read channels-last themselves, from either layout.
template <typename T>
bool winograd_wgrad_needs_channels_last(const Winograd3x3& wp, int64_t tile);

// Whether winograd_3x3_wgrad runs F(3x3, tile x tile) as whole GEMMs shared out among the threads (winograd.cpp's
// winograd_wgrad_whole) rather than by blocks of output channels, with their M (P × in × out sums, written and
// read back) within 1/margin of what the blocks would re-read of V.
template <typename T>
bool winograd_wgrad_whole_gemms(const Winograd3x3& wp, int64_t tile, int64_t margin);

}  // namespace cnn_ext::cpu
