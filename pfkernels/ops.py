"""Custom ops over the compiled backends, their fake (meta) implementations and pure-torch twins.

This is the only module that imports ``pfkernels._C``. Every op is a ``torch.library.custom_op``
(so it works under ``torch.compile`` and CUDA-graph capture) with a pure-PyTorch ``<op>_ref`` of
the same signature; tests compare the two. Where the extension has no backend for a tensor's
device (or failed to load) the op runs its ref and warns once; :func:`backend_info` says what was
built.

Kernel families live in ``csrc/<cpu|cuda>/<family>_*.{cpp,cu}`` and ``tests/test_ops_<family>.py``.
"""

from __future__ import annotations

import math
import operator
import warnings
from collections.abc import Sequence
from typing import Optional

import torch
from torch import Tensor

from ._checks import check_arg as _check_arg
from ._checks import is_int as _is_int
from ._checks import is_number as _is_number
from ._version import __version__

try:
    from . import _C
except ImportError as exc:  # a source checkout without a build, or a broken install
    _C = None
    _IMPORT_ERROR: str | None = f"{type(exc).__name__}: {exc}"
else:
    _IMPORT_ERROR = None
# What the extension was built with, read once (op wrappers need launch constants from it).
_BUILD: dict = dict(_C.build_info()) if _C is not None else {}

# Shared with csrc/common/macros.h (pfk::DType).
_DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2}
_warned: set[tuple[str, str]] = set()


def backend_info() -> dict:
    """What the compiled extension provides on this machine.

    Returns a dict with ``version``, ``extension_loaded``, ``cuda_built`` (the CUDA kernels were
    compiled in), ``cuda_archs`` (their targets, comma separated), ``cuda_available`` (a GPU is
    usable by them now), ``openmp`` and ``cpu_threads`` (the CPU kernels' OpenMP threads),
    ``torch_version``, ``sanitizers`` (the ``-fsanitize=`` list of a sanitizer build, else
    empty) and, when the extension failed to load, ``import_error``.
    """
    info = {
        "version": __version__,
        "extension_loaded": _C is not None,
        "cuda_built": False,
        "cuda_archs": "",
        "cuda_available": False,
        "openmp": False,
        "cpu_threads": 1,
        "torch_version": torch.__version__,
        "sanitizers": "",
    }
    if _C is None:
        info["import_error"] = _IMPORT_ERROR
        return info
    built = _BUILD
    info.update({k: built[k] for k in ("cuda_built", "cuda_archs", "openmp", "cpu_threads",
                                       "sanitizers")})
    if info["cuda_built"]:
        info["cuda_available"] = bool(torch.cuda.is_available() and _C.cuda_device_count() > 0)
    return info


def _has_backend(entry: str, device: torch.device) -> bool:
    """True when ``_C`` has ``<entry>_<device type>``, e.g. ``multi_tensor_dot_cuda``."""
    return _C is not None and hasattr(_C, f"{entry}_{device.type}")


def _warn_fallback(op: str, device: torch.device) -> None:
    key = (op, device.type)
    if key in _warned:
        return
    _warned.add(key)
    why = _IMPORT_ERROR or f"the extension was built without a {device.type} backend"
    warnings.warn(
        f"pfkernels.{op}: no compiled kernel for {device.type} ({why}); running {op}_ref",
        RuntimeWarning,
        stacklevel=3,
    )


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


# ---------------------------------------------------------------------------------------------
# Launch checks. Every op runs them inside its torch.library body, right before it hands
# pointers to _C, so that the public wrappers and direct torch.ops.pfkernels.* calls (public
# too) get the same checks: element counts against the launch's sizes, dtype, device, layout,
# contiguity and, for what the kernel writes, aliasing. csrc/bindings.cpp checks the element
# counts it receives once more.
# ---------------------------------------------------------------------------------------------

_FLOAT_DTYPES = (torch.float32, torch.float64)


def _check_is_list(value, name: str) -> None:
    """The public wrappers take any list or tuple; the ops' schemas need lists of tensors."""
    _check_arg(isinstance(value, (list, tuple)), name,
               f"must be a list of tensors, got {type(value).__name__}")
    for i, t in enumerate(value):
        _check_arg(isinstance(t, Tensor), f"{name}[{i}]",
                   f"must be a tensor, got {type(t).__name__}")


def _check_tensor(t: Tensor, name: str, device: torch.device, dtypes=_FLOAT_DTYPES) -> None:
    """Strided, one of ``dtypes``, on ``device``. (Negative-bit views never get here: the
    dispatcher materialises them before an op's body runs.)"""
    _check_arg(t.layout == torch.strided, name, f"layout {t.layout} is not supported (dense only)")
    _check_arg(t.dtype in dtypes, name,
               f"dtype must be {' or '.join(str(d).removeprefix('torch.') for d in dtypes)}, "
               f"got {t.dtype}")
    _check_arg(t.device == device, name, f"device {t.device} differs from {device}")


def _span(t: Tensor) -> int:
    """Elements from ``t``'s first element to its last (its reach in memory), 0 when empty."""
    if t.numel() == 0:
        return 0
    return 1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))


def _byte_range(t: Tensor) -> tuple[int, int]:
    start = t.data_ptr()
    return start, start + _span(t) * t.element_size()


def _buf(t: Tensor) -> tuple[int, int]:
    """What _C receives for a buffer: its data pointer and the elements the kernel may touch."""
    return t.data_ptr(), _span(t)


def _check_disjoint(named: Sequence[tuple[str, Tensor]]) -> None:
    """The memory each tensor reaches is shared with none of the others (for tensors a kernel
    writes while it reads or writes the others)."""
    ranges = [(*_byte_range(t), name) for name, t in named if t.numel()]
    ranges.sort()
    for (_, end, first), (start, _, second) in zip(ranges, ranges[1:]):
        _check_arg(start >= end, second, f"shares memory with '{first}'; the kernel writes "
                   "one of them, so they must not overlap")


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


# ---------------------------------------------------------------------------------------------
# multi_tensor family: fused reductions and updates over tensor lists (the engine of DAL and of
# the Lanczos driver's vector arithmetic).
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# flow family: the principal-flow field from top-k eigenpairs (REFERENCES.md §1), two passes over
# the eigenvectors: projections U^T g, then the complex recombination.
# ---------------------------------------------------------------------------------------------

_COMPLEX_OF = {torch.float32: torch.complex64, torch.float64: torch.complex128}


def _log_one_minus_real(x: Tensor) -> Tensor:
    """log(1 - x) for real float64 ``x`` on the principal branch, as complex128: log1p below 1
    (exact for small |x|), log|x - 1| + iπ above, -inf at 1. The one real form of the PF's log;
    ``pfkernels.flows.principal`` uses it for real eigenvalues."""
    below = x < 1
    re = torch.where(below, torch.log1p(-torch.where(below, x, 0.0)), torch.log((x - 1).abs()))
    return torch.complex(re, (x > 1).to(re.dtype) * math.pi)


def _pf_coefficients_real(x: Tensor) -> Tensor:
    """r = log(1 - x)/x for real float64 ``x = h·λ`` on the principal branch, as complex128.

    The same case split as ``pfk::principal_flow_coefficient`` (csrc/common/flow.h): x = 0 gives
    -1, x = 1 gives -inf + 0i, x > 1 gives (log(x - 1) + iπ)/x, |x| = inf gives the limit 0, and
    log1p keeps small |x| exact.
    """
    re = _log_one_minus_real(x).real
    re = torch.where(x == 0, -1.0, re / torch.where(x == 0, 1.0, x))
    re = torch.where(x == 1, -math.inf, re)
    re = torch.where(torch.isinf(x), 0.0, re)
    im = torch.where(x > 1, math.pi / x, 0.0)
    im = torch.where(torch.isnan(x), math.nan, im)
    return torch.complex(re, im)


