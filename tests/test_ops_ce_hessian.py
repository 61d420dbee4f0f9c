"""ce_hessian family: the softmax cross-entropy loss-Hessian product against its ref, against a
float64 double backward through F.cross_entropy, and on the awkward inputs (empty, single rows and
classes, odd and LM-sized vocabularies, masked and huge logits, ignored rows, every dtype)."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICES

from pfkernels import ops

DTYPES = [torch.float32, torch.float64, torch.bfloat16]
# Relative to the size of the terms: entry j is p_j u_j − p_j (p·u), and where p·u ≈ u_j (one class
# holding most of the mass) the difference cancels, so errors are measured against
# max_j p_j (|u_j| + |p·u|) / n. Products and exponentials in float32 (float64), rounded once more
# to bfloat16 on the way out.
TOL = {torch.float32: 2e-6, torch.float64: 1e-13, torch.bfloat16: 1e-2}


def _inputs(N, V, dtype, gen, scale=3.0, device="cpu"):
    z = (torch.randn(N, V, generator=gen, dtype=torch.float64) * scale).to(device, dtype)
    u = torch.randn(N, V, generator=gen, dtype=torch.float64).to(device, dtype)
    return z, u


def _term_size(z, u, target=None, ignore_index=-100, reduction="mean"):
    """max over counted rows and classes of p_j (|u_j| + |p·u|) / n, in float64."""
    p = torch.softmax(z.double(), dim=-1)
    ud = u.double()
    size = p * (ud.abs() + (p * ud).sum(-1, keepdim=True).abs())
    if target is not None:
        size = size[target != ignore_index]
    if size.numel() == 0:
        return 0.0
    n = size.shape[0] if reduction == "mean" else 1
    return float(size.nan_to_num(0.0).max()) / n


def _assert_matches(got, want, dtype, size=0.0):
    assert got.dtype == want.dtype and got.shape == want.shape
    if want.numel() == 0:
        return
    g, w = got.double().cpu(), want.double().cpu()
    scale = max(float(w.abs().max()), size, 1e-30)
    err = float((g - w).abs().max())
    assert err <= TOL[dtype] * scale, f"max error {err:.3g} vs term size {scale:.3g}"


def _autograd_hvp(z, u, target, **kwargs):
    """∇²_z F.cross_entropy(z, target) · u by double backward, in float64."""
    z = z.detach().double().requires_grad_(True)
    loss = F.cross_entropy(z, target, **kwargs)
    (g,) = torch.autograd.grad(loss, z, create_graph=True)
    (hv,) = torch.autograd.grad(g, z, u.double())
    return hv


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N, V", [(0, 5), (3, 0), (1, 1), (1, 7), (2, 1), (5, 31), (7, 513),
                                  (4, 1025), (3, 4097)])
def test_matches_ref(N, V, dtype, device, gen):
    z, u = _inputs(N, V, dtype, gen, device=device)
    target = torch.randint(0, max(V, 1), (N,), generator=gen).to(device)
    if N > 2:
        target[1] = -100
    for reduction in ("mean", "sum"):
        for t in (target, None):
            got = ops.ce_hessian(z, u, t, reduction=reduction)
            _assert_matches(got, ops.ce_hessian_ref(z, u, t, reduction=reduction), dtype,
                            _term_size(z, u, t, reduction=reduction))


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_language_model_vocabulary(dtype, device, gen):
    # GPT-2's vocabulary, with logits of a trained model's spread and a few masked classes.
    z, u = _inputs(3, 50257, dtype, gen, scale=8.0, device=device)
    z[0, ::97] = -math.inf
    target = torch.tensor([5, -100, 50256], device=device)
    got = ops.ce_hessian(z, u, target)
    _assert_matches(got, ops.ce_hessian_ref(z, u, target), dtype, _term_size(z, u, target))
    assert torch.equal(got[1], torch.zeros_like(got[1]))
    assert bool((got[0, ::97] == 0).all())


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.25])
def test_equals_double_backward_of_cross_entropy(reduction, label_smoothing, gen):
    for N, V, ignore_index in ((1, 2, -100), (6, 11, -100), (9, 33, 4), (4, 3, 0)):
        z, u = _inputs(N, V, torch.float64, gen)
        target = torch.randint(0, V, (N,), generator=gen)
        target[N // 2] = ignore_index
        kwargs = dict(ignore_index=ignore_index, reduction=reduction,
                      label_smoothing=label_smoothing)
        want = _autograd_hvp(z, u, target, **kwargs)
        got = ops.ce_hessian(z, u, target, **kwargs)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
        for dtype in (torch.float32, torch.bfloat16):  # against float64 on the rounded inputs
            zd, ud = z.to(dtype), u.to(dtype)
            _assert_matches(ops.ce_hessian(zd, ud, target, **kwargs),
                            _autograd_hvp(zd, ud, target, **kwargs).to(dtype), dtype,
                            _term_size(zd, ud, target, ignore_index, reduction))


def test_without_target_every_row_counts(gen):
    z, u = _inputs(5, 9, torch.float64, gen)
    want = _autograd_hvp(z, u, torch.randint(0, 9, (5,), generator=gen))
    torch.testing.assert_close(ops.ce_hessian(z, u), want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("device", DEVICES)
def test_ignored_rows(device, gen):
    z, u = _inputs(6, 20, torch.float64, gen, device=device)
    target = torch.tensor([3, 7, 7, 0, 7, 19], device=device)
    z[1, 4] = math.nan  # an ignored row's logits are never read into the result
    out = ops.ce_hessian(z, u, target, ignore_index=7)
    assert torch.equal(out[[1, 2, 4]], torch.zeros(3, 20, dtype=torch.float64, device=device))
    # The three counted rows are divided by 3, not by 6.
    kept = [0, 3, 5]
    torch.testing.assert_close(
        out[kept], ops.ce_hessian(z[kept], u[kept], target[kept], ignore_index=7),
        rtol=1e-14, atol=0)
    torch.testing.assert_close(out[kept] * 3, ops.ce_hessian(z[kept], u[kept], reduction="sum"),
                               rtol=1e-14, atol=1e-17)
    # Every row ignored: zeros for both reductions (the mean loss itself would be NaN).
    for reduction in ("mean", "sum"):
        for fn in (ops.ce_hessian, ops.ce_hessian_ref):
            every = fn(z, u, torch.full((6,), 7, device=device), ignore_index=7,
                       reduction=reduction)
            assert torch.equal(every, torch.zeros_like(every))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_extreme_logits(dtype, device, gen):
    z, u = _inputs(6, 300, dtype, gen, device=device)
    z[0] += 1e4 if dtype != torch.bfloat16 else 1e3   # a large common offset: softmax is shift-free
    z[1, :150] = -math.inf                           # masked classes
    z[2, 1:] = -math.inf                             # one class left: p = e_0, H = 0
    z[3, 17] = 80.0                                  # one class dominates
    z[4, -1] = 200.0                                 # the max arrives in the row's last tile
    z[5, :] = -95.0                                  # e^{z-m} underflow territory is relative
    got = ops.ce_hessian(z, u)
    _assert_matches(got, ops.ce_hessian_ref(z, u), dtype, _term_size(z, u))
    assert bool(torch.isfinite(got).all())
    assert bool((got[1, :150] == 0).all()) and bool((got[2] == 0).all())


@pytest.mark.parametrize("device", DEVICES)
def test_non_finite_rows_give_nan_like_softmax(device, gen):
    z, u = _inputs(4, 40, torch.float32, gen, device=device)
    z[0, 3] = math.nan
    z[1, 5] = math.inf
    z[2, :] = -math.inf
    got, want = ops.ce_hessian(z, u), ops.ce_hessian_ref(z, u)
    assert bool(torch.isnan(got[:3]).all()) and bool(torch.isnan(want[:3]).all())
    _assert_matches(got[3:], want[3:], torch.float32, _term_size(z[3:], u[3:]) / 4)


def test_non_contiguous_inputs(gen):
    z, u = _inputs(40, 6, torch.float32, gen)
    zt, ut = z.t(), u.t()  # [6, 40] views with strides (1, 6)
    target = torch.arange(12)[::2]
    _assert_matches(ops.ce_hessian(zt, ut, target), ops.ce_hessian_ref(zt, ut, target),
                    torch.float32, _term_size(zt, ut, target))


def test_thread_count_does_not_change_bits(gen):
    z, u = _inputs(64, 3000, torch.float32, gen)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.ce_hessian(z, u)
        torch.set_num_threads(max(threads, 2))
        many = ops.ce_hessian(z, u)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)


def test_bad_input(gen):
    z, u = _inputs(4, 6, torch.float32, gen)
    target = torch.tensor([0, 1, 2, 3])
    cases = [
        ("weight", lambda: ops.ce_hessian(z, u, target, weight=torch.ones(6))),
        ("label_smoothing", lambda: ops.ce_hessian(z, u, target, label_smoothing=1.5)),
        ("reduction", lambda: ops.ce_hessian(z, u, target, reduction="none")),
        ("reduction", lambda: torch.ops.pfkernels.ce_hessian(z, u, target, -100, "batchmean")),
        ("ignore_index", lambda: ops.ce_hessian(z, u, target, ignore_index=True)),
        ("ignore_index", lambda: ops.ce_hessian(z, u, target, ignore_index=2**63)),
        ("logits", lambda: ops.ce_hessian(z[0], u[0])),
        ("logits", lambda: ops.ce_hessian(z.half(), u.half())),
        ("logits", lambda: ops.ce_hessian(z.tolist(), u)),
        ("tangent", lambda: ops.ce_hessian(z, u.double())),
        ("tangent", lambda: torch.ops.pfkernels.ce_hessian(z, u[:, :5], None, -100, "mean")),
        ("tangent", lambda: ops.ce_hessian(z, u.to("meta"))),
        ("target", lambda: ops.ce_hessian(z, u, target.int())),
        ("target", lambda: torch.ops.pfkernels.ce_hessian(z, u, target[:3], -100, "sum")),
        ("target", lambda: ops.ce_hessian(z, u, [0, 1, 2, 3])),
        ("target", lambda: ops.ce_hessian(z, u, target.float())),
    ]
    for name, call in cases:
        before = (z.clone(), u.clone(), target.clone())
        with pytest.raises(ValueError, match=f"argument '{name}'"):
            call()
        assert all(torch.equal(a, b) for a, b in zip(before, (z, u, target)))


def test_ref_refuses_what_the_op_refuses(gen):
    z, u = _inputs(4, 6, torch.float32, gen)
    for kwargs, name in ((dict(reduction="none"), "reduction"),
                         (dict(weight=torch.ones(6)), "weight"),
                         (dict(label_smoothing=-0.1), "label_smoothing")):
        for fn in (ops.ce_hessian, ops.ce_hessian_ref):
            with pytest.raises(ValueError, match=f"argument '{name}'"):
                fn(z, u, **kwargs)


def test_opcheck_and_compile(gen):
    z, u = _inputs(5, 37, torch.float32, gen)
    target = torch.tensor([1, -100, 3, 36, 0])
    for args in ((z, u, target, -100, "mean"), (z, u, None, -100, "sum"),
                 (z.double(), u.double(), target, 3, "mean")):
        torch.library.opcheck(torch.ops.pfkernels.ce_hessian.default, args)

    @torch.compile(backend="eager", fullgraph=True)
    def hvp(z, u, target):
        return ops.ce_hessian(z, u, target) * 2

    _assert_matches(hvp(z, u, target), ops.ce_hessian_ref(z, u, target) * 2, torch.float32,
                    2 * _term_size(z, u, target))


def test_vmap_over_tangents_and_logits(gen):
    z, u = _inputs(5, 37, torch.float32, gen)
    U = torch.randn(4, 5, 37, generator=gen)
    target = torch.tensor([1, -100, 3, 36, 0])
    got = torch.vmap(lambda t: ops.ce_hessian(z, t, target))(U)
    assert torch.equal(got, torch.stack([ops.ce_hessian(z, t, target) for t in U]))
    Z = torch.randn(3, 5, 37, generator=gen)
    T = torch.randint(0, 37, (3, 5), generator=gen)
    got = torch.vmap(ops.ce_hessian, in_dims=(0, None, 0))(Z, u, T)
    assert torch.equal(got, torch.stack([ops.ce_hessian(a, u, t) for a, t in zip(Z, T)]))


def test_losses_cross_entropy_hessian_product_runs_the_kernel(gen):
    from pfkernels import losses

    z, u = _inputs(6, 40, torch.float32, gen)
    target = torch.tensor([1, -100, 3, 39, 0, 7], dtype=torch.int32)  # any integer dtype
    got = losses.cross_entropy_hessian_product(z, u, target, reduction="sum")
    assert torch.equal(got, ops.ce_hessian(z, u, target.long(), reduction="sum"))
    # float16 has no kernel: the torch form, against the float64 ref
    half = losses.cross_entropy_hessian_product(z.half(), u.half(), target)
    want = ops.ce_hessian_ref(z.half().float(), u.half().float(), target.long())
    torch.testing.assert_close(half.float(), want, rtol=0, atol=2e-3 * float(want.abs().max()))


def test_fake_gives_the_shape_without_running():
    z = torch.empty(7, 50257, device="meta", dtype=torch.bfloat16)
    out = ops.ce_hessian(z, torch.empty_like(z), torch.empty(7, dtype=torch.int64, device="meta"))
    assert out.device.type == "meta" and out.shape == (7, 50257) and out.dtype == torch.bfloat16


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_matches_cpu(dtype, gen):
    z, u = _inputs(33, 50257, dtype, gen)
    target = torch.randint(0, 50257, (33,), generator=gen)
    target[::5] = -100
    cpu = ops.ce_hessian(z, u, target)
    gpu = ops.ce_hessian(z.cuda(), u.cuda(), target.cuda())
    size = _term_size(z, u, target)
    _assert_matches(gpu.cpu(), cpu, dtype, size)
    _assert_matches(gpu, ops.ce_hessian_ref(z.cuda(), u.cuda(), target.cuda()), dtype, size)
