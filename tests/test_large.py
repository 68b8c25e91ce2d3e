"""64-bit indexing: the CPU kernels on tensors of more than 2**31 elements, and the size arithmetic of
the argument checks (C++ and the fakes) on tensors of up to 2**33 elements.

The large tests need several GiB (each says how much) and skip, saying so, when /proc/meminfo's
MemAvailable is below that. Their tensors hold a pattern that differs wherever the index differs by
2**31 or 2**32 (a prime period and a scale per 2**24-element chunk), so an index that wraps around
or is truncated reads the wrong values. Every failure is reported by its message alone, so no kept
traceback holds a big tensor alive into the next test.

The Adam ops are not run at this size: one bf16 parameter of 2**31 elements with its gradient and
two 8-bit states is 12 GiB (24 GiB with fp32 moments). Their checks' size arithmetic is covered
here without memory; their kernels share the 64-bit task splitting (csrc/cpu/tasks.h) that
percentile_clipping runs over a tensor of more than 2**31 elements below.
"""

from __future__ import annotations

import gc
import random

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from ops_registry.clipping import HISTORY, clipping_compare, clipping_reference
from ops_registry.quantize import dequantize_reference, quantize_reference
from ops_registry.testing import assert_equal, make_code, randn

GiB = 2**30
BOUNDARY = 2**31  # the first index a signed 32-bit integer cannot hold
CHUNK = 2**24  # elements filled and checked at a time
PERIOD = 1_000_003  # prime: the pattern does not repeat at any power-of-two distance
MARGIN = 1.5 * GiB  # for the chunked references, the interpreter and torch


# ---------------------------------------------------------------- helpers
def mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def require_memory(tensor_bytes: int) -> None:
    need, have = tensor_bytes + MARGIN, mem_available()
    if have < need:
        pytest.skip(f"needs {need / GiB:.1f} GiB of available memory, MemAvailable is {have / GiB:.1f} GiB")


def run_freeing_memory(check, *args) -> None:
    """Runs check(*args). A failure is re-raised as its message alone, after the exception (whose
    traceback holds the check's frames and their big tensors) is gone and memory is collected."""
    failure = None
    try:
        check(*args)
    except Exception as e:  # noqa: BLE001 - any failure, reported as a test failure
        failure = f"{type(e).__name__}: {e}"
    finally:
        gc.collect()
    if failure is not None:
        pytest.fail(failure, pytrace=False)


def fill_pattern(x: torch.Tensor) -> None:
    """Fills a 1-D tensor chunk by chunk: random values of period PERIOD (for a float tensor: over
    six decades, times 1 + k / 64 in chunk k), so elements 2**31 or 2**32 apart differ."""
    n = x.numel()
    if x.dtype == torch.uint8:
        base = torch.randint(0, 256, (CHUNK + PERIOD,), dtype=torch.uint8)
    else:
        base = randn(CHUNK + PERIOD)
    for k, start in enumerate(range(0, n, CHUNK)):
        stop = min(n, start + CHUNK)
        offset = start % PERIOD
        if x.dtype == torch.uint8:
            x[start:stop].copy_(base[offset : offset + stop - start])
        else:
            torch.mul(base[offset : offset + stop - start], 1.0 + k / 64, out=x[start:stop])


