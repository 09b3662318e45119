"""A Llama-style decoder and int8 / int4 weight-only modules written the way gpt-fast writes
them, for ``bench_gptfast.py``: what users who copy gpt-fast's model and loop actually run.

Own code in gpt-fast's style (not a copy of it), and deliberately separate from
``llama_model``: a fused ``wqkv`` projection split into q, k, v; a ``KVCache`` module whose
``update`` writes ``k_cache[:, :, input_pos] = k`` (index_put); rotary embeddings from a
precomputed ``freqs_cis`` buffer and a causal-mask buffer, both indexed by ``input_pos``;
K/V heads repeated with ``repeat_interleave`` before ``F.scaled_dot_product_attention``.

Quantized modules, as gpt-fast's quantize.py stores and runs them:
- ``WeightOnlyInt8Linear``: ``weight`` int8 [N, K] and ``scales`` [N] buffers,
  ``F.linear(x, weight.to(x.dtype)) * scales``;
- ``WeightOnlyInt4Linear``: groups of 128 along K, asymmetric with gpt-fast's convention
  ``W = (q - 8) * s + z`` (``z = min + 8 * s``), ``weight`` in the layout of
  ``aten._convert_weight_to_int4pack`` (CUDA) / ``_convert_weight_to_int4pack_for_cpu``,
  ``scales_and_zeros`` [K/g, N, 2], forward ``aten._weight_int4pack_mm(_for_cpu)`` on a 2-D x.
``quantize_int8`` / ``quantize_int4`` replace every ``nn.Linear``, the output head included
(gpt-fast quantizes it too). Random weights only: nothing is downloaded.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ModelArgs", "CONFIGS", "model_args", "Transformer", "KVCache", "WeightOnlyInt8Linear",
           "WeightOnlyInt4Linear", "quantize_int8", "quantize_int4", "QUANTIZED_TYPES"]


def _round_up(n: int, k: int) -> int:
    return -(-n // k) * k


@dataclass
class ModelArgs:
    block_size: int = 2048          # longest sequence the rotary table covers
    vocab_size: int = 32000
    n_layer: int = 32
    n_head: int = 32
    dim: int = 4096
    intermediate_size: int = 11008
    n_local_heads: int = -1         # KV heads (grouped-query attention); -1: n_head
    head_dim: int = 0               # 0: dim // n_head
    rope_base: float = 10000.0
    norm_eps: float = 1e-5

    def __post_init__(self):
        if self.n_local_heads == -1:
            self.n_local_heads = self.n_head
        if not self.head_dim:
            self.head_dim = self.dim // self.n_head


CONFIGS = {
    # Llama-3-8B's shape (as gpt-fast's model.py lists it)
    "llama3-8b": dict(block_size=8192, n_layer=32, n_head=32, n_local_heads=8, dim=4096,
                      intermediate_size=14336, vocab_size=128256, rope_base=500000.0),
    # for CPU tests: K of every linear a multiple of 128 (int4 groups, int4pack's k tiles)
    "tiny": dict(block_size=256, n_layer=2, n_head=4, n_local_heads=2, dim=256,
                 intermediate_size=512, vocab_size=512, rope_base=500000.0),
}


def model_args(name: str, n_layer: int | None = None) -> ModelArgs:
    kw = dict(CONFIGS[name])
    if n_layer is not None:
        kw["n_layer"] = n_layer
    return ModelArgs(**kw)


class KVCache(nn.Module):
    def __init__(self, max_batch_size: int, max_seq_length: int, n_heads: int, head_dim: int,
                 dtype=torch.bfloat16):
        super().__init__()
        shape = (max_batch_size, n_heads, max_seq_length, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype))
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype))

    def update(self, input_pos: Tensor, k_val: Tensor, v_val: Tensor) -> tuple[Tensor, Tensor]:
        # input_pos [S], k_val / v_val [B, H, S, D]: written in place (index_put)
        k_out, v_out = self.k_cache, self.v_cache
        k_out[:, :, input_pos] = k_val
        v_out[:, :, input_pos] = v_val
        return k_out, v_out


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(torch.mean(xf * xf, dim=-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def precompute_freqs_cis(seq_len: int, head_dim: int, base: float,
                         dtype=torch.bfloat16) -> Tensor:
    """[seq_len, head_dim / 2, 2]: cos and sin of each position's rotation angles."""
    inv = 1.0 / (base ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim))
    angles = torch.outer(torch.arange(seq_len, device=inv.device).float(), inv)
    return torch.stack([torch.cos(angles), torch.sin(angles)], dim=-1).to(dtype)


