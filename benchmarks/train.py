"""The training-step benchmarks: one SGD step of the MNIST classifier on a batch already on the device, with
cnn_ext's layers ("ext") and with torch's ("torch"), from identical weights; the same network as a user would
write it with torch.nn, passed through cnn_ext.convert, against itself unconverted; and a step of the app's
DeepMNIST (3x3 convolutions, batch norm, dropout) on both backends."""

import torch
import torch.nn.functional as F

import cnn_ext
from cnn_ext.app.models import DeepMNIST, MNISTClassifier

from . import cases
from .ops import validate
from .report import Row


class TorchSeedNet(torch.nn.Module):
    """The seed network in the style of PyTorch's MNIST example: modules for the layers with weights,
    torch.nn.functional for pooling and ReLU."""

    def __init__(self):
        super().__init__()
        self.c1 = torch.nn.Conv2d(1, 10, kernel_size=5)
        self.c2 = torch.nn.Conv2d(10, 20, kernel_size=5)
        self.d1 = torch.nn.Linear(320, 10)

    def forward(self, x):
        x = F.relu(F.max_pool2d(self.c1(x), 2))
        x = F.relu(F.max_pool2d(self.c2(x), 2))
        return self.d1(torch.flatten(x, 1))


def _make_model(kind):
    """kind: "ext"/"torch" (MNISTClassifier's backends), "deep_ext"/"deep_torch" (DeepMNIST's), "converted"
    (TorchSeedNet through cnn_ext.convert) or "torch_style" (TorchSeedNet as it is)."""
    if kind in ("ext", "torch"):
        return MNISTClassifier(backend=kind)
    if kind in ("deep_ext", "deep_torch"):
        return DeepMNIST(backend=kind.removeprefix("deep_"))
    return cnn_ext.convert(TorchSeedNet()) if kind == "converted" else TorchSeedNet()


def _train_step(kind, state, images, labels, dropout=None):
    """A zero-argument callable doing forward + cross-entropy + backward + SGD(lr 0.01, momentum 0.5) on its own
    model, created from `state` in the images' dtype; it returns the loss and the parameters after the step.
    dropout: if given, the probability every dropout layer uses instead of its own (0 for validation: ours and
    torch's draw different masks)."""
    model = _make_model(kind).to(images.device, images.dtype)
    model.load_state_dict(state)
    if dropout is not None:
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = dropout
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.5)

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
        return (loss.detach(), *model.parameters())

    return step


def count_kernels(fn):
    """GPU kernels one call of fn launches (after a warm-up call), from torch.profiler's CUDA activity; memory
    copies and fills are not kernels."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
               and not e.name.startswith(("Memcpy", "Memset")))


def run(device, time_pair, log):
    batch = cases.TRAIN_BATCH
    images = torch.randn(batch, 1, 28, 28, device=device)
    labels = torch.randint(0, 10, (batch,), device=device)
    rows = []
    # DeepMNIST's batch norms sum their gradients over 100k positions, and float32 rounding alone moves those sums
    # (and so the updated shifts) by up to ~1e-3 of their size: its step is validated in float64, where ours and
    # torch's agree to 1e-9 unless they compute different things, and timed in float32 like the others.
    for case, ours, theirs, what, check_dtype in (
            ("mnist.train_step", "ext", "torch", "MNISTClassifier", torch.float32),
            ("mnist.train_converted", "converted", "torch_style", "torch.nn net via cnn_ext.convert", torch.float32),
            ("deep.train_step", "deep_ext", "deep_torch", "DeepMNIST", torch.float64)):
        state = _make_model(theirs).state_dict()
        # Validated on a first step from identical weights (same loss, same updated parameters; dropout off), then
        # timed on fresh models, whose weights drift apart over the repetitions without changing the work per step.
        check_images = images.to(check_dtype)
        check, max_err, runnable = validate(_train_step(ours, state, check_images, labels, dropout=0.0),
                                            _train_step(theirs, state, check_images, labels, dropout=0.0), check_dtype)
        fns = {"ours": _train_step(ours, state, images, labels)} if runnable else {}
        fns["torch"] = _train_step(theirs, state, images, labels)
        samples = time_pair(fns)
        kernels = {name: count_kernels(fn) for name, fn in fns.items()} if device == "cuda" else None
        row = Row(section="train", case=case, op="fwd+loss+bwd+sgd", dtype="float32", batch=batch,
                  shape=f"{batch}x1x28² {what}", work=None, unit=None, peak=None,
                  target=cases.target_ratio(device, "mnist", "train", case=case), check=check, max_err=max_err,
                  torch_samples=samples["torch"], ours_samples=samples.get("ours", []), kernels=kernels)
        log(row)
        if kernels:
            print(f"{case}: {kernels.get('ours', '-')} GPU kernels per step (torch: {kernels['torch']})")
        rows.append(row)
    return rows
