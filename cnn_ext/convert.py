"""Run any model's convolution and pooling layers on cnn_ext's kernels, fusing conv -> max-pool -> ReLU where the
model has it."""

import inspect
import warnings

import torch
import torch.fx
import torch.nn.functional as F

from . import functional, nn

__all__ = ["convert"]

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


def _swap_layers(model):
    """Change every exact torch.nn Conv2d/MaxPool2d/AvgPool2d that our kernels can run into ours, in place; the
    descriptions of those left as they are."""
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
    return skipped


# ---------------------------------------------------------------------------------------------------------------
# Fusion: conv -> max-pool -> ReLU, and conv -> ReLU -> max-pool (the same function: ReLU and max commute, and so
# do their gradients, which reach a window's first maximum only where it is positive), found in the model's
# torch.fx graph and replaced by one call of _conv_pool_relu.
# ---------------------------------------------------------------------------------------------------------------


class _Tracer(torch.fx.Tracer):
    """symbolic_trace's tracer, with cnn_ext's layers as leaves, like torch.nn's (cnn_ext.functional's functions
    are recorded as calls too: functional.py wraps them)."""

    def is_leaf_module(self, module, qualified_name):
        return type(module) in _LEAVES or super().is_leaf_module(module, qualified_name)


# Every module class of cnn_ext.nn: those convert puts in, and those a model may hold already (BatchNorm2d), whose
# forward a trace must not enter (it branches on the input's device and dtype).
_LEAVES = {getattr(nn, name) for name in nn.__all__ if isinstance(getattr(nn, name), type)}


def _max_pool2d_signature(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False,
                          return_indices=False):
    """F.max_pool2d's parameters (its boolean dispatch hides them from inspect)."""


_MAX_POOL2D = inspect.signature(_max_pool2d_signature)
_RELU_FUNCTIONS = (F.relu, torch.relu, torch.relu_, F.relu_)


def _single_user(node):
    return len(node.users) == 1


