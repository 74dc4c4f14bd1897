"""Replaced weights give their memory back even when transformers memory-mapped the checkpoint."""
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from compress.engine.memory import release


@pytest.mark.skipif(sys.platform != "linux", reason="MADV_DONTNEED on file mappings is Linux-only")
def test_release_only_touches_file_backed_weights(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama"))
    keep = model.model.layers[1].mlp.up_proj.weight.detach().clone()
    target = model.model.layers[0].mlp.up_proj.weight.data
    freed = release([target])
    if freed == 0:
        pytest.skip("this transformers version does not memory-map the checkpoint")
    assert freed > 0
    assert torch.equal(model.model.layers[1].mlp.up_proj.weight, keep)  # neighbours untouched
    anon = torch.randn(256, 256)
    before = anon.clone()
    assert release([anon]) == 0 and torch.equal(anon, before)  # anonymous memory is never advised away
