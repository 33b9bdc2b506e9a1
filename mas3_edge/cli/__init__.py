"""`mas3-edge`: the one place that wires the packages together.

Heavy modules (torch, onnx, cv2, zmq) are imported inside the commands, so `--help` stays fast.

Exit codes (also in the README): 0 done, 1 a user error (bad path, bad file, bad value),
2 a usage error (unknown or missing option), 3 an adaptation round was rejected (the serving version
is unchanged), 130 interrupted.
"""
from __future__ import annotations

import sys
from typing import Annotated, Optional, cast

import typer

from ..errors import UserError
from . import bench, core, data, export, fleet, models, runtime

EXIT_USER, EXIT_USAGE, EXIT_REJECTED, EXIT_INTERRUPTED = 1, 2, 3, 130
# typer >= 0.29 bundles its own click and no longer installs `click`; reach the base class through typer.
# (typed as Exception: its module differs between the typer versions we support; it has exit_code)
_CLICK_ERROR = cast("type[Exception]", next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException"))

app = typer.Typer(help="MAS3 source-free adaptation of segmentation models, on the device.\n\n"
                       "Exit codes: 0 done, 1 user error, 2 usage error, 3 round rejected, 130 interrupted.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version
        try:
            typer.echo(f"mas3-edge {version('mas3-edge')}")
        except PackageNotFoundError:
            typer.echo("mas3-edge (not installed)")
        raise typer.Exit(0)


@app.callback()
def _root(show_version: Annotated[Optional[bool], typer.Option(
        "--version", callback=_print_version, is_eager=True, help="Print the version and exit.")] = None) -> None:
    """MAS3 source-free adaptation of segmentation models, on the device."""


core.register(app)
export.register(app)
models.register(app)
runtime.register(app)
app.add_typer(data.app, name="data")
app.add_typer(bench.app, name="bench")
app.add_typer(fleet.app, name="fleet")


def _usage_line(e) -> str:
    """click's usage error as one line: the message and where to look."""
    ctx = getattr(e, "ctx", None)
    where = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
    return f"error: {e.format_message()}{where}"


def main() -> None:
    """Console entry point: every error becomes one line on stderr and a documented exit code."""
    try:
        code = app(standalone_mode=False)  # without standalone mode click returns typer.Exit's code
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_USER)
    except (typer.Abort, KeyboardInterrupt):
        print("aborted", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except _CLICK_ERROR as e:
        print(_usage_line(e), file=sys.stderr)
        status = getattr(e, "exit_code", EXIT_USAGE)
        sys.exit(EXIT_USAGE if status == 2 else status)
    sys.exit(code if isinstance(code, int) else 0)
