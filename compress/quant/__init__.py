"""Weight quantization: the tensor math of quantized storage (issue 25, first piece; methods.md §7, §15).

A matrix lrc writes (a factor, a resized dense Linear, a dictionary) can be stored as b-bit integer codes
(b = 8, 4, 3 or 2) with a scale, and an integer zero point unless symmetric, per group of consecutive input
columns of each row (:class:`QuantSpec`). Two quantizers produce a :class:`QuantizedWeight`: round-to-nearest
(:func:`rtn`) and GPTQ error feedback using the Gram the matrix sees (:func:`gptq`). :mod:`compress.quant.pack`
packs codes into bytes, and :func:`storage_bytes` counts exactly the bytes :meth:`QuantizedWeight.to_packed` holds
(codes, scales, zeros).

The checkpoint's module type is ``QuantLinear`` (``lrc_quant.py``, remote code: storage layout and kernels in its
docstring; registered as ``quant`` by ``module_type.py``); ``engine/quantize.py`` quantizes a block's Linears after
its stages (a recipe's ``quantize`` section), and the token embeddings with a tied or untied head when the section
has ``embeddings`` (``QuantEmbedding``, ``QuantTiedHead``). The byte budget of the allocators comes later.
"""
from .math import (SCALE_DTYPES, QuantizedWeight, QuantSpec, dequantize, gptq, quant_params, quantize, rtn,
                   storage_bytes)
from .pack import pack, packed_length, unpack
from .lrc_quant import QuantEmbedding, QuantLinear, QuantTiedHead
from . import module_type  # noqa: F401  (registers the ``quant*`` module types)

__all__ = ["SCALE_DTYPES", "QuantEmbedding", "QuantLinear", "QuantSpec", "QuantTiedHead", "QuantizedWeight",
           "dequantize", "gptq", "pack", "packed_length", "quant_params", "quantize", "rtn", "storage_bytes", "unpack"]
