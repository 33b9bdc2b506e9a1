"""runtime.engines: load_engine, the ONNX Runtime / PyTorch / TensorRT engines, and the benchmark."""
from __future__ import annotations

import importlib.util
import json
import logging
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import three_set_model
from mas3_edge.export.onnx import export_onnx
from mas3_edge.export.tensorrt import tensorrt_status
from mas3_edge import bundle
from mas3_edge.errors import UserError
from mas3_edge.runtime.engines import Engine, TorchEngine, load_engine
from mas3_edge.runtime.ort_engine import OrtEngine

ROOT = Path(__file__).resolve().parents[1]
HAS_CUDA = torch.cuda.is_available()


@pytest.fixture(scope="module")
def two_versions(tmp_path_factory) -> tuple[Path, Path]:
    """A bundle with two exported versions of differently initialised small networks."""
    from conftest import SMALL
    from mas3_edge.model import SegNet
    root = tmp_path_factory.mktemp("engines") / "bundle"
    vdirs = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        vdirs.append(bundle.save_version(root, SegNet(SMALL).eval()))
        export_onnx(vdirs[-1])
    return vdirs[0], vdirs[1]


def _frames(n: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 64, 128, 3), dtype=np.uint8)


def test_auto_on_cpu_picks_onnxruntime_and_says_so(two_versions, caplog):
    with caplog.at_level(logging.INFO, logger="mas3_edge.runtime.engines"):
        engine = load_engine(two_versions[0], device="cpu")
    assert (engine.name, engine.provider) == ("onnxruntime", "CPUExecutionProvider")
    assert (engine.version, engine.input_size) == ("v0001", (64, 128))
    assert "auto picked the onnxruntime engine" in caplog.text


def test_onnxruntime_and_torch_engines_agree(two_versions):
    frames = _frames(3)
    ort_classes, ort_conf = load_engine(two_versions[0], "onnxruntime").infer(frames)
    pt_classes, pt_conf = load_engine(two_versions[0], "torch", device="cpu").infer(frames)
    assert ort_classes.dtype == np.uint8 and ort_conf.dtype == np.float32
    assert ort_classes.shape == ort_conf.shape == (3, 64, 128)
    assert (ort_classes == pt_classes).mean() >= 0.999
    assert np.abs(ort_conf - pt_conf).max() < 1e-4


def test_bundle_root_loads_the_serving_version_and_engines_are_independent(two_versions):
    root = two_versions[0].parent.parent
    newest = load_engine(root, "onnxruntime")
    oldest = load_engine(two_versions[0], "onnxruntime")
    assert newest.version == "v0002" and oldest.version == "v0001"
    frames = _frames(2, seed=3)
    assert not np.array_equal(newest.infer(frames)[1], oldest.infer(frames)[1])  # its own weights each


def test_auto_falls_back_to_torch_without_an_export(tiny_bundle, caplog):
    with caplog.at_level(logging.INFO, logger="mas3_edge.runtime.engines"):
        engine = load_engine(tiny_bundle, device="cpu")
    assert engine.name == "torch" and "no model.onnx" in caplog.text
    with pytest.raises(UserError, match="mas3-edge export"):
        load_engine(tiny_bundle, "onnxruntime")


def test_a_replaced_onnx_file_is_refused(tiny_bundle, caplog):
    vdir = export_onnx(tiny_bundle).path.parent
    (vdir / bundle.ONNX_FILE).write_bytes(b"\x08\x07garbage")
    with pytest.raises(UserError, match="corrupt or replaced"):
        load_engine(vdir, "onnxruntime")
    with caplog.at_level(logging.INFO, logger="mas3_edge.runtime.engines"):
        assert load_engine(vdir, device="cpu").name == "torch"  # auto still serves, and says why


@pytest.mark.parametrize("bad", [np.zeros((2, 64, 128, 3), np.float32), np.zeros((64, 128, 3), np.uint8),
                                 np.zeros((1, 32, 128, 3), np.uint8), [[0]]])
def test_infer_rejects_bad_frames(two_versions, bad):
    engine = load_engine(two_versions[0], "onnxruntime")
    with pytest.raises(UserError, match=r"expects uint8 frames of shape \(B, 64, 128, 3\)"):
        engine.infer(bad)


