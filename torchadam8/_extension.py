"""Builds and loads the adam8 kernels: ``import torchadam8`` calls load(), which compiles them
with ninja on first use (cached per torch build and CPU instruction set under
``$TORCHADAM8_BUILD_DIR``, default ``~/.cache/torchadam8``): the CPU kernels always, and the CUDA
kernels whenever torch is a CUDA build and nvcc is found, with or without a GPU present
(``TORCH_CUDA_ARCH_LIST`` picks the targets; default "8.0;9.0"; ``TORCHADAM8_VERBOSE=1`` shows
the compiler's commands)."""

from __future__ import annotations

import os
import platform
import shlex
import shutil
import subprocess
import sysconfig
import tempfile
import sys
import time
from pathlib import Path

import torch

NAME = "adam8_kernels"
_loaded: str | None = None
_module = None  # the library imported as a Python module: csrc/host.cpp's functions (or None)


def source_dir() -> Path:
    """csrc/: inside the installed package, or beside it in a source checkout."""
    for candidate in (Path(__file__).parent / "csrc", Path(__file__).parent.parent / "csrc"):
        if (candidate / "adam8_math.h").is_file():
            return candidate
    raise FileNotFoundError(f"torchadam8: kernel sources (csrc/) not found next to {Path(__file__).parent}")


def simd_flags() -> list[str]:
    """AVX2/FMA/F16C when this x86 CPU has them (the kernels fall back to scalar code otherwise)."""
    if os.environ.get("TORCHADAM8_SIMD", "auto") == "off" or platform.machine() not in ("x86_64", "AMD64"):
        return []
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return []
    return ["-mavx2", "-mfma", "-mf16c"] if {"avx2", "fma", "f16c"} <= flags else []


def cuda_home() -> str | None:
    """The CUDA toolkit to build with, or None when torch has no CUDA, nvcc is missing or there
    are no CUDA sources."""
    if torch.version.cuda is None or not any(source_dir().glob("cuda/*.cu")):
        return None
    from torch.utils import cpp_extension

    home = os.environ.get("CUDA_HOME") or cpp_extension.CUDA_HOME
    return home if home and Path(home, "bin", "nvcc").exists() else None


def build_dir(with_cuda: bool) -> Path:
    tag = f"torch{torch.__version__}-{'cuda' + torch.version.cuda if with_cuda else 'cpu'}"
    tag += "-avx2" if simd_flags() else "-generic"
    root = Path(os.environ.get("TORCHADAM8_BUILD_DIR", Path.home() / ".cache" / "torchadam8"))
    return root / tag.replace("+", "_")


def python_headers() -> bool:
    """Whether this Python's headers are installed (Debian's python3 needs python3-dev): without
    them the library is built without its Python module, csrc/host.cpp, and the optimizers check a
    step's parameters in Python instead (slower, the same results)."""
    return (Path(sysconfig.get_paths()["include"]) / "Python.h").is_file()


def _sources(with_cuda: bool) -> list[Path]:
    src = source_dir()
    files = sorted(src.glob("*.cpp")) + sorted(src.glob("cpu/*.cpp"))
    if not python_headers():
        files.remove(src / "host.cpp")
    if with_cuda:
        files += sorted(src.glob("cuda/*.cu")) + sorted(src.glob("cuda/*.cpp"))
    return files


def _stale(library: Path, with_cuda: bool) -> bool:
    if not library.exists():
        return True
    built = library.stat().st_mtime
    src = source_dir()
    inputs = _sources(with_cuda) + list(src.rglob("*.h")) + list(src.rglob("*.cuh"))
    return any(f.stat().st_mtime > built for f in inputs)


def _links_libstdcxx_shared(cxx: str) -> bool:
    """Whether a shared library linked by `cxx` loads the shared libstdc++ (the one torch uses):
    links a one-line library and reads its dynamic section."""
    with tempfile.TemporaryDirectory() as tmp:
        lib = Path(tmp) / "probe.so"
        try:
            subprocess.run([cxx, "-shared", "-fPIC", "-x", "c++", "-", "-o", str(lib)], check=True,
                           capture_output=True, timeout=60,
                           input=b"#include <sstream>\nint probe() { std::ostringstream s; s << 1; return 0; }\n")
            dynamic = subprocess.run(["readelf", "-d", str(lib)], check=True, capture_output=True, text=True,
                                     timeout=60).stdout
        except (OSError, subprocess.SubprocessError):
            return True  # no working compiler or readelf: torch's build reports its own error
    return "libstdc++" in dynamic


