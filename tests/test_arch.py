"""Networks we did not write: each family split into z and a 1×1 h gives the original network's
logits; foreign weights import with checks; the bank applies to their batch norms; bad input is
one clear error."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from torch import nn

from mas3_edge import arch, bank, stats
from mas3_edge.errors import UserError
from mas3_edge.labels import CITYSCAPES, LabelSet
from mas3_edge.model import DomainNorm

pytest.importorskip("torchvision")
pytest.importorskip("segmentation_models_pytorch")

FOUR = LabelSet("yard4", ("ground", "wall", "sky", "thing"), ((128, 64, 128), (70, 70, 70), (70, 130, 180), (220, 20, 60)))
SIZE = (64, 128)


def original(name: str, k: int) -> nn.Module:
    """The network as its library builds it, with its batch norms' statistics made non-trivial."""
    import segmentation_models_pytorch as smp
    from torchvision.models import segmentation as tv

    import own_net
    torch.manual_seed(0)
    family, *parts = name.split(":")
    if family == "torchvision":
        kw = {} if parts[0].startswith("lraspp") else {"aux_loss": True}  # the aux head is dropped on import
        m = getattr(tv, parts[0])(weights=None, weights_backbone=None, num_classes=k, **kw)
    elif family == "smp":
        m = getattr(smp, parts[0])(encoder_name=parts[1], encoder_weights=None, classes=k)
    else:
        m = getattr(own_net, parts[1])(k)[0]
    with torch.no_grad():
        for bn in m.modules():
            if isinstance(bn, nn.BatchNorm2d):
                bn.running_mean.uniform_(-0.5, 0.5), bn.running_var.uniform_(0.5, 2), bn.weight.uniform_(0.5, 1.5)
    return m.eval()


def reference_logits(m: nn.Module, x: torch.Tensor, align: bool) -> torch.Tensor:
    out = m(x)
    out = out["out"] if isinstance(out, dict) else out
    return nn.functional.interpolate(out, size=x.shape[-2:], mode="bilinear", align_corners=align)


FAMILIES = ["torchvision:lraspp_mobilenet_v3_large", "torchvision:deeplabv3_mobilenet_v3_large",
            "torchvision:fcn_resnet50", "smp:Unet:resnet18", "smp:FPN:resnet18", "smp:DeepLabV3Plus:resnet18",
            "python:own_net:small"]


@pytest.mark.parametrize("name", FAMILIES)
def test_the_split_gives_the_original_logits_and_the_bank_covers_its_batch_norms(name):
    k = 4
    m = original(name, k)
    net = arch.build(arch.model_config(name, FOUR, SIZE), FOUR).eval()
    arch.import_weights(net, m.state_dict(), "test weights")
    x = torch.randn(2, 3, *SIZE)
    with torch.no_grad():
        got, want = net(x), reference_logits(m, x, align=False)  # (only LR-ASPP's logits need resizing here)
        z = net.embed(x)
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()
    assert net.head.kernel_size == (1, 1) and z.shape[1] == net.config.embed_dim == net.head.in_channels
    bns = [b for n, b in m.named_modules() if isinstance(b, nn.BatchNorm2d) and not n.startswith("aux_classifier")]
    assert len(bank.norms(net)) == len(bns) and not any(type(b) is nn.BatchNorm2d for b in net.modules())
    assert sum(n.lead for n in bank.norms(net)) == 1


@pytest.mark.parametrize("name", ["torchvision:lraspp_mobilenet_v3_large", "smp:Unet:resnet18", "python:own_net:small"])
def test_the_router_reads_the_first_batch_norm_the_input_reaches(name):
    net = arch.build(arch.model_config(name, FOUR, SIZE), FOUR).eval()
    seen = []
    hooks = [m.register_forward_pre_hook(lambda mod, args: seen.append((mod, args[0]))) for m in bank.norms(net)]
    images = torch.randint(0, 255, (2, *SIZE, 3), dtype=torch.uint8)
    with torch.no_grad():
        net(net.normalize(images))
    for h in hooks:
        h.remove()
    first, h_in = seen[0]
    assert first.lead and torch.equal(net.stem(images), h_in)


