"""Early exit with one cache row (MELT_SPEC section 8): a token stops looping once its cumulative exit probability
reaches `early_exit_threshold`, holds its state, and its row is its latent after its own last loop."""

import pytest
import torch

from melt_reference import chunks_of, melt_forward
from melt_testing import tiny_model

ATOL = 2e-5


def exiting_model(seed=0, **overrides):
    """A tiny model whose exit gate spreads tokens over the loops."""
    model = tiny_model(seed=seed, **overrides)
    with torch.no_grad():
        model.model.early_exit_gate.weight.normal_(0.0, 2.0)
        model.model.early_exit_gate.bias.zero_()
    return model


@pytest.mark.parametrize("cache_mode", ["shared", "per_loop"])
def test_threshold_one_is_every_loop_and_zero_is_one_loop(cache_mode):
    torch.manual_seed(0)
    model = exiting_model(cache_mode=cache_mode, chunk_size=3)
    ids = torch.randint(0, 61, (2, 10))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with torch.no_grad():
        full = model(ids, attention_mask=mask)
        same = model(ids, attention_mask=mask, early_exit_threshold=1.0)
        assert torch.equal(full.logits, same.logits) and bool((same.loops_run == 3).all())
        zero = model(ids, attention_mask=mask, early_exit_threshold=0.0)
        one = model(ids, attention_mask=mask, num_loops=1)
    real = mask.bool()
    assert (zero.logits[real] - one.logits[real]).abs().max() < ATOL  # later chunks read one-loop rows
    assert bool((zero.loops_run == 1).all())


def test_generate_with_threshold_zero_equals_one_loop_and_one_equals_all():
    torch.manual_seed(0)
    model = exiting_model(chunk_size=2)
    ids = torch.randint(1, 61, (2, 5))
    common = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(ids, early_exit_threshold=0.0, **common),
                       model.generate(ids, num_loops=1, **common))
    assert torch.equal(model.generate(ids, early_exit_threshold=1.0, **common), model.generate(ids, **common))
    beams = dict(common, num_beams=2)
    assert torch.equal(model.generate(ids, early_exit_threshold=1.0, **beams), model.generate(ids, **beams))


@pytest.mark.parametrize("threshold", [0.3, 0.6])
@pytest.mark.parametrize("preallocated", [False, True], ids=["dynamic", "preallocated"])
def test_decode_with_early_exit_equals_the_per_token_reference(threshold, preallocated):
    """Token by token, each token runs its own loops until it exits and writes its row from its latent then; the
    preallocated (capturable, masked) step and the dynamic one (which skips loops) agree with that reference."""
    torch.manual_seed(1)
    model = exiting_model(chunk_size=1)
    ids = torch.randint(0, 61, (1, 12))
    cache = model.new_cache(max_cache_len=12 if preallocated else None)
    with torch.no_grad():
        steps = [model(ids[:, i : i + 1], cache=cache, early_exit_threshold=threshold) for i in range(12)]
    logits = torch.cat([s.logits for s in steps], dim=1)[0]
    loops_run = torch.cat([s.loops_run for s in steps], dim=1)[0]
    ran = []
    cfg = model.config.to_dict()
    expected = melt_forward(model.state_dict(), cfg, ids[0], 3, chunks_of(12, 1), exit_threshold=threshold,
                            loops_run=ran)
    assert loops_run.tolist() == ran and len(set(ran)) > 1  # tokens exit at different loops
    assert (logits - expected).abs().max() < ATOL


def test_a_chunk_skips_loops_once_every_token_has_exited_and_per_loop_slots_hold_the_exit_row():
    torch.manual_seed(0)
    model = exiting_model(cache_mode="per_loop")
    ids = torch.randint(0, 61, (1, 6))
    calls = []
    layer = model.model.layers[0]
    hook = layer.register_forward_hook(lambda *args: calls.append(1))
    with torch.no_grad():
        out = model(ids, early_exit_threshold=0.0, use_cache=True)
    hook.remove()
    assert len(calls) == 1  # one loop ran, the other two were skipped
    cache = out.cache
    first = cache.prefix_rows(0, 0, 6)
    for loop in (1, 2):  # the skipped loops' slots hold the exit loop's rows, as Ouro copies them
        assert all(torch.equal(a, b) for a, b in zip(cache.prefix_rows(0, loop, 6), first))


