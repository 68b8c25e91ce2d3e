"""Step throughput of torchadam8 against its peers, measured in one run on the same tensors.

    python -m torchadam8.bench                      # CPU: 16M fp32 parameters in one tensor
    python -m torchadam8.bench --device cuda        # GPU: the three parameter sets, fp32 and bf16
    python -m torchadam8.bench --sets gpt2-medium --dtypes bf16 --steps 20
    python -m torchadam8.bench --compile-time       # cold torch.compile of the step, GPT-2-medium tensors
    python -m torchadam8.bench --device cuda --paged --sets gpt2-medium --peers torchadam8,fused
    python -m torchadam8.bench --device cuda --amsgrad  # every optimizer with amsgrad=True

Peers: torch.optim.Adam(fused=True) (32-bit, the bandwidth reference), bitsandbytes' Adam8bit and
torchao's AdamW8bit when importable. GB/s counts the bytes a step must move (parameters read and
written, gradients read, states read and written); "copy" is a device-to-device copy of the
parameters, the bandwidth ceiling. Machines are noisy: read the ratios, not the absolute times.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parameter_sets(device: str) -> dict[str, list[tuple[int, ...]]]:
    """Shapes of each benchmark set."""
    d, layers, vocab = 1024, 24, 50257  # GPT-2 medium: ~355M parameters in ~290 tensors
    block = [(3 * d, d), (3 * d,), (d, d), (d,), (4 * d, d), (4 * d,), (d, 4 * d), (d,), (d,), (d,), (d,), (d,)]
    return {
        "single": [(16 * 2**20,)] if device == "cpu" else [(2**30,)],
        "gpt2-medium": [(vocab, d), (1024, d)] + block * layers + [(d,), (d,)],
        "small-many": [(4096,)] * 10_000,
        # GPT-2-medium's tensor count with 8 elements each: the step's host work alone
        "host-overhead": [(8,)] * 292,
    }


@dataclass
class Peer:
    name: str
    make: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]
    bytes_per_param: Callable[[torch.dtype], int]  # bytes a step must move per parameter


def _peers(device: str, paged: bool = False, amsgrad: bool = False) -> list[Peer]:
    import torchadam8

    states = 3 if amsgrad else 2  # amsgrad keeps a third state, the running maximum of v

    def eight(dt):  # p read+write, g read, uint8 states read+write (absmax: ~1.6%, ignored)
        return 3 * dt.itemsize + 2 * states

    def thirty_two(dt):  # p read+write, g read, fp32 states read+write
        return 3 * dt.itemsize + 8 * states

    ams = " amsgrad" if amsgrad else ""
    peers = [
        Peer(f"torchadam8.Adam8bit{ams}", lambda ps: torchadam8.Adam8bit(ps, amsgrad=amsgrad), eight),
        Peer(f"torchadam8.Adam32bit{ams}", lambda ps: torchadam8.Adam32bit(ps, amsgrad=amsgrad), thirty_two),
        # capturable: so that --graph can capture it (the same kernel, with lr and step on the device)
        Peer(f"torch Adam(fused=True){ams}",
             lambda ps: torch.optim.Adam(ps, fused=True, capturable=device != "cpu", amsgrad=amsgrad), thirty_two),
    ]
    if paged:  # the same steps with managed-memory states, prefetched each step; then paged out too
        for cls, width in ((torchadam8.PagedAdam8bit, eight), (torchadam8.PagedAdam32bit, thirty_two)):
            peers.append(Peer(f"torchadam8.{cls.__name__}{ams}", lambda ps, c=cls: c(ps, amsgrad=amsgrad), width))
            peers.append(Peer(f"torchadam8.{cls.__name__}{ams} + page-out",
                              lambda ps, c=cls: c(ps, amsgrad=amsgrad, page_out_after_step=True), width))
    if not amsgrad:  # (bitsandbytes' 8-bit Adam has no amsgrad)
        try:
            import bitsandbytes as bnb

            peers.append(Peer(f"bitsandbytes {bnb.__version__} Adam8bit", lambda ps: bnb.optim.Adam8bit(ps), eight))
        except Exception:  # not installed, or no backend for this device
            pass
    if device != "cpu":
        try:
            from torchao.optim import AdamW8bit

            peers.append(Peer(f"torchao AdamW8bit{ams}", lambda ps: AdamW8bit(ps, weight_decay=0.0, amsgrad=amsgrad),
                              eight))
        except Exception:
            pass
    return peers


def _sync(device: str) -> None:
    if device != "cpu":
        torch.cuda.synchronize()


def time_step(step: Callable[[], None], device: str, steps: int, warmup: int) -> float:
    """Median seconds per call (CUDA events on GPU, wall clock on CPU)."""
    for _ in range(warmup):
        step()
    _sync(device)
    times = []
    for _ in range(steps):
        if device == "cpu":
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        else:
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            step()
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end) / 1e3)
    return statistics.median(times)


def _plain_tensors(t: torch.Tensor):
    """The tensors holding a tensor's memory: itself, or a wrapper subclass's inner tensors (ours
    PagedTensor, torchao's quantized states), whose own storage has no data pointer."""
    if type(t) is not torch.Tensor and hasattr(t, "__tensor_flatten__"):
        for name in t.__tensor_flatten__()[0]:
            yield from _plain_tensors(getattr(t, name))
    else:
        yield t


def state_bytes(opt: torch.optim.Optimizer) -> int:
    seen, total = set(), 0
    for state in opt.state.values():
        for value in state.values():
            if not isinstance(value, torch.Tensor):
                continue
            for v in _plain_tensors(value):
                if v.untyped_storage().data_ptr() not in seen:
                    seen.add(v.untyped_storage().data_ptr())
                    total += v.untyped_storage().nbytes()
    return total


def captured(step: Callable[[], None]) -> Callable[[], None]:
    """The step captured in a CUDA graph (after a warm-up on a side stream): times the kernels
    without the host's per-step work, as a graph-captured training loop runs them."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def run_set(name, shapes, dtype, device, steps, warmup, peers, out, graph=False):
    numel = sum(torch.Size(s).numel() for s in shapes)
    gen = torch.Generator(device=device).manual_seed(0)
    init = [torch.randn(s, device=device, dtype=dtype, generator=gen) for s in shapes]
    grads = [torch.randn(s, device=device, dtype=dtype, generator=gen) * 1e-2 for s in shapes]
    nbytes = sum(t.numel() * t.element_size() for t in init)
    copy_src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    copy_dst = torch.empty_like(copy_src)
    t_copy = time_step(lambda: copy_dst.copy_(copy_src), device, steps, warmup)
    del copy_src, copy_dst
    rows = [("copy (ceiling)", t_copy, 2 * nbytes / t_copy / 1e9, float("nan"))]
    for peer in peers:
        params = [torch.nn.Parameter(t.clone()) for t in init]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        try:
            opt = peer.make(params)
            t = time_step(captured(opt.step) if graph else opt.step, device, steps, warmup)
            rows.append((peer.name, t, numel * peer.bytes_per_param(dtype) / t / 1e9, state_bytes(opt) / numel))
        except Exception as e:  # a peer that cannot run this set is reported, not fatal
            rows.append((f"{peer.name} [failed: {type(e).__name__}: {str(e)[:60]}]", float("nan"), float("nan"), float("nan")))
        finally:
            opt = params = None
            gc.collect()
            if device != "cpu":
                torch.cuda.empty_cache()
    out.append((name, dtype, numel, len(shapes), rows))


def print_table(results, graph: bool = False) -> None:
    for name, dtype, numel, count, rows in results:
        fused = next((t for n, t, *_ in rows if n.startswith("torch Adam")), float("nan"))
        bnb = next((t for n, t, *_ in rows if n.startswith("bitsandbytes")), float("nan"))
        ao = next((t for n, t, *_ in rows if n.startswith("torchao")), float("nan"))
        copy_gbs = rows[0][2]
        print(f"### {name}: {numel / 1e6:.1f}M {str(dtype).replace('torch.', '')} parameters in {count} tensors"
              f"{' (CUDA graph replays)' if graph else ''}\n")
        print("| optimizer | ms/step | M params/s | GB/s | % of copy | x fused Adam | x bnb 8bit | x torchao 8bit | state B/param |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for n, t, gbs, sb in rows:
            print(
                f"| {n} | {t * 1e3:.3f} | {numel / t / 1e6:.0f} | {gbs:.1f} | {100 * gbs / copy_gbs:.0f}% "
                f"| {fused / t:.2f} | {bnb / t:.2f} | {ao / t:.2f} | {sb:.3f} |"
            )
        print()


def compile_times(device: str, scale: int) -> None:
    """Cold torch.compile(opt.step) time on the GPT-2-medium set's ~290 tensors (each dimension
    divided by `scale`: compile time follows the tensor count, and small tensors keep the step's own
    time out of it), ours against torch.optim.AdamW compiled the same way (its default foreach step
    and fused=True). Caches are off, so every compile is cold."""
    import torchadam8

    shapes = [tuple(max(1, d // scale) for d in s) for s in parameter_sets(device)["gpt2-medium"]]
    candidates = [
        ("torchadam8.Adam8bit", lambda ps: torchadam8.Adam8bit(ps, lr=torch.tensor(1e-3, device=device)), True),
        ("torchadam8.Adam32bit", lambda ps: torchadam8.Adam32bit(ps, lr=torch.tensor(1e-3, device=device)), True),
        ("torch AdamW (foreach)", lambda ps: torch.optim.AdamW(ps, lr=torch.tensor(1e-3, device=device)), False),
        ("torch AdamW(fused=True)", lambda ps: torch.optim.AdamW(ps, lr=torch.tensor(1e-3, device=device), fused=True),
         False),
    ]
    n = sum(torch.Size(s).numel() for s in shapes)
    print(f"### cold compile of the step: {len(shapes)} tensors (GPT-2-medium shapes / {scale}: {n / 1e6:.1f}M "
          f"float32 parameters) on {device}\n")
    print("| optimizer | fullgraph | first compiled step (s) | x ours (Adam8bit) | compiled step (ms) |")
    print("|---|---|---:|---:|---:|")
    first = None
    for name, make, fullgraph in candidates:
        params = [torch.nn.Parameter(torch.randn(s, device=device)) for s in shapes]
        for p in params:
            p.grad = torch.randn_like(p)
        opt = make(params)
        try:
            opt.step()  # the state exists before compiling, for every optimizer alike
            torch._dynamo.reset()
            with torch._inductor.config.patch(fx_graph_cache=False), \
                    torch._functorch.config.patch(enable_autograd_cache=False):
                step = torch.compile(opt.step, fullgraph=fullgraph)
                _sync(device)
                t0 = time.perf_counter()
                step()
                _sync(device)
                cold = time.perf_counter() - t0
                times = []
                for _ in range(5):
                    t0 = time.perf_counter()
                    step()
                    _sync(device)
                    times.append(time.perf_counter() - t0)
        except Exception as e:  # a peer that cannot compile is reported, not fatal
            print(f"| {name} | {fullgraph} | failed: {type(e).__name__} | | |")
            continue
        first = first or cold
        print(f"| {name} | {fullgraph} | {cold:.2f} | {cold / first:.2f} | {1e3 * statistics.median(times):.2f} |",
              flush=True)
        del opt, params, step
        gc.collect()
    print()


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return value


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sets", default=None, help="comma-separated: single, gpt2-medium, small-many, host-overhead "
                        "(default: single on CPU, all three on GPU)")
    parser.add_argument("--dtypes", default=None, help="comma-separated: fp32, bf16, fp16 (default: fp32 on CPU, fp32,bf16 on GPU)")
    parser.add_argument("--numel", type=_positive, default=None, help="elements of the 'single' set")
    parser.add_argument("--steps", type=_positive, default=None, help="timed steps per optimizer (median reported)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=_positive, default=None, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--peers", default=None, help="comma-separated substrings selecting optimizers")
    parser.add_argument("--graph", action="store_true", help="time CUDA-graph replays of each step (peers "
                        "that cannot be captured are reported as failed)")
    parser.add_argument("--compile-time", action="store_true", help="only the cold torch.compile time of the "
                        "step on the GPT-2-medium tensors, ours against torch.optim.AdamW")
    parser.add_argument("--scale", type=_positive, default=16, help="--compile-time: divide each dimension by this")
    parser.add_argument("--amsgrad", action="store_true", help="every optimizer with amsgrad=True (bitsandbytes "
                        "has none: left out)")
    parser.add_argument("--paged", action="store_true", help="add PagedAdam8bit / PagedAdam32bit, with and "
                        "without page_out_after_step (states in managed memory)")
    args = parser.parse_args(argv)
    device = args.device
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {device}: this torch has no usable CUDA device")
    if args.graph and torch.device(device).type != "cuda":
        parser.error("--graph times CUDA-graph replays: it needs --device cuda")
    for option, given, known in (("--sets", args.sets, tuple(parameter_sets(device))),
                                 ("--dtypes", args.dtypes, tuple(DTYPES))):
        unknown = [v for v in (given or "").split(",") if given is not None and v not in known]
        if unknown:
            parser.error(f"{option}: unknown {', '.join(map(repr, unknown))}; choose from {', '.join(known)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    gpu = device != "cpu"
    sets = (args.sets or ("gpt2-medium,single,small-many" if gpu else "single")).split(",")
    dtypes = [DTYPES[d] for d in (args.dtypes or ("fp32,bf16" if gpu else "fp32")).split(",")]
    steps = args.steps or (20 if gpu else 10)
    all_sets = parameter_sets(device)
    if args.numel:
        all_sets["single"] = [(args.numel,)]
    peers = _peers(device, paged=args.paged, amsgrad=args.amsgrad)
    if args.peers:
        keys = args.peers.lower().split(",")
        peers = [p for p in peers if any(k in p.name.lower() for k in keys)]
    device_name = torch.cuda.get_device_name() if gpu else f"CPU ({torch.get_num_threads()} threads)"
    print(f"\n## torchadam8.bench on {device_name}, torch {torch.__version__}\n", flush=True)
    if args.compile_time:
        compile_times(device, args.scale)
        return
    for name in sets:
        for dtype in dtypes:
            results = []
            run_set(name, all_sets[name], dtype, device, steps, args.warmup, peers, results, graph=args.graph)
            print_table(results, args.graph)  # each set as soon as it is measured
            sys.stdout.flush()


if __name__ == "__main__":
    main()
