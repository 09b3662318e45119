"""The decode kernel of ``qcompile::mixed_gemm`` (``csrc/mixed_gemm_decode.cu``): few tokens
(M <= 32) against an int4/int8 weight, reading the weight straight from global memory into
mma.sync fragments, many K chunks in flight per warp, with no shared-memory pipeline (the
source's header says why the GEMM main loops are latency-bound there).

It is not a family of its own: it reads the weights the Hopper family (``mixed_gemm``, both
layouts) and the sm_80 family (``mixed_gemm_sm80``, the v2 group-wise layout) already
prepared, so each family offers its choices (``decode.t8.r16.w8`` ...) beside its GEMM
configs, and one weight can run the decode kernel at small M and the GEMM beyond, chosen by
token count at run time.

Builds (data): one library per (activation, bits, layout kind, scale mode); a choice is a
launch shape of a build (tokens per CTA, rows per CTA, warps per CTA).
"""

from __future__ import annotations

import ctypes
import threading
from dataclasses import dataclass

import torch

__all__ = [
    "MAX_TOKENS",
    "PREFIX",
    "SZ_SMEM_MIN_WAVES",
    "SZ_SMEM_W4_WAVES",
    "DecodeBuild",
    "DecodeChoice",
    "builds",
    "candidates",
    "choice_from_name",
    "heuristic",
    "fits",
    "is_name",
    "kernel_spec",
    "run",
    "stage_fusions",
]

SOURCE = "mixed_gemm_decode.cu"
ARCH = "sm_80"      # mma.sync code; with the sm_90 machine code built from the same PTX
PREFIX = "decode."
MAX_TOKENS = 32     # beyond this the GEMM kernels win (more tokens per converted fragment)
TILE_K = 64         # K chunk; group sizes must be multiples of it
LAYOUT_SM90, LAYOUT_SM80_V2 = 0, 1
MODE_ROWSCALE, MODE_GROUPZERO = 0, 2
_TOKEN_TILES = (8, 16, 32)
_ROW_TILES = (16, 32, 64)  # 64 rows with up to 16 tokens (the kernels' registers)
_WARPS = (4, 8, 16)
_SMEM_LIMIT = 48 * 1024
# The heuristic stages group scales and zeros in shared memory (``DecodeChoice.sz_smem``)
# where the CTAs make at least this many waves over the SMs, with 4-warp CTAs from
# SZ_SMEM_W4_WAVES waves, else 8 (see heuristic).
SZ_SMEM_MIN_WAVES = 3
SZ_SMEM_W4_WAVES = 6


@dataclass(frozen=True)
class DecodeBuild:
    """One library: activation type, weight bits, layout kind (0 sm90, 1 sm80 v2), scale
    mode (0 rowscale in the epilogue, 2 group scale + zero before the MMA)."""

    act: str
    bits: int
    layout: int
    mode: int

    def defines(self) -> dict[str, int]:
        return {"QC_ACT_FP16": int(self.act == "fp16"), "QC_WBITS": self.bits,
                "QC_LAYOUT": self.layout, "QC_MODE": self.mode}

    def info(self) -> list[int]:
        d = self.defines()
        return [d["QC_ACT_FP16"], d["QC_WBITS"], d["QC_LAYOUT"], d["QC_MODE"]]


def builds(layout: int) -> tuple[DecodeBuild, ...]:
    """Every library a layout kind needs (``qcompile build`` prebuilds them)."""
    modes = (MODE_ROWSCALE, MODE_GROUPZERO) if layout == LAYOUT_SM90 else (MODE_GROUPZERO,)
    return tuple(DecodeBuild(act, bits, layout, mode)
                 for act in ("bf16", "fp16") for bits in (4, 8) for mode in modes)


