"""CUDA kernels of ``qcompile::lut_gemm``: lookup-table weights (NF4, FP4, any 16-value codebook)
``W[n, k] = table[c[n, k]] * scales[n, k // block]``.

Two paths, chosen by token count at run time:

- up to ``DECODE_MAX_M`` (64) tokens, the decode kernel's lookup-table build
  (``csrc/mixed_gemm_decode.cu``, ``QC_MODE`` 3): it streams the codes as it streams int4
  weights and looks each one up in the CTA's copy of the table in shared memory, then runs
  the same mma.sync main loop (beyond 32 tokens, one CTA row per 32);
- beyond, the weight dequantized into the activation type by the same library
  (``qc_lut_dequantize``) and one cuBLAS GEMM. Prefill reads the 4-bit codes once and writes
  and reads a 16-bit weight: cheaper than the GEMM from a few hundred tokens, a real cost
  below (the kernels-vs-peers page says how much).

Layout ``sm90_lut_pairs``: the codes c - 8 as the sm90 mixed GEMM's signed int4 weight
(``mixed_gemm.reorder_weight``) with the nibbles of each 32-bit word regrouped so that byte i
holds the two codes of MMA fragment register i (nibbles i and i + 4 of the int4 word: two
consecutive K of one row), low nibble first; the block scales float32 [K / block, N], the
table float32 [16]. A byte is then an index into the kernel's table of value pairs as it is.
It runs on compute capability 8.0 and later (mma.sync); the reference layout "nk" runs
everywhere else.
"""

from __future__ import annotations

import ctypes
import threading

import torch

from . import mixed_gemm_decode as decode
from .mixed_gemm import reorder_weight, sm_count, unreorder_weight
from .ops import around_gemm, as_dtype, as_fused_result, fused_linear

__all__ = ["LAYOUT", "MODE_LUT", "builds", "decode_choice", "fits", "supported", "prepare",
           "run", "reference_prepared", "pair_bytes", "unpair_bytes"]

LAYOUT = "sm90_lut_pairs"  # kernels.LUT_LAYOUT
MODE_LUT = 3
_ACTS = {torch.bfloat16: "bf16", torch.float16: "fp16"}

_libs: dict[str, ctypes.CDLL] = {}
_lock = threading.Lock()
_P, _I = ctypes.c_void_p, ctypes.c_int


def builds() -> tuple[decode.DecodeBuild, ...]:
    """The libraries (one per activation type) that ``qcompile build`` prebuilds."""
    return tuple(decode.DecodeBuild(act, 4, decode.LAYOUT_SM90, MODE_LUT) for act in ("bf16", "fp16"))


def fits(n: int, k: int, block: int) -> bool:
    """Whether the kernels take an [N, K] weight in blocks of ``block`` along K: K in chunks
    of 64, N in 16-row tiles, blocks of 64 times a power of two dividing K."""
    per = block // decode.TILE_K
    return (n > 0 and k > 0 and n % 16 == 0 and k % decode.TILE_K == 0 and block > 0
            and block % decode.TILE_K == 0 and k % block == 0 and per & (per - 1) == 0
            and n * k < 2**32)


def supported(device: torch.device, n: int, k: int, block: int, act_dtype: torch.dtype
              ) -> str | None:
    """None when the kernels run this weight on ``device``, else why not."""
    if device.type != "cuda":
        return "not a CUDA device"
    if torch.cuda.get_device_capability(device) < (8, 0):
        return "the lookup-table kernels need compute capability 8.0 or later"
    if act_dtype not in _ACTS:
        return f"activations in {act_dtype} (bf16 and fp16 run)"
    if not fits(n, k, block):
        return (f"N={n} K={k} block {block}: the kernels take N % 16 == 0, K % 64 == 0 and "
                "blocks of 64 x 2^i along K")
    return None


