"""Mixed precision: torch.amp.GradScaler hands the optimizer grad_scale and found_inf
(``_step_supports_amp_scaling``); the kernels unscale the gradients and skip a step whose
gradients held an inf, with no host sync, as torch.optim.AdamW(fused=True) does."""

import pytest
import torch

import torchadam8
from conftest import DEVICES

OPTIONS = {
    "defaults": {},
    "amsgrad": {"amsgrad": True},
    "percentile_clipping": {"percentile_clipping": 5},
    "per_tensor": {"block_wise": False},
    "max_unorm": {"args": None},  # replaced below (needs an args object)
}


def model_and_data(device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 8)).to(device)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    data = [(torch.randn(16, 32, generator=gen).to(device), torch.randn(16, 8, generator=gen).to(device))
            for _ in range(20)]
    return model, data


def train(model, opt, scaler, data, poisoned=(4, 9)):
    """One scaled step per batch; at the `poisoned` steps one gradient element is inf, so the
    scaler must skip the step and halve its scale. Returns the scales seen."""
    scales = []
    for i, (x, y) in enumerate(data):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        scaler.scale(loss).backward()
        if i in poisoned:
            model[0].weight.grad[0, 0] = float("inf")
        scaler.step(opt)
        scaler.update()
        scales.append(float(scaler.get_scale()))
    return scales


@pytest.mark.parametrize("device", DEVICES)
def test_gradscaler_training_matches_fused_adamw(device):
    """20 scaled steps, two of them skipped: same parameters, scales and step counts as torch."""
    model, data = model_and_data(device)
    twin, _ = model_and_data(device)
    opt = torchadam8.Adam32bit(model.parameters(), lr=1e-2, weight_decay=0.1)
    ref = torch.optim.AdamW(twin.parameters(), lr=1e-2, weight_decay=0.1, fused=True)
    scaler = torch.amp.GradScaler(device, init_scale=2.0**12, growth_interval=3)
    ref_scaler = torch.amp.GradScaler(device, init_scale=2.0**12, growth_interval=3)
    scales = train(model, opt, scaler, data)
    ref_scales = train(twin, ref, ref_scaler, data)
    assert scales == ref_scales
    assert scales[4] == scales[3] / 2 and scales[9] == scales[8] / 2  # the poisoned steps were seen
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        assert float(opt.state[p]["step"]) == float(ref.state[q]["step"]) == 18.0


def amp_optimizer(cls, params, option):
    if option == "max_unorm":
        from types import SimpleNamespace
        args = SimpleNamespace(optim_bits=32, min_8bit_size=4096, percentile_clipping=100, block_wise=True,
                               max_unorm=0.5, skip_zeros=False)
        return cls(params, lr=1e-2, args=args, min_8bit_size=1)
    return cls(params, lr=1e-2, min_8bit_size=1, **OPTIONS[option])


@pytest.mark.parametrize("option", OPTIONS)
@pytest.mark.parametrize("cls", [torchadam8.Adam8bit, torchadam8.Adam32bit], ids=lambda c: c.__name__)
@pytest.mark.parametrize("device", DEVICES)
def test_scaled_training_equals_unscaled(device, cls, option):
    """With a power-of-two scale, unscaling in the kernel is exact: a GradScaler run gives the
    parameters of a run without one, bit for bit, the skipped steps left out."""
    model, data = model_and_data(device)
    twin, _ = model_and_data(device)
    opt, ref = amp_optimizer(cls, model.parameters(), option), amp_optimizer(cls, twin.parameters(), option)
    scaler = torch.amp.GradScaler(device, init_scale=2.0**10, growth_interval=4)
    train(model, opt, scaler, data)
    if option != "percentile_clipping":  # the scaler left the gradients scaled: the kernels unscaled them
        x, y = data[0]
        scaled = model[2].weight.grad.clone()
        assert not torch.equal(scaled, torch.zeros_like(scaled))
        model.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        assert float(scaled.norm()) > 100 * float(model[2].weight.grad.norm())
    for i, (x, y) in enumerate(data):
        if i in (4, 9):
            continue
        ref.zero_grad()
        torch.nn.functional.mse_loss(twin(x), y).backward()
        ref.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)
        for key, value in ref.state[q].items():
            assert torch.equal(opt.state[p][key], value), key


