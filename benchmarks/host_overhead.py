"""Eager host work of a step: 292 parameters of 8 elements (GPT-2-medium's tensor count, the step's
own arithmetic negligible), ours against torch.optim.Adam(fused=True), interleaved in one process:
40 rounds of 20 steps of each optimizer, the best round of each. `python -m torchadam8.bench --sets
host-overhead` times the optimizers one after the other, and this host's speed drifts by up to 2x
within minutes; side by side, the ratios hold.

    python benchmarks/host_overhead.py [--params 292] [--groups 1] [--rounds 40] [--device cuda]

--groups N splits the parameters into N param groups (a real model's are often two: with and
without weight decay).

On a GPU the tensors are tiny, so the GPU's work is negligible and a round (synchronized at its
end) times the host's: Python, checks, launches.
"""

import argparse
import time

import torch

import torchadam8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=int, default=292)
    parser.add_argument("--groups", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cuda = torch.device(args.device).type == "cuda"

    def make(cls, **kwargs):
        params = [torch.nn.Parameter(torch.randn(8, device=args.device)) for _ in range(args.params)]
        for p in params:
            p.grad = torch.randn(8, device=args.device)
        opt = cls([{"params": params[g::args.groups]} for g in range(args.groups)], **kwargs)
        opt.step()  # state made
        return opt

    opts = {"torchadam8.Adam8bit": make(torchadam8.Adam8bit), "torchadam8.Adam32bit": make(torchadam8.Adam32bit),
            "torch Adam(fused=True)": make(torch.optim.Adam, fused=True)}
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    best = dict.fromkeys(opts, float("inf"))
    for _ in range(args.rounds):
        for name, opt in opts.items():
            sync()
            start = time.perf_counter()
            for _ in range(20):
                opt.step()
            sync()
            best[name] = min(best[name], (time.perf_counter() - start) / 20)
    fused = best["torch Adam(fused=True)"]
    print(f"| optimizer ({args.params} parameters of 8 elements in {args.groups} groups, {args.device}) | ms/step "
          "| x fused Adam (time) |\n"
          "|---|---:|---:|")
    for name, t in best.items():
        print(f"| {name} | {t * 1e3:.3f} | {t / fused:.2f} |")


if __name__ == "__main__":
    main()
