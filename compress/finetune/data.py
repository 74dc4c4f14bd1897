"""Training windows for ``lrc finetune``: the text packed into non-overlapping ``seq_len`` windows (rows joined by a
blank line, tokenized once without special tokens), a seeded held-out split (by default a tenth of the windows, 1 to
8: ``default_holdout``), and a seeded order per epoch that a resumed run recomputes from the step number alone."""
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


HOLDOUT_CAP = 8  # the default hold-out's ceiling: 10% of the windows up to 80 of them, then 8


def default_holdout(n: int) -> int:
    """The hold-out when none is given: a tenth of the ``n`` windows, at least 1 and at most ``HOLDOUT_CAP`` (8, the
    old fixed default: every text of 80 windows or more, the main job's 128 among them, holds out 8 as before)."""
    return max(1, min(HOLDOUT_CAP, n // 10))


def resolve_holdout(n: int, holdout: int | None, data: str | None = None, seq_len: int | None = None) -> int:
    """The windows to hold out of ``n``: ``holdout``, or ``default_holdout(n)`` when it is None; a one-line error
    unless at least one window is left to train on (naming ``data`` for a text too small for the default)."""
    if holdout is None:
        k = default_holdout(n)
        if k >= n:
            what = f"{data}: " if data else ""
            size = f" of {seq_len} tokens" if seq_len else ""
            raise LrcError(f"finetune.data: {what}{n} window{'s' if n != 1 else ''}{size}, too little text to hold "
                           f"one out and train on another (more text, a smaller --seq-len, or --holdout 0)")
        return k
    if holdout >= n:
        raise LrcError(f"finetune.holdout: {holdout} held-out windows leave none of the {n} to "
                       "train on (more text, or a smaller --holdout)")
    return holdout


def split(windows: torch.Tensor, holdout: int | None, seed: int, data: str | None = None
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(train, held out)``: ``holdout`` windows drawn by ``seed`` (None: ``default_holdout``, sized from the text;
    issue 22); at least one window is left to train on (``resolve_holdout``)."""
    holdout = resolve_holdout(windows.shape[0], holdout, data, windows.shape[1] if windows.dim() == 2 else None)
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
