"""Registry entries of the Adam update ops (32-bit and blockwise 8-bit states)."""

from __future__ import annotations

import math
import random

import torch

from . import checks
from .opinfo import ErrorInput, OpInfo, SampleInput
from .quantize import dequantize_reference, quantize_reference
from .testing import EPS, assert_close_scaled, make_code, randn

ADAM = "adam8.adam_step"
ADAM8 = "adam8.adam8bit_blockwise_step"
BLOCK = 256  # the optimizer's state block (csrc/adam8_math.h: kStateBlock)


# ---------------------------------------------------------------- fakes
def adam_fake(params, grads, exp_avgs, exp_avg_sqs, steps, lr, beta1, beta2, eps, weight_decay):
    states = (("exp_avgs", exp_avgs, torch.float32), ("exp_avg_sqs", exp_avg_sqs, torch.float32))
    checks.check_adam_common(ADAM, params, grads, states, steps, lr, beta1, beta2, eps, weight_decay)


def adam8bit_fake(
    params, grads, state1, state2, steps, absmax1, absmax2, qmap1, qmap2, lr, beta1, beta2, eps, weight_decay
):
    states = (("state1", state1, torch.uint8), ("state2", state2, torch.uint8))
    checks.check_adam_common(ADAM8, params, grads, states, steps, lr, beta1, beta2, eps, weight_decay)
    checks.check_absmax_lists(ADAM8, params, absmax1, absmax2, BLOCK)
    device = params[0].device if params else lr.device
    checks.check_code(ADAM8, "qmap1", qmap1, device)
    checks.check_code(ADAM8, "qmap2", qmap2, device)


# ---------------------------------------------------------------- references
def _adam_fp64(p, g, m, v, step, lr, beta1, beta2, eps, weight_decay):
    """One AdamW step in float64 (Loshchilov & Hutter, Algorithm 2): returns new p, m, v."""
    g = g.double()
    m = beta1 * m.double() + (1 - beta1) * g
    v = beta2 * v.double() + (1 - beta2) * g * g
    denom = v.sqrt() / math.sqrt(1 - beta2**step) + eps
    p = p.double() * (1 - lr * weight_decay) - lr / (1 - beta1**step) * m / denom
    return p, m, v


def adam_reference(params, grads, exp_avgs, exp_avg_sqs, steps, lr, beta1, beta2, eps, weight_decay):
    for p, g, m, v, t in zip(params, grads, exp_avgs, exp_avg_sqs, steps):
        t.add_(1)
        p64, m64, v64 = _adam_fp64(p, g, m, v, t.item(), lr.item(), beta1, beta2, eps, weight_decay)
        p.copy_(p64)
        m.copy_(m64)
        v.copy_(v64)


def _flat(t: torch.Tensor) -> torch.Tensor:
    """The elements of a dense tensor in memory order (blocks follow memory, not indexing)."""
    return t.as_strided((t.numel(),), (1,))


def adam8bit_reference(
    params, grads, state1, state2, steps, absmax1, absmax2, qmap1, qmap2, lr, beta1, beta2, eps, weight_decay
):
    for p, g, s1, s2, t, a1, a2 in zip(params, grads, state1, state2, steps, absmax1, absmax2):
        m = dequantize_reference(_flat(s1), a1, qmap1, BLOCK, torch.float32)
        v = dequantize_reference(_flat(s2), a2, qmap2, BLOCK, torch.float32)
        t.add_(1)
        p64, m64, v64 = _adam_fp64(_flat(p), _flat(g), m, v, t.item(), lr.item(), beta1, beta2, eps, weight_decay)
        _flat(p).copy_(p64)
        for s, a, x, code in ((s1, a1, m64, qmap1), (s2, a2, v64, qmap2)):
            q, amax = quantize_reference(x.float(), code, BLOCK)
            _flat(s).copy_(q)
            a.copy_(amax)


# ---------------------------------------------------------------- samples
SHAPES = ((1,), (255,), (257,), (3, 5), (0,), (4097,), (16, 33))


