"""An independent, deliberately plain Ouro (LoopLM) forward written from MELT_SPEC section 1.

It shares no code with `melt`: it reads the weights by their Ouro names from a state dict and recomputes
the looped forward with explicit loops and full attention over the whole sequence, one sequence at a time.
"""

import math

import torch


def _rms(x, weight, eps):
    dtype = x.dtype
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(dtype)


def _rope(x, cos, sin):  # x [H, L, D]
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


def ouro_forward(state: dict, cfg: dict, ids: torch.Tensor, num_loops: int):
    """ids `[L]` -> (per-loop logits `[T, L, V]`, exit logits `[T, L]`)."""
    n_layers, heads, kv_heads = cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    dim = cfg["head_dim"]
    eps, theta = cfg["rms_norm_eps"], cfg["rope_theta"]
    length = ids.shape[0]
    pos = torch.arange(length, dtype=torch.float32)
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    freqs = torch.outer(pos, inv_freq)
    cos, sin = torch.cat([freqs, freqs], -1).cos(), torch.cat([freqs, freqs], -1).sin()
    causal = torch.full((length, length), float("-inf")).triu(1)

    h = state["model.embed_tokens.weight"][ids]
    all_logits, exit_logits = [], []
    for _ in range(num_loops):
        for layer in range(n_layers):
            p = f"model.layers.{layer}."
            a = _rms(h, state[p + "input_layernorm.weight"], eps)
            q = (a @ state[p + "self_attn.q_proj.weight"].T).view(length, heads, dim).transpose(0, 1)
            k = (a @ state[p + "self_attn.k_proj.weight"].T).view(length, kv_heads, dim).transpose(0, 1)
            v = (a @ state[p + "self_attn.v_proj.weight"].T).view(length, kv_heads, dim).transpose(0, 1)
            q, k = _rope(q, cos, sin), _rope(k, cos, sin)
            k = k.repeat_interleave(heads // kv_heads, dim=0)
            v = v.repeat_interleave(heads // kv_heads, dim=0)
            att = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(dim) + causal, dim=-1) @ v  # [H, L, D]
            o = att.transpose(0, 1).reshape(length, heads * dim) @ state[p + "self_attn.o_proj.weight"].T
            h = h + _rms(o, state[p + "input_layernorm_2.weight"], eps)
            m = _rms(h, state[p + "post_attention_layernorm.weight"], eps)
            gate = torch.nn.functional.silu(m @ state[p + "mlp.gate_proj.weight"].T)
            mlp = (gate * (m @ state[p + "mlp.up_proj.weight"].T)) @ state[p + "mlp.down_proj.weight"].T
            h = h + _rms(mlp, state[p + "post_attention_layernorm_2.weight"], eps)
        h = _rms(h, state["model.norm.weight"], eps)
        all_logits.append(h @ state["lm_head.weight"].T)
        exit_logits.append((h @ state["model.early_exit_gate.weight"].T).squeeze(-1)
                           + state["model.early_exit_gate.bias"])
    return torch.stack(all_logits), torch.stack(exit_logits)


def exit_probs(exit_logits: torch.Tensor) -> torch.Tensor:
    """`[T, L]` -> `[T, L]`: p_t = lambda_t prod_{s<t} (1 - lambda_s); the last loop takes what remains."""
    lam = torch.sigmoid(exit_logits)
    probs, remaining = [], torch.ones_like(lam[0])
    for t in range(lam.shape[0]):
        if t == lam.shape[0] - 1:
            probs.append(remaining)
        else:
            probs.append(lam[t] * remaining)
            remaining = remaining * (1 - lam[t])
    return torch.stack(probs)


def select_logits(all_logits, probs, threshold=None, exit_at_step=None):
    """The logits Ouro returns per token: fixed step, else first loop with cumulative p >= threshold, else last."""
    if exit_at_step is not None:
        return all_logits[exit_at_step]
    if threshold is None:
        return all_logits[-1]
    cumulative = probs.cumsum(0)
    out = all_logits[-1].clone()
    for i in range(all_logits.shape[1]):
        for t in range(all_logits.shape[0]):
            if cumulative[t, i] >= threshold:
                out[i] = all_logits[t, i]
                break
    return out
