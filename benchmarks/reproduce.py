"""Small-scale reproduction of the paper's claims (MELT_SPEC section 6), one command on 2 CPU cores.

    python -m benchmarks.reproduce [--preset default|smoke] [--steps-scale X] [--seeds 0 1] [--jobs N] [--out-dir DIR]

What it does, per seed (seeds run in parallel processes, `--jobs`, one torch thread each):
1. Data. A corpus from the project's generator (`convert.synthetic.make_corpus`), mostly depth documents
   (modular arithmetic chains evaluated left to right, `3+4*3=1`, depths 1-2, train split; the expression
   form of the generator: see "Task" below) plus some prose, packed into rows of the preset's length with the
   project's tokenizer. Held-out LM loss is measured on rows packed from a corpus
   drawn with another seed (documents never trained on); task accuracy on `depth_problems(split="test")`,
   whose chains are disjoint from every training chain.
2. Pretraining. A standard transformer (the stack run once, `num_loops=1`) and a LoopLM (the same stack,
   `per_loop`, 4 loops: Ouro) from the same initial weights, on the same rows in the same order for the
   same steps: same parameters, same token budget. Loss: next-token CE plus `answer_weight` times the mean CE
   of the answer digits (the tokens after "="; in the plain LM loss they are ~1/7 of the tokens, and the
   LoopLM did not learn the task without this term), averaged over every loop's logits for the LoopLM
   (Ouro's per-loop loss). Both are written as Ouro-format checkpoints.
3. Conversion. The LoopLM checkpoint goes through the real converter (`melt_convert.from_ouro.run`, both
   phases, chunked) once per variant: MELT (element-wise gate) and the ablations: scalar / mean / ema / last
   gates, no interpolation (alpha = 1 from the start), no attention alignment (beta = 0), no chunk-wise
   training (chunk = sequence length). The training-free conversions are
   `MeltForCausalLM.from_ouro(gate_type="last" | "mean")`, no training.
4. Evaluation, every model. Task accuracy: exact match of argmax of the last position's logits after the
   prompt with the answer digit (batched, left-padded). Each test problem follows 0 to `CONTEXT_PROBLEMS`
   solved train-split problems, one per line as in the training documents, so that chunk boundaries fall
   anywhere in it and part of it is read from the cache's final rows (a bare problem, at most 8 tokens, would
   fit in one chunk, where MELT's gate `last` is the LoopLM exactly). Held-out LM loss: next-token CE of the returned
   (last-loop) logits. KV bytes per token: `cache.nbytes()` after a real forward of one held-out row / its
   tokens. Every MELT model runs its chunked prefill at the SAME chunk size (the recipe's `chunk_size`):
   the no-chunk-wise-training ablation is trained with one chunk per row but evaluated like the others,
   which is the mismatch that ablation measures.

Task. Each hop of a chain needs the value before it, so depth d is d dependent steps, which is what loops
are for. The generator's variables form (`k=3;q=k+4;?q=`) adds name look-ups; at this scale no model learned
those in the time budget (all at chance, even one hop), so the reproduction uses the expression form. Depths
1-2 only: with depths 1-6 in the mix, depth 1 reached 25% at best and deeper ones stayed at chance (measured
while choosing the task; the numbers are in README).

Results: a table (mean +- std over seeds, and the min-max) on stdout, `reproduce_<preset>_<device>.json`
and `.png` under `runs/benchmarks/` (or --out-dir; committed results: `benchmarks/results/`). Trained models
are cached in the run directory (`--run-dir`, default `runs/reproduce-<preset>` at the repository root): a rerun
with the same recipe reuses them, a changed recipe starts over. The run directory also holds the converter's logs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import shutil
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import matplotlib.patches
import torch
import torch.nn.functional as F

from . import common

ROOT = Path(__file__).resolve().parents[1]
DEPTHS = (1, 2)
TASK_FORM = "expression"  # convert.synthetic: the chain alone, `3+4*3=`, no names (see the module docstring)
CONTEXT_PROBLEMS = 6  # test problem i follows i % 7 solved train-split problems


@dataclass(frozen=True)
class Recipe:
    """Everything that determines the trained models; a run directory is reused only for the same recipe."""

    corpus_docs: int  # training records from make_corpus
    heldout_docs: int  # records of the held-out corpus (another seed)
    depth_share: float  # fraction of depth documents in the corpus (the rest is prose)
    seq_len: int  # tokens per packed row, pretraining and conversion
    pretrain_steps: int  # optimizer steps of each pretraining (the same for both models)
    pretrain_batch: int  # rows per pretraining step
    pretrain_lr: float  # peak AdamW lr (warm-up then cosine)
    answer_weight: float  # pretraining loss = LM loss + answer_weight * mean CE of the answer digits
    phase1_steps: int  # converter phase 1 (alpha 0 -> 1)
    phase2_steps: int  # converter phase 2 (alpha 1, attention alignment)
    convert_batch: int  # rows per conversion step
    convert_lr: float  # converter lr of the Ouro weights
    gate_lr: float  # converter lr of the gate weights
    chunk_size: int  # MELT chunk size: conversion and every MELT evaluation
    eval_problems: int  # test-split depth problems per seed
    heldout_rows: int  # held-out rows for the LM loss


PRESETS = {
    "default": Recipe(
        corpus_docs=3000, heldout_docs=200, depth_share=0.85, seq_len=64,
        pretrain_steps=3000, pretrain_batch=16, pretrain_lr=1e-3, answer_weight=1.0, phase1_steps=100, phase2_steps=60,
        convert_batch=8, convert_lr=1e-3, gate_lr=1e-2, chunk_size=16, eval_problems=300, heldout_rows=32,
    ),
    "smoke": Recipe(
        corpus_docs=300, heldout_docs=40, depth_share=0.85, seq_len=32,
        pretrain_steps=4, pretrain_batch=4, pretrain_lr=1e-3, answer_weight=1.0, phase1_steps=2, phase2_steps=1,
        convert_batch=4, convert_lr=1e-3, gate_lr=1e-2, chunk_size=8, eval_problems=12, heldout_rows=4,
    ),
}
DEFAULT_SEEDS = {"default": (0, 1), "smoke": (0,)}

# Converter variants: row name -> extra converter options (the base options are in `convert`).
CONVERSIONS = {
    "melt": [],
    "gate scalar": ["--gate-type", "scalar"],
    "gate mean": ["--gate-type", "mean"],
    "gate ema": ["--gate-type", "ema"],
    "gate last": ["--gate-type", "last"],
    "no interpolation": ["--no-interpolation"],
    "no attention alignment": ["--beta", "0"],
    "no chunk-wise training": ["--chunk-size", "<seq_len>"],
}
TRAINING_FREE = {"training-free last": "last", "training-free mean": "mean"}
ROWS = ("standard", "looplm", *CONVERSIONS, *TRAINING_FREE)
ROW_GROUPS = {  # for the plot's colours and legend
    "standard": "standard (1 loop)", "looplm": "LoopLM (4 loops, per-loop cache)", "melt": "MELT (element-wise gate)",
    **{name: "MELT ablations" for name in CONVERSIONS if name != "melt"},
    **{name: "training-free conversions" for name in TRAINING_FREE},
}
GROUP_COLORS = {"standard (1 loop)": "tab:gray", "LoopLM (4 loops, per-loop cache)": "tab:red",
                "MELT (element-wise gate)": "tab:blue", "MELT ablations": "tab:orange",
                "training-free conversions": "tab:green"}
METRICS = ("accuracy", "heldout_loss", "kv_bytes_per_token")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.reproduce", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default",
                        help="recipe: default (about 15 min on 2 CPU cores) or smoke (seconds, for tests)")
    parser.add_argument("--steps-scale", type=float, default=1.0,
                        help="multiply every training step count (pretraining and both converter phases)")
    parser.add_argument("--seeds", nargs="+", type=int, help="seeds (default: 0 1; smoke: 0)")
    parser.add_argument("--out-dir", type=Path,
                        help="directory for the JSON and PNG "
                             "(default runs/benchmarks; committed results: benchmarks/results)")
    parser.add_argument("--run-dir", type=Path, help="trained models and logs (default runs/reproduce-<preset>)")
    parser.add_argument("--jobs", type=int,
                        help="seeds trained at once, each in its own process (default: min(seeds, CPU cores))")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads: these models are so small that one thread is about as fast as "
                        "two, and far faster when other work shares the cores (spinning threads wait on each other)")
    return parser


def scaled(recipe: Recipe, scale: float) -> Recipe:
    """`recipe` with every step count multiplied by `scale` (at least one step each)."""
    if not scale > 0:
        raise ValueError(f"--steps-scale must be > 0, got {scale}")
    return replace(recipe, **{name: max(1, round(getattr(recipe, name) * scale))
                              for name in ("pretrain_steps", "phase1_steps", "phase2_steps")})


# -- data -------------------------------------------------------------------------------------------------------


def _tokenizer():
    from transformers import AutoTokenizer

    from melt_convert.data import TINY_TOKENIZER

    return AutoTokenizer.from_pretrained(TINY_TOKENIZER)


def _mix(recipe: Recipe):
    from melt_convert.synthetic import CorpusMix

    return CorpusMix(depth_text=recipe.depth_share, prose_text=1 - recipe.depth_share, depth_chat=0.0,
                     prose_chat=0.0, depths=DEPTHS, distractors=(0, 0), form=TASK_FORM)


def build_data(recipe: Recipe, seed: int, seed_dir: Path, tokenizer) -> dict:
    """Training corpus file (for the converter), packed training rows, held-out rows, test problems."""
    from melt_convert.data import pack_sequences
    from melt_convert.synthetic import depth_problems, make_corpus, render_depth_document, write_jsonl

    records = make_corpus(recipe.corpus_docs, seed, _mix(recipe))
    corpus = seed_dir / "corpus.jsonl"
    if not corpus.is_file():
        write_jsonl(corpus, records)
    heldout_records = make_corpus(recipe.heldout_docs, 1_000_003 + seed, _mix(recipe))
    heldout = pack_sequences([r["text"] for r in heldout_records], tokenizer, recipe.seq_len, seed)
    problems = depth_problems(recipe.eval_problems, seed, DEPTHS, "test", (0, 0), TASK_FORM)
    shots = depth_problems(recipe.eval_problems * CONTEXT_PROBLEMS, seed, DEPTHS, "train", (0, 0), TASK_FORM)
    return {
        "corpus": corpus,
        "train_rows": pack_sequences([r["text"] for r in records], tokenizer, recipe.seq_len, seed),  # [N, L]
        "heldout_rows": heldout[: recipe.heldout_rows],  # [K, L]
        "problems": problems,
        "contexts": [
            render_depth_document(shots[i * CONTEXT_PROBLEMS : i * CONTEXT_PROBLEMS + i % (CONTEXT_PROBLEMS + 1)])
            + "\n" * bool(i % (CONTEXT_PROBLEMS + 1))
            for i in range(len(problems))
        ],
    }


# -- pretraining ------------------------------------------------------------------------------------------------


def pretrain(rows: torch.Tensor, num_loops: int, recipe: Recipe, seed: int, tokenizer, out: Path) -> dict:
    """Train the tiny stack with `num_loops` loops (per_loop: Ouro) and write it as an Ouro checkpoint at `out`."""
    from melt import MeltForCausalLM
    from melt_convert.data import TINY_TOKENIZER
    from melt_convert.ouro_writer import write_ouro_checkpoint
    from melt_convert.train_tiny_ouro import pretraining_optimizer, pretraining_step, teacher_config

    torch.manual_seed(seed)  # the same initial weights for both models of a seed
    config = teacher_config(tokenizer, num_loops=num_loops, max_position_embeddings=max(128, recipe.seq_len))
    model = MeltForCausalLM(config).train()
    steps = recipe.pretrain_steps
    optimizer, schedule = pretraining_optimizer(model, recipe.pretrain_lr, steps)  # the asset teacher's recipe
    order = torch.Generator().manual_seed(seed)  # the same data order for both models of a seed
    (equals,) = tokenizer("=", add_special_tokens=False)["input_ids"]  # a depth problem's answer follows its "="
    started = time.time()
    for _ in range(steps):
        batch = rows[torch.randint(0, rows.shape[0], (recipe.pretrain_batch,), generator=order)]  # [B, L]
        loop_logits = model(batch, use_cache=False, return_loop_outputs=True).loop_logits
        answers = batch[:, :-1] == equals  # [B, L-1]: the next token is an answer digit
        losses = []
        for logits in loop_logits:
            token_loss = F.cross_entropy(logits[:, :-1].transpose(1, 2), batch[:, 1:], reduction="none")  # [B, L-1]
            answer_loss = token_loss[answers].mean() if bool(answers.any()) else token_loss.new_zeros(())
            losses.append(token_loss.mean() + recipe.answer_weight * answer_loss)
        loss = torch.stack(losses).mean()
        pretraining_step(loss, model, optimizer, schedule)
    write_ouro_checkpoint(model.eval(), TINY_TOKENIZER, out)
    summary = {"final_loss": loss.item(), "seconds": round(time.time() - started, 1),
               "tokens": steps * recipe.pretrain_batch * recipe.seq_len,
               "parameters": sum(p.numel() for p in model.parameters())}
    (out / "pretrain.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def convert(looplm_dir: Path, corpus: Path, out: Path, extra: list[str], recipe: Recipe, seed: int, log: Path) -> dict:
    """Run the real converter (both phases, chunked) on the LoopLM checkpoint; its output lines go to `log`."""
    from melt_convert.from_ouro import run

    extra = [str(recipe.seq_len) if option == "<seq_len>" else option for option in extra]
    argv = [
        "--ouro", str(looplm_dir), "--data", str(corpus), "--out", str(out), "--overwrite", "--preset", "tiny",
        "--device", "cpu", "--seq-len", str(recipe.seq_len), "--chunk-size", str(recipe.chunk_size),
        "--batch-size", str(recipe.convert_batch), "--micro-batch-size", str(recipe.convert_batch),
        "--lr", str(recipe.convert_lr), "--gate-lr", str(recipe.gate_lr),
        "--phase1-steps", str(recipe.phase1_steps), "--phase2-steps", str(recipe.phase2_steps),
        "--warmup-steps", "0", "--checkpoint-every", "0", "--holdout", "4", "--eval-batch-size", "4",
        "--seed", str(seed), *extra,
    ]
    with open(log, "a") as stream, contextlib.redirect_stdout(stream), contextlib.redirect_stderr(stream):
        print(f"$ python -m convert.from_ouro {' '.join(argv)}", flush=True)
        return run(argv)


# -- evaluation -------------------------------------------------------------------------------------------------


@torch.no_grad()
def task_accuracy(model, problems, contexts, tokenizer, batch_size: int = 64) -> dict:
    """Exact match of the argmax after each context + prompt with its answer token: overall and per depth."""
    prompts = [tokenizer(c + p.prompt, add_special_tokens=False)["input_ids"] for c, p in zip(contexts, problems)]
    answers = [tokenizer(p.answer, add_special_tokens=False)["input_ids"] for p in problems]
    if any(len(a) != 1 for a in answers):
        raise ValueError("every answer must be one token")
    order = sorted(range(len(problems)), key=lambda i: len(prompts[i]))  # similar lengths share a batch
    correct = [False] * len(problems)
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        width = max(len(prompts[i]) for i in index)
        ids = torch.full((len(index), width), tokenizer.pad_token_id, dtype=torch.long)  # [b, W], left-padded
        mask = torch.zeros(len(index), width, dtype=torch.long)
        for row, i in enumerate(index):
            ids[row, width - len(prompts[i]) :] = torch.tensor(prompts[i])
            mask[row, width - len(prompts[i]) :] = 1
        predicted = model(ids, attention_mask=mask, use_cache=False, logits_to_keep=1).logits[:, -1].argmax(-1)  # [b]
        for row, i in enumerate(index):
            correct[i] = predicted[row].item() == answers[i][0]
    per_depth = {d: [c for c, p in zip(correct, problems) if p.depth == d] for d in DEPTHS}
    return {"accuracy": sum(correct) / len(correct),
            "per_depth": {str(d): sum(c) / len(c) for d, c in per_depth.items() if c}}


@torch.no_grad()
def heldout_loss(model, rows: torch.Tensor, batch_size: int = 8) -> float:
    """Mean next-token cross-entropy of the returned (last-loop) logits on held-out rows `[K, L]`."""
    total = 0.0
    for start in range(0, rows.shape[0], batch_size):
        batch = rows[start : start + batch_size]  # [b, L]
        logits = model(batch, use_cache=False).logits
        total += F.cross_entropy(logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten(), reduction="sum").item()
    return total / (rows.shape[0] * (rows.shape[1] - 1))


@torch.no_grad()
def kv_bytes_per_token(model, row: torch.Tensor) -> float:
    """Bytes of the real cache after a forward of one row `[L]`, divided by its L tokens."""
    cache = model(row[None], use_cache=True, logits_to_keep=1).cache
    return cache.nbytes() / row.numel()


def evaluate(model, data: dict, tokenizer) -> dict:
    task = task_accuracy(model, data["problems"], data["contexts"], tokenizer)
    return {"accuracy": task["accuracy"], "per_depth": task["per_depth"],
            "heldout_loss": heldout_loss(model, data["heldout_rows"]),
            "kv_bytes_per_token": kv_bytes_per_token(model, data["heldout_rows"][0])}


# -- one seed ---------------------------------------------------------------------------------------------------


def run_seed(recipe: Recipe, seed: int, run_dir: Path, tokenizer) -> dict:
    """Pretrain (or reuse), convert (or reuse) and evaluate every row of one seed.

    `train_seconds` are the training times of the models, recorded when they were trained (also when reused).
    """
    from melt import MeltForCausalLM

    seed_dir = run_dir / f"seed{seed}"
    seed_dir.mkdir(parents=True, exist_ok=True)
    data = build_data(recipe, seed, seed_dir, tokenizer)
    results, seconds, reused = {}, {}, []

    def load_or_train(name: str, make) -> Path:
        """The model directory of `name`, trained now unless an earlier run of this recipe left it."""
        path = seed_dir / name.replace(" ", "-")
        timing = path / "reproduce_seconds.json"
        if timing.is_file():
            reused.append(name)
        else:
            started = time.time()
            make(path)
            timing.write_text(json.dumps(round(time.time() - started, 1)))
            print(f"  seed {seed}: {name} trained in {json.loads(timing.read_text()):.0f} s", flush=True)
        seconds[name] = json.loads(timing.read_text())
        return path

    for name, loops in (("standard", 1), ("looplm", 4)):
        path = load_or_train(
            name, lambda out, loops=loops: pretrain(data["train_rows"], loops, recipe, seed, tokenizer, out))
        results[name] = evaluate(MeltForCausalLM.from_ouro(str(path), cache_mode="per_loop").eval(), data, tokenizer)
    looplm_dir = seed_dir / "looplm"
    for name, extra in CONVERSIONS.items():
        path = load_or_train(name, lambda out, extra=extra: convert(looplm_dir, data["corpus"], out, extra, recipe,
                                                                     seed, seed_dir / "convert.log"))
        model = MeltForCausalLM.from_pretrained(path).eval()
        model.config.chunk_size = recipe.chunk_size  # one inference chunk size for every MELT model
        results[name] = evaluate(model, data, tokenizer)
    for name, gate in TRAINING_FREE.items():
        model = MeltForCausalLM.from_ouro(str(looplm_dir), cache_mode="shared", gate_type=gate,
                                          chunk_size=recipe.chunk_size).eval()
        results[name] = evaluate(model, data, tokenizer)
    return {"rows": results, "train_seconds": seconds, "reused": reused}


# -- summary, table, plot ---------------------------------------------------------------------------------------


def summarize(per_seed: dict[int, dict]) -> dict:
    """Per row and metric: mean, std (0 with one seed), min, max and the per-seed values."""
    summary = {}
    for row in ROWS:
        summary[row] = {}
        for metric in METRICS:
            values = [per_seed[s]["rows"][row][metric] for s in sorted(per_seed)]
            summary[row][metric] = {
                "mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                "min": min(values), "max": max(values), "values": values,
            }
        summary[row]["per_depth_mean"] = {
            d: statistics.fmean(per_seed[s]["rows"][row]["per_depth"][d] for s in per_seed)
            for d in per_seed[next(iter(per_seed))]["rows"][row]["per_depth"]
        }
    return summary


def orderings(summary: dict) -> list[dict]:
    """The paper's expected orderings, each checked on the seed means of task accuracy and of held-out loss.

    "A beats B" means higher accuracy, and separately lower held-out loss; KV claims are exact equalities.
    """
    acc = {row: summary[row]["accuracy"]["mean"] for row in ROWS}
    loss = {row: summary[row]["heldout_loss"]["mean"] for row in ROWS}
    kv = {row: summary[row]["kv_bytes_per_token"]["mean"] for row in ROWS}
    pairs = [("LoopLM >= MELT", "looplm", "melt", True), ("MELT > standard", "melt", "standard", False),
             ("MELT > training-free last", "melt", "training-free last", False),
             ("MELT > training-free mean", "melt", "training-free mean", False)]
    pairs += [(f"element-wise > {row}", "melt", row, False) for row in CONVERSIONS if row.startswith("gate ")]
    pairs += [(f"{row} hurts", "melt", row, False) for row in CONVERSIONS if row.startswith("no ")]
    checks = []
    for claim, better, worse, ties in pairs:
        checks.append({
            "claim": claim,
            "accuracy": acc[better] >= acc[worse] if ties else acc[better] > acc[worse],
            "heldout_loss": loss[better] <= loss[worse] if ties else loss[better] < loss[worse],
        })
    checks.append({"claim": "KV/token: MELT == standard", "kv": kv["melt"] == kv["standard"]})
    checks.append({"claim": "KV/token: MELT == LoopLM / 4", "kv": kv["melt"] * 4 == kv["looplm"]})
    return checks


def format_check(check: dict) -> str:
    verdicts = ", ".join(f"{key} {'holds' if held else 'FAILS'}" for key, held in check.items() if key != "claim")
    return f"  {check['claim']:<40} {verdicts}"


def table_rows(summary: dict) -> list[dict]:
    rows = []
    for row in ROWS:
        s = summary[row]
        acc, loss = s["accuracy"], s["heldout_loss"]
        rows.append({
            "model": row,
            "accuracy": f"{acc['mean']:.3f} ± {acc['std']:.3f}", "acc min-max": f"{acc['min']:.3f}-{acc['max']:.3f}",
            "heldout loss": f"{loss['mean']:.3f} ± {loss['std']:.3f}",
            "loss min-max": f"{loss['min']:.3f}-{loss['max']:.3f}",
            "KV B/token": f"{s['kv_bytes_per_token']['mean']:.0f}",
            **{f"d{d}": f"{v:.2f}" for d, v in s["per_depth_mean"].items()},
        })
    return rows


def plot(summary: dict, seeds: list[int], path: Path, title: str) -> Path:
    """Three horizontal bar panels (accuracy, held-out loss, KV bytes per token), one bar per row."""
    fig, axes = common.new_figure(3, 1, width=5.2, height=5.0)
    labels = list(ROWS)
    colors = [GROUP_COLORS[ROW_GROUPS[row]] for row in labels]
    y = list(range(len(labels)))
    panels = (("accuracy", f"task accuracy (test split, depths {DEPTHS[0]}-{DEPTHS[-1]})"),
              ("heldout_loss", "held-out LM loss (nats/token)"),
              ("kv_bytes_per_token", "KV cache bytes per token (measured)"))
    for ax, (metric, name) in zip(axes[0], panels):
        means = [summary[row][metric]["mean"] for row in labels]
        low = [summary[row][metric]["mean"] - summary[row][metric]["min"] for row in labels]
        high = [summary[row][metric]["max"] - summary[row][metric]["mean"] for row in labels]
        ax.barh(y, means, xerr=[low, high], color=colors, capsize=3, alpha=0.85)
        for i, row in enumerate(labels):
            ax.plot(summary[row][metric]["values"], [i] * len(seeds), "k.", markersize=4)
        ax.set_title(name, fontsize=10)
        ax.set_yticks(y, labels if ax is axes[0][0] else [""] * len(labels))
        ax.invert_yaxis()
        ax.grid(axis="x", alpha=0.3)
        if metric == "accuracy":
            ax.axvline(0.1, color="k", linestyle=":", linewidth=1)
            ax.text(0.1, len(labels) - 0.4, " chance", fontsize=8)
            ax.set_xlim(0, max(0.2, max(summary[row][metric]["max"] for row in labels) + 0.05))
        elif metric == "heldout_loss":
            ax.set_xlim(left=min(summary[row][metric]["min"] for row in labels) * 0.95)
    handles = [matplotlib.patches.Patch(color=color, label=group) for group, color in GROUP_COLORS.items()]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=9, frameon=False,
               bbox_to_anchor=(0.5, -0.04))
    fig.suptitle(title, fontsize=11)
    return common.write_figure(path, fig)


# -- main -------------------------------------------------------------------------------------------------------


def prepare_run_dir(run_dir: Path, recipe: Recipe) -> None:
    """Reuse `run_dir` when it was made by the same recipe; otherwise empty it."""
    stamp = run_dir / "recipe.json"
    wanted = json.dumps(asdict(recipe), sort_keys=True)
    if run_dir.exists() and (not stamp.is_file() or stamp.read_text() != wanted):
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    stamp.write_text(wanted)


def run(argv=None) -> dict:
    """Run the reproduction as `argv` says; returns the JSON payload (also written with the PNG)."""
    args = build_parser().parse_args(argv)
    recipe = scaled(PRESETS[args.preset], args.steps_scale)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args, recipe)
    finally:
        torch.set_num_threads(threads)


def quiet_transformers() -> None:
    """Silence the per-model loading chatter (warnings, progress bars) of transformers in this process."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def seed_job(recipe: Recipe, seed: int, run_dir: Path, threads: int) -> dict:
    """`run_seed` in a worker process: its own thread count, tokenizer and quiet transformers logging."""
    quiet_transformers()
    torch.set_num_threads(threads)
    return run_seed(recipe, seed, run_dir, _tokenizer())


