"""Interrupted and failed writes leave nothing behind: SIGTERM and SIGHUP are handled like Ctrl-C, a
full disk or another OS error is one AttnInjectError (one line, exit 1, in the CLI), and a run killed
outright (SIGKILL) leaves a temporary file that the next run writing into that folder removes."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import attn_inject.files.container as container
from attn_inject import AttnInjectError, load, save
from attn_inject.files.eject import eject_file
from attn_inject.files.output import MARK, check_output, host, process_start
from attn_inject.finetune.state import write_state
from tests.helpers.cli import run_cli_one_line
from tests.helpers.finetune_data import tiny_model, write_image_folder
from tests.helpers.running import REPO
from tests.helpers.small_files import ARCH, write_small_files


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return write_small_files(tmp_path_factory.mktemp("small"))


@pytest.fixture(scope="module")
def training(tmp_path_factory):
    """A tiny patched file (ECA in a 2-block net at 16 px) and a 3-class ImageFolder: a fast finetune."""
    root = tmp_path_factory.mktemp("training")
    return {"model": save(tiny_model("gn"), root / "tiny.safetensors"), "data": write_image_folder(root / "data")}


def patch_argv(small, out: Path) -> list:
    return ["patch", small["base"], "--arch", ARCH, "--block", "eca", "--after", "residual", "--img-size", "32",
            "--output", out]  # fmt: skip


def finetune_argv(training, out: Path) -> list:
    return ["finetune", training["model"], "--arch", "tests.helpers.finetune_data:tiny_gn", "--data", training["data"],
            "--epochs", "1", "--batch-size", "8", "--output", out]  # fmt: skip


def signal_at(monkeypatch, module, name: str, signum: int, call: int = 1) -> None:
    """Send ``signum`` to this process at the ``call``-th call of ``module.name`` (before it runs)."""
    original, calls = getattr(module, name), []

    def signalled(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            os.kill(os.getpid(), signum)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, signalled)


# ---------------------------------------------------------------------------------------------
# SIGTERM and SIGHUP in the CLI


@pytest.mark.parametrize(
    "module,name,signum",
    [
        ("attn_inject.files.container", "write_tensor", signal.SIGTERM),  # in the middle of the tensors
        ("attn_inject.files.patch", "_check_written", signal.SIGTERM),  # written, not verified
        ("attn_inject.files.output", "_fsync", signal.SIGHUP),  # verified, not yet renamed into place
    ],
)
def test_sigterm_and_sighup_during_patch_leave_nothing(tmp_path, capsys, monkeypatch, small, module, name, signum):
    signal_at(monkeypatch, __import__(module, fromlist=[name]), name, signum, call=3 if name == "write_tensor" else 1)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)}
    code, out, err = run_cli_one_line(capsys, *patch_argv(small, tmp_path / "o.safetensors"))
    assert code == 128 + signum and out == ""
    assert err == f"error: interrupted ({signal.Signals(signum).name})"
    assert os.listdir(tmp_path) == []
    assert {s: signal.getsignal(s) for s in handlers} == handlers  # the CLI gave the handlers back


@pytest.mark.parametrize("where", ["model", "state"])
def test_sigterm_during_a_finetune_epoch_write_leaves_no_temporary_file(tmp_path, capsys, monkeypatch, training, where):
    import attn_inject.finetune.state as state

    if where == "model":
        signal_at(monkeypatch, container, "write_tensor", signal.SIGTERM, call=2)
    else:
        signal_at(monkeypatch, state, "create", signal.SIGTERM)
    code, _, err = run_cli_one_line(capsys, *finetune_argv(training, tmp_path / "ft.safetensors"))
    assert code == 143 and err.startswith("error: interrupted during epoch 1; ")
    assert not [n for n in os.listdir(tmp_path) if MARK in n]
    # the model (and its epoch's metrics row) were written before its state
    expected = [] if where == "model" else ["ft.metrics.jsonl", "ft.safetensors"]
    assert sorted(os.listdir(tmp_path)) == expected


# ---------------------------------------------------------------------------------------------
# SIGKILL: the next run removes what the killed one left


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", ""])
    process.wait()
    return process.pid


def test_the_next_run_removes_stale_temporaries_and_keeps_everything_else(tmp_path):
    me, start, here = os.getpid(), process_start(os.getpid()), host()
    stale = {
        f".out.{MARK}-{here}-{dead_pid()}-{start}-abcd1234.safetensors",  # its process is gone
        f".out.{MARK}-{here}-{me}-{start + 1}-abcd1234.safetensors",  # its pid now runs another process
        f".out.train-state.{MARK}-{here}-{dead_pid()}-7-x_9y8z7w.pt",
    }
    kept = {
        f".out.{MARK}-{here}-{me}-{start}-abcd1234.safetensors",  # a live run's file
        f".out.{MARK}-otherhost-{dead_pid()}-7-abcd1234.safetensors",  # another host's: its process is not ours to see
        ".out.a7ap2ota.tmp.safetensors",  # not named by this scheme: never ours to judge
        "notes.txt",
        f"{MARK}-{here}-1-1-abcd1234.safetensors",  # not hidden: not a temporary file of ours
    }
    for name in stale | kept:
        (tmp_path / name).write_bytes(b"x")
    link = f".l.{MARK}-{here}-{dead_pid()}-1-abcd1234.safetensors"
    os.symlink(tmp_path / "notes.txt", tmp_path / link)
    kept.add(link)  # a link is never removed, whatever its name
    check_output(tmp_path / "new.safetensors")
    assert set(os.listdir(tmp_path)) == kept


def run_until_paused(argv: list, target: str, folder: Path) -> subprocess.Popen:
    """Start ``attn-inject ARGV`` paused before ``target`` (tests/helpers/kill_at.py)."""
    marker = folder / "paused"
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.helpers.kill_at", target, str(marker), *map(str, argv)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    process.marker = marker  # type: ignore[attr-defined]
    return process


def wait_paused(process: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not process.marker.exists():  # type: ignore[attr-defined]
        if process.poll() is not None:
            pytest.fail(f"the run ended before its pause point: {process.communicate()[1][-2000:]}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail("the run never reached its pause point")
        time.sleep(0.05)
    process.marker.unlink()  # type: ignore[attr-defined]


def test_kill_patch_and_finetune_from_outside(tmp_path, small, training):
    """Three real processes killed at three points: patch with SIGKILL in the middle of the tensors and
    with SIGTERM before its verification, finetune with SIGKILL in the middle of its epoch's model file."""
    folders = {name: tmp_path / name for name in ("patch_kill", "patch_term", "finetune_kill")}
    for folder in folders.values():
        folder.mkdir()
    runs = {
        "patch_kill": run_until_paused(
            patch_argv(small, folders["patch_kill"] / "o.safetensors"),
            "attn_inject.files.container:write_tensor",
            folders["patch_kill"],
        ),
        "patch_term": run_until_paused(
            patch_argv(small, folders["patch_term"] / "o.safetensors"),
            "attn_inject.files.patch:_check_written",
            folders["patch_term"],
        ),
        "finetune_kill": run_until_paused(
            finetune_argv(training, folders["finetune_kill"] / "ft.safetensors"),
            "attn_inject.files.container:write_tensor",
            folders["finetune_kill"],
        ),
    }
    try:
        for name, process in runs.items():
            wait_paused(process)
            process.send_signal(signal.SIGTERM if name == "patch_term" else signal.SIGKILL)
            _, err = process.communicate(timeout=120)
            if name == "patch_term":
                assert process.returncode == 143 and err.strip().splitlines() == ["error: interrupted (SIGTERM)"]
                assert os.listdir(folders[name]) == []
            else:
                assert process.returncode == -signal.SIGKILL
                (left,) = os.listdir(folders[name])  # the premise: a killed run cannot clean up
                assert MARK in left and left.startswith(".")
    finally:
        for process in runs.values():
            if process.poll() is None:
                process.kill()
    # the next run of any command writing into the folder removes what the killed run left
    save(load(small["model"]), folders["patch_kill"] / "again.safetensors")
    assert os.listdir(folders["patch_kill"]) == ["again.safetensors"]
    eject_file(small["model"], folders["finetune_kill"] / "plain.safetensors")
    assert os.listdir(folders["finetune_kill"]) == ["plain.safetensors"]


