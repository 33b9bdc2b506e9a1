"""The metrics endpoint: real HTTP scrapes parsed with prometheus_client's own parser, and /healthz."""
from __future__ import annotations

import time
import urllib.error
import urllib.request

import prometheus_client
import pytest
from prometheus_client.parser import text_string_to_metric_families

from mas3_edge.errors import UserError
from mas3_edge.runtime.telemetry import MetricsServer, Telemetry, check_host


def _service_snapshot(tel: Telemetry) -> dict:
    """What Service.snapshot() adds to the telemetry's own figures."""
    return {**tel.snapshot(), "camera_dropped": 2, "camera_corrupt": 1, "camera_reconnects": 0,
            "publish_dropped": 4, "swaps": 1, "rounds": {"accepted": 2, "rejected": 1}, "version": "v0002",
            "engine": "torch", "provider": "cpu", "buffer_frames": 7, "buffer_dropped": 3, "miou_window": 41.5}


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


@pytest.fixture
def served():
    tel = Telemetry()
    server = MetricsServer(0, lambda: _service_snapshot(tel), tel, stale_after=0.4)
    yield tel, server
    server.close()


def test_metrics_are_prometheus_client_families_in_base_units(served):
    tel, server = served
    for latency_ms, infer_ms in ((20, 5), (40, 6), (3000, 7)):
        tel.record(latency_ms, infer_ms)
    status, text = _get(f"{server.url}/metrics")
    assert status == 200
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    samples = {s.name: s for f in fams.values() for s in f.samples if not s.labels}

    assert fams["mas3_latency_seconds"].type == "histogram" and fams["mas3_inference_seconds"].type == "histogram"
    assert samples["mas3_latency_seconds_count"].value == 3
    assert samples["mas3_latency_seconds_sum"].value == pytest.approx(3.06)  # seconds, not ms
    slow = [s for s in fams["mas3_latency_seconds"].samples if s.name.endswith("_bucket") and s.labels["le"] == "2.5"]
    assert slow[0].value == 2  # the 3 s frame lies above the 2.5 s bucket
    assert samples["mas3_inference_seconds_sum"].value == pytest.approx(0.018)

    counters = {"mas3_frames": 3, "mas3_camera_dropped_frames": 2, "mas3_camera_corrupt_frames": 1,
                "mas3_publish_dropped_messages": 4, "mas3_engine_swaps": 1, "mas3_camera_reconnects": 0,
                "mas3_buffer_dropped_frames": 3}
    for name, value in counters.items():
        assert fams[name].type == "counter" and samples[f"{name}_total"].value == value
    rounds = {s.labels["outcome"]: s.value for s in fams["mas3_adaptation_rounds"].samples}
    assert fams["mas3_adaptation_rounds"].type == "counter" and rounds == {"accepted": 2, "rejected": 1}

    info = fams["mas3_serving_info"].samples[0]
    assert info.labels == {"version": "v0002", "engine": "torch", "provider": "cpu"} and info.value == 1
    assert samples["mas3_live_miou_ratio"].value == pytest.approx(0.415)
    assert samples["mas3_buffer_frames"].value == 7
    assert abs(samples["mas3_last_frame_timestamp_seconds"].value - time.time()) < 60
    assert "process_cpu_seconds" in fams and fams["process_cpu_seconds"].type == "counter"
    assert "python_info" in fams

    # the conventions the hand-written endpoint broke: no ms units, no fps gauge, no quantile label on a gauge
    ours = [f for f in fams.values() if f.name.startswith("mas3_")]
    assert not [f.name for f in ours if "_ms" in f.name or "fps" in f.name]
    assert not [s for f in ours for s in f.samples if "quantile" in s.labels]


def test_the_status_line_counts_the_buffers_drops():
    from mas3_edge.runtime.telemetry import status_line
    tel = Telemetry()
    tel.record(20, 5)
    s = {**_service_snapshot(tel), "last_round": "none yet"}
    assert "buffer 7 (3 dropped)" in status_line(s)
    assert "dropped" not in status_line({**s, "buffer_dropped": 0}).split("buffer 7")[1].split(",")[0]


def test_each_server_has_its_own_registry(served):
    tel, server = served
    other = MetricsServer(0, lambda: _service_snapshot(tel), tel)  # same metric names, no clash
    try:
        assert "mas3_frames_total" in _get(f"{other.url}/metrics")[1]
    finally:
        other.close()
    assert b"mas3_" not in prometheus_client.generate_latest(prometheus_client.REGISTRY)


def test_healthz_is_200_while_frames_flow_and_503_once_they_stop(served):
    tel, server = served
    status, body = _get(f"{server.url}/healthz")
    assert status == 503 and "no frame" in body  # nothing published yet
    tel.record(10, 2)
    assert _get(f"{server.url}/healthz")[0] == 200
    time.sleep(0.6)  # longer than stale_after
    status, body = _get(f"{server.url}/healthz")
    assert status == 503 and "stale" in body
    tel.record(10, 2)
    assert _get(f"{server.url}/healthz")[0] == 200
    assert _get(f"{server.url}/nope")[0] == 404


def test_metrics_host_is_loopback_unless_allowed():
    assert check_host("localhost") == "127.0.0.1" and check_host("::1") == "::1"
    for host in ("0.0.0.0", "*", "192.168.1.4"):
        with pytest.raises(UserError, match="allow-remote"):
            check_host(host)
    assert check_host("0.0.0.0", allow_remote=True) == "0.0.0.0"
    tel = Telemetry()
    with pytest.raises(UserError, match="allow-remote"):
        MetricsServer(0, tel.snapshot, tel, host="10.1.2.3")


def test_port_in_use_is_one_clear_error(served):
    tel, server = served
    with pytest.raises(UserError, match="cannot serve metrics"):
        MetricsServer(server.port, tel.snapshot, tel)
