"""Image IO, the dataset layouts and their label mappings, corruptions and the data CLI."""
from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from mas3_edge import data
from mas3_edge.cli.data import app
from mas3_edge.errors import UserError


def _png(path: Path, arr: np.ndarray) -> Path:
    """Write with cv2 directly (BGR order, any depth), the way foreign datasets are stored."""
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), arr)
    return path


def test_read_image_converts_every_layout(tmp_path):
    grey = _png(tmp_path / "g.png", np.full((4, 6), 50, np.uint8))
    assert data.read_image(grey).shape == (4, 6, 3) and (data.read_image(grey) == 50).all()
    deep = _png(tmp_path / "d.png", np.full((4, 6, 3), 65535, np.uint16))
    assert data.read_image(deep).dtype == np.uint8 and (data.read_image(deep) == 255).all()
    bgra = np.zeros((4, 6, 4), np.uint8)
    bgra[..., 0], bgra[..., 3] = 200, 255  # blue in cv2's order
    rgb = data.read_image(_png(tmp_path / "a.png", bgra))
    assert rgb.shape == (4, 6, 3) and (rgb[..., 2] == 200).all() and (rgb[..., 0] == 0).all()


@pytest.mark.parametrize("content", [b"", b"not a png at all", None])
def test_read_image_bad_files_name_the_file(tmp_path, content):
    path = tmp_path / "bad.png"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(UserError, match="bad.png"):
        data.read_image(path)


def test_write_png_round_trip_is_rgb_and_atomic(tmp_path):
    img = np.random.default_rng(0).integers(0, 255, (5, 7, 3), dtype=np.uint8)
    data.write_png(tmp_path / "x" / "i.png", img)
    assert np.array_equal(data.read_image(tmp_path / "x" / "i.png"), img)
    assert np.array_equal(cv2.imread(str(tmp_path / "x" / "i.png"))[..., ::-1], img)
    assert [p.name for p in (tmp_path / "x").iterdir()] == ["i.png"]  # no temp file left


def test_read_label_checks_ids(tmp_path):
    lbl = np.array([[0, 18, 255], [19, 40, 3]], np.uint8)
    path = _png(tmp_path / "l.png", lbl)
    with pytest.raises(UserError, match=r"l\.png.*19, 40"):
        data.read_label(path)
    assert data.read_label(path, strict=False).tolist() == [[0, 18, 255], [255, 255, 3]]


def _folder(root: Path, n: int = 3, labels: bool = True, size=(20, 40)) -> Path:
    rng = np.random.default_rng(1)
    for i in range(n):
        _png(root / "images" / f"f{i}.png", rng.integers(0, 255, (*size, 3), dtype=np.uint8))
        if labels:
            _png(root / "labels" / f"f{i}.png", np.full(size, i, np.uint8))
    return root


def test_folder_dataset(tmp_path):
    ds = data.FolderDataset(_folder(tmp_path / "ds"), size=(10, 16))
    assert len(ds) == 3
    img, lbl = ds[2]
    assert img.shape == (10, 16, 3) and img.dtype == np.uint8
    assert lbl.shape == (10, 16) and (lbl == 2).all()
    unl = data.FolderDataset(_folder(tmp_path / "u", labels=False), labels=False)
    assert unl[0].shape == (20, 40, 3)
    with pytest.raises(UserError, match="label missing"):
        data.FolderDataset(tmp_path / "u")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no images"):
        data.list_images(tmp_path / "empty")
    with pytest.raises(UserError, match="no such folder"):
        data.list_images(tmp_path / "missing")


def test_cityscapes_layout_and_mapping(tmp_path):
    root = tmp_path / "cs"
    ids = np.array([[7, 8, 26, 33], [0, 24, 23, 9]], np.uint8)  # road sidewalk car bicycle / ...
    _png(root / "leftImg8bit/val/aachen/aachen_000000_000019_leftImg8bit.png",
         np.zeros((2, 4, 3), np.uint8))
    _png(root / "gtFine/val/aachen/aachen_000000_000019_gtFine_labelIds.png", ids)
    ds = data.open_dataset(root, "cityscapes", split="val")
    assert len(ds) == 1
    assert ds[0][1].tolist() == [[0, 1, 13, 18], [255, 11, 10, 255]]
    with pytest.raises(UserError, match="train"):
        data.open_dataset(root, "cityscapes", split="train")


def test_gta5_layout_and_mapping(tmp_path):
    root = tmp_path / "gta"
    _png(root / "images/00001.png", np.zeros((2, 3, 3), np.uint8))
    _png(root / "labels/00001.png", np.array([[11, 21, 31], [32, 27, 14]], np.uint8))
    assert data.open_dataset(root, "gta5")[0][1].tolist() == [[2, 8, 16], [17, 14, 255]]
    assert data.open_dataset(root, "gta5", labels=False)[0].shape == (2, 3, 3)


