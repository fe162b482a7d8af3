"""The Ouro -> MELT converter (`convert/from_ouro.py`): exactness at alpha 0, learning, resume, 2 processes,
bad inputs, output loading, NaN guard. A tiny random Ouro checkpoint and a small corpus slice keep it fast."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from melt import MeltConfig, MeltForCausalLM
from melt.modeling_melt import GATE_MARKER
from melt_convert import distill, from_ouro, train
from melt_convert.data import TINY_CORPUS, TINY_TOKENIZER
from melt_convert.ouro_writer import write_ouro_checkpoint
from melt_convert.train_tiny_ouro import teacher_config
from melt_testing import assert_close

ROOT = Path(__file__).resolve().parents[1]
TRAINED = from_ouro.EMBEDDED_OURO  # the trained tiny Ouro (4 loops): learning is measurable against it
SMALL = ["--preset", "tiny", "--seq-len", "16", "--chunk-size", "4", "--batch-size", "4", "--micro-batch-size", "2",
         "--holdout", "4", "--eval-batch-size", "4"]


@pytest.fixture(scope="module")
def ouro_dir(tmp_path_factory):
    """A tiny random Ouro-format checkpoint (3 loops) with the project's tokenizer."""
    torch.manual_seed(0)
    config = MeltConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, head_dim=8, num_loops=3, max_position_embeddings=128,
                        rope_theta=10_000.0, cache_mode="per_loop")
    model = MeltForCausalLM(config)
    path = tmp_path_factory.mktemp("ckpt") / "tiny-ouro"
    write_ouro_checkpoint(model, TINY_TOKENIZER, path)
    return path


def test_the_writer_rewrites_the_embedded_tiny_ouro_config_byte_for_byte(tmp_path):
    from transformers import AutoTokenizer

    model = MeltForCausalLM(teacher_config(AutoTokenizer.from_pretrained(TINY_TOKENIZER)))  # as train_tiny_ouro does
    write_ouro_checkpoint(model, TINY_TOKENIZER, tmp_path / "tiny-ouro")
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "tiny-ouro" / name).read_bytes() == (TRAINED / name).read_bytes(), name


def test_the_writer_names_the_dtype_it_writes(tmp_path):
    model = MeltForCausalLM(MeltConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                       num_attention_heads=2, head_dim=8, num_loops=2, cache_mode="per_loop"))
    write_ouro_checkpoint(model.to(torch.bfloat16), None, tmp_path / "bf16")
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    loaded = MeltForCausalLM.from_ouro(tmp_path / "bf16", cache_mode="per_loop", dtype="auto")
    assert loaded.lm_head.weight.dtype == torch.bfloat16
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    lines = TINY_CORPUS.read_text().splitlines()[:150]  # text and chat records both
    path = tmp_path_factory.mktemp("data") / "corpus.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def _args(ouro_dir, data_file, out, *extra):
    return ["--ouro", str(ouro_dir), "--data", str(data_file), "--out", str(out), *SMALL, *extra]


