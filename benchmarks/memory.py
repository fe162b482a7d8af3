"""Key/value memory of MELT against LoopLM (Ouro) and a standard transformer of the same shape.

    python -m benchmarks.memory --preset tiny|ouro-1.4b|ouro-2.6b [--contexts ...] [--loops ...] [--out-dir DIR]

What it reports (table on stdout, JSON + PNG under runs/benchmarks/ or --out-dir); each memory figure is
labelled with how it was obtained:
- KV bytes per token and at each context, for num_loops 1, 2, 4, 8, 16: ANALYTIC (layers x rows-per-layer x
  2 x kv_heads x head_dim x dtype bytes) next to HELD, `MeltCache.nbytes()` after a real forward of the
  prompt (batch 1, random weights): the cache's own count of rows held x row bytes (arithmetic, not an
  allocation), and ALLOCATED, `MeltCache.capacity_nbytes()`: the bytes of the cache's buffers, spare capacity
  included. The standard transformer runs one loop by definition, so it has one row per context (at num_loops
  1). Contexts that do not fit the device are left unmeasured (None).
- Memory of a real generation (prompt + `--gen-tokens` greedy tokens, `model.generate`) at the preset's loops,
  by the allocator (`common.AllocationPeak`): on CUDA `torch.cuda.max_memory_allocated` around the call (stats
  reset before it); on CPU the peak of bytes the CPU allocator handed out during the call, above its start
  (torch.profiler memory events), and, labelled as the process's figure, the peak resident set of the whole
  process (VmHWM), which also counts the interpreter and memory the C allocator keeps after frees.
- The published row (MELT_SPEC section 6): the Ouro-1.4B shape at 32,000 tokens ("32K" there: 0.786 MB x
  32,000 = 25.17 GB, decimal GB), 4 loops, bf16: analytic KV and weights + KV, next to the allocator-measured
  figures of a 32,000-token prefill plus a few decode steps (`context_memory`; only for `--preset ouro-1.4b`
  on a GPU) and the published ones.

The `tiny` preset's contexts are scaled down (32 .. 1024, i.e. 1K .. 32K / 32) so that every row is
measured on two CPU cores in seconds.
"""

from __future__ import annotations

import argparse
import gc

import matplotlib.ticker
import torch

from . import common

DEFAULT_LOOPS = (1, 2, 4, 8, 16)
DEFAULT_CONTEXTS = {
    "tiny": (32, 64, 128, 256, 512, 1024),
    "gpu": (1024, 2048, 4096, 8192, 16384, 32768, 65536),
    "cpu": (1024, 2048, 4096, 8192, 16384, 32768),
}
DEFAULT_GENERATION = {"tiny": (512, 32), "big": (4096, 128)}  # (prompt tokens, new tokens)


