"""One robot's side of the fleet: publish a set, pull the new verified sets of its lineage, and
remember what became of each (adopted, rejected by its gate, refused), so nothing is tried twice.

Pulls are lazy when the caller says which router keys concern it (`concerns`: would this robot's
newest frames route to a set with this key?). A set whose signed entry carries a key is recorded
`pending`: its object is not fetched and it is not judged until the frames would route to it, and
then only if it is the nearest such set and no other waits for its judgement. Pending sets are
weighed again when the caller says the frames or the bank changed (`recheck`), and are fetched,
verified and handed over for judgement exactly as an eager pull's. At most MAX_PENDING are kept,
the newest by publish time; an older one is recorded `dropped` and never reconsidered. An entry
made before entries carried a router key is fetched as before.

No torch here: verification is bytes, hashes and signatures. Store errors (down, slow, missing
bucket) are left to the caller, which backs off; everything about one set is decided here.
"""
from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ..fsutil import atomic_write_json
from . import objects
from .objects import Incomplete, Lineage, Refused
from .store import LINEAGES, ROBOTS, Store, entry_key, entry_time, object_key

log = logging.getLogger(__name__)

SKEW_S = 300.0  # robots' clocks may disagree this much: entries are listed from that far before the newest seen
MAX_ATTEMPTS = 3  # an object still truncated after this many pulls was half-written for good
MAX_PENDING = 128  # sets kept pending (newest first): ~1.5 KB each in fleet.json
MAX_REJECTED_KEYS = 32  # router keys of the newest sets this robot's gate rejected: a set farther than one is not judged
PENDING = "waits until this robot's newest frames would route to it (its signed router key): not fetched nor judged"

# (router mean, router var) -> the distance from this robot's frames to a set with that key when they
# would route to it (the bank's test), None when they would not
Concerns = Callable[[np.ndarray, np.ndarray], "float | None"]


@dataclass
class Pulled:
    key: str  # the manifest entry's key
    entry: dict
    header: dict
    rows: dict[str, np.ndarray]
    data: bytes


