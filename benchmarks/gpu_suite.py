"""Everything owed to a GPU, in one prepared call: `python -m benchmarks.gpu_suite --out DIR`.

    python -m benchmarks.gpu_suite --out DIR [--budget-s 540] [--parts a b c d e f] [--decode-path auto|PATH]
    python -m benchmarks.gpu_suite --out DIR --merge A.json B.json ...   # one report of several calls
    python -m benchmarks.gpu_suite --out DIR --device cpu --dry-run      # every part at toy size, on CPU

A GPU is lent to few tasks, for minutes, with no network; this runs the measurements that need one in a fixed
order, each part with its own time cap, inside one budget (README "GPU" gives the `device` call that runs it):

  a. tests on CUDA: `pytest tests/kernels tests/test_backends.py` and every other test file with a CUDA
     variant (bf16 included; pass/fail/skip counts from pytest's JUnit XML), then every production autotune
     configuration of the chunk-attention kernels (pytest only ever runs one), each forced in turn and compared,
     forward and backward, with the fp32 reference;
  b. `benchmarks.kernels`: gated-update GB/s against a device copy of the same bytes; decode attention (C = 1)
     over a preallocated buffer, the Triton kernel with lengths vs in-place SDPA (written columns; whole buffer
     with a mask), as GB/s against a copy of the same bytes, batch 1 and 8, P in {1K, 8K, 32K}; chunk attention forward
     and backward against SDPA-flash on equal work and against concatenate + SDPA, C in {1, 64, 500} and
     P in {1K, 8K, 32K};
  c. memory at the Ouro-1.4B shape, 32,000 tokens, 4 loops, bf16, by the allocator (MELT, LoopLM, standard):
     a prefill and 4 decode steps (`benchmarks.memory.context_memory`), beside the published 9.49 / 27.97 GB;
  d. decode tokens/s at the Ouro-1.4B shape, MELT vs LoopLM: batch 1 and 64 after 1,024 tokens, and the largest
     batch whose prefill + decode `max_memory_allocated` stays within 80% of the card at 32,000 tokens, through
     `generate`: every row eager, then batch 1 on transformers' static cache with its compiled decode (when the
     model offers `new_cache(max_cache_len=)`); each step timed by a stopping criterion that synchronizes, beside
     the bytes it must read (`benchmarks.common.decode_bytes_per_step`);
  e. the converter's training step (`convert.train.train`, the loop `python -m convert.from_ouro` runs) at the
     Ouro-1.4B shape with random weights: fp32 weights under bf16 autocast with activation checkpointing,
     sequence 10,000, chunk 500, 2 steps of phase 1 then 2 of phase 2, FSDP2 at world size 1 on nccl; seconds
     per step (recorded as they are logged), `max_memory_allocated`;
  f. part c at the Ouro-2.6B shape, if time remains.

Each part runs in its own process (a crash, a hang or an exhausted GPU stays inside it), killed at its cap; a part
starts only while the remaining budget covers its minimum, and is otherwise recorded as skipped with the reason.
Parts save what they measured after every measurement, so a part stopped at its cap keeps its finished rows.
DIR receives one JSON, one PNG per part that has figures (b, c + f, d, e) and a Markdown summary, all named
`gpu_suite_<device>` (`gpu_suite_dryrun_<device>` for a dry run) and rewritten after every part; the summary is
printed at the end. At most 8 files, so that the `device` tool brings all of them back. Nothing is asserted:
the suite measures and reports. Exit status 0 when every part ran or was skipped, 1 when a part crashed.

`--dry-run` runs every part at toy size (tiny shapes, a few tests, CPU references in place of the kernels,
gloo in place of nccl) through the same processes and files: it checks the plumbing, not the numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

from melt import override_backend

from . import common

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Part:
    key: str
    title: str
    cap_s: float  # the longest the part may run (its process is killed then)
    min_s: float  # the least remaining budget for which starting it is worth it


PARTS = {
    "a": Part("a", "tests on CUDA and every production autotune configuration", 90, 30),
    # 43 s on an H100 before the decode-attention rows (18 timings and the decode kernels' autotuning) came first.
    "b": Part("b", "kernel benchmarks (benchmarks.kernels)", 60, 20),
    "c": Part("c", "memory at the Ouro-1.4B shape, 32,000 tokens", 50, 25),
    # Measured on an H100 (2026-11-27): the eager rows take 90 s, each compiled row 185 s (180 s of compile).
    "d": Part("d", "decode tokens/s, MELT vs LoopLM", 280, 30),
    # A first step with activation checkpointing took 55 s there (autotuning included).
    "e": Part("e", "converter training steps at the Ouro-1.4B shape", 150, 60),
    "f": Part("f", "memory at the Ouro-2.6B shape, 32,000 tokens", 45, 30),
}
# With the wheels' install, one 10-minute device call; the machine's start is outside it. The caps add up to more:
# what the budget leaves out (e and f, typically) is recorded as skipped, for a second call on the warm machine.
DEFAULT_BUDGET_S = 540.0
# Part d's decode paths (see --decode-path): eager; static = transformers' compile of the decode step (inductor);
# graphs = CUDA graphs of the unfused step (torch.compile's "cudagraphs" backend); +triton = attention forced to
# the Triton kernels.
DECODE_PATHS = ("eager", "static", "graphs", "static+triton", "graphs+triton")

# Sizes of the real run and of the dry run (same structure, toy numbers).
SIZES = {
    "gpu": {
        "a": dict(paths=["tests/kernels", "tests/test_backends.py"], keyword=None, workers=8, config_dtype="bfloat16",
                  # (B, H, Hkv, C, P, D, left-padding mask): decode with key splits, a masked GQA chunk, a full chunk
                  config_cases=[(2, 8, 2, 1, 3000, 128, False), (2, 4, 4, 100, 700, 64, True),
                                (1, 16, 16, 500, 1000, 128, False)], config_reserve_s=25),
        "b": {},
        "c": dict(preset="ouro-1.4b", context=32_000, decode_tokens=4),
        "d": dict(preset="ouro-1.4b", short_context=1024, batches=(1, 64), long_context=32_000, card_fraction=0.8,
                  warmup_steps=3, timed_steps=8),
        # Without activation checkpointing one 10,000-token step ran out of memory at world size 1 (77 GB, H100).
        "e": dict(preset="ouro-1.4b", seq_len=10_000, chunk_size=500, steps=2, checkpointing=(True,)),
        "f": dict(preset="ouro-2.6b", context=32_000, decode_tokens=4),
    },
    "dry": {
        "a": dict(paths=["tests/kernels/test_gated_update.py"], keyword="matches_reference", workers=0,
                  config_dtype="float32", config_cases=[(1, 2, 1, 1, 40, 64, False), (2, 2, 2, 5, 7, 64, True)],
                  config_reserve_s=10),
        "b": {},
        "c": dict(preset="tiny", context=64, decode_tokens=2),
        "d": dict(preset="tiny", short_context=32, batches=(1, 4), long_context=128, card_fraction=0.8,
                  warmup_steps=1, timed_steps=2, card_bytes=2 * 2**20),
        "e": dict(preset="tiny", seq_len=32, chunk_size=16, steps=2, checkpointing=(False, True)),
        "f": dict(preset="tiny", context=64, decode_tokens=2, overrides={"num_hidden_layers": 4}),
    },
}
# A file whose source matches this has a CUDA variant (a test that runs only with a GPU).
CUDA_VARIANT = re.compile(r"cuda\.is_available\(\)|mark\.gpu\b")


# ================================================================================================================
# The parent: budget, one process per part, the report
# ================================================================================================================


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_suite", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="directory for the JSON, PNGs and Markdown summary")
    parser.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S, help="seconds for all parts together")
    parser.add_argument("--parts", nargs="+", default=list(PARTS), help="parts to run, in order (a b c d e f)")
    parser.add_argument("--device", help="cuda | cpu (default: cuda when available)")
    parser.add_argument("--dry-run", action="store_true", help="every part at toy size (plumbing check, e.g. on CPU)")
    parser.add_argument("--cap-scale", type=float, default=1.0,
                        help="multiply every part's cap and minimum (e.g. a dry run on a loaded CPU machine)")
    parser.add_argument("--decode-path", choices=("auto", *DECODE_PATHS), default="auto",
                        help="part d: static = generate(cache_implementation='static') with transformers' compiled "
                             "decode (inductor, CUDA graphs); graphs = the same with torch.compile's 'cudagraphs' "
                             "backend (CUDA graphs of the unfused ops, no inductor: a short compile); +triton = with "
                             "the attention backend forced to the Triton kernels (in the graph as melt:: operators); "
                             "eager = generate without compiling; auto = every row eager, then batch-1 rows on the "
                             "compiled paths when the model has new_cache(max_cache_len=...)")
    parser.add_argument("--decode-rows", nargs="+", metavar="MODEL:BATCH:CONTEXT",
                        help="part d: only these rows, in this order; MODEL melt | looplm, BATCH a number or max, "
                             "CONTEXT short | long | a number of tokens, PATH (optional) one of --decode-path's "
                             "(default: --decode-path) (default: the whole plan)")
    parser.add_argument("--merge", nargs="+", type=Path, metavar="JSON",
                        help="write one report into --out from the JSON reports of several calls on the same device "
                             "(e.g. a rerun of some parts on the warm machine), measuring nothing")
    # Internal: how the parent starts one part in a process of its own.
    parser.add_argument("--run-part", help=argparse.SUPPRESS)
    parser.add_argument("--part-file", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--cap-s", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--machine-info", action="store_true", help=argparse.SUPPRESS)
    return parser


def _parse_parts(values: list[str]) -> list[str]:
    keys = [k.strip().lower() for v in values for k in v.split(",") if k.strip()]
    unknown = [k for k in keys if k not in PARTS]
    if unknown:
        raise SystemExit(f"unknown part(s) {unknown}; choose from {' '.join(PARTS)}")
    return keys


def _parse_decode_rows(values: list[str], sizes: dict) -> list[tuple]:
    """`--decode-rows` tokens as part d's plan entries: (model, batch or "max", context, kind, path or None)."""
    plan = []
    for value in values:
        fields = value.split(":")
        model, batch, context, path = (fields + [None])[:4] if len(fields) in (3, 4) else (None,) * 4
        if model not in ("melt", "looplm") or not (batch == "max" or str(batch).isdigit()) or not (
                context in ("short", "long") or str(context).isdigit()) or path not in (None, *DECODE_PATHS):
            raise SystemExit(f"--decode-rows: {value!r} is not MODEL:BATCH:CONTEXT[:PATH] (e.g. melt:1:long, "
                             f"looplm:max:long:eager, melt:64:1024:static; PATH one of {', '.join(DECODE_PATHS)})")
        tokens = sizes[f"{context}_context"] if context in ("short", "long") else int(context)
        plan.append((model, batch if batch == "max" else int(batch), tokens,
                     "max batch" if batch == "max" else "batch", path))
    return plan


