"""CUDA kernels of ``qcompile::lut_gemm``: lookup-table weights (NF4, FP4, any 16-value codebook)
``W[n, k] = table[c[n, k]] * scales[n, k // block]``.

Three paths, chosen by token count at run time:

- up to ``DECODE_MAX_M`` (64) tokens (where the GEMM runs, below :func:`gemm_min_m`), the decode
  kernel's lookup-table build (``csrc/mixed_gemm_decode.cu``, ``QC_MODE`` 3): it streams the
  codes as it streams int4 weights and looks each one up in the CTA's copy of the table in
  shared memory, then runs the same mma.sync main loop (beyond 32 tokens, one CTA row per 32);
- beyond (from :func:`gemm_min_m`), on Hopper, where the op's ``config`` names a GEMM build
  (:func:`gemm_config`: the table compiled into ``csrc/lut_gemm_sm90.cu``), the lookup-table
  GEMM: CUTLASS's mixed-input collective with the lookup as its register conversion (byte
  permutes of the table's bytes), the affine int4 family's tiles and heuristic
  (``mixed_gemm.LUT_CONFIGS``, ``choose_config`` in mode 1);
- otherwise the weight dequantized into the activation type by the decode library
  (``qc_lut_dequantize``) and one cuBLAS GEMM: the 4-bit codes read once, a 16-bit weight
  written and read.

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
import functools
import threading

import torch

from . import mixed_gemm as mg
from . import mixed_gemm_decode as decode
from .mixed_gemm import reorder_weight, sm_count, unreorder_weight
from .ops import around_gemm, as_dtype, as_fused_result, fused_linear

__all__ = ["LAYOUT", "MODE_LUT", "builds", "decode_choice", "fits", "supported", "prepare",
           "run", "reference_prepared", "pair_bytes", "unpair_bytes", "table_bits",
           "gemm_config", "gemm_supported", "gemm_specs", "build_gemm", "gemm_choice",
           "gemm_min_m", "gemm_scales_of", "path_name"]

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


# Token counts up to which ``run`` takes the decode kernel where no GEMM build is named (beyond,
# dequantize + cuBLAS): at 64 tokens two CTAs of 32 reading the codes twice (the second time
# mostly from L2) still beat writing and reading a 16-bit weight (H100, clean flush, NF4 b64:
# 26.2 against 30.7 us at 4096x4096, 87.1 against 111.2 at 14336x4096); at 256 they lose
# 2-2.5x (the rows qcompile[decode] / qcompile[dequant] of results/bench_w4a16.jsonl).
DECODE_MAX_M = 2 * decode.MAX_TOKENS
# The decode kernel's lookup: the table of all 256 value pairs (True; see
# csrc/mixed_gemm_decode.cu: one shared load a fragment register) or the 16-value table (False:
# two loads and their packing), a setting so that one process can compare them. The pairs were
# faster in every cell timed (H100, clean flush, NF4 b64, M = 1 / 16: 13.9 / 14.8 against
# 14.1 / 15.4 us at 4096x4096, 27.2 / 36.1 against 29.7 / 39.4 at 14336x4096; the rows
# qcompile[decode.pairs] of results/bench_w4a16.jsonl).
PAIR_TABLE = True
PATHS = ("decode", "gemm", "dequant")
# Token counts from which a GEMM build (the op's config) takes over from the decode kernel
# (gemm_min_m): past its 32-token tile, where it starts reading the codes again for each 32
# tokens (H100, clean flush, NF4 b64 bf16, results/bench_w4a16.jsonl: at 64 tokens GEMM /
# decode 37.4 / 72.9 us at 14336x4096, 25.4 / 23.6 at 4096x4096); on large weights (more than
# LARGE_WEIGHTS_PER_SM weights an SM) already past its 16-token tile: there the 32-token
# tile costs 1.4-1.7x the 16-token one, more than the GEMM's start-up, and the GEMM wins from
# 20 tokens (results/lut_crossover.jsonl, bf16 and fp16 alike: at 20 tokens GEMM / decode
# 30.9 / 35.1 us at 14336x4096, 33.3 / 44.0 at 4096x14336, 55.1 / 63.2 at 28672x4096; at
# 16, 30.0 / 24.0, 32.0 / 26.0, 52.4 / 41.0). On the smaller Llama weights the decode kernel
# still wins or ties at 32 tokens (4096x4096 18.4 / 19.4; 6144x4096 within 4% either way
# from 20 to 32 tokens).
GEMM_MIN_M = 33
GEMM_WIDE_MIN_M = 17
LARGE_WEIGHTS_PER_SM = 1 << 18  # 34.6 M weights on 132 SMs: 14336x4096 above, 6144x4096 below


def gemm_min_m(n: int, k: int, sm_count: int = 132) -> int:
    """The fewest tokens for which ``run`` takes a named GEMM build over the decode kernel
    for an [N, K] weight: GEMM_WIDE_MIN_M where N x K > LARGE_WEIGHTS_PER_SM x SMs, else
    GEMM_MIN_M."""
    return GEMM_WIDE_MIN_M if n * k > LARGE_WEIGHTS_PER_SM * sm_count else GEMM_MIN_M
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


# --- the Hopper lookup-table GEMM (csrc/lut_gemm_sm90.cu) ----------------------------------
#
# The table is compiled in (16 values in the activation type), so each table has its own
# builds of mixed_gemm.LUT_CONFIGS, and the op's ``config`` carries the table's bit patterns
# (``gemm:<act>:<16 x 4 hex digits>``): the run picks the build without reading the table
# tensor (no host sync in a CUDA graph), and an exported program keeps it.
GEMM_PREFIX = "gemm:"
_gemm_libs: dict[tuple, ctypes.CDLL] = {}
_I64 = ctypes.c_int64


def table_bits(table: torch.Tensor, act_dtype: torch.dtype) -> tuple[int, ...]:
    """The 16 table values rounded to ``act_dtype``, as their 16-bit patterns."""
    t = table.detach().to("cpu", torch.float32).reshape(16).to(act_dtype)
    return tuple(v & 0xFFFF for v in t.view(torch.int16).tolist())


def _config_of(act: str, bits: tuple[int, ...]) -> str:
    return f"{GEMM_PREFIX}{act}:" + "".join(f"{v:04x}" for v in bits)


@functools.lru_cache(maxsize=64)  # run parses the op's config on every call
def _parse_config(config: str) -> tuple[str, tuple[int, ...]] | None:
    """(act, table bits) of a GEMM config, None for "" (no GEMM build); ValueError if garbled."""
    if not config:
        return None
    act, _, digits = config.removeprefix(GEMM_PREFIX).partition(":")
    if (not config.startswith(GEMM_PREFIX) or act not in _ACTS.values() or len(digits) != 64
            or any(ch not in "0123456789abcdef" for ch in digits)):
        raise ValueError(f"lut_gemm config must be '' or '{GEMM_PREFIX}<bf16|fp16>:<64 hex "
                         f"digits>', got {config!r}")
    return act, tuple(int(digits[4 * i:4 * i + 4], 16) for i in range(16))


def _gemm_spec(cfg: mg.MixedGemmConfig, bits: tuple[int, ...]):
    from .build import KernelSpec
    words = {f"QC_LUT_T{w}": f"0x{sum(bits[4 * w + i] << (16 * i) for i in range(4)):016x}ULL"
             for w in range(4)}
    return KernelSpec(mg.LUT_SOURCE, {**cfg.defines(), **words}, "sm_90a")


def _gemm_family(act: str, block: int, k: int) -> tuple[mg.MixedGemmConfig, ...]:
    return mg._family(act, 4, mg.MODE_LUT, block, k)


def _gemm_bits(config: str, act: str, block: int, k: int) -> tuple[int, ...] | None:
    """The table bits of the GEMM build ``config`` names for this activation type, block size
    and K, or None where it names none that takes them (the device is the caller's check)."""
    gemm = _parse_config(config)
    if gemm is None or gemm[0] != act or not _gemm_family(act, block, k):
        return None
    return gemm[1]


def gemm_supported(device: torch.device, n: int, k: int, block: int, act_dtype: torch.dtype
                   ) -> str | None:
    """None when the lookup-table GEMM runs this weight on ``device``, else why not."""
    why = supported(device, n, k, block, act_dtype)
    if why is not None:
        return why
    if torch.cuda.get_device_capability(device) != (9, 0):
        return "the lookup-table GEMM is built for sm_90a (Hopper)"
    if not _gemm_family(_ACTS[act_dtype], block, k):
        return f"blocks of {block}: the GEMM's K tiles are 64 deep"
    return None


def gemm_specs(table: torch.Tensor, act_dtype: torch.dtype) -> list:
    """The libraries (``build.KernelSpec``) of the GEMM for one table and activation type."""
    bits = table_bits(table, act_dtype)
    return [_gemm_spec(c, bits) for c in mg.LUT_CONFIGS if c.act == _ACTS[act_dtype]]


def build_gemm(table: torch.Tensor, act_dtype: torch.dtype) -> None:
    """Compile (in parallel, with progress) the GEMM builds for one table and activation
    type that are not yet in the kernel cache."""
    from .build import build_many
    build_many(gemm_specs(table, act_dtype))


def gemm_config(table: torch.Tensor, act_dtype: torch.dtype) -> str:
    """The op's ``config`` for this table under ``act_dtype`` activations, its GEMM builds
    compiled (or found in the cache) now, at compile time; raises KernelBuildError where they
    cannot be."""
    build_gemm(table, act_dtype)
    return _config_of(_ACTS[act_dtype], table_bits(table, act_dtype))


def _gemm_lib(cfg: mg.MixedGemmConfig, bits: tuple[int, ...]) -> ctypes.CDLL:
    lib = _gemm_libs.get((cfg, bits))
    if lib is not None:
        return lib
    from .build import load_checked
    with _lock:
        lib = load_checked(_gemm_spec(cfg, bits), {
            "qc_lut_gemm_sm90": (_I, [_P] * 5 + [_I] * 6 + [_P, _I64, _P]),
            "qc_lut_gemm_sm90_workspace_size": (_I64, [_I] * 6),
        }, info=("qc_lut_gemm_sm90_info", cfg.info()[:-1] + list(bits) + [1]))
        _gemm_libs[(cfg, bits)] = lib
        return lib


def gemm_choice(m: int, n: int, k: int, act: str, block: int, sm_count: int = 132
                ) -> mg.Choice:
    """The GEMM build and work split for m tokens: the affine int4 heuristic on LUT_CONFIGS."""
    return mg.choose_config(m, n, k, act, 4, mg.MODE_LUT, sm_count, block)


def path_name(m: int, n: int, k: int, act_dtype: torch.dtype, block: int, config: str = "",
              sm_count: int = 132) -> str:
    """What ``run`` takes for m tokens by default (on an sm_90 device, for the benchmarks'
    rows): ``decode <shape>``, ``gemm <choice>`` or ``dequantize + cublas``."""
    act = _ACTS[act_dtype]
    runs_gemm = _gemm_bits(config, act, block, k) is not None
    if m <= DECODE_MAX_M and not (runs_gemm and m >= gemm_min_m(n, k, sm_count)):
        choice = decode_choice(m, n, k, sm_count, act_bytes=2)
        return f"decode {choice.name if choice else '(none)'}"
    if runs_gemm:
        return f"gemm {mg.choice_name(gemm_choice(m, n, k, act, block, sm_count))}"
    return "dequantize + cublas"


def gemm_scales_of(scales: torch.Tensor, act_dtype: torch.dtype) -> torch.Tensor:
    """The GEMM's scale operand for the ``sm90_lut_pairs`` block scales (float32 [K / block,
    N]): the same scales in the activation type, which the GEMM's main loop multiplies in.
    Made once (``kernels.prepare_lut_gemm``) and passed as the op's ``gemm_scales``, it spares
    each prefill call a conversion kernel (4.9 us at 4096x4096, 6.4 at 14336x4096 on the H100,
    results/lut_scale_conversion.jsonl); it costs 2 bytes a block (1/32 byte a weight at
    blocks of 64) beside the float32 scales that the decode kernel reads."""
    if act_dtype not in _ACTS:
        raise ValueError(f"the lookup-table GEMM runs bf16 and fp16 activations, not {act_dtype}")
    return scales.to(act_dtype).contiguous()


def _run_gemm(x2: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
              bias: torch.Tensor | None, block: int, bits: tuple[int, ...],
              choice: mg.Choice | None = None, act_scales: torch.Tensor | None = None
              ) -> torch.Tensor:
    """out [M, N] = x2 [M, K] @ W.T (+ bias) by the GEMM built for ``bits``; ``act_scales``:
    ``scales`` already in x2's type (:func:`gemm_scales_of`), else they are converted here."""
    m, k = x2.shape
    n = qweight.shape[0]
    act = _ACTS[x2.dtype]
    dev = x2.device.index if x2.device.index is not None else torch.cuda.current_device()
    if choice is None:
        choice = gemm_choice(m, n, k, act, block, sm_count(dev))
    lib = _gemm_lib(choice.config, bits)
    qweight = mg.aligned(qweight)  # TMA's 16-byte alignment (no copy when it is)
    bias = mg.aligned(bias.to(x2.dtype)) if bias is not None else None
    # the kernel scales in the activation type (the main loop's multiply); the op keeps
    # float32 scales for the decode kernel, and the activation type's copy where the rewrite
    # made one; without it, one small conversion kernel a call (N x K / block values)
    s = (act_scales.contiguous() if act_scales is not None and act_scales.dtype == x2.dtype
         else gemm_scales_of(scales, x2.dtype))
    out = torch.empty(m, n, device=x2.device, dtype=x2.dtype)
    with torch.cuda.device(dev):
        ws_bytes = _gemm_workspace(choice, bits, m, n, k, block, dev)
        ws = torch.empty(max(ws_bytes, 16), dtype=torch.uint8, device=x2.device)
        rc = lib.qc_lut_gemm_sm90(x2.data_ptr(), qweight.data_ptr(), s.data_ptr(), _ptr(bias),
                                  out.data_ptr(), m, n, k, block, choice.decomposition,
                                  choice.splits, ws.data_ptr(), ws_bytes,
                                  torch.cuda.current_stream(x2.device).cuda_stream)
    if rc != 0:
        raise RuntimeError(f"qc_lut_gemm_sm90 ({mg.choice_name(choice)}, M={m} N={n} K={k} "
                           f"block {block}) failed with CUDA error {rc}")
    return out


@functools.lru_cache(maxsize=4096)
def _gemm_workspace(choice: mg.Choice, bits: tuple[int, ...], m: int, n: int, k: int,
                    block: int, device: int) -> int:
    del device  # part of the key: the workspace depends on the device's SM count
    nbytes = int(_gemm_lib(choice.config, bits).qc_lut_gemm_sm90_workspace_size(
        m, n, k, block, choice.decomposition, choice.splits))
    if nbytes < 0:
        raise RuntimeError("qc_lut_gemm_sm90_workspace_size failed (no CUDA device?)")
    return nbytes


def run(x: torch.Tensor, qweight: torch.Tensor, table: torch.Tensor, scales: torch.Tensor,
        bias: torch.Tensor | None, block: int, dequant_dtype: str | torch.dtype,
        path: str | None = None, gated: bool = False, norm: torch.Tensor | None = None,
        eps: float = 0.0, residual: torch.Tensor | None = None,
        norm_ssq: torch.Tensor | None = None, next_norm: torch.Tensor | None = None,
        config: str = "", gemm_scales: torch.Tensor | None = None):
    """``lut_gemm`` on CUDA for the ``sm90_lut_pairs`` operands; the reference where the kernels do
    not take the call (a non-contiguous or misaligned x, an activation type without a build).
    ``path`` forces "decode" (any token count: CTAs of 32 tokens), "gemm" (``config`` must name
    a GEMM build) or "dequant"; by default the decode kernel up to DECODE_MAX_M tokens, beyond
    it (from :func:`gemm_min_m`) the GEMM where ``config`` names one for x's type (:func:`gemm_config`)
    on an sm_90 device, else dequant. No host syncs (CUDA-graph safe). ``gemm_scales``:
    ``scales`` in the activation type (:func:`gemm_scales_of`), read by the GEMM where x is of
    that type (otherwise it converts ``scales`` itself).

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
        return around_gemm(lambda xn: as_fused_result(
            run(xn, qweight, table, scales, bias, block, dequant_dtype, path, config=config,
                gemm_scales=gemm_scales), gated, None), xi, norm, eps, residual, norm_ssq, next_norm)

    if gated and (n % 32 or residual is not None or next_norm is not None):
        raise ValueError("gated: N must be a multiple of 32, without residual or next_norm")
    if gemm_scales is not None and (gemm_scales.shape != scales.shape
                                    or gemm_scales.device != scales.device):
        raise ValueError(f"lut_gemm: gemm_scales must have the scales' shape {tuple(scales.shape)} "
                         f"and device ({scales.device}), got {tuple(gemm_scales.shape)} on "
                         f"{gemm_scales.device}")
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
    bits = _gemm_bits(config, act, block, k)
    sms = sm_count(x.device.index)
    # the device's capability is asked only where the GEMM would take the call, not on decode steps
    wants_gemm = bits is not None and (path == "gemm" or (path is None and m >= gemm_min_m(n, k, sms)))
    runs_gemm = wants_gemm and torch.cuda.get_device_capability(x.device) == (9, 0)
    if path == "gemm" and not runs_gemm:
        raise ValueError(f"lut_gemm path 'gemm': config {config!r} names no GEMM build for "
                         f"{x.dtype} on this device (gemm_config; sm_90, blocks of 64 x 2^i)")
    if path == "decode" or (path is None and m <= DECODE_MAX_M and not runs_gemm):
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
    if runs_gemm:
        out = _run_gemm(x2, qweight, scales, bias, block, bits, act_scales=gemm_scales)
        return out.reshape(*x.shape[:-1], n)
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
