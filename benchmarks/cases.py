"""Everything the benchmark measures, in one place: the named shapes and their batch sizes, the work each op does
(FLOPs or bytes moved), the machines' peak rates, and the speed targets."""

from dataclasses import dataclass
from typing import ClassVar

CONV_OPS = ("conv2d.fwd", "conv2d.bwd_input", "conv2d.bwd_weight")
POOL_OPS = ("max_pool2d.fwd", "max_pool2d.bwd", "avg_pool2d.fwd", "avg_pool2d.bwd")
NORM_OPS = ("batch_norm.fwd", "batch_norm.bwd", "batch_norm_relu.fwd", "batch_norm_relu.bwd",
            "batch_norm_relu_pool.fwd", "batch_norm_relu_pool.bwd")
DROPOUT_OPS = ("dropout.fwd", "dropout.bwd")

INDEX_BYTES = 8  # max-pool indices are int64, in our ops and torch's alike


@dataclass(frozen=True)
class ConvCase:
    """A square-kernel, ungrouped, undilated convolution of a (N, C, H, W) input by K filters of C×R×R."""

    section: ClassVar[str] = "conv"
    ops: ClassVar[tuple] = CONV_OPS
    unit: ClassVar[str] = "GFLOP/s"

    name: str
    family: str  # "mnist", "resnet" or "deep": selects the batch size and the speed target
    in_channels: int
    out_channels: int
    size: int  # input height = width
    kernel: int
    stride: int = 1
    padding: int = 0

    @property
    def out_size(self):
        return (self.size + 2 * self.padding - self.kernel) // self.stride + 1

    def work(self, op, batch, elem_bytes):
        """FLOPs: 2·N·K·P·Q·(C/groups)·R·S (a multiply-add is two, groups = 1), the same for the forward,
        backward-input and backward-weight directions."""
        return 2 * batch * self.out_channels * self.out_size**2 * self.in_channels * self.kernel**2

    def describe(self, batch):
        return (f"{batch}x{self.in_channels}x{self.size}² * {self.out_channels}x{self.kernel}x{self.kernel}"
                f" s{self.stride} p{self.padding}")


@dataclass(frozen=True)
class PoolCase:
    """A kernel×kernel pooling window with stride = kernel and no padding, over a (N, C, H, W) input."""

    section: ClassVar[str] = "pool"
    ops: ClassVar[tuple] = POOL_OPS
    unit: ClassVar[str] = "GB/s"

    name: str
    family: str
    channels: int
    size: int
    kernel: int = 2

    @property
    def out_size(self):
        return (self.size - self.kernel) // self.kernel + 1

    def work(self, op, batch, elem_bytes):
        """Bytes read + written, each tensor once: the least traffic any kernel for `op` needs."""
        big = batch * self.channels * self.size**2 * elem_bytes  # input, or grad_input
        small = batch * self.channels * self.out_size**2 * elem_bytes  # output, or grad_output
        indices = batch * self.channels * self.out_size**2 * INDEX_BYTES
        if op == "max_pool2d.fwd":  # read input; write output and indices
            return big + small + indices
        if op == "max_pool2d.bwd":  # read grad_output and indices; write grad_input
            return small + indices + big
        return big + small  # avg fwd: read input, write output; avg bwd: read grad_output, write grad_input

    def describe(self, batch):
        return f"{batch}x{self.channels}x{self.size}² k{self.kernel} s{self.kernel}"


@dataclass(frozen=True)
class NormCase:
    """Training-mode batch normalisation of a (N, C, H, W) input over its C channels, alone, followed by a ReLU
    (ours fused, torch's as nn.ReLU(inplace=True) runs: relu_ after the batch norm, threshold_backward before its
    backward), and followed by the ReLU and a 2x2 max-pooling (ours fused, torch's as its three layers run). CPU
    only: on CUDA ours is torch's."""

    section: ClassVar[str] = "norm"
    ops: ClassVar[tuple] = NORM_OPS
    unit: ClassVar[str] = "GB/s"

    name: str
    family: str
    channels: int
    size: int

    def work(self, op, batch, elem_bytes):
        """Bytes read + written, each tensor once: fwd reads x and writes y; bwd reads dY and x, writes dX (the
        ReLU's mask or output, the pooling's indices not counted; a pooled y or dY is a quarter of x)."""
        plane = batch * self.channels * self.size**2 * elem_bytes
        y = plane / 4 if op.startswith("batch_norm_relu_pool") else plane
        return plane + y if op.endswith(".fwd") else 2 * plane + y

    def describe(self, batch):
        return f"{batch}x{self.channels}x{self.size}² training"


@dataclass(frozen=True)
class DropoutCase:
    """Dropout of a (N, features) input with probability p, in the norm section (DeepMNIST's other per-value
    layer). Ours draws its own random bits, so it is validated against torch's formula applied with its mask and
    timed against torch's native_dropout (bernoulli_ and two multiplies) and its backward. CPU only."""

    section: ClassVar[str] = "norm"
    ops: ClassVar[tuple] = DROPOUT_OPS
    unit: ClassVar[str] = "GB/s"

    name: str
    family: str
    features: int
    p: float

    def work(self, op, batch, elem_bytes):
        """Bytes read + written, each tensor once: fwd reads x, writes y and the bool mask; bwd reads dY and the
        mask, writes dX."""
        values = batch * self.features
        return values * (2 * elem_bytes + 1)

    def describe(self, batch):
        return f"{batch}x{self.features} p={self.p}"


