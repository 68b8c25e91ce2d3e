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


@pytest.fixture(autouse=True)
def _seed():
    random.seed(SEED)
    torch.manual_seed(SEED)
    yield
