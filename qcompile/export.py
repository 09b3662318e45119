"""Export a quantized model once, load and run it elsewhere without the model's code.

``export`` traces the model with ``torch.export``, decomposes it to core ATen, runs the
same recognition and rewrite as the backend (quantized matmuls become qcompile ops with
repacked weights) and exports the rewritten module again. It writes one ``.pt2`` file of
one of two kinds (``package=``):

- ``"program"`` (the default): the rewritten ``ExportedProgram`` saved with
  ``torch.export.save`` -- the qcompile ops in the graph, the repacked weights and scales as
  its constants. ``load`` reads it with ``torch.export.load`` and, by default, compiles it
  with Inductor through the qcompile backend's settings (freezing, combo kernels, CUDA graphs
  of a step that writes its KV cache), so the Triton fusions around the qcompile ops come
  back; ``compile=False`` runs the graph through the dispatcher as it is. It needs no
  AOTInductor loader, so it loads wherever qcompile imports: CPU and CUDA, any torch
  qcompile supports (2.11-2.13; the minor version it was exported with).
- ``"aoti"``: the rewritten program compiled ahead of time by AOTInductor and packaged into
  a ``.pt2`` file; nothing is compiled on load. Its loader segfaults on the H100 image's
  torch 2.11 (any package, a plain ``nn.Linear`` included), so it is for CPU deployments.

Either way a ``qcompile.json`` extra file in the archive records the artifact format, the
package kind, the qcompile and torch versions and the target (CPU, or the GPU architecture
the weights were repacked for), checked by ``load`` before anything is run. The graph
calls the qcompile ops through the dispatcher, so ``load`` imports qcompile's op
definitions first; on CUDA those ops run the CUTLASS kernels, elsewhere the references.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import re
import shutil
import struct
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path
from unittest import mock

import torch
import torch.fx as fx

from . import _compat
from .lowering.report import MatchRecord, Report
from .lowering.rewrite import MATMULS, rewrite_graph

log = logging.getLogger("qcompile")

# 2: qcompile.json as an archive extra file; ops take `config`; 3: dtype names;
# 4: two package kinds ("package"), the target device / GPU architecture, qcompile version checked
FORMAT_VERSION = 4
META_NAME = "qcompile.json"
PACKAGES = ("program", "aoti")
DEFAULT_PACKAGE = "program"  # the kind that loads on every machine qcompile runs on

__all__ = ["export", "load", "read_metadata", "ArtifactError", "ExportError", "FORMAT_VERSION",
           "PACKAGES", "DEFAULT_PACKAGE"]


class ArtifactError(RuntimeError):
    """A file that is not a loadable qcompile artifact here (corrupt, truncated, another
    format, qcompile or torch version, made for another GPU architecture); nothing was run."""


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


def _drop_unread_state(gm: fx.GraphModule) -> list[str]:
    """Delete the parameters and buffers that no node of ``gm`` reads any more -- the quantized
    weights whose matmuls now read packed copies (fused q/k/v, gate/up: every one of them) --
    so that the program exported from ``gm`` neither saves nor loads them (they doubled those
    layers' bytes in the file and in the loaded module). Returns the names dropped."""
    read = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    state = [*gm.named_parameters(remove_duplicate=False), *gm.named_buffers(remove_duplicate=False)]
    dropped = []
    for name, _ in state:
        if name in read:
            continue
        owner, _, attr = name.rpartition(".")
        delattr(gm.get_submodule(owner) if owner else gm, attr)
        dropped.append(name)
    return dropped


def _decompositions(ep: torch.export.ExportedProgram) -> dict:
    """The table for ``ep.run_decompositions``: the backend's own (Inductor's, with matmuls
    that read a quantized weight kept whole; ``lowering.decompositions``), so that the program
    holds the graph the compile path's rewrite sees and a loaded program decomposes nothing
    differently from the compiled model. With core ATen's table silu was ``x * sigmoid(x)``
    in the program and ``x / (1 + exp(-x))`` in the compiled model: a W8A8 step's activation
    quantization then rounded an element differently now and then, and the generated tokens
    parted after about a hundred. scaled_dot_product_attention stays whole, as Inductor keeps
    it for its fused attention kernels (decomposed, a loaded program ran attention as bmm +
    softmax, markedly slower; docs/design.md)."""
    from torch.export.graph_signature import InputKind

    from .lowering.decompositions import decomposition_table

    constant = [spec.kind != InputKind.USER_INPUT for spec in ep.graph_signature.input_specs]
    table = decomposition_table(constant)
    table.pop(torch.ops.aten.scaled_dot_product_attention.default, None)
    return table


def rewrite_exported(model: torch.nn.Module, example_inputs: tuple, dynamic_shapes=None,
                     report: Report | None = None, fuse_linears: bool = True
                     ) -> torch.export.ExportedProgram:
    """``torch.export`` of ``model`` with its quantized matmuls rewritten to qcompile ops, by
    the backend's rewrite (``fuse_linears`` as its option of that name)."""
    from . import kernels  # noqa: F401  (registers the ops)

    report = report if report is not None else Report()
    with torch.no_grad():
        ep = torch.export.export(model, example_inputs, dynamic_shapes=dynamic_shapes)
        gm = ep.run_decompositions(_decompositions(ep)).module()
        rewrite_graph(gm.graph, {}, report, fuse_linears)
        _drop_dead_asserts(gm.graph)
        gm.recompile()
        _drop_unread_state(gm)
        report.graphs += 1
        return torch.export.export(gm, example_inputs, dynamic_shapes=dynamic_shapes)


def _arch(device: torch.device) -> str:
    """The GPU architecture of a CUDA device as ``sm_XY`` (what the weights were repacked for)."""
    from .kernels import device_capability
    major, minor = device_capability(device)
    return f"sm_{major}{minor}"


def _target(model: torch.nn.Module, example_inputs: Sequence) -> dict:
    """Where the exported program runs: the device of its weights and inputs, and on CUDA the
    GPU architecture whose kernel layouts the rewrite repacked the weights into."""
    tensors = [*model.parameters(), *model.buffers(),
               *(t for t in torch.utils._pytree.tree_leaves(tuple(example_inputs))
                 if isinstance(t, torch.Tensor))]
    cuda = [t.device for t in tensors if t.device.type == "cuda"]
    if not cuda:
        types = sorted({t.device.type for t in tensors}) or ["cpu"]
        return {"device": types[0]}
    device = torch.device("cuda", cuda[0].index if cuda[0].index is not None
                          else torch.cuda.current_device())
    return {"device": "cuda", "index": device.index, "arch": _arch(device),
            "name": torch.cuda.get_device_name(device)}


def export(model: torch.nn.Module, example_inputs: Sequence, path: str | Path,
           dynamic_shapes=None, fuse_linears: bool = True,
           package: str = DEFAULT_PACKAGE) -> Path:
    """Export ``model`` to one ``.pt2`` file at ``path``; returns the path.

    Args:
        model: the (quantized) model, on the device it will run on.
        example_inputs: a tuple of example arguments.
        path: where to write the artifact (``.pt2``); written whole or not at all.
        dynamic_shapes: as for ``torch.export.export`` (e.g. a dynamic batch and sequence
            length). Buffers the model writes in place (a static KV cache) stay buffers that
            the loaded model writes in place. The decode kernels' fusions (RMSNorm and skip
            connection inside the kernel) need a token count known at export and small
            (``DECODE_MAX_M``): export a decode step with static shapes for its full speed;
            with a dynamic token count it runs the fusions that hold for any count.
        fuse_linears: as the backend's option: quantized linears that share their input
            (q/k/v, gate/up) run as one launch. The same rewrite as ``torch.compile(model,
            backend="qcompile")`` makes, so the artifact computes what the compiled model
            does, kernel for kernel.
        package: which kind of artifact, chosen by what loads where:

            - ``"program"`` (default): the rewritten ``ExportedProgram`` saved by
              ``torch.export.save``; :func:`load` compiles it with Inductor on load. No
              AOTInductor loader is involved, so it loads on CPU and on CUDA with every
              torch qcompile supports (2.11-2.13): the default everywhere.
            - ``"aoti"``: compiled ahead of time by AOTInductor (no compile on load, no
              Python model code at all). AOTInductor's loader on the H100 image's torch
              2.11 segfaults for any package, so choose it only where that loader is known
              to work: CPU (tested), or a GPU torch whose AOTInductor loader you have checked.

    Both kinds load only with the same qcompile version and torch minor version, and an
    artifact made on a GPU only on a GPU of the same architecture (``sm_90`` for H100): the
    weights are repacked into that architecture's kernel layouts.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    # a torch.compile'd model: export the module it wraps (the wrapper's forward takes
    # *args, **kwargs, against which torch.export cannot match dynamic_shapes)
    if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
        model = model._orig_mod
    if not isinstance(example_inputs, (tuple, list)):
        raise TypeError("example_inputs must be a tuple of arguments, "
                        f"got {type(example_inputs).__name__}")
    if package not in PACKAGES:
        raise ValueError(f"package must be one of {PACKAGES}, got {package!r}")
    path = Path(path)
    if path.suffix != ".pt2":
        raise ValueError(f"path must end in .pt2, got {str(path)!r}")
    from . import __version__
    from .backend import _last

    report = Report()
    target = _target(model, example_inputs)
    ep = rewrite_exported(model, tuple(example_inputs), dynamic_shapes, report, fuse_linears)
    _last.append(report)
    log.info("export: %d of %d matmuls run as qcompile ops", len(report.matched), len(report))
    meta = {"format": FORMAT_VERSION, "package": package, "qcompile": __version__,
            "torch": torch.__version__, "target": target, "report": report.to_dicts()}
    path.parent.mkdir(parents=True, exist_ok=True)
    # Written under its own name in a scratch folder beside it, then moved into place: a
    # failed or interrupted export leaves no file (and the archive's root folder, which
    # torch names after the file, is the final name's).
    scratch = Path(tempfile.mkdtemp(prefix=".qcompile-export-", dir=path.parent))
    try:
        tmp = scratch / path.name
        if package == "aoti":
            _write_aoti(ep, tuple(example_inputs), tmp, meta)
        else:
            log.info("export: saving the program with torch.export.save into %s", path)
            torch.export.save(ep, str(tmp), extra_files={META_NAME: json.dumps(meta)})
        os.replace(tmp, path)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return path


def _write_aoti(ep: torch.export.ExportedProgram, example_inputs: tuple, path: Path,
                meta: dict) -> None:
    log.info("export: compiling with AOTInductor into %s", path)
    aoti_files = torch._inductor.aot_compile(ep.module(), example_inputs,
                                             options={"aot_inductor.package": True})
    _check_cxx_runtime(aoti_files)
    # One archive written by torch's own writer, our record among its extra files, so the
    # file is exactly what torch writes and reads (rather than a package with a record
    # appended by Python's zipfile).
    from torch.export.pt2_archive._package import package_pt2
    package_pt2(str(path), aoti_files=aoti_files, extra_files={META_NAME: json.dumps(meta)})


def _check_zip_end(path: Path) -> None:
    """BadZipFile unless the file ends with a zip's end record (torch's writers and ours add
    no comment). A truncated archive may still open: its members hold zips of their own (a
    program's sample inputs are a ``torch.save`` file) and zipfile finds the last end record
    before the cut, taking that member for the whole archive."""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() < 22:
            raise zipfile.BadZipFile("too short for a zip archive")
        f.seek(-22, os.SEEK_END)
        end = f.read(22)
    if end[:4] != b"PK\x05\x06" or end[20:22] != b"\0\0":
        raise zipfile.BadZipFile("the file does not end with a zip end record")


def read_metadata(path: str | Path) -> dict:
    """The ``qcompile.json`` record of an artifact; ArtifactError if there is none."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such artifact: {path}")
    try:
        _check_zip_end(path)
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()
            if bad is not None:
                raise ArtifactError(f"{path} is corrupt (bad CRC in {bad}); export it again")
            names = [n for n in zf.namelist() if n.split("/")[-1] == META_NAME]
            if not names:
                raise KeyError(META_NAME)
            meta = json.loads(zf.read(names[0]))
    except (zipfile.BadZipFile, EOFError, OSError) as e:
        raise ArtifactError(f"{path} is not a qcompile artifact, or is truncated or "
                            f"corrupt ({e}); export it again with qcompile.export") from e
    except KeyError as e:
        raise ArtifactError(f"{path} has no {META_NAME}: it was not written by "
                            "qcompile.export") from e
    except ValueError as e:  # JSON (UnicodeDecodeError is one too)
        raise ArtifactError(f"{path} has an unreadable {META_NAME} ({e}): export it "
                            "again") from e
    if not isinstance(meta, dict):
        raise ArtifactError(f"{path} has an unreadable {META_NAME} (not a JSON object): "
                            "export it again")
    return meta


