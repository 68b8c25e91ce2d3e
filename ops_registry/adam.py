"""Registry entries of the Adam update ops (32-bit and 8-bit states), every option of the
optimizers included: amsgrad (a third state), percentile clipping's gradient factors, max_unorm,
skip_zeros and, for 8-bit states, one scale per block of 256 values or one per tensor."""

from __future__ import annotations

import math
import random

import torch

from . import checks
from .opinfo import ErrorInput, OpInfo, SampleInput
from .quantize import dequantize_reference, quantize_reference
from .testing import EPS, assert_close_scaled, make_code, randn

ADAM = "adam8.adam_step"
ADAM8 = "adam8.adam8bit_step"
BLOCK = 256  # the optimizer's state block (csrc/adam8_math.h: kStateBlock)

# Positions of the tensor arguments (the floats and flags are passed by name).
ADAM_ARGS = ("params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "steps", "lr", "betas", "gnorm_scales",
             "found_inf")
ADAM8_ARGS = ("params", "grads", "state1", "state2", "state3", "steps", "absmax1", "absmax2", "absmax3",
              "qmap1", "qmap2", "lr", "betas", "gnorm_scales", "found_inf")


# ---------------------------------------------------------------- fakes
def adam_fake(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, lr, betas, gnorm_scales, found_inf, eps,
              weight_decay, max_unorm, skip_zeros):
    f32 = torch.float32
    states = (("exp_avgs", exp_avgs, f32, False), ("exp_avg_sqs", exp_avg_sqs, f32, False),
              ("max_exp_avg_sqs", max_exp_avg_sqs, f32, True))
    checks.check_adam_common(ADAM, params, grads, states, steps, lr, betas, eps, weight_decay)
    checks.check_nonnegative(ADAM, "max_unorm", max_unorm)
    device = params[0].device if params else lr.device
    checks.check_gnorm_scales(ADAM, gnorm_scales, len(params), device)
    checks.check_found_inf(ADAM, found_inf, device)


def adam8bit_fake(params, grads, state1, state2, state3, steps, absmax1, absmax2, absmax3, qmap1, qmap2, lr, betas,
                  gnorm_scales, found_inf, eps, weight_decay, max_unorm, skip_zeros, block_wise):
    u8 = torch.uint8
    states = (("state1", state1, u8, False), ("state2", state2, u8, False), ("state3", state3, u8, True))
    checks.check_adam_common(ADAM8, params, grads, states, steps, lr, betas, eps, weight_decay)
    checks.check_length(ADAM8, "absmax1", len(absmax1), "params", len(params))
    checks.check_length(ADAM8, "absmax2", len(absmax2), "params", len(params))
    checks.check_length(ADAM8, "absmax3", len(absmax3), "state3", len(state3))
    for name, absmax in (("absmax1", absmax1), ("absmax2", absmax2), ("absmax3", absmax3)):
        checks.check_absmax_list(ADAM8, name, params, absmax, block_wise, BLOCK)
    device = params[0].device if params else lr.device
    checks.check_code(ADAM8, "qmap1", qmap1, device)
    checks.check_code(ADAM8, "qmap2", qmap2, device)
    checks.check_nonnegative(ADAM8, "max_unorm", max_unorm)
    checks.check_gnorm_scales(ADAM8, gnorm_scales, len(params), device)
    checks.check_found_inf(ADAM8, found_inf, device)


# ---------------------------------------------------------------- references
def _flat(t: torch.Tensor) -> torch.Tensor:
    """The elements of a dense tensor in memory order (blocks follow memory, not indexing)."""
    return t.as_strided((t.numel(),), (1,))


def _scaled_gradient(g, grad_scale):
    """g * grad_scale in float64, and where it is usable: finite, with a float32 square that is too."""
    g32 = g.float() * torch.tensor(grad_scale, dtype=torch.float32, device=g.device)
    return g.double() * grad_scale, (g32 * g32).isfinite()


