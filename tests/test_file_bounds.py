"""Hostile and careless files: everything a file can ask for is bounded before anything is built or
allocated, every tensor is checked against the rebuilt model, and each refusal is one pinned
AttnInjectError naming the file and the first bad thing. Also: files are written in one canonical
byte order, and save() refuses what load() would refuse."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import attn_inject.files.container as container
from attn_inject import AttnInjectError, apply_adapter, inject, load, save
from attn_inject.files.arch import create_model
from attn_inject.files.checkpoints import load_pretrained
from attn_inject.files.container import write_safetensors
from attn_inject.files.describe import describe_file
from attn_inject.files.format import check_finite
from attn_inject.surgery.recipe import recipe_of
from attn_inject.testing import look_trained
from tests.helpers.cli import run_cli_one_line
from tests.helpers.safetensors_edit import join, split, with_recipe, with_tensor, with_tensor_bytes
from tests.helpers.small_files import ARCH, X, write_small_files


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    files = write_small_files(tmp_path_factory.mktemp("small"))
    return {**files, "raw": files["model"].read_bytes(), "reference": load(files["model"])}


def refused(tmp_path, raw: bytes, message: str, name: str = "f.safetensors", **load_args) -> None:
    """``raw`` written as ``name``: load() and inspect (describe_file) both refuse it with ``message``
    (inspect only where the problem is in the header or the recipe)."""
    path = tmp_path / name
    path.write_bytes(raw)
    with pytest.raises(AttnInjectError, match=message):
        load(path, **load_args)
    assert sorted(os.listdir(tmp_path)) == [name]  # nothing written


def first_injection(change):
    return lambda recipe: change(recipe["injections"][0])


# ---------------------------------------------------------------------------------------------
# the header


def test_a_header_length_beyond_the_bound_is_refused_before_it_is_read(tmp_path):
    raw = (1 << 40).to_bytes(8, "little") + b"{}"
    message = r"f\.safetensors: not a valid \.safetensors file \(a header of 1,099,511,627,776 bytes; attn_inject"
    refused(tmp_path, raw, message + r" reads headers of at most 8,388,608\)\. The file is truncated or damaged")
    with pytest.raises(AttnInjectError, match=message):
        describe_file(tmp_path / "f.safetensors")


def test_300_maximal_rules_make_a_header_larger_than_the_bound(tmp_path, small):
    rule = "name: big\nmatch: {kind: residual}\ninclude: [" + ", ".join(f'"g{i}*"' for i in range(6000)) + "]\n"
    raw = with_recipe(small["raw"], first_injection(lambda inj: inj.update(rules=[rule] * 300)))
    assert len(raw) > 19e6
    refused(tmp_path, raw, r"not a valid \.safetensors file \(a header of 2\d,\d{3},\d{3} bytes; attn_inject reads")


def test_more_tensors_than_the_bound(tmp_path):
    header = {f"t{i}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]} for i in range(50_001)}
    refused(tmp_path, join(header, b""), r"not a valid \.safetensors file \(50,001 tensors; attn_inject reads files of")


def test_a_duplicate_tensor_name_is_refused_by_name(tmp_path, small):
    header, data = split(small["raw"])
    text = json.dumps(header, separators=(",", ":"))
    entry = '"conv1.0.weight":' + json.dumps(header["conv1.0.weight"], separators=(",", ":"))
    assert entry in text
    doubled = text.replace(entry, f"{entry},{entry}")
    refused(
        tmp_path, join(doubled, data), r"not a valid \.safetensors file \(the header names 'conv1\.0\.weight' twice\)"
    )


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda h: h["conv1.0.weight"].update(dtype="F33"), r"tensor 'conv1\.0\.weight' has the unknown dtype 'F33'"),
        (
            lambda h: h["conv1.0.weight"].update(shape=[[[[[[[[]]]]]]]]),
            r"tensor 'conv1\.0\.weight' has the shape \[\[\[\[",
        ),
        (
            lambda h: h["conv1.0.weight"].update(shape=[24, 3, 3, 4]),
            r"tensor 'conv1\.0\.weight' of shape \[24, 3, 3, 4\]",
        ),
        (
            lambda h: h["fc.bias"].update(data_offsets=[0, 40]),
            r"tensor 'fc\.bias' of shape \[1000\] and dtype F32 spans 40",
        ),
        (lambda h: h["__metadata__"].update({"attn_inject.content": 5}), r"a metadata value is not a string"),
    ],
)
def test_header_entries_are_checked(tmp_path, small, change, message):
    header, data = split(small["raw"])
    change(header)
    refused(tmp_path, join(header, data), r"f\.safetensors: not a valid \.safetensors file \(" + message)


def test_a_deeply_nested_header_is_refused(tmp_path):
    raw = join('{"x":' + "[" * 100_000 + "]" * 100_000 + "}", b"")
    refused(tmp_path, raw, r"not a valid \.safetensors file \(the header is nested too deeply\)")


# ---------------------------------------------------------------------------------------------
# the recipe


@pytest.mark.parametrize(
    "change,message",
    [
        (
            lambda r: r.update(num_classes=10**40),
            r"recipe field 'recipe\.num_classes' must be null or an int from 0 to 100,000",
        ),
        (
            lambda r: r.update(injections=r["injections"] * 9),
            r"recipe field 'recipe\.injections' holds 9 injections; a file may replay at most 8",
        ),
        (
            first_injection(lambda inj: inj.update(rules=inj["rules"] * 17)),
            r"recipe field 'injections\[0\]\.rules' holds 17 rules; an injection takes at most 16",
        ),
        (
            first_injection(lambda inj: inj.update(input_shapes=[[1, 3, 18258, 18258]])),
            r"recipe field 'injections\[0\]\.input_shapes' asks for more than a file may: the shape \[1, 3, 18258,"
            r" 18258\] is not 8 or fewer sizes up to 4096",
        ),
        (
            first_injection(lambda inj: inj.update(input_shapes=[[64, 3, 4096, 4096]])),
            r"recipe field 'injections\[0\]\.input_shapes' asks for more than a file may: 3,221,225,472 example values,"
            r" more than the 50,331,648 of one 3x4096x4096 image",
        ),
        (
            first_injection(lambda inj: inj.update(input_shapes=[[1, 3, 8, 8]] * 9)),
            r"recipe field 'injections\[0\]\.input_shapes' asks for more than a file may: 9 example tensors,"
            r" more than 8",
        ),
        (
            first_injection(lambda inj: inj.update(options={"kernel_size": json.loads("[" * 20 + "]" * 20)})),
            r"recipe: the recipe is nested more than 16 levels deep",
        ),
        (
            lambda r: r.update(arch="x" * 300_000),
            r"recipe: the recipe is 300,\d{3} characters; recipes are at most 262,144",
        ),
    ],
)
def test_a_recipe_asking_for_too_much_is_refused_before_anything_is_built(tmp_path, small, change, message):
    raw = with_recipe(small["raw"], change)
    refused(tmp_path, raw, r"f\.safetensors: recipe: " + message.removeprefix(r"recipe: "))
    with pytest.raises(AttnInjectError, match=message):
        describe_file(tmp_path / "f.safetensors")


def test_an_example_input_larger_than_the_models_configured_size_allows(tmp_path, small):
    raw = with_recipe(small["raw"], first_injection(lambda inj: inj.update(input_shapes=[[1, 3, 4096, 4096]])))
    refused(
        tmp_path,
        raw,
        r"f\.safetensors: injection 0 \(eca\) records the example input \[\[1, 3, 4096, 4096\]\]: 50,331,648 example"
        r" values, more than 4x the 76,800 of one image of the model's configured input size \(3, 160, 160\); a file"
        r" may ask load\(\) for no more",
    )
    base = load_pretrained(small["base"], ARCH)
    adapter = with_recipe(
        small["adapter"].read_bytes(), first_injection(lambda i: i.update(input_shapes=[[5, 3, 160, 160]]))
    )
    (tmp_path / "a.safetensors").write_bytes(adapter)
    with pytest.raises(
        AttnInjectError, match=r"records the example input \[\[5, 3, 160, 160\]\]: 384,000 example values"
    ):
        apply_adapter(base, tmp_path / "a.safetensors")
    assert recipe_of(base).injections == ()
    within = with_recipe(small["raw"], first_injection(lambda inj: inj.update(input_shapes=[[2, 3, 64, 64]])))
    (tmp_path / "ok.safetensors").write_bytes(within)
    assert torch.equal(load(tmp_path / "ok.safetensors")(X), small["reference"](X))  # within bounds: the same model


def test_num_classes_from_the_caller_is_bounded_too(small):
    with pytest.raises(AttnInjectError, match=r"^num_classes must be an int from 0 to 100,000, not 10000000000"):
        load(small["model"], num_classes=10**40)
    with pytest.raises(AttnInjectError, match=r"num_classes must be an int from 0 to 100,000, not -1"):
        create_model(ARCH, num_classes=-1)


# ---------------------------------------------------------------------------------------------
# every tensor against the rebuilt model


def test_a_file_of_another_dtype_is_refused_unless_the_caller_asks_for_a_conversion(tmp_path, small):
    header, _ = split(small["raw"])
    raw = small["raw"]
    for name, entry in header.items():
        if name != "__metadata__" and entry["dtype"] == "F32":
            raw = with_tensor(raw, name, load_file(small["model"])[name].half())
    refused(
        tmp_path,
        raw,
        r"f\.safetensors: the file's weights do not fit ResNet: conv1\.0\.weight is float16 where the model holds"
        r" float32\. Pass dtype=torch\.float16 to load\(\) to convert the file's tensors\.",
    )
    half = load(tmp_path / "f.safetensors", dtype=torch.float16)
    stored = load_file(tmp_path / "f.safetensors")
    assert all(
        torch.equal(half.state_dict()[k], v) and half.state_dict()[k].dtype == v.dtype for k, v in stored.items()
    )
    int8 = with_tensor(small["raw"], "conv1.0.weight", torch.zeros(16, 3, 3, 3, dtype=torch.int8))
    refused(
        tmp_path,
        int8,
        r"conv1\.0\.weight is int8 where the model holds float32\. The file is damaged or was edited",
        name="f.safetensors",
        dtype=torch.float16,
    )


@pytest.mark.parametrize(
    "name,value",
    [
        ("layer1.0.conv1.weight", float("nan")),
        ("layer2.0.se.conv.weight", float("inf")),
        ("bn1.running_var", -float("inf")),
    ],
)
def test_non_finite_values_are_refused_naming_the_tensor(tmp_path, small, name, value):
    tensor = load_file(small["model"])[name].clone()
    tensor.view(-1)[0] = value
    refused(
        tmp_path,
        with_tensor_bytes(small["raw"], name, tensor),
        rf"f\.safetensors: the file's tensor {name.replace('.', '[.]')} holds NaN or infinite values"
        r"\. The file is damaged, or was saved from a model whose training diverged\.",
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_the_finite_check_is_not_fooled_by_a_sum_that_overflows(dtype):
    """The check sums first: large finite values whose sum overflows are still finite."""
    large = torch.full((64,), torch.finfo(dtype).max / 2).to(dtype)
    check_finite({"w": large}, Path("f.safetensors"))
    for bad in (float("nan"), float("inf"), -float("inf")):
        damaged = large.float().clone()
        damaged[-1] = bad
        with pytest.raises(AttnInjectError, match=r"the file's tensor w holds NaN or infinite values"):
            check_finite({"w": damaged.to(dtype)}, Path("f.safetensors"))


def test_an_injected_tensor_of_the_wrong_shape_is_refused(tmp_path, small):
    raw = with_tensor(small["raw"], "layer1.0.se.conv.weight", torch.zeros(1, 1, 5))
    refused(
        tmp_path,
        raw,
        r"f\.safetensors: the file does not hold what its recipe builds: layer1\.0\.se\.conv\.weight has shape"
        r" \[1, 1, 5\] where the model needs \[1, 1, 3\]\. The file is damaged or was edited",
    )
    adapter = with_tensor(small["adapter"].read_bytes(), "layer1.0.se.conv.weight", torch.zeros(1, 1, 5))
    (tmp_path / "a.safetensors").write_bytes(adapter)
    base = load_pretrained(small["base"], ARCH)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(
        AttnInjectError,
        match=r"a\.safetensors: the adapter's tensors do not fit its blocks: layer1\.0\.se\.conv\.weight has shape"
        r" \[1, 1, 5\] where the model needs \[1, 1, 3\]",
    ):
        apply_adapter(base, tmp_path / "a.safetensors")
    assert base.state_dict().keys() == before.keys() and all(
        torch.equal(base.state_dict()[k], v) for k, v in before.items()
    )


def test_an_adapter_on_a_base_of_another_dtype_says_so(small):
    base = load_pretrained(small["base"], ARCH).half()
    with pytest.raises(
        AttnInjectError,
        match=r"adapter\.safetensors: the adapter was made for test_resnet \(92 tensors\) with float32 weights;"
        r" ResNet has the same tensors in other dtypes \(float16\)"
        r"\. Convert the base first \(model\.to\(torch\.float32\)\)",
    ):
        apply_adapter(base, small["adapter"])
    assert recipe_of(base).injections == ()


# ---------------------------------------------------------------------------------------------
# save refuses what load would refuse; canonical bytes


def test_save_refuses_non_finite_weights_and_oversized_examples(tmp_path, small):
    model = load(small["model"])
    with torch.no_grad():
        model.fc.weight[0, 0] = float("nan")
    with pytest.raises(AttnInjectError, match=r"m\.safetensors: the file's tensor fc\.weight holds NaN or infinite"):
        save(model, tmp_path / "m.safetensors")
    big = inject(look_trained(create_model(ARCH)), "eca", "residual", example_input=torch.randn(5, 3, 160, 160))
    with pytest.raises(
        AttnInjectError,
        match=r"the model's recipe: injection 0 \(eca\) records the example input \[\[5, 3, 160, 160\]\]: 384,000"
        r" example values, more than 4x .* inject\(\) with a smaller example_input",
    ):
        save(big, tmp_path / "m.safetensors")
    assert os.listdir(tmp_path) == []


def test_identical_saves_are_byte_identical_with_a_canonical_header(tmp_path, small):
    model = small["reference"]
    first = save(model, tmp_path / "a.safetensors").read_bytes()
    assert all(save(model, tmp_path / f"{i}.safetensors").read_bytes() == first for i in range(3))
    header, _ = split(first)
    assert next(iter(header)) == "__metadata__" and list(header["__metadata__"]) == sorted(header["__metadata__"])
    recipe_text = header["__metadata__"]["attn_inject.recipe"]
    assert recipe_text == json.dumps(json.loads(recipe_text), sort_keys=True, separators=(",", ":"))
    adapter = save(model, tmp_path / "ad1.safetensors", adapter_only=True).read_bytes()
    assert save(model, tmp_path / "ad2.safetensors", adapter_only=True).read_bytes() == adapter


def test_two_patch_runs_write_the_same_bytes(tmp_path, capsys, small):
    outputs = []
    for name in ("one", "two"):
        argv = ["patch", small["base"], "--arch", ARCH, "--block", "eca", "--after", "residual", "--output"]
        code, _, err = run_cli_one_line(capsys, *argv, tmp_path / f"{name}.safetensors", "--img-size", "64")
        assert code == 0, err
        outputs.append((tmp_path / f"{name}.safetensors").read_bytes())
    assert outputs[0] == outputs[1]


def test_patch_refuses_an_img_size_whose_file_load_would_refuse(tmp_path, capsys, small):
    argv = ["patch", small["base"], "--arch", ARCH, "--block", "eca", "--after", "residual", "--img-size", "400"]
    code, _, err = run_cli_one_line(capsys, *argv, "--output", tmp_path / "o.safetensors")
    assert code == 1 and err == (
        "error: --img-size 400 gives 480,000 example values, more than 4x the 76,800 of one image of the model's "
        "configured input size (3, 160, 160); load() refuses files that ask for more. Use a smaller --img-size "
        "(up to twice the model's configured side)."
    )
    assert os.listdir(tmp_path) == []


def test_the_writer_round_trips_every_dtype_through_safetensors(tmp_path):
    tensors = {
        "f32": torch.randn(3, 4),
        "bf16": torch.randn(5).bfloat16(),
        "f16": torch.randn(2, 2).half(),
        "i64": torch.tensor(7),
        "bool": torch.tensor([True, False, True]),
        "u8": torch.arange(5, dtype=torch.uint8),
        "empty": torch.zeros(0, 3),
    }
    write_safetensors(tmp_path / "w.safetensors", tensors, {"format": "pt", "z": "1", "a": {"b": 2, "a": [1]}})
    back = load_file(tmp_path / "w.safetensors")
    assert back.keys() == tensors.keys() and all(
        torch.equal(back[k], v) and back[k].dtype == v.dtype for k, v in tensors.items()
    )
    header, _ = split((tmp_path / "w.safetensors").read_bytes())
    assert header["__metadata__"] == {"a": '{"a":[1],"b":2}', "format": "pt", "z": "1"}
    # largest elements first (each tensor stays aligned), by name within a size
    assert list(header)[1:] == ["i64", "empty", "f32", "bf16", "f16", "bool", "u8"]


def test_load_and_apply_adapter_check_their_arguments_and_read_errors(small, monkeypatch):
    with pytest.raises(AttnInjectError, match=r"^map_location='bogus' is not a device \(RuntimeError: "):
        load(small["model"], map_location="bogus")
    with pytest.raises(AttnInjectError, match=r"^dtype must be a floating-point torch\.dtype, not torch\.int8"):
        load(small["model"], dtype=torch.int8)
    with pytest.raises(AttnInjectError, match=r"^model must be a torch\.nn\.Module, not str"):
        apply_adapter("resnet", small["adapter"])

    def failing_disk(*_):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(container, "read_exactly_at_most", failing_disk)
    with pytest.raises(
        AttnInjectError, match=r"model\.safetensors: cannot read the \.safetensors file: Input/output error"
    ):
        load(small["model"])


def test_inspect_shows_what_a_file_says_as_text_not_markup(tmp_path, capsys, small):
    raw = with_recipe(small["raw"], lambda r: r.update(arch="[/x] [bold]evil"))
    (tmp_path / "f.safetensors").write_bytes(raw)
    code, out, err = run_cli_one_line(capsys, "inspect", tmp_path / "f.safetensors")
    assert code == 0, err
    assert "[/x] [bold]evil" in " ".join(out.split())
