"""A simulated fleet on one machine: robot processes on different synthetic domains sharing one S3
store (moto's S3 API server on loopback). Robot A serves night and adapts; robots B, C and D serve
their own domains with no round of their own (--no-adapt), where A's set stays pending on them
(lazy judging: not fetched, not judged). Then B, C and D meet night frames: A's set concerns them,
and they fetch, judge and serve it.

    python tools/bench_fleet.py                          # A night; B fog, C rain, D realistic
    python tools/bench_fleet.py --paper 1000             # the store's and the robots' load for 1,000 robots

Reports whether A's set stayed pending on each robot while it served its own domain, the time
from its meeting night (the night run's start) to A's set serving (its swap event), the live mIoU of B, C and D on night (their own night seed) served by the source before and by the
pulled set after, with no round of their own, and the bytes per set (object and manifest entry).
Every robot is a real `mas3-edge run --fleet s3://...` process. Writes docs/results/bench_fleet.json.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_BUNDLE = ROOT / "mas3_edge" / "default_bundle"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto(port: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc
        except OSError:
            time.sleep(0.1)
    raise SystemExit("moto's S3 server did not start")


def run_cmd(name: str, camera: str, work: Path, args, fleet: str | None, adapt: bool, extra: list[str]) -> list[str]:
    cmd = [sys.executable, "-m", "mas3_edge", "run", "--camera", camera, "--bundle", str(work / name),
           "--publish", f"ipc://{work}/{name}.sock", "--no-overlay", "--threads", "1", "--status-every", "1"]
    if fleet:
        cmd += ["--fleet", fleet, "--fleet-key", str(work / "keys" / f"{name}.key"),
                "--fleet-trust", str(work / "trust"), "--fleet-every", str(args.pull_every),
                "--buffer", str(work / f"{name}-frames"), "--buffer-every", "1", "--buffer-interval", "0",
                "--round-frames", str(args.round_frames)]
    return cmd + ([] if adapt else ["--no-adapt"]) + extra


def spawn(cmd: list[str], log: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen(["nice", "-n", "10", *cmd], stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env)


def events(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            pass  # the line being written
    return out


def night_miou(names: list[str], work: Path, args, env: dict, tag: str) -> dict[str, float]:
    """Each robot's bundle serving night (its own seed) for args.eval_frames frames: live mIoU."""
    procs = {}
    for i, n in enumerate(names):
        ev = work / f"{n}-{tag}.events"
        cmd = run_cmd(n, f"synthetic://night?seed={11 + i}", work, args, None, False,
                      ["--no-buffer", "--fps", "0", "--max-frames", str(args.eval_frames), "--events", str(ev)])
        procs[n] = (spawn(cmd, work / f"{n}-{tag}.log", env), ev)
    out = {}
    for n, (p, ev) in procs.items():
        p.wait(timeout=600)
        stop = [e for e in events(ev) if e["event"] == "stop"]  # the window holds all eval frames by then
        out[n] = {"miou": stop[-1]["miou_window"] if stop else None, "frames": stop[-1]["frames"] if stop else None,
                  "version": stop[-1]["version"] if stop else None}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--domains", nargs="+", default=["fog", "rain", "realistic"], help="B, C, D, ... domains")
    ap.add_argument("--round-every", type=int, default=40, help="A's round every N buffered frames")
    ap.add_argument("--round-frames", type=int, default=60)
    ap.add_argument("--pull-every", type=float, default=2.0)
    ap.add_argument("--eval-frames", type=int, default=100)
    ap.add_argument("--timeout", type=float, default=900.0, help="give up on the fleet phase after this many s")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "bench_fleet.json")
    ap.add_argument("--paper", type=int, metavar="ROBOTS", help="print the store's operations and bytes per hour "
                    "for this many robots of one lineage, from the bytes per set in --out, and exit")
    ap.add_argument("--rounds-per-hour", type=float, default=1.0)
    ap.add_argument("--fleet-every", type=float, default=30.0, help="each robot's pull interval (s), for --paper")
    ap.add_argument("--met-per-hour", type=int, default=2, help="distinct domains a robot meets per hour, for --paper")
    ap.add_argument("--judge-gap", type=float, default=300.0, help="run --fleet-judge-gap (s), for --paper")
    ap.add_argument("--fleet-domains", type=int, default=10, help="distinct domains the fleet's sets are of, for --paper")
    args = ap.parse_args()
    if args.paper:
        return paper(args, json.loads(args.out.read_text()))
    work = Path(tempfile.mkdtemp(prefix="bench-fleet-"))
    names = ["a"] + [chr(ord("b") + i) for i in range(len(args.domains))]
    port = free_port()
    env = {**os.environ, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "bench",
           "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1", "PYTHONUNBUFFERED": "1"}
    os.environ.update({k: env[k] for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                           "AWS_DEFAULT_REGION")})
    moto = start_moto(port)
    try:
        result = bench(work, names, args, env, port)
    finally:
        moto.kill()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print_table(result)
    print(f"wrote {args.out}")
    shutil.rmtree(work, ignore_errors=True)


