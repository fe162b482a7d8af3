"""Reference MELT gated update in plain PyTorch: the spec of the Triton kernel and its CPU fallback."""

from __future__ import annotations

import torch


def naive_gated_update(
    a: torch.Tensor, s: torch.Tensor, ga: torch.Tensor, gs: torch.Tensor, b: torch.Tensor
) -> torch.Tensor:
    """Latent-state update of a MELT layer, computed in fp32.

        z  = sigmoid(ga + gs + b)
        s' = z * s + (1 - z) * a

    Args:
        a:  [..., D] this loop's normalised hidden state (`input_layernorm(h)`).
        s:  [..., D] the latent state carried from the previous loop.
        ga: [..., D] `a @ Wz`.
        gs: [..., D] `s @ Uz`.
        b:  [D] gate bias.

    Returns:
        s': [..., D] in the dtype of `a`. Differentiable with respect to every input.
    """
    z = torch.sigmoid(ga.float() + gs.float() + b.float())
    return (z * s.float() + (1.0 - z) * a.float()).to(a.dtype)
