"""Paged optimizers (PagedAdam, PagedAdam8bit, PagedAdam32bit): states of at least 100k elements
are PagedTensors (managed memory on CUDA, ordinary memory on the CPU, one code path), numerics
equal the non-paged classes, compiled steps keep them paged and in place, checkpoints reload them
paged. The GPU tests (skipped without CUDA) check the memory is managed, where it was prefetched
last, and a CUDA-graph replay after a prefetch."""

import copy
import ctypes
import functools

import pytest
import torch
import torch._inductor.fx_passes.post_grad as post_grad

import torchadam8
from torchadam8 import PagedTensor
from torchadam8.bench import captured
from torchadam8.paged import unwrap

from conftest import DEVICES, copies, render, set_grads, set_twin_grads, through_torch_save

PAIRS = [(torchadam8.PagedAdam8bit, torchadam8.Adam8bit), (torchadam8.PagedAdam32bit, torchadam8.Adam32bit),
         (torchadam8.PagedAdam, torchadam8.Adam)]
SHAPES = ((400, 256), (300,), (100_000,))  # 102,400 and 100,000 elements are paged, 300 not
OPTIONS = {"defaults": {}, "amsgrad": {"amsgrad": True}, "per_tensor": {"block_wise": False},
           "clipping": {"percentile_clipping": 5}}


def make(device, shapes=SHAPES):
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(s, device=device) * 0.1) for s in shapes]


def paged_keys(opt, p):
    return sorted(k for k, v in opt.state[p].items() if isinstance(v, PagedTensor))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("paged_cls,cls", PAIRS, ids=lambda c: c.__name__)
def test_large_states_are_paged(device, paged_cls, cls):
    params = make(device)
    opt = paged_cls(params, amsgrad=True)
    set_grads(params)
    opt.step()
    for p in params:
        want = ["state1", "state2", "state3"] if p.numel() >= 100_000 else []
        assert paged_keys(opt, p) == want, list(p.shape)
    assert not any(isinstance(v, PagedTensor) for v in opt.state[params[1]].values())
    plain = cls(copies(params))  # the non-paged class pages nothing, and is_paged=True pages
    set_grads(plain.param_groups[0]["params"])
    plain.step()
    assert all(paged_keys(plain, p) == [] for p in plain.param_groups[0]["params"])
    assert paged_keys(cls(params, is_paged=True), params[0]) == []  # nothing before the first step


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("option", OPTIONS)
@pytest.mark.parametrize("paged_cls,cls", PAIRS[:2], ids=lambda c: c.__name__)
def test_paged_numerics_equal_non_paged(device, paged_cls, cls, option):
    """Same kernels on other memory: bit for bit the same parameters and states, with page-out too."""
    params = make(device)
    twins = [copies(params), copies(params)]
    opts = [paged_cls(params, lr=1e-2, **OPTIONS[option]),
            paged_cls(twins[0], lr=1e-2, page_out_after_step=True, **OPTIONS[option]),
            cls(twins[1], lr=1e-2, **OPTIONS[option])]
    for _ in range(5):
        set_twin_grads(params, *twins)
        for opt in opts:
            opt.step()
    for p, q0, q1 in zip(params, *twins):
        assert torch.equal(p, q0) and torch.equal(p, q1)
        for key, value in opts[2].state[q1].items():
            assert torch.equal(opts[0].state[p][key], value), key
            assert torch.equal(opts[1].state[q0][key], value), key


def test_paged_tensor_acts_as_its_inner_tensor():
    inner = torch.randn(5, 4)
    t = PagedTensor(inner)
    assert repr(t) == "PagedTensor(shape=[5, 4], dtype=torch.float32, device=cpu)"
    assert t.zero_() is t and torch.equal(inner, torch.zeros(5, 4))  # in place: the wrapper comes back
    t.add_(2.0)
    assert type(t.clone()) is torch.Tensor and torch.equal(t.clone(), torch.full((5, 4), 2.0))
    assert type(t * 3) is torch.Tensor and float((t * 3).sum()) == 120.0
    assert t.shape == (5, 4) and t.stride() == inner.stride() and not t.requires_grad
    with pytest.raises(TypeError, match="PagedTensor wraps a plain tensor"):
        PagedTensor(t)


