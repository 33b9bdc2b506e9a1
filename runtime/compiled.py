"""The `torch-compile` engine: the PyTorch engine's network compiled by Inductor, cached on disk.

What is compiled is what the `torch` engine serves (batch norm folded into the convs; an adapted
model as one folded copy per normalisation set, each copy compiled), with torch.compile's default
Inductor mode (not max-autotune: minutes more on a small device for little). Shapes are static:
one compiled graph per batch size in `batch_sizes`, all compiled while the engine loads, which the
runtime does off the serving loop (the swapper's watcher thread); a batch of another size runs the
uncompiled copy rather than compiling in the middle of serving. On CUDA fp16 runs under autocast,
as in `torch-fp16`.

Inductor's artifacts (FX graph cache, generated C++/Triton kernels) go to a folder per key in the
version's engines/ directory, keyed like the TensorRT cache:

    VERSION/engines/torch-compile-<precision>-<key>/     TORCHINDUCTOR_CACHE_DIR and TRITON_CACHE_DIR
    VERSION/engines/torch-compile-<precision>-<key>.json the key's fields, the first compile's time

key = sha256 of (weights sha256, torch version, GPU name or "cpu", precision, input size, batch
sizes, number of sets). A restart, or a hot swap back to a version compiled before, then loads the
kernels from disk instead of generating and building them. Within one process Dynamo goes further:
the weights are inputs of the compiled graph, so a version of the same architecture and shapes
reuses the code compiled for another (a hot swap to a new adapted version loads in well under a
second, and writes nothing to its folder). `compile_s` and `cache` ("miss": compiled and written,
"hit": read from the folder, "in memory": reused in this process) on the engine say which
happened; a log line says it too. Inductor needs a C++ compiler (and Triton on a GPU); without
one, loading is one UserError.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import threading
import time
from pathlib import Path

import torch

from mas3_edge.errors import UserError

from .engines import TorchEngine

log = logging.getLogger(__name__)

_COMPILE_LOCK = threading.Lock()  # the cache folder is process-wide state (environment variables)


def compile_status(device: str = "cpu") -> tuple[bool, str]:
    """(usable, why): Inductor needs a working C++ compiler, and Triton for CUDA."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler
        get_cpp_compiler()
    except ImportError as e:
        return False, f"this torch has no Inductor ({e})"
    except Exception as e:  # InvalidCxxCompiler and friends
        return False, (f"torch.compile (Inductor) needs a C++ compiler and found none ({str(e).splitlines()[0]}); "
                       "install g++ (apt install g++) or use the torch engine")
    if device != "cpu":
        try:
            import triton  # noqa: F401
        except ImportError:
            return False, "torch.compile on CUDA needs Triton (pip install triton); or use torch-cudagraph"
    return True, "Inductor"


class _ShapeGuard:
    """Calls the compiled module for the batch sizes it was compiled for, the eager one otherwise,
    so serving never triggers a compile."""

    def __init__(self, compiled, eager, batches: set[int]):
        self.compiled, self.eager, self.batches = compiled, eager, batches

    def __call__(self, images):
        return (self.compiled if images.shape[0] in self.batches else self.eager)(images)


