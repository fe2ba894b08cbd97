// float32 convolution kernels with the batch in the vector lanes, for the small convolutions of MNIST-sized
// networks, on AVX-512 (16 images per vector) and AVX2 (8) machines.
//
// Per image, such a convolution is a product of tiny matrices (MNIST's second conv: 20 × 250 × 64), where the
// GEMMs of the conv_*.cpp files spend their time on ragged tiles, short reductions and the columns their implicit
// im2col wastes. Here L images (a vector's float lanes) share every instruction instead. A block of L images is
// transposed into
//   X_t[c][row][col][lane]   (lane = image; the convolution's zero padding materialised)
// so that any tap of any output position is one vector load, every weight one broadcast, and no lane is wasted on
// geometry (only a batch that is not a multiple of L leaves lanes idle, as zeros). fprop, the fused conv +
// max-pool + ReLU, dgrad and wgrad run register tiles over this layout (channels × adjacent output columns, or
// output channels × kernel taps for wgrad); L × L in-register transposes move blocks in and out.
//
// The kernels are written once (conv2d_lanes_kernels.h) against the vector operations of lanes_vec.h and compiled
// twice below, for AVX-512 and for AVX2; the entry points pick the variant for isa() (ATEN_CPU_CAPABILITY). The
// register tiles shrink on AVX2 (16 vector registers instead of 32), nothing else changes.
//
// Results: fprop and the fused op give the same bits as the GEMM path (each output is the FMA chain over the taps
// in (c, r, s) order starting from 0, then + bias), so the fused op still equals our unfused ops bit for bit, on
// either ISA. dgrad sums over (r, s, k) in order; wgrad's partial sums follow a fixed split of the batch per thread
// count, as the GEMM path's do. No atomics: every item writes its own outputs.
//
// Used when suits()/suits_dgrad() say so: x86-64 with AVX2 or AVX-512, one group, at least L images, small planes
// and channel counts. Everything else, double and other machines included, takes the GEMMs: the portable path.
#include "conv2d_lanes.h"

#include <ATen/Parallel.h>
#include <omp.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdlib>
#include <limits>
#include <memory>
#include <new>
#include <type_traits>
#include <utility>
#include <vector>

#include "isa.h"
#include "lanes_vec.h"
#include "scratch.h"
#include "window_axis.h"

namespace cnn_ext {
namespace cpu {
namespace lanes {

#if CNN_EXT_X86

namespace {

// A block's transposed input or output planes hold at most this many positions × L lanes (1 MiB with AVX-512's
// 16), so that one block's data stays in L2 while its tiles re-read it.
constexpr int64_t kMaxBlockPositions = 16384;
int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Scratch (scratch.h) is left uninitialised: every element is written before it is read, except unpack's slack,
// which it loads past its source: whole groups of L positions (at most 16, of 16 lanes).
constexpr int64_t kSlack = 16 * 16;

struct Geo {
  int64_t n, c, h, w, k, r, s, p, q, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, hp, wp;

  explicit Geo(const ConvShape<int64_t>& x)
      : n(x.n), c(x.c), h(x.h), w(x.w), k(x.k), r(x.r), s(x.s), p(x.p), q(x.q), stride_h(x.stride_h), stride_w(x.stride_w),
        pad_h(x.pad_h), pad_w(x.pad_w), dil_h(x.dil_h), dil_w(x.dil_w), hp(x.h + 2 * x.pad_h), wp(x.w + 2 * x.pad_w) {}

