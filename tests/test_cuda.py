"""GPU tests (skipped without CUDA): CPU and CUDA kernels agree, the classes on CUDA against
torch.optim.AdamW(fused=True) and bitsandbytes, many tensors and odd layouts, no host sync, and a
CUDA-graph-captured step. (Every registry op against its reference on CUDA: tests/test_ops.py.)"""

import copy
from types import SimpleNamespace

import pytest
import torch

import torchadam8
from ops_registry import OPS
from torchadam8.bench import captured

from conftest import copies, set_twin_grads, step_both

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def to(x, device):
    if isinstance(x, torch.Tensor):
        return x.to(device, copy=True)
    if isinstance(x, (list, tuple)):
        return type(x)(to(v, device) for v in x)
    return x


# The paging ops compute nothing to compare (and need managed memory, not a copy, on the GPU):
# tests/test_ops.py and tests/test_paged.py cover them on CUDA.
@pytest.mark.parametrize("info", [i for i in OPS if i.name not in ("zeros_managed", "prefetch", "page_out")],
                         ids=lambda i: i.name)
def test_cpu_and_cuda_kernels_agree(info):
    """Same inputs on both devices: quantization bit for bit, the updates up to float rounding."""
    for sample in info.sample_inputs("cpu"):
        cpu_args = to(sample.args, "cpu")
        gpu_args = to(sample.args, "cuda")
        out_cpu = info.op(*cpu_args, **sample.kwargs)
        out_gpu = info.op(*gpu_args, **sample.kwargs)
        info.compare(sample, (to(gpu_args, "cpu"), to(out_gpu, "cpu")), (cpu_args, out_cpu))


def make(shapes, dtype=torch.float32):
    return [torch.nn.Parameter(torch.randn(s, device="cuda", dtype=dtype)) for s in shapes]


def test_adam32bit_matches_fused_adamw_on_cuda():
    params = make(((256, 1000), (4097,), (33,)))
    ref = copies(params)
    ours = torchadam8.Adam32bit(params, lr=1e-3, weight_decay=0.1)
    theirs = torch.optim.AdamW(ref, lr=1e-3, weight_decay=0.1, fused=True)
    step_both(100, params, ours.step, ref, theirs.step)
    for p, r in zip(params, ref):
        assert (p - r).abs().max() <= 1e-5 * r.abs().max()


def test_many_tensors_mixed_dtypes_and_misaligned_views():
    """More tensors than one launch packs (384), three dtypes, and parameters whose storage
    offset breaks 16-byte alignment (the kernels' scalar path) — against the CPU kernels."""
    shapes = [(int(n),) for n in torch.randint(1, 3000, (900,))]
    dtypes = [(torch.float32, torch.float16, torch.bfloat16)[i % 3] for i in range(len(shapes))]
    base = torch.randn(10_001, device="cuda")
    gpu = [torch.nn.Parameter(torch.randn(s, device="cuda", dtype=d)) for s, d in zip(shapes, dtypes)]
    gpu += [torch.nn.Parameter(base[1:5001]), torch.nn.Parameter(base[5001:10001])]  # offsets of 4 and 20004 bytes
    cpu = [torch.nn.Parameter(p.detach().cpu().clone()) for p in gpu]
    opt_gpu = torchadam8.Adam8bit(gpu, min_8bit_size=256)
    opt_cpu = torchadam8.Adam8bit(cpu, min_8bit_size=256)
    for _ in range(5):
        for g, c in zip(gpu, cpu):
            c.grad = torch.randn_like(c)
            g.grad = c.grad.cuda()
        opt_gpu.step()
        opt_cpu.step()
    for g, c in zip(gpu, cpu):
        tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[g.dtype]
        torch.testing.assert_close(g.detach().cpu(), c.detach(), rtol=tol, atol=tol)
        assert (opt_gpu.state[g]["state1"].cpu().int() - opt_cpu.state[c]["state1"].int()).abs().max() <= 1