def _log(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


@pytest.fixture(scope="module")
def converted(data_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "melt"
    report = from_ouro.run(_args(TRAINED, data_file, out, "--phase1-steps", "12", "--phase2-steps", "8"))
    return out, report


def test_alpha_zero_student_equals_teacher_exactly(ouro_dir):
    teacher = MeltForCausalLM.from_ouro(ouro_dir, cache_mode="per_loop", chunk_size=4)
    student = MeltForCausalLM.from_ouro(ouro_dir, cache_mode="shared", chunk_size=4)
    with torch.no_grad():  # a gate far from its init, so that alpha = 0 is what hides it
        for name, param in student.named_parameters():
            if GATE_MARKER in name:
                param.normal_(0.0, 0.5)
    ids = torch.randint(0, 512, (2, 14))
    t = teacher(ids, use_cache=False, return_loop_outputs=True, return_attention_outputs=True)
    s = student(ids, use_cache=False, return_loop_outputs=True, return_attention_outputs=True, kv_blend_alpha=0.0)
    # Exact up to fp32 rounding: the student attends chunk by chunk (prefix rows + chunk rows), the teacher in
    # one pass, so the softmax reductions run in another order.
    for a, b in zip(s.loop_logits, t.loop_logits, strict=True):
        assert_close(a, b, atol=1e-5)
    for s_loop, t_loop in zip(s.attention_outputs, t.attention_outputs, strict=True):
        for a, b in zip(s_loop, t_loop, strict=True):
            assert_close(a, b, atol=1e-5)
    assert abs(distill.kd_loss(s.loop_logits, t.loop_logits).item()) < 1e-7
    assert distill.alignment_loss(s.attention_outputs, t.attention_outputs).item() < 1e-10
    moved = student(ids, use_cache=False, return_loop_outputs=True, kv_blend_alpha=0.5)
    assert distill.kd_loss(moved.loop_logits, t.loop_logits).item() > 1e-6


@pytest.mark.parametrize("block", [1, 5, 64])
def test_blockwise_kd_from_hidden_states_equals_kd_of_the_logits(ouro_dir, block):
    teacher = MeltForCausalLM.from_ouro(ouro_dir, cache_mode="per_loop", chunk_size=4)
    student = MeltForCausalLM.from_ouro(ouro_dir, cache_mode="shared", chunk_size=4)
    ids = torch.randint(0, 512, (2, 14))
    with torch.no_grad():
        t = teacher(ids, use_cache=False, return_loop_outputs=True)
    losses, grads = [], []
    for blockwise in (False, True):
        student.zero_grad()
        s = student(ids, use_cache=False, return_loop_outputs=True, kv_blend_alpha=0.5,
                    logits_to_keep=1 if blockwise else 0)
        if blockwise:
            assert s.loop_logits[0].shape[1] == 1  # no full logits were made
            loss = distill.kd_loss_from_hidden(student.lm_head, s.loop_hidden_states, teacher.lm_head,
                                               t.loop_hidden_states, temperature=2.0, block_tokens=block)
        else:
            loss = distill.kd_loss(s.loop_logits, t.loop_logits, temperature=2.0)
        loss.backward()
        losses.append(loss.item())
        grads.append({n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None})
    assert losses[0] > 1e-6 and abs(losses[0] - losses[1]) < 1e-4 * losses[0]  # fp32 matmuls of other shapes
    assert grads[0].keys() == grads[1].keys() and "lm_head.weight" in grads[0]
    for name, grad in grads[0].items():
        assert_close(grads[1][name], grad, rtol=1e-4, atol=1e-7, name=name)
    assert not any(p.grad is not None for p in teacher.parameters())
    with pytest.raises(ValueError, match="loops"):
        distill.kd_loss_from_hidden(student.lm_head, s.loop_hidden_states[:1], teacher.lm_head, t.loop_hidden_states)


def test_alpha_schedule():
    assert [distill.alpha_at(s, 5) for s in range(7)] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert [distill.alpha_at(s, 5, interpolate=False) for s in range(7)] == [1.0] * 7


def _step_models(ouro_dir):
    """Teacher and student of the tiny checkpoint, the student's gates far from their init so that alpha shows."""
    teacher = MeltForCausalLM.from_ouro(ouro_dir, cache_mode="per_loop", chunk_size=4).requires_grad_(False)
    student = MeltForCausalLM.from_ouro(ouro_dir, cache_mode="shared", chunk_size=4).train()
    with torch.no_grad():
        for name, param in student.named_parameters():
            if GATE_MARKER in name:
                param.normal_(0.0, 0.5)
    return teacher, student


def _recorded_calls(model) -> list[dict]:
    """The keyword arguments of every forward of `model` from now on."""
    calls, forward = [], model.forward
    model.forward = lambda *args, **kwargs: calls.append(kwargs) or forward(*args, **kwargs)
    return calls


# (step, phase, alpha) of a 5 + 3 step recipe: the first step, the last phase-1 step, the first phase-2 step.
BOUNDARIES = [(0, 1, 0.0), (4, 1, 1.0), (5, 2, 1.0)]


@pytest.mark.parametrize("step,phase,alpha", BOUNDARIES, ids=["first", "last-of-phase-1", "first-of-phase-2"])
def test_distill_step_is_the_loss_the_training_loop_computed(ouro_dir, step, phase, alpha):
    teacher, student = _step_models(ouro_dir)
    recipe = distill.Recipe(phase1_steps=5, phase2_steps=3, beta=0.25, temperature=2.0)
    assert (recipe.phase_at(step), recipe.alpha_at(step), recipe.total_steps) == (phase, alpha, 8)
    ids = torch.randint(0, 512, (2, 16))
    t_calls, s_calls = _recorded_calls(teacher), _recorded_calls(student)
    torch.manual_seed(1)
    got = distill.distill_step(student, teacher, ids, step, recipe)
    assert (got.phase, got.alpha) == (phase, alpha)
    assert [c["return_attention_outputs"] for c in t_calls + s_calls] == [phase == 2] * 2
    assert s_calls[0]["kv_blend_alpha"] == alpha and t_calls[0]["logits_to_keep"] == s_calls[0]["logits_to_keep"] == 1
    assert got.total.requires_grad

    # What convert/train.py's loop computed inline before distill_step existed, to the bit.
    torch.manual_seed(1)
    with torch.no_grad():
        t = teacher(ids, use_cache=False, return_loop_outputs=True, logits_to_keep=1,
                    return_attention_outputs=phase == 2)
    s = student(ids, use_cache=False, return_loop_outputs=True, kv_blend_alpha=alpha, logits_to_keep=1,
                return_attention_outputs=phase == 2)
    kd = distill.kd_loss_from_hidden(student.lm_head, s.loop_hidden_states, teacher.lm_head, t.loop_hidden_states, 2.0)
    align = distill.alignment_loss(s.attention_outputs, t.attention_outputs) if phase == 2 else kd.new_zeros(())
    assert torch.equal(got.kd, kd) and torch.equal(got.align, align) and torch.equal(got.total, kd + 0.25 * align)

    # The same terms from the full per-loop logits (another summation order).
    with torch.no_grad():
        t = teacher(ids, use_cache=False, return_loop_outputs=True, return_attention_outputs=True)
        s = student(ids, use_cache=False, return_loop_outputs=True, return_attention_outputs=True, kv_blend_alpha=alpha)
    full_kd = distill.kd_loss(s.loop_logits, t.loop_logits, 2.0)
    assert_close(got.kd.detach(), full_kd, rtol=1e-4, atol=1e-7)
    if phase == 1:
        assert got.align.item() == 0.0 and torch.equal(got.total, got.kd)
    else:
        assert got.align.item() > 0.0 and got.total.item() > got.kd.item()
        assert_close(got.align.detach(), distill.alignment_loss(s.attention_outputs, t.attention_outputs),
                     rtol=1.3e-6, atol=1e-5)
    assert (got.kd.item() < 1e-6) == (alpha == 0.0)  # at alpha 0 the student is the teacher, whatever its gates

    got.total.backward()
    assert student.lm_head.weight.grad is not None and all(p.grad is None for p in teacher.parameters())


def test_distill_step_without_interpolation_runs_phase_one_at_alpha_one(ouro_dir):
    from types import SimpleNamespace

    options = SimpleNamespace(phase1_steps=5, phase2_steps=3, no_interpolation=True, beta=0.25, temperature=1.0)
    recipe = distill.Recipe.from_options(options)
    assert recipe == distill.Recipe(5, 3, interpolate=False, beta=0.25, temperature=1.0)
    teacher, student = _step_models(ouro_dir)
    got = distill.distill_step(student, teacher, torch.randint(0, 512, (2, 16)), 0, recipe)
    assert (got.phase, got.alpha) == (1, 1.0) and got.kd.item() > 1e-6 and got.align.item() == 0.0
    assert [recipe.alpha_at(step) for step in range(8)] == [1.0] * 8
    only_phase_2 = distill.Recipe(0, 3)
    assert (only_phase_2.phase_at(0), only_phase_2.alpha_at(0)) == (2, 1.0)


def test_a_conversion_reads_the_ouro_checkpoint_once(ouro_dir, data_file, tmp_path, monkeypatch):
    from melt import ouro_checkpoint

    reads, real = [], ouro_checkpoint._read_tensors
    monkeypatch.setattr(ouro_checkpoint, "_read_tensors", lambda file: reads.append(file.name) or real(file))
    from_ouro.run(_args(ouro_dir, data_file, tmp_path / "out", "--phase1-steps", "1", "--phase2-steps", "1"))
    assert reads == ["model.safetensors"]  # teacher, student and the report's teacher and `last` models alike


def test_no_interpolation_runs_phase_one_at_alpha_one(ouro_dir, data_file, tmp_path):
    out = tmp_path / "melt"
    report = from_ouro.run(_args(ouro_dir, data_file, out, "--phase1-steps", "3", "--phase2-steps", "1",
                                 "--no-interpolation"))
    log = _log(out / "train_log.jsonl")
    assert [(r["phase"], r["alpha"]) for r in log] == [(1, 1.0), (1, 1.0), (1, 1.0), (2, 1.0)]
    assert report["interpolation"] is False


def _phase_loss(model, teacher, rows, phase, beta=0.1):
    with torch.no_grad():
        t = teacher(rows, use_cache=False, return_loop_outputs=True, return_attention_outputs=True)
        # alpha = 1: the model that phase 1 must reach
        s = model(rows, use_cache=False, return_loop_outputs=True, return_attention_outputs=True)
        loss = distill.kd_loss(s.loop_logits, t.loop_logits)
        if phase == 2:
            loss = loss + beta * distill.alignment_loss(s.attention_outputs, t.attention_outputs)
    return loss.item()


@pytest.mark.parametrize("phase", ["1", "2"])
def test_each_phase_lowers_its_loss(data_file, tmp_path, phase):
    ouro_dir = TRAINED
    out = tmp_path / "out"
    from_ouro.run(_args(ouro_dir, data_file, out, "--phase", phase, "--phase1-steps", "16", "--phase2-steps", "16",
                        "--batch-size", "8", "--micro-batch-size", "8", "--lr", "3e-4"))
    teacher = MeltForCausalLM.from_ouro(ouro_dir, cache_mode="per_loop", chunk_size=4)
    before = MeltForCausalLM.from_ouro(ouro_dir, cache_mode="shared", chunk_size=4)
    after = MeltForCausalLM.from_pretrained(out)
    rows = torch.tensor(_held_out_rows(ouro_dir, data_file))
    assert _phase_loss(after, teacher, rows, int(phase)) < _phase_loss(before, teacher, rows, int(phase))
    log = _log(out / "train_log.jsonl")
    assert [r["phase"] for r in log] == [int(phase)] * 16
    if phase == "2":
        assert sum(r["loss"] for r in log[-4:]) < sum(r["loss"] for r in log[:4])


def _held_out_rows(ouro_dir, data_file):
    from transformers import AutoTokenizer

    from melt_convert.data import load_text_dataset, pack_sequences, split_holdout

    tokenizer = AutoTokenizer.from_pretrained(TINY_TOKENIZER)
    rows = pack_sequences(load_text_dataset(data_file, tokenizer), tokenizer, 16, 0)
    return split_holdout(rows, 4)[1].tolist()


def test_report_and_output_load_both_ways_and_generate(converted):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, report = converted
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "report.json",
            "train_log.jsonl", "modeling_melt.py"} <= names
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "melt" and config["cache_mode"] == "shared" and "auto_map" in config
    assert json.loads((out / "report.json").read_text()) == report
    loops = 4
    assert len(report["per_loop"]["student"]["kl"]) == loops and len(report["per_loop"]["teacher"]["ce"]) == loops
    # 20 steps of 64 tokens are too few for the student to beat `last` here; the embedded default (100 steps of
    # 1024 tokens) does, at every loop. The report must carry the comparison either way.
    assert set(report["per_loop"]) == {"teacher", "student", "last (no training)"}
    assert isinstance(report["student_closer_than_last"], bool)
    assert len(_log(out / "train_log.jsonl")) == 20
    assert not out.with_name(out.name + ".work").exists()  # the work directory is gone after success

    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer("a=3;b=a+4;?b=", return_tensors="pt").input_ids
    native = MeltForCausalLM.from_pretrained(out).eval()
    # The Auto classes dispatch the output to MELT (registered in this process, so this is not remote code: the
    # fresh-process remote-code load of a saved directory is test_checkpoints.py's).
    auto = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(auto) is MeltForCausalLM
    a = native.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    b = auto.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert a.shape == (1, ids.shape[1] + 4) and torch.equal(a, b)


def test_existing_out_is_refused_unless_overwrite(converted, ouro_dir, data_file):
    out, _ = converted
    with pytest.raises(ValueError, match="already exists"):
        from_ouro.run(_args(ouro_dir, data_file, out, "--phase1-steps", "1", "--phase2-steps", "0"))
    assert (out / "model.safetensors").is_file()


def test_kill_and_resume_reaches_the_same_weights(ouro_dir, data_file, tmp_path):
    steps = ["--phase1-steps", "4", "--phase2-steps", "4", "--checkpoint-every", "3"]
    whole = tmp_path / "whole"
    from_ouro.run(_args(ouro_dir, data_file, whole, *steps))
    pieces = tmp_path / "pieces"
    assert from_ouro.run(_args(ouro_dir, data_file, pieces, *steps, "--stop-after", "5")) is None
    assert not pieces.exists() and (tmp_path / "pieces.work" / "checkpoint.pt").is_file()
    with pytest.raises(ValueError, match="differ from the checkpoint"):
        from_ouro.run(_args(ouro_dir, data_file, pieces, "--phase1-steps", "4", "--phase2-steps", "5", "--resume"))
    from_ouro.run(_args(ouro_dir, data_file, pieces, *steps, "--resume"))
    a, b = load_file(whole / "model.safetensors"), load_file(pieces / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert_close(b[name], a[name], atol=1e-6, name=name)
    assert [r["step"] for r in _log(pieces / "train_log.jsonl")] == list(range(8))
    assert [r["loss"] for r in _log(pieces / "train_log.jsonl")] == [r["loss"] for r in _log(whole / "train_log.jsonl")]


def test_sigterm_saves_a_checkpoint_and_resume_finishes(ouro_dir, data_file, tmp_path):
    import signal
    import time

    out = tmp_path / "melt"
    steps = ["--phase1-steps", "400", "--phase2-steps", "0", "--checkpoint-every", "0"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "melt_convert.from_ouro", *_args(ouro_dir, data_file, out, *steps)]
    process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    log = tmp_path / "melt.work" / "log.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (log.is_file() and len(log.read_text().splitlines()) >= 2):
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert "continue with --resume" in stderr
    assert (tmp_path / "melt.work" / "checkpoint.pt").is_file() and not out.exists()
    done = len(_log(log))
    assert 2 <= done < 400
    from_ouro.run(_args(ouro_dir, data_file, out, "--phase1-steps", "400", "--phase2-steps", "0",
                        "--checkpoint-every", "0", "--resume", "--stop-after", "3"))
    assert len(_log(log)) == done + 3  # picked up where the signal stopped it


def test_embedded_default_ends_closer_to_the_teacher_than_training_free_last(tmp_path):
    report = from_ouro.run(["--out", str(tmp_path / "melt")])  # the README's main job, as it runs there
    kl = {name: sum(row["kl"]) for name, row in report["per_loop"].items() if name != "teacher"}
    assert report["preset"] == "tiny" and report["student_closer_than_last"]
    assert kl["student"] < kl["last (no training)"], kl


def test_two_gloo_processes_match_one(ouro_dir, data_file, tmp_path):
    steps = ["--phase1-steps", "3", "--phase2-steps", "3"]
    single = tmp_path / "single"
    from_ouro.run(_args(ouro_dir, data_file, single, *steps, "--micro-batch-size", "4"))
    double = tmp_path / "double"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "melt_convert.from_ouro", *_args(ouro_dir, data_file, double, *steps)]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    one, two = _log(single / "train_log.jsonl"), _log(double / "train_log.jsonl")
    assert [r["step"] for r in two] == list(range(6))
    for a, b in zip(one, two, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-7), (a, b)
    report = json.loads((double / "report.json").read_text())
    assert report["processes"] == 2
    w1, w2 = load_file(single / "model.safetensors"), load_file(double / "model.safetensors")
    for name in w1:
        assert_close(w2[name], w1[name], rtol=1e-4, atol=1e-5, name=name)


def _corrupt(src: Path, dst: Path, edit) -> Path:
    import shutil

    shutil.copytree(src, dst)
    edit(dst)
    return dst


def _set_model_type(path):
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(config | {"model_type": "llama"}))