def _check_flow(grad: Tensor, eigenvalues: Tensor, eigenvectors: Tensor, h: float) -> int:
    """The launch checks of ``flow_field``; returns k."""
    _check_tensor(grad, "grad", grad.device)
    _check_arg(grad.dim() == 1, "grad", f"must be 1-D [n], got shape {tuple(grad.shape)}")
    _check_arg(
        eigenvectors.dim() == 2 and eigenvectors.shape[0] == grad.shape[0],
        "eigenvectors",
        f"must be [n, k] with n = {grad.shape[0]}, got shape {tuple(eigenvectors.shape)}",
    )
    k = eigenvectors.shape[1]
    _check_arg(
        eigenvalues.dim() == 1 and eigenvalues.shape[0] == k,
        "eigenvalues",
        f"must be [k] with k = {k} (the eigenvectors' columns), got shape "
        f"{tuple(eigenvalues.shape)}",
    )
    for name, t in (("eigenvalues", eigenvalues), ("eigenvectors", eigenvectors)):
        _check_tensor(t, name, grad.device, (grad.dtype,))
    _check_arg(
        isinstance(h, (int, float)) and not isinstance(h, bool) and math.isfinite(h) and h > 0,
        "h",
        f"must be a positive finite number, got {h!r}",
    )
    return k


@torch.library.custom_op("pfkernels::flow_field", mutates_args=())
def _flow_field_op(
    grad: Tensor, eigenvalues: Tensor, eigenvectors: Tensor, h: float
) -> tuple[Tensor, Tensor]:
    k = _check_flow(grad, eigenvalues, eigenvectors, h)
    device = grad.device
    n = grad.shape[0]
    if n == 0:
        return (torch.empty(0, dtype=_COMPLEX_OF[grad.dtype], device=device),
                torch.zeros(k, dtype=grad.dtype, device=device))
    if not _has_backend("flow_field", device):
        _warn_fallback("flow_field", device)
        return flow_field_ref(grad, eigenvalues, eigenvectors, h)
    grad = grad.contiguous()
    eigenvalues = eigenvalues.contiguous()
    # Both layouts stream U contiguously: row-major [n, k] and column-major (eigsh's output).
    column_major = eigenvectors.t().is_contiguous() and not eigenvectors.is_contiguous()
    if not column_major:
        eigenvectors = eigenvectors.contiguous()
    field = torch.empty(n, dtype=_COMPLEX_OF[grad.dtype], device=device)
    projections = torch.empty(k, dtype=grad.dtype, device=device)
    args = (_buf(grad), _buf(eigenvalues), _buf(eigenvectors), n, k, column_major, float(h),
            _DTYPE_CODES[grad.dtype], _buf(torch.view_as_real(field)), _buf(projections))
    if device.type == "cpu":
        _C.flow_field_cpu(*args)
    else:
        workspace = torch.empty(max(_C.flow_workspace_words(n, k), 1), dtype=torch.float64,
                                device=device)
        _C.flow_field_cuda(*args, _buf(workspace), _stream(device))
    return field, projections


@_flow_field_op.register_fake
def _(grad, eigenvalues, eigenvectors, h):
    k = _check_flow(grad, eigenvalues, eigenvectors, h)
    return grad.new_empty(grad.shape[0], dtype=_COMPLEX_OF[grad.dtype]), grad.new_empty(k)


def flow_field(
    grad: Tensor, eigenvalues: Tensor, eigenvectors: Tensor, h: float
) -> tuple[Tensor, Tensor]:
    """The principal-flow field from k eigenpairs, fused: ``Σᵢ rᵢ (g·uᵢ) uᵢ − (g − Σᵢ (g·uᵢ) uᵢ)``.

    ``rᵢ = log(1 − hλᵢ)/(hλᵢ)`` on the principal branch (Rosca et al. 2023, REFERENCES.md §1; the
    shared code is ``csrc/common/flow.h``). The eigenvectors are assumed orthonormal; the part of
    ``g`` outside their span gets the gradient-flow coefficient −1. A direction with ``g·uᵢ = 0``
    contributes nothing; one with ``hλᵢ = 1`` and ``g·uᵢ ≠ 0`` makes the field infinite there (GD
    removes that component in one step, the flow in zero time) and the entries come back
    non-finite: integrate with the propagator instead (``pfkernels.flows``).

    Args:
        grad: ``[n]`` float32 or float64, CPU or CUDA.
        eigenvalues: ``[k]`` (``0 <= k <= n``), same dtype and device.
        eigenvectors: ``[n, k]``, columns ``uᵢ``, same dtype and device; row-major or column-major
            (as :func:`pfkernels.eigsh` returns them) are read in place, other layouts copied.
        h: the learning rate, a positive finite number.

    Returns:
        ``(field, projections)``: ``field`` ``[n]`` complex64/complex128 (matching ``grad``) and
        ``projections = Uᵀg`` ``[k]`` in ``grad``'s dtype. Sums run in a fixed order
        (deterministic, whatever the thread count); no host synchronisation. The CUDA kernel
        accumulates every product in float64. The CPU kernel sums chunks of 2048 rows in the
        input precision (SIMD) and adds the chunks' partials in float64, so the projections'
        rounding error grows with the chunk, not with ``n``; it forms the field's rows in the
        input precision from float64 coefficients rounded to it.

    Raises:
        ValueError naming the argument for a shape, dtype, device or layout other than these, or
        a bad ``h``; ``torch.ops.pfkernels.flow_field`` runs the same checks.

    Equivalent to :func:`flow_field_ref`.
    """
    for name, t in (("grad", grad), ("eigenvalues", eigenvalues), ("eigenvectors", eigenvectors)):
        _check_arg(isinstance(t, Tensor), name, f"must be a tensor, got {type(t).__name__}")
    _check_arg(
        isinstance(h, (int, float)) and not isinstance(h, bool) and math.isfinite(h) and h > 0,
        "h",
        f"must be a positive finite number, got {h!r}",
    )
    return torch.ops.pfkernels.flow_field(grad, eigenvalues, eigenvectors, float(h))


def flow_field_ref(
    grad: Tensor, eigenvalues: Tensor, eigenvectors: Tensor, h: float
) -> tuple[Tensor, Tensor]:
    """Pure-torch twin of :func:`flow_field` (float64 arithmetic, result in the input precision)."""
    g = grad.double()
    u = eigenvectors.double()
    p = u.T @ g
    r = _pf_coefficients_real(float(h) * eigenvalues.double())
    # Real and imaginary parts in separate real products, as in the kernel: complex products
    # would turn -inf·p (hλ = 1) into NaN where the kernel keeps -inf and 0.
    a = torch.where(p == 0, 0.0, r.real * p + p)
    b = torch.where(p == 0, 0.0, r.imag * p)
    field = torch.complex(u @ a - g, u @ b)
    return field.to(_COMPLEX_OF[grad.dtype]), p.to(grad.dtype)


# ---------------------------------------------------------------------------------------------
# tridiag family: batched symmetric tridiagonal eigensolver (the Rayleigh-Ritz step of Lanczos).
# ---------------------------------------------------------------------------------------------

# Which part of the eigenvector matrix Z is accumulated; shared with csrc/common/tridiag.h.
_TRIDIAG_VECTORS = {"none": 0, "last_row": 1, "all": 2}
# Per-problem status codes of the kernels (tridiag::Status).
_TRIDIAG_OK, _TRIDIAG_NO_CONVERGENCE, _TRIDIAG_NONFINITE_ALPHA, _TRIDIAG_NONFINITE_BETA = 0, 1, 2, 3


