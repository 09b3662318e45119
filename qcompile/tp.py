"""Tensor parallelism: shard a model's linears, quantized or not, over ``torch.distributed`` ranks.

What it is for: running a quantized LLM split over several GPUs (or CPU processes) the way
gpt-fast's ``tp.py`` does it, with every rank's quantized shard still taken over by
``torch.compile(model, backend="qcompile")``. Each linear of the plan is cut
- column-wise (``"colwise"``, split N: q/k/v, gate/up): the rank keeps rows
  ``[rank * N/w, (rank+1) * N/w)`` of the weight, its scales, zeros and bias;
- row-wise (``"rowwise"``, split K: o, down): the rank keeps that slice of the input columns,
  and the layer is wrapped in ``AllReduce``, which sums the partial outputs with the
  functional collective ``torch.distributed._functional_collectives.all_reduce`` (the bias
  is kept on rank 0 only, so it is added once).
The collectives are ordinary graph ops: qcompile rewrites the matmuls around them and leaves
the all-reduce to Inductor.

Works on ``nn.Linear`` and on qcompile's formats (``Int8WeightOnlyLinear``,
``Int4WeightOnlyLinear`` with every packing, ``SmoothQuantLinear``, the NF4/FP4
``LookupTable4bitLinear``), so ``qcompile.quantize`` and ``shard`` compose in either order. A
row-wise split must not cut a quantization group or block: ``K / world_size`` has to be a
multiple of the group size (else ``ValueError``). Group-wise int4 and NF4/FP4 give the same
weights in both orders (a double-quantized absmax is read back and kept as float32 in the
shards, so that the weights stay exactly the unsharded model's); per-channel int8 quantized
after a row-wise split gets one scale per shard and output channel (finer than the unsharded
model's).

Not handled here: attention head counts (a model that reads ``n_head`` from an attribute must
divide it itself; one that infers heads from the shapes needs nothing), fused qkv weights,
and GPTQ act-order (unsorted ``g_idx``) row-wise.

DTensor spelling: ``parallelize_module(model, mesh, {"wq": qcompile.tp.ColwiseParallel(),
"wo": qcompile.tp.RowwiseParallel(), ...})``, torch's styles extended to
``Int8WeightOnlyLinear`` (other formats raise NotImplementedError: use ``shard``).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping

import torch
from torch import nn

from .formats import (QUANTIZED_LINEARS, Int4WeightOnlyLinear, Int8WeightOnlyLinear,
                      LookupTable4bitLinear, SmoothQuantLinear)

__all__ = ["shard", "shard_linear", "AllReduce", "ColwiseParallel", "RowwiseParallel",
           "DEFAULT_PLAN", "STYLES"]

STYLES = ("colwise", "rowwise")

# Llama-style names, gpt-fast's and Hugging Face's; a key is a glob on the module's name.
DEFAULT_PLAN: dict[str, str] = {
    "*wq": "colwise", "*wk": "colwise", "*wv": "colwise", "*wo": "rowwise",
    "*w1": "colwise", "*w3": "colwise", "*w2": "rowwise",
    "*q_proj": "colwise", "*k_proj": "colwise", "*v_proj": "colwise", "*o_proj": "rowwise",
    "*gate_proj": "colwise", "*up_proj": "colwise", "*down_proj": "rowwise",
}

SHARDABLE = (nn.Linear, *QUANTIZED_LINEARS)


class AllReduce(nn.Module):
    """Runs ``linear`` (a row-wise shard) and sums its output over ``group`` with the
    functional all-reduce, as gpt-fast's tp.py does in a forward hook. A module rather than a
    hook so that ``qcompile.quantize`` can replace the wrapped ``nn.Linear`` afterwards."""

    def __init__(self, linear: nn.Module, group=None):
        super().__init__()
        self.linear = linear
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist
        from torch.distributed import _functional_collectives as funcol

        group = self.group if self.group is not None else dist.group.WORLD
        return funcol.all_reduce(self.linear(x), "sum", group)


def _span(size: int, rank: int, world_size: int, what: str, align: int = 1) -> tuple[int, int]:
    if size % world_size or (size // world_size) % align:
        raise ValueError(f"{what}: {size} does not split into {world_size} shards"
                         + (f" of a multiple of {align}" if align > 1 else ""))
    w = size // world_size
    return rank * w, (rank + 1) * w


def _rebuild(module: nn.Module, buffers: Mapping[str, torch.Tensor | None],
             bias: torch.Tensor | None, in_features: int, out_features: int) -> nn.Module:
    """A new module of ``module``'s class with the same plain attributes and new buffers."""
    new = type(module).__new__(type(module))
    nn.Module.__init__(new)
    for k, v in vars(module).items():
        if not k.startswith("_") and k not in ("training",) and not isinstance(v, nn.Module):
            setattr(new, k, v)
    new.training = module.training
    for k, v in buffers.items():
        new.register_buffer(k, None if v is None else v.contiguous().clone())
    new.bias = None if bias is None else nn.Parameter(bias.contiguous().clone(),
                                                      requires_grad=False)
    new.in_features, new.out_features = in_features, out_features
    return new


