"""Where a curvature operator's losses come from: a model, a loss and data, or a flat function.

A source turns its inputs into the pieces every operator of :mod:`pfkernels.curvature` needs,
and nothing else: the flat parameter vector θ (which parameters, in which order, dtype and
device), and per batch a closure ``θ -> loss`` (and, for a model, ``θ -> outputs`` with the loss
on those outputs, which the Gauss-Newton and Fisher operators differentiate separately), with the
example count that weights the batch in the mean over batches and over the ranks of a process
group. The operators decide what to differentiate; the sources decide what is evaluated.

- :class:`ModelSource`: ``model``, ``loss_fn`` and ``data``. Batches are pairs ``(inputs,
  targets)`` called as ``loss_fn(model(inputs), targets)``, or mappings (Hugging Face style)
  called as ``model(**batch)``: with ``loss_fn=None`` the loss is the output's ``.loss``, with a
  ``loss_fn`` the ``labels`` entry is the target, ``loss_fn(model(**rest), labels)``.
- :class:`FunctionSource`: a scalar function of one flat vector, ``f(x)``.

The model is evaluated with ``torch.func.functional_call`` on views of θ, so the caller's model
and its tensors are never modified: parameters are read afresh from the model at every call (the
operator follows training), buffers are passed as copies (BatchNorm running statistics never
move), and the modules' train/eval flags are restored after each evaluation. Evaluations of one
model from several threads take turns (each swaps its θ into the module); attention is routed to
its math path by a per-thread mode (:func:`math_attention`), not by torch's global backend flags.
"""

from __future__ import annotations

import contextlib
import math
import threading
import warnings
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call

from . import distributed as _dist
from ._checks import check_arg as _check_arg

__all__ = ["FunctionSource", "ModelSource", "math_attention"]

MODES = ("eval", "train", "batch-stats")


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


def math_attention() -> _MathAttention:
    """A context in which attention is differentiable twice (see :class:`_MathAttention`): every
    path of pfkernels that differentiates a user's model or loss twice runs it inside one."""
    return _MathAttention()


def _is_batch_stats_module(module: nn.Module) -> bool:
    """BatchNorm-style layers: batch statistics in train mode, running statistics in eval."""
    return isinstance(module, nn.modules.batchnorm._BatchNorm)


def _set_mode(model: nn.Module, mode: str) -> None:
    model.train(mode == "train")
    if mode == "batch-stats":
        for module in model.modules():
            if _is_batch_stats_module(module):
                module.train(True)


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
        self._held: dict[int, list] = {}  # id(model) -> [thread, depth, mode, saved flags]

    @contextlib.contextmanager
    def hold(self, model: nn.Module, mode: str):
        key, me = id(model), threading.get_ident()
        with self._changed:
            while key in self._held and self._held[key][0] != me:
                self._changed.wait()
            entry = self._held.get(key)
            if entry is None:
                entry = [me, 0, mode, [(m, m.training) for m in model.modules()]]
                self._held[key] = entry
                _set_mode(model, mode)
            elif entry[2] != mode:
                raise RuntimeError(
                    f"HessianOperator: a product in mode {mode} inside a product on the same "
                    f"model in mode {entry[2]} (a loss_fn that takes products itself?)")
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
# corrupt each other's ("no level exists"), so forward-mode products take turns.
FORWARD_AD = threading.RLock()


def _map_tensors(obj: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    if isinstance(obj, Tensor):
        return fn(obj)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_map_tensors(x, fn) for x in obj)
    if isinstance(obj, Mapping):
        return {k: _map_tensors(x, fn) for k, x in obj.items()}
    return obj


def _tensors(obj: Any) -> Iterator[Tensor]:
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for x in obj:
            yield from _tensors(x)
    elif isinstance(obj, Mapping):
        for x in obj.values():
            yield from _tensors(x)


