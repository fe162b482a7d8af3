"""Writing a per_loop MELT model as an Ouro (LoopLM) checkpoint directory, the format `MeltForCausalLM.from_ouro`
and the converter read (MELT_SPEC section 1).

* `config.json`: Ouro's fields in Ouro's order, model_type "ouro", from the one field map both directions share
  (`melt.ouro_checkpoint.OURO_CONFIG_FIELDS`).
* `model.safetensors`: Ouro's tensor names, which are this project's per_loop names (`lm_head.weight` left out when
  tied), in the model's dtype, which the config's `torch_dtype` names.
* The tokenizer files, copied.

The directory is written beside its target and renamed into place (`convert.atomic.staged_directory`), so a crash
never leaves a half-written checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from safetensors.torch import save_file

from melt.ouro_checkpoint import melt_config_to_ouro

from .atomic import staged_directory


def write_ouro_checkpoint(model, tokenizer_dir: Path | None, out: Path) -> None:
    """Write `model` (per_loop) as an Ouro checkpoint directory at `out` (replaced), atomically."""
    # Refuses a shared-cache model before anything is written.
    config = melt_config_to_ouro(model.config, next(model.parameters()).dtype)
    with staged_directory(Path(out)) as staging:
        state = {name: t.detach().contiguous().clone() for name, t in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        save_file(state, staging / "model.safetensors", metadata={"format": "pt"})
        os.chmod(staging / "model.safetensors", 0o644)
        (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if tokenizer_dir is not None:
            for file in sorted(Path(tokenizer_dir).iterdir()):
                if file.is_file():
                    shutil.copy2(file, staging / file.name)
