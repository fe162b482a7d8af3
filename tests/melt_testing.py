"""Tiny MELT/Ouro models for the tests (fp32, CPU, seconds each)."""

import torch

from melt import MeltConfig, MeltForCausalLM
from melt.modeling_melt import GATE_MARKER

TINY = dict(
    vocab_size=61,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=64,
    rope_theta=10_000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    num_loops=3,
)


def tiny_config(**overrides) -> MeltConfig:
    return MeltConfig(**{**TINY, **overrides})


def tiny_model(seed: int = 0, randomize_gate: bool = True, **overrides) -> MeltForCausalLM:
    """A tiny model with random weights; the gate is randomised too so that it is not a fixed EMA."""
    torch.manual_seed(seed)
    model = MeltForCausalLM(tiny_config(**overrides)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)  # non-unit norm weights, so a forgotten norm is caught
            elif GATE_MARKER in name and randomize_gate:
                param.normal_(0.0, 0.3)
        model.model.early_exit_gate.bias.fill_(-1.0)
    return model


def twin(model: MeltForCausalLM, **overrides) -> MeltForCausalLM:
    """The same weights under another config (cache mode, gate type, chunk size ...)."""
    other = MeltForCausalLM(MeltConfig(**{**model.config.to_dict(), **overrides})).eval()
    missing, unexpected = other.load_state_dict(model.state_dict(), strict=False)
    assert all(GATE_MARKER in name for name in missing + unexpected), (missing, unexpected)
    if any(GATE_MARKER in name for name in missing):
        with torch.no_grad():
            for name, param in other.named_parameters():
                if GATE_MARKER in name:
                    param.normal_(0.0, 0.3)
    return other


def logits_in_pieces(model: MeltForCausalLM, ids: torch.Tensor, edges: list[int], **kwargs) -> torch.Tensor:
    """Logits of `ids` run as consecutive calls over columns `edges[i]:edges[i + 1]`, each continuing the
    previous call's cache; the pieces concatenated (compare with one full forward)."""
    cache, pieces = None, []
    for lo, hi in zip(edges[:-1], edges[1:]):
        out = model(ids[:, lo:hi], cache=cache, use_cache=True, **kwargs)
        cache = out.cache
        pieces.append(out.logits)
    return torch.cat(pieces, 1)