def _tridiag_check(alpha: Tensor, beta: Tensor, vectors: str) -> None:
    """The shape/dtype/device checks of :func:`tridiag_eigh` and :func:`tridiag_eigh_ref`."""
    _check_arg(isinstance(alpha, Tensor), "alpha", f"must be a tensor, got {type(alpha).__name__}")
    _check_arg(isinstance(beta, Tensor), "beta", f"must be a tensor, got {type(beta).__name__}")
    _check_arg(
        isinstance(vectors, str) and vectors in _TRIDIAG_VECTORS,
        "vectors",
        f"must be one of {sorted(_TRIDIAG_VECTORS)}, got {vectors!r}",
    )
    for name, t in (("alpha", alpha), ("beta", beta)):
        _check_arg(
            t.dtype in (torch.float32, torch.float64),
            name,
            f"dtype must be float32 or float64, got {t.dtype}",
        )
        _check_arg(t.layout == torch.strided, name, "sparse tensors are not supported")
    _check_arg(
        alpha.dim() in (1, 2), "alpha", f"must have shape [m] or [B, m], got {tuple(alpha.shape)}"
    )
    _check_arg(
        beta.device == alpha.device,
        "beta",
        f"device {beta.device} differs from alpha's device {alpha.device}",
    )
    m = alpha.shape[-1]
    want = (*alpha.shape[:-1], max(m - 1, 0))
    _check_arg(
        tuple(beta.shape) == want,
        "beta",
        f"must have shape {want} for alpha of shape {tuple(alpha.shape)}, got {tuple(beta.shape)}",
    )


def _tridiag_input_status(alpha: Tensor, beta: Tensor) -> Tensor:
    """The kernels' input verdict for [B, m] / [B, m-1]: int32 [B], non-finite alpha first."""
    status = torch.zeros(alpha.shape[0], dtype=torch.int32, device=alpha.device)
    status[~torch.isfinite(beta).all(-1)] = _TRIDIAG_NONFINITE_BETA
    status[~torch.isfinite(alpha).all(-1)] = _TRIDIAG_NONFINITE_ALPHA
    return status


def _raise_on_tridiag_status(status: Tensor) -> None:
    """Raises for the first problem with a non-zero status (one host read of the flags)."""
    bad = status != _TRIDIAG_OK
    if not bool(bad.any()):
        return
    first = int(bad.nonzero()[0, 0])
    code = int(status[first])
    if code == _TRIDIAG_NONFINITE_ALPHA:
        raise ValueError(f"argument 'alpha': non-finite entry in problem {first}")
    if code == _TRIDIAG_NONFINITE_BETA:
        raise ValueError(f"argument 'beta': non-finite entry in problem {first}")
    raise RuntimeError(
        f"pfkernels.tridiag_eigh: the QL iteration did not converge for problem {first} "
        f"(of {int(bad.sum())} failing) within 30*m sweeps (status {code})"
    )


def _tridiag_vec_shape(batch: int, m: int, vectors: str) -> tuple[int, ...]:
    return {"none": (batch, 0), "last_row": (batch, m), "all": (batch, m, m)}[vectors]


def _check_tridiag_launch(alpha: Tensor, beta: Tensor, vectors: str) -> None:
    """What the op itself takes: alpha [B, m] and beta [B, m-1], float64, on one device."""
    _check_arg(vectors in _TRIDIAG_VECTORS, "vectors",
               f"must be one of {sorted(_TRIDIAG_VECTORS)}, got {vectors!r}")
    _check_tensor(alpha, "alpha", alpha.device, (torch.float64,))
    _check_tensor(beta, "beta", alpha.device, (torch.float64,))
    _check_arg(alpha.dim() == 2, "alpha", f"must have shape [B, m], got {tuple(alpha.shape)}")
    batch, m = alpha.shape
    want = (batch, max(m - 1, 0))
    _check_arg(tuple(beta.shape) == want, "beta",
               f"must have shape {want} for alpha of shape {tuple(alpha.shape)}, got "
               f"{tuple(beta.shape)}")


@torch.library.custom_op("pfkernels::tridiag_eigh", mutates_args=())
def _tridiag_eigh_op(alpha: Tensor, beta: Tensor, vectors: str) -> tuple[Tensor, Tensor, Tensor]:
    """alpha [B, m], beta [B, m-1] float64 -> (evals, vecs, status [B]).

    ``vecs`` is [B, 0] for ``"none"``; ``status`` holds tridiag::Status codes.
    """
    _check_tridiag_launch(alpha, beta, vectors)
    device = alpha.device
    batch, m = alpha.shape
    if batch == 0 or m == 0:
        return (alpha.new_empty(batch, m), alpha.new_empty(_tridiag_vec_shape(batch, m, vectors)),
                torch.zeros(batch, dtype=torch.int32, device=device))
    if not _has_backend("tridiag_eigh", device):
        _warn_fallback("tridiag_eigh", device)
        evals, vecs = tridiag_eigh_ref(alpha, beta, vectors, check=False)
        if vecs is None:
            vecs = alpha.new_empty(alpha.shape[0], 0)
        return evals, vecs, _tridiag_input_status(alpha, beta)
    alpha, beta = alpha.contiguous(), beta.contiguous()
    # Poisoned, so that an element the kernel failed to write shows up as NaN, not as garbage.
    evals = torch.full((batch, m), math.nan, dtype=torch.float64, device=device)
    vecs = torch.full(_tridiag_vec_shape(batch, m, vectors), math.nan, dtype=torch.float64,
                      device=device)
    status = torch.full((batch,), -1, dtype=torch.int32, device=device)
    mode = _TRIDIAG_VECTORS[vectors]
    args = (_buf(alpha), _buf(beta), batch, m, mode, _buf(evals), _buf(vecs), _buf(status))
    if device.type == "cpu":
        _C.tridiag_eigh_cpu(*args)
    else:
        words = _C.tridiag_workspace_words(batch, m, mode)
        workspace = torch.empty(words, dtype=torch.float64, device=device)
        _C.tridiag_eigh_cuda(*args, _buf(workspace), _stream(device))
    return evals, vecs, status


@_tridiag_eigh_op.register_fake
def _(alpha, beta, vectors):
    _check_tridiag_launch(alpha, beta, vectors)
    batch, m = alpha.shape
    return (
        alpha.new_empty(batch, m),
        alpha.new_empty(_tridiag_vec_shape(batch, m, vectors)),
        alpha.new_empty(batch, dtype=torch.int32),
    )


