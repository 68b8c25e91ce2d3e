"""Checkpoints: state_dicts of bitsandbytes' Adam optimizers load into ours and training goes on as
it would have in bitsandbytes; state of another kind, foreign quantization maps and 8-bit codes in
another memory layout are refused with the optimizer untouched; the checks follow _state_spec."""

import copy

import pytest
import torch

from torchadam8 import Adam, Adam8bit, Adam32bit, dynamic_maps
from torchadam8.checkpoint import BNB_WRAPPER, validated_state

from conftest import through_torch_save

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes==0.50.2 is in the test extra")

# Below min_8bit_size (fp32 state even in 8-bit optimizers); a 2-D weight of 5120 values (20 whole
# blocks); and two sizes that are not multiples of 256 (a partial last block).
SHAPES = ((1000,), (64, 80), (4097,), (33, 130))
N, M = 20, 30  # steps in bitsandbytes before the checkpoint, then in both after it
HYPER = dict(lr=1e-3, betas=(0.9, 0.995), eps=1e-8, weight_decay=0.01)
# name: (bitsandbytes class, our class, extra constructor arguments of both, bits of the big params)
VARIANTS = {
    "Adam8bit": ("Adam8bit", Adam8bit, {}, 8),
    "Adam32bit": ("Adam32bit", Adam32bit, {}, 32),
    "Adam-optim_bits=8": ("Adam", Adam, {"optim_bits": 8}, 8),
}


def _data(seed=1234):
    """Parameters and N + M steps of gradients, the same on every run."""
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen) for s in SHAPES]
    grads = [[torch.randn(s, generator=gen) * 0.1 for s in SHAPES] for _ in range(N + M)]
    return params, grads


def _params(values):
    return [torch.nn.Parameter(v.clone()) for v in values]


def _run(opt, params, grads):
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()


def _bnb_checkpoint(variant):
    """bitsandbytes trained N steps: (its params, its optimizer, its state_dict after a
    torch.save / torch.load(weights_only=True) round trip, the remaining M steps of gradients)."""
    bnb_name, _, extra, _ = VARIANTS[variant]
    values, grads = _data()
    params = _params(values)
    opt = getattr(bnb.optim, bnb_name)(params, **HYPER, **extra)
    _run(opt, params, grads[:N])
    return params, opt, through_torch_save(opt.state_dict()), grads[N:]


def _ours(variant, params, **kwargs):
    _, cls, extra, _ = VARIANTS[variant]
    return cls(params, **{**HYPER, **extra, **kwargs})


def _snapshot(opt, params):
    return copy.deepcopy(([p.detach().clone() for p in params], opt.state_dict()))


def _assert_same(a, b):
    (pa, sa), (pb, sb) = a, b
    assert all(torch.equal(x, y) for x, y in zip(pa, pb))
    assert sa["param_groups"] == sb["param_groups"]
    assert sa["state"].keys() == sb["state"].keys()
    for k, state in sa["state"].items():
        assert state.keys() == sb["state"][k].keys()
        for key, v in state.items():
            assert torch.equal(v, sb["state"][k][key]), (k, key)


def _trained_ours(variant, steps=3):
    """One of our optimizers with state of its own (so a refused load has something to keep)."""
    values, grads = _data(seed=99)
    params = _params(values)
    opt = _ours(variant, params, lr=0.25)
    _run(opt, params, grads[:steps])
    return params, opt


def _errors(ours, theirs):
    err = (ours.detach() - theirs.detach()).abs()
    return err.max().item(), err.mean().item(), (err / (theirs.detach().abs() + 1e-8)).mean().item()


def _within_bnb_tolerance(bits, ours, theirs):
    """bitsandbytes' own parity tolerances (its tests/test_optim.py), for parameters of scale ~1:
    8-bit: mean abs error < 6e-5 and mean relative error < 6e-4; 32-bit: max abs error <= 1e-5 x
    the parameter's scale (its largest magnitude)."""
    max_err, mean_err, mean_rel = _errors(ours, theirs)
    if bits == 8:
        return mean_err < 6e-5 and mean_rel < 6e-4
    return max_err <= 1e-5 * theirs.detach().abs().max().item()


