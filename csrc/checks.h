// Argument checks and output-size math for every cnn_ext op.
//
// This is the one place these facts live: the CPU kernels, the CUDA kernels and the Meta (fake) kernels
// all call the functions below. Sizes are templated on T so the same code serves concrete shapes
// (int64_t) and the symbolic shapes torch.compile traces with (c10::SymInt).
//
// Errors use TORCH_CHECK_VALUE / TORCH_CHECK_TYPE so Python sees ValueError / TypeError, and every
// message starts with the op and names the offending argument.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/SymInt.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <array>
#include <cmath>
#include <initializer_list>
#include <utility>

namespace cnn_ext {

// ---------------------------------------------------------------------------------------------------------------
// Tensor-level checks shared by all ops.
// ---------------------------------------------------------------------------------------------------------------

inline void check_floating(const char* op, const at::Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()), op, ": ", name,
                   " must be a floating-point tensor (float32, float64, float16 or bfloat16), got ",
                   t.scalar_type());
}

inline void check_dim(const char* op, const at::Tensor& t, const char* name, int64_t dim, const char* layout) {
  TORCH_CHECK_VALUE(t.dim() == dim, op, ": ", name, " must be a ", dim, "-D ", layout, " tensor, got a ",
                    t.dim(), "-D tensor of shape ", t.sizes());
}

// All tensors must share the first tensor's dtype and device.
inline void check_same_dtype_device(const char* op,
                                    std::initializer_list<std::pair<const at::Tensor*, const char*>> tensors) {
  const auto& [first, first_name] = *tensors.begin();
  for (const auto& [t, name] : tensors) {
    TORCH_CHECK_TYPE(t->scalar_type() == first->scalar_type(), op, ": ", name, " has dtype ", t->scalar_type(),
                     " but ", first_name, " has dtype ", first->scalar_type(), "; they must match");
    TORCH_CHECK_VALUE(t->device() == first->device(), op, ": ", name, " is on ", t->device(), " but ", first_name,
                      " is on ", first->device(), "; all tensors must be on the same device");
  }
}

// Backends call this with the dtypes they have kernels for.
inline void check_backend_dtype(const char* op, const at::Tensor& t, const char* name,
                                std::initializer_list<at::ScalarType> supported, const char* backend) {
  for (auto s : supported) {
    if (t.scalar_type() == s) return;
  }
  TORCH_CHECK_TYPE(false, op, ": ", name, " has dtype ", t.scalar_type(), ", which the ", backend,
                   " kernels do not support (", backend == std::string("CPU") ? "float32, float64" :
                   "float32, float64, float16, bfloat16", ")");
}

// ---------------------------------------------------------------------------------------------------------------
// Scalar argument checks.
// ---------------------------------------------------------------------------------------------------------------

inline void check_pair(const char* op, c10::IntArrayRef v, const char* name, int64_t min_value) {
  TORCH_CHECK_VALUE(v.size() == 2, op, ": ", name, " must have 2 elements (height, width), got ", v.size());
  TORCH_CHECK_VALUE(v[0] >= min_value && v[1] >= min_value, op, ": ", name, " must be ",
                    min_value == 0 ? "non-negative" : "positive", ", got ", v);
}

template <typename T>
void check_sizes4(const char* op, c10::ArrayRef<T> sizes, const char* name) {
  TORCH_CHECK_VALUE(sizes.size() == 4, op, ": ", name, " must have 4 elements (N, C, H, W), got ", sizes.size());
  for (const auto& s : sizes) {
    TORCH_CHECK_VALUE(s >= 0, op, ": ", name, " must be non-negative, got ", sizes);
  }
}

// Sizes of a tensor as T: concrete sizes for kernels, symbolic ones for fake kernels.
template <typename T>
c10::ArrayRef<T> sizes_of(const at::Tensor& t);
template <>
inline c10::ArrayRef<int64_t> sizes_of<int64_t>(const at::Tensor& t) { return t.sizes(); }
template <>
inline c10::ArrayRef<c10::SymInt> sizes_of<c10::SymInt>(const at::Tensor& t) { return t.sym_sizes(); }

