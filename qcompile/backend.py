"""The ``torch.compile`` backend: Inductor with the qcompile pass in front of freezing.

``torch.compile(model, backend="qcompile", mode=..., options=...)`` lands in
``qcompile_backend``. It maps the graph inputs that are parameters or buffers (marked so by
Dynamo, or installed on the graph module, as Dynamo does under Inductor's freezing config)
to their real tensors, installs the rewrite as Inductor's
``joint_custom_pre_pass`` (which, in inference, runs on the ATen graph before freezing and
before Inductor's own quantization fusions) and hands over to ``compile_fx``.

Options (``options={...}``): ``"freezing"`` (default True) turns Inductor's freezing on or
off; every other key is an Inductor config entry. ``"freezing_discard_parameters": True``
(Inductor's name for it) also frees the original weight tensors that the compiled graph
replaced by repacked copies, so the weights are not held twice; the eager model can no
longer run, nor be traced again. ``"fuse_linears"`` (default True) runs the quantized
linears that read one activation in one format (q/k/v, gate/up; W8A8 ones when their
activation quantizations are the same value) as one launch
(``lowering/rewrite.py``): one GEMM on concatenated weights instead of several small ones,
which made batch-1 decode faster in W4A16 and W8A16 (docs/design.md); ``False`` keeps one
launch per linear. ``"combo_kernels"`` (Inductor's entry, default True here where Inductor
has it) launches independent small Triton kernels as one: a decode step's rotary embeddings
and KV cache writes (three kernels a layer) become one, and the launch gaps saved showed in
batch-1 decode throughput (docs/design.md); ``False`` restores Inductor's default. ``mode``
is torch.compile's. Under ``max_autotune`` (``mode="max-autotune"``) the kernels are chosen
by timing, per token-count range.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Iterator, Sequence
from unittest import mock

import torch
import torch.fx as fx

from . import _compat
from .lowering.decompositions import decomposition_table
from .lowering.report import MatchRecord, Report
from .lowering.rewrite import rewrite_graph

log = logging.getLogger("qcompile")

_last: list[Report] = []          # reports of the most recent compile calls
_collectors: list[Report] = []    # active explain()/collect() contexts


class QcompilePass(_compat.CustomGraphPass):
    """The rewrite bound to one compile: knows the real values of its constant inputs."""

    def __init__(self, flat_inputs: Sequence, report: Report, fuse_linears: bool = False):
        self.flat_inputs = list(flat_inputs)
        self.report = report
        self.fuse_linears = fuse_linears
        self.consumed: list[torch.Tensor] = []  # originals the compiled graph no longer reads

    def uuid(self):
        # The rewrite depends on parameter values, which no cache key covers: never cache.
        return None

    def __call__(self, graph: fx.Graph) -> None:
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        if any(n.name.startswith("tangents") for n in placeholders):
            self.report.add(MatchRecord(
                node="<graph>", op="-", matched=False,
                reason="training graph (gradients required): qcompile rewrites inference "
                       "graphs; run under torch.no_grad() or torch.inference_mode()"))
            return
        constants = self._constants(placeholders)
        used = [n for n in constants if n.users]
        with _compat.no_dispatch_modes():
            rewrite_graph(graph, constants, self.report, self.fuse_linears)
        # Weights whose only readers were rewritten (their repacked copies replace them),
        # unless their memory is shared with a tensor the graph still reads.
        kept = {constants[n].untyped_storage().data_ptr() for n in used if n.users}
        self.consumed = [constants[n] for n in used if not n.users and
                         constants[n].untyped_storage().data_ptr() not in kept]

    def _constants(self, placeholders: list[fx.Node]) -> dict[fx.Node, torch.Tensor]:
        if len(placeholders) != len(self.flat_inputs):
            log.warning("qcompile: %d graph inputs but %d example inputs; treating none as "
                        "constant", len(placeholders), len(self.flat_inputs))
            return {}
        out = {}
        for node, (value, is_const) in zip(placeholders, self.flat_inputs):
            val = node.meta.get("val")
            if not is_const or not isinstance(value, torch.Tensor) or \
                    not isinstance(val, torch.Tensor):
                continue
            if val.dtype != value.dtype or val.dim() != value.dim():
                continue
            if value.numel() and not value.untyped_storage().nbytes():
                raise RuntimeError(
                    "qcompile: this model's quantized weights were released by an earlier "
                    "compile with options={'freezing_discard_parameters': True}, so it cannot "
                    "be traced again (new input shapes, a graph break, or eager use). Build "
                    "the model again, or compile without that option.")
            out[node] = value
        return out


def _flat_inputs(gm: fx.GraphModule, example_inputs: Sequence) -> list[tuple[object, bool]]:
    """The inputs of the graph AOTAutograd traces, in its order, each with whether it is a
    parameter or buffer (a constant). Parameters and buffers that Dynamo installed on ``gm``
    as attributes rather than passing them as inputs -- which it does under Inductor's
    ``freezing`` config, Dynamo's ``prepare_freezing`` or for modules it does not inline --
    come first, as AOTAutograd lifts them (``named_parameters`` then ``named_buffers``,
    duplicates kept); Dynamo's example inputs follow."""
    lifted = [*dict(gm.named_parameters(remove_duplicate=False)).values(),
              *dict(gm.named_buffers(remove_duplicate=False)).values()]
    flat = []
    for t in lifted:
        flat.extend((inner, True) for inner in _compat.flatten_subclass(t))
    for t in example_inputs:
        const = isinstance(t, torch.Tensor) and _compat.static_input_marker(t)
        for inner in _compat.flatten_subclass(t):
            flat.append((inner, const))
    return flat


