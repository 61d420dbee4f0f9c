"""Continuous flows that model optimizer dynamics: the principal flow (and its comparison flows)."""

from .principal import FLOWS, STABILITY_CLASSES
from .principal import FlowComparison, FlowTrajectory, StabilityCoefficients
from .principal import compare_flows
from .principal import gd_trajectory
from .principal import holomorphic_grad, holomorphic_hessian, holomorphic_hvp
from .principal import integrate_modified_flow
from .principal import integrate_principal_flow
from .principal import modified_flow_field
from .principal import principal_flow_coefficients
from .principal import principal_flow_field
from .principal import principal_flow_propagator
from .principal import stability_coefficients
from .principal import third_derivative
from .principal import StabilityReport
from .principal import model_loss
from .principal import stability_report
from .principal import principal_flow_step
