"""torchadam8.overrides.GlobalOptimManager: bitsandbytes' per-parameter override API, keyed by parameter."""

import gc
import math

import pytest
import torch
from torch import nn

from torchadam8.overrides import ALLOWED_KEYS, GlobalOptimManager


@pytest.fixture
def mng():
    manager = GlobalOptimManager.get_instance()
    manager.reset()
    yield manager
    manager.reset()


def param(*shape):
    return nn.Parameter(torch.randn(*shape or (4, 3)))


# ------------------------------------------------------------------ singleton
def test_singleton(mng):
    assert GlobalOptimManager.get_instance() is mng
    assert GlobalOptimManager.get_instance() is GlobalOptimManager.get_instance()


def test_direct_construction_refused():
    with pytest.raises(RuntimeError, match=r"get_instance\(\)"):
        GlobalOptimManager()


def test_initialize_and_reset_clear_everything(mng):
    for clear in (mng.initialize, mng.reset):
        p, lin = param(), nn.Linear(3, 2)
        mng.register_parameters([p])
        mng.override_config(p, "lr", 0.5)
        mng.register_module_override(lin, "weight", {"optim_bits": 32})
        assert len(mng) == 2 and mng.is_registered(p)
        clear()
        assert len(mng) == 0 and bool(mng)
        assert mng.config_for(p) == {} and mng.config_for(lin.weight) == {}
        assert not mng.is_registered(p)


# ------------------------------------------------------------ override_config
def test_key_value_form(mng):
    p, other = param(), param()
    mng.override_config(p, "optim_bits", 32)
    assert mng.config_for(p) == {"optim_bits": 32}
    assert mng.config_for(other) == {}


def test_dict_form_copies_the_dict(mng):
    p = param()
    kv = {"min_8bit_size": 0, "percentile_clipping": 5}
    mng.override_config([p], key_value_dict=kv)
    kv["min_8bit_size"] = 7  # the caller's dict is not stored
    assert mng.config_for(p) == {"min_8bit_size": 0, "percentile_clipping": 5}


def test_later_override_updates_key_by_key(mng):
    p = param()
    mng.override_config(p, "lr", 0.1)
    mng.override_config(p, key_value_dict={"lr": 0.2, "eps": 1e-6})
    mng.override_config(p, "optim_bits", 8)
    assert mng.config_for(p) == {"lr": 0.2, "eps": 1e-6, "optim_bits": 8}


def test_parameters_of_one_call_do_not_share_a_dict(mng):
    p1, p2 = param(), param()
    mng.override_config([p1, p2], key_value_dict={"optim_bits": 32})
    mng.override_config(p1, "lr", 0.3)
    assert mng.config_for(p1) == {"optim_bits": 32, "lr": 0.3}
    assert mng.config_for(p2) == {"optim_bits": 32}


def test_config_for_returns_a_fresh_dict(mng):
    p = param()
    mng.override_config(p, "lr", 0.1)
    mng.config_for(p)["lr"] = 9.0
    assert mng.config_for(p) == {"lr": 0.1}


@pytest.mark.parametrize("form", ["single tensor", "list", "tuple", "generator"])
def test_parameter_collections(mng, form):
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    params = list(model.parameters())
    arg = {
        "single tensor": params[0],
        "list": params,
        "tuple": tuple(params),
        "generator": model.parameters(),
    }[form]
    mng.override_config(arg, "weight_decay", 0.25)
    chosen = params[:1] if form == "single tensor" else params
    for p in params:
        assert mng.config_for(p) == ({"weight_decay": 0.25} if any(p is c for c in chosen) else {})
    assert len(mng) == len(chosen)  # a 2-D tensor was not iterated into its rows


def test_module_conversion_keeps_overrides(mng):
    model = nn.Sequential(nn.Linear(3, 4))
    mng.register_parameters(model.parameters())  # as bnb: register, move the model, then override
    model.to(torch.float64)
    mng.override_config(model[0].weight, "optim_bits", 32)
    model.to(torch.float32)
    assert model[0].weight.dtype == torch.float32
    assert mng.config_for(model[0].weight) == {"optim_bits": 32}
    assert mng.config_for(model[0].bias) == {}


def test_values_are_normalized(mng):
    p = param()
    mng.override_config(p, key_value_dict={"betas": [0, 0.5], "lr": 1, "max_unorm": 0, "eps": 0})
    config = mng.config_for(p)
    assert config == {"betas": (0.0, 0.5), "lr": 1.0, "max_unorm": 0.0, "eps": 0.0}
    assert type(config["betas"]) is tuple and type(config["lr"]) is float