def _lib(act: str) -> ctypes.CDLL:
    lib = _libs.get(act)
    if lib is not None:
        return lib
    from .build import load_checked
    b = decode.DecodeBuild(act, 4, decode.LAYOUT_SM90, MODE_LUT)
    with _lock:
        lib = load_checked(decode.kernel_spec(b), {
            "qc_lut_gemm_decode": (_I, [_P] * 12 + [_I] * 10 + [ctypes.c_float, _P]),
            "qc_lut_dequantize": (_I, [_P] * 4 + [_I] * 4 + [_P]),
        }, info=("qc_mixed_gemm_decode_info", b.info()))
        _libs[act] = lib
        return lib


def load(act_dtype: torch.dtype) -> None:
    """Build (or find cached) and load the library for ``act_dtype`` now (compile time), so a
    missing toolchain shows before the weight is laid out for it."""
    _lib(_ACTS[act_dtype])


def pair_bytes(qweight: torch.Tensor) -> torch.Tensor:
    """An sm90 int4 weight (uint8, nibble j of each 32-bit word at byte j // 2) -> the same
    bytes with each word's nibbles regrouped: byte i = nibble i | nibble i + 4 << 4."""
    b = qweight.reshape(-1, 4).to(torch.int16)
    nib = torch.stack((b & 0xF, b >> 4), dim=-1).reshape(-1, 8)  # nibble j of each word
    return (nib[:, :4] | (nib[:, 4:] << 4)).to(torch.uint8).reshape(qweight.shape)


