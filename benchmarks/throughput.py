"""Speed of MELT against LoopLM (Ouro) and a standard transformer of the same shape.

    python -m benchmarks.throughput --preset tiny|ouro-1.4b|ouro-2.6b [--budget-gb G] [--out-dir DIR]

What it reports (table on stdout, JSON + PNG under runs/benchmarks/ or --out-dir); every time is the median
of `--repeats` calls after `--warmup` untimed ones, bracketed by `torch.cuda.synchronize` on a GPU:
- Decode tokens/s at batch 1, 8, 64 (one token per sequence per step, `--decode-steps` steps) after a
  `--decode-context`-token prefix, built through the public API only (`common.cache_with_context`): a real
  prefill into the model's preallocated cache (`new_cache(max_cache_len=...)`) where it offers one, else a
  prefill of context + steps tokens cropped back to the context (`cache.crop`), so the timed steps write into
  capacity that exists and never regrow the cache. Beside each rate, the cache's rows held (`nbytes()`,
  arithmetic) and buffers (`capacity_nbytes()`), and the memory of the prefill + decode steps measured by the
  allocator in a separate untimed pass (`common.memory_probe`: `torch.cuda.max_memory_allocated` on a GPU; on
  CPU the CPU allocator's peak above the start, plus the process's peak RSS, labelled as such).
- Prefill tokens/s: MELT with chunk sizes 1, 64, 500, 2000 (chunks run one after another) against
  LoopLM's parallel prefill (one pass over the prompt per loop) and the standard transformer. Chunk 1
  runs a shorter prompt (`--prefill-tokens-chunk1`), since it is one sequential round per token.
- The largest batch that fits `--budget-gb` at a 32K context, per model: analytic, from
  `weights + batch x KV(32K tokens)` (activations of one decode step are small beside the cache and are
  left out), verified on a GPU by a real prefill of that batch and two decode steps, whose
  `torch.cuda.max_memory_allocated` must stay within the budget, and the decode throughput at that batch.
- Training-step time (forward + backward of the LM loss, `--train-chunk` chunk, `--train-tokens` tokens)
  for MELT against LoopLM and the standard transformer.
- The goals, as ratios from this run (judged on a GPU; never asserted here): MELT KV constant in loops
  within 1%, decode tokens/s at batch 1 >= 0.95x LoopLM, max batch at the budget >= 3.5x LoopLM at 4
  loops, training step <= 2x LoopLM.
The `tiny` preset uses smaller prompts, sequences and a 2,048-token budget context on a CPU (a real prefill of
the max batch at 32K would take minutes there); the structure of the report is the same.
"""

from __future__ import annotations

import argparse
import gc

import torch

from . import common
from .memory import parse_tokens

