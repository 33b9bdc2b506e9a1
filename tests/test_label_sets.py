"""Label sets other than Cityscapes-19: a 4-class set through metrics, evaluation, datasets, prototype
files, the service's stream header and overlay, and the subscriber; labels-file validation."""
from __future__ import annotations

import dataclasses
import json
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from conftest import SMALL
from test_service import Running, config

from mas3_edge import bundle, data, evaluate as ev, prototypes as P
from mas3_edge.errors import UserError
from mas3_edge.labels import CITYSCAPES, LabelSet, load_labels
from mas3_edge.metrics import Confusion
from mas3_edge.model import SegNet
from mas3_edge.runtime import ros, wire
from mas3_edge.runtime.publisher import Publisher
from mas3_edge.runtime.subscriber import LabelBook, distinct_palette

# colours unlike Cityscapes' at the same ids, so that drawing with the wrong palette shows
FOUR = LabelSet("warehouse4", ("floor", "shelf", "pallet", "person"),
                ((10, 200, 10), (200, 200, 255), (250, 170, 30), (220, 20, 60)))


def _four_net() -> SegNet:
    torch.manual_seed(0)
    return SegNet(dataclasses.replace(SMALL, num_classes=4, embed_dim=4), FOUR).eval()


def _png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), array)


# ---- metrics, evaluation, datasets -------------------------------------------------------------

def test_a_four_class_confusion_names_its_classes_and_ignores_its_ignore_id():
    conf = Confusion(FOUR)
    label = np.array([0, 0, 0, 0, 1, 1, 3, 3, 255, 255])
    pred = np.array([0, 0, 0, 1, 1, 1, 3, 2, 3, 3])
    conf.update(pred, label)
    s = conf.summary()
    assert conf.matrix.shape == (4, 4) and conf.matrix.sum() == 8  # the two ignored pixels are not counted
    assert list(s["per_class_iou"]) == ["floor", "shelf", "pallet", "person"] and s["label_set"] == "warehouse4"
    assert s["per_class_iou"]["floor"] == pytest.approx(75) and s["per_class_iou"]["shelf"] == pytest.approx(200 / 3)
    assert s["per_class_iou"]["pallet"] == 0 and s["per_class_iou"]["person"] == pytest.approx(50)
    with pytest.raises(UserError, match="not a class of label set 'warehouse4'"):
        conf.update(np.array([0]), np.array([18]))  # a Cityscapes id in a 4-class matrix


def _four_folder(root: Path, label: np.ndarray) -> Path:
    _png(root / "images" / "a.png", np.zeros((64, 128, 3), np.uint8))
    _png(root / "labels" / "a.png", label)
    return root


def test_evaluate_a_four_class_model_names_its_classes_and_draws_its_palette(tmp_path, monkeypatch):
    label = np.zeros((64, 128), np.uint8)  # floor above; person left and shelf right below
    label[32:, :64], label[32:, 64:], label[:8, 120:] = 3, 1, 255
    root = _four_folder(tmp_path / "four", label)
    pred = np.zeros((1, 64, 128), np.uint8)
    pred[:, 32:] = 3
    monkeypatch.setattr(ev, "predict", lambda net, images: pred)
    ds = data.open_dataset(root, label_set=FOUR)
    res = ev.evaluate(_four_net(), ds, overlays=tmp_path / "ov")
    assert res["label_set"] == "warehouse4" and res["classes_scored"] == 4
    assert res["per_class_iou"] == {"floor": 100.0, "shelf": 0.0, "pallet": None, "person": 50.0}
    rgb = cv2.cvtColor(cv2.imread(str(tmp_path / "ov" / "0000.png")), cv2.COLOR_BGR2RGB)
    truth, drawn = rgb[:, 128:256], rgb[:, 256:]  # image | truth | prediction
    assert tuple(truth[0, 0]) == FOUR.palette[0] and tuple(truth[40, 10]) == FOUR.palette[3]
    assert tuple(truth[2, 125]) == (0, 0, 0)  # ignore is black
    assert tuple(drawn[40, 10]) == tuple(round(c / 2) for c in FOUR.palette[3])  # blended over black
    cityscapes_ds = data.open_dataset(root)  # ids 0 and 3 are Cityscapes ids too: only the set tells them apart
    with pytest.raises(UserError, match="opened for label set 'cityscapes19'"):
        ev.evaluate(_four_net(), cityscapes_ds)


