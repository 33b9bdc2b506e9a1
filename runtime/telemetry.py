"""What the running service reports: rolling FPS and latency, live mIoU, the status line, and
the same figures as Prometheus text on an optional loopback HTTP endpoint."""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

import numpy as np

from mas3_edge.errors import UserError
from mas3_edge.labels import IGNORE, NUM_CLASSES

log = logging.getLogger(__name__)


def _miou(matrix: np.ndarray) -> float | None:
    tp = np.diag(matrix).astype(np.float64)
    union = matrix.sum(0) + matrix.sum(1) - tp
    return float((tp[union > 0] / union[union > 0]).mean() * 100) if (union > 0).any() else None


class Telemetry:
    """Rolling figures over the last `window` frames; mIoU over the last `miou_window` labelled frames."""

    def __init__(self, window: int = 300, miou_window: int = 100):
        self.started = time.monotonic()
        self.frames = self.labelled = 0
        self._lat = deque(maxlen=window)  # capture -> publish, ms
        self._inf = deque(maxlen=window)  # engine time, ms
        self._t = deque(maxlen=window)  # monotonic publish times
        self._conf = deque(maxlen=miou_window)  # per-frame confusion matrices
        self.by_version: dict[str, np.ndarray] = {}  # cumulative confusion per serving version
        self.miou_first: float | None = None  # over the first `miou_window` frames of the run

    def record(self, latency_ms: float, infer_ms: float) -> None:
        self.frames += 1
        self._lat.append(latency_ms)
        self._inf.append(infer_ms)
        self._t.append(time.monotonic())

    def record_labels(self, pred: np.ndarray, label: np.ndarray, version: str) -> None:
        valid = label != IGNORE
        k = NUM_CLASSES
        idx = label[valid].astype(np.int64) * k + np.minimum(pred[valid], k - 1)
        m = np.bincount(idx, minlength=k * k).reshape(k, k)
        self._conf.append(m)
        self.by_version[version] = self.by_version.get(version, 0) + m
        self.labelled += 1
        if self.labelled == self._conf.maxlen:
            self.miou_first = _miou(sum(self._conf))

    def snapshot(self) -> dict:
        lat, inf = np.fromiter(self._lat, float), np.fromiter(self._inf, float)
        span = self._t[-1] - self._t[0] if len(self._t) > 1 else 0.0
        pct = lambda a, q: float(np.percentile(a, q)) if a.size else None  # noqa: E731
        return {
            "uptime_s": time.monotonic() - self.started, "frames": self.frames,
            "fps": (len(self._t) - 1) / span if span > 0 else 0.0,
            "latency_p50_ms": pct(lat, 50), "latency_p99_ms": pct(lat, 99), "infer_p50_ms": pct(inf, 50),
            "miou_window": _miou(sum(self._conf)) if self._conf else None, "miou_window_frames": len(self._conf),
            "miou_first": self.miou_first,
            "miou_by_version": {v: _miou(m) for v, m in self.by_version.items()},
        }


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}"


def status_line(s: dict) -> str:
    """One line every few seconds: rate, latency, drops, what is serving, adaptation, accuracy."""
    up = int(s["uptime_s"])
    parts = [f"[{up // 3600:02d}:{up % 3600 // 60:02d}:{up % 60:02d}] {s['fps']:.1f} fps",
             (f"latency p50 {_ms(s['latency_p50_ms'])} ms p99 {_ms(s['latency_p99_ms'])} ms "
              f"(infer {_ms(s['infer_p50_ms'])})"),
             f"drops capture {s['camera_dropped']} publish {s['publish_dropped']}",
             f"{s['engine']} {s['version']}"]
    if not s.get("camera_connected", True):
        parts.append("camera: reconnecting")
    if s.get("buffer_frames") is not None:
        parts.append(f"buffer {s['buffer_frames']}" + (" (stopped: disk)" if s.get("buffer_stopped") else ""))
    parts.append(f"round: {s['last_round']}")
    if s.get("miou_window") is not None:
        by = " ".join(f"{v} {m:.1f}" for v, m in s["miou_by_version"].items() if m is not None)
        first = f"first {s['miou_window_frames']} {s['miou_first']:.1f}; " if s.get("miou_first") is not None else ""
        parts.append(f"mIoU last {s['miou_window_frames']} {s['miou_window']:.1f} ({first}{by})")
    return " | ".join(parts)


def _metric(lines: list[str], name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
    lines += [f"# HELP mas3_{name} {help_}", f"# TYPE mas3_{name} {kind}"]
    lines += [f"mas3_{name}{labels} {value:.6g}" for labels, value in samples if value is not None]


def prometheus(s: dict) -> str:
    """The snapshot in the Prometheus text exposition format (version 0.0.4)."""
    out: list[str] = []
    _metric(out, "frames_total", "counter", "Frames served.", [("", s["frames"])])
    _metric(out, "fps", "gauge", "Frames served per second (rolling).", [("", s["fps"])])
    _metric(out, "latency_ms", "gauge", "Capture-to-publish latency (rolling).",
            [('{quantile="0.5"}', s["latency_p50_ms"]), ('{quantile="0.99"}', s["latency_p99_ms"])])
    _metric(out, "infer_ms", "gauge", "Engine time per frame, median.", [("", s["infer_p50_ms"])])
    _metric(out, "camera_dropped_total", "counter", "Frames replaced before use.", [("", s["camera_dropped"])])
    _metric(out, "camera_corrupt_total", "counter", "Corrupt frames skipped.", [("", s["camera_corrupt"])])
    _metric(out, "camera_reconnects_total", "counter", "Camera reconnects.", [("", s["camera_reconnects"])])
    _metric(out, "publish_dropped_total", "counter", "Messages not queued.", [("", s["publish_dropped"])])
    _metric(out, "buffer_frames", "gauge", "Frames in the adaptation buffer.", [("", s.get("buffer_frames"))])
    _metric(out, "rounds_total", "counter", "Adaptation rounds by outcome.",
            [(f'{{outcome="{k}"}}', v) for k, v in sorted(s["rounds"].items())])
    _metric(out, "swaps_total", "counter", "Engine hot swaps.", [("", s["swaps"])])
    _metric(out, "serving_info", "gauge", "The serving version and engine.",
            [(f'{{version="{s["version"]}",engine="{s["engine"]}"}}', 1)])
    _metric(out, "live_miou", "gauge", "mIoU over recent labelled frames (synthetic sources).",
            [("", s.get("miou_window"))])
    return "\n".join(out) + "\n"


class MetricsServer:
    """GET /metrics on 127.0.0.1:PORT (port 0 picks one) from a daemon thread."""

    def __init__(self, port: int, snapshot: Callable[[], dict], host: str = "127.0.0.1"):
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's naming)
                if self.path.split("?")[0] not in ("/metrics", "/"):
                    self.send_error(404)
                    return
                body = prometheus(snapshot()).encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):  # scrapes every few seconds must not flood the log
                pass

        try:
            self._server = ThreadingHTTPServer((host, port), Handler)
        except OSError as e:
            raise UserError(f"cannot serve metrics on {host}:{port}: {e.strerror}; pick another --metrics-port") from None
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="metrics", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
