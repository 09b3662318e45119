"""Tensor parallel: a quantized Llama-style model sharded over the ranks of a torchrun launch.

    torchrun --nproc-per-node 2 examples/tp_decode.py              # GPUs (NCCL)
    torchrun --nproc-per-node 2 examples/tp_decode.py --cpu        # CPU processes (gloo)
    python examples/tp_decode.py --cpu                             # the same, started here

Each rank builds the same model, quantizes it, takes its shard with ``qcompile.tp.shard``
(q/k/v and gate/up split column-wise, o and down row-wise followed by an all-reduce), tells
the attention modules how many heads their shard holds, and compiles the one-token step with
backend="qcompile". Every rank's quantized linears are taken over; the all-reduces stay
with Inductor. Rank 0 prints the report's count and the generated tokens, which are the
unsharded model's.
"""

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import qcompile
from qcompile import tp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from llama_model import CONFIGS, Llama  # noqa: E402  (the project's Llama, not in the package)

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--cpu", action="store_true", help="CPU processes and gloo")
p.add_argument("--format", default="w4a16", choices=["w4a16", "w8a16", "w8a8", "nf4"])
p.add_argument("--new", type=int, default=8)
args = p.parse_args()

if "RANK" not in os.environ:  # started without torchrun: be a launcher of two CPU ranks
    if not args.cpu:
        sys.exit("start with torchrun, or pass --cpu to run two CPU ranks from here")
    from torch.distributed.run import main as torchrun
    torchrun(["--nproc-per-node", "2", __file__, *sys.argv[1:]])
    sys.exit(0)

device = "cpu"
if not args.cpu:
    device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
    torch.cuda.set_device(device)
dist.init_process_group("gloo" if args.cpu else "nccl")
rank, world = dist.get_rank(), dist.get_world_size()
cfg = CONFIGS["tiny" if args.cpu else "llama3-8b-8l"]


def make_model() -> Llama:
    torch.manual_seed(0)  # the same weights on every rank
    with torch.device(device):
        model = Llama(cfg).to(torch.bfloat16).eval()
    kw = {"group_size": 32} if args.format == "w4a16" else {}  # a row-wise shard holds whole groups
    kw = {"block_size": 32} if args.format == "nf4" else kw
    return qcompile.quantize(model, args.format, **kw)


model = tp.shard(make_model(), rank, world)
for layer in model.layers:  # the model reads its head counts from attributes
    layer.attention.n_heads //= world
    layer.attention.n_kv_heads //= world


def generate(m, prompt, steps, step=None, forced=None):
    """Greedy tokens and each step's logits; ``forced``: feed these tokens instead."""
    m.setup_caches(1, prompt.shape[1] + steps)
    with torch.no_grad():
        logits = m(prompt, torch.arange(prompt.shape[1], device=device))[:, -1].float()
        toks, outs = [], [logits]
        for i in range(steps):
            tok = logits.argmax(-1, keepdim=True) if forced is None else forced[:, i:i + 1]
            toks.append(tok)
            pos = torch.tensor([prompt.shape[1] + i], device=device)
            logits = (m if step is None else step)(tok, pos)[:, -1].float().clone()
            outs.append(logits)
    return torch.cat(toks, 1), outs


prompt = torch.randint(0, cfg.vocab_size, (1, 8), generator=torch.Generator().manual_seed(1))
prompt = prompt.to(device)
mode = None if args.cpu else "reduce-overhead"
with qcompile.collect() as report:
    step = torch.compile(model, backend="qcompile", fullgraph=True, mode=mode)
    tokens, logits = generate(model, prompt, args.new, step)
counts = [None] * world
dist.all_gather_object(counts, (len(report.matched), len(report)))
# the unsharded model, eagerly, fed the same tokens: its logits at every step
_, ref = generate(make_model(), prompt, args.new, forced=tokens)
err = max(float((a - b).norm() / b.norm()) for a, b in zip(logits, ref))
if rank == 0:
    for r, (matched, total) in enumerate(counts):
        print(f"rank {r}: {matched} of {total} matmuls run as qcompile ops")
    print(f"TP={world} {args.format} tokens: {tokens.tolist()[0]}")
    print(f"largest relative difference from the unsharded model's logits: {err:.1e}")
dist.destroy_process_group()
sys.exit(0 if err < 2e-2 and all(m > 0 for m, _ in counts) else 1)
