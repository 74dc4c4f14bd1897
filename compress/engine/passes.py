"""Streaming cached activations through one block: the only code that runs a block's forward over calibration data
(the block loop, the allocation pre-pass and the unit path all call ``run_pass``)."""
from __future__ import annotations

import torch

from .capture import StopForward
from .stats import stop_after, stop_before


def _forward(block, x, kwargs, stop_module, out, sl, before=False) -> None:
    handle = None if stop_module is None else (stop_before if before else stop_after)(stop_module)
    try:
        y = block(x, **kwargs)
    except StopForward:
        return
    finally:
        if handle is not None:
            handle.remove()
    y = y[0] if isinstance(y, (tuple, list)) else y
    if out is not None:  # a statistics pass whose stop module was not called (an expert no token reached)
        out[sl] = y.to("cpu", out.dtype)


@torch.no_grad()
def run_pass(block, x_in, kwargs, batch_size, device, out=None, stop=None, dense=None, before=False) -> None:
    """Stream the cached inputs through ``block``; write outputs to ``out`` or stop after the module named ``stop``
    (with ``before``: as soon as it is called, once the pre-hooks registered earlier, the statistics, have run).

    ``dense = (dense_block, dense_in, dense_out)`` runs the untouched copy of the block on the dense model's own
    activations first, batch by batch, so hooks can pair dense and compressed inputs of the same tokens.
    """
    mods = dict(block.named_modules())
    dmods = dict(dense[0].named_modules()) if dense else {}
    for s in range(0, x_in.shape[0], batch_size):
        sl = slice(s, s + batch_size)
        if dense:
            _forward(dense[0], dense[1][sl].to(device), kwargs, dmods[stop] if stop else None, dense[2], sl, before)
        _forward(block, x_in[sl].to(device), kwargs, mods[stop] if stop else None, out, sl, before)
