"""Argument checks of the fake implementations.

Each function raises the sentence that csrc/checks.h raises for the same mistake, so an eager call,
a compiled call and a fake-tensor trace fail with the same message (tests/test_ops.py checks both
against every registry error input).
"""

from __future__ import annotations

from typing import Sequence

import torch

PARAM_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def is_dense(t: torch.Tensor) -> bool:
    """True when t covers its elements without gaps or overlap (any dimension order)."""
    pc = torch._prims_common
    check = getattr(pc, "is_non_overlapping_and_dense_or_false", None) or pc.is_non_overlapping_and_dense
    return bool(check(t))


def memory_order(t: torch.Tensor):
    """The dimensions longer than 1, outermost in memory first (two dense tensors with the same
    order hold their elements in the same sequence); None when t is not dense."""
    if not is_dense(t):
        return None
    dims = [d for d in range(t.dim()) if t.size(d) > 1]
    return tuple(sorted(dims, key=lambda d: -t.stride(d)))


def num(x: float) -> str:
    """A float as C++ streams print it (%g)."""
    return f"{x:g}"


def dtype_list(allowed: Sequence[torch.dtype]) -> str:
    names = [str(d) for d in allowed]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def check_length(op: str, name: str, got: int, ref: str, want: int) -> None:
    torch._check_value(
        got == want, lambda: f"{op}: {name} has {got} tensors but {ref} has {want}; pass one per parameter"
    )


def check_dtype(op: str, what: str, t: torch.Tensor, allowed: Sequence[torch.dtype]) -> None:
    torch._check_type(t.dtype in allowed, lambda: f"{op}: {what} has dtype {t.dtype}; expected {dtype_list(allowed)}")


def check_device(op: str, what: str, t: torch.Tensor, device: torch.device, ref: str = "the parameters") -> None:
    """`ref` names the argument that sets the call's device."""
    torch._check_value(
        t.device == device,
        lambda: f"{op}: {what} is on {t.device} but {ref} {'are' if ref == 'the parameters' else 'is'} on {device}; "
        "all tensors of one call must be on one device",
    )


def check_like(op: str, what: str, t: torch.Tensor, ref_what: str, ref: torch.Tensor, same_dtype: bool) -> None:
    torch._check_type(
        not same_dtype or t.dtype == ref.dtype,
        lambda: f"{op}: {what} has dtype {t.dtype} but {ref_what} has dtype {ref.dtype}; they must match",
    )
    torch._check_value(
        t.shape == ref.shape,
        lambda: f"{op}: {what} has shape {list(t.shape)} but {ref_what} has shape {list(ref.shape)}; they must match",
    )
    torch._check_value(
        t.numel() <= 1 or t.stride() == ref.stride(),
        lambda: f"{op}: {what} has strides {list(t.stride())} but {ref_what} has strides {list(ref.stride())}; "
        "they must match",
    )


def check_dense(op: str, what: str, t: torch.Tensor) -> None:
    torch._check_value(
        is_dense(t),
        lambda: f"{op}: {what} with shape {list(t.shape)} and strides {list(t.stride())} is not dense; "
        "pass a contiguous (or permuted contiguous) tensor",
    )


def check_numel(op: str, what: str, t: torch.Tensor, want: int) -> None:
    torch._check_value(t.numel() == want, lambda: f"{op}: {what} has {t.numel()} elements; expected {want}")


def check_nonnegative(op: str, name: str, value: float) -> None:
    torch._check_value(value >= 0.0, lambda: f"{op}: {name} must be >= 0, got {num(value)}")


def check_blocksize(op: str, blocksize: int) -> None:
    torch._check_value(
        64 <= blocksize <= 4096 and blocksize & (blocksize - 1) == 0,
        lambda: f"{op}: blocksize must be a power of two in [64, 4096], got {blocksize}",
    )


