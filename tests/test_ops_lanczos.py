"""lanczos kernel family: lanczos_step and lanczos_ritz against their pure-torch refs, on fresh
random inputs, awkward shapes and every basis dtype, plus the invariants of one step."""

import math

import pytest
import torch
from conftest import DEVICES

from pfkernels import ops

F64 = torch.float64
ARITH = {torch.float32: torch.float32, torch.float64: torch.float64, torch.bfloat16: torch.float32}
# tolerances per basis dtype, relative to ||w|| (float32 arithmetic for float32/bfloat16)
TOL = {torch.float32: 2e-5, torch.float64: 1e-12, torch.bfloat16: 2e-5}


def _orthonormal_basis(B, m, n, rows, dtype, device, gen):
    """V [B, m+1, n]: rows 0..rows-1 orthonormal (in float64, then stored), the rest NaN, so a
    kernel that reads past row j or fails to write row j+1 is caught."""
    V = torch.full((B, m + 1, n), math.nan, dtype=dtype)
    if rows:
        Q, _ = torch.linalg.qr(torch.randn(B, n, rows, dtype=F64, generator=gen))
        V[:, :rows] = Q.transpose(1, 2).to(dtype)
    return V.to(device)


def _run(fn, w, V, j, m, coef=None):
    B = V.shape[0]
    w, V = w.clone(), V.clone()
    a, b, wn = (torch.full((B, m), math.nan, dtype=F64, device=V.device) for _ in range(3))
    fn(w, V, j, a, b, wn, coef)
    return w, V, a, b, wn


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("B,n,m,j", [(1, 1000, 20, 0), (3, 2049, 12, 11), (2, 5, 6, 3),
                                     (1, 40001, 8, 5), (5, 33, 4, 2)])
