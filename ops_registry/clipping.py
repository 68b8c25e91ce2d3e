"""Registry entry of percentile clipping (bitsandbytes 0.49's percentile_clipping option)."""

from __future__ import annotations

import math
import random

import torch

from . import checks
from .opinfo import ErrorInput, OpInfo, SampleInput
from .testing import assert_close_scaled, randn

CLIP = "adam8.percentile_clipping"
HISTORY = 100


def clipping_fake(grads, gnorm_vecs, steps, percentile, scales):
    n = len(grads)
    checks.check_length(CLIP, "gnorm_vecs", len(gnorm_vecs), "grads", n)
    checks.check_length(CLIP, "steps", len(steps), "grads", n)
    torch._check_value(0 <= percentile < HISTORY, lambda: f"{CLIP}: percentile must be in [0, 100), got {percentile}")
    device = grads[0].device if n else scales.device
    checks.check_device(CLIP, "scales", scales, device, "grads[0]")
    checks.check_dtype(CLIP, "scales", scales, (torch.float32,))
    checks.check_numel(CLIP, "scales", scales, n)
    checks.check_dense(CLIP, "scales", scales)
    for i in range(n):
        g, h, t = f"grads[{i}]", f"gnorm_vecs[{i}]", f"steps[{i}]"
        checks.check_dtype(CLIP, g, grads[i], checks.PARAM_DTYPES)
        checks.check_device(CLIP, g, grads[i], device, "grads[0]")
        checks.check_dense(CLIP, g, grads[i])
        checks.check_device(CLIP, h, gnorm_vecs[i], device, "grads[0]")
        checks.check_dtype(CLIP, h, gnorm_vecs[i], (torch.float32,))
        checks.check_numel(CLIP, h, gnorm_vecs[i], HISTORY)
        checks.check_dense(CLIP, h, gnorm_vecs[i])
        checks.check_device(CLIP, t, steps[i], device, "grads[0]")
        checks.check_dtype(CLIP, t, steps[i], (torch.float32,))
        checks.check_numel(CLIP, t, steps[i], 1)


def clipping_reference(grads, gnorm_vecs, steps, percentile, scales):
    """For step t = steps + 1: the squared norm of the finite gradient elements goes to slot
    t mod 100 of the history (every slot at t = 1, or when the history is unrecorded: slot 0
    negative); the clip is the square root of entry `percentile` of the sorted history; the factor
    is clip / norm when the norm exceeds it, else 1."""
    for i, (g, history, step) in enumerate(zip(grads, gnorm_vecs, steps)):
        finite = (g.float() * g.float()).isfinite()  # as the update counts them
        norm_sq = torch.where(finite, g.double(), 0.0).square().sum().float()
        t = step.item() + 1.0
        if t <= 1 or history[0] < 0:
            history.fill_(norm_sq)
        else:  # (a NaN or inf count: slot 0)
            history[int(t % HISTORY) if math.isfinite(t) else 0] = norm_sq
        clip = history.sort().values[percentile].sqrt()
        norm = norm_sq.sqrt()
        scales[i] = clip / norm if norm > clip else 1.0


def _sample(n_grads, device, nonfinite=False, dtypes=checks.PARAM_DTYPES):
    grads, histories, steps = [], [], []
    for i in range(n_grads):
        numel = random.choice((0, 1, 255, 257, 3000))
        g = randn(numel, device=device, dtype=dtypes[i % len(dtypes)])
        if random.random() < 0.5:
            g = g * 100  # a spike: this norm is far above the history's
        if nonfinite and numel > 2:
            g[random.randrange(numel)] = float("nan")
            g[random.randrange(numel)] = float("inf")
            g[random.randrange(numel)] = 1e20  # finite; its float square is not
        grads.append(g)
        if random.random() < 0.2:  # unrecorded (made mid-training): every slot gets this norm
            histories.append(torch.full((HISTORY,), -1.0, device=device))
        else:
            histories.append(randn(HISTORY, device=device, positive=True) * random.choice((1e-3, 1.0, 1e3)))
        steps.append(torch.tensor(float(random.choice((0, 1, 99, 100, random.randint(2, 500)))), device=device))
    scales = torch.full((n_grads,), -1.0, device=device)  # every element is written
    return SampleInput((grads, histories, steps, random.choice((0, 5, 50, 99)), scales), {})


def clipping_samples(device):
    yield _sample(7, device)
    yield _sample(0, device)
    yield _sample(5, device, nonfinite=True)
    for d in checks.PARAM_DTYPES:
        yield _sample(3, device, dtypes=(d,))


def clipping_sweep(device, dtype, numel):
    grads = [randn(numel, device=device, dtype=dtype), randn(3, device=device, dtype=dtype)]
    histories = [randn(HISTORY, device=device, positive=True) for _ in grads]
    steps = [torch.tensor(float(random.randint(0, 300)), device=device) for _ in grads]
    yield SampleInput((grads, histories, steps, 5, torch.empty(2, device=device)), {})


def clipping_errors(device):
    def broken(change, error, regex):
        args = list(_sample(3, device).args)
        change(args)
        return ErrorInput(SampleInput(tuple(args), {}), error, regex)

    yield broken(lambda a: a[1].pop(), ValueError, rf"{CLIP}: gnorm_vecs has 2 tensors but grads has 3")
    yield broken(lambda a: a[2].pop(), ValueError, r"steps has 2 tensors but grads has 3")
    yield broken(lambda a: a.__setitem__(3, 100), ValueError, r"percentile must be in \[0, 100\), got 100")
    yield broken(lambda a: a.__setitem__(3, -1), ValueError, r"percentile must be in \[0, 100\), got -1")
    yield broken(lambda a: a.__setitem__(4, a[4][:2]), ValueError, r"scales has 2 elements; expected 3")
    yield broken(lambda a: a[1].__setitem__(0, a[1][0][:50]), ValueError, r"gnorm_vecs\[0\] has 50 elements; expected 100")
    yield broken(lambda a: a[0].__setitem__(1, a[0][1].double()), TypeError, r"grads\[1\] has dtype torch.float64")
    yield broken(lambda a: a[2].__setitem__(0, a[2][0].long()), TypeError, r"steps\[0\] has dtype torch.int64")


def clipping_compare(sample, kernel, reference):
    (_, hist_k, _, _, scales_k), (_, hist_r, _, _, scales_r) = kernel[0], reference[0]
    for i, (hk, hr) in enumerate(zip(hist_k, hist_r)):
        assert_close_scaled(hk, hr, rtol=1e-5, scale_tol=0.0, what=f"gnorm_vecs[{i}]")
    assert_close_scaled(scales_k, scales_r, rtol=1e-5, scale_tol=0.0, what="scales")


PERCENTILE_CLIPPING = OpInfo(
    name="percentile_clipping",
    schema="(Tensor[] grads, Tensor(a!)[] gnorm_vecs, Tensor[] steps, int percentile, Tensor(b!) scales) -> ()",
    doc=(
        "Records each gradient's squared norm in its 100-step history and writes the factor that clips it "
        "to the history's percentile (steps: the counts before this step)."
    ),
    fake=clipping_fake,
    reference=clipping_reference,
    sample_inputs=clipping_samples,
    sweep_inputs=clipping_sweep,
    error_inputs=clipping_errors,
    compare=clipping_compare,
)
