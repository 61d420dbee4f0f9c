"""Curvature matrices of a model's loss as linear operators over its flat parameters.

One core, :class:`CurvatureOperator`, holds what every curvature matrix shares: a source
(:mod:`pfkernels.sources`: the model, loss and data, or a flat function), the flat parameter
vector θ, ``@`` and batched ``[B, n]`` products, ``to_scipy``, the product counter, the NaN/Inf
diagnosis, and the scope inside which products at one point share what they can keep
(:meth:`~CurvatureOperator.reuse_graph`). A subclass implements one hook, the product of one
batch, and the core sums it over batches (example-weighted) and over the ranks of a process
group. :func:`pfkernels.eigsh`, :func:`~pfkernels.spectral_density`, the trace and diagonal
estimators, :class:`~pfkernels.SharpnessTracker` and the CLI take any of them.

The matrices, for the mean loss ``E(θ) = Σ_b n_b ℓ_b(θ) / Σ_b n_b`` with outputs ``f = f(θ, x)``,
Jacobian ``J = ∂f/∂θ`` and ``L(f)`` the batch loss as a function of the outputs:

- :class:`pfkernels.HessianOperator`: ``∇²E`` (in :mod:`pfkernels.hvp`).
- :class:`GGNOperator`: the generalised Gauss-Newton ``Jᵀ (∇²_f L) J`` (Schraudolph 2002;
  Martens 2020, §9): per product a forward-mode JVP ``J v``, the loss Hessian on the outputs,
  and one reverse pass ``Jᵀ(·)``. No second-order graph through the model is built. For
  cross-entropy the loss Hessian is :func:`pfkernels.losses.cross_entropy_hessian_product`
  (recognised as described in :func:`pfkernels.losses.output_hessian`); any other loss
  differentiates ``loss_fn`` twice with respect to the outputs alone. PSD whenever the loss is
  convex in the outputs; equal to the Hessian for a model linear in θ.
- :class:`EmpiricalFisherOperator`: ``(1/N) Σ_i ∇ℓ_i ∇ℓ_iᵀ`` over the examples i (the leading
  dimension of the outputs), with ``ℓ_i`` the example's share of the batch loss scaled so that
  ``L = (1/N) Σ_i ℓ_i``: ``J v``, a per-example dot product with ``∂ℓ_i/∂f_i``, one reverse pass.
- :class:`MCFisherOperator`: the Fisher ``Jᵀ E_{y~p(y|f)}[∇_f log p ∇_f log pᵀ] J`` estimated with
  ``mc_samples`` labels drawn from the model's predictive distribution (categorical for
  cross-entropy, Gaussian of unit variance for the squared loss), from fixed uniforms/normals of
  a seeded generator: at a given θ the operator is deterministic (Lanczos needs a fixed
  matrix), and as ``mc_samples`` grows it tends to the GGN, which is the exact Fisher of these
  losses.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable

import torch
from torch import Tensor, nn

from . import distributed as _dist
from . import losses as _losses
from ._checks import check_arg as _check_arg
from .sources import FORWARD_AD, BatchTerms, FunctionSource, ModelSource

__all__ = [
    "CurvatureOperator",
    "EmpiricalFisherOperator",
    "GGNOperator",
    "MCFisherOperator",
    "curvature_operator",
]


def _derivative(
    out: Tensor, theta: Tensor, direction: Tensor | None = None, **kwargs
) -> Tensor | None:
    """∇_θ(out·direction) by reverse mode, or None where ``out`` does not depend on θ (a zero
    derivative: parameters that never reach the loss, or a loss at most linear in them)."""
    if not out.requires_grad:
        return None
    (grad,) = torch.autograd.grad(out, theta, direction, allow_unused=True, **kwargs)
    return grad


def _or_zeros(grad: Tensor | None, like: Tensor) -> Tensor:
    return torch.zeros_like(like) if grad is None else grad


class CurvatureOperator:
    """The shared core of the curvature operators: a symmetric n x n linear operator over the
    flat parameters of a source. Subclasses implement :meth:`_batch_product`.

    Args:
        source: a :class:`~pfkernels.sources.ModelSource` or
            :class:`~pfkernels.sources.FunctionSource`.
        check_finite: test each product for NaN/Inf (one sum) and say where it came from.
    """

    _symbol = "A"  # the matrix's letter in messages
    # A hook the solvers read (pfkernels.lanczos): matvec returns a new tensor that nobody else
    # holds and applies one matrix to each row, so a batched solve may pass only its unfinished
    # rows and keep the results.
    fresh_products = True

    def __init__(self, source: ModelSource | FunctionSource, *, check_finite: bool = True) -> None:
        self._source = source
        self._check_finite = bool(check_finite)
        self._reuse_depth = 0
        self._kept: tuple[tuple, list] | None = None
        self.num_matvecs = 0

    # ------------------------------------------------------------------ description

    @property
    def shape(self) -> tuple[int, int]:
        return (self._source.n, self._source.n)

    @property
    def dtype(self) -> torch.dtype:
        return self._source.dtype

    @property
    def device(self) -> torch.device:
        return self._source.device

    @property
    def process_group(self):
        """The group products are reduced over, or None (local)."""
        return self._source.group

    @property
    def num_parameters(self) -> int:
        return self._source.n

    @property
    def param_names(self) -> list[str]:
        """Names of the parameters θ covers, in ``model.named_parameters()`` order."""
        return list(self._source.names)

    @property
    def model(self) -> nn.Module | None:
        """The caller's model (``None`` for a function source)."""
        return self._source.model

    @property
    def source(self) -> ModelSource | FunctionSource:
        return self._source

    def parameters(self) -> list[nn.Parameter]:
        """The model's own parameter tensors that θ covers, in θ's order (e.g. to look up
        optimizer state); empty for a function source."""
        return self._source.parameters()

    def reset_counters(self) -> None:
        """Set ``num_matvecs`` (vectors multiplied so far; a [B, n] product counts B) to 0."""
        self.num_matvecs = 0

    def flat_parameters(self) -> Tensor:
        """θ now: a new ``[n]`` tensor of the operator's dtype and device."""
        return self._source.point().clone()

    def unflatten(self, vec: Tensor) -> dict[str, Tensor]:
        """Split a flat ``[n]`` vector into ``{parameter name: view shaped like the parameter}``."""
        self._check_vector(vec, "vec", batched=False)
        return dict(zip(self._source.names, self._views(vec)))

    def _views(self, theta: Tensor) -> list[Tensor]:
        src = self._source
        return [c.view(s) for c, s in zip(torch.split(theta, src.numels), src.shapes)]

    # ------------------------------------------------------------------ accumulation

    def _accumulate(self, term: Callable[[Any, Tensor], Tensor], per_batch: bool = False
                    ) -> Tensor:
        """``Σ_b n_b term(b, θ) / Σ_b n_b`` under the evaluation context, ``b`` the batch's
        loss closure (or its :class:`~pfkernels.sources.BatchTerms` when ``per_batch``)."""
        src = self._source
        theta = src.point()
        total, count = None, 0
        with src.evaluation():
            items = ((b, b.count) for b in src.batches()) if per_batch else src.losses()
            for item, n in items:
                part = term(item, theta)
                total = part * n if total is None else total.add_(part, alpha=n)
                count += n
        return src.mean(total, count)

    # ------------------------------------------------------------------ products

    def _check_vector(self, v: Any, name: str, batched: bool) -> None:
        if not isinstance(v, Tensor):
            raise TypeError(f"argument '{name}': must be a tensor, got {type(v).__name__}")
        n = self._source.n
        # Messages are formatted only on failure: this runs on every product (the f-strings
        # cost more than the tests on a small operator).
        if not ((v.dim() == 1 or (batched and v.dim() == 2)) and v.shape[-1] == n):
            want = f"[{n}]" + (f" or [B, {n}]" if batched else "")
            _check_arg(False, name, f"must have shape {want}, got {tuple(v.shape)}")
        if v.dtype != self.dtype:
            _check_arg(False, name, f"dtype {v.dtype} differs from the operator's {self.dtype}")
        if v.device != self.device:
            _check_arg(False, name,
                       f"device {v.device} differs from the operator's {self.device}")

    def _product(self, v: Tensor) -> Tensor:
        """The product for ``v`` ``[n]`` or ``[B, n]``: by default the example-weighted mean of
        :meth:`_batch_product` over batches (one evaluation context, one reduction)."""
        return self._accumulate(lambda batch, theta: self._batch_product(batch, theta, v),
                                per_batch=True)

    def _batch_product(self, batch: BatchTerms, theta: Tensor, v: Tensor) -> Tensor:
        """The one hook: this batch's matrix times ``v`` (``[n]`` or ``[B, n]``) at ``theta``."""
        raise NotImplementedError

    def matvec(self, v: Tensor) -> Tensor:
        """A·v for ``v`` of shape ``[n]``, or ``A·v_i`` for each row of ``v`` ``[B, n]``.

        ``v`` must have the operator's dtype and device; returns a new tensor of ``v``'s shape.
        Adds B (1 for ``[n]``) to ``num_matvecs``. Raises ``FloatingPointError`` (when
        ``check_finite``) if the product has NaN/Inf entries.
        """
        self._check_vector(v, "v", batched=True)
        if v.dim() == 2 and v.shape[0] == 0:
            return torch.empty_like(v)
        out = self._product(v)
        self.num_matvecs += 1 if v.dim() == 1 else v.shape[0]
        # A NaN or Inf entry makes the sum non-finite, and a sum is ~30x cheaper than an
        # elementwise isfinite on the CPU; the exact test runs only to rule out overflow.
        if (self._check_finite and not bool(torch.isfinite(out.sum()))
                and not bool(torch.isfinite(out).all())):
            self._raise_not_finite(out, v)
        return out

    def __matmul__(self, v: Tensor) -> Tensor:
        return self.matvec(v)

    # ------------------------------------------------------------------ scopes

    def _keeps_state(self) -> bool:
        """Whether :meth:`reuse_graph` has anything to keep (in-memory data by default)."""
        return self._source.in_memory

    def _kept_state(self, build: Callable[[], list]) -> list:
        """Per-batch state built by ``build`` at the current point, kept while the parameters
        and buffers look unchanged (storage and ``_version``) inside :meth:`reuse_graph`."""
        key = self._source.state_key()
        if self._kept is not None and self._kept[0] == key:
            return self._kept[1]
        self._kept = None  # free the old state before building the new one
        state = build()
        self._kept = (key, state)
        return state

    @property
    def _reusing(self) -> bool:
        return self._reuse_depth > 0

    @contextlib.contextmanager
    def reuse_graph(self):
        """A block inside which products at one point share what they can keep (the Hessian's
        first-order graph; the Gauss-Newton and Fisher operators' forward graph and output
        derivatives), built by the first product and freed on exit. The parameters must not
        change inside the block; changes through ``.data`` are not detected.
        :func:`pfkernels.eigsh` enters it for the length of a solve. A no-op for streaming data
        (nothing in memory to keep a graph of); blocks nest.
        """
        if self._reusing or not self._keeps_state():
            yield self
            return
        self._reuse_depth += 1
        self._kept = None
        try:
            yield self
        finally:
            self._reuse_depth -= 1
            self._kept = None

    def clear_cache(self) -> None:
        """Drop whatever :meth:`reuse_graph` keeps, freeing its memory."""
        self._kept = None

    @contextlib.contextmanager
    def deferred_checks(self):
        """A block in which products skip the NaN/Inf check when it would cost a host sync.

        On a GPU, ``check_finite`` reads one value back per product; a caller that checks the
        results itself at its own pace (:func:`pfkernels.eigsh` tests every Lanczos coefficient
        at its convergence checks and names the iteration) enters this block to keep its loop
        free of syncs. On the CPU the check costs no sync and stays on. Blocks nest.
        """
        previous = self._check_finite
        self._check_finite = previous and self.device.type == "cpu"
        try:
            yield self
        finally:
            self._check_finite = previous

    # ------------------------------------------------------------------ first order

    def gradient(self) -> Tensor:
        """∇E(θ), a new ``[n]`` tensor of the operator's dtype and device."""

        def grad_term(closure, theta):
            th = theta.detach().requires_grad_(True)
            with torch.enable_grad():
                return _or_zeros(_derivative(closure(th), th), theta)

        return self._accumulate(grad_term)

    def loss(self) -> Tensor:
        """E(θ), the example-weighted mean loss over all batches, as a 0-d tensor."""

        def loss_term(closure, theta):
            with torch.no_grad():
                return closure(theta).detach().to(self.dtype)

        return self._accumulate(loss_term)

    def to_scipy(self):
        """A ``scipy.sparse.linalg.LinearOperator`` (float64 NumPy in and out) over ``matvec``."""
        import numpy as np
        from scipy.sparse.linalg import LinearOperator

        def apply(x: np.ndarray) -> np.ndarray:
            x = np.asarray(x)
            vec = torch.as_tensor(np.ascontiguousarray(x.real, dtype=np.float64))
            vec = vec.to(device=self.device, dtype=self.dtype)
            if vec.dim() == 2:  # SciPy's matmat passes columns
                out = self.matvec(vec.T.contiguous()).T
            else:
                out = self.matvec(vec.reshape(-1))
            return out.detach().to("cpu", torch.float64).numpy().reshape(x.shape)

        return LinearOperator(self.shape, matvec=apply, rmatvec=apply, matmat=apply,
                              rmatmat=apply, dtype=np.float64)

    # ------------------------------------------------------------------ diagnosis

    def _raise_not_finite(self, out: Tensor, v: Tensor) -> None:
        """Work out where a NaN/Inf came from (only on this failure path, so it may be slow)."""
        _check_arg(bool(torch.isfinite(v).all()), "v", "contains NaN or Inf")
        src = self._source
        rows = out.reshape(-1, src.n)
        bad_params = [
            name
            for name, block in zip(src.names, torch.split(rows, src.numels, dim=1))
            if not bool(torch.isfinite(block).all())
        ]
        where = "the loss and gradient are finite on every batch"
        theta = src.point()
        with src.evaluation():
            for i, (closure, _) in enumerate(src.losses()):
                th = theta.detach().requires_grad_(True)
                with torch.enable_grad():
                    value = closure(th)
                    g = _derivative(value, th)
                if not math.isfinite(float(value.detach())):
                    where = f"the loss is {float(value.detach())} on batch {i}"
                    break
                if g is not None and not bool(torch.isfinite(g).all()):
                    where = f"the gradient has NaN/Inf on batch {i}"
                    break
        if src.group is not None:
            where += " (of this rank's shard; the reduced product carries every rank's NaN/Inf)"
        s = self._symbol
        raise FloatingPointError(
            f"{type(self).__name__}.matvec: {s}·v has NaN/Inf entries in parameters "
            f"{bad_params}; {where}"
        )

    def _repr_fields(self) -> str:
        return ""

    def __repr__(self) -> str:
        src = self._source
        return (
            f"{type(self).__name__}(n={src.n}, source={src.describe()}{self._repr_fields()}, "
            f"dtype={self.dtype}, device={self.device}, mode={src.mode!r}"
            + ("" if src.group is None else f", world_size={_dist.world_size(src.group)}")
            + ")"
        )


