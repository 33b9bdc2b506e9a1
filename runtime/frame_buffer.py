"""A bounded on-disk ring buffer of unlabeled frames, the material of adaptation rounds.

    buf = FrameBuffer(Path("frames"), BufferPolicy(max_frames=2000, every_n=5))
    buf.offer(rgb)      # from the serving loop: cheap; the PNG is written on a writer thread
    buf.close()

Files are `00000042.png`: a sequence number, zero-padded so that name order (what
`mas3_edge.frames.load_frames(limit=N)` sorts by to take the newest N) is number order, which is
time order. Past 99999999 the names widen to 9 digits and every file already there is renamed to
that width, oldest first, so that the order holds at every moment. Each frame is written to a `.tmp`
name, fsynced, renamed and its folder fsynced, so a crash never leaves a broken image and a frame
that was counted stays. After a restart the numbering goes on after the highest number found.

All work on the folder happens on the writer thread: reading it at start (`ready` is set once done;
`len()` is 0 until then), and again when buffering resumes. Reading it keeps only whole PNGs
(signature and end chunk checked, two small reads, no decoding) and removes broken ones.

Oldest frames are evicted first when the frame or byte cap is passed. A full disk (or free space
under `min_free_mb`) stops buffering with one warning and is retried `retry_s` later; any other
write failure (the folder was deleted, a permission changed) is retried after 1, 2, 4 ... s,
recreating the folder. The frames the policy would have kept meanwhile are counted in
`paused_drops`. Serving never depends on the buffer. Labels are never written: adaptation must not
see any.
"""
from __future__ import annotations

import errno
import logging
import os
import queue
import shutil
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from mas3_edge.errors import UserError
from mas3_edge.fsutil import fsync_dir

log = logging.getLogger(__name__)

SUFFIX = ".png"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # the empty IEND chunk that ends every whole PNG
WIDTH = 8  # digits of a frame's name, until the numbers need more
_RESUME = object()  # queued to the writer: look at the folder again and buffer on if it can


@dataclass(frozen=True)
class BufferPolicy:
    max_frames: int = 2000
    max_mb: float = 512.0
    every_n: int = 5  # keep every n-th offered frame ...
    min_interval_s: float = 0.5  # ... at most this often ...
    dedup: float = 2.0  # ... unless it is a near-duplicate of the last kept one (mean |diff|, grey levels)
    min_free_mb: float = 200.0  # stop before the disk is full, leaving room for the rest of the system
    retry_s: float = 60.0  # after stopping on a full disk, look again this much later

    def __post_init__(self) -> None:
        if self.max_frames < 1 or self.max_mb <= 0 or self.every_n < 1 or self.min_interval_s < 0 or self.dedup < 0:
            raise UserError(f"invalid buffer policy {self}: caps must be positive and rates non-negative")


@dataclass
class BufferSummary:
    path: Path
    frames: int
    bytes: int
    first: str | None
    last: str | None
    oldest_mtime: float | None
    newest_mtime: float | None


def _seq(name: str) -> int | None:
    stem = name[: -len(SUFFIX)] if name.endswith(SUFFIX) else ""
    return int(stem) if stem.isdigit() and stem.isascii() else None


def _is_whole_png(path: Path, size: int) -> bool:
    """The PNG signature at the start and the IEND chunk at the end: a truncated or foreign file
    fails, at the cost of two small reads instead of decoding the image."""
    if size < len(PNG_SIGNATURE) + len(PNG_END):
        return False
    try:
        with open(path, "rb") as f:
            head = f.read(len(PNG_SIGNATURE))
            f.seek(-len(PNG_END), os.SEEK_END)
            return head == PNG_SIGNATURE and f.read() == PNG_END
    except OSError:
        return False


def scan(root: Path, broken: list[Path] | None = None) -> list[tuple[int, Path, int]]:
    """(sequence, path, size) of the buffer's frames in number order: digit-named `.png` files that
    are whole PNGs. A stray temporary or a foreign file is no frame; a digit-named file that is not
    a whole PNG is added to `broken` when it is given."""
    out = []
    try:
        entries = list(os.scandir(root))
    except OSError:  # no folder (yet, or any more)
        return []
    for e in entries:
        seq = _seq(e.name)
        try:
            if seq is None or not e.is_file():
                continue
            size = e.stat().st_size
        except OSError:  # evicted while we looked
            continue
        if _is_whole_png(Path(e.path), size):
            out.append((seq, Path(e.path), size))
        elif broken is not None:
            broken.append(Path(e.path))
    return sorted(out)


