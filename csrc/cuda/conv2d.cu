// CUDA convolution operators: argument checks (csrc/checks.h, shared with the CPU and Meta kernels), the launch
// configuration of the kernels in conv2d_kernels.cuh (tile, split-K, index width, grid) and their registration.
// The same file is compiled by nvcc for the GPU and by the host compiler for the CUDA emulator
// (csrc/emulator/conv2d.cpp), so the emulated launches are the GPU's.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <type_traits>

#include "../checks.h"
#include "conv2d_kernels.cuh"
#include "runtime.cuh"

namespace cnn_ext::gpu {
namespace {

template <typename index_t>
ConvGeometry<index_t> make_geometry(const ConvShape<int64_t>& s) {
  auto by = [](int64_t d) { return Divmod<index_t>(std::max<int64_t>(d, 1)); };
  ConvGeometry<index_t> g;
  g.n = s.n, g.c = s.c, g.h = s.h, g.w = s.w;
  g.k = s.k, g.r = s.r, g.s = s.s;
  g.p = s.p, g.q = s.q;
  g.cg = s.c / s.groups, g.kg = s.k / s.groups;
  g.stride_h = s.stride_h, g.stride_w = s.stride_w, g.pad_h = s.pad_h, g.pad_w = s.pad_w;
  g.dil_h = s.dil_h, g.dil_w = s.dil_w;
  g.by_pq = by(s.p * s.q), g.by_p = by(s.p), g.by_q = by(s.q);
  g.by_hw = by(s.h * s.w), g.by_h = by(s.h), g.by_w = by(s.w);
  g.by_rs = by(s.r * s.s), g.by_s = by(s.s);
  g.by_k = by(s.k), g.by_c = by(s.c), g.by_kg = by(s.k / s.groups);
  g.by_stride_h = by(s.stride_h), g.by_stride_w = by(s.stride_w);
  return g;
}

// Whether 32-bit indices suffice: every tensor the kernels touch, and the hyper-parameters that enter the index
// arithmetic, are small (see fits_int32).
bool conv_fits_int32(const ConvShape<int64_t>& s, int64_t workspace_numel) {
  return fits_int32({s.n * s.c * s.h * s.w, s.k * (s.c / s.groups) * s.r * s.s, s.n * s.k * s.p * s.q,
                     workspace_numel, s.stride_h, s.stride_w, s.pad_h, s.pad_w, (s.r - 1) * s.dil_h + 1,
                     (s.s - 1) * s.dil_w + 1});
}

// How a GEMM is laid over the grid.
struct GemmPlan {
  int64_t gemm_m, gemm_n, gemm_k, groups;
  int64_t tiles_m, tiles_n;
  int64_t splits, k_per_split;  // K slices, each a multiple of BK deep (the last may be shorter)