def check_metadata(path: str | Path, meta: dict, device_index: int = -1) -> None:
    """ArtifactError unless an artifact with record ``meta`` loads and runs here."""
    from . import __version__

    fmt = meta.get("format")
    if fmt != FORMAT_VERSION:
        raise ArtifactError(f"{path} has artifact format {fmt}, this qcompile reads format "
                            f"{FORMAT_VERSION}: export the model again")
    package = meta.get("package")
    if package not in PACKAGES:
        raise ArtifactError(f"{path} is a {package!r} package; this qcompile loads "
                            f"{' and '.join(map(repr, PACKAGES))} packages: export it again")
    if meta.get("qcompile") != __version__:
        raise ArtifactError(f"{path} was exported with qcompile {meta.get('qcompile')}, this is "
                            f"qcompile {__version__}: export it again with this qcompile (the "
                            "ops and weight layouts it holds are tied to the version)")
    if _torch_minor(meta.get("torch", "")) != _torch_minor(torch.__version__):
        raise ArtifactError(f"{path} was exported with torch {meta.get('torch')}, this is "
                            f"torch {torch.__version__}: export it again with this torch "
                            "(its graph and, for AOTInductor, its compiled code are tied to "
                            "the torch version)")
    target = meta.get("target")
    if not isinstance(target, dict) or "device" not in target:
        raise ArtifactError(f"{path} does not say which device it was made for: export it again")
    if target["device"] != "cuda":
        return
    arch = target.get("arch")
    made = f"made on {target.get('name', 'a GPU')} ({arch})"
    if not torch.cuda.is_available():
        raise ArtifactError(f"{path} was {made} and runs only on a GPU of that architecture; "
                            "this machine has no CUDA GPU: export the model on the machine it "
                            "will run on")
    if device_index >= 0:
        index = device_index
    elif package == "program":  # its tensors load onto the device they were saved from
        index = target.get("index", 0)
    else:
        index = torch.cuda.current_device()
    if index >= torch.cuda.device_count():
        raise ArtifactError(f"{path} was {made} as cuda:{index}, and this machine has "
                            f"{torch.cuda.device_count()} GPU(s): load it with device_index= "
                            "one of them")
    here = _arch(torch.device("cuda", index))
    if here != arch:
        raise ArtifactError(f"{path} was {made}: its weights are repacked for {arch} kernels, "
                            f"and cuda:{index} is {torch.cuda.get_device_name(index)} ({here}): "
                            "export the model again on this GPU")


