"""A bounded on-disk ring buffer of unlabeled frames, the material of adaptation rounds.

    buf = FrameBuffer(Path("frames"), BufferPolicy(max_frames=2000, every_n=5))
    buf.offer(rgb)      # from the serving loop: cheap; the PNG is written on a writer thread
    buf.close()

Files are `00000042.png` (a sequence number, so name order is time order and
`mas3_edge.frames.load_frames(limit=N)` takes the newest N). Each is written to a `.tmp` name,
fsynced and renamed, so a crash never leaves a broken image; the sequence continues after a
restart. Oldest frames are evicted first when the frame or byte cap is passed. A full disk (or
free space under `min_free_mb`) stops buffering with one warning and is retried `retry_s` later;
any other write failure (the folder was deleted, a permission changed) is retried after 1, 2, 4 ...
s, recreating the folder. Serving never depends on the buffer. Labels are never written:
adaptation must not see any.
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

log = logging.getLogger(__name__)

SUFFIX = ".png"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


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
    return int(stem) if stem.isdigit() else None


def scan(root: Path) -> list[tuple[int, Path, int]]:
    """(sequence, path, size) of the buffer's frames, oldest first: `NNNNNNNN.png` files that are not
    empty (a stray temporary, an empty or foreign file is no frame)."""
    out = []
    try:
        entries = list(os.scandir(root))
    except OSError:  # no folder (yet, or any more)
        return []
    for e in entries:
        seq = _seq(e.name)
        try:
            if seq is not None and e.is_file() and e.stat().st_size > 0:
                out.append((seq, Path(e.path), e.stat().st_size))
        except OSError:  # evicted while we looked
            continue
    return sorted(out)


def _is_png(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(len(PNG_SIGNATURE)) == PNG_SIGNATURE
    except OSError:
        return False


def summarize(root: Path) -> BufferSummary:
    """What `mas3-edge buffer` shows: the frames of `scan` that really are PNG images (8 bytes read each)."""
    items = [it for it in scan(root) if _is_png(it[1])]
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
        for stray in self.root.glob("*.tmp"):  # a crash mid-write left it; never a whole frame
            stray.unlink(missing_ok=True)
        items = scan(self.root)
        self._index: deque[tuple[Path, int]] = deque((p, s) for _, p, s in items)
        self.bytes = sum(s for _, s in self._index)
        self._next = items[-1][0] + 1 if items else 0
        self.offered = self.kept = self.written = self.evicted = self.failed = self.backlog_drops = 0
        self.enabled, self.warning = True, None
        self._retry_at, self._backoff = 0.0, 0.0
        self._last_t, self._last_thumb = -1e18, None
        self._q: queue.Queue = queue.Queue(maxsize=queue_size)
        self._lock = threading.Lock()
        self._evict()
        self._thread = threading.Thread(target=self._writer, name="frame-buffer", daemon=True)
        self._thread.start()

    def __len__(self) -> int:
        return len(self._index)

    def offer(self, image: np.ndarray, t: float | None = None) -> bool:
        """Consider one RGB frame; True if it was queued for writing. Never blocks, never raises."""
        self.offered += 1
        t = time.monotonic() if t is None else t
        if not self._enabled_now() or (self.offered - 1) % self.policy.every_n:
            return False
        if t - self._last_t < self.policy.min_interval_s:
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
        if not self.enabled and time.monotonic() >= self._retry_at:
            self._resume()
        return self.enabled

    def _resume(self) -> None:
        """Look again after a stop: recreate a deleted folder, re-read what is in it, check the space."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            return self._stop(f"cannot create the folder: {e.strerror}")
        if self._free_mb() < self.policy.min_free_mb:
            return self._stop(f"less than {self.policy.min_free_mb:.0f} MB free on the disk", full=True)
        items = scan(self.root)
        with self._lock:  # the folder may have been emptied or replaced while we were stopped
            self._index = deque((p, size) for _, p, size in items)
            self.bytes = sum(size for _, size in self._index)
            self._next = max(self._next, items[-1][0] + 1 if items else 0)
        log.warning("frame buffer %s: buffering again", self.root)
        self.enabled, self.warning, self._backoff = True, None, 0.0

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
        while True:
            image = self._q.get()
            if image is None:
                return
            if self.enabled:
                self._write(image)

    def _write(self, image: np.ndarray) -> None:
        if self._free_mb() < self.policy.min_free_mb:
            return self._stop(f"less than {self.policy.min_free_mb:.0f} MB free on the disk", full=True)
        ok, buf = cv2.imencode(SUFFIX, cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_PNG_COMPRESSION, 1])
        if not ok:
            self.failed += 1
            return None
        path = self.root / f"{self._next:08d}{SUFFIX}"
        tmp = path.with_name(path.name + ".tmp")
        try:
            write_file(tmp, buf.tobytes())
            os.replace(tmp, path)
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
