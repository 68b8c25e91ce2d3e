"""Registry entries of the paged states (PagedAdam*): allocating managed (unified) memory, and
prefetching it to the GPU or paging it out to the host on the current stream. Prefetch and page-out
change no value; they are declared as mutating so that compilation keeps them in order. On the CPU
a paged tensor is ordinary memory and the two ops only check their arguments."""

from __future__ import annotations

import torch

from . import checks
from .opinfo import ErrorInput, OpInfo, SampleInput
from .testing import randn

ZEROS = "adam8.zeros_managed"
PAGED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.uint8)
SHAPES = ((1,), (255,), (257,), (3, 5), (0,), (4097,))


def managed(values: torch.Tensor) -> torch.Tensor:
    """A copy of `values` in memory from adam8.zeros_managed (managed memory on CUDA)."""
    return torch.ops.adam8.zeros_managed(list(values.shape), values.dtype, values.device).copy_(values)


# ---------------------------------------------------------------- zeros_managed
def zeros_fake(size, dtype, device):
    for i, s in enumerate(size):
        torch._check_value(s >= 0, lambda: f"{ZEROS}: size[{i}] is {s}; sizes must be >= 0")
    torch._check_type(dtype in PAGED_DTYPES,
                      lambda: f"{ZEROS}: dtype is {dtype}; expected {checks.dtype_list(PAGED_DTYPES)}")
    torch._check_value(torch.device(device).type in ("cpu", "cuda"),
                       lambda: f"{ZEROS}: device is {device}; expected a cpu or cuda device")
    return torch.empty(size, dtype=dtype, device=device)


def zeros_reference(size, dtype, device):
    return torch.zeros(size, dtype=dtype, device=device)


def zeros_samples(device):
    for shape, dtype in zip(SHAPES, PAGED_DTYPES * 2):
        yield SampleInput((list(shape), dtype, torch.device(device)), {})
    yield SampleInput(([], torch.float32, torch.device(device)), {})


def zeros_sweep(device, dtype, numel):
    yield SampleInput(([numel], dtype, torch.device(device)), {})


def zeros_errors(device):
    device = torch.device(device)
    yield ErrorInput(SampleInput(([3, -1], torch.float32, device), {}), ValueError,
                     r"size\[1\] is -1; sizes must be >= 0")
    for dtype in (torch.float64, torch.int64, torch.bool, torch.complex64):
        yield ErrorInput(SampleInput(([4], dtype, device), {}), TypeError,
                         rf"{ZEROS}: dtype is {dtype}; expected torch.float32, ")


def zeros_compare(sample, kernel, reference):
    """Zeros of the asked kind (and on CUDA, in managed memory)."""
    out, ref = kernel[1], reference[1]
    assert (out.shape, out.dtype, out.device, out.stride()) == (ref.shape, ref.dtype, ref.device, ref.stride())
    assert torch.equal(out, ref)  # (that CUDA memory is managed: tests/test_paged.py)


# ---------------------------------------------------------------- prefetch / page_out
def _paged_fake(op):
    def fake(tensors):
        for i, t in enumerate(tensors):
            checks.check_device(op, f"tensors[{i}]", t, tensors[0].device, "tensors[0]")
            checks.check_dense(op, f"tensors[{i}]", t)

    return fake


def paged_reference(tensors):
    """Moving memory changes no value."""


def paged_samples(device):
    yield SampleInput(([managed(randn(*s, device=device).to(d)) for s, d in zip(SHAPES, PAGED_DTYPES * 2)],), {})
    # A permuted (dense) tensor: its memory is still one range.
    yield SampleInput(([managed(randn(20, 9, device=device)).t()],), {})
    yield SampleInput(([],), {})  # nothing to move (no tensor to pick a kernel by: csrc/composite.cpp)


def paged_sweep(device, dtype, numel):
    yield SampleInput(([managed(randn(numel, device=device).to(dtype)), managed(randn(3, device=device))],), {})


def _paged_errors(op):
    def errors(device):
        strided = managed(randn(600, device=device))[::2]
        yield ErrorInput(SampleInput(([managed(randn(3, device=device)), strided],), {}), ValueError,
                         rf"{op}: tensors\[1\] with shape \[300\] and strides \[2\] is not dense")
        overlapping = managed(randn(1, 5, device=device)).expand(4, 5)
        yield ErrorInput(SampleInput(([overlapping],), {}), ValueError,
                         rf"{op}: tensors\[0\] with shape \[4, 5\] and strides \[0, 1\] is not dense")
        if torch.device(device).type == "cuda":
            yield ErrorInput(SampleInput(([managed(randn(3, device=device)), torch.zeros(3)],), {}), ValueError,
                             rf"{op}: tensors\[1\] is on cpu but tensors\[0\] is on")

    return errors


def paged_compare(sample, kernel, reference):
    for i, (a, b) in enumerate(zip(kernel[0][0], reference[0][0])):
        assert torch.equal(a, b), f"tensors[{i}] changed"


ZEROS_MANAGED = OpInfo(
    name="zeros_managed",
    schema="(int[] size, ScalarType dtype, Device device) -> Tensor",
    doc="A zero tensor in CUDA managed (unified) memory, freed with the tensor; on the CPU ordinary memory.",
    fake=zeros_fake,
    reference=zeros_reference,
    sample_inputs=zeros_samples,
    sweep_inputs=zeros_sweep,
    error_inputs=zeros_errors,
    compare=zeros_compare,
    dtypes=PAGED_DTYPES,
)

def _migration(name: str, destination: str) -> OpInfo:
    """prefetch and page_out: the same op but for where the memory goes."""
    return OpInfo(
        name=name,
        schema="(Tensor(a!)[] tensors) -> ()",
        doc=(f"Migrates managed tensors to {destination} on the current stream (nothing for other memory, on the "
             "CPU, or while the stream is being captured)."),
        fake=_paged_fake(f"adam8.{name}"),
        reference=paged_reference,
        sample_inputs=paged_samples,
        sweep_inputs=paged_sweep,
        error_inputs=_paged_errors(f"adam8.{name}"),
        compare=paged_compare,
        dtypes=PAGED_DTYPES,
    )


PREFETCH = _migration("prefetch", "their GPU")
PAGE_OUT = _migration("page_out", "host memory")
