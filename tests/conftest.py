"""Fixtures every test shares. Shared code (models, data, the CLI runner) is in ``tests.helpers``."""

import os
import shutil

import pytest
import torch

from attn_inject.finetune.image_check import CACHE_ENV
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


@pytest.fixture
def one_thread():
    """One torch thread for the test: tiny models gain nothing from two, and lose much when the machine's
    cores are busy (use it with ``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True, scope="session")
def _image_check_cache(tmp_path_factory):
    """The image check's cache (and that of the subprocesses the tests start) lives in the test
    session's temporary folder, never in the user's ~/.cache."""
    before = os.environ.get(CACHE_ENV)
    os.environ[CACHE_ENV] = str(tmp_path_factory.mktemp("image-check-cache"))
    yield
    if before is None:
        os.environ.pop(CACHE_ENV, None)
    else:
        os.environ[CACHE_ENV] = before