@pytest.mark.parametrize("paged_cls", [torchadam8.PagedAdam8bit, torchadam8.PagedAdam32bit], ids=lambda c: c.__name__)
def test_compiled_step_keeps_states_paged_and_in_place(paged_cls):
    """fullgraph compile: equal to eager bit for bit, states still PagedTensors at the same memory,
    and the graph holds only the adam8 ops and self-copies (no state is cloned)."""
    params = make("cpu")
    twin = copies(params)
    opt = paged_cls(params, lr=torch.tensor(1e-2))
    ref = paged_cls(twin, lr=torch.tensor(1e-2))
    set_twin_grads(params, twin)
    opt.step()  # eager first steps: the state exists before tracing
    ref.step()
    inner = {(id(p), k): v.inner.data_ptr() for p in params for k, v in opt.state[p].items()
             if isinstance(v, PagedTensor)}
    assert len(inner) == 4
    graphs, original = [], post_grad.decompose_auto_functionalized

    def record(graph):
        out = original(graph)
        graphs.append(render(graph))
        return out

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(opt.step, fullgraph=True)
    post_grad.decompose_auto_functionalized = record
    try:
        with torch._inductor.config.patch(fx_graph_cache=False), \
                torch._functorch.config.patch(enable_autograd_cache=False):
            for i in range(4):
                set_twin_grads(params, twin)
                compiled()
                ref.step()
                opt.param_groups[0]["lr"].fill_(1e-2 / (i + 2))
                ref.param_groups[0]["lr"].fill_(1e-2 / (i + 2))
    finally:
        post_grad.decompose_auto_functionalized = original
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    for p, q in zip(params, twin):
        assert torch.equal(p, q)
        for key, value in ref.state[q].items():
            assert torch.equal(opt.state[p][key], value), key
    now = {(id(p), k): v.inner.data_ptr() for p in params for k, v in opt.state[p].items()
           if isinstance(v, PagedTensor)}
    assert now == inner
    lines = graphs[-1].splitlines()[:-1]
    ops = [line.split("(")[0] for line in lines]
    assert "adam8.prefetch.default" in ops and ("adam8.adam8bit_step.default" in ops or "adam8.adam_step.default" in ops)
    for line in lines:  # besides the adam8 ops only constants (the betas tensor): no input is read
        assert line.startswith("adam8.") or "#" not in line, graphs[-1]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("paged_cls", [torchadam8.PagedAdam8bit, torchadam8.PagedAdam32bit], ids=lambda c: c.__name__)
def test_checkpoint_reloads_paged(device, paged_cls):
    params = make(device)
    opt = paged_cls(params, lr=1e-2, amsgrad=True)
    for _ in range(3):
        set_grads(params)
        opt.step()
    saved = through_torch_save(opt.state_dict())
    twin = copies(params)
    again = paged_cls(twin, lr=1e-2, amsgrad=True)
    again.load_state_dict(saved)
    for p, q in zip(params, twin):
        assert paged_keys(again, q) == paged_keys(opt, p)
        for key, value in opt.state[p].items():
            assert torch.equal(again.state[q][key], value), key
    for _ in range(3):  # and training goes on alike
        set_twin_grads(params, twin)
        opt.step()
        again.step()
    for p, q in zip(params, twin):
        assert torch.equal(p, q)


def test_deepcopy_of_a_paged_optimizer_stays_paged():
    params = make("cpu")
    opt = torchadam8.PagedAdam8bit(params)
    set_grads(params)
    opt.step()
    twin = copy.deepcopy(opt)
    for p in params:
        q = next(q for q in twin.state if torch.equal(q, p) and q is not p)
        assert paged_keys(twin, q) == paged_keys(opt, p)
        for key, value in opt.state[p].items():
            copied = twin.state[q][key]
            assert torch.equal(copied, value) and unwrap(copied).data_ptr() != unwrap(value).data_ptr(), key
    twins = [p for g in twin.param_groups for p in g["params"]]  # the copy steps as the original, still paged
    set_twin_grads(params, twins)
    opt.step()
    twin.step()
    for p, q in zip(params, twins):
        assert torch.equal(p.detach(), q.detach()) and paged_keys(twin, q) == paged_keys(opt, p)


