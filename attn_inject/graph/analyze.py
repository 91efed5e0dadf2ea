"""One example forward that traces every module on the way and records what matching needs.

Each module met during the forward is traced on its own (children as leaves) and its graph is
run by an fx Interpreter with the real arguments it was called with; a child call recurses into
the child. That gives, for every node, the shape and dtype it produced, and for every module the
convs and norms on its main path (what its parent sees through it). A module whose forward cannot
be traced, or whose graph fails on the real arguments, runs eagerly, and the calls it makes to
its children are analysed as they happen (and its own conv units found: opaque_calls.py). Every
tensor a traced module receives is linked to the caller's node that produced it (dataflow.py
follows residuals with it).

Nothing here changes the model: tracing works on detached copies, and the model runs in eval
mode under no_grad (the caller sets and restores the mode).
"""

from __future__ import annotations

import dataclasses
import inspect
import weakref
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.fx.immutable_collections import immutable_dict, immutable_list

from ..errors import one_line
from ..fx_compat import flat_inputs, module_slots_held, pytree_info
from ..patched import Absent, TensorSeq, patched_forward
from .align import align
from .bitsets import GraphBits
from .call_trail import CallTrail
from .example import example_forward_failed
from .folding import Fold, find_fold
from .meta_run import ValuesNeeded, on_meta, to_meta, values_needed
from .nodes import (
    CONV_TYPES,
    META_KEY,
    LearnedOp,
    NodeFacts,
    function_op,
    is_primitive,
    join_path,
    module_kind,
    module_op,
    shape_of,
    shape_of_value,
    target_path,
)
from .opaque_calls import OpaqueUnit, PrimitiveCalls, conv_units
from .replay import Replay
from .trace import TraceFailure, TraceResult, bound_on_instance
from .trace_cache import TraceCache


@dataclass(eq=False)
class ModuleRecord:
    """One module as called with one pattern of None arguments."""

    path: str
    module: nn.Module
    method: str
    fixed: frozenset  # (name, value) arguments baked into the graph: the Nones, and scalars if needed
    graph: fx.Graph | None = None  # eval-mode graph; nodes carry NodeFacts (nodes.facts)
    train_graph: fx.Graph | None = None  # set only when the train-mode trace differs
    train_names: dict[str, str] = field(default_factory=dict, repr=False)  # eval node -> its train node (align.py)
    train_reason: str | None = None  # why the train-mode trace failed
    reason: str | None = None  # why the module could not be traced
    constants: dict = field(default_factory=dict)  # tensors fx stowed as attributes during tracing
    ops: tuple[LearnedOp, ...] = ()  # learned ops on its main path, gates excluded
    bits: GraphBits | None = None
    unit: tuple[LearnedOp, ...] = ()  # set when the module ends a conv unit of an untraceable parent
    folds: str | None = None  # the method that folds its branches (folding.py): one unit, never edited
    folded: Analysis | None = field(default=None, repr=False)  # the analysis of its folded copy
    # tensor placeholder -> (record, node) of the caller's graph that produced that tensor
    sources: dict[fx.Node, tuple[ModuleRecord, fx.Node]] = field(default_factory=dict, repr=False)

    @property
    def traced(self) -> bool:
        return self.graph is not None

    @property
    def traced_graph(self) -> fx.Graph:
        """The eval-mode graph of a traced record."""
        if self.graph is None:
            raise TypeError(f"{self.path or '<model>'} was not traced")
        return self.graph

    @property
    def traced_bits(self) -> GraphBits:
        """The bitsets of a traced record's graph."""
        if self.bits is None:
            raise TypeError(f"{self.path or '<model>'} was not traced")
        return self.bits

    def node(self, name: str, train: bool = False) -> fx.Node | None:
        """The node called ``name`` in the eval-mode graph (or the train-mode one)."""
        graph = self.train_graph if train else self.graph
        return next((n for n in graph.nodes if n.name == name), None) if graph is not None else None


