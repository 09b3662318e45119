"""A compact Llama-style decoder with a static KV cache, for demos, tests and benchmarks.

Plain PyTorch in the gpt-fast manner: RMSNorm, rotary embeddings, grouped-query
attention over a preallocated cache, SwiGLU MLP. Every projection is an ``nn.Linear``, so
``qcompile.quantize`` can replace them. Random weights only: nothing is downloaded.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import decode_attention as attention

__all__ = ["LlamaConfig", "Llama", "CONFIGS"]


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int = 256
    dim: int = 128
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    intermediate: int = 256
    max_seq_len: int = 256
    rope_base: float = 10000.0
    norm_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


CONFIGS = {
    "tiny": LlamaConfig(),
    # Llama-3-8B shapes (hidden 4096, MLP 14336, 32 heads, 8 KV heads), fewer layers.
    "llama3-8b-8l": LlamaConfig(vocab_size=32000, dim=4096, n_layers=8, n_heads=32,
                                n_kv_heads=8, intermediate=14336, max_seq_len=1024,
                                rope_base=500000.0),
    "llama3-8b": LlamaConfig(vocab_size=128256, dim=4096, n_layers=32, n_heads=32,
                             n_kv_heads=8, intermediate=14336, max_seq_len=1024,
                             rope_base=500000.0),
    # Llama-3-70B shapes (hidden 8192, MLP 28672, 64 heads, 8 KV heads); benchmarks pick the
    # number of layers that fits
    "llama3-70b": LlamaConfig(vocab_size=128256, dim=8192, n_layers=80, n_heads=64,
                              n_kv_heads=8, intermediate=28672, max_seq_len=1024,
                              rope_base=500000.0),
}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return y.to(x.dtype) * self.weight


def _rope_cache(cfg: LlamaConfig) -> torch.Tensor:
    half = cfg.head_dim // 2
    freqs = 1.0 / (cfg.rope_base ** (torch.arange(0, half).float() / half))
    angles = torch.outer(torch.arange(cfg.max_seq_len).float(), freqs)
    return torch.stack((angles.cos(), angles.sin()), dim=-1)  # [T, half, 2]


def _apply_rope(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    # x [B, S, H, D]; rope [S, D/2, 2]
    xs = x.float().reshape(*x.shape[:-1], -1, 2)
    rope = rope[None, :, None]
    out = torch.stack((xs[..., 0] * rope[..., 0] - xs[..., 1] * rope[..., 1],
                       xs[..., 1] * rope[..., 0] + xs[..., 0] * rope[..., 1]), dim=-1)
    return out.flatten(3).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = cfg
        # the heads this module computes: a tensor-parallel shard divides them (qcompile.tp
        # splits the projections; the model says how many heads they hold)
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        self.register_buffer("k_cache", None, persistent=False)  # set by setup_caches
        self.register_buffer("v_cache", None, persistent=False)

    def forward(self, x, rope, input_pos, mask):
        b, s, _ = x.shape
        c = self  # head counts and size
        q = _apply_rope(self.wq(x).view(b, s, c.n_heads, c.head_dim), rope)
        k = _apply_rope(self.wk(x).view(b, s, c.n_kv_heads, c.head_dim), rope)
        v = self.wv(x).view(b, s, c.n_kv_heads, c.head_dim)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        if self.k_cache is not None:
            self.k_cache[:b, :, input_pos] = k
            self.v_cache[:b, :, input_pos] = v
            k, v = self.k_cache[:b], self.v_cache[:b]
        # Grouped-query attention without copying K and V once per query head: the `rep`
        # query heads of a kv head (heads kv * rep + r) are attended as rep x s query rows of
        # that one head, which the softmax treats independently, each row keeping its
        # position's mask row. (The copies were two kernels a layer that rewrote the whole
        # cache, about a tenth of an 8-layer batch-1 decode step on an H100.)
        rep = c.n_heads // c.n_kv_heads
        t = k.shape[2]
        q = q.reshape(b, c.n_kv_heads, rep * s, c.head_dim)
        if self.k_cache is not None and attention.kernel_takes(q, k, v):
            # decode steps on a GPU: keys split over CTAs (qcompile/attention.py)
            y = attention.cached_attention(q, k, v, input_pos)
        else:
            mask = mask[:, :, None].expand(mask.shape[0], 1, rep, s, t).reshape(-1, 1, rep * s, t)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = y.reshape(b, c.n_heads, s, c.head_dim)
        return self.wo(y.transpose(1, 2).reshape(b, s, c.n_heads * c.head_dim))


class FeedForward(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.intermediate, bias=False)
        self.w3 = nn.Linear(cfg.dim, cfg.intermediate, bias=False)
        self.w2 = nn.Linear(cfg.intermediate, cfg.dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x, rope, input_pos, mask):
        h = x + self.attention(self.attention_norm(x), rope, input_pos, mask)
        return h + self.feed_forward(self.ffn_norm(h))


class Llama(nn.Module):
    """``forward(tokens [B, S], input_pos [S] or None) -> logits [B, S, vocab]``.

    Without caches (``setup_caches`` not called) the whole sequence is attended causally;
    with caches, ``input_pos`` says where the tokens go (prefill, then one per step).
    """

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.register_buffer("rope", _rope_cache(cfg), persistent=False)
        self.register_buffer("causal", torch.tril(torch.ones(
            cfg.max_seq_len, cfg.max_seq_len, dtype=torch.bool)), persistent=False)
        self.cache_len = 0

    def setup_caches(self, max_batch: int, max_seq: int) -> None:
        dtype, device = self.output.weight.dtype if hasattr(self.output, "weight") \
            else self.tok_embeddings.weight.dtype, self.tok_embeddings.weight.device
        for layer in self.layers:
            a = layer.attention
            shape = (max_batch, a.n_kv_heads, max_seq, a.head_dim)
            # buffers, not plain attributes: torch.export then treats the in-place cache
            # writes as buffer mutations (a plain tensor would be a constant it cannot write)
            for name in ("k_cache", "v_cache"):
                layer.attention.register_buffer(
                    name, torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.cache_len = max_seq

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor | None = None):
        s = tokens.shape[1]
        if input_pos is None:
            input_pos = torch.arange(s, device=tokens.device)
        rope = self.rope[input_pos]
        if self.cache_len:
            mask = self.causal[input_pos, : self.cache_len][None, None]
        else:
            mask = self.causal[:s, :s][None, None]
        x = self.tok_embeddings(tokens)
        for layer in self.layers:
            x = layer(x, rope, input_pos, mask)
        return self.output(self.norm(x))
