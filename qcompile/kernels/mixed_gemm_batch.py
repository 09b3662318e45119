"""The small-batch kernel of ``qcompile::mixed_gemm`` (``csrc/mixed_gemm_batch.cu``): 16 to
64 tokens against an int4/int8 weight on Hopper. The warps of a CTA own rows and walk the
same K chunks (so each chunk of the activation is fetched once a CTA), and K is split over
the CTAs of a thread-block cluster whose partial tiles are summed through distributed shared
memory (the source's header says why neither the decode kernel nor the CUTLASS GEMM fits
these token counts well).

Like the decode kernel it reads the weights the Hopper family (``mixed_gemm``) prepared, so
the family offers its launch shapes (``batch.t64.r128.w8.s4``) beside its GEMM configs and
picks by token count at run time. One library per :class:`DecodeBuild` (activation, bits,
layout, scale mode), compiled for sm_90 (clusters).
"""

from __future__ import annotations

import ctypes
import threading
from dataclasses import dataclass

import torch

from .mixed_gemm_decode import MODE_GROUPZERO, TILE_K, DecodeBuild

__all__ = [
    "MAX_TOKENS",
    "PREFIX",
    "BatchChoice",
    "candidates",
    "choice_from_name",
    "fits",
    "heuristic",
    "is_name",
    "kernel_spec",
    "run",
]

SOURCE = "mixed_gemm_batch.cu"
ARCH = "sm_90"      # thread-block clusters and distributed shared memory
PREFIX = "batch."
MAX_TOKENS = 64     # the largest token tile; more tokens run the GEMM
_TOKEN_TILES = (16, 32, 64)
_WARPS = (4, 8)
_ROW_TILES = (1, 2)  # 16-row tiles a warp
_SPLITS = (1, 2, 4, 8)  # CTAs of a cluster along K (8: the portable cluster size)


@dataclass(frozen=True)
class BatchChoice:
    """A launch shape: tokens per CTA (16/32/64), weight rows per CTA (16 x row tiles a warp
    x warps), warps per CTA (4/8; each owns rows), and the CTAs of a cluster that split K."""

    tokens: int = 64
    rows: int = 128
    warps: int = 8
    splits: int = 1

    @property
    def name(self) -> str:
        return f"{PREFIX}t{self.tokens}.r{self.rows}.w{self.warps}.s{self.splits}"

    @property
    def row_tiles(self) -> int:
        """16-row tiles each warp owns."""
        return self.rows // (16 * self.warps)

    def valid(self) -> bool:
        return (self.tokens in _TOKEN_TILES and self.warps in _WARPS
                and self.rows == 16 * self.warps * self.row_tiles
                and self.row_tiles in _ROW_TILES and self.splits in _SPLITS)


def is_name(name: str) -> bool:
    return name.startswith(PREFIX)


def choice_from_name(name: str) -> BatchChoice:
    """Inverse of ``BatchChoice.name``; ValueError for anything else."""
    parts = name[len(PREFIX):].split(".") if is_name(name) else []
    try:
        if [p[:1] for p in parts] != ["t", "r", "w", "s"]:
            raise ValueError
        choice = BatchChoice(*(int(p[1:]) for p in parts))
    except ValueError:
        raise ValueError(f"no small-batch-kernel choice named {name!r}") from None
    if not choice.valid():
        raise ValueError(f"no small-batch-kernel choice named {name!r}")
    return choice


def fits(m: int, n: int, k: int, group: int, mode: int,
         choice: BatchChoice | None = None) -> bool:
    """Whether the kernel takes this problem (and launch shape): group-wise weights in groups
    of 64 x 2^i, K in whole 64-deep chunks (for each split), N in whole CTAs of rows."""
    if m < 1 or m > MAX_TOKENS or k % TILE_K or n % 64 or n * k >= 2**32:
        return False
    per_group = group // TILE_K
    if mode == MODE_GROUPZERO and (group % TILE_K or k % group or per_group & (per_group - 1)):
        return False
    return choice is None or (choice.valid() and n % choice.rows == 0
                              and k % (TILE_K * choice.splits) == 0)


def heuristic(m: int, n: int, k: int, sm_count: int = 132) -> BatchChoice:
    """The launch shape without measurements: the smallest token tile holding m, 128-row CTAs
    of 8 warps, and the fewest K splits that give every SM a CTA."""
    tokens = next(t for t in _TOKEN_TILES if t >= min(m, MAX_TOKENS))
    rows = 128 if n % 128 == 0 else 64
    warps = rows // 16
    ctas = n // rows
    allowed = [s for s in _SPLITS if k % (TILE_K * s) == 0]
    splits = next((s for s in allowed if ctas * s >= sm_count), allowed[-1])
    return BatchChoice(tokens, rows, warps, splits)


def candidates(m: int, n: int, k: int, sm_count: int = 132) -> list[str]:
    """Launch shapes worth timing for m tokens: the heuristic's first, then every row and
    warp split of CTA with the splits of K that give between half an SM and four CTAs an
    SM."""
    if m > MAX_TOKENS:
        return []
    first = heuristic(m, n, k, sm_count)
    names = [first.name]
    for warps in _WARPS:
        for row_tiles in _ROW_TILES:
            rows = 16 * warps * row_tiles
            for splits in _SPLITS:
                c = BatchChoice(first.tokens, rows, warps, splits)
                if (c.valid() and n % rows == 0 and k % (TILE_K * splits) == 0
                        and sm_count // 2 <= (n // rows) * splits <= 4 * sm_count):
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
            "qc_mixed_gemm_batch": (_I, [_P] * 7 + [_I] * 8 + [_P]),
        }, info=("qc_mixed_gemm_batch_info", b.info()))
        _libs[b] = lib
        return lib


def run(build: DecodeBuild, choice: BatchChoice, x2: torch.Tensor, qweight: torch.Tensor,
        scales: torch.Tensor, zeros: torch.Tensor | None, bias: torch.Tensor | None,
        out: torch.Tensor, group: int) -> torch.Tensor:
    """Launch on operands the calling family already checked and staged: x2 [M, K] and out
    [M, N] aligned in the activation type, the weight in ``build.layout``, scales float32 [N]
    (rowscale) or [K/g, N] with zeros (groupzero). No host syncs (CUDA-graph safe)."""
    m, k = x2.shape
    n = out.shape[1]
    rowscale = build.mode != MODE_GROUPZERO
    if not fits(m, n, k, group, build.mode, choice):
        raise ValueError(f"small-batch kernel {choice.name} does not take M={m} N={n} K={k} "
                         f"g={group}")
    stream = torch.cuda.current_stream(x2.device).cuda_stream
    rc = _lib(build).qc_mixed_gemm_batch(
        x2.data_ptr(), qweight.data_ptr(),
        None if rowscale else scales.data_ptr(),
        None if rowscale else zeros.data_ptr(),
        scales.data_ptr() if rowscale else None,
        bias.data_ptr() if bias is not None else None, out.data_ptr(),
        m, n, k, k if rowscale else group,
        choice.tokens // 8, choice.row_tiles, choice.warps, choice.splits, stream)
    if rc != 0:
        raise RuntimeError(f"qc_mixed_gemm_batch ({choice.name}, {build}, M={m} N={n} K={k} "
                           f"g={group}) failed with CUDA error {rc}")
    return out
