"""Helpers shared by the MELT Triton ops: backend choice, autotune mode, buffers, validation."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import triton

# Triton decides at decoration time whether `@triton.jit` functions run in its CPU interpreter, so
# the flag is read once, when this package is imported (set TRITON_INTERPRET=1 before that).
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Autotuning benchmarks every config on the first call for each key; under the interpreter that is
# pointless and under pytest it is slow and makes runs depend on timing noise, so both get exactly
# one config.
SINGLE_CONFIG = INTERPRET or "pytest" in sys.modules

# Test hook: when True, `new_empty` fills every buffer it returns with NaN, so that a kernel which
# forgets to write part of an output (or of a gradient) fails the comparison instead of passing on
# whatever memory happened to hold. Never set outside tests: it costs one extra write per buffer.
POISON_NEW_BUFFERS = False

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def autotuned(fn, production: list[triton.Config], single: list[triton.Config], key: list[str]):
    """`triton.autotune` over `production`, or over the one config `single` under SINGLE_CONFIG.

    The production space stays reachable as `.production_configs` whatever mode the package was
    imported in: the ahead-of-time compile test and `benchmarks.kernels --aot` compile all of it.
    """
    tuner = triton.autotune(configs=single if SINGLE_CONFIG else production, key=key)(fn)
    tuner.production_configs = production
    return tuner


@dataclass
class Launch:
    """One kernel launch exactly as a launcher makes it: the only way the launchers start kernels.

    `args` are the kernel's runtime arguments in order, `constexprs` its keyword arguments
    (constexprs, plus `num_warps` / `num_stages` for kernels that are not autotuned). Under
    `capture_launches()` the launch is recorded instead of run, which is how the ahead-of-time
    compile (`melt_kernels.aot`) gets every kernel's signature from the launchers themselves.
    """

    kernel: Any  # a JITFunction, or an Autotuner made by `autotuned`
    grid: tuple | Callable
    args: tuple
    constexprs: dict = field(default_factory=dict)


_captured: list[Launch] | None = None


@contextlib.contextmanager
def capture_launches():
    """Record the launches of the launchers called inside the block instead of running them.

    Meant for `meta` tensors: the launchers allocate and slice as usual, nothing executes.
    """
    global _captured
    previous, _captured = _captured, []
    try:
        yield _captured
    finally:
        _captured = previous


def launch(kernel, grid, args: tuple, constexprs: dict) -> None:
    """Launch `kernel[grid](*args, **constexprs)`, or record it under `capture_launches()`."""
    if _captured is not None:
        _captured.append(Launch(kernel, grid, tuple(args), dict(constexprs)))
        return
    kernel[grid](*args, **constexprs)


def graph_op(name: str, fake: Callable) -> Callable:
    """Decorator: `fn` becomes the operator `melt::<name>` (`torch.library.custom_op`, no input mutated), with
    `fake` giving its outputs' shapes, dtypes and strides to tracing; returns the operator.

    What the kernels' launchers cannot be on their own: something `torch.compile` keeps in its graph (fullgraph,
    any backend) and CUDA graphs capture, instead of a `torch.compiler.disable` graph break. Forward only: the
    launchers call it while compiling and no input needs a gradient. Registered once per process: a source tree
    can import this package under two names, and an operator name is process-wide.
    """

    def register(fn: Callable) -> Callable:
        if hasattr(torch.ops.melt, name):  # registered by the other import of this package
            return getattr(torch.ops.melt, name)
        op = torch.library.custom_op(f"melt::{name}", mutates_args=())(fn)
        op.register_fake(fake)
        return op

    return register


def traced_inference(*tensors: torch.Tensor | None) -> bool:
    """True while torch.compile traces a call that needs no gradient: the launchers then call their `graph_op`."""
    return torch.compiler.is_compiling() and not (
        torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    )


def use_triton(t: torch.Tensor) -> bool:
    """True when the Triton kernels can run on `t`: CUDA tensors, or CPU tensors under the interpreter.

    Anything else (CPU tensors without TRITON_INTERPRET=1, other devices) goes to the PyTorch
    reference of the op.
    """
    return t.is_cuda or (INTERPRET and t.device.type == "cpu")


def new_empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """`torch.empty` for kernel outputs; NaN-filled when `POISON_NEW_BUFFERS` is set (tests)."""
    if POISON_NEW_BUFFERS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    """`t` itself when its last dimension has stride 1 (the kernels need it), else a contiguous copy.

    Views produced by slicing or transposing leading dimensions (cache prefixes, [B, C, H, D] ->
    [B, H, C, D] transposes) keep stride 1 in the last dimension and are read in place.
    """
    return t if t.stride(-1) == 1 else t.contiguous()


def num_programs_target(device: torch.device) -> int:
    """How many programs keep the device busy: two waves of streaming multiprocessors on CUDA.

    Used to decide when a small launch (decode) should split its work further.
    """
    if device.type == "cuda":
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def check_float(name: str, t: torch.Tensor) -> None:
    """Raise TypeError unless `t` is an fp32/fp16/bf16 tensor."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")


def check_same_device(**tensors: torch.Tensor | None) -> None:
    """Raise ValueError unless all given (non-None) tensors live on one device."""
    present = {name: t for name, t in tensors.items() if t is not None}
    devices = {t.device for t in present.values()}
    if len(devices) > 1:
        listing = ", ".join(f"{name} on {t.device}" for name, t in present.items())
        raise ValueError(f"all inputs must be on the same device, got {listing}")