def _v_floor(beta1, beta2):
    """1 / K of the moment bound of quantized states (csrc/adam8_math.h); 0 when b1^2 >= b2."""
    r = beta1 * beta1 / beta2 if beta2 > 0 else math.inf
    return (1 - beta2) * (1 - r) / (1 - beta1) ** 2 if r < 1 else 0.0


def _adam_fp64(p, g, m, v, vm, step, lr, beta1, beta2, eps, weight_decay, grad_scale, max_unorm, skip_zeros,
               quantized=False):
    """One step in float64 on flat tensors, written from the options' descriptions: returns new
    p, m, v, vm (vm None without amsgrad).

    AdamW (Loshchilov & Hutter, Algorithm 2; amsgrad as torch.optim.AdamW) on g * grad_scale.
    Elements whose scaled gradient is not finite, or whose square in float32 is not (its v would
    overflow), are not updated and get m = v = 0; with skip_zeros, elements whose gradient is 0
    keep p, m, v. max_unorm > 0 scales the step so that the norm of m_hat / (sqrt(v_hat) + eps)
    stays within max_unorm times the norm of p. `quantized` (8-bit states): the new v is at least
    m^2 / K, K = (1 - beta1)^2 / ((1 - beta2) (1 - beta1^2 / beta2)) when beta1^2 < beta2, the
    bound exact Adam keeps and quantization can break (csrc/adam8_math.h says how).
    """
    g, finite = _scaled_gradient(g, grad_scale)
    m, v, p = m.double(), v.double(), p.double()
    update = finite & (g != 0) if skip_zeros else finite
    g = torch.where(finite, g, 0.0)
    m_new = beta1 * m + (1 - beta1) * g
    v_new = beta2 * v + (1 - beta2) * g * g
    floor = _v_floor(beta1, beta2) if quantized else 0.0
    if floor > 0:
        v_new = torch.maximum(v_new, m_new * m_new * floor)
    bc1, bc2 = 1 - beta1**step, 1 - beta2**step
    if vm is not None:
        vm = torch.where(update, torch.maximum(vm.double(), v_new), vm.double())
    denom = (vm if vm is not None else v_new).sqrt() / math.sqrt(bc2) + eps
    direction = torch.where(update, m_new / denom, 0.0)
    scale = 1.0
    if max_unorm > 0:
        unorm = float(direction.square().sum().sqrt()) / bc1
        limit = max_unorm * float(p.square().sum().sqrt())
        scale = limit / unorm if unorm > limit else 1.0
    p_new = p * (1 - lr * weight_decay) - lr / bc1 * scale * direction
    p = torch.where(update, p_new, p)
    m = torch.where(update, m_new, torch.where(finite, m, 0.0))
    v = torch.where(update, v_new, torch.where(finite, v, 0.0))
    return p, m, v, vm


def _skipped(found_inf) -> bool:
    """GradScaler found an inf or NaN: the step changes nothing, step counts included."""
    return found_inf is not None and found_inf.item() != 0


def _grad_scales(gnorm_scales, n):
    return [1.0] * n if gnorm_scales is None else gnorm_scales.double().tolist()


def adam_reference(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, lr, betas, gnorm_scales, found_inf,
                   eps, weight_decay, max_unorm, skip_zeros):
    beta1, beta2 = betas.tolist()
    if _skipped(found_inf):
        return
    vms = max_exp_avg_sqs or [None] * len(params)
    for p, g, m, v, vm, t, gs in zip(params, grads, exp_avgs, exp_avg_sqs, vms, steps,
                                     _grad_scales(gnorm_scales, len(params))):
        t.add_(1)
        out = _adam_fp64(_flat(p), _flat(g), _flat(m), _flat(v), None if vm is None else _flat(vm), t.item(),
                         lr.item(), beta1, beta2, eps, weight_decay, gs, max_unorm, skip_zeros)
        for dst, src in zip((p, m, v, vm), out):
            if dst is not None:
                _flat(dst).copy_(src)