  // The padded input rows [in_begin(p0), in_end(p1)) feed output rows [p0, p1).
  int64_t in_begin(int64_t p0) const { return p0 * stride_h; }
  int64_t in_end(int64_t p1) const { return (p1 - 1) * stride_h + (r - 1) * dil_h + 1; }
};

// Output rows per item when `blocks` blocks of images are split into items of rows: enough items for every thread.
int64_t rows_per_item(int64_t blocks, int64_t rows) {
  const int64_t chunks = std::min(rows, ceil_div(2 * static_cast<int64_t>(at::get_num_threads()), blocks));
  return ceil_div(rows, std::max<int64_t>(chunks, 1));
}
// Weights tap-major, wt[((c*R + r)*S + s)*K + k] = W[k][c][r][s]: one tap's output channels are contiguous.
std::vector<float> pack_taps(const Geo& g, const float* w) {
  std::vector<float> wt(g.k * g.c * g.r * g.s);
  const int64_t crs = g.c * g.r * g.s;
  for (int64_t k = 0; k < g.k; ++k) {
    for (int64_t t = 0; t < crs; ++t) wt[t * g.k + k] = w[k * crs + t];
  }
  return wt;
}

// Weights for dgrad, wd[((k*R + r)*S + s)*C + c] = W[k][c][r][s]: one tap's input channels are contiguous.
std::vector<float> pack_taps_dgrad(const Geo& g, const float* w) {
  std::vector<float> wd(g.k * g.c * g.r * g.s);
  const int64_t rs = g.r * g.s;
  for (int64_t k = 0; k < g.k; ++k) {
    for (int64_t c = 0; c < g.c; ++c) {
      for (int64_t t = 0; t < rs; ++t) wd[(k * rs + t) * g.c + c] = w[(k * g.c + c) * rs + t];
    }
  }
  return wd;
}

// The taps [lo, hi) of a kernel axis (size taps, dilation dil) that reach output positions [0, out) from input
// position i + pad: those with 0 <= i + pad - t*dil < out.
std::pair<int64_t, int64_t> valid_taps(int64_t i, int64_t pad, int64_t dil, int64_t taps, int64_t out) {
  const int64_t lo = std::max<int64_t>(0, ceil_div(std::max<int64_t>(0, i + pad - out + 1), dil));
  const int64_t hi = std::min<int64_t>(taps, (i + pad) / dil + 1);
  return {lo, std::max(lo, hi)};
}

}  // namespace

// The kernels for each ISA.
#define LANES_TARGET CNN_EXT_TARGET_AVX512
namespace avx512 {
using Vec = Avx512;
#include "conv2d_lanes_kernels.h"
}  // namespace avx512
#undef LANES_TARGET

#define LANES_TARGET CNN_EXT_TARGET_AVX2
namespace avx2 {
using Vec = Avx2;
#include "conv2d_lanes_kernels.h"
}  // namespace avx2
#undef LANES_TARGET

namespace {

bool has_lanes_isa() { return isa() == Isa::kAvx512 || isa() == Isa::kAvx2; }
int64_t lanes_of_isa() { return isa() == Isa::kAvx512 ? Avx512::L : Avx2::L; }

}  // namespace

bool supports(const ConvShape<int64_t>& cs) {
  if (!has_lanes_isa() || cs.groups != 1 || cs.n < 1) return false;
  // One block's transposed planes fit in L2 and the per-thread scratch, and conv output positions (the pooling
  // indices) fit in int32 lanes.
  const int64_t hp = cs.h + 2 * cs.pad_h, wp = cs.w + 2 * cs.pad_w;
  return cs.c * cs.r * cs.s <= 512 && cs.k <= 64 && cs.c * hp * wp <= kMaxBlockPositions &&
         cs.k * cs.p * cs.q <= kMaxBlockPositions && cs.c * cs.h * cs.w <= kMaxBlockPositions;
}

bool supports_dgrad(const ConvShape<int64_t>& cs) {
  const int64_t dy_cols = cs.w + cs.pad_w + 2 * (cs.s - 1) * cs.dil_w;
  return supports(cs) && cs.stride_h == 1 && cs.stride_w == 1 && cs.k * cs.p * dy_cols <= kMaxBlockPositions;
}

// A batch of fewer than L images would leave lanes idle: the per-image GEMMs do better. Few input channels would
// leave the dgrad tile mostly loads: the dcol GEMM does better there.
bool suits(const ConvShape<int64_t>& cs) { return supports(cs) && cs.n >= lanes_of_isa(); }
bool suits_dgrad(const ConvShape<int64_t>& cs) { return supports_dgrad(cs) && cs.n >= lanes_of_isa() && cs.c >= 8; }

// Each entry point runs its ISA's variant (supports() has checked that there is one).
void conv2d_forward(const ConvShape<int64_t>& cs, const float* x, const float* w, const float* bias, float* y) {
  isa() == Isa::kAvx512 ? avx512::conv2d_forward(cs, x, w, bias, y) : avx2::conv2d_forward(cs, x, w, bias, y);
}

void conv2d_maxpool_relu(const ConvShape<int64_t>& cs, const PoolShape<int64_t>& ps, const float* x, const float* w,
                         const float* bias, float* out, int64_t* idx) {
  isa() == Isa::kAvx512 ? avx512::conv2d_maxpool_relu(cs, ps, x, w, bias, out, idx)
                        : avx2::conv2d_maxpool_relu(cs, ps, x, w, bias, out, idx);
}

void conv2d_backward_input(const ConvShape<int64_t>& cs, const float* dy, const float* w, float* dx) {
  isa() == Isa::kAvx512 ? avx512::conv2d_backward_input(cs, dy, w, dx) : avx2::conv2d_backward_input(cs, dy, w, dx);
}

void conv2d_backward_weight(const ConvShape<int64_t>& cs, const float* dy, const float* x, float* dw) {
  isa() == Isa::kAvx512 ? avx512::conv2d_backward_weight(cs, dy, x, dw)
                        : avx2::conv2d_backward_weight(cs, dy, x, dw);
}

bool conv2d_maxpool_relu_backward(const ConvShape<int64_t>& cs, const PoolShape<int64_t>& ps, const float* go,
                                  const float* out, const int64_t* idx, const float* x, const float* w, float* dx,
                                  float* dw, float* db) {
  return isa() == Isa::kAvx512 ? avx512::conv2d_maxpool_relu_backward(cs, ps, go, out, idx, x, w, dx, dw, db)
                               : avx2::conv2d_maxpool_relu_backward(cs, ps, go, out, idx, x, w, dx, dw, db);
}

#else  // not x86-64: the GEMM path everywhere

bool supports(const ConvShape<int64_t>&) { return false; }
bool supports_dgrad(const ConvShape<int64_t>&) { return false; }
bool suits(const ConvShape<int64_t>&) { return false; }
bool suits_dgrad(const ConvShape<int64_t>&) { return false; }
void conv2d_forward(const ConvShape<int64_t>&, const float*, const float*, const float*, float*) {}
void conv2d_maxpool_relu(const ConvShape<int64_t>&, const PoolShape<int64_t>&, const float*, const float*,
                         const float*, float*, int64_t*) {}
void conv2d_backward_input(const ConvShape<int64_t>&, const float*, const float*, float*) {}
void conv2d_backward_weight(const ConvShape<int64_t>&, const float*, const float*, float*) {}
bool conv2d_maxpool_relu_backward(const ConvShape<int64_t>&, const PoolShape<int64_t>&, const float*, const float*,
                                  const int64_t*, const float*, const float*, float*, float*, float*) {
  return false;
}

#endif

}  // namespace lanes
}  // namespace cpu
}  // namespace cnn_ext
