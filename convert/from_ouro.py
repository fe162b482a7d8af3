"""Convert an Ouro (LoopLM) checkpoint into MELT: interpolated transition, then attention-aligned distillation.

    python -m convert.from_ouro --ouro <hub id or dir> --out <dir> [--data ...] [options]
    torchrun --nproc_per_node=K -m convert.from_ouro ...          # FSDP2, nccl on CUDA / gloo on CPU
    python -m convert.from_ouro                                    # the embedded default (tiny, CPU, minutes)

Teacher: the Ouro checkpoint in `per_loop` mode (exactly Ouro), frozen (eval, no grad). Student: the same
weights in `shared` mode plus the new gates (`gate_type`, default elementwise; W = U = 0 and b = -3 at the
start, see `MeltPreTrainedModel._init_weights`). Phase 1 ramps the key/value blend alpha from 0 (the
student IS the teacher) to 1 (pure MELT) under a KD loss over all loops; phase 2 keeps alpha = 1 and adds
beta * the attention-output alignment (`convert/distill.py`: the `Recipe` and one `distill_step`).
`--no-interpolation` (an ablation) runs phase 1 at alpha = 1 from its first step. The training loop, checkpoints
and the distributed set-up are in `convert/train.py`; the data pipeline in `convert/data.py`. The checkpoint is
read once (`melt.ouro_checkpoint.OuroCheckpoint`): teacher, student and the report's models are built from it.

Presets. `published` is the paper's recipe (chunk 500, sequence 10,000, 32 sequences = 320K tokens per
step, AdamW, lr 8e-6 Ouro weights / 5e-4 gate weights, 500 + 300 steps, beta 0.1, temperature 1).
`tiny` fits the embedded tiny checkpoint on 2 CPU cores (sequence 128, chunk 32, 8 sequences per step,
60 + 40 steps, higher learning rates for a model of 0.2 M parameters). `auto` (the default) picks `tiny`
when --ouro is not given (the embedded default: `convert/assets/tiny-ouro` and
`convert/assets/tiny_corpus.jsonl`), `published` otherwise. Any option given explicitly overrides the preset.

Files and stages. While training, `<out>.work/` holds `checkpoint.pt` and `log.jsonl` (one JSON line per step).
The last step is checkpointed like the others, then two stages follow, each resumable with `--resume`
(which then does not retrain): the evaluation, whose result is kept as `<out>.work/report.json`, and the
final write: the converted model goes to a temporary sibling of `<out>`, renamed to `<out>` when complete:
config (model_type melt, auto_map), safetensors, the flat modeling files, the tokenizer files, `report.json`
(teacher vs student vs the training-free `gate_type="last"` conversion on held-out rows, per loop),
`train_log.jsonl` and a `README.md` saying how to load it; then the work directory is removed. Every exit
leaves either the complete output or a work directory that `--resume` continues (a work directory without a
checkpoint holds nothing to keep and a plain rerun replaces it). A failed write removes its temporary files
and names the file system that ran out of space. Bad inputs are reported before anything is written, and
`--out` / `--work-dir` may never be, or hold, the current directory or an input.

Loading the output: `MeltForCausalLM.from_pretrained(out)`, or without this package
`AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)`. The tokenizer is a plain `tokenizers`
one, but `AutoTokenizer` reads config.json first, whose `auto_map` names MELT's code: without
`trust_remote_code=True` it asks "Do you wish to run the custom code?" (and waits 15 s) unless `melt` is
imported (which registers the model type); `PreTrainedTokenizerFast.from_pretrained(out)` never asks.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import functools
import json
import os
import shlex
import shutil
import sys
import time
from pathlib import Path

import torch

from melt.configuration_melt import GATE_TYPES

from . import atomic
from . import train as training
from .data import ASSETS_DIR, TINY_CORPUS, load_text_dataset, pack_sequences, split_holdout
from .distill import compare_to_teacher, format_report

EMBEDDED_OURO = ASSETS_DIR / "tiny-ouro"
EMBEDDED_DATA = TINY_CORPUS
DEFAULT_OUT = Path("melt-converted")

PRESETS = {
    "published": dict(
        seq_len=10_000, chunk_size=500, batch_size=32, micro_batch_size=1, lr=8e-6, gate_lr=5e-4,
        phase1_steps=500, phase2_steps=300, warmup_steps=0, holdout=8, eval_batch_size=1, checkpoint_every=50,
    ),
    "tiny": dict(
        seq_len=128, chunk_size=32, batch_size=8, micro_batch_size=8, lr=1e-3, gate_lr=1e-2,
        phase1_steps=60, phase2_steps=40, warmup_steps=5, holdout=32, eval_batch_size=16, checkpoint_every=25,
    ),
}
# Options whose change makes a checkpoint meaningless for --resume.
FINGERPRINT = (
    "ouro", "data", "text_field", "split", "gate_type", "seq_len", "chunk_size", "batch_size", "micro_batch_size",
    "lr", "gate_lr", "weight_decay", "warmup_steps", "phase1_steps", "phase2_steps", "beta", "temperature",
    "seed", "holdout", "max_grad_norm", "no_interpolation",
)
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
    "added_tokens.json", "chat_template.jinja", "chat_template.json", "tokenizer.model", "generation_config.json",
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m convert.from_ouro",
        description="Convert an Ouro checkpoint to MELT (phase 1: interpolated transition; phase 2: "
        "attention-aligned distillation). With no --ouro/--data it converts the embedded tiny checkpoint.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    io = p.add_argument_group("inputs and outputs")
    io.add_argument("--ouro",
                    help=f"Ouro checkpoint: a local directory or a Hub id (default: the embedded {EMBEDDED_OURO})")
    io.add_argument("--data", nargs="+",
                    help="dataset: Hub id, or local .json/.jsonl/.parquet/.txt files or a directory "
                         f"(default: the embedded {EMBEDDED_DATA})")
    io.add_argument("--text-field", default="text",
                    help="record field holding text (records with 'messages' use the chat template)")
    io.add_argument("--split", default="train", help="dataset split (Hub datasets)")
    io.add_argument("--tokenizer", help="tokenizer directory or Hub id (default: the Ouro checkpoint's)")
    io.add_argument("--out", type=Path, default=DEFAULT_OUT,
                    help="output directory (refused if it exists, see --overwrite/--resume)")
    io.add_argument("--work-dir", type=Path, help="checkpoints and step log while training (default: <out>.work)")
    io.add_argument("--overwrite", action="store_true", help="replace an existing --out (a converted model or an empty "
                    "directory) and, without --resume, discard an existing work directory")
    io.add_argument("--resume", action="store_true",
                    help="continue from the work directory's checkpoint (same options); after a complete training it "
                         "runs only the evaluation and the final write")
    io.add_argument("--change-lr", action="store_true",
                    help="with --resume: continue with the --lr/--gate-lr given now instead of the checkpoint's "
                         "(e.g. after a non-finite loss)")
    io.add_argument("--push-to-hub", metavar="REPO",
                    help="upload the output directory to this Hub repository at the end")
    io.add_argument("--keep-work-dir", action="store_true",
                    help="keep the work directory (checkpoint, log) after success")

    rec = p.add_argument_group("recipe (defaults come from --preset)")
    rec.add_argument("--preset", choices=("auto", "tiny", "published"), default="auto",
                     help="option defaults: auto = tiny for the embedded default, published otherwise")
    rec.add_argument("--phase", choices=("both", "1", "2"), default="both", help="run both phases or only one")
    rec.add_argument("--phase1-steps", type=int, help="phase-1 steps, alpha 0 -> 1 (published 500, tiny 60)")
    rec.add_argument("--phase2-steps", type=int, help="phase-2 steps at alpha 1 (published 300, tiny 40)")
    rec.add_argument("--seq-len", type=int, help="tokens per packed sequence (published 10000, tiny 128)")
    rec.add_argument("--chunk-size", type=int, help="MELT chunk size C, must divide --seq-len (published 500, tiny 32)")
    rec.add_argument("--batch-size", type=int, help="sequences per optimizer step, all processes together "
                     "(published 32 = 320K tokens at 10000, tiny 8)")
    rec.add_argument("--micro-batch-size", type=int, help="sequences per forward on one process; gradients are "
                     "accumulated over batch/(processes*micro) micro-batches (published 1, tiny 8)")
    rec.add_argument("--lr", type=float, help="AdamW lr of Ouro's weights (published 8e-6, tiny 1e-3)")
    rec.add_argument("--gate-lr", type=float, help="AdamW lr of the new gate weights (published 5e-4, tiny 1e-2)")
    rec.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (betas 0.9, 0.95)")
    rec.add_argument("--warmup-steps", type=int, help="linear lr warm-up steps, then constant (published 0, tiny 5)")
    rec.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping norm")
    rec.add_argument("--no-interpolation", action="store_true",
                     help="ablation: phase 1 runs at alpha = 1 (pure MELT) from its first step instead of ramping "
                          "0 -> 1")
    rec.add_argument("--beta", type=float, default=0.1, help="weight of the phase-2 attention-alignment MSE")
    rec.add_argument("--temperature", type=float, default=1.0,
                     help="KD temperature tau: KL(softmax(t/tau) || softmax(s/tau)) * tau^2, over every loop's logits")
    rec.add_argument("--gate-type", default="elementwise", choices=GATE_TYPES,
                     help="the student's latent gate")
    rec.add_argument("--seed", type=int, default=0, help="seed of data packing, data order and RNGs")
    rec.add_argument("--holdout", type=int, help="packed rows held out for the final report (published 8, tiny 32)")
    rec.add_argument("--exit-gate-steps", type=int, default=0, metavar="N",
                     help="after both phases, fit the exit gate for N steps on the training rows as Ouro's second "
                          "stage does (convert/exit_gate.py), so that early_exit_threshold spends loops where they "
                          "help; single process only. 0 (default, the published recipe): the gate stays the teacher's")

    run = p.add_argument_group("execution")
    run.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto = cuda when available")
    run.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                     help="auto = bf16 autocast on CUDA, fp32 on CPU (weights and optimizer stay fp32)")
    run.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction,
                     help="recompute each layer's activations in backward (default: on CUDA, where one 10,000-token "
                          "sequence at the Ouro-1.4B shape ran out of an 80 GB card without it; off on CPU)")
    run.add_argument("--checkpoint-every", type=int,
                     help="save a checkpoint every N steps (published 50, tiny 25; 0 = only at stops)")
    run.add_argument("--stop-after", type=int,
                     help="stop after N steps of this invocation, with a checkpoint (for time-sliced jobs); "
                          "continue with --resume")
    run.add_argument("--eval-batch-size", type=int,
                     help="sequences per forward in the final report (published 1, tiny 16)")
    return p


def resolve_options(argv=None) -> argparse.Namespace:
    """Parse, fill preset defaults and check option consistency (ValueError)."""
    args = build_parser().parse_args(argv)
    embedded = args.ouro is None
    if args.ouro is None:
        args.ouro = str(EMBEDDED_OURO)
    if args.data is None:
        if not embedded:
            raise ValueError(
                "--data is required with --ouro (the embedded corpus only fits the embedded tiny checkpoint)"
            )
        args.data = [str(EMBEDDED_DATA)]
    preset = args.preset if args.preset != "auto" else ("tiny" if embedded else "published")
    args.preset = preset
    for key, value in PRESETS[preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.phase == "1":
        args.phase2_steps = 0
    elif args.phase == "2":
        args.phase1_steps = 0
    # Absolute, so that `--out .` or `--out dir/` have a name to derive the work directory from and can be
    # compared with the inputs and the current directory (symbolic links are kept as given).
    args.out = Path(os.path.abspath(args.out.expanduser()))
    if not args.out.name:
        raise ValueError(f"--out {args.out} is the root of the file system; name a new directory")
    if args.work_dir is None:
        args.work_dir = args.out.with_name(args.out.name + ".work")
    args.work_dir = Path(os.path.abspath(args.work_dir.expanduser()))
    _check_options(args)
    return args


def _check_options(a) -> None:
    problems = []
    for name in ("seq_len", "chunk_size", "batch_size", "micro_batch_size", "holdout", "eval_batch_size"):
        if getattr(a, name) < 1:
            problems.append(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    for name in ("phase1_steps", "phase2_steps", "warmup_steps", "checkpoint_every", "exit_gate_steps"):
        if getattr(a, name) < 0:
            problems.append(f"--{name.replace('_', '-')} must be >= 0, got {getattr(a, name)}")
    if a.phase1_steps + a.phase2_steps == 0:
        problems.append("no training steps: --phase1-steps and --phase2-steps are both 0")
    if a.stop_after is not None and a.stop_after < 1:
        problems.append(f"--stop-after must be >= 1, got {a.stop_after}")
    if a.chunk_size >= 1 and a.seq_len >= 1 and (a.chunk_size > a.seq_len or a.seq_len % a.chunk_size):
        problems.append(f"--chunk-size {a.chunk_size} must divide --seq-len {a.seq_len} (chunks tile each sequence)")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if a.batch_size % world:
        problems.append(f"--batch-size {a.batch_size} is not divisible by the {world} processes")
    elif (a.batch_size // world) % a.micro_batch_size:
        problems.append(f"--micro-batch-size {a.micro_batch_size} must divide the per-process batch "
                        f"{a.batch_size // world} (= --batch-size {a.batch_size} / {world} processes)")
    for name in ("lr", "gate_lr", "temperature", "max_grad_norm"):
        if not getattr(a, name) > 0:
            problems.append(f"--{name.replace('_', '-')} must be > 0, got {getattr(a, name)}")
    for name in ("beta", "weight_decay"):
        if not getattr(a, name) >= 0:
            problems.append(f"--{name.replace('_', '-')} must be >= 0, got {getattr(a, name)}")
    for name in ("lr", "gate_lr", "temperature", "beta", "weight_decay"):  # inf/nan would only end in a NaN loss
        if getattr(a, name) == float("inf"):
            problems.append(f"--{name.replace('_', '-')} must be finite, got {getattr(a, name)}")
    if a.change_lr and not a.resume:
        problems.append("--change-lr only applies with --resume")
    if problems:
        raise ValueError("inconsistent options: " + "; ".join(problems))


WORK_FILES = frozenset({"checkpoint.pt", "checkpoint.pt.tmp", "log.jsonl", "report.json", "report.json.tmp"})


def _within(path: Path, directory: Path) -> bool:
    """Whether `path` is `directory` or lies inside it (both absolute)."""
    return path == directory or directory in path.parents


def _is_converted_model(path: Path) -> bool:
    """An existing --out that --overwrite may replace: empty, or a MELT checkpoint (config.json model_type melt)."""
    if not any(path.iterdir()):
        return True
    try:
        return json.loads((path / "config.json").read_text()).get("model_type") == "melt"
    except (OSError, ValueError, AttributeError):
        return False


def _check_paths(a, runtime) -> None:
    """Refuse outputs that would destroy something: the current directory, an input, a directory that is not a
    converted model or a work directory of this converter. Marks a stale work directory (no checkpoint) for reuse."""
    here = Path.cwd()
    for flag, path in (("--out", a.out), ("--work-dir", a.work_dir)):
        if here == path or path in here.parents:
            raise ValueError(f"{flag} {path} is the current directory or one above it; name a new directory, "
                             f"e.g. {flag} ./melt-converted")
        if path.exists() and not path.is_dir():
            raise ValueError(f"{flag} {path} is a file, not a directory; name a directory")
    if _within(a.work_dir, a.out) or _within(a.out, a.work_dir):
        raise ValueError(
            f"--work-dir {a.work_dir} and --out {a.out} must be separate directories, neither inside the other"
        )
    inputs = [("--ouro", a.ouro), *(("--data", d) for d in a.data)]
    inputs += [("--tokenizer", a.tokenizer)] if a.tokenizer else []
    for flag, value in inputs:
        source = Path(value).expanduser()
        if not source.exists():
            continue
        source = Path(os.path.abspath(source))
        for target_flag, target in (("--out", a.out), ("--work-dir", a.work_dir)):
            if _within(source, target):
                raise ValueError(f"{target_flag} {target} holds the input {flag} {value}: the conversion would "
                                 f"delete it; choose another {target_flag}")
    if a.out.exists():
        if not a.overwrite:
            raise ValueError(f"--out {a.out} already exists; pass --overwrite to replace it" +
                             (" (a finished conversion cannot be resumed)" if a.resume else ""))
        if not _is_converted_model(a.out):
            raise ValueError(f"--out {a.out} is not a converted MELT model (no config.json with model_type 'melt') "
                             "and not empty: --overwrite refuses to delete it; choose another --out")
    checkpoint = a.work_dir / "checkpoint.pt"
    foreign = sorted(p.name for p in a.work_dir.iterdir() if p.name not in WORK_FILES) if a.work_dir.is_dir() else []
    if foreign:
        raise ValueError(f"work directory {a.work_dir} holds files this converter did not write "
                         f"({', '.join(foreign[:5])}); pass another --work-dir")
    a.stale_work_dir = a.work_dir.exists() and not checkpoint.is_file()
    if a.resume and not checkpoint.is_file():
        raise ValueError(f"--resume: no checkpoint at {checkpoint} (the run stopped before its first checkpoint): "
                         "nothing to resume, run again without --resume")
    if not a.resume and checkpoint.is_file() and not a.overwrite:
        raise ValueError(f"work directory {a.work_dir} holds a checkpoint from an earlier run; pass --resume to "
                         "continue it or --overwrite to start over")


def _retry_command(argv: list[str], a, resume: bool) -> str:
    """The command line that continues after a non-finite loss: this one with lower learning rates, and
    --resume --change-lr when a checkpoint exists (else --overwrite, to start over)."""
    dropped = {"--resume", "--change-lr", "--overwrite"}
    valued = {"--lr", "--gate-lr"}
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in valued:
            skip = True
        elif arg not in dropped and arg.split("=", 1)[0] not in valued:
            kept.append(arg)
    extra = ["--resume", "--change-lr"] if resume else ["--overwrite"]
    extra += ["--lr", f"{a.lr / 4:.3g}", "--gate-lr", f"{a.gate_lr / 4:.3g}"]
    return shlex.join(["python", "-m", "convert.from_ouro", *kept, *extra])


def _build(ouro, a, cache_mode: str, gate_type: str = "elementwise"):
    """An fp32 MELT model at the run's chunk size from `ouro`, the run's one read of the Ouro checkpoint."""
    from melt import MeltForCausalLM

    return MeltForCausalLM.from_ouro(ouro, cache_mode=cache_mode, gate_type=gate_type, dtype=torch.float32,
                                     chunk_size=a.chunk_size)


def _load_models(a, ouro):
    """The frozen teacher (Ouro exactly, `per_loop`) and the student to train (`shared`, new gates)."""
    teacher = _build(ouro, a, "per_loop")
    student = _build(ouro, a, "shared", a.gate_type)
    if a.seq_len > teacher.config.max_position_embeddings:
        raise ValueError(f"--seq-len {a.seq_len} exceeds the checkpoint's max_position_embeddings "
                         f"{teacher.config.max_position_embeddings}")
    teacher.requires_grad_(False).eval()
    # Neither loss involves the exit gate (the recipe distills logits and attention, not the exit
    # distribution), so it is frozen: it keeps Ouro's weights and has no optimizer state.
    student.model.early_exit_gate.requires_grad_(False)
    student.train()
    return teacher, student


def _load_tokenizer(a, ouro_dir: Path):
    """--tokenizer, or the checkpoint's own; a path that cannot hold one is refused before anything is loaded."""
    from transformers import AutoTokenizer, PreTrainedConfig

    from melt.ouro_checkpoint import looks_like_local_path

    if a.tokenizer and Path(a.tokenizer).expanduser().is_file():
        raise ValueError(f"--tokenizer {a.tokenizer} is a file; pass the directory that holds tokenizer.json")
    if a.tokenizer and looks_like_local_path(a.tokenizer) and not Path(a.tokenizer).expanduser().is_dir():
        raise ValueError(f"--tokenizer directory {a.tokenizer} does not exist (and it is not a Hub id); check the path")
    source = a.tokenizer or ouro_dir
    try:
        # A config is passed so that AutoTokenizer does not read config.json: Ouro's names its remote code in
        # auto_map, and reading it would ask "Do you wish to run the custom code?" (a 15 s prompt).
        return AutoTokenizer.from_pretrained(source, config=PreTrainedConfig())
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"cannot load a tokenizer from {source} ({first}); pass --tokenizer") from err


