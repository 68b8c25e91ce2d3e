import io
import os
import random

import pytest
import torch

import torchadam8  # noqa: F401  (defines the ops and loads the kernels)

# Fresh random inputs every run; the seed is printed so a failure can be replayed with ADAM8_SEED.
SEED = int(os.environ.get("ADAM8_SEED", random.SystemRandom().randrange(2**31)))

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def pytest_report_header(config):
    return f"torchadam8 tests: ADAM8_SEED={SEED}, devices={DEVICES}, torch {torch.__version__}"


def pytest_terminal_summary(terminalreporter):
    # Also under -q, which hides the header: a failure can then be replayed with the same inputs.
    terminalreporter.write_line(f"torchadam8 tests: ADAM8_SEED={SEED}")


@pytest.fixture(autouse=True)
def _fresh_state():
    random.seed(SEED)
    torch.manual_seed(SEED)
    # Compiled steps share torch.optim's step wrapper, whose recompile limit (8) would otherwise
    # carry over from test to test.
    torch._dynamo.reset()
    yield


# ------------------------------------------------------------ optimizer pairs
def set_grads(params, scale=1e-1):
    for p in params:
        p.grad = (torch.randn_like(p, dtype=torch.float32) * scale).to(p.dtype)


def copies(params):
    return [torch.nn.Parameter(p.detach().clone()) for p in params]


def set_twin_grads(params, *twins, scale=1e-1):
    """Fresh random gradients for params, and the same for each list of twin parameters."""
    set_grads(params, scale)
    for twin in twins:
        for p, q in zip(params, twin):
            q.grad = p.grad.clone()


def through_torch_save(state_dict):
    """state_dict after torch.save and torch.load(weights_only=True)."""
    buf = io.BytesIO()
    torch.save(state_dict, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def step_both(steps, params, step, twin_params, twin_step, before_step=lambda i: None):
    """`steps` calls of step and twin_step, each after the same fresh random gradients."""
    for i in range(steps):
        set_twin_grads(params, twin_params)
        before_step(i)
        step()
        twin_step()


# A traced graph as text (tests/test_graph.py, test_paged.py); here, not in test_graph, because the
# GPU machine has no expecttest, which test_graph needs.
SHORT = {torch.float32: "f32", torch.uint8: "u8"}


def render(graph: torch.fx.Graph) -> str:
    """One line per op; each input as dtype[shape]#position."""
    names = {}
    for i, node in enumerate(n for n in graph.nodes if n.op == "placeholder"):
        val = node.meta["val"]
        names[node] = f"{SHORT.get(val.dtype, val.dtype)}{list(val.shape)}#{i}"

    def arg(a):
        if isinstance(a, (list, tuple)):
            return "[" + ", ".join(arg(x) for x in a) + "]"
        return names.get(a, repr(a))

    lines, self_copies = [], 0
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        if node.target is torch.ops.aten.copy_.default and node.args[0] is node.args[1]:
            self_copies += 1
            continue
        lines.append(f"{node.target}({', '.join(arg(a) for a in node.args)})")
    return "\n".join(lines + [f"{self_copies} self-copies"])
