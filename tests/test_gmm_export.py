"""The fused prototypes' classifier in the exported graph: its parity with PyTorch on every set,
and the unchanged graph of a model without it."""
from __future__ import annotations

import copy
import io
import warnings

import numpy as np
import onnx
import torch
from torch import nn

from conftest import domain
from mas3_edge import bank, bundle, gmmhead
from mas3_edge.export import onnx as xonnx
from mas3_edge.model import Deployed, fold_batchnorm
from test_gmmhead import _two_set_net


def test_the_fused_export_matches_pytorch_on_every_set(small_net, tmp_path):
    net = _two_set_net(small_net)
    with torch.no_grad():
        net.gmm.mean.add_(0.5)  # the adapted set's means differ from the source's
    vdir = bundle.save_version(tmp_path / "b", net)
    report = xonnx.export_onnx(vdir, per_set=False, simplify=False).report
    check = report["parity"]["onnxruntime-cpu"]
    assert check["class_agreement"] >= 0.999 and check["max_conf_diff"] <= 1e-3
    frames = np.concatenate([domain(0, 90, n=2), domain(150, 256, n=2)])
    x = torch.from_numpy(frames)
    routes = bank.route(net, net.stem(x))
    assert set(routes.tolist()) == {0, 1}  # both sets' means are exercised
    got = xonnx.run_onnx(vdir / bundle.ONNX_FILE, frames, ["classes", "confidence"])
    with torch.no_grad():
        classes, conf = Deployed(net.eval())(x)
        plain = copy.deepcopy(net)
        plain.gmm = None
        plain_conf = Deployed(plain)(x)[1]
    assert (got["classes"] == classes.numpy()).mean() >= 0.999
    assert np.abs(got["confidence"] - conf.numpy()).max() <= 1e-3
    assert np.abs(got["confidence"] - plain_conf.numpy()).max() > 1e-2  # the graph really fuses


def test_a_model_without_the_head_exports_the_graph_it_always_did(small_net):
    """The plain graph is what Deployed traced before the head existed: embed, h, upsample, softmax."""
    class Before(nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, images):
            z = self.net.embed(self.net.normalize(images))
            logits = self.net.upsample(self.net.head(z), images.shape[1:3])
            conf, classes = torch.softmax(logits, dim=1).max(dim=1)
            return classes.to(torch.uint8), conf

    net = _two_set_net(small_net)
    gmmhead.install(net, None, 0.0)  # type: ignore[arg-type]  # weight 0: no head, no prototypes read
    now = xonnx._torch_export(net, xonnx.OPSET)
    h, w = net.config.input_size
    buf = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's warnings about the shape checks
        torch.onnx.export(Before(fold_batchnorm(copy.deepcopy(net).eval())), (torch.zeros((2, h, w, 3), dtype=torch.uint8),), buf,
                          input_names=[xonnx.INPUT], output_names=list(xonnx.OUTPUTS), opset_version=xonnx.OPSET,
                          dynamic_axes={n: {0: "batch"} for n in [xonnx.INPUT, *xonnx.OUTPUTS]},
                          do_constant_folding=True, dynamo=False)
    before = onnx.load_from_string(buf.getvalue())
    assert [n.op_type for n in now.graph.node] == [n.op_type for n in before.graph.node]
    assert all(np.array_equal(onnx.numpy_helper.to_array(a), onnx.numpy_helper.to_array(b))
               for a, b in zip(now.graph.initializer, before.graph.initializer))
