"""MELT: a looped transformer that keeps one gated key/value row per token per layer.

The architecture, in the choices that matter:
- Loops. A stack of N layers runs T = `num_loops` times per token with the same weights (Ouro / LoopLM).
  Each layer uses sandwich norms; the final norm runs after EVERY loop and its output feeds the next loop;
  RoPE cos/sin are computed once per forward and shared by all loops. After each loop an exit gate gives a
  hazard, hence an exit distribution over loops. `exit_at_step` picks which loop's logits a token returns;
  `early_exit_threshold` < 1 stops a token's loops at the first loop whose cumulative exit probability reaches
  it (adaptive depth): the token then holds its hidden state and latent, so its logits and its ONE row are those
  of its own exit loop, and a chunk skips the loops left once all its tokens have exited. Per-loop (Ouro)
  caches get the exit loop's row copied into the later loops' slots.
- Two cache modes. `per_loop` is Ouro exactly: loop t of layer l attends to loop-t rows, so the cache holds
  N*T rows per token. `shared` is MELT: each layer carries a latent state `s` per token, updated by a gate
  from the layer input `a` (`s = a` on the first loop, then `s = z*s + (1-z)*a`), keys/values come from `s`
  and overwrite the token's ONE row, so the cache holds N rows per token for any T.
- Chunks. A token's row is final only after its last loop, so `shared` mode processes a sequence in chunks
  of `chunk_size` tokens: all loops of chunk c run (its tokens in parallel) attending to the final rows of
  earlier chunks and to the chunk's own current-loop rows, then the chunk's rows are final. Chunk
  boundaries are multiples of C on each sequence's own positions, so padding never changes a result.
  Decoding one token at a time is C = 1, exact autoregressive semantics.
- Phase-1 blend. `kv_blend_alpha` makes the attention read `alpha * KV_melt + (1 - alpha) * KV_loop`;
  alpha = 0 is Ouro exactly, alpha = 1 is MELT. The converter ramps it. Loop t's prefix rows are blended
  once, when the chunk's rows are final, and stored in the cache's loop slot t (see cache_melt.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import CausalLMOutputWithPast, ModelOutput
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import can_return_tuple

from .attention import cache_attention, chunk_attention, gated_update, requested_backend, resolve_backend
from .cache_melt import MeltCache
from .configuration_melt import MeltConfig, validate_exit_step, validate_num_loops


class MeltRMSNorm(nn.Module):
    """RMSNorm as Ouro computes it: normalise in fp32 (fp64 stays fp64), cast back to the input dtype, then scale.

    The normalisation is torch's `F.rms_norm` without a weight, on the input as it is: it computes in fp32 at least
    and returns the input's dtype. On CPU it decomposes into exactly the lines Ouro writes, casts included
    (bit-identical; a test checks it in bf16 and fp16), and on CUDA it can run as one fused kernel with the casts
    inside it; the weight is applied after the cast back, as Ouro does, which a fused weighted call would not do.
    """

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # `.to`: a no-op, unless autocast runs rms_norm in fp32; the normalised values are rounded to x's dtype then
        return self.weight * F.rms_norm(x, (x.shape[-1],), eps=self.eps).to(x.dtype)


def rotary_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float,
                   dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """The tables `apply_rotary` takes for `position_ids` `[B, L]`: cos and a signed sin, each `[B, L, head_dim]`,
    computed in fp32 and returned in `dtype`, the dtype of the queries and keys they rotate.

    Rotate-half convention: `x * cos + rotate_half(x) * sin` with `rotate_half(x) = [-x2, x1]`. The sign of the
    first half is folded into the table (`[-sin, sin]`), so a rotation is `x * cos + roll(x, D/2) * signed_sin`:
    one launch fewer than negating and concatenating, and the same numbers (a sign flip is exact).
    Computed once per forward and shared by every (layer, loop): cast here once rather than at each of the
    N*T*2 rotations (a kernel each on a GPU in bf16). inv_freq is rebuilt here rather than kept as a buffer:
    it is D/2 numbers, and no buffer means nothing to re-create after meta-device loading.
    """
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32) / head_dim)
    freqs = position_ids.float()[..., None] * inv_freq  # [B, L, D/2]
    cos, sin = freqs.cos(), freqs.sin()
    return torch.cat([cos, cos], dim=-1).to(dtype), torch.cat([-sin, sin], dim=-1).to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x `[B, H, L, D]`; cos, signed_sin `[B, L, D]` from `rotary_cos_sin`."""
    cos, signed_sin = cos[:, None].to(x.dtype), signed_sin[:, None].to(x.dtype)
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


class MeltMLP(nn.Module):
    def __init__(self, config: MeltConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MeltAttention(nn.Module):
    """Ouro's projections. Queries always come from the layer input `a`; keys/values from whatever the
    cache mode stores (`a` in per_loop mode, the latent state `s` in shared mode)."""

    def __init__(self, config: MeltConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        hidden = config.hidden_size
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=False)

    def query(self, a: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        batch, length, _ = a.shape
        q = self.q_proj(a).view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)  # [B, H, L, D]
        return apply_rotary(q, cos, sin)

    def key_value(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch, length, _ = x.shape
        k = self.k_proj(x).view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)  # [B, Hkv, L, D]
        v = self.v_proj(x).view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)  # [B, Hkv, L, D]
        return apply_rotary(k, cos, sin), v


GATE_MARKER = ".gate."  # in the name of every gate parameter (`model.layers.{l}.gate.W`): new at conversion


class MeltLatentGate(nn.Module):
    """The latent update `s <- z * s + (1 - z) * a` of one layer, for each `gate_type`.

    - elementwise: `z = sigmoid(a W^T + s U^T + b)`, one gate per hidden unit (W, U: [hidden, hidden]).
    - scalar: the same with W, U: [1, hidden], b: [1]: one gate per token.
    - mean: `s` is the running mean of the loops' `a` (z = (t-1)/t at loop t, counting from 1).
    - ema: fixed `z = ema_decay`.
    - last: `s = a`, only the latest loop's input is kept.
    On the first loop `s = a` for every type. Parameters exist only for elementwise and scalar; see
    `MeltPreTrainedModel._init_weights` for their initialisation.
    """

    def __init__(self, config: MeltConfig):
        super().__init__()
        self.gate_type = config.gate_type
        self.ema_decay = float(config.ema_decay)
        if self.gate_type in ("elementwise", "scalar"):
            width = config.hidden_size if self.gate_type == "elementwise" else 1
            self.W = nn.Parameter(torch.empty(width, config.hidden_size))
            self.U = nn.Parameter(torch.empty(width, config.hidden_size))
            self.b = nn.Parameter(torch.empty(width))

    def forward(self, a: torch.Tensor, s: torch.Tensor | None, loop: int, backend: str) -> torch.Tensor:
        if loop == 0 or s is None or self.gate_type == "last":
            return a
        if self.gate_type == "mean":
            return s + (a - s) / (loop + 1)
        if self.gate_type == "ema":
            return torch.lerp(a, s, self.ema_decay)
        return gated_update(a, s, self.W, self.U, self.b, backend)


