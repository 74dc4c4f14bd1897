"""Architectures beyond the Llama family: per-layer attention types (sliding vs full windows: Gemma2, Gemma3,
Qwen2 with ``use_sliding_window``) and mixture-of-experts blocks (Mixtral, Qwen2-MoE, and Linear experts)."""
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from compress import api
from compress.calibration import calibration_tokens
from compress.engine import pipeline, spectra
from compress.errors import LrcError
from compress.plan import make_plan
from compress.recipe import parse_recipe
from conftest import tiny_recipe

WINDOW = 8  # calibration windows below are 32 and 20 tokens: the sliding layers see only part of the context
COMMON = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
              head_dim=16, max_position_embeddings=128, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)


def sliding_config(arch: str, vocab: int):
    from transformers import Gemma2Config, Gemma3TextConfig, Qwen2Config

    if arch == "gemma2":  # sliding, full, sliding
        return Gemma2Config(vocab_size=vocab, sliding_window=WINDOW, **COMMON)
    if arch == "gemma3":  # full attention first (block 0's kwargs are the full ones), other rope base when local
        return Gemma3TextConfig(vocab_size=vocab, sliding_window=WINDOW, **COMMON,
                                layer_types=["full_attention", "sliding_attention", "sliding_attention"])
    # max_window_layers=1: block 0 full attention, blocks 1 and 2 sliding
    return Qwen2Config(vocab_size=vocab, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1,
                       **COMMON)


def moe_config(arch: str, vocab: int):
    from transformers import MixtralConfig, Qwen2MoeConfig

    common = {**COMMON, "num_hidden_layers": 2}
    if arch == "mixtral":
        return MixtralConfig(vocab_size=vocab, num_local_experts=4, num_experts_per_tok=2, **common)
    return Qwen2MoeConfig(vocab_size=vocab, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                          shared_expert_intermediate_size=48, **common)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    made: dict[str, Path] = {}

    def make(arch: str) -> Path:
        if arch not in made:
            torch.manual_seed(0)
            cfg = moe_config(arch, len(tokenizer)) if arch in ("mixtral", "qwen2_moe") else \
                sliding_config(arch, len(tokenizer))
            path = tmp_path_factory.mktemp(arch)
            AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
            tokenizer.save_pretrained(path)
            made[arch] = path
        return made[arch]

    return make


def _load(path):
    return AutoModelForCausalLM.from_pretrained(path).eval()


