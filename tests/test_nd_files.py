"""Files of 1-D and 3-D models: plan and patch take --input-size and show the maps; the patched
file loads bitwise, saves again with trained blocks, ejects to the original weights; a
``package.module:factory`` arch (MONAI, 1-D) patches with full verification."""

from __future__ import annotations

import torch

from attn_inject import load, save
from attn_inject.files.arch import create_model
from attn_inject.files.checkpoints import load_pretrained
from attn_inject.files.patch import patch_checkpoint
from attn_inject.surgery.recipe import recipe_of
from attn_inject.testing import look_trained, move_off_identity
from tests.helpers.cli import last_json, run_cli, run_cli_one_line
from tests.helpers.running import outputs

VIDEO = ("--arch", "torchvision:r3d_18", "--num-classes", "10", "--input-size", "3,2,16,16")


def test_plan_shows_nd_maps(capsys):
    code, out, err = run_cli(capsys, "plan", *VIDEO, "--block", "eca", "--after", "basic", "--json")
    sites = last_json(out)["sites"]
    assert code == 0, err
    assert [s["map"] for s in sites[::2]] == ["64x2x8x8 NCDHW", "128x1x4x4 NCDHW", "256x1x2x2 NCDHW", "512x1x1x1 NCDHW"]
    assert [s["options"] for s in sites[:1]] == [{"spatial_dims": 3}]
    code, out, _ = run_cli(capsys, "plan", *VIDEO, "--block", "se", "--after", "basic")
    assert code == 0 and out.count("NCDHW") == 8  # the map column (the table wraps at the terminal's width)
    code, _, err = run_cli_one_line(capsys, "plan", *VIDEO[:4], "--block", "se", "--after", "basic")
    assert code == 1 and err.startswith("error: the example forward of VideoResNet failed: RuntimeError: ")
    assert err.endswith(
        "Pass example_input= (a tensor or tuple of arguments) that the model accepts. A model of 1-D or 3-D convs "
        "takes an input of its own shape, (1, C, L) or (1, C, D, H, W); on the command line: --input-size C,L or "
        "C,D,H,W."
    )
    code, _, err = run_cli_one_line(capsys, "plan", *VIDEO, "--img-size", "16", "--block", "se", "--after", "basic")
    assert (
        code == 1
        and err == "error: give --img-size or --input-size, not both. --input-size 3,224,224 is --img-size 224."
    )


def test_a_3d_checkpoint_patches_loads_saves_and_ejects(tmp_path, capsys):
    model = look_trained(create_model("torchvision:r3d_18", num_classes=10))
    x = torch.randn(1, 3, 2, 16, 16)
    expected = outputs(model, x)
    torch.save(model.state_dict(), tmp_path / "in.pth")
    out = tmp_path / "se.safetensors"
    code, stdout, err = run_cli_one_line(
        capsys, "patch", tmp_path / "in.pth", *VIDEO, "--block", "se", "--after", "basic", "--output", out, "--json"
    )
    summary = last_json(stdout)
    assert code == 0, err
    assert len(summary["sites"]) == 8 and summary["params_added"] == 90112
    assert summary["example_input"] == [[1, 3, 2, 16, 16]]
    loaded = load(out)
    assert recipe_of(loaded).arch == "torchvision:r3d_18" and torch.equal(outputs(loaded, x), expected)
    move_off_identity(loaded)
    trained = outputs(loaded, x)
    assert not torch.equal(trained, expected)
    save(loaded, tmp_path / "trained.safetensors")
    assert torch.equal(outputs(load(tmp_path / "trained.safetensors"), x), trained)
    code, stdout, err = run_cli_one_line(capsys, "eject", out, "--output", tmp_path / "orig.safetensors", "--json")
    assert code == 0, err
    assert last_json(stdout)["removed"][:2] == ["layer1.0.se", "layer1.1.se"]
    plain = load_pretrained(tmp_path / "orig.safetensors", "torchvision:r3d_18", num_classes=10)
    assert torch.equal(outputs(plain, x), expected)


def test_a_1d_factory_arch_patches_with_full_verification(tmp_path, monkeypatch):
    (tmp_path / "nd_nets.py").write_text(
        "from monai.networks.nets import resnet18\n"
        "def net(num_classes=2):\n"
        "    return resnet18(spatial_dims=1, n_input_channels=1, num_classes=num_classes)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    model = look_trained(create_model("nd_nets:net"))
    torch.save(model.state_dict(), tmp_path / "w.pth")
    out = tmp_path / "eca.safetensors"
    report = patch_checkpoint(tmp_path / "w.pth", "nd_nets:net", "eca", "basic", out, input_size=(1, 64), verify="full")
    assert report.verified == "full" and len(report.sites) == 8 and report.sites[0] == "layer1.0.eca"
    x = torch.randn(1, 1, 64)
    assert torch.equal(outputs(load(out, "nd_nets:net"), x), outputs(model, x))
