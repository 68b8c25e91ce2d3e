"""The optimizer classes: signature, parity with torch.optim.AdamW and bitsandbytes, dtypes,
checkpoints, and bad input (a clear error, the optimizer untouched)."""

import copy
import io
import math
import inspect
import pickle
import sys
import threading
from types import SimpleNamespace

import pytest
import torch

import torchadam8
from ops_registry.adam import adam_reference
from ops_registry.testing import EPS, assert_close_scaled
from torchadam8 import Adam, Adam8bit, Adam32bit, GlobalOptimManager, PagedAdam, PagedAdam8bit, PagedAdam32bit

from conftest import copies, set_grads, set_twin_grads, step_both, through_torch_save

CLASSES = [Adam, Adam8bit, Adam32bit]
# Tests of the C++ scan of a step (csrc/host.cpp), which a library built without Python headers lacks
needs_scan = pytest.mark.skipif(torchadam8._extension.host() is None, reason="the kernel library was built "
                                "without its Python module (no Python headers): steps use the Python checks alone")
SEED_SIGNATURE = (
    "(params, lr=0.001, betas=(0.9, 0.999), eps=1e-08, weight_decay=0, amsgrad=False, optim_bits=32, "
    "args=None, min_8bit_size=4096, percentile_clipping=100, block_wise=True, is_paged=False)"
)


def make_params(shapes=((64, 128), (300,), (17,), (0,)), dtype=torch.float32, device="cpu"):
    return [torch.nn.Parameter(torch.randn(s, dtype=dtype, device=device)) for s in shapes]


def snapshot(opt, params):
    return copy.deepcopy(([p.detach().clone() for p in params], opt.state_dict()))


def assert_same(a, b):
    (pa, sa), (pb, sb) = a, b
    for x, y in zip(pa, pb):
        assert torch.equal(x, y)
    assert sa["param_groups"] == sb["param_groups"]
    assert sa["state"].keys() == sb["state"].keys()
    for k in sa["state"]:
        for key, v in sa["state"][k].items():
            assert torch.equal(v, sb["state"][k][key]), key


@pytest.mark.parametrize("cls", CLASSES + [PagedAdam, PagedAdam8bit, PagedAdam32bit], ids=lambda c: c.__name__)
def test_signature_is_the_seeds(cls):
    # bitsandbytes' signature, then our one keyword-only addition
    extra = ", *, page_out_after_step=False)"
    assert str(inspect.signature(cls.__init__)).replace("self, ", "") == SEED_SIGNATURE[:-1] + extra


def test_adam32bit_matches_torch_adamw_100_steps():
    torch.manual_seed(0)
    params = make_params()
    ref = copies(params)
    ours = Adam32bit(params, lr=3e-3, betas=(0.9, 0.99), eps=1e-7, weight_decay=0.1)
    theirs = torch.optim.AdamW(ref, lr=3e-3, betas=(0.9, 0.99), eps=1e-7, weight_decay=0.1)
    step_both(100, params, ours.step, ref, theirs.step)
    for p, r in zip(params, ref):
        if p.numel():
            assert (p - r).abs().max() <= 1e-5 * r.detach().abs().max(), p.shape


def test_state_kinds_follow_optim_bits_and_min_8bit_size():
    params = make_params(((5000,), (4095,), (4096,)))
    set_grads(params)
    opt8 = Adam8bit(params)
    opt8.step()
    kinds = [opt8.state[p]["state1"].dtype for p in params]
    assert kinds == [torch.uint8, torch.float32, torch.uint8]
    assert opt8.state[params[0]]["absmax1"].shape == (20,)  # ceil(5000 / 256)
    for cls, bits in ((Adam, 32), (Adam32bit, 32)):
        opt = cls(params)
        opt.step()
        assert all(opt.state[p]["state1"].dtype == torch.float32 for p in params), cls
    opt = Adam(params, optim_bits=8, min_8bit_size=4095)
    opt.step()
    assert [opt.state[p]["state1"].dtype for p in params] == [torch.uint8] * 3


def test_8bit_state_bytes_per_parameter():
    params = make_params(((4096,), (1_000_003,)))
    set_grads(params)
    opt = Adam8bit(params)
    opt.step()
    for p in params:
        nbytes = sum(v.numel() * v.element_size() for v in opt.state[p].values())
        assert nbytes / p.numel() <= 2.05, (p.numel(), nbytes / p.numel())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("cls", [Adam8bit, Adam32bit], ids=lambda c: c.__name__)
def test_half_precision_parameters(cls, dtype):
    """fp16/bf16 parameters, gradients in their dtype, math in fp32: against the fp64 reference
    (for 8-bit, against 32-bit state, within the quantization error)."""
    params = make_params(((70, 90), (33,)), dtype=dtype)
    shadow = [p.detach().clone() for p in params]
    m = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    v = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    steps = [torch.zeros(()) for _ in params]
    opt = cls(params, lr=1e-2, weight_decay=0.01)
    for _ in range(10):
        set_grads(params)
        betas = torch.tensor([0.9, 0.999], dtype=torch.float64)
        adam_reference(shadow, [p.grad for p in params], m, v, [], steps, torch.tensor(1e-2), betas, None, None, 1e-8,
                       0.01, 0.0, False)
        opt.step()
    rtol = 2 * EPS[dtype] if cls is Adam32bit else 0.05
    for p, s in zip(params, shadow):
        assert p.dtype == dtype
        assert_close_scaled(p.detach(), s, rtol=rtol, scale_tol=1e-3 if cls is Adam8bit else 1e-5, what=str(p.shape))


def test_mixed_groups_tensor_lr_and_layouts():
    conv = torch.nn.Conv2d(8, 16, 5).to(memory_format=torch.channels_last)
    extra = make_params(((4096,),), dtype=torch.bfloat16)
    groups = [{"params": conv.parameters(), "lr": torch.tensor(1e-2)}, {"params": extra, "weight_decay": 0.1}]
    opt = Adam8bit(groups, min_8bit_size=1000)
    conv(torch.randn(2, 8, 12, 12).to(memory_format=torch.channels_last)).sum().backward()
    set_grads(extra)
    before = conv.weight.detach().clone()
    opt.step()
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert opt.state[conv.weight]["state1"].stride() == conv.weight.stride()
    assert not torch.equal(before, conv.weight)
    assert int(opt.state[extra[0]]["step"]) == 1


def test_parameters_without_grad_are_skipped_and_empty_ones_work():
    params = make_params(((10,), (0,), (5000,)))
    params[0].grad = torch.randn(10)
    params[1].grad = torch.randn(0)
    opt = Adam8bit(params)
    before = params[2].detach().clone()
    opt.step()
    opt.step()
    assert params[2] not in opt.state and torch.equal(params[2], before)
    assert opt.state[params[0]]["step"].item() == 2
    assert opt.state[params[1]]["state1"].numel() == 0


@pytest.mark.parametrize("block_wise", [True, False])
def test_empty_parameters_with_8bit_state(block_wise):
    """Zero-size parameters given 8-bit state (min_8bit_size=0), block-wise or with one scale per
    tensor: the step leaves them empty, advances their step counts, and updates the others."""
    params = make_params(((0,), (3, 0), (500,)))
    opt = Adam8bit(params, min_8bit_size=0, block_wise=block_wise)
    set_grads(params)
    before = params[2].detach().clone()
    opt.step()
    opt.step()
    assert [opt.state[p]["step"].item() for p in params] == [2.0, 2.0, 2.0]
    assert opt.state[params[0]]["state1"].dtype == torch.uint8 and params[1].shape == (3, 0)
    assert (params[2] != before).all()


def test_complete_args_object_is_read_at_each_step():
    """As in bitsandbytes, an args object with every option is kept: changing it changes the next
    step (here, percentile clipping turned on makes its history); a partial one completes a copy."""
    params = make_params(((5000,),))
    args = SimpleNamespace(optim_bits=8, min_8bit_size=4096, percentile_clipping=100, block_wise=True,
                           max_unorm=0.0, skip_zeros=False)
    opt = Adam8bit(params, args=args)
    assert opt.args is args
    set_grads(params)
    opt.step()
    assert "gnorm_vec" not in opt.state[params[0]]
    args.percentile_clipping = 5
    opt.step()
    assert "gnorm_vec" in opt.state[params[0]]
    args.percentile_clipping = 101
    with pytest.raises(ValueError, match="percentile_clipping must be an int in 0..100, got 101"):
        opt.step()
    partial = SimpleNamespace(min_8bit_size=10)
    opt = Adam8bit(params, args=partial)
    assert opt.args is not partial and opt.args.min_8bit_size == 10 and opt.args.optim_bits == 8


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copy_of_an_optimizer_keeping_a_user_args_object(how):
    """A kept args object need not pickle or deep-copy (a local class, holding a lock): a copy
    carries the options' values instead, and is independent of the user's object."""
    class Args:
        optim_bits, min_8bit_size, percentile_clipping, block_wise, max_unorm, skip_zeros = 8, 256, 5, True, 0.0, False

    args = Args()
    args.lock = threading.Lock()
    params = make_params(((500,),))
    opt = Adam8bit(params, args=args)
    set_grads(params)
    opt.step()
    twin = copy.deepcopy(opt) if how == "deepcopy" else pickle.loads(pickle.dumps(opt))
    assert twin.args is not args and twin.args.percentile_clipping == 5 and twin.args.min_8bit_size == 256
    args.percentile_clipping = 100
    assert twin.args.percentile_clipping == 5


