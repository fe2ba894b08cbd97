"""The cnn_ext operators that cnn_ext.functional calls: torch.ops.cnn_ext's overloads.

Everything about them is defined in C++: schemas and Meta kernels (csrc/ops.cpp), CPU and CUDA kernels (csrc/cpu/,
csrc/cuda/) and autograd (csrc/autograd.cpp, a torch::autograd::Function per forward op, registered for the
Autograd dispatch key). So eager calls, direct torch.ops.cnn_ext calls, torch.compile and torch.export take one
path. The backward ops have no derivatives: double backward raises.
"""

import torch

_ops = torch.ops.cnn_ext

# The .default overloads: calling them skips the packet's overload resolution.
conv2d = _ops.conv2d.default
max_pool2d = _ops.max_pool2d.default
avg_pool2d = _ops.avg_pool2d.default
conv2d_maxpool_relu = _ops.conv2d_maxpool_relu.default
batch_norm = _ops.batch_norm.default
batch_norm_relu = _ops.batch_norm_relu.default
batch_norm_relu_max_pool2d = _ops.batch_norm_relu_max_pool2d.default
dropout = _ops.dropout.default
