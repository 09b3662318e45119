"""qcompile kernels: the op definitions and, per device, which implementation runs them.

``ops`` defines the two ops with reference implementations. This package registers the
one CUDA implementation of each op, which hands the call to the kernel family that owns
the weight's layout (``mixed_gemm``: Hopper, ``mixed_gemm_sm80``: Ampere-class code,
``int8_gemm``: both archs). The graph rewrite asks :func:`prepare_mixed_gemm` /
:func:`prepare_int8_gemm` for the operands to embed, the op's ``layout`` and ``config``
arguments and a line for the report; it knows nothing else about kernels.

Which family: on Hopper (compute capability 9.0) the sm_90a kernels, with the sm_80
family as one more candidate when autotuning; on 8.x the sm_80 family; elsewhere (and on
CPU) the reference implementation. Which config: the family's heuristic at run time, or,
under Inductor's max-autotune, a table by token count that :mod:`.tuning` measured.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass, field

import torch

from . import ops, tuning
from .ops import pack_nk

log = logging.getLogger("qcompile.kernels")

__all__ = ["ops", "tuning", "PreparedGemm", "prepare_mixed_gemm", "prepare_int8_gemm",
           "prepare_lut_gemm", "lut_gemm_unsupported",
           "cuda_family", "device_capability", "mixed_families", "run_family", "fuses_in_kernel",
           "norm_fits_in_kernel", "FUSE_NORM_MIN_BITS"]

MIXED_FAMILIES = ("mixed_gemm", "mixed_gemm_sm80")


@dataclass(frozen=True)
class PreparedGemm:
    """What the rewrite embeds for one matmul: the weight operands in the kernel's layout,
    the op's ``layout`` and ``config`` arguments, a description for the report, and the
    optional tensor operands the op takes by name (``named``: argument name -> tensor)."""

    tensors: tuple
    layout: str
    config: str
    description: str
    named: dict = field(default_factory=dict)


_families: dict[str, object | None] = {}
_family_errors: dict[str, str] = {}


def cuda_family(name: str):
    """The CUDA kernel module ``name`` (``mixed_gemm``, ``mixed_gemm_sm80``, ``int8_gemm``),
    or None when it cannot be imported."""
    if name not in _families:
        try:
            _families[name] = importlib.import_module(f"{__name__}.{name}")
        except Exception as e:  # a missing toolchain must not break the CPU path
            _families[name] = None
            _family_errors[name] = f"{type(e).__name__}: {e}"
            log.warning("CUDA kernels %s unavailable, using the reference: %s", name, e)
    return _families[name]


def device_capability(device: torch.device) -> tuple[int, int]:
    """The compute capability that decides the kernel family (one place to patch in tests)."""
    return tuple(torch.cuda.get_device_capability(device))


def mixed_families(device: torch.device) -> list[str]:
    """Mixed-GEMM families for a device, preferred first."""
    if device.type != "cuda":
        return []
    cap = device_capability(device)
    if cap == (9, 0):
        return ["mixed_gemm", "mixed_gemm_sm80"]
    if cap[0] == 8:
        return ["mixed_gemm_sm80"]
    return []


# --- the ops' CUDA implementations: dispatch by layout --------------------------------------

_warned: set[str] = set()


def run_family(fam, x, qweight, scales, zeros, bias, bits, signed, group_size, zero_mode,
               dequant_dtype, layout, config=""):
    """``qcompile::mixed_gemm`` for a weight in one of ``fam.LAYOUTS``: the family's kernel
    where ``fam.supports`` says it runs (the kernel for this M from the ``config`` table),
    else the PyTorch path of the prepared weight, also when the kernels cannot be built
    (warned once per family)."""
    from .build import KernelBuildError

    del dequant_dtype  # the prepared operands already hold the dequantization
    if layout not in fam.LAYOUTS:
        raise ValueError(f"{layout!r} is not a layout of {fam.__name__} ({fam.LAYOUTS})")
    if fam.supports(x, qweight, scales, bits, group_size, layout):
        m = x.numel() // x.shape[-1]
        try:
            return fam.mixed_gemm_cuda(x, qweight, scales, zeros, bias, bits, signed, group_size,
                                       zero_mode, layout, tuning.lookup(config, m))
        except KernelBuildError as e:
            if fam.__name__ not in _warned:
                _warned.add(fam.__name__)
                log.warning("%s kernels unavailable, using PyTorch: %s", fam.__name__, e)
    return fam.reference_prepared(x, qweight, scales, zeros, bias, bits, group_size, layout)


def _fused_in_kernel(x, qweight, scales, bits, group_size, layout):
    """The sm90 family, where its kernel takes this call (the decode kernel then applies an
    RMSNorm before, a residual after, or the gating); else None."""
    fam = cuda_family("mixed_gemm")
    if (fam is not None and layout in fam.LAYOUTS
            and fam.supports(x, qweight, scales, bits, group_size, layout)):
        return fam
    return None


def fuses_in_kernel(layout: str) -> bool:
    """Whether mixed_gemm's ``norm_weight`` / ``residual`` arguments run inside the kernel for
    weights in ``layout`` (the sm90 family's decode kernel; the reference computes them too).
    Other families would run them as separate PyTorch ops inside the op, slower than the one
    kernel Inductor makes of an RMSNorm, so the rewrite leaves them out there."""
    if layout == ops.REFERENCE_LAYOUT:
        return True
    fam = cuda_family("mixed_gemm")
    return fam is not None and layout in fam.LAYOUTS


# The weight width from which a decode step's RMSNorms and skip connections go into the decode
# kernels (every width: a setting so that one process can compare with and without, e.g.
# `bench_decode --set qcompile.kernels.FUSE_NORM_MIN_BITS=16,4`). With the norms linked (the op
# before writes x * norm and the partial sums, the op after reads them) a GEMM pays less than
# the norm kernel and launch gap it replaces, for int4 and int8 weights alike (the A/B rows
# with `set` in benchmarks/results/bench_decode.jsonl). Lookup-table weights count as 4 bits.
# (See its use in lowering.rewrite.)
FUSE_NORM_MIN_BITS = 4


def norm_fits_in_kernel(m: int, n: int, k: int, act_dtype: torch.dtype) -> bool:
    """Whether the decode launch the heuristic picks for m tokens of an [N, K] weight has the
    shared memory to stage an RMSNorm's x * weight (``DecodeChoice.takes_norm``); where not
    (at K = 4096, more than 4 tokens), the op would run the norm as PyTorch ops, so the rewrite
    leaves it to Inductor. Asked for the reference layout too, so that a CPU compile matches
    the sm90 one."""
    from . import mixed_gemm_decode as decode

    itemsize = torch.empty((), dtype=act_dtype).element_size()
    return decode.heuristic(m, n, k).takes_norm(m, k, itemsize)


def _fused_cuda(x, qweight, scales, zeros, bias, bits, signed, group_size, zero_mode,
                dequant_dtype, layout, config, gated=False, norm_weight=None, norm_eps=0.0,
                residual=None, norm_ssq=None, next_norm=None):
    """A mixed GEMM with any of the decode kernel's fusions: in the sm90 family's kernels
    where they take the call, else PyTorch ops around the plain op."""
    from .build import KernelBuildError

    ops._check_fused(x, qweight.shape[0] // (2 if gated else 1), norm_weight, norm_eps,
                     residual, norm_ssq)
    fam = _fused_in_kernel(x, qweight, scales, bits, group_size, layout)
    if fam is not None:
        m = x.numel() // x.shape[-1]
        try:
            return fam.mixed_gemm_cuda(x, qweight, scales, zeros, bias, bits, signed,
                                       group_size, zero_mode, layout, tuning.lookup(config, m),
                                       gated=gated, norm=norm_weight, eps=norm_eps,
                                       residual=residual, norm_ssq=norm_ssq,
                                       next_norm=next_norm)
        except KernelBuildError:
            pass  # the plain op below warns and runs PyTorch

    def plain(xi):
        y = _mixed_gemm_cuda(xi, qweight, scales, zeros, bias, bits, signed, group_size,
                             zero_mode, dequant_dtype, layout, config)
        return ops.gate_up(y) if gated else y
    return ops.around_gemm(plain, x, norm_weight, norm_eps, residual, norm_ssq, next_norm)


def _mixed_gemm_cuda(x, qweight, scales, zeros, bias, bits, signed, group_size, zero_mode,
                     dequant_dtype, layout, config="", norm_weight=None, norm_eps=0.0,
                     residual=None, norm_ssq=None):
    if norm_weight is not None or residual is not None or norm_ssq is not None:
        return _fused_cuda(x, qweight, scales, zeros, bias, bits, signed, group_size,
                           zero_mode, dequant_dtype, layout, config, norm_weight=norm_weight,
                           norm_eps=norm_eps, residual=residual, norm_ssq=norm_ssq)
    for name in MIXED_FAMILIES:
        fam = cuda_family(name)
        if fam is not None and layout in fam.LAYOUTS:
            return run_family(fam, x, qweight, scales, zeros, bias, bits, signed, group_size,
                              zero_mode, dequant_dtype, layout, config)
    return ops.mixed_gemm_reference(x, qweight, scales, zeros, bias, bits, signed, group_size,
                                    zero_mode, dequant_dtype, layout)


def _mixed_gemm_gated_cuda(x, qweight, scales, zeros, bias, bits, signed, group_size,
                           zero_mode, dequant_dtype, layout, config="", norm_weight=None,
                           norm_eps=0.0, norm_ssq=None):
    """``qcompile::mixed_gemm_gated``: the sm90 family's kernels take the gating (and the
    RMSNorm before it) into the decode kernel; any other weight runs ``qcompile::mixed_gemm``
    and gates after."""
    return _fused_cuda(x, qweight, scales, zeros, bias, bits, signed, group_size, zero_mode,
                       dequant_dtype, layout, config, gated=True, norm_weight=norm_weight,
                       norm_eps=norm_eps, norm_ssq=norm_ssq)


def _mixed_gemm_norm_out_cuda(x, qweight, scales, zeros, bias, bits, signed, group_size,
                              zero_mode, dequant_dtype, layout, config, residual,
                              next_norm_weight):
    """``qcompile::mixed_gemm_norm_out``: the next RMSNorm's inputs from the decode kernel's
    epilogue where it runs, else PyTorch ops after the plain op."""
    ops.check_next_norm(qweight.shape[0], next_norm_weight)
    return _fused_cuda(x, qweight, scales, zeros, bias, bits, signed, group_size, zero_mode,
                       dequant_dtype, layout, config, residual=residual,
                       next_norm=next_norm_weight)


def _int8_gemm_cuda(xq, wq, row_scale, col_scale, bias, out_dtype, config="", azp=None,
                    azp_adj=None):
    fam = cuda_family("int8_gemm")
    if fam is not None:
        return fam.run(xq, wq, row_scale, col_scale, bias, ops.as_dtype(out_dtype), config, azp,
                       azp_adj)
    return ops.int8_gemm_reference(xq, wq, row_scale, col_scale, bias, out_dtype, config, azp,
                                   azp_adj)


LUT_LAYOUT = "sm90_lut_pairs"  # kernels.lut_gemm.LAYOUT, named here without importing it
# The tables whose lookup-table GEMM runs prefill by default on Hopper (prepare_lut_gemm):
# NF4 and FP4 (their GPU tests, tests/gpu/test_lookup_table_cuda.py, pass on the H100). Any
# other table is its own set of CUTLASS builds (the table is compiled in), so a learned
# codebook stays with dequantize + cuBLAS unless named here; lut_gemm.gemm_config builds and
# runs it for any table.
GEMM_TABLES: tuple[str, ...] = ("nf4", "fp4")
# Whether the lookup-table GEMM's block scales are also kept in the activation type (the op's
# ``gemm_scales``, made at compile time): without them each prefill call converts the float32
# scales first, a kernel of 4.9 us at 4096x4096 and 6.4 us at 14336x4096 (H100,
# results/lut_scale_conversion.jsonl); with them the weight takes 1/32 byte a weight more
# memory (blocks of 64; ~6% of NF4's bytes). The decode kernel reads the float32 scales.
LUT_GEMM_ACT_SCALES = True


def _lut_gemm_any(x, codes, table, scales, bias, group_size, dequant_dtype, layout, config,
                  gated=False, norm_weight=None, norm_eps=0.0, residual=None, norm_ssq=None,
                  next_norm=None, gemm_scales=None):
    """The lookup-table ops on CUDA and CPU: the kernels' layout runs ``lut_gemm.run`` (the
    kernels with the decode kernel's fusions on a GPU, their operands' reference elsewhere: a
    program exported on a GPU, say); the reference layout runs the reference."""
    n = codes.shape[0] // (2 if gated else 1)
    ops._check_fused(x, n, norm_weight, norm_eps, residual, norm_ssq)
    if next_norm is not None:
        ops.check_next_norm(n, next_norm)
    if layout != LUT_LAYOUT:
        y = ops.lut_gemm_reference(x, codes, table, scales, bias, group_size, dequant_dtype,
                                   layout, config, norm_weight, norm_eps, residual, norm_ssq)
        return ops.as_fused_result(y, gated, next_norm)
    fam = cuda_family("lut_gemm")
    if fam is None:
        raise RuntimeError(f"lut_gemm layout {layout!r} needs qcompile.kernels.lut_gemm: "
                           f"{_family_errors.get('lut_gemm')}")
    return fam.run(x, codes, table, scales, bias, group_size, dequant_dtype, gated=gated,
                   norm=norm_weight, eps=norm_eps, residual=residual, norm_ssq=norm_ssq,
                   next_norm=next_norm, config=config, gemm_scales=gemm_scales)


def _lut_gemm_impl(x, codes, table, scales, bias, group_size, dequant_dtype, layout,
                   config="", norm_weight=None, norm_eps=0.0, residual=None, norm_ssq=None,
                   gemm_scales=None):
    """``qcompile::lut_gemm`` on CUDA and CPU (see ``_lut_gemm_any``)."""
    return _lut_gemm_any(x, codes, table, scales, bias, group_size, dequant_dtype, layout,
                         config, norm_weight=norm_weight, norm_eps=norm_eps, residual=residual,
                         norm_ssq=norm_ssq, gemm_scales=gemm_scales)


def _lut_gemm_gated_impl(x, codes, table, scales, bias, group_size, dequant_dtype, layout,
                         config="", norm_weight=None, norm_eps=0.0, norm_ssq=None,
                         gemm_scales=None):
    """``qcompile::lut_gemm_gated``: silu(gate) * up in the decode kernel's epilogue."""
    return _lut_gemm_any(x, codes, table, scales, bias, group_size, dequant_dtype, layout,
                         config, gated=True, norm_weight=norm_weight, norm_eps=norm_eps,
                         norm_ssq=norm_ssq, gemm_scales=gemm_scales)


