"""tridiag family: batched symmetric tridiagonal eigensolver against torch.linalg.eigh and SciPy.

Eigenvectors are checked through invariants (orthogonality, residual, the sign convention),
never entry by entry against another solver: where eigenvalues are close the vectors are not
unique.
"""

import math

import numpy as np
import pytest
import scipy.linalg
import torch

from pfkernels import ops

EPS = torch.finfo(torch.float64).eps
MODES = ["all", "last_row", "none"]


def _random(batch, m, gen, dtype=torch.float64):
    alpha = torch.randn(batch, m, generator=gen, dtype=dtype)
    beta = torch.randn(batch, max(m - 1, 0), generator=gen, dtype=dtype)
    return alpha, beta


def _dense(alpha, beta):
    t = torch.diag_embed(alpha.double())
    if alpha.shape[-1] > 1:
        t = t + torch.diag_embed(beta.double(), 1) + torch.diag_embed(beta.double(), -1)
    return t


def _norm(alpha, beta):
    """A cheap bound on ||T||_2 per problem (max row sum), shape [B, 1]."""
    a, b = alpha.double().abs(), beta.double().abs()
    rows = a.clone()
    rows[..., :-1] += b
    rows[..., 1:] += b
    return rows.amax(-1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)


def _check_decomposition(alpha, beta, evals, z, tol=50.0):
    """Ascending eigenvalues, orthonormal Z, small residual ||TZ - ZΛ||, last row of Z >= 0."""
    m = alpha.shape[-1]
    scale = _norm(alpha, beta)
    assert evals.dtype == torch.float64 and z.dtype == torch.float64
    assert torch.all(evals[..., 1:] >= evals[..., :-1])
    eye = torch.eye(m, dtype=torch.float64)
    orth = (z.mT @ z - eye).abs().amax((-2, -1))
    assert orth.max() <= tol * m * EPS, orth.max()
    resid = (_dense(alpha, beta) @ z - z * evals[..., None, :]).abs().amax((-2, -1))
    assert torch.all(resid <= tol * m * EPS * scale[..., 0]), (resid / scale[..., 0]).max()
    assert torch.all(z[..., -1, :] >= 0)


# --- against references ---------------------------------------------------------------------


# 1000 problems, batched by size: m = 1 and m = 2 included, odd sizes, and the Lanczos sizes.
SIZES = {1: 100, 2: 150, 3: 150, 5: 150, 8: 150, 17: 120, 40: 100, 64: 80}


def test_random_against_ref_and_scipy(gen):
    assert sum(SIZES.values()) == 1000
    for m, batch in SIZES.items():
        alpha, beta = _random(batch, m, gen)
        evals, z = ops.tridiag_eigh(alpha, beta, "all")
        ref_evals, _ = ops.tridiag_eigh_ref(alpha, beta, "none")
        scale = _norm(alpha, beta)
        assert ((evals - ref_evals).abs() <= 20 * m * EPS * scale).all(), m
        a_np, b_np = alpha.numpy(), beta.numpy()
        sp = np.stack([
            scipy.linalg.eigh_tridiagonal(a_np[i], b_np[i], eigvals_only=True)
            for i in range(batch)
        ])
        assert ((evals - torch.from_numpy(sp)).abs() <= 20 * m * EPS * scale).all(), m
        _check_decomposition(alpha, beta, evals, z)


def test_vectors_match_ref_where_well_separated(gen):
    # Away from clusters (and where the last component is clearly nonzero, so the sign convention
    # decides) an eigenvector is unique, and the two solvers must agree on it.
    alpha, beta = _random(200, 12, gen)
    _, z = ops.tridiag_eigh(alpha, beta, "all")
    ref_evals, ref_z = ops.tridiag_eigh_ref(alpha, beta, "all")
    gaps = torch.full_like(ref_evals, math.inf)
    diff = ref_evals.diff(dim=-1)
    gaps[:, 1:] = diff
    gaps[:, :-1] = torch.minimum(gaps[:, :-1], diff)
    unique = (gaps > 1e-3) & (ref_z[:, -1, :] > 1e-6)
    assert unique.float().mean() > 0.5
    err = (z - ref_z).abs().amax(-2)
    assert (err[unique] <= 1e-9).all(), err[unique].max()


