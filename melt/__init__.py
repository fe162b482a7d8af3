"""MELT: memory-efficient looped transformers (one gated key/value row per token per layer)."""

from transformers import AutoConfig, AutoModelForCausalLM

from .attention import override_backend
from .cache_melt import MeltCache
from .configuration_melt import MeltConfig
from .modeling_melt import MeltForCausalLM, MeltModel, MeltPreTrainedModel

AutoConfig.register("melt", MeltConfig, exist_ok=True)
AutoModelForCausalLM.register(MeltConfig, MeltForCausalLM, exist_ok=True)
# save_pretrained writes auto_map and copies the flat modeling files for trust_remote_code users.
MeltConfig.register_for_auto_class()
MeltForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = ["MeltCache", "MeltConfig", "MeltForCausalLM", "MeltModel", "MeltPreTrainedModel", "override_backend"]
__version__ = "0.1.0"
