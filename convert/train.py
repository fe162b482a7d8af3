"""The conversion's training loop: distributed set-up, data order, checkpoints, signals, NaN guard. What a step
computes (phase, alpha, losses) is `distill.distill_step`'s; the loop batches, backpropagates, clips and steps.

* Distributed: under `torchrun` (WORLD_SIZE > 1) a process group is created (nccl on CUDA, gloo on CPU)
  with an explicit 1-D device mesh, and both the student and the frozen teacher are sharded with FSDP2
  (`fully_shard` on every decoder layer, then on the root). A single process runs the plain modules.
* Data order: global step s takes rows `perm_e[(s * B + i) mod N]`, i < B, of a permutation `perm_e` drawn
  from `seed + epoch`: the order is a pure function of (seed, step), so a resumed run sees exactly the
  batches an uninterrupted one would. Rank r takes the r-th contiguous slice of the global batch, split into
  micro-batches; each micro-batch's loss is divided by the number of micro-batches and FSDP averages over
  ranks, so the gradient is the global-batch mean whatever the number of processes.
* Checkpoint (`<work>/checkpoint.pt`): full (unsharded) model and optimizer state keyed by parameter name,
  the scheduler, the step (= data position), the RNG states and the options that must not change on
  resume; written to a temporary file and renamed, so the previous one survives a crash mid-write.
  The last step is always checkpointed, so the trained weights are on disk before the evaluation and the
  final write (both resumable: `--resume` after a complete training goes straight to them). A failed write
  removes its temporary file and says which file system ran out of space.
* SIGTERM/SIGINT: the current step finishes, a checkpoint is written, and the run stops (`Interrupted`).
  After training (`raise_on_signals`), either signal stops the evaluation or the final write at once.
* A non-finite loss raises `NonFiniteLoss` before the optimizer step: the weights on disk (the last
  checkpoint) are the last good ones. `--resume --change-lr` continues from them with new learning rates.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import random
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from melt.modeling_melt import GATE_MARKER

from . import distill


class NonFiniteLoss(RuntimeError):
    """A step's loss was NaN or inf: training stops before the optimizer step; the last checkpoint is kept."""


class Interrupted(Exception):
    """SIGTERM/SIGINT stopped the run: during `stage` "training" after `step` steps (checkpointed), or during the
    "evaluation" / "final write" that follow a complete, checkpointed training."""

    def __init__(self, signum: int, step: int, stage: str = "training"):
        where = f"after step {step}" if stage == "training" else f"during the {stage} (training complete, step {step})"
        super().__init__(f"interrupted by {signal.Signals(signum).name} {where}")
        self.signum, self.step, self.stage = signum, step, stage


LR_OPTIONS = ("lr", "gate_lr")  # fingerprint entries that `--resume --change-lr` may change


def is_disk_full(err: BaseException | None) -> bool:
    """Whether `err` (or an exception it was raised from) is a full disk or quota: Python's OSError, or the
    text of safetensors' / torch's own write errors."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(text in str(err) for text in ("No space left", "os error 28", "Disk quota exceeded", "os error 122")):
            return True
        err = err.__cause__ or err.__context__
    return False


def os_error(code: int, message: str) -> OSError:
    """An OSError with `errno` set whose text is `message` alone (OSError(code, message) prints "[Errno N] ...")."""
    err = OSError(message)
    err.errno = code
    return err


def free_bytes(path: Path) -> str:
    """Free space on the file system of `path` (or of its nearest existing parent), for error messages."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            return f"{shutil.disk_usage(candidate).free:,} bytes free on {candidate}"
    return "free space unknown"


@dataclass
class Runtime:
    rank: int
    world: int
    device: torch.device
    mesh: object | None  # the FSDP2 device mesh when world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def all_mean(self, values: torch.Tensor) -> torch.Tensor:
        if self.world == 1:
            return values
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)  # gloo has no AVG
        return values / self.world


def init_runtime(device: str = "auto") -> Runtime:
    """One process, or the torchrun process group with a device mesh (nccl on CUDA, gloo on CPU)."""
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but CUDA is not available")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    mesh = None
    if world > 1:
        from torch.distributed.device_mesh import init_device_mesh

        if not dist.is_initialized():
            dist.init_process_group("nccl" if use_cuda else "gloo")
        mesh = init_device_mesh(dev.type, (world,))
    return Runtime(rank, world, dev, mesh)


