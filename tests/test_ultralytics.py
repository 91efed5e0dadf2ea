"""ultralytics YOLO keeps the blocks through its own workflow (issue 21): inject(yolo) → train → val →
predict → ONNX export → YOLO(best.pt) → train again; `attn-inject patch` of a YOLO .pt; the trainers
of segment, classify and pose; load() from the bundled YAML.

Everything runs offline with tiny images (tests/helpers/yolo.py) and writes only under tmp_path (the
``yolo_sandbox`` fixture runs each test from there; every call passes ``project=``).
"""

import logging
from pathlib import Path

import pytest
import torch

from attn_inject import AttnInjectError, eject, inject, keep_blocks, load, plan, save
from attn_inject.files.arch import create_model
from attn_inject.graph.example import first_difference
from attn_inject.surgery.recipe import recipe_of
from attn_inject.testing import look_trained, move_off_identity
from tests.helpers.cli import run_cli_one_line
from tests.helpers.running import outputs
from tests.helpers.yolo import block_calls, block_tensors, detect_dataset, run_args, train_args

# blocks YOLOv8n gets, and those the tiny data set gives no gradient (the P5 box branch: a 2x2 grid at
# 64 px, where no anchor is assigned, so its box loss is exactly 0)
SITES = {"residual": 6, "conv": 57}
NO_GRADIENT = {"residual": (), "conv": ("model.22.cv2.2.",)}


@pytest.fixture
def ultralytics_log():
    """The lines ultralytics logs (its logger does not propagate to pytest's)."""
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logger = logging.getLogger("ultralytics")
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)


def _changed(before: dict, after: dict) -> set[str]:
    return {k for k in before if not torch.equal(before[k], after[k])}


@pytest.mark.parametrize("after", ["residual", pytest.param("conv", marks=pytest.mark.slow)])
def test_inject_on_a_yolo_object_keeps_the_blocks_through_the_whole_workflow(
    after, yolo_sandbox, tmp_path, ultralytics_log
):
    from ultralytics import YOLO

    data = detect_dataset(tmp_path / "data")
    yolo = YOLO("yolov8n.yaml")
    assert inject(yolo, "eca", after=after) is yolo
    names = sorted(recipe_of(yolo.model).modules)
    assert len(names) == SITES[after]
    assert recipe_of(yolo.model).arch == "ultralytics:yolov8n.yaml"
    start = block_tensors(yolo.model)

    yolo.train(name="first", **train_args(tmp_path / "runs", data))
    trainer = yolo.trainer
    for model in (trainer.model, trainer.ema.ema, yolo.model):  # yolo.model: best.pt, loaded by ultralytics
        assert sorted(recipe_of(model).modules) == names
    assert any(
        f"replayed {len(names)} eca after {after} on the trainer's DetectionModel" in line for line in ultralytics_log
    )
    trained = block_tensors(yolo.model)
    assert trained.keys() == start.keys()
    still = {k for k in start if k not in _changed(start, trained)}
    assert all(k.startswith(NO_GRADIENT[after]) for k in still) and len(still) < len(start) / 10

    with block_calls(yolo.model) as calls:
        yolo.val(data=str(data), batch=4, **run_args(tmp_path / "runs"))
        assert sorted(n for n, c in calls.items() if c) == names  # fuse() kept every block
    photos = sorted(str(p) for p in (tmp_path / "data" / "images" / "val").glob("*.jpg"))
    with block_calls(yolo.model) as calls:
        yolo.predict(photos, **run_args(tmp_path / "runs"))
        assert sorted(n for n, c in calls.items() if c) == names

    onnx_path = yolo.export(format="onnx", imgsz=64, simplify=False, device="cpu")
    _check_onnx(onnx_path, yolo.model, len(names))

    again = keep_blocks(YOLO(str(trainer.best)))
    assert sorted(recipe_of(again.model).modules) == names
    assert all(torch.equal(v, trained[k]) for k, v in block_tensors(again.model).items())
    again.train(name="again", **train_args(tmp_path / "runs", data))
    assert sorted(recipe_of(again.trainer.model).modules) == names
    assert any("from the recipe of the weights it trains from" in line for line in ultralytics_log)
    moved = _changed(trained, block_tensors(again.model))
    assert moved and all(k in moved or k.startswith(NO_GRADIENT[after]) for k in trained)


def _check_onnx(path: str, model: torch.nn.Module, blocks: int) -> None:
    """One Tanh per block gate (plain YOLOv8 exports none), and ONNX Runtime computes what torch does."""
    import copy

    import onnx
    import onnxruntime

    assert sum(node.op_type == "Tanh" for node in onnx.load(path).graph.node) == blocks
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    (actual, *_) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    expected = outputs(copy.deepcopy(model).float().eval().fuse(verbose=False), x)[0]
    torch.testing.assert_close(torch.from_numpy(actual), expected, rtol=1e-3, atol=1e-3)


