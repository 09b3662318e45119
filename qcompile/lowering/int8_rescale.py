"""Recognise ``_int_mm(xq, wq)`` followed by its float rescale (SmoothQuant W8A8).

Reads the single-user chain below the int matmul: for asymmetric activations first the
int32 zero-point correction ``acc - zp * c`` (``zp`` a run-time [M, 1] or scalar int32, ``c``
a constant int32 [N], the weight's column sums), then the int32 -> float32 cast, multiplies
by per-row (per-token, a run-time [M, 1] tensor, or a run-time scalar) and per-column
(per-channel, a constant [N] / [1, N], or a constant scalar) scales in any order, an
optional constant bias, and the cast to the output dtype. The activation quantization
that produces ``xq`` is left in the graph for Inductor to fuse.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx as fx

from ..kernels.ops import OP_DTYPES
from .evaluate import ConstantEvaluator, NotConstant, value_users
from .weight_only import NoMatch

aten, prims = torch.ops.aten, torch.ops.prims
_CASTS = {prims.convert_element_type.default, aten._to_copy.default, aten.to.dtype}
_MULS = {aten.mul.Tensor, aten.mul.Scalar}
_ADDS = {aten.add.Tensor}


@dataclass
class Int8Match:
    wq: torch.Tensor                       # int8 [N, K]
    col_scale: torch.Tensor                # float32 [1, N]
    bias: torch.Tensor | None              # [N]
    row_scales: list[fx.Node] = field(default_factory=list)  # run-time factors
    end: fx.Node | None = None             # the node whose value the op replaces
    out_dtype: torch.dtype = torch.float32
    per_token: bool = False
    azp: fx.Node | None = None             # run-time int32 zero points (asymmetric activations)
    azp_adj: torch.Tensor | None = None    # int32 [N], subtracted times azp from the int32 sum

    @property
    def format(self) -> str:
        act = "per-token" if self.per_token else "per-tensor"
        if self.azp is not None:
            act += " asymmetric"
        return f"w8a8 int8 {act} x per-channel{' +bias' if self.bias is not None else ''}"


def _cast_dtype(node: fx.Node) -> torch.dtype | None:
    if node.target is prims.convert_element_type.default or node.target is aten.to.dtype:
        return node.args[1]
    return node.kwargs.get("dtype")


def _shape(node) -> tuple | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def _is_one(d) -> bool:
    # A symbolic size (the token count) is never taken for 1: no guard is added.
    return isinstance(d, int) and d == 1


def _one_value(shp: tuple) -> bool:
    """A shape of one element (a per-tensor value)."""
    return all(_is_one(d) for d in shp)


def _per_row(shp: tuple | None) -> bool:
    """A shape that gives each row one value: [M, 1], or one value for all."""
    return shp is not None and (len(shp) == 2 and _is_one(shp[1]) or _one_value(shp))


def _zero_point_term(ev: ConstantEvaluator, node, n: int) -> tuple[fx.Node, torch.Tensor]:
    """(zero points, constant correction [N]) of ``zp * c``, or NoMatch."""
    why = ("_int_mm result minus something other than zero points ([M, 1] or scalar, int32) "
           "times a constant int32 [N] correction")
    if not (isinstance(node, fx.Node) and node.op == "call_function"
            and node.target is aten.mul.Tensor and len(node.args) == 2
            and all(isinstance(a, fx.Node) for a in node.args)):
        raise NoMatch(why)
    consts = [a for a in node.args if ev.is_constant(a)]
    if len(consts) != 1:
        raise NoMatch(why)
    zp = node.args[1] if consts[0] is node.args[0] else node.args[0]
    adj = ev.value(consts[0])
    zv, shp = zp.meta.get("val"), _shape(zp)
    if adj.dtype != torch.int32 or tuple(adj.shape) not in ((n,), (1, n)) or \
            not isinstance(zv, torch.Tensor) or zv.dtype != torch.int32 or not _per_row(shp):
        raise NoMatch(why)
    return zp, adj.reshape(n)


def recognize_int8(ev: ConstantEvaluator, mm: fx.Node) -> Int8Match:
    """Read the rescale chain below ``mm`` (an ``aten._int_mm``) or raise NoMatch."""
    a, b = mm.args
    try:
        wq_kn = ev.value(b)
    except NotConstant:
        raise NoMatch("int8 weight operand is not constant") from None
    if wq_kn.dtype != torch.int8 or ev.is_constant(a):
        raise NoMatch("_int_mm operands are not (activation, constant int8 weight)")
    n = wq_kn.shape[1]
    col = torch.ones(n, dtype=torch.float64, device=wq_kn.device)
    match = Int8Match(wq=wq_kn.t().contiguous(), col_scale=col, bias=None)
    cur, converted, cast_out = mm, False, False
    while len(value_users(cur)) == 1:
        u = value_users(cur)[0]
        if u.op != "call_function":
            break
        if u.target is aten.sub.Tensor and not converted and match.azp is None \
                and u.args[0] is cur and len(u.args) == 2 and u.kwargs.get("alpha", 1) == 1:
            if u.meta["val"].dtype != torch.int32:
                raise NoMatch(f"zero-point correction computed in {u.meta['val'].dtype} "
                              "(qcompile corrects in int32)")
            match.azp, match.azp_adj = _zero_point_term(ev, u.args[1], n)
            cur = u
            continue
        if u.target in _CASTS:
            dt = _cast_dtype(u)
            if not converted:
                if dt != torch.float32:
                    raise NoMatch(f"rescale computed in {dt} (qcompile rescales in float32)")
                converted = True
            elif cast_out:
                break
            else:
                cast_out = True
            cur = u
            continue
        if not converted:
            break
        others = [x for x in u.args if x is not cur]
        if u.target in _MULS and match.bias is None and not cast_out and len(others) == 1:
            other = others[0]
            if isinstance(other, (int, float)):
                col = col * float(other)
            elif ev.is_constant(other):
                v = ev.value(other).to(torch.float64)
                if v.numel() != 1 and tuple(v.shape) not in ((n,), (1, n)):
                    break
                col = col * v.reshape(-1)
            else:
                shp = _shape(other)
                if not _per_row(shp):
                    break
                match.row_scales.append(other)
            cur = u
            continue
        if u.target in _ADDS and match.bias is None and len(others) == 1 \
                and isinstance(others[0], fx.Node) and ev.is_constant(others[0]):
            v = ev.value(others[0])
            if tuple(v.shape) not in ((n,), (1, n)):
                break
            match.bias = v.reshape(n)
            cur = u
            continue
        break
    if not converted:
        raise NoMatch("_int_mm result is not rescaled in float32")
    match.end = cur
    match.out_dtype = cur.meta["val"].dtype
    if match.out_dtype not in OP_DTYPES:
        raise NoMatch(f"rescaled result in {match.out_dtype} (the op writes bf16, fp16, fp32)")
    match.col_scale = col.to(torch.float32).reshape(1, n)
    match.per_token = any(not _one_value(_shape(r)) for r in match.row_scales)
    if match.azp is not None and match.per_token == _one_value(_shape(match.azp)):
        # the kernels read zero points like the row scale: one per token, or one for all
        raise NoMatch("zero points and activation scales differ in granularity (one per "
                      "token vs one per tensor)")
    return match
