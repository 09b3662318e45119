"""The qcompile ops: schemas, fake (meta) implementations and reference implementations.

These ops (the mixed-input GEMM, the lookup-table GEMM and the fused decode variants of
both, the int8 GEMM) are the only thing the graph
rewrite emits and the only thing kernels implement; docs/kernels.md states the contract.
The reference implementations here are plain PyTorch (CPU and CUDA) and define the
numerics every kernel is tested against.
This module knows nothing of graphs and nothing of CUDA kernels; ``qcompile.kernels``
registers the one CUDA implementation of each op, which hands the call to the kernel
family that owns the weight layout.
"""

from __future__ import annotations

import torch

__all__ = [
    "mixed_gemm",
    "int8_gemm",
    "mixed_gemm_reference",
    "mixed_gemm_gated",
    "mixed_gemm_norm_out",
    "rms_norm",
    "add_residual",
    "norm_sums",
    "int8_gemm_reference",
    "lut_gemm",
    "lut_gemm_reference",
    "lut_gemm_gated",
    "lut_gemm_norm_out",
    "fused_linear",
    "as_fused_result",
    "lut_dequantize",
    "unpack_nk",
    "pack_nk",
    "dequantize",
    "dtype_name",
    "as_dtype",
    "OP_DTYPES",
    "ZERO_MODES",
]

ZERO_MODES = ("none", "sub", "add")
REFERENCE_LAYOUT = "nk"

# The ops name their dtype arguments (``dequant_dtype``, ``out_dtype``) by string, not as a
# ScalarType: torch 2.11's AOTInductor runtime hands a ScalarType argument of a Python op
# to it as the export schema's number (bfloat16 = 13 there), which it reads as c10's (13 =
# quint8), so an exported W8A8 model failed and float32 would have become float64.
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
OP_DTYPES = tuple(_DTYPES.values())


def dtype_name(dtype: torch.dtype) -> str:
    """The name an op's dtype argument takes for ``dtype`` (bfloat16, float16, float32)."""
    for name, d in _DTYPES.items():
        if d == dtype:
            return name
    raise ValueError(f"qcompile ops compute in {sorted(_DTYPES)}, got {dtype}")


def as_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """The torch dtype an op's dtype argument names (a torch dtype passes through)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}") from None


def pack_nk(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer values q [N, K] (any int dtype) into the reference "nk" layout.

    bits 8: int8 when any value is negative, else uint8 when values exceed 127, as
    given; bits 4: uint8 [N, K // 2], element k in the low nibble of byte k // 2 if k
    is even, in the high nibble if odd.
    """
    if q.dim() != 2:
        raise ValueError(f"q must be 2-D [N, K], got shape {tuple(q.shape)}")
    if bits == 8:
        if int(q.min()) < 0:
            return q.to(torch.int8).contiguous()
        return q.to(torch.uint8).contiguous()
    if bits == 4:
        if q.shape[1] % 2:
            raise ValueError(f"4-bit packing needs an even K, got K={q.shape[1]}")
        nib = (q.to(torch.int16) & 0xF).to(torch.uint8)
        return (nib[:, 0::2] | (nib[:, 1::2] << 4)).contiguous()
    raise ValueError(f"bits must be 4 or 8, got {bits}")


def unpack_nk(qweight: torch.Tensor, bits: int, signed: bool) -> torch.Tensor:
    """Inverse of :func:`pack_nk`: the integer values as an int16 tensor [N, K]."""
    if bits == 8:
        q = qweight.to(torch.int16)
        if signed and qweight.dtype == torch.uint8:
            q = torch.where(q > 127, q - 256, q)
        return q
    if bits == 4:
        b = qweight.to(torch.int16)
        lo, hi = b & 0xF, (b >> 4) & 0xF
        q = torch.stack((lo, hi), dim=-1).reshape(qweight.shape[0], qweight.shape[1] * 2)
        if signed:
            q = torch.where(q > 7, q - 16, q)
        return q
    raise ValueError(f"bits must be 4 or 8, got {bits}")


