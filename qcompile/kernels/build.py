"""Build and cache qcompile's CUDA sources as shared libraries loaded through ctypes.

Each source in ``qcompile/kernels/csrc`` is a template filled only by ``-D`` defines; a
:class:`KernelSpec` names a source, its defines and the target architecture. Libraries are
compiled by ``nvcc`` against the CUTLASS headers of the installed ``nvidia-cutlass`` package
and cached on disk under ``$QCOMPILE_CACHE_DIR`` (default ``~/.cache/qcompile``), keyed by a
hash of the source text, the csrc headers it includes, the defines, the architecture and
the nvcc flags it is built with, the nvcc version and the CUTLASS version. Writes are atomic
(compile to a temporary name, then rename), so several processes may build the same cache
at once.

A cached library is found without nvcc or the CUTLASS headers: the nvcc and CUTLASS
versions that went into its key are recorded in a small index next to it (``versions.json``),
so a cache built on one machine can be carried to another that only runs the kernels:
:func:`write_archive` packs chosen libraries with that index into one file and
:func:`unpack_archive` adds them to another machine's cache (``qcompile build --archive`` /
``--unpack``).
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.metadata
import importlib.util
import io
import json
import logging
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "KernelBuildError",
    "KernelSpec",
    "build_many",
    "cache_dir",
    "csrc_dir",
    "cutlass_include_dirs",
    "find_nvcc",
    "load",
    "load_checked",
    "unpack_archive",
    "write_archive",
]

log = logging.getLogger("qcompile.kernels")

CSRC_DIR = Path(__file__).resolve().parent / "csrc"

NVCC_FLAGS = (
    "-O3",
    "-std=c++17",
    "--expt-relaxed-constexpr",
    "-shared",
    "-Xcompiler",
    "-fPIC",
    "-cudart",
    "shared",
    "-DNDEBUG",
)

# arch name -> -gencode flags. sm_90a is needed for wgmma / setmaxnreg (CUTLASS 3.x Hopper).
# "sm_80" code also gets Hopper machine code built from the same compute_80 PTX: a cubin
# runs only on its own major version, so without it the Ampere kernels could not run on an
# H100 without a slow JIT of the PTX at load time.
_GENCODE = {
    "sm_80": ("-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_80,code=sm_90"),
    "sm_86": ("-gencode=arch=compute_86,code=sm_86",),
    "sm_89": ("-gencode=arch=compute_89,code=sm_89",),
    "sm_90": ("-gencode=arch=compute_90,code=sm_90",),
    "sm_90a": ("-gencode=arch=compute_90a,code=sm_90a",),
}


class KernelBuildError(RuntimeError):
    """A kernel library could not be built or loaded (missing nvcc / CUTLASS, compile error)."""


@dataclass(frozen=True)
class KernelSpec:
    """One library to build: a csrc file, its -D defines and the target architecture."""

    source: str
    defines: Mapping[str, int | str] = field(default_factory=dict)
    arch: str = "sm_90a"

    def __hash__(self) -> int:
        return hash((self.source, tuple(sorted((k, str(v)) for k, v in self.defines.items())), self.arch))

    def define_flags(self) -> list[str]:
        return [f"-D{k}={v}" for k, v in sorted(self.defines.items())]

    def describe(self) -> str:
        return " ".join([self.source, *(f"{k}={v}" for k, v in sorted(self.defines.items())), self.arch])


def csrc_dir() -> Path:
    return CSRC_DIR


def cache_dir() -> Path:
    env = os.environ.get("QCOMPILE_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "qcompile"


def find_nvcc() -> str:
    """Path of nvcc: $CUDA_HOME/bin/nvcc (or $CUDA_PATH), else the first on PATH."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home:
            cand = Path(home) / "bin" / "nvcc"
            if cand.is_file() and os.access(cand, os.X_OK):
                return str(cand)
    found = shutil.which("nvcc")
    if found:
        return found
    raise KernelBuildError(
        "nvcc not found: install the CUDA toolkit (12.x or 13.x) and put nvcc on PATH or set CUDA_HOME"
    )


def _cutlass_package_dir() -> Path:
    # find_spec locates the package without importing it (importing cutlass_library is slow
    # and pulls in optional dependencies).
    spec = importlib.util.find_spec("cutlass_library")
    locations = list(spec.submodule_search_locations or []) if spec else []
    if not locations:
        raise KernelBuildError(
            "CUTLASS headers not found: install them with `pip install nvidia-cutlass` (4.x)"
        )
    return Path(locations[0])


