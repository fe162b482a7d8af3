"""Reading Ouro (LoopLM) checkpoints with this project's own code.

Ouro ships as Hugging Face remote code that transformers 5.x cannot run, so its checkpoint is read
directly: `config.json` (model_type "ouro") and safetensors weights, single file or sharded with
`model.safetensors.index.json`. The tensor names are Ouro's (MELT_SPEC section 1) and are also this
project's, so the weight map is the identity; the only new tensors are the MELT gates.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import json
import os
import re
from pathlib import Path

import torch

from .configuration_melt import MeltConfig
from .modeling_melt import GATE_MARKER

# Ouro's config.json, field by field in the order Ouro lists them: the one map between Ouro's config and MeltConfig,
# read by `ouro_config_to_melt` and written by `melt_config_to_ouro`. A string names the MeltConfig field that the Ouro
# field holds (the same name but for `total_ut_steps`, Ouro's `num_loops`). A function of (config, weights' dtype)
# gives the writer's value of a field the reader does not map: Ouro's identity; the plain case of what MELT leaves out
# (RoPE scaling, sliding-window layers, attention dropout; the reader refuses checkpoints that use the first two);
# use_cache on; torch_dtype, the dtype of the weights written beside it.
OURO_CONFIG_FIELDS = {
    "architectures": lambda config, dtype: ["OuroForCausalLM"],
    "model_type": lambda config, dtype: "ouro",
    "vocab_size": "vocab_size",
    "hidden_size": "hidden_size",
    "intermediate_size": "intermediate_size",
    "num_hidden_layers": "num_hidden_layers",
    "num_attention_heads": "num_attention_heads",
    "num_key_value_heads": "num_key_value_heads",
    "head_dim": "head_dim",
    "hidden_act": "hidden_act",
    "max_position_embeddings": "max_position_embeddings",
    "rope_theta": "rope_theta",
    "rope_scaling": lambda config, dtype: None,
    "rms_norm_eps": "rms_norm_eps",
    "initializer_range": "initializer_range",
    "tie_word_embeddings": "tie_word_embeddings",
    "total_ut_steps": "num_loops",
    "early_exit_threshold": "early_exit_threshold",
    "use_sliding_window": lambda config, dtype: False,
    "sliding_window": lambda config, dtype: None,
    "max_window_layers": lambda config, dtype: config.num_hidden_layers,
    "layer_types": lambda config, dtype: ["full_attention"] * config.num_hidden_layers,
    "attention_dropout": lambda config, dtype: 0.0,
    "bos_token_id": "bos_token_id",
    "eos_token_id": "eos_token_id",
    "pad_token_id": "pad_token_id",
    "use_cache": lambda config, dtype: True,
    "torch_dtype": lambda config, dtype: str(dtype).removeprefix("torch."),
}
OURO_TO_MELT = {name: field for name, field in OURO_CONFIG_FIELDS.items() if isinstance(field, str)}  # the mapped ones
# What the writer puts where a mapped MeltConfig field is None: Ouro's threshold has no "off", and 1.0 (exit only
# after the last loop) runs every loop, as MELT's None does.
_OURO_FOR_NONE = {"early_exit_threshold": 1.0}
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"]
# A Hub repository id: `name` or `owner/name` (huggingface_hub's rule, without its length limit).
_HUB_ID = re.compile(r"(?!\.)[\w.-]+(/(?!\.)[\w.-]+)?")
# Keywords of `from_ouro` besides MeltConfig fields: transformers' names for the same things.
_DTYPE_ALIASES = ("torch_dtype",)


def looks_like_local_path(path_or_hub_id: str | os.PathLike) -> bool:
    """Whether a string can only mean a local path: a `Path`, an absolute or `./`, `../`, `~` path, or a string
    with more than one `/` (a Hub id is `name` or `owner/name`)."""
    if isinstance(path_or_hub_id, os.PathLike):
        return True
    text = str(path_or_hub_id)
    return os.path.isabs(text) or text.startswith(("~", ".")) or not _HUB_ID.fullmatch(text)


def resolve_checkpoint_dir(path_or_hub_id: str | os.PathLike, revision: str | None = None,
                           what: str = "checkpoint") -> Path:
    """A local directory as it is; anything else is a Hub id fetched with huggingface_hub (config, safetensors,
    tokenizer files only). A missing path that cannot be a Hub id is reported as a missing directory."""
    if not str(path_or_hub_id).strip():
        raise ValueError(f"the {what} path is empty; pass an Ouro checkpoint directory or a Hub id")
    path = Path(path_or_hub_id).expanduser()
    if path.is_dir():
        if revision is not None:
            raise ValueError(
                f"revision={revision!r} applies to Hub ids, but {path} is a local directory; drop revision"
            )
        return path
    if path.exists():
        raise ValueError(f"{path} is a file; pass the {what} directory that holds config.json")
    if looks_like_local_path(path_or_hub_id):
        raise ValueError(f"{what} directory {path} does not exist (and it is not a Hub id); check the path")
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


def read_json_object(path: Path, what: str) -> dict:
    """A JSON object from `path`, or one ValueError naming the file (truncated, not JSON, not an object)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}): the {what} is truncated or corrupt; "
                         "download or write it again") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a JSON {type(data).__name__}, not the object a {what} must be")
    return data


