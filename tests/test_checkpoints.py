"""Checkpoints: save/load round trips, Hub remote code, reading Ouro checkpoints, packaging."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from melt import MeltConfig, MeltForCausalLM
from melt.ouro_checkpoint import OURO_TO_MELT, melt_config_to_ouro, ouro_config_to_melt
from melt_testing import assert_close, tiny_model
from ouro_reference import ouro_forward

ROOT = Path(__file__).resolve().parents[1]


def _clean_env():
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"
    return env


@pytest.mark.parametrize("shard", [None, "20KB"])
def test_save_pretrained_round_trip(tmp_path, shard):
    model = tiny_model()
    ids = torch.randint(0, 61, (2, 9))
    kwargs = {} if shard is None else {"max_shard_size": shard}
    model.save_pretrained(tmp_path, **kwargs)
    files = {p.name for p in tmp_path.iterdir()}
    assert ("model.safetensors.index.json" in files) == (shard is not None)
    assert {"configuration_melt.py", "modeling_melt.py", "cache_melt.py", "attention.py"} <= files
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "melt"
    assert config["auto_map"] == {
        "AutoConfig": "configuration_melt.MeltConfig",
        "AutoModelForCausalLM": "modeling_melt.MeltForCausalLM",
    }
    loaded = MeltForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(loaded(ids).logits, model(ids).logits)
    deeper = MeltForCausalLM.from_pretrained(tmp_path, num_loops=5).eval()  # loops overridden at load time
    assert deeper.config.num_loops == 5
    assert torch.equal(deeper(ids).logits, model(ids, num_loops=5).logits)


@pytest.mark.parametrize("kernels_installed", [True, False], ids=["with-kernels", "without-kernels"])
def test_auto_classes_and_fresh_process_remote_code_load(tmp_path, kernels_installed):
    from transformers import AutoModelForCausalLM

    model = tiny_model(tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids = torch.randint(0, 61, (1, 7))
    model.save_pretrained(tmp_path)
    torch.save({"ids": ids, "logits": model(ids).logits}, tmp_path / "expected.pt")
    assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path)(ids).logits, model(ids).logits)
    script = textwrap.dedent(
        f"""
        import sys, torch
        if {not kernels_installed}:  # as on a machine where the kernels are not installed
            sys.modules["melt_kernels"] = None
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r}, trust_remote_code=True).eval()
        expected = torch.load({str(tmp_path / "expected.pt")!r})
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        assert "melt" not in sys.modules, "the remote-code load must not need the melt package"
        attention = sys.modules[type(model).__module__.rsplit(".", 1)[0] + ".attention"]
        assert (attention.triton_chunk_attention is not None) == {kernels_installed}
        assert torch.allclose(model(expected["ids"]).logits, expected["logits"], atol=1e-6)
        out = model.generate(expected["ids"], max_new_tokens=3, do_sample=False, pad_token_id=0)
        assert out.shape == (1, 10)
        print("remote-code-ok")
        """
    )
    env = _clean_env()
    env["HF_HOME"] = str(tmp_path / "hf_home")  # a fresh modules cache
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "remote-code-ok" in result.stdout


def test_installing_melt_does_not_claim_the_kernels_import_name(tmp_path):
    script = textwrap.dedent(
        """
        import importlib.metadata, importlib.util
        from transformers.utils import is_kernels_available
        import melt, melt_kernels
        spec = importlib.util.find_spec("kernels")
        try:
            importlib.metadata.version("kernels")
            hf_kernels_installed = True
        except importlib.metadata.PackageNotFoundError:
            hf_kernels_installed = False
        assert spec is None or hf_kernels_installed, f"'kernels' resolves to {spec.origin}, not Hugging Face's package"
        if not hf_kernels_installed:
            assert is_kernels_available() is False
        print("ok", melt_kernels.__name__)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=_clean_env(), capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr[-3000:]


