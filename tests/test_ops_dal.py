"""dal family: the device-side DAL rate against its ref, the reference values and every branch."""

import math

import pytest
import torch

from pfkernels import ops

DTYPES = [torch.float32, torch.float64]


def _sums_from(g, hg):
    return ops.multi_tensor_dot([g], [hg])


def _reference_quadratic_sums(dtype=torch.float64):
    # E = θᵀ diag(1, 0.01) θ at θ0 = (-0.35, -0.2): g = 2Aθ, H = 2A (REFERENCES.md §2).
    a = torch.tensor([1.0, 0.01], dtype=dtype)
    theta = torch.tensor([-0.35, -0.2], dtype=dtype)
    g = 2 * a * theta
    return _sums_from(g, 2 * a * g)


@pytest.mark.parametrize("p, want", [(1.0, 1.00002), (0.5, 1.41423)])
def test_reference_values(p, want):
    rate = ops.dal_rate(_reference_quadratic_sums(), p, 5.0, 0.1)
    assert rate.shape == () and rate.dtype == torch.float64
    assert abs(float(rate) - want) < 5e-6


@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_ref_on_random_sums(dtype, gen):
    for _ in range(50):
        n = int(torch.randint(1, 2000, (1,), generator=gen))
        g = torch.randn(n, generator=gen, dtype=dtype)
        hg = torch.randn(n, generator=gen, dtype=dtype) * float(torch.rand(1, generator=gen) * 10)
        sums = _sums_from(g, hg)
        p = float(torch.rand(1, generator=gen) * 3)
        lr_max = float(torch.rand(1, generator=gen) * 5 + 0.01)
        for in_window in (True, False):
            got = ops.dal_rate(sums, p, lr_max, 0.05, in_window)
            want = ops.dal_rate_ref(sums, p, lr_max, 0.05, in_window)
            assert got.dtype == dtype
            torch.testing.assert_close(got, want, rtol=1e-6 if dtype == torch.float32 else 1e-14, atol=0)
            if in_window:
                v = math.sqrt(float(sums[2]) / float(sums[1]))
                assert float(got) == pytest.approx(min(2 / v**p, lr_max), rel=1e-5)


def test_clamp_at_lr_max():
    # Tiny curvature: 2/v is huge, the rate is the cap.
    sums = _sums_from(torch.tensor([1.0, 2.0]), torch.tensor([1e-6, 0.0]))
    assert float(ops.dal_rate(sums, 1.0, 3.0, 0.1)) == 3.0
    assert float(ops.dal_rate(sums, 1.0, 1e8, 0.1)) == pytest.approx(2 * math.sqrt(5 / 1e-12), rel=1e-6)


def test_p_zero_and_outside_window_give_lr():
    sums = _reference_quadratic_sums()
    assert float(ops.dal_rate(sums, 0.0, 5.0, 0.123)) == 0.123
    assert float(ops.dal_rate(sums, 2.0, 5.0, 0.123, in_window=False)) == 0.123


@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_gradient_gives_lr_max_never_nan(dtype):
    z = torch.zeros(5, dtype=dtype)
    for fn in (ops.dal_rate, ops.dal_rate_ref):
        rate = fn(_sums_from(z, z), 1.0, 2.5, 0.1, True)
        assert float(rate) == 2.5
        # ‖g‖ > 0 with a flat direction (Hg = 0): v = 0, also lr_max.
        rate = fn(_sums_from(torch.ones(5, dtype=dtype), z), 0.5, 2.5, 0.1, True)
        assert float(rate) == 2.5


def test_overflow_clamps():
    # ‖g‖²/‖Hg‖² overflows float64 when raised to p/2 = 100: +inf, then the cap.
    sums = torch.tensor([0.0, 1e300, 1e-300], dtype=torch.float64)
    assert float(ops.dal_rate(sums, 200.0, 4.0, 0.1)) == 4.0
    assert float(ops.dal_rate_ref(sums, 200.0, 4.0, 0.1)) == 4.0


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("index", [0, 1, 2])
def test_nonfinite_sums_give_nan(bad, index):
    sums = torch.tensor([1.0, 2.0, 3.0])
    sums[index] = bad
    for in_window in (True, False):
        assert math.isnan(float(ops.dal_rate(sums, 1.0, 5.0, 0.1, in_window)))
        assert math.isnan(float(ops.dal_rate_ref(sums, 1.0, 5.0, 0.1, in_window)))


def test_bad_input():
    sums = torch.tensor([1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="argument 'p'"):
        ops.dal_rate(sums, -0.5, 5.0, 0.1)
    with pytest.raises(ValueError, match="argument 'lr_max'"):
        ops.dal_rate(sums, 1.0, 0.0, 0.1)
    with pytest.raises(ValueError, match="argument 'lr_max'"):
        ops.dal_rate(sums, 1.0, math.inf, 0.1)
    with pytest.raises(ValueError, match="argument 'lr'"):
        ops.dal_rate(sums, 1.0, 5.0, math.nan)
    with pytest.raises(ValueError, match="argument 'sums'.*shape"):
        ops.dal_rate(torch.ones(4), 1.0, 5.0, 0.1)
    with pytest.raises(ValueError, match="argument 'sums'.*dtype"):
        ops.dal_rate(torch.ones(3, dtype=torch.int64), 1.0, 5.0, 0.1)
    with pytest.raises(ValueError, match="argument 'sums'"):
        ops.dal_rate([1.0, 2.0, 3.0], 1.0, 5.0, 0.1)


def test_opcheck_and_compile(seed):
    sums = ops.multi_tensor_dot([torch.randn(9)], [torch.randn(9)])
    torch.library.opcheck(torch.ops.pfkernels.dal_rate.default, (sums, 1.0, 5.0, 0.1, True))

    @torch.compile(backend="eager", fullgraph=True)
    def rate(g, hg):
        return ops.dal_rate(ops.multi_tensor_dot(g, hg), 1.0, 5.0, 0.1)

    g, hg = [torch.randn(33)], [torch.randn(33)]
    torch.testing.assert_close(rate(g, hg), ops.dal_rate_ref(ops.multi_tensor_dot_ref(g, hg), 1.0, 5.0, 0.1))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_matches_cpu_without_sync(dtype, gen):
    g = torch.randn(1000, generator=gen, dtype=dtype)
    hg = torch.randn(1000, generator=gen, dtype=dtype)
    sums = _sums_from(g, hg)
    cuda_sums = sums.cuda()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = ops.dal_rate(cuda_sums, 1.0, 5.0, 0.1)
        zero = ops.dal_rate(torch.zeros(3, dtype=dtype, device="cuda"), 1.0, 5.0, 0.1)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert got.device.type == "cuda"
    torch.testing.assert_close(got.cpu(), ops.dal_rate(sums, 1.0, 5.0, 0.1), rtol=1e-6, atol=0)
    assert float(zero) == 5.0
