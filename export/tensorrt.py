"""TensorRT engines built from a version's verified model.onnx, cached next to it.

    VERSION/engines/trt-fp16-<key>.plan   the serialized engine
    VERSION/engines/trt-fp16-<key>.json   what it was built from (the key's fields), its sha256, parity

One plan per graph: model.onnx, or for an adapted model exported with its per-set layout
(export/sets.py) the router and each set's graph (`graph=` "sets/router.onnx", "sets/set-1.onnx"),
each keyed by its own file's sha256. The router's check is its choice of set against SegModel.route;
a set's, its outputs against PyTorch with that set forced.

The key hashes everything an engine depends on: the ONNX sha256, the TensorRT version, the GPU
(name + compute capability), the precision, the input size and the batch profiles. A changed
model, GPU or TensorRT therefore looks up another key and rebuilds; an unchanged one loads the
cached plan, after checking the plan's sha256 (a truncated or corrupt file is rebuilt, not used).
Builds are checked against PyTorch like the ONNX export (class agreement >= 99.5% in fp16,
99.9% in fp32) before they are written; a failed build or check leaves the cache as it was.

TensorRT >= 10 is assumed: its ONNX parser takes the uint8 image input and its Cast layer
writes the uint8 class map (TensorRT 8.x allows uint8 only at I/O via identity layers and is
not supported). Device memory is handled through torch CUDA tensors, so no pycuda is needed.
Everything TensorRT is imported lazily; without it `require_tensorrt` raises one clear line.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from mas3_edge.bundle import atomic_write, atomic_write_json, load_version, read_meta, sha256_file
from mas3_edge.errors import UserError

from . import parity
from .onnx import INPUT, OUTPUTS, check_onnx

log = logging.getLogger(__name__)

ENGINE_DIR = "engines"
PRECISIONS = ("fp16", "fp32")


def tensorrt_status() -> tuple[bool, str]:
    """(usable, why): TensorRT needs its Python package and a CUDA GPU torch can see."""
    try:
        import tensorrt
    except ImportError:
        return False, "TensorRT is not installed (pip install tensorrt, on a machine with an NVIDIA GPU)"
    import torch
    if not torch.cuda.is_available():
        return False, f"TensorRT {tensorrt.__version__} is installed but no CUDA GPU is usable"
    if int(tensorrt.__version__.split(".")[0]) < 10:
        return False, f"TensorRT {tensorrt.__version__} is too old; version 10 or newer is needed"
    return True, f"TensorRT {tensorrt.__version__}"


def require_tensorrt():
    """The tensorrt module, or UserError saying why it cannot be used here."""
    ok, why = tensorrt_status()
    if not ok:
        raise UserError(why)
    import tensorrt
    return tensorrt


def trt_version() -> str:
    return require_tensorrt().__version__


def gpu_name(device: str | None = None) -> str:
    """Name and compute capability: engines are specific to both."""
    import torch
    dev = torch.device(device or "cuda")
    major, minor = torch.cuda.get_device_capability(dev)
    return f"{torch.cuda.get_device_name(dev)} sm{major}{minor}"


@dataclass(frozen=True)
class EngineSpec:
    """Everything a built engine depends on; its hash names the cached file."""

    onnx_sha256: str
    trt_version: str
    gpu: str
    precision: str
    input_size: tuple[int, int]
    batch_sizes: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise UserError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        sizes = tuple(sorted({int(b) for b in self.batch_sizes}))
        if not sizes or sizes[0] < 1:
            raise UserError(f"batch sizes must be >= 1, got {self.batch_sizes}")
        object.__setattr__(self, "batch_sizes", sizes)
        object.__setattr__(self, "input_size", tuple(int(s) for s in self.input_size))

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]

    def profiles(self) -> list[tuple[int, int, int]]:
        """One (min, opt, max) batch profile per batch size: each size gets kernels tuned for it."""
        lows = (1,) + tuple(b + 1 for b in self.batch_sizes[:-1])
        return [(lo, b, b) for lo, b in zip(lows, self.batch_sizes)]

    def to_dict(self) -> dict:
        return {**asdict(self), "input_size": list(self.input_size), "batch_sizes": list(self.batch_sizes)}


class EngineCache:
    """Engine plans of one version directory, looked up by spec (see the module docstring)."""

    def __init__(self, vdir: Path):
        self.dir = Path(vdir) / ENGINE_DIR

    def plan_path(self, spec: EngineSpec) -> Path:
        return self.dir / f"trt-{spec.precision}-{spec.key()}.plan"

    def lookup(self, spec: EngineSpec) -> Path | None:
        """The cached plan for `spec`, or None if absent, built from something else, or corrupt."""
        plan = self.plan_path(spec)
        info = _read_json(plan.with_suffix(".json"))
        if not plan.is_file():
            return None
        if info is None or info.get("spec") != spec.to_dict():
            log.warning("engine %s does not match this model/GPU/TensorRT; rebuilding it", plan.name)
            return None
        if info.get("sha256") != sha256_file(plan):
            log.warning("engine %s is corrupt (sha256 mismatch); rebuilding it", plan.name)
            return None
        return plan

    def store(self, spec: EngineSpec, plan: bytes, check: dict | None) -> Path:
        """Write plan then sidecar, each atomically (a crash leaves a plan without sidecar: rebuilt)."""
        path = self.plan_path(spec)
        atomic_write(path, plan)
        atomic_write_json(path.with_suffix(".json"), {
            "spec": spec.to_dict(), "sha256": hashlib.sha256(plan).hexdigest(), "bytes": len(plan),
            "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "parity": check})
        return path

    def entries(self) -> list[dict]:
        """Sidecars of every cached plan, with the plan's path under 'path'."""
        out = []
        for side in sorted(self.dir.glob("trt-*.json")):
            info = _read_json(side)
            if info is not None and "spec" in info:
                out.append({**info, "path": str(side.with_suffix(".plan"))})
        return out

    def prune(self, spec: EngineSpec, graphs: set[str] | None = None) -> list[Path]:
        """Delete plans that can never load again here: built from an ONNX file the version no longer
        has (`graphs`: the sha256 of each of its graphs; default the spec's alone), or by another
        TensorRT version. Plans for other GPUs stay (a bundle may be shared between devices)."""
        removed, graphs = [], graphs or {spec.onnx_sha256}
        for info in self.entries():
            old = info["spec"]
            if old["onnx_sha256"] not in graphs or old["trt_version"] != spec.trt_version:
                plan = Path(info["path"])
                plan.unlink(missing_ok=True)
                plan.with_suffix(".json").unlink(missing_ok=True)
                removed.append(plan)
        return removed

    def ort_cache_dir(self, spec: EngineSpec) -> Path:
        """Folder for ONNX Runtime's TensorRT provider cache; keyed the same way, since that provider
        does not notice a changed GPU or TensorRT version by itself."""
        return self.dir / f"ort-trt-{spec.precision}-{spec.key()}"


