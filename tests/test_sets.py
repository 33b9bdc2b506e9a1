"""export.sets: an adapted model's per-set ONNX layout (router + one folded graph per set), its
parity check, the engines that load it, and tools/bench_sets.py."""
from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import three_set_model
from mas3_edge import bundle
from mas3_edge.errors import UserError
from mas3_edge.export import onnx as xonnx
from mas3_edge.export import sets as xsets
from mas3_edge.export import tensorrt as xtrt
from mas3_edge.runtime.engines import load_engine
from mas3_edge.runtime.ort_engine import OrtEngine

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def per_set(tmp_path_factory):
    """A three-set version exported with its per-set layout, and frames of each domain (3 each)."""
    import torch
    from conftest import SMALL
    from mas3_edge.model import SegNet
    torch.manual_seed(0)
    net, frames = three_set_model(SegNet(SMALL).eval())
    vdir = bundle.save_version(tmp_path_factory.mktemp("sets") / "b", net)
    xonnx.export_onnx(vdir, per_set=True)
    return vdir, frames


def test_per_set_export_writes_a_router_and_a_checked_graph_per_set(per_set):
    vdir, _ = per_set
    report = json.loads((vdir / xonnx.EXPORT_FILE).read_text())
    sets = report["sets"]
    assert report["settings"]["per_set"] is True and sets["count"] == 3
    assert [g["file"] for g in sets["graphs"]] == [f"sets/set-{s}.onnx" for s in range(3)]
    for g in sets["graphs"]:  # every set checked against PyTorch with that set forced
        assert g["parity"]["max_logit_diff"] <= 1e-3 and g["parity"]["class_agreement"] >= 0.999
        assert bundle.sha256_file(vdir / g["file"]) == g["sha256"]
    assert sets["router"]["parity"]["disagree"] == 0 and sets["router"]["parity"]["images"] == 6
    router, graphs = xsets.check_sets(vdir, report)
    assert router.name == "router.onnx" and len(graphs) == 3


def test_per_set_graphs_serve_what_the_blended_graph_and_pytorch_serve(per_set):
    vdir, frames = per_set
    routed = load_engine(vdir, "onnxruntime", "cpu", per_set=True)
    blended = load_engine(vdir, "onnxruntime", "cpu")  # auto on a CPU: the blended model.onnx
    torch_ = load_engine(vdir, "torch", "cpu")
    assert routed.provider.endswith("3 per-set graphs and a router") and "per-set" not in blended.provider
    for idx in ([0, 3, 6], [6, 0], [4], list(range(9))):  # mixed batches in any order, and one set alone
        (a, pa), (b, pb), (c, pc) = routed.infer(frames[idx]), blended.infer(frames[idx]), torch_.infer(frames[idx])
        assert (a == c).mean() >= 0.999 and (b == c).mean() >= 0.999
        assert np.abs(pa - pc).max() < 1e-3 and np.abs(pb - pc).max() < 1e-3


def test_engines_loaded_without_confidence_serve_the_same_classes_without_its_softmax(per_set):
    import onnx

    from mas3_edge.export.passes import classes_only
    vdir, frames = per_set
    for per in (True, False):
        full = load_engine(vdir, "onnxruntime", "cpu", per_set=per)
        trimmed = load_engine(vdir, "onnxruntime", "cpu", per_set=per, confidence=False)
        for idx in ([0, 3, 6], [4], list(range(9))):  # mixed batches and one set alone
            (a, _), (b, conf) = full.infer(frames[idx]), trimmed.infer(frames[idx])
            assert conf is None and (a == b).all()
    graph = classes_only(onnx.load(str(vdir / "sets" / "set-1.onnx")))
    assert graph is not None and [o.name for o in graph.graph.output] == ["classes"]
    assert not any(n.op_type in ("Softmax", "ReduceMax") for n in graph.graph.node)
    assert classes_only(graph) is None  # no confidence tail left: nothing to trim


def test_router_routes_each_domain_to_its_own_set(per_set):
    vdir, frames = per_set
    route = xonnx.run_onnx(vdir / "sets" / xsets.ROUTER_FILE, frames, [xsets.ROUTE])[xsets.ROUTE]
    assert route.dtype == np.int32 and route.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_a_replaced_set_graph_is_refused_and_re_exported(per_set, tmp_path):
    vdir = tmp_path / "v"
    shutil.copytree(per_set[0], vdir)
    (vdir / "sets" / "set-1.onnx").write_bytes((vdir / "sets" / "set-0.onnx").read_bytes())  # a valid graph, not this one
    with pytest.raises(UserError, match="set-1.onnx is missing or not the file export checked"):
        OrtEngine(vdir, per_set=True)
    res = xonnx.export_onnx(vdir, per_set=True)
    assert not res.reused and bundle.sha256_file(vdir / "sets" / "set-1.onnx") == res.report["sets"]["graphs"][1]["sha256"]


def test_blended_re_export_drops_the_per_set_graphs_and_old_exports_still_load(per_set, tmp_path):
    vdir = tmp_path / "v"
    shutil.copytree(per_set[0], vdir)
    res = xonnx.export_onnx(vdir, per_set=False)
    assert "sets" not in res.report and not (vdir / "sets").exists()
    with pytest.raises(UserError, match="without per-set graphs"):
        OrtEngine(vdir, per_set=True)
    report = json.loads((vdir / xonnx.EXPORT_FILE).read_text())  # an export.json from before per-set graphs
    del report["settings"]["per_set"]
    (vdir / xonnx.EXPORT_FILE).write_text(json.dumps(report))
    frames = per_set[1]
    assert load_engine(vdir, "onnxruntime", "cpu").infer(frames[:2])[0].shape == (2, 64, 128)