@pytest.mark.parametrize("m", [1, 2, 7, 64])
def test_modes_agree(m, gen):
    alpha, beta = _random(50, m, gen)
    evals_all, z = ops.tridiag_eigh(alpha, beta, "all")
    evals_last, last = ops.tridiag_eigh(alpha, beta, "last_row")
    evals_none, none = ops.tridiag_eigh(alpha, beta, "none")
    assert none is None
    assert last.shape == (50, m) and z.shape == (50, m, m)
    # The QL iteration on T does not depend on which rows of Z it carries.
    torch.testing.assert_close(evals_last, evals_all, rtol=0, atol=0)
    torch.testing.assert_close(evals_none, evals_all, rtol=0, atol=0)
    torch.testing.assert_close(last, z[:, -1, :], rtol=0, atol=1e-14)


def test_small_closed_forms(gen):
    alpha, beta = _random(20, 1, gen)
    evals, z = ops.tridiag_eigh(alpha, beta)
    torch.testing.assert_close(evals, alpha, rtol=0, atol=0)
    assert torch.equal(z, torch.ones(20, 1, 1, dtype=torch.float64))
    alpha, beta = _random(20, 2, gen)
    evals, _ = ops.tridiag_eigh(alpha, beta, "none")
    mean = alpha.mean(-1)
    radius = torch.sqrt((alpha[:, 0] - alpha[:, 1]) ** 2 / 4 + beta[:, 0] ** 2)
    torch.testing.assert_close(evals, torch.stack([mean - radius, mean + radius], -1))


def test_laplacian_known_spectrum():
    # tridiag(-1, 2, -1) of order m: eigenvalues 2 - 2 cos(k pi / (m + 1)), eigenvectors sines.
    m = 100
    evals, z = ops.tridiag_eigh(torch.full((m,), 2.0, dtype=torch.float64),
                                torch.full((m - 1,), -1.0, dtype=torch.float64))
    k = torch.arange(1, m + 1, dtype=torch.float64)
    torch.testing.assert_close(evals, 2 - 2 * torch.cos(k * math.pi / (m + 1)), rtol=0, atol=1e-13)
    # Their last components sin(m k pi / (m+1)) * sqrt(2 / (m+1)), up to the sign convention.
    want = (torch.sin(m * k * math.pi / (m + 1)) * math.sqrt(2 / (m + 1))).abs()
    torch.testing.assert_close(z[-1], want, rtol=0, atol=1e-13)


# --- designed spectra -----------------------------------------------------------------------


def test_split_and_repeated(gen):
    # Zero off-diagonals: a direct sum of identical 3x3 blocks has each eigenvalue 4 times, and
    # a diagonal matrix is its own eigendecomposition.
    block_a, block_b = torch.randn(3, generator=gen), torch.randn(2, generator=gen)
    alpha = block_a.repeat(4).double()
    beta = torch.cat([torch.cat([block_b, torch.zeros(1)]) for _ in range(4)])[:-1].double()
    evals, z = ops.tridiag_eigh(alpha[None], beta[None])
    block = torch.linalg.eigvalsh(_dense(block_a[None], block_b[None]))[0]
    torch.testing.assert_close(evals[0], block.repeat_interleave(4), rtol=0, atol=1e-14)
    _check_decomposition(alpha[None], beta[None], evals, z)

    diag = torch.randn(3, 9, generator=gen, dtype=torch.float64)
    diag[:, 4] = diag[:, 1]  # a repeated entry
    evals, z = ops.tridiag_eigh(diag, torch.zeros(3, 8, dtype=torch.float64))
    assert torch.equal(evals, diag.sort(-1).values)
    assert torch.equal(z.abs().sum(-1), torch.ones(3, 9, dtype=torch.float64))
    _check_decomposition(diag, torch.zeros(3, 8, dtype=torch.float64), evals, z)


def test_random_splits(gen):
    alpha, beta = _random(100, 30, gen)
    beta[torch.rand(beta.shape, generator=gen) < 0.2] = 0.0
    evals, z = ops.tridiag_eigh(alpha, beta)
    ref, _ = ops.tridiag_eigh_ref(alpha, beta, "none")
    assert ((evals - ref).abs() <= 600 * EPS * _norm(alpha, beta)).all()
    _check_decomposition(alpha, beta, evals, z)