def test_an_adapted_set_leaves_the_source_set_of_an_imported_network_as_it_was():
    name = "torchvision:lraspp_mobilenet_v3_large"
    net = arch.build(arch.model_config(name, FOUR, SIZE), FOUR).eval()
    arch.import_weights(net, original(name, 4).state_dict(), "w")
    bright = torch.randint(150, 255, (4, *SIZE, 3), dtype=torch.uint8)
    dark = torch.randint(0, 60, (4, *SIZE, 3), dtype=torch.uint8)
    with torch.no_grad():
        before = net(net.normalize(bright))
    stats.reestimate(net, dark.numpy())
    net.eval()
    with torch.no_grad():
        after = net(net.normalize(bright))
        routes = bank.route(net, net.stem(torch.cat([bright, dark])))
    assert routes.tolist() == [0] * 4 + [1] * 4  # bright frames to the source set, dark ones to the new one
    assert torch.allclose(before, after, atol=1e-4)


def _cli(*args, cwd=None):
    env = {"PYTHONPATH": str(Path(__file__).parent), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "mas3_edge", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd)


def _weights(tmp_path: Path, name: str, k: int, suffix: str = ".safetensors") -> Path:
    path = tmp_path / f"w{suffix}"
    state = {k_: v.contiguous() for k_, v in original(name, k).state_dict().items()}
    safetensors.torch.save_file(state, path) if suffix == ".safetensors" else torch.save(state, path)
    return path


def test_import_writes_the_first_version_with_its_label_set(tmp_path):
    name = "python:own_net:small"
    labels = tmp_path / "labels.json"
    labels.write_text(FOUR.to_json())
    r = _cli("import", "--arch", name, "--weights", _weights(tmp_path, name, 4, ".pt"), "--labels", labels,
             "--bundle", tmp_path / "b", "--input-size", "64x128", "--json")
    assert r.returncode == 0, r.stderr
    from mas3_edge import bundle
    ver = bundle.load_version(tmp_path / "b")
    assert ver.net.labels == FOUR and ver.meta["labels"]["label_set"] == "yard4" and ver.meta["info"]["kind"] == "imported"
    assert ver.net.config.arch == name and ver.net.config.embed_dim == 12
    again = _cli("import", "--arch", name, "--weights", tmp_path / "w.pt", "--labels", labels, "--bundle", tmp_path / "b")
    assert again.returncode == 1 and "already has versions" in again.stderr
    assert bundle.version_ids(tmp_path / "b") == ["v0001"]  # nothing overwritten


@pytest.mark.parametrize("case, message", [
    ("arch:python:own_net:no_batchnorm", "has no batch-norm layer"),
    ("arch:python:own_net:wrong_name", "has no classifier 'classifier'"),
    ("arch:python:own_net:wide_classifier", "is not a 1x1 Conv2d"),
    ("arch:python:own_net:missing", "cannot find missing in module own_net"),
    ("arch:torchvision:resnet50", "unknown --arch 'torchvision:resnet50'"),
    ("labels:5", "the classifier has 4 outputs but label set 'yard5' has 5 classes"),
    ("weights:torchvision:lraspp_mobilenet_v3_large", "does not fit --arch python:own_net:small"),
    ("pickle", "only tensors are read"),
])
def test_bad_input_is_one_clear_line_and_nothing_is_written(tmp_path, case, message):
    name = "python:own_net:small"
    weights = _weights(tmp_path, name, 4)
    labels = FOUR
    if case.startswith("arch:"):
        name = case[5:]
    elif case == "labels:5":
        labels = LabelSet("yard5", FOUR.names + ("pole",), FOUR.palette + ((1, 2, 3),))
    elif case.startswith("weights:"):
        weights = _weights(tmp_path, case[8:], 4)
    elif case == "pickle":
        weights = tmp_path / "full.pt"
        torch.save(original(name, 4), weights)
    (tmp_path / "labels.json").write_text(labels.to_json())
    r = _cli("import", "--arch", name, "--weights", weights, "--labels", tmp_path / "labels.json",
             "--bundle", tmp_path / "b", "--input-size", "64x128")
    assert r.returncode == 1 and message in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "b").exists()