def _drop_tensor(path):
    state = load_file(path / "model.safetensors")
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, path / "model.safetensors")


def _misshape_tensor(path):
    state = load_file(path / "model.safetensors")
    state["model.norm.weight"] = torch.ones(31)
    save_file(state, path / "model.safetensors")


@pytest.mark.parametrize(
    "case, match",
    [
        ("not_ouro", "not an Ouro checkpoint"),
        ("missing_tensor", "1 missing: model.layers.1.mlp.up_proj.weight"),
        ("misshaped_tensor", "misshaped: model.norm.weight"),
        ("empty_data", "empty"),
        ("unreadable_data", "cannot read json"),
        ("missing_data", "does not exist"),
        ("seq_chunk", "must divide --seq-len"),
        ("batch_micro", "must divide the per-process batch"),
        ("seq_too_long", "max_position_embeddings"),
    ],
)
def test_bad_inputs_fail_before_training_and_leave_nothing(ouro_dir, data_file, tmp_path, case, match):
    ouro, data, extra = ouro_dir, data_file, []
    if case == "not_ouro":
        ouro = _corrupt(ouro_dir, tmp_path / "ckpt", _set_model_type)
    elif case == "missing_tensor":
        ouro = _corrupt(ouro_dir, tmp_path / "ckpt", _drop_tensor)
    elif case == "misshaped_tensor":
        ouro = _corrupt(ouro_dir, tmp_path / "ckpt", _misshape_tensor)
    elif case == "empty_data":
        data = tmp_path / "empty.jsonl"
        data.write_text("\n")
    elif case == "unreadable_data":
        data = tmp_path / "bad.jsonl"
        data.write_text('{"text": "fine"}\n{not json at all\n')
    elif case == "missing_data":
        data = tmp_path / "nowhere.jsonl"
    elif case == "seq_chunk":
        extra = ["--chunk-size", "5"]
    elif case == "batch_micro":
        extra = ["--micro-batch-size", "3"]
    elif case == "seq_too_long":
        extra = ["--seq-len", "256", "--chunk-size", "4"]
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=match):
        from_ouro.run(_args(ouro, data, out, "--phase1-steps", "2", "--phase2-steps", "0", *extra))
    assert not out.exists() and not (tmp_path / "out.work").exists()


