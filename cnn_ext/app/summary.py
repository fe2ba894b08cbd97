"""A layer-by-layer model summary (output shape, parameters, FLOPs), measured by running one dummy image through
the model with forward hooks, so it always describes the model as it really executes."""

import math

import torch
from torch import nn

__all__ = ["format_summary", "summarize"]


def _pair(value):
    return value if isinstance(value, tuple) else (value, value)


def _flops(module, inputs, output):
    """Floating-point operations of one call, counting a multiply-add as 2; None for layers that do no arithmetic
    (flatten, dropout at inference, ...)."""
    out = output.numel()
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        per_output = 2 * (module.in_channels // module.groups) * kh * kw
        return out * per_output + (out if module.bias is not None else 0)
    if isinstance(module, nn.Linear):
        return out * 2 * module.in_features + (out if module.bias is not None else 0)
    if isinstance(module, (nn.MaxPool2d, nn.AvgPool2d)):
        return out * math.prod(_pair(module.kernel_size))  # one comparison or addition per window element
    if isinstance(module, nn.BatchNorm2d):
        return 2 * out  # at inference: one scale and one shift per element
    if isinstance(module, nn.ReLU):
        return out
    return None


def summarize(model, input_shape=(1, 1, 28, 28), device=None):
    """One row per leaf-module call, in execution order: (name, type, output shape, parameters, FLOPs).
    A module called twice (the seed model reuses its pooling and ReLU) gets two rows, its parameters on the
    first. Runs in eval mode without gradients, so batch-norm statistics are left untouched."""
    if device is None:
        device = next(model.parameters()).device
    names = {module: name for name, module in model.named_modules()}
    rows, seen, hooks = [], set(), []

    def hook(module, inputs, output):
        params = 0 if module in seen else sum(p.numel() for p in module.parameters(recurse=False))
        seen.add(module)
        rows.append((names[module], type(module).__name__, tuple(output.shape), params,
                     _flops(module, inputs, output)))

    for module in model.modules():
        if not any(True for _ in module.children()):
            hooks.append(module.register_forward_hook(hook))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(input_shape, device=device))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return rows


def format_summary(rows, total_params):
    """The rows as a table, with totals (per image: the dummy batch holds one)."""
    header = ("layer", "type", "output shape", "params", "FLOPs")
    lines = [(name, kind, "x".join(map(str, shape[1:])), f"{params:,}" if params else "-",
              f"{flops:,}" if flops else "-") for name, kind, shape, params, flops in rows]
    total_flops = sum(flops or 0 for *_, flops in rows)
    footer = ("total (per image)", "", "", f"{total_params:,}", f"{total_flops:,}")
    widths = [max(len(r[i]) for r in [header, footer, *lines]) for i in range(len(header))]

    def fmt(r):
        return "  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))

    rule = "-" * len(fmt(header))
    return "\n".join([fmt(header), rule, *map(fmt, lines), rule, fmt(footer)])
