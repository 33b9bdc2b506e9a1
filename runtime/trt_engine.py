"""The `tensorrt` engine: a version's cached TensorRT plans (export/tensorrt.py), built on first use.

A one-set model (or a version exported without per-set graphs) runs one plan built from
model.onnx. An adapted model exported with its per-set layout (export/sets.py) runs the router's
plan, then each frame through its set's plan: every plan shares one CUDA stream, so the route's
small device-to-host read is the only synchronisation, and a mixed batch is split by set on the
device and put back in order.
"""
from __future__ import annotations

import logging
import threading
from pathlib import Path

import numpy as np

from mas3_edge.errors import UserError

from .engines import Engine, _to_device, _to_host

log = logging.getLogger(__name__)


class TensorRTEngine(Engine):
    """A TensorRT engine from the version's cache (built and parity-checked on first use)."""

    name = "tensorrt"

    def __init__(self, vdir: Path, device: str = "cuda:0", precision: str = "fp16",
                 batch_sizes: tuple[int, ...] = (1, 8), per_set: bool | None = None):
        import torch
        from mas3_edge.export.onnx import check_onnx
        from mas3_edge.export.tensorrt import require_tensorrt
        from mas3_edge.bundle import read_meta
        trt = require_tensorrt()
        self.device, self._torch, self._lock = torch.device(device), torch, threading.Lock()
        meta = read_meta(vdir)
        self.version, self.input_size, self.precision = meta["version"], tuple(meta["input_size"]), precision
        sets = check_onnx(vdir)[1].get("sets") if per_set is not False else None  # per-set graphs where exported
        if per_set and not sets:
            from mas3_edge.export.sets import check_sets
            check_sets(vdir, check_onnx(vdir)[1])  # raises: says how to export them
        with torch.cuda.device(self.device):
            self._stream = torch.cuda.Stream(self.device)  # one stream for every plan: no cross-stream waits
        load = lambda graph: self._load(vdir, precision, batch_sizes, graph)  # noqa: E731
        self._router = load(sets["router"]["file"]) if sets else None
        self._sets = [load(g["file"]) for g in sorted(sets["graphs"], key=lambda g: g["set"])] if sets else []
        self._runner = None if sets else load(None)
        gpu = self._info.get("spec", {}).get("gpu", device)
        self.provider = f"TensorRT {trt.__version__} on {gpu}" + (f", {len(self._sets)} per-set plans and a router" if sets else "")
        for b in batch_sizes:  # first executions allocate; keep that off the serving path
            for runner in self._sets:  # every set's plan, not only the one zeros route to
                with torch.cuda.device(self.device), torch.cuda.stream(self._stream):
                    runner(torch.zeros((b, *self.input_size, 3), dtype=torch.uint8, device=self.device))
            self._infer(np.zeros((b, *self.input_size, 3), np.uint8))

    def _load(self, vdir: Path, precision: str, batch_sizes: tuple[int, ...], graph: str | None):
        """A runner for one graph's cached plan (built on first use; rebuilt once if TensorRT refuses it)."""
        from mas3_edge.export.tensorrt import TrtRunner, ensure_engine
        path, self._info = ensure_engine(vdir, precision, batch_sizes, str(self.device), graph=graph)
        try:
            return TrtRunner(path.read_bytes(), self.device, self._stream)
        except UserError as e:  # the cache said fine but TensorRT refuses it: rebuild once
            log.warning("cached engine %s did not load (%s); rebuilding", path.name, e)
            path, self._info = ensure_engine(vdir, precision, batch_sizes, str(self.device), rebuild=True, graph=graph)
            return TrtRunner(path.read_bytes(), self.device, self._stream)

    def _infer(self, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        torch = self._torch
        with self._lock, torch.cuda.device(self.device), torch.cuda.stream(self._stream):
            images = _to_device(frames, self.device)
            if self._router is None:
                outs = self._runner(images)
                return _to_host(outs["classes"], outs["confidence"])
            from mas3_edge.export.sets import split_by_set
            parts = split_by_set(self._router(images)["route"].cpu().numpy())  # one small sync
            if len(parts) == 1:
                outs = self._sets[parts[0][0]](images)
                return _to_host(outs["classes"], outs["confidence"])
            classes = torch.empty(images.shape[:3], dtype=torch.uint8, device=self.device)
            conf = torch.empty(images.shape[:3], dtype=torch.float32, device=self.device)
            for s, idx in parts:  # a mixed batch: each set's frames through its plan, put back in order
                idx = torch.from_numpy(idx).to(self.device)
                outs = self._sets[s](images[idx].contiguous())
                classes[idx], conf[idx] = outs["classes"].to(torch.uint8), outs["confidence"].float()
            return _to_host(classes, conf)

    def close(self) -> None:
        self._runner, self._router, self._sets = None, None, []