@dataclass(frozen=True)
class DecodeChoice:
    """A launch shape: tokens per CTA (8/16/32), weight rows per CTA (16/32; 64 with at most
    16 tokens), warps per CTA (they split K); ``sz_smem``: each CTA stages its group scales and zeros in shared memory
    first (group-wise weights only; name suffix ``.sz``)."""

    tokens: int = 8
    rows: int = 16
    warps: int = 8
    sz_smem: bool = False

    @property
    def name(self) -> str:
        return f"{PREFIX}t{self.tokens}.r{self.rows}.w{self.warps}" + (".sz" if self.sz_smem else "")

    def smem_bytes(self, k: int = 0, group: int = 0) -> int:
        """The reduction's tiles, or the staged scales and zeros of K in groups of ``group``
        where they take more (they share the region)."""
        reduce = self.warps * (self.rows // 16) * (self.tokens // 8) * 4 * 32 * 4
        staged = (k // group) * (self.rows // 16) * 64 if self.sz_smem and group else 0
        return max(reduce, staged)

    def takes(self, m: int, k: int, act_bytes: int = 2, staged: bool = False,
              given: bool = False, norm_out: bool = False, group: int = 0) -> bool:
        """Whether a launch for m tokens of K (group-wise weights: in groups of ``group``) fits
        shared memory with, past the reduction's tiles: the sums of squares of an RMSNorm
        (``staged`` or ``given``), x * norm of the CTA's tokens (``staged``: at K = 4096, 4
        tokens with the heuristic's 8-warp CTAs), the squares of the CTA's results
        (``norm_out``, after the sums' region)."""
        if norm_out and (staged or given):
            return False  # the kernel that writes the next norm's input reads none
        extra = self.warps * self.tokens * 4 if (staged or given or norm_out) else 0
        extra += min(self.tokens, m) * k * act_bytes if staged else 0
        extra += self.rows * self.tokens * 4 if norm_out else 0
        return self.smem_bytes(k, group) + extra <= _SMEM_LIMIT

    def takes_norm(self, m: int, k: int, act_bytes: int = 2) -> bool:
        """Whether a launch with a staged RMSNorm (``norm``) for m tokens of K fits."""
        return self.takes(m, k, act_bytes, staged=True)

    def valid(self) -> bool:
        return (self.tokens in _TOKEN_TILES and self.rows in _ROW_TILES
                and (self.rows < 64 or self.tokens <= 16)
                and 1 <= self.warps <= 16 and self.smem_bytes() <= _SMEM_LIMIT)


def is_name(name: str) -> bool:
    return name.startswith(PREFIX)


def choice_from_name(name: str) -> DecodeChoice:
    """Inverse of ``DecodeChoice.name``; ValueError for anything else."""
    parts = name[len(PREFIX):].split(".") if is_name(name) else []
    sz_smem = len(parts) == 4 and parts[3] == "sz"
    try:
        if len(parts) != 3 + sz_smem or [p[0] for p in parts[:3]] != ["t", "r", "w"]:
            raise ValueError
        choice = DecodeChoice(int(parts[0][1:]), int(parts[1][1:]), int(parts[2][1:]), sz_smem)
    except ValueError:
        raise ValueError(f"no decode-kernel choice named {name!r}") from None
    if not choice.valid():
        raise ValueError(f"no decode-kernel choice named {name!r}")
    return choice


def fits(m: int, n: int, k: int, group: int, mode: int, choice: DecodeChoice | None = None) -> bool:
    """Whether the decode kernel takes this problem (and launch shape)."""
    if m < 1 or m > MAX_TOKENS or k % TILE_K or n % 16 or n * k >= 2**32:
        return False
    per_group = group // TILE_K  # chunks a group: a power of two (the kernel shifts by it)
    if mode == MODE_GROUPZERO and (group % TILE_K or k % group or per_group & (per_group - 1)):
        return False
    if choice is not None and choice.sz_smem and (
            mode != MODE_GROUPZERO or choice.smem_bytes(k, group) > _SMEM_LIMIT):
        return False
    return choice is None or (choice.valid() and n % choice.rows == 0)


def heuristic(m: int, n: int, k: int, sm_count: int = 132, group: int = 0) -> DecodeChoice:
    """The launch shape without measurements: the smallest token tile holding m, 32-row CTAs
    where N is large, 16 warps a CTA while the CTAs fit one to an SM, else 8. For group-wise
    weights (``group``: their group size; 0 for none) up to 8 tokens, where the CTAs make at
    least SZ_SMEM_MIN_WAVES waves: the scales and zeros staged in shared memory, 4-warp CTAs
    from SZ_SMEM_W4_WAVES waves, else 8.

    Why these warp counts: with more CTAs than SMs, 16-warp CTAs run one to an SM
    (registers) and leave a tail wave; 4-warp CTAs each stream too little of K to hide the
    latency. The rule was the fastest shape, or close to it, for every GEMM of a decode step
    timed in sequence, int4 and int8 alike (docs/design.md, heuristic).

    Why staged scales only from several waves: staging costs a barrier at the start of each
    CTA, hidden only where other CTAs stream meanwhile; with about one CTA an SM it was
    slower than loading scales and zeros in the main loop, with many waves faster, and from
    SZ_SMEM_W4_WAVES waves fastest with 4-warp CTAs (docs/design.md). Taken only where its
    region is no larger than the 8-warp reduction's, so the shared memory left for a fused
    norm is never less."""
    tokens = next(t for t in _TOKEN_TILES if t >= min(m, MAX_TOKENS))
    # 32-row CTAs only where that still gives each of 132 SMs about one (N >= 4096): for
    # N = 1024 (k/v projections) 16-row CTAs double the CTAs, and SMs, reading the weight
    rows = 32 if n % 32 == 0 and n // 32 >= 128 else 16
    if group and tokens == 8 and n // rows >= SZ_SMEM_MIN_WAVES * sm_count:
        warps = 4 if n // rows >= SZ_SMEM_W4_WAVES * sm_count else 8
        staged = DecodeChoice(tokens, rows, warps, sz_smem=True)
        if staged.smem_bytes(k, group) <= DecodeChoice(tokens, rows, 8).smem_bytes():
            return staged
    warps = 16 if n // rows <= sm_count else 8
    while not DecodeChoice(tokens, rows, warps).valid():
        warps //= 2
    return DecodeChoice(tokens, rows, warps)


def candidates(m: int, n: int, k: int, sm_count: int = 132, group: int = 0) -> list[str]:
    """Launch shapes worth timing for m tokens: the heuristic's first, then the token tile
    holding m with every row tile and warp count (for group-wise weights, ``group`` their
    group size, and 8-token tiles each with and without the staged scales: with 16 tokens
    they were slower everywhere measured)."""
    if m > MAX_TOKENS:
        return []
    first = heuristic(m, n, k, sm_count, group)
    names = [first.name]
    mode = MODE_GROUPZERO if group else MODE_ROWSCALE
    for rows in _ROW_TILES:
        for warps in _WARPS:
            for sz_smem in (False, True) if group and first.tokens == 8 else (False,):
                c = DecodeChoice(first.tokens, rows, warps, sz_smem)
                if fits(m, n, k, group or k, mode, c):
                    names.append(c.name)
    return list(dict.fromkeys(names))


# --- the call -------------------------------------------------------------------------------

_libs: dict[DecodeBuild, ctypes.CDLL] = {}
_lock = threading.Lock()
_P, _I = ctypes.c_void_p, ctypes.c_int


def kernel_spec(b: DecodeBuild):
    """What the build cache compiles for one library (``qcompile build`` too)."""
    from .build import KernelSpec
    return KernelSpec(SOURCE, b.defines(), ARCH)


def _lib(b: DecodeBuild) -> ctypes.CDLL:
    lib = _libs.get(b)
    if lib is not None:
        return lib
    from .build import load_checked
    with _lock:
        lib = load_checked(kernel_spec(b), {
            "qc_mixed_gemm_decode": (_I, [_P] * 13 + [_I] * 10 + [ctypes.c_float, _P]),
        }, info=("qc_mixed_gemm_decode_info", b.info()))
        _libs[b] = lib
        return lib


def _ptr(t: torch.Tensor | None) -> int | None:
    return t.data_ptr() if t is not None else None


def _contiguous(name: str, t: torch.Tensor | None, shape: tuple, dtype: torch.dtype) -> None:
    if t is not None and (tuple(t.shape) != tuple(shape) or t.dtype != dtype
                          or not t.is_contiguous()):
        raise ValueError(f"{name} must be a contiguous {tuple(shape)} {dtype} tensor, got "
                         f"{tuple(t.shape)} {t.dtype}")


def stage_fusions(x2: torch.Tensor, out: torch.Tensor, norm: torch.Tensor | None,
                  residual: torch.Tensor | None, norm_ssq: torch.Tensor | None,
                  next_norm: torch.Tensor | None) -> tuple:
    """The fusions' operands as a launch reads them, for x2 [M, K] and out [M, N]: norm,
    residual, norm_ssq, next_norm contiguous in the kernel's types, and with next_norm the
    normed [M, N] and ssq_out [M, N/16] float32 it writes (else None): that order."""
    m, k = x2.shape
    n = out.shape[1]
    normed = ssq_out = None
    if norm is not None:
        norm = norm.to(x2.dtype).contiguous()
    if residual is not None:
        residual = residual.to(x2.dtype).reshape(m, n).contiguous()
    if norm_ssq is not None:
        norm_ssq = norm_ssq.reshape(m, k // 16).contiguous()
    if next_norm is not None:
        next_norm = next_norm.to(x2.dtype).contiguous()
        normed = torch.empty_like(out)
        ssq_out = x2.new_empty((m, n // 16), dtype=torch.float32)
    return norm, residual, norm_ssq, next_norm, normed, ssq_out


def run(build: DecodeBuild, choice: DecodeChoice, x2: torch.Tensor, qweight: torch.Tensor,
        scales: torch.Tensor, zeros: torch.Tensor | None, bias: torch.Tensor | None,
        out: torch.Tensor, group: int, gated: bool = False, norm: torch.Tensor | None = None,
        eps: float = 0.0, residual: torch.Tensor | None = None,
        norm_ssq: torch.Tensor | None = None, next_norm: torch.Tensor | None = None,
        normed: torch.Tensor | None = None, ssq_out: torch.Tensor | None = None
        ) -> torch.Tensor:
    """Launch on operands the calling family already checked and staged: x2 [M, K] and out
    [M, N] aligned in the activation type, the weight in ``build.layout``, scales float32 [N]
    (rowscale) or [K/g, N] with zeros (groupzero). ``gated``: the weight's 16-row tiles
    alternate gate and up rows and out is [M, N/2] = silu(gate) * up (32-row CTAs only).
    ``norm`` ([K], activation type): x2 is an RMSNorm's input (weight ``norm``, epsilon
    ``eps``), normalized inside the kernel; or ``norm_ssq`` ([M, K/16] float32): x2 is already
    the norm's input times its weight, norm_ssq the partial sums of squares of that input.
    ``residual`` ([M, N] like out, not with gated): added to the result. ``next_norm`` ([N],
    not with gated): also writes normed ([M, N]) = out * next_norm and ssq_out ([M, N/16]
    float32) = the sums of out^2 over each 16 rows. No host syncs (CUDA-graph safe)."""
    m, k = x2.shape
    n = out.shape[1] * (2 if gated else 1)
    rowscale = build.mode == MODE_ROWSCALE
    if (not fits(m, n, k, group, build.mode, choice) or (gated and choice.rows != 32)
            or not choice.takes(m, k, x2.element_size(), staged=norm is not None,
                                given=norm_ssq is not None, norm_out=next_norm is not None,
                                group=0 if rowscale else group)
            or (norm is not None and norm_ssq is not None)):
        raise ValueError(f"decode kernel {choice.name} does not take M={m} N={n} K={k} g={group}"
                         + (" gated" if gated else ""))
    if gated and (residual is not None or next_norm is not None):
        raise ValueError("residual and next_norm do not go with gated")
    _contiguous("norm", norm, (k,), x2.dtype)
    _contiguous("residual", residual, out.shape, out.dtype)
    _contiguous("norm_ssq", norm_ssq, (m, k // 16), torch.float32)
    if next_norm is not None:
        _contiguous("next_norm", next_norm, (n,), out.dtype)
        _contiguous("normed", normed, out.shape, out.dtype)
        _contiguous("ssq_out", ssq_out, (m, n // 16), torch.float32)
        if normed is None or ssq_out is None:
            raise ValueError("next_norm needs normed and ssq_out")
    stream = torch.cuda.current_stream(x2.device).cuda_stream
    rc = _lib(build).qc_mixed_gemm_decode(
        x2.data_ptr(), qweight.data_ptr(),
        None if rowscale else scales.data_ptr(),
        None if rowscale else zeros.data_ptr(),
        scales.data_ptr() if rowscale else None,
        _ptr(bias), out.data_ptr(), _ptr(norm), _ptr(residual), _ptr(norm_ssq),
        _ptr(next_norm), _ptr(normed) if next_norm is not None else None,
        _ptr(ssq_out) if next_norm is not None else None,
        m, n, k, k if rowscale else group,
        choice.tokens // 8, choice.rows // 16, choice.warps, int(gated), k // 16,
        int(choice.sz_smem), float(eps), stream)
    if rc != 0:
        raise RuntimeError(f"qc_mixed_gemm_decode ({choice.name}, {build}, M={m} N={n} K={k} "
                           f"g={group}) failed with CUDA error {rc}")
    return out
