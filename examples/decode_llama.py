"""Greedy decoding with a quantized Llama-style model, compiled and exported.

    python examples/decode_llama.py                    # CPU: tiny model, reference kernels
    python examples/decode_llama.py --config llama3-8b-8l --format w4a16 --new 64   # GPU

Quantizes a randomly initialised model (benchmarks/llama_model.py, static KV cache), prefills a prompt,
then generates tokens one step at a time with the step compiled by backend="qcompile"
(CUDA graphs on a GPU). With --export (the default) the one-token step is also exported
to a .pt2 artifact, loaded back and run from the same state: it must produce the same
tokens as the compiled model.
"""

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import torch

import qcompile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from llama_model import CONFIGS, Llama  # noqa: E402  (the project's Llama, not in the package)

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
p.add_argument("--config", default=None, choices=sorted(CONFIGS),
               help="model shape (default: llama3-8b-8l on a GPU, tiny on the CPU)")
p.add_argument("--format", default="w4a16", choices=["w4a16", "w8a16", "w8a8"])
p.add_argument("--prompt", type=int, default=16)
p.add_argument("--new", type=int, default=16)
p.add_argument("--no-export", dest="export", action="store_false")
args = p.parse_args()
device = args.device
config = args.config or ("llama3-8b-8l" if device == "cuda" else "tiny")
cfg = CONFIGS[config]

torch.manual_seed(0)
with torch.device(device):
    model = Llama(cfg).to(torch.bfloat16)
# group 128 where the model is wide enough, else per-channel-sized groups
qcompile.quantize(model, args.format, group_size=min(128, cfg.dim))
model.setup_caches(1, args.prompt + args.new + 1)
prompt = torch.randint(0, cfg.vocab_size, (1, args.prompt), device=device)


def generate(step, tok: torch.Tensor, n: int) -> tuple[list[int], float]:
    out = []
    # positions made on the device up front, tokens read back once at the end: a transfer
    # in the loop would wait for the GPU each step and leave it idle during the host's work
    positions = torch.arange(args.prompt, args.prompt + n, device=device)
    start = time.perf_counter()
    with torch.no_grad():
        for i in range(n):
            tok = step(tok, positions[i:i + 1])[:, -1:].argmax(-1)
            out.append(tok)
        out = torch.cat(out, dim=1)[0].tolist()
    return out, time.perf_counter() - start


with torch.no_grad():
    first = model(prompt, torch.arange(args.prompt, device=device))[:, -1:].argmax(-1)
snapshot = copy.deepcopy(model) if args.export else None  # the state after the prompt

mode = "reduce-overhead" if device == "cuda" else None
step = torch.compile(model, backend="qcompile", mode=mode, fullgraph=True)
generate(step, first, 3)  # compile, warm up and record the CUDA graph outside the timing
report = qcompile.last_report()
print(report)
for layer, saved in zip(model.layers, snapshot.layers if snapshot else []):
    layer.attention.k_cache.copy_(saved.attention.k_cache)  # back to the state after prefill
    layer.attention.v_cache.copy_(saved.attention.v_cache)
tokens, seconds = generate(step, first, args.new)
print(f"{config} {args.format} on {device}: {len(report.matched)}/{len(report)} matmuls on "
      f"qcompile ops; {args.new / seconds:.1f} tokens/s; tokens {tokens}")

if args.export:
    path = Path(tempfile.mkdtemp()) / "llama_step.pt2"
    example = (first, torch.tensor([args.prompt], device=device))
    start = time.perf_counter()
    qcompile.export(snapshot, example, path)
    exported = qcompile.last_report()
    print(f"exported the decode step to {path} ({path.stat().st_size / 1e6:.1f} MB) in "
          f"{time.perf_counter() - start:.0f} s: {len(exported.matched)}/{len(exported)} matmuls "
          "on qcompile ops")
    loaded = qcompile.load(path)
    exported_tokens, _ = generate(loaded, first, args.new)
    same = exported_tokens == tokens
    print(f"loaded artifact, same {args.new} greedy tokens as the compiled model: {same}")
    if not same:
        print(f"  exported: {exported_tokens}", file=sys.stderr)
        sys.exit(1)
