"""Export a bundle version to `model.onnx`, check it against PyTorch, write it atomically.

The exported graph is `mas3_edge.model.Deployed`, the module the runtime serves:

    images      uint8 (batch, H, W, 3) RGB, H x W = the version's input size
    classes     uint8 (batch, H, W)    argmax over classes
    confidence  float32 (batch, H, W)  max softmax

Why uint8 NHWC in and normalisation inside: a camera frame goes in as it comes off the resize,
with no per-pixel Python work and 4x fewer bytes over PCIe than float NCHW; the mean/std live
in the graph, so they can never disagree with the weights. The batch dimension is dynamic; H
and W are fixed (the runtime resizes to the version's input size), which lets TensorRT and
onnxslim fold every shape computation.

Graph passes (export/passes.py: onnxslim, classes-last, uint8-via-float) are kept only if the
parity check passes on their result; the first candidate that passes ships, the raw torch export
is the last resort, and export.json names the one that shipped.

A model with the fused prototypes' classifier (mas3_edge/gmmhead.py) has it inside the graph,
each frame with its set's class means; the parity check's logits are then the fused scores.

An adapted model (several normalisation sets) blends its sets per frame inside model.onnx; with
`per_set` (by default where a GPU is present) the export also writes sets/: a router and one
graph per set with that set folded, each checked (export/sets.py), listed in export.json.

Parity (see export/parity.py): ONNX Runtime CPU fp32 against PyTorch fp32 on random and
real-looking images: max |logit diff| <= 1e-3 (logits read from a throw-away copy of the graph
that exposes the softmax input as an extra output), class agreement >= 99.9%, and max
confidence diff <= 1e-3 on the shipped graph itself. A failed check raises UserError and
leaves model.onnx and export.json as they were; the numbers land in export.json.
"""
from __future__ import annotations

import copy
import inspect
import io
import logging
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import helper

from mas3_edge.bundle import (ONNX_FILE, atomic_write, atomic_write_json, load_version, read_meta, resolve,
                              sha256_bytes, sha256_file)
from mas3_edge.errors import UserError
from mas3_edge.model import Deployed, SegModel, fold_batchnorm

from . import parity, passes

log = logging.getLogger(__name__)

OPSET = 17
EXPORT_FILE = "export.json"
FORMAT = "mas3-edge-export/1"
INPUT = "images"
OUTPUTS = ("classes", "confidence")


@dataclass
class OnnxExport:
    """Where the model is, what export.json says about it, and whether it was reused as it was."""

    path: Path
    report: dict
    reused: bool = False


def export_onnx(bundle: Path, version: str | None = None, *, opset: int = OPSET, simplify: bool = True,
                force: bool = False, per_set: bool | None = None) -> OnnxExport:
    """Export a version (bundle root + id, or a version directory) to model.onnx with a parity check.

    `per_set`: also write the per-set layout of a model with several normalisation sets (sets/:
    a router and one folded graph per set, export/sets.py) for the GPU engines; None writes it
    when torch sees a CUDA GPU (ONNX Runtime on a CPU runs the blended model.onnx as fast).
    An up-to-date export (same weights, same settings, files unchanged) is reused unless `force`.
    """
    from . import sets as xsets
    if opset < 17:
        raise UserError(f"opset must be 17 or newer (TensorRT 10 and ONNX Runtime both take 17), got {opset}")
    vdir = resolve(bundle, version)
    ver = load_version(vdir)  # UserError for missing or corrupt weights
    per_set = (torch.cuda.is_available() if per_set is None else per_set) and xsets.set_count(ver.net) > 1
    settings = {"opset": opset, "simplify": simplify, "per_set": per_set}
    current = read_export(vdir)
    if not force and _is_current(vdir, current, ver.meta["sha256"], settings):
        log.info("%s is up to date with %s; reusing it", vdir / ONNX_FILE, ver.id)
        return OnnxExport(vdir / ONNX_FILE, current, reused=True)
    images, source = parity.check_images(tuple(ver.net.config.input_size))
    ref = parity.torch_reference(ver.net, images)
    raw = _torch_export(ver.net, opset)
    model, graph, check = _first_passing(passes.candidates(raw, tuple(ver.net.config.input_size), simplify), images, ref, source)
    del raw, ref  # the per-set export below makes its own (the logits alone are 10 MB an image at 256x512)
    helper.set_model_props(model, {"mas3_edge.version": ver.id, "mas3_edge.weights_sha256": ver.meta["sha256"],
                                   "mas3_edge.input": "uint8 NHWC RGB, normalisation inside"})
    files, sets_report = (xsets.export_sets(ver.net, graph, images, source, opset, simplify)
                          if per_set else ({}, None))
    data = model.SerializeToString()
    report = _report(ver.meta, data, model, settings, graph, check)
    if sets_report:
        report["sets"] = sets_report
    for name, blob in files.items():  # before export.json, which is what makes them count
        atomic_write(vdir / xsets.SETS_DIR / name, blob)
    atomic_write(vdir / ONNX_FILE, data)
    atomic_write_json(vdir / EXPORT_FILE, report)
    _drop_unlisted(vdir / xsets.SETS_DIR, set(files))
    log.info("exported %s (%s, %.1f MB%s)", vdir / ONNX_FILE, graph, len(data) / 1e6,
             f"; {sets_report['count']} per-set graphs and a router in {xsets.SETS_DIR}/" if sets_report else "")
    return OnnxExport(vdir / ONNX_FILE, report)


