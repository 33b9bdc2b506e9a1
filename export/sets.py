"""Per-set ONNX graphs of an adapted model: a router and one folded graph per normalisation set.

`model.onnx` of a model with several normalisation sets blends the sets per frame inside the graph
(each DomainNorm gathers its frame's scale and shift: a Gather, Mul and Add per layer, and no
conv can absorb its batch norm). ONNX Runtime on a CPU runs that graph as fast as a one-set graph
(tools/bench_sets.py: 0.95-1.02x at 256x512 and 512x1024), so it stays the graph of the CPU
engine. Engines where the unfused pointwise work costs (GPU: PyTorch ran the blended model at half
the speed of the folded one) can serve the per-set layout instead:

    VERSION/sets/router.onnx    images uint8 (B, H, W, 3) -> route int32 (B,): each frame's set
                                (normalise, the stem conv, its channel statistics, nearest set by
                                Gaussian KL: SegModel.route, the choice model.onnx makes inside)
    VERSION/sets/set-<s>.onnx   images -> classes, confidence: set s folded into the convs (the
                                graph of a one-set model, with set s's statistics)

The engine runs the router, then each frame through its set's graph (a mixed batch is split by
set and put back in order). The router costs about 3-4 % of a frame on a CPU (it repeats the stem
conv). Each graph is checked like model.onnx: every set graph against PyTorch with that set forced
(logits, confidence, classes on all check images, so every set is exercised whatever the images
route to), and the router's choice against SegModel.route on the check images. The files and their
figures are listed under "sets" in export.json; `check_sets` refuses a file that is not the one
checked.
"""
from __future__ import annotations

import logging
import io
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from mas3_edge.bundle import sha256_bytes, sha256_file
from mas3_edge.errors import UserError
from mas3_edge import bank
from mas3_edge.model import SegModel

from . import parity, passes

log = logging.getLogger(__name__)

SETS_DIR = "sets"
ROUTER_FILE = "router.onnx"
ROUTE = "route"


def set_count(net: SegModel) -> int:
    """Normalisation sets a model routes between (1: a one-set model, nothing to split)."""
    return bank.count(net) if bank.routed(net) else 1


def set_file(s: int) -> str:
    return f"set-{s}.onnx"


class Router(nn.Module):
    """uint8 (B, H, W, 3) -> int32 (B,): the set SegModel.embed routes each frame to."""

    def __init__(self, net: SegModel):
        super().__init__()
        self.net = net

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return bank.route(self.net, self.net.stem(images)).to(torch.int32)


def export_sets(net: SegModel, label: str, images: np.ndarray, source: str, opset: int,
                simplify: bool) -> tuple[dict[str, bytes], dict]:
    """The per-set layout of `net`, checked: ({file name under sets/: bytes}, export.json "sets").

    `label` is the graph variant model.onnx shipped with; each set graph tries it first. Raises
    UserError when a graph fails its check (the caller has written nothing yet).
    """
    from .onnx import _first_passing, _torch_export
    net = net.eval()
    files, graphs = {}, []
    for s in range(set_count(net)):  # in memory: a temporary file would outlive a kill -9 of the export
        one = bank.one_set(net, s).eval()
        ref = parity.torch_reference(one, images)
        cands = passes.candidates(_torch_export(one, opset), tuple(net.config.input_size), simplify)
        cands.sort(key=lambda c: c[0] != label)  # the variant model.onnx shipped with first
        try:
            model, graph, check = _first_passing(cands, images, ref, source)
        except UserError as e:
            raise UserError(f"the graph of normalisation set {s}: {e}") from None
        data = model.SerializeToString()
        files[set_file(s)] = data
        graphs.append({"set": s, "file": f"{SETS_DIR}/{set_file(s)}", "sha256": sha256_bytes(data),
                       "bytes": len(data), "graph": graph, "parity": check.to_dict()})
    router, router_check = export_router(net, images, opset)
    files[ROUTER_FILE] = router
    report = {"count": len(graphs), "graphs": graphs,
              "router": {"file": f"{SETS_DIR}/{ROUTER_FILE}", "sha256": sha256_bytes(router), "bytes": len(router),
                         "parity": router_check}}
    return files, report


def export_router(net: SegModel, images: np.ndarray, opset: int) -> tuple[bytes, dict]:
    """router.onnx, checked against SegModel.route on `images`; UserError if a frame is routed otherwise."""
    import inspect
    h, w = net.config.input_size
    kwargs = {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        buf = io.BytesIO()
        torch.onnx.export(Router(net), (torch.zeros((2, h, w, 3), dtype=torch.uint8),), buf,
                          input_names=["images"], output_names=[ROUTE], opset_version=opset,
                          dynamic_axes={"images": {0: "batch"}, ROUTE: {0: "batch"}}, **kwargs)
    model = onnx.load_from_string(buf.getvalue())
    for vi, shape in ((model.graph.input[0], ("batch", h, w, 3)), (model.graph.output[0], ("batch",))):
        for d, v in zip(vi.type.tensor_type.shape.dim, shape):
            if isinstance(v, str):
                d.dim_param = v
            else:
                d.dim_value = v
    onnx.checker.check_model(model)
    data = model.SerializeToString()
    from .onnx import run_onnx
    check = check_router(net, run_onnx(data, images, [ROUTE])[ROUTE], images)
    if check["disagree"]:
        raise UserError(f"the ONNX router chose another normalisation set than PyTorch on {check['disagree']} "
                        f"of {check['images']} check images; nothing was written")
    return data, check


def check_router(net: SegModel, got: np.ndarray, images: np.ndarray) -> dict:
    """Agreement of an exported router's routes `got` (N,) with SegModel.route on `images`; a near tie
    (the two nearest sets within 1e-5 relative in PyTorch) may go either way and is not counted."""
    got = np.asarray(got).astype(np.int64).reshape(-1)
    with torch.no_grad():
        d = bank.distances(net, *bank.stem_stats(net, net.stem(torch.from_numpy(images)))).double()
    want = d.argmin(1).numpy()
    two = d.sort(1).values[:, :2].numpy()
    tie = (two[:, 1] - two[:, 0]) <= 1e-5 * np.abs(two[:, 0]).clip(1e-12)
    wrong = (got != want) & ~tie
    return {"images": int(len(images)), "agreement": float((got == want).mean()), "near_ties": int(tie.sum()),
            "disagree": int(wrong.sum()), "routes_seen": sorted(set(want.tolist()))}


def check_sets(vdir: Path, report: dict) -> tuple[Path, list[Path]]:
    """The router and set graphs export.json lists, if each file is the one export checked."""
    sets = report.get("sets")
    fix = f"run `mas3-edge export --bundle {vdir} --force`"
    if not sets:
        raise UserError(f"version {report.get('version')} was exported without per-set graphs; {fix} on a GPU machine "
                        "(or export_onnx(per_set=True))")
    entries = [sets["router"], *sorted(sets["graphs"], key=lambda g: g["set"])]
    paths = []
    for e in entries:
        path = Path(vdir) / e["file"]
        if not path.is_file() or sha256_file(path) != e["sha256"]:
            raise UserError(f"{path} is missing or not the file export checked (corrupt or replaced); {fix}")
        paths.append(path)
    return paths[0], paths[1:]


def split_by_set(route: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """(set, indices of its frames) for each set in a batch's route, in set order."""
    return [(int(s), np.flatnonzero(route == s)) for s in np.unique(route)]