def test_cli_prints_one_line_errors(tmp_path, capsys):
    assert from_ouro.main(["--out", str(tmp_path / "o"), "--seq-len", "10", "--chunk-size", "3"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: inconsistent options") and "\n" not in err
    assert not (tmp_path / "o").exists()


def test_nan_loss_stops_keeps_the_last_good_checkpoint_and_its_advice_works(ouro_dir, data_file, tmp_path, monkeypatch):
    import shlex

    calls = {"n": 0}
    real_kd = distill.kd_loss_from_hidden

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss = real_kd(*args, **kwargs)
        return loss * float("nan") if calls["n"] > 2 * 3 else loss  # 2 micro-batches per step: NaN at step 3

    monkeypatch.setattr(distill, "kd_loss_from_hidden", poisoned)
    out = tmp_path / "out"
    argv = _args(ouro_dir, data_file, out, "--phase1-steps", "6", "--phase2-steps", "0", "--checkpoint-every", "2")
    with pytest.raises(train.NonFiniteLoss, match="non-finite loss at step 3") as err:
        from_ouro.run(argv)
    assert not out.exists()
    checkpoint = torch.load(tmp_path / "out.work" / "checkpoint.pt", weights_only=False)
    assert checkpoint["step"] == 2
    assert all(torch.isfinite(t).all() for t in checkpoint["model"].values())
    assert [r["step"] for r in _log(tmp_path / "out.work" / "log.jsonl")] == [0, 1, 2]

    # The advice is a command line that works as it is printed: resume with lower learning rates.
    command = str(err.value).split("lower learning rates: ", 1)[1]
    words = shlex.split(command)
    assert words[:3] == ["python", "-m", "convert.from_ouro"] and "--resume" in words and "--change-lr" in words
    monkeypatch.setattr(distill, "kd_loss_from_hidden", real_kd)
    from_ouro.run(words[3:])
    log = _log(out / "train_log.jsonl")
    assert [r["step"] for r in log] == list(range(6))
    lr = float(words[words.index("--lr") + 1])
    assert lr < 1e-3 and log[5]["lr_ouro"] == lr and log[2]["lr_ouro"] == pytest.approx(lr * 3 / 5)  # warm-up kept
    assert log[1]["lr_ouro"] == pytest.approx(1e-3 * 2 / 5)


def test_resume_refuses_a_changed_lr_unless_asked(ouro_dir, data_file, tmp_path):
    steps = ["--phase1-steps", "3", "--phase2-steps", "0"]
    out = tmp_path / "out"
    assert from_ouro.run(_args(ouro_dir, data_file, out, *steps, "--stop-after", "1")) is None
    with pytest.raises(ValueError, match=r"differ from the checkpoint's \(lr: .*add --change-lr"):
        from_ouro.run(_args(ouro_dir, data_file, out, *steps, "--resume", "--lr", "1e-4"))
    with pytest.raises(ValueError, match="seed"):  # --change-lr allows the learning rates only
        from_ouro.run(_args(ouro_dir, data_file, out, *steps, "--resume", "--change-lr", "--seed", "3"))
    with open(tmp_path / "out.work" / "log.jsonl", "a") as log:  # a line cut short by a crash does not block --resume
        log.write('{"step": 1, "loss": 0.')
    from_ouro.run(_args(ouro_dir, data_file, out, *steps, "--resume", "--change-lr", "--gate-lr", "2e-3"))
    lrs = [r["lr_gate"] for r in _log(out / "train_log.jsonl")]
    assert lrs == pytest.approx([1e-2 * 1 / 5, 2e-3 * 2 / 5, 2e-3 * 3 / 5], rel=1e-12)  # warm-up position kept


def test_help_documents_every_option(capsys):
    with pytest.raises(SystemExit):
        from_ouro.main(["--help"])
    text = capsys.readouterr().out
    for action in from_ouro.build_parser()._actions:
        assert action.help, action.dest
    options = ("--ouro", "--data", "--phase", "--resume", "--overwrite", "--push-to-hub", "--temperature", "--beta")
    for option in options:
        assert option in text


# The conversion's last stages and hostile arguments (issue 15) -------------------------------------------------

STAGE_STEPS = ["--phase1-steps", "2", "--phase2-steps", "1", "--checkpoint-every", "0"]


def _error_line(capsys):
    """The one line the CLI printed about a failure (progress bars and library notices aside), no traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith(("error:", "interrupted"))]
    assert len(lines) == 1 and err.rstrip().endswith(lines[0]), err[-3000:]
    return lines[0]


def _leftovers(tmp_path):
    return sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".") or p.name.endswith(".tmp"))


def _assert_output_is_the_checkpoint(out, checkpoint):
    weights = load_file(out / "model.safetensors")
    assert weights.keys() <= checkpoint["model"].keys()
    for name, tensor in weights.items():
        assert torch.equal(tensor, checkpoint["model"][name]), name


def _no_training(monkeypatch):
    def trained(*args, **kwargs):
        raise AssertionError("--resume after a complete training must not train again")

    monkeypatch.setattr(distill, "kd_loss_from_hidden", trained)


@pytest.mark.parametrize("stage", ["evaluation", "final write"])
def test_interrupt_after_training_then_resume_finishes_without_retraining(ouro_dir, data_file, tmp_path, monkeypatch,
                                                                          capsys, stage):
    import signal

    from melt import MeltForCausalLM

    out, work = tmp_path / "out", tmp_path / "out.work"
    argv = _args(ouro_dir, data_file, out, *STAGE_STEPS)
    if stage == "evaluation":
        def interrupted(*args, **kwargs):
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C in the middle of the held-out evaluation
            raise AssertionError("the signal must stop the evaluation")

        monkeypatch.setattr(from_ouro, "compare_to_teacher", interrupted)
    else:
        real_save = MeltForCausalLM.save_pretrained

        def interrupted(self, directory, **kwargs):
            real_save(self, directory, **kwargs)  # half of the output is written
            os.kill(os.getpid(), signal.SIGINT)

        monkeypatch.setattr(MeltForCausalLM, "save_pretrained", interrupted)
    try:
        code = from_ouro.main(argv)
    except KeyboardInterrupt:  # a regression must fail this test, not stop the whole pytest session
        pytest.fail("SIGINT after training escaped as KeyboardInterrupt")
    assert code == 128 + signal.SIGINT
    err = _error_line(capsys)
    assert f"during the {stage}" in err and "--resume" in err
    checkpoint = torch.load(work / "checkpoint.pt", weights_only=False)
    assert checkpoint["step"] == 3  # the final weights were checkpointed before the evaluation
    assert not out.exists() and _leftovers(tmp_path) == []
    assert (work / "report.json").is_file() == (stage == "final write")
    report_before = (work / "report.json").read_text() if stage == "final write" else None

    monkeypatch.undo()
    _no_training(monkeypatch)
    report = from_ouro.run([*argv, "--resume"])
    _assert_output_is_the_checkpoint(out, checkpoint)
    assert len(_log(out / "train_log.jsonl")) == 3 and not work.exists() and _leftovers(tmp_path) == []
    if report_before is not None:  # the evaluation is not redone either
        assert json.loads(report_before) == report


def test_disk_full_while_checkpointing_removes_the_temporary_file(ouro_dir, data_file, tmp_path, monkeypatch, capsys):
    import errno

    real_save = torch.save
    saves = {"n": 0}

    def full_disk(payload, file, *args, **kwargs):
        saves["n"] += 1
        if saves["n"] == 2:  # the second checkpoint: half written, then the disk is full
            file.write(b"\0" * 1000)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(payload, file, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    out, work = tmp_path / "out", tmp_path / "out.work"
    argv = _args(ouro_dir, data_file, out, "--phase1-steps", "3", "--phase2-steps", "0", "--checkpoint-every", "1")
    assert from_ouro.main(argv) == 1
    err = _error_line(capsys)
    assert err.startswith("error: no space left on device")
    assert str(work / "checkpoint.pt") in err and "bytes free" in err and "--resume" in err
    assert sorted(p.name for p in work.iterdir()) == ["checkpoint.pt", "log.jsonl"]  # no checkpoint.pt.tmp
    assert torch.load(work / "checkpoint.pt", weights_only=False)["step"] == 1  # the previous one is intact
    monkeypatch.setattr(torch, "save", real_save)
    from_ouro.run([*argv, "--resume"])
    assert [r["step"] for r in _log(out / "train_log.jsonl")] == [0, 1, 2]


def test_disk_full_in_the_final_write_keeps_the_trained_weights(ouro_dir, data_file, tmp_path, monkeypatch, capsys):
    from safetensors import SafetensorError

    from melt import MeltForCausalLM

    def full_disk(self, directory, **kwargs):
        Path(directory).mkdir(parents=True, exist_ok=True)
        (Path(directory) / "model.safetensors").write_bytes(b"\0" * 100)
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(MeltForCausalLM, "save_pretrained", full_disk)
    out, work = tmp_path / "out", tmp_path / "out.work"
    argv = _args(ouro_dir, data_file, out, *STAGE_STEPS)
    assert from_ouro.main(argv) == 1
    err = _error_line(capsys)
    assert err.startswith("error: no space left on device while writing the converted model")
    assert str(work / "checkpoint.pt") in err and "--resume" in err
    assert not out.exists() and _leftovers(tmp_path) == []
    checkpoint = torch.load(work / "checkpoint.pt", weights_only=False)
    monkeypatch.undo()
    _no_training(monkeypatch)
    from_ouro.run([*argv, "--resume"])
    _assert_output_is_the_checkpoint(out, checkpoint)


def test_a_failed_overwrite_keeps_the_previous_output(ouro_dir, data_file, tmp_path, monkeypatch):
    from melt import MeltForCausalLM

    out = tmp_path / "melt"
    out.mkdir()  # an earlier conversion's output
    (out / "config.json").write_text('{"model_type": "melt"}')
    (out / "model.safetensors").write_bytes(b"earlier weights")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def broken(self, directory, **kwargs):
        raise PermissionError(13, "Permission denied", str(directory))

    monkeypatch.setattr(MeltForCausalLM, "save_pretrained", broken)
    argv = _args(ouro_dir, data_file, out, *STAGE_STEPS, "--overwrite")
    with pytest.raises(OSError, match="writing the converted model .* failed .*Permission denied.*--resume"):
        from_ouro.run(argv)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before and _leftovers(tmp_path) == []
    monkeypatch.undo()
    _no_training(monkeypatch)
    from_ouro.run([*argv, "--resume"])  # --resume with --overwrite: finish, then replace --out
    assert (out / "report.json").is_file() and not (tmp_path / "melt.work").exists() and _leftovers(tmp_path) == []


def test_resume_from_a_damaged_checkpoint_names_it(ouro_dir, data_file, tmp_path):
    out, work = tmp_path / "out", tmp_path / "out.work"
    argv = _args(ouro_dir, data_file, out, "--phase1-steps", "2", "--phase2-steps", "0")
    assert from_ouro.run([*argv, "--stop-after", "1"]) is None
    (work / "checkpoint.pt").write_bytes((work / "checkpoint.pt").read_bytes()[:5000])  # a copy cut short
    with pytest.raises(ValueError, match=f"cannot read the checkpoint {work / 'checkpoint.pt'} .*--overwrite"):
        from_ouro.run([*argv, "--resume"])


def test_a_work_directory_without_checkpoint_does_not_block_a_rerun(ouro_dir, data_file, tmp_path, capsys):
    out, work = tmp_path / "out", tmp_path / "out.work"
    work.mkdir()
    (work / "log.jsonl").write_text('{"step": 0}\n')  # a run that died before its first checkpoint
    argv = _args(ouro_dir, data_file, out, "--phase1-steps", "1", "--phase2-steps", "0")
    assert from_ouro.main([*argv, "--resume"]) == 1
    assert "nothing to resume, run again without --resume" in capsys.readouterr().err
    from_ouro.run(argv)
    assert len(_log(out / "train_log.jsonl")) == 1


@pytest.mark.parametrize(
    "case,match",
    [
        ("chunk-zero", "--chunk-size must be >= 1, got 0"),
        ("out-dot", "is the current directory or one above it"),
        ("out-parent", "is the current directory or one above it"),
        ("out-root", "root of the file system"),
        ("out-is-a-file", "is a file, not a directory"),
        ("out-is-the-ouro-input", "holds the input --ouro"),
        ("out-holds-the-data", "holds the input --data"),
        ("overwrite-foreign-dir", "not a converted MELT model"),
        ("work-dir-foreign", "files this converter did not write"),
        ("work-dir-inside-out", "separate directories"),
        ("ouro-missing-abs", "--ouro checkpoint directory .* does not exist"),
        ("tokenizer-missing-abs", "--tokenizer directory .* does not exist"),
        ("messages-string", "'messages' must be a list of"),
        ("ouro-config-not-json", "config.json is not valid JSON"),
        ("ouro-weights-random", "model.safetensors .* is not a readable safetensors file"),
        ("change-lr-without-resume", "--change-lr only applies with --resume"),
        ("lr-inf", "--lr must be finite"),
        ("beta-nan", "--beta must be >= 0, got nan"),
        ("temperature-inf", "--temperature must be finite"),
        ("tokenizer-is-a-file", "--tokenizer .* is a file"),
    ],
)
def test_cli_hostile_arguments_give_one_line_and_leave_nothing(ouro_dir, data_file, tmp_path, monkeypatch, capsys,
                                                                case, match):
    import shutil

    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    ouro, data, out, extra = ouro_dir, data_file, tmp_path / "out", []
    if case == "chunk-zero":
        extra = ["--chunk-size", "0"]
    elif case == "out-dot":
        out = Path(".")
        extra = ["--overwrite"]
    elif case == "out-parent":
        out = Path("..")
        extra = ["--overwrite"]
    elif case == "out-root":
        out = Path("/")
    elif case == "out-is-a-file":
        out = tmp_path / "a-file"
        out.write_text("mine")
        extra = ["--overwrite"]
    elif case == "out-is-the-ouro-input":
        out = ouro = shutil.copytree(ouro_dir, tmp_path / "ouro")
        extra = ["--overwrite"]
    elif case == "out-holds-the-data":
        (tmp_path / "inputs").mkdir()
        data = shutil.copy(data_file, tmp_path / "inputs" / "corpus.jsonl")
        out = tmp_path / "inputs"
        extra = ["--overwrite"]
    elif case == "overwrite-foreign-dir":
        out.mkdir()
        (out / "thesis.tex").write_text("years of work")
        extra = ["--overwrite"]
    elif case == "work-dir-foreign":
        (tmp_path / "elsewhere").mkdir()
        (tmp_path / "elsewhere" / "notes.txt").write_text("mine")
        extra = ["--work-dir", str(tmp_path / "elsewhere"), "--overwrite"]
    elif case == "work-dir-inside-out":
        extra = ["--work-dir", str(out / "work")]
    elif case == "ouro-missing-abs":
        ouro = tmp_path / "no" / "such" / "checkpoint"
    elif case == "tokenizer-missing-abs":
        extra = ["--tokenizer", str(tmp_path / "no" / "tokenizer")]
    elif case == "messages-string":
        data = tmp_path / "chat.jsonl"
        data.write_text('{"messages": "hello, this is not a list of messages"}\n' * 40)
    elif case == "ouro-config-not-json":
        ouro = shutil.copytree(ouro_dir, tmp_path / "ouro")
        (ouro / "config.json").write_text('{"model_type": "ouro",')
    elif case == "ouro-weights-random":
        ouro = shutil.copytree(ouro_dir, tmp_path / "ouro")
        (ouro / "model.safetensors").write_bytes(os.urandom(4096))
    elif case == "change-lr-without-resume":
        extra = ["--change-lr"]
    elif case in ("lr-inf", "beta-nan", "temperature-inf"):
        flag, value = case.split("-")
        extra = [f"--{flag}", value]
    elif case == "tokenizer-is-a-file":
        extra = ["--tokenizer", str(data_file)]
    before = sorted(p.name for p in tmp_path.iterdir())
    code = from_ouro.main(_args(ouro, data, out, "--phase1-steps", "1", "--phase2-steps", "0", *extra))
    err = _error_line(capsys)
    assert code == 1 and err.startswith("error: ") and re.search(match, err), err
    assert sorted(p.name for p in tmp_path.iterdir()) == before and list(cwd.iterdir()) == []


def test_converting_a_checkpoint_with_remote_code_never_prompts(ouro_dir, data_file, tmp_path, monkeypatch):
    import builtins
    import shutil

    ouro = shutil.copytree(ouro_dir, tmp_path / "ouro")
    config = json.loads((ouro / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_ouro.OuroConfig",  # as the real Ouro checkpoints ship
                          "AutoModelForCausalLM": "modeling_ouro.OuroForCausalLM"}
    (ouro / "config.json").write_text(json.dumps(config))
    prompts = []
    monkeypatch.setattr(builtins, "input", lambda *a: prompts.append(a) or "n")
    from_ouro.run(_args(ouro, data_file, tmp_path / "out", "--phase1-steps", "1", "--phase2-steps", "0"))
    assert prompts == []


def test_the_output_tokenizer_loads_without_a_prompt_as_its_readme_says(converted):
    out, _ = converted
    readme = (out / "README.md").read_text()
    assert "trust_remote_code=True" in readme and "PreTrainedTokenizerFast" in readme
    script = f"""
import builtins, sys
prompts = []
builtins.input = lambda *a: prompts.append(a) or "n"
from transformers import AutoTokenizer, PreTrainedTokenizerFast
plain = PreTrainedTokenizerFast.from_pretrained({str(out)!r})
auto = AutoTokenizer.from_pretrained({str(out)!r}, trust_remote_code=True)
assert "melt" not in sys.modules and prompts == [], prompts
assert plain("a=3;b=4").input_ids == auto("a=3;b=4").input_ids and len(plain) == len(auto)
print("tokenizer-ok")
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", script], cwd=out.parent, env=env, capture_output=True, text=True,
                            stdin=subprocess.DEVNULL, timeout=120)
    assert result.returncode == 0 and "tokenizer-ok" in result.stdout, result.stderr[-3000:]
