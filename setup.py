"""Build of the cnn_ext extension: C++ (OpenMP) kernels always, CUDA kernels whenever a CUDA toolkit is found.

Environment variables:
  CNN_EXT_CPU_ONLY=1        build the C++ kernels only, even where nvcc exists.
  CNN_EXT_NO_EMULATOR=1     skip cnn_ext._cuda_emulator, the CUDA kernels compiled for the CPU against an emulation
                            of CUDA's execution model (built by default: it needs only the C++ compiler).
  CUDA_HOME=/path           the CUDA toolkit to use (default: /usr/local/cuda, else the one holding nvcc).
  TORCH_CUDA_ARCH_LIST      GPU architectures to compile for. Default: the visible GPUs' architectures, or "9.0"
                            (H100/H200) when no GPU is visible, so machines without a GPU (CI) still compile and
                            link the CUDA code.
  MAX_JOBS                  parallel compile jobs (ninja).
"""

import glob
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _env_flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _find_cuda_home():
    """The CUDA toolkit root, or None. Must run before torch.utils.cpp_extension is imported (it reads CUDA_HOME
    once, at import time). `nvcc` on PATH can be a wrapper script outside the toolkit (e.g. /usr/local/bin/nvcc),
    so a toolkit is only accepted where its headers are."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for home in candidates:
        if home and os.path.exists(os.path.join(home, "include", "cuda_runtime.h")) and os.path.exists(
            os.path.join(home, "bin", "nvcc")
        ):
            return home
    return None


CUDA_HOME = None if _env_flag("CNN_EXT_CPU_ONLY") else _find_cuda_home()
if CUDA_HOME:
    os.environ["CUDA_HOME"] = CUDA_HOME

import torch  # noqa: E402  (after CUDA_HOME is settled)
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

WITH_CUDA = CUDA_HOME is not None and torch.version.cuda is not None
if CUDA_HOME and not WITH_CUDA:
    print("cnn_ext: a CUDA toolkit was found but this torch has no CUDA support; building CPU kernels only",
          file=sys.stderr)

if WITH_CUDA and not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
    os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"


def _write_build_info():
    """Record what this build was made against, so import can refuse a mismatched torch with a clear message."""
    path = os.path.join(ROOT, "cnn_ext", "_build_info.py")
    text = (
        "# Written by setup.py at build time; do not edit.\n"
        f"TORCH_VERSION = {torch.__version__!r}\n"
        f"WITH_CUDA = {WITH_CUDA!r}\n"
        f"CUDA_ARCH_LIST = {os.environ.get('TORCH_CUDA_ARCH_LIST', '') if WITH_CUDA else ''!r}\n"
    )
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


_write_build_info()

# -Wno-psabi: GCC notes that vector arguments change ABI with the target; ours pass only between inline functions
# of one file (isa.h's PerIsa variants take a body's address, which also emits a copy compiled without the target).
cxx_flags = ["-O3", "-fopenmp", "-Wall", "-Wno-unknown-pragmas", "-Wno-psabi"]
sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
if WITH_CUDA:
    sources += sorted(glob.glob("csrc/cuda/*.cu"))
    extension = CUDAExtension(
        "cnn_ext._C",
        sources,
        extra_compile_args={
            "cxx": cxx_flags + ["-DCNN_EXT_WITH_CUDA"],
            "nvcc": ["-O3", "-lineinfo", "-DCNN_EXT_WITH_CUDA"],
        },
        extra_link_args=["-fopenmp"],
    )
else:
    extension = CppExtension("cnn_ext._C", sources, extra_compile_args={"cxx": cxx_flags},
                             extra_link_args=["-fopenmp"])

extensions = [extension]
if not _env_flag("CNN_EXT_NO_EMULATOR"):
    # The same CUDA sources, compiled by the host compiler against csrc/emulator/cuda_emulator.h.
    extensions.append(CppExtension(
        "cnn_ext._cuda_emulator",
        sorted(glob.glob("csrc/emulator/*.cpp")) + ["csrc/composite.cpp"],
        extra_compile_args={"cxx": ["-O2", "-fopenmp", "-Wall", "-Wno-unknown-pragmas", "-DCNN_EXT_CUDA_EMULATION"]},
        extra_link_args=["-fopenmp"],
    ))

setup(
    ext_modules=extensions,
    cmdclass={"build_ext": BuildExtension},
)
