"""The one attention entry point of MELT: C queries over [prefix rows | chunk rows].

`chunk_attention(q, k, v, k_prefix, v_prefix, key_mask)` is causal attention of a chunk's C queries over
P prefix rows (already final, read in place from the cache) followed by the chunk's own C rows,
bottom-right aligned: query i sees every prefix row and chunk rows 0..i. `key_mask` ([B, P + C], True =
visible) carries padding and per-sequence chunk boundaries. A query with no visible key returns zeros.

Backends:
- "triton": this project's kernels (`kernels/chunk_attention`, installed as `melt_kernels`); serves every call.
- "flash": flash-attn, an optional extra: CUDA fp16/bf16 calls with no key mask and no prefix lengths, and with a
  prefix only without autograd (prefix and chunk are attended separately and merged by their log-sum-exp, whose
  gradient flash-attn's backward ignores: training through the merge would get wrong gradients).
- "sdpa": torch's scaled_dot_product_attention, calls without a prefix (P = 0). SDPA cannot return its
  log-sum-exp, so over a prefix it could only attend by concatenating the prefix with the chunk, the copy
  MELT exists to avoid. The decode step on a preallocated cache needs no concatenation (`cache_attention`).
- "eager": plain PyTorch. Scores against the prefix and against the chunk are computed from the rows
  where they live and softmaxed jointly in fp32; it is the reference and serves every call, with autograd.
"auto" is triton on CUDA when the kernels import; elsewhere it picks per call: sdpa without a prefix, eager
with one, and `cache_attention` (SDPA) for the decode step on a preallocated cache, which also serves that step
when it is compiled. A forced backend that cannot serve a call raises a ValueError naming it and what to use instead;
it never silently runs another one. `MELT_ATTENTION_BACKEND` (environment) overrides the config's
`attention_backend`; tests force one with `override_backend`.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch
import torch.nn.functional as F

from .configuration_melt import ATTENTION_BACKENDS

try:  # Installed with this package; absent when a checkpoint's flat modeling files run without it.
    from melt_kernels.chunk_attention import chunk_attention as triton_chunk_attention
    from melt_kernels.gated_update import gated_update as triton_gated_update
except ImportError:
    triton_chunk_attention = None
    triton_gated_update = None

try:
    from flash_attn import flash_attn_func
except ImportError:
    flash_attn_func = None

BACKENDS = ATTENTION_BACKENDS  # the config validates against the same tuple
_override: str | None = None


@contextlib.contextmanager
def override_backend(name: str):
    """Force one backend inside the block (tests use this to compare backends on the same model)."""
    global _override
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {BACKENDS}")
    previous, _override = _override, name
    try:
        yield
    finally:
        _override = previous


def requested_backend(configured: str) -> str:
    """The backend asked for, before the automatic choice: override > environment > config."""
    return _override or os.environ.get("MELT_ATTENTION_BACKEND") or configured


def resolve_backend(configured: str, device: torch.device) -> str:
    """The backend calls on `device` use: override > environment > config > automatic choice.

    "auto" becomes "triton" on CUDA when the kernels import, and stays "auto" elsewhere: `chunk_attention`
    then picks sdpa or eager per call.
    """
    name = requested_backend(configured)
    if name not in BACKENDS:
        raise ValueError(
            f"unknown attention backend {name!r} (MELT_ATTENTION_BACKEND or config); choose one of {BACKENDS}"
        )
    if name == "auto":
        return "triton" if device.type == "cuda" and triton_chunk_attention is not None else "auto"
    if name == "triton" and triton_chunk_attention is None:
        raise ImportError("attention backend 'triton' needs the melt_kernels package (pip install melt)")
    if name == "flash" and flash_attn_func is None:
        raise ImportError("attention backend 'flash' needs flash-attn (pip install 'melt[cuda]')")
    return name


def chunk_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    k_prefix: torch.Tensor | None, v_prefix: torch.Tensor | None,
    key_mask: torch.Tensor | None,
    backend: str,
    *,
    prefix_lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of q `[B, H, C, D]` over prefix rows `[B, Hkv, P, D]` then chunk rows `[B, Hkv, C, D]`.

    Returns `[B, H, C, D]`. `key_mask`: bool `[B, P + C]` or None. The prefix may be a strided view of a
    larger cache buffer; no backend copies it.
    `prefix_lengths`: int tensor `[B]` on the device of q, or None: prefix row j of sequence b is visible only
    if j < prefix_lengths[b] (and key_mask, whose width stays P + C, allows it). With it the prefix may be a
    whole preallocated buffer `[B, Hkv, S, D]`; the lengths are never read on the host (no sync), so a decode
    step can be captured: the Triton kernels skip the key blocks past each length, the eager path masks them
    with fixed shapes (`torch.compile(fullgraph=True)` traces it).
    """
    prefix_len = 0 if k_prefix is None else k_prefix.shape[2]
    if prefix_len == 0:
        k_prefix = v_prefix = prefix_lengths = None
    if backend == "auto":
        backend = "sdpa" if prefix_len == 0 else "eager"
    if backend == "triton":
        return triton_chunk_attention(q, k, v, k_prefix, v_prefix, key_mask=key_mask, prefix_lengths=prefix_lengths)
    if backend == "eager":
        return eager_chunk_attention(q, k, v, k_prefix, v_prefix, key_mask, prefix_lengths)
    if backend == "sdpa":
        if prefix_len:
            raise ValueError(
                f"attention backend 'sdpa' cannot attend over prefix rows (P = {prefix_len}): SDPA returns no "
                "log-sum-exp, so it would have to concatenate the prefix with the chunk. Use 'triton' (CUDA), "
                "'eager', or 'auto' (sdpa without a prefix, eager with one)."
            )
        return _sdpa(q, k, v, key_mask)
    if backend == "flash":
        reasons = _flash_cannot_serve(q, k, v, k_prefix, v_prefix, key_mask, prefix_lengths)
        if reasons:
            raise ValueError(
                f"attention backend 'flash' cannot serve this call: {'; '.join(reasons)}. "
                "Use 'triton' (CUDA), 'eager', or 'auto'."
            )
        return _flash(q, k, v, k_prefix, v_prefix)
    raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")


