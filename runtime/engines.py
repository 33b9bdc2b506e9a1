"""Inference engines: one small interface over TensorRT, ONNX Runtime and PyTorch.

    engine = load_engine(version_dir, kind="auto")      # or a bundle root: its serving version
    classes, confidence = engine.infer(frames)          # uint8 (B,H,W,3) RGB -> (B,H,W) uint8, float32
    engine.name, engine.provider, engine.version, engine.input_size, engine.precision

Kinds: `tensorrt` (a cached engine from export/tensorrt.py, built on first use), `onnxruntime`
(TensorRT / CUDA / CPU execution providers, whichever actually loads), `torch` (eager fp32),
`torch-fp16` (eager, fp16 autocast, CUDA), `torch-cudagraph` (fp16 autocast replayed as
CUDA graphs, one per batch size) and `torch-compile` (torch.compile with Inductor, kernels cached
in the version's engines/ folder: runtime/compiled.py). `auto` tries them fastest first and logs
which one it took: on a GPU onnxruntime (GPU providers only), torch-cudagraph, torch-fp16, torch;
on a CPU onnxruntime (3-4x PyTorch eager at 512x1024 on a 2-core AMD EPYC, about even on a 2-core
Intel Xeon: tools/bench_inference.py, tools/bench_sets.py), then torch. An engine that fails to load,
for whatever reason, is one log line and `auto` takes the next. `auto` never picks tensorrt (our
own engine build has not been proven on a device yet) nor torch-compile (its first load compiles
for a minute or more): ask for them.

An adapted model (several normalisation sets): the PyTorch engines fold each set into its own
copy of the network (model.PerSetFolded); ONNX Runtime on a CPU runs the blended model.onnx, as
fast as a one-set graph there; ONNX Runtime on a GPU and TensorRT run the per-set graphs and the
router of export/sets.py where the export wrote them (`per_set`), the blended graph otherwise.

Engines that read model.onnx only accept the file export verified against this version's
weights (export.onnx.check_onnx). Loading keeps no global state and does its slow work (engine
build, CUDA graph capture, warm-up) in the constructor, so the runtime can build the next
engine in a background thread and swap it in between frames; `infer` is safe to call from
several threads (the PyTorch engines serialise on a lock).
"""
from __future__ import annotations

import contextlib
import copy
import logging
import threading
from pathlib import Path

import numpy as np

from mas3_edge.errors import UserError

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "int8")
KINDS = ("tensorrt", "onnxruntime", "torch", "torch-fp16", "torch-cudagraph", "torch-compile")
_ALIASES = {"trt": "tensorrt", "ort": "onnxruntime", "onnx": "onnxruntime", "pytorch": "torch", "torch-fp32": "torch"}
_TORCH_MODES = {"torch": "eager", "torch-fp16": "fp16", "torch-cudagraph": "cudagraph"}