def _lut_gemm_norm_out_impl(x, codes, table, scales, bias, group_size, dequant_dtype, layout,
                            config, residual, next_norm_weight, gemm_scales=None):
    """``qcompile::lut_gemm_norm_out``: the next RMSNorm's inputs from the epilogue."""
    return _lut_gemm_any(x, codes, table, scales, bias, group_size, dequant_dtype, layout,
                         config, residual=residual, next_norm=next_norm_weight,
                         gemm_scales=gemm_scales)


torch.library.register_kernel("qcompile::mixed_gemm", "cuda", _mixed_gemm_cuda)
torch.library.register_kernel("qcompile::lut_gemm", ("cuda", "cpu"), _lut_gemm_impl)
torch.library.register_kernel("qcompile::lut_gemm_gated", ("cuda", "cpu"), _lut_gemm_gated_impl)
torch.library.register_kernel("qcompile::lut_gemm_norm_out", ("cuda", "cpu"),
                              _lut_gemm_norm_out_impl)
torch.library.register_kernel("qcompile::int8_gemm", "cuda", _int8_gemm_cuda)
torch.library.register_kernel("qcompile::mixed_gemm_gated", "cuda", _mixed_gemm_gated_cuda)
torch.library.register_kernel("qcompile::mixed_gemm_norm_out", "cuda", _mixed_gemm_norm_out_cuda)


