"""pfkernels: fast curvature for PyTorch training.

Hessian-vector products, batched Lanczos eigensolves, edge-of-stability tracking, the principal
flow, central flows and the DAL learning rate. See README.md and docs/.
"""

from ._version import __version__
from .ops import backend_info

__all__ = ["__version__", "backend_info"]
from .lanczos import EigResult  # noqa: E402
from .lanczos import eigsh  # noqa: E402