def test_one_set_models_get_no_per_set_layout(tiny_bundle):
    res = xonnx.export_onnx(tiny_bundle, per_set=True)
    assert res.report["settings"]["per_set"] is False and "sets" not in res.report
    assert not (bundle.resolve(tiny_bundle) / "sets").exists()


def test_a_router_that_disagrees_with_pytorch_fails_the_export(small_net, tmp_path, monkeypatch):
    net, _ = three_set_model(small_net)
    vdir = bundle.save_version(tmp_path / "b", net)
    real = xsets.check_router
    monkeypatch.setattr(xsets, "check_router", lambda n, got, images: real(n, (np.asarray(got) + 1) % 3, images))
    with pytest.raises(UserError, match="router chose another normalisation set"):
        xonnx.export_onnx(vdir, per_set=True)
    assert not (vdir / bundle.ONNX_FILE).exists() and not (vdir / "sets").exists()


def test_tensorrt_caches_one_plan_per_graph_and_prunes_none_of_them(per_set, tmp_path, monkeypatch):
    vdir = tmp_path / "v"
    shutil.copytree(per_set[0], vdir)
    builds = []
    monkeypatch.setattr(xtrt, "trt_version", lambda: "10.0")
    monkeypatch.setattr(xtrt, "gpu_name", lambda device=None: "GPU sm90")
    monkeypatch.setattr(xtrt, "build_engine", lambda path, spec: builds.append(path.name) or path.name.encode())
    monkeypatch.setattr(xtrt, "verify_engine", lambda plan, vdir, spec, device=None, graph=None: {"graph": graph})
    graphs = ["sets/router.onnx", "sets/set-0.onnx", "sets/set-1.onnx", "sets/set-2.onnx", None]
    plans = [xtrt.ensure_engine(vdir, graph=g)[0] for g in graphs]
    assert builds == ["router.onnx", "set-0.onnx", "set-1.onnx", "set-2.onnx", "model.onnx"]
    assert len(set(plans)) == 5 and all(p.exists() for p in plans)  # a later build pruned no sibling
    assert [xtrt.ensure_engine(vdir, graph=g)[0] for g in graphs] == plans and len(builds) == 5  # all cached
    with pytest.raises(UserError, match="has no graph sets/set-7.onnx"):
        xtrt.ensure_engine(vdir, graph="sets/set-7.onnx")


def test_bench_sets_quick_run_writes_table_and_json(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_sets", ROOT / "tools" / "bench_sets.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "sets.json"
    bench.main(["--quick", "--sets", "1,2", "--seconds", "0.3", "--threads", "1", "--out", str(out)])
    rows = json.loads(out.read_text())["results"]
    cells = {(r["engine"], r["sets"]) for r in rows}
    assert cells == {("onnxruntime", 1), ("onnxruntime", 2), ("onnxruntime-per-set", 2), ("torch", 1), ("torch", 2)}
    assert all(r["p50_ms"] > 0 and r["cpu_p50_ms"] > 0 and r["vs_one_set"] > 0 for r in rows)
    assert all(r["vs_one_set"] == pytest.approx(1.0) for r in rows if r["sets"] == 1)
    assert "| onnxruntime-per-set | 64x128 | 1 | 2 |" in capsys.readouterr().out


def test_an_export_from_before_per_set_graphs_is_still_current(tiny_bundle):
    first = xonnx.export_onnx(tiny_bundle)
    vdir = bundle.resolve(tiny_bundle)
    report = json.loads((vdir / xonnx.EXPORT_FILE).read_text())
    del report["settings"]["per_set"]  # as export.json was written before
    (vdir / xonnx.EXPORT_FILE).write_text(json.dumps(report))
    assert xonnx.export_onnx(tiny_bundle).reused and first.report["settings"]["per_set"] is False


def test_int8_calibrates_the_per_set_graphs_the_engine_serves_not_the_blended_one(per_set, tmp_path, monkeypatch):
    from mas3_edge.export import quantize
    vdir, frames = per_set
    vdir = Path(shutil.copytree(vdir.parent.parent, tmp_path / "b")) / "versions" / vdir.name
    monkeypatch.setattr(quantize, "MIN_AGREEMENT", 0.0)  # an untrained network: which graphs, not their parity
    entry = quantize.quantize_version(vdir, frames)
    sets = json.loads((vdir / xonnx.EXPORT_FILE).read_text())["sets"]["graphs"]
    assert [g["from"] for g in entry["graphs"]] == [g["file"] for g in sets] and len(sets) == 3
    assert entry["passed"] and not (vdir / quantize.INT8_FILE).exists()
    engine = load_engine(vdir, "onnxruntime", "cpu", precision="int8", threads=1)
    assert engine.precision == "int8" and "per-set graphs" in engine.provider
    blended = load_engine(vdir, "onnxruntime", "cpu", precision="int8", threads=1, per_set=False)
    assert blended.precision == "fp32" and "per-set graphs carry INT8" in blended.precision_note
