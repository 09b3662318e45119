"""Export a quantized model once, load and run it elsewhere without graph capture.

``export`` traces the model with ``torch.export``, decomposes it to core ATen, runs the
same recognition and rewrite as the backend (quantized matmuls become qcompile ops with
repacked weights), exports the rewritten module again and packages it with AOTInductor
into one ``.pt2`` file. A ``qcompile.json`` extra file in that archive records the artifact
format and the qcompile / torch versions, checked by ``load`` before anything is run.

The packaged model calls the qcompile ops through the dispatcher, so ``load`` imports
qcompile first; on CUDA those ops run the CUTLASS kernels, elsewhere the references.
"""

from __future__ import annotations

import json
import logging
import struct
import zipfile
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.fx as fx

from .lowering.report import Report
from .lowering.rewrite import rewrite_graph

log = logging.getLogger("qcompile")

FORMAT_VERSION = 3  # 2: qcompile.json as an archive extra file; ops take `config`; 3: dtype names
META_NAME = "qcompile.json"

__all__ = ["export", "load", "ArtifactError", "ExportError", "FORMAT_VERSION"]


class ArtifactError(RuntimeError):
    """A file that is not a loadable qcompile artifact (corrupt, truncated, other version)."""


class ExportError(RuntimeError):
    """AOTInductor produced a library that could not be loaded (nothing is written)."""


def elf_needed(path: str | Path) -> list[str] | None:
    """The DT_NEEDED entries (shared libraries it links) of a 64-bit little-endian ELF shared
    object; None for any other file."""
    data = Path(path).read_bytes()
    if data[:6] != b"\x7fELF\x02\x01":
        return None
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)

    def section(i: int) -> tuple[int, int, int, int]:  # type, offset, size, link
        sh_type, = struct.unpack_from("<I", data, shoff + i * shentsize + 4)
        offset, size, link = struct.unpack_from("<QQI", data, shoff + i * shentsize + 24)
        return sh_type, offset, size, link

    for i in range(shnum):
        sh_type, offset, size, link = section(i)
        if sh_type != 6:  # SHT_DYNAMIC
            continue
        _, str_off, _, _ = section(link)
        needed = []
        for e in range(offset, offset + size, 16):
            tag, val = struct.unpack_from("<qQ", data, e)
            if tag == 0:  # DT_NULL
                break
            if tag == 1:  # DT_NEEDED
                end = data.index(b"\0", str_off + val)
                needed.append(data[str_off + val:end].decode())
        return needed
    return []


def _check_cxx_runtime(files: Sequence[str]) -> None:
    # A compiler that links libstdc++ statically into shared objects (some images set CXX
    # to such a wrapper) gives the AOTInductor library its own copy of the C++ runtime.
    # Loaded into a process that already has libstdc++ (any Python with torch), the two
    # copies number std::locale facets differently and torch's runtime crashes with
    # SIGSEGV in std::regex while constructing the model (seen with torch 2.11 on an
    # H100 image). Refuse to write such an artifact, and say how to get a good one.
    for f in files:
        if not str(f).endswith(".so"):
            continue
        needed = elf_needed(f)
        if needed is None or any(n.startswith(("libstdc++", "libc++")) for n in needed):
            continue
        try:
            from torch._inductor.cpp_builder import get_cpp_compiler
            compiler = get_cpp_compiler()
        except Exception:  # the name is only for the message
            compiler = "the C++ compiler"
        raise ExportError(
            f"AOTInductor's C++ compiler ({compiler}) linked the C++ runtime statically "
            f"into {Path(f).name} (it needs no libstdc++.so): loading it in a process that "
            "has libstdc++ crashes (two copies of std::locale). Set CXX to a compiler that "
            "links libstdc++ dynamically (e.g. CXX=/usr/bin/g++, before importing torch) or "
            "torch._inductor.config.cpp.cxx = ('/usr/bin/g++',), and export again")


def _torch_minor(version: str) -> str:
    return ".".join(version.split("+")[0].split(".")[:2])


def _drop_dead_asserts(graph: fx.Graph) -> None:
    # torch.export keeps dtype assertions on intermediate values; once a dequant chain is
    # replaced they are the only users keeping it alive, so drop them with the chain.
    target = torch.ops.aten._assert_tensor_metadata.default
    changed = True
    while changed:
        changed = False
        for node in list(graph.nodes):
            if node.target is target and isinstance(node.args[0], fx.Node):
                value = node.args[0]
                if all(u.target is target for u in value.users):
                    for u in list(value.users):
                        graph.erase_node(u)
                    changed = True
        graph.eliminate_dead_code()


