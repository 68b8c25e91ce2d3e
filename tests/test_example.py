"""The main example trains: Adam8bit ends within 2% of AdamW's loss on held-out text."""

import importlib.util
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
