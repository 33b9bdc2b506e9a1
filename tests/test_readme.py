"""The README (and the pages under docs/) show only commands that exist, and the README stays a
newcomer's page.

Every `mas3-edge ...` line in a code block (and `torchrun ... -m mas3_edge ...`) must name real
subcommands and only options those commands have: the typer app is introspected, so a renamed or
dropped option fails here before a reader types it. The README must not cite tickets ("issue 15",
"#15": docs describe the project, not its tracker) and must stay under 300 lines.
"""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import typer

from mas3_edge.cli import app

ROOT = Path(__file__).parents[1]
README = ROOT / "README.md"
PAGES = sorted((ROOT / "docs").glob("*.md"))  # the reference pages; docs/results/ quotes past runs
MAX_LINES = 300
_BLOCK = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
_TICKET = re.compile(r"\b(?:issue|ticket|PR)s?\s*#?\d+|(?<![\w&/#])#\d+\b", re.I)


def code_blocks(text: str) -> list[str]:
    return _BLOCK.findall(text)


def shown_commands(text: str) -> list[list[str]]:
    """The `mas3-edge` command lines of the text's code blocks, as argv lists (comments dropped,
    backslash continuations joined; `torchrun ... -m mas3_edge ARGS` counts as `mas3-edge ARGS`)."""
    out = []
    for block in code_blocks(text):
        for line in block.replace("\\\n", " ").splitlines():
            try:
                argv = shlex.split(line, comments=True)
            except ValueError:  # not shell (a TOML or C++ block)
                continue
            if "-m" in argv and argv.index("-m") + 1 < len(argv) and argv[argv.index("-m") + 1] == "mas3_edge":
                argv = ["mas3-edge", *argv[argv.index("-m") + 2:]]
            if argv[:1] == ["mas3-edge"]:
                out.append(argv)
    return out


def _option_names(command) -> set[str]:
    names = {"--help"}
    for p in command.params:
        if getattr(p, "param_type_name", "") == "option":
            names.update(p.opts)
            names.update(p.secondary_opts)
    return names


def problems(argv: list[str]) -> list[str]:
    """What is wrong with one shown command line: an unknown subcommand, or options its command lacks."""
    command, path, i = typer.main.get_command(app), ["mas3-edge"], 1
    while hasattr(command, "commands") and i < len(argv) and not argv[i].startswith("-"):
        sub = command.commands.get(argv[i])
        if sub is None:
            return [f"`{' '.join(path)}` has no command {argv[i]!r}"]
        command, path, i = sub, [*path, argv[i]], i + 1
    known = _option_names(command)
    return [f"`{' '.join(path)}` has no option {tok.split('=')[0]}" for tok in argv[i:]
            if tok.startswith("-") and len(tok) > 1 and not tok[1].isdigit() and tok.split("=")[0] not in known]


def test_the_checker_catches_made_up_commands_and_options():
    assert problems(shlex.split("mas3-edge run --camera 0 --bundle b --round-every-frames 60")) == []
    assert problems(shlex.split("mas3-edge data synth --domain night --n 5 --out d")) == []
    assert problems(shlex.split("mas3-edge run --camera=0 -b bundle -v --no-adapt")) == []
    assert problems(shlex.split("mas3-edge --version")) == []
    assert problems(shlex.split("mas3-edge run --camera 0 --made-up-option 3")) == [
        "`mas3-edge run` has no option --made-up-option"]
    assert problems(shlex.split("mas3-edge data synth --out d --camera 0")) == [
        "`mas3-edge data synth` has no option --camera"]
    assert problems(shlex.split("mas3-edge serve --camera 0")) == ["`mas3-edge` has no command 'serve'"]


def test_the_parser_reads_continuations_comments_and_torchrun():
    text = ("```bash\nmas3-edge import --arch tiny \\\n    --weights w.pt   # a comment --not-an-option\n"
            "torchrun --standalone -m mas3_edge train --data d\necho mas3-edge\n```\n"
            "mas3-edge run --outside-a-block\n")
    assert shown_commands(text) == [["mas3-edge", "import", "--arch", "tiny", "--weights", "w.pt"],
                                    ["mas3-edge", "train", "--data", "d"]]


@pytest.mark.parametrize("page", [README, *PAGES], ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shown_command_exists_with_every_option_it_shows(page: Path):
    shown = shown_commands(page.read_text())
    found = [msg for argv in shown for msg in problems(argv)]
    assert not found, f"{page.name}: " + "; ".join(found)


def test_the_readme_shows_the_main_commands():
    shown = {tuple(argv[1:2]) for argv in shown_commands(README.read_text())}
    assert {("run",), ("subscribe",), ("demo",), ("adapt",), ("export",), ("train",)} <= shown


def test_the_ticket_pattern_catches_references_and_spares_anchors():
    for text in ("see issue 15", "Issue 15's floor", "(#12)", "fixed in #7", "issues 13 and 14", "PR 3"):
        assert _TICKET.search(text), text
    for text in ("[labels](wire-format.md#label-sets)", "# a comment", "&#8212;", "v0001", "C#", "#define"):
        assert not _TICKET.search(text), text


@pytest.mark.parametrize("page", [README, *PAGES], ids=lambda p: str(p.relative_to(ROOT)))
def test_no_ticket_references(page: Path):
    hits = [line.strip() for line in page.read_text().splitlines() if _TICKET.search(line)]
    assert not hits, f"{page.name} cites tickets: {hits[:3]}"


def test_the_readme_stays_short():
    lines = README.read_text().count("\n")
    assert lines < MAX_LINES, f"README.md has {lines} lines; move the long forms to docs/"


def test_every_threshold_the_algorithm_page_names_is_a_config_field():
    """docs/algorithm.md's thresholds table names `AdaptConfig.x` / `RoundConfig.x`: each must exist
    with the value the table gives (the first number of its value column)."""
    from dataclasses import fields

    from mas3_edge import config
    text = (ROOT / "docs" / "algorithm.md").read_text()
    table = text.split("<!-- thresholds: keep in sync with mas3_edge/config.py -->")[1]
    named = re.findall(r"`(AdaptConfig|RoundConfig)\.(\w+)`", table)
    assert len(named) >= 10
    for cls, name in named:
        assert name in {f.name for f in fields(getattr(config, cls))}, f"{cls}.{name} is not a setting"
    for line in table.splitlines():
        m = re.search(r"`(AdaptConfig|RoundConfig)\.(\w+)`", line)
        if m and line.startswith("|"):
            shown = re.search(r"\d+(\.\d+)?", line.split("|")[2])
            value = getattr(getattr(config, m.group(1))(), m.group(2))
            if shown and isinstance(value, (int, float)) and "%" not in line.split("|")[2]:
                assert float(shown.group()) == pytest.approx(float(value)), line
