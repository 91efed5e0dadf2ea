"""`attn-inject patch` / patch_checkpoint, `inspect`, `eject`: round trips for every input format,
wrapper and arch kind, data never lost, and one pinned line for every kind of bad input."""

import json
import logging
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from attn_inject import eject, load
from attn_inject.errors import AttnInjectError
from attn_inject.files.arch import create_model
from attn_inject.files.patch import patch_checkpoint
from attn_inject.surgery.recipe import recipe_of
from attn_inject.testing import look_trained, move_off_identity
from tests.helpers.cli import last_json, run_cli_one_line
from tests.helpers.hostile_checkpoints import deflated
from tests.helpers.inductor import compile_and_run, graph_gates
from tests.helpers.running import run_python
from tests.helpers.tiny_models import counting_net

X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))


@pytest.fixture(scope="module")
def r18():
    """A trained-looking resnet18 state_dict, and its outputs on X."""
    model = look_trained(create_model("resnet18"), seed=7)
    with torch.no_grad():
        return model.state_dict(), model(X)


WRAPPERS = {
    "plain.pth": lambda sd: sd,
    "state_dict.pt": lambda sd: {"state_dict": sd, "epoch": 3},
    "model.bin": lambda sd: {"model": sd},
    "ema.pth": lambda sd: {"state_dict_ema": sd, "state_dict": {}},
    "ddp.pth": lambda sd: {f"module.{k}": v for k, v in sd.items()},
    "compiled.pth": lambda sd: {f"_orig_mod.{k}": v for k, v in sd.items()},
}


@pytest.mark.parametrize("name", [*WRAPPERS, "weights.safetensors"])
def test_every_format_and_wrapper_round_trips(tmp_path, r18, name):
    state, expected = r18
    source = tmp_path / name
    if name.endswith(".safetensors"):
        save_file(state, str(source))
    else:
        torch.save(WRAPPERS[name](state), source)
    out = tmp_path / "out.safetensors"
    report = patch_checkpoint(source, "resnet18", "eca", "basic", out, img_size=64)
    assert len(report.sites) == 8 and report.params_after - report.params_before == 36 and not report.keys_mapped
    loaded = load(out)
    assert torch.equal(loaded(X), expected)  # identity at init, through the file
    assert torch.equal(eject(loaded)(X), expected)