// ---------------------------------------------------------------------------------------------------------------
// Output-size math. One formula serves convolution and pooling (torch's pooling_output_shape):
//   out = floor_or_ceil((in + 2*pad - dilation*(k-1) - 1) / stride) + 1
// With ceil_mode the last window must start inside the input or the left padding.
// ---------------------------------------------------------------------------------------------------------------

// The value of a size when it is known (always for int64_t; for a SymInt, when it is not symbolic).
inline c10::optional<int64_t> known_value(int64_t v) { return v; }
inline c10::optional<int64_t> known_value(const c10::SymInt& v) { return v.maybe_as_int(); }

// Sizes this large make `in + 2*pad` or `dilation*(k-1)` overflow 64-bit arithmetic; torch rejects them too.
constexpr int64_t kMaxExtent = int64_t(1) << 62;

template <typename T>
void check_window_extent(const char* op, const char* dim_name, const T& in, const T& k, int64_t pad,
                         int64_t dilation) {
  const auto in_value = known_value(in), k_value = known_value(k);
  // A symbolic size is a real tensor's, far below the limit; the hyper-parameters are always concrete.
  const __int128 padded = static_cast<__int128>(in_value.value_or(0)) + 2 * static_cast<__int128>(pad);
  const __int128 span = static_cast<__int128>(dilation) * (k_value.value_or(1) - 1) + 1;
  TORCH_CHECK_VALUE(padded < kMaxExtent, op, ": padding ", pad, " is too large for the input ", dim_name);
  TORCH_CHECK_VALUE(span < kMaxExtent, op, ": dilation ", dilation, " with kernel_size ", k_value.value_or(-1),
                    " spans more than 2^62 input pixels along the ", dim_name);
}

template <typename T>
T window_output_size(const char* op, const char* dim_name, const T& in, const T& k, int64_t stride, int64_t pad,
                     int64_t dilation, bool ceil_mode) {
  check_window_extent(op, dim_name, in, k, pad, dilation);
  const T span = in + 2 * pad - dilation * (k - 1) - 1 + (ceil_mode ? stride - 1 : 0);
  TORCH_CHECK_VALUE(span >= 0, op, ": kernel_size ", k, " (dilation ", dilation, ", so ", dilation * (k - 1) + 1,
                    " input pixels) is larger than the padded input ", dim_name, " ", in, " + 2*", pad);
  T out = span / stride + 1;
  if (ceil_mode && (out - 1) * stride >= in + pad) out = out - 1;
  TORCH_CHECK_VALUE(out >= 1, op, ": output ", dim_name, " would be ", out, " for input ", dim_name, " ", in,
                    ", kernel_size ", k, ", stride ", stride, ", padding ", pad, ", dilation ", dilation);
  return out;
}

// ---------------------------------------------------------------------------------------------------------------
// Convolution. Names follow CUTLASS: input N×C×H×W, weight K×(C/groups)×R×S, output N×K×P×Q.
// ---------------------------------------------------------------------------------------------------------------

template <typename T>
struct ConvShape {
  T n, c, h, w;  // input
  T k, r, s;     // weight: k output channels, r×s kernel
  T p, q;        // output spatial size
  int64_t stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, groups;

  std::array<T, 4> input_sizes() const { return {n, c, h, w}; }
  std::array<T, 4> weight_sizes() const { return {k, c / groups, r, s}; }
  std::array<T, 4> output_sizes() const { return {n, k, p, q}; }
};

// Validates shapes and hyper-parameters and computes the output size.
template <typename T>
ConvShape<T> conv2d_shape(const char* op, c10::ArrayRef<T> input, c10::ArrayRef<T> weight,
                          c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef dilation,
                          int64_t groups) {
  check_sizes4(op, input, "input size");
  check_sizes4(op, weight, "weight size");
  check_pair(op, stride, "stride", 1);
  check_pair(op, padding, "padding", 0);
  check_pair(op, dilation, "dilation", 1);
  TORCH_CHECK_VALUE(groups >= 1, op, ": groups must be positive, got ", groups);

  ConvShape<T> s{input[0], input[1], input[2], input[3], weight[0], weight[2], weight[3], T(0), T(0),
                 stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1], groups};
  TORCH_CHECK_VALUE(s.c % groups == 0, op, ": groups=", groups, " must divide the input channels C=", s.c);
  TORCH_CHECK_VALUE(s.k % groups == 0, op, ": groups=", groups, " must divide the weight's output channels K=", s.k);
  TORCH_CHECK_VALUE(weight[1] * groups == s.c, op, ": weight of shape ", weight, " with groups=", groups,
                    " expects ", weight[1] * groups, " input channels, but input has C=", s.c);
  TORCH_CHECK_VALUE(s.r >= 1 && s.s >= 1, op, ": weight must have a kernel of at least 1×1, got shape ", weight);
  s.p = window_output_size<T>(op, "height", s.h, s.r, s.stride_h, s.pad_h, s.dil_h, false);
  s.q = window_output_size<T>(op, "width", s.w, s.s, s.stride_w, s.pad_w, s.dil_w, false);
  return s;
}


