"""`run --fleet URL`: publish the sets of accepted rounds, pull the fleet's, judge and serve them.

A background thread does all the store's I/O (publish, list, fetch, verify, announce): a store
that is down or slow costs that thread a backoff (1, 2, 4, ... 60 s, one log line per failure) and
the serving loop nothing. A verified set waits for the loop's `tick`, which judges it in a child
process like a round (the same child entry, the same judgement, the same begin/commit marks on the
version it writes) while no round runs, and moves the SERVING pointer when the set was accepted.
The thread alone touches the fleet's state file: the loop hands it outcomes through a queue.

Judging is lazy: the thread fetches and hands over only the sets whose router key (signed, in the
manifest entry) the robot's newest buffered frames would route to, by the bank's own test
(bank.ChunkDomain: nearer than every set the serving version holds, within `same_domain` times the
frames' spread). The others stay pending, and are weighed again at a pull after the buffer's newest
frame or the serving version changed: the stem of DOMAIN_FRAMES frames and a distance per set.
"""
from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import queue
import shutil
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mas3_edge.errors import UserError
from mas3_edge.store import BundleStore

from .scheduler import ScheduleConfig, round_child

log = logging.getLogger(__name__)

STATE_FILE = "fleet.json"  # in the bundle: what became of each set this robot saw
DOMAIN_FRAMES = 32  # the newest buffered frames whose domain decides which sets concern this robot


@dataclass(frozen=True)
class FleetConfig:
    url: str
    key: Path
    trust: Path
    every_s: float = 30.0  # seconds between pulls
    timeout_s: float = 600.0  # a judgement that takes longer is a crashed one
    backoff_s: float = 1.0  # the first wait after a store failure (then doubled, up to a minute)
    lazy: bool = True  # judge only the sets this robot's frames would route to (False: every set)
    judge_gap_s: float = 300.0  # between the starts of two judgements: a bound on judging, whatever is published

    def __post_init__(self) -> None:
        if not self.every_s > 0:
            raise UserError(f"--fleet-every must be more than 0 seconds, got {self.every_s}")


def judge_set(export: bool = True, **job) -> dict:
    """The child's work: judge the set (fleet.adopt), then export an accepted version, as a round does."""
    from mas3_edge.fleet.adopt import adopt_set
    out = adopt_set(**job)
    if out["outcome"] == "accepted" and export:
        from mas3_edge.bundle import resolve
        from mas3_edge.export.onnx import export_onnx
        try:
            export_onnx(resolve(Path(job["bundle"]), out["version"]))
        except UserError as e:
            return {**out, "outcome": "rejected", "reason": f"export failed: {e}"}
    return out


