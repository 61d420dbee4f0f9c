"""flow family: the fused PF field against its ref, limits, awkward shapes, dtypes, bad input."""

import math

import pytest
import torch
from conftest import DEVICES

from pfkernels import ops

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-12, atol=1e-12)}
DTYPES = [torch.float32, torch.float64]
# (n, k): empty, single, k = 0, 1 and n, odd, more columns than a CUDA tile, many rows.
SHAPES = [(0, 0), (1, 0), (1, 1), (7, 0), (7, 1), (7, 7), (33, 5), (129, 40), (5000, 20), (70_001, 3)]


def _problem(n, k, dtype, gen, device="cpu", scale=3.0):
    g = torch.randn(n, generator=gen, dtype=torch.float64)
    if k:
        u = torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=torch.float64))[0]
    else:
        u = torch.zeros(n, 0, dtype=torch.float64)
    lam = scale * torch.randn(k, generator=gen, dtype=torch.float64)
    return tuple(t.to(device, dtype) for t in (g, lam, u))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n, k", SHAPES)
def test_flow_field_matches_ref(n, k, dtype, device, gen):
    g, lam, u = _problem(n, k, dtype, gen, device)
    h = 0.37
    field, proj = ops.flow_field(g, lam, u, h)
    want_field, want_proj = ops.flow_field_ref(g, lam, u, h)
    assert field.dtype == (torch.complex64 if dtype == torch.float32 else torch.complex128)
    assert field.shape == (n,) and proj.shape == (k,) and proj.dtype == dtype
    torch.testing.assert_close(field, want_field, **TOL[dtype])
    torch.testing.assert_close(proj, want_proj, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_flow_field_against_float64_definition(dtype, gen):
    # Invariants: k = 0 is gradient flow; with a full orthonormal basis the field is U diag(r) Uᵀ g.
    g, lam, u = _problem(40, 40, torch.float64, gen)
    h = 0.8
    r = torch.log(torch.complex(1 - h * lam, torch.zeros_like(lam))) / (h * lam)
    dense = u.to(torch.complex128) @ (r * (u.T @ g))
    field, _ = ops.flow_field(g.to(dtype), lam.to(dtype), u.to(dtype), h)
    torch.testing.assert_close(field.to(torch.complex128), dense,
                               rtol=1e-4 if dtype == torch.float32 else 1e-11,
                               atol=1e-4 if dtype == torch.float32 else 1e-11)
    field0, proj0 = ops.flow_field(g.to(dtype), lam[:0].to(dtype), u[:, :0].to(dtype), h)
    assert proj0.numel() == 0
    torch.testing.assert_close(field0, -g.to(dtype).to(field0.dtype), rtol=0, atol=0)


def test_flow_field_limits():
    g = torch.tensor([1.0, 2.0, 0.0, 3.0], dtype=torch.float64)
    u = torch.eye(4, dtype=torch.float64)[:, :3]
    h = 0.5
    # λ = 0 is gradient flow exactly; hλ = 1 with zero projection contributes nothing.
    field, proj = ops.flow_field(g, torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64), u, h)
    assert torch.equal(proj, g[:3])
    assert field[0] == -1 and field[3] == -3 and field[2] == 0
    assert field[1].imag == 0 and field[1].real == 2 * math.log(0.5) / 0.5
    # hλ = 1 with a non-zero projection: the field is infinite there (both paths say so).
    field, _ = ops.flow_field(g, torch.tensor([2.0, 1.0, 0.5], dtype=torch.float64), u, h)
    ref, _ = ops.flow_field_ref(g, torch.tensor([2.0, 1.0, 0.5], dtype=torch.float64), u, h)
    assert field[0].real == -math.inf and ref[0].real == -math.inf
    # hλ > 1: complex, Im r = π/(hλ).
    field, _ = ops.flow_field(g, torch.tensor([3.0, 0.0, 0.0], dtype=torch.float64), u, h)
    torch.testing.assert_close(field[0], torch.tensor(complex(math.log(0.5) / 1.5, math.pi / 1.5),
                                                      dtype=torch.complex128))