# Per preset family: tiny (CPU) and the Ouro shapes (GPU).
DEFAULTS = {
    "tiny": dict(decode_context=128, decode_steps=4, prefill_tokens=256, prefill_tokens_chunk1=48,
                 train_tokens=1000, train_chunk=500, budget_gb=0.05, budget_context=2048, warmup=1, repeats=3),
    "big": dict(decode_context=2048, decode_steps=16, prefill_tokens=8192, prefill_tokens_chunk1=128,
                train_tokens=10_000, train_chunk=500, budget_gb=80.0, budget_context=32_768, warmup=2, repeats=5),
}
DECODE_BATCHES = (1, 8, 64)
CHUNK_SIZES = (1, 64, 500, 2000)
GOALS = {
    "melt_kv_spread_over_loops": ("<=", 0.01),
    "decode_b1_melt_over_looplm": (">=", 0.95),
    "max_batch_melt_over_looplm": (">=", 3.5),
    "train_step_melt_over_looplm": ("<=", 2.0),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.throughput", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny", choices=sorted(common.PRESETS))
    parser.add_argument("--device", help="cpu | cuda (default: cuda when available)")
    parser.add_argument("--out-dir", help="directory for the JSON and PNG (default runs/benchmarks; committed results: "
                        "benchmarks/results)")
    parser.add_argument("--batches", nargs="+", type=int, default=list(DECODE_BATCHES), help="decode batch sizes")
    parser.add_argument("--chunk-sizes", nargs="+", type=int, default=list(CHUNK_SIZES),
                        help="MELT prefill chunk sizes")
    parser.add_argument("--decode-context", type=parse_tokens)
    parser.add_argument("--decode-steps", type=int)
    parser.add_argument("--prefill-tokens", type=parse_tokens)
    parser.add_argument("--prefill-tokens-chunk1", type=parse_tokens)
    parser.add_argument("--train-tokens", type=parse_tokens)
    parser.add_argument("--train-chunk", type=int)
    parser.add_argument("--budget-gb", type=float, help="memory budget (1e9 bytes) for the max-batch row")
    parser.add_argument("--budget-context", type=parse_tokens, help="context of the max-batch row (tiny 2K, else 32K)")
    parser.add_argument("--max-batch-cap", type=int, default=256,
                        help="largest batch actually run for the max-batch throughput "
                             "(the analytic batch is reported uncapped)")
    parser.add_argument("--grad-checkpointing", action="store_true", help="checkpoint layers in the training step")
    parser.add_argument("--warmup", type=int)
    parser.add_argument("--repeats", type=int)
    return parser


# -- pieces -------------------------------------------------------------------------------------------------------


def decode_rate(net, batch: int, context: int, steps: int, device: torch.device, warmup: int, repeats: int,
                measure_memory: bool = True) -> dict:
    """Decode tokens/s: `steps` one-token steps of `batch` sequences after `context` cached tokens.

    The context is a real prefill (`common.cache_with_context`, public cache API only); every timed call starts
    from it again (`cache.crop(context)`, untimed). Memory is measured in a separate untimed pass.
    """
    ids = torch.randint(1, net.config.vocab_size, (batch, context), device=device)
    cache, prefill_s = common.cache_with_context(net, ids, steps)
    del ids
    start = torch.randint(1, net.config.vocab_size, (batch, 1), device=device)

    def run():
        token = start
        for _ in range(steps):
            out = net(token, cache=cache, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)

    row = {"context_prefill_s": prefill_s, "cache": "preallocated" if common.supports_static_cache(net) else "dynamic"}
    with torch.no_grad():
        if measure_memory:
            with common.memory_probe(device) as probe:
                run()
            row.update(probe)
            row.update({"cache_nbytes": cache.nbytes(), "cache_capacity_nbytes": cache.capacity_nbytes()})
        timing = common.time_call(run, device, warmup, repeats, setup=lambda: cache.crop(context))
    return {"tokens_per_s": batch * steps / timing["median_s"], "step_ms": 1e3 * timing["median_s"] / steps,
            **row, **timing}


def prefill_rate(net, tokens: int, device: torch.device, warmup: int, repeats: int) -> dict:
    ids = torch.randint(1, net.config.vocab_size, (1, tokens), device=device)
    with torch.no_grad():
        timing = common.time_call(lambda: net(ids, use_cache=True, logits_to_keep=1), device, warmup, repeats)
    return {"tokens_per_s": tokens / timing["median_s"], **timing}


def train_step_time(net, tokens: int, device: torch.device, warmup: int, repeats: int) -> dict:
    ids = torch.randint(1, net.config.vocab_size, (1, tokens), device=device)
    net.train()

    def step():
        net.zero_grad(set_to_none=True)
        net(ids, labels=ids, use_cache=False).loss.backward()

    timing = common.time_call(step, device, warmup, repeats)
    net.zero_grad(set_to_none=True)
    net.eval()
    return {"tokens_per_s": tokens / timing["median_s"], **timing}