def _flash_cannot_serve(q, k, v, k_prefix, v_prefix, key_mask, prefix_lengths) -> list[str]:
    """Why the flash-attn path cannot serve a call (empty when it can)."""
    reasons = []
    if flash_attn_func is None:
        reasons.append("flash-attn is not installed (pip install 'melt[cuda]')")
    if not q.is_cuda:
        reasons.append(f"it runs on CUDA only (got {q.device.type} tensors)")
    if q.dtype not in (torch.float16, torch.bfloat16):
        reasons.append(f"it takes float16/bfloat16 only (got {q.dtype})")
    if key_mask is not None:
        reasons.append("it takes no key mask (padding or per-sequence chunk boundaries)")
    if prefix_lengths is not None:
        reasons.append("it takes no per-sequence prefix_lengths")
    tensors = (q, k, v, k_prefix, v_prefix)
    if k_prefix is not None and torch.is_grad_enabled() and any(t.requires_grad for t in tensors if t is not None):
        reasons.append(
            "a prefix under autograd: prefix and chunk are merged by flash-attn's log-sum-exp, whose gradient "
            "flash-attn's backward ignores, so the gradients would be wrong"
        )
    return reasons


def eager_chunk_attention(q, k, v, k_prefix, v_prefix, key_mask, prefix_lengths=None) -> torch.Tensor:
    """Plain PyTorch `chunk_attention`, softmax in fp32 over scores computed where the rows live.

    Shapes as `chunk_attention`. Every mask is built from tensor shapes and device tensors only (no
    data-dependent branch), so `torch.compile(fullgraph=True)` traces it with `prefix_lengths`.
    """
    batch, heads, chunk, dim = q.shape
    kv_heads = k.shape[1]
    group = heads // kv_heads
    prefix_len = 0 if k_prefix is None else k_prefix.shape[2]
    # Queries of one kv head's group side by side: [B, Hkv, G*C, D]; the rows are never repeated per head.
    acc = torch.promote_types(q.dtype, torch.float32)  # softmax in fp32 at least (fp64 stays fp64)
    qg = q.reshape(batch, kv_heads, group * chunk, dim).to(acc) * dim**-0.5
    scores = [qg @ k.to(acc).transpose(-1, -2)]  # [B, Hkv, G*C, C]
    if prefix_len:
        scores.insert(0, qg @ k_prefix.to(acc).transpose(-1, -2))  # [B, Hkv, G*C, P]
    scores = torch.cat(scores, dim=-1).view(batch, kv_heads, group, chunk, prefix_len + chunk)
    causal = torch.ones(chunk, prefix_len + chunk, dtype=torch.bool, device=q.device).tril(prefix_len)
    visible = causal if key_mask is None else causal & key_mask[:, None, None, None, :]
    if prefix_lengths is not None and prefix_len:
        exists = torch.arange(prefix_len, device=q.device) < prefix_lengths[:, None]  # [B, P]
        exists = torch.cat([exists, exists.new_ones(batch, chunk)], dim=1)  # [B, P + C]: chunk rows always exist
        visible = visible & exists[:, None, None, None, :]
    scores = scores.masked_fill(~visible, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # rows with no visible key: zeros
    probs = probs.view(batch, kv_heads, group * chunk, prefix_len + chunk)
    out = probs[..., prefix_len:] @ v.to(acc)
    if prefix_len:
        out = out + probs[..., :prefix_len] @ v_prefix.to(acc)
    return out.view(batch, heads, chunk, dim).to(q.dtype)


def cache_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor | None,
                    no_key: torch.Tensor | None = None) -> torch.Tensor:
    """One new token per sequence attending over preallocated cache buffers that already hold its own row.

    q `[B, H, 1, D]`; keys/values `[B, Hkv, W, D]`, the first W columns of the buffers of the slot this loop reads
    (views), the token's rows of this loop written at its column; `bias` `[B or 1, 1, 1, W]`, added to the scores:
    0 on the columns written so far, the token's own included, that are not padding, -inf elsewhere, or None when
    every column is visible; `no_key` `[B, 1, 1, 1]` bool or None: sequences whose token sees no key (their output is
    zeros, as `chunk_attention` gives), None when every token sees at least its own row.

    One SDPA call in the rows' dtype (its kernels accumulate in fp32): no copy or upcast of the buffers, nothing
    built per call. A compiled step passes the whole buffer (fixed shapes whatever the fill, so
    `torch.compile(fullgraph=True)` traces it); an eager one only the columns written, without a mask unless there
    is padding. Equal to `chunk_attention` over the written columns with the token's rows as the chunk (MELT_SPEC:
    one row per token, overwritten across loops).
    """
    group = q.shape[1] // keys.shape[1]
    dtype = keys.dtype
    bias = None if bias is None else bias.to(dtype)
    out = F.scaled_dot_product_attention(q.to(dtype), keys, values, attn_mask=bias, enable_gqa=group > 1)
    if no_key is not None:
        out = out.masked_fill(no_key, 0.0)
    return out.to(q.dtype)


