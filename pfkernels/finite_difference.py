"""Hessian-vector products by central differences of gradients, for any engine that computes them.

``H v ≈ (g(θ + εv) − g(θ − εv)) / 2ε`` needs nothing but gradients, so it works where reverse-over-
reverse does not: models sharded by torch FSDP2 (``fully_shard``; double backward through its
all-gather/reduce-scatter hooks fails with "appears to not have been used in the graph"), DDP,
compiled or fused training steps, any engine that leaves gradients in ``.grad``.

Step size. With unit roundoff ``u`` of the parameters' dtype and ``θ_rms = ‖θ‖ / √n`` the
root-mean-square parameter (``n`` the number of parameters, over all shards),

    ε = u^(1/3) · (1 + θ_rms) / ‖v‖,

so the perturbation ``εv`` has length ``h = u^(1/3) (1 + θ_rms)``: the classical scalar rule
``u^(1/3) max(1, |x|)`` with the typical size of one parameter for ``|x|``. The relative error of a
product along a unit ``v`` is about

    u ‖θ‖ ρ / (h ‖Hv‖)   +   h² ‖∇³g[v, v, v]‖ / (6 ‖Hv‖)

(``ρ`` the size ``‖Hx‖`` of H on a random unit ``x``). The first term is rounding: every coordinate
of ``θ ± εv`` is rounded by up to ``u |θ_i|``, an error vector of length ~``u ‖θ‖`` that H maps
into the difference of the two gradients, divided by ``2ε``. The second is truncation, ``(h/L)²``
with ``L`` the length over which the curvature along ``v`` changes. In a neural network ``L`` is
set by the size of individual weights (a weight changed by a fraction δ of its size changes the
activations by O(δ)), not by the whole vector: ‖θ‖ grows like √n at a fixed weight size, ``L``
does not. The former rule, ``h = u^(1/3) (1 + ‖θ‖)``, therefore stepped far past ``L`` along the
sharp directions that eigensolvers look for. Measured (bench/bench_fd_step.py,
bench/results/fd_step_cpu.json; float64 double backward as reference; relative error along the
top eigenvector / median of 2 random unit directions, this rule vs the former one):

    model: parameters, ‖θ‖              dtype    this rule          former rule
    digits MLP 2x200: 55,210, 11.7       float32  1.1e-5 / 2.0e-4    9.7e-4 / 2.4e-5
                                         float64  1.6e-11 / 3.1e-10  1.5e-9 / 3.7e-11
    GPT-2-shaped 1x32, vocab 1000:       float32  2.8e-3 / 1.5e-4    0.27 / 3.2e-4
      45,280, 10.6                       float64  4.2e-9 / 2.0e-10   5.2e-7 / 4.8e-10
    GPT-2-shaped 2x128, vocab 50,257:    float32  2.4e-3 / 1.5e-3    0.93 / 1.4e-4
      6.8M, 57.7                         float64  3.6e-9 / 2.8e-9    1.2e-5 / 2.0e-10

(random init; ``L`` along the top eigenvectors: 1.6, 0.08, 0.08; along random directions: 11,
2.4, 20). With ``h`` a parameter's size the rounding term is
``u^(2/3) ‖θ‖ ρ / ((1 + θ_rms) ‖Hv‖)``: it grows like √n, is small along sharp directions
(``‖Hv‖ ≫ ρ``) and largest along random ones, where the former rule was better (table). No step
fits every direction: the best measured lengths are 3e-4 to 3e-3 (top) and 0.01 to 0.1 (random)
in float32. This rule favours the sharp directions, whose eigenvalues and products matter most; pass
``eps=`` (the length ``h``) to choose another. On the digits MLP with 1000 examples
(bench/bench_finite_difference.py, bench/results/finite_difference_cpu.json) eigsh on these
products found the top-2 eigenvalues 9.9e-7 / 5.2e-7 (float32) and 2.5e-12 / 1.6e-12 (float64)
off (former rule: 5e-5 / 2e-4, unconverged after 1000 products, and 2e-10); a product costs
0.73-0.81 of a fresh double-backward one. Only float32 and float64 parameters are accepted: in
bfloat16 or float16 ``u^(1/3)`` is 0.2 or 0.1, no derivative at all.

Parameters are perturbed in place (that is what lets any engine's own forward and backward see
θ ± εv) and restored bit for bit after every product, also when the gradient function raises: the
exact tensors are saved before the first perturbation and copied back. Gradients the engine
leaves in ``.grad`` are read and the caller's ``.grad`` put back.

With FSDP2, parameters are DTensors sharded over a process group; every vector of a
:class:`GradientHessian` is then the concatenation of this rank's local shards (its length differs
between ranks when a dimension does not split evenly), inner products are all-reduced, and no full
vector is ever gathered. :func:`pfkernels.eigsh` solves such operators on their shards.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from typing import Any, Callable

import torch
from torch import Tensor

from . import distributed as _dist
from ._checks import check_arg as _check_arg

__all__ = ["GradientHessian", "central_difference", "finite_difference_eps", "is_sharded"]

_DTYPES = (torch.float32, torch.float64)


def is_sharded(t: Tensor) -> bool:
    """Whether ``t`` is a DTensor (FSDP2's sharded parameters and gradients)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch without distributed support
        return False
    return isinstance(t, DTensor)


def _local(t: Tensor) -> Tensor:
    """The tensor whose storage this rank holds: a DTensor's local shard, else ``t`` itself."""
    return t.to_local() if is_sharded(t) else t


def check_dtype(dtype: torch.dtype, arg: str) -> None:
    _check_arg(dtype in _DTYPES, arg,
               f"finite-difference products need float32 or float64 parameters, got {dtype} "
               "(the step u^(1/3) of a 16-bit type leaves no significant digit)")


def check_eps(eps: Any, arg: str = "eps") -> None:
    _check_arg(eps is None or (isinstance(eps, (int, float)) and not isinstance(eps, bool)
                               and math.isfinite(eps) and eps > 0),
               arg, f"must be None or a positive finite number, got {eps!r}")


_NORM_CHUNK = 1 << 22  # elements per float64 partial sum: no float64 copy of a whole vector


def sum_of_squares(t: Tensor) -> float:
    """``Σ t_i²`` accumulated in float64, chunk by chunk (a float64 copy of a 124M-parameter
    vector would be 1 GB on top of the solve)."""
    flat = t.detach().reshape(-1)
    return sum(float(torch.linalg.vector_norm(flat[i: i + _NORM_CHUNK], dtype=torch.float64)) ** 2
               for i in range(0, flat.numel(), _NORM_CHUNK))


def finite_difference_eps(dtype: torch.dtype, theta_rms: float, v_norm: float,
                          eps: float | None = None) -> float:
    """The step ε of a central difference along ``v`` at ``θ`` (see the module docstring):
    ``u^(1/3) (1 + θ_rms) / ‖v‖`` with ``θ_rms = ‖θ‖ / √n`` the root-mean-square parameter, or
    ``eps / ‖v‖`` when ``eps`` is given (then ``eps`` is the length of the perturbation ``εv``).
    ``v_norm`` must be positive."""
    if eps is not None:
        return eps / v_norm
    u = torch.finfo(dtype).eps / 2
    return u ** (1.0 / 3.0) * (1.0 + theta_rms) / v_norm


def central_difference(gradient: Callable[[], list[Tensor]], params: Sequence[Tensor],
                       direction: Sequence[Tensor], eps: float) -> list[Tensor]:
    """``(g(θ + εv) − g(θ − εv)) / 2ε`` for the tensors ``params`` (θ, perturbed in place) and
    ``direction`` (v, shaped like them), where ``gradient()`` returns g at the current θ as a list
    of tensors shaped like ``params``. The parameters are restored bit for bit on return and on
    any exception (their exact values are saved first and copied back)."""
    saved = [p.detach().clone() for p in params]
    try:
        with torch.no_grad():
            for p, d in zip(params, direction):
                p.add_(d, alpha=eps)
        plus = gradient()
        with torch.no_grad():
            for p, s, d in zip(params, saved, direction):
                p.copy_(s).sub_(d, alpha=eps)
        minus = gradient()
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)
    return [(a - b).div_(2 * eps) for a, b in zip(plus, minus)]