def _default_decode_plan(sizes: dict, requested: str) -> list[tuple]:
    """Part d's rows: batch 1 and the others after the short context, the largest batch at the long one, batch 1
    at the long one; with "auto" every row eager first (90 s in all at the Ouro-1.4B shape on an H100), then
    batch-1 rows on the captured paths, MELT first: CUDA graphs without inductor (short compiles) with the Triton
    kernels and with in-place SDPA, at both contexts, then transformers' inductor compile (about 3 minutes a row
    when last measured) at the long context, where the rows dominate the bytes read."""
    short, long = sizes["short_context"], sizes["long_context"]
    rows = [("melt", 1, short, "batch"), ("looplm", 1, short, "batch"), ("melt", "max", long, "max batch"),
            ("looplm", "max", long, "max batch")]
    rows += [(m, b, short, "batch") for b in sizes["batches"] if b != 1 for m in ("melt", "looplm")]
    rows += [("melt", 1, long, "batch"), ("looplm", 1, long, "batch")]
    if requested != "auto":
        return [(*row, requested) for row in rows]
    compiled = [("melt", 1, short, "batch", "graphs+triton"), ("melt", 1, long, "batch", "graphs+triton"),
                ("melt", 1, short, "batch", "graphs"), ("melt", 1, long, "batch", "graphs"),
                ("looplm", 1, short, "batch", "graphs"), ("melt", 1, long, "batch", "static")]
    return [(*row, "eager") for row in rows] + compiled


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.run_part:
        return child_main(args)
    if args.merge:
        report = merge_reports(args.merge)
        args.out.mkdir(parents=True, exist_ok=True)
        print(write_report(report, args.out, Path(args.merge[0]).stem))
        return 0
    parts = _parse_parts(args.parts)
    if args.decode_rows:
        _parse_decode_rows(args.decode_rows, {"short_context": 1, "long_context": 1})  # refused here, not in part d
    previous = {sig: signal.signal(sig, _end_parts_and_exit) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return run_suite(args, parts)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run_suite(args, parts: list[str]) -> int:
    device = common.pick_device(args.device)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    name = _device_name(device)
    stem = f"gpu_suite{'_dryrun' if args.dry_run else ''}_{_slug(name, device)}"
    report = {
        "suite": "gpu_suite", "dry_run": args.dry_run, "device": str(device), "device_name": name,
        "budget_s": args.budget_s, "parts_requested": parts, "decode_path": args.decode_path,
        "decode_rows": args.decode_rows,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "elapsed_s": 0.0, "machine": None,
        "parts": {}, "files": {},
    }
    start = time.monotonic()
    crashed = False
    with tempfile.TemporaryDirectory(prefix="gpu_suite_parts_") as scratch:
        for key in parts:
            part = PARTS[key]
            part = Part(part.key, part.title, part.cap_s * args.cap_scale, part.min_s * args.cap_scale)
            remaining = args.budget_s - (time.monotonic() - start)
            if remaining < part.min_s:
                report["parts"][key] = {"title": part.title, "status": "skipped", "seconds": 0.0, "cap_s": part.cap_s,
                                        "reason": f"{remaining:.0f} s of the {args.budget_s:.0f} s budget left, "
                                                  f"under the part's minimum of {part.min_s:.0f} s"}
            else:
                cap = min(part.cap_s, remaining)
                print(f"\n=== gpu_suite part {key}: {part.title} (cap {cap:.0f} s, {remaining:.0f} s of budget left)",
                      flush=True)
                entry = run_part_process(key, cap, Path(scratch), args, device, report["machine"] is None)
                entry["title"] = part.title
                report["parts"][key] = entry
                crashed |= entry["status"] == "crashed"
                report["machine"] = report["machine"] or entry.get("data", {}).get("machine")
            report["elapsed_s"] = time.monotonic() - start
            write_report(report, out, stem)
    summary = write_report(report, out, stem)
    print("\n" + summary)
    return 1 if crashed else 0


def merge_reports(paths: list[Path]) -> dict:
    """One report from the reports of several calls on one device, in call order. Part d's rows (and max-batch
    searches) are pooled: a rerun adds rows, e.g. the compiled path beside the eager one. Any other part is taken
    from the last call that ran it, unless only an earlier call finished it. Every call's runs of every part stay
    listed under `runs` with their status, and `merged_from` names the calls."""
    reports = [json.loads(Path(p).read_text()) for p in paths]
    devices = {(r["device_name"], r["dry_run"]) for r in reports}
    if len(devices) != 1:
        raise SystemExit(f"--merge: the reports come from different devices or modes: {sorted(devices)}")
    merged = {**reports[-1], "parts": {}, "files": {}, "budget_s": sum(r["budget_s"] for r in reports),
              "elapsed_s": sum(r["elapsed_s"] for r in reports), "started": reports[0]["started"],
              "decode_path": " + ".join(dict.fromkeys(r["decode_path"] for r in reports)),
              "machine": next((r["machine"] for r in reports if r.get("machine")), None),
              "merged_from": [{"file": Path(p).name, "started": r["started"], "budget_s": r["budget_s"],
                               "parts": r["parts_requested"], "decode_path": r["decode_path"],
                               "decode_rows": r.get("decode_rows")} for p, r in zip(paths, reports)]}
    for call, report in enumerate(reports, 1):
        for key, entry in report["parts"].items():
            run = {"call": call, **{k: entry.get(k) for k in ("status", "seconds", "cap_s", "reason")}}
            kept = merged["parts"].get(key)
            if kept is None:
                merged["parts"][key] = {**entry, "runs": [run]}
            elif key == "d":
                data = kept.setdefault("data", {})
                for field in ("rows", "max_batch", "skipped"):
                    data[field] = data.get(field, []) + (entry.get("data") or {}).get(field, [])
                kept["runs"].append(run)
            elif entry["status"] == "done" or kept["status"] != "done":
                merged["parts"][key] = {**entry, "runs": [*kept["runs"], run]}
            else:
                kept["runs"].append(run)
    for entry in merged["parts"].values():
        if len(entry["runs"]) > 1:
            entry["status"] = " + ".join(f"call {r['call']}: {r['status']}" for r in entry["runs"])
            entry["seconds"] = round(sum(r["seconds"] or 0 for r in entry["runs"]), 1)
            entry["cap_s"] = " + ".join(str(r["cap_s"]) for r in entry["runs"])
            entry["reason"] = "; ".join(f"call {r['call']}: {r['reason']}" for r in entry["runs"] if r.get("reason"))
    return merged


def _device_name(device: torch.device) -> str:
    """The device's name without creating a CUDA context in this (long-lived) process: nvidia-smi, else torch."""
    if device.type != "cuda":
        return common.cpu_name()
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        names = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                               text=True, timeout=20, check=True).stdout.strip().splitlines()
        if names:
            return names[0].strip()
    return "cuda"


def _slug(name: str, device: torch.device) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:48].strip("-") or device.type
    return slug if device.type == "cuda" or slug.startswith("cpu") else f"cpu-{slug}"


