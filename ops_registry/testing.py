"""Input makers and comparisons shared by the registry's samples and the tests."""

from __future__ import annotations

import math

import torch


def randn(*shape, dtype=torch.float32, device="cpu", positive=False) -> torch.Tensor:
    """Random values spread over six decades (so every region of a dynamic code is hit)."""
    scale = torch.exp(torch.empty(shape, device=device).uniform_(-6 * math.log(10), 0.0))
    base = torch.rand(shape, device=device) if positive else torch.randn(shape, device=device)
    return (base * scale).to(dtype)


def make_code(signed: bool, device="cpu") -> torch.Tensor:
    from torchadam8.qmap import create_dynamic_map  # late: torchadam8 imports this package

    return create_dynamic_map(signed=signed).to(device)


def assert_equal(actual, expected) -> None:
    torch.testing.assert_close(actual, expected, rtol=0, atol=0, equal_nan=True)


def assert_close_scaled(actual: torch.Tensor, expected: torch.Tensor, rtol: float, scale_tol: float, what: str):
    """|actual - expected| <= rtol * |expected| + scale_tol * max|expected|, elementwise."""
    a, e = actual.double(), expected.double()
    if e.numel() == 0:
        return
    bound = rtol * e.abs() + scale_tol * e.abs().max()
    bad = (a - e).abs() > bound
    if bad.any():
        i = int(bad.nonzero()[0, 0]) if bad.dim() == 1 else tuple(bad.nonzero()[0].tolist())
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {e.numel()} elements differ beyond rtol={rtol}, scale_tol={scale_tol}; "
            f"first at {i}: {a[i].item()!r} vs {e[i].item()!r}"
        )


# Relative precision of one rounding to each parameter dtype.
EPS = {torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}