// Forward: tensor checks plus the shape.
template <typename T>
ConvShape<T> check_conv2d(const char* op, const at::Tensor& input, const at::Tensor& weight,
                          const c10::optional<at::Tensor>& bias, c10::IntArrayRef stride, c10::IntArrayRef padding,
                          c10::IntArrayRef dilation, int64_t groups) {
  check_dim(op, input, "input", 4, "(N, C, H, W)");
  check_dim(op, weight, "weight", 4, "(K, C/groups, R, S)");
  check_floating(op, input, "input");
  if (bias.has_value()) {
    check_dim(op, *bias, "bias", 1, "(K)");
    check_same_dtype_device(op, {{&input, "input"}, {&weight, "weight"}, {&*bias, "bias"}});
  } else {
    check_same_dtype_device(op, {{&input, "input"}, {&weight, "weight"}});
  }
  auto s = conv2d_shape<T>(op, sizes_of<T>(input), sizes_of<T>(weight), stride, padding, dilation, groups);
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(sizes_of<T>(*bias)[0] == s.k, op, ": bias must have K=", s.k, " elements, got ",
                      sizes_of<T>(*bias)[0]);
  }
  return s;
}

template <typename T>
void check_grad_output(const char* op, const at::Tensor& grad_output, c10::ArrayRef<T> expected) {
  check_dim(op, grad_output, "grad_output", 4, "(N, K, P, Q)");
  check_floating(op, grad_output, "grad_output");
  auto got = sizes_of<T>(grad_output);
  for (size_t i = 0; i < 4; ++i) {
    TORCH_CHECK_VALUE(got[i] == expected[i], op, ": grad_output has shape ", got, " but the forward output has shape ",
                      expected);
  }
}

// Gradient w.r.t. the input (CUTLASS dgrad): grad_output and weight given, input_size names the input.
template <typename T>
ConvShape<T> check_conv2d_backward_input(const char* op, const at::Tensor& grad_output, const at::Tensor& weight,
                                         c10::ArrayRef<T> input_size, c10::IntArrayRef stride,
                                         c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t groups) {
  check_dim(op, weight, "weight", 4, "(K, C/groups, R, S)");
  check_same_dtype_device(op, {{&grad_output, "grad_output"}, {&weight, "weight"}});
  auto s = conv2d_shape<T>(op, input_size, sizes_of<T>(weight), stride, padding, dilation, groups);
  auto out = s.output_sizes();
  check_grad_output<T>(op, grad_output, out);
  return s;
}

// Gradient w.r.t. the weight (CUTLASS wgrad): grad_output and input given, weight_size names the weight.
template <typename T>
ConvShape<T> check_conv2d_backward_weight(const char* op, const at::Tensor& grad_output, const at::Tensor& input,
                                          c10::ArrayRef<T> weight_size, c10::IntArrayRef stride,
                                          c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t groups) {
  check_dim(op, input, "input", 4, "(N, C, H, W)");
  check_same_dtype_device(op, {{&grad_output, "grad_output"}, {&input, "input"}});
  auto s = conv2d_shape<T>(op, sizes_of<T>(input), weight_size, stride, padding, dilation, groups);
  auto out = s.output_sizes();
  check_grad_output<T>(op, grad_output, out);
  return s;
}

inline void check_conv2d_backward_bias(const char* op, const at::Tensor& grad_output) {
  check_dim(op, grad_output, "grad_output", 4, "(N, K, P, Q)");
  check_floating(op, grad_output, "grad_output");
}

// ---------------------------------------------------------------------------------------------------------------
// Pooling. Input N×C×H×W, output N×C×P×Q, window kh×kw.
// ---------------------------------------------------------------------------------------------------------------