def _is_tensor_tree(obj: Any) -> bool:
    """A tensor, or a tuple/list/mapping whose leaves are all tensors (at least one)."""
    if isinstance(obj, Tensor):
        return True
    if isinstance(obj, (tuple, list)):
        return len(obj) > 0 and all(_is_tensor_tree(x) for x in obj)
    if isinstance(obj, Mapping):
        return len(obj) > 0 and all(_is_tensor_tree(x) for x in obj.values())
    return False


def _is_one_batch(data: Any) -> bool:
    """``(inputs, targets)``: inputs a tensor or a mapping, or (tuple inputs) a tuple of tensors
    followed by a tensor target. ``[(x1, y1), (x2, y2)]`` is two batches: its second element is
    a pair, not a tensor."""
    if not (isinstance(data, (tuple, list)) and len(data) == 2):
        return False
    inputs, targets = data
    if isinstance(inputs, (Tensor, Mapping)):
        return True
    return isinstance(inputs, (tuple, list)) and _is_tensor_tree(inputs) and isinstance(
        targets, Tensor)


def model_outputs_tensor(outputs: Any, name: str = "model") -> Tensor:
    """The tensor a Gauss-Newton or Fisher operator differentiates through: the model's output
    itself, or its ``logits`` (Hugging Face ``ModelOutput`` or a mapping)."""
    if isinstance(outputs, Tensor):
        return outputs
    logits = getattr(outputs, "logits", None)
    if logits is None and isinstance(outputs, Mapping):
        logits = outputs.get("logits")
    if isinstance(logits, Tensor):
        return logits
    raise TypeError(
        f"argument '{name}': the model returned {type(outputs).__name__}; a Gauss-Newton or "
        "Fisher operator needs a tensor output or one with a .logits tensor")


def unwrap_compiled(model: Any) -> Any:
    """The module inside ``torch.compile(model)`` (``_orig_mod``): the compiled wrapper cannot be
    differentiated twice, and the original module shares its parameters."""
    inner = getattr(model, "_orig_mod", None)
    return inner if isinstance(inner, nn.Module) else model


def _active_dropout(model: nn.Module) -> list[str]:
    return [name or type(m).__name__ for name, m in model.named_modules()
            if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0]


def _hf_loss(outputs: Any) -> Any:
    loss = getattr(outputs, "loss", None)
    if loss is None and isinstance(outputs, Mapping):
        loss = outputs.get("loss")
    if loss is None:
        raise TypeError(
            "argument 'loss_fn': loss_fn=None takes the loss from the model's output (.loss), "
            f"but the model returned {type(outputs).__name__} without one; pass a loss_fn, or "
            "put the labels in the batch")
    return loss


def _check_loss(out: Any, name: str) -> Tensor:
    if not isinstance(out, Tensor):
        raise TypeError(f"argument '{name}': must return a tensor, got {type(out).__name__}")
    if out.dim() != 0:  # the message formatted only on failure: this runs on every evaluation
        _check_arg(False, name, f"must return a scalar (0-d) loss, got shape {tuple(out.shape)}")
    # Differentiating a loss that no selected parameter reaches would give H = 0 and a
    # "converged" zero spectrum; it is a detached loss, a no_grad block or the wrong parameters,
    # never what the caller meant.
    _check_arg(
        out.requires_grad or not torch.is_grad_enabled(),
        name,
        "the loss does not depend on the selected parameters (it does not require grad: "
        "detached, computed under no_grad, or built from other tensors)",
    )
    return out


def _checked(fn: Callable[[Tensor], Tensor], name: str) -> Callable[[Tensor], Tensor]:
    return lambda theta: _check_loss(fn(theta), name)


