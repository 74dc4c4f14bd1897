"""Compensation of an already-compressed model: residual paths that repair the compression error (EoRA)."""
from .eora import Residual, eora_residual, residual_spectrum

__all__ = ["Residual", "eora_residual", "residual_spectrum"]
