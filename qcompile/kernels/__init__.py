"""qcompile kernels: the op definitions and, per device, which implementation runs them.

``ops`` defines the two ops with reference implementations. The CUDA kernel families
(``mixed_gemm``, ``int8_gemm``) register CUDA implementations behind the same ops when
their modules import. The lowering asks ``plan_mixed_gemm`` / ``plan_int8_gemm`` which
weight layout to pack for and how the report should name the implementation; it knows
nothing else about kernels.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import ops
from .ops import pack_nk

log = logging.getLogger("qcompile.kernels")

__all__ = ["ops", "KernelPlan", "plan_mixed_gemm", "plan_int8_gemm", "cuda_family"]


@dataclass(frozen=True)
class KernelPlan:
    """How one matmul will run: the weight layout, a name for the report, the packer."""

    layout: str
    description: str
    prepare: Callable[..., tuple]


_families: dict[str, object | None] = {}
_family_errors: dict[str, str] = {}


def cuda_family(name: str):
    """The CUDA kernel module ``name`` (``mixed_gemm`` / ``int8_gemm``), or None."""
    if name not in _families:
        try:
            mod = importlib.import_module(f"{__name__}.{name}")
            mod.register_cuda_impl()
            _families[name] = mod
        except Exception as e:  # a missing toolchain must not break the CPU path
            _families[name] = None
            _family_errors[name] = f"{type(e).__name__}: {e}"
            log.warning("CUDA kernels %s unavailable, using the reference: %s", name, e)
    return _families[name]


def plan_mixed_gemm(bits: int, signed: bool, group_size: int, zero_mode: str,
                    m: int | None, n: int, k: int, act_dtype: torch.dtype,
                    device: torch.device) -> KernelPlan:
    """Pick the mixed-GEMM implementation for a weight; fall back to the reference."""
    reason = "reference (plain PyTorch)"
    if device.type == "cuda":
        fam = cuda_family("mixed_gemm")
        if fam is not None:
            try:
                layout = fam.select_layout(bits, signed, group_size, zero_mode, n, k,
                                           act_dtype, device)
            except Exception as e:  # build errors etc.: reported, never fatal
                layout, reason = None, f"reference ({type(e).__name__}: {e})"
            if layout is not None:
                def prepare(q, scales, zeros):
                    return fam.prepare_weight(q, scales, zeros, bits, signed, group_size,
                                              zero_mode, layout, act_dtype)
                try:
                    desc = fam.describe(layout, m, n, k, act_dtype, device, bits, group_size)
                except Exception as e:
                    layout, reason = None, f"reference ({type(e).__name__}: {e})"
                if layout is not None:
                    return KernelPlan(layout, desc, prepare)
            if reason.startswith("reference (plain"):
                reason = "reference (no CUTLASS kernel for this format/shape)"
        else:
            reason = f"reference (CUTLASS unavailable: {_family_errors.get('mixed_gemm')})"

    def prepare_ref(q, scales, zeros):
        return pack_nk(q, bits), scales, zeros
    return KernelPlan(ops.REFERENCE_LAYOUT, reason, prepare_ref)


def plan_int8_gemm(m: int | None, n: int, k: int, out_dtype: torch.dtype,
                   device: torch.device) -> KernelPlan:
    """Name the int8-GEMM implementation (``m`` None when the token count is symbolic);
    the int8 weight layout is always [N, K]."""
    reason = "reference (plain PyTorch)"
    if device.type == "cuda":
        fam = cuda_family("int8_gemm")
        if fam is not None:
            try:
                desc = fam.describe(m, n, k, out_dtype, device)
            except Exception as e:
                desc = f"reference ({type(e).__name__}: {e})"
            return KernelPlan("nk", desc, lambda *t: t)
        reason = f"reference (CUTLASS unavailable: {_family_errors.get('int8_gemm')})"
    return KernelPlan("nk", reason, lambda *t: t)
