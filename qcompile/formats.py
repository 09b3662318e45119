"""Quantization formats: reference quantized linear modules and the quantizers that make them.

Each module's forward is plain PyTorch that reads like the math, the way the library it
imitates writes it (gpt-fast, AWQ, GPTQ, SmoothQuant). They run anywhere, define the
numbers qcompile must reproduce, and are what the graph pass finds again after
torch.compile has traced them. This module knows nothing of FX graphs or kernels.

Formats:
- ``Int8WeightOnlyLinear`` (W8A16): int8 [N, K], per-channel symmetric scales [N];
  ``style="pre"`` dequantizes the weight, ``"post"`` scales the output (gpt-fast).
- ``Int4WeightOnlyLinear`` (W4A16): groups of 32/64/128/256 along K, asymmetric with
  zeros or symmetric, packed as AWQ (8 nibbles per int32 along N, interleaved), as GPTQ
  (8 nibbles per int32 along K, sequential) or two nibbles per uint8 along K. GPTQ's
  act-order (``desc_act``): groups of input columns in the order of decreasing activation
  energy, found through an unsorted ``g_idx``.
- ``LookupTable4bitLinear`` (NF4 / FP4, QLoRA's bitsandbytes formats): 4-bit codes into a
  16-value table times a per-block absmax (blocks of 32..256 along K), stored as
  bitsandbytes stores them; the absmax optionally itself quantized to 8 bits ("double quant").
- ``SmoothQuantLinear`` (W8A8): int8 per-channel weights, activations quantized per
  token (dynamic) or per tensor (static), optional smoothing factors and bias.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .kernels.ops import int_mm

__all__ = [
    "Int8WeightOnlyLinear",
    "Int4WeightOnlyLinear",
    "SmoothQuantLinear",
    "LookupTable4bitLinear",
    "quantize",
    "quantize_per_channel_int8",
    "quantize_groupwise_int4",
    "METHODS",
    "PACKINGS",
    "GROUP_SIZES",
]

METHODS = ("w8a16", "w4a16", "w8a8", "nf4", "fp4")
LUT_METHODS = ("nf4", "fp4")
ACT_MODES = ("dynamic", "static", "dynamic_asym")  # W8A8 activation quantization
PACKINGS = ("uint8", "awq", "gptq")
GROUP_SIZES = (32, 64, 128, 256)

# AWQ stores the 8 nibbles of an int32 in this order of output channels.
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
_AWQ_SHIFTS = (0, 16, 4, 20, 8, 24, 12, 28)  # shift of channel j of 8, by AWQ_ORDER


def quantize_per_channel_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: returns (q int8 [N, K], scales float32 [N])."""
    w32 = w.detach().float()
    scales = w32.abs().amax(dim=1).clamp(min=1e-8) / 127.0
    q = torch.round(w32 / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales


def quantize_groupwise_int4(
    w: torch.Tensor, group_size: int, zero_point: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Group-wise int4 along K.

    Returns (q int16 [N, K], scales float32 [N, K/g], zeros float32 [N, K/g] or None);
    with zeros q is unsigned in [0, 15] and w ~ (q - z) * s, without q is in [-8, 7]
    and w ~ q * s.
    """
    n, k = w.shape
    _check_group(k, group_size)
    wg = w.detach().float().reshape(n, k // group_size, group_size)
    if zero_point:
        lo = wg.amin(dim=-1).clamp(max=0)
        hi = wg.amax(dim=-1).clamp(min=0)
        scales = ((hi - lo) / 15.0).clamp(min=1e-8)
        zeros = torch.round(-lo / scales).clamp(0, 15)
        q = torch.round(wg / scales[..., None] + zeros[..., None]).clamp(0, 15)
        return q.reshape(n, k).to(torch.int16), scales, zeros
    scales = (wg.abs().amax(dim=-1) / 7.0).clamp(min=1e-8)
    q = torch.round(wg / scales[..., None]).clamp(-8, 7)
    return q.reshape(n, k).to(torch.int16), scales, None


def _check_group(k: int, group_size: int, name: str = "group_size") -> None:
    """``name`` is the argument as the caller spelled it (block_size for lookup tables)."""
    if not isinstance(group_size, int) or group_size <= 0:
        raise ValueError(f"{name} must be a positive int, got {group_size!r}")
    if k % group_size:
        raise ValueError(f"{name}={group_size} does not divide in_features={k}")


def _pack_nibbles_int32(q: torch.Tensor, dim: int, order: Iterable[int]) -> torch.Tensor:
    """Pack unsigned nibbles 8 to an int32 along ``dim``; nibble i holds element order[i]."""
    q = q.to(torch.int32).movedim(dim, -1)
    *lead, last = q.shape
    q = q.reshape(*lead, last // 8, 8)[..., list(order)]
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    packed = (q << shifts).sum(dim=-1, dtype=torch.int64)
    packed = torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)
    return packed.movedim(-1, dim).contiguous()


class Int8WeightOnlyLinear(nn.Module):
    """W8A16: ``y = x @ (q * s[:, None]).T + b`` with q int8 [N, K], s [N]."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor,
                 bias: torch.Tensor | None = None, style: Literal["pre", "post"] = "pre"):
        super().__init__()
        if qweight.dtype != torch.int8 or qweight.dim() != 2:
            raise TypeError(f"qweight must be a 2-D int8 tensor, got {qweight.dtype} "
                            f"{tuple(qweight.shape)}")
        if style not in ("pre", "post"):
            raise ValueError(f"style must be 'pre' or 'post', got {style!r}")
        self.in_features, self.out_features, self.style = qweight.shape[1], qweight.shape[0], style
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, style: Literal["pre", "post"] = "pre"):
        q, s = quantize_per_channel_int8(linear.weight)
        dtype = linear.weight.dtype
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(q, s.to(dtype), bias, style)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.style == "post":  # gpt-fast: the scale factors out of the sum over K
            y = F.linear(x, self.qweight.to(x.dtype)) * self.scales
            return y if self.bias is None else y + self.bias
        return F.linear(x, self.qweight.to(x.dtype) * self.scales[:, None], self.bias)