def _register_ops() -> None:
    """Import the modules that define qcompile's ops (an exported graph calls them). Ops of
    the user's own (a custom attention op, say) must be registered before ``load``, by
    importing the module that defines them, as for any torch.export program."""
    from . import kernels  # noqa: F401


def _no_rewrite(graph, constants, report, fuse_linears=False):  # noqa: ARG001
    """The graph of a loaded program holds qcompile ops already: nothing to rewrite (and the
    rewrite's "integer weights but no takeover" warning would be wrong there). The report
    lists what the program runs: its qcompile ops as matched, the matmuls export left alone
    as not (the export's own report, with its reasons, is in the file: ``read_metadata``)."""
    for node in graph.nodes:
        target = node.target
        if node.op != "call_function":
            continue
        if getattr(target, "namespace", None) == "qcompile":
            report.add(MatchRecord(node=node.name, op=str(target), matched=True,
                                   format="from the exported program", kernel=str(target)))
        elif target in MATMULS:
            report.add(MatchRecord(node=node.name, op=MATMULS[target], matched=False,
                                   reason="left to Inductor when the program was exported (the "
                                          "export's report in the file says why: read_metadata)"))


def _program_backend(gm: fx.GraphModule, example_inputs: Sequence, *, mode: str | None = None,
                     options: dict | None = None):
    """The qcompile backend for a loaded program: the same Inductor settings as a
    ``backend="qcompile"`` compile (freezing, combo kernels, the static inputs that let CUDA
    graphs record a step writing its KV cache, ``mode`` and ``options``), without running the
    rewrite again on a graph whose matmuls are qcompile ops already."""
    # the module, not the ``qcompile.backend`` attribute (the backend function itself)
    backend = importlib.import_module(".backend", __package__)
    patch = (mock.patch.object(backend, "rewrite_graph", _no_rewrite)
             if hasattr(backend, "rewrite_graph") else contextlib.nullcontext())
    with patch:
        return backend.qcompile_backend(gm, example_inputs, mode=mode, options=options)


