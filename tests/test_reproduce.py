"""The reproduction benchmark (`benchmarks/reproduce.py`) end to end on its `smoke` preset.

The smoke recipe trains for a handful of steps, so it checks the plumbing (pretraining, the real converter
for every variant, the training-free conversions, evaluation, result files), not the paper's orderings.
"""

import json
import math

import pytest
import torch

from melt_benchmarks import reproduce


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("results")
    threads = torch.get_num_threads()
    payload = reproduce.run(["--preset", "smoke", "--out-dir", str(out), "--run-dir", str(out / "run")])
    assert torch.get_num_threads() == threads, "run() must restore the caller's thread count"
    return out, payload


def test_every_row_has_finite_metrics_in_the_json(smoke):
    out, payload = smoke
    (json_file,) = out.glob("reproduce_smoke_*.json")
    written = json.loads(json_file.read_text())
    assert written["summary"].keys() == set(reproduce.ROWS)
    for row in reproduce.ROWS:
        for metric in reproduce.METRICS:
            stats = written["summary"][row][metric]
            assert all(math.isfinite(stats[k]) for k in ("mean", "std", "min", "max")), (row, metric, stats)
        assert 0.0 <= written["summary"][row]["accuracy"]["mean"] <= 1.0
    assert {c["claim"] for c in written["orderings"]} == {c["claim"] for c in payload["orderings"]}


def test_kv_bytes_per_token_are_exact(smoke):
    _, payload = smoke
    kv = {row: payload["summary"][row]["kv_bytes_per_token"]["mean"] for row in reproduce.ROWS}
    # Tiny shape: 2 layers x 2 (K, V) x 4 heads x 16 dims x 4 bytes = 1024 bytes per cache row set.
    assert kv["standard"] == 1024
    assert kv["looplm"] == 4 * 1024
    for row in reproduce.ROWS:
        if row not in ("standard", "looplm"):
            assert kv[row] == kv["standard"], row


def test_png_is_written(smoke):
    out, _ = smoke
    (png,) = out.glob("reproduce_smoke_*.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_rerun_with_the_same_recipe_reuses_the_trained_models(smoke):
    out, _ = smoke
    payload = reproduce.run(["--preset", "smoke", "--out-dir", str(out), "--run-dir", str(out / "run")])
    trained = ["standard", "looplm", *reproduce.CONVERSIONS]
    assert payload["per_seed"]["0"]["reused"] == trained
    assert payload["per_seed"]["0"]["train_seconds"].keys() == set(trained)


def test_seeds_in_parallel_processes_match_a_serial_run(smoke, tmp_path):
    _, serial = smoke
    payload = reproduce.run(["--preset", "smoke", "--seeds", "0", "1", "--jobs", "2", "--out-dir", str(tmp_path),
                             "--run-dir", str(tmp_path / "run")])
    assert payload["jobs"] == 2 and set(payload["per_seed"]) == {"0", "1"}
    assert payload["per_seed"]["0"]["rows"] == serial["per_seed"]["0"]["rows"]
    assert payload["per_seed"]["1"]["rows"] != serial["per_seed"]["0"]["rows"]
    with pytest.raises(ValueError, match="--jobs"):
        reproduce.run(["--preset", "smoke", "--jobs", "0", "--out-dir", str(tmp_path),
                       "--run-dir", str(tmp_path / "r")])


def test_steps_scale_multiplies_every_step_count():
    recipe = reproduce.scaled(reproduce.PRESETS["default"], 0.5)
    assert recipe.pretrain_steps == reproduce.PRESETS["default"].pretrain_steps // 2
    assert recipe.phase1_steps == reproduce.PRESETS["default"].phase1_steps // 2
    with pytest.raises(ValueError, match="steps-scale"):
        reproduce.scaled(reproduce.PRESETS["default"], 0)