def test_early_exit_refuses_the_phase_one_blend():
    model = exiting_model()
    with pytest.raises(ValueError, match="kv_blend_alpha"):
        model(torch.randint(0, 61, (1, 4)), early_exit_threshold=0.5, kv_blend_alpha=0.5)


def test_adaptive_benchmark_sweeps_thresholds_against_fewer_loops(tmp_path):
    from melt_benchmarks import adaptive
    from melt_convert import from_ouro

    model_dir = tmp_path / "melt"
    from_ouro.run(["--out", str(model_dir), "--phase1-steps", "1", "--phase2-steps", "1", "--holdout", "4"])
    payload = adaptive.main(["--model", str(model_dir), "--thresholds", "1.0", "0.5", "0.0", "--rows", "2",
                             "--decode-steps", "2", "--out-dir", str(tmp_path)])
    rows = {(r["model"], r["how"], r.get("threshold", r.get("num_loops"))): r for r in payload["results"]}
    for model in ("melt", "looplm"):
        assert rows[(model, "early exit", 1.0)]["avg_loops"] == 4 and rows[(model, "early exit", 0.0)]["avg_loops"] == 1
        # threshold 0 is one loop for every token, the same model
        assert rows[(model, "early exit", 0.0)]["loss"] == rows[(model, "fewer loops", 1)]["loss"]
    assert rows[("looplm", "fewer loops", 4)]["kl_to_teacher"] == 0.0  # the teacher against itself
    assert payload["finding"] and list(tmp_path.glob("adaptive_tiny_*.png"))
    assert {r["step"] for r in payload["decode"]} == {"skip loops (dynamic cache)", "masked (preallocated cache)"}


def test_exit_gate_targets_and_training_follow_the_loss_improvement():
    from melt_convert.exit_gate import exit_gate_targets, train_exit_gate

    losses = torch.tensor([[3.0, 3.0], [2.0, 2.999], [1.999, 2.5]])  # [T, N]: token 0 gains early, token 1 late
    targets = exit_gate_targets(losses)
    assert targets[0, 0] < 0.01 and targets[0, 1] > 0.5  # token 0 should go on after loop 1, token 1 may stop
    assert targets[1, 0] > 0.5 and targets[1, 1] < 0.01  # then token 0 may stop, token 1 should go on
    torch.manual_seed(0)
    model = exiting_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.model.embed_tokens.weight.requires_grad_(False)  # a caller's freezing survives the gate training
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    rows = torch.randint(0, 61, (6, 12))
    history = train_exit_gate(model, rows, steps=30, lr=0.05, batch_size=6)
    assert history[-1] < history[0]
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {"model.early_exit_gate.weight", "model.early_exit_gate.bias"}
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


def test_converter_fits_the_exit_gate_when_asked(tmp_path):
    from safetensors.torch import load_file

    from melt_convert import from_ouro
    from melt_convert.data import ASSETS_DIR

    common = ["--phase1-steps", "1", "--phase2-steps", "1", "--holdout", "4"]
    from_ouro.run(["--out", str(tmp_path / "plain"), *common])
    from_ouro.run(["--out", str(tmp_path / "gated"), *common, "--exit-gate-steps", "3"])
    plain = load_file(tmp_path / "plain" / "model.safetensors")
    gated = load_file(tmp_path / "gated" / "model.safetensors")
    teacher = load_file(ASSETS_DIR / "tiny-ouro" / "model.safetensors")
    gate = "model.early_exit_gate.weight"
    assert torch.equal(plain[gate], teacher[gate]) and not torch.equal(gated[gate], teacher[gate])
    assert all(torch.equal(plain[n], gated[n]) for n in plain if "early_exit_gate" not in n)
    with pytest.raises(ValueError, match="--exit-gate-steps must be >= 0"):
        from_ouro.resolve_options(["--exit-gate-steps", "-1"])
