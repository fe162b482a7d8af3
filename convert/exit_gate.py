"""Training the exit gate on its own, after Ouro's second training stage (LoopLM, arXiv 2510.25741).

The looped model is frozen; only `model.early_exit_gate` learns. For each token and each loop t but the last, the
next-token loss at loop t and at loop t + 1 give the improvement another loop buys, `I_t = max(0, L_t - L_{t+1})`.
The gate's hazard at loop t (its probability of stopping there) is fitted by binary cross-entropy to
`1 - sigmoid(k * (I_t - gamma))`: stop where one more loop no longer lowers the loss by about `gamma` nats
(k = 50, gamma = 0.005 by default). The last loop's hazard is never used (it takes the remaining mass), so it is
not fitted. This is what makes `early_exit_threshold` spend loops where they help.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F


def exit_gate_targets(loop_losses: torch.Tensor, k: float = 50.0, gamma: float = 0.005) -> torch.Tensor:
    """`[T, N]` per-loop next-token losses -> `[T - 1, N]` target hazards (probability of stopping at loop t)."""
    improvement = (loop_losses[:-1] - loop_losses[1:]).clamp(min=0.0)
    return 1.0 - torch.sigmoid(k * (improvement - gamma))


def exit_gate_loss(model, rows: torch.Tensor, k: float = 50.0, gamma: float = 0.005) -> torch.Tensor:
    """The gate's loss on `rows` `[B, L]`: the model runs frozen (no graph), only the gate's logits carry grad."""
    with torch.no_grad():
        out = model(rows, use_cache=False, return_loop_outputs=True)
        targets = rows[:, 1:].flatten()
        losses = torch.stack([
            F.cross_entropy(logits[:, :-1].float().flatten(0, 1), targets, reduction="none")
            for logits in out.loop_logits
        ])  # [T, B * (L - 1)]
        wanted = exit_gate_targets(losses, k, gamma)
    gate = model.model.early_exit_gate
    logits = torch.stack([gate(h[:, :-1]).flatten().float() for h in out.loop_hidden_states[:-1]])  # [T - 1, N]
    return F.binary_cross_entropy_with_logits(logits, wanted)


def train_exit_gate(model, rows: torch.Tensor, steps: int, lr: float = 1e-2, batch_size: int = 8, seed: int = 0,
                    k: float = 50.0, gamma: float = 0.005, autocast=contextlib.nullcontext) -> list[float]:
    """Fit `model.early_exit_gate` on `rows` `[N, L]` (any device: batches move to the model's) for `steps` AdamW
    steps, everything else frozen (restored after); returns the loss of each step. Seeded batches, so a run (and
    its rerun after an interrupted conversion) is reproducible."""
    gate = model.model.early_exit_gate
    trainable = {name: p.requires_grad for name, p in model.named_parameters()}
    model.requires_grad_(False)
    gate.requires_grad_(True)
    optimizer = torch.optim.AdamW(gate.parameters(), lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    history = []
    try:
        for _ in range(steps):
            batch = rows[torch.randint(0, rows.shape[0], (min(batch_size, rows.shape[0]),), generator=generator)]
            with autocast():
                loss = exit_gate_loss(model, batch.to(gate.weight.device), k, gamma)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            history.append(loss.item())
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(trainable[name])
    return history
