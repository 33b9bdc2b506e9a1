"""runtime.compiled: the torch-compile engine (Inductor), its on-disk kernel cache and its errors."""
from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import torch

from mas3_edge import bundle
from mas3_edge.errors import UserError
from mas3_edge.runtime import compiled
from mas3_edge.runtime.engines import load_engine

HAS_CUDA = torch.cuda.is_available()
CAN_COMPILE, WHY = compiled.compile_status("cpu")


def _frames(n: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 64, 128, 3), dtype=np.uint8)


@pytest.mark.slow
@pytest.mark.skipif(not CAN_COMPILE, reason=f"Inductor cannot compile here: {WHY}")
def test_torch_compile_engine_compiles_at_load_and_a_second_load_reads_the_disk_cache(tiny_bundle):
    vdir = bundle.resolve(tiny_bundle)
    first: dict = {}
    loader = threading.Thread(target=lambda: first.update(e=load_engine(vdir, "torch-compile", "cpu", batch_sizes=(1,))))
    loader.start()  # as the swapper loads: in a thread beside the serving loop
    loader.join()
    engine = first["e"]
    assert engine.name == "torch-compile" and engine.cache == "miss" and engine.compile_s > 0
    frames = _frames(2)
    ref_classes, ref_conf = load_engine(vdir, "torch", "cpu").infer(frames)
    for batch in (frames[:1], frames):  # batch 1 compiled; batch 2 runs the uncompiled copy, never compiles
        classes, conf = engine.infer(batch)
        assert (classes == ref_classes[: len(batch)]).mean() >= 0.999
        assert np.abs(conf - ref_conf[: len(batch)]).max() < 1e-4
    (sidecar,) = (vdir / "engines").glob("torch-compile-fp32-*.json")
    info = json.loads(sidecar.read_text())
    assert info["spec"]["weights_sha256"] == bundle.read_meta(vdir)["sha256"] and info["cache"] == "miss"
    assert any(sidecar.with_suffix("").iterdir())  # Inductor's artifacts under the key's folder
    torch._dynamo.reset()  # what a restart forgets (the disk cache stays)
    again = load_engine(vdir, "torch-compile", "cpu", batch_sizes=(1,))
    assert again.cache == "hit" and again.compile_s < engine.compile_s
    assert (again.infer(frames[:1])[0] == ref_classes[:1]).mean() >= 0.999


def test_cache_key_changes_with_everything_compiled_kernels_depend_on(tiny_bundle, small_net, tmp_path):
    ver = bundle.load_version(tiny_bundle)
    key, folder = compiled.cache_key(ver.path, ver, "cpu", "fp16", (8, 1))
    assert key["precision"] == "fp32" and key["batch_sizes"] == [1, 8] and key["device"] == "cpu"  # no fp16 on CPU
    assert folder.parent == ver.path / "engines" and folder.name.startswith("torch-compile-fp32-")
    other = {compiled.cache_key(ver.path, ver, "cpu", "fp32", (1,))[1]}
    with torch.no_grad():
        small_net.head.bias.add_(1.0)
    ver2 = bundle.load_version(bundle.save_version(tmp_path / "b2", small_net))
    other.add(compiled.cache_key(ver.path, ver2, "cpu", "fp32", (1, 8))[1])
    assert folder not in other and len(other) == 2


def test_no_cpp_compiler_is_one_clear_error(tiny_bundle, monkeypatch):
    import torch._inductor.cpp_builder as cb

    def broken():
        raise RuntimeError("No working C++ compiler found in torch._inductor.config.cpp.cxx: (None, 'g++')")
    monkeypatch.setattr(cb, "get_cpp_compiler", broken)
    with pytest.raises(UserError, match="needs a C\\+\\+ compiler"):
        load_engine(bundle.resolve(tiny_bundle), "torch-compile", "cpu")
    assert not (bundle.resolve(tiny_bundle) / "engines").exists()  # nothing half-made


def test_auto_never_picks_torch_compile(tiny_bundle):
    from mas3_edge.runtime.engines import KINDS, available_kinds
    assert "torch-compile" in KINDS
    assert "torch-compile" not in available_kinds("cpu") + available_kinds("cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA or not compiled.compile_status("cuda")[0], reason="needs a CUDA GPU and Triton")
def test_torch_compile_on_cuda_agrees_with_cpu(small_net, tmp_path):
    from conftest import three_set_model
    net, frames = three_set_model(small_net)  # an adapted model: each set's folded copy compiled
    vdir = bundle.save_version(tmp_path / "b", net)
    engine = load_engine(vdir, "torch-compile", "cuda", batch_sizes=(1, 3))
    ref, _ = load_engine(vdir, "torch", "cpu").infer(frames[::3])
    for idx in ([0, 1, 2], [2], [0]):
        assert (engine.infer(frames[::3][idx])[0] == ref[idx]).mean() >= 0.99
    assert engine.precision == "fp16" and engine.cache in ("miss", "hit")