def apply_rotary_emb(x: Tensor, freqs_cis: Tensor) -> Tensor:
    # x [B, S, H, D]; freqs_cis [S, D/2, 2]
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)
    rot = freqs_cis.view(1, pairs.size(1), 1, pairs.size(3), 2)
    re, im = pairs[..., 0], pairs[..., 1]
    cos, sin = rot[..., 0], rot[..., 1]
    out = torch.stack([re * cos - im * sin, im * cos + re * sin], dim=-1)
    return out.flatten(3).type_as(x)


class Attention(nn.Module):
    def __init__(self, config: ModelArgs, dtype=None):
        super().__init__()
        c = config
        qkv_out = (c.n_head + 2 * c.n_local_heads) * c.head_dim
        self.wqkv = nn.Linear(c.dim, qkv_out, bias=False, dtype=dtype)  # q, k, v in one
        self.wo = nn.Linear(c.n_head * c.head_dim, c.dim, bias=False, dtype=dtype)
        self.kv_cache: KVCache | None = None
        self.n_head, self.n_local_heads, self.head_dim = c.n_head, c.n_local_heads, c.head_dim
        self.dim = c.dim

    def forward(self, x: Tensor, freqs_cis: Tensor, mask: Tensor,
                input_pos: Tensor | None = None) -> Tensor:
        bsz, seqlen, _ = x.shape
        q_size = self.n_head * self.head_dim
        kv_size = self.n_local_heads * self.head_dim
        q, k, v = self.wqkv(x).split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(bsz, seqlen, self.n_head, self.head_dim)
        k = k.view(bsz, seqlen, self.n_local_heads, self.head_dim)
        v = v.view(bsz, seqlen, self.n_local_heads, self.head_dim)
        q = apply_rotary_emb(q, freqs_cis)
        k = apply_rotary_emb(k, freqs_cis)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        if self.kv_cache is not None:
            k, v = self.kv_cache.update(input_pos, k, v)
        rep = self.n_head // self.n_local_heads
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0)
        y = y.transpose(1, 2).contiguous().view(bsz, seqlen, q_size)
        return self.wo(y)