def test_synthia_layout_mapping_and_subsets(tmp_path):
    root = tmp_path / "synthia"
    cls = np.array([[3, 4, 2, 21, 5, 7], [16, 18, 20, 8, 11, 0]], np.uint16)
    gt = np.zeros((2, 6, 3), np.uint16)
    gt[..., 2] = cls  # SYNTHIA's first (R) channel holds the class; cv2 stores BGR
    gt[..., 1] = 999  # instance ids must not leak into the class
    _png(root / "RGB/0000000.png", np.zeros((2, 6, 3), np.uint8))
    _png(root / "GT/LABELS/0000000.png", gt)
    lbl19 = data.open_dataset(root, "synthia")[0][1]
    assert lbl19.tolist() == [[0, 1, 2, 3, 4, 5], [9, 14, 16, 13, 18, 255]]
    lbl16 = data.open_dataset(root, "synthia", classes=16)[0][1]
    assert lbl16.tolist() == [[0, 1, 2, 3, 4, 5], [255, 255, 255, 13, 18, 255]]
    lbl13 = data.open_dataset(root, "synthia", classes=13)[0][1]
    assert lbl13.tolist() == [[0, 1, 2, 255, 255, 255], [255, 255, 255, 13, 18, 255]]
    with pytest.raises(UserError):
        data.open_dataset(root, "synthia", classes=7)
    with pytest.raises(UserError, match="kind"):
        data.open_dataset(root, "kitti")


# Cityscapes label ids and the train ids they map to (road sidewalk car bicycle / unlabeled person
# bus rail track); both targets below store these labelIds.
_CS_IDS = np.array([[7, 8, 26, 33], [0, 24, 28, 10]], np.uint8)
_CS_TRAIN = [[0, 1, 13, 18], [255, 11, 15, 255]]


def _anon_pair(img_dir: Path, gt_dir: Path | None, seq: str, frame: str, value: int = 0) -> None:
    """One frame of the ACDC / Dark Zurich layout: {seq}/{frame}_rgb_anon.png (+ _gt_labelIds)."""
    _png(img_dir / seq / f"{frame}_rgb_anon.png", np.full((2, 4, 3), value, np.uint8))
    if gt_dir is not None:
        _png(gt_dir / seq / f"{frame}_gt_labelIds.png", _CS_IDS)
        _png(gt_dir / seq / f"{frame}_gt_labelTrainIds.png", np.zeros((2, 4), np.uint8))  # unused


def _acdc(root: Path) -> Path:
    for k, cond in enumerate(data.ACDC_CONDITIONS):
        for split in ("train", "val"):
            _anon_pair(root / "rgb_anon" / cond / split, root / "gt" / cond / split,
                       f"GOPR047{k}", f"GOPR047{k}_frame_00000{k}", value=10 * k)
        _anon_pair(root / "rgb_anon" / cond / "test", None, f"GOPR049{k}", f"GOPR049{k}_frame_000001")
        _anon_pair(root / "rgb_anon" / cond / "train_ref", None, f"GOPR047{k}_ref",
                   f"GOPR047{k}_frame_00000{k}_ref")  # the clear-weather references: not a target
    return root


def test_acdc_layout_conditions_and_mapping(tmp_path):
    root = _acdc(tmp_path / "acdc")
    both = data.open_dataset(root, "acdc", split="val")
    assert len(both) == 4 and [img[0, 0, 0] for img, _ in both] == [0, 10, 20, 30]
    assert all(lbl.tolist() == _CS_TRAIN for _, lbl in both)
    night = data.open_dataset(root, "acdc-night", split="train")
    assert len(night) == 1 and night[0][0][0, 0, 0] == 10
    assert "/night/train/" in night.labels[0].as_posix()
    test = data.open_dataset(root, "acdc-fog", split="test", labels=False)
    assert len(test) == 1 and test[0].shape == (2, 4, 3)


def test_acdc_bad_inputs_are_one_clear_line(tmp_path):
    root = _acdc(tmp_path / "acdc")
    with pytest.raises(UserError, match="ACDC condition 'sand'.*fog, night, rain, snow"):
        data.open_dataset(root, "acdc-sand", split="val")
    with pytest.raises(UserError, match="no labels for the test split"):
        data.open_dataset(root, "acdc", split="test")
    with pytest.raises(UserError, match=r"rgb_anon/fog/val: missing.*ACDC"):
        data.open_dataset(tmp_path / "nowhere", "acdc-fog", split="val")
    (root / "gt/rain/val/GOPR0472/GOPR0472_frame_000002_gt_labelIds.png").unlink()
    with pytest.raises(UserError, match=r"GOPR0472_frame_000002_gt_labelIds\.png: label missing"):
        data.open_dataset(root, "acdc", split="val")
    assert len(data.open_dataset(root, "acdc-rain", split="val", labels=False)) == 1
    shutil.rmtree(root / "rgb_anon/snow")  # "acdc" means all four conditions
    with pytest.raises(UserError, match=r"rgb_anon/snow/val: missing"):
        data.open_dataset(root, "acdc", split="val", labels=False)


