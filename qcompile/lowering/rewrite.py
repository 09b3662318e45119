"""The qcompile graph pass: matmul subgraphs -> qcompile op calls, with a report entry each.

Runs on the ATen inference graph from AOTAutograd, installed by the backend as Inductor's
``joint_custom_pre_pass`` so it sees the graph before freezing constant-folds dequant
chains and before Inductor's own quantization fusions (ARCHITECTURE.md says why). The
graph's parameter and buffer placeholders are given their real values by the backend.

For each matmul node (mm, addmm, _int_mm) the pass asks the recognisers in
``weight_only`` and ``int8_rescale`` (``packed_ops`` for tinygemm's int4 and the int8pack
ops, whose weight is read through the op); a recognised subgraph becomes one call of
``qcompile::mixed_gemm`` or ``qcompile::int8_gemm`` with the repacked weight as a new
constant, and the dead dequantization is removed; anything else stays exactly as it was.

With ``fuse_linears`` the matmuls that read the same activation in the same format
(attention's q/k/v, the MLP's gate/up) become one call on the weights concatenated along N,
each consumer reading a contiguous copy of its columns (a pointwise copy Inductor can fuse
into the consumer): fewer, larger launches, which matters at decode. Weight-only matmuls
read the same activation when it is one tensor up to views; W8A8 ones when their quantized
activations (and row scales, zero points) are the same value, which each linear computes
for itself: a value numbering of the graph (equal op on equal inputs, as CSE would merge)
says so, and the duplicate quantizations die with the matmuls they fed.
"""

from __future__ import annotations

import itertools
import logging
import operator
import re
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch._guards import detect_fake_mode

from .. import kernels
from ..kernels.ops import dtype_name
from .act_order import gather_activation
from .decompositions import WEIGHT_OPERAND
from .evaluate import (INPUT_WEIGHT_REASON, ConstantEvaluator, ancestors, integer_nodes, users_chain,
                       value_users)
from .int8_rescale import Int8Match, recognize_int8
from .lookup_table import LookupTableMatch, is_bnb_gemm, recognize_bnb_gemm, recognize_lookup
from .packed_ops import OPS as PACKED_OPS
from .packed_ops import recognize_packed
from .report import MatchRecord, Report, dump_graph
from .weight_only import NoMatch, WeightOnlyMatch, recognize_weight

log = logging.getLogger("qcompile")
aten, prims = torch.ops.aten, torch.ops.prims
MATMULS = {aten.mm.default: "mm", aten.addmm.default: "addmm", aten._int_mm.default: "_int_mm",
           aten.bmm.default: "bmm", **PACKED_OPS}
ACT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_VIEWS = {aten.view.default, aten._unsafe_view.default, aten.reshape.default}
_uid = itertools.count()


