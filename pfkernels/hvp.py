"""Hessian-vector products of a model's loss as a linear operator over its flat parameters.

:class:`HessianOperator` is the Hessian ``H = ∇²_θ E(θ)`` of the example-weighted mean loss
``E(θ) = Σ_b n_b ℓ_b(θ) / Σ_b n_b`` over one batch or an iterable of batches, where θ is the flat
concatenation of the selected parameters in ``model.named_parameters()`` order. It never forms H:
each product is computed by automatic differentiation, batch by batch.

Two ways to take a product (``method``):

- ``"double-backward"``: g = ∇E by reverse mode with ``create_graph``, then ∇(g·v) by a second
  reverse pass (Pearlmutter's trick, what PyHessian does). For a block of B vectors the forward
  pass and the first backward are shared and only the second backward runs B times. Inside
  :meth:`HessianOperator.reuse_graph` (which :func:`pfkernels.eigsh` enters for the length of a
  solve) the first-order graph is kept between calls, so a Lanczos solve pays one backward per
  product.
- ``"forward-over-reverse"``: ``torch.func.jvp(torch.func.grad(E), (θ,), (v,))``; blocks of vectors
  go through ``torch.func.vmap``.
- ``"finite-difference"``: ``(∇E(θ + εv) − ∇E(θ − εv)) / 2ε`` (:mod:`pfkernels.finite_difference`:
  the step ε from the dtype, the RMS parameter ‖θ‖/√n and ‖v‖): two gradients per product,
  no second derivative, so it also serves models sharded by FSDP2 (below) and losses whose
  second derivative torch lacks. Never picked by ``"auto"``.

A model sharded by torch FSDP2 (``fully_shard``: its parameters are DTensors) is differentiated
through its own forward and backward (their hooks all-gather the parameters and reduce-scatter
the gradients; double backward through them fails in torch, so ``method`` must be
``"finite-difference"``): its source is a :class:`pfkernels.finite_difference.ShardedModelSource`,
vectors are this rank's local shards, the parameters are perturbed in place and restored bit for
bit, and :func:`pfkernels.eigsh` solves on the shards.

``"auto"`` picks double-backward, for single vectors and for blocks, by measurement
(``bench/bench_hvp.py --threads 1``, ``bench/results/hvp_cpu.json``): 2-core CPU shared with other
jobs (load average 2-6 during the run), torch 2.13, float32, 1000 digits, MSE; medians over
interleaved rounds, in units of one gradient:

=========================  ==========  ============  ============  ======================
model (parameters)         double bwd  double bwd,   forward over  16 vectors: double bwd
                           fresh point graph reused  reverse       (graph reused) / vmap
                                                                   forward-over-reverse
=========================  ==========  ============  ============  ======================
MLP 2x200 tanh (55,210)    2.23        0.97          2.06          19.9 / 25.6
MLP 2x256 tanh (85,002)    2.10        1.24          2.41          19.9 / 26.4
CNN (16, 32) tanh (6,090)  1.93        0.87          1.94          14.3 / 26.6
=========================  ==========  ============  ============  ======================

At a fresh point the two methods are within the run-to-run noise of this machine (another run
at load 8-10 gave 1.99 / 3.03 / 1.93 against 2.55 / 3.18 / 1.99); double backward wins where it
counts, on repeated products at the same parameters (a Lanczos solve) and on blocks. Anchors in
the same run: PyHessian's HVP with its graph reused 0.95 / 1.22 / 0.87, at a fresh point (its
constructor included) 1.69 / 2.01 / 1.94; curvlinops 2.86 / 2.58 / 2.09 for one vector and
26.5 / 25.3 / 25.8 for 16. Batching the second backward with ``is_grads_batched`` (vmap) cost
26.5 / 27.6 / 24.9 for 16 vectors, more than the plain loop, so blocks loop over the shared
first-order graph.


The operator shares its core with the Gauss-Newton and Fisher operators
(:mod:`pfkernels.curvature`) and its data handling with them (:mod:`pfkernels.sources`: the
model is evaluated with ``torch.func.functional_call`` on views of θ, never modified, its flags
restored, attention routed to its math path per thread by :func:`math_attention`).
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable

import torch
from torch import Tensor, nn

from . import finite_difference as _fd
from ._checks import check_arg as _check_arg
from .curvature import CurvatureOperator, _derivative, _or_zeros
from .sources import FORWARD_AD, FunctionSource, ModelSource, math_attention

__all__ = ["HessianOperator", "math_attention"]


def _forward_over_reverse_term(op: HessianOperator, v: Tensor) -> Callable:
    """``jvp(grad(loss_b), θ, v)`` per batch; blocks of vectors through ``vmap``."""

    def forward_over_reverse(closure, theta):
        grad_fn = torch.func.grad(closure)

        def one(u: Tensor) -> Tensor:
            return torch.func.jvp(grad_fn, (theta,), (u,))[1]

        with FORWARD_AD:
            if v.dim() == 1:
                return one(v)
            if op.source.mode != "eval" and op.model is not None:
                # vmap cannot write batched running statistics into unbatched buffers.
                return torch.stack([one(u) for u in v])
            return torch.func.vmap(one)(v)

    return forward_over_reverse


def _double_backward_term(op: HessianOperator, v: Tensor) -> Callable:
    """``∇(∇loss_b · v)`` per batch; a block shares the forward pass and first backward."""

    def double_backward(closure, theta):
        th = theta.detach().requires_grad_(True)
        with torch.enable_grad():
            g = _derivative(closure(th), th, create_graph=True)
            if g is None:
                return torch.zeros_like(v)
            if v.dim() == 1:
                return _or_zeros(_derivative(g, th, v), v)
            last = v.shape[0] - 1
            rows = [_derivative(g, th, u, retain_graph=i < last) for i, u in enumerate(v)]
            return torch.stack([_or_zeros(row, u) for row, u in zip(rows, v)])

    return double_backward


def _finite_difference_term(op: HessianOperator, v: Tensor) -> Callable:
    """Central differences of the batch gradients at θ ± εv (θ is a flat copy: the model's
    parameters are never touched); one ε per vector, from ‖θ‖/√n and ‖v‖ (the same on every rank
    of a process group: θ and v are replicated)."""
    theta_rms = math.sqrt(_fd.sum_of_squares(op.source.point()) / max(op.num_parameters, 1))
    rows = v.reshape(-1, op.num_parameters)
    steps = []
    for u in rows:
        norm = math.sqrt(_fd.sum_of_squares(u))
        steps.append(_fd.finite_difference_eps(op.dtype, theta_rms, norm, op._fd_eps)
                     if norm > 0 else 0.0)

    def gradient_at(closure, point: Tensor) -> Tensor:
        th = point.detach().requires_grad_(True)
        with torch.enable_grad():
            return _or_zeros(_derivative(closure(th), th), point)

    def finite_difference(closure, theta):
        out = []
        for u, eps in zip(rows, steps):
            if eps == 0.0:
                out.append(torch.zeros_like(u))
                continue
            # one buffer for both points, each computed afresh from θ (θ − εv exactly, not
            # θ + εv − 2εv): at 1e8 parameters every vector is 0.5 GB
            point = torch.add(theta, u, alpha=eps)
            plus = gradient_at(closure, point)
            minus = gradient_at(closure, torch.add(theta, u, alpha=-eps, out=point))
            del point
            out.append(plus.sub_(minus).div_(2 * eps))
        return out[0] if v.dim() == 1 else torch.stack(out)

    return finite_difference


# The product methods, in one place: method name -> builder of the per-batch product term
# ``term(loss closure, θ) -> H_b v``. "auto" resolves to _AUTO_METHOD.
_PRODUCT_TERMS: dict[str, Callable[[HessianOperator, Tensor], Callable]] = {
    "double-backward": _double_backward_term,
    "forward-over-reverse": _forward_over_reverse_term,
    "finite-difference": _finite_difference_term,
}
_METHODS = (*_PRODUCT_TERMS, "auto")
# Chosen by measurement, see the module docstring and bench/results/hvp_cpu.json.
_AUTO_METHOD = "double-backward"
# Methods whose products at one point can share a kept first-order graph (reuse_graph).
_GRAPH_METHODS = ("double-backward",)


class HessianOperator(CurvatureOperator):
    """The Hessian of a model's mean loss as a symmetric linear operator of size n x n.

    Args:
        model: an ``nn.Module``; called as ``model(inputs)`` for a pair batch and
            ``model(**batch)`` for a mapping batch. Never modified. ``DistributedDataParallel``
            and ``torch.compile`` wrappers are unwrapped (the module inside shares the
            parameters; a compiled graph cannot be differentiated twice).
        loss_fn: ``loss_fn(outputs, targets)`` -> 0-d tensor, the mean loss of a batch (for
            example :func:`pfkernels.data.mse_loss`, or a loss of :mod:`pfkernels.losses`), or
            ``None``: batches are then mappings passed as ``model(**batch)`` and the loss is the
            output's ``.loss`` (Hugging Face models; their loss casts logits to float32, so with
            ``dtype=torch.float64`` pass ``pfkernels.losses.causal_lm_loss`` or
            ``classification_loss`` instead).
        data: one batch or a re-iterable of batches (a list, a DataLoader). A batch is
            ``(inputs, targets)`` (``inputs`` a tensor, a dict passed as ``model(inputs)``, or a
            tuple of tensors passed as one argument: ``((x1, x2), y)`` is one batch) or a
            mapping of tensors, called as ``model(**batch)`` (with a ``loss_fn``, its
            ``"labels"`` entry is the target). The example count of a batch is the leading size
            of its first input tensor. H is the Hessian of ``Σ_b n_b loss_b / Σ_b n_b``,
            accumulated batch by batch. Batches are moved to the parameters' device. In-memory
            data (one batch, a list or tuple of batches) is converted and checked for NaN/Inf
            once, at construction; of other iterables the first batch's form is checked at
            construction (the global RNG restored after) and every batch for NaN/Inf during the
            first complete pass.
        params: which parameters θ covers: ``None`` (all with ``requires_grad``), a list of
            names from ``model.named_parameters()``, or a callable ``name -> bool``, which
            chooses among the parameters with ``requires_grad`` only (a frozen layer is never
            pulled in by a pattern; list its names to include it). The others are held fixed.
        method: ``"double-backward"``, ``"forward-over-reverse"``, ``"finite-difference"`` or
            ``"auto"`` (see the module docstring for the measurements behind the choice).
        fd_eps: finite-difference only: ``None`` (ε from the dtype, ‖θ‖/√n and ‖v‖, see
            :mod:`pfkernels.finite_difference`) or the length ``‖εv‖`` of each perturbation.
        dtype: ``None`` (the parameters' dtype) or a floating dtype: then parameters, buffers and
            floating inputs/targets are copied to it (``torch.float64`` for accuracy work).
        mode: ``"eval"`` (default: dropout off, BatchNorm uses its running statistics),
            ``"train"`` (batch statistics; with dropout the operator is random, and a
            ``UserWarning`` says so at construction) or ``"batch-stats"`` (BatchNorm layers in
            train mode, everything else, dropout included, in eval mode). The model's own flags
            are restored after every evaluation and its buffers are never mutated.
        check_finite: after each product, one sum over the result tested for NaN/Inf (on CUDA
            a host sync; about 5 µs for 55k floats on the CPU); a NaN/Inf raises
            ``FloatingPointError`` saying which batch and which parameters. Pass ``False`` to
            skip it on hot GPU paths.
        cache_graph: double-backward only. ``True`` keeps the first-order graph (∇E built with
            ``create_graph``) across all later calls while the parameters and buffers look
            unchanged (same storage, same ``_version``), so each further product costs one
            backward pass instead of a forward and two backwards; it holds the activations of
            every batch in memory. Writes through ``param.data`` (``p.data.add_(...)``,
            ``p.data.copy_(...)``) do not bump ``_version`` and are NOT detected: the products
            would silently belong to the old point. ``False``/``None`` (default) keeps the graph
            only inside :meth:`reuse_graph` blocks, which is safe whatever the caller does
            between them.
        process_group: data parallelism (see :mod:`pfkernels.distributed`): ``"default"`` (the
            world group when ``torch.distributed`` is initialised, else none), ``None`` (local
            only) or a ``ProcessGroup``. Each rank passes its own shard as ``data``; every
            product, ``gradient()``, ``loss()`` and ``third_derivative()`` is then that of the
            global example-weighted mean ``Σ_ranks Σ_b n_b ℓ_b / Σ_ranks Σ_b n_b``, identical on
            every rank: the rank's ``Σ_b n_b term_b`` (after the local product, outside any cached
            graph) and its example count travel in one flat all-reduce per call, a ``[B, n]``
            block included. A model wrapped in ``DistributedDataParallel`` is unwrapped
            (``model.module``); DDP's gradient hooks never fire here (``torch.autograd.grad`` does
            not accumulate into ``.grad``), so this explicit reduction is what makes the result
            global. Every rank must make the same calls in the same order.

    Vectors are flat over the selected parameters in ``model.named_parameters()`` order, of the
    operator's ``dtype`` and ``device``. Parameters that do not reach the loss get zero rows.
    ``model`` may also be a :class:`~pfkernels.sources.ModelSource` or
    :class:`~pfkernels.sources.FunctionSource` (``loss_fn`` and ``data`` then None).
    """

    _symbol = "H"

    def __init__(
        self,
        model: nn.Module | ModelSource | FunctionSource,
        loss_fn: Callable[[Any, Any], Tensor] | None,
        data: Any,
        *,
        params: list[str] | tuple[str, ...] | Callable[[str], bool] | None = None,
        method: str = "auto",
        dtype: torch.dtype | None = None,
        mode: str = "eval",
        check_finite: bool = True,
        cache_graph: bool | None = None,
        process_group: Any = "default",
        fd_eps: float | None = None,
    ) -> None:
        _check_arg(method in _METHODS, "method", f"must be one of {_METHODS}, got {method!r}")
        _fd.check_eps(fd_eps, "fd_eps")
        self._fd_eps = fd_eps
        if isinstance(model, (ModelSource, FunctionSource, _fd.ShardedModelSource)):
            source = model
        elif isinstance(model, nn.Module) and any(
                _fd.is_sharded(p) for p in model.parameters() if p.requires_grad):
            source = _fd.ShardedModelSource(model, loss_fn, data, params=params, dtype=dtype,
                                            mode=mode, method=method, eps=fd_eps,
                                            check_finite=check_finite)
        else:
            source = ModelSource(model, loss_fn, data, params=params, dtype=dtype, mode=mode,
                                 process_group=process_group)
        super().__init__(source, check_finite=check_finite)
        self._method = _AUTO_METHOD if method == "auto" else method
        if self._method == "finite-difference":
            name = "x0" if isinstance(source, FunctionSource) else (
                "params" if dtype is None else "dtype")
            _fd.check_dtype(source.dtype, name)
        if getattr(source, "loss_fn", True) is None and source.dtype == torch.float64:
            warnings.warn(
                "loss_fn=None with dtype=torch.float64: a Hugging Face model's own loss casts "
                "the logits to float32, so the Hessian is not float64 where it matters; pass "
                "loss_fn=pfkernels.losses.causal_lm_loss (or classification_loss)",
                UserWarning, stacklevel=2)
        cache_graph = bool(cache_graph)
        _check_arg(
            not cache_graph or source.in_memory,
            "cache_graph",
            "needs in-memory data (one batch or a list of batches), not a streaming iterable",
        )
        self._cache_graph = cache_graph and self._method in _GRAPH_METHODS

    @classmethod
    def from_function(
        cls,
        f: Callable[[Tensor], Tensor],
        x0: Tensor,
        *,
        method: str = "auto",
        check_finite: bool = True,
    ) -> HessianOperator:
        """The Hessian of a scalar function of one flat vector, ``∇²f(x0)``.

        ``f(x)`` takes a tensor shaped like ``x0`` (1-D, floating) and returns a 0-d tensor; it is
        differentiated with the chosen method (so it must be written in torch operations). The
        operator holds a copy of ``x0``; its ``dtype``/``device`` are those of ``x0``.
        """
        return cls(FunctionSource(f, x0), None, None, method=method, check_finite=check_finite)

    @property
    def method(self) -> str:
        """The product method in use (``"auto"`` resolved)."""
        return self._method

    def _repr_fields(self) -> str:
        return f", method={self._method!r}"

    # ------------------------------------------------------------------ products

    def _keeps_state(self) -> bool:
        return self._method in _GRAPH_METHODS and self._source.in_memory

    @property
    def _reusing(self) -> bool:
        return self._cache_graph or self._reuse_depth > 0

    @property
    def vector_group(self):
        """The group over which every vector is sharded (FSDP2: each rank holds the local shards
        of its parameters; inner products are sums over the group), or None."""
        return getattr(self._source, "vector_group", None)

    def _sharded(self, what: str | None = None) -> _fd.GradientHessian | None:
        hessian = getattr(self._source, "hessian", None)
        if hessian is not None and what is not None:
            raise NotImplementedError(
                f"HessianOperator.{what}: not available for a model sharded by FSDP2 (its "
                "products are central differences of gradients on local shards)")
        return hessian

    def _product(self, v: Tensor) -> Tensor:
        sharded = self._sharded()
        if sharded is not None:
            return sharded.matvec(v)
        if self._reusing:
            return self._cached_products(v)
        return self._accumulate(_PRODUCT_TERMS[self._method](self, v))

    def _first_order_graphs(self) -> list[tuple[Tensor, Tensor, Tensor | None, int]]:
        """Per batch ``(θ leaf, loss_b detached, ∇loss_b with its graph or None, n_b)``, rebuilt
        when stale."""
        src = self._source

        def build() -> list:
            theta = src.point()
            graphs = []
            with src.evaluation():
                for closure, n in src.losses():
                    th = theta.detach().requires_grad_(True)
                    with torch.enable_grad():
                        value = closure(th)
                        g = _derivative(value, th, create_graph=True)
                    graphs.append((th, value.detach(), g, n))
            return graphs

        return self._kept_state(build)

    def _cached_products(self, v: Tensor) -> Tensor:
        graphs = self._first_order_graphs()
        count = sum(n for *_, n in graphs)
        if self._source.group is not None:
            total = torch.zeros_like(v)
            for th, _, g, n in graphs:
                if g is None or not g.requires_grad:
                    continue
                for row, u in zip(total.view(-1, v.shape[-1]), v.view(-1, v.shape[-1])):
                    row.add_(_or_zeros(_derivative(g, th, u, retain_graph=True), u), alpha=n)
            return self._source.mean(total, count)
        # Local: each product is a fresh tensor from autograd, weighted in place (one batch, the
        # common case, needs no arithmetic at all): on an 11M-parameter ResNet-18 the zeroed
        # accumulator and the division cost 15% of a product.
        rows = []
        for u in (v,) if v.dim() == 1 else v:
            total = None
            for th, _, g, n in graphs:
                if g is None or not g.requires_grad:
                    continue
                part = _derivative(g, th, u, retain_graph=True)
                if part is None:
                    continue
                if part.data_ptr() == u.data_ptr():  # autograd may hand the direction back
                    part = part.clone()
                if total is None:
                    total = part if n == count else part.mul_(n / count)
                else:
                    total.add_(part, alpha=n / count)
            rows.append(torch.zeros_like(u) if total is None else total)
        return rows[0] if v.dim() == 1 else torch.stack(rows)

    def gradient(self) -> Tensor:
        """∇E(θ), a new ``[n]`` tensor of the operator's dtype and device.

        With ``cache_graph`` (or inside :meth:`reuse_graph`) the gradient is taken with its graph
        kept, so products at the same parameters that follow cost one backward each. For FSDP2,
        this rank's shards of the gradient.
        """
        sharded = self._sharded()
        if sharded is not None:
            return sharded.gradient()
        if self._reusing and self._keeps_state():
            return self._from_graphs(lambda th, _, g: _or_zeros(g, th).detach())
        return super().gradient()

    def _from_graphs(self, term: Callable[[Tensor, Tensor, Tensor | None], Tensor]) -> Tensor:
        """``Σ_b n_b term(θ leaf, loss_b, ∇loss_b) / Σ_b n_b`` over the kept first-order
        graphs."""
        graphs = self._first_order_graphs()
        count = sum(n for *_, n in graphs)
        if self._source.group is not None:
            total = sum(n * term(th, value, g) for th, value, g, n in graphs)
            return self._source.mean(total, count)
        # Local: weighted in place, and one batch (the common case) needs no arithmetic.
        total = None
        for th, value, g, n in graphs:
            part = term(th, value, g)
            if total is None:
                total = part.clone() if n == count else part.mul(n / count)
            else:
                total.add_(part, alpha=n / count)
        return total

    @staticmethod
    def _third_term(th: Tensor, g: Tensor | None, u: Tensor, v: Tensor, retain: bool) -> Tensor:
        """∇_θ(u·∇(g·v)) from a first-order graph ``g = ∇loss_b`` (kept when ``retain``)."""
        with torch.enable_grad():
            hv = None if g is None else _derivative(g, th, v, create_graph=True,
                                                    retain_graph=True)
            out = None if hv is None else _derivative(hv, th, u, retain_graph=retain)
        return _or_zeros(out, th)

    def third_derivative(self, u: Tensor, v: Tensor) -> Tensor:
        """∇_θ(uᵀ H(θ) v) = ∇³E(θ)[u, v, ·], a new ``[n]`` tensor.

        ``u``, ``v``: ``[n]`` of the operator's dtype and device (symmetric in u and v). Three
        reverse passes per batch (double backward of ``(∇(∇E·v))·u``), whatever ``method``;
        inside :meth:`reuse_graph` (or with ``cache_graph``) the first-order graph of the
        double-backward method is shared with the products, so it costs two. Used by the
        principal flow's non-principal correction −(h²/12)∇³E[g, g] and the central flow.
        """
        self._sharded("third_derivative")
        self._check_vector(u, "u", batched=False)
        self._check_vector(v, "v", batched=False)
        if self._reusing and self._keeps_state():
            return self._from_graphs(lambda th, _, g: self._third_term(th, g, u, v, retain=True))

        def third_term(closure, theta):
            th = theta.detach().requires_grad_(True)
            with torch.enable_grad():
                g = _derivative(closure(th), th, create_graph=True)
            return self._third_term(th, g, u, v, retain=False)

        return self._accumulate(third_term)

    def loss(self) -> Tensor:
        """E(θ), the example-weighted mean loss over all batches (and ranks), a 0-d tensor.

        With ``cache_graph`` (or inside :meth:`reuse_graph`) it is read from the kept
        first-order graph (built if stale), so a loss, gradient and products at one point share
        one forward pass.
        """
        if self._sharded() is not None:
            return self._source.loss()
        if self._reusing and self._keeps_state():
            return self._from_graphs(lambda th, value, g: value).to(self.dtype)
        return super().loss()

    def to_scipy(self):
        """A ``scipy.sparse.linalg.LinearOperator`` (float64 NumPy in and out) over ``matvec``."""
        self._sharded("to_scipy")
        return super().to_scipy()