def _compiler_with_shared_libstdcxx() -> str | None:
    """A $CXX that links libstdc++ statically (the GPU image's CXX=/opt/gcc/bin/g++ does) builds a
    library holding its own copy of the C++ runtime, whose iostream locale is not the process's:
    formatting a number into an error message then crashes (torch 2.11 there) or prints nothing
    (here). Returns the system `c++` to build with instead, or None to keep $CXX."""
    cxx = os.environ.get("CXX")
    if not cxx or _links_libstdcxx_shared(cxx):
        return None
    system = shutil.which("c++")
    if system is None or not _links_libstdcxx_shared(system):
        raise RuntimeError(f"torchadam8: CXX={cxx} links libstdc++ statically and no `c++` on PATH links it "
                           "shared; set CXX to a compiler that links the libstdc++.so torch loads")
    also = " (and $CC, nvcc's host compiler, with the system cc)" if os.environ.get("CC") else ""
    print(f"torchadam8: CXX={cxx} links libstdc++ statically; building with {system} instead{also}", file=sys.stderr)
    return system


def load(verbose: bool = os.environ.get("TORCHADAM8_VERBOSE") == "1") -> str:
    """Compiles the kernels if needed and loads them; returns the library's path."""
    global _loaded, _module
    if _loaded is not None:
        return _loaded
    from torch.utils import cpp_extension

    home = cuda_home()
    with_cuda = home is not None
    if with_cuda:
        os.environ.setdefault("CUDA_HOME", home)
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    directory = build_dir(with_cuda)
    directory.mkdir(parents=True, exist_ok=True)
    library = directory / f"{NAME}.so"
    building = _stale(library, with_cuda)
    cxx = _compiler_with_shared_libstdcxx() if building else None
    if building:
        print(f"torchadam8: compiling {'CPU and CUDA' if with_cuda else 'CPU'} kernels into {directory} ...",
              file=sys.stderr, flush=True)
    start = time.perf_counter()
    # No FMA contraction: the only fused multiply-adds are the explicit ones of adam8_math.h, so
    # SIMD, scalar and CUDA lanes round alike.
    cflags = ["-O3", "-fopenmp", "-ffp-contract=off", *simd_flags()]
    saved = {k: os.environ.get(k) for k in ("CXX", "CC")}
    if cxx is not None:
        os.environ["CXX"] = cxx  # torch's build reads the compiler from $CXX
        # and gives $CC to nvcc as its host compiler (-ccbin): the same toolchain for both
        system_cc = shutil.which("cc")
        if saved["CC"] is not None and system_cc is not None:
            os.environ["CC"] = system_cc
    try:
        module = python_headers()
        loaded = cpp_extension.load(
            name=NAME,
            sources=[str(s) for s in _sources(with_cuda)],
            extra_cflags=cflags + (["-DADAM8_WITH_CUDA"] if with_cuda else []),
            # TORCHADAM8_CUDA_FLAGS: extra nvcc flags for kernel-tuning experiments (scripts/gpu_check.sh);
            # give such a build its own TORCHADAM8_BUILD_DIR.
            extra_cuda_cflags=["-O3", "--fmad=false", "-lineinfo", "-DADAM8_WITH_CUDA",
                               *shlex.split(os.environ.get("TORCHADAM8_CUDA_FLAGS", ""))],
            extra_ldflags=["-fopenmp"],
            build_directory=str(directory),
            with_cuda=with_cuda,
            is_python_module=module,  # (importing it registers the kernels, as load_library does)
            verbose=verbose,
        )
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    if building:
        print(f"torchadam8: kernels built in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    _module = loaded if module else None
    _loaded = str(library)
    return _loaded


def host():
    """The kernel library's Python functions (csrc/host.cpp), loading it first if needed; None
    where it was built without them (no Python headers)."""
    load()
    return _module
