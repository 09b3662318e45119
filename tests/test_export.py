"""Export / load round trips on CPU, and clear errors for bad artifacts."""

from __future__ import annotations

import json
import subprocess
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import rel_err
from torch import nn

import qcompile
from qcompile.export import FORMAT_VERSION, META_NAME, elf_needed, read_metadata


def _model():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 64))
    m[0] = qcompile.Int4WeightOnlyLinear.from_linear(m[0], group_size=64)
    m[2] = qcompile.SmoothQuantLinear.from_linear(m[2])
    return m


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    model = _model()
    path = tmp_path_factory.mktemp("export") / "model.pt2"
    dim = torch.export.Dim("m", min=1, max=1024)
    qcompile.export(model, (torch.randn(8, 256),), path, dynamic_shapes=({0: dim},))
    return model, path


def test_round_trip_matches_eager_for_any_m(artifact):
    model, path = artifact
    loaded = qcompile.load(path)
    for m in (1, 8, 37):
        x = torch.randn(m, 256)
        with torch.no_grad():
            assert rel_err(loaded(x), model(x)) < 1e-5


def test_artifact_holds_the_report_and_versions(artifact):
    _, path = artifact
    meta = read_metadata(path)
    assert meta["format"] == FORMAT_VERSION == 3 and meta["torch"] == torch.__version__
    assert [r["format"] for r in meta["report"]] == [
        "w4a16 uint4 g64+zeros", "w8a8 int8 per-token x per-channel +bias"]


def _copy_with_meta(src: Path, dst: Path, **changes):
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for item in zin.infolist():
            data = zin.read(item.filename)
            if item.filename.endswith("/" + META_NAME):
                meta = json.loads(data)
                meta.update(changes)
                if changes.get("drop"):
                    continue
                data = json.dumps(meta).encode()
            zout.writestr(item, data)


@pytest.mark.parametrize("changes,match", [
    (dict(format=99), f"has artifact format 99, this qcompile reads format {FORMAT_VERSION}"),
    (dict(torch="2.9.0"), "was exported with torch 2.9.0, this is torch"),
    (dict(drop=True), "has no qcompile.json"),
])
def test_incompatible_artifacts_say_what_to_do(artifact, tmp_path, changes, match):
    _, path = artifact
    bad = tmp_path / "bad.pt2"
    _copy_with_meta(path, bad, **changes)
    with pytest.raises(qcompile.ArtifactError, match=match):
        qcompile.load(bad)


def test_truncated_or_garbage_files_fail_cleanly(artifact, tmp_path):
    _, path = artifact
    data = path.read_bytes()
    truncated = tmp_path / "truncated.pt2"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(qcompile.ArtifactError, match="truncated or corrupt"):
        qcompile.load(truncated)
    garbage = tmp_path / "garbage.pt2"
    garbage.write_bytes(b"not a zip at all")
    with pytest.raises(qcompile.ArtifactError, match="not a qcompile artifact"):
        qcompile.load(garbage)
    with pytest.raises(FileNotFoundError):
        qcompile.load(tmp_path / "missing.pt2")


def test_export_checks_arguments(tmp_path):
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        qcompile.export("m", (torch.randn(2, 4),), tmp_path / "a.pt2")
    with pytest.raises(TypeError, match="example_inputs must be a tuple"):
        qcompile.export(nn.Linear(4, 4), torch.randn(2, 4), tmp_path / "a.pt2")
    with pytest.raises(ValueError, match="path must end in .pt2"):
        qcompile.export(nn.Linear(4, 4), (torch.randn(2, 4),), tmp_path / "a.zip")


_REGEX_SO = """
#include <regex>
#include <string>
extern "C" int qc_probe(const char* s) {
  return std::regex_match(std::string(s), std::regex("(cpu|cuda)(:([0-9]+))?"));
}
"""


def _static_gxx(tmp_path: Path) -> Path:
    """A compiler wrapper that links libstdc++ into shared objects, as some images' CXX does
    (skips where the toolchain has no static libstdc++ to link)."""
    wrapper = tmp_path / "gxx-static"
    wrapper.write_text('#!/bin/sh\ncase " $* " in *" -shared "*) exec g++ "$@" -static-libstdc++;; esac\n'
                       'exec g++ "$@"\n')
    wrapper.chmod(0o755)
    src, out = tmp_path / "probe.cpp", tmp_path / "probe.so"
    src.write_text(_REGEX_SO)
    if subprocess.run([str(wrapper), "-shared", "-fPIC", "-o", str(out), str(src)],
                      capture_output=True).returncode:
        pytest.skip("this toolchain cannot link libstdc++ statically (no libstdc++.a)")
    return wrapper


def test_elf_needed_tells_a_statically_linked_cxx_runtime(tmp_path):
    gxx_static = _static_gxx(tmp_path)
    src = tmp_path / "re.cpp"
    src.write_text(_REGEX_SO)
    dyn, static = tmp_path / "dyn.so", tmp_path / "static.so"
    subprocess.run(["g++", "-shared", "-fPIC", "-o", str(dyn), str(src)], check=True)
    subprocess.run([str(gxx_static), "-shared", "-fPIC", "-o", str(static), str(src)], check=True)
    assert "libstdc++.so.6" in elf_needed(dyn)
    needed = elf_needed(static)
    assert "libc.so.6" in needed and not any(n.startswith("libstdc++") for n in needed)
    assert elf_needed(src) is None


def test_export_refuses_a_library_with_its_own_cxx_runtime(tmp_path):
    # Such a library crashes the loading process (std::regex in torch's model constructor):
    # export says why and how to fix it, and writes nothing.
    path = tmp_path / "static.pt2"
    with torch._inductor.config.patch({"cpp.cxx": (str(_static_gxx(tmp_path)),)}):
        with pytest.raises(qcompile.ExportError, match=r"linked the C\+\+ runtime statically.*"
                           r"CXX=/usr/bin/g\+\+"):
            qcompile.export(_model(), (torch.randn(8, 256),), path)
    assert not path.exists()
