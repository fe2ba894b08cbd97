"""cnn_ext: hand-written convolution and pooling kernels (C++/OpenMP and CUDA) as PyTorch custom ops."""

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
from .convert import convert  # noqa: E402

cpu_capability = cpu_dispatch.capability
cpu_dispatch.force_from_environment()
cuda_emulation.enable_from_environment()

__all__ = ["functional", "nn", "convert", "ops", "cpu_capability", "cpu_dispatch", "cuda_emulation"]