template <typename T>
struct PoolShape {
  T n, c, h, w;
  T p, q;
  int64_t kh, kw, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;
  bool ceil_mode;

  std::array<T, 4> input_sizes() const { return {n, c, h, w}; }
  std::array<T, 4> output_sizes() const { return {n, c, p, q}; }
};

template <typename T>
PoolShape<T> pool2d_shape(const char* op, c10::ArrayRef<T> input, c10::IntArrayRef kernel_size,
                          c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef dilation,
                          bool ceil_mode) {
  check_sizes4(op, input, "input size");
  check_pair(op, kernel_size, "kernel_size", 1);
  check_pair(op, stride, "stride", 1);
  check_pair(op, padding, "padding", 0);
  check_pair(op, dilation, "dilation", 1);
  TORCH_CHECK_VALUE(padding[0] <= kernel_size[0] / 2 && padding[1] <= kernel_size[1] / 2, op, ": padding ", padding,
                    " must be at most half of kernel_size ", kernel_size);
  TORCH_CHECK_VALUE(input[1] > 0 && input[2] > 0 && input[3] > 0, op,
                    ": input must have non-zero channels, height and width, got shape ", input);
  PoolShape<T> s{input[0], input[1], input[2], input[3], T(0), T(0),
                 kernel_size[0], kernel_size[1], stride[0], stride[1], padding[0], padding[1],
                 dilation[0], dilation[1], ceil_mode};
  s.p = window_output_size<T>(op, "height", s.h, T(s.kh), s.stride_h, s.pad_h, s.dil_h, ceil_mode);
  s.q = window_output_size<T>(op, "width", s.w, T(s.kw), s.stride_w, s.pad_w, s.dil_w, ceil_mode);
  return s;
}

template <typename T>
PoolShape<T> check_pool2d(const char* op, const at::Tensor& input, c10::IntArrayRef kernel_size,
                          c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef dilation,
                          bool ceil_mode) {
  check_dim(op, input, "input", 4, "(N, C, H, W)");
  check_floating(op, input, "input");
  return pool2d_shape<T>(op, sizes_of<T>(input), kernel_size, stride, padding, dilation, ceil_mode);
}

template <typename T>
PoolShape<T> check_max_pool2d_backward(const char* op, const at::Tensor& grad_output, const at::Tensor& indices,
                                       c10::ArrayRef<T> input_size, c10::IntArrayRef kernel_size,
                                       c10::IntArrayRef stride, c10::IntArrayRef padding,
                                       c10::IntArrayRef dilation, bool ceil_mode) {
  auto s = pool2d_shape<T>(op, input_size, kernel_size, stride, padding, dilation, ceil_mode);
  auto out = s.output_sizes();
  check_grad_output<T>(op, grad_output, out);
  TORCH_CHECK_TYPE(indices.scalar_type() == at::kLong, op, ": indices must be int64, got ", indices.scalar_type());
  TORCH_CHECK_VALUE(indices.device() == grad_output.device(), op, ": indices is on ", indices.device(),
                    " but grad_output is on ", grad_output.device());
  check_dim(op, indices, "indices", 4, "(N, C, P, Q)");
  auto got = sizes_of<T>(indices);
  for (size_t i = 0; i < 4; ++i) {
    TORCH_CHECK_VALUE(got[i] == out[i], op, ": indices has shape ", got, " but grad_output has shape ",
                      c10::ArrayRef<T>(out));
  }
  return s;
}

// The one report of a bad max-pool index, for every kernel that reads them: `position` is the (lowest) flat
// position in `indices` whose value is neither a position of its `plane` (the pooled input plane, of `extent`
// H*W elements) nor -1, the index of a window with no tap.
[[noreturn]] inline void fail_bad_max_pool_index(const char* op, const PoolShape<int64_t>& s, int64_t position,
                                                 int64_t value, const char* plane, const char* extent) {
  const int64_t plane_out = s.p * s.q, n_c = position / plane_out, o = position % plane_out;
  TORCH_CHECK_VALUE(false, op, ": indices[", n_c / s.c, ", ", n_c % s.c, ", ", o / s.q, ", ", o % s.q, "] = ", value,
                    " is not a position in the ", plane, ": it must be in [0, ", extent, ") = [0, ", s.h * s.w,
                    ") for a plane of height ", s.h, " and width ", s.w);
}

