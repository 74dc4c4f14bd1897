"""The streamed sensitivity sweep (``compress/engine/sweep.py``) gives, for every candidate, the calibration
perplexity of the whole model with only that matrix replaced: the same numbers as ``model(ids, labels=ids).loss``,
with the blocks after the swept one brought to the device one at a time (and given back when lazily loaded)."""
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM

from compress.engine.capture import capture_kwargs
from compress.engine.lazy import lazy_model
from compress.engine.stream import Host, head_loss
from compress.engine.sweep import Sweep
from compress.plan import PlanRow, find_blocks

RATIOS = [0.2, 0.5, 0.9]


class _Spectrum:
    """Plain truncated SVD: what ``Method.spectrum`` hands the sweep (``sigma``, ``factors(rank)``)."""

    def __init__(self, W):
        U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
        self.sigma, self._usv = S, (U, S, Vh)

    def factors(self, rank):
        U, S, Vh = self._usv
        return U[:, :rank] * S[:rank], Vh[:rank]


def _reference(model, name, spectrum, row, ids) -> list[float]:
    from compress.allocation.sensitivity import rank_at

    module = dict(model.named_modules())[name]
    original = module.weight.data.clone()
    out = []
    for ratio in RATIOS:
        A, B = spectrum.factors(min(rank_at(row, ratio, 1), spectrum.sigma.numel()))
        module.weight.data.copy_((A @ B).float())
        with torch.no_grad():
            out.append(float(torch.exp(model(input_ids=ids, labels=ids).loss.double())))
    module.weight.data.copy_(original)
    return out


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("lazy", [False, True])
def test_streamed_sweep_equals_whole_model_perplexity(tiny_model_dir, arch, lazy):
    path = tiny_model_dir(arch)
    dense = AutoModelForCausalLM.from_pretrained(path).float().eval()
    ids = torch.randint(3, dense.config.vocab_size, (3, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        states = dense(input_ids=ids, output_hidden_states=True).hidden_states
    i, names = 1, ["self_attn.k_proj", "mlp.up_proj"]
    recipe = SimpleNamespace(stages=[SimpleNamespace(allocator_options={"ratios": RATIOS, "samples": 2}, align=1)])
    expected, rows, spectra = {}, {}, {}
    for rel in names:
        name = f"model.layers.{i}.{rel}"
        W = dict(dense.named_modules())[name].weight.detach()
        rows[rel] = PlanRow(name, 0, "asvd", i, W.shape[0], W.shape[1], False, None, None)
        spectra[rel] = _Spectrum(W)
        expected[name] = _reference(dense, name, spectra[rel], rows[rel], ids[:2])
    model, lazy_blocks = lazy_model(path, torch.float32) if lazy else (dense, None)
    prefix, blocks = find_blocks(model)
    block = lazy_blocks.load(i) if lazy else blocks[i]
    modules = dict(block.named_modules())
    kwargs = capture_kwargs(model, blocks, ids[:1], "cpu")
    progress = SimpleNamespace(phase=lambda text: None)
    with Sweep(model, prefix, blocks, Host(blocks, "cpu", lazy_blocks), ids, kwargs, recipe, progress) as sweep:
        got = sweep(i, block, states[i], [(modules[rel], spectra[rel], rows[rel]) for rel in names])
    for name, ppl in expected.items():
        assert torch.allclose(got[name], torch.tensor(ppl, dtype=torch.float64), rtol=1e-5), name
        assert len(set(got[name].tolist())) == len(RATIOS)  # each candidate measured, not one repeated
    if lazy:
        assert lazy_blocks.loaded == {i}  # the blocks after it were given back


def test_head_loss_is_the_models_loss(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("qwen2")).float().eval()
    ids = torch.randint(3, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids, output_hidden_states=True)
        last = {}
        handle = model.model.layers[-1].register_forward_hook(lambda m, a, y: last.setdefault("h", y))
        model(input_ids=ids)
        handle.remove()
        h = last["h"][0] if isinstance(last["h"], tuple) else last["h"]
        loss = head_loss(model, "model.layers", isinstance(last["h"], tuple), h, ids)
    assert torch.allclose(loss, out.loss, rtol=1e-6)
    assert len(model.model.layers) == model.config.num_hidden_layers  # the blocks are back
