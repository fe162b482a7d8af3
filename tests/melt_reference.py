"""An independent, deliberately plain MELT forward written from MELT_SPEC sections 2 and 3 (and 5, the phase-1 blend).

It shares no code with `melt` (as `ouro_reference.py` for Ouro): it reads the weights by name from a state dict and
runs one sequence chunk by chunk, loop by loop, layer by layer, keeping the cache as Python lists of final rows.
"""

import math

import torch

from ouro_reference import _rms, _rope


def _rotary(positions: torch.Tensor, dim: int, theta: float):
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    freqs = torch.outer(positions.float(), inv_freq)
    return torch.cat([freqs, freqs], -1).cos(), torch.cat([freqs, freqs], -1).sin()


def _latent(gate_type: str, loop: int, a, s, p: str, state: dict, ema_decay: float):
    """The latent update of MELT_SPEC section 2: `s = a` on the first loop, then the gate type's rule."""
    if loop == 0 or gate_type == "last":
        return a
    if gate_type == "mean":  # running mean of the loops' inputs
        return (s * loop + a) / (loop + 1)
    if gate_type == "ema":
        z = ema_decay
    else:  # elementwise (W, U: [hidden, hidden]) or scalar (W, U: [1, hidden]): z = sigmoid(a Wz + s Uz + b)
        z = torch.sigmoid(a @ state[p + "gate.W"].T + s @ state[p + "gate.U"].T + state[p + "gate.b"])
    return z * s + (1 - z) * a


def melt_forward(state: dict, cfg: dict, ids: torch.Tensor, num_loops: int, chunks: list[int],
                 blend_alpha: float | None = None, exit_threshold: float | None = None, loops_run: list | None = None):
    """ids `[L]`, split into consecutive chunks of the given lengths -> logits `[L, V]` of each token's last loop.

    Queries of loop t in chunk c attend to the FINAL rows of earlier chunks (under the blend: loop t's blended
    rows `alpha * final + (1 - alpha) * loop_t`) and to the chunk's own rows of loop t, causally.
    `exit_threshold` (one-token chunks only): a token stops after the first loop whose cumulative exit
    probability reaches it; its logits and its row are those of that loop. Loops run are appended to `loops_run`.
    """
    assert sum(chunks) == ids.shape[0]
    assert exit_threshold is None or set(chunks) == {1}
    n_layers, heads, kv_heads = cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    dim = cfg["head_dim"]
    eps, gate_type = cfg["rms_norm_eps"], cfg["gate_type"]
    final_k = [[] for _ in range(n_layers)]  # per layer: one row [kv_heads, D] per token, in order
    final_v = [[] for _ in range(n_layers)]
    loop_k = [[[] for _ in range(num_loops)] for _ in range(n_layers)]  # blended rows read by loop t
    loop_v = [[[] for _ in range(num_loops)] for _ in range(n_layers)]
    logits = []
    start = 0
    for size in chunks:
        positions = torch.arange(start, start + size)
        cos, sin = _rotary(positions, dim, cfg["rope_theta"])
        h = state["model.embed_tokens.weight"][ids[start : start + size]]
        latents = [None] * n_layers
        a_rows = [[None] * n_layers for _ in range(num_loops)]
        survive, cumulative, ran = 1.0, 0.0, 0
        for loop in range(num_loops):
            for layer in range(n_layers):
                p = f"model.layers.{layer}."
                a = _rms(h, state[p + "input_layernorm.weight"], eps)
                s = latents[layer] = _latent(gate_type, loop, a, latents[layer], p, state, cfg["ema_decay"])

                def project(x, name, heads_of, p=p, size=size):  # binds this layer's prefix and chunk size
                    return (x @ state[p + f"self_attn.{name}_proj.weight"].T).view(size, heads_of, dim).transpose(0, 1)

                q = _rope(project(a, "q", heads), cos, sin)
                k, v = _rope(project(s, "k", kv_heads), cos, sin), project(s, "v", kv_heads)
                if blend_alpha is not None:
                    k_a, v_a = _rope(project(a, "k", kv_heads), cos, sin), project(a, "v", kv_heads)
                    a_rows[loop][layer] = (k_a, v_a)
                    k, v = blend_alpha * k + (1 - blend_alpha) * k_a, blend_alpha * v + (1 - blend_alpha) * v_a
                    prefix_k, prefix_v = loop_k[layer][loop], loop_v[layer][loop]
                else:
                    prefix_k, prefix_v = final_k[layer], final_v[layer]
                keys = torch.cat([torch.stack(prefix_k, 1), k], 1) if prefix_k else k  # [kv_heads, P + C, D]
                values = torch.cat([torch.stack(prefix_v, 1), v], 1) if prefix_v else v
                keys = keys.repeat_interleave(heads // kv_heads, dim=0)
                values = values.repeat_interleave(heads // kv_heads, dim=0)
                prefix = keys.shape[1] - size
                mask = torch.full((size, prefix + size), float("-inf")).triu(prefix + 1)
                att = torch.softmax(q @ keys.transpose(1, 2) / math.sqrt(dim) + mask, dim=-1) @ values
                o = att.transpose(0, 1).reshape(size, heads * dim) @ state[p + "self_attn.o_proj.weight"].T
                h = h + _rms(o, state[p + "input_layernorm_2.weight"], eps)
                m = _rms(h, state[p + "post_attention_layernorm.weight"], eps)
                gate, up = m @ state[p + "mlp.gate_proj.weight"].T, m @ state[p + "mlp.up_proj.weight"].T
                h = h + _rms((torch.nn.functional.silu(gate) * up) @ state[p + "mlp.down_proj.weight"].T,
                             state[p + "post_attention_layernorm_2.weight"], eps)
            h = _rms(h, state["model.norm.weight"], eps)
            ran += 1
            if exit_threshold is not None:
                gate_logit = h @ state["model.early_exit_gate.weight"].T + state["model.early_exit_gate.bias"]
                hazard = torch.sigmoid(gate_logit).item()
                cumulative += survive if loop == num_loops - 1 else hazard * survive
                survive *= 1 - hazard
                if cumulative >= exit_threshold:
                    break
        if loops_run is not None:
            loops_run.append(ran)
        logits.append(h @ state["lm_head.weight"].T)
        for layer in range(n_layers):  # the chunk's rows are final: from the latent after the last loop
            p = f"model.layers.{layer}."
            s = latents[layer]
            k = _rope((s @ state[p + "self_attn.k_proj.weight"].T).view(size, kv_heads, dim).transpose(0, 1), cos, sin)
            v = (s @ state[p + "self_attn.v_proj.weight"].T).view(size, kv_heads, dim).transpose(0, 1)
            final_k[layer] += list(k.unbind(1))
            final_v[layer] += list(v.unbind(1))
            if blend_alpha is not None:
                for loop in range(num_loops):
                    k_a, v_a = a_rows[loop][layer]
                    loop_k[layer][loop] += list((blend_alpha * k + (1 - blend_alpha) * k_a).unbind(1))
                    loop_v[layer][loop] += list((blend_alpha * v + (1 - blend_alpha) * v_a).unbind(1))
        start += size
    return torch.cat(logits)


def chunks_of(length: int, chunk_size: int, then_single_from: int | None = None) -> list[int]:
    """Chunk lengths of a sequence: boundaries at multiples of `chunk_size`, and single tokens from
    `then_single_from` on (token-by-token decode after a prefill)."""
    end = length if then_single_from is None else then_single_from
    sizes = [min(chunk_size, end - i) for i in range(0, end, chunk_size)]
    return sizes + [1] * (length - end)
