"""A Python client for the segmentation stream.

    with Subscriber("tcp://127.0.0.1:5555") as sub:          # latest-only (ZMQ_CONFLATE)
        msg = sub.recv(timeout=1.0)                           # runtime.wire.Message or None
    with Subscriber(addr, latest_only=False) as sub: ...      # every message, gaps counted

Latest-only suits a controller that wants the freshest map and nothing stale; every-message
suits a logger. Gaps (frame ids skipped between two received messages) are counted in both, so
drops anywhere upstream - capture, publish, transport - are visible to the consumer.

A message names its label set and K, not the names and colours: a `LabelBook` knows Cityscapes-19
and the label sets of labels files (`mas3-edge subscribe --labels FILE`), and draws any other in
generated colours.
"""
from __future__ import annotations

import colorsys
import logging
import re
import time
from collections import deque
from collections.abc import Callable, Sequence

import numpy as np
import zmq

from mas3_edge.errors import UserError
from mas3_edge.labels import CITYSCAPES, LabelSet, colorize

from .publisher import DEFAULT_ADDRESS
from .wire import DEFAULT_TOPIC, Message, WireError, decode

log = logging.getLogger(__name__)


def distinct_palette(k: int) -> tuple[tuple[int, int, int], ...]:
    """k colours for a label set without its own: hues a golden-ratio step apart (no two alike, however
    many), brightness alternating so that neighbouring ids differ even where hues come close."""
    return tuple(tuple(round(c * 255) for c in colorsys.hsv_to_rgb(j * 0.618033988749895 % 1.0, 0.85,
                                                                     1.0 if j % 2 == 0 else 0.65))
                 for j in range(k))


class LabelBook:
    """The label sets a reader knows by id: Cityscapes-19 built in, plus `extra` (from labels files).
    A message is matched on its label-set id and its number of classes."""

    def __init__(self, extra: Sequence[LabelSet] = (), warn: Callable[[str], None] | None = None):
        self.known = {CITYSCAPES.id: CITYSCAPES, **{s.id: s for s in extra}}
        self._warn = warn or log.warning
        self._warned: set[tuple[str, int]] = set()

    def find(self, label_set: str, num_classes: int) -> LabelSet | None:
        found = self.known.get(label_set)
        return found if found is not None and found.num_classes == num_classes else None

    def unknown_note(self, label_set: str, num_classes: int) -> str:
        return (f"label set {label_set!r} ({num_classes} classes) is not known to this reader; "
                "pass its labels file (--labels FILE, the format of docs/labels/cityscapes19.json) for names "
                "and colours")

    def palette(self, msg: Message) -> tuple[tuple[int, int, int], ...]:
        """The colours of the message's label set; generated ones (and one warning per set) if unknown."""
        found = self.find(msg.label_set, msg.num_classes)
        if found is not None:
            return found.palette
        if (msg.label_set, msg.num_classes) not in self._warned:
            self._warned.add((msg.label_set, msg.num_classes))
            self._warn(self.unknown_note(msg.label_set, msg.num_classes) + "; drawing it in generated colours")
        return distinct_palette(max(msg.num_classes, 1))

    def colorize(self, msg: Message) -> np.ndarray:
        """The class map in its label set's colours, (H, W, 3) RGB uint8; ignore is black."""
        return colorize(msg.classes, self.palette(msg))


def check_address(address: str) -> str:
    """A connect address: ipc://PATH, or tcp://HOST:PORT with a port in 1..65535 (ZeroMQ would take
    a bad port without a word and wait for ever)."""
    if address.startswith("ipc://"):
        return address
    m = re.fullmatch(r"tcp://(\[[^\]]+\]|[^:/\[\]]+):(\d+)", address)
    if not m:
        raise UserError(f"subscribe address {address!r} is not tcp://HOST:PORT or ipc://PATH")
    if not 1 <= int(m[2]) <= 65535:
        raise UserError(f"subscribe address {address}: port {m[2]} is not in 1..65535")
    return address


class Subscriber:
    def __init__(self, address: str = DEFAULT_ADDRESS, topic: str = DEFAULT_TOPIC, *, latest_only: bool = True,
                 hwm: int = 1000, context: zmq.Context | None = None):
        check_address(address)
        self.address, self.topic, self.latest_only = address, topic, latest_only
        self._ctx = context or zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.SUB)
        self._sock.setsockopt(zmq.LINGER, 0)
        if latest_only:
            self._sock.setsockopt(zmq.CONFLATE, 1)  # before connect: keep one message, the newest
        else:
            self._sock.setsockopt(zmq.RCVHWM, hwm)
        # the NUL that ends the topic makes the filter exact: "mas3/seg" does not match "mas3/segX"
        self._sock.setsockopt(zmq.SUBSCRIBE, topic.encode("ascii") + b"\0")
        self._sock.connect(address)
        self.received = self.gaps = self.malformed = 0
        self._last_id: int | None = None
        self.latencies_ms: deque[float] = deque(maxlen=10000)

    def recv(self, timeout: float | None = 1.0) -> Message | None:
        """The next message (the newest one in latest-only mode), or None after `timeout` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not self._sock.poll(None if left is None else int(left * 1000)):
                return None
            raw = self._sock.recv(copy=False)
            try:
                msg = decode(raw.buffer)
            except WireError:
                self.malformed += 1  # a foreign publisher on the same topic; keep listening
                continue
            self._account(msg)
            return msg

    def _account(self, msg: Message) -> None:
        now = time.time_ns()
        if self._last_id is not None and msg.frame_id > self._last_id + 1:
            self.gaps += msg.frame_id - self._last_id - 1
        self._last_id = msg.frame_id
        self.received += 1
        self.latencies_ms.append((now - msg.capture_ns) / 1e6)

    def latency_ms(self, q: float) -> float:
        """A percentile (0..100) of capture-to-receive latency over the recent messages."""
        return float(np.percentile(np.fromiter(self.latencies_ms, float), q)) if self.latencies_ms else float("nan")

    def __iter__(self):
        while True:
            msg = self.recv(timeout=None)
            if msg is not None:
                yield msg

    def close(self) -> None:
        if not self._sock.closed:
            self._sock.close(0)

    def __enter__(self) -> Subscriber:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
