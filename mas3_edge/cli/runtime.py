"""The on-device runtime: run, subscribe, buffer, versions, rollback.

Heavy modules (cv2, zmq, torch, onnxruntime) are imported inside the commands.
"""
from __future__ import annotations

import contextlib
import math
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

from ..config import AdaptConfig, RoundConfig, round_configs
from ..errors import UserError
from .core import JsonOpt, VerboseOpt
from .options import PrecisionOpt, check_precision, sizing_note, with_settings

BundleOpt = Annotated[Optional[Path], typer.Option(
    "--bundle", "-b", help="Bundle directory (versions + SERVING pointer); default: the packaged one.")]
AddressOpt = Annotated[str, typer.Option("--address", "--publish",
                                         help="tcp://HOST:PORT or ipc://PATH of the segmentation stream.")]
TopicOpt = Annotated[str, typer.Option(help="Topic prefix of the stream's messages.")]


def _load_config(ctx: typer.Context, path: Optional[Path]) -> Optional[Path]:
    """`--config robot.toml`: its keys become the command's defaults, so options on the line win."""
    if path is None or ctx.resilient_parsing:
        return path
    try:
        data = tomllib.loads(path.read_text())
    except OSError as e:
        raise UserError(f"cannot read the config file {path}: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path} is not valid TOML: {e}") from None
    kinds = _option_kinds(run_cmd)
    for key, value in data.items():
        kind = kinds.get(key.replace("-", "_"))
        if kind is None:
            raise UserError(f"{path}: unknown key {key!r}; the keys are the options of `mas3-edge run --help` "
                            f"without the dashes (e.g. round-every-frames)")
        if not _fits(value, kind):
            raise UserError(f"{path}: key {key!r} must be {_KIND_NAMES[kind]}, got {value!r}")
    values = {k.replace("-", "_"): str(v) if kinds[k.replace("-", "_")] is str else v for k, v in data.items()}
    ctx.default_map = {**(ctx.default_map or {}), **values}
    return path


_KIND_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string", Path: "a path (string)"}


def _option_kinds(command) -> dict[str, type]:
    """Option name -> its scalar type (Optional stripped), from the command's annotations."""
    import typing
    kinds = {}
    for name, hint in typing.get_type_hints(command).items():
        args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
        if args[0] in _KIND_NAMES and name not in ("config", "print_config"):
            kinds[name] = args[0]
    return kinds


def _fits(value, kind: type) -> bool:
    if kind is bool or isinstance(value, bool):
        return kind is bool and isinstance(value, bool)
    if kind in (int, float, str) and isinstance(value, int):  # camera = 0 is a device index
        return True
    return isinstance(value, float) if kind is float else (kind in (str, Path) and isinstance(value, str))


def _toml(values: dict) -> str:
    """The merged settings as TOML (scalars only; unset options are left out)."""
    import json
    lines = []
    for name, value in values.items():
        if value is None:
            continue
        key = name.replace("_", "-")
        if isinstance(value, bool):
            lines.append(f"{key} = {str(value).lower()}")
        elif isinstance(value, (int, float)):
            lines.append(f"{key} = {value!r}")
        else:
            lines.append(f"{key} = {json.dumps(str(value))}")
    return "\n".join(lines)


# The range of each number option: (test, what the value must be). Unset (None) is always allowed.
_AT_LEAST_1 = (lambda v: v >= 1, "at least 1")
_POSITIVE = (lambda v: v > 0, "more than 0")
_OFF_OR_MORE = (lambda v: v >= 0, "0 (off) or more")
_RUN_NUMBERS = {
    "threads": _AT_LEAST_1, "fps": (lambda v: v >= 0, "0 (unpaced) or more"),
    "overlay_fps": (lambda v: v >= 0, "0 (every frame) or more"),
    "buffer_frames": _AT_LEAST_1, "buffer_mb": _POSITIVE, "buffer_every": _AT_LEAST_1,
    "buffer_interval": (lambda v: v >= 0, "0 or more"), "round_every_frames": _OFF_OR_MORE,
    "round_every_minutes": _OFF_OR_MORE, "drift_threshold": _POSITIVE, "round_frames": (lambda v: v >= 2, "at least 2"),
    "keep_versions": (lambda v: v >= 0, "0 (all) or more"), "status_every": _POSITIVE,
    "metrics_port": (lambda v: 0 <= v <= 65535, "a port in 0..65535 (0: any free one)"),
    "health_timeout": _POSITIVE, "max_frames": _AT_LEAST_1, "duration": _POSITIVE, "fleet_every": _POSITIVE,
    "fleet_judge_gap": (lambda v: v >= 0, "0 or more"),
}  # the settings of a round (--adapt-steps, --tau, ...) are checked by their config classes
_SUBSCRIBE_NUMBERS = {"count": _AT_LEAST_1, "duration": _POSITIVE, "interval": _POSITIVE, "max_mb": _POSITIVE}