# Every option of the seed (one at a time, then all), for the tests of whole steps.
OPTIONS = {
    "defaults": {},
    "amsgrad": dict(amsgrad=True),
    "percentile_clipping": dict(percentile_clipping=5),
    "block_wise=False": dict(block_wise=False),
    "max_unorm": dict(args=SimpleNamespace(max_unorm=0.5)),
    "skip_zeros": dict(args=SimpleNamespace(skip_zeros=True)),
    "all": dict(amsgrad=True, percentile_clipping=5, block_wise=False,
                args=SimpleNamespace(max_unorm=0.5, skip_zeros=True)),
}


@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
def test_many_tensors_with_options_agree_with_cpu(options):
    """More tensors than a pack holds (256 for 8-bit, 512 for clipping), every option."""
    shapes = [(int(n),) for n in torch.randint(1, 3000, (600,))]
    cpu = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    gpu = [torch.nn.Parameter(p.detach().cuda()) for p in cpu]
    opt_cpu = torchadam8.Adam8bit(cpu, min_8bit_size=256, **options)
    opt_gpu = torchadam8.Adam8bit(gpu, min_8bit_size=256, **options)
    for t in range(5):
        for g, c in zip(gpu, cpu):
            c.grad = torch.randn_like(c) * (30.0 if t == 3 else 1.0)
            c.grad[torch.rand_like(c) < 0.1] = 0
            g.grad = c.grad.cuda()
        opt_gpu.step()
        opt_cpu.step()
    for g, c in zip(gpu, cpu):
        torch.testing.assert_close(g.detach().cpu(), c.detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
def test_step_does_not_synchronize(options):
    params = make(((5000,), (300,)))
    opt = torchadam8.Adam8bit(params, **options)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()  # state allocation
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step()
        opt.param_groups[0]["lr"] = 5e-4
        opt.step()
        # hyperparameters as host tensors: copied to the GPU without waiting for it
        opt.param_groups[0]["lr"] = torch.tensor(3e-4)
        opt.param_groups[0]["betas"] = (torch.tensor(0.8), 0.99)
        opt.step()
    finally:
        torch.cuda.set_sync_debug_mode(0)


@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
@pytest.mark.parametrize("cls", [torchadam8.Adam8bit, torchadam8.Adam32bit], ids=lambda c: c.__name__)
def test_cuda_graph_capture_replays_eager_steps(cls, options):
    params = make(((5000,), (3, 300)))
    twin = copies(params)
    grads = [torch.randn_like(p) for p in params]
    for p, q, g in zip(params, twin, grads):
        p.grad, q.grad = g, g.clone()
    lr = torch.tensor(1e-3, device="cuda")
    opt, ref = cls(params, lr=lr, **options), cls(twin, lr=1e-3, **options)
    replay = captured(opt.step)  # a warm-up step on a side stream (it allocates the state), then the capture
    ref.step()
    for _ in range(5):
        replay()
        ref.step()
    torch.cuda.synchronize()
    for p, q in zip(params, twin):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    assert opt.state[params[0]]["step"].item() == 6


def test_adam8bit_parity_with_bitsandbytes_on_cuda():
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes for the GPU parity test")
    params = make(((512, 1000), (4097,)))
    theirs = copies(params)
    opt = torchadam8.Adam8bit(params, lr=1e-3)
    ref = bnb.optim.Adam8bit(theirs, lr=1e-3)
    step_both(50, params, opt.step, theirs, ref.step)
    for p, q in zip(params, theirs):
        err = (p - q).abs()
        assert err.mean() < 6e-5 and (err / (q.abs() + 1e-8)).mean() < 6e-4


@pytest.mark.parametrize("cls", [torchadam8.Adam8bit, torchadam8.Adam32bit], ids=lambda c: c.__name__)
def test_fp16_gradscaler_training_matches_fused_adamw_without_sync(cls):
    """autocast(fp16) + GradScaler, 30 steps with one poisoned: the loss curve of AdamW(fused=True)
    (8-bit states: within 2%), and scaler.step(opt) never synchronizes."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 64)).cuda()
    twin = copy.deepcopy(model)
    data = [(torch.randn(32, 64, device="cuda"), torch.randn(32, 64, device="cuda")) for _ in range(30)]

    def run(m, opt, check_sync):
        scaler, losses = torch.amp.GradScaler("cuda", init_scale=2.0**14), []
        for i, (x, y) in enumerate(data):
            opt.zero_grad()
            with torch.autocast("cuda", dtype=torch.float16):
                loss = torch.nn.functional.mse_loss(m(x), y)
            scaler.scale(loss).backward()
            if i == 7:
                m[0].weight.grad[0, 0] = float("inf")
            if check_sync and i > 0:
                torch.cuda.set_sync_debug_mode("error")
            try:
                scaler.step(opt)
            finally:
                torch.cuda.set_sync_debug_mode(0)
            scaler.update()
            losses.append(loss.detach())
        return torch.stack(losses).float().cpu()

    ours = run(model, cls(model.parameters(), lr=1e-3, min_8bit_size=1), check_sync=True)
    ref = run(twin, torch.optim.AdamW(twin.parameters(), lr=1e-3, weight_decay=0.0, fused=True), check_sync=False)
    rtol = 2e-2 if cls is torchadam8.Adam8bit else 1e-3
    torch.testing.assert_close(ours, ref, rtol=rtol, atol=1e-4)


@pytest.mark.parametrize("cls", [torchadam8.Adam8bit, torchadam8.Adam32bit], ids=lambda c: c.__name__)
def test_whole_training_step_captured_replays_eager(cls):
    """Forward, backward and optimizer step captured in one CUDA graph (warm-up on a side stream,
    torch's recipe): 5 replays on fresh data give the parameters of 5 eager steps."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 512), torch.nn.GELU(), torch.nn.Linear(512, 64)).cuda()
    twin = copy.deepcopy(model)
    data = [(torch.randn(32, 64, device="cuda"), torch.randn(32, 64, device="cuda")) for _ in range(8)]
    opt = cls(model.parameters(), lr=torch.tensor(1e-3, device="cuda"), min_8bit_size=1)
    ref = cls(twin.parameters(), lr=1e-3, min_8bit_size=1)
    static_x, static_y = data[0][0].clone(), data[0][1].clone()

    def train_step(m, o, x, y):
        o.zero_grad(set_to_none=False)
        torch.nn.functional.mse_loss(m(x), y).backward()
        o.step()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for x, y in data[:3]:
            static_x.copy_(x)
            static_y.copy_(y)
            train_step(model, opt, static_x, static_y)
    torch.cuda.current_stream().wait_stream(side)
    for x, y in data[:3]:
        train_step(twin, ref, x, y)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        train_step(model, opt, static_x, static_y)
    for x, y in data[3:]:
        static_x.copy_(x)
        static_y.copy_(y)
        graph.replay()
        train_step(twin, ref, x, y)
    torch.cuda.synchronize()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cls", [torchadam8.Adam8bit, torchadam8.Adam32bit], ids=lambda c: c.__name__)
def test_reduce_overhead_compile_runs_the_step_in_cuda_graphs(cls):
    """torch.compile(mode="reduce-overhead"): the states are marked static (the step's
    _init_group runs eagerly under dynamo, as torch's own optimizers'), so Inductor records
    a CUDA graph and replays it; the results equal eager steps."""
    torch.manual_seed(0)
    params = make(((5000,), (3, 300)))
    twin = copies(params)
    opt = cls(params, lr=torch.tensor(1e-3, device="cuda"))
    ref = cls(twin, lr=torch.tensor(1e-3, device="cuda"))
    set_twin_grads(params, twin, scale=1.0)
    opt.step()
    ref.step()
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(opt.step, mode="reduce-overhead", fullgraph=True)
    for _ in range(5):
        for p, q in zip(params, twin):
            p.grad.copy_(torch.randn_like(p))
            q.grad.copy_(p.grad)
        compiled()
        ref.step()
    torch.cuda.synchronize()
    counters = torch._dynamo.utils.counters
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
    # Recorded once; only the gradients and lr (not the states) are inputs copied at each replay.
    assert 0 < counters["inductor"]["cudagraph_recorded_non_static_inputs"] <= len(params) + 1, dict(counters["inductor"])
    for p, q in zip(params, twin):
        assert torch.equal(p, q)