# from_ouro --------------------------------------------------------------------------------------------------


def ouro_config(model) -> dict:
    """The Ouro config.json of a per_loop model, with the `auto_map` of Ouro's Hub checkpoints (which the reader
    ignores: Ouro's remote code is never run)."""
    return {**melt_config_to_ouro(model.config), "auto_map": {"AutoModelForCausalLM": "modeling_ouro.OuroForCausalLM"}}


def write_ouro(directory: Path, state: dict, config: dict, shards: int = 1) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    names = sorted(state)
    if shards == 1:
        save_file({n: state[n].contiguous() for n in names}, directory / "model.safetensors")
        return directory
    weight_map = {}
    for i in range(shards):
        part = names[i::shards]
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: state[n].contiguous() for n in part}, directory / file)
        weight_map.update({n: file for n in part})
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return directory


@pytest.fixture
def ouro_checkpoint(tmp_path):
    teacher = tiny_model(cache_mode="per_loop")
    state = {k: v.clone() for k, v in teacher.state_dict().items()}
    return teacher, state, ouro_config(teacher), tmp_path


@pytest.mark.parametrize("shards", [1, 3])
def test_from_ouro_gives_the_reference_logits(ouro_checkpoint, shards):
    teacher, state, config, tmp_path = ouro_checkpoint
    directory = write_ouro(tmp_path / "ouro", state, config, shards)
    ids = torch.randint(0, 61, (1, 12))
    ref_logits, _ = ouro_forward(state, teacher.config.to_dict(), ids[0], teacher.config.num_loops)
    loaded = MeltForCausalLM.from_ouro(directory, cache_mode="per_loop")
    assert_close(loaded(ids).logits[0], ref_logits[-1], atol=1e-5)
    student = MeltForCausalLM.from_ouro(directory, chunk_size=4)  # shared + elementwise gate, fresh
    assert student.config.cache_mode == "shared" and student.config.chunk_size == 4
    assert_close(student(ids, kv_blend_alpha=0.0).logits[0], ref_logits[-1], atol=1e-5)
    gate = student.model.layers[0].gate
    assert torch.equal(gate.W, torch.zeros_like(gate.W)) and torch.all(gate.b == student.config.gate_bias_init)
    assert not any(p.is_meta for p in student.parameters())
    assert MeltForCausalLM.from_ouro(directory, num_loops=6).config.num_loops == 6


def test_the_ouro_config_map_reads_back_what_it_writes():
    # every mapped field away from its default (hidden_act has one allowed value), so a field dropped or renamed on
    # one side only fails here
    fields = dict(
        vocab_size=61, hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=6,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=96, rope_theta=5_000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=True, num_loops=3, early_exit_threshold=0.75, bos_token_id=1, eos_token_id=2,
        pad_token_id=3, hidden_act="silu", initializer_range=0.01,
    )
    assert set(fields) == set(OURO_TO_MELT.values())
    ouro = json.loads(json.dumps(melt_config_to_ouro(MeltConfig(cache_mode="per_loop", **fields))))
    assert ouro["model_type"] == "ouro" and ouro["total_ut_steps"] == 3 and "num_loops" not in ouro
    assert ouro["layer_types"] == ["full_attention"] * 3 and ouro["max_window_layers"] == 3
    back = ouro_config_to_melt(ouro, "shared", "scalar", {})
    assert {name: getattr(back, name) for name in fields} == fields
    assert (back.cache_mode, back.gate_type) == ("shared", "scalar")
    default = melt_config_to_ouro(MeltConfig(cache_mode="per_loop"))
    assert default["early_exit_threshold"] == 1.0  # MELT's None (every loop) as Ouro says it
    with pytest.raises(ValueError, match="per_loop model; this config has cache_mode='shared'"):
        melt_config_to_ouro(MeltConfig())


