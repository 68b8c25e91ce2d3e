"""The main example trains: Adam8bit ends within 2% of AdamW's loss on held-out text."""

import importlib.util
import re
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "train.py"


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("train_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def trained(example):
    """trained(name): the result of training `name` on one small config, each optimizer once per
    module (train seeds itself, so a result does not depend on which test asks first)."""
    cfg = example.Config(steps=300, d_model=64, layers=2, heads=4, ctx=64, batch=16, text_bytes=1_000_000)
    data = example.stdlib_bytes(cfg.text_bytes)
    results = {}

    def run(name):
        if name not in results:
            results[name] = example.train(cfg, name, data, progress=False)
        return results[name]

    return run


@pytest.mark.slow
def test_adam8bit_loss_within_2_percent_of_adamw(trained):
    adamw, eight = trained("AdamW"), trained("Adam8bit")
    assert adamw.val_loss < 2.6, adamw  # it learned something (uniform bytes: ln 256 = 5.5)
    assert abs(eight.val_loss / adamw.val_loss - 1) < 0.02, (eight, adamw)
    assert eight.state_bytes < 0.35 * adamw.state_bytes


def test_main_prints_the_table(example, capsys):
    results = example.main(["--steps", "5", "--d-model", "32", "--layers", "1", "--ctx", "16", "--batch", "4"])
    out = capsys.readouterr().out
    assert [r.name for r in results] == ["AdamW", "Adam32bit", "Adam8bit"]
    assert "| optimizer | train loss | val loss |" in out and "| Adam8bit |" in out


@pytest.mark.slow
def test_every_option_trains_within_3_percent_of_adamw(example, trained):
    adamw, plain = trained("AdamW"), trained("Adam8bit")
    for option in example.OPTION_VARIANTS:
        result = trained(f"Adam8bit+{option}")
        assert abs(result.val_loss / adamw.val_loss - 1) < 0.03, (option, result, adamw)
        assert result.train_loss != plain.train_loss, option  # the option took part


@pytest.mark.slow
def test_compiled_training_loop_matches_eager(example, capsys):
    argv = ["--steps", "5", "--d-model", "32", "--layers", "1", "--ctx", "16", "--batch", "4", "--optimizers", "Adam8bit"]
    compiled = example.main(argv + ["--compile"])[0]
    eager = example.main(argv + ["--no-compile"])[0]
    assert "compiled (model and optimizer step)" in capsys.readouterr().out
    assert abs(compiled.val_loss - eager.val_loss) < 1e-3 * eager.val_loss, (compiled, eager)


@pytest.mark.parametrize("argv,message", [
    (["--steps", "0"], "argument --steps: must be an integer >= 1, got 0"),
    (["--optimizers", "AdamW,Adam8bitX"], "--optimizers: unknown 'Adam8bitX'; choose from AdamW, "),
    (["--heads", "3"], r"--d-model \(128\) must be a multiple of --heads \(3\)"),
])
def test_bad_command_line_is_refused_before_any_training(example, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        example.main(argv)
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err)


@pytest.mark.parametrize("argv,message", [
    (["--sets", "single,"], "--sets: unknown ''; choose from single, gpt2-medium"),
    (["--dtypes", "fp64"], "--dtypes: unknown 'fp64'; choose from fp32, bf16, fp16"),
    (["--steps", "0"], "argument --steps: must be an integer >= 1, got 0"),
])
def test_bench_refuses_a_bad_command_line(capsys, argv, message):
    from torchadam8 import bench

    with pytest.raises(SystemExit) as exit_info:
        bench.main([*argv, "--device", "cpu"])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_bench_amsgrad_runs_every_optimizer_with_its_third_state(capsys):
    """--amsgrad: each optimizer keeps the running maximum of v (a third state: 12 B/param in fp32,
    3 in 8-bit), and bitsandbytes, which has no amsgrad, is left out rather than run without it."""
    from torchadam8 import bench

    bench.main(["--device", "cpu", "--numel", "4096", "--steps", "1", "--warmup", "0", "--amsgrad"])
    rows = {r.split("|")[1].strip(): float(r.split("|")[-2]) for r in capsys.readouterr().out.splitlines()
            if r.startswith("| ") and not r.startswith("| optimizer") and not r.startswith("| copy")}
    # (plus the block scales, 3 floats per 256 values, and the step count)
    assert rows == pytest.approx({"torchadam8.Adam8bit amsgrad": 3.047, "torchadam8.Adam32bit amsgrad": 12.0,
                                  "torch Adam(fused=True) amsgrad": 12.0}, abs=2e-3), rows
