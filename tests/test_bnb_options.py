"""bitsandbytes' optimizer options against bitsandbytes itself, 50 steps with gradient spikes (x50
every 10th step), within bitsandbytes' own parity tolerances.

CPU, bitsandbytes 0.50.2 (the test extra). Its Adam classes no longer take percentile_clipping or
block_wise (TypeError), ignore those two when an `args` object carries them, ignore amsgrad
(Adam, Adam32bit) or refuse it (Adam8bit), and its CPU kernels ignore skip_zeros and, for 8-bit
states, max_unorm: of every option only max_unorm of 32-bit states changes a CPU result there
(test_bnb_050_cpu_options pins these facts). Its CPU max_unorm measures the norm of
m / (sqrt(v) + eps * sqrt(1 - beta2^t)), without bias correction (bitsandbytes/backends/cpu/ops.py,
_optimizer_update_32bit_cpu), while its CUDA kernel and default backend, and we, measure
m_hat / (sqrt(v_hat) + eps): (1 - beta1^t) / sqrt(1 - beta2^t) times smaller. Scaling bitsandbytes'
max_unorm by that factor at every step makes the two rules one, and then we match it to float
rounding (test_max_unorm_32bit_matches_bnb_050_on_cpu).

GPU, bitsandbytes 0.49.2 (the last with percentile_clipping and block_wise; .peers/, skipped
without CUDA): Adam8bit with percentile_clipping=5 and with block_wise=False, Adam32bit with
percentile_clipping=5 and with max_unorm, against its CUDA kernels.
"""

import importlib.util
import inspect
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import torchadam8

STEPS = 50
LR, BETAS = 1e-3, (0.9, 0.999)  # weight_decay 0: bitsandbytes' CUDA kernels decay after the update, we before
PEERS = Path(__file__).resolve().parents[1] / ".peers"


def bnb_args(**options):
    """An `args` object of bitsandbytes: its six attributes, defaults but for `options`."""
    values = dict(optim_bits=32, min_8bit_size=4096, percentile_clipping=100, block_wise=True, max_unorm=0.0,
                  skip_zeros=False)
    values.update(options)
    return SimpleNamespace(**values)


def train(optimizers, param_lists, steps=STEPS, before_step=lambda t: None, zeros=False):
    """`steps` steps of every optimizer on the same gradients: N(0, 0.1^2), x50 at every 10th step,
    30% exact zeros with `zeros`. before_step(t) runs before step t (1-based)."""
    for t in range(1, steps + 1):
        for i, p in enumerate(param_lists[0]):
            g = torch.randn_like(p) * (5.0 if t % 10 == 0 else 0.1)
            if zeros:
                g[torch.rand_like(p) < 0.3] = 0
            for params in param_lists:
                params[i].grad = g.clone()
        before_step(t)
        for opt in optimizers:
            opt.step()


def replicas(start, n):
    return [[torch.nn.Parameter(p.clone()) for p in start] for _ in range(n)]


def errors(ours, theirs):
    """Per parameter: |ours - theirs|, and the relative error of bitsandbytes' tests."""
    err = [(p - q).detach().abs() for p, q in zip(ours, theirs)]
    return err, [(e / (q.detach().abs() + 1e-8)) for e, q in zip(err, theirs)]


def assert_bnb_parity(bits, ours, theirs):
    """bitsandbytes' own tolerances (its tests/test_optim.py) for parameters of scale ~1: 8-bit mean
    abs error < 6e-5 and mean relative error < 6e-4; 32-bit max abs error <= 1e-5 x the parameter's
    largest magnitude."""
    for i, ((err, rel), q) in enumerate(zip(zip(*errors(ours, theirs)), theirs)):
        if bits == 8:
            assert err.mean() < 6e-5 and rel.mean() < 6e-4, (i, err.mean().item(), rel.mean().item())
        else:
            assert err.max() <= 1e-5 * q.detach().abs().max(), (i, err.max().item())


def assert_option_exercised(bits, ours, theirs, theirs_without):
    """The option moved bitsandbytes' own result by more than the parity tolerance and by more than
    3x our distance to it: the parity above could not hold with the option ignored on our side."""
    err, _ = errors(ours, theirs)
    effect, _ = errors(theirs, theirs_without)
    for i, (e, d, q) in enumerate(zip(err, effect, theirs)):
        if bits == 8:
            assert d.mean() > max(6e-5, 3 * e.mean()), (i, d.mean().item(), e.mean().item())
        else:
            assert d.max() > max(1e-5 * q.detach().abs().max(), 3 * e.max()), (i, d.max().item(), e.max().item())


