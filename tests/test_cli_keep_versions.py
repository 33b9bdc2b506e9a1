"""`mas3-edge run --keep-versions N`: the option exists, says what it keeps, and reaches the settings."""
from __future__ import annotations

from typer.testing import CliRunner

from mas3_edge.cli import app


def test_run_has_a_keep_versions_option_that_reaches_the_settings(tiny_bundle):
    runner = CliRunner()
    res = runner.invoke(app, ["run", "--help"], terminal_width=200)
    assert res.exit_code == 0 and "--keep-versions" in res.output and "always kept" in res.output
    res = runner.invoke(app, ["run", "--camera", "synthetic://night", "--bundle", str(tiny_bundle),
                              "--keep-versions", "5", "--print-config"])
    assert res.exit_code == 0 and "keep-versions = 5" in res.output, res.output