def quantize_per_tensor(x: torch.Tensor, code: torch.Tensor, keep_positive: bool = False):
    """Nearest codes of x / max|x| (the codes of block_wise=False) and that scale, shape [1]."""
    q, absmax = quantize_reference(x.reshape(1, -1), code, max(x.numel(), 1), keep_positive)
    return q.reshape(x.shape), absmax.reshape(1) if absmax.numel() else x.new_zeros(1)


def adam8bit_reference(params, grads, state1, state2, state3, steps, absmax1, absmax2, absmax3, qmap1, qmap2, lr,
                       betas, gnorm_scales, found_inf, eps, weight_decay, max_unorm, skip_zeros, block_wise):
    beta1, beta2 = betas.tolist()
    if _skipped(found_inf):
        return
    n = len(params)
    s3, a3 = (state3, absmax3) if state3 else ([None] * n, [None] * n)
    for i, (p, g, t, gs) in enumerate(zip(params, grads, steps, _grad_scales(gnorm_scales, n))):
        block = BLOCK if block_wise else max(p.numel(), 1)
        codes = ((state1[i], absmax1[i], qmap1), (state2[i], absmax2[i], qmap2), (s3[i], a3[i], qmap2))
        m, v, vm = (None if q is None else dequantize_reference(_flat(q), a, c, block, torch.float32) for q, a, c in codes)
        t.add_(1)
        p64, *moments = _adam_fp64(_flat(p), _flat(g), m, v, vm, t.item(), lr.item(), beta1, beta2, eps,
                                   weight_decay, gs, max_unorm, skip_zeros, quantized=True)
        _flat(p).copy_(p64)
        for k, ((q, a, code), x) in enumerate(zip(codes, moments)):
            if q is None:
                continue
            keep = k > 0  # v and its maximum: a positive value keeps a positive code
            qx, amax = (quantize_reference(x.float(), code, BLOCK, keep) if block_wise
                        else quantize_per_tensor(x.float(), code, keep))
            _flat(q).copy_(qx)
            a.copy_(amax)


# ---------------------------------------------------------------- samples
SHAPES = ((1,), (255,), (257,), (3, 5), (0,), (4097,), (16, 33))
# Options a sample turns on ("all": every one of them at once).
OPTIONS = ("amsgrad", "gnorm_scales", "max_unorm", "skip_zeros", "nonfinite", "found_inf", "per_tensor")


def _hyper(device):
    """lr and betas tensors and scalar hyperparameters, drawn afresh."""
    lr = torch.tensor(10 ** random.uniform(-4, -2), device=device)
    betas = torch.tensor([random.choice((0.0, 0.9, random.uniform(0.5, 0.99))),
                          random.choice((0.999, random.uniform(0.9, 0.9999)))], dtype=torch.float64, device=device)
    return lr, betas, {
        "eps": random.choice((1e-8, 1e-6)),
        "weight_decay": random.choice((0.0, 0.01, 0.1)),
    }


def _params(shapes, dtypes, device, transposed, options):
    params = [randn(*s, dtype=d, device=device) for s, d in zip(shapes, dtypes)]
    if transposed:  # a permuted dense tensor: states and grads follow its strides
        params.append(randn(9, 20, device=device).t())
    grads = [torch.empty_like(p).copy_(randn(*p.shape, device=device)) for p in params]
    for g in grads:
        flat = _flat(g)
        if "skip_zeros" in options and g.numel():  # a tenth of the gradient exactly zero
            flat[torch.rand(g.numel(), device=device) < 0.1] = 0
        if "nonfinite" in options and g.numel() > 2:
            flat[random.randrange(g.numel())] = float("nan")
            flat[random.randrange(g.numel())] = random.choice((float("inf"), float("-inf")))
            flat[random.randrange(g.numel())] = random.choice((1e20, -3e19))  # finite; its square is not
    # Runs of equal counts (a group's parameters share theirs; the kernels reuse a count's constants)
    counts = []
    for _ in params:
        counts.append(counts[-1] if counts and random.random() < 0.5 else random.randint(0, 300))
    steps = [torch.tensor(float(c), device=device) for c in counts]
    return params, grads, steps