def _read_json(path: Path) -> dict | None:
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def graph_file(vdir: Path, graph: str | None = None) -> tuple[Path, str, set[str]]:
    """(path, sha256) of one verified graph of a version: model.onnx (graph None) or a file of its
    per-set layout ("sets/router.onnx", "sets/set-1.onnx"), and the sha256 of all its graphs."""
    from .sets import check_sets
    path, report = check_onnx(vdir)
    sets = report.get("sets") or {}
    entries = {e["file"]: e["sha256"] for e in [sets.get("router"), *sets.get("graphs", [])] if e}
    shas = {report["onnx"]["sha256"], *entries.values()}
    if graph is None:
        return path, report["onnx"]["sha256"], shas
    if graph not in entries:
        raise UserError(f"version {report['version']} has no graph {graph} (export.json lists {sorted(entries) or 'none'})")
    check_sets(vdir, report)
    return Path(vdir) / graph, entries[graph], shas


def engine_spec(vdir: Path, precision: str = "fp16", batch_sizes: tuple[int, ...] = (1, 8),
                device: str | None = None, graph: str | None = None) -> EngineSpec:
    """The spec of the engine this machine would use for a version's graph (needs a verified export)."""
    _, sha, _ = graph_file(vdir, graph)
    return EngineSpec(onnx_sha256=sha, trt_version=trt_version(), gpu=gpu_name(device),
                      precision=precision, input_size=tuple(read_meta(vdir)["input_size"]),
                      batch_sizes=tuple(batch_sizes))


