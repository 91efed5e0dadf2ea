"""Fixtures every test shares. Shared code (models, data, the CLI runner) is in ``tests.helpers``."""

import os

import pytest
import torch

from attn_inject.finetune.image_check import CACHE_ENV


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


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
