"""eigsh against float64 dense eigh on matrices with designed spectra, plus the invariants and
the error paths (module pfkernels/lanczos.py)."""

import warnings

import numpy as np
import pytest
import scipy.sparse.linalg as sla
import torch

import pfkernels
from pfkernels import eigsh

F64 = torch.float64


def _with_spectrum(evals, gen):
    """Q diag(evals) Q^T with a Haar-random orthogonal Q."""
    evals = torch.as_tensor(evals, dtype=F64)
    n = evals.numel()
    Q, R = torch.linalg.qr(torch.randn(n, n, dtype=F64, generator=gen))
    Q = Q * torch.sign(torch.diagonal(R))
    return (Q * evals) @ Q.T


def _reference(A, k, which):
    w = torch.linalg.eigvalsh(A.to(F64))
    if which == "LA":
        sel = w[-k:]
    elif which == "SA":
        sel = w[:k]
    elif which == "LM":
        sel = w[torch.argsort(w.abs(), descending=True)[:k]]
    else:
        sel = torch.cat([w[-(k - k // 2):], w[: k // 2]])
    return torch.sort(sel, descending=True).values


def _check_invariants(A, res, k, which, tol_val, tol_res):
    A = A.to(F64)
    ref = _reference(A, k, which)
    lam = res.eigenvalues
    assert lam.shape == (k,) and lam.dtype == F64
    assert torch.all(lam[:-1] >= lam[1:])
    scale = A.abs().max()
    assert (lam - ref).abs().max() <= tol_val * scale, (lam, ref)
    U = res.eigenvectors.to(F64)
    assert U.shape == (A.shape[0], k)
    true_res = torch.linalg.vector_norm(A @ U - U * lam, dim=0)
    assert true_res.max() <= tol_res * scale
    assert (res.residuals - true_res).abs().max() <= 1e-6 * scale
    assert (U.T @ U - torch.eye(k, dtype=F64)).abs().max() <= 1e-8
    assert bool(res.converged.all())


SPECTRA = {
    "separated": lambda n, g: torch.cat([torch.rand(n - 5, dtype=F64, generator=g),
                                         torch.tensor([2.0, 3.0, 4.5, 6.0, 8.0], dtype=F64)]),
    "clustered_top": lambda n, g: torch.cat([torch.rand(n - 6, dtype=F64, generator=g),
                                             5.0 + 1e-3 * torch.arange(6, dtype=F64)]),
    "repeated_top": lambda n, g: torch.cat([torch.rand(n - 3, dtype=F64, generator=g),
                                            torch.full((3,), 4.0, dtype=F64)]),
    "negative_top_magnitude": lambda n, g: torch.cat([torch.rand(n - 2, dtype=F64, generator=g),
                                                      torch.tensor([-7.0, -6.0], dtype=F64)]),
    "indefinite": lambda n, g: torch.randn(n, dtype=F64, generator=g),
}


@pytest.mark.parametrize("spectrum", sorted(SPECTRA))
@pytest.mark.parametrize("which", ["LA", "SA", "LM", "BE"])
@pytest.mark.parametrize("k", [1, 4])
def test_designed_spectra_against_dense_eigh(spectrum, which, k, gen, seed):
    n = 150
    A = _with_spectrum(SPECTRA[spectrum](n, gen), gen)
    res = eigsh(A, k=k, which=which, tol=1e-9, seed=seed)
    _check_invariants(A, res, k, which, tol_val=1e-9, tol_res=1e-8)


def test_rank_deficient_breakdown(gen, seed):
    X = torch.randn(120, 4, dtype=F64, generator=gen)
    A = X @ X.T  # rank 4: the Krylov space is exhausted after 4 steps
    res = eigsh(A, k=6, tol=1e-8, seed=seed)
    ref = _reference(A, 6, "LA")
    assert (res.eigenvalues - ref).abs().max() <= 1e-9 * A.abs().max()
    U = res.eigenvectors
    assert (U.T @ U - torch.eye(6, dtype=F64)).abs().max() <= 1e-8
    assert bool(res.converged.all())


def test_n_smaller_than_ncv_uses_dense_solve(gen):
    A = _with_spectrum(torch.randn(12, dtype=F64, generator=gen), gen)
    res = eigsh(A, k=12, which="LA")
    assert res.num_matvecs == 12 + 12
    _check_invariants(A, res, 12, "LA", 1e-12, 1e-10)


def test_large_k_bounded_basis(gen, seed):
    A = _with_spectrum(torch.randn(400, dtype=F64, generator=gen), gen)
    res = eigsh(A, k=30, ncv=70, tol=1e-8, seed=seed)
    _check_invariants(A, res, 30, "LA", 1e-9, 1e-7)


def test_float32_operator(gen, seed):
    A = _with_spectrum(SPECTRA["separated"](200, gen), gen).float()
    res = eigsh(A, k=3, tol=1e-4, seed=seed)
    assert res.eigenvectors.dtype == torch.float32
    ref = _reference(A, 3, "LA")
    assert (res.eigenvalues - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_bfloat16_storage(gen, seed):
    A = _with_spectrum(SPECTRA["separated"](200, gen), gen).float()
    res = eigsh(A, k=2, tol=1e-2, seed=seed, dtype=torch.bfloat16)
    ref = _reference(A, 2, "LA")
    assert (res.eigenvalues - ref).abs().max() <= 1e-3 * ref.abs().max()
    assert res.eigenvectors.dtype == torch.float32


def test_operator_kinds_agree(gen, seed):
    A = _with_spectrum(SPECTRA["separated"](100, gen), gen)

    class Op:
        shape = (100, 100)
        dtype = F64

        def matvec(self, v):
            return A @ v

    lin = sla.LinearOperator((100, 100), matvec=lambda x: A.numpy() @ x, dtype=np.float64)
    ref = eigsh(A, k=2, tol=1e-10, seed=seed).eigenvalues
    for op, kw in ((Op(), {}), (lambda v: A @ v, {"n": 100, "dtype": F64}), (lin, {})):
        res = eigsh(op, k=2, tol=1e-10, seed=seed, **kw)
        assert torch.allclose(res.eigenvalues, ref, rtol=1e-12, atol=0)
    res = eigsh(lambda v: A @ v, k=2, tol=1e-10, v0=torch.randn(100, dtype=F64, generator=gen))
    assert torch.allclose(res.eigenvalues, ref, rtol=1e-12, atol=0)


def test_batch_equals_unbatched(gen, seed):
    As = torch.stack([_with_spectrum(torch.randn(120, dtype=F64, generator=gen), gen)
                      for _ in range(4)])
    rb = eigsh(As, k=3, which="LM", tol=1e-9, seed=seed)
    assert rb.eigenvalues.shape == (4, 3) and rb.eigenvectors.shape == (4, 120, 3)
    for i in range(4):
        ri = eigsh(As[i], k=3, which="LM", tol=1e-9, seed=seed + i)
        assert torch.allclose(rb.eigenvalues[i], ri.eigenvalues, rtol=1e-12, atol=1e-12)
        assert int(rb.num_matvecs[i]) == ri.num_matvecs
        _check_invariants(As[i], ri, 3, "LM", 1e-9, 1e-8)

    # the same problems through a batched callable
    rc = eigsh(lambda X: torch.einsum("bij,bj->bi", As, X), k=3, which="LM", tol=1e-9,
               seed=seed, batch=4, n=120, dtype=F64)
    assert torch.allclose(rc.eigenvalues, rb.eigenvalues, rtol=1e-12, atol=1e-12)


def test_determinism_with_seed(gen, seed):
    A = _with_spectrum(torch.randn(150, dtype=F64, generator=gen), gen)
    r1 = eigsh(A, k=4, tol=1e-6, seed=seed)
    r2 = eigsh(A, k=4, tol=1e-6, seed=seed)
    assert torch.equal(r1.eigenvalues, r2.eigenvalues)
    assert torch.equal(r1.eigenvectors, r2.eigenvectors)
    assert r1.num_matvecs == r2.num_matvecs


def test_warm_start_uses_fewer_matvecs(gen, seed):
    A = _with_spectrum(SPECTRA["separated"](300, gen), gen)
    cold = eigsh(A, k=1, tol=1e-3, seed=seed)
    # a slightly perturbed problem (as between two training steps)
    E = 1e-3 * _with_spectrum(torch.randn(300, dtype=F64, generator=gen), gen)
    warm = eigsh(A + E, k=1, tol=1e-3, v0=cold.eigenvectors)
    assert warm.num_matvecs < cold.num_matvecs
    assert warm.num_matvecs <= 5
    cold3 = eigsh(A, k=3, tol=1e-6, seed=seed)
    warm3 = eigsh(A + E, k=3, tol=1e-6, v0=cold3.eigenvectors)
    assert warm3.num_matvecs < cold3.num_matvecs


def test_unconverged_warns(gen, seed):
    A = _with_spectrum(SPECTRA["clustered_top"](300, gen), gen)
    with pytest.warns(RuntimeWarning, match="did not reach"):
        res = eigsh(A, k=4, tol=1e-12, max_matvecs=10, seed=seed)
    assert not bool(res.converged.all())
    assert res.num_matvecs <= 10 + 1


def test_bad_inputs(gen):
    A = _with_spectrum(torch.randn(50, dtype=F64, generator=gen), gen)
    with pytest.raises(ValueError, match="'v0'"):
        eigsh(A, v0=torch.zeros(50, dtype=F64))
    with pytest.raises(ValueError, match="'v0'"):
        eigsh(A, v0=torch.ones(49, dtype=F64))
    with pytest.raises(ValueError, match="'A'.*not symmetric"):
        eigsh(A + torch.triu(torch.ones(50, 50, dtype=F64), 1))
    with pytest.raises(ValueError, match="'k'"):
        eigsh(A, k=51)
    with pytest.raises(ValueError, match="'which'"):
        eigsh(A, which="LR")
    with pytest.raises(ValueError, match="'n'"):
        eigsh(lambda v: v)
    with pytest.raises(TypeError, match="'A'"):
        eigsh("matrix")
    with pytest.raises(ValueError, match="'ncv'"):
        eigsh(A, k=3, ncv=3)


def test_nan_operator_names_iteration(gen):
    A = _with_spectrum(torch.randn(200, dtype=F64, generator=gen), gen)
    calls = []

    def op(v):
        calls.append(1)
        out = A @ v
        return out * float("nan") if len(calls) == 7 else out

    with pytest.raises(FloatingPointError, match="iteration 6"):
        eigsh(op, n=200, k=1, tol=1e-10, seed=0, dtype=F64)