def _check_numbers(values: dict, rules: dict) -> None:
    """Every number option in its range (NaN and infinity never are), or one line naming the option:
    a bad value must not reach a socket, a pacing loop or a stop condition."""
    for name, (ok, rule) in rules.items():
        value = values.get(name)
        if value is not None and not (math.isfinite(value) and ok(value)):
            raise UserError(f"--{name.replace('_', '-')} must be {rule}, got {value}")


@with_settings(AdaptConfig, RoundConfig, aliases={"steps": "--adapt-steps"})
def run_cmd(
    ctx: typer.Context,
    camera: Annotated[str, typer.Option(help="Device index (0), video file, rtsp/http URL, GStreamer pipeline, "
                                             "image folder, ROS bag (FOLDER, .bag, .mcap, .db3; ?topic=/NAME "
                                             "picks the image topic), "
                                             "or synthetic://DOMAIN (night, fog, rain, realistic).")],
    bundle: BundleOpt = None,
    engine: Annotated[str, typer.Option(help="auto, onnxruntime, tensorrt, torch, torch-fp16, torch-cudagraph, torch-compile.")] = "auto",
    device: Annotated[Optional[str], typer.Option(help="cpu or cuda[:N]; default: a GPU if there is one.")] = None,
    threads: Annotated[Optional[int], typer.Option(help="CPU inference threads (default: half the cores while adapting, else all but one).")] = None,
    precision: PrecisionOpt = None,
    publish: Annotated[str, typer.Option(help="Where to publish: tcp://127.0.0.1:PORT or ipc://PATH.")] = "tcp://127.0.0.1:5555",
    topic: TopicOpt = "mas3/seg",
    allow_remote: Annotated[bool, typer.Option(help="Allow a non-loopback publish address or metrics host.")] = False,
    camera_id: Annotated[Optional[str], typer.Option(help="Camera id in every message (default: derived from --camera).")] = None,
    confidence: Annotated[bool, typer.Option(help="Send the confidence map.")] = False,
    overlay: Annotated[bool, typer.Option(help="Send a JPEG colour overlay.")] = True,
    overlay_fps: Annotated[float, typer.Option(help="At most this many overlays a second (0: one per frame); "
                                                    "messages between them carry the classes alone.")] = 0.0,
    loop: Annotated[bool, typer.Option(help="Loop a video file or folder.")] = False,
    fps: Annotated[Optional[float], typer.Option(help="Pace files/synthetic (default: their rate; 0: unpaced).")] = None,
    buffer: Annotated[Path, typer.Option(help="Frame buffer folder for adaptation.")] = Path("frames"),
    no_buffer: Annotated[bool, typer.Option("--no-buffer", help="Do not buffer frames (implies --no-adapt).")] = False,
    buffer_frames: Annotated[int, typer.Option(help="Frame cap of the buffer.")] = 2000,
    buffer_mb: Annotated[float, typer.Option(help="Size cap of the buffer in MB.")] = 512.0,
    buffer_every: Annotated[int, typer.Option(help="Buffer every N-th frame.")] = 5,
    buffer_interval: Annotated[float, typer.Option(help="At most one buffered frame per this many seconds.")] = 0.5,
    adapt: Annotated[bool, typer.Option(help="Run adaptation rounds in the background.")] = True,
    round_every_frames: Annotated[int, typer.Option(help="A round per N newly buffered frames (0: off).")] = 150,
    round_every_minutes: Annotated[float, typer.Option(help="A round every T minutes (0: off).")] = 0.0,
    drift_threshold: Annotated[Optional[float], typer.Option(help="Start a round when live SWD to the prototypes passes this.")] = None,
    round_frames: Annotated[int, typer.Option(help="A round adapts on the newest N buffered frames.")] = 150,
    keep_versions: Annotated[int, typer.Option(
        help="Versions the bundle keeps as rounds add more (0: all), applied at start and after each round. "
             "The serving version, the one served before it, its parent and source versions are always kept; "
             "beyond N, versions that can never be served (rejected or unfinished rounds) go first, then the "
             "oldest.")] = 20,
    status_every: Annotated[float, typer.Option(help="Seconds between status lines.")] = 5.0,
    metrics_port: Annotated[Optional[int], typer.Option(
        help="Serve Prometheus /metrics and /healthz on METRICS_HOST:PORT.")] = None,
    metrics_host: Annotated[str, typer.Option(help="Host of the metrics endpoint (another than loopback needs --allow-remote).")] = "127.0.0.1",
    health_timeout: Annotated[float, typer.Option(help="/healthz fails after this many seconds without a published frame.")] = 5.0,
    events: Annotated[Optional[Path], typer.Option(help="Append status, round and swap events here (JSON lines).")] = None,
    fleet: Annotated[Optional[str], typer.Option(
        help="Fleet store (folder or s3://BUCKET/PREFIX): publish accepted rounds' sets; pull, judge and serve "
             "the fleet's.", rich_help_panel="Fleet")] = None,
    fleet_key: Annotated[Optional[Path], typer.Option(help="This robot's signing key (`mas3-edge fleet keygen`).",
                                                      rich_help_panel="Fleet")] = None,
    fleet_trust: Annotated[Optional[Path], typer.Option(help="Trust file: the .pub lines of the robots whose sets "
                                                             "are accepted.", rich_help_panel="Fleet")] = None,
    fleet_every: Annotated[float, typer.Option(help="Seconds between pulls from the fleet store.",
                                               rich_help_panel="Fleet")] = 30.0,
    fleet_judge_gap: Annotated[float, typer.Option(
        help="Seconds between the starts of two judgements of the fleet's sets: at most 3600/GAP an hour, "
             "whatever the fleet publishes.", rich_help_panel="Fleet")] = 300.0,
    max_frames: Annotated[Optional[int], typer.Option(help="Stop after N frames.")] = None,
    duration: Annotated[Optional[float], typer.Option(help="Stop after S seconds.")] = None,
    verbose: VerboseOpt = False,
    config: Annotated[Optional[Path], typer.Option(
        is_eager=True, callback=_load_config,
        help="TOML file of these options (keys without the dashes); options on the command line override it.")] = None,
    print_config: Annotated[bool, typer.Option(help="Print the merged settings as TOML and exit.")] = False,
    settings: Optional[dict] = None,
) -> None:
    """Serve segmentation from a camera over ZeroMQ; buffer frames, adapt and hot-swap in the background.

    The round settings are those of `mas3-edge adapt`; on a CPU, rounds take the CPU sizing for the
    ones left unset (--print-config shows it)."""
    _check_numbers(ctx.params, _RUN_NUMBERS)
    check_precision(precision)
    from mas3_edge.runtime.publisher import check_address
    check_address(publish, allow_remote)  # its port too, before anything is loaded or printed
    _, _, sized = round_configs(settings or {}, cpu=True)  # validated before anything starts
    fleet_cfg = _fleet_config(fleet, fleet_key, fleet_trust, fleet_every, fleet_judge_gap, no_buffer)
    if print_config:
        return typer.echo(_toml({k: ctx.params[k] for k in _option_kinds(run_cmd)})
                          + f"\n# a round on a CPU also takes, for what is unset here: {sizing_note(sized)}")
    from mas3_edge.runtime.frame_buffer import BufferPolicy
    from mas3_edge.runtime.scheduler import ScheduleConfig
    from mas3_edge.runtime.service import Service, ServiceConfig

    from .core import set_verbose
    set_verbose(verbose)
    sched = ScheduleConfig(every_frames=round_every_frames, every_minutes=round_every_minutes,
                           drift_threshold=drift_threshold, limit=round_frames, min_frames=min(40, round_frames),
                           adapt=settings or {}, keep_versions=keep_versions, int8=precision == "int8")
    from mas3_edge.bundle import user_bundle
    cfg = ServiceConfig(camera=camera, bundle=user_bundle(bundle), engine=engine, device=device, threads=threads,
                        precision=precision,
                        publish=publish, topic=topic, allow_remote=allow_remote, confidence=confidence,
                        overlay=overlay, overlay_fps=overlay_fps, loop=loop, fps=fps, buffer=None if no_buffer else buffer,
                        buffer_policy=BufferPolicy(max_frames=buffer_frames, max_mb=buffer_mb, every_n=buffer_every,
                                                   min_interval_s=buffer_interval),
                        adapt=adapt and not no_buffer, schedule=sched, status_every=status_every,
                        metrics_port=metrics_port, metrics_host=metrics_host, health_stale_s=health_timeout,
                        camera_id=camera_id, events=events, max_frames=max_frames, duration=duration,
                        fleet=fleet_cfg)
    Service(cfg).run()