class Fleet:
    def __init__(self, store: Store, lineage: Lineage, state_path: Path | None = None,
                 key: tuple[str, Ed25519PrivateKey] | None = None, trust: dict[str, str] | None = None):
        self.store, self.lineage, self.state_path = store, lineage, state_path
        self.robot: str | None = key[0] if key is not None else None
        self.key: Ed25519PrivateKey | None = key[1] if key is not None else None
        self.trust = trust or {}
        self.state = self._load_state()
        self.bytes_in = self.bytes_out = 0
        self.gets = 0  # objects read from the store
        self.waiting: set[str] = set()  # verified, waiting for their judgement: not fetched again meanwhile

    def _load_state(self) -> dict:
        try:
            state = json.loads(self.state_path.read_text()) if self.state_path else {}
        except (OSError, ValueError):
            state = {}
        return {"newest": state.get("newest", 0.0), "sets": state.get("sets", {}), "attempts": state.get("attempts", {}),
                "rejected_keys": state.get("rejected_keys", [])}

    def save_state(self) -> None:
        if self.state_path is not None:
            atomic_write_json(self.state_path, self.state)

    def record(self, key: str, outcome: str, reason: str, **info) -> None:
        """Remember what became of a set: a recorded set is never fetched or judged again. A rejected
        set's router key is kept: frames that would route to it must be nearer another set to judge it."""
        router = (self.state["sets"].get(key) or {}).get("entry", {}).get("router")
        if outcome == "rejected" and router is not None:
            self.state["rejected_keys"] = [router, *self.state["rejected_keys"]][:MAX_REJECTED_KEYS]
        self.state["sets"][key] = {"outcome": outcome, "reason": reason, "time": time.time(), **info}
        self.state["attempts"].pop(key, None)
        self.waiting.discard(key)
        self.save_state()

    # ------------------------------------------------------------ publish

    def publish(self, rows: dict[str, np.ndarray], figures: dict, camera_id: str | None, **info) -> dict:
        """Write the object, then the entry that names it. -> {object, entry, bytes}."""
        if self.key is None or self.robot is None:
            raise ValueError("publishing needs the robot's key")
        now = time.time()
        header = {"lineage": asdict(self.lineage), "lineage_id": self.lineage.id, "round": figures,
                  "camera_id": camera_id, "robot": self.robot, "created": now}
        obj = objects.encode_set(rows, header)
        entry = objects.make_entry(obj, header, self.robot, self.key, objects.router_key(rows))
        ekey = entry_key(self.lineage.id, now, self.robot, entry["object"])
        body = json.dumps(entry, sort_keys=True).encode()
        self.store.put(object_key(entry["object"]), obj)  # the object first: an entry never names nothing
        self.store.put(ekey, body)
        self.bytes_out += len(obj) + len(body)
        self.record(ekey, "published", "own round", object=entry["object"], robot=self.robot, **info)
        return {"object": entry["object"], "entry": ekey, "bytes": len(obj) + len(body)}

    def announce(self, status: dict) -> None:
        """robots/ROBOT.json: what this robot serves (for `fleet ls`); only this robot writes it."""
        if self.robot is not None:
            self.store.put(f"{ROBOTS}/{self.robot}.json",
                           json.dumps({**status, "robot": self.robot, "time": time.time()}, sort_keys=True).encode())

    # ------------------------------------------------------------ pull

    def new_keys(self) -> list[str]:
        """Entry keys of this lineage not seen before, listed from just before the newest one seen."""
        prefix = f"{LINEAGES}/{self.lineage.id}"
        newest = self.state["newest"]
        after = f"{prefix}/{int(max(0.0, newest - SKEW_S) * 1e9):020d}" if newest else None
        keys = [k for k in self.store.list_after(prefix, after) if k not in self.state["sets"] and k not in self.waiting]
        self._forget(newest - 2 * SKEW_S)
        return keys

    def _forget(self, before: float) -> None:
        """Records older than the listing window: never listed again, so never tried again either
        (the sets this robot published or adopted are kept: they say what it serves; pending ones
        are bounded by MAX_PENDING instead)."""
        sets = self.state["sets"]
        kept = ("published", "adopted", "pending")
        for k in [k for k, r in sets.items() if entry_time(k) < before and r["outcome"] not in kept]:
            del sets[k]

    def pending(self) -> list[str]:
        """Entry keys of the sets recorded pending, newest first (a set fetched for its judgement stays
        recorded pending until judged, so a restart meanwhile weighs it again; it is not listed here)."""
        sets = self.state["sets"]
        return sorted((k for k, r in sets.items() if r["outcome"] == "pending" and k not in self.waiting),
                      key=entry_time, reverse=True)

    def pull(self, concerns: Concerns | None = None, recheck: bool = False) -> list[Pulled]:
        """The new sets that pass verification; each refused one is recorded with one log line.

        With `concerns`, a set whose entry carries a router key is recorded pending, and of those the
        frames would route to (`concerns` gives their distance) only the nearest is fetched, and only
        when no set fetched before still waits for its judgement: frames route to one set, and once
        it has joined the bank the others must be nearer still. With `recheck` the pending sets are
        weighed again first. Without `concerns` every set is this robot's to judge, pending ones too."""
        todo: list[tuple[str, bytes | None]] = [
            (k, json.dumps(self.state["sets"][k]["entry"]).encode())
            for k in (self.pending() if recheck or concerns is None else [])]
        todo += [(k, None) for k in self.new_keys()]
        out, routed = [], []
        for key, data in todo:
            if data is None:
                self.state["newest"] = max(self.state["newest"], entry_time(key))
            got = self._entry(key, data)
            if got is None:
                continue
            entry, raw = got
            router = objects.entry_router(entry)
            if concerns is None or router is None:  # every set concerns this robot, or an entry made before keys
                out.append(self._object(key, entry))
                continue
            self._defer(key, raw, entry)
            dist = concerns(*router)
            if dist is not None:
                routed.append((dist, key, entry))
        if routed and concerns is not None:
            floor = self._rejected_floor(concerns)
            routed = [r for r in routed if r[0] < floor]  # nearer than every set rejected here for these frames
        if routed and not self.waiting:
            _, key, entry = min(routed, key=lambda r: r[0])
            out.append(self._object(key, entry))
        pulled = [p for p in out if p is not None]
        self.waiting.update(p.key for p in pulled)
        self._bound_pending()
        self.save_state()
        return pulled

    def _rejected_floor(self, concerns: Concerns) -> float:
        """The distance from the frames to the nearest set this robot's gate rejected that they would
        route to: a set judged for these frames counts as held, adopted or not, so the judgements a
        domain costs do not grow with the sets the gate turns down."""
        keys = (objects.entry_router({"router": r}) for r in self.state["rejected_keys"])
        dists = (concerns(*k) for k in keys if k is not None)
        return min((d for d in dists if d is not None), default=float("inf"))

    def _defer(self, key: str, entry_json: bytes, entry: dict) -> None:
        if self.state["sets"].get(key, {}).get("outcome") != "pending":
            log.debug("fleet: %s pending: %s", key, PENDING)
            self.state["sets"][key] = {"outcome": "pending", "reason": PENDING, "time": time.time(),
                                       "object": entry["object"], "robot": entry["robot"], "entry": json.loads(entry_json)}

    def _bound_pending(self) -> None:
        for key in self.pending()[MAX_PENDING:]:
            r = self.state["sets"][key]
            self.state["sets"][key] = {"outcome": "dropped", "reason": f"{MAX_PENDING} newer sets pending",
                                       "time": time.time(), "object": r["object"], "robot": r["robot"]}

    def _entry(self, key: str, data: bytes | None) -> tuple[dict, bytes] | None:
        """A manifest entry (read from the store, or `data`), verified, with its bytes; None when
        refused (recorded), not complete yet, or this robot's own."""
        try:
            if data is None:
                data = self.store.get(key, objects.MAX_ENTRY_BYTES)
                self.bytes_in += len(data)
            entry = objects.verify_entry(data, self.trust, self.lineage.id)
        except (Refused, Incomplete) as e:
            self._failed(key, e)
            return None
        if self.key is not None and entry["signer"].lower() == objects.public_hex(self.key):
            self.record(key, "own", "published by this robot", object=entry["object"], robot=entry["robot"])
            return None
        return entry, data

    def _object(self, key: str, entry: dict) -> Pulled | None:
        """The object a verified entry names, fetched and verified; None when refused or not complete."""
        try:
            try:
                obj = self.store.get(object_key(entry["object"]), entry["size"])
            except FileNotFoundError:
                raise Incomplete("its object is not in the store (yet?)") from None
            self.bytes_in += len(obj)
            self.gets += 1
            header, rows = objects.verify_object(obj, entry, self.lineage)
        except (Refused, Incomplete) as e:
            self._failed(key, e)
            return None
        return Pulled(key, entry, header, rows, obj)

    def _failed(self, key: str, e: Exception) -> None:
        """A refused set is recorded for good; an incomplete one is tried again, MAX_ATTEMPTS times."""
        if isinstance(e, Refused):
            log.warning("fleet: refused %s: %s", key, e)
            self.record(key, "refused", str(e))
            return
        n = self.state["attempts"].get(key, 0) + 1
        self.state["attempts"][key] = n
        if n >= MAX_ATTEMPTS:
            log.warning("fleet: refused %s: %s, %d times", key, e, n)
            self.record(key, "refused", f"{e}, {n} times")
        else:
            log.warning("fleet: %s: %s; will try again", key, e)
