"""Shared pieces of the benchmarks: shape presets, the three compared models, machine info, result files.

The three models of one comparison share a shape and differ only in how they loop and cache:
- `melt`: `cache_mode="shared"`, one key/value row per token per layer whatever the number of loops;
- `looplm`: `cache_mode="per_loop"`, Ouro exactly, one row per token per layer per loop;
- `standard`: the same stack run once (`num_loops=1`), a plain transformer (both cache modes coincide).

Results go to `runs/benchmarks/<name>_<preset>_<device-slug>.json` and `.png` under the current directory
(`/runs/` is git-ignored, so a run never dirties a checkout) unless `--out-dir` says otherwise; the files committed
under `benchmarks/results/` are written there deliberately, with `--out-dir benchmarks/results`. Files are written
atomically (temporary file + rename) so a crashed run never leaves a half-written result beside good ones.
Nothing here asserts a timing: the benchmarks measure and report.

Memory figures say how they were obtained (`AllocationPeak.method`, `ProcessPeakRSS.method`):
- arithmetic: `MeltCache.nbytes()` (rows held x bytes per row) and the analytic formula of `kv_bytes_per_token`;
- allocated buffers: `MeltCache.capacity_nbytes()` (the sizes of the cache's buffers, spare capacity included);
- allocator-measured: on CUDA `torch.cuda.max_memory_allocated` (stats reset before the block); on CPU the
  CPU allocator's own running total, reported for every allocation and free under
  `torch.profiler.profile(profile_memory=True)`;
- process: the peak resident set of the whole process (CPU only; `/proc/self/status` VmHWM).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import functools
import gc
import json
import math
import os
import platform
import re
import resource
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

# Default output directory: relative to where the benchmark runs, under the git-ignored `/runs/` of a checkout.
DEFAULT_OUT_DIR = Path("runs") / "benchmarks"
# Where committed results live (written only through an explicit `--out-dir`).
COMMITTED_RESULTS_DIR = Path(__file__).resolve().parent / "results"
RESULTS_DIR = DEFAULT_OUT_DIR  # the former name of the default, for callers written before the untracked default

MODELS = ("melt", "looplm", "standard")
MODEL_LABELS = {"melt": "MELT (shared)", "looplm": "LoopLM / Ouro (per-loop)", "standard": "standard (1 loop)"}
MODEL_COLORS = {"melt": "tab:blue", "looplm": "tab:red", "standard": "tab:gray"}

# Shapes. `tiny` runs on 2 CPU cores in seconds (fp32); the Ouro shapes are the published models' (random
# weights, bf16, meant for a GPU). max_position_embeddings covers the longest context the benchmarks use.
PRESETS: dict[str, dict] = {
    "tiny": dict(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, head_dim=16, max_position_embeddings=131072, rope_theta=10_000.0,
        rms_norm_eps=1e-6, tie_word_embeddings=False, num_loops=4, chunk_size=500,
    ),
    "ouro-1.4b": dict(
        vocab_size=49152, hidden_size=2048, intermediate_size=5632, num_hidden_layers=24, num_attention_heads=16,
        num_key_value_heads=16, head_dim=128, max_position_embeddings=131072, rope_theta=1_000_000.0,
        rms_norm_eps=1e-6, tie_word_embeddings=False, num_loops=4, chunk_size=500,
    ),
    "ouro-2.6b": dict(
        vocab_size=49152, hidden_size=2048, intermediate_size=5632, num_hidden_layers=48, num_attention_heads=16,
        num_key_value_heads=16, head_dim=128, max_position_embeddings=131072, rope_theta=1_000_000.0,
        rms_norm_eps=1e-6, tie_word_embeddings=False, num_loops=4, chunk_size=500,
    ),
}
PRESET_DTYPES = {"tiny": torch.float32, "ouro-1.4b": torch.bfloat16, "ouro-2.6b": torch.bfloat16}

# MELT_SPEC section 6. "32K" there is 32,000 tokens and GB is 1e9 bytes: 0.786 MB/token * 32,000 = 25.17 GB.
PUBLISHED_CONTEXT = 32_000
PUBLISHED_GB = {
    "looplm": {"model": "Ouro-1.4B-Thinking", "kv_per_token_mb": 0.786, "kv_gb": 25.17, "total_gb": 27.97},
    "melt": {"model": "MELT-1.6B", "kv_per_token_mb": 0.197, "kv_gb": 6.29, "total_gb": 9.49},
    "qwen3-1.7b": {"model": "Qwen3-1.7B", "kv_per_token_mb": 0.115, "kv_gb": 3.67, "total_gb": 7.07},
}


# -- models -------------------------------------------------------------------------------------------------


def model_kwargs(preset: str, model: str, **overrides) -> dict:
    """MeltConfig kwargs of `model` ("melt" | "looplm" | "standard") in the shape of `preset`."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; choose one of {MODELS}")
    kwargs = dict(PRESETS[preset])
    kwargs["cache_mode"] = "shared" if model == "melt" else "per_loop"
    if model == "standard":
        kwargs["num_loops"] = 1
    kwargs.update(overrides)
    return kwargs


