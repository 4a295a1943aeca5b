import sys
from collections.abc import Iterator
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


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One intra-op thread for a module of tiny models: on a shared 2-core machine a second thread mostly waits
    (~5× slower). Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
