"""The conversion's step (`distill_step` under a `Recipe`), its losses, its alpha schedule, and the
teacher-vs-student comparison of the report.

* Knowledge distillation (both phases): `KL(teacher || student)` of the next-token distributions of
  EVERY loop (a looped model exits at any loop, so every loop's logits must stay Ouro's), per token,
  averaged over tokens then over loops, computed in fp32. A temperature tau softens both
  distributions and the loss is multiplied by tau^2 so that its gradient scale does not depend on tau
  (Hinton et al.); the default tau = 1 distills the distributions as they are used at inference.
  Training computes it from the loops' final hidden states (`kd_loss_from_hidden`), block of tokens by
  block, recomputing each block's logits in backward: the full-vocabulary logits of every loop are never
  held (at the published shape, 4 loops x 10,000 tokens x 49,152 words, the fp32 softmaxes that backward
  keeps would be ~16 GB per sequence).
* Attention alignment (phase 2): `beta * mean over (loop, layer)` of the mean squared error between the
  student's and the (detached) teacher's attention outputs before o_proj (`[B, L, H*D]`), averaged over
  elements: the per-element mean keeps beta's meaning independent of the hidden size.
* Alpha (phase 1): the key/value blend `alpha * KV_melt + (1 - alpha) * KV_loop` rises linearly from 0 on
  the first step of phase 1 to 1 on its last; phase 2 runs at alpha = 1 (pure MELT). Without interpolation
  (the ablation) alpha is 1 from the first step.
* One step (`distill_step`): the frozen teacher's forward without grad, the student's at the step's alpha, and
  the loss terms of the step's phase; the training loop (`convert/train.py`) only batches, backpropagates and
  optimizes.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

KD_BLOCK_TOKENS = 1024  # tokens (per sequence) whose logits exist at once in `kd_loss_from_hidden`


def alpha_at(step: int, phase1_steps: int, interpolate: bool = True) -> float:
    """The key/value blend alpha of global step `step` (0-based); phase 1 is steps [0, phase1_steps).

    `interpolate=False` is the no-interpolation ablation: alpha = 1 (pure MELT) on every step.
    """
    if not interpolate or step >= phase1_steps or phase1_steps <= 1:
        return 1.0
    return step / (phase1_steps - 1)


@dataclass(frozen=True)
class Recipe:
    """What the conversion does at each step: phase 1 is steps [0, phase1_steps), phase 2 the next phase2_steps."""

    phase1_steps: int
    phase2_steps: int
    interpolate: bool = True  # False: the no-interpolation ablation (alpha = 1 from the first step)
    beta: float = 0.1  # weight of the phase-2 attention alignment
    temperature: float = 1.0  # KD temperature tau

    @classmethod
    def from_options(cls, opts) -> Recipe:
        """The recipe of the converter's options (`python -m convert.from_ouro`'s, or any object with their names)."""
        return cls(opts.phase1_steps, opts.phase2_steps, not opts.no_interpolation, opts.beta, opts.temperature)

    @property
    def total_steps(self) -> int:
        return self.phase1_steps + self.phase2_steps

    def phase_at(self, step: int) -> int:
        return 1 if step < self.phase1_steps else 2

    def alpha_at(self, step: int) -> float:
        return alpha_at(step, self.phase1_steps, self.interpolate)


def token_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher || student) per token: `[B, L, V]` logits -> `[B, L]` (fp32)."""
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def kd_loss(
    student_loop_logits: Sequence[torch.Tensor], teacher_loop_logits: Sequence[torch.Tensor], temperature: float = 1.0
) -> torch.Tensor:
    """Mean over loops of the token-averaged KL(teacher || student), times temperature^2. Scalar."""
    if len(student_loop_logits) != len(teacher_loop_logits):
        raise ValueError(f"student has {len(student_loop_logits)} loops, teacher {len(teacher_loop_logits)}")
    terms = [token_kl(s, t.detach(), temperature).mean() for s, t in zip(student_loop_logits, teacher_loop_logits)]
    return torch.stack(terms).mean() * temperature**2


