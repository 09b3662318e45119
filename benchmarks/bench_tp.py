"""Tensor-parallel decode: tokens/s of a Llama-style model sharded with ``qcompile.tp`` over the
ranks of a ``torchrun`` launch, each rank's shard compiled with ``backend="qcompile"``.

    torchrun --nproc-per-node 2 benchmarks/bench_tp.py [--config llama3-70b] [--layers 16]
        [--formats bf16,w4a16,w8a16,w8a8] [--batch 1,8] [--prompt 128] [--new 64]
        [--group-size 128] [--order quantize_first|shard_first] [--check] [--out FILE]

Every rank builds the same model (one seed), quantizes it (``qcompile.quantize``; W4A16 in
groups of ``--group-size``), shards it with ``qcompile.tp.shard`` (q/k/v and gate/up
column-wise, o and down row-wise with a functional all_reduce; embeddings, norms and the output
head replicated) and divides its attention modules' head counts by the world size (the model
reads them from attributes, as gpt-fast's does; gpt-fast's ``tp.py`` does the same). The
one-token decode step is compiled with ``mode="reduce-overhead"`` and ``fullgraph=True``
(CUDA graphs; the all-reduces stay with Inductor), bf16 with Inductor alone. Each rank runs
``--new`` greedy steps after three untimed ones; the time is rank 0's, between barriers.

On CUDA each rank takes ``cuda:LOCAL_RANK`` and NCCL as the image sets it (NVLink multicast
is left off); ``--device cpu`` uses gloo and is a smoke test, not a measurement. TP = 1 is
the same command with ``--nproc-per-node 1``. ``--check`` compares the first step's logits of
every rank with the unsharded eager model (which must then fit one device).

Rank 0 appends one JSON line per cell to ``benchmarks/results/bench_tp.jsonl`` (or ``--out``):
``bench, config, layers, format, batch, impl, world_size, tokens_per_s, ms_per_token,
peak_mem_gb`` (rank 0's), ``matched`` (taken over / quantized linears, every rank's) and the
provenance fields.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import commit  # noqa: E402
from llama_model import CONFIGS, Llama  # noqa: E402

import qcompile  # noqa: E402
from qcompile import tp  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "bench_tp.jsonl"
FORMATS = ("bf16", "w4a16", "w8a16", "w8a8", "nf4")
QUANTIZED = (qcompile.Int4WeightOnlyLinear, qcompile.Int8WeightOnlyLinear,
             qcompile.SmoothQuantLinear, qcompile.LookupTable4bitLinear)


def quantize(model: torch.nn.Module, fmt: str, group_size: int) -> None:
    if fmt == "w4a16":
        qcompile.quantize(model, "w4a16", group_size=group_size)
    elif fmt == "nf4":
        qcompile.quantize(model, "nf4", block_size=64)
    elif fmt != "bf16":
        qcompile.quantize(model, fmt)


def build(cfg, fmt: str, rank: int, world: int, device: str, group_size: int,
          order: str) -> Llama:
    """Rank ``rank``'s shard of the model (the same random weights on every rank)."""
    torch.manual_seed(0)
    with torch.device(device):
        model = Llama(cfg).to(torch.bfloat16).eval()
    if order == "quantize_first":
        quantize(model, fmt, group_size)
    tp.shard(model, rank, world)
    if order == "shard_first":
        quantize(model, fmt, group_size)
    for layer in model.layers:
        a = layer.attention
        if a.n_heads % world or a.n_kv_heads % world:
            raise ValueError(f"{a.n_heads} heads / {a.n_kv_heads} kv heads do not split over "
                             f"{world} ranks")
        a.n_heads, a.n_kv_heads = a.n_heads // world, a.n_kv_heads // world
    return model