def _run(args: argparse.Namespace, recipe: Recipe) -> dict:
    """The body of `run`, under the chosen thread count."""
    seeds = list(args.seeds or DEFAULT_SEEDS[args.preset])
    run_dir = args.run_dir or ROOT / "runs" / f"reproduce-{args.preset}"
    prepare_run_dir(run_dir, recipe)
    device = torch.device("cpu")
    if args.jobs is not None and args.jobs < 1:
        raise ValueError(f"--jobs must be >= 1, got {args.jobs}")
    jobs = min(len(seeds), args.jobs or os.cpu_count() or 1)
    started = time.time()
    for seed in seeds:
        print(f"seed {seed}: pretraining, {len(CONVERSIONS)} conversions, evaluation of {len(ROWS)} models", flush=True)
    if jobs == 1:
        tokenizer = _tokenizer()
        per_seed = {seed: run_seed(recipe, seed, run_dir, tokenizer) for seed in seeds}
    else:
        # spawn, not fork: a forked child of a process that has started torch's thread pools can deadlock.
        # The job function is taken from the installed module so that the children can import it however
        # this one was started (`python -m benchmarks.reproduce` or the installed `melt_benchmarks`).
        from melt_benchmarks.reproduce import seed_job

        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {seed: pool.submit(seed_job, recipe, seed, run_dir, args.threads) for seed in seeds}
            per_seed = {seed: future.result() for seed, future in futures.items()}
    summary = summarize(per_seed)
    checks = orderings(summary)
    wall = time.time() - started
    depth_columns = [f"d{d}" for d in DEPTHS]
    common.print_table(table_rows(summary),
                       ["model", "accuracy", "acc min-max", "heldout loss", "loss min-max", "KV B/token",
                        *depth_columns],
                       title=f"reproduce ({args.preset}, seeds {seeds}; accuracy and loss: mean ± std; "
                             f"d{DEPTHS[0]}-d{DEPTHS[-1]}: accuracy per depth, mean over seeds)")
    print("expected orderings (paper), on the seed means:")
    for check in checks:
        print(format_check(check))
    print(f"wall time {wall:.0f} s")
    json_path, png_path = common.result_paths("reproduce", args.preset, device, args.out_dir)
    payload = {
        "benchmark": "reproduce", "preset": args.preset, "seeds": seeds, "recipe": asdict(recipe),
        "steps_scale": args.steps_scale, "threads": args.threads, "jobs": jobs, "task_form": TASK_FORM,
        "depths": list(DEPTHS), "wall_seconds": round(wall, 1),
        "machine": common.machine_info(device), "summary": summary, "orderings": checks,
        "per_seed": {str(s): v for s, v in per_seed.items()},
    }
    common.write_json(json_path, payload)
    plot(summary, seeds, png_path, f"MELT reproduction at tiny scale ({args.preset}, {len(seeds)} seed(s); bars: mean, "
                                   "whiskers: min-max, dots: seeds)")
    print(f"wrote {json_path} and {png_path}")
    return payload


def main(argv=None) -> None:
    """Command-line entry: `run`, with the per-model loading chatter of transformers silenced."""
    quiet_transformers()
    run(argv)


if __name__ == "__main__":
    main()
