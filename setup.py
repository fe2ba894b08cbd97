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
  CC, CXX                   the compilers. A C++ compiler without a shared libstdc++ is replaced by the system's
                            g++ (see _choose_compilers).
"""

import glob
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig

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


def _links_shared_libstdcxx(compiler):
    """Whether the C++ compiler `compiler` (a command line) links libstdc++ as a shared library: True, False, or
    None where it cannot be asked (not a GCC-style driver)."""
    try:
        found = subprocess.run(shlex.split(compiler) + ["-print-file-name=libstdc++.so"], capture_output=True,
                               text=True, timeout=60)
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return None
    if found.returncode != 0:
        return None
    return os.path.isabs(found.stdout.strip())  # a bare name back: it has only the static library


def _choose_compilers():
    """Keeps CC/CXX unless the C++ compiler has no shared libstdc++. Such a compiler links libstdc++ statically into
    the extension, where its copy clashes with the shared libstdc++ that torch has loaded: every error message our
    kernels format crashed the process (seen on the GPU machine, whose CC/CXX name such a toolchain, /opt/gcc). It
    is replaced by the system's gcc/g++ where those link libstdc++ dynamically; with none, the build stops."""
    if not sys.platform.startswith("linux"):
        return
    cxx = os.environ.get("CXX") or sysconfig.get_config_var("CXX") or "c++"
    if _links_shared_libstdcxx(cxx) is not False:
        return
    for cc, cxx_candidate in ((shutil.which("gcc"), shutil.which("g++")), ("/usr/bin/gcc", "/usr/bin/g++"),
                              (shutil.which("cc"), shutil.which("c++"))):
        if cc and cxx_candidate and os.path.exists(cc) and _links_shared_libstdcxx(cxx_candidate):
            print(f"cnn_ext: the C++ compiler {cxx!r} has no shared libstdc++: it would link libstdc++ statically "
                  f"into the extension, whose error messages then crash beside torch's shared libstdc++. Building "
                  f"with {cxx_candidate} and {cc} instead.", file=sys.stderr)
            os.environ.update(CC=cc, CXX=cxx_candidate, CUDAHOSTCXX=cxx_candidate)
            return
    sys.exit(f"cnn_ext: the C++ compiler {cxx!r} has no shared libstdc++ (it would link libstdc++ statically into the "
             f"extension, which then crashes beside torch's shared libstdc++), and no gcc/g++ that has one was found: "
             f"set CC and CXX to compilers that link libstdc++ dynamically.")


_choose_compilers()
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
        f"CXX = {os.environ.get('CXX') or sysconfig.get_config_var('CXX')!r}\n"
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
