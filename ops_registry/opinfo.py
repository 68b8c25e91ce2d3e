"""The entry type of the op registry and its sample types (in the spirit of PyTorch's OpInfo)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, NamedTuple

import torch


class SampleInput(NamedTuple):
    """One call of an op: unpacks as ``(args, kwargs)``."""

    args: tuple
    kwargs: dict


class ErrorInput(NamedTuple):
    """A call that must fail with ``error_type`` whose message matches ``error_regex``."""

    sample: SampleInput
    error_type: type[Exception]
    error_regex: str


@dataclass(frozen=True)
class OpInfo:
    # Name of the op under torch.ops.adam8.
    name: str
    # Argument list and returns, as torch.library takes them after the name. Mutated tensors are
    # declared Tensor(a!) / Tensor(a!)[]; in-place ops return ().
    schema: str
    # One line: what the op does (README's table and the tests' ids show it).
    doc: str
    # Fake (meta) implementation: every argument check plus the output metadata.
    fake: Callable[..., Any]
    # Plain PyTorch oracle with the op's calling convention (mutates its arguments like the op).
    reference: Callable[..., Any]
    # sample_inputs(device) -> small random samples (odd sizes, every dtype) for opcheck.
    sample_inputs: Callable[[torch.device | str], Iterator[SampleInput]]
    # sweep_inputs(device, dtype, numel) -> samples for the kernel-vs-reference sweep over sizes.
    sweep_inputs: Callable[[torch.device | str, torch.dtype, int], Iterator[SampleInput]]
    # error_inputs(device) -> calls every check of `fake` and of the kernels must reject.
    error_inputs: Callable[[torch.device | str], Iterator[ErrorInput]]
    # compare(sample, kernel_result, reference_result): asserts the kernel matches the oracle;
    # a result is (args after the call, return value).
    compare: Callable[[SampleInput, tuple, tuple], None]
    # Dtypes of the floating-point tensor the sweep varies.
    dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)
    # Argument names the op mutates (derived from the schema).
    mutated: tuple[str, ...] = field(init=False)

    def __post_init__(self):
        if not self.name.isidentifier():
            raise ValueError(f"OpInfo {self.name!r}: the name must be a Python identifier")
        if "->" not in self.schema or not self.schema.startswith("("):
            raise ValueError(f"OpInfo {self.name}: schema must look like '(args) -> returns', got {self.schema!r}")
        args = self.schema[1 : self.schema.index(") ->")].split(",")
        mutated = tuple(a.split()[-1] for a in args if "!)" in a)
        returns = self.schema.split("->")[1].strip()
        if mutated and returns != "()":
            raise ValueError(f"OpInfo {self.name}: an op that mutates {mutated} must return ()")
        object.__setattr__(self, "mutated", mutated)

    @property
    def qualname(self) -> str:
        return f"adam8::{self.name}"

    @property
    def op(self) -> torch._ops.OpOverload:
        return getattr(torch.ops.adam8, self.name).default
