"""lrc: post-training low-rank compression of causal language models, layer by layer, with honest accounting."""
__version__ = "0.1.0"

from .api import compress, compress_model, load, plan, save  # noqa: E402

__all__ = ["__version__", "compress", "compress_model", "load", "plan", "save"]