def _config_fields() -> set[str]:
    parameters = inspect.signature(MeltConfig.__init__).parameters
    return {name for name, p in parameters.items() if name != "self" and p.kind is not p.VAR_KEYWORD}


def check_from_ouro_keywords(overrides: dict) -> dict:
    """`from_ouro`'s keyword arguments beyond its own: MeltConfig fields only, each refused by name otherwise
    (a typo such as `nmu_loops` must not become a silently ignored config attribute)."""
    fields = _config_fields() - {"cache_mode", "gate_type"}
    unknown = sorted(set(overrides) - fields - set(_DTYPE_ALIASES) - {"device_map"})
    if unknown:
        hints = []
        for name in unknown:
            close = difflib.get_close_matches(name, sorted(fields | {"dtype", "revision"}), n=1)
            hints.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise TypeError(
            f"from_ouro() got unknown keyword argument(s) {', '.join(hints)}; it accepts cache_mode, gate_type, dtype, "
            f"revision, device_map and MeltConfig fields ({', '.join(sorted(fields))})"
        )
    return overrides


def resolve_dtype(dtype) -> torch.dtype | None:
    """`dtype` as transformers accepts it: None or "auto" (the checkpoint's), a torch dtype, or its name
    ("bfloat16", "torch.float16", ...). Floating point only: the model computes in it."""
    if dtype is None or (isinstance(dtype, str) and dtype == "auto"):
        return None
    resolved = dtype
    if isinstance(dtype, str):
        resolved = getattr(torch, dtype.removeprefix("torch."), None)
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise ValueError(
            f"dtype={dtype!r} is not a floating-point torch dtype; pass torch.bfloat16, 'bfloat16', 'float16', "
            "'float32' or 'auto' (the checkpoint's own)"
        )
    return resolved


def _resolve_device(device_map):
    """A single device, as `device_map` may name one ("cpu", "cuda:0", 0, torch.device); no placement maps."""
    if device_map is None:
        return None
    if isinstance(device_map, int) and not isinstance(device_map, bool):
        return torch.device("cuda", device_map)
    try:
        if isinstance(device_map, (str, torch.device)) and device_map != "auto":
            return torch.device(device_map)
    except (RuntimeError, ValueError):
        pass
    raise ValueError(
        f"device_map={device_map!r}: from_ouro places the whole model on one device; pass a device such as "
        "'cpu' or 'cuda:0' (or call .to(device) after loading)"
    )


def melt_config_to_ouro(config: MeltConfig, dtype: torch.dtype = torch.float32) -> dict:
    """The Ouro `config.json` (as a dict, in Ouro's field order) of a per_loop config whose weights are stored in
    `dtype`: `OURO_CONFIG_FIELDS` written out, which `ouro_config_to_melt` reads back to the same mapped fields."""
    if config.cache_mode != "per_loop":
        raise ValueError(f"an Ouro checkpoint is a per_loop model; this config has cache_mode={config.cache_mode!r}")
    ouro = {}
    for name, source in OURO_CONFIG_FIELDS.items():
        if callable(source):
            ouro[name] = source(config, dtype)
        else:
            value = getattr(config, source)
            ouro[name] = _OURO_FOR_NONE.get(name) if value is None else value
    return ouro


def ouro_config_to_melt(ouro: dict, cache_mode: str, gate_type: str, overrides: dict) -> MeltConfig:
    """The MeltConfig of an Ouro `config.json`: the fields of `OURO_TO_MELT`, then `cache_mode`, `gate_type`
    and `overrides` (MeltConfig fields). Refuses what MELT does not run: another model type, RoPE scaling, sliding
    windows."""
    if ouro.get("model_type") != "ouro":
        raise ValueError(
            f"not an Ouro checkpoint: config.json has model_type {ouro.get('model_type')!r}, expected 'ouro' "
            "(MeltForCausalLM.from_pretrained loads MELT checkpoints)"
        )
    if ouro.get("rope_scaling"):
        raise ValueError(f"Ouro config uses rope_scaling={ouro['rope_scaling']!r}, which this reader does not support")
    if ouro.get("use_sliding_window") or any(t != "full_attention" for t in ouro.get("layer_types") or ()):
        raise ValueError("Ouro config uses sliding-window layers, which this reader does not support")
    fields = {field: ouro[name] for name, field in OURO_TO_MELT.items() if ouro.get(name) is not None}
    fields.update(cache_mode=cache_mode, gate_type=gate_type)
    fields.update(overrides)
    try:
        return MeltConfig(**fields)
    except (TypeError, ValueError) as err:
        given = f" (keyword arguments given: {', '.join(sorted(overrides))})" if overrides else ""
        raise ValueError(f"the Ouro config cannot be used: {err}{given}") from None


