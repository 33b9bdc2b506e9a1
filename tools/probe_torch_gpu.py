#!/usr/bin/env python
"""Which PyTorch settings serve fastest on this GPU: the torch engine's knobs side by side.

    python tools/probe_torch_gpu.py --out probe.json            # edge model, 512x1024, batch 1 and 8
    python tools/probe_torch_gpu.py --compile                   # also torch.compile (minutes to build)
    python tools/probe_torch_gpu.py --device cpu --size 256x512 # the rows that run on a CPU (eager)

Every row is runtime.engines.TorchEngine (uint8 frames in host memory -> class map and
confidence in host memory), built with one setting changed from the shipped default (CUDA
graphs, fp16 autocast, batch norm folded, NCHW), and the shipped engine on an adapted model with
two normalisation sets: each set folded into its own copy of the network (shipped), and both
sets blended per frame in one unfolded graph (the engine before per-set folding). Rows are timed
in interleaved rounds.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_inference import time_calls  # noqa: E402  (tools/ is on sys.path when run as a script)

VARIANTS = {
    "cudagraph (shipped)": dict(mode="cudagraph"),
    "cudagraph, BN not folded": dict(mode="cudagraph", fold_bn=False),
    "cudagraph, NHWC": dict(mode="cudagraph", channels_last=True),
    "fp16 eager": dict(mode="fp16"),
}


def main() -> None:
    import torch
    from mas3_edge.config import preset
    from mas3_edge.model import DomainNorm, SegNet
    from mas3_edge.runtime.engines import TorchEngine
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", help="cuda (every row) or cpu (the eager rows)")
    ap.add_argument("--size", default="512x1024")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=1.0, help="timed seconds per row, batch and round")
    ap.add_argument("--compile", action="store_true", help="add a torch.compile row")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    size, batches = tuple(int(v) for v in a.size.split("x")), [int(b) for b in a.batches.split(",")]
    torch.manual_seed(0)
    net = SegNet(replace(preset("edge"), input_size=size)).eval()
    variants = {**VARIANTS, **({"cudagraph, compiled": dict(mode="cudagraph", compile=True)} if a.compile else {})}
    variants["cudagraph, adapted model (two normalisation sets, each folded apart)"] = dict(mode="cudagraph")
    variants["cudagraph, adapted model, sets blended per frame (not folded)"] = dict(mode="cudagraph", fold_bn=False)
    if a.device == "cpu":  # eager fp32 is the one mode there
        variants = {n.replace("cudagraph", "eager"): {**kw, "mode": "eager"} for n, kw in variants.items()
                    if kw["mode"] == "cudagraph" and not kw.get("channels_last") and not kw.get("compile")}
    ref_name = "fp16 eager" if a.device != "cpu" else "eager (shipped)"
    adapted = copy.deepcopy(net)
    with torch.no_grad():  # an adapted set that differs from the source set: nothing folds, every frame routes
        for m in adapted.modules():
            if isinstance(m, DomainNorm):
                m.running_mean.add_(0.1), m.weight.mul_(1.05)
    engines = {}
    for name, kw in variants.items():
        t0 = time.perf_counter()
        model = adapted if "adapted" in name else net
        engines[name] = TorchEngine(model, "probe", a.device, batch_sizes=tuple(batches), **kw)
        print(f"{name}: ready in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    frames = {b: np.random.default_rng(b).integers(0, 255, (b, *size, 3), dtype=np.uint8) for b in batches}
    blended = next(n for n in engines if "blended" in n)  # the adapted rows' reference: the same model
    ref = {(adapted_, b): engines[blended if adapted_ else ref_name].infer(frames[b])[0]
           for adapted_ in (False, True) for b in batches}
    lat = {(n, b): [] for n in engines for b in batches}
    for _ in range(a.rounds):
        for (n, b), out in lat.items():
            out += time_calls(engines[n], frames[b], a.seconds, 5)
    rows = []
    for (n, b), v in lat.items():
        agree = float((engines[n].infer(frames[b])[0] == ref["adapted" in n, b]).mean())
        rows.append({"variant": n, "batch": b, "p50_ms": 1e3 * float(np.median(v)),
                     "p99_ms": 1e3 * float(np.percentile(v, 99)), "images_per_s": b / float(np.median(v)),
                     "class_agreement": agree})
    card = torch.cuda.get_device_name(0) if a.device != "cpu" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"\n{card}, torch {torch.__version__}, edge model {size[0]}x{size[1]}\n")
    print(f"| variant | batch | p50 ms | p99 ms | images/s | class agreement vs {ref_name} (adapted: vs blended) |\n|---|---|---|---|---|---|")
    for r in rows:
        agree = "–" if r["class_agreement"] is None else f"{100 * r['class_agreement']:.2f} %"
        print(f"| {r['variant']} | {r['batch']} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['images_per_s']:.1f} | {agree} |")
    if a.out:
        a.out.write_text(json.dumps({"device": card, "torch": torch.__version__, "size": size,
                                     "class_agreement_with": [ref_name, blended], "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
