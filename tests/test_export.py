"""ONNX export with its parity check, the TensorRT engine cache, and `mas3-edge export`."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from mas3_edge.export import onnx as xonnx
from mas3_edge.export import parity, passes
from mas3_edge.export import tensorrt as xtrt
from mas3_edge import bundle
from mas3_edge.errors import UserError
from mas3_edge.model import Deployed


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """One exported small version shared by the read-only tests (an export costs ~1 s)."""
    from conftest import SMALL
    from mas3_edge.model import SegNet
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("exported") / "bundle"
    vdir = bundle.save_version(root, SegNet(SMALL).eval())
    xonnx.export_onnx(vdir)
    return vdir


def _snapshot(vdir: Path) -> dict[str, bytes]:
    return {n: (vdir / n).read_bytes() for n in (bundle.ONNX_FILE, xonnx.EXPORT_FILE)}


def test_export_graph_is_uint8_nhwc_with_dynamic_batch(exported):
    model = onnx.load(str(exported / bundle.ONNX_FILE))
    (inp,) = model.graph.input
    dims = inp.type.tensor_type.shape.dim
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert dims[0].dim_param == "batch" and [d.dim_value for d in dims[1:]] == [64, 128, 3]
    assert [o.name for o in model.graph.output] == ["classes", "confidence"]
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17


def test_uint8_is_only_cast_from_and_to_float(exported):
    """TensorRT documents uint8 only for casts from/to float at the graph's edges."""
    nodes = {o: n for n in onnx.load(str(exported / bundle.ONNX_FILE)).graph.node for o in n.output}
    users = [n for n in nodes.values() if "images" in n.input]
    assert [(n.op_type, n.attribute[0].i) for n in users] == [("Cast", onnx.TensorProto.FLOAT)]
    last = nodes["classes"]
    assert last.op_type == "Cast" and nodes[last.input[0]].op_type == "Cast"
    assert nodes[last.input[0]].attribute[0].i == onnx.TensorProto.FLOAT


def test_the_input_normalisation_as_one_conv_gives_the_same_outputs(exported):
    """The INT8 graphs' form of the normalisation: one grouped 1x1 Conv instead of Sub and Div."""
    import onnxruntime as ort
    model = onnx.load(str(exported / bundle.ONNX_FILE))
    conv = passes.normalise_as_conv(model)
    assert conv is not None
    ops = [n.op_type for n in conv.graph.node]
    assert "Sub" not in ops and "Div" not in ops and passes.NORM_CONV in {n.name for n in conv.graph.node}
    x = np.random.default_rng(0).integers(0, 256, (2, 64, 128, 3), dtype=np.uint8)
    run = [ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"images": x})
           for m in (model, conv)]
    assert (run[0][0] == run[1][0]).mean() > 0.999 and np.allclose(run[0][1], run[1][1], atol=1e-4)
    assert passes.normalise_as_conv(conv) is None  # nothing left to replace


def test_export_matches_torch_at_another_batch_size(exported):
    ver = bundle.load_version(exported)
    frames = np.random.default_rng(5).integers(0, 256, (3, 64, 128, 3), dtype=np.uint8)
    got = xonnx.run_onnx(exported / bundle.ONNX_FILE, frames, ["classes", "confidence"])
    with torch.no_grad():
        classes, conf = Deployed(ver.net)(torch.from_numpy(frames))
    assert got["classes"].dtype == np.uint8 and got["classes"].shape == (3, 64, 128)
    assert (got["classes"] == classes.numpy()).mean() >= 0.999
    assert np.abs(got["confidence"] - conf.numpy()).max() < 1e-4


def test_export_report_records_parity_and_fast_graph(exported):
    report = json.loads((exported / xonnx.EXPORT_FILE).read_text())
    check = report["parity"]["onnxruntime-cpu"]
    assert check["max_logit_diff"] <= 1e-3 and check["class_agreement"] >= 0.999
    assert report["onnx"]["sha256"] == bundle.sha256_file(exported / bundle.ONNX_FILE)
    assert report["weights_sha256"] == bundle.read_meta(exported)["sha256"]
    assert "classes-last" in report["onnx"]["graph"]
    soft = [n for n in onnx.load(str(exported / bundle.ONNX_FILE)).graph.node if n.op_type == "Softmax"]
    assert [a.i for a in soft[0].attribute if a.name == "axis"] == [3]  # reductions over the last axis