def tridiag_eigh(
    alpha: Tensor, beta: Tensor, vectors: str = "all", *, check: bool = True
) -> tuple[Tensor, Tensor | None]:
    """Eigen-decomposition of a batch of symmetric tridiagonal matrices, ``T = Z diag(λ) Zᵀ``.

    ``T[b]`` has diagonal ``alpha[b]`` and off-diagonal ``beta[b]`` (``T[i, i+1] = T[i+1, i] =
    beta[i]``): in Lanczos, the projection ``Vᵀ A V`` whose eigenpairs give the Ritz pairs. Solved
    by implicit QL with Wilkinson shifts in float64 (csrc/common/tridiag.h, one algorithm for CPU
    and CUDA), accumulating only the rows of ``Z`` that ``vectors`` asks for: ``"last_row"`` costs
    O(m²) per problem like ``"none"``, ``"all"`` O(m³).

    Args:
        alpha: diagonal, ``[B, m]`` or ``[m]``, float32 or float64, CPU or CUDA.
        beta: off-diagonal, ``[B, m-1]`` or ``[m-1]``, same device as ``alpha``.
        vectors: ``"all"`` (the eigenvector matrix, eigenvectors as columns as in
            ``torch.linalg.eigh``), ``"last_row"`` (its last row ``Z[m-1, :]``: the Lanczos
            residual estimate of Ritz pair ``i`` is ``β_m·|Z[m-1, i]|``) or ``"none"``.
        check: raise for non-finite input or a problem that did not converge. The kernels flag
            both per problem; reading the flags is one host synchronisation on CUDA, which
            ``check=False`` avoids (a flagged problem then has NaN eigenvalues and vectors).

    Returns:
        ``(eigenvalues, eigenvectors)``: eigenvalues ``[B, m]`` ascending, float64, on the
        input's device; eigenvectors ``[B, m, m]`` (``"all"``), ``[B, m]`` (``"last_row"``) or
        ``None``, float64. Unbatched inputs give results without the ``B`` dimension. The sign
        of each eigenvector is fixed so that its last component is ``>= 0``, so ``"last_row"`` is
        the last row of ``"all"`` (a sign is arbitrary only where that component is ~0). Empty
        batches and ``m = 0`` give empty results. Problems are independent: batch element ``i``
        equals the unbatched solve of problem ``i`` exactly.

    Raises:
        ValueError: naming ``alpha``, ``beta`` or ``vectors`` for a non-tensor, a dtype other
            than float32/float64, inconsistent shapes or devices, an unknown ``vectors``, or
            (with ``check``) a non-finite entry, with the index of the problem.
        RuntimeError: (with ``check``) a problem, named by its batch index, did not converge
            within 30·m QL sweeps; not expected for finite input.

    Equivalent to :func:`tridiag_eigh_ref` (dense ``torch.linalg.eigh`` in float64).
    """
    _tridiag_check(alpha, beta, vectors)
    unbatched = alpha.dim() == 1
    a64 = (alpha[None] if unbatched else alpha).to(torch.float64).contiguous()
    b64 = (beta[None] if unbatched else beta).to(torch.float64).contiguous()
    batch, m = a64.shape
    if batch == 0 or m == 0:
        evals = a64.new_empty(batch, m)
        vecs = None if vectors == "none" else a64.new_empty(_tridiag_vec_shape(batch, m, vectors))
    else:
        evals, vecs, status = torch.ops.pfkernels.tridiag_eigh(a64, b64, vectors)
        if vectors == "none":
            vecs = None
        if check:
            _raise_on_tridiag_status(status)
    if unbatched:
        evals = evals[0]
        vecs = None if vecs is None else vecs[0]
    return evals, vecs


def tridiag_eigh_ref(
    alpha: Tensor, beta: Tensor, vectors: str = "all", *, check: bool = True
) -> tuple[Tensor, Tensor | None]:
    """Pure-torch twin of :func:`tridiag_eigh`: ``torch.linalg.eigh`` of the dense float64 ``T``,
    with the same sign convention (last component of each eigenvector ``>= 0``) and the same
    handling of non-finite problems."""
    _tridiag_check(alpha, beta, vectors)
    unbatched = alpha.dim() == 1
    a64 = (alpha[None] if unbatched else alpha).to(torch.float64)
    b64 = (beta[None] if unbatched else beta).to(torch.float64)
    _batch, m = a64.shape
    status = _tridiag_input_status(a64, b64)
    if check:
        _raise_on_tridiag_status(status)
    bad = (status != _TRIDIAG_OK)[:, None]
    a64, b64 = a64.masked_fill(bad, 0.0), b64.masked_fill(bad, 0.0)
    dense = torch.diag_embed(a64)
    if m > 1:
        dense = dense + torch.diag_embed(b64, offset=1) + torch.diag_embed(b64, offset=-1)
    evals, z = torch.linalg.eigh(dense)
    if m > 0:
        z = z * torch.where(z[:, -1:, :] < 0, -1.0, 1.0).to(z.dtype)
    evals = evals.masked_fill(bad, math.nan)
    z = z.masked_fill(bad[:, :, None], math.nan)
    vecs = {"none": None, "last_row": z[:, m - 1, :] if m > 0 else evals, "all": z}[vectors]
    if unbatched:
        evals = evals[0]
        vecs = None if vecs is None else vecs[0]
    return evals, vecs


# ---------------------------------------------------------------------------------------------
# dal family: the DAL rate computed on the device from the fused sums (csrc/common/dal.h).
# ---------------------------------------------------------------------------------------------


def _check_dal_rate(sums: Tensor, p: float, lr_max: float, lr: float) -> None:
    """The launch checks of ``dal_rate``."""
    _check_tensor(sums, "sums", sums.device)
    _check_arg(sums.shape == (3,), "sums", f"must have shape [3], got {tuple(sums.shape)}")
    _check_dal_hyperparameters(p, lr_max)
    _check_arg(_is_number(lr) and math.isfinite(lr), "lr", f"must be a finite number, got {lr!r}")


@torch.library.custom_op("pfkernels::dal_rate", mutates_args=())
def _dal_rate_op(sums: Tensor, p: float, lr_max: float, lr: float, in_window: bool) -> Tensor:
    _check_dal_rate(sums, p, lr_max, lr)
    device = sums.device
    if not _has_backend("dal_rate", device):
        _warn_fallback("dal_rate", device)
        return dal_rate_ref(sums, p, lr_max, lr, in_window)
    sums = sums.contiguous()
    out = torch.empty((), dtype=sums.dtype, device=device)
    code = _DTYPE_CODES[sums.dtype]
    if device.type == "cpu":
        _C.dal_rate_cpu(_buf(sums), code, p, lr_max, lr, in_window, _buf(out))
    else:
        _C.dal_rate_cuda(_buf(sums), code, p, lr_max, lr, in_window, _buf(out), _stream(device))
    return out


@_dal_rate_op.register_fake
def _(sums, p, lr_max, lr, in_window):
    _check_dal_rate(sums, p, lr_max, lr)
    return sums.new_empty(())


def dal_rate(sums: Tensor, p: float, lr_max: float, lr: float, in_window: bool = True) -> Tensor:
    """The DAL learning rate ``h = min(2 / vᵖ, lr_max)``, ``v = ‖Hg‖/‖g‖``, on the device.

    Rosca et al. 2023 (REFERENCES.md §2); the formula lives once in ``csrc/common/dal.h``.

    Args:
        sums: ``[3]`` float32/float64 tensor ``(g·Hg, ‖g‖², ‖Hg‖²)`` as returned by
            :func:`multi_tensor_dot` ``(grads, hvps)``; CPU or CUDA.
        p: the exponent, ``p >= 0``; ``p = 0`` means plain GD at ``lr`` (as in the authors' code).
        lr_max: the cap ``h_max > 0``.
        lr: the base rate, used for ``p = 0`` and outside the window.
        in_window: False outside DAL's iteration window: the rate is then ``lr``.

    Returns:
        A 0-d tensor in ``sums``' dtype on its device (computed in float64, no host sync):
        ``lr`` when ``in_window`` is False or ``p == 0``; ``lr_max`` when ``‖g‖ = 0`` or
        ``‖Hg‖ = 0`` (the limit v → 0; with g = 0 the step is a no-op anyway); NaN when any sum
        is not finite, which :func:`multi_tensor_momentum_update` treats as "skip the step".

    Equivalent to :func:`dal_rate_ref`.
    """
    _check_arg(isinstance(sums, Tensor), "sums", "must be a tensor")
    _check_dal_hyperparameters(p, lr_max)
    _check_arg(_is_number(lr) and math.isfinite(lr), "lr", f"must be a finite number, got {lr!r}")
    return torch.ops.pfkernels.dal_rate(sums, float(p), float(lr_max), float(lr), bool(in_window))


def _check_dal_hyperparameters(p: float, lr_max: float) -> None:
    _check_arg(
        _is_number(p) and math.isfinite(p) and p >= 0,
        "p",
        f"must be a finite number >= 0, got {p!r}",
    )
    _check_arg(
        _is_number(lr_max) and math.isfinite(lr_max) and lr_max > 0,
        "lr_max",
        f"must be a finite number > 0, got {lr_max!r}",
    )