def test_args_object_replaces_constructor_values():
    params = make_params(((300,), (100,)))
    set_grads(params)
    args = SimpleNamespace(optim_bits=8, min_8bit_size=200, percentile_clipping=100, block_wise=True)
    opt = Adam(params, optim_bits=32, args=args)
    opt.step()
    assert [opt.state[p]["state1"].dtype for p in params] == [torch.uint8, torch.float32]


def test_closure_and_functional_api_agree():
    params = make_params(((600,),))
    twin = copies(params)
    opt = Adam8bit(params, min_8bit_size=1, lr=1e-2)
    x = torch.randn(600)

    def closure():
        opt.zero_grad()
        loss = (params[0] * x).square().sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert loss.item() > 0
    g = 2 * (twin[0] * x) * x
    s1, s2 = torch.zeros(600, dtype=torch.uint8), torch.zeros(600, dtype=torch.uint8)
    a1, a2, step = torch.zeros(3), torch.zeros(3), torch.zeros(())
    torchadam8.functional.adam8bit(
        [twin[0].data], [g.detach()], [s1], [s2], [step], [a1], [a2], *torchadam8.dynamic_maps(),
        lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
    )
    assert torch.equal(twin[0], params[0])
    assert torch.equal(s1, opt.state[params[0]]["state1"])


@pytest.mark.parametrize("fn", ["adam", "adam8bit"])
@pytest.mark.parametrize("key,value,message", [
    ("lr", -1e-3, "Invalid learning rate: -0.001"),
    ("lr", torch.tensor([1e-3, 2e-3]), r"Invalid learning rate: a tensor of shape \[2\]"),
    ("lr", None, "Invalid learning rate: None; expected a real number or a one-element tensor"),
    ("beta1", None, "Invalid beta parameter at index 0: None"),
    ("beta2", 1.0, "Invalid beta parameter at index 1: 1.0"),
    ("eps", -1e-8, "Invalid epsilon value: -1e-08"),
    ("weight_decay", "0.1", "Invalid weight_decay value: '0.1'; expected a real number"),
])
def test_functional_api_refuses_bad_hyperparameters_before_any_change(fn, key, value, message):
    p, g = torch.randn(300), torch.randn(300)
    steps = [torch.zeros(())]
    if fn == "adam":
        states = [torch.zeros(300)], [torch.zeros(300)]
        call = lambda **kw: torchadam8.functional.adam([p], [g], *states, steps, **kw)  # noqa: E731
    else:
        states = [torch.zeros(300, dtype=torch.uint8)], [torch.zeros(300, dtype=torch.uint8)]
        call = lambda **kw: torchadam8.functional.adam8bit(  # noqa: E731
            [p], [g], *states, steps, [torch.zeros(2)], [torch.zeros(2)], *torchadam8.dynamic_maps(), **kw)
    before = p.clone()
    kwargs = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0)
    kwargs[key] = value
    with pytest.raises(ValueError, match=f"torchadam8.functional.{fn}: {message}"):
        call(**kwargs)
    assert torch.equal(p, before) and steps[0].item() == 0.0
    kwargs[key] = torch.tensor(0.5) if key in ("lr", "beta1", "beta2") else 0.0  # a tensor's value is not read
    call(**kwargs)
    assert steps[0].item() == 1.0 and not torch.equal(p, before)


# ------------------------------------------------------------ bitsandbytes parity (CPU)
def test_dynamic_maps_equal_bitsandbytes_for_every_argument_it_accepts():
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes==0.50.2 is in the test extra")
    compared = 0
    for signed in (True, False):
        for total_bits in range(2, 9):
            for max_exponent_bits in range(1, 9):
                args = (signed, max_exponent_bits, total_bits)
                try:
                    theirs = bnb.functional.create_dynamic_map(*args)
                except AssertionError:  # not 2**total_bits values
                    with pytest.raises(ValueError, match="instead of"):
                        torchadam8.create_dynamic_map(*args)
                    continue
                assert torch.equal(torchadam8.create_dynamic_map(*args), theirs), args
                compared += 1
    assert compared >= 40  # (the default maps among them)


@pytest.mark.parametrize("bits", [8, 32])
def test_parity_with_bitsandbytes_50_steps(bits):
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes==0.50.2 is in the test extra")
    torch.manual_seed(1)
    shapes = ((256, 129), (4097,), (1000,))
    params = make_params(shapes)
    theirs_params = copies(params)
    ours = (Adam8bit if bits == 8 else Adam32bit)(params, lr=1e-3, weight_decay=0.01)
    theirs = (bnb.optim.Adam8bit if bits == 8 else bnb.optim.Adam32bit)(theirs_params, lr=1e-3, weight_decay=0.01)
    step_both(50, params, ours.step, theirs_params, theirs.step)
    for p, q in zip(params, theirs_params):
        err = (p - q).abs()
        if bits == 8:  # bitsandbytes' own 8-bit tolerances
            assert err.mean() < 6e-5 and (err / (q.abs() + 1e-8)).mean() < 6e-4, (err.mean(), p.shape)
        else:
            torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)
    for p, q in zip(params, theirs_params):
        mine, theirs_state = ours.state[p], theirs.state[q]
        assert mine["state1"].dtype == theirs_state["state1"].dtype
        assert int(mine["step"]) == theirs_state["step"] == 50


# ------------------------------------------------------------ checkpoints
@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_state_dict_round_trip_through_torch_save(cls):
    params = make_params(((5000,), (3, 7)), dtype=torch.bfloat16)
    opt = cls(params, lr=1e-2, optim_bits=8 if cls is Adam else 32, min_8bit_size=16)
    for _ in range(3):
        set_grads(params)
        opt.step()
    loaded = through_torch_save(opt.state_dict())
    twin_params = copies(params)
    twin = cls(twin_params, lr=0.5, optim_bits=8 if cls is Adam else 32, min_8bit_size=16)
    twin.load_state_dict(loaded)
    assert twin.param_groups[0]["lr"] == 1e-2
    step_both(5, params, opt.step, twin_params, twin.step)
    assert_same(snapshot(opt, params), snapshot(twin, twin_params))


def _trained(cls=Adam8bit, shapes=((5000,), (3, 7))):
    params = make_params(shapes)
    opt = cls(params)
    set_grads(params)
    opt.step()
    return params, opt


def _broken_state_dicts():
    def shape(sd):
        sd["state"][0]["state1"] = sd["state"][0]["state1"][:100]

    def groups(sd):
        sd["param_groups"].append(dict(sd["param_groups"][0]))

    def count(sd):
        sd["param_groups"][0]["params"] = sd["param_groups"][0]["params"][:1]

    def absmax(sd):
        sd["state"][0]["absmax1"] = torch.zeros(3)

    def dtype(sd):
        sd["state"][1]["state2"] = sd["state"][1]["state2"].double()

    def missing(sd):
        del sd["state"][1]["step"]

    def betas(sd):
        sd["param_groups"][0]["betas"] = (0.9,)

    def lr(sd):
        sd["param_groups"][0]["lr"] = -1.0

    def beta_tensor(sd):
        sd["param_groups"][0]["betas"] = (torch.tensor([0.9, 0.8]), 0.999)

    return [
        (shape, r"state1 has shape \[100\] but the parameter has shape \[5000\]"),
        (groups, r"has 2 parameter groups but the optimizer has 1"),
        (count, r"group 0 of the loaded state dict has 1 parameters but the optimizer's group 0 has 2"),
        (absmax, r"absmax1 must be a float32 tensor of shape \[20\]"),
        (dtype, r"state2 has dtype torch.float64; expected torch.float32"),
        (missing, r"expected state keys \['state1', 'state2', 'step'\]"),
        (betas, r"group 0 of the loaded state dict: Invalid betas: \(0.9,\); expected a pair"),
        (lr, r"group 0 of the loaded state dict: Invalid learning rate: -1.0"),
        (beta_tensor, r"group 0 of the loaded state dict: Invalid beta parameter at index 0: a tensor of shape \[2\]"),
    ]


@pytest.mark.parametrize("breaker,regex", _broken_state_dicts(), ids=lambda x: getattr(x, "__name__", ""))
def test_mismatched_state_dict_is_refused_and_changes_nothing(breaker, regex):
    params, opt = _trained()
    sd = copy.deepcopy(opt.state_dict())
    breaker(sd)
    before = snapshot(opt, params)
    with pytest.raises(ValueError, match=regex):
        opt.load_state_dict(sd)
    assert_same(before, snapshot(opt, params))


