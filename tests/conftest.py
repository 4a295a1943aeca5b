import sys
from pathlib import Path

import pytest
import torch

# Make tests/helpers.py importable as `helpers`.
sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(1)  # tiny models: one thread is faster than two contending ones


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> str:
    """A tiny model trained for a few steps on scikit-learn digits through the real CLI."""
    from farmer.cli import main

    out = tmp_path_factory.mktemp("runs") / "tiny"
    code = main(["train", "--preset", "tiny", "--data", "digits", "--out", str(out), "--steps", "12",
                 "--eval-every", "6", "--sample-every", "12", "--save-every", "6"])
    assert code == 0
    return str(out)
