"""Shared fixtures: a tiny trained tokenizer, a synthetic corpus, tiny random Llama/Qwen2/Mistral models with GQA,
and the real ``../shared/models/stories260k`` (tests that need ``../shared`` skip when it is absent).

Isolation comes first, before anything below imports huggingface_hub, datasets, transformers or compress: those
read ``HF_HOME``, their cache paths and the stored token ONCE, at import time, so an environment variable set later
(or by monkeypatch in a test) does not hide the machine's login or its cached datasets from the rest of the session.
pytest imports this file before any test module, so every test runs with a throw-away ``LRC_CACHE`` (lrc's
converted models, calibration tokens, sweeps, lm-eval answers) and ``HF_HOME`` (hub cache, datasets cache, token)
under one session temp directory, and no token from the environment.
"""
from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile

_HEAVY = ("huggingface_hub", "datasets", "transformers", "compress")
if any(name in sys.modules for name in _HEAVY):  # too late to isolate: fail loudly instead of leaking ~/.cache
    raise RuntimeError("tests/conftest.py must run before " + ", ".join(n for n in _HEAVY if n in sys.modules)
                       + " is imported (a pytest plugin or -p option imported it first)")
SESSION_TMP = tempfile.mkdtemp(prefix="lrc-tests-")
atexit.register(shutil.rmtree, SESSION_TMP, ignore_errors=True)
for _var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH", "HF_OIDC_RESOURCE", "HF_HUB_CACHE",
             "HUGGINGFACE_HUB_CACHE", "HF_ASSETS_CACHE", "HUGGINGFACE_ASSETS_CACHE", "HF_XET_CACHE",
             "HF_MODULES_CACHE", "TRANSFORMERS_CACHE"):
    os.environ.pop(_var, None)
os.environ["LRC_CACHE"] = os.path.join(SESSION_TMP, "lrc")
os.environ["HF_HOME"] = os.path.join(SESSION_TMP, "hf")
os.environ["HF_DATASETS_CACHE"] = os.path.join(SESSION_TMP, "hf", "datasets")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import json  # noqa: E402
import random  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from compress.recipe import parse_recipe  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LRC_SHARED", ROOT.parent / "shared"))
STORIES = SHARED / "models" / "stories260k"
WORDS = ("the a one little big red blue cat dog bird tree house sun moon girl boy mom dad friend ball park "
         "ran jumped saw found liked wanted played said looked happy sad fast slow and but then so because "
         "very with under over into near far day night time home school water food toy box").split()