def test_loaded_group_without_a_hyperparameter_takes_the_default():
    params, opt = _trained()
    sd = copy.deepcopy(opt.state_dict())
    del sd["param_groups"][0]["eps"]
    opt.load_state_dict(sd)
    assert opt.param_groups[0]["eps"] == opt.defaults["eps"]
    set_grads(params)
    opt.step()


CHANGES = {
    "amsgrad_on": lambda opt, p: opt.param_groups[0].update(amsgrad=True),
    "amsgrad_off": lambda opt, p: opt.param_groups[0].update(amsgrad=False),
    "clipping_off": lambda opt, p: setattr(opt.args, "percentile_clipping", 100),
    "optim_bits": lambda opt, p: setattr(opt.args, "optim_bits", 32),
    "block_wise": lambda opt, p: setattr(opt.args, "block_wise", False),
    "override": lambda opt, p: GlobalOptimManager.get_instance().override_config(p, "optim_bits", 32),
}


@pytest.mark.parametrize("change", CHANGES)
def test_state_dict_round_trips_after_options_change(change):
    """Options changed after the state was made (the state keeps its kind, except amsgrad, which
    is switched at the next step): what the optimizer saves, it loads, right after the change and
    after a step with it."""
    GlobalOptimManager.get_instance().initialize()
    params = make_params(((5000,), (300,)))
    opt = Adam8bit(params, min_8bit_size=256, percentile_clipping=5, amsgrad=change == "amsgrad_off")
    set_grads(params)
    opt.step()
    CHANGES[change](opt, params[0])
    try:
        for _ in range(2):
            saved = snapshot(opt, params)
            opt.load_state_dict(through_torch_save(saved[1]))
            assert_same(saved, snapshot(opt, params))
            set_grads(params)
            opt.step()
    finally:
        GlobalOptimManager.get_instance().initialize()
    assert ("state3" in opt.state[params[0]]) == (change == "amsgrad_on")


def test_checkpoint_after_amsgrad_switched_with_a_parameter_skipped_loads_into_a_fresh_optimizer():
    """amsgrad switched on while one parameter has no gradient: its state switches too, so the
    checkpoint's states agree with its groups and a fresh amsgrad=True optimizer loads it."""
    params = make_params(((300,), (20,)))
    opt = Adam32bit(params)
    set_grads(params)
    opt.step()
    opt.param_groups[0]["amsgrad"] = True
    params[1].grad = None
    opt.step()
    assert all("state3" in opt.state[p] for p in params)
    twin = make_params(((300,), (20,)))
    fresh = Adam32bit(twin, amsgrad=True)
    fresh.load_state_dict(through_torch_save(opt.state_dict()))
    assert all(torch.equal(fresh.state[q]["state3"], opt.state[p]["state3"]) for p, q in zip(params, twin))


@pytest.mark.parametrize("cls", [Adam8bit, Adam32bit])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_rollback_to_a_checkpoint_saved_before_amsgrad_was_switched(cls, amsgrad):
    """The loaded groups bring back the amsgrad the checkpoint was saved with, so its states (with
    or without amsgrad's maximum) load, and the optimizer steps on as one built from it."""
    params = make_params(((5000,), (300,)))
    opt = cls(params, amsgrad=amsgrad)
    set_grads(params)
    opt.step()
    checkpoint = through_torch_save(opt.state_dict())
    opt.param_groups[0]["amsgrad"] = not amsgrad
    set_grads(params)
    opt.step()
    twin = copies(params)
    fresh = cls(twin, amsgrad=amsgrad)
    fresh.load_state_dict(checkpoint)
    opt.load_state_dict(checkpoint)
    assert opt.param_groups[0]["amsgrad"] is amsgrad
    assert all(("state3" in opt.state[p]) == amsgrad for p in params)
    grads = [torch.randn_like(p) for p in params]
    for ps, o in ((params, opt), (twin, fresh)):
        for p, g in zip(ps, grads):
            p.grad = g.clone()
        o.step()
    assert_same(snapshot(fresh, twin), snapshot(opt, params))


@pytest.mark.parametrize("cls", [Adam8bit, Adam32bit])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_no_step_moves_a_parameter_further_than_adam_can(cls, amsgrad):
    """Exact Adam keeps m^2 <= K v (K = (1-b1)^2 / ((1-b2)(1 - b1^2/b2))), so no step moves an
    element by more than lr * sqrt(K) * sqrt(1 - b2^t) / (1 - b1^t). 8-bit states used to break it
    after a gradient far below its block's largest (v rounded to code 0, m kept a code): the next
    zero-gradient step moved such elements by about lr * m / eps (2784 with lr = 0.1, not 0.17)."""
    torch.manual_seed(0)
    lr, (b1, b2) = 0.1, (0.9, 0.999)
    k = (1 - b1) ** 2 / ((1 - b2) * (1 - b1 * b1 / b2))
    p = torch.nn.Parameter(torch.randn(5000))
    opt = cls([p], lr=lr, betas=(b1, b2), amsgrad=amsgrad)
    grads = [torch.randn(5000), torch.zeros(5000), torch.zeros(5000), torch.randn(5000) * 1e-3, torch.zeros(5000)]
    for t, g in enumerate(grads, start=1):
        before = p.detach().clone()
        p.grad = g
        opt.step()
        bound = lr * math.sqrt(k) * math.sqrt(1 - b2**t) / (1 - b1**t)
        assert (p.detach() - before).abs().max().item() <= bound * (1 + 1e-4), f"step {t}"


@pytest.mark.parametrize("amsgrad", [False, True])
def test_a_block_of_tiny_second_moments_never_outpaces_adamw(amsgrad):
    """A block whose v are all below 1 / FLT_MAX (where 1 / absmax overflows) is quantized as any
    other (block_prescale): flushed to zero, the steps after it moved parameters 2-3 times as far
    as AdamW (found with eps = 1e-30, where eps does not hide it)."""
    torch.manual_seed(0)
    p8, pw = torch.nn.Parameter(torch.randn(512)), torch.nn.Parameter(torch.randn(512))
    pw.data.copy_(p8.data)
    opt8 = Adam8bit([p8], lr=1e-3, eps=1e-30, amsgrad=amsgrad, min_8bit_size=0)
    optw = torch.optim.AdamW([pw], lr=1e-3, eps=1e-30, amsgrad=amsgrad, weight_decay=0.0)
    for t in range(6):
        g = torch.randn(512) * 1e-20 if t < 3 else torch.zeros(512)
        p8.grad, pw.grad = g, g.clone()
        before8, beforew = p8.detach().clone(), pw.detach().clone()
        opt8.step()
        optw.step()
        move8, movew = (p8 - before8).abs().max().item(), (pw - beforew).abs().max().item()
        assert move8 <= 1.1 * movew, (t, move8, movew)
    assert opt8.state[p8]["absmax2"].max() < 2.9e-39  # (the case: 1 / absmax overflows)


@pytest.mark.parametrize("case", ["steady", "then_zero"])
def test_element_with_a_gradient_far_below_its_block_never_outpaces_adamw(case):
    """Its v is below the smallest code of its block: stored as that code, not as 0 (with 0, even
    under the bound, it stepped sqrt(K) ~ 7 times further than AdamW at every step)."""
    torch.manual_seed(0)
    p8, pw = torch.nn.Parameter(torch.zeros(4096)), torch.nn.Parameter(torch.zeros(4096))
    opt8, optw = Adam8bit([p8], lr=1e-3), torch.optim.AdamW([pw], lr=1e-3, weight_decay=0.0)
    for t in range(100):
        g = torch.randn(4096)
        g[7] = 1e-4 if case == "steady" else (1e-3 if t == 0 else 0.0)
        if case == "then_zero" and t > 0:
            g.zero_()
        p8.grad, pw.grad = g, g.clone()
        opt8.step()
        optw.step()
    assert 0 < -p8[7].item() <= -pw[7].item()


@pytest.mark.parametrize("cls", [Adam8bit, Adam32bit])
def test_backward_through_a_parameter_the_step_changed_is_refused(cls):
    """As with torch.optim: a graph built before the step cannot be backpropagated after it (it
    would use the new values silently)."""
    p = torch.nn.Parameter(torch.ones(5000))
    opt = cls([p], lr=0.5)
    loss = (p * p).sum()
    p.grad = torch.ones(5000)
    opt.step()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("cls", [Adam8bit, Adam32bit])
def test_state_dict_with_an_empty_parameter_state_loads(cls):
    """Looking up a parameter's state creates an empty entry (torch.optim's state is a defaultdict),
    which state_dict() saves: it means no state yet, as for torch.optim."""
    params = make_params(((5000,), (300,)))
    opt = cls(params)
    assert opt.state[params[1]].get("step") is None
    params[0].grad = torch.randn(5000)
    opt.step()
    saved = through_torch_save(opt.state_dict())
    assert saved["state"][1] == {}
    twin = copies(params)
    fresh = cls(twin)
    fresh.load_state_dict(saved)
    assert twin[1] not in fresh.state and torch.equal(fresh.state[twin[0]]["state1"], opt.state[params[0]]["state1"])
    for ps, o in ((params, opt), (twin, fresh)):
        for p in ps:
            p.grad = torch.ones_like(p)
        o.step()
    assert_same(snapshot(fresh, twin), snapshot(opt, params))


