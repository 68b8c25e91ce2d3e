"""Checking a loaded state_dict against an optimizer before anything is changed."""

from __future__ import annotations

from typing import Any

import torch

BLOCK = 256


def validated_state(opt, state_dict: dict[str, Any]):
    """Returns (state by parameter, param_groups) for `opt` from `state_dict`, or raises ValueError
    naming the first mismatch. Tensors are copied onto each parameter's device and layout."""
    where = f"{type(opt).__name__}.load_state_dict"
    if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= state_dict.keys():
        raise ValueError(f"{where}: expected a dict with 'state' and 'param_groups' (from state_dict())")
    groups, saved_groups = opt.param_groups, state_dict["param_groups"]
    if len(groups) != len(saved_groups):
        raise ValueError(
            f"{where}: the loaded state dict has {len(saved_groups)} parameter groups but the optimizer has {len(groups)}"
        )
    id_map = {}
    for gi, (group, saved) in enumerate(zip(groups, saved_groups)):
        if len(group["params"]) != len(saved["params"]):
            raise ValueError(
                f"{where}: group {gi} of the loaded state dict has {len(saved['params'])} parameters "
                f"but the optimizer's group {gi} has {len(group['params'])}"
            )
        id_map.update(zip(saved["params"], group["params"]))
    state = {}
    for key, saved in state_dict["state"].items():
        if key not in id_map:
            raise ValueError(f"{where}: the loaded state dict has state for parameter id {key!r}, which no group lists")
        p = id_map[key]
        state[p] = _param_state(opt, p, saved, f"{where}: parameter {key} (shape {list(p.shape)})")
    new_groups = [{**saved, "params": group["params"]} for group, saved in zip(groups, saved_groups)]
    return state, new_groups


def _param_state(opt, p: torch.Tensor, saved: dict[str, Any], where: str) -> dict[str, torch.Tensor]:
    eight_bit = opt._uses_8bit(p)
    expected = {"step", "state1", "state2"} | ({"absmax1", "absmax2"} if eight_bit else set())
    if not isinstance(saved, dict) or saved.keys() != expected:
        got = sorted(saved.keys()) if isinstance(saved, dict) else type(saved).__name__
        saved_bits = isinstance(saved, dict) and _bits(saved.get("state1"))
        if saved_bits and saved_bits != (8 if eight_bit else 32):
            raise ValueError(_kind_mismatch(where, saved_bits, eight_bit))
        raise ValueError(f"{where}: expected state keys {sorted(expected)}, got {got}")
    out = {"step": _step(saved["step"], p, where)}
    state_dtype = torch.uint8 if eight_bit else torch.float32
    for key in ("state1", "state2"):
        t = saved[key]
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{where}: {key} must be a tensor, got {type(t).__name__}")
        if t.dtype != state_dtype:
            bits = _bits(t)
            if bits:
                raise ValueError(_kind_mismatch(where, bits, eight_bit))
            raise ValueError(f"{where}: {key} has dtype {t.dtype}; expected {state_dtype}")
        if t.shape != p.shape:
            raise ValueError(f"{where}: {key} has shape {list(t.shape)} but the parameter has shape {list(p.shape)}")
        out[key] = torch.empty_like(p, dtype=state_dtype).copy_(t)  # the parameter's device and layout
    if eight_bit:
        blocks = (p.numel() + BLOCK - 1) // BLOCK
        for key in ("absmax1", "absmax2"):
            t = saved[key]
            if not isinstance(t, torch.Tensor) or t.dtype != torch.float32 or t.shape != (blocks,):
                got = f"{t.dtype} {list(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"{where}: {key} must be a float32 tensor of shape [{blocks}], got {got}")
            out[key] = t.to(p.device, copy=True)
    return out


def _bits(t) -> int | None:
    if isinstance(t, torch.Tensor):
        return {torch.uint8: 8, torch.float32: 32}.get(t.dtype)
    return None


def _kind_mismatch(where: str, saved_bits: int, eight_bit: bool) -> str:
    return (
        f"{where}: the checkpoint holds {saved_bits}-bit state but this optimizer keeps "
        f"{8 if eight_bit else 32}-bit state for it; load it into an optimizer with the same optim_bits "
        "and min_8bit_size"
    )


def _step(step, p: torch.Tensor, where: str) -> torch.Tensor:
    if isinstance(step, torch.Tensor):
        if step.numel() != 1:
            raise ValueError(f"{where}: step must hold one element, got shape {list(step.shape)}")
        return step.detach().to(device=p.device, dtype=torch.float32, copy=True).reshape(())
    if isinstance(step, (int, float)) and step >= 0:
        return torch.tensor(float(step), dtype=torch.float32, device=p.device)
    raise ValueError(f"{where}: step must be a tensor or a number >= 0, got {step!r}")
