"""What the running service reports: rolling FPS and latency, live mIoU and the status line for
people; Prometheus metrics and a health check on an optional HTTP endpoint for machines.

    GET /metrics   prometheus_client's text format, base units (seconds, ratios):
      mas3_latency_seconds        histogram  capture (grab) -> publish, per frame
      mas3_inference_seconds      histogram  engine time per frame
      mas3_frames_total, mas3_camera_dropped_frames_total, mas3_camera_corrupt_frames_total,
      mas3_camera_reconnects_total, mas3_publish_dropped_messages_total, mas3_engine_swaps_total,
      mas3_adaptation_rounds_total{outcome}                        counters
      mas3_serving_info{version,engine,provider} 1, mas3_buffer_frames, mas3_live_miou_ratio,
      mas3_last_frame_timestamp_seconds                           gauges
      process_* and python_info (prometheus_client's process and platform collectors)
    GET /healthz   200 while frames are published; 503 when none was for `stale_after` seconds
                   (or none yet). Rates are PromQL's job: rate(mas3_frames_total[1m]) is the FPS.

Each server has its own CollectorRegistry, so two services (or tests) in one process never clash
in the global one.
"""
from __future__ import annotations

import logging
import socket
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from collections.abc import Callable

import numpy as np
from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, PlatformCollector,
                               ProcessCollector, generate_latest)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily

from mas3_edge.errors import UserError
from mas3_edge.labels import IGNORE, NUM_CLASSES

from .publisher import is_loopback

log = logging.getLogger(__name__)

