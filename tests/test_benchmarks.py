"""CPU smoke test of the benchmarks on the tiny preset: every row is there, byte counts are exact, files are written.

Times are measured but never asserted.
"""

import json
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

from melt_benchmarks import common, memory, throughput  # noqa: E402  (benchmarks/, installed under this name)

LOOPS = [1, 2, 4, 8]
CONTEXTS = [16, 48]


@pytest.fixture(scope="module")
def memory_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("memory")
    args = ["--preset", "tiny", "--device", "cpu", "--out-dir", str(out), "--contexts", *map(str, CONTEXTS),
            "--loops", *map(str, LOOPS), "--gen-context", "16", "--gen-tokens", "3"]
    payload = memory.main(args)
    return payload, out


def _load(payload):
    with open(payload["files"]["json"]) as f:
        return json.load(f)


def test_memory_json_has_every_row_and_a_png(memory_run):
    payload, out = memory_run
    data = _load(payload)
    json_path, png_path = common.result_paths("memory", "tiny", common.pick_device("cpu"), out)
    assert Path(payload["files"]["json"]) == json_path and png_path.stat().st_size > 10_000
    assert json_path.name.startswith("memory_tiny_cpu-")
    keys = {(r["model"], r["num_loops"], r["context"]) for r in data["kv_rows"]}
    expected = {(m, t, c) for m in ("melt", "looplm") for t in LOOPS for c in CONTEXTS}
    expected |= {("standard", 1, c) for c in CONTEXTS}
    assert keys == expected and len(data["kv_rows"]) == len(expected)
    assert all(r["measured_bytes"] is not None for r in data["kv_rows"])  # tiny on CPU: every row measured
    assert {r["model"] for r in data["generation"]} == set(common.MODELS)
    assert data["machine"]["torch"] and data["machine"]["device_name"]


def test_memory_bytes_melt_constant_looplm_linear_standard_equal(memory_run):
    rows = _load(memory_run[0])["kv_rows"]
    by = {(r["model"], r["num_loops"], r["context"]): r for r in rows}
    for c in CONTEXTS:
        melt = {by["melt", t, c]["measured_bytes"] for t in LOOPS}
        assert len(melt) == 1, f"MELT KV bytes change with num_loops at {c} tokens: {melt}"
        base = by["looplm", 1, c]["measured_bytes"]
        assert base == melt.pop() == by["standard", 1, c]["measured_bytes"]
        for t in LOOPS:
            assert by["looplm", t, c]["measured_bytes"] == t * base
            assert by["melt", t, c]["measured_bytes"] == by["melt", t, c]["analytic_bytes"]
            assert by["looplm", t, c]["measured_bytes"] == by["looplm", t, c]["analytic_bytes"]
    assert (by["standard", 1, CONTEXTS[0]]["measured_bytes_per_token"]
            == by["melt", 4, CONTEXTS[0]]["measured_bytes_per_token"])
    summary = _load(memory_run[0])["summary"]
    assert summary["melt_kv_max_relative_spread_over_loops"] == 0


def test_memory_published_row_is_the_spec_formula():
    rows = {r["model"]: r for r in memory.published_row(common.pick_device("cpu"), "tiny", measure=True)}
    assert rows["looplm"]["analytic_kv_gb"] == pytest.approx(25.17, abs=0.01)
    assert rows["melt"]["analytic_kv_gb"] == pytest.approx(6.29, abs=0.01)
    assert rows["melt"]["held_kv_gb"] is None and rows["melt"]["alloc_peak_gb"] is None  # never measured off a GPU