def build_model(preset: str, model: str, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
                seed: int = 0, **overrides):
    """A `MeltForCausalLM` with random weights (eval mode) on `device` in `dtype` (the preset's by default)."""
    from melt import MeltConfig, MeltForCausalLM

    torch.manual_seed(seed)
    dtype = PRESET_DTYPES[preset] if dtype is None else dtype
    with torch.device(device):
        net = MeltForCausalLM(MeltConfig(**model_kwargs(preset, model, **overrides)))
    return net.to(dtype).eval()


@functools.cache
def _parameter_counts(preset: str, model: str) -> dict[str, int]:
    """Parameters of `model` in the shape of `preset`, counted on the meta device (nothing allocated): in all, in
    the decoder layers (run once per loop), and in the final norm and LM head (run once per token)."""
    from melt import MeltConfig, MeltForCausalLM

    with torch.device("meta"):
        net = MeltForCausalLM(MeltConfig(**model_kwargs(preset, model)))
    return {"all": sum(p.numel() for p in net.parameters()),
            "layers": sum(p.numel() for p in net.model.layers.parameters()),
            "head": sum(p.numel() for p in [*net.lm_head.parameters(), *net.model.norm.parameters()])}


def parameter_count(preset: str, model: str) -> int:
    """Parameters of `model` in the shape of `preset`, counted on the meta device (nothing allocated)."""
    return _parameter_counts(preset, model)["all"]


def kv_bytes_per_token(config_kwargs: dict, num_loops: int, dtype: torch.dtype) -> int:
    """Analytic key/value bytes per token: layers x (loops if per_loop) x 2 (K and V) x kv_heads x head_dim x dtype."""
    rows = config_kwargs["num_hidden_layers"] * (num_loops if config_kwargs["cache_mode"] == "per_loop" else 1)
    kv_heads = config_kwargs.get("num_key_value_heads") or config_kwargs["num_attention_heads"]
    head_dim = config_kwargs.get("head_dim") or config_kwargs["hidden_size"] // config_kwargs["num_attention_heads"]
    return rows * 2 * kv_heads * head_dim * torch.empty(0, dtype=dtype).element_size()


def decode_bytes_per_step(preset: str, model: str, batch: int, context: int, dtype: torch.dtype) -> int:
    """The least bytes one decode step of `batch` sequences after `context` tokens must read (arithmetic): every
    loop reads each decoder layer's weights once and, per sequence, one key/value row per layer per context token
    (MELT's shared row, or LoopLM's row of that loop); the final norm and the LM head are read once. The embedding
    row, the activations and the new rows are left out (a few MB). Its ratio to a step's time is the bandwidth a
    step achieves; a bandwidth over it is the step's floor."""
    kwargs = model_kwargs(preset, model)
    counts = _parameter_counts(preset, model)
    size = torch.empty(0, dtype=dtype).element_size()
    rows = kv_bytes_per_token({**kwargs, "cache_mode": "shared"}, 1, dtype) * context * batch
    return loops_of(model, kwargs["num_loops"]) * (counts["layers"] * size + rows) + counts["head"] * size


