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


def decode(model, ids, mask, cache, step=None, prefill=3):
    """Logits `[B, L, V]` of prefill (the first `prefill` columns) then one-token steps through `cache` (with `step`,
    e.g. a compiled model, in place of `model`)."""
    step = model if step is None else step
    with torch.no_grad():
        out = model(ids[:, :prefill], attention_mask=None if mask is None else mask[:, :prefill], cache=cache,
                    use_cache=True)
        logits = [out.logits]
        for i in range(prefill, ids.shape[1]):
            step_mask = None if mask is None else mask[:, : i + 1]
            out = step(ids[:, i : i + 1], attention_mask=step_mask, cache=cache, use_cache=True)
            logits.append(out.logits.clone())  # a CUDA graph's outputs are overwritten by its next replay
    return torch.cat(logits, dim=1)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest absolute elementwise difference (NaN when either holds NaN), to show two results differ."""
    return (a - b).abs().max().item()


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, atol: float, rtol: float = 0.0,
                 name: str = "result") -> None:
    """The suite's one numeric comparison. Fails on a shape mismatch, on any NaN, on infinities that differ from
    the reference's, and when the error is above both bounds: its RMS relative to the reference's RMS above `rtol`
    and its largest element above `atol` (rtol = 0: every element within `atol`)."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}"
    actual = actual.detach().double().cpu()
    expected = expected.detach().double().cpu()
    if torch.isnan(expected).any():
        raise AssertionError(f"{name}: the reference holds NaN (test bug)")
    nan = torch.isnan(actual)
    if nan.any():
        idx = tuple(nan.nonzero()[0].tolist())
        raise AssertionError(f"{name}: {int(nan.sum())} of {actual.numel()} elements are NaN, first at {idx}")
    inf = torch.isinf(expected)
    bad_inf = (torch.isinf(actual) | inf) & (actual != expected)
    if bad_inf.any():
        idx = tuple(bad_inf.nonzero()[0].tolist())
        raise AssertionError(f"{name}: infinities differ at {idx}: got {actual[idx]}, expected {expected[idx]}")
    actual, expected = actual[~inf], expected[~inf]
    if expected.numel() == 0:
        return
    err = (actual - expected).abs()
    rel_rms = (err.square().mean().sqrt() / expected.square().mean().sqrt().clamp_min(1e-30)).item()
    max_abs = err.max().item()
    if rel_rms > rtol and max_abs > atol:
        i = int(err.argmax())
        raise AssertionError(
            f"{name}: relative RMS error {rel_rms:.3e} > {rtol:.0e} and max abs error {max_abs:.3e} > {atol:.0e} "
            f"(worst element: got {actual[i].item():.6g}, expected {expected[i].item():.6g})"
        )