# from a 1 ms GPU engine to a multi-second stall of a small CPU
_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


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
        self.last_frame_time: float | None = None  # time.time() of the newest published frame
        self._lock = threading.Lock()  # the metrics thread reads what the serving loop writes
        # in no registry yet: each MetricsServer adds them to its own
        self.latency = Histogram("mas3_latency_seconds", "Capture (grab) to publish latency per frame.",
                                 buckets=_BUCKETS, registry=None)
        self.inference = Histogram("mas3_inference_seconds", "Inference engine time per frame.",
                                   buckets=_BUCKETS, registry=None)

    def record(self, latency_ms: float, infer_ms: float) -> None:
        with self._lock:
            self.frames += 1
            self._lat.append(latency_ms)
            self._inf.append(infer_ms)
            self._t.append(time.monotonic())
            self.last_frame_time = time.time()
        self.latency.observe(latency_ms / 1e3)
        self.inference.observe(infer_ms / 1e3)

    def frame_age(self) -> float | None:
        """Seconds since the newest frame was published; None before the first."""
        with self._lock:
            return time.monotonic() - self._t[-1] if self._t else None

    def record_labels(self, pred: np.ndarray, label: np.ndarray, version: str, num_classes: int = NUM_CLASSES,
                      ignore: int = IGNORE) -> None:
        """Count one labelled frame into K x K confusion matrices (K: the serving label set's classes)."""
        k = num_classes
        valid = (label != ignore) & (label < k)  # an id outside the label set cannot be scored
        idx = label[valid].astype(np.int64) * k + np.minimum(pred[valid], k - 1)
        m = np.bincount(idx, minlength=k * k).reshape(k, k)
        with self._lock:
            if self._conf and self._conf[-1].shape != m.shape:
                self._conf.clear()  # a swap to another label set: the window's frames do not add up
            self._conf.append(m)
            self.by_version[version] = self.by_version.get(version, 0) + m
            self.labelled += 1
            if self.labelled == self._conf.maxlen:
                self.miou_first = _miou(sum(self._conf))

    def snapshot(self) -> dict:
        with self._lock:
            lat, inf, t = np.fromiter(self._lat, float), np.fromiter(self._inf, float), list(self._t)
            conf, by_version = list(self._conf), dict(self.by_version)
        span = t[-1] - t[0] if len(t) > 1 else 0.0
        pct = lambda a, q: float(np.percentile(a, q)) if a.size else None  # noqa: E731
        return {
            "uptime_s": time.monotonic() - self.started, "frames": self.frames,
            "fps": (len(t) - 1) / span if span > 0 else 0.0,
            "latency_p50_ms": pct(lat, 50), "latency_p99_ms": pct(lat, 99), "infer_p50_ms": pct(inf, 50),
            "miou_window": _miou(sum(conf)) if conf else None, "miou_window_frames": len(conf),
            "miou_first": self.miou_first, "last_frame_time": self.last_frame_time,
            "miou_by_version": {v: _miou(m) for v, m in by_version.items()},
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
        notes = (["stopped: disk"] if s.get("buffer_stopped") else []) + (
            [f"{s['buffer_dropped']} dropped"] if s.get("buffer_dropped") else [])
        parts.append(f"buffer {s['buffer_frames']}" + (f" ({', '.join(notes)})" if notes else ""))
    parts.append(f"round: {s['last_round']}")
    if s.get("miou_window") is not None:
        by = " ".join(f"{v} {m:.1f}" for v, m in s["miou_by_version"].items() if m is not None)
        first = f"first {s['miou_window_frames']} {s['miou_first']:.1f}; " if s.get("miou_first") is not None else ""
        parts.append(f"mIoU last {s['miou_window_frames']} {s['miou_window']:.1f} ({first}{by})")
    return " | ".join(parts)


class _SnapshotCollector:
    """Counters and gauges read from the service's snapshot at scrape time: the parts keep the counts."""

    _COUNTERS = (("frames", "frames", "Frames inferred and published."),
                 ("camera_dropped_frames", "camera_dropped", "Camera frames replaced by a newer one before use."),
                 ("camera_corrupt_frames", "camera_corrupt", "Corrupt camera frames skipped."),
                 ("camera_reconnects", "camera_reconnects", "Camera reconnects."),
                 ("publish_dropped_messages", "publish_dropped", "Messages the publisher could not queue."),
                 ("buffer_dropped_frames", "buffer_dropped", "Frames the buffer would have kept but dropped (paused or backlogged)."),
                 ("engine_swaps", "swaps", "Engine hot swaps."))

    def __init__(self, snapshot: Callable[[], dict]):
        self.snapshot = snapshot

    def collect(self):
        s = self.snapshot()
        for name, key, help_ in self._COUNTERS:
            yield CounterMetricFamily(f"mas3_{name}", help_, value=s.get(key, 0))
        rounds = CounterMetricFamily("mas3_adaptation_rounds", "Adaptation rounds by outcome.", labels=["outcome"])
        for outcome, n in sorted(s.get("rounds", {}).items()):
            rounds.add_metric([outcome], n)
        yield rounds
        yield InfoMetricFamily("mas3_serving", "The serving model version and engine.",
                               value={k: str(s.get(k, "-")) for k in ("version", "engine", "provider")})
        for name, value, help_ in (
                ("buffer_frames", s.get("buffer_frames"), "Frames in the adaptation buffer."),
                ("live_miou_ratio", None if s.get("miou_window") is None else s["miou_window"] / 100,
                 "mIoU over recent labelled frames (synthetic sources), 0 to 1."),
                ("last_frame_timestamp_seconds", s.get("last_frame_time"), "Unix time of the newest published frame.")):
            if value is not None:
                yield GaugeMetricFamily(f"mas3_{name}", help_, value=value)


def registry(telemetry: Telemetry, snapshot: Callable[[], dict]) -> CollectorRegistry:
    """A registry of its own: the service's figures, its histograms, and the process and platform ones."""
    reg = CollectorRegistry()
    ProcessCollector(registry=reg)
    PlatformCollector(registry=reg)
    reg.register(telemetry.latency)
    reg.register(telemetry.inference)
    reg.register(_SnapshotCollector(snapshot))
    return reg


def check_host(host: str, allow_remote: bool = False) -> str:
    """The address to bind the metrics server to; like the stream, loopback unless allowed."""
    if not allow_remote and not is_loopback(host):
        raise UserError(f"metrics host {host} is not loopback; pass --allow-remote to expose the metrics "
                        "beyond this machine")
    return {"localhost": "127.0.0.1", "*": "0.0.0.0"}.get(host, host.strip("[]"))


class _Server6(ThreadingHTTPServer):
    address_family = socket.AF_INET6


class MetricsServer:
    """GET /metrics and /healthz on HOST:PORT (port 0 picks one) from a daemon thread."""

    def __init__(self, port: int, snapshot: Callable[[], dict], telemetry: Telemetry, *, host: str = "127.0.0.1",
                 allow_remote: bool = False, stale_after: float = 5.0):
        reg = registry(telemetry, snapshot)

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's naming)
                path = self.path.split("?")[0]
                if path in ("/metrics", "/"):
                    self._reply(200, generate_latest(reg), CONTENT_TYPE_LATEST)
                elif path == "/healthz":
                    age = telemetry.frame_age()
                    ok = age is not None and age <= stale_after
                    text = ("no frame published yet" if age is None else
                            f"{'ok' if ok else 'stale'}: last frame published {age:.1f} s ago")
                    self._reply(200 if ok else 503, (text + "\n").encode(), "text/plain; charset=utf-8")
                else:
                    self.send_error(404)

            def _reply(self, code: int, body: bytes, content_type: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):  # scrapes every few seconds must not flood the log
                pass

        bind = check_host(host, allow_remote)
        try:
            self._server = (_Server6 if ":" in bind else ThreadingHTTPServer)((bind, port), Handler)
        except OSError as e:
            raise UserError(f"cannot serve metrics on {host}:{port}: {e.strerror}; pick another --metrics-port "
                            "or --metrics-host") from None
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self.url = f"http://{f'[{bind}]' if ':' in bind else bind}:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="metrics", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
