"""End-to-end decode: tokens/s of a Llama-3-8B-shaped decoder, bf16 vs quantized models.

    python benchmarks/bench_decode.py [--config llama3-8b-8l] [--formats bf16,w4a16,w8a16,w8a8]
                                      [--batch 1,8] [--prompt 512] [--new 128]

For each format and backend, in one process: build the model (random weights, bf16),
quantize it with ``qcompile.quantize`` (W4A16 g128, W8A16, W8A8), prefill the prompt
eagerly, then generate ``--new`` tokens greedily with the one-token step compiled with
``mode="reduce-overhead"`` (CUDA graphs) by the default Inductor backend ("inductor") or by
``backend="qcompile"`` (CUDA graphs too, and ``freezing_discard_parameters`` so the
repacked weights are not held twice). Records tokens/s, ms per token, peak GPU memory
during decoding (after compilation, above what earlier cells still hold) beside the model's
weight and KV-cache bytes, and compile time, one JSON line per cell in
benchmarks/results/bench_decode.jsonl.
``--device cpu --config tiny --prompt 8 --new 4`` is a smoke test, not a measurement.
"""

from __future__ import annotations

import argparse
import ast
import datetime
import gc
import importlib
import itertools
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import commit  # noqa: E402

import qcompile
from llama_model import CONFIGS, Llama

RESULTS = Path(__file__).resolve().parent / "results" / "bench_decode.jsonl"


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class HFLlama(torch.nn.Module):
    """transformers' LlamaForCausalLM with a static KV cache, called like llama_model.Llama's
    model: ``forward(tokens [B, S], input_pos [S]) -> logits``."""

    def __init__(self, cfg):
        super().__init__()
        from transformers import LlamaConfig, LlamaForCausalLM
        self.hf_config = LlamaConfig(
            vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.intermediate,
            num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
            num_key_value_heads=cfg.n_kv_heads, max_position_embeddings=cfg.max_seq_len,
            rope_theta=cfg.rope_base, rms_norm_eps=cfg.norm_eps)
        self.model = LlamaForCausalLM(self.hf_config).eval()
        self.cache = None

    def setup_caches(self, max_batch: int, max_seq: int) -> None:
        from transformers import StaticCache
        del max_batch  # the cache takes the batch of its first update
        # spare slots: with exactly max_seq, the compiled step (transformers 5.17) indexed
        # one past the cache at the last position
        self.cache = StaticCache(config=self.hf_config, max_cache_len=max_seq + 8)

    def forward(self, tokens, input_pos):
        return self.model(input_ids=tokens, past_key_values=self.cache, cache_position=input_pos,
                          use_cache=True).logits


def _kv_bytes(model) -> int:
    if isinstance(model, HFLlama):
        return sum(t.numel() * t.element_size() for layer in model.cache.layers
                   for t in (layer.keys, layer.values) if isinstance(t, torch.Tensor))
    return sum(b.numel() * b.element_size() for n, b in model.named_buffers()
               if n.endswith(("k_cache", "v_cache")))


