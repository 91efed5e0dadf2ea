"""A patched model through torch.compile, torch.jit.trace, torch.export and ONNX (onnxruntime).

Every model here has its attention blocks moved away from the identity init (random SE ``fc2``,
random ECA ``conv``) and realistic BatchNorm statistics, so a block that went missing from the
compiled / traced / exported program changes the outputs; each test also counts the blocks'
gates in the program itself (one tanh each: the gain-2 gate is ``x + x * tanh(z / 2)``). Outputs
are compared with the eager outputs of the same patched model: bitwise for jit.trace and
torch.export (the same aten kernels run), with a float tolerance for inductor and onnxruntime
(other kernels, fused and reordered).

What does not work, and why (see BENCHMARKS.md, "Export"):
- A forward with data-dependent control flow (``if x.mean() > ...``, BranchyNet) cannot be
  exported by torch.export, nor therefore by the ONNX exporter, patched or not: the unpatched
  model fails the same way. torch.compile (graph break) and jit.trace (records the taken branch)
  work. A forward branching on a *shape* is untraceable by fx but exports fine (ShapeBranchyNet).
- torch.jit.script does not support the instance-attribute forward (README, "Limits").

Run: .venv/bin/python -m pytest tests/test_export.py -v   (-m slow adds mobilenet_v2 compile)
"""

from __future__ import annotations

import copy
import functools
import warnings
from dataclasses import dataclass

import numpy as np
import pytest
import timm
import torch
import torchvision
from torch import nn

from attn_inject import inject
from attn_inject.blocks import SqueezeExcite
from attn_inject.finetune import attention_blocks
from attn_inject.testing import look_trained
from tests.helpers.inductor import compile_and_run, graph_gates
from tests.helpers.running import outputs
from tests.helpers.tiny_models import BranchyNet, InplaceBasic, MethodAddInverted, conv_bn

X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
X_OTHER = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(2))  # another batch size


