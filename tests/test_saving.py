"""save() / load() / apply_adapter() / eject(): round trips and every refusal, pinned."""

import dataclasses
import json
import os
import sys

import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from attn_inject import AttnInjectError, apply_adapter, eject, inject, load, save
from attn_inject.files.arch import create_model
from attn_inject.files.checkpoints import load_pretrained
from attn_inject.surgery.recipe import recipe_of, set_recipe
from attn_inject.testing import look_trained, move_off_identity

X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))


def patched_resnet18(twice: bool = False):
    model = look_trained(create_model("resnet18"))
    before = model(X)
    inject(model, "eca", "basic", example_input=X[:1])
    if twice:
        inject(model, "se", "residual", position="block_output", include="layer4.*", example_input=X[:1], reduction=8)
    return model, before


def test_save_then_load_rebuilds_the_patched_model_bitwise(tmp_path):
    model, before = patched_resnet18(twice=True)
    assert torch.equal(model(X), before)  # identity at init
    move_off_identity(model)
    expected = model(X)
    assert not torch.equal(expected, before)  # the blocks moved off identity change the output
    path = save(model, tmp_path / "m.safetensors")
    loaded = load(path)
    assert type(loaded) is type(model) and not loaded.training
    assert list(loaded.state_dict()) == list(model.state_dict())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())
    assert torch.equal(loaded(X), expected)
    assert recipe_of(loaded).to_json() == recipe_of(model).to_json()
    again = save(loaded, tmp_path / "again.safetensors")  # a loaded model saves to the same format
    assert torch.equal(load(again)(X), expected)


def test_load_dtype_and_map_location(tmp_path):
    model, _ = patched_resnet18()
    move_off_identity(model)
    path = save(model, tmp_path / "m.safetensors")
    half = load(path, map_location=torch.device("cpu"), dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16} and next(half.parameters()).device.type == "cpu"
    assert half.layer1[0].bn1.num_batches_tracked.dtype == torch.int64


def test_load_with_arch_and_num_classes(tmp_path):
    model = look_trained(create_model("resnet18", num_classes=7))
    inject(model, "eca", "basic", example_input=X[:1])
    move_off_identity(model)
    path = save(model, tmp_path / "m.safetensors")
    assert recipe_of(load(path)).num_classes == 7 and load(path)(X).shape == (2, 7)
    assert torch.equal(load(path, "resnet18", num_classes=7)(X), model(X))
    with pytest.raises(
        AttnInjectError,
        match=(
            r"m\.safetensors: the file's weights do not fit ResNet: fc\.weight has shape \[7, 512\] where the model"
            r" needs \[1000, 512\]"
        ),
    ):
        load(path, num_classes=1000)


def test_save_refuses_an_existing_file_and_an_unpatched_model(tmp_path):
    model, _ = patched_resnet18()
    path = save(model, tmp_path / "m.safetensors")
    with pytest.raises(AttnInjectError, match=r"m\.safetensors: the output file exists\. Pass --force"):
        save(model, path)
    assert save(model, path, force=True) == path
    with pytest.raises(AttnInjectError, match=r"ResNet was not patched by inject\(\), so there is no recipe to save"):
        save(timm.create_model("resnet18"), tmp_path / "plain.safetensors", adapter_only=True)  # an empty adapter
    with pytest.raises(AttnInjectError, match=r"m\.pth: the output must be a \.safetensors file"):
        save(model, tmp_path / "m.pth")
    assert sorted(os.listdir(tmp_path)) == ["m.safetensors"]  # no temporary files left


