"""Every op family on a tensor's own device, and an op inside a CUDA graph (torch.compile).

The CUDA entry points make their tensors' device current before they launch (csrc/cuda/
cuda_check.cuh, DeviceGuard): a launch goes to the current device, which need not be the
tensors' (here cuda:1 while cuda:0 is current).
"""

import pytest
import torch

from pfkernels import eigsh, ops

F64 = torch.float64


def _two_gpus() -> bool:
    return torch.cuda.is_available() and torch.cuda.device_count() >= 2


@pytest.mark.cuda
@pytest.mark.skipif(not _two_gpus(), reason="needs two CUDA GPUs")
def test_every_family_runs_on_the_tensors_device_not_the_current_one(gen):
    dev = torch.device("cuda:1")
    torch.cuda.set_device(0)
    sizes = [70_000, 3, 1 << 16]
    a = [torch.randn(n, generator=gen, dtype=F64) for n in sizes]
    b = [torch.randn(n, generator=gen, dtype=F64) for n in sizes]
    a1, b1 = [t.to(dev) for t in a], [t.to(dev) for t in b]

    dot = ops.multi_tensor_dot(a1, b1)
    assert dot.device == dev
    torch.testing.assert_close(dot.cpu(), ops.multi_tensor_dot_ref(a, b))

    alpha = torch.tensor(0.25, dtype=F64)
    x, x1 = [t.clone() for t in a], [t.clone() for t in a1]
    ops.multi_tensor_axpy_ref(x, b, alpha)
    ops.multi_tensor_axpy(x1, b1, alpha.to(dev))
    for got, want in zip(x1, x):
        torch.testing.assert_close(got.cpu(), want)

    rate = torch.tensor(0.1, dtype=F64)
    p, p1 = [t.clone() for t in a], [t.clone() for t in a1]
    ops.multi_tensor_momentum_update_ref(p, b, [], rate)
    ops.multi_tensor_momentum_update(p1, b1, [], rate.to(dev))
    for got, want in zip(p1, p):
        torch.testing.assert_close(got.cpu(), want)

    sums = ops.multi_tensor_dot_ref(a, b).abs()
    torch.testing.assert_close(ops.dal_rate(sums.to(dev), 1.0, 5.0, 0.1).cpu(),
                               ops.dal_rate_ref(sums, 1.0, 5.0, 0.1))

    n, k = 5000, 4
    u = torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=F64)).Q
    g = torch.randn(n, generator=gen, dtype=F64)
    lam = torch.rand(k, generator=gen, dtype=F64) * 3
    field, proj = ops.flow_field(g.to(dev), lam.to(dev), u.to(dev), 0.3)
    want_field, want_proj = ops.flow_field_ref(g, lam, u, 0.3)
    torch.testing.assert_close(field.cpu(), want_field)
    torch.testing.assert_close(proj.cpu(), want_proj)

    alpha_t = torch.randn(6, 20, generator=gen, dtype=F64)
    beta_t = torch.randn(6, 19, generator=gen, dtype=F64)
    evals, _ = ops.tridiag_eigh(alpha_t.to(dev), beta_t.to(dev), "none")
    want, _ = ops.tridiag_eigh_ref(alpha_t, beta_t, "none")
    torch.testing.assert_close(evals.cpu(), want)

    # The Lanczos kernels (step, dots, Ritz vectors) through eigsh on a dense matrix.
    M = torch.randn(300, 300, generator=gen, dtype=F64)
    M = M + M.T
    res = eigsh(M.to(dev), k=3, tol=1e-8, seed=0)
    assert res.eigenvectors.device == dev
    top = torch.linalg.eigvalsh(M).flip(0)[:3]
    torch.testing.assert_close(res.eigenvalues.cpu(), top, rtol=1e-6, atol=1e-6)

    logits = torch.randn(7, 3001, generator=gen, dtype=F64) * 3
    tangent = torch.randn(7, 3001, generator=gen, dtype=F64)
    target = torch.tensor([0, -100, 5, 3000, 1, -100, 2])
    out = ops.ce_hessian(logits.to(dev), tangent.to(dev), target.to(dev))
    assert out.device == dev
    torch.testing.assert_close(out.cpu(), ops.ce_hessian_ref(logits, tangent, target),
                               rtol=1e-12, atol=1e-16)

    torch.cuda.synchronize(dev)
    assert torch.cuda.current_device() == 0  # the guards restored the caller's device


@pytest.mark.cuda
def test_op_inside_a_cuda_graph_under_torch_compile_reduce_overhead(gen):
    """mode="reduce-overhead" captures the op into a CUDA graph and replays it: the op must
    launch on the capturing stream without host syncs, and a replay must see new inputs."""
    a = [torch.randn(n, generator=gen).cuda() for n in (1000, 70_000)]
    b = [torch.randn(n, generator=gen).cuda() for n in (1000, 70_000)]

    @torch.compile(mode="reduce-overhead", fullgraph=True)
    def scaled_dot(a, b):
        return ops.multi_tensor_dot(a, b) * 2

    for _ in range(4):  # warm-up runs, then the recorded graph's replays
        for t in (*a, *b):
            t.copy_(torch.randn(t.shape, generator=gen))
        got = scaled_dot(a, b).clone()
        want = 2 * ops.multi_tensor_dot_ref([t.cpu() for t in a], [t.cpu() for t in b])
        torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-4)