def _pooled(gm, node):
    """(input node, pool module or None, its arguments or None) when `node` max-pools one tensor without returning
    indices, else None."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if type(module) is nn.MaxPool2d and not module.return_indices and len(node.args) == 1 and not node.kwargs:
            return node.args[0], module, None
    elif node.op == "call_function" and node.target in (F.max_pool2d, functional.max_pool2d):
        try:
            bound = _MAX_POOL2D.bind(*node.args, **node.kwargs)
        except TypeError:
            return None
        bound.apply_defaults()
        args = bound.arguments
        if args["return_indices"] or any(isinstance(v, torch.fx.Node) for k, v in args.items() if k != "input"):
            return None
        return args["input"], None, (args["kernel_size"], args["stride"], args["padding"], args["dilation"],
                                     args["ceil_mode"])
    return None


def _relued(gm, node):
    """(input node, ReLU module or None) when `node` is a ReLU of one tensor, else None."""
    if node.op == "call_module":
        if type(gm.get_submodule(node.target)) is torch.nn.ReLU and len(node.args) == 1 and not node.kwargs:
            return node.args[0], gm.get_submodule(node.target)
    elif node.op == "call_function" and node.target in _RELU_FUNCTIONS and len(node.args) >= 1:
        return node.args[0], None
    elif node.op == "call_method" and node.target in ("relu", "relu_") and len(node.args) == 1:
        return node.args[0], None
    return None


def _fusable_conv(gm, node):
    return (isinstance(node, torch.fx.Node) and node.op == "call_module" and _single_user(node)
            and type(gm.get_submodule(node.target)) is nn.Conv2d
            and gm.get_submodule(node.target).padding_mode == "zeros")


@torch.fx.wrap
def _conv_pool_relu(input, conv, pool, relu, pool_args):
    """relu(max_pool(conv(input))) as cnn_ext's fused operator. The pooling's arguments are pool's (a MaxPool2d),
    or pool_args for a functional max_pool2d. When a module involved has forward hooks, the modules themselves run
    (conv, then pooling and ReLU in either order: they commute), so that the hooks see every call."""
    if any(m is not None and (m._forward_hooks or m._forward_pre_hooks) for m in (conv, pool, relu)):
        y = conv(input)
        y = pool(y) if pool is not None else functional.max_pool2d(y, *pool_args)
        return relu(y) if relu is not None else torch.relu(y)
    if pool is not None:
        pool_args = (pool.kernel_size, pool.stride, pool.padding, pool.dilation, pool.ceil_mode)
    kernel_size, stride, padding, dilation, ceil_mode = pool_args
    return functional.conv2d_maxpool_relu(input, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation,
                                          conv.groups, kernel_size, stride, padding, dilation, ceil_mode)


def _fuse(gm):
    """Replace every conv -> max-pool -> ReLU and conv -> ReLU -> max-pool chain in gm's graph (each link the only
    user of the one before) by _conv_pool_relu; returns how many were fused."""
    fused = 0
    for node in list(gm.graph.nodes):
        chain = None  # (conv node, pooling node, pool_args, ReLU node)
        relu = _relued(gm, node)
        if relu is not None and isinstance(relu[0], torch.fx.Node) and _single_user(relu[0]):
            pool = _pooled(gm, relu[0])
            if pool is not None and _fusable_conv(gm, pool[0]):
                chain = (pool[0], relu[0], pool[2], node)
        pool = _pooled(gm, node)
        if chain is None and pool is not None and isinstance(pool[0], torch.fx.Node) and _single_user(pool[0]):
            relu = _relued(gm, pool[0])
            if relu is not None and _fusable_conv(gm, relu[0]):
                chain = (relu[0], node, pool[2], pool[0])
        if chain is None:
            continue
        conv_node, pool_node, pool_args, relu_node = chain

        def module_of(n):
            return gm.graph.get_attr(n.target) if n.op == "call_module" else None

        with gm.graph.inserting_before(node):
            call = gm.graph.call_function(_conv_pool_relu, (conv_node.args[0], module_of(conv_node),
                                                            module_of(pool_node), module_of(relu_node), pool_args))
        node.replace_all_uses_with(call)
        for dead in (node, *(n for n in (pool_node, relu_node) if n is not node), conv_node):
            gm.graph.erase_node(dead)
        fused += 1
    if fused:
        gm.graph.lint()
        gm.recompile()
    return fused


def convert(model: torch.nn.Module, fuse: bool = True) -> torch.nn.Module:
    """Run `model`'s convolution and pooling layers on cnn_ext's kernels; returns the model to use.

    Every torch.nn.Conv2d, MaxPool2d and AvgPool2d in `model` becomes (in place) the cnn_ext layer of the same
    configuration, keeping its parameters, buffers and hooks. Subclasses of those layers are left alone (their
    forward may differ from torch's), as is any layer our kernels cannot run; each one left is named in a single
    warning.

    With `fuse`, the model's forward is then traced with torch.fx, and every convolution followed by max-pooling and
    ReLU (in either order; as modules or torch.nn.functional calls) runs as cnn_ext's fused operator. If anything
    was fused, the result is a torch.fx.GraphModule holding the model's own submodules (state_dict keys and
    parameters unchanged, shared with `model`); otherwise it is `model` itself. A model that torch.fx cannot trace
    (data-dependent control flow, say) is returned unfused, with a warning saying why."""
    skipped = _swap_layers(model)
    if skipped:
        warnings.warn("cnn_ext.convert left these layers as they are:\n  " + "\n  ".join(skipped), stacklevel=2)
    if not fuse:
        return model
    try:
        graph = _Tracer().trace(model)
    except Exception as e:  # fx raises TraceError, TypeError, NotImplementedError, ... for what it cannot trace
        warnings.warn(f"cnn_ext.convert: torch.fx cannot trace {type(model).__name__} ({type(e).__name__}: "
                      f"{str(e).splitlines()[0] if str(e) else ''}), so its layers run unfused", stacklevel=2)
        return model
    gm = torch.fx.GraphModule(model, graph, class_name=type(model).__name__)
    if _fuse(gm) == 0:
        return model
    gm.train(model.training)
    return gm
