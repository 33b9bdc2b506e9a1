"""One small network of each family we did not write, the whole way: import or train ->
prototypes -> adapt (mas3 and Tent) -> eval -> export with parity -> ONNX Runtime engine -> a short
`run` whose hot swap serves the adapted version, with the network's own label set on the wire."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from test_arch import FOUR, SIZE, original
from test_service import Running, config
from test_camera import write_video

from mas3_edge import arch, bank, bundle, evaluate, prototypes, rounds, train
from mas3_edge.config import AdaptConfig
from mas3_edge.labels import CITYSCAPES
from mas3_edge.synth import render

pytest.importorskip("torchvision")
pytest.importorskip("segmentation_models_pytorch")


def source_data(labels, n: int = 6, domain: str = "synthetic", seed: int = 0):
    """Synthetic scenes; for another label set the Cityscapes ids are folded onto its K classes."""
    pairs = [render(domain, seed + i, SIZE) for i in range(n)]
    if labels is CITYSCAPES:
        return pairs
    return [(img, np.where(lbl == 255, 255, lbl % labels.num_classes).astype(np.uint8)) for img, lbl in pairs]


def first_version(tmp_path, name, labels):
    """Imported weights for the library families; the python family is trained by our own `train`."""
    root = tmp_path / "bundle"
    if name.startswith("python:"):
        cfg = arch.model_config(name, labels, SIZE)
        return train.train(source_data(labels), cfg, train.TrainConfig(steps=4, batch_size=2, lr=1e-3),
                           root, tmp_path / "ckpt", labels=labels)
    net = arch.build(arch.model_config(name, labels, SIZE), labels)
    arch.import_weights(net, original(name, labels.num_classes).state_dict(), "weights")
    return bundle.save_version(root, net.eval(), info={"kind": "imported"})


@pytest.mark.parametrize("name, labels", [("torchvision:lraspp_mobilenet_v3_large", CITYSCAPES),
                                          ("smp:Unet:resnet18", CITYSCAPES), ("python:own_net:small", FOUR)])
def test_a_network_we_did_not_write_goes_the_whole_way(tmp_path, name, labels):
    from mas3_edge.export.onnx import export_onnx
    from mas3_edge.runtime.engines import load_engine
    torch.manual_seed(0)
    v1 = first_version(tmp_path, name, labels)
    root = v1.parent.parent
    ver = bundle.load_version(root)
    proto = prototypes.fit(ver.net, source_data(labels), tau=0.0, min_count=1)
    prototypes.save(proto, ver.prototypes_path, ver.meta["source_sha256"], "synthetic", labels)
    proto = prototypes.load(ver.prototypes_path, ver.meta)
    assert proto.k == labels.num_classes and proto.mean.shape[1] == ver.net.config.embed_dim

    target = np.stack([img for img, _ in source_data(labels, 4, "night", seed=50)])
    net = copy.deepcopy(ver.net)
    # pooled SWD: an untrained network's predicted classes and the GMM's rarely both reach a class's minimum
    cfg = AdaptConfig(steps=2, batch_size=2, tau=0.0, choose=False, class_conditional=False)
    assert rounds.pick_set(net, target, cfg)[0] == "new"
    (cand,) = rounds.candidates(net, proto, target, cfg)
    assert len(cand.log["steps"]) == 2 and all(s["swd"] > 0 for s in cand.log["steps"])
    lead = bank.lead(net)
    assert bank.count(net) == 2 and torch.equal(lead.bank[0], bank.lead(ver.net).working())  # source set kept
    assert not torch.equal(lead.working(), lead.bank[0])  # and a new set beside it
    tent = copy.deepcopy(ver.net)
    rounds.candidates(tent, proto, target, AdaptConfig(method="tent", steps=2, batch_size=2))
    assert any(not torch.equal(a, b) for a, b in zip(tent.state_dict().values(), ver.net.state_dict().values()))

    scores = evaluate.evaluate(net, source_data(labels, 2, "night", seed=50))
    assert scores["label_set"] == labels.id and set(scores["per_class_iou"]) == set(labels.names)

    v2 = bundle.save_version(root, net.eval(), parent=ver, serve=False, info={"kind": "adapted"})
    for vdir in (v1, v2):
        check = export_onnx(vdir).report["parity"]["onnxruntime-cpu"]  # export raises if a floor is missed
        assert check["class_agreement"] >= 0.999 and check["max_logit_diff"] <= 1e-3
    engine = load_engine(v2, "onnxruntime", "cpu")
    classes, _ = engine.infer(target[:2])
    with torch.no_grad():
        want = net(net.normalize(torch.from_numpy(target[:2]))).argmax(1).numpy()
    assert classes.shape == want.shape and (classes == want).mean() > 0.99

    video = write_video(tmp_path / "v.avi", 30, size=SIZE)
    with Running(config(tmp_path, root, str(video), engine="onnxruntime", fps=12)) as run:
        run.collect(1.0)
        bundle.set_serving(root, v2.name)
        msgs = run.collect(8, until=lambda m: sum(x.version == v2.name for x in m) >= 3)
    assert any(m.version == v2.name for m in msgs) and msgs[-1].engine.startswith("onnxruntime")
    assert {(m.label_set, m.num_classes) for m in msgs} == {(labels.id, labels.num_classes)}
    assert all(m.classes.max() < labels.num_classes for m in msgs)
