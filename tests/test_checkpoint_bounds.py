"""Small torch checkpoints that ask for unbounded work. A zip archive that would unpack to more than
twice the file's size is refused before torch reads any of it, by every reader of torch files: plain
checkpoints, pickled models (ultralytics .pt, read inertly) and finetune's training state. A pickled
model read inertly whose modules or plain data are reached along too many paths (a pickle refers to
one object wherever it appears again) is refused by a bounded walk."""

import re
import time
from itertools import product

import pytest
import torch

from attn_inject import AttnInjectError
from attn_inject.files.checkpoints import read_state_dict
from attn_inject.files.inert_pickle import module_state, read_inert
from attn_inject.finetune.state import read_state
from attn_inject.safe_read import is_plain_data
from tests.helpers.cli import run_cli_one_line
from tests.helpers.hostile_checkpoints import deflated, shared_list, shared_module_tree

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


@pytest.mark.parametrize(
    "empty,what",
    [(False, "more than 50,000 tensors"), (True, "more than 100,000 modules counted once per path to them")],
)
def test_a_pickled_model_with_2_to_the_40_paths_to_a_module_is_refused_in_a_bounded_walk(tmp_path, empty, what):
    """11 KB describing 2**40 paths to one module: its state_dict, with every path, would never end;
    the walk stops at the first bound it meets (the bottom Linear's tensors, or an Identity's visits)."""
    path = shared_module_tree(tmp_path / "dag.pt", depth=40, empty=empty)
    assert path.stat().st_size < 12_000
    message = (
        rf"dag\.pt: the pickled model has {what} \(its modules may hold the same children along very many "
        r"paths, or themselves\); attn_inject reads no more\. Save the model's state_dict\(\) \(tensors only\) "
        r"and pass that file with --arch\.$"
    )
    start = time.perf_counter()
    with pytest.raises(AttnInjectError, match=message):
        module_state(read_inert(path)["model"], path)
    assert time.perf_counter() - start < 10  # the bound, not 2**40 steps


def test_a_pickled_module_that_holds_itself_is_refused_not_walked_forever(tmp_path):
    path = shared_module_tree(tmp_path / "loop.pt", depth=0, itself=True)
    with pytest.raises(AttnInjectError, match=r"loop\.pt: the pickled model has a module path of more than 1,024 ch"):
        module_state(read_inert(path)["model"], path)


def test_a_shared_module_tree_within_the_bound_reads_with_every_path(tmp_path):
    """Sharing itself is legitimate (tied modules): within the bound every path gives its entries,
    in state_dict()'s order."""
    depth = 3
    expected = [
        "body." + ".".join(bits) + "." + name for bits in product("ab", repeat=depth) for name in ("weight", "bias")
    ]
    assert list(module_state(read_inert(shared_module_tree(tmp_path / "small.pt", depth))["model"])) == expected


@pytest.mark.parametrize(
    "what,file_args,message",
    [
        (
            "2**40 paths to a module",
            {"depth": 40},
            "dag.pt: the pickled model has more than 50,000 tensors",
        ),
        (
            "a YAML of 2**40 paths",
            {"depth": 1, "yaml": {"nc": 80, "yaml_file": "yolov8n.yaml", "backbone": shared_list(40)}},
            "dag.pt: the checkpoint's model has no YAML as plain data",
        ),
    ],
)
def test_patch_refuses_an_ultralytics_pt_that_refers_to_objects_along_2_to_the_40_paths(
    tmp_path, capsys, what, file_args, message
):
    path = shared_module_tree(tmp_path / "dag.pt", ultralytics=True, **file_args)
    out = tmp_path / "out.pt"
    start = time.perf_counter()
    code, stdout, err = run_cli_one_line(capsys, "patch", path, "--block", "eca", "--after", "residual", "-o", out)
    assert code == 1 and stdout == "" and "Traceback" not in err and message in err, err
    assert time.perf_counter() - start < 10 and not out.exists()


def test_plain_data_is_counted_once_per_path_and_a_list_holding_itself_is_not_plain():
    loop: list = []
    loop.append(loop)
    assert is_plain_data({"nc": 80, "backbone": shared_list(15)})  # 2**16 values with the dict and "nc"
    assert not is_plain_data({"backbone": shared_list(16)})  # 2**17: over 100,000
    assert not is_plain_data(loop)
    assert not is_plain_data({"a": torch.zeros(1)}) and not is_plain_data({(1, 2): 3})


def test_a_training_state_whose_settings_take_2_to_the_40_paths_is_refused(tmp_path):
    state = dict.fromkeys(("model", "optimizer", "epochs_done", "step", "torch_rng"), 0)
    state.update(summary={}, settings={"lr": 1e-4, "scale": shared_list(40)})
    torch.save(state, tmp_path / "run.train-state.pt")
    message = (
        r"run\.train-state\.pt: not a training state written by attn-inject finetune \(its settings or summary "
        r"are not plain data\)$"
    )
    with pytest.raises(AttnInjectError, match=message):
        read_state(tmp_path / "run.train-state.pt")