class FeedForward(nn.Module):
    def __init__(self, config: ModelArgs, dtype=None):
        super().__init__()
        self.w1 = nn.Linear(config.dim, config.intermediate_size, bias=False, dtype=dtype)
        self.w3 = nn.Linear(config.dim, config.intermediate_size, bias=False, dtype=dtype)
        self.w2 = nn.Linear(config.intermediate_size, config.dim, bias=False, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, config: ModelArgs, dtype=None):
        super().__init__()
        self.attention = Attention(config, dtype)
        self.feed_forward = FeedForward(config, dtype)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps, dtype)
        self.attention_norm = RMSNorm(config.dim, config.norm_eps, dtype)

    def forward(self, x: Tensor, input_pos: Tensor, freqs_cis: Tensor, mask: Tensor) -> Tensor:
        h = x + self.attention(self.attention_norm(x), freqs_cis, mask, input_pos)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    """``forward(idx [B, S], input_pos [S]) -> logits [B, S, vocab]`` after ``setup_caches``.

    ``dtype``: the dtype the layers are created in (bf16 for the benchmark, so that the
    8B-shaped model is never materialized in float32)."""

    def __init__(self, config: ModelArgs, dtype=None):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim, dtype=dtype)
        self.layers = nn.ModuleList(TransformerBlock(config, dtype)
                                    for _ in range(config.n_layer))
        self.norm = RMSNorm(config.dim, config.norm_eps, dtype)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False, dtype=dtype)
        self.register_buffer("freqs_cis", None, persistent=False)  # set by setup_caches
        self.register_buffer("causal_mask", None, persistent=False)
        self.max_batch_size = -1
        self.max_seq_length = -1

    def setup_caches(self, max_batch_size: int, max_seq_length: int) -> None:
        max_seq_length = _round_up(max_seq_length, 8)
        if self.max_seq_length >= max_seq_length and self.max_batch_size >= max_batch_size:
            return
        self.max_batch_size, self.max_seq_length = max_batch_size, max_seq_length
        c = self.config
        # the embedding is never quantized: its dtype and device are the model's
        dtype, device = self.tok_embeddings.weight.dtype, self.tok_embeddings.weight.device
        with torch.device(device):
            for block in self.layers:
                block.attention.kv_cache = KVCache(max_batch_size, max_seq_length,
                                                   c.n_local_heads, c.head_dim, dtype)
            self.register_buffer("freqs_cis", precompute_freqs_cis(
                c.block_size, c.head_dim, c.rope_base, dtype), persistent=False)
            self.register_buffer("causal_mask", torch.tril(torch.ones(
                max_seq_length, max_seq_length, dtype=torch.bool)), persistent=False)

    def forward(self, idx: Tensor, input_pos: Tensor) -> Tensor:
        assert self.freqs_cis is not None, "call setup_caches first"
        mask = self.causal_mask[None, None, input_pos]
        freqs_cis = self.freqs_cis[input_pos]
        x = self.tok_embeddings(idx)
        for block in self.layers:
            x = block(x, input_pos, freqs_cis, mask)
        return self.output(self.norm(x))


# ----------------------------------------------------------------------------------------
# gpt-fast-style weight-only quantization


class WeightOnlyInt8Linear(nn.Module):
    """int8 [N, K] weight, one scale per output channel, the scale applied to the output."""

    def __init__(self, in_features: int, out_features: int, dtype=torch.bfloat16, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8,
                                                   device=device))
        self.register_buffer("scales", torch.ones(out_features, dtype=dtype, device=device))

    def forward(self, input: Tensor) -> Tensor:
        return F.linear(input, self.weight.to(dtype=input.dtype)) * self.scales


