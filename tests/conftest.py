import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # tiny_models
sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))  # reconstruct: cases shared with the benchmark


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
