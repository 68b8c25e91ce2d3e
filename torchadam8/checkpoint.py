"""Checking a loaded state_dict against an optimizer before anything is changed.

``validated_state(opt, state_dict)`` turns a state_dict into the state of each parameter and the
new param_groups, or raises ValueError naming the first mismatch; the optimizer itself is never
touched here, so a refused checkpoint leaves it exactly as it was.

What the state of a parameter ``p`` must hold is ``opt._state_spec(p, config)`` for the options it
will step with (its loaded group's hyperparameters, amsgrad among them, then the optimizer's args
and p's overrides): exactly those keys, each tensor with that dtype and shape (``step`` may be a
number or a one-element tensor; it becomes a float32 scalar). Moments (tensors shaped like ``p``)
are copied into ``p``'s device and memory layout, every other tensor onto ``p``'s device.

State of another kind is refused, never converted: 8-bit codes where this optimizer keeps fp32
moments (or the reverse), per-tensor scales where per-block ones are expected. (amsgrad's
``state3`` and percentile clipping's history ``gnorm_vec``, present or missing, are accepted: the
next step makes or drops them, as when the option is switched mid-training.) A conversion would
quietly quantize or dequantize the moments, or invent a history, and so continue a different
training run than the one saved; the error says which option to match instead (optim_bits,
min_8bit_size, block_wise). Likewise 8-bit codes saved in another
memory order than the parameter's are refused: their absmax blocks follow memory order, so the
codes cannot be moved to the new layout without requantizing them.

Checkpoints of bitsandbytes (``bitsandbytes.optim.Adam / Adam8bit / Adam32bit``; checked against
0.50.2) load as well, found automatically by their layout. Their state_dict() is
torch.optim.Optimizer's plus two changes. First, the tensors of each parameter's state are moved
into a nested dict under ``"__bnb_optimizer_quant_state__"`` (for FSDP), with only ``step`` left
outside: ``{"step": <int>, "__bnb_optimizer_quant_state__": {"state1", "state2", and for 8-bit state
"absmax1", "absmax2", "qmap1", "qmap2"}}``. Second, its param_groups carry the AdEMAMix options
``alpha``, ``t_alpha``, ``t_beta3``. ``step`` is a plain Python int (the count of steps taken, as
ours) for 8-bit and 32-bit state alike; the 8-bit state uses the same blocks of 256 values and the
same maps, and parameters below min_8bit_size keep fp32 moments in both libraries. So:

- the nested dict is unwrapped (older bitsandbytes saved the same keys unwrapped; both load);
- ``qmap1`` / ``qmap2`` must equal this package's signed / unsigned dynamic maps exactly (codes are
  indices into them), otherwise the checkpoint is refused; then they are dropped, the optimizer
  keeps its own maps;
- ``unorm_vec`` is dropped: bitsandbytes overwrites it every step with that step's update norm
  (max_unorm clipping), so it carries nothing into the next step;
- ``gnorm_vec`` (older bitsandbytes' percentile-clipping history) is loaded when this optimizer
  clips by percentile and dropped otherwise: only the clipping reads it;
- ``max1``, ``max2``, ``new_max1``, ``new_max2`` (older bitsandbytes' non-blockwise 8-bit state) are
  refused: that is another quantization scheme, not converted;
- ``alpha``, ``t_alpha``, ``t_beta3`` are dropped from the groups: bitsandbytes' Adam never reads
  them (an AdEMAMix checkpoint is refused anyway: its state1 has another shape).
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch

from ops_registry.checks import memory_order

from .overrides import bnb_config
from .functional import check_hyperparameters
from .paged import paged_zeros_like
from .qmap import dynamic_maps

GNORM_SPEC = (torch.float32, (100,))  # percentile clipping's history: 100 squared norms

BLOCK = 256

BNB_WRAPPER = "__bnb_optimizer_quant_state__"
_BNB_QMAPS = {"qmap1": ("state1", "signed"), "qmap2": ("state2", "unsigned")}
_BNB_GROUP_KEYS = ("alpha", "t_alpha", "t_beta3")
_BNB_REFUSED = ("max1", "max2", "new_max1", "new_max2")
_KIND_HINTS = {
    "state3": "amsgrad's running maximum (amsgrad=True)",
}


def validated_state(opt, state_dict: dict[str, Any]):
    """Returns (state by parameter, param_groups) for `opt` from `state_dict`, or raises ValueError
    naming the first mismatch. Tensors are copied onto each parameter's device and layout.

    `state_dict` is one of this package's (``opt.state_dict()``) or one of bitsandbytes' Adam
    optimizers, told apart by bitsandbytes' nested ``__bnb_optimizer_quant_state__`` dicts or its
    ``qmap1`` / ``qmap2`` keys (see the module docstring for what is converted, dropped, refused).
    """
    where = f"{type(opt).__name__}.load_state_dict"
    if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= state_dict.keys():
        raise ValueError(f"{where}: expected a dict with 'state' and 'param_groups' (from state_dict())")
    groups, saved_groups = opt.param_groups, state_dict["param_groups"]
    if not isinstance(saved_groups, (list, tuple)) or not all(
        isinstance(g, dict) and "params" in g for g in saved_groups
    ):
        raise ValueError(f"{where}: 'param_groups' must be a list of dicts, each with 'params'")
    if not isinstance(state_dict["state"], dict):
        raise ValueError(f"{where}: 'state' must be a dict by parameter id, got {type(state_dict['state']).__name__}")
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
    from_bnb = is_bitsandbytes_state_dict(state_dict)

    new_groups = []
    for gi, (group, saved) in enumerate(zip(groups, saved_groups)):
        dropped = _BNB_GROUP_KEYS if from_bnb else ()
        # A hyperparameter the saved group lacks keeps the optimizer's default, as torch.optim's groups.
        # copies, as torch.optim: a tensor lr must not be shared with the loaded dict (a scheduler
        # updates it in place)
        values = {k: copy.deepcopy(v) for k, v in saved.items() if k not in dropped and k != "params"}
        new = {**opt.defaults, **values, "params": group["params"]}
        if "param_names" in group and "param_names" not in new:  # as torch.optim: names saved win
            new["param_names"] = group["param_names"]
        # refused now, not at the next step, and before anything changes
        check_hyperparameters(new["lr"], new["betas"], new["eps"], new["weight_decay"],
                              f"{where}: group {gi} of the loaded state dict", amsgrad=new["amsgrad"])
        new_groups.append(new)
    # Each parameter's state must fit the options it will step with: the loaded group's (its amsgrad),
    # then its overrides. (For bitsandbytes, which ignores amsgrad, the current groups': its state
    # never holds a running maximum, whatever its groups say.)
    configs = {}
    overrides = opt._current_overrides()
    for gi, group in enumerate(groups if from_bnb else new_groups):
        group_config = opt._group_config(gi, group)
        for pi, p in enumerate(group["params"]):
            configs[p] = {**group_config, **overrides[gi][pi]}
    state = {}
    for key, saved in state_dict["state"].items():
        if key not in id_map:
            raise ValueError(f"{where}: the loaded state dict has state for parameter id {key!r}, which no group lists")
        p = id_map[key]
        if isinstance(saved, dict) and not saved:  # no state yet (torch.optim's state dict makes one on a lookup)
            continue
        if torch.nn.parameter.is_lazy(p):
            raise ValueError(f"{where}: parameter {key} is uninitialized (a lazy module's, before its first "
                             "forward), so a state cannot be checked against it: run a forward first")
        state[p] = _param_state(opt, p, saved, f"{where}: parameter {key} (shape {list(p.shape)})", from_bnb,
                                configs[p])
    return state, new_groups


def is_bitsandbytes_state_dict(state_dict: dict[str, Any]) -> bool:
    """True when some parameter's state has bitsandbytes' nested quantization-state dict or its
    quantization maps (this package's state never holds either). A bitsandbytes state_dict saved
    before any step holds no state and loads like one of ours (its AdEMAMix group keys are kept)."""
    states = state_dict.get("state")
    if not isinstance(states, dict):
        return False
    markers = (BNB_WRAPPER, *_BNB_QMAPS)
    return any(isinstance(s, dict) and any(m in s for m in markers) for s in states.values())


def _param_state(opt, p: torch.Tensor, saved: Any, where: str, from_bnb: bool,
                 config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The state of `p` from its saved state: exactly the keys of ``opt._state_spec(p, config)``
    (`config`: the options p will step with), each with that dtype and shape, copied onto p's
    device (moments into p's layout); else ValueError.

    A saved state of another kind (8-bit vs 32-bit, per-block vs per-tensor scales) is refused, not
    converted: converting would quantize, dequantize or make up state, so training would not
    continue as saved. `from_bnb` first turns bitsandbytes' layout into ours (see the module
    docstring). Three exceptions, layouts the optimizer itself steps on from: amsgrad's maximum and
    percentile clipping's history present or missing against the options (the next step makes or
    drops them: a state dict saved between switching the option and that step holds the old
    layout), and, when options changed after p's state was made, that state's own layout."""
    spec = opt._state_spec(p, config)
    try:
        return _state_as(opt, p, saved, spec, where, from_bnb)
    except ValueError as first:
        alternatives = [opt._state_spec(p, {**config, "amsgrad": not config["amsgrad"]})]
        current = opt.state.get(p)
        if current and not from_bnb:
            layout = {k: (v.dtype, tuple(v.shape)) for k, v in current.items() if isinstance(v, torch.Tensor)}
            layout["step"] = spec["step"]
            alternatives.append(layout)
        for alternative in alternatives:
            if alternative != spec:
                try:
                    return _state_as(opt, p, saved, alternative, where, from_bnb)
                except ValueError:
                    pass
        raise first from None  # what the options ask for


def _state_as(opt, p: torch.Tensor, saved: Any, spec: dict, where: str, from_bnb: bool) -> dict[str, torch.Tensor]:
    """_param_state against the given spec (key -> (dtype, shape))."""
    if not isinstance(saved, dict):
        raise ValueError(f"{where}: the saved state must be a dict, got {type(saved).__name__}")
    if from_bnb:
        saved = _unwrap_bnb(saved, where)
    saved_bits, bits = _bits(saved.get("state1")), _bits_of_dtype(spec["state1"][0])
    if saved_bits and bits and saved_bits != bits:
        raise ValueError(_kind_mismatch(where, saved_bits, bits == 8, p))
    if from_bnb:
        saved = _drop_bnb_extras(saved, spec, where)
    # Percentile clipping's history present or missing, whatever the options: the next step drops
    # it or makes it afresh, as when the option is switched mid-training (kept as saved until then,
    # so what the optimizer saves it loads).
    if "gnorm_vec" in saved and "gnorm_vec" not in spec:
        spec = {**spec, "gnorm_vec": GNORM_SPEC}
    elif "gnorm_vec" in spec and "gnorm_vec" not in saved:
        spec = {k: v for k, v in spec.items() if k != "gnorm_vec"}
    if saved.keys() != spec.keys():
        raise ValueError(_keys_mismatch(where, sorted(spec), sorted(saved, key=str)))
    out = {"step": _step(saved["step"], p, where)}
    shape = tuple(p.shape)
    for key, (dtype, want) in spec.items():
        if key == "step":
            continue
        t = saved[key]
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{where}: {key} must be a tensor, got {type(t).__name__}")
        if want == shape:  # a moment: the parameter's device and layout
            if t.dtype != dtype:
                got_bits = _bits(t)
                if key.startswith("state") and got_bits and bits and got_bits != bits:
                    raise ValueError(_kind_mismatch(where, got_bits, bits == 8, p))
                raise ValueError(f"{where}: {key} has dtype {t.dtype}; expected {dtype}")
            if tuple(t.shape) != shape:
                raise ValueError(f"{where}: {key} has shape {list(t.shape)} but the parameter has shape {list(shape)}")
            _check_block_order(spec, key, t, p, where)
            # a paged optimizer's large moments go straight to managed memory (no device copy first)
            out[key] = (paged_zeros_like(p, dtype) if opt._pages(p, key) else torch.empty_like(p, dtype=dtype)).copy_(t)
        else:
            if t.dtype != dtype or tuple(t.shape) != want:
                raise ValueError(_tensor_mismatch(where, key, t, dtype, want))
            out[key] = torch.empty(want, dtype=dtype, device=p.device).copy_(t)
    return out


# ------------------------------------------------------------ bitsandbytes' layout
def _unwrap_bnb(saved: dict, where: str) -> dict:
    """bitsandbytes' per-parameter state with its nested quantization-state dict flattened."""
    if BNB_WRAPPER not in saved:
        return saved
    inner = saved[BNB_WRAPPER]
    if not isinstance(inner, dict):
        raise ValueError(f"{where}: bitsandbytes' {BNB_WRAPPER} must be a dict, got {type(inner).__name__}")
    flat = {k: v for k, v in saved.items() if k != BNB_WRAPPER}
    both = sorted(flat.keys() & inner.keys())
    if both:
        raise ValueError(f"{where}: {both} appear both in bitsandbytes' {BNB_WRAPPER} and beside it")
    return {**flat, **inner}


def _drop_bnb_extras(saved: dict, spec: dict, where: str) -> dict:
    """Checks bitsandbytes' quantization maps against ours and drops the keys we do not keep."""
    refused = [k for k in _BNB_REFUSED if k in saved]
    if refused:
        raise ValueError(
            f"{where}: the checkpoint holds {refused}, bitsandbytes' non-blockwise 8-bit state, which is "
            "not converted to torchadam8's blockwise state; save it with block_wise=True in bitsandbytes"
        )
    out = dict(saved)
    for key, (state_key, kind) in _BNB_QMAPS.items():
        if key in out:
            _check_qmap(out.pop(key), key, state_key, kind, where)
    out.pop("unorm_vec", None)  # the last step's update norm, recomputed by every step
    if "gnorm_vec" not in spec:
        out.pop("gnorm_vec", None)  # only percentile clipping reads it, and this optimizer does not clip
    return out


def _check_qmap(qmap: Any, key: str, state_key: str, kind: str, where: str) -> None:
    ours = dynamic_maps("cpu")[0 if kind == "signed" else 1]
    if not isinstance(qmap, torch.Tensor) or qmap.dtype != torch.float32 or tuple(qmap.shape) != tuple(ours.shape):
        got = f"{qmap.dtype} {list(qmap.shape)}" if isinstance(qmap, torch.Tensor) else type(qmap).__name__
        raise ValueError(
            f"{where}: bitsandbytes' {key} must be a float32 tensor of shape {list(ours.shape)}, got {got}"
        )
    theirs = qmap.detach().to("cpu")
    if not torch.equal(theirs, ours):
        differ = (theirs != ours).nonzero().flatten()
        i = int(differ[0])
        raise ValueError(
            f"{where}: bitsandbytes' {key} (the quantization map of {state_key}) differs from torchadam8's "
            f"{kind} dynamic map in {differ.numel()} of {ours.numel()} entries (first at index {i}: "
            f"{theirs[i].item()!r} vs {ours[i].item()!r}); the codes of {state_key} would decode to other "
            "values, so the checkpoint is refused"
        )


# ------------------------------------------------------------ checks and messages
def _check_block_order(spec: dict, key: str, t: torch.Tensor, p: torch.Tensor, where: str) -> None:
    """8-bit codes with several absmax blocks: the blocks follow memory order, so the saved codes
    must be laid out in the same dimension order as the parameter."""
    if t.dtype != torch.uint8 or not key.startswith("state"):
        return
    scales = spec.get("absmax" + key[len("state"):])
    if scales is None or math.prod(scales[1]) <= 1 or memory_order(t) == memory_order(p):
        return
    raise ValueError(
        f"{where}: {key} holds 8-bit codes with strides {list(t.stride())} but the parameter has strides "
        f"{list(p.stride())}; their absmax blocks follow memory order, so the codes cannot be moved to "
        "another layout without requantizing them (refused); give the parameter the checkpoint's memory "
        "layout before loading"
    )


def _bits_of_dtype(dtype: torch.dtype) -> int | None:
    return {torch.uint8: 8, torch.float32: 32}.get(dtype)


def _bits(t) -> int | None:
    return _bits_of_dtype(t.dtype) if isinstance(t, torch.Tensor) else None


def _kind_mismatch(where: str, saved_bits: int, eight_bit: bool, p: torch.Tensor) -> str:
    message = (
        f"{where}: the checkpoint holds {saved_bits}-bit state but this optimizer keeps "
        f"{8 if eight_bit else 32}-bit state for it; load it into an optimizer with the same optim_bits "
        "and min_8bit_size (state is not converted between kinds)"
    )
    bits = bnb_config(p).get("optim_bits")
    if bits is not None:  # (a checkpoint saved before bitsandbytes' overrides counted)
        message += (
            f"; its optim_bits={bits} comes from bitsandbytes' GlobalOptimManager "
            "(bnb.nn.StableEmbedding and bnb.nn.Embedding register one): torchadam8.GlobalOptimManager."
            f"get_instance().override_config(param, 'optim_bits', {saved_bits}) keeps the checkpoint's kind"
        )
    return message


def _keys_mismatch(where: str, expected: list[str], got: list) -> str:
    message = f"{where}: expected state keys {expected}, got {got}"
    hinted = [k for k in _KIND_HINTS if (k in expected) != (k in got)]
    for key in hinted:
        side = "this optimizer keeps" if key in expected else "the checkpoint holds"
        message += f"; {side} {key}, {_KIND_HINTS[key]}"
    if hinted:
        message += (
            ": build the optimizer with the options the checkpoint was saved with "
            "(state is not converted between kinds)"
        )
    if "exp_avg" in got:
        message += "; this is a torch.optim Adam / AdamW state dict, which this optimizer does not load"
    return message


def _tensor_mismatch(where: str, key: str, t: torch.Tensor, dtype: torch.dtype, shape: tuple) -> str:
    message = (
        f"{where}: {key} must be a {str(dtype).removeprefix('torch.')} tensor of shape {list(shape)}, "
        f"got {t.dtype} {list(t.shape)}"
    )
    if key.startswith("absmax") and t.dtype == dtype and t.dim() == 1 and len(shape) == 1:
        if t.numel() == 1 < shape[0]:
            message += " (one scale per tensor: saved with block_wise=False; not converted)"
        elif shape[0] == 1 < t.numel():
            message += " (one scale per block of 256: saved with block_wise=True; not converted)"
    return message


def _step(step, p: torch.Tensor, where: str) -> torch.Tensor:
    """The step count as a float32 scalar on p's device, from a number (bitsandbytes saves an int)
    or a one-element tensor."""
    if isinstance(step, torch.Tensor) and step.dtype != torch.bool and not step.is_complex():
        if step.numel() != 1:
            raise ValueError(f"{where}: step must hold one element, got shape {list(step.shape)}")
        value = float(step.detach().reshape(()).item())
    elif isinstance(step, (int, float)) and not isinstance(step, bool):
        value = float(step)
    else:
        raise ValueError(f"{where}: step must be a tensor or a number >= 0, got {step!r}")
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{where}: step must be a tensor or a number >= 0, got {step!r}")
    return torch.tensor(value, dtype=torch.float32, device=p.device)