def _source(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = str(list(stack.values())[-1][0])
        return re.sub(r"^[LG]\['[^']*'\]\.?", "", path) or path
    return ""


def _val(node) -> torch.Tensor | None:
    v = node.meta.get("val") if isinstance(node, fx.Node) else None
    return v if isinstance(v, torch.Tensor) else None


def _static_m(x: fx.Node) -> int | None:
    """The token count (rows of the flattened activation) when static, else None."""
    v = _val(x)
    if v is None:
        return None
    m = 1
    for d in v.shape[:-1]:
        if not isinstance(d, int):
            return None
        m *= d
    return m


class _Builder:
    """Adds constants (as get_attr of the owning module) and nodes with fake metadata."""

    def __init__(self, graph: fx.Graph):
        self.graph, self.gm = graph, graph.owning_module
        vals = [n.meta.get("val") for n in graph.nodes if n.op == "placeholder"]
        self.fake_mode = detect_fake_mode([v for v in vals if isinstance(v, torch.Tensor)])
        self._added: dict[tuple, list[tuple[str, torch.Tensor]]] = {}

    def constant(self, tensor: torch.Tensor, hint: str) -> fx.Node:
        """A get_attr of a new buffer holding tensor, or of the one this builder added
        before with equal contents (a layer applied twice reads one packed copy)."""
        tensor = tensor.contiguous()
        flat = tensor.reshape(-1)
        sample = flat[:: max(1, flat.numel() // 64)][:64].cpu().contiguous().view(torch.uint8)
        key = (tensor.dtype, tuple(tensor.shape), tensor.device, sample.numpy().tobytes())
        same = next((n for n, t in self._added.get(key, []) if torch.equal(t, tensor)), None)
        name = same or f"_qcompile_{hint}_{next(_uid)}"
        if same is None:
            self.gm.register_buffer(name, tensor)
            self._added.setdefault(key, []).append((name, tensor))
        node = self.graph.get_attr(name)
        if self.fake_mode is not None:
            node.meta["val"] = self.fake_mode.from_tensor(tensor, static_shapes=True)
        return node

    def call(self, target, args, like: fx.Node | None = None, kwargs: dict | None = None
             ) -> fx.Node:
        node = self.graph.call_function(target, args, kwargs or {})
        if self.fake_mode is not None:
            fake_args = fx.node.map_arg(args, lambda a: a.meta["val"])
            fake_kwargs = fx.node.map_arg(kwargs or {}, lambda a: a.meta["val"])
            with self.fake_mode:
                node.meta["val"] = target(*fake_args, **fake_kwargs)
        elif like is not None:
            node.meta["val"] = like.meta.get("val")
        return node


def _post_scale(mm: fx.Node, ev: ConstantEvaluator,
                n: int) -> tuple[fx.Node, torch.Tensor, int] | None:
    """gpt-fast's ``linear(x, q.to(dtype)) * s``: a constant per-column multiply after mm."""
    chain = users_chain(mm, lambda u: u.target in _VIEWS)
    last = chain[-1] if chain else mm
    if len(value_users(last)) != 1:
        return None
    mul = value_users(last)[0]
    if mul.op != "call_function" or mul.target is not aten.mul.Tensor:
        return None
    index = 0 if mul.args[0] is last else 1
    other = mul.args[1 - index]
    if not isinstance(other, fx.Node) or not ev.is_constant(other):
        return None
    v = ev.value(other)
    if v.numel() != n or v.shape[-1] != n or _val(mul).dtype != _val(mm).dtype:
        return None
    return mul, v.reshape(n).to(torch.float64), index


def _reuse_or_constant(b: _Builder, ev: ConstantEvaluator, w_node: fx.Node,
                       packed: torch.Tensor, hint: str) -> fx.Node:
    """The model's own tensor when it already is the packed weight (int8 [N, K] usually
    is), so the compiled graph holds no second copy; else a new constant."""
    for n in ancestors(w_node):
        if n.op not in ("placeholder", "get_attr") or not ev.is_constant(n):
            continue
        v = ev.value(n)
        if isinstance(v, torch.Tensor) and v.dtype == packed.dtype and \
                v.shape == packed.shape and v.is_contiguous() and torch.equal(v, packed):
            return n
    return b.constant(packed, hint)


@dataclass
class _MixedSite:
    """A recognised weight-only matmul, with a post-scale folded into its scales."""

    mm: fx.Node
    x: fx.Node
    w: fx.Node
    bias: fx.Node | None
    match: WeightOnlyMatch
    rec: MatchRecord
    scales: torch.Tensor
    zeros: torch.Tensor | None
    post: tuple | None

    @property
    def rows(self) -> int:
        """The weight's N."""
        return int(self.match.q.shape[0])

    def activation(self) -> fx.Node:
        """The matmul's activation operand now: ``x`` as matched, unless a rewrite since
        replaced that node (a linear reading the previous linear's 2-D result directly)."""
        return self.mm.args[1] if self.mm.target is aten.addmm.default else self.mm.args[0]

    def fusion_key(self) -> tuple:
        """Sites with equal keys can share one launch: same activation node, same format,
        biases all absent or all constants (defined before any of the matmuls)."""
        m = self.match
        const_bias = self.bias is None or self.bias.op in ("placeholder", "get_attr")
        return (_activation_key(self.x), m.bits, m.signed, m.group_size, m.zero_mode,
                m.dequant_dtype, int(m.q.shape[1]), self.bias is None, const_bias or id(self),
                m.perm_key())  # act-order: one gather of x serves sites of one perm


def _activation_key(x: fx.Node) -> tuple:
    """What an activation is, up to views: each F.linear flattens its input with a view of
    its own, so q/k/v read three view nodes of one tensor (equal when base and shape are)."""
    base = x
    while base.op == "call_function" and base.target in _VIEWS:
        base = base.args[0]
    v = _val(x)
    return (base, str(tuple(v.shape)) if v is not None else x)


def _mixed_site(mm: fx.Node, x: fx.Node, w_node: fx.Node, bias: fx.Node | None,
                match: WeightOnlyMatch, ev: ConstantEvaluator, rec: MatchRecord) -> _MixedSite:
    n = match.q.shape[0]
    scales, zeros = match.scales, match.zeros
    post = _post_scale(mm, ev, n) if bias is None else None
    if post is not None:
        c = post[1].to(scales.device)
        scales = (scales.double() * c[:, None]).to(torch.float32)
        if match.zero_mode == "add":
            zeros = (zeros.double() * c[:, None]).to(torch.float32)
        rec.format += " post-scale"
    return _MixedSite(mm, x, w_node, bias, match, rec, scales, zeros, post)


_CASTS = (torch.ops.prims.convert_element_type.default, aten._to_copy.default)


def _single_user(node: fx.Node, *targets) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 and users[0].target in targets else None


def _through_views(node: fx.Node) -> fx.Node:
    """node, or the end of the chain of single-user views after it."""
    while (user := _single_user(node, *_VIEWS)) is not None:
        node = user
    return node


def _silu_of(x: fx.Node) -> fx.Node | None:
    """The node computing silu(x) as x's only use: aten.silu, or a decomposition of it,
    x * sigmoid(x) or x / (1 + exp(-x)) (what AOTAutograd hands the pass)."""
    silu = _single_user(x, aten.silu.default)
    if silu is not None:
        return silu
    users = list(x.users)
    sigmoid = next((u for u in users if u.target == aten.sigmoid.default), None)
    if len(users) == 2 and sigmoid is not None:  # x * sigmoid(x)
        mul = _single_user(sigmoid, aten.mul.Tensor)
        return mul if mul is not None and set(mul.args) == {x, sigmoid} and mul in users else None
    neg = next((u for u in users if u.target == aten.neg.default), None)
    div = next((u for u in users if u.target == aten.div.Tensor and u.args[0] is x), None)
    if len(users) != 2 or neg is None or div is None:
        return None
    exp = _single_user(neg, aten.exp.default)
    add = _single_user(exp, aten.add.Tensor) if exp is not None else None
    if add is None or add.args[0] is not exp or add.args[1] != 1 or div.args[1] is not add:
        return None
    return div


def _gated_product(gate: _MixedSite, up: _MixedSite) -> fx.Node | None:
    """The ``silu(gate) * up`` node of a gated MLP, when the two matmuls feed nothing else."""
    if gate.post is not None or up.post is not None or gate.bias is not None or up.bias is not None:
        return None
    g, u = _through_views(gate.mm), _through_views(up.mm)
    # a low-precision model's silu runs in float32 between two casts
    g = _single_user(g, *_CASTS) or g
    silu = _silu_of(g)
    if silu is None:
        return None
    silu = _single_user(silu, *_CASTS) or silu
    mul = _single_user(silu, aten.mul.Tensor)
    if mul is None or set(mul.args) != {silu, u} or _single_user(u, aten.mul.Tensor) is not mul:
        return None
    return mul


def _gated_pair(sites: list[_MixedSite]) -> tuple[_MixedSite, _MixedSite, fx.Node] | None:
    """(gate, up, product) where two fused sites are a decode step's gated MLP: equal widths
    in whole 16-row tiles, few tokens (the decode kernels' range, where the gating runs in
    the GEMM's epilogue; more tokens keep Inductor's fused pointwise kernel)."""
    from ..kernels.mixed_gemm import DECODE_MAX_M

    if len(sites) != 2 or sites[0].rows != sites[1].rows:
        return None
    m = _static_m(sites[0].x)
    if m is None or m > DECODE_MAX_M or sites[0].rows % 16:
        return None
    for gate, up in (sites, sites[::-1]):
        mul = _gated_product(gate, up)
        if mul is not None:
            return gate, up, mul
    return None


def _same_value(node: fx.Node) -> bool:
    """A view, an alias, or a slice that keeps the whole tensor (transformers'
    ``hidden[:, -0:]`` before its output head, an alias by the time qcompile sees it):
    node's value is its input's, maybe reshaped."""
    if node.op != "call_function":
        return False
    if node.target in _VIEWS or node.target is aten.alias.default:
        return True
    if node.target is not aten.slice.Tensor or not isinstance(node.args[0], fx.Node):
        return False
    vi, vo = _val(node.args[0]), _val(node)
    step = node.args[4] if len(node.args) > 4 else 1
    return vi is not None and vo is not None and step == 1 and tuple(vi.shape) == tuple(vo.shape)


def _terminal_users(node: fx.Node) -> list[fx.Node]:
    """The users of node's value past any chain of views (and whole-tensor slices)."""
    out = []
    for u in node.users:
        out.extend(_terminal_users(u) if _same_value(u) else [u])
    return out


def _rms_norm_of(x: fx.Node, ev: ConstantEvaluator, sites: list[_MixedSite]
                 ) -> tuple[fx.Node, fx.Node, float] | None:
    """(h, weight, eps) when the activation x (up to views) is an RMSNorm of h that only these
    sites' matmuls read: ``(h32 * rsqrt(mean(h32^2, -1, keepdim) + eps)).to(h.dtype) * weight``
    with h32 = h.float() (the Llama / gpt-fast form; the casts absent in a float32 model) and
    weight a constant [K] of h's type (the node itself: the op reads the model's tensor, so
    it is neither copied nor released as a weight only rewritten matmuls read)."""
    base = x
    while _same_value(base):
        base = base.args[0]
    if base.op != "call_function" or base.target is not aten.mul.Tensor or len(base.args) != 2:
        return None
    normed, w = base.args
    if not (isinstance(w, fx.Node) and ev.is_constant(w)):
        normed, w = w, normed
    if not (isinstance(normed, fx.Node) and isinstance(w, fx.Node) and ev.is_constant(w)):
        return None
    inner = normed.args[0] if normed.target in _CASTS else normed
    if inner.op != "call_function" or inner.target is not aten.mul.Tensor:
        return None
    x32, rs = inner.args
    if getattr(x32, "target", None) is aten.rsqrt.default:
        x32, rs = rs, x32
    if getattr(rs, "target", None) is not aten.rsqrt.default:
        return None
    add = rs.args[0]
    if add.target is not aten.add.Tensor or not isinstance(add.args[1], (int, float)):
        return None
    mean = add.args[0]
    if mean.target is not aten.mean.dim or not isinstance(mean.args[0], fx.Node):
        return None
    sq = mean.args[0]
    keepdim = mean.args[2] if len(mean.args) > 2 else mean.kwargs.get("keepdim", False)
    v32 = _val(x32)
    if (v32 is None or v32.dtype != torch.float32 or not keepdim
            or list(mean.args[1]) not in ([-1], [v32.dim() - 1])
            or not ((sq.target is aten.pow.Tensor_Scalar and sq.args[0] is x32 and sq.args[1] == 2)
                    or (sq.target is aten.mul.Tensor and sq.args == (x32, x32)))):
        return None
    h = x32.args[0] if x32.op == "call_function" and x32.target in _CASTS else x32
    vh, vout, vw, vx = _val(h), _val(base), _val(w), _val(x)
    if (vh is None or vout is None or vw is None or vx is None or vh.dtype != vout.dtype
            or vw.dtype != vh.dtype or vh.shape != v32.shape or tuple(vw.shape) != (vh.shape[-1],)):
        return None
    if vx.shape[-1] != vh.shape[-1]:
        return None  # a norm over groups or heads of the matmul's rows (views between): not the op's
    if set(_terminal_users(base)) != {site.mm for site in sites}:
        return None  # the normalized activation is read elsewhere too: keep it
    return h, w, float(add.args[1])


def _residual_of(site: _MixedSite) -> tuple[fx.Node, fx.Node] | None:
    """(add, other) when the site's result (after views and its folded post-scale) only
    feeds ``add(result, other)`` with other of the same shape and type: a skip connection."""
    end = _through_views(site.mm)
    if site.post is not None:  # the post-scale's mul, folded into the scales, goes too
        if _single_user(end, aten.mul.Tensor) is not site.post[0]:
            return None
        end = _through_views(site.post[0])
    add = _single_user(end, aten.add.Tensor)
    if add is None or len(add.args) != 2 or add.kwargs:
        return None
    other = add.args[1] if add.args[0] is end else add.args[0]
    if other is end or not isinstance(other, fx.Node):
        return None
    vo, va, ve = _val(other), _val(add), _val(end)
    if vo is None or va is None or ve is None or not (vo.shape == va.shape == ve.shape) or \
            not (vo.dtype == va.dtype == ve.dtype):
        return None
    return add, other


_MIXED_OP = torch.ops.qcompile.mixed_gemm.default
_GATED_OP = torch.ops.qcompile.mixed_gemm_gated.default
_NORM_OUT_OP = torch.ops.qcompile.mixed_gemm_norm_out.default
_LUT_OP = torch.ops.qcompile.lut_gemm.default
_LUT_GATED_OP = torch.ops.qcompile.lut_gemm_gated.default
_LUT_NORM_OUT_OP = torch.ops.qcompile.lut_gemm_norm_out.default


@dataclass(frozen=True)
class _FusedForms:
    """A weight family's decode-kernel ops: the plain one (its schema then ``norm_weight``,
    ``norm_eps``, ``residual``, ``norm_ssq`` from ``norm_arg``), the gated one (``norm_weight``,
    ``norm_eps``, ``norm_ssq``) and the one that also writes the next norm's input (the plain
    arguments before ``norm_arg``, then ``residual``, ``next_norm_weight``)."""

    plain: object
    gated: object
    norm_out: object
    norm_arg: int


_MIXED_FORMS = _FusedForms(_MIXED_OP, _GATED_OP, _NORM_OUT_OP, 12)
_LUT_FORMS = _FusedForms(_LUT_OP, _LUT_GATED_OP, _LUT_NORM_OUT_OP, 9)
_FORMS_OF = {op: f for f in (_MIXED_FORMS, _LUT_FORMS) for op in (f.plain, f.gated)}


def _norm_producer(h: fx.Node) -> fx.Node | None:
    """The qcompile op that computes h (up to views), if it can also write an RMSNorm's
    input from its epilogue (``*_norm_out``): a plain op's 2-D result of 16 | N, from an op
    that takes no norm itself."""
    while h.op == "call_function" and h.target in _VIEWS:
        h = h.args[0]
    forms = _FORMS_OF.get(h.target) if h.op == "call_function" else None
    if forms is None or h.target is not forms.plain:
        return None
    args = list(h.args) + [None] * 4
    v = _val(h)
    if (args[forms.norm_arg] is not None or args[forms.norm_arg + 3] is not None or v is None
            or v.dim() != 2 or v.shape[-1] % 16):
        return None
    return h


def _link_norms(b: _Builder, graph: fx.Graph) -> int:
    """Hand each in-op RMSNorm whose input another mixed_gemm op computes to that op: it
    becomes ``mixed_gemm_norm_out``, whose decode-kernel epilogue also writes its result times
    the norm weight and the result's partial sums of squares, and the reading op takes those
    (x, ``norm_ssq``) instead of staging the norm itself (every CTA of it re-reading x and the
    norm weight, which cost an int4 gate/up GEMM about as much as the norm kernel it
    replaced). A decode step's norms after a skip connection all link; the first layer's
    (after the embedding) stays in its op. Returns how many ops were linked."""
    linked = 0
    made: dict[fx.Node, tuple[fx.Node, fx.Node, fx.Node, fx.Node]] = {}  # producer -> outputs
    order = {node: i for i, node in enumerate(graph.nodes)}
    for op in list(graph.nodes):
        forms = _FORMS_OF.get(op.target) if op.op == "call_function" else None
        if forms is None:
            continue
        at = forms.norm_arg
        args = list(op.args)
        if len(args) <= at + 1 or args[at] is None:
            continue
        weight, eps, x_arg = args[at], args[at + 1], args[0]
        if x_arg.op != "call_function" or x_arg.target is not aten.reshape.default:
            continue
        prod = _norm_producer(x_arg.args[0])
        if prod is None:
            continue  # not an op's result, or one that takes a norm itself
        pforms = _FORMS_OF[prod.target]
        pargs = list(prod.args) + [None] * 4
        if order.get(weight, -1) > order[prod]:
            if weight.op != "get_attr":
                continue
            prod.prepend(weight)  # a constant: define it before the op that will read it
            order[weight] = order[prod] - 0.5  # (never moved after a use made here)
        if prod in made:
            if made[prod][0] is not weight:
                continue  # the value feeds two norms with different weights: one links
            _, normed, sums = made[prod][1:]
        else:
            with graph.inserting_after(prod):
                new = b.call(pforms.norm_out, (*pargs[:pforms.norm_arg],
                                               pargs[pforms.norm_arg + 2], weight),
                             kwargs=dict(prod.kwargs))  # named operands (gemm_scales)
            with graph.inserting_after(new):
                out = b.call(operator.getitem, (new, 0))
                normed = b.call(operator.getitem, (new, 1))
                sums = b.call(operator.getitem, (new, 2))
            prod.replace_all_uses_with(out)
            made[prod] = (weight, out, normed, sums)
            for rec in prod.meta.get("qcompile_records", []):
                rec.kernel += "; the next RMSNorm's input from its epilogue"
        xshape = list(_val(x_arg).shape)
        with graph.inserting_before(op):
            x_new = b.call(aten.reshape.default, (normed, xshape))
            ssq = b.call(aten.reshape.default, (sums, [*xshape[:-1], xshape[-1] // 16]))
        rest = [None, eps] + ([args[at + 2] if len(args) > at + 2 else None]
                              if op.target is forms.plain else [])
        op.args = (x_new, *args[1:at], *rest, ssq)
        for rec in op.meta.get("qcompile_records", []):
            rec.kernel = rec.kernel.replace("; RMSNorm in the op",
                                            "; RMSNorm in the op, its sums from the op before")
        linked += 1
    return linked


def _norm_and_residual(ev: ConstantEvaluator, sites: list, fuse: bool, n: int
                       ) -> tuple[tuple | None, tuple | None]:
    """(norm, residual) that a decode step's op over ``sites`` (an [n, K] weight, ``fuse``:
    its family runs them in the decode kernel) takes in: the RMSNorm its activation is
    (``_rms_norm_of``), where the op can stage it or gets it from the op before; the skip
    connection its single site's result feeds (``_residual_of``). None each where not, or
    at token counts beyond the decode kernels' fused range."""
    from ..kernels.mixed_gemm import DECODE_MAX_M

    first = sites[0]
    m = _static_m(first.x)
    if not fuse or m is None or m > DECODE_MAX_M:
        return None, None
    x = first.activation()
    norm = _rms_norm_of(x, ev, sites)
    if norm is not None and _norm_producer(norm[0]) is None and not kernels.norm_fits_in_kernel(
            m, n, _val(x).shape[-1], _val(x).dtype):
        norm = None  # the op could neither stage it nor get it from the op before
    return norm, (_residual_of(first) if len(sites) == 1 else None)


def _rewrite_mixed(b: _Builder, ev: ConstantEvaluator, sites: list[_MixedSite]) -> None:
    """One qcompile::mixed_gemm for sites sharing a fusion key (usually one site); a gated
    MLP's gate and up projections as one qcompile::mixed_gemm_gated (their rows interleaved
    in 16-row tiles, silu(gate) * up computed by the op)."""
    gated = _gated_pair(sites)
    if gated is not None:
        sites = list(gated[:2])  # gate, up
    first, match = sites[0], sites[0].match
    rows = _interleave if gated is not None else _cat
    zeros = rows([site.zeros for site in sites]) if first.zeros is not None else None
    prep = kernels.prepare_mixed_gemm(rows([site.match.q for site in sites]),
                                      rows([site.scales for site in sites]), zeros, match.bits,
                                      match.signed, match.group_size, match.zero_mode,
                                      _static_m(first.x), _val(first.x).dtype,
                                      has_bias=first.bias is not None)
    qweight, scales, zeros = prep.tensors
    # a decode step's RMSNorm before and skip connection after go into the decode kernel
    x = first.activation()
    norm, residual = _norm_and_residual(
        ev, sites, match.bits >= kernels.FUSE_NORM_MIN_BITS
        and kernels.fuses_in_kernel(prep.layout), qweight.shape[0])
    where = residual[0] if residual is not None else first.mm  # other may follow the mm
    with b.graph.inserting_before(where):
        x_arg, fused_args, notes = _norm_args(b, x, norm)
        x_arg, fused_args, gathered = gather_activation(b, match.perm, x_arg, fused_args)
        qw = (_reuse_or_constant(b, ev, first.w, qweight, "qweight") if len(sites) == 1
              else b.constant(qweight, "qweight"))
        weights = (qw, b.constant(scales, "scales"),
                   b.constant(zeros, "zeros") if zeros is not None else None)
        tail = (match.bits, match.signed, match.group_size, match.zero_mode,
                dtype_name(match.dequant_dtype), prep.layout, prep.config)
        _emit(b, _MIXED_FORMS, sites, gated, x_arg, weights, tail, fused_args, residual,
              prep.description, notes + gathered)


def _norm_args(b: _Builder, x: fx.Node, norm: tuple | None) -> tuple[fx.Node, tuple, str]:
    """(the op's x, its norm arguments, the report's note) for an RMSNorm taken into the op
    (``_rms_norm_of``'s (h, weight, eps): the op reads h and normalizes it) or none."""
    if norm is None:
        return x, (), ""
    h, weight, eps = norm
    return (b.call(aten.reshape.default, (h, list(_val(x).shape))), (weight, eps),
            "; RMSNorm in the op")


def _emit(b: _Builder, forms: _FusedForms, sites: list, gated: tuple | None, x_arg: fx.Node,
          weights: tuple, tail: tuple, fused_args: tuple, residual: tuple | None,
          desc: str, notes: str, named: dict | None = None) -> None:
    """Put a family's op (``forms``: arguments x, ``weights``, bias, ``tail``, then the
    fusions; ``named``: the operands it takes by name) in place of the sites' matmuls: the
    gated op in place of a gated MLP's product
    (``_gated_pair``), or the plain op with the sites' biases end to end, in place of the
    skip connection's add it takes in (``_residual_of``), else of each site's matmul (its
    columns of the result; a folded post-scale's mul goes). ``desc`` and ``notes``: the
    report's kernel line and what the op takes in."""
    first = sites[0]
    ns = [site.rows for site in sites]
    if gated is not None:
        product = gated[2]
        new = b.call(forms.gated, (x_arg, *weights, None, *tail, *fused_args), like=product,
                     kwargs=named)
        new.meta["qcompile_records"] = [site.rec for site in sites]
        out = b.call(aten.view.default, (new, list(_val(product).shape)), like=product)
        product.replace_all_uses_with(out)
        _note_launch(sites, desc + "; silu(gate) * up in the op" + notes, sum(ns))
        return
    bias = _fused_bias(b, sites, ns)
    if residual is not None:
        fused_args = (fused_args or (None, 0.0)) + (
            b.call(aten.reshape.default, (residual[1], list(_val(first.mm).shape))),)
        notes += "; + residual in the op"
    new = b.call(forms.plain, (x_arg, *weights, bias, *tail, *fused_args), like=first.mm,
                 kwargs=named)
    new.meta["qcompile_records"] = [site.rec for site in sites]
    _note_launch(sites, desc + notes, sum(ns))
    if residual is not None:
        residual[0].replace_all_uses_with(
            b.call(aten.view.default, (new, list(_val(residual[0]).shape))))
        return
    for site, out in zip(sites, _column_parts(b, new, ns)):
        site.mm.replace_all_uses_with(out)
        if site.post is not None:
            mul, _, index = site.post
            mul.replace_all_uses_with(mul.args[index])


@dataclass
class _LutSite:
    """A recognised lookup-table (NF4, FP4, 16-value codebook) matmul."""

    mm: fx.Node
    x: fx.Node
    bias: fx.Node | None
    match: LookupTableMatch
    rec: MatchRecord
    post: None = None  # (no post-scale is folded into a lookup-table weight)

    @property
    def rows(self) -> int:
        """The weight's N."""
        return int(self.match.codes.shape[0])

    def activation(self) -> fx.Node:
        """The matmul's activation operand now (see ``_MixedSite.activation``): a linear that
        reads the previous one's result reads that rewrite's op, not its replaced matmul."""
        return self.mm.args[1] if self.mm.target is aten.addmm.default else self.mm.args[0]

    def fusion_key(self) -> tuple:
        """Sites with equal keys share one launch (their codes and scales end to end): the
        same activation, table, block size and K, biases all absent or all constants."""
        m = self.match
        const_bias = self.bias is None or self.bias.op in ("placeholder", "get_attr")
        return ("lut", _activation_key(self.x), tuple(m.table.tolist()), m.group_size,
                m.dequant_dtype, int(m.codes.shape[1]), self.bias is None, const_bias or id(self))


def _rewrite_lut(b: _Builder, ev: ConstantEvaluator, sites: list[_LutSite]) -> None:
    """One ``qcompile::lut_gemm`` for sites sharing a fusion key (usually one site) in place
    of their matmuls (and the dequantization they read), on the operands
    ``kernels.prepare_lut_gemm`` laid out for the device; at decode token counts with the
    fusions the affine weights' ops take (``_rewrite_mixed``): a gated MLP's gate and up
    projections as one ``qcompile::lut_gemm_gated``, the RMSNorm before and the skip
    connection after in the op."""
    gated = _gated_pair(sites)
    if gated is not None:
        sites = list(gated[:2])  # gate, up
    first, m = sites[0], sites[0].match
    rows = _interleave if gated is not None else _cat
    prep = kernels.prepare_lut_gemm(rows([site.match.codes for site in sites]), m.table,
                                    rows([site.match.scales for site in sites]), m.group_size,
                                    _val(first.x).dtype, m.name)
    codes, table, scales = prep.tensors
    x = first.activation()
    norm, residual = _norm_and_residual(ev, sites, 4 >= kernels.FUSE_NORM_MIN_BITS,
                                        sum(site.rows for site in sites))
    with b.graph.inserting_before(residual[0] if residual is not None else first.mm):
        x_arg, fused_args, notes = _norm_args(b, x, norm)
        weights = (b.constant(codes, "codes"), b.constant(table, "table"),
                   b.constant(scales, "scales"))
        named = {name: b.constant(t, name) for name, t in prep.named.items()}
        tail = (m.group_size, dtype_name(m.dequant_dtype), prep.layout, prep.config)
        _emit(b, _LUT_FORMS, sites, gated, x_arg, weights, tail, fused_args, residual,
              prep.description, notes, named)


@dataclass
class _Int8Site:
    """A recognised ``_int_mm`` + rescale, and the value numbers of what it reads."""

    mm: fx.Node
    match: Int8Match
    rec: MatchRecord
    numbers: dict[fx.Node, int]

    def fusion_key(self) -> tuple:
        """Sites with equal keys can share one launch: the same quantized activation, row
        scales and zero points (as values), output dtype and K, biases all present or not."""
        m, num = self.match, self.numbers
        return ("int8", num[m.xq], tuple(num[r] for r in m.row_scales),
                None if m.azp is None else num[m.azp], m.out_dtype, int(m.wq.shape[1]),
                m.bias is None)


def _value_numbers(graph: fx.Graph) -> dict[fx.Node, int]:
    """Number every node so that nodes computing the same value share a number: the same
    pure op on arguments with the same numbers (placeholders, constants and random or
    side-effecting ops are their own values). What CSE would merge, without merging."""
    table: dict[tuple, int] = {}
    numbers: dict[fx.Node, int] = {}
    fresh = itertools.count()

    def arg_key(a):
        if isinstance(a, fx.Node):
            return ("node", numbers[a])
        if isinstance(a, (list, tuple)):
            return (type(a).__name__, *map(arg_key, a))
        try:
            hash(a)
            return a
        except TypeError:
            return repr(a)

    for node in graph.nodes:
        key = None
        if node.op == "call_function" and not node.is_impure() and \
                torch.Tag.nondeterministic_seeded not in getattr(node.target, "tags", ()):
            key = (node.target, arg_key(node.args), arg_key(tuple(sorted(node.kwargs.items()))))
        if key is None:
            numbers[node] = -1 - next(fresh)  # unique, never equal to a table entry
        else:
            numbers[node] = table.setdefault(key, len(table))
    return numbers


def _rewrite_int8(b: _Builder, ev: ConstantEvaluator, sites: list[_Int8Site]) -> None:
    """One qcompile::int8_gemm for sites sharing a fusion key (usually one site): the first
    site's quantized activation, row scales and zero points, the weights concatenated."""
    first, match = sites[0], sites[0].match
    ns = [int(site.match.wq.shape[0]) for site in sites]
    xq, end = match.xq, first.match.end
    if len(sites) > 1:  # the op goes before the earliest result it replaces
        order = {node: i for i, node in enumerate(b.graph.nodes)}
        end = min((site.match.end for site in sites), key=order.__getitem__)
        inputs = [xq, *match.row_scales, *([match.azp] if match.azp is not None else [])]
        if any(order[i] >= order[end] for i in inputs):
            for site in sites:  # a later site's result is used before the first's inputs exist
                _rewrite_int8(b, ev, [site])
            return
    wq_all = _cat([site.match.wq for site in sites])
    config, desc = kernels.prepare_int8_gemm(wq_all, _static_m(xq), match.out_dtype,
                                             has_bias=match.bias is not None)
    with b.graph.inserting_before(end):
        if _val(xq).dtype != torch.int8:  # int32 matmul: int8 values widened (int8_activation)
            xq = b.call(prims.convert_element_type.default, (xq, torch.int8))
        row = None
        for r in match.row_scales:
            if _val(r).dtype != torch.float32:
                r = b.call(prims.convert_element_type.default, (r, torch.float32))
            row = r if row is None else b.call(aten.mul.Tensor, (row, r))
        if row is None:
            row = b.constant(torch.ones(1, 1, dtype=torch.float32, device=match.wq.device), "one")
        elif _val(row).dim() != 2:
            row = b.call(aten.view.default, (row, [-1, 1]))
        if len(sites) == 1:
            wq = _reuse_or_constant(b, ev, first.mm.args[1], match.wq, "wq")
        else:
            wq = b.constant(wq_all, "wq")
        col = b.constant(_cat([site.match.col_scale for site in sites], 1), "col_scale")
        bias = (b.constant(_cat([site.match.bias for site in sites]), "bias")
                if match.bias is not None else None)
        args = (xq, wq, row, col, bias, dtype_name(match.out_dtype), config)
        if match.azp is not None:
            azp = match.azp
            if _val(azp).dim() != 2:
                azp = b.call(aten.view.default, (azp, [-1, 1]))
            args += (azp, b.constant(_cat([site.match.azp_adj for site in sites]), "azp_adj"))
        new = b.call(torch.ops.qcompile.int8_gemm.default, args, like=end)
        outs = _column_parts(b, new, ns)
        if match.view_shape is not None:  # a 3-D activation's rows, as the chain viewed them
            outs = [b.call(aten.view.default, (out, site.match.view_shape))
                    for out, site in zip(outs, sites)]
    _note_launch(sites, desc, sum(ns))
    for site, out in zip(sites, outs):
        site.match.end.replace_all_uses_with(out)


def _interleave(ts: list[torch.Tensor]) -> torch.Tensor:
    """A gated MLP's gate and up tensors as alternating 16-row tiles (ops.interleave_gate_up)."""
    return kernels.ops.interleave_gate_up(ts[0], ts[1])


def _cat(ts: list[torch.Tensor], dim: int = 0) -> torch.Tensor:
    """The fused sites' tensors end to end (the one tensor itself for a single site)."""
    return ts[0] if len(ts) == 1 else torch.cat(ts, dim)


def _fused_bias(b: _Builder, sites, ns: list[int]) -> fx.Node | None:
    """The fused sites' biases end to end as one [sum(ns)] vector (their fusion key makes them
    all present or all absent), or None."""
    if sites[0].bias is None:
        return None
    parts = [site.bias if tuple(_val(site.bias).shape) == (ni,) else
             b.call(aten.view.default, (site.bias, [ni])) for site, ni in zip(sites, ns)]
    return parts[0] if len(parts) == 1 else b.call(aten.cat.default, (parts,))


def _column_parts(b: _Builder, new: fx.Node, ns: list[int]) -> list[fx.Node]:
    """Each site's columns of a fused op's output, as the contiguous [.., n] its matmul
    gave (the op's output itself for a single site)."""
    if len(ns) == 1:
        return [new]
    outs, start = [], 0
    for ni in ns:
        part = b.call(aten.slice.Tensor, (new, -1, start, start + ni))
        outs.append(b.call(aten.clone.default, (part,),
                           kwargs={"memory_format": torch.contiguous_format}))
        start += ni
    return outs


def _note_launch(sites, desc: str, n: int) -> None:
    """The report's kernel column: what runs, and which matmuls share the launch."""
    for site in sites:
        site.rec.kernel = desc
        if len(sites) > 1:
            others = ", ".join(o.rec.node for o in sites if o is not site)
            site.rec.kernel += f"; one launch with {others} (N={n})"


_BROADCASTS = {aten.expand.default, aten.unsqueeze.default} | _VIEWS


def _broadcast_source(w3: fx.Node) -> fx.Node | None:
    """For matmul(x3d, W) lowered to bmm(x, expand(W)): the 2-D W, if that is what w3 is."""
    out = _val(w3)
    if out is None or out.dim() != 3:
        return None
    cur = w3
    while cur.op == "call_function" and cur.target in _BROADCASTS:
        src = cur.args[0]
        sv = _val(src)
        if sv is None:
            return None
        if sv.dim() == 2:
            return src if tuple(sv.shape) == tuple(out.shape[1:]) else None
        if tuple(sv.shape[-2:]) != tuple(out.shape[1:]):
            return None
        cur = src
    return None


def _record(node: fx.Node, op: str) -> MatchRecord:
    rec = MatchRecord(node=node.name, op=op, matched=False, source=_source(node))
    out = _val(node)
    if out is not None and out.dim() >= 2:
        rec.m, rec.n = str(out.shape[-2]), int(out.shape[-1]) if isinstance(
            out.shape[-1], int) else None
        rec.dtype = str(out.dtype).replace("torch.", "")
    return rec


def rewrite_graph(graph: fx.Graph, constants: dict[fx.Node, torch.Tensor], report: Report,
                  fuse_linears: bool = False) -> int:
    """Rewrite every recognised matmul subgraph of ``graph``; return how many.

    ``fuse_linears``: matmuls next to each other in the graph that share their activation
    and format run as one launch (module docstring)."""
    gm = graph.owning_module
    dump_graph("before", gm.print_readable(print_output=False) if gm else str(graph))
    ev = ConstantEvaluator(gm, constants)
    builder = _Builder(graph)
    numbers = _value_numbers(graph) if fuse_linears else {}
    rewritten = 0
    nodes_before = len(graph.nodes)
    group: list = []  # consecutive sites with one fusion key (few weights held)

    def flush() -> None:
        nonlocal rewritten
        if not group:
            return
        rewrite = (_rewrite_int8 if isinstance(group[0], _Int8Site) else
                   _rewrite_lut if isinstance(group[0], _LutSite) else _rewrite_mixed)
        try:
            rewrite(builder, ev, group)
        except Exception as e:  # noqa: BLE001 - the user's compile goes on without this rewrite
            # The rewrite replaces uses only once its op is built, so what it added so far
            # is dead code; the matmuls stay as they were.
            log.warning("qcompile: rewriting %s failed, left to Inductor: %s: %s",
                        ", ".join(site.rec.node for site in group), type(e).__name__, e)
            log.debug("rewrite failure", exc_info=True)
            for site in group:
                site.rec.matched, site.rec.kernel = False, ""
                site.rec.reason = f"rewrite failed ({type(e).__name__}: {e}); left to Inductor"
            rewritten -= len(group)
        group.clear()

    for node in list(graph.nodes):
        if node.op != "call_function" or (node.target not in MATMULS and not is_bnb_gemm(node)):
            continue
        op = MATMULS.get(node.target, "bnb gemm_4bit")
        rec = _record(node, op)
        try:
            site = _match_one(builder, ev, node, op, rec, numbers)
            rec.matched = True
            rewritten += 1
            if group and (not fuse_linears or group[0].fusion_key() != site.fusion_key()):
                flush()
            group.append(site)
            if not fuse_linears:
                flush()
        except NoMatch as e:
            rec.reason = str(e)
        except Exception as e:  # noqa: BLE001 - never crash the user's compile on a graph
            # we cannot read (an op that fails on the probe's values, say): leave it alone
            log.debug("reading %s failed", node.name, exc_info=True)
            rec.reason = (f"could not read the weight expression ({type(e).__name__}: "
                          f"{_first_line(e)}); left to Inductor")
        finally:
            ev.cache.clear()  # evaluated weights are large: keep one matmul's at a time
        report.add(rec)
    flush()
    if rewritten or len(graph.nodes) != nodes_before:  # or dead nodes of a failed rewrite
        if rewritten:
            _link_norms(builder, graph)
        graph.eliminate_dead_code()
        graph.lint()
        if gm is not None:
            gm.recompile()
    if not rewritten:
        _warn_if_unread(graph, ev, report)
    dump_graph("after", gm.print_readable(print_output=False) if gm else str(graph))
    return rewritten


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else ""


def _quantized_constant(ev: ConstantEvaluator, node) -> bool:
    """node is a constant computed from an integer tensor (a dequantized weight, say)."""
    return isinstance(node, fx.Node) and ev.is_constant(node) and bool(integer_nodes(ancestors(node)))


def _warn_if_unread(graph: fx.Graph, ev: ConstantEvaluator, report: Report) -> None:
    """One WARNING (and a report note) when the pass rewrote nothing although a matmul (or
    the product a decomposed matmul left: a mul feeding a sum) reads a weight computed
    from constants with an integer tensor among them: the user expected a takeover."""
    readers = []
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        if node.target in MATMULS:  # the weight operand (the second for _int_mm, packed ops)
            operands = [node.args[WEIGHT_OPERAND.get(node.target, 1)]]
            if node.target is aten.mm.default:  # or the first: W @ x.T
                operands.append(node.args[0])
        elif node.target is aten.mul.Tensor and any(
                u.target in (aten.sum.dim_IntList, aten.sum.default) for u in node.users):
            operands = [a for a in node.args if isinstance(a, fx.Node)]
        else:
            continue
        if any(_quantized_constant(ev, a) for a in operands):
            readers.append(node)
    unmatched = {r.node: r.reason for r in report.records if not r.matched}
    # and the matmuls whose quantized weight is a graph input (a compiled function's argument
    # or global), which no constant shows
    names = {n.name for n in readers}
    readers += [n for n in graph.nodes if n.name in unmatched and n.name not in names
                and unmatched[n.name].startswith(INPUT_WEIGHT_REASON)]
    if not readers:
        return
    reasons = [f"{n.name}: {unmatched[n.name]}" for n in readers if n.name in unmatched]
    if reasons:
        why = "; ".join(dict.fromkeys(reasons[:3]))
    else:
        why = ("no matmul reads them: the graph computes their product another way "
               f"({', '.join(sorted({str(n.target) for n in readers}))})")
    note = (f"{len(readers)} matmul(s) read integer weights but none was rewritten to a "
            f"qcompile op: {why}")
    report.notes.append(note)
    log.warning("qcompile: %s", note)


def _match_one(builder: _Builder, ev: ConstantEvaluator, node: fx.Node, op: str,
               rec: MatchRecord, numbers: dict[fx.Node, int]) -> _MixedSite | _Int8Site:
    """Recognise one matmul as a site for :func:`_rewrite_int8` / :func:`_rewrite_mixed`;
    NoMatch says why not."""
    if builder.gm is None:
        raise NoMatch("graph has no owning module to hold new constants")
    if is_bnb_gemm(node):  # bitsandbytes' 4-bit matmul: the weight is in its arguments
        x, bias, lut = recognize_bnb_gemm(ev, node)
        return _lut_site(node, x, bias, lut, rec)
    out = _val(node)
    if op == "_int_mm" or (op == "mm" and out is not None and out.dtype == torch.int32):
        match = recognize_int8(ev, node)
        rec.format, rec.bits, rec.k = match.format, 8, int(match.wq.shape[1])
        rec.n = int(match.wq.shape[0])
        rec.dtype = str(match.out_dtype).replace("torch.", "")
        return _Int8Site(node, match, rec, numbers)
    if node.target in PACKED_OPS:  # tinygemm int4 / int8pack: read through the op itself
        x, w, match = recognize_packed(ev, node)
        bias = None
    elif op == "bmm":
        x, w3 = node.args[:2]
        w = _broadcast_source(w3)
        w3v = _val(w3)
        if w is None and w3v is not None and w3v.dim() == 3 and w3v.shape[0] == 1 and ev.is_constant(w3):
            # einsum's linears ("mk,nk->mn", "...k,nk->...n") lower to a bmm of batch 1 whose
            # weight is the 2-D one unsqueezed and permuted to [1, K, N]: read it as [K, N]
            with builder.graph.inserting_after(w3):
                w = builder.call(aten.view.default, (w3, list(w3v.shape[1:])))
        if w is None:
            raise NoMatch("bmm whose second operand is not one 2-D weight broadcast over "
                          "the batch (activation x activation, or a per-batch weight)")
        bias = None
    elif op == "addmm":
        bias, x, w = node.args[:3]
        if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
            raise NoMatch("addmm with alpha/beta other than 1")
        bv = _val(bias)
        if bv is None or bv.dim() > 2 or \
                (bv.dim() == 2 and not (isinstance(bv.shape[0], int) and bv.shape[0] == 1)):
            raise NoMatch("addmm's added tensor is not a bias vector")
    else:
        x, w = node.args[:2]
        bias = None
        # the weight's check first: it is constant in the usual case, and the activation's
        # walks everything above it
        if not ev.is_constant(w) and _quantized_constant(ev, x):
            raise NoMatch("the quantized weight is the first operand (W @ x.T): qcompile reads "
                          "x @ W.T (F.linear), the same values transposed; write it that way")
    xv = _val(x)
    if xv is None or xv.dtype not in ACT_DTYPES:
        raise NoMatch(f"activation dtype {None if xv is None else xv.dtype} not supported")
    if node.target not in PACKED_OPS:
        try:
            match = recognize_weight(ev, w)
        except NoMatch as miss:  # NF4 / FP4 / a 16-value codebook, or miss itself
            return _lut_site(node, x, bias, recognize_lookup(ev, w, miss), rec)
    n, k = match.q.shape
    rec.format, rec.bits, rec.group_size, rec.n, rec.k = (
        match.format, match.bits, match.group_size, n, k)
    return _mixed_site(node, x, w, bias, match, ev, rec)


def _lut_site(node: fx.Node, x: fx.Node, bias: fx.Node | None, match: LookupTableMatch,
              rec: MatchRecord) -> _LutSite:
    n, k = match.codes.shape
    rec.format, rec.bits, rec.group_size, rec.n, rec.k = match.format, 4, match.group_size, n, k
    xv = x.meta.get("val")
    act = xv.dtype if isinstance(xv, torch.Tensor) else None
    why = kernels.lut_gemm_unsupported(match.codes.device, n, k, match.group_size, act)
    if why is not None:
        # on a GPU the reference would dequantize the whole weight on every call, where
        # Inductor (freezing) may keep a folded float weight: leave it, and say why
        raise NoMatch(f"{match.format} recognised, but {why}: left to Inductor")
    return _LutSite(node, x, bias, match, rec)
