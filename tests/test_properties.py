"""Property-based tests: every registry op, kernel against reference, over inputs that hypothesis draws.

For each op in ``ops_registry.OPS`` hypothesis draws a case: tensor shapes (the edge sizes 0, 1,
255, 256, 257, 4097 and any size up to 5000; 2-D and 3-D tensors; permuted dense layouts, and
strided views where the op takes them), dtypes (mixed within one list for the list ops), every
option and hyperparameter of the op, and a seed for the tensor values. The case is turned into a
call by the registry's own sample builders (or the same construction, for the ops whose builders
fix the sizes), the kernel and the reference run on copies of it (test_ops.run_both), and the
OpInfo's own ``compare`` judges the results.

``compare`` alone is blind where the reference holds inf (max|expected| scales the tolerance to
inf) and to a NaN from the kernel (a comparison with NaN is never "beyond tolerance"); eps = 0
drawn here does make infinite Adam steps. So before ``compare``, every floating-point tensor must
have its NaN, +inf and -inf at the same places in both results, and those places are then set to
zero in both copies, so ``compare`` checks the finite rest with a finite scale.

A failure prints the drawn case (and a reproduce blob); hypothesis' seed is ADAM8_SEED, printed
in the pytest header, so ``ADAM8_SEED=<seed> pytest tests/test_properties.py`` replays a run.
"""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

import ops_registry
from ops_registry import OPS, SampleInput
from ops_registry import adam as adam_entries
from ops_registry.adam import ADAM8_ARGS, ADAM_ARGS
from ops_registry.clipping import HISTORY
from ops_registry.quantize import quantize_reference
from ops_registry.testing import make_code, randn

from conftest import SEED
from test_ops import run_both

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_NUMEL = 5000
# Sizes next to the kernels' run lengths: the SIMD width (8), the 256-value state block and the
# quantization blocks (64 .. 4096). (A tensor split over several 32768-element parallel tasks is
# left to test_ops' sweep.)
EDGE_SIZES = (0, 1, 2, 7, 8, 9, 63, 64, 65, 255, 256, 257, 511, 512, 513, 1000, 1023, 1024, 1025, 4095, 4096,
              4097, MAX_NUMEL)