def loops_of(model: str, num_loops: int) -> int:
    """Loops a model actually runs when the sweep asks for `num_loops` (the standard transformer runs one)."""
    return 1 if model == "standard" else num_loops


# -- machine ------------------------------------------------------------------------------------------------


def pick_device(requested: str | None = None) -> torch.device:
    if requested:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_name()


def device_slug(device: torch.device) -> str:
    """File-name-safe device name: `nvidia-h100-80gb-hbm3`, `cpu-amd-epyc`."""
    name = device_name(device)
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:48].strip("-")
    return slug if device.type == "cuda" else f"cpu-{slug}" if not slug.startswith("cpu") else slug


def machine_info(device: torch.device) -> dict:
    """Device, CPU and library versions of this run, recorded in every result file."""
    info = {
        "device": str(device),
        "device_name": device_name(device),
        "device_slug": device_slug(device),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }
    for module in ("transformers", "triton", "flash_attn"):
        try:
            info[module] = __import__(module).__version__
        except Exception:  # not installed, or broken on this machine: record its absence
            info[module] = None
    try:
        import melt

        info["melt"] = melt.__version__
    except Exception:
        info["melt"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["device_memory_bytes"] = props.total_memory
        info["device_capability"] = f"{props.major}.{props.minor}"
    return info


# -- timing ---------------------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device, warmup: int = 1, repeats: int = 3,
              setup: Callable[[], object] | None = None) -> dict:
    """Median (and all) wall times in seconds of `fn()`, after `warmup` untimed calls.

    `setup` runs untimed before every call (e.g. to crop a cache back to its prefill length).
    """
    times = []
    for i in range(warmup + repeats):
        if setup is not None:
            setup()
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times), "times_s": times}


# -- results --------------------------------------------------------------------------------------------------


def result_paths(
    name: str, preset: str, device: torch.device, out_dir: str | os.PathLike | None = None
) -> tuple[Path, Path]:
    out = Path(out_dir) if out_dir is not None else DEFAULT_OUT_DIR
    stem = f"{name}_{preset}_{device_slug(device)}"
    return out / f"{stem}.json", out / f"{stem}.png"


def _atomic_write(path: Path, write: Callable[[str], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path: Path, payload: dict) -> Path:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(_jsonable(payload), f, indent=1, allow_nan=False)
            f.write("\n")

    _atomic_write(path, write)
    return path


def write_figure(path: Path, figure) -> Path:
    """Save a matplotlib figure as PNG atomically, then close it."""
    import matplotlib.pyplot as plt

    _atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=120, bbox_inches="tight"))
    plt.close(figure)
    return path


def new_figure(ncols: int, nrows: int = 1, width: float = 6.0, height: float = 4.2):
    """A figure with the non-interactive Agg backend (benchmarks run headless)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows), squeeze=False)


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (torch.dtype, torch.device, Path)):
        return str(value)
    return value


# -- tables -----------------------------------------------------------------------------------------------------


def format_table(rows: Sequence[dict], columns: Sequence[str], headers: Sequence[str] | None = None,
                 title: str | None = None) -> str:
    """A fixed-width text table of `rows` (dicts) restricted to `columns`; None prints as '-'."""
    headers = list(columns) if headers is None else list(headers)
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    lines = [] if title is None else [title]
    lines.append("  ".join(h.rjust(w) for h, w in zip(headers, widths)))
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)


def print_table(*args, **kwargs) -> None:
    print(format_table(*args, **kwargs), end="\n\n")


def _cell(value) -> str:
    """A table cell: thousands separators for large numbers, 4 significant digits below 1,000, never `1.6e+04`."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}" if abs(value) >= 10_000 else str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if value == 0:
            return "0"
        if abs(value) >= 1_000:
            return f"{value:,.0f}"
        if abs(value) >= 1e-3:
            return f"{value:.4g}"
        return f"{value:.2e}"  # below a thousandth, significant digits need an exponent
    return str(value)


