import logging
import os
import warnings

import pytest
import timm
import torch
from safetensors.torch import save_file
from torch import nn

from attn_inject import AttnInjectError
from attn_inject.files.checkpoints import fit_state_dict, read_state_dict


def small():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: sd,
        lambda sd: {"state_dict": sd},
        lambda sd: {"model": sd},
        lambda sd: {"state_dict_ema": sd, "state_dict": {}},
        lambda sd: {f"module.{k}": v for k, v in sd.items()},
        lambda sd: {f"_orig_mod.{k}": v for k, v in sd.items()},
    ],
)
def test_reads_the_usual_wrappers(tmp_path, wrap):
    state = small().state_dict()
    path = tmp_path / "w.pth"
    torch.save(wrap(state), path)
    loaded = read_state_dict(path)
    assert list(loaded) == list(state) and all(torch.equal(loaded[k], v) for k, v in state.items())


def test_reads_safetensors(tmp_path):
    state = small().state_dict()
    save_file(state, tmp_path / "w.safetensors")
    loaded = read_state_dict(tmp_path / "w.safetensors")
    assert sorted(loaded) == sorted(state) and all(torch.equal(loaded[k], v) for k, v in state.items())
    renamed = {f"x.{k}": v for k, v in state.items()}
    with pytest.raises(AttnInjectError, match=r"does not keep the tensors' original order"):
        fit_state_dict(small(), renamed, str(tmp_path / "w.safetensors"))


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_never_unpickles_code(tmp_path, capsys):
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": small().state_dict(), "payload": Evil()}, path)
    with pytest.raises(
        AttnInjectError,
        match=r"evil\.pth: this file holds code; attn_inject never runs it \(the pickle calls builtins\.print\)",
    ):
        read_state_dict(path)
    assert "pwned" not in capsys.readouterr().out


@pytest.mark.parametrize(
    "name,content,message",
    [
        ("missing.pth", None, r"missing\.pth: no such checkpoint file"),
        ("w.ckpt", b"x", r"w\.ckpt: unsupported checkpoint type \.ckpt"),
        ("broken.pth", b"not a zip", r"broken\.pth: not a valid checkpoint: torch.load cannot parse it"),
    ],
)
def test_bad_files(tmp_path, name, content, message):
    if content is not None:
        (tmp_path / name).write_bytes(content)
    with pytest.raises(AttnInjectError, match=message):
        read_state_dict(tmp_path / name)


def test_keys_of_another_implementation_are_mapped_by_order_and_shape(caplog):
    model = small()
    foreign = {f"net.layer{i}": v.clone() for i, v in enumerate(model.state_dict().values())}
    with caplog.at_level(logging.WARNING):
        fitted, mapped = fit_state_dict(model, foreign, "foreign.pth")
    assert mapped and list(fitted) == list(model.state_dict())
    assert "mapped all 9 tensors by order and shape" in caplog.text
    _, mapped = fit_state_dict(model, model.state_dict(), "own.pth")
    assert not mapped


def test_a_checkpoint_that_does_not_fit_is_refused():
    model = small()
    other = nn.Sequential(nn.Conv2d(3, 5, 3), nn.BatchNorm2d(5), nn.Flatten(), nn.Linear(5, 2)).state_dict()
    with pytest.raises(
        AttnInjectError,
        match=(
            r"other\.pth: the checkpoint does not fit Sequential: 0\.weight has shape \[5, 3, 3, 3\] where"
            r" 0\.weight needs \[4, 3, 3, 3\]\. Check --arch"
        ),
    ):
        fit_state_dict(model, other, "other.pth")
    with pytest.raises(
        AttnInjectError,
        match=r"the checkpoint does not fit Sequential: 8 tensors for 9 \(missing e\.g\. \['3\.bias'\]\)",
    ):
        fit_state_dict(model, {k: v for k, v in model.state_dict().items() if k != "3.bias"}, "short.pth")


def test_real_efficientnet_lite0_weights_map_onto_timm():
    from attn_inject.cli.demo import lite0_weights_path

    model = timm.create_model("efficientnet_lite0")
    state = read_state_dict(lite0_weights_path())
    assert len(state) == len(model.state_dict()) == 296
    fitted, mapped = fit_state_dict(model, state, "lite0")
    assert mapped
    model.load_state_dict(fitted)


def test_load_pretrained_gives_the_models_own_layout(tmp_path):
    """A checkpoint saved channels-last (or by another implementation) loads into the model's own
    strides: CPU convolutions round differently on another layout, and a patched file read back
    (safetensors, contiguous) must compute what the original did, bit for bit."""
    from attn_inject.files.checkpoints import load_pretrained

    reference = timm.create_model("resnet18", num_classes=10).eval()
    state = {
        k: v.contiguous(memory_format=torch.channels_last) if v.dim() == 4 else v
        for k, v in reference.state_dict().items()
    }
    assert not state["conv1.weight"].is_contiguous()
    torch.save(state, tmp_path / "cl.pth")
    model = load_pretrained(tmp_path / "cl.pth", "resnet18", num_classes=10)
    assert all(v.is_contiguous() for v in model.state_dict().values())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))


def test_a_legacy_pickle_carrying_code_is_called_code_without_torchs_unsafe_advice(tmp_path, capsys):
    path = tmp_path / "legacy.bin"
    torch.save({"state_dict": small().state_dict(), "payload": Evil()}, path, _use_new_zipfile_serialization=False)
    with pytest.raises(
        AttnInjectError,
        match=r"legacy\.bin: this file holds code; attn_inject never runs it \(the pickle calls builtins\.print\)\."
        r" Save model\.state_dict\(\) \(tensors only\)",
    ) as info:
        read_state_dict(path)
    assert "weights_only=False" not in str(info.value) and "pwned" not in capsys.readouterr().out


def test_a_protocol_4_pickle_is_refused_for_its_format_and_torchs_warning_is_kept_quiet(tmp_path):
    path = tmp_path / "p4.pth"
    torch.save(small().state_dict(), path, pickle_protocol=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(
            AttnInjectError,
            match=r"p4\.pth: not a checkpoint torch reads safely: a protocol-4 pickle, which torch\.load\(weights_only"
            r"=True\) does not parse\. Save it again with torch\.save\(state_dict, path\) \(protocol 2, its default\)",
        ):
            read_state_dict(path)
    assert [str(w.message) for w in caught] == []
    torch.save({"w": torch.zeros(2), "payload": Evil()}, tmp_path / "p4code.pth", pickle_protocol=4)
    with pytest.raises(AttnInjectError, match=r"p4code\.pth: this file holds code; .* calls builtins\.print\)"):
        read_state_dict(tmp_path / "p4code.pth")


def test_a_checkpoint_that_is_a_device_or_a_fifo_is_refused_before_it_is_read(tmp_path):
    os.symlink("/dev/zero", tmp_path / "zero.pth")
    os.mkfifo(tmp_path / "fifo.pth")
    with pytest.raises(AttnInjectError, match=r"zero\.pth: the checkpoint is not a regular file \(it is a character"):
        read_state_dict(tmp_path / "zero.pth")
    with pytest.raises(AttnInjectError, match=r"fifo\.pth: the checkpoint is not a regular file \(it is a FIFO\)"):
        read_state_dict(tmp_path / "fifo.pth")
