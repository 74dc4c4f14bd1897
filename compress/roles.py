"""Roles of a decoder block's modules, for methods that act jointly on groups of them (e.g. methods.md §5).

Found from structure, not from per-family name tables: the MLP is the module with three Linear children, two reading
the block's hidden states (gate, up: hidden → d_int) and one writing them back (down: d_int → hidden); the attention
is the module with four, three reading the hidden states (q: hidden → H·d, k and v: hidden → H_kv·d) and one writing
them back (o: H·d → hidden), with H, H_kv and d from the config. Where shapes cannot tell q, k and v apart (k and v
always have the same shape), the conventional names (``q_proj``/``k_proj``/``v_proj``, shared by the Llama, Mistral,
Qwen2/3, Gemma, OLMo, Granite... families) decide, else registration order (q, k, v: the order of the attention
equation in every HF implementation); shapes are checked either way. The engine checks the result against the block's real data flow
(``check_roles``: q/k/v share one input tensor, gate/up another), so a wrong guess is an error, not a wrong model.
An architecture with fused projections (one ``qkv_proj`` or ``gate_up_proj``), partial rotary embeddings or no
such modules gets a one-line ``LrcError`` naming what is missing.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .errors import LrcError


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder-block list: the ModuleList with ``num_hidden_layers`` entries (largest one if ambiguous)."""
    n_layers = getattr(model.config, "num_hidden_layers", None)
    best = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0 and (n_layers is None or len(mod) == n_layers):
            if best is None or len(mod) > len(best[1]):
                best = (name, mod)
    if best is None:
        raise LrcError(f"{type(model).__name__}: cannot find the decoder blocks (no ModuleList of "
                       f"{n_layers} layers)")
    return best


@dataclass(frozen=True)
class AttentionRoles:
    path: str  # the attention module, relative to the block (e.g. "self_attn")
    q: str
    k: str
    v: str
    o: str
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden: int
    qk_norm: bool  # per-head norms on q/k before RoPE (Qwen3): a column selection cannot be exact there
    rope_ok: bool  # full rotary embedding on the head dim with HF's rotate_half pairing (i, i + d/2)

    @property
    def members(self) -> dict[str, str]:
        return {"q": self.q, "k": self.k, "v": self.v, "o": self.o}


@dataclass(frozen=True)
class MlpRoles:
    path: str
    gate: str
    up: str
    down: str
    intermediate: int
    hidden: int

    @property
    def members(self) -> dict[str, str]:
        return {"gate": self.gate, "up": self.up, "down": self.down}


def _linears(mod: nn.Module) -> list[tuple[str, nn.Linear]]:
    return [(n, c) for n, c in mod.named_children() if isinstance(c, nn.Linear)]


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def head_counts(config) -> tuple[int, int, int]:
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    d = getattr(config, "head_dim", None) or config.hidden_size // heads
    return heads, kv, d


def _rope_ok(config) -> bool:
    """Full-width rotary embedding (no ``partial_rotary_factor`` below 1): pair-wise head-dim selections (RoPE pairs) assume it."""
    params = getattr(config, "rope_parameters", None) or {}
    factor = params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0)) \
        if isinstance(params, dict) else getattr(config, "partial_rotary_factor", 1.0)
    return factor in (None, 1, 1.0)


def _pick(cands: list[tuple[str, nn.Linear]], key: str) -> tuple[str, nn.Linear] | None:
    named = [c for c in cands if c[0] == f"{key}_proj" or c[0] == key]
    return named[0] if len(named) == 1 else None


def find_attention(block: nn.Module, config) -> AttentionRoles | None:
    """The first module with four Linear children that fit q (hidden → H·d), k and v (hidden → H_kv·d) and
    o (H·d → hidden): by their names when they are ``q_proj``/``k_proj``/``v_proj``/``o_proj`` (or ``q``...),
    else in registration order (the order of the attention equation); shapes are checked either way."""
    H, Hkv, d = head_counts(config)
    h = config.hidden_size
    want = {"q": (H * d, h), "k": (Hkv * d, h), "v": (Hkv * d, h), "o": (h, H * d)}
    for path, mod in block.named_modules():
        lin = _linears(mod)
        if len(lin) != 4:
            continue
        named = [_pick(lin, key) for key in "qkvo"]
        roles = named if all(named) and len({n[0] for n in named}) == 4 else lin
        if any((m.out_features, m.in_features) != want[key] for key, (_, m) in zip("qkvo", roles)):
            continue
        norms = {n for n, _ in mod.named_children()} & {"q_norm", "k_norm"}
        return AttentionRoles(path, *(_join(path, r[0]) for r in roles), H, Hkv, d, h, bool(norms),
                              _rope_ok(config))
    return None


def find_mlp(block: nn.Module, config) -> MlpRoles | None:
    h = config.hidden_size
    for path, mod in block.named_modules():
        lin = _linears(mod)
        if len(lin) != 3:
            continue
        ins = [c for c in lin if c[1].in_features == h and c[1].out_features != h]
        outs = [c for c in lin if c[1].out_features == h and c[1].in_features != h]
        if len(ins) != 2 or len(outs) != 1 or ins[0][1].out_features != ins[1][1].out_features \
                or outs[0][1].in_features != ins[0][1].out_features:
            continue
        gate = _pick(ins, "gate") or ins[0]
        up = ins[1] if gate is ins[0] else ins[0]
        return MlpRoles(path, _join(path, gate[0]), _join(path, up[0]), _join(path, outs[0][0]),
                        outs[0][1].in_features, h)
    return None


def block_roles(block: nn.Module, config, wanted: set[str], where: str) -> tuple[AttentionRoles | None,
                                                                                  MlpRoles | None]:
    """The roles of ``block`` that ``wanted`` names (``"attention"``, ``"mlp"``); ``LrcError`` naming what is missing
    otherwise. ``where`` names the block in the message."""
    att = find_attention(block, config) if "attention" in wanted else None
    mlp = find_mlp(block, config) if "mlp" in wanted else None
    H, Hkv, d = head_counts(config)
    if "attention" in wanted and att is None:
        raise LrcError(f"{where}: no attention module with separate q/k/v/o Linears of the config's shapes "
                       f"({H} heads, {Hkv} KV heads, head dim {d}; fused qkv projections are not supported)")
    if "mlp" in wanted and mlp is None:
        raise LrcError(f"{where}: no gated MLP with separate gate/up/down Linears (hidden {config.hidden_size}); "
                       "fused gate_up projections and plain two-Linear MLPs are not supported")
    if att is not None and getattr(config, "attn_logit_softcapping", None):
        raise LrcError(f"{where}: attention logit soft-capping (Gemma 2) is not supported by lrc's rebuilt attention")
    if att is not None and d % 2:
        raise LrcError(f"{where}: head dim {d} is odd; RoPE pairs need an even head dim")
    return att, mlp


def check_roles(groups: list[list[str]], att: AttentionRoles | None, mlp: MlpRoles | None, where: str) -> None:
    """Check the roles against the block's data flow (``engine.stats.discover_groups``: Linears grouped by the very
    input tensor they receive): q, k and v must share one input, gate and up another."""
    def together(names: list[str]) -> bool:
        return any(all(n in g for n in names) for g in groups)

    if att is not None and (not together([att.q, att.k, att.v]) or together([att.q, att.o])):
        raise LrcError(f"{where}: {att.q}, {att.k}, {att.v} do not read the same input; cannot tell the attention's "
                       "roles apart")
    if mlp is not None and not together([mlp.gate, mlp.up]):
        raise LrcError(f"{where}: {mlp.gate} and {mlp.up} do not read the same input; not a gated MLP")