def kd_loss_from_hidden(
    student_head: torch.nn.Module,
    student_hidden: Sequence[torch.Tensor],
    teacher_head: torch.nn.Module,
    teacher_hidden: Sequence[torch.Tensor],
    temperature: float = 1.0,
    block_tokens: int = KD_BLOCK_TOKENS,
) -> torch.Tensor:
    """`kd_loss` of the heads' logits of per-loop hidden states (`[B, L, hidden]` each), one token block at a time.

    Equal to `kd_loss([student_head(h) ...], [teacher_head(h) ...])` up to summation order. With grad, each
    block's KL is checkpointed, so backward keeps only the hidden states and recomputes the block's logits.
    """
    if len(student_hidden) != len(teacher_hidden):
        raise ValueError(f"student has {len(student_hidden)} loops, teacher {len(teacher_hidden)}")
    if block_tokens < 1:
        raise ValueError(f"block_tokens must be >= 1, got {block_tokens}")

    def block_kl(student_block: torch.Tensor, teacher_block: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            teacher_logits = teacher_head(teacher_block)
        return token_kl(student_head(student_block), teacher_logits, temperature).sum()

    terms = []
    for student_states, teacher_states in zip(student_hidden, teacher_hidden):
        batch, length = student_states.shape[:2]
        teacher_states = teacher_states.detach()
        total = 0.0
        for start in range(0, length, block_tokens):
            blocks = (student_states[:, start : start + block_tokens], teacher_states[:, start : start + block_tokens])
            if torch.is_grad_enabled() and student_states.requires_grad:
                total = total + checkpoint(block_kl, *blocks, use_reentrant=False)
            else:
                total = total + block_kl(*blocks)
        terms.append(total / (batch * length))
    return torch.stack(terms).mean() * temperature**2


def alignment_loss(student_attention, teacher_attention) -> torch.Tensor:
    """Mean over (loop, layer) of MSE(o_student, stopgrad(o_teacher)); inputs are T tuples of N `[B, L, H*D]`."""
    terms = [
        F.mse_loss(s.float(), t.detach().float())
        for s_loop, t_loop in zip(student_attention, teacher_attention, strict=True)
        for s, t in zip(s_loop, t_loop, strict=True)
    ]
    return torch.stack(terms).mean()


@dataclass(frozen=True)
class StepLoss:
    """One `distill_step`: its loss terms (scalars; `total` carries the student's graph) and where it stood."""

    kd: torch.Tensor
    align: torch.Tensor  # zero in phase 1
    total: torch.Tensor  # kd + beta * align
    phase: int
    alpha: float


def distill_step(student, teacher, batch: torch.Tensor, step: int, recipe: Recipe,
                 autocast=contextlib.nullcontext) -> StepLoss:
    """The loss of global step `step` on `batch` `[B, L]` (on the models' device); backward is the caller's.

    The teacher runs without grad; the student at the step's alpha. Neither makes full per-loop logits
    (`logits_to_keep=1`): `kd_loss_from_hidden` makes them block by block. Attention outputs are returned only
    in phase 2, where the alignment reads them (~4 GB per sequence at the published shape otherwise).
    """
    phase, alpha = recipe.phase_at(step), recipe.alpha_at(step)
    aligned = phase == 2
    with torch.no_grad(), autocast():
        t_out = teacher(batch, use_cache=False, return_loop_outputs=True, logits_to_keep=1,
                        return_attention_outputs=aligned)
    with autocast():
        s_out = student(batch, use_cache=False, return_loop_outputs=True, kv_blend_alpha=alpha, logits_to_keep=1,
                        return_attention_outputs=aligned)
        kd = kd_loss_from_hidden(student.lm_head, s_out.loop_hidden_states, teacher.lm_head, t_out.loop_hidden_states,
                                 recipe.temperature)
    align = alignment_loss(s_out.attention_outputs, t_out.attention_outputs) if aligned else kd.new_zeros(())
    return StepLoss(kd, align, kd + recipe.beta * align, phase, alpha)


@torch.no_grad()
def compare_to_teacher(
    teacher, models: dict, rows: torch.Tensor, batch_size: int, device: torch.device, autocast=contextlib.nullcontext
) -> dict:
    """Per-loop KL(teacher || model) and next-token cross-entropy of each model on held-out `rows` `[N, L]`.

    Returns `{"teacher": {"ce": [T]}, name: {"kl": [T], "ce": [T]}, ...}`, token-averaged over all rows.
    """
    sums = {"teacher": {"ce": None}} | {name: {"kl": None, "ce": None} for name in models}
    count = 0
    for start in range(0, rows.shape[0], batch_size):
        batch = rows[start : start + batch_size].to(device)  # [b, L]
        targets = batch[:, 1:].flatten()
        with autocast():
            t_logits = teacher(batch, use_cache=False, return_loop_outputs=True).loop_logits
        teacher_ce = [F.cross_entropy(x[:, :-1].float().flatten(0, 1), targets, reduction="sum") for x in t_logits]
        results = {"teacher": {"ce": teacher_ce}}
        for name, model in models.items():
            with autocast():
                logits = model(batch, use_cache=False, return_loop_outputs=True).loop_logits
            results[name] = {
                "kl": [token_kl(s, t).sum() for s, t in zip(logits, t_logits)],
                "ce": [F.cross_entropy(x[:, :-1].float().flatten(0, 1), targets, reduction="sum") for x in logits],
            }
        for name, metrics in results.items():
            for key, values in metrics.items():
                values = torch.stack(values).double().cpu()
                sums[name][key] = values if sums[name][key] is None else sums[name][key] + values
        count += batch.numel()
    ce_count = rows.shape[0] * (rows.shape[1] - 1)
    return {
        name: {key: [round(v / (count if key == "kl" else ce_count), 6) for v in values.tolist()]
               for key, values in metrics.items()}
        for name, metrics in sums.items()
    }


def format_report(report: dict) -> str:
    """A small per-loop table of the comparison (see `compare_to_teacher`)."""
    loops = len(report["teacher"]["ce"])
    header = f"{'model':<22}" + "".join(f"{'loop ' + str(t + 1):>22}" for t in range(loops))
    lines = [header, f"{'':<22}" + "".join(f"{'KL(T||m)   CE':>22}" for _ in range(loops))]
    for name, metrics in report.items():
        cells = []
        for t in range(loops):
            kl = metrics.get("kl", [math.nan] * loops)[t]
            cells.append(f"{('-' if math.isnan(kl) else f'{kl:.4f}'):>12} {metrics['ce'][t]:>8.4f} ")
        lines.append(f"{name:<22}" + "".join(f"{c:>22}" for c in cells))
    return "\n".join(lines)
