"""Image IO, datasets in a label set's class ids (Cityscapes-19 by default), and common corruptions.

Every dataset yields the same item: an RGB uint8 image (H, W, 3) and, when labels are wanted, a
uint8 label map (H, W) of class ids 0..K-1 with the label set's ignore id (Cityscapes: train ids
0..18, 255 = ignore). The public dataset kinds (cityscapes, gta5, synthia, acdc, dark-zurich) map
to Cityscapes-19; a `folder` dataset holds the ids of whatever label set it is opened with. The
datasets are plain map-style datasets (len + getitem), which torch's DataLoader accepts; torch is
not imported here so that the data commands stay fast.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import cv2
import numpy as np

from .errors import UserError
from .fsutil import atomic_write
from .labels import CITYSCAPES, IGNORE, LABEL_SET_ID, NUM_CLASSES, SUBSETS as LABEL_SUBSETS, LabelSet

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
CORRUPTIONS = (  # the 15 ImageNet-C / Cityscapes-C corruptions (Hendrycks & Dietterich 2019)
    "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur",
    "zoom_blur", "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate",
    "jpeg_compression",
)
# ACDC and Dark Zurich are adverse-condition targets with Cityscapes label ids; "acdc" takes all four
# conditions and "acdc-fog" one of them; "dark-zurich" is night (its labelled split), "dark-zurich-day"
# or "dark-zurich-twilight" the unlabelled references of its train split.
ACDC_CONDITIONS = ("fog", "night", "rain", "snow")
DARK_ZURICH_TIMES = ("night", "twilight", "day")
KINDS = ("folder", "cityscapes", "gta5", "synthia", "acdc", *(f"acdc-{c}" for c in ACDC_CONDITIONS),
         "dark-zurich", *(f"dark-zurich-{t}" for t in DARK_ZURICH_TIMES))


def _lut(pairs: dict[int, int], size: int = 256, fill: int = IGNORE) -> np.ndarray:
    lut = np.full(size, fill, np.uint8)
    for k, v in pairs.items():
        lut[k] = v
    return lut


# Official Cityscapes label id -> train id (cityscapesscripts/helpers/labels.py); GTA5 uses the
# same label ids. Everything else (unlabeled, parking, rail track, guard rail, ...) is ignored.
CITYSCAPES_TO_TRAIN = _lut({7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9,
                            23: 10, 24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18})
# SYNTHIA class id -> Cityscapes train id, as used by AdaptSegNet, ADVENT, DACS, ProDA.
SYNTHIA_TO_TRAIN = _lut({3: 0, 4: 1, 2: 2, 21: 3, 5: 4, 7: 5, 15: 6, 9: 7, 6: 8, 16: 9, 1: 10,
                         10: 11, 17: 12, 8: 13, 18: 14, 19: 15, 20: 16, 12: 17, 11: 18}, 65536)
# labels.SUBSETS by size (19, 16, 13), subsets of Cityscapes-19 only. Labels keep their 19-class train
# ids; classes outside the subset become ignore, and the dataset's `classes` tell evaluate() which
# classes to score.
SUBSETS = {len(c): c for c in LABEL_SUBSETS.values()}


# ---- image IO --------------------------------------------------------------------------------
def _imread(path: str | Path) -> np.ndarray:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise UserError(f"{path}: the file is empty; re-create or remove it")
    arr = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if arr is None or arr.size == 0:
        raise UserError(f"{path}: not a readable image (corrupt or unsupported format)")
    return arr


def _to_uint8(arr: np.ndarray, path: Path) -> np.ndarray:
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.uint16:  # 16-bit: full range maps onto 8 bits
        return ((arr.astype(np.uint32) + 128) // 257).astype(np.uint8)
    if arr.dtype in (np.float32, np.float64):  # HDR/TIFF floats are taken as 0..1
        return (np.clip(np.nan_to_num(arr), 0, 1) * 255 + 0.5).astype(np.uint8)
    raise UserError(f"{path}: unsupported pixel type {arr.dtype}; convert it to 8-bit RGB")


def read_image(path: str | Path) -> np.ndarray:
    """Any grey / BGR / BGRA, 8- or 16-bit image file -> RGB uint8 (H, W, 3)."""
    arr = _to_uint8(_imread(path), Path(path))
    if arr.ndim == 2:
        return cv2.cvtColor(arr, cv2.COLOR_GRAY2RGB)
    channels = arr.shape[2]
    if channels in (1, 2):  # grey (+ alpha)
        return cv2.cvtColor(np.ascontiguousarray(arr[..., 0]), cv2.COLOR_GRAY2RGB)
    if channels == 4:
        return cv2.cvtColor(arr, cv2.COLOR_BGRA2RGB)
    return cv2.cvtColor(arr, cv2.COLOR_BGR2RGB)


def _read_ids(path: str | Path, channel: int = 0) -> np.ndarray:
    """A single-channel id map; colour files give `channel` in RGB order (SYNTHIA: 0)."""
    arr = _imread(path)
    if arr.ndim == 3:
        arr = arr[..., [2, 1, 0, 3][channel] if arr.shape[2] >= 3 else channel]
    return np.ascontiguousarray(arr)


def read_label(path: str | Path, strict: bool = True, num_classes: int = NUM_CLASSES,
               ignore: int = IGNORE) -> np.ndarray:
    """Class-id label map uint8 (H, W) of a K-class label set (default Cityscapes-19, 255 = ignore).
    Ids other than 0..K-1 and `ignore` raise a UserError, or become `ignore` with strict=False."""
    ids = _read_ids(path)
    bad = (ids >= num_classes) & (ids != ignore)
    if bad.any():
        if strict:
            vals = np.unique(ids[bad])
            shown = ", ".join(str(v) for v in vals[:10]) + (" ..." if len(vals) > 10 else "")
            raise UserError(f"{path}: label ids {shown} are not class ids 0..{num_classes - 1} "
                            f"or {ignore} (ignore); convert the labels (or read with strict=False)")
        ids = np.where(bad, ignore, ids)
    return ids.astype(np.uint8)


def write_png(path: str | Path, array: np.ndarray) -> None:
    """Write a PNG atomically (temp file, fsync, rename); (H, W, 3|4) arrays are RGB(A)."""
    path = Path(path)
    if array.ndim == 3 and array.shape[2] == 3:
        array = cv2.cvtColor(array, cv2.COLOR_RGB2BGR)
    elif array.ndim == 3 and array.shape[2] == 4:
        array = cv2.cvtColor(array, cv2.COLOR_RGBA2BGRA)
    ok, buf = cv2.imencode(".png", array)
    if not ok:
        raise UserError(f"{path}: cannot encode an array of shape {array.shape} as PNG")
    atomic_write(path, buf.tobytes())


def list_images(folder: str | Path) -> list[Path]:
    """Sorted image files of a folder, or of its images/ subfolder when it has one."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: no such folder")
    if (folder / "images").is_dir():
        folder = folder / "images"
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise UserError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}) found")
    return files


