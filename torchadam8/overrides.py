"""Per-parameter optimizer overrides, used like bitsandbytes' ``GlobalOptimManager``."""

from __future__ import annotations

import math
import numbers
import sys
import weakref
from collections.abc import Mapping
from typing import Any

import torch
from torch.utils.weak import WeakIdKeyDictionary


def _int(v):
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _real(v):
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


_BOOL = (lambda v: isinstance(v, bool), "a bool", bool)
_NON_NEGATIVE = (lambda v: _real(v) and v >= 0, "a finite float >= 0", float)
# key -> (accepts(value), what a valid value is, normalize(value))
_RULES = {
    "optim_bits": (lambda v: _int(v) and v in (8, 32), "8 or 32", int),
    "min_8bit_size": (lambda v: _int(v) and v >= 0, "an int >= 0", int),
    "percentile_clipping": (lambda v: _int(v) and 0 <= v <= 100, "an int in 0..100", int),
    "block_wise": _BOOL,
    "max_unorm": _NON_NEGATIVE,
    "skip_zeros": _BOOL,
    "lr": _NON_NEGATIVE,
    "betas": (lambda v: isinstance(v, (tuple, list)) and len(v) == 2 and all(_real(b) and 0 <= b < 1 for b in v),
              "a pair (beta1, beta2), each in [0, 1)", lambda v: (float(v[0]), float(v[1]))),
    "eps": _NON_NEGATIVE,
    "weight_decay": _NON_NEGATIVE,
    "amsgrad": _BOOL,
}
ALLOWED_KEYS = tuple(_RULES)


def _validated(config: Any, where: str) -> dict:
    if not isinstance(config, Mapping):
        raise TypeError(f"{where}: the config must be a dict, got {type(config).__name__}")
    out = {}
    for key, value in config.items():
        if key not in _RULES:
            raise ValueError(f"{where}: unknown config key {key!r}; allowed keys: {', '.join(ALLOWED_KEYS)}")
        accepts, expected, normalize = _RULES[key]
        if not accepts(value):
            raise ValueError(f"{where}: {key} must be {expected}, got {value!r}")
        out[key] = normalize(value)
    return out


def shape_text(p: torch.Tensor):
    """p's shape for a message: a list, or "not yet known" for a lazy module's parameter before its
    first forward (reading its shape raises)."""
    return "not yet known" if torch.nn.parameter.is_lazy(p) else list(p.shape)


def _bnb_manager():
    """bitsandbytes' GlobalOptimManager when bitsandbytes is imported and its manager was made (never
    imports it), else None."""
    cls = getattr(sys.modules.get("bitsandbytes.optim.optimizer"), "GlobalOptimManager", None)
    return getattr(cls, "_instance", None)


def bnb_overrides_key() -> tuple:
    """A snapshot of bitsandbytes' manager's overrides, unequal to an earlier one whenever one changed
    (() when there are none): O(its entries), taken once per step."""
    mng = _bnb_manager()
    pids, triples = getattr(mng, "pid2config", None), getattr(mng, "module_weight_config_triple", None)
    if not pids and not triples:
        return ()
    return (tuple((pid, tuple(c.items())) for pid, c in pids.items()),
            tuple((id(m), a, tuple(c.items())) for m, a, c in triples))


# The keys bitsandbytes 0.50.2 reads per parameter (Optimizer8bit.get_config); it reads the others
# (percentile_clipping, block_wise, amsgrad) from the optimizer only.
_BNB_KEYS = ("optim_bits", "min_8bit_size", "max_unorm", "skip_zeros", "lr", "betas", "eps", "weight_decay")