def test_prefetch_and_page_out_by_hand_on_cpu():
    params = make("cpu")
    opt = torchadam8.PagedAdam8bit(params)
    opt.prefetch()  # no state yet: nothing to do
    set_grads(params)
    opt.step()
    states = {id(v): v for s in opt.state.values() for v in s.values()}
    opt.page_out()
    opt.prefetch()
    assert {id(v): v for s in opt.state.values() for v in s.values()} == states


# ---------------------------------------------------------------- GPU
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@functools.cache
def cudart():
    return ctypes.CDLL("libcudart.so.13")


def last_prefetch_location(t: torch.Tensor) -> str:
    """Where the memory of `t` was last prefetched to: "device", "host" or "none"
    (cudaMemRangeGetAttribute(cudaMemRangeAttributeLastPrefetchLocationType))."""
    value = ctypes.c_int(-1)
    last_prefetch_location_type = 7
    err = cudart().cudaMemRangeGetAttribute(ctypes.byref(value), ctypes.c_size_t(4), last_prefetch_location_type,
                                            ctypes.c_void_p(t.data_ptr()), ctypes.c_size_t(t.nbytes))
    assert err == 0, f"cudaMemRangeGetAttribute failed with error {err}"
    return {0: "none", 1: "device", 2: "host"}.get(value.value, f"type {value.value}")


def is_managed(t: torch.Tensor) -> bool:
    attributes = (ctypes.c_int * 64)()  # room for cudaPointerAttributes; its first field is the type
    assert cudart().cudaPointerGetAttributes(attributes, ctypes.c_void_p(t.data_ptr())) == 0
    return attributes[0] == 3  # cudaMemoryTypeManaged


@gpu
def test_paged_states_are_managed_and_follow_page_out():
    params = make("cuda")
    opt = torchadam8.PagedAdam8bit(params, page_out_after_step=True)
    set_grads(params)
    opt.step()
    torch.cuda.synchronize()
    paged = [v for s in opt.state.values() for v in s.values() if isinstance(v, PagedTensor)]
    assert len(paged) == 4 and all(is_managed(v.inner) for v in paged)
    assert not is_managed(opt.state[params[1]]["state1"])
    assert [last_prefetch_location(v.inner) for v in paged] == ["host"] * 4  # paged out after the step
    opt.prefetch()
    torch.cuda.synchronize()
    assert [last_prefetch_location(v.inner) for v in paged] == ["device"] * 4


@gpu
def test_paged_step_does_not_synchronize():
    params = make("cuda")
    opt = torchadam8.PagedAdam8bit(params, page_out_after_step=True)
    set_grads(params)
    opt.step()
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step()
    finally:
        torch.cuda.set_sync_debug_mode(0)


@gpu
@pytest.mark.parametrize("paged_cls", [torchadam8.PagedAdam8bit, torchadam8.PagedAdam32bit], ids=lambda c: c.__name__)
def test_cuda_graph_replay_of_a_paged_step(paged_cls):
    """Prefetch is skipped inside the capture; prefetching by hand before each replay, 3 replays
    give the parameters of 3 eager steps."""
    params = make("cuda")
    twin = copies(params)
    set_twin_grads(params, twin)
    opt = paged_cls(params, lr=torch.tensor(1e-2, device="cuda"))
    ref = paged_cls(twin, lr=1e-2)
    replay = captured(opt.step)  # one warm-up step on a side stream, then the capture
    ref.step()
    for _ in range(3):
        opt.page_out()
        opt.prefetch()
        replay()
        ref.step()
    torch.cuda.synchronize()
    for p, q in zip(params, twin):
        assert torch.equal(p, q)


@gpu
def test_paged_tensor_dying_during_a_cuda_graph_capture_does_not_break_it():
    """Managed memory cannot be freed while a CUDA graph is captured (cudaFree would invalidate the
    capture): a paged tensor that dies then is freed after the capture instead."""
    doomed = torchadam8.paged.paged_zeros_like(torch.empty(200_000, device="cuda"), torch.float32)
    x = torch.zeros(4, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        x.add_(1)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        x.add_(1)
        del doomed  # its deleter runs inside the capture
        x.add_(1)
    graph.replay()
    after = torchadam8.paged.paged_zeros_like(torch.empty(200_000, device="cuda"), torch.float32)  # frees it
    torch.cuda.synchronize()
    assert x.tolist() == [3.0] * 4 and is_managed(after.inner)
