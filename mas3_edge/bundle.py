"""Deploy bundles: versions on disk, each self-describing, switched by an atomic pointer.

    BUNDLE/SERVING                  text: the serving version id (replaced by atomic rename)
    BUNDLE/SERVING.history          JSON lines: the last ids SERVING pointed at (the fallback when it is bad)
    BUNDLE/versions/v0001/          model.safetensors, model.json, prototypes.safetensors,
                                    model.onnx (export), report.json (adaptation), ...
                                    INCOMPLETE: written by an adaptation round that has not committed it

The layout itself (paths, version order, the pointer, a round's begin/commit, cleanup, retention)
belongs to store.py; this module reads and writes what is inside a version. A version directory is
built under a temporary name and renamed into place, so a reader never sees half a version. Nothing
is loaded with pickle: weights are safetensors, metadata is JSON.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch

from .arch import build
from .config import ModelConfig
from .fsutil import atomic_write, atomic_write_json  # noqa: F401 (re-exported: export, train and others write with them)
from .errors import UserError
from .labels import CITYSCAPES, LabelSet
from .model import SegModel
from .store import (HISTORY_FILE, HISTORY_KEEP, INCOMPLETE_FILE, META_FILE, MODEL_FILE,  # noqa: F401 (re-exported)
                    BundleStore, read_mark)

FORMAT = "mas3-edge/1"
PROTO_FILE, ONNX_FILE = "prototypes.safetensors", "model.onnx"


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


_digests: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> sha256


def weights_sha256(path: Path) -> str:
    """sha256 of a file, remembered while its size and mtime stay the same: the swapper, rollback and
    `versions` all verify weights, and a 100 MB file should be hashed once, not at every look."""
    st = Path(path).stat()
    key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    if key not in _digests:
        _digests[key] = sha256_file(path)
    return _digests[key]


def weights_problem(vdir: Path, meta: dict) -> str | None:
    """Why the version's weights cannot be trusted (missing, or not the bytes model.json hashed), or None."""
    wpath = Path(vdir) / MODEL_FILE
    try:
        ok = weights_sha256(wpath) == meta.get("sha256")
    except OSError:
        return f"it has no weights ({wpath.name} missing or unreadable)"
    return None if ok else f"{wpath.name} does not match the sha256 in {META_FILE}: the weights are corrupt"


def incomplete_reason(vdir: Path) -> str | None:
    """Why the round that wrote this version did not finish it, or None for a finished version."""
    mark = read_mark(vdir)
    return None if mark is None else mark["reason"]


def check_servable(vdir: Path) -> dict:
    """model.json of a version that may be served; UserError naming the version and why otherwise."""
    if not Path(vdir).is_dir():  # a pointer at a version that is not there: missing, not corrupt
        raise UserError(f"version {Path(vdir).name} cannot be served: it is missing (no folder {vdir})")
    meta = read_meta(vdir)
    why = incomplete_reason(vdir) or weights_problem(vdir, meta)
    if why:
        raise UserError(f"version {Path(vdir).name} cannot be served: {why}")
    return meta


@dataclass
class Version:
    """A loaded bundle version: where it lives, its metadata and its network (eval mode, CPU)."""

    path: Path
    meta: dict
    net: SegModel

    @property
    def id(self) -> str:
        return self.meta["version"]

    @property
    def prototypes_path(self) -> Path:
        return self.path / PROTO_FILE


def is_version_dir(path: Path) -> bool:
    return (Path(path) / META_FILE).is_file()


def read_serving(root: Path) -> str:
    """The id in BUNDLE/SERVING; UserError when the file is missing or holds anything but an id."""
    return BundleStore(root).read_serving()


def serving_id(root: Path) -> str | None:
    """The serving version id, or None when there is no pointer or it holds garbage (never raises)."""
    return BundleStore(root).serving()


def served_history(root: Path) -> list[str]:
    """Ids SERVING pointed at, oldest first (unreadable lines are skipped)."""
    return BundleStore(root).history()


def last_served(root: Path) -> str | None:
    """The newest id in the history that is still a version directory."""
    return BundleStore(root).last_served()


def set_serving(root: Path, version: str) -> None:
    """Point the bundle at `version` (atomic: a reader sees the old or the new id, never neither)."""
    BundleStore(root).set_serving(version)


def resolve(bundle: Path, version: str | None = None) -> Path:
    """A bundle root (+ optional version id) or a version directory -> the version directory."""
    bundle = Path(bundle)
    if is_version_dir(bundle):
        return bundle
    if not bundle.is_dir():
        raise UserError(f"bundle {bundle} does not exist; train one with `mas3-edge train` or name another")
    store = BundleStore(bundle)
    version = version or store.serving() or store.last_served() or store.newest()
    if version is None:
        raise UserError(f"bundle {bundle} has no versions; train one with `mas3-edge train`")
    path = store.path(version)
    if not is_version_dir(path):
        raise UserError(f"bundle {bundle} has no version {version!r}; see `mas3-edge versions`")
    return path


def version_ids(root: Path) -> list[str]:
    """Every version folder's id, oldest first by number (v9999 before v10000)."""
    return BundleStore(root).ids()


