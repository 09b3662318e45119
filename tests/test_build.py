"""CPU tests of qcompile.kernels.build: cache keys, errors, and a real nvcc build + ctypes load."""

from __future__ import annotations

import ctypes
import importlib.util
from pathlib import Path

import pytest

from qcompile.kernels import build
from qcompile.kernels.build import KernelBuildError, KernelSpec

TINY_CU = r"""
#include <cuda_runtime.h>
#include "tiny_helper.cuh"

__global__ void never_launched(int* p) { p[threadIdx.x] = QC_VALUE; }

extern "C" int qc_tiny(int a) { return helper_add(a, QC_VALUE); }

extern "C" int qc_tiny_info(int* out, int n) {
  int v[2] = {QC_VALUE, 7};
  for (int i = 0; i < n && i < 2; ++i) out[i] = v[i];
  return 2;
}
"""

TINY_HELPER = "static inline int helper_add(int a, int b) { return a + b; }\n"


@pytest.fixture
def tiny_csrc(tmp_path, monkeypatch) -> Path:
    """A csrc folder with one tiny source and the header it includes; an empty cache."""
    csrc = tmp_path / "csrc"
    csrc.mkdir()
    (csrc / "tiny.cu").write_text(TINY_CU)
    (csrc / "tiny_helper.cuh").write_text(TINY_HELPER)
    monkeypatch.setattr(build, "CSRC_DIR", csrc)
    monkeypatch.setenv("QCOMPILE_CACHE_DIR", str(tmp_path / "cache"))
    return csrc


def _key(spec: KernelSpec) -> str:
    return build.cache_key(spec, "release 13.0", "4.2.0.0")


def test_cache_key_depends_on_defines_arch_and_versions(tiny_csrc):
    a = KernelSpec("tiny.cu", {"QC_VALUE": 1}, "sm_80")
    assert _key(a) == _key(KernelSpec("tiny.cu", {"QC_VALUE": 1}, "sm_80"))
    assert _key(a) != _key(KernelSpec("tiny.cu", {"QC_VALUE": 2}, "sm_80"))
    assert _key(a) != _key(KernelSpec("tiny.cu", {"QC_VALUE": 1}, "sm_90a"))
    assert _key(a) != build.cache_key(a, "release 12.8", "4.2.0.0")
    assert _key(a) != build.cache_key(a, "release 13.0", "4.1.0")


def test_cache_key_depends_on_the_nvcc_flags(tiny_csrc, monkeypatch):
    spec = KernelSpec("tiny.cu", {"QC_VALUE": 1}, "sm_80")
    before = _key(spec)
    monkeypatch.setattr(build, "NVCC_FLAGS", build.NVCC_FLAGS + ("-lineinfo",))
    after_flags = _key(spec)
    monkeypatch.setitem(build._GENCODE, "sm_80", ("-gencode=arch=compute_80,code=sm_80",))
    assert len({before, after_flags, _key(spec)}) == 3


def test_cache_key_depends_on_source_and_included_headers(tiny_csrc):
    spec = KernelSpec("tiny.cu", {"QC_VALUE": 1}, "sm_80")
    before = _key(spec)
    (tiny_csrc / "tiny_helper.cuh").write_text(TINY_HELPER + "// changed\n")
    after_header = _key(spec)
    assert after_header != before
    (tiny_csrc / "tiny.cu").write_text(TINY_CU + "// changed\n")
    assert _key(spec) not in (before, after_header)


def test_spec_is_hashable_and_describes_itself():
    spec = KernelSpec("int8_gemm_sm90.cu", {"QC_TILE_M": 128, "QC_TILE_N": 16}, "sm_90a")
    assert hash(spec) == hash(KernelSpec("int8_gemm_sm90.cu", {"QC_TILE_N": 16, "QC_TILE_M": 128}, "sm_90a"))
    assert spec.describe() == "int8_gemm_sm90.cu QC_TILE_M=128 QC_TILE_N=16 sm_90a"
    assert spec.define_flags() == ["-DQC_TILE_M=128", "-DQC_TILE_N=16"]


