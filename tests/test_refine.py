"""Block refinement anchored to the dense block (AA-SVD, methods.md §13; ``compress/engine/refine.py``), and the
identity between lrc's ``objective: dense`` and AA-SVD's anchored closed form."""
import copy

import pytest
import torch

from compress import api
from compress.api import compress_model
from compress.engine.refine import block_mse, refine_block, trainable
from compress.errors import LrcError
from compress.linalg import dense_target
from compress.methods import METHODS
from compress.recipe import RefineConfig, parse_recipe
from conftest import reload_logits, resume_after_crash, tiny_recipe


def _with_refine(recipe, **opts):
    data = recipe.model_dump(mode="json")
    data["refine"] = {"steps": 12, "batch_size": 4, "lr": 1e-3, **opts}
    return parse_recipe(data)


def _load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).eval()


# the anchored closed form (§13) ---------------------------------------------------------------------------------------

def _aa_svd(W, X, Xh, r):
    """AA-SVD's anchored solution, written from the paper: Σ̂ = X̂X̂ᵀ/N = L Lᵀ, C = X X̂ᵀ/N, M = W C L⁻ᵀ = U S Vᵀ,
    W′ = U_r S_r V_rᵀ L⁻¹; and the singular values S."""
    N = X.shape[1]
    L = torch.linalg.cholesky(Xh @ Xh.T / N)
    C = X @ Xh.T / N
    M = torch.linalg.solve_triangular(L, (W @ C).T, upper=False).T  # W C L^{-T}
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    left = U[:, :r] * S[:r]
    return torch.linalg.solve_triangular(L.T, (left @ Vh[:r]).T, upper=True).T, S  # (U_r S_r V_rᵀ) L^{-1}


def _lrc_dense(W, X, Xh, r):
    """lrc's ``objective: dense`` with no damping: the least-squares target on the compressed inputs, then
    SVD-LLM's whitened truncation on their Gram (what ``decompose`` runs)."""
    H_c, C = Xh @ Xh.T, X @ Xh.T
    target = dense_target(W, H_c, C, damping=0.0)
    A, B = METHODS["svd-llm"](METHODS["svd-llm"].config_cls()).spectrum(target, {"input_gram": H_c}).factors(r)
    return A @ B


@pytest.mark.parametrize("m,n,r", [(12, 9, 3), (7, 10, 5), (16, 16, 1)])
def test_dense_objective_equals_the_anchored_closed_form(m, n, r):
    """lrc's ``objective: dense`` (damping 0) is AA-SVD's anchored solution min ‖WX − W′X̂‖ over rank r, and at the
    optimum ‖WX − W′X̂‖²/N = tr(WΣWᵀ) − Σ_{i≤r} s_i² (§13's identity)."""
    g = torch.Generator().manual_seed(m * 100 + n + r)
    W = torch.randn(m, n, generator=g, dtype=torch.float64)
    X = torch.randn(n, 200, generator=g, dtype=torch.float64)
    Xh = X + 0.3 * torch.randn(n, 200, generator=g, dtype=torch.float64)
    ours, theirs = _lrc_dense(W, X, Xh, r), None
    theirs, S = _aa_svd(W, X, Xh, r)
    torch.testing.assert_close(ours, theirs, rtol=1e-7, atol=1e-9)
    N = X.shape[1]
    loss = float((W @ X - ours @ Xh).pow(2).sum()) / N
    expected = float(torch.trace(W @ (X @ X.T / N) @ W.T) - S[:r].pow(2).sum())
    assert loss == pytest.approx(expected, rel=1e-8)
    # and it is the minimum: a perturbed rank-r matrix, or plain SVD-LLM on the compressed inputs, does worse
    plain = METHODS["svd-llm"](METHODS["svd-llm"].config_cls()).spectrum(W, {"input_gram": Xh @ Xh.T}).factors(r)
    assert float((W @ X - plain[0] @ plain[1] @ Xh).pow(2).sum()) / N > loss


def test_anchored_with_unshifted_inputs_is_svd_llm():
    """X̂ = X: the anchored objective is SVD-LLM's ‖(W − W′)X‖."""
    g = torch.Generator().manual_seed(3)
    W, X = torch.randn(10, 8, generator=g, dtype=torch.float64), torch.randn(8, 50, generator=g, dtype=torch.float64)
    A, B = METHODS["svd-llm"](METHODS["svd-llm"].config_cls()).spectrum(W, {"input_gram": X @ X.T}).factors(3)
    torch.testing.assert_close(_aa_svd(W, X, X, 3)[0], A @ B, rtol=1e-7, atol=1e-9)


# refine_block on one block ------------------------------------------------------------------------------------------

