"""gpt-fast's decode loop, as gpt-fast writes it: tokens/s with backend="inductor" and "qcompile".

    python benchmarks/bench_gptfast.py [--config llama3-8b] [--layers 32]
        [--formats bf16,w4a16,w4a16_qc,w8a16,w8a8,nf4] [--impls inductor,qcompile] [--batch 1,8]
        [--prompt 512] [--new 128]

What a user who copied gpt-fast's generate.py runs, rather than what suits qcompile:
- gpt-fast's Inductor config lines at import (coordinate-descent tuning, unique kernel
  names, the FX graph cache);
- the *function* ``decode_one_token(model, x, input_pos)`` compiled, not the module:
  ``torch.compile(decode_one_token, mode="reduce-overhead", fullgraph=True, backend=...)``,
  no ``options`` (torch.compile takes mode or options, not both), so qcompile runs without
  ``freezing_discard_parameters`` and holds the weights twice;
- ``prefill`` eager (gpt-fast compiles it only with --compile_prefill; ``--compile-prefill``
  here does as gpt-fast, ``dynamic=True``);
- the loop of gpt-fast's decode_n_tokens: each step under ``sdpa_kernel(MATH)``, then
  ``input_pos += 1`` in place on the device tensor, the token cloned;
- ``torch.no_grad()``, the model built in bf16 on the device (random weights, seeded).
Greedy argmax stands in for gpt-fast's sampling (no multinomial: runs are reproducible).

Formats: ``bf16``; ``w4a16``: gpt-fast's int4 module (``aten._weight_int4pack_mm``, g128,
inner_k_tiles 8); ``w4a16_qc``: ``qcompile.quantize(model, "w4a16", group_size=128)``;
``w8a16``: gpt-fast's int8 module (``F.linear(x, w.to(x.dtype)) * scales``);
``w8a8``: ``qcompile.quantize(model, "w8a8")``; ``nf4``: ``qcompile.quantize(model, "nf4",
block_size=64)`` (bitsandbytes' defaults). Every linear is quantized, the output head
included (gpt-fast does so too). ``bf16`` runs with Inductor only (nothing to rewrite).

Per cell (format x batch x impl): build, quantize, setup_caches, prefill the prompt, run
``--warmup`` decode steps (compilation, then CUDA-graph warm-up and recording) inside
``qcompile.collect()`` (the matmuls the backend saw and took over), then time ``--new``
steps between ``torch.cuda.synchronize()`` calls. ``--check`` replays the warm-up steps
eagerly on the same model with the same tokens and records the largest relative error of
the compiled step's logits. One JSON line per cell in benchmarks/results/bench_gptfast.jsonl;
a table at the end, each row's tokens/s against bf16 Inductor at its batch.
``--device cpu --config tiny --prompt 8 --new 3`` is a smoke test, not a measurement.
"""

from __future__ import annotations

import torch
import torch._inductor.config

# gpt-fast's generate.py sets these at import
torch._inductor.config.coordinate_descent_tuning = True
torch._inductor.config.triton.unique_kernel_names = True
torch._inductor.config.fx_graph_cache = True

import argparse  # noqa: E402
import datetime  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gptfast_model as gm  # noqa: E402
from bench_common import commit  # noqa: E402

import qcompile  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "bench_gptfast.jsonl"
FORMATS = ("bf16", "w4a16", "w4a16_qc", "w8a16", "w8a8", "nf4")
INDUCTOR_LINES = ("coordinate_descent_tuning", "triton.unique_kernel_names", "fx_graph_cache")
MODE, FULLGRAPH = "reduce-overhead", True


