import ot
import pytest
import torch

from mas3_edge.swd import random_directions, sliced_wasserstein


def test_zero_for_identical_sets():
    a = torch.randn(500, 19)
    assert sliced_wasserstein(a, a.clone()).item() == pytest.approx(0.0, abs=1e-10)


def test_matches_pot_on_the_same_projections():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(400, 8, generator=g, dtype=torch.float64), torch.randn(400, 8, generator=g, dtype=torch.float64) * 2 + 1
    theta = random_directions(8, 50, g).double()
    ours = sliced_wasserstein(a, b, projections=theta).item()
    pot = ot.sliced_wasserstein_distance(a.numpy(), b.numpy(), projections=theta.numpy(), p=2)
    assert ours == pytest.approx(float(pot) ** 2, rel=1e-9)  # POT returns the square root of the mean


def test_different_sizes_match_pot_with_weights():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(300, 4, generator=g, dtype=torch.float64), torch.randn(1200, 4, generator=g, dtype=torch.float64) + 3
    theta = random_directions(4, 20, g).double()
    ours = sliced_wasserstein(a, b, projections=theta).item()
    pot = float(ot.sliced_wasserstein_distance(a.numpy(), b.numpy(), projections=theta.numpy(), p=2)) ** 2
    assert ours == pytest.approx(pot, rel=0.05)  # quantile interpolation vs exact 1-D OT


def test_gradient_moves_set_toward_target():
    a = torch.randn(256, 5, requires_grad=True)
    b = torch.randn(256, 5) + 4
    loss = sliced_wasserstein(a, b, 30)
    loss.backward()
    assert a.grad is not None and torch.isfinite(a.grad).all() and a.grad.abs().sum() > 0
    with torch.no_grad():
        moved = a - 10 * a.grad
    theta = random_directions(5, 64, torch.Generator().manual_seed(0))
    assert sliced_wasserstein(moved, b, projections=theta) < sliced_wasserstein(a.detach(), b, projections=theta)


def test_shape_errors():
    with pytest.raises(ValueError):
        sliced_wasserstein(torch.randn(10, 3), torch.randn(10, 4))
