"""Fixtures every test shares. Shared code (models, data, the CLI runner) is in ``tests.helpers``."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