def test_a_failed_write_leaves_no_partial_and_no_temporary_file(tmp_path, monkeypatch):
    import attn_inject.files.saving as saving

    model, _ = patched_resnet18()

    def explode(filename, tensors, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(saving, "write_safetensors", explode)
    with pytest.raises(KeyboardInterrupt):
        save(model, tmp_path / "m.safetensors")
    assert os.listdir(tmp_path) == []


def test_eject_restores_the_original_keys_values_outputs_and_slots():
    torch.manual_seed(0)
    original = {k: v.clone() for k, v in look_trained(create_model("resnet18")).state_dict().items()}
    torch.manual_seed(0)
    model, before = patched_resnet18(twice=True)
    assert model.layer1[0].se is model.layer1[0].get_submodule("se")  # the empty slot was taken (names)
    eject(model)
    assert list(model.state_dict()) == list(original)
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())
    assert torch.equal(model(X), before)
    assert model.layer1[0].se is None and "se" not in model.layer1[0]._modules  # timm's slot is back
    assert recipe_of(model).injections == ()
    with pytest.raises(AttnInjectError, match=r"ResNet holds no injected blocks to eject"):
        eject(model)


def test_eject_a_loaded_model(tmp_path):
    model, before = patched_resnet18()
    loaded = load(save(model, tmp_path / "m.safetensors"))
    assert torch.equal(eject(loaded)(X), before)


def test_adapter_reproduces_the_patched_model_and_refuses_another_base(tmp_path):
    base_path = tmp_path / "base.pth"
    torch.save(look_trained(create_model("resnet18")).state_dict(), base_path)
    model = load_pretrained(base_path, "resnet18")
    inject(model, "eca", "basic", example_input=X[:1])
    move_off_identity(model)
    adapter = save(model, tmp_path / "a.safetensors", adapter_only=True)
    assert adapter.stat().st_size < 4000  # ECA: 36 parameters plus the recipe
    with safe_open(str(adapter), "pt") as f:
        assert sorted(f.keys()) == sorted(k for k in model.state_dict() if ".se." in k)
    base = load_pretrained(base_path, "resnet18")
    assert apply_adapter(base, adapter) is base and torch.equal(base(X), model(X))
    other_weights = look_trained(create_model("resnet18"), seed=5)
    with pytest.raises(
        AttnInjectError,
        match=(
            r"a\.safetensors: the adapter was made for other weights of resnet18 \(122 tensors\): base fingerprint"
            r" \w+, this model's \w+"
        ),
    ):
        apply_adapter(other_weights, adapter)
    with pytest.raises(
        AttnInjectError,
        match=(
            r"the adapter was made for another architecture: resnet18 \(122 tensors\), structure \w+; ResNet has"
            r" 320 tensors"
        ),
    ):
        apply_adapter(create_model("resnet50"), adapter)
    assert recipe_of(other_weights).injections == ()  # refused before any change
    with pytest.raises(
        AttnInjectError, match=r"a\.safetensors: the file is an adapter: it holds only the injected blocks"
    ):
        load(adapter)
    with pytest.raises(AttnInjectError, match=r"the file holds a whole patched model, not an adapter"):
        apply_adapter(create_model("resnet18"), save(model, tmp_path / "full.safetensors"))


def rewrite(path, out, metadata=None, drop=None, add=None):
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys() if k != drop}  # noqa: SIM118 (safe_open has keys(), no __iter__)
    tensors.update(add or {})
    save_file(tensors, str(out), metadata={**meta, **(metadata or {})})
    return out