def ensure_engine(vdir: Path, precision: str = "fp16", batch_sizes: tuple[int, ...] = (1, 8),
                  device: str | None = None, *, rebuild: bool = False, verify: bool = True,
                  graph: str | None = None) -> tuple[Path, dict]:
    """The cached engine for this version on this GPU, built (and parity-checked) if needed.

    `graph`: model.onnx (None) or one file of the version's per-set layout (`graph_file`).
    Returns the plan path and its sidecar. Raises UserError without TensorRT, without a verified
    export, or when a build fails or fails its parity check (the cache is left as it was).
    """
    vdir = Path(vdir)
    spec = engine_spec(vdir, precision, batch_sizes, device, graph)
    cache = EngineCache(vdir)
    hit = None if rebuild else cache.lookup(spec)
    if hit is None:
        onnx_path, _, shas = graph_file(vdir, graph)
        log.warning("building a TensorRT %s engine of %s for %s on %s (this takes minutes on small devices)",
                    precision, graph or onnx_path.name, read_meta(vdir)["version"], spec.gpu)
        t0 = time.perf_counter()
        plan = build_engine(onnx_path, spec)
        log.info("TensorRT build took %.0f s", time.perf_counter() - t0)
        check = verify_engine(plan, vdir, spec, device, graph=graph) if verify else None
        hit = cache.store(spec, plan, check)
        for old in cache.prune(spec, shas):
            log.info("removed stale engine %s", old.name)
    return hit, _read_json(hit.with_suffix(".json")) or {}


