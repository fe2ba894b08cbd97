"""The build refuses a torch it was not built against, with a message naming both versions, and does not build with a
C++ compiler that would link libstdc++ statically."""

import os
import shutil
import subprocess
import sys

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


def _fake_compiler(folder, name, libstdcxx_so):
    """A stand-in compiler driver that answers -print-file-name=libstdc++.so as a GCC would: with the library's
    path, or with the bare name when it has only the static library."""
    path = folder / name
    path.write_text(f"#!/bin/sh\necho {libstdcxx_so}\n")
    path.chmod(0o755)
    return str(path)


def _setup_py_compilers(tmp_path, env):
    """Runs a copy of setup.py (no sources, `--version`) in tmp_path; its stderr and the CXX it recorded."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    project = tmp_path / "project"
    (project / "cnn_ext").mkdir(parents=True, exist_ok=True)
    shutil.copy(os.path.join(root, "setup.py"), project)
    result = subprocess.run([sys.executable, "setup.py", "--version"], cwd=project, capture_output=True, text=True,
                            env={**os.environ, **env}, timeout=300)
    info = {}
    if (project / "cnn_ext" / "_build_info.py").exists():
        exec((project / "cnn_ext" / "_build_info.py").read_text(), info)
    return result, info.get("CXX")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="GCC-style toolchains on Linux")
def test_compiler_without_shared_libstdcxx_is_replaced(tmp_path):
    """A C++ compiler that would link libstdc++ statically (the GPU machine's CC/CXX) is swapped for one that links
    it dynamically: errors formatted by such a build crashed the process there."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    static = _fake_compiler(bin_dir, "static-g++", "libstdc++.so")
    good = _fake_compiler(bin_dir, "g++", "/usr/lib/libstdc++.so")
    _fake_compiler(bin_dir, "gcc", "/usr/lib/libstdc++.so")
    path = f"{bin_dir}{os.pathsep}{os.environ['PATH']}"
    result, cxx = _setup_py_compilers(tmp_path, {"CXX": static, "CC": static, "PATH": path})
    assert result.returncode == 0, result.stderr
    assert "has no shared libstdc++" in result.stderr and cxx == good

    result, cxx = _setup_py_compilers(tmp_path, {"CXX": good, "PATH": path})  # a good compiler is kept, silently
    assert result.returncode == 0 and "libstdc++" not in result.stderr and cxx == good
