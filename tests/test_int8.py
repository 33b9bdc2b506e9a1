"""INT8 graphs: ONNX Runtime static quantisation of the packaged model, its parity check, the fp32
fallback, and --precision through the console script. Real ONNX Runtime sessions, 128x256 frames."""
from __future__ import annotations

import json
import logging
import shutil
import subprocess
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

from mas3_edge import synth
from mas3_edge.bundle import PACKAGED
from mas3_edge.cli import app
from mas3_edge.export import quantize
from mas3_edge.export.onnx import EXPORT_FILE, run_onnx
from mas3_edge.export.passes import NORM_CONV
from mas3_edge.runtime import scheduler
from mas3_edge.runtime.engines import load_engine
from mas3_edge.runtime.versions import version_rows

SIZE = (128, 256)  # the packaged model's input size


@pytest.fixture(scope="module")
def labelled() -> tuple[np.ndarray, np.ndarray]:
    """16 frames of the packaged model's own (synthetic) domain with their labels, oldest first."""
    pairs = [synth.render("synthetic", 5000 + i, SIZE) for i in range(16)]
    return np.stack([np.asarray(p[0]) for p in pairs]), np.stack([np.asarray(p[1]) for p in pairs])


@pytest.fixture
def packaged(tmp_path: Path) -> Path:
    """A copy of the packaged bundle (exported and verified already): its version directory."""
    shutil.copytree(PACKAGED, tmp_path / "bundle")
    return tmp_path / "bundle" / "versions" / "v0001"


def _frames_dir(folder: Path, frames: np.ndarray) -> Path:
    folder.mkdir()
    for i, f in enumerate(frames):
        cv2.imwrite(str(folder / f"{i:06d}.png"), cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
    return folder


def test_int8_graph_is_qdq_per_channel_and_passes_parity(packaged, labelled):
    images, labels = labelled
    entry = quantize.quantize_version(packaged, images, (images[12:], labels[12:]))
    check = entry["graphs"][0]["parity"]
    assert entry["passed"], entry["reason"]
    assert check["agreement"] >= 0.99 and abs(check["miou_fp32"] - check["miou_int8"]) <= 0.3
    assert entry["calibration"] == {"frames": 12, "held_out": 4, "source": "frames"}
    model = onnx.load(str(packaged / quantize.INT8_FILE))
    ops = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops and "QLinearConv" not in ops  # QDQ, not QOperator
    inits = {i.name: i for i in model.graph.initializer}
    conv_weights = {n.input[1] for n in model.graph.node if n.op_type == "Conv"}
    weight_dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.output[0] in conv_weights]
    assert weight_dq and all(len(inits[n.input[1]].dims) == 1 and inits[n.input[1]].dims[0] > 1 for n in weight_dq)
    norm = next(n for n in model.graph.node if n.name == NORM_CONV)  # the input normalisation, kept fp32
    assert norm.input[1] in inits and not {"Sub", "Div"} & ops
    assert json.loads((packaged / EXPORT_FILE).read_text())["int8"]["passed"]
    assert version_rows(packaged.parent.parent)[1][0][6] == "verified+int8"
    engine = load_engine(packaged, "onnxruntime", "cpu", precision="int8", threads=1)
    assert engine.precision == "int8" and not engine.precision_note
    classes, _ = engine.infer(images[12:])
    assert (classes == run_onnx(packaged / "model.onnx", images[12:], ["classes"])["classes"]).mean() >= 0.99
    (packaged / quantize.INT8_FILE).write_bytes(b"not the graph that was checked")
    engine = load_engine(packaged, "onnxruntime", "cpu", precision="int8", threads=1)
    assert engine.precision == "fp32" and "not the file calibration checked" in engine.precision_note


def test_failed_parity_serves_fp32_with_one_line(packaged, labelled, monkeypatch, caplog):
    monkeypatch.setattr(quantize, "MIN_AGREEMENT", 1.01)  # no graph can pass: the fallback must hold
    entry = quantize.quantize_version(packaged, labelled[0])
    assert not entry["passed"] and "pixel agreement with fp32" in entry["reason"]
    assert not (packaged / quantize.INT8_FILE).exists()  # a graph that failed is never written
    assert version_rows(packaged.parent.parent)[1][0][6] == "verified, int8 failed"
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="mas3_edge.runtime.engines"):
        engine = load_engine(packaged, "onnxruntime", "cpu", precision="int8", threads=1)
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert engine.precision == "fp32" and len(lines) == 1
    assert "int8 asked for; onnxruntime serves fp32" in lines[0] and "failed its parity check" in lines[0]


@pytest.mark.parametrize("bits", [7, 8])
def test_the_weight_range_follows_the_cpu_and_8_bit_weights_are_not_served_without_vnni(packaged, labelled,
                                                                                          monkeypatch, bits):
    monkeypatch.setattr(quantize, "MIN_AGREEMENT", 0.0)  # the weights' range, not their parity
    monkeypatch.setattr(quantize, "weight_bits", lambda: bits)  # calibrated on a CPU with (8) or without (7) VNNI
    entry = quantize.quantize_version(packaged, labelled[0])
    assert entry["settings"]["weight_bits"] == bits and f"{bits}-bit range" in entry["settings"]["weights"]
    model = onnx.load(str(packaged / quantize.INT8_FILE))
    weights = [onnx.numpy_helper.to_array(i) for i in model.graph.initializer if i.data_type == onnx.TensorProto.INT8]
    assert weights and (max(int(np.abs(w.astype(int)).max()) for w in weights) > 64) == (bits == 8)
    monkeypatch.setattr(quantize, "weight_bits", lambda: 7)  # served on a CPU without VNNI
    engine = load_engine(packaged, "onnxruntime", "cpu", precision="int8", threads=1)
    assert engine.precision == ("int8" if bits == 7 else "fp32")
    assert bits == 7 or "saturate on a CPU without VNNI" in engine.precision_note


def test_round_hook_never_rejects_a_round(packaged, tmp_path):
    (tmp_path / "empty").mkdir()
    out = scheduler._calibrate(packaged, str(tmp_path / "empty"), limit=150)
    assert not out["passed"] and "no images" in out["reason"]
    assert "int8" not in json.loads((packaged / EXPORT_FILE).read_text())


def test_precision_int8_through_the_cli(packaged, labelled, tmp_path):
    """export --precision int8 --frames calibrates on a frame folder the way a round does (quantize_buffer);
    the installed script's run then serves the INT8 graph."""
    root, frames = packaged.parent.parent, _frames_dir(tmp_path / "frames", labelled[0])
    out = CliRunner().invoke(app, ["export", "--bundle", str(root), "--precision", "int8", "--frames", str(frames),
                                   "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout)["int8"]["calibration"]["frames"] == 12
    run = subprocess.run(["mas3-edge", "run", "--camera", "synthetic://synthetic", "--bundle", str(root),
                          "--engine", "onnxruntime", "--precision", "int8", "--no-buffer", "--max-frames", "2",
                          "--publish", "tcp://127.0.0.1:0"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "with onnxruntime int8 on CPUExecutionProvider" in run.stdout + run.stderr


@pytest.mark.parametrize("command", [["export"], ["run", "--camera", "synthetic://night"]])
def test_a_bad_precision_is_one_error_line(command):
    out = subprocess.run(["mas3-edge", *command, "--precision", "int4"], capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and out.stdout == ""
    assert out.stderr.strip().splitlines() == ["error: --precision must be one of fp32, fp16, int8, got 'int4'"]