def test_boundary_values_accepted(mng):
    p = param()
    good = {
        "optim_bits": 8, "min_8bit_size": 0, "percentile_clipping": 100, "block_wise": False,
        "max_unorm": 0.0, "skip_zeros": True, "lr": 0.0, "betas": (0.0, 0.999999),
        "eps": 0.0, "weight_decay": 0.0, "amsgrad": True,
    }
    assert set(good) == set(ALLOWED_KEYS)
    mng.override_config(p, key_value_dict=good)
    assert mng.config_for(p) == good
    mng.override_config(p, "percentile_clipping", 1)
    mng.override_config(p, "optim_bits", 32)
    assert mng.config_for(p)["percentile_clipping"] == 1 and mng.config_for(p)["optim_bits"] == 32


# ---------------------------------------------------------------- validation
BAD_VALUES = [
    ("optim_bits", 16, "optim_bits must be 8 or 32"),
    ("optim_bits", 8.0, "optim_bits must be 8 or 32"),
    ("min_8bit_size", -1, r"min_8bit_size must be an int >= 0"),
    ("min_8bit_size", 1.5, r"min_8bit_size must be an int >= 0"),
    ("percentile_clipping", -1, r"percentile_clipping must be an int in 0\.\.100"),
    ("percentile_clipping", 101, r"percentile_clipping must be an int in 0\.\.100"),
    ("percentile_clipping", True, r"percentile_clipping must be an int in 0\.\.100"),
    ("block_wise", 1, "block_wise must be a bool"),
    ("max_unorm", -0.1, r"max_unorm must be a finite float >= 0"),
    ("max_unorm", math.nan, r"max_unorm must be a finite float >= 0"),
    ("skip_zeros", "yes", "skip_zeros must be a bool"),
    ("lr", -1e-3, r"lr must be a finite float >= 0"),
    ("lr", math.inf, r"lr must be a finite float >= 0"),
    ("lr", "0.1", r"lr must be a finite float >= 0"),
    ("betas", (0.9,), r"betas must be a pair"),
    ("betas", (0.9, 1.0), r"betas must be a pair"),
    ("betas", (-0.1, 0.9), r"betas must be a pair"),
    ("betas", 0.9, r"betas must be a pair"),
    ("eps", -1e-8, r"eps must be a finite float >= 0"),
    ("weight_decay", -0.01, r"weight_decay must be a finite float >= 0"),
    ("amsgrad", 0, "amsgrad must be a bool"),
]


@pytest.mark.parametrize("key,value,message", BAD_VALUES, ids=[f"{k}={v!r}" for k, v, _ in BAD_VALUES])
def test_bad_values_raise_and_store_nothing(mng, key, value, message):
    p = param()
    with pytest.raises(ValueError, match=message):
        mng.override_config(p, key, value)
    with pytest.raises(ValueError, match=message):  # one bad key spoils the whole dict
        mng.override_config(p, key_value_dict={"eps": 1e-6, key: value})
    lin = nn.Linear(3, 2)
    with pytest.raises(ValueError, match=rf"Linear\.weight.*{message}"):
        mng.register_module_override(lin, "weight", {key: value})
    assert len(mng) == 0 and mng.config_for(p) == {} and mng.config_for(lin.weight) == {}


def test_unknown_key_lists_the_allowed_ones(mng):
    p = param()
    with pytest.raises(ValueError, match=r"unknown config key 'optim_bit'; allowed keys: optim_bits, min_8bit_size"):
        mng.override_config(p, "optim_bit", 8)
    with pytest.raises(ValueError, match=r"unknown config key 'momentum'.*amsgrad"):
        mng.register_module_override(nn.Linear(2, 2), "weight", {"momentum": 0.9})
    assert len(mng) == 0


@pytest.mark.parametrize("kwargs,message", [
    ({"key": "lr"}, r"key 'lr' was given without a value"),
    ({"value": 0.1}, r"pass key and value, or key_value_dict"),
    ({}, r"pass key and value, or key_value_dict"),
    ({"key": "lr", "value": 0.1, "key_value_dict": {"eps": 0.0}}, "not both"),
    ({"key": "lr", "key_value_dict": {"eps": 0.0}}, "not both"),
])
def test_key_value_misuse(mng, kwargs, message):
    p = param()
    with pytest.raises(ValueError, match=message):
        mng.override_config(p, **kwargs)
    assert mng.config_for(p) == {}


def test_non_tensors_raise_type_error(mng):
    p = param()
    with pytest.raises(TypeError, match=r"override_config: expected a tensor or an iterable of tensors, got int"):
        mng.override_config(3, "lr", 0.1)
    with pytest.raises(TypeError, match=r"override_config: item 1 is a str, not a torch\.Tensor"):
        mng.override_config([p, "fc1.weight"], "lr", 0.1)
    assert mng.config_for(p) == {}  # nothing stored for the valid one either
    with pytest.raises(TypeError, match=r"override_config: item 0 is a dict"):
        mng.override_config([{"params": [p]}], "lr", 0.1)
    with pytest.raises(TypeError, match=r"register_parameters: item 0 is a float"):
        mng.register_parameters([1.0])
    with pytest.raises(TypeError, match=r"register_parameters: param group 0: item 1 is a NoneType"):
        mng.register_parameters([{"params": [p, None]}])
    with pytest.raises(TypeError, match=r"config_for: expected a torch\.Tensor, got str"):
        mng.config_for("fc1.weight")
    with pytest.raises(TypeError, match=r"the config must be a dict, got list"):
        mng.override_config(p, key_value_dict=[("lr", 0.1)])