def test_patch_of_a_yolo_pt_writes_a_pt_ultralytics_opens_and_trains_with_the_blocks(
    yolo_sandbox, tmp_path, capsys, ultralytics_log
):
    from ultralytics import YOLO

    base = YOLO("yolov8n.yaml")
    look_trained(base.model)
    base.save(tmp_path / "yolov8n.pt")  # an ultralytics checkpoint: the pickled model, fp16
    out = tmp_path / "yolov8n-eca.pt"
    assert _patch(capsys, tmp_path / "yolov8n.pt", out)[:2] == (0, "")

    patched = YOLO(str(out))
    names = sorted(recipe_of(patched.model).modules)
    assert len(names) == 6
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    original = YOLO(str(tmp_path / "yolov8n.pt")).model.eval()
    expected = outputs(patched.model.eval(), x)[0]
    assert torch.equal(expected, outputs(original, x)[0])  # identity, bit for bit
    read = load(out)  # read as data, never unpickled
    assert sorted(recipe_of(read).modules) == names and torch.equal(outputs(read, x)[0], expected)
    safetensors = tmp_path / "yolov8n-eca.safetensors"
    assert _patch(capsys, tmp_path / "yolov8n.pt", safetensors)[:2] == (0, "")
    assert torch.equal(outputs(load(safetensors), x)[0], expected)

    data = detect_dataset(tmp_path / "data")  # (training sets torch's threads: compare outputs before)
    keep_blocks(patched).train(name="patched", val=False, **train_args(tmp_path / "runs", data))
    for model in (patched.trainer.model, patched.trainer.ema.ema, patched.model):
        assert sorted(recipe_of(model).modules) == names
    assert any("replayed 6 eca after residual" in line for line in ultralytics_log)


def _patch(capsys, source: Path, out: Path, *more: str, block: str = "eca") -> tuple[int, str, str]:
    """``attn-inject patch SOURCE --block BLOCK --after residual --output OUT MORE``: code, stderr, stdout."""
    code, stdout, err = run_cli_one_line(
        capsys, "patch", source, "--block", block, "--after", "residual", "--output", out, *more
    )
    return code, err, stdout


def test_patch_refuses_what_it_cannot_rebuild_by_name(yolo_sandbox, tmp_path, capsys):
    from ultralytics import YOLO

    custom = tmp_path / "mynet.yaml"  # yolov8n under another name: not a bundled YAML
    custom.write_text(_bundled("yolov8.yaml").read_text())
    YOLO(str(custom)).save(tmp_path / "mynet.pt")
    code, err, _ = _patch(capsys, tmp_path / "mynet.pt", tmp_path / "o.pt")
    assert code == 1
    assert "the checkpoint's model cannot be rebuilt by name: its YAML 'mynet.yaml' is not one bundled" in err

    source = tmp_path / "yolov8n.pt"
    YOLO("yolov8n.yaml").save(source)
    assert _patch(capsys, source, tmp_path / "o.pt", "--arch", "resnet18")[:2] == (
        1,
        f"error: {source}: an ultralytics checkpoint names its own architecture and classes. Drop --arch and "
        "--num-classes.",
    )
    assert _patch(capsys, source, tmp_path / "o.pt", "--verify", "full")[:2] == (0, "")  # rebuilt from the .pt
    code, err, _ = _patch(capsys, tmp_path / "o.pt", tmp_path / "o2.pt", block="se")
    assert code == 1 and "the checkpoint already holds attn_inject blocks" in err
    assert not (tmp_path / "o2.pt").exists()


def _bundled(name: str) -> Path:
    from attn_inject.integrations.yolo import bundled_yaml

    found = bundled_yaml(name)
    assert found is not None
    return found