def _hyper(device):
    """lr tensor and scalar hyperparameters, drawn afresh."""
    lr = torch.tensor(10 ** random.uniform(-4, -2), device=device)
    return lr, {
        "beta1": random.choice((0.0, 0.9, random.uniform(0.5, 0.99))),
        "beta2": random.choice((0.999, random.uniform(0.9, 0.9999))),
        "eps": random.choice((1e-8, 1e-6)),
        "weight_decay": random.choice((0.0, 0.01, 0.1)),
    }


def _params(shapes, dtypes, device, transposed=False):
    params = [randn(*s, dtype=d, device=device) for s, d in zip(shapes, dtypes)]
    if transposed:  # a permuted dense tensor: states and grads follow its strides
        params.append(randn(9, 20, device=device).t())
    grads = [torch.empty_like(p).copy_(randn(*p.shape, device=device)) for p in params]
    steps = [torch.tensor(float(random.randint(0, 300)), device=device) for _ in params]
    return params, grads, steps


def _adam_sample(shapes, dtypes, device, transposed=False):
    params, grads, steps = _params(shapes, dtypes, device, transposed)
    m = [torch.empty_like(p, dtype=torch.float32).copy_(randn(*p.shape, device=device) * 1e-2) for p in params]
    v = [torch.empty_like(p, dtype=torch.float32).copy_(randn(*p.shape, device=device, positive=True) * 1e-4) for p in params]
    lr, hyper = _hyper(device)
    return SampleInput((params, grads, m, v, steps, lr), hyper)


def _adam8bit_sample(shapes, dtypes, device, transposed=False):
    params, grads, steps = _params(shapes, dtypes, device, transposed)
    qmap1, qmap2 = make_code(True, device), make_code(False, device)
    s1, s2, a1, a2 = [], [], [], []
    for p in params:
        for states, absmax, code, values in (
            (s1, a1, qmap1, randn(p.numel(), device=device) * 1e-2),
            (s2, a2, qmap2, randn(p.numel(), device=device, positive=True) * 1e-4),
        ):
            q, amax = quantize_reference(values, code, BLOCK)
            state = torch.empty_like(p, dtype=torch.uint8)
            _flat(state).copy_(q)
            states.append(state)
            absmax.append(amax)
    lr, hyper = _hyper(device)
    return SampleInput((params, grads, s1, s2, steps, a1, a2, qmap1, qmap2, lr), hyper)


def _mixed_dtypes(n):
    return [checks.PARAM_DTYPES[i % 3] for i in range(n)]


def adam_samples(device):
    yield _adam_sample(SHAPES, _mixed_dtypes(len(SHAPES)), device, transposed=True)
    yield _adam_sample((), (), device)
    for d in checks.PARAM_DTYPES:
        yield _adam_sample(((300,), (2, 2)), (d, d), device)


def adam8bit_samples(device):
    yield _adam8bit_sample(SHAPES, _mixed_dtypes(len(SHAPES)), device, transposed=True)
    yield _adam8bit_sample((), (), device)
    for d in checks.PARAM_DTYPES:
        yield _adam8bit_sample(((700,), (2, 2)), (d, d), device)


def adam_sweep(device, dtype, numel):
    yield _adam_sample(((numel,), (3,)), (dtype, torch.float32), device)


def adam8bit_sweep(device, dtype, numel):
    yield _adam8bit_sample(((numel,), (3,)), (dtype, torch.float32), device)