# ---------------------------------------------------------------------------------------------
# a full disk and other OS errors


def no_space(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def dev_full(_path):
    """The kernel's always-full device: every write to it fails with ENOSPC (no root needed)."""
    return open("/dev/full", "wb")


@pytest.mark.parametrize("how", [no_space, dev_full])
def test_a_full_disk_is_one_error_and_leaves_nothing(tmp_path, capsys, monkeypatch, small, how):
    monkeypatch.setattr(container, "write_tensor" if how is no_space else "create", how)
    message = "cannot write the output: No space left on device"
    model = load(small["model"])
    with pytest.raises(AttnInjectError, match=r"m\.safetensors: " + message):
        save(model, tmp_path / "m.safetensors")
    with pytest.raises(AttnInjectError, match=r"plain\.safetensors: " + message):
        eject_file(small["model"], tmp_path / "plain.safetensors")
    code, out, err = run_cli_one_line(capsys, *patch_argv(small, tmp_path / "o.safetensors"))
    assert code == 1 and out == "" and err == f"error: {tmp_path}/o.safetensors: {message}"
    assert os.listdir(tmp_path) == []


def test_a_full_disk_while_writing_the_training_state(tmp_path, monkeypatch):
    import attn_inject.finetune.state as state

    monkeypatch.setattr(state, "create", dev_full)
    with pytest.raises(AttnInjectError, match=r"s\.train-state\.pt: cannot write the output: No space left on device"):
        write_state(tmp_path / "s.train-state.pt", {"w": torch.zeros(1000)})
    assert os.listdir(tmp_path) == []