# ---------------------------------------------------------------------------------------------
# Operators through the outputs: Gauss-Newton and Fisher.
# ---------------------------------------------------------------------------------------------


def _jvp_rows(forward: Callable[[Tensor], Tensor], theta: Tensor, v: Tensor
              ) -> tuple[Tensor, Tensor]:
    """The outputs (detached) and ``J v`` (``[*out]``) or ``J v_i`` stacked (``[B, *out]``), by
    forward-mode AD: no graph is kept."""
    outputs, rows = None, []
    with FORWARD_AD:
        for u in (v,) if v.dim() == 1 else v:
            outputs, jv = torch.func.jvp(forward, (theta,), (u,))
            rows.append(jv)
    return outputs.detach(), rows[0] if v.dim() == 1 else torch.stack(rows)


class _OutputOperator(CurvatureOperator):
    """``Σ_b n_b J_bᵀ M_b(J_b v) / Σ_b n_b``: a model's outputs' Jacobian around a matrix on the
    outputs. Subclasses give :meth:`_output_products` (``M_b`` applied to the JVP rows); the
    forward graph for the VJP and whatever ``M_b`` needs are kept inside :meth:`reuse_graph`."""

    def __init__(self, model, loss_fn, data, *, params=None, dtype=None, mode="eval",
                 check_finite=True, process_group="default", label_key="labels") -> None:
        if isinstance(model, (ModelSource, FunctionSource)):
            source = model
        else:
            source = ModelSource(model, loss_fn, data, params=params, dtype=dtype, mode=mode,
                                 process_group=process_group, label_key=label_key)
        if isinstance(source, FunctionSource):
            raise TypeError(f"argument 'model': {type(self).__name__} differentiates through a "
                            "model's outputs; a function of a flat vector has none")
        super().__init__(source, check_finite=check_finite)
        self._output_loss = _losses.output_hessian(source.model, source.loss_fn)

    def _check_outputs(self, out: Tensor) -> None:
        _check_arg(out.is_floating_point(), "model",
                   f"returned {out.dtype} outputs; the Gauss-Newton/Fisher operators need "
                   "floating outputs")

    def _prepare_batch(self, batch: BatchTerms, theta: Tensor) -> tuple:
        """``(θ leaf, outputs with their forward graph, per-batch context)``, kept in a solve."""
        th = theta.detach().requires_grad_(True)
        with torch.enable_grad():
            out = batch.outputs(th)
        self._check_outputs(out)
        return th, out, self._output_context(out.detach(), batch.targets, batch)

    def _output_context(self, outputs: Tensor, targets: Any, batch: BatchTerms) -> Any:
        return None

    def _output_products(self, ctx: Any, outputs: Tensor, targets: Any, rows: Tensor,
                         batch: BatchTerms) -> Tensor:
        raise NotImplementedError

    @staticmethod
    def _transposed_jacobian(out: Tensor, th: Tensor, m: Tensor, like: Tensor, single: bool,
                             retain: bool) -> Tensor:
        """``Jᵀ m_i`` for each row of ``m`` by reverse passes through ``out``'s graph."""
        last = m.shape[0] - 1
        result = [_or_zeros(_derivative(out, th, r, retain_graph=retain or i < last), like)
                  for i, r in enumerate(m)]
        return result[0] if single else torch.stack(result)

    def _batch_product(self, batch: BatchTerms, theta: Tensor, v: Tensor) -> Tensor:
        # The JVP runs first and is freed before the forward graph for the reverse pass is
        # built: the peak is the larger of the two, not their sum.
        outputs, jv = _jvp_rows(batch.outputs, theta.detach(), v)
        self._check_outputs(outputs)
        ctx = self._output_context(outputs, batch.targets, batch)
        single = v.dim() == 1
        m = self._output_products(ctx, outputs, batch.targets,
                                  jv.unsqueeze(0) if single else jv, batch)
        del jv, outputs, ctx
        th = theta.detach().requires_grad_(True)
        with torch.enable_grad():
            out = batch.outputs(th)
        if not out.requires_grad:
            return torch.zeros_like(v)
        return self._transposed_jacobian(out, th, m, theta, single, retain=False)

    def _through_outputs(self, batch, theta, th, out, ctx, v) -> Tensor:
        """A product from a kept forward graph (inside :meth:`reuse_graph`)."""
        if not out.requires_grad:
            return torch.zeros_like(v)
        _, jv = _jvp_rows(batch.outputs, theta.detach(), v)
        single = v.dim() == 1
        m = self._output_products(ctx, out.detach(), batch.targets,
                                  jv.unsqueeze(0) if single else jv, batch)
        return self._transposed_jacobian(out, th, m, theta, single, retain=True)

    def _product(self, v: Tensor) -> Tensor:
        if not self._reusing:
            return super()._product(v)
        src = self._source
        theta = src.point()

        def build() -> list:
            kept = []
            with src.evaluation():
                for batch in src.batches():
                    kept.append((batch, *self._prepare_batch(batch, theta)))
            return kept

        total, count = None, 0
        with src.evaluation():
            for batch, th, out, ctx in self._kept_state(build):
                part = self._through_outputs(batch, theta, th, out, ctx, v)
                total = part * batch.count if total is None else total.add_(
                    part, alpha=batch.count)
                count += batch.count
        return src.mean(total, count)


