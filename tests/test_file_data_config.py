"""What a file says beyond the weights: a plain model saves with its arch, the recipe records the
head the model has now, and the file carries timm's data config and the class names."""

import json

import pytest
import timm
import torch
from safetensors import safe_open
from timm.data import resolve_data_config

from attn_inject import AttnInjectError, inject, load, save
from attn_inject.files.arch import create_model
from attn_inject.files.checkpoints import load_pretrained
from attn_inject.files.data_config import DataInfo, remember_data
from attn_inject.files.describe import describe_file
from attn_inject.files.eject import eject_file
from attn_inject.graph.example import example_args
from attn_inject.surgery.recipe import recipe_of
from attn_inject.testing import look_trained, move_off_identity
from tests.test_saving import rewrite

X = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(5))


def metadata(path) -> dict:
    with safe_open(str(path), "pt") as f:
        return f.metadata()


def test_a_plain_model_saves_with_its_arch_and_loads_back(tmp_path):
    model = look_trained(timm.create_model("resnet10t")).eval()
    path = save(model, tmp_path / "plain.safetensors")
    recipe = json.loads(metadata(path)["attn_inject.recipe"])
    assert (recipe["arch"], recipe["num_classes"], recipe["injections"]) == ("resnet10t", 1000, [])
    loaded = load(path)
    assert type(loaded) is type(model) and recipe_of(loaded).injections == ()
    assert torch.equal(loaded(X), model(X))
    assert torch.equal(load_pretrained(path, "resnet10t")(X), model(X))  # it is a plain checkpoint too
    info = describe_file(path)
    assert (info["content"], info["arch"], info["num_classes"]) == ("plain", "resnet10t", 1000)
    with pytest.raises(AttnInjectError, match=r"plain\.safetensors: the file holds a plain model \(no injected"):
        eject_file(path, tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()
    # a model built from an arch string remembers it; a model of unknown arch saves, and loads with its arch
    built = look_trained(create_model("torchvision:resnet18", num_classes=4)).eval()
    assert torch.equal(load(save(built, tmp_path / "tv.safetensors"))(X), built(X))
    mine = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(2))
    mine(X)
    unknown = save(mine, tmp_path / "mine.safetensors")
    with pytest.raises(AttnInjectError, match=r"mine\.safetensors: the file's recipe does not name its architecture"):
        load(unknown)


@pytest.mark.parametrize("patched", [False, True], ids=["plain", "patched"])
def test_reset_classifier_then_save_then_load(tmp_path, patched):
    model = look_trained(create_model("resnet10t"))
    if patched:
        inject(model, "eca", "basic", example_input=X[:1])
        move_off_identity(model)
    model.reset_classifier(10)
    model.eval()
    path = save(model, tmp_path / "ten.safetensors")
    loaded = load(path)
    assert recipe_of(loaded).num_classes == 10 and loaded.get_classifier().out_features == 10
    assert torch.equal(loaded(X), model(X)) and loaded(X).shape == (2, 10)
    # torchvision classifiers have no num_classes: the last layer tells
    tv = look_trained(create_model("torchvision:resnet18"))
    tv.fc = torch.nn.Linear(512, 7)
    tv.eval()
    assert torch.equal(load(save(tv, tmp_path / "tv7.safetensors"))(X), tv(X))


def test_the_file_carries_the_data_config_and_class_names(tmp_path):
    model = look_trained(create_model("resnet10t", num_classes=3))
    inject(model, "eca", "basic", example_input=X[:1])
    config = {**resolve_data_config({"input_size": (3, 48, 48)}, model=model), "interpolation": "bilinear"}
    remember_data(model, DataInfo(config, ("ant", "bee", "cat")))
    path = save(model.eval(), tmp_path / "m.safetensors")
    meta = metadata(path)
    assert json.loads(meta["attn_inject.classes"]) == ["ant", "bee", "cat"]
    stored = json.loads(meta["attn_inject.data_config"])
    assert list(stored) == sorted(stored)  # canonical order: identical runs write identical bytes
    assert stored["input_size"] == [3, 48, 48] and stored["interpolation"] == "bilinear"
    loaded = load(path)
    assert resolve_data_config({}, model=loaded) == {**config, "input_size": (3, 48, 48)}  # timm's helper reads it
    assert loaded.pretrained_cfg["label_names"] == ("ant", "bee", "cat")
    assert example_args(loaded)[0].shape == (1, 3, 48, 48)  # so does the default example input
    info = describe_file(path)
    assert info["classes"] == ("ant", "bee", "cat") and info["data_config"]["input_size"] == [3, 48, 48]
    assert metadata(save(loaded, tmp_path / "again.safetensors")) == meta  # and they travel on

    bad = {
        "attn_inject.data_config": (
            json.dumps({**stored, "input_size": [3, 100000, 100000]}),
            r"metadata field 'data_config\.input_size' must be \[channels, height, width\], sides 1 to 4096",
        ),
        "attn_inject.classes": ('["ant", 3]', r"metadata field 'classes' must be a list of 1 to 1,000,000 non-empty"),
    }
    for key, (text, message) in bad.items():
        edited = rewrite(path, tmp_path / "edited.safetensors", {key: text})
        with pytest.raises(AttnInjectError, match=r"edited\.safetensors: " + message):
            load(edited)
    edited = rewrite(path, tmp_path / "edited.safetensors", {"attn_inject.data_config": "{nope"})
    with pytest.raises(AttnInjectError, match=r"metadata entry attn_inject\.data_config is not valid JSON"):
        describe_file(edited)