def _int8_per_channel(w: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric per-row int8 over [-128, 127] (scale = absmax / 127.5, as gpt-fast's
    dynamically_quantize_per_channel gives for a zero-centred range)."""
    w32 = w.float()
    scales = (w32.abs().amax(dim=1) / 127.5).clamp(min=torch.finfo(torch.float32).eps)
    q = torch.round(w32 / scales[:, None]).clamp(-128, 127).to(torch.int8)
    return q, scales


def _int4_groupwise(w: Tensor, groupsize: int) -> tuple[Tensor, Tensor, Tensor]:
    """Asymmetric uint4 per group of ``groupsize`` along K, gpt-fast's convention:
    q in [0, 15], ``W ~ (q - 8) * s + z`` with ``z = min + 8 * s``.
    Returns (q int32 [N, K], scales float32 [N, K/g], zeros float32 [N, K/g])."""
    n, k = w.shape
    groups = w.float().reshape(-1, groupsize)
    lo, hi = groups.amin(dim=1, keepdim=True), groups.amax(dim=1, keepdim=True)
    scales = (hi - lo).clamp(min=1e-6) / 15
    zeros = lo + scales * 8
    q = groups.sub(lo).div(scales).round().clamp(0, 15).to(torch.int32)
    return q.reshape(n, k), scales.reshape(n, -1), zeros.reshape(n, -1)


def _pack_int4(q: Tensor, inner_k_tiles: int) -> Tensor:
    """q int32 [N, K] in [0, 15] -> the tensor ``_weight_int4pack_mm(_for_cpu)`` reads."""
    if q.device.type == "cuda":
        # aten::_convert_weight_to_int4pack(Tensor self, int innerKTiles): uint8 [N, K/2],
        # element 2j in the high nibble of byte j, element 2j + 1 in the low one
        packed = ((q[:, ::2] << 4) | q[:, 1::2]).to(torch.uint8)
        return torch.ops.aten._convert_weight_to_int4pack(packed, inner_k_tiles)
    # aten::_convert_weight_to_int4pack_for_cpu(Tensor self, int innerKTiles): int32 [N, K]
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, inner_k_tiles)


def _int4pack_mm(x: Tensor, weight: Tensor, groupsize: int, scales_and_zeros: Tensor) -> Tensor:
    if x.device.type == "cuda":
        return torch.ops.aten._weight_int4pack_mm(x, weight, groupsize, scales_and_zeros)
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x, weight, groupsize, scales_and_zeros)


class WeightOnlyInt4Linear(nn.Module):
    """uint4 weight in int4pack layout, ``scales_and_zeros`` [K/g, N, 2] (bf16)."""

    def __init__(self, weight: Tensor, scales_and_zeros: Tensor, in_features: int,
                 out_features: int, groupsize: int = 128, inner_k_tiles: int = 8):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.groupsize, self.inner_k_tiles = groupsize, inner_k_tiles
        self.register_buffer("weight", weight)
        self.register_buffer("scales_and_zeros", scales_and_zeros)

    @classmethod
    def from_linear(cls, linear: nn.Linear, groupsize: int = 128, inner_k_tiles: int = 8):
        n, k = linear.weight.shape
        if k % groupsize or k % (inner_k_tiles * 16) or n % 8:
            raise ValueError(f"int4pack needs K % {groupsize}, K % {inner_k_tiles * 16} "
                             f"and N % 8 to be 0, got N={n} K={k}")
        q, scales, zeros = _int4_groupwise(linear.weight.detach(), groupsize)
        sz = torch.stack([scales, zeros], dim=-1).transpose(0, 1).contiguous()  # [K/g, N, 2]
        return cls(_pack_int4(q, inner_k_tiles), sz.to(torch.bfloat16), k, n, groupsize,
                   inner_k_tiles)

    def dequantize(self) -> Tensor:
        """The bf16 [N, K] weight this module multiplies by (for checks)."""
        eye = torch.eye(self.in_features, dtype=torch.bfloat16, device=self.weight.device)
        return _int4pack_mm(eye, self.weight, self.groupsize, self.scales_and_zeros).t()

    def forward(self, input: Tensor) -> Tensor:
        input = input.to(torch.bfloat16)
        shape = input.shape
        out = _int4pack_mm(input.reshape(-1, shape[-1]), self.weight, self.groupsize,
                           self.scales_and_zeros)
        return out.reshape(*shape[:-1], self.out_features)


def _replace_linears(model: nn.Module, make) -> nn.Module:
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, make(child))
    return model


@torch.no_grad()
def quantize_int8(model: nn.Module) -> nn.Module:
    """Every nn.Linear (the output head too) -> WeightOnlyInt8Linear, in place."""
    def make(lin: nn.Linear) -> WeightOnlyInt8Linear:
        q, s = _int8_per_channel(lin.weight)
        new = WeightOnlyInt8Linear(lin.in_features, lin.out_features, lin.weight.dtype,
                                   lin.weight.device)
        new.weight.copy_(q)
        new.scales.copy_(s.to(lin.weight.dtype))
        return new
    return _replace_linears(model, make)


@torch.no_grad()
def quantize_int4(model: nn.Module, groupsize: int = 128, inner_k_tiles: int = 8) -> nn.Module:
    """Every nn.Linear (the output head too) -> WeightOnlyInt4Linear, in place."""
    return _replace_linears(
        model, lambda lin: WeightOnlyInt4Linear.from_linear(lin, groupsize, inner_k_tiles))


QUANTIZED_TYPES = (WeightOnlyInt8Linear, WeightOnlyInt4Linear)