class GGNOperator(_OutputOperator):
    """The generalised Gauss-Newton matrix ``G = Σ_b n_b J_bᵀ H_ℓ,b J_b / Σ_b n_b`` of a model's
    mean loss, ``H_ℓ = ∇²_f L`` the loss Hessian with respect to the outputs.

    Takes the arguments of :class:`pfkernels.HessianOperator` (``model``, ``loss_fn``, ``data``,
    ``params``, ``dtype``, ``mode``, ``check_finite``, ``process_group``), the same data forms
    and the same flat vectors; ``method`` does not apply. The differentiated outputs are the
    model's output tensor or its ``.logits``. ``loss_fn`` is applied to that tensor. The loss
    Hessian on the outputs is closed-form for cross-entropy (see
    :func:`pfkernels.losses.output_hessian` for how it is recognised, including
    ``loss_fn=None`` on Hugging Face causal-LM and classification models) and otherwise
    ``loss_fn`` differentiated twice with respect to the outputs (cheap: the model is not in
    that graph). Each product: one forward-mode JVP and one reverse pass per batch and vector;
    inside :meth:`reuse_graph` (a solve) the forward graph is kept, so a product costs the JVP
    and the reverse pass.
    """

    _symbol = "G"

    def _output_products(self, ctx, outputs, targets, rows, batch):
        return torch.stack([self._output_loss.hessian_product(outputs, targets, r, batch)
                            for r in rows])