class Engine:
    """A loaded model that maps uint8 RGB frames at `input_size` to class ids and confidence."""

    name: str = "engine"  # the kind, e.g. "onnxruntime"
    provider: str = ""  # what actually runs, e.g. "CPUExecutionProvider" or "TensorRT 10.3 fp16 on ..."
    precision: str = "fp32"  # what it serves
    precision_note: str = ""  # why it serves another precision than the one asked for
    version: str = ""  # the bundle version id
    input_size: tuple[int, int] = (0, 0)  # (H, W)

    def infer(self, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """uint8 (B, H, W, 3) RGB -> classes uint8 (B, H, W), confidence float32 (B, H, W) (None from
        an engine loaded without it)."""
        return self._infer(self._check(frames))

    def close(self) -> None:
        """Release device memory now rather than at garbage collection (after a hot swap)."""

    def _infer(self, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        raise NotImplementedError

    def _check(self, frames: np.ndarray) -> np.ndarray:
        h, w = self.input_size
        if not isinstance(frames, np.ndarray) or frames.dtype != np.uint8 or frames.ndim != 4 \
                or frames.shape[1:] != (h, w, 3) or frames.shape[0] < 1:
            got = f"{type(frames).__name__} {getattr(frames, 'dtype', '')} {getattr(frames, 'shape', '')}"
            raise UserError(f"{self.name} engine expects uint8 frames of shape (B, {h}, {w}, 3), got {got}")
        return np.ascontiguousarray(frames)

    def __repr__(self) -> str:
        return f"<{self.name} engine {self.version} {self.input_size[0]}x{self.input_size[1]} on {self.provider}>"


def load_engine(version_dir: Path, kind: str = "auto", device: str | None = None, *,
                precision: str | None = None, batch_sizes: tuple[int, ...] = (1, 8),
                threads: int | None = None, per_set: bool | None = None, confidence: bool = True) -> Engine:
    """Load a version (a version directory, or a bundle root: its serving version) as an engine.

    `device`: None picks "cuda" when torch sees a GPU, else "cpu". `precision` (fp32, fp16, int8;
    None: fp16 where a GPU engine can lower to it, else fp32): fp16 applies to GPU engines that can
    lower it (TensorRT, ONNX Runtime's TensorRT provider, torch-compile); int8 to ONNX Runtime on a
    CPU, which serves the version's INT8 graph (export/quantize.py) if it passed its parity check.
    An engine that serves another precision than the one asked for says so in one log line. `batch_sizes` are
    the sizes to prepare for (TensorRT profiles, CUDA graphs); others still work, slower.
    `threads`: ONNX Runtime intra-op threads (default: its own, the physical cores).
    `per_set`: ONNX Runtime / TensorRT on an adapted model's per-set graphs (True), its blended
    model.onnx (False), or None: per-set graphs on a GPU where the export wrote them.
    `confidence`: False where the caller does not use it; ONNX Runtime on a CPU then runs its graphs
    without the confidence softmax and returns None for it (other engines still return it).
    """
    from mas3_edge.bundle import resolve
    vdir = resolve(Path(version_dir))
    dev = _resolve_device(device)
    kind = _ALIASES.get(kind, kind)
    if precision not in (None, *PRECISIONS):
        raise UserError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    opts = {"precision": precision, "batch_sizes": tuple(batch_sizes), "threads": threads, "per_set": per_set,
            "confidence": confidence}
    if kind != "auto":
        if kind not in KINDS:
            raise UserError(f"unknown engine kind {kind!r}; choose auto or one of {', '.join(KINDS)}")
        return _announce(_build(kind, vdir, dev, opts), "asked for", precision)
    reasons = []
    for candidate in _auto_order(dev):
        try:
            engine = _build(candidate, vdir, dev, {**opts, "gpu_only": dev != "cpu"})
        except (UserError, ImportError) as e:  # expected: no export, no GPU provider, a library missing
            reasons.append(f"{candidate}: {e}")
            log.info("auto: %s is not available (%s)", candidate, e)
            continue
        except Exception as e:  # a bug or a driver error in one engine must not stop serving with another
            why = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"
            reasons.append(f"{candidate}: {why}")
            log.warning("auto: %s failed to load (%s); trying the next engine", candidate, why)
            continue
        return _announce(engine, "auto picked", precision)
    raise UserError("no inference engine could be loaded (" + "; ".join(reasons) + ")")


def available_kinds(device: str | None = None) -> list[str]:
    """Kinds worth trying on this machine, fastest first (what `auto` walks through)."""
    return _auto_order(_resolve_device(device))


def _auto_order(dev: str) -> list[str]:
    if dev == "cpu":
        return ["onnxruntime", "torch"]
    return ["onnxruntime", "torch-cudagraph", "torch-fp16", "torch"]


def _resolve_device(device: str | None) -> str:
    import torch
    if device in (None, "auto"):
        return "cuda:0" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return device
    if not device.startswith("cuda"):
        raise UserError(f"device must be cpu, cuda or cuda:N, got {device!r}")
    return device if ":" in device else f"{device}:0"


def _announce(engine: Engine, how: str, precision: str | None = None) -> Engine:
    log.info("%s the %s engine for %s: %s, %s", how, engine.name, engine.version, engine.provider, engine.precision)
    if precision and engine.precision != precision:  # one line: what was asked, what serves, why
        why = engine.precision_note or (f"{engine.name} has no {precision} path on {engine.provider}"
                                        if precision != "int8" else "INT8 graphs are served by onnxruntime on a CPU")
        log.warning("precision %s asked for; %s serves %s: %s", precision, engine.name, engine.precision, why)
    return engine


def _build(kind: str, vdir: Path, dev: str, opts: dict) -> Engine:
    # the GPU engines lower to fp16 unless fp32 is asked for; int8 is ONNX Runtime's (on a CPU)
    opts = {**opts, "precision": opts["precision"] or "fp16"}
    if kind != "onnxruntime" and opts["precision"] == "int8":
        opts["precision"] = "fp16"
    if kind == "tensorrt":
        if dev == "cpu":
            raise UserError("the tensorrt engine needs a CUDA device, not cpu")
        from .trt_engine import TensorRTEngine
        return TensorRTEngine(vdir, dev, opts["precision"], opts["batch_sizes"], opts.get("per_set"))
    if kind == "onnxruntime":
        from .ort_engine import OrtEngine
        return OrtEngine(vdir, dev, opts["precision"], opts["batch_sizes"], opts["threads"],
                         gpu_only=opts.get("gpu_only", False), per_set=opts.get("per_set"), confidence=opts["confidence"])
    if kind == "torch-compile":
        from .compiled import load_compiled
        return load_compiled(vdir, dev, opts["precision"], opts["batch_sizes"])
    from mas3_edge.bundle import load_version
    ver = load_version(vdir)
    return TorchEngine(ver.net, ver.id, dev, _TORCH_MODES[kind], opts["batch_sizes"])


# ---------------------------------------------------------------- host <-> device (CUDA engines)

def _to_device(frames: np.ndarray, device, out=None):
    """Through pinned memory, so the upload is a real asynchronous DMA on the current stream;
    into `out` (a CUDA graph's static input) when given."""
    import torch
    host = torch.empty(frames.shape, dtype=torch.uint8, pin_memory=True)
    host.numpy()[...] = frames
    return host.to(device, non_blocking=True) if out is None else out.copy_(host, non_blocking=True)


def _to_host(classes, conf) -> tuple[np.ndarray, np.ndarray]:
    """Download both maps into pinned buffers, wait once, hand them out as numpy (no extra copy)."""
    import torch
    outs = []
    for t in (classes.to(torch.uint8), conf.float()):
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        host.copy_(t, non_blocking=True)
        outs.append(host)
    torch.cuda.current_stream(classes.device).synchronize()
    return outs[0].numpy(), outs[1].numpy()


# ---------------------------------------------------------------- PyTorch

class TorchEngine(Engine):
    """PyTorch: eager fp32 (CPU or GPU), eager fp16 autocast, or fp16 autocast in CUDA graphs."""

    def __init__(self, net, version: str, device: str = "cpu", mode: str = "eager",
                 batch_sizes: tuple[int, ...] = (1,), channels_last: bool = False, fold_bn: bool = True,
                 compile: bool = False):
        import torch
        from mas3_edge.model import Deployed, DomainNorm, PerSetFolded, fold_batchnorm
        self._torch, self.device, self.mode = torch, torch.device(device), mode
        if mode not in ("eager", "fp16", "cudagraph"):
            raise UserError(f"torch mode must be eager, fp16 or cudagraph, got {mode!r}")
        if self.device.type != "cuda" and mode != "eager":
            raise UserError(f"torch {mode} needs a CUDA device, got {device}")
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise UserError("a CUDA device was asked for but torch sees no usable GPU")
        self.name = {"eager": "torch", "fp16": "torch-fp16", "cudagraph": "torch-cudagraph"}[mode]
        self.version, self.input_size = version, tuple(net.config.input_size)
        self.precision = "fp32" if mode == "eager" else "fp16"
        # a snapshot (adapting `net` later must not change what serves), batch norm folded into the
        # convs; a model with several normalisation sets as one folded copy per set
        model = copy.deepcopy(net).eval()
        self._per_set = fold_bn and any(isinstance(m, DomainNorm) and m.routed() for m in model.modules())
        model = (PerSetFolded(model) if self._per_set else Deployed(fold_batchnorm(model) if fold_bn else model)).eval()
        if self.device.type == "cuda":  # NCHW: faster than NHWC for this depthwise-heavy net on an H200
            model = model.to(self.device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        if compile:  # Inductor fuses the pointwise work; compiling takes a minute or more
            model = torch.compile(model)
        self._model, self._lock, self._graphs, self._inputs = model, threading.Lock(), {}, {}
        extra = {"eager": "", "fp16": ", fp16 autocast", "cudagraph": ", fp16 autocast, CUDA graphs"}[mode]
        extra += (", NHWC" if channels_last and self.device.type == "cuda" else "") + (", compiled" if compile else "")
        extra += f", {len(model.copies)} sets folded apart" if self._per_set else ""
        self.provider = f"torch {torch.__version__} {self.device}{extra}"
        warm = batch_sizes if self.device.type == "cuda" else batch_sizes[:1]
        for b in warm:  # CUDA graph capture, cuDNN/oneDNN kernel choice: in the loader, not the first frame
            for key in range(len(model.copies)) if self._per_set and mode == "cudagraph" else ():
                self._graph(b, key)  # every set's graph, not only the one zeros route to
            self._infer(np.zeros((b, *self.input_size, 3), np.uint8))

    def _autocast(self):
        if self.mode == "eager":
            return contextlib.nullcontext()
        # cache_enabled=False: autocast's weight cast cache must not outlive a graph capture
        return self._torch.autocast("cuda", dtype=self._torch.float16, cache_enabled=False)

    def _infer(self, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        torch = self._torch
        if self.device.type == "cpu":  # the lock: a forward pass sets each DomainNorm's per-frame route
            with self._lock, torch.inference_mode():
                classes, conf = self._model(torch.from_numpy(frames))
            return classes.numpy(), conf.numpy()
        with self._lock, torch.cuda.device(self.device):
            if self.mode == "cudagraph":
                static_in = self._input(len(frames))
                _to_device(frames, self.device, out=static_in)
                key = None
                if self._per_set:  # one graph per set: pick it from the route (one small sync)
                    sets = self._model.route(static_in).unique().tolist()
                    if len(sets) > 1:  # frames of different sets in one batch: eager, each through its copy
                        with torch.inference_mode(), self._autocast():
                            return _to_host(*self._model(static_in))
                    key = sets[0]
                graph, static_out = self._graph(len(frames), key)
                graph.replay()
                return _to_host(*static_out)
            with torch.inference_mode(), self._autocast():
                return _to_host(*self._model(_to_device(frames, self.device)))

    def _input(self, batch: int):
        """The static input buffer the graphs of this batch size read."""
        if batch not in self._inputs:
            shape = (batch, *self.input_size, 3)
            self._inputs[batch] = self._torch.zeros(shape, dtype=self._torch.uint8, device=self.device)
        return self._inputs[batch]

    def _graph(self, batch: int, key: int | None = None):
        """Capture (once per batch size, and per set `key` of a PerSetFolded model) the whole
        forward pass as a CUDA graph reading the static input; -> (graph, static outputs)."""
        if (batch, key) in self._graphs:
            return self._graphs[batch, key]
        torch = self._torch
        model = self._model if key is None else self._model.copies[key]
        with torch.cuda.device(self.device):
            static_in = self._input(batch)
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side), torch.no_grad(), self._autocast():
                for _ in range(3):  # warm-up on a side stream, as capture requires: cuDNN picks its kernels
                    model(static_in)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            # thread_local: a capture in a loader thread must not trip over the serving thread's CUDA calls
            with torch.no_grad(), self._autocast(), torch.cuda.graph(graph, capture_error_mode="thread_local"):
                static_out = model(static_in)
        self._graphs[batch, key] = (graph, static_out)
        return self._graphs[batch, key]

    def close(self) -> None:
        self._graphs.clear()
        self._inputs.clear()
        self._model = None
