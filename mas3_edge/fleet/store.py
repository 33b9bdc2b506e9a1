"""The fleet's store: a folder (a shared mount) or `s3://bucket/prefix` (any S3 API: AWS, MinIO,
Ceph RGW; the endpoint comes from AWS_ENDPOINT_URL, credentials the usual AWS way).

    PREFIX/objects/SHA256.safetensors                      set objects, immutable, content-addressed
    PREFIX/lineages/LINEAGE/TIME-ROBOT-SHA.json            one manifest entry per publish
    PREFIX/robots/ROBOT.json                               what each robot serves (its own key only)

Every key is written once by one writer: an object's name is its content, so two robots that
publish the same bytes write the same bytes; an entry's name holds the time, the robot and the
digest, so two robots publishing at once add two entries and overwrite nothing. A robot reads the
manifest by listing the lineage's keys after the last one it saw (S3 StartAfter): the cost of a
pull grows with what is new, not with the fleet's history.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

from ..errors import UserError

OBJECTS, LINEAGES, ROBOTS = "objects", "lineages", "robots"


def object_key(digest: str) -> str:
    return f"{OBJECTS}/{digest}.safetensors"


def entry_key(lineage_id: str, created: float, robot: str, digest: str) -> str:
    return f"{LINEAGES}/{lineage_id}/{int(created * 1e9):020d}-{robot}-{digest[:16]}.json"


def entry_time(key: str) -> float:
    """The publish time an entry's name holds (0 when the name is not one of ours)."""
    stem = key.rsplit("/", 1)[-1].split("-", 1)[0]
    return int(stem) / 1e9 if stem.isdigit() else 0.0


class FolderStore:
    """A folder: writes are temp file + fsync + rename, so a reader never sees half of one."""

    def __init__(self, root: Path):
        self.root, self.url = Path(root), str(root)

    def put(self, key: str, data: bytes) -> None:
        from ..fsutil import atomic_write
        atomic_write(self.root / key, data)

    def get(self, key: str, max_bytes: int) -> bytes:
        """At most max_bytes + 1 bytes of `key` (one more than allowed tells an oversized object)."""
        with open(self.root / key, "rb") as f:
            return f.read(max_bytes + 1)

    def list_after(self, prefix: str, after: str | None = None) -> list[str]:
        folder = self.root / prefix
        if not folder.is_dir():
            return []
        keys = sorted(f"{prefix}/{p.name}" for p in folder.iterdir() if not p.name.startswith("."))
        return [k for k in keys if after is None or k > after]

    def dirs(self, prefix: str) -> list[str]:
        folder = self.root / prefix
        return sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []


class S3Store:
    """s3://bucket/prefix through s3fs. Its own retries are off: a call fails in seconds and the
    caller's backoff decides when to try again, so a dead store never holds a thread for minutes."""

    def __init__(self, url: str, timeout_s: float = 5.0):
        import s3fs
        self.url = url
        bucket, _, prefix = url.removeprefix("s3://").partition("/")
        if not bucket:
            raise UserError(f"store URL {url!r} names no bucket; use s3://BUCKET/PREFIX")
        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.fs = s3fs.S3FileSystem(endpoint_url=os.environ.get("AWS_ENDPOINT_URL"),
                                    config_kwargs={"connect_timeout": timeout_s, "read_timeout": timeout_s,
                                                   "retries": {"total_max_attempts": 1}},
                                    use_listings_cache=False, skip_instance_cache=True)
        self.fs.retries = 1  # a class attribute of s3fs (5 tries, sleeping between them)

    def _path(self, key: str) -> str:
        return "/".join(p for p in (self.bucket, self.prefix, key) if p)

    def put(self, key: str, data: bytes) -> None:
        self.fs.pipe_file(self._path(key), data)  # one PUT: S3 shows the whole object or none of it

    def get(self, key: str, max_bytes: int) -> bytes:
        return self.fs.cat_file(self._path(key), start=0, end=max_bytes + 1)

    def _list(self, prefix: str, after: str | None, delimiter: str = "") -> list[dict]:
        base = f"{self.prefix}/" if self.prefix else ""
        kw = {"Bucket": self.bucket, "Prefix": f"{base}{prefix}/", "Delimiter": delimiter}
        if after:
            kw["StartAfter"] = base + after
        pages, token = [], None
        while True:
            page = self.fs.call_s3("list_objects_v2", **kw, **({"ContinuationToken": token} if token else {}))
            pages.append(page)
            token = page.get("NextContinuationToken")
            if not token:
                return pages

    def list_after(self, prefix: str, after: str | None = None) -> list[str]:
        n = len(self.prefix) + 1 if self.prefix else 0
        return sorted(o["Key"][n:] for page in self._list(prefix, after) for o in page.get("Contents", []))

    def dirs(self, prefix: str) -> list[str]:
        return sorted(p["Prefix"].rstrip("/").rsplit("/", 1)[-1]
                      for page in self._list(prefix, None, "/") for p in page.get("CommonPrefixes", []))


Store = FolderStore | S3Store


def open_store(url: str) -> Store:
    """A folder path (or file://PATH) or s3://bucket/prefix; UserError for anything else."""
    if url.startswith("s3://"):
        try:
            return S3Store(url)
        except ImportError:
            raise UserError("an s3:// store needs s3fs: pip install 'mas3-edge[fleet]'") from None
    if "://" in url and not url.startswith("file://"):
        raise UserError(f"store URL {url!r}: use a folder, file://PATH or s3://BUCKET/PREFIX")
    root = Path(url.removeprefix("file://"))
    if root.exists() and not root.is_dir():
        raise UserError(f"store {root} is a file, not a folder")
    return FolderStore(root)


class Backoff:
    """Seconds to wait after each failure in a row: 1, 2, 4, ... up to `cap`; 0 after a success."""

    def __init__(self, first: float = 1.0, cap: float = 60.0):
        self.first, self.cap, self.failures, self.until = first, cap, 0, 0.0

    def failed(self, now: float | None = None) -> float:
        self.failures += 1
        wait = min(self.cap, self.first * 2 ** (self.failures - 1))
        self.until = (time.monotonic() if now is None else now) + wait
        return wait

    def ok(self) -> None:
        self.failures, self.until = 0, 0.0

    def ready(self, now: float | None = None) -> bool:
        return (time.monotonic() if now is None else now) >= self.until
