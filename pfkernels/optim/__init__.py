"""Optimizers of the EoS papers: DAL (Rosca et al. 2023) and normalised / √L GD (Arora et al. 2022)."""

from .arora import NormalizedGD, sqrt_loss
from .dal import DAL, dal_learning_rate
from .scaler import DALScaler

__all__ = ["DAL", "DALScaler", "NormalizedGD", "dal_learning_rate", "sqrt_loss"]