def dal_rule(grad_sqnorm: Tensor, hvp_sqnorm: Tensor, p: float, lr_max: float) -> Tensor:
    """``min(2 (‖g‖²/‖Hg‖²)^(p/2), lr_max)`` elementwise in float64, ``lr_max`` where either norm
    is 0, NaN where either input is not finite. The rule of ``csrc/common/dal.h`` for ``p > 0``
    inside the window, in torch: the one torch form of the DAL rule, behind :func:`dal_rate_ref`
    and :func:`pfkernels.optim.dal_learning_rate` (which adds the argument checks and ``p = 0``)."""
    g2, h2 = grad_sqnorm.double(), hvp_sqnorm.double()
    h = 2.0 * (g2 / h2) ** (0.5 * p)
    h = torch.where((g2 == 0) | (h2 == 0), torch.full_like(h, lr_max), torch.clamp(h, max=lr_max))
    finite = torch.isfinite(g2) & torch.isfinite(h2)
    return torch.where(finite, h, torch.full_like(h, math.nan))


def dal_rate_ref(
    sums: Tensor, p: float, lr_max: float, lr: float, in_window: bool = True
) -> Tensor:
    """Pure-torch twin of :func:`dal_rate` (float64 inside, no host sync)."""
    s = sums.double()
    if in_window and p != 0:
        rate = dal_rule(s[1], s[2], p, lr_max)
    else:
        rate = torch.full((), float(lr), dtype=torch.float64, device=sums.device)
    rate = torch.where(torch.isfinite(s).all(), rate, torch.full_like(rate, math.nan))
    return rate.to(sums.dtype)


# ---------------------------------------------------------------------------------------------
# lanczos family: the fused Lanczos step and the Ritz-vector product of pfkernels.eigsh.
# ---------------------------------------------------------------------------------------------

_LANCZOS_ARITH = {torch.float32: torch.float32, torch.float64: torch.float64,
                  torch.bfloat16: torch.float32}
# csrc/common/lanczos.h kSecondPassSlack: Gram-Schmidt's second pass runs where its coefficients
# exceed this many unit roundoffs x sqrt(rows) x ||w||
LANCZOS_SECOND_PASS_SLACK = 8.0


def _lanczos_step_check(w, V, j, alpha, beta, wnorm, coef=None, *, real: bool = True) -> None:
    for name, t in (("w", w), ("V", V), ("alpha", alpha), ("beta", beta), ("wnorm", wnorm)):
        _check_arg(isinstance(t, Tensor), name, f"must be a tensor, got {type(t).__name__}")
        _check_tensor(t, name, V.device, tuple(_LANCZOS_ARITH) if name == "V" else
                      (torch.float32, torch.float64))
    _check_arg(V.dim() == 3, "V", f"must have shape [B, m+1, n], got {tuple(V.shape)}")
    B, rows, n = V.shape
    _check_arg(B == 0 or V[0].is_contiguous(), "V",
               "each problem's basis [m+1, n] must be contiguous")
    _check_arg(B <= 1 or V.stride(0) >= rows * n, "V",
               f"batch stride {V.stride(0)} makes the problems' bases [m+1, n] = [{rows}, {n}] "
               "overlap")
    arith = _LANCZOS_ARITH[V.dtype]
    _check_arg(w.dtype == arith, "w", f"dtype must be {arith} for a {V.dtype} basis, got {w.dtype}")
    _check_arg(tuple(w.shape) == (B, n) and w.is_contiguous(), "w",
               f"must be a contiguous [B, n] = {(B, n)} tensor, got {tuple(w.shape)}")
    _check_arg(isinstance(j, int) and not isinstance(j, bool) and 0 <= j <= rows - 2, "j",
               f"must be an int in [0, {rows - 2}] for V with {rows} rows, got {j!r}")
    for name, t in (("alpha", alpha), ("beta", beta), ("wnorm", wnorm)):
        _check_arg(t.dtype == torch.float64, name, f"dtype must be float64, got {t.dtype}")
        _check_arg(t.dim() == 2 and t.shape[0] == B and t.shape[1] > j and t.stride(1) == 1,
                   name, f"must be [B, >j] = [{B}, >{j}] with unit last stride, got "
                   f"{tuple(t.shape)}")
        _check_arg(B <= 1 or t.stride(0) >= t.shape[1], name,
                   f"row stride {t.stride(0)} makes its rows of {t.shape[1]} overlap")
    _check_arg(alpha.stride(0) == beta.stride(0) == wnorm.stride(0), "beta",
               "alpha, beta and wnorm must share their row stride")
    written = [("w", w), ("V", V), ("alpha", alpha), ("beta", beta), ("wnorm", wnorm)]
    if coef is not None:
        _check_arg(isinstance(coef, Tensor), "coef",
                   f"must be a tensor or None, got {type(coef).__name__}")
        _check_tensor(coef, "coef", V.device, (torch.float64,))
        _check_arg(coef.dim() == 3 and coef.shape[0] == B and coef.shape[1] > j
                   and coef.shape[2] > j and coef.stride(2) == 1, "coef",
                   f"must be [B, >j, >j] = [{B}, >{j}, >{j}] with unit last stride, got "
                   f"{tuple(coef.shape)}")
        _check_arg(coef.stride(1) >= coef.shape[2] and (B <= 1 or coef.stride(0) >=
                   coef.shape[1] * coef.stride(1)), "coef", "its rows or problems overlap")
        written.append(("coef", coef))
    if real:
        _check_disjoint(written)


@torch.library.custom_op(
    "pfkernels::lanczos_step", mutates_args={"w", "V", "alpha", "beta", "wnorm", "coef"}
)
def _lanczos_step_op(w: Tensor, V: Tensor, j: int, alpha: Tensor, beta: Tensor,
                     wnorm: Tensor, coef: Optional[Tensor] = None) -> None:  # noqa: UP045
    # (custom_op infers the schema from this annotation at run time: keep the form 3.9 evaluates)
    _lanczos_step_check(w, V, j, alpha, beta, wnorm, coef)
    _lanczos_step_launch(w, V, j, alpha, beta, wnorm, coef)


def _lanczos_step_launch(w, V, j, alpha, beta, wnorm, coef) -> None:
    device = V.device
    if not _has_backend("lanczos_step", device):
        _warn_fallback("lanczos_step", device)
        lanczos_step_ref(w, V, j, alpha, beta, wnorm, coef)
        return
    B, _rows, n = V.shape
    if B == 0 or n == 0:
        lanczos_step_ref(w, V, j, alpha, beta, wnorm, coef)
        return
    coef_args = ((0, 0), 0, 0) if coef is None else (_buf(coef), coef.stride(0), coef.stride(1))
    args = (_buf(w), _buf(V), _DTYPE_CODES[V.dtype], B, n, V.stride(0), j, _buf(alpha),
            _buf(beta), _buf(wnorm), alpha.stride(0), *coef_args)
    if device.type == "cpu":
        _C.lanczos_step_cpu(*args)
    else:
        workspace = torch.empty(_C.lanczos_workspace_words(B, n, j), dtype=torch.float64,
                                device=device)
        _C.lanczos_step_cuda(*args, _buf(workspace), _stream(device))


@_lanczos_step_op.register_fake
def _(w, V, j, alpha, beta, wnorm, coef=None):
    _lanczos_step_check(w, V, j, alpha, beta, wnorm, coef, real=False)
    return None