class EmpiricalFisherOperator(_OutputOperator):
    """The empirical Fisher ``F = (1/N) Σ_i ∇ℓ_i ∇ℓ_iᵀ`` over all N examples of the data.

    Arguments as :class:`GGNOperator`. Examples are the leading dimension of the outputs; the
    per-example loss ``ℓ_i`` is the example's share of its batch's loss, scaled so that the
    batch loss is their mean, ``L = (1/n_b) Σ_i ℓ_i`` (for a token-level language-model loss an
    example is a sequence). ``∇ℓ_i = J_iᵀ g_i`` with ``g_i = n_b ∂L/∂f_i`` from one reverse pass
    through the loss alone, so a product is ``J v``, the per-example dots ``g_i·(J v)_i`` and one
    reverse pass ``Jᵀ``. Not the Fisher information: it uses the data's labels, not the model's
    (Kunstner et al. 2019); see :class:`MCFisherOperator` for that.
    """

    _symbol = "F"

    def _output_context(self, outputs, targets, batch):
        return self._output_loss.example_gradients(outputs, targets, batch)

    def _output_products(self, ctx, outputs, targets, rows, batch):
        g = ctx  # [N, *f]
        n = g.shape[0]
        dots = (rows * g.unsqueeze(0)).reshape(rows.shape[0], n, -1).sum(-1)  # [B, N]
        return dots.reshape(*dots.shape, *([1] * (g.dim() - 1))) * g.unsqueeze(0) / n