def test_from_ouro_builds_several_models_from_one_read(ouro_checkpoint, monkeypatch):
    from melt import ouro_checkpoint as reader

    _, state, config, tmp_path = ouro_checkpoint
    directory = write_ouro(tmp_path / "ouro", state, config, shards=2)
    reads, real = [], reader._read_tensors
    monkeypatch.setattr(reader, "_read_tensors", lambda file: reads.append(file.name) or real(file))
    checkpoint = reader.OuroCheckpoint(directory)
    assert reads == []  # the config alone until a model is built
    teacher = MeltForCausalLM.from_ouro(checkpoint, cache_mode="per_loop")
    student = MeltForCausalLM.from_ouro(checkpoint, chunk_size=4, dtype=torch.float64)
    assert len(reads) == 2  # each shard once, for both models
    alone = MeltForCausalLM.from_ouro(directory, cache_mode="per_loop")
    for name, tensor in alone.state_dict().items():
        assert torch.equal(teacher.state_dict()[name], tensor), name
    assert student.lm_head.weight.dtype == torch.float64 and student.config.chunk_size == 4
    with torch.no_grad():  # each model owns its weights: changing one leaves the read, and so the next model, alone
        teacher.lm_head.weight.add_(1.0)
    assert torch.equal(checkpoint.tensors[0]["lm_head.weight"], state["lm_head.weight"])
    assert torch.equal(MeltForCausalLM.from_ouro(checkpoint).lm_head.weight, state["lm_head.weight"])
    with pytest.raises(ValueError, match="revision"):
        MeltForCausalLM.from_ouro(checkpoint, revision="main")
    checkpoint.release()  # what a converter process that builds no more models does: the next build reads again
    before = len(reads)
    assert "tensors" not in vars(checkpoint)
    assert torch.equal(MeltForCausalLM.from_ouro(checkpoint).lm_head.weight, state["lm_head.weight"])
    assert len(reads) == before + 2


def _drop(state, name):
    return {k: v for k, v in state.items() if k != name}


@pytest.mark.parametrize(
    "corrupt,match",
    [
        (lambda s, c: (s, {**c, "model_type": "llama"}), "model_type 'llama', expected 'ouro'"),
        (lambda s, c: (_drop(s, "model.layers.1.mlp.up_proj.weight"), c),
         "1 missing: model.layers.1.mlp.up_proj.weight"),
        (lambda s, c: ({**s, "model.extra.weight": torch.zeros(2)}, c), "1 unexpected: model.extra.weight"),
        (lambda s, c: ({**s, "model.norm.weight": torch.zeros(31)}, c),
         r"misshaped: model.norm.weight: checkpoint \(31,\)"),
        (lambda s, c: (s, {**c, "hidden_size": 48}), "misshaped"),
        (lambda s, c: (s, {**c, "rope_scaling": {"type": "yarn"}}), "rope_scaling"),
    ],
    ids=["model-type", "missing", "unexpected", "misshaped", "wrong-config", "rope-scaling"],
)
def test_from_ouro_rejects_corrupted_checkpoints(ouro_checkpoint, corrupt, match):
    _, state, config, tmp_path = ouro_checkpoint
    state, config = corrupt(state, config)
    directory = write_ouro(tmp_path / "bad", state, config)
    with pytest.raises(ValueError, match=match):
        MeltForCausalLM.from_ouro(directory)


def test_from_ouro_lists_every_problem_at_once(ouro_checkpoint):
    _, state, config, tmp_path = ouro_checkpoint
    state = {**_drop(state, "lm_head.weight"), "model.norm.weight": torch.zeros(3), "junk": torch.zeros(1)}
    with pytest.raises(ValueError) as err:
        MeltForCausalLM.from_ouro(write_ouro(tmp_path / "bad", state, config))
    message = str(err.value)
    assert "1 missing: lm_head.weight" in message and "1 unexpected: junk" in message and "1 misshaped" in message