def test_memory_generation_reports_allocations_for_every_model(memory_run):
    """The allocator's growth is measured per model: LoopLM's used to read 0 B (an RSS delta after MELT's run)."""
    data = _load(memory_run[0])
    for row in data["generation"]:
        assert row["alloc_peak_delta_bytes"] > 0, row
        assert "torch.profiler" in row["alloc_method"] and "RSS" in row["process_method"]
        assert row["cache_capacity_nbytes"] >= row["cache_nbytes"] == row["analytic_kv_bytes"]
    by_model = {r["model"]: r for r in data["generation"]}
    assert by_model["looplm"]["alloc_peak_delta_bytes"] > by_model["melt"]["cache_nbytes"]


def test_table_cells_are_readable():
    assert common._cell(16384.0) == "16,384" and common._cell(32768) == "32,768" and common._cell(1024) == "1024"
    assert common._cell(0.1234567) == "0.1235" and common._cell(123.456) == "123.5"
    assert common._cell(2.5e-5) == "2.50e-05"
    assert "e+" not in common.format_table([{"x": 1.638e4}], ["x"])


def test_default_output_is_untracked(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    json_path, _ = common.result_paths("memory", "tiny", common.pick_device("cpu"))
    assert json_path.parent == common.DEFAULT_OUT_DIR and json_path.parts[0] == "runs"  # /runs/ is in .gitignore
    gitignore = (Path(common.__file__).resolve().parents[1] / ".gitignore").read_text().split()
    assert "/runs/" in gitignore


def test_cpu_allocation_peak_counts_what_the_block_allocates():
    import torch

    keep = torch.zeros(1000)
    with common.AllocationPeak("cpu") as peak:
        a = torch.empty(1_000_000, dtype=torch.uint8)
        b = torch.empty(2_000_000, dtype=torch.uint8)
        del a
        c = torch.empty(500_000, dtype=torch.uint8)
        del keep
    assert 3_000_000 <= peak.delta < 3_100_000, peak.delta  # a and b were alive together
    del b, c


def test_throughput_json_has_every_row(tmp_path):
    batches, chunks = [1, 2], [1, 8, 500]
    args = ["--preset", "tiny", "--device", "cpu", "--out-dir", str(tmp_path), "--batches", *map(str, batches),
            "--chunk-sizes", *map(str, chunks), "--decode-context", "16", "--decode-steps", "2",
            "--prefill-tokens", "32", "--prefill-tokens-chunk1", "4", "--train-tokens", "24", "--train-chunk", "8",
            "--budget-context", "256", "--budget-gb", "0.01", "--warmup", "0", "--repeats", "1"]
    payload = throughput.main(args)
    data = _load(payload)["result"]
    assert Path(payload["files"]["png"]).stat().st_size > 10_000
    assert {(r["model"], r["batch"]) for r in data["decode"]} == {(m, b) for m in common.MODELS for b in batches}
    assert [r["chunk_size"] for r in data["prefill"] if r["model"] == "melt"] == chunks
    assert {r["model"] for r in data["prefill"]} == set(common.MODELS)
    assert {r["model"] for r in data["train"]} == {r["model"] for r in data["max_batch"]} == set(common.MODELS)
    assert all(r["tokens_per_s"] > 0 for r in data["decode"] + data["prefill"] + data["train"])
    for row in data["decode"]:  # memory beside every rate, each labelled with its method
        assert row["cache_capacity_nbytes"] >= row["cache_nbytes"] > 0 and row["alloc_peak_delta_bytes"] > 0
        assert row["alloc_method"] and row["process_method"] and row["cache"] in ("dynamic", "preallocated")
    fit = {r["model"]: r for r in data["max_batch"]}
    assert fit["looplm"]["kv_bytes_per_sequence"] == 4 * fit["melt"]["kv_bytes_per_sequence"]
    assert fit["melt"]["max_batch_analytic"] > fit["looplm"]["max_batch_analytic"] > 0
    assert {r["nbytes"] for r in data["melt_kv_by_loops"]} == {data["melt_kv_by_loops"][0]["nbytes"]}
    goals = _load(payload)["goals"]
    assert set(goals) == set(throughput.GOALS) and all(g["value"] is not None for g in goals.values())