def run_part_process(key: str, cap: float, scratch: Path, args, device: torch.device, machine_info: bool) -> dict:
    """Run part `key` in a process of its own, killed after `cap` seconds; return its entry for the report."""
    part_file = scratch / f"part_{key}.json"
    module = __spec__.name if __spec__ is not None else "benchmarks.gpu_suite"
    # Installed (melt_benchmarks), the checkout's root need not be on sys.path, where `kernels/` would shadow
    # Hugging Face's `kernels` package: -P keeps it off. Run from a checkout (benchmarks), the root is needed.
    isolated = ["-P"] if module.startswith("melt_") and sys.version_info >= (3, 11) else []
    cmd = [sys.executable, *isolated, "-m", module, "--run-part", key, "--part-file", str(part_file),
           "--cap-s", f"{cap:.1f}", "--out", str(args.out), "--device", str(device), "--decode-path", args.decode_path]
    if args.dry_run:
        cmd.append("--dry-run")
    if args.decode_rows:
        cmd += ["--decode-rows", *args.decode_rows]
    if machine_info:  # versions and device, recorded once (it imports every library: seconds)
        cmd.append("--machine-info")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    started = time.monotonic()
    # A process group of its own (to end it with its children), in this session (so that whatever ends this
    # command's session, e.g. the device tool after a call, ends the part too).
    proc = subprocess.Popen(cmd, env=env, **_OWN_GROUP)
    _RUNNING_PARTS.append(proc)
    status = None
    try:
        returncode = proc.wait(timeout=cap)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        returncode, status = proc.returncode, "stopped at its cap"
    finally:
        _RUNNING_PARTS.remove(proc)
    seconds = time.monotonic() - started
    data = {}
    if part_file.is_file():
        with contextlib.suppress(ValueError, OSError):
            data = json.loads(part_file.read_text())
    if status is None:
        status = "done" if returncode == 0 else "crashed"
    entry = {"status": status, "seconds": round(seconds, 1), "cap_s": round(cap, 1), "returncode": returncode,
             "data": data}
    if status == "stopped at its cap":
        entry["reason"] = f"still running after its cap of {cap:.0f} s; rows finished before are kept"
    elif status == "crashed":
        entry["reason"] = data.get("error") or f"its process exited with status {returncode}"
    return entry


_OWN_GROUP = {"process_group": 0} if sys.version_info >= (3, 11) else {"start_new_session": True}
_RUNNING_PARTS: list[subprocess.Popen] = []


def _end_parts_and_exit(signum, frame):
    """SIGTERM/SIGINT to the suite: end the running part's process group too, then exit."""
    for proc in list(_RUNNING_PARTS):
        _kill_group(proc)
    sys.exit(128 + signum)


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the part's process group (pytest and its workers included), SIGKILL after 5 s."""
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 10)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


# ================================================================================================================
# The child: one part, saving what it measured after every measurement
# ================================================================================================================


class Recorder:
    """The part's results, rewritten (atomically) to the part file after every change."""

    def __init__(self, path: Path, cap_s: float):
        self.path = path
        self.data: dict = {}
        self.lock = threading.Lock()  # a part may record from a watcher thread too (part e's steps)
        self.deadline = time.monotonic() + cap_s - 2.0  # leave the parent a moment before it kills this process

    def set(self, key: str, value) -> None:
        with self.lock:
            self.data[key] = value
            self.flush()

    def append(self, key: str, row: dict) -> None:
        with self.lock:
            self.data.setdefault(key, []).append(row)
            self.flush()

    def flush(self) -> None:
        common.write_json(self.path, self.data)

    def left(self) -> float:
        return self.deadline - time.monotonic()


def child_main(args) -> int:
    device = common.pick_device(args.device)
    rec = Recorder(args.part_file, args.cap_s)
    try:
        sizes = SIZES["dry" if args.dry_run else "gpu"][args.run_part]
        rec.set("sizes", sizes)
        if args.machine_info and args.run_part != "a":  # part a first sets TRITON_INTERPRET (CPU), then records it
            rec.set("machine", common.machine_info(device))
        PART_FUNCTIONS[args.run_part](rec, device, args.dry_run, sizes, args)
    except Exception as error:  # the part's own failure, recorded with its traceback for the report
        rec.set("error", f"{type(error).__name__}: {error}")
        rec.set("traceback", traceback.format_exc()[-4000:])
        print(traceback.format_exc(), file=sys.stderr, flush=True)
        return 1
    return 0


# -- part a: tests on CUDA, production autotune configurations -----------------------------------------------------


def test_files(paths: list[str]) -> list[str]:
    """`paths` plus every other test file under tests/ with a CUDA variant (CUDA_VARIANT), repository-relative."""
    chosen = list(paths)
    covered = [REPO / p for p in paths]
    for file in sorted((REPO / "tests").rglob("test_*.py")):
        if any(file == c or c in file.parents for c in covered):
            continue
        if CUDA_VARIANT.search(file.read_text()):
            chosen.append(str(file.relative_to(REPO)))
    return chosen


def _end_tests_and_exit(signum, frame):
    """SIGTERM from the parent at this part's cap: end pytest's own process group too, then exit."""
    for proc in list(_RUNNING_TESTS):
        _kill_group(proc)
    sys.exit(128 + signum)


def part_tests(rec: Recorder, device: torch.device, dry: bool, sizes: dict, args) -> None:
    signal.signal(signal.SIGTERM, _end_tests_and_exit)
    if device.type != "cuda":
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are imported (by this part only)
    if args.machine_info:
        rec.set("machine", common.machine_info(device))
    files = test_files(sizes["paths"]) if not dry else list(sizes["paths"])
    rec.set("pytest", run_pytest(files, sizes, rec.left() - sizes["config_reserve_s"]))
    rec.set("production_configs", {"dtype": sizes["config_dtype"], "rows": []})
    check_production_configs(rec, device, getattr(torch, sizes["config_dtype"]), sizes["config_cases"])


_RUNNING_TESTS: list[subprocess.Popen] = []  # pytest's process group, ended with this part (see part_tests)


def run_pytest(files: list[str], sizes: dict, timeout: float) -> dict:
    """pytest on `files` in a process group of its own, ended after `timeout` seconds, or with this part.

    `python -P`: the checkout's root stays off sys.path, where `kernels/` would shadow Hugging Face's `kernels`.
    """
    import importlib.util

    with tempfile.TemporaryDirectory(prefix="gpu_suite_pytest_") as tmp:
        xml, log = Path(tmp) / "junit.xml", Path(tmp) / "pytest.log"
        cmd = [sys.executable, "-P", "-m", "pytest", *files, "-q", "-rfE", "-p", "no:cacheprovider",
               f"--junitxml={xml}", f"--basetemp={Path(tmp) / 'base'}"]
        if sizes["keyword"]:
            cmd += ["-k", sizes["keyword"]]
        if sizes["workers"] and importlib.util.find_spec("xdist") is not None:
            cmd += ["-n", str(sizes["workers"])]
        result = {"command": " ".join(cmd[1:]), "files": files, "timed_out": False}
        started = time.monotonic()
        with open(log, "w") as out:
            # PYTHONSAFEPATH: -P for pytest's xdist workers too (they are started without it).
            proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                    env={**os.environ, "PYTHONSAFEPATH": "1"}, **_OWN_GROUP)
            _RUNNING_TESTS.append(proc)
            try:
                result["returncode"] = proc.wait(timeout=max(1.0, timeout))
            except subprocess.TimeoutExpired:
                _kill_group(proc)  # pytest and its xdist workers
                result.update(timed_out=True, returncode=None)
            _RUNNING_TESTS.remove(proc)
        result["seconds"] = round(time.monotonic() - started, 1)
        output = log.read_text(errors="replace")
        result["output_tail"] = output[-3000:]
        result.update(_junit_counts(xml))
        if result["tests"] is None:  # killed before pytest wrote its XML: count its progress characters instead
            result["progress_counts"] = _progress_counts(output)
    return result


def _progress_counts(output: str) -> dict:
    """Outcomes so far from pytest's `-q` progress lines (`..F.s  [ 40%]`), for a run killed before its summary."""
    marks = "".join(m.group(1) for line in output.splitlines()
                    if (m := re.fullmatch(r"([.FEsxX]+)\s*(\[\s*\d+%\])?", line.strip())))
    return {"passed": marks.count("."), "failed": marks.count("F"), "errors": marks.count("E"),
            "skipped": marks.count("s"), "xfailed": marks.count("x"), "xpassed": marks.count("X")}


def _junit_counts(xml: Path) -> dict:
    """Counts and failing test ids from pytest's JUnit XML (None when pytest wrote none, e.g. killed)."""
    import xml.etree.ElementTree as ET

    if not xml.is_file():
        return {"tests": None, "passed": None, "failed": None, "errors": None, "skipped": None, "failures": []}
    root = ET.parse(xml).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    total = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    failures = []
    for case in root.iter("testcase"):
        for tag in ("failure", "error"):
            node = case.find(tag)
            if node is not None:
                message = (node.get("message") or "").strip().splitlines()
                failures.append({"test": f"{case.get('classname')}::{case.get('name')}", "kind": tag,
                                 "message": message[0][:300] if message else ""})
    passed = total["tests"] - total["failures"] - total["errors"] - total["skipped"]
    return {"tests": total["tests"], "passed": passed, "failed": total["failures"], "errors": total["errors"],
            "skipped": total["skipped"], "failures": failures[:30]}