def _block_setup(seed=0):
    """A dense Llama block, a perturbed copy (the 'compressed' one), inputs of both streams and the dense target."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
                      num_hidden_layers=1, vocab_size=50)
    dense = LlamaDecoderLayer(cfg, 0).eval()
    comp = copy.deepcopy(dense)
    with torch.no_grad():
        for p in comp.parameters():
            if p.dim() == 2:
                p.add_(0.05 * torch.randn_like(p))
    x = torch.randn(16, 10, 32)
    xh = x + 0.05 * torch.randn_like(x)
    pos = torch.arange(10)[None]
    kwargs = {"position_embeddings": LlamaRotaryEmbedding(cfg)(x[:1], pos), "attention_mask": None}
    with torch.no_grad():
        target = dense(x, **kwargs)
        target = target[0] if isinstance(target, tuple) else target
    return comp, xh, target, kwargs


def test_refine_lowers_the_block_mse_and_keeps_the_parameter_count():
    block, xh, target, kwargs = _block_setup()
    count = sum(p.numel() for p in block.parameters())
    before = block_mse(block, xh, target, kwargs, 4, "cpu")
    out = refine_block(block, xh, target, kwargs, RefineConfig(steps=30, batch_size=4, lr=3e-3), 0, "cpu")
    assert out["kept"] and out["mse_before"] == pytest.approx(before)
    assert out["mse_after"] < 0.8 * before
    assert block_mse(block, xh, target, kwargs, 4, "cpu") == pytest.approx(out["mse_after"])
    assert sum(p.numel() for p in block.parameters()) == count
    assert all(p.requires_grad for p in block.parameters())  # the flags as they were


def test_refine_that_does_not_help_is_rolled_back():
    """A learning rate that wrecks the block: the trained parameters are discarded, the block is bit-identical."""
    block, xh, target, kwargs = _block_setup(1)
    state = {k: v.clone() for k, v in block.state_dict().items()}
    out = refine_block(block, xh, target, kwargs, RefineConfig(steps=5, batch_size=4, lr=50.0, clip=1e6), 0, "cpu")
    assert not out["kept"] and out["mse_trained"] > out["mse_before"] == out["mse_after"]
    for k, v in block.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_trainable_sets():
    block, *_ = _block_setup()
    names = {id(p): n for n, p in block.named_parameters()}
    every = {names[id(p)] for p in trainable(block, "all", True)}
    assert every == set(names.values())
    no_norms = {names[id(p)] for p in trainable(block, "all", False)}
    assert no_norms == {n for n in names.values() if "norm" not in n}
    lrc = {names[id(p)] for p in trainable(block, "lrc", True, {"mlp.down_proj"})}
    assert lrc == {"mlp.down_proj.weight", "input_layernorm.weight", "post_attention_layernorm.weight"}


# the engine ---------------------------------------------------------------------------------------------------------

def test_refine_brings_the_model_closer_to_dense(tiny_model_dir, tokenizer, corpus_file, tmp_path):
    """svd-llm at 0.4 kept then refine: every block's MSE falls (or the block is kept as it was), the report says
    so, and the logits on the calibration text move towards the dense model's."""
    from compress.calibration import calibration_tokens

    dense = _load(tiny_model_dir("llama"))
    base = tiny_recipe(corpus_file, param_ratio=0.4)
    ids = calibration_tokens(dense, tokenizer, base.calibration, tmp_path)
    with torch.no_grad():
        ref = dense(ids).logits
    dist = {}
    for name, recipe in (("plain", base), ("refine", _with_refine(base))):
        model = _load(tiny_model_dir("llama"))
        report = compress_model(model, recipe, tokenizer, cache_dir=tmp_path / name)
        with torch.no_grad():
            dist[name] = float((model(ids).logits - ref).norm())
        if name == "refine":
            section = report["refine"]
            assert section["of"] == 3 and section["kept"] >= 1
            assert all(b["mse_after"] <= b["mse_before"] for b in section["blocks"])
            assert section["mean_mse_after"] < section["mean_mse_before"]
        else:
            assert "refine" not in report
    assert dist["refine"] < dist["plain"]


def test_refine_after_modegpt_and_reload(tiny_model_dir, tokenizer, corpus_file, tmp_path):
    """A block method (MoDeGPT) then refine with ``train: lrc``: the checkpoint loads in a process without lrc
    with the same logits."""
    model = str(tiny_model_dir("llama"))
    recipe = _with_refine(tiny_recipe(corpus_file, "modegpt", param_ratio=0.7), train="lrc", steps=4)
    out, report = api.compress(model, recipe, tmp_path / "out", cache_dir=tmp_path / "c", progress=False)
    assert report["refine"]["of"] == 3
    x = torch.randint(0, 100, (1, 12))
    expected = reload_logits(tmp_path / "out", x, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(expected, out(x).logits, atol=1e-5, rtol=0)


def test_refine_resumes_byte_identically(tiny_model_dir, corpus_file, tmp_path, monkeypatch):
    model = str(tiny_model_dir("llama"))
    recipe = _with_refine(tiny_recipe(corpus_file, param_ratio=0.5), steps=6)
    api.compress(model, recipe, tmp_path / "ref", cache_dir=tmp_path / "c1", progress=False)
    report = resume_after_crash(monkeypatch, model, recipe, tmp_path / "out", tmp_path / "c2", tmp_path / "ref")
    assert report["refine"]["of"] == 3


def test_refine_needs_compressed_propagation(corpus_file):
    with pytest.raises(LrcError, match="refine: needs engine.propagate: compressed"):
        _with_refine(tiny_recipe(corpus_file, propagate="original"))