class BatchTerms:
    """One batch of a :class:`ModelSource`: what an operator evaluates at θ.

    ``loss(θ)``: the batch's mean loss (0-d, checked). ``outputs(θ)``: the tensor the loss is a
    function of (the model's output or its ``.logits``). ``loss_of_outputs(outputs)``: the loss
    from those outputs (needs ``loss_fn``; for ``loss_fn=None`` the operator supplies the loss it
    recognised). ``targets``: the batch's targets (labels of a mapping batch). ``count``: the
    example count weighting the batch.
    """

    __slots__ = ("count", "loss", "loss_of_outputs", "outputs", "targets")

    def __init__(self, loss, outputs, loss_of_outputs, targets, count):
        self.loss = loss
        self.outputs = outputs
        self.loss_of_outputs = loss_of_outputs
        self.targets = targets
        self.count = count


class FunctionSource:
    """A scalar function of one flat vector: θ is ``x0`` (copied), the one "batch" is ``f``.

    ``f(x)`` takes a tensor shaped like ``x0`` (1-D, floating) and returns a 0-d tensor written
    in torch operations. Operators over outputs (Gauss-Newton, Fisher) need a model, not this.
    ``name``: what messages about ``f``'s result call it (the caller's argument name).
    :meth:`set_point` moves the point without building a new source.
    """

    def __init__(self, f: Callable[[Tensor], Tensor], x0: Tensor, *, name: str = "f") -> None:
        if not callable(f):
            raise TypeError(f"argument 'f': must be callable, got {type(f).__name__}")
        if not isinstance(x0, Tensor):
            raise TypeError(f"argument 'x0': must be a tensor, got {type(x0).__name__}")
        _check_arg(x0.dim() == 1, "x0", f"must be 1-D, got shape {tuple(x0.shape)}")
        _check_arg(x0.numel() > 0, "x0", "is empty")
        _check_arg(x0.dtype.is_floating_point, "x0", f"must be floating, got {x0.dtype}")
        self.function = f
        self._name = name
        self._x0 = x0.detach().clone()
        self._moves = 0
        self.dtype = x0.dtype
        self.device = x0.device
        self.names = ["x"]
        self.shapes = [x0.shape]
        self.numels = [x0.numel()]
        self.n = x0.numel()
        self.mode = "eval"
        self.group = None
        self.model = None
        self.in_memory = True

    def point(self) -> Tensor:
        return self._x0

    def set_point(self, x: Tensor) -> None:
        """Evaluate at ``x`` from now on: ``x`` is held, not copied (shape, dtype and device of
        ``x0``). An operator's kept graph belongs to the old point and is rebuilt, and so it is
        after an in-place write to ``x`` (its version counter is part of :meth:`state_key`)."""
        if not isinstance(x, Tensor):
            raise TypeError(f"argument 'x': must be a tensor, got {type(x).__name__}")
        if not (x.shape == self._x0.shape and x.dtype == self.dtype
                and x.device == self.device):
            _check_arg(False, "x", f"must be a {tuple(self._x0.shape)} {self.dtype} tensor on "
                       f"{self.device}, got {tuple(x.shape)} {x.dtype} on {x.device}")
        self._x0 = x.detach()
        self._moves += 1

    def parameters(self) -> list[nn.Parameter]:
        return []

    @contextlib.contextmanager
    def evaluation(self):
        with math_attention():
            yield

    def losses(self) -> Iterator[tuple[Callable[[Tensor], Tensor], int]]:
        yield _checked(self.function, self._name), 1

    def batches(self) -> Iterator[BatchTerms]:
        raise TypeError("argument 'model': this operator differentiates through a model's "
                        "outputs; a function of a flat vector (from_function) has none")

    def mean(self, total: Tensor, count: int) -> Tensor:
        return total / count

    def state_key(self) -> tuple:
        """Identifies the point: the moves so far and the held tensor's in-place version."""
        return (self._moves, self._x0._version)

    def describe(self) -> str:
        return "function"