class FleetRunner:
    def __init__(self, cfg: FleetConfig, bundle: Path, frames: Path, schedule: ScheduleConfig,
                 camera_id: str | None = None):
        from mas3_edge.fleet import objects, store as fstore, sync
        self.cfg, self.bundle, self.frames, self.schedule, self.camera_id = cfg, Path(bundle), Path(frames), schedule, camera_id
        store = fstore.open_store(cfg.url)  # each a UserError now, not a failure an hour later
        key, trust = objects.load_key(cfg.key), objects.load_trust(cfg.trust)
        self.bstore = BundleStore(self.bundle)
        serving = self.bstore.serving()
        if serving is None:
            raise UserError(f"bundle {bundle} serves no version: the fleet needs its lineage")
        lineage = objects.Lineage.of_version(self.bstore.path(serving))
        self.fleet = sync.Fleet(store, lineage, self.bundle / STATE_FILE, key, trust)
        self.backoff = fstore.Backoff(first=cfg.backoff_s)
        self._tmp = self.bstore.scratch("fleet")
        self._outbox: queue.Queue = queue.Queue()  # ("publish", round outcome) / ("record", ...) / ("announce",)
        self._ready: deque = deque()  # verified sets waiting for their judgement
        self._pending: tuple | None = None  # the outbox item whose store call failed: first when it answers again
        # the status object is rewritten at most once a pull interval: a robot judging many sets in a row
        # must not turn each into a PUT
        self._announce_due, self._announced = True, -float("inf")
        self._weighed: tuple | None = None  # (serving version, newest frame) the pending sets were last weighed on
        self._domain: tuple = (None, None)  # (that pair, bank.ChunkDomain of those frames or None), computed on need
        self._nets: dict = {}  # serving version -> its network, for the router's distances
        from mas3_edge.config import round_configs
        self._same_domain = round_configs(dict(schedule.adapt))[0].same_domain  # the robot's own rounds' threshold
        self._proc, self._job, self._judged_at = None, {}, -float("inf")
        self._stop = threading.Event()
        self._ctx = mp.get_context("spawn")
        self._thread = threading.Thread(target=self._work, name="mas3-fleet", daemon=True)
        self._thread.start()
        self._outbox.put(("announce",))

    @property
    def busy(self) -> bool:
        return self._proc is not None

    # ------------------------------------------------------------ the serving loop's side

    def round_done(self, done: dict) -> None:
        """After each round: an accepted one's set is published (a rejected one's never)."""
        if done.get("outcome") == "accepted" and done.get("version"):
            self._outbox.put(("publish", done))

    def tick(self, in_buffer: int, round_running: bool) -> dict | None:
        """Start judging a pulled set when no round runs; return a finished judgement (once)."""
        if self._proc is not None:
            return self._poll()
        if round_running or not self._ready or in_buffer < self.schedule.min_frames \
                or time.monotonic() - self._judged_at < self.cfg.judge_gap_s:
            return None
        version = self.bstore.serving()
        if version is not None:
            self._launch(self._ready.popleft(), version)
        return None

    def _launch(self, pulled, version: str) -> None:
        path = self._tmp / f"{pulled.entry['object']}.safetensors"
        path.write_bytes(pulled.data)
        label = f"{self._tmp.name}/{pulled.entry['object'][:16]}"
        job = {"bundle": str(self.bundle), "frames": str(self.frames), "version": version, "object_path": str(path),
               "entry": {k: pulled.entry[k] for k in ("object", "robot", "camera_id")},
               "adapt": dict(self.schedule.adapt), "limit": self.schedule.limit, "export": self.schedule.export,
               "threads": self.schedule.threads}
        result = self._tmp / f"{pulled.entry['object'][:16]}.json"
        proc = self._ctx.Process(target=round_child, args=(judge_set, job, str(result), self.schedule.nice, os.getpid(), label),
                                 name="mas3-fleet-judge")
        proc.start()
        self._judged_at = time.monotonic()
        self._proc, self._job = proc, {**job, "pulled": pulled, "result": result, "label": label, "t0": time.monotonic()}
        log.info("fleet: judging set %s of %s on %s", pulled.entry["object"][:12], pulled.entry["robot"], version)

    def _poll(self) -> dict | None:
        proc, job = self._proc, self._job
        if proc.is_alive():
            if time.monotonic() - job["t0"] <= self.cfg.timeout_s:
                return None
            proc.kill()
            proc.join(1.0)
            out = {"outcome": "crashed", "reason": f"timed out after {self.cfg.timeout_s:.0f} s"}
        else:
            proc.join(0.1)
            try:
                out = json.loads(job["result"].read_text())
            except (OSError, ValueError):
                out = {"outcome": "crashed", "reason": f"the judging process died (exit code {proc.exitcode})"}
        self._proc = None
        return self._finish(out, job)

    def _finish(self, out: dict, job: dict) -> dict:
        pulled = job["pulled"]
        if out["outcome"] == "accepted" and self.bstore.serving() != job["version"]:
            out.update(outcome="superseded", reason=f"serving moved to {self.bstore.serving()} meanwhile")
            self._ready.appendleft(pulled)  # judged against a version no longer served: judge it again
        for vid in self.bstore.round_versions(job["label"]):
            if out["outcome"] == "accepted" and vid == out.get("version"):
                self.bstore.commit(vid)
            else:
                self.bstore.reject(vid, f"fleet set {out['outcome']}: {out.get('reason')}")
        if out["outcome"] == "accepted":
            self.bstore.set_serving(out["version"])
        if out["outcome"] != "superseded":  # rejected or crashed: recorded, never judged again
            self._outbox.put(("record", pulled.key, "adopted" if out["outcome"] == "accepted" else "rejected",
                              out.get("reason", ""), {"object": pulled.entry["object"], "robot": pulled.entry["robot"],
                                                      "version": out.get("version")}))
        self._outbox.put(("announce",))
        return {**out, "set": pulled.entry["object"], "robot": pulled.entry["robot"], "seconds": time.monotonic() - job["t0"]}

    def close(self, timeout: float = 0.5) -> None:
        self._stop.set()
        if self._proc is not None and self._proc.is_alive():
            self._proc.kill()
            self._proc.join(min(timeout, 0.2))
        self._thread.join(timeout)
        shutil.rmtree(self._tmp, ignore_errors=True)

    # ------------------------------------------------------------ the store's side (the thread)

    def _work(self) -> None:
        next_pull = 0.0
        while not self._stop.is_set():
            if self.backoff.ready():
                try:
                    self._drain()
                    if time.monotonic() >= next_pull:
                        self._pull()
                        next_pull = time.monotonic() + self.cfg.every_s
                    if self._announce_due and time.monotonic() - self._announced >= self.cfg.every_s:
                        self.fleet.announce(self._status())
                        self._announce_due, self._announced = False, time.monotonic()
                    self.backoff.ok()
                except Exception as e:  # the store down, slow or refusing: never the serving loop's problem
                    wait = self.backoff.failed()
                    msg = str(e).splitlines()[0][:200] if str(e) else ""
                    log.warning("fleet: store %s failed (%s: %s); retrying in %.1f s",
                                self.cfg.url, type(e).__name__, msg, wait)
            self._stop.wait(0.2)

    def _drain(self) -> None:
        """Do what the loop queued; an item whose store call fails stays first in line."""
        while True:
            if self._pending is None:
                if self._outbox.empty():
                    return
                self._pending = self._outbox.get_nowait()
            self._do(self._pending)
            self._pending = None

    def _do(self, item: tuple) -> None:
        if item[0] == "publish":
            from mas3_edge.fleet.adopt import round_figures, round_set
            done = item[1]
            res = self.fleet.publish(round_set(self.bundle, done["version"]), round_figures(done), self.camera_id,
                                     version=done["version"])
            log.info("fleet: published the set of %s as %s (%d bytes)", done["version"], res["object"][:12], res["bytes"])
            self._announce_due = True
        elif item[0] == "record":
            _, key, outcome, reason, info = item
            self.fleet.record(key, outcome, reason, **info)
            self._weighed = None  # a judgement ended: the pending sets are weighed again at the next pull
        else:
            self._announce_due = True

    def _pull(self) -> None:
        at = self._frames_at()
        recheck, self._weighed = at != self._weighed, at
        before = len(self.fleet.pending())
        for pulled in self.fleet.pull(self._concerns if self.cfg.lazy else None, recheck):
            self._ready.append(pulled)
            log.info("fleet: pulled set %s of %s (%d bytes), verified", pulled.entry["object"][:12],
                     pulled.entry["robot"], len(pulled.data))
        now = len(self.fleet.pending())
        if now != before:
            self._announce_due = True
            log.info("fleet: %d sets pending: not for this robot's newest frames, neither fetched nor judged", now)

    def _frames_at(self) -> tuple:
        """(serving version, newest buffered frame): what a set's concern for this robot depends on."""
        from mas3_edge.data import list_images
        try:
            newest = list_images(self.frames)[-1].name
        except (UserError, IndexError, OSError):
            newest = None
        return self.bstore.serving(), newest

    def _concerns(self, mean: np.ndarray, var: np.ndarray) -> float | None:
        """The distance from this robot's newest buffered frames to a set with this router key when
        they would route to it; None when not."""
        at = self._weighed  # this pull's: the buffer is listed once a pull, not once a set
        if self._domain[0] != at:
            self._domain = (at, self._chunk_domain(*at))
        domain = self._domain[1]
        return None if domain is None else domain.route_distance(mean, var, self._same_domain)

    def _chunk_domain(self, version: str | None, newest: str | None):
        from mas3_edge import bank, bundle as bundles
        from mas3_edge.frames import load_frames
        if version is None or newest is None:
            return None  # no frames yet: nothing concerns this robot, everything waits
        if version not in self._nets:
            self._nets = {version: bundles.load_version(self.bundle, version).net}  # the served one only
        net = self._nets[version]
        try:
            frames = load_frames(self.frames, net.config.input_size, DOMAIN_FRAMES)
        except UserError:
            return None
        return bank.ChunkDomain(net, frames)

    def _status(self) -> dict:
        """What this robot serves: the sets published or adopted along its serving version's ancestry."""
        chain, vid = set(), self.bstore.serving()
        while vid and vid not in chain:
            chain.add(vid)
            vid = self.bstore.parent(vid)
        sets = sorted({r["object"] for r in self.fleet.state["sets"].values()
                       if r["outcome"] in ("published", "adopted") and r.get("version") in chain})
        pending = sorted(self.fleet.state["sets"][k]["object"][:16] for k in self.fleet.pending())
        return {"serving": self.bstore.serving(), "sets": sets, "pending": pending, "lineage": self.fleet.lineage.id,
                "camera_id": self.camera_id}
