"""INT8 graphs of an exported version: ONNX Runtime static quantisation, checked against fp32.

    quantize_version(vdir, frames)   model.int8.onnx, or sets/set-<s>.int8.onnx for each per-set
                                     graph where export wrote them (the INT8 engine serves those),
                                     calibrated on `frames`, checked, listed under "int8" in export.json
    int8_graphs(vdir, report)        the INT8 files a verified export lists, or UserError with the reason

What: QDQ format (QuantizeLinear/DequantizeLinear pairs around each quantised op, which ONNX
Runtime fuses into its integer kernels), weights int8 per output channel, activations uint8 per
tensor, ranges from percentile calibration, all with onnxruntime.quantization's own quantize_static.
Only the convolutions and the ops between them are quantised: the normalisation at the input and
the softmax, argmax and upsampling at the output stay fp32, so the confidence keeps its precision.

Calibration takes the frames the device has seen (a round's own buffered frames): no source data,
and the newest statistics; one frame at a time, so the round's peak memory grows by one frame's
tensors. A quarter of them (the newest) are held out of calibration and judge it.

Parity, before an INT8 graph may be served: pixel-label agreement with the fp32 graph on the
held-out frames >= 99 %, and, where the caller has labelled frames, mIoU within 0.3 points of the
fp32 graph on them. A graph that fails is not written; export.json says why ("int8": passed false,
reason), the engines serve fp32 and log that reason in one line.
"""
from __future__ import annotations

import contextlib
import io
import logging
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from mas3_edge.bundle import atomic_write, atomic_write_json, sha256_bytes, sha256_file
from mas3_edge.errors import UserError

from .onnx import EXPORT_FILE, INPUT, check_onnx, run_onnx

log = logging.getLogger(__name__)

INT8_FILE = "model.int8.onnx"
MIN_AGREEMENT = 0.99  # pixel labels equal to the fp32 graph's, on the held-out frames
MAX_MIOU_DROP = 0.3  # mIoU points (0-100) below the fp32 graph, on labelled frames
HOLD_OUT = 0.25  # share of the frames (the newest) that judge the calibration instead of feeding it
MIN_FRAMES = 4
# the ops quantised: the convolutions and what joins them (activations, residual adds, the pooling
# branch); the upsampling of the logits, the softmax and the argmax stay fp32
OPS = ["Conv", "Clip", "Relu", "Add", "Mul", "Concat", "GlobalAveragePool", "MaxPool", "AveragePool", "MatMul", "Gemm"]
STRIDE = 1  # frames whose every intermediate tensor calibration holds at once (the round's peak memory)
CALIBRATION_FRAMES = 32  # newest buffered frames a round calibrates and judges on (time and memory)
# percentile ranges ignore the rare extreme activation: they raised the agreement with fp32 on
# held-out frames, as the weight range of weight_bits() did (docs/results/int8.md has the figures)
PERCENTILE = 99.999


def cpu_flags() -> set[str] | None:
    """The CPU's feature flags as Linux lists them, or None where they cannot be read."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    return set(next((ln for ln in text.splitlines() if ln.startswith("flags")), "").split())


def weight_bits() -> int:
    """The weight range this CPU multiplies without overflow: 7 bits on an x86 CPU without VNNI (AVX2's
    vpmaddubsw sums pairs of u8 x s8 products in 16 bits, which saturate with 8-bit weights), else 8."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86"):
        return 8
    flags = cpu_flags()  # unknown: 7 bits, the range that is safe everywhere
    return 8 if flags and {"avx512_vnni", "avx_vnni"} & flags else 7


def settings(bits: int) -> dict:
    """What export.json records of a calibration's settings."""
    return {"format": "QDQ", "weights": f"int8 per channel, {bits}-bit range", "weight_bits": bits,
            "activations": "uint8 per tensor", "calibration": f"percentile {PERCENTILE}", "ops": OPS}


