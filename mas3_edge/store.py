"""The bundle store: the one module that knows a bundle's folders.

    BUNDLE/SERVING                 text: the serving version id (replaced by atomic rename)
    BUNDLE/SERVING.history         JSON lines: the last ids SERVING pointed at (the fallback when it is bad)
    BUNDLE/versions/v0001/         one version (bundle.py writes and reads what is inside)
    BUNDLE/versions/v0001/INCOMPLETE   an adaptation round wrote the version and has not committed it
                                   (state "writing"), or judged it and turned it down ("rejected")
    BUNDLE/versions/.tmp-PID-*     a version process PID is assembling; renamed onto its id when whole
    BUNDLE/scratch/NAME-PID-*      working space of process PID (an adaptation scheduler's round results)

Ids sort by their number (v9999 before v10000); a writer claims the next one by renaming its finished
folder onto it. A round's version goes through an explicit begin and commit: the round process calls
`begin_round`, and every version it writes from then on carries an INCOMPLETE mark from before it has
an id; the service calls `commit` (or `reject`) once it has seen the round through. A kill at any
moment so leaves at most a marked version, never one that looks finished. `cleanup` removes what dead
processes left (temp and scratch folders, versions of rounds killed before their commit) and `prune`
applies a retention policy; neither ever removes the serving or the last served version.

Nothing here imports torch: a round process running a light round function starts in well under a second.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from collections.abc import Callable

from .errors import UserError
from .fsutil import atomic_write, atomic_write_json, fsync_dir, make_readable_dir

log = logging.getLogger(__name__)

VERSIONS_DIR, SCRATCH_DIR, POINTER_FILE, HISTORY_FILE = "versions", "scratch", "SERVING", "SERVING.history"
META_FILE, MODEL_FILE, INCOMPLETE_FILE = "model.json", "model.safetensors", "INCOMPLETE"
HISTORY_KEEP = 20
TMP_PREFIX = ".tmp-"
UNFINISHED = "its adaptation round did not finish"
# a temp folder whose name names no process (written before names carried one) is stale once this old:
# no writer keeps one for an hour
UNNAMED_STALE_S = 3600.0
VERSION_ID = re.compile(r"v[A-Za-z0-9._-]{0,63}")
_NUMBERED = re.compile(r"v(\d+)")
_OWNER = re.compile(r"-(\d+)-\w+$")  # NAME-PID-RANDOM (mkdtemp's random part has no '-')

_open_rounds: dict[str, dict] = {}  # bundle root -> the mark this process puts on the versions it writes


def version_key(vid: str) -> tuple:
    """Sort key of an id: numbered ids by their number (v9999 before v10000), after any other names."""
    m = _NUMBERED.fullmatch(vid)
    return (1, int(m.group(1)), vid) if m else (0, 0, vid)


def read_mark(vdir: Path) -> dict | None:
    """The INCOMPLETE mark of a version folder ({"state", "reason", ...}), or None for a finished one."""
    path = Path(vdir) / INCOMPLETE_FILE
    if not path.exists():
        return None
    try:
        mark = json.loads(path.read_text())
    except (OSError, ValueError):
        mark = None
    mark = mark if isinstance(mark, dict) else {}
    reason = str(mark.get("reason") or UNFINISHED)
    # marks written before they had a state: the default reason was a round that never finished
    state = mark.get("state") or ("writing" if reason == UNFINISHED else "rejected")
    return {**mark, "state": state, "reason": reason}


def process_alive(pid) -> bool:
    """Whether `pid` names a running process (a zombie is not; pids this process cannot signal are)."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: someone else's process, but alive
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):  # no /proc: os.kill said it exists
        return True


def _owner_gone(path: Path) -> bool:
    """A temp or scratch folder whose writing process has ended (by the PID in its name, else its age)."""
    m = _OWNER.search(path.name)
    if m:
        return not process_alive(int(m.group(1)))
    try:
        return time.time() - path.stat().st_mtime > UNNAMED_STALE_S
    except OSError:
        return False


def _fsync_tree(folder: Path) -> None:
    for f in folder.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    fsync_dir(folder)