def test_torchvision_and_factory_archs_round_trip_with_full_verification(tmp_path, monkeypatch):
    (tmp_path / "patch_nets.py").write_text(
        "import torchvision\ndef net(num_classes=1000):\n    return"
        " torchvision.models.resnet18(num_classes=num_classes)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    for arch in ("torchvision:resnet18", "patch_nets:net"):
        model = look_trained(create_model(arch, num_classes=10))
        torch.save(model.state_dict(), tmp_path / "w.pth")
        out = tmp_path / f"{arch.replace(':', '_')}.safetensors"
        report = patch_checkpoint(
            tmp_path / "w.pth",
            arch,
            "se",
            "basic",
            out,
            num_classes=10,
            img_size=64,
            verify="full",
            options={"reduction": 8},
        )
        assert report.verified == "full" and report.sites[0] == "layer1.0.se"
        loaded = load(out, arch) if ":" in arch and not arch.startswith("torchvision") else load(out)
        assert recipe_of(loaded).arch == arch and recipe_of(loaded).num_classes == 10
        with torch.no_grad():
            assert torch.equal(loaded(X), model(X))
            move_off_identity(loaded)
            assert not torch.equal(loaded(X), model(X))


def test_keys_of_another_implementation_are_mapped_with_a_warning(tmp_path, r18, caplog):
    state, expected = r18
    torch.save({f"net.{i}": v for i, v in enumerate(state.values())}, tmp_path / "foreign.pth")
    with caplog.at_level(logging.WARNING):
        report = patch_checkpoint(
            tmp_path / "foreign.pth", "resnet18", "eca", "basic", tmp_path / "o.safetensors", img_size=64
        )
    assert report.keys_mapped and "mapped all 122 tensors by order and shape" in caplog.text
    assert torch.equal(load(tmp_path / "o.safetensors")(X), expected)


def test_patch_cli_summary_json_inspect_and_eject(tmp_path, r18, capsys):
    state, expected = r18
    torch.save(state, tmp_path / "in.pth")
    out = tmp_path / "out.safetensors"
    code, stdout, err = run_cli_one_line(
        capsys,
        "patch",
        tmp_path / "in.pth",
        "--arch",
        "resnet18",
        "--block",
        "se",
        "--after",
        "basic",
        "--img-size",
        "64",
        "--option",
        "reduction=8",
        "--include",
        "layer4.*",
        "--output",
        out,
    )
    assert code == 0, err
    assert "sites" in stdout and "layer4.0.se" in stdout and "+132,224" in stdout and "verified" in stdout
    code, stdout, err = run_cli_one_line(
        capsys,
        "patch",
        tmp_path / "in.pth",
        "--arch",
        "resnet18",
        "--block",
        "eca",
        "--after",
        "basic",
        "--position",
        "block_output",
        "--img-size",
        "64",
        "--output",
        out,
        "--force",
        "--json",
    )
    summary = last_json(stdout)
    assert code == 0 and summary["sites"][0] == "layer1.0.eca_out" and summary["params_added"] == 36
    assert (
        summary["verified"] == "fast"
        and summary["bytes"] == out.stat().st_size
        and summary["example_input"] == [[1, 3, 64, 64]]
    )
    code, stdout, _ = run_cli_one_line(capsys, "inspect", out, "--json")
    info = last_json(stdout)
    assert info["arch"] == "resnet18" and info["sites"] == 8 and info["injected_params"] == 36
    assert info["injections"][0]["rules"] == ["basic"] and info["injections"][0]["position"] == "block_output"
    assert set(info["versions"]) == {"attn_inject", "torch", "timm"} and info["format_version"] == 1
    code, stdout, _ = run_cli_one_line(capsys, "inspect", out)
    assert code == 0 and "layer4.1.eca_out" in stdout and "36 parameters" in stdout
    code, stdout, err = run_cli_one_line(capsys, "eject", out, "--output", tmp_path / "orig.safetensors", "--json")
    assert code == 0, err
    assert last_json(stdout)["removed"][0] == "layer1.0.eca_out"
    plain = create_model("resnet18")
    from attn_inject.files.checkpoints import load_pretrained

    assert torch.equal(load_pretrained(tmp_path / "orig.safetensors", "resnet18")(X), expected)
    assert list(load_pretrained(tmp_path / "orig.safetensors", "resnet18").state_dict()) == list(plain.state_dict())


def test_adapter_only(tmp_path, r18, capsys):
    state, _ = r18
    torch.save(state, tmp_path / "in.pth")
    code, stdout, err = run_cli_one_line(
        capsys,
        "patch",
        tmp_path / "in.pth",
        "--arch",
        "resnet18",
        "--block",
        "eca",
        "--after",
        "basic",
        "--img-size",
        "64",
        "--output",
        tmp_path / "a.safetensors",
        "--adapter-only",
        "--verify",
        "full",
        "--json",
    )
    assert code == 0, err
    summary = last_json(stdout)
    assert summary["adapter_only"] and summary["bytes"] < 4000
    code, stdout, _ = run_cli_one_line(capsys, "inspect", tmp_path / "a.safetensors", "--json")
    info = last_json(stdout)
    assert info["content"] == "adapter" and info["tensors"] == 8 and info["base_fingerprint"]["tensors"] == 122


def test_the_output_never_overwrites_the_input_or_an_existing_file(tmp_path, r18, capsys):
    state, _ = r18
    save_file(state, str(tmp_path / "in.safetensors"))
    os.link(tmp_path / "in.safetensors", tmp_path / "hard.safetensors")
    os.symlink(tmp_path / "in.safetensors", tmp_path / "soft.safetensors")
    before = (tmp_path / "in.safetensors").read_bytes()
    base = [
        "patch",
        tmp_path / "in.safetensors",
        "--arch",
        "resnet18",
        "--block",
        "eca",
        "--after",
        "basic",
        "--img-size",
        "64",
        "--output",
    ]
    for out, message in [
        (tmp_path / "in.safetensors", "in.safetensors: the output is the input file. Choose another --output path."),
        (tmp_path / "hard.safetensors", "hard.safetensors: the output is the input file"),
        (tmp_path / "soft.safetensors", "soft.safetensors: the output is the input file"),
    ]:
        code, stdout, err = run_cli_one_line(capsys, *base, out, "--force")
        assert code == 1 and message in err and "Traceback" not in err and stdout == ""
    (tmp_path / "taken.safetensors").write_bytes(b"mine")
    code, _, err = run_cli_one_line(capsys, *base, tmp_path / "taken.safetensors")
    assert code == 1 and "taken.safetensors: the output file exists. Pass --force (force=True) to replace it." in err
    assert (tmp_path / "taken.safetensors").read_bytes() == b"mine" and (
        tmp_path / "in.safetensors"
    ).read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == [
        "hard.safetensors",
        "in.safetensors",
        "soft.safetensors",
        "taken.safetensors",
    ]


def test_a_failed_verification_leaves_no_file_behind(tmp_path, r18, monkeypatch):
    """inject verifies the patched model before anything is written (its second forward differs here)."""
    import attn_inject.surgery.api as api

    state, _ = r18
    torch.save(state, tmp_path / "in.pth")
    (tmp_path / "out.safetensors").write_bytes(b"old")
    real_run, calls = api.run, []

    def run(model, args, kwargs=None):
        calls.append(1)
        out = real_run(model, args, kwargs)
        return out if len(calls) == 1 else out + 1

    monkeypatch.setattr(api, "run", run)
    with pytest.raises(AttnInjectError, match=r"^after injecting eca into ResNet: output 0 differs"):
        patch_checkpoint(
            tmp_path / "in.pth", "resnet18", "eca", "basic", tmp_path / "out.safetensors", img_size=64, force=True
        )
    assert (
        sorted(os.listdir(tmp_path)) == ["in.pth", "out.safetensors"]
        and (tmp_path / "out.safetensors").read_bytes() == b"old"
    )


class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # would create the marker file if unpickled


def bad_inputs(tmp_path, state):
    """(checkpoint, extra CLI arguments, the pinned message) for each kind of bad input."""
    torch.save({"state_dict": state, "hook": Evil(str(tmp_path / "PWNED"))}, tmp_path / "evil.pth")
    torch.save(state, tmp_path / "good.pth")
    (tmp_path / "cut.pth").write_bytes((tmp_path / "good.pth").read_bytes()[:20000])
    torch.save({"weight": torch.zeros(8 << 20)}, tmp_path / "zeros.pth")
    deflated(tmp_path / "zeros.pth", tmp_path / "bomb.pth")  # 32 MiB in 33 KB
    save_file(state, str(tmp_path / "good.safetensors"))
    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "good.safetensors").read_bytes()[:5000])
    (tmp_path / "garbage.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}xx")
    (tmp_path / "empty.pth").write_bytes(b"")
    (tmp_path / "folder.pth").mkdir()
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    if os.geteuid() == 0:  # root writes anywhere on a writable mount
        locked = "/proc"
    return [
        ("evil.pth", [], "evil.pth: this file holds code; attn_inject never runs it (the pickle calls io.open)"),
        ("cut.pth", [], "cut.pth: the checkpoint is a zip archive whose directory cannot be read ("),
        ("bomb.pth", [], "bomb.pth: the checkpoint unpacks to 33,554,"),
        ("cut.safetensors", [], "cut.safetensors: not a valid .safetensors file (SafetensorError: "),
        ("garbage.safetensors", [], "garbage.safetensors: not a valid .safetensors file (SafetensorError: "),
        ("empty.pth", [], "empty.pth: the checkpoint file is empty. The file was not written completely"),
        ("missing.pth", [], "missing.pth: no such checkpoint file. Check the path."),
        ("folder.pth", [], "folder.pth: a folder, not a checkpoint file"),
        ("good.pth", ["--arch", "resnet34"], "good.pth: the checkpoint does not fit ResNet: 122 tensors for 218"),
        ("good.pth", ["--arch", "resnet5"], "unknown timm model 'resnet5'. Did you mean"),
        (
            "good.pth",
            ["--block", "bam"],
            "unknown block 'bam'. Valid blocks: cbam, coord, eca, gc, gct, ge, se, simam.",
        ),
        (
            "good.pth",
            ["--after", "bottleneck"],
            "rule 'bottleneck' matched nothing in ResNet; the model contains: basic x8",
        ),
        ("good.pth", ["--after", "nonsense"], "unknown rule 'nonsense'. Valid built-in rules:"),
        ("good.pth", ["--output", f"{locked}/o.safetensors"], f"{locked}: the output folder is not writable"),
        (
            "good.pth",
            ["--output", str(tmp_path / "nowhere" / "o.safetensors")],
            "nowhere: the output folder does not exist",
        ),
        ("good.pth", ["--output", str(tmp_path / "o.pth")], "o.pth: the output must be a .safetensors file"),
    ]