def _load_data(a, tokenizer, vocab_size: int):
    if len(tokenizer) > vocab_size:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the checkpoint's vocab_size is {vocab_size}")
    data = a.data if len(a.data) > 1 else a.data[0]
    documents = load_text_dataset(data, tokenizer, split=a.split, text_field=a.text_field)
    rows = pack_sequences(documents, tokenizer, a.seq_len, a.seed)  # [N, L]
    if rows.shape[0] <= a.holdout:
        raise ValueError(f"the data packs into {rows.shape[0]} sequences of {a.seq_len} tokens, not more than the "
                         f"--holdout {a.holdout}; add data or lower --seq-len/--holdout")
    return split_holdout(rows, a.holdout)


def _autocast(a, runtime):
    bf16 = a.precision == "bf16" or (a.precision == "auto" and runtime.device.type == "cuda")
    if not bf16:
        return contextlib.nullcontext
    return lambda: torch.autocast(runtime.device.type, dtype=torch.bfloat16)


def _full_student(student, a, ouro, runtime):
    """The trained student as a plain (unsharded, CPU) module on rank 0; None elsewhere. Collective."""
    if runtime.world == 1:
        return student.cpu().eval()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(student, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not runtime.is_main:
        return None
    plain = _build(ouro, a, "shared", a.gate_type)
    plain.load_state_dict(state)
    return plain.eval()


MODEL_CARD = """# {name}

A MELT model (one gated key/value row per token per layer) converted from the Ouro checkpoint `{ouro}` by
`python -m convert.from_ouro`; `report.json` compares it with its teacher per loop, `train_log.jsonl` has every step.

```python
from melt import MeltForCausalLM                       # with the melt package installed
model = MeltForCausalLM.from_pretrained("{out}")

from transformers import AutoModelForCausalLM, AutoTokenizer   # without it
model = AutoModelForCausalLM.from_pretrained("{out}", trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained("{out}", trust_remote_code=True)
```

The tokenizer needs no custom code, but `AutoTokenizer` reads `config.json` first, whose `auto_map` names MELT's
modeling code: without `trust_remote_code=True` (or `import melt` beforehand) it asks whether to run that code.
`PreTrainedTokenizerFast.from_pretrained("{out}")` loads it without asking.
"""


def _write_text_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_output(a, model, tokenizer_dir: Path, report: dict, work_dir: Path) -> None:
    """Write the converted model to a temporary sibling of --out, then rename it into place (an --overwrite'n
    --out is kept until the new one is complete: `atomic.staged_directory`). Any failure removes the temporary
    directory and raises an OSError naming the path and saying that --resume finishes without retraining."""
    out = a.out
    try:
        with atomic.staged_directory(out) as staging:
            model.config.use_cache = True
            model.save_pretrained(staging)
            for name in TOKENIZER_FILES:
                if (tokenizer_dir / name).is_file():
                    shutil.copy2(tokenizer_dir / name, staging / name)
            (staging / "report.json").write_text(json.dumps(report, indent=2) + "\n")
            if (work_dir / "log.jsonl").is_file():
                shutil.copy2(work_dir / "log.jsonl", staging / "train_log.jsonl")
            (staging / "README.md").write_text(MODEL_CARD.format(name=out.name, ouro=a.ouro, out=out))
    except Exception as err:
        if isinstance(err, training.Interrupted):
            raise
        staging = atomic.staging_dir(out)
        kept = f"the trained weights are safe in {work_dir / 'checkpoint.pt'}"
        then = "rerun the same command with --resume added (no retraining)"
        if training.is_disk_full(err):
            raise training.os_error(
                errno.ENOSPC, f"no space left on device while writing the converted model to {staging} "
                f"({training.free_bytes(out.parent)}); {kept}: free space there, then {then}"
            ) from err
        raise training.os_error(
            getattr(err, "errno", None) or errno.EIO,
            f"writing the converted model to {staging} failed ({type(err).__name__}: {err}); {kept}: fix the cause, "
            f"then {then}",
        ) from err


def _push(out: Path, repo: str) -> None:
    try:
        from huggingface_hub import HfApi

        api = HfApi()
        api.create_repo(repo, exist_ok=True)
        api.upload_folder(repo_id=repo, folder_path=str(out))
    except Exception as err:  # offline, no token, no permission: one clear message, the output stays
        raise OSError(f"--push-to-hub {repo} failed ({type(err).__name__}: {err}); the converted model is in {out}, "
                      "upload it later with `huggingface-cli upload`") from err


def run(argv=None) -> dict | None:
    """Convert as `argv` says; returns the report (rank 0) or None. Raises on bad inputs and failures."""
    from melt.ouro_checkpoint import OuroCheckpoint

    a = resolve_options(argv)
    a.retry_command = functools.partial(_retry_command, list(sys.argv[1:] if argv is None else argv), a)
    runtime = training.init_runtime(a.device)
    try:
        torch.manual_seed(a.seed)
        if a.exit_gate_steps and runtime.world > 1:
            raise ValueError(f"--exit-gate-steps runs in a single process; this run has {runtime.world}: convert "
                             "without it, then fit the gate of the output in one process")
        _check_paths(a, runtime)
        ouro = OuroCheckpoint(a.ouro, what="--ouro checkpoint")  # read once: every model of the run is built from it
        tokenizer = _load_tokenizer(a, ouro.directory)
        teacher, student = _load_models(a, ouro)
        if not runtime.is_main:
            ouro.release()  # only rank 0 builds models after training (the full student, the report's models)
        train_rows, eval_rows = _load_data(a, tokenizer, teacher.config.vocab_size)
        if a.gradient_checkpointing or (a.gradient_checkpointing is None and runtime.device.type == "cuda"):
            student.activation_checkpointing_enable()
        fingerprint = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items() if k in FINGERPRINT}
        fingerprint["world_size"] = runtime.world
        teacher = training.prepare_model(teacher, runtime)
        student = training.prepare_model(student, runtime)
        _start_work_dir(a, runtime, train_rows)
        autocast = _autocast(a, runtime)
        started = time.time()
        done = training.train(student, teacher, train_rows, a, runtime, a.work_dir, fingerprint, autocast, a.resume)
        total = a.phase1_steps + a.phase2_steps
        if done < total:
            if runtime.is_main:
                print(f"stopped after step {done} of {total} (--stop-after); checkpoint in {a.work_dir}; "
                      "continue with --resume", flush=True)
            return None
        if a.exit_gate_steps:  # deterministic (seeded), so a --resume after an interrupted evaluation redoes it alike
            from .exit_gate import train_exit_gate

            history = train_exit_gate(student, train_rows, a.exit_gate_steps, seed=a.seed, autocast=autocast)
            if runtime.is_main:
                print(f"exit gate: {a.exit_gate_steps} steps, loss {history[0]:.4f} -> {history[-1]:.4f}", flush=True)
        train_seconds = time.time() - started

        final = _full_student(student, a, ouro, runtime)
        report = None
        if runtime.is_main:
            report = _evaluate_and_write(a, ouro, final, eval_rows, runtime, autocast, train_seconds)
        runtime.barrier()
        return report
    finally:
        if runtime.world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _start_work_dir(a, runtime, train_rows: torch.Tensor) -> None:
    """Rank 0 makes the work directory (emptied first when the run starts over) and says what the run will do."""
    if runtime.is_main:
        if a.work_dir.exists() and ((a.overwrite and not a.resume) or a.stale_work_dir):
            shutil.rmtree(a.work_dir)  # only this converter's files (checked by _check_paths)
        a.work_dir.mkdir(parents=True, exist_ok=True)
        tokens = a.batch_size * a.seq_len
        print(f"converting {a.ouro} -> {a.out} (preset {a.preset}): {train_rows.shape[0]} training sequences of "
              f"{a.seq_len} tokens, {tokens} tokens/step, phase 1 {a.phase1_steps} + phase 2 {a.phase2_steps} steps, "
              f"{runtime.world} process(es) on {runtime.device.type}", flush=True)
    runtime.barrier()