class Int4WeightOnlyLinear(nn.Module):
    """W4A16 group-wise: ``W = (q - z) * s`` (or ``q * s``) per group of g along K.

    ``packing`` says how q is stored, as the library it imitates stores it:
    - ``"uint8"``: uint8 [N, K/2], element k in the low nibble of byte k//2 if k even;
      scales/zeros [N, K/g];
    - ``"awq"``: int32 [K, N/8], 8 output channels per word in AWQ's interleaved order;
      zeros int32 [K/g, N/8] likewise; scales [K/g, N]; ``W.T = (q - z) * s``;
    - ``"gptq"``: int32 [K/8, N], 8 consecutive input channels per word; zeros int32
      [K/g, N/8] sequential along N; scales [K/g, N]; groups through ``g_idx``.
    Without zeros (symmetric) q is stored as ``q + 8`` and the forward subtracts 8.

    ``g_idx`` (gptq only; int [K]): the group of each input column, for act-order
    checkpoints whose groups are not runs of g consecutive columns; scales and zeros column
    ``j`` then belong to the columns with ``g_idx == j``. Default ``arange(K) // g``.
    """

    def __init__(self, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                 group_size: int, bias: torch.Tensor | None = None,
                 packing: Literal["uint8", "awq", "gptq"] = "uint8",
                 g_idx: torch.Tensor | None = None):
        super().__init__()
        if packing not in PACKINGS:
            raise ValueError(f"packing must be one of {PACKINGS}, got {packing!r}")
        n, k = q.shape
        _check_group(k, group_size)
        if g_idx is not None and (packing != "gptq" or tuple(g_idx.shape) != (k,)):
            raise ValueError(f"g_idx needs packing='gptq' and shape ({k},), got "
                             f"{packing!r} and {tuple(g_idx.shape)}")
        if packing in ("awq", "gptq") and (n % 8 or k % 8):
            raise ValueError(f"packing={packing!r} needs N and K divisible by 8, got {n}x{k}")
        self.in_features, self.out_features = k, n
        self.group_size, self.packing, self.has_zeros = group_size, packing, zeros is not None
        u = (q if zeros is not None else q + 8).to(torch.int32)  # unsigned nibbles
        z = (zeros if zeros is not None else torch.full_like(scales, 8)).to(torch.int32)
        if packing == "uint8":
            self.register_buffer("qweight", (u[:, 0::2] | (u[:, 1::2] << 4)).to(torch.uint8))
            self.register_buffer("scales", scales.contiguous())
            self.register_buffer("zeros", z.to(scales.dtype) if zeros is not None else None)
        elif packing == "awq":
            self.register_buffer("qweight", _pack_nibbles_int32(u.t(), 1, AWQ_ORDER))
            self.register_buffer("qzeros", _pack_nibbles_int32(z.t(), 1, AWQ_ORDER))
            self.register_buffer("scales", scales.t().contiguous())
        else:
            self.register_buffer("qweight", _pack_nibbles_int32(u.t(), 0, range(8)))
            self.register_buffer("qzeros", _pack_nibbles_int32(z.t(), 1, range(8)))
            self.register_buffer("scales", scales.t().contiguous())
            if g_idx is None:
                g_idx = torch.arange(k, dtype=torch.int32, device=q.device) // group_size
            self.register_buffer("g_idx", g_idx.to(torch.int32).contiguous())
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 128, zero_point: bool = True,
                    packing: Literal["uint8", "awq", "gptq"] = "uint8",
                    perm: torch.Tensor | None = None):
        """``perm`` (gptq only): act-order, the input columns in the order GPTQ quantizes
        them (decreasing diagonal of the Hessian); each group is g consecutive columns of
        that order, and ``g_idx[perm[i]] = i // g`` as AutoGPTQ writes it."""
        w, g_idx = linear.weight, None
        if perm is not None:
            if packing != "gptq":
                raise ValueError(f"act-order (perm) needs packing='gptq', got {packing!r}")
            perm = perm.to(torch.long)
            w = w[:, perm]
        q, s, z = quantize_groupwise_int4(w, group_size, zero_point)
        if perm is not None:
            inv = torch.argsort(perm)
            q = q[:, inv]
            g_idx = (torch.arange(q.shape[1], device=perm.device) // group_size)[inv]
        dtype = linear.weight.dtype
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(q, s.to(dtype), z, group_size, bias, packing, g_idx)

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """W [N, K] (W.T [K, N] for awq/gptq packing) computed as the library does."""
        g = self.group_size
        if self.packing == "uint8":
            b = self.qweight
            q = torch.stack((b & 0xF, b >> 4), dim=-1).reshape(self.out_features, -1)
            s = self.scales.repeat_interleave(g, dim=1)
            if not self.has_zeros:
                return ((q.to(dtype) - 8) * s).to(dtype)
            z = self.zeros.repeat_interleave(g, dim=1)
            return ((q.to(dtype) - z) * s).to(dtype)
        if self.packing == "awq":
            shifts = torch.tensor(_AWQ_SHIFTS, dtype=torch.int32, device=self.qweight.device)
            iw = ((self.qweight[:, :, None] >> shifts) & 15).reshape(self.in_features, -1)
            iz = ((self.qzeros[:, :, None] >> shifts) & 15).reshape(-1, self.out_features)
            iz = iz.repeat_interleave(g, dim=0)
            s = self.scales.repeat_interleave(g, dim=0)
            return ((iw - iz).to(dtype) * s).to(dtype)
        shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=self.qweight.device)
        iw = ((self.qweight[:, None, :] >> shifts[None, :, None]) & 15)
        iw = iw.reshape(self.in_features, self.out_features)
        iz = ((self.qzeros[:, :, None] >> shifts) & 15).reshape(-1, self.out_features)
        return (self.scales[self.g_idx] * (iw - iz[self.g_idx]).to(dtype)).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.dequantized_weight(x.dtype)
        if self.packing == "uint8":
            return F.linear(x, w, self.bias)
        y = torch.matmul(x, w)  # AWQ/GPTQ dequantize to W.T [K, N]
        return y if self.bias is None else y + self.bias


