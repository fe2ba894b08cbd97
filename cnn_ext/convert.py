"""Swap torch.nn's convolution and pooling layers in any model for cnn_ext's."""

import warnings

import torch

from . import nn

# Exact torch.nn type -> cnn_ext replacement. Ours subclass theirs and add no state, so a module is converted by
# changing its class: parameters, buffers, hooks and any optimizer holding them stay as they are.
_REPLACEMENTS = {
    torch.nn.Conv2d: nn.Conv2d,
    torch.nn.MaxPool2d: nn.MaxPool2d,
    torch.nn.AvgPool2d: nn.AvgPool2d,
}

_SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _why_not(module):
    """Why this torch.nn layer cannot run on our kernels, or None if it can."""
    if isinstance(module, torch.nn.Conv2d):
        param = module.weight
        if isinstance(param, torch.nn.parameter.UninitializedParameter):
            return "its parameters are not initialised yet (lazy module)"
        if param.dtype not in _SUPPORTED_DTYPES:
            return f"its dtype {param.dtype} is not supported"
        if param.device.type not in ("cpu", "cuda", "meta"):
            return f"its device {param.device} is not supported"
    return None


def convert(model: torch.nn.Module) -> torch.nn.Module:
    """Replace every torch.nn.Conv2d, MaxPool2d and AvgPool2d in `model` (in place) with the cnn_ext layer of the
    same configuration and weights, and return the model.

    Subclasses of those layers are left alone (their forward may differ from torch's), as is any layer our kernels
    cannot run; each one left is named in a single warning."""
    skipped = []
    for name, module in model.named_modules():
        target = _REPLACEMENTS.get(type(module))
        if target is None:
            if isinstance(module, tuple(_REPLACEMENTS)) and not isinstance(module, tuple(_REPLACEMENTS.values())):
                skipped.append(f"{name or 'model'} ({type(module).__name__}): a subclass with its own behaviour")
            continue
        reason = _why_not(module)
        if reason is not None:
            skipped.append(f"{name or 'model'} ({type(module).__name__}): {reason}")
            continue
        module.__class__ = target
    if skipped:
        warnings.warn("cnn_ext.convert left these layers as they are:\n  " + "\n  ".join(skipped), stacklevel=2)
    return model
