"""Registry entries of the blockwise quantization ops."""

from __future__ import annotations

import torch

from . import checks
from .opinfo import ErrorInput, OpInfo, SampleInput
from .testing import assert_equal, make_code, randn

QUANTIZE = "adam8.quantize_blockwise"
DEQUANTIZE = "adam8.dequantize_blockwise"


# ---------------------------------------------------------------- fakes
def quantize_fake(x: torch.Tensor, code: torch.Tensor, blocksize: int):
    checks.check_dtype(QUANTIZE, "x", x, checks.PARAM_DTYPES)
    checks.check_code(QUANTIZE, "code", code, x.device, "x")
    checks.check_blocksize(QUANTIZE, blocksize)
    blocks = (x.numel() + blocksize - 1) // blocksize
    return x.new_empty(x.shape, dtype=torch.uint8), x.new_empty((blocks,), dtype=torch.float32)


def dequantize_fake(q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int, dtype: torch.dtype):
    checks.check_dtype(DEQUANTIZE, "q", q, (torch.uint8,))
    checks.check_device(DEQUANTIZE, "absmax", absmax, q.device, "q")
    checks.check_dtype(DEQUANTIZE, "absmax", absmax, (torch.float32,))
    checks.check_blocksize(DEQUANTIZE, blocksize)
    checks.check_numel(DEQUANTIZE, "absmax", absmax, (q.numel() + blocksize - 1) // blocksize)
    checks.check_code(DEQUANTIZE, "code", code, q.device, "q")
    torch._check_type(
        dtype in checks.PARAM_DTYPES,
        lambda: f"{DEQUANTIZE}: dtype is {dtype}; expected {checks.dtype_list(checks.PARAM_DTYPES)}",
    )
    return q.new_empty(q.shape, dtype=dtype)


# ---------------------------------------------------------------- references
def quantize_reference(x: torch.Tensor, code: torch.Tensor, blocksize: int, keep_positive: bool = False):
    """Nearest code (ties to the lower index) of each value divided by its block's absmax. With
    ``keep_positive`` (the 8-bit Adam step's second moment), a positive value gets at least the
    code's smallest positive value (csrc/adam8_math.h, keep_positive)."""
    flat = x.reshape(-1).float()
    n = flat.numel()
    blocks = -(-n // blocksize)
    padded = flat.new_zeros(blocks * blocksize)
    padded[:n] = flat
    padded = padded.view(blocks, blocksize)
    absmax = padded.abs().amax(dim=1) if blocks else flat.new_zeros(0)  # (NaN where a NaN is)
    # (x * pre) * inv, pre = 2^64 below 2^-64 (a subnormal absmax's inverse would overflow); an
    # inverse of 0 (an all-zero block, one holding a NaN or inf) gives every value the code nearest
    # 0, and keep_positive then reads the sign of the value itself (csrc/adam8_math.h: inv_absmax)
    pre = torch.where(absmax < 2.0**-64, 2.0**64, 1.0)[:, None]
    scaled = absmax[:, None] * pre
    inv = torch.where(scaled > 0, 1.0 / scaled, 0.0)  # (NaN: 0; inf: 1 / inf = 0)
    bounds = (code[:-1] + code[1:]) / 2
    normalized = torch.where(inv == 0, 0.0, padded * pre * inv)
    q = torch.bucketize(normalized, bounds)
    if keep_positive:
        first_positive = min(int((code <= 0).sum()), code.numel() - 1)
        q = torch.where(torch.where(inv == 0, padded, normalized) > 0, q.clamp(min=first_positive), q)
    q = q.to(torch.uint8)
    return q.reshape(-1)[:n].reshape(x.shape), absmax


def dequantize_reference(q, absmax, code, blocksize, dtype):
    scale = absmax.repeat_interleave(blocksize)[: q.numel()]
    return (code[q.reshape(-1).long()] * scale).reshape(q.shape).to(dtype)


# ---------------------------------------------------------------- samples
SIZES = (0, 1, 255, 256, 257, 4097)


def quantize_samples(device):
    for i, n in enumerate(SIZES):
        dtype = checks.PARAM_DTYPES[i % 3]
        for signed in (True, False):
            x = randn(n, dtype=dtype, device=device, positive=not signed)
            yield SampleInput((x, make_code(signed, device), 256), {})
    yield SampleInput((randn(3, 70, device=device), make_code(True, device), 64), {})
    yield SampleInput((randn(5000, device=device), make_code(True, device), 4096), {})
    yield SampleInput((randn(40, 30, device=device).t(), make_code(True, device), 128), {})  # not contiguous
    # Codes the bucket table cannot represent take the kernels' binary search instead.
    linear = torch.linspace(-1, 1, 256, device=device)
    yield SampleInput((randn(1000, device=device), linear, 256), {})
    yield SampleInput((randn(1000, device=device, positive=True), (linear + 1) / 2, 64), {})


def quantize_sweep(device, dtype, numel):
    for signed in (True, False):
        for blocksize in (64, 256, 4096):
            x = randn(numel, dtype=dtype, device=device, positive=not signed)
            yield SampleInput((x, make_code(signed, device), blocksize), {})


def dequantize_from(sample: SampleInput, dtype):
    x, code, blocksize = sample.args
    q, absmax = quantize_reference(x, code, blocksize)
    return SampleInput((q, absmax * 1.5, code, blocksize, dtype), {})


def dequantize_samples(device):
    for i, s in enumerate(quantize_samples(device)):
        yield dequantize_from(s, checks.PARAM_DTYPES[i % 3])


def dequantize_sweep(device, dtype, numel):
    for s in quantize_sweep(device, torch.float32, numel):
        yield dequantize_from(s, dtype)


def quantize_errors(device):
    code = make_code(True, device)
    x = randn(300, device=device)
    yield ErrorInput(SampleInput((x.double(), code, 256), {}), TypeError, r"x has dtype torch.float64; expected")
    yield ErrorInput(SampleInput((x, code.double(), 256), {}), TypeError, r"code has dtype torch.float64")
    yield ErrorInput(SampleInput((x, code[:255], 256), {}), ValueError, r"code has 255 elements; expected 256")
    for bad in (32, 100, 8192):
        yield ErrorInput(SampleInput((x, code, bad), {}), ValueError, rf"blocksize must be a power of two .*got {bad}")
    if torch.device(device).type != "cpu":
        yield ErrorInput(SampleInput((x, code.cpu(), 256), {}), ValueError, r"code is on cpu but x is on")


def dequantize_errors(device):
    code = make_code(True, device)
    q, absmax = quantize_reference(randn(300, device=device), code, 256)
    f32 = torch.float32
    yield ErrorInput(SampleInput((q.float(), absmax, code, 256, f32), {}), TypeError, r"q has dtype torch.float32")
    yield ErrorInput(SampleInput((q, absmax.double(), code, 256, f32), {}), TypeError, r"absmax has dtype torch.float64")
    yield ErrorInput(SampleInput((q, absmax[:1], code, 256, f32), {}), ValueError, r"absmax has 1 elements; expected 2")
    yield ErrorInput(SampleInput((q, absmax, code, 128, f32), {}), ValueError, r"absmax has 2 elements; expected 3")
    yield ErrorInput(SampleInput((q, absmax, code, 256, torch.int32), {}), TypeError, r"dtype is torch.int32; expected")
    if torch.device(device).type != "cpu":
        yield ErrorInput(SampleInput((q, absmax.cpu(), code, 256, f32), {}), ValueError, r"absmax is on cpu but q is on")


def compare_exact(sample, kernel, reference):
    assert_equal(kernel[1], reference[1])


QUANTIZE_BLOCKWISE = OpInfo(
    name="quantize_blockwise",
    schema="(Tensor x, Tensor code, int blocksize) -> (Tensor, Tensor)",
    doc="Quantizes x to uint8 codes (nearest entry of `code`), one fp32 absmax per block.",
    fake=quantize_fake,
    reference=quantize_reference,
    sample_inputs=quantize_samples,
    sweep_inputs=quantize_sweep,
    error_inputs=quantize_errors,
    compare=compare_exact,
)

DEQUANTIZE_BLOCKWISE = OpInfo(
    name="dequantize_blockwise",
    schema="(Tensor q, Tensor absmax, Tensor code, int blocksize, ScalarType dtype) -> Tensor",
    doc="Inverse of quantize_blockwise: code[q] * absmax of the block, cast to dtype.",
    fake=dequantize_fake,
    reference=dequantize_reference,
    sample_inputs=dequantize_samples,
    sweep_inputs=dequantize_sweep,
    error_inputs=dequantize_errors,
    compare=compare_exact,
)