def _row_span(k: int, rank: int, world_size: int, group: int, name: str, what: str,
              field: str) -> tuple[int, int]:
    """The input columns of a row-wise shard, refused where it would cut a group."""
    if k % world_size or (k // world_size) % group:
        raise ValueError(
            f"layer {name!r}: a row-wise split over {world_size} ranks would cut its {what}: "
            f"the shard width {k / world_size:g} (in_features {k} / {world_size}) is not a "
            f"multiple of {field}={group}")
    return _span(k, rank, world_size, f"{name} in_features", group)


def _bias(module: nn.Module, style: str, rank: int, n0: int, n1: int):
    b = module.bias
    if b is None:
        return None
    if style == "colwise":
        return b.detach()[n0:n1]
    return b.detach() if rank == 0 else None  # row-wise: added once, after the sum


def shard_linear(module: nn.Module, style: str, rank: int, world_size: int,
                 name: str = "linear") -> nn.Module:
    """Rank ``rank``'s shard of one linear (``nn.Linear`` or a qcompile format), without the
    all-reduce. ``style`` is ``"colwise"`` (split N) or ``"rowwise"`` (split K)."""
    if style not in STYLES:
        raise ValueError(f"{name}: style must be one of {STYLES}, got {style!r}")
    if not 0 <= rank < world_size:
        raise ValueError(f"{name}: rank {rank} outside world_size {world_size}")
    n, k = module.out_features, module.in_features
    col = style == "colwise"
    if isinstance(module, nn.Linear):
        n0, n1 = _span(n, rank, world_size, f"{name} out_features") if col else (0, n)
        k0, k1 = (0, k) if col else _span(k, rank, world_size, f"{name} in_features")
        w = module.weight.detach()[n0:n1, k0:k1]
        new = nn.Linear(k1 - k0, n1 - n0, bias=False, device=w.device, dtype=w.dtype)
        new.weight = nn.Parameter(w.contiguous().clone(), requires_grad=module.weight.requires_grad)
        b = _bias(module, style, rank, n0, n1)
        new.bias = None if b is None else nn.Parameter(b.contiguous().clone(),
                                                       requires_grad=module.bias.requires_grad)
        return new
    if isinstance(module, Int8WeightOnlyLinear):
        if col:
            n0, n1 = _span(n, rank, world_size, f"{name} out_features")
            bufs = {"qweight": module.qweight[n0:n1], "scales": module.scales[n0:n1]}
            return _rebuild(module, bufs, _bias(module, style, rank, n0, n1), k, n1 - n0)
        k0, k1 = _span(k, rank, world_size, f"{name} in_features")
        bufs = {"qweight": module.qweight[:, k0:k1], "scales": module.scales}
        return _rebuild(module, bufs, _bias(module, style, rank, 0, n), k1 - k0, n)
    if isinstance(module, SmoothQuantLinear):
        q, ws, sm = module.qweight, module.w_scales, module.smooth
        if col:
            n0, n1 = _span(n, rank, world_size, f"{name} out_features")
            azp = None if module.azp_adj is None else module.azp_adj[n0:n1]
            bufs = {"qweight": q[n0:n1], "w_scales": ws[:, n0:n1], "smooth": sm,
                    "act_scale": module.act_scale, "azp_adj": azp}
            return _rebuild(module, bufs, _bias(module, style, rank, n0, n1), k, n1 - n0)
        k0, k1 = _span(k, rank, world_size, f"{name} in_features")
        qk = q[:, k0:k1]
        azp = None if module.azp_adj is None else qk.sum(dim=1, dtype=torch.int32)
        bufs = {"qweight": qk, "w_scales": ws, "smooth": None if sm is None else sm[k0:k1],
                "act_scale": module.act_scale, "azp_adj": azp}
        return _rebuild(module, bufs, _bias(module, style, rank, 0, n), k1 - k0, n)
    if isinstance(module, Int4WeightOnlyLinear):
        return _shard_int4(module, col, rank, world_size, name)
    if isinstance(module, LookupTable4bitLinear):
        return _shard_lut(module, col, rank, world_size, name)
    raise TypeError(f"{name}: cannot shard {type(module).__name__}; shardable: "
                    + ", ".join(c.__name__ for c in SHARDABLE))


def _shard_int4(m: Int4WeightOnlyLinear, col: bool, rank: int, world_size: int,
                name: str) -> nn.Module:
    n, k, g, p = m.out_features, m.in_features, m.group_size, m.packing
    style = "colwise" if col else "rowwise"
    if col:
        # awq/gptq pack 8 output channels per int32 (weight or zeros): whole words per shard
        n0, n1 = _span(n, rank, world_size, f"{name} out_features", 8 if p != "uint8" else 1)
        if p == "uint8":
            bufs = {"qweight": m.qweight[n0:n1], "scales": m.scales[n0:n1],
                    "zeros": None if m.zeros is None else m.zeros[n0:n1]}
        else:
            w0, w1 = n0 // 8, n1 // 8
            bufs = {"qweight": m.qweight[:, w0:w1] if p == "awq" else m.qweight[:, n0:n1],
                    "qzeros": m.qzeros[:, w0:w1], "scales": m.scales[:, n0:n1]}
            if p == "gptq":
                bufs["g_idx"] = m.g_idx
        return _rebuild(m, bufs, _bias(m, style, rank, n0, n1), k, n1 - n0)
    k0, k1 = _row_span(k, rank, world_size, g, name, "int4 groups", "group_size")
    g0, g1 = k0 // g, k1 // g
    if p == "uint8":
        bufs = {"qweight": m.qweight[:, k0 // 2:k1 // 2], "scales": m.scales[:, g0:g1],
                "zeros": None if m.zeros is None else m.zeros[:, g0:g1]}
    elif p == "awq":
        bufs = {"qweight": m.qweight[k0:k1], "qzeros": m.qzeros[g0:g1],
                "scales": m.scales[g0:g1]}
    else:
        plain = torch.arange(k, device=m.g_idx.device, dtype=m.g_idx.dtype) // g
        if not torch.equal(m.g_idx, plain):
            raise ValueError(f"{name}: a row-wise split of a GPTQ act-order weight (unsorted "
                             "g_idx) is not supported; split it column-wise or quantize "
                             "after sharding")
        if (k1 - k0) % 8:
            raise ValueError(f"{name}: GPTQ packs 8 input columns per int32; the shard width "
                             f"{k1 - k0} is not a multiple of 8")
        bufs = {"qweight": m.qweight[k0 // 8:k1 // 8], "qzeros": m.qzeros[g0:g1],
                "scales": m.scales[g0:g1], "g_idx": m.g_idx[k0:k1] - g0}
    return _rebuild(m, bufs, _bias(m, style, rank, 0, n), k1 - k0, n)


def _shard_lut(m: LookupTable4bitLinear, col: bool, rank: int, world_size: int,
               name: str) -> nn.Module:
    """NF4/FP4: the codes [N, K] and block absmax [N, K / block] sliced as a weight and its
    group scales are (bitsandbytes' flat storage read back first)."""
    n, k, b = m.out_features, m.in_features, m.block_size
    a = m.qweight.reshape(-1)
    codes = torch.stack((a >> 4, a & 15), dim=-1).reshape(n, k)
    absmax = m.block_absmax().reshape(n, k // b)
    if col:
        n0, n1 = _span(n, rank, world_size, f"{name} out_features")
        codes, absmax, bias = codes[n0:n1], absmax[n0:n1], _bias(m, "colwise", rank, n0, n1)
    else:
        k0, k1 = _row_span(k, rank, world_size, b, name, "lookup-table blocks", "block_size")
        codes, absmax = codes[:, k0:k1], absmax[:, k0 // b:k1 // b]
        bias = _bias(m, "rowwise", rank, 0, n)
    return LookupTable4bitLinear(codes.contiguous(), m.table, absmax.contiguous(), b,
                                 None if bias is None else bias.clone())


def _style_of(name: str, plan: Mapping[str, str]) -> str | None:
    for pattern, style in plan.items():
        if fnmatch.fnmatchcase(name, pattern):
            return style
    return None


@torch.no_grad()
def shard(model: nn.Module, rank: int, world_size: int,
          plan: Mapping[str, str] | None = None, group=None) -> nn.Module:
    """Shard ``model``'s linears in place for rank ``rank`` of ``world_size``; return it.

    ``plan`` maps globs on module names (``"layers.*.attention.wq"``, ``"*w2"``) to
    ``"colwise"`` or ``"rowwise"``; the first matching key wins; default ``DEFAULT_PLAN``
    (Llama names). Row-wise layers are wrapped in ``AllReduce`` over ``group`` (default the
    world group). Linears the plan names must be ``nn.Linear`` or qcompile formats.
    """
    plan = DEFAULT_PLAN if plan is None else plan
    for style in plan.values():
        if style not in STYLES:
            raise ValueError(f"plan styles must be one of {STYLES}, got {style!r}")
    targets = []
    for parent_name, parent in model.named_modules():
        if isinstance(parent, AllReduce):
            continue  # already sharded
        for child_name, child in parent.named_children():
            full = f"{parent_name}.{child_name}" if parent_name else child_name
            style = _style_of(full, plan)
            if style is not None and isinstance(child, SHARDABLE):
                targets.append((parent, child_name, full, child, style))
    for parent, child_name, full, child, style in targets:
        new = shard_linear(child, style, rank, world_size, full)
        setattr(parent, child_name, AllReduce(new, group) if style == "rowwise" else new)
    return model


# --- DTensor spelling: torch's parallelize_module with styles that also take qcompile's formats

def _dtensor_placements(module: nn.Module, col: bool) -> dict[str, str]:
    """Buffer/parameter name -> "shard0" | "shard1" | "replicate" for a format DTensor can run
    (its forward's ops have DTensor sharding rules); others raise NotImplementedError."""
    if isinstance(module, Int8WeightOnlyLinear):
        if col:
            return {"qweight": "shard0", "scales": "shard0", "bias": "shard0"}
        return {"qweight": "shard1", "scales": "replicate", "bias": "replicate"}
    raise NotImplementedError(
        f"DTensor styles take nn.Linear and Int8WeightOnlyLinear, not "
        f"{type(module).__name__} (on torch 2.13 DTensor's sharding rules give wrong numbers "
        f"for the int4 nibble unpacking); shard it with qcompile.tp.shard (functional "
        f"collectives) instead")


def _dtensor_partition(col: bool, world_size: int):
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    def partition(name, module, mesh):
        where = _dtensor_placements(module, col)
        pl = {"shard0": [Shard(0)], "shard1": [Shard(1)], "replicate": [Replicate()]}
        for bname, b in list(module.named_buffers(recurse=False)):
            if b is not None:
                module.register_buffer(bname, distribute_tensor(b, mesh, pl[where[bname]]))
        if module.bias is not None:
            module.bias = nn.Parameter(distribute_tensor(module.bias.detach(), mesh,
                                                         pl[where["bias"]]), requires_grad=False)
    return partition


def _make_dtensor_styles():
    from functools import partial

    from torch.distributed.tensor import distribute_module
    from torch.distributed.tensor import parallel as tpar

    def apply(style, module, mesh, col):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            return super(type(style), style)._apply(module, mesh)
        if not col:  # as RowwiseParallel sets it for nn.Linear: input sharded on its last dim
            from torch.distributed.tensor import Shard
            style.desired_input_layouts = (Shard(-1),)
        return distribute_module(
            module, mesh, _dtensor_partition(col, mesh.size()),
            partial(style._prepare_input_fn, style.input_layouts,
                    style.desired_input_layouts),
            partial(style._prepare_output_fn, style.output_layouts, style.use_local_output))

    class ColwiseParallel(tpar.ColwiseParallel):
        """torch's ColwiseParallel, also for qcompile's Int8WeightOnlyLinear (qweight and
        scales Shard(0))."""

        def _apply(self, module, device_mesh):
            return apply(self, module, device_mesh, True)

    class RowwiseParallel(tpar.RowwiseParallel):
        """torch's RowwiseParallel, also for qcompile's Int8WeightOnlyLinear (qweight
        Shard(1), scales replicated); the partial sums are all-reduced by DTensor."""

        def _apply(self, module, device_mesh):
            return apply(self, module, device_mesh, False)

    return ColwiseParallel, RowwiseParallel


def __getattr__(name: str):
    # the DTensor styles import torch.distributed.tensor only when asked for
    if name in ("ColwiseParallel", "RowwiseParallel"):
        col, row = _make_dtensor_styles()
        globals().update(ColwiseParallel=col, RowwiseParallel=row)
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
