"""The ``qcompile`` command line: explain, export, and prebuild kernels for quantized models.

- ``qcompile explain pkg.module:function``: ``function()`` returns ``(model, inputs)``
  (inputs a tensor or a tuple of arguments); compile with the qcompile backend, run once,
  print the match report (``--json`` for data).
- ``qcompile export pkg.module:function out.pt2 [--dynamic] [--package program|aoti]``: export the model with
  its quantized linears rewritten (see ``qcompile.export``).
- ``qcompile build --arch sm_90a [--archive kernels.tar.gz]``: compile every CUDA kernel
  configuration into the cache ahead of time (on any machine with nvcc; no GPU needed), so
  deployment machines do not compile; ``--archive`` also packs them into one file, which
  ``qcompile build --unpack kernels.tar.gz`` adds to a machine's cache without nvcc.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
import tarfile
from collections.abc import Sequence
from pathlib import Path


def _load_factory(spec: str):
    if ":" not in spec:
        raise SystemExit(f"error: expected 'module:function', got {spec!r}")
    mod_name, fn_name = spec.split(":", 1)
    sys.path.insert(0, ".")
    try:
        fn = getattr(importlib.import_module(mod_name), fn_name)
    except (ImportError, AttributeError) as e:
        raise SystemExit(f"error: cannot load {spec!r}: {e}") from e
    built = fn()
    if not (isinstance(built, tuple) and len(built) == 2):
        raise SystemExit(f"error: {spec} must return (model, inputs), got {type(built).__name__}")
    model, inputs = built
    return model, inputs if isinstance(inputs, tuple) else (inputs,)


def _explain(args) -> int:
    import qcompile
    model, inputs = _load_factory(args.factory)
    options = {"freezing": not args.no_freezing}
    report = qcompile.explain(model, *inputs, dynamic=args.dynamic or None, options=options)
    print(json.dumps(report.to_dicts(), indent=2) if args.json else report)
    return 0


def _export(args) -> int:
    import torch

    import qcompile
    model, inputs = _load_factory(args.factory)
    dynamic = None
    if args.dynamic:
        dim = torch.export.Dim("tokens", min=1, max=args.max_tokens)
        dynamic = ({0: dim},) + (None,) * (len(inputs) - 1)
    path = qcompile.export(model, inputs, args.path, dynamic_shapes=dynamic, package=args.package)
    report = qcompile.last_report()
    print(f"{path}: {len(report.matched)} of {len(report)} matmuls run as qcompile ops")
    return 0


def _build(args) -> int:
    from qcompile.kernels import (build, int8_gemm, lut_gemm, mixed_gemm, mixed_gemm_decode,
                                  mixed_gemm_sm80)
    if args.unpack:
        try:
            paths = build.unpack_archive(Path(args.unpack))
        except (build.KernelBuildError, OSError, tarfile.TarError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        print(f"{len(paths)} kernels from {args.unpack} in {build.cache_dir()}")
        return 0
    specs = [int8_gemm.kernel_spec(c, d) for c in int8_gemm.available_configs(args.arch)
             for d in int8_gemm._OUT_DTYPES]
    specs += [int8_gemm.decode_spec(d) for d in int8_gemm._OUT_DTYPES]
    if args.arch == "sm_90a":
        specs += [build.KernelSpec(mixed_gemm.SOURCE, c.defines(), "sm_90a")
                  for c in mixed_gemm.CONFIGS]
        specs += [mixed_gemm_decode.kernel_spec(b)
                  for b in mixed_gemm_decode.builds(mixed_gemm_decode.LAYOUT_SM90)]
    elif args.arch == "sm_80":
        specs += [mixed_gemm_sm80.kernel_spec(c) for c in mixed_gemm_sm80.CONFIGS]
        specs += [mixed_gemm_decode.kernel_spec(b)
                  for b in mixed_gemm_decode.builds(mixed_gemm_decode.LAYOUT_SM80_V2)]
    if args.arch in ("sm_90a", "sm_80"):  # the lookup-table kernels run on both
        specs += [mixed_gemm_decode.kernel_spec(b) for b in lut_gemm.builds()]
    if args.arch == "sm_90a":  # and the lookup-table GEMM of GEMM_TABLES, Hopper only
        import torch

        from qcompile.kernels import GEMM_TABLES
        from qcompile.lowering.lookup_table import code_table
        specs += [spec for name in GEMM_TABLES for act in (torch.bfloat16, torch.float16)
                  for spec in lut_gemm.gemm_specs(code_table(name), act)]
    if not specs:
        print(f"error: no kernels for arch {args.arch!r} (sm_90a or sm_80)", file=sys.stderr)
        return 2
    try:
        paths = build.build_many(specs, max_workers=args.jobs)
    except build.KernelBuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{len(paths)} kernels for {args.arch} in {build.cache_dir()}")
    if args.archive:
        print(f"archived in {build.write_archive(paths, Path(args.archive))}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qcompile", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log each decision")
    sub = parser.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("explain", help="print the match report of a model")
    ex.add_argument("factory", help="module:function returning (model, inputs)")
    ex.add_argument("--dynamic", action="store_true", help="compile with dynamic shapes")
    ex.add_argument("--no-freezing", action="store_true", help="turn Inductor freezing off")
    ex.add_argument("--json", action="store_true", help="print the report as JSON")
    ex.set_defaults(run=_explain)
    xp = sub.add_parser("export", help="export a model to a .pt2 artifact (a torch.export program by default)")
    xp.add_argument("factory", help="module:function returning (model, inputs)")
    xp.add_argument("path", help="output file (.pt2)")
    xp.add_argument("--dynamic", action="store_true", help="dynamic first dim of input 0")
    xp.add_argument("--max-tokens", type=int, default=4096, help="upper bound when dynamic")
    xp.add_argument("--package", default="program", choices=["program", "aoti"],
                    help="artifact kind: a torch.export program (default) or AOTInductor")
    xp.set_defaults(run=_export)
    bd = sub.add_parser("build", help="prebuild the CUDA kernels into the cache")
    bd.add_argument("--arch", default="sm_90a", choices=["sm_90a", "sm_80"],
                    help="sm_90a (Hopper) or sm_80 (Ampere and later)")
    bd.add_argument("-j", "--jobs", type=int, default=None, help="parallel nvcc processes")
    carry = bd.add_mutually_exclusive_group()
    carry.add_argument("--archive", metavar="FILE",
                       help="also write the arch's kernels to FILE (.tar.gz) for another machine")
    carry.add_argument("--unpack", metavar="FILE",
                       help="add the kernels of an --archive FILE to this machine's cache (no build)")
    bd.set_defaults(run=_build)
    args = parser.parse_args(argv)
    if args.verbose:
        logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    elif args.command == "build":
        # a build is minutes of nvcc: show each kernel as it is compiled (on stderr, for this
        # command only: the logger is left as it was)
        kernels_log = logging.getLogger("qcompile.kernels")
        progress = logging.StreamHandler()
        progress.setFormatter(logging.Formatter("%(message)s"))
        saved = kernels_log.level, kernels_log.propagate
        kernels_log.addHandler(progress)
        kernels_log.setLevel(logging.INFO)
        kernels_log.propagate = False
        try:
            return args.run(args)
        finally:
            kernels_log.removeHandler(progress)
            kernels_log.setLevel(saved[0])
            kernels_log.propagate = saved[1]
    return args.run(args)


if __name__ == "__main__":
    raise SystemExit(main())
