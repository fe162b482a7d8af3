"""Adaptive depth: what stopping a token's loops early costs in quality, and what it saves.

    python -m benchmarks.adaptive [--model DIR] [--thresholds 1 0.99 ...] [--out-dir DIR]

On the embedded converted model (`--model`, by default the main job's conversion of the embedded tiny Ouro, made
into `runs/benchmarks/adaptive/melt-converted` when absent) and its LoopLM teacher (the tiny Ouro checkpoint, per-loop
cache), on the held-out sequences of the main job's corpus split, three ways of spending fewer loops:
- MELT early exit: `early_exit_threshold` stops each token at its own loop (one cache row, its latent then);
- LoopLM early exit: the same threshold on the teacher, the exit loop's row copied into the later loops' slots;
- fewer loops for every token: `num_loops` = 1 .. T, no exit.
For each: average loops per token (`loops_run`), next-token cross-entropy, KL(all-loops teacher || model) per token,
and tokens/s of the chunked forward over the held-out batch. Then decode with early exit, batch 1: the dynamic
cache's step (skips the loops after a token's exit) against the preallocated cache's capturable step (runs every
loop, exited tokens masked). CPU; timings are measured, never asserted.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from . import common

THRESHOLDS = (1.0, 0.99, 0.95, 0.9, 0.8, 0.6, 0.4, 0.2, 0.0)


def main_job_rows(tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """The main job's training and held-out sequences: its corpus, packing and split, with its default options."""
    from melt_convert import from_ouro
    from melt_convert.data import load_text_dataset, pack_sequences, split_holdout

    options = from_ouro.resolve_options([])
    documents = load_text_dataset(str(options.data[0]), tokenizer, split=options.split, text_field=options.text_field)
    rows = pack_sequences(documents, tokenizer, options.seq_len, options.seed)
    return split_holdout(rows, options.holdout)


def default_model(root: Path) -> Path:
    """The main job's conversion of the embedded tiny Ouro (made here once, about a minute on 2 CPU cores)."""
    out = root / "melt-converted"
    if not out.exists():
        from melt_convert import from_ouro

        from_ouro.run(["--out", str(out)])
    return out


@torch.no_grad()
def evaluate(model, rows: torch.Tensor, reference: torch.Tensor, **call) -> dict:
    """Loss, KL to `reference` logits, average loops and tokens/s of one forward over `rows` `[N, L]`."""
    start = time.perf_counter()
    out = model(rows, use_cache=False, **call)
    seconds = time.perf_counter() - start
    logits = out.logits.float()
    targets = rows[:, 1:].flatten()
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), targets).item()
    kl = F.kl_div(logits.log_softmax(-1), reference.log_softmax(-1), log_target=True, reduction="none").sum(-1)
    return {"avg_loops": round(out.loops_run.float().mean().item(), 4), "loss": round(loss, 5),
            "kl_to_teacher": round(kl.mean().item(), 6), "tokens_per_s": round(rows.numel() / seconds, 1)}


@torch.no_grad()
def decode_speed(model, prompt: torch.Tensor, steps: int, thresholds) -> list[dict]:
    """ms per decoded token (batch 1, eager) with early exit, two ways: the dynamic cache's step, which skips the
    loops after the token's exit, and the preallocated cache's capturable step, which runs every loop masked."""
    rows = []
    for threshold in thresholds:
        for path in ("skip loops (dynamic cache)", "masked (preallocated cache)"):
            cache = model.new_cache(max_cache_len=prompt.shape[1] + steps if path.startswith("masked") else None)
            token = model(prompt, cache=cache, logits_to_keep=1, early_exit_threshold=threshold).logits.argmax(-1)
            times, loops = [], []
            for _ in range(steps):
                start = time.perf_counter()
                out = model(token, cache=cache, early_exit_threshold=threshold)
                times.append(time.perf_counter() - start)
                token = out.logits.argmax(-1)
                loops.append(out.loops_run.item())
            rows.append({"threshold": threshold, "step": path, "avg_loops": round(sum(loops) / len(loops), 3),
                         "ms_per_token": round(1e3 * statistics.median(times), 3)})
    return rows