class CompiledEngine(TorchEngine):
    """TorchEngine whose folded network (or each set's folded copy) runs through torch.compile."""

    def __init__(self, net, version: str, device: str = "cpu", precision: str = "fp16",
                 batch_sizes: tuple[int, ...] = (1, 8), cache_dir: Path | None = None, key: dict | None = None):
        ok, why = compile_status("cpu" if str(device) == "cpu" else "cuda")
        if not ok:
            raise UserError(why)
        fp16 = str(device) != "cpu" and precision == "fp16"
        super().__init__(net, version, device, "fp16" if fp16 else "eager", (batch_sizes[0],))
        self.name, self.precision = "torch-compile", "fp16" if fp16 else "fp32"
        self.batch_sizes, self.key = tuple(sorted(set(batch_sizes))), key or {}
        copies = list(self._model.copies) if self._per_set else [self._model]
        guards = [_ShapeGuard(torch.compile(m, backend="inductor", dynamic=False), m, set(self.batch_sizes))
                  for m in copies]
        _raise_recompile_limit(len(copies) * len(self.batch_sizes))
        t0, before = time.perf_counter(), _cache_counts()
        with _COMPILE_LOCK, _inductor_cache(cache_dir):
            try:
                self._warm(guards)
            except Exception as e:  # a backend failure surfaces at the first call: one clear line
                raise UserError(f"torch.compile could not compile version {version}: "
                                f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
        self.compile_s = time.perf_counter() - t0
        hits, misses = (a - b for a, b in zip(_cache_counts(), before))
        self.cache = "hit" if hits and not misses else "miss" if misses else "in memory"
        if self._per_set:
            for i, g in enumerate(guards):
                self._model.copies[i] = _Wrapped(g)
        else:
            self._model = guards[0]
        self.provider += f", compiled (Inductor, batch {','.join(map(str, self.batch_sizes))})"
        log.info("torch-compile: %s ready in %.1f s (%s; %d graph(s), Inductor cache %s, cache %s)", version,
                 self.compile_s, self.provider, len(guards) * len(self.batch_sizes), cache_dir or "torch's default", self.cache)

    def _warm(self, guards: list[_ShapeGuard]) -> None:
        """Compile every copy at every batch size now, in the loader (not on the first frames)."""
        torch = self._torch
        for b in self.batch_sizes:
            x = torch.zeros((b, *self.input_size, 3), dtype=torch.uint8, device=self.device)
            for g in guards:
                with torch.inference_mode(), self._autocast():
                    g.compiled(x)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


class _Wrapped(torch.nn.Module):
    """A _ShapeGuard where PerSetFolded keeps an nn.Module per set."""

    def __init__(self, guard: _ShapeGuard):
        super().__init__()
        self.guard = guard

    def forward(self, images):
        return self.guard(images)


def load_compiled(vdir: Path, device: str = "cpu", precision: str = "fp16",
                  batch_sizes: tuple[int, ...] = (1, 8)) -> CompiledEngine:
    """The torch-compile engine of a version, its Inductor cache in the version's engines/ folder."""
    from mas3_edge.bundle import load_version
    ver = load_version(vdir)
    key, folder = cache_key(Path(vdir), ver, device, precision, batch_sizes)
    engine = CompiledEngine(ver.net, ver.id, device, precision, batch_sizes, folder, key)
    sidecar = folder.with_suffix(".json")
    if engine.cache == "in memory":  # compiled code of the same graph reused in this process: nothing written
        with contextlib.suppress(OSError):
            folder.rmdir()  # only if empty
    elif not sidecar.is_file():
        from mas3_edge.bundle import atomic_write_json
        atomic_write_json(sidecar, {"spec": key, "compile_s": round(engine.compile_s, 2), "cache": engine.cache,
                                    "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    return engine


def cache_key(vdir: Path, ver, device: str, precision: str, batch_sizes: tuple[int, ...]) -> tuple[dict, Path]:
    """The fields compiled kernels depend on, and the folder they are cached in."""
    from mas3_edge.export.sets import set_count
    from mas3_edge.export.tensorrt import ENGINE_DIR
    gpu = "cpu"
    if device != "cpu":
        from mas3_edge.export.tensorrt import gpu_name
        gpu = gpu_name(device)
    prec = "fp16" if device != "cpu" and precision == "fp16" else "fp32"
    key = {"weights_sha256": ver.meta["sha256"], "torch": torch.__version__, "device": gpu, "precision": prec,
           "input_size": list(ver.net.config.input_size), "batch_sizes": sorted(set(int(b) for b in batch_sizes)),
           "sets": set_count(ver.net)}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return key, vdir / ENGINE_DIR / f"torch-compile-{prec}-{digest}"


@contextlib.contextmanager
def _inductor_cache(folder: Path | None):
    """Inductor and Triton write (and look up) their artifacts under `folder` inside the block."""
    if folder is None:
        yield
        return
    folder.mkdir(parents=True, exist_ok=True)
    names = ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")
    saved = {n: os.environ.get(n) for n in names}
    os.environ["TORCHINDUCTOR_CACHE_DIR"], os.environ["TRITON_CACHE_DIR"] = str(folder), str(folder / "triton")
    clear = _clear_caches()
    clear()  # in-memory caches keyed without the folder must not answer for it
    try:
        yield
    finally:
        clear()
        for n, v in saved.items():
            if v is None:
                os.environ.pop(n, None)
            else:
                os.environ[n] = v


def _clear_caches():
    try:
        from torch._inductor.utils import clear_caches
        return clear_caches
    except ImportError:
        return lambda: None


def _cache_counts() -> tuple[int, int]:
    from torch._dynamo.utils import counters
    return counters["inductor"]["fxgraph_cache_hit"], counters["inductor"]["fxgraph_cache_miss"]


def _raise_recompile_limit(graphs: int) -> None:
    """Each set's copy and each batch size is one more compiled entry of the same code; past
    Dynamo's limit (8) it would silently run uncompiled."""
    import torch._dynamo.config as dc
    name = "recompile_limit" if hasattr(dc, "recompile_limit") else "cache_size_limit"
    if getattr(dc, name) < graphs + 2:
        setattr(dc, name, graphs + 2)