def _drop_unlisted(folder: Path, keep: set[str]) -> None:
    """Remove graphs of an earlier export that export.json no longer lists."""
    if folder.is_dir():
        for path in folder.iterdir():
            if path.name not in keep:
                path.unlink(missing_ok=True)
        if not keep:
            shutil.rmtree(folder, ignore_errors=True)


def read_export(vdir: Path) -> dict | None:
    """export.json of a version, or None when there is none or it is unreadable."""
    import json
    try:
        report = json.loads((Path(vdir) / EXPORT_FILE).read_text())
    except (OSError, ValueError):
        return None
    return report if isinstance(report, dict) and report.get("format") == FORMAT else None


def check_onnx(vdir: Path) -> tuple[Path, dict]:
    """The version's model.onnx and its export report, if the file is the one export verified.

    Raises UserError when the file is missing, changed since export (corrupt or foreign), or was
    exported from other weights than the version's (stale).
    """
    vdir = Path(vdir)
    path, meta = vdir / ONNX_FILE, read_meta(vdir)
    fix = f"run `mas3-edge export --bundle {vdir}`"
    if not path.is_file():
        raise UserError(f"version {meta['version']} has no {ONNX_FILE}; {fix}")
    report = read_export(vdir)
    if report is None:
        raise UserError(f"{path} has no readable {EXPORT_FILE} (not exported by mas3-edge); {fix}")
    if report.get("weights_sha256") != meta.get("sha256"):
        raise UserError(f"{path} was exported from other weights than version {meta['version']} (stale); {fix}")
    if report["onnx"]["sha256"] != sha256_file(path):
        raise UserError(f"{path} is not the file export verified (corrupt or replaced); {fix}")
    return path, report


def _is_current(vdir: Path, report: dict | None, weights_sha: str, settings: dict) -> bool:
    if report is None or report.get("weights_sha256") != weights_sha:
        return False
    if {"per_set": False, **(report.get("settings") or {})} != settings:  # exports before per-set graphs: none
        return False
    path = vdir / ONNX_FILE
    if not (path.is_file() and sha256_file(path) == report["onnx"]["sha256"]):
        return False
    if report.get("sets"):
        from .sets import check_sets
        try:
            check_sets(vdir, report)
        except UserError:
            return False
    return True


def _torch_export(net: SegModel, opset: int) -> onnx.ModelProto:
    """Trace Deployed(net) with the TorchScript exporter (the dynamo one needs onnxscript), in memory:
    a temporary file would outlive a kill -9 of the export."""
    h, w = net.config.input_size
    # batch norm folded into the convs wherever a layer's sets are all equal (a source model, a set
    # graph): traced as it is, every DomainNorm exports its per-frame routing (Gather, Mul, Add), which
    # doubled a one-set model's CPU latency and leaves INT8 with unquantisable work between its convs
    model = Deployed(fold_batchnorm(copy.deepcopy(net).eval())).eval()
    names = list(OUTPUTS)
    kwargs = {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}
    dummy = torch.zeros((2, h, w, 3), dtype=torch.uint8)  # batch 2: a batch of 1 can hide a baked-in size
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about the shape checks in SegModel.embed
        buf = io.BytesIO()
        torch.onnx.export(model, (dummy,), buf, input_names=[INPUT],
                          output_names=names, dynamic_axes={n: {0: "batch"} for n in [INPUT, *names]},
                          opset_version=opset, do_constant_folding=True, **kwargs)
    model = onnx.load_from_string(buf.getvalue())
    _declare_io(model, net)
    return model


def _declare_io(model: onnx.ModelProto, net: SegModel) -> None:
    """Give every input/output its static shape (batch stays symbolic) so consumers need no inference."""
    h, w = net.config.input_size
    shapes = {INPUT: ("batch", h, w, 3), "classes": ("batch", h, w), "confidence": ("batch", h, w)}
    for vi in list(model.graph.input) + list(model.graph.output):
        for d, s in zip(vi.type.tensor_type.shape.dim, shapes[vi.name]):
            if isinstance(s, str):
                d.dim_param = s  # dim_param/dim_value are a oneof: setting one clears the other
            else:
                d.dim_value = s


