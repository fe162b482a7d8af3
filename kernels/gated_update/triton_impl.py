"""Fused MELT gated update (Triton): one memory-bound pass forward, one backward.

    z  = sigmoid(ga + gs + b)            ga = a @ Wz, gs = s @ Uz come from cuBLAS GEMMs
    s' = z * s + (1 - z) * a

Layers, as in flash-linear-attention:
    gated_update_fwd / gated_update_bwd   plain launchers on contiguous [N, D] views
    GatedUpdateFunction                   autograd glue: saves a, s, g = ga + gs and b; z is
                                          recomputed in backward
    gated_update                          public entry point: validation and backend choice

Forward reads a, s, ga, gs (+ b) and writes s' and, when autograd needs it, g = ga + gs: backward
needs only the sum (ga and gs enter the gate as a plain sum), so three [N, D] tensors are kept for
backward instead of four. g is stored in the input dtype, so in fp16/bf16 backward recomputes z from
the rounded sum (a relative change of at most 2**-8 in bf16 to the pre-activation). Backward reads
ds', a, s, g and writes ds, da and one dz_pre tensor that is returned as the gradient of both ga
and gs, plus a [row_blocks, D] fp32 partial sum for db that PyTorch reduces; z is never stored.
All arithmetic is fp32; loads and stores use the input dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import utils
from .naive import naive_gated_update


def _block_sizes(D: int) -> tuple[int, int, int]:
    """(BLOCK_M rows, BLOCK_D columns, num_warps) for a hidden size D.

    Element-wise and memory-bound, so there is nothing to tune beyond tiles big enough for wide
    loads and enough programs in flight: about 4K elements per program on GPU. Not autotuned on
    purpose: autotuning re-runs the kernel, which would be wrong when `out` aliases an input.
    Under the interpreter the tiles are small so that the tests cover ragged row and column tiles.
    """
    if utils.INTERPRET:
        block_d = min(triton.next_power_of_2(D), 64)
        return 8, block_d, 4
    block_d = min(triton.next_power_of_2(D), 512)
    return max(4096 // block_d, 1), block_d, 8


@triton.jit
def _tile(N, D, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's [BLOCK_M, BLOCK_D] tile of the flat [N, D] rows: (offsets, mask, columns, column mask)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    mask = (offs_m < N)[:, None] & mask_d[None, :]
    # int64: N * D exceeds 2**31 for long sequences at large hidden sizes.
    offs = offs_m.to(tl.int64)[:, None] * D + offs_d[None, :]
    return offs, mask, offs_d, mask_d


@triton.jit
def _load_latent_and_gate(A, S, Pre, Bias, offs, mask, offs_d, mask_d):
    """a, s and z = sigmoid(pre + b) of one tile in fp32 (masked lanes read 0); pre: fp32 ga + gs."""
    a = tl.load(A + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.load(S + offs, mask=mask, other=0.0).to(tl.float32)
    bias = tl.load(Bias + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    return a, s, tl.sigmoid(Pre + bias[None, :])


@triton.jit
def _gated_update_fwd_kernel(
    A, S, GA, GS, Bias, Out, GateSum,
    N, D,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, STORE_GATE_SUM: tl.constexpr,
):
    offs, mask, offs_d, mask_d = _tile(N, D, BLOCK_M, BLOCK_D)
    g = (tl.load(GA + offs, mask=mask, other=0.0).to(tl.float32)
         + tl.load(GS + offs, mask=mask, other=0.0).to(tl.float32))
    a, s, z = _load_latent_and_gate(A, S, g, Bias, offs, mask, offs_d, mask_d)
    tl.store(Out + offs, (z * s + (1.0 - z) * a).to(Out.dtype.element_ty), mask=mask)
    if STORE_GATE_SUM:
        tl.store(GateSum + offs, g.to(GateSum.dtype.element_ty), mask=mask)


@triton.jit
def _gated_update_bwd_kernel(
    DOut, A, S, GateSum, Bias,
    DA, DS, DZ, DBPartial,
    N, D,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    offs, mask, offs_d, mask_d = _tile(N, D, BLOCK_M, BLOCK_D)
    g = tl.load(GateSum + offs, mask=mask, other=0.0).to(tl.float32)
    a, s, z = _load_latent_and_gate(A, S, g, Bias, offs, mask, offs_d, mask_d)
    dout = tl.load(DOut + offs, mask=mask, other=0.0).to(tl.float32)
    ds = dout * z
    da = dout - ds
    # d s'/d z = s - a and d z / d(ga + gs + b) = z (1 - z); masked lanes have dout = 0.
    dz = dout * (s - a) * z * (1.0 - z)

    tl.store(DA + offs, da.to(DA.dtype.element_ty), mask=mask)
    tl.store(DS + offs, ds.to(DS.dtype.element_ty), mask=mask)
    tl.store(DZ + offs, dz.to(DZ.dtype.element_ty), mask=mask)
    # Deterministic db: one fp32 partial row per row block, reduced by the launcher.
    tl.store(DBPartial + tl.program_id(0) * D + offs_d, tl.sum(dz, axis=0), mask=mask_d)


def gated_update_fwd(
    a: torch.Tensor,
    s: torch.Tensor,
    ga: torch.Tensor,
    gs: torch.Tensor,
    b: torch.Tensor,
    out: torch.Tensor | None = None,
    return_gate_sum: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel on contiguous inputs.

    Args:
        a, s, ga, gs: contiguous [..., D], one dtype.
        b: contiguous [D], any float dtype (read as fp32).
        out: optional contiguous [..., D] destination in the dtype of `a`. It may alias any of
            a, s, ga, gs (each element is read and then written by the same program), which gives
            the in-place update for inference, e.g. `out=s`.
        return_gate_sum: also write and return g = ga + gs ([..., D], dtype of `a`), all that
            `gated_update_bwd` needs of ga and gs.

    Returns:
        s' ([..., D], dtype of `a`): `out` if given; with return_gate_sum, (s', g).
    """
    D = a.shape[-1]
    N = a.numel() // D if D else 0
    if out is None:
        out = utils.new_empty(a.shape, a.dtype, a.device)
    gate_sum = utils.new_empty(a.shape, a.dtype, a.device) if return_gate_sum else None
    if N > 0 and D > 0:
        block_m, block_d, num_warps = _block_sizes(D)
        utils.launch(
            _gated_update_fwd_kernel,
            (triton.cdiv(N, block_m), triton.cdiv(D, block_d)),
            (a, s, ga, gs, b, out, out if gate_sum is None else gate_sum, N, D),
            dict(BLOCK_M=block_m, BLOCK_D=block_d, STORE_GATE_SUM=return_gate_sum, num_warps=num_warps),
        )
    return (out, gate_sum) if return_gate_sum else out


