import json
import os

import pytest
import torch

from mas3_edge import bundle
from mas3_edge.errors import UserError


def test_save_load_round_trip_and_lineage(tiny_bundle, small_net):
    v1 = bundle.load_version(tiny_bundle)
    assert v1.id == "v0001" and v1.meta["parent"] is None
    for k, v in small_net.state_dict().items():
        assert torch.equal(v, v1.net.state_dict()[k])
    v2dir = bundle.save_version(tiny_bundle, v1.net, parent=v1, serve=False)
    v2 = bundle.load_version(tiny_bundle, "v0002")
    assert v2.meta["parent"] == "v0001" and v2.meta["source_sha256"] == v1.meta["sha256"]
    assert bundle.serving_id(tiny_bundle) == "v0001"  # serve=False leaves the pointer
    bundle.set_serving(tiny_bundle, v2dir.name)
    assert bundle.load_version(tiny_bundle).id == "v0002"
    assert not any(p.name.startswith(".tmp") for p in (tiny_bundle / "versions").iterdir())


def test_corrupt_weights_and_missing_versions_are_clear_errors(tiny_bundle):
    w = tiny_bundle / "versions" / "v0001" / "model.safetensors"
    w.write_bytes(w.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(UserError, match="corrupt"):
        bundle.load_version(tiny_bundle)
    w.unlink()
    with pytest.raises(UserError, match="no weights"):
        bundle.load_version(tiny_bundle)
    with pytest.raises(UserError, match="no version"):
        bundle.load_version(tiny_bundle, "v0042")
    with pytest.raises(UserError, match="does not exist"):
        bundle.resolve(tiny_bundle / "nowhere")
    with pytest.raises(UserError, match="no version"):
        bundle.set_serving(tiny_bundle, "v0042")


def test_corrupt_version_is_skipped_in_listing(tiny_bundle, small_net):
    bundle.save_version(tiny_bundle, small_net)
    (tiny_bundle / "versions" / "v0001" / "model.json").write_text("{not json")
    with pytest.warns(UserWarning, match="v0001"):
        ids = [m["version"] for m in bundle.list_versions(tiny_bundle)]
    assert ids == ["v0002"]


def test_failed_save_leaves_no_partial_version(tiny_bundle, small_net, monkeypatch):
    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(bundle, "atomic_write_json", boom)
    with pytest.raises(OSError):
        bundle.save_version(tiny_bundle, small_net)
    assert sorted(os.listdir(tiny_bundle / "versions")) == ["v0001"]
    assert bundle.serving_id(tiny_bundle) == "v0001"


def test_atomic_write_replaces_whole_file(tmp_path):
    p = tmp_path / "x.json"
    bundle.atomic_write_json(p, {"a": 1})
    bundle.atomic_write_json(p, {"a": 2})
    assert json.loads(p.read_text()) == {"a": 2} and len(list(tmp_path.iterdir())) == 1


def test_default_bundle_is_copied_once_to_a_writable_home(tmp_path, tiny_bundle, monkeypatch, capsys):
    monkeypatch.setattr(bundle, "PACKAGED", tiny_bundle)
    monkeypatch.setenv("MAS3_EDGE_HOME", str(tmp_path / "home"))
    first = bundle.user_bundle(None)
    assert first == tmp_path / "home" / "bundle" and bundle.load_version(first).id == "v0001"
    assert "using the default bundle" in capsys.readouterr().err
    (first / "marker").write_text("kept")  # a second call reuses the copy (adapted versions live there)
    assert (bundle.user_bundle(None) / "marker").read_text() == "kept"
    assert bundle.user_bundle(tmp_path / "mine") == tmp_path / "mine"
    (first / "SERVING").unlink()  # a lost pointer: the copy, with its adapted versions, stays
    assert (bundle.user_bundle(None) / "marker").read_text() == "kept"


def test_missing_default_bundle_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(bundle, "PACKAGED", tmp_path / "absent")
    monkeypatch.setenv("MAS3_EDGE_HOME", str(tmp_path / "home"))
    with pytest.raises(UserError, match="no default bundle"):
        bundle.user_bundle(None)


def test_written_files_and_versions_are_readable_by_others(tmp_path, small_net):
    vdir = bundle.save_version(tmp_path / "b", small_net)
    assert vdir.stat().st_mode & 0o005 == 0o005
    assert (vdir / "model.json").stat().st_mode & 0o004