def _adam_errors(make, state_names, state_dtype, device):
    """Error inputs shared by both Adam ops; `make` builds a valid sample to break."""

    def broken(change, error, regex):
        s = make(((300,), (2, 3)), (torch.float32, torch.float32), device)
        args, kwargs = list(s.args), dict(s.kwargs)
        change(args, kwargs)
        return ErrorInput(SampleInput(tuple(args), kwargs), error, regex)

    def set_item(index, i, value):
        return lambda a, k: a[index].__setitem__(i, value(a[index][i]))

    op = ADAM if make is _adam_sample else ADAM8
    lr_index = 5 if op == ADAM else 9
    yield broken(lambda a, k: a[1].pop(), ValueError, rf"{op}: grads has 1 tensors but params has 2")
    yield broken(lambda a, k: a[2].pop(), ValueError, rf"{state_names[0]} has 1 tensors but params has 2")
    yield broken(lambda a, k: a[4].pop(), ValueError, r"steps has 1 tensors but params has 2")
    yield broken(lambda a, k: k.update(beta1=1.0), ValueError, r"beta1 must be in \[0, 1\), got 1")
    yield broken(lambda a, k: k.update(beta2=-0.5), ValueError, r"beta2 must be in \[0, 1\), got -0.5")
    yield broken(lambda a, k: k.update(eps=-1e-8), ValueError, r"eps must be >= 0, got -1e-08")
    yield broken(lambda a, k: k.update(weight_decay=-0.1), ValueError, r"weight_decay must be >= 0, got -0.1")
    yield broken(lambda a, k: a.__setitem__(lr_index, a[lr_index].double()), TypeError, r"lr has dtype torch.float64")
    yield broken(lambda a, k: a.__setitem__(lr_index, torch.ones(2, device=device)), ValueError, r"lr has 2 elements")
    yield broken(set_item(0, 1, lambda p: p.to(torch.complex64)), TypeError, r"params\[1\] has dtype torch.complex64")
    yield broken(set_item(0, 0, lambda p: p.double()), TypeError, r"params\[0\] has dtype torch.float64; expected")
    yield broken(set_item(1, 0, lambda g: g.half()), TypeError, r"grads\[0\] has dtype torch.float16 but params\[0\]")
    yield broken(set_item(1, 1, lambda g: g.reshape(3, 2)), ValueError, r"grads\[1\] has shape \[3, 2\] but params\[1\] has shape \[2, 3\]")
    yield broken(set_item(1, 1, lambda g: g.t().contiguous().t()), ValueError, r"grads\[1\] has strides \[1, 2\] but params\[1\] has strides \[3, 1\]")
    yield broken(set_item(2, 0, lambda s: s.to(torch.bfloat16)), TypeError, rf"{state_names[0]}\[0\] has dtype torch.bfloat16; expected {state_dtype}")
    yield broken(set_item(3, 1, lambda s: s.reshape(6)), ValueError, rf"{state_names[1]}\[1\] has shape \[6\] but params\[1\]")
    yield broken(set_item(4, 1, lambda t: t.long()), TypeError, r"steps\[1\] has dtype torch.int64")
    yield broken(set_item(4, 0, lambda t: t.repeat(2)), ValueError, r"steps\[0\] has 2 elements; expected 1")

    def strided(a, k):  # a parameter that skips every other element, and matching grad and states
        for index in range(4):
            a[index][0] = (torch.rand(600, device=device) * 200).to(a[index][0].dtype)[::2]

    yield broken(strided, ValueError, r"params\[0\] with shape \[300\] and strides \[2\] is not dense")
    if torch.device(device).type != "cpu":
        yield broken(lambda a, k: a.__setitem__(lr_index, a[lr_index].cpu()), ValueError, r"lr is on cpu but the parameters are on")
        yield broken(set_item(1, 0, lambda g: g.cpu()), ValueError, r"grads\[0\] is on cpu but the parameters are on")


def adam_errors(device):
    yield from _adam_errors(_adam_sample, ("exp_avgs", "exp_avg_sqs"), "torch.float32", device)


