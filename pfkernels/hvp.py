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

The model is evaluated with ``torch.func.functional_call`` on views of θ, so the caller's model
and its tensors are never modified: parameters are read afresh from the model at every call (the
operator follows training), buffers are passed as copies (BatchNorm running statistics never
move), and the modules' train/eval flags are restored after each evaluation. Evaluations of one
model from several threads take turns (each swaps its θ into the module); products change no
process-wide torch state: attention is routed to its math path by a per-thread mode
(:func:`math_attention`), not by torch's global backend flags.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterable, Iterator
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call

from . import distributed as _dist
from ._checks import check_arg as _check_arg

__all__ = ["HessianOperator"]

_METHODS = ("double-backward", "forward-over-reverse", "auto")
_MODES = ("eval", "train")
# Chosen by measurement, see the module docstring and bench/results/hvp_cpu.json.
_AUTO_METHOD = "double-backward"


def _sdpa_math(query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None = None,
               dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
               enable_gqa: bool = False) -> Tensor:
    """``F.scaled_dot_product_attention`` by its math implementation: matmuls and a softmax,
    differentiable any number of times in reverse and forward mode (the fused kernels have no
    double-backward or forward-mode derivatives). A boolean mask becomes the additive mask
    (0 / -inf) that ``F.scaled_dot_product_attention`` builds before taking that path."""
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        attn_mask = torch.zeros_like(attn_mask, dtype=query.dtype).masked_fill_(
            attn_mask.logical_not(), -math.inf)
    gqa = {"enable_gqa": True} if enable_gqa else {}  # the keyword exists from torch 2.5 on
    return torch.ops.aten._scaled_dot_product_attention_math(
        query, key, value, attn_mask, dropout_p, is_causal, scale=scale, **gqa)[0]


class _MathAttention(torch.overrides.TorchFunctionMode):
    """Inside, ``scaled_dot_product_attention`` runs :func:`_sdpa_math`; every other function
    runs as it is.

    Torch-function modes are per thread, so unlike ``torch.nn.attention.sdpa_kernel`` (which
    switches process-wide backend flags for its duration) this changes nothing another thread
    can observe, and nothing is left switched off when two threads enter and leave out of order.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.nn.functional.scaled_dot_product_attention:
            return _sdpa_math(*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


class _ModelUse:
    """Which thread is evaluating each model now, and in which mode.

    An evaluation swaps its θ into the caller's model (``torch.func.functional_call``
    reparametrises the module's attributes for the length of the forward pass) and sets the
    model's train/eval flags. Two threads doing that to one model at once read each other's
    parameters (silently wrong products) and restore each other's flags (the model is left in
    the wrong mode), so evaluations of one model take turns; other models run concurrently.
    The first evaluation saves the flags and the last restores them; evaluations nest within
    a thread.
    """

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._held: dict[int, list] = {}  # id(model) -> [thread, depth, training, saved flags]

    @contextlib.contextmanager
    def hold(self, model: nn.Module, training: bool):
        key, me = id(model), threading.get_ident()
        with self._changed:
            while key in self._held and self._held[key][0] != me:
                self._changed.wait()
            entry = self._held.get(key)
            if entry is None:
                entry = [me, 0, training, [(m, m.training) for m in model.modules()]]
                self._held[key] = entry
                model.train(training)
            elif entry[2] != training:
                raise RuntimeError(
                    "HessianOperator: a product in mode "
                    f"{'train' if training else 'eval'} inside a product on the same model in "
                    "the other mode (a loss_fn that takes products itself?)")
            entry[1] += 1
        try:
            yield
        finally:
            with self._changed:
                entry[1] -= 1
                if entry[1] == 0:
                    for module, flag in entry[3]:
                        module.training = flag
                    del self._held[key]
                    self._changed.notify_all()


_MODEL_USE = _ModelUse()
# Forward-mode AD keeps its levels in process-wide state: two threads in torch.func.jvp at once
# corrupt each other's ("no level exists"), so forward-over-reverse products take turns.
_FORWARD_AD = threading.RLock()


def math_attention() -> _MathAttention:
    """A context in which attention is differentiable twice (see :class:`_MathAttention`): every
    path of pfkernels that differentiates a user's model or loss twice runs it inside one."""
    return _MathAttention()