# --- planning (compile time) ------------------------------------------------------------

def _pretty(config: str) -> str:
    return ", ".join(f"{lo}-{'' if hi is None else hi} {name}"
                     for lo, hi, name in tuning.parse_table(config))


def _pick(tuned: dict[str, tuning.Tuned]) -> str | None:
    """The family whose tuned table is fastest overall: the sum over timed M of its best
    time relative to the best of all families (so prefill does not drown decode)."""
    ms = {m for t in tuned.values() for m in t.timings}
    best = {m: min(t.timings[m][0][1] for t in tuned.values() if m in t.timings) for m in ms}

    def score(t: tuning.Tuned) -> float:
        return sum(t.timings[m][0][1] / best[m] if m in t.timings else 10.0 for m in ms)
    return min(tuned, key=lambda f: score(tuned[f])) if tuned else None


def prepare_mixed_gemm(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                       bits: int, signed: bool, group_size: int, zero_mode: str,
                       m: int | None, act_dtype: torch.dtype,
                       has_bias: bool = False) -> PreparedGemm:
    """Lay out a weight (q int [N, K], scales/zeros [N, K/g]) for the best available
    mixed-GEMM family on q's device; the reference "nk" layout when none runs it.

    ``m`` is the static token count, None when symbolic. Under max-autotune every family
    that runs the format is prepared and timed, and the fastest one's table is kept.
    """
    n, k = q.shape
    device = q.device
    autotune = tuning.autotune_enabled()
    fams, problems = [], []
    for name in mixed_families(device):
        fam = cuda_family(name)
        if fam is None:
            problems.append(f"{name}: {_family_errors.get(name)}")
            continue
        try:
            layout = fam.select_layout(bits, signed, group_size, zero_mode, n, k, act_dtype,
                                       device)
        except Exception as e:  # build errors etc.: reported, never fatal
            problems.append(f"{name}: {type(e).__name__}: {e}")
            continue
        if layout is not None:
            fams.append((name, fam, layout))
            if not autotune:
                break  # the preferred family that runs it; others only compete when timed
    if not fams:
        if device.type != "cuda":
            why = "reference (plain PyTorch)"
        elif problems:
            why = f"reference ({'; '.join(problems)})"
        else:
            why = "reference (no CUTLASS kernel for this format/shape)"
        return PreparedGemm((pack_nk(q, bits), scales, zeros), ops.REFERENCE_LAYOUT, "", why)

    def prepared(fam, layout):
        return fam.prepare_weight(q, scales, zeros, bits, signed, group_size, zero_mode,
                                  layout, act_dtype)

    def heuristic() -> PreparedGemm:  # the preferred family, its kernel chosen at run time
        name, fam, layout = fams[0]
        desc = fam.describe(layout, m, n, k, act_dtype, device, bits, group_size)
        return PreparedGemm(prepared(fam, layout), layout, "", desc)

    if not autotune:
        return heuristic()

    results = {}
    act = {torch.bfloat16: "bf16", torch.float16: "fp16"}[act_dtype]
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    bias = torch.randn(n, device=device, dtype=act_dtype) if has_bias else None
    for name, fam, layout in fams:
        tensors = prepared(fam, layout)

        def run(choice, x, fam=fam, layout=layout, tensors=tensors):
            return fam.mixed_gemm_cuda(x, *tensors, bias, bits, signed, group_size,
                                       zero_mode, layout, choice)

        def cands(mm, fam=fam, layout=layout):
            return fam.candidates(mm, n, k, act, bits, group_size, layout, sms)

        tuned = tuning.autotune(run, cands, lambda mm: torch.randn(mm, k, device=device,
                                                                   dtype=act_dtype),
                                m, f"mixed_gemm {name} N={n} K={k} w{bits} g{group_size}",
                                fam.DECODE_MAX_M)
        if tuned.config:
            results[name] = (tuned, layout, tensors)
    best = _pick({f: r[0] for f, r in results.items()})
    if best is None:  # nothing ran
        return heuristic()
    tuned, layout, tensors = results[best]
    arch = "sm80" if best == "mixed_gemm_sm80" else "sm90"
    others = f" (beat {', '.join(f for f in results if f != best)})" if len(results) > 1 else ""
    return PreparedGemm(tensors, layout, tuned.config,
                        f"cutlass {arch} autotuned: {_pretty(tuned.config)}{others}")