inline void check_divisor_override(const char* op, c10::optional<int64_t> divisor_override) {
  TORCH_CHECK_VALUE(!divisor_override.has_value() || *divisor_override != 0, op,
                    ": divisor_override must be non-zero");
}

template <typename T>
PoolShape<T> check_avg_pool2d_backward(const char* op, const at::Tensor& grad_output, c10::ArrayRef<T> input_size,
                                       c10::IntArrayRef kernel_size, c10::IntArrayRef stride,
                                       c10::IntArrayRef padding, bool ceil_mode,
                                       c10::optional<int64_t> divisor_override) {
  check_divisor_override(op, divisor_override);
  const int64_t no_dilation[2] = {1, 1};
  auto s = pool2d_shape<T>(op, input_size, kernel_size, stride, padding, no_dilation, ceil_mode);
  auto out = s.output_sizes();
  check_grad_output<T>(op, grad_output, out);
  return s;
}

// ---------------------------------------------------------------------------------------------------------------
// Fused conv2d + bias + max_pool2d + ReLU (the MNIST layer pattern): a convolution whose output is max-pooled, then
// passed through ReLU. Indices point into the convolution's output plane (P×Q), as max_pool2d's do.
// ---------------------------------------------------------------------------------------------------------------

template <typename T>
struct ConvPoolShape {
  ConvShape<T> conv;
  PoolShape<T> pool;  // its input is the convolution's output
};

template <typename T>
ConvPoolShape<T> check_conv2d_maxpool_relu(const char* op, const at::Tensor& input, const at::Tensor& weight,
                                           const c10::optional<at::Tensor>& bias, c10::IntArrayRef stride,
                                           c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t groups,
                                           c10::IntArrayRef pool_kernel_size, c10::IntArrayRef pool_stride,
                                           c10::IntArrayRef pool_padding, c10::IntArrayRef pool_dilation,
                                           bool ceil_mode) {
  auto conv = check_conv2d<T>(op, input, weight, bias, stride, padding, dilation, groups);
  // Checked here too so that messages name the fused op's own argument names.
  check_pair(op, pool_kernel_size, "pool_kernel_size", 1);
  check_pair(op, pool_stride, "pool_stride", 1);
  check_pair(op, pool_padding, "pool_padding", 0);
  check_pair(op, pool_dilation, "pool_dilation", 1);
  auto conv_out = conv.output_sizes();
  auto pool = pool2d_shape<T>(op, conv_out, pool_kernel_size, pool_stride, pool_padding, pool_dilation, ceil_mode);
  return {conv, pool};
}

// The arguments of the fused op's backward ops (conv2d_maxpool_relu_backward and _backward_pool): the convolution's
// shape, and the pooling's over the convolution output, which grad_output, output and indices must match.
template <typename T>
ConvPoolShape<T> check_conv2d_maxpool_relu_backward(
    const char* op, const at::Tensor& grad_output, const at::Tensor& output, const at::Tensor& indices,
    const at::Tensor& input, const at::Tensor& weight, c10::IntArrayRef stride, c10::IntArrayRef padding,
    c10::IntArrayRef dilation, int64_t groups, c10::IntArrayRef pool_kernel_size, c10::IntArrayRef pool_stride,
    c10::IntArrayRef pool_padding, c10::IntArrayRef pool_dilation, bool ceil_mode) {
  auto shape = check_conv2d_maxpool_relu<T>(op, input, weight, c10::nullopt, stride, padding, dilation, groups,
                                            pool_kernel_size, pool_stride, pool_padding, pool_dilation, ceil_mode);
  const auto conv_out = shape.conv.output_sizes();
  shape.pool = check_max_pool2d_backward<T>(op, grad_output, indices, c10::ArrayRef<T>(conv_out), pool_kernel_size,
                                            pool_stride, pool_padding, pool_dilation, ceil_mode);
  check_dim(op, output, "output", 4, "(N, K, P, Q)");
  check_same_dtype_device(op, {{&grad_output, "grad_output"}, {&output, "output"}, {&input, "input"}});
  TORCH_CHECK_VALUE(sizes_of<T>(output) == sizes_of<T>(grad_output), op, ": output has shape ", sizes_of<T>(output),
                    " but grad_output has shape ", sizes_of<T>(grad_output));
  return shape;
}