def print_memory_table(rows: list[dict], columns: list[str], headers: list[str], title: str,
                       context: str | None = None) -> None:
    """Print `rows` with readable memory cells (`held`, `allocated`, `alloc_peak`, `alloc_delta`, `process_peak`
    from the measured bytes), the allocator-peak and process-peak columns added where the rows carry those
    measurements, and a title that says how each was obtained."""
    first = next((row for row in rows if row.get("alloc_method")), {})
    readable, columns, headers = _memory_cells(rows, columns, headers, first)
    notes = [context] if context else []
    notes.append(f"allocator: {first.get('alloc_method')}")
    if first.get("process_method"):
        notes.append(f"{first['process_method']} (whole process: interpreter, libraries, freed-but-kept memory)")
    print_table(readable, columns, headers, title=f"{title} ({'; '.join(notes)})")


def _memory_cells(rows: list[dict], columns: list[str], headers: list[str],
                  first: dict) -> tuple[list[dict], list[str], list[str]]:
    cells = {"held": "cache_nbytes", "allocated": "cache_capacity_nbytes", "alloc_peak": "alloc_peak_bytes",
             "alloc_delta": "alloc_peak_delta_bytes", "process_peak": "process_peak_rss_bytes"}
    readable = [{**r, **{cell: human_bytes(r.get(key)) for cell, key in cells.items()}} for r in rows]
    columns, headers = list(columns), list(headers)
    if first.get("alloc_peak_bytes") is not None:
        columns.insert(-1, "alloc_peak")
        headers.insert(-1, "allocator peak")
    if first.get("process_peak_rss_bytes") is not None:
        columns.append("process_peak")
        headers.append("process peak RSS")
    return readable, columns, headers


def human_bytes(n: float | None) -> str | None:
    if n is None:
        return None
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024


# -- memory measurement -------------------------------------------------------------------------------------------


class AllocationPeak:
    """Peak memory that PyTorch's allocator handed out during a block (a context manager).

    - CUDA: `torch.cuda.max_memory_allocated` with the peak statistics reset on entry. `peak` is absolute
      (it includes what was allocated before the block: weights, an existing cache), `before` is
      `torch.cuda.memory_allocated` on entry and `delta = peak - before`.
    - CPU: the CPU allocator reports every allocation and free, with its running total, to the profiler under
      `torch.profiler.profile(profile_memory=True)`; `delta` is the highest running total during the block
      above its value at the first allocation, i.e. the peak of bytes allocated inside the block and not yet
      freed. Frees of tensors allocated before the block are not subtracted (their size is unknown to the
      profiler), so it never under-reports growth. `peak` and `before` are None (no absolute figure on CPU).
    The profiler records every operator: measure in an untimed pass.
    """

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.before = self.peak = self.delta = None
        self._profile = None
        if self.device.type == "cuda":
            self.method = "torch.cuda.max_memory_allocated (allocator peak, stats reset before the block)"
        else:
            self.method = ("torch CPU allocator running total under torch.profiler(profile_memory=True): "
                           "peak above the block's start")

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.before = torch.cuda.memory_allocated(self.device)
        else:
            from torch.profiler import ProfilerActivity, profile

            self._profile = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            self._profile.__enter__()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
            self.delta = self.peak - self.before
            return False
        self._profile.__exit__(*exc)
        if exc[0] is None:
            self.delta = _profiled_cpu_peak(self._profile)
        self._profile = None
        return False


def _profiled_cpu_peak(prof) -> int | None:
    """Peak of the CPU allocator's running total during a profile, above its value before the first allocation."""
    try:
        from torch._C._profiler import _EventType

        stack = list(prof.profiler.kineto_results.experimental_event_tree())
        events = []
        while stack:
            node = stack.pop()
            stack.extend(node.children)
            if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
                events.append((node.start_time_ns, node.extra_fields.alloc_size, node.extra_fields.total_allocated))
    except (AttributeError, ImportError, RuntimeError):  # the profiler's event tree is not a public API
        return None
    if not events:
        return 0
    events.sort()
    start = events[0][2] - events[0][1]
    return max(0, max(total for _, _, total in events) - start)