def _fleet_config(url: Optional[str], key: Optional[Path], trust: Optional[Path], every: float, judge_gap: float,
                  no_buffer: bool):
    """--fleet's settings, each file and the URL checked now: a bad one fails before anything starts."""
    if url is None:
        if key is not None or trust is not None:
            raise UserError("--fleet-key and --fleet-trust belong to --fleet URL; add it")
        return None
    if key is None or trust is None:
        raise UserError("--fleet needs --fleet-key KEY (`mas3-edge fleet keygen`) and --fleet-trust FILE")
    if no_buffer:
        raise UserError("--fleet judges the fleet's sets on buffered frames; drop --no-buffer")
    from mas3_edge.fleet import objects, store
    from mas3_edge.runtime.fleet import FleetConfig
    store.open_store(url), objects.load_key(key), objects.load_trust(trust)
    return FleetConfig(url, key, trust, every, judge_gap_s=judge_gap)


def subscribe_cmd(
    address: AddressOpt = "tcp://127.0.0.1:5555",
    topic: TopicOpt = "mas3/seg",
    every: Annotated[bool, typer.Option("--all", help="Every message (default: only the newest, CONFLATE).")] = False,
    save: Annotated[Optional[Path], typer.Option(help="Write each received overlay here as PNG.")] = None,
    show: Annotated[bool, typer.Option(help="Show the overlays in a window (q quits).")] = False,
    count: Annotated[Optional[int], typer.Option(help="Stop after N messages.")] = None,
    duration: Annotated[Optional[float], typer.Option(help="Stop after S seconds.")] = None,
    interval: Annotated[float, typer.Option(help="Seconds between printed lines.")] = 2.0,
    record: Annotated[Optional[Path], typer.Option(
        help="Record to this MCAP file as ROS 2 messages (Foxglove, ros2 bag play); implies --all.")] = None,
    max_mb: Annotated[Optional[float], typer.Option(help="Stop recording when the file reaches this size (MB).")] = None,
    labels: Annotated[Optional[Path], typer.Option(
        "--labels", help="Labels file (docs/labels format) naming and colouring a non-Cityscapes stream's classes; "
                         "cityscapes19 is built in, other label sets are drawn in generated colours.")] = None,
) -> None:
    """Listen to the segmentation stream: print rates and latency; save, show or record the overlays."""
    _check_numbers({"count": count, "duration": duration, "interval": interval, "max_mb": max_mb}, _SUBSCRIBE_NUMBERS)
    from mas3_edge.labels import load_labels
    from mas3_edge.runtime.subscriber import LabelBook, Subscriber
    book = LabelBook([load_labels(labels)] if labels else (),
                     warn=lambda line: typer.echo(f"warning: {line}", err=True))
    shown = _Shower() if show else None
    if save is not None:
        save.mkdir(parents=True, exist_ok=True)
    t0 = last = time.monotonic()
    n_last, msg = 0, None
    # the recorder opens its file after the Subscriber has checked the address: no stray file
    with (Subscriber(address, topic, latest_only=not (every or record)) as sub,
          _recording(record, max_mb, book) as (rec, stop)):
        try:
            while not stop.is_set() and (count is None or sub.received < count) and (
                    duration is None or time.monotonic() - t0 < duration):
                m = sub.recv(timeout=0.5)
                msg = m or msg
                if m is not None and (save is not None or shown is not None):
                    _render(m, save, shown, book)
                if m is not None and rec is not None and not rec.write(m):
                    break  # --max-mb reached
                now = time.monotonic()
                if now - last >= interval:
                    typer.echo(_sub_line(sub, msg, (sub.received - n_last) / (now - last)))
                    last, n_last = now, sub.received
        except KeyboardInterrupt:
            pass
        finally:
            if shown is not None:
                shown.close()
    if rec is not None:
        from mas3_edge.runtime.record import summary_line
        typer.echo(summary_line(rec, time.monotonic() - t0))
    typer.echo(f"received {sub.received} messages, {sub.gaps} frame ids skipped, latency p50 "
               f"{sub.latency_ms(50):.1f} ms p99 {sub.latency_ms(99):.1f} ms")