def test_four_class_labels_are_checked_against_their_own_ids(tmp_path):
    label = np.zeros((64, 128), np.uint8)
    label[0, :3] = (4, 18, 255)  # 4 and 18 are Cityscapes ids, not classes of a 4-class set
    root = _four_folder(tmp_path / "bad", label)
    with pytest.raises(UserError, match=r"label ids 4, 18 are not class ids 0\.\.3 or 255"):
        data.open_dataset(root, label_set=FOUR)[0]
    assert data.open_dataset(root)[0][1][0, :3].tolist() == [4, 18, 255]  # fine for Cityscapes-19
    odd_ignore = dataclasses.replace(FOUR, ignore=200)
    with pytest.raises(UserError, match="or 200"):  # 255 is not this set's ignore id
        data.read_label(root / "labels" / "a.png", num_classes=4, ignore=200)
    assert data.open_dataset(root, labels=False, label_set=odd_ignore)[0].shape == (64, 128, 3)


def test_subsets_and_public_kinds_are_cityscapes_only(tmp_path):
    root = _four_folder(tmp_path / "four", np.zeros((64, 128), np.uint8))
    with pytest.raises(UserError, match="Cityscapes-19 benchmarks; label set 'warehouse4' has 4"):
        data.open_dataset(root, classes=16, label_set=FOUR)
    with pytest.raises(UserError, match="--kind gta5 has Cityscapes-19 labels but the label set is 'warehouse4'"):
        data.open_dataset(tmp_path, "gta5", label_set=FOUR)
    assert data.open_dataset(root, classes=16).classes is not None  # Cityscapes keeps its SYNTHIA subsets
    assert data.open_dataset(root, classes=4, label_set=FOUR).classes is None  # all of K: no subset


def test_eval_command_scores_a_four_class_version_by_its_names_and_refuses_subsets(tmp_path):
    from typer.testing import CliRunner

    from mas3_edge.cli import app
    root = tmp_path / "bundle"
    bundle.save_version(root, _four_net(), info={"note": "4-class test model"})
    data_dir = _four_folder(tmp_path / "four", np.full((64, 128), 2, np.uint8))
    res = CliRunner().invoke(app, ["eval", "--data", str(data_dir), "--bundle", str(root), "--json"])
    assert res.exit_code == 0, res.output
    figures = json.loads(res.stdout)
    assert figures["label_set"] == "warehouse4" and list(figures["per_class_iou"]) == list(FOUR.names)
    res = CliRunner().invoke(app, ["eval", "--data", str(data_dir), "--bundle", str(root), "--subset", "synthia16"])
    assert isinstance(res.exception, UserError)
    assert "--subset synthia16 scores Cityscapes-19 classes but v0001 predicts label set 'warehouse4'" in str(res.exception)


# ---- labels files ------------------------------------------------------------------------------

def _rows(names, rgb=None):
    return [{"id": i, "name": n, "rgb": list(rgb[i]) if rgb else [i, i, i]} for i, n in enumerate(names)]


@pytest.mark.parametrize("doc, message", [
    ({"label_set": "one", "classes": _rows(["floor"])}, "has 1 classes; a label set has 2 to 255"),
    ({"label_set": "big", "classes": _rows([f"c{i}" for i in range(256)])}, "has 256 classes"),
    ({"label_set": "dup", "classes": _rows(["floor", "floor"])}, "names must be distinct"),
    ({"label_set": "rgb", "classes": _rows(["a", "b"], [(0, 0, 0), (300, 0, 0)])}, "RGB colour of three values"),
    ({"label_set": "rgb2", "classes": [{"id": 0, "name": "a", "rgb": [1, 2]}, {"id": 1, "name": "b", "rgb": [1, 2, 3]}]},
     "RGB colour of three values"),
    ({"label_set": "gap", "classes": [{"id": 0, "name": "a", "rgb": [0, 0, 0]}, {"id": 2, "name": "b", "rgb": [1, 1, 1]}]},
     "class ids must be 0..K-1"),
    ({"label_set": "twice", "classes": [{"id": 1, "name": "a", "rgb": [0, 0, 0]}, {"id": 1, "name": "b", "rgb": [1, 1, 1]}]},
     "class ids must be 0..K-1"),
    ({"label_set": "k", "num_classes": 3, "classes": _rows(["a", "b"])}, "num_classes 3 but 2 classes"),
    ({"label_set": "ig", "ignore_id": 1, "classes": _rows(["a", "b"])}, "ignore id 1 must be in 2..255"),
    ({"classes": _rows(["a", "b"])}, "not a labels file"),
])
def test_a_bad_labels_file_is_one_clear_error(tmp_path, doc, message):
    path = tmp_path / "labels.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(UserError, match=message) as e:
        load_labels(path)
    assert "\n" not in str(e.value)