def cutlass_include_dirs() -> list[Path]:
    """The include directories of the installed nvidia-cutlass package."""
    pkg = _cutlass_package_dir()
    dirs = [pkg / "source" / "include", pkg / "source" / "tools" / "util" / "include"]
    if not (dirs[0] / "cutlass" / "cutlass.h").is_file():
        raise KernelBuildError(
            f"CUTLASS headers missing under {dirs[0]}: reinstall with `pip install nvidia-cutlass`"
        )
    return dirs


def _cutlass_version() -> str | None:
    for dist in ("nvidia-cutlass", "nvidia_cutlass"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


_nvcc_version_cache: dict[str, str] = {}
_lock = threading.Lock()


def _nvcc_version(nvcc: str) -> str:
    with _lock:
        if nvcc not in _nvcc_version_cache:
            try:
                out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
            except (OSError, subprocess.CalledProcessError) as e:
                raise KernelBuildError(f"could not run {nvcc} --version: {e}") from e
            # Keep only "release X.Y": build dates and patch numbers differ between installs of
            # one release, and a library built by either runs the same.
            m = re.search(r"release \d+\.\d+", out)
            _nvcc_version_cache[nvcc] = m.group(0) if m else out.strip()
        return _nvcc_version_cache[nvcc]


def _local_headers(source: Path) -> list[Path]:
    """csrc headers included by `source`, transitively (quoted includes that exist in csrc)."""
    seen: list[Path] = []
    todo = [source]
    while todo:
        text = todo.pop().read_text()
        for name in re.findall(r'^\s*#\s*include\s+"([^"]+)"', text, flags=re.M):
            cand = CSRC_DIR / name
            if cand.is_file() and cand not in seen:
                seen.append(cand)
                todo.append(cand)
    return sorted(seen)


def _source_digest(spec: KernelSpec) -> str:
    src = CSRC_DIR / spec.source
    if not src.is_file():
        raise KernelBuildError(f"no such kernel source: {src}")
    h = hashlib.sha256()
    h.update(src.read_bytes())
    for hdr in _local_headers(src):
        h.update(hdr.name.encode())
        h.update(hdr.read_bytes())
    h.update(json.dumps(sorted((k, str(v)) for k, v in spec.defines.items())).encode())
    h.update(spec.arch.encode())
    # the flags too: a library built with other code generation must not be taken for this one
    h.update(" ".join((*NVCC_FLAGS, *_GENCODE.get(spec.arch, ()))).encode())
    return h.hexdigest()


def cache_key(spec: KernelSpec, nvcc_version: str, cutlass_version: str) -> str:
    """Hash of everything that determines the built library."""
    h = hashlib.sha256()
    for part in (_source_digest(spec), nvcc_version, cutlass_version):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:24]


def _lib_name(spec: KernelSpec, key: str) -> str:
    return f"{Path(spec.source).stem}_{spec.arch}_{key}.so"


_VERSIONS_NAME = "versions.json"  # the toolchain index, in a cache and in an archive


def _versions_file() -> Path:
    return cache_dir() / _VERSIONS_NAME


def _recorded_versions() -> list[tuple[str, str]]:
    try:
        data = json.loads(_versions_file().read_text())
        return [(d["nvcc"], d["cutlass"]) for d in data]
    except (OSError, ValueError, KeyError, TypeError):
        return []


def _record_versions(nvcc_version: str, cutlass_version: str) -> None:
    entry = (nvcc_version, cutlass_version)
    with _lock:
        known = _recorded_versions()
        if entry in known:
            return
        known.append(entry)
        _atomic_write_text(_versions_file(), json.dumps([{"nvcc": a, "cutlass": b} for a, b in known], indent=1))


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _toolchain() -> tuple[str, str, str]:
    """(nvcc path, nvcc version, cutlass version); raises KernelBuildError if either is missing."""
    nvcc = find_nvcc()
    cutlass_include_dirs()  # fail early with an install hint
    version = _cutlass_version()
    if version is None:
        # Headers present without package metadata (e.g. a source checkout): key on the header.
        version = hashlib.sha256((cutlass_include_dirs()[0] / "cutlass" / "version.h").read_bytes()).hexdigest()[:16]
    return nvcc, _nvcc_version(nvcc), version