@contextlib.contextmanager
def _recording_freeze(kept: list[list[int]]) -> Iterator[None]:
    """Record which graph inputs Inductor's freezing keeps (the rest become constants)."""
    import torch._inductor.compile_fx as compile_fx_module
    import torch._inductor.freezing as freezing
    real = freezing.freeze

    def freeze(*args, **kwargs):
        model, preserved = real(*args, **kwargs)
        kept.append(list(preserved))
        return model, preserved
    with contextlib.ExitStack() as stack:
        # compile_fx imports it at call time (2.13) or may hold its own name for it
        for module in (freezing, compile_fx_module):
            if getattr(module, "freeze", None) is real:
                stack.enter_context(mock.patch.object(module, "freeze", freeze))
        yield


def _inner_compile(gm: fx.GraphModule, example_inputs: Sequence, *, static: Sequence[int] = (),
                   kept: Sequence[Sequence[int]] = (), **kwargs):
    """Inductor's compile_fx_inner, letting the graph hold the real tensors our pass added.

    The rewrite adds the repacked weights as get_attr constants. Freezing already lets
    such constants through Inductor's fake-tensor propagation (it patches the fake mode's
    allow_non_fake_inputs around inner compile); without freezing we do the same.

    Static inputs: on torch 2.11 the static-input indices Inductor's freezing path handed
    on left out the buffers the graph writes (a KV cache), so CUDA graphs refused to record
    ("mutated inputs") and every decode step paid Python launch overhead. They are computed
    here from ``static`` (what Dynamo marked as parameters and buffers, indexed before
    freezing) and ``kept`` (the inputs freezing kept), which is right on every version.
    """
    from torch._guards import detect_fake_mode
    from torch._inductor.compile_fx import compile_fx_inner

    if kept and len(kept[-1]) == len(example_inputs):
        static_set = set(static)
        kwargs["static_input_idxs"] = [j for j, i in enumerate(kept[-1]) if i in static_set]

    fake_mode = detect_fake_mode(example_inputs)
    ctx = (mock.patch.object(fake_mode, "allow_non_fake_inputs", True)
           if fake_mode is not None else contextlib.nullcontext())
    with ctx:
        return compile_fx_inner(gm, example_inputs, **kwargs)