def test_unchanged_export_is_reused_and_force_redoes_it(exported):
    assert xonnx.export_onnx(exported).reused
    assert not xonnx.export_onnx(exported, force=True).reused
    xonnx.check_onnx(exported)  # still consistent after the rewrite


def test_failed_parity_leaves_previous_artifacts_untouched(tiny_bundle, monkeypatch):
    vdir = xonnx.export_onnx(tiny_bundle).path.parent
    before = _snapshot(vdir)
    real = parity.torch_reference

    def off_by_a_bit(net, images, batch=2):
        ref = real(net, images, batch)
        return {**ref, "logits": ref["logits"] + 0.01}
    monkeypatch.setattr(parity, "torch_reference", off_by_a_bit)
    with pytest.raises(UserError, match="parity check.*left as it was"):
        xonnx.export_onnx(tiny_bundle, force=True)
    assert _snapshot(vdir) == before


def test_a_broken_graph_pass_falls_back_to_a_verified_graph(tiny_bundle, monkeypatch):
    def wrong_axis(model, size):
        m = onnx.ModelProto.FromString(model.SerializeToString())
        next(n for n in m.graph.node if n.op_type == "Softmax").attribute[0].i = 2  # softmax over H: wrong
        return m
    monkeypatch.setattr(passes, "classes_last", wrong_axis)
    res = xonnx.export_onnx(tiny_bundle)
    assert res.report["onnx"]["graph"] in ("onnxslim", "raw")  # raw where onnxslim is not installed
    assert res.report["parity"]["onnxruntime-cpu"]["class_agreement"] >= 0.999


def test_a_model_with_a_bank_of_normalisation_sets_exports_with_its_routing(small_net, tmp_path):
    from conftest import three_set_model
    from mas3_edge.runtime.engines import load_engine
    net, frames = three_set_model(small_net)
    vdir = bundle.save_version(tmp_path / "b", net)
    xonnx.export_onnx(vdir)  # raises if ONNX Runtime and PyTorch disagree
    ort, ref = load_engine(vdir, "onnxruntime", "cpu").infer(frames), load_engine(vdir, "torch", "cpu").infer(frames)
    assert (ort[0] == ref[0]).mean() >= 0.999 and np.abs(ort[1] - ref[1]).max() < 1e-3


def test_version_without_weights_is_one_clear_error(tiny_bundle):
    vdir = bundle.resolve(tiny_bundle)
    (vdir / bundle.MODEL_FILE).unlink()
    with pytest.raises(UserError, match="no weights"):
        xonnx.export_onnx(tiny_bundle)
    assert not (vdir / bundle.ONNX_FILE).exists()


def test_check_onnx_rejects_missing_foreign_and_stale_files(exported, tmp_path):
    import shutil
    vdir = tmp_path / "v"
    shutil.copytree(exported, vdir)
    with pytest.raises(UserError, match="run `mas3-edge export"):
        (vdir / xonnx.EXPORT_FILE).rename(vdir / "x.json")
        xonnx.check_onnx(vdir)
    (vdir / "x.json").rename(vdir / xonnx.EXPORT_FILE)
    report = json.loads((vdir / xonnx.EXPORT_FILE).read_text())
    (vdir / xonnx.EXPORT_FILE).write_text(json.dumps({**report, "weights_sha256": "0" * 64}))
    with pytest.raises(UserError, match="other weights"):
        xonnx.check_onnx(vdir)
    (vdir / xonnx.EXPORT_FILE).write_text(json.dumps(report))
    (vdir / bundle.ONNX_FILE).write_bytes(b"not an onnx file")
    with pytest.raises(UserError, match="corrupt or replaced"):
        xonnx.check_onnx(vdir)
    (vdir / bundle.ONNX_FILE).unlink()
    with pytest.raises(UserError, match="has no model.onnx"):
        xonnx.check_onnx(vdir)