def gated_update_bwd(
    dout: torch.Tensor,
    a: torch.Tensor,
    s: torch.Tensor,
    gate_sum: torch.Tensor,
    b: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the backward kernel on contiguous inputs; z is recomputed from ga + gs and b.

    Args:
        dout: contiguous [..., D] gradient of s', dtype of `a`.
        a, s, b: the forward inputs.
        gate_sum: contiguous [..., D] g = ga + gs (`gated_update_fwd(..., return_gate_sum=True)`).

    Returns:
        (da, ds, dz, db): da, ds, dz in the dtype of `a` ([..., D]); dz is the gradient of the gate
        pre-activation, i.e. of both ga and gs; db ([D], dtype of `b`) sums dz over all rows in fp32.
    """
    D = a.shape[-1]
    N = a.numel() // D if D else 0
    da = utils.new_empty(a.shape, a.dtype, a.device)
    ds = utils.new_empty(a.shape, a.dtype, a.device)
    dz = utils.new_empty(a.shape, a.dtype, a.device)
    if N == 0 or D == 0:
        return da, ds, dz, torch.zeros_like(b)
    block_m, block_d, num_warps = _block_sizes(D)
    grid = (triton.cdiv(N, block_m), triton.cdiv(D, block_d))
    db_partial = utils.new_empty((grid[0], D), torch.float32, a.device)
    utils.launch(
        _gated_update_bwd_kernel,
        grid,
        (dout, a, s, gate_sum, b, da, ds, dz, db_partial, N, D),
        dict(BLOCK_M=block_m, BLOCK_D=block_d, num_warps=num_warps),
    )
    return da, ds, dz, db_partial.sum(0).to(b.dtype)


class GatedUpdateFunction(torch.autograd.Function):
    """Autograd glue: saves a, s, b and g = ga + gs (written by the forward kernel), not ga and gs
    (backward needs only their sum) and not z (recomputed)."""

    @staticmethod
    def forward(ctx, a, s, ga, gs, b):
        out, gate_sum = gated_update_fwd(a, s, ga, gs, b, return_gate_sum=True)
        ctx.save_for_backward(a, s, gate_sum, b)
        return out

    @staticmethod
    def backward(ctx, dout):
        a, s, gate_sum, b = ctx.saved_tensors
        da, ds, dz, db = gated_update_bwd(dout.contiguous(), a, s, gate_sum, b)
        return da, ds, dz, dz, db


def _validate(a, s, ga, gs, b) -> None:
    for name, t in (("a", a), ("s", s), ("ga", ga), ("gs", gs), ("b", b)):
        utils.check_float(name, t)
    for name, t in (("s", s), ("ga", ga), ("gs", gs)):
        if t.shape != a.shape:
            raise ValueError(f"{name} must have the shape of a {tuple(a.shape)}, got {tuple(t.shape)}")
        if t.dtype != a.dtype:
            raise TypeError(f"{name} must have the dtype of a ({a.dtype}), got {t.dtype}")
    if a.dim() == 0:
        raise ValueError("a must have at least one dimension (the hidden size D)")
    if b.shape != (a.shape[-1],):
        raise ValueError(f"b must have shape [D] = [{a.shape[-1]}], got {list(b.shape)}")
    utils.check_same_device(a=a, s=s, ga=ga, gs=gs, b=b)


@torch.compiler.disable
def _differentiable(*args) -> torch.Tensor:
    """`GatedUpdateFunction.apply`, outside any compiled graph (its backward launches a kernel too)."""
    return GatedUpdateFunction.apply(*args)


@utils.graph_op("gated_update_fwd", lambda a, s, ga, gs, b: torch.empty_like(a))
def _graph_fwd(a: torch.Tensor, s: torch.Tensor, ga: torch.Tensor, gs: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The forward launch as an operator a compiled graph keeps (inference; see `utils.graph_op`)."""
    return gated_update_fwd(a, s, ga, gs, b)


def gated_update(
    a: torch.Tensor, s: torch.Tensor, ga: torch.Tensor, gs: torch.Tensor, b: torch.Tensor
) -> torch.Tensor:
    """MELT latent-state update `s' = z * s + (1 - z) * a` with `z = sigmoid(ga + gs + b)`.

    Args:
        a:  [..., D] this loop's normalised hidden state.
        s:  [..., D] latent state from the previous loop.
        ga: [..., D] `a @ Wz`.
        gs: [..., D] `s @ Uz`.
        b:  [D] gate bias (any float dtype; its gradient comes back in that dtype).
        a, s, ga and gs share shape, dtype (fp32, fp16 or bf16) and device; any leading dims.

    Returns:
        s': [..., D] in the dtype of `a`, differentiable w.r.t. a, s, ga, gs and b
        (computed in fp32; db is accumulated in fp32 over all leading dims).

    Backends: the Triton kernels on CUDA tensors and on CPU tensors under TRITON_INTERPRET=1;
    otherwise the PyTorch reference `naive_gated_update`, so callers never need to branch.
    Non-contiguous inputs are copied to contiguous ones first (the kernel indexes flat rows).
    Under torch.compile an inference call is the operator `torch.ops.melt.gated_update_fwd`,
    which the graph keeps; a call that needs gradients runs outside the graph (a graph break).
    """
    _validate(a, s, ga, gs, b)
    if not utils.use_triton(a):
        return naive_gated_update(a, s, ga, gs, b)
    args = (a.contiguous(), s.contiguous(), ga.contiguous(), gs.contiguous(), b.contiguous())
    return _graph_fwd(*args) if utils.traced_inference(a, s, ga, gs, b) else _differentiable(*args)
