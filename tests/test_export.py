"""Export / load round trips on CPU, for both kinds of artifact (the program that
load compiles, AOTInductor's package), and clear errors for bad artifacts."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import rel_err
from torch import nn

import qcompile
from qcompile.export import (
    DEFAULT_PACKAGE,
    FORMAT_VERSION,
    META_NAME,
    elf_needed,
    read_metadata,
)


PACKAGES = ("program", "aoti")


def _model():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 64))
    m[0] = qcompile.Int4WeightOnlyLinear.from_linear(m[0], group_size=64)
    m[2] = qcompile.SmoothQuantLinear.from_linear(m[2])
    return m


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """The small model exported as each kind of artifact, with a dynamic token count."""
    model = _model()
    folder = tmp_path_factory.mktemp("export")
    paths = {}
    for package in PACKAGES:
        dim = torch.export.Dim("m", min=1, max=1024)
        paths[package] = qcompile.export(model, (torch.randn(8, 256),), folder / f"{package}.pt2",
                                         dynamic_shapes=({0: dim},), package=package)
    return model, paths


@pytest.fixture(params=PACKAGES)
def artifact(request, artifacts):
    model, paths = artifacts
    return model, paths[request.param]


def test_round_trip_matches_eager_for_any_m(artifact):
    model, path = artifact
    loaded = qcompile.load(path)
    for m in (1, 8, 37):
        x = torch.randn(m, 256)
        with torch.no_grad():
            assert rel_err(loaded(x), model(x)) < 1e-5


@pytest.mark.parametrize("method", ["nf4", "fp4"])
def test_lookup_table_program_round_trip(tmp_path, method):
    """NF4/FP4 weights travel as qcompile::lut_gemm with their codes, table and scales, and the
    loaded program gives eager's numbers exactly (the op's weight is the graph's)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 256), nn.SiLU(), nn.Linear(256, 64)).to(torch.bfloat16)
    qcompile.quantize(model, method, block_size=64, double_quant=True)
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    path = qcompile.export(model, (x,), tmp_path / "lut.pt2",
                           dynamic_shapes=({0: torch.export.Dim("m", min=1, max=64)},))
    assert len(qcompile.last_report().matched) == 2
    loaded = qcompile.load(path, compile=False)
    with torch.no_grad():
        for m in (1, 5):
            xm = torch.randn(m, 128, dtype=torch.bfloat16)
            assert torch.equal(loaded(xm), model(xm))


def test_lookup_table_program_keeps_the_gemm_scales(tmp_path, monkeypatch):
    """A program whose lookup-table ops read the GEMM's scales by name (as prepared on Hopper;
    here the kernels' layout on a CPU) exports and loads with them: the loaded graph's ops
    still take ``gemm_scales``, and give the exporting model's numbers."""
    from test_lookup_table import prepare_as_on_hopper

    from qcompile import kernels

    monkeypatch.setattr(kernels, "prepare_lut_gemm", prepare_as_on_hopper)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 256), nn.SiLU(), nn.Linear(256, 64)).to(torch.bfloat16)
    qcompile.quantize(model, "nf4", block_size=64)
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    path = qcompile.export(model, (x,), tmp_path / "lut.pt2",
                           dynamic_shapes=({0: torch.export.Dim("m", min=1, max=64)},))
    loaded = qcompile.load(path, compile=False)
    ops_ = [n for n in loaded.graph.nodes if n.target is torch.ops.qcompile.lut_gemm.default]
    named = [n.normalized_arguments(loaded, normalize_to_only_use_kwargs=True).kwargs
             for n in ops_]
    assert len(ops_) == 2 and all(a["gemm_scales"] is not None for a in named), named
    with torch.no_grad():
        for m in (1, 5):
            xm = torch.randn(m, 128, dtype=torch.bfloat16)
            assert torch.equal(loaded(xm), model(xm))


def test_program_runs_through_the_dispatcher_without_compiling(artifacts):
    model, paths = artifacts
    loaded = qcompile.load(paths["program"], compile=False)
    assert isinstance(loaded, torch.fx.GraphModule)
    targets = {n.target for n in loaded.graph.nodes if n.op == "call_function"}
    assert torch.ops.qcompile.mixed_gemm.default in targets
    assert torch.ops.qcompile.int8_gemm.default in targets
    for m in (1, 300):
        x = torch.randn(m, 256)
        with torch.no_grad():
            assert rel_err(loaded(x), model(x)) < 1e-5