@dataclass(frozen=True)
class _LayerInputs:
    """What every (layer, loop) of one chunk shares: positions, visibility, blend and backend."""

    cos: torch.Tensor  # [B, C, head_dim]
    sin: torch.Tensor
    key_mask: torch.Tensor | None  # [B, P + C] bool
    kv_blend_alpha: float | None
    backend: str
    prefix_lengths: torch.Tensor | None = None  # [B]: prefix rows that exist (a preallocated buffer's fill)
    in_place: _InPlaceRows | None = None  # the decode step attends over the cache buffers themselves


@dataclass(frozen=True)
class _InPlaceRows:
    """How the preallocated decode step attends without the Triton kernels: each (layer, loop) writes the new
    token's rows into the cache column it will own (`place`, `MeltCache.static_place_rows`), then attends over
    the buffers' first `columns` columns with `cache_attention`; see `MeltModel._static_decode_step`."""

    place: Callable[[int, int, tuple, int], tuple[torch.Tensor, torch.Tensor]]
    columns: int  # the buffer's width when compiled (fixed shapes); eager: the columns written, this token's included
    bias: torch.Tensor | None  # [B or 1, 1, 1, columns]: 0 where written and not padding, else -inf; None: all 0
    no_key: torch.Tensor | None  # [B, 1, 1, 1] bool: tokens that see no key (None: each sees its own row)


class LayerOutput(NamedTuple):
    """One layer at one loop: `shared_rows` = (k, v) from the latent (shared mode), `loop_rows` = (k, v) from
    the layer input `a` (per_loop mode, or the phase-1 blend), `attn` `[B, C, H*D]` the attention output before
    o_proj."""

    hidden: torch.Tensor
    latent: torch.Tensor | None
    shared_rows: tuple[torch.Tensor, torch.Tensor] | None
    loop_rows: tuple[torch.Tensor, torch.Tensor] | None
    attn: torch.Tensor


class MeltDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: MeltConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.self_attn = MeltAttention(config)
        self.mlp = MeltMLP(config)
        self.input_layernorm = MeltRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.input_layernorm_2 = MeltRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = MeltRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm_2 = MeltRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.gate = MeltLatentGate(config) if config.cache_mode == "shared" else None

    def forward(
        self,
        hidden: torch.Tensor,  # [B, C, hidden]: the chunk's residual stream
        latent: torch.Tensor | None,  # [B, C, hidden]: the chunk's latent state `s` (shared mode), None on loop 0
        k_prefix: torch.Tensor | None,  # [B, Hkv, P, D]: prefix rows this loop reads
        v_prefix: torch.Tensor | None,
        loop: int,
        inputs: _LayerInputs,
        active: torch.Tensor | None = None,  # [B, C] bool: tokens still looping (early exit); None = all
        held_rows: tuple[torch.Tensor, torch.Tensor] | None = None,  # per_loop: this layer's rows of the last loop
    ) -> LayerOutput:
        """One layer at one loop, as a pure function of its inputs (so it can be checkpointed); the tensors that
        carry gradients are positional. A token that is not `active` has exited: its hidden state and latent pass
        through unchanged, so its shared row stays the one of its exit loop, and its per-loop rows are `held_rows`
        (its exit loop's, as Ouro copies them)."""
        cos, sin, kv_blend_alpha, backend = inputs.cos, inputs.sin, inputs.kv_blend_alpha, inputs.backend
        a = self.input_layernorm(hidden)
        q = self.self_attn.query(a, cos, sin)
        shared_rows = loop_rows = None
        if self.gate is None:
            loop_rows = self.self_attn.key_value(a, cos, sin)
            if active is not None and held_rows is not None:
                keep = active[:, None, :, None]  # [B, 1, C, 1]
                loop_rows = tuple(torch.where(keep, new, old) for new, old in zip(loop_rows, held_rows))
            k, v = loop_rows
        else:
            updated = self.gate(a, latent, loop, backend)
            latent = updated if active is None or latent is None else torch.where(active[..., None], updated, latent)
            shared_rows = self.self_attn.key_value(latent, cos, sin)
            k, v = shared_rows
            if kv_blend_alpha is not None:
                loop_rows = self.self_attn.key_value(a, cos, sin)
                k, v = torch.lerp(loop_rows[0], k, kv_blend_alpha), torch.lerp(loop_rows[1], v, kv_blend_alpha)
        if inputs.in_place is None:
            attn = chunk_attention(q, k, v, k_prefix, v_prefix, inputs.key_mask, backend,
                                   prefix_lengths=inputs.prefix_lengths)
        else:
            rows = inputs.in_place
            keys, values = rows.place(self.layer_idx, loop, (k, v), rows.columns)
            attn = cache_attention(q, keys, values, rows.bias, rows.no_key)
        attn = attn.transpose(1, 2).flatten(2)  # [B, C, H*D]
        out = hidden + self.input_layernorm_2(self.self_attn.o_proj(attn))
        out = out + self.post_attention_layernorm_2(self.mlp(self.post_attention_layernorm(out)))
        if active is not None:
            out = torch.where(active[..., None], out, hidden)
        return LayerOutput(out, latent, shared_rows, loop_rows, attn)


