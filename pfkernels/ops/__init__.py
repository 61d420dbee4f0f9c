"""Custom ops over the compiled backends, their fake (meta) implementations and pure-torch twins.

Every op is a ``torch.library.custom_op`` (so it works under ``torch.compile`` and CUDA-graph
capture) with a pure-PyTorch ``<op>_ref`` of the same signature; tests compare the two. Where the
extension has no backend for a tensor's device (or failed to load) the op runs its ref and warns
once; :func:`backend_info` says what was built.

One module per kernel family, named as the family is in ``csrc/<cpu|cuda>/<family>_*.{cpp,cu}``
and ``tests/test_ops_<family>.py``: :mod:`.multi_tensor`, :mod:`.flow`, :mod:`.tridiag`,
:mod:`.dal`, :mod:`.lanczos`, :mod:`.ce_hessian`. The private :mod:`._backend` is the only
importer of ``pfkernels._C`` and holds what the families share (the fallback, the caller's
stream, the launch checks). Callers import from ``pfkernels.ops``, never from a family module.
"""

from ._backend import _C as _C
from ._backend import backend_info
from .ce_hessian import ce_hessian, ce_hessian_ref
from .dal import _check_dal_hyperparameters as _check_dal_hyperparameters
from .dal import dal_rate, dal_rate_ref, dal_rule
from .flow import _log_one_minus_real as _log_one_minus_real
from .flow import _pf_coefficients_real as _pf_coefficients_real
from .flow import flow_field, flow_field_ref
from .lanczos import (
    LANCZOS_SECOND_PASS_SLACK,
    lanczos_dots,
    lanczos_dots_ref,
    lanczos_dots_unchecked,
    lanczos_ritz,
    lanczos_ritz_ref,
    lanczos_step,
    lanczos_step_ref,
    lanczos_step_unchecked,
)
from .multi_tensor import (
    multi_tensor_axpy,
    multi_tensor_axpy_ref,
    multi_tensor_dot,
    multi_tensor_dot_ref,
    multi_tensor_momentum_update,
    multi_tensor_momentum_update_ref,
)
from .tridiag import _raise_on_tridiag_status as _raise_on_tridiag_status
from .tridiag import tridiag_eigh, tridiag_eigh_ref

__all__ = [
    "LANCZOS_SECOND_PASS_SLACK",
    "backend_info",
    "ce_hessian",
    "ce_hessian_ref",
    "dal_rate",
    "dal_rate_ref",
    "dal_rule",
    "flow_field",
    "flow_field_ref",
    "lanczos_dots",
    "lanczos_dots_ref",
    "lanczos_dots_unchecked",
    "lanczos_ritz",
    "lanczos_ritz_ref",
    "lanczos_step",
    "lanczos_step_ref",
    "lanczos_step_unchecked",
    "multi_tensor_axpy",
    "multi_tensor_axpy_ref",
    "multi_tensor_dot",
    "multi_tensor_dot_ref",
    "multi_tensor_momentum_update",
    "multi_tensor_momentum_update_ref",
    "tridiag_eigh",
    "tridiag_eigh_ref",
]
