"""Record the segmentation stream as a ROS 2 MCAP file (`mas3-edge subscribe --record out.mcap`).

    with McapRecorder("out.mcap", max_mb=500) as rec:
        for msg in subscriber:
            if not rec.write(msg):     # False: the size cap is reached, nothing more was written
                break

The file is what `ros2 bag record -s mcap` writes: profile "ros2", CDR messages, `ros2msg` schemas
(the topics and types are in runtime/ros.py), so Foxglove and `ros2 bag play` need nothing else.
The MCAP log time of every message is its header.stamp (the stream's capture_ns).

Crash-safe: messages go into zstd chunks of `chunk_kb` (uncompressed); each finished chunk is
flushed to the OS at once, so a recorder killed with SIGKILL leaves a file whose chunks all read
back (sequentially: the summary at the end is missing; `mcap recover` rebuilds it). Only the chunk
in progress is lost. A clean stop (Ctrl-C, SIGTERM, the caps) writes the summary and index.
"""
from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from pathlib import Path

from mas3_edge.errors import UserError

from . import ros

INSTALL_HINT = 'recording MCAP needs mcap and rosbags: pip install "mas3-edge[ros]"'
_SUMMARY_SLACK = 16 * 1024  # the closing summary: schemas, channels, statistics (the chunk indexes are counted apart)


class McapRecorder:
    def __init__(self, path: str | Path, *, max_mb: float | None = None, chunk_kb: int = 256,
                 frame_id: str | None = None, book=None):
        try:
            from mcap.writer import CompressionType, Writer
            self._store = ros.typestore()
        except ImportError:
            raise UserError(f"--record: {INSTALL_HINT}") from None
        self.path = Path(path)
        if max_mb is not None and max_mb <= 0:
            raise UserError(f"--max-mb must be positive, got {max_mb}")
        try:  # never overwrite a recording: "x" fails if the file exists
            self._file = open(self.path, "xb")
        except FileExistsError:
            raise UserError(f"{self.path} exists; record to a new file (or delete it first)") from None
        except OSError as e:
            raise UserError(f"cannot record to {self.path}: {e.strerror}") from None
        self._writer = Writer(self._file, chunk_size=chunk_kb * 1024, compression=CompressionType.ZSTD)
        self._writer.start(profile="ros2", library="mas3-edge")
        self._file.flush()  # a valid (empty) MCAP from the start, even if we are killed before a chunk
        self._conv = ros.Converter(frame_id, book)  # book: the label sets /mas3/info names (subscriber.LabelBook)
        self._channels: dict[str, int] = {}
        self.max_bytes = None if max_mb is None else int(max_mb * 2**20)
        self.messages, self.frames, self.chunks, self.full = 0, 0, 0, False
        self._pending, self._flushed = 0, self._file.tell()  # bytes in the open chunk; file size after the last

    def write(self, msg) -> bool:
        """Record one stream message (several ROS messages); False once the size cap stops recording."""
        if self.full:
            return False
        encoded = [(rm, ros.to_cdr(self._store, rm)) for rm in self._conv.convert(msg)]
        if self.max_bytes is not None and self._projected(sum(len(d) + 64 for _, d in encoded)) > self.max_bytes:
            self.full = True
            return False
        for rm, data in encoded:
            self._writer.add_message(self._channel(rm), log_time=rm.stamp_ns, data=data,
                                     publish_time=msg.publish_ns, sequence=msg.frame_id & 0xFFFFFFFF)
            self._pending += len(data) + 64  # + record header and its message-index entry
            self._sync()
        self.frames += 1
        self.messages += len(encoded)
        return True

    def _projected(self, more: int) -> int:
        """The file's size if we add `more` bytes and close now (zstd never grows a chunk by more than the slack)."""
        return self._flushed + self._pending + more + _SUMMARY_SLACK + 128 * (self.chunks + 1)  # + chunk indexes

    def _sync(self) -> None:
        """When the writer just finished a chunk, push it to the OS: a SIGKILL cannot lose it after this."""
        size = self._file.tell()
        if size != self._flushed:
            self._file.flush()
            self._flushed, self._pending, self.chunks = size, 0, self.chunks + 1

    def _channel(self, rm: ros.RosMessage) -> int:
        if rm.topic not in self._channels:
            sid = self._writer.register_schema(rm.msgtype, "ros2msg", ros.schema(self._store, rm.msgtype))
            self._channels[rm.topic] = self._writer.register_channel(rm.topic, "cdr", sid)
        return self._channels[rm.topic]

    def close(self) -> None:
        """Write the last chunk and the summary (the index readers seek with), then close the file."""
        if self._file.closed:
            return
        try:
            self._writer.finish()
        finally:
            self._file.close()

    @property
    def size_mb(self) -> float:
        return (self._file.tell() if not self._file.closed else self.path.stat().st_size) / 2**20

    def __enter__(self) -> McapRecorder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@contextmanager
def stop_on_signals(event: threading.Event):
    """While recording, SIGINT and SIGTERM set `event` instead of raising KeyboardInterrupt wherever
    the interpreter happens to be (perhaps half-way through writing a chunk); the loop checks it."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield event
        return
    old = {s: signal.signal(s, lambda *_: event.set()) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield event
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def summary_line(rec: McapRecorder, seconds: float) -> str:
    why = " (stopped at --max-mb)" if rec.full else ""
    return (f"recorded {rec.frames} frames ({rec.messages} ROS 2 messages) in {seconds:.1f} s to {rec.path}, "
            f"{rec.size_mb:.1f} MB{why}")
