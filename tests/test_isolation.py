"""The test session never reads or writes the machine's caches or Hugging Face login (tests/conftest.py)."""
import os
import subprocess
import sys
from pathlib import Path

import conftest

ROOT = Path(__file__).resolve().parents[1]


def _inside(path, root=conftest.SESSION_TMP) -> bool:
    return Path(path).resolve().is_relative_to(Path(root).resolve())


def test_caches_and_token_live_in_the_session_temp_dir():
    """Read back what the libraries actually resolved at import time (an env var set after their import would not
    show here): hub home, hub cache, token files, datasets and modules caches, lrc's cache; and no token at all."""
    import datasets.config
    import huggingface_hub
    import huggingface_hub.constants as hc
    import transformers.utils.hub as th

    from compress.models import cache_root

    for path in (hc.HF_HOME, hc.HF_HUB_CACHE, hc.HF_TOKEN_PATH, hc.HF_STORED_TOKENS_PATH, hc.HF_ASSETS_CACHE,
                 hc.HF_XET_CACHE, datasets.config.HF_DATASETS_CACHE, datasets.config.HF_MODULES_CACHE,
                 th.HF_MODULES_CACHE, cache_root()):
        assert _inside(path), path
    assert not _inside(hc.HF_HOME, Path.home())
    assert huggingface_hub.get_token() is None
    assert "HF_TOKEN" not in os.environ and "HUGGING_FACE_HUB_TOKEN" not in os.environ


def test_a_planted_login_and_cache_are_not_seen(tmp_path):
    """The same checks in a child pytest whose environment carries a token, a HF_HOME with a stored token file and
    an LRC_CACHE: conftest must hide all three (this fails if conftest only used setdefault, or ran too late)."""
    home = tmp_path / "hf_home"
    home.mkdir()
    (home / "token").write_text("hf_planted_in_file")
    env = {**os.environ, "HF_HOME": str(home), "HF_TOKEN": "hf_planted_in_env", "LRC_CACHE": str(tmp_path / "lrc"),
           "HF_DATASETS_CACHE": str(tmp_path / "ds"), "HF_HUB_CACHE": str(tmp_path / "hub")}
    test = f"{Path(__file__).relative_to(ROOT)}::test_caches_and_token_live_in_the_session_temp_dir"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "1 passed" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert not (tmp_path / "lrc").exists() and not (tmp_path / "ds").exists()