class ModelSource:
    """A model's mean loss over data, as a function of the selected parameters θ.

    Args:
        model: an ``nn.Module`` (``DistributedDataParallel``/``DataParallel`` are unwrapped, and
            so is ``torch.compile``'s wrapper: its ``_orig_mod`` shares the parameters, and the
            compiled graph cannot be differentiated twice). Never modified.
        loss_fn: ``loss_fn(outputs, targets)`` -> 0-d mean loss of a batch, or ``None``: batches
            are then mappings called as ``model(**batch)`` and the loss is the output's
            ``.loss`` (Hugging Face models with ``labels`` in the batch).
        data: one batch or a re-iterable of batches (a list, a DataLoader). A batch is a pair
            ``(inputs, targets)`` (``inputs`` a tensor, a mapping passed as ``model(inputs)``,
            or a tuple of tensors passed as one tuple, ``model((x1, x2))``) or a mapping of
            tensors, called as ``model(**batch)``: with ``loss_fn=None`` whole, with a
            ``loss_fn`` without ``label_key`` whose entry is the target. The example count of a
            batch is the leading size of its first input tensor.
        params: ``None`` (all parameters with ``requires_grad``), a list of names, or a callable
            ``name -> bool`` choosing among the parameters with ``requires_grad`` (frozen
            parameters are never selected by a callable; name them in a list to include them).
        dtype, mode, process_group: see :class:`pfkernels.HessianOperator`.
        label_key: the targets' key in mapping batches given with a ``loss_fn``.
    """

    def __init__(self, model: Any, loss_fn: Callable[[Any, Any], Tensor] | None, data: Any, *,
                 params: Any = None, dtype: torch.dtype | None = None, mode: str = "eval",
                 process_group: Any = "default", label_key: str = "labels") -> None:
        self.group = _dist.resolve_group(process_group)
        model = unwrap_compiled(_dist.unwrap_model(model))
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"argument 'model': must be a torch.nn.Module, got {type(model).__name__}"
            )
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(f"argument 'loss_fn': must be callable, got {type(loss_fn).__name__}")
        _check_arg(mode in MODES, "mode", f"must be one of {MODES}, got {mode!r}")
        _check_arg(
            dtype is None or (isinstance(dtype, torch.dtype) and dtype.is_floating_point),
            "dtype",
            f"must be None or a floating-point torch dtype, got {dtype!r}",
        )
        self.model = model
        self.loss_fn = loss_fn
        self.mode = mode
        self.label_key = label_key
        if mode == "train" and _active_dropout(model):
            warnings.warn(
                f"mode='train' with active dropout in {_active_dropout(model)[:5]}: every "
                "product draws new dropout masks, so the operator is random and eigsh's "
                "'converged' eigenvalues change from call to call; mode='batch-stats' gives "
                "BatchNorm batch statistics with dropout off", UserWarning, stacklevel=4)

        named = list(model.named_parameters())
        _check_arg(len(named) > 0, "model", "has no parameters")
        selected = self._select(named, params)
        # With an explicit dtype, parameters, buffers and floating data are copied to it.
        self.cast = dtype
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
        self.dtype = dtype
        self.device = next(iter(devices))
        self.names = [name for name, _ in selected]
        self.shapes = [p.shape for _, p in selected]
        self.numels = [p.numel() for _, p in selected]
        self.n = sum(self.numels)
        chosen = set(self.names)
        self.fixed_names = [name for name, _ in named if name not in chosen]

        self.data_source = data
        self.cached: list[tuple[Any, Any, int]] | None = None
        self._data_checked = False
        # With loss_fn=None batches are mappings, so a pair of them is two batches.
        if isinstance(data, Mapping) or (loss_fn is not None and _is_one_batch(data)):
            self.cached = [self._prepare(data, 0, check=True)]
        elif isinstance(data, (tuple, list)):
            _check_arg(len(data) > 0, "data", "is an empty list of batches")
            self.cached = [self._prepare(b, i, check=True) for i, b in enumerate(data)]
        else:
            _check_arg(
                isinstance(data, Iterable),
                "data",
                "must be a batch (inputs, targets) or an iterable of batches, got "
                f"{type(data).__name__}",
            )
            # A DataLoader's batches are read only at the first product: look at the first one
            # now, so a batch of the wrong form fails here, named, and not deep in a solve.
            # The global RNG is restored: a loader draws its seeds and order from it.
            with torch.random.fork_rng(devices=[]):
                _check_arg(
                    iter(data) is not data,
                    "data",
                    "is a one-shot iterator; pass a re-iterable (a list of batches or a "
                    "DataLoader)",
                )
                first = next(iter(data), None)
            _check_arg(first is not None, "data", "yielded no batches")
            self._prepare(first, 0, check=False)
        self._data_checked = self.cached is not None

    @property
    def in_memory(self) -> bool:
        return self.cached is not None

    @staticmethod
    def _select(
        named: list[tuple[str, nn.Parameter]], params: Any
    ) -> list[tuple[str, nn.Parameter]]:
        if params is None:
            selected = [(n, p) for n, p in named if p.requires_grad]
            _check_arg(len(selected) > 0, "model", "has no trainable parameters (requires_grad)")
            return selected
        if callable(params):
            # A filter chooses among the trainable parameters: frozen layers (requires_grad
            # False) would otherwise be pulled in silently by a name pattern that matches them.
            selected = [(n, p) for n, p in named if p.requires_grad and params(n)]
            _check_arg(len(selected) > 0, "params",
                       "the filter selects no trainable (requires_grad) parameters")
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

    def _convert(self, t: Tensor) -> Tensor:
        if self.cast is not None and t.is_floating_point():
            return t.to(device=self.device, dtype=self.cast)
        return t.to(device=self.device)

    def _prepare(self, batch: Any, index: int, check: bool) -> tuple[Any, Any, int]:
        """``(inputs, targets, count)``; a mapping batch keeps ``targets`` None and its inputs
        a dict (``model(**inputs)``), the labels split off when there is a ``loss_fn``."""
        if isinstance(batch, Mapping):
            _check_arg(all(isinstance(k, str) for k in batch), "data",
                       f"batch {index} is a mapping with non-string keys; a mapping batch is "
                       "passed as model(**batch)")
            inputs = {k: _map_tensors(v, self._convert) for k, v in batch.items()}
            targets = None
            if self.loss_fn is not None:
                _check_arg(self.label_key in inputs, "data",
                           f"batch {index} is a mapping without {self.label_key!r}: with a "
                           "loss_fn a mapping batch's targets are its labels (or pass "
                           "loss_fn=None to use the model's own .loss)")
                targets = inputs.pop(self.label_key)
            inputs = _MappingInputs(inputs)
        else:
            _check_arg(self.loss_fn is not None, "data",
                       f"batch {index} is a {type(batch).__name__}; with loss_fn=None batches "
                       "must be mappings passed as model(**batch) (Hugging Face style), whose "
                       "output has .loss")
            if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
                raise ValueError(
                    f"argument 'data': batch {index} must be a pair (inputs, targets), "
                    f"got {type(batch).__name__}"
                )
            inputs, targets = batch
            inputs = _map_tensors(inputs, self._convert)
            targets = _map_tensors(targets, self._convert)
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
        if self.cached is not None:
            yield from self.cached
            return
        check = not self._data_checked
        empty = True
        for i, batch in enumerate(self.data_source):
            empty = False
            yield self._prepare(batch, i, check=check)
        _check_arg(not empty, "data", "yielded no batches")
        self._data_checked = True

    # ------------------------------------------------------------------ evaluation

    def point(self) -> Tensor:
        named = dict(self.model.named_parameters())
        flat = torch.cat([named[n].detach().reshape(-1) for n in self.names])
        return flat.to(self.dtype)

    def parameters(self) -> list[nn.Parameter]:
        named = dict(self.model.named_parameters())
        return [named[n] for n in self.names]

    def views(self, theta: Tensor) -> list[Tensor]:
        return [c.view(s) for c, s in zip(torch.split(theta, self.numels), self.shapes)]

    @contextlib.contextmanager
    def evaluation(self):
        with _MODEL_USE.hold(self.model, self.mode), math_attention():
            yield

    def _fixed_state(self) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """The parameters outside θ and the buffers, detached, in the working dtype."""
        named = dict(self.model.named_parameters())

        def fix(t: Tensor) -> Tensor:
            if self.cast is not None and t.is_floating_point():
                return t.detach().to(self.cast)
            return t.detach()

        fixed = {n: fix(named[n]) for n in self.fixed_names}
        buffers = {n: fix(b) for n, b in self.model.named_buffers()}
        return fixed, buffers

    def _forward(self, fixed, buffers) -> Callable[[Tensor, Any], Any]:
        model = self.model

        def forward(theta: Tensor, inputs: Any) -> Any:
            # Buffers are cloned inside the (possibly transformed) function: train-mode
            # BatchNorm updates its running statistics in place, which must neither reach the
            # caller's model nor touch a tensor captured from outside torch.func.grad.
            state = {n: b.clone() for n, b in buffers.items()}
            state.update(fixed)
            state.update(zip(self.names, self.views(theta)))
            if isinstance(inputs, _MappingInputs):
                return functional_call(model, state, (), dict(inputs))
            return functional_call(model, state, (inputs,))

        return forward

    def losses(self) -> Iterator[tuple[Callable[[Tensor], Tensor], int]]:
        """Yields ``(closure θ -> batch mean loss, example count)`` per batch."""
        for terms in self.batches():
            yield terms.loss, terms.count

    def batches(self) -> Iterator[BatchTerms]:
        """Yields one :class:`BatchTerms` per batch (call inside :meth:`evaluation`)."""
        loss_fn = self.loss_fn
        forward = self._forward(*self._fixed_state())
        for inputs, targets, count in self._batches():
            if loss_fn is None:
                def batch_loss(theta: Tensor, inputs=inputs) -> Tensor:
                    return _hf_loss(forward(theta, inputs))

                def loss_of_outputs(outputs):
                    raise TypeError("argument 'loss_fn': None (the model's own .loss) cannot be "
                                    "applied to outputs alone")
            else:
                def batch_loss(theta: Tensor, inputs=inputs, targets=targets) -> Tensor:
                    return loss_fn(forward(theta, inputs), targets)

                def loss_of_outputs(outputs, targets=targets):
                    return loss_fn(outputs, targets)

            def outputs(theta: Tensor, inputs=inputs) -> Tensor:
                return model_outputs_tensor(forward(theta, inputs))

            if targets is None and isinstance(inputs, _MappingInputs):
                targets = inputs.get(self.label_key)
            yield BatchTerms(_checked(batch_loss, "loss_fn"), outputs, loss_of_outputs,
                             targets, count)

    def mean(self, total: Tensor, count: int) -> Tensor:
        """``total / count``, both summed over the ranks of the process group first."""
        if self.group is None:
            return total / count
        return _dist.weighted_mean(total, count, self.group)

    def state_key(self) -> tuple:
        """Identifies the model's parameters and buffers: storage and in-place version counter
        (bumped by every in-place write, e.g. ``optimizer.step()`` or ``copy_``)."""
        tensors = [*self.model.parameters(), *self.model.buffers()]
        for inputs, targets, _ in self.cached or ():  # in-memory batches may be the caller's
            tensors += [*_tensors(inputs), *_tensors(targets)]
        return tuple((t.data_ptr(), t._version, t.dtype) for t in tensors)

    def describe(self) -> str:
        return type(self.model).__name__


class _MappingInputs(dict):
    """The inputs of a mapping batch: passed to the model as keyword arguments."""
