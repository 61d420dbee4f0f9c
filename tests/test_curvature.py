"""GGN and Fisher operators against dense matrices built from Jacobians; the shared core."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pfkernels
from pfkernels import (
    EmpiricalFisherOperator,
    GGNOperator,
    HessianOperator,
    MCFisherOperator,
    eigsh,
    losses,
)
from pfkernels.data import mlp, mse_loss

pytestmark = pytest.mark.usefixtures("one_thread")


def rel(a, b):
    return float((a - b).norm() / b.norm())


def flat_model(model):
    named = dict(model.named_parameters())
    names = list(named)
    shapes = [named[n].shape for n in names]
    sizes = [named[n].numel() for n in names]
    theta0 = torch.cat([named[n].detach().reshape(-1) for n in names])

    def f(theta, x):
        params = {n: c.view(s) for n, c, s in zip(names, torch.split(theta, sizes), shapes)}
        return torch.func.functional_call(model, params, (x,))

    return f, theta0


def dense_jacobian(model, x):
    """J = ∂f/∂θ as [outputs..., n] and the outputs."""
    f, theta0 = flat_model(model)
    jac = torch.autograd.functional.jacobian(lambda t: f(t, x), theta0)
    return jac, f(theta0, x).detach()


def dense_ggn(model, loss_fn, batches):
    """Σ_b n_b J_bᵀ (∇²_f L_b) J_b / Σ_b n_b, with ∇²_f L_b by autograd on the outputs."""
    total = sum(x.shape[0] for x, _ in batches)
    out = 0
    for x, y in batches:
        jac, f0 = dense_jacobian(model, x)
        m = f0.numel()
        hl = torch.autograd.functional.hessian(
            lambda f, f0=f0, y=y: loss_fn(f.view(f0.shape), y), f0.reshape(-1))
        J = jac.reshape(m, -1)
        out = out + x.shape[0] * (J.T @ hl.reshape(m, m) @ J)
    return out / total


def dense_empirical_fisher(model, per_example_loss, batches):
    f, theta0 = flat_model(model)
    total = sum(x.shape[0] for x, _ in batches)
    out = 0
    for x, y in batches:
        for i in range(x.shape[0]):
            g = torch.autograd.functional.jacobian(
                lambda t, i=i, x=x, y=y: per_example_loss(f(t, x[i:i + 1]), y[i:i + 1]), theta0)
            out = out + torch.outer(g, g)
    return out / total


def dense_of(op):
    n = op.shape[0]
    return op @ torch.eye(n, dtype=op.dtype)


def problem(seed, n=10, d=3, width=5, out=3, classes=False, activation="tanh"):
    g = torch.Generator().manual_seed(seed)
    model = mlp(d, out, width=width, depth=1, activation=activation, seed=seed % 1000).double()
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    if classes:
        y = torch.randint(0, out, (n,), generator=g)
    else:
        y = torch.randn(n, out, generator=g, dtype=torch.float64)
    return model, x, y


def test_ggn_mse_matches_jacobian_product(seed):
    model, x, y = problem(seed)
    x2, y2 = x[:4] * 2, y[:4] - 1
    op = GGNOperator(model, mse_loss, [(x, y), (x2, y2)])
    G = dense_of(op)
    ref = dense_ggn(model, mse_loss, [(x, y), (x2, y2)])
    assert rel(G, ref) < 1e-10
    assert float(torch.linalg.eigvalsh(G).min()) > -1e-10 * float(G.norm())
    assert op.num_matvecs == op.shape[0]


@pytest.mark.parametrize("loss", ["F.cross_entropy", "module-sum-ignore", "pfk", "user"])
def test_ggn_cross_entropy_matches_jacobian_product(seed, loss):
    model, x, y = problem(seed, classes=True)
    if loss == "module-sum-ignore":
        y[::3] = 7
        loss_fn = nn.CrossEntropyLoss(ignore_index=7, reduction="sum")
    else:
        loss_fn = {"F.cross_entropy": F.cross_entropy, "pfk": losses.classification_loss,
                   "user": lambda out, t: F.cross_entropy(out, t)}[loss]
    op = GGNOperator(model, loss_fn, (x, y))
    G = dense_of(op)
    ref = dense_ggn(model, lambda f, t: F.cross_entropy(
        f, t, ignore_index=7 if loss == "module-sum-ignore" else -100,
        reduction="sum" if loss == "module-sum-ignore" else "mean"), [(x, y)])
    assert rel(G, ref) < 1e-10
    assert float(torch.linalg.eigvalsh(G).min()) > -1e-10 * float(G.norm())


def test_ggn_equals_hessian_for_linear_model_with_mse(seed):
    g = torch.Generator().manual_seed(seed)
    model = nn.Linear(4, 3).double()
    x = torch.randn(9, 4, generator=g, dtype=torch.float64)
    y = torch.randn(9, 3, generator=g, dtype=torch.float64)
    G = dense_of(GGNOperator(model, mse_loss, (x, y)))
    H = dense_of(HessianOperator(model, mse_loss, (x, y)))
    assert rel(G, H) < 1e-12


def test_ggn_differs_from_hessian_for_nonlinear_model(seed):
    """The test above could pass with a Hessian in disguise: here the two must differ."""
    model, x, y = problem(seed)
    G = dense_of(GGNOperator(model, mse_loss, (x, y)))
    H = dense_of(HessianOperator(model, mse_loss, (x, y)))
    assert rel(G, H) > 1e-3


@pytest.mark.parametrize("classes", [False, True])
def test_empirical_fisher_matches_per_example_gradients(seed, classes):
    model, x, y = problem(seed, classes=classes)
    loss_fn = F.cross_entropy if classes else mse_loss
    op = EmpiricalFisherOperator(model, loss_fn, [(x[:6], y[:6]), (x[6:], y[6:])])
    Fm = dense_of(op)
    ref = dense_empirical_fisher(model, loss_fn, [(x[:6], y[:6]), (x[6:], y[6:])])
    assert rel(Fm, ref) < 1e-10
    assert float(torch.linalg.eigvalsh(Fm).min()) > -1e-10 * float(Fm.norm())


@pytest.mark.parametrize("classes", [False, True])
def test_mc_fisher_fixed_psd_and_tends_to_ggn(seed, classes):
    model, x, y = problem(seed, classes=classes)
    loss_fn = F.cross_entropy if classes else mse_loss
    op = MCFisherOperator(model, loss_fn, (x, y), mc_samples=1, seed=seed % 100)
    A = dense_of(op)
    assert torch.equal(A, dense_of(op))  # the same labels at the same θ: a fixed matrix
    assert rel(A, A.T) < 1e-12
    assert float(torch.linalg.eigvalsh(A).min()) > -1e-10 * float(A.norm())
    other = dense_of(MCFisherOperator(model, loss_fn, (x, y), seed=seed % 100 + 1))
    assert rel(A, other) > 1e-3  # another seed, other labels
    G = dense_of(GGNOperator(model, loss_fn, (x, y)))
    many = dense_of(MCFisherOperator(model, loss_fn, (x, y), mc_samples=4000, seed=seed % 100))
    # Monte-Carlo error ~ 1/sqrt(4000 x 10 examples), far below 0.1; one sample is far off
    assert rel(many, G) < 0.1
    assert rel(A, G) > rel(many, G)


def test_mc_fisher_rejects_unknown_loss(seed):
    model, x, y = problem(seed)
    with pytest.raises(ValueError, match="loss_fn"):
        MCFisherOperator(model, lambda out, t: (out - t).abs().mean(), (x, y))


@pytest.mark.parametrize("cls", [GGNOperator, EmpiricalFisherOperator, MCFisherOperator])
def test_output_operators_in_eigsh_and_scopes(seed, cls):
    model, x, y = problem(seed, n=30, width=8)
    op = cls(model, mse_loss, (x, y))
    dense = dense_of(op)
    top = torch.linalg.eigvalsh(dense).flip(0)[:3]
    res = eigsh(op, k=3, tol=1e-8, seed=seed % 1000)
    assert torch.allclose(res.eigenvalues, top, rtol=1e-6, atol=1e-9 * float(top[0]))
    v = torch.randn(4, op.shape[0], dtype=torch.float64)
    with op.reuse_graph():
        inside = op @ v
        again = op @ v[1]
    assert rel(inside, v @ dense) < 1e-10 and rel(again, inside[1]) < 1e-12
    S = op.to_scipy()
    assert np.allclose(S @ v[0].numpy(), (op @ v[0]).numpy(), rtol=1e-12, atol=1e-14)


def test_outputs_operator_streaming_data_and_dtype(seed):
    model, x, y = problem(seed)
    model = model.float()
    x, y = x.float().double(), y.float().double()  # the same values at both precisions
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x.float(), y.float()),
                                         batch_size=4)
    op = GGNOperator(model, mse_loss, loader, dtype=torch.float64)
    assert op.dtype == torch.float64
    ref = GGNOperator(model.double(), mse_loss, [(x[i:i + 4], y[i:i + 4]) for i in (0, 4, 8)])
    v = torch.randn(op.shape[0], dtype=torch.float64)
    assert rel(op @ v, ref @ v) < 1e-10


def test_curvature_operator_by_name(seed):
    model, x, y = problem(seed)
    for name, cls in [("hessian", HessianOperator), ("ggn", GGNOperator),
                      ("fisher", MCFisherOperator), ("empirical-fisher", EmpiricalFisherOperator)]:
        assert type(pfkernels.curvature_operator(name, model, mse_loss, (x, y))) is cls
    with pytest.raises(ValueError, match="curvature"):
        pfkernels.curvature_operator("kfac", model, mse_loss, (x, y))
    with pytest.raises(ValueError, match="method"):
        pfkernels.curvature_operator("ggn", model, mse_loss, (x, y), method="double-backward")


def test_ggn_of_a_function_is_rejected():
    with pytest.raises(TypeError, match="model"):
        GGNOperator(pfkernels.sources.FunctionSource(lambda t: t.pow(2).sum(),
                                                     torch.ones(3)), None, None)


def test_ggn_nan_names_operator(seed):
    model, x, y = problem(seed)
    op = GGNOperator(model, mse_loss, (x, y))
    v = torch.full((op.shape[0],), float("nan"), dtype=torch.float64)
    with pytest.raises(ValueError, match="'v'"):
        op @ v


class TinyLM(nn.Module):
    """Embedding, one tanh layer, a vocabulary projection: [B, T] ids -> [B, T, V] logits."""

    def __init__(self, vocab=7, width=4):
        super().__init__()
        self.emb = nn.Embedding(vocab, width)
        self.mix = nn.Linear(width, width)
        self.out = nn.Linear(width, vocab)

    def forward(self, ids):
        h = self.emb(ids)
        h = torch.tanh(self.mix(h + h.cumsum(1)))
        return self.out(h)


def test_causal_lm_loss_ggn_matches_jacobian_product(seed):
    g = torch.Generator().manual_seed(seed)
    model = TinyLM().double()
    ids = torch.randint(0, 7, (3, 5), generator=g)
    labels = ids.clone()
    labels[0, 2] = -100
    op = GGNOperator(model, losses.causal_lm_loss, (ids, labels))

    def reference_loss(logits, t):
        return F.cross_entropy(logits[:, :-1].reshape(-1, 7), t[:, 1:].reshape(-1))

    ref = dense_ggn(model, reference_loss, [(ids, labels)])
    assert rel(dense_of(op), ref) < 1e-10
    with torch.no_grad():
        logits = model(ids)
    difference = losses.causal_lm_loss(logits, labels) - reference_loss(logits, labels)
    assert abs(float(difference)) < 1e-14


def test_cross_entropy_hessian_product_rows():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 5, generator=g, dtype=torch.float64)
    U = torch.randn(6, 5, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 1, -100, 3, 4, -100])
    for reduction in ("mean", "sum"):
        out = losses.cross_entropy_hessian_product(logits, U, t, reduction=reduction)
        hl = torch.autograd.functional.hessian(
            lambda f, r=reduction: F.cross_entropy(f.view(6, 5), t, reduction=r),
            logits.reshape(-1))
        assert rel(out.reshape(-1), hl @ U.reshape(-1)) < 1e-12
        assert torch.equal(out[2], torch.zeros(5, dtype=torch.float64))
    with pytest.raises(ValueError, match="reduction"):
        losses.cross_entropy_hessian_product(logits, U, t, reduction="none")
    with pytest.raises(ValueError, match="U"):
        losses.cross_entropy_hessian_product(logits, U[:, :4], t)


def test_tracker_layer_sharpness_and_density_take_other_curvatures(seed):
    model, x, y = problem(seed, n=20, width=6, classes=True)
    G = dense_of(GGNOperator(model, F.cross_entropy, (x, y)))
    top = float(torch.linalg.eigvalsh(G)[-1])
    tracker = pfkernels.SharpnessTracker(model, F.cross_entropy, (x, y), curvature="ggn",
                                         threshold=100.0, tol=1e-6, every=1)
    record = tracker.step(0)
    assert isinstance(tracker.hessian, GGNOperator)
    assert record["sharpness"] == pytest.approx(top, rel=1e-5)
    # piggybacking is for the Hessian only: the loss is backpropagated, the GGN measured on data
    loss = F.cross_entropy(model(x), y)
    record = tracker.step(1, loss=loss)
    assert record["sharpness"] == pytest.approx(top, rel=1e-5)
    assert all(p.grad is not None for p in model.parameters())
    blocks = pfkernels.layer_sharpness(model, F.cross_entropy, (x, y), curvature="ggn",
                                       by="module", tol=1e-8)
    offset = 0
    for label, res in blocks.items():
        size = sum(p.numel() for name, p in model.named_parameters()
                   if name.rsplit(".", 1)[0] == label)
        block = G[offset:offset + size, offset:offset + size]
        assert float(res.eigenvalues[0]) == pytest.approx(
            float(torch.linalg.eigvalsh(block)[-1]), rel=1e-6)
        offset += size
    density = pfkernels.spectral_density(GGNOperator(model, F.cross_entropy, (x, y)),
                                         num_probes=2, num_steps=10, seed=0)
    assert float(density.nodes.min()) > -1e-8 * top  # a PSD matrix's Ritz values
    res = pfkernels.sharpness(model, F.cross_entropy, (x, y), curvature="ggn", tol=1e-8)
    assert float(res.eigenvalues[0]) == pytest.approx(top, rel=1e-6)