def test_named_parameters_are_accepted_and_their_names_kept():
    """As torch.optim (and bitsandbytes, a torch.optim.Optimizer): (name, tensor) pairs, the names
    in the group's "param_names", saved and loaded with it."""
    model = torch.nn.Linear(80, 70)
    opt = Adam8bit(model.named_parameters(), min_8bit_size=256)
    assert opt.param_groups[0]["param_names"] == ["weight", "bias"]
    assert opt.param_groups[0]["params"] == [model.weight, model.bias]
    model(torch.randn(3, 80)).sum().backward()
    opt.step()
    assert opt.state[model.weight]["state1"].dtype == torch.uint8
    again = Adam8bit(model.named_parameters(), min_8bit_size=256)
    again.load_state_dict(through_torch_save(opt.state_dict()))
    assert again.param_groups[0]["param_names"] == ["weight", "bias"]
    with pytest.raises(ValueError, match="all optimizer params should be with/without names"):
        Adam8bit([("weight", model.weight), model.bias])
    with pytest.raises(TypeError, match=r"parameter 0 of group 0 is a tuple, not a torch.Tensor"):
        Adam8bit([("weight", model.weight, "extra")])


def test_loaded_hyperparameters_are_copies():
    """As torch.optim: a loaded tensor lr is the optimizer's own (schedulers update it in place)."""
    params = make_params(((300,),))
    opt = Adam32bit(params, lr=torch.tensor(1e-3), betas=(torch.tensor(0.9), 0.999))
    saved = opt.state_dict()
    other = Adam32bit(copies(params), lr=torch.tensor(5e-3))
    other.load_state_dict(saved)
    other.param_groups[0]["lr"].fill_(0.5)
    other.param_groups[0]["betas"][0].fill_(0.5)
    assert opt.param_groups[0]["lr"].item() == saved["param_groups"][0]["lr"].item() == pytest.approx(1e-3)
    assert opt.param_groups[0]["betas"][0].item() == pytest.approx(0.9)


@pytest.mark.parametrize("cls", [Adam8bit, Adam32bit])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_checkpoint_saved_between_an_amsgrad_switch_and_the_next_step_loads_anywhere(cls, amsgrad):
    """The switch takes effect at the next step, so such a checkpoint's states still have the old
    layout; a fresh optimizer of either amsgrad loads it and steps on as the original."""
    params = make_params(((5000,), (300,)))
    opt = cls(params, amsgrad=amsgrad)
    set_grads(params)
    opt.step()
    opt.param_groups[0]["amsgrad"] = not amsgrad
    saved = through_torch_save(opt.state_dict())
    fresh = []
    for built_with in (False, True):
        twin = copies(params)
        fresh.append((twin, cls(twin, amsgrad=built_with)))
        fresh[-1][1].load_state_dict(saved)
        assert fresh[-1][1].param_groups[0]["amsgrad"] is (not amsgrad)
    grads = [torch.randn_like(p) for p in params]
    for ps, o in [(params, opt), *fresh]:
        for p, g in zip(ps, grads):
            p.grad = g.clone()
        o.step()
    for twin, o in fresh:
        assert_same(snapshot(o, twin), snapshot(opt, params))


def test_parameter_moved_to_channels_last_after_the_state_was_made():
    """fp32 moments follow the parameter to its new memory format (as torch.optim's); 8-bit codes
    cannot (their blocks follow memory order): refused before any group steps."""
    torch.manual_seed(0)
    lin, conv = torch.nn.Linear(8, 8), torch.nn.Conv2d(8, 16, 3)
    ref_lin, ref_conv = copy.deepcopy(lin), copy.deepcopy(conv)
    groups = lambda a, b: [{"params": list(a.parameters())}, {"params": list(b.parameters())}]  # noqa: E731
    opt, ref = Adam32bit(groups(lin, conv), lr=1e-2), torch.optim.AdamW(groups(ref_lin, ref_conv), lr=1e-2,
                                                                          weight_decay=0.0)
    for t in range(3):
        if t == 1:
            conv.to(memory_format=torch.channels_last)
            ref_conv.to(memory_format=torch.channels_last)
        for m, r in ((lin, ref_lin), (conv, ref_conv)):
            for p, q in zip(m.parameters(), r.parameters()):
                p.grad = torch.randn_like(p)
                q.grad = p.grad.clone()
        opt.step()
        ref.step()
    for p, q in zip([*lin.parameters(), *conv.parameters()], [*ref_lin.parameters(), *ref_conv.parameters()]):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)
    assert opt.state[conv.weight]["state1"].stride() == conv.weight.stride()

    conv8 = torch.nn.Conv2d(8, 16, 3)
    opt8 = Adam8bit([{"params": list(lin.parameters())}, {"params": list(conv8.parameters())}], min_8bit_size=256)
    set_grads([*lin.parameters(), *conv8.parameters()])
    opt8.step()
    conv8.to(memory_format=torch.channels_last)
    set_grads([*lin.parameters(), *conv8.parameters()])
    before = snapshot(opt8, [*lin.parameters(), *conv8.parameters()])
    with pytest.raises(ValueError, match=r"parameter 0 of group 1 \(shape \[16, 8, 3, 3\]\) now has strides "
                                         r"\[72, 1, 24, 8\] but its 8-bit state has strides \[72, 9, 3, 1\]"):
        opt8.step()
    assert_same(before, snapshot(opt8, [*lin.parameters(), *conv8.parameters()]))