def _lut_code(name: str) -> torch.Tensor:
    from .lowering.lookup_table import code_table  # bitsandbytes' values, written down once
    return code_table(name)


# Weights rounded to the table at a time in LookupTable4bitLinear.from_linear (bounds its
# temporary memory to 16 float32 distances of this many weights: 1 GiB).
_NEAREST_CHUNK = 1 << 24


class LookupTable4bitLinear(nn.Module):
    """NF4 / FP4 (bitsandbytes' ``Linear4bit``): ``W = table[c] * absmax`` per block of
    ``block_size`` consecutive weights along K, the product in float32, then cast to x's type.

    Stored as bitsandbytes stores it: ``qweight`` uint8 [N * K / 2, 1], the flattened codes
    two per byte (element 2i in the high nibble), ``table`` float32 [16], ``absmax`` float32
    [N * K / block_size]. With ``double_quant`` the absmax is itself quantized in blocks of
    256: ``absmax = absmax_code[absmax_q] * absmax2[i // 256] + absmax_offset`` (uint8 codes
    into a 256-value linear code, one float32 scale per 256 blocks, the mean as offset).
    """

    def __init__(self, codes: torch.Tensor, table: torch.Tensor, absmax: torch.Tensor,
                 block_size: int, bias: torch.Tensor | None = None, double_quant: bool = False):
        super().__init__()
        n, k = codes.shape
        _check_group(k, block_size, "block_size")
        self.in_features, self.out_features, self.block_size = k, n, block_size
        self.double_quant = double_quant
        c = codes.reshape(-1).to(torch.uint8)
        self.register_buffer("qweight", ((c[0::2] << 4) | c[1::2]).reshape(-1, 1))
        self.register_buffer("table", table.to(torch.float32).contiguous())
        absmax = absmax.reshape(-1).to(torch.float32)
        if double_quant:
            nb = absmax.numel()
            offset = absmax.mean()
            v = torch.nn.functional.pad(absmax - offset, (0, -nb % 256)).reshape(-1, 256)
            absmax2 = v.abs().amax(1).clamp(min=1e-12)
            code = torch.linspace(-1, 1, 256, device=absmax.device)
            q8 = torch.round((v / absmax2[:, None] + 1) * 127.5).clamp(0, 255).to(torch.uint8)
            self.register_buffer("absmax_q", q8.reshape(-1)[:nb].contiguous())
            self.register_buffer("absmax_code", code)
            self.register_buffer("absmax2", absmax2.contiguous())
            self.register_buffer("absmax_offset", offset.reshape(()).clone())
            self.absmax = None
        else:
            self.register_buffer("absmax", absmax.contiguous())
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, table: str | torch.Tensor = "nf4",
                    block_size: int = 64, double_quant: bool = False):
        """Round each weight to the nearest ``table`` value (``"nf4"``, ``"fp4"``, or any [16]
        tensor in [-1, 1]) after dividing its block by the block's largest magnitude."""
        w = linear.weight.detach().float()
        t = (_lut_code(table) if isinstance(table, str) else table.detach().float().reshape(16))
        t = t.to(w.device)
        n, k = w.shape
        _check_group(k, block_size, "block_size")
        blocks = w.reshape(-1, block_size)
        absmax = blocks.abs().amax(1).clamp(min=1e-8)
        normed = blocks / absmax[:, None]
        # the nearest value by distance to all 16 (ties: the first in table order), a slice of
        # blocks at a time: all at once would hold 16 float32 distances a weight (34 GB for
        # an output head of 128256 x 4096)
        codes = torch.empty(normed.shape, dtype=torch.uint8, device=w.device)
        step = max(1, _NEAREST_CHUNK // block_size)
        for i in range(0, normed.shape[0], step):
            codes[i:i + step] = normed[i:i + step].unsqueeze(-1).sub(t).abs().argmin(-1)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(codes.reshape(n, k), t, absmax, block_size, bias, double_quant)

    def block_absmax(self) -> torch.Tensor:
        """The per-block absmax [N * K / block_size] float32 (double quant read back)."""
        if not self.double_quant:
            return self.absmax
        nb = self.absmax_q.numel()
        q = torch.nn.functional.pad(self.absmax_q, (0, -nb % 256)).reshape(-1, 256)
        nested = self.absmax_code[q.long()] * self.absmax2[:, None]
        return nested.reshape(-1)[:nb] + self.absmax_offset

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """W [N, K] as bitsandbytes' dequantize_4bit computes it (float32, then ``dtype``)."""
        a = self.qweight.reshape(-1)
        codes = torch.stack((a >> 4, a & 15), dim=-1).reshape(-1)
        w = self.table[codes.long()].reshape(-1, self.block_size) * self.block_absmax()[:, None]
        return w.reshape(self.out_features, self.in_features).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized_weight(x.dtype), bias)


