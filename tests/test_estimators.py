"""Hutch++ and the Hutchinson diagonal estimator: unbiasedness and variance against dense
matrices, the exact small-n path, and Hutch++ against Hutchinson at equal products."""

import math

import pytest
import torch

import pfkernels
from pfkernels import GGNOperator, hutchinson_diagonal, hutchinson_trace, hutchpp_trace
from pfkernels.data import mlp, mse_loss

pytestmark = pytest.mark.usefixtures("one_thread")


def sym(gen, n):
    a = torch.randn(n, n, generator=gen, dtype=torch.float64)
    return (a + a.T) / 2


def low_rank_plus_noise(gen, n=120, rank=8, noise=0.05):
    """A PSD matrix whose trace sits in a few large eigenvalues: the case Hutch++ is for."""
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    values = torch.cat([torch.linspace(100.0, 20.0, rank, dtype=torch.float64),
                        noise * torch.rand(n - rank, generator=gen, dtype=torch.float64)])
    return (q * values) @ q.T


def test_diagonal_unbiased_with_the_predicted_variance(gen, seed):
    n, probes, reps = 16, 8, 300
    A = sym(gen, n)
    draws = torch.stack([hutchinson_diagonal(A, probes, seed=seed % 10000 * reps + r,
                                             exact=False).diagonal for r in range(reps)])
    predicted = (A.pow(2).sum(1) - A.diag().pow(2)) / probes  # Σ_{j≠i} A_ij² / P
    # unbiased: the mean over repetitions within 5 standard errors of diag(A), every entry
    assert bool(((draws.mean(0) - A.diag()).abs() < 5 * (predicted / reps).sqrt()).all())
    # the sample variance of each entry matches: over 300 repetitions its relative standard
    # error is about sqrt(2/300) ~ 8%, so 35% is > 4 sigma
    ratio = draws.var(0) / predicted
    assert float((ratio - 1).abs().max()) < 0.35


def test_diagonal_reported_std_error_matches_spread(gen, seed):
    A = sym(gen, 30)
    est = hutchinson_diagonal(A, 400, seed=seed % 100000, exact=False)
    predicted = ((A.pow(2).sum(1) - A.diag().pow(2)) / 400).sqrt()
    assert float((est.std_error / predicted - 1).abs().max()) < 0.35
    assert est.num_matvecs == 400


def test_diagonal_exact_for_small_n(gen):
    A = sym(gen, 10)
    est = hutchinson_diagonal(A, num_probes=10, batch_size=4)
    assert torch.allclose(est.diagonal, A.diag(), rtol=0, atol=1e-14)
    assert est.num_matvecs == 10 and bool((est.std_error == 0).all())
    forced = hutchinson_diagonal(A, num_probes=3, exact=True)
    assert torch.allclose(forced.diagonal, A.diag(), rtol=0, atol=1e-14)


def test_diagonal_of_a_curvature_operator(seed):
    model = mlp(3, 2, width=4, depth=1, seed=seed % 1000).double()
    x, y = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)
    op = GGNOperator(model, mse_loss, (x, y))
    dense = op @ torch.eye(op.shape[0], dtype=torch.float64)
    assert torch.allclose(hutchinson_diagonal(op, op.shape[0]).diagonal, dense.diag(),
                          rtol=1e-12, atol=1e-14)


def test_hutchpp_unbiased_with_exact_top(gen, seed):
    A = low_rank_plus_noise(gen)
    reps = 40
    draws = torch.tensor([hutchpp_trace(A, 30, seed=seed % 10000 * reps + r).trace
                          for r in range(reps)], dtype=torch.float64)
    spread = float(draws.std()) / math.sqrt(reps)
    assert abs(float(draws.mean()) - float(A.trace())) < 5 * spread + 1e-9 * float(A.trace())


def test_hutchpp_beats_hutchinson_at_equal_products(gen, seed):
    A = low_rank_plus_noise(gen)
    reps, m = 40, 30
    hpp = torch.tensor([hutchpp_trace(A, m, seed=seed % 10000 * reps + r).trace
                        for r in range(reps)])
    hut = torch.tensor([hutchinson_trace(A, m, seed=seed % 10000 * reps + r).trace
                        for r in range(reps)])
    # Hutchinson's variance is 2(‖A‖_F² − Σ A_ii²)/m; Hutch++ leaves only the noise part
    predicted = 2 * (A.pow(2).sum() - A.diag().pow(2).sum()) / m
    assert 0.4 < float(hut.var() / predicted) < 2.0
    assert float(hpp.var()) < float(hut.var()) / 100
    via_method = hutchinson_trace(A, m, seed=3, method="hutch++")
    assert via_method == hutchpp_trace(A, m, seed=3) and via_method.num_matvecs == m


def test_estimators_reject_bad_arguments(gen):
    A = sym(gen, 5)
    with pytest.raises(ValueError, match="num_probes"):
        hutchpp_trace(A, 2)
    with pytest.raises(ValueError, match="method"):
        hutchinson_trace(A, 4, method="exact")
    with pytest.raises(ValueError, match="exact"):
        hutchinson_diagonal(A, 4, exact="yes")
    with pytest.raises(ValueError, match="num_probes"):
        hutchinson_diagonal(A, 0)
    assert pfkernels.DiagonalEstimate is not None
