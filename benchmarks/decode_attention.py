"""Attention of a few new tokens over a static KV cache: a split-K/V Triton kernel.

At decode a layer's attention is a handful of query rows (the query heads of each kv head,
one row each, per new token) against the whole cache. SDPA's kernels give one CTA to each
(batch, kv head) for such rows -- 8 CTAs at batch 1 on a 132-SM H100 -- and read the cache
through those few (cuDNN's kernel for the reference model's rows took 16.2 us a layer,
about 130 us of an 8-layer batch-1 step). Here the keys are split over CTAs as well: each
CTA computes, for its run of keys, the running maximum, the sum of exponentials and the
weighted sum of V of every row (the online softmax of flash attention), and a second kernel
merges the runs' partial results. Keys past the last row's position are not read at all.

``cached_attention(q, k_cache, v_cache, input_pos)`` is the ``qcompile::cached_attention``
op, a ``torch.library.triton_op``: under ``torch.compile`` Inductor calls the two Triton
kernels from its own generated code (so CUDA graphs capture them); eager calls run them
directly; on other devices, or for shapes and dtypes the kernels do not take, it computes
the same attention with SDPA and the causal mask of the positions.

Layout: q ``[B, H, R * S, D]`` holds, for kv head h, the R query heads of that head for
the S new tokens, row ``r * S + i`` being query head ``h * R + r`` at token i;
``k_cache``/``v_cache`` ``[B, H, T, D]``; ``input_pos`` ``[S]`` the tokens' positions,
ascending. Row ``r * S + i`` attends keys ``0 .. input_pos[i]``.
"""

from __future__ import annotations

import functools
import importlib.util

import torch
import torch.nn.functional as F

__all__ = ["cached_attention", "cached_attention_reference", "kernel_takes"]

_BLOCK_N = 64        # keys a loop step
_MAX_ROWS = 64       # query rows a CTA holds (R * S, padded to a power of two >= 16)
_MAX_SPLITS = 64     # runs of keys a (batch, head) is split into


def cached_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               input_pos: torch.Tensor) -> torch.Tensor:
    """The op's meaning: SDPA of every row against keys up to its token's position."""
    rows, s, t = q.shape[2], input_pos.shape[0], k_cache.shape[2]
    keys = torch.arange(t, device=q.device)
    row_pos = input_pos.repeat(rows // s)  # row r * S + i -> input_pos[i]
    mask = keys[None, :] <= row_pos[:, None]
    return F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=mask[None, None])