class MeltPreTrainedModel(PreTrainedModel):
    config_class = MeltConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["MeltDecoderLayer"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Normal(0, initializer_range) linears and embeddings, unit norms (transformers' defaults), and the gate:

        W and U start at ZERO and b at `gate_bias_init` (-3): every gate is then a fixed z = sigmoid(-3) ~ 0.05,
        so a freshly converted model keeps ~95% of the current loop's input in its latent state, close to the
        training-free `last` conversion, which is the strongest training-free baseline. Zero W, U still get
        gradients (dz/dW = z(1-z) a), so training moves away from this start at once.
        """
        super()._init_weights(module)
        if isinstance(module, MeltLatentGate) and hasattr(module, "W"):
            init.zeros_(module.W)
            init.zeros_(module.U)
            init.constant_(module.b, self.config.gate_bias_init)

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the model creates its own MeltCache


@dataclass
class MeltModelOutput(ModelOutput):
    """Output of `MeltModel`.

    last_hidden_state: `[B, L, hidden]` final-normed hidden state of the loop selected per token.
    cache: the `MeltCache` (when `use_cache`).
    exit_probs: `[B, L, T]` probability of exiting at each loop (under early exit, loops after a token's exit
        repeat its exit loop's gate).
    loops_run: `[B, L]` loops each token ran (T unless `early_exit_threshold` < 1 stopped it earlier).
    loop_hidden_states: T tensors `[B, L, hidden]`, one per loop (with `return_loop_outputs`).
    attention_outputs: T tuples of N tensors `[B, L, H*D]`, attention output of (loop, layer) before o_proj
        (with `return_attention_outputs`).
    """

    last_hidden_state: torch.Tensor | None = None
    cache: MeltCache | None = None
    exit_probs: torch.Tensor | None = None
    loops_run: torch.Tensor | None = None
    loop_hidden_states: tuple[torch.Tensor, ...] | None = None
    attention_outputs: tuple[tuple[torch.Tensor, ...], ...] | None = None


@dataclass
class MeltCausalLMOutput(CausalLMOutputWithPast):
    """`CausalLMOutputWithPast` plus the loop outputs of `MeltModelOutput`; `loop_logits`: T tensors `[B, K, V]`
    for the `logits_to_keep` positions, `loop_hidden_states`: T tensors `[B, L, hidden]` for all of them (both
    with `return_loop_outputs`)."""

    exit_probs: torch.Tensor | None = None
    loops_run: torch.Tensor | None = None
    loop_logits: tuple[torch.Tensor, ...] | None = None
    loop_hidden_states: tuple[torch.Tensor, ...] | None = None
    attention_outputs: tuple[tuple[torch.Tensor, ...], ...] | None = None


@dataclass(frozen=True)
class _CallPlan:
    """What one forward call computes, resolved once from its arguments and the config (`MeltModel._plan_call`)."""

    num_loops: int
    blend: float | None  # phase-1 kv_blend_alpha (None: MELT's shared rows alone)
    exit_at_step: int | None  # the loop whose output every token returns
    stop_at: float | None  # early exit that stops a token's loops (adaptive depth)
    keep_loops: frozenset[int]  # loops whose hidden states the output needs
    return_loop_outputs: bool
    collect_attention: bool  # every (loop, layer)'s attention output (phase-2 alignment)


@dataclass
class _LoopsOutput:
    """The loops' outputs for the columns of a call (or of one round)."""

    exit_logits: torch.Tensor  # [B, W, T]
    hidden: dict[int, torch.Tensor]  # loop -> [B, W, hidden], for the loops in `keep_loops`
    attention: list[list[torch.Tensor]] | None  # [loop][layer] -> [B, W, H*D]
    loops_run: torch.Tensor  # [B, W]


@dataclass
class _Round:
    """The tokens of this call that form one chunk of every sequence, processed through all loops together.

    `columns` is a slice when every sequence has its chunk at the same columns (no padding, or padding that
    keeps boundaries aligned); otherwise a `[B, W]` index tensor with `valid` marking real entries (the
    chunk of sequence b is `columns[b, :count_b]`, contiguous).
    """

    columns: slice | torch.Tensor
    valid: torch.Tensor | None
    prefix_len: int  # cache columns visible to this round (the rows before it)
    key_mask: torch.Tensor | None  # [B, prefix_len + W]
    write_index: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # (batch, slot, cache column)

    @property
    def write_at(self) -> tuple[int, tuple | None]:
        """Arguments `(start, index)` of `MeltCacheLayer.write` for this round's rows."""
        return (self.prefix_len, None) if self.write_index is None else (0, self.write_index)

    def take(self, x: torch.Tensor) -> torch.Tensor:
        """Gather this round's entries of `x` `[B, L, ...]` -> `[B, W, ...]`."""
        if isinstance(self.columns, slice):
            return x[:, self.columns]
        index = self.columns.view(*self.columns.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:])
        return x.gather(1, index)


class MeltModel(MeltPreTrainedModel):
    def __init__(self, config: MeltConfig):
        super().__init__(config)
        # No padding_idx: Ouro's pad token is also its eos (id 0), a real token of packed training data whose
        # embedding must stay learnable (a padding_idx row is zeroed and frozen).
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(MeltDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = MeltRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.early_exit_gate = nn.Linear(config.hidden_size, 1)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    @can_return_tuple
    @deprecate_kwarg("past_key_values", version="6.0.0", new_name="cache", raise_if_both_names=True)
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: MeltCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        num_loops: int | None = None,
        kv_blend_alpha: float | None = None,
        return_loop_outputs: bool = False,
        return_attention_outputs: bool = False,
        exit_at_step: int | None = None,
        early_exit_threshold: float | None = None,
        **kwargs,
    ) -> MeltModelOutput:
        _refuse_unknown_kwargs(kwargs, "MeltModel.forward")
        plan = self._plan_call(num_loops, kv_blend_alpha, exit_at_step, early_exit_threshold, return_loop_outputs,
                               return_attention_outputs)
        inputs_embeds = self._embed(input_ids, inputs_embeds)
        batch, length = inputs_embeds.shape[:2]
        use_cache = self.config.use_cache if use_cache is None else use_cache
        internal_cache = cache is None
        if internal_cache:
            # Even without use_cache, a chunked forward keeps rows across chunks: the cache is then internal.
            cache = MeltCache(self.config, num_loops=plan.num_loops, keep_loop_rows=plan.blend is not None)
        self._check_cache(cache, batch)
        cache.begin_call(plan.num_loops, plan.blend)
        if cache.is_preallocated and length == 1 and plan.blend is None:
            out = self._static_decode_step(inputs_embeds, attention_mask, position_ids, cache, plan)
        else:
            out = self._chunked_call(inputs_embeds, attention_mask, position_ids, cache, plan,
                                     store_rows=use_cache or not internal_cache)
        return self._output(out, plan, cache if use_cache else None)

    def _plan_call(self, num_loops, kv_blend_alpha, exit_at_step, early_exit_threshold, return_loop_outputs,
                   return_attention_outputs) -> _CallPlan:
        """Check the call's loop options against each other and the config, once, before any compute."""
        config = self.config
        num_loops = config.num_loops if num_loops is None else num_loops
        validate_num_loops(num_loops, "num_loops")
        exit_at_step = config.exit_at_step if exit_at_step is None else exit_at_step
        threshold = config.early_exit_threshold if early_exit_threshold is None else early_exit_threshold
        if exit_at_step is not None:
            validate_exit_step(exit_at_step, num_loops)
        if early_exit_threshold is not None and not 0.0 <= float(early_exit_threshold) <= 1.0:
            raise ValueError(f"early_exit_threshold must lie in [0, 1] (1 = every loop), got {early_exit_threshold!r}")
        blend = self._check_blend(kv_blend_alpha)
        # Early exit (MELT_SPEC section 8): a token stops looping once its cumulative exit probability reaches the
        # threshold; it then holds its exit loop's state, so the last loop's output is its exit loop's. A fixed
        # exit_at_step takes precedence (every loop runs, that loop's output is returned).
        stop_at = threshold if exit_at_step is None and threshold is not None and threshold < 1.0 else None
        if stop_at is not None and blend is not None:
            raise ValueError(
                "early_exit_threshold < 1 stops loops at inference; it does not combine with kv_blend_alpha"
            )
        if return_loop_outputs:
            keep_loops = frozenset(range(num_loops))
        else:
            keep_loops = frozenset({num_loops - 1 if exit_at_step is None else exit_at_step})
        return _CallPlan(num_loops, blend, exit_at_step, stop_at, keep_loops, return_loop_outputs,
                         return_attention_outputs)

    def _embed(self, input_ids, inputs_embeds) -> torch.Tensor:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            self._check_input_ids(input_ids)
            inputs_embeds = self.embed_tokens(input_ids)
        elif inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != self.config.hidden_size:
            raise ValueError(
                f"inputs_embeds must be [batch, length, hidden_size={self.config.hidden_size}], "
                f"got shape {tuple(inputs_embeds.shape)}"
            )
        if inputs_embeds.shape[0] == 0 or inputs_embeds.shape[1] == 0:
            raise ValueError("empty input: input_ids/inputs_embeds must hold at least one token per sequence")
        return inputs_embeds

    def _chunked_call(self, embeds, attention_mask, position_ids, cache: MeltCache, plan: _CallPlan,
                      store_rows: bool) -> _LoopsOutput:
        """Any call but the preallocated one-token step: the columns are split into rounds (one chunk of every
        sequence each, `_plan_rounds`), each round runs all loops, and the rounds' outputs are put back in
        column order. Rows nobody reads are not stored: without `store_rows` only rounds after the first read
        rows."""
        config = self.config
        batch, length = embeds.shape[:2]
        past = cache.get_seq_length()
        key_mask = self._full_key_mask(attention_mask, batch, past + length, embeds.device, cache)
        if position_ids is None:
            if key_mask is not None:
                position_ids = (key_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]
            else:
                position_ids = torch.arange(past, past + length, device=embeds.device).expand(batch, -1)
        real = None if key_mask is None else key_mask[:, past:]
        max_position = int(position_ids.max() if real is None else position_ids.masked_fill(~real, 0).max())
        if max_position >= config.max_position_embeddings:
            raise ValueError(
                f"sequence reaches position {max_position} but max_position_embeddings is "
                f"{config.max_position_embeddings}; shorten the input or raise max_position_embeddings"
            )
        cos, sin = rotary_cos_sin(position_ids, config.head_dim, config.rope_theta, self._compute_dtype(embeds))
        backend = resolve_backend(config.attention_backend, embeds.device)
        rounds = self._plan_rounds(position_ids, real, key_mask, past, length, embeds.device)
        store_rows = store_rows or len(rounds) > 1
        if store_rows:
            cache.make_room(past + length, like=self._row_like(embeds, batch))
        per_round = [self._run_round(embeds, cos, sin, rnd, cache if store_rows else None, plan, backend)
                     for rnd in rounds]
        if store_rows:
            cache.end_call(past + length)

        def assemble(pieces):
            return _assemble(pieces, rounds, length)

        attention = None
        if plan.collect_attention:
            attention = [[assemble([r.attention[t][idx] for r in per_round]) for idx in range(len(self.layers))]
                         for t in range(plan.num_loops)]
        return _LoopsOutput(
            exit_logits=assemble([r.exit_logits for r in per_round]),
            hidden={t: assemble([r.hidden[t] for r in per_round]) for t in plan.keep_loops},
            attention=attention,
            loops_run=assemble([r.loops_run for r in per_round]),
        )

    def _output(self, out: _LoopsOutput, plan: _CallPlan, cache: MeltCache | None) -> MeltModelOutput:
        """Each token's returned hidden state: the fixed `exit_at_step`'s, else the last loop's (under early exit a
        token's last loop holds its exit loop's state)."""
        exit_probs = exit_distribution(out.exit_logits)
        selected = out.hidden[plan.num_loops - 1 if plan.exit_at_step is None else plan.exit_at_step]
        attention = None if out.attention is None else tuple(tuple(per_loop) for per_loop in out.attention)
        return MeltModelOutput(
            last_hidden_state=selected,
            cache=cache,
            exit_probs=exit_probs,
            loops_run=out.loops_run,
            loop_hidden_states=(tuple(out.hidden[t] for t in range(plan.num_loops))
                                if plan.return_loop_outputs else None),
            attention_outputs=attention,
        )

    # -- the loops of one chunk: shared by a round and the preallocated decode step ------------------------------

    def _run_loops(self, hidden, plan: _CallPlan, inputs: _LayerInputs,
                   read_prefix: Callable[[int, int], tuple],
                   on_loop_rows: Callable[[int, int, tuple], None] | None,
                   can_skip: bool) -> tuple[_LoopsOutput, list]:
        """All loops over all layers for one chunk `[B, W, hidden]`; returns the outputs and each layer's shared
        rows of the last loop (final once the loops are done, for the caller to commit).

        `read_prefix(layer, loop)` gives the prefix rows a (layer, loop) attends to; `on_loop_rows(layer, loop,
        rows)` receives per-loop rows (per_loop mode, or the blend) as soon as they exist, and the exit loop's rows
        again for every loop a token skipped. With early exit, `can_skip` lets the loops end once every token has
        exited (one host read per loop: the compute saved); without it (a captured step) every loop runs with the
        exited tokens masked."""
        n_layers = len(self.layers)
        latents, final_rows, held = [None] * n_layers, [None] * n_layers, [None] * n_layers
        exits, loop_hidden = [], {}
        attention = [[None] * n_layers for _ in range(plan.num_loops)] if plan.collect_attention else None
        stop = None if plan.stop_at is None else _EarlyExit(plan.stop_at, hidden.shape[:2], hidden.device)
        for loop in range(plan.num_loops):
            if can_skip and stop is not None and loop > 0 and not bool(stop.active.any()):
                # Every token has exited: the loops left are skipped. Per-loop caches get the exit loop's rows in
                # the skipped loops' slots (Ouro copies them).
                for later in range(loop, plan.num_loops):
                    for idx in range(n_layers):
                        if on_loop_rows is not None and held[idx] is not None:
                            on_loop_rows(idx, later, held[idx])
                    exits.append(exits[-1])
                    if later in plan.keep_loops:
                        loop_hidden[later] = hidden
                break
            active = None if stop is None or loop == 0 else stop.active
            for idx, layer in enumerate(self.layers):
                k_prefix, v_prefix = read_prefix(idx, loop)
                hidden, latents[idx], shared_rows, loop_rows, attn = layer(
                    hidden, latents[idx], k_prefix, v_prefix, loop, inputs, active, held[idx]
                )
                if loop_rows is not None:
                    if on_loop_rows is not None:
                        on_loop_rows(idx, loop, loop_rows)
                    held[idx] = loop_rows
                final_rows[idx] = shared_rows
                if attention is not None:
                    attention[loop][idx] = attn
            hidden = self._loop_end(hidden, active)
            exits.append(self.early_exit_gate(hidden))
            if stop is not None:
                stop.after_loop(exits[-1], loop == plan.num_loops - 1)
            if loop in plan.keep_loops:
                loop_hidden[loop] = hidden
        loops_run = _all_loops(hidden, plan.num_loops) if stop is None else stop.loops_run
        out = _LoopsOutput(torch.stack(exits, dim=2).squeeze(-1), loop_hidden, attention, loops_run)
        return out, final_rows

    # -- one token per sequence on a preallocated cache: the capturable decode step ------------------------------

    def _static_decode_step(self, embeds, attention_mask, position_ids, cache: MeltCache,
                            plan: _CallPlan) -> _LoopsOutput:
        """Decode one token per sequence with fixed shapes and no host sync, so that it can be compiled with
        `fullgraph=True` and captured as a CUDA graph; the same step runs eagerly when not compiled.

        Two ways to attend, each reading a (layer, loop)'s slot buffer (`[B, kv_heads, max_cache_len, D]`) in place,
        never a copy:
        - in place (`cache_attention`, SDPA): every backend but a forced "triton", "eager" or "flash", i.e. "auto" off
          CUDA, "sdpa", and "auto" when compiled (a choice, not a constraint: see the comment where it is set). Each
          (layer, loop) first writes the new token's rows at column `fill`, the column the token owns (MELT_SPEC: one
          row per token, overwritten across loops), then attends over the columns `<= fill` that are not padding:
          compiled, the whole buffer under a mask; eager, only those columns (the host knows `fill`), masked only
          for padding. After the last loop the shared column holds the final row and per-loop rows are in their
          slots: nothing is left to write.
        - prefix + chunk (`chunk_attention` with `prefix_lengths = fill`): the Triton kernels (CUDA eager, and a
          forced "triton" compiled, where they are graph operators), which skip the key blocks past `fill`, and the
          eager reference. The new token's rows of the current loop are the chunk (C = 1); per-loop rows are written
          at `fill` as soon as they exist, the shared row after the last loop.
        Then `fill` (a `[1]` device counter) advances. Positions come from the mask (or from `fill`) as tensors.
        `attention_mask` may be `[B, fill + 1]` (generate's growing mask) or `[B, max_cache_len]` (the fixed-width
        mask `create_masks_for_generate` gives a compiled step).
        """
        config = self.config
        batch, device = embeds.shape[0], embeds.device
        columns = cache.max_cache_len
        if torch.is_grad_enabled():
            raise RuntimeError(
                "a preallocated cache (max_cache_len) is for inference: its decode step writes rows in place. Call it "
                "under torch.no_grad() or torch.inference_mode(), as generate does; training uses a cache without "
                "max_cache_len"
            )
        if not cache.is_initialized:
            cache.make_room(1, like=self._row_like(embeds, batch))
        width = columns  # compiled: the whole buffer, masked past `fill` (fixed shapes)
        if not torch.compiler.is_compiling():
            width = cache.get_seq_length() + 1  # eager: one host read, and the attention reads the written columns
            if width > columns:
                raise ValueError(
                    f"this cache was preallocated for {columns} tokens and is full; create it with a larger "
                    "max_cache_len"
                )
        fill = cache.fill  # [1]
        column = torch.arange(columns, device=device)
        mask = None
        if attention_mask is not None:
            mask = attention_mask.to(device=device, dtype=torch.bool)
            if mask.dim() != 2 or mask.shape[0] != batch or mask.shape[1] > columns:
                raise ValueError(
                    f"attention_mask must be [batch, past + 1] or [batch, max_cache_len] = [{batch}, <= {columns}] "
                    f"with this preallocated cache, got shape {tuple(attention_mask.shape)}"
                )
            mask = F.pad(mask, (0, columns - mask.shape[1]))  # [B, S]: padding columns are False
            if position_ids is None:  # real tokens written before this one
                position_ids = (mask & (column < fill)).sum(-1, keepdim=True)
        if position_ids is None:
            position_ids = fill.view(1, 1).expand(batch, 1)
        dtype = self._compute_dtype(embeds)  # of the queries, the rows and the attention bias
        cos, sin = rotary_cos_sin(position_ids, config.head_dim, config.rope_theta, dtype)
        backend = resolve_backend(config.attention_backend, device)
        if torch.compiler.is_compiling() and requested_backend(config.attention_backend) == "auto":
            # Compiled, "auto" is the in-place SDPA step and the gate's plain lines, which inductor fuses; a forced
            # "triton" keeps the kernels, in the graph as melt:: operators. Which is faster on a GPU is measured by
            # benchmarks.gpu_suite (part b: the attention alone; part d: graphs vs graphs+triton), not yet run.
            backend = "auto"
        if backend in ("auto", "sdpa"):
            # Eager, the window is the columns written, this token's included: only padding needs a mask.
            visible = column <= fill if torch.compiler.is_compiling() else None  # [S]
            no_key = bias = None
            if mask is not None:
                visible = mask[:, :width] if visible is None else visible & mask  # [B, W]
                no_key = ~visible.any(-1).view(batch, 1, 1, 1)
            if visible is not None:
                # Additive, built once per step: SDPA would turn a bool mask into this at each (layer, loop).
                bias = torch.zeros(visible.shape, dtype=dtype, device=device)
                bias = bias.masked_fill(~visible, float("-inf")).view(-1, 1, 1, width)
            in_place = _InPlaceRows(cache.static_place_rows, width, bias, no_key)
            inputs = _LayerInputs(cos, sin, None, None, backend, in_place=in_place)
            out, _ = self._run_loops(embeds, plan, inputs, _no_prefix, None, can_skip=False)
        else:
            key_mask = None
            if mask is not None:
                current = mask.gather(1, fill.view(1, 1).expand(batch, 1))  # [B, 1]: is the new token real
                key_mask = torch.cat([mask, current], dim=1)  # [B, S + 1]
            # prefix_lengths: the attention skips (or masks) the columns not yet written.
            inputs = _LayerInputs(cos, sin, key_mask, None, backend, prefix_lengths=fill.expand(batch))
            out, final_rows = self._run_loops(embeds, plan, inputs, cache.static_prefix_rows,
                                              cache.static_write_loop_rows, can_skip=False)
            for idx, rows in enumerate(final_rows):
                if rows is not None:
                    cache.static_write_final_rows(idx, rows)
        cache.static_advance(1)
        return out

    # -- one round: all loops of one chunk -------------------------------------------------------------------

    def _run_round(self, embeds, cos, sin, rnd: _Round, cache: MeltCache | None, plan: _CallPlan,
                   backend: str) -> _LoopsOutput:
        """All loops of one round's chunk, reading the rows final before it and committing its rows after.

        Per-loop rows are final at once (per_loop mode); blended loop rows (phase 1) are mixed with the shared
        rows, which are final only after the round, so both are committed together at its end."""
        n_layers = len(self.layers)
        blend_rows = [[None] * n_layers for _ in range(plan.num_loops)]

        def read_prefix(idx, loop):
            return (None, None) if cache is None else cache.prefix_rows(idx, loop, rnd.prefix_len)

        def on_loop_rows(idx, loop, rows):
            if plan.blend is not None:
                blend_rows[loop][idx] = rows
            elif cache is not None:
                cache.commit_loop_rows(idx, loop, rows, rnd.write_at)

        inputs = _LayerInputs(rnd.take(cos), rnd.take(sin), rnd.key_mask, plan.blend, backend)
        out, final_rows = self._run_loops(rnd.take(embeds), plan, inputs, read_prefix, on_loop_rows, can_skip=True)
        if cache is not None:  # the chunk's rows are final only now
            cache.commit_round(final_rows, blend_rows, rnd.write_at)
        return out

    def _loop_end(self, hidden: torch.Tensor, active: torch.Tensor | None) -> torch.Tensor:
        """The final norm after every loop (its output feeds the next loop); exited tokens keep their state."""
        normed = self.norm(hidden)
        return normed if active is None else torch.where(active[..., None], normed, hidden)

    # -- planning ---------------------------------------------------------------------------------------------

    def _plan_rounds(self, position_ids, real, key_mask, past, length, device) -> list[_Round]:
        """Split this call's columns into rounds (one chunk per sequence each); see `_Round`."""
        if self.config.cache_mode == "per_loop" or length == 1:
            # Per-loop rows make chunking irrelevant (every loop reads its own rows): one parallel round.
            return [_Round(slice(0, length), None, past, _mask_upto(key_mask, past + length))]
        round_ids = self._round_ids(position_ids, real)
        if bool((round_ids == round_ids[:1]).all()):  # every sequence has its chunk boundaries at the same columns
            bounds = torch.nonzero(round_ids[0, 1:] != round_ids[0, :-1]).flatten().add(1).tolist()
            edges = [0, *bounds, length]
            return [
                _Round(slice(lo, hi), None, past + lo, _mask_upto(key_mask, past + hi))
                for lo, hi in zip(edges[:-1], edges[1:])
            ]
        km = None if key_mask is None else key_mask.detach().cpu()
        return [_ragged_round(round_ids == r, past, km, length, device) for r in range(int(round_ids.max()) + 1)]

    def _round_ids(self, position_ids, real) -> torch.Tensor:
        """`[B, L]` (on the host) the round of each column: its chunk on its own sequence's positions, counted
        from the sequence's first chunk in this call; non-decreasing along L."""
        chunk = self.config.chunk_size
        pos = position_ids.detach().cpu()
        chunk_ids = pos // chunk
        if real is not None:
            # Padding columns join the round of the nearest real token on their left (the first round when at
            # the left edge): they are masked everywhere, only their place matters.
            real = real.detach().cpu()
            chunk_ids = torch.where(real, chunk_ids, torch.iinfo(chunk_ids.dtype).min).cummax(dim=1).values
            first_real = torch.where(real, pos // chunk, torch.iinfo(chunk_ids.dtype).max).min(dim=1).values
            chunk_ids = torch.maximum(chunk_ids, first_real[:, None])
        return chunk_ids - chunk_ids[:, :1]

    @staticmethod
    def _compute_dtype(embeds: torch.Tensor) -> torch.dtype:
        """The dtype the projections produce (queries, keys, values, rows): autocast's when it is on."""
        kind = embeds.device.type
        return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else embeds.dtype

    def _row_like(self, embeds: torch.Tensor, batch: int) -> torch.Tensor:
        """A zero-size tensor with the cache rows' batch, heads, head_dim, dtype and device."""
        return embeds.new_empty(batch, self.config.num_key_value_heads, 0, self.config.head_dim,
                                dtype=self._compute_dtype(embeds))

    def _full_key_mask(self, attention_mask, batch, total, device, cache) -> torch.Tensor | None:
        if attention_mask is None:
            return None
        if cache.is_preallocated and attention_mask.dim() == 2 and attention_mask.shape[1] == cache.max_cache_len:
            attention_mask = attention_mask[:, :total]  # the fixed-width mask of a compiled generate
        if attention_mask.dim() != 2 or attention_mask.shape[0] != batch or attention_mask.shape[1] != total:
            raise ValueError(
                f"attention_mask must be [batch, past + new tokens] = [{batch}, {total}] (a 2-D padding mask), "
                f"got shape {tuple(attention_mask.shape)}"
            )
        mask = attention_mask.to(device=device, dtype=torch.bool)
        return None if bool(mask.all()) else mask

    def _check_input_ids(self, input_ids: torch.Tensor) -> None:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, length], got shape {tuple(input_ids.shape)}")
        if input_ids.is_floating_point() or input_ids.is_complex():
            raise TypeError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
        if torch.compiler.is_compiling() or input_ids.numel() == 0:
            return  # a captured step validates nothing on the host (generate's own tokens are in range)
        low, high = int(input_ids.min()), int(input_ids.max())  # one host read per call
        if low < 0 or high >= self.config.vocab_size:
            bad = low if low < 0 else high
            raise ValueError(
                f"input_ids holds token id {bad}, outside this model's vocabulary [0, {self.config.vocab_size}); "
                "check the tokenizer matches the checkpoint"
            )

    def _check_blend(self, alpha) -> float | None:
        if alpha is None:
            return None
        if self.config.cache_mode != "shared":
            raise ValueError("kv_blend_alpha applies to cache_mode='shared' only (per_loop is already alpha = 0)")
        alpha = float(alpha)
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"kv_blend_alpha must lie in [0, 1], got {alpha}")
        return None if alpha == 1.0 else alpha

    def _check_cache(self, cache, batch: int) -> None:
        if not isinstance(cache, MeltCache):
            raise TypeError(f"cache must be a MeltCache (or None), got {type(cache).__name__}")
        if cache.cache_mode != self.config.cache_mode:
            raise ValueError(f"cache is a {cache.cache_mode} cache but the model runs {self.config.cache_mode}")
        if len(cache.layers) != len(self.layers):
            raise ValueError(f"cache has {len(cache.layers)} layers, the model {len(self.layers)}")
        if cache.is_initialized and cache.batch_size != batch:
            raise ValueError(
                f"cache holds {cache.batch_size} sequences but the input has {batch}; use a new cache "
                "(or reorder/select the cache's sequences first)"
            )


_LOSS_KWARGS = ("num_items_in_batch", "ignore_index", "shift_labels")


def _refuse_unknown_kwargs(kwargs: dict, where: str) -> None:
    """Raise on keywords the forward does not implement, instead of swallowing them.

    `output_attentions` / `output_hidden_states` are accepted only when falsy: MELT's per-loop outputs come from
    `return_loop_outputs=True` (attention weights are never materialised by the fused backends).
    """
    for name in ("output_attentions", "output_hidden_states"):
        if kwargs.pop(name, None):
            raise ValueError(
                f"{where} does not return {name.removeprefix('output_')}; use return_loop_outputs=True for every "
                "loop's hidden states and attention outputs"
            )
    if kwargs:
        raise TypeError(f"{where} got unexpected keyword argument(s) {sorted(kwargs)}")


class _EarlyExit:
    """Which tokens of a round still loop: a token stops after the first loop whose cumulative exit probability
    (`exit_distribution`, accumulated loop by loop) reaches the threshold; the last loop takes what remains."""

    def __init__(self, threshold: float, shape, device):
        self.threshold = float(threshold)
        self.active = torch.ones(shape, dtype=torch.bool, device=device)  # [B, W]
        self.survive = torch.ones(shape, dtype=torch.float32, device=device)
        self.cumulative = torch.zeros(shape, dtype=torch.float32, device=device)
        self.loops_run = torch.zeros(shape, dtype=torch.long, device=device)

    def after_loop(self, exit_logit: torch.Tensor, last: bool) -> None:
        """`exit_logit` `[B, W, 1]`: the loop just run (its values for exited tokens are ignored)."""
        hazard = torch.sigmoid(exit_logit.squeeze(-1).float())
        exit_here = self.survive if last else hazard * self.survive
        active = self.active
        self.loops_run = self.loops_run + active.long()
        self.cumulative = torch.where(active, self.cumulative + exit_here, self.cumulative)
        self.survive = torch.where(active, self.survive * (1 - hazard), self.survive)
        self.active = active & (self.cumulative < self.threshold)


def _ragged_round(member: torch.Tensor, past: int, key_mask: torch.Tensor | None, length: int, device) -> _Round:
    """The round of the columns `member` `[B, L]` (contiguous per sequence, on the host) when sequences have their
    chunks at different columns: gathered by index into `[B, W]`, `valid` marking real entries."""
    count = member.sum(1)
    start = torch.where(count > 0, member.int().argmax(1), 0)  # argmax: first True column
    width = int(count.max())
    slots = torch.arange(width)
    valid = slots[None] < count[:, None]
    index = (start[:, None] + torch.minimum(slots[None], (count[:, None] - 1).clamp(min=0))).clamp(max=length - 1)
    visible_prefix = past + int(start.max())
    prefix_mask = torch.arange(visible_prefix)[None] < (past + start)[:, None]  # rows final before this round
    if key_mask is not None:
        prefix_mask &= key_mask[:, :visible_prefix]
        chunk_mask = valid & key_mask.gather(1, past + index)
    else:
        chunk_mask = valid
    batch_idx, slot_idx = valid.nonzero(as_tuple=True)
    write_index = (batch_idx, slot_idx, past + index[batch_idx, slot_idx])
    return _Round(
        index.to(device),
        valid.to(device),
        visible_prefix,
        torch.cat([prefix_mask, chunk_mask], dim=1).to(device),
        tuple(t.to(device) for t in write_index),
    )


def _no_prefix(layer_idx: int, loop: int) -> tuple[None, None]:
    return None, None


def _all_loops(hidden: torch.Tensor, num_loops: int) -> torch.Tensor:
    return torch.full(hidden.shape[:2], num_loops, dtype=torch.long, device=hidden.device)


def _mask_upto(key_mask: torch.Tensor | None, columns: int) -> torch.Tensor | None:
    return None if key_mask is None else key_mask[:, :columns]


def _assemble(pieces: list[torch.Tensor], rounds: list[_Round], length: int) -> torch.Tensor:
    """Put per-round outputs `[B, W, ...]` back in column order `[B, L, ...]`."""
    if all(isinstance(r.columns, slice) for r in rounds):
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)
    out = pieces[0].new_zeros(pieces[0].shape[0], length, *pieces[0].shape[2:])
    for piece, rnd in zip(pieces, rounds):
        batch_idx, slot_idx = rnd.valid.nonzero(as_tuple=True)
        out = out.index_put((batch_idx, rnd.columns[batch_idx, slot_idx]), piece[batch_idx, slot_idx])
    return out