@dataclass
class Analysis:
    model: nn.Module
    records: list[ModuleRecord] = field(default_factory=list)
    called: dict[int, None] = field(default_factory=dict)  # id() of every module a traced graph called, leaves
    # too, in the order first called (call_trail.py takes what a call added)
    traces: TraceCache = field(default_factory=TraceCache, repr=False)  # shared by every trace of this analysis

    def traced(self) -> list[ModuleRecord]:
        return [r for r in self.records if r.traced]

    def untraced(self) -> list[ModuleRecord]:
        """Modules fx could not trace (or whose graph failed): they run as they are."""
        return [r for r in self.records if not r.traced and r.folds is None]

    def folding(self) -> list[ModuleRecord]:
        """Modules that fold their branches (folding.py): each is one unit, its forward never edited."""
        return [r for r in self.records if r.folds is not None]

    def unreached(self) -> list[str]:
        """Outermost modules holding convolutions that the analysis never saw called, directly or
        through a descendant (a ModuleList, or an nn.Sequential its parent iterates, is reached
        through its members)."""
        seen = {id(r.module) for r in self.records} | self.called.keys()
        missed: list[str] = []
        for path, module in self.model.named_modules():
            if is_primitive(module) or any(path.startswith(p + ".") for p in missed):
                continue
            inside = list(module.modules())
            if not any(id(m) in seen for m in inside) and any(isinstance(m, CONV_TYPES) for m in inside):
                missed.append(path)
        return missed


_SCALARS = (int, float, bool, str)


def _is_scalar(value: Any) -> bool:
    """A hashable constant a graph may be specialised on: a scalar or a tuple of scalars (a size)."""
    if type(value) is tuple:
        return bool(value) and all(type(v) in _SCALARS for v in value)
    return type(value) in _SCALARS


def _structural_arguments(bound: inspect.BoundArguments) -> frozenset:
    """Arguments every trace fixes: the Nones, lists/tuples of tensors (by type and length) and
    dicts of tensors (by type and keys: torchvision's FPN takes an OrderedDict of feature maps),
    so that ``if x is None`` / ``isinstance(x, list)`` / ``x.keys()`` take the branch the call takes."""
    fixed: set[tuple[str, TensorSeq | None]] = set()
    for name, value in bound.arguments.items():
        if value is None:
            fixed.add((name, None))
        elif type(value) in (list, tuple) and value and all(isinstance(v, torch.Tensor) for v in value):
            fixed.add((name, TensorSeq(type(value), len(value))))
        elif (
            type(value) in (dict, OrderedDict)
            and value
            and all(type(k) is str for k in value)
            and all(isinstance(v, torch.Tensor) for v in value.values())
        ):
            fixed.add((name, TensorSeq(type(value), len(value), tuple(value))))
    return frozenset(fixed)


def root_method(model: nn.Module) -> str:
    """The method analysed and patched on the top-level model: timm's forward_features if present.

    timm's forward() calls self.forward_features(), so patching that keeps both entry points
    consistent; for other models it is forward().
    """
    return "forward_features" if callable(getattr(type(model), "forward_features", None)) else "forward"


def analyze(
    model: nn.Module,
    args: tuple,
    kwargs: dict | None = None,
    *,
    trail: CallTrail | None = None,
    replay: Replay | None = None,
) -> Analysis:
    """Run the example forward through the model, tracing and recording as it goes.

    ``trail`` follows the calls (the meta run: call_trail.py); ``replay`` hands this run outputs the
    reference forward kept (replay.py): with the meta run's records for the calls it completed, and
    for later calls with records made on the meta device then, where that needs no values."""
    analysis = Analysis(model)
    try:
        with torch.no_grad(), module_slots_held():  # one class patch for all the traces (fx_compat)
            _Analyzer(analysis, trail=trail, replay=replay).run_root(model, args, kwargs or {}, root_method(model))
    except Exception as exc:  # the user's model failed on the example input
        raise example_forward_failed(model, exc, args) from None
    return analysis


_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks_always_called",
)


@contextmanager
def _own_hooks_set_aside(module: nn.Module) -> Iterator[None]:
    """The module's own forward hooks and pre-hooks emptied, and restored (same dict objects) on exit:
    the real call around its analysis runs them, and they must not run twice (timm's
    ``feature_cls="hook"`` would keep the repeat's outputs in its state)."""
    saved = {name: hooks for name in _HOOK_DICTS if (hooks := module.__dict__.get(name))}
    for name, hooks in saved.items():
        object.__setattr__(module, name, type(hooks)())
    try:
        yield
    finally:
        for name, hooks in saved.items():
            object.__setattr__(module, name, hooks)


