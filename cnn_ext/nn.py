"""Modules with torch.nn's constructor arguments, parameter names, shapes and initialisation, running on cnn_ext's
kernels. Each subclasses its torch.nn twin and replaces only the computation, so state_dicts load both ways and
`isinstance(m, torch.nn.Conv2d)` still holds."""

import functools

import torch
import torch.nn.functional as F

from . import functional

__all__ = ["Conv2d", "MaxPool2d", "AvgPool2d", "BatchNorm2d", "BatchNormReLU2d", "Dropout", "batch_norm_relu",
           "batch_norm_relu_max_pool", "conv_maxpool_relu"]


class Conv2d(torch.nn.Conv2d):
    """torch.nn.Conv2d on cnn_ext kernels. Non-'zeros' padding modes pad with torch's F.pad (data movement,
    not convolution math) and then convolve with padding 0, exactly as torch.nn.Conv2d does."""

    def _conv_forward(self, input, weight, bias):
        if self.padding_mode != "zeros":
            input = F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return functional.conv2d(input, weight, bias, self.stride, 0, self.dilation, self.groups)
        return functional.conv2d(input, weight, bias, self.stride, self.padding, self.dilation, self.groups)


class MaxPool2d(torch.nn.MaxPool2d):
    """torch.nn.MaxPool2d on cnn_ext kernels."""

    def forward(self, input):
        return functional.max_pool2d(input, self.kernel_size, self.stride, self.padding, self.dilation,
                                     ceil_mode=self.ceil_mode, return_indices=self.return_indices)


class AvgPool2d(torch.nn.AvgPool2d):
    """torch.nn.AvgPool2d on cnn_ext kernels."""

    def forward(self, input):
        return functional.avg_pool2d(input, self.kernel_size, self.stride, self.padding, self.ceil_mode,
                                     self.count_include_pad, self.divisor_override)


class BatchNorm2d(torch.nn.BatchNorm2d):
    """torch.nn.BatchNorm2d on cnn_ext's kernel (cnn_ext.functional.batch_norm): the same buffers, momentum (None:
    a cumulative average), eval and track_running_stats rules as torch's."""

    def forward(self, input):
        return self._normalize(input, functional.batch_norm)

    def _normalize(self, input, batch_norm):
        self._check_input_dim(input)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / float(self.num_batches_tracked)
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        tracked = not self.training or self.track_running_stats
        return batch_norm(input, self.running_mean if tracked else None, self.running_var if tracked else None,
                          self.weight, self.bias, use_batch_stats, factor, self.eps)


class BatchNormReLU2d(BatchNorm2d):
    """relu(BatchNorm2d(...)) as one layer (cnn_ext.functional.batch_norm_relu), BatchNorm2d's arguments, parameters
    and buffers: a BatchNorm2d's state_dict loads into it and back."""

    def forward(self, input):
        return self._normalize(input, functional.batch_norm_relu)


class Dropout(torch.nn.Dropout):
    """torch.nn.Dropout on cnn_ext's kernel (cnn_ext.functional.dropout): the same p, inplace and train/eval
    rules as torch's, random bits of its own."""

    def forward(self, input):
        return functional.dropout(input, self.p, self.training, self.inplace)


def conv_maxpool_relu(conv, pool, input):
    """relu(pool(conv(input))). Runs as the fused operator when `conv` is our Conv2d with zero padding and `pool`
    our MaxPool2d without return_indices (the MNIST layer pattern); otherwise as the three layers."""
    if (type(conv) is Conv2d and conv.padding_mode == "zeros" and type(pool) is MaxPool2d
            and not pool.return_indices):
        return functional.conv2d_maxpool_relu(input, conv.weight, conv.bias, conv.stride, conv.padding,
                                              conv.dilation, conv.groups, pool.kernel_size, pool.stride,
                                              pool.padding, pool.dilation, pool.ceil_mode)
    return torch.relu(pool(conv(input)))


def batch_norm_relu(norm, input):
    """relu(norm(input)). Runs as the fused operator (what BatchNormReLU2d runs) when `norm` is our BatchNorm2d;
    otherwise, and under torch.fx's symbolic trace (cnn_ext.convert: our BatchNorm2d is a leaf there, its checks look
    at the input's shape), as the two layers."""
    if type(norm) is BatchNorm2d and not isinstance(input, torch.fx.Proxy):
        return norm._normalize(input, functional.batch_norm_relu)
    return torch.relu(norm(input))


def batch_norm_relu_max_pool(norm, pool, input):
    """pool(relu(norm(input))). Runs as the fused operator (cnn_ext.functional.batch_norm_relu_max_pool2d) when
    `norm` is our BatchNorm2d and `pool` our MaxPool2d without return_indices; otherwise, and under torch.fx's
    symbolic trace, as the three layers."""
    if (type(norm) is BatchNorm2d and type(pool) is MaxPool2d and not pool.return_indices
            and not isinstance(input, torch.fx.Proxy)):
        fused = functools.partial(functional.batch_norm_relu_max_pool2d, kernel_size=pool.kernel_size,
                                  stride=pool.stride, padding=pool.padding, dilation=pool.dilation,
                                  ceil_mode=pool.ceil_mode)
        return norm._normalize(input, fused)
    return pool(batch_norm_relu(norm, input))