def _option_kwargs(options, n, device):
    """gnorm_scales, found_inf and the float / flag options of a sample."""
    scales = found_inf = None
    if "gnorm_scales" in options:  # some 1 (no clipping), others a factor in (0.05, 1)
        scales = torch.where(torch.rand(n, device=device) < 0.3, 1.0, torch.rand(n, device=device) * 0.95 + 0.05)
    if "found_inf" in options:  # alone: a skipped step (nothing changes); with the others: a taken one
        # (0-dim, and GradScaler's own shape (1,))
        found_inf = torch.tensor(1.0, device=device) if options == ("found_inf",) else torch.zeros(1, device=device)
    return scales, found_inf, {
        "max_unorm": random.choice((1e-3, 0.02)) if "max_unorm" in options else 0.0,
        "skip_zeros": "skip_zeros" in options,
    }


def _adam_sample(shapes, dtypes, device, transposed=False, options=()):
    params, grads, steps = _params(shapes, dtypes, device, transposed, options)

    def moment(p, scale, positive=False):
        return torch.empty_like(p, dtype=torch.float32).copy_(randn(*p.shape, device=device, positive=positive) * scale)

    m = [moment(p, 1e-2) for p in params]
    v = [moment(p, 1e-4, positive=True) for p in params]
    vm = [x + moment(x, 1e-4, positive=True) * random.choice((0.0, 1.0)) for x in v] if "amsgrad" in options else []
    lr, betas, hyper = _hyper(device)
    scales, found_inf, kwargs = _option_kwargs(options, len(params), device)
    return SampleInput((params, grads, m, v, vm, steps, lr, betas, scales, found_inf), {**hyper, **kwargs})


def _adam8bit_sample(shapes, dtypes, device, transposed=False, options=(), search_codes=False, tiny_v=False):
    """`tiny_v`: moments over five decades within each block and gradients mostly 0 or tiny, so many
    v round to code 0 beside nonzero m codes and the moment bound (v >= m^2 / K) decides the step."""
    params, grads, steps = _params(shapes, dtypes, device, transposed, options)
    if tiny_v:
        for g in grads:
            flat = _flat(g)
            flat.mul_(torch.where(torch.rand(g.numel(), device=device) < 0.5, 0.0, 1e-8).to(g.dtype))
    if search_codes:  # random codes: their lookup tables cannot be exact, so the kernels search
        qmap1 = (torch.rand(256, device=device) * 2 - 1).sort().values
        qmap2 = torch.rand(256, device=device).sort().values
    else:
        qmap1, qmap2 = make_code(True, device), make_code(False, device)
    block_wise = "per_tensor" not in options
    lists = {k: [] for k in ("s1", "s2", "s3", "a1", "a2", "a3")}
    for p in params:
        m = randn(p.numel(), device=device) * 1e-2
        v = randn(p.numel(), device=device, positive=True) * 1e-4
        if tiny_v:
            m = m * 10 ** (-5 * torch.rand(p.numel(), device=device))
            v = m * m * 20  # within exact Adam's bound (m^2 <= 52.9 v at the default betas)
        moments = [("1", qmap1, m), ("2", qmap2, v)]
        if "amsgrad" in options:
            extra = v * torch.rand_like(v) if tiny_v else randn(p.numel(), device=device, positive=True) * 1e-4
            moments.append(("3", qmap2, v + extra))
        for k, code, values in moments:
            q, amax = quantize_reference(values, code, BLOCK) if block_wise else quantize_per_tensor(values, code)
            if not block_wise and p.numel() == 0:  # a stale scale: the op must reset it to 0
                amax = torch.rand(1, device=device) + 0.5
            state = torch.empty_like(p, dtype=torch.uint8)
            _flat(state).copy_(q)
            lists["s" + k].append(state)
            lists["a" + k].append(amax)
    lr, betas, hyper = _hyper(device)
    scales, found_inf, kwargs = _option_kwargs(options, len(params), device)
    args = (params, grads, lists["s1"], lists["s2"], lists["s3"], steps, lists["a1"], lists["a2"], lists["a3"],
            qmap1, qmap2, lr, betas, scales, found_inf)
    return SampleInput(args, {**hyper, **kwargs, "block_wise": block_wise})