class FrameReader:
    """onnxruntime.quantization.CalibrationDataReader over uint8 (N, H, W, 3) frames, one at a time."""

    def __init__(self, frames: np.ndarray):
        self.frames, self._i, self._end = frames, 0, len(frames)

    def __len__(self) -> int:
        return len(self.frames)

    def get_next(self) -> dict | None:
        if self._i >= self._end:
            return None
        self._i += 1
        return {INPUT: self.frames[self._i - 1:self._i]}

    def set_range(self, start_index: int, end_index: int) -> None:
        """The frames of one calibration stride (ORT merges each stride's ranges, then drops its outputs)."""
        self._i, self._end = start_index, min(end_index, len(self.frames))

    def rewind(self) -> None:
        self._i, self._end = 0, len(self.frames)


def quantize_graph(model: bytes | Path, frames: np.ndarray, *, exclude: list[str] | None = None,
                   norm_as_conv: bool = True, **options) -> bytes:
    """A QDQ INT8 copy of an fp32 graph calibrated on `frames`: weights in this CPU's range
    (weight_bits), the input normalisation as one fp32 Conv unless `norm_as_conv` is off; `options`
    override quantize_static's arguments, for the benchmark's variants."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    import onnx

    from .passes import NORM_CONV, normalise_as_conv
    frames = frames[:len(frames) // STRIDE * STRIDE] if len(frames) >= STRIDE else frames
    graph = onnx.load_from_string(model.read_bytes() if isinstance(model, Path) else model)
    as_conv = normalise_as_conv(graph) if norm_as_conv else None  # stays fp32, as the Sub and Div would
    graph, exclude = (as_conv, [*(exclude or []), NORM_CONV]) if as_conv is not None else (graph, exclude)
    with tempfile.TemporaryDirectory(prefix="mas3-int8-") as tmp:  # quantize_static works on files
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        src.write_bytes(graph.SerializeToString())
        kwargs = dict(quant_format=QuantFormat.QDQ, per_channel=True, reduce_range=weight_bits() < 8,
                      activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                      calibrate_method=CalibrationMethod.Percentile, op_types_to_quantize=OPS,
                      nodes_to_exclude=exclude or [],
                      # the histograms take STRIDE frames' tensors at a time (bounded memory)
                      extra_options={"CalibStridedMinMax": min(STRIDE, len(frames)), "CalibPercentile": PERCENTILE})
        chatter = io.StringIO()  # the calibrators print progress: keep stdout clean for --json
        with contextlib.redirect_stdout(chatter), _quiet_root():
            quantize_static(str(src), str(dst), _Reader(FrameReader(frames)), **{**kwargs, **options})
        log.debug("quantize_static: %s", chatter.getvalue().strip())
        return dst.read_bytes()


@contextlib.contextmanager
def _quiet_root():
    """Drop ORT's root-logger advice to run its pre-processing: the graph it gets is already
    shape-complete and folded by export (onnxslim), which is what that pre-processing does."""
    root = logging.getLogger()

    def advice(record: logging.LogRecord) -> bool:
        return "pre-processing" not in record.getMessage()
    root.addFilter(advice)
    try:
        yield
    finally:
        root.removeFilter(advice)


def _Reader(inner: FrameReader):
    """The reader as a subclass of ORT's CalibrationDataReader (imported lazily, like ORT itself)."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __len__(self):
            return len(inner)

        def get_next(self):
            return inner.get_next()

        def set_range(self, start_index: int, end_index: int):
            inner.set_range(start_index, end_index)

        def rewind(self):
            inner.rewind()
    return Reader()


