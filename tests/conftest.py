from pathlib import Path

import pytest
import torch

ASSETS = Path(__file__).parent / "assets"
USER_MODELS = ASSETS / "user_models.py"


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    # latency backends and compress set torch's thread count for the whole process;
    # without restoring it every later test would run on one thread
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module's tests (``pytestmark =
    pytest.mark.usefixtures("one_thread")``): on a shared 2-core machine two torch
    threads spin against each other and run tiny networks many times slower than one.
    The thread count is restored after the module."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