def test_missing_nvcc_raises_with_install_hint(tiny_csrc, monkeypatch):
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setattr(build.shutil, "which", lambda name: None)
    with pytest.raises(KernelBuildError, match="nvcc not found"):
        build.find_nvcc()
    with pytest.raises(KernelBuildError, match="CUDA toolkit"):
        build.build_many([KernelSpec("tiny.cu", {"QC_VALUE": 1}, "sm_80")])


def test_missing_cutlass_raises_with_install_hint(monkeypatch):
    monkeypatch.setattr(build.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(KernelBuildError, match="pip install nvidia-cutlass"):
        build.cutlass_include_dirs()


def test_cuda_home_nvcc_is_preferred(tmp_path, monkeypatch):
    fake = tmp_path / "bin" / "nvcc"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CUDA_HOME", str(tmp_path))
    assert build.find_nvcc() == str(fake)


def test_unknown_source_raises(tiny_csrc):
    with pytest.raises(KernelBuildError, match="no such kernel source"):
        _key(KernelSpec("nope.cu", {}, "sm_80"))


def _have_toolchain() -> bool:
    try:
        build.find_nvcc()
    except KernelBuildError:
        return False
    return importlib.util.find_spec("cutlass_library") is not None


@pytest.mark.skipif(not _have_toolchain(), reason="needs nvcc and the nvidia-cutlass package")
def test_tiny_source_compiles_caches_and_loads(tiny_csrc, monkeypatch, caplog):
    spec = KernelSpec("tiny.cu", {"QC_VALUE": 40}, "sm_80")
    with caplog.at_level("INFO", logger="qcompile.kernels"):
        path, again = build.build_many([spec, spec])  # duplicates build once
    assert path == again
    assert path.is_file() and path.parent == build.cache_dir()
    assert any("compiling 1/1: tiny.cu QC_VALUE=40 sm_80" in r.getMessage() for r in caplog.records)
    assert not list(path.parent.glob("*.tmp*"))  # the temporary file was renamed into place

    lib = build.load(spec)  # no kernel is launched: runs on a machine without a GPU
    lib.qc_tiny.restype = ctypes.c_int
    lib.qc_tiny.argtypes = [ctypes.c_int]
    assert lib.qc_tiny(2) == 42

    # A second build is a cache hit: nothing is compiled.
    def no_compile(*args, **kwargs):
        raise AssertionError("recompiled a cached library")

    monkeypatch.setattr(build, "_compile", no_compile)
    assert build.build_many([spec]) == [path]

    # The cached library is still found where nvcc and CUTLASS are absent (a carried cache).
    def no_toolchain():
        raise KernelBuildError("no toolchain here")

    monkeypatch.setattr(build, "_toolchain", no_toolchain)
    assert build.cached_path(spec) == path


@pytest.mark.skipif(not _have_toolchain(), reason="needs nvcc and the nvidia-cutlass package")
def test_load_checked_sets_signatures_and_checks_the_library_info(tiny_csrc):
    spec = KernelSpec("tiny.cu", {"QC_VALUE": 5}, "sm_80")
    lib = build.load_checked(spec, {"qc_tiny": (ctypes.c_int, [ctypes.c_int])},
                             info=("qc_tiny_info", [5, 7]))
    assert lib.qc_tiny(2) == 7
    with pytest.raises(ctypes.ArgumentError):  # the argtypes were set
        lib.qc_tiny("two")
    # A library that describes itself otherwise than its config is refused, naming both.
    with pytest.raises(KernelBuildError, match=r"tiny.cu QC_VALUE=5 sm_80 reports \[5, 7\] "
                                               r"from qc_tiny_info, expected \[6, 7\]"):
        build.load_checked(spec, {}, info=("qc_tiny_info", [6, 7]))


@pytest.mark.skipif(not _have_toolchain(), reason="needs nvcc and the nvidia-cutlass package")
def test_compile_error_is_reported(tiny_csrc):
    (tiny_csrc / "broken.cu").write_text("this is not C++;\n")
    with pytest.raises(KernelBuildError, match="nvcc failed for broken.cu"):
        build.build_many([KernelSpec("broken.cu", {}, "sm_80")])
    assert not list(build.cache_dir().glob("*.so"))


def test_a_build_says_it_is_compiling_and_logs_each_kernel(tiny_csrc, monkeypatch, caplog):
    """Compiling takes minutes: build_many says so once at WARNING (shown by default) with how
    many libraries and where, and logs each one's progress at INFO; a cache hit says nothing."""
    specs = [KernelSpec("tiny.cu", {"QC_VALUE": v}, "sm_80") for v in (1, 2)]
    monkeypatch.setattr(build, "_toolchain", lambda: ("nvcc", "release 13.0", "4.2.0.0"))

    def fake_compile(spec, nvcc, out, index, total):
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(b"")
        build.log.info("compiled %d/%d in 0 s: %s -> %s", index, total, spec.source, out.name)

    monkeypatch.setattr(build, "_compile", fake_compile)
    with caplog.at_level("INFO", logger="qcompile.kernels"):
        build.build_many(specs, max_workers=4)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1
    assert warnings[0].startswith(f"compiling 2 CUDA kernel libraries into {build.cache_dir()} "
                                  "with 2 nvcc processes")
    infos = [r.getMessage() for r in caplog.records if r.levelname == "INFO"]
    assert any(m.startswith("compiled 2/2 in 0 s: tiny.cu") for m in infos)
    assert infos[-1].startswith("compiled 2 kernel libraries in ")
    caplog.clear()
    with caplog.at_level("INFO", logger="qcompile.kernels"):
        build.build_many(specs)  # all cached now
    assert not caplog.records


def _fake_toolchain_build(monkeypatch, specs):
    """build_many with a toolchain and nvcc faked: each library a file of its own name's bytes."""
    monkeypatch.setattr(build, "_toolchain", lambda: ("nvcc", "release 13.0", "4.2.0.0"))

    def fake_compile(spec, nvcc, out, index, total):
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(out.name.encode())

    monkeypatch.setattr(build, "_compile", fake_compile)
    return build.build_many(specs)


def test_archive_carries_libraries_to_a_cache_without_a_toolchain(tiny_csrc, tmp_path, monkeypatch):
    """write_archive packs built libraries with the toolchain index; unpack_archive on another
    cache (no nvcc, no CUTLASS there) makes cached_path find each of them, keeps what that
    cache already had (its libraries and index entries), and says how many it added."""
    specs = [KernelSpec("tiny.cu", {"QC_VALUE": v}, "sm_80") for v in (1, 2)]
    paths = _fake_toolchain_build(monkeypatch, specs)
    archive = build.write_archive(paths, tmp_path / "out" / "kernels.tar.gz")
    assert archive.is_file() and not list(archive.parent.glob("*.tmp"))
    assert archive.stat().st_mode & 0o777 == 0o644

    other = tmp_path / "other"
    other.mkdir()
    (other / "versions.json").write_text('[{"nvcc": "release 12.8", "cutlass": "3.9.0"}]')
    (other / paths[0].name).write_bytes(b"already here")
    monkeypatch.setenv("QCOMPILE_CACHE_DIR", str(other))

    def no_toolchain():
        raise KernelBuildError("no nvcc here")

    monkeypatch.setattr(build, "_toolchain", no_toolchain)
    assert build.cached_path(specs[1]) is None
    got = build.unpack_archive(archive)
    assert [p.name for p in got] == [p.name for p in paths]
    assert [build.cached_path(s) for s in specs] == [other / p.name for p in paths]
    assert (other / paths[0].name).read_bytes() == b"already here"   # kept, not overwritten
    assert (other / paths[1].name).read_bytes() == paths[1].name.encode()
    assert build._recorded_versions() == [("release 12.8", "3.9.0"), ("release 13.0", "4.2.0.0")]
    assert sorted(q.name for q in other.iterdir()) == sorted(
        ["versions.json", *(p.name for p in paths)])          # no temporary files left


def test_archive_refuses_other_files_and_bad_archives(tiny_csrc, tmp_path, monkeypatch):
    """write_archive takes only the cache's libraries; unpack_archive refuses an archive with
    a path, a folder, a stray file or no index, and writes nothing then."""
    import io
    import tarfile

    paths = _fake_toolchain_build(monkeypatch, [KernelSpec("tiny.cu", {"QC_VALUE": 1}, "sm_80")])
    stray = tmp_path / "stray.so"
    stray.write_bytes(b"x")
    with pytest.raises(KernelBuildError, match="is not a library of the cache"):
        build.write_archive([stray], tmp_path / "k.tar.gz")
    assert not list(tmp_path.glob("k.tar.gz*"))

    def archive_with(name, entries):
        path = tmp_path / name
        with tarfile.open(path, "w:gz") as tar:
            for entry, data in entries:
                info = tarfile.TarInfo(entry)
                if data is None:
                    info.type = tarfile.DIRTYPE
                    tar.addfile(info)
                else:
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        return path

    index = ("versions.json", b"[]")
    target = tmp_path / "target"
    monkeypatch.setenv("QCOMPILE_CACHE_DIR", str(target))
    for name, entries, message in [
        ("path.tar.gz", [index, ("../evil.so", b"x")], "unexpected entries: ../evil.so"),
        ("dir.tar.gz", [index, ("sub", None)], "unexpected entries: sub"),
        ("stray.tar.gz", [index, ("run.sh", b"x")], "unexpected entries: run.sh"),
        ("noindex.tar.gz", [(paths[0].name, b"x")], "no versions.json"),
        ("badindex.tar.gz", [("versions.json", b"{")], "unreadable versions.json"),
    ]:
        with pytest.raises(KernelBuildError, match=message.replace(".", r"\.")):
            build.unpack_archive(archive_with(name, entries))
    assert not target.exists() or not list(target.glob("*.so"))


def test_cli_build_archive_then_unpack(tmp_path, monkeypatch, capsys):
    """``qcompile build --arch sm_80 --archive FILE`` packs every sm_80 kernel it built (nvcc
    faked here); ``qcompile build --unpack FILE`` adds them to another cache and says how
    many; a file that is not an archive is an error (exit 1), not a traceback."""
    from qcompile import cli

    monkeypatch.setenv("QCOMPILE_CACHE_DIR", str(tmp_path / "build"))
    _fake_toolchain_build(monkeypatch, [])
    archive = tmp_path / "k.tar.gz"
    assert cli.main(["build", "--arch", "sm_80", "--archive", str(archive)]) == 0
    built = sorted(q.name for q in (tmp_path / "build").glob("*.so"))
    assert len(built) > 10 and f"archived in {archive}" in capsys.readouterr().out
    monkeypatch.setenv("QCOMPILE_CACHE_DIR", str(tmp_path / "deploy"))
    assert cli.main(["build", "--unpack", str(archive)]) == 0
    assert f"{len(built)} kernels from {archive} in {tmp_path / 'deploy'}" in capsys.readouterr().out
    assert sorted(q.name for q in (tmp_path / "deploy").glob("*.so")) == built
    with pytest.raises(SystemExit):  # one or the other, never both
        cli.main(["build", "--archive", str(archive), "--unpack", str(archive)])
    assert "not allowed with argument" in capsys.readouterr().err
    bad = tmp_path / "bad.tar.gz"
    bad.write_bytes(b"not a tar")
    assert cli.main(["build", "--unpack", str(bad)]) == 1
    assert capsys.readouterr().err.startswith("error: ")