def _evaluate_and_write(a, ouro, final, eval_rows, runtime, autocast, train_seconds) -> dict:
    """The two stages after training, each resumable (rank 0): the evaluation (kept as report.json, so a --resume
    after an interrupted final write does not redo it), then the final write; returns the report."""
    total = a.phase1_steps + a.phase2_steps
    report_path = a.work_dir / "report.json"
    if a.resume and report_path.is_file():  # the evaluation finished before an interrupted final write
        report = json.loads(report_path.read_text())
    else:
        with training.raise_on_signals(total, "evaluation"):
            report = _evaluate(a, ouro, final, eval_rows, runtime, autocast, train_seconds)
            _write_text_atomically(report_path, json.dumps(report, indent=2) + "\n")
    tokenizer_dir = Path(a.tokenizer) if a.tokenizer and Path(a.tokenizer).is_dir() else ouro.directory
    with training.raise_on_signals(total, "final write"):
        _write_output(a, final, tokenizer_dir, report, a.work_dir)
    if not a.keep_work_dir:
        shutil.rmtree(a.work_dir, ignore_errors=True)
    print("held-out comparison with the teacher (KL(teacher || model) per token, next-token CE), per loop:")
    print(format_report(report["per_loop"]))
    print(f"wrote {a.out}")
    if a.push_to_hub:
        _push(a.out, a.push_to_hub)
    return report