class SmoothQuantLinear(nn.Module):
    """W8A8 SmoothQuant: int8 x int8 on the integer units, rescaled per token and channel.

    ``y = (int_mm(quant(x / smooth), q.T) * x_scale * w_scale).to(x.dtype) + b`` where
    ``quant`` is per token (``act="dynamic"``, absmax of each row) or per tensor with a
    calibrated scale (``act="static"``). ``act="dynamic_asym"`` quantizes each token over
    its [min, max] with a zero point (``xq = round(x / s) + zp``, all 256 levels used for
    one-sided rows such as post-activation values) and corrects the integer sum exactly:
    ``int_mm(xq, q.T) - zp * q.sum(1)`` in int32, before the rescale.
    """

    def __init__(self, qweight: torch.Tensor, w_scales: torch.Tensor,
                 bias: torch.Tensor | None = None, smooth: torch.Tensor | None = None,
                 act: Literal["dynamic", "static", "dynamic_asym"] = "dynamic",
                 act_scale: float | None = None):
        super().__init__()
        if qweight.dtype != torch.int8 or qweight.dim() != 2:
            raise TypeError(f"qweight must be a 2-D int8 tensor, got {qweight.dtype}")
        if act not in ACT_MODES:
            raise ValueError(f"act must be one of {ACT_MODES}, got {act!r}")
        if act == "static" and (act_scale is None or not act_scale > 0):
            raise ValueError(f"act='static' needs a positive act_scale, got {act_scale!r}")
        self.in_features, self.out_features, self.act = qweight.shape[1], qweight.shape[0], act
        self.register_buffer("qweight", qweight)
        self.register_buffer("w_scales", w_scales.float().reshape(1, -1))
        self.register_buffer("smooth", None if smooth is None else 1.0 / smooth)
        self.register_buffer("act_scale", None if act != "static"
                             else torch.tensor(float(act_scale), dtype=torch.float32))
        # the zero-point correction's weight side: column sums of q, exact in int32
        self.register_buffer("azp_adj", qweight.sum(dim=1, dtype=torch.int32)
                             if act == "dynamic_asym" else None)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear,
                    act: Literal["dynamic", "static", "dynamic_asym"] = "dynamic",
                    smooth: torch.Tensor | None = None, act_absmax: float | None = None):
        w = linear.weight.detach()
        if smooth is not None:
            w = w * smooth.to(w.dtype)  # migrate activation outliers into the weight
        q, s = quantize_per_channel_int8(w)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        act_scale = None if act_absmax is None else act_absmax / 127.0
        return cls(q, s, bias, smooth, act, act_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        if self.smooth is not None:
            x = x * self.smooth.to(x.dtype)
        if self.act == "dynamic":
            x_scale = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-5) / 127.0
            xq = torch.round(x.float() / x_scale).clamp(-128, 127).to(torch.int8)
            y = int_mm(xq, self.qweight.t()).float() * x_scale * self.w_scales
        elif self.act == "dynamic_asym":
            # [min, max] of each token, widened to hold 0 so that 0 is exact
            lo = x.amin(dim=-1, keepdim=True).float().clamp(max=0.0)
            hi = x.amax(dim=-1, keepdim=True).float().clamp(min=0.0)
            x_scale = ((hi - lo) / 255.0).clamp(min=1e-5)
            zp = (-128.0 - torch.round(lo / x_scale)).clamp(-128, 127)
            xq = (torch.round(x.float() / x_scale) + zp).clamp(-128, 127).to(torch.int8)
            acc = int_mm(xq, self.qweight.t()) - zp.to(torch.int32) * self.azp_adj
            y = acc.float() * x_scale * self.w_scales
        else:
            xq = torch.round(x.float() / self.act_scale).clamp(-128, 127).to(torch.int8)
            y = int_mm(xq, self.qweight.t()).float() * (self.act_scale * self.w_scales)
        y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)