def _sdpa(q, k, v, key_mask) -> torch.Tensor:
    group = q.shape[1] // k.shape[1]
    if key_mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=group > 1)
    chunk = q.shape[2]
    visible = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril() & key_mask[:, None, None, :]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=visible, enable_gqa=group > 1)
    return out.masked_fill(~visible.any(-1, keepdim=True), 0.0)


def _flash(q, k, v, k_prefix, v_prefix) -> torch.Tensor:
    # flash-attn takes [B, S, H, D] and returns the log-sum-exp, so prefix and chunk are attended separately
    # (prefix non-causal, chunk causal) and merged without concatenating the rows.
    qt = q.transpose(1, 2)
    out, lse, _ = flash_attn_func(qt, k.transpose(1, 2), v.transpose(1, 2), causal=True, return_attn_probs=True)
    if k_prefix is None:
        return out.transpose(1, 2)
    out_p, lse_p, _ = flash_attn_func(
        qt, k_prefix.transpose(1, 2), v_prefix.transpose(1, 2), causal=False, return_attn_probs=True
    )
    lse_max = torch.maximum(lse, lse_p)  # [B, H, C]
    w, w_p = torch.exp(lse - lse_max), torch.exp(lse_p - lse_max)
    merged = (out.float() * (w / (w + w_p)).transpose(1, 2)[..., None]) + (
        out_p.float() * (w_p / (w + w_p)).transpose(1, 2)[..., None]
    )
    return merged.to(q.dtype).transpose(1, 2)


def gated_update(a: torch.Tensor, s: torch.Tensor, W: torch.Tensor, U: torch.Tensor, b: torch.Tensor, backend: str):
    """The learned gate: `z = sigmoid(a W^T + s U^T + b)`, `s' = z * s + (1 - z) * a`.

    With "triton" the two GEMMs are followed by one fused pass (the kernel itself falls back to its reference on
    CPU outside the Triton interpreter). Every other backend, "auto" off CUDA included, and a scalar gate (W, U
    [1, hidden]: one gate per token, broadcast over the hidden units) run the plain PyTorch lines, four ops: the
    bias and then `s U^T` are added inside the GEMMs (addmm), and `lerp` blends in one pass. This is the one place
    MELT's models write the rule.
    """
    if backend == "triton" and a.dtype != torch.float64 and W.shape[0] == a.shape[-1]:
        ga, gs = F.linear(a, W), F.linear(s, U)
        # Under autocast the gate's GEMMs (ga, gs) come out in the autocast dtype while a and s stay in the
        # weights' dtype; the kernel takes one dtype, the one the plain lines below would compute in.
        dtype = functools.reduce(torch.promote_types, (s.dtype, ga.dtype, gs.dtype, b.dtype), a.dtype)
        return triton_gated_update(*(t.to(dtype) for t in (a, s, ga, gs)), b)
    pre = F.linear(a, W, b)
    pre = torch.addmm(pre.reshape(-1, pre.shape[-1]), s.reshape(-1, s.shape[-1]), U.t()).view(pre.shape)
    z = torch.sigmoid(pre)
    dtype = functools.reduce(torch.promote_types, (s.dtype, z.dtype), a.dtype)
    return torch.lerp(a.to(dtype), s.to(dtype), z.to(dtype))