def split_frames(frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(calibration frames, held-out frames): the newest quarter judges, the rest calibrates."""
    if frames.ndim != 4 or frames.dtype != np.uint8 or len(frames) < MIN_FRAMES:
        raise UserError(f"INT8 calibration needs at least {MIN_FRAMES} uint8 (N, H, W, 3) frames, "
                        f"got {frames.dtype} {frames.shape}")
    held = max(1, round(len(frames) * HOLD_OUT))
    return frames[:-held], frames[-held:]


def int8_name(fp32_file: str) -> str:
    """The INT8 file of a graph: model.onnx -> model.int8.onnx, sets/set-1.onnx -> sets/set-1.int8.onnx."""
    return fp32_file.removesuffix(".onnx") + ".int8.onnx"


def quantize_version(vdir: Path, frames: np.ndarray, labelled: tuple[np.ndarray, np.ndarray] | None = None,
                     *, source: str = "frames") -> dict:
    """Quantise the graphs a version's INT8 engine serves (its per-set graphs where export wrote them,
    else model.onnx) and check them. The blended model.onnx of a model with per-set graphs stays fp32:
    calibrating it held every intermediate tensor of its per-frame routing too, the largest part of
    an INT8 round's memory, for a graph the INT8 engine does not run.

    `frames`: uint8 (N, H, W, 3), oldest first; the newest quarter is held out for the agreement
    check. `labelled`: optional (images, labels) for the mIoU check. Writes the INT8 files only if
    every graph passes; always records the outcome under "int8" in export.json and returns it.
    """
    vdir = Path(vdir)
    path, report = check_onnx(vdir)
    cal, held = split_frames(np.asarray(frames))
    t0, graphs, blobs, failures, bits = time.perf_counter(), [], {}, [], weight_bits()
    sources = [g["file"] for g in (report.get("sets") or {}).get("graphs", [])] or [report["onnx"]["file"]]
    for rel in sources:
        data = quantize_graph(vdir / rel, cal, reduce_range=bits < 8)
        check = parity_int8(vdir / rel, data, held, labelled, _labels(vdir))
        failures += [f"{int8_name(rel)}: {why}" for why in check.pop("failures")]
        blobs[int8_name(rel)] = data
        graphs.append({"file": int8_name(rel), "from": rel, "from_sha256": sha256_file(vdir / rel),
                       "sha256": sha256_bytes(data), "bytes": len(data), "parity": check})
    entry = {"passed": not failures, "reason": "; ".join(failures) or None, "graphs": graphs,
             "settings": settings(bits), "calibration": {"frames": len(cal), "held_out": len(held), "source": source},
             "seconds": round(time.perf_counter() - t0, 2),
             "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    _write(vdir, report, entry, blobs)
    return entry


def _write(vdir: Path, report: dict, entry: dict, blobs: dict[str, bytes]) -> None:
    """The INT8 files (only if they passed) before export.json, which is what makes them count;
    files of an earlier calibration that export.json no longer lists are removed after it."""
    for name, data in blobs.items() if entry["passed"] else ():
        atomic_write(vdir / name, data)
    atomic_write_json(vdir / EXPORT_FILE, {**report, "int8": entry})
    if not entry["passed"]:
        for name in blobs:
            (vdir / name).unlink(missing_ok=True)
        log.warning("INT8 graph of %s failed its parity check (%s); fp32 is served", vdir.name, entry["reason"])


def _labels(vdir: Path):
    from mas3_edge import bundle as bundles
    return bundles.version_labels(bundles.read_meta(vdir))


def parity_int8(fp32: Path, int8: bytes, held: np.ndarray, labelled: tuple[np.ndarray, np.ndarray] | None,
                labels=None) -> dict:
    """Agreement of the INT8 graph with its fp32 graph on `held`, and both mIoUs on `labelled`;
    "failures" lists the floors missed (empty: it may be served)."""
    ref, got = run_onnx(fp32, held, ["classes"])["classes"], run_onnx(int8, held, ["classes"])["classes"]
    out: dict = {"held_out": len(held), "agreement": float((ref == got).mean()), "min_agreement": MIN_AGREEMENT,
                 "failures": []}
    if not out["agreement"] >= MIN_AGREEMENT:
        out["failures"].append(f"pixel agreement with fp32 {out['agreement']:.2%} < {MIN_AGREEMENT:.0%}")
    if labelled is not None:
        from mas3_edge.metrics import Confusion
        images, truth = labelled
        for name, graph in (("fp32", fp32), ("int8", int8)):
            conf = Confusion(labels) if labels is not None else Confusion()
            conf.update(run_onnx(graph, images, ["classes"])["classes"], truth)
            out[f"miou_{name}"] = conf.miou()
        drop = abs(out["miou_fp32"] - out["miou_int8"])
        if not drop <= MAX_MIOU_DROP:
            out["failures"].append(f"mIoU {out['miou_int8']:.2f} vs fp32 {out['miou_fp32']:.2f} "
                                   f"(more than {MAX_MIOU_DROP} apart)")
    return out


def int8_graphs(vdir: Path, report: dict) -> tuple[Path | None, dict[str, Path]]:
    """The INT8 graph of model.onnx (None where the per-set graphs were calibrated instead) and those
    of the per-set graphs ({fp32 file: INT8 path}), if export.json lists a calibration that passed
    and each file is the one checked, made from the fp32 graph export verified; else UserError
    saying why (the caller serves fp32)."""
    entry = report.get("int8")
    fix = f"run `mas3-edge export --bundle {vdir} --precision int8`"
    if not entry:
        raise UserError(f"version {report.get('version')} has no INT8 graph; {fix}")
    if not entry.get("passed"):
        raise UserError(f"the INT8 graph of {report.get('version')} failed its parity check ({entry.get('reason')})")
    if entry.get("settings", {}).get("weight_bits", 7) > weight_bits():
        raise UserError(f"the INT8 graph of {report.get('version')} has 8-bit weights, which saturate on a CPU "
                        f"without VNNI; {fix} on this machine")
    fp32 = {report["onnx"]["file"]: report["onnx"]["sha256"]}
    fp32.update({g["file"]: g["sha256"] for g in (report.get("sets") or {}).get("graphs", [])})
    paths = {}
    for g in entry["graphs"]:
        path = Path(vdir) / g["file"]
        if fp32.get(g["from"]) != g["from_sha256"]:
            raise UserError(f"{path} was calibrated from another graph than the one exported (stale); {fix}")
        if not path.is_file() or sha256_file(path) != g["sha256"]:
            raise UserError(f"{path} is missing or not the file calibration checked; {fix}")
        paths[g["from"]] = path
    return paths.pop(report["onnx"]["file"], None), paths


def int8_or_fp32(vdir: Path, report: dict, path: Path, graphs: list[Path]) -> tuple[Path, list[Path], str]:
    """The INT8 graphs in place of the fp32 `path` and per-set `graphs`, and "" - or the fp32 ones
    and why they are served instead (for the engine's one log line)."""
    try:
        main, sets = int8_graphs(vdir, report)
        if main is None and not graphs:
            return path, graphs, f"no INT8 graph of {report['onnx']['file']} (its per-set graphs carry INT8)"
        return main or path, [sets[g.relative_to(vdir).as_posix()] for g in graphs], ""
    except UserError as e:
        return path, graphs, str(e)
    except KeyError as e:  # a per-set graph that calibration did not cover
        return path, graphs, f"no INT8 graph of {e.args[0]}"


def quantize_buffer(vdir: Path, frames_dir: Path, limit: int = CALIBRATION_FRAMES) -> dict:
    """quantize_version on the newest `limit` frames of a frame folder (a round's buffer)."""
    from mas3_edge.bundle import read_meta
    from mas3_edge.frames import load_frames
    frames = load_frames(Path(frames_dir), tuple(read_meta(Path(vdir))["input_size"]), min(limit, CALIBRATION_FRAMES))
    return quantize_version(vdir, frames, source=f"the newest {len(frames)} frames of {frames_dir}")
