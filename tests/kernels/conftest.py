"""Kernel tests: run the Triton kernels in Triton's CPU interpreter when there is no GPU.

Provides the `assert_close` fixture (the one comparison helper of these tests) and poisons every
buffer the kernels allocate with NaN, so an output row or gradient block that a kernel forgets to
write fails the comparison.
"""

import os

import torch

if not torch.cuda.is_available():
    # Must happen before the first import of the kernel modules: Triton reads it at decoration time.
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

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
    """Compare a kernel result (computed in `dtype`) with its fp32 reference.

    Fails on any NaN, on infinities that do not match the reference's (e.g. the LSE of rows with
    no visible key is -inf in both), and on errors above TOLERANCES[dtype].
    """
    rtol, atol = TOLERANCES[dtype]
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}"
    actual = actual.detach().float().cpu()
    expected = expected.detach().float().cpu()
    if torch.isnan(expected).any():
        raise AssertionError(f"{name}: the reference holds NaN (test bug)")
    nan = torch.isnan(actual)
    if nan.any():
        idx = tuple(nan.nonzero()[0].tolist())
        raise AssertionError(f"{name} ({dtype}): {int(nan.sum())} of {actual.numel()} elements are NaN, first at {idx}")
    inf = torch.isinf(expected)
    bad_inf = (torch.isinf(actual) | inf) & (actual != expected)
    if bad_inf.any():
        idx = tuple(bad_inf.nonzero()[0].tolist())
        raise AssertionError(
            f"{name} ({dtype}): infinities differ at {idx}: got {actual[idx]}, expected {expected[idx]}"
        )
    actual, expected = actual[~inf], expected[~inf]
    if expected.numel() == 0:
        return
    err = (actual - expected).abs()
    rel_rms = (err.square().mean().sqrt() / expected.square().mean().sqrt().clamp_min(1e-30)).item()
    max_abs = err.max().item()
    if rel_rms > rtol and max_abs > atol:
        i = int(err.argmax())
        raise AssertionError(
            f"{name} ({dtype}): relative RMS error {rel_rms:.3e} > {rtol:.0e} and max abs error {max_abs:.3e} > "
            f"{atol:.0e} (worst element: got {actual[i].item():.6g}, expected {expected[i].item():.6g})"
        )


@pytest.fixture
def assert_close():
    return _assert_close


@pytest.fixture(autouse=True)
def poison_kernel_buffers(monkeypatch):
    monkeypatch.setattr(kernel_utils, "POISON_NEW_BUFFERS", True)


@pytest.fixture
def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"