def test_wilkinson_clusters():
    # W21+: its largest eigenvalues come in pairs agreeing to ~1e-14, a classic hard case.
    alpha = torch.arange(-10, 11, dtype=torch.float64).abs()
    beta = torch.ones(20, dtype=torch.float64)
    evals, z = ops.tridiag_eigh(alpha[None], beta[None])
    sp = scipy.linalg.eigh_tridiagonal(alpha.numpy(), beta.numpy(), eigvals_only=True)
    torch.testing.assert_close(evals[0], torch.from_numpy(sp), rtol=0, atol=1e-13)
    assert evals[0, -1] - evals[0, -2] < 1e-12
    _check_decomposition(alpha[None], beta[None], evals, z)


def test_huge_dynamic_range(gen):
    m = 24
    mags = 10.0 ** (torch.rand(40, m, generator=gen, dtype=torch.float64) * 16 - 8)
    alpha = mags * torch.where(torch.rand(40, m, generator=gen) < 0.5, -1.0, 1.0).double()
    beta = 10.0 ** (torch.rand(40, m - 1, generator=gen, dtype=torch.float64) * 16 - 8)
    evals, z = ops.tridiag_eigh(alpha, beta)
    ref, _ = ops.tridiag_eigh_ref(alpha, beta, "none")
    assert ((evals - ref).abs() <= 100 * m * EPS * _norm(alpha, beta)).all()
    _check_decomposition(alpha, beta, evals, z)


@pytest.mark.parametrize("power", [-900, -500, 500, 900])
def test_power_of_two_scaling_is_exact(power, gen):
    # T is scaled by a power of two inside, so 2^k T runs the very same iteration: exact results,
    # with entries far outside the range where squares or products stay finite.
    alpha, beta = _random(30, 16, gen)
    evals, z = ops.tridiag_eigh(alpha, beta)
    scaled_evals, scaled_z = ops.tridiag_eigh(alpha * 2.0**power, beta * 2.0**power)
    assert torch.equal(scaled_evals, evals * 2.0**power)
    assert torch.equal(scaled_z, z)


def test_negative_and_indefinite(gen):
    alpha, beta = _random(50, 20, gen)
    alpha = -alpha.abs() - 3 * beta.abs().amax(-1, keepdim=True)  # diagonally dominant, negative
    evals, z = ops.tridiag_eigh(alpha, beta)
    assert (evals < 0).all()
    _check_decomposition(alpha, beta, evals, z)
    ref, _ = ops.tridiag_eigh_ref(alpha, beta, "none")
    assert ((evals - ref).abs() <= 400 * EPS * _norm(alpha, beta)).all()


def test_zero_matrix():
    evals, z = ops.tridiag_eigh(torch.zeros(2, 6), torch.zeros(2, 5))
    assert torch.equal(evals, torch.zeros(2, 6, dtype=torch.float64))
    assert torch.equal(z, torch.eye(6, dtype=torch.float64).expand(2, 6, 6))


# --- shapes, dtypes, batching ---------------------------------------------------------------


@pytest.mark.parametrize("vectors", MODES)
def test_batch_element_equals_unbatched(vectors, gen):
    alpha, beta = _random(9, 23, gen)
    evals, z = ops.tridiag_eigh(alpha, beta, vectors)
    for i in range(9):
        e_i, z_i = ops.tridiag_eigh(alpha[i], beta[i], vectors)
        assert e_i.shape == (23,)
        assert torch.equal(e_i, evals[i])
        assert (z_i is None) if vectors == "none" else torch.equal(z_i, z[i])


@pytest.mark.parametrize("vectors", MODES)
def test_matches_ref_unbatched_and_noncontiguous(vectors, gen):
    alpha, beta = _random(13, 6, gen)
    alpha_t = alpha.t().contiguous().t()  # same values, column-major storage
    got_e, got_z = ops.tridiag_eigh(alpha_t, beta, vectors)
    ref_e, ref_z = ops.tridiag_eigh_ref(alpha, beta, vectors)
    torch.testing.assert_close(got_e, ref_e, rtol=0, atol=1e-13)
    if vectors == "none":
        assert got_z is None and ref_z is None
    else:
        assert got_z.shape == ref_z.shape
        # Rows of Z where the last component decides the sign unambiguously.
        torch.testing.assert_close(got_z[..., -1, :] if vectors == "all" else got_z,
                                   ref_z[..., -1, :] if vectors == "all" else ref_z,
                                   rtol=0, atol=1e-10)