def _mixed_dtypes(n):
    return [checks.PARAM_DTYPES[i % 3] for i in range(n)]


def _samples(make, device, options, size):
    yield make(SHAPES, _mixed_dtypes(len(SHAPES)), device, transposed=True)
    yield make((), (), device)
    for d in checks.PARAM_DTYPES:
        yield make(((size,), (2, 2)), (d, d), device)
    for option in options:  # each option alone, then all together
        yield make(SHAPES, _mixed_dtypes(len(SHAPES)), device, options=(option,))
    yield make(SHAPES, _mixed_dtypes(len(SHAPES)), device, transposed=True, options=options)


def adam_samples(device):
    yield from _samples(_adam_sample, device, OPTIONS[:-1], 300)


def adam8bit_samples(device):
    yield from _samples(_adam8bit_sample, device, OPTIONS, 700)
    yield _adam8bit_sample(SHAPES, _mixed_dtypes(len(SHAPES)), device, search_codes=True)
    yield _adam8bit_sample(((4096,), (300,)), (torch.float32, torch.bfloat16), device, tiny_v=True)
    yield _adam8bit_sample(((4096,),), (torch.float32,), device, options=("amsgrad",), tiny_v=True)


def adam_sweep(device, dtype, numel):
    yield _adam_sample(((numel,), (3,)), (dtype, torch.float32), device)
    yield _adam_sample(((numel,), (3,)), (dtype, torch.float32), device, options=OPTIONS[:-1])


def adam8bit_sweep(device, dtype, numel):
    yield _adam8bit_sample(((numel,), (3,)), (dtype, torch.float32), device)
    yield _adam8bit_sample(((numel,), (3,)), (dtype, torch.float32), device, options=OPTIONS)


