"""Kernel tests: run the Triton kernels in Triton's CPU interpreter when there is no GPU.

Provides the `assert_close` fixture (the suite's one comparison, `melt_testing.assert_close`, at per-dtype
tolerances) and poisons every buffer the kernels allocate with NaN, so an output row or gradient block that a
kernel forgets to write fails the comparison.
"""

import os

import torch

if not torch.cuda.is_available():
    # Must happen before the first import of the kernel modules: Triton reads it at decoration time.
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

import melt_testing  # noqa: E402
from melt_kernels import utils as kernel_utils  # noqa: E402

if not torch.cuda.is_available() and not kernel_utils.INTERPRET:
    raise RuntimeError(
        "melt_kernels was imported before tests/kernels/conftest.py could set TRITON_INTERPRET=1, so "
        "its public functions would silently run the PyTorch references instead of the kernels. "
        "Set TRITON_INTERPRET=1 in the environment (or in an earlier conftest) before importing melt_kernels."
    )

# Per-dtype tolerances: (relative RMS error, max-abs floor). A comparison passes when the error's
# RMS relative to the reference's RMS is within the first, or when every element is within the
# second (for tensors that are, correctly, all or nearly zero, such as gradients of masked keys).
# References are always computed in fp32 from the same (rounded) inputs.
TOLERANCES = {
    torch.float32: (2e-5, 1e-5),
    torch.float16: (5e-3, 2e-3),
    torch.bfloat16: (3e-2, 1.5e-2),
}


def _assert_close(name: str, actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    """Compare a kernel result (computed in `dtype`) with its fp32 reference, at TOLERANCES[dtype]."""
    rtol, atol = TOLERANCES[dtype]
    melt_testing.assert_close(actual, expected, rtol=rtol, atol=atol, name=f"{name} ({dtype})")


@pytest.fixture
def assert_close():
    return _assert_close


@pytest.fixture(autouse=True)
def poison_kernel_buffers(monkeypatch):
    monkeypatch.setattr(kernel_utils, "POISON_NEW_BUFFERS", True)


@pytest.fixture
def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"

