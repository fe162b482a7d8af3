"""Configuration of MELT and of its exact LoopLM (Ouro) mode.

One config describes both models: `cache_mode="per_loop"` is Ouro (a looped transformer keeping one
key/value row per token, per layer, per loop) and `cache_mode="shared"` is MELT (one row per token per
layer, overwritten across loops through a gated latent state). The architecture fields mirror Ouro's
config so that an Ouro checkpoint maps onto this one field by field (see `MeltForCausalLM.from_ouro`).
"""

from __future__ import annotations

import transformers
from packaging.version import Version
from transformers import PreTrainedConfig

# The modeling code speaks transformers' `cache` API (5.24 renamed `past_key_values` to `cache` in forward
# signatures, outputs and generate). Checked here because this file is imported first, also by remote-code loads.
MIN_TRANSFORMERS = "5.24"
if Version(transformers.__version__) < Version(MIN_TRANSFORMERS):
    raise ImportError(
        f"MELT needs transformers >= {MIN_TRANSFORMERS} (found {transformers.__version__}): "
        f"pip install -U 'transformers>={MIN_TRANSFORMERS}'"
    )

CACHE_MODES = ("shared", "per_loop")
GATE_TYPES = ("elementwise", "scalar", "mean", "ema", "last")
ATTENTION_BACKENDS = ("auto", "triton", "flash", "sdpa", "eager")


