import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # tiny_models
sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))  # trained_look, reconstruct: shared with the benchmarks


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
