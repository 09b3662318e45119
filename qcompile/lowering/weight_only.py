"""Recognise a matmul's weight operand as a dequantization of constant integer data.

By meaning, not by spelling: the operand B [K, N] of ``mm(x, B)`` is an expression over
constants. We pick the integer tensor q inside it that has one value per weight element,
then probe the float part f(q) in exact float64 arithmetic: f(0) is the offset and
f(1) - f(0) the scale of every element. Scales and offsets constant over groups along K
give the group size; offset / scale gives integer zeros (or float ones, HQQ-style). The
recovered (q, scales, zeros) must reproduce the graph's weight bit for bit in the graph's
dtype before anything is rewritten. Every packing (AWQ's interleaved nibbles, GPTQ's
words along K, two nibbles per byte, plain int8) comes out the same way.

GPTQ's act-order (``desc_act``) checkpoints index their groups through a ``g_idx`` that is
not sorted: the scales vary along K without a group structure. Columns whose (scale,
offset) columns are equal over every row are one group, so a permutation ``perm`` of K
that sorts the columns by class gives the structure back; the match then describes
``W[:, perm]``, and the rewrite gathers the activation the same way
(``x[..., perm] @ W[:, perm].T == x @ W.T``), as Marlin and ExLlama run such checkpoints.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.fx as fx

from ..kernels.ops import OP_DTYPES
from .evaluate import (ConstantEvaluator, NotConstant, UnreadableOp, ancestors, integer_nodes,
                       not_constant_reason)

KERNEL_GROUP_SIZES = (256, 128, 64, 32)


@dataclass
class WeightOnlyMatch:
    """A weight W[n, k] = dequant(q[n, k]) in the op's terms (docs/kernels.md)."""

    q: torch.Tensor            # int16 [N, K], the integer values
    scales: torch.Tensor       # [N, K // group_size]
    zeros: torch.Tensor | None
    bits: int
    signed: bool
    group_size: int
    zero_mode: str
    dequant_dtype: torch.dtype
    # int64 [K]: q, scales and zeros describe W[:, perm] (GPTQ act-order); None when the
    # groups already follow K. The op must then read x[..., perm].
    perm: torch.Tensor | None = None

    def perm_key(self) -> bytes | None:
        """A hashable, exact identity of ``perm`` (for fusion keys)."""
        if self.perm is None:
            return None
        if not hasattr(self, "_perm_key"):
            self._perm_key = self.perm.cpu().numpy().tobytes()
        return self._perm_key

    @property
    def format(self) -> str:
        kind = f"{'int' if self.signed else 'uint'}{self.bits}"
        group = "per-channel" if self.group_size == self.q.shape[1] else f"g{self.group_size}"
        zeros = {"none": "", "sub": "+zeros", "add": "+offsets"}[self.zero_mode]
        if self.zero_mode == "sub" and not torch.equal(self.zeros, torch.round(self.zeros)):
            zeros = "+float-zeros"
        order = " act-order" if self.perm is not None else ""
        return f"w{self.bits}a16 {kind} {group}{zeros}{order}"


class NoMatch(Exception):
    """Why a matmul was left to Inductor; the message goes into the report."""


class _ActOrderMiss(NoMatch):
    """No permutation of K gives a kernel group size; ``classes``: how many groups of equal
    scales the columns fell into (fewest: the integer tensor that explains the most)."""

    def __init__(self, message: str, classes: int):
        super().__init__(message)
        self.classes = classes


def _bits(qmin: int, qmax: int) -> tuple[int, bool] | None:
    for bits in (4, 8):
        if 0 <= qmin and qmax < 2**bits:
            return bits, False
        if -(2 ** (bits - 1)) <= qmin and qmax < 2 ** (bits - 1):
            return bits, True
    return None


