from pathlib import Path

import pytest
import torch

ASSETS = Path(__file__).parent / "assets"
USER_MODELS = ASSETS / "user_models.py"


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
