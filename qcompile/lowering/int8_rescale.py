"""Recognise ``_int_mm(xq, wq)`` followed by its float rescale (SmoothQuant W8A8), also
when spelled as an int32 matmul of int8 values (``matmul(xq.to(int32), wq.to(int32))``).

Reads the single-user chain below the int matmul: for asymmetric activations first the
int32 zero-point correction ``acc - zp * c`` (``zp`` a run-time [M, 1] or scalar int32, ``c``
a constant int32 [N], the weight's column sums; where the activation is fed as ``xq + 128``
in uint8, the unsigned operand of CPU int8 GEMMs, the constant ``128 * c`` that undoes the
shift instead), then the int32 -> float32 cast, multiplies by per-row (per-token, a
run-time [M, 1] tensor, or a run-time scalar) and per-column (per-channel, a constant [N] /
[1, N], or a constant scalar) scales in any order, an optional constant bias, and the cast to
the output dtype. The activation quantization
that produces ``xq`` is left in the graph for Inductor to fuse.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx as fx

from ..kernels.ops import OP_DTYPES
from .evaluate import ConstantEvaluator, NotConstant, not_constant_reason, value_users
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
    xq: fx.Node | None = None              # the activation operand (int8, or int8 widened)
    view_shape: object = None              # the shape argument of a view in the chain

    @property
    def format(self) -> str:
        act = "per-token" if self.per_token else "per-tensor"
        if self.azp is not None:
            act += " asymmetric"
        spelled = " (int32 matmul)" if self.xq is not None and _dtype(self.xq) != torch.int8 else ""
        return f"w8a8 int8 {act} x per-channel{' +bias' if self.bias is not None else ''}{spelled}"


def _dtype(node: fx.Node) -> torch.dtype | None:
    val = node.meta.get("val")
    return val.dtype if isinstance(val, torch.Tensor) else None


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


def _same_dim(a, b) -> bool:
    # symbolic sizes compare by expression, so that no guard is added
    return a == b if isinstance(a, int) and isinstance(b, int) else str(a) == str(b)


def _per_row(shp: tuple | None, rows: tuple = ()) -> bool:
    """A shape that gives each row one value: [M, 1] (or [B, S, 1] where the result is
    [B, S, N], ``rows`` its leading sizes), or one value for all."""
    if shp is None:
        return False
    if _one_value(shp):
        return True
    lead = shp[:-1]
    return (len(shp) >= 2 and _is_one(shp[-1]) and len(lead) == len(rows)
            and all(_is_one(d) or _same_dim(d, r) for d, r in zip(lead, rows)))


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
            not isinstance(zv, torch.Tensor) or zv.dtype != torch.int32 or \
            not _per_row(shp, _shape(node)[:-1]):
        raise NoMatch(why)
    return zp, adj.reshape(n)


_VIEWS = {aten.view.default, aten._unsafe_view.default, aten.reshape.default}


# The unsigned spelling of an int8 activation: CPU int8 GEMMs multiply uint8 by int8, so
# torchao (from 0.18, Int8Tensor on CPU) feeds ``_int_mm`` with ``(xq + 128)`` as uint8 and
# subtracts ``128 * colsum(wq)`` from the int32 result: the same product as ``xq @ wq``.
_UINT8_SHIFT = 128


def _is_shift_correction(ev: ConstantEvaluator, node, wq_kn: torch.Tensor) -> bool:
    """Whether ``node`` is a constant equal to 128 x the int8 weight's column sums ([N] or
    [1, N], int32): what a uint8-shifted activation adds to each output."""
    if not (isinstance(node, fx.Node) and ev.is_constant(node)):
        return False
    v = ev.value(node)
    n = wq_kn.shape[1]
    want = wq_kn.to(torch.int32).sum(0) * _UINT8_SHIFT
    return (v.dtype == torch.int32 and tuple(v.shape) in ((n,), (1, n))
            and torch.equal(v.reshape(n).to(want.device), want))


def int8_activation(a: fx.Node) -> fx.Node | None:
    """For an int32 matmul's activation: the int8 tensor it is a widening cast of (through
    views), so that casting it back to int8 loses nothing; else None."""
    cur = a
    while isinstance(cur, fx.Node) and cur.op == "call_function":
        val = cur.meta.get("val")
        if isinstance(val, torch.Tensor) and val.dtype == torch.int8:
            return cur
        if cur.target in _VIEWS or (cur.target in _CASTS and isinstance(val, torch.Tensor)
                                    and val.dtype in (torch.int16, torch.int32, torch.int64)):
            cur = cur.args[0]
            continue
        return None
    val = cur.meta.get("val") if isinstance(cur, fx.Node) else None
    return cur if isinstance(val, torch.Tensor) and val.dtype == torch.int8 else None


def _through_views(node):
    """The tensor ``node`` is a view of (itself if it is no view)."""
    while isinstance(node, fx.Node) and node.op == "call_function" and node.target in _VIEWS:
        node = node.args[0]
    return node


def shifted_int8_activation(a: fx.Node) -> fx.Node | None:
    """For an ``_int_mm`` of a uint8 activation: the int8 tensor it is ``+ 128`` of (a cast to
    uint8 of an add of 128 to that tensor widened, through views), else None."""
    cur = _through_views(a)
    if not (isinstance(cur, fx.Node) and cur.op == "call_function" and cur.target in _CASTS
            and _cast_dtype(cur) == torch.uint8):
        return None
    add = _through_views(cur.args[0])
    if not (isinstance(add, fx.Node) and add.op == "call_function"
            and add.target in (aten.add.Tensor, aten.add.Scalar) and len(add.args) == 2
            and add.args[1] == _UINT8_SHIFT and add.kwargs.get("alpha", 1) == 1
            and isinstance(add.args[0], fx.Node)):
        return None
    return int8_activation(add.args[0])


def recognize_int8(ev: ConstantEvaluator, mm: fx.Node) -> Int8Match:
    """Read the rescale chain below ``mm`` or raise NoMatch: ``aten._int_mm(xq, wq)`` (also of
    ``xq + 128`` in uint8, less its correction), or the same product spelled as an int32 ``mm``
    of int8 values widened to int32 (CPU code)."""
    a, b = mm.args[:2]
    shifted = mm.target is aten._int_mm.default and _dtype(a) == torch.uint8
    if shifted:  # (xq + 128) as uint8, its shift taken off the result below
        a = shifted_int8_activation(a)
        if a is None:
            raise NoMatch("_int_mm of a uint8 activation that is not an int8 one plus 128")
    try:
        wq_kn = ev.value(b)
    except NotConstant:
        raise NoMatch(not_constant_reason(ev, b, "int8 weight operand is not constant")) from None
    if ev.is_constant(a):
        raise NoMatch("int matmul operands are not (activation, constant int8 weight)")
    if mm.target is not aten._int_mm.default:
        if int8_activation(a) is None:
            raise NoMatch("int32 matmul whose activation is not an int8 tensor widened to int32")
        if wq_kn.dtype.is_floating_point or wq_kn.numel() == 0 or \
                int(wq_kn.min()) < -128 or int(wq_kn.max()) > 127:
            raise NoMatch("int32 matmul whose weight does not hold int8 values")
        wq_kn = wq_kn.to(torch.int8)
    if wq_kn.dtype != torch.int8:
        raise NoMatch("_int_mm operands are not (activation, constant int8 weight)")
    n = wq_kn.shape[1]
    col = torch.ones(n, dtype=torch.float64, device=wq_kn.device)
    match = Int8Match(wq=wq_kn.t().contiguous(), col_scale=col, bias=None, xq=a)
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
            if shifted:  # the uint8 shift's correction: 128 x the weight's column sums
                if not _is_shift_correction(ev, u.args[1], wq_kn):
                    raise NoMatch("_int_mm of int8 + 128 minus something other than 128 x the "
                                  "weight's column sums")
                shifted = False
            else:
                match.azp, match.azp_adj = _zero_point_term(ev, u.args[1], n)
            cur = u
            continue
        if u.target in _VIEWS and u.args[0] is cur:
            # matmul of a 3-D activation: [M, N] -> [B, S, N]; the op's result is viewed so
            match.view_shape = u.args[1]
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
                if not _per_row(shp, _shape(cur)[:-1]):
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
    if shifted:
        raise NoMatch("_int_mm of int8 + 128 without 128 x the weight's column sums taken off")
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
