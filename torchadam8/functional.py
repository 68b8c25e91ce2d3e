"""Functional Adam over lists of tensors: what the optimizer classes call for each batch of
parameters. Each call runs one adam8 op (one kernel launch per
device on CUDA), so a compiled step traces to a handful of ops whatever the parameter count."""

from __future__ import annotations

from typing import Sequence

import torch

Tensors = Sequence[torch.Tensor]


def lr_tensor(lr: float | torch.Tensor, device: torch.device) -> torch.Tensor:
    """The learning rate as the float32 scalar tensor the ops read (a tensor, never a constant
    baked into a compiled graph or a captured CUDA graph)."""
    if isinstance(lr, torch.Tensor):
        return lr.to(device=device, dtype=torch.float32).reshape(())
    return torch.full((), lr, dtype=torch.float32, device=device)


def adam(
    params: Tensors,
    grads: Tensors,
    exp_avgs: Tensors,
    exp_avg_sqs: Tensors,
    steps: Tensors,
    *,
    lr: float | torch.Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    """One AdamW step with fp32 moments; the op advances ``steps`` (float32 scalars) by one and
    uses the new counts for the bias corrections."""
    if not params:
        return
    torch.ops.adam8.adam_step(
        params, grads, exp_avgs, exp_avg_sqs, steps, lr_tensor(lr, params[0].device), beta1, beta2, eps, weight_decay
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
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    """One AdamW step with blockwise 8-bit moments (uint8 codes of qmap1 / qmap2, one absmax per
    256 values); advances ``steps`` like :func:`adam`. The update uses the new moments before they are
    requantized."""
    if not params:
        return
    torch.ops.adam8.adam8bit_blockwise_step(
        params,
        grads,
        state1,
        state2,
        steps,
        absmax1,
        absmax2,
        qmap1,
        qmap2,
        lr_tensor(lr, params[0].device),
        beta1,
        beta2,
        eps,
        weight_decay,
    )