def summarize(root: Path) -> BufferSummary:
    """What `mas3-edge buffer` shows: the frames of `scan` (broken files are left where they are)."""
    items = scan(root)
    mtimes = [p.stat().st_mtime for _, p, _ in (items[0], items[-1])] if items else [None, None]
    return BufferSummary(Path(root), len(items), sum(s for *_, s in items), items[0][1].name if items else None,
                         items[-1][1].name if items else None, mtimes[0], mtimes[1])


class FrameBuffer:
    def __init__(self, root: Path, policy: BufferPolicy = BufferPolicy(), *, queue_size: int = 8):
        self.root, self.policy = Path(root), policy
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create the frame buffer folder {self.root}: {e.strerror}") from None
        self._index: deque[tuple[Path, int]] = deque()
        self.bytes, self._next, self._width = 0, 0, WIDTH
        self.offered = self.kept = self.written = self.evicted = self.failed = 0
        self.backlog_drops = self.paused_drops = 0
        self.enabled, self.warning = True, None
        self._retry_at, self._backoff, self._resume_queued = 0.0, 0.0, False
        self._last_t, self._last_thumb = -1e18, None
        self._q: queue.Queue = queue.Queue(maxsize=queue_size)
        self._lock = threading.Lock()
        self.ready = threading.Event()  # the writer has read the folder
        self._thread = threading.Thread(target=self._writer, name="frame-buffer", daemon=True)
        self._thread.start()

    def __len__(self) -> int:
        return len(self._index)

    @property
    def dropped(self) -> int:
        """Frames the sampling policy chose that were never written: buffering stopped, or the disk behind."""
        return self.paused_drops + self.backlog_drops

    def offer(self, image: np.ndarray, t: float | None = None) -> bool:
        """Consider one RGB frame; True if it was queued for writing. Never blocks, never raises."""
        self.offered += 1
        t = time.monotonic() if t is None else t
        if (self.offered - 1) % self.policy.every_n or t - self._last_t < self.policy.min_interval_s:
            return False
        if not self._enabled_now():
            self.paused_drops += 1
            self._last_t = t  # the rate applies to what would have been kept
            return False
        thumb = cv2.resize(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY), (32, 16), interpolation=cv2.INTER_AREA)
        if self._last_thumb is not None and np.abs(thumb.astype(np.int16) - self._last_thumb).mean() < self.policy.dedup:
            return False
        try:
            self._q.put_nowait(image)
        except queue.Full:  # the disk is slower than the policy asks for: drop rather than wait
            self.backlog_drops += 1
            return False
        self._last_t, self._last_thumb = t, thumb.astype(np.int16)
        self.kept += 1
        return True

    def _enabled_now(self) -> bool:
        """Whether buffering is on; once a stop's retry is due, the writer is asked to look again."""
        if not self.enabled and not self._resume_queued and time.monotonic() >= self._retry_at:
            try:
                self._q.put_nowait(_RESUME)
                self._resume_queued = True
            except queue.Full:
                pass
        return self.enabled

    def _free_mb(self) -> float:
        path = self.root.absolute()
        while not path.exists() and path != path.parent:  # a deleted folder: its disk is its parent's
            path = path.parent
        try:
            return shutil.disk_usage(path).free / 2**20
        except OSError:
            return 0.0

    def _stop(self, why: str, full: bool = False) -> None:
        """Stop buffering (one warning) until a retry: a full disk after retry_s, anything else sooner and
        then ever less often (1, 2, 4 ... s), so a folder deleted by a clean-up script is back in a second."""
        if self.enabled:
            log.warning("frame buffer %s: %s; buffering stops, serving goes on", self.root, why)
        self.enabled, self.warning = False, why
        self._backoff = self.policy.retry_s if full else min(max(2 * self._backoff, 1.0), self.policy.retry_s)
        self._retry_at = time.monotonic() + self._backoff

    # ------------------------------------------------------------ writer thread

    def _writer(self) -> None:
        try:
            self._load()
        finally:
            self.ready.set()
        while True:
            item = self._q.get()
            if item is None:
                return
            if item is _RESUME:
                self._resume()
            elif self.enabled:
                self._write(item)

    def _load(self) -> None:
        """What a previous run left: half-written and broken files go, the frames are taken in."""
        for stray in self.root.glob("*.tmp"):  # a crash mid-write left it; never a whole frame
            stray.unlink(missing_ok=True)
        broken: list[Path] = []
        items = scan(self.root, broken)
        for path in broken:
            path.unlink(missing_ok=True)
        if broken:
            log.warning("frame buffer %s: removed %d file(s) that were not whole PNG images (first: %s)",
                        self.root, len(broken), broken[0].name)
        with self._lock:
            self._adopt(items)
            self._evict()

    def _resume(self) -> None:
        """Look again after a stop: recreate a deleted folder, re-read what is in it, check the space."""
        try:
            if self.enabled:
                return
            try:
                self.root.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                return self._stop(f"cannot create the folder: {e.strerror}")
            if self._free_mb() < self.policy.min_free_mb:
                return self._stop(f"less than {self.policy.min_free_mb:.0f} MB free on the disk", full=True)
            items = scan(self.root)  # the folder may have been emptied or replaced while we were stopped
            with self._lock:
                self._adopt(items)
                self._evict()
            log.warning("frame buffer %s: buffering again", self.root)
            self.enabled, self.warning, self._backoff = True, None, 0.0
        finally:
            self._resume_queued = False

    def _adopt(self, items: list[tuple[int, Path, int]]) -> None:
        """Make the folder's frames the index (lock held), numbering on after the highest of them and
        of ours, every name at the width that number needs."""
        self._next = max(self._next, items[-1][0] + 1 if items else 0)
        self._width = max(self._width, len(str(self._next)))
        self._index, self.bytes = deque(), 0
        for seq, path, size in items:
            path = self._at_width(path, seq)
            if path is not None:
                self._index.append((path, size))
                self.bytes += size

    def _name(self, seq: int) -> str:
        return f"{seq:0{self._width}d}{SUFFIX}"

    def _at_width(self, path: Path, seq: int) -> Path | None:
        """`path` renamed to the current width if it is not (None: it could not be, so it is no frame)."""
        want = self.root / self._name(seq)
        if path.name == want.name:
            return path
        if want.exists():  # "7.png" beside "00000007.png": one number, two files; the odd one is left out
            return None
        try:
            os.replace(path, want)
        except OSError:
            return None
        return want

    def _widen(self) -> None:
        """The next number needs another digit: rename every frame to the new width, oldest first, so
        that a reader listing the folder meanwhile still finds name order = time order (lock held)."""
        self._width = len(str(self._next))
        log.warning("frame buffer %s: frame numbers reach %d; renaming the frames to %d digits",
                    self.root, self._next, self._width)
        renamed = deque()
        for path, size in self._index:
            path = self._at_width(path, _seq(path.name))
            if path is not None:
                renamed.append((path, size))
            else:
                self.bytes -= size
        self._index = renamed

    def _write(self, image: np.ndarray) -> None:
        if self._free_mb() < self.policy.min_free_mb:
            return self._stop(f"less than {self.policy.min_free_mb:.0f} MB free on the disk", full=True)
        ok, buf = cv2.imencode(SUFFIX, cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_PNG_COMPRESSION, 1])
        if not ok:
            self.failed += 1
            return None
        with self._lock:
            if len(str(self._next)) > self._width:
                self._widen()
            path = self.root / self._name(self._next)
        tmp = path.with_name(path.name + ".tmp")
        try:
            write_file(tmp, buf.tobytes())
            os.replace(tmp, path)
            fsync_dir(self.root)  # the rename itself is on disk: a frame counted as written stays
        except OSError as e:
            tmp.unlink(missing_ok=True)
            self.failed += 1
            full = e.errno in (errno.ENOSPC, errno.EDQUOT)
            return self._stop("the disk is full" if full else f"cannot write {path.name}: {e.strerror}", full=full)
        with self._lock:
            self._next += 1
            self._index.append((path, len(buf)))
            self.bytes += len(buf)
            self.written += 1
            self._evict()

    def _evict(self) -> None:
        cap = self.policy.max_mb * 2**20
        while self._index and (len(self._index) > self.policy.max_frames or self.bytes > cap):
            path, size = self._index.popleft()
            path.unlink(missing_ok=True)
            self.bytes -= size
            self.evicted += 1

    def close(self, timeout: float = 1.0, discard_pending: bool = False) -> None:
        """Stop the writer after the queued frames (or, on shutdown, without them: they are only
        training material, and a deadline matters more). A write cut short leaves only a .tmp file."""
        if discard_pending:
            try:
                while True:
                    self._q.get_nowait()
            except queue.Empty:
                pass
        try:
            self._q.put(None, timeout=timeout)
        except queue.Full:
            pass
        self._thread.join(timeout)


def write_file(path: Path, data: bytes) -> None:
    """Write and fsync (a module function so tests can make the disk 'full')."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