def test_check_images_fall_back_to_smooth_images(monkeypatch):
    monkeypatch.setattr(parity, "_synth_frames", lambda n, size: None)
    images, source = parity.check_images((32, 64), n_random=1, n_frames=2)
    assert source == "smooth-random" and images.shape == (3, 32, 64, 3) and images.dtype == np.uint8
    assert np.abs(np.diff(images[1].astype(int), axis=1)).mean() < 20  # smooth, unlike the noise image


def test_parity_floors_depend_on_precision():
    p = parity.Parity("fp16", 4, "synth", class_agreement=0.997, max_conf_diff=1e-2)
    assert p.failures() == []
    assert p.__class__("fp32", 4, "synth", 0.997, 1e-2).failures()  # both numbers miss the fp32 floors
    assert parity.Parity("fp32", 4, "synth", 1.0, 0.0, max_logit_diff=2e-3).failures()
    # the logit floor is relative to the largest logit above 1: rounding grows with the logits
    assert not parity.Parity("fp32", 4, "synth", 1.0, 0.0, max_logit_diff=2e-3, logit_scale=100.0).failures()
    assert parity.Parity("fp32", 4, "synth", 1.0, 0.0, max_logit_diff=0.2, logit_scale=100.0).failures()


# ---------------------------------------------------------------- TensorRT cache (no TensorRT needed)

@pytest.fixture
def fake_trt(monkeypatch):
    """Pretend a GPU and TensorRT: the builder returns bytes naming what it was built for."""
    state = {"trt": "10.0", "gpu": "GPU-A sm90", "builds": 0, "verify_ok": True}

    def build(onnx_path, spec):
        state["builds"] += 1
        return f"plan {spec.gpu} {spec.trt_version} {spec.precision}".encode()

    def verify(plan, vdir, spec, device=None, graph=None):
        if not state["verify_ok"]:
            raise UserError("the TensorRT fp16 engine failed its parity check")
        return {"class_agreement": 1.0, "max_conf_diff": 0.0, "precision": spec.precision}
    monkeypatch.setattr(xtrt, "trt_version", lambda: state["trt"])
    monkeypatch.setattr(xtrt, "gpu_name", lambda device=None: state["gpu"])
    monkeypatch.setattr(xtrt, "build_engine", build)
    monkeypatch.setattr(xtrt, "verify_engine", verify)
    return state


def test_engine_spec_key_and_profiles():
    spec = xtrt.EngineSpec("a" * 64, "10.0", "GPU sm90", "fp16", (64, 128), (8, 1))
    assert spec.batch_sizes == (1, 8) and spec.profiles() == [(1, 1, 1), (2, 8, 8)]
    changed = [xtrt.EngineSpec("b" * 64, "10.0", "GPU sm90", "fp16", (64, 128), (1, 8)),
               xtrt.EngineSpec("a" * 64, "10.1", "GPU sm90", "fp16", (64, 128), (1, 8)),
               xtrt.EngineSpec("a" * 64, "10.0", "GPU sm80", "fp16", (64, 128), (1, 8)),
               xtrt.EngineSpec("a" * 64, "10.0", "GPU sm90", "fp32", (64, 128), (1, 8)),
               xtrt.EngineSpec("a" * 64, "10.0", "GPU sm90", "fp16", (64, 128), (1, 4))]
    assert len({spec.key(), *(c.key() for c in changed)}) == 6
    with pytest.raises(UserError):
        xtrt.EngineSpec("a", "10", "g", "int4", (64, 128), (1,))


