"""Bit packing of integer codes (exact, any shape, any length): the functions live in the checkpoint's remote file
``lrc_quant.py`` (the loader unpacks with them), whose docstring gives the layouts."""
from .lrc_quant import BITS, pack, packed_length, unpack

__all__ = ["BITS", "pack", "packed_length", "unpack"]
