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
from .lanczos import SpectralDensity  # noqa: E402
from .lanczos import TraceEstimate  # noqa: E402
from .lanczos import hutchinson_trace  # noqa: E402
from .lanczos import layer_sharpness  # noqa: E402
from .lanczos import sharpness  # noqa: E402
from .lanczos import spectral_density  # noqa: E402
from .eos import SharpnessTracker  # noqa: E402
from .eos import StabilityThreshold  # noqa: E402
from .eos import detect_eos  # noqa: E402
from .eos import preconditioned_operator  # noqa: E402
from .eos import stability_threshold  # noqa: E402
from .eos import stability_thresholds  # noqa: E402
from . import distributed  # noqa: E402