def _weight_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json_object(index, "safetensors index").get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ValueError(f"{index} has no 'weight_map' object of tensor name -> shard file name; write it again")
        outside = sorted({v for v in weight_map.values() if Path(v).name != v or v in ("", ".", "..")})
        if outside:  # a shard is a file beside the index, never a path elsewhere
            raise ValueError(f"{index} names shard files outside {directory}: {outside}")
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


def _read_tensors(file: Path):
    """(name, tensor) pairs of one safetensors file; a file that is not one (empty, truncated, random bytes)
    raises one ValueError naming it."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)
    except (SafetensorError, OSError, RuntimeError) as err:
        size = file.stat().st_size if file.exists() else 0
        raise ValueError(
            f"{file} ({size} bytes) is not a readable safetensors file ({type(err).__name__}: {err}); it is "
            "truncated or corrupt: download or copy it again"
        ) from None


class OuroCheckpoint:
    """An Ouro checkpoint read once, to build several models from (`MeltForCausalLM.from_ouro(checkpoint, ...)`):
    the converter's teacher, student and evaluation models all come from one read of the files.

    `config` (config.json) is read on construction; the weights on first use of `tensors`, so that a config the
    caller refuses costs no weight read. `dtype` converts each tensor as it is read (None: the stored dtype).
    """

    def __init__(self, path_or_hub_id, revision: str | None = None, dtype=None, what: str = "checkpoint"):
        self.directory = resolve_checkpoint_dir(path_or_hub_id, revision, what)
        self.dtype = resolve_dtype(dtype)
        self.config_path = self.directory / "config.json"
        if not self.config_path.is_file():
            raise ValueError(f"no config.json in {self.directory}: not a Hugging Face checkpoint directory")
        self.config = read_json_object(self.config_path, "checkpoint config")

    @functools.cached_property
    def tensors(self) -> tuple[dict[str, torch.Tensor], list[str]]:
        """Every stored tensor by name (CPU), and "name (again, in file)" for each name stored a second time."""
        tensors, repeated = {}, []
        for file in _weight_files(self.directory):
            for name, tensor in _read_tensors(file):
                if name in tensors:
                    repeated.append(f"{name} (again, in {file.name})")
                else:
                    tensors[name] = tensor if self.dtype is None else tensor.to(self.dtype)
        return tensors, repeated

    def release(self) -> None:
        """Drop the tensors read so far, e.g. on a process that builds no more models; a later build reads again."""
        self.__dict__.pop("tensors", None)


def load_ouro(cls, source, cache_mode, gate_type, dtype, revision, overrides):
    """`MeltForCausalLM.from_ouro`: `source` is a path or Hub id (read here, for this model alone) or an
    `OuroCheckpoint` (read before, shared: its tensors are copied, never given to the model)."""
    overrides = dict(check_from_ouro_keywords(overrides))
    aliases = [name for name in _DTYPE_ALIASES if name in overrides]
    if aliases:
        if dtype is not None:
            raise ValueError(
                f"pass the dtype once: dtype={dtype!r} and {aliases[0]}={overrides[aliases[0]]!r} were both given"
            )
        dtype = overrides.pop(aliases[0])
    dtype = resolve_dtype(dtype)
    device = _resolve_device(overrides.pop("device_map", None))

    shared = isinstance(source, OuroCheckpoint)
    if shared and revision is not None:
        raise ValueError(f"revision={revision!r} applies to Hub ids, but {source.directory} is read already")
    checkpoint = source if shared else OuroCheckpoint(source, revision, dtype)
    try:
        config = ouro_config_to_melt(checkpoint.config, cache_mode, gate_type, overrides)
    except ValueError as err:
        raise ValueError(f"{checkpoint.config_path}: {err}") from None

    with torch.device("meta"):
        model = cls(config)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    new = {name for name in expected if GATE_MARKER in name}

    tensors, repeated = checkpoint.tensors
    state, unexpected, misshaped = {}, list(repeated), []
    for name, tensor in tensors.items():
        if name not in expected or name in new:
            unexpected.append(name)
        elif tuple(tensor.shape) != expected[name]:
            misshaped.append(f"{name}: checkpoint {tuple(tensor.shape)}, config implies {expected[name]}")
        else:
            state[name] = tensor.to(dtype or tensor.dtype, copy=shared)
    missing = sorted(set(expected) - new - set(tensors))
    if missing or unexpected or misshaped:
        problems = []
        for title, names in (("missing", missing), ("unexpected", sorted(unexpected)), ("misshaped", misshaped)):
            if names:
                problems.append(f"{len(names)} {title}: " + ", ".join(names[:20]) + (" ..." if len(names) > 20 else ""))
        raise ValueError(f"Ouro checkpoint {checkpoint.directory} does not match its config: " + "; ".join(problems))

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
    return model if device is None else model.to(device)