def call_method(module: nn.Module, method: str, args: tuple, kwargs: dict) -> Any:
    return module(*args, **kwargs) if method == "forward" else getattr(module, method)(*args, **kwargs)


def forward_signature(module: nn.Module, method: str) -> inspect.Signature:
    installed = patched_forward(module, method)
    if installed is not None:
        return installed.__signature__
    bound = bound_on_instance(module, method)
    if bound is not None:
        return inspect.signature(bound)
    params = list(inspect.signature(getattr(type(module), method)).parameters.values())[1:]
    return inspect.Signature(params)


class _Analyzer:
    def __init__(
        self,
        analysis: Analysis,
        traces: TraceCache | None = None,
        trail: CallTrail | None = None,
        replay: Replay | None = None,
    ):
        self.analysis = analysis
        self.trail, self.replay = trail, replay
        self.seen: dict[tuple, ModuleRecord] = {}
        self.folds: dict[int, str | None] = {}  # module structure -> the method that folds it, or None
        self.fold_of: dict[int, Fold | None] = {}  # id(module) -> how it folds
        # one scope per module being run: id(tensor) -> (weakref, record, node) of its graph's nodes
        # that produced it; None for a module run eagerly (its data flow is not seen)
        self.scopes: list[dict[int, tuple] | None] = []
        self.intercepting: object | None = None  # the untraceable module whose calls are analysed in place
        self.traces = traces or analysis.traces  # modules built alike are traced once

    def produced(self, value: Any, record: ModuleRecord, node: fx.Node) -> None:
        """Remember ``node`` as the producer of a tensor, or of the tensors a container holds."""
        scope = self.scopes[-1]
        if scope is None:  # an eager module: its data flow is not followed
            return
        items = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else (value,)
        for item in items:
            if isinstance(item, torch.Tensor):
                scope[id(item)] = (weakref.ref(item), record, node)

    def producer(self, value: Any, depth: int = 2) -> tuple[ModuleRecord, fx.Node] | None:
        """The caller's node that produced this tensor argument, if the caller was traced (its scope
        is ``depth`` from the top: 2 inside the callee's own scope, 1 before it is entered)."""
        caller = self.scopes[-depth] if len(self.scopes) >= depth else None
        entry = caller.get(id(value)) if caller is not None and isinstance(value, torch.Tensor) else None
        return entry[1:] if entry is not None and entry[0]() is value else None

    def run(self, module: nn.Module, path: str, args: tuple, kwargs: dict, method: str = "forward") -> Any:
        out, _ = self.run_recorded(module, path, args, kwargs, method)
        return out

    def run_root(self, model: nn.Module, args: tuple, kwargs: dict, method: str) -> Any:
        """The model's whole forward. Where the patched method is another one (timm's
        forward_features), the forward runs eagerly with that method traced and recorded where it
        is called, and the calls the forward makes itself (timm's forward_head: ``head``) analysed
        as they happen, as for an untraceable module; if the forward never calls that method, or
        its calls cannot be observed, the method alone is analysed."""
        if method == "forward":
            return self.run(model, "", args, kwargs)
        self.traces.structure(model)  # numbered before the stand-ins are put on the modules
        start, called_before = len(self.analysis.records), dict(self.analysis.called)
        out, refused = self._observed(model, "", "forward", args, kwargs, also=method)
        if refused is None and any(r.module is model and r.method == method for r in self.analysis.records[start:]):
            return out
        self._forget(start, called_before)
        return self.run(model, "", args, kwargs, method)

    def run_recorded(
        self, module, path, args, kwargs, method="forward", foldable=True
    ) -> tuple[Any, ModuleRecord | None]:
        self.analysis.called[id(module)] = None
        if is_primitive(module):
            return call_method(module, method, args, kwargs), None
        try:
            bound = forward_signature(module, method).bind(*args, **kwargs)
        except TypeError:
            return call_method(module, method, args, kwargs), None
        bound.apply_defaults()
        fold = self._fold(module, path, method) if foldable else None
        fixed = frozenset() if fold is not None else _structural_arguments(bound)
        key = (id(module), method, fixed)
        replayed = self._replayed(module, path, method, key, bound, (args, kwargs))
        if replayed is not None:
            return replayed
        if self.trail is None:
            return self._run_key(module, path, args, kwargs, method, bound, fold, key)
        self.trail.begin(self.analysis, self.seen, module)
        try:
            out = self._run_key(module, path, args, kwargs, method, bound, fold, key)
        except BaseException:
            self.trail.abandon()
            raise
        self.trail.end(self.analysis, self.seen, module, key)
        return out

    def _replayed(
        self,
        module: nn.Module,
        path: str,
        method: str,
        key: tuple,
        bound: inspect.BoundArguments,
        call: tuple[tuple, dict],
    ) -> tuple[Any, ModuleRecord] | None:
        """A kept output of the reference forward for this call (replay.py), and its record: the meta
        run's for a call of its frontier (adopted on first use), else one made on the meta device now."""
        replay = self.replay
        if replay is None or not replay.keeps(module):
            return None
        unit = replay.units.get(key)
        if unit is not None and key not in self.seen and not unit.analysed:
            return None  # a repeat whose first call is analysed on real tensors in this run, not yet met
        kept = replay.take(module, *call)
        if kept is None:
            return None
        if key not in self.seen:
            if unit is not None:
                own = {id(r) for r in unit.records}
                self.analysis.records.extend(unit.records)
                self.analysis.called.update(dict.fromkeys(unit.called))
                self.seen.update((k, r) for k, r in unit.seen if id(r) in own)
            elif self._analysed_on_meta(module, path, method, key, call) is None:
                return None  # it needs values: analysed on real tensors (the kept output unused)
            self._link_sources(self.seen[key], bound)
        replay.handed.append(path or "<model>")
        return kept[0], self.seen[key]

    def _analysed_on_meta(
        self, module: nn.Module, path: str, method: str, key: tuple, call: tuple[tuple, dict]
    ) -> ModuleRecord | None:
        """The call analysed on the meta device (a copy of its arguments there); None, with nothing
        recorded, if it needs values."""
        start, called_before = len(self.analysis.records), dict(self.analysis.called)
        args, kwargs = to_meta(call)
        record, watch = None, None
        try:
            with on_meta(module) as watch:
                meta_bound = forward_signature(module, method).bind(*args, **kwargs)
                meta_bound.apply_defaults()
                _, record = self._run_key(module, path, args, kwargs, method, meta_bound, None, key)
        except (Exception, ValuesNeeded):
            record = None
        if record is None or watch is None or watch.first or values_needed(self.analysis.records[start:]):
            self._forget(start, called_before)
            return None
        return record

    def _link_sources(self, record: ModuleRecord, bound: inspect.BoundArguments) -> None:
        """An adopted record's placeholders linked to the nodes of this run's caller that produced them."""
        record.sources = {}
        if record.graph is None:
            return
        values = iter(_placeholder_values(record, record.graph, bound))
        for node in record.graph.find_nodes(op="placeholder"):
            if node.target.startswith("*"):
                break  # *args: the rest is one list
            source = self.producer(next(values, None), depth=1)
            if source is not None:
                record.sources[node] = source

    def _run_key(
        self,
        module: nn.Module,
        path: str,
        args: tuple,
        kwargs: dict,
        method: str,
        bound: inspect.BoundArguments,
        fold: Fold | None,
        key: tuple,
    ) -> tuple[Any, ModuleRecord | None]:
        if key in self.seen:
            return call_method(module, method, args, kwargs), self.seen[key]
        record = self.seen[key] = ModuleRecord(path, module, method, key[2])
        self.analysis.records.append(record)
        if fold is not None:
            return self._run_folding(record, fold, args, kwargs), record
        try:
            traced = self._trace(record, bound)
        except TraceFailure as exc:
            record.reason = str(exc)
            return self._run_opaque(record, args, kwargs), record
        graph = record.graph = traced.graph
        record.constants = traced.constants
        self._trace_train_mode(record, traced)
        self.scopes.append({})
        try:
            leaves = _RecordingInterpreter(self, record).run(
                *_placeholder_values(record, graph, bound), enable_io_processing=False
            )
            out = graph.process_outputs(leaves)
        except Exception as exc:  # it traced, but its graph does not run as its forward does: run that
            record.graph = record.train_graph = None
            record.constants = {}
            record.reason = f"traced, but its graph failed on the example: {one_line(exc)}"
            return self._run_opaque(record, args, kwargs), record
        finally:
            self.scopes.pop()
        record.bits = GraphBits(graph)
        record.ops = record.bits.main_path_ops()
        return out, record

    def _fold(self, module: nn.Module, path: str, method: str) -> Fold | None:
        """How the module folds its branches, if it does (never the model itself: its output has no
        caller's graph to take a block). Told once per module structure."""
        if not path or method != "forward":
            return None
        if id(module) in self.fold_of:
            return self.fold_of[id(module)]
        structure = self.traces.structure(module)
        fold = None
        if self.folds.get(structure, "") is not None:
            with _stand_ins_lifted(module):  # a copy must not take the analysis' stand-ins along
                fold = find_fold(module)
            self.folds[structure] = None if fold is None else fold.method
        self.fold_of[id(module)] = fold
        return fold

    def _run_folding(self, record: ModuleRecord, fold: Fold, args: tuple, kwargs: dict) -> Any:
        """Run a module that folds its branches as it is; what its caller sees through it are the
        learned ops of its folded copy (analysed on the same arguments), the last conv named as
        the module itself: a block after that conv goes after the module."""
        record.folds = fold.method
        self.analysis.called.update(dict.fromkeys(id(m) for m in record.module.modules()))
        folded = Analysis(fold.folded)
        inner = _Analyzer(folded, self.traces)
        inner.folds = self.folds
        out, top = inner.run_recorded(fold.folded, record.path, args, kwargs, record.method, foldable=False)
        record.folded = folded
        if top is not None:
            ops = list(top.ops)
        else:  # it folds into a primitive (timm's ConvNorm.fuse() returns a Conv2d)
            op = module_op(fold.folded, record.path, shape_of_value(out))
            ops = [op] if op is not None else []
        last = max((i for i, op in enumerate(ops) if op.kind == "conv"), default=None)
        if last is not None:
            ops[last] = dataclasses.replace(ops[last], path=record.path)
        record.ops = tuple(ops)
        return call_method(record.module, record.method, args, kwargs)

    def _trace(self, record: ModuleRecord, bound: inspect.BoundArguments) -> TraceResult:
        """Trace with the structural arguments fixed; failing that, with the scalar ones fixed too."""
        try:
            return self.traces.trace(record.module, record.method, record.fixed, training=False)
        except TraceFailure:
            scalars = frozenset((k, v) for k, v in bound.arguments.items() if _is_scalar(v))
            if not scalars - record.fixed:
                raise
            traced = self.traces.trace(record.module, record.method, record.fixed | scalars, training=False)
            record.fixed = record.fixed | scalars
            return traced

    def _trace_train_mode(self, record: ModuleRecord, eval_traced: TraceResult) -> None:
        if not eval_traced.reads_training:
            return  # the forward never looked at self.training: both modes trace alike
        try:
            train = self.traces.trace(record.module, record.method, record.fixed, training=True)
        except TraceFailure as exc:
            record.train_reason = str(exc)
            return
        train_graph, constants, eval_graph = train.graph, train.constants, eval_traced.graph
        if train_graph.python_code("self").src != eval_graph.python_code("self").src:
            for node in train_graph.find_nodes(op="get_attr"):
                if node.target in constants:  # keep apart from the eval graph's constants
                    record.constants[f"{node.target}_train"] = constants[node.target]
                    node.target = f"{node.target}_train"
            record.train_graph = train_graph
            record.train_names = align(eval_graph, train_graph)

    def _run_opaque(self, record: ModuleRecord, args: tuple, kwargs: dict) -> Any:
        """Run an untraceable module eagerly; the calls it makes to its descendants are analysed in
        place (one pass: a call's output is the analysis' output). Where that cannot be observed
        (children called inside torch.cond), the module runs unobserved instead."""
        start, called_before = len(self.analysis.records), dict(self.analysis.called)
        out, refused = self._observed(record.module, record.path, record.method, args, kwargs)
        if refused is not None:  # forget what was seen of it, run it unobserved
            self._forget(start, called_before)
            out = call_method(record.module, record.method, args, kwargs)
            record.reason = f"{record.reason}; its children's calls cannot be observed ({type(refused).__name__})"
        record.ops = tuple(
            op
            for sub_path, sub in record.module.named_modules()
            if (op := module_op(sub, join_path(record.path, sub_path), None)) is not None
        )
        return out

    def _observed(
        self, module: nn.Module, path: str, method: str, args: tuple, kwargs: dict, also: str | None = None
    ) -> tuple[Any, Exception | None]:
        """Call ``module.<method>`` eagerly with its descendants' forwards (and its own method
        ``also``) standing in for analysed calls, and its own conv units found; returns the output,
        or the exception that refused the stand-ins (torch.cond & co.)."""
        token = object()
        stand_ins = [
            _AnalysedCall(self, token, sub, join_path(path, sub_path))
            for sub_path, sub in module.named_modules()
            if sub is not module
        ]
        if also is not None:
            stand_ins.append(_AnalysedCall(self, token, module, path, also))
        own = PrimitiveCalls(module, path, lambda: self.intercepting is token and not torch.compiler.is_compiling())
        outer, self.intercepting = self.intercepting, token
        self.scopes.append(None)  # an eager caller: its children's arguments have no known producers
        try:
            out = call_method(module, method, args, kwargs)
        except Exception as exc:  # torch.cond & co. refuse the stand-ins
            return None, exc
        finally:
            self.scopes.pop()
            self.intercepting = outer
            own.remove()
            for stand_in in reversed(stand_ins):
                stand_in.remove()
        for unit in conv_units(own.calls):
            self._unit_record(unit)
        return out, None

    def _forget(self, start: int, called_before: dict[int, None]) -> None:
        """Drop the records made since ``start`` and the calls seen since ``called_before``."""
        self.analysis.called = called_before
        dropped = {id(r) for r in self.analysis.records[start:]}
        self.seen = {k: v for k, v in self.seen.items() if id(v) not in dropped}
        del self.analysis.records[start:]

    def _unit_record(self, unit: OpaqueUnit) -> None:
        """A record for the last module of a unit inside an untraceable module: its own forward,
        traced and run on the input it had, is where the block goes."""
        end = unit.end
        record = ModuleRecord(end.path, end.module, "forward", frozenset(), unit=unit.ops)
        try:
            traced = self.traces.trace(end.module, "forward", frozenset(), training=False)
        except TraceFailure:
            return
        graph = record.graph = traced.graph
        record.constants = traced.constants
        self._trace_train_mode(record, traced)
        self.scopes.append({})
        try:
            _RecordingInterpreter(self, record).run(end.input)
        finally:
            self.scopes.pop()
        record.bits = GraphBits(graph)
        self.analysis.records.append(record)