def track(items, total: int, desc: str):
    """Iterate with a progress bar (rich, else tqdm, else none: progress is optional)."""
    try:
        from rich.progress import track as rich_track
        return rich_track(items, total=total, description=desc, transient=True)
    except ImportError:
        pass
    try:
        from tqdm import tqdm
        return tqdm(items, total=total, desc=desc, leave=False)
    except ImportError:
        return items


# ---- datasets --------------------------------------------------------------------------------
def _scored(classes: int | None, label_set: LabelSet) -> tuple[int, ...] | None:
    """The class ids a subset benchmark scores (SUBSETS: Cityscapes-19 only); None: every class."""
    if classes is None or classes == label_set.num_classes:
        return None
    if label_set.id != LABEL_SET_ID:
        raise UserError(f"class subsets ({', '.join(map(str, sorted(SUBSETS)))}) are Cityscapes-19 benchmarks; "
                        f"label set {label_set.id!r} has {label_set.num_classes} classes, score them all")
    if classes not in SUBSETS:
        raise UserError(f"classes must be one of {sorted(SUBSETS)}, got {classes}")
    return SUBSETS[classes]


class PairDataset:
    """(image, label) pairs read from disk, resized to size (H, W) when given.

    label_fn reads a label file into class ids of `label_set` (default: read_label, which checks them);
    labels=False yields the image alone. `classes` (16 or 13, Cityscapes-19 only) keeps a SYNTHIA
    subset and makes the rest ignore."""

    def __init__(self, images: Sequence[Path], labels: Sequence[Path] | None,
                 label_fn: Callable[[Path], np.ndarray] | None = None,
                 size: tuple[int, int] | None = None, classes: int | None = None,
                 label_set: LabelSet = CITYSCAPES):
        # the class ids a subset benchmark scores (mIoU over these only); None: every class
        self.classes = _scored(classes, label_set)
        # a partial of a module-level function still pickles for DataLoader workers
        label_fn = label_fn or partial(read_label, num_classes=label_set.num_classes, ignore=label_set.ignore)
        self.images, self.labels, self.label_fn, self.label_set = list(images), labels, label_fn, label_set
        self.size = None if size is None else (int(size[0]), int(size[1]))
        kept = range(label_set.num_classes) if self.classes is None else self.classes
        self.keep = _lut({c: c for c in kept}, fill=label_set.ignore)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        img = read_image(self.images[i])
        lbl = None
        if self.labels is not None:
            lbl = self.keep[self.label_fn(self.labels[i])]
            if lbl.shape != img.shape[:2]:  # a resized label would score noise
                raise UserError(f"{self.labels[i]}: label is {lbl.shape[1]}x{lbl.shape[0]} but its image "
                                f"{self.images[i].name} is {img.shape[1]}x{img.shape[0]}; labels must match their "
                                "images")
        if self.size is not None and img.shape[:2] != self.size:
            h, w = self.size
            down = h * w < img.shape[0] * img.shape[1]
            img = cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA if down else cv2.INTER_LINEAR)
        if lbl is None:
            return img
        if lbl.shape != img.shape[:2]:
            lbl = cv2.resize(lbl, img.shape[1::-1], interpolation=cv2.INTER_NEAREST)
        return img, lbl