def adam8bit_errors(device):
    yield from _adam_errors(_adam8bit_sample, ("state1", "state2"), "torch.uint8", device)

    def broken(change, error, regex):
        s = _adam8bit_sample(((300,), (2, 3)), (torch.float32, torch.float32), device)
        args = list(s.args)
        change(args)
        return ErrorInput(SampleInput(tuple(args), s.kwargs), error, regex)

    yield broken(lambda a: a[5].pop(), ValueError, r"absmax1 has 1 tensors but params has 2")
    yield broken(lambda a: a[6].__setitem__(0, a[6][0][:1]), ValueError, r"absmax2\[0\] has 1 elements; expected 2")
    yield broken(lambda a: a[5].__setitem__(1, a[5][1].half()), TypeError, r"absmax1\[1\] has dtype torch.float16")
    yield broken(lambda a: a.__setitem__(7, a[7][:128]), ValueError, r"qmap1 has 128 elements; expected 256")
    yield broken(lambda a: a.__setitem__(8, a[8].double()), TypeError, r"qmap2 has dtype torch.float64")


# ---------------------------------------------------------------- comparisons
def _compare_params(params_k, params_r, what):
    for i, (pk, pr) in enumerate(zip(params_k, params_r)):
        assert_close_scaled(pk, pr, rtol=4 * EPS[pk.dtype], scale_tol=1e-6, what=f"{what}[{i}]")


def adam_compare(sample, kernel, reference):
    (pk, _, mk, vk, *_), (pr, _, mr, vr, *_) = kernel[0], reference[0]
    _compare_params(pk, pr, "params")
    for name, xs_k, xs_r in (("exp_avgs", mk, mr), ("exp_avg_sqs", vk, vr)):
        for i, (xk, xr) in enumerate(zip(xs_k, xs_r)):
            assert_close_scaled(xk, xr, rtol=1e-6, scale_tol=1e-6, what=f"{name}[{i}]")


def adam8bit_compare(sample, kernel, reference):
    """Codes may differ by one where a moment lies within float rounding of a decision bound."""
    (pk, _, s1k, s2k, _, a1k, a2k, *_), (pr, _, s1r, s2r, _, a1r, a2r, *_) = kernel[0], reference[0]
    _compare_params(pk, pr, "params")
    for name, qs_k, qs_r, am_k, am_r in (("state1", s1k, s1r, a1k, a1r), ("state2", s2k, s2r, a2k, a2r)):
        for i, (qk, qr) in enumerate(zip(qs_k, qs_r)):
            assert_close_scaled(am_k[i], am_r[i], rtol=1e-5, scale_tol=0.0, what=f"absmax of {name}[{i}]")
            diff = (qk.int() - qr.int()).abs()
            flips = int((diff > 0).sum())
            worst = int(diff.max()) if diff.numel() else 0
            assert worst <= 1 and flips <= 2 + 1e-3 * qk.numel(), (
                f"{name}[{i}]: {flips} of {qk.numel()} codes differ from the reference (max by {worst})"
            )


ADAM_STEP = OpInfo(
    name="adam_step",
    schema=(
        "(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] steps, "
        "Tensor lr, float beta1, float beta2, float eps, float weight_decay) -> ()"
    ),
    doc="One AdamW step with fp32 moments over a list of parameters; advances each step count by one.",
    fake=adam_fake,
    reference=adam_reference,
    sample_inputs=adam_samples,
    sweep_inputs=adam_sweep,
    error_inputs=adam_errors,
    compare=adam_compare,
)

ADAM8BIT_BLOCKWISE_STEP = OpInfo(
    name="adam8bit_blockwise_step",
    schema=(
        "(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] state1, Tensor(c!)[] state2, Tensor(d!)[] steps, "
        "Tensor(e!)[] absmax1, Tensor(f!)[] absmax2, Tensor qmap1, Tensor qmap2, "
        "Tensor lr, float beta1, float beta2, float eps, float weight_decay) -> ()"
    ),
    doc="The same with uint8 moments (codes of qmap1 / qmap2, one absmax per 256 values), requantized after the update.",
    fake=adam8bit_fake,
    reference=adam8bit_reference,
    sample_inputs=adam8bit_samples,
    sweep_inputs=adam8bit_sweep,
    error_inputs=adam8bit_errors,
    compare=adam8bit_compare,
)
