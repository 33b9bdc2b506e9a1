"""Deploy bundles: versions on disk, each self-describing, switched by an atomic pointer.

    BUNDLE/SERVING                  text: the serving version id (replaced by atomic rename)
    BUNDLE/SERVING.history          JSON lines: the last ids SERVING pointed at (the fallback when it is bad)
    BUNDLE/versions/v0001/          model.safetensors, model.json, prototypes.safetensors,
                                    model.onnx (export), report.json (adaptation), ...
                                    INCOMPLETE: the adaptation round that wrote it has not finished it

A version directory is built under a temporary name and renamed into place, so a reader never
sees half a version. Nothing is loaded with pickle: weights are safetensors, metadata is JSON.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
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
from .fsutil import atomic_write, atomic_write_json, make_readable_dir
from .errors import UserError
from .labels import CITYSCAPES, LabelSet
from .model import SegModel

FORMAT = "mas3-edge/1"
MODEL_FILE, META_FILE, PROTO_FILE, ONNX_FILE = "model.safetensors", "model.json", "prototypes.safetensors", "model.onnx"
# An adaptation round's child process writes its version before the export and the checks that decide
# whether it is accepted; the version carries this file until its round finished (the scheduler removes it).
INCOMPLETE_FILE = "INCOMPLETE"
ROUND_ENV = "MAS3_EDGE_IN_ROUND"  # set in the round's child: save_version() then writes INCOMPLETE_FILE
HISTORY_FILE, HISTORY_KEEP = "SERVING.history", 20
_VERSION_ID = re.compile(r"v[A-Za-z0-9._-]{0,63}")


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
    path = Path(vdir) / INCOMPLETE_FILE
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text()).get("reason") or "its adaptation round did not finish"
    except (OSError, ValueError, AttributeError):
        return "its adaptation round did not finish"


def mark_incomplete(vdir: Path, reason: str | None) -> None:
    """Record why a version's round did not finish (None: it finished, drop the mark)."""
    path = Path(vdir) / INCOMPLETE_FILE
    if reason is None:
        path.unlink(missing_ok=True)
    else:
        atomic_write_json(path, {"reason": reason})


def check_servable(vdir: Path) -> dict:
    """model.json of a version that may be served; UserError naming the version and why otherwise."""
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


def _versions_dir(root: Path) -> Path:
    return Path(root) / "versions"


def is_version_dir(path: Path) -> bool:
    return (Path(path) / META_FILE).is_file()


def read_serving(root: Path) -> str:
    """The id in BUNDLE/SERVING; UserError when the file is missing or holds anything but an id."""
    pointer = Path(root) / "SERVING"
    try:
        with open(pointer, "rb") as f:
            text = f.read(256).decode("ascii", "replace").strip()  # an id is short; a huge file is garbage anyway
    except FileNotFoundError:
        raise UserError(f"{pointer} is missing; point it with `mas3-edge rollback VERSION`") from None
    except OSError as e:
        raise UserError(f"{pointer} is unreadable ({e.strerror or e})") from None
    if not _VERSION_ID.fullmatch(text):
        raise UserError(f"{pointer} holds no version id ({text[:20]!r}); point it with `mas3-edge rollback VERSION`")
    return text


def serving_id(root: Path) -> str | None:
    """The serving version id, or None when there is no pointer or it holds garbage (never raises)."""
    try:
        return read_serving(root)
    except UserError:
        return None


def _history(root: Path) -> list[dict]:
    try:
        lines = (Path(root) / HISTORY_FILE).read_bytes().decode("utf-8", "replace").splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and _VERSION_ID.fullmatch(str(entry.get("version"))):
            out.append(entry)
    return out


def served_history(root: Path) -> list[str]:
    """Ids SERVING pointed at, oldest first (unreadable lines are skipped)."""
    return [e["version"] for e in _history(root)]


def last_served(root: Path) -> str | None:
    """The newest id in the history that is still a version directory."""
    return next((v for v in reversed(served_history(root)) if is_version_dir(_versions_dir(root) / v)), None)