# The layers quantize() puts in place of nn.Linear (tensor parallel shards these too).
QUANTIZED_LINEARS = (Int8WeightOnlyLinear, Int4WeightOnlyLinear, SmoothQuantLinear,
                     LookupTable4bitLinear)


def _linears(model: nn.Module, skip: Iterable[str]) -> list[tuple[nn.Module, str, nn.Linear]]:
    skip = tuple(skip)
    found = []
    for name, mod in model.named_modules():
        for child_name, child in mod.named_children():
            full = f"{name}.{child_name}" if name else child_name
            if type(child) is nn.Linear and not any(full.startswith(s) for s in skip):
                found.append((mod, child_name, child))
    return found


def _run_calibration(model: nn.Module, linears, calibration, hook) -> None:
    """Run the calibration batches through ``model`` with ``hook(module, args)`` called
    before every listed linear."""
    hooks = [lin.register_forward_pre_hook(hook) for _, _, lin in linears]
    try:
        for batch in calibration:
            model(*batch) if isinstance(batch, (tuple, list)) else model(batch)
    finally:
        for h in hooks:
            h.remove()


@torch.no_grad()
def _calibrate_absmax(model: nn.Module, linears, calibration) -> dict[int, float]:
    absmax: dict[int, float] = {}

    def hook(mod, args):
        absmax[id(mod)] = max(absmax.get(id(mod), 0.0), float(args[0].abs().max()))

    _run_calibration(model, linears, calibration, hook)
    return absmax