def _evaluate(a, ouro, final, eval_rows, runtime, autocast, train_seconds) -> dict:
    """The report: teacher vs trained student vs the training-free `last` conversion on the held-out rows."""
    eval_device = runtime.device
    plain_teacher = _build(ouro, a, "per_loop").to(eval_device)
    last = _build(ouro, a, "shared", "last").to(eval_device)
    comparison = compare_to_teacher(plain_teacher, {"student": final.to(eval_device), "last (no training)": last},
                                    eval_rows, a.eval_batch_size, eval_device, autocast)
    final.cpu()
    return {
        "ouro": a.ouro, "data": a.data, "preset": a.preset, "gate_type": a.gate_type,
        "steps": {"phase1": a.phase1_steps, "phase2": a.phase2_steps}, "interpolation": not a.no_interpolation,
        "seq_len": a.seq_len, "chunk_size": a.chunk_size, "batch_size": a.batch_size,
        "processes": runtime.world, "device": runtime.device.type, "train_seconds": round(train_seconds, 1),
        "heldout": {"sequences": int(eval_rows.shape[0]), "tokens": int(eval_rows.numel())},
        "per_loop": comparison,
        "student_closer_than_last": sum(comparison["student"]["kl"]) < sum(comparison["last (no training)"]["kl"]),
    }


def main(argv=None) -> int:
    """Command-line entry: errors are printed as one line (no traceback) with a non-zero status."""
    try:
        run(argv)
    except training.Interrupted as stop:
        if stop.stage == "training":
            print(f"{stop}; checkpoint saved, continue with --resume", file=sys.stderr)
        else:
            print(f"{stop}; the trained weights are checkpointed: rerun the same command with --resume added to "
                  f"finish the {stop.stage} without retraining", file=sys.stderr)
        return 128 + stop.signum
    except KeyboardInterrupt:  # outside training and its stages (loading models or data)
        print("interrupted; run the command again (with --resume if the work directory holds a checkpoint.pt)",
              file=sys.stderr)
        return 130
    except (ValueError, OSError, training.NonFiniteLoss) as err:
        print("error: " + " ".join(str(err).split()), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