def prepare_model(model, runtime: Runtime):
    """Move to the device; shard with FSDP2 (every decoder layer, then the root) when distributed."""
    if runtime.world == 1:
        return model.to(runtime.device)
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer, mesh=runtime.mesh)
    fully_shard(model, mesh=runtime.mesh)
    return model


def batch_rows(step: int, batch_size: int, num_rows: int, seed: int) -> torch.Tensor:
    """Global batch of step `step`: `[batch_size]` row indices, a pure function of (seed, step)."""
    positions = torch.arange(step * batch_size, (step + 1) * batch_size)
    out = torch.empty(batch_size, dtype=torch.long)
    for epoch in positions.div(num_rows, rounding_mode="floor").unique().tolist():
        perm = torch.randperm(num_rows, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        here = positions.div(num_rows, rounding_mode="floor") == epoch
        out[here] = perm[positions[here] % num_rows]
    return out


def make_optimizer(model, lr: float, gate_lr: float, weight_decay: float):
    """AdamW with two groups: Ouro's weights at `lr`, the new gate weights (names with '.gate.') at `gate_lr`."""
    ouro = [p for n, p in model.named_parameters() if p.requires_grad and GATE_MARKER not in n]
    gate = [p for n, p in model.named_parameters() if p.requires_grad and GATE_MARKER in n]
    groups = [{"params": ouro, "lr": lr, "name": "ouro"}]
    if gate:
        groups.append({"params": gate, "lr": gate_lr, "name": "gate"})
    return torch.optim.AdamW(groups, betas=(0.9, 0.95), weight_decay=weight_decay)


def make_scheduler(optimizer, warmup_steps: int):
    """Linear warm-up over `warmup_steps`, then constant."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup_steps) if warmup_steps else 1.0
    )


# -- checkpoints ----------------------------------------------------------------------------------------------


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, model, optimizer, scheduler, step: int, fingerprint: dict, runtime: Runtime) -> None:
    """Full state at the end of `step` steps; every rank must call it (gathering is collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state, optim_state = get_state_dict(model, optimizer, options=options)
    if runtime.is_main:
        payload = {
            "step": step, "model": model_state, "optimizer": optim_state, "scheduler": scheduler.state_dict(),
            "rng": _rng_state(), "fingerprint": fingerprint, "world_size": runtime.world,
        }
        tmp = path.with_name(path.name + ".tmp")
        try:
            # A Python file: a full disk raises OSError(ENOSPC), not torch's "unexpected pos".
            with open(tmp, "wb") as file:
                torch.save(payload, file)
            os.replace(tmp, path)  # atomic: the previous checkpoint stays valid until this rename
        except BaseException as err:
            tmp.unlink(missing_ok=True)
            if isinstance(err, Exception) and is_disk_full(err):
                kept = ("the previous checkpoint is intact", "continue with --resume") if path.exists() else \
                    ("no earlier checkpoint exists", "run the same command again (nothing to resume)")
                raise os_error(
                    errno.ENOSPC, f"no space left on device while writing the checkpoint {path} of step {step} "
                    f"({free_bytes(path.parent)}); {kept[0]}: free space there (or pass --work-dir on a larger disk), "
                    f"then {kept[1]}"
                ) from err
            raise
    runtime.barrier()


def read_checkpoint(path: Path) -> dict:
    """The checkpoint's payload; a file that cannot be read raises one ValueError naming it."""
    try:
        # Our own file (it holds Python/NumPy RNG states, which weights_only loading rejects).
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # truncated or foreign: torch raises RuntimeError, EOFError, UnpicklingError ...
        raise ValueError(f"cannot read the checkpoint {path} ({type(err).__name__}: {err}); it is truncated or not "
                         "this converter's: start over with --overwrite") from None
    if not isinstance(payload, dict) or not {"step", "model", "optimizer", "fingerprint"} <= set(payload):
        raise ValueError(f"{path} is not a checkpoint of this converter; start over with --overwrite")
    return payload


def load_checkpoint(path: Path, model, optimizer, scheduler, fingerprint: dict, change_lr: bool = False) -> int:
    """Restore `path` into the model, optimizer, scheduler and RNGs; returns its step. The options in
    `fingerprint` must equal the checkpoint's, except the learning rates when `change_lr` (then the new rates
    replace the checkpoint's, warm-up position kept)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    payload = read_checkpoint(path)
    saved = payload["fingerprint"]
    changed = {k: (saved.get(k), v) for k, v in fingerprint.items() if saved.get(k) != v}
    if change_lr:
        changed = {k: v for k, v in changed.items() if k not in LR_OPTIONS}
    if changed:
        detail = ", ".join(f"{k}: checkpoint {old!r}, now {new!r}" for k, (old, new) in changed.items())
        only_lr = "" if change_lr else " (to change only --lr/--gate-lr, add --change-lr)"
        raise ValueError(
            f"--resume with options that differ from the checkpoint's ({detail}); use the same options{only_lr}"
        )
    set_state_dict(
        model, optimizer, model_state_dict=payload["model"], optim_state_dict=payload["optimizer"],
        options=StateDictOptions(full_state_dict=True),
    )
    scheduler.load_state_dict(payload["scheduler"])
    if change_lr:
        base = {"ouro": fingerprint["lr"], "gate": fingerprint["gate_lr"]}
        for i, group in enumerate(optimizer.param_groups):
            group["initial_lr"] = scheduler.base_lrs[i] = base[group["name"]]
            group["lr"] = scheduler.base_lrs[i] * scheduler.lr_lambdas[i](scheduler.last_epoch)
    _set_rng_state(payload["rng"])
    return payload["step"]


# -- the loop -------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _handling_stop_signals(handler):
    """SIGTERM/SIGINT go to `handler` inside the block; the previous handlers come back after. Outside the main
    thread signals cannot be handled and are left alone."""
    previous = {}
    try:
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, handler)
    except ValueError:  # not the main thread
        pass
    try:
        yield
    finally:
        for sig, handler_before in previous.items():
            signal.signal(sig, handler_before)


@contextlib.contextmanager
def stop_signals():
    """Record SIGTERM/SIGINT instead of dying, so the loop can checkpoint; restore the handlers after."""
    received = []
    with _handling_stop_signals(lambda signum, frame: received.append(signum)):
        yield received


def _logged_step(line: str) -> float:
    """The step of a log line; a line cut short by a crash or a full disk counts as after every checkpoint."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


@contextlib.contextmanager
def raise_on_signals(step: int, stage: str):
    """SIGTERM/SIGINT raise `Interrupted(signum, step, stage)` at once (the work is already checkpointed, so
    nothing is gained by finishing `stage`); restore the handlers after."""

    def handler(signum, frame):
        raise Interrupted(signum, step, stage)

    with _handling_stop_signals(handler):
        yield


def _resume(checkpoint: Path, log_path: Path, student, optimizer, scheduler, fingerprint: dict, opts,
            runtime: Runtime) -> int:
    """Restore `checkpoint` and drop the logged steps after it (they are redone); returns its step."""
    start = load_checkpoint(checkpoint, student, optimizer, scheduler, fingerprint, getattr(opts, "change_lr", False))
    if runtime.is_main and log_path.exists():
        kept = [line for line in log_path.read_text(errors="replace").splitlines() if _logged_step(line) < start]
        log_path.write_text("".join(line + "\n" for line in kept))
    return start


def _accumulate_gradients(student, teacher, rows: torch.Tensor, step: int, recipe: distill.Recipe, opts,
                          runtime: Runtime, autocast) -> tuple[torch.Tensor, distill.StepLoss]:
    """Backward of `distill.distill_step` over this rank's micro-batches of global step `step`, each loss divided
    by their number (FSDP averages over ranks): the gradient is the global-batch mean. Returns the terms
    `[kd, align, total]` averaged over the global batch (fp64, CPU) and the last micro-batch's step."""
    per_rank = opts.batch_size // runtime.world
    micro = opts.micro_batch_size
    n_micro = per_rank // micro
    index = batch_rows(step, opts.batch_size, rows.shape[0], opts.seed)
    local = index[runtime.rank * per_rank : (runtime.rank + 1) * per_rank]
    terms = torch.zeros(3, dtype=torch.float64)
    for m in range(n_micro):
        batch = rows[local[m * micro : (m + 1) * micro]].to(runtime.device)  # [micro, L]
        losses = distill.distill_step(student, teacher, batch, step, recipe, autocast)
        (losses.total / n_micro).backward()
        terms += torch.stack([losses.kd, losses.align, losses.total]).detach().double().cpu() / n_micro
    return runtime.all_mean(terms), losses


def _non_finite_loss(step: int, losses: distill.StepLoss, terms: torch.Tensor, checkpoint: Path, opts) -> NonFiniteLoss:
    """The error of a non-finite step, saying what the last checkpoint holds and the command that continues."""
    if checkpoint.exists():
        last, advice = f"{checkpoint} holds the last good state", "continue from it with lower learning rates"
    else:
        last, advice = "none was written yet", "start over with lower learning rates"
    command = opts.retry_command(resume=checkpoint.exists()) if hasattr(opts, "retry_command") else None
    how = f": {command}" if command else " (--resume --change-lr --lr ... --gate-lr ...)"
    return NonFiniteLoss(
        f"non-finite loss at step {step} (phase {losses.phase}, alpha {losses.alpha:.3f}): kd={terms[0].item()}, "
        f"align={terms[1].item()}; training stopped before the optimizer step. Checkpoint: {last}. "
        f"Check the data, or {advice}{how}"
    )


def _stop_signal(received: list, runtime: Runtime) -> int:
    """The signal that stops the run after this step (0: none), agreed by all ranks: a signal one rank received
    stops every rank, so that all of them checkpoint the same step."""
    stop = torch.tensor([float(received[0]) if received else 0.0])
    stop = runtime.all_mean(stop) * runtime.world if runtime.world > 1 else stop
    if not stop.item():
        return 0
    return received[0] if received else signal.SIGTERM


def train(
    student, teacher, rows: torch.Tensor, opts, runtime: Runtime, work_dir: Path, fingerprint: dict,
    autocast, resume: bool,
) -> int:
    """Run global steps [start, phase1 + phase2) (or up to `opts.stop_after` more) of `distill.distill_step` under
    the recipe of `opts` (`distill.Recipe.from_options`), logging every step; returns the step reached."""
    from tqdm.auto import tqdm

    recipe = distill.Recipe.from_options(opts)
    total = recipe.total_steps
    optimizer = make_optimizer(student, opts.lr, opts.gate_lr, opts.weight_decay)
    scheduler = make_scheduler(optimizer, opts.warmup_steps)
    checkpoint = work_dir / "checkpoint.pt"
    log_path = work_dir / "log.jsonl"
    start = _resume(checkpoint, log_path, student, optimizer, scheduler, fingerprint, opts, runtime) if resume else 0
    end = total if opts.stop_after is None else min(total, start + opts.stop_after)
    params = [p for p in student.parameters() if p.requires_grad]
    bar = tqdm(total=total, initial=start, disable=not runtime.is_main, desc="convert", dynamic_ncols=True)
    log = open(log_path, "a") if runtime.is_main else None
    t0 = time.time()
    try:
        with stop_signals() as received:
            for step in range(start, end):
                optimizer.zero_grad(set_to_none=True)
                terms, losses = _accumulate_gradients(student, teacher, rows, step, recipe, opts, runtime, autocast)
                if not bool(torch.isfinite(terms).all()):
                    raise _non_finite_loss(step, losses, terms, checkpoint, opts)
                grad_norm = torch.nn.utils.clip_grad_norm_(params, opts.max_grad_norm)
                if hasattr(grad_norm, "full_tensor"):
                    grad_norm = grad_norm.full_tensor()
                lrs = {g.get("name", str(i)): g["lr"] for i, g in enumerate(optimizer.param_groups)}
                optimizer.step()
                scheduler.step()
                record = {
                    "step": step, "phase": losses.phase, "alpha": round(losses.alpha, 6), "loss": terms[2].item(),
                    "kd": terms[0].item(), "align": terms[1].item(), "grad_norm": float(grad_norm),
                    **{f"lr_{k}": v for k, v in lrs.items()},
                    "tokens": (step + 1) * opts.batch_size * rows.shape[1], "seconds": round(time.time() - t0, 3),
                }
                if log is not None:
                    log.write(json.dumps(record) + "\n")
                    log.flush()
                bar.update(1)
                bar.set_postfix(phase=losses.phase, alpha=f"{losses.alpha:.2f}", loss=f"{record['loss']:.4f}",
                                kd=f"{record['kd']:.4f}", align=f"{record['align']:.4f}")
                done = step + 1
                signum = _stop_signal(received, runtime)
                # The last step is checkpointed too: the evaluation and the final write then never risk the training.
                if signum or done == end or (opts.checkpoint_every and done % opts.checkpoint_every == 0):
                    save_checkpoint(checkpoint, student, optimizer, scheduler, done, fingerprint, runtime)
                if signum:
                    raise Interrupted(signum, done)
    finally:
        bar.close()
        if log is not None:
            log.close()
    return end