def lut_gemm_unsupported(device: torch.device, n: int, k: int, group_size: int,
                         act_dtype: torch.dtype | None) -> str | None:
    """Why ``prepare_lut_gemm`` would refuse an [N, K] lookup-table weight on ``device``
    (None where it lays it out: a GPU whose kernels take it, built or found in the cache now,
    or a CPU, where the reference runs)."""
    if device.type != "cuda":
        return None
    fam = cuda_family("lut_gemm")
    if fam is None:
        return f"lookup-table kernels unavailable: {_family_errors.get('lut_gemm')}"
    why = fam.supported(device, n, k, group_size, act_dtype)
    if why is None:
        try:
            fam.load(act_dtype)
        except RuntimeError as e:  # KernelBuildError: no toolchain, a failed build
            why = str(e)
    return why


def prepare_lut_gemm(codes: torch.Tensor, table: torch.Tensor, scales: torch.Tensor,
                     group_size: int, act_dtype: torch.dtype, table_name: str = "lut16"
                     ) -> PreparedGemm:
    """Lay out a lookup-table weight (codes [N, K] in [0, 16), table [16], scales [N, K / g])
    for ``qcompile::lut_gemm`` on codes' device: the reference "nk" layout on a CPU, the CUDA
    kernels' layout on a GPU. ValueError (or KernelBuildError) says why a GPU cannot run it,
    and the rewrite then leaves the matmul to Inductor: the reference would dequantize the
    whole weight on every call.

    On Hopper, a table named in GEMM_TABLES (``table_name``) also gets the lookup-table GEMM
    for prefill, its builds compiled now (``lut_gemm.gemm_config``: the table is compiled in,
    so other tables, each its own set of builds, stay with dequantize + cuBLAS there), and
    with LUT_GEMM_ACT_SCALES its scale operand in the activation type (``named["gemm_scales"]``,
    the op's ``gemm_scales``)."""
    device = codes.device
    if device.type != "cuda":
        return PreparedGemm((pack_nk(codes, 4), table, scales), ops.REFERENCE_LAYOUT, "",
                            "reference (plain PyTorch)")
    n, k = codes.shape
    why = lut_gemm_unsupported(device, n, k, group_size, act_dtype)
    if why is not None:
        raise ValueError(why)
    fam = cuda_family("lut_gemm")
    config, beyond, decode_max = "", "dequantize + cuBLAS", fam.DECODE_MAX_M
    operands = fam.prepare(codes, table, scales)
    named = {}
    if table_name in GEMM_TABLES:
        why = fam.gemm_supported(device, n, k, group_size, act_dtype)
        if why is not None:
            beyond += f" (no lookup-table GEMM: {why})"
        else:
            try:
                config = fam.gemm_config(table, act_dtype)
                beyond = f"the sm90 lookup-table GEMM ({table_name} compiled in)"
                decode_max = min(decode_max, fam.gemm_min_m(n, k, fam.sm_count(device.index)) - 1)
                if LUT_GEMM_ACT_SCALES:
                    named["gemm_scales"] = fam.gemm_scales_of(operands[2], act_dtype)
            except RuntimeError as e:  # KernelBuildError
                log.warning("lut_gemm: the lookup-table GEMM did not build (%s); prefill runs "
                            "dequantize + cuBLAS", e)
                beyond += f" (the lookup-table GEMM did not build: {e})"
    return PreparedGemm(operands, fam.LAYOUT, config,
                        f"qcompile lookup-table decode kernel up to {decode_max} "
                        f"tokens; beyond, {beyond}", named)