def test_module_override_needs_an_existing_tensor_attribute(mng):
    with pytest.raises(AttributeError, match=r"Linear module has no parameter or tensor attribute 'wieght'"):
        mng.register_module_override(nn.Linear(3, 2), "wieght", {"optim_bits": 32})
    with pytest.raises(AttributeError, match=r"Linear module .* attribute 'bias'"):  # bias=False: it is None
        mng.register_module_override(nn.Linear(3, 2, bias=False), "bias", {"optim_bits": 32})
    with pytest.raises(TypeError, match=r"expected an nn\.Module, got Parameter"):
        mng.register_module_override(param(), "weight", {"optim_bits": 32})
    with pytest.raises(TypeError, match=r"param_name must be a str, got int"):
        mng.register_module_override(nn.Linear(3, 2), 0, {"optim_bits": 32})
    assert len(mng) == 0


# ----------------------------------------------------------- module overrides
def test_module_override_resolved_lazily(mng):
    emb = nn.Embedding(10, 4)
    mng.register_module_override(emb, "weight", {"optim_bits": 32})
    old = emb.weight
    assert mng.config_for(old) == {"optim_bits": 32}
    emb.weight = nn.Parameter(torch.randn(10, 4))  # re-assigned: the override follows the attribute
    assert mng.config_for(emb.weight) == {"optim_bits": 32}
    assert mng.config_for(old) == {}


def test_module_override_registered_before_the_parameter_changes_is_per_attribute(mng):
    lin = nn.Linear(3, 2)
    mng.register_module_override(lin, "weight", {"lr": 0.5})
    assert mng.config_for(lin.weight) == {"lr": 0.5}
    assert mng.config_for(lin.bias) == {}


def test_module_override_wins_over_override_config_and_keys_merge(mng):
    for module_first in (True, False):
        mng.reset()
        lin = nn.Linear(3, 2)
        calls = [
            lambda: mng.register_module_override(lin, "weight", {"optim_bits": 32, "eps": 1e-5}),
            lambda: mng.override_config(lin.weight, key_value_dict={"optim_bits": 8, "lr": 0.1}),
        ]
        for call in calls if module_first else calls[::-1]:
            call()
        assert mng.config_for(lin.weight) == {"optim_bits": 32, "eps": 1e-5, "lr": 0.1}


def test_module_override_registered_again_updates(mng):
    lin = nn.Linear(3, 2)
    mng.register_module_override(lin, "weight", {"optim_bits": 32, "lr": 0.1})
    mng.register_module_override(lin, "weight", {"lr": 0.2})
    assert mng.config_for(lin.weight) == {"optim_bits": 32, "lr": 0.2}
    assert len(mng) == 1


def test_tied_parameter_later_module_override_wins(mng):
    emb, head = nn.Embedding(10, 4), nn.Linear(4, 10, bias=False)
    head.weight = emb.weight
    mng.register_module_override(emb, "weight", {"optim_bits": 32, "lr": 0.1})
    mng.register_module_override(head, "weight", {"lr": 0.2})
    assert mng.config_for(emb.weight) == {"optim_bits": 32, "lr": 0.2}


# --------------------------------------------------------------- weak references
def test_dead_parameter_entry_disappears(mng):
    keep, p = param(), param()
    mng.override_config([keep, p], "lr", 0.1)
    assert len(mng) == 2
    del p
    gc.collect()
    assert len(mng) == 1
    assert mng.config_for(keep) == {"lr": 0.1}


def test_dead_module_entry_disappears(mng):
    lin, kept = nn.Linear(3, 2), nn.Linear(3, 2)
    mng.register_module_override(lin, "weight", {"optim_bits": 32})
    mng.register_module_override(kept, "weight", {"optim_bits": 8})
    weight = lin.weight  # the parameter outlives its module: its module override goes with the module
    assert len(mng) == 2 and mng.config_for(weight) == {"optim_bits": 32}
    del lin
    gc.collect()
    assert len(mng) == 1
    assert mng.config_for(weight) == {}
    assert mng.config_for(kept.weight) == {"optim_bits": 8}