def exit_distribution(exit_logits: torch.Tensor) -> torch.Tensor:
    """`[..., T]` exit logits -> `[..., T]` probabilities: p_t = lambda_t * prod_{s<t}(1 - lambda_s), the last
    loop takes the remaining mass (lambda = sigmoid(logit), computed in fp32)."""
    hazard = torch.sigmoid(exit_logits.to(torch.promote_types(exit_logits.dtype, torch.float32)))
    survive = torch.cumprod(1 - hazard, dim=-1)
    survive_before = torch.cat([torch.ones_like(survive[..., :1]), survive[..., :-1]], dim=-1)
    probs = hazard * survive_before
    return torch.cat([probs[..., :-1], survive_before[..., -1:]], dim=-1)


def select_exit_loop(exit_probs: torch.Tensor, threshold: float) -> torch.Tensor:
    """Index of the first loop whose cumulative exit probability reaches `threshold` (the last loop otherwise):
    Ouro's selection after running every loop, e.g. from `exit_probs` and `loop_logits` of a
    `return_loop_outputs=True` call. The model itself stops a token's loops there (`early_exit_threshold`)."""
    reached = exit_probs.cumsum(-1) >= threshold
    last = exit_probs.shape[-1] - 1
    return torch.where(reached.any(-1), reached.float().argmax(-1), last)