def check_code(op: str, name: str, code: torch.Tensor, device: torch.device, ref: str = "the parameters") -> None:
    check_device(op, name, code, device, ref)
    check_dtype(op, name, code, (torch.float32,))
    check_numel(op, name, code, 256)


def check_optional_length(op: str, name: str, got: int, want: int) -> None:
    torch._check_value(
        got in (0, want),
        lambda: f"{op}: {name} has {got} tensors but params has {want}; pass one per parameter with amsgrad, none without",
    )


def check_adam_common(
    op: str,
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    states: Sequence[tuple[str, Sequence[torch.Tensor], torch.dtype, bool]],
    steps: Sequence[torch.Tensor],
    lr: torch.Tensor,
    betas: torch.Tensor,
    eps: float,
    weight_decay: float,
) -> None:
    """The checks every Adam op runs; `states` are (name, tensors, dtype, optional) per-parameter
    lists (an optional one may be empty: amsgrad off)."""
    n = len(params)
    check_length(op, "grads", len(grads), "params", n)
    for name, tensors, _, optional in states:
        if optional:
            check_optional_length(op, name, len(tensors), n)
        else:
            check_length(op, name, len(tensors), "params", n)
    check_length(op, "steps", len(steps), "params", n)
    check_nonnegative(op, "eps", eps)
    check_nonnegative(op, "weight_decay", weight_decay)
    check_dtype(op, "lr", lr, (torch.float32,))
    check_numel(op, "lr", lr, 1)
    check_dtype(op, "betas", betas, (torch.float64,))  # values unchecked, as lr's (a sync on CUDA)
    check_numel(op, "betas", betas, 2)
    if n == 0:
        return
    device = params[0].device
    check_device(op, "lr", lr, device)
    check_device(op, "betas", betas, device)
    for i in range(n):
        p = f"params[{i}]"
        check_dtype(op, p, params[i], PARAM_DTYPES)
        check_device(op, p, params[i], device)
        check_dense(op, p, params[i])
        check_device(op, f"grads[{i}]", grads[i], device)
        check_like(op, f"grads[{i}]", grads[i], p, params[i], same_dtype=True)
        for name, tensors, dtype, _ in states:
            if not tensors:
                continue
            what = f"{name}[{i}]"
            check_device(op, what, tensors[i], device)
            check_dtype(op, what, tensors[i], (dtype,))
            check_like(op, what, tensors[i], p, params[i], same_dtype=False)
        check_device(op, f"steps[{i}]", steps[i], device)
        check_dtype(op, f"steps[{i}]", steps[i], (torch.float32,))
        check_numel(op, f"steps[{i}]", steps[i], 1)


def check_absmax_list(
    op: str, name: str, params: Sequence[torch.Tensor], absmax: Sequence[torch.Tensor], block_wise: bool, block: int
) -> None:
    """The scales of an 8-bit state list: one float32 per block of each parameter, or one per tensor."""
    for i, t in enumerate(absmax):
        what = f"{name}[{i}]"
        check_device(op, what, t, params[i].device)
        check_dtype(op, what, t, (torch.float32,))
        check_numel(op, what, t, -(-params[i].numel() // block) if block_wise else 1)
        check_dense(op, what, t)


def check_found_inf(op: str, found_inf: torch.Tensor | None, device: torch.device) -> None:
    """torch.amp.GradScaler's flag: a float32 scalar, nonzero when a gradient held an inf or NaN."""
    if found_inf is None:
        return
    check_device(op, "found_inf", found_inf, device)
    check_dtype(op, "found_inf", found_inf, (torch.float32,))
    check_numel(op, "found_inf", found_inf, 1)


def check_gnorm_scales(op: str, scales: torch.Tensor | None, n: int, device: torch.device) -> None:
    if scales is None:
        return
    check_device(op, "gnorm_scales", scales, device)
    check_dtype(op, "gnorm_scales", scales, (torch.float32,))
    check_numel(op, "gnorm_scales", scales, n)
    check_dense(op, "gnorm_scales", scales)