def bench(work: Path, names: list[str], args, env: dict, port: int) -> dict:
    from mas3_edge.fleet.objects import keygen
    from mas3_edge.fleet.store import open_store
    for n in names:
        shutil.copytree(DEFAULT_BUNDLE, work / n)
        keygen(n, work / "keys")
    (work / "trust").write_text("".join((work / "keys" / f"{n}.pub").read_text() for n in names))
    open_store("s3://fleet").fs.mkdir("fleet")
    url = "s3://fleet/bench"
    pullers = names[1:]
    before = night_miou(pullers, work, args, env, "before")
    accepted, pending = own_domains(work, pullers, args, env, url)
    swapped = meet_night(work, pullers, args, env, url)
    after = night_miou(pullers, work, args, env, "after")
    store = open_store(url)
    objs = store.list_after("objects")
    entries = [k for d in store.dirs("lineages") for k in store.list_after(f"lineages/{d}")]
    sizes = {"object": [len(store.get(k, 1 << 24)) for k in objs], "entry": [len(store.get(k, 1 << 20)) for k in entries]}
    rows = []
    for i, n in enumerate(pullers):
        s = swapped.get(n)
        rows.append({"robot": n, "domain": args.domains[i], "pending_on_own_domain": pending.get(n),
                     "seconds_to_serving": None if s is None else s["swap_time"] - s["night_start"],
                     "judged_in_s": None if s is None else s["judged"]["seconds"],
                     "judgement": None if s is None else s["judged"]["reason"],
                     "night_miou_before": before[n]["miou"], "night_miou_after": after[n]["miou"],
                     "version_after": after[n]["version"]})
    return {"command": "python " + " ".join(sys.argv), "robots": len(names), "store": "moto S3 server on loopback",
            "a_round": None if accepted is None else {"seconds_after_start": accepted["seconds_after_start"],
                                                      "reason": accepted.get("reason"), "version": accepted.get("version")},
            "sets_published": len(objs), "bytes_per_set": sizes, "entry_has_router_key": True, "fleet": rows,
            "notes": "B, C and D run with --no-adapt: no round of their own. While they serve their own domains "
                     "A's set stays pending on them (not fetched, not judged); then they serve night frames "
                     "(seeds 21..) and 'to serving' runs from that run's start to the swap to A's set. Night mIoU "
                     "is the runtime's live "
                     f"mIoU over {args.eval_frames} labelled synthetic night frames (seeds 11..), served by the "
                     "source version before and by the version holding A's set after."}


