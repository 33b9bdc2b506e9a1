"""Bundle versions as the runtime sees them: a table with health figures, and rollback.

Rollback only moves the SERVING pointer (atomic rename); a running service follows the pointer,
so rolling back while `mas3-edge run` serves needs no signal and no restart. It refuses a version
the service would refuse: weights that fail their sha256, or a round that never finished.

The state column: ok, incomplete (its adaptation round was killed or rejected after writing it),
corrupt (unreadable model.json, or weights that fail their hash), missing (SERVING names a version
that is not there). `*` marks the serving version; `!` a pointer at a version that cannot be served
(the service serves the last good one instead). The onnx column says whether the version also has
an INT8 graph that passed its parity check (what `--precision int8` serves) or one that failed.
"""
from __future__ import annotations

import json
from pathlib import Path

from mas3_edge import bundle as bundles
from mas3_edge.errors import UserError
from mas3_edge.store import BundleStore

COLUMNS = ["", "version", "parent", "created", "kind", "state", "onnx", "SWD", "entropy", "prior KL", "decided by",
           "note"]


def _health(vdir: Path, meta: dict) -> dict:
    """Health signals of a version: model.json info (adapted versions), else report.json."""
    info = meta.get("info") or {}
    if isinstance(info.get("health"), dict):
        return info["health"]
    try:
        return json.loads((vdir / "report.json").read_text()).get("health_after") or {}
    except (OSError, ValueError):
        return {}


def _onnx_state(vdir: Path) -> str:
    """verified, and the INT8 graph's state where it was calibrated: "+int8" (servable with
    --precision int8), "int8 failed" (its parity check failed: fp32 is served), "int8 stale"."""
    if not (vdir / bundles.ONNX_FILE).is_file():
        return "-"
    from mas3_edge.export.onnx import check_onnx
    from mas3_edge.export.quantize import int8_graphs
    try:
        _, report = check_onnx(vdir)
    except UserError:
        return "stale/corrupt"
    if not report.get("int8"):
        return "verified"
    try:
        int8_graphs(vdir, report)
    except UserError:
        return "verified, int8 " + ("failed" if not report["int8"].get("passed") else "stale")
    return "verified+int8"


def _fmt(v) -> str:
    return f"{v:.4f}" if isinstance(v, (int, float)) else "-"


def version_rows(root: Path) -> tuple[list[str], list[list[str]]]:
    """One row per version directory, oldest first; a corrupt one is listed as such, not hidden."""
    store = BundleStore(root)
    if not store.versions_dir.is_dir():
        raise UserError(f"{root} is not a bundle (no versions/ folder); train one with `mas3-edge train`")
    serving, rows = store.serving(), []
    if serving is not None and store.missing(serving):
        rows.append(["!", serving, "-", "-", "-", "missing", "-", "-", "-", "-", "SERVING names it; no such folder"])
    for vid in store.ids():
        vdir = store.path(vid)
        try:
            meta = bundles.read_meta(vdir)
        except UserError:
            rows.append(["!" if vid == serving else "", vid, "-", "-", "-", "corrupt", "-", "-", "-", "-", "-",
                         "unreadable model.json: skipped"])
            continue
        rows.append(_row(vdir, meta, vid == serving))
    return COLUMNS, rows


def _row(vdir: Path, meta: dict, serving: bool) -> list[str]:
    info, h = meta.get("info") or {}, _health(vdir, meta)
    kind = info.get("kind") or ("adapted" if meta.get("parent") else "source")
    if info.get("method"):
        kind += f" ({info['method']})"
    incomplete, bad = bundles.incomplete_reason(vdir), bundles.weights_problem(vdir, meta)
    state = "corrupt" if bad else "incomplete" if incomplete else "ok"
    note = bad or incomplete or str(info.get("reason") or info.get("note") or "")  # a problem hides a success note
    return ["*" if serving and state == "ok" else "!" if serving else "", vdir.name, meta.get("parent") or "-",
            meta.get("created", "-"), kind, state, _onnx_state(vdir) if state == "ok" else "-",
            _fmt(h.get("swd")), _fmt(h.get("entropy")), _fmt(h.get("prior_kl")),
            str(info.get("decided_by") or "-") + (" (labels)" if info.get("used_labels") else ""), note[:60]]


def rollback(root: Path, version: str | None = None) -> tuple[str | None, str]:
    """Point SERVING at `version` (default: the serving version's parent); returns (old, new)."""
    store = BundleStore(root)
    old = store.serving()
    if version is None:
        if old is None:
            raise UserError(f"nothing is serving in {root}; name the version to serve")
        if store.missing(old):
            raise UserError(f"SERVING names {old}, which is missing from {store.versions_dir}; "
                            "name the version to serve (see `mas3-edge versions`)")
        version = bundles.read_meta(store.path(old)).get("parent")
        if not version:
            raise UserError(f"{old} has no parent to roll back to; name a version (see `mas3-edge versions`)")
    vdir = store.path(version)
    if not store.exists(version):
        raise UserError(f"no version {version!r} in {root}; see `mas3-edge versions`")
    bundles.check_servable(vdir)  # refuse here what the service would refuse, with the reason
    store.set_serving(version)
    return old, version
