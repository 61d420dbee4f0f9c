"""pfkernels: fast curvature for PyTorch training.

Hessian-vector products, batched Lanczos eigensolves, edge-of-stability tracking, the principal
flow, central flows and the DAL learning rate. See README.md and docs/.
"""

from . import data, distributed, finite_difference, flows, losses, optim
from ._version import __version__
from .curvature import (
    CurvatureOperator,
    EmpiricalFisherOperator,
    GGNOperator,
    MCFisherOperator,
    curvature_operator,
)
from .eos import (
    SharpnessTracker,
    StabilityThreshold,
    detect_eos,
    preconditioned_operator,
    stability_threshold,
    stability_thresholds,
)
from .estimators import DiagonalEstimate, hutchinson_diagonal, hutchpp_trace
from .finite_difference import GradientHessian
from .hvp import HessianOperator
from .lanczos import (
    EigResult,
    SpectralDensity,
    TraceEstimate,
    eigsh,
    hutchinson_trace,
    spectral_density,
)
from .model_sharpness import layer_sharpness, sharpness
from .ops import backend_info

__all__ = [
    "CurvatureOperator",
    "DiagonalEstimate",
    "EigResult",
    "EmpiricalFisherOperator",
    "GGNOperator",
    "GradientHessian",
    "HessianOperator",
    "MCFisherOperator",
    "SharpnessTracker",
    "SpectralDensity",
    "StabilityThreshold",
    "TraceEstimate",
    "__version__",
    "backend_info",
    "curvature_operator",
    "data",
    "detect_eos",
    "distributed",
    "eigsh",
    "finite_difference",
    "flows",
    "hutchinson_diagonal",
    "hutchinson_trace",
    "hutchpp_trace",
    "layer_sharpness",
    "losses",
    "optim",
    "preconditioned_operator",
    "sharpness",
    "spectral_density",
    "stability_threshold",
    "stability_thresholds",
]