def own_domains(work: Path, pullers: list[str], args, env: dict, url: str) -> tuple[dict | None, dict]:
    """A adapts to night while B, C, D serve their own domains: A's set must stay pending on them.
    -> (A's accepted round event, {robot: whether A's set is recorded pending in its fleet.json})."""
    from mas3_edge.fleet.store import open_store
    t0 = time.time()
    procs = {n: spawn(run_cmd(n, f"synthetic://{d}", work, args, url, False, ["--fps", "4", "--events", str(work / f"{n}.events")]),
                      work / f"{n}.log", env) for n, d in zip(pullers, args.domains)}
    procs["a"] = spawn(run_cmd("a", "synthetic://night", work, args, url, True,
                               ["--fps", "8", "--round-every-frames", str(args.round_every),
                                "--events", str(work / "a.events")]), work / "a.log", env)
    accepted, pending, published = None, {}, None
    while time.time() - t0 < args.timeout:
        time.sleep(1.0)
        if accepted is None:
            accepted = next((e for e in events(work / "a.events") if e["event"] == "round"
                             and e.get("outcome") == "accepted"), None)
            if accepted is not None:
                accepted = {**accepted, "seconds_after_start": accepted["time"] - t0}
                print(f"A's round accepted after {accepted['seconds_after_start']:.0f} s", flush=True)
            continue
        store = open_store(url)
        objs = store.list_after("objects")
        if not objs:
            continue
        if published is None:
            published = time.time()
            procs["a"].send_signal(signal.SIGTERM)  # A's set is out: its later rounds would only take the CPU
        short = objs[0].rsplit("/", 1)[-1][:16]
        for n in pullers:  # what `fleet ls` shows: A's set pending on the robot (its status object)
            try:
                pending[n] = short in json.loads(store.get(f"robots/{n}.json", 1 << 20)).get("pending", [])
            except (FileNotFoundError, ValueError):
                pass
        if all(pending.get(n) for n in pullers) or time.time() - published > 60:
            break
    stop(procs)
    return accepted, pending


def meet_night(work: Path, pullers: list[str], args, env: dict, url: str) -> dict:
    """B, C, D serve night frames (no round of their own): A's pending set concerns them now.
    -> {robot: {"judged": fleet event, "night_start": start event time, "swap_time": swap event time}}."""
    t0 = time.time()
    procs = {n: spawn(run_cmd(n, f"synthetic://night?seed={21 + i}", work, args, url, False,
                              ["--fps", "4", "--events", str(work / f"{n}-night.events")]), work / f"{n}-night.log", env)
             for i, n in enumerate(pullers)}
    swapped: dict = {}
    while time.time() - t0 < args.timeout and len(swapped) < len(pullers):
        time.sleep(1.0)
        for n in pullers:
            ev = events(work / f"{n}-night.events")
            judged = next((e for e in ev if e["event"] == "fleet" and e.get("outcome") == "accepted"), None)
            swap = judged and next((e for e in ev if e["event"] == "swap" and e["to"] == judged["version"]), None)
            if swap and n not in swapped:
                start = next(e["time"] for e in ev if e["event"] == "start")
                swapped[n] = {"judged": judged, "night_start": start, "swap_time": swap["time"]}
                print(f"{n} serves A's set as {judged['version']}, {swap['time'] - start:.0f} s after meeting night",
                      flush=True)
    stop(procs)
    return swapped


def stop(procs: dict) -> None:
    for p in procs.values():
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs.values():
        p.wait(timeout=60)


def router_key_bytes() -> tuple[int, int]:
    """(bytes the router key adds to a manifest entry, its channels) for the packaged model's lineage."""
    from mas3_edge import bank, bundle
    from mas3_edge.fleet.objects import router_key
    rows = {k: v.numpy() for k, v in bank.export_set(bundle.load_version(DEFAULT_BUNDLE).net).items()}
    return len(', "router": ' + json.dumps(router_key(rows), sort_keys=True)), next(iter(rows.values())).shape[1]