def windows(n: int, blocksize: int, boundary: int, rng: random.Random) -> list[tuple[int, int]]:
    """Block-aligned ranges [lo, hi) to check against the reference: the start, the two blocks on
    each side of `boundary`, the end (with the partial last block), the first and last block of
    every CHUNK, and a few random blocks."""
    blocks = -(-n // blocksize)
    out = [(0, 3 * blocksize), (boundary - 2 * blocksize, boundary + 2 * blocksize),
           ((blocks - 3) * blocksize, n)]
    for start in range(0, n, CHUNK):
        first = start // blocksize
        last = (min(n, start + CHUNK) - 1) // blocksize
        out += [(first * blocksize, (first + 1) * blocksize), (last * blocksize, (last + 1) * blocksize)]
    out += [(b * blocksize, (b + 1) * blocksize) for b in rng.sample(range(blocks), 16)]
    return [(lo, min(hi, n)) for lo, hi in out]


def _window_error(what: str, lo: int, hi: int, error: AssertionError) -> AssertionError:
    return AssertionError(f"{what} of elements [{lo}, {hi}) differ from the reference: {error}")


# ---------------------------------------------------------------- the large checks
def check_quantize(n: int, dtype: torch.dtype, blocksizes, boundary: int = BOUNDARY,
                   quantize=torch.ops.adam8.quantize_blockwise, dequantize=torch.ops.adam8.dequantize_blockwise):
    """quantize_blockwise of an n-element tensor for each blocksize: every absmax (block maxima
    computed chunk by chunk), and codes on the windows; then dequantize_blockwise of the last
    result, on the windows."""
    rng = random.Random(torch.initial_seed())
    code = make_code(True)
    x = torch.empty(n, dtype=dtype)
    fill_pattern(x)
    for blocksize in blocksizes:
        q = absmax = None  # the previous blocksize's codes are freed before the next are made
        q, absmax = quantize(x, code, blocksize)
        assert q.shape == x.shape and q.dtype == torch.uint8, f"codes: shape {list(q.shape)}, dtype {q.dtype}"
        full = n // blocksize
        assert absmax.shape == (-(-n // blocksize),), f"absmax has shape {list(absmax.shape)} for n={n}"
        per_chunk = CHUNK // blocksize
        for b0 in range(0, full, per_chunk):
            b1 = min(full, b0 + per_chunk)
            expected = x[b0 * blocksize : b1 * blocksize].view(-1, blocksize).abs().amax(dim=1).float()
            bad = (absmax[b0:b1] != expected).nonzero()
            if bad.numel():
                b = b0 + int(bad[0, 0])
                raise AssertionError(f"blocksize {blocksize}: absmax[{b}] (elements from {b * blocksize}) is "
                                     f"{absmax[b].item()!r}, the block's max |x| is {expected[b - b0].item()!r}; "
                                     f"{bad.numel()} of the blocks [{b0}, {b1}) differ")
        if n % blocksize:
            tail = x[full * blocksize :].abs().amax().float()
            assert absmax[full] == tail, f"absmax of the partial last block: {absmax[full].item()} vs {tail.item()}"
        for lo, hi in windows(n, blocksize, boundary, rng):
            q_ref, absmax_ref = quantize_reference(x[lo:hi], code, blocksize)
            try:
                assert_equal(q[lo:hi], q_ref)
                assert_equal(absmax[lo // blocksize : -(-hi // blocksize)], absmax_ref)
            except AssertionError as e:
                raise _window_error(f"blocksize {blocksize}: codes or absmax", lo, hi, e) from None
    del x
    gc.collect()
    blocksize = blocksizes[-1]
    out = dequantize(q, absmax, code, blocksize, torch.bfloat16)
    assert out.shape == q.shape and out.dtype == torch.bfloat16
    for lo, hi in windows(n, blocksize, boundary, rng):
        expected = dequantize_reference(q[lo:hi], absmax[lo // blocksize : -(-hi // blocksize)], code, blocksize,
                                        torch.bfloat16)
        try:
            assert_equal(out[lo:hi], expected)
        except AssertionError as e:
            raise _window_error(f"blocksize {blocksize}: dequantized values", lo, hi, e) from None


def check_dequantize(n: int, blocksize: int, dtype: torch.dtype, boundary: int = BOUNDARY,
                     dequantize=torch.ops.adam8.dequantize_blockwise):
    """dequantize_blockwise of n patterned codes with a random absmax per block, on the windows."""
    rng = random.Random(torch.initial_seed())
    code = make_code(False)
    q = torch.empty(n, dtype=torch.uint8)
    fill_pattern(q)
    absmax = torch.rand(-(-n // blocksize)) + 0.5  # a different scale in every block
    out = dequantize(q, absmax, code, blocksize, dtype)
    assert out.shape == q.shape and out.dtype == dtype
    for lo, hi in windows(n, blocksize, boundary, rng):
        expected = dequantize_reference(q[lo:hi], absmax[lo // blocksize : -(-hi // blocksize)], code, blocksize, dtype)
        try:
            assert_equal(out[lo:hi], expected)
        except AssertionError as e:
            raise _window_error(f"blocksize {blocksize}: dequantized values", lo, hi, e) from None


def spike_positions(n: int, boundary: int) -> list[int]:
    return [0, boundary - 1, boundary, boundary + 1, n - 1]


def check_clipping(n: int, boundary: int = BOUNDARY, clip=torch.ops.adam8.percentile_clipping):
    """percentile_clipping of a zero bf16 gradient of n elements with five spikes (powers of two,
    so the squared norm is exact) around `boundary` and at the ends, next to a small gradient: each
    spike counted once. The reference runs on a gradient of the spikes alone (the same norm)."""
    big = torch.zeros(n, dtype=torch.bfloat16)
    spikes = torch.tensor([2.0 ** (2 * i) for i in range(5)], dtype=torch.bfloat16)  # squares 1 .. 2**16
    for position, value in zip(spike_positions(n, boundary), spikes):
        big[position] = value
    small = randn(300, dtype=torch.bfloat16)
    histories = [randn(HISTORY, positive=True) * 1e3 for _ in range(2)]
    steps = [torch.tensor(41.0), torch.tensor(7.0)]
    scales = torch.full((2,), -1.0)
    args_k = ([big, small], [h.clone() for h in histories], steps, 5, scales)
    clip(*args_k)
    norm_sq = float(sum(float(v) ** 2 for v in spikes))  # 69905: each spike once, nothing else
    assert args_k[1][0][42].item() == norm_sq, (
        f"squared norm of the {n}-element gradient recorded as {args_k[1][0][42].item()!r}, expected {norm_sq!r} "
        f"(the spikes at {spike_positions(n, boundary)}, squares {[float(v) ** 2 for v in spikes]}, each once)"
    )
    args_r = ([spikes, small.clone()], [h.clone() for h in histories], [s.clone() for s in steps], 5,
              torch.full((2,), -1.0))
    clipping_reference(*args_r)
    clipping_compare(None, (args_k, None), (args_r, None))


# ---------------------------------------------------------------- tests over 2**31 elements
@pytest.mark.slow
def test_quantize_blockwise_indexes_past_2_31():
    n = BOUNDARY + 4097  # past the boundary by a whole 4096-block and one element
    require_memory(3 * n)  # fp16 input, uint8 codes
    run_freeing_memory(check_quantize, n, torch.float16, (64, 4096))


@pytest.mark.slow
def test_dequantize_blockwise_indexes_past_2_31():
    n = BOUNDARY + 257
    require_memory(3 * n)  # uint8 codes, bf16 output
    run_freeing_memory(check_dequantize, n, 128, torch.bfloat16)


@pytest.mark.slow
def test_percentile_clipping_indexes_past_2_31():
    n = BOUNDARY + 300
    require_memory(2 * n)  # one bf16 gradient
    run_freeing_memory(check_clipping, n)


# ---------------------------------------------------------------- size arithmetic without memory
HUGE = 2**33 + 1  # numel of the fake tensors: past 2**32, and not a multiple of any block


def test_fakes_size_huge_tensors_with_python_ints():
    """The fakes' output and absmax sizes for a tensor of 2**33 + 1 elements (never allocated)."""
    with FakeTensorMode():
        code = torch.empty(256)
        for shape in ((HUGE,), (2**17 + 1, 2**16)):
            x = torch.empty(shape, dtype=torch.bfloat16)
            for blocksize in (64, 4096):
                blocks = -(-x.numel() // blocksize)
                q, absmax = torch.ops.adam8.quantize_blockwise(x, code, blocksize)
                assert q.shape == shape and q.dtype == torch.uint8
                assert absmax.shape == (blocks,) and absmax.dtype == torch.float32
                out = torch.ops.adam8.dequantize_blockwise(q, absmax, code, blocksize, torch.float16)
                assert out.shape == shape and out.dtype == torch.float16
                with pytest.raises(ValueError, match=rf"absmax has {blocks - 1} elements; expected {blocks}$"):
                    torch.ops.adam8.dequantize_blockwise(q, absmax[1:], code, blocksize, torch.float16)


def test_meta_kernels_size_huge_tensors():
    x = torch.empty(HUGE, dtype=torch.float16, device="meta")
    q, absmax = torch.ops.adam8.quantize_blockwise(x, torch.empty(256, device="meta"), 64)
    assert q.shape == (HUGE,) and absmax.shape == (2**27 + 1,) and absmax.device.type == "meta"


def _adam8bit_args(params, block_wise, absmax_numel=None):
    """adam8bit_step arguments for `params` with amsgrad; absmax of the right size unless given."""
    n = len(params)
    blocks = [(-(-p.numel() // 256) if block_wise else 1) if absmax_numel is None else absmax_numel for p in params]
    states = [[torch.empty_like(p, dtype=torch.uint8) for p in params] for _ in range(3)]
    absmax = [[torch.zeros(b) for b in blocks] for _ in range(3)]
    return ((params, [torch.empty_like(p) for p in params], *states, [torch.zeros(()) for _ in params], *absmax,
             torch.empty(256), torch.empty(256), torch.tensor(1e-3), torch.tensor([0.9, 0.999], dtype=torch.float64), torch.ones(n),
             torch.zeros(())),
            dict(eps=1e-8, weight_decay=0.0, max_unorm=0.0, skip_zeros=False,
                 block_wise=block_wise))


def test_adam_fakes_accept_huge_parameters():
    with FakeTensorMode():
        params = [torch.empty(HUGE, dtype=torch.bfloat16), torch.empty(3, 5)]
        for block_wise in (True, False):
            args, kwargs = _adam8bit_args(params, block_wise)
            torch.ops.adam8.adam8bit_step(*args, **kwargs)
        args, kwargs = _adam8bit_args(params, True, absmax_numel=2**25)
        with pytest.raises(ValueError, match=r"absmax1\[0\] has 33554432 elements; expected 33554433$"):
            torch.ops.adam8.adam8bit_step(*args, **kwargs)
        moments = [[torch.empty_like(p, dtype=torch.float32) for p in params] for _ in range(3)]
        torch.ops.adam8.adam_step(params, [torch.empty_like(p) for p in params], *moments,
                                  [torch.zeros(()) for _ in params], torch.tensor(1e-3), torch.tensor([0.9, 0.999], dtype=torch.float64), None, None,
                                  eps=1e-8, weight_decay=0.0, max_unorm=1.0, skip_zeros=True)
        grads = [torch.empty(HUGE, dtype=torch.float16), torch.empty(7)]
        torch.ops.adam8.percentile_clipping(grads, [torch.empty(HISTORY) for _ in grads],
                                            [torch.zeros(()) for _ in grads], 5, torch.empty(2))


def vm_rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def test_kernel_checks_size_huge_tensors_without_touching_them():
    """The C++ checks compute the expected absmax sizes of tensors over 2**31 (and 2**33)
    elements in 64 bits, and reject a wrong one before reading any element: the tensors come from
    torch.empty, whose pages the system only provides once they are touched."""
    rss = vm_rss()
    try:
        q = torch.empty(HUGE, dtype=torch.uint8)  # 8 GiB of address space
        p = torch.empty(BOUNDARY + 300, dtype=torch.bfloat16)
        args, kwargs = _adam8bit_args([p], True, absmax_numel=1)
    except RuntimeError as e:  # an address-space limit or strict overcommit
        pytest.skip(f"cannot reserve the address space of the untouched tensors: {e}")
    code = make_code(True)
    with pytest.raises(ValueError, match=r"adam8.dequantize_blockwise: absmax has 5 elements; expected 2097153$"):
        torch.ops.adam8.dequantize_blockwise(q, torch.zeros(5), code, 4096, torch.float16)
    with pytest.raises(ValueError, match=r"adam8.adam8bit_step: absmax1\[0\] has 1 elements; expected 8388610$"):
        torch.ops.adam8.adam8bit_step(*args, **kwargs)
    grown = vm_rss() - rss
    del q, p, args
    gc.collect()
    assert grown < GiB, f"the rejected calls made {grown / GiB:.1f} GiB resident: they read the tensors"
