"""Registered decomposition methods. Importing this package registers all of them (one line each)."""
from . import asvd, cospadi, eora, fwsvd, lord, modegpt, svd, svd_llm  # noqa: F401  (registration side effect)
from .base import METHODS, Method, MethodConfig, get_method, register

__all__ = ["METHODS", "Method", "MethodConfig", "get_method", "register"]