def prepare_int8_gemm(wq: torch.Tensor, m: int | None, out_dtype: torch.dtype,
                      has_bias: bool = False) -> tuple[str, str]:
    """The ``config`` argument and report line for ``qcompile::int8_gemm`` with weight wq
    int8 [N, K] (whose layout is always [N, K]); m None when the token count is symbolic."""
    n, k = wq.shape
    device = wq.device
    if device.type != "cuda":
        return "", "reference (plain PyTorch)"
    fam = cuda_family("int8_gemm")
    if fam is None:
        return "", f"reference (CUTLASS unavailable: {_family_errors.get('int8_gemm')})"
    try:
        desc = fam.describe(m, n, k, out_dtype, device)
    except Exception as e:
        return "", f"reference ({type(e).__name__}: {e})"
    if not tuning.autotune_enabled():
        return "", desc
    arch = fam.device_arch(device)
    col = torch.rand(n, device=device) + 0.5
    bias = torch.randn(n, device=device, dtype=out_dtype) if has_bias else None

    def run(choice, xq):
        row = torch.ones(xq.shape[0], 1, device=device)
        return fam.int8_gemm_cuda(xq, wq, row, col, bias, out_dtype, fam.choice_from_name(choice))

    def make_x(mm):
        return torch.randint(-127, 128, (mm, k), device=device, dtype=torch.int8)

    tuned = tuning.autotune(run, lambda mm: fam.candidates(mm, n, k, out_dtype, arch), make_x, m,
                            f"int8_gemm N={n} K={k}", fam.DECODE_MAX_M)
    if not tuned.config:
        return "", desc
    return tuned.config, f"cutlass autotuned: {_pretty(tuned.config)}"

