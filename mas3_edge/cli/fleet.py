"""`mas3-edge fleet`: keys, and the sets a fleet of robots shares through a folder or an S3 store.

`run --fleet URL` does push and pull by itself; these commands are for a robot without `run`, for
seeding a store, and for looking at it.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import UserError
from .core import BundleOpt, JsonOpt, VersionOpt

app = typer.Typer(help="Share adapted normalisation sets between robots: keygen, push, pull, ls.",
                  no_args_is_help=True)

StoreArg = Annotated[str, typer.Argument(help="The store: a folder, file://PATH or s3://BUCKET/PREFIX "
                                              "(endpoint from AWS_ENDPOINT_URL).")]
KeyOpt = Annotated[Path, typer.Option("--key", help="This robot's private key (`mas3-edge fleet keygen`).")]
TrustOpt = Annotated[Path, typer.Option("--trust", help="Trust file: the .pub lines of the robots whose sets "
                                                        "are accepted.")]


def _home() -> Path:
    return Path(os.environ.get("MAS3_EDGE_HOME", Path.home() / ".local" / "share" / "mas3-edge")) / "fleet"


@app.command("keygen")
def keygen_cmd(name: Annotated[str, typer.Argument(help="The robot's name (letters, digits, - and _).")],
               out: Annotated[Optional[Path], typer.Option(help="Folder for NAME.key and NAME.pub; default: "
                                                                "$MAS3_EDGE_HOME/fleet.")] = None) -> None:
    """Make an Ed25519 key pair: NAME.key stays on the robot, NAME.pub's line goes into the others' trust files."""
    from ..fleet.objects import keygen
    key, pub = keygen(name, out or _home())
    typer.echo(f"wrote {key} (private: keep it on this robot) and {pub}; add its line to the trust files:")
    typer.echo(pub.read_text().strip())


@app.command("push")
def push_cmd(store: StoreArg, key: KeyOpt, bundle: BundleOpt = None, version: VersionOpt = None,
             camera_id: Annotated[Optional[str], typer.Option(help="Camera id recorded with the set.")] = None,
             as_json: JsonOpt = False) -> None:
    """Publish the set an accepted round adapted (the version's working set) to the store."""
    import json

    from ..fleet import objects, store as fstore, sync
    st, robot_key = fstore.open_store(store), objects.load_key(key)  # before torch loads: a bad one fails fast
    from .. import bundle as bundles
    from ..fleet.adopt import round_figures, round_set
    from .core import print_json
    vdir = bundles.resolve(bundles.user_bundle(bundle), version)
    report_path = vdir / "report.json"
    report = json.loads(report_path.read_text()) if report_path.is_file() else {}
    if bundles.read_meta(vdir).get("info", {}).get("kind") != "adapted" or not report.get("accepted"):
        raise UserError(f"version {vdir.name} is not an accepted round of this robot: only those are published")
    fleet = sync.Fleet(st, objects.Lineage.of_version(vdir), None, robot_key)
    res = _store_call(st, lambda: fleet.publish(round_set(vdir.parent.parent, vdir.name), round_figures(report),
                                                camera_id, version=vdir.name))
    if as_json:
        return print_json({**res, "lineage": fleet.lineage.id})
    typer.echo(f"published the set of {vdir.name} as {res['object']} ({res['bytes']} bytes) in lineage {fleet.lineage.id}")


@app.command("pull")
def pull_cmd(store: StoreArg, trust: TrustOpt, bundle: BundleOpt = None,
             buffer: Annotated[Path, typer.Option(help="Frame buffer: the held-out frames each set is judged on.")] = Path("frames"),
             key: Annotated[Optional[Path], typer.Option("--key", help="This robot's key (its own sets are skipped).")] = None,
             serve: Annotated[bool, typer.Option(help="Serve the last accepted set's version.")] = True,
             limit: Annotated[int, typer.Option(help="Judge on the newest N buffered frames.")] = 150,
             lazy: Annotated[bool, typer.Option(help="Fetch and judge only the sets the newest buffered frames would "
                                                     "route to; leave the others pending (as `run --fleet` does). "
                                                     "Without it every set is judged, pending ones too.")] = False,
             as_json: JsonOpt = False) -> None:
    """Fetch the new sets of this bundle's lineage, verify each, judge it with this robot's round
    judgement on its own frames, and add the accepted ones to the bank (one new version each).
    With --lazy, a set whose router key the buffer's newest frames would not route to is recorded
    pending, neither fetched nor judged."""
    from ..fleet import objects, store as fstore, sync
    st, trusted = fstore.open_store(store), objects.load_trust(trust)
    robot_key = objects.load_key(key) if key is not None else None
    from .. import bundle as bundles  # torch: after the checks above
    from .core import print_json, table
    root = bundles.user_bundle(bundle)
    if not buffer.is_dir():
        raise UserError(f"no frame buffer at {buffer}: a set is judged on this robot's own frames (see --buffer)")
    fleet = sync.Fleet(st, objects.Lineage.of_version(bundles.resolve(root)), root / "fleet.json", robot_key, trusted)
    concerns = _concerns(root, buffer) if lazy else None
    pulled = _store_call(st, lambda: fleet.pull(concerns, recheck=True))
    rows = [_judge(fleet, p, root, buffer, limit, serve) for p in pulled]
    pending = [fleet.state["sets"][k]["object"] for k in fleet.pending()]
    if as_json:
        return print_json({"lineage": fleet.lineage.id, "sets": rows, "pending": pending})
    table(f"fleet sets pulled from {store}", ["set", "robot", "outcome", "version", "reason"],
          [[r["set"][:12], r["robot"], r["outcome"], r.get("version") or "-", r["reason"]] for r in rows])
    if pending:
        typer.echo(f"{len(pending)} sets pending: not for the newest frames of {buffer}; neither fetched nor judged")


def _concerns(root: Path, buffer: Path):
    """The distance from the buffer's newest frames to a set with a given router key when they would route
    to it (bank.ChunkDomain), else None."""
    from .. import bundle as bundles
    from ..bank import ChunkDomain
    from ..config import AdaptConfig
    from ..frames import load_frames
    from ..runtime.fleet import DOMAIN_FRAMES
    net = bundles.load_version(root).net
    domain = ChunkDomain(net, load_frames(buffer, net.config.input_size, DOMAIN_FRAMES))
    return lambda mean, var: domain.route_distance(mean, var, AdaptConfig.same_domain)


def _judge(fleet, pulled, root: Path, buffer: Path, limit: int, serve: bool) -> dict:
    import tempfile

    from .. import bundle as bundles
    from ..fleet.adopt import adopt_set
    with tempfile.NamedTemporaryFile(suffix=".safetensors") as f:
        f.write(pulled.data)
        f.flush()
        out = adopt_set(str(root), str(buffer), bundles.resolve(root).name, f.name,
                        {k: pulled.entry[k] for k in ("object", "robot", "camera_id")}, {}, limit)
    accepted = out["outcome"] == "accepted"
    if accepted and serve:
        bundles.set_serving(root, out["version"])
    fleet.record(pulled.key, "adopted" if accepted else "rejected", out["reason"], object=pulled.entry["object"],
                 robot=pulled.entry["robot"], version=out.get("version"))
    return {"set": pulled.entry["object"], "robot": pulled.entry["robot"], "outcome": out["outcome"],
            "version": out.get("version"), "reason": out["reason"]}


@app.command("ls")
def ls_cmd(store: StoreArg,
           trust: Annotated[Optional[Path], typer.Option("--trust", help="Check each set's signature against "
                                                                         "this trust file.")] = None,
           as_json: JsonOpt = False) -> None:
    """Per lineage: the sets, who made them, their gate figures, which robots serve them and on which
    they are pending (not for those robots' frames yet)."""
    from ..fleet import objects, store as fstore
    from ..fleet.view import fleet_view
    from .core import print_json, table
    st = fstore.open_store(store)
    view = _store_call(st, lambda: fleet_view(st, objects.load_trust(trust) if trust else None))
    if as_json:
        return print_json({"store": store, "lineages": view})
    if not view:
        return typer.echo(f"no sets in {store} yet")
    for lineage, v in view.items():
        table(f"lineage {lineage}: {len(v['sets'])} sets, robots {', '.join(sorted(v['robots'])) or '-'}",
              ["set", "robot", "camera", "published", "bytes", "retained", "source", "served by", "pending on",
               "status"],
              [[s.get("object", "?")[:12], s.get("robot", "?"), s.get("camera_id") or "-", _when(s.get("created")),
                s.get("bytes", "-"), _fig(s, "retained"), _fig(s, "source"), ", ".join(s.get("served_by", [])) or "-",
                ", ".join(s.get("pending_on", [])) or "-", s["status"]] for s in v["sets"]])


def _fig(s: dict, name: str) -> str:
    value = (s.get("gate") or {}).get(name)
    return "-" if value is None else f"{value:.3f}"


def _when(t: Optional[float]) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t)) if t else "-"


def _store_call(st, fn):
    """A store that cannot be reached is one error line, not a botocore traceback."""
    try:
        return fn()
    except UserError:
        raise
    except Exception as e:  # s3fs/botocore raise many types for a store that is down or refuses
        raise UserError(f"store {st.url}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