def test_a_loaded_program_reports_the_ops_it_runs(artifacts):
    """Compiled on load, the program's report lists its qcompile ops as matched (not the
    "0 of 0" of a graph with nothing left to rewrite)."""
    _, paths = artifacts
    loaded = qcompile.load(paths["program"])
    with torch.no_grad(), qcompile.collect() as report:
        loaded(torch.randn(3, 256))
    assert len(report.matched) == len(report) == 2, str(report)
    assert {r.kernel for r in report.records} == {"qcompile.mixed_gemm.default",
                                                   "qcompile.int8_gemm.default"}


def test_a_loaded_program_says_which_argument_is_wrong(artifacts):
    """Compiled on load, a call with arguments the program does not take raises, before any
    tracing, an error naming the argument and what the program takes (Dynamo's own were
    "Attempt to trace generator" and fake-tensor errors)."""
    _, paths = artifacts
    loaded = qcompile.load(paths["program"])
    x = torch.randn(3, 256)
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"argument 0 must be a float32 tensor \[<=1024, 256\], "
                                             r"got bfloat16 \[3, 256\]"):
            loaded(x.bfloat16())
        with pytest.raises(ValueError, match=r"got float32 \[1100, 256\]"):
            loaded(torch.randn(1100, 256))
        with pytest.raises(ValueError, match=r"got float32 \[256\]"):
            loaded(torch.randn(256))
        with pytest.raises(TypeError, match=r"takes 1 positional tensor argument\(s\), got 2"):
            loaded(x, x)
        with pytest.raises(TypeError, match=r"got 0 and keywords \['x'\]"):
            loaded(x=x)
        assert rel_err(loaded(x), qcompile.load(paths["program"], compile=False)(x)) < 1e-6


def test_artifact_holds_the_report_and_versions(artifact):
    _, path = artifact
    meta = read_metadata(path)
    assert meta["format"] == FORMAT_VERSION == 4 and meta["torch"] == torch.__version__
    assert meta["package"] == path.stem and meta["qcompile"] == qcompile.__version__
    assert meta["target"] == {"device": "cpu"}
    assert [r["format"] for r in meta["report"]] == [
        "w4a16 uint4 g64+zeros", "w8a8 int8 per-token x per-channel +bias"]


def test_the_default_package_is_the_program(tmp_path):
    assert DEFAULT_PACKAGE == "program"
    path = qcompile.export(nn.Linear(16, 8), (torch.randn(2, 16),), tmp_path / "plain.pt2")
    assert read_metadata(path)["package"] == "program"
    assert not list(tmp_path.glob(".qcompile-export-*"))  # no scratch left behind


# -- a decoder with a KV cache: dynamic batch and sequence, cache written in place ----------

def _llama(method: str = "w4a16"):
    from llama_model import CONFIGS, Llama
    torch.manual_seed(0)
    model = Llama(CONFIGS["tiny"])
    qcompile.quantize(model, method, group_size=64)
    model.setup_caches(4, 64)
    return model


@pytest.fixture(scope="module")
def llama_program(tmp_path_factory):
    model = _llama()
    path = tmp_path_factory.mktemp("llama") / "llama.pt2"
    batch = torch.export.Dim("batch", min=1, max=4)
    seq = torch.export.Dim.DYNAMIC
    example = (torch.randint(0, 256, (2, 5)), torch.arange(5))
    qcompile.export(model, example, path, dynamic_shapes=({0: batch, 1: seq}, {0: seq}))
    return model, path


def _steps(batch: int):
    """A prefill of 6 tokens, then single tokens at positions 6, 7, 8."""
    g = torch.Generator().manual_seed(batch)
    yield torch.randint(0, 256, (batch, 6), generator=g), torch.arange(6)
    for pos in range(6, 9):
        yield torch.randint(0, 256, (batch, 1), generator=g), torch.tensor([pos])


def _caches(module) -> dict[str, torch.Tensor]:
    return {n.removeprefix("_orig_mod."): b for n, b in module.named_buffers()
            if n.endswith("_cache")}


def test_program_keeps_dynamic_batch_and_sequence_and_the_kv_cache(llama_program):
    model, path = llama_program
    loaded = qcompile.load(path, compile=False)
    caches = _caches(loaded)
    assert sorted(caches) == sorted(_caches(model)) and len(caches) == 4
    pointers = {n: c.data_ptr() for n, c in caches.items()}
    for batch in (1, 3, 2):  # none is the example's shape but the last
        for c in (*caches.values(), *_caches(model).values()):
            c.zero_()
        with torch.no_grad():
            for tokens, pos in _steps(batch):
                assert rel_err(loaded(tokens, pos), model(tokens, pos)) < 1e-5
        # the step wrote the module's own cache buffers, in place
        for name, cache in _caches(loaded).items():
            assert cache.data_ptr() == pointers[name]
            assert rel_err(cache, _caches(model)[name]) < 1e-5
            assert cache[:batch, :, :9].abs().sum() > 0 and not cache[:, :, 9:].any()