def test_engine_cache_builds_once_and_rebuilds_what_is_stale(exported, tmp_path, fake_trt):
    import shutil
    vdir = tmp_path / "v"
    shutil.copytree(exported, vdir)
    path, info = xtrt.ensure_engine(vdir)
    assert fake_trt["builds"] == 1 and info["parity"]["class_agreement"] == 1.0
    assert xtrt.ensure_engine(vdir)[0] == path and fake_trt["builds"] == 1  # unchanged: never rebuilt
    fake_trt["gpu"] = "GPU-B sm80"
    other, _ = xtrt.ensure_engine(vdir)
    assert other != path and fake_trt["builds"] == 2 and path.exists()  # kept for the other GPU
    other.write_bytes(b"truncated")
    assert xtrt.ensure_engine(vdir)[0] == other and fake_trt["builds"] == 3  # corrupt: rebuilt
    assert b"GPU-B" in other.read_bytes()
    fake_trt["trt"] = "10.1"
    newest, _ = xtrt.ensure_engine(vdir)
    assert fake_trt["builds"] == 4 and not path.exists() and not other.exists()  # old TensorRT: pruned
    assert [e["spec"]["trt_version"] for e in xtrt.EngineCache(vdir).entries()] == ["10.1"]


def test_failed_engine_check_caches_nothing(exported, tmp_path, fake_trt):
    import shutil
    vdir = tmp_path / "v"
    shutil.copytree(exported, vdir)
    fake_trt["verify_ok"] = False
    with pytest.raises(UserError, match="parity"):
        xtrt.ensure_engine(vdir)
    assert not list((vdir / xtrt.ENGINE_DIR).glob("*.plan")) if (vdir / xtrt.ENGINE_DIR).exists() else True


def test_engine_needs_a_verified_onnx(tiny_bundle, fake_trt):
    with pytest.raises(UserError, match="no model.onnx"):
        xtrt.ensure_engine(bundle.resolve(tiny_bundle))
    assert fake_trt["builds"] == 0


@pytest.mark.skipif(xtrt.tensorrt_status()[0], reason="TensorRT is usable here")
def test_missing_tensorrt_is_one_clear_error():
    with pytest.raises(UserError, match="TensorRT"):
        xtrt.require_tensorrt()


@pytest.mark.tensorrt
@pytest.mark.skipif(not xtrt.tensorrt_status()[0], reason="needs TensorRT and a CUDA GPU")
@pytest.mark.parametrize("precision", ["fp16", "fp32"])
def test_real_tensorrt_engine_builds_and_passes_parity(exported, tmp_path, precision):
    import shutil
    vdir = tmp_path / "v"
    shutil.copytree(exported, vdir)
    path, info = xtrt.ensure_engine(vdir, precision, (1, 4))
    assert path.is_file() and info["parity"]["class_agreement"] >= parity.MIN_AGREEMENT[precision]


# ---------------------------------------------------------------- CLI

def _cli(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    from mas3_edge.cli import main
    monkeypatch.setattr(sys, "argv", ["mas3-edge", *args])
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code or 0
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_export_prints_table_and_writes_files(tiny_bundle, monkeypatch, capsys):
    code, out, _ = _cli(monkeypatch, capsys, "export", "--bundle", str(tiny_bundle), "--engine", "all")
    assert code == 0
    assert "onnx" in out and "100.0000%" in out and "written" in out
    assert "tensorrt" in out  # built, or skipped with the reason
    assert (bundle.resolve(tiny_bundle) / xonnx.EXPORT_FILE).is_file()


@pytest.mark.skipif(xtrt.tensorrt_status()[0], reason="TensorRT is usable here")
def test_cli_export_tensorrt_without_tensorrt_fails_cleanly(tiny_bundle, monkeypatch, capsys):
    code, _, err = _cli(monkeypatch, capsys, "export", "--bundle", str(tiny_bundle), "--engine", "tensorrt")
    assert code == 1 and err.count("\n") == 1 and "TensorRT" in err
    assert not (bundle.resolve(tiny_bundle) / bundle.ONNX_FILE).exists()  # failed before any work


def test_cli_export_bad_option_fails_cleanly(tiny_bundle, monkeypatch, capsys):
    code, _, err = _cli(monkeypatch, capsys, "export", "--bundle", str(tiny_bundle), "--engine", "openvino")
    assert code == 1 and "--engine must be one of" in err