def summarize(results: list[dict], loops: int) -> str:
    """What the sweep shows, in numbers: loops saved within 1% of the all-loops loss, and, by KL to the all-loops
    teacher, early exit against running fewer loops for every token at the same average (interpolated)."""
    melt = [r for r in results if r["model"] == "melt"]
    fewer = {r["num_loops"]: r["kl_to_teacher"] for r in melt if r["how"] == "fewer loops"}
    lines = []
    one = next(r for r in melt if r["how"] == "fewer loops" and r["num_loops"] == 1)["loss_vs_all_loops"]
    if abs(one) <= 0.01:
        lines.append(f"one loop for every token is already {100 * one:+.2f}% of the loss of all {loops}: at this "
                     "scale the loss hardly depends on depth, so the KL to the all-loops teacher is the measure")
    for how in sorted({r["how"] for r in melt if r["how"].startswith("early exit")}):
        rows = [r for r in melt if r["how"] == how and 1.0 < r["avg_loops"] < loops]
        if not rows:
            continue
        compared, better = [], 0
        for r in sorted(rows, key=lambda r: r["avg_loops"]):
            low = int(r["avg_loops"])
            uniform = fewer[low] + (r["avg_loops"] - low) * (fewer[low + 1] - fewer[low])  # KL at that depth for all
            better += r["kl_to_teacher"] < uniform
            compared.append(f"threshold {r['threshold']}: {r['avg_loops']:.2f} loops, KL {r['kl_to_teacher']:.4f} vs "
                            f"{uniform:.4f}")
        lines.append(f"MELT {how}, against fewer loops for every token at the same average: lower KL at {better} of "
                     f"{len(rows)} thresholds ({'; '.join(compared)})")
    return "; ".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="a converted MELT checkpoint (default: the main job's, made once)")
    parser.add_argument("--thresholds", type=float, nargs="+", default=list(THRESHOLDS))
    parser.add_argument("--rows", type=int, default=None, help="held-out sequences to use (default: all)")
    parser.add_argument("--decode-steps", type=int, default=32, help="decode steps timed per threshold and path")
    parser.add_argument("--train-exit-gate", type=int, default=300, metavar="STEPS",
                        help="then fit each model's exit gate (convert.exit_gate) for STEPS steps and sweep again; "
                             "0: no")
    parser.add_argument("--out-dir", default=None, help="directory for the JSON and PNG (default runs/benchmarks)")
    args = parser.parse_args(argv)
    from transformers import PreTrainedTokenizerFast

    from melt import MeltForCausalLM
    from melt_convert.data import ASSETS_DIR
    from melt_convert.exit_gate import train_exit_gate

    torch.manual_seed(0)
    out_dir = Path(args.out_dir) if args.out_dir else common.DEFAULT_OUT_DIR
    model_dir = args.model or default_model(out_dir / "adaptive")
    melt = MeltForCausalLM.from_pretrained(model_dir).eval()
    teacher = MeltForCausalLM.from_ouro(str(ASSETS_DIR / "tiny-ouro"), cache_mode="per_loop").eval()
    train_rows, rows = main_job_rows(PreTrainedTokenizerFast.from_pretrained(model_dir))
    rows = rows[: args.rows] if args.rows else rows
    loops = teacher.config.num_loops
    with torch.no_grad():
        reference = teacher(rows, use_cache=False).logits.float()  # the teacher with every loop

    results = []
    for name, model in (("melt", melt), ("looplm", teacher)):
        for threshold in args.thresholds:
            results.append({"model": name, "how": "early exit", "threshold": threshold,
                            **evaluate(model, rows, reference, early_exit_threshold=threshold)})
        for n in range(1, loops + 1):
            results.append({"model": name, "how": "fewer loops", "num_loops": n,
                            **evaluate(model, rows, reference, num_loops=n)})
    gate_training = {}
    if args.train_exit_gate:
        # The shipped gate is at its random initialisation: fit it as Ouro's second stage does, on the training
        # split (each model on its own per-loop losses), then sweep again.
        for name, model in (("melt", melt), ("looplm", teacher)):
            history = train_exit_gate(model, train_rows, args.train_exit_gate, seed=0)
            gate_training[name] = {"steps": args.train_exit_gate, "first_loss": round(history[0], 5),
                                   "last_loss": round(history[-1], 5)}
            for threshold in args.thresholds:
                results.append({"model": name, "how": "early exit, trained gate", "threshold": threshold,
                                **evaluate(model, rows, reference, early_exit_threshold=threshold)})
    full = {r["model"]: r["loss"] for r in results if r["how"] == "fewer loops" and r["num_loops"] == loops}
    for r in results:
        r["loss_vs_all_loops"] = round(r["loss"] / full[r["model"]] - 1.0, 5)
    finding = summarize(results, loops)
    decode = decode_speed(melt, rows[:1, :64], args.decode_steps, (1.0, 0.8, 0.6))
    device = torch.device("cpu")
    payload = {"machine": common.machine_info(device), "model_dir": str(model_dir), "rows": list(rows.shape),
               "num_loops": loops, "results": results, "finding": finding, "decode": decode,
               "gate_training": gate_training}
    columns = ["model", "how", "threshold", "num_loops", "avg_loops", "loss", "loss_vs_all_loops", "kl_to_teacher",
               "tokens_per_s"]
    common.print_table(results, columns)
    print(finding, end="\n\n")
    print("MELT decode with early exit, batch 1, eager (CPU)")
    common.print_table(decode, list(decode[0]))
    json_path, png_path = common.result_paths("adaptive", "tiny", device, args.out_dir)
    common.write_json(json_path, payload)
    figure, axes = common.new_figure(2)
    left, right = axes[0]
    for name, color in (("melt", common.MODEL_COLORS["melt"]), ("looplm", common.MODEL_COLORS["looplm"])):
        for how, marker in (("early exit", "o-"), ("fewer loops", "s--"), ("early exit, trained gate", "^:")):
            points = sorted((r["avg_loops"], r["loss"], r["kl_to_teacher"]) for r in results
                            if r["model"] == name and r["how"] == how)
            if not points:
                continue
            label = f"{common.MODEL_LABELS[name]}, {how}"
            left.plot([p[0] for p in points], [p[1] for p in points], marker, color=color, label=label)
            right.plot([p[0] for p in points], [p[2] for p in points], marker, color=color, label=label)
    left.set(xlabel="average loops per token", ylabel="held-out next-token loss", title="loss vs loops")
    right.set(xlabel="average loops per token", ylabel="KL(all-loops teacher || model)", title="KL vs loops")
    left.legend(fontsize=7)
    common.write_figure(png_path, figure)
    print(f"wrote {json_path} and {png_path}")
    return payload


if __name__ == "__main__":
    main()
