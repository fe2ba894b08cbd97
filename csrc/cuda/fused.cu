// CUDA fused conv2d + bias + max_pool2d + ReLU operator: argument checks (csrc/checks.h), the launch of the kernel
// in fused_kernels.cuh and its registration. Compiled by nvcc for the GPU and by the host compiler for the CUDA
// emulator (csrc/emulator/fused.cpp). The backward pass is the composite conv2d_maxpool_relu_backward
// (csrc/composite.cpp): conv2d_maxpool_relu_backward_pool, then the convolution's backward ops.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include "../checks.h"
#include "fused_kernels.cuh"
#include "runtime.cuh"

namespace cnn_ext::gpu {
namespace {

// Output channels handled by one grid row; more are grid-strided (gridDim.y is limited to 65535).
constexpr int64_t kMaxGridY = 65535;

template <typename index_t>
FusedGeometry<index_t> make_geometry(const ConvPoolShape<int64_t>& shape) {
  const auto& cs = shape.conv;
  const auto& ps = shape.pool;
  FusedGeometry<index_t> g;
  g.n = cs.n, g.c = cs.c, g.h = cs.h, g.w = cs.w, g.k = cs.k, g.r = cs.r, g.s = cs.s, g.p = cs.p, g.q = cs.q;
  g.cg = cs.c / cs.groups, g.kg = cs.k / cs.groups;
  g.stride_h = cs.stride_h, g.stride_w = cs.stride_w, g.pad_h = cs.pad_h, g.pad_w = cs.pad_w;
  g.dil_h = cs.dil_h, g.dil_w = cs.dil_w;
  g.pp = ps.p, g.pq = ps.q;
  g.pool_kh = ps.kh, g.pool_kw = ps.kw, g.pool_stride_h = ps.stride_h, g.pool_stride_w = ps.stride_w;
  g.pool_pad_h = ps.pad_h, g.pool_pad_w = ps.pad_w, g.pool_dil_h = ps.dil_h, g.pool_dil_w = ps.dil_w;
  g.weights_per_channel = (cs.c / cs.groups) * cs.r * cs.s;
  // check_conv2d_maxpool_relu guarantees PP, PQ >= 1.
  g.by_ppq = Divmod<index_t>(ps.p * ps.q), g.by_pq = Divmod<index_t>(ps.q);
  return g;
}

// 32-bit indices when every tensor (the unstored convolution output included: indices point into it) and every
// window extent is small (see fits_int32).
bool fused_fits_int32(const ConvPoolShape<int64_t>& shape) {
  const auto& cs = shape.conv;
  const auto& ps = shape.pool;
  return fits_int32({cs.n * cs.c * cs.h * cs.w, cs.k * (cs.c / cs.groups) * cs.r * cs.s, cs.n * cs.k * cs.p * cs.q,
                     cs.n * cs.k * ps.p * ps.q, cs.stride_h, cs.stride_w, cs.pad_h, cs.pad_w,
                     (cs.r - 1) * cs.dil_h + 1, (cs.s - 1) * cs.dil_w + 1, ps.stride_h, ps.stride_w, ps.pad_h,
                     ps.pad_w, (ps.kh - 1) * ps.dil_h + 1, (ps.kw - 1) * ps.dil_w + 1});
}

std::tuple<at::Tensor, at::Tensor> conv2d_maxpool_relu_cuda(
    const at::Tensor& input_arg, const at::Tensor& weight_arg, const c10::optional<at::Tensor>& bias_arg,
    c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t groups,
    c10::IntArrayRef pool_kernel_size, c10::IntArrayRef pool_stride, c10::IntArrayRef pool_padding,
    c10::IntArrayRef pool_dilation, bool ceil_mode) {
  const char* op = "cnn_ext.conv2d_maxpool_relu";
  const auto shape = check_conv2d_maxpool_relu<int64_t>(op, input_arg, weight_arg, bias_arg, stride, padding,
                                                        dilation, groups, pool_kernel_size, pool_stride,
                                                        pool_padding, pool_dilation, ceil_mode);
  check_cuda_dtype(op, input_arg, "input");
  const DeviceGuard device_guard(input_arg.device());
  const at::Tensor input = input_arg.contiguous();
  const at::Tensor weight = weight_arg.contiguous();
  const at::Tensor bias = bias_arg.has_value() ? bias_arg->contiguous() : at::Tensor();
  const auto out_sizes = shape.pool.output_sizes();
  at::Tensor output = at::empty(out_sizes, input.options());
  at::Tensor indices = at::empty(out_sizes, input.options().dtype(at::kLong));
  if (output.numel() == 0) return {output, indices};
  const int64_t positions = shape.conv.n * shape.pool.p * shape.pool.q;  // per output channel
  const dim3 grid(elementwise_blocks(positions), static_cast<unsigned>(std::min(shape.conv.k, kMaxGridY)));
  const bool weights_in_shared =
      (shape.conv.c / shape.conv.groups) * shape.conv.r * shape.conv.s <= kMaxSharedWeights;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "cnn_ext_conv2d_maxpool_relu_cuda",
                                  [&] {
    dispatch_index_type(fused_fits_int32(shape), [&](auto index_tag) {
      using index_t = decltype(index_tag);
      launch<conv2d_maxpool_relu_kernel<scalar_t, index_t>>({grid, kElementwiseThreads},
             input.const_data_ptr<scalar_t>(), weight.const_data_ptr<scalar_t>(),
             bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr, output.mutable_data_ptr<scalar_t>(),
             indices.mutable_data_ptr<int64_t>(), make_geometry<index_t>(shape), weights_in_shared);
    });
  });
  return {output, indices};
}

}  // namespace

CNN_EXT_CUDA_KERNELS(m) {
  m.impl("conv2d_maxpool_relu", &conv2d_maxpool_relu_cuda);
}

}  // namespace cnn_ext::gpu
