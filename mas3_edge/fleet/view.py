"""`mas3-edge fleet ls`: per lineage, the sets published, who made them, their gate figures, which
robots serve them and on which robots they wait, pending (not for those robots' frames yet), from
the robots' own status objects."""
from __future__ import annotations

import json

from . import objects
from .store import LINEAGES, ROBOTS, Store, entry_time


def _read_json(store: Store, key: str, limit: int) -> dict | None:
    try:
        return json.loads(store.get(key, limit))
    except (ValueError, FileNotFoundError):
        return None  # half-written or gone: shown as missing, not an error of the whole view


def fleet_view(store: Store, trust: dict[str, str] | None = None) -> dict:
    """{lineage id: {"sets": [...], "robots": {...}}}. With a trust file, each set says whether its
    signature verifies with a trusted key (without one, `robot` is what the entry claims)."""
    robots = [r for r in (_read_json(store, k, objects.MAX_ENTRY_BYTES) for k in store.list_after(ROBOTS)) if r]
    view: dict = {}
    for lineage in store.dirs(LINEAGES):
        serving = {r["robot"]: r for r in robots if r.get("lineage") == lineage}
        sets: list[dict] = []
        for key in store.list_after(f"{LINEAGES}/{lineage}"):
            entry = _read_json(store, key, objects.MAX_ENTRY_BYTES)
            if entry is None:
                sets.append({"entry": key, "status": "unreadable"})
                continue
            gate = (entry.get("round") or {}).get("gate_after") or {}
            status, robot = _status(entry, trust, lineage)
            sets.append({"entry": key, "object": entry.get("object"), "robot": robot,
                         "camera_id": entry.get("camera_id"), "created": entry_time(key), "bytes": entry.get("size"),
                         "gate": gate, "reason": (entry.get("round") or {}).get("reason"),
                         "status": status,
                         "served_by": sorted(n for n, r in serving.items() if entry.get("object") in r.get("sets", [])),
                         "pending_on": sorted(n for n, r in serving.items()
                                              if str(entry.get("object"))[:16] in r.get("pending", []))})
        view[lineage] = {"sets": sets, "robots": {n: {"serving": r.get("serving"), "sets": len(r.get("sets", [])),
                                                      "pending": len(r.get("pending", [])),
                                                      "camera_id": r.get("camera_id")} for n, r in serving.items()}}
    return view


def _status(entry: dict, trust: dict[str, str] | None, lineage: str) -> tuple[str, str | None]:
    """(signed / refused: why / unchecked, the robot: the trust file's name once the signature verifies)."""
    if trust is None:
        return "unchecked", entry.get("robot")
    try:
        verified = objects.verify_entry(json.dumps(entry).encode(), trust, lineage)
    except (objects.Refused, objects.Incomplete) as e:
        return f"refused: {e}", entry.get("robot")
    return "signed", verified["robot"]
