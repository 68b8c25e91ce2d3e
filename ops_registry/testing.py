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


def assert_close_scaled(actual: torch.Tensor, expected: torch.Tensor, rtol: float, scale_tol: float, what: str,
                        magnitude: torch.Tensor | None = None):
    """|actual - expected| <= rtol * m + scale_tol * max(m), elementwise, over the finite values,
    where m = |expected|, or max(|expected|, magnitude) when the result came from terms of that
    size (p - update rounds to ulps of p and of the update, however much of them cancels); NaN
    and inf must sit at the same places in both."""
    a, e = actual.double(), expected.double()
    if e.numel() == 0:
        return
    same = (a.isnan() == e.isnan()) & (a.isposinf() == e.isposinf()) & (a.isneginf() == e.isneginf())
    if not same.all():
        i = tuple((~same).nonzero()[0].tolist())
        raise AssertionError(f"{what}: non-finite values differ; first at {i}: {a[i].item()!r} vs {e[i].item()!r}")
    finite = e.isfinite()
    a, e = torch.where(finite, a, 0.0), torch.where(finite, e, 0.0)
    m = e.abs()
    if magnitude is not None:
        m = torch.maximum(m, torch.where(finite, magnitude.double().abs(), 0.0))
    bound = rtol * m + scale_tol * m.max()
    bad = (a - e).abs() > bound
    if bad.any():
        i = int(bad.nonzero()[0, 0]) if bad.dim() == 1 else tuple(bad.nonzero()[0].tolist())
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {e.numel()} elements differ beyond rtol={rtol}, scale_tol={scale_tol}; "
            f"first at {i}: {a[i].item()!r} vs {e[i].item()!r}"
        )


# Relative precision of one rounding to each parameter dtype.
EPS = {torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}
