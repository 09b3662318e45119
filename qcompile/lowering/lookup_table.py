"""Recognise a matmul's weight as a 4-bit lookup-table dequantization (NF4, FP4, any codebook).

What this is for: QLoRA-style weights are not ``(q - z) * s`` but ``table[c] * absmax``: an
integer code tensor c with one value per weight element picks one of at most 16 constant
float values, and a per-block scale (bitsandbytes' ``absmax``, itself maybe quantized:
"double quant") multiplies it. The affine probe of ``weight_only`` cannot read that (the
integer tensor is an index, not a value), so a weight it leaves with "the integer tensor
indexes a lookup table" comes here.

By meaning, as ``weight_only`` does: the lookup (``aten.index.Tensor(T, [c])``,
``index_select``, ``take``, ``embedding`` of a one-column table, or bitsandbytes' registered
``dequantize_4bit`` read by its documented layout) is a node L whose value is ``T[c]``
(times the op's absmax for bitsandbytes). The rest of the weight expression is probed in float64 with L replaced:
by zeros (the result must be 0: no offset), by the per-element pre-scale (giving the
scale s of every weight element) and by the codes themselves times it (giving each
weight element's code). Scales constant over groups along K give the block size. Nested
absmax is just a constant expression: it is evaluated. The recovered (codes, table,
scales) must reproduce the graph's weight bit for bit in the graph's dtype, or nothing is
rewritten. bitsandbytes' ``gemm_4bit`` (the matmul ``Linear4bit`` runs at inference) is
read through its arguments the same way.

The table is named ``nf4`` or ``fp4`` when its values are bitsandbytes' NF4 / FP4 code
values (as float32, or rounded to the table's dtype), else ``lut16``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.fx as fx

from ..kernels.ops import OP_DTYPES
from .evaluate import ConstantEvaluator, NotConstant, UnreadableOp, ancestors, not_constant_reason
from .weight_only import NoMatch, _exact_dtype, _kernel_group, _true_group, _unsupported_group

aten = torch.ops.aten
MAX_TABLE = 16

# bitsandbytes.functional.get_4bit_type: NF4 (the QLoRA paper's normal-float quantiles) and
# FP4 (1 sign, 2 exponent, 1 mantissa bits, in bit-pattern order), both divided by their
# largest magnitude in float32.
NF4_VALUES = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0)
FP4_RAW = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0,
           -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0)

# bitsandbytes' registered ops, by name (``namespace::op``), so a test can add a stand-in
# registered under its own namespace with the same schema.
BNB_DEQUANT_OPS = {"bitsandbytes::dequantize_4bit"}
BNB_GEMM_OPS = {"bitsandbytes::gemm_4bit"}


def code_table(name: str) -> torch.Tensor:
    """bitsandbytes' 16 code values for ``"nf4"`` or ``"fp4"`` as float32 (its computation)."""
    if name == "nf4":
        data = torch.tensor(NF4_VALUES, dtype=torch.float32)
    elif name == "fp4":
        data = torch.tensor(FP4_RAW, dtype=torch.float32)
    else:
        raise ValueError(f"table must be 'nf4' or 'fp4', got {name!r}")
    return data / data.abs().max()


def table_name(table: torch.Tensor, dtype: torch.dtype | None = None) -> str:
    """``nf4`` / ``fp4`` when ``table`` [16] holds bitsandbytes' values (in float32 or
    rounded to ``dtype``), else ``lut16``."""
    if table.numel() == 16:
        t = table.detach().cpu().to(torch.float64)
        for name in ("nf4", "fp4"):
            ref = code_table(name)
            for d in dict.fromkeys([torch.float32, dtype or torch.float32]):
                if torch.equal(t, ref.to(d).to(torch.float64)):
                    return name
    return "lut16"


@dataclass
class LookupTableMatch:
    """A weight W[n, k] = table[codes[n, k]] * scales[n, k // group_size] (ops.lut_dequantize)."""

    codes: torch.Tensor        # uint8 [N, K], values in [0, 16)
    table: torch.Tensor        # float32 [16] (a shorter table padded with zeros)
    scales: torch.Tensor       # [N, K // group_size]
    group_size: int
    dequant_dtype: torch.dtype
    name: str                  # nf4, fp4 or lut16
    source: str = "graph"      # "graph" or the bitsandbytes op it was read through
    bits: int = 4

    @property
    def format(self) -> str:
        k = self.codes.shape[1]
        block = "per-channel" if self.group_size == k else f"b{self.group_size}"
        via = "" if self.source == "graph" else f" ({self.source})"
        return f"w4a16 {self.name} {block}{via}"


