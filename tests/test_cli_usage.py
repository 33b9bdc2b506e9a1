"""The installed `mas3-edge` console script as a user meets it: usage errors, exit codes, --version,
--json output for scripts, piped tables, and the packages the code imports being declared."""
import ast
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import cv2
import numpy as np
import pytest

from mas3_edge import synth

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = Path(sys.executable).parent / "mas3-edge"  # what `pip install -e .` puts beside the interpreter


def mas3(*args, cwd=None) -> subprocess.CompletedProcess:
    assert SCRIPT.is_file(), f"{SCRIPT} is missing: install the project (pip install -e .) first"
    return subprocess.run([str(SCRIPT), *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=120)


@pytest.mark.parametrize("args, message", [
    (["run"], "Missing option '--camera'"),
    (["adapt", "--bogus"], "No such option: --bogus"),
    (["versions", "--json", "extra"], "unexpected extra argument"),
])
def test_usage_errors_are_one_line_with_exit_2(args, message, tmp_path):
    res = mas3(*args, cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr and res.stderr.strip().count("\n") == 0
    assert res.stderr.startswith("error:") and message in res.stderr


def test_version_flag():
    res = mas3("--version")
    assert res.returncode == 0 and re.fullmatch(r"mas3-edge \d+\.\d+\.\d+\S*\n", res.stdout)


def test_verbose_is_one_thing(tmp_path, tiny_bundle):
    """-v is --verbose in every command; a version id is only ever --version."""
    for cmd in (["run", "--camera", "x"], ["adapt"], ["eval", "--data", "x"], ["export"]):
        help_text = mas3(*cmd, "--help").stdout
        assert "-v" in help_text and "--verbose" in help_text
        assert re.search(r"-v\s*,\s*--version|--version\s*,\s*-v", help_text) is None


def test_piped_tables_are_not_cut_and_json_parses(tiny_bundle):
    res = mas3("versions", "--bundle", tiny_bundle)  # stdout is a pipe here
    assert res.returncode == 0 and "…" not in res.stdout and "version" in res.stdout
    doc = json.loads(mas3("versions", "--bundle", tiny_bundle, "--json").stdout)
    assert [(v["version"], v["serving"]) for v in doc["versions"]] == [("v0001", True)]


def test_buffer_json_counts_frames(tmp_path):
    synth.write_folder(tmp_path / "f", "night", 3, seed=0, labels=False)
    doc = json.loads(mas3("buffer", "--buffer", tmp_path / "f" / "images", "--json").stdout)
    assert doc["frames"] == 3 and doc["bytes"] > 0


def test_eval_and_export_json(tmp_path, tiny_bundle):
    synth.write_folder(tmp_path / "val", "synthetic", 2, seed=3, size=(64, 128))
    res = mas3("eval", "--data", tmp_path / "val", "--bundle", tiny_bundle, "--json")
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["version"] == "v0001" and doc["images"] == 2 and 0 <= doc["miou"] <= 100
    res = mas3("export", "--bundle", tiny_bundle, "--json")
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["engines"][0]["engine"] == "onnx" and Path(doc["onnx"]).is_file()


def test_eval_refuses_labels_of_another_size(tmp_path, tiny_bundle):
    """Repro of the report: 256x128 images with 70x50 labels scored a meaningless mIoU and exit 0."""
    for sub in ("images", "labels"):
        (tmp_path / "d" / sub).mkdir(parents=True)
    cv2.imwrite(str(tmp_path / "d" / "images" / "a.png"), np.zeros((128, 256, 3), np.uint8))
    cv2.imwrite(str(tmp_path / "d" / "labels" / "a.png"), np.zeros((50, 70), np.uint8))
    res = mas3("eval", "--data", tmp_path / "d", "--bundle", tiny_bundle)
    assert res.returncode == 1 and res.stderr.count("\n") == 1
    assert "a.png: label is 70x50 but its image a.png is 256x128" in res.stderr


# import name -> distribution name, where they differ
_DIST = {"cv2": "opencv-python", "zmq": "pyzmq", "yaml": "pyyaml", "prometheus_client": "prometheus-client",
         "imagecorruptions": "imagecorruptions-imaug", "ot": "POT", "safetensors": "safetensors",
         "segmentation_models_pytorch": "segmentation-models-pytorch"}
_OWN = {"mas3_edge", "runtime", "export", "tools", "conftest"}


def _imports(folders) -> set[str]:
    names = set()
    for folder in folders:
        for path in (ROOT / folder).rglob("*.py"):
            tree = ast.parse(path.read_text())
            optional = {id(n) for t in ast.walk(tree) if isinstance(t, ast.Try) and any(  # try: import x / except ImportError
                isinstance(h.type, ast.Name) and h.type.id in ("ImportError", "ModuleNotFoundError") for h in t.handlers)
                for s in t.body for n in ast.walk(s)}
            for node in ast.walk(tree):
                if id(node) in optional:
                    continue
                elif isinstance(node, ast.Import):
                    names |= {a.name.split(".")[0] for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names.add(node.module.split(".")[0])
    local = {p.stem for folder in folders for p in (ROOT / folder).glob("*.py")}  # sibling scripts
    return names - set(sys.stdlib_module_names) - _OWN - local


def _declared(requirements) -> set[str]:
    return {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower() for r in requirements}


def test_every_imported_package_is_declared():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime = _declared(project["dependencies"])
    extras = set().union(*(_declared(v) for v in project["optional-dependencies"].values()))
    for name in _imports(["mas3_edge", "runtime", "export"]):
        dist = _DIST.get(name, name).lower()
        assert dist in runtime | extras, f"the package code imports {name} but pyproject.toml does not declare {dist}"
    for name in _imports(["tests", "tools"]):
        dist = _DIST.get(name, name).lower()
        assert dist in runtime | extras, f"tests/tools import {name} but no extra of pyproject.toml declares {dist}"


def test_every_subpackage_is_installed():
    """An editable install finds every folder; a wheel holds only the packages pyproject lists."""
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "mas3_edge").rglob("__init__.py")}
    assert found <= listed, f"subpackages missing from pyproject.toml's packages: {sorted(found - listed)}"


def test_eval_subset_scores_only_its_classes(tmp_path, tiny_bundle):
    synth.write_folder(tmp_path / "val", "synthetic", 2, seed=3, size=(64, 128))
    doc = json.loads(mas3("eval", "--data", tmp_path / "val", "--bundle", tiny_bundle, "--subset", "synthia13",
                          "--json").stdout)
    assert len(doc["per_class_iou"]) <= 13 and doc["classes_scored"]
    res = mas3("eval", "--data", tmp_path / "val", "--bundle", tiny_bundle, "--subset", "synthia7")
    assert res.returncode == 1 and "--subset must be synthia16 or synthia13" in res.stderr


@pytest.mark.parametrize("args, message", [
    (["--metrics-port", "99999"], "--metrics-port must be a port in 0..65535"),
    (["--metrics-port", "-5"], "--metrics-port must be a port in 0..65535"),
    (["--publish", "tcp://127.0.0.1:99999"], "port 99999 is not in 1..65535"),
    (["--fps", "-1"], "--fps must be 0 (unpaced) or more, got -1.0"),
    (["--overlay-fps", "-2"], "--overlay-fps must be 0 (every frame) or more, got -2.0"),
    (["--duration", "-1"], "--duration must be more than 0"),
    (["--duration", "0"], "--duration must be more than 0"),
    (["--max-frames", "0"], "--max-frames must be at least 1"),
    (["--threads", "0"], "--threads must be at least 1"),
    (["--buffer-every", "0"], "--buffer-every must be at least 1"),
    (["--status-every", "nan"], "--status-every must be more than 0"),
    (["--health-timeout", "inf"], "--health-timeout must be more than 0"),
    (["--round-frames", "1"], "--round-frames must be at least 2"),
    (["--fleet-judge-gap", "-1"], "--fleet-judge-gap must be 0 or more"),
    (["--gmm-weight", "1.5"], "gmm weight must be in [0, 1)"),
    (["--sentinel-margin", "nan"], "sentinel margin must be a number"),
])
def test_bad_numbers_of_run_are_one_line_and_exit_1(args, message, tmp_path, tiny_bundle):
    res = mas3("run", "--camera", "synthetic://night", "--bundle", tiny_bundle, "--no-buffer", "--no-adapt",
               *args, cwd=tmp_path)
    assert res.returncode == 1, res.stderr
    assert res.stderr.count("\n") == 1 and res.stderr.startswith("error: ") and message in res.stderr, res.stderr


def test_bad_numbers_in_a_config_file_are_caught_too(tmp_path):
    (tmp_path / "robot.toml").write_text('camera = "synthetic://night"\nmetrics-port = 70000\n')
    res = mas3("run", "--config", tmp_path / "robot.toml", cwd=tmp_path)
    assert res.returncode == 1
    assert res.stderr == "error: --metrics-port must be a port in 0..65535 (0: any free one), got 70000\n"


@pytest.mark.parametrize("args, message", [
    (["--count", "0"], "--count must be at least 1"),
    (["--duration", "-1"], "--duration must be more than 0"),
    (["--interval", "0"], "--interval must be more than 0"),
    (["--max-mb", "-1", "--record", "out.mcap"], "--max-mb must be more than 0"),
    (["--address", "tcp://127.0.0.1:99999"], "port 99999 is not in 1..65535"),
    (["--address", "tcp://127.0.0.1"], "is not tcp://HOST:PORT"),
])
def test_bad_numbers_of_subscribe_are_one_line_and_exit_1(args, message, tmp_path):
    res = mas3("subscribe", *args, cwd=tmp_path)
    assert res.returncode == 1, res.stderr
    assert res.stderr.count("\n") == 1 and message in res.stderr and not (tmp_path / "out.mcap").exists()


@pytest.mark.parametrize("camera, message", [
    ("7", "error: no camera at index 7 "),
    ("0", "error: no camera at index 0 "),
    ("rtsp://127.0.0.1:1/stream", "error: cannot open stream rtsp://127.0.0.1:1/stream"),
])
def test_a_missing_camera_is_one_line_without_opencv_noise(camera, message, tmp_path, tiny_bundle):
    if camera.isdigit() and Path(f"/dev/video{camera}").exists():
        pytest.skip(f"this machine has /dev/video{camera}")
    res = mas3("run", "--camera", camera, "--bundle", tiny_bundle, "--no-buffer", "--no-adapt", cwd=tmp_path)
    assert res.returncode == 1 and res.stderr.startswith(message) and res.stderr.count("\n") == 1, res.stderr