def test_unusable_kinds_are_clear_errors(two_versions):
    with pytest.raises(UserError, match="unknown engine kind"):
        load_engine(two_versions[0], "openvino")
    with pytest.raises(UserError, match="needs a CUDA device"):
        load_engine(two_versions[0], "torch-cudagraph", device="cpu")
    with pytest.raises(UserError, match="needs a CUDA device"):
        load_engine(two_versions[0], "tensorrt", device="cpu")


@pytest.mark.filterwarnings("ignore:Specified provider")
def test_onnxruntime_reports_the_provider_that_really_runs(two_versions, monkeypatch, caplog):
    """onnxruntime-gpu lists CUDA even when its libraries are missing and then runs on CPU."""
    import onnxruntime as ort
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    with caplog.at_level(logging.WARNING, logger="mas3_edge.runtime.engines"):
        engine = OrtEngine(two_versions[0], device="cuda:0")
    assert engine.provider == "CPUExecutionProvider" and engine.precision == "fp32"
    assert "asked for CUDAExecutionProvider but runs on CPUExecutionProvider" in caplog.text
    with pytest.raises(UserError, match="no usable GPU provider"):
        OrtEngine(two_versions[0], device="cuda:0", gpu_only=True)


def test_engines_load_in_a_background_thread_while_another_serves(two_versions):
    serving = load_engine(two_versions[0], "onnxruntime")
    frames, loaded, errors = _frames(1), {}, []

    def loader():
        try:
            loaded["next"] = load_engine(two_versions[1], device="cpu")
        except Exception as e:  # surfaced by the assert below
            errors.append(e)
    thread = threading.Thread(target=loader)
    thread.start()
    results = [serving.infer(frames) for _ in range(5)]
    thread.join(timeout=60)
    assert not errors and isinstance(loaded["next"], Engine) and loaded["next"].version == "v0002"
    assert all(np.array_equal(r[0], results[0][0]) for r in results)


def test_torch_engine_serves_a_snapshot_of_the_network(small_net):
    engine = TorchEngine(small_net, "v-test")
    classes, conf = engine.infer(_frames(1))
    assert engine.name == "torch" and engine.precision == "fp32" and classes.shape == (1, 64, 128)
    assert ((conf > 0) & (conf <= 1)).all()
    with torch.no_grad():
        small_net.head.bias.add_(5.0)  # the adapter keeps training its copy...
    assert np.array_equal(engine.infer(_frames(1))[1], conf)  # ...the engine serves what it loaded


def test_folding_batch_norm_keeps_the_function(small_net):
    from mas3_edge.model import Deployed
    with torch.no_grad():  # statistics far from the identity, so a wrong fold shows
        for m in small_net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(), m.running_var.uniform_(0.2, 3.0), m.weight.normal_(), m.bias.normal_()
    frames = _frames(2)
    with torch.no_grad():
        ref_classes, ref_conf = Deployed(small_net)(torch.from_numpy(frames))
    classes, conf = TorchEngine(small_net, "v-test").infer(frames)
    assert (classes == ref_classes.numpy()).mean() >= 0.999 and np.abs(conf - ref_conf.numpy()).max() < 1e-4