@pytest.mark.parametrize("option", OPTIONS)
@pytest.mark.parametrize("cls", [torchadam8.Adam8bit, torchadam8.Adam32bit], ids=lambda c: c.__name__)
@pytest.mark.parametrize("device", DEVICES)
def test_skipped_step_changes_nothing(device, cls, option):
    model, data = model_and_data(device)
    opt = amp_optimizer(cls, model.parameters(), option)
    scaler = torch.amp.GradScaler(device, init_scale=2.0**10)
    train(model, opt, scaler, data[:3], poisoned=())
    before = {p: (p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()}) for p in model.parameters()}
    train(model, opt, scaler, data[3:4], poisoned=(0,))
    assert float(scaler.get_scale()) == 2.0**9
    for p, (value, state) in before.items():
        assert torch.equal(p, value)
        for key, tensor in state.items():
            if key != "gnorm_vec":  # the clipping history records the step (documented)
                assert torch.equal(opt.state[p][key], tensor), key


@pytest.mark.parametrize("option", ["defaults", "percentile_clipping"])
@pytest.mark.parametrize("device", DEVICES)
def test_grad_scale_and_found_inf_of_shape_one(device, option):
    """A scaler whose scale and found_inf are (1,) tensors (GradScaler's are 0-dim) unscales as well:
    the parameters equal an unscaled run's, bit for bit (the scale is a power of two)."""
    model, data = model_and_data(device)
    twin, _ = model_and_data(device)
    opt = amp_optimizer(torchadam8.Adam8bit, model.parameters(), option)
    ref = amp_optimizer(torchadam8.Adam8bit, twin.parameters(), option)
    for x, y in data[:3]:
        opt.zero_grad()
        ref.zero_grad()
        (torch.nn.functional.mse_loss(model(x), y) * 256.0).backward()
        torch.nn.functional.mse_loss(twin(x), y).backward()
        opt.grad_scale = torch.full((1,), 256.0, device=device)
        opt.found_inf = torch.zeros(1, device=device)
        opt.step()
        del opt.grad_scale, opt.found_inf
        ref.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("cls", [torchadam8.Adam8bit, torchadam8.Adam32bit], ids=lambda c: c.__name__)
@pytest.mark.parametrize("device", DEVICES)
def test_clipping_turned_on_mid_training_under_gradscaler(device, cls):
    """Percentile clipping switched on after some steps starts its history from this step's
    unscaled norm: a GradScaler run equals an unscaled one, bit for bit (a history seeded from the
    scaled gradient would hold norms 2^20 times too large and clip nothing)."""
    model, data = model_and_data(device)
    twin, _ = model_and_data(device)
    opt = cls(model.parameters(), lr=1e-2, min_8bit_size=1)
    ref = cls(twin.parameters(), lr=1e-2, min_8bit_size=1)
    scaler = torch.amp.GradScaler(device, init_scale=2.0**10, growth_interval=1000)
    for i, (x, y) in enumerate(data[:8]):
        if i == 3:
            opt.args.percentile_clipping = ref.args.percentile_clipping = 5
        opt.zero_grad()
        ref.zero_grad()
        scaler.scale(torch.nn.functional.mse_loss(model(x), y)).backward()
        scaler.step(opt)
        scaler.update()
        torch.nn.functional.mse_loss(twin(x), y).backward()
        ref.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(opt.state[p]["gnorm_vec"], ref.state[q]["gnorm_vec"])
        assert torch.equal(p, q)


def test_compiled_step_with_gradscaler_equals_eager():
    model, data = model_and_data("cpu")
    twin, _ = model_and_data("cpu")
    opt = torchadam8.Adam8bit(model.parameters(), lr=1e-2, min_8bit_size=1)
    ref = torchadam8.Adam8bit(twin.parameters(), lr=1e-2, min_8bit_size=1)
    opt.step = torch.compile(opt.step, fullgraph=True)
    scales = train(model, opt, torch.amp.GradScaler("cpu", init_scale=2.0**10), data[:12])
    ref_scales = train(twin, ref, torch.amp.GradScaler("cpu", init_scale=2.0**10), data[:12])
    assert scales == ref_scales
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)
