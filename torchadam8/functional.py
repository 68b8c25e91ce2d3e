"""Functional Adam over lists of tensors: what the optimizer classes call for each batch of
parameters. Each call runs one adam8 op (one kernel launch per pack of tensors on CUDA), so a
compiled step traces to a few ops (the classes call it per 128 parameters there). As with torch's
foreach ops, a tensor appears at most once across a call's lists: the kernels update them all at
once, so a tensor given twice (a parameter, a state, a step count) gets two updates that race, an
undefined result (not checked here; the optimizer classes refuse repeated parameters)."""

from __future__ import annotations

import numbers
from typing import Sequence

import torch

Tensors = Sequence[torch.Tensor]

# Eager steps reuse the tensor of an unchanged float lr / betas (no kernel launches per step).
# Never while compiling (the graph must compute it from the float) or capturing a CUDA graph (the
# graph must own its memory: a cached tensor could be freed while the graph still reads it).
_eager_constants: dict[tuple, torch.Tensor] = {}


def _eager_constant(key: tuple, make) -> torch.Tensor:
    device = key[0]
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0:  # traced, or under a mode
        return make()
    if device.type == "cuda":
        if torch.cuda.is_current_stream_capturing():
            return make()
        # used only on the stream that made it, so dropping it later cannot race a reader
        key += (torch.cuda.current_stream(device).stream_id,)
    value = _eager_constants.get(key)
    if value is None:
        if len(_eager_constants) >= 64:  # a scheduler's values: keep the recent ones only
            _eager_constants.clear()
        value = _eager_constants[key] = make()
    return value


