"""MELT Triton kernels, each beside its plain PyTorch reference (installed as `melt_kernels`).

- `gated_update`: the MELT latent-state update `s' = z*s + (1-z)*a`, `z = sigmoid(ga + gs + b)`.
- `chunk_attention`: C queries over [prefix rows | chunk rows], bottom-right causal, GQA,
  key padding, flash-decoding for C = 1.

Both run Triton on CUDA (and on CPU under TRITON_INTERPRET=1) and fall back to their PyTorch
reference elsewhere. Imports inside this package are relative: it is installed under the name
`melt_kernels` because Hugging Face owns the import name `kernels`.
"""

from .chunk_attention import chunk_attention
from .gated_update import gated_update

__all__ = ["chunk_attention", "gated_update"]
