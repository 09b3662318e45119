"""Compile-time evaluation of constant subgraphs of an ATen FX graph.

The graph pass recognises a dequantized weight by what it computes, not by how it is
spelled: the weight operand of a matmul is an expression over constant tensors only, so
we can run it. This module runs such expressions, finds their constant ancestry, and
probes the float part as a function of the integer tensor feeding it (the affine probe
used by ``weight_only``). It knows nothing of quantization formats.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.fx as fx

aten, prims = torch.ops.aten, torch.ops.prims


class NotConstant(Exception):
    """The expression depends on a graph input that is not a parameter or buffer."""

    def __init__(self, node: fx.Node):
        super().__init__(node.name)
        self.node = node


class UnreadableOp(Exception):
    """The expression uses an op that the affine probe does not read."""

    def __init__(self, node: fx.Node, why: str = ""):
        super().__init__(str(node.target))
        self.node = node
        self.why = why


# Ops whose result is a function of their inputs' values that a float64 shadow can
# follow: elementwise affine arithmetic, casts and data movement. Anything else between
# the integer weight and the matmul is reported, not guessed at.
_CASTS = {prims.convert_element_type.default, aten._to_copy.default,
          aten.to.dtype, aten.to.dtype_layout, aten.type_as.default}
_AFFINE = {aten.add.Tensor, aten.add.Scalar, aten.sub.Tensor, aten.sub.Scalar,
           aten.rsub.Tensor, aten.rsub.Scalar, aten.mul.Tensor, aten.mul.Scalar,
           aten.div.Tensor, aten.div.Scalar, aten.neg.default}
_MOVES = {aten.view.default, aten.reshape.default, aten._unsafe_view.default,
          aten.permute.default, aten.t.default, aten.transpose.int, aten.expand.default,
          aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default,
          aten.clone.default, aten.contiguous.default, aten.alias.default,
          aten.slice.Tensor, aten.select.int, aten.index.Tensor, aten.repeat.default,
          aten.repeat_interleave.self_Tensor, aten.repeat_interleave.self_int,
          aten.cat.default, aten.flatten.using_ints, aten.unflatten.int,
          aten.index_select.default, aten.gather.default}
READABLE_OPS = _CASTS | _AFFINE | _MOVES


def ancestors(node: fx.Node) -> list[fx.Node]:
    """All nodes ``node`` depends on, itself included, in graph order."""
    seen: set[fx.Node] = set()
    stack = [node]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        stack.extend(n.all_input_nodes)
    return [n for n in node.graph.nodes if n in seen]


class ConstantEvaluator:
    """Evaluates nodes whose inputs are all constants (parameters, buffers, get_attr).

    ``constants`` maps placeholder nodes to their real tensors.
    """

    def __init__(self, gm: fx.GraphModule | None, constants: dict[fx.Node, torch.Tensor]):
        self.gm = gm
        self.constants = constants
        self.cache: dict[fx.Node, Any] = {}

    def is_constant(self, node: fx.Node) -> bool:
        try:
            self._check(node)
            return True
        except NotConstant:
            return False

    def _check(self, node: fx.Node) -> None:
        for n in ancestors(node):
            if n.op == "placeholder" and n not in self.constants:
                raise NotConstant(n)

    def value(self, node: fx.Node) -> Any:
        self._check(node)
        for n in ancestors(node):
            if n not in self.cache:
                self.cache[n] = self._run(n, self.cache)
        return self.cache[node]

    def _run(self, n: fx.Node, env: dict[fx.Node, Any]) -> Any:
        if n.op == "placeholder":
            return self.constants[n]
        if n.op == "get_attr":
            obj = self.gm
            for part in str(n.target).split("."):
                obj = getattr(obj, part)
            return obj
        if n.op == "call_function":
            args = fx.node.map_arg(n.args, lambda a: env[a])
            kwargs = fx.node.map_arg(n.kwargs, lambda a: env[a])
            return n.target(*args, **kwargs)
        raise NotConstant(n)

    def shadow(self, output: fx.Node, probe: fx.Node, probe_value: torch.Tensor) -> torch.Tensor:
        """Value of ``output`` in float64 with ``probe`` replaced by ``probe_value``.

        Nodes that depend on ``probe`` are recomputed in float64 with casts dropped, so
        the result is the exact real-number value of the float part; nodes that do not
        depend on it keep their real values (upcast where they meet the shadow).
        """
        env: dict[fx.Node, Any] = {probe: probe_value.to(torch.float64)}
        depends = {probe}
        order = ancestors(output)
        # each value is dropped after its last use: the shadows of a large weight (an 8B
        # model's output head: 4.2 GB a float64 copy) must not all be held at once
        last_use = {a: i for i, n in enumerate(order) for a in n.all_input_nodes}
        for i, n in enumerate(order):
            if n is not probe:
                env[n] = self._shadow_one(n, env, depends)
            for a in n.all_input_nodes:
                if last_use.get(a) == i and a is not output:
                    env.pop(a, None)
        return env[output]

    def _shadow_one(self, n: fx.Node, env: dict, depends: set) -> Any:
        """One node's value in :meth:`shadow` (its inputs' in ``env``); adds n to ``depends``
        when it depends on the probe."""
        if not any(a in depends for a in n.all_input_nodes):
            return self.value(n)
        depends.add(n)
        if n.op != "call_function" or n.target not in READABLE_OPS:
            raise UnreadableOp(n)
        if n.target in _CASTS:
            return env[n.args[0]]
        index_args = _index_operands(n)  # indices keep their integer type
        if any(a in depends for a in index_args):
            # the probed tensor picks entries (a lookup table's codes): not affine in it
            raise UnreadableOp(n, "the integer tensor indexes a lookup table")
        args = fx.node.map_arg(n.args, lambda a: env[a] if a in index_args else _upcast(env[a]))
        kwargs = {k: v for k, v in n.kwargs.items() if k not in ("dtype", "rounding_mode")}
        if "rounding_mode" in n.kwargs and n.kwargs["rounding_mode"] is not None:
            raise UnreadableOp(n)
        kwargs = fx.node.map_arg(kwargs, lambda a: _upcast(env[a]))
        return n.target(*args, **kwargs)


def _index_operands(n: fx.Node) -> list[fx.Node]:
    """The nodes ``n`` uses as indices (not as values) among its arguments."""
    if n.target is aten.index.Tensor:
        return [a for a in (n.args[1] if len(n.args) > 1 else []) if isinstance(a, fx.Node)]
    if n.target in (aten.index_select.default, aten.gather.default):
        return [n.args[2]] if len(n.args) > 2 and isinstance(n.args[2], fx.Node) else []
    if n.target is aten.repeat_interleave.self_Tensor:
        return [n.args[1]] if len(n.args) > 1 and isinstance(n.args[1], fx.Node) else []
    return []


def _upcast(v: Any) -> Any:
    if isinstance(v, torch.Tensor) and v.dtype != torch.bool:
        return v.to(torch.float64)
    return v


def is_integer_tensor(val: Any) -> bool:
    """Whether ``val`` (a node's fake-tensor metadata) is a tensor of an integer type."""
    return isinstance(val, torch.Tensor) and not val.dtype.is_floating_point \
        and not val.dtype.is_complex and val.dtype != torch.bool


# Integer types quantized weights are stored in (codes, packed nibbles); token ids and
# positions, which also reach matmul operands through embeddings, are int64.
_CODE_DTYPES = (torch.int8, torch.uint8, torch.int16, torch.int32)


# How not_constant_reason's answer for a quantized weight held outside modules begins (the
# no-takeover warning looks for it).
INPUT_WEIGHT_REASON = "the weight reads the integer graph input"


def not_constant_reason(ev: ConstantEvaluator, operand: fx.Node, default: str) -> str:
    """Why a matmul's weight operand could not be read, for the report: ``default``, unless it
    is computed from a graph input that looks like quantized codes -- an 8-32-bit integer
    tensor with 1, 2, 4 or 8 weight values an element -- but is not a parameter or buffer (a
    quantized weight passed to a compiled function, or a tensor global to it): then what to
    do so that the pass reads it."""
    val = operand.meta.get("val")
    if not isinstance(val, torch.Tensor) or val.dim() != 2:
        return default
    for node in ancestors(operand):
        code = node.meta.get("val")
        if (node.op == "placeholder" and not ev.is_constant(node)
                and isinstance(code, torch.Tensor) and code.dtype in _CODE_DTYPES
                and any(code.numel() * r == val.numel() for r in (1, 2, 4, 8))):
            return (f"{INPUT_WEIGHT_REASON} {node.name}, which is not a "
                    "parameter or buffer (an argument of the compiled function, or a tensor "
                    "global to it): weights are read from constants at compile time; hold it in "
                    "an nn.Module, or mark it static with torch._dynamo.mark_static_address")
    return default


def integer_nodes(nodes: Iterable[fx.Node]) -> list[fx.Node]:
    """Nodes whose value (per the graph's fake-tensor metadata) is an integer tensor."""
    return [n for n in nodes if is_integer_tensor(n.meta.get("val"))]


def value_users(node: fx.Node) -> list[fx.Node]:
    """Users that consume ``node``'s value (torch.export's dtype assertions do not)."""
    return [u for u in node.users if u.target is not aten._assert_tensor_metadata.default]


def users_chain(node: fx.Node, allowed: Callable[[fx.Node], bool]) -> list[fx.Node]:
    """The single-user chain below ``node`` while ``allowed`` holds (not including node)."""
    chain = []
    cur = node
    while len(value_users(cur)) == 1:
        nxt = value_users(cur)[0]
        if nxt.op != "call_function" or not allowed(nxt):
            break
        chain.append(nxt)
        cur = nxt
    return chain
