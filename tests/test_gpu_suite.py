"""The GPU suite's plumbing, on CPU: `python -m benchmarks.gpu_suite --device cpu --dry-run` runs every part at toy
size through the same processes and writes the same files as on a GPU. Nothing here judges a number."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

from melt_benchmarks import gpu_suite  # noqa: E402  (benchmarks/, installed under this name)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_suite")
    # -P: the checkout's `kernels/` folder must not shadow Hugging Face's `kernels` package (see README).
    # Caps x5 and a matching budget: the caps are sized for a GPU, and a CI machine may be loaded; a part that hits
    # its cap is tested apart (test_a_part_that_outlives_its_cap_is_killed_with_its_children).
    proc = subprocess.run([sys.executable, "-P", "-m", "melt_benchmarks.gpu_suite", "--device", "cpu", "--dry-run",
                           "--cap-scale", "5", "--budget-s", "2100", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=2400)
    return proc, out


def _report(out: Path) -> dict:
    (json_path,) = out.glob("gpu_suite_dryrun_*.json")
    return json.loads(json_path.read_text())


def test_dry_run_writes_one_json_the_pngs_and_the_summary(dry_run):
    proc, out = dry_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    names = sorted(p.name for p in out.iterdir())
    stem = names[0].split(".")[0].split("_convert")[0]
    assert stem.startswith("gpu_suite_dryrun_cpu")
    assert names == sorted(f"{stem}{suffix}" for suffix in
                           (".json", ".md", "_kernels.png", "_memory.png", "_decode.png", "_convert.png"))
    assert len(names) <= 8  # the device tool brings back at most 8 files from $OUT
    assert all((out / n).stat().st_size > 1000 for n in names)
    summary = (out / f"{stem}.md").read_text()
    assert "DRY RUN" in summary and summary.strip() in proc.stdout  # printed at the end
    for heading in ("## a. Tests", "## b. Kernels", "Decode attention (C = 1", "## Memory, tiny shape", "## d. Decode",
                    "## e. Converter"):
        assert heading in summary


def test_dry_run_runs_every_part_and_records_what_it_measured(dry_run):
    report = _report(dry_run[1])
    assert report["dry_run"] and list(report["parts"]) == list(gpu_suite.PARTS)
    assert {k: e["status"] for k, e in report["parts"].items()} == {k: "done" for k in gpu_suite.PARTS}
    assert report["machine"]["torch"] and report["elapsed_s"] <= report["budget_s"]
    data = {k: e["data"] for k, e in report["parts"].items()}

    tests = data["a"]["pytest"]
    assert tests["tests"] == tests["passed"] > 0 and tests["failed"] == tests["errors"] == 0
    configs = data["a"]["production_configs"]
    assert configs["rows"] and all(r["ok"] for r in configs["rows"])
    assert set(configs["configs"]) == {"fwd", "fwd_decode", "bwd_dkdv", "bwd_dq"}

    assert data["b"]["gated_update"] and {r["impl"] for r in data["b"]["chunk_attention"]} == {
        "melt_triton", "sdpa_flash", "cat_sdpa_flash"}
    decode_attention = data["b"]["decode_attention"]
    ways = ("triton_lengths", "sdpa_written", "sdpa_buffer_mask")
    assert {(r["impl"], r["B"], r["P"]) for r in decode_attention} == {
        (impl, B, P) for impl in ways for B in (1, 2) for P in (16, 64)}
    # the three ways compute the same attention (fp32 on CPU): the rows time equal work
    assert all(r["max_abs_diff_vs_triton_lengths"] < 1e-5 and r["gb_per_s"] > 0 for r in decode_attention)

    for key in ("c", "f"):
        rows = {r["model"]: r for r in data[key]["rows"]}
        assert set(rows) == {"melt", "looplm", "standard"}
        for row in rows.values():
            decode = row["decode"]
            assert decode["cache_capacity_nbytes"] >= decode["cache_nbytes"] == row["analytic_kv_bytes"]
            assert row["prefill"]["alloc_peak_delta_bytes"] > 0 and "torch.profiler" in row["prefill"]["alloc_method"]
        assert rows["looplm"]["decode"]["cache_nbytes"] == 4 * rows["melt"]["decode"]["cache_nbytes"]
    assert data["f"]["setup"]["overrides"] == {"num_hidden_layers": 4}

    decode = data["d"]
    assert {(r["model"], r["batch"]) for r in decode["rows"] if r["kind"] == "batch"} >= {
        ("melt", 1), ("looplm", 1), ("melt", 4), ("looplm", 4)}
    # "auto": every row eager, then batch-1 rows on the captured paths (the model offers a preallocated cache);
    # generate preallocates either way, and on CPU it does not compile.
    rows = [r for r in decode["rows"] if not r.get("oom")]
    assert all(r["tokens_per_s"] > 0 and r["path"].startswith("static cache, eager") and len(r["timed_step_s"]) == 2
               and r["cudagraph_skips"] == 0 for r in rows)
    requested = [r["path_requested"] for r in decode["rows"]]
    assert requested[-6:] == ["graphs+triton"] * 2 + ["graphs"] * 3 + ["static"] and set(requested[:-6]) == {"eager"}
    assert [r["path"] for r in decode["rows"][-6:-4]] == ["static cache, eager, triton attention"] * 2
    assert [(r["model"], r["batch"]) for r in decode["rows"][-6:]] == [("melt", 1)] * 4 + [("looplm", 1), ("melt", 1)]
    fits = {m["model"]: m["largest_fitting"] for m in decode["max_batch"]}
    assert set(fits) == {"melt", "looplm"} and all(fits.values())

    phases = data["e"]["phases"]
    assert [p["phase"] for p in phases] == [1, 2] and all(len(p["step_s"]) == 2 for p in phases)
    assert phases[0]["alpha"] == [0.0, 1.0] and data["e"]["setup"]["backend"] == "gloo"


def test_parts_beyond_the_budget_are_skipped_with_the_reason(tmp_path):
    started = time.monotonic()
    assert gpu_suite.main(["--out", str(tmp_path), "--device", "cpu", "--dry-run", "--budget-s", "5"]) == 0
    assert time.monotonic() - started < 30  # nothing was started
    report = _report(tmp_path)
    assert {e["status"] for e in report["parts"].values()} == {"skipped"}
    assert "under the part's minimum" in report["parts"]["a"]["reason"]


def test_parts_are_parsed_and_checked():
    assert gpu_suite._parse_parts(["a,c", "E"]) == ["a", "c", "e"]
    with pytest.raises(SystemExit, match="unknown part"):
        gpu_suite._parse_parts(["z"])


def test_a_part_that_outlives_its_cap_is_killed_with_its_children():
    proc = subprocess.Popen([sys.executable, "-c", "import subprocess, time; subprocess.Popen(['sleep', '60']); "
                             "time.sleep(60)"], **gpu_suite._OWN_GROUP)
    time.sleep(0.5)
    started = time.monotonic()
    gpu_suite._kill_group(proc)
    assert proc.poll() is not None and time.monotonic() - started < 5  # SIGTERM sufficed


def test_test_files_with_cuda_variants_are_found():
    files = gpu_suite.test_files(["tests/kernels", "tests/test_backends.py"])
    assert files[:2] == ["tests/kernels", "tests/test_backends.py"]
    assert not any(f.startswith("tests/kernels/") for f in files[2:])  # already covered by the folder
    for f in files[2:]:
        assert gpu_suite.CUDA_VARIANT.search((REPO / f).read_text())


def test_pytest_past_its_time_is_ended_and_reported():
    result = gpu_suite.run_pytest(["tests/kernels/test_gated_update.py"], {"keyword": None, "workers": 0}, timeout=1)
    assert result["timed_out"] and result["returncode"] is None and result["tests"] is None
    assert not gpu_suite._RUNNING_TESTS


def test_decode_rows_say_which_path_ran_not_only_which_was_asked(monkeypatch):
    """transformers ignores cache_implementation="static" (with a warning) for a model whose cache it cannot build:
    the row must then say that a dynamic cache ran eagerly."""
    import torch

    from melt import MeltForCausalLM
    from melt_benchmarks import common

    net = common.build_model("tiny", "melt")
    plain = MeltForCausalLM.new_cache
    monkeypatch.setattr(MeltForCausalLM, "new_cache", lambda self, num_loops=None, keep_loop_rows=False,
                        max_cache_len=None: plain(self, num_loops, keep_loop_rows))
    assert gpu_suite.decode_path(net, "auto") == "static"
    row = gpu_suite.timed_generate(net, 1, 8, 2, 1, torch.device("cpu"), "static")
    assert row["path_requested"] == "static" and row["path"] == "dynamic cache, eager"
    assert not row["cache_preallocated"] and len(row["timed_step_s"]) == 2 and row["tokens_per_s"] > 0


def test_progress_of_a_killed_pytest_is_counted():
    output = ("tests/x.py::y\n..F.s                                            [ 40%]\n"
              ".E.  [ 60%]\nnot a progress line ...\n")
    assert gpu_suite._progress_counts(output) == {"passed": 5, "failed": 1, "errors": 1, "skipped": 1, "xfailed": 0,
                                                  "xpassed": 0}


def test_a_failing_measurement_is_recorded_and_the_part_goes_on(tmp_path, monkeypatch):
    import argparse

    import torch

    def broken(*args, **kwargs):
        raise RuntimeError("no kernel image is available")

    monkeypatch.setattr(gpu_suite, "timed_generate", broken)
    rec = gpu_suite.Recorder(tmp_path / "part.json", 60)
    sizes = dict(gpu_suite.SIZES["dry"]["d"], batches=(1,))
    args = argparse.Namespace(decode_path="eager", decode_rows=None)
    gpu_suite.part_decode(rec, torch.device("cpu"), True, sizes, args)
    rows = rec.data["rows"]
    assert len(rows) >= 4 and all("no kernel image" in r["error"] for r in rows)
    report = {"dry_run": True, "device_name": "cpu", "started": "now", "budget_s": 1, "elapsed_s": 1,
              "decode_path": "eager", "machine": {},
              "parts": {"d": {"title": "decode", "status": "done", "seconds": 1, "cap_s": 1, "data": rec.data}}}
    summary = gpu_suite.summary_markdown(report)
    assert "## d. Decode" in summary and "| error |" in summary


def test_decode_rows_are_parsed_into_the_plan_and_refused_when_malformed():
    sizes = {"short_context": 1024, "long_context": 32_000}
    rows = ["melt:1:long", "looplm:max:short:eager", "melt:64:2048:static", "melt:1:long:graphs+triton"]
    assert gpu_suite._parse_decode_rows(rows, sizes) == [
        ("melt", 1, 32_000, "batch", None), ("looplm", "max", 1024, "max batch", "eager"),
        ("melt", 64, 2048, "batch", "static"), ("melt", 1, 32_000, "batch", "graphs+triton")]
    for bad in ("melt:1", "gpt:1:long", "melt:many:long", "melt:1:longer", "melt:1:long:fast", "melt:1:long:eager+"):
        with pytest.raises(SystemExit, match="MODEL:BATCH:CONTEXT"):
            gpu_suite._parse_decode_rows([bad], sizes)


def _call(parts: dict, decode_path: str = "auto", started: str = "t") -> dict:
    return {"device_name": "GPU X", "dry_run": False, "budget_s": 100.0, "elapsed_s": 50.0, "started": started,
            "decode_path": decode_path, "parts_requested": list(parts), "machine": {"torch": "2"}, "files": {},
            "parts": {k: {"title": k, "status": status, "seconds": 1.0, "cap_s": 9.0, "data": data}
                      for k, (status, data) in parts.items()}}


def test_merged_reports_pool_decode_rows_and_keep_the_last_finished_run_of_other_parts(tmp_path):
    calls = [_call({"c": ("done", {"rows": [1]}), "d": ("stopped at its cap", {"rows": [{"path": "e"}]}),
                    "e": ("crashed", {"error": "TypeError"})}),
             _call({"c": ("crashed", {"rows": [2]}), "d": ("done", {"rows": [{"path": "c"}]}),
                    "e": ("stopped at its cap", {"phases": [3]})}, decode_path="static", started="u")]
    paths = []
    for i, call in enumerate(calls):
        paths.append(tmp_path / f"call{i}.json")
        paths[-1].write_text(json.dumps(call))
    merged = gpu_suite.merge_reports(paths)
    parts = merged["parts"]
    assert parts["c"]["data"] == {"rows": [1]}  # the crash of a later call does not replace a finished run
    assert parts["d"]["data"]["rows"] == [{"path": "e"}, {"path": "c"}]
    assert parts["e"]["data"] == {"phases": [3]}  # the later run, though it did not finish either
    assert parts["e"]["status"] == "call 1: crashed + call 2: stopped at its cap"
    assert merged["decode_path"] == "auto + static" and merged["budget_s"] == 200.0
    assert [m["started"] for m in merged["merged_from"]] == ["t", "u"]
    other = _call({"c": ("done", {})})
    other["device_name"] = "GPU Y"
    paths.append(tmp_path / "other.json")
    paths[-1].write_text(json.dumps(other))
    with pytest.raises(SystemExit, match="different devices"):
        gpu_suite.merge_reports(paths)


def test_decode_bytes_floor_counts_weights_per_loop_and_one_row_per_layer_per_token_per_loop():
    import torch

    from melt_benchmarks import common

    floor = {(m, b, c): common.decode_bytes_per_step("tiny", m, b, c, torch.float32)
             for m in ("melt", "looplm", "standard") for b in (1, 2) for c in (10, 20)}
    kwargs = common.model_kwargs("tiny", "melt")
    row = common.kv_bytes_per_token(kwargs, 1, torch.float32)  # one row per layer, one loop
    loops = kwargs["num_loops"]
    for m in ("melt", "looplm"):  # each loop reads one row per layer per token, whatever the cache mode
        assert floor[(m, 1, 20)] - floor[(m, 1, 10)] == loops * row * 10
        assert floor[(m, 2, 10)] - floor[(m, 1, 10)] == loops * row * 10
    assert floor[("standard", 1, 20)] - floor[("standard", 1, 10)] == row * 10
    # The gate's weights are MELT's only extra read.
    gate = 2 * kwargs["hidden_size"] ** 2 + kwargs["hidden_size"]
    assert floor[("melt", 1, 10)] - floor[("looplm", 1, 10)] == loops * kwargs["num_hidden_layers"] * gate * 4