PROPERTY_SETTINGS = settings(
    max_examples=40,
    deadline=None,
    derandomize=False,
    database=None,  # nothing written to the working tree; a failure prints its case and blob
    print_blob=True,
    # The autouse seeding fixture of conftest runs once per test, not per example; each example
    # seeds python's and torch's generators itself from the seed it draws.
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


# ---------------------------------------------------------------- strategies
seeds = st.integers(0, 2**32 - 1)
dtypes = st.sampled_from(DTYPES)
sizes = st.one_of(st.sampled_from(EDGE_SIZES), st.integers(0, MAX_NUMEL))
log_lr = st.floats(-5.0, -1.0)  # lr = 10 ** log_lr in [1e-5, 1e-1]


def f32(x: float) -> float:
    return float(torch.tensor(x, dtype=torch.float32))


# Drawn betas are float32 values (the kernels' constants are float32). beta1 is 0 or at least 1e-3:
# a beta1 below float32's range (hypothesis finds 1e-239) is 0 to the kernels but not to the float64
# reference, and the two then differ where eps = 0 and v = 0 (0 / 0 against m / 0).
beta1s = st.one_of(st.sampled_from((0.0, 1e-3, 0.5, 0.9, 0.999)), st.floats(f32(1e-3), f32(0.999), width=32))
beta2s = st.one_of(st.sampled_from((0.5, 0.999, 0.99999)), st.floats(0.5, f32(0.99999), width=32))
epss = st.sampled_from((0.0, 1e-8, 1e-6, 1e-3))
weight_decays = st.one_of(st.just(0.0), st.floats(0.0, 0.5))
# 0: off; 1e-4 and 1e-2: usually binds (the step is shortened); 1e3: never binds.
max_unorms = st.sampled_from((0.0, 1e-4, 1e-2, 1e3))
blocksizes = st.sampled_from((64, 128, 256, 512, 1024, 2048, 4096))


@st.composite
def shapes(draw, max_numel=MAX_NUMEL):
    """A tensor shape of at most max_numel elements: 1-D of an edge or any size, 2-D or 3-D."""
    ndim = draw(st.sampled_from((1, 1, 2, 3)))
    if ndim == 1:
        return (draw(sizes),)
    if ndim == 2:
        rows = draw(st.one_of(st.sampled_from((0, 1, 2, 16)), st.integers(0, 80)))
        return (rows, draw(st.integers(0, max_numel // max(rows, 1))))
    return tuple(draw(st.integers(0 if i == 0 else 1, 16)) for i in range(3))


@st.composite
def dense_layouts(draw):
    """(shape in memory order, permutation): the tensor is a contiguous one of that shape, permuted
    (a permuted dense tensor; the identity permutation is the contiguous case)."""
    shape = draw(shapes())
    return shape, tuple(draw(st.permutations(range(len(shape)))))


@st.composite
def any_layouts(draw):
    """A dense layout, or a view that skips every other element of the innermost memory dimension
    (not dense), for the ops that take any strides (they read tensors in logical order)."""
    shape, perm = draw(dense_layouts())
    return shape, perm, draw(st.booleans())


def materialize(values: torch.Tensor, layout, dtype) -> torch.Tensor:
    """A tensor of `dtype` equal to `values` (given in memory-order shape) but laid out as `layout`:
    permuted by its permutation, and every other element of a twice-as-wide buffer when strided."""
    shape, perm, strided = layout if len(layout) == 3 else (*layout, False)
    if strided:
        wide = torch.empty(*shape[:-1], 2 * shape[-1], dtype=dtype)
        out = wide[..., ::2]
    else:
        out = torch.empty(shape, dtype=dtype)
    out.copy_(values)
    return out.permute(perm)


def seeded(case_seed: int) -> None:
    random.seed(case_seed)
    torch.manual_seed(case_seed)


# ---------------------------------------------------------------- per-op cases
# Each entry: a strategy of cases (plain data, so a failing one prints readably) and a builder
# turning a case into a SampleInput.
@st.composite
def adam_cases(draw, eight_bit: bool):
    n = draw(st.integers(0, 4))
    case = {
        "seed": draw(seeds),
        "layouts": [draw(dense_layouts()) for _ in range(n)],
        "dtypes": [draw(dtypes) for _ in range(n)],  # mixed within the list
        "amsgrad": draw(st.booleans()),
        "gnorm_scales": draw(st.booleans()),
        "zero_grads": draw(st.booleans()),  # a tenth of the gradient elements exactly 0
        "nonfinite": draw(st.booleans()),  # a NaN and an inf in each gradient of > 2 elements
        "lr": 10.0 ** draw(log_lr),
        "beta1": draw(beta1s),
        "beta2": draw(beta2s),
        "eps": draw(epss),
        "weight_decay": draw(weight_decays),
        "max_unorm": draw(max_unorms),
        "skip_zeros": draw(st.booleans()),
    }
    if eight_bit:
        case["block_wise"] = draw(st.booleans())
    return case


def _adam_build(case, eight_bit: bool) -> SampleInput:
    options = [name for name in ("amsgrad", "gnorm_scales", "nonfinite") if case[name]]
    if case["zero_grads"]:
        options.append("skip_zeros")  # the builder's option zeroes gradient elements (and sets the flag)
    if eight_bit and not case["block_wise"]:
        options.append("per_tensor")
    shapes_ = [shape for shape, _ in case["layouts"]]
    make = adam_entries._adam8bit_sample if eight_bit else adam_entries._adam_sample
    sample = make(shapes_, case["dtypes"], "cpu", options=tuple(options))
    names = ADAM8_ARGS if eight_bit else ADAM_ARGS
    per_param = ("params", "grads", "state1", "state2", "state3") if eight_bit else (
        "params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs")
    args = list(sample.args)
    for name in per_param:  # the same permutation for a parameter and everything that follows it
        i = names.index(name)
        args[i] = [t.permute(perm) for t, (_, perm) in zip(args[i], case["layouts"])]
    args[names.index("lr")] = torch.tensor(case["lr"], dtype=torch.float32)
    args[names.index("betas")] = torch.tensor([case["beta1"], case["beta2"]], dtype=torch.float64)
    kwargs = dict(sample.kwargs)
    kwargs.update({k: case[k] for k in ("eps", "weight_decay", "max_unorm", "skip_zeros")})
    if eight_bit:
        assert kwargs["block_wise"] == case["block_wise"]
    return SampleInput(tuple(args), kwargs)


@st.composite
def clipping_cases(draw):
    n = draw(st.integers(0, 5))
    return {
        "seed": draw(seeds),
        "layouts": [draw(dense_layouts()) for _ in range(n)],
        "dtypes": [draw(dtypes) for _ in range(n)],
        "spikes": [draw(st.booleans()) for _ in range(n)],  # gradient x100: far above its history
        "nonfinite": draw(st.booleans()),
        "history_scales": [draw(st.sampled_from((1e-3, 1.0, 1e3))) for _ in range(n)],
        "history_ties": draw(st.booleans()),  # histories holding few distinct values
        "steps": [draw(st.one_of(st.sampled_from((0, 1, 2, 98, 99, 100, 101, 199)), st.integers(0, 1000)))
                  for _ in range(n)],
        "percentile": draw(st.one_of(st.sampled_from((0, 5, 50, 95, 99)), st.integers(0, HISTORY - 1))),
    }


def _clipping_build(case) -> SampleInput:
    grads, histories, steps = [], [], []
    for layout, dtype, spike, scale, step in zip(case["layouts"], case["dtypes"], case["spikes"],
                                                 case["history_scales"], case["steps"]):
        shape = layout[0]
        values = randn(*shape) * (100.0 if spike else 1.0)
        flat = values.view(-1)
        if case["nonfinite"] and flat.numel() > 2:
            flat[random.randrange(flat.numel())] = float("nan")
            flat[random.randrange(flat.numel())] = random.choice((float("inf"), float("-inf")))
        grads.append(materialize(values, layout, dtype))
        history = randn(HISTORY, positive=True) * scale
        if case["history_ties"]:
            history = history[torch.randint(0, 4, (HISTORY,))]
        histories.append(history)
        steps.append(torch.tensor(float(step)))
    scales = torch.full((len(grads),), -1.0)  # every element is written
    return SampleInput((grads, histories, steps, case["percentile"], scales), {})


CODES = ("dynamic_signed", "dynamic_unsigned", "linear_signed", "linear_unsigned", "random_sorted")


def _code(kind: str, strided: bool) -> torch.Tensor:
    """A 256-entry ascending code; the linear and random ones take the kernels' search path."""
    if kind == "dynamic_signed":
        code = make_code(True)
    elif kind == "dynamic_unsigned":
        code = make_code(False)
    elif kind == "linear_signed":
        code = torch.linspace(-1, 1, 256)
    elif kind == "linear_unsigned":
        code = torch.linspace(0, 1, 256)
    else:
        code = (torch.rand(256) * 2 - 1).sort().values
    if strided:  # a view that is not contiguous: the kernels read code in logical order
        wide = torch.empty(512)
        wide[::2] = code
        code = wide[::2]
    return code


@st.composite
def quantize_cases(draw):
    return {
        "seed": draw(seeds),
        "layout": draw(any_layouts()),
        "dtype": draw(dtypes),
        "positive": draw(st.booleans()),
        "code": draw(st.sampled_from(CODES)),
        "code_strided": draw(st.booleans()),
        "blocksize": draw(blocksizes),
        "zero_run": draw(st.booleans()),  # a run of exact zeros (whole blocks of zeros among them)
        "constant_run": draw(st.booleans()),  # a run of one repeated value (normalises to +-1 exactly)
    }


def _values(case) -> torch.Tensor:
    shape = case["layout"][0]
    values = randn(*shape, positive=case["positive"])
    flat = values.view(-1)
    n = flat.numel()
    for key, fill in (("zero_run", 0.0), ("constant_run", float(flat[0]) if n else 0.0)):
        if case[key] and n:
            start = random.randrange(n)
            flat[start : start + random.randint(1, 2 * case["blocksize"])] = fill
    return values


def _quantize_build(case) -> SampleInput:
    x = materialize(_values(case), case["layout"], case["dtype"])
    return SampleInput((x, _code(case["code"], case["code_strided"]), case["blocksize"]), {})


@st.composite
def dequantize_cases(draw):
    case = draw(quantize_cases())
    case.update({
        "out_dtype": draw(dtypes),
        "random_codes": draw(st.booleans()),  # uniform uint8 codes instead of a quantized tensor's
        "absmax_factor": draw(st.sampled_from((0.0, 1e-3, 1.0, 1.5, 1e3))),
        "absmax_strided": draw(st.booleans()),
    })
    return case


def _dequantize_build(case) -> SampleInput:
    code = _code(case["code"], case["code_strided"])
    values = _values(case)
    q, absmax = quantize_reference(values, code.contiguous(), case["blocksize"])
    if case["random_codes"]:
        q = torch.randint(0, 256, q.shape, dtype=torch.uint8)
    absmax = absmax * case["absmax_factor"]
    if case["absmax_strided"]:
        wide = torch.empty(2 * absmax.numel())
        wide[1::2] = absmax
        absmax = wide[1::2]
    q = materialize(q, case["layout"], torch.uint8)
    return SampleInput((q, absmax, code, case["blocksize"], case["out_dtype"]), {})


PAGED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.uint8)


@st.composite
def zeros_cases(draw):
    return {"seed": draw(st.integers(0, 2**31 - 1)), "shape": draw(shapes()), "dtype": draw(st.sampled_from(PAGED_DTYPES))}


def _zeros_build(case) -> SampleInput:
    return SampleInput((list(case["shape"]), case["dtype"], torch.device("cpu")), {})


@st.composite
def paged_cases(draw):
    """A list of dense tensors of any layout and state dtype, with its values drawn from the seed."""
    return {"seed": draw(st.integers(0, 2**31 - 1)),
            "tensors": draw(st.lists(st.tuples(dense_layouts(), st.sampled_from(PAGED_DTYPES)), min_size=1, max_size=4))}


def _paged_build(case) -> SampleInput:
    tensors = [materialize(torch.randn(layout[0]) * 100, layout, dtype) for layout, dtype in case["tensors"]]
    return SampleInput((tensors,), {})


CASES = {
    "quantize_blockwise": (quantize_cases(), _quantize_build),
    "dequantize_blockwise": (dequantize_cases(), _dequantize_build),
    "adam_step": (adam_cases(eight_bit=False), lambda case: _adam_build(case, eight_bit=False)),
    "adam8bit_step": (adam_cases(eight_bit=True), lambda case: _adam_build(case, eight_bit=True)),
    "percentile_clipping": (clipping_cases(), _clipping_build),
    "zeros_managed": (zeros_cases(), _zeros_build),
    "prefetch": (paged_cases(), _paged_build),
    "page_out": (paged_cases(), _paged_build),
}


# ---------------------------------------------------------------- checks
def agree_on_nonfinite(kernel, reference) -> None:
    """Asserts that every floating-point tensor of the two results has NaN, +inf and -inf at the
    same places, then sets those places to 0 in both (the results are the tests' own copies)."""
    leaves_k = torch.utils._pytree.tree_leaves(kernel)
    leaves_r = torch.utils._pytree.tree_leaves(reference)
    assert len(leaves_k) == len(leaves_r)
    for i, (a, b) in enumerate(zip(leaves_k, leaves_r)):
        if not (isinstance(a, torch.Tensor) and a.is_floating_point()):
            continue
        assert a.shape == b.shape, f"result tensor {i}: shape {list(a.shape)} vs {list(b.shape)}"
        for what, test in (("NaN", torch.isnan), ("+inf", torch.isposinf), ("-inf", torch.isneginf)):
            ma, mb = test(a), test(b)
            if not torch.equal(ma, mb):
                where = (ma != mb).nonzero()[0].tolist()
                raise AssertionError(
                    f"result tensor {i} ({a.dtype}, shape {list(a.shape)}): kernel and reference put {what} at "
                    f"different places ({int(ma.sum())} vs {int(mb.sum())}); first at {where}: "
                    f"{a[tuple(where)].item()!r} vs {b[tuple(where)].item()!r}"
                )
        a.masked_fill_(~a.isfinite(), 0.0)
        b.masked_fill_(~b.isfinite(), 0.0)


def test_every_registry_op_has_a_property_case():
    assert set(CASES) == {info.name for info in OPS}


@pytest.mark.parametrize("info", OPS, ids=lambda i: i.name)
@seed(SEED)
@PROPERTY_SETTINGS
@given(data=st.data())
def test_kernel_matches_reference(info, data):
    strategy, build = CASES[info.name]
    case = data.draw(strategy, label=f"{info.name} case")
    seeded(case["seed"])
    sample = build(case)
    kernel, reference = run_both(info, sample)
    agree_on_nonfinite(kernel, reference)
    info.compare(sample, kernel, reference)


# ---------------------------------------------------------------- the known reference defect
def _unorm_case():
    """One AdamW step of p = [1, 1] with g = [1, 0], m = v = 0, eps = 0, skip_zeros and
    max_unorm = 1e-4: only element 0 is updated, so the clipped step is computed by hand."""
    lr, beta1, beta2, max_unorm = 1e-2, 0.9, 0.999, 1e-4
    args = ([torch.ones(2)], [torch.tensor([1.0, 0.0])], [torch.zeros(2)], [torch.zeros(2)], [], [torch.tensor(0.0)],
            torch.tensor(lr), torch.tensor([beta1, beta2], dtype=torch.float64), None, None)
    kwargs = dict(eps=0.0, weight_decay=0.0, max_unorm=max_unorm, skip_zeros=True)
    bc1, bc2 = 1 - beta1, 1 - beta2
    direction = (1 - beta1) / ((1 - beta2) ** 0.5 / bc2**0.5)  # m_new / (sqrt(v_new) / sqrt(bc2)) = 0.1
    unorm, limit = direction / bc1, max_unorm * 2**0.5
    expected = torch.tensor([1 - lr / bc1 * (limit / unorm) * direction, 1.0])
    return SampleInput(args, kwargs), expected


def test_kernel_max_unorm_skips_elements_not_updated():
    sample, expected = _unorm_case()
    (args, _), _ = run_both(ops_registry.get("adam_step"), sample)
    torch.testing.assert_close(args[0][0], expected, rtol=1e-6, atol=0)


def test_reference_max_unorm_skips_elements_not_updated():
    sample, expected = _unorm_case()
    _, (args, _) = run_both(ops_registry.get("adam_step"), sample)
    torch.testing.assert_close(args[0][0], expected, rtol=1e-6, atol=0)