class FolderDataset(PairDataset):
    """The generic format: images/NAME.* and labels/NAME.png (class ids of `label_set`, checked).
    A folder of images alone, or images/ without labels/, is a valid unlabeled dataset (labels=False)."""

    def __init__(self, root: str | Path, size: tuple[int, int] | None = None,
                 labels: bool = True, classes: int | None = None, label_set: LabelSet = CITYSCAPES):
        images = list_images(root)
        label_files = [Path(root) / "labels" / f"{p.stem}.png" for p in images] if labels else None
        _all_there(label_files, "add labels/NAME.png or open the folder with labels=False")
        super().__init__(images, label_files, None, size, classes, label_set)


def _all_there(label_files: list[Path] | None, hint: str) -> None:
    if label_files is None:  # an unlabeled dataset
        return
    missing = [p for p in label_files if not p.is_file()]
    if missing:
        raise UserError(f"{missing[0]}: label missing ({len(missing)} of {len(label_files)} "
                        f"images have none); {hint}")


def _mapped(lut: np.ndarray, path: Path, channel: int = 0) -> np.ndarray:
    ids = _read_ids(path, channel)
    if ids.max() >= len(lut):
        raise UserError(f"{path}: label id {ids.max()} is out of range for this dataset kind")
    return lut[ids]


def _cityscapes_label(path: Path) -> np.ndarray:  # module-level functions pickle for workers
    return _mapped(CITYSCAPES_TO_TRAIN, path)


def _synthia_label(path: Path) -> np.ndarray:
    return _mapped(SYNTHIA_TO_TRAIN, path, channel=0)