def test_torch_engine_folds_each_normalisation_set_into_its_own_copy(small_net):
    from mas3_edge.model import Deployed, DomainNorm
    net, frames = three_set_model(small_net)
    frames = frames[::3]  # one frame of each domain
    engine = TorchEngine(net, "v-test")
    assert engine.provider.endswith("3 sets folded apart")
    assert not any(isinstance(m, DomainNorm) for m in engine._model.copies.modules())
    with torch.no_grad():
        route = engine._model.route(torch.from_numpy(frames))
        ref_classes, ref_conf = Deployed(net)(torch.from_numpy(frames))
    assert sorted(route.tolist()) == [0, 1, 2]  # one frame per set: a mixed batch
    for idx in ([0, 1, 2], [2, 0], [1]):  # mixed batches in any order, and one set alone
        classes, conf = engine.infer(frames[idx])
        assert (classes == ref_classes.numpy()[idx]).mean() >= 0.999
        assert np.abs(conf - ref_conf.numpy()[idx]).max() < 1e-4


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("mode", ["fp16", "cudagraph"])
def test_cuda_engines_serve_each_normalisation_set_folded_apart(small_net, mode):
    net, frames = three_set_model(small_net)
    frames = frames[::3]
    engine = TorchEngine(net, "v-test", device="cuda", mode=mode, batch_sizes=(1, 3))
    ref_classes, _ = TorchEngine(net, "v-test").infer(frames)
    for idx in ([0, 1, 2], [2, 2, 2], [1], [0]):  # mixed (eager), one set at batch 3 and 1 (its graph)
        classes, _ = engine.infer(frames[idx])
        assert (classes == ref_classes[idx]).mean() >= 0.99


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("kind", ["torch", "torch-fp16", "torch-cudagraph"])
def test_torch_cuda_engines_agree_with_cpu(two_versions, kind):
    frames = _frames(2)
    ref_classes, ref_conf = load_engine(two_versions[0], "torch", device="cpu").infer(frames)
    engine = load_engine(two_versions[0], kind, device="cuda", batch_sizes=(1, 2))
    for batch in (frames, frames[:1]):
        classes, conf = engine.infer(batch)
        assert (classes == ref_classes[: len(batch)]).mean() >= 0.995
        assert np.abs(conf - ref_conf[: len(batch)]).max() < 5e-2
    # per-batch-size buffers (CUDA graphs) must not leak one batch's result into another's
    assert (engine.infer(frames[::-1].copy())[0][0] == engine.infer(frames[1:])[0][0]).mean() >= 0.99


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_auto_on_gpu_picks_a_gpu_engine(two_versions):
    engine = load_engine(two_versions[0], device="cuda")
    assert engine.name != "torch" and engine.provider != "CPUExecutionProvider"


@pytest.mark.tensorrt
@pytest.mark.skipif(not tensorrt_status()[0], reason="needs TensorRT and a CUDA GPU")
def test_tensorrt_engine_matches_torch_at_every_batch_size(two_versions):
    frames = _frames(3)
    ref_classes, _ = load_engine(two_versions[0], "torch", device="cpu").infer(frames)
    engine = load_engine(two_versions[0], "tensorrt", device="cuda", batch_sizes=(1, 2))
    assert engine.provider.startswith("TensorRT")
    for n in (1, 2, 3):  # 3 is above every profile: run in chunks
        assert (engine.infer(frames[:n])[0] == ref_classes[:n]).mean() >= 0.995


def test_bench_quick_run_writes_table_and_json(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_inference", ROOT / "tools" / "bench_inference.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    bench.main(["--quick", "--preset", "tiny", "--sizes", "64x128", "--batches", "1,2", "--device", "cpu",
                "--out", str(out)])
    rows = json.loads(out.read_text())["results"]
    assert {(r["engine"], r["batch"]) for r in rows} == {(e, b) for e in ("torch", "onnxruntime") for b in (1, 2)}
    assert all(r["fps"] > 0 and r["p99_ms"] >= r["p50_ms"] > 0 for r in rows)
    assert all(r["vs_torch"] == pytest.approx(1.0) for r in rows if r["engine"] == "torch")
    assert "| onnxruntime | CPUExecutionProvider | fp32 | 64x128 | 1 |" in capsys.readouterr().out


def test_auto_never_picks_tensorrt_but_it_can_be_asked_for():
    from mas3_edge.runtime.engines import KINDS, available_kinds
    assert "tensorrt" not in available_kinds("cuda") and "tensorrt" not in available_kinds("cpu")
    assert available_kinds("cuda")[0] == "onnxruntime" and "tensorrt" in KINDS


def test_any_error_of_an_engine_falls_through_to_the_next_with_one_line(two_versions, monkeypatch, caplog):
    from mas3_edge.runtime import ort_engine

    def broken(*args, **kwargs):
        raise RuntimeError("CUDA driver version is insufficient\nsecond line of the driver's story")
    monkeypatch.setattr(ort_engine, "OrtEngine", broken)
    with caplog.at_level(logging.INFO, logger="mas3_edge.runtime.engines"):
        engine = load_engine(two_versions[0], device="cpu")
    assert engine.name == "torch"
    lines = [r.getMessage() for r in caplog.records if "onnxruntime" in r.getMessage()]
    assert lines == ["auto: onnxruntime failed to load (RuntimeError: CUDA driver version is insufficient); "
                     "trying the next engine"]
    with pytest.raises(RuntimeError):  # asked for by name: the error is the caller's to see
        load_engine(two_versions[0], "onnxruntime")
