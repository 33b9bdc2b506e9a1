import json

import numpy as np
import pytest
import torch

from mas3_edge import prototypes as P
from mas3_edge.errors import UserError
from mas3_edge.labels import IGNORE


def _random_stats(k=4, d=3, n=3000, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, d, generator=g, dtype=torch.float64) * 2 + torch.arange(d)
    label = torch.randint(0, k, (n,), generator=g)
    pred = torch.where(torch.rand(n, generator=g) < 0.8, label, torch.randint(0, k, (n,), generator=g))
    conf = torch.rand(n, generator=g)
    label[:50] = IGNORE
    return z, label, pred, conf


def test_eq3_matches_direct_numpy_in_one_streaming_pass():
    k, d, tau = 4, 3, 0.5
    z, label, pred, conf = _random_stats(k, d)
    stats = P.SufficientStats(k, d, (tau,))
    for chunk in range(0, len(z), 700):  # streamed in pieces
        sl = slice(chunk, chunk + 700)
        stats.update(z[sl], label[sl], pred[sl], conf[sl])
    proto = P.finalize(stats, min_count=1, shrink=0.0)
    zn, ln, pn, cn = z.numpy(), label.numpy(), pred.numpy(), conf.numpy()
    sizes = []
    for j in range(k):
        s = zn[(ln == j) & (pn == j) & (cn > tau)]
        sizes.append(len(s))
        assert np.allclose(proto.mean[j].numpy(), s.mean(0), atol=1e-5)
        cov = np.cov(s.T, bias=True)
        shrink = d / (len(s) + d)  # the documented small-sample shrinkage
        target = (1 - shrink) * cov + shrink * np.eye(d) * np.diag(cov).mean()
        assert np.allclose(proto.covariance[j].numpy(), target, atol=1e-4)
    assert np.allclose(proto.alpha.numpy(), np.array(sizes) / sum(sizes), atol=1e-6)


def test_confidence_filter_excludes_low_confidence_and_wrong_pixels():
    stats = P.SufficientStats(2, 2, (0.9,))
    z = torch.tensor([[1.0, 1.0], [100.0, 100.0], [-50.0, 3.0]])
    stats.update(z, torch.tensor([0, 0, 0]), torch.tensor([0, 0, 1]), torch.tensor([0.95, 0.5, 0.99]))
    assert stats.count[0, 0] == 1 and stats.sum[0, 0].tolist() == [1.0, 1.0]


def test_rare_class_falls_back_to_lower_tau_and_absent_class_gets_zero_weight():
    stats = P.SufficientStats(3, 2, (0.97, 0.5, 0.0))
    g = torch.Generator().manual_seed(0)
    z = torch.randn(400, 2, generator=g)
    label = torch.tensor([0] * 300 + [1] * 100)
    conf = torch.tensor([0.99] * 300 + [0.6] * 100)  # class 1 never passes 0.97
    stats.update(z, label, label.clone(), conf)
    proto = P.finalize(stats, min_count=50)
    assert proto.alpha[2] == 0 and proto.alpha[1] > 0
    assert "tau lowered to 0.5" in proto.meta["handling"]["sidewalk"]
    assert "absent" in proto.meta["handling"]["building"]
    assert torch.isfinite(proto.chol).all()


def test_degenerate_class_covariance_stays_positive_definite():
    stats = P.SufficientStats(1, 3, (0.0,))
    z = torch.ones(200, 3)  # all identical: the empirical covariance is zero
    stats.update(z, torch.zeros(200, dtype=torch.long), torch.zeros(200, dtype=torch.long), torch.ones(200))
    proto = P.finalize(stats, min_count=10)
    assert torch.linalg.eigvalsh(proto.covariance[0]).min() > 0


def test_samples_have_the_fitted_moments():
    z, label, pred, conf = _random_stats(3, 3, 6000)
    stats = P.SufficientStats(3, 3, (0.0,))
    stats.update(z, label, pred, conf)
    proto = P.finalize(stats, min_count=1)
    zs, ys = proto.sample(torch.tensor([20000, 20000, 20000]), torch.Generator().manual_seed(0))
    for j in range(3):
        s = zs[ys == j].double()
        assert torch.allclose(s.mean(0), proto.mean[j].double(), atol=0.05)
        assert torch.allclose(torch.cov(s.T), proto.covariance[j].double(), atol=0.15)


def _proto(k=19, d=19):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(k, d, d, generator=g) * 0.1
    chol = torch.linalg.cholesky(a @ a.transpose(1, 2) + torch.eye(d))
    return P.Prototypes(torch.full((k,), 1 / k), torch.randn(k, d, generator=g), chol, torch.full((k,), 100.0), {"tau": 0.97})


