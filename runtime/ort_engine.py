"""The ONNX Runtime engine: model.onnx (or an adapted model's per-set graphs and router) on the
TensorRT, CUDA or CPU execution provider, whichever actually loads; INT8 graphs on a CPU."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from mas3_edge.errors import UserError

from .engines import Engine

log = logging.getLogger(__name__)
_GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


class OrtEngine(Engine):
    """ONNX Runtime on the best provider that actually loads (checked, not assumed).

    onnxruntime-gpu lists CUDA/TensorRT among its available providers even when their libraries
    are missing, prints errors and quietly runs on CPU; so the session's own provider list is what
    `provider` reports, and a mismatch is logged as a warning.
    """

    name = "onnxruntime"

    def __init__(self, vdir: Path, device: str = "cpu", precision: str = "fp16",
                 batch_sizes: tuple[int, ...] = (1, 8), threads: int | None = None, gpu_only: bool = False,
                 per_set: bool | None = None, confidence: bool = True):
        # precision: fp16 lowers on the TensorRT provider; int8 on a CPU serves the INT8 graphs
        # confidence=False: infer returns None for it, and on a CPU the graphs run without its softmax
        import onnxruntime as ort
        from mas3_edge.export.onnx import check_onnx
        from mas3_edge.export.sets import check_sets
        path, report = check_onnx(vdir)
        self.version, self.input_size = report["version"], tuple(report["onnx"]["input"]["shape"][1:3])
        # an adapted model's per-set graphs where export wrote them and a GPU runs them; on a CPU the
        # blended model.onnx is as fast (tools/bench_sets.py) and one session instead of S + 1
        # INT8 on a CPU too: the blended graph's per-frame scale and shift cannot fold into its convs
        per_set = bool(report.get("sets")) and (device != "cpu" or precision == "int8") if per_set is None else per_set
        router, graphs = check_sets(vdir, report) if per_set else (None, [])
        int8 = precision == "int8" and device == "cpu"
        if int8:
            from mas3_edge.export.quantize import int8_or_fp32
            path, graphs, self.precision_note = int8_or_fp32(Path(vdir), report, path, graphs)
            int8 = not self.precision_note
        elif precision == "int8":
            self.precision_note = "INT8 graphs are calibrated for the CPU provider; a GPU serves fp16"
        elif precision == "fp16" and device == "cpu":
            self.precision_note = "the CPU provider has no fp16 kernels worth serving; the fp32 graph runs"
        opts = lambda p: self._providers(ort, Path(vdir), device, precision, tuple(batch_sizes), _sha(report, p))  # noqa: E731
        # the TensorRT provider caches engines by the file's hash: only the CPU's graphs are trimmed
        trim = not confidence and device == "cpu"
        self._outputs = ["classes", "confidence"] if confidence else ["classes"]
        first = opts(router if per_set else path)
        self._sess = _ort_session(ort, path, first, threads, trim) if not per_set else None
        self._router = _ort_session(ort, router, first, threads) if per_set else None
        self._sets = [_ort_session(ort, g, opts(g), threads, trim) for g in graphs]
        wanted = first[0][0]
        self.provider = (self._sess or self._sets[0]).get_providers()[0]
        if self.provider != wanted:
            log.warning("onnxruntime asked for %s but runs on %s (GPU libraries missing?)", wanted, self.provider)
        if gpu_only and self.provider not in _GPU_PROVIDERS:
            raise UserError(f"onnxruntime has no usable GPU provider here (it would run on {self.provider})")
        self.provider += f", {len(graphs)} per-set graphs and a router" if per_set else ""
        trt_fp16 = self.provider.startswith("TensorrtExecutionProvider") and precision in ("fp16", "int8")
        self.precision = "int8" if int8 else "fp16" if trt_fp16 else "fp32"
        for b in (batch_sizes if not self.provider.startswith("CPU") else (1,)):  # TensorRT EP builds at first run
            for sess in self._sets or [self._sess]:  # every set's graph, not only the one zeros route to
                sess.run(self._outputs, {"images": np.zeros((b, *self.input_size, 3), np.uint8)})
            self._infer(np.zeros((b, *self.input_size, 3), np.uint8))

    @staticmethod
    def _providers(ort, vdir: Path, device: str, precision: str, batch_sizes: tuple[int, ...],
                   onnx_sha: str) -> list[tuple[str, dict]]:
        available = ort.get_available_providers()
        out: list[tuple[str, dict]] = []
        if device != "cpu":
            idx = int(device.split(":")[1]) if ":" in device else 0
            if "TensorrtExecutionProvider" in available:
                out.append(("TensorrtExecutionProvider", _ort_trt_options(vdir, idx, precision, batch_sizes, onnx_sha)))
            if "CUDAExecutionProvider" in available:
                out.append(("CUDAExecutionProvider", {"device_id": idx}))
        return out + [("CPUExecutionProvider", {})]

    def _infer(self, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        if self._router is None:
            return self._run(self._sess, frames)
        from mas3_edge.export.sets import split_by_set
        route = self._router.run(["route"], {"images": frames})[0]
        parts = split_by_set(route)
        if len(parts) == 1:
            return self._run(self._sets[parts[0][0]], frames)
        classes = np.empty(frames.shape[:3], np.uint8)  # a mixed batch: each set's frames through its graph
        conf = np.empty(frames.shape[:3], np.float32) if len(self._outputs) == 2 else None
        for s, idx in parts:
            classes[idx], part = self._run(self._sets[s], frames[idx])
            if conf is not None:
                conf[idx] = part
        return classes, conf

    def _run(self, sess, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        out = sess.run(self._outputs, {"images": frames})
        return out[0], out[1] if len(out) == 2 else None

    def close(self) -> None:
        self._sess, self._router, self._sets = None, None, []


def _sha(report: dict, path: Path) -> str:
    """The sha256 export.json records for one of a version's graphs (keys the TensorRT provider cache)."""
    sets = report.get("sets") or {}
    for entry in [sets.get("router"), *sets.get("graphs", [])]:
        if entry and Path(path).as_posix().endswith(entry["file"]):
            return entry["sha256"]
    return report["onnx"]["sha256"]