def test_program_holds_only_the_tensors_its_graph_reads(llama_program):
    """The quantized weights whose matmuls now read packed copies (every fused q/k/v and
    gate/up) are not saved beside them: every tensor of the loaded module is read by its
    graph, and the loaded module holds no more bytes than the quantized model."""
    model, path = llama_program
    loaded = qcompile.load(path, compile=False)
    read = {n.target for n in loaded.graph.nodes if n.op == "get_attr"}
    state = dict(loaded.named_parameters()) | dict(loaded.named_buffers())
    assert set(state) <= read, sorted(set(state) - read)

    def size(tensors):
        return sum(t.numel() * t.element_size() for t in tensors)

    assert size(state.values()) <= size([*model.parameters(), *model.buffers()])


def test_program_compiled_on_load_generates_what_the_model_does(llama_program):
    model, path = llama_program
    loaded = qcompile.load(path)  # compiled (Inductor) on the first call
    assert isinstance(loaded, torch._dynamo.eval_frame.OptimizedModule)
    for c in (*_caches(loaded).values(), *_caches(model).values()):
        c.zero_()
    out = {}
    for name, step in (("model", model), ("loaded", loaded)):
        tokens, pos = next(_steps(2))
        with torch.no_grad():
            logits = step(tokens, pos)
            generated = [logits[:, -1:].argmax(-1)]
            for i in range(3):
                logits = step(generated[-1], torch.tensor([6 + i]))
                generated.append(logits[:, -1:].argmax(-1))
        out[name] = (logits, torch.cat(generated, 1))
    assert torch.equal(out["loaded"][1], out["model"][1])
    assert rel_err(out["loaded"][0], out["model"][0]) < 1e-4
    for name, cache in _caches(loaded).items():
        assert rel_err(cache, _caches(model)[name]) < 1e-5


def test_loaded_program_compiles_to_the_compiled_models_graph(tmp_path):
    """A W8A8 decode step: the loaded program's post-grad graph holds the same ops as the
    compiled model's, so it computes what the compiled model does op for op. With core ATen's
    table the program's silu was x * sigmoid(x) where the compiled model has Inductor's
    x / (1 + exp(-x)), and the activation quantization after it rounded an element
    differently now and then (on the GPU, generated tokens parted after ~100 steps)."""
    from collections import Counter

    model = _llama("w8a8")
    model.setup_caches(1, 16)
    example = (torch.zeros(1, 1, dtype=torch.long), torch.tensor([3]))
    path = qcompile.export(model, example, tmp_path / "w8a8.pt2")
    graphs = []

    def spy(graph):
        graphs.append(Counter(str(n.target) for n in graph.nodes if n.op == "call_function"))

    with torch.no_grad(), torch._inductor.config.patch(post_grad_custom_post_pass=spy):
        torch._dynamo.reset()
        torch.compile(model, backend="qcompile", fullgraph=True)(*example)
        qcompile.load(path)(*example)
    compiled, loaded = graphs
    assert compiled == loaded, (compiled - loaded, loaded - compiled)
    assert compiled["aten.sigmoid.default"] == 0 and compiled["aten.exp.default"] > 0
    assert compiled["qcompile.int8_gemm.default"] > 0


def test_export_takes_over_a_one_token_step_under_the_one_token_decomposition(tmp_path):
    """The export decomposes with the backend's table, so Inductor's one-token mm entry (GPU,
    with coordinate_descent_tuning; in the table on the CPU here) cannot turn a batch-1
    step's quantized matmuls into mul + sum before the rewrite, as in the compile path."""
    from llama_model import CONFIGS
    from test_takeover import one_token_decomposition

    model = _llama("w4a16")
    model.setup_caches(1, 16)
    with one_token_decomposition():
        qcompile.export(model, (torch.tensor([[3]]), torch.tensor([0])), tmp_path / "m.pt2")
    report = qcompile.last_report()
    assert len(report.matched) == len(report) == 7 * CONFIGS["tiny"].n_layers + 1, str(report)


# -- bad files: a clear error, nothing run --------------------------------------------------

