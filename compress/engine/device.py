"""Where the engine computes: ``resolve_device`` turns ``engine.device`` (or ``--device``) into a torch device."""
from __future__ import annotations

import torch

from ..errors import LrcError


def resolve_device(name: str) -> torch.device:
    """``auto``: CUDA when torch sees a device, else the CPU. A CUDA device that is not there is a one-line error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise LrcError(f"device {name!r}: not a torch device (auto, cpu, cuda, cuda:N)") from None
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise LrcError(f"device {name!r}: torch sees {torch.cuda.device_count() if torch.cuda.is_available() else 'no'}"
                       " CUDA device(s) here (torch " + torch.__version__ + "); use cpu or auto")
    return device