class MCFisherOperator(_OutputOperator):
    """The Fisher information ``Jᵀ E_{y~p(y|f)}[∇_f ℓ(f, y) ∇_f ℓ(f, y)ᵀ] J`` estimated with
    labels sampled from the model's predictive distribution.

    Arguments as :class:`GGNOperator`, plus ``mc_samples`` (labels per output row, default 1)
    and ``seed`` (default 0). The loss must be one whose predictive distribution is known:
    cross-entropy (categorical over the last dimension of the outputs, per row of logits) or
    the squared loss ``½‖f − y‖²`` of :func:`pfkernels.data.mse_loss` /
    :class:`pfkernels.losses.MSELoss` (Gaussian with unit variance). Samples come from uniforms
    (normals) drawn once per batch from a generator seeded with ``seed`` and the batch's index:
    the labels follow the model's probabilities at each θ, but at one θ every product sees the
    same ones, so the operator is a fixed PSD matrix for Lanczos. Its expectation over seeds is
    the GGN of the same loss.
    """

    _symbol = "F"

    def __init__(self, model, loss_fn=None, data=None, *, mc_samples: int = 1, seed: int = 0,
                 **kwargs) -> None:
        _check_arg(isinstance(mc_samples, int) and not isinstance(mc_samples, bool)
                   and mc_samples >= 1, "mc_samples",
                   f"must be a positive int, got {mc_samples!r}")
        _check_arg(isinstance(seed, int) and not isinstance(seed, bool), "seed",
                   f"must be an int, got {seed!r}")
        super().__init__(model, loss_fn, data, **kwargs)
        _check_arg(hasattr(self._output_loss, "sampled_gradients"), "loss_fn",
                   "MCFisherOperator needs a loss with a known predictive distribution "
                   "(cross-entropy or the squared loss, see pfkernels.losses); got "
                   f"{self._output_loss.describe()}")
        self._mc_samples = mc_samples
        self._seed = seed
        self._batch_index = 0

    def _product(self, v: Tensor) -> Tensor:
        self._batch_index = 0
        return super()._product(v)

    def _output_context(self, outputs, targets, batch):
        gen = torch.Generator().manual_seed(self._seed * 1_000_003 + self._batch_index)
        self._batch_index += 1
        return self._output_loss.sampled_gradients(outputs, targets, batch, self._mc_samples,
                                                   gen)

    def _output_products(self, ctx, outputs, targets, rows, batch):
        g = ctx  # [M, R, K]: R rows of K outputs (logit rows, or examples)
        r = rows.reshape(rows.shape[0], *g.shape[1:])  # [B, R, K]
        dots = torch.einsum("mrk,brk->bmr", g, r)
        return torch.einsum("bmr,mrk->brk", dots, g).reshape(rows.shape)

    def _repr_fields(self) -> str:
        return f", mc_samples={self._mc_samples}, seed={self._seed}"


_CURVATURES = ("hessian", "ggn", "fisher", "empirical-fisher", "mc-fisher")


def curvature_operator(curvature: str, model, loss_fn, data, **kwargs) -> CurvatureOperator:
    """The operator named by ``curvature``: ``"hessian"`` (:class:`pfkernels.HessianOperator`),
    ``"ggn"``, ``"fisher"``/``"mc-fisher"`` (:class:`MCFisherOperator`) or
    ``"empirical-fisher"``. ``kwargs`` go to the constructor (``method`` only to the Hessian)."""
    _check_arg(curvature in _CURVATURES, "curvature",
               f"must be one of {_CURVATURES}, got {curvature!r}")
    if curvature == "hessian":
        from .hvp import HessianOperator

        return HessianOperator(model, loss_fn, data, **kwargs)
    kwargs = {k: v for k, v in kwargs.items() if not (k == "method" and v == "auto")}
    _check_arg("method" not in kwargs, "method",
               f"applies to the Hessian only, not curvature={curvature!r}")
    cls = {"ggn": GGNOperator, "fisher": MCFisherOperator, "mc-fisher": MCFisherOperator,
           "empirical-fisher": EmpiricalFisherOperator}[curvature]
    return cls(model, loss_fn, data, **kwargs)
