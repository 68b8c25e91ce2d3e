"""python -m torchadam8.build: compile the kernels ahead of time and say what was built.

Importing torchadam8 (which this does first) compiles whatever is missing; this command then
reports the library, whether it holds the CUDA kernels, and the CPU instruction set. With
--require-cuda it fails unless the CUDA kernels were built (CI uses it: set CUDA_HOME and
TORCH_CUDA_ARCH_LIST where there is no GPU to detect). TORCHADAM8_VERBOSE=1 shows the compiler's
commands.
"""

from __future__ import annotations

import argparse
import sys

import torch

from torchadam8 import _extension


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--require-cuda", action="store_true", help="fail unless the CUDA kernels are built too")
    args = parser.parse_args(argv)
    path = _extension.load()
    cuda = _extension.cuda_home() is not None
    print(f"torchadam8: kernels ready: {path} (CUDA: {'yes' if cuda else 'no'}, "
          f"SIMD: {' '.join(_extension.simd_flags()) or 'none'})")
    if args.require_cuda and not cuda:
        if torch.version.cuda is None:
            why = "torch is a CPU-only build"
        elif not any(_extension.source_dir().glob("cuda/*.cu")):
            why = f"there are no CUDA sources in {_extension.source_dir() / 'cuda'}"
        else:
            why = "nvcc was not found (set CUDA_HOME to the toolkit's directory)"
        sys.exit("torchadam8.build: --require-cuda, but " + why)


if __name__ == "__main__":
    main()
