"""Adam, Adam8bit and Adam32bit: bitsandbytes' classes and signatures over the adam8 ops."""

from __future__ import annotations

import operator
import sys
from collections import OrderedDict
from types import SimpleNamespace
from typing import Any

import torch

from . import _extension
from . import functional as F
from .functional import check_hyperparameters
from .checkpoint import GNORM_SPEC, validated_state
from .overrides import GlobalOptimManager, _validated, bnb_overrides_key, shape_text
from .paged import PAGED_MIN_NUMEL, PagedTensor, paged_zeros_like, unwrap
from ops_registry.checks import is_dense, memory_order

from .qmap import dynamic_maps

PARAM_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BLOCK = 256  # values per absmax of the 8-bit states (csrc/adam8_math.h: kStateBlock)

# Options of the `args` object of bitsandbytes, with the constructor argument each replaces.
ARGS_KEYS = ("optim_bits", "min_8bit_size", "percentile_clipping", "block_wise", "max_unorm", "skip_zeros")
# Per-group hyperparameters a per-parameter override may pin.
HYPER_KEYS = ("lr", "betas", "eps", "weight_decay", "amsgrad")


def _check_param(p: torch.Tensor, where: str) -> None:
    """Refuses a parameter the kernels cannot update (at add_param_group, and at a step for one
    that was appended to a group's list or changed since)."""
    if torch.nn.parameter.is_lazy(p):  # (a lazy module's, before its first forward: checked at its first step)
        return
    dtensor = sys.modules.get("torch.distributed.tensor")  # (no DTensor exists unless it was imported)
    if dtensor is not None and isinstance(p, dtensor.DTensor):
        raise TypeError(f"{where} is a DTensor (FSDP2's fully_shard, tensor parallelism), which the ops cannot "
                        "take: not supported yet (DDP and ZeroRedundancyOptimizer work, and FSDP1 with 32-bit "
                        "states)")
    if p.is_complex():
        raise ValueError(f"{where} is complex; view it as real with torch.view_as_real")
    if p.dtype not in PARAM_DTYPES:
        raise ValueError(f"{where} has dtype {p.dtype}; supported: float32, float16, bfloat16")
    if p.is_sparse or not is_dense(p):
        raise ValueError(f"{where} is not dense (strides {list(p.stride())}); "
                         "the kernels update it in place and need contiguous memory")


def _check_torch_keys(group: dict, where: str) -> None:
    """Refuses torch.optim's group options that would change the math here (a group copied from a
    torch optimizer's param_groups, or set since); its performance flags (foreach, fused, capturable,
    differentiable) change nothing and pass."""
    if group.get("maximize", False):
        raise ValueError(f"{where} sets maximize=True, which this optimizer does not support (it minimizes); "
                         "negate the loss instead")
    if group.get("decoupled_weight_decay", True) is False and group["weight_decay"] != 0:
        raise ValueError(f"{where} sets decoupled_weight_decay=False with weight_decay={group['weight_decay']}: "
                         "weight decay here is always decoupled (AdamW's); for torch.optim.Adam's L2 penalty, "
                         "add it to the loss")


def _pair(betas) -> tuple:
    """Checked betas as a tuple; numpy numbers as floats (a state_dict holding numpy scalars does not
    load with torch.load(weights_only=True))."""
    return tuple(b if isinstance(b, torch.Tensor) else float(b) for b in betas)


class _Batch:
    """The argument lists of one op call, for parameters that share their state kind and options."""

    __slots__ = ("params", "grads", "state1", "state2", "state3", "steps", "absmax1", "absmax2", "absmax3",
                 "gnorm_vecs")

    def __init__(self):
        for name in self.__slots__:
            setattr(self, name, [])


# Under torch.compile a batch becomes op calls of at most this many parameters: Inductor's passes
# over an op's outputs take time in the square of its tensor count (GPT-2-medium's 292 parameters
# in one Adam32bit call: a cold compile of 37-40 s; in calls of 128: 31 s). Eager steps make one
# call per batch (a call costs host time; its tensor count does not matter there).
COMPILED_CALL_PARAMS = 128


def _split(b: _Batch, size: int) -> list[_Batch]:
    """b as batches of at most `size` parameters (an empty optional list stays empty)."""
    if len(b.params) <= size:
        return [b]
    parts = []
    for start in range(0, len(b.params), size):
        part = _Batch()
        for name in _Batch.__slots__:
            setattr(part, name, getattr(b, name)[start:start + size])
        parts.append(part)
    return parts


def _scan(params: list[torch.Tensor], grads: list, states: list[dict | None]) -> tuple[int, bool]:
    """The C++ scan of a step's parameters (csrc/host.cpp): the index of the first one with a
    gradient that needs the Python checks (-1 if none), and whether any gradient is strided unlike
    its parameter. Without the library's Python module: (0, True), i.e. check everything."""
    host = _extension.host()
    if host is None:
        return 0, True
    return host.scan_params(params, grads, states)


