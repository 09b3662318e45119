"""Library ops that hide the dequantization: tinygemm's int4 and the int8 weight-only mm.

gpt-fast's int4 and torchao's int4 tensor-core-tiled layout call
``aten._weight_int4pack_mm`` (CUDA) or ``aten._weight_int4pack_mm_for_cpu`` (CPU) on a
weight packed by ``aten._convert_weight_to_int4pack(_for_cpu)``; gpt-fast's int8 calls
``aten._weight_int8pack_mm``. No dequantized weight appears in the graph, so
``weight_only`` has nothing to probe; this module recovers the weight's quantized form from
the op itself, for the rewrite to ``qcompile::mixed_gemm`` (``rewrite._match_one``).

tinygemm: ``out = x @ W^T`` with ``W[n, k] = (q[n, k] - 8) * s[k // g, n] + z[k // g, n]``,
q unsigned 4-bit, ``scales_and_zeros`` [K/g, N, 2] holding (s, z). The packed tile layout
differs between CUDA and CPU and between torch versions, so it is never decoded here: the
op is run (on the weight's device) on rows of an identity activation with every scale 1
and zero 0, each output then being one exact product ``(q - 8) * 1``, which reads q - 8 for
every (k, n). That gives signed int4 values, the scales, and the zeros as offsets
(zero_mode "add"). int8pack: ``out = x @ (w * s[:, None])^T``, w int8 [N, K], s [N]:
q = w per channel, no zeros.

Either way the recovered form must reproduce the op's own output on a random activation at
compile time (to rounding) before anything is rewritten; else NoMatch, with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from ..kernels.ops import OP_DTYPES
from . import weight_only
from .evaluate import ConstantEvaluator, NotConstant
from .weight_only import NoMatch, WeightOnlyMatch

aten = torch.ops.aten
INT4_OPS = (aten._weight_int4pack_mm.default, aten._weight_int4pack_mm_for_cpu.default)
INT8_OPS = (aten._weight_int8pack_mm.default,)
OPS = {op: op._schema.name.split("::")[1] for op in INT4_OPS + INT8_OPS}  # node target -> name

PROBE_BYTES = 64 << 20  # identity rows + output per op call while reading q
# relative L2 distance allowed between the op's output and the recovered weight's exact
# product (a misread layout or convention is off by O(1))
CHECK_TOL = {torch.bfloat16: 3e-2, torch.float16: 5e-3, torch.float32: 1e-4}


@dataclass
class PackedMatch(WeightOnlyMatch):
    """A WeightOnlyMatch read from a library op; its format names the op's family."""

    source: str = ""

    @property
    def format(self) -> str:
        return f"{WeightOnlyMatch.format.fget(self)} ({self.source})"


def _name(op) -> str:
    return OPS.get(op, str(op))


def _constant(ev: ConstantEvaluator, node, what: str) -> torch.Tensor:
    if not isinstance(node, fx.Node):
        raise NoMatch(f"{what} is not a tensor")
    try:
        v = ev.value(node)
    except NotConstant:
        raise NoMatch(f"{what} is not constant (not a parameter or buffer)") from None
    if not isinstance(v, torch.Tensor):
        raise NoMatch(f"{what} is not a tensor")
    return v


def _activation(node: fx.Node, k: int) -> tuple[fx.Node, torch.Tensor]:
    """The op's activation [M, K] (K the weight's; a dynamic K is the op's to check)."""
    x = node.args[0]
    xv = x.meta.get("val") if isinstance(x, fx.Node) else None
    if not isinstance(xv, torch.Tensor) or xv.dim() != 2:
        raise NoMatch("activation is not a 2-D tensor")
    if isinstance(xv.shape[1], int) and xv.shape[1] != k:
        raise NoMatch(f"activation has K={xv.shape[1]}, the weight K={k}")
    if xv.dtype not in OP_DTYPES:
        raise NoMatch(f"activation dtype {xv.dtype} not supported")
    return x, xv


def recognize_packed(ev: ConstantEvaluator, node: fx.Node) -> tuple[fx.Node, fx.Node,
                                                                      PackedMatch]:
    """(activation, weight node, match) for one library op node, or NoMatch."""
    with torch.no_grad():  # the model's tensors may be parameters that require grad
        if node.target in INT4_OPS:
            return _recognize_int4(ev, node)
        return _recognize_int8(ev, node)