def _dark_zurich(root: Path) -> Path:
    for k, time in enumerate(data.DARK_ZURICH_TIMES):
        _anon_pair(root / "rgb_anon/train" / time, None, f"GOPR035{k}", f"GOPR035{k}_frame_000001",
                   value=10 * k)
    _anon_pair(root / "rgb_anon/val/night", root / "gt/val/night", "GOPR0356", "GOPR0356_frame_000321")
    _anon_pair(root / "rgb_anon/val/night", root / "gt/val/night", "GOPR0356", "GOPR0356_frame_000322")
    _anon_pair(root / "rgb_anon/val_ref/day", None, "GOPR0356_ref", "GOPR0356_frame_000321_ref")
    return root


def test_dark_zurich_layout_times_and_mapping(tmp_path):
    root = _dark_zurich(tmp_path / "dz")
    val = data.open_dataset(root, "dark-zurich", split="val")
    assert len(val) == 2 and all(lbl.tolist() == _CS_TRAIN for _, lbl in val)
    night = data.open_dataset(root, "dark-zurich", split="train", labels=False, size=(4, 8))
    assert len(night) == 1 and night[0].shape == (4, 8, 3) and night[0][0, 0, 0] == 0
    assert data.open_dataset(root, "dark-zurich-twilight", split="train", labels=False)[0][0, 0, 0] == 10
    assert data.open_dataset(root, "dark-zurich-day", split="train", labels=False)[0][0, 0, 0] == 20


def test_dark_zurich_bad_inputs_are_one_clear_line(tmp_path):
    root = _dark_zurich(tmp_path / "dz")
    with pytest.raises(UserError, match=r"gt/train/night: no Dark Zurich labels.*without labels"):
        data.open_dataset(root, "dark-zurich", split="train")
    with pytest.raises(UserError, match=r"gt/val_ref/day: no Dark Zurich labels"):
        data.open_dataset(root, "dark-zurich-day", split="val_ref")
    assert len(data.open_dataset(root, "dark-zurich-day", split="val_ref", labels=False)) == 1
    with pytest.raises(UserError, match="time of day 'dusk'.*night, twilight, day"):
        data.open_dataset(root, "dark-zurich-dusk", split="train", labels=False)
    with pytest.raises(UserError, match=r"rgb_anon/test/night: missing.*Dark Zurich"):
        data.open_dataset(root, "dark-zurich", split="test")  # images are checked first
    (root / "gt/val/night/GOPR0356/GOPR0356_frame_000322_gt_labelIds.png").unlink()
    with pytest.raises(UserError, match=r"000322_gt_labelIds\.png: label missing \(1 of 2"):
        data.open_dataset(root, "dark-zurich", split="val")


def test_cli_kind_help_names_the_new_kinds():
    from mas3_edge.cli.core import DataKind
    help_text = DataKind.__metadata__[0].help
    assert "acdc" in help_text and "dark-zurich" in help_text


def test_corrupt_folder(tmp_path):
    pytest.importorskip("imagecorruptions")
    src = _folder(tmp_path / "src", n=2, size=(32, 48))
    assert data.corrupt_folder(src, tmp_path / "dst", "gaussian_noise", 3, progress=False) == 2
    out = data.read_image(tmp_path / "dst/images/f0.png")
    assert out.shape == (32, 48, 3)
    assert not np.array_equal(out, data.read_image(src / "images/f0.png"))
    assert (tmp_path / "dst/labels/f1.png").read_bytes() == (src / "labels/f1.png").read_bytes()
    with pytest.raises(UserError, match="unknown corruption"):
        data.corrupt_folder(src, tmp_path / "x", "sunburn", 3)
    with pytest.raises(UserError, match="severity"):
        data.corrupt_folder(src, tmp_path / "x", "fog", 6)


def test_cli_synth_and_corrupt(tmp_path):
    runner = CliRunner()
    res = runner.invoke(app, ["synth", "--domain", "night", "--n", "2", "--out", str(tmp_path / "n"),
                              "--height", "32", "--width", "64", "--no-labels"])
    assert res.exit_code == 0, res.output
    assert "wrote 2 night scenes" in res.output
    assert len(list((tmp_path / "n/images").iterdir())) == 2 and not (tmp_path / "n/labels").exists()
    res = runner.invoke(app, ["synth", "--domain", "snow", "--n", "1", "--out", str(tmp_path / "s")])
    assert isinstance(res.exception, UserError)  # the main app prints it as one line
    pytest.importorskip("imagecorruptions")
    res = runner.invoke(app, ["corrupt", "--src", str(tmp_path / "n"), "--out", str(tmp_path / "c"),
                              "--corruption", "contrast", "--severity", "2"])
    assert res.exit_code == 0, res.output
    assert len(list((tmp_path / "c/images").iterdir())) == 2