# ------------------------------------------------------------ CPU, bitsandbytes 0.50.2
def bnb_050():
    return pytest.importorskip("bitsandbytes", minversion="0.50", reason="bitsandbytes==0.50.2 is in the test extra")


def _bnb_cpu_result(bnb, cls, **kwargs):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(40, 50)), torch.nn.Parameter(torch.randn(333))]
    train([getattr(bnb.optim, cls)(params, lr=LR, **kwargs)], [params], steps=6, zeros=True)
    return torch.cat([p.detach().flatten() for p in params])


# (class, constructor arguments): does bitsandbytes 0.50.2's CPU result change?
_ARGS8 = dict(optim_bits=8, min_8bit_size=1)
CPU_FACTS = {
    "Adam32bit amsgrad": ("Adam32bit", dict(amsgrad=True), False),
    "Adam amsgrad": ("Adam", dict(amsgrad=True), False),
    "32-bit args.skip_zeros": ("Adam32bit", dict(args=bnb_args(skip_zeros=True)), False),
    "8-bit args.skip_zeros": ("Adam8bit", dict(args=bnb_args(skip_zeros=True, **_ARGS8)), False),
    "32-bit args.percentile_clipping": ("Adam32bit", dict(args=bnb_args(percentile_clipping=5)), False),
    "8-bit args.percentile_clipping": ("Adam8bit", dict(args=bnb_args(percentile_clipping=5, **_ARGS8)), False),
    "8-bit args.block_wise": ("Adam8bit", dict(args=bnb_args(block_wise=False, **_ARGS8)), False),
    "8-bit args.max_unorm": ("Adam8bit", dict(args=bnb_args(max_unorm=0.05, **_ARGS8)), False),
    "32-bit args.max_unorm": ("Adam32bit", dict(args=bnb_args(max_unorm=0.05)), True),
}


@pytest.mark.parametrize("fact", CPU_FACTS)
def test_bnb_050_cpu_options(fact):
    """Which options bitsandbytes 0.50.2 honours on CPU (the others cannot be compared with it there)."""
    bnb = bnb_050()
    cls, kwargs, changes = CPU_FACTS[fact]
    base_kwargs = dict(args=bnb_args(**_ARGS8)) if cls == "Adam8bit" and "args" in kwargs else {}
    changed = not torch.equal(_bnb_cpu_result(bnb, cls, **kwargs), _bnb_cpu_result(bnb, cls, **base_kwargs))
    assert changed == changes


@pytest.mark.parametrize("cls", ["Adam", "Adam8bit", "Adam32bit"])
def test_bnb_050_refuses_what_it_dropped(cls):
    bnb = bnb_050()
    params = [torch.nn.Parameter(torch.randn(10))]
    for option in (dict(percentile_clipping=5), dict(block_wise=False)):
        with pytest.raises(TypeError, match="unexpected keyword"):
            getattr(bnb.optim, cls)(params, **option)
    if cls == "Adam8bit":
        with pytest.raises(ValueError, match="amsgrad"):
            bnb.optim.Adam8bit(params, amsgrad=True)


def test_max_unorm_32bit_matches_bnb_050_on_cpu():
    """max_unorm through `args`, 32-bit states: bitsandbytes' CPU rule with its max_unorm scaled per
    step by (1 - beta1^t) / sqrt(1 - beta2^t) is the CUDA rule, which we follow; unscaled it differs."""
    bnb = bnb_050()
    max_unorm = 0.3
    start = [torch.randn(64, 100), torch.randn(333)]
    ours, theirs, unscaled, plain = replicas(start, 4)
    scaled_args = bnb_args(max_unorm=max_unorm)

    def rescale(t):
        scaled_args.max_unorm = max_unorm * (1 - BETAS[0] ** t) / math.sqrt(1 - BETAS[1] ** t)

    optimizers = [
        torchadam8.Adam32bit(ours, lr=LR, betas=BETAS, args=bnb_args(max_unorm=max_unorm)),
        bnb.optim.Adam32bit(theirs, lr=LR, betas=BETAS, args=scaled_args),
        bnb.optim.Adam32bit(unscaled, lr=LR, betas=BETAS, args=bnb_args(max_unorm=max_unorm)),
        bnb.optim.Adam32bit(plain, lr=LR, betas=BETAS),
    ]
    train(optimizers, [ours, theirs, unscaled, plain], before_step=rescale)
    assert "unorm_vec" in optimizers[1].state[theirs[0]]
    assert_bnb_parity(32, ours, theirs)
    assert_option_exercised(32, ours, theirs, plain)
    # The CPU backend's own rule (no bias correction in the norm) is another result.
    err, _ = errors(ours, unscaled)
    assert all(e.max() > 1e-3 for e in err)


