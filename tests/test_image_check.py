"""Every image is decoded before the first step (in parallel, cached by path, size and mtime): a
truncated JPEG, a bomb PNG and an empty class folder are refused before step 0; 16-bit images are
scaled, not saturated."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from attn_inject import AttnInjectError
from attn_inject.finetune.commands import save_model
from attn_inject.finetune.data import check_image_folder
from attn_inject.finetune.image_check import CACHE_ENV, cache_path, check_images, open_rgb
from attn_inject.finetune.loop import TrainConfig, finetune
from tests.helpers.finetune_data import bomb_png, grey16_png, tiny_model, truncated_jpeg, write_image_folder

pytestmark = pytest.mark.usefixtures("one_thread")


class Steps:
    """A progress that records phases: the training loop never starts an epoch when a check fails."""

    def __init__(self):
        self.phases = []

    def start(self, description, total):
        self.phases.append((description, total))

    def update(self, advance=1, **fields):
        pass

    def stop(self):
        pass

    def note(self, message):
        pass


@pytest.mark.parametrize(
    "make, message",
    [
        (
            lambda folder: truncated_jpeg(folder / "cut.jpg"),
            r"cut\.jpg: cannot decode image \(OSError: image file is truncated.*\)\. Remove or replace the file\.$",
        ),
        (
            lambda folder: bomb_png(folder / "bomb.png"),
            r"bomb\.png: the image is 10000x10000, 100,000,000 pixels: more than 89,478,485 \(PIL's bomb limit\)\. "
            r"Remove or replace the file\.$",
        ),
    ],
    ids=["truncated-jpeg", "bomb-png"],
)
def test_a_bad_image_is_refused_before_step_0(tmp_path, make, message):
    data = write_image_folder(tmp_path / "d", train=4, val=2)
    make(data / "train" / "bee")
    steps = Steps()
    with pytest.raises(AttnInjectError, match=message):
        finetune(
            tiny_model(),
            data,
            TrainConfig(epochs=1, batch_size=4),
            output=tmp_path / "o.safetensors",
            save_model=save_model,
            progress=steps,
        )
    assert steps.phases == [("check images", 19)]  # every image checked, no evaluation, no epoch
    assert sorted(os.listdir(tmp_path)) == ["d"]  # nothing written


def test_every_bad_image_is_counted_and_workers_check_in_parallel(tmp_path):
    data = write_image_folder(tmp_path / "d", train=4, val=2)
    truncated_jpeg(data / "val" / "ant" / "a.jpg")
    truncated_jpeg(data / "train" / "cat" / "b.jpg")
    with pytest.raises(AttnInjectError, match=r"b\.jpg: cannot decode image .* \(1 more of the 20 images fail too\)"):
        check_image_folder(data, workers=3)


def test_the_check_is_cached_by_path_size_and_mtime(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    data = write_image_folder(tmp_path / "d", train=2, val=1)
    paths = sorted(str(p) for p in data.rglob("*.png"))
    first = check_images(data, paths)
    assert first == {"images": 9, "decoded": 9, "cached": 0}
    assert check_images(data, paths) == {"images": 9, "decoded": 0, "cached": 9}  # the second run decodes nothing
    cache = cache_path(data)
    assert cache.parent.parent == tmp_path / "cache" and oct(cache.parent.stat().st_mode & 0o777) == "0o700"
    assert set(json.loads(cache.read_text())["files"]) == set(paths)
    changed = data / "train" / "ant" / "0.png"
    changed.write_bytes(changed.read_bytes()[:60])  # same path, new size and mtime: checked again
    with pytest.raises(AttnInjectError, match=r"0\.png: cannot decode image"):
        check_images(data, paths)
    cache.write_text("{not json")  # a damaged cache counts as empty
    with pytest.raises(AttnInjectError, match=r"0\.png: cannot decode image"):
        check_images(data, paths)
    monkeypatch.setenv(CACHE_ENV, "off")
    assert cache_path(data) is None


def test_an_empty_class_folder_is_refused(tmp_path):
    data = write_image_folder(tmp_path / "d", train=2, val=1)
    (data / "train" / "dog").mkdir()
    (data / "train" / "dog" / "notes.txt").write_text("no images here")
    with pytest.raises(
        AttnInjectError,
        match=r"train/dog: the class folder dog/ holds no images\. Put images in it or remove it",
    ):
        check_image_folder(data)
    (data / "train" / "dog" / "notes.txt").unlink()
    (data / "train" / "dog").rmdir()
    (data / "val" / ".ipynb_checkpoints").mkdir()  # hidden folders are not classes
    assert check_image_folder(data).classes == ("ant", "bee", "cat")


def test_16_bit_images_are_scaled_not_saturated(tmp_path):
    values = np.arange(256, dtype=np.uint16).reshape(16, 16) * 257  # 0, 257, ..., 65535: 8-bit v as 16-bit
    path = grey16_png(tmp_path / "g16.png", values)
    with Image.open(path) as image:
        assert image.mode == "I;16"
        saturated = np.asarray(image.convert("RGB"))
    rgb = open_rgb(path)
    assert rgb.mode == "RGB" and np.array_equal(np.asarray(rgb)[..., 0], np.arange(256).reshape(16, 16))
    assert np.array_equal(np.asarray(rgb)[..., 0], np.asarray(rgb)[..., 2])
    assert (saturated[..., 0] == 255).sum() == 255  # what PIL's own conversion does to every value above 255