def test_every_bad_input_is_one_pinned_line_and_exit_1(tmp_path, r18, capsys):
    state, _ = r18
    for name, extra, message in bad_inputs(tmp_path, state):
        args = {
            "--arch": "resnet18",
            "--block": "eca",
            "--after": "basic",
            "--output": str(tmp_path / "out.safetensors"),
        }
        args.update(dict(zip(extra[::2], extra[1::2])))
        argv = ["patch", tmp_path / name, "--img-size", "64", *[x for kv in args.items() for x in kv]]
        code, stdout, err = run_cli_one_line(capsys, *argv)
        assert code == 1, (name, extra, err)
        assert message in err, (name, extra, err)
        assert err.count("error:") == 1 and "Traceback" not in err and stdout == ""
    assert not (tmp_path / "PWNED").exists()  # the pickle's code never ran
    assert not (tmp_path / "out.safetensors").exists() and not any(
        p.name.startswith(".out") for p in tmp_path.iterdir()
    )


def test_inspect_and_eject_refuse_bad_files(tmp_path, capsys):
    (tmp_path / "bad.safetensors").write_bytes(b"nonsense")
    code, _, err = run_cli_one_line(capsys, "inspect", tmp_path / "bad.safetensors")
    assert code == 1 and "bad.safetensors: not a valid .safetensors file" in err and "Traceback" not in err
    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    code, _, err = run_cli_one_line(
        capsys, "eject", tmp_path / "plain.safetensors", "--output", tmp_path / "o.safetensors"
    )
    assert code == 1 and "plain.safetensors: a plain checkpoint: the file holds no attn_inject recipe" in err
    save_file({"w": torch.zeros(2)}, str(tmp_path / "blob.safetensors"), metadata={"attn_inject.recipe": "{oops"})
    recipe = {
        "format_version": 1,
        "arch": "resnet18",
        "injections": [{"block": "bam", "rules": ["name: r\nmatch: {kind: residual}\n"]}],
    }
    save_file(
        {"w": torch.zeros(2)}, str(tmp_path / "cbam.safetensors"), metadata={"attn_inject.recipe": json.dumps(recipe)}
    )
    for command in (["inspect"], ["eject", "--output", tmp_path / "o.safetensors"]):
        code, _, err = run_cli_one_line(capsys, command[0], tmp_path / "blob.safetensors", *command[1:])
        assert code == 1 and "blob.safetensors: recipe: the recipe is not valid JSON" in err and "Traceback" not in err
        code, _, err = run_cli_one_line(capsys, command[0], tmp_path / "cbam.safetensors", *command[1:])
        assert (
            code == 1
            and "cbam.safetensors: recipe: injections[0]: unknown block 'bam'. "
            "Valid blocks: cbam, coord, eca, gc, gct, ge, se, simam."
            in err
        )
    assert not (tmp_path / "o.safetensors").exists()