def rewrite_exported(model: torch.nn.Module, example_inputs: tuple, dynamic_shapes=None,
                     report: Report | None = None, fuse_linears: bool = True
                     ) -> torch.export.ExportedProgram:
    """``torch.export`` of ``model`` with its quantized matmuls rewritten to qcompile ops, by
    the backend's rewrite (``fuse_linears`` as its option of that name)."""
    from . import kernels  # noqa: F401  (registers the ops)

    report = report if report is not None else Report()
    with torch.no_grad():
        ep = torch.export.export(model, example_inputs, dynamic_shapes=dynamic_shapes)
        gm = ep.run_decompositions().module()
        rewrite_graph(gm.graph, {}, report, fuse_linears)
        _drop_dead_asserts(gm.graph)
        gm.recompile()
        report.graphs += 1
        return torch.export.export(gm, example_inputs, dynamic_shapes=dynamic_shapes)


def export(model: torch.nn.Module, example_inputs: Sequence, path: str | Path,
           dynamic_shapes=None, fuse_linears: bool = True) -> Path:
    """Export ``model`` to one AOTInductor ``.pt2`` file at ``path``; returns the path.

    Args:
        model: the (quantized) model, on the device it will run on.
        example_inputs: a tuple of example arguments.
        path: where to write the artifact (``.pt2``).
        dynamic_shapes: as for ``torch.export.export`` (e.g. a dynamic token count).
        fuse_linears: as the backend's option: quantized linears that share their input
            (q/k/v, gate/up) run as one launch. The same rewrite as ``torch.compile(model,
            backend="qcompile")`` makes, so the artifact computes what the compiled model
            does, kernel for kernel.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(example_inputs, (tuple, list)):
        raise TypeError("example_inputs must be a tuple of arguments, "
                        f"got {type(example_inputs).__name__}")
    path = Path(path)
    if path.suffix != ".pt2":
        raise ValueError(f"path must end in .pt2, got {str(path)!r}")
    from . import __version__
    from .backend import _last

    report = Report()
    ep = rewrite_exported(model, tuple(example_inputs), dynamic_shapes, report, fuse_linears)
    _last.append(report)
    log.info("export: %d of %d matmuls run as qcompile ops", len(report.matched), len(report))
    path.parent.mkdir(parents=True, exist_ok=True)
    log.info("export: compiling with AOTInductor into %s", path)
    aoti_files = torch._inductor.aot_compile(ep.module(), tuple(example_inputs),
                                             options={"aot_inductor.package": True})
    _check_cxx_runtime(aoti_files)
    meta = {"format": FORMAT_VERSION, "qcompile": __version__, "torch": torch.__version__,
            "report": report.to_dicts()}
    # One archive written by torch's own writer, our record among its extra files, so the
    # file is exactly what torch writes and reads (rather than a package with a record
    # appended by Python's zipfile).
    from torch.export.pt2_archive._package import package_pt2
    package_pt2(str(path), aoti_files=aoti_files, extra_files={META_NAME: json.dumps(meta)})
    return path


def read_metadata(path: str | Path) -> dict:
    """The ``qcompile.json`` record of an artifact; ArtifactError if there is none."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such artifact: {path}")
    try:
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()
            if bad is not None:
                raise ArtifactError(f"{path} is corrupt (bad CRC in {bad}); export it again")
            names = [n for n in zf.namelist() if n.split("/")[-1] == META_NAME]
            if not names:
                raise KeyError(META_NAME)
            return json.loads(zf.read(names[0]))
    except (zipfile.BadZipFile, EOFError, OSError) as e:
        raise ArtifactError(f"{path} is not a qcompile artifact, or is truncated or "
                            f"corrupt ({e}); export it again with qcompile.export") from e
    except KeyError as e:
        raise ArtifactError(f"{path} has no {META_NAME}: it was not written by "
                            "qcompile.export") from e


def load(path: str | Path, device_index: int = -1):
    """Load an artifact written by :func:`export`; returns a callable model.

    Raises ArtifactError if the file is corrupt or truncated, or was written by an
    incompatible qcompile artifact format or torch version.
    """
    meta = read_metadata(path)
    if meta.get("format") != FORMAT_VERSION:
        raise ArtifactError(f"{path} has artifact format {meta.get('format')}, this qcompile "
                            f"reads format {FORMAT_VERSION}: export the model again")
    if _torch_minor(meta.get("torch", "")) != _torch_minor(torch.__version__):
        raise ArtifactError(f"{path} was exported with torch {meta.get('torch')}, this is "
                            f"torch {torch.__version__}: export it again with this torch "
                            "(AOTInductor artifacts are tied to the torch version)")
    from torch._inductor import aoti_load_package

    from . import kernels  # noqa: F401  (registers the ops the package calls)
    return aoti_load_package(str(path), device_index=device_index)