// ---------------------------------------------------------------------------------------------------------------
// Batch normalisation over dimension 1 (channels) of an (N, C, ...) input: per channel, the statistics of its N × ...
// values. weight, bias and the statistics are vectors of C. Returns C.
// ---------------------------------------------------------------------------------------------------------------

// A bool mask of the values an op kept (a fused ReLU's, dropout's), shaped as `like` and on its device.
template <typename T>
void check_kept_mask(const char* op, const at::Tensor& kept, const at::Tensor& like, const char* like_name) {
  TORCH_CHECK_TYPE(kept.scalar_type() == at::kBool, op, ": kept must be a bool tensor, got ", kept.scalar_type());
  TORCH_CHECK_VALUE(kept.device() == like.device(), op, ": kept is on ", kept.device(), " but ", like_name, " is on ",
                    like.device(), "; all tensors must be on the same device");
  TORCH_CHECK_VALUE(sizes_of<T>(kept) == sizes_of<T>(like), op, ": kept has shape ", sizes_of<T>(kept), " but ",
                    like_name, " has shape ", sizes_of<T>(like));
}

template <typename T>
void check_channel_vector(const char* op, const at::Tensor& input, const c10::optional<at::Tensor>& v,
                          const char* name) {
  if (!v.has_value()) return;
  check_same_dtype_device(op, {{&input, "input"}, {&*v, name}});
  TORCH_CHECK_VALUE(v->dim() == 1 && sizes_of<T>(*v)[0] == sizes_of<T>(input)[1], op, ": ", name,
                    " must be a vector of the input's ", sizes_of<T>(input)[1], " channels, got shape ",
                    sizes_of<T>(*v));
}

// The forward: in training the batch's statistics normalise the input (running_mean and running_var are not read,
// and may be absent); otherwise running_mean and running_var do.
template <typename T>
T check_batch_norm(const char* op, const at::Tensor& input, const c10::optional<at::Tensor>& weight,
                   const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& running_mean,
                   const c10::optional<at::Tensor>& running_var, bool training, double eps,
                   const char* mean_name = "running_mean", const char* var_name = "running_var") {
  TORCH_CHECK_VALUE(input.dim() >= 2, op, ": input must be an (N, C, ...) tensor of at least 2 dimensions, got a ",
                    input.dim(), "-D tensor of shape ", sizes_of<T>(input));
  check_floating(op, input, "input");
  check_channel_vector<T>(op, input, weight, "weight");
  check_channel_vector<T>(op, input, bias, "bias");
  check_channel_vector<T>(op, input, running_mean, mean_name);
  check_channel_vector<T>(op, input, running_var, var_name);
  TORCH_CHECK_VALUE(eps >= 0 && std::isfinite(eps), op, ": eps must be finite and >= 0, got ", eps);
  if (training) {
    // As torch: one value per channel has no spread to normalise by.
    T values = sizes_of<T>(input)[0];
    for (int64_t d = 2; d < input.dim(); ++d) values = values * sizes_of<T>(input)[d];
    const auto known = known_value(values);
    TORCH_CHECK_VALUE(!known.has_value() || *known != 1, op,
                      ": input has one value per channel, so training statistics are undefined (input shape ",
                      sizes_of<T>(input), ")");
  } else {
    TORCH_CHECK_VALUE(running_mean.has_value() && running_var.has_value(), op, ": ", mean_name, " and ", var_name,
                      " are required when training is False");
  }
  return sizes_of<T>(input)[1];
}

// The backward: grad_output shaped as the input; mean and var the statistics the forward normalised by; kept,
// when a ReLU followed (batch_norm_relu), its bool mask of the values it kept, shaped as the input.
template <typename T>
T check_batch_norm_backward(const char* op, const at::Tensor& grad_output, const at::Tensor& input,
                            const c10::optional<at::Tensor>& weight, const at::Tensor& mean, const at::Tensor& var,
                            double eps, const c10::optional<at::Tensor>& kept) {
  // Checked as an evaluation's statistics: the backward reads them whichever way the forward found them.
  const T c = check_batch_norm<T>(op, input, weight, c10::nullopt, mean, var, false, eps, "mean", "var");
  check_same_dtype_device(op, {{&input, "input"}, {&grad_output, "grad_output"}});
  TORCH_CHECK_VALUE(sizes_of<T>(grad_output) == sizes_of<T>(input), op, ": grad_output has shape ",
                    sizes_of<T>(grad_output), " but input has shape ", sizes_of<T>(input));
  if (kept.has_value()) check_kept_mask<T>(op, *kept, input, "input");
  return c;
}