def max_batch(preset: str, model: str, budget_bytes: float, context: int, dtype: torch.dtype) -> dict:
    weights = common.parameter_count(preset, model) * torch.empty(0, dtype=dtype).element_size()
    kwargs = common.model_kwargs(preset, model)
    per_seq = common.kv_bytes_per_token(kwargs, kwargs["num_loops"], dtype) * context
    batch = max(0, int((budget_bytes - weights) // per_seq))
    return {"model": model, "num_loops": kwargs["num_loops"], "context": context, "weights_bytes": weights,
            "kv_bytes_per_sequence": per_seq, "max_batch_analytic": batch}


def _guard(fn, *args, **kwargs) -> dict:
    """Run a measurement; an out-of-memory error becomes a row saying so instead of ending the run."""
    try:
        return fn(*args, **kwargs)
    except torch.OutOfMemoryError as error:
        return {"tokens_per_s": None, "oom": True, "error": str(error).splitlines()[0]}
    finally:
        if torch.cuda.is_available():
            gc.collect()
            torch.cuda.empty_cache()


# -- the run --------------------------------------------------------------------------------------------------------


def run(args, device: torch.device) -> dict:
    preset = args.preset
    dtype = common.PRESET_DTYPES[preset]
    opts = dict(DEFAULTS["tiny" if preset == "tiny" else "big"])
    for key in opts:
        if getattr(args, key, None) is not None:
            opts[key] = getattr(args, key)
    warmup, repeats = opts["warmup"], opts["repeats"]
    budget_context = opts["budget_context"]
    budget_bytes = opts["budget_gb"] * 1e9

    decode, prefill, train, batch_rows, kv_loops = [], [], [], [], []
    for model in common.MODELS:
        net = common.build_model(preset, model, device=device, dtype=dtype)
        if model == common.MODELS[0]:
            # Untimed process warm-up (lazy kernel and thread-pool set-up), else the first model measured pays it:
            # on CPU the first second of decode steps ran ~10x slower than the same steps later.
            _guard(decode_rate, net, 1, opts["decode_context"], opts["decode_steps"], device, 2 * warmup + 2, 1,
                   measure_memory=False)
        loops = net.config.num_loops
        for batch in args.batches:
            row = _guard(decode_rate, net, batch, opts["decode_context"], opts["decode_steps"], device, warmup, repeats)
            decode.append({"model": model, "num_loops": loops, "batch": batch, "context": opts["decode_context"],
                           **row})

        if model == "melt":
            for chunk in args.chunk_sizes:
                tokens = opts["prefill_tokens_chunk1"] if chunk == 1 else opts["prefill_tokens"]
                net.config.chunk_size = chunk  # read by every forward: one model, several chunkings
                row = _guard(prefill_rate, net, tokens, device, warmup, repeats)
                prefill.append({"model": model, "mode": f"chunk {chunk}", "chunk_size": chunk, "tokens": tokens, **row})
            net.config.chunk_size = opts["train_chunk"]
            # KV bytes of one short forward per num_loops: the "constant in loops" goal, measured.
            ids = torch.randint(1, net.config.vocab_size, (1, 64), device=device)
            with torch.no_grad():
                for t in (1, 2, 4, 8, 16):
                    kv_loops.append({"num_loops": t, "nbytes": net(ids, num_loops=t, logits_to_keep=1).cache.nbytes()})
        else:
            row = _guard(prefill_rate, net, opts["prefill_tokens"], device, warmup, repeats)
            prefill.append({"model": model, "mode": "parallel", "chunk_size": None, "tokens": opts["prefill_tokens"],
                            **row})

        if args.grad_checkpointing:
            net.gradient_checkpointing_enable()
        row = _guard(train_step_time, net, opts["train_tokens"], device, warmup, repeats)
        train.append({"model": model, "num_loops": loops, "tokens": opts["train_tokens"],
                      "chunk_size": opts["train_chunk"] if model == "melt" else None, **row})

        fit = max_batch(preset, model, budget_bytes, budget_context, dtype)
        run_batch = min(fit["max_batch_analytic"], args.max_batch_cap)
        fit["batch_run"] = run_batch
        fit["verified_on_device"] = None
        if run_batch > 0:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            # Prefill and decode of the whole batch under the allocator's peak statistics.
            row = _guard(decode_rate, net, run_batch, budget_context, 2, device, 1, max(1, repeats - 2),
                         measure_memory=False)
            fit["decode_tokens_per_s"] = row.get("tokens_per_s")
            fit["decode_step_ms"] = row.get("step_ms")
            if device.type == "cuda":
                peak = torch.cuda.max_memory_allocated(device)
                fit["device_peak_bytes"] = peak
                fit["device_peak_method"] = "torch.cuda.max_memory_allocated over prefill + decode of the batch"
                fit["verified_on_device"] = not row.get("oom", False) and peak <= budget_bytes
        batch_rows.append(fit)
        del net
        if device.type == "cuda":
            gc.collect()
            torch.cuda.empty_cache()

    return {"options": {**opts, "batches": args.batches, "chunk_sizes": args.chunk_sizes,
                        "grad_checkpointing": args.grad_checkpointing},
            "decode": decode, "prefill": prefill, "train": train, "max_batch": batch_rows, "melt_kv_by_loops": kv_loops}


def goals(result: dict) -> dict:
    def pick(rows, **match):
        for r in rows:
            if all(r.get(k) == v for k, v in match.items()):
                return r
        return {}

    def ratio(a, b):
        return a / b if a is not None and b else None

    kv = [r["nbytes"] for r in result["melt_kv_by_loops"]]
    values = {
        "melt_kv_spread_over_loops": (max(kv) - min(kv)) / min(kv) if kv else None,
        "decode_b1_melt_over_looplm": ratio(pick(result["decode"], model="melt", batch=1).get("tokens_per_s"),
                                            pick(result["decode"], model="looplm", batch=1).get("tokens_per_s")),
        "max_batch_melt_over_looplm": ratio(pick(result["max_batch"], model="melt").get("max_batch_analytic"),
                                            pick(result["max_batch"], model="looplm").get("max_batch_analytic")),
        "train_step_melt_over_looplm": ratio(pick(result["train"], model="melt").get("median_s"),
                                             pick(result["train"], model="looplm").get("median_s")),
    }
    out = {}
    for name, value in values.items():
        op, target = GOALS[name]
        met = None if value is None else (value <= target if op == "<=" else value >= target)
        out[name] = {"value": value, "target": f"{op} {target}", "met": met}
    return out


def plot(result: dict, title: str):
    fig, axes = common.new_figure(ncols=2, nrows=2, width=5.5, height=3.8)
    (ax_dec, ax_pre), (ax_batch, ax_train) = axes
    for model in common.MODELS:
        rows = [r for r in result["decode"] if r["model"] == model and r.get("tokens_per_s")]
        ax_dec.plot([r["batch"] for r in rows], [r["tokens_per_s"] for r in rows], "o-",
                    color=common.MODEL_COLORS[model], label=common.MODEL_LABELS[model])
    ax_dec.set_xscale("log", base=2)
    ax_dec.set_yscale("log")
    ax_dec.set_xlabel("batch")
    ax_dec.set_ylabel("decode tokens/s")
    ax_dec.set_title(f"decode after {result['options']['decode_context']} tokens")
    ax_dec.grid(True, which="both", alpha=0.3)
    ax_dec.legend(fontsize=7)

    def bars(ax, labels, values, colors, ylabel, text):
        xs = range(len(labels))
        ax.bar(xs, [v or 0 for v in values], color=colors)
        ax.set_xticks(list(xs), labels, fontsize=7, rotation=20)
        ax.set_ylabel(ylabel)
        ax.set_title(text)
        for x, v in zip(xs, values):
            ax.annotate("OOM" if v is None else f"{v:.3g}", (x, v or 0), ha="center", va="bottom", fontsize=7)
        ax.grid(True, axis="y", alpha=0.3)

    pre = result["prefill"]
    bars(ax_pre, [f"{'MELT' if r['model'] == 'melt' else r['model']}\n{r['mode']}" for r in pre],
         [r.get("tokens_per_s") for r in pre], [common.MODEL_COLORS[r["model"]] for r in pre], "prefill tokens/s",
         "prefill (MELT by chunk size)")
    mb = result["max_batch"]
    bars(ax_batch, [f"{r['model']}\n{r['num_loops']} loop(s)" for r in mb], [r["max_batch_analytic"] for r in mb],
         [common.MODEL_COLORS[r["model"]] for r in mb], "max batch",
         f"max batch in {result['options']['budget_gb']:g} GB at {result['options']['budget_context']} tokens")
    tr = result["train"]
    bars(ax_train, [r["model"] for r in tr], [r.get("median_s") for r in tr],
         [common.MODEL_COLORS[r["model"]] for r in tr], "seconds per step",
         f"train step (fwd+bwd), {result['options']['train_tokens']} tokens, MELT chunk "
         f"{result['options']['train_chunk']}")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def print_report(payload: dict) -> None:
    r = payload["result"]
    common.print_memory_table(
        r["decode"],
        ["model", "num_loops", "batch", "context", "tokens_per_s", "step_ms", "held", "allocated", "alloc_delta"],
        ["model", "loops", "batch", "context", "tokens/s", "ms/step", "KV held (nbytes)", "KV allocated (capacity)",
         "allocator peak - before"], title="Decode", context="memory of the decode steps, untimed pass")
    common.print_table(r["prefill"], ["model", "mode", "tokens", "tokens_per_s", "median_s"],
                       ["model", "prefill", "tokens", "tokens/s", "median s"], title="Prefill")
    common.print_table(r["max_batch"], ["model", "num_loops", "context", "kv_bytes_per_sequence", "weights_bytes",
                                        "max_batch_analytic", "batch_run", "decode_tokens_per_s", "verified_on_device"],
                       ["model", "loops", "context", "KV B/seq", "weights B", "max batch", "batch run", "tokens/s",
                        "verified (GPU)"],
                       title=f"Largest batch in {r['options']['budget_gb']:g} GB (1e9 B), "
                             "analytic: weights + batch x KV")
    common.print_table(r["train"], ["model", "num_loops", "tokens", "chunk_size", "median_s", "tokens_per_s"],
                       ["model", "loops", "tokens", "chunk", "s/step", "tokens/s"],
                       title="Training step (forward + backward)")
    rows = [{"goal": k, **v} for k, v in payload["goals"].items()]
    common.print_table(rows, ["goal", "value", "target", "met"],
                       title=f"Goals (judged on a GPU; this run: {payload['machine']['device_name']}; not asserted)")


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    device = common.pick_device(args.device)
    result = run(args, device)
    payload = {
        "benchmark": "throughput",
        "preset": args.preset,
        "config": common.PRESETS[args.preset],
        "dtype": str(common.PRESET_DTYPES[args.preset]).replace("torch.", ""),
        "machine": common.machine_info(device),
        "result": result,
        "goals": goals(result),
        "notes": {
            "timing": "median of repeats after warmup; torch.cuda.synchronize around each call on GPU",
            "decode_cache": "context from a real prefill (public cache API); each timed call restarts from it via crop",
            "decode_memory": "cache_nbytes: rows held (arithmetic); cache_capacity_nbytes: buffers; "
                             "alloc_*: allocator-measured (alloc_method); "
                             "process_*: the whole process's peak RSS (CPU)",
            "max_batch": "analytic: floor((budget - weights) / KV per sequence); batch_run capped by --max-batch-cap",
        },
    }
    json_path, png_path = common.result_paths("throughput", args.preset, device, args.out_dir)
    payload["files"] = {"json": str(json_path), "png": str(png_path)}
    common.write_json(json_path, payload)
    title = f"MELT vs LoopLM vs standard, {args.preset} shape ({payload['dtype']}), {payload['machine']['device_name']}"
    common.write_figure(png_path, plot(result, title))
    print_report(payload)
    print(f"wrote {json_path}\nwrote {png_path}")
    return payload


if __name__ == "__main__":
    main()