class BundleStore:
    """A bundle root: paths, version order, the pointer, a round's begin/commit, cleanup and retention."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.versions_dir = self.root / VERSIONS_DIR
        self.scratch_dir = self.root / SCRATCH_DIR
        self.pointer = self.root / POINTER_FILE
        self._key = os.path.realpath(self.root)

    # ------------------------------------------------------------ versions

    def path(self, vid: str) -> Path:
        return self.versions_dir / vid

    def exists(self, vid: str) -> bool:
        """A version folder with a model.json (a folder without one is corrupt, not a version)."""
        return (self.path(vid) / META_FILE).is_file()

    def ids(self) -> list[str]:
        """Every version folder's id (corrupt ones included), oldest first by number."""
        if not self.versions_dir.is_dir():
            return []
        names = (p.name for p in self.versions_dir.iterdir() if VERSION_ID.fullmatch(p.name) and p.is_dir())
        return sorted(names, key=version_key)

    def newest(self) -> str | None:
        ids = self.ids()
        return ids[-1] if ids else None

    def meta(self, vid: str) -> dict | None:
        """model.json of a version, or None when it is missing or unreadable (bundle.read_meta says why)."""
        try:
            meta = json.loads((self.path(vid) / META_FILE).read_text())
        except (OSError, ValueError):
            return None
        return meta if isinstance(meta, dict) else None

    def parent(self, vid: str) -> str | None:
        return (self.meta(vid) or {}).get("parent")

    def missing(self, vid: str) -> str | None:
        """Why `vid` has no folder here, or None when it has one."""
        return None if self.path(vid).is_dir() else f"it is missing (no folder {self.path(vid)})"

    # ------------------------------------------------------------ the pointer

    def read_serving(self) -> str:
        """The id in SERVING; UserError when the file is missing or holds anything but an id."""
        try:
            with open(self.pointer, "rb") as f:
                text = f.read(256).decode("ascii", "replace").strip()  # an id is short; a huge file is garbage anyway
        except FileNotFoundError:
            raise UserError(f"{self.pointer} is missing; point it with `mas3-edge rollback VERSION`") from None
        except OSError as e:
            raise UserError(f"{self.pointer} is unreadable ({e.strerror or e})") from None
        if not VERSION_ID.fullmatch(text):
            raise UserError(f"{self.pointer} holds no version id ({text[:20]!r}); "
                            "point it with `mas3-edge rollback VERSION`")
        return text

    def serving(self) -> str | None:
        """The serving id, or None when there is no pointer or it holds garbage (never raises)."""
        try:
            return self.read_serving()
        except UserError:
            return None

    def pointer_stamp(self) -> tuple | None:
        """Changes whenever SERVING is written again, even with the same id (None without a pointer)."""
        try:
            st = self.pointer.stat()
        except OSError:
            return None
        return st.st_ino, st.st_mtime_ns, st.st_ctime_ns

    def _history_entries(self) -> list[dict]:
        try:
            lines = (self.root / HISTORY_FILE).read_bytes().decode("utf-8", "replace").splitlines()
        except OSError:
            return []
        out = []
        for line in lines:
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict) and VERSION_ID.fullmatch(str(entry.get("version"))):
                out.append(entry)
        return out

    def history(self) -> list[str]:
        """Ids SERVING pointed at, oldest first (unreadable lines are skipped)."""
        return [e["version"] for e in self._history_entries()]

    def last_served(self, other_than: str | None = None) -> str | None:
        """The newest id in the history that is still a version (and is not `other_than`)."""
        return next((v for v in reversed(self.history()) if v != other_than and self.exists(v)), None)

    def set_serving(self, vid: str) -> None:
        """Point the bundle at `vid` (atomic: a reader sees the old or the new id, never neither)."""
        if not self.exists(vid):
            raise UserError(f"no version {vid!r} in bundle {self.root}; see `mas3-edge versions`")
        atomic_write(self.pointer, vid + "\n")
        fsync_dir(self.root)
        # after the pointer: a crash in between loses one history line, never records a move that did not happen
        entry = json.dumps({"version": vid, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        keep = [json.dumps(e) for e in self._history_entries()][-(HISTORY_KEEP - 1):]
        atomic_write(self.root / HISTORY_FILE, "\n".join([*keep, entry]) + "\n")

    # ------------------------------------------------------------ writing a version

    def new_version_dir(self) -> Path:
        """An empty folder to assemble a version in; `claim` gives it an id, the caller removes it on failure."""
        self.versions_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{os.getpid()}-", dir=self.versions_dir))
        make_readable_dir(tmp)
        return tmp

    def claim(self, tmp: Path, name_it: Callable[[str], None]) -> str:
        """Rename the finished `tmp` onto the next free id and return it. `name_it(vid)` writes what
        names the id (model.json) first; when another writer takes the id meanwhile, the next is tried."""
        mark = _open_rounds.get(self._key)
        if mark is not None:  # before the rename: a kill a moment later leaves the version marked
            atomic_write_json(tmp / INCOMPLETE_FILE, mark)
        for _ in range(100):
            vid = f"v{max((version_key(v)[1] for v in self.ids()), default=0) + 1:04d}"
            name_it(vid)
            _fsync_tree(tmp)
            try:
                os.rename(tmp, self.path(vid))  # fails when another writer took the id first
            except OSError:
                continue
            fsync_dir(self.versions_dir)
            return vid
        raise UserError(f"could not claim a new version id in {self.versions_dir}")

    # ------------------------------------------------------------ a round's begin and commit

    def begin_round(self, owner: int, label: str) -> None:
        """Called in a round process: every version this process writes into the bundle from now on is
        marked as the round's (unservable) until `owner`, the process that judges the round, commits it."""
        _open_rounds[self._key] = {"state": "writing", "reason": UNFINISHED, "owner": owner, "round": label}

    def end_round(self) -> None:
        _open_rounds.pop(self._key, None)

    def round_versions(self, label: str) -> list[str]:
        """Versions the round `label` wrote and nobody has committed or rejected yet."""
        marks = {v: read_mark(self.path(v)) or {} for v in self.ids()}
        return [v for v, m in marks.items() if m.get("round") == label and m["state"] == "writing"]

    def commit(self, vid: str) -> None:
        """The round that wrote `vid` finished it: drop the mark, so the version may be served."""
        (self.path(vid) / INCOMPLETE_FILE).unlink(missing_ok=True)
        fsync_dir(self.path(vid))

    def reject(self, vid: str, reason: str) -> None:
        """The round that wrote `vid` turned it down: keep it (its report says why) but never serve it."""
        atomic_write_json(self.path(vid) / INCOMPLETE_FILE, {"state": "rejected", "reason": reason})
        fsync_dir(self.path(vid))

    # ------------------------------------------------------------ scratch, cleanup, retention

    def scratch(self, name: str) -> Path:
        """A fresh working folder of this process inside the bundle; its owner removes it, and
        `cleanup` does once the process is gone (a kill leaves nothing behind for long)."""
        self.scratch_dir.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f"{name}-{os.getpid()}-", dir=self.scratch_dir))

    def protected(self) -> set[str]:
        """Versions that no cleanup or retention removes: the serving one, the one served before it,
        its parent (where `rollback` goes by default), every source (parentless) version, and
        versions a running round is writing."""
        serving = self.serving()
        keep = {v for v in (serving, self.last_served(other_than=serving), serving and self.parent(serving)) if v}
        for vid in self.ids():
            mark = read_mark(self.path(vid))
            meta = self.meta(vid) if mark is None else None
            if meta is not None and not meta.get("parent"):
                keep.add(vid)
            elif mark is not None and mark["state"] == "writing" and process_alive(mark.get("owner")):
                keep.add(vid)
        return keep

    def cleanup(self) -> list[str]:
        """Remove what ended processes left: temp folders, scratch folders, and versions of rounds killed
        before their commit. Returns the names removed."""
        removed = [p.name for p in self._stale_folders() if self._remove(p)]
        keep = self.protected()
        for vid in self.ids():
            mark = read_mark(self.path(vid))
            if vid not in keep and mark is not None and mark["state"] == "writing" and self._drop(vid):
                removed.append(vid)
        if removed:
            log.info("bundle %s: removed what ended processes left: %s", self.root, ", ".join(removed))
        return removed

    def _stale_folders(self) -> list[Path]:
        """Half-assembled versions and scratch folders whose process has ended."""
        out = []
        for folder, prefix in ((self.versions_dir, TMP_PREFIX), (self.scratch_dir, "")):
            if folder.is_dir():
                out += [p for p in folder.iterdir() if p.name.startswith(prefix) and _owner_gone(p)]
        return out

    def prune(self, keep: int) -> list[str]:
        """Keep at most `keep` versions (0: all), beyond the protected ones if need be: versions that
        can never be served (rejected or unfinished rounds) go first, then the oldest. -> ids removed."""
        ids = self.ids()
        if keep <= 0 or len(ids) <= keep:
            return []
        protected = self.protected()
        victims = sorted((v for v in ids if v not in protected),
                         key=lambda v: (read_mark(self.path(v)) is None, version_key(v)))
        dropped = [v for v in victims[:len(ids) - keep] if self._drop(v)]
        if dropped:
            log.info("bundle %s: keeping %d versions, removed %s", self.root, keep, ", ".join(dropped))
        return dropped

    def _drop(self, vid: str) -> bool:
        """Remove a version: renamed away first, so no reader ever sees half of one."""
        gone = self.versions_dir / f"{TMP_PREFIX}{os.getpid()}-drop{vid.replace('-', '_').replace('.', '_')}"
        try:
            os.rename(self.path(vid), gone)
        except OSError as e:
            log.warning("could not remove version %s from %s: %s", vid, self.root, e.strerror or e)
            return False
        fsync_dir(self.versions_dir)
        return self._remove(gone)

    @staticmethod
    def _remove(path: Path) -> bool:
        try:
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
        except FileNotFoundError:
            return True
        except OSError as e:  # what is left is stale and named so: the next cleanup tries again
            log.warning("could not remove %s: %s", path, e.strerror or e)
            return False
        return True