def test_from_ouro_never_unpickles_and_explains_offline_hub(ouro_checkpoint, monkeypatch):
    _, state, config, tmp_path = ouro_checkpoint
    directory = tmp_path / "pickled"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(config))
    torch.save(state, directory / "pytorch_model.bin")
    with pytest.raises(ValueError, match="pickled weights are never loaded"):
        MeltForCausalLM.from_ouro(directory)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty_hf_home"))
    with pytest.raises(OSError, match="offline"):
        MeltForCausalLM.from_ouro("ByteDance/Ouro-1.4B-Thinking")


# hostile inputs to the loaders (issue 15) ---------------------------------------------------------------------


def test_from_ouro_names_a_missing_absolute_path_without_asking_the_hub(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for missing in (str(tmp_path / "does" / "not" / "exist"), "./not-here", "a/b/c", tmp_path / "gone"):
        with pytest.raises(ValueError, match="does not exist"):
            MeltForCausalLM.from_ouro(missing)
    with pytest.raises(ValueError, match="empty"):
        MeltForCausalLM.from_ouro("")


def _write_bytes(name, data):
    return lambda d: (d / name).write_bytes(data)


def _truncate(d):
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize(
    "edit,file,match",
    [
        (_write_bytes("config.json", b'{"model_type": "ouro", '), "config.json", "is not valid JSON"),
        (_write_bytes("config.json", b"[1, 2]"), "config.json", "JSON list"),
        (_write_bytes("model.safetensors", b""), "model.safetensors", r"\(0 bytes\) is not a readable safetensors"),
        (_write_bytes("model.safetensors", bytes(range(256)) * 40), "model.safetensors", "not a readable safetensors"),
        (_truncate, "model.safetensors", "truncated or corrupt"),
        (_write_bytes("model.safetensors.index.json", b'{"weight_map": {"a": '), "model.safetensors.index.json",
         "is not valid JSON"),
        (_write_bytes("model.safetensors.index.json", b'{"weight_map": {"a": "../elsewhere.safetensors"}}'),
         "model.safetensors.index.json", "outside"),
        (_write_bytes("model.safetensors.index.json", b'{"metadata": {}}'), "model.safetensors.index.json",
         "weight_map"),
    ],
    ids=["config-truncated", "config-not-object", "weights-empty", "weights-random", "weights-truncated",
         "index-truncated", "index-escapes", "index-no-map"],
)
def test_from_ouro_names_the_corrupt_file(ouro_checkpoint, edit, file, match):
    _, state, config, tmp_path = ouro_checkpoint
    directory = write_ouro(tmp_path / "bad", state, config)
    edit(directory)
    with pytest.raises(ValueError, match=match) as err:
        MeltForCausalLM.from_ouro(directory)
    assert str(directory / file) in str(err.value)


def test_from_ouro_refuses_unknown_keywords_and_accepts_transformers_dtypes(ouro_checkpoint):
    _, state, config, tmp_path = ouro_checkpoint
    directory = write_ouro(tmp_path / "ouro", state, config)
    with pytest.raises(TypeError, match=r"'nmu_loops' \(did you mean 'num_loops'\?\)"):
        MeltForCausalLM.from_ouro(directory, nmu_loops=8)
    with pytest.raises(TypeError, match="'low_cpu_mem_usage'"):
        MeltForCausalLM.from_ouro(directory, low_cpu_mem_usage=True)
    for dtype in ("bfloat16", "torch.bfloat16", torch.bfloat16):
        model = MeltForCausalLM.from_ouro(directory, dtype=dtype)
        assert model.model.embed_tokens.weight.dtype == torch.bfloat16
        assert model.model.layers[0].gate.W.dtype == torch.bfloat16  # the new gate tensors too
    assert MeltForCausalLM.from_ouro(directory, torch_dtype="float16").lm_head.weight.dtype == torch.float16
    assert MeltForCausalLM.from_ouro(directory, dtype="auto").lm_head.weight.dtype == torch.float32  # the checkpoint's
    for bad in ("bf16", "int8", torch.int64):
        with pytest.raises(ValueError, match="not a floating-point torch dtype"):
            MeltForCausalLM.from_ouro(directory, dtype=bad)
    with pytest.raises(ValueError, match="once"):
        MeltForCausalLM.from_ouro(directory, dtype="float32", torch_dtype="float16")
    assert MeltForCausalLM.from_ouro(directory, device_map="cpu").lm_head.weight.device.type == "cpu"
    with pytest.raises(ValueError, match="one device"):
        MeltForCausalLM.from_ouro(directory, device_map="auto")
    with pytest.raises(ValueError, match="revision"):
        MeltForCausalLM.from_ouro(directory, revision="main")
    with pytest.raises(ValueError, match=r"config.json: .*num_loops must be an integer >= 1, got 0"):
        MeltForCausalLM.from_ouro(directory, num_loops=0)


@pytest.mark.parametrize(
    "override,match",
    [({"gate_type": "foo"}, "gate_type"), ({"chunk_size": 0}, "chunk_size"), ({"cache_mode": "foo"}, "cache_mode"),
     ({"num_loops": 0}, "num_loops"), ({"early_exit_threshold": 2.0}, "early_exit_threshold")],
    ids=lambda v: "-".join(f"{k}={w}" for k, w in v.items()) if isinstance(v, dict) else None,
)
def test_from_pretrained_validates_overrides_at_load(tmp_path, override, match):
    tiny_model().save_pretrained(tmp_path)
    for load in (MeltForCausalLM.from_pretrained, MeltConfig.from_pretrained):
        with pytest.raises(ValueError, match=rf"MeltConfig.{match} .*\(keyword arguments given: {match}\)"):
            load(tmp_path, **override)
    assert MeltConfig.from_pretrained(tmp_path, num_loops=6).num_loops == 6  # valid overrides still apply


def test_from_pretrained_refuses_an_ouro_checkpoint_and_points_to_from_ouro(ouro_checkpoint):
    _, state, config, tmp_path = ouro_checkpoint
    directory = write_ouro(tmp_path / "ouro", state, {**config, "total_ut_steps": 2})
    for load in (MeltForCausalLM.from_pretrained, MeltConfig.from_pretrained):
        with pytest.raises(ValueError, match=r"model_type 'ouro'.*from_ouro"):
            load(directory)
    other = write_ouro(tmp_path / "llama", state, {**config, "model_type": "llama"})
    with pytest.raises(ValueError, match="model_type 'llama', expected 'melt'"):
        MeltForCausalLM.from_pretrained(other)
    assert MeltForCausalLM.from_ouro(directory).config.num_loops == 2  # the right door still opens


def test_from_ouro_reports_a_tensor_stored_twice(ouro_checkpoint):
    _, state, config, tmp_path = ouro_checkpoint
    directory = write_ouro(tmp_path / "ouro", state, config, shards=2)
    save_file({"model.norm.weight": state["model.norm.weight"]}, directory / "extra.safetensors")
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.norm.weight.copy"] = "extra.safetensors"
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    again = r"1 unexpected: model.norm.weight \(again, in model-00001-of-00002.safetensors\)"
    with pytest.raises(ValueError, match=again):
        MeltForCausalLM.from_ouro(directory)


@pytest.mark.parametrize("damage", ["empty", "truncated"])
def test_from_pretrained_names_an_unreadable_weight_file(tmp_path, damage):
    from transformers import AutoModelForCausalLM

    tiny_model().save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"" if damage == "empty" else weights.read_bytes()[:-100])
    for load in (MeltForCausalLM.from_pretrained, AutoModelForCausalLM.from_pretrained):
        with pytest.raises(ValueError, match=f"{weights} is not a readable safetensors file"):
            load(tmp_path)
