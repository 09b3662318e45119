"""The decomposition table the backend hands to Inductor: Inductor's own, except that a
matmul whose weight operand is computed from constant integer tensors stays whole.

Why here: AOTAutograd applies the decomposition table while it traces the ATen graph,
before any graph pass runs. Some of Inductor's entries rewrite a matmul into pointwise
ops and a reduction, depending on settings the user chose: with
``coordinate_descent_tuning`` (gpt-fast sets it; ``mode="max-autotune"`` sets it) a
one-token ``mm`` becomes ``(x.unsqueeze(2) * w.unsqueeze(0)).sum(1)`` on a GPU, and CPU
entries do the same for small shapes. A batch-1 decode step then reaches qcompile's pass
with no matmul left to recognise. Wrapping the table's matmul entries is the one point
that every setting, mode and wrapper path of ``compile_fx`` goes through (they all trace
with the table the backend passes), so no setting can hide a quantized matmul again.

The wrapper decides while tracing, from the graph built so far: it follows the weight
operand's producers back to the graph's inputs. A weight that only constants (parameters,
buffers, tensor attributes) feed, an integer tensor among them, is what a dequantization
looks like; that matmul is kept (the entry returns NotImplemented, as Inductor's own entries
do when they do not apply) for the qcompile pass. Every other matmul gets Inductor's own
entry, so non-quantized matmuls compile exactly as Inductor would compile them. A kept
matmul the pass then cannot rewrite is lowered by Inductor's matmul lowering (correct; it
misses only the reduction form that entry would have chosen).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence

import torch
import torch.fx as fx

from .. import _compat
from .evaluate import is_integer_tensor

log = logging.getLogger("qcompile")
aten = torch.ops.aten

# op overload -> index of the operand that holds the weight ([K, N], or [B, K, N])
WEIGHT_OPERAND = {
    aten.mm.default: 1, aten.addmm.default: 2, aten.bmm.default: 1,
}
for _packet, _index in ((aten.mm, 1), (aten.addmm, 2), (aten.bmm, 1)):
    if "dtype" in _packet.overloads():  # the out_dtype variants (torch 2.9+)
        WEIGHT_OPERAND[_packet.dtype] = _index


class _Provenance:
    """For nodes of the graph being traced: computed from constants only, and whether an
    integer tensor is among the inputs. Memoised per node; one instance per compile."""

    def __init__(self, constant_inputs: Sequence[bool] | None):
        self.constant_inputs = constant_inputs
        self.memo: dict[fx.Node, tuple[bool, bool]] = {}
        self.placeholders: dict[fx.Graph, dict[fx.Node, int]] = {}

    def _placeholder_is_constant(self, node: fx.Node) -> bool:
        index = self.placeholders.get(node.graph)
        if index is None:
            index = {n: i for i, n in enumerate(node.graph.find_nodes(op="placeholder"))}
            self.placeholders[node.graph] = index
        flags = self.constant_inputs
        if flags is None or len(flags) != len(index):
            # Inputs we cannot map to Dynamo's (extra tracing inputs): call it constant.
            # A wrong guess only keeps a matmul whole; the pass still checks real values.
            return True
        return bool(flags[index[node]])

    def of(self, node: fx.Node) -> tuple[bool, bool]:
        """(constant, reads an integer tensor) for ``node``."""
        stack = [node]
        while stack:
            n = stack[-1]
            if n in self.memo:
                stack.pop()
                continue
            pending = [a for a in n.all_input_nodes if a not in self.memo]
            if pending:
                stack.extend(pending)
                continue
            stack.pop()
            is_int = is_integer_tensor(n.meta.get("val"))
            if n.op == "placeholder":
                const = self._placeholder_is_constant(n)
            elif n.op == "get_attr":
                const = True
            else:
                inputs = [self.memo[a] for a in n.all_input_nodes]
                const = all(c for c, _ in inputs) and n.op == "call_function"
                is_int = is_int or any(i for _, i in inputs)
            self.memo[n] = (const, is_int)
        return self.memo[node]


def reads_quantized_weight(provenance: _Provenance, weight: object) -> bool:
    """Whether ``weight`` (a tensor being traced) is computed from constants only, an
    integer tensor among them. False whenever it cannot be told (no trace in progress)."""
    if not isinstance(weight, torch.Tensor):
        return False
    node = _compat.traced_node(weight)
    if node is None:
        return False
    const, is_int = provenance.of(node)
    return const and is_int


def _keep_quantized(decomp: Callable, index: int, provenance: _Provenance) -> Callable:
    @functools.wraps(decomp)
    def entry(*args, **kwargs):
        if len(args) > index and reads_quantized_weight(provenance, args[index]):
            return NotImplemented  # traced as the matmul itself, for qcompile's pass
        return decomp(*args, **kwargs)
    return entry


def decomposition_table(constant_inputs: Sequence[bool] | None = None) -> dict:
    """Inductor's decomposition table (as ``select_decomp_table`` gives it under the
    current config) with its matmul entries wrapped by :func:`_keep_quantized`.

    ``constant_inputs``: for each input of the traced graph (Dynamo's example inputs,
    tensor subclasses flattened), whether it is a parameter or buffer."""
    from torch._inductor.decomposition import select_decomp_table

    table = dict(select_decomp_table())
    provenance = _Provenance(constant_inputs)
    for op, index in WEIGHT_OPERAND.items():
        if op in table:
            table[op] = _keep_quantized(table[op], index, provenance)
    return table