  int64_t workspace_numel() const { return splits > 1 ? splits * groups * gemm_n * gemm_m : 0; }
};

// Enough blocks to keep every SM busy with two; a K slice is at least kMinKPerSplit deep so the partial tiles'
// round trip through memory stays small next to the slice's math.
constexpr int64_t kTargetBlocksPerSm = 2;
constexpr int64_t kMinKPerSplit = 256;
constexpr int64_t kMaxSplits = 64;
constexpr int64_t kMaxGridYZ = 65535;

template <typename Tile>
GemmPlan plan_gemm(int64_t gemm_m, int64_t gemm_n, int64_t gemm_k, int64_t groups) {
  GemmPlan plan{gemm_m, gemm_n, gemm_k, groups, ceil_div<int64_t>(gemm_m, Tile::BM),
                ceil_div<int64_t>(gemm_n, Tile::BN), 1, gemm_k};
  TORCH_CHECK(plan.tiles_m <= std::numeric_limits<int32_t>::max() && plan.tiles_n <= kMaxGridYZ,
              "cnn_ext: convolution GEMM of ", gemm_m, "x", gemm_n, " is too large for the CUDA grid");
  const int64_t tiles = plan.tiles_m * plan.tiles_n * groups;
  const int64_t target_blocks = kTargetBlocksPerSm * multiprocessor_count();
  if (tiles < target_blocks && gemm_k > kMinKPerSplit) {
    const int64_t splits = std::min({ceil_div(target_blocks, tiles), ceil_div(gemm_k, kMinKPerSplit), kMaxSplits});
    plan.k_per_split = ceil_div<int64_t>(ceil_div(gemm_k, splits), Tile::BK) * Tile::BK;
    plan.splits = ceil_div(gemm_k, plan.k_per_split);  // rounding k_per_split up may leave fewer slices
  }
  return plan;
}

template <typename Tile, typename Problem>
void run_implicit_gemm(const Problem& problem, const GemmPlan& plan, const at::TensorOptions& options) {
  using acc_t = typename Problem::acc_t;
  using index_t = typename Problem::index_t;
  at::Tensor workspace;
  acc_t* workspace_ptr = nullptr;
  if (plan.splits > 1) {
    workspace = at::empty({plan.workspace_numel()}, options.dtype(c10::CppTypeToScalarType<acc_t>::value));
    workspace_ptr = workspace.mutable_data_ptr<acc_t>();
  }
  const dim3 grid(static_cast<unsigned>(plan.tiles_m), static_cast<unsigned>(plan.tiles_n),
                  static_cast<unsigned>(std::min(plan.groups * plan.splits, kMaxGridYZ)));
  launch<implicit_gemm_kernel<Tile, Problem>>({grid, Tile::kThreads}, problem, static_cast<index_t>(plan.splits),
         static_cast<index_t>(plan.k_per_split), workspace_ptr);
  if (plan.splits > 1) {
    launch<split_k_reduce_kernel<Problem>>({elementwise_blocks(plan.groups * plan.gemm_n * plan.gemm_m), kElementwiseThreads}, problem,
           static_cast<index_t>(plan.splits), workspace_ptr);
  }
}

// Calls f(tile, index_tag, plan) for a GEMM of m×n×k per group: the tile gemm_tile_choice() names where it serves
// (not float64, and 32-bit indices suffice for its plan), else DefaultTile with the index width the shape needs.
template <typename scalar_t, typename F>
void dispatch_gemm(const ConvShape<int64_t>& s, int64_t m, int64_t n, int64_t k, F&& f) {
  if constexpr (!std::is_same_v<scalar_t, double>) {
    auto with_int32 = [&](auto tile) {
      const auto plan = plan_gemm<decltype(tile)>(m, n, k, s.groups);
      if (!conv_fits_int32(s, plan.workspace_numel())) return false;
      f(tile, int32_t{}, plan);
      return true;
    };
    switch (gemm_tile_choice()) {
      case GemmTileChoice::k128x64:
        if (with_int32(WideTile{})) return;
        break;
      case GemmTileChoice::k128x128:
        if (with_int32(LargeTile{})) return;
        break;
      case GemmTileChoice::k64x64:
        break;
    }
  }
  const auto plan = plan_gemm<DefaultTile>(m, n, k, s.groups);
  dispatch_index_type(conv_fits_int32(s, plan.workspace_numel()),
                      [&](auto index_tag) { f(DefaultTile{}, index_tag, plan); });
}

template <typename Problem>
void set_gemm_dims(Problem& problem, const ConvShape<int64_t>& s, const GemmPlan& plan) {
  using index_t = typename Problem::index_t;
  problem.geo = make_geometry<index_t>(s);
  problem.gemm_m = static_cast<index_t>(plan.gemm_m);
  problem.gemm_n = static_cast<index_t>(plan.gemm_n);
  problem.gemm_k = static_cast<index_t>(plan.gemm_k);
  problem.groups = static_cast<index_t>(plan.groups);
}

// ---------------------------------------------------------------------------------------------------------------
// Host side.
// ---------------------------------------------------------------------------------------------------------------

bool one_input_channel_per_group(const ConvShape<int64_t>& s) { return s.c == s.groups; }

template <typename scalar_t>
void conv2d_forward(const ConvShape<int64_t>& s, const at::Tensor& input, const at::Tensor& weight,
                    const scalar_t* bias, at::Tensor& output) {
  if (one_input_channel_per_group(s)) {
    dispatch_index_type(conv_fits_int32(s, 0), [&](auto index_tag) {
      using index_t = decltype(index_tag);
      const int64_t total = output.numel();
      launch<direct_fprop_kernel<scalar_t, index_t>>({elementwise_blocks(total), kElementwiseThreads},
             input.const_data_ptr<scalar_t>(), weight.const_data_ptr<scalar_t>(), bias,
             output.mutable_data_ptr<scalar_t>(), make_geometry<index_t>(s), static_cast<index_t>(total));
    });
    return;
  }
  dispatch_gemm<scalar_t>(s, s.n * s.p * s.q, s.k / s.groups, s.c / s.groups * s.r * s.s,
                          [&](auto tile, auto index_tag, const GemmPlan& plan) {
    FpropProblem<scalar_t, decltype(index_tag)> problem;
    set_gemm_dims(problem, s, plan);
    problem.input = input.const_data_ptr<scalar_t>();
    problem.weight = weight.const_data_ptr<scalar_t>();
    problem.bias = bias;
    problem.output = output.mutable_data_ptr<scalar_t>();
    run_implicit_gemm<decltype(tile)>(problem, plan, input.options());
  });
}

// The input gradient's GEMM has N = C/groups columns in tiles of DefaultTile::BN = 64: at or below this many the
// direct kernel (one thread per input element) does less idle work.
constexpr int64_t kDirectDgradMaxChannels = 16;

template <typename scalar_t>
void conv2d_input_grad(const ConvShape<int64_t>& s, const at::Tensor& grad_output, const at::Tensor& weight,
                       at::Tensor& grad_input) {
  if (s.c / s.groups <= kDirectDgradMaxChannels) {
    dispatch_index_type(conv_fits_int32(s, 0), [&](auto index_tag) {
      using index_t = decltype(index_tag);
      const int64_t total = grad_input.numel();
      launch<direct_dgrad_kernel<scalar_t, index_t>>({elementwise_blocks(total), kElementwiseThreads},
             grad_output.const_data_ptr<scalar_t>(), weight.const_data_ptr<scalar_t>(),
             grad_input.mutable_data_ptr<scalar_t>(), make_geometry<index_t>(s), static_cast<index_t>(total));
    });
    return;
  }
  dispatch_gemm<scalar_t>(s, s.n * s.h * s.w, s.c / s.groups, s.k / s.groups * s.r * s.s,
                          [&](auto tile, auto index_tag, const GemmPlan& plan) {
    DgradProblem<scalar_t, decltype(index_tag)> problem;
    set_gemm_dims(problem, s, plan);
    problem.grad_output = grad_output.const_data_ptr<scalar_t>();
    problem.weight = weight.const_data_ptr<scalar_t>();
    problem.grad_input = grad_input.mutable_data_ptr<scalar_t>();
    run_implicit_gemm<decltype(tile)>(problem, plan, grad_output.options());
  });
}

template <typename scalar_t>
void conv2d_weight_grad(const ConvShape<int64_t>& s, const at::Tensor& grad_output, const at::Tensor& input,
                        at::Tensor& grad_weight) {
  if (one_input_channel_per_group(s)) {
    dispatch_index_type(conv_fits_int32(s, 0), [&](auto index_tag) {
      using index_t = decltype(index_tag);
      const int64_t weight_numel = grad_weight.numel();
      const auto blocks = static_cast<unsigned>(std::min(weight_numel, kMaxElementwiseBlocks));
      launch<direct_wgrad_kernel<scalar_t, index_t>>({blocks, kReduceThreads}, grad_output.const_data_ptr<scalar_t>(),
             input.const_data_ptr<scalar_t>(), grad_weight.mutable_data_ptr<scalar_t>(), make_geometry<index_t>(s),
             static_cast<index_t>(weight_numel));
    });
    return;
  }
  dispatch_gemm<scalar_t>(s, s.k / s.groups, s.c / s.groups * s.r * s.s, s.n * s.p * s.q,
                          [&](auto tile, auto index_tag, const GemmPlan& plan) {
    WgradProblem<scalar_t, decltype(index_tag)> problem;
    set_gemm_dims(problem, s, plan);
    problem.grad_output = grad_output.const_data_ptr<scalar_t>();
    problem.input = input.const_data_ptr<scalar_t>();
    problem.grad_weight = grad_weight.mutable_data_ptr<scalar_t>();
    run_implicit_gemm<decltype(tile)>(problem, plan, grad_output.options());
  });
}

at::Tensor conv2d_cuda(const at::Tensor& input_arg, const at::Tensor& weight_arg,
                       const c10::optional<at::Tensor>& bias_arg, c10::IntArrayRef stride, c10::IntArrayRef padding,
                       c10::IntArrayRef dilation, int64_t groups) {
  const char* op = "cnn_ext.conv2d";
  const auto shape = check_conv2d<int64_t>(op, input_arg, weight_arg, bias_arg, stride, padding, dilation, groups);
  check_cuda_dtype(op, input_arg, "input");
  const DeviceGuard device_guard(input_arg.device());
  const at::Tensor input = input_arg.contiguous();
  const at::Tensor weight = weight_arg.contiguous();
  const at::Tensor bias = bias_arg.has_value() ? bias_arg->contiguous() : at::Tensor();
  at::Tensor output = at::empty(shape.output_sizes(), input.options());
  if (output.numel() == 0) return output;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "cnn_ext_conv2d_cuda", [&] {
    conv2d_forward<scalar_t>(shape, input, weight, bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr,
                             output);
  });
  return output;
}

at::Tensor conv2d_backward_input_cuda(const at::Tensor& grad_output_arg, const at::Tensor& weight_arg,
                                      c10::IntArrayRef input_size, c10::IntArrayRef stride, c10::IntArrayRef padding,
                                      c10::IntArrayRef dilation, int64_t groups) {
  const char* op = "cnn_ext.conv2d_backward_input";
  const auto shape = check_conv2d_backward_input<int64_t>(op, grad_output_arg, weight_arg, input_size, stride,
                                                          padding, dilation, groups);
  check_cuda_dtype(op, grad_output_arg, "grad_output");
  const DeviceGuard device_guard(grad_output_arg.device());
  const at::Tensor grad_output = grad_output_arg.contiguous();
  const at::Tensor weight = weight_arg.contiguous();
  at::Tensor grad_input = at::empty(shape.input_sizes(), grad_output.options());
  if (grad_input.numel() == 0) return grad_input;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_output.scalar_type(),
                                  "cnn_ext_conv2d_backward_input_cuda",
                                  [&] { conv2d_input_grad<scalar_t>(shape, grad_output, weight, grad_input); });
  return grad_input;
}