def _need(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise UserError(f"{path}: missing; expected the {what} layout here")
    return path


def _cityscapes(root: Path, split: str, labels: bool) -> tuple[list[Path], list[Path] | None]:
    imgs = sorted(_need(root / "leftImg8bit" / split, "Cityscapes").glob("*/*_leftImg8bit.png"))
    if not labels:
        return imgs, None
    gt = _need(root / "gtFine" / split, "Cityscapes gtFine")
    return imgs, [gt / p.parent.name / p.name.replace("_leftImg8bit.png", "_gtFine_labelIds.png")
                  for p in imgs]


def _flat(root: Path, img_dir: str, lbl_dir: str, what: str, labels: bool):
    imgs = sorted(p for p in _need(root / img_dir, what).iterdir()
                  if p.suffix.lower() in IMAGE_SUFFIXES)
    if not labels:
        return imgs, None
    return imgs, [_need(root / lbl_dir, f"{what} labels") / f"{p.stem}.png" for p in imgs]


def _anon(img_dirs: Sequence[Path], gt_dirs: Sequence[Path] | None, what: str):
    """ACDC / Dark Zurich: {img_dir}/{sequence}/*_rgb_anon.png with labels, when asked for, at
    {gt_dir}/{sequence}/*_gt_labelIds.png (Cityscapes label ids)."""
    imgs: list[Path] = []
    lbls: list[Path] = []
    for i, d in enumerate(img_dirs):
        found = sorted(_need(d, what).glob("*/*_rgb_anon.png"))
        imgs += found
        if gt_dirs is not None:
            gt = _need(gt_dirs[i], f"{what} labels")
            lbls += [gt / p.parent.name / p.name.replace("_rgb_anon.png", "_gt_labelIds.png")
                     for p in found]
    return imgs, None if gt_dirs is None else lbls


def _acdc(root: Path, kind: str, split: str, labels: bool):
    cond = kind.removeprefix("acdc").removeprefix("-")
    conds = [cond] if cond else list(ACDC_CONDITIONS)
    images = [_need(root / "rgb_anon" / c / split, "ACDC") for c in conds]
    if labels and split == "test":  # ACDC withholds its test labels
        raise UserError(f"{root / 'gt'}: ACDC has no labels for the test split (train and val "
                        "only); open it without labels")
    return _anon(images, [root / "gt" / c / split for c in conds] if labels else None, "ACDC")


def _dark_zurich(root: Path, kind: str, split: str, labels: bool):
    time = kind.removeprefix("dark-zurich").removeprefix("-") or "night"
    images, gt = _need(root / "rgb_anon" / split / time, "Dark Zurich"), root / "gt" / split / time
    if labels and not gt.is_dir():  # only val/night is labelled; train is the unlabelled target
        raise UserError(f"{gt}: no Dark Zurich labels here (only the val split's night images are "
                        f"labelled); open split {split!r} without labels")
    return _anon([images], [gt] if labels else None, "Dark Zurich")


def _check_kind(kind: str) -> None:
    for prefix, names, what in (("acdc-", ACDC_CONDITIONS, "ACDC condition"),
                                ("dark-zurich-", DARK_ZURICH_TIMES, "Dark Zurich time of day")):
        if kind.startswith(prefix) and kind not in KINDS:
            raise UserError(f"unknown {what} {kind.removeprefix(prefix)!r} in kind {kind!r}; "
                            f"choose one of {', '.join(names)}")
    if kind not in KINDS:
        raise UserError(f"unknown dataset kind {kind!r}; choose one of {', '.join(KINDS)}")


def open_dataset(root: str | Path, kind: str = "folder", split: str = "train",
                 size: tuple[int, int] | None = None, classes: int | None = None,
                 labels: bool = True, label_set: LabelSet = CITYSCAPES) -> PairDataset:
    """A dataset in the class ids of `label_set` from a folder laid out like `kind`.

    folder: images/ + labels/ (train ids). cityscapes: leftImg8bit/{split}/{city}/ + gtFine
    labelIds. gta5: images/ + labels/ (Cityscapes label ids). synthia (RAND-CITYSCAPES): RGB/ +
    GT/LABELS/ (16-bit, class in the first channel). GTA5 and SYNTHIA use every image: their
    official splits are file lists, not folders, so `split` applies to the other kinds only.
    acdc[-CONDITION]: rgb_anon/{condition}/{split}/{sequence}/*_rgb_anon.png + gt/... labelIds.
    dark-zurich[-TIME]: rgb_anon/{split}/{time}/{sequence}/ + gt/val/night/ labelIds (its only
    labels: open the train split with labels=False). Every kind but folder has Cityscapes-19 labels."""
    root = Path(root)
    _check_kind(kind)
    if kind == "folder":
        return FolderDataset(root, size, labels, classes, label_set)
    if labels and label_set.id != LABEL_SET_ID:
        raise UserError(f"--kind {kind} has Cityscapes-19 labels but the label set is {label_set.id!r} "
                        f"({label_set.num_classes} classes); use --kind folder with labels in its ids")
    if kind == "cityscapes":
        (imgs, lbls), fn = _cityscapes(root, split, labels), _cityscapes_label
    elif kind.startswith("acdc"):
        (imgs, lbls), fn = _acdc(root, kind, split, labels), _cityscapes_label
    elif kind.startswith("dark-zurich"):
        (imgs, lbls), fn = _dark_zurich(root, kind, split, labels), _cityscapes_label
    elif kind == "gta5":  # GTA5 labels use the Cityscapes label ids
        (imgs, lbls), fn = _flat(root, "images", "labels", "GTA5", labels), _cityscapes_label
    else:
        (imgs, lbls), fn = _flat(root, "RGB", "GT/LABELS", "SYNTHIA", labels), _synthia_label
    if not imgs:
        raise UserError(f"{root}: no {kind} images found (split {split!r})")
    _all_there(lbls, f"is the {kind} download complete?")
    return PairDataset(imgs, lbls, fn, size, classes, label_set)


# ---- corruptions -----------------------------------------------------------------------------
def _corrupt_fn() -> Callable:
    try:
        from imagecorruptions import corrupt
    except ImportError as e:
        raise UserError(f"corruptions need the imagecorruptions package ({e}); "
                        "run: pip install imagecorruptions-imaug") from None
    return corrupt


def _check_corruption(corruption: str, severity: int) -> None:
    if corruption not in CORRUPTIONS:
        raise UserError(f"unknown corruption {corruption!r}; choose one of {', '.join(CORRUPTIONS)}")
    if not 1 <= int(severity) <= 5:
        raise UserError(f"severity must be 1..5, got {severity}")


def corrupt_images(images: np.ndarray, corruption: str, severity: int,
                   seed: int | None = None) -> np.ndarray:
    """One corruption at one severity on RGB uint8 images (N, H, W, 3); returns the same shape
    and dtype. imagecorruptions draws its noise from numpy's global RNG: with a seed, that RNG is
    seeded for this call and restored after it, so the result is reproducible and the caller's
    random stream is left as it was."""
    _check_corruption(corruption, severity)
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[3] != 3 or images.dtype != np.uint8:
        raise UserError(f"corruptions take uint8 RGB images (N, H, W, 3), got {images.dtype} "
                        f"{images.shape}")
    if min(images.shape[1:3]) < 32:  # imagecorruptions' own limit, said in our words
        raise UserError(f"{images.shape[1]}x{images.shape[2]} is too small; corruptions need at "
                        "least 32x32 pixels")
    corrupt, state = _corrupt_fn(), None
    if seed is not None:
        state = np.random.get_state()
        np.random.seed(seed)
    try:
        out = [np.asarray(corrupt(img, corruption_name=corruption, severity=int(severity)))
               for img in images]
    finally:
        if state is not None:
            np.random.set_state(state)
    return np.clip(np.stack(out), 0, 255).astype(np.uint8)


def corrupt_folder(src: str | Path, dst: str | Path, corruption: str, severity: int,
                   progress: bool = True) -> int:
    """Write every image of src with one corruption to dst/images/NAME.png and copy the labels
    (src/labels/) unchanged to dst/labels/. Returns the number of images written.

    All 15 corruptions run with imagecorruptions-imaug 1.1.5 and numpy 2.x; glass_blur compiles
    with numba on its first call (about 5 s) and is then fast."""
    _check_corruption(corruption, severity)  # before any file is read or written
    images, dst = list_images(src), Path(dst)
    for p in track(images, len(images), f"{corruption} s{severity}") if progress else images:
        img = read_image(p)
        try:
            out = corrupt_images(img[None], corruption, severity)[0]
        except UserError as e:  # e.g. too small: say which file
            raise UserError(f"{p}: {e}") from None
        write_png(dst / "images" / f"{p.stem}.png", out)
        label = Path(src) / "labels" / f"{p.stem}.png"
        if label.is_file():
            atomic_write(dst / "labels" / label.name, label.read_bytes())
    return len(images)