class GradientHessian:
    """The Hessian of whatever ``gradient_fn`` differentiates, by central differences of its
    gradients: a symmetric linear operator over the flat concatenation of ``params``.

    Args:
        gradient_fn: ``gradient_fn()`` computes the gradient at the parameters' current values
            and either returns it (a sequence of tensors, or DTensors, aligned with ``params``;
            ``None`` entries are zero) or returns ``None`` after leaving it in ``p.grad`` (what
            ``loss.backward()`` does, under DDP or FSDP2 included: their hooks reduce the
            gradient over the ranks). It must not keep state between calls (no optimizer step,
            no gradient accumulation across calls: ``.grad`` is cleared before each call and the
            caller's ``.grad`` restored after).
        params: the parameter tensors θ (e.g. ``list(model.parameters())``), all plain tensors
            or all DTensors (FSDP2); float32 or float64, one dtype and one device.
        eps: ``None`` (the step of the module docstring) or the length ``‖εv‖`` of each
            perturbation, a positive finite number.
        process_group: for plain (replicated) parameters, the group whose ranks take every
            product together (DDP: ``"default"``, the world group when initialised): it makes
            :func:`pfkernels.eigsh` draw one start vector for all ranks, and lets
            ``shard_basis=True`` split the basis. For DTensor parameters the group of their
            device mesh is used, and vectors are local shards (see the module docstring).
        check_finite: raise ``FloatingPointError`` when a product has NaN/Inf entries.

    Vectors are ``[n]`` or ``[B, n]`` in the parameters' dtype and device, ``n`` the number of
    elements of ``params`` this rank holds. Every product costs two calls of ``gradient_fn``.
    """

    def __init__(self, gradient_fn: Callable[[], Any], params: Sequence[Tensor], *,
                 eps: float | None = None, process_group: Any = "default",
                 check_finite: bool = True) -> None:
        if not callable(gradient_fn):
            raise TypeError(
                f"argument 'gradient_fn': must be callable, got {type(gradient_fn).__name__}")
        if isinstance(params, Tensor) or not isinstance(params, (list, tuple)):
            raise TypeError("argument 'params': must be a list or tuple of tensors, got "
                            f"{type(params).__name__}")
        params = list(params)
        _check_arg(len(params) > 0, "params", "is empty")
        for i, p in enumerate(params):
            if not isinstance(p, Tensor):
                raise TypeError(f"argument 'params': entry {i} is {type(p).__name__}, not a "
                                "tensor")
        sharded = [is_sharded(p) for p in params]
        _check_arg(all(sharded) or not any(sharded), "params",
                   f"mixes sharded (DTensor, FSDP2) and unsharded parameters ({sum(sharded)} of "
                   f"{len(params)} sharded): shard every parameter or none")
        dtypes = {p.dtype for p in params}
        devices = {_local(p).device for p in params}
        _check_arg(len(dtypes) == 1, "params", f"mix dtypes {dtypes}")
        _check_arg(len(devices) == 1, "params", f"span devices {devices}")
        dtype = next(iter(dtypes))
        check_dtype(dtype, "params")
        check_eps(eps)
        self._sharded = bool(sharded[0])
        if self._sharded:
            _check_arg(_dist.is_distributed("default"), "params",
                       "are sharded (DTensor, FSDP2) but torch.distributed has no initialised "
                       "process group")
            meshes = {p.device_mesh for p in params}
            _check_arg(len(meshes) == 1 and next(iter(meshes)).ndim == 1, "params",
                       "must be sharded over one 1-D device mesh (FSDP2's fully_shard)")
            self._group = next(iter(meshes)).get_group()
            self._vector_group = self._group
        else:
            self._group = _dist.resolve_group(process_group)
            self._vector_group = None
        self._gradient_fn = gradient_fn
        self._params = params
        self._eps = eps
        self._dtype = dtype
        self._device = next(iter(devices))
        self._check_finite = bool(check_finite)
        self._numels = [_local(p).numel() for p in params]
        self._n = sum(self._numels)
        self.num_matvecs = 0

    # ------------------------------------------------------------------ attributes

    @property
    def shape(self) -> tuple[int, int]:
        """``(n, n)`` with ``n`` this rank's number of elements (local shards when sharded)."""
        return (self._n, self._n)

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def method(self) -> str:
        return "finite-difference"

    @property
    def process_group(self):
        """The group the ranks take products in together, or None (local)."""
        return self._group

    @property
    def vector_group(self):
        """The group whose ranks each hold a shard of every vector (inner products are sums
        over it), or None when vectors are whole on every rank."""
        return self._vector_group

    @property
    def num_parameters(self) -> int:
        return self._n

    def reset_counters(self) -> None:
        self.num_matvecs = 0

    # ------------------------------------------------------------------ vectors

    def _locals(self) -> list[Tensor]:
        return [_local(p.detach()) for p in self._params]

    def flat_parameters(self) -> Tensor:
        """θ now (this rank's shards when sharded): a new ``[n]`` tensor."""
        return torch.cat([t.reshape(-1) for t in self._locals()])

    def dot(self, x: Tensor, y: Tensor) -> float:
        """``<x, y>`` over whole vectors (all-reduced over the shards when sharded), float64."""
        local = torch.dot(x.reshape(-1).double(), y.reshape(-1).double()).reshape(1)
        if self._vector_group is not None:
            local = _dist.all_reduce_sum(local, self._vector_group)
        return float(local)

    def _check_vector(self, v: Any, name: str) -> None:
        if not isinstance(v, Tensor):
            raise TypeError(f"argument '{name}': must be a tensor, got {type(v).__name__}")
        _check_arg(v.dim() in (1, 2) and v.shape[-1] == self._n, name,
                   f"must have shape [{self._n}] or [B, {self._n}], got {tuple(v.shape)}")
        _check_arg(v.dtype == self._dtype, name,
                   f"dtype {v.dtype} differs from the operator's {self._dtype}")
        _check_arg(v.device == self._device, name,
                   f"device {v.device} differs from the operator's {self._device}")

    # ------------------------------------------------------------------ products

    def gradient(self) -> Tensor:
        """The gradient at θ now (this rank's shards when sharded): a new ``[n]`` tensor."""
        return torch.cat([g.reshape(-1) for g in self._gradient()])

    def _gradient(self) -> list[Tensor]:
        saved = [p.grad for p in self._params]
        try:
            for p in self._params:
                p.grad = None
            out = self._gradient_fn()
            if out is None:
                grads = [p.grad for p in self._params]
            else:
                if isinstance(out, Tensor) or not isinstance(out, (list, tuple)):
                    raise TypeError("argument 'gradient_fn': must return None or a sequence of "
                                    f"gradients, got {type(out).__name__}")
                grads = list(out)
                _check_arg(len(grads) == len(self._params), "gradient_fn",
                           f"returned {len(grads)} gradients for {len(self._params)} params")
            result = []
            for i, (g, p) in enumerate(zip(grads, self._params)):
                local = _local(p.detach())
                if g is None:
                    result.append(torch.zeros_like(local))
                    continue
                g = _local(g.detach())
                _check_arg(g.shape == local.shape, "gradient_fn",
                           f"gradient {i} has shape {tuple(g.shape)}, its parameter's (local) "
                           f"shape is {tuple(local.shape)}")
                result.append(g.to(self._dtype).clone())
            return result
        finally:
            for p, g in zip(self._params, saved):
                p.grad = g

    def _norms(self, v: Tensor) -> tuple[float, float]:
        """(θ_rms = ‖θ‖ / √n, ‖v‖) over whole vectors (one all-reduce when sharded)."""
        theta_sq = sum(sum_of_squares(t) for t in self._locals())
        sq = torch.tensor([theta_sq, sum_of_squares(v), float(self._n)], dtype=torch.float64)
        if self._vector_group is not None:
            sq = _dist.all_reduce_sum(sq, self._vector_group)
        return math.sqrt(float(sq[0]) / float(sq[2])), math.sqrt(float(sq[1]))

    def _product(self, v: Tensor) -> Tensor:
        theta_rms, v_norm = self._norms(v)
        if v_norm == 0:
            return torch.zeros_like(v)
        eps = finite_difference_eps(self._dtype, theta_rms, v_norm, self._eps)
        locals_ = self._locals()
        direction = [c.view_as(t) for c, t in zip(torch.split(v, self._numels), locals_)]
        parts = central_difference(self._gradient, locals_, direction, eps)
        return torch.cat([p.reshape(-1) for p in parts])

    def matvec(self, v: Tensor) -> Tensor:
        """H·v for ``v`` ``[n]``, or each row of ``v`` ``[B, n]`` (2B gradient calls); a new
        tensor of ``v``'s shape. The parameters are restored bit for bit afterwards."""
        self._check_vector(v, "v")
        _check_arg(bool(torch.isfinite(v).all()), "v", "contains NaN or Inf")
        out = self._product(v) if v.dim() == 1 else torch.stack([self._product(u) for u in v])
        self.num_matvecs += 1 if v.dim() == 1 else v.shape[0]
        if self._check_finite and not bool(torch.isfinite(out).all()):
            raise FloatingPointError(
                "GradientHessian.matvec: H·v has NaN/Inf entries (the gradient at θ ± εv is not "
                "finite; a smaller eps= may help)")
        return out

    def __matmul__(self, v: Tensor) -> Tensor:
        return self.matvec(v)

    def __repr__(self) -> str:
        return (f"GradientHessian(n={self._n}, dtype={self._dtype}, device={self._device}, "
                f"sharded={self._sharded}, eps={self._eps})")