def lanczos_step(w: Tensor, V: Tensor, j: int, alpha: Tensor, beta: Tensor,
                 wnorm: Tensor, coef: Tensor | None = None) -> None:
    """One Lanczos step with full reorthogonalisation, for a batch of ``B`` problems, in place.

    Given ``w = A v_j``, classical Gram-Schmidt against the basis ``V[:, 0..j]``; the second
    pass's update only where it changes ``w`` by more than rounding (``||c2|| > s u sqrt(j+1)
    ||w||`` after the first pass, ``u`` the unit roundoff, ``s =``
    :data:`LANCZOS_SECOND_PASS_SLACK`; otherwise ``c2 = 0``), which saves one of the step's
    three reads of the basis::

        c1 = V_j w;  w -= V_j^T c1;  c2 = V_j w;  w -= V_j^T c2
        alpha_j = c1[j] + c2[j];  beta_j = ||w||;  v_{j+1} = w / beta_j

    (the first pass contains the three-term recurrence: ``c1[j] = v_j^T A v_j`` and ``c1[j-1]``
    is ``beta_{j-1}`` in exact arithmetic). ``beta_j == 0`` writes ``v_{j+1} = w`` (zeros) for the
    caller to replace. Nothing is read back to the host.

    Args:
        w: ``[B, n]`` contiguous, float32 (for a float32 or bfloat16 basis) or float64 (for a
            float64 basis); overwritten by the orthogonalised residual ``beta_j v_{j+1}``.
        V: ``[B, m+1, n]`` basis (each problem's ``[m+1, n]`` contiguous; the batch stride is
            free, so a slice of a larger basis works), float32, float64 or bfloat16 storage
            (float32 arithmetic); rows ``0..j`` are read, row ``j+1`` is written.
        j: the step, ``0 <= j <= m - 1``.
        alpha, beta, wnorm: ``[B, >j]`` float64 with unit last stride and a common row stride;
            column ``j`` receives ``alpha_j``, ``beta_j`` and ``||A v_j||`` (before
            orthogonalisation: the scale the breakdown test compares ``beta_j`` with).
        coef: optional ``[B, >j, >j]`` float64 with unit last stride; row ``j`` receives
            ``c1 + c2`` in columns ``0..j``, so that ``A v_j = sum_i coef[j, i] v_i + beta_j
            v_{j+1}`` holds to rounding whatever the basis's orthogonality. For an orthonormal
            basis and a symmetric A the row is ``(0, ..., 0, beta_{j-1}, alpha_j)``; the rest
            measures lost orthogonality or normality (what :func:`pfkernels.eigsh` adds to its
            residual bounds).

    Products are formed in the arithmetic dtype and summed in float64 in a fixed order (a float
    sum over a tile left norms off by 1e-5): deterministic for any thread count, no float
    atomics on CUDA, the caller's stream.

    Raises:
        ValueError naming the argument for shapes, dtypes, strides or devices other than these,
        or tensors sharing memory; ``torch.ops.pfkernels.lanczos_step`` runs the same checks.

    Equivalent to :func:`lanczos_step_ref`.
    """
    for name, t in (("w", w), ("V", V), ("alpha", alpha), ("beta", beta), ("wnorm", wnorm)):
        _check_arg(isinstance(t, Tensor), name, f"must be a tensor, got {type(t).__name__}")
    _check_arg(coef is None or isinstance(coef, Tensor), "coef",
               f"must be a tensor or None, got {type(coef).__name__}")
    _check_arg(isinstance(j, int) and not isinstance(j, bool), "j", f"must be an int, got {j!r}")
    torch.ops.pfkernels.lanczos_step(w, V, j, alpha, beta, wnorm, coef)


def lanczos_step_unchecked(w: Tensor, V: Tensor, j: int, alpha: Tensor, beta: Tensor,
                           wnorm: Tensor, coef: Tensor | None = None) -> None:
    """:func:`lanczos_step` for callers that built every argument themselves
    (:func:`pfkernels.eigsh`): no argument checks and no dispatcher, which together cost more
    than the kernel on small problems (0.24 ms a step, measured on the 85k-parameter MLP). Not
    traceable by ``torch.compile``; use :func:`lanczos_step` there."""
    _lanczos_step_launch(w, V, j, alpha, beta, wnorm, coef)


def lanczos_step_ref(w: Tensor, V: Tensor, j: int, alpha: Tensor, beta: Tensor,
                     wnorm: Tensor, coef: Tensor | None = None) -> None:
    """Pure-torch twin of :func:`lanczos_step` (batched gemv; float64 dot products and norms)."""
    _lanczos_step_check(w, V, j, alpha, beta, wnorm, coef)
    arith = w.dtype
    Vj = V[:, : j + 1].to(arith)
    wnorm[:, j] = _rownorm64(w)
    x = w
    total = torch.zeros(w.shape[0], j + 1, dtype=torch.float64, device=w.device)
    for npass in range(2):
        c = lanczos_dots_ref(V[:, : j + 1], x)
        if npass:  # only where it changes w by more than rounding (csrc/common/lanczos.h)
            limit = LANCZOS_SECOND_PASS_SLACK * torch.finfo(arith).eps / 2
            needed = (c * c).sum(1) > limit ** 2 * (j + 1) * _rownorm64(x) ** 2
            c = c * needed[:, None]
        x = x - torch.bmm(c.to(arith).unsqueeze(1), Vj).squeeze(1)
        total = total + c
    b = _rownorm64(x)
    alpha[:, j] = total[:, j]
    if coef is not None:
        coef[:, j, : j + 1] = total
    beta[:, j] = b
    inv = torch.where(b > 0, 1.0 / torch.where(b > 0, b, 1.0), 1.0).to(arith)
    w.copy_(x)
    V[:, j + 1] = (x * inv.unsqueeze(1)).to(V.dtype)


def _lanczos_dots_check(V, x) -> None:
    for name, t in (("V", V), ("x", x)):
        _check_arg(isinstance(t, Tensor), name, f"must be a tensor, got {type(t).__name__}")
    _check_tensor(V, "V", V.device, tuple(_LANCZOS_ARITH))
    _check_tensor(x, "x", V.device, (torch.float32, torch.float64))
    _check_arg(V.dim() == 3, "V", f"must have shape [B, rows, n], got {tuple(V.shape)}")
    B, rows, n = V.shape
    _check_arg(B == 0 or V[0].is_contiguous(), "V",
               "each problem's rows [rows, n] must be contiguous")
    _check_arg(B <= 1 or V.stride(0) >= rows * n, "V",
               f"batch stride {V.stride(0)} makes the problems' rows [{rows}, {n}] overlap")
    arith = _LANCZOS_ARITH[V.dtype]
    _check_arg(x.dtype == arith, "x", f"dtype must be {arith} for a {V.dtype} V, got {x.dtype}")
    _check_arg(tuple(x.shape) == (B, n) and x.is_contiguous(), "x",
               f"must be a contiguous [B, n] = {(B, n)} tensor, got {tuple(x.shape)}")


@torch.library.custom_op("pfkernels::lanczos_dots", mutates_args=())
def _lanczos_dots_op(V: Tensor, x: Tensor) -> Tensor:
    _lanczos_dots_check(V, x)
    return _lanczos_dots_launch(V, x)


def _lanczos_dots_launch(V: Tensor, x: Tensor) -> Tensor:
    device = V.device
    if not _has_backend("lanczos_dots", device):
        _warn_fallback("lanczos_dots", device)
        return lanczos_dots_ref(V, x)
    B, rows, n = V.shape
    out = torch.full((B, rows), math.nan, dtype=torch.float64, device=device)
    if out.numel() == 0 or n == 0:
        return out.zero_()
    args = (_buf(V), _buf(x), _DTYPE_CODES[V.dtype], B, n, V.stride(0), rows, _buf(out))
    if device.type == "cpu":
        _C.lanczos_dots_cpu(*args)
    else:
        workspace = torch.empty(_C.lanczos_dots_workspace_words(B, n, rows), dtype=torch.float64,
                                device=device)
        _C.lanczos_dots_cuda(*args, _buf(workspace), _stream(device))
    return out