def check_production_configs(rec: Recorder, device: torch.device, dtype: torch.dtype, cases) -> None:
    """Force every autotune configuration of the chunk-attention kernels in turn; compare with the fp32 reference.

    Round i gives each autotuned kernel its i-th configuration (modulo its count), so every configuration runs at
    least once, forward and backward, on every case. Outside pytest the kernel module holds its production
    configurations (under pytest, or the interpreter, exactly one: then this checks that one).
    """
    from melt_kernels.chunk_attention import naive_chunk_attention
    from melt_kernels.chunk_attention import triton_impl as impl

    # Each kernel has one autotuner per precision class ({is fp32: autotuner}); the one `dtype` launches.
    fp32 = dtype == torch.float32
    tuned = {"fwd": impl._attn_fwd[fp32], "fwd_decode": impl._attn_fwd_decode[fp32],
             "bwd_dkdv": impl._attn_bwd_dkdv[fp32], "bwd_dq": impl._attn_bwd_dq[fp32]}
    originals = {name: list(kernel.configs) for name, kernel in tuned.items()}
    tolerance = {torch.float32: (2e-5, 1e-5), torch.float16: (5e-3, 2e-3), torch.bfloat16: (3e-2, 1.5e-2)}[dtype]
    data = rec.data["production_configs"]
    data["configs"] = {name: [str(c) for c in configs] for name, configs in originals.items()}
    data["tolerance"] = {"relative_rms": tolerance[0], "max_abs": tolerance[1]}
    try:
        for round_index in range(max(len(c) for c in originals.values())):
            for name, kernel in tuned.items():
                kernel.configs = [originals[name][round_index % len(originals[name])]]
                kernel.cache.clear()
            for case in cases:
                if rec.left() < 3:
                    data["stopped"] = "time cap reached"
                    rec.flush()
                    return
                row = {"round": round_index, "case": _case_id(case),
                       "configs": {n: str(k.configs[0]) for n, k in tuned.items()}}
                try:
                    row.update(_compare_attention(impl.chunk_attention, naive_chunk_attention, case, dtype, device,
                                                  tolerance))
                except Exception as error:  # a config that fails to compile or launch is a result, not a crash
                    row.update(ok=False, error=f"{type(error).__name__}: {str(error)[:300]}")
                data["rows"].append(row)
                rec.flush()
    finally:
        for name, kernel in tuned.items():
            kernel.configs = originals[name]
            kernel.cache.clear()


def _case_id(case) -> str:
    B, H, Hkv, C, P, D, masked = case
    return f"B{B}-H{H}-Hkv{Hkv}-C{C}-P{P}-D{D}{'-mask' if masked else ''}"