def test_step_matches_ref(device, dtype, B, n, m, j, gen):
    V = _orthonormal_basis(B, m, n, j + 1, dtype, device, gen)
    w = torch.randn(B, n, dtype=ARITH[dtype], generator=gen).to(device)
    coef_k, coef_r = (torch.full((B, m, m + 1), math.nan, dtype=F64, device=device)
                      for _ in range(2))
    got = _run(ops.lanczos_step, w, V, j, m, coef_k)
    ref = _run(ops.lanczos_step_ref, w, V, j, m, coef_r)
    scale = torch.linalg.vector_norm(w.double(), dim=1).max()
    tol = TOL[dtype]
    w_k, V_k, a_k, b_k, wn_k = got
    w_r, V_r, a_r, b_r, wn_r = ref
    assert torch.allclose(w_k.double(), w_r.double(), atol=tol * scale, rtol=0)
    assert torch.allclose(a_k[:, j], a_r[:, j], atol=tol * scale, rtol=0)
    assert torch.allclose(b_k[:, j], b_r[:, j], atol=tol * scale, rtol=0)
    assert torch.allclose(wn_k[:, j], wn_r[:, j], rtol=1e-5, atol=0)
    # only column j of the scalars and row j+1 of V are written
    for t in (a_k, b_k, wn_k):
        assert torch.isnan(torch.cat([t[:, :j], t[:, j + 1:]], 1)).all()
    assert torch.equal(V_k[:, : j + 1], V[:, : j + 1])
    assert torch.isnan(V_k[:, j + 2:].float()).all()
    new = V_k[:, j + 1].double()
    vtol = 1e-2 if dtype == torch.bfloat16 else 1e-4 if dtype == torch.float32 else 1e-12
    assert torch.allclose(new, V_r[:, j + 1].double(), atol=vtol, rtol=0)
    # invariants: v_{j+1} is a unit vector orthogonal to the basis; w = beta v_{j+1}
    basis = V[:, : j + 1].double()
    ortho = 1e-2 if dtype == torch.bfloat16 else 1e-5 if dtype == torch.float32 else 1e-13
    if n > j + 1:
        assert torch.allclose(torch.linalg.vector_norm(new, dim=1), torch.ones(B, dtype=F64,
                              device=device), atol=ortho)
        # Gram-Schmidt's error grows with the cancellation ||w|| / beta, which is large when
        # the basis nearly spans the space (n = j + 2) and w lies almost inside it.
        cond = (torch.linalg.vector_norm(w.double(), dim=1) / b_k[:, j]).clamp_min(1.0)
        assert (torch.bmm(basis, new.unsqueeze(-1)).abs().amax((1, 2)) <= ortho * cond).all()
    # alpha_j = v_j^T w_in in exact arithmetic; a bfloat16 basis is orthonormal only to ~1e-2
    alpha = (V[:, j].double() * w.double()).sum(1)
    atol = (1e-2 if dtype == torch.bfloat16 else 10 * tol) * scale
    assert torch.allclose(a_k[:, j], alpha, atol=atol, rtol=0)
    # coef row j: both passes' coefficients, w_in = sum_i coef_i v_i + beta_j v_{j+1} exactly
    # up to the arithmetic's rounding; only row j, columns 0..j are written
    assert torch.allclose(coef_k[:, j, : j + 1], coef_r[:, j, : j + 1], atol=tol * scale, rtol=0)
    assert torch.equal(coef_k[:, j, j], a_k[:, j])
    mask = torch.ones(m, m + 1, dtype=torch.bool)
    mask[j, : j + 1] = False
    assert torch.isnan(coef_k[:, mask]).all()
    rebuilt = (torch.bmm(coef_k[:, j: j + 1, : j + 1], basis).squeeze(1)
               + b_k[:, j: j + 1] * new)
    assert torch.allclose(rebuilt, w.double(), atol=vtol * scale, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_step_on_a_slice_of_a_larger_basis(device, gen):
    """The batch stride is free: a [B, m+1, n] slice of a bigger allocation works in place."""
    big = _orthonormal_basis(4, 9, 300, 4, torch.float32, device, gen)
    V = big[1:3]
    w = torch.randn(2, 300, generator=gen).to(device)
    got = _run(ops.lanczos_step, w, V, 3, 9)
    ref = _run(ops.lanczos_step_ref, w, V, 3, 9)
    assert torch.allclose(got[1], ref[1], atol=1e-5, equal_nan=True)
    assert torch.allclose(got[3], ref[3], atol=1e-4, equal_nan=True)


@pytest.mark.parametrize("device", DEVICES)
def test_step_exact_invariant_subspace_writes_zeros(device):
    """w in span(V): beta_j = 0 (to rounding) and no NaN is written."""
    V = torch.zeros(1, 4, 8, dtype=F64, device=device)
    V[0, 0, 0] = V[0, 1, 1] = 1
    w = torch.zeros(1, 8, dtype=F64, device=device)
    w[0, :2] = torch.tensor([2.0, -3.0])
    _, Vk, a, b, wn = _run(ops.lanczos_step, w, V, 1, 3)
    assert b[0, 1] == 0 and a[0, 1] == -3.0 and wn[0, 1] == math.sqrt(13)
    assert torch.equal(Vk[0, 2], torch.zeros(8, dtype=F64, device=device))


@pytest.mark.parametrize("device", DEVICES)
def test_step_deterministic(device, gen):
    V = _orthonormal_basis(2, 16, 30000, 10, torch.float32, device, gen)
    w = torch.randn(2, 30000, generator=gen).to(device)
    r1, r2 = _run(ops.lanczos_step, w, V, 9, 16), _run(ops.lanczos_step, w, V, 9, 16)
    for x, y in zip(r1, r2):
        assert torch.equal(x.nan_to_num(), y.nan_to_num())


def test_step_bad_inputs(gen):
    V = _orthonormal_basis(2, 5, 10, 2, torch.float32, "cpu", gen)
    w = torch.randn(2, 10)
    a = torch.zeros(2, 5, dtype=F64)
    with pytest.raises(ValueError, match="'w'"):
        ops.lanczos_step(w.double(), V, 1, a, a.clone(), a.clone())
    with pytest.raises(ValueError, match="'w'"):
        ops.lanczos_step(torch.randn(2, 9), V, 1, a, a.clone(), a.clone())
    with pytest.raises(ValueError, match="'j'"):
        ops.lanczos_step(w, V, 5, a, a.clone(), a.clone())
    with pytest.raises(ValueError, match="'alpha'"):
        ops.lanczos_step(w, V, 1, a.float(), a.clone(), a.clone())
    with pytest.raises(ValueError, match="'V'"):
        ops.lanczos_step(w, V.transpose(1, 2).contiguous().transpose(1, 2), 1, a, a.clone(),
                         a.clone())
    with pytest.raises(ValueError, match="'V'"):
        ops.lanczos_step(w, V.half(), 1, a, a.clone(), a.clone())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("B,n,rows,k", [(1, 1000, 20, 1), (3, 777, 9, 5), (2, 1, 1, 1),
                                        (1, 20000, 30, 12), (2, 64, 5, 0)])
def test_ritz_matches_ref(device, dtype, B, n, rows, k, gen):
    V = torch.randn(B, rows + 2, n, generator=gen).to(device, dtype)
    S = torch.randn(B, rows, k, dtype=F64, generator=gen).to(device)
    got = ops.lanczos_ritz(S, V)
    ref = ops.lanczos_ritz_ref(S, V)
    assert got.shape == (B, k, n) and got.dtype == ARITH[dtype]
    exact = torch.bmm(S.transpose(1, 2), V[:, :rows].double())
    tol = 1e-12 if dtype == torch.float64 else 1e-4
    assert torch.allclose(got.double(), exact, atol=tol * math.sqrt(rows), rtol=0)
    assert torch.allclose(ref.double(), exact, atol=tol * math.sqrt(rows), rtol=0)


def test_ritz_bad_inputs(gen):
    V = torch.randn(2, 5, 10, generator=gen)
    with pytest.raises(ValueError, match="'S'"):
        ops.lanczos_ritz(torch.randn(2, 6, 1, dtype=F64), V)
    with pytest.raises(ValueError, match="'S'"):
        ops.lanczos_ritz(torch.randn(2, 3, 1), V)
    with pytest.raises(ValueError, match="'V'"):
        ops.lanczos_ritz(torch.randn(2, 3, 1, dtype=F64), V.to(torch.int32))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("B,rows,n", [(1, 1, 1), (3, 7, 2049), (2, 1, 40001), (1, 21, 5),
                                      (2, 0, 10), (0, 3, 10)])
def test_dots_matches_ref(device, dtype, B, rows, n, gen):
    V = torch.randn(B, rows + 2, n, generator=gen).to(device, dtype)[:, :rows]
    x = torch.randn(B, n, generator=gen).to(device, ARITH[dtype])
    got = ops.lanczos_dots(V, x)
    ref = ops.lanczos_dots_ref(V, x)
    assert got.shape == (B, rows) and got.dtype == F64 and ref.shape == (B, rows)
    exact = torch.einsum("brn,bn->br", V.double(), x.double())
    assert torch.allclose(ref, exact, atol=1e-12 * math.sqrt(n), rtol=0)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert torch.allclose(got, exact, atol=tol * math.sqrt(n), rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_dots_accuracy_does_not_grow_with_n(device, gen):
    """Squared norms of float32 unit vectors of 2e6 entries, the sum where float accumulation
    fails worst (every term positive): torch.linalg.vector_norm is off by ~1e-4 there. The kernel
    forms each product in float32 (one rounding, at most u/2 = 2^-24 relative) and sums in
    float64, so what is left is the products' rounding, independent from term to term: of the
    order (u/2) sqrt(sum p_i^2) = 7.3e-11 here (measured over 600 rows: rms 3.2e-11, max 9.9e-11;
    a fixed 1e-10 failed for PFK_SEED=399794872 at 1.02e-10). The bound allows 8 of those."""
    x64 = torch.randn(2, 2_000_000, dtype=F64, generator=gen)
    x64 /= torch.linalg.vector_norm(x64, dim=1, keepdim=True)
    x = x64.float().to(device)
    exact = (x.double() ** 2).sum(1)
    got = ops.lanczos_dots(x.unsqueeze(1), x)[:, 0]
    scale = 2.0 ** -24 * (x.double() ** 4).sum(1).sqrt()
    assert ((got - exact).abs() <= 8 * scale).all(), (got - exact, scale)
    # the step's own sums: ||A v_j|| and beta_j = ||w|| after Gram-Schmidt, to float64 accuracy
    V = _orthonormal_basis(2, 2, 2_000_000, 1, torch.float32, device, gen)
    w = (3 * V[:, 0].float() + x).contiguous()
    w_out, V_out, _, b, wn = _run(ops.lanczos_step, w, V, 0, 2)
    assert torch.allclose(wn[:, 0], torch.linalg.vector_norm(w.double(), dim=1), rtol=1e-12)
    assert torch.allclose(b[:, 0], torch.linalg.vector_norm(w_out.double(), dim=1), rtol=1e-12)
    unit = torch.linalg.vector_norm(V_out[:, 1].double(), dim=1)
    assert torch.allclose(unit, torch.ones_like(unit), atol=1e-7, rtol=0)


def test_dots_bad_inputs(gen):
    V = torch.randn(2, 3, 10, generator=gen)
    with pytest.raises(ValueError, match="'x'"):
        ops.lanczos_dots(V, torch.randn(2, 10, dtype=F64))
    with pytest.raises(ValueError, match="'x'"):
        ops.lanczos_dots(V, torch.randn(2, 9))
    with pytest.raises(ValueError, match="'V'"):
        ops.lanczos_dots(V.transpose(1, 2).contiguous().transpose(1, 2), torch.randn(2, 10))
    with pytest.raises(ValueError, match="'V'"):
        ops.lanczos_dots(V.half(), torch.randn(2, 10))
    with pytest.raises(ValueError, match="'coef'"):
        ops.lanczos_step(torch.randn(2, 10), torch.zeros(2, 4, 10), 1,
                         *(torch.zeros(2, 3, dtype=F64) for _ in range(3)),
                         torch.zeros(2, 1, 3, dtype=F64))


def test_opcheck(gen):
    V = _orthonormal_basis(2, 6, 100, 3, torch.float32, "cpu", gen).nan_to_num()
    w = torch.randn(2, 100, generator=gen)
    a = torch.zeros(2, 6, dtype=F64)
    torch.library.opcheck(torch.ops.pfkernels.lanczos_step.default,
                          (w, V, 2, a, a.clone(), a.clone()),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.pfkernels.lanczos_step.default,
                          (w, V, 2, a, a.clone(), a.clone(), torch.zeros(2, 6, 6, dtype=F64)),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.pfkernels.lanczos_dots.default, (V[:, :4], w))
    S = torch.randn(2, 3, 2, dtype=F64, generator=gen)
    torch.library.opcheck(torch.ops.pfkernels.lanczos_ritz.default, (S, V))