@pytest.mark.parametrize("case", ["1x1_conv", "one_scale"])
def test_8bit_state_follows_a_memory_format_change_it_survives(case):
    """A 1x1 convolution's weight moved to channels_last changes only the strides of its size-1
    dimensions: its elements stay in the same sequence, so the 8-bit blocks stay valid. With one
    scale per tensor, the codes do not depend on the order at all."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(128, 64, 1, bias=False) if case == "1x1_conv" else torch.nn.Conv2d(8, 16, 3, bias=False)
    twin = copy.deepcopy(conv)
    kwargs = {} if case == "1x1_conv" else dict(block_wise=False, min_8bit_size=256)
    opt, opt_twin = Adam8bit(conv.parameters(), **kwargs), Adam8bit(twin.parameters(), **kwargs)
    for t in range(3):
        if t == 1:
            conv.to(memory_format=torch.channels_last)
        conv.weight.grad = torch.randn_like(conv.weight)
        twin.weight.grad = conv.weight.grad.contiguous()
        opt.step()
        opt_twin.step()
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert conv.weight.stride() != twin.weight.stride() and torch.equal(conv.weight, twin.weight)
    for k in ("state1", "state2", "absmax1", "absmax2"):
        assert torch.equal(opt.state[conv.weight][k], opt_twin.state[twin.weight][k]), k
    assert opt.state[conv.weight]["state1"].stride() == conv.weight.stride()


@pytest.mark.parametrize("change", ["dtype", "appended_non_dense"])
def test_parameter_the_kernels_cannot_update_is_refused_before_any_change(change):
    model = torch.nn.Sequential(torch.nn.Linear(100, 100), torch.nn.Linear(100, 2))
    opt = Adam8bit(model.parameters(), lr=1e-2)
    params = list(model.parameters())
    if change == "dtype":  # module.double() after the optimizer was made
        model[1].double()
        message = r"parameter 2 of group 0 \(shape \[2, 100\]\) has dtype torch.float64; supported"
    else:
        extra = torch.nn.Parameter(torch.randn(10, 20)[:, ::2])
        opt.param_groups[0]["params"].append(extra)
        params.append(extra)
        message = r"parameter 4 of group 0 \(shape \[10, 10\]\) is not dense"
    set_grads(params)
    before = snapshot(opt, params)
    with pytest.raises(ValueError, match=message):
        opt.step()
    assert_same(before, snapshot(opt, params))


def test_parameter_replaced_by_one_of_another_shape_is_refused_before_any_change():
    a, b = torch.nn.Parameter(torch.randn(300)), torch.nn.Parameter(torch.randn(20, 30))
    opt = Adam32bit([{"params": [a]}, {"params": [b]}])
    set_grads([a, b])
    opt.step()
    b.data = torch.randn(30, 20)
    set_grads([a, b])
    before = snapshot(opt, [a, b])
    with pytest.raises(ValueError, match=r"parameter 0 of group 1 \(shape \[30, 20\]\): its state was made for a "
                                         r"\[20, 30\] parameter on cpu; the parameter was replaced"):
        opt.step()
    assert_same(before, snapshot(opt, [a, b]))


def test_amsgrad_switched_on_mid_training_starts_its_maximum_at_v():
    params = make_params(((300,),))
    opt = Adam32bit(params)
    set_grads(params)
    opt.step()
    v_before = opt.state[params[0]]["state2"].clone()
    opt.param_groups[0]["amsgrad"] = True
    set_grads(params)
    opt.step()
    state = opt.state[params[0]]
    assert torch.equal(state["state3"], torch.maximum(v_before, state["state2"]))


def test_8bit_checkpoint_into_32bit_optimizer_is_refused():
    _, opt8 = _trained(Adam8bit)
    params32, opt32 = _trained(Adam32bit)
    before = snapshot(opt32, params32)
    with pytest.raises(ValueError, match="checkpoint holds 8-bit state but this optimizer keeps 32-bit state"):
        opt32.load_state_dict(opt8.state_dict())
    assert_same(before, snapshot(opt32, params32))


# ------------------------------------------------------------ bad input
CONSTRUCTION_ERRORS = [
    (dict(lr=-1e-3), ValueError, "Invalid learning rate: -0.001"),
    (dict(eps=-1.0), ValueError, "Invalid epsilon value: -1.0"),
    (dict(betas=(1.0, 0.999)), ValueError, "Invalid beta parameter at index 0: 1.0"),
    (dict(betas=(0.9, -0.1)), ValueError, "Invalid beta parameter at index 1: -0.1"),
    (dict(betas=(0.9,)), ValueError, "Invalid betas"),
    (dict(weight_decay=-0.1), ValueError, "Invalid weight_decay value: -0.1"),
    (dict(lr=None), ValueError, "Invalid learning rate: None; expected a real number or a one-element tensor"),
    (dict(lr="1e-3"), ValueError, "Invalid learning rate: '1e-3'; expected a real number"),
    (dict(betas=(0.9, None)), ValueError, "Invalid beta parameter at index 1: None; expected a real number"),
    (dict(eps=True), ValueError, "Invalid epsilon value: True; expected a real number"),
    (dict(optim_bits=16), ValueError, "optim_bits must be 8 or 32, got 16"),
    (dict(min_8bit_size=-1), ValueError, "min_8bit_size must be an int >= 0"),
    (dict(amsgrad=1), ValueError, "amsgrad must be a bool, got 1"),
    (dict(percentile_clipping=-1), ValueError, "percentile_clipping must be an int in 0..100, got -1"),
    (dict(percentile_clipping=95.0), ValueError, "percentile_clipping must be an int in 0..100, got 95.0"),
    (dict(block_wise="no"), ValueError, "block_wise must be a bool, got 'no'"),
    (dict(page_out_after_step=True), ValueError, "page_out_after_step=True needs paged states"),
    (dict(is_paged=True, page_out_after_step=1), ValueError, "page_out_after_step must be a bool, got 1"),
    (dict(args=SimpleNamespace(max_unorm=-1.0)), ValueError, "max_unorm must be a finite float >= 0, got -1.0"),
    (dict(args=SimpleNamespace(skip_zeros=1)), ValueError, "skip_zeros must be a bool, got 1"),
    (dict(args={"optim_bits": 8}), TypeError, "args must be an object with some of the attributes optim_bits"),
    (dict(args=SimpleNamespace(optim_bit=8)), TypeError, "args must be an object with some of the attributes"),
]


@pytest.mark.parametrize("kwargs,error,message", CONSTRUCTION_ERRORS, ids=lambda x: str(x)[:30])
def test_bad_constructor_arguments(kwargs, error, message):
    with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        Adam(make_params(), **kwargs)


def test_args_mapping_with_attribute_access_is_accepted():
    """bitsandbytes reads args' attributes: a config object that is also a mapping (OmegaConf's
    DictConfig, EasyDict) works there, so it works here."""
    class AttrDict(dict):
        def __getattr__(self, name):
            try:
                return self[name]
            except KeyError:
                raise AttributeError(name) from None

    opt = Adam(make_params(((5000,),)), args=AttrDict(optim_bits=8, percentile_clipping=5))
    assert opt.args.optim_bits == 8 and opt.args.percentile_clipping == 5 and opt.args.min_8bit_size == 4096


def test_per_parameter_option_in_a_param_group_is_refused():
    # bitsandbytes and torch.optim keep it in the group and ignore it: the state would silently be 8-bit
    emb, lin = torch.nn.Parameter(torch.randn(100, 64)), torch.nn.Parameter(torch.randn(64, 64))
    with pytest.raises(ValueError, match=r"Adam8bit: group 0 sets \['optim_bits', 'percentile_clipping'\], which "
                                         r"are not per-group options: .*override_config"):
        Adam8bit([{"params": [emb], "optim_bits": 32, "percentile_clipping": 5}, {"params": [lin]}])
    opt = Adam8bit([lin])
    with pytest.raises(ValueError, match=r"group 1 sets \['min_8bit_size'\]"):
        opt.add_param_group({"params": [emb], "min_8bit_size": 0})
    assert len(opt.param_groups) == 1
    # The optimizer's own values pass: ZeroRedundancyOptimizer copies every constructor keyword into
    # each group it hands the optimizer
    opt = Adam8bit([{"params": [emb], "min_8bit_size": 0, "percentile_clipping": 5, "optim_bits": 8}],
                   min_8bit_size=0, percentile_clipping=5)
    opt.add_param_group({"params": [lin], "min_8bit_size": 0})


def test_zero_redundancy_optimizer_with_per_optimizer_options(tmp_path):
    """torch.distributed.optim.ZeroRedundancyOptimizer builds the optimizer with its keywords in every
    group (min_8bit_size, percentile_clipping, block_wise...): it steps as the optimizer alone, bit for
    bit, and its consolidated state_dict loads into the optimizer alone."""
    import torch.distributed as dist
    from torch.distributed.optim import ZeroRedundancyOptimizer

    options = dict(lr=1e-2, min_8bit_size=0, percentile_clipping=90, block_wise=False)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        zero_model = torch.nn.Sequential(torch.nn.Linear(32, 16), torch.nn.Linear(16, 4))
        model = copy.deepcopy(zero_model)
        zero = ZeroRedundancyOptimizer(zero_model.parameters(), optimizer_class=Adam8bit, **options)
        alone = Adam8bit(model.parameters(), **options)
        for _ in range(3):
            x = torch.randn(8, 32)
            for m, o in ((zero_model, zero), (model, alone)):
                m(x).square().mean().backward()
                o.step()
                o.zero_grad()
        for a, b in zip(zero_model.parameters(), model.parameters()):
            assert torch.equal(a, b)
        assert zero.optim.state[zero_model[1].bias]["state1"].dtype == torch.uint8  # min_8bit_size=0 applied
        zero.consolidate_state_dict(to=0)
        fresh = Adam8bit(copy.deepcopy(model).parameters(), **options)
        fresh.load_state_dict(zero.state_dict())
        for (p, s), (q, t) in zip(alone.state.items(), fresh.state.items()):
            assert s.keys() == t.keys() and all(torch.equal(s[k], t[k]) for k in s)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("cls", [Adam, Adam8bit, Adam32bit])
@pytest.mark.parametrize("bits", [16, 8.0, "8"])
def test_optim_bits_rule_is_the_same_for_every_class(cls, bits):
    # Adam8bit / Adam32bit ignore optim_bits, but a value Adam refuses is refused there too.
    with pytest.raises(ValueError, match=f"optim_bits must be 8 or 32, got {bits!r}"):
        cls(make_params(), optim_bits=bits)


@pytest.mark.parametrize(
    "param,message",
    [
        (torch.randn(4, dtype=torch.complex64), r"parameter 1 of group 0 \(shape \[4\]\) is complex"),
        (torch.randn(4, dtype=torch.float64), r"has dtype torch.float64; supported: float32, float16, bfloat16"),
        (torch.randn(8, 4)[:, ::2], r"is not dense \(strides \[4, 2\]\)"),
    ],
)
def test_bad_parameters(param, message):
    with pytest.raises(ValueError, match=message):
        Adam8bit([torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(param, requires_grad=False)])


def test_parameters_listed_twice_not_tensors_or_in_a_set_are_refused():
    p, q = make_params(((300,), (20,)))
    # twice in a group: the kernels would update one memory twice at once (results varied run to run)
    with pytest.raises(ValueError, match=r"parameter 2 of group 0 is parameter 0 again; list each parameter once"):
        Adam8bit([p, q, p])
    with pytest.raises(TypeError, match=r"parameter 1 of group 0 is a float, not a torch.Tensor"):
        Adam8bit([p, 1.0])
    with pytest.raises(TypeError, match=r"the parameters of group 0 are a set"):
        Adam8bit([{"params": {p, q}}])


@pytest.fixture(params=["C++ scan", "Python checks"])
def scan(request, monkeypatch):
    """Both ways a step checks its parameters: the library's C++ scan, and the Python checks alone
    (the library built without Python headers has no scan)."""
    if request.param == "Python checks":
        monkeypatch.setattr(torchadam8._extension, "host", lambda: None)


def _grad_breakers():
    def sparse(p):
        p.grad = torch.randn(5000).to_sparse()

    def dtype(p):
        p.grad.data = p.grad.data.half()

    def shape(p):
        p.grad.data = p.grad.data.reshape(50, 100)

    return [
        (sparse, RuntimeError, r"parameter 0 of group 0 \(shape \[5000\]\) has a sparse gradient"),
        (dtype, TypeError, r"has dtype torch.float32 but its gradient has dtype torch.float16"),
        (shape, ValueError, r"its gradient has shape \[50, 100\]"),
    ]


@pytest.mark.parametrize("breaker,error,regex", _grad_breakers(), ids=lambda x: getattr(x, "__name__", ""))
@pytest.mark.parametrize("cls", [Adam8bit, Adam32bit], ids=lambda c: c.__name__)
def test_bad_gradients_raise_and_change_nothing(cls, breaker, error, regex, scan):
    params, opt = _trained(cls)
    set_grads(params)
    breaker(params[0])
    before = snapshot(opt, params)
    with pytest.raises(error, match=regex):
        opt.step()
    assert_same(before, snapshot(opt, params))


@pytest.mark.parametrize("key,value,message", [("eps", -1.0, "group 1: Invalid epsilon value: -1.0"),
                                               ("weight_decay", -0.5, "group 1: Invalid weight_decay value: -0.5"),
                                               ("lr", -1e-3, "group 1: Invalid learning rate: -0.001")])
def test_bad_value_in_a_later_group_is_rejected_before_any_change(key, value, message):
    params = make_params()
    opt = Adam8bit([{"params": params[:2]}, {"params": params[2:]}])
    set_grads(params)
    opt.step()
    set_grads(params)
    opt.param_groups[1][key] = value
    before = snapshot(opt, params)
    with pytest.raises(ValueError, match=message):
        opt.step()
    assert_same(before, snapshot(opt, params))


@pytest.mark.parametrize("key,value,message", [
    ("betas", (0.9, 1.5), r"group 0: Invalid beta parameter at index 1: 1.5"),
    ("betas", (0.9,), r"group 0: Invalid betas: \(0.9,\); expected a pair \(beta1, beta2\)"),
    ("betas", (torch.tensor([0.9, 0.8]), 0.99), r"Invalid beta parameter at index 0: a tensor of shape \[2\]"),
    ("lr", torch.tensor([1e-3, 2e-3]), r"group 0: Invalid learning rate: a tensor of shape \[2\]"),
    ("eps", torch.tensor([1e-8, 1e-8]), r"group 0: Invalid epsilon value: a tensor of shape \[2\]"),
    ("amsgrad", 1, r"group 0: amsgrad must be a bool, got 1"),
], ids=["beta2", "one_beta", "beta_tensor", "lr_tensor", "eps_tensor", "amsgrad_int"])
def test_invalid_hyperparameter_set_after_construction_is_rejected_before_any_change(key, value, message):
    params, opt = _trained()
    set_grads(params)
    before = snapshot(opt, params)
    opt.param_groups[0][key] = value
    with pytest.raises(ValueError, match=message):
        opt.step()
    opt.param_groups[0][key] = before[1]["param_groups"][0][key]
    assert_same(before, snapshot(opt, params))


def test_compiled_step_matches_eager():
    params = make_params(((4096,), (33,)))
    twin = copies(params)
    opt, opt_twin = Adam8bit(params), Adam8bit(twin)

    def set_lr(i):
        opt.param_groups[0]["lr"] = opt_twin.param_groups[0]["lr"] = 1e-3 * (i + 1)

    step_both(3, params, opt.step, twin, torch.compile(opt_twin.step, fullgraph=True), set_lr)
    assert_same(snapshot(opt, params), snapshot(opt_twin, twin))


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize("cls,kwargs", [(Adam8bit, dict(percentile_clipping=5, amsgrad=True)), (Adam32bit, {}),
                                         (Adam, dict(optim_bits=8, args=SimpleNamespace(max_unorm=0.1)))])
@pytest.mark.parametrize("overridden", [False, True], ids=["", "overrides"])
def test_a_copied_or_unpickled_optimizer_steps_as_the_original(cls, kwargs, how, overridden):
    """torch.optim.Optimizer pickles only defaults, state and param_groups; the options this class
    adds (args, paging, each parameter's overrides) travel too, so the copy steps exactly as the
    original from then on."""
    manager = GlobalOptimManager.get_instance()
    manager.initialize()
    params = [torch.nn.Parameter(torch.randn(s)) for s in ((70, 90), (17,))]
    if overridden:
        manager.override_config(params[0], key_value_dict={"lr": 1e-4, "betas": (0.8, 0.99)})
    try:
        opt = cls(params, lr=1e-2, **kwargs)
        for _ in range(2):
            set_grads(params)
            opt.step()
        version = manager.version
        shallow = copy.copy(opt)  # shares the parameters: their overrides are left as they are
        assert manager.version == version and shallow.param_groups[0]["params"][0] is params[0]
        twin = copy.deepcopy(opt) if how == "deepcopy" else pickle.loads(pickle.dumps(opt))
        twins = [p for g in twin.param_groups for p in g["params"]]
        assert vars(twin.args) == vars(opt.args)
        assert manager.config_for(twins[0]) == manager.config_for(params[0])
        for _ in range(3):
            set_twin_grads(params, twins)
            opt.step()
            twin.step()
    finally:
        manager.initialize()
    for p, q in zip(params, twins):
        assert torch.equal(p.detach(), q.detach())


@pytest.mark.parametrize("cls", [Adam8bit, Adam32bit], ids=lambda c: c.__name__)
def test_a_parameter_appended_to_its_group_again_is_refused(cls, scan):
    """The constructor refuses a parameter listed twice in a group; one appended to the group's list
    again later is refused at the next step, before anything changes (one op call would update it
    twice at once: a race). The same parameter in two groups steps twice, as with torch.optim."""
    params = make_params()
    opt = cls(params)
    set_grads(params)
    opt.step()
    opt.param_groups[0]["params"].append(params[1])
    set_grads(params)
    before = snapshot(opt, params)
    with pytest.raises(ValueError, match=r"parameter 4 of group 0 \(shape \[300\]\) is parameter 1 of the group "
                       r"again; list each parameter once"):
        opt.step()
    assert_same(snapshot(opt, params), before)
    opt.param_groups[0]["params"].pop()
    opt.step()
    assert not torch.equal(params[1], before[0][1])


@pytest.mark.parametrize("cls", [Adam8bit, Adam32bit], ids=lambda c: c.__name__)
def test_gradient_strided_unlike_its_parameter(cls, scan):
    """A gradient whose strides differ from its parameter's (a transposed view, as some backward
    kernels produce) updates the same elements as a contiguous one, whether it comes at the first
    step or after the state exists (then only the C++ scan of the step notices it)."""
    params = make_params(((64, 80), (3, 5), (1, 7)))
    twins = copies(params)
    opt, twin = cls(params, lr=1e-2), cls(twins, lr=1e-2)
    for i in range(4):
        set_twin_grads(params, twins)
        if i in (0, 2, 3):
            for p in params:
                p.grad = p.grad.t().contiguous().t()  # the same values, column-major
            assert params[0].grad.stride() != params[0].stride()
        opt.step()
        twin.step()
        for p, q in zip(params, twins):
            assert torch.equal(p, q)


def _batching_cases():
    def shapes():
        return make_params(((64, 128), (300,), (17,), (0,), (5, 9)))

    def strided_and_missing(opt, params):
        params[1].grad = None
        params[4].grad = params[4].grad.t().contiguous().t()

    def amsgrad_switched(opt, params):
        opt.param_groups[0]["amsgrad"] = True

    def clipping_switched(opt, params):
        opt.args.percentile_clipping = 90

    def clipping_switched_beside_a_frozen_parameter(opt, params):
        opt.args.percentile_clipping = 90
        params[1].grad = None  # its state gets no history until it has a gradient again

    def override(opt, params):
        GlobalOptimManager.get_instance().override_config(params[2], "lr", 0.5)

    # (name, optimizer, change after the first step, whether the C++ batching applies then)
    return [
        ("32-bit", lambda ps: Adam32bit(ps), None, True),
        ("8-bit", lambda ps: Adam8bit(ps, min_8bit_size=1), None, True),
        ("8-bit amsgrad clipping", lambda ps: Adam8bit(ps, min_8bit_size=1, amsgrad=True, percentile_clipping=90),
         None, True),
        ("no gradient, strided gradient", lambda ps: Adam8bit(ps, min_8bit_size=1), strided_and_missing, True),
        ("8-bit beside 32-bit", lambda ps: Adam8bit(ps), None, True),
        ("per-tensor beside per-block scales", lambda ps: Adam8bit(ps, min_8bit_size=1, block_wise=False), None,
         True),
        ("amsgrad switched on", lambda ps: Adam32bit(ps), amsgrad_switched, False),
        ("clipping switched on", lambda ps: Adam8bit(ps, min_8bit_size=1), clipping_switched, False),
        ("clipping switched on beside a frozen parameter", lambda ps: Adam8bit(ps, min_8bit_size=1),
         clipping_switched_beside_a_frozen_parameter, False),
        ("an override", lambda ps: Adam32bit(ps), override, False),
    ], shapes


@needs_scan
@pytest.mark.parametrize("case", _batching_cases()[0], ids=lambda c: c[0])
def test_the_cpp_batching_of_a_group_equals_the_python_loop(case, monkeypatch):
    """A steady group's batching is made in C++ (host.cpp's batch_group); a group with overrides or
    a state of another kind than its options make goes to the Python loop. Both give the same op
    calls: the same batch keys, list lengths and tensors, in the same order."""
    _, make, change, applies = case
    params = _batching_cases()[1]()
    opt = make(params)
    set_grads(params)
    opt.step()
    set_grads(params)
    if change is not None:
        change(opt, params)
    real = torchadam8._extension.host()
    taken = []

    def recorded(*args):
        result = real.batch_group(*args)
        taken.append(result is not None)
        return result

    def init_group(batch_group):
        monkeypatch.setattr(torchadam8._extension, "host",
                            lambda: SimpleNamespace(scan_params=real.scan_params, batch_group=batch_group))
        tensors = []
        _, layout = opt._init_group(opt.param_groups[0], tensors, True)
        return layout, tensors

    overridden = change is not None and change.__name__ == "override"
    try:
        cpp = init_group(recorded)  # (first: where it falls back, the loop switches the state's kind)
        loop = init_group(lambda *args: None)
        assert taken == ([] if overridden else [applies])
        assert cpp[0] == loop[0]
        assert len(cpp[1]) == len(loop[1]) and all(a is b for a, b in zip(cpp[1], loop[1]))
        init_group(recorded)  # the states switched, the next steps take the C++ batching
        assert taken == ([] if overridden else [applies, True])
    finally:
        GlobalOptimManager.get_instance().reset()


def _state(moment, **entries):
    """A state as the optimizer makes it around `moment` (None: no state); entries replace keys
    (None: removes the key)."""
    if moment is None:
        return None
    state = {"step": torch.tensor(3.0), "state1": moment, "state2": moment.clone()}
    if moment.dtype == torch.uint8:
        blocks = (moment.numel() + 255) // 256
        state.update(absmax1=torch.ones(blocks), absmax2=torch.ones(blocks))
    for key, value in entries.items():
        if value is None:
            state.pop(key)
        else:
            state[key] = value
    return state


@needs_scan
def test_scan_params_flags_what_the_step_checks_in_python():
    """The C++ scan of a step sends a parameter to the Python checks (which raise, make state or
    move it to a new layout) in every case they handle, and only then."""
    scan = torchadam8._extension.host().scan_params
    p = torch.nn.Parameter(torch.randn(4, 6))
    good_grad, good = torch.randn(4, 6), torch.zeros(4, 6)
    codes = torch.zeros(4, 6, dtype=torch.uint8)
    unusual = {
        "gradient dtype": (p, good_grad.double(), _state(good)),
        "gradient shape": (p, torch.randn(6, 4), _state(good)),
        "sparse gradient": (p, good_grad.to_sparse(), _state(good)),
        "parameter dtype": (torch.randn(4, 6, dtype=torch.float64), good_grad.double(), _state(good)),
        "no state yet": (p, good_grad, None),
        "empty state": (p, good_grad, {}),
        "moment shape": (p, good_grad, _state(torch.zeros(24))),
        "moment strides": (p, good_grad, _state(torch.zeros(6, 4).t())),
        "second moment strides": (p, good_grad, _state(good, state2=torch.zeros(6, 4).t())),
        "second moment dtype": (p, good_grad, _state(good, state2=good.half())),
        "no second moment": (p, good_grad, _state(good, state2=None)),
        "moments of two kinds": (p, good_grad, _state(good, state2=codes)),
        "float64 moments": (p, good_grad, _state(good.double())),
        "amsgrad's moment": (p, good_grad, _state(good, state3=torch.zeros(24))),
        "an int step": (p, good_grad, _state(good, step=0)),
        "a float64 step": (p, good_grad, _state(good, step=torch.tensor(3.0, dtype=torch.float64))),
        "no step": (p, good_grad, _state(good, step=None)),
        "history size": (p, good_grad, _state(good, gnorm_vec=torch.zeros(99))),
        "8-bit scales": (p, good_grad, _state(codes, absmax1=torch.ones(2))),
        "8-bit scales of two kinds": (p, good_grad, _state(codes, absmax2=torch.ones(2), absmax1=torch.ones(1))),
        "no 8-bit scales": (p, good_grad, _state(codes, absmax2=None)),
        "amsgrad's 8-bit scales": (p, good_grad, _state(codes, state3=codes.clone())),
    }
    for what, (param, grad, state) in unusual.items():
        params, grads, states = [p, param, p], [good_grad, grad, good_grad], [_state(good), state, _state(good)]
        assert scan(params, grads, states) == (1, False), what
    # usual: no gradient (whatever the rest), one element with other strides, a gradient strided
    # unlike its parameter (reported), bf16 and fp16 parameters, amsgrad and clipping entries,
    # 8-bit codes with per-block or per-tensor scales
    one = torch.randn(1, 1)
    assert scan([p, one], [None, one.clone()], [{}, _state(torch.zeros(1, 1).as_strided((1, 1), (5, 3)))]) == (-1, False)
    assert scan([p], [torch.randn(6, 4).t()], [_state(good)]) == (-1, True)
    for dtype in (torch.bfloat16, torch.float16):
        half = p.detach().to(dtype)
        assert scan([half], [good_grad.to(dtype)], [_state(good)]) == (-1, False)
    for state in (_state(good, state3=good.clone(), gnorm_vec=torch.zeros(100)), _state(codes),
                  _state(codes, absmax1=torch.ones(1), absmax2=torch.ones(1)),
                  _state(codes, state3=codes.clone(), absmax3=torch.ones(1))):
        assert scan([p], [good_grad], [state]) == (-1, False), state.keys()
    with pytest.raises(RuntimeError, match="one entry per parameter"):
        scan([p], [], [])


@pytest.mark.parametrize("cls", [Adam8bit, Adam32bit], ids=lambda c: c.__name__)
@pytest.mark.parametrize("breaker,regex", [
    (lambda s, p: s.__setitem__("step", 0), r"state\['step'\] is a int; expected a float32 tensor of one element"),
    (lambda s, p: s.__setitem__("step", s["step"].double()), r"state\['step'\] is a torch.float64 tensor"),
    (lambda s, p: s.__setitem__("state2", s["state2"][:1]), r"state\['state2'\] is a torch\.\w+ tensor of shape \[1"),
    (lambda s, p: s.pop("state2"), r"state\['state2'\] is missing"),
], ids=["int step", "float64 step", "state2 shape", "no state2"])
def test_a_state_edited_by_hand_is_refused_before_anything_changes(cls, breaker, regex, scan):
    """A state entry edited by hand into something the ops cannot take raises an error naming the
    parameter and the entry, before any parameter steps (it used to fail inside an op, after the
    earlier batches and groups had stepped)."""
    params = make_params(((64, 80), (300,), (17,)))
    opt = cls([{"params": params[:2]}, {"params": params[2:]}], min_8bit_size=1)
    set_grads(params)
    opt.step()
    breaker(opt.state[params[2]], params[2])
    set_grads(params)
    before = [p.detach().clone() for p in params]
    with pytest.raises(ValueError, match=r"parameter 0 of group 1 \(shape \[17\]\): its " + regex):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(params, before))


@needs_scan
@pytest.mark.parametrize("cls,min_8bit_size", [(Adam8bit, 1), (Adam32bit, 4096)], ids=["8-bit states", "32-bit states"])
def test_a_steady_step_makes_few_python_calls_per_parameter(cls, min_8bit_size):
    """Guards the eager step's host work (it grew 30% in two sessions without anyone noticing):
    beyond a fixed cost, a step of parameters that have state makes at most one Python-level call
    and three builtin calls per parameter, because every parameter's checks are one C++ scan and
    its batching one C++ call per group. Counted with sys.setprofile, not timed: attribute reads do
    not show, but a per-parameter helper, loop or lookup added to the step does."""

    def calls(n):
        params = [torch.nn.Parameter(torch.randn(8)) for _ in range(n)]
        for p in params:
            p.grad = torch.randn(8)
        opt = cls(params, min_8bit_size=min_8bit_size)
        opt.step()
        opt.step()
        counts = {"call": 0, "c_call": 0}

        def profile(frame, event, arg):
            if event in counts:
                counts[event] += 1

        sys.setprofile(profile)
        try:
            opt.step()
        finally:
            sys.setprofile(None)
        return counts

    few, many = calls(10), calls(110)
    per_parameter = {k: (many[k] - few[k]) / 100 for k in few}
    assert per_parameter["call"] <= 1 and per_parameter["c_call"] <= 3, per_parameter


def test_state_dict_hooks_see_and_may_replace_the_saved_dict():
    """As torch.optim's: a state_dict post-hook may return another dict (the result), and sees the
    state as it is saved (paged states as their plain inner tensors); a load_state_dict pre-hook
    gets a shallow copy of the caller's dict, so editing it leaves the caller's alone."""
    params = make_params(((500, 400), (30,)))
    opt = PagedAdam8bit(params)
    set_grads(params)
    opt.step()
    assert isinstance(opt.state[params[0]]["state1"], torchadam8.PagedTensor)
    seen = []

    def post_hook(o, state_dict):
        seen.extend(type(v) for s in state_dict["state"].values() for v in s.values())
        return {"wrapped": state_dict}

    handle = opt.register_state_dict_post_hook(post_hook)
    saved = opt.state_dict()
    handle.remove()
    assert list(saved) == ["wrapped"] and set(saved["wrapped"]) == {"state", "param_groups"}
    assert seen and all(t is torch.Tensor for t in seen)

    def pre_hook(o, state_dict):
        state_dict.pop("extra")  # a key another tool added; the loaded dict is the caller's minus it

    loaded = dict(saved["wrapped"], extra=1)
    opt.register_load_state_dict_pre_hook(pre_hook)
    opt.load_state_dict(loaded)
    assert loaded["extra"] == 1


def test_a_learning_rate_of_any_real_number_type_steps():
    """check_hyperparameters accepts any real number (numbers.Real), so the step takes one: a
    Fraction lr steps exactly as the float (it used to fail inside the step, after earlier groups)."""
    from fractions import Fraction

    params, twins = make_params(), None
    twins = copies(params)
    opt, twin = Adam32bit(params, lr=Fraction(1, 1000), betas=(Fraction(9, 10), 0.999)), Adam32bit(twins, lr=1e-3)
    for _ in range(3):
        set_twin_grads(params, twins)
        opt.step()
        twin.step()
    for p, q in zip(params, twins):
        assert torch.equal(p, q)


def test_lazy_module_parameters_step_after_their_first_forward():
    """A lazy module's parameters have no shape until its first forward: the optimizer takes them
    (as torch.optim and bitsandbytes do) and checks them at their first step; Adam32bit then steps
    as AdamW."""
    x = torch.randn(2, 8)
    runs = []
    for make in (lambda ps: Adam32bit(ps, lr=1e-2, weight_decay=0.1), lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1)):
        model = torch.nn.LazyLinear(4)
        opt = make(model.parameters())
        torch.manual_seed(1)  # the same initial values once materialized
        for _ in range(3):
            model(x).square().sum().backward()
            opt.step()
            opt.zero_grad()
        runs.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    opt = Adam8bit(torch.nn.LazyLinear(4).parameters(), min_8bit_size=0)
    with pytest.raises(ValueError, match=r"parameter 0 is uninitialized \(a lazy module's, before its first "
                                         r"forward\).*run a forward first"):
        opt.load_state_dict({"state": {0: {"step": 1}}, "param_groups": opt.state_dict()["param_groups"]})


def test_dtensor_parameters_are_refused_by_name(tmp_path):
    """FSDP2 (fully_shard) and tensor parallelism make DTensor parameters, which the ops cannot take:
    refused when the optimizer is made, naming the parameter, before any state exists (not at the
    first step, after a half-made state)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        plain = torch.nn.Parameter(torch.randn(3))
        sharded = torch.nn.Parameter(distribute_tensor(torch.randn(64, 8), init_device_mesh("cpu", (1,)), [Shard(0)]))
        for cls in (Adam32bit, Adam8bit):
            with pytest.raises(TypeError, match=rf"{cls.__name__}: parameter 1 of group 0 \(shape \[64, 8\]\) is a "
                                                r"DTensor \(FSDP2's fully_shard, tensor parallelism\)"):
                cls([plain, sharded])
    finally:
        dist.destroy_process_group()