def _compare_attention(fn, reference, case, dtype, device, tolerance) -> dict:
    B, H, Hkv, C, P, D, masked = case
    gen = torch.Generator(device="cpu").manual_seed(0)

    def randn(*shape):
        return torch.randn(shape, generator=gen).to(device=device, dtype=dtype)

    inputs = [randn(B, H, C, D), randn(B, Hkv, C, D), randn(B, Hkv, C, D), randn(B, Hkv, P, D), randn(B, Hkv, P, D)]
    grad_out = randn(B, H, C, D)
    key_mask = None
    if masked:  # left padding of the last sequence: its first P // 3 keys are off
        key_mask = torch.ones(B, P + C, dtype=torch.bool, device=device)
        key_mask[-1, : P // 3] = False
    results = {}
    for label, run, cast in (("kernel", fn, lambda t: t), ("reference", reference, lambda t: t.float())):
        leaves = [cast(t).detach().requires_grad_() for t in inputs]
        out = run(*leaves, key_mask=key_mask)
        out.backward(cast(grad_out))
        results[label] = [out.detach()] + [leaf.grad for leaf in leaves]
    worst_rel, worst_abs, ok = 0.0, 0.0, True
    for got, want in zip(results["kernel"], results["reference"]):
        got, want = got.float(), want.float()
        if not torch.isfinite(got).all():
            return {"ok": False, "error": "non-finite values"}
        err = (got - want).abs()
        rel = (err.square().mean().sqrt() / want.square().mean().sqrt().clamp_min(1e-30)).item()
        worst_rel, worst_abs = max(worst_rel, rel), max(worst_abs, err.max().item())
        ok &= rel <= tolerance[0] or err.max().item() <= tolerance[1]
    return {"ok": bool(ok), "max_relative_rms": worst_rel, "max_abs": worst_abs}


# -- part b: kernel benchmarks -------------------------------------------------------------------------------------


def part_kernels(rec: Recorder, device: torch.device, dry: bool, sizes: dict, args) -> None:
    if dry or device.type != "cuda":
        return _toy_kernel_rows(rec, device)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from . import kernels as bench

    rec.set("gated_update", bench.bench_gated_update())
    # SDPA's own choice of kernel here (no backend forced): what the model's in-place step gets.
    rec.set("decode_attention", bench.bench_decode_attention())
    prefixes = list(bench.ATTN_PREFIXES)
    rows = []
    try:
        for prefix in prefixes:  # one prefix length at a time: a part stopped at its cap keeps the finished ones
            bench.ATTN_PREFIXES = [prefix]
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                rows += bench.bench_chunk_attention()
            rec.set("chunk_attention", rows)
    finally:
        bench.ATTN_PREFIXES = prefixes


def _toy_kernel_rows(rec: Recorder, device: torch.device) -> None:
    """Dry run: the same rows from the PyTorch references at toy sizes (plumbing only: no kernel is timed)."""
    import torch.nn.functional as F

    from melt_kernels.chunk_attention import naive_chunk_attention
    from melt_kernels.gated_update import naive_gated_update

    def ms(fn, repeats=3):
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return 1e3 * statistics.median(times)

    shape = (2, 16, 64)
    a, s, ga, gs = (torch.randn(shape, device=device) for _ in range(4))
    b = torch.randn(shape[-1], device=device)
    moved = 5 * a.numel() * a.element_size()
    buf = torch.empty(moved // 2, dtype=torch.uint8, device=device)
    t, copy_t = ms(lambda: naive_gated_update(a, s, ga, gs, b)), ms(buf.clone)
    rec.set("gated_update", [{"op": "gated_update", "direction": "fwd", "shape": list(shape), "bytes": moved, "ms": t,
                              "gb_per_s": moved / t / 1e6, "copy_ms": copy_t, "copy_gb_per_s": moved / copy_t / 1e6}])
    from . import kernels as bench

    rec.set("decode_attention", bench.bench_decode_attention(batches=[1, 2], fills=[16, 64], heads=2, head_dim=64,
                                                             dtype=torch.float32, device=device, time_ms=ms))
    rows = []
    for P in (16, 64):
        for C in (1, 8):
            q, k, v = (torch.randn(1, 2, C, 64, device=device, requires_grad=True) for _ in range(3))
            kp, vp = (torch.randn(1, 2, P, 64, device=device, requires_grad=True) for _ in range(2))
            mask = torch.ones(C, P + C, dtype=torch.bool, device=device).tril(P)
            variants = {
                "melt_triton": lambda: naive_chunk_attention(q, k, v, kp, vp),
                "sdpa_flash": lambda: F.scaled_dot_product_attention(
                    q, torch.cat([kp, k], 2), torch.cat([vp, v], 2), attn_mask=mask),
                "cat_sdpa_flash": lambda: F.scaled_dot_product_attention(
                    q, torch.cat([kp, k], 2), torch.cat([vp, v], 2), attn_mask=mask),
            }
            for impl, fn in variants.items():
                fwd = ms(fn)
                bwd = ms(lambda fn=fn: fn().sum().backward())
                flops = 4.0 * 2 * 64 * (C * P + C * (C + 1) // 2)
                rows.append({"op": "chunk_attention", "impl": impl, "C": C, "P": P, "fwd_ms": fwd, "bwd_ms": bwd,
                             "fwd_tflops": flops / fwd / 1e9, "bwd_tflops": 2.5 * flops / bwd / 1e9})
            rec.set("chunk_attention", rows)
    rec.set("note", "dry run: PyTorch references on CPU at toy sizes under the kernel rows' names; not kernel timings")


# -- parts c and f: memory at a published shape ------------------------------------------------------------------


def part_memory(rec: Recorder, device: torch.device, dry: bool, sizes: dict, args) -> None:
    from . import memory

    preset, context = sizes["preset"], sizes["context"]
    overrides = sizes.get("overrides", {})
    rec.set("setup", {"preset": preset, "context": context, "decode_tokens": sizes["decode_tokens"],
                      "overrides": overrides, "dtype": str(common.PRESET_DTYPES[preset])})
    for model in common.MODELS:
        if rec.left() < 5:
            rec.append("rows", {"model": model, "skipped": "time cap reached"})
            continue
        net = common.build_model(preset, model, device=device, **overrides)
        row = {"model": model, "preset": preset,
               "analytic_kv_bytes": common.kv_bytes_per_token(common.model_kwargs(preset, model, **overrides),
                                                              net.config.num_loops, common.PRESET_DTYPES[preset])
               * (context + sizes["decode_tokens"])}
        try:
            try:
                row.update(memory.context_memory(net, context, sizes["decode_tokens"], device))
            except Exception as error:  # e.g. a preallocated cache that cannot serve this call: the dynamic one then
                if not common.supports_static_cache(net):
                    raise
                row["static_error"] = f"{type(error).__name__}: {str(error)[:300]}"
                row.update(memory.context_memory(net, context, sizes["decode_tokens"], device, static=False))
        except Exception as error:  # recorded; the next model is measured all the same
            print(traceback.format_exc(), file=sys.stderr, flush=True)
            row["error"] = f"{type(error).__name__}: {str(error)[:300]}"
            rec.append("rows", row)
            del net
            memory._release(device)
            continue
        if device.type == "cuda":
            row.update(memory.published_comparison(row))
        published = common.PUBLISHED_GB.get(model)
        if published and preset == "ouro-1.4b" and context == common.PUBLISHED_CONTEXT:
            row.update(published_kv_gb=published["kv_gb"], published_total_gb=published["total_gb"])
        rec.append("rows", row)
        del net
        memory._release(device)


# -- part d: decode tokens/s -----------------------------------------------------------------------------------------


class StepClock:
    """A stopping criterion that never stops: it timestamps every generated token (after a device synchronize)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.times: list[float] = []

    def __call__(self, input_ids, scores, **kwargs):
        common.synchronize(self.device)
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def decode_path(net, requested: str) -> str:
    """The path a row runs: `requested` (one of DECODE_PATHS), or for "auto" static where the model offers it."""
    static = common.supports_static_cache(net)
    if requested == "auto":
        return "static" if static else "eager"
    if requested != "eager" and not static:
        raise ValueError(f"--decode-path {requested}: this model has no new_cache(max_cache_len=...)")
    return requested


def _cudagraph_skips() -> int:
    """torch's count of compiled graphs it could not capture as CUDA graphs (each logged with its reason)."""
    from torch._dynamo.utils import counters

    return counters["inductor"]["cudagraph_skips"]


def timed_generate(net, batch: int, context: int, steps: int, warmup: int, device: torch.device, path: str) -> dict:
    """`generate` of `warmup + steps` tokens after a `context`-token prompt; per-step times and allocator peak."""
    from transformers import StoppingCriteriaList

    ids = torch.randint(1, net.config.vocab_size, (batch, context), device=device)
    clock = StepClock(device)
    new_tokens = warmup + steps + 1  # the first token comes out of the prefill
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, eos_token_id=None,
                  pad_token_id=0, use_cache=True, stopping_criteria=StoppingCriteriaList([clock]),
                  return_dict_in_generate=True)
    capture, _, attention = path.partition("+")
    if capture in ("static", "graphs"):
        kwargs["cache_implementation"] = "static"  # transformers compiles the decode step for it (on CUDA)
    if capture == "graphs":
        from transformers import CompileConfig

        kwargs["compile_config"] = CompileConfig(backend="cudagraphs", fullgraph=True)
    forced = override_backend(attention) if attention else contextlib.nullcontext()
    row = {"batch": batch, "context": context, "path_requested": path, "path": None, "warmup_steps": warmup,
           "timed_steps": steps}
    # The allocator's peak on CUDA; on CPU the only allocator probe is the profiler, which would distort the timing.
    probe_of = common.memory_probe(device) if device.type == "cuda" else contextlib.nullcontext({})
    skips = _cudagraph_skips()
    try:
        with torch.no_grad(), forced, probe_of as probe:
            common.synchronize(device)
            start = time.perf_counter()
            out = net.generate(ids, **kwargs)
        cache = out.cache
        # A compiled step whose CUDA graphs torch skipped (it logs why) runs its kernels one launch at a time.
        skipped = _cudagraph_skips() - skips
        # What ran, whatever was asked: transformers may ignore cache_implementation (with a warning), and compiles
        # the decode step only for a compileable cache on CUDA (it keeps the compiled call on the model).
        preallocated = bool(getattr(cache, "is_preallocated", getattr(cache, "is_compileable", False)))
        compiled = preallocated and capture != "eager" and getattr(net, "_compiled_call", None) is not None
        how = ("CUDA graphs (no inductor)" if capture == "graphs" else "compiled") if compiled else "eager"
        row.update(cache_nbytes=cache.nbytes(), cache_capacity_nbytes=cache.capacity_nbytes(),
                   cache_class=type(cache).__name__, cache_preallocated=preallocated, compiled_forward=compiled,
                   cudagraph_skips=skipped,
                   path=f"{'static' if preallocated else 'dynamic'} cache, {how}"
                        + (f", {attention} attention" if attention else "")
                        + (", CUDA graphs skipped" if compiled and skipped and device.type == "cuda" else ""))
        del out, cache
    except torch.OutOfMemoryError as error:
        row.update(oom=str(error).splitlines()[0])
        return row
    finally:
        del ids
        if device.type == "cuda":
            torch.cuda.empty_cache()
    stamps = [start] + clock.times
    step_s = [b - a for a, b in zip(stamps[1:], stamps[2:])]  # decode steps; stamps[1] - start is the prefill
    timed = step_s[warmup:]
    median = statistics.median(timed) if timed else None
    row.update(probe)
    row.update({"prefill_and_first_token_s": stamps[1] - start if len(stamps) > 1 else None,
                "warmup_step_s": step_s[:warmup], "timed_step_s": timed,
                "step_ms": None if median is None else 1e3 * median,
                "tokens_per_s": None if median is None else batch / median})
    return row


def _failed_row(rec: Recorder, row: dict, error: Exception) -> dict:
    """A measurement that raised: recorded with its error (and traceback on stderr), and the part goes on."""
    print(traceback.format_exc(), file=sys.stderr, flush=True)
    row.update(error=f"{type(error).__name__}: {str(error)[:300]}", fits_budget=None)
    rec.append("rows", row)
    return row


def part_decode(rec: Recorder, device: torch.device, dry: bool, sizes: dict, args) -> None:
    preset = sizes["preset"]
    dtype = common.PRESET_DTYPES[preset]
    card = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else sizes["card_bytes"]
    budget = sizes["card_fraction"] * card
    rec.set("setup", {"preset": preset, "dtype": str(dtype), "card_bytes": card, "budget_bytes": budget,
                      "card": "device total memory" if device.type == "cuda" else "notional (dry run)",
                      "fits": "used <= budget; used = max_memory_allocated over prefill + decode (CUDA), or weights "
                              "+ the cache's buffers, capacity_nbytes (CPU dry run: no allocator peak, the profiler "
                              "would distort the timing)"})
    nets = {}

    def net_of(model):
        if model not in nets:
            nets.clear()  # one model on the device at a time
            if device.type == "cuda":
                torch.cuda.empty_cache()
            nets[model] = common.build_model(preset, model, device=device, dtype=dtype)
        return nets[model]

    failed = set()  # compiled paths that failed once: their remaining rows go eager at once

    def path_of(net, requested):
        path = decode_path(net, requested)
        return "eager" if path in failed else path

    def measure(model, batch, context, kind, requested):
        net = net_of(model)
        path = path_of(net, requested)
        row = {"model": model, "kind": kind, "num_loops": net.config.num_loops, "batch": batch, "context": context}
        started = time.monotonic()
        print(f"gpu_suite d: {model} batch {batch}, {context} tokens, {path} path ...", flush=True)
        try:
            row.update(timed_generate(net, batch, context, sizes["timed_steps"], sizes["warmup_steps"], device, path))
        except Exception as error:  # the static/compiled path failing is a result; the eager one is measured then
            if path == "eager":
                return _failed_row(rec, row, error)
            row["static_error"] = f"{path}: {type(error).__name__}: {str(error)[:300]}"
            failed.add(path)
            print(f"gpu_suite: the {path} decode path failed ({row['static_error']}); measuring eager", flush=True)
            try:
                row.update(timed_generate(net, batch, context, sizes["timed_steps"], sizes["warmup_steps"], device,
                                          "eager"))
            except Exception as eager_error:
                return _failed_row(rec, row, eager_error)
        weights = sum(p.numel() * p.element_size() for p in net.parameters())
        used = row.get("alloc_peak_bytes") if device.type == "cuda" else (
            None if row.get("cache_capacity_nbytes") is None else weights + row["cache_capacity_nbytes"])
        row.update(weights_bytes=weights, used_bytes=used,
                   fits_budget=None if row.get("oom") else (used is not None and used <= budget))
        rec.append("rows", row)
        print(f"gpu_suite d: {model} batch {batch}, {context} tokens: {row.get('path')}, "
              f"{_num(row.get('tokens_per_s'), 1)} tokens/s, warm-up steps "
              f"{' '.join(f'{1e3 * t:.0f}' for t in row.get('warmup_step_s', []))} ms, "
              f"{time.monotonic() - started:.0f} s in all{', OOM' if row.get('oom') else ''}", flush=True)
        return row

    if args.decode_rows:
        plan = [(*row[:4], row[4] or args.decode_path) for row in _parse_decode_rows(args.decode_rows, sizes)]
    else:
        plan = _default_decode_plan(sizes, args.decode_path)
    for model, batch, context, kind, requested in plan:
        if rec.left() < 8:
            rec.append("skipped", {"model": model, "batch": batch, "context": context, "reason": "time cap reached"})
            continue
        if batch != "max":
            measure(model, batch, context, kind, requested)
            continue
        net = net_of(model)
        kv_seq = common.kv_bytes_per_token(common.model_kwargs(preset, model), net.config.num_loops, dtype) * (
            context + sizes["warmup_steps"] + sizes["timed_steps"] + 1)
        weights = sum(p.numel() * p.element_size() for p in net.parameters())
        analytic = max(1, int((budget - weights) // kv_seq))
        # A dynamic cache doubles its buffers at the first decode step after the prefill: half the rows fit.
        path = path_of(net, requested)
        ran = [r for r in rec.data.get("rows", []) if r["model"] == model and r.get("path")]
        preallocated = ran[-1]["cache_preallocated"] if ran else path != "eager"
        batch = analytic if preallocated else max(1, analytic // 2)
        tried = []
        while rec.left() >= 8 and batch >= 1:
            row = measure(model, batch, context, kind, requested)
            tried.append(batch)
            if row.get("fits_budget"):
                break
            batch = min(batch - 1, int(batch * 0.75)) if batch > 1 else 0
        rec.append("max_batch", {"model": model, "context": context, "analytic_batch": analytic,
                                 "path": ran[-1]["path"] if ran else path, "first_try": "analytic" if preallocated
                                 else "analytic // 2 (a dynamic cache doubles its buffers at the first decode step)",
                                 "tried": tried, "kv_bytes_per_sequence": kv_seq,
                                 "largest_fitting": max((r["batch"] for r in rec.data["rows"] if r["model"] == model
                                                         and r["kind"] == "max batch" and r.get("fits_budget")),
                                                        default=None)})


# -- part e: the converter's training steps --------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def part_convert(rec: Recorder, device: torch.device, dry: bool, sizes: dict, args) -> None:
    """Phase-1 then phase-2 steps of `convert.train.train` on random weights, FSDP2 at world size 1.

    The converter's own set-up (`convert.from_ouro._load_models`) reads an Ouro checkpoint; here the teacher
    (`per_loop`, frozen) and the student (`shared`, element-wise gate, exit gate frozen) are built with random
    weights in fp32, as the converter keeps them, under bf16 autocast on CUDA (the converter's default there).
    `convert.train.init_runtime` creates a process group only when WORLD_SIZE > 1, so the group (nccl on CUDA,
    gloo on CPU), the device mesh and the sharding (`fully_shard` on every layer, then the root, as
    `convert.train.prepare_model` does for several processes) are set up here for one process.
    """
    import types

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from melt import MeltConfig, MeltForCausalLM
    from melt_convert import train as training

    preset, seq_len, chunk = sizes["preset"], sizes["seq_len"], sizes["chunk_size"]
    backend = "nccl" if device.type == "cuda" else "gloo"
    rec.set("setup", {"preset": preset, "seq_len": seq_len, "chunk_size": chunk, "steps_per_phase": sizes["steps"],
                      "backend": backend, "world_size": 1, "weights": "fp32",
                      "autocast": "bf16" if device.type == "cuda" else None, "micro_batch": 1,
                      "note": "one sequence per step; the published step is 32 such sequences over 8 GPUs"})
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh(device.type, (1,))
        runtime = training.Runtime(rank=0, world=1, device=device, mesh=mesh)
        autocast = ((lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda"
                    else contextlib.nullcontext)
        for checkpointing in sizes["checkpointing"]:  # the next one only after running out of memory
            outcome = _convert_steps(rec, device, preset, seq_len, chunk, sizes["steps"], checkpointing, mesh, runtime,
                                     autocast, training, fully_shard, MeltConfig, MeltForCausalLM, types)
            if outcome != "oom":
                break
    finally:
        dist.destroy_process_group()


def _convert_steps(rec, device, preset, seq_len, chunk, steps, checkpointing, mesh, runtime, autocast, training,
                   fully_shard, MeltConfig, MeltForCausalLM, types) -> str:
    """Build, shard, and run both phases; one row per phase. Returns "ok", "oom" or "stopped"."""
    with torch.device(device):
        torch.manual_seed(0)
        teacher = MeltForCausalLM(MeltConfig(**common.model_kwargs(preset, "looplm", chunk_size=chunk)))
        student = MeltForCausalLM(MeltConfig(**common.model_kwargs(preset, "melt", chunk_size=chunk,
                                                                    gate_type="elementwise")))
    teacher.requires_grad_(False).eval()
    student.model.early_exit_gate.requires_grad_(False)
    student.train()
    if checkpointing:
        student.activation_checkpointing_enable()
    for net in (teacher, student):
        for layer in net.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(net, mesh=mesh)
    rows = torch.randint(1, teacher.config.vocab_size, (4, seq_len))
    weights = {"teacher_bytes": sum(p.numel() * p.element_size() for p in teacher.parameters()),
               "student_bytes": sum(p.numel() * p.element_size() for p in student.parameters())}
    outcome = "ok"
    for phase in (1, 2):
        if rec.left() < 10:
            rec.append("phases", {"phase": phase, "checkpointing": checkpointing, "skipped": "time cap reached"})
            outcome = "stopped"
            continue
        opts = types.SimpleNamespace(
            phase1_steps=steps if phase == 1 else 0, phase2_steps=steps if phase == 2 else 0, batch_size=1,
            micro_batch_size=1, lr=8e-6, gate_lr=5e-4, weight_decay=0.0, warmup_steps=0, no_interpolation=False,
            seed=0, temperature=1.0, beta=0.1, max_grad_norm=1.0, checkpoint_every=0, stop_after=None)
        row = {"phase": phase, "checkpointing": checkpointing, "steps": steps, "tokens_per_step": seq_len, **weights}
        with tempfile.TemporaryDirectory(prefix="gpu_suite_convert_") as work:
            try:
                probe_of = common.memory_probe(device) if device.type == "cuda" else contextlib.nullcontext({})
                with probe_of as probe, _watching_steps(rec, Path(work) / "log.jsonl", row):
                    started = time.perf_counter()
                    training.train(student, teacher, rows, opts, runtime, Path(work), {}, autocast, False)
                row["seconds"] = time.perf_counter() - started
                row.update(_logged_steps(Path(work) / "log.jsonl"))
                row.update(probe)
            except torch.OutOfMemoryError as error:
                row["oom"] = str(error).splitlines()[0]
                outcome = "oom"
        rec.append("phases", row)
        if outcome == "oom":
            break
    del teacher, student
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return outcome


def _logged_steps(log: Path) -> dict:
    """Seconds, loss and alpha of each step the training loop has logged so far (its `log.jsonl`)."""
    lines = log.read_text().splitlines() if log.is_file() else []
    logged = [json.loads(line) for line in lines if line.strip()]
    cumulative = [0.0] + [r["seconds"] for r in logged]
    return {"step_s": [b - a for a, b in zip(cumulative, cumulative[1:])], "loss": [r["loss"] for r in logged],
            "alpha": [r["alpha"] for r in logged]}


@contextlib.contextmanager
def _watching_steps(rec: Recorder, log: Path, row: dict):
    """While the block runs, record the steps logged so far under `running` every 2 s, so that a part stopped at
    its cap keeps the steps it finished (a step at the Ouro-1.4B shape takes most of a minute)."""
    done = threading.Event()

    def watch():
        while not done.wait(2.0):
            with contextlib.suppress(OSError, ValueError, KeyError):
                steps = _logged_steps(log)
                if steps["step_s"]:
                    rec.set("running", {**row, **steps, "note": "steps logged before the part ended"})

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        yield
    finally:
        done.set()
        watcher.join()
        with rec.lock:
            rec.data.pop("running", None)


PART_FUNCTIONS = {"a": part_tests, "b": part_kernels, "c": part_memory, "d": part_decode, "e": part_convert,
                  "f": part_memory}


# ================================================================================================================
# Report: JSON, PNGs, Markdown
# ================================================================================================================


def _gb(value) -> str:
    return "-" if value is None else f"{value / 1e9:.2f}"


def _num(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return common._cell(round(value, digits) if isinstance(value, float) else value)


def _table(headers: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines + [""]


def summary_markdown(report: dict) -> str:
    dry = " (DRY RUN: toy sizes, plumbing only; no figure here is a GPU measurement)" if report["dry_run"] else ""
    machine = report.get("machine") or {}
    lines = [f"# gpu_suite on {report['device_name']}{dry}", "",
             f"{report['started']}; budget {report['budget_s']:.0f} s, used {report['elapsed_s']:.0f} s; torch "
             f"{machine.get('torch')}, CUDA {machine.get('cuda')}, triton {machine.get('triton')}, transformers "
             f"{machine.get('transformers')}; decode path requested: {report['decode_path']}.", ""]
    for call, source in enumerate(report.get("merged_from", []), 1):
        rows = f", rows {' '.join(source['decode_rows'])}" if source.get("decode_rows") else ""
        lines.append(f"- call {call} ({source['started']}): parts {' '.join(source['parts'])}, budget "
                     f"{source['budget_s']:.0f} s, decode path {source['decode_path']}{rows}")
    lines += [""] if report.get("merged_from") else []
    lines += _table(["part", "what", "status", "seconds", "cap s", "note"],
                    [[k, e["title"], e["status"], e["seconds"], e["cap_s"], (e.get("reason") or "").replace("|", "/")]
                     for k, e in report["parts"].items()])
    for key, entry in report["parts"].items():
        data = entry.get("data") or {}
        section = SECTIONS.get(key)
        if section and data:
            try:
                lines += section(data, report)
            except Exception as error:  # a rendering slip must never cost the report (the JSON holds every row)
                lines += [f"(part {key}'s section could not be rendered: {type(error).__name__}: {error})", ""]
        if data.get("error"):
            lines += [f"Part {key} error: `{data['error'][:300]}`", ""]
    return "\n".join(lines)


def _section_tests(data: dict, report: dict) -> list[str]:
    lines = ["## a. Tests on the device", ""]
    py = data.get("pytest")
    if py and py.get("tests") is None and py.get("progress_counts"):
        c = py["progress_counts"]
        lines += [f"pytest was stopped before its summary; its progress line shows {c['passed']} passed, {c['failed']} "
                  f"failed, {c['errors']} errors, {c['skipped']} skipped so far.", ""]
    if py:
        lines += _table(["tests", "passed", "failed", "errors", "skipped", "seconds", "timed out"],
                        [[py.get("tests"), py.get("passed"), py.get("failed"), py.get("errors"), py.get("skipped"),
                          py.get("seconds"), "yes" if py.get("timed_out") else "no"]])
        lines += [f"Files: {', '.join(py.get('files', []))}", ""]
        lines += [f"- FAILED `{f['test']}`: {f['message'][:200]}" for f in py.get("failures", [])[:15]]
        lines += [""] if py.get("failures") else []
    configs = data.get("production_configs")
    if configs and configs.get("rows"):
        rows = configs["rows"]
        bad = [r for r in rows if not r.get("ok")]
        total = sum(len(v) for v in configs.get("configs", {}).values())
        lines += [f"Autotune configurations ({total} across the 4 tuned kernels, {configs['dtype']}): "
                  f"{len(rows) - len(bad)} of {len(rows)} (round, case) runs within tolerance of the fp32 "
                  "reference.", ""]
        for r in bad[:10]:
            problem = r.get("error") or f"relative RMS {r['max_relative_rms']:.2e}"
            lines.append(f"- round {r['round']} {r['case']}: {problem} with {r['configs']}")
        lines += [""] if bad else []
    return lines


def _section_kernels(data: dict, report: dict) -> list[str]:
    lines = ["## b. Kernels", ""]
    if data.get("note"):
        lines += [f"_{data['note']}_", ""]
    gated = data.get("gated_update") or []
    if gated:
        lines += _table(["gated update", "dir", "GB/s", "copy GB/s", "% of copy"],
                        [[str(tuple(r["shape"])), r["direction"], _num(r["gb_per_s"], 1), _num(r["copy_gb_per_s"], 1),
                          _num(100 * r["gb_per_s"] / r["copy_gb_per_s"], 1)] for r in gated])
    decode = data.get("decode_attention") or []
    if decode:
        lines += ["Decode attention (C = 1, H = 16, D = 128, bf16 on GPU; the buffer 256 columns wider than the "
                  "fill P): GB/s over the K/V bytes of the P + 1 written columns, and that over a device copy of "
                  "the same bytes. triton_lengths: the kernel with per-sequence lengths (eager CUDA step, "
                  "graphs+triton); sdpa_written: SDPA over the written columns (eager in-place step); "
                  "sdpa_buffer_mask: SDPA over the whole buffer with a mask (compiled in-place step).", ""]
        lines += _table(["batch", "P", "impl", "ms", "GB/s", "% of copy", "max abs diff vs triton_lengths"],
                        [[r["B"], r["P"], r["impl"], _num(r["ms"], 4), _num(r["gb_per_s"], 1),
                          _num(100 * r["gb_per_s"] / r["copy_gb_per_s"], 1),
                          f"{r['max_abs_diff_vs_triton_lengths']:.2e}"] for r in decode])
    attn = data.get("chunk_attention") or []
    by = {(r["C"], r["P"], r["impl"]): r for r in attn}
    rows = []
    for C, P in sorted({(r["C"], r["P"]) for r in attn}, key=lambda cp: (cp[1], cp[0])):
        melt, sdpa, cat = (by.get((C, P, i)) for i in ("melt_triton", "sdpa_flash", "cat_sdpa_flash"))
        if not melt:
            continue
        ratio = lambda other, key: _num(other[key] / melt[key], 2) if other else "-"  # noqa: E731
        rows.append([C, P, _num(melt["fwd_ms"], 4), ratio(sdpa, "fwd_ms"), ratio(cat, "fwd_ms"),
                     _num(melt["bwd_ms"], 4), ratio(sdpa, "bwd_ms"), ratio(cat, "bwd_ms")])
    if rows:
        lines += ["Chunk attention (B=1, H=16, D=128, bf16 on GPU): MELT's time, and the others' time over MELT's "
                  "(> 1: MELT faster).", ""]
        lines += _table(["C", "P", "fwd ms", "SDPA-flash / MELT", "cat+SDPA / MELT", "bwd ms", "SDPA-flash / MELT",
                         "cat+SDPA / MELT"], rows)
    return lines


def _section_memory(data: dict, report: dict) -> list[str]:
    setup = data.get("setup", {})
    lines = [f"## Memory, {setup.get('preset')} shape, {setup.get('context')} tokens + {setup.get('decode_tokens')} "
             f"decode steps, {setup.get('dtype', '').replace('torch.', '')}", "",
             "KV held = `cache.nbytes()` (arithmetic); KV allocated = `cache.capacity_nbytes()` (its buffers); "
             "allocated after = `torch.cuda.memory_allocated` after prefill + decode; peak = "
             "`torch.cuda.max_memory_allocated` over prefill and decode (CPU: the allocator's peak above the start). "
             "GB = 1e9 B.", ""]
    rows = []
    for r in data.get("rows", []):
        if r.get("skipped"):
            rows.append([r["model"], "skipped: " + r["skipped"]] + ["-"] * 7)
            continue
        last = r.get("decode") or r.get("prefill") or {}
        peaks = [s.get("alloc_peak_bytes") for s in (r.get("prefill"), r.get("decode")) if s]
        peaks = [p for p in peaks if p is not None]
        deltas = [s.get("alloc_peak_delta_bytes") for s in (r.get("prefill"), r.get("decode")) if s]
        deltas = [d for d in deltas if d is not None]
        rows.append([r["model"], r.get("cache"), _gb(r.get("weights_bytes")), _gb(r.get("analytic_kv_bytes")),
                     _gb(last.get("cache_nbytes")), _gb(last.get("cache_capacity_nbytes")),
                     _gb(last.get("allocated_after_bytes")),
                     _gb(max(peaks)) if peaks else (f"+{_gb(max(deltas))}" if deltas else "-"),
                     f"{r.get('published_total_gb', '-')}" + (f" (OOM {r['oom'][:60]})" if r.get("oom") else "")
                     + (f" (error {r['error'][:60]})" if r.get("error") else "")])
    lines += _table(["model", "cache", "weights GB", "KV analytic GB", "KV held GB", "KV allocated GB",
                     "allocated after GB", "peak GB", "published total GB"], rows)
    return lines


def _section_decode(data: dict, report: dict) -> list[str]:
    setup = data.get("setup", {})
    lines = [f"## d. Decode, {setup.get('preset')} shape", "",
             f"Budget: {_gb(setup.get('budget_bytes'))} GB of "
             f"{_gb(setup.get('card_bytes'))} GB ({setup.get('card')}); used = {setup.get('fits')}.", ""]
    copy = _copy_bandwidth(report)
    dtype = getattr(torch, str(setup.get("dtype", "torch.bfloat16")).removeprefix("torch."))
    rows = []
    for r in data.get("rows", []):
        floor = common.decode_bytes_per_step(setup["preset"], r["model"], r["batch"], r["context"], dtype) if (
            setup.get("preset") and r["model"] in common.MODELS) else None
        achieved = floor / (r["step_ms"] / 1e3) if floor and r.get("step_ms") else None
        rows.append([r["model"], r["kind"], r["batch"], r["context"], r.get("path"), _num(r.get("tokens_per_s"), 1),
                     _num(r.get("step_ms"), 2), _gb(floor), _num(achieved and achieved / 1e9, 0),
                     _num(copy and achieved and 100 * achieved / copy, 1), _num(r.get("prefill_and_first_token_s"), 2),
                     " ".join(f"{1e3 * s:.0f}" for s in r.get("warmup_step_s", [])) or "-", _gb(r.get("used_bytes")),
                     "OOM" if r.get("oom") else "error" if r.get("error")
                     else ("yes" if r.get("fits_budget") else "no")])
    lines += [f"GB/step: the least bytes a step reads (`benchmarks.common.decode_bytes_per_step`: weights once per "
              f"loop, one row per layer per context token per loop, arithmetic); GB/s = that over the step's time; "
              f"% copy = GB/s over the best device-copy bandwidth part b measured "
              f"({_num(copy and copy / 1e9, 0)} GB/s), i.e. the fraction of the bandwidth limit reached.", ""]
    lines += _table(["model", "row", "batch", "context", "path", "tokens/s", "ms/step", "GB/step", "GB/s", "% copy",
                     "prefill s", "warm-up ms", "used GB", "fits"], rows)
    for m in data.get("max_batch", []):
        lines.append(f"- {m['model']}: largest batch that fit at {m['context']} tokens: {m['largest_fitting']} "
                     f"(tried {m['tried']}; analytic {m['analytic_batch']} for a preallocated cache; path {m['path']})")
    return lines + [""]


def _copy_bandwidth(report: dict) -> float | None:
    """The best device-copy bandwidth (bytes/s) part b measured in this report, if it ran."""
    gated = ((report["parts"].get("b") or {}).get("data") or {}).get("gated_update") or []
    return max((r["copy_gb_per_s"] * 1e9 for r in gated if r.get("copy_gb_per_s")), default=None)


def _section_convert(data: dict, report: dict) -> list[str]:
    setup = data.get("setup", {})
    lines = [f"## e. Converter, {setup.get('preset')} shape, sequence {setup.get('seq_len')}, chunk "
             f"{setup.get('chunk_size')}, {setup.get('backend')} world size 1, autocast {setup.get('autocast')}", ""]
    rows = []
    running = [{**data["running"], "skipped": data["running"]["note"]}] if data.get("running") else []
    for r in data.get("phases", []) + running:
        rows.append([r["phase"], "yes" if r["checkpointing"] else "no",
                     " ".join(f"{s:.2f}" for s in r.get("step_s", [])) or "-",
                     _gb(r.get("alloc_peak_bytes")),
                     r.get("oom", "")[:80] if r.get("oom") else r.get("skipped", "")])
    lines += _table(["phase", "activation checkpointing", "seconds per step", "max_memory_allocated GB", "note"], rows)
    return lines


SECTIONS = {"a": _section_tests, "b": _section_kernels, "c": _section_memory, "d": _section_decode,
            "e": _section_convert, "f": _section_memory}


def write_report(report: dict, out: Path, stem: str) -> str:
    """(Re)write the JSON, the PNGs of the parts with figures and the Markdown summary; return the summary."""
    figures = {"kernels": (_plot_kernels, ["b"]), "memory": (_plot_memory, ["c", "f"]), "decode": (_plot_decode, ["d"]),
               "convert": (_plot_convert, ["e"])}
    for name, (plot, keys) in figures.items():
        datas = {k: report["parts"][k]["data"] for k in keys if (report["parts"].get(k) or {}).get("data")}
        if not datas:
            continue
        try:
            fig = plot(datas, report)
        except Exception as error:  # a figure must never cost the report
            report.setdefault("plot_errors", {})[name] = f"{type(error).__name__}: {error}"
            continue
        if fig is not None:
            path = out / f"{stem}_{name}.png"
            common.write_figure(path, fig)
            report["files"][name] = path.name
    summary = summary_markdown(report)
    (out / f"{stem}.md").write_text(summary + "\n")
    report["files"]["summary"] = f"{stem}.md"
    report["files"]["json"] = f"{stem}.json"
    common.write_json(out / f"{stem}.json", report)
    return summary


def _title(report: dict, what: str) -> str:
    return f"{what}, {report['device_name']}{' (DRY RUN, toy sizes)' if report['dry_run'] else ''}"


def _plot_kernels(datas: dict, report: dict):
    data = datas["b"]
    gated, attn = data.get("gated_update") or [], data.get("chunk_attention") or []
    decode = data.get("decode_attention") or []
    if not gated and not attn and not decode:
        return None
    fig, axes = common.new_figure(ncols=3)
    ax_bw, ax_attn, ax_decode = axes[0]
    from . import kernels

    kernels.plot_decode(ax_decode, decode)
    xs = range(len(gated))
    ax_bw.bar([x - 0.2 for x in xs], [r["gb_per_s"] for r in gated], width=0.4, label="gated update")
    ax_bw.bar([x + 0.2 for x in xs], [r["copy_gb_per_s"] for r in gated], width=0.4, label="copy, same bytes")
    ax_bw.set_xticks(list(xs), [f"{tuple(r['shape'])}\n{r['direction']}" for r in gated], fontsize=7)
    ax_bw.set_ylabel("GB/s")
    ax_bw.legend(fontsize=7)
    ax_bw.set_title("gated update bandwidth")
    keys = sorted({(r["C"], r["P"]) for r in attn}, key=lambda cp: (cp[1], cp[0]))
    by = {(r["C"], r["P"], r["impl"]): r for r in attn}
    for offset, (impl, label) in zip((-0.27, 0, 0.27), (("melt_triton", "MELT"), ("sdpa_flash", "SDPA-flash"),
                                                      ("cat_sdpa_flash", "cat + SDPA"))):
        vals = [by[(C, P, impl)]["fwd_ms"] + by[(C, P, impl)]["bwd_ms"] if (C, P, impl) in by else 0 for C, P in keys]
        ax_attn.bar([i + offset for i in range(len(keys))], vals, width=0.27, label=label)
    ax_attn.set_xticks(list(range(len(keys))), [f"C{C}\nP{P}" for C, P in keys], fontsize=7)
    ax_attn.set_yscale("log")
    ax_attn.set_ylabel("forward + backward ms")
    ax_attn.legend(fontsize=7)
    ax_attn.set_title("chunk attention")
    fig.suptitle(_title(report, "b. kernels"), fontsize=10)
    return fig


def _plot_memory(datas: dict, report: dict):
    groups = []
    for key, data in datas.items():
        for r in data.get("rows", []):
            if r.get("skipped") or "weights_bytes" not in r:
                continue
            last = r.get("decode") or r.get("prefill") or {}
            stages = (r.get("prefill"), r.get("decode"))
            peaks = [s.get("alloc_peak_bytes") for s in stages if s and s.get("alloc_peak_bytes")]
            deltas = [s.get("alloc_peak_delta_bytes") or 0 for s in stages if s]
            peak = max(peaks) if peaks else (r["weights_bytes"] + max(deltas) if deltas else None)
            groups.append((f"{key}. {data['setup']['preset']}\n{r['model']}", r["weights_bytes"],
                           last.get("cache_nbytes"), last.get("cache_capacity_nbytes"), peak,
                           r.get("published_total_gb")))
    if not groups:
        return None
    fig, axes = common.new_figure(ncols=1, width=max(6.0, 1.6 * len(groups)))
    ax = axes[0][0]
    scale, unit = (1e9, "GB") if max(g[1] for g in groups) > 1e8 else (2**20, "MiB")
    labels = ["weights", "KV held (nbytes)", "KV allocated (capacity)", "allocator peak"]
    for j, label in enumerate(labels):
        ax.bar([i + (j - 1.5) * 0.2 for i in range(len(groups))], [(g[1 + j] or 0) / scale for g in groups], width=0.2,
               label=label)
    published = [(i, g[5]) for i, g in enumerate(groups) if g[5] is not None and unit == "GB"]
    if published:
        ax.plot([i for i, _ in published], [v for _, v in published], "k_", ms=30, mew=2, label="published total")
    ax.set_xticks(list(range(len(groups))), [g[0] for g in groups], fontsize=7)
    ax.set_ylabel(unit)
    ax.legend(fontsize=7)
    fig.suptitle(_title(report, "c/f. memory after prefill + decode"), fontsize=10)
    return fig


def _plot_decode(datas: dict, report: dict):
    rows = [r for r in datas["d"].get("rows", []) if r.get("tokens_per_s")]
    if not rows:
        return None
    fig, axes = common.new_figure(ncols=1, width=max(6.0, 0.9 * len(rows)))
    ax = axes[0][0]
    ax.bar(range(len(rows)), [r["tokens_per_s"] for r in rows],
           color=[common.MODEL_COLORS[r["model"]] for r in rows])
    ax.set_xticks(list(range(len(rows))), [f"{r['model']}\nb{r['batch']} @{r['context']}\n{r['path']}" for r in rows],
                  fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("decode tokens/s (all sequences)")
    fig.suptitle(_title(report, "d. decode"), fontsize=10)
    return fig


def _plot_convert(datas: dict, report: dict):
    running = [datas["e"]["running"]] if datas["e"].get("running") else []
    rows = [r for r in datas["e"].get("phases", []) + running if r.get("step_s")]
    if not rows:
        return None
    fig, axes = common.new_figure(ncols=1)
    ax = axes[0][0]
    labels, values = [], []
    for r in rows:
        for i, s in enumerate(r["step_s"]):
            labels.append(f"phase {r['phase']}\nstep {i + 1}{' ckpt' if r['checkpointing'] else ''}")
            values.append(s)
    ax.bar(range(len(values)), values)
    ax.set_xticks(list(range(len(values))), labels, fontsize=7)
    ax.set_ylabel("seconds per step (one sequence)")
    fig.suptitle(_title(report, "e. converter steps"), fontsize=10)
    return fig


if __name__ == "__main__":
    sys.exit(main())