// relu(batch_norm(...)) max-pooled (cnn_ext.batch_norm_relu_max_pool2d): the batch norm's checks, then the pooling's
// on the input; returns the pooling's shape.
template <typename T>
PoolShape<T> check_batch_norm_relu_max_pool2d(const char* op, const at::Tensor& input,
                                              const c10::optional<at::Tensor>& weight,
                                              const c10::optional<at::Tensor>& bias,
                                              const c10::optional<at::Tensor>& running_mean,
                                              const c10::optional<at::Tensor>& running_var, bool training, double eps,
                                              c10::IntArrayRef kernel_size, c10::IntArrayRef stride,
                                              c10::IntArrayRef padding, c10::IntArrayRef dilation, bool ceil_mode) {
  check_batch_norm<T>(op, input, weight, bias, running_mean, running_var, training, eps);
  return check_pool2d<T>(op, input, kernel_size, stride, padding, dilation, ceil_mode);
}

// Its backward: grad_output, the forward's output and its indices (positions in the input's planes, checked by the
// kernels as they read them) shaped alike, (N, C, P, Q) of the input's N and C; mean and var the statistics the
// forward normalised by. Returns C.
template <typename T>
T check_batch_norm_relu_max_pool2d_backward(const char* op, const at::Tensor& grad_output, const at::Tensor& output,
                                            const at::Tensor& indices, const at::Tensor& input,
                                            const c10::optional<at::Tensor>& weight, const at::Tensor& mean,
                                            const at::Tensor& var, double eps) {
  const T c = check_batch_norm<T>(op, input, weight, c10::nullopt, mean, var, false, eps, "mean", "var");
  check_dim(op, input, "input", 4, "(N, C, H, W)");
  check_dim(op, grad_output, "grad_output", 4, "(N, C, P, Q)");
  check_same_dtype_device(op, {{&input, "input"}, {&grad_output, "grad_output"}, {&output, "output"}});
  const auto in = sizes_of<T>(input), got = sizes_of<T>(grad_output);
  TORCH_CHECK_VALUE(got[0] == in[0] && got[1] == in[1], op, ": grad_output has shape ", got,
                    " but the input has shape ", in, "; their batch and channel sizes must match");
  TORCH_CHECK_VALUE(sizes_of<T>(output) == got, op, ": output has shape ", sizes_of<T>(output),
                    " but grad_output has shape ", got);
  TORCH_CHECK_TYPE(indices.scalar_type() == at::kLong, op, ": indices must be int64, got ", indices.scalar_type());
  TORCH_CHECK_VALUE(indices.device() == grad_output.device(), op, ": indices is on ", indices.device(),
                    " but grad_output is on ", grad_output.device());
  TORCH_CHECK_VALUE(sizes_of<T>(indices) == got, op, ": indices has shape ", sizes_of<T>(indices),
                    " but grad_output has shape ", got);
  return c;
}

// ---------------------------------------------------------------------------------------------------------------
// Dropout: any floating input, p a probability; the backward's kept is the forward's bool mask, shaped as
// grad_output.
// ---------------------------------------------------------------------------------------------------------------

inline void check_dropout_probability(const char* op, double p) {
  TORCH_CHECK_VALUE(p >= 0 && p <= 1, op, ": dropout probability p must be between 0 and 1, got ", p);
}

inline void check_dropout(const char* op, const at::Tensor& input, double p) {
  check_floating(op, input, "input");
  check_dropout_probability(op, p);
}

inline void check_dropout_backward(const char* op, const at::Tensor& grad_output, const at::Tensor& kept, double p) {
  check_floating(op, grad_output, "grad_output");
  check_dropout_probability(op, p);
  check_kept_mask<c10::SymInt>(op, kept, grad_output, "grad_output");
}

}  // namespace cnn_ext
