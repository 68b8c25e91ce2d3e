"""Adam, Adam8bit and Adam32bit: bitsandbytes' classes and signatures over the adam8 ops."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch

from . import functional as F
from .checkpoint import validated_state
from ops_registry.checks import is_dense

from .qmap import dynamic_maps

PARAM_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BLOCK = 256  # values per absmax of the 8-bit states (csrc/adam8_math.h: kStateBlock)

# Options of the `args` object of bitsandbytes, with the constructor argument each replaces.
ARGS_KEYS = ("optim_bits", "min_8bit_size", "percentile_clipping", "block_wise", "max_unorm", "skip_zeros")


def check_hyperparameters(lr, betas, eps, weight_decay) -> None:
    """torch.optim's checks and wording."""
    if isinstance(lr, torch.Tensor) and lr.numel() != 1:
        raise ValueError("Tensor lr must be 1-element")
    if not 0.0 <= lr:
        raise ValueError(f"Invalid learning rate: {lr}")
    if not 0.0 <= eps:
        raise ValueError(f"Invalid epsilon value: {eps}")
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise ValueError(f"Invalid betas: {betas!r}; expected a pair (beta1, beta2)")
    for i, beta in enumerate(betas):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"Invalid beta parameter at index {i}: {beta}")
    if not 0.0 <= weight_decay:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")


class _Batch:
    """The argument lists of one op call: params, grads, state1, state2, steps (, absmax1, absmax2)."""

    __slots__ = ("lists", "eight_bit")

    def __init__(self, eight_bit: bool):
        self.eight_bit = eight_bit
        self.lists = tuple([] for _ in range(7 if eight_bit else 5))

    def add(self, p: torch.Tensor, g: torch.Tensor, state: dict) -> None:
        lists = self.lists
        lists[0].append(p)
        lists[1].append(g)
        lists[2].append(state["state1"])
        lists[3].append(state["state2"])
        lists[4].append(state["step"])
        if self.eight_bit:
            lists[5].append(state["absmax1"])
            lists[6].append(state["absmax2"])


