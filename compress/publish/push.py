"""``lrc push``: write the model card, then ``create_repo(exist_ok=True)`` and ``upload_folder`` with huggingface_hub.

The token comes from ``--token``, ``$HF_TOKEN`` or a stored ``hf auth login``; it is handed to huggingface_hub only and
scrubbed from any error lrc prints.
"""
from __future__ import annotations

import os
from pathlib import Path

from ..errors import LrcError
from ..models import is_lrc_checkpoint
from .card import MARKER, model_card

IGNORE = ["*.tmp", ".tmp-*", ".cache/*", "__pycache__/*"]


def resolve_token(token: str | None) -> str | None:
    if token:
        return token
    if os.environ.get("HF_TOKEN"):
        return os.environ["HF_TOKEN"]
    from huggingface_hub import get_token

    return get_token()


def write_card(checkpoint: Path, repo_id: str, base_model: str | None = None) -> tuple[str, bool]:
    """Write README.md unless the user replaced lrc's card with their own; return (card text, written?)."""
    card_path = checkpoint / "README.md"
    if card_path.is_file() and MARKER not in card_path.read_text():
        return card_path.read_text(), False
    text = model_card(checkpoint, repo_id, base_model)
    tmp = card_path.with_suffix(".md.tmp")
    tmp.write_text(text)
    tmp.replace(card_path)
    return text, True


def files_to_upload(checkpoint: Path) -> list[tuple[str, int]]:
    from fnmatch import fnmatch

    files = []
    for f in sorted(checkpoint.rglob("*")):
        rel = f.relative_to(checkpoint).as_posix()
        if f.is_file() and not any(fnmatch(rel, pat) for pat in IGNORE):
            files.append((rel, f.stat().st_size))
    return files


def push(checkpoint: str | Path, repo_id: str, private: bool = False, token: str | None = None,
         dry_run: bool = False, endpoint: str | None = None, base_model: str | None = None,
         commit_message: str | None = None) -> dict:
    """Publish an lrc checkpoint. Returns ``{"repo_id", "files", "card_written", "url"?}``."""
    checkpoint = Path(checkpoint)
    if not is_lrc_checkpoint(checkpoint):
        raise LrcError(f"{checkpoint}: not an lrc checkpoint (no config.json with an 'lrc' section)")
    if repo_id.count("/") > 1 or not repo_id.strip("/") or " " in repo_id:
        raise LrcError(f"REPO_ID: {repo_id!r} is not a hub repository id (expected 'owner/name' or 'name')")
    secret = resolve_token(token)
    if not dry_run and not secret:
        raise LrcError("no Hugging Face token: pass --token, set HF_TOKEN, or run `hf auth login` first")
    if dry_run:  # show the card that would be written, touch nothing
        card, written = model_card(checkpoint, repo_id, base_model), False
    else:
        card, written = write_card(checkpoint, repo_id, base_model)
    result = {"repo_id": repo_id, "private": private, "files": files_to_upload(checkpoint),
              "card_written": written, "card": card, "dry_run": dry_run}
    if dry_run:
        if not (checkpoint / "README.md").is_file():
            result["files"] = sorted(result["files"] + [("README.md", len(card.encode()))])
        return result
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi(endpoint=endpoint, token=secret)
    try:
        url = api.create_repo(repo_id, private=True if private else None, exist_ok=True, repo_type="model")
        commit = api.upload_folder(folder_path=str(checkpoint), repo_id=repo_id, repo_type="model",
                                   ignore_patterns=IGNORE,
                                   commit_message=commit_message or "Upload lrc compressed checkpoint")
    except Exception as err:  # noqa: BLE001 - network errors come from whichever HTTP client huggingface_hub uses
        if not (isinstance(err, (HfHubHTTPError, OSError, ValueError)) or _is_http_client_error(err)):
            raise
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise LrcError(f"push to {repo_id} failed: {msg.replace(secret, '***')}") from None
    result.update({"url": str(url), "commit": getattr(commit, "oid", None)})
    return result


def _is_http_client_error(err: Exception) -> bool:
    return type(err).__module__.split(".")[0] in ("httpx", "httpx2", "requests", "urllib3", "aiohttp")
