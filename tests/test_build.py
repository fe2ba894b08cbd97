"""The build refuses a torch it was not built against, with a message naming both versions."""

import pytest

import cnn_ext
from cnn_ext import _build_info


def test_mismatched_torch_version_gives_clear_import_error(monkeypatch):
    monkeypatch.setattr(_build_info, "TORCH_VERSION", "2.0.0")
    with pytest.raises(ImportError, match=r"built against torch 2\.0\.0 but torch \S+ is installed"):
        cnn_ext._load_extension()


def test_build_info_names_this_torch():
    import torch

    assert _build_info.TORCH_VERSION == torch.__version__
