"""The ImageFolder checks: every mistake is one clear AttnInjectError, raised before training."""

import pytest

from attn_inject import AttnInjectError
from attn_inject.finetune.data import check_image_folder, fit_head
from tests.helpers.finetune_data import TinyNet, write_image_folder


def test_a_good_folder(tmp_path):
    info = check_image_folder(write_image_folder(tmp_path, train=2, val=1))
    assert info.classes == ("ant", "bee", "cat") and info.counts == {"train": 6, "val": 3}


def test_missing_and_empty_folders(tmp_path):
    with pytest.raises(
        AttnInjectError, match=r"nope: no such data folder\. Pass the folder that holds train/ and val/"
    ):
        check_image_folder(tmp_path / "nope")
    (tmp_path / "train" / "a").mkdir(parents=True)
    with pytest.raises(AttnInjectError, match=r"train: no images found\. Put the images in one folder per class"):
        check_image_folder(tmp_path)
    write_image_folder(tmp_path / "d", train=1, val=1)
    for f in (tmp_path / "d" / "val").rglob("*.png"):
        f.unlink()
    for d in (tmp_path / "d" / "val").iterdir():
        d.rmdir()
    (tmp_path / "d" / "val").rmdir()
    with pytest.raises(AttnInjectError, match=r"d: no val/ folder\. Use the ImageFolder layout: .*val/<class>/<image>"):
        check_image_folder(tmp_path / "d")


def test_train_and_val_classes_must_agree(tmp_path):
    write_image_folder(tmp_path, train=1, val=1, val_classes=("ant", "bee", "dog"))
    with pytest.raises(
        AttnInjectError,
        match=(
            r"train/ has 3 classes and val/ has 3; they differ \(only in train/: \['cat'\], only in val/:"
            r" \['dog'\]\)"
        ),
    ):
        check_image_folder(tmp_path)


def test_unreadable_image_is_named(tmp_path):
    write_image_folder(tmp_path, train=1, val=1)
    bad = tmp_path / "val" / "bee" / "broken.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(
        AttnInjectError,
        # PIL's own error; in a process where ultralytics registered its HEIF opener (the YOLO tests), that
        # opener's missing pi_heif module is what PIL raises last
        match=r"broken.png: not a readable image \((UnidentifiedImageError|ModuleNotFoundError)\)\. Remove or "
        r"replace the file\.",
    ):
        check_image_folder(tmp_path)


def test_head_is_replaced_only_when_asked():
    model = TinyNet(num_classes=5)
    with pytest.raises(
        AttnInjectError,
        match=r"the data has 3 classes but the model's head has 5 outputs\. Pass num_classes=3 to replace",
    ):
        fit_head(model, 3, None)
    assert model.head.out_features == 5
    with pytest.raises(AttnInjectError, match=r"num_classes=4 does not match the data's 3 classes"):
        fit_head(model, 3, 4)
    assert fit_head(model, 3, 3) is True and model.head.out_features == 3 and model.num_classes == 3
    assert fit_head(model, 3, 3) is False and fit_head(model, 3, None) is False
