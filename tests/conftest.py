"""Fixtures every test shares. Shared code (models, data, the CLI runner) is in ``tests.helpers``."""

import shutil

import pytest
import torch

from tests.helpers.yolo import offline_environment

_ULTRALYTICS_HOME = []


def pytest_configure(config):
    # before any test imports ultralytics: offline, and its settings and fonts in a temporary folder
    _ULTRALYTICS_HOME.append(offline_environment())


def pytest_unconfigure(config):
    for folder in _ULTRALYTICS_HOME:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def yolo_sandbox(tmp_path, monkeypatch):
    """ultralytics for one test: run from tmp_path, quiet settings, and the process state it changes
    (torch threads and deterministic mode, environment variables) put back afterwards."""
    ultralytics = pytest.importorskip("ultralytics")
    from tests.helpers.yolo import quiet_settings

    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    monkeypatch.chdir(tmp_path)
    for name in ("CUBLAS_WORKSPACE_CONFIG", "PYTHONHASHSEED", "OMP_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)  # restored on exit to what it was
    quiet_settings()
    yield ultralytics
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic)