def run_cell(model_kind: str, cfg_name: str, fmt: str, impl: str, batch: int, prompt: int,
             new: int, device: str, profile: bool = False,
             fuse_linears: bool | None = None, autotune: bool = False,
             trace: str | None = None) -> dict:
    torch.manual_seed(0)
    torch._dynamo.reset()
    # Inductor's code cache keeps the compiled modules of earlier cells, and with them the
    # constants freezing put in them (a whole quantized model): drop them so that each
    # cell's peak memory is its own.
    from torch._inductor.codecache import PyCodeCache
    PyCodeCache.cache_clear()
    gc.collect()
    cfg = CONFIGS[cfg_name]
    # what earlier cells of this process still hold (CUDA-graph pools, caches) is not this
    # cell's: its peak is measured above this baseline
    baseline = torch.cuda.memory_allocated() if device == "cuda" else 0
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    with torch.device(device):
        model = (HFLlama(cfg) if model_kind == "transformers" else Llama(cfg)).to(torch.bfloat16)
    if fmt != "bf16":
        method = {"w4a16": "w4a16", "w8a16": "w8a16", "w8a8": "w8a8"}[fmt]
        qcompile.quantize(model, method, group_size=128)
    weight_gb = sum(t.numel() * t.element_size() for t in
                    [*model.parameters(), *model.buffers()]) / 1e9
    model.setup_caches(batch, prompt + new)
    tokens = torch.randint(0, cfg.vocab_size, (batch, prompt), device=device)
    if impl == "qcompile":
        # reduce-overhead (CUDA graphs), and free the originals of the repacked weights
        options = {"triton.cudagraphs": device == "cuda", "freezing_discard_parameters": True}
        if fuse_linears is not None:  # else the backend's default
            options["fuse_linears"] = fuse_linears
        if autotune:  # qcompile times its kernel choices per GEMM (Inductor's GEMM autotuning)
            options["max_autotune_gemm"] = True
        step = torch.compile(model, backend="qcompile", fullgraph=True, options=options)
    else:
        step = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    with torch.no_grad():
        logits = model(tokens, torch.arange(prompt, device=device))
        tok = logits[:, -1:].argmax(-1)
        del logits  # the prompt's [batch, prompt, vocab] logits are not decode memory
    kv_gb = _kv_bytes(model) / 1e9
    with torch.no_grad():
        start = time.perf_counter()
        for i in range(3):  # compile, then record the CUDA graph
            pos = torch.tensor([prompt + i], device=device)
            step(tok, pos)
        _sync(device)
        compile_s = time.perf_counter() - start
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()  # steady-state decode, not compilation
        out = []
        # the positions made on the device beforehand: a tensor made from a Python number
        # in the loop is a host-to-device copy, which waits for the GPU to finish the previous
        # step, so the host's share of every step (graph launch, argmax) would idle the GPU
        positions = torch.arange(prompt, prompt + new, device=device)
        _sync(device)
        start = time.perf_counter()
        for i in range(new):
            logits = step(tok, positions[i:i + 1])
            tok = logits[:, -1:].argmax(-1)
            out.append(tok)
        _sync(device)
        seconds = time.perf_counter() - start
        if profile or trace:
            path = f"{trace}-{model_kind}-{fmt}-{impl}-bs{batch}.json" if trace else None
            _profile(step, tok, prompt + new, device, trace=path)
    report = qcompile.last_report() if impl == "qcompile" else None
    peak = (torch.cuda.max_memory_allocated() - baseline) / 1e9 if device == "cuda" else 0.0
    released_gb = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]
                      if t.numel() and not t.untyped_storage().nbytes()) / 1e9
    return {
        "bench": "decode", "model": model_kind, "config": cfg_name, "format": fmt, "batch": batch, "impl": impl,
        "tokens_per_s": round(batch * new / seconds, 2),
        "ms_per_token": round(1e3 * seconds / new, 3),
        "peak_mem_gb": round(peak, 2), "weight_gb": round(weight_gb, 3),
        "kv_cache_gb": round(kv_gb, 3), "released_gb": round(released_gb, 3),
        "compile_s": round(compile_s, 1), "baseline_gb": round(baseline / 1e9, 3),
        "matched": None if report is None else f"{len(report.matched)}/{len(report)}",
        "ops": None if report is None else _launches(report),
        **_provenance(device),
    }


def _launches(report) -> int:
    """qcompile ops in the compiled model: matched matmuls, less those fused into one launch
    (the report's kernel column says "; one launch with a, b (N=...)")."""
    groups = set()
    for r in report.matched:
        _, sep, rest = r.kernel.partition("; one launch with ")
        others = rest.rsplit(" (N=", 1)[0].split(", ") if sep else []
        groups.add(frozenset([r.node, *others]))
    return len(groups)