@pytest.mark.parametrize(
    ("cfg", "trainer"),
    [
        pytest.param("yolov8n-seg.yaml", "ultralytics.models.yolo.segment.SegmentationTrainer", marks=pytest.mark.slow),
        pytest.param("yolov8n-pose.yaml", "ultralytics.models.yolo.pose.PoseTrainer", marks=pytest.mark.slow),
        ("yolov8n-cls.yaml", "ultralytics.models.yolo.classify.ClassificationTrainer"),
    ],
)
def test_the_trainer_of_every_task_builds_its_model_with_the_blocks_and_their_weights(
    cfg, trainer, yolo_sandbox, tmp_path
):
    import importlib

    from ultralytics import YOLO

    yolo = YOLO(cfg)
    inject(yolo, "se", after="residual")
    move_off_identity(yolo.model)  # trained-looking blocks: the transfer shows
    module, _, name = trainer.rpartition(".")
    data = _data_for(yolo.task, tmp_path)
    built = getattr(importlib.import_module(module), name)(
        overrides={"model": cfg, "data": str(data), **run_args(tmp_path / "runs")}, _callbacks=yolo.callbacks
    )
    model = built.get_model(cfg=yolo.model.yaml, weights=yolo.model, verbose=False)
    assert type(model) is type(yolo.model)
    assert sorted(recipe_of(model).modules) == sorted(recipe_of(yolo.model).modules)
    mine, theirs = block_tensors(yolo.model), block_tensors(model)
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)


def _data_for(task: str, root: Path) -> Path:
    data = detect_dataset(root / "data")
    if task == "pose":
        pose = root / "pose.yaml"
        pose.write_text(data.read_text() + "kpt_shape: [17, 3]\n")
        return pose
    if task == "classify":
        from PIL import Image

        for split in ("train", "val"):
            for label in ("a", "b"):
                (root / "cls" / split / label).mkdir(parents=True)
                Image.new("RGB", (32, 32), (40, 90, 200) if label == "a" else (200, 90, 40)).save(
                    root / "cls" / split / label / "x.jpg"
                )
        return root / "cls"
    return data


def test_load_rebuilds_a_yolo_model_from_its_bundled_yaml(yolo_sandbox, tmp_path):
    from ultralytics import YOLO

    yolo = YOLO("yolov8n-seg.yaml")
    look_trained(yolo.model)
    inject(yolo, "eca", after="residual")
    move_off_identity(yolo.model)
    save(yolo, tmp_path / "seg.safetensors")
    rebuilt = load(tmp_path / "seg.safetensors")
    assert type(rebuilt).__name__ == "SegmentationModel"
    assert recipe_of(rebuilt).arch == "ultralytics:yolov8n-seg.yaml"
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    assert first_difference(outputs(yolo.model.eval(), x), outputs(rebuilt, x)) is None
    for bad in ("../../etc/x.yaml", "yolov8n.pt", "nosuch.yaml"):
        with pytest.raises(AttnInjectError, match=r"is not a model YAML bundled with ultralytics"):
            create_model(f"ultralytics:{bad}")


def test_plan_and_eject_take_the_yolo_object_and_a_bare_model_gets_a_warning(yolo_sandbox, caplog):
    from ultralytics import YOLO

    yolo = YOLO("yolov8n.yaml")
    assert len(plan(yolo, "eca", after="residual")) == 6
    with caplog.at_level(logging.WARNING, logger="attn_inject"):
        inject(yolo.model, "eca", after="residual")
    assert "patched a bare DetectionModel: a YOLO object's train() builds a new model from the YAML" in caplog.text
    assert eject(yolo) is yolo and recipe_of(yolo.model).injections == ()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="attn_inject"):
        inject(yolo, "eca", after="residual")
    assert caplog.text == ""
    kept = [cb for cb in yolo.callbacks["on_pretrain_routine_start"] if type(cb).__name__ == "_KeepBlocks"]
    assert len(kept) == 1
    with pytest.raises(AttnInjectError, match=r"keep_blocks\(\) takes an ultralytics YOLO object, not DetectionModel"):
        keep_blocks(yolo.model)


class _Interrupted(Exception):
    pass


@pytest.mark.slow
def test_an_interrupted_run_resumes_with_its_blocks(yolo_sandbox, tmp_path):
    from ultralytics import YOLO

    data = detect_dataset(tmp_path / "data")
    yolo = inject(YOLO("yolov8n.yaml"), "eca", after="residual")
    names = sorted(recipe_of(yolo.model).modules)

    def crash(trainer):  # after the first epoch's checkpoint: last.pt keeps its optimizer, as after a kill
        raise _Interrupted

    yolo.add_callback("on_fit_epoch_end", crash)
    with pytest.raises(_Interrupted):
        yolo.train(name="run", **{**train_args(tmp_path / "runs", data), "epochs": 2})
    last = Path(yolo.trainer.last)
    resumed = keep_blocks(YOLO(str(last)))
    saved = block_tensors(resumed.model)
    resumed.train(resume=True)
    assert resumed.trainer.start_epoch == 1
    for model in (resumed.trainer.model, resumed.trainer.ema.ema, resumed.model):
        assert sorted(recipe_of(model).modules) == names
    assert _changed(saved, block_tensors(resumed.model))
