"""Lazy loading: the model skeleton on the meta device, decoder blocks materialised one at a time from safetensors.

``lazy_model(path)`` builds the architecture from its config under ``accelerate.init_empty_weights`` (parameters on
the meta device; buffers such as rotary tables are computed on the CPU as usual), then reads from the checkpoint's
shards only what lies outside the decoder blocks (embeddings, final norm, head). The block loop asks ``LazyBlocks``
for block i (read from its shard files, cast to the model dtype, put on the device) and gives it back when the block
is saved to the run cache (its tensors go back to the meta device, its compressed structure stays). So peak memory
is the largest block, its statistics and the calibration activations, plus a constant: it does not grow with depth
(issue 13), and a model larger than RAM can be compressed.

A forward pre-hook on every block materialises it on first use when something runs the whole model (self-generated
calibration): such a pass needs every block anyway, and ``unload_all`` gives them back afterwards.

Checkpoints whose tensor names are not the model's own (transformers converts some legacy layouts while loading) and
models that are not plain local safetensors directories load eagerly instead (``lazy_model`` returns None).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from ..checkpoint.module_types import loads_lazily
from ..errors import LrcError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def weight_map(path: Path) -> dict[str, str] | None:
    """``{tensor name: shard file}`` of a safetensors checkpoint directory; None when it has no safetensors."""
    if (path / INDEX_FILE).is_file():
        return dict(json.loads((path / INDEX_FILE).read_text())["weight_map"])
    if (path / SINGLE_FILE).is_file():
        with safe_open(str(path / SINGLE_FILE), framework="pt") as f:
            return {k: SINGLE_FILE for k in f.keys()}
    return None


def _set_tensor(root: nn.Module, name: str, value: torch.Tensor) -> None:
    """Put ``value`` in place of the parameter or buffer ``name`` (a parameter keeps its ``requires_grad``)."""
    owner, _, leaf = name.rpartition(".")
    mod = root.get_submodule(owner) if owner else root
    if leaf in mod._parameters:
        mod._parameters[leaf] = nn.Parameter(value, requires_grad=mod._parameters[leaf].requires_grad)
    else:
        mod._buffers[leaf] = value


class LazyBlocks:
    """Materialise and release the decoder blocks of a meta-device skeleton from its checkpoint's shards."""

    def __init__(self, model: nn.Module, path: Path, files: dict[str, str], prefix: str, blocks: nn.ModuleList):
        self.model, self.path, self.files, self.prefix, self.blocks = model, Path(path), files, prefix, blocks
        self.loaded: set[int] = set()
        self._hooks = [b.register_forward_pre_hook(self._on_call(i)) for i, b in enumerate(blocks)]

    def read(self, names: list[str], like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Tensors ``names`` from the shards (each file opened once and closed after), in the dtype of ``like``'s."""
        by_file: dict[str, list[str]] = {}
        for n in names:
            by_file.setdefault(self.files[n], []).append(n)
        out = {}
        for file, keys in by_file.items():
            with safe_open(str(self.path / file), framework="pt") as f:
                for k in keys:
                    t = f.get_tensor(k)
                    out[k] = t.to(like[k].dtype) if t.is_floating_point() else t
        return out

    def materialise(self, module: nn.Module, prefix: str, device="cpu") -> None:
        """Read every meta tensor of ``module`` (its names prefixed by ``prefix`` in the checkpoint) onto ``device``."""
        state = {f"{prefix}{k}": v for k, v in module.state_dict(keep_vars=True).items() if v.is_meta}
        for name, t in self.read(list(state), state).items():
            _set_tensor(module, name.removeprefix(prefix), t.to(device))

    def load(self, i: int, device="cpu") -> nn.Module:
        """Block ``i`` with its weights, on ``device``."""
        block = self.blocks[i]
        if i not in self.loaded:
            self.materialise(block, f"{self.prefix}.{i}.", device)
            self.loaded.add(i)
        return block.to(device)

    def unload(self, i: int) -> None:
        """Give block ``i``'s memory back: its parameters and persistent buffers go to the meta device, its module
        structure stays. Non-persistent buffers (a per-attention rotary table, a causal mask) are not in the
        checkpoint, so ``load`` could not read them back: they stay where they are (they are small)."""
        kept = [(mod, name, mod._buffers[name]) for mod in self.blocks[i].modules()
                for name in mod._non_persistent_buffers_set if mod._buffers.get(name) is not None]
        self.blocks[i].to("meta")
        for mod, name, buf in kept:
            mod._buffers[name] = buf
        self.loaded.discard(i)

    def unload_all(self) -> None:
        for i in sorted(self.loaded):
            self.unload(i)

    def load_all(self, device="cpu") -> None:
        for i in range(len(self.blocks)):
            self.load(i, device)

    def state_items(self):
        """``(name, tensor)`` of the whole model in ``state_dict`` order, one block read at a time (fingerprints)."""
        state = self.model.state_dict(keep_vars=True)
        current, cached = None, {}
        for name, t in state.items():
            if not t.is_meta:
                yield name, t
                continue
            block = int(name[len(self.prefix) + 1:].split(".", 1)[0])
            if block != current:
                keys = [k for k in state if k.startswith(f"{self.prefix}.{block}.")]
                current, cached = block, self.read(keys, state)
            yield name, cached[name]

    def _on_call(self, i: int):
        def hook(module, args, kwargs=None):
            if i not in self.loaded and "forward" not in module.__dict__:  # not a capture probe
                x = args[0] if args else None
                self.load(i, x.device if isinstance(x, torch.Tensor) else "cpu")
        return hook

    def stream(self) -> None:
        """Give every block back as soon as its forward returns: a whole-model pass (a greedy generation) then holds
        one block at a time, read again from the shards (page cache) on every call."""
        def after(i: int):
            def hook(module, args, output):
                if i in self.loaded:
                    self.unload(i)
            return hook

        self._hooks += [b.register_forward_hook(after(i)) for i, b in enumerate(self.blocks)]

    def remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()


def lazy_model(path: str | Path, dtype: torch.dtype, lrc: bool = False):
    """``(skeleton model, LazyBlocks)`` for a local safetensors directory whose tensor names are the model's own, or
    None (load it eagerly). Only the tensors outside the decoder blocks are read here. ``lrc``: the directory is an
    lrc checkpoint (its skeleton holds the compressed modules; one with a module type that is not ``lazy`` loads
    eagerly: ``checkpoint/module_types.py``)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..plan import find_blocks

    path = Path(path)
    if not path.is_dir():
        return None
    files = weight_map(path)
    if files is None:
        return None
    missing = sorted({f for f in files.values() if not (path / f).is_file()})
    if missing:  # found now, before any work, not when the block that lives in it is reached
        raise LrcError(f"{path / missing[0]}: shard file missing (listed in {INDEX_FILE}"
                       + (f"; {len(missing) - 1} more missing)" if len(missing) > 1 else ")"))
    if lrc:
        from ..checkpoint.load import load_config
        from ..checkpoint.modeling_lrc import LrcForCausalLM

        config = load_config(path)
        if not loads_lazily(config.lrc["modules"]):
            return None  # a module type that checks its tensors as it is built (a dictionary's mask): loaded whole
    else:
        config = AutoConfig.from_pretrained(path)
    if getattr(config, "quantization_config", None) is not None:
        return None
    with init_empty_weights(include_buffers=False):
        model = (LrcForCausalLM._from_config(config, dtype=dtype) if lrc
                 else AutoModelForCausalLM.from_config(config, dtype=dtype))
    model.tie_weights()
    state = model.state_dict(keep_vars=True)
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})  # targets of a tie (the head): not stored
    if set(files) != set(state) - tied:
        return None  # renamed or converted while loading (legacy layouts), or extra/missing tensors: load eagerly
    prefix, blocks = find_blocks(model)
    lazy = LazyBlocks(model, path, files, prefix, blocks)
    outside = {k: v for k, v in state.items() if k in files and not k.startswith(f"{prefix}.")}
    for name, t in lazy.read(list(outside), outside).items():
        _set_tensor(model, name, t)
    model.tie_weights()
    if any(t.is_meta for k, t in model.state_dict(keep_vars=True).items() if not k.startswith(f"{prefix}.")):
        lazy.remove_hooks()
        return None
    model.config._name_or_path = str(path)
    if (path / "generation_config.json").is_file():  # what from_pretrained would read (end tokens for generate)
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(path)
    model.eval()
    return model, lazy