def test_flow_field_coefficient_at_infinite_h_lambda_is_zero():
    """Issue 12, item 8: hλ overflowing to ±inf gave NaN (inf/inf); the limit of log(1 - x)/x
    is 0, in the kernel (csrc/common/flow.h) and in the ref."""
    g = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    u = torch.eye(3, dtype=torch.float64)[:, :2]
    lam = torch.tensor([1e300, -1e300], dtype=torch.float64)
    for fn in (ops.flow_field, ops.flow_field_ref):
        field, proj = fn(g, lam, u, 1e300)
        assert torch.equal(proj, g[:2])
        # r = 0 on both directions: the field there is (r + 1) p - p = 0, and -g elsewhere.
        assert torch.equal(field, torch.tensor([0, 0, -3], dtype=torch.complex128))


def test_flow_field_deterministic(gen):
    g, lam, u = _problem(100_000, 8, torch.float32, gen)
    first = ops.flow_field(g, lam, u, 0.1)
    for _ in range(2):
        again = ops.flow_field(g, lam, u, 0.1)
        assert torch.equal(again[0], first[0]) and torch.equal(again[1], first[1])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n, k", [(1, 1), (7, 3), (2049, 5), (5000, 20), (4097, 1)])
def test_flow_field_column_major_and_other_layouts(n, k, dtype, gen):
    # Column-major U (eigsh's layout) is read in place by its own loops; other strides are copied.
    g, lam, u = _problem(n, k, dtype, gen)
    want = ops.flow_field_ref(g, lam, u, 0.5)
    cols = u.T.contiguous().T
    wide = torch.stack([u, u], 2)[:, :, 0]  # strides (2k, 2)
    for layout in (cols, wide):
        before = (g.clone(), lam.clone(), layout.clone())
        got = ops.flow_field(g, lam, layout, 0.5)
        torch.testing.assert_close(got[0], want[0], **TOL[dtype])
        torch.testing.assert_close(got[1], want[1], **TOL[dtype])
        for a, b in zip((g, lam, layout), before):
            assert torch.equal(a, b)


def test_flow_field_opcheck(gen):
    g, lam, u = _problem(9, 3, torch.float64, gen)
    torch.library.opcheck(torch.ops.pfkernels.flow_field.default, (g, lam, u, 0.5))


@pytest.mark.parametrize(
    "args, name",
    [
        ((torch.zeros(3, dtype=torch.int64), torch.zeros(1), torch.zeros(3, 1)), "grad"),
        ((torch.zeros(3, 2), torch.zeros(1), torch.zeros(3, 1)), "grad"),
        ((torch.zeros(3), torch.zeros(2), torch.zeros(3, 1)), "eigenvalues"),
        ((torch.zeros(3), torch.zeros(1), torch.zeros(4, 1)), "eigenvectors"),
        ((torch.zeros(3), torch.zeros(1, dtype=torch.float64), torch.zeros(3, 1)), "eigenvalues"),
        ((torch.zeros(3), torch.zeros(1), torch.zeros(3, 1, dtype=torch.float64)), "eigenvectors"),
        (([0.0, 1.0], torch.zeros(1), torch.zeros(3, 1)), "grad"),
    ],
)
def test_flow_field_bad_input(args, name):
    with pytest.raises(ValueError, match=f"argument '{name}'"):
        ops.flow_field(*args, 0.5)


@pytest.mark.parametrize("h", [0.0, -1.0, math.inf, math.nan, True, "0.5"])
def test_flow_field_bad_h(h):
    with pytest.raises(ValueError, match="argument 'h'"):
        ops.flow_field(torch.zeros(3), torch.zeros(1), torch.zeros(3, 1), h)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_flow_field_cuda_matches_cpu(dtype, gen):
    g, lam, u = _problem(100_003, 37, dtype, gen)
    cpu = ops.flow_field(g, lam, u, 0.3)
    for layout in (u, u.T.contiguous().T):
        gpu = ops.flow_field(g.cuda(), lam.cuda(), layout.cuda(), 0.3)
        torch.testing.assert_close(gpu[0].cpu(), cpu[0], **TOL[dtype])
        torch.testing.assert_close(gpu[1].cpu(), cpu[1], **TOL[dtype])
