"""The bundle shipped in the package: small, complete, self-consistent."""

from mas3_edge.export.onnx import check_onnx, run_onnx
from mas3_edge import bundle, prototypes
from mas3_edge.evaluate import predict
from mas3_edge.synth import render


def test_packaged_bundle_is_small_and_loads_with_matching_prototypes_and_onnx():
    files = [p for p in bundle.PACKAGED.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 5 * 1024 * 1024
    ver = bundle.load_version(bundle.PACKAGED)  # verifies the weights' sha256
    proto = prototypes.load(ver.prototypes_path, ver.meta)
    assert proto.k == 19 and (proto.alpha > 0).sum() >= 5
    assert 0.3 < proto.atc_threshold < 1  # the device's accuracy estimate (ATC) works out of the box
    onnx_path, _ = check_onnx(ver.path)
    image, _ = render("synthetic", 123, ver.net.config.input_size)
    out = run_onnx(onnx_path, image[None], ["classes"])
    agree = (out["classes"] == predict(ver.net, image[None])).mean()
    assert agree > 0.999


def test_packaged_model_is_trained():
    ver = bundle.load_version(bundle.PACKAGED)
    image, label = render("synthetic", 77, ver.net.config.input_size)
    pred = predict(ver.net, image[None])[0]
    valid = label != 255
    assert (pred[valid] == label[valid]).mean() > 0.6  # an untrained net scores near 1/19
