// CPU dropout (cnn_ext.dropout, cnn_ext.dropout_backward): each value is kept with probability 1 - p and scaled by
// 1 / (1 - p), or zeroed, as torch's dropout; the forward also returns the bool mask of the kept values, which the
// backward applies to the gradient.
//
// The random bits are a counter-based generator: value i of the (contiguous) input takes one 32-bit half of
// SplitMix64's output for counter i / 2 under the call's 64-bit seed, z = seed + (i / 2 + 1)·γ, mixed by two
// multiply-xorshift rounds (Steele, Lea and Flood's SplitMix64, which passes BigCrush). Kept when that half is at
// least round(p·2³²). So the mask depends on the seed and the value's position only: not on the thread count, the
// ISA or the dtype. The caller draws the seed from torch's generator (cnn_ext.functional.dropout), so
// torch.manual_seed makes runs repeat. On DeepMNIST's 128x3200 activations, 2-core AMD machine: torch's own CPU
// dropout (bernoulli_ into a bool tensor, then two multiplies) 3.5-4.6 ms forward, 0.2 ms backward; these 0.07 and
// 0.09 ms (AVX-512), 0.14 and 0.12 (AVX2), 0.21 and 0.15 (portable).
//
//   forward:  y = (x · kept) · scale,  backward: dx = (dy · kept) · scale,  scale = 1 / (1 - p) (0 when p = 1)
// as torch computes them, so NaN and infinities propagate as in torch (a dropped inf gives NaN).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>

#include "../checks.h"
#include "isa.h"
#include "output_cache.h"

namespace cnn_ext::cpu {
namespace {

constexpr uint64_t kGamma = 0x9E3779B97F4A7C15ull;  // SplitMix64's increment: 2^64 / the golden ratio
// Values per block: a task's unit of work, and the random bits of one block sit in a stack buffer.
constexpr int64_t kBlock = 1024;

// The smallest 32-bit draw that keeps a value, round(p·2³²), where it is below 2³²; else nothing is kept.
struct KeepRule {
  uint32_t threshold;
  bool none;
};
KeepRule keep_rule(double p) {
  const auto t = static_cast<uint64_t>(std::llround(std::ldexp(p, 32)));
  return {static_cast<uint32_t>(std::min<uint64_t>(t, std::numeric_limits<uint32_t>::max())),
          t > std::numeric_limits<uint32_t>::max()};
}

double dropout_scale(double p) { return p == 1.0 ? 0.0 : 1.0 / (1.0 - p); }

// Values [first, last) of the input (first even): their random draws, the kept mask and the output. Compiled per
// ISA (PerIsa); both loops vectorise (the first into 64-bit multiplies, the second into compares and blends).
template <typename T>
__attribute__((always_inline)) inline void dropout_block(const T* __restrict x, T* __restrict y,
                                                         bool* __restrict kept, int64_t first, int64_t last,
                                                         uint64_t seed, KeepRule rule, T scale) {
  uint64_t draws[kBlock / 2];
  const int64_t pairs = (last - first + 1) / 2;
  const uint64_t counter = static_cast<uint64_t>(first / 2);
  for (int64_t k = 0; k < pairs; ++k) {
    uint64_t z = seed + (counter + static_cast<uint64_t>(k) + 1) * kGamma;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    draws[k] = z ^ (z >> 31);
  }
  // Value first + j takes the low 32 bits of draws[j / 2] for even j, the high 32 for odd j.
  uint32_t halves[kBlock];
  for (int64_t k = 0; k < pairs; ++k) {
    halves[2 * k] = static_cast<uint32_t>(draws[k]);
    halves[2 * k + 1] = static_cast<uint32_t>(draws[k] >> 32);
  }
  for (int64_t j = 0; j < last - first; ++j) {
    const int32_t keep = (halves[j] >= rule.threshold) & !rule.none;  // 0 or 1, as wide as a float's lanes
    kept[first + j] = keep;
    y[first + j] = (x[first + j] * static_cast<T>(keep)) * scale;
  }
}

template <typename T>
void dropout_values(const T* x, T* y, bool* kept, int64_t numel, uint64_t seed, double p) {
  const auto block = PerIsa<&dropout_block<T>>::pick();
  const KeepRule rule = keep_rule(p);
  const T scale = static_cast<T>(dropout_scale(p));
  at::parallel_for(0, (numel + kBlock - 1) / kBlock, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      block(x, y, kept, b * kBlock, std::min(numel, (b + 1) * kBlock), seed, rule, scale);
    }
  });
}

// dx = (dy · kept) · scale. Compiled per ISA (PerIsa).
template <typename T>
__attribute__((always_inline)) inline void dropout_backward_values(const T* __restrict dy, const bool* __restrict kept,
                                                                   T* __restrict dx, int64_t first, int64_t last,
                                                                   T scale) {
  for (int64_t i = first; i < last; ++i) dx[i] = (dy[i] * static_cast<T>(kept[i])) * scale;
}

std::tuple<at::Tensor, at::Tensor> dropout_cpu(const at::Tensor& input_, double p, int64_t seed) {
  constexpr const char* op = "cnn_ext.dropout";
  check_dropout(op, input_, p);
  check_backend_dtype(op, input_, "input", {at::kFloat, at::kDouble}, "CPU");
  const at::Tensor input = input_.contiguous();
  at::Tensor output = empty_output(input.sizes(), input.options());
  at::Tensor kept = empty_output(input.sizes(), input.options().dtype(at::kBool));
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "cnn_ext_dropout_cpu", [&] {
    dropout_values<scalar_t>(input.const_data_ptr<scalar_t>(), output.mutable_data_ptr<scalar_t>(),
                             kept.mutable_data_ptr<bool>(), input.numel(), static_cast<uint64_t>(seed), p);
  });
  return {output, kept};
}

at::Tensor dropout_backward_cpu(const at::Tensor& grad_output_, const at::Tensor& kept_, double p) {
  constexpr const char* op = "cnn_ext.dropout_backward";
  check_dropout_backward(op, grad_output_, kept_, p);
  check_backend_dtype(op, grad_output_, "grad_output", {at::kFloat, at::kDouble}, "CPU");
  const at::Tensor grad_output = grad_output_.contiguous(), kept = kept_.contiguous();
  at::Tensor grad_input = empty_output(grad_output.sizes(), grad_output.options());
  AT_DISPATCH_FLOATING_TYPES(grad_output.scalar_type(), "cnn_ext_dropout_backward_cpu", [&] {
    const auto values = PerIsa<&dropout_backward_values<scalar_t>>::pick();
    const scalar_t* dy = grad_output.const_data_ptr<scalar_t>();
    const bool* k = kept.const_data_ptr<bool>();
    scalar_t* dx = grad_input.mutable_data_ptr<scalar_t>();
    const auto scale = static_cast<scalar_t>(dropout_scale(p));
    at::parallel_for(0, grad_output.numel(), 16 * kBlock,
                     [&](int64_t first, int64_t last) { values(dy, k, dx, first, last, scale); });
  });
  return grad_input;
}

}  // namespace

TORCH_LIBRARY_IMPL(cnn_ext, CPU, m) {
  m.impl("dropout", &dropout_cpu);
  m.impl("dropout_backward", &dropout_backward_cpu);
}

}  // namespace cnn_ext::cpu