def test_a_missing_extra_names_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "segmentation_models_pytorch", None)  # what an install without it sees
    with pytest.raises(UserError, match=r"pip install 'mas3-edge\[smp\]'"):
        arch.model_config("smp:Unet:resnet18", CITYSCAPES, SIZE)


def test_prototypes_fitted_for_another_model_are_refused(tmp_path):
    """A GMM fitted for the built-in model (D = 19) does not fit an imported network (D = 12)."""
    from mas3_edge import bundle, prototypes
    from mas3_edge.synth import render
    trained = bundle.load_version(bundle.PACKAGED).net  # the shipped tiny model: some pixels right
    data = [render("synthetic", i, trained.config.input_size) for i in range(2)]
    proto = prototypes.fit(trained, data, tau=0.0, min_count=1)
    root = tmp_path / "b"
    bundle.save_version(root, arch.build(arch.model_config("python:own_net:small", CITYSCAPES, SIZE)).eval())
    ver = bundle.load_version(root)
    prototypes.save(proto, ver.prototypes_path, ver.meta["source_sha256"], "test")
    with pytest.raises(UserError, match="K=19, D=12"):
        prototypes.load(ver.prototypes_path, ver.meta)


def test_no_batch_norm_is_refused_in_the_library_too():
    with pytest.raises(UserError, match="no batch-norm layer"):
        arch.build(arch.model_config("python:own_net:no_batchnorm", FOUR, SIZE), FOUR)
    assert isinstance(bank.norms(arch.build(arch.model_config("python:own_net:small", FOUR, SIZE), FOUR))[0], DomainNorm)


def test_a_network_whose_first_declared_batch_norm_runs_second_is_refused():
    """The first norm in module order routes each frame: it must be the first the input reaches."""
    with pytest.raises(UserError, match=r"\(net.late.1\) is not the first the input reaches \(net.early.1\)"):
        arch.build(arch.model_config("python:own_net:late_first", FOUR, SIZE), FOUR)


@pytest.mark.parametrize("name", ["python:own_net:small", "torchvision:lraspp_mobilenet_v3_large"])
def test_an_imported_networks_sets_fold_apart_and_export_as_router_and_set_graphs(tmp_path, name):
    """The engines' per-set paths follow the bank on any network: PerSetFolded (PyTorch) and the
    per-set ONNX layout (router + one graph per set) serve what the blended model serves."""
    from mas3_edge import bundle
    from mas3_edge.export.onnx import export_onnx, run_onnx
    from mas3_edge.export import sets as xsets
    from mas3_edge.model import Deployed, PerSetFolded
    net = arch.build(arch.model_config(name, FOUR, SIZE), FOUR)
    arch.import_weights(net, original(name, 4).state_dict(), "w")
    from mas3_edge.synth import render
    day, night = ([render(d, i, SIZE)[0] for i in range(4)] for d in ("synthetic", "night"))
    stats.reestimate(net, np.stack(night))
    net.eval()
    frames = torch.from_numpy(np.stack(day[:2] + night[:2]))
    with torch.no_grad():
        (c1, p1), (c2, p2) = Deployed(net).eval()(frames), PerSetFolded(net)(frames)
    assert (c1 == c2).float().mean() > 0.999 and torch.allclose(p1, p2, atol=1e-4)
    vdir = bundle.save_version(tmp_path / "b", net)
    report = export_onnx(vdir, per_set=True).report
    assert report["sets"]["count"] == 2 and report["sets"]["router"]["parity"]["disagree"] == 0
    route = run_onnx(vdir / "sets" / xsets.ROUTER_FILE, frames.numpy(), [xsets.ROUTE])[xsets.ROUTE]
    assert route.tolist() == [0, 0, 1, 1]