def paper(args, measured: dict) -> None:
    """Operations and bytes per hour on the store, and judgements per robot, for `args.paper` robots
    of one lineage, each with `args.rounds_per_hour` accepted rounds and a pull every `args.fleet_every`
    seconds. Every robot reads every other robot's entry; under lazy judging it fetches and judges a
    set only when its newest frames would route to it: a set of a domain it meets, nearer to its
    frames than every set it holds or its gate rejected, one at a time. If the sets of one domain come
    in no particular order of nearness, that is H(n) = 1 + 1/2 + ... + 1/n of the n sets of that
    domain an hour; at worst (each set nearer than all before it) all n, or 3600 / judge gap if
    fewer: `run` starts at most one judgement a gap."""
    robots, rounds, every_s = args.paper, args.rounds_per_hour, args.fleet_every
    obj = max(measured["bytes_per_set"]["object"])
    key, channels = router_key_bytes()
    added = 0 if measured.get("entry_has_router_key") else key  # a run before entries carried the key
    entry = max(measured["bytes_per_set"]["entry"]) + added
    sets = robots * rounds  # published per hour, fleet-wide
    others = sets - rounds  # each robot reads every set but its own
    per_domain = others / args.fleet_domains
    lazy = args.met_per_hour * sum(1 / i for i in range(1, int(round(per_domain)) + 1))
    worst = min(args.met_per_hour * per_domain, 3600 / args.judge_gap) if args.judge_gap > 0 else args.met_per_hour * per_domain
    judged_s = max((r["judged_in_s"] or 0.0) for r in measured["fleet"])
    rows = [("PUT object + entry (publish)", 2 * sets, sets * (obj + entry)),
            ("PUT robot status (at most one a pull)", robots * min(3600 / every_s, sets), None),
            ("LIST new keys (one page each)", robots * 3600 / every_s, None),
            ("GET entry (every robot, every set)", robots * others, robots * others * entry),
            ("GET object (lazy: expected)", robots * lazy, robots * lazy * obj),
            ("GET object (eager: every set)", robots * others, robots * others * obj)]
    print(f"{robots} robots, {rounds:g} round(s) per robot per hour, a pull every {every_s:g} s; a set is {obj} bytes "
          f"+ an entry of {entry} bytes ({entry - added} measured, {key} of them the router key of {channels} channels"
          + (" added to a run without it)" if added else ")"))
    print(f"lazy judging: a robot meets {args.met_per_hour} domain(s) an hour; the fleet's sets are of "
          f"{args.fleet_domains} domains, so {per_domain:,.1f} sets of each an hour")
    print(f"{'operation':38} {'per hour':>14} {'per second':>11} {'bytes per hour':>16}")
    for name, n, b in rows:
        print(f"{name:38} {n:>14,.0f} {n / 3600:>11,.1f} {'-' if b is None else f'{b:,.0f}':>16}")
    print(f"per robot per hour: {others:,.0f} entries read ({others * entry:,.0f} bytes); sets fetched and judged: "
          f"{lazy:.1f} expected, {worst:,.0f} at worst (lazy, one judgement a {args.judge_gap:g} s at most), "
          f"{others:,.0f} (eager)")
    print(f"judging at the measured {judged_s:.1f} s a set (three at once on 2 cores): {lazy * judged_s / 60:.1f} "
          f"min an hour expected, {worst * judged_s / 60:,.0f} min at worst, {others * judged_s / 60:,.0f} min eager")


def print_table(r: dict) -> None:
    print(f"\nA's round: {r['a_round']}")
    print(f"sets published: {r['sets_published']}; bytes per set: object {r['bytes_per_set']['object']}, "
          f"manifest entry {r['bytes_per_set']['entry']}")
    print(f"{'robot':6} {'domain':10} {'pending':>8} {'to serving s':>12} {'judged s':>9} {'night before':>13} "
          f"{'night after':>12}")
    f = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
    for row in r["fleet"]:
        print(f"{row['robot']:6} {row['domain']:10} {str(row.get('pending_on_own_domain', '-')):>8} "
              f"{f(row['seconds_to_serving']):>12} {f(row['judged_in_s']):>9} "
              f"{f(row['night_miou_before']):>13} {f(row['night_miou_after']):>12}")


if __name__ == "__main__":
    main()