def _true_group(s: torch.Tensor, o: torch.Tensor) -> int:
    """Largest divisor g of K such that s and o are constant over each group of g."""
    n, k = s.shape
    for g in sorted((d for d in range(1, k + 1) if k % d == 0), reverse=True):
        sg, og = s.reshape(n, k // g, g), o.reshape(n, k // g, g)
        if torch.equal(sg, sg[..., :1].expand_as(sg)) and \
                torch.equal(og, og[..., :1].expand_as(og)):
            return g
    return 1


def _kernel_group(g_true: int, k: int) -> int | None:
    """The group size the kernels run for scales constant over groups of g_true along K."""
    if g_true == k:
        return k
    fits = [g for g in KERNEL_GROUP_SIZES if g_true % g == 0]
    return fits[0] if fits else None


def _unsupported_group(g_true: int) -> NoMatch:
    return NoMatch(f"group size {g_true} not supported (kernels take "
                   f"{', '.join(map(str, sorted(KERNEL_GROUP_SIZES)))} or per-channel)")


def _first_columns(inverse: torch.Tensor) -> torch.Tensor:
    """For class numbers ``inverse`` [K] (all of 0..C-1 present), each class's first column."""
    k = inverse.numel()
    first = torch.full((int(inverse.max()) + 1,), k, dtype=torch.long, device=inverse.device)
    return first.scatter_reduce(0, inverse, torch.arange(k, device=inverse.device), "amin")


def _column_classes(s: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
    """For each column k of s and o ([N, K]), the number of its class: columns equal in both
    over all N rows share one. Classes are numbered in the order of their first column, so
    the numbering depends on the partition of K only (linears of one g_idx get one perm).
    Classes found on a few rows are checked on all of them (a unique over every row's
    columns is exact but slow: 2 s for 4096 x 4096 on a CPU core), which that exact unique
    replaces only when the few rows merged unequal columns."""
    st = torch.cat([s, o])
    rows = torch.linspace(0, st.shape[0] - 1, min(16, st.shape[0])).long().unique()
    _, inverse = torch.unique(st[rows], dim=1, return_inverse=True)
    first = _first_columns(inverse)
    if not torch.equal(st, st[:, first[inverse]]):
        _, inverse = torch.unique(st, dim=1, return_inverse=True)
        first = _first_columns(inverse)
    rank = torch.empty_like(first)
    rank[torch.argsort(first)] = torch.arange(first.numel(), device=first.device)
    return rank[inverse]


def _act_order_perm(s: torch.Tensor, o: torch.Tensor, g_true: int) -> torch.Tensor:
    """A permutation of K under which s and o ([N, K]) have a group structure the kernels
    take (GPTQ act-order's ``g_idx``), or NoMatch with the reason."""
    inverse = _column_classes(s, o)
    sizes = torch.bincount(inverse)
    gcd = 0
    for size in sizes.tolist():
        gcd = math.gcd(gcd, size)
    fits = [g for g in KERNEL_GROUP_SIZES if gcd % g == 0]
    if not fits:
        shown = sorted(set(sizes.tolist()))
        more = ", ..." if len(shown) > 6 else ""
        if g_true > 1:
            raise _unsupported_group(g_true)
        if _shared_along_rows(s, o):
            raise _ActOrderMiss(
                "scales and zeros are shared by groups of rows (output channels) and vary "
                "along K: the kernels take groups along K (HQQ: axis=1)", len(sizes))
        raise _ActOrderMiss(
            f"scales vary along K without a supported group size, and grouping K's columns "
            f"by equal scales and zeros (act-order, g_idx) gives {len(sizes)} groups of sizes "
            f"{', '.join(map(str, shown[:6]))}{more}, not all multiples of one of "
            f"{', '.join(map(str, sorted(KERNEL_GROUP_SIZES)))}", len(sizes))
    return torch.argsort(inverse, stable=True)


def _shared_along_rows(s: torch.Tensor, o: torch.Tensor) -> bool:
    """Rows of s and o ([N, K]) share their (scale, zero) pairs within each column, at most
    N / 2 distinct pairs a column: quantization groups along N (HQQ's axis=0)."""
    n = s.shape[0]
    if n < 2:
        return False
    # each column sorted by (scale, zero): sort by zero, then stably by scale
    o1, i1 = torch.sort(o, dim=0, stable=True)
    s1 = torch.gather(s, 0, i1)
    s2, i2 = torch.sort(s1, dim=0, stable=True)
    o2 = torch.gather(o1, 0, i2)
    distinct = 1 + ((s2[1:] != s2[:-1]) | (o2[1:] != o2[:-1])).sum(dim=0)
    return bool((distinct <= n // 2).all())


def _exact_dtype(t: torch.Tensor, prefer: list[torch.dtype]) -> torch.dtype | None:
    for dt in prefer:
        if torch.equal(t.to(dt).to(torch.float64), t):
            return dt
    return None


def _reconstruct(q, s, z, group, zero_mode, dd, out_dtype):
    n, k = q.shape
    qg = q.to(dd).reshape(n, k // group, group)
    sg = s.to(dd).reshape(n, -1, 1)
    if zero_mode == "none":
        w = qg * sg
    elif zero_mode == "sub":
        w = (qg - z.to(dd).reshape(n, -1, 1)) * sg
    else:
        w = qg * sg + z.to(dd).reshape(n, -1, 1)
    return w.reshape(n, k).to(out_dtype)


def recognize_weight(ev: ConstantEvaluator, b: fx.Node) -> WeightOnlyMatch:
    """Recover the quantized form of the matmul operand ``b`` ([K, N]) or raise NoMatch."""
    try:
        w_kn = ev.value(b)
    except NotConstant:
        raise NoMatch(not_constant_reason(
            ev, b, "weight operand is not constant (activation x activation matmul)")) from None
    if not isinstance(w_kn, torch.Tensor) or w_kn.dim() != 2:
        raise NoMatch("weight operand is not a 2-D tensor")
    k, n = w_kn.shape
    anc = ancestors(b)
    int_nodes = integer_nodes(anc)
    if not int_nodes:
        raise NoMatch("weight is a float constant (not quantized)")
    # The integer weight is usually an integer tensor; some libraries (HQQ) unpack it
    # into a float tensor of whole numbers, so those count too.
    from_ints = {n_ for n_ in anc if any(a in int_nodes for a in ancestors(n_))}
    candidates = []
    for pos, c in enumerate(anc):
        val = c.meta.get("val")
        if not isinstance(val, torch.Tensor) or val.numel() != k * n or c not in from_ints:
            continue
        is_int = c in int_nodes
        if not is_int and not val.dtype.is_floating_point:
            continue
        v = ev.value(c)
        if not is_int and not torch.equal(v, torch.round(v)):
            continue
        fit = _bits(int(v.min()), int(v.max())) if v.numel() else None
        if fit is not None:
            candidates.append((fit[0], not is_int, -pos, c, v))
    if not candidates:
        if any(isinstance(v := c.meta.get("val"), torch.Tensor) and v.numel() > k * n
               for c in int_nodes):
            raise NoMatch("only an integer tensor larger than the weight feeds it: a part of a "
                          "larger dequantized tensor (a merged q/k/v or padded weight split or "
                          "sliced after dequantizing)? Slice the integer weight and its scales "
                          "before dequantizing")
        raise NoMatch("no integer tensor of at most 8 bits with one value per weight "
                      "element feeds the weight")
    candidates.sort(key=lambda t: t[:3])
    misses: list[NoMatch] = []
    for *_, node, qv in candidates:
        try:
            return _probe(ev, b, node, qv, w_kn)
        except NoMatch as e:
            misses.append(e)
    reason = misses[0]
    if isinstance(reason, _ActOrderMiss):  # e.g. GPTQ's zeros[g_idx], tried before q
        reason = min((e for e in misses if isinstance(e, _ActOrderMiss)),
                     key=lambda e: e.classes)
    raise NoMatch(str(reason))


def _probe(ev: ConstantEvaluator, b: fx.Node, p: fx.Node, qv: torch.Tensor,
           w_kn: torch.Tensor) -> WeightOnlyMatch:
    try:
        f0 = ev.shadow(b, p, torch.zeros_like(qv, dtype=torch.float64))
        f1 = ev.shadow(b, p, torch.ones_like(qv, dtype=torch.float64))
        fq = ev.shadow(b, p, qv.to(torch.float64))
    except UnreadableOp as e:
        why = f" ({e.why})" if e.why else ""
        raise NoMatch(f"weight produced by an op we do not read: {e.node.target}{why}") from None
    if f0.shape != w_kn.shape:
        raise NoMatch("dequantization changes the weight's shape in a way we do not read")
    a = f1 - f0
    safe = torch.where(a != 0, a, torch.ones_like(a))
    q = torch.where(a != 0, torch.round((fq - f0) / safe), torch.zeros_like(a))
    q, s_el, o_el = q.t().contiguous(), a.t().contiguous(), f0.t().contiguous()
    w = w_kn.t()
    n, k = q.shape
    g_true = _true_group(s_el, o_el)
    group, perm = _kernel_group(g_true, k), None
    if group is None:  # GPTQ act-order: the groups are K's columns in another order
        perm = _act_order_perm(s_el, o_el, g_true)
        q, s_el, o_el, w = q[:, perm], s_el[:, perm], o_el[:, perm], w[:, perm]
        group = _kernel_group(_true_group(s_el, o_el), k)
        assert group is not None
    s, o = s_el[:, ::group], o_el[:, ::group]
    fit = _bits(int(q.min()), int(q.max()))
    if fit is None:
        raise NoMatch("integer weight does not fit in 8 bits")
    bits, signed = fit
    zero_forms: list[tuple[str, torch.Tensor | None, torch.Tensor, bool]] = []
    if torch.all(o == 0):
        zero_forms.append(("none", None, q, signed))
    else:
        nonzero_s = s != 0
        z = torch.where(nonzero_s, -o / torch.where(nonzero_s, s, torch.ones_like(s)), 0.0)
        if bool(torch.all(nonzero_s | (o == 0))):
            mid = 2 ** (bits - 1)
            if not signed and bool(torch.all(z == mid)):  # symmetric stored as q + 2^(b-1)
                zero_forms.append(("none", None, q - mid, True))
            zero_forms.append(("sub", z, q, signed))  # integer zeros, or float (HQQ)
        zero_forms.append(("add", o, q, signed))
    low = [w.dtype, torch.float32] if w.dtype != torch.float32 else [torch.float32]
    s_dtype = _exact_dtype(s, low)
    if s_dtype is None:
        raise NoMatch("scales are not representable in the weight's dtype or float32")
    worst, tried = 0.0, 0
    for zero_mode, z, qq, sg in zero_forms:
        z_dtype = None if z is None else _exact_dtype(z, low)
        if z is not None and z_dtype is None:
            continue
        tried += 1
        for dd in dict.fromkeys([w.dtype, torch.float32]):
            if dd not in OP_DTYPES:
                continue  # float64: the ops dequantize in bf16, fp16 or fp32
            rec = _reconstruct(qq, s, z, group, zero_mode, dd, w.dtype)
            if torch.equal(rec, w):
                return WeightOnlyMatch(
                    q=qq.to(torch.int16), scales=s.to(s_dtype).contiguous(),
                    zeros=None if z is None else z.to(z_dtype).contiguous(),
                    bits=bits, signed=sg, group_size=group, zero_mode=zero_mode,
                    dequant_dtype=dd, perm=perm)
            worst = max(worst, float((rec.double() - w.double()).abs().max()))
    if not tried:
        raise NoMatch("zeros are not representable in the weight's dtype or float32")
    raise NoMatch(f"recovered (q, scales, zeros) do not reproduce the weight bit for bit "
                  f"(max abs diff {worst:.3g})")