def kernel_takes(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> bool:
    """Whether the Triton kernels run this call (else the SDPA reference does)."""
    return (_HAS_TRITON and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
            and k_cache.dtype == q.dtype and v_cache.dtype == q.dtype
            and q.shape[2] <= _MAX_ROWS and q.shape[3] in (64, 128)
            and k_cache.shape == v_cache.shape and k_cache.shape[:2] == q.shape[:2]
            and k_cache.shape[3] == q.shape[3]
            and q.stride(3) == 1 and k_cache.stride(3) == 1 and v_cache.stride(3) == 1)


_HAS_TRITON = importlib.util.find_spec("triton") is not None


@functools.cache
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def partial_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, o_ptr, ml_ptr,
                       sq_b, sq_h, sq_r, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t,
                       heads, rows, s, keys_per_split,
                       HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
                       SM_SCALE: tl.constexpr):
        bh = tl.program_id(0)
        split = tl.program_id(1)
        b = bh // heads
        h = bh % heads
        r = tl.arange(0, BLOCK_R)
        d = tl.arange(0, HEAD_DIM)
        r_ok = r < rows
        q = tl.load(q_ptr + b * sq_b + h * sq_h + r[:, None] * sq_r + d[None, :],
                    mask=r_ok[:, None], other=0.0)
        pos = tl.load(pos_ptr + r % s, mask=r_ok, other=-1)
        start = split * keys_per_split
        end = tl.minimum(start + keys_per_split, tl.max(pos, 0) + 1)
        m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_R], tl.float32)
        acc = tl.zeros([BLOCK_R, HEAD_DIM], tl.float32)
        k_base = k_ptr + b * sk_b + h * sk_h
        v_base = v_ptr + b * sv_b + h * sv_h
        for n0 in range(start, end, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            n_ok = n < end
            k = tl.load(k_base + n[:, None] * sk_t + d[None, :], mask=n_ok[:, None], other=0.0)
            v = tl.load(v_base + n[:, None] * sv_t + d[None, :], mask=n_ok[:, None], other=0.0)
            # The scale is a constant of the kernel (an fp32 multiply in every caller). As a
            # float argument, Inductor's generated code passed it as a float64 constant, so
            # torch.compile multiplied in float64 where eager and AOTInductor multiplied in
            # float32: a compiled decode step and its exported artifact then parted by one
            # bf16 ulp in some keys and, at near ties, in their greedy tokens.
            scores = tl.dot(q, tl.trans(k)) * SM_SCALE
            scores = tl.where(n_ok[None, :] & (n[None, :] <= pos[:, None]), scores,
                              float("-inf"))
            m_new = tl.maximum(m_i, tl.max(scores, 1))
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no key yet
            p = tl.exp(scores - m_ref[:, None])
            alpha = tl.exp(m_i - m_ref)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        part = bh * tl.num_programs(1) + split
        tl.store(o_ptr + (part * BLOCK_R + r[:, None]) * HEAD_DIM + d[None, :], acc)
        tl.store(ml_ptr + (part * 2) * BLOCK_R + r, m_i)
        tl.store(ml_ptr + (part * 2 + 1) * BLOCK_R + r, l_i)

    @triton.jit
    def merge_kernel(o_ptr, ml_ptr, out_ptr, so_b, so_h, so_r, heads, splits,
                     HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr, SPLITS: tl.constexpr):
        bh = tl.program_id(0)
        row = tl.program_id(1)
        sp = tl.arange(0, SPLITS)
        d = tl.arange(0, HEAD_DIM)
        sp_ok = sp < splits
        part = bh * splits + sp
        m = tl.load(ml_ptr + (part * 2) * BLOCK_R + row, mask=sp_ok, other=float("-inf"))
        l_ = tl.load(ml_ptr + (part * 2 + 1) * BLOCK_R + row, mask=sp_ok, other=0.0)
        w = tl.where(m == float("-inf"), 0.0, tl.exp(m - tl.max(m, 0)))
        o = tl.load(o_ptr + (part[:, None] * BLOCK_R + row) * HEAD_DIM + d[None, :],
                    mask=sp_ok[:, None], other=0.0)
        y = tl.sum(o * w[:, None], 0) / tl.sum(l_ * w, 0)
        b = bh // heads
        h = bh % heads
        tl.store(out_ptr + b * so_b + h * so_h + row * so_r + d, y.to(out_ptr.dtype.element_ty))

    return partial_kernel, merge_kernel


def _plan(batch_heads: int, keys: int, sms: int) -> tuple[int, int]:
    """(splits, keys a split): about two CTAs an SM, whole loop steps a split."""
    steps = -(-keys // _BLOCK_N)
    want = max(1, -(-2 * sms // batch_heads))
    splits = min(steps, want, _MAX_SPLITS)
    keys_per_split = -(-steps // splits) * _BLOCK_N
    return -(-keys // keys_per_split), keys_per_split


def _run_kernels(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 input_pos: torch.Tensor, sms: int, wrap=lambda kernel: kernel) -> torch.Tensor:
    """Launch the two kernels (``wrap``: ``wrap_triton`` inside the op)."""
    import triton

    partial_kernel, merge_kernel = _kernels()
    b, heads, rows, dim = q.shape
    splits, keys_per_split = _plan(b * heads, k_cache.shape[2], sms)
    block_r = max(16, triton.next_power_of_2(rows))
    o_part = torch.empty((b * heads * splits, block_r, dim), device=q.device, dtype=torch.float32)
    ml_part = torch.empty((b * heads * splits, 2, block_r), device=q.device, dtype=torch.float32)
    out = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    wrap(partial_kernel)[(b * heads, splits)](
        q, k_cache, v_cache, input_pos, o_part, ml_part,
        q.stride(0), q.stride(1), q.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        heads, rows, input_pos.shape[0], keys_per_split,
        HEAD_DIM=dim, BLOCK_R=block_r, BLOCK_N=_BLOCK_N, SM_SCALE=dim ** -0.5, num_warps=4)
    wrap(merge_kernel)[(b * heads, rows)](
        o_part, ml_part, out, out.stride(0), out.stride(1), out.stride(2), heads, splits,
        HEAD_DIM=dim, BLOCK_R=block_r, SPLITS=triton.next_power_of_2(splits), num_warps=4)
    return out


@torch.library.triton_op("qcompile::cached_attention", mutates_args=())
def cached_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     input_pos: torch.Tensor) -> torch.Tensor:
    """Attention of q's rows over the cache up to each row's position (module docstring)."""
    if (q.dim() != 4 or k_cache.dim() != 4 or input_pos.dim() != 1
            or input_pos.is_floating_point() or input_pos.shape[0] == 0
            or q.shape[2] % input_pos.shape[0]
            or len({q.device, k_cache.device, v_cache.device, input_pos.device}) != 1):
        raise ValueError(
            "cached_attention: q [B, H, R * S, D], caches [B, H, T, D] and integer input_pos "
            f"[S] with S dividing q's rows, all on one device; got q {tuple(q.shape)} on "
            f"{q.device}, k_cache {tuple(k_cache.shape)} on {k_cache.device}, input_pos "
            f"{tuple(input_pos.shape)} {input_pos.dtype} on {input_pos.device}")
    if not kernel_takes(q, k_cache, v_cache):
        return cached_attention_reference(q, k_cache, v_cache, input_pos)
    from torch.library import wrap_triton

    sms = torch.cuda.get_device_properties(q.device).multi_processor_count
    return _run_kernels(q, k_cache, v_cache, input_pos, sms, wrap_triton)