def cached_path(spec: KernelSpec) -> Path | None:
    """A built library for `spec` in the cache, if any, without needing nvcc or CUTLASS.

    With a toolchain present, the library of its exact key, else one built by an nvcc of the
    same CUDA major version; without a toolchain, any library built from this
    source/defines/arch with a toolchain recorded in versions.json.
    """
    root = cache_dir()
    try:
        _, nvcc_v, cutlass_v = _toolchain()
    except KernelBuildError:
        candidates = _recorded_versions()
    else:
        # The exact toolchain first; then a library that another nvcc of the same CUDA major
        # version built from the same source (it runs here too, and rebuilding costs minutes).
        major = nvcc_v.split(".")[0]
        candidates = [(nvcc_v, cutlass_v)] + [
            (nv, cv) for nv, cv in _recorded_versions() if nv.split(".")[0] == major and nv != nvcc_v
        ]
    for nv, cv in candidates:
        path = root / _lib_name(spec, cache_key(spec, nv, cv))
        if path.is_file():
            return path
    return None


def _compile(spec: KernelSpec, nvcc: str, out: Path, index: int, total: int) -> None:
    if spec.arch not in _GENCODE:
        raise KernelBuildError(f"unsupported arch {spec.arch!r}; known: {sorted(_GENCODE)}")
    includes = [f"-I{d}" for d in (CSRC_DIR, *cutlass_include_dirs())]
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=out.stem + ".", suffix=".tmp.so")
    os.close(fd)
    cmd = [nvcc, *NVCC_FLAGS, *_GENCODE[spec.arch], *includes, *spec.define_flags(),
           str(CSRC_DIR / spec.source), "-o", tmp]
    log.info("compiling %d/%d: %s", index, total, spec.describe())
    start = time.monotonic()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as e:
        os.unlink(tmp)
        raise KernelBuildError(f"could not run nvcc for {spec.describe()}: {e}") from e
    if proc.returncode != 0:
        os.unlink(tmp)
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-40:])
        raise KernelBuildError(f"nvcc failed for {spec.describe()}:\n{tail}")
    os.replace(tmp, out)  # atomic: concurrent builders of one key write the same bytes
    log.info("compiled %d/%d in %.0f s: %s -> %s", index, total, time.monotonic() - start,
             spec.source, out.name)


def build_many(specs: Sequence[KernelSpec], max_workers: int | None = None) -> list[Path]:
    """Build every spec not yet cached (in parallel nvcc processes); return their paths in order.

    Raises KernelBuildError (after all builds finished) if any failed.
    """
    paths: list[Path | None] = [cached_path(s) for s in specs]
    missing = [i for i, p in enumerate(paths) if p is None]
    if not missing:
        return [p for p in paths if p is not None]
    if os.environ.get("QCOMPILE_BUILD", "1") == "0":
        names = ", ".join(f"{specs[i].source} {specs[i].defines}" for i in missing[:3])
        raise KernelBuildError(f"{len(missing)} kernel(s) not in the cache {cache_dir()} and "
                               f"QCOMPILE_BUILD=0 forbids compiling: {names}")
    nvcc, nvcc_v, cutlass_v = _toolchain()
    root = cache_dir()
    # Duplicate specs build once.
    todo: dict[Path, KernelSpec] = {}
    for i in missing:
        p = root / _lib_name(specs[i], cache_key(specs[i], nvcc_v, cutlass_v))
        paths[i] = p
        todo.setdefault(p, specs[i])
    if max_workers is None:
        max_workers = max(1, min(len(todo), os.cpu_count() or 1))
    errors: list[KernelBuildError] = []
    total = len(todo)
    # A first compile of a format builds its whole family, minutes of nvcc in which the caller
    # (torch.compile, the first call of a kernel) would otherwise say nothing: say it once, at
    # a level shown by default; each kernel's progress is logged at INFO (TORCH_LOGS=+qcompile).
    log.warning("compiling %d CUDA kernel librar%s into %s with %d nvcc process%s (about a "
                "minute each, once per machine and version; `qcompile build` prebuilds them)",
                total, "y" if total == 1 else "ies", root, min(max_workers, total),
                "" if min(max_workers, total) == 1 else "es")
    start = time.monotonic()
    with ThreadPoolExecutor(max_workers=max_workers) as pool:
        futures = [pool.submit(_compile, spec, nvcc, out, n + 1, total)
                   for n, (out, spec) in enumerate(todo.items())]
        for f in futures:
            try:
                f.result()
            except KernelBuildError as e:
                errors.append(e)
    _record_versions(nvcc_v, cutlass_v)
    if errors:
        raise KernelBuildError("\n\n".join(str(e) for e in errors))
    log.info("compiled %d kernel librar%s in %.0f s", total, "y" if total == 1 else "ies",
             time.monotonic() - start)
    return [p for p in paths if p is not None]


_loaded: dict[str, ctypes.CDLL] = {}


