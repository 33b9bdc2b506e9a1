"""`mas3-edge bench`: the benchmarks of tools/, run from a source checkout with arguments passed on.

tools/ is not part of the installed package, so a command finds its script next to the package
(an editable install of a checkout) and runs it in this process, as `python tools/NAME.py ARGS`.
"""
from __future__ import annotations

import runpy
import sys
from pathlib import Path

import typer

from ..errors import UserError

app = typer.Typer(help="Benchmarks from a source checkout (tools/); options go to the script.",
                  no_args_is_help=True)
# Every option, --help included, belongs to the script: click must not parse or answer any of them.
_PASS_ON = {"allow_extra_args": True, "ignore_unknown_options": True}


def tool_path(name: str) -> Path:
    """tools/NAME.py of the checkout this package runs from (mas3_edge/cli/ -> the repository root)."""
    return Path(__file__).resolve().parents[2] / "tools" / f"{name}.py"


def run_tool(name: str, args: list[str]) -> None:
    """Run tools/NAME.py with `args` as its command line; a missing script is one clear UserError."""
    path = tool_path(name)
    if not path.is_file():
        raise UserError(f"{path} not found: `mas3-edge bench` runs tools/ of a source checkout, which an "
                        "installed wheel does not have; clone the repository and `pip install -e .` there")
    argv, sys.argv = sys.argv, [str(path), *args]
    sys.path.insert(0, str(path.parent))  # as `python tools/NAME.py` would: tools import their neighbours
    try:
        runpy.run_path(str(path), run_name="__main__")
    finally:
        sys.argv = argv
        sys.path.remove(str(path.parent))


@app.command("quality", context_settings=_PASS_ON, add_help_option=False)
def quality(ctx: typer.Context) -> None:
    """Adaptation quality of every method on every target (tools/bench_quality.py; --help: its options)."""
    run_tool("bench_quality", ctx.args)


@app.command("continual", context_settings=_PASS_ON, add_help_option=False)
def continual(ctx: typer.Context) -> None:
    """A stream of domains, predicted then adapted on, round after round (tools/bench_continual.py)."""
    run_tool("bench_continual", ctx.args)


@app.command("ablations", context_settings=_PASS_ON, add_help_option=False)
def ablations(ctx: typer.Context) -> None:
    """The paper's tau and lambda ablations and the embedding picture (tools/ablations.py)."""
    run_tool("ablations", ctx.args)
