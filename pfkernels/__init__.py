"""pfkernels: fast curvature for PyTorch training.

Hessian-vector products, batched Lanczos eigensolves, edge-of-stability tracking, the principal
flow, central flows and the DAL learning rate. See README.md and docs/.
"""

from ._version import __version__
from .ops import backend_info
from .hvp import HessianOperator
from . import data

__all__ = ["HessianOperator", "__version__", "backend_info", "data"]
from .lanczos import EigResult  # noqa: E402
from .lanczos import eigsh  # noqa: E402