@torch.no_grad()
def layer_outputs(model, ids) -> list[torch.Tensor]:
    """Each decoder layer's output in a plain forward of the model (transformers' own per-layer arguments)."""
    outs: dict[int, torch.Tensor] = {}
    layers = model.model.layers
    hooks = [m.register_forward_hook(lambda mod, a, o, i=i: outs.__setitem__(i, o[0] if isinstance(o, tuple) else o))
             for i, m in enumerate(layers)]
    try:
        model(ids, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return [outs[i] for i in range(len(layers))]


def record_block_outputs(monkeypatch, cache_dir: Path, streams: dict[str, tuple], seen: dict) -> None:
    """After each finished block i, read what the engine wrote as block i+1's inputs for every stream."""
    def after(i):
        for name, shape in streams.items():
            path = next(Path(cache_dir).glob(f"runs/*/{name}_{i + 1}.bin"))
            seen[(name, i)] = torch.from_numpy(np.fromfile(path, dtype=np.float32).reshape(shape).copy())

    monkeypatch.setattr(pipeline, "after_block", after)


def noop_recipe(corpus, seq_len=32, second_seq_len=20):
    """Two stages that keep every matrix dense (rank 64 saves nothing), the second on its own calibration stream with
    another sequence length: the engine's propagation is then exactly the dense model's forward."""
    cal = {"dataset": str(corpus), "samples": 4, "seq_len": seq_len}
    return parse_recipe({
        "calibration": cal, "engine": {"device": "cpu", "batch_size": 3},
        "stages": [{"method": "svd-llm", "rank": 64, "targets": ["self_attn"]},
                   {"method": "svd-llm", "rank": 64, "targets": ["mlp"],
                    "calibration": {**cal, "samples": 3, "seq_len": second_seq_len}}]})


@pytest.mark.parametrize("arch", ["gemma2", "gemma3", "qwen2"])
def test_every_block_runs_with_its_own_attention_arguments(arch, model_dir, tokenizer, corpus_file, tmp_path,
                                                           monkeypatch):
    """The engine's propagated activations of both calibration streams equal the model's own layer outputs; with
    block 0's mask (or rotary tables) reused, the blocks of the other attention type differ by O(1)."""
    model = _load(model_dir(arch))
    assert len(set(model.config.layer_types)) == 2  # the config really mixes sliding and full layers
    recipe = noop_recipe(corpus_file)
    cache = tmp_path / "cache"
    seen: dict = {}
    record_block_outputs(monkeypatch, cache, {"acts": (4, 32, 64), "stage1": (3, 20, 64)}, seen)
    report = api.compress_model(model, recipe, tokenizer, cache_dir=cache)
    assert report["targeted"]["factorized"] == 0  # nothing changed: any difference is the engine's propagation
    reference = _load(model_dir(arch))
    for stream, cfg in (("acts", recipe.calibration), ("stage1", recipe.stages[1].calibration)):
        ids = calibration_tokens(reference, tokenizer, cfg, cache, 3)
        assert ids.shape[1] > WINDOW
        for i, want in enumerate(layer_outputs(reference, ids)):
            torch.testing.assert_close(seen[(stream, i)], want, rtol=1e-4, atol=1e-4,
                                       msg=lambda m: f"{stream}, block {i}: {m}")


def test_block_arguments_are_kept_once_per_attention_type(model_dir, tokenizer, corpus_file, tmp_path):
    """Blocks of one attention type share one set of arguments (in memory and in the run cache): two sets for any
    depth, the rotary tables that both types use stored once."""
    from compress.engine.capture import BlockKwargs, capture_block_inputs
    from compress.plan import find_blocks

    model = _load(model_dir("qwen2"))
    ids = calibration_tokens(model, tokenizer, tiny_recipe(corpus_file).calibration, tmp_path, 3)
    kwargs = capture_block_inputs(model, find_blocks(model)[1], ids, torch.empty(8, 32, 64), 3, "cpu")
    assert kwargs.index == [0, 1, 1] and kwargs[0]["attention_mask"] is None
    assert kwargs[1]["attention_mask"].shape == (1, 1, 32, 32)
    assert kwargs[0]["position_embeddings"][0] is kwargs[2]["position_embeddings"][0]
    torch.save(kwargs.state(), tmp_path / "kwargs.pt")
    again = BlockKwargs.from_state(torch.load(tmp_path / "kwargs.pt", weights_only=True))
    assert again.index == [0, 1, 1] and torch.equal(again[2]["attention_mask"], kwargs[1]["attention_mask"])
    assert BlockKwargs.from_state({"attention_mask": None}) is None  # a cache of the old layout starts over


def test_allocation_prepass_runs_each_block_with_its_own_arguments(model_dir, tokenizer, corpus_file, tmp_path,
                                                                  monkeypatch):
    """The global allocator's spectra come from the dense model's true activations, block by block."""
    model = _load(model_dir("qwen2"))
    recipe = tiny_recipe(corpus_file, allocator="energy", param_ratio=0.6)
    outs: list[torch.Tensor] = []
    original = spectra._block_spectra

    def spy(block, index, prefix, rows, recipe, x_in, x_out, *args, **kwargs):
        result = original(block, index, prefix, rows, recipe, x_in, x_out, *args, **kwargs)
        outs.append(x_out.clone())
        return result

    monkeypatch.setattr(spectra, "_block_spectra", spy)
    api.compress_model(model, recipe, tokenizer, cache_dir=tmp_path)
    ids = calibration_tokens(model, tokenizer, recipe.calibration, tmp_path, 3)
    for i, want in enumerate(layer_outputs(_load(model_dir("qwen2")), ids)):
        torch.testing.assert_close(outs[i], want, rtol=1e-4, atol=1e-4, msg=lambda m: f"block {i}: {m}")


class Crash(RuntimeError):
    pass


def test_resume_restores_per_block_arguments(model_dir, corpus_file, tmp_path, monkeypatch):
    """Interrupted after block 0 (whose arguments are the full-attention ones), the resumed run still gives blocks 1
    and 2 their sliding masks, for both streams, and ends with the same checkpoint as an uninterrupted run."""
    model = str(model_dir("qwen2"))
    recipe = noop_recipe(corpus_file)

    def crash(i):
        raise Crash(f"after block {i}")

    monkeypatch.setattr(pipeline, "after_block", crash)
    with pytest.raises(Crash):
        api.compress(model, recipe, tmp_path / "out", cache_dir=tmp_path / "c", progress=False)
    seen: dict = {}
    record_block_outputs(monkeypatch, tmp_path / "c", {"acts": (4, 32, 64), "stage1": (3, 20, 64)}, seen)
    _, report = api.compress(model, recipe, tmp_path / "out", resume=True, cache_dir=tmp_path / "c", progress=False)
    assert report["resumed_from_block"] == 1
    reference = _load(model_dir("qwen2"))
    saved = AutoTokenizer.from_pretrained(model)  # the one lrc used (its vocabulary hash is not the fixture's)
    for stream, cfg in (("acts", recipe.calibration), ("stage1", recipe.stages[1].calibration)):
        want = layer_outputs(reference, calibration_tokens(reference, saved, cfg, tmp_path / "c", 3))
        for i in (1, 2):
            torch.testing.assert_close(seen[(stream, i)], want[i], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ["gemma2", "gemma3", "qwen2"])
def test_compress_and_reload_sliding_window_models(arch, model_dir, tokenizer, corpus_file, tmp_path):
    recipe = tiny_recipe(corpus_file, method="svd-llm", param_ratio=0.6)
    net, report = api.compress(str(model_dir(arch)), recipe, tmp_path / "out", cache_dir=tmp_path / "c",
                               progress=False)
    assert report["targeted"]["factorized"] == 21
    assert all(0 < r["rel_error"] < 1 for r in report["modules"])
    loaded = api.load(tmp_path / "out")
    ids = torch.randint(3, len(tokenizer), (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, net.eval()(ids).logits, rtol=1e-4, atol=1e-4)


# --- mixture of experts ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch,cls", [("mixtral", "MixtralExperts"), ("qwen2_moe", "Qwen2MoeExperts")])
def test_fused_expert_weights_are_refused_before_any_work(arch, cls, model_dir, corpus_file, tmp_path):
    """transformers 5 stores experts as 3-D parameters, not Linears: lrc says so in one line, from ``lrc plan`` (config
    only) and from ``lrc compress`` before calibration, and writes nothing at --out."""
    import yaml
    from typer.testing import CliRunner

    from compress.cli import app

    recipe = tiny_recipe(corpus_file)
    with pytest.raises(LrcError) as err:
        api.plan(str(model_dir(arch)), recipe)
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith(f"model.layers.0.mlp.experts: fused 3-D expert weights ({cls}) are not supported")
    assert r"add 'mlp\.experts' to stages[0].ignore" in msg  # says what to change
    with pytest.raises(LrcError, match="fused 3-D expert weights"):
        api.compress(str(model_dir(arch)), recipe, tmp_path / "out", cache_dir=tmp_path / "c", progress=False)
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "c" / "runs").exists() or not any((tmp_path / "c" / "runs").iterdir())
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe.resolved()))
    for cmd in (["plan"], ["compress", "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "c")]):
        result = CliRunner().invoke(app, [cmd[0], str(model_dir(arch)), "--recipe", str(path), *cmd[1:]])
        assert result.exit_code == 2, result.output
        assert f"error: {msg}" in " ".join(result.output.split()), result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_moe_rest_of_block_compresses_when_experts_are_ignored(arch, model_dir, corpus_file, tmp_path):
    """Ignoring the fused experts explicitly compresses attention (and Qwen2-MoE's shared expert); routers, including
    the shared expert's one-output gate, are never targeted, even by a pattern that matches them."""
    recipe = tiny_recipe(corpus_file, param_ratio=0.6, ignore=[r"mlp\.experts"])
    rows = make_plan(_load(model_dir(arch)), recipe)
    names = {r.name.split(".", 3)[-1] for r in rows}
    attention = {f"self_attn.{p}_proj" for p in "qkvo"}
    shared = {f"mlp.shared_expert.{p}_proj" for p in ("gate", "up", "down")}
    assert names == (attention | shared if arch == "qwen2_moe" else attention)
    _, report = api.compress(str(model_dir(arch)), recipe, tmp_path / "out", cache_dir=tmp_path / "c",
                             progress=False)
    assert report["targeted"]["factorized"] == len(rows)
    assert {r["name"] for r in report["modules"]} == {r.name for r in rows}


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_moe_checkpoint_reloads_with_its_experts(arch, model_dir, tokenizer, corpus_file, tmp_path):
    """transformers saves fused experts in the per-expert layout of older checkpoints and converts them back on load
    by model type: the reloaded model must have the experts it was saved with, not freshly initialised ones."""
    recipe = tiny_recipe(corpus_file, param_ratio=0.6, ignore=[r"mlp\.experts"])
    net, _ = api.compress(str(model_dir(arch)), recipe, tmp_path / "out", cache_dir=tmp_path / "c", progress=False)
    loaded = api.load(tmp_path / "out")
    ids = torch.randint(3, len(tokenizer), (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, net.eval()(ids).logits, rtol=1e-4, atol=1e-4)


def test_linear_routers_are_never_targeted(model_dir, corpus_file):
    """A router that is a plain Linear (older transformers, remote code) has one output per expert."""
    model = _load(model_dir("qwen2_moe"))
    for block in model.model.layers:
        block.mlp.router = nn.Linear(64, model.config.num_experts, bias=False)
    rows = make_plan(model, tiny_recipe(corpus_file, targets=["mlp"], ignore=[r"mlp\.experts"]))
    assert rows and not [r.name for r in rows if "router" in r.name or "shared_expert_gate" in r.name]


class LinearExperts(nn.Module):
    """A top-2 MoE MLP whose experts are ``nn.Linear`` modules, as in remote-code models; expert 3 is never routed
    to (its router bias is -inf-like)."""

    def __init__(self, hidden=64, inner=32, n=4):
        super().__init__()
        self.gate = nn.Linear(hidden, n, bias=True)
        with torch.no_grad():
            self.gate.bias.copy_(torch.tensor([0.0, 0.0, 0.0, -1e4]))
        self.experts = nn.ModuleList(nn.ModuleDict({"gate_proj": nn.Linear(hidden, inner, bias=False),
                                                    "up_proj": nn.Linear(hidden, inner, bias=False),
                                                    "down_proj": nn.Linear(inner, hidden, bias=False)})
                                     for _ in range(n))

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1])
        weights, chosen = torch.topk(self.gate(flat).softmax(-1), 2, dim=-1)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(chosen == e)
            if token.numel() == 0:
                continue
            h = flat[token]
            y = expert["down_proj"](nn.functional.silu(expert["gate_proj"](h)) * expert["up_proj"](h))
            out.index_add_(0, token, y * weights[token, slot, None])
        return out.reshape(x.shape)


@torch.no_grad()
def unreached_then_routed(model, ids) -> bool:
    """Lower expert 2's router bias in block 0 until the first calibration sample routes no token to it while the
    rest of the set still routes a few (so it is compressed from tokens the one-sample structure pass never saw)."""
    mlp = model.model.layers[0].mlp
    counts: list[int] = []
    hook = mlp.experts[2]["gate_proj"].register_forward_pre_hook(lambda m, a: counts.append(a[0].shape[0]))
    try:
        for bias in np.arange(-0.5, -4.0, -0.05):
            mlp.gate.bias[2] = float(bias)
            counts.clear()
            model(ids[:1], use_cache=False)
            first = sum(counts)
            counts.clear()
            model(ids, use_cache=False)
            if first == 0 and sum(counts) >= 2:
                return True
    finally:
        hook.remove()
    return False


def test_linear_experts_all_compressed_and_unrouted_expert_reported(tiny_model_dir, tokenizer, corpus_file,
                                                                     tmp_path):
    """Every routed expert is compressed from the tokens routed to it, even one the first sample never reaches; the
    expert no token reaches keeps its weights and says so in its report row; the router is left alone."""
    model = _load(tiny_model_dir("llama"))
    model.config.num_local_experts = 4
    torch.manual_seed(1)
    for block in model.model.layers:
        block.mlp = LinearExperts()
    recipe = tiny_recipe(corpus_file, param_ratio=0.6)
    ids = calibration_tokens(model, tokenizer, recipe.calibration, tmp_path, 3)
    assert unreached_then_routed(model, ids), "no router bias makes expert 2 skip sample 0 yet get tokens later"
    report = api.compress_model(model, recipe, tokenizer, cache_dir=tmp_path)
    rows = {r["name"].removeprefix("model.layers."): r for r in report["modules"]}
    assert not [n for n in rows if n.endswith("mlp.gate")]
    for b in range(3):
        for e in range(4):
            for p in ("gate_proj", "up_proj", "down_proj"):
                row = rows[f"{b}.mlp.experts.{e}.{p}"]
                if e == 3:
                    assert row["type"] == "dense" and "no calibration token" in row["note"], row
                    assert row["params_after"] == row["params_before"]
                else:
                    assert row["type"] == "lowrank" and 0 < row["rel_error"] < 1, row
    assert type(model.model.layers[0].mlp.experts[3]["up_proj"]) is nn.Linear
    assert type(model.model.layers[0].mlp.experts[2]["up_proj"]) is not nn.Linear
    ids = torch.randint(3, len(tokenizer), (2, 16))
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