@torch.no_grad()
def _calibrate_energy(model: nn.Module, linears, calibration) -> dict[int, torch.Tensor]:
    """Per linear, the sum over calibration tokens of x[:, k]^2: the diagonal of GPTQ's
    Hessian 2 X^T X, whose decreasing order is act-order's column order."""
    energy: dict[int, torch.Tensor] = {}

    def hook(mod, args):
        x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
        energy[id(mod)] = energy.get(id(mod), 0) + (x * x).sum(0)

    _run_calibration(model, linears, calibration, hook)
    return energy


@torch.no_grad()
def quantize(
    model: nn.Module,
    method: str,
    *,
    group_size: int = 128,
    zero_point: bool = True,
    packing: str = "uint8",
    style: str = "pre",
    act: str = "dynamic",
    calibration: Iterable | None = None,
    skip: Iterable[str] = (),
    act_order: bool = False,
    block_size: int = 64,
    double_quant: bool = False,
) -> nn.Module:
    """Replace the ``nn.Linear`` layers of ``model`` in place by quantized ones; return it.

    Args:
        method: ``"w8a16"``, ``"w4a16"``, ``"w8a8"``, or ``"nf4"`` / ``"fp4"`` (4-bit
            lookup-table codes, bitsandbytes' formats: ``LookupTable4bitLinear``).
        group_size: W4A16 group along K (32, 64, 128 or 256).
        zero_point: W4A16 asymmetric with zeros (True) or symmetric.
        packing: W4A16 storage: ``"uint8"``, ``"awq"`` or ``"gptq"``.
        style: W8A16 ``"pre"`` (dequantize the weight) or ``"post"`` (scale the output).
        act: W8A8 activation quantization, ``"dynamic"`` (per token, symmetric),
            ``"dynamic_asym"`` (per token with a zero point) or ``"static"`` (per tensor,
            needs ``calibration``).
        calibration: iterable of model inputs (a tensor or a tuple of arguments) used
            to measure activation ranges for ``act="static"``.
        skip: name prefixes of linears to leave in floating point (e.g. ``"lm_head"``).
        act_order: W4A16 GPTQ packing only: GPTQ's ``desc_act``, groups formed over the input
            columns in decreasing order of their activation energy on ``calibration``
            (needed), stored through an unsorted ``g_idx``. Linears reading one input
            (q/k/v) get one order. Only the grouping is GPTQ's: the rounding is still
            round-to-nearest, not GPTQ's error feedback.
        block_size: nf4 / fp4: weights along K sharing one absmax (32, 64, 128 or 256).
        double_quant: nf4 / fp4: the absmax itself quantized to 8 bits in blocks of 256.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == "w4a16" and group_size not in GROUP_SIZES:
        raise ValueError(f"group_size must be one of {GROUP_SIZES}, got {group_size!r}")
    if method in LUT_METHODS and block_size not in GROUP_SIZES:
        raise ValueError(f"block_size must be one of {GROUP_SIZES}, got {block_size!r}")
    if packing not in PACKINGS:
        raise ValueError(f"packing must be one of {PACKINGS}, got {packing!r}")
    if style not in ("pre", "post"):
        raise ValueError(f"style must be 'pre' or 'post', got {style!r}")
    if act not in ACT_MODES:
        raise ValueError(f"act must be one of {ACT_MODES}, got {act!r}")
    if method == "w8a8" and act == "static" and calibration is None:
        raise ValueError("act='static' needs calibration inputs (calibration=[...])")
    if act_order and (method != "w4a16" or packing != "gptq" or calibration is None):
        raise ValueError("act_order needs method='w4a16', packing='gptq' and calibration "
                         "inputs (calibration=[...])")
    skip = tuple(skip)
    linears = _linears(model, skip)
    if not linears:
        done = sorted({type(m).__name__ for m in model.modules() if isinstance(m, QUANTIZED_LINEARS)})
        if done:
            raise ValueError(f"quantize: the model has no nn.Linear left to quantize, and is "
                             f"already quantized ({', '.join(done)}); quantize the float model "
                             f"to change its format")
        raise ValueError("quantize: the model has no nn.Linear layers to quantize"
                         + (f" outside skip={skip!r}" if skip else ""))
    absmax = (_calibrate_absmax(model, linears, calibration)
              if method == "w8a8" and act == "static" else {})
    energy = _calibrate_energy(model, linears, calibration) if act_order else {}
    for parent, name, lin in linears:
        if method == "w8a16":
            new = Int8WeightOnlyLinear.from_linear(lin, style=style)
        elif method == "w4a16":
            e = energy.get(id(lin))
            perm = None if e is None else torch.argsort(e, descending=True, stable=True)
            new = Int4WeightOnlyLinear.from_linear(lin, group_size, zero_point, packing, perm)
        elif method in LUT_METHODS:
            new = LookupTable4bitLinear.from_linear(lin, method, block_size, double_quant)
        else:
            new = SmoothQuantLinear.from_linear(lin, act=act, act_absmax=absmax.get(id(lin)))
        setattr(parent, name, new.to(lin.weight.device))
    return model