def _meta(k=19, d=19, sha="abc"):
    return {"architecture": {"num_classes": k, "embed_dim": d}, "source_sha256": sha}


def test_file_round_trip_is_small_and_exact(tmp_path):
    proto, path = _proto(), tmp_path / "prototypes.safetensors"
    P.save(proto, path, "abc", "synthetic")
    assert path.stat().st_size < 64 * 1024
    back = P.load(path, _meta())
    assert torch.equal(back.chol, proto.chol) and torch.equal(back.mean, proto.mean)
    assert back.meta["source"] == "synthetic" and back.meta["model_sha256"] == "abc"


def test_mismatched_model_and_bad_files_are_clear_errors(tmp_path):
    path = tmp_path / "p.safetensors"
    P.save(_proto(), path, "abc", "synthetic")
    with pytest.raises(UserError, match="another model"):
        P.load(path, _meta(sha="other"))
    with pytest.raises(UserError, match="K=19, D=19"):
        P.load(path, _meta(d=8))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="unreadable"):
        P.load(bad)
    with pytest.raises(UserError, match="missing"):
        P.load(tmp_path / "nope.safetensors")
    nan = _proto()
    nan.mean[0, 0] = float("nan")
    P.save(nan, tmp_path / "nan.safetensors", "abc", "s")
    with pytest.raises(UserError, match="NaN"):
        P.load(tmp_path / "nan.safetensors")


def test_a_model_that_gets_no_pixel_right_is_refused():
    stats = P.SufficientStats(2, 2, (0.97, 0.0))
    stats.update(torch.randn(50, 2), torch.zeros(50, dtype=torch.long), torch.ones(50, dtype=torch.long), torch.ones(50))
    with pytest.raises(UserError, match="is the model trained"):
        P.finalize(stats, min_count=10)


def test_a_class_that_falls_back_to_a_lower_tau_is_not_weighted_up():
    # class 0: 1000 correct pixels, 300 of them confident; class 1: 300 correct, 50 confident (falls back)
    conf = torch.tensor([0.99] * 300 + [0.6] * 700 + [0.99] * 50 + [0.6] * 250)
    label = torch.tensor([0] * 1000 + [1] * 300)
    stats = P.SufficientStats(2, 2, (0.97, 0.0))
    stats.update(torch.randn(1300, 2, generator=torch.Generator().manual_seed(0)), label, label.clone(), conf)
    proto = P.finalize(stats, min_count=100)
    assert "tau lowered" in proto.meta["handling"]["sidewalk"]
    assert proto.counts.tolist() == [300, 300]  # what each component was fitted on
    assert torch.allclose(proto.alpha, torch.tensor([1000 / 1300, 300 / 1300]))  # weights at one level


def test_more_classes_than_cityscapes_fall_back_and_save(tmp_path):
    k = 25
    label = torch.arange(k).repeat_interleave(40)
    conf = torch.where(label == 22, 0.6, 0.99)  # class 22 falls back, 23 and 24 are absent
    label[label >= 23] = 0
    stats = P.SufficientStats(k, 2, (0.97, 0.0))
    stats.update(torch.randn(len(label), 2), label, label.clone(), conf)
    proto = P.finalize(stats, min_count=10)
    assert "tau lowered" in proto.meta["handling"]["22"] and "absent" in proto.meta["handling"]["24"]
    P.save(proto, tmp_path / "p.safetensors", "abc", "test")
    assert len(json.loads(P.load(tmp_path / "p.safetensors").meta["classes"])) == k


def test_labels_reach_the_embedding_grid_from_each_cells_centre(small_net, monkeypatch):
    cell = np.full((8, 8), 7, np.uint8)
    cell[2:6, 2:6] = 3  # the centre of every 8×8 cell is class 3, its corners class 7
    image = np.zeros((64, 128, 3), np.uint8)
    seen = []
    monkeypatch.setattr(P.SufficientStats, "update", lambda self, z, label, *a: seen.append(label))
    monkeypatch.setattr(P, "finalize", lambda stats, min_count, **kw: stats)
    P.fit(small_net, [(image, np.tile(cell, (8, 16)))])
    assert seen[0].shape == (8 * 16,) and (seen[0] == 3).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_prototypes_moved_to_the_gpu_sample_there_with_the_cpu_draws():
    proto = _proto(k=4, d=3)
    n = torch.tensor([5, 0, 7, 2])
    z, y = proto.sample(n, torch.Generator().manual_seed(0))
    zg, yg = proto.to("cuda").sample(n, torch.Generator().manual_seed(0))
    assert zg.device.type == "cuda" and torch.equal(yg.cpu(), y) and torch.allclose(zg.cpu(), z, atol=1e-5)


