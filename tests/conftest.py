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