def test_betas_as_a_numpy_array_or_tensor_pair():
    """Any pair works as torch.optim.AdamW takes it: a numpy array of two (a config file's), a tensor of two."""
    import numpy as np

    for betas in (np.array([0.9, 0.99]), torch.tensor([0.9, 0.99], dtype=torch.float64)):
        p = torch.nn.Parameter(torch.randn(100))
        q = torch.nn.Parameter(p.detach().clone())
        opt, ref = Adam32bit([p], lr=0.1, betas=betas), torch.optim.AdamW([q], lr=0.1, betas=betas, weight_decay=0)
        for _ in range(3):
            p.grad = torch.randn(100)
            q.grad = p.grad.clone()
            opt.step()
            ref.step()
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)
        buffer = io.BytesIO()  # (numpy scalars in a state_dict would not load with weights_only=True)
        torch.save(opt.state_dict(), buffer)
        buffer.seek(0)
        opt.load_state_dict(torch.load(buffer, weights_only=True))
    for bad in ("ab", np.array([0.9]), 5, {0.9, 0.99}):
        with pytest.raises(ValueError, match=r"Invalid betas: .*; expected a pair \(beta1, beta2\)"):
            Adam32bit([torch.nn.Parameter(torch.randn(3))], betas=bad)


def test_torch_optim_group_options_that_change_the_math_are_refused():
    """A group copied from a torch optimizer's param_groups (or edited since) with maximize=True, or
    decoupled_weight_decay=False beside weight decay (torch.optim.Adam's L2 penalty), would be
    silently ignored: refused, at add_param_group and at a step, before anything changes. torch's
    performance flags change nothing here and pass, as does decoupled_weight_decay=False without
    weight decay (torch.optim.Adam's default groups)."""
    def params():
        return list(torch.nn.Linear(4, 3).parameters())

    for cls in (Adam32bit, Adam8bit):
        with pytest.raises(ValueError, match=rf"{cls.__name__}: group 0 sets maximize=True, which this optimizer "
                                             r"does not support"):
            cls([{"params": params(), "maximize": True}])
        with pytest.raises(ValueError, match=r"group 1 sets decoupled_weight_decay=False with weight_decay=0.1: "
                                             r"weight decay here is always decoupled"):
            cls([{"params": params()}, {"params": params(), "decoupled_weight_decay": False, "weight_decay": 0.1}])
        cls([{"params": params(), **torch.optim.Adam(params()).param_groups[0], "params": params()}])
        ps = params()
        opt = cls(ps)
        for p in ps:
            p.grad = torch.randn_like(p)
        opt.param_groups[0]["maximize"] = True
        before = [p.clone() for p in ps]
        with pytest.raises(ValueError, match=r"maximize=True"):
            opt.step()
        assert all(torch.equal(p, b) for p, b in zip(ps, before)) and not opt.state


