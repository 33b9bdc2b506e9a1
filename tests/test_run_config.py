"""`mas3-edge run --config robot.toml`: a TOML file of run's options, overridden by the command line."""
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

SCRIPT = Path(sys.executable).parent / "mas3-edge"


def run(*args, cwd=None):
    return subprocess.run([str(SCRIPT), "run", *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=180)


def test_config_sets_defaults_and_the_command_line_wins(tmp_path):
    cfg = tmp_path / "robot.toml"
    cfg.write_text('camera = "synthetic://night"\nround-every-frames = 60\nloop = true\nfps = 5\n')
    res = run("--config", cfg, "--fps", "7", "--print-config")
    assert res.returncode == 0, res.stderr
    merged = tomllib.loads(res.stdout)
    assert merged["camera"] == "synthetic://night" and merged["round-every-frames"] == 60
    assert merged["loop"] is True and merged["fps"] == 7.0 and "method" not in merged  # unset: the default
    assert "# a round on a CPU also takes, for what is unset here: steps 100 -> 30" in res.stdout
    again = tmp_path / "again.toml"  # what --print-config prints is itself a valid config
    again.write_text(res.stdout)
    assert tomllib.loads(run("--config", again, "--print-config").stdout) == merged


def test_device_index_as_an_integer(tmp_path):
    (tmp_path / "c.toml").write_text("camera = 0\n")
    res = run("--config", tmp_path / "c.toml", "--print-config")
    assert res.returncode == 0 and 'camera = "0"' in res.stdout


@pytest.mark.parametrize("text, message", [
    ("cammera = 1\n", "unknown key 'cammera'"),
    ('fps = "fast"\n', "key 'fps' must be a number"),
    ("adapt = 1\n", "key 'adapt' must be true or false"),
    ("round-every-frames = 1.5\n", "key 'round-every-frames' must be an integer"),
    ("buffer = 3\n", "key 'buffer' must be a path"),
    ("[camera]\nx = 1\n", "key 'camera' must be a string"),
    ("fps = \n", "is not valid TOML"),
])
def test_bad_config_is_one_line_naming_the_key(tmp_path, text, message):
    (tmp_path / "bad.toml").write_text(text)
    res = run("--config", tmp_path / "bad.toml")
    assert res.returncode == 1 and res.stderr.count("\n") == 1 and message in res.stderr, res.stderr


def test_missing_config_file(tmp_path):
    res = run("--config", tmp_path / "nope.toml")
    assert res.returncode == 1 and "cannot read the config file" in res.stderr


def test_the_service_runs_with_the_file(tmp_path, tiny_bundle):
    (tmp_path / "r.toml").write_text(f'camera = "synthetic://night"\nmax-frames = 3\nno-buffer = true\n'
                                     f'bundle = "{tiny_bundle}"\npublish = "ipc://{tmp_path}/s"\nstatus-every = 100\n'
                                     'engine = "torch"\n')
    res = run("--config", tmp_path / "r.toml", cwd=tmp_path)
    assert res.returncode == 0 and "stopped after 3 frames" in res.stdout + res.stderr, res.stderr


def test_the_rounds_tau_is_an_option_checked_before_serving(tmp_path, tiny_bundle):
    """A model whose classifier is rarely 0.97 sure (imported, briefly trained) needs rounds at a lower τ."""
    cfg = tmp_path / "r.toml"
    cfg.write_text("camera = \"synthetic://night\"\ntau = 0.5\n")
    assert tomllib.loads(run("--config", cfg, "--print-config").stdout)["tau"] == 0.5
    bad = run("--camera", "synthetic://night", "--bundle", tiny_bundle, "--tau", "1.5", "--duration", "1")
    assert bad.returncode == 1 and "tau must be in [0, 1)" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1


def test_a_robots_config_sets_any_round_setting_and_a_missing_sentinel_is_refused_before_serving(tmp_path):
    cfg = tmp_path / "r.toml"
    cfg.write_text(f'camera = "synthetic://night"\nchoice-margin = 0.05\nmax-sets = 3\nretained-floor = 0.2\n'
                   f'sentinel = "{tmp_path}"\n')
    merged = tomllib.loads(run("--config", cfg, "--print-config").stdout)
    assert (merged["choice-margin"], merged["max-sets"], merged["retained-floor"]) == (0.05, 3, 0.2)
    assert merged["sentinel"] == str(tmp_path)
    bad = run("--camera", "synthetic://night", "--sentinel", tmp_path / "nope", "--duration", "1")
    assert bad.returncode == 1 and len(bad.stderr.strip().splitlines()) == 1 and "sentinel folder" in bad.stderr