class MeltForCausalLM(MeltPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: MeltConfig):
        super().__init__(config)
        self.model = MeltModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @can_return_tuple
    @deprecate_kwarg("past_key_values", version="6.0.0", new_name="cache", raise_if_both_names=True)
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: MeltCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        num_loops: int | None = None,
        kv_blend_alpha: float | None = None,
        return_loop_outputs: bool = False,
        return_attention_outputs: bool = False,
        exit_at_step: int | None = None,
        early_exit_threshold: float | None = None,
        **kwargs,
    ) -> MeltCausalLMOutput:
        """Causal LM forward. Beyond Llama's arguments:

        num_loops: loops for this call (default `config.num_loops`); shared-mode memory does not depend on it.
        kv_blend_alpha: phase-1 blend, attention reads `alpha * KV_melt + (1 - alpha) * KV_loop` (shared mode).
        return_loop_outputs: also return every loop's logits (`loop_logits`) and hidden states, for distillation.
        return_attention_outputs: also return every (loop, layer) attention output (`attention_outputs`), for the
            phase-2 alignment loss. Each costs nothing when False (and only what is asked for is kept).
        exit_at_step: return this loop's logits (every loop still runs).
        early_exit_threshold: stop each token's loops once its cumulative exit probability reaches it (0 = one
            loop, 1 = every loop); `loops_run` in the output says how many each token ran.
        `labels` give the usual shifted cross-entropy on the returned (selected) logits; the loss keywords of
        transformers' `ForCausalLMLoss` (`num_items_in_batch`, `ignore_index`, `shift_labels`) pass through.
        `past_key_values=` is the pre-5.24 name of `cache=` (deprecated, as in transformers). Any other keyword
        raises: a misspelt argument is never dropped silently.
        """
        loss_kwargs = {name: kwargs.pop(name) for name in _LOSS_KWARGS if name in kwargs}
        _refuse_unknown_kwargs(kwargs, "MeltForCausalLM.forward")
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            num_loops=num_loops,
            kv_blend_alpha=kv_blend_alpha,
            return_loop_outputs=return_loop_outputs,
            return_attention_outputs=return_attention_outputs,
            exit_at_step=exit_at_step,
            early_exit_threshold=early_exit_threshold,
        )
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(outputs.last_hidden_state[:, keep])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **loss_kwargs)
        loop_logits = None
        if return_loop_outputs:
            loop_logits = tuple(self.lm_head(h[:, keep]) for h in outputs.loop_hidden_states)
        return MeltCausalLMOutput(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            exit_probs=outputs.exit_probs,
            loops_run=outputs.loops_run,
            loop_logits=loop_logits,
            loop_hidden_states=outputs.loop_hidden_states,
            attention_outputs=outputs.attention_outputs,
        )

    def new_cache(
        self, num_loops: int | None = None, keep_loop_rows: bool = False, max_cache_len: int | None = None
    ) -> MeltCache:
        """An empty cache for this model (the forward creates one itself when none is passed).

        `max_cache_len`: preallocate exactly that many columns (prompt, left padding and new tokens); the cache
        then never grows, and its one-token decode step can be compiled (`torch.compile(model, fullgraph=True)`,
        or `generate` on CUDA, which compiles it when handed such a cache).
        """
        return MeltCache(self.config, num_loops=num_loops, keep_loop_rows=keep_loop_rows, max_cache_len=max_cache_len)

    # -- generate -----------------------------------------------------------------------------------------------

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, generation_mode, batch_size,
                                      max_cache_length):
        """generate's cache: a MeltCache preallocated for the prompt plus `max_new_tokens`, so what it allocates is
        what it holds (`cache_implementation=None` or "static"; "static" also lets transformers compile the decode
        step, on CUDA or wherever `compile_config` allows). "dynamic" grows as it goes."""
        implementation = generation_config.cache_implementation
        if model_kwargs.get("cache") is not None:
            if implementation is not None:
                raise ValueError("pass either cache= or cache_implementation= to generate, not both")
            model_kwargs["cache"]._is_user_defined = True
            return
        if generation_config.use_cache is False:
            return
        if implementation not in (None, "static", "dynamic"):
            raise ValueError(
                f"MELT's generate supports cache_implementation None, 'static' or 'dynamic', got {implementation!r}"
            )
        max_cache_len = None if implementation == "dynamic" else max_cache_length
        if max_cache_len is not None and getattr(generation_config, "max_cache_len", None):
            # A fixed size across calls: one compiled decode step serves prompts of any length.
            max_cache_len = max(max_cache_len, generation_config.max_cache_len)
        if max_cache_len is not None and max_cache_len > self.config.max_position_embeddings:
            raise ValueError(
                f"prompt + max_new_tokens needs {max_cache_len} positions but max_position_embeddings is "
                f"{self.config.max_position_embeddings}; lower max_new_tokens"
            )
        cache = self.new_cache(num_loops=model_kwargs.get("num_loops"), max_cache_len=max_cache_len)
        cache._auto_compile = implementation == "static"
        model_kwargs["cache"] = cache

    def create_masks_for_generate(self, attention_mask=None, cache=None, **kwargs):
        """What generate hands a compileable cache's forward as `attention_mask`: the 2-D padding mask padded with
        zeros to the cache's fixed width, so that every decode step has the same shapes (the forward builds its
        own causal structure)."""
        if attention_mask is None or not isinstance(cache, MeltCache) or not cache.is_preallocated:
            return attention_mask
        return F.pad(attention_mask, (0, cache.max_cache_len - attention_mask.shape[1]))

    @classmethod
    def from_ouro(
        cls,
        path_or_hub_id: str,
        cache_mode: str = "shared",
        gate_type: str = "elementwise",
        dtype: torch.dtype | None = None,
        revision: str | None = None,
        **config_overrides,
    ) -> MeltForCausalLM:
        """Build a model from an Ouro checkpoint (a local directory or a Hub id) with this project's own reader.

        Ouro tensors map 1:1 onto this model; the gate tensors (shared mode) are new and initialised as
        `_init_weights` documents. `dtype` defaults to the checkpoint's. Validation is strict: a config whose
        model_type is not "ouro" and any missing, unexpected or misshaped tensor raise one `ValueError` that
        lists them all. Only safetensors are read (nothing is unpickled). `config_overrides` go to `MeltConfig`
        (e.g. `num_loops=8`, `chunk_size=64`). `path_or_hub_id` may also be an `ouro_checkpoint.OuroCheckpoint`
        already read, so that several models (a teacher and a student) come from one read of the files.
        """
        from .ouro_checkpoint import load_ouro

        return load_ouro(cls, path_or_hub_id, cache_mode, gate_type, dtype, revision, config_overrides)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs) -> MeltForCausalLM:
        """transformers' loader, naming the weight file it cannot read (its SafetensorError names none). Foreign
        checkpoints (an Ouro one) and bad config overrides are refused by `MeltConfig` before any weight is read."""
        try:
            return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        except Exception as err:
            if type(err).__name__ != "SafetensorError":
                raise
            import os

            from safetensors import safe_open

            bad = []
            directory = os.fspath(pretrained_model_name_or_path)
            for name in sorted(os.listdir(directory)) if os.path.isdir(directory) else ():
                if name.endswith(".safetensors"):
                    try:
                        with safe_open(os.path.join(directory, name), framework="pt"):
                            pass
                    except Exception:
                        bad.append(os.path.join(directory, name))
            where = ", ".join(bad) if bad else f"a weight file of {directory}"
            raise ValueError(f"{where} is not a readable safetensors file ({err}); it is truncated or corrupt: "
                             "download or copy it again") from None