def _adam_errors(make, names, state_names, state_dtype, device):
    """Error inputs shared by both Adam ops; `make` builds a valid sample to break."""
    at = {name: i for i, name in enumerate(names)}
    op = ADAM if make is _adam_sample else ADAM8

    def broken(change, error, regex, options=("amsgrad",)):
        s = make(((300,), (2, 3)), (torch.float32, torch.float32), device, options=options)
        args, kwargs = list(s.args), dict(s.kwargs)
        change(args, kwargs)
        return ErrorInput(SampleInput(tuple(args), kwargs), error, regex)

    def set_item(name, i, value):
        return lambda a, k: a[at[name]].__setitem__(i, value(a[at[name]][i]))

    def set_arg(name, value):
        return lambda a, k: a.__setitem__(at[name], value(a[at[name]]))

    s1, s2, s3 = state_names
    yield broken(lambda a, k: a[at["grads"]].pop(), ValueError, rf"{op}: grads has 1 tensors but params has 2")
    yield broken(lambda a, k: a[at[s1]].pop(), ValueError, rf"{s1} has 1 tensors but params has 2")
    yield broken(lambda a, k: a[at[s3]].pop(), ValueError,
                 rf"{s3} has 1 tensors but params has 2; pass one per parameter with amsgrad, none without")
    yield broken(lambda a, k: a[at["steps"]].pop(), ValueError, r"steps has 1 tensors but params has 2")
    yield broken(set_arg("betas", lambda t: t.float()), TypeError, r"betas has dtype torch.float32; expected torch.float64")
    yield broken(set_arg("betas", lambda t: t[:1]), ValueError, r"betas has 1 elements; expected 2")
    yield broken(lambda a, k: k.update(eps=-1e-8), ValueError, r"eps must be >= 0, got -1e-08")
    yield broken(lambda a, k: k.update(weight_decay=-0.1), ValueError, r"weight_decay must be >= 0, got -0.1")
    yield broken(lambda a, k: k.update(max_unorm=-1.0), ValueError, r"max_unorm must be >= 0, got -1")
    yield broken(set_arg("lr", lambda t: t.double()), TypeError, r"lr has dtype torch.float64")
    yield broken(set_arg("lr", lambda t: torch.ones(2, device=device)), ValueError, r"lr has 2 elements")
    yield broken(set_arg("gnorm_scales", lambda t: t[:1]), ValueError, r"gnorm_scales has 1 elements; expected 2",
                 options=("gnorm_scales",))
    yield broken(set_arg("gnorm_scales", lambda t: t.half()), TypeError, r"gnorm_scales has dtype torch.float16",
                 options=("gnorm_scales",))
    yield broken(set_arg("found_inf", lambda t: t.double()), TypeError, r"found_inf has dtype torch.float64",
                 options=("found_inf",))
    yield broken(set_arg("found_inf", lambda t: t.repeat(2)), ValueError, r"found_inf has 2 elements; expected 1",
                 options=("found_inf",))
    yield broken(set_item("params", 1, lambda p: p.to(torch.complex64)), TypeError, r"params\[1\] has dtype torch.complex64")
    yield broken(set_item("params", 0, lambda p: p.double()), TypeError, r"params\[0\] has dtype torch.float64; expected")
    yield broken(set_item("grads", 0, lambda g: g.half()), TypeError, r"grads\[0\] has dtype torch.float16 but params\[0\]")
    yield broken(set_item("grads", 1, lambda g: g.reshape(3, 2)), ValueError, r"grads\[1\] has shape \[3, 2\] but params\[1\] has shape \[2, 3\]")
    yield broken(set_item("grads", 1, lambda g: g.t().contiguous().t()), ValueError, r"grads\[1\] has strides \[1, 2\] but params\[1\] has strides \[3, 1\]")
    yield broken(set_item(s1, 0, lambda s: s.to(torch.bfloat16)), TypeError, rf"{s1}\[0\] has dtype torch.bfloat16; expected {state_dtype}")
    yield broken(set_item(s2, 1, lambda s: s.reshape(6)), ValueError, rf"{s2}\[1\] has shape \[6\] but params\[1\]")
    yield broken(set_item(s3, 1, lambda s: s.reshape(6)), ValueError, rf"{s3}\[1\] has shape \[6\] but params\[1\]")
    yield broken(set_item("steps", 1, lambda t: t.long()), TypeError, r"steps\[1\] has dtype torch.int64")
    yield broken(set_item("steps", 0, lambda t: t.repeat(2)), ValueError, r"steps\[0\] has 2 elements; expected 1")

    def strided(a, k):  # a parameter that skips every other element, and matching grad and states
        for name in ("params", "grads", s1, s2):
            a[at[name]][0] = (torch.rand(600, device=device) * 200).to(a[at[name]][0].dtype)[::2]

    yield broken(strided, ValueError, r"params\[0\] with shape \[300\] and strides \[2\] is not dense", options=())
    if torch.device(device).type != "cpu":
        yield broken(set_arg("lr", lambda t: t.cpu()), ValueError, r"lr is on cpu but the parameters are on")
        yield broken(set_arg("betas", lambda t: t.cpu()), ValueError, r"betas is on cpu but the parameters are on")
        yield broken(set_item("grads", 0, lambda g: g.cpu()), ValueError, r"grads\[0\] is on cpu but the parameters are on")


def adam_errors(device):
    names = ("exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs")
    yield from _adam_errors(_adam_sample, ADAM_ARGS, names, "torch.float32", device)