def load(path: str | Path, device_index: int = -1, *, compile: bool = True,
         mode: str | None = None, options: dict | None = None, dynamic: bool | None = None):
    """Load an artifact written by :func:`export`; returns a callable model.

    A ``"program"`` artifact comes back as the exported graph in a module (its buffers, a KV
    cache included, are the module's: ``named_buffers()``), compiled with Inductor through
    the qcompile backend's settings (``torch.compile(..., fullgraph=True)``; ``mode``,
    ``options`` and ``dynamic`` as torch.compile's, e.g. ``mode="reduce-overhead"`` for CUDA
    graphs) unless ``compile=False``, which runs it through the dispatcher as it is. The
    compile happens on the first call. An ``"aoti"`` artifact comes back as AOTInductor's
    runner (``compile``, ``mode``, ``options`` and ``dynamic`` do not apply).

    ``device_index``: the CUDA device to run on (-1: for a program, the one it was exported
    on; for AOTInductor, the current one).

    Raises ArtifactError, having run nothing, if the file is corrupt or truncated, or was
    written by another artifact format, qcompile version or torch version, or for another
    GPU architecture (or a GPU on a machine without one).
    """
    meta = read_metadata(path)
    check_metadata(path, meta, device_index)
    _register_ops()  # the ops the graph calls
    if meta["package"] == "aoti":
        from torch._inductor import aoti_load_package
        return aoti_load_package(str(path), device_index=device_index)
    try:
        ep = torch.export.load(str(path))
    except Exception as e:  # an op not registered here, or a damaged archive
        missing = unregistered_ops(path)
        if missing:
            raise ArtifactError(
                f"{path} calls ops that are not registered in this process: "
                f"{', '.join(missing)}; import the module that defines them before load") from e
        raise ArtifactError(f"{path} could not be read as an exported program "
                            f"({type(e).__name__}: {_first_line(e)}); export it again") from e
    target = meta["target"]
    if target["device"] == "cuda" and device_index >= 0 and device_index != target.get("index"):
        ep = _compat.move_program(ep, {f"cuda:{target.get('index')}": f"cuda:{device_index}"})
    module = ep.module()
    if not compile:
        return module
    compiled = torch.compile(module, backend=_program_backend, mode=mode, options=options,
                             dynamic=dynamic, fullgraph=True)
    check = _argument_check(ep)
    if check is not None:  # before Dynamo traces the call, whose messages are about tracing
        compiled.register_forward_pre_hook(check, with_kwargs=True)
    return compiled


