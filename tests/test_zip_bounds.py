"""A torch checkpoint (a zip archive) that would unpack to more than twice the file's size is refused
before torch reads any of it, by every reader of torch files: plain checkpoints, pickled models
(ultralytics .pt, read inertly) and finetune's training state."""

import re

import pytest
import torch

from attn_inject import AttnInjectError
from attn_inject.files.checkpoints import read_state_dict
from attn_inject.files.inert_pickle import read_inert
from attn_inject.finetune.state import read_state
from tests.helpers.zip_bomb import deflated

UNPACKED = 16 << 20  # 16 MiB of zeros deflate to about 16 KiB

READERS = {"read_state_dict": read_state_dict, "read_inert": read_inert, "read_state": read_state}


@pytest.fixture
def bomb(tmp_path):
    torch.save({"weight": torch.zeros(UNPACKED // 4)}, tmp_path / "plain.pth")
    return deflated(tmp_path / "plain.pth", tmp_path / "bomb.pth")


@pytest.mark.parametrize("reader", READERS)
def test_an_archive_that_unpacks_beyond_its_size_is_refused_before_torch_reads_it(bomb, reader, monkeypatch):
    size = bomb.stat().st_size
    assert size < UNPACKED // 100  # what the file asks for: a hundred times its size and more

    def never(*args, **kwargs):
        raise AssertionError("torch.load ran")

    monkeypatch.setattr(torch, "load", never)
    what = "the training state" if reader == "read_state" else "the checkpoint"
    message = (
        rf"bomb\.pth: {what} unpacks to [\d,]+ bytes from a file of {size:,} \(compressed zip entries: "
        rf"plain/data/0 is [\d,]+ bytes unpacking to {UNPACKED:,}\); attn_inject unpacks at most 2 times a "
        r"file's size\. torch\.save writes archives that unpack to their own size: save the weights again with "
        r"torch\.save, or as \.safetensors\.$"
    )
    with pytest.raises(AttnInjectError, match=message):
        READERS[reader](bomb)


def test_the_bound_is_the_file_size_not_the_zip_method(tmp_path):
    """Deflated entries that unpack within twice the file's size (random values barely compress) are read."""
    weight = torch.randn(64, 64, generator=torch.Generator().manual_seed(0))
    torch.save({"weight": weight}, tmp_path / "plain.pth")
    packed = deflated(tmp_path / "plain.pth", tmp_path / "packed.pth")
    assert torch.equal(read_state_dict(packed)["weight"], weight)


def test_an_archive_whose_directory_cannot_be_read_is_called_damaged(tmp_path):
    torch.save({"weight": torch.randn(1000)}, tmp_path / "plain.pth")
    (tmp_path / "cut.pth").write_bytes((tmp_path / "plain.pth").read_bytes()[:2000])
    message = "cut.pth: the checkpoint is a zip archive whose directory cannot be read (File is not a zip file). "
    with pytest.raises(AttnInjectError, match=re.escape(message) + "The file is truncated or damaged; get it again.$"):
        read_state_dict(tmp_path / "cut.pth")
