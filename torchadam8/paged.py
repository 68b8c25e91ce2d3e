"""Paged optimizer states: :class:`PagedTensor`, a traceable wrapper subclass whose inner tensor
lives in CUDA managed (unified) memory (``adam8.zeros_managed``; ordinary memory on the CPU), so
the driver can move it between GPU and host while the GPU computes with it."""

from __future__ import annotations

import torch
from torch.utils._pytree import tree_map_only

# States with fewer elements stay ordinary tensors (bitsandbytes' rule): paging them saves little.
PAGED_MIN_NUMEL = 100_000


class PagedTensor(torch.Tensor):
    """A tensor whose memory the GPU driver may page to the host and back (managed memory).

    It behaves as its inner tensor (``.inner``) for every op: arguments are unwrapped, and an op
    that returns one of its paged arguments (an in-place op) returns the PagedTensor itself; any
    other result is an ordinary tensor. Under ``torch.compile`` it is flattened to its inner tensor
    (``__tensor_flatten__``), so the compiled optimizer step updates the managed memory in place.
    """

    _inner: torch.Tensor

    @staticmethod
    def __new__(cls, inner: torch.Tensor):
        if isinstance(inner, PagedTensor):
            raise TypeError("PagedTensor wraps a plain tensor, got a PagedTensor")
        return torch.Tensor._make_wrapper_subclass(
            cls, inner.shape, strides=inner.stride(), storage_offset=inner.storage_offset(), dtype=inner.dtype,
            device=inner.device, requires_grad=False,
        )

    def __init__(self, inner: torch.Tensor):
        self._inner = inner

    @property
    def inner(self) -> torch.Tensor:
        """The tensor holding the values (in managed memory on CUDA)."""
        return self._inner

    def __repr__(self) -> str:  # reads no values: printing must not migrate the memory
        return f"PagedTensor(shape={list(self.shape)}, dtype={self.dtype}, device={self.device})"

    def __tensor_flatten__(self):
        return ["_inner"], None

    @staticmethod
    def __tensor_unflatten__(inner_tensors, ctx, outer_size, outer_stride):
        return PagedTensor(inner_tensors["_inner"])

    def __deepcopy__(self, memo):
        """A deep copy is paged too (new managed memory holding the same values)."""
        out = paged_zeros_like(self, self.dtype)
        memo[id(self)] = out
        return out.copy_(self)

    def _stable_hash_for_caching(self) -> str:
        return "torchadam8.PagedTensor"  # no metadata beyond the inner tensor's

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        wrappers: dict[int, PagedTensor] = {}

        def unwrap(t: PagedTensor) -> torch.Tensor:
            wrappers[id(t._inner)] = t
            return t._inner

        out = func(*tree_map_only(PagedTensor, unwrap, args), **tree_map_only(PagedTensor, unwrap, kwargs or {}))
        return tree_map_only(torch.Tensor, lambda t: wrappers.get(id(t), t), out)


def paged_zeros_like(p: torch.Tensor, dtype: torch.dtype) -> PagedTensor:
    """Zeros laid out like `p` (same strides: the kernels walk p and its states alike) in managed
    memory on p's device."""
    flat = torch.ops.adam8.zeros_managed([p.numel()], dtype, p.device)
    return PagedTensor(flat.as_strided(p.shape, p.stride()))


def unwrap(t):
    """The inner tensor of a PagedTensor; anything else as it is."""
    return t._inner if isinstance(t, PagedTensor) else t