def test_float32_input(gen):
    alpha, beta = _random(40, 10, gen, torch.float32)
    evals, z = ops.tridiag_eigh(alpha, beta)
    assert evals.dtype == torch.float64 and z.dtype == torch.float64
    evals64, z64 = ops.tridiag_eigh(alpha.double(), beta.double())
    assert torch.equal(evals, evals64) and torch.equal(z, z64)
    assert alpha.dtype == torch.float32  # the caller's tensors are untouched


@pytest.mark.parametrize("vectors", MODES)
def test_empty(vectors):
    shapes = {"all": (0, 5, 5), "last_row": (0, 5), "none": None}
    evals, z = ops.tridiag_eigh(torch.zeros(0, 5), torch.zeros(0, 4), vectors)
    assert evals.shape == (0, 5) and evals.dtype == torch.float64
    assert (z is None) if vectors == "none" else z.shape == shapes[vectors]
    evals, z = ops.tridiag_eigh(torch.zeros(3, 0), torch.zeros(3, 0), vectors)
    assert evals.shape == (3, 0)
    evals, z = ops.tridiag_eigh(torch.zeros(0), torch.zeros(0), vectors)
    assert evals.shape == (0,)
    ref_e, ref_z = ops.tridiag_eigh_ref(torch.zeros(0, 5), torch.zeros(0, 4), vectors)
    assert ref_e.shape == (0, 5)
    assert (ref_z is None) if vectors == "none" else ref_z.shape == shapes[vectors]


@pytest.mark.parametrize("vectors", MODES)
def test_every_output_written(vectors, gen):
    # The op poisons its outputs with NaN before the kernel runs; none may survive.
    for m in (1, 2, 3, 31, 64):
        alpha, beta = _random(37, m, gen)
        evals, z = ops.tridiag_eigh(alpha, beta, vectors)
        assert torch.isfinite(evals).all()
        assert z is None or torch.isfinite(z).all()


# --- bad input: errors that name the argument ------------------------------------------------


@pytest.mark.parametrize("fn", [ops.tridiag_eigh, ops.tridiag_eigh_ref])
def test_bad_shapes(fn):
    with pytest.raises(ValueError, match="argument 'beta'.*shape"):
        fn(torch.randn(4, 5), torch.randn(4, 5))
    with pytest.raises(ValueError, match="argument 'beta'.*shape"):
        fn(torch.randn(4, 5), torch.randn(3, 4))
    with pytest.raises(ValueError, match="argument 'beta'.*shape"):
        fn(torch.randn(5), torch.randn(1, 4))
    with pytest.raises(ValueError, match="argument 'alpha'.*shape"):
        fn(torch.randn(2, 4, 5), torch.randn(2, 4, 4))
    with pytest.raises(ValueError, match="argument 'alpha'.*shape"):
        fn(torch.tensor(1.0), torch.randn(0))


@pytest.mark.parametrize("fn", [ops.tridiag_eigh, ops.tridiag_eigh_ref])
def test_bad_types(fn):
    with pytest.raises(ValueError, match="argument 'vectors'"):
        fn(torch.randn(5), torch.randn(4), "full")
    with pytest.raises(ValueError, match="argument 'vectors'"):
        fn(torch.randn(5), torch.randn(4), None)
    with pytest.raises(ValueError, match="argument 'alpha'.*dtype"):
        fn(torch.arange(5), torch.randn(4))
    with pytest.raises(ValueError, match="argument 'beta'.*dtype"):
        fn(torch.randn(5), torch.ones(4, dtype=torch.complex64))
    with pytest.raises(ValueError, match="argument 'alpha'.*tensor"):
        fn([1.0, 2.0], torch.randn(1))
    with pytest.raises(ValueError, match="argument 'beta'.*device"):
        fn(torch.randn(5), torch.randn(4, device="meta"))


