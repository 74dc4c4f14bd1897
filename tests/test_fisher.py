"""The Fisher pass: hook-reduced row/column sums equal a plain full-gradient computation, and memory stays flat."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from compress.engine.fisher import fisher_sums


def test_fisher_sums_equal_full_gradient_computation(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama")).float()
    ids = torch.randint(0, model.config.vocab_size, (3, 16), generator=torch.Generator().manual_seed(0))
    names = ["model.layers.0.self_attn.k_proj", "model.layers.2.mlp.down_proj"]
    got = fisher_sums(model, ids, names, torch.device("cpu"), batch_size=1)
    modules = dict(model.named_modules())
    ref = {n: torch.zeros_like(modules[n].weight, dtype=torch.float64) for n in names}
    for s in range(ids.shape[0]):  # independent: full gradients of every parameter, one sequence at a time
        model.zero_grad()
        x = ids[s : s + 1]
        model(input_ids=x, labels=x).loss.backward()
        for n in names:
            ref[n] += modules[n].weight.grad.double() ** 2
    for n in names:
        assert torch.allclose(got[f"{n}.fisher_out"], ref[n].sum(1), rtol=1e-5)
        assert torch.allclose(got[f"{n}.fisher_in"], ref[n].sum(0), rtol=1e-5)
        assert got[f"{n}.fisher_in"].min() >= 0 and got[f"{n}.fisher_in"].sum() > 0
    model.zero_grad()
    assert all(p.requires_grad for p in model.parameters())  # flags restored


def test_fisher_hooks_drop_gradients_and_checkpointing_agrees(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("qwen2"))
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    name = "model.layers.1.mlp.up_proj"
    plain = fisher_sums(model, ids, [name], torch.device("cpu"))
    assert all(p.grad is None for p in model.parameters())  # no full gradient outlives the pass
    ckpt = fisher_sums(model, ids, [name], torch.device("cpu"), checkpointing=True)
    assert torch.allclose(plain[f"{name}.fisher_in"], ckpt[f"{name}.fisher_in"], rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("lazy", [False, True])
def test_streamed_fisher_equals_the_whole_model_pass(tiny_model_dir, tmp_path, arch, lazy):
    """One block on the device at a time (materialised from the shards when lazy) gives the whole-model sums, and
    leaves no block loaded, no stored activation behind and every requires_grad flag as it was."""
    from compress.engine.cache import RunCache
    from compress.engine.fisher import fisher_sums_streamed
    from compress.engine.lazy import lazy_model
    from compress.engine.stream import Host
    from compress.plan import find_blocks

    path = tiny_model_dir(arch)
    dense = AutoModelForCausalLM.from_pretrained(path).float().eval()
    ids = torch.randint(3, dense.config.vocab_size, (3, 16), generator=torch.Generator().manual_seed(2))
    names = [f"model.layers.{i}.{m}" for i in range(dense.config.num_hidden_layers)
             for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")]
    ref = fisher_sums(dense, ids, names, torch.device("cpu"))
    if lazy:
        model, blocks_lazy = lazy_model(path, torch.float32)
    else:
        model, blocks_lazy = AutoModelForCausalLM.from_pretrained(path).float().eval(), None
    prefix, blocks = find_blocks(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    cache = RunCache(tmp_path, "fisher-test", False)
    got = fisher_sums_streamed(model, prefix, blocks, ids, names, Host(blocks, "cpu", blocks_lazy), cache,
                               batch_size=2)
    assert set(got) == set(ref)
    for key, value in ref.items():
        assert torch.allclose(got[key], value, rtol=1e-4, atol=1e-12), key
    assert not list(cache.dir.glob("fisher*"))
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    if lazy:
        assert not blocks_lazy.loaded and all(p.device.type == "meta" for p in blocks.parameters())