def _copy_with_meta(src: Path, dst: Path, drop: bool = False, **changes):
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for item in zin.infolist():
            data = zin.read(item.filename)
            if item.filename.endswith("/" + META_NAME):
                if drop:
                    continue
                meta = json.loads(data)
                meta.update(changes)
                data = json.dumps(meta).encode()
            zout.writestr(item, data)


@pytest.fixture
def nothing_loads(monkeypatch):
    """Fail the test if a loader is reached (a bad file must be refused before)."""
    def refuse(*args, **kwargs):
        raise AssertionError("a loader ran on a file that should have been refused")
    monkeypatch.setattr(torch.export, "load", refuse)
    monkeypatch.setattr(torch._inductor, "aoti_load_package", refuse)


_SM90 = {"device": "cuda", "index": 0, "arch": "sm_90", "name": "NVIDIA H100 80GB HBM3"}


@pytest.mark.parametrize("changes,match", [
    (dict(format=99), f"has artifact format 99, this qcompile reads format {FORMAT_VERSION}"),
    (dict(format=3), f"has artifact format 3, this qcompile reads format {FORMAT_VERSION}"),
    (dict(package="onnx"), "is a 'onnx' package; this qcompile loads 'program' and 'aoti'"),
    (dict(qcompile="0.0.1"), r"was exported with qcompile 0.0.1, this is qcompile"),
    (dict(torch="2.9.0"), "was exported with torch 2.9.0, this is torch"),
    (dict(target=None), "does not say which device it was made for"),
    (dict(drop=True), "has no qcompile.json"),
], ids=["format", "old-format", "package", "qcompile", "torch", "no-target", "no-meta"])
def test_incompatible_artifacts_say_what_to_do(artifact, tmp_path, nothing_loads, changes,
                                                match):
    _, path = artifact
    bad = tmp_path / "bad.pt2"
    _copy_with_meta(path, bad, **changes)
    with pytest.raises(qcompile.ArtifactError, match=match):
        qcompile.load(bad)


def test_gpu_artifact_on_a_machine_without_a_gpu(artifact, tmp_path, nothing_loads,
                                                 monkeypatch):
    _, path = artifact
    bad = tmp_path / "h100.pt2"
    _copy_with_meta(path, bad, target=_SM90)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(qcompile.ArtifactError, match=r"was made on NVIDIA H100 80GB HBM3 "
                       r"\(sm_90\) .* this machine has no CUDA GPU"):
        qcompile.load(bad)


def test_gpu_artifact_on_another_gpu_architecture(artifact, tmp_path, nothing_loads,
                                                  monkeypatch):
    _, path = artifact
    bad = tmp_path / "h100.pt2"
    _copy_with_meta(path, bad, target=_SM90)
    export_module = sys.modules["qcompile.export"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=None: "NVIDIA A100-SXM4-80GB")
    monkeypatch.setattr(export_module, "_arch", lambda device: "sm_80")
    with pytest.raises(qcompile.ArtifactError, match=r"repacked for sm_90 kernels, and cuda:0 "
                       r"is NVIDIA A100-SXM4-80GB \(sm_80\): export the model again on this GPU"):
        qcompile.load(bad)
    # a device this machine lacks
    with pytest.raises(qcompile.ArtifactError, match=r"as cuda:1, and this machine has 1 GPU"):
        qcompile.load(bad, device_index=1)
    # the same architecture passes the check (and reaches the loader)
    monkeypatch.setattr(export_module, "_arch", lambda device: "sm_90")
    with pytest.raises((AssertionError, qcompile.ArtifactError), match="a loader ran"):
        qcompile.load(bad)