def _to_device(t: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A scalar hyperparameter tensor on the parameters' device. From the host, the copy does not
    wait for the GPU (non_blocking: CUDA stages pageable host memory before the call returns, so
    the source may change afterwards; a blocking copy would synchronize every step)."""
    return t.to(device=device, dtype=dtype, non_blocking=t.device.type == "cpu").reshape(())


def lr_tensor(lr: float | torch.Tensor, device: torch.device) -> torch.Tensor:
    """The learning rate as the float32 scalar tensor the ops read (a tensor, never a constant
    baked into a compiled graph or a captured CUDA graph)."""
    if isinstance(lr, torch.Tensor):
        return _to_device(lr, device, torch.float32)
    # ones * lr, not torch.full / torch.tensor: compiled, a float lr then becomes a graph input after
    # its first change (those specialize on its value and recompile at every change). float(): any
    # real number the checks accept (a Fraction does not multiply a tensor).
    return _eager_constant((torch.device(device), "lr", lr),
                           lambda: torch.ones((), dtype=torch.float32, device=device) * float(lr))


def betas_tensor(beta1: float | torch.Tensor, beta2: float | torch.Tensor, device: torch.device) -> torch.Tensor:
    """[beta1, beta2] as the float64 tensor the ops read: like lr, never a constant of a compiled
    graph, so a scheduler changing beta1 (OneCycleLR's cycle_momentum) does not recompile."""
    def make():
        one = torch.ones((), dtype=torch.float64, device=device)
        return torch.stack([one * float(b) if not isinstance(b, torch.Tensor) else _to_device(b, device, torch.float64)
                            for b in (beta1, beta2)])

    if isinstance(beta1, torch.Tensor) or isinstance(beta2, torch.Tensor):
        return make()
    return _eager_constant((torch.device(device), "betas", beta1, beta2), make)


def check_hyperparameters(lr, betas, eps, weight_decay, where: str = "", read_tensors: bool = True,
                          amsgrad: bool = False) -> None:
    """torch.optim's checks and wording, after `where` (who is checking). lr and the betas are
    numbers or one-element tensors, eps and weight_decay numbers (or one-element tensors, read);
    a tensor's value is checked only when `read_tensors` (a step does not read them: that would
    sync with the GPU, and the kernels read them from the tensors)."""
    def invalid(what):
        raise ValueError(f"{where}: {what}" if where else what)

    def checked(value, what, may_be_tensor=True):
        """value as a float to compare, or None for a tensor whose value is not read."""
        if isinstance(value, torch.Tensor):
            if value.numel() != 1 or value.is_complex():
                invalid(f"Invalid {what}: a tensor of shape {list(value.shape)} and dtype {value.dtype}; "
                        f"expected a real number{' or a one-element tensor' if may_be_tensor else ''}")
            return value.item() if read_tensors or not may_be_tensor else None
        if isinstance(value, bool) or not isinstance(value, numbers.Real):  # numpy's floats too
            invalid(f"Invalid {what}: {value!r}; expected a real number"
                    f"{' or a one-element tensor' if may_be_tensor else ''}")
        return value

    value = checked(lr, "learning rate")
    if value is not None and not 0.0 <= value:
        invalid(f"Invalid learning rate: {lr}")
    value = checked(eps, "epsilon value", may_be_tensor=False)
    if not 0.0 <= value:
        invalid(f"Invalid epsilon value: {eps}")
    # (a numpy array or a tensor of two too; not a set, whose order is not the user's)
    if not ((isinstance(betas, (tuple, list)) or hasattr(betas, "__array__")) and len(betas) == 2):
        invalid(f"Invalid betas: {betas!r}; expected a pair (beta1, beta2)")
    for i, beta in enumerate(betas):
        value = checked(beta, f"beta parameter at index {i}")
        if value is not None and not 0.0 <= value < 1.0:
            invalid(f"Invalid beta parameter at index {i}: {beta}")
    value = checked(weight_decay, "weight_decay value", may_be_tensor=False)
    if not 0.0 <= value:
        invalid(f"Invalid weight_decay value: {weight_decay}")
    if not isinstance(amsgrad, bool):
        invalid(f"amsgrad must be a bool, got {amsgrad!r}")


def percentile_clipping(grads: Tensors, gnorm_vecs: Tensors, steps: Tensors, percentile: int) -> torch.Tensor:
    """Records each gradient's squared norm in its 100-step history (``gnorm_vecs``; ``steps`` are
    the counts before this step) and returns the factors, one per gradient, that clip each to the
    ``percentile``-th smallest norm of its history (bitsandbytes 0.49's percentile clipping)."""
    device = grads[0].device if grads else torch.device("cpu")
    scales = torch.empty(len(grads), dtype=torch.float32, device=device)
    if grads:
        torch.ops.adam8.percentile_clipping(grads, gnorm_vecs, steps, percentile, scales)
    return scales


def adam(
    params: Tensors,
    grads: Tensors,
    exp_avgs: Tensors,
    exp_avg_sqs: Tensors,
    steps: Tensors,
    *,
    lr: float | torch.Tensor,
    beta1: float | torch.Tensor,
    beta2: float | torch.Tensor,
    eps: float,
    weight_decay: float,
    max_exp_avg_sqs: Tensors = (),
    gnorm_scales: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
    max_unorm: float = 0.0,
    skip_zeros: bool = False,
) -> None:
    """One AdamW step with fp32 moments; the op advances ``steps`` (float32 scalars) by one and
    uses the new counts for the bias corrections. ``max_exp_avg_sqs`` (one per parameter) turns on
    amsgrad; ``gnorm_scales`` (one factor per parameter, from :func:`percentile_clipping`) scales
    the gradients; ``found_inf`` (a float32 scalar, torch.amp.GradScaler's) skips the whole step,
    step counts included, where nonzero; ``max_unorm`` and ``skip_zeros`` are bitsandbytes' options.
    Bad hyperparameters raise ValueError (a tensor lr or beta is not read: no sync)."""
    check_hyperparameters(lr, (beta1, beta2), eps, weight_decay, "torchadam8.functional.adam", read_tensors=False)
    if not params:
        return
    device = params[0].device
    torch.ops.adam8.adam_step(
        params, grads, exp_avgs, exp_avg_sqs, list(max_exp_avg_sqs), steps, lr_tensor(lr, device),
        betas_tensor(beta1, beta2, device), gnorm_scales, found_inf, eps=eps, weight_decay=weight_decay,
        max_unorm=max_unorm, skip_zeros=skip_zeros,
    )


def adam8bit(
    params: Tensors,
    grads: Tensors,
    state1: Tensors,
    state2: Tensors,
    steps: Tensors,
    absmax1: Tensors,
    absmax2: Tensors,
    qmap1: torch.Tensor,
    qmap2: torch.Tensor,
    *,
    lr: float | torch.Tensor,
    beta1: float | torch.Tensor,
    beta2: float | torch.Tensor,
    eps: float,
    weight_decay: float,
    state3: Tensors = (),
    absmax3: Tensors = (),
    gnorm_scales: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
    max_unorm: float = 0.0,
    skip_zeros: bool = False,
    block_wise: bool = True,
) -> None:
    """One AdamW step with 8-bit moments (uint8 codes of qmap1 / qmap2 with one absmax per 256
    values, or one per tensor when not ``block_wise``); advances ``steps`` like :func:`adam`. The
    update uses the new moments before they are requantized. ``state3`` / ``absmax3`` hold
    amsgrad's running maximum of the second moment (unsigned code); ``found_inf`` as in :func:`adam`."""
    check_hyperparameters(lr, (beta1, beta2), eps, weight_decay, "torchadam8.functional.adam8bit",
                          read_tensors=False)
    if not params:
        return
    device = params[0].device
    torch.ops.adam8.adam8bit_step(
        params, grads, state1, state2, list(state3), steps, absmax1, absmax2, list(absmax3), qmap1, qmap2,
        lr_tensor(lr, device), betas_tensor(beta1, beta2, device), gnorm_scales, found_inf, eps=eps,
        weight_decay=weight_decay, max_unorm=max_unorm, skip_zeros=skip_zeros, block_wise=block_wise,
    )
