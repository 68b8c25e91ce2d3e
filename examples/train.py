"""Train a small character-level transformer on the Python standard library's own source code with
torch.optim.AdamW, torchadam8.Adam32bit and torchadam8.Adam8bit, and compare them.

    python examples/train.py                       # CPU, about a minute on 2 cores
    python examples/train.py --steps 1000 --d-model 256 --layers 4 --device cuda
    python examples/train.py --optimizers AdamW,Adam8bit+amsgrad,Adam8bit+percentile_clipping

Every optimizer starts from the same weights and sees the same batches; the table printed at the
end gives the final training and validation loss, the optimizer-state bytes and the step times.
The text needs no download: it is every .py file of the running Python's standard library.
"""

from __future__ import annotations

import argparse
import math
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F

import torchadam8

try:
    from tqdm import tqdm
except ImportError:  # the progress bar is optional
    tqdm = None


# ---------------------------------------------------------------- data
def stdlib_bytes(limit: int) -> torch.Tensor:
    """Up to `limit` bytes of the standard library's .py files, in a fixed order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts or "test" in path.parts:
            continue
        data = path.read_bytes()
        chunks.append(data)
        total += len(data)
        if total >= limit:
            break
    return torch.frombuffer(bytearray(b"".join(chunks)[:limit]), dtype=torch.uint8).long()


class Batches:
    """Random windows of the text, the same sequence for every optimizer (seeded)."""

    def __init__(self, data: torch.Tensor, ctx: int, batch: int, seed: int, device: str):
        self.data, self.ctx, self.batch, self.device = data, ctx, batch, device
        self.gen = torch.Generator().manual_seed(seed)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(0, len(self.data) - self.ctx - 1, (self.batch,), generator=self.gen)
        window = torch.stack([self.data[s : s + self.ctx + 1] for s in starts.tolist()]).to(self.device)
        return window[:, :-1], window[:, 1:]


# ---------------------------------------------------------------- model
class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attn.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.ln2(x))


class CharTransformer(nn.Module):
    def __init__(self, d: int, layers: int, heads: int, ctx: int):
        super().__init__()
        self.tok, self.pos = nn.Embedding(256, d), nn.Embedding(ctx, d)
        self.blocks = nn.Sequential(*[Block(d, heads) for _ in range(layers)])
        self.ln, self.head = nn.LayerNorm(d), nn.Linear(d, 256)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        return self.head(self.ln(self.blocks(x)))


# ---------------------------------------------------------------- training
OPTIMIZERS = {
    "AdamW": lambda ps, lr, wd: torch.optim.AdamW(ps, lr=lr, weight_decay=wd),
    "Adam32bit": lambda ps, lr, wd: torchadam8.Adam32bit(ps, lr=lr, weight_decay=wd),
    "Adam8bit": lambda ps, lr, wd: torchadam8.Adam8bit(ps, lr=lr, weight_decay=wd),
}
DEFAULT_OPTIMIZERS = tuple(OPTIMIZERS)
# The seed's other options, each on Adam8bit (pick them with --optimizers).
OPTION_VARIANTS = {
    "amsgrad": dict(amsgrad=True),
    "percentile_clipping": dict(percentile_clipping=5),
    "block_wise=False": dict(block_wise=False),
    "max_unorm": dict(args=SimpleNamespace(max_unorm=4.0)),  # binds early in training here
    "skip_zeros": dict(args=SimpleNamespace(skip_zeros=True)),
}
for _option, _kwargs in OPTION_VARIANTS.items():
    OPTIMIZERS[f"Adam8bit+{_option}"] = lambda ps, lr, wd, kw=_kwargs: torchadam8.Adam8bit(
        ps, lr=lr, weight_decay=wd, **kw)


@dataclass
class Config:
    steps: int = 400
    d_model: int = 128
    layers: int = 2
    heads: int = 4
    ctx: int = 64
    batch: int = 32
    lr: float = 3e-3
    weight_decay: float = 0.01
    text_bytes: int = 4_000_000
    eval_batches: int = 20
    seed: int = 0
    device: str = "cpu"
    compile: bool = False  # torch.compile the model and the optimizer step (fullgraph)


@dataclass
class Result:
    name: str
    train_loss: float  # mean of the last 10% of steps
    val_loss: float
    state_bytes: int
    step_ms: float  # whole training step
    opt_ms: float  # optimizer step alone


def optimizer_state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(
        v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)
    )


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@torch.no_grad()
def evaluate(model: nn.Module, batches: Batches, count: int) -> float:
    losses = []
    for _ in range(count):
        x, y = batches.next()
        losses.append(F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item())
    return sum(losses) / len(losses)


def train(cfg: Config, name: str, data: torch.Tensor, progress: bool = True) -> Result:
    split = int(0.95 * len(data))
    torch.manual_seed(cfg.seed)
    model = CharTransformer(cfg.d_model, cfg.layers, cfg.heads, cfg.ctx).to(cfg.device)
    # Compiled, the learning rate is a tensor: the scheduler changes its value, never the graph.
    lr = torch.tensor(cfg.lr, device=cfg.device) if cfg.compile else cfg.lr
    opt = OPTIMIZERS[name](model.parameters(), lr, cfg.weight_decay)
    forward, opt_step = model, opt.step
    if cfg.compile:  # the step is compiled before the scheduler wraps opt.step
        ours = isinstance(opt, torchadam8.Adam)  # torch's AdamW step has graph breaks of its own
        forward, opt_step = torch.compile(model), torch.compile(opt.step, fullgraph=ours)
    warmup = max(1, cfg.steps // 20)  # linear warm-up, then cosine decay to 10%
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * (0.55 + 0.45 * math.cos(math.pi * min(s, cfg.steps) / cfg.steps))
    )
    batches = Batches(data[:split], cfg.ctx, cfg.batch, cfg.seed + 1, cfg.device)
    bar = tqdm(range(cfg.steps), desc=f"{name:>9}", ncols=90, leave=True) if progress and tqdm else range(cfg.steps)
    losses, step_s, opt_s = [], 0.0, 0.0
    for step in bar:
        x, y = batches.next()
        _sync(cfg.device)
        t0 = time.perf_counter()
        loss = F.cross_entropy(forward(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        _sync(cfg.device)
        t1 = time.perf_counter()
        opt_step()
        sched.step()
        _sync(cfg.device)
        t2 = time.perf_counter()
        if step >= 3:  # the first steps allocate state (and compile)
            step_s, opt_s = step_s + t2 - t0, opt_s + t2 - t1
        losses.append(loss.item())
        if hasattr(bar, "set_postfix") and step % 10 == 0:
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    tail = losses[-max(1, cfg.steps // 10) :]
    val = evaluate(model, Batches(data[split:], cfg.ctx, cfg.batch, cfg.seed + 2, cfg.device), cfg.eval_batches)
    timed = max(1, cfg.steps - 3)
    return Result(name, sum(tail) / len(tail), val, optimizer_state_bytes(opt), 1e3 * step_s / timed, 1e3 * opt_s / timed)


def print_table(results: list[Result]) -> None:
    base = results[0]
    print("\n| optimizer | train loss | val loss | vs " + base.name + " | state MB | step ms | optimizer ms |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(
            f"| {r.name} | {r.train_loss:.4f} | {r.val_loss:.4f} | {100 * (r.val_loss / base.val_loss - 1):+.2f}% "
            f"| {r.state_bytes / 2**20:.2f} | {r.step_ms:.1f} | {r.opt_ms:.2f} |"
        )


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return value


def main(argv=None) -> list[Result]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = Config()
    parser.add_argument("--steps", type=positive, default=defaults.steps)
    parser.add_argument("--d-model", type=positive, default=defaults.d_model)
    parser.add_argument("--layers", type=positive, default=defaults.layers)
    parser.add_argument("--heads", type=positive, default=defaults.heads)
    parser.add_argument("--ctx", type=positive, default=defaults.ctx)
    parser.add_argument("--batch", type=positive, default=defaults.batch)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--optimizers", default=",".join(DEFAULT_OPTIMIZERS),
                        help="comma-separated, from " + ", ".join(OPTIMIZERS))
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="torch.compile the model and the optimizer step (default: on for CUDA, off for CPU)")
    args = parser.parse_args(argv)
    unknown = [name for name in args.optimizers.split(",") if name not in OPTIMIZERS]
    if unknown:  # before any training, not after the first ones
        parser.error(f"--optimizers: unknown {', '.join(map(repr, unknown))}; choose from {', '.join(OPTIMIZERS)}")
    if args.d_model % args.heads:
        parser.error(f"--d-model ({args.d_model}) must be a multiple of --heads ({args.heads})")
    if args.compile is None:
        args.compile = args.device.startswith("cuda")
    cfg = Config(
        steps=args.steps, d_model=args.d_model, layers=args.layers, heads=args.heads, ctx=args.ctx,
        batch=args.batch, lr=args.lr, weight_decay=args.weight_decay, seed=args.seed, device=args.device,
        compile=args.compile,
    )
    data = stdlib_bytes(cfg.text_bytes)
    n_params = sum(p.numel() for p in CharTransformer(cfg.d_model, cfg.layers, cfg.heads, cfg.ctx).parameters())
    print(f"{len(data) / 1e6:.1f} MB of standard-library source; model: {n_params / 1e6:.2f}M parameters; "
          f"{cfg.steps} steps of {cfg.batch}x{cfg.ctx} bytes on {cfg.device}"
          f"{', compiled (model and optimizer step)' if cfg.compile else ''}")
    results = [train(cfg, name, data) for name in args.optimizers.split(",")]
    print_table(results)
    return results


if __name__ == "__main__":
    main()
