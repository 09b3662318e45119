"""Export round trip of a decode step: the loaded artifact beside the compiled model.

    python benchmarks/bench_export.py [--config llama3-8b-8l] [--formats w4a16,w8a16,w8a8]
                                      [--package program] [--batch 1] [--prompt 512] [--new 128]
                                      [--reps 3] [--out benchmarks/results/bench_export.jsonl]

For each format, two fresh processes (this script again, ``--role``):

1. ``compiled``: build the Llama-style model (random weights, bf16), quantize it
   (W4A16 g128, W8A16, W8A8), prefill the prompt eagerly, export the one-token decode step
   from that state with ``qcompile.export`` (its KV cache holds the prompt), then compile
   the model with ``backend="qcompile"`` and ``mode="reduce-overhead"`` (CUDA graphs),
   as examples/decode_llama.py does, and generate ``--new`` tokens greedily.
2. ``loaded``: ``qcompile.load`` the artifact with ``mode="reduce-overhead"`` (no model code)
   and generate from the same state.

Both time the same loop (positions made on the device beforehand, tokens read back at the
end; ``--reps`` timed runs from the prefill state, the KV cache restored in place between
them, median), after three untimed steps that compile and record the CUDA graphs. Records
one JSON line each (impl ``qcompile`` and ``qcompile-export-<package>``) with tokens/s, the
loaded/compiled ratio and whether the tokens are the same, and exits 1 if they differ or
the loaded artifact is more than ``--tolerance`` (5%) slower.

``--deterministic`` runs both processes with Inductor's deterministic mode
(``torch._inductor.config.deterministic``: no reduction launch configuration picked by
timing, whose summation order two processes could pick differently). The rows say which mode
ran (``inductor_deterministic``). (On the H100 a W8A8 step gave a different token at step
109 with it as without it: the difference comes from elsewhere.)
``--device cpu --config tiny --prompt 8 --new 4 --reps 1`` is a smoke test, not a
measurement.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import commit  # noqa: E402

import qcompile  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "bench_export.jsonl"


def _configs() -> dict:
    from llama_model import CONFIGS, LlamaConfig
    # a small model whose attention the Triton decode kernel takes (head_dim 64): for tests
    small = LlamaConfig(vocab_size=1024, dim=512, n_layers=2, n_heads=8, n_kv_heads=2,
                        intermediate=1024, max_seq_len=512)
    return {**CONFIGS, "small": small}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _caches(module) -> dict[str, torch.Tensor]:
    return {n: b for n, b in module.named_buffers() if n.endswith(("k_cache", "v_cache"))}


def _generate(step, first: torch.Tensor, caches: dict, saved: dict, args) -> tuple[list, float]:
    """Greedy tokens from the prefill state (caches restored in place first), and seconds."""
    for name, cache in caches.items():
        cache.copy_(saved[name])
    positions = torch.arange(args.prompt, args.prompt + args.new, device=args.device)
    out, tok = [], first
    _sync(args.device)
    start = time.perf_counter()
    with torch.no_grad():
        for i in range(args.new):
            tok = step(tok, positions[i:i + 1])[:, -1:].argmax(-1)
            out.append(tok)
        tokens = torch.cat(out, dim=1).tolist()  # reads back: waits for the GPU
    return tokens, time.perf_counter() - start


def _measure(step, first: torch.Tensor, caches: dict, args) -> dict:
    saved = {n: c.clone() for n, c in caches.items()}
    start = time.perf_counter()
    with torch.no_grad():  # compile, then record the CUDA graphs, outside the timing
        tok = first
        for i in range(3):
            tok = step(tok, torch.tensor([args.prompt + i], device=args.device))[:, -1:].argmax(-1)
    _sync(args.device)
    compile_s = time.perf_counter() - start
    runs = [_generate(step, first, caches, saved, args) for _ in range(args.reps)]
    seconds = statistics.median(s for _, s in runs)
    return {"tokens": runs[0][0], "same_each_rep": all(t == runs[0][0] for t, _ in runs),
            "tokens_per_s": round(args.batch * args.new / seconds, 2),
            "ms_per_token": round(1e3 * seconds / args.new, 3), "compile_s": round(compile_s, 1)}


def role_compiled(args) -> dict:
    from llama_model import Llama

    cfg = _configs()[args.config]
    torch.manual_seed(0)
    with torch.device(args.device):
        model = Llama(cfg).to(torch.bfloat16)
    qcompile.quantize(model, args.format, group_size=min(128, cfg.dim))
    model.setup_caches(args.batch, args.prompt + args.new + 3)
    prompt = torch.randint(0, cfg.vocab_size, (args.batch, args.prompt), device=args.device)
    with torch.no_grad():
        first = model(prompt, torch.arange(args.prompt, device=args.device))[:, -1:].argmax(-1)
    # the decode step from the state after the prompt, static shapes: the decode kernels'
    # fusions need the token count at export, as the compiled model has it
    start = time.perf_counter()
    qcompile.export(model, (first, torch.tensor([args.prompt], device=args.device)), args.path,
                    package=args.package)
    export_s = time.perf_counter() - start
    report = qcompile.last_report()
    mode = "reduce-overhead" if args.device == "cuda" else None
    step = torch.compile(model, backend="qcompile", mode=mode, fullgraph=True)
    result = _measure(step, first, _caches(model), args)
    return {**result, "first": first.tolist(), "export_s": round(export_s, 1),
            "matched": f"{len(report.matched)}/{len(report)}",
            "artifact_mb": round(Path(args.path).stat().st_size / 1e6, 1)}


def role_loaded(args) -> dict:
    # the model's own op (its decode attention, a Triton op of this folder) must be registered
    # before load, as for any exported program that calls it; no model code is imported
    import decode_attention  # noqa: F401
    start = time.perf_counter()
    mode = "reduce-overhead" if args.device == "cuda" else None
    step = qcompile.load(args.path, mode=mode)
    load_s = time.perf_counter() - start
    first = torch.tensor(json.loads(args.first), device=args.device)
    return {**_measure(step, first, _caches(step), args), "load_s": round(load_s, 1)}


def _child(args, role: str, path: Path, extra: list[str]) -> dict:
    out = path.with_suffix(f".{role}.json")
    cmd = [sys.executable, __file__, "--role", role, "--path", str(path), "--json", str(out),
           "--device", args.device, "--config", args.config, "--format", args.format,
           "--package", args.package, "--batch", str(args.batch), "--prompt", str(args.prompt),
           "--new", str(args.new), "--reps", str(args.reps),
           *(["--deterministic"] if args.deterministic else []), *extra]
    print("+", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True)
    return json.loads(out.read_text())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--config", default=None, help="llama_model config, or 'small' "
                   "(default: llama3-8b-8l on a GPU, tiny on the CPU)")
    p.add_argument("--formats", default="w4a16,w8a16,w8a8")
    p.add_argument("--package", default=None, choices=["program", "aoti"],
                   help="artifact kind (default: qcompile.export's)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--tolerance", type=float, default=0.05,
                   help="how much slower than the compiled model the loaded artifact may be")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--keep", type=Path, default=None, help="folder to keep the artifacts in")
    p.add_argument("--deterministic", action="store_true",
                   help="both processes in Inductor's deterministic mode (no timing-picked "
                        "reduction configurations: the same bits in both)")
    # one process's part (internal)
    p.add_argument("--role", choices=["compiled", "loaded"], help=argparse.SUPPRESS)
    p.add_argument("--format", help=argparse.SUPPRESS)
    p.add_argument("--path", help=argparse.SUPPRESS)
    p.add_argument("--json", help=argparse.SUPPRESS)
    p.add_argument("--first", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.config = args.config or ("llama3-8b-8l" if args.device == "cuda" else "tiny")
    if args.package is None:
        from qcompile.export import DEFAULT_PACKAGE
        args.package = DEFAULT_PACKAGE

    if args.role:
        if args.deterministic:
            torch._inductor.config.deterministic = True
        result = (role_compiled if args.role == "compiled" else role_loaded)(args)
        Path(args.json).write_text(json.dumps(result))
        return 0

    folder = args.keep or Path(tempfile.mkdtemp(prefix="bench_export-"))
    folder.mkdir(parents=True, exist_ok=True)
    provenance = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
                  "torch": torch.__version__, "commit": commit(),
                  "date": datetime.date.today().isoformat(), "command": " ".join(sys.argv)}
    failed = False
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for fmt in args.formats.split(","):
        args.format = fmt
        path = folder / f"{args.config}-{fmt}-{args.package}.pt2"
        compiled = _child(args, "compiled", path, [])
        loaded = _child(args, "loaded", path, ["--first", json.dumps(compiled["first"])])
        same = loaded["tokens"] == compiled["tokens"]
        ratio = loaded["tokens_per_s"] / compiled["tokens_per_s"]
        ok = same and ratio >= 1 - args.tolerance
        failed |= not ok
        base = {"bench": "export", "model": "qcompile.llama", "config": args.config,
                "format": fmt, "batch": args.batch, "prompt": args.prompt, "new": args.new,
                "reps": args.reps, "inductor_deterministic": args.deterministic}
        rows = [
            {**base, "impl": "qcompile", **{k: compiled[k] for k in (
                "tokens_per_s", "ms_per_token", "compile_s", "export_s", "matched",
                "artifact_mb")}, "same_each_rep": compiled["same_each_rep"], **provenance},
            {**base, "impl": f"qcompile-export-{args.package}", **{k: loaded[k] for k in (
                "tokens_per_s", "ms_per_token", "compile_s", "load_s")},
             "same_each_rep": loaded["same_each_rep"], "same_tokens": same,
             "ratio_vs_compiled": round(ratio, 4), **provenance},
        ]
        with args.out.open("a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        print(f"{args.config} {fmt} batch {args.batch}: compiled {compiled['tokens_per_s']:.1f} "
              f"tok/s, loaded {args.package} artifact {loaded['tokens_per_s']:.1f} tok/s "
              f"({ratio:.3f}x), same {args.new} tokens: {same} -> {'ok' if ok else 'FAIL'}",
              flush=True)
        if not same:
            a, b = compiled["tokens"][0], loaded["tokens"][0]
            step = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
            print(f"  first different token at step {step}\n  compiled: {compiled['tokens']}\n"
                  f"  loaded:   {loaded['tokens']}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