class _AnalysedCall:
    """Stands in for a descendant's ``forward`` (or the model's own ``forward_features``) while an
    untraceable module, or the model's forward, runs: a call the module makes itself is analysed
    there and then; calls made from inside that analysis, or under torch.compile, go to the method
    it replaced."""

    def __init__(self, analyzer: _Analyzer, token: object, module: nn.Module, path: str, method: str = "forward"):
        self.analyzer, self.token, self.module, self.path, self.method = analyzer, token, module, path, method
        self.previous = module.__dict__.get(method, Absent)
        module.__dict__[method] = self

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        analyzer = self.analyzer
        if analyzer.intercepting is not self.token or torch.compiler.is_compiling():
            return self._previous(*args, **kwargs)
        if is_primitive(self.module):  # nothing to analyse: run it as it is
            analyzer.analysis.called[id(self.module)] = None
            return self._previous(*args, **kwargs)
        analyzer.intercepting = None
        self.remove()  # the analysis sees the module's own method
        try:
            if self.method != "forward":  # hooks run around forward only
                return analyzer.run(self.module, self.path, args, kwargs, self.method)
            with _own_hooks_set_aside(self.module):  # the real call around this one runs them
                return analyzer.run(self.module, self.path, args, kwargs)
        finally:
            self.module.__dict__[self.method] = self
            analyzer.intercepting = self.token

    def _previous(self, *args: Any, **kwargs: Any) -> Any:
        if self.previous is Absent:
            return getattr(type(self.module), self.method)(self.module, *args, **kwargs)
        return self.previous(*args, **kwargs)

    def remove(self) -> None:
        if self.previous is Absent:
            self.module.__dict__.pop(self.method, None)
        else:
            self.module.__dict__[self.method] = self.previous