class NoLookup(NoMatch):
    """No constant table of floats indexed by a per-element integer tensor feeds the weight
    (the caller keeps its own reason)."""


@dataclass
class _Lookup:
    node: fx.Node              # the node whose value is T[c] (times ``pre``)
    codes: torch.Tensor        # long, node's shape, values in [0, len(table))
    table: torch.Tensor        # float64 [<= 16]
    pre: torch.Tensor | None   # float64, node's shape: a scale applied inside the node
    source: str = "graph"


def _op_name(target) -> str:
    name = getattr(target, "name", None)
    try:
        return name() if callable(name) else ""
    except Exception:  # noqa: BLE001 - not an OpOverload
        return ""


def _registered(names: set[str]):
    """The first of the ops ``names`` (``namespace::op``) that is registered, or None."""
    for full in sorted(names):
        ns, op = full.split("::")
        try:
            return getattr(getattr(torch.ops, ns), op).default
        except (AttributeError, RuntimeError):
            continue
    return None


def is_bnb_gemm(node: fx.Node) -> bool:
    """bitsandbytes' 4-bit matmul op (``gemm_4bit``), which holds its weight in its arguments."""
    return node.op == "call_function" and _op_name(node.target) in BNB_GEMM_OPS


def _unpack_bnb(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """bitsandbytes' 4-bit storage: two codes per byte of the flattened weight, element 2i
    in the high nibble, 2i + 1 in the low one (any storage dtype viewed as bytes)."""
    a = packed.contiguous().reshape(-1)
    if a.dtype != torch.uint8:
        a = a.view(torch.uint8)
    a = a.to(torch.int64)
    return torch.stack((a >> 4, a & 0xF), dim=-1).reshape(-1)[:numel]


def _bnb_absmax(ev: ConstantEvaluator, args: list) -> torch.Tensor:
    """gemm_4bit's per-block absmax as float32: nested (double quant) absmax read back as
    ``absmax_code[absmax_8bit] * absmax[i // 256] + absmax_offset``, bitsandbytes' own
    dequantize_blockwise when it is registered."""
    absmax = ev.value(args[3]).to(torch.float32)
    q8, code, offset = (ev.value(a) if isinstance(a, fx.Node) else a for a in args[7:10])
    if q8 is None:
        return absmax
    blockwise = getattr(getattr(torch.ops, "bitsandbytes", None), "dequantize_blockwise", None)
    if blockwise is not None:
        nested = blockwise.default(q8, absmax, code, 256, torch.float32)
    else:
        nested = code.to(torch.float32)[q8.long()] * absmax.repeat_interleave(256)[:q8.numel()]
    return (nested + offset).to(torch.float32)


def _bnb_lookup(ev: ConstantEvaluator, node: fx.Node, absmax: torch.Tensor | None = None
                ) -> _Lookup:
    """A dequantize_4bit node (A, absmax, blocksize, quant_type, shape, dtype) or gemm_4bit's
    weight (A, B, shapeB, absmax, blocksize, quant_type, ...) read by the documented layout."""
    if absmax is None:
        packed, absmax_node, blocksize, quant_type, shape = node.args[:5]
        absmax = ev.value(absmax_node).to(torch.float32)
    else:
        packed, shape, _, blocksize, quant_type = node.args[1:6]
    shape = [int(d) for d in shape]
    numel = math.prod(shape)
    if quant_type not in ("nf4", "fp4"):
        raise NoMatch(f"bitsandbytes quant_type {quant_type!r} (nf4 and fp4 are read)")
    if numel % blocksize:
        raise NoMatch(f"bitsandbytes blocks of {blocksize} do not tile the {numel} weights")
    codes = _unpack_bnb(ev.value(packed), numel).reshape(shape)
    pre = absmax.to(torch.float64).reshape(-1, 1).expand(-1, blocksize).reshape(shape)
    return _Lookup(node, codes, code_table(quant_type).to(torch.float64), pre,
                   f"bitsandbytes {quant_type}")


def _lookups(ev: ConstantEvaluator, b: fx.Node, numel: int) -> tuple[list[_Lookup], list[str]]:
    """The table lookups with one value per weight element among b's ancestors, and why
    others are not (a table of more than 16 values, say)."""
    found, misses = [], []
    for n in ancestors(b):
        if n.op != "call_function":
            continue
        val = n.meta.get("val")
        if not isinstance(val, torch.Tensor) or val.numel() != numel:
            continue
        if _op_name(n.target) in BNB_DEQUANT_OPS:
            try:
                found.append(_bnb_lookup(ev, n))
            except NoMatch as e:
                misses.append(str(e))
            continue
        if n.target is aten.index.Tensor:
            idx = [i for i in n.args[1] if i is not None]
            if len(idx) != 1 or len(n.args[1]) != 1:
                continue
            table, index = n.args[0], idx[0]
        elif n.target is aten.index_select.default and n.args[1] in (0, -1):
            table, index = n.args[0], n.args[2]
        elif n.target is aten.take.default:
            table, index = n.args
        elif n.target is aten.embedding.default:  # F.embedding(codes, table[:, None])
            table, index = n.args[:2]
        else:
            continue
        tv, iv = table.meta.get("val"), index.meta.get("val")
        if not (isinstance(tv, torch.Tensor) and tv.dtype.is_floating_point and
                isinstance(iv, torch.Tensor) and not iv.dtype.is_floating_point and
                iv.dtype != torch.bool):
            continue
        one_column = n.target is aten.embedding.default and tv.dim() == 2 and tv.shape[1] == 1
        if not (tv.dim() == 1 or one_column or n.target is aten.take.default):
            continue
        if not ev.is_constant(table):
            misses.append("the integer tensor indexes a table that is not constant")
            continue
        t = ev.value(table).reshape(-1).to(torch.float64)
        if t.numel() > MAX_TABLE:
            misses.append(f"the integer tensor indexes a lookup table of {t.numel()} values "
                          f"(at most {MAX_TABLE} are read)")
            continue
        codes = ev.value(index).to(torch.int64) % t.numel()  # negative indices wrap
        found.append(_Lookup(n, codes, t, None))
    return found, misses


def recognize_lookup(ev: ConstantEvaluator, b: fx.Node, miss: NoMatch | None = None
                     ) -> LookupTableMatch:
    """The lookup-table form of the matmul operand ``b`` ([K, N]); NoMatch says why not
    (``miss``, weight_only's reason, when no lookup of a constant table feeds b)."""
    try:
        w_kn = ev.value(b)
    except NotConstant:
        raise miss or NoMatch(not_constant_reason(ev, b, "weight operand is not constant")) from None
    if not isinstance(w_kn, torch.Tensor) or w_kn.dim() != 2:
        raise miss or NoMatch("weight operand is not a 2-D tensor")
    found, misses = _lookups(ev, b, w_kn.numel())
    if not found:
        if misses:
            raise NoMatch(misses[0])
        raise miss if miss is not None else NoLookup("no table lookup feeds the weight")
    reasons = []
    for lk in found:
        try:
            return _probe(ev, b, lk, w_kn)
        except NoMatch as e:
            reasons.append(str(e))
    raise NoMatch(f"the integer tensor indexes a lookup table, but {reasons[0]}")


def _probe(ev: ConstantEvaluator, b: fx.Node, lk: _Lookup, w_kn: torch.Tensor
           ) -> LookupTableMatch:
    dev = lk.codes.device  # the probes run where the graph's constants are (a GPU, say)
    # one float64 value a weight per probe (4.2 GB for an 8B model's output head): constants
    # broadcast where they can be, each probe's result dropped once read
    one = torch.ones((), dtype=torch.float64, device=dev)
    pre = lk.pre.to(dev) if lk.pre is not None else one.expand(lk.codes.shape)
    try:
        f0 = ev.shadow(b, lk.node, torch.zeros_like(one).expand(pre.shape))
        if f0.shape != w_kn.shape:
            raise NoMatch("the weight's shape changes in a way we do not read")
        if not bool(torch.all(f0 == 0)):
            raise NoMatch("an offset is added to the looked-up values (not table[codes] * scale)")
        del f0
        s_kn = ev.shadow(b, lk.node, pre)
        ratio = ev.shadow(b, lk.node, lk.codes.to(torch.float64) * pre)
    except UnreadableOp as e:
        why = f" ({e.why})" if e.why else ""
        raise NoMatch(f"the looked-up values go through an op we do not read: "
                      f"{e.node.target}{why}") from None
    nz = s_kn != 0
    ratio.div_(torch.where(nz, s_kn, one))  # codes * s / s, in place
    codes = torch.where(nz, torch.round(ratio), 0.0)
    if not bool(torch.all((codes - ratio).abs()[nz] <= 1e-6)) or \
            int(codes.min()) < 0 or int(codes.max()) >= lk.table.numel():
        raise NoMatch("the weight is not table[codes] times a scale per element")
    del ratio, nz
    codes, s, w = codes.t().to(torch.uint8), s_kn.t().contiguous(), w_kn.t()
    del s_kn
    n, k = codes.shape
    g_true = _true_group(s, one.new_zeros(()).expand_as(s))  # no offset: zeros, not stored
    group = _kernel_group(g_true, k)
    if group is None:
        raise _unsupported_group(g_true)
    s = s[:, ::group].contiguous()
    low = [w.dtype, torch.float32] if w.dtype != torch.float32 else [torch.float32]
    s_dtype = _exact_dtype(s, low)
    table = torch.zeros(MAX_TABLE, dtype=torch.float64, device=dev)
    table[: lk.table.numel()] = lk.table.to(dev)
    if s_dtype is None or _exact_dtype(table, [torch.float32]) is None:
        raise NoMatch("the table or the scales are not representable in the weight's dtype "
                      "or float32")
    table32 = table.to(torch.float32)
    worst = 0.0
    for dd in dict.fromkeys([w.dtype, torch.float32]):
        if dd not in OP_DTYPES:
            continue
        rec = (table32.to(dd)[codes.long()].reshape(n, k // group, group)
               * s.to(dd).reshape(n, -1, 1)).reshape(n, k).to(w.dtype)
        if torch.equal(rec, w):
            return LookupTableMatch(codes=codes.contiguous(), table=table32,
                                    scales=s.to(s_dtype), group_size=group, dequant_dtype=dd,
                                    name=table_name(lk.table[:16], w.dtype)
                                    if lk.table.numel() == 16 else "lut16",
                                    source=lk.source)
        worst = max(worst, float((rec.double() - w.double()).abs().max()))
    raise NoMatch(f"table[codes] * scales does not reproduce the weight bit for bit "
                  f"(max abs diff {worst:.3g})")


def recognize_bnb_gemm(ev: ConstantEvaluator, node: fx.Node
                       ) -> tuple[fx.Node, fx.Node | None, LookupTableMatch]:
    """(x, bias, match) for bitsandbytes' ``gemm_4bit(A, B, shapeB, absmax, blocksize,
    quant_type, bias, absmax_8bit, absmax_code, absmax_offset)``: ``linear(A, W, bias)`` with
    W = dequantize_4bit(B, absmax, ..., dtype=A.dtype), the fp32 product rounded to A's type."""
    args = list(node.args) + [None] * (10 - len(node.args))
    for i, key in enumerate(("bias", "absmax_8bit", "absmax_code", "absmax_offset"), start=6):
        if key in node.kwargs:
            args[i] = node.kwargs[key]
    x, bias = args[0], args[6]
    consts = [a for a in (args[1], args[3], *args[7:10]) if isinstance(a, fx.Node)]
    if not all(ev.is_constant(a) for a in consts):
        raise NoMatch("bitsandbytes gemm_4bit whose weight is not constant")
    xv = x.meta.get("val")
    if not isinstance(xv, torch.Tensor) or xv.dtype not in OP_DTYPES:
        raise NoMatch("bitsandbytes gemm_4bit with an activation dtype we do not run")
    absmax = _bnb_absmax(ev, args)
    lk = _bnb_lookup(ev, node, absmax=absmax)
    n, k = lk.codes.shape
    s_el = lk.pre.to(torch.float32)
    g_true = _true_group(s_el, torch.zeros_like(s_el))
    group = _kernel_group(g_true, k)
    if group is None:
        raise _unsupported_group(g_true)
    table32 = lk.table.to(torch.float32)
    w = (table32[lk.codes] * s_el).to(xv.dtype)  # the documented dequantize_4bit
    dequant = _registered(BNB_DEQUANT_OPS)
    if dequant is not None:  # the registered op itself must agree with the layout read
        real = dequant(ev.value(args[1]), absmax, args[4], args[5], [n, k], xv.dtype)
        if not torch.equal(real, w):
            raise NoMatch("bitsandbytes dequantize_4bit does not match its documented layout")
    match = LookupTableMatch(codes=lk.codes.to(torch.uint8), table=table32,
                             scales=s_el[:, ::group].contiguous(), group_size=group,
                             dequant_dtype=torch.float32, name=table_name(table32),
                             source=lk.source)
    return x, bias, match