def adam8bit_errors(device):
    yield from _adam_errors(_adam8bit_sample, ADAM8_ARGS, ("state1", "state2", "state3"), "torch.uint8", device)
    at = {name: i for i, name in enumerate(ADAM8_ARGS)}

    def broken(change, error, regex, options=("amsgrad",)):
        s = _adam8bit_sample(((300,), (2, 3)), (torch.float32, torch.float32), device, options=options)
        args, kwargs = list(s.args), dict(s.kwargs)
        change(args, kwargs)
        return ErrorInput(SampleInput(tuple(args), kwargs), error, regex)

    yield broken(lambda a, k: a[at["absmax1"]].pop(), ValueError, r"absmax1 has 1 tensors but params has 2")
    yield broken(lambda a, k: a[at["absmax3"]].pop(), ValueError, r"absmax3 has 1 tensors but state3 has 2")
    yield broken(lambda a, k: a[at["absmax2"]].__setitem__(0, a[at["absmax2"]][0][:1]), ValueError,
                 r"absmax2\[0\] has 1 elements; expected 2")
    yield broken(lambda a, k: k.update(block_wise=False), ValueError, r"absmax1\[0\] has 2 elements; expected 1")
    yield broken(lambda a, k: k.update(block_wise=True), ValueError, r"absmax1\[0\] has 1 elements; expected 2",
                 options=("per_tensor",))
    yield broken(lambda a, k: a[at["absmax1"]].__setitem__(1, a[at["absmax1"]][1].half()), TypeError,
                 r"absmax1\[1\] has dtype torch.float16")
    yield broken(lambda a, k: a.__setitem__(at["qmap1"], a[at["qmap1"]][:128]), ValueError, r"qmap1 has 128 elements; expected 256")
    yield broken(lambda a, k: a.__setitem__(at["qmap2"], a[at["qmap2"]].double()), TypeError, r"qmap2 has dtype torch.float64")


# ---------------------------------------------------------------- comparisons
def _compare_params(params_k, params_r, params_before, what):
    """Each update p - lr * d rounds to a few ulps of p before the step (or of the update), however
    much of them cancels: that is the scale of the tolerance."""
    for i, (pk, pr, p0) in enumerate(zip(params_k, params_r, params_before)):
        assert_close_scaled(pk, pr, rtol=4 * EPS[pk.dtype], scale_tol=1e-6, what=f"{what}[{i}]", magnitude=p0)


def adam_compare(sample, kernel, reference):
    (pk, _, mk, vk, vmk, *_), (pr, _, mr, vr, vmr, *_) = kernel[0], reference[0]
    _compare_params(pk, pr, sample.args[0], "params")
    for name, xs_k, xs_r in (("exp_avgs", mk, mr), ("exp_avg_sqs", vk, vr), ("max_exp_avg_sqs", vmk, vmr)):
        for i, (xk, xr) in enumerate(zip(xs_k, xs_r)):
            assert_close_scaled(xk, xr, rtol=1e-6, scale_tol=1e-6, what=f"{name}[{i}]")