@contextlib.contextmanager
def _recording(path: Optional[Path], max_mb: Optional[float], book=None):
    """--record: (an MCAP recorder, closed on the way out, and the event Ctrl-C / SIGTERM then set
    instead of raising, so neither lands inside a chunk being written); (None, an unset event) without."""
    import threading
    stop = threading.Event()
    if path is None:
        if max_mb is not None:
            raise UserError("--max-mb bounds a recording; add --record FILE.mcap")
        yield None, stop
        return
    from mas3_edge.runtime.record import McapRecorder, stop_on_signals
    with McapRecorder(path, max_mb=max_mb, book=book) as rec, stop_on_signals(stop):
        yield rec, stop


def _sub_line(sub, msg, rate: float) -> str:
    if msg is None:
        return f"waiting for {sub.address} ..."
    return (f"{rate:.1f} msg/s | latency p50 {sub.latency_ms(50):.0f} ms p99 {sub.latency_ms(99):.0f} ms | "
            f"gaps {sub.gaps} | frame {msg.frame_id} {msg.version} {msg.engine} {msg.width}x{msg.height}")


def _render(msg, save: Path | None, shower, book) -> None:
    """The message's overlay (drawn by the publisher), else its class map in `book`'s colours."""
    from mas3_edge.data import write_png
    img = msg.overlay_rgb()
    img = book.colorize(msg) if img is None else img
    if save is not None:
        write_png(save / f"{msg.frame_id:08d}.png", img)
    if shower is not None:
        shower.show(img, f"{msg.version} frame {msg.frame_id}")


