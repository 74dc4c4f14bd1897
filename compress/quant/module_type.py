"""The ``quant`` module types as lrc's registry sees them (``checkpoint/module_types.py``; the classes and their
builders are the remote-code file ``lrc_quant.py``): ``quant`` (a block's Linear, or an untied output head),
``quant_embedding`` (the input embeddings) and ``quant_tied_head`` (the output head tied to them: no tensors)."""
from __future__ import annotations

from ..checkpoint.module_types import ModuleType, register_module_type
from .lrc_quant import (QuantEmbedding, QuantLinear, QuantTiedHead, build_quant, build_quant_embedding,
                        build_quant_tied_head)

SCALE_NAMES = {"torch.float16": "float16", "torch.bfloat16": "bfloat16", "torch.float32": "float32"}


def quant_spec(m: QuantLinear) -> dict:
    return {"type": "quant", "in_features": m.in_features, "out_features": m.out_features, "bits": m.bits,
            "group_size": m.group_size, "symmetric": m.symmetric, "scale_dtype": SCALE_NAMES[str(m.scales.dtype)],
            "bias": m.bias is not None}


def quant_weights(m: QuantLinear) -> int:
    """Weights multiplied per token: the matrix's, whatever their width."""
    return m.in_features * m.out_features


def describe_quant(spec: dict) -> tuple[str, str]:
    g = spec.get("group_size")
    return f"{spec['out_features']} x {spec['in_features']}", \
        f"int{spec['bits']}" + (f"/g{g}" if g else "") + (" sym" if spec.get("symmetric") else "")


def embedding_spec(m: QuantEmbedding) -> dict:
    return {"type": "quant_embedding", "num_embeddings": m.num_embeddings, "embedding_dim": m.embedding_dim,
            "bits": m.bits, "group_size": m.group_size, "symmetric": m.symmetric,
            "scale_dtype": SCALE_NAMES[str(m.scales.dtype)]}


def describe_embedding(spec: dict) -> tuple[str, str]:
    return describe_quant({**spec, "out_features": spec["num_embeddings"], "in_features": spec["embedding_dim"]})


def tied_head_spec(m: QuantTiedHead) -> dict:
    return {"type": "quant_tied_head", "embeddings": m.embeddings, "in_features": m.in_features,
            "out_features": m.out_features}


def describe_tied_head(spec: dict) -> tuple[str, str]:
    return f"{spec['out_features']} x {spec['in_features']}", f"tied to {spec['embeddings']}"


QUANT = register_module_type(ModuleType("quant", QuantLinear, build_quant, quant_spec, weights=quant_weights,
                                        describe=describe_quant))
# outside the decoder blocks: no units of the plan. A lookup multiplies nothing; the tied head the whole table
QUANT_EMBEDDING = register_module_type(ModuleType("quant_embedding", QuantEmbedding, build_quant_embedding,
                                                  embedding_spec, weights=lambda m: 0, unit=False,
                                                  describe=describe_embedding))
QUANT_TIED_HEAD = register_module_type(ModuleType("quant_tied_head", QuantTiedHead, build_quant_tied_head,
                                                  tied_head_spec, weights=quant_weights, unit=False,
                                                  describe=describe_tied_head))