def bnb_config(p: torch.Tensor) -> dict:
    """The overrides bitsandbytes' manager holds for p, as bitsandbytes applies them: a module
    override (``bnb.nn.StableEmbedding`` registers ``{"optim_bits": 32}`` for its weight) replaces
    override_config's dict, found by ``id(p)`` as bitsandbytes keys it (an entry left by a dead
    parameter applies to a new one that reuses its id, in bitsandbytes too). Only the keys it reads
    per parameter count; their values are checked as ours."""
    mng = _bnb_manager()
    if mng is None:
        return {}
    found = getattr(mng, "pid2config", {}).get(id(p))
    for module, attr, config in getattr(mng, "module_weight_config_triple", ()):
        if getattr(module, attr, None) is p:
            found = config
    if not found:
        return {}
    return _validated({k: v for k, v in found.items() if k in _BNB_KEYS},
                      f"bitsandbytes' GlobalOptimManager (its override for a parameter of shape {shape_text(p)})")


def _tensors(parameters: Any, where: str, groups: bool = False) -> list:
    """A tensor, or an iterable of tensors (of param-group dicts too when `groups`), as a list of tensors."""
    if isinstance(parameters, torch.Tensor):
        return [parameters]
    try:
        items = list(parameters)
    except TypeError:
        raise TypeError(f"{where}: expected a tensor or an iterable of tensors, "
                        f"got {type(parameters).__name__}") from None
    out = []
    for i, item in enumerate(items):
        if groups and isinstance(item, Mapping) and "params" in item:
            out.extend(_tensors(item["params"], f"{where}: param group {i}"))
        elif isinstance(item, torch.Tensor):
            out.append(item)
        else:
            raise TypeError(f"{where}: item {i} is a {type(item).__name__}, not a torch.Tensor")
    return out