def set_serving(root: Path, version: str) -> None:
    """Point the bundle at `version` (atomic: a reader sees the old or the new id, never neither)."""
    if not is_version_dir(_versions_dir(root) / version):
        raise UserError(f"no version {version!r} in bundle {root}; see `mas3-edge versions`")
    atomic_write(Path(root) / "SERVING", version + "\n")
    # after the pointer: a crash in between loses one history line, never records a move that did not happen
    entry = json.dumps({"version": version, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    keep = [json.dumps(e) for e in _history(root)][-(HISTORY_KEEP - 1):]
    atomic_write(Path(root) / HISTORY_FILE, "\n".join([*keep, entry]) + "\n")


def resolve(bundle: Path, version: str | None = None) -> Path:
    """A bundle root (+ optional version id) or a version directory -> the version directory."""
    bundle = Path(bundle)
    if is_version_dir(bundle):
        return bundle
    if not bundle.is_dir():
        raise UserError(f"bundle {bundle} does not exist; train one with `mas3-edge train` or name another")
    version = version or serving_id(bundle) or last_served(bundle)
    if version is None:
        ids = version_ids(bundle)
        if not ids:
            raise UserError(f"bundle {bundle} has no versions; train one with `mas3-edge train`")
        version = ids[-1]
    path = _versions_dir(bundle) / version
    if not is_version_dir(path):
        raise UserError(f"bundle {bundle} has no version {version!r}; see `mas3-edge versions`")
    return path


def version_ids(root: Path) -> list[str]:
    vdir = _versions_dir(root)
    return sorted(p.name for p in vdir.iterdir() if p.name.startswith("v") and p.is_dir()) if vdir.is_dir() else []


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
            out.append(read_meta(_versions_dir(root) / vid))
        except UserError as e:
            warnings.warn(f"skipping version {vid}: {e}")
    return out


def save_version(root: Path, net: SegModel, *, parent: Version | None = None, info: dict | None = None,
                 files: dict[str, Path | bytes] | None = None, serve: bool = True) -> Path:
    """Write a new version (weights, model.json, extra files) and, by default, serve it.

    The directory is assembled under a temporary name and renamed into place, so a crash leaves
    either nothing or a whole version. Prototypes are carried over from the parent unless given.
    """
    root = Path(root)
    vdir_root = _versions_dir(root)
    vdir_root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=vdir_root))
    make_readable_dir(tmp)
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
        if os.environ.get(ROUND_ENV):  # in place before the rename: a kill a moment later leaves it marked
            (tmp / INCOMPLETE_FILE).write_text(json.dumps({"reason": "its adaptation round did not finish"}))
        vid = _claim(vdir_root, tmp, net, parent, digest, info or {})
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if serve:
        set_serving(root, vid)
    return vdir_root / vid


def _claim(vdir_root: Path, tmp: Path, net: SegModel, parent: Version | None, digest: str, info: dict) -> str:
    """Pick the next free id and rename the finished directory onto it (retry if another process won)."""
    for _ in range(100):
        ids = [int(p[1:]) for p in version_ids(vdir_root.parent) if p[1:].isdigit()]
        vid = f"v{max(ids, default=0) + 1:04d}"
        meta = {
            "format": FORMAT, "version": vid, "parent": parent.id if parent else None,
            "architecture": net.config.to_dict(), "labels": net.labels.to_dict(),
            "classes": list(net.labels.names), "palette": [list(c) for c in net.labels.palette],
            "input_size": list(net.config.input_size),
            "normalization": {"mean": list(net.config.mean), "std": list(net.config.std), "input": "uint8 RGB NHWC"},
            "sha256": digest, "source_sha256": parent.meta["source_sha256"] if parent else digest,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "info": info,
        }
        atomic_write_json(tmp / META_FILE, meta)
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        try:
            os.rename(tmp, vdir_root / vid)  # fails if another writer took the id first
            return vid
        except OSError:
            continue
    raise UserError(f"could not claim a new version id in {vdir_root}")


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