def parse_tokens(text: str) -> int:
    """'4096', '4K', '32k' -> tokens (K = 1024)."""
    text = text.strip().lower()
    return int(text[:-1]) * 1024 if text.endswith("k") else int(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny", choices=sorted(common.PRESETS))
    parser.add_argument("--contexts", nargs="+", type=parse_tokens, help="context lengths (e.g. 1K 4K 32K)")
    parser.add_argument("--loops", nargs="+", type=int, default=list(DEFAULT_LOOPS), help="num_loops values")
    parser.add_argument("--gen-context", type=parse_tokens, help="prompt tokens of the generation run")
    parser.add_argument("--gen-tokens", type=int, help="tokens decoded in the generation run")
    parser.add_argument("--device", help="cpu | cuda (default: cuda when available)")
    parser.add_argument("--out-dir", help="directory for the JSON and PNG (default runs/benchmarks; committed results: "
                        "benchmarks/results)")
    parser.add_argument("--no-published", action="store_true", help="skip the Ouro-1.4B published-row measurement")
    return parser


# -- measurement ------------------------------------------------------------------------------------------------


def _fits(device: torch.device, needed_bytes: float) -> bool:
    """Whether `needed_bytes` more can be allocated (CUDA: 85% of free memory; CPU: always)."""
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    return needed_bytes < 0.85 * free


def measure_kv(net, context: int, num_loops: int, device: torch.device) -> dict | None:
    """Cache bytes after a real forward of `context` random tokens (batch 1); None when it does not fit."""
    ids = torch.randint(0, net.config.vocab_size, (1, context), device=device)
    try:
        with torch.no_grad():
            out = net(ids, use_cache=True, num_loops=num_loops, logits_to_keep=1)
        cache = out.cache
        result = {"nbytes": cache.nbytes(), "capacity_nbytes": cache.capacity_nbytes(),
                  "tokens": cache.get_seq_length()}
    except torch.OutOfMemoryError:
        result = None
    del ids
    _release(device)
    return result


def _release(device: torch.device) -> None:
    """Return freed blocks to the device between measurements (CUDA only: on CPU a gc pass costs more than it frees)."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


def kv_sweep(net, model: str, preset: str, contexts, loops, device: torch.device, dtype: torch.dtype) -> list[dict]:
    """One row per (num_loops, context) of `model` (`net`): analytic and measured KV bytes."""
    rows = []
    kwargs = common.model_kwargs(preset, model)
    for num_loops in [common.loops_of(model, 1)] if model == "standard" else list(loops):
        per_token = common.kv_bytes_per_token(kwargs, num_loops, dtype)
        for context in contexts:
            analytic = per_token * context
            measured = measure_kv(net, context, num_loops, device) if _fits(device, 2 * analytic) else None
            rows.append({
                "model": model,
                "num_loops": num_loops,
                "context": context,
                "analytic_bytes_per_token": per_token,
                "analytic_bytes": analytic,
                "measured_bytes": None if measured is None else measured["nbytes"],
                "measured_capacity_bytes": None if measured is None else measured["capacity_nbytes"],
                "measured_bytes_per_token": None if measured is None else measured["nbytes"] / context,
            })
    return rows


def generation_peak(net, model: str, preset: str, prompt: int, new_tokens: int, device: torch.device,
                    dtype: torch.dtype) -> dict:
    """Memory of `net.generate` (greedy, exactly `new_tokens` tokens) on a `prompt`-token random prompt."""
    weights = sum(p.numel() * p.element_size() for p in net.parameters())
    ids = torch.randint(1, net.config.vocab_size, (1, prompt), device=device)
    num_loops = net.config.num_loops
    # The cache holds prompt + new_tokens - 1 tokens: the last generated token is never fed back.
    kv_per_token = common.kv_bytes_per_token(common.model_kwargs(preset, model), num_loops, dtype)
    analytic_kv = kv_per_token * (prompt + new_tokens - 1)
    row = {"model": model, "num_loops": num_loops, "prompt_tokens": prompt, "new_tokens": new_tokens,
           "weights_bytes": weights, "analytic_kv_bytes": analytic_kv}
    try:
        with torch.no_grad(), common.memory_probe(device) as probe:
            out = net.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                               eos_token_id=None, pad_token_id=0, use_cache=True, return_dict_in_generate=True)
        cache = out.cache
        row.update({"cache_nbytes": cache.nbytes(), "cache_capacity_nbytes": cache.capacity_nbytes(), **probe})
    except torch.OutOfMemoryError:
        row.update({"cache_nbytes": None, "cache_capacity_nbytes": None, "alloc_peak_delta_bytes": None, "oom": True})
    return row


def context_memory(net, context: int, decode_tokens: int, device: torch.device, batch: int = 1,
                   static: bool | None = None) -> dict:
    """Memory of a `context`-token prefill then `decode_tokens` one-token steps (`batch` sequences), by the allocator.

    The cache is the model's preallocated one (`new_cache(max_cache_len=context + decode_tokens)`) where the model
    offers it (`common.supports_static_cache`), else the dynamic cache the forward creates. Reports, after each
    stage: the cache's rows held (`nbytes`, arithmetic) and its buffers (`capacity_nbytes`); the allocator's peak
    during the stage (`common.AllocationPeak`); on CUDA also `memory_allocated` after it (weights + cache + what
    the step keeps). An out-of-memory error ends the measurement with `oom` naming the stage.
    """
    static = common.supports_static_cache(net) if static is None else static
    weights = sum(p.numel() * p.element_size() for p in net.parameters())
    row = {"context": context, "decode_tokens": decode_tokens, "batch": batch, "num_loops": net.config.num_loops,
           "cache_mode": net.config.cache_mode,
           "cache": "preallocated (new_cache(max_cache_len))" if static else "dynamic",
           "weights_bytes": weights, "oom": None}
    if device.type == "cuda":
        row["allocated_before_bytes"] = torch.cuda.memory_allocated(device)
    ids = torch.randint(1, net.config.vocab_size, (batch, context), device=device)
    stage = "prefill"
    try:
        with torch.no_grad():
            with common.memory_probe(device) as probe:
                cache = net.new_cache(max_cache_len=context + decode_tokens) if static else None
                out = net(ids, cache=cache, use_cache=True, logits_to_keep=1)
                cache = out.cache
            row["prefill"] = {**probe, **_cache_state(cache, device)}
            stage = "decode"
            token = out.logits[:, -1:].argmax(-1)
            del out
            with common.memory_probe(device) as probe:
                for _ in range(decode_tokens):
                    token = net(token, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
            row["decode"] = {**probe, **_cache_state(cache, device)}
    except torch.OutOfMemoryError as error:
        row["oom"] = f"{stage}: {str(error).splitlines()[0]}"
    finally:
        del ids
        _release(device)
    return row


def _cache_state(cache, device: torch.device) -> dict:
    state = {"cache_tokens": cache.get_seq_length(), "cache_nbytes": cache.nbytes(),
             "cache_capacity_nbytes": cache.capacity_nbytes()}
    if device.type == "cuda":
        state["allocated_after_bytes"] = torch.cuda.memory_allocated(device)
    return state


def published_row(device: torch.device, preset: str, measure: bool, decode_tokens: int = 4) -> list[dict]:
    """The Ouro-1.4B shape at 32,000 tokens, 4 loops, bf16: analytic | allocator-measured (GPU) | published."""
    rows = []
    dtype = torch.bfloat16
    for model in ("melt", "looplm"):
        kwargs = common.model_kwargs("ouro-1.4b", model)
        kv = common.kv_bytes_per_token(kwargs, 4, dtype) * common.PUBLISHED_CONTEXT
        weights = common.parameter_count("ouro-1.4b", model) * 2
        row = {
            "model": model,
            "shape": "ouro-1.4b",
            "context": common.PUBLISHED_CONTEXT,
            "num_loops": 4,
            "analytic_kv_gb": kv / 1e9,
            "analytic_weights_gb": weights / 1e9,
            "analytic_total_gb": (kv + weights) / 1e9,
            "held_kv_gb": None,
            "allocated_kv_gb": None,
            "allocated_total_gb": None,
            "alloc_peak_gb": None,
            "published_kv_gb": common.PUBLISHED_GB[model]["kv_gb"],
            "published_total_gb": common.PUBLISHED_GB[model]["total_gb"],
            "published_model": common.PUBLISHED_GB[model]["model"],
        }
        if measure and device.type == "cuda" and preset == "ouro-1.4b" and _fits(device, kv + weights):
            net = common.build_model("ouro-1.4b", model, device=device, dtype=dtype)
            row["measurement"] = measured = context_memory(net, common.PUBLISHED_CONTEXT, decode_tokens, device)
            row.update(published_comparison(measured))
            del net
            _release(device)
        rows.append(row)
    return rows


def published_comparison(measured: dict) -> dict:
    """GB figures of a `context_memory` row (CUDA) in the published table's terms (GB = 1e9 bytes).

    held_kv_gb: `nbytes()` (arithmetic); allocated_kv_gb: `capacity_nbytes()` (the buffers); allocated_total_gb:
    `torch.cuda.memory_allocated` after prefill + decode (weights + cache + what the step keeps); alloc_peak_gb:
    `torch.cuda.max_memory_allocated` over prefill and decode.
    """
    last = measured.get("decode") or measured.get("prefill") or {}
    peaks = [stage["alloc_peak_bytes"] for stage in (measured.get("prefill"), measured.get("decode"))
             if stage and stage.get("alloc_peak_bytes") is not None]
    gb = lambda v: None if v is None else v / 1e9  # noqa: E731
    after = "prefill + decode" if measured.get("decode") else "prefill only" if measured.get("prefill") else None
    return {"held_kv_gb": gb(last.get("cache_nbytes")), "allocated_kv_gb": gb(last.get("cache_capacity_nbytes")),
            "allocated_total_gb": gb(last.get("allocated_after_bytes")),
            "alloc_peak_gb": gb(max(peaks) if peaks else None), "after": after, "oom": measured.get("oom")}


# -- reporting -----------------------------------------------------------------------------------------------------


def summarize(rows: list[dict], loops) -> dict:
    """Per-model checks the goals are judged on: MELT constant in loops, LoopLM linear, standard = MELT per token."""
    def per_token(model, num_loops, key):
        values = {r[key] for r in rows if r["model"] == model and r["num_loops"] == num_loops and r[key] is not None}
        return values.pop() if len(values) == 1 else None

    melt = [per_token("melt", t, "measured_bytes_per_token") for t in loops]
    loop = [per_token("looplm", t, "measured_bytes_per_token") for t in loops]
    melt_known = [m for m in melt if m is not None]
    summary = {
        "melt_measured_bytes_per_token_by_loops": dict(zip(map(str, loops), melt)),
        "looplm_measured_bytes_per_token_by_loops": dict(zip(map(str, loops), loop)),
        "melt_kv_max_relative_spread_over_loops": (
            (max(melt_known) - min(melt_known)) / min(melt_known) if melt_known else None),
        "looplm_over_melt_bytes_by_loops": {
            str(t): (looplm_bytes / melt_bytes if looplm_bytes is not None and melt_bytes else None)
            for t, melt_bytes, looplm_bytes in zip(loops, melt, loop)},
        "standard_measured_bytes_per_token": per_token("standard", 1, "measured_bytes_per_token"),
    }
    summary["goal_melt_kv_constant_within_1pct"] = (
        None if summary["melt_kv_max_relative_spread_over_loops"] is None
        else summary["melt_kv_max_relative_spread_over_loops"] <= 0.01)
    return summary


def _unit(rows) -> tuple[float, str]:
    biggest = max(r["analytic_bytes"] for r in rows)
    return (1e9, "GB") if biggest >= 1e9 else (2**20, "MiB")


def plot(rows: list[dict], loops, fixed_loops: int, fixed_context: int, title: str):
    fig, axes = common.new_figure(ncols=2)
    ax_ctx, ax_loops = axes[0]
    scale, unit = _unit(rows)
    for model in common.MODELS:
        model_loops = 1 if model == "standard" else fixed_loops
        sel = sorted((r for r in rows if r["model"] == model and r["num_loops"] == model_loops),
                     key=lambda r: r["context"])
        label = f"{common.MODEL_LABELS[model]}, {model_loops} loop{'s' if model_loops > 1 else ''}"
        color = common.MODEL_COLORS[model]
        # The standard model's bytes equal MELT's: dashed line and crosses so that both stay visible.
        line, marker, size = ("--", "x", 6) if model == "standard" else ("-", "o", 8)
        ax_ctx.plot([r["context"] for r in sel], [r["analytic_bytes"] / scale for r in sel], line, color=color,
                    label=f"{label} (analytic)")
        meas = [r for r in sel if r["measured_bytes"] is not None]
        ax_ctx.plot([r["context"] for r in meas], [r["measured_bytes"] / scale for r in meas], marker, color=color,
                    mfc="none", ms=size, label=f"{label} (measured)")
    ax_ctx.set_xscale("log", base=2)
    ax_ctx.set_yscale("log", base=2)
    ax_ctx.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x:g}"))
    ax_ctx.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda y, _: f"{y:g}"))
    ax_ctx.set_xlabel("context (tokens)")
    ax_ctx.set_ylabel(f"KV cache ({unit}), batch 1")
    ax_ctx.set_title(f"KV cache vs context at {fixed_loops} loops")
    ax_ctx.grid(True, which="both", alpha=0.3)
    ax_ctx.legend(fontsize=7)

    for model in common.MODELS:
        color = common.MODEL_COLORS[model]
        sel = sorted((r for r in rows if r["model"] == model and r["context"] == fixed_context),
                     key=lambda r: r["num_loops"])
        if model == "standard":
            if sel:
                ax_loops.axhline(sel[0]["analytic_bytes"] / scale, color=color, ls="--",
                                 label=f"{common.MODEL_LABELS[model]} (always 1 loop)")
            continue
        ax_loops.plot([r["num_loops"] for r in sel], [r["analytic_bytes"] / scale for r in sel], "-", color=color,
                      label=f"{common.MODEL_LABELS[model]} (analytic)")
        meas = [r for r in sel if r["measured_bytes"] is not None]
        ax_loops.plot([r["num_loops"] for r in meas], [r["measured_bytes"] / scale for r in meas], "o", color=color,
                      mfc="none", ms=8, label=f"{common.MODEL_LABELS[model]} (measured)")
    ax_loops.set_xticks(list(loops))
    ax_loops.set_xlabel("num_loops")
    ax_loops.set_ylabel(f"KV cache ({unit}), batch 1")
    ax_loops.set_ylim(bottom=0)
    ax_loops.set_title(f"KV cache vs num_loops at {fixed_context} tokens")
    ax_loops.grid(True, alpha=0.3)
    ax_loops.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    return fig


def print_report(payload: dict) -> None:
    rows, loops = payload["kv_rows"], payload["loops"]
    largest = max(payload["contexts"])
    per_token_rows = [
        {**r, "looplm_over_melt": payload["summary"]["looplm_over_melt_bytes_by_loops"].get(str(r["num_loops"]))
         if r["model"] == "looplm" else None}
        for r in rows if r["context"] == largest
    ]
    common.print_table(
        per_token_rows,
        ["model", "num_loops", "analytic_bytes_per_token", "measured_bytes_per_token", "looplm_over_melt"],
        ["model", "loops", "analytic B/token", "held B/token (nbytes)", "LoopLM / MELT"],
        title=f"KV bytes per token (held at {largest} tokens, batch 1, {payload['dtype']})")
    fixed = payload["fixed_loops"]
    ctx_rows = [{**r, "analytic": common.human_bytes(r["analytic_bytes"]),
                 "held": common.human_bytes(r["measured_bytes"]),
                 "allocated": common.human_bytes(r.get("measured_capacity_bytes")),
                 "match": None if r["measured_bytes"] is None else r["measured_bytes"] == r["analytic_bytes"]}
                for r in rows if r["num_loops"] == (1 if r["model"] == "standard" else fixed)]
    common.print_table(ctx_rows, ["model", "num_loops", "context", "analytic", "held", "match", "allocated"],
                       ["model", "loops", "context", "analytic", "held (nbytes)", "held = analytic",
                        "allocated (capacity_nbytes)"],
                       title=f"KV cache by context ({fixed} loops; standard: 1); "
                             "every (model, loops, context) row is in the JSON")
    common.print_memory_table(
        [{**r, "analytic_kv": common.human_bytes(r["analytic_kv_bytes"]),
          "weights": common.human_bytes(r["weights_bytes"])}
         for r in payload["generation"]],
        ["model", "num_loops", "prompt_tokens", "new_tokens", "weights", "analytic_kv", "held", "allocated",
         "alloc_delta"],
        ["model", "loops", "prompt", "new", "weights", "KV analytic", "KV held (nbytes)", "KV allocated (capacity)",
         "allocator peak - before"], title="Memory of a generation")
    common.print_table(payload["published"],
                       ["model", "context", "num_loops", "analytic_kv_gb", "held_kv_gb", "allocated_kv_gb",
                        "published_kv_gb", "analytic_total_gb", "allocated_total_gb", "alloc_peak_gb",
                        "published_total_gb"],
                       ["model", "tokens", "loops", "KV analytic GB", "KV held GB", "KV allocated GB",
                        "KV published GB", "total analytic GB", "total allocated GB", "allocator peak GB",
                        "total published GB"],
                       title="Ouro-1.4B shape, bf16, 32,000 tokens (published row, MELT_SPEC section 6; "
                             "allocator-measured on GPU only: memory_allocated after prefill + decode, "
                             "max_memory_allocated over both)")
    s = payload["summary"]
    print(f"MELT KV spread over loops {loops}: {s['melt_kv_max_relative_spread_over_loops']}  "
          f"(goal <= 1%: {s['goal_melt_kv_constant_within_1pct']}); "
          f"standard B/token {s['standard_measured_bytes_per_token']}")


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    device = common.pick_device(args.device)
    preset = args.preset
    dtype = common.PRESET_DTYPES[preset]
    if args.contexts:
        contexts = sorted(set(args.contexts))
    elif preset == "tiny":
        contexts = DEFAULT_CONTEXTS["tiny"]
    else:
        contexts = DEFAULT_CONTEXTS["gpu" if device.type == "cuda" else "cpu"]
    loops = sorted(set(args.loops))
    gen_prompt, gen_new = DEFAULT_GENERATION["tiny" if preset == "tiny" else "big"]
    gen_prompt = args.gen_context or gen_prompt
    gen_new = args.gen_tokens or gen_new
    fixed_loops = common.PRESETS[preset]["num_loops"]

    rows, generation = [], []
    for model in common.MODELS:
        net = common.build_model(preset, model, device=device, dtype=dtype)
        rows += kv_sweep(net, model, preset, contexts, loops, device, dtype)
        generation.append(generation_peak(net, model, preset, gen_prompt, gen_new, device, dtype))
        del net
        _release(device)
    payload = {
        "benchmark": "memory",
        "preset": preset,
        "config": common.PRESETS[preset],
        "dtype": str(dtype).replace("torch.", ""),
        "machine": common.machine_info(device),
        "contexts": list(contexts),
        "loops": loops,
        "fixed_loops": fixed_loops,
        "kv_rows": rows,
        "summary": summarize(rows, loops),
        "generation": generation,
        "published": published_row(device, preset, measure=not args.no_published),
        "notes": {
            "standard": "the standard transformer runs 1 loop by definition: one row per context, at num_loops 1",
            "published_context": "MELT_SPEC section 6 '32K' = 32,000 tokens, GB = 1e9 bytes",
            "measured_bytes": "held: MeltCache.nbytes() after a real forward (batch 1, random weights), the cache's "
                              "own arithmetic (rows held x row bytes), not an allocation; None = did not fit",
            "measured_capacity_bytes": "allocated buffers: MeltCache.capacity_nbytes(), spare capacity included",
            "generation": "alloc_*: measured by the allocator (see alloc_method); "
                          "process_*: the whole process's peak RSS",
        },
    }
    json_path, png_path = common.result_paths("memory", preset, device, args.out_dir)
    fixed_context = max(c for c in contexts if any(
        r["context"] == c and r["measured_bytes"] is not None for r in rows)) if any(
        r["measured_bytes"] is not None for r in rows) else max(contexts)
    title = (f"MELT vs LoopLM vs standard, {preset} shape ({payload['dtype']}), {payload['machine']['device_name']}")
    payload["files"] = {"json": str(json_path), "png": str(png_path)}
    common.write_json(json_path, payload)
    common.write_figure(png_path, plot(rows, loops, fixed_loops, fixed_context, title))
    print_report(payload)
    print(f"wrote {json_path}\nwrote {png_path}")
    return payload


if __name__ == "__main__":
    main()