@contextmanager
def _stand_ins_lifted(module: nn.Module) -> Iterator[None]:
    """The analysis' stand-ins taken off ``module`` and its descendants, and put back on exit."""
    lifted = [
        (sub, value)
        for sub in module.modules()
        for value in list(vars(sub).values())
        if isinstance(value, _AnalysedCall)
    ]
    for _, stand_in in lifted:
        stand_in.remove()
    try:
        yield
    finally:
        for sub, stand_in in lifted:
            sub.__dict__[stand_in.method] = stand_in


def _placeholder_values(record: ModuleRecord, graph: fx.Graph, bound: inspect.BoundArguments) -> list[Any]:
    """The call's arguments in the order of the graph's placeholders."""
    info = pytree_info(graph)
    if info is not None:  # list arguments: fx flattens (self, *args) into leaves
        arguments = [bound.arguments[name] for name in info.orig_args[1:]]
        return flat_inputs(graph, record.module, *arguments)[1:]
    values: list[Any] = []
    params = bound.signature.parameters
    for node in graph.find_nodes(op="placeholder"):
        name = node.target.lstrip("*")
        param = params.get(name)
        if param is None or param.kind is param.VAR_KEYWORD:
            continue
        value = bound.arguments.get(name, ())
        values.extend(value) if param.kind is param.VAR_POSITIONAL else values.append(value)
    return values


