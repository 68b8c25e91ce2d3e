"""The dynamic quantization maps of the 8-bit states."""

from __future__ import annotations

import functools

import torch


def create_dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    """The 256-entry dynamic map of bitsandbytes, value for value.

    Dettmers, "8-Bit Approximations for Parallelism in Deep Learning" (arXiv:1511.04561): decade
    ``10**(e - max_exponent_bits + 1)``, for e = 0 .. max_exponent_bits - 1, holds linearly spaced
    values (the midpoints of a linspace over [0.1, 1] of that decade) whose count doubles from one
    decade to the next, so small magnitudes keep relative precision. The signed map mirrors the
    values below zero; the unsigned map (for the second moment, never negative) spends the sign
    bit on twice as many values per decade. Both also hold 0 and 1; the result is sorted, float32.
    """
    value_bits = total_bits - 1
    values = [0.0, 1.0]

    def add_decade(count: int, scale: float) -> None:
        edges = torch.linspace(0.1, 1, count + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0
        values.extend((scale * mids).tolist())
        if signed:
            values.extend((-scale * mids).tolist())

    for e in range(max_exponent_bits):
        # (truncated: with more exponent bits than value bits, the first decades hold no values)
        count = int(2 ** (e + value_bits - max_exponent_bits + (0 if signed else 1)) + 1) - 1
        add_decade(count, 10.0 ** (e - max_exponent_bits + 1))
    # With fewer exponent bits than value bits, the all-zero exponent adds a linear region.
    extra = 2 ** (value_bits - max_exponent_bits) - 1
    if extra > 0:
        add_decade(extra, 10.0 ** 0)
    if len(values) != 2**total_bits:
        raise ValueError(
            f"create_dynamic_map: signed={signed}, max_exponent_bits={max_exponent_bits}, total_bits={total_bits} "
            f"gives {len(values)} values instead of {2 ** total_bits}"
        )
    values += [0.0] * (256 - len(values))
    return torch.tensor(sorted(values), dtype=torch.float32)


@functools.lru_cache(maxsize=None)
def _maps_cpu() -> tuple[torch.Tensor, torch.Tensor]:
    return create_dynamic_map(signed=True), create_dynamic_map(signed=False)


def dynamic_maps(device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(signed map for the first moment, unsigned map for the second) on `device` (fresh copies)."""
    signed, unsigned = _maps_cpu()
    return signed.to(device, copy=True), unsigned.to(device, copy=True)