def _correlated_stats(k=19, d=256, n=400, seed=0):
    """One streaming pass over K correlated Gaussians in D dimensions (a random mixing per class)."""
    g = torch.Generator().manual_seed(seed)
    stats = P.SufficientStats(k, d, (0.0,))
    for j in range(k):
        mix = torch.randn(d, d, generator=g, dtype=torch.float64) / d ** 0.5
        z = torch.randn(n, d, generator=g, dtype=torch.float64) @ mix.T + torch.randn(d, generator=g, dtype=torch.float64)
        y = torch.full((n,), j)
        stats.update(z, y, y, torch.ones(n))
    return stats


def test_covariance_structure_is_chosen_by_width_or_forced():
    assert P.choose_covariance(19) == ("full", 0) and P.choose_covariance(64) == ("full", 0)
    assert P.choose_covariance(256) == ("lowrank", 32) and P.choose_covariance(1024) == ("lowrank", 32)
    assert P.choose_covariance(2048) == ("diag", 0)
    assert P.choose_covariance(2048, "full") == ("full", 0) and P.choose_covariance(19, "diag") == ("diag", 0)
    with pytest.raises(UserError, match="unknown covariance structure 'dense'"):
        P.choose_covariance(19, "dense")


def test_wide_embedding_file_is_under_a_megabyte_in_the_auto_choice(tmp_path):
    proto = P.finalize(_correlated_stats(), min_count=10)
    path = tmp_path / "p.safetensors"
    P.save(proto, path, "abc", "synthetic")
    assert proto.structure == "lowrank" and proto.factor.shape == (19, 256, 32)
    assert path.stat().st_size <= 1024 * 1024
    back = P.load(path, _meta(19, 256))
    assert back.meta["covariance"] == "lowrank" and back.meta["rank"] == "32" and back.structure == "lowrank"


@pytest.mark.parametrize("covariance", ["full", "lowrank", "diag"])
def test_each_covariance_structure_round_trips_through_the_file(tmp_path, covariance):
    stats = _correlated_stats(k=3, d=80, n=300)
    proto = P.finalize(stats, min_count=10, covariance=covariance)
    full = P.finalize(stats, min_count=10, covariance="full")
    path = tmp_path / f"{covariance}.safetensors"
    P.save(proto, path, "abc", "synthetic")
    back = P.load(path, _meta(3, 80))
    assert back.structure == covariance == back.meta["covariance"]
    for name in ("mean", "alpha", "chol", "factor", "diag"):
        a, b = getattr(proto, name), getattr(back, name)
        assert (a is None and b is None) or torch.equal(a, b)
    # every structure keeps the fitted marginal variances
    assert torch.allclose(back.covariance.diagonal(dim1=1, dim2=2), full.covariance.diagonal(dim1=1, dim2=2), rtol=1e-4)


def test_low_rank_samples_reproduce_the_fitted_covariance():
    proto = P.finalize(_correlated_stats(k=2, d=80, n=600), min_count=10, covariance="lowrank")
    zs, ys = proto.sample(torch.tensor([40000, 40000]), torch.Generator().manual_seed(0))
    for j in range(2):
        s = zs[ys == j].double()
        assert torch.allclose(s.mean(0), proto.mean[j].double(), atol=0.03)
        cov = proto.covariance[j].double()
        assert (torch.cov(s.T) - cov).abs().max() < 0.05 * cov.diagonal().max()


def test_corrupt_low_rank_files_are_one_clear_error(tmp_path):
    proto = P.finalize(_correlated_stats(k=3, d=80, n=300), min_count=10, covariance="lowrank")
    cases = {"negative": ("diag", -1.0, "variance that is not positive"), "nan": ("factor", float("nan"), "NaN")}
    for name, (tensor, value, message) in cases.items():
        bad = P.Prototypes(proto.alpha, proto.mean, None, proto.counts, {}, proto.factor.clone(), proto.diag.clone())
        getattr(bad, tensor)[1, 5] = value
        P.save(bad, tmp_path / f"{name}.safetensors", "abc", "s")
        with pytest.raises(UserError, match=message):
            P.load(tmp_path / f"{name}.safetensors")
    import safetensors.torch
    t = {"alpha": proto.alpha, "mean": proto.mean, "counts": proto.counts, "factor": proto.factor}
    safetensors.torch.save_file(t, str(tmp_path / "nodiag.safetensors"), {"covariance": "lowrank", "rank": "32"})
    with pytest.raises(UserError, match="lacks diag"):
        P.load(tmp_path / "nodiag.safetensors")


def test_packaged_default_bundle_still_loads_as_full_covariance():
    from mas3_edge import bundle
    ver = bundle.load_version(bundle.PACKAGED)
    proto = P.load(ver.prototypes_path, ver.meta)
    assert proto.structure == "full" and proto.chol.shape == (19, 19, 19) and proto.factor is None