# ------------------------------------------------------------ bitsandbytes' layout
def test_bitsandbytes_state_dict_layout():
    """What the loader relies on, checked on a real bitsandbytes 0.50.2 checkpoint: every tensor of
    a parameter's state nested under __bnb_optimizer_quant_state__, step a Python int outside it,
    qmaps for 8-bit state only, AdEMAMix keys in the groups; and it survives weights_only=True."""
    for variant, (_, _, _, bits) in VARIANTS.items():
        params, _, sd, _ = _bnb_checkpoint(variant)
        assert sd["param_groups"][0].keys() == {"lr", "betas", "eps", "weight_decay", "alpha", "t_alpha",
                                                "t_beta3", "params"}
        assert sd["param_groups"][0]["params"] == [0, 1, 2, 3]
        for i, p in enumerate(params):
            state = sd["state"][i]
            assert state.keys() == {"step", BNB_WRAPPER}
            assert type(state["step"]) is int and state["step"] == N
            inner = state[BNB_WRAPPER]
            if bits == 8 and p.numel() >= 4096:
                assert inner.keys() == {"state1", "state2", "absmax1", "absmax2", "qmap1", "qmap2"}
                assert inner["state1"].dtype == torch.uint8
                assert inner["absmax1"].shape == ((p.numel() + 255) // 256,)
                assert torch.equal(inner["qmap1"], dynamic_maps()[0])
                assert torch.equal(inner["qmap2"], dynamic_maps()[1])
            else:
                assert inner.keys() == {"state1", "state2"}
                assert inner["state1"].dtype == torch.float32


# ------------------------------------------------------------ bitsandbytes -> ours
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_bitsandbytes_checkpoint_continues_as_in_bitsandbytes(variant):
    bits = VARIANTS[variant][3]
    bnb_params, bnb_opt, sd, later = _bnb_checkpoint(variant)
    params = _params([p.detach() for p in bnb_params])
    ours = _ours(variant, params, lr=0.5, weight_decay=0.0)  # the checkpoint's groups replace these
    ours.load_state_dict(sd)

    group = ours.param_groups[0]
    assert group["lr"] == HYPER["lr"] and group["weight_decay"] == HYPER["weight_decay"]
    assert tuple(group["betas"]) == HYPER["betas"] and group["params"] == params
    assert not {"alpha", "t_alpha", "t_beta3"} & group.keys()
    # Right after the load: bitsandbytes' state, value for value (codes and absmax included), in copies.
    for p, q in zip(params, bnb_params):
        mine, theirs = ours.state[p], bnb_opt.state[q]
        assert mine.keys() == ours._state_spec(p).keys()
        assert mine["step"].dtype == torch.float32 and mine["step"].shape == () and mine["step"].item() == N
        eight_bit = bits == 8 and p.numel() >= 4096
        assert mine["state1"].dtype == (torch.uint8 if eight_bit else torch.float32)
        for key in mine.keys() - {"step"}:
            assert torch.equal(mine[key], theirs[key]), key
            assert mine[key].data_ptr() != theirs[key].data_ptr(), key
        if eight_bit:
            assert (mine["state1"] != 127).float().mean() > 0.5  # real codes, not a fresh state

    fresh_params = _params([p.detach() for p in bnb_params])  # control: the same steps without the checkpoint
    fresh = _ours(variant, fresh_params)
    _run(bnb_opt, bnb_params, later)
    _run(ours, params, later)
    _run(fresh, fresh_params, later)

    for p, q, f in zip(params, bnb_params, fresh_params):
        assert int(ours.state[p]["step"].item()) == bnb_opt.state[q]["step"] == N + M
        max_err, mean_err, mean_rel = _errors(p, q)
        assert _within_bnb_tolerance(bits if p.numel() >= 4096 else 32, p, q), (
            list(p.shape), max_err, mean_err, mean_rel)
        # Without the checkpoint the same steps land far outside those tolerances: the check can fail.
        assert not _within_bnb_tolerance(bits, f, q), (list(p.shape), _errors(f, q))
        assert _errors(f, q)[1] > 20 * max(mean_err, 1e-7)


def test_bitsandbytes_checkpoint_saved_unwrapped_and_with_extra_keys_loads_the_same():
    """Older bitsandbytes saved the same keys without the nested dict; unorm_vec (the last step's
    update norm) and gnorm_vec (percentile clipping's history, not used here) are dropped."""
    _, _, sd, _ = _bnb_checkpoint("Adam8bit")
    params = _params(_data()[0])
    reference = _ours("Adam8bit", params)
    reference.load_state_dict(sd)

    variant = copy.deepcopy(sd)
    for state in variant["state"].values():
        state.update(state.pop(BNB_WRAPPER))
        state["unorm_vec"] = torch.tensor([3.5])
        state["gnorm_vec"] = torch.rand(100)
    assert "qmap1" in variant["state"][1] and BNB_WRAPPER not in variant["state"][1]
    twin = _ours("Adam8bit", params)
    twin.load_state_dict(variant)
    _assert_same(_snapshot(reference, params), _snapshot(twin, params))
    assert twin.state[params[1]].keys() == {"step", "state1", "state2", "absmax1", "absmax2"}
    assert twin.state[params[1]]["step"].item() == N


# ------------------------------------------------------------ refused, the optimizer untouched
def _swap_maps(sd):
    inner = sd["state"][1][BNB_WRAPPER]
    inner["qmap1"], inner["qmap2"] = inner["qmap2"].clone(), inner["qmap1"].clone()


def _nudge_one_entry(sd):
    inner = sd["state"][2][BNB_WRAPPER]
    inner["qmap1"] = inner["qmap1"].clone()
    inner["qmap1"][200] += 1e-3


def _short_map(sd):
    inner = sd["state"][3][BNB_WRAPPER]
    inner["qmap2"] = inner["qmap2"][:255].clone()


def _old_nonblockwise_keys(sd):
    sd["state"][1][BNB_WRAPPER]["max1"] = torch.ones(1)


@pytest.mark.parametrize(
    "breaker,regex",
    [
        (_nudge_one_entry, r"parameter 2 \(shape \[4097\]\): bitsandbytes' qmap1 \(the quantization map of state1\) "
                           r"differs from torchadam8's signed dynamic map in 1 of 256 entries \(first at index 200"),
        (_swap_maps, r"parameter 1 \(shape \[64, 80\]\): bitsandbytes' qmap1 .* differs from torchadam8's signed "
                     r"dynamic map in \d+ of 256 entries .* so the checkpoint is refused"),
        (_short_map, r"bitsandbytes' qmap2 must be a float32 tensor of shape \[256\], got torch.float32 \[255\]"),
        (_old_nonblockwise_keys, r"holds \['max1'\], bitsandbytes' non-blockwise 8-bit state"),
    ],
    ids=lambda x: getattr(x, "__name__", ""),
)
def test_bitsandbytes_checkpoint_with_a_foreign_map_is_refused_and_changes_nothing(breaker, regex):
    _, _, sd, _ = _bnb_checkpoint("Adam8bit")
    breaker(sd)
    params, ours = _trained_ours("Adam8bit")
    before = _snapshot(ours, params)
    with pytest.raises(ValueError, match=regex):
        ours.load_state_dict(sd)
    _assert_same(before, _snapshot(ours, params))
    assert ours.param_groups[0]["lr"] == 0.25


@pytest.mark.parametrize(
    "saved,loader,kwargs,regex",
    [
        ("Adam8bit", "Adam32bit", {}, r"parameter 1 \(shape \[64, 80\]\): the checkpoint holds 8-bit state but this "
                                      r"optimizer keeps 32-bit state for it"),
        ("Adam-optim_bits=8", "Adam32bit", {}, r"the checkpoint holds 8-bit state but this optimizer keeps 32-bit"),
        ("Adam32bit", "Adam8bit", {}, r"parameter 1 \(shape \[64, 80\]\): the checkpoint holds 32-bit state but "
                                      r"this optimizer keeps 8-bit state"),
        # the same kinds of optimizer, but another min_8bit_size: the 1000-value parameter differs
        ("Adam8bit", "Adam8bit", {"min_8bit_size": 512}, r"parameter 0 \(shape \[1000\]\): the checkpoint holds "
                                                         r"32-bit state but this optimizer keeps 8-bit state"),
    ],
)
def test_bitsandbytes_checkpoint_of_another_kind_is_refused_and_changes_nothing(saved, loader, kwargs, regex):
    _, _, sd, _ = _bnb_checkpoint(saved)
    values, grads = _data(seed=7)
    params = _params(values)
    ours = _ours(loader, params, lr=0.25, **kwargs)
    _run(ours, params, grads[:2])
    before = _snapshot(ours, params)
    with pytest.raises(ValueError, match=regex):
        ours.load_state_dict(sd)
    _assert_same(before, _snapshot(ours, params))


# ------------------------------------------------------------ layouts
def test_8bit_codes_are_refused_in_another_memory_order_and_fp32_moments_are_not():
    """Absmax blocks follow memory order: codes saved for a transposed (dense) parameter cannot be
    copied into a row-major one; fp32 moments can, and keep the new parameter's strides."""
    values = torch.randn(80, 64)

    def trained(cls, weight):
        params = [torch.nn.Parameter(weight)]
        opt = cls(params, lr=1e-2)
        params[0].grad = torch.randn_like(params[0])
        opt.step()
        return opt

    opt8 = trained(Adam8bit, values.clone().t())  # shape [64, 80], strides [1, 64]
    assert opt8.state[opt8.param_groups[0]["params"][0]]["state1"].stride() == (1, 64)
    sd8 = through_torch_save(opt8.state_dict())
    row_major = [torch.nn.Parameter(values.t().contiguous())]
    target = Adam8bit(row_major)
    with pytest.raises(ValueError, match=r"state1 holds 8-bit codes with strides \[1, 64\] but the parameter has "
                                         r"strides \[80, 1\]; their absmax blocks follow memory order"):
        target.load_state_dict(sd8)
    assert not target.state
    same_layout = [torch.nn.Parameter(values.clone().t())]
    twin = Adam8bit(same_layout)
    twin.load_state_dict(sd8)
    assert torch.equal(twin.state[same_layout[0]]["state1"], sd8["state"][0]["state1"])
    assert twin.state[same_layout[0]]["state1"].stride() == (1, 64)

    opt32 = trained(Adam32bit, values.clone().t())
    sd32 = through_torch_save(opt32.state_dict())
    target32 = Adam32bit(row_major)
    target32.load_state_dict(sd32)
    loaded = target32.state[row_major[0]]["state2"]
    assert loaded.stride() == (80, 1) and torch.equal(loaded, sd32["state"][0]["state2"])
    assert loaded.abs().sum() > 0


# ------------------------------------------------------------ the checks follow _state_spec
class _Amsgrad8bit(Adam8bit):
    """The spec of an 8-bit amsgrad optimizer with percentile clipping (only validated, never stepped)."""

    def _state_spec(self, p, config=None):
        spec = super()._state_spec(p, config)
        if spec["state1"][0] == torch.uint8:
            spec["state3"] = (torch.uint8, tuple(p.shape))
            spec["absmax3"] = (torch.float32, spec["absmax1"][1])
        else:
            spec["state3"] = (torch.float32, tuple(p.shape))
        spec["gnorm_vec"] = (torch.float32, (100,))
        return spec


def _spec_state(opt, p):
    return {k: (torch.full(shape, 3.0) if dtype == torch.float32 else torch.full(shape, 7, dtype=dtype))
            for k, (dtype, shape) in opt._state_spec(p).items()}


def test_validation_follows_the_state_spec():
    params = _params(_data()[0])
    opt = _Amsgrad8bit(params)
    sd = {"state": {i: _spec_state(opt, p) for i, p in enumerate(params)},
          "param_groups": [{**opt.defaults, "params": list(range(len(params)))}]}
    state, groups = validated_state(opt, sd)
    for p in params:
        assert state[p].keys() == opt._state_spec(p).keys() >= {"state3", "gnorm_vec"}
        assert state[p]["gnorm_vec"].shape == (100,) and state[p]["gnorm_vec"].sum().item() == 300.0
    assert state[params[1]]["absmax3"].shape == (20,) and state[params[1]]["state3"].dtype == torch.uint8

    # A bitsandbytes-style gnorm_vec is kept when the spec lists it.
    bnb_style = copy.deepcopy(sd)
    bnb_style["state"][1] = {"step": 4, BNB_WRAPPER: {k: v for k, v in sd["state"][1].items() if k != "step"}}
    bnb_style["state"][1][BNB_WRAPPER].update(qmap1=dynamic_maps()[0], qmap2=dynamic_maps()[1])
    state, _ = validated_state(opt, bnb_style)
    assert state[params[1]]["gnorm_vec"].sum().item() == 300.0 and state[params[1]]["step"].item() == 4.0

    no_amsgrad = copy.deepcopy(sd)
    del no_amsgrad["state"][1]["state3"], no_amsgrad["state"][1]["absmax3"]
    with pytest.raises(ValueError, match=r"parameter 1 .*expected state keys .*; this optimizer keeps state3, "
                                         r"amsgrad's running maximum"):
        validated_state(opt, no_amsgrad)
    # amsgrad's maximum and the history extra for an optimizer without either: loaded as saved (its next
    # step drops them)
    state, _ = validated_state(Adam8bit(params), sd)
    assert {"state3", "gnorm_vec"} <= state[params[1]].keys()
    # Percentile clipping's history missing or extra: accepted, as a step would make or drop it.
    no_history = copy.deepcopy(sd)
    del no_history["state"][2]["gnorm_vec"]
    state, _ = validated_state(opt, no_history)
    assert "gnorm_vec" not in state[params[2]] and "gnorm_vec" in state[params[1]]
    per_tensor = copy.deepcopy(sd)
    per_tensor["state"][1]["absmax3"] = torch.ones(1)
    with pytest.raises(ValueError, match=r"absmax3 must be a float32 tensor of shape \[20\], got torch.float32 \[1\] "
                                         r"\(one scale per tensor: saved with block_wise=False; not converted\)"):
        validated_state(opt, per_tensor)
    wrong_dtype = copy.deepcopy(sd)
    wrong_dtype["state"][0]["gnorm_vec"] = torch.ones(100, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"gnorm_vec must be a float32 tensor of shape \[100\], got torch.float64"):
        validated_state(opt, wrong_dtype)
    bad_step = copy.deepcopy(sd)
    bad_step["state"][0]["step"] = -1
    with pytest.raises(ValueError, match=r"step must be a tensor or a number >= 0, got -1"):
        validated_state(opt, bad_step)