at::Tensor conv2d_backward_weight_cuda(const at::Tensor& grad_output_arg, const at::Tensor& input_arg,
                                       c10::IntArrayRef weight_size, c10::IntArrayRef stride,
                                       c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t groups) {
  const char* op = "cnn_ext.conv2d_backward_weight";
  const auto shape = check_conv2d_backward_weight<int64_t>(op, grad_output_arg, input_arg, weight_size, stride,
                                                           padding, dilation, groups);
  check_cuda_dtype(op, grad_output_arg, "grad_output");
  const DeviceGuard device_guard(grad_output_arg.device());
  const at::Tensor grad_output = grad_output_arg.contiguous();
  const at::Tensor input = input_arg.contiguous();
  at::Tensor grad_weight = at::empty(shape.weight_sizes(), grad_output.options());
  if (grad_weight.numel() == 0) return grad_weight;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_output.scalar_type(),
                                  "cnn_ext_conv2d_backward_weight_cuda",
                                  [&] { conv2d_weight_grad<scalar_t>(shape, grad_output, input, grad_weight); });
  return grad_weight;
}

at::Tensor conv2d_backward_bias_cuda(const at::Tensor& grad_output_arg) {
  const char* op = "cnn_ext.conv2d_backward_bias";
  check_conv2d_backward_bias(op, grad_output_arg);
  check_cuda_dtype(op, grad_output_arg, "grad_output");
  const DeviceGuard device_guard(grad_output_arg.device());
  const at::Tensor grad_output = grad_output_arg.contiguous();
  const int64_t batch = grad_output.size(0), channels = grad_output.size(1);
  const int64_t plane = grad_output.size(2) * grad_output.size(3);
  at::Tensor grad_bias = at::empty({channels}, grad_output.options());
  if (channels == 0) return grad_bias;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_output.scalar_type(),
                                  "cnn_ext_conv2d_backward_bias_cuda", [&] {
    dispatch_index_type(fits_int32({grad_output.numel()}), [&](auto index_tag) {
      using index_t = decltype(index_tag);
      const auto blocks = static_cast<unsigned>(std::min(channels, kMaxElementwiseBlocks));
      // With nothing to reduce (batch or plane empty) the kernel writes zeros; the divisor is then unused.
      launch<bias_grad_kernel<scalar_t, index_t>>({blocks, kReduceThreads}, grad_output.const_data_ptr<scalar_t>(),
             grad_bias.mutable_data_ptr<scalar_t>(), static_cast<index_t>(channels),
             static_cast<index_t>(batch * plane), Divmod<index_t>(std::max<int64_t>(plane, 1)));
    });
  });
  return grad_bias;
}

}  // namespace

CNN_EXT_CUDA_KERNELS(m) {
  m.impl("conv2d", &conv2d_cuda);
  m.impl("conv2d_backward_input", &conv2d_backward_input_cuda);
  m.impl("conv2d_backward_weight", &conv2d_backward_weight_cuda);
  m.impl("conv2d_backward_bias", &conv2d_backward_bias_cuda);
}

}  // namespace cnn_ext::gpu