def build_engine(onnx_path: Path, spec: EngineSpec, workspace_gib: float = 4.0) -> bytes:
    """Parse the ONNX file and build a serialized engine with one profile per batch size."""
    trt = require_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(Path(onnx_path).read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise UserError(f"TensorRT cannot parse {onnx_path}: {errors or 'unknown error'}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    if spec.precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    else:
        config.clear_flag(trt.BuilderFlag.TF32)  # fp32 means fp32: TF32 convs miss the 1e-3 parity floor
    h, w = spec.input_size
    for lo, opt, hi in spec.profiles():
        profile = builder.create_optimization_profile()
        profile.set_shape(INPUT, (lo, h, w, 3), (opt, h, w, 3), (hi, h, w, 3))
        config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise UserError(f"TensorRT failed to build an engine from {onnx_path}; see its log above")
    return bytes(plan)


def verify_engine(plan: bytes, vdir: Path, spec: EngineSpec, device: str | None = None,
                  graph: str | None = None) -> dict:
    """Parity of a built engine against PyTorch (a set's graph: with that set forced; the router:
    the same set as SegModel.route per image); UserError if it misses the floors."""
    import torch
    from mas3_edge import bank
    from .sets import ROUTE, check_router
    ver = load_version(vdir)
    images, source = parity.check_images(spec.input_size)
    runner = TrtRunner(plan, torch.device(device or "cuda"))
    if graph is not None and graph.endswith("router.onnx"):
        with torch.cuda.stream(runner.stream):
            routes = [runner(torch.from_numpy(images[i:i + 1]).to(runner.device))[ROUTE].cpu().numpy()
                      for i in range(len(images))]
        check = check_router(ver.net, np.concatenate(routes), images)
        if check["disagree"]:
            raise UserError(f"the TensorRT router chose another set than PyTorch on {check['disagree']} "
                            f"of {check['images']} check images; no engine was cached")
        return check
    net = ver.net if graph is None else bank.one_set(ver.net, int(Path(graph).stem.split("-")[1]))
    ref = parity.torch_reference(net, images)
    got: dict[str, list] = {name: [] for name in OUTPUTS}
    with torch.cuda.stream(runner.stream):
        for i in range(len(images)):  # batch 1, the latency path
            outs = runner(torch.from_numpy(images[i:i + 1]).to(runner.device))
            for name in OUTPUTS:
                got[name].append(outs[name].cpu().numpy())
    check = parity.compare(ref, {k: np.concatenate(v) for k, v in got.items()}, spec.precision, source)
    if check.failures():
        raise UserError(f"the TensorRT {spec.precision} engine failed its parity check against PyTorch "
                        f"({', '.join(check.failures())}); no engine was cached")
    return check.to_dict()


def _torch_dtype(trt, dtype):
    import torch
    table = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16, trt.DataType.INT32: torch.int32,
             trt.DataType.INT8: torch.int8, trt.DataType.UINT8: torch.uint8, trt.DataType.BOOL: torch.bool,
             getattr(trt.DataType, "INT64", None): torch.int64}
    return table[dtype]


class TrtRunner:
    """A deserialized engine with one execution context per optimisation profile.

    Calls enqueue on `self.stream` (a non-default stream: TensorRT serialises on the legacy default
    stream); callers copy their inputs and outputs inside `with torch.cuda.stream(runner.stream)`
    so no cross-stream synchronisation is needed. Not thread-safe: callers hold a lock.
    """

    def __init__(self, plan: bytes, device, stream=None):
        import torch
        trt = require_tensorrt()
        self._trt, self.device = trt, torch.device(device)
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        with torch.cuda.device(self.device):
            self.engine = self._runtime.deserialize_cuda_engine(plan)
            if self.engine is None:
                raise UserError("TensorRT could not load the engine (built by another TensorRT version, "
                                "for another GPU, or corrupt); rebuild it with `mas3-edge export --engine tensorrt`")
            self.stream = stream if stream is not None else torch.cuda.Stream(self.device)
            self._check_io()
            self.contexts, self.ranges = [], []
            for p in range(self.engine.num_optimization_profiles):
                ctx = self.engine.create_execution_context()
                ctx.set_optimization_profile_async(p, self.stream.cuda_stream)
                lo, _, hi = self.engine.get_tensor_profile_shape(INPUT, p)
                self.contexts.append(ctx)
                self.ranges.append((lo[0], hi[0]))
            self.stream.synchronize()

    def _check_io(self) -> None:
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        mode = self._trt.TensorIOMode.INPUT
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) != mode]
        from .sets import ROUTE
        segments = set(OUTPUTS) <= set(self.outputs) or self.outputs == [ROUTE]  # a segmentation graph or the router
        if [n for n in names if self.engine.get_tensor_mode(n) == mode] != [INPUT] or not segments:
            raise UserError(f"the TensorRT engine has tensors {names}, not a mas3-edge segmentation engine")

    @property
    def max_batch(self) -> int:
        return max(hi for _, hi in self.ranges)

    def __call__(self, images):
        """uint8 (B, H, W, 3) on the device -> {output name: tensor on the device}, on self.stream."""
        import torch
        if images.shape[0] > self.max_batch:  # larger than any profile: run in chunks
            parts = [self(images[i:i + self.max_batch]) for i in range(0, images.shape[0], self.max_batch)]
            return {n: torch.cat([p[n] for p in parts]) for n in self.outputs}
        p = next(i for i, (lo, hi) in enumerate(self.ranges) if lo <= images.shape[0] <= hi)
        ctx = self.contexts[p]
        ctx.set_input_shape(INPUT, tuple(images.shape))
        ctx.set_tensor_address(INPUT, images.data_ptr())
        outs = {}
        for n in self.outputs:
            dtype = _torch_dtype(self._trt, self.engine.get_tensor_dtype(n))
            outs[n] = torch.empty(tuple(ctx.get_tensor_shape(n)), dtype=dtype, device=self.device)
            ctx.set_tensor_address(n, outs[n].data_ptr())
        if not ctx.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed")
        return outs