@_lanczos_dots_op.register_fake
def _(V, x):
    _lanczos_dots_check(V, x)
    return V.new_empty(V.shape[0], V.shape[1], dtype=torch.float64)


def lanczos_dots(V: Tensor, x: Tensor) -> Tensor:
    """Dot products of every row of a batch of bases with one vector per problem, accumulated so
    that their error does not grow with ``n``: ``c[b, i] = <V[b, i], x[b]>``.

    The reductions of :func:`pfkernels.eigsh` outside the fused step (start and breakdown
    vectors, norms, Ritz-vector checks, the sharded basis, trace probes) use it: a float32
    ``torch.linalg.vector_norm`` of a unit vector of 1.1e7 entries is off by 3e-4 on the CPU,
    this by about 1e-8.

    Args:
        V: ``[B, rows, n]``, float32, float64 or bfloat16 (each problem's rows contiguous; the
            batch stride is free), e.g. ``x[:, None]`` for squared norms.
        x: ``[B, n]`` contiguous, float32 for a float32 or bfloat16 ``V``, float64 for float64.

    Returns:
        ``[B, rows]`` float64 on V's device. Products in the arithmetic dtype, sums in float64 in
        a fixed order, as in :func:`lanczos_step` (deterministic, no host sync, the caller's
        stream).

    Raises:
        ValueError naming the argument for shapes, dtypes, strides or devices other than these;
        ``torch.ops.pfkernels.lanczos_dots`` runs the same checks.

    Equivalent to :func:`lanczos_dots_ref`.
    """
    for name, t in (("V", V), ("x", x)):
        _check_arg(isinstance(t, Tensor), name, f"must be a tensor, got {type(t).__name__}")
    return torch.ops.pfkernels.lanczos_dots(V, x)


def lanczos_dots_unchecked(V: Tensor, x: Tensor) -> Tensor:
    """:func:`lanczos_dots` for callers that built both arguments themselves
    (:func:`pfkernels.eigsh`), without argument checks or the dispatcher (65 us a call, more
    than the sums on an 85k-parameter model). Not traceable by ``torch.compile``."""
    return _lanczos_dots_launch(V, x)


# Columns per float64 block of lanczos_dots_ref: exact sums without a float64 copy of the basis.
_REF_BLOCK = 1 << 16


def lanczos_dots_ref(V: Tensor, x: Tensor) -> Tensor:
    """Pure-torch twin of :func:`lanczos_dots` (float64 products, blocks of 65536 columns)."""
    _lanczos_dots_check(V, x)
    B, rows, n = V.shape
    out = torch.zeros(B, rows, dtype=torch.float64, device=V.device)
    for lo in range(0, n, _REF_BLOCK):
        hi = min(n, lo + _REF_BLOCK)
        out += torch.bmm(V[:, :, lo:hi].double(), x[:, lo:hi].double().unsqueeze(-1)).squeeze(-1)
    return out


def _rownorm64(x: Tensor) -> Tensor:
    """Float64 norms [B] of the rows of x [B, n] from exact float64 sums (for the refs)."""
    return lanczos_dots_ref(x.unsqueeze(1), x.contiguous()).squeeze(1).clamp_min(0).sqrt()


def _lanczos_ritz_check(S, V) -> None:
    for name, t in (("S", S), ("V", V)):
        _check_arg(isinstance(t, Tensor), name, f"must be a tensor, got {type(t).__name__}")
    _check_tensor(V, "V", V.device, tuple(_LANCZOS_ARITH))
    _check_tensor(S, "S", V.device, (torch.float64,))
    _check_arg(V.dim() == 3, "V", f"must have shape [B, >=rows, n], got {tuple(V.shape)}")
    _check_arg(V.shape[0] == 0 or V[0].is_contiguous(), "V",
               "each problem's basis must be contiguous")
    _check_arg(S.dim() == 3 and S.shape[0] == V.shape[0] and S.shape[1] <= V.shape[1], "S",
               f"must be [B, rows, k] with B={V.shape[0]} and rows <= {V.shape[1]}, got "
               f"{tuple(S.shape)}")


@torch.library.custom_op("pfkernels::lanczos_ritz", mutates_args=())
def _lanczos_ritz_op(S: Tensor, V: Tensor) -> Tensor:
    _lanczos_ritz_check(S, V)
    device = V.device
    if not _has_backend("lanczos_ritz", device):
        _warn_fallback("lanczos_ritz", device)
        return lanczos_ritz_ref(S, V)
    B, rows, k = S.shape
    n = V.shape[2]
    U = torch.full((B, k, n), math.nan, dtype=_LANCZOS_ARITH[V.dtype], device=device)
    if U.numel() == 0 or rows == 0:
        return U.zero_()
    S = S.contiguous()
    args = (_buf(S), _buf(V), _DTYPE_CODES[V.dtype], B, n, V.stride(0), rows, k, _buf(U))
    if device.type == "cpu":
        _C.lanczos_ritz_cpu(*args)
    else:
        _C.lanczos_ritz_cuda(*args, _stream(device))
    return U


@_lanczos_ritz_op.register_fake
def _(S, V):
    _lanczos_ritz_check(S, V)
    return V.new_empty(S.shape[0], S.shape[2], V.shape[2], dtype=_LANCZOS_ARITH[V.dtype])


def lanczos_ritz(S: Tensor, V: Tensor) -> Tensor:
    """Ritz vectors ``U = S^T V[:, :rows]`` for a batch: ``U[b, r] = sum_i S[b, i, r] V[b, i]``.

    Args:
        S: ``[B, rows, k]`` float64, eigenvector coefficients of the projected matrix (columns).
        V: ``[B, >=rows, n]`` basis, float32, float64 or bfloat16 (each problem contiguous).

    Returns:
        ``[B, k, n]`` in the arithmetic dtype (float32 for float32/bfloat16 bases, float64 for
        float64), on V's device. One read of ``V`` per group of 8 Ritz vectors on CUDA.

    Raises:
        ValueError naming the argument; ``torch.ops.pfkernels.lanczos_ritz`` runs the same
        checks.

    Equivalent to :func:`lanczos_ritz_ref`.
    """
    for name, t in (("S", S), ("V", V)):
        _check_arg(isinstance(t, Tensor), name, f"must be a tensor, got {type(t).__name__}")
    return torch.ops.pfkernels.lanczos_ritz(S, V)


def lanczos_ritz_ref(S: Tensor, V: Tensor) -> Tensor:
    """Pure-torch twin of :func:`lanczos_ritz` (one batched gemm)."""
    _lanczos_ritz_check(S, V)
    arith = _LANCZOS_ARITH[V.dtype]
    rows = S.shape[1]
    return torch.bmm(S.transpose(1, 2).to(arith), V[:, :rows].to(arith))


# ---------------------------------------------------------------------------------------------
# ce_hessian family: the softmax cross-entropy loss-Hessian product on [N, V] logits with an online
# softmax (csrc/common/ce_hessian.h), the GGN's hot path at language-model vocabularies.
# ---------------------------------------------------------------------------------------------

_CE_DTYPES = (torch.float32, torch.float64, torch.bfloat16)
_CE_REDUCTIONS = ("mean", "sum")
_INT64_RANGE = (-(2**63), 2**63 - 1)


