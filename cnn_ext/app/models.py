"""MNIST classifiers whose convolution and pooling layers run on cnn_ext's kernels (backend "ext") or on torch's
(backend "torch"). Both backends build the same modules in the same order, so one seed gives identical initial
weights and their state_dicts are interchangeable."""

import torch
from torch import nn

from .. import nn as ext_nn

__all__ = ["BACKENDS", "MODELS", "DeepMNIST", "FastMNIST", "MNISTClassifier", "build_model"]

BACKENDS = ("ext", "torch")


def _layers(backend):
    """The namespace providing Conv2d, MaxPool2d, AvgPool2d, BatchNorm2d and Dropout: the one switch between the two
    backends."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return ext_nn if backend == "ext" else nn


class MNISTClassifier(nn.Module):
    """The seed notebook's network, layer for layer: conv 1->10 k5, max-pool 2, relu, conv 10->20 k5, max-pool 2,
    relu, flatten, linear 320->10 (logits). 8,490 parameters; ~95.5% test accuracy after one epoch of the
    seed's recipe (SGD lr 0.01, momentum 0.5, batch 128)."""

    def __init__(self, backend="ext"):
        super().__init__()
        layers = _layers(backend)
        self.c1 = layers.Conv2d(1, 10, kernel_size=5)
        self.c2 = layers.Conv2d(10, 20, kernel_size=5)
        self.d1 = nn.Linear(320, 10)
        self.max_pooling = layers.MaxPool2d(2)
        self.relu = nn.ReLU()

    def forward(self, x):
        x = _conv_pool_relu(self.c1, self.max_pooling, self.relu, x)  # 1x28x28 -> 10x24x24 -> 10x12x12
        x = _conv_pool_relu(self.c2, self.max_pooling, self.relu, x)  # -> 20x8x8 -> 20x4x4
        return self.d1(torch.flatten(x, 1))


def _conv_pool_relu(conv, pool, relu, x):
    """relu(pool(conv(x))): one fused operator for our layers (ext_nn.conv_maxpool_relu runs torch's as the three
    layers). The fused operator calls none of the three modules, so when any of them has forward hooks
    (summary.summarize, feature taps) the modules themselves run, and the hooks see every call."""
    if any(m._forward_hooks or m._forward_pre_hooks for m in (conv, pool, relu)):
        return relu(pool(conv(x)))
    return ext_nn.conv_maxpool_relu(conv, pool, x)


class FastMNIST(nn.Module):
    """A small network for 99% in one epoch in seconds: conv 1->12 k5, max-pool 2, relu, conv 12->24 k3, max-pool
    2, relu, linear 600 -> 128, relu, linear 128 -> 10, both convolutions on the fused operator; 81k parameters,
    1.04 MFLOPs per image forward. Its recipe (RECIPES in cnn_ext.app.recipes): Adam lr 0.015 betas (0.7, 0.9) on a
    per-batch one-cycle schedule, label smoothing 0.1, batch 256, one epoch. The widths were chosen on 2 CPU cores among
    (24, 32)/256 (the usual fast-MNIST net: 99.07% mean over seeds 0-2, 4.3 s), (16, 32)/128, (16, 24), (12, 24)
    and (8, 16)/64 (98.90%): label smoothing gave +0.17 points, lr 0.015 +0.06 over 0.01."""

    def __init__(self, backend="ext", channels=(12, 24), hidden=128):
        super().__init__()
        layers = _layers(backend)
        c1, c2 = channels
        self.c1 = layers.Conv2d(1, c1, kernel_size=5)
        self.c2 = layers.Conv2d(c1, c2, kernel_size=3)
        self.max_pooling = layers.MaxPool2d(2)
        self.relu = nn.ReLU()
        self.d1 = nn.Linear(c2 * 5 * 5, hidden)
        self.d2 = nn.Linear(hidden, 10)

    def forward(self, x):
        x = _conv_pool_relu(self.c1, self.max_pooling, self.relu, x)  # 1x28x28 -> C1x24x24 -> C1x12x12
        x = _conv_pool_relu(self.c2, self.max_pooling, self.relu, x)  # -> C2x10x10 -> C2x5x5
        return self.d2(torch.relu(self.d1(torch.flatten(x, 1))))


class DeepMNIST(nn.Module):
    """The seed's closing exercise, "implement more CNN layers": two VGG-style stages of two 3x3 convolutions
    each, with batch norm (so a high learning rate is stable), a third convolution, then dropout and a linear
    classifier on its 128x5x5 output. 171k parameters, 40.6 MFLOPs per image (the seed's: 8.5k, 0.95 MFLOPs).
    Its recipe (RECIPES in cnn_ext.app.recipes): Adam lr 3e-3 on a per-batch one-cycle schedule over the run, batch
    128. Measured on 2 CPU cores, seed 0: 99.27% test accuracy after one epoch on the ext backend (whose dropout is
    ours: 99.30% with torch's), 99.35-99.36% on the torch backend, 99.6% after ten. Before the one-cycle schedule it reached 98.2% after one epoch with Adam 3e-3
    decayed x0.7 per epoch; constant rates of 1e-3 to 2e-3 at batch 64-256 gave 98.4-98.6%."""

    def __init__(self, backend="ext"):
        super().__init__()
        layers = _layers(backend)

        def conv_bn_relu(c_in, c_out, padding):
            # No conv bias: the batch norm that follows has its own shift.
            return [layers.Conv2d(c_in, c_out, 3, padding=padding, bias=False), layers.BatchNorm2d(c_out),
                    nn.ReLU(inplace=True)]

        self.features = nn.Sequential(
            *conv_bn_relu(1, 32, 1), *conv_bn_relu(32, 32, 1), layers.MaxPool2d(2),  # 32x14x14
            *conv_bn_relu(32, 64, 1), *conv_bn_relu(64, 64, 1), layers.MaxPool2d(2),  # 64x7x7
            *conv_bn_relu(64, 128, 0),  # 128x5x5
        )
        self.classifier = nn.Sequential(nn.Flatten(), layers.Dropout(0.3), nn.Linear(128 * 5 * 5, 10))

    def forward(self, x):
        return self.classifier(_batch_norm_relu_fused(self.features, x))


def _batch_norm_relu_fused(layers, x):
    """layers(x), a batch norm followed by a ReLU running as one fused operator, and with a max-pooling after them
    too (ext_nn.batch_norm_relu and batch_norm_relu_max_pool run torch's as the separate layers). As in
    _conv_pool_relu, layers with hooks run as themselves."""
    def plain(*modules):
        return not any(m._forward_hooks or m._forward_pre_hooks for m in modules)

    i = 0
    while i < len(layers):
        norm, relu, pool = (layers[i + k] if i + k < len(layers) else None for k in range(3))
        if isinstance(norm, nn.BatchNorm2d) and isinstance(relu, nn.ReLU) and plain(norm, relu):
            if isinstance(pool, nn.MaxPool2d) and plain(pool):
                x = ext_nn.batch_norm_relu_max_pool(norm, pool, x)
                i += 3
            else:
                x = ext_nn.batch_norm_relu(norm, x)
                i += 2
        else:
            x = norm(x)
            i += 1
    return x


MODELS = {"seed": MNISTClassifier, "fast": FastMNIST, "deep": DeepMNIST}


def build_model(name, backend="ext"):
    """A fresh model by its MODELS name, on the given backend."""
    if name not in MODELS:
        raise ValueError(f"model must be one of {tuple(MODELS)}, got {name!r}")
    return MODELS[name](backend=backend)
