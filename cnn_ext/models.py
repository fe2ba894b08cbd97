"""MNIST classifiers whose convolution and pooling layers run on cnn_ext's kernels (backend "ext") or on torch's
(backend "torch"). Both backends build the same modules in the same order, so one seed gives identical initial
weights and their state_dicts are interchangeable."""

import torch
from torch import nn

from . import nn as ext_nn

__all__ = ["BACKENDS", "MODELS", "DeepMNIST", "MNISTClassifier", "build_model"]

BACKENDS = ("ext", "torch")


def _layers(backend):
    """The namespace providing Conv2d, MaxPool2d and AvgPool2d: the one switch between the two backends."""
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
        x = self._conv_pool_relu(self.c1, x)  # 1x28x28 -> 10x24x24 -> 10x12x12
        x = self._conv_pool_relu(self.c2, x)  # -> 20x8x8 -> 20x4x4
        return self.d1(torch.flatten(x, 1))

    def _conv_pool_relu(self, conv, x):
        """relu(max_pooling(conv(x))): one fused operator for our layers (ext_nn.conv_maxpool_relu runs torch's as
        the three layers). The fused operator calls none of the three modules, so when any of them has forward
        hooks (summary.summarize, feature taps) the modules themselves run, and the hooks see every call."""
        if any(m._forward_hooks or m._forward_pre_hooks for m in (conv, self.max_pooling, self.relu)):
            return self.relu(self.max_pooling(conv(x)))
        return ext_nn.conv_maxpool_relu(conv, self.max_pooling, x)


class DeepMNIST(nn.Module):
    """The seed's closing exercise, "implement more CNN layers": two VGG-style stages of two 3x3 convolutions
    each, with batch norm (so a high learning rate is stable), a third convolution, then dropout and a linear
    classifier on its 128x5x5 output. 171k parameters, 40.6 MFLOPs per image (the seed's: 8.5k, 0.95 MFLOPs).
    Its recipe (RECIPES in cnn_ext.train): Adam lr 3e-3, decayed x0.7 after each epoch, batch 128. Measured after
    one epoch on 2 CPU cores, seed 0: 98.2% test accuracy on the ext backend (62 s). On the torch backend, with the
    lr constant through the epoch, batch 256 and lr 1e-3 or 2e-3 at batch 64 gave 98.4-98.6%; Adam peaking at
    3e-3 on a per-batch one-cycle schedule over the epoch (which the trainer does not have) gave 99.2%."""

    def __init__(self, backend="ext"):
        super().__init__()
        layers = _layers(backend)

        def conv_bn_relu(c_in, c_out, padding):
            # No conv bias: the batch norm that follows has its own shift.
            return [layers.Conv2d(c_in, c_out, 3, padding=padding, bias=False), nn.BatchNorm2d(c_out),
                    nn.ReLU(inplace=True)]

        self.features = nn.Sequential(
            *conv_bn_relu(1, 32, 1), *conv_bn_relu(32, 32, 1), layers.MaxPool2d(2),  # 32x14x14
            *conv_bn_relu(32, 64, 1), *conv_bn_relu(64, 64, 1), layers.MaxPool2d(2),  # 64x7x7
            *conv_bn_relu(64, 128, 0),  # 128x5x5
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Dropout(0.3), nn.Linear(128 * 5 * 5, 10))

    def forward(self, x):
        return self.classifier(self.features(x))


MODELS = {"seed": MNISTClassifier, "deep": DeepMNIST}


def build_model(name, backend="ext"):
    """A fresh model by its MODELS name, on the given backend."""
    if name not in MODELS:
        raise ValueError(f"model must be one of {tuple(MODELS)}, got {name!r}")
    return MODELS[name](backend=backend)