def _ort_session(ort, path: Path, wanted: list[tuple[str, dict]], threads: int | None, trim: bool = False):
    """A session on the first provider list that ORT accepts, dropping the most demanding provider
    after each failure (an ORT build that rejects a TensorRT option must still get CUDA); `trim`:
    the graph without its confidence softmax, where it has one (export/passes.py, classes_only)."""
    source: str | bytes = str(path)
    if trim:
        import onnx

        from mas3_edge.export.passes import classes_only
        trimmed = classes_only(onnx.load(str(path)))
        source = source if trimmed is None else trimmed.SerializeToString()
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = int(threads)
    for i in range(len(wanted)):
        try:
            return ort.InferenceSession(source, so, providers=wanted[i:])
        except Exception as e:  # ORT raises its own exception types
            error = str(e).splitlines()[0] if str(e) else type(e).__name__
            if i + 1 < len(wanted):
                log.warning("onnxruntime could not start %s (%s); trying %s", wanted[i][0], error, wanted[i + 1][0])
    raise UserError(f"onnxruntime cannot load {path}: {error}")


def _ort_trt_options(vdir: Path, idx: int, precision: str, batch_sizes: tuple[int, ...], onnx_sha: str) -> dict:
    """TensorRT provider options: fp16, profile shapes, and an engine cache keyed like ours."""
    from mas3_edge.export.tensorrt import EngineCache, EngineSpec
    try:
        import tensorrt
        trt_version = tensorrt.__version__
    except ImportError:  # the provider links TensorRT itself; key on the ORT build instead
        import onnxruntime
        trt_version = f"via onnxruntime {onnxruntime.__version__}"
    from mas3_edge.bundle import read_meta
    h, w = read_meta(vdir)["input_size"]
    spec = EngineSpec(onnx_sha, trt_version, _gpu_label(idx), precision, (h, w), batch_sizes)
    cache = EngineCache(vdir).ort_cache_dir(spec)
    cache.mkdir(parents=True, exist_ok=True)
    shape = lambda b: f"images:{b}x{h}x{w}x3"  # noqa: E731
    return {"device_id": idx, "trt_fp16_enable": precision == "fp16", "trt_engine_cache_enable": True,
            "trt_engine_cache_path": str(cache), "trt_timing_cache_enable": True,
            "trt_timing_cache_path": str(cache), "trt_profile_min_shapes": shape(1),
            "trt_profile_opt_shapes": shape(max(spec.batch_sizes)), "trt_profile_max_shapes": shape(max(spec.batch_sizes))}


def _gpu_label(idx: int) -> str:
    import torch
    if torch.cuda.is_available():
        from mas3_edge.export.tensorrt import gpu_name
        return gpu_name(f"cuda:{idx}")
    return f"cuda:{idx}"