def _finite(bound) -> int | None:
    """A dynamic dimension's bound as an int, None where unbounded (int_oo)."""
    try:
        return int(bound)
    except (TypeError, ValueError, OverflowError, AttributeError):
        return None


def _argument_check(ep: torch.export.ExportedProgram):
    """A forward pre-hook checking a call's arguments against the program's signature where
    it is positional tensors only (the usual one): their count, dtypes, ranks and sizes
    (static, or a dynamic dimension's upper bound). Called wrong, the compiled program raised
    from inside Dynamo's tracing ("Attempt to trace generator", a fake tensor error) instead of
    saying which argument is wrong. None for other signatures."""
    from torch.export.graph_signature import InputKind
    from torch.utils import _pytree as pytree

    names = [s.arg.name for s in ep.graph_signature.input_specs if s.kind == InputKind.USER_INPUT]
    vals = {n.name: n.meta.get("val") for n in ep.graph.nodes if n.op == "placeholder"}
    if ep.call_spec.in_spec != pytree.tree_structure((tuple(range(len(names))), {})) or \
            not all(isinstance(vals.get(n), torch.Tensor) for n in names):
        return None
    # (dtype, [(low, high) a dimension]): a static size is (size, size), a dynamic one
    # (0, upper bound or None) -- only the upper: export records a lower bound of 2 for the
    # dimensions it did not specialize to 0 or 1, yet the program runs them at 1
    wanted = []
    for name in names:
        dims = []
        for size in vals[name].shape:
            if isinstance(size, int):
                dims.append((size, size))
            else:
                bound = ep.range_constraints.get(size.node.expr)
                dims.append((0, None if bound is None else _finite(bound.upper)))
        wanted.append((vals[name].dtype, dims))

    def describe(i):
        dtype, dims = wanted[i]
        shown = [str(lo) if lo == hi else "any" if hi is None else f"<={hi}" for lo, hi in dims]
        return f"argument {i} must be a {str(dtype).removeprefix('torch.')} tensor [{', '.join(shown)}]"

    def check(module, args, kwargs):  # noqa: ARG001
        if kwargs or len(args) != len(wanted):
            given = f"{len(args)}" + (f" and keywords {sorted(kwargs)}" if kwargs else "")
            raise TypeError(f"the loaded program takes {len(wanted)} positional tensor "
                            f"argument(s), got {given}")
        for i, (a, (dtype, dims)) in enumerate(zip(args, wanted)):
            if not isinstance(a, torch.Tensor):
                raise TypeError(f"{describe(i)}, got {type(a).__name__}")
            if a.dtype != dtype or a.dim() != len(dims) or any(
                    n < lo or (hi is not None and n > hi) for n, (lo, hi) in zip(a.shape, dims)):
                raise ValueError(f"{describe(i)}, got {str(a.dtype).removeprefix('torch.')} "
                                 f"{list(a.shape)}")

    return check


_OP_NAME = re.compile(r"torch\.ops\.([A-Za-z_]\w*)\.([A-Za-z_]\w*)")


def unregistered_ops(path: str | Path) -> list[str]:
    """``namespace::op`` of every op the program in the artifact names (in its serialized
    graphs) that this process has not registered: the usual reason a program cannot be read
    back (a custom op whose module was not imported)."""
    found = set()
    with zipfile.ZipFile(path) as zf:
        for name in zf.namelist():
            if name.endswith(".json") and not name.endswith(META_NAME):
                text = zf.read(name).decode("utf-8", errors="replace")
                found.update(_OP_NAME.findall(text))
    missing = []
    for ns, op in sorted(found):
        try:
            getattr(getattr(torch.ops, ns), op)
        except (AttributeError, RuntimeError):
            missing.append(f"{ns}::{op}")
    return missing


def _first_line(e: Exception) -> str:
    lines = str(e).strip().splitlines()
    return lines[0][:300] if lines else ""
