"""The gradient pass (``engine/gradients.py``): hook-reduced Fisher row/column sums and the output-gradient Gram equal a
plain full-gradient computation, whole-model or streamed one block at a time."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from compress.engine.gradients import fisher_sums


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
    from compress.engine.gradients import fisher_sums_streamed
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


def test_clamped_token_grads_drop_the_edges_and_clamp_norms():
    from compress.engine.gradients import clamped_token_grads

    g = torch.ones(16, 3, dtype=torch.float64)
    g[5] *= 100.0  # far above 10 μ... of the middle tokens' mean norm
    g[6] *= 1e-3   # below 0.1 μ
    g[7] = 0.0     # zero norm: left as it is
    out = clamped_token_grads(g)
    assert out.shape == (16 - 2 * 2, 3)  # ⌊0.125·16⌋ = 2 dropped at each end
    norms, mu = g[2:14].norm(dim=1), g[2:14].norm(dim=1).mean()
    assert torch.allclose(out[3].norm(), 10 * mu) and torch.allclose(out[4].norm(), 0.1 * mu)
    assert out[5].abs().sum() == 0 and torch.equal(out[0], g[2])
    assert torch.allclose(out[3] / out[3].norm(), g[5] / norms[3])  # direction kept


def _reference_output_grad_gram(model, ids, names):
    """The definition: per sequence, the loss's gradient at each named Linear's output, weighed as LEMS does."""
    from compress.engine.gradients import clamped_token_grads

    modules = dict(model.named_modules())
    ref = {n: 0 for n in names}
    for s in range(ids.shape[0]):
        seen = {}

        def keep(name):
            def hook(module, args, out):  # returns None: the output stays as it is
                out.register_hook(lambda g: seen.__setitem__(name, g[0].double()))
            return hook

        hooks = [modules[n].register_forward_hook(keep(n)) for n in names]
        x = ids[s:s + 1]
        model(input_ids=x, labels=x).loss.backward()
        for h in hooks:
            h.remove()
        for n in names:
            g = clamped_token_grads(seen[n])
            ref[n] = ref[n] + g.T @ g
    model.zero_grad()
    return ref


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_streamed_output_grad_gram_equals_the_definition(tiny_model_dir, tmp_path, arch):
    """G = Σ g gᵀ of each Linear's output gradient, block 0 included (its input carries no gradient of its own),
    together with the Fisher sums in one backward pass; the sums of each block are handed over as it is left."""
    from compress.engine.cache import RunCache
    from compress.engine.gradients import gradient_stats_streamed
    from compress.engine.stream import Host
    from compress.plan import find_blocks

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir(arch)).float().eval()
    ids = torch.randint(3, model.config.vocab_size, (3, 16), generator=torch.Generator().manual_seed(4))
    names = [f"model.layers.{i}.{m}" for i in range(model.config.num_hidden_layers)
             for m in ("self_attn.k_proj", "mlp.gate_proj")]
    ref = _reference_output_grad_gram(model, ids, names)
    fisher = fisher_sums(model, ids, names[:1], torch.device("cpu"))
    prefix, blocks = find_blocks(model)
    handed = {}
    got = gradient_stats_streamed(model, prefix, blocks, ids, {"output_grad_gram": names, "fisher": names[:1]},
                                  Host(blocks, "cpu", None), RunCache(tmp_path, "g", False), batch_size=2,
                                  on_block=lambda j, acc: handed.__setitem__(j, acc))
    assert got == {} and sorted(handed) == list(range(len(blocks)))
    for j, acc in handed.items():
        mine = [n for n in names if n.startswith(f"{prefix}.{j}.")]
        assert {k.rsplit(".", 1)[0] for k in acc} == set(mine)
        for n in mine:
            G = acc[f"{n}.output_grad_gram"]
            assert G.shape == ref[n].shape and torch.allclose(G, ref[n], rtol=1e-4, atol=1e-12), n
            assert torch.linalg.eigvalsh(G).min() > -1e-9 * G.diagonal().sum()  # a Gram: PSD
    k = names[0]
    assert torch.allclose(handed[0][f"{k}.fisher_out"], fisher[f"{k}.fisher_out"], rtol=1e-4)
    assert all(p.requires_grad for p in model.parameters())