def load(spec: KernelSpec) -> ctypes.CDLL:
    """The library of `spec` as a ctypes.CDLL, built first if needed (cached per process)."""
    path = cached_path(spec) or build_many([spec])[0]
    with _lock:
        lib = _loaded.get(str(path))
        if lib is None:
            try:
                lib = ctypes.CDLL(str(path))
            except OSError as e:
                raise KernelBuildError(f"could not load {path}: {e}") from e
            _loaded[str(path)] = lib
        return lib


Signature = tuple[object, Sequence[object]]  # (restype, argtypes) of one ctypes function


def load_checked(spec: KernelSpec, signatures: Mapping[str, Signature],
                 info: tuple[str, Sequence[int]] | None = None) -> ctypes.CDLL:
    """``load(spec)`` with the ctypes signature of each function in ``signatures`` set, and
    with ``info = (function, expected)`` the library's description of itself (the function
    fills an int array) compared with what the caller built it for: a library that does not
    match its config raises KernelBuildError instead of computing the wrong thing."""
    lib = load(spec)
    for name, (restype, argtypes) in signatures.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, list(argtypes)
    if info is not None:
        name, expected = info
        got = (ctypes.c_int * len(expected))()
        getattr(lib, name)(got, len(expected))
        if list(got) != list(expected):
            raise KernelBuildError(f"library {spec.describe()} reports {list(got)} from {name}, "
                                   f"expected {list(expected)}")
    return lib


# --- carrying built libraries to another machine ------------------------------------------


def write_archive(paths: Sequence[Path], dest: Path) -> Path:
    """Write the cached libraries ``paths`` and the cache's toolchain index into the gzip tar
    ``dest`` (atomically: a reader never sees half a file), flat, for :func:`unpack_archive`
    on a machine that runs the kernels without building them."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    index = json.dumps([{"nvcc": a, "cutlass": b} for a, b in _recorded_versions()], indent=1)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=dest.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        with tarfile.open(tmp, "w:gz") as tar:
            for path in dict.fromkeys(Path(p) for p in paths):
                if path.parent != cache_dir() or path.suffix != ".so":
                    raise KernelBuildError(f"{path} is not a library of the cache {cache_dir()}")
                tar.add(path, arcname=path.name)
            info = tarfile.TarInfo(_VERSIONS_NAME)
            data = index.encode()
            info.size = len(data)
            tar.addfile(info, fileobj=io.BytesIO(data))
        os.chmod(tmp, 0o644)  # a file to hand on, not mkstemp's owner-only one
        os.replace(tmp, dest)
    except BaseException:
        os.unlink(tmp)
        raise
    return dest


def unpack_archive(src: Path) -> list[Path]:
    """Add the libraries of a :func:`write_archive` file to this machine's cache (each written
    atomically; one already there is kept) and its toolchains to the cache's index; return
    the libraries' paths. Anything else in the file -- a folder, a link, a name with a path,
    a file other than a library or the index -- raises KernelBuildError before anything is
    written."""
    root = cache_dir()
    with tarfile.open(src, "r:gz") as tar:
        members = tar.getmembers()
        bad = [m.name for m in members
               if not m.isfile() or "/" in m.name or m.name.startswith(".")
               or not (m.name.endswith(".so") or m.name == _VERSIONS_NAME)]
        if bad or _VERSIONS_NAME not in {m.name for m in members}:
            raise KernelBuildError(f"{src} is not a kernel archive of `qcompile build --archive`"
                                   + (f" (unexpected entries: {', '.join(bad[:3])})" if bad else
                                      f" (no {_VERSIONS_NAME})"))
        try:
            index = [(d["nvcc"], d["cutlass"]) for d in json.loads(tar.extractfile(_VERSIONS_NAME).read())]
        except (ValueError, KeyError, TypeError) as e:
            raise KernelBuildError(f"{src}: unreadable {_VERSIONS_NAME}: {e}") from e
        root.mkdir(parents=True, exist_ok=True)
        paths = []
        for m in members:
            if m.name == _VERSIONS_NAME:
                continue
            out = root / m.name
            if not out.is_file():
                fd, tmp = tempfile.mkstemp(dir=root, prefix=m.name + ".", suffix=".tmp.so")
                with os.fdopen(fd, "wb") as f:
                    shutil.copyfileobj(tar.extractfile(m), f)
                os.chmod(tmp, 0o755)
                os.replace(tmp, out)
            paths.append(out)
    for nvcc_version, cutlass_version in index:
        _record_versions(nvcc_version, cutlass_version)
    return paths
