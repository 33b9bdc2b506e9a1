"""`mas3-edge`: the one place that wires the packages together.

Heavy modules (torch, onnx, cv2, zmq) are imported inside the commands, so `--help` stays fast.
"""
from __future__ import annotations

import sys

import typer

from ..errors import UserError
from . import bench, core, data, export, runtime

app = typer.Typer(help="MAS3 source-free adaptation of segmentation models, on the device.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
core.register(app)
export.register(app)
runtime.register(app)
app.add_typer(data.app, name="data")
app.add_typer(bench.app, name="bench")


def main() -> None:
    """Console entry point: a UserError becomes one line on stderr and exit code 1."""
    try:
        app(standalone_mode=False)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except (typer.Abort, KeyboardInterrupt):
        print("aborted", file=sys.stderr)
        sys.exit(130)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except Exception as e:  # click usage errors carry their own formatting
        import click
        if isinstance(e, click.ClickException):
            e.show()
            sys.exit(e.exit_code)
        raise