def qcompile_backend(gm: fx.GraphModule, example_inputs: Sequence, *, mode: str | None = None,
                     options: dict | None = None):
    """Compile a Dynamo graph with Inductor, quantized matmuls rewritten to qcompile ops."""
    from torch._inductor.compile_fx import compile_fx

    from . import kernels  # noqa: F401  (registers the ops)

    options = dict(options or {})
    freezing = options.pop("freezing", True)
    if not isinstance(freezing, bool):
        raise TypeError(f"options['freezing'] must be a bool, got {type(freezing).__name__}")
    fuse_linears = options.pop("fuse_linears", True)
    if not isinstance(fuse_linears, bool):
        raise TypeError(f"options['fuse_linears'] must be a bool, got {type(fuse_linears).__name__}")
    release = options.get("freezing_discard_parameters", False)
    if release and not freezing:
        raise ValueError("options['freezing_discard_parameters'] needs freezing (the default)")
    report = Report(graphs=1)
    _last.append(report)
    del _last[:-64]
    patches = _compat.default_inductor_options()
    patches.update(_compat.mode_options(mode))
    patches.update(options)
    patches["freezing"] = freezing
    flat = _flat_inputs(gm, example_inputs)
    qpass = QcompilePass(flat, report, fuse_linears)
    patches["joint_custom_pre_pass"] = qpass
    kept: list[list[int]] = []  # the graph inputs freezing keeps, as indices into flat
    with torch._inductor.config.patch(patches), _recording_freeze(kept):
        # Inductor's table under the config just set, its matmul entries keeping quantized
        # matmuls whole for the pass (lowering/decompositions.py says why)
        decompositions = decomposition_table([const for _, const in flat])
        compiled = compile_fx(gm, example_inputs, inner_compile=functools.partial(
            _inner_compile, static=[i for i, (_, const) in enumerate(flat) if const],
            kept=kept), decompositions=decompositions)
    # The graph now holds values computed from the weights (repacked, folded): recompile
    # rather than reuse it for another model instance (the same code, other weights)
    _compat.guard_identity(gm, example_inputs, lambda t: isinstance(t, torch.Tensor)
                           and _compat.static_input_marker(t))
    if release:
        _release(qpass.consumed)
    for c in _collectors:
        c.extend(report)
    return compiled


def _release(tensors: Sequence[torch.Tensor]) -> None:
    """Free the memory of original weights that only rewritten matmuls read: the compiled
    graph holds their repacked copies, so keeping both would double the weight memory.
    The tensors stay (shapes intact, for Dynamo's guards) with no data: eager use of the
    module then fails, and a retrace raises the error in QcompilePass._constants."""
    freed = 0
    for t in tensors:
        storage = t.untyped_storage()
        freed += storage.nbytes()
        storage.resize_(0)
    log.info("qcompile: released %d original weight tensors (%.1f MB) after freezing",
             len(tensors), freed / 1e6)


def last_report() -> Report:
    """The match report of the graph the qcompile backend compiled last. A model with graph
    breaks compiles several graphs: ``collect()`` or ``explain()`` gathers them all."""
    out = Report()
    if _last:
        out.extend(_last[-1])
    return out


@contextlib.contextmanager
def collect() -> Iterator[Report]:
    """Collect the match reports of every qcompile compile inside the ``with`` block."""
    report = Report()
    _collectors.append(report)
    try:
        yield report
    finally:
        _collectors.remove(report)


def register() -> None:
    """Register the backend under the name "qcompile" (the entry point does this too)."""
    from torch._dynamo.backends.registry import _BACKENDS, register_backend
    if "qcompile" not in _BACKENDS or _BACKENDS.get("qcompile") is None:
        register_backend(qcompile_backend, name="qcompile")