class ShapeBranchyNet(nn.Module):
    """A top-level forward that branches on a shape: fx cannot trace it, torch.export can."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(*conv_bn(3, 16), nn.ReLU(inplace=True))
        self.block1 = InplaceBasic(16)
        self.block2 = MethodAddInverted(16)
        self.block3 = InplaceBasic(32, stride=2)
        self.head = nn.Linear(32, num_classes)

    def forward(self, x):
        x = self.stem(x)
        if x.shape[-1] >= 32:  # Python control flow on a shape: export specialises on it
            x = self.block1(x)
        x = self.block3(self.block2(x))
        return self.head(x.mean((2, 3)))


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: on the 2 shared cores, two OpenMP threads spinning against other
    processes made single calls take seconds instead of milliseconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@dataclass
class Case:
    model: nn.Module  # patched, eval mode, blocks not at the identity
    blocks: int  # attention blocks inserted
    reference: torch.Tensor  # eager output of the patched model on X
    unpatched: nn.Module  # the same model before inject (same weights)


# name: (factory, block, rule, blocks, top-level forward traceable by fx)
MODELS = {
    "timm_resnet18_se": (lambda: timm.create_model("resnet18", num_classes=10), "se", "basic", 8, True),
    "tv_mobilenet_v2_eca": (
        lambda: torchvision.models.mobilenet_v2(num_classes=10),
        "eca",
        "inverted_residual",
        10,
        True,
    ),
    "branchy_se": (BranchyNet, "se", "residual", 4, False),  # data-dependent `if` at the top
    "shape_branchy_eca": (ShapeBranchyNet, "eca", "residual", 3, False),  # shape-dependent `if` at the top
}


# Random norm affines (fresh timm ResNets zero each branch's last BN, which would hide a branch-end
# block) and BatchNorm statistics measured on one batch (fresh ones make some outputs ~1e-9, which
# would hide any difference under an absolute tolerance): attn_inject.testing.look_trained with it.
CALIBRATION = torch.randn(8, 3, 64, 64, generator=torch.Generator().manual_seed(3))


def block_params(model: nn.Module) -> set[str]:
    return {f"{path}.{p}" for path, b in attention_blocks(model).items() for p, _ in b.named_parameters()}


def away_from_identity(model: nn.Module) -> None:
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for block in attention_blocks(model).values():
            if isinstance(block, SqueezeExcite):  # an input-dependent gate, not just a per-channel constant
                block.fc2.weight.copy_(torch.randn(block.fc2.weight.shape, generator=g) * 0.5)
                block.fc2.bias.copy_(torch.randn(block.fc2.bias.shape, generator=g))
            else:
                block.conv.weight.copy_(torch.randn(block.conv.weight.shape, generator=g))


@functools.cache
def case(name: str) -> Case:
    """Built once per session; tests must not modify the model."""
    factory, block, rule, blocks, traceable = MODELS[name]
    torch.manual_seed(0)
    model = look_trained(factory(), CALIBRATION, seed=3)
    unpatched = copy.deepcopy(model)
    if not traceable:  # the premise: fx cannot trace the top-level forward (inject runs it eagerly)
        with pytest.raises(torch.fx.proxy.TraceError):
            torch.fx.symbolic_trace(copy.deepcopy(model))
    inject(model, block, after=rule, example_input=X[:1], verify=True)
    assert len(attention_blocks(model)) == blocks
    away_from_identity(model)
    with torch.no_grad():
        reference = model(X)
        # the blocks matter: the patched model is far from the unpatched one
        assert (reference - unpatched(X)).abs().max() > 1e-2 * reference.abs().max()
    return Case(model, blocks, reference, unpatched)


def report_diff(backend: str, name: str, out: torch.Tensor, ref: torch.Tensor) -> None:
    print(
        f"\n{backend} {name}: max abs diff to eager {(out - ref).abs().max().item():.3g} "
        f"(output scale {ref.abs().max().item():.3g})"
    )


# ---------------------------------------------------------------- torch.jit.trace


@pytest.mark.parametrize("name", list(MODELS))
def test_jit_trace_is_bitwise_equal(name):
    c = case(name)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # BranchyNet: the `if` on a tensor is frozen
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.trace is deprecated in 2.14
        traced = torch.jit.trace(c.model, X, check_trace=False)
    kinds = [n.kind() for n in traced.inlined_graph.nodes()]
    assert kinds.count("aten::tanh") == c.blocks
    out = outputs(traced, X)
    report_diff("jit.trace", name, out, c.reference)
    assert torch.equal(out, c.reference)
    assert torch.equal(outputs(traced, X_OTHER), outputs(c.model, X_OTHER))  # not specialised on the batch size


# ---------------------------------------------------------------- torch.export

EXPORTABLE = ["timm_resnet18_se", "tv_mobilenet_v2_eca", "shape_branchy_eca"]


def gates(ep: torch.export.ExportedProgram) -> int:
    return sum(1 for n in ep.graph.nodes if n.target is torch.ops.aten.tanh.default)


def used_params(ep: torch.export.ExportedProgram) -> set[str]:
    to_param = ep.graph_signature.inputs_to_parameters  # placeholder name -> parameter name
    return {to_param[n.name] for n in ep.graph.nodes if n.op == "placeholder" and n.name in to_param and n.users}


@pytest.mark.parametrize("name", EXPORTABLE)
def test_export_is_bitwise_equal(name):
    c = case(name)
    ep = torch.export.export(c.model, (X,))
    assert gates(ep) == c.blocks
    assert block_params(c.model) <= used_params(ep)  # every block weight feeds the exported graph
    out = ep.module()(X)
    report_diff("export", name, out, c.reference)
    assert torch.equal(out, c.reference)


@pytest.mark.parametrize("name", EXPORTABLE)
def test_export_with_dynamic_batch(name):
    c = case(name)
    batch = torch.export.Dim("batch", min=1, max=64)
    ep = torch.export.export(c.model, (X,), dynamic_shapes=({0: batch},))
    assert gates(ep) == c.blocks
    module = ep.module()
    for x in (X_OTHER, X_OTHER[:1]):
        assert torch.equal(module(x), outputs(c.model, x))


def test_export_of_data_dependent_branch_fails_as_for_the_unpatched_model():
    """torch.export cannot guard on ``if x.mean() > -1e9``: the model's own limit, not the patch's.
    (The ONNX exporter runs torch.export first and fails with the same cause.)"""
    c = case("branchy_se")
    errors = []
    for model in (c.unpatched, c.model):
        with pytest.raises(Exception) as info:
            torch.export.export(model, (X,))
        errors.append(info.value)
    assert type(errors[0]) is type(errors[1])
    assert type(errors[1]).__name__ == "GuardOnDataDependentSymNode" and "x.mean() > -1e9" in str(errors[1])


# ---------------------------------------------------------------- ONNX (dynamo exporter) + onnxruntime


def onnx_session(model: nn.Module, **kwargs):
    import onnxruntime as ort

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model, (X,), dynamo=True, verbose=False, **kwargs)  # dynamo: the default in 2.14
    proto = program.model_proto
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return proto, session


def run_onnx(session, x: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.asarray(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]))


@pytest.mark.parametrize("name", EXPORTABLE)
def test_onnx_with_dynamic_batch_matches_eager_in_onnxruntime(name):
    c = case(name)
    proto, session = onnx_session(c.model, dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=64)},))
    assert [n.op_type for n in proto.graph.node].count("Tanh") == c.blocks
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # a symbolic batch, not 2
    out = run_onnx(session, X)
    report_diff("onnx", name, out, c.reference)
    torch.testing.assert_close(out, c.reference, rtol=1e-4, atol=1e-5)
    for x in (X_OTHER, X_OTHER[:1]):
        torch.testing.assert_close(run_onnx(session, x), outputs(c.model, x), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- torch.compile (inductor, CPU)


@pytest.mark.parametrize(
    "name,fullgraph",
    [
        ("timm_resnet18_se", True),  # the patched forwards compile without a graph break
        ("branchy_se", False),  # one graph break, at its data-dependent `if`; the 4 blocks compile after it
        pytest.param("tv_mobilenet_v2_eca", True, marks=pytest.mark.slow),  # ~35 s on a cold inductor cache
    ],
)
def test_compile_matches_eager(name, fullgraph):
    c = case(name)
    out, graphs = compile_and_run(c.model, X, fullgraph)
    assert sum(graph_gates(g) for g in graphs) == c.blocks
    if not fullgraph:
        assert len(graphs) >= 2
    report_diff("compile", name, out, c.reference)
    torch.testing.assert_close(out, c.reference, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- torch.jit.script


def test_jit_script_is_not_supported():
    """The unpatched model scripts; a patched one does not: TorchScript compiles ``forward`` from
    its source via ``__globals__``, which the PatchedForward instance attribute does not have."""
    c = case("branchy_se")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated in 2.14
        scripted = torch.jit.script(c.unpatched)
        assert torch.equal(outputs(scripted, X), outputs(c.unpatched, X))
        with pytest.raises(AttributeError, match="__globals__"):
            torch.jit.script(c.model)