def _ce_hessian_check(logits, tangent, target, ignore_index, reduction) -> None:
    """The checks of ``ce_hessian`` shared by the op (launch and fake), the wrapper and the ref."""
    for name, t in (("logits", logits), ("tangent", tangent)):
        _check_arg(isinstance(t, Tensor), name, f"must be a tensor, got {type(t).__name__}")
    _check_tensor(logits, "logits", logits.device, _CE_DTYPES)
    _check_arg(logits.dim() == 2, "logits", f"must be 2-D [N, V], got shape {tuple(logits.shape)}")
    _check_tensor(tangent, "tangent", logits.device, (logits.dtype,))
    _check_arg(tangent.shape == logits.shape, "tangent",
               f"shape {tuple(tangent.shape)} differs from logits' {tuple(logits.shape)}")
    if target is not None:
        _check_arg(isinstance(target, Tensor), "target",
                   f"must be a tensor of class indices or None, got {type(target).__name__}")
        _check_tensor(target, "target", logits.device, (torch.int64,))
        _check_arg(tuple(target.shape) == (logits.shape[0],), "target",
                   f"must have shape [N] = [{logits.shape[0]}], got {tuple(target.shape)}")
    _check_arg(_is_int(ignore_index) and _INT64_RANGE[0] <= ignore_index <= _INT64_RANGE[1],
               "ignore_index",
               f"must be an int64 integer, got {ignore_index!r}")
    _check_arg(isinstance(reduction, str) and reduction in _CE_REDUCTIONS, "reduction",
               f"must be 'mean' or 'sum', got {reduction!r} (reduction='none' is a vector of "
               "losses, which has no single Hessian)")


def _ce_hessian_options(weight, label_smoothing) -> None:
    """F.cross_entropy's options the wrapper and the ref accept or refuse by name."""
    _check_arg(weight is None, "weight",
               "class weights are not supported (the product is for unweighted cross-entropy)")
    _check_arg(_is_number(label_smoothing) and 0.0 <= label_smoothing <= 1.0, "label_smoothing",
               f"must be a number in [0, 1], got {label_smoothing!r}")


@torch.library.custom_op("pfkernels::ce_hessian", mutates_args=())
def _ce_hessian_op(logits: Tensor, tangent: Tensor,
                   target: Optional[Tensor],  # noqa: UP045 (custom_op reads the annotation)
                   ignore_index: int, reduction: str) -> Tensor:
    _ce_hessian_check(logits, tangent, target, ignore_index, reduction)
    device = logits.device
    if not _has_backend("ce_hessian", device):
        _warn_fallback("ce_hessian", device)
        return ce_hessian_ref(logits, tangent, target, ignore_index=ignore_index,
                              reduction=reduction)
    N, V = logits.shape
    out = torch.empty(N, V, dtype=logits.dtype, device=device)
    if out.numel() == 0:
        return out
    logits, tangent = logits.contiguous(), tangent.contiguous()
    target_buf = (0, 0)
    if target is not None:
        target = target.contiguous()
        target_buf = _buf(target)
    args = (_buf(logits), _buf(tangent), target_buf, N, V, ignore_index, reduction == "mean",
            _DTYPE_CODES[logits.dtype], _buf(out))
    if device.type == "cpu":
        _C.ce_hessian_cpu(*args)
    else:
        workspace = torch.empty(_C.ce_hessian_workspace_words(), dtype=torch.float64,
                                device=device)
        _C.ce_hessian_cuda(*args, _buf(workspace), _stream(device))
    return out


@_ce_hessian_op.register_fake
def _(logits, tangent, target, ignore_index, reduction):
    _ce_hessian_check(logits, tangent, target, ignore_index, reduction)
    return logits.new_empty(logits.shape)


@_ce_hessian_op.register_vmap
def _(info, in_dims, logits, tangent, target, ignore_index, reduction):
    # One launch per batch element: a product of one batch of logits with many tangents (the
    # GGN's batched products) then reads the logits once per tangent instead of copying them.
    def element(t, dim, i):
        return t if dim is None else t.select(dim, i)

    outs = [torch.ops.pfkernels.ce_hessian(element(logits, in_dims[0], i),
                                           element(tangent, in_dims[1], i),
                                           None if target is None
                                           else element(target, in_dims[2], i),
                                           ignore_index, reduction)
            for i in range(info.batch_size)]
    return torch.stack(outs), 0


def ce_hessian(logits: Tensor, tangent: Tensor, target: Tensor | None = None, *,
               ignore_index: int = -100, reduction: str = "mean", weight: Tensor | None = None,
               label_smoothing: float = 0.0) -> Tensor:
    """The softmax cross-entropy loss Hessian times a tangent, row by row, without an [N, V]
    temporary: ``out_i = (p_i ⊙ u_i − p_i (p_i · u_i)) / n`` with ``p_i = softmax(logits_i)``.

    This is ``∇²_z ℓ · u`` for ``ℓ = F.cross_entropy(logits, target, ignore_index=...,
    reduction=..., label_smoothing=...)`` with respect to the logits ``z``: per row the Hessian
    of ``−Σ_j q_j log p_j`` is ``diag(p) − p pᵀ`` for any target distribution ``q`` summing to 1,
    so neither the target classes nor label smoothing change it; only which rows count does. An
    online softmax (running max and sums rescaled as the max grows, ``csrc/common/ce_hessian.h``)
    reads each row twice and writes the output once.

    Args:
        logits: ``[N, V]`` float32, float64 or bfloat16, CPU or CUDA (``V`` the classes).
        tangent: ``[N, V]``, same dtype and device (the direction ``u``). Non-contiguous inputs
            are copied first.
        target: ``[N]`` int64 class indices on the same device, or None (every row counts). Only
            the comparison with ``ignore_index`` reads them; their range is not checked.
        ignore_index: rows whose target equals it give zeros and do not count in ``n``.
        reduction: ``"mean"`` (``n`` = the rows that count; every row ignored gives zeros where
            ``F.cross_entropy``'s loss is NaN) or ``"sum"`` (``n = 1``).
        weight: must be None (class weights are refused by name).
        label_smoothing: accepted in ``[0, 1]``; it does not change the Hessian.

    Returns:
        ``[N, V]`` in the logits' dtype on their device. Exponentials and products in float32
        (float64 for float64 inputs), the row sums in float64; rows are independent, so the
        result does not depend on the thread count. A row holding NaN or +inf gives NaN, as
        softmax does; -inf logits (masked classes) give exact zeros there. Under ``torch.vmap``
        (batched tangents) it runs once per batch element.

    Raises:
        ValueError naming the argument for shapes, dtypes, devices or options other than these;
        ``torch.ops.pfkernels.ce_hessian`` runs the same checks.

    Equivalent to :func:`ce_hessian_ref`.
    """
    _ce_hessian_options(weight, label_smoothing)
    _ce_hessian_check(logits, tangent, target, ignore_index, reduction)
    return torch.ops.pfkernels.ce_hessian(logits, tangent, target, ignore_index, reduction)


def ce_hessian_ref(logits: Tensor, tangent: Tensor, target: Tensor | None = None, *,
                   ignore_index: int = -100, reduction: str = "mean",
                   weight: Tensor | None = None, label_smoothing: float = 0.0) -> Tensor:
    """Pure-torch twin of :func:`ce_hessian`: ``softmax`` then the formula, in float64 (it holds
    [N, V] float64 temporaries), no host synchronisation."""
    _ce_hessian_options(weight, label_smoothing)
    _ce_hessian_check(logits, tangent, target, ignore_index, reduction)
    p = torch.softmax(logits.double(), dim=-1)
    pu = p * tangent.double()
    out = pu - p * pu.sum(dim=-1, keepdim=True)
    counts = (torch.ones(logits.shape[0], dtype=torch.bool, device=logits.device)
              if target is None else target != ignore_index)
    if reduction == "mean":
        n = counts.sum().double()
        out = out * torch.where(n > 0, 1.0 / torch.where(n > 0, n, 1.0), 0.0)
    out = torch.where(counts.unsqueeze(-1), out, 0.0)
    return out.to(logits.dtype)
