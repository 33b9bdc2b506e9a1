"""On-device runtime: inference engines, camera, publisher, scheduler, hot swap.

Kept import-free on purpose: `import mas3_edge.runtime.engines` (or any sibling) pulls in only what it needs,
so the CLI and the serving loop stay fast to start. `runtime.Subscriber` and `runtime.load_engine`
resolve lazily.
"""
_LAZY = {"Subscriber": "mas3_edge.runtime.subscriber", "Publisher": "mas3_edge.runtime.publisher", "load_engine": "mas3_edge.runtime.engines"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'runtime' has no attribute {name!r}")