def greedy(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(next token [B, 1] int32, the last position's logits [B, vocab]): greedy in place of
    gpt-fast's sample(), which returns (token, probs)."""
    last = logits[:, -1]
    return last.argmax(dim=-1, keepdim=True).to(dtype=torch.int), last


def decode_one_token(model: gm.Transformer, x: torch.Tensor, input_pos: torch.Tensor):
    # input_pos: [1]
    assert input_pos.shape[-1] == 1
    logits = model(x, input_pos)
    return greedy(logits)


def prefill(model: gm.Transformer, x: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
    # input_pos: [S]
    logits = model(x, input_pos)
    return greedy(logits)[0]


def compile_functions(impl: str, compile_prefill: bool = False):
    """gpt-fast's ``if compile:`` block, the backend named: (decode_one_token, prefill)."""
    backend = {"inductor": "inductor", "qcompile": "qcompile"}[impl]
    decode = torch.compile(decode_one_token, mode=MODE, fullgraph=FULLGRAPH, backend=backend)
    pre = (torch.compile(prefill, fullgraph=True, dynamic=True, backend=backend)
           if compile_prefill else prefill)
    return decode, pre


def decode_n_tokens(decode, model, cur_token, input_pos, num_new_tokens: int,
                    keep_logits: bool = False):
    """gpt-fast's loop: ``input_pos`` advanced in place, tokens cloned (the compiled step's
    outputs live in CUDA-graph memory that the next replay overwrites)."""
    new_tokens, new_logits = [], []
    for _ in range(num_new_tokens):
        with sdpa_kernel(SDPBackend.MATH):
            next_token, logits = decode(model, cur_token, input_pos)
        input_pos += 1
        new_tokens.append(next_token.clone())
        if keep_logits:
            new_logits.append(logits.float())  # a copy, for --check
        cur_token = next_token.clone()
    return new_tokens, new_logits, cur_token


PROFILE_STEPS = 8


def profile_steps(decode, model, cur, input_pos, path: Path, title: str, device: str):
    """Run PROFILE_STEPS decode steps under torch.profiler and append to ``path`` where a step's
    device time goes: each kernel name's total, its time per step and calls per step, longest
    first (CUDA-graph replays are traced kernel by kernel). Returns the last token."""
    from torch.profiler import ProfilerActivity, profile as torch_profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with torch_profile(activities=acts) as prof:
        _, _, cur = decode_n_tokens(decode, model, cur, input_pos, PROFILE_STEPS)
        _sync(device)
    kernels: dict[str, list[float]] = {}
    where = "CUDA" if device == "cuda" else "CPU"  # the device's own events
    for ev in prof.events():
        if ev.device_type.name != where:
            continue
        name = ev.name[:110]
        kernels.setdefault(name, []).append(ev.device_time if device == "cuda" else ev.cpu_time)
    total = sum(sum(v) for v in kernels.values())
    lines = [f"# {title}: {PROFILE_STEPS} steps, {total / PROFILE_STEPS:.1f} us of kernels "
             f"a step, {sum(len(v) for v in kernels.values()) / PROFILE_STEPS:.0f} kernels a step"]
    for name, times in sorted(kernels.items(), key=lambda kv: -sum(kv[1])):
        lines.append(f"{sum(times) / PROFILE_STEPS:9.1f} us/step {len(times) / PROFILE_STEPS:6.1f}"
                     f" calls/step {sum(times) / len(times):8.2f} us/call  {name}")
    with path.open("a") as f:
        f.write("\n".join(lines[:60]) + "\n\n")
    print("\n".join(lines[:25]), flush=True)
    return cur


def build_model(config: str, layers: int | None, fmt: str, device: str,
                seed: int = 1234) -> gm.Transformer:
    """The model in bf16 with seeded random weights, created on ``device``, quantized."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    torch.manual_seed(seed)
    with torch.device(device):
        model = gm.Transformer(gm.model_args(config, layers), dtype=torch.bfloat16).eval()
    if fmt == "w4a16":
        gm.quantize_int4(model, groupsize=128, inner_k_tiles=8)
    elif fmt == "w8a16":
        gm.quantize_int8(model)
    elif fmt == "w4a16_qc":
        qcompile.quantize(model, "w4a16", group_size=128)
    elif fmt == "w8a8":
        qcompile.quantize(model, "w8a8")
    elif fmt == "nf4":  # bitsandbytes' defaults: NF4 codes, an absmax per 64 weights
        qcompile.quantize(model, "nf4", block_size=64)
    return model


QUANTIZED = (*gm.QUANTIZED_TYPES, qcompile.Int4WeightOnlyLinear, qcompile.Int8WeightOnlyLinear,
             qcompile.SmoothQuantLinear, qcompile.LookupTable4bitLinear)


def quantized_linears(model: torch.nn.Module) -> int:
    return sum(isinstance(m, QUANTIZED) for m in model.modules())


def settings(compile_prefill: bool) -> dict:
    cfg = torch._inductor.config
    return {"inductor_config": {k: cfg.get_config_copy()[k] for k in INDUCTOR_LINES},
            "mode": MODE, "fullgraph": FULLGRAPH, "compiled": "function",
            "sdpa": "math", "sampling": "greedy",
            "prefill": "compiled (fullgraph, dynamic=True)" if compile_prefill else "eager"}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _free(device: str) -> None:
    """What earlier cells left: compiled graphs, their frozen constants, CUDA-graph pools."""
    torch._dynamo.reset()
    try:
        from torch._inductor.cudagraph_trees import reset_cudagraph_trees
        reset_cudagraph_trees()
    except ImportError:  # pragma: no cover - other torch
        pass
    from torch._inductor.codecache import PyCodeCache
    PyCodeCache.cache_clear()
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm()) if torch.isfinite(out).all() else float("inf")


@torch.no_grad()
def run_cell(config: str, layers: int | None, fmt: str, impl: str, batch: int, prompt: int,
             new: int, device: str, warmup: int = 3, compile_prefill: bool = False,
             check: bool = False, trace: dict | None = None,
             profile: Path | None = None) -> dict:
    """One measurement; returns its result row. ``trace``: if a dict, filled with the prompt,
    the prefill's token and the warm-up steps' tokens and logits (for tests). ``profile``: a
    file to write the GPU kernels of 8 more decode steps to (after the timed ones), one line
    per kernel name with its total and per-step time, longest first."""
    _free(device)
    baseline = torch.cuda.memory_allocated() if device == "cuda" else 0
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    model = build_model(config, layers, fmt, device)
    n_quantized = quantized_linears(model)
    weight_gb = sum(t.numel() * t.element_size()
                    for t in [*model.parameters(), *model.buffers()]) / 1e9
    # gpt-fast: setup_caches(max_batch_size=batch, max_seq_length=T + max_new_tokens)
    model.setup_caches(max_batch_size=batch, max_seq_length=prompt + warmup + new
                       + (PROFILE_STEPS if profile is not None else 0))
    cfg = model.config
    g = torch.Generator(device="cpu").manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (batch, prompt), generator=g).to(device)
    decode, pre = compile_functions(impl, compile_prefill)

    input_pos = torch.arange(0, prompt, device=device)
    with sdpa_kernel(SDPBackend.MATH):
        next_token = pre(model, tokens, input_pos)
    first = next_token.clone()
    input_pos = torch.tensor([prompt], device=device, dtype=torch.int)
    cur = next_token.view(batch, -1)

    with qcompile.collect() as report:
        _sync(device)
        start = time.perf_counter()
        warm_tokens, warm_logits, cur = decode_n_tokens(decode, model, cur, input_pos, warmup,
                                                        keep_logits=check or trace is not None)
        _sync(device)
        compile_s = time.perf_counter() - start
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()  # steady-state decode, not compilation
    _sync(device)
    start = time.perf_counter()
    out_tokens, _, cur = decode_n_tokens(decode, model, cur, input_pos, new)
    _sync(device)
    seconds = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated() - baseline) / 1e9 if device == "cuda" else 0.0
    if profile is not None:
        cur = profile_steps(decode, model, cur, input_pos, profile,
                            f"{fmt} {impl} batch {batch}", device)

    check_err = None
    if check or trace is not None:  # the warm-up steps again, eagerly, with the same tokens
        ref = []
        pos = torch.tensor([prompt], device=device, dtype=torch.int)
        with sdpa_kernel(SDPBackend.MATH):
            prefill(model, tokens, torch.arange(0, prompt, device=device))  # refill the cache
            x = first.view(batch, -1)
            for tok in warm_tokens:
                ref.append(decode_one_token(model, x, pos)[1].float())
                pos += 1
                x = tok
        check_err = max(_rel_err(o, r) for o, r in zip(warm_logits, ref))
        if trace is not None:
            trace.update(prompt=tokens, first=first, tokens=warm_tokens, logits=warm_logits,
                         eager_logits=ref, timed_tokens=out_tokens)

    is_qc = impl == "qcompile"
    matched = len(report.matched) if is_qc else None
    missed = [r.summary() for r in report.records if not r.matched] if is_qc else []
    for line in missed[:8]:  # what was left to Inductor, and why
        print(f"  {line}", flush=True)
    row = {
        "bench": "gptfast_decode", "config": config, "format": fmt, "batch": batch, "impl": impl,
        "tokens_per_s": round(batch * new / seconds, 2),
        "ms_per_token": round(1e3 * seconds / new, 3),
        "peak_mem_gb": round(peak, 2),
        "matched": matched, "matmuls": len(report) if is_qc else None,
        "quantized_linears": n_quantized,
        "all_taken_over": (n_quantized > 0 and matched == n_quantized) if is_qc else None,
        "graphs": report.graphs if is_qc else None,
        "layers": cfg.n_layer, "prompt": prompt, "new": new, "warmup": warmup,
        "weight_gb": round(weight_gb, 3), "compile_s": round(compile_s, 1),
        "baseline_gb": round(baseline / 1e9, 3),
        "check_rel_err": None if check_err is None else round(check_err, 5),
        "not_taken_over": missed[:8] or None,
        "settings": settings(compile_prefill),
        **_provenance(device),
    }
    del model, decode, pre, report
    _free(device)
    return row


def _provenance(device: str) -> dict:
    return {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
            "torch": torch.__version__, "commit": commit(),
            "date": datetime.date.today().isoformat(), "command": " ".join(sys.argv)}


def cells(formats, impls, batches):
    for batch in batches:
        for fmt in formats:
            for impl in impls:
                if fmt == "bf16" and impl == "qcompile":
                    continue  # nothing to rewrite: the same as Inductor
                yield fmt, impl, batch


def table(rows: list[dict]) -> str:
    base = {r["batch"]: r["tokens_per_s"] for r in rows
            if r["format"] == "bf16" and r["impl"] == "inductor" and r.get("tokens_per_s")}
    lines = [f"{'format':9s} {'batch':>5s} {'impl':9s} {'tokens/s':>9s} {'ms/step':>8s} "
             f"{'x bf16':>7s} {'matched/quantized (matmuls)':>28s}"]
    for r in rows:
        if not r.get("tokens_per_s"):
            lines.append(f"{r['format']:9s} {r['batch']:5d} {r['impl']:9s} failed: "
                         f"{r.get('error', '')[:80]}")
            continue
        ratio = f"{r['tokens_per_s'] / base[r['batch']]:.2f}x" if r["batch"] in base else "-"
        took = (f"{r['matched']}/{r['quantized_linears']} ({r['matmuls']})"
                if r["impl"] == "qcompile" else "-")
        lines.append(f"{r['format']:9s} {r['batch']:5d} {r['impl']:9s} "
                     f"{r['tokens_per_s']:9.1f} {r['ms_per_token']:8.2f} {ratio:>7s} {took:>28s}")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="llama3-8b", choices=sorted(gm.CONFIGS))
    p.add_argument("--layers", type=int, default=None,
                   help="number of layers (default: the config's; 32 for llama3-8b)")
    p.add_argument("--formats", default=",".join(FORMATS))
    p.add_argument("--impls", default="inductor,qcompile")
    p.add_argument("--batch", default="1,8")
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--warmup", type=int, default=3,
                   help="decode steps before timing (compile, CUDA-graph warm-up, recording)")
    p.add_argument("--compile-prefill", action="store_true",
                   help="compile prefill too, as gpt-fast's --compile_prefill (dynamic=True)")
    p.add_argument("--check", action="store_true",
                   help="replay the warm-up steps eagerly; record the compiled logits' largest "
                        "relative error (check_rel_err)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--profile", type=Path, default=None,
                   help="append each cell's per-kernel device time of 8 more decode steps "
                        "to this file (not a measurement: the profiler's own overhead)")
    args = p.parse_args()
    formats = args.formats.split(",")
    if bad := [f for f in formats if f not in FORMATS]:
        p.error(f"unknown formats {bad}; choose from {FORMATS}")
    impls = args.impls.split(",")
    if bad := [i for i in impls if i not in ("inductor", "qcompile")]:
        p.error(f"unknown impls {bad}; choose from inductor, qcompile")
    if args.warmup < 1 or args.new < 1:
        p.error("--warmup and --new must be at least 1")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for fmt, impl, batch in cells(formats, impls, [int(b) for b in args.batch.split(",")]):
        try:
            row = run_cell(args.config, args.layers, fmt, impl, batch, args.prompt, args.new,
                           args.device, args.warmup, args.compile_prefill, args.check,
                           profile=args.profile)
        except Exception as e:  # a cell that cannot run is recorded, with why
            row = {"bench": "gptfast_decode", "config": args.config, "format": fmt,
                   "batch": batch, "impl": impl, "tokens_per_s": None, "ms_per_token": None,
                   "peak_mem_gb": None, "layers": args.layers,
                   "error": f"{type(e).__name__}: {str(e)[:300]}",
                   "settings": settings(args.compile_prefill), **_provenance(args.device)}
            print(f"{fmt:9s} {impl:9s} bs={batch}: failed: {row['error']}", flush=True)
            _free(args.device)
        else:
            took = (f"  matched {row['matched']}/{row['quantized_linears']} quantized linears "
                    f"({row['matmuls']} matmuls)" if impl == "qcompile" else "")
            err = "" if row["check_rel_err"] is None else f"  check {row['check_rel_err']:.4f}"
            print(f"{fmt:9s} {impl:9s} bs={batch}: {row['tokens_per_s']:9.1f} tok/s "
                  f"{row['ms_per_token']:7.2f} ms/step  peak {row['peak_mem_gb']:5.2f} GB  "
                  f"compile {row['compile_s']:6.1f}s{took}{err}", flush=True)
        rows.append(row)
        with args.out.open("a") as f:
            f.write(json.dumps(row) + "\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