def _profile(step, tok, pos: int, device: str, steps: int = 8, trace: str | None = None) -> None:
    """Print the GPU kernels of a few more decode steps by total time (CUDA-graph replays
    included: CUPTI sees the kernels inside graphs); ``trace``: also write a Chrome trace."""
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=acts) as prof:
        for i in range(steps):
            step(tok, torch.tensor([pos - steps + i], device=device))
        _sync(device)
    key = "cuda_time_total" if device == "cuda" else "cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=14, max_name_column_width=60),
          flush=True)
    if trace:
        prof.export_chrome_trace(trace)


def _provenance(device: str) -> dict:
    """Where and with what a row was measured."""
    return {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
            "torch": torch.__version__, "commit": commit(),
            "date": datetime.date.today().isoformat(), "command": " ".join(sys.argv)}


def _setting(spec: str | None) -> tuple | None:
    """``MODULE.NAME=V1,V2`` -> (module, name, its current value, [V1, V2]); the module is
    imported and must already have the attribute (a misspelt name is an error, not a no-op)."""
    if spec is None:
        return None
    target, sep, values = spec.partition("=")
    module_name, _, attr = target.rpartition(".")
    if not sep or not module_name or not values:
        raise SystemExit(f"--set wants MODULE.NAME=V1,V2, got {spec!r}")
    module = importlib.import_module(module_name)
    if not hasattr(module, attr):
        raise SystemExit(f"--set: {module_name} has no attribute {attr!r}")
    return module, attr, getattr(module, attr), [ast.literal_eval(v) for v in values.split(",")]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="llama3-8b-8l", choices=sorted(CONFIGS))
    p.add_argument("--formats", default="bf16,w4a16,w8a16,w8a8")
    p.add_argument("--impls", default="inductor,qcompile")
    p.add_argument("--batch", default="1,8")
    p.add_argument("--models", default=None,
                   help="qcompile.llama (benchmarks/llama_model.py; the name results files "
                        "use) and/or transformers (default: both where transformers is installed)")
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--fuse-linears", default=None,
                   help="comma list of 0/1: qcompile cells with options={'fuse_linears': "
                        "False / True} (q/k/v, gate/up as one launch each), each value one "
                        "qcompile cell; default: the backend's default (fused)")
    p.add_argument("--autotune", default="0",
                   help="comma list of 0/1: qcompile cells without / with max_autotune_gemm "
                        "(each GEMM's kernel timed at compile time), each value one cell")
    p.add_argument("--profile", action="store_true",
                   help="print the kernels of 8 more decode steps per cell (torch.profiler)")
    p.add_argument("--trace", default=None, metavar="PREFIX",
                   help="profile as --profile and write each cell's Chrome trace to "
                        "PREFIX-<model>-<format>-<impl>-bs<batch>.json")
    p.add_argument("--decode-max-m", default=None,
                   help="comma list of token counts up to which the qcompile cells run the "
                        "decode kernel, one bound for every weight shape (each value one "
                        "qcompile cell; default: the library's own bounds)")
    p.add_argument("--set", default=None, metavar="MODULE.NAME=V1,V2",
                   help="a module-level setting of the library to compare in one process, "
                        "e.g. qcompile.kernels.mixed_gemm_decode.MAX_TOKENS=32,16: each value "
                        "(a Python literal) one qcompile cell, recorded in the row's 'set'")
    args = p.parse_args()
    if args.new < 3:  # positions prompt .. prompt + 2 compile the step and record its graph
        p.error(f"--new must be at least 3 (the first three steps compile and record the "
                f"CUDA graph), got {args.new}")
    setting = _setting(args.set)
    from qcompile.kernels import int8_gemm, mixed_gemm, mixed_gemm_sm80
    decode_max_ms = ([int(v) for v in args.decode_max_m.split(",")] if args.decode_max_m
                     else [None])  # None: the library's own bounds
    library_bounds = (mixed_gemm.DECODE_MAX_M, mixed_gemm.DECODE_WIDE_MAX_M,
                      mixed_gemm_sm80.DECODE_MAX_M, int8_gemm.DECODE_MAX_M)
    if args.models is None:
        try:
            import transformers  # noqa: F401
            args.models = "qcompile.llama,transformers"
        except ImportError:
            args.models = "qcompile.llama"
    fuse_settings = ([None] if args.fuse_linears is None
                     else [bool(int(v)) for v in args.fuse_linears.split(",")])
    rows = []
    autotunes = [bool(int(v)) for v in args.autotune.split(",")]
    values = setting[3] if setting else [None]
    for (model_kind, batch, fmt, impl, decode_max_m, fuse_linears, autotune,
         value) in itertools.product(
            args.models.split(","), [int(b) for b in args.batch.split(",")],
            args.formats.split(","), args.impls.split(","), decode_max_ms, fuse_settings,
            autotunes, values):
        if fmt == "bf16" and impl == "qcompile":
            continue  # nothing to rewrite: the same as Inductor
        if impl != "qcompile" and (decode_max_m, fuse_linears, autotune, value) != (
                decode_max_ms[0], fuse_settings[0], autotunes[0], values[0]):
            continue  # the settings only change qcompile cells
        # one bound for every family and weight shape, or the library's own
        (mixed_gemm.DECODE_MAX_M, mixed_gemm.DECODE_WIDE_MAX_M, mixed_gemm_sm80.DECODE_MAX_M,
         int8_gemm.DECODE_MAX_M) = (library_bounds if decode_max_m is None
                                    else (decode_max_m,) * 4)
        if setting:  # the library's own value for the cells it does not change
            module, attr, original, _ = setting
            setattr(module, attr, value if impl == "qcompile" else original)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        try:
            row = run_cell(model_kind, args.config, fmt, impl, batch, args.prompt, args.new,
                           args.device, args.profile, fuse_linears, autotune,
                           args.trace if not (setting and args.trace) else f"{args.trace}-{value}")
        except Exception as e:  # a cell that cannot run is recorded, with why
            row = {"bench": "decode", "model": model_kind, "config": args.config, "format": fmt,
                   "batch": batch, "impl": impl, "tokens_per_s": None, "ms_per_token": None,
                   "peak_mem_gb": None, "error": f"{type(e).__name__}: {str(e)[:200]}",
                   **_provenance(args.device)}
            print(f"{model_kind:14s} {fmt:6s} {impl:9s} bs={batch}: failed: {row['error']}",
                  flush=True)
            with args.out.open("a") as f:
                f.write(json.dumps(row) + "\n")
            continue
        if impl == "qcompile":
            row["decode_max_m"] = "default" if decode_max_m is None else decode_max_m
            row["fuse_linears"] = "default" if fuse_linears is None else fuse_linears
            row["autotune"] = autotune
            if setting:
                row["set"] = f"{args.set.split('=', 1)[0]}={value!r}"
        rows.append(row)
        with args.out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        tag = (f"{'' if decode_max_m is None else f' decode<={decode_max_m}'}"
               f"{'' if fuse_linears is None else ' fused' if fuse_linears else ' unfused'}"
               f"{' autotuned' if autotune else ''}"
               f"{' ' + row['set'] if 'set' in row else ''}"
               if impl == "qcompile" else "")
        print(f"{model_kind:14s} {fmt:6s} {impl:9s} bs={batch}{tag}: "
              f"{row['tokens_per_s']:8.1f} tok/s "
              f"{row['ms_per_token']:7.2f} ms/step  peak {row['peak_mem_gb']:5.2f} GB  "
              f"compile {row['compile_s']:5.1f}s  matched {row['matched']}", flush=True)
    base = {(r["model"], r["batch"]): r["tokens_per_s"] for r in rows if r["format"] == "bf16"}
    for r in rows:
        key = (r["model"], r["batch"])
        if key in base and r["tokens_per_s"]:
            fused = (f" fuse_linears={r['fuse_linears']} autotune={r['autotune']}"
                     f"{' ' + r['set'] if 'set' in r else ''}"
                     if "fuse_linears" in r else "")
            print(f"{r['model']:14s} {r['format']:6s} {r['impl']:9s} bs={r['batch']}{fused}: "
                  f"{r['tokens_per_s'] / base[key]:.2f}x bf16")
    return 0


if __name__ == "__main__":
    sys.exit(main())