def unpair_bytes(qweight: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pair_bytes`."""
    b = qweight.reshape(-1, 4).to(torch.int16)
    nib = torch.cat((b & 0xF, b >> 4), dim=-1)  # nibble j of each word, j = 0..7
    return (nib[:, 0::2] | (nib[:, 1::2] << 4)).to(torch.uint8).reshape(qweight.shape)


def prepare(codes: torch.Tensor, table: torch.Tensor, scales: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes [N, K] in [0, 16), table [16], scales [N, K / block]) -> the ``sm90_lut_pairs``
    operands (codes, table, scales) in the op's argument order."""
    c = codes.to(torch.int16)
    if int(c.min()) < 0 or int(c.max()) > 15:
        raise ValueError("lookup-table codes must be in [0, 16)")
    qweight = pair_bytes(reorder_weight((c - 8).to(torch.int8), 4))
    return (qweight, table.to(torch.float32).reshape(16).contiguous(),
            scales.to(torch.float32).t().contiguous())


def _unprepare(qweight: torch.Tensor, scales: torch.Tensor, k: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """The codes [N, K] (int64) and scales [N, K / block] of the ``sm90_lut_pairs``
    operands."""
    return (unreorder_weight(unpair_bytes(qweight), 4, k).to(torch.int64) + 8), scales.t()


def reference_prepared(x: torch.Tensor, qweight: torch.Tensor, table: torch.Tensor,
                       scales: torch.Tensor, bias: torch.Tensor | None, block: int,
                       dequant_dtype: str | torch.dtype, **fused) -> torch.Tensor:
    """Plain-PyTorch ``lut_gemm`` on the ``sm90_lut_pairs`` operands (any device): the weight the
    graph computed, then ``linear``; ``fused``: ``norm_weight``, ``norm_eps``, ``residual``,
    ``norm_ssq`` as the op takes them (``ops.fused_linear``)."""
    codes, s = _unprepare(qweight, scales, x.shape[-1])
    dd = as_dtype(dequant_dtype)
    n, k = codes.shape
    w = table.to(dd)[codes].reshape(n, k // block, block) * s.to(dd).reshape(n, -1, 1)
    return fused_linear(x, w.reshape(n, k), bias, **fused)


# Token counts up to which ``run`` takes the decode kernel (beyond, dequantize + cuBLAS): at 64
# tokens two CTAs of 32 reading the codes twice (the second time mostly from L2) still beat
# writing and reading a 16-bit weight (H100, clean flush, NF4 b64: 26.2 against 30.7 us at
# 4096x4096, 87.1 against 111.2 at 14336x4096); at 256 they lose 2-2.5x (the rows
# qcompile[decode] / qcompile[dequant] of results/bench_w4a16.jsonl).
DECODE_MAX_M = 2 * decode.MAX_TOKENS
# The decode kernel's lookup: the table of all 256 value pairs (True; see
# csrc/mixed_gemm_decode.cu: one shared load a fragment register) or the 16-value table (False:
# two loads and their packing), a setting so that one process can compare them. The pairs were
# faster in every cell timed (H100, clean flush, NF4 b64, M = 1 / 16: 13.9 / 14.8 against
# 14.1 / 15.4 us at 4096x4096, 27.2 / 36.1 against 29.7 / 39.4 at 14336x4096; the rows
# qcompile[decode.pairs] of results/bench_w4a16.jsonl).
PAIR_TABLE = True
PATHS = ("decode", "dequant")
# 32-token launches take 4-warp CTAs where their 32-row CTAs make at least this many waves.
LUT_W4_WAVES = 3


def decode_choice(m: int, n: int, k: int, sm_count: int = 132, gated: bool = False,
                  act_bytes: int = 2, staged: bool = False, given: bool = False,
                  norm_out: bool = False) -> decode.DecodeChoice | None:
    """The decode kernel's launch shape for m lookup-table tokens (beyond 32, CTAs of 32 over
    the grid's y): the affine weights' rule (``mixed_gemm_decode.heuristic``, without staged
    scales: the table takes that place) but where the lookups made other shapes faster (H100,
    clean flush, NF4 b64, ``bench_decode_shapes.py``, results/decode_shapes.jsonl):

    - 16 tokens on wide layers (N / 64 >= SMs): 64-row CTAs of 8 warps, which read the
      activations half as often as 32-row ones (14336x4096: 27.7 against 34.9 us; at
      4096x4096 32-row CTAs stay best, 14.1 us);
    - 32-token tiles whose 32-row CTAs make LUT_W4_WAVES waves: 4 warps a CTA (14336x4096:
      40.1 against 43.5 us at M = 32, 72.8 against 78.7 at M = 64).

    ``gated``: 32-row CTAs (a CTA holds a gate tile and its up tile). ``staged`` / ``given`` /
    ``norm_out`` (as ``DecodeChoice.takes``, activations of ``act_bytes``): the fusions the
    launch's shared memory must hold; where the rule's shape does not, the affine rule's, and
    None where neither does."""
    affine = decode.heuristic(min(m, decode.MAX_TOKENS), n, k, sm_count)
    rule = affine
    if affine.tokens == 16 and n % 64 == 0 and n // 64 >= sm_count:
        rule = decode.DecodeChoice(16, 64, 8)
    elif affine.tokens == 32 and affine.rows == 32 and n // 32 >= LUT_W4_WAVES * sm_count:
        rule = decode.DecodeChoice(32, 32, 4)
    for choice in (rule, affine):
        if gated and choice.rows != 32:
            choice = decode.DecodeChoice(choice.tokens, 32, min(choice.warps, 8))
        if choice.takes(m, k, act_bytes, staged=staged, given=given, norm_out=norm_out):
            return choice
    return None


def run(x: torch.Tensor, qweight: torch.Tensor, table: torch.Tensor, scales: torch.Tensor,
        bias: torch.Tensor | None, block: int, dequant_dtype: str | torch.dtype,
        path: str | None = None, gated: bool = False, norm: torch.Tensor | None = None,
        eps: float = 0.0, residual: torch.Tensor | None = None,
        norm_ssq: torch.Tensor | None = None, next_norm: torch.Tensor | None = None):
    """``lut_gemm`` on CUDA for the ``sm90_lut_pairs`` operands; the reference where the kernels do
    not take the call (a non-contiguous or misaligned x, an activation type without a build).
    ``path`` forces "decode" (any token count: CTAs of 32 tokens) or "dequant"; by default the
    decode kernel up to DECODE_MAX_M tokens. No host syncs (CUDA-graph safe).

    The decode kernel's fusions, as ``mixed_gemm_decode.run`` takes them: ``gated`` (the codes'
    16-row tiles alternate gate and up rows; the result is [.., N/2] = silu(gate) * up),
    ``norm`` / ``eps`` (x is an RMSNorm's input) or ``norm_ssq`` (x is already that input times
    the norm weight, norm_ssq its partial sums of squares), ``residual`` (added to the result),
    ``next_norm`` (returns (out, out * next_norm, ``ops.norm_sums(out)``)). Where the decode
    kernel does not run the call (more tokens, a launch without the shared memory they need)
    they run as PyTorch ops around the plain GEMM, each rounded to the activation type as a
    separate kernel would (``ops.around_gemm``)."""
    if path is not None and path not in PATHS:
        raise ValueError(f"path must be one of {PATHS} or None, got {path!r}")
    k = x.shape[-1]
    n = qweight.shape[0]
    fused = {"norm_weight": norm, "norm_eps": eps, "residual": residual, "norm_ssq": norm_ssq}

    def around(xi: torch.Tensor):  # the fusions as PyTorch ops around the plain op
        return around_gemm(lambda xn: as_fused_result(run(xn, qweight, table, scales, bias, block,
                                                  dequant_dtype, path), gated, None),
                           xi, norm, eps, residual, norm_ssq, next_norm)

    if gated and (n % 32 or residual is not None or next_norm is not None):
        raise ValueError("gated: N must be a multiple of 32, without residual or next_norm")
    act = _ACTS.get(x.dtype)
    if (act is None or not x.is_cuda or not fits(n, k, block) or x.numel() == 0
            or scales.shape != (k // block, n) or scales.dtype != torch.float32
            or table.shape != (16,) or table.dtype != torch.float32):
        return as_fused_result(reference_prepared(x, qweight, table, scales, bias, block,
                                          dequant_dtype, **fused), gated, next_norm)
    x2 = x.reshape(-1, k)
    if not x2.is_contiguous() or x2.data_ptr() % 16:
        x2 = x2.contiguous()
    m = x2.shape[0]
    if bias is not None:
        bias = bias.to(x.dtype).contiguous()
    stream = torch.cuda.current_stream(x.device).cuda_stream
    lib = _lib(act)
    if path == "decode" or (path is None and m <= DECODE_MAX_M):
        sms = sm_count(x.device.index)
        choice = decode_choice(m, n, k, sms, gated, x2.element_size(), staged=norm is not None,
                               given=norm_ssq is not None, norm_out=next_norm is not None)
        if choice is None:  # no launch with the shared memory the fusions need
            return around(x)
        out = torch.empty(m, n // 2 if gated else n, device=x.device, dtype=x.dtype)
        norm, residual, norm_ssq, next_norm, normed, ssq_out = decode.stage_fusions(
            x2, out, norm, residual, norm_ssq, next_norm)
        rc = lib.qc_lut_gemm_decode(
            x2.data_ptr(), qweight.data_ptr(), scales.data_ptr(), table.data_ptr(),
            _ptr(bias), out.data_ptr(), _ptr(norm), _ptr(residual), _ptr(norm_ssq),
            _ptr(next_norm), _ptr(normed), _ptr(ssq_out), m, n, k, block, choice.tokens // 8,
            choice.rows // 16, choice.warps, int(PAIR_TABLE), int(gated), k // 16, float(eps),
            stream)
        if rc != 0:
            raise RuntimeError(f"qc_lut_gemm_decode ({choice.name}, M={m} N={n} K={k} block "
                               f"{block}) failed with CUDA error {rc}")
        lead = x.shape[:-1]
        if next_norm is not None:
            return (out.reshape(*lead, n), normed.reshape(*lead, n),
                    ssq_out.reshape(*lead, n // 16))
        return out.reshape(*lead, out.shape[1])
    if gated or any(v is not None for v in (norm, residual, norm_ssq, next_norm)):
        return around(x)
    w = torch.empty(n, k, device=x.device, dtype=x.dtype)
    in_act = int(as_dtype(dequant_dtype) == x.dtype)
    rc = lib.qc_lut_dequantize(qweight.data_ptr(), scales.data_ptr(), table.data_ptr(),
                               w.data_ptr(), n, k, block, in_act, stream)
    if rc != 0:
        raise RuntimeError(f"qc_lut_dequantize (M={m} N={n} K={k} block {block}) failed with "
                           f"CUDA error {rc}")
    return torch.nn.functional.linear(x2, w, bias).reshape(*x.shape[:-1], n)


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()
