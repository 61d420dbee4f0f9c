"""The compiled extension as the ops see it: loading ``pfkernels._C`` (the only import of it),
what it was built with (:func:`backend_info`), the fallback to a ref where it has no backend, the
caller's stream, and the launch checks every family shares. Private to :mod:`pfkernels.ops`.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import Tensor

from .._checks import check_arg as _check_arg
from .._version import __version__

# ---------------------------------------------------------------------------------------------
# The extension: loaded once, what it was built with, and the fallback to a ref (one warning per
# op and device) where it has no kernel for a device.
# ---------------------------------------------------------------------------------------------

try:
    from .. import _C
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