def test_truncated_or_garbage_files_fail_cleanly(artifact, tmp_path, nothing_loads):
    _, path = artifact
    data = path.read_bytes()
    for size in (len(data) // 2, len(data) - 100, 1000):
        truncated = tmp_path / f"truncated{size}.pt2"
        truncated.write_bytes(data[:size])
        with pytest.raises(qcompile.ArtifactError, match="truncated or corrupt"):
            qcompile.load(truncated)
    garbage = tmp_path / "garbage.pt2"
    garbage.write_bytes(b"not a zip at all")
    with pytest.raises(qcompile.ArtifactError, match="not a qcompile artifact"):
        qcompile.load(garbage)
    with pytest.raises(FileNotFoundError):
        qcompile.load(tmp_path / "missing.pt2")


def test_corrupt_member_fails_cleanly(artifact, tmp_path, nothing_loads):
    # one byte of the largest member flipped: the zip's CRC tells
    _, path = artifact
    with zipfile.ZipFile(path) as zf:
        big = max(zf.infolist(), key=lambda i: i.file_size)
    data = bytearray(path.read_bytes())
    # past the local header (its name and extra field: torch pads the extra to align data)
    name_len, extra_len = struct.unpack_from("<HH", data, big.header_offset + 26)
    offset = big.header_offset + 30 + name_len + extra_len + big.compress_size // 2
    data[offset] ^= 0xFF
    bad = tmp_path / "flipped.pt2"
    bad.write_bytes(bytes(data))
    with pytest.raises(qcompile.ArtifactError, match="corrupt"):
        qcompile.load(bad)


def _with_graph(src: Path, dst: Path, change) -> Path:
    """A copy of the program artifact src with its serialized graph (models/model.json)
    replaced by change(bytes)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for item in zin.infolist():
            data = zin.read(item.filename)
            if item.filename.endswith("models/model.json"):
                data = change(data)
            zout.writestr(item, data)
    return dst


def test_program_that_torch_cannot_read_fails_cleanly(artifacts, tmp_path):
    # a well-formed archive with a good qcompile.json whose graph is damaged
    _, paths = artifacts
    bad = _with_graph(paths["program"], tmp_path / "damaged.pt2", lambda d: d[: len(d) // 2])
    with pytest.raises(qcompile.ArtifactError, match="could not be read as an exported program"):
        qcompile.load(bad)


def test_program_calling_an_unregistered_op_names_it(artifacts, tmp_path):
    # as when the module that defines a model's own op (its attention, say) was not imported
    _, paths = artifacts
    graph = []
    bad = _with_graph(paths["program"], tmp_path / "other_op.pt2",
                      lambda d: graph.append(d) or d.replace(b"torch.ops.qcompile.",
                                                             b"torch.ops.qcgone."))
    assert b"torch.ops.qcompile.mixed_gemm" in graph[0]
    with pytest.raises(qcompile.ArtifactError,
                       match=r"not registered in this process: .*qcgone::mixed_gemm.*import the module"):
        qcompile.load(bad)


class TwiceApplied(nn.Module):
    """One quantized linear applied twice."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(128, 128)

    def forward(self, x):
        return self.lin(torch.relu(self.lin(x)))


@pytest.mark.parametrize("method", ["w4a16", "nf4"])
def test_a_layer_applied_twice_holds_one_packed_copy(tmp_path, method):
    torch.manual_seed(0)
    model = qcompile.quantize(TwiceApplied(), method, group_size=64)
    path = qcompile.export(model, (torch.randn(3, 128),), tmp_path / "t.pt2")
    loaded = qcompile.load(path, compile=False)
    added = [name for name, _ in loaded.named_buffers() if name.startswith("_qcompile_")]
    assert len(added) == len(set(added)) and len(added) <= 3, added  # one packed copy each
    x = torch.randn(3, 128)  # the static example's shape
    with torch.no_grad():
        assert rel_err(loaded(x), model(x)) < 1e-5


def test_a_compiled_model_exports_as_the_module_it_wraps(tmp_path):
    """qcompile.export(torch.compile(model), ..., dynamic_shapes=...) exports the model itself
    (torch.export could not match dynamic_shapes to the compiled wrapper's *args, **kwargs)."""
    model = _model()
    compiled = torch.compile(model, backend="qcompile")
    path = qcompile.export(compiled, (torch.randn(4, 256),), tmp_path / "c.pt2",
                           dynamic_shapes=({0: torch.export.Dim("m")},))
    loaded = qcompile.load(path, compile=False)
    x = torch.randn(7, 256)
    with torch.no_grad():
        assert rel_err(loaded(x), model(x)) < 1e-5


def test_export_checks_arguments(tmp_path):
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        qcompile.export("m", (torch.randn(2, 4),), tmp_path / "a.pt2")
    with pytest.raises(TypeError, match="example_inputs must be a tuple"):
        qcompile.export(nn.Linear(4, 4), torch.randn(2, 4), tmp_path / "a.pt2")
    with pytest.raises(ValueError, match="path must end in .pt2"):
        qcompile.export(nn.Linear(4, 4), (torch.randn(2, 4),), tmp_path / "a.zip")
    with pytest.raises(ValueError, match=r"package must be one of \('program', 'aoti'\)"):
        qcompile.export(nn.Linear(4, 4), (torch.randn(2, 4),), tmp_path / "a.pt2",
                        package="onnx")
    assert not list(tmp_path.iterdir())


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
            qcompile.export(_model(), (torch.randn(8, 256),), path, package="aoti")
    assert not path.exists() and not list(tmp_path.glob(".qcompile-export-*"))
