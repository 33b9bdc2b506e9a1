"""The segmentation stream's ZeroMQ PUB socket: loopback by default, never blocks the loop.

A PUB socket already drops (instead of blocking) for a subscriber whose queue is full; we make
that queue short (SNDHWM) so a stalled subscriber costs a couple of messages of memory, not an
unbounded backlog, and send with NOBLOCK so no socket state can ever stall inference. What libzmq
drops silently for one slow peer is visible to that peer as a gap in frame ids; what fails at our
send call (EAGAIN, a closing context) is counted here as `dropped`.

A PUB socket also drops what it sends before a subscriber's subscription has arrived (ZeroMQ's
"slow joiner"). A subscriber started before us retries its connection every 100 to 200 ms
(libzmq's reconnect interval plus its random jitter), so `join_wait()` tells the service how long
to hold the first frame after binding for such a subscriber to join; binding before the engine
loads usually makes that wait zero.
"""
from __future__ import annotations

import ipaddress
import logging
import re
import time
from pathlib import Path

import zmq

from mas3_edge.errors import UserError

from .wire import DEFAULT_TOPIC

log = logging.getLogger(__name__)

DEFAULT_ADDRESS = "tcp://127.0.0.1:5555"
JOIN_S = 0.4  # > libzmq's longest reconnect wait (2 x ZMQ_RECONNECT_IVL, 100 ms) plus a handshake
_LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1", "[::1]"}


def is_loopback(host: str) -> bool:
    if host in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # an interface name, a host name or "*": reaches beyond this machine


def check_address(address: str, allow_remote: bool = False) -> str:
    """Validate a bind address and return the form ZeroMQ binds (localhost -> 127.0.0.1, port 0 -> *)."""
    if address.startswith("ipc://"):
        path = Path(address[len("ipc://"):])
        if not path.parent.is_dir():
            raise UserError(f"cannot publish on {address}: folder {path.parent} does not exist")
        return address
    m = re.fullmatch(r"tcp://(\[[^\]]+\]|[^:]+):(\d+|\*)", address)
    if not m:
        raise UserError(f"publish address {address!r} is not tcp://HOST:PORT or ipc://PATH")
    host, port = m.groups()
    if port != "*" and not 0 <= int(port) <= 65535:
        raise UserError(f"publish address {address}: port {port} is not in 1..65535 (0 or * picks a free one)")
    if not allow_remote and not is_loopback(host):
        raise UserError(f"publish address {address} is not loopback; pass --allow-remote to expose the stream "
                        "beyond this machine")
    host = "127.0.0.1" if host == "localhost" else host
    return f"tcp://{host}:{'*' if port in ('0', '*') else port}"


class Publisher:
    """Bind a PUB socket and send pre-encoded messages without ever blocking."""

    def __init__(self, address: str = DEFAULT_ADDRESS, topic: str = DEFAULT_TOPIC, *, allow_remote: bool = False,
                 hwm: int = 2, context: zmq.Context | None = None):
        self.topic = topic
        self.sent = self.dropped = 0
        self._ctx = context or zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.PUB)
        self._sock.setsockopt(zmq.SNDHWM, hwm)
        self._sock.setsockopt(zmq.LINGER, 0)  # shutdown must not wait on undelivered frames
        if address.startswith("tcp://["):
            self._sock.setsockopt(zmq.IPV6, 1)
        bind = check_address(address, allow_remote)
        try:
            self._sock.bind(bind)
        except zmq.ZMQError as e:
            self._sock.close(0)
            raise UserError(f"cannot publish on {address}: {e.strerror}; pick another --publish address") from None
        self.endpoint: str = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.bound_at = time.monotonic()
        log.info("publishing on %s (topic %r)", self.endpoint, topic)

    def join_wait(self) -> float:
        """Seconds left until a subscriber that was waiting when we bound has surely subscribed."""
        return max(0.0, self.bound_at + JOIN_S - time.monotonic())

    def send(self, message: bytes) -> bool:
        """Queue one message; False (and counted) if it could not be queued right now."""
        try:
            self._sock.send(message, zmq.NOBLOCK, copy=len(message) < 65536)
        except zmq.ZMQError:  # EAGAIN at the high-water mark, or a context being torn down
            self.dropped += 1
            return False
        self.sent += 1
        return True

    def close(self) -> None:
        if not self._sock.closed:
            self._sock.close(0)
            if self.endpoint.startswith("ipc://"):  # libzmq unlinks it lazily, maybe after we exit
                Path(self.endpoint[len("ipc://"):]).unlink(missing_ok=True)

    def __enter__(self) -> Publisher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