# ------------------------------------------------------------ GPU, bitsandbytes 0.49.2
def bnb_049():
    """bitsandbytes 0.49 for the GPU tests: the importable one, else the unpacked wheel in .peers/
    (scripts/gpu_check.sh puts .peers on PYTHONPATH; here it is appended to sys.path, as there)."""
    if importlib.util.find_spec("bitsandbytes") is None and (PEERS / "bitsandbytes").is_dir():
        sys.path.append(str(PEERS))
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes 0.49 (.peers/) for the GPU option tests")
    if "percentile_clipping" not in inspect.signature(bnb.optim.Adam8bit).parameters:
        pytest.skip(f"bitsandbytes {bnb.__version__} has no percentile_clipping / block_wise; 0.49 has")
    return bnb


BIG = ((256, 1000), (4097,))
# bitsandbytes' block_wise=False kernels, as its published csrc/kernels.cu reads (the 0.49.2 wheel has
# no source; its launcher runs the pre-pass on n / 4096 blocks of 256 threads): pre-pass block b reads
# elements [1024 b, 1024 b + 4096) (kPreconditionOptimizerStatic8bit2State: base_idx = blockIdx.x *
# blockDim.x * NUM_PER_THREAD), so its per-tensor maxima are exact only up to 4096 elements (beyond,
# part of a tensor may go unread, and max_unorm's sum counts overlaps twice); its update kernel skips
# a thread's partial last group of 4 (numel % 4 != 0). Hence tensors of 4096 elements.
PER_TENSOR = ((64, 64), (32, 128))

# name: (class, constructor arguments of both, shapes, bits, a key bitsandbytes' state must hold)
GPU_CASES = {
    "Adam8bit-percentile_clipping=5": ("Adam8bit", lambda: dict(percentile_clipping=5), BIG, 8, "gnorm_vec"),
    "Adam8bit-block_wise=False": ("Adam8bit", lambda: dict(block_wise=False), PER_TENSOR, 8, "max1"),
    "Adam32bit-percentile_clipping=5": ("Adam32bit", lambda: dict(percentile_clipping=5), BIG, 32, "gnorm_vec"),
    "Adam32bit-max_unorm=0.3": ("Adam32bit", lambda: dict(args=bnb_args(max_unorm=0.3)), BIG, 32, "unorm_vec"),
}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.filterwarnings("ignore::FutureWarning")  # 0.49's block_wise=False update is deprecated there
@pytest.mark.parametrize("case", GPU_CASES)
def test_option_parity_with_bnb_049_on_cuda(case):
    """50 steps (fewer than the 100 of the percentile history, though 0.49 replaces slot t % 100 as
    we do: its launcher clears it before the kernel adds into it), ours against bitsandbytes 0.49."""
    bnb = bnb_049()
    cls, options, shapes, bits, key = GPU_CASES[case]
    start = [torch.randn(s, device="cuda") for s in shapes]
    ours, theirs, plain = replicas(start, 3)
    optimizers = [
        getattr(torchadam8, cls)(ours, lr=LR, betas=BETAS, **options()),
        getattr(bnb.optim, cls)(theirs, lr=LR, betas=BETAS, **options()),
        getattr(bnb.optim, cls)(plain, lr=LR, betas=BETAS),
    ]
    train(optimizers, [ours, theirs, plain])
    torch.cuda.synchronize()
    assert all(key in optimizers[1].state[p] for p in theirs)  # bitsandbytes took the option, and so did we:
    if key == "gnorm_vec":
        assert all("gnorm_vec" in optimizers[0].state[p] for p in ours)
    if key == "max1":
        assert all(optimizers[0].state[p]["absmax1"].numel() == 1 for p in ours)
    assert_bnb_parity(bits, ours, theirs)
    assert_option_exercised(bits, ours, theirs, plain)
