"""The training-step benchmark: one SGD step of the MNIST classifier on a batch already on the device, with
cnn_ext's layers ("ext") and with torch's ("torch"), from identical weights."""

import torch
import torch.nn.functional as F
from cnn_ext.models import MNISTClassifier

from . import cases
from .ops import validate
from .report import Row


def _train_step(backend, state, images, labels):
    """A zero-argument callable doing forward + cross-entropy + backward + SGD(lr 0.01, momentum 0.5) on its own
    model, created from `state`; it returns the loss and the parameters after the step."""
    model = MNISTClassifier(backend=backend).to(images.device)
    model.load_state_dict(state)
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
    state = MNISTClassifier(backend="torch").state_dict()
    # Validated on a first step from identical weights (same loss, same updated parameters), then timed on fresh
    # models, whose weights drift apart over the repetitions without changing the work per step.
    check, max_err, runnable = validate(_train_step("ext", state, images, labels),
                                        _train_step("torch", state, images, labels), torch.float32)
    fns = {"ours": _train_step("ext", state, images, labels)} if runnable else {}
    fns["torch"] = _train_step("torch", state, images, labels)
    samples = time_pair(fns)
    kernels = {name: count_kernels(fn) for name, fn in fns.items()} if device == "cuda" else None
    row = Row(section="train", case="mnist.train_step", op="fwd+loss+bwd+sgd", dtype="float32", batch=batch,
              shape=f"{batch}x1x28² MNISTClassifier", work=None, unit=None, peak=None,
              target=cases.target_ratio(device, "mnist", "train"), check=check, max_err=max_err,
              torch_samples=samples["torch"], ours_samples=samples.get("ours", []), kernels=kernels)
    log(row)
    if kernels:
        print(f"mnist.train_step: {kernels.get('ours', '-')} GPU kernels per step (torch: {kernels['torch']})")
    return [row]