def _scale_magnitudes(sample, i: int) -> dict[str, torch.Tensor]:
    """Per state of parameter i, per scale: the size of the terms its new absmax is computed from.
    m_new = b1 m + (1 - b1) g can cancel to far below them (random betas and gradient scales make
    it happen), and the float32 kernel then differs from the float64 reference by ulps of the
    terms, not of the result; v_new's floor m_new^2 / K inherits that."""
    at = {name: j for j, name in enumerate(ADAM8_ARGS)}
    a = sample.args
    b1, b2 = a[at["betas"]].tolist()
    block = BLOCK if sample.kwargs["block_wise"] else max(a[0][i].numel(), 1)
    old = {}
    for k, code in (("1", a[at["qmap1"]]), ("2", a[at["qmap2"]]), ("3", a[at["qmap2"]])):
        if a[at["state" + k]]:
            q = a[at["state" + k]][i]
            old[k] = dequantize_reference(_flat(q), a[at["absmax" + k]][i], code, block, torch.float64).abs()
    scale = _grad_scales(a[at["gnorm_scales"]], len(a[0]))[i]
    g, finite = _scaled_gradient(_flat(a[1][i]), scale)
    g = torch.where(finite, g, 0.0).abs()  # (_adam_fp64 skips the others)
    terms = {"1": b1 * old["1"] + (1 - b1) * g}
    terms["2"] = b2 * old["2"] + (1 - b2) * g * g + terms["1"] ** 2 * _v_floor(b1, b2)
    if "3" in old:
        terms["3"] = torch.maximum(old["3"], terms["2"])
    n = g.numel()
    out = {}
    for k, t in terms.items():
        padded = t.new_zeros(-(-n // block) * block)
        padded[:n] = t
        out[k] = padded.view(-1, block).amax(dim=1) if n else t.new_zeros(1)
    return out


def adam8bit_compare(sample, kernel, reference):
    """Codes may differ by one where a moment lies within float rounding of a decision bound."""
    at = {name: i for i, name in enumerate(ADAM8_ARGS)}
    args_k, args_r = kernel[0], reference[0]
    _compare_params(args_k[0], args_r[0], sample.args[0], "params")
    for i in range(len(args_k[0])):
        magnitudes = _scale_magnitudes(sample, i)
        for k in "123":
            if not args_k[at["state" + k]]:
                continue
            am_k, am_r = args_k[at["absmax" + k]][i], args_r[at["absmax" + k]][i]
            assert_close_scaled(am_k, am_r, rtol=1e-5, scale_tol=0.0, what=f"absmax of state{k}[{i}]",
                                magnitude=magnitudes[k].reshape(am_r.shape) if am_r.numel() else None)
    for k in "123":
        for i, (qk, qr) in enumerate(zip(args_k[at["state" + k]], args_r[at["state" + k]])):
            name = f"state{k}[{i}]"
            diff = (qk.int() - qr.int()).abs()
            flips = int((diff > 0).sum())
            worst = int(diff.max()) if diff.numel() else 0
            assert worst <= 1 and flips <= 2 + 1e-3 * qk.numel(), (
                f"{name}: {flips} of {qk.numel()} codes differ from the reference (max by {worst})"
            )


ADAM_STEP = OpInfo(
    name="adam_step",
    schema=(
        "(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
        "Tensor(d!)[] max_exp_avg_sqs, Tensor(e!)[] steps, Tensor lr, Tensor betas, Tensor? gnorm_scales, "
        "Tensor? found_inf, float eps, float weight_decay, float max_unorm, bool skip_zeros) -> ()"
    ),
    doc=(
        "One AdamW step with fp32 moments over a list of parameters (amsgrad when max_exp_avg_sqs is given, "
        "gradients scaled by gnorm_scales, max_unorm, skip_zeros); advances each step count by one. lr (float32) "
        "and betas (float64 [beta1, beta2]) are tensors, read by the kernels. A nonzero found_inf "
        "(torch.amp.GradScaler's) skips the step: nothing changes."
    ),
    fake=adam_fake,
    reference=adam_reference,
    sample_inputs=adam_samples,
    sweep_inputs=adam_sweep,
    error_inputs=adam_errors,
    compare=adam_compare,
)

ADAM8BIT_STEP = OpInfo(
    name="adam8bit_step",
    schema=(
        "(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] state1, Tensor(c!)[] state2, Tensor(d!)[] state3, "
        "Tensor(e!)[] steps, Tensor(f!)[] absmax1, Tensor(g!)[] absmax2, Tensor(h!)[] absmax3, "
        "Tensor qmap1, Tensor qmap2, Tensor lr, Tensor betas, Tensor? gnorm_scales, Tensor? found_inf, float eps, "
        "float weight_decay, float max_unorm, bool skip_zeros, bool block_wise) -> ()"
    ),
    doc=(
        "The same with uint8 moments (codes of qmap1 / qmap2 with one absmax per 256 values, or per tensor "
        "when not block_wise), requantized after the update (a positive second moment to at least qmap2's "
        "smallest positive code; the new one kept at or above m^2 / K)."
    ),
    fake=adam8bit_fake,
    reference=adam8bit_reference,
    sample_inputs=adam8bit_samples,
    sweep_inputs=adam8bit_sweep,
    error_inputs=adam8bit_errors,
    compare=adam8bit_compare,
)