class GlobalOptimManager:
    """Process-wide table of per-parameter optimizer config overrides (a singleton: use get_instance()).

    The same calls as bitsandbytes' GlobalOptimManager, with these differences on purpose:

    - Overrides are keyed by the parameter object itself, held weakly: they follow the parameter into any
      optimizer (two optimizers never collide, as bnb's (group index, parameter index) keys can), and an
      entry disappears with its parameter. ``nn.Module.cuda()/.to()`` keep the Parameter objects, so
      overrides survive them; ``t = t.cuda()`` on a plain tensor makes a new object, without overrides.
    - Keys and values are validated when the override is made: unknown keys (bnb accepts anything,
      silently ignoring typos) and bad values raise at once, never at step time.
    - Module overrides hold the module weakly and look ``getattr(module, param_name)`` up on every
      ``config_for``, so they follow a parameter re-assigned on the module.
    - Precedence: for the same key, a module override wins over override_config (as in bnb, whose first
      step replaces the parameter's entry with the module's config); unlike bnb, the other keys of
      override_config are kept (merged), not dropped. Among module overrides, the later registered wins.
    - bitsandbytes' own manager counts too, when bitsandbytes is imported: its overrides (those of
      ``bnb.nn.StableEmbedding`` and ``bnb.nn.Embedding`` included) apply as in bnb, under this
      manager's for the same key, so code that only swapped the optimizer's import keeps them.
    """

    _instance: GlobalOptimManager | None = None

    def __init__(self):
        raise RuntimeError("GlobalOptimManager is a singleton: call GlobalOptimManager.get_instance()")

    @classmethod
    def get_instance(cls) -> GlobalOptimManager:
        """The one manager of this process (made, empty, on the first call)."""
        if cls._instance is None:
            instance = cls.__new__(cls)
            instance.initialize()
            cls._instance = instance
        return cls._instance

    def initialize(self) -> None:
        """Forget every override and registered parameter (bnb's name; same as reset())."""
        self._params = WeakIdKeyDictionary()  # parameter -> its override_config dict
        self._modules = []  # [weakref(module), param_name, config], in registration order
        self._registered = WeakIdKeyDictionary()  # parameter -> True
        # Bumped by every change: optimizers re-read their parameters' overrides when it moves (so a
        # compiled step guards on one int instead of tracing the lookups).
        self.version = getattr(self, "version", 0) + 1

    reset = initialize

    def register_parameters(self, params) -> None:
        """Remember parameters: a tensor, an iterable of tensors, or of param-group dicts (as in bnb).

        Optional here: overrides are keyed by the parameter itself, so they work whether or not (and
        before or after) the parameters were registered. Kept for bitsandbytes compatibility.
        """
        for p in _tensors(params, "register_parameters", groups=True):
            self._registered[p] = True

    def is_registered(self, p: torch.Tensor) -> bool:
        """Whether register_parameters has seen `p` (and it is alive)."""
        return isinstance(p, torch.Tensor) and p in self._registered

    def override_config(self, parameters, key: str | None = None, value: Any = None,
                        key_value_dict: Mapping | None = None) -> None:
        """Override config keys for `parameters` (a tensor or an iterable of tensors).

        Give either `key` and `value`, or `key_value_dict`. A later call for the same parameter updates
        its earlier overrides key by key (as in bnb). Unlike bnb, the dict is copied (bnb stores and then
        mutates the caller's dict, shared by every parameter of the call), and a missing value, both forms
        at once, an unknown key or an invalid value raise ValueError. Keys: see ALLOWED_KEYS.
        """
        params = _tensors(parameters, "override_config")
        if key_value_dict is not None:
            if key is not None or value is not None:
                raise ValueError("override_config: pass either key and value, or key_value_dict, not both")
            config = key_value_dict
        elif key is None:
            raise ValueError("override_config: pass key and value, or key_value_dict")
        elif value is None:
            raise ValueError(f"override_config: key {key!r} was given without a value")
        else:
            config = {key: value}
        config = _validated(config, "override_config")
        for p in params:
            self._params.setdefault(p, {}).update(config)
        self.version += 1

    def register_module_override(self, module: torch.nn.Module, param_name: str, config: Mapping) -> None:
        """Override config keys for the tensor ``getattr(module, param_name)``, looked up when used.

        Unlike bnb (which resolves it once, at each optimizer's first step, and asserts there), the
        attribute must exist when registering, and the override follows whatever tensor the attribute
        holds at each config_for. Registering the same (module, param_name) again updates its keys.
        """
        if not isinstance(module, torch.nn.Module):
            raise TypeError(f"register_module_override: expected an nn.Module, got {type(module).__name__}")
        if not isinstance(param_name, str):
            raise TypeError(f"register_module_override: param_name must be a str, got {type(param_name).__name__}")
        if not isinstance(getattr(module, param_name, None), torch.Tensor):
            raise AttributeError(f"register_module_override: {type(module).__name__} module has no parameter "
                                 f"or tensor attribute {param_name!r}")
        config = _validated(config, f"register_module_override({type(module).__name__}.{param_name})")
        for ref, name, known in self._live_modules():
            if ref() is module and name == param_name:
                known.update(config)
                break
        else:
            self._modules.append([weakref.ref(module), param_name, config])
        self.version += 1

    def config_for(self, p: torch.Tensor) -> dict:
        """The override dict of parameter `p` ({} if none): bitsandbytes' manager's, then override_config's
        keys, then module overrides'.

        A fresh dict each call, holding only the overridden keys; the optimizer lays it over its own
        per-group and constructor values.
        """
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"config_for: expected a torch.Tensor, got {type(p).__name__}")
        config = bnb_config(p)
        config.update(self._params.get(p, ()))
        for ref, name, module_config in self._live_modules():
            if getattr(ref(), name, None) is p:
                config.update(module_config)
        return config

    def __len__(self) -> int:
        """How many live overrides there are: parameters with override_config, plus module overrides."""
        return len(self._params) + len(self._live_modules())

    def __bool__(self) -> bool:  # the manager is truthy even when empty (len() would make it falsy)
        return True

    def _live_modules(self) -> list:
        self._modules = [entry for entry in self._modules if entry[0]() is not None]
        return self._modules