def _quantized(model: torch.nn.Module) -> int:
    return sum(isinstance(m, QUANTIZED) for m in model.modules())


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@torch.no_grad()
def run_cell(cfg_name: str, cfg, fmt: str, batch: int, args, rank: int, world: int,
             device: str) -> dict:
    model = build(cfg, fmt, rank, world, device, args.group_size, args.order)
    n_quantized = _quantized(model)
    model.setup_caches(batch, args.prompt + args.new + 3)
    tokens = torch.randint(0, cfg.vocab_size, (batch, args.prompt),
                           generator=torch.Generator().manual_seed(1)).to(device)
    logits = model(tokens, torch.arange(args.prompt, device=device))  # eager prefill
    tok = logits[:, -1:].argmax(-1)
    first_tok = tok.clone()
    torch._dynamo.reset()
    backend = "inductor" if fmt == "bf16" else "qcompile"
    step = torch.compile(model, backend=backend, fullgraph=True,
                         mode="reduce-overhead" if device.startswith("cuda") else None)
    positions = torch.arange(args.prompt, args.prompt + args.new + 3, device=device)
    with qcompile.collect() as report:
        first_logits = None
        for i in range(3):  # compile and record the graphs
            out = step(tok, positions[i:i + 1])
            if i == 0:
                first_logits = out[:, -1].float().clone()
            tok = out[:, -1:].argmax(-1)
    check_err = None
    if args.check:
        torch.manual_seed(0)
        with torch.device(device):
            full = Llama(cfg).to(torch.bfloat16).eval()
        quantize(full, fmt, args.group_size)
        full.setup_caches(batch, args.prompt + args.new + 3)
        full(tokens, torch.arange(args.prompt, device=device))
        ref = full(first_tok, positions[:1])[:, -1].double()
        check_err = float((first_logits.double() - ref).norm() / ref.norm())
        del full
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    dist.barrier()
    _sync(device)
    start = time.perf_counter()
    for i in range(3, args.new + 3):
        tok = step(tok, positions[i:i + 1])[:, -1:].argmax(-1)
    _sync(device)
    dist.barrier()
    seconds = time.perf_counter() - start
    matched = [None] * world
    dist.all_gather_object(matched, f"{len(report.matched)}/{n_quantized}")
    errs = [None] * world
    dist.all_gather_object(errs, check_err)
    del step, model
    torch._dynamo.reset()
    return {
        "bench": "tp_decode", "config": cfg_name, "layers": cfg.n_layers, "format": fmt,
        "batch": batch, "impl": backend, "world_size": world,
        "tokens_per_s": round(batch * args.new / seconds, 2),
        "ms_per_token": round(1e3 * seconds / args.new, 3),
        "peak_mem_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2)
        if device.startswith("cuda") else 0.0,
        "matched": matched,
        "all_taken_over": fmt == "bf16" or all(m.split("/")[0] == m.split("/")[1] != "0"
                                               for m in matched),
        "check_rel_err": errs if args.check else None,
        "order": args.order, "group_size": args.group_size if fmt == "w4a16" else None,
        "prompt": args.prompt, "new": args.new,
        "device": torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu",
        "torch": torch.__version__, "commit": commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["torchrun", f"--nproc-per-node {world}", *sys.argv]),
    }


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="llama3-70b", choices=sorted(CONFIGS))
    p.add_argument("--layers", type=int, default=16,
                   help="layers of the config to build (the 70B shape's 80 do not fit)")
    p.add_argument("--formats", default="bf16,w4a16,w8a16,w8a8")
    p.add_argument("--batch", default="1,8")
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--order", choices=("quantize_first", "shard_first"),
                   default="quantize_first")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--check", action="store_true")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    args.formats = args.formats.split(",")
    if bad := [f for f in args.formats if f not in FORMATS]:
        p.error(f"unknown formats {bad}; choose from {FORMATS}")
    args.batch = [int(b) for b in args.batch.split(",")]
    return args


def main(argv=None) -> int:
    """One rank of the launch (``torchrun`` sets RANK, WORLD_SIZE, LOCAL_RANK and the
    rendezvous)."""
    args = parse_args(argv)
    if args.device == "cuda":
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    else:
        device = "cpu"
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = dataclasses.replace(CONFIGS[args.config], n_layers=args.layers)
    rows = []
    try:
        for batch in args.batch:
            for fmt in args.formats:
                row = run_cell(args.config, cfg, fmt, batch, args, rank, world, device)
                rows.append(row)
                if rank == 0:
                    args.out.parent.mkdir(parents=True, exist_ok=True)
                    with args.out.open("a") as f:
                        f.write(json.dumps(row) + "\n")
                    print(f"TP={world} {fmt:6s} batch {batch}: {row['tokens_per_s']:9.1f} tok/s "
                          f"({row['ms_per_token']:.2f} ms/step), taken over {row['matched']}"
                          + (f", rel err {row['check_rel_err']}" if args.check else ""),
                          flush=True)
    finally:
        dist.destroy_process_group()
    ok = all(r["all_taken_over"] for r in rows)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