class Adam(torch.optim.Optimizer):
    """Adam with decoupled weight decay and 32-bit or blockwise 8-bit states (bitsandbytes' Adam).

    Arguments are bitsandbytes' (``bitsandbytes.optim.Adam``), defaults included:

    - ``lr``, ``betas``, ``eps``: as torch.optim.Adam. ``lr`` may be a float or a scalar tensor;
      either way the kernels read it from a tensor, so changing it never recompiles a compiled step.
    - ``weight_decay``: *decoupled*, as bitsandbytes applies it: ``p <- p * (1 - lr * wd)`` before
      the Adam update, exactly torch.optim.AdamW (not the L2 penalty of torch.optim.Adam).
    - ``optim_bits``: 32 (fp32 moments) or 8 (uint8 moments: the signed dynamic map for the first,
      the unsigned one for the second, one fp32 absmax per 256 values; the update uses the new
      unquantized moments, only the stored ones are quantized).
    - ``min_8bit_size``: parameters with fewer elements keep fp32 moments.
    - ``args``: an object whose attributes optim_bits, min_8bit_size, percentile_clipping,
      block_wise, max_unorm, skip_zeros replace the constructor's values, as in bitsandbytes.
    - ``amsgrad=True``, ``percentile_clipping < 100``, ``block_wise=False``, ``is_paged=True``,
      ``max_unorm > 0`` and ``skip_zeros=True`` are not implemented yet and raise
      NotImplementedError (never silently ignored).

    Parameters may be float32, float16 or bfloat16 (gradients in the parameter's dtype); the math
    is float32. Per parameter the state holds ``step`` (a float32 scalar tensor), ``state1`` and
    ``state2`` (the moments) and, for 8-bit state, ``absmax1`` and ``absmax2``.
    """

    _fixed_bits: int | None = None  # Adam8bit / Adam32bit pin optim_bits

    def __init__(
        self,
        params,
        lr=1e-3,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=0,
        amsgrad=False,
        optim_bits=32,
        args=None,
        min_8bit_size=4096,
        percentile_clipping=100,
        block_wise=True,
        is_paged=False,
    ):
        check_hyperparameters(lr, betas, eps, weight_decay)
        given = dict(
            optim_bits=optim_bits,
            min_8bit_size=min_8bit_size,
            percentile_clipping=percentile_clipping,
            block_wise=block_wise,
            max_unorm=0.0,
            skip_zeros=False,
        )
        self.args = SimpleNamespace(**{k: getattr(args, k, given[k]) for k in ARGS_KEYS})
        name = type(self).__name__
        if self._fixed_bits is not None:
            if optim_bits not in (8, 32):
                raise ValueError(f"{name}: optim_bits must be 8 or 32 (it is ignored: {name} always keeps "
                                 f"{self._fixed_bits}-bit state), got {optim_bits!r}")
            self.args.optim_bits = self._fixed_bits
        if self.args.optim_bits not in (8, 32):
            raise ValueError(f"{name}: optim_bits must be 8 or 32, got {self.args.optim_bits!r}")
        if not isinstance(self.args.min_8bit_size, int) or self.args.min_8bit_size < 0:
            raise ValueError(f"{name}: min_8bit_size must be an int >= 0, got {self.args.min_8bit_size!r}")
        unsupported = {
            "amsgrad=True": amsgrad,
            f"percentile_clipping={self.args.percentile_clipping}": self.args.percentile_clipping < 100,
            "block_wise=False": not self.args.block_wise,
            "is_paged=True": is_paged,
            f"max_unorm={self.args.max_unorm}": self.args.max_unorm > 0,
            "skip_zeros=True": self.args.skip_zeros,
        }
        for option, requested in unsupported.items():
            if requested:
                raise NotImplementedError(
                    f"{name}: {option} is not implemented yet in torchadam8; leave it at its default "
                    "(it would change the update, so it is refused rather than ignored)"
                )
        self._qmaps: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    # ------------------------------------------------------------ parameters
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        name = type(self).__name__
        index = len(self.param_groups)
        params = param_group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        for i, p in enumerate(params):
            where = f"{name}: parameter {i} of group {index} (shape {list(p.shape)})"
            if p.is_complex():
                raise ValueError(f"{where} is complex; view it as real with torch.view_as_real")
            if p.dtype not in PARAM_DTYPES:
                raise ValueError(f"{where} has dtype {p.dtype}; supported: float32, float16, bfloat16")
            if p.is_sparse or not is_dense(p):
                raise ValueError(f"{where} is not dense (strides {list(p.stride())}); "
                                 "the kernels update it in place and need contiguous memory")
        group = {k: v for k, v in param_group.items() if k != "params"}
        merged = {**self.defaults, **group}
        check_hyperparameters(merged["lr"], merged["betas"], merged["eps"], merged["weight_decay"])
        super().add_param_group({**param_group, "params": params})
        if self.args.optim_bits == 8:  # made here, not in a (compiled) step, which cannot trace them
            for p in params:
                self._qmap(p.device)

    def _uses_8bit(self, p: torch.Tensor) -> bool:
        return self.args.optim_bits == 8 and p.numel() >= self.args.min_8bit_size

    def _qmap(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._qmaps:
            self._qmaps[device] = dynamic_maps(device)
        return self._qmaps[device]

    def _state_spec(self, p: torch.Tensor) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        """Every tensor the state of `p` holds: key -> (dtype, shape). Moments have p's layout."""
        spec = {"step": (torch.float32, ())}
        shape = tuple(p.shape)
        if self._uses_8bit(p):
            scales = (p.numel() + BLOCK - 1) // BLOCK if self.args.block_wise else 1
            keys = (1, 2, 3) if self._amsgrad(p) else (1, 2)
            for k in keys:
                spec[f"state{k}"] = (torch.uint8, shape)
                spec[f"absmax{k}"] = (torch.float32, (scales,))
        else:
            keys = (1, 2, 3) if self._amsgrad(p) else (1, 2)
            for k in keys:
                spec[f"state{k}"] = (torch.float32, shape)
        if self.args.percentile_clipping < 100:
            spec["gnorm_vec"] = (torch.float32, (100,))
        return spec

    def _amsgrad(self, p: torch.Tensor) -> bool:
        return False

    def _init_state(self, p: torch.Tensor) -> None:
        state = self.state[p]
        for key, (dtype, shape) in self._state_spec(p).items():
            if shape == tuple(p.shape):
                state[key] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
            else:
                state[key] = torch.zeros(shape, dtype=dtype, device=p.device)

    def _checked_grad(self, p: torch.Tensor, gindex: int, pindex: int) -> torch.Tensor:
        """p.grad, or a clear error naming the parameter; laid out like p."""
        g = p.grad
        if g.is_sparse or g.dtype != p.dtype or g.shape != p.shape or g.device != p.device:
            where = f"{type(self).__name__}: parameter {pindex} of group {gindex} (shape {list(p.shape)})"
            if g.is_sparse:
                raise RuntimeError(f"{where} has a sparse gradient; Adam does not support sparse gradients, "
                                   "use torch.optim.SparseAdam instead")
            if g.dtype != p.dtype:
                raise TypeError(f"{where} has dtype {p.dtype} but its gradient has dtype {g.dtype}; they must match")
            if g.shape != p.shape:
                raise ValueError(f"{where}: its gradient has shape {list(g.shape)}; it must match the parameter's")
            raise ValueError(f"{where} is on {p.device} but its gradient is on {g.device}")
        if g.stride() != p.stride() and p.numel() > 1:
            g = torch.empty_like(p).copy_(g)  # the kernels walk p and g in the same memory order
        return g

    # ------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure=None):
        """Performs one optimization step; parameters without a gradient are skipped."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # Check every gradient first, so a bad one leaves parameters and state untouched (the ops
        # check betas, eps and weight_decay before they change anything).
        work = []
        for gi, group in enumerate(self.param_groups):
            params, grads = [], []
            for pi, p in enumerate(group["params"]):
                if p.grad is not None:
                    params.append(p)
                    grads.append(self._checked_grad(p, gi, pi))
            work.append((group, params, grads))
        for group, params, grads in work:
            # One op call per (device, 8-bit or not): a handful per group, whatever its size.
            batches: dict[tuple[torch.device, bool], _Batch] = {}
            for p, g in zip(params, grads):
                state = self.state[p]
                if not state:
                    self._init_state(p)
                eight_bit = state["state1"].dtype == torch.uint8
                batch = batches.get((p.device, eight_bit))
                if batch is None:
                    batch = batches[(p.device, eight_bit)] = _Batch(eight_bit)
                batch.add(p, g, state)
            for (device, eight_bit), batch in batches.items():
                hyper = dict(lr=group["lr"], beta1=group["betas"][0], beta2=group["betas"][1], eps=group["eps"],
                             weight_decay=group["weight_decay"])
                if eight_bit:
                    F.adam8bit(*batch.lists, *self._qmap(device), **hyper)
                else:
                    F.adam(*batch.lists, **hyper)
        return loss

    # ------------------------------------------------------------ checkpoints
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loads a state_dict of this class; a mismatch (group or parameter count, state shapes,
        dtypes, 8-bit vs 32-bit) raises ValueError and leaves the optimizer unchanged."""
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        state, groups = validated_state(self, state_dict)
        self.state.clear()
        self.state.update(state)
        self.param_groups = groups
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)


class Adam8bit(Adam):
    __doc__ = "Adam with 8-bit blockwise states; ``optim_bits`` is ignored (kept for bitsandbytes' signature).\n\n" + (
        Adam.__doc__ or ""
    )
    _fixed_bits = 8


class Adam32bit(Adam):
    __doc__ = "Adam with 32-bit states; ``optim_bits`` is ignored (kept for bitsandbytes' signature).\n\n" + (
        Adam.__doc__ or ""
    )
    _fixed_bits = 32