@pytest.mark.parametrize("fn", [ops.tridiag_eigh, ops.tridiag_eigh_ref])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite(fn, bad, gen):
    alpha, beta = _random(6, 8, gen)
    a_bad, b_bad = alpha.clone(), beta.clone()
    a_bad[4, 2] = bad
    b_bad[3, 6] = bad
    with pytest.raises(ValueError, match="argument 'alpha'.*problem 4"):
        fn(a_bad, beta)
    with pytest.raises(ValueError, match="argument 'beta'.*problem 3"):
        fn(alpha, b_bad)
    with pytest.raises(ValueError, match="argument 'alpha'.*problem 0"):
        fn(a_bad[4], beta[4])
    # Unchecked: the flagged problems come back as NaN, the others are solved as usual.
    evals, z = fn(a_bad, b_bad, "all", check=False)
    flagged = torch.tensor([False, False, False, True, True, False])
    assert torch.isnan(evals[flagged]).all() and torch.isnan(z[flagged]).all()
    good, _ = ops.tridiag_eigh_ref(alpha[~flagged], beta[~flagged], "none")
    torch.testing.assert_close(evals[~flagged], good, rtol=0, atol=1e-13)


def test_status_codes_raise():
    # The non-convergence report (not reachable with finite input) names the problem.
    with pytest.raises(RuntimeError, match="did not converge for problem 2"):
        ops._raise_on_tridiag_status(torch.tensor([0, 0, 1, 1], dtype=torch.int32))
    ops._raise_on_tridiag_status(torch.zeros(3, dtype=torch.int32))


# --- torch.library integration ----------------------------------------------------------------


@pytest.mark.parametrize("vectors", MODES)
def test_opcheck(vectors, gen):
    alpha, beta = _random(5, 7, gen)
    torch.library.opcheck(torch.ops.pfkernels.tridiag_eigh.default, (alpha, beta, vectors))


def test_under_torch_compile(gen):
    alpha, beta = _random(8, 9, gen)

    @torch.compile(backend="eager", fullgraph=True)
    def top_residuals(alpha, beta):
        evals, last = ops.tridiag_eigh(alpha, beta, "last_row", check=False)
        return evals[:, -1], last[:, -1].abs()

    evals, last = top_residuals(alpha, beta)
    ref_e, ref_last = ops.tridiag_eigh_ref(alpha, beta, "last_row")
    torch.testing.assert_close(evals, ref_e[:, -1], rtol=0, atol=1e-13)
    torch.testing.assert_close(last, ref_last[:, -1], rtol=0, atol=1e-10)


# --- CUDA -------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("vectors", MODES)
def test_cuda_matches_cpu(vectors, gen):
    cases = [_random(300, m, gen) for m in (1, 2, 5, 33, 64)]
    alpha, beta = _random(50, 20, gen)
    beta[:, ::3] = 0.0
    cases.append((alpha, beta))
    cases.append((alpha * 2.0**700, beta * 2.0**700))
    cases.append((alpha.float(), beta.float()))
    for alpha, beta in cases:
        cpu_e, _cpu_z = ops.tridiag_eigh(alpha, beta, vectors)
        gpu_e, gpu_z = ops.tridiag_eigh(alpha.cuda(), beta.cuda(), vectors)
        assert gpu_e.device.type == "cuda" and gpu_e.dtype == torch.float64
        scale = _norm(alpha, beta).cuda()
        m = alpha.shape[-1]
        assert ((gpu_e - cpu_e.cuda()).abs() <= 20 * m * EPS * scale).all()
        if vectors == "all":
            _check_decomposition(alpha, beta, gpu_e.cpu(), gpu_z.cpu())
        if vectors == "last_row":
            _, all_z = ops.tridiag_eigh(alpha.cuda(), beta.cuda(), "all")
            torch.testing.assert_close(gpu_z, all_z[:, -1, :], rtol=0, atol=1e-14)


@pytest.mark.cuda
def test_cuda_non_finite_and_no_host_sync(gen):
    alpha, beta = _random(64, 16, gen)
    alpha = alpha.cuda()
    beta = beta.cuda()
    ops.tridiag_eigh(alpha, beta, "last_row", check=False)  # warm-up
    torch.cuda.set_sync_debug_mode("error")
    try:
        evals, _last = ops.tridiag_eigh(alpha, beta, "last_row", check=False)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.testing.assert_close(evals.cpu(), ops.tridiag_eigh(alpha.cpu(), beta.cpu(), "none")[0],
                               rtol=0, atol=1e-13)
    alpha[7, 3] = math.nan
    with pytest.raises(ValueError, match="argument 'alpha'.*problem 7"):
        ops.tridiag_eigh(alpha, beta)