def module_gradient_fn(model: torch.nn.Module, loss_fn: Callable[[Any, Any], Tensor],
                       batches: Sequence[tuple[Any, Any, int]], training: bool,
                       group) -> Callable[[], None]:
    """A ``gradient_fn`` for a model whose own forward and backward reduce gradients over
    ``group`` by averaging the ranks (FSDP2's default): ``loss.backward()`` batch by batch, each
    batch's mean loss weighted by ``R n_b / N`` (``N`` all ranks' examples), so the averaged
    gradient is that of the global example-weighted mean loss. The model's train/eval flags are
    set for the call and restored."""
    world = _dist.world_size(group)
    local = sum(n for _, _, n in batches)
    total = int(_dist.all_reduce_sum(torch.tensor([float(local)], dtype=torch.float64),
                                     group)[0])

    def gradient() -> None:
        with module_mode(model, training):
            for inputs, targets, n in batches:
                loss = loss_fn(model(inputs), targets)
                (loss * (world * n / total)).backward()

    return gradient


@contextlib.contextmanager
def module_mode(model: torch.nn.Module, training: bool):
    """``model.train(training)`` for the block; every module's own flag restored after."""
    flags = [(m, m.training) for m in model.modules()]
    model.train(training)
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


class ShardedModelSource:
    """The source of a :class:`pfkernels.HessianOperator` over a model sharded by FSDP2 (its
    parameters are DTensors): what the operator core reads (``n``, ``dtype``, ``device``,
    ``group``, ``names``, ``point()``, ``mean()``) describes this rank's local shards, and the
    products come from :attr:`hessian`, a :class:`GradientHessian` over the model's own forward
    and backward (:func:`module_gradient_fn`). Batches are one ``(inputs, targets)`` pair or a
    list of them, moved to the parameters' device."""

    in_memory = True

    def __init__(self, model: torch.nn.Module, loss_fn: Callable[[Any, Any], Tensor], data: Any,
                 *, params: Any = None, dtype: torch.dtype | None = None, mode: str = "eval",
                 method: str = "finite-difference", eps: float | None = None,
                 check_finite: bool = True) -> None:
        _check_arg(method == "finite-difference", "method",
                   "the parameters are sharded (DTensor, torch FSDP2): double backward through "
                   "FSDP's hooks is not supported by torch (autograd reports the sharded "
                   "parameters unused); use method='finite-difference'")
        _check_arg(dtype is None, "dtype", "cannot convert sharded (FSDP2) parameters; cast the "
                   "model before fully_shard")
        _check_arg(mode in ("eval", "train"), "mode",
                   f"must be 'eval' or 'train' for a sharded (FSDP2) model, got {mode!r}")
        _check_arg(callable(loss_fn), "loss_fn", "must be callable for a sharded (FSDP2) model")
        _check_arg(_dist.is_distributed("default"), "model",
                   "has sharded (DTensor, FSDP2) parameters but torch.distributed has no "
                   "initialised process group")
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if params is not None:
            chosen = set(params) if not callable(params) else {n for n, _ in named if params(n)}
            named = [(n, p) for n, p in named if n in chosen]
        _check_arg(len(named) > 0, "params", "selects no trainable parameters")
        tensors = [p for _, p in named]
        probe = GradientHessian(lambda: None, tensors, eps=eps)  # checks params: one mesh, dtype
        self.model = model
        self.names = [n for n, _ in named]
        self.dtype, self.device = probe.dtype, probe.device
        self.group = probe.vector_group
        self.vector_group = probe.vector_group
        self.shapes = [_local(p.detach()).shape for p in tensors]
        self.numels = [s.numel() for s in self.shapes]
        self.n = sum(self.numels)
        self.loss_fn = loss_fn
        self.mode = mode
        if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], Tensor):
            data = [data]
        _check_arg(isinstance(data, (tuple, list)) and len(data) > 0, "data",
                   "must be one batch (inputs, targets) or a non-empty list of them for a "
                   "sharded (FSDP2) model")
        self.batches = []
        for i, batch in enumerate(data):
            _check_arg(isinstance(batch, (tuple, list)) and len(batch) == 2
                       and isinstance(batch[0], Tensor) and batch[0].dim() > 0, "data",
                       f"batch {i} must be a pair (inputs tensor, targets)")
            x, y = (t.to(self.device) if isinstance(t, Tensor) else t for t in batch)
            self.batches.append((x, y, x.shape[0]))
        gradient = module_gradient_fn(model, loss_fn, self.batches, mode == "train", self.group)
        self.hessian = GradientHessian(gradient, tensors, eps=eps, check_finite=check_finite)
        self._tensors = tensors

    def point(self) -> Tensor:
        return self.hessian.flat_parameters()

    def parameters(self) -> list[Tensor]:
        return list(self._tensors)

    def mean(self, total: Tensor, count: int) -> Tensor:
        return _dist.weighted_mean(total, count, self.group)

    def loss(self) -> Tensor:
        """The global example-weighted mean loss, a 0-d tensor (the same on every rank)."""
        with torch.no_grad(), module_mode(self.model, self.mode == "train"):
            total = sum(n * self.loss_fn(self.model(x), y).detach().to(self.dtype)
                        for x, y, n in self.batches)
        return self.mean(total, sum(n for _, _, n in self.batches))