def test_a_labels_file_round_trips_and_cityscapes_is_the_default(tmp_path):
    path = tmp_path / "four.json"
    path.write_text(FOUR.to_json())
    assert load_labels(path) == FOUR and load_labels(None) is CITYSCAPES
    assert wire.label_set_json(FOUR) == path.read_text()
    with pytest.raises(UserError, match="cannot read labels file"):
        load_labels(tmp_path / "missing.json")


# ---- prototype files ---------------------------------------------------------------------------

def _proto4() -> P.Prototypes:
    return P.Prototypes(torch.full((4,), 0.25), torch.randn(4, 4), torch.eye(4).repeat(4, 1, 1), torch.full((4,), 100.0),
                        {"tau": 0.97})


def _meta4(labels: LabelSet | None) -> dict:
    meta = {"architecture": {"num_classes": labels.num_classes if labels else 19, "embed_dim": 4},
            "source_sha256": "abc", "version": "v0001"}
    return meta | ({"labels": labels.to_dict()} if labels else {})


def test_prototypes_record_their_label_set_and_refuse_another(tmp_path):
    path = tmp_path / "p.safetensors"
    P.save(_proto4(), path, "abc", "test", FOUR)
    back = P.load(path, _meta4(FOUR))
    assert (back.meta["label_set"], back.meta["num_classes"]) == ("warehouse4", "4")
    assert json.loads(back.meta["classes"]) == list(FOUR.names)
    other = LabelSet("shelves4", ("a", "b", "c", "d"), FOUR.palette)  # same K, another set
    with pytest.raises(UserError, match="fitted for label set 'warehouse4' .4 classes. but the model's label set "
                                        "is 'shelves4'") as e:
        P.load(path, _meta4(other))
    assert "refit" in str(e.value)
    with pytest.raises(UserError, match="model's label set is 'cityscapes19' .19 classes."):
        P.load(path, _meta4(None))  # a version from before label sets: Cityscapes-19
    with pytest.raises(UserError, match="K=4 but label set 'cityscapes19' has 19"):
        P.save(_proto4(), path, "abc", "test", CITYSCAPES)


# ---- the stream: service, wire, subscriber, ROS info -------------------------------------------

def test_the_service_stamps_and_draws_the_serving_versions_label_set(tmp_path):
    root = tmp_path / "bundle"
    bundle.save_version(root, _four_net(), info={"note": "4-class test model"})
    frames = tmp_path / "black"
    _png(frames / "0.png", np.zeros((64, 128, 3), np.uint8))
    with Running(config(tmp_path, root, str(frames), buffer=None)) as run:
        msgs = run.collect(8, until=lambda m: len(m) >= 3)
    assert msgs, run.lines
    m = msgs[-1]
    assert (m.label_set, m.num_classes) == ("warehouse4", 4) and m.classes.max() < 4
    ov = m.overlay_rgb().astype(float)  # a black frame: the overlay is half the class colours
    mine = np.asarray(FOUR.palette, float)[m.classes] / 2
    theirs = np.asarray(CITYSCAPES.palette, float)[m.classes] / 2
    assert np.median(np.abs(ov - mine).mean(-1)) < 8 < np.median(np.abs(ov - theirs).mean(-1))


def test_the_wire_refuses_a_label_set_id_it_would_cut_short():
    classes = np.zeros((2, 2), np.uint8)
    assert wire.decode(wire.encode("t", 1, 0, classes, label_set="warehouse4", num_classes=4)).label_set == "warehouse4"
    with pytest.raises(wire.WireError, match="at most 16"):
        wire.encode("t", 1, 0, classes, label_set="a-very-long-label-set", num_classes=4)


def _four_msg(i: int = 1) -> bytes:
    classes = (np.arange(8 * 16) % 4).astype(np.uint8).reshape(8, 16)
    return wire.encode("mas3/seg", i, time.time_ns(), classes, version="v0001", label_set="warehouse4", num_classes=4)


def test_ros_info_names_a_known_label_set_and_says_when_it_does_not_know_one():
    msg = wire.decode(_four_msg())
    known = json.loads(ros.info_json(msg, LabelBook([FOUR])))
    assert known["classes"] == list(FOUR.names) and known["palette"][1] == [200, 200, 255] and known["ignore"] == 255
    unknown = json.loads(ros.info_json(msg))
    assert "classes" not in unknown and "'warehouse4' (4 classes) is not known" in unknown["labels_note"]
    five = LabelSet("warehouse4", FOUR.names + ("dock",), FOUR.palette + ((0, 0, 0),))
    assert "labels_note" in json.loads(ros.info_json(msg, LabelBook([five])))  # same id, another K: not it
    assert ros.Converter(book=LabelBook([FOUR])).convert(msg)[0].fields["data"] == json.dumps(known)


