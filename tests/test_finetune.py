"""``lrc finetune`` (compress/finetune/): only the chosen parameters train (the frozen ones stay bit for bit and get
no optimizer state), the loss falls on a tiny model, a run resumed after a crash ends on the same weights as an
uninterrupted one, the result reloads, and bad data is a one-line error."""
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import compress
from compress import api
from compress.cli import app
from compress.errors import LrcError
from compress.finetune import FinetuneConfig
from compress.finetune.run import finetune
from compress.finetune.loop import STATE_FILE
from compress.finetune.params import select
from conftest import STORIES, WORDS, needs_shared, tiny_recipe


@pytest.fixture(scope="module")
def checkpoint(tiny_model_dir, corpus_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("ft") / "svd-llm-50"
    api.compress(str(tiny_model_dir("llama")), tiny_recipe(corpus_file, param_ratio=0.5), out,
                 cache_dir=out.parent / "cache", progress=False, return_model=False)
    return out


def _cfg(corpus_file, **kw):
    base = dict(data=str(corpus_file), steps=6, lr=1e-3, warmup=1, batch_size=4, seq_len=32, holdout=4,
                eval_every=3, save_every=2)
    return FinetuneConfig(**{**base, **kw})


def test_only_lrc_modules_train(checkpoint, corpus_file, tmp_path, monkeypatch):
    monkeypatch.setenv("LRC_CACHE", str(tmp_path / "lrc"))
    report = finetune(str(checkpoint), _cfg(corpus_file), tmp_path / "out", device="cpu")
    before, after = load_file(checkpoint / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    trained = set(select(compress.load(checkpoint), "lrc"))
    assert trained and all(".first." in n or ".second." in n for n in trained)
    assert before.keys() == after.keys()
    for name in before:
        if name in trained:
            assert not torch.equal(before[name], after[name]), name
        else:
            assert torch.equal(before[name], after[name]), name  # frozen: bit for bit
    ft = report["finetune"]
    assert ft["trained_params"] == sum(before[n].numel() for n in trained) < ft["total_params"]
    assert ft["held_out_loss_after"] < ft["held_out_loss_before"]  # the loss falls
    assert [c["step"] for c in ft["curve"]] == list(range(1, 7)) and "held_out_loss" in ft["curve"][2]


def test_optimizer_state_covers_only_trained_parameters(checkpoint, corpus_file, tmp_path, monkeypatch):
    from compress.finetune.run import run_state

    monkeypatch.setenv("LRC_CACHE", str(tmp_path / "lrc"))
    cfg = _cfg(corpus_file, train="lrc")
    assert finetune(str(checkpoint), cfg, tmp_path / "out", device="cpu", stop_at=3) == {"interrupted_at": 3}
    assert not (tmp_path / "out").exists()  # nothing half-written
    state = torch.load(run_state(checkpoint, tmp_path / "out", cfg) / STATE_FILE, weights_only=False)
    n = len(select(compress.load(checkpoint), "lrc"))
    assert state["step"] == 2 and len(state["params"]) == n and len(state["optimizer"]["state"]) == n


def test_resume_after_a_crash_ends_on_the_same_weights(checkpoint, corpus_file, tmp_path, monkeypatch):
    monkeypatch.setenv("LRC_CACHE", str(tmp_path / "lrc"))
    cfg = _cfg(corpus_file, grad_accum=2)
    finetune(str(checkpoint), cfg, tmp_path / "whole", device="cpu")
    finetune(str(checkpoint), cfg, tmp_path / "resumed", device="cpu", stop_at=5)  # the state of step 4 stays
    report = finetune(str(checkpoint), cfg, tmp_path / "resumed", device="cpu", resume=True)
    assert report["finetune"]["resumed_from"] == 4
    a, b = load_file(tmp_path / "whole" / "model.safetensors"), load_file(tmp_path / "resumed" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    model = compress.load(tmp_path / "resumed")  # the same structure, reloadable
    assert type(model.model.layers[0].mlp.up_proj).__name__ == "LowRankLinear"


def test_bad_data_is_one_line(checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("LRC_CACHE", str(tmp_path / "lrc"))
    short = tmp_path / "short.txt"
    short.write_text("too little text")
    with pytest.raises(LrcError, match="short.txt.*fewer than one window"):
        finetune(str(checkpoint), FinetuneConfig(data=str(short), seq_len=64), tmp_path / "out", device="cpu")
    result = CliRunner().invoke(app, ["finetune", str(checkpoint), "--data", str(short), "--out",
                                      str(tmp_path / "out"), "--seq-len", "64"])
    assert result.exit_code != 0 and result.output.strip().count("\n") == 0  # the data fails before the model loads
    assert result.output.startswith("error:") and "short.txt" in result.output
    assert not (tmp_path / "out").exists()
    result = CliRunner().invoke(app, ["finetune", str(checkpoint), "--data", str(short), "--out",
                                      str(tmp_path / "out"), "--train", "everything"])
    assert result.exit_code != 0 and "train" in result.output
    with pytest.raises(LrcError, match="finetune.data: .*missing.txt: file not found"):
        finetune(str(checkpoint), FinetuneConfig(data=str(tmp_path / "missing.txt")), tmp_path / "out", device="cpu")


def test_distill_loss_is_the_kl_divergence():
    torch.manual_seed(0)
    a, b = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    from compress.finetune.loop import distill_loss

    p, q = torch.softmax(b, -1), torch.softmax(a, -1)
    brute = sum(float((p[i, j] * (p[i, j] / q[i, j]).log()).sum()) for i in range(2) for j in range(5)) / 10
    assert abs(float(distill_loss(a, b)) - brute) < 1e-5
    assert float(distill_loss(b, b)) == pytest.approx(0, abs=1e-6)


@needs_shared()
def test_distillation_moves_the_model_towards_its_teacher(tmp_path, monkeypatch):
    """loss distill on the real stories260k at 0.4 kept: the teacher defaults to the model the checkpoint was
    compressed from, and the KL to it falls."""
    from compress.finetune.data import packed_windows
    from compress.finetune.loop import distill_loss
    from compress.models import load_model

    monkeypatch.setenv("LRC_CACHE", str(tmp_path / "lrc"))
    text = tmp_path / "stories.txt"
    teacher, tok, _ = load_model(str(STORIES))
    text.write_text("\n\n".join(WORDS[i % len(WORDS)] + " " + " ".join(WORDS[(i * 7 + j) % len(WORDS)]
                                                                     for j in range(60)) for i in range(60)))
    ckpt = tmp_path / "ckpt"
    api.compress(str(STORIES), tiny_recipe(text, param_ratio=0.4, samples=16, seq_len=64), ckpt,
                 cache_dir=tmp_path / "c", progress=False, return_model=False)
    cfg = FinetuneConfig(data=str(text), loss="distill", steps=10, lr=1e-3, warmup=1, batch_size=4, seq_len=64,
                         holdout=4)
    report = finetune(str(ckpt), cfg, tmp_path / "out", device="cpu")
    assert report["finetune"]["teacher"] == str(STORIES) and report["finetune"]["loss"] == "distill"
    x = packed_windows(tok, str(text), 64)[-4:]
    with torch.no_grad():
        t = teacher(x).logits
        kl = [float(distill_loss(compress.load(d)(x).logits, t)) for d in (ckpt, tmp_path / "out")]
    assert kl[1] < 0.8 * kl[0]


def test_sequential_factors_train_u_then_v(checkpoint, corpus_file, tmp_path):
    """SVD-LLM's order: the first half of the steps moves only the U factors (second), the second half the V's."""
    from compress.finetune.data import packed_windows, split
    from compress.finetune.loop import train

    model = compress.load(checkpoint)
    tok = __import__("transformers").AutoTokenizer.from_pretrained(checkpoint)
    windows, held = split(packed_windows(tok, str(corpus_file), 32), 2, 0)
    trained = select(model, "lrc")
    start = {n: p.detach().clone() for n, p in trained.items()}
    cfg = _cfg(corpus_file, steps=4, factors="sequential", save_every=1)
    assert train(model, trained, windows, held, cfg, "cpu", tmp_path, stop_at=2) == {"interrupted_at": 2}
    moved = {n for n, p in trained.items() if not torch.equal(p, start[n])}
    assert moved and moved == {n for n in trained if ".second." in n}
    train(model, trained, windows, held, cfg, "cpu", tmp_path, resume=True)
    assert all(not torch.equal(p, start[n]) for n, p in trained.items())


def test_selfgen_training_text_comes_from_the_teacher(checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("LRC_CACHE", str(tmp_path / "lrc"))
    cfg = FinetuneConfig(data="selfgen", selfgen_samples=6, seq_len=24, holdout=2, steps=2, batch_size=2)
    ft = finetune(str(checkpoint), cfg, tmp_path / "out", device="cpu")["finetune"]
    assert ft["train_windows"] == 4 and ft["held_out_windows"] == 2 and ft["teacher"]
    assert len(list((tmp_path / "lrc" / "tokens").glob("*.safetensors"))) == 1  # cached like calibration tokens


def test_recipe_section_finetunes_before_the_checkpoint_is_written(tiny_model_dir, corpus_file, tmp_path,
                                                                   monkeypatch):
    """A recipe's finetune section trains the compressed model inside lrc compress; the summary, report and card
    show it and the sample generations (dense beside compressed)."""
    from compress.publish.card import model_card
    from compress.report import summary_table

    monkeypatch.setenv("LRC_CACHE", str(tmp_path / "lrc"))
    model = str(tiny_model_dir("llama"))
    recipe = tiny_recipe(corpus_file, param_ratio=0.5, generations=2)
    tuned = recipe.model_copy(update={"finetune": _cfg(corpus_file, steps=3)})
    _, plain = api.compress(model, recipe, tmp_path / "plain", cache_dir=tmp_path / "c", progress=False)
    _, report = api.compress(model, tuned, tmp_path / "tuned", cache_dir=tmp_path / "c", progress=False)
    ft = report["finetune"]
    assert ft["steps"] == 3 and ft["held_out_loss_after"] < ft["held_out_loss_before"] and "finetune" not in plain
    a, b = load_file(tmp_path / "plain" / "model.safetensors"), load_file(tmp_path / "tuned" / "model.safetensors")
    changed = {k for k in a if not torch.equal(a[k], b[k])}
    assert changed and all(".first." in k or ".second." in k for k in changed)
    rows = report["samples"]["rows"]
    assert len(rows) == 2 and all(set(r) == {"prompt", "compressed", "dense"} for r in rows)
    card = model_card(tmp_path / "tuned", "me/tiny")
    assert "## Fine-tuning" in card and "## Sample generations" in card and rows[0]["prompt"] in card
    assert any("fine-tuned" in str(c) for c in summary_table(report).columns[0]._cells)
    assert type(compress.load(tmp_path / "tuned").model.layers[0].mlp.up_proj).__name__ == "LowRankLinear"


def test_recipe_with_missing_training_text_fails_before_compressing(tiny_model_dir, corpus_file, tmp_path):
    recipe = tiny_recipe(corpus_file).model_copy(update={"finetune": FinetuneConfig(data=str(tmp_path / "no.txt"))})
    with pytest.raises(LrcError, match="finetune.data: .*no.txt: file not found"):
        api.compress(str(tiny_model_dir("llama")), recipe, tmp_path / "out", cache_dir=tmp_path / "c",
                     progress=False)
    assert not (tmp_path / "out").exists()


def test_finetune_data_override_needs_a_finetune_section(tiny_model_dir, tmp_path):
    from conftest import ROOT

    recipe = api.with_overrides(compress.recipe.load_recipe(ROOT / "recipes" / "svd-llm-60-ft.yaml"), "r",
                                finetune__data="my.txt")
    assert recipe.finetune.data == "my.txt" and recipe.finetune.train == "lrc"
    result = CliRunner().invoke(app, ["compress", str(tiny_model_dir("llama")), "--recipe",
                                      str(ROOT / "recipes" / "svd-llm.yaml"), "--finetune-data", "my.txt", "--out",
                                      str(tmp_path / "out")])
    assert result.exit_code != 0 and "has no finetune section for --finetune-data" in result.output
    assert result.output.strip().count("\n") == 0 and not (tmp_path / "out").exists()


def test_bf16_model_trains_fp32_masters(checkpoint, corpus_file, tiny_model_dir, tmp_path, monkeypatch):
    """Issue 22 (6): a model held in bf16 (recipe model.dtype bfloat16) trains fp32 master weights with fp32 AdamW
    state, as FinetuneConfig promises; the model itself, and the checkpoint written from it, stay bf16."""
    from compress.finetune.run import train_model

    monkeypatch.setenv("LRC_CACHE", str(tmp_path / "lrc"))
    model = compress.load(checkpoint, dtype="bfloat16")
    tok = __import__("transformers").AutoTokenizer.from_pretrained(checkpoint)
    cfg = _cfg(corpus_file, steps=4, save_every=1, lr=1e-2)
    state = tmp_path / "state"
    assert train_model(model, tok, cfg, "cpu", state, stop_at=2) == {"interrupted_at": 2}
    saved = torch.load(state / STATE_FILE, weights_only=False)
    assert saved["params"] and {p.dtype for p in saved["params"].values()} == {torch.float32}
    moments = [s[k] for s in saved["optimizer"]["state"].values() for k in ("exp_avg", "exp_avg_sq")]
    assert moments and {m.dtype for m in moments} == {torch.float32}
    # the masters hold what bf16 cannot: updates smaller than a bf16 step accumulate instead of rounding away
    assert any(not torch.equal(p, p.bfloat16().float()) for p in saved["params"].values())
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}  # the model stays in its dtype
    record = train_model(model, tok, cfg, "cpu", state, resume=True)
    assert record["resumed_from"] == 2 and {p.dtype for p in model.parameters()} == {torch.bfloat16}
    # the recipe path: model.dtype bfloat16 and a finetune section write a bf16 checkpoint, trained
    recipe = tiny_recipe(corpus_file, param_ratio=0.5)
    recipe = recipe.model_copy(update={"model": recipe.model.model_copy(update={"dtype": "bfloat16"}),
                                       "finetune": _cfg(corpus_file, steps=3)})
    _, report = api.compress(str(tiny_model_dir("llama")), recipe, tmp_path / "tuned", cache_dir=tmp_path / "c",
                             progress=False)
    assert report["finetune"]["steps"] == 3
    weights = load_file(tmp_path / "tuned" / "model.safetensors")
    assert {t.dtype for t in weights.values() if t.is_floating_point()} == {torch.bfloat16}


def test_state_is_keyed_by_the_output(checkpoint, corpus_file, tmp_path, monkeypatch):
    """Issue 22 (7): two runs from one checkpoint to different outputs keep separate resumable states; the one that
    finishes first removes only its own."""
    from compress.finetune.run import run_state

    monkeypatch.setenv("LRC_CACHE", str(tmp_path / "lrc"))
    cfg = _cfg(corpus_file)
    assert run_state(checkpoint, tmp_path / "a", cfg) != run_state(checkpoint, tmp_path / "b", cfg)
    assert finetune(str(checkpoint), cfg, tmp_path / "a", device="cpu", stop_at=3) == {"interrupted_at": 3}
    assert (run_state(checkpoint, tmp_path / "a", cfg) / STATE_FILE).is_file()
    finetune(str(checkpoint), cfg, tmp_path / "b", device="cpu")  # another output, run to the end
    assert not run_state(checkpoint, tmp_path / "b", cfg).exists()  # its own state removed...
    assert (run_state(checkpoint, tmp_path / "a", cfg) / STATE_FILE).is_file()  # ...the other's kept
    report = finetune(str(checkpoint), cfg, tmp_path / "a", device="cpu", resume=True)
    assert report["finetune"]["resumed_from"] == 2
    assert not run_state(checkpoint, tmp_path / "a", cfg).exists()


def test_lrc_trains_every_module_lrc_built_modegpt(tiny_model_dir, corpus_file, tmp_path, monkeypatch):
    """Issue 22 (9): train lrc on a MoDeGPT checkpoint trains what the method built, as the checkpoint records it
    (lrc.modules): the rebuilt attention and the resized MLP Linears (plain nn.Linear, spec type dense); what lrc
    left untouched (embeddings, norms, head) stays frozen."""
    monkeypatch.setenv("LRC_CACHE", str(tmp_path / "lrc"))
    ckpt = tmp_path / "modegpt"
    recipe = tiny_recipe(corpus_file, "modegpt", param_ratio=0.7, allocator="uniform",
                         options={"modules": ["mlp", "qk", "vo"]})
    api.compress(str(tiny_model_dir("llama")), recipe, ckpt, cache_dir=tmp_path / "c", progress=False,
                 return_model=False)
    model = compress.load(ckpt)
    specs = model.config.lrc["modules"]
    up = model.model.layers[0].mlp.up_proj
    assert type(up) is torch.nn.Linear and up.out_features < 96  # resized, a plain Linear
    assert {s["type"] for s in specs.values()} == {"dense", "attention"}
    trained = select(model, "lrc")
    built = {f"{name}.{p}" for name in specs for p, _ in model.get_submodule(name).named_parameters()}
    assert set(trained) == built
    assert {f"model.layers.{i}.mlp.{m}.weight" for i in range(3) for m in ("gate_proj", "up_proj", "down_proj")} \
        <= set(trained)
    assert not any("embed" in n or "norm" in n or "lm_head" in n for n in trained)
    report = finetune(str(ckpt), _cfg(corpus_file, steps=2), tmp_path / "out", device="cpu")
    n_mlp = sum(p.numel() for n, p in trained.items() if ".mlp." in n)
    assert report["finetune"]["trained_params"] == sum(p.numel() for p in trained.values()) > 2 * n_mlp / 1.5
    before, after = load_file(ckpt / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    assert not torch.equal(before["model.layers.0.mlp.up_proj.weight"], after["model.layers.0.mlp.up_proj.weight"])
    assert torch.equal(before["model.embed_tokens.weight"], after["model.embed_tokens.weight"])


def test_default_holdout_is_sized_from_the_text():
    """Issue 22 (5.2): without --holdout, a tenth of the windows, at least 1 and at most 8 (the main job's 128
    selfgen windows still hold out 8); an explicit holdout is kept."""
    from compress.finetune.data import default_holdout, split

    assert [default_holdout(n) for n in (2, 5, 19, 20, 79, 80, 128, 10_000)] == [1, 1, 1, 2, 7, 8, 8, 8]
    train, held = split(torch.arange(10).view(5, 2), None, 0)
    assert (train.shape[0], held.shape[0]) == (4, 1)
    assert split(torch.arange(20).view(10, 2), 3, 0)[1].shape[0] == 3
    with pytest.raises(LrcError, match="finetune.holdout: 8 held-out windows leave none of the 5"):
        split(torch.arange(10).view(5, 2), 8, 0)


def test_small_data_file_trains_and_one_window_is_one_line(checkpoint, tmp_path, monkeypatch):
    """Issue 22 (5.2): a small --data file trains with the default hold-out; a file of one window (none left to train
    on once one is held out) is a one-line error before the model loads."""
    from compress.finetune.data import packed_windows
    from conftest import make_corpus

    monkeypatch.setenv("LRC_CACHE", str(tmp_path / "lrc"))
    small = tmp_path / "small.txt"
    small.write_text("\n\n".join(make_corpus(10)))
    tok = __import__("transformers").AutoTokenizer.from_pretrained(checkpoint)
    n = packed_windows(tok, str(small), 32).shape[0]
    assert 2 <= n <= 8  # fewer than the old default hold-out of 8
    ft = finetune(str(checkpoint), FinetuneConfig(data=str(small), seq_len=32, steps=2, batch_size=2), tmp_path / "out",
                  device="cpu")["finetune"]
    assert (ft["held_out_windows"], ft["train_windows"]) == (1, n - 1) and ft["config"]["holdout"] is None
    tokens = packed_windows(tok, str(small), 2).numel()
    result = CliRunner().invoke(app, ["finetune", str(checkpoint), "--data", str(small), "--out",
                                      str(tmp_path / "one"), "--seq-len", str(tokens)])  # exactly one window
    assert result.exit_code != 0 and result.output.strip().count("\n") == 0, result.output
    assert result.output.startswith("error:") and "small.txt" in result.output and "1 window" in result.output
    assert not (tmp_path / "one").exists()


@needs_shared()
def test_streamed_teacher_gives_the_same_logits_and_training(tmp_path, monkeypatch):
    """The distillation teacher streams its blocks (one in memory per forward, read again from its safetensors):
    its logits equal the whole model's bit for bit, so a distillation trains to the same weights, byte for byte, as
    with the whole teacher in memory (which it no longer holds: issue 22, the fine-tune's peak memory)."""
    import compress.finetune.run as ft
    from compress.models import load_model

    monkeypatch.setenv("LRC_CACHE", str(tmp_path / "lrc"))
    streamed = ft.streamed_teacher(str(STORIES), "float32")
    whole = load_model(str(STORIES))[0]
    x = torch.randint(0, 500, (2, 40))
    with torch.no_grad():
        assert torch.equal(streamed(x).logits, whole(x).logits)
    assert all(p.is_meta for p in streamed.model.layers.parameters())  # every block given back
    text = tmp_path / "stories.txt"
    text.write_text("\n\n".join(" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(60)) for i in range(40)))
    ckpt = tmp_path / "ckpt"
    api.compress(str(STORIES), tiny_recipe(text, param_ratio=0.5, samples=8, seq_len=64), ckpt,
                 cache_dir=tmp_path / "c", progress=False, return_model=False)
    cfg = FinetuneConfig(data=str(text), loss="distill", steps=3, lr=1e-3, warmup=1, batch_size=2, seq_len=64,
                         holdout=2)
    used = []
    real = ft.streamed_teacher
    monkeypatch.setattr(ft, "streamed_teacher", lambda *a: used.append(1) or real(*a))
    finetune(str(ckpt), cfg, tmp_path / "a", device="cpu")
    monkeypatch.setattr(ft, "streamed_teacher", lambda *a: None)  # the whole teacher, as before
    finetune(str(ckpt), cfg, tmp_path / "b", device="cpu")
    assert used
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
