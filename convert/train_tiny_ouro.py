"""Train the project's tiny Ouro-format checkpoint (the converter's embedded default teacher).

It is a LoopLM exactly as Ouro defines it (`MeltForCausalLM` in `cache_mode="per_loop"`): a few small
layers looped 4 times, the vocabulary of the project's tokenizer (`convert/assets/tokenizer`), trained
from scratch on the synthetic corpus (`convert/assets/tiny_corpus.jsonl`) packed into short rows.
Choices:

* Loss: next-token cross-entropy averaged over ALL loops' logits (Ouro's pre-training puts a loss on
  every loop; the exit-gate's entropy-regularised objective is left out). Every loop then produces
  sensible logits, which is what per-loop distillation needs from a teacher.
* Then the exit gate alone, as Ouro's second stage fits it (`convert/exit_gate.py`, `--exit-gate-steps`,
  300 by default; the rest of the model frozen): it learns where another loop stops lowering the loss,
  which is what `early_exit_threshold` needs. Distillation never reads the gate.
* AdamW (lr 3e-3, betas 0.9/0.95, weight decay 0.1), linear warm-up then cosine decay, gradient
  clipping at 1.0, fp32, seeded; the data order is a seeded permutation per epoch.
* Output: Ouro's checkpoint format (MELT_SPEC section 1), written by `convert/ouro_writer.py`: `config.json`
  with model_type "ouro", `total_ut_steps` and Ouro's field names, `model.safetensors` with Ouro's tensor
  names (this project's per_loop names are the same), the tokenizer files, renamed into place atomically.

Command line (about 4 minutes on 2 CPU cores)::

    python -m convert.train_tiny_ouro --out convert/assets/tiny-ouro
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from melt import MeltConfig, MeltForCausalLM

from .data import TINY_CORPUS, TINY_TOKENIZER, load_text_dataset, pack_sequences
from .exit_gate import train_exit_gate
from .ouro_writer import write_ouro_checkpoint

ARCHITECTURE = dict(  # the tiny teacher's shape
    hidden_size=64,
    intermediate_size=192,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    head_dim=16,
    num_loops=4,
    max_position_embeddings=512,
    rope_theta=10_000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
)


def teacher_config(tokenizer, **changes) -> MeltConfig:
    """The tiny teacher's per_loop config over `tokenizer` (its vocabulary and special tokens): `ARCHITECTURE`, with
    `changes` to it (the reproduction benchmark's teachers differ in loops and length)."""
    return MeltConfig(
        vocab_size=len(tokenizer), cache_mode="per_loop", bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **{**ARCHITECTURE, **changes},
    )


def pretraining_optimizer(model: torch.nn.Module, lr: float, steps: int):
    """AdamW (weight decay 0.1 on matrices only, betas 0.9 / 0.95) and its schedule for `steps` steps: linear
    warm-up over the first 5%, then cosine from `lr` down to `lr / 10`. Returns `(optimizer, scheduler)`."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95)
    )
    warmup = max(1, steps // 20)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def pretraining_step(loss: torch.Tensor, model: torch.nn.Module, optimizer, schedule) -> None:
    """One update of the pretraining recipe: backward, gradient norm clipped to 1, optimizer and schedule step."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    schedule.step()


def train(out: Path, steps: int, batch_size: int, seq_len: int, lr: float, seed: int,
          exit_gate_steps: int = 300) -> dict:
    from transformers import AutoTokenizer

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(TINY_TOKENIZER)
    rows = pack_sequences(load_text_dataset(TINY_CORPUS, tokenizer), tokenizer, seq_len, seed)  # [N, L]
    model = MeltForCausalLM(teacher_config(tokenizer)).train()
    params = sum(p.numel() for p in model.parameters())
    optimizer, schedule = pretraining_optimizer(model, lr, steps)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(rows.shape[0], generator=generator)
    cursor, start = 0, time.time()
    for step in range(steps):
        if cursor + batch_size > len(order):
            order, cursor = torch.randperm(rows.shape[0], generator=generator), 0
        batch = rows[order[cursor : cursor + batch_size]]  # [B, L]
        cursor += batch_size
        output = model(batch, use_cache=False, return_loop_outputs=True)
        losses = [
            F.cross_entropy(logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten()) for logits in output.loop_logits
        ]
        loss = torch.stack(losses).mean()
        pretraining_step(loss, model, optimizer, schedule)
        if step % 50 == 0 or step == steps - 1:
            per_loop = " ".join(f"{x.item():.3f}" for x in losses)
            elapsed = time.time() - start
            print(f"step {step:5d}  loss {loss.item():.4f}  per loop [{per_loop}]  {elapsed:.0f}s", flush=True)
    model.eval()
    gate_history = train_exit_gate(model, rows, exit_gate_steps, seed=seed) if exit_gate_steps else []
    write_ouro_checkpoint(model, TINY_TOKENIZER, out)
    summary = {"params": params, "steps": steps, "final_loss_per_loop": [x.item() for x in losses],
               "exit_gate_loss": [round(gate_history[0], 4), round(gate_history[-1], 4)] if gate_history else None,
               "seconds": round(time.time() - start, 1)}
    print(f"wrote {out} ({params} parameters): {summary}")
    return summary


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=TINY_CORPUS.parent / "tiny-ouro",
                        help="output directory (replaced)")
    parser.add_argument("--steps", type=int, default=400, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per step")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per packed sequence")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    parser.add_argument("--seed", type=int, default=0, help="seed of the init and the data order")
    parser.add_argument("--exit-gate-steps", type=int, default=300, help="steps of the exit-gate stage (0: none)")
    args = parser.parse_args(argv)
    train(args.out, args.steps, args.batch_size, args.seq_len, args.lr, args.seed, args.exit_gate_steps)


if __name__ == "__main__":
    main()
