"""Command-line options made from the config dataclasses, so that `adapt`, `run` and the config
file share one definition of every round setting (its name, type, default and help)."""
from __future__ import annotations

import functools
import inspect
import typing
from dataclasses import fields
from typing import Annotated, Optional

import typer


def _option(f, hint, panel: str, alias: str | None):
    kind = next(a for a in (typing.get_args(hint) or (hint,)) if a is not type(None))
    names = [f.metadata.get("flag") or "--" + f.name.replace("_", "-")] + ([alias] if alias else [])
    shown = "the method's" if f.default is None else str(f.default).lower() if kind is bool else str(f.default)
    return Annotated[Optional[kind], typer.Option(*names, help=f.metadata.get("help", ""), show_default=shown,
                                                  rich_help_panel=panel)]


def with_settings(*classes, aliases: dict[str, str] | None = None):
    """Give a command one option per field of `classes`; the command receives the ones set on the
    command line (or in its config file) as `settings`, a dict, and the rest keep their defaults.
    Every option defaults to None (unset), so a method's own row and the CPU sizing can tell an
    explicit value from a default."""
    aliases = aliases or {}
    specs = [(f, typing.get_type_hints(cls)[f.name], cls.__name__.removesuffix("Config"))
             for cls in classes for f in fields(cls)]

    def wrap(command):
        sig = inspect.signature(command, eval_str=True)
        own = [p for name, p in sig.parameters.items() if name != "settings"]
        extra = {f.name: _option(f, hint, f"{panel} settings", aliases.get(f.name)) for f, hint, panel in specs}

        @functools.wraps(command)
        def wrapper(*args, **kwargs):
            settings = {name: kwargs.pop(name) for name in extra if name in kwargs}
            return command(*args, **kwargs, settings={k: v for k, v in settings.items() if v is not None})

        # typer reads the options from the signature; typeshed's functools.wraps type declares no __signature__
        wrapper.__signature__ = sig.replace(parameters=own + [  # type: ignore[attr-defined]
            inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=hint)
            for name, hint in extra.items()])
        wrapper.__annotations__ = {p.name: p.annotation for p in own} | extra
        return wrapper
    return wrap


PrecisionOpt = Annotated[Optional[str], typer.Option(
    help="fp32, fp16 or int8. int8: ONNX Runtime on a CPU serves the version's INT8 graph (calibrated on "
         "the frames it has seen, checked against fp32), fp32 where there is none or it failed its check; "
         "fp16: GPU engines (default there). An engine that serves another precision says so in one line.")]


def check_precision(value: str | None) -> str | None:
    """The --precision value, or one error line naming the choices."""
    from mas3_edge.errors import UserError
    from mas3_edge.runtime.engines import PRECISIONS
    if value is not None and value not in PRECISIONS:
        raise UserError(f"--precision must be one of {', '.join(PRECISIONS)}, got {value!r}")
    return value


def sizing_note(changed: dict) -> str:
    """What the CPU sizing changes, as one line."""
    return ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items())
