"""CoSpaDi's module type ``dictionary`` as lrc's registry sees it (``checkpoint/module_types.py``; the class and its
builder are the remote-code file ``lrc_dictionary.py``)."""
from __future__ import annotations

from ...checkpoint.module_types import ModuleType, ReportType, describe_linear
from .lrc_dictionary import DictLinear, build_dictionary


def dictionary_spec(m: DictLinear) -> dict:
    spec = {"type": "dictionary", "in_features": m.in_features, "out_features": m.out_features, "atoms": m.atoms,
            "nnz": m.nnz, "bias": m.bias is not None}
    return spec if m.shared_from is None else {**spec, "shared_from": m.shared_from}


def dictionary_weights(m: DictLinear) -> int:
    """The multiply-adds per token the forward executes (``lrc bench``'s FLOP-ideal speed-up must match what runs):
    ``atoms * (in + out)`` on the factored path (the coefficients densified), ``in * out`` on the dense one. The
    sparse count ``atoms * in + nnz * out`` (CoSpaDi §3.4) would need sparse kernels, which gain little at 50%
    density; every module applies the dictionary to its own input, shared or not."""
    if m.exec_path == "factored":
        return m.atoms * (m.in_features + m.out_features)
    return m.in_features * m.out_features


def describe_dictionary(spec: dict) -> tuple[str, str]:
    """``lrc info``: k atoms, s per output, maybe another layer's dictionary."""
    knob = f"{spec['atoms']} atoms, {spec['nnz']} per output" + \
        (f" (dictionary of {spec['shared_from']})" if spec.get("shared_from") else "")
    return describe_linear(spec)[0], knob


# a DictLinear checks its support mask as it is built: a checkpoint holding one loads whole (``lazy``)
DICTIONARY_MODULE = ModuleType(
    "dictionary", DictLinear, build_dictionary, dictionary_spec, weights=dictionary_weights, lazy=False,
    describe=describe_dictionary, report=ReportType("dictionary", "dictionary", "dictionary + sparse coefficients"))