def _recognize_int4(ev: ConstantEvaluator, node: fx.Node):
    w_node, group, sz_node = node.args[1:4]
    w = _constant(ev, w_node, "packed int4 weight")
    sz = _constant(ev, sz_node, "scales_and_zeros")
    if not isinstance(group, int):
        raise NoMatch("group size is not a constant int")
    if group not in weight_only.KERNEL_GROUP_SIZES:
        raise weight_only._unsupported_group(group)
    if sz.dim() != 3 or sz.shape[2] != 2:
        raise NoMatch(f"scales_and_zeros of shape {tuple(sz.shape)}, not [K/g, N, 2]")
    k = int(sz.shape[0]) * group
    x, xv = _activation(node, k)
    if sz.dtype != xv.dtype:
        raise NoMatch(f"scales_and_zeros dtype {sz.dtype} differs from the activation's "
                      f"{xv.dtype}")
    n = int(sz.shape[1])
    op = node.target
    q = _read_int4(op, w, group, n, k, sz.dtype)
    s = sz[..., 0].t().contiguous()
    z = sz[..., 1].t().contiguous()
    match = PackedMatch(q=q, scales=s, zeros=z, bits=4, signed=True, group_size=group,
                        zero_mode="add", dequant_dtype=xv.dtype, source="tinygemm")
    _check(lambda xs: op(xs, w, group, sz), match, xv.dtype, k, w.device)
    return x, w_node, match


def _read_int4(op, w: torch.Tensor, group: int, n: int, k: int,
               dtype: torch.dtype) -> torch.Tensor:
    """q - 8 as int16 [N, K], read through the op: identity rows, scale 1, zero 0."""
    ones = torch.zeros(k // group, n, 2, dtype=dtype, device=w.device)
    ones[..., 0] = 1
    rows = max(1, min(k, PROBE_BYTES // ((k + n) * torch.finfo(dtype).bits // 8)))
    parts = []
    try:
        for k0 in range(0, k, rows):
            r = torch.arange(min(rows, k - k0), device=w.device)
            eye = torch.zeros(len(r), k, dtype=dtype, device=w.device)
            eye[r, k0 + r] = 1
            parts.append(op(eye, w, group, ones))  # [rows, N]: (q[n, k0 + r] - 8)
    except RuntimeError as e:
        raise NoMatch(f"{_name(op)} does not run on the weight at compile time: "
                      f"{str(e).splitlines()[0]}") from None
    qt = torch.cat(parts)
    if tuple(qt.shape) != (k, n):
        raise NoMatch(f"{_name(op)} on an identity gave shape {tuple(qt.shape)}, not [K, N]")
    q = qt.t().to(torch.float32)
    if not torch.equal(q, q.round()) or float(q.min()) < -8 or float(q.max()) > 7:
        raise NoMatch(f"{_name(op)} on an identity did not read back 4-bit integers")
    return q.to(torch.int16).contiguous()


def _recognize_int8(ev: ConstantEvaluator, node: fx.Node):
    w_node, s_node = node.args[1:3]
    w = _constant(ev, w_node, "int8 weight")
    s = _constant(ev, s_node, "int8pack scales")
    if w.dtype != torch.int8 or w.dim() != 2:
        raise NoMatch(f"int8pack weight of {w.dtype} {tuple(w.shape)}, not int8 [N, K]")
    k = int(w.shape[1])
    x, xv = _activation(node, k)
    n = int(w.shape[0])
    if s.numel() != n or not s.is_floating_point():
        raise NoMatch(f"int8pack scales of shape {tuple(s.shape)}, not [N]")
    if s.dtype != xv.dtype:
        raise NoMatch(f"int8pack scales dtype {s.dtype} differs from the activation's "
                      f"{xv.dtype}")
    match = PackedMatch(q=w.to(torch.int16), scales=s.reshape(n, 1).contiguous(), zeros=None,
                        bits=8, signed=True, group_size=k, zero_mode="none",
                        dequant_dtype=xv.dtype, source="int8pack")
    op = node.target
    _check(lambda xs: op(xs, w, s), match, xv.dtype, k, w.device)
    return x, w_node, match


def _product64(x: torch.Tensor, m: WeightOnlyMatch, rows: int = 1024) -> torch.Tensor:
    """``x @ W^T`` in float64 for the recovered weight, exactly (W built 1024 rows at a time)."""
    n = m.q.shape[0]
    x64, f64, parts = x.double(), torch.float64, []
    for n0 in range(0, n, rows):
        sl = slice(n0, min(n, n0 + rows))
        w = weight_only._reconstruct(m.q[sl], m.scales[sl],
                                     None if m.zeros is None else m.zeros[sl],
                                     m.group_size, m.zero_mode, f64, f64)
        parts.append(x64 @ w.t())
    return torch.cat(parts, dim=1)


def _check(run, match: PackedMatch, dtype: torch.dtype, k: int, device) -> None:
    """The op's output on a random activation against the recovered weight's exact product."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    xs = torch.randn(8, k, generator=gen).to(dtype).to(device)
    try:
        out = run(xs)
    except RuntimeError as e:
        raise NoMatch(f"{match.source} op rejects a {dtype} activation at compile time: "
                      f"{str(e).splitlines()[0]}") from None
    ref = _product64(xs, match)
    denom = float(ref.norm())
    err = float((out.double() - ref).norm()) / (denom if denom > 0 else 1.0)
    if not err <= CHECK_TOL[dtype]:
        raise NoMatch(f"the weight read from the {match.source} op does not reproduce its "
                      f"output (relative error {err:.3g})")
