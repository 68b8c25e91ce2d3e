"""torch.compile(opt.step, fullgraph=True) with an LR scheduler changing the learning rate every
step: no recompilation (read from torch._dynamo's counters) and the same parameters as eager,
bit for bit, for every class and with every option."""

from types import SimpleNamespace

import pytest
import torch
from torch._dynamo.utils import counters

from torchadam8 import Adam, Adam8bit, Adam32bit

from conftest import copies, set_twin_grads

OPTIONS = {
    "defaults": {},
    "all": dict(amsgrad=True, percentile_clipping=5, block_wise=False,
                args=SimpleNamespace(max_unorm=0.5, skip_zeros=True)),
}
SCHEDULERS = {
    "LambdaLR": lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1 / (t + 1)),
    "CosineAnnealingLR": lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, 50),
    # changes beta1 too, at every step, as a Python float
    "OneCycleLR": lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=60,
                                                                  cycle_momentum=True),
}


def make(cls, lr, options):
    params = [torch.nn.Parameter(torch.randn(s)) for s in ((70, 90), (300,), (17,))]
    kwargs = dict(optim_bits=8) if cls is Adam else {}
    return params, cls(params, lr=lr, **kwargs, **options)


def compiled_against_eager(params, opt, twin, twin_opt, scheduler, **compile_options):
    """One eager step of both (the state is made eagerly: its first compiled trace would differ), then
    50 steps of opt compiled (dynamo counters cleared first) and of twin_opt eager, each under its
    scheduler."""
    set_twin_grads(params, twin, scale=1.0)
    opt.step()
    twin_opt.step()
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(opt.step, fullgraph=True, **compile_options)  # before the scheduler wraps opt.step
    sched, twin_sched = SCHEDULERS[scheduler](opt), SCHEDULERS[scheduler](twin_opt)
    for _ in range(50):
        set_twin_grads(params, twin, scale=1.0)
        compiled()
        twin_opt.step()
        sched.step()
        twin_sched.step()


CASES = [(lr_kind, scheduler) for scheduler in SCHEDULERS for lr_kind in ("tensor", "float")
         if lr_kind == "tensor" or scheduler == "LambdaLR"]


@pytest.mark.parametrize("lr_kind,scheduler", CASES)
@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("cls", [Adam, Adam8bit, Adam32bit], ids=lambda c: c.__name__)
def test_compiled_step_with_scheduler_does_not_recompile(cls, options, scheduler, lr_kind):
    torch.manual_seed(0)
    lr = torch.tensor(1e-2) if lr_kind == "tensor" else 1e-2
    params, opt = make(cls, lr, OPTIONS[options])
    twin = copies(params)
    twin_opt = type(opt)(twin, lr=torch.tensor(1e-2) if lr_kind == "tensor" else 1e-2,
                         **(dict(optim_bits=8) if cls is Adam else {}), **OPTIONS[options])

    compiled_against_eager(params, opt, twin, twin_opt, scheduler)
    # A tensor lr never recompiles; a float one (lr, or OneCycleLR's beta1) once, when its first
    # change makes it a graph input.
    floats = lr_kind == "float" or scheduler == "OneCycleLR"
    assert counters["stats"]["unique_graphs"] == (2 if floats else 1), dict(counters["stats"])
    for p, q in zip(params, twin):
        assert torch.equal(p.detach(), q.detach())


@pytest.mark.parametrize("cls", [Adam8bit, Adam32bit], ids=lambda c: c.__name__)
def test_dynamic_compile_never_recompiles_with_float_lr_and_betas(cls):
    """compile(dynamic=True) makes Python floats graph inputs from the start: OneCycleLR changing a
    float lr and beta1 at every step compiles once, and matches eager."""
    torch.manual_seed(0)
    params, opt = make(cls, 1e-2, {})
    twin = copies(params)
    twin_opt = cls(twin, lr=1e-2)
    compiled_against_eager(params, opt, twin, twin_opt, "OneCycleLR", dynamic=True)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert opt.param_groups[0]["betas"][0] != 0.95  # the scheduler did move beta1
    for p, q in zip(params, twin):
        assert torch.equal(p.detach(), q.detach())


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("cls", [Adam8bit, Adam32bit])
def test_compiled_step_follows_changes_of_args(cls, dynamic):
    """opt.args is read at each step (as in bitsandbytes): compiled steps follow each change of
    percentile_clipping and max_unorm (retracing: ints that change turn symbolic in dynamo, so a
    guard on their values is not a given), bit for bit as eager; a bad value is refused, naming it,
    with nothing changed."""
    torch.manual_seed(0)
    params, opt = make(cls, 1e-3, {})
    twins = copies(params)
    twin_opt = cls(twins, lr=1e-3)
    torch._dynamo.reset()
    step = torch.compile(opt.step, fullgraph=True, dynamic=dynamic)
    changes = {2: (5, 0.0), 4: (10, 0.01), 6: (3, 0.01), 8: (100, 0.0), 10: (5, 0.0)}
    for i in range(12):
        set_twin_grads(params, twins, scale=10.0 if i % 2 else 1e-1)  # spikes: clipping acts
        if i in changes:
            for o in (opt, twin_opt):
                o.args.percentile_clipping, o.args.max_unorm = changes[i]
        step()
        twin_opt.step()
        for p, q in zip(params, twins):
            assert torch.equal(p.detach(), q.detach()), i
    before = copies(params)
    opt.args.percentile_clipping = 500
    set_twin_grads(params)
    with pytest.raises(Exception, match="percentile_clipping must be an int in 0..100, got 500"):
        step()
    for p, q in zip(params, before):
        assert torch.equal(p.detach(), q.detach())