class _RecordingInterpreter(fx.Interpreter):
    def __init__(self, analyzer: _Analyzer, record: ModuleRecord):
        super().__init__(record.module, garbage_collect_values=True, graph=record.graph)
        self.analyzer = analyzer
        self.record = record
        self.child_record: ModuleRecord | None = None

    def call_module(self, target, args, kwargs):
        child = self.fetch_attr(target)
        args, kwargs = _mutable(args), _mutable(kwargs)  # children may update list arguments in place
        out, self.child_record = self.analyzer.run_recorded(child, join_path(self.record.path, target), args, kwargs)
        return out

    def fetch_attr(self, target: str) -> Any:
        if target in self.record.constants:
            return self.record.constants[target]
        return super().fetch_attr(target)

    def run_node(self, n: fx.Node) -> Any:
        self.child_record = None
        result = super().run_node(n)
        if n.op == "placeholder" and (source := self.analyzer.producer(result)) is not None:
            self.record.sources[n] = source
        self.analyzer.produced(result, self.record, n)
        tensor = result if isinstance(result, torch.Tensor) else None
        shape = tuple(tensor.shape) if tensor is not None else None
        n.meta[META_KEY] = NodeFacts(
            shape=shape,
            dtype=tensor.dtype if tensor is not None else None,
            device=tensor.device if tensor is not None else None,
            container=isinstance(result, (list, tuple, dict))
            and any(isinstance(v, torch.Tensor) for v in (result.values() if isinstance(result, dict) else result)),
            ops=self._ops_of(n, shape),
        )
        return result

    def _ops_of(self, n: fx.Node, shape: tuple[int, ...] | None) -> tuple[LearnedOp, ...]:
        if n.op == "call_module":
            child = self.fetch_attr(target_path(n))
            if module_kind(child) in ("conv", "norm"):
                op = module_op(child, join_path(self.record.path, target_path(n)), shape)
                return (op,) if op is not None else ()
            return self.child_record.ops if self.child_record is not None else ()
        op = function_op(n, self.record.path, shape, _arg_shape(self))
        return (op,) if op is not None else ()


def _mutable(value: Any) -> Any:
    """fx hands node arguments over as immutable lists/dicts; give the child plain ones."""
    if isinstance(value, immutable_list) or type(value) is list:
        return [_mutable(v) for v in value]
    if isinstance(value, immutable_dict) or type(value) is dict:
        return {k: _mutable(v) for k, v in value.items()}
    if type(value) is tuple:
        return tuple(_mutable(v) for v in value)
    return value


def _arg_shape(interp: fx.Interpreter):
    def shape(arg: Any) -> tuple[int, ...] | None:
        if isinstance(arg, fx.Node):
            if arg.op == "get_attr":
                return shape_of_value(interp.fetch_attr(target_path(arg)))
            return shape_of(arg)
        return None

    return shape