CONV_CASES = (
    # The MNIST classifier's two convolutions.
    ConvCase("mnist.c1", "mnist", 1, 10, 28, 5),
    ConvCase("mnist.c2", "mnist", 10, 20, 12, 5),
    # ResNet-50's stem and typical stage convolutions.
    ConvCase("resnet.stem7x7", "resnet", 3, 64, 224, 7, stride=2, padding=3),
    ConvCase("resnet.3x3_64", "resnet", 64, 64, 56, 3, padding=1),
    ConvCase("resnet.3x3_128", "resnet", 128, 128, 28, 3, padding=1),
    ConvCase("resnet.3x3_256", "resnet", 256, 256, 14, 3, padding=1),
    ConvCase("resnet.1x1_256to64", "resnet", 256, 64, 56, 1),
    # DeepMNIST's 3x3 convolutions after its first (cnn_ext.app.models): few channels on small planes, at the
    # training batch. CPU only (no CUDA batch size for the family).
    ConvCase("deep.c2_32", "deep", 32, 32, 28, 3, padding=1),
    ConvCase("deep.c3_32to64", "deep", 32, 64, 14, 3, padding=1),
    ConvCase("deep.c4_64", "deep", 64, 64, 14, 3, padding=1),
    ConvCase("deep.c5_64to128", "deep", 64, 128, 7, 3),
)

# The MNIST classifier's two 2×2 pools (after c1: 10×24², after c2: 20×8²), timed as max and as avg pools.
POOL_CASES = (
    PoolCase("mnist.pool1", "mnist", 10, 24),
    PoolCase("mnist.pool2", "mnist", 20, 8),
)

# DeepMNIST's batch norms after its 32-channel 28x28 and 64-channel 14x14 convolutions, and its classifier's dropout.
NORM_CASES = (
    NormCase("deep.bn32", "deep", 32, 28),
    NormCase("deep.bn64", "deep", 64, 14),
    DropoutCase("deep.dropout", "deep", 128 * 5 * 5, 0.3),
)

# Batch size per device and shape family. The CPU runs the ResNet shapes at a small batch to finish in minutes;
# --quick (the CI smoke test: ~60 s on 2 shared cores) shrinks it to 1; --batch FAMILY=N sets one family's.
BATCH = {
    ("cpu", "mnist"): 128,
    ("cpu", "resnet"): 8,
    ("cpu", "deep"): 128,
    ("cuda", "mnist"): 128,
    ("cuda", "resnet"): 32,
}
QUICK_BATCH = {**BATCH, ("cpu", "resnet"): 1, ("cpu", "deep"): 16}
TRAIN_BATCH = 128


# Speed targets: the largest passing time ratio (ours / torch) per device and row group, or per op or case within
# one. A throughput target "≥ x× torch's GFLOP/s" is the time ratio ≤ 1/x.
TARGET_TIME_RATIO = {
    ("cpu", "mnist_conv"): 0.5,
    ("cpu", "mnist_pool"): 0.2,
    ("cpu", "mnist_pool", "max_pool2d.bwd"): 0.5,  # scatters into a zeroed gradient: a store-bound floor
    ("cpu", "deep_norm"): 1.0,
    ("cpu", "deep_conv"): 1.0,
    # As fast as oneDNN on every ResNet layer, and the stride-1 3x3 layers (Winograd's) faster by 0.7x.
    ("cpu", "resnet_conv"): 1.0,
    ("cpu", "resnet_conv", "resnet.3x3_64"): 0.7,
    ("cpu", "resnet_conv", "resnet.3x3_128"): 0.7,
    ("cpu", "resnet_conv", "resnet.3x3_256"): 0.7,
    ("cpu", "train"): 0.3,
    ("cpu", "train", "deep.train_step"): 0.6,  # 3x3 convolutions, batch norm and dropout: not only our fastest ops
    ("cpu", "models"): 1.0,  # a converted torchvision model must never be slower than on torch's layers
    ("cuda", "mnist_conv"): 0.5,
    ("cuda", "mnist_pool"): 0.5,
    ("cuda", "resnet_conv"): 1 / 0.7,
    ("cuda", "train"): 0.5,
    ("cuda", "models"): 1.0,
}


def target_ratio(device, family, section, op=None, case=None):
    """The target of a row: its case's if it has one, else its op's, else its group's."""
    group = (device, section if section in ("train", "models") else f"{family}_{section}")
    return next(TARGET_TIME_RATIO[key] for key in ((*group, case), (*group, op), group) if key in TARGET_TIME_RATIO)


# Peak rates, for the "% of peak" column. CPU: MKL sgemm as measured on the 2-core development machine (override
# with --cpu-peak-gflops); its memory bandwidth is not known, so pool rows show no CPU % of peak.
CPU_PEAK_FLOPS = 260e9
# GPUs, by a substring of the device name: fp32 without tensor cores, bf16 dense tensor cores, HBM bandwidth.
GPU_PEAKS = {
    "H200": {"float32": 67e12, "bfloat16": 989e12, "bytes": 4.8e12},
}


def peak_rate(device, device_name, dtype_name, unit, cpu_peak_flops):
    """The machine's peak in FLOP/s (unit "GFLOP/s") or byte/s (unit "GB/s"), or None where unknown."""
    if device == "cpu":
        return cpu_peak_flops if unit == "GFLOP/s" and dtype_name == "float32" else None
    for key, peaks in GPU_PEAKS.items():
        if key in device_name:
            return peaks["bytes"] if unit == "GB/s" else peaks.get(dtype_name)
    return None