def _subscribe(tmp_path: Path, out: str, *extra: str):
    from typer.testing import CliRunner

    from mas3_edge.cli import app
    addr, stop = f"ipc://{tmp_path}/four.sock", threading.Event()

    def publish():
        with Publisher(addr, hwm=1000) as pub:
            i = 0
            while not stop.is_set():
                i += 1
                pub.send(_four_msg(i))
                time.sleep(0.01)

    t = threading.Thread(target=publish, daemon=True)
    t.start()
    try:
        return CliRunner().invoke(app, ["subscribe", "--address", addr, "--all", "--count", "3", "--save",
                                        str(tmp_path / out), "--interval", "0.1", *extra])
    finally:
        stop.set()
        t.join(2)


def _first_png(folder: Path) -> np.ndarray:
    return cv2.cvtColor(cv2.imread(str(sorted(folder.glob("*.png"))[0])), cv2.COLOR_BGR2RGB)


def test_subscribe_colours_a_stream_with_its_labels_file_or_generated_colours(tmp_path):
    labels = tmp_path / "four.json"
    labels.write_text(FOUR.to_json())
    res = _subscribe(tmp_path, "with", "--labels", str(labels))
    assert res.exit_code == 0, res.output
    assert "not known" not in res.output
    rgb = _first_png(tmp_path / "with")
    assert [tuple(rgb[0, j]) for j in range(4)] == list(FOUR.palette)  # ids 0, 1, 2, 3 along the top row

    res = _subscribe(tmp_path, "without")
    assert res.exit_code == 0, res.output
    assert res.output.count("'warehouse4' (4 classes) is not known") == 1  # one warning, not one per message
    rgb = _first_png(tmp_path / "without")
    generated = distinct_palette(4)
    assert [tuple(rgb[0, j]) for j in range(4)] == list(generated) and len(set(generated)) == 4


def test_subscribe_refuses_a_bad_labels_file_before_listening(tmp_path):
    from typer.testing import CliRunner

    from mas3_edge.cli import app
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"label_set": "x", "classes": _rows(["a"])}))
    res = CliRunner().invoke(app, ["subscribe", "--address", f"ipc://{tmp_path}/none.sock", "--labels", str(bad),
                                   "--count", "1"])
    assert isinstance(res.exception, UserError) and "has 1 classes" in str(res.exception)


def test_distinct_palette_stays_distinct_up_to_255_classes():
    big = distinct_palette(255)
    assert len(big) == 255 and len(set(big)) == 255 and (0, 0, 0) not in big


def test_live_miou_counts_k_classes():
    from mas3_edge.runtime.telemetry import Telemetry
    tel = Telemetry(miou_window=2)
    label = np.array([[0, 1], [3, 255]], np.uint8)
    tel.record_labels(np.array([[0, 1], [2, 2]], np.uint8), label, "v0001", num_classes=4, ignore=255)
    assert tel.by_version["v0001"].shape == (4, 4) and tel.by_version["v0001"].sum() == 3
    assert tel.snapshot()["miou_window"] == pytest.approx(100 * (1 + 1 + 0 + 0) / 4)


def test_colours_and_overlays_follow_the_palette_for_any_id_type():
    from mas3_edge.labels import colorize, overlay
    ids = np.array([[0, 1, 2, 3], [4, 255, 0, 3]], np.uint8)  # 4 and 255 are not classes of FOUR: black
    want = np.array([FOUR.palette[i] if i < 4 else (0, 0, 0) for i in ids.ravel()], np.uint8).reshape(2, 4, 3)
    assert (colorize(ids, FOUR.palette) == want).all()
    assert (colorize(np.array([[0, 256, -1, 3]]), FOUR.palette)[0, 1:3] == 0).all()  # past uint8: black, no wrap
    img = np.random.default_rng(0).integers(0, 256, (2, 4, 3), dtype=np.uint8)
    for alpha in (0.3, 0.5):
        ref = img * (1 - alpha) + want * alpha  # the blend in float
        assert np.abs(overlay(img, ids, alpha, FOUR.palette) - ref).max() <= 0.5 + 1e-6


def test_bench_overlay_prints_both_ways_and_they_agree():
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    import bench_overlay
    (row,) = bench_overlay.main(["--sizes", "32x64", "--rounds", "2"])
    assert row["shipped p50 ms"] > 0 and row["max abs difference (quality 100)"] <= 1
