"""Differences between the torch versions qcompile supports (2.11 through 2.13), in one place."""

from __future__ import annotations

import logging

import torch

try:  # the base class Inductor expects for custom passes (it asks them for a cache key)
    from torch._inductor.custom_graph_pass import CustomGraphPass
except ImportError:  # pragma: no cover - older torch
    class CustomGraphPass:  # type: ignore[no-redef]
        def uuid(self):
            return None


def register_torch_log(name: str = "qcompile") -> None:
    """Let ``TORCH_LOGS="qcompile"`` / ``"+qcompile"`` control the ``qcompile`` logger."""
    try:
        from torch._logging._internal import log_registry, register_log
        if name not in log_registry.log_alias_to_log_qnames:
            register_log(name, [name])
    except Exception:  # logging control is a convenience, never a failure
        logging.getLogger(name).debug("could not register with torch._logging")


def static_input_marker(t: torch.Tensor) -> bool:
    """Whether Dynamo marked this graph input as a parameter or buffer (a constant)."""
    return getattr(t, "_dynamo_static_input_type", None) is not None or isinstance(
        t, torch.nn.Parameter)


def guard_identity(gm, example_inputs, is_constant) -> int:
    """Make Dynamo's guards check that each graph input for which ``is_constant(value)``
    holds is the very tensor it was at compile time (ID_MATCH on its source), as Dynamo does
    itself when Inductor's freezing is on while it traces. The compiled graph holds values
    computed from those tensors (repacked weights), so a model of the same class with other
    weights must not reuse it. Returns how many guards were added (0 outside Dynamo)."""
    from torch._dynamo.guards import GuardBuilder, install_guard
    from torch._guards import TracingContext

    if TracingContext.try_get() is None:
        return 0
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    added = 0
    for node, value in zip(placeholders, example_inputs):
        source = getattr(node.meta.get("grapharg"), "source", None)
        if source is None or not is_constant(value):
            continue
        install_guard(source.make_guard(GuardBuilder.ID_MATCH))
        added += 1
    return added


def flatten_subclass(t):
    """The plain tensors AOTAutograd sees for ``t`` (tensor subclasses are desugared)."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass
    if isinstance(t, torch.Tensor) and is_traceable_wrapper_subclass(t):
        attrs, _ = t.__tensor_flatten__()
        out = []
        for a in attrs:
            out.extend(flatten_subclass(getattr(t, a)))
        return out
    return [t]


def default_inductor_options() -> dict:
    """The Inductor config the qcompile backend starts from (before mode and user options):
    horizontal fusion of independent kernels, where this Inductor has it."""
    import torch._inductor.config as config
    return {"combo_kernels": True} if hasattr(config, "combo_kernels") else {}


def mode_options(mode: str | None) -> dict:
    """Inductor config for a torch.compile ``mode`` string."""
    if mode in (None, "default"):
        return {}
    from torch._inductor import list_mode_options
    return dict(list_mode_options(mode))


def traced_node(t: torch.Tensor):
    """The FX node that the make_fx trace in progress (AOTAutograd's) recorded for ``t``,
    or None outside such a trace."""
    from torch.fx.experimental import proxy_tensor
    mode = proxy_tensor.get_proxy_mode()
    if mode is None:
        return None
    slot = proxy_tensor.get_proxy_slot(t, mode.tracer, None)
    proxy = getattr(slot, "proxy", None)
    return getattr(proxy, "node", None)


def no_dispatch_modes():
    """Leave any active FakeTensorMode (Inductor runs graph passes under one) so that
    constant weights can be evaluated on real data."""
    from torch.utils._python_dispatch import _disable_current_modes
    return _disable_current_modes()


def benchmark_gpu(fn) -> float:
    """Milliseconds per call of ``fn`` on the GPU, as Inductor's autotuner measures (L2
    flushed between calls, CUDA events); a plain CUDA-event loop where that is missing."""
    try:
        from torch._inductor.runtime.benchmarking import benchmarker
        return float(benchmarker.benchmark_gpu(fn))
    except ImportError:  # pragma: no cover - older torch
        fn()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(20):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 20


def move_program(ep, location):
    """``ep`` with its tensors and device arguments moved (``{"cuda:0": "cuda:1"}``), by
    torch.export's pass for it."""
    from torch.export.passes import move_to_device_pass
    return move_to_device_pass(ep, location)
