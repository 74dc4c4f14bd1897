"""Training windows for ``lrc finetune``: the text packed into non-overlapping ``seq_len`` windows (rows joined by a
blank line, tokenized once without special tokens), a seeded held-out split, and a seeded order per epoch that a
resumed run recomputes from the step number alone."""
from __future__ import annotations

import torch

from ..calibration import load_rows
from ..errors import LrcError
from ..recipe import CalibrationSource


def packed_windows(tokenizer, data: str, seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    """``(windows, seq_len)`` token ids of ``data`` (a calib/ set or a local file); a one-line error naming the
    data when it does not fill one window."""
    try:
        rows = load_rows(CalibrationSource(dataset=data))
    except LrcError as err:
        raise LrcError(f"finetune.data: {err}".replace("calibration file", "file")) from None
    text = "\n\n".join(r for r in rows if r.strip())
    ids = torch.tensor(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"], dtype=torch.long)
    n = ids.numel() // seq_len
    if n == 0:
        raise LrcError(f"finetune.data: {data}: {ids.numel()} tokens, fewer than one window of {seq_len} "
                       "(more text, or a smaller --seq-len)")
    if max_windows is not None:
        n = min(n, max_windows)
    return ids[: n * seq_len].view(n, seq_len)


def split(windows: torch.Tensor, holdout: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(train, held out)``: ``holdout`` windows drawn by ``seed``; at least one window is left to train on."""
    if holdout >= windows.shape[0]:
        raise LrcError(f"finetune.holdout: {holdout} held-out windows leave none of the {windows.shape[0]} to "
                       "train on (more text, or a smaller --holdout)")
    order = torch.randperm(windows.shape[0], generator=torch.Generator().manual_seed(seed))
    return windows[order[holdout:].sort().values], windows[order[:holdout].sort().values]


def batch_at(train: torch.Tensor, micro: int, batch_size: int, seed: int) -> torch.Tensor:
    """Micro-batch number ``micro`` (counted from the start of training): epochs of a seeded permutation, so the
    same micro-batch index gives the same windows in a resumed run."""
    n = train.shape[0]
    start = micro * batch_size
    rows = []
    while len(rows) < batch_size:
        epoch, offset = divmod(start + len(rows), n)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        rows.append(int(order[offset]))
    return train[rows]


def check_source(data: str) -> None:
    """A one-line error for training text that does not exist (a missing file, an unknown set), before any work."""
    from ..calibration import check_source as check

    check(data, "finetune.data", extra=("selfgen",))
