"""The single list of every op in ``torch.ops.adam8``.

Each entry (an :class:`OpInfo`) holds the op's schema, a one-line doc, its fake implementation, a
plain PyTorch reference and its sample inputs. ``define_ops()`` defines the schemas and fakes;
``import torchadam8`` calls it and then loads the C++/CUDA kernels, which only implement. The
tests iterate over ``OPS``; adding an op means adding an entry here plus its kernels (and, for an
op that mutates, its name in csrc/versions.cpp).
"""

from __future__ import annotations

import torch

from .adam import ADAM8BIT_STEP, ADAM_STEP
from .clipping import PERCENTILE_CLIPPING
from .opinfo import ErrorInput, OpInfo, SampleInput
from .paging import ZEROS_MANAGED, PAGE_OUT, PREFETCH
from .quantize import DEQUANTIZE_BLOCKWISE, QUANTIZE_BLOCKWISE

NAMESPACE = "adam8"

OPS: tuple[OpInfo, ...] = (
    QUANTIZE_BLOCKWISE,
    DEQUANTIZE_BLOCKWISE,
    ADAM_STEP,
    ADAM8BIT_STEP,
    PERCENTILE_CLIPPING,
    ZEROS_MANAGED,
    PREFETCH,
    PAGE_OUT,
)

_library: torch.library.Library | None = None


def define_ops() -> None:
    """Defines every op's schema and fake implementation under torch.ops.adam8 (idempotent)."""
    global _library
    if _library is not None:
        return
    lib = torch.library.Library(NAMESPACE, "DEF")
    for info in OPS:
        lib.define(info.name + info.schema)
        torch.library.register_fake(info.qualname, info.fake, lib=lib)
    _library = lib


def get(name: str) -> OpInfo:
    for info in OPS:
        if info.name == name:
            return info
    raise KeyError(f"no op named {name!r} in the adam8 registry; known: {[i.name for i in OPS]}")


__all__ = ["OPS", "OpInfo", "SampleInput", "ErrorInput", "NAMESPACE", "define_ops", "get"]