@pytest.mark.parametrize("cls", [Adam8bit, Adam32bit])
def test_compiled_step_follows_amsgrad_switched_in_a_group(cls):
    """amsgrad switched on, then off, in a group between compiled steps: the step retraces and
    stays bit for bit equal to eager (the running maximum made, then dropped, by _init_group)."""
    torch.manual_seed(0)
    params, opt = make(cls, 1e-3, {})
    twins = copies(params)
    twin_opt = cls(twins, lr=1e-3)
    torch._dynamo.reset()
    step = torch.compile(opt.step, fullgraph=True)
    for i in range(8):
        set_twin_grads(params, twins, scale=10.0 if i % 2 else 1e-1)
        if i in (2, 5):
            for o in (opt, twin_opt):
                o.param_groups[0]["amsgrad"] = i == 2
        step()
        twin_opt.step()
        for p, q in zip(params, twins):
            assert torch.equal(p.detach(), q.detach()), i
        assert ("state3" in opt.state[params[0]]) == (2 <= i < 5)


@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("cls", [Adam, Adam8bit, Adam32bit], ids=lambda c: c.__name__)
def test_compiled_step_graph_takes_only_the_gradients_as_copied_inputs(cls, options):
    """What a CUDA graph of the compiled step (mode="reduce-overhead") copies at each replay: its
    inputs not marked static. Parameters, states and the 8-bit code tables must be static (they keep
    their addresses); only the gradients may be copied in (lr is a float here: a constant)."""
    params, opt = make(cls, 1e-3, OPTIONS[options])
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()  # state made eagerly
    copied = []

    def backend(gm, example_inputs):
        for node in gm.graph.find_nodes(op="placeholder"):
            value = node.meta.get("example_value")
            static = node.meta.get("tensor_dict", {}).get("_dynamo_static_input_type")
            if isinstance(value, torch.Tensor) and not static:
                copied.append(tuple(value.shape))
        return gm.forward

    torch.compile(opt.step, backend=backend, fullgraph=True)()
    assert sorted(copied) == sorted(tuple(p.shape) for p in params)


@pytest.mark.parametrize("cls,op", [(Adam8bit, "adam8bit_step"), (Adam32bit, "adam_step")], ids=["8bit", "32bit"])
def test_compiled_step_calls_the_op_per_128_parameters_and_equals_eager(cls, op):
    """A compiled step splits a batch into op calls of at most COMPILED_CALL_PARAMS parameters (the
    cost of Inductor's passes grows with the square of a call's tensor count); the parameters are
    those of eager steps, which make one call, bit for bit."""
    from torchadam8.optim import COMPILED_CALL_PARAMS

    n = 2 * COMPILED_CALL_PARAMS + 44
    params = [torch.nn.Parameter(torch.randn(5 + i % 7)) for i in range(n)]
    twin = copies(params)
    opt, twin_opt = cls(params, min_8bit_size=1), cls(twin, min_8bit_size=1)
    set_twin_grads(params, twin)
    opt.step()
    twin_opt.step()
    calls = []

    def backend(gm, example_inputs):
        packet = getattr(torch.ops.adam8, op)
        calls.append(sum(node.target in (packet, packet.default) for node in gm.graph.nodes))
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(opt.step, fullgraph=True, backend=backend)
    for _ in range(3):
        set_twin_grads(params, twin)
        compiled()
        twin_opt.step()
    assert calls == [3]
    for p, q in zip(params, twin):
        assert torch.equal(p, q)
