"""cnn_ext: hand-written convolution and pooling kernels (C++/OpenMP and CUDA) as PyTorch custom ops."""

import os

import torch


def _load_extension():
    """Import the compiled kernels, refusing a build made against a different torch with a clear message
    (instead of an undefined-symbol trace from the dynamic loader)."""
    try:
        from . import _build_info
    except ImportError as e:
        raise ImportError(
            "cnn_ext is not built: run `pip install -e .` (or `pip install --no-build-isolation -e .`) "
            "in the project directory"
        ) from e
    if _build_info.TORCH_VERSION != torch.__version__:
        raise ImportError(
            f"cnn_ext was built against torch {_build_info.TORCH_VERSION} but torch {torch.__version__} is "
            "installed; rebuild it with `pip install --no-build-isolation -e .`"
        )
    from . import _C  # noqa: F401  (loading the library registers the torch.ops.cnn_ext operators)


_load_extension()

from . import ops  # noqa: E402,F401  (autograd formulas; must follow the library load)
from . import cpu_dispatch, cuda_emulation, functional, nn  # noqa: E402
from . import _C  # noqa: E402
from .convert import convert  # noqa: E402

cpu_capability = cpu_dispatch.capability
cpu_dispatch.force_from_environment()
cuda_emulation.enable_from_environment()


def output_cache_info():
    """(bytes, budget): the free bytes the CPU output cache holds now, and the most it keeps. Our CPU ops take
    outputs of 1 MiB and more from the blocks that earlier outputs freed: a training step asks for the same sizes
    every time, and fresh memory page-faults on every 4 KiB page it touches (~10,000 faults per DeepMNIST step
    without the cache). The budget is CNN_EXT_OUTPUT_CACHE_MB at import (default 1024 MiB; 0 keeps nothing)."""
    return _C.output_cache_info()


def set_output_cache_budget(budget):
    """Keep at most `budget` bytes of freed outputs' blocks (the oldest are freed first; 0 turns the cache off)."""
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 0:
        raise ValueError(f"set_output_cache_budget: budget must be a number of bytes >= 0, got {budget!r}")
    _C.set_output_cache_budget(budget)


def empty_output_cache():
    """Frees every block the CPU output cache holds, keeping its budget (as torch.cuda.empty_cache does)."""
    budget = output_cache_info()[1]
    _C.set_output_cache_budget(0)
    _C.set_output_cache_budget(budget)


def _output_cache_budget_from_environment():
    value = os.environ.get("CNN_EXT_OUTPUT_CACHE_MB", "").strip()
    if value:
        if not value.isdigit():
            raise ValueError(f"CNN_EXT_OUTPUT_CACHE_MB must be a whole number of MiB >= 0, got {value!r}")
        set_output_cache_budget(int(value) << 20)


_output_cache_budget_from_environment()

__all__ = ["functional", "nn", "convert", "ops", "cpu_capability", "cpu_dispatch", "cuda_emulation",
           "output_cache_info", "set_output_cache_budget", "empty_output_cache"]