def _first_passing(candidates: list[tuple[str, onnx.ModelProto]], images: np.ndarray, ref: dict,
                   source: str) -> tuple[onnx.ModelProto, str, parity.Parity]:
    """The first candidate graph that passes the parity check; UserError if none does."""
    failures = []
    for label, model in candidates:
        try:
            onnx.checker.check_model(model)
            check = _verify(model, images, ref, source)
        except Exception as e:  # a pass that broke the graph: note it, try the next candidate
            failures.append(f"{label}: {str(e).splitlines()[0]}")
            log.warning("graph %s is not usable: %s", label, failures[-1])
            continue
        if not check.failures():
            return model, label, check
        failures.append(f"{label}: {', '.join(check.failures())}")
        log.warning("graph %s failed the parity check: %s", label, failures[-1])
    raise UserError("ONNX export failed its parity check against PyTorch (" + "; ".join(failures)
                    + f"); {ONNX_FILE} was left as it was")


def _verify(model: onnx.ModelProto, images: np.ndarray, ref: dict, source: str) -> parity.Parity:
    """Compare with PyTorch through a copy that also outputs the logits (ONNX Runtime CPU, fp32).

    The copy only adds an Identity output, so it computes what the shipped graph computes; the
    shipped graph itself must then give the same outputs on the first image.
    """
    probe, layout = _expose_logits(model)
    got = run_onnx(probe.SerializeToString(), images, [*OUTPUTS, "logits"])
    if layout == "nhwc":
        got["logits"] = got["logits"].transpose(0, 3, 1, 2)
    shipped = run_onnx(model.SerializeToString(), images[:1], list(OUTPUTS))
    if not (np.array_equal(shipped["classes"], got["classes"][:1])
            and np.allclose(shipped["confidence"], got["confidence"][:1], atol=1e-6)):
        raise ValueError("the shipped graph disagrees with its logits-exposing copy")
    return parity.compare(ref, got, "fp32", source)


def _expose_logits(model: onnx.ModelProto) -> tuple[onnx.ModelProto, str]:
    """A copy whose extra output `logits` is the softmax input, and that tensor's layout."""
    m = onnx.ModelProto.FromString(model.SerializeToString())
    soft = next((n for n in m.graph.node if n.op_type == "Softmax"), None)
    if soft is None:
        raise ValueError("no Softmax node: not a mas3-edge segmentation graph")
    ident = helper.make_node("Identity", [soft.input[0]], ["logits"], name="expose_logits")
    m.graph.node.append(ident)
    m.graph.output.append(helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, None))
    return m, "nchw" if passes.attr(soft, "axis") == 1 else "nhwc"


def run_onnx(model: bytes | Path, images: np.ndarray, outputs: list[str]) -> dict[str, np.ndarray]:
    """ONNX Runtime CPU fp32 outputs for a batch of images: a batch of 1 first, then pairs
    (two batch sizes prove the batch dimension is really dynamic)."""
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.log_severity_level = 3  # pruned-initializer warnings are noise here
    # a check runs each graph a few times: no arena or planned blocks kept for runs that never come
    so.enable_cpu_mem_arena, so.enable_mem_pattern = False, False
    src = str(model) if isinstance(model, Path) else model
    sess = ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
    out: dict[str, np.ndarray] = {}
    for i in [0, *range(1, len(images), 2)]:  # written into one array per output, not concatenated from copies
        chunk = images[i:i + (1 if i == 0 else 2)]
        for name, value in zip(outputs, sess.run(outputs, {INPUT: chunk})):
            if name not in out:
                out[name] = np.empty((len(images), *value.shape[1:]), value.dtype)
            out[name][i:i + len(chunk)] = value
    return out


def _report(meta: dict, data: bytes, model: onnx.ModelProto, settings: dict, graph: str,
            check: parity.Parity) -> dict:
    import onnxruntime as ort
    h, w = meta["input_size"]
    return {
        "format": FORMAT, "version": meta["version"], "weights_sha256": meta["sha256"],
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "settings": settings,
        "onnx": {"file": ONNX_FILE, "sha256": sha256_bytes(data), "bytes": len(data), "opset": settings["opset"],
                 "graph": graph, "nodes": len(model.graph.node),
                 "input": {"name": INPUT, "dtype": "uint8", "layout": "NHWC RGB", "shape": ["batch", h, w, 3]},
                 "outputs": [o.name for o in model.graph.output]},
        "tools": {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": ort.__version__},
        "parity": {"onnxruntime-cpu": check.to_dict()},
    }
