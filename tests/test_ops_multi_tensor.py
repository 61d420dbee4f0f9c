"""multi_tensor family: op against ref, awkward shapes, dtypes, bad input, torch.library checks."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pfkernels import ops

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-12, atol=1e-12)}
DTYPES = [torch.float32, torch.float64]


def _lists(sizes, dtype, device="cpu"):
    a = [torch.randn(n, dtype=dtype, device=device) for n in sizes]
    b = [torch.randn(n, dtype=dtype, device=device) for n in sizes]
    return a, b


SIZE_CASES = {
    "empty-list": [],
    "one-empty-tensor": [0],
    "one-element": [1],
    "odd": [7, 1, 0, 13],
    "many": [((i * 37) % 257) + (i % 3 == 0) * 1000 for i in range(300)],
    "large": [1_000_000],
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", SIZE_CASES)
def test_dot_matches_ref(case, dtype, seed):
    a, b = _lists(SIZE_CASES[case], dtype)
    got = ops.multi_tensor_dot(a, b)
    want = ops.multi_tensor_dot_ref(a, b)
    assert got.shape == (3,)
    torch.testing.assert_close(got, want, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_dot_invariants_against_float64(dtype, seed):
    a, b = _lists([1000, 33, 4097], dtype)
    dot, aa, bb = ops.multi_tensor_dot(a, b).double()
    flat_a = torch.cat([t.double() for t in a])
    flat_b = torch.cat([t.double() for t in b])
    assert abs(dot - flat_a @ flat_b) <= 1e-6 * flat_a.norm() * flat_b.norm()
    assert aa >= 0 and bb >= 0
    assert dot**2 <= aa * bb * (1 + 1e-6)  # Cauchy-Schwarz


def test_dot_deterministic(seed):
    a, b = _lists([300_000, 5, 70_001], torch.float32)
    first = ops.multi_tensor_dot(a, b)
    for _ in range(3):
        assert torch.equal(ops.multi_tensor_dot(a, b), first)


def test_dot_accepts_noncontiguous(seed):
    a = [torch.randn(6, 8).t()]
    b = [torch.randn(8, 6)]
    torch.testing.assert_close(ops.multi_tensor_dot(a, b), ops.multi_tensor_dot_ref(a, b))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", SIZE_CASES)
def test_axpy_matches_ref(case, dtype, seed):
    x, y = _lists(SIZE_CASES[case], dtype)
    x_ref = [t.clone() for t in x]
    alpha = torch.randn((), dtype=dtype)
    ops.multi_tensor_axpy(x, y, alpha)
    ops.multi_tensor_axpy_ref(x_ref, y, alpha)
    for got, want in zip(x, x_ref):
        torch.testing.assert_close(got, want, **TOL[dtype])


def test_axpy_writes_every_element(seed):
    # Every element, in the vectorised body and in the tail, is updated exactly once.
    x, y = _lists([70_000, 3], torch.float32)
    before = [t.clone() for t in x]
    ops.multi_tensor_axpy(x, y, torch.tensor(2.0))
    for xb, xa, yi in zip(before, x, y):
        torch.testing.assert_close(xa, xb + 2.0 * yi)


def test_axpy_alpha_other_dtype_is_cast(seed):
    x, y = _lists([17], torch.float64)
    want = x[0] + 0.25 * y[0]
    ops.multi_tensor_axpy(x, y, torch.tensor(0.25, dtype=torch.float32))
    torch.testing.assert_close(x[0], want)


@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 5000), max_size=12),
    double=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_dot_and_axpy_property(sizes, double, seed):
    torch.manual_seed(seed)
    dtype = torch.float64 if double else torch.float32
    a, b = _lists(sizes, dtype)
    torch.testing.assert_close(ops.multi_tensor_dot(a, b), ops.multi_tensor_dot_ref(a, b), **TOL[dtype])
    x = [t.clone() for t in a]
    alpha = torch.randn((), dtype=dtype)
    ops.multi_tensor_axpy(x, b, alpha)
    for xi, ai, bi in zip(x, a, b):
        torch.testing.assert_close(xi, ai + alpha * bi, **TOL[dtype])


# --- bad input: clear errors that name the argument, nothing modified --------------------------


def test_mismatched_lengths():
    with pytest.raises(ValueError, match="argument 'b'"):
        ops.multi_tensor_dot([torch.randn(3)], [])
    with pytest.raises(ValueError, match="argument 'y'"):
        ops.multi_tensor_axpy([torch.randn(3)], [], torch.tensor(1.0))


def test_mismatched_shapes():
    with pytest.raises(ValueError, match=r"argument 'b\[0\]'.*shape"):
        ops.multi_tensor_dot([torch.randn(3)], [torch.randn(4)])


def test_mismatched_dtypes():
    with pytest.raises(ValueError, match=r"argument 'b\[1\]'.*dtype"):
        ops.multi_tensor_dot([torch.randn(3), torch.randn(2)], [torch.randn(3), torch.randn(2).double()])
    with pytest.raises(ValueError, match=r"argument 'a'.*float32 or float64"):
        ops.multi_tensor_dot([torch.ones(3, dtype=torch.int64)], [torch.ones(3, dtype=torch.int64)])


def test_mismatched_devices():
    with pytest.raises(ValueError, match=r"argument 'b\[0\]'.*device"):
        ops.multi_tensor_dot([torch.randn(3)], [torch.randn(3, device="meta")])


def test_bad_alpha_leaves_x_untouched():
    x = [torch.randn(5)]
    before = x[0].clone()
    with pytest.raises(ValueError, match="argument 'alpha'"):
        ops.multi_tensor_axpy(x, [torch.randn(5)], torch.randn(2))
    with pytest.raises(ValueError, match="argument 'alpha'"):
        ops.multi_tensor_axpy(x, [torch.randn(5)], 0.5)
    assert torch.equal(x[0], before)


def test_noncontiguous_x_rejected():
    x = [torch.randn(4, 6).t()]
    with pytest.raises(ValueError, match=r"argument 'x\[0\]'.*contiguous"):
        ops.multi_tensor_axpy(x, [torch.randn(6, 4)], torch.tensor(1.0))


def test_not_a_list():
    with pytest.raises(ValueError, match="argument 'a'"):
        ops.multi_tensor_dot(torch.randn(3), [torch.randn(3)])


# --- torch.library integration ----------------------------------------------------------------


def test_opcheck(seed):
    a, b = _lists([5, 0, 9], torch.float32)
    torch.library.opcheck(torch.ops.pfkernels.multi_tensor_dot.default, (a, b))
    torch.library.opcheck(torch.ops.pfkernels.multi_tensor_axpy.default, (a, b, torch.tensor(0.3)))


def test_under_torch_compile(seed):
    a, b = _lists([128, 31], torch.float32)

    @torch.compile(backend="eager", fullgraph=True)
    def fused(a, b):
        return ops.multi_tensor_dot(a, b) * 2

    torch.testing.assert_close(fused(a, b), 2 * ops.multi_tensor_dot_ref(a, b))


# --- CUDA -------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", SIZE_CASES)
def test_cuda_matches_ref(case, dtype, seed):
    a, b = _lists(SIZE_CASES[case], dtype, "cuda")
    if a:
        torch.testing.assert_close(ops.multi_tensor_dot(a, b), ops.multi_tensor_dot_ref(a, b), **TOL[dtype])
    x = [t.clone() for t in a]
    x_ref = [t.clone() for t in a]
    alpha = torch.randn((), dtype=dtype, device="cuda")
    ops.multi_tensor_axpy(x, b, alpha)
    ops.multi_tensor_axpy_ref(x_ref, b, alpha)
    for got, want in zip(x, x_ref):
        torch.testing.assert_close(got, want, **TOL[dtype])


@pytest.mark.cuda
def test_cuda_no_host_sync(seed):
    a, b = _lists([1 << 20, 3, 70_000] * 20, torch.float32, "cuda")
    alpha = torch.tensor(0.1, device="cuda")
    ops.multi_tensor_dot(a, b)  # warm-up
    torch.cuda.set_sync_debug_mode("error")
    try:
        ops.multi_tensor_dot(a, b)
        ops.multi_tensor_axpy(a, b, alpha)
    finally:
        torch.cuda.set_sync_debug_mode("default")


# --- momentum update (the fused step of DAL) ----------------------------------------------------


def _update_case(sizes, dtype, momentum, device="cpu"):
    params, grads = _lists(sizes, dtype, device)
    bufs = [torch.randn(n, dtype=dtype, device=device) for n in sizes] if momentum is not None else []
    return params, grads, bufs


@pytest.mark.parametrize("momentum", [None, 0.0, 0.9])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", SIZE_CASES)
def test_momentum_update_matches_ref(case, dtype, momentum, seed):
    params, grads, bufs = _update_case(SIZE_CASES[case], dtype, momentum)
    params_ref = [t.clone() for t in params]
    bufs_ref = [t.clone() for t in bufs]
    rate = torch.rand((), dtype=dtype)
    ops.multi_tensor_momentum_update(params, grads, bufs, rate, momentum or 0.0)
    ops.multi_tensor_momentum_update_ref(params_ref, grads, bufs_ref, rate, momentum or 0.0)
    for got, want in zip(params + bufs, params_ref + bufs_ref):
        torch.testing.assert_close(got, want, **TOL[dtype])


@pytest.mark.parametrize("nesterov_free_momentum", [0.0, 0.5])
def test_momentum_update_is_torch_sgd(nesterov_free_momentum, seed):
    # Zero-initialised buffers reproduce torch.optim.SGD(momentum=m) step after step.
    sizes = [70_001, 3, 128]
    params = [torch.randn(n, dtype=torch.float64) for n in sizes]
    torch_params = [torch.nn.Parameter(t.clone()) for t in params]
    sgd = torch.optim.SGD(torch_params, lr=0.3, momentum=nesterov_free_momentum)
    bufs = [torch.zeros_like(t) for t in params] if nesterov_free_momentum else []
    for _ in range(3):
        grads = [torch.randn_like(t) for t in params]
        for tp, g in zip(torch_params, grads):
            tp.grad = g.clone()
        sgd.step()
        ops.multi_tensor_momentum_update(params, grads, bufs, torch.tensor(0.3, dtype=torch.float64),
                                         nesterov_free_momentum)
    for got, want in zip(params, torch_params):
        torch.testing.assert_close(got, want.detach(), rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("fn", [ops.multi_tensor_momentum_update, ops.multi_tensor_momentum_update_ref])
def test_momentum_update_nonfinite_rate_skips(fn, bad, seed):
    params, grads, bufs = _update_case([70_000, 5], torch.float32, 0.9)
    before = [t.clone() for t in params + bufs]
    fn(params, grads, bufs, torch.tensor(bad), 0.9)
    for got, want in zip(params + bufs, before):
        assert torch.equal(got, want)


def test_momentum_update_writes_every_element(seed):
    params, grads, bufs = _update_case([70_000, 3], torch.float32, 0.5)
    want_b = [0.5 * b + g for b, g in zip(bufs, grads)]
    want_p = [p - 2.0 * b for p, b in zip(params, want_b)]
    ops.multi_tensor_momentum_update(params, grads, bufs, torch.tensor(2.0), 0.5)
    for got, want in zip(params + bufs, want_p + want_b):
        torch.testing.assert_close(got, want)


def test_momentum_update_bad_input_leaves_state_untouched():
    params, grads, bufs = _update_case([5, 4], torch.float32, 0.9)
    before = [t.clone() for t in params + bufs]
    with pytest.raises(ValueError, match="argument 'bufs'"):
        ops.multi_tensor_momentum_update(params, grads, bufs[:1], torch.tensor(1.0), 0.9)
    with pytest.raises(ValueError, match=r"argument 'bufs\[1\]'.*shape"):
        ops.multi_tensor_momentum_update(params, grads, [bufs[0], torch.zeros(3)], torch.tensor(1.0), 0.9)
    with pytest.raises(ValueError, match="argument 'grads'"):
        ops.multi_tensor_momentum_update(params, grads[:1], bufs, torch.tensor(1.0), 0.9)
    with pytest.raises(ValueError, match="argument 'rate'"):
        ops.multi_tensor_momentum_update(params, grads, bufs, 1.0, 0.9)
    with pytest.raises(ValueError, match="argument 'rate'"):
        ops.multi_tensor_momentum_update(params, grads, bufs, torch.ones(2), 0.9)
    with pytest.raises(ValueError, match="argument 'momentum'"):
        ops.multi_tensor_momentum_update(params, grads, bufs, torch.tensor(1.0), float("nan"))
    with pytest.raises(ValueError, match=r"argument 'params\[0\]'.*contiguous"):
        ops.multi_tensor_momentum_update([torch.randn(4, 6).t()], [torch.randn(6, 4)], [], torch.tensor(1.0))
    for got, want in zip(params + bufs, before):
        assert torch.equal(got, want)


def test_momentum_update_opcheck_and_compile(seed):
    params, grads, bufs = _update_case([5, 0, 9], torch.float32, 0.9)
    torch.library.opcheck(
        torch.ops.pfkernels.multi_tensor_momentum_update.default,
        (params, grads, bufs, torch.tensor(0.3), 0.9),
    )
    torch.library.opcheck(
        torch.ops.pfkernels.multi_tensor_momentum_update.default,
        (params, grads, [], torch.tensor(0.3), 0.0),
    )
    params_ref = [t.clone() for t in params]
    bufs_ref = [t.clone() for t in bufs]

    @torch.compile(backend="eager", fullgraph=True)
    def step(params, grads, bufs):
        ops.multi_tensor_momentum_update(params, grads, bufs, torch.tensor(0.25), 0.9)

    step(params, grads, bufs)
    ops.multi_tensor_momentum_update_ref(params_ref, grads, bufs_ref, torch.tensor(0.25), 0.9)
    for got, want in zip(params + bufs, params_ref + bufs_ref):
        torch.testing.assert_close(got, want)


@pytest.mark.cuda
@pytest.mark.parametrize("momentum", [None, 0.9])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", SIZE_CASES)
def test_cuda_momentum_update_matches_ref(case, dtype, momentum, seed):
    params, grads, bufs = _update_case(SIZE_CASES[case], dtype, momentum, "cuda")
    params_ref = [t.clone() for t in params]
    bufs_ref = [t.clone() for t in bufs]
    rate = torch.rand((), dtype=dtype, device="cuda")
    ops.multi_tensor_momentum_update(params, grads, bufs, rate, momentum or 0.0)
    ops.multi_tensor_momentum_update_ref(params_ref, grads, bufs_ref, rate, momentum or 0.0)
    for got, want in zip(params + bufs, params_ref + bufs_ref):
        torch.testing.assert_close(got, want, **TOL[dtype])


@pytest.mark.cuda
def test_cuda_momentum_update_no_host_sync_and_nan_skip(seed):
    params, grads, bufs = _update_case([1 << 20, 3, 70_000] * 20, torch.float32, 0.9, "cuda")
    rate = torch.tensor(0.1, device="cuda")
    ops.multi_tensor_momentum_update(params, grads, bufs, rate, 0.9)  # warm-up
    before = [t.clone() for t in params + bufs]
    torch.cuda.set_sync_debug_mode("error")
    try:
        ops.multi_tensor_momentum_update(params, grads, bufs, torch.full_like(rate, float("nan")), 0.9)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for got, want in zip(params + bufs, before):
        assert torch.equal(got, want)


def test_momentum_update_rejects_noncontiguous_targets():
    params = [torch.randn(4, 6).t()]
    grads = [torch.randn(6, 4)]
    before = params[0].clone()
    with pytest.raises(ValueError, match=r"argument 'params\[0\]'.*contiguous"):
        ops.multi_tensor_momentum_update(params, grads, [], torch.tensor(0.1))
    bufs = [torch.zeros(4, 6).t()]
    with pytest.raises(ValueError, match=r"argument 'bufs\[0\]'.*contiguous"):
        ops.multi_tensor_momentum_update([torch.randn(6, 4)], grads, bufs, torch.tensor(0.1))
    assert torch.equal(params[0], before)