def read_meta(vdir: Path) -> dict:
    try:
        meta = json.loads((Path(vdir) / META_FILE).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{Path(vdir) / META_FILE} is unreadable ({e}); the version is corrupt") from None
    if meta.get("format") != FORMAT:
        raise UserError(f"{Path(vdir) / META_FILE} is not a mas3-edge model file (format {meta.get('format')!r})")
    return meta


def version_labels(meta: dict) -> LabelSet:
    """The label set a version's model.json names (Cityscapes-19 for versions written before label sets)."""
    if "labels" in meta:
        return LabelSet.from_dict(meta["labels"], f"model.json of version {meta.get('version')}")
    return CITYSCAPES


def load_version(bundle: Path, version: str | None = None, verify: bool = True) -> Version:
    """Load weights and metadata; the weights' sha256 must match model.json."""
    vdir = resolve(bundle, version)
    meta = read_meta(vdir)
    wpath = vdir / MODEL_FILE
    if not wpath.is_file():
        raise UserError(f"version {meta['version']} has no weights ({wpath} missing)")
    if verify and weights_sha256(wpath) != meta.get("sha256"):
        raise UserError(f"{wpath} does not match the hash in model.json: the weights are corrupt")
    net = build(ModelConfig.from_dict(meta["architecture"]), version_labels(meta))
    try:
        state = safetensors.torch.load_file(str(wpath))
        net.load_weights(state)
    except Exception as e:  # safetensors raises several types for a bad file
        raise UserError(f"cannot load weights {wpath}: {str(e).splitlines()[0]}") from None
    return Version(vdir, meta, net.eval())


def list_versions(root: Path) -> list[dict]:
    """Metadata of every readable version, oldest first; corrupt ones are skipped with a warning."""
    out = []
    for vid in version_ids(root):
        try:
            out.append(read_meta(BundleStore(root).path(vid)))
        except UserError as e:
            warnings.warn(f"skipping version {vid}: {e}", stacklevel=2)
    return out


def save_version(root: Path, net: SegModel, *, parent: Version | None = None, info: dict | None = None,
                 files: dict[str, Path | bytes] | None = None, serve: bool = True) -> Path:
    """Write a new version (weights, model.json, extra files) and, by default, serve it.

    The directory is assembled under a temporary name and renamed into place, so a crash leaves
    either nothing or a whole version. Prototypes are carried over from the parent unless given.
    Inside an adaptation round (BundleStore.begin_round) the version is marked as the round's.
    """
    store = BundleStore(root)
    tmp = store.new_version_dir()
    try:
        state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
        weights = safetensors.torch.save(state)
        digest = sha256_bytes(weights)
        (tmp / MODEL_FILE).write_bytes(weights)
        files = dict(files or {})
        if parent is not None and PROTO_FILE not in files and parent.prototypes_path.is_file():
            files[PROTO_FILE] = parent.prototypes_path
        for name, src in files.items():
            (tmp / name).write_bytes(src if isinstance(src, bytes) else Path(src).read_bytes())
        vid = store.claim(tmp, lambda vid: atomic_write_json(tmp / META_FILE, _meta(vid, net, parent, digest, info or {})))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if serve:
        store.set_serving(vid)
    return store.path(vid)


def _meta(vid: str, net: SegModel, parent: Version | None, digest: str, info: dict) -> dict:
    return {
        "format": FORMAT, "version": vid, "parent": parent.id if parent else None,
        "architecture": net.config.to_dict(), "labels": net.labels.to_dict(),
        "classes": list(net.labels.names), "palette": [list(c) for c in net.labels.palette],
        "input_size": list(net.config.input_size),
        "normalization": {"mean": list(net.config.mean), "std": list(net.config.std), "input": "uint8 RGB NHWC"},
        "sha256": digest, "source_sha256": parent.meta["source_sha256"] if parent else digest,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "info": info,
    }


PACKAGED = Path(__file__).parent / "default_bundle"  # built by tools/build_default_bundle.py


def user_bundle(bundle: Path | None) -> Path:
    """The bundle a command works on: the one named, or a writable copy of the packaged default.

    The packaged bundle lives inside the installed package, which may be read-only, so it is
    copied once to $MAS3_EDGE_HOME/bundle (default ~/.local/share/mas3-edge/bundle); adaptation
    rounds add versions there.
    """
    if bundle is not None:
        return Path(bundle)
    home = Path(os.environ.get("MAS3_EDGE_HOME", Path.home() / ".local" / "share" / "mas3-edge"))
    dest = home / "bundle"
    if not (dest / "versions").is_dir():  # not SERVING: a lost pointer must not replace adapted versions
        if not (PACKAGED / "SERVING").is_file():
            raise UserError("no --bundle given and this install has no default bundle; "
                            "name one with --bundle or run tools/build_default_bundle.py")
        home.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".bundle-", dir=home))
        shutil.copytree(PACKAGED, tmp, dirs_exist_ok=True)
        shutil.rmtree(dest, ignore_errors=True)
        os.rename(tmp, dest)
    print(f"using the default bundle {dest} (name your own with --bundle)", file=sys.stderr)
    return dest