def test_compile_a_loaded_model(tmp_path, r18):
    state, _ = r18
    torch.save(state, tmp_path / "in.pth")
    patch_checkpoint(tmp_path / "in.pth", "resnet18", "eca", "basic", tmp_path / "o.safetensors", img_size=64)
    model = load(tmp_path / "o.safetensors")
    move_off_identity(model)
    out, graphs = compile_and_run(model, X, fullgraph=True)
    assert sum(graph_gates(g) for g in graphs) == 8
    with torch.no_grad():
        torch.testing.assert_close(out, model(X), rtol=1e-4, atol=1e-5)


def test_console_script_patch_error_has_no_traceback(tmp_path):
    proc = run_python(
        "-m",
        "attn_inject.cli",
        "patch",
        str(tmp_path / "none.pth"),
        "--arch",
        "resnet18",
        "--block",
        "eca",
        "--after",
        "basic",
        "--output",
        str(tmp_path / "o.safetensors"),
    )
    assert (
        proc.returncode == 1 and "none.pth: no such checkpoint file" in proc.stderr and "Traceback" not in proc.stderr
    )


def test_the_file_holds_the_checkpoint_buffers_not_what_the_forwards_wrote(tmp_path):
    """A forward that counts its calls in a buffer: patch's forwards (the reference and the
    verification, inside inject) are taken back, so the file holds the checkpoint's count."""
    state = counting_net().state_dict()
    state["calls"] = torch.tensor(7)
    torch.save(state, tmp_path / "in.pth")
    report = patch_checkpoint(
        tmp_path / "in.pth", "tests.helpers.tiny_models:counting_net", "se", "basic", tmp_path / "out.safetensors"
    )
    assert report.sites == ["block.se"]
    assert load_file(tmp_path / "out.safetensors")["calls"].item() == 7


def test_img_size_and_input_size_together_are_refused_before_anything_is_read(tmp_path, r18):
    """The library says what the CLI says (``--img-size`` or ``--input-size``): one size, not two."""
    state, _ = r18
    torch.save(state, tmp_path / "in.pth")
    before = (tmp_path / "in.pth").read_bytes()
    with pytest.raises(AttnInjectError, match=r"^give img_size or input_size, not both") as info:
        patch_checkpoint(
            tmp_path / "in.pth",
            "resnet18",
            "eca",
            "basic",
            tmp_path / "out.safetensors",
            img_size=64,
            input_size=(3, 64, 64),
        )
    assert "input_size=(3, 64, 64) is img_size=64." in str(info.value)
    assert sorted(os.listdir(tmp_path)) == ["in.pth"] and (tmp_path / "in.pth").read_bytes() == before