def _batch_lists(members: list[tuple], eight_bit: bool, amsgrad: bool, clipping: bool) -> list[list]:
    """The argument lists of one op call, in _Batch's order, from its (parameter, gradient, state)
    triples; the optional lists are empty where the batch's state kind has no such entry."""
    states = [state for _, _, state in members]

    def entries(name: str, present: bool = True) -> list:
        return [state[name] for state in states] if present else []

    return [[p for p, _, _ in members], [g for _, g, _ in members], entries("state1"), entries("state2"),
            entries("state3", amsgrad), entries("step"), entries("absmax1", eight_bit), entries("absmax2", eight_bit),
            entries("absmax3", eight_bit and amsgrad), entries("gnorm_vec", clipping)]


class _AmpState:
    """torch.amp.GradScaler's grad_scale and found_inf (set on the optimizer by ``scaler.step``),
    on each parameter device: the kernels divide the gradients by the scale and skip the step
    where found_inf is nonzero, all on the device (no host sync)."""

    def __init__(self, grad_scale: torch.Tensor | None, found_inf: torch.Tensor | None):
        self.grad_scale, self.found_inf = grad_scale, found_inf
        self.by_device: dict[torch.device, tuple] = {}

    def __bool__(self) -> bool:
        return self.grad_scale is not None or self.found_inf is not None

    def get(self, device: torch.device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if device not in self.by_device:
            inv = found = None
            async_copy = device.type == "cuda"  # to the host, a non-blocking copy could be read before it lands
            if self.grad_scale is not None:
                scale = self.grad_scale.to(device=device, dtype=torch.float32, non_blocking=async_copy)
                inv = scale.reshape(()).reciprocal()  # 0-dim, as _foreach_mul_ needs, from a (1,) scale too
            if self.found_inf is not None:
                found = self.found_inf.to(device=device, dtype=torch.float32, non_blocking=async_copy).reshape(())
            self.by_device[device] = (inv, found)
        return self.by_device[device]


class Adam(torch.optim.Optimizer):
    """Adam with decoupled weight decay and 32-bit or blockwise 8-bit states (bitsandbytes' Adam).

    Arguments are bitsandbytes' (``bitsandbytes.optim.Adam``), defaults included:

    - ``lr``, ``betas``, ``eps``: as torch.optim.Adam. ``lr`` may be a float or a scalar tensor;
      either way the kernels read it from a tensor, so a compiled step does not bake it in: a tensor
      lr never recompiles, a float one once, at its first change (README, Usage).
    - ``weight_decay``: *decoupled*, as bitsandbytes applies it: ``p <- p * (1 - lr * wd)`` before
      the Adam update, exactly torch.optim.AdamW (not the L2 penalty of torch.optim.Adam).
    - ``optim_bits``: 32 (fp32 moments) or 8 (uint8 moments: the signed dynamic map for the first,
      the unsigned one for the second, one fp32 absmax per 256 values; the update uses the new
      unquantized moments, only the stored ones are quantized; a positive second moment is stored
      as at least the smallest positive code, and the new one is kept at or above m^2 / K, the
      bound exact Adam keeps, K = (1-b1)^2 / ((1-b2)(1 - b1^2/b2)): a v rounded to code 0 beside a
      nonzero m would step by about lr * m / eps).
    - ``min_8bit_size``: parameters with fewer elements keep fp32 moments.
    - ``amsgrad``: keep the running maximum of the second moment (a third state, 8-bit like the
      others for 8-bit parameters) and use it in the denominator, as torch.optim.AdamW(amsgrad=True).
      bitsandbytes ignores or refuses it.
    - ``percentile_clipping`` (< 100): per parameter, the last 100 squared gradient norms are kept
      on the device (``state["gnorm_vec"]``); a gradient whose norm exceeds the square root of the
      ``percentile``-th smallest of them is scaled down to it (bitsandbytes 0.49). No host sync.
    - ``block_wise``: 8-bit states with one scale per 256 values (True) or one per tensor (False: the
      new max |m| and max v are found first, then the states are quantized against them).
    - ``args``: an object whose attributes optim_bits, min_8bit_size, percentile_clipping,
      block_wise, max_unorm, skip_zeros replace the constructor's values, as in bitsandbytes
      (``args.optim_bits`` wins over Adam8bit's and Adam32bit's fixed width there too). An object
      with all six is kept as ``opt.args``, as in bitsandbytes: changing it changes the options;
      otherwise ``opt.args`` is a copy completed with the constructor's values. Its attributes are
      read, and checked, at each step; a compiled step retraces when they change.
      ``max_unorm`` (> 0) caps the norm of the update m_hat / (sqrt(v_hat) + eps) at max_unorm
      times the parameter's norm (bitsandbytes; we apply it to 8-bit states too). ``skip_zeros``
      leaves elements whose gradient is exactly 0 untouched (parameter and moments).
    - Per-parameter overrides: :class:`torchadam8.GlobalOptimManager` (bitsandbytes' calls), e.g. to
      keep an embedding's state 32-bit; the override wins over the class's optim_bits.
    - ``is_paged``: keep every state of at least 100k elements in managed (unified) memory as a
      :class:`torchadam8.PagedTensor`, which the GPU driver can page to host memory and back; each
      step prefetches the states it updates to the GPU first (on the current stream). The Paged
      classes always page, as bitsandbytes' do. Keyword-only ``page_out_after_step=True`` also
      pages them out to the host after each step, so the GPU holds no optimizer state between
      steps. ``prefetch()`` / ``page_out()`` do either by hand: prefetching cannot be captured in
      a CUDA graph (it does nothing while capturing), so call ``prefetch()`` before a replay.

    Non-finite gradient elements (NaN, inf) leave their parameter element unchanged and reset its
    moments to 0, in every variant and on every device (bitsandbytes' 8-bit rule; torch propagates
    NaN instead). They do not count in percentile clipping's norms.

    Mixed precision: ``scaler.step(opt)`` with ``torch.amp.GradScaler`` does not synchronize; the
    kernels unscale the gradients and skip the whole step (parameters, states, step counts) when
    the scaler found an inf or NaN, as ``torch.optim.AdamW(fused=True)`` does. With
    percentile_clipping, the gradients are unscaled in place first, and a skipped step still
    records its gradient norm (of the finite elements) in the clipping history.

    Parameters may be float32, float16 or bfloat16 (gradients in the parameter's dtype); the math
    is float32. Per parameter the state holds ``step`` (a float32 scalar tensor), ``state1`` and
    ``state2`` (the moments), ``state3`` with amsgrad, for 8-bit state ``absmax1``, ``absmax2``
    (``absmax3``), and ``gnorm_vec`` with percentile clipping.
    """

    _fixed_bits: int | None = None  # Adam8bit / Adam32bit pin optim_bits
    _always_paged = False  # the Paged classes page whatever is_paged says (as bitsandbytes')
    # torch.amp.GradScaler.step sets self.grad_scale / self.found_inf instead of unscaling the
    # gradients and reading found_inf on the host (a sync) itself.
    _step_supports_amp_scaling = True

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
        *,
        page_out_after_step=False,
    ):
        check_hyperparameters(lr, betas, eps, weight_decay, type(self).__name__, amsgrad=amsgrad)
        given = dict(
            optim_bits=optim_bits,
            min_8bit_size=min_8bit_size,
            percentile_clipping=percentile_clipping,
            block_wise=block_wise,
            max_unorm=0.0,
            skip_zeros=False,
        )
        name = type(self).__name__
        if args is not None and not any(hasattr(args, k) for k in ARGS_KEYS):  # (a dict, a typo)
            raise TypeError(f"{name}: args must be an object with some of the attributes {', '.join(ARGS_KEYS)} "
                            f"(as bitsandbytes reads them; e.g. a SimpleNamespace), got {args!r}")
        values = {k: getattr(args, k, given[k]) for k in ARGS_KEYS}
        if self._fixed_bits is not None:
            _validated({"optim_bits": optim_bits}, f"{name} (optim_bits is ignored: it always keeps "
                       f"{self._fixed_bits}-bit state)")
            if not hasattr(args, "optim_bits"):  # as in bitsandbytes, args.optim_bits wins over the class
                values["optim_bits"] = self._fixed_bits
        validated = _validated(values, name)
        # A complete args object is kept (bitsandbytes reads it at each step, so a change to it counts);
        # a partial one completes a copy.
        self.args = args if all(hasattr(args, k) for k in ARGS_KEYS) else SimpleNamespace(**validated)
        if not isinstance(page_out_after_step, bool):
            raise ValueError(f"{name}: page_out_after_step must be a bool, got {page_out_after_step!r}")
        self._paged = bool(is_paged) or self._always_paged
        if page_out_after_step and not self._paged:
            raise ValueError(f"{name}: page_out_after_step=True needs paged states (is_paged=True or a Paged class)")
        self._page_out_after_step = page_out_after_step
        self._manager = GlobalOptimManager.get_instance()
        self._overrides: list[list[dict]] = []
        self._overrides_params: list[list[torch.Tensor]] = []
        self._overrides_version = -1
        self._bnb_overrides: tuple = ()
        self._qmaps: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        defaults = dict(lr=lr, betas=_pair(betas), eps=eps, weight_decay=weight_decay, amsgrad=amsgrad)
        super().__init__(params, defaults)

    # ------------------------------------------------------------ copies and pickles
    def __getstate__(self) -> dict[str, Any]:
        """torch.optim's (defaults, state, param_groups) and this class's options, so that a deep
        copy or an unpickled optimizer can step (torch's alone would leave them out), and each
        parameter's GlobalOptimManager overrides, which the copy registers for its own parameters
        (the manager keys them by parameter object, and the copy's are new ones)."""
        state = super().__getstate__()
        # The options' values, not the user's args object (which may not pickle or deep-copy).
        args = SimpleNamespace(**{k: getattr(self.args, k) for k in ARGS_KEYS})
        state.update(args=args, _paged=self._paged, _page_out_after_step=self._page_out_after_step,
                     overrides=self._current_overrides())
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        overrides = state.pop("overrides", None)
        super().__setstate__(state)
        self._manager = GlobalOptimManager.get_instance()
        for group, group_overrides in zip(self.param_groups, overrides or ()):
            for p, over in zip(group["params"], group_overrides):
                # (not again for a parameter that has them: a shallow copy shares the parameters)
                if over and self._manager.config_for(p) != over:
                    self._manager.override_config(p, key_value_dict=over)
        self._qmaps = {}
        for group in self.param_groups:
            for p in group["params"]:
                self._qmap(p.device)
        self._read_overrides()

    # ------------------------------------------------------------ parameters
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        name = type(self).__name__
        index = len(self.param_groups)
        params = param_group["params"]
        if isinstance(params, set):
            raise TypeError(f"{name}: the parameters of group {index} are a set, whose order changes between runs "
                            "(and with it the state_dict's); give a list")
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        # (name, tensor) pairs, as model.named_parameters() gives: torch.optim keeps the names in the
        # group's "param_names"
        tensors = [p[1] if isinstance(p, tuple) and len(p) == 2 else p for p in params]
        seen: dict[int, int] = {}
        for i, p in enumerate(tensors):
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"{name}: parameter {i} of group {index} is a {type(p).__name__}, not a torch.Tensor")
            if seen.setdefault(id(p), i) != i:  # the kernels would update its memory twice at once
                raise ValueError(f"{name}: parameter {i} of group {index} is parameter {seen[id(p)]} again; "
                                 "list each parameter once")
            _check_param(p, self._where(p, index, i))
        # torch.optim and bitsandbytes would keep these in the group and ignore them. The optimizer's own
        # values pass (ZeroRedundancyOptimizer copies every constructor keyword into each group).
        misplaced = [k for k in ARGS_KEYS if k in param_group and param_group[k] != getattr(self.args, k)]
        if misplaced:
            raise ValueError(f"{name}: group {index} sets {misplaced}, which are not per-group options: give them "
                             "to the constructor (or its args) for every parameter, or per parameter with "
                             "GlobalOptimManager.get_instance().override_config")
        group = {k: v for k, v in param_group.items() if k != "params"}
        merged = {**self.defaults, **group}
        _check_torch_keys(merged, f"{name}: group {index}")
        check_hyperparameters(merged["lr"], merged["betas"], merged["eps"], merged["weight_decay"],
                              f"{name}: group {index}", amsgrad=merged["amsgrad"])
        if "betas" in param_group:
            param_group = {**param_group, "betas": _pair(param_group["betas"])}
        super().add_param_group({**param_group, "params": params})
        for p in tensors:  # made here, not in a (compiled) step, which cannot trace them
            self._qmap(p.device)
        self._read_overrides()

    # ------------------------------------------------------------ per-parameter options
    def _read_overrides(self) -> None:
        """Caches each parameter's GlobalOptimManager overrides, by group and position (with the
        parameters they were read for: a group's list edited in place makes them stale)."""
        self._overrides = [[self._manager.config_for(p) for p in g["params"]] for g in self.param_groups]
        self._overrides_params = [list(g["params"]) for g in self.param_groups]
        self._overrides_version = self._manager.version
        self._bnb_overrides = bnb_overrides_key()

    def _config(self, p: torch.Tensor) -> dict[str, Any]:
        """The options of parameter p: the constructor's (or args'), its group's, then its overrides."""
        gindex, pindex = next((gi, pi) for gi, g in enumerate(self.param_groups)
                              for pi, q in enumerate(g["params"]) if q is p)
        return {**self._group_config(gindex), **self._current_overrides(gindex)[gindex][pindex]}

    def _group_config(self, gindex: int, group: dict[str, Any] | None = None) -> dict[str, Any]:
        """The options of a group's parameters that have no overrides (`group`: in place of group
        `gindex`'s hyperparameters, those of a group being loaded)."""
        group = self.param_groups[gindex] if group is None else group
        config = {k: getattr(self.args, k) for k in ARGS_KEYS}
        config.update((k, group.get(k, self.defaults[k])) for k in HYPER_KEYS)
        return config

    def _current_overrides(self, gindex: int | None = None) -> list[list[dict[str, Any]]]:
        """The cached overrides, reread when stale; `gindex`: only that group's are needed (a step
        checks each group's list once, not every group's for each group)."""
        cached, groups = self._overrides_params, self.param_groups

        def stale(gi):
            params = groups[gi]["params"]
            return len(cached[gi]) != len(params) or not all(map(operator.is_, cached[gi], params))

        if self._overrides_version != self._manager.version or len(cached) != len(groups) or any(
            stale(gi) for gi in (range(len(groups)) if gindex is None else (gindex,))
        ):
            self._read_overrides()
        return self._overrides

    def _uses_8bit(self, p: torch.Tensor, config: dict[str, Any] | None = None) -> bool:
        config = config or self._config(p)
        return config["optim_bits"] == 8 and p.numel() >= config["min_8bit_size"]

    def _qmap(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._qmaps:
            maps = dynamic_maps(device)
            for q in maps:  # constants: a compiled step's CUDA graph keeps them, as the states, uncopied
                torch._dynamo.mark_static_address(q)
            self._qmaps[device] = maps
        return self._qmaps[device]

    def _state_spec(self, p: torch.Tensor, config: dict[str, Any] | None = None
                    ) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        """Every tensor the state of `p` holds: key -> (dtype, shape). Moments have p's layout."""
        config = config or self._config(p)
        spec = {"step": (torch.float32, ())}
        shape = tuple(p.shape)
        keys = (1, 2, 3) if config["amsgrad"] else (1, 2)
        if self._uses_8bit(p, config):
            scales = (p.numel() + BLOCK - 1) // BLOCK if config["block_wise"] else 1
            for k in keys:
                spec[f"state{k}"] = (torch.uint8, shape)
                spec[f"absmax{k}"] = (torch.float32, (scales,))
        else:
            for k in keys:
                spec[f"state{k}"] = (torch.float32, shape)
        if config["percentile_clipping"] < 100:
            spec["gnorm_vec"] = GNORM_SPEC
        return spec

    def _init_state(self, p: torch.Tensor, config: dict[str, Any]) -> None:
        state = self.state[p]
        for key, (dtype, shape) in self._state_spec(p, config).items():
            if self._pages(p, key):
                state[key] = paged_zeros_like(p, dtype)
            elif shape == tuple(p.shape) and key.startswith("state"):
                state[key] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
            else:
                state[key] = torch.zeros(shape, dtype=dtype, device=p.device)

    def _switch_amsgrad(self, p: torch.Tensor, state: dict, on: bool) -> None:
        """amsgrad turned on after the state was made: the running maximum of v starts at v (state2,
        and absmax2 for 8-bit state, copied); turned off: it is dropped. (8-bit vs 32-bit and the
        scales' layout stay as made: changing those would requantize the moments.)"""
        if not on:
            del state["state3"]
            state.pop("absmax3", None)
            return
        v = state["state2"]
        state["state3"] = (paged_zeros_like(p, v.dtype) if self._pages(p, "state3") else torch.empty_like(v)).copy_(v)
        if "absmax2" in state:
            state["absmax3"] = state["absmax2"].clone()

    def _pages(self, p: torch.Tensor, key: str) -> bool:
        """Whether the state `key` of `p` lives in managed memory: the moments of large parameters."""
        return self._paged and key in ("state1", "state2", "state3") and p.numel() >= PAGED_MIN_NUMEL

    def _paged_states(self) -> dict[torch.device, list[PagedTensor]]:
        """The paged states, by device (each op call moves the tensors of one device)."""
        by_device: dict[torch.device, list[PagedTensor]] = {}
        for state in self.state.values():
            for t in state.values():
                if isinstance(t, PagedTensor):
                    by_device.setdefault(t.device, []).append(t)
        return by_device

    @torch.no_grad()
    def prefetch(self) -> None:
        """Migrates every paged state to its GPU now, on the current stream (before replaying a
        captured step, where the step's own prefetch cannot run)."""
        for paged in self._paged_states().values():
            torch.ops.adam8.prefetch(paged)

    @torch.no_grad()
    def page_out(self) -> None:
        """Migrates every paged state to host memory, on the current stream."""
        for paged in self._paged_states().values():
            torch.ops.adam8.page_out(paged)

    def _where(self, p: torch.Tensor, gindex: int, pindex: int) -> str:
        return f"{type(self).__name__}: parameter {pindex} of group {gindex} (shape {shape_text(p)})"

    def _follow_layout(self, p: torch.Tensor, state: dict, gindex: int, pindex: int) -> None:
        """A parameter changed since its state was made (its data replaced, or moved to another memory
        format): fp32 moments follow it to its new layout, as torch.optim's would; anything else is
        refused before any group steps (8-bit codes under several scales cannot move to another memory
        order: their blocks follow it; strides that change only for dimensions of size 1 keep the
        order)."""
        where = self._where(p, gindex, pindex)
        first = state["state1"]
        if first.shape != p.shape or first.device != p.device:
            raise ValueError(f"{where}: its state was made for a {list(first.shape)} parameter on {first.device}; "
                             "the parameter was replaced: give the optimizer a state for it (load_state_dict) or a "
                             "new optimizer")
        if p.numel() <= 1:
            return
        _check_param(p, where)
        if first.dtype == torch.uint8 and state["absmax1"].numel() > 1 and memory_order(first) != memory_order(p):
            raise ValueError(f"{where} now has strides {list(p.stride())} but its 8-bit state has strides "
                             f"{list(first.stride())}: the state's absmax blocks follow the old memory order, so "
                             "it cannot follow without requantizing (refused); restore the parameter's memory format")
        for k in ("state1", "state2", "state3"):
            if k in state:
                dtype = state[k].dtype  # (8-bit codes: the same memory order, so the same blocks)
                state[k] = (paged_zeros_like(p, dtype) if self._pages(p, k) else
                            torch.empty_like(p, dtype=dtype)).copy_(state[k])

    def _grad_error(self, p: torch.Tensor, g: torch.Tensor, gindex: int, pindex: int) -> Exception:
        """The error naming the parameter, for a gradient g that _init_group found unusable."""
        where = self._where(p, gindex, pindex)
        if p.dtype not in PARAM_DTYPES:  # changed since (module.double(), p.data = ...)
            _check_param(p, where)
        if g.is_sparse:
            return RuntimeError(f"{where} has a sparse gradient; Adam does not support sparse gradients, "
                                "use torch.optim.SparseAdam instead")
        if g.dtype != p.dtype:
            return TypeError(f"{where} has dtype {p.dtype} but its gradient has dtype {g.dtype}; they must match")
        if g.shape != p.shape:
            return ValueError(f"{where}: its gradient has shape {list(g.shape)}; it must match the parameter's")
        return ValueError(f"{where} is on {p.device} but its gradient is on {g.device}")

    # ------------------------------------------------------------ step
    def _check_params(self) -> list[tuple[list, list]]:
        """Checks every group's gradients and states before a step changes anything (a bad one
        anywhere stops it); returns each group's _gathered (gradients, states and their scan).
        One C++ scan of every parameter; the checks below, which name the parameter, run only when
        it finds something unusual: an error, a parameter without state, a state to move to its
        parameter's new layout."""
        gathered = [self._gathered(g["params"]) for g in self.param_groups]
        if all(unusual < 0 for _, _, (unusual, _) in gathered):
            return gathered
        states = self.state
        for gi, g in enumerate(self.param_groups):
            seen: dict[int, int] = {}
            for pi, p in enumerate(g["params"]):
                grad = p.grad
                if grad is None:
                    continue
                if seen.setdefault(id(p), pi) != pi:  # appended to the group's list again since
                    raise ValueError(f"{self._where(p, gi, pi)} is parameter {seen[id(p)]} of the group again; "
                                     "list each parameter once (one op call would update it twice at once)")
                dtype = p.dtype
                if (grad.dtype != dtype or dtype not in PARAM_DTYPES or grad.shape != p.shape or grad.is_sparse
                        or grad.device != p.device):
                    raise self._grad_error(p, grad, gi, pi)
                state = states.get(p)
                if not state:  # its first step: appended to the list since, or changed
                    _check_param(p, self._where(p, gi, pi))
                    continue
                moment = state.get("state1")  # (all moments share its layout)
                if isinstance(moment, torch.Tensor) and (moment.shape != p.shape or moment.stride() != p.stride()):
                    self._follow_layout(p, state, gi, pi)
                self._check_state(p, state, gi, pi)
        return [self._gathered(g["params"]) for g in self.param_groups]  # (states may have moved)

    def _check_state(self, p: torch.Tensor, state: dict, gindex: int, pindex: int) -> None:
        """Raises, naming the entry, where the state of p does not hold what an op call needs, as
        the optimizer makes it (host.cpp's state_usual, which sends such a parameter here): a state
        edited by hand (bitsandbytes' habit ``state["step"] = 0``, an int) would otherwise fail
        inside an op, after earlier batches had stepped."""
        def check(key: str, ok, expected: str) -> None:
            value = state.get(key)
            if isinstance(value, torch.Tensor) and ok(value):
                return
            got = (f"a {value.dtype} tensor of shape {list(value.shape)} on {value.device}"
                   if isinstance(value, torch.Tensor) else "missing" if key not in state else f"a {type(value).__name__}")
            raise ValueError(f"{self._where(p, gindex, pindex)}: its state[{key!r}] is {got}; expected {expected} "
                             "(edited by hand? a saved state loads through load_state_dict, which checks it)")

        first = state.get("state1")
        kind = first.dtype if isinstance(first, torch.Tensor) else None
        device, one = p.device, p.numel() <= 1
        check("state1", lambda t: t.dtype in (torch.float32, torch.uint8), "float32 moments or uint8 codes")
        for key in ("state1", "state2", "state3") if "state3" in state else ("state1", "state2"):
            check(key, lambda t: (t.dtype == kind and t.shape == p.shape and t.device == device
                                  and (one or t.stride() == p.stride())),
                  f"a {kind} tensor like the parameter (shape {list(p.shape)}, strides {list(p.stride())}, {device})")
        check("step", lambda t: t.dtype == torch.float32 and t.numel() == 1 and t.device == device,
              f"a float32 tensor of one element on {device}")
        if "gnorm_vec" in state:
            check("gnorm_vec", lambda t: t.dtype == torch.float32 and t.numel() == 100 and t.device == device,
                  f"a float32 tensor of 100 elements on {device}")
        if kind == torch.uint8:
            blocks = (p.numel() + BLOCK - 1) // BLOCK
            check("absmax1", lambda t: t.dtype == torch.float32 and t.numel() in (blocks, 1) and t.device == device,
                  f"float32 scales on {device}, {blocks} (one per block) or 1 (per tensor)")
            n = state["absmax1"].numel()
            for key in ("absmax2", "absmax3") if "state3" in state else ("absmax2",):
                check(key, lambda t: t.dtype == torch.float32 and t.numel() == n and t.device == device,
                      f"float32 scales on {device}, {n} as absmax1")

    def _gathered(self, params: list[torch.Tensor]) -> tuple[list, list, tuple[int, bool]]:
        """The gradients of `params`, their states (None where a parameter has none yet) and the
        scan of both (_scan)."""
        grads, states = [p.grad for p in params], [self.state.get(p) for p in params]
        return grads, states, _scan(params, grads, states)

    def _init_group(self, group: dict[str, Any], tensors: list, check_all: bool) -> tuple:
        """The per-parameter work of a step for one group, done eagerly (C++ batching where
        every state is already of the group's kind, a Python loop otherwise): checks the
        gradients (with ``check_all``, every group's, so a bad one anywhere stops the step before
        anything changes), makes missing state, and sorts the parameters into batches (one op call
        each; in a compiled step, one per COMPILED_CALL_PARAMS of a batch). Appends each batch's
        tensors to ``tensors`` and returns the values of ``self.args`` it used (checked with
        ``check_all``) and the batches' layout, constants. torch.compile runs
        this method eagerly, at trace time, instead of tracing it (torch._dynamo's OptimizerVariable
        does so for any optimizer's ``_init_group``), guards on what it read, and marks the state
        tensors static for CUDA graphs: the traced step holds only the ops, and compiles in a
        fraction of the time."""
        args = tuple(getattr(self.args, k) for k in ARGS_KEYS)
        if check_all:
            _validated(dict(zip(ARGS_KEYS, args)), f"{type(self).__name__}: args")  # may have changed since
            if self._bnb_overrides != bnb_overrides_key():  # (once per step; a compiled step: at its trace)
                self._read_overrides()
            # (each group's share of the check's scan: the later groups' calls of this step use theirs)
            self._step_gathered = self._check_params()
        gi = next(i for i, g in enumerate(self.param_groups) if g is group)
        overrides = self._current_overrides(gi)[gi]
        group_config = self._group_config(gi)
        # The batch key's options, for parameters without overrides (most): the same for the group.
        group_options = (group_config["percentile_clipping"], group_config["max_unorm"], group_config["skip_zeros"], ())
        params, all_states = group["params"], self.state
        grads, states, (unusual, any_strided) = self._step_gathered[gi]
        if gi == len(self.param_groups) - 1:
            self._step_gathered = None  # (holds the gradients: freed with them after the step)
        if unusual < 0 and not any(overrides):
            # Most steps: every state exists and is of the kind the group's options make; the
            # batches are made in C++ (the loop below costs about 1 us per parameter). None: the
            # loop decides.
            batched = _extension.host().batch_group(params, grads, states, group_config["amsgrad"],
                                                    group_options[0] < 100)
            if batched is not None:
                layout = []
                for lists, eight_bit, block_wise, strided in batched:
                    for values in lists:
                        tensors.extend(values)
                    key = (lists[0][0].device, eight_bit, group_config["amsgrad"], block_wise, *group_options)
                    layout.append((key, tuple(len(values) for values in lists), tuple(strided)))
                return args, tuple(layout)
        check_strides = any_strided or unusual >= 0  # (a scan that stopped early did not see every gradient)
        batches: dict[tuple, tuple[list, list[int]]] = {}
        for pi, (p, grad, state) in enumerate(zip(params, grads, states)):
            over = overrides[pi]
            config = {**group_config, **over} if over else group_config
            if state and config["amsgrad"] != ("state3" in state):  # amsgrad switched since the state was made
                # (also for a parameter skipped this step, so a checkpoint's states agree with its groups)
                self._switch_amsgrad(p, state, config["amsgrad"])
            if state and config["percentile_clipping"] >= 100 and "gnorm_vec" in state:
                # clipping turned off: its history goes (turned on again, it starts afresh; a checkpoint
                # agrees with the options)
                del state["gnorm_vec"]
            if grad is None:
                continue
            if not state:
                self._init_state(p, config)
                state = all_states[p]
            if over:
                # The group's hyperparameters are common to a batch (and left out of the key, to be read
                # by the traced step: a float lr here would be a constant); overridden ones are pinned.
                pinned = tuple((k, v) for k, v in over.items() if k in HYPER_KEYS)
                options = (config["percentile_clipping"], config["max_unorm"], config["skip_zeros"], pinned)
            else:
                options = group_options
            if options[0] < 100 and "gnorm_vec" not in state:  # clipping turned on after the state was made
                # Negative: unrecorded, so the op fills every slot with this step's norm, taken after
                # GradScaler's unscaling and over finite elements, as at step 1.
                state["gnorm_vec"] = torch.full((100,), -1.0, device=p.device)
            eight_bit = state["state1"].dtype is torch.uint8
            # The state's layout decides (a later override cannot reshape it).
            block_wise = not eight_bit or state["absmax1"].numel() != 1 or 0 < p.numel() <= BLOCK
            key = (p.device, eight_bit, "state3" in state, block_wise, *options)
            entry = batches.get(key)
            if entry is None:
                entry = batches[key] = ([], [])
            members, strided = entry
            if check_strides and grad.stride() != p.stride() and p.numel() > 1:
                strided.append(len(members))  # copied to p's layout by the step: the kernels walk both alike
            members.append((p, grad, state))
        layout = []
        for key, (members, strided) in batches.items():
            lists = _batch_lists(members, eight_bit=key[1], amsgrad=key[2], clipping=key[4] < 100)
            for values in lists:
                tensors.extend(values)
            layout.append((key, tuple(len(values) for values in lists), tuple(strided)))
        return args, tuple(layout)

    @torch.no_grad()
    def step(self, closure=None):
        """Performs one optimization step; parameters without a gradient are skipped."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        amp = _AmpState(getattr(self, "grad_scale", None), getattr(self, "found_inf", None))
        # opt.args may change between steps (bitsandbytes reads it at each one). _init_group returns
        # the values it used; branching on them below makes a compiled step guard on opt.args, so a
        # change retraces (and _init_group, run eagerly at trace time, checks the new values).
        args = tuple(getattr(self.args, k) for k in ARGS_KEYS)
        # Every group's hyperparameters are checked before anything changes (a scheduler or the user
        # may have set them since construction; the ops, called batch by batch, would only reject a
        # bad value after earlier batches were updated).
        for gi, group in enumerate(self.param_groups):
            check_hyperparameters(group["lr"], group["betas"], group["eps"], group["weight_decay"],
                                  f"{type(self).__name__}: group {gi}", read_tensors=False, amsgrad=group["amsgrad"])
            _check_torch_keys(group, f"{type(self).__name__}: group {gi}")
        for gi, group in enumerate(self.param_groups):
            tensors: list = []
            used, layout = self._init_group(group, tensors, gi == 0)
            if used != args:  # never eagerly: the same values, read twice in one step
                raise RuntimeError(f"{type(self).__name__}: opt.args changed during a step")
            if self._overrides_version != self._manager.version:  # (compiled: a guard, so new overrides retrace)
                raise RuntimeError("torchadam8: GlobalOptimManager overrides changed during a step")
            hyper = {k: group[k] for k in ("lr", "betas", "eps", "weight_decay")}
            pos = 0
            for key, counts, strided in layout:
                _, eight_bit, _, block_wise, clip, max_unorm, skip_zeros, pinned = key
                b = _Batch()
                for name, count in zip(_Batch.__slots__, counts):
                    setattr(b, name, tensors[pos:pos + count])
                    pos += count
                for i in strided:
                    b.grads[i] = torch.empty_like(b.params[i]).copy_(b.grads[i])
                size = COMPILED_CALL_PARAMS if torch.compiler.is_compiling() else len(b.params)
                for part in _split(b, size):
                    self._run_batch(part, {**hyper, **dict(pinned)}, eight_bit, block_wise, clip, max_unorm,
                                    skip_zeros, amp)
        return loss

    def _run_batch(self, b: _Batch, hyper: dict, eight_bit: bool, block_wise: bool, clip: int, max_unorm: float,
                   skip_zeros: bool, amp: _AmpState) -> None:
        """One op call: the update of a batch of parameters sharing their state kind and options."""
        device = b.params[0].device
        inv_scale, found_inf = amp.get(device) if amp else (None, None)
        if clip < 100:
            if inv_scale is not None:  # the norms of the history are of unscaled gradients
                torch._foreach_mul_(b.grads, inv_scale)
            scales = F.percentile_clipping(b.grads, b.gnorm_vecs, b.steps, clip)
        else:
            scales = None if inv_scale is None else inv_scale.reshape(1).expand(len(b.params)).contiguous()
        options = dict(lr=hyper["lr"], beta1=hyper["betas"][0], beta2=hyper["betas"][1], eps=hyper["eps"],
                       weight_decay=hyper["weight_decay"], gnorm_scales=scales, found_inf=found_inf,
                       max_unorm=max_unorm, skip_zeros=skip_zeros)
        paged = [t for t in (*b.state1, *b.state2, *b.state3) if isinstance(t, PagedTensor)] if self._paged else []
        if paged:
            torch.ops.adam8.prefetch(paged)
        if eight_bit:
            F.adam8bit(b.params, b.grads, b.state1, b.state2, b.steps, b.absmax1, b.absmax2, *self._qmap(device),
                       state3=b.state3, absmax3=b.absmax3, block_wise=block_wise, **options)
        else:
            F.adam(b.params, b.grads, b.state1, b.state2, b.steps, max_exp_avg_sqs=b.state3, **options)
        if paged and self._page_out_after_step:
            torch.ops.adam8.page_out(paged)

    # ------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """torch.optim's state_dict; paged states appear as their inner (managed-memory) tensors,
        so it saves and loads like any other (``torch.load(weights_only=True)`` included). The
        post-hooks see it so, and may return another dict, as with torch's optimizers."""
        post_hooks = self._optimizer_state_dict_post_hooks
        self._optimizer_state_dict_post_hooks = OrderedDict()  # (run below, after the unwrapping)
        try:
            state_dict = super().state_dict()
        finally:
            self._optimizer_state_dict_post_hooks = post_hooks
        state_dict["state"] = {i: {k: unwrap(v) for k, v in s.items()} for i, s in state_dict["state"].items()}
        for hook in post_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loads a state_dict of this class; a mismatch (group or parameter count, state shapes,
        dtypes, 8-bit vs 32-bit) raises ValueError and leaves the optimizer unchanged."""
        state_dict = state_dict.copy()  # (shallow, as torch's: a pre-hook may edit it, not the caller's)
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        state, groups = validated_state(self, state_dict)  # (a paged optimizer's large states paged again)
        self.state.clear()
        self.state.update(state)
        self.param_groups = groups
        self._read_overrides()
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


class PagedAdam(Adam):
    __doc__ = "Adam whose large states are paged (``is_paged`` is ignored: always on, as in bitsandbytes).\n\n" + (
        Adam.__doc__ or ""
    )
    _always_paged = True


class PagedAdam8bit(Adam8bit):
    __doc__ = "Adam8bit whose large states are paged (``is_paged`` is ignored: always on).\n\n" + (Adam.__doc__ or "")
    _always_paged = True


class PagedAdam32bit(Adam32bit):
    __doc__ = "Adam32bit whose large states are paged (``is_paged`` is ignored: always on).\n\n" + (Adam.__doc__ or "")
    _always_paged = True