# ------------------------------------------------------------ register_parameters
def test_register_parameters_forms_and_is_optional(mng):
    a, b, c, d = param(), param(), param(), param()
    mng.register_parameters([a])
    mng.register_parameters([{"params": [b]}, {"params": c, "lr": 0.1}])
    mng.register_parameters(p for p in [a])
    assert [mng.is_registered(p) for p in (a, b, c, d)] == [True, True, True, False]
    mng.override_config([a, d], "lr", 0.3)  # d was never registered: the override applies all the same
    assert mng.config_for(a) == {"lr": 0.3} and mng.config_for(d) == {"lr": 0.3}


def test_two_optimizers_do_not_collide(mng):
    # bnb keys overrides by (group index, parameter index): a0 and b0 are both (0, 0) in their optimizers.
    a = [param(), param()]
    b = [param(), param()]
    mng.override_config(a[0], "optim_bits", 32)
    mng.register_parameters(a)
    mng.register_parameters(b)
    mng.override_config(b[0], "lr", 0.5)
    assert mng.config_for(a[0]) == {"optim_bits": 32}
    assert mng.config_for(b[0]) == {"lr": 0.5}
    assert mng.config_for(a[1]) == {} and mng.config_for(b[1]) == {}


# ------------------------------------------------------------------ bitsandbytes' own manager
def test_bitsandbytes_manager_overrides_apply_after_an_import_swap(mng):
    """Code that swapped only the optimizer's import keeps bitsandbytes' overrides: bnb.nn.StableEmbedding
    registers {"optim_bits": 32} for its weight with bitsandbytes' manager, and bnb's documented order
    (optimizer first, then override_config) takes effect at the next eager step, as in bitsandbytes.
    Keys torchadam8 does not know are ignored, as bitsandbytes ignores keys an optimizer does not read;
    a bad value of a known key is refused, naming bitsandbytes' manager."""
    bnb = pytest.importorskip("bitsandbytes")
    from torchadam8 import Adam8bit

    bnb_mng = bnb.optim.GlobalOptimManager.get_instance()
    bnb_mng.initialize()
    try:
        emb, lin, head = bnb.nn.StableEmbedding(1000, 64), nn.Linear(64, 64), nn.Linear(64, 80)
        opt = Adam8bit([*emb.parameters(), *lin.parameters(), *head.parameters()], lr=1e-3)
        bnb_mng.override_config(head.weight, key_value_dict={"optim_bits": 32, "t_alpha": 5})
        head(lin(emb(torch.randint(0, 1000, (32,))))).square().mean().backward()
        opt.step()
        assert opt.state[emb.weight]["state1"].dtype == torch.float32
        assert opt.state[head.weight]["state1"].dtype == torch.float32
        assert opt.state[lin.weight]["state1"].dtype == torch.uint8
        assert mng.config_for(emb.weight) == {"optim_bits": 32} and len(mng) == 0
        mng.override_config(head.weight, "lr", 0.5)  # ours on top, key by key
        assert mng.config_for(head.weight) == {"optim_bits": 32, "lr": 0.5}
        bnb_mng.override_config(lin.weight, "optim_bits", 7)
        with pytest.raises(ValueError, match=r"bitsandbytes' GlobalOptimManager .*\[64, 64\].*optim_bits must be 8 "
                                             r"or 32, got 7"):
            mng.config_for(lin.weight)
        bnb_mng.override_config(lin.weight, key_value_dict={"optim_bits": 8, "percentile_clipping": 5})
        assert mng.config_for(lin.weight) == {"optim_bits": 8}  # (bnb reads percentile_clipping per optimizer)

        # A checkpoint saved while the embedding had 8-bit state (before bnb's manager counted): the
        # refusal names the override and how to keep the checkpoint's kind
        saved = Adam8bit(emb.parameters(), min_8bit_size=0)
        mng.override_config(emb.weight, "optim_bits", 8)
        emb(torch.randint(0, 1000, (4,))).sum().backward()
        saved.step()
        state = saved.state_dict()
        mng.reset()
        with pytest.raises(ValueError, match=r"holds 8-bit state but this optimizer keeps 32-bit .*optim_bits=32 comes "
                                             r"from bitsandbytes' GlobalOptimManager .*override_config\(param, "
                                             r"'optim_bits', 8\)"):
            Adam8bit(emb.parameters(), min_8bit_size=0).load_state_dict(state)
        mng.override_config(emb.weight, "optim_bits", 8)
        Adam8bit(emb.parameters(), min_8bit_size=0).load_state_dict(state)

        lazy = nn.LazyLinear(4)  # an uninitialized parameter with a bnb override
        bnb_mng.override_config(lazy.weight, "optim_bits", 32)
        opt = Adam8bit(lazy.parameters(), min_8bit_size=0)
        lazy(torch.randn(2, 3)).sum().backward()
        opt.step()
        assert opt.state[lazy.weight]["state1"].dtype == torch.float32
    finally:
        bnb_mng.initialize()