class ProcessPeakRSS:
    """Peak resident set size of the whole process during a block (CPU runs; a context manager).

    Read from /proc/self/status (VmHWM), reset on entry by writing 5 to /proc/self/clear_refs; where that is
    refused, the never-reset `ru_maxrss` (then `method` says so). It counts the interpreter, libraries and
    memory the C allocator keeps after frees, so a model run after another one may show no growth at all:
    it is the process's footprint, not what the block allocated (see `AllocationPeak`).
    """

    def __init__(self):
        self.before = self.peak = None
        self.method = None

    def __enter__(self):
        gc.collect()
        resettable = _reset_rss_peak()
        self.method = ("process peak RSS: /proc/self/status VmHWM, reset via /proc/self/clear_refs" if resettable
                       else "process peak RSS: resource.getrusage ru_maxrss "
                            "(not resettable: peak over the whole process)")
        self.before = _rss_bytes()
        return self

    def __exit__(self, *exc):
        self.peak = _peak_rss_bytes()
        return False


def _proc_status(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        return None
    return None


def _reset_rss_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _proc_status("VmHWM") is not None
    except OSError:
        return False


def _rss_bytes() -> int:
    rss = _proc_status("VmRSS")
    return rss if rss is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _peak_rss_bytes() -> int:
    hwm = _proc_status("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@contextlib.contextmanager
def memory_probe(device: torch.device | str):
    """`AllocationPeak` of the block, and on CPU also `ProcessPeakRSS`; yields a dict filled on exit."""
    device = torch.device(device)
    result: dict = {}
    rss = ProcessPeakRSS() if device.type == "cpu" else contextlib.nullcontext()
    with rss, AllocationPeak(device) as alloc:
        yield result
    result.update({"alloc_method": alloc.method, "alloc_before_bytes": alloc.before, "alloc_peak_bytes": alloc.peak,
                   "alloc_peak_delta_bytes": alloc.delta})
    if device.type == "cpu":
        result.update({"process_method": rss.method, "process_peak_rss_bytes": rss.peak,
                       "process_rss_before_bytes": rss.before})


def supports_static_cache(net) -> bool:
    """Whether the model offers a preallocated cache: `new_cache(max_cache_len=...)`."""
    import inspect

    new_cache = getattr(net, "new_cache", None)
    if new_cache is None:
        return False
    try:
        return "max_cache_len" in inspect.signature(new_cache).parameters
    except (TypeError, ValueError):
        return False


def cache_with_context(net, ids: torch.Tensor, room: int, static: bool | None = None):
    """A cache holding the rows of a real prefill of `ids` (`[B, context]`), with room for `room` more tokens.

    Public API only. With a preallocated cache (`new_cache(max_cache_len=...)`, see `supports_static_cache`) the
    prefill runs into `new_cache(max_cache_len=context + room)`. Otherwise the prefill covers `context + room`
    tokens and `crop(context)` drops the last `room`: the dynamic cache keeps their capacity, so the next `room`
    decode steps write in place instead of growing (and copying) the buffers. Returns `(cache, prefill_s)`.
    """
    static = supports_static_cache(net) if static is None else static
    batch, context = ids.shape
    device = ids.device
    synchronize(device)
    start = time.perf_counter()
    with torch.no_grad():
        if static:
            cache = net.new_cache(max_cache_len=context + room)
            net(ids, cache=cache, use_cache=True, logits_to_keep=1)
        else:
            extra = torch.randint(1, net.config.vocab_size, (batch, room), device=device)
            cache = net(torch.cat([ids, extra], dim=1), use_cache=True, logits_to_keep=1).cache
            cache.crop(context)
    synchronize(device)
    return cache, time.perf_counter() - start
