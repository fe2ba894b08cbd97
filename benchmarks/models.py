"""The "models" section: whole torchvision models passed through cnn_ext.convert against themselves on torch's
layers, from the same weights: forward (no grad) and forward + backward (the gradient of the outputs' sum with
respect to the input and every parameter), both in eval mode so that batch norm and dropout are deterministic and
the two sides can be compared. Timed in float32; validated in float64 on the same weights and inputs, since in
float32 the two sides' different rounding can flip a ReLU's or a max-pool's decision on values at its threshold
and route a gradient differently (a 2e-2 relative difference in resnet18's input gradient at batch 8), which says
nothing about either side. Opt-in (`--ops models`): on 2 CPU cores the section takes minutes."""

import copy

import torch

import cnn_ext

from . import cases
from .ops import compare
from .report import Row

MODELS = ("resnet18", "vgg11", "mobilenet_v2")
# max |ours - torch| / max |torch| over the float64 outputs and gradients (ops.compare measures it after rounding
# both to float32): measured up to 8e-9 at 64x64, batch 1, and 2e-10 for resnet18 at 224x224, batch 8; a wrong
# kernel differs by O(1).
TOLERANCE = 1e-6


def _forward(model, x):
    def fn():
        with torch.no_grad():
            return model(x)
    return fn


def _forward_backward(model, x):
    params = [p for p in model.parameters() if p.requires_grad]

    def fn():
        xg = x.detach().requires_grad_()
        out = model(xg)
        grads = torch.autograd.grad(out.sum(), [xg, *params])
        return (out.detach(), *grads)
    return fn


def run(device, time_pair, quick, log):
    try:
        import torchvision
    except ImportError:
        print("models: skipped (torchvision is not installed)")
        return []
    size = 64 if quick else 224  # --quick is a smoke test: small images
    batches = (1,) if quick else (1, 8)
    rows = []
    for name in MODELS:
        torch.manual_seed(0)
        theirs = getattr(torchvision.models, name)().to(device).eval()
        ours = cnn_ext.convert(copy.deepcopy(theirs)).eval()
        theirs64 = copy.deepcopy(theirs).double()
        ours64 = cnn_ext.convert(copy.deepcopy(theirs64)).eval()
        for batch in batches:
            x = torch.randn(batch, 3, size, size, device=device)
            for op, make in (("fwd", _forward), ("fwd+bwd", _forward_backward)):
                check, max_err = compare(make(ours64, x.double())(), make(theirs64, x.double())(), TOLERANCE)
                ours_fn, torch_fn = make(ours, x), make(theirs, x)
                samples = time_pair({"ours": ours_fn, "torch": torch_fn})
                row = Row(section="models", case=f"model.{name}", op=op, dtype="float32", batch=batch,
                          shape=f"{batch}x3x{size}² {name}", work=None, unit=None, peak=None,
                          target=cases.target_ratio(device, "model", "models"), check=check, max_err=max_err,
                          torch_samples=samples["torch"], ours_samples=samples["ours"])
                log(row)
                rows.append(row)
    return rows

