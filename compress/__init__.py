"""lrc: post-training low-rank compression of causal language models, layer by layer, with honest accounting."""
from .api import compress, compress_model, load, plan, save
from .version import __version__

__all__ = ["__version__", "compress", "compress_model", "load", "plan", "save"]
