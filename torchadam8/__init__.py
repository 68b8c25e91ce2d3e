"""torchadam8: the bitsandbytes Adam family as torch.compile-native custom ops.

``import torchadam8`` defines every op of ``torch.ops.adam8`` (from ``ops_registry``) and loads
their C++/CUDA kernels, compiling them with ninja on first use.
"""

from __future__ import annotations

import ops_registry as _registry

_registry.define_ops()

from . import _extension  # noqa: E402

_extension.load()

from . import functional  # noqa: E402
from .optim import Adam, Adam8bit, Adam32bit, PagedAdam, PagedAdam8bit, PagedAdam32bit  # noqa: E402
from .overrides import GlobalOptimManager  # noqa: E402
from .paged import PagedTensor  # noqa: E402
from .qmap import create_dynamic_map, dynamic_maps  # noqa: E402

__version__ = "0.1.0"

__all__ = ["Adam", "Adam8bit", "Adam32bit", "PagedAdam", "PagedAdam8bit", "PagedAdam32bit", "PagedTensor",
           "GlobalOptimManager", "create_dynamic_map", "dynamic_maps", "functional"]