def test_load_refusals(tmp_path):
    model, _ = patched_resnet18()
    good = save(model, tmp_path / "m.safetensors")
    recipe = json.loads(safe_open(str(good), "pt").metadata()["attn_inject.recipe"])
    newer = rewrite(
        good, tmp_path / "newer.safetensors", {"attn_inject.recipe": json.dumps({**recipe, "format_version": 99})}
    )
    cases = [
        (
            newer,
            r"newer\.safetensors: recipe: the recipe has format version 99, newer than this attn_inject reads \(1\)"
            r"\. Upgrade attn_inject",
        ),
        (
            rewrite(good, tmp_path / "short.safetensors", drop="layer1.0.se.conv.weight"),
            r"short\.safetensors: the file does not hold what its recipe builds: missing"
            r" \['layer1\.0\.se\.conv\.weight'\], unexpected \[\]",
        ),
        (
            rewrite(good, tmp_path / "long.safetensors", add={"layer9.x": torch.zeros(1)}),
            r"long\.safetensors: the file's weights do not fit ResNet: unexpected \['layer9\.x'\]",
        ),
        (
            rewrite(good, tmp_path / "blob.safetensors", {"attn_inject.recipe": "{not json"}),
            r"blob\.safetensors: recipe: the recipe is not valid JSON",
        ),
        (
            rewrite(
                good,
                tmp_path / "cbam.safetensors",
                {
                    "attn_inject.recipe": json.dumps(
                        {**recipe, "injections": [{**recipe["injections"][0], "block": "bam"}]}
                    )
                },
            ),
            r"cbam\.safetensors: recipe: injections\[0\]: unknown block 'bam'. "
            r"Valid blocks: cbam, coord, eca, gc, gct, ge, se, simam\.",
        ),
        (tmp_path / "missing.safetensors", r"missing\.safetensors: no such file"),
        (tmp_path, r": not a file \(a folder\?\)"),
    ]
    plain = tmp_path / "plain.safetensors"
    save_file(timm.create_model("resnet18").state_dict(), str(plain))
    cases.append(
        (
            plain,
            r"plain\.safetensors: a plain checkpoint: the file holds no attn_inject recipe\. load\(\) reads"
            r" .*checkpoint\.load_pretrained\(path, arch\)",
        )
    )
    (tmp_path / "empty.safetensors").write_bytes(b"")
    cases.append(
        (
            tmp_path / "empty.safetensors",
            r"empty\.safetensors: not a valid \.safetensors file \(.*\)\. The file is truncated or damaged",
        )
    )
    (tmp_path / "cut.safetensors").write_bytes(good.read_bytes()[:5000])
    cases.append((tmp_path / "cut.safetensors", r"cut\.safetensors: not a valid \.safetensors file"))
    for path, message in cases:
        with pytest.raises(AttnInjectError, match=message):
            load(path)


def test_a_hostile_recipe_naming_a_factory_runs_nothing(tmp_path, monkeypatch):
    marker = tmp_path / "ran"
    (tmp_path / "evilpkg").mkdir()
    (tmp_path / "evilpkg" / "__init__.py").write_text(f"open({str(marker)!r}, 'w').write('imported')\n")
    (tmp_path / "evilpkg" / "boom.py").write_text(
        f"open({str(marker)!r}, 'w').write('imported')\ndef make(**kw):\n    raise SystemExit\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    model, _ = patched_resnet18()
    set_recipe(model, dataclasses.replace(recipe_of(model), arch="evilpkg.boom:make"))
    path = save(model, tmp_path / "evil.safetensors")
    with pytest.raises(
        AttnInjectError,
        match=(
            r"evil\.safetensors: the recipe names the factory 'evilpkg\.boom:make', and a file is never allowed to"
            r" import code\. If you trust it, pass arch='evilpkg\.boom:make'"
        ),
    ):
        load(path)
    assert not marker.exists() and "evilpkg" not in sys.modules
    assert torch.equal(load(path, "resnet18")(X), model(X))  # the caller names the arch: fine


def test_factory_arch_round_trip(tmp_path, monkeypatch):
    (tmp_path / "saving_nets.py").write_text(
        "import timm\ndef small_resnet(num_classes=5):\n    return timm.create_model('resnet18',"
        " num_classes=num_classes)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    model = look_trained(create_model("saving_nets:small_resnet"))
    inject(model, "se", "basic", example_input=X[:1])
    move_off_identity(model)
    path = save(model, tmp_path / "m.safetensors")
    assert recipe_of(load(path, "saving_nets:small_resnet")).arch == "saving_nets:small_resnet"
    assert torch.equal(load(path, trust_remote_code=True)(X), model(X))