def dequantize(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bits: int,
    signed: bool,
    group_size: int,
    zero_mode: str,
    dequant_dtype: str | torch.dtype,
) -> torch.Tensor:
    """The weight [N, K] that a reference-layout mixed_gemm operand stands for."""
    dequant_dtype = as_dtype(dequant_dtype)
    q = unpack_nk(qweight, bits, signed)
    n, k = q.shape
    groups = k // group_size
    q = q.to(dequant_dtype).reshape(n, groups, group_size)
    s = scales.to(dequant_dtype).reshape(n, groups, 1)
    if zero_mode == "none":
        w = q * s
    elif zero_mode == "sub":
        w = (q - zeros.to(dequant_dtype).reshape(n, groups, 1)) * s
    elif zero_mode == "add":
        w = q * s + zeros.to(dequant_dtype).reshape(n, groups, 1)
    else:
        raise ValueError(f"zero_mode must be one of {ZERO_MODES}, got {zero_mode!r}")
    return w.reshape(n, k)


def _rms_norm_f32(xf: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension, in float32, rounded once to x's type:
    ``x * rsqrt(mean(x^2) + eps) * weight``."""
    return _rms_norm_f32(x.float(), weight, eps).to(x.dtype)


def norm_sums(y: torch.Tensor) -> torch.Tensor:
    """The partial sums of squares an RMSNorm of y needs: [.., N / 16] float32, the sums of
    y^2 over each 16 consecutive features (what ``mixed_gemm_norm_out`` returns and
    ``norm_ssq`` takes; the decode kernel sums them in the same 16-feature tiles)."""
    yf = y.float()
    return yf.pow(2).reshape(*y.shape[:-1], y.shape[-1] // 16, 16).sum(-1)


def rms_from_sums(norm_ssq: torch.Tensor, k: int, eps: float) -> torch.Tensor:
    """rsqrt(mean(y^2) + eps) [.., 1] from ``norm_sums(y)`` of a K-wide y."""
    return torch.rsqrt(norm_ssq.float().sum(-1, keepdim=True) / k + eps)


def add_residual(y: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """y + residual in float32, rounded once to y's type."""
    return (y.float() + residual.float()).to(y.dtype)


def check_next_norm(n: int, next_norm_weight: torch.Tensor) -> None:
    """``mixed_gemm_norm_out``'s condition on the next RMSNorm's weight for an N-wide result."""
    if tuple(next_norm_weight.shape) != (n,) or n % 16:
        raise ValueError(f"next_norm_weight must be [N={n}] with 16 | N, got "
                         f"{tuple(next_norm_weight.shape)}")


def next_norm_inputs(out: torch.Tensor, next_norm_weight: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """What the op after an RMSNorm of ``out`` reads: out * weight, rounded to out's type, and
    ``norm_sums(out)``."""
    return (out.float() * next_norm_weight.float()).to(out.dtype), norm_sums(out)


def as_fused_result(y: torch.Tensor, gated: bool, next_norm: torch.Tensor | None):
    """A plain GEMM's result ``y`` as a fused op returns it: gated (``gate_up``), or with the
    next norm's inputs (``next_norm_inputs``, a 3-tuple) where ``next_norm`` is given."""
    if gated:
        y = gate_up(y)
    if next_norm is None:
        return y
    check_next_norm(y.shape[-1], next_norm)
    return (y, *next_norm_inputs(y, next_norm))


def around_gemm(run, x: torch.Tensor, norm_weight: torch.Tensor | None, norm_eps: float,
                residual: torch.Tensor | None = None, norm_ssq: torch.Tensor | None = None,
                next_norm: torch.Tensor | None = None):
    """``run(x)`` (a plain GEMM) with an op's fusions as PyTorch ops around it, each rounded
    to the activation type as a separate kernel would: the RMSNorm before (``norm_weight`` or
    ``norm_ssq``), the residual after, and with ``next_norm`` the three results of
    ``mixed_gemm_norm_out``."""
    if norm_weight is not None:
        x = rms_norm(x, norm_weight, norm_eps)
    elif norm_ssq is not None:
        x = (x.float() * rms_from_sums(norm_ssq, x.shape[-1], norm_eps)).to(x.dtype)
    y = run(x)
    if residual is not None:
        y = add_residual(y, residual)
    if next_norm is None:
        return y
    return (y, *next_norm_inputs(y, next_norm))


def _check_fused(x: torch.Tensor, n: int, norm_weight: torch.Tensor | None, norm_eps: float,
                 residual: torch.Tensor | None, norm_ssq: torch.Tensor | None = None) -> None:
    if norm_weight is not None and (norm_weight.shape != (x.shape[-1],) or not norm_eps >= 0):
        raise ValueError(f"norm_weight must be [{x.shape[-1]}] (K) and norm_eps >= 0, got "
                         f"{tuple(norm_weight.shape)} and {norm_eps}")
    if norm_ssq is not None and (
            norm_weight is not None or not norm_eps >= 0 or x.shape[-1] % 16
            or tuple(norm_ssq.shape) != (*x.shape[:-1], x.shape[-1] // 16)
            or norm_ssq.dtype != torch.float32):
        raise ValueError(f"norm_ssq must be float32 {(*x.shape[:-1], x.shape[-1] // 16)} (the "
                         f"partial sums of squares of K = {x.shape[-1]}), without norm_weight, "
                         f"norm_eps >= 0; got {tuple(norm_ssq.shape)} {norm_ssq.dtype}")
    if residual is not None and tuple(residual.shape) != (*x.shape[:-1], n):
        raise ValueError(f"residual must have the output's shape {(*x.shape[:-1], n)}, got "
                         f"{tuple(residual.shape)}")


def mixed_gemm_reference(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bias: torch.Tensor | None,
    bits: int,
    signed: bool,
    group_size: int,
    zero_mode: str,
    dequant_dtype: str,
    layout: str,
    config: str = "",
    norm_weight: torch.Tensor | None = None,
    norm_eps: float = 0.0,
    residual: torch.Tensor | None = None,
    norm_ssq: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain-PyTorch mixed_gemm for the reference "nk" layout.

    ``config`` names the kernel(s) a CUDA implementation runs (a dispatch table by token
    count, see :mod:`qcompile.kernels.tuning`; "" = its heuristic); the numbers do not
    depend on it, so the reference ignores it.

    ``norm_weight`` ([K]) and ``norm_eps``: x is the input of an RMSNorm whose output the
    matmul reads, ``linear(rms_norm(x), W)``; ``residual`` (the output's shape) is added to the
    result. With either, the reference computes in float32 and rounds once. ``norm_ssq``
    ([.., K/16] float32, instead of ``norm_weight``): x is already an RMSNorm's input times
    its weight, and norm_ssq the ``norm_sums`` of that input (``mixed_gemm_norm_out`` wrote
    both): the matmul reads ``x * rsqrt(sum(norm_ssq) / K + norm_eps)``.
    """
    del config
    if layout != REFERENCE_LAYOUT:
        raise ValueError(
            f"the reference mixed_gemm reads layout {REFERENCE_LAYOUT!r}, got {layout!r}; "
            "a weight packed for a kernel runs only where that kernel is available"
        )
    w = dequantize(qweight, scales, zeros, bits, signed, group_size, zero_mode, dequant_dtype)
    return fused_linear(x, w, bias, norm_weight, norm_eps, residual, norm_ssq)


def fused_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None,
                 norm_weight: torch.Tensor | None = None, norm_eps: float = 0.0,
                 residual: torch.Tensor | None = None, norm_ssq: torch.Tensor | None = None
                 ) -> torch.Tensor:
    """``linear(x, w, bias)`` with the ops' fusions, as every qcompile weight op defines them
    (the decode kernel's numbers): without any, the plain linear in x's type; with an RMSNorm
    before (``norm_weight``, or ``norm_ssq``: x is already the norm's input times its weight)
    or a ``residual`` after, all in float32, rounded once."""
    if norm_weight is None and residual is None and norm_ssq is None:
        return torch.nn.functional.linear(x, w.to(x.dtype), bias)
    _check_fused(x, w.shape[0], norm_weight, norm_eps, residual, norm_ssq)
    xf = x.float()
    if norm_weight is not None:
        xf = _rms_norm_f32(xf, norm_weight, norm_eps)
    if norm_ssq is not None:
        xf = xf * rms_from_sums(norm_ssq, x.shape[-1], norm_eps)
    y = torch.nn.functional.linear(xf, w.float(), None if bias is None else bias.float())
    if residual is not None:
        y = y + residual.float()
    return y.to(x.dtype)


# The op is its reference implementation: same signature, same numbers.
mixed_gemm = torch.library.custom_op("qcompile::mixed_gemm", mutates_args=())(
    mixed_gemm_reference)


@mixed_gemm.register_fake
def _mixed_gemm_fake(x, qweight, scales, zeros, bias, bits, signed, group_size, zero_mode,
                     dequant_dtype, layout, config="", norm_weight=None, norm_eps=0.0,
                     residual=None, norm_ssq=None):
    # Every layout keeps N as the leading dimension of qweight.
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


def mixed_gemm_norm_out_reference(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bias: torch.Tensor | None,
    bits: int,
    signed: bool,
    group_size: int,
    zero_mode: str,
    dequant_dtype: str,
    layout: str,
    config: str,
    residual: torch.Tensor | None,
    next_norm_weight: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``qcompile::mixed_gemm_norm_out``: ``out = mixed_gemm(.., residual)`` whose result is
    also the input of an RMSNorm (weight ``next_norm_weight``, [N]) that the next op applies:
    returns (out, out * next_norm_weight rounded to out's type, ``norm_sums(out)``), what the
    next op takes as x and ``norm_ssq``. In the decode kernel both come from its epilogue, so
    no separate norm kernel reads out again."""
    out = mixed_gemm_reference(x, qweight, scales, zeros, bias, bits, signed, group_size,
                               zero_mode, dequant_dtype, layout, config, residual=residual)
    return as_fused_result(out, False, next_norm_weight)


mixed_gemm_norm_out = torch.library.custom_op("qcompile::mixed_gemm_norm_out",
                                              mutates_args=())(mixed_gemm_norm_out_reference)


@mixed_gemm_norm_out.register_fake
def _mixed_gemm_norm_out_fake(x, qweight, scales, zeros, bias, bits, signed, group_size,
                              zero_mode, dequant_dtype, layout, config, residual,
                              next_norm_weight):
    out = x.new_empty((*x.shape[:-1], qweight.shape[0]))
    sums = x.new_empty((*x.shape[:-1], qweight.shape[0] // 16), dtype=torch.float32)
    return out, torch.empty_like(out), sums


def gate_up(y: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of a gated MLP's two projections computed as one [.., N] result whose
    16-column tiles alternate gate and up (tile 2i: gate columns 16i..16i+15, tile 2i + 1:
    the same up columns): [.., N/2], in fp32 and rounded once to y's type."""
    tiles = y.reshape(*y.shape[:-1], y.shape[-1] // 32, 2, 16).float()
    out = torch.nn.functional.silu(tiles[..., 0, :]) * tiles[..., 1, :]
    return out.reshape(*y.shape[:-1], y.shape[-1] // 2).to(y.dtype)


def interleave_gate_up(gate: torch.Tensor, up: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """gate and up (same shape, 16 | size along ``dim``) as alternating 16-row tiles along
    ``dim``: the operand order `gate_up` undoes."""
    g = gate.movedim(dim, 0)
    u = up.movedim(dim, 0)
    both = torch.stack((g.reshape(-1, 16, *g.shape[1:]), u.reshape(-1, 16, *u.shape[1:])), 1)
    return both.reshape(-1, *g.shape[1:]).movedim(0, dim).contiguous()


def mixed_gemm_gated_reference(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bias: torch.Tensor | None,
    bits: int,
    signed: bool,
    group_size: int,
    zero_mode: str,
    dequant_dtype: str,
    layout: str,
    config: str = "",
    norm_weight: torch.Tensor | None = None,
    norm_eps: float = 0.0,
    norm_ssq: torch.Tensor | None = None,
) -> torch.Tensor:
    """``qcompile::mixed_gemm_gated``: silu(x W_gate^T) * (x W_up^T) for a weight (and its
    scales, zeros, bias) whose rows interleave the two projections in 16-row tiles; x the
    input of an RMSNorm (``norm_weight`` or ``norm_ssq``, ``norm_eps``) as in ``mixed_gemm``."""
    return gate_up(mixed_gemm_reference(x, qweight, scales, zeros, bias, bits, signed,
                                        group_size, zero_mode, dequant_dtype, layout, config,
                                        norm_weight, norm_eps, norm_ssq=norm_ssq))


mixed_gemm_gated = torch.library.custom_op("qcompile::mixed_gemm_gated", mutates_args=())(
    mixed_gemm_gated_reference)


@mixed_gemm_gated.register_fake
def _mixed_gemm_gated_fake(x, qweight, scales, zeros, bias, bits, signed, group_size,
                           zero_mode, dequant_dtype, layout, config="", norm_weight=None,
                           norm_eps=0.0, norm_ssq=None):
    return x.new_empty((*x.shape[:-1], qweight.shape[0] // 2))


def int_mm(xq: torch.Tensor, wq_t: torch.Tensor) -> torch.Tensor:
    """``torch._int_mm`` for any number of rows. CUDA's refuses M <= 16, so an eager call
    there pads the rows (exact; the pad is dropped). A traced call (torch.compile, export)
    keeps the plain op: the rewrite recognises it and replaces it with the qcompile op."""
    # is_compiling first: a traced call must not test m (a guard on a dynamic M)
    if not torch.compiler.is_compiling() and xq.is_cuda and xq.shape[0] <= 16:
        m = xq.shape[0]
        return torch._int_mm(torch.nn.functional.pad(xq, (0, 0, 0, 17 - m)), wq_t)[:m]
    return torch._int_mm(xq, wq_t)


def int8_gemm_reference(
    xq: torch.Tensor,
    wq: torch.Tensor,
    row_scale: torch.Tensor,
    col_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: str,
    config: str = "",
    azp: torch.Tensor | None = None,
    azp_adj: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain-PyTorch int8_gemm: exact int32 accumulation, then the float32 rescale.

    ``out = ((xq @ wq.T - azp * azp_adj).float() * row_scale * col_scale + bias)``.
    ``config``: as for :func:`mixed_gemm_reference` (kernel choice only; ignored here).
    ``azp`` / ``azp_adj`` (int32, both or neither): asymmetric activations' zero points,
    [M, 1] per token or one value, and the weight's per-channel correction [N] (its column
    sums when ``xq = round(x / s) + azp``); the product is subtracted from the int32 sum.
    """
    del config
    if (azp is None) != (azp_adj is None):
        raise ValueError("int8_gemm: azp and azp_adj come together")
    k = xq.shape[1]
    if xq.device.type == "cuda" and k % 8 == 0 and wq.shape[0] % 8 == 0:
        acc = int_mm(xq, wq.t())
    elif xq.device.type == "cuda":
        acc = (xq.double() @ wq.double().t()).to(torch.int32)  # exact below 2**53
    else:
        acc = xq.to(torch.int32) @ wq.to(torch.int32).t()
    if azp is not None:
        acc = acc - azp.to(torch.int32).reshape(-1, 1) * azp_adj.to(torch.int32).reshape(1, -1)
    out = acc.to(torch.float32) * row_scale.to(torch.float32) * col_scale.to(torch.float32)
    if bias is not None:
        out = out + bias.to(torch.float32)
    return out.to(as_dtype(out_dtype))


int8_gemm = torch.library.custom_op("qcompile::int8_gemm", mutates_args=())(
    int8_gemm_reference)


@int8_gemm.register_fake
def _int8_gemm_fake(xq, wq, row_scale, col_scale, bias, out_dtype, config="", azp=None,
                    azp_adj=None):
    return xq.new_empty((xq.shape[0], wq.shape[0]), dtype=as_dtype(out_dtype))


# --- lookup-table weights (NF4, FP4, any 16-value codebook) ---------------------------------

def lut_dequantize(codes: torch.Tensor, table: torch.Tensor, scales: torch.Tensor,
                   group_size: int, dequant_dtype: str | torch.dtype) -> torch.Tensor:
    """The weight [N, K] a ``lut_gemm`` operand stands for: ``table[c] * s`` per group of
    ``group_size`` along K, rounded once in ``dequant_dtype``. ``codes``: the codes c [N, K]
    (values in [0, 16)) packed as :func:`pack_nk` packs 4 bits; ``table``: [16] float32;
    ``scales``: [N, K / group_size]."""
    dd = as_dtype(dequant_dtype)
    c = unpack_nk(codes, 4, False).long()
    n, k = c.shape
    if tuple(table.shape) != (16,) or k % group_size or \
            tuple(scales.shape) != (n, k // group_size):
        raise ValueError(f"lut_gemm: table must be [16] and scales [N, K / group_size] = "
                         f"{(n, k // max(group_size, 1))}, got {tuple(table.shape)} and "
                         f"{tuple(scales.shape)}")
    w = table.to(dd)[c].reshape(n, k // group_size, group_size) * \
        scales.to(dd).reshape(n, -1, 1)
    return w.reshape(n, k)


def lut_gemm_reference(
    x: torch.Tensor,
    codes: torch.Tensor,
    table: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
    group_size: int,
    dequant_dtype: str,
    layout: str,
    config: str = "",
    norm_weight: torch.Tensor | None = None,
    norm_eps: float = 0.0,
    residual: torch.Tensor | None = None,
    norm_ssq: torch.Tensor | None = None,
    gemm_scales: torch.Tensor | None = None,
) -> torch.Tensor:
    """``qcompile::lut_gemm``: ``linear(x, W, bias)`` with ``W = lut_dequantize(...)`` cast to
    x's type; the dequantized weight equals the graph's bit for bit (the rewrite checks it).
    ``layout`` must be the reference "nk"; ``config`` names a kernel choice (ignored here).
    ``norm_weight`` / ``norm_eps`` / ``residual`` / ``norm_ssq``: a decode step's RMSNorm before
    and skip connection after, as in ``mixed_gemm`` (:func:`fused_linear`). ``gemm_scales``:
    the kernels' layout's block scales already in x's type, for the Hopper lookup-table GEMM
    (``kernels.prepare_lut_gemm``); the reference reads ``scales``."""
    del config, gemm_scales
    if layout != REFERENCE_LAYOUT:
        raise ValueError(f"the reference lut_gemm reads layout {REFERENCE_LAYOUT!r}, got "
                         f"{layout!r}")
    w = lut_dequantize(codes, table, scales, group_size, dequant_dtype)
    return fused_linear(x, w, bias, norm_weight, norm_eps, residual, norm_ssq)


# The reference on every device; the kernels package registers what reads the kernels' layout.
lut_gemm = torch.library.custom_op("qcompile::lut_gemm", mutates_args=())(lut_gemm_reference)


@lut_gemm.register_fake
def _lut_gemm_fake(x, codes, table, scales, bias, group_size, dequant_dtype, layout,
                   config="", norm_weight=None, norm_eps=0.0, residual=None, norm_ssq=None,
                   gemm_scales=None):
    return x.new_empty((*x.shape[:-1], codes.shape[0]))


def lut_gemm_gated_reference(
    x: torch.Tensor,
    codes: torch.Tensor,
    table: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
    group_size: int,
    dequant_dtype: str,
    layout: str,
    config: str = "",
    norm_weight: torch.Tensor | None = None,
    norm_eps: float = 0.0,
    norm_ssq: torch.Tensor | None = None,
    gemm_scales: torch.Tensor | None = None,
) -> torch.Tensor:
    """``qcompile::lut_gemm_gated``: silu(gate) * up of a gated MLP whose lookup-table codes
    (and block scales, bias) interleave the two projections in 16-row tiles, as
    ``mixed_gemm_gated`` does for affine weights."""
    del gemm_scales
    return gate_up(lut_gemm_reference(x, codes, table, scales, bias, group_size, dequant_dtype,
                                      layout, config, norm_weight, norm_eps, norm_ssq=norm_ssq))


lut_gemm_gated = torch.library.custom_op("qcompile::lut_gemm_gated", mutates_args=())(
    lut_gemm_gated_reference)


@lut_gemm_gated.register_fake
def _lut_gemm_gated_fake(x, codes, table, scales, bias, group_size, dequant_dtype, layout,
                         config="", norm_weight=None, norm_eps=0.0, norm_ssq=None,
                         gemm_scales=None):
    return x.new_empty((*x.shape[:-1], codes.shape[0] // 2))


def lut_gemm_norm_out_reference(
    x: torch.Tensor,
    codes: torch.Tensor,
    table: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
    group_size: int,
    dequant_dtype: str,
    layout: str,
    config: str,
    residual: torch.Tensor | None,
    next_norm_weight: torch.Tensor,
    gemm_scales: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``qcompile::lut_gemm_norm_out``: ``lut_gemm(.., residual)`` whose result is also the
    input of the next op's RMSNorm, as ``mixed_gemm_norm_out``: (out, out * next_norm_weight,
    ``norm_sums(out)``)."""
    del gemm_scales
    out = lut_gemm_reference(x, codes, table, scales, bias, group_size, dequant_dtype, layout,
                             config, residual=residual)
    return as_fused_result(out, False, next_norm_weight)


lut_gemm_norm_out = torch.library.custom_op("qcompile::lut_gemm_norm_out", mutates_args=())(
    lut_gemm_norm_out_reference)


@lut_gemm_norm_out.register_fake
def _lut_gemm_norm_out_fake(x, codes, table, scales, bias, group_size, dequant_dtype, layout,
                            config, residual, next_norm_weight, gemm_scales=None):
    out = x.new_empty((*x.shape[:-1], codes.shape[0]))
    sums = x.new_empty((*x.shape[:-1], codes.shape[0] // 16), dtype=torch.float32)
    return out, torch.empty_like(out), sums