class MeltConfig(PreTrainedConfig):
    model_type = "melt"
    keys_to_ignore_at_inference = ["cache"]

    def __init__(
        self,
        vocab_size: int = 49152,  # tokens in the vocabulary
        hidden_size: int = 2048,  # residual stream width (also the latent state's width)
        intermediate_size: int = 5632,  # SwiGLU hidden width
        num_hidden_layers: int = 24,  # physical layers N; each runs `num_loops` times per token
        num_attention_heads: int = 16,  # query heads
        num_key_value_heads: int | None = None,  # key/value heads (GQA); defaults to the query heads
        head_dim: int | None = None,  # per-head width; defaults to hidden_size // num_attention_heads
        max_position_embeddings: int = 65536,  # longest sequence (positions) accepted
        rope_theta: float = 1_000_000.0,  # RoPE base
        rms_norm_eps: float = 1e-6,  # RMSNorm epsilon
        tie_word_embeddings: bool = False,  # lm_head shares the embedding matrix
        num_loops: int = 4,  # loops T per token (Ouro's total_ut_steps)
        cache_mode: str = "shared",  # "shared" = MELT, "per_loop" = LoopLM/Ouro exactly
        gate_type: str = "elementwise",  # latent update: elementwise | scalar | mean | ema | last
        ema_decay: float = 0.2,  # fixed gate z of gate_type="ema": s = z * s + (1 - z) * a
        chunk_size: int = 500,  # tokens per chunk in shared-mode prefill and training
        early_exit_threshold: float | None = None,  # cumulative exit probability at which a token stops looping
        exit_at_step: int | None = None,  # fixed loop (0-based) whose logits are returned
        gate_bias_init: float = -3.0,  # initial gate bias: z = sigmoid(-3) ~ 0.05, s starts close to `a`
        attention_backend: str = "auto",  # auto | triton | flash | sdpa | eager
        initializer_range: float = 0.02,  # std of the normal init of new linear weights
        hidden_act: str = "silu",  # MLP activation (Ouro: silu)
        use_cache: bool = True,
        bos_token_id: int | None = 0,
        eos_token_id: int | list[int] | None = 0,
        pad_token_id: int | None = 0,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_attention_heads if num_key_value_heads is None else num_key_value_heads
        self.head_dim = hidden_size // num_attention_heads if head_dim is None else head_dim
        self.max_position_embeddings = max_position_embeddings
        self.rope_theta = rope_theta
        self.rms_norm_eps = rms_norm_eps
        self.num_loops = num_loops
        self.cache_mode = cache_mode
        self.gate_type = gate_type
        self.ema_decay = ema_decay
        self.chunk_size = chunk_size
        self.early_exit_threshold = early_exit_threshold
        self.exit_at_step = exit_at_step
        self.gate_bias_init = gate_bias_init
        self.attention_backend = attention_backend
        self.initializer_range = initializer_range
        self.hidden_act = hidden_act
        self.use_cache = use_cache
        self.tie_word_embeddings = tie_word_embeddings
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        super().__init__(**kwargs)
        self.validate_melt()

    @classmethod
    def get_config_dict(cls, pretrained_model_name_or_path, **kwargs):
        """transformers' reader, refusing another model's config.json by name (transformers only warns, then
        builds a MELT model of default shape with random weights: an Ouro checkpoint would load that way)."""
        config_dict, kwargs = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        found = config_dict.get("model_type")
        if found is not None and found != cls.model_type:
            hint = (
                f"convert it with MeltForCausalLM.from_ouro({str(pretrained_model_name_or_path)!r}) or "
                f"`python -m convert.from_ouro --ouro {pretrained_model_name_or_path} --data ... --out ...`"
                if found == "ouro"
                else "pass a MELT checkpoint (a directory written by save_pretrained or convert.from_ouro)"
            )
            raise ValueError(
                f"{pretrained_model_name_or_path} is not a MELT checkpoint: its config.json has model_type {found!r}, "
                f"expected {cls.model_type!r}; {hint}"
            )
        return config_dict, kwargs

    @classmethod
    def from_dict(cls, config_dict, **kwargs):
        """transformers' constructor, then `validate_melt`: keyword overrides at load time
        (`from_pretrained(dir, gate_type=...)`) are set as attributes after `__init__`, past its checks."""
        result = super().from_dict(config_dict, **kwargs)
        config = result[0] if isinstance(result, tuple) else result
        try:
            config.validate_melt()
        except ValueError as err:
            overridden = sorted(k for k in kwargs if k in config_dict or hasattr(config, k))
            where = f" (keyword arguments given: {', '.join(overridden)})" if overridden else ""
            raise ValueError(f"{err}{where}") from None
        return result

    def validate_melt(self) -> None:
        """Raise one clear error naming the field for any setting the model cannot run with."""
        for name in (
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"MeltConfig.{name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"MeltConfig.num_key_value_heads ({self.num_key_value_heads}) must divide "
                f"num_attention_heads ({self.num_attention_heads}); choose a divisor for grouped-query attention"
            )
        if self.head_dim % 2 != 0:
            raise ValueError(f"MeltConfig.head_dim must be even for rotary embeddings, got {self.head_dim}")
        validate_num_loops(self.num_loops, "MeltConfig.num_loops")
        if isinstance(self.chunk_size, bool) or not isinstance(self.chunk_size, int) or self.chunk_size < 1:
            raise ValueError(f"MeltConfig.chunk_size must be an integer >= 1, got {self.chunk_size!r}")
        if self.cache_mode not in CACHE_MODES:
            raise ValueError(f"MeltConfig.cache_mode must be one of {CACHE_MODES}, got {self.cache_mode!r}")
        if self.gate_type not in GATE_TYPES:
            raise ValueError(f"MeltConfig.gate_type must be one of {GATE_TYPES}, got {self.gate_type!r}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(
                f"MeltConfig.attention_backend must be one of {ATTENTION_BACKENDS}, got {self.attention_backend!r}"
            )
        if not 0.0 <= float(self.ema_decay) <= 1.0:
            raise ValueError(f"MeltConfig.ema_decay must lie in [0, 1], got {self.ema_decay!r}")
        if self.rope_theta <= 0 or self.rms_norm_eps <= 0:
            raise ValueError("MeltConfig.rope_theta and MeltConfig.rms_norm_eps must be positive")
        if self.early_exit_threshold is not None and not 0.0 < float(self.early_exit_threshold) <= 1.0:
            raise ValueError(
                f"MeltConfig.early_exit_threshold must lie in (0, 1] or be None, got {self.early_exit_threshold!r}"
            )
        if self.exit_at_step is not None:
            validate_exit_step(self.exit_at_step, self.num_loops)
        if self.hidden_act != "silu":
            raise ValueError(f"MeltConfig.hidden_act must be 'silu' (Ouro's SwiGLU), got {self.hidden_act!r}")


def validate_num_loops(num_loops, where: str) -> None:
    if isinstance(num_loops, bool) or not isinstance(num_loops, int) or num_loops < 1:
        raise ValueError(f"{where} must be an integer >= 1, got {num_loops!r}")


def validate_exit_step(exit_at_step, num_loops: int) -> None:
    if isinstance(exit_at_step, bool) or not isinstance(exit_at_step, int) or not 0 <= exit_at_step < num_loops:
        raise ValueError(
            f"exit_at_step must be a 0-based loop index in [0, {num_loops}), got {exit_at_step!r}; "
            "lower it or raise num_loops"
        )
