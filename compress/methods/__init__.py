"""Registered decomposition methods. Importing this package registers all of them (one line each)."""
from . import asvd, cospadi, eora, fwsvd, kfac_svd, lord, modegpt, svd, svd_llm  # noqa: F401  (registration)
from .base import METHODS, Method, MethodConfig, get_method, register

__all__ = ["METHODS", "Method", "MethodConfig", "get_method", "register"]
