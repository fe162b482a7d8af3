"""Reference chunk attention in plain PyTorch: the spec of the Triton kernels and their fallback."""

from __future__ import annotations

import torch


def naive_chunk_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_prefix: torch.Tensor | None = None,
    v_prefix: torch.Tensor | None = None,
    key_mask: torch.Tensor | None = None,
    scale: float | None = None,
    return_lse: bool = False,
    *,
    prefix_lengths: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention of a chunk's C queries over [prefix rows | chunk rows], computed in fp32.

    Query i of the chunk (0..C-1) sees every prefix key and the chunk keys j <= i (bottom-right
    causal: query i sits at position P + i of the P + C keys), minus the keys that `key_mask`
    switches off and, with `prefix_lengths`, the prefix rows j >= prefix_lengths[b] of sequence b.
    Query head h reads kv head h // (H // Hkv). A query with no visible key outputs zeros, has
    log-sum-exp -inf, and receives (and passes back) zero gradient.

    Args:
        q: [B, H, C, D] queries.
        k, v: [B, Hkv, C, D] keys/values of the chunk's own rows.
        k_prefix, v_prefix: [B, Hkv, P, D] final rows of earlier chunks, or None (P = 0).
        key_mask: [B, P + C] bool, True where a key may be attended (prefix keys, then chunk keys),
            or None.
        scale: softmax scale, default D ** -0.5.
        return_lse: also return the natural-log log-sum-exp of the scaled scores.
        prefix_lengths: [B] int, prefix rows of each sequence that exist (the rest of the P-row
            prefix tensor is ignored), or None (all P).

    Returns:
        o: [B, H, C, D] in the dtype of q; with return_lse, (o, lse) where lse is [B, H, C] fp32.
    """
    B, H, C, D = q.shape
    group = H // k.shape[1]
    scale = D**-0.5 if scale is None else scale

    def per_query_head(t: torch.Tensor) -> torch.Tensor:
        # [B, Hkv, N, D] -> [B, H, N, D] fp32, kv head h // group serving query head h
        return t.float().repeat_interleave(group, dim=1)

    qf = q.float()
    # Scores of the chunk keys: [B, H, C, C], causal inside the chunk.
    scores_chunk = torch.einsum("bhid,bhjd->bhij", qf, per_query_head(k)) * scale
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    allowed_chunk = causal.expand(B, 1, C, C)
    if k_prefix is not None and k_prefix.shape[2] > 0:
        P = k_prefix.shape[2]
        # Scores of the prefix keys: [B, H, C, P], every query sees every prefix row.
        scores_prefix = torch.einsum("bhid,bhjd->bhij", qf, per_query_head(k_prefix)) * scale
        allowed_prefix = torch.ones(B, 1, C, P, dtype=torch.bool, device=q.device)
        if prefix_lengths is not None:
            exists = torch.arange(P, device=q.device)[None, :] < prefix_lengths[:, None]  # [B, P]
            allowed_prefix = allowed_prefix & exists[:, None, None, :]
        scores = torch.cat([scores_prefix, scores_chunk], dim=-1)  # [B, H, C, P + C]
        allowed = torch.cat([allowed_prefix, allowed_chunk], dim=-1)  # [B, 1, C, P + C]
    else:
        P = 0
        scores, allowed = scores_chunk, allowed_chunk
    if key_mask is not None:
        allowed = allowed & key_mask[:, None, None, :]  # [B, 1, 1, P + C]

    # Joint softmax over [prefix | chunk]. Rows with no allowed key are set to finite zeros before
    # the softmax and multiplied out after it, so that neither they nor their gradients hold NaN.
    row_has_key = allowed.any(dim=-1, keepdim=True)  # [B, 1, C, 1]
    scores = scores.masked_fill(~allowed, float("-inf")).masked_fill(~row_has_key, 0.0)
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)  # [B, H, C, 1]
    probs = torch.exp(scores - lse) * row_has_key

    o = torch.einsum("bhij,bhjd->bhid", probs[..., P:], per_query_head(v))
    if P > 0:
        o = o + torch.einsum("bhij,bhjd->bhid", probs[..., :P], per_query_head(v_prefix))
    o = o.to(q.dtype)
    if not return_lse:
        return o
    lse = lse.squeeze(-1).masked_fill(~row_has_key.squeeze(-1), float("-inf"))
    return o, lse