def needs_shared(path: Path = STORIES):
    return pytest.mark.skipif(not path.exists(), reason=f"{path} not found: ../shared (lrc's data and models "
                                                        "beside the repository) is absent in this clone")


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` skip, with the reason, where torch sees no CUDA device (CI's CPU machine), unless
    ``LRC_TEST_DEVICE`` names another device for them (``cpu``: the checks themselves tested where no GPU exists)."""
    if torch.cuda.is_available() or os.environ.get("LRC_TEST_DEVICE", "cuda") != "cuda":
        return
    skip = pytest.mark.skip(reason="no CUDA device: GPU tests run on a GPU machine (pytest -m gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def make_corpus(n_rows: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 20))).capitalize() + "."
            for _ in range(n_rows)]


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "corpus.jsonl"
    path.write_text("\n".join(json.dumps({"text": t}) for t in make_corpus()))
    return path


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"])
    tok.train_from_iterator(make_corpus(), trainer)
    from tokenizers import decoders

    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def tiny_config(arch: str, vocab_size: int):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1,
                  eos_token_id=2, tie_word_embeddings=False)
    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}[arch]
    return cls(**common)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer):
    """``tiny_model_dir(arch)`` → a saved random model directory (with tokenizer) for llama, qwen2 or mistral."""
    from transformers import AutoModelForCausalLM

    made: dict[str, Path] = {}

    def make(arch: str) -> Path:
        if arch not in made:
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(tiny_config(arch, len(tokenizer)))
            path = tmp_path_factory.mktemp(f"tiny-{arch}")
            model.save_pretrained(path)
            tokenizer.save_pretrained(path)
            made[arch] = path
        return made[arch]

    return make


def tiny_recipe(corpus: Path, method: str = "svd-llm", samples: int = 8, seq_len: int = 32, generations: int = 0,
                **stage):
    if not any(k in stage for k in ("param_ratio", "rank", "energy")):
        stage["param_ratio"] = 0.6
    engine = {"device": "cpu", "batch_size": 3}
    for key in ("propagate", "sequential", "objective", "dense_damping"):
        if key in stage:
            engine[key] = stage.pop(key)
    return parse_recipe({"calibration": {"dataset": str(corpus), "samples": samples, "seq_len": seq_len},
                         "engine": engine, "stages": [{"method": method, **stage}], "samples": generations})


# a fresh interpreter that cannot import lrc loads a checkpoint through its own remote code and saves the logits of
# the token ids in argv[2] to argv[3]; tests append lines that print what they check about the loaded ``model``
RELOAD_LOGITS = """
import sys
sys.modules["compress"] = None  # lrc must not be importable: the checkpoint carries its own loader
import torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
x = torch.load(sys.argv[2])
with torch.no_grad():
    torch.save(model(x).logits, sys.argv[3])
"""


def reload_logits(checkpoint: Path, x: torch.Tensor, tmp_path: Path) -> torch.Tensor:
    """The logits of ``x`` from ``checkpoint`` loaded in a fresh process that cannot import lrc, with its own
    ``HF_HOME`` (a shared remote-code cache may hold another checkpoint's loader under the same directory name)."""
    import subprocess
    import sys

    torch.save(x, tmp_path / "x.pt")
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", RELOAD_LOGITS, str(checkpoint), str(tmp_path / "x.pt"),
                           str(tmp_path / "y.pt")], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return torch.load(tmp_path / "y.pt")


def kill_at(monkeypatch, at: int, error: BaseException) -> None:
    """Kill-point tests: raise ``error`` at the ``at``-th interruption point of a compression (each progress phase
    and each finished block, counted from 0); ``monkeypatch.undo()`` lifts it."""
    from compress.engine import pipeline
    from compress.progress import Progress

    real, count = Progress.phase, {"n": 0}

    def maybe_kill(self, text=None):
        if count["n"] == at:
            raise error
        count["n"] += 1
        if text is not None:
            return real(self, text)

    monkeypatch.setattr(Progress, "phase", lambda self, text: maybe_kill(self, text))
    monkeypatch.setattr(pipeline, "after_block", lambda i: maybe_kill(None))


class Crash(RuntimeError):
    """The failure ``resume_after_crash`` injects."""


def resume_after_crash(monkeypatch, model: str, recipe, out: Path, cache_dir: Path, reference: Path,
                       after: int = 1) -> dict:
    """A compression of ``model`` killed once block ``after`` is saved, then resumed with its run cache: asserts it
    resumed from the next block and that its weights and config are the bytes of ``reference`` (an uninterrupted
    run's checkpoint); returns the resumed run's report."""
    from compress import api
    from compress.engine import pipeline

    def crash(i):
        if i == after:
            raise Crash(f"injected failure after block {after}")

    monkeypatch.setattr(pipeline, "after_block", crash)
    with pytest.raises(Crash):
        api.compress(model, recipe, out, cache_dir=cache_dir, progress=False)
    monkeypatch.setattr(pipeline, "after_block", lambda i: None)
    _, report = api.compress(model, recipe, out, resume=True, cache_dir=cache_dir, progress=False)
    assert report["resumed_from_block"] == after + 1
    for name in ("model.safetensors", "config.json"):
        assert (Path(out) / name).read_bytes() == (Path(reference) / name).read_bytes(), name
    return report