def test_a_torch_adamw_state_dict_is_named_when_refused():
    model = torch.nn.Linear(4, 3)
    adamw = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 4)).sum().backward()
    adamw.step()
    with pytest.raises(ValueError, match=r"got \['exp_avg', 'exp_avg_sq', 'step'\]; this is a torch.optim Adam / "
                                         r"AdamW state dict"):
        Adam32bit(model.parameters()).load_state_dict(adamw.state_dict())


def test_grad_scaler_with_internal_unscaling_turned_off_on_the_instance():
    """The README's way around frameworks that refuse gradient clipping for optimizers that unscale
    internally (Lightning): with the instance's _step_supports_amp_scaling off, torch.amp.GradScaler
    unscales (so the gradients can be clipped) and skips inf steps itself; the steps equal those
    with the flag on."""
    runs = []
    for internal in (True, False):
        torch.manual_seed(0)
        model = torch.nn.Linear(8, 4)
        opt = Adam8bit(model.parameters(), min_8bit_size=0)
        if not internal:
            opt._step_supports_amp_scaling = False
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        for step in range(4):
            loss = model(torch.randn(16, 8)).square().mean() * (math.inf if step == 2 else 1.0)
            scaler.scale(loss).backward()
            if not internal:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1e9)  # (allowed now: unscaled gradients)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
        runs.append([p.detach().clone() for p in model.parameters()] + [opt.state[model.weight]["step"].clone()])
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert runs[0][-1] == 3  # the inf step skipped


def test_each_group_is_scanned_once_per_step_and_no_gradient_is_kept(monkeypatch):
    """The checks before a step scan every group (a bad parameter anywhere stops the step); each
    group's batching then uses that scan, not a second one. Nothing of the step keeps a gradient
    alive after it (zero_grad(set_to_none=True) frees them)."""
    import weakref

    from torchadam8 import optim as optim_module

    calls = []
    scan = optim_module._scan
    monkeypatch.setattr(optim_module, "_scan", lambda *a: calls.append(len(a[0])) or scan(*a))
    groups = [list(torch.nn.Linear(8, 8).parameters()) for _ in range(3)]
    opt = Adam8bit([{"params": g} for g in groups], min_8bit_size=0)
    for step in range(3):
        for g in groups:
            for p in g:
                p.grad = torch.randn_like(p)
        calls.clear()
        opt.step()
        # (the first step scans again after making the states)
        assert calls == [2, 2, 2] * (2 if step == 0 else 1), (step, calls)
    grads = [weakref.ref(p.grad) for g in groups for p in g]
    opt.zero_grad(set_to_none=True)
    assert all(ref() is None for ref in grads)