class _Shower:
    """An OpenCV window; a machine without a display is a clear error, not a crash."""

    def __init__(self):
        import os
        import sys

        import cv2
        self.cv2 = cv2
        # Qt aborts the whole process (no exception) when it finds no display: check first
        if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
            raise UserError("--show needs a display (DISPLAY is not set); use --save DIR instead")
        try:
            cv2.namedWindow("mas3-edge", cv2.WINDOW_NORMAL)
        except cv2.error:
            raise UserError("--show needs a display (and OpenCV with GUI support); use --save DIR instead") from None

    def show(self, rgb, title: str) -> None:
        self.cv2.setWindowTitle("mas3-edge", title)
        self.cv2.imshow("mas3-edge", self.cv2.cvtColor(rgb, self.cv2.COLOR_RGB2BGR))
        if self.cv2.waitKey(1) & 0xFF == ord("q"):
            raise KeyboardInterrupt

    def close(self) -> None:
        self.cv2.destroyAllWindows()


def buffer_cmd(buffer: Annotated[Path, typer.Option(help="Frame buffer folder.")] = Path("frames"),
               as_json: JsonOpt = False) -> None:
    """Show what is in the frame buffer."""
    import dataclasses

    from mas3_edge.runtime.frame_buffer import summarize

    from .core import print_json, table
    if not buffer.is_dir():
        raise UserError(f"no frame buffer at {buffer}; `mas3-edge run` creates it (see --buffer)")
    s = summarize(buffer)
    if as_json:
        return print_json(dataclasses.asdict(s))
    fmt = lambda t: time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "-"  # noqa: E731
    table(f"frame buffer {buffer}", ["frames", "size", "first", "last", "oldest", "newest"],
          [[s.frames, f"{s.bytes / 2**20:.1f} MB", s.first or "-", s.last or "-", fmt(s.oldest_mtime),
            fmt(s.newest_mtime)]])


def versions_cmd(bundle: BundleOpt = None, as_json: JsonOpt = False) -> None:
    """List the bundle's versions with their health figures (lower is better); * marks the serving one."""
    from mas3_edge.bundle import user_bundle
    from mas3_edge.runtime.versions import version_rows

    from .core import print_json, table
    bundle = user_bundle(bundle)
    cols, rows = version_rows(bundle)
    if as_json:
        marker = cols[0]  # the unnamed first column marks the serving version
        return print_json({"bundle": str(bundle), "versions": [
            {("serving" if c == marker else c): (v == "*" if c == marker else v) for c, v in zip(cols, r)} for r in rows]})
    table(f"versions in {bundle}", cols, rows)


def rollback_cmd(
    version: Annotated[Optional[str], typer.Argument(help="Version to serve; default: the serving one's parent.")] = None,
    bundle: BundleOpt = None,
) -> None:
    """Serve another version (works while `run` serves: it follows the SERVING pointer)."""
    from mas3_edge.bundle import user_bundle
    from mas3_edge.runtime.versions import rollback
    old, new = rollback(user_bundle(bundle), version)
    typer.echo(f"serving {new} (was {old}); a running `mas3-edge run` swaps to it within a second")


def register(app: typer.Typer) -> None:
    app.command("run")(run_cmd)
    app.command("subscribe")(subscribe_cmd)
    app.command("buffer")(buffer_cmd)
    app.command("versions")(versions_cmd)
    app.command("rollback")(rollback_cmd)
