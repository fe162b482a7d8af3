"""Reading Ouro (LoopLM) checkpoints with this project's own code.

Ouro ships as Hugging Face remote code that transformers 5.x cannot run, so its checkpoint is read
directly: `config.json` (model_type "ouro") and safetensors weights, single file or sharded with
`model.safetensors.index.json`. The tensor names are Ouro's (MELT_SPEC section 1) and are also this
project's, so the weight map is the identity; the only new tensors are the MELT gates.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .configuration_melt import MeltConfig

# Ouro config field -> MeltConfig field (fields with the same name are copied as they are).
_RENAMED = {"total_ut_steps": "num_loops"}
_COPIED = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "max_position_embeddings", "rope_theta", "rms_norm_eps",
    "tie_word_embeddings", "early_exit_threshold", "bos_token_id", "eos_token_id", "pad_token_id",
    "hidden_act", "initializer_range",
)
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"]


def resolve_checkpoint_dir(path_or_hub_id: str | os.PathLike, revision: str | None = None) -> Path:
    """A local directory as it is; anything else is a Hub id fetched with huggingface_hub (config, safetensors,
    tokenizer files only)."""
    path = Path(path_or_hub_id)
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(f"{path} is a file; pass the checkpoint directory that holds config.json")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

    try:
        return Path(snapshot_download(str(path_or_hub_id), revision=revision, allow_patterns=_HUB_PATTERNS))
    except (LocalEntryNotFoundError, OfflineModeIsEnabled, ConnectionError, OSError, HfHubHTTPError) as err:
        raise OSError(
            f"{str(path_or_hub_id)!r} is not a local directory and could not be fetched from the Hugging Face Hub "
            f"({type(err).__name__}: {err}). This machine may be offline: download the checkpoint where the Hub "
            "is reachable (huggingface-cli download ID --local-dir DIR) and pass DIR."
        ) from err


def ouro_config_to_melt(ouro: dict, cache_mode: str, gate_type: str, overrides: dict) -> MeltConfig:
    if ouro.get("model_type") != "ouro":
        raise ValueError(
            f"not an Ouro checkpoint: config.json has model_type {ouro.get('model_type')!r}, expected 'ouro' "
            "(MeltForCausalLM.from_pretrained loads MELT checkpoints)"
        )
    if ouro.get("rope_scaling"):
        raise ValueError(f"Ouro config uses rope_scaling={ouro['rope_scaling']!r}, which this reader does not support")
    if ouro.get("use_sliding_window") or any(t != "full_attention" for t in ouro.get("layer_types") or ()):
        raise ValueError("Ouro config uses sliding-window layers, which this reader does not support")
    fields = {name: ouro[name] for name in _COPIED if ouro.get(name) is not None}
    fields.update({new: ouro[old] for old, new in _RENAMED.items() if ouro.get(old) is not None})
    fields.update(cache_mode=cache_mode, gate_type=gate_type)
    fields.update(overrides)
    return MeltConfig(**fields)


def _weight_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted({directory / name for name in weight_map.values()})
        missing = [str(f.name) for f in files if not f.is_file()]
        if missing:
            raise ValueError(f"{index} names shards that are not in {directory}: {missing}")
        return files
    single = directory / "model.safetensors"
    if single.is_file():
        return [single]
    pickles = sorted(p.name for p in directory.glob("*.bin")) + sorted(p.name for p in directory.glob("*.pt"))
    hint = f" (found {pickles}: pickled weights are never loaded; re-save them as safetensors)" if pickles else ""
    raise ValueError(f"no safetensors weights in {directory}: expected one of {_WEIGHT_FILES}{hint}")


def load_ouro(cls, path_or_hub_id, cache_mode, gate_type, dtype, revision, overrides):
    from safetensors import safe_open

    directory = resolve_checkpoint_dir(path_or_hub_id, revision)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise ValueError(f"no config.json in {directory}: not a Hugging Face checkpoint directory")
    config = ouro_config_to_melt(json.loads(config_path.read_text()), cache_mode, gate_type, overrides)

    with torch.device("meta"):
        model = cls(config)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    new = {name for name in expected if ".gate." in name}

    state, unexpected, misshaped, present = {}, [], [], set()
    for file in _weight_files(directory):
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                present.add(name)
                tensor = f.get_tensor(name)
                if name not in expected or name in new:
                    unexpected.append(name)
                elif tuple(tensor.shape) != expected[name]:
                    misshaped.append(f"{name}: checkpoint {tuple(tensor.shape)}, config implies {expected[name]}")
                else:
                    state[name] = tensor if dtype is None else tensor.to(dtype)
    missing = sorted(set(expected) - new - present)
    if missing or unexpected or misshaped:
        problems = []
        for title, names in (("missing", missing), ("unexpected", sorted(unexpected)), ("misshaped", misshaped)):
            if names:
                problems.append(f"{len(names)} {title}: " + ", ".join(names[:20]) + (" ..." if len(names) > 20 else ""))
        raise ValueError(f"Ouro checkpoint {directory} does not match its config: " + "; ".join(problems))

    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    param_dtype = model.model.embed_tokens.weight.dtype
    for module in model.modules():
        if any(p.is_meta for p in module.parameters(recurse=False)):  # the new gate tensors
            module.to_empty(device="cpu", recurse=False)
            module.to(param_dtype)
            model._init_weights(module)
    config.dtype = param_dtype
    model.eval()
    return model
