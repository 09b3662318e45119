"""GPTQ act-order in the rewrite: the op reads the activation gathered along K.

A weight recognised as ``W[:, perm]`` (``WeightOnlyMatch.perm``, see ``weight_only``) runs
as ``x[..., perm] @ W[:, perm].T``, which is ``x @ W.T``: the gather is a graph node
(``aten.index`` with perm as a constant) that Inductor fuses into the kernel producing
x, as Marlin and ExLlama gather act-order activations. An RMSNorm handed to the op gathers
too: its mean over K does not depend on the order, its weight is gathered with x.
"""

from __future__ import annotations

import torch
import torch.fx as fx

aten = torch.ops.aten


def gather_activation(b, perm: torch.Tensor | None, x_arg: fx.Node, fused_args: tuple
                      ) -> tuple[fx.Node, tuple, str]:
    """(x_arg[..., perm], fused_args with an RMSNorm's weight gathered, a note for the
    report), or the arguments unchanged and no note when perm is None. ``b`` is the
    rewrite's node builder; ``fused_args`` is () or the op's (norm_weight, norm_eps)."""
    if perm is None:
        return x_arg, fused_args, ""
    p = b.constant(perm.to(torch.long), "perm")
    # aten.index, not index_select: the pass runs on the decomposed graph, where Inductor
    # lowers index itself and index_select is decomposed away
    lead = [None] * (x_arg.meta["val"].dim() - 1)
    x_arg = b.call(aten.index.Tensor, (x_arg, [*lead, p]))
    if fused_args:
        weight, eps = fused_args
        fused_args = (b.call(aten.index.Tensor, (weight, [p])), eps)
    return x_arg, fused_args, "; x gathered along K (act-order)"