def _map_tensors(obj: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    if isinstance(obj, Tensor):
        return fn(obj)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_map_tensors(x, fn) for x in obj)
    if isinstance(obj, dict):
        return {k: _map_tensors(x, fn) for k, x in obj.items()}
    return obj


def _tensors(obj: Any) -> Iterator[Tensor]:
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for x in obj:
            yield from _tensors(x)
    elif isinstance(obj, dict):
        for x in obj.values():
            yield from _tensors(x)


def _is_one_batch(data: Any) -> bool:
    return (
        isinstance(data, (tuple, list))
        and len(data) == 2
        and isinstance(data[0], (Tensor, dict))
    )


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


class HessianOperator:
    """The Hessian of a model's mean loss as a symmetric linear operator of size n x n.

    Args:
        model: an ``nn.Module``; called as ``model(inputs)``. Never modified.
        loss_fn: ``loss_fn(outputs, targets)`` -> 0-d tensor, the mean loss of a batch (for
            example :func:`pfkernels.data.mse_loss`).
        data: one batch ``(inputs, targets)`` or a re-iterable of such batches (a list, a
            DataLoader). ``inputs``/``targets`` are tensors (or tuples/dicts of tensors); the
            example count of a batch is the leading size of its first input tensor. H is the
            Hessian of ``Σ_b n_b loss_b / Σ_b n_b``, accumulated batch by batch. Batches are moved
            to the parameters' device. In-memory data (one batch, a list or tuple of batches) is
            converted and checked for NaN/Inf once, at construction; other iterables are checked
            batch by batch during the first complete pass.
        params: which parameters θ covers: ``None`` (all with ``requires_grad``), a list of
            names from ``model.named_parameters()``, or a callable ``name -> bool``. The others
            are held fixed.
        method: ``"double-backward"``, ``"forward-over-reverse"`` or ``"auto"`` (see the module
            docstring for the measurements behind the choice).
        dtype: ``None`` (the parameters' dtype) or a floating dtype: then parameters, buffers and
            floating inputs/targets are copied to it (``torch.float64`` for accuracy work).
        mode: ``"eval"`` (default: dropout off, BatchNorm uses its running statistics) or
            ``"train"`` (batch statistics; with dropout the operator is random). The model's own
            flags are restored after every evaluation and its buffers are never mutated.
        check_finite: after each product, one sum over the result tested for NaN/Inf (on CUDA
            a host sync; about 5 µs for 55k floats on the CPU); a NaN/Inf raises ``FloatingPointError`` saying which batch and which
            parameters. Pass ``False`` to skip it on hot GPU paths.
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
    """

    # ------------------------------------------------------------------ construction

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[Any, Any], Tensor],
        data: Any,
        *,
        params: list[str] | tuple[str, ...] | Callable[[str], bool] | None = None,
        method: str = "auto",
        dtype: torch.dtype | None = None,
        mode: str = "eval",
        check_finite: bool = True,
        cache_graph: bool | None = None,
        process_group: Any = "default",
    ) -> None:
        self._group = _dist.resolve_group(process_group)
        model = _dist.unwrap_model(model)
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"argument 'model': must be a torch.nn.Module, got {type(model).__name__}"
            )
        if not callable(loss_fn):
            raise TypeError(f"argument 'loss_fn': must be callable, got {type(loss_fn).__name__}")
        self._set_method(method)
        _check_arg(mode in _MODES, "mode", f"must be one of {_MODES}, got {mode!r}")
        _check_arg(
            dtype is None or (isinstance(dtype, torch.dtype) and dtype.is_floating_point),
            "dtype",
            f"must be None or a floating-point torch dtype, got {dtype!r}",
        )
        self._model = model
        self._loss_fn = loss_fn
        self._mode = mode
        self._check_finite = bool(check_finite)
        self._function: Callable[[Tensor], Tensor] | None = None
        self._x0: Tensor | None = None

        named = list(model.named_parameters())
        _check_arg(len(named) > 0, "model", "has no parameters")
        selected = self._select(named, params)
        # With an explicit dtype, parameters, buffers and floating data are copied to it.
        self._cast = dtype
        dtypes = {p.dtype for _, p in selected}
        devices = {p.device for _, p in selected}
        _check_arg(len(devices) == 1, "model", f"selected parameters span devices {devices}")
        if dtype is None:
            _check_arg(
                len(dtypes) == 1,
                "params",
                f"selected parameters mix dtypes {dtypes}; pass dtype= to convert them",
            )
            dtype = next(iter(dtypes))
            _check_arg(dtype.is_floating_point, "params", f"dtype {dtype} is not floating")
        self._dtype = dtype
        self._device = next(iter(devices))
        self._names = [name for name, _ in selected]
        self._shapes = [p.shape for _, p in selected]
        self._numels = [p.numel() for _, p in selected]
        self._n = sum(self._numels)
        chosen = set(self._names)
        self._fixed_names = [name for name, _ in named if name not in chosen]

        self._data_source = data
        self._cached: list[tuple[Any, Any, int]] | None = None
        self._data_checked = False
        if _is_one_batch(data):
            self._cached = [self._prepare(data, 0, check=True)]
        elif isinstance(data, (tuple, list)):
            _check_arg(len(data) > 0, "data", "is an empty list of batches")
            self._cached = [self._prepare(b, i, check=True) for i, b in enumerate(data)]
        else:
            _check_arg(
                isinstance(data, Iterable),
                "data",
                "must be a batch (inputs, targets) or an iterable of batches, got "
                f"{type(data).__name__}",
            )
            _check_arg(
                iter(data) is not data,
                "data",
                "is a one-shot iterator; pass a re-iterable (a list of batches or a DataLoader)",
            )
        self._data_checked = self._cached is not None
        cache_graph = bool(cache_graph)
        _check_arg(
            not cache_graph or self._cached is not None,
            "cache_graph",
            "needs in-memory data (one batch or a list of batches), not a streaming iterable",
        )
        self._cache_graph = bool(cache_graph) and self._method == "double-backward"
        self._graph: tuple[tuple, list[tuple[Tensor, Tensor | None, int]]] | None = None
        self.num_matvecs = 0

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
        if not callable(f):
            raise TypeError(f"argument 'f': must be callable, got {type(f).__name__}")
        if not isinstance(x0, Tensor):
            raise TypeError(f"argument 'x0': must be a tensor, got {type(x0).__name__}")
        _check_arg(x0.dim() == 1, "x0", f"must be 1-D, got shape {tuple(x0.shape)}")
        _check_arg(x0.numel() > 0, "x0", "is empty")
        _check_arg(x0.dtype.is_floating_point, "x0", f"must be floating, got {x0.dtype}")
        op = cls.__new__(cls)
        op._set_method(method)
        op._model = None
        op._loss_fn = None
        op._mode = "eval"
        op._check_finite = bool(check_finite)
        op._function = f
        op._x0 = x0.detach().clone()
        op._dtype = x0.dtype
        op._device = x0.device
        op._names = ["x"]
        op._shapes = [x0.shape]
        op._numels = [x0.numel()]
        op._n = x0.numel()
        op._fixed_names = []
        op._cast = None
        op._data_source = None
        op._cached = [(None, None, 1)]
        op._data_checked = True
        op._cache_graph = False
        op._graph = None
        op._group = None
        op.num_matvecs = 0
        return op

    def _set_method(self, method: str) -> None:
        _check_arg(method in _METHODS, "method", f"must be one of {_METHODS}, got {method!r}")
        self._method = _AUTO_METHOD if method == "auto" else method

    @staticmethod
    def _select(
        named: list[tuple[str, nn.Parameter]], params: Any
    ) -> list[tuple[str, nn.Parameter]]:
        if params is None:
            selected = [(n, p) for n, p in named if p.requires_grad]
            _check_arg(len(selected) > 0, "model", "has no trainable parameters (requires_grad)")
            return selected
        if callable(params):
            selected = [(n, p) for n, p in named if params(n)]
            _check_arg(len(selected) > 0, "params", "the filter selects no parameters")
            return selected
        if isinstance(params, str) or not isinstance(params, (list, tuple, set, frozenset)):
            raise TypeError(
                "argument 'params': must be None, a list of parameter names or a callable "
                f"name -> bool, got {type(params).__name__}"
            )
        known = {n for n, _ in named}
        unknown = [p for p in params if p not in known]
        _check_arg(
            not unknown,
            "params",
            f"unknown parameter names {unknown}; the model has {sorted(known)[:20]}",
        )
        _check_arg(len(params) > 0, "params", "is an empty list of parameter names")
        wanted = set(params)
        return [(n, p) for n, p in named if n in wanted]

    # ------------------------------------------------------------------ data

    def _prepare(self, batch: Any, index: int, check: bool) -> tuple[Any, Any, int]:
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            raise ValueError(
                f"argument 'data': batch {index} must be a pair (inputs, targets), "
                f"got {type(batch).__name__}"
            )
        inputs, targets = batch

        def convert(t: Tensor) -> Tensor:
            if self._cast is not None and t.is_floating_point():
                return t.to(device=self._device, dtype=self._cast)
            return t.to(device=self._device)

        inputs = _map_tensors(inputs, convert)
        targets = _map_tensors(targets, convert)
        first = next(_tensors(inputs), None)
        _check_arg(first is not None, "data", f"batch {index} has no input tensor")
        count = first.shape[0] if first.dim() > 0 else 1
        _check_arg(count > 0, "data", f"batch {index} is empty")
        if check:
            for part, tree in (("inputs", inputs), ("targets", targets)):
                for t in _tensors(tree):
                    if t.is_floating_point() or t.is_complex():
                        _check_arg(
                            bool(torch.isfinite(t).all()),
                            "data",
                            f"batch {index} {part} contain NaN or Inf",
                        )
        return inputs, targets, count

    def _batches(self) -> Iterator[tuple[Any, Any, int]]:
        if self._cached is not None:
            yield from self._cached
            return
        check = not self._data_checked
        empty = True
        for i, batch in enumerate(self._data_source):
            empty = False
            yield self._prepare(batch, i, check=check)
        _check_arg(not empty, "data", "yielded no batches")
        self._data_checked = True

    # ------------------------------------------------------------------ evaluation

    @property
    def shape(self) -> tuple[int, int]:
        return (self._n, self._n)

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def method(self) -> str:
        """The product method in use (``"auto"`` resolved)."""
        return self._method

    @property
    def process_group(self):
        """The group products are reduced over, or None (local)."""
        return self._group

    @property
    def num_parameters(self) -> int:
        return self._n

    @property
    def param_names(self) -> list[str]:
        """Names of the parameters θ covers, in ``model.named_parameters()`` order."""
        return list(self._names)

    @property
    def model(self) -> nn.Module | None:
        """The caller's model (``None`` for :meth:`from_function`)."""
        return self._model

    def parameters(self) -> list[nn.Parameter]:
        """The model's own parameter tensors that θ covers, in θ's order (e.g. to look up
        optimizer state); empty for :meth:`from_function`."""
        if self._model is None:
            return []
        named = dict(self._model.named_parameters())
        return [named[n] for n in self._names]

    def reset_counters(self) -> None:
        """Set ``num_matvecs`` (vectors multiplied so far; a [B, n] product counts B) to 0."""
        self.num_matvecs = 0

    def _point(self) -> Tensor:
        if self._x0 is not None:
            return self._x0
        named = dict(self._model.named_parameters())
        flat = torch.cat([named[n].detach().reshape(-1) for n in self._names])
        return flat.to(self._dtype)

    def flat_parameters(self) -> Tensor:
        """θ now: a new ``[n]`` tensor of the operator's dtype and device."""
        return self._point().clone()

    def unflatten(self, vec: Tensor) -> dict[str, Tensor]:
        """Split a flat ``[n]`` vector into ``{parameter name: view shaped like the parameter}``."""
        self._check_vector(vec, "vec", batched=False)
        return dict(zip(self._names, self._views(vec)))

    def _views(self, theta: Tensor) -> list[Tensor]:
        return [c.view(s) for c, s in zip(torch.split(theta, self._numels), self._shapes)]

    @contextlib.contextmanager
    def _evaluation(self):
        if self._model is None:
            with math_attention():
                yield
            return
        with _MODEL_USE.hold(self._model, self._mode == "train"), math_attention():
            yield

    def _fixed_state(self) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """The parameters outside θ and the buffers, detached, in the working dtype."""
        named = dict(self._model.named_parameters())

        def fix(t: Tensor) -> Tensor:
            if self._cast is not None and t.is_floating_point():
                return t.detach().to(self._cast)
            return t.detach()

        fixed = {n: fix(named[n]) for n in self._fixed_names}
        buffers = {n: fix(b) for n, b in self._model.named_buffers()}
        return fixed, buffers

    def _losses(self) -> Iterator[tuple[Callable[[Tensor], Tensor], int]]:
        """Yields ``(closure θ -> batch mean loss, example count)`` per batch."""
        if self._function is not None:
            yield self._checked(self._function, "f"), 1
            return
        model, loss_fn = self._model, self._loss_fn
        fixed, buffers = self._fixed_state()
        for inputs, targets, count in self._batches():

            def batch_loss(theta: Tensor, inputs=inputs, targets=targets) -> Tensor:
                # Buffers are cloned inside the (possibly transformed) function: train-mode
                # BatchNorm updates its running statistics in place, which must neither reach
                # the caller's model nor touch a tensor captured from outside torch.func.grad.
                state = {n: b.clone() for n, b in buffers.items()}
                state.update(fixed)
                state.update(zip(self._names, self._views(theta)))
                return loss_fn(functional_call(model, state, (inputs,)), targets)

            yield self._checked(batch_loss, "loss_fn"), count

    @staticmethod
    def _checked(fn: Callable[[Tensor], Tensor], name: str) -> Callable[[Tensor], Tensor]:
        def wrapped(theta: Tensor) -> Tensor:
            out = fn(theta)
            if not isinstance(out, Tensor):
                raise TypeError(
                    f"argument '{name}': must return a tensor, got {type(out).__name__}"
                )
            _check_arg(
                out.dim() == 0,
                name,
                f"must return a scalar (0-d) loss, got shape {tuple(out.shape)}",
            )
            # Differentiating a loss that no selected parameter reaches would give H = 0 and
            # a "converged" zero spectrum; it is a detached loss, a no_grad block or the wrong
            # parameters, never what the caller meant.
            _check_arg(
                out.requires_grad or not torch.is_grad_enabled(),
                name,
                "the loss does not depend on the selected parameters (it does not require "
                "grad: detached, computed under no_grad, or built from other tensors)",
            )
            return out

        return wrapped

    def _accumulate(self, term: Callable[[Callable[[Tensor], Tensor], Tensor], Tensor]) -> Tensor:
        """``Σ_b n_b term(loss_b, θ) / Σ_b n_b`` under the evaluation context."""
        theta = self._point()
        total, count = None, 0
        with self._evaluation():
            for closure, n in self._losses():
                part = term(closure, theta)
                total = part * n if total is None else total.add_(part, alpha=n)
                count += n
        return self._mean(total, count)

    def _mean(self, total: Tensor, count: int) -> Tensor:
        """``total / count``, both summed over the ranks of the process group first."""
        if self._group is None:
            return total / count
        return _dist.weighted_mean(total, count, self._group)

    # ------------------------------------------------------------------ products

    def _check_vector(self, v: Any, name: str, batched: bool) -> None:
        if not isinstance(v, Tensor):
            raise TypeError(f"argument '{name}': must be a tensor, got {type(v).__name__}")
        ok = (v.dim() == 1 or (batched and v.dim() == 2)) and v.shape[-1] == self._n
        want = f"[{self._n}]" + (f" or [B, {self._n}]" if batched else "")
        _check_arg(ok, name, f"must have shape {want}, got {tuple(v.shape)}")
        _check_arg(v.dtype == self._dtype, name,
                   f"dtype {v.dtype} differs from the operator's {self._dtype}")
        _check_arg(v.device == self._device, name,
                   f"device {v.device} differs from the operator's {self._device}")

    def _hvp_term(self, v: Tensor) -> Callable[[Callable[[Tensor], Tensor], Tensor], Tensor]:
        if self._method == "forward-over-reverse":

            def forward_over_reverse(closure, theta):
                grad_fn = torch.func.grad(closure)

                def one(u: Tensor) -> Tensor:
                    return torch.func.jvp(grad_fn, (theta,), (u,))[1]

                with _FORWARD_AD:
                    if v.dim() == 1:
                        return one(v)
                    if self._mode == "train" and self._model is not None:
                        # vmap cannot write batched running statistics into unbatched buffers.
                        return torch.stack([one(u) for u in v])
                    return torch.func.vmap(one)(v)

            return forward_over_reverse

        def double_backward(closure, theta):
            th = theta.detach().requires_grad_(True)
            with torch.enable_grad():
                g = _derivative(closure(th), th, create_graph=True)
                if g is None:
                    return torch.zeros_like(v)
                if v.dim() == 1:
                    return _or_zeros(_derivative(g, th, v), v)
                # The forward pass and first backward are shared by every vector of the block.
                last = v.shape[0] - 1
                rows = [_derivative(g, th, u, retain_graph=i < last) for i, u in enumerate(v)]
                return torch.stack([_or_zeros(row, u) for row, u in zip(rows, v)])

        return double_backward

    def matvec(self, v: Tensor) -> Tensor:
        """H·v for ``v`` of shape ``[n]``, or ``H·v_i`` for each row of ``v`` ``[B, n]``.

        ``v`` must have the operator's dtype and device; returns a new tensor of ``v``'s shape.
        Adds B (1 for ``[n]``) to ``num_matvecs``. Raises ``FloatingPointError`` (when
        ``check_finite``) if the product has NaN/Inf entries.
        """
        self._check_vector(v, "v", batched=True)
        if v.dim() == 2 and v.shape[0] == 0:
            return torch.empty_like(v)
        if self._cache_graph:
            out = self._cached_products(v)
        else:
            out = self._accumulate(self._hvp_term(v))
        self.num_matvecs += 1 if v.dim() == 1 else v.shape[0]
        # A NaN or Inf entry makes the sum non-finite, and a sum is ~30x cheaper than an
        # elementwise isfinite on the CPU; the exact test runs only to rule out overflow.
        if (self._check_finite and not bool(torch.isfinite(out.sum()))
                and not bool(torch.isfinite(out).all())):
            self._raise_not_finite(out, v)
        return out

    def _state_key(self) -> tuple:
        """Identifies the model's parameters and buffers: storage and in-place version counter
        (bumped by every in-place write, e.g. ``optimizer.step()`` or ``copy_``)."""
        tensors = [*self._model.parameters(), *self._model.buffers()]
        for inputs, targets, _ in self._cached:  # in-memory batches may be the caller's tensors
            tensors += [*_tensors(inputs), *_tensors(targets)]
        return tuple((t.data_ptr(), t._version, t.dtype) for t in tensors)

    def _first_order_graphs(self) -> list[tuple[Tensor, Tensor | None, int]]:
        """Per batch ``(θ leaf, ∇loss_b with its graph or None, n_b)``, rebuilt when stale."""
        key = self._state_key()
        if self._graph is not None and self._graph[0] == key:
            return self._graph[1]
        self._graph = None  # free the old graph before building the new one
        theta = self._point()
        graphs = []
        with self._evaluation():
            for closure, n in self._losses():
                th = theta.detach().requires_grad_(True)
                with torch.enable_grad():
                    graphs.append((th, _derivative(closure(th), th, create_graph=True), n))
        self._graph = (key, graphs)
        return graphs

    def clear_cache(self) -> None:
        """Drop the cached first-order graph (see ``cache_graph``), freeing its memory."""
        self._graph = None

    @contextlib.contextmanager
    def reuse_graph(self):
        """A block inside which products at one point share their first-order graph.

        The graph is built by the first product (or :meth:`gradient`) in the block and freed on
        exit, so each further product costs one backward pass. The parameters must not change
        inside the block; changes through ``.data`` are not detected (see ``cache_graph``).
        :func:`pfkernels.eigsh` enters it for the length of a solve. A no-op for
        forward-over-reverse and for streaming data (nothing in memory to keep a graph of);
        blocks nest.
        """
        if self._cache_graph or self._method != "double-backward" or self._cached is None:
            yield self
            return
        self._cache_graph = True
        self._graph = None
        try:
            yield self
        finally:
            self._cache_graph = False
            self._graph = None

    @contextlib.contextmanager
    def deferred_checks(self):
        """A block in which products skip the NaN/Inf check when it would cost a host sync.

        On a GPU, ``check_finite`` reads one value back per product; a caller that checks the
        results itself at its own pace (:func:`pfkernels.eigsh` tests every Lanczos coefficient
        at its convergence checks and names the iteration) enters this block to keep its loop
        free of syncs. On the CPU the check costs no sync and stays on. Blocks nest.
        """
        previous = self._check_finite
        self._check_finite = previous and self._device.type == "cpu"
        try:
            yield self
        finally:
            self._check_finite = previous

    def _cached_products(self, v: Tensor) -> Tensor:
        graphs = self._first_order_graphs()
        count = sum(n for _, _, n in graphs)
        if self._group is not None:
            total = torch.zeros_like(v)
            for th, g, n in graphs:
                if g is None or not g.requires_grad:
                    continue
                for row, u in zip(total.view(-1, v.shape[-1]), v.view(-1, v.shape[-1])):
                    row.add_(_or_zeros(_derivative(g, th, u, retain_graph=True), u), alpha=n)
            return self._mean(total, count)
        # Local: each product is a fresh tensor from autograd, weighted in place (one batch, the
        # common case, needs no arithmetic at all): on an 11M-parameter ResNet-18 the zeroed
        # accumulator and the division cost 15% of a product.
        rows = []
        for u in (v,) if v.dim() == 1 else v:
            total = None
            for th, g, n in graphs:
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

    def __matmul__(self, v: Tensor) -> Tensor:
        return self.matvec(v)

    def gradient(self) -> Tensor:
        """∇E(θ), a new ``[n]`` tensor of the operator's dtype and device.

        With ``cache_graph`` the gradient is taken with its graph kept, so products at the same
        parameters that follow cost one backward each.
        """
        if self._cache_graph:
            graphs = self._first_order_graphs()
            theta = graphs[0][0]
            total = sum(n * _or_zeros(g, theta).detach() for _, g, n in graphs)
            return self._mean(total, sum(n for _, _, n in graphs))

        def grad_term(closure, theta):
            th = theta.detach().requires_grad_(True)
            with torch.enable_grad():
                return _or_zeros(_derivative(closure(th), th), theta)

        return self._accumulate(grad_term)

    def loss(self) -> Tensor:
        """E(θ), the example-weighted mean loss over all batches, as a 0-d tensor."""

        def loss_term(closure, theta):
            with torch.no_grad():
                return closure(theta).detach().to(self._dtype)

        return self._accumulate(loss_term)

    def third_derivative(self, u: Tensor, v: Tensor) -> Tensor:
        """∇_θ(uᵀ H(θ) v) = ∇³E(θ)[u, v, ·], a new ``[n]`` tensor.

        ``u``, ``v``: ``[n]`` of the operator's dtype and device (symmetric in u and v). Three
        reverse passes per batch (double backward of ``(∇(∇E·v))·u``), whatever ``method``.
        Used by the principal flow's non-principal correction −(h²/12)∇³E[g, g].
        """
        self._check_vector(u, "u", batched=False)
        self._check_vector(v, "v", batched=False)

        def third_term(closure, theta):
            th = theta.detach().requires_grad_(True)
            with torch.enable_grad():
                g = _derivative(closure(th), th, create_graph=True)
                hv = None if g is None else _derivative(g, th, v, create_graph=True)
                return _or_zeros(None if hv is None else _derivative(hv, th, u), theta)

        return self._accumulate(third_term)

    def to_scipy(self):
        """A ``scipy.sparse.linalg.LinearOperator`` (float64 NumPy in and out) over ``matvec``."""
        import numpy as np
        from scipy.sparse.linalg import LinearOperator

        def apply(x: np.ndarray) -> np.ndarray:
            x = np.asarray(x)
            vec = torch.as_tensor(np.ascontiguousarray(x.real, dtype=np.float64))
            vec = vec.to(device=self._device, dtype=self._dtype)
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
        rows = out.reshape(-1, self._n)
        bad_params = [
            name
            for name, block in zip(self._names, torch.split(rows, self._numels, dim=1))
            if not bool(torch.isfinite(block).all())
        ]
        where = "the loss and gradient are finite on every batch"
        theta = self._point()
        with self._evaluation():
            for i, (closure, _) in enumerate(self._losses()):
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
        if self._group is not None:
            where += " (of this rank's shard; the reduced product carries every rank's NaN/Inf)"
        raise FloatingPointError(
            f"HessianOperator.matvec: H·v has NaN/Inf entries in parameters {bad_params}; {where}"
        )

    def __repr__(self) -> str:
        source = "function" if self._function is not None else type(self._model).__name__
        return (
            f"HessianOperator(n={self._n}, source={source}, method={self._method!r}, "
            f"dtype={self._dtype}, device={self._device}, mode={self._mode!r}"
            + ("" if self._group is None else f", world_size={_dist.world_size(self._group)}")
            + ")"
        )
