"""The multi_tensor family: fused reductions and updates over tensor lists (the engine of DAL and
of the Lanczos driver's vector arithmetic).

Kernels: ``csrc/cpu/multi_tensor_cpu.cpp``, ``csrc/cuda/multi_tensor_cuda.cu``;
tests: ``tests/test_ops_multi_tensor.py``.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence

import torch
from torch import Tensor

from .._checks import check_arg as _check_arg
from ._backend import (
    _C,
    _DTYPE_CODES,
    _buf,
    _check_is_list,
    _check_tensor,
    _has_backend,
    _stream,
    _warn_fallback,
)

_DTYPE_OF, _DEVICE_OF = operator.attrgetter("dtype"), operator.attrgetter("device")
_LAYOUT_OF, _SHAPE_OF = operator.attrgetter("layout"), operator.attrgetter("shape")


def _check_lists(lists: Sequence[tuple[str, Sequence[Tensor]]], written: tuple[int, ...] = (),
                 *, real: bool = True) -> tuple[list[tuple[list[int], list[int]]], list]:
    """The launch checks of the multi_tensor ops, and the launch's lists.

    ``lists`` is ``((name, tensors), ...)``; the first list fixes the count, the shapes, the
    dtype (float32/float64) and the device. The lists at positions ``written`` are updated in
    place: they must be contiguous. Read lists are made contiguous (copies where needed).

    Returns ``([(data pointers, element counts) per list], kept)`` as _C takes them; ``kept``
    holds the copies alive until the launch. _C checks the counts against each other and that
    no written tensor shares memory with another (a list read at index i may hold the very
    tensor written at index i: element-wise in place), on the pointers the kernel gets.
    ``real=False`` (fake tensors, under torch.compile) stops before anything needs pointers.

    The fast path maps over all tensors at once (DAL calls this on hundreds of tensors every
    step); messages are built only once something fails.
    """
    name0, first = lists[0]
    count = len(first)
    for name, tensors in lists[1:]:
        _check_arg(len(tensors) == count, name,
                   f"has {len(tensors)} tensors but '{name0}' has {count}")
    _check_arg(count > 0, name0,
               "is empty (the pfkernels.ops function of this op accepts empty lists)")
    t0 = first[0]
    dtype, device = t0.dtype, t0.device
    _check_tensor(t0, name0, device)
    every = [t for _, tensors in lists for t in tensors]
    shapes = list(map(_SHAPE_OF, every))
    if any(shapes[pos * count:(pos + 1) * count] != shapes[:count] for pos in range(1, len(lists))):
        for name, tensors in lists[1:]:
            for i, (t, shape) in enumerate(zip(tensors, shapes)):
                _check_arg(t.shape == shape, f"{name}[{i}]",
                           f"shape {tuple(t.shape)} differs from {name0}[{i}]'s {tuple(shape)}")
    # Device indices compare cheaper than devices; in a real launch the type cannot differ
    # unnoticed (a meta or fake tensor among real ones dispatches to the fake, which compares
    # whole devices, and other device types have an index >= 0 where the CPU has -1).
    same_device = (set(map(Tensor.get_device, every)) == {t0.get_device()} if real
                   else set(map(_DEVICE_OF, every)) == {device})
    if (set(map(_DTYPE_OF, every)) != {dtype} or not same_device
            or set(map(_LAYOUT_OF, every)) != {torch.strided}):
        for name, tensors in lists:
            for i, t in enumerate(tensors):
                _check_tensor(t, f"{name}[{i}]", device, (dtype,))
    for pos in written:
        name, tensors = lists[pos]
        if not all(map(Tensor.is_contiguous, tensors)):
            for i, t in enumerate(tensors):
                _check_arg(t.is_contiguous(), f"{name}[{i}]",
                           "must be contiguous (it is updated in place)")
    if not real:
        return [], []
    kept = [tensors if pos in written else list(map(Tensor.contiguous, tensors))
            for pos, (_, tensors) in enumerate(lists)]
    launch = [(list(map(Tensor.data_ptr, tensors)), list(map(Tensor.numel, tensors)))
              for tensors in kept]
    return launch, kept


def _check_scalar(t: Tensor, name: str, device: torch.device) -> None:
    """A one-element real floating tensor on ``device`` (a rate read on the device)."""
    _check_arg(t.numel() == 1, name, f"must have one element, got shape {tuple(t.shape)}")
    _check_arg(t.is_floating_point(), name, f"must be floating point, got {t.dtype}")
    _check_arg(t.device == device, name, f"device {t.device} differs from the tensors' {device}")
    _check_arg(t.layout == torch.strided, name, f"layout {t.layout} is not supported")


@torch.library.custom_op("pfkernels::multi_tensor_dot", mutates_args=())
def _multi_tensor_dot_op(a: list[Tensor], b: list[Tensor]) -> Tensor:
    ((pa, na), (pb, nb)), _kept = _check_lists((("a", a), ("b", b)))
    device = a[0].device
    if not _has_backend("multi_tensor_dot", device):
        _warn_fallback("multi_tensor_dot", device)
        return multi_tensor_dot_ref(a, b)
    out = torch.empty(3, dtype=a[0].dtype, device=device)
    code = _DTYPE_CODES[a[0].dtype]
    if device.type == "cpu":
        _C.multi_tensor_dot_cpu(pa, na, pb, nb, code, _buf(out))
    else:
        words = _C.multi_tensor_dot_workspace_words(na)
        workspace = torch.empty(max(words, 1), dtype=torch.float64, device=device)
        _C.multi_tensor_dot_cuda(pa, na, pb, nb, code, _buf(out), _buf(workspace),
                                 _stream(device))
    return out


@_multi_tensor_dot_op.register_fake
def _(a, b):
    _check_lists((("a", a), ("b", b)), real=False)
    return a[0].new_empty(3)


def multi_tensor_dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    """Fused ``(Σᵢ⟨aᵢ, bᵢ⟩, Σᵢ‖aᵢ‖², Σᵢ‖bᵢ‖²)`` over two lists of tensors, in one pass.

    Args:
        a, b: equally long lists of tensors; ``a[i]`` and ``b[i]`` have the same shape. All
            tensors share one dtype (float32 or float64) and one device (CPU or CUDA).

    Returns:
        A tensor of shape ``[3]`` in the inputs' dtype on their device (``torch.zeros(3)`` for
        empty lists). Sums are accumulated in float64 on both backends and the order of
        accumulation is fixed, so the result is deterministic. No host synchronisation.

    Raises:
        ValueError naming the argument (and index) for lists of other lengths, shapes, dtypes or
        devices; ``torch.ops.pfkernels.multi_tensor_dot`` runs the same checks.

    Equivalent to :func:`multi_tensor_dot_ref`.
    """
    _check_is_list(a, "a")
    _check_is_list(b, "b")
    if not a and not b:
        return torch.zeros(3)
    return torch.ops.pfkernels.multi_tensor_dot(list(a), list(b))


def multi_tensor_dot_ref(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    """Pure-torch twin of :func:`multi_tensor_dot` (float64 accumulation)."""
    if not a:
        return torch.zeros(3)
    acc = torch.zeros(3, dtype=torch.float64, device=a[0].device)
    for x, y in zip(a, b):
        x64, y64 = x.reshape(-1).double(), y.reshape(-1).double()
        acc += torch.stack([x64 @ y64, x64 @ x64, y64 @ y64])
    return acc.to(a[0].dtype)


@torch.library.custom_op("pfkernels::multi_tensor_axpy", mutates_args={"x"})
def _multi_tensor_axpy_op(x: list[Tensor], y: list[Tensor], alpha: Tensor) -> None:
    device = x[0].device if x else alpha.device
    _check_scalar(alpha, "alpha", device)
    scalar = alpha.reshape(()).to(x[0].dtype) if x else alpha  # what the kernel reads
    ((px, nx), (py, ny)), _kept = _check_lists((("x", x), ("y", y)), written=(0,))
    if not _has_backend("multi_tensor_axpy", device):
        _warn_fallback("multi_tensor_axpy", device)
        multi_tensor_axpy_ref(x, y, alpha)
        return
    code = _DTYPE_CODES[x[0].dtype]
    if device.type == "cpu":
        _C.multi_tensor_axpy_cpu(px, nx, py, ny, code, _buf(scalar))
    else:
        _C.multi_tensor_axpy_cuda(px, nx, py, ny, code, _buf(scalar), _stream(device))


@_multi_tensor_axpy_op.register_fake
def _(x, y, alpha):
    _check_scalar(alpha, "alpha", x[0].device if x else alpha.device)
    _check_lists((("x", x), ("y", y)), written=(0,), real=False)
    return None


def multi_tensor_axpy(x: Sequence[Tensor], y: Sequence[Tensor], alpha: Tensor) -> None:
    """In place ``xᵢ += alpha · yᵢ`` for every pair, in one fused launch.

    Args:
        x: list of contiguous tensors, updated in place.
        y: list of tensors with the shapes of ``x``; same dtype (float32/float64) and device.
            ``y[i]`` may be ``x[i]`` itself; no other tensor may share memory with an ``x[i]``.
        alpha: a one-element tensor on the same device (read on the device: no host sync).

    Raises:
        ValueError naming the argument (and index), before anything is written;
        ``torch.ops.pfkernels.multi_tensor_axpy`` runs the same checks.

    Equivalent to :func:`multi_tensor_axpy_ref`.
    """
    _check_is_list(x, "x")
    _check_is_list(y, "y")
    _check_arg(isinstance(alpha, Tensor), "alpha", "must be a one-element tensor")
    if not x and not y:
        _check_arg(alpha.numel() == 1, "alpha",
                   f"must have one element, got shape {tuple(alpha.shape)}")
        return
    torch.ops.pfkernels.multi_tensor_axpy(list(x), list(y), alpha)


def multi_tensor_axpy_ref(x: Sequence[Tensor], y: Sequence[Tensor], alpha: Tensor) -> None:
    """Pure-torch twin of :func:`multi_tensor_axpy`."""
    for xi, yi in zip(x, y):
        xi.add_(yi * alpha.reshape(()).to(xi.dtype))


def _update_lists(params, grads, bufs) -> tuple[tuple, tuple[int, ...]]:
    """The lists of a momentum update as :func:`_check_lists` takes them, and which it writes."""
    if len(bufs) or not len(params):
        return (("params", params), ("grads", grads), ("bufs", bufs)), (0, 2)
    return (("params", params), ("grads", grads)), (0,)


@torch.library.custom_op(
    "pfkernels::multi_tensor_momentum_update", mutates_args={"params", "bufs"}
)
def _multi_tensor_momentum_update_op(
    params: list[Tensor], grads: list[Tensor], bufs: list[Tensor], rate: Tensor, momentum: float
) -> None:
    device = params[0].device if params else rate.device
    _check_scalar(rate, "rate", device)
    _check_arg(math.isfinite(momentum), "momentum", f"must be a finite number, got {momentum!r}")
    scalar = rate.reshape(()).to(params[0].dtype) if params else rate  # what the kernel reads
    launch, _kept = _check_lists(*_update_lists(params, grads, bufs))
    if not _has_backend("multi_tensor_momentum_update", device):
        _warn_fallback("multi_tensor_momentum_update", device)
        multi_tensor_momentum_update_ref(params, grads, bufs, rate, momentum)
        return
    (pp, np_), (pg, ng), (pb, nb) = (*launch, ([], []))[:3]
    code = _DTYPE_CODES[params[0].dtype]
    if device.type == "cpu":
        _C.multi_tensor_momentum_update_cpu(pp, np_, pg, ng, pb, nb, code, _buf(scalar), momentum)
    else:
        _C.multi_tensor_momentum_update_cuda(pp, np_, pg, ng, pb, nb, code, _buf(scalar),
                                             momentum, _stream(device))


@_multi_tensor_momentum_update_op.register_fake
def _(params, grads, bufs, rate, momentum):
    _check_scalar(rate, "rate", params[0].device if params else rate.device)
    _check_arg(math.isfinite(momentum), "momentum", f"must be a finite number, got {momentum!r}")
    _check_lists(*_update_lists(params, grads, bufs), real=False)
    return None


def multi_tensor_momentum_update(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    bufs: Sequence[Tensor],
    rate: Tensor,
    momentum: float = 0.0,
) -> None:
    """The fused descent step of DAL (and of torch SGD): one launch over all tensors.

    With ``bufs`` empty: ``pᵢ -= rate · gᵢ``. Otherwise the heavy-ball step of
    ``torch.optim.SGD(momentum=momentum)`` (dampening 0, no Nesterov), buffer and parameter in
    the same pass: ``bᵢ = momentum · bᵢ + gᵢ; pᵢ -= rate · bᵢ`` (zero-initialised buffers give
    torch's first step ``b = g``).

    Args:
        params: contiguous tensors updated in place; one dtype (float32/float64), one device.
        grads: tensors with the shapes of ``params``, same dtype and device (``grads[i]`` may
            be ``params[i]`` itself).
        bufs: ``[]``, or contiguous momentum buffers shaped like ``params`` (updated in place).
            No parameter or buffer may share memory with another tensor of the call.
        rate: a one-element floating tensor on the same device, read on the device (no host
            sync). A non-finite rate (NaN from :func:`dal_rate` when the gradient or H·g was not
            finite) leaves ``params`` and ``bufs`` untouched: the step is skipped on the device.
        momentum: the heavy-ball coefficient, a finite number (ignored when ``bufs`` is empty).

    Raises:
        ValueError naming the argument (and index), before anything is written;
        ``torch.ops.pfkernels.multi_tensor_momentum_update`` runs the same checks.

    Equivalent to :func:`multi_tensor_momentum_update_ref`.
    """
    for name, value in (("params", params), ("grads", grads), ("bufs", bufs)):
        _check_is_list(value, name)
    _check_arg(isinstance(rate, Tensor), "rate", "must be a one-element tensor")
    _check_arg(
        isinstance(momentum, (int, float)) and not isinstance(momentum, bool)
        and math.isfinite(momentum),
        "momentum",
        f"must be a finite number, got {momentum!r}",
    )
    if not params and not grads and not bufs:
        _check_arg(rate.numel() == 1, "rate",
                   f"must have one element, got shape {tuple(rate.shape)}")
        return
    torch.ops.pfkernels.multi_tensor_momentum_update(
        list(params), list(grads), list(bufs), rate, float(momentum)
    )


def multi_tensor_momentum_update_ref(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    bufs: Sequence[Tensor],
    rate: Tensor,
    momentum: float = 0.0,
) -> None:
    """Pure-torch twin of :func:`multi_tensor_momentum_update` (no host sync either)."""
    if not params:
        return
    r = rate.reshape(()).to(params[0].dtype)
    # A non-finite rate skips the step: multiply by 0 would still spread NaN, so select instead.
    keep = ~torch.isfinite(r)
    r = torch.where(keep, torch.zeros_like(r), r)
    for i, (p, g) in enumerate(zip(params, grads)):
        if bufs:
            b = bufs[i]
            b.copy_(torch.where(keep, b, momentum * b + g))
            g = b
        p.copy_(torch.where(keep, p, p - r * g))
