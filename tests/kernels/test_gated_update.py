"""Triton gated update vs. its fp32 PyTorch reference (interpreter on CPU, native on GPU)."""

import pytest
import torch

import melt_kernels
from melt_kernels import utils as kernel_utils
from melt_kernels.gated_update import gated_update, gated_update_fwd, naive_gated_update
from melt_kernels.gated_update import triton_impl as gated_impl

CASES = [
    pytest.param((2, 7, 100), id="B2-T7-D100"),  # D not a multiple of the column tile
    pytest.param((63, 64), id="N63-D64"),  # rows not a multiple of the row tile
    pytest.param((1, 1, 1, 130), id="1x1x1-D130"),
    pytest.param((3, 5, 256), id="B3-T5-D256"),
]
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16")]


def _inputs(shape, dtype, device, b_dtype=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    D = shape[-1]
    a, s, ga, gs = (torch.randn(shape, generator=gen).to(device=device, dtype=dtype) for _ in range(4))
    b = torch.randn(D, generator=gen).to(device=device, dtype=b_dtype or dtype)
    return a, s, ga, gs, b


def _run_and_compare(inputs, dtype, assert_close, seed=1):
    """Forward + backward through the kernel and through the fp32 reference; compare everything."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    ref_leaves = [t.detach().float().requires_grad_() for t in inputs]
    out = gated_update(*leaves)
    ref = naive_gated_update(*ref_leaves)
    assert out.dtype == dtype and out.shape == inputs[0].shape
    assert_close("s_new", out, ref, dtype)

    gen = torch.Generator().manual_seed(seed)
    dout = torch.randn(out.shape, generator=gen).to(device=out.device, dtype=dtype)
    grads = torch.autograd.grad(out, leaves, dout)
    ref_grads = torch.autograd.grad(ref, ref_leaves, dout.float())
    for name, g, rg, leaf in zip(("da", "ds", "dga", "dgs", "db"), grads, ref_grads, leaves):
        assert g.dtype == leaf.dtype
        assert_close(name, g, rg, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", CASES)
def test_gated_update_matches_reference(shape, dtype, device, assert_close):
    _run_and_compare(_inputs(shape, dtype, device), dtype, assert_close)


def test_gated_update_fp32_bias_with_fp16_activations(device, assert_close):
    # A bias kept in fp32 (mixed precision) is read as fp32 and its gradient returned in fp32.
    _run_and_compare(_inputs((2, 7, 100), torch.float16, device, b_dtype=torch.float32), torch.float16, assert_close)


def test_gated_update_non_contiguous_inputs(device, assert_close):
    a, s, ga, gs, b = _inputs((7, 2, 100), torch.float32, device)
    views = [t.transpose(0, 1) for t in (a, s, ga, gs)]  # [2, 7, 100], not contiguous
    assert not views[0].is_contiguous()
    _run_and_compare((*views, b), torch.float32, assert_close)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gated_update_fwd_in_place(dtype, device, assert_close):
    # `out` may alias an input: the in-place update used at inference.
    a, s, ga, gs, b = _inputs((2, 7, 100), dtype, device)
    ref = naive_gated_update(a.float(), s.float(), ga.float(), gs.float(), b.float())
    result = gated_update_fwd(a, s, ga, gs, b, out=s)
    assert result.data_ptr() == s.data_ptr()
    assert_close("s_new (in place)", s, ref, dtype)


def test_gated_update_shared_gate_gradient_accumulates_per_leaf(device):
    # Backward returns one dz tensor as the gradient of both ga and gs; leaves must still get
    # separate .grad tensors that accumulate independently over several backward passes.
    a, s, ga, gs, b = (t.requires_grad_() for t in _inputs((2, 3, 64), torch.float32, device))
    gated_update(a, s, ga, gs, b).sum().backward()
    first = ga.grad.clone()
    assert ga.grad.data_ptr() != gs.grad.data_ptr()
    gated_update(a, s, ga, gs, b).sum().backward()
    assert torch.equal(ga.grad, 2 * first) and torch.equal(gs.grad, 2 * first)


def test_gated_update_saves_the_gate_sum_not_ga_and_gs(device):
    # Backward needs ga and gs only through ga + gs: autograd keeps a, s, that sum and b, i.e. three
    # [..., D] tensors, not four (ga and gs are otherwise unreferenced GEMM outputs in the model).
    a, s, ga, gs, b = (t.requires_grad_() for t in _inputs((2, 7, 100), torch.float16, device))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = gated_update(a, s, ga, gs, b)
    assert sum(t.numel() * t.element_size() for t in saved) == 3 * a.numel() * a.element_size() + b.nbytes
    assert not any(t.data_ptr() in (ga.data_ptr(), gs.data_ptr()) for t in saved)
    out.backward(torch.ones_like(out))  # and backward runs from what was kept
    assert ga.grad is not None and gs.grad is not None and torch.equal(ga.grad, gs.grad)


def test_gated_update_fwd_returns_the_gate_sum(device, assert_close):
    a, s, ga, gs, b = _inputs((3, 5, 100), torch.float32, device)
    out, gate_sum = gated_update_fwd(a, s, ga, gs, b, return_gate_sum=True)
    assert_close("s_new", out, naive_gated_update(a, s, ga, gs, b), torch.float32)
    assert_close("g", gate_sum, ga + gs, torch.float32)


def test_gated_update_backends(monkeypatch, device):
    calls = []

    def recording_naive(*args):
        calls.append(args)
        return naive_gated_update(*args)

    monkeypatch.setattr(gated_impl, "naive_gated_update", recording_naive)
    a, s, ga, gs, b = _inputs((2, 3, 64), torch.float32, device)
    gated_update(a, s, ga, gs, b)
    assert not calls, "the Triton path must be used on CUDA and under the interpreter"
    if device == "cpu":
        # Plain CPU (no interpreter): the reference, bit for bit.
        monkeypatch.setattr(kernel_utils, "INTERPRET", False)
        out = gated_update(a, s, ga, gs, b)
        assert len(calls) == 1
        assert torch.equal(out, naive_gated_update(a, s, ga, gs, b))


def test_package_exports():
    assert melt_kernels.__all__ == ["chunk_attention", "gated_update"]
    assert melt_kernels.gated_update is gated_update


def _invalid(case_id, error, match, **change):
    """A validation case: the valid arguments below with `change` applied must raise `error`."""
    return pytest.param(change, error, match, id=case_id)


@pytest.mark.parametrize(
    "change, error, match",
    [
        _invalid("shape", ValueError, "s must have the shape of a", s=torch.zeros(2, 3, 8)),
        _invalid("dtype", TypeError, "gs must have the dtype of a", gs=torch.zeros(2, 3, 4, dtype=torch.float16)),
        _invalid("bias-shape", ValueError, r"b must have shape \[D\] = \[4\]", b=torch.zeros(5)),
        _invalid("int", TypeError, "a must be float32, float16 or bfloat16", a=torch.zeros(2, 3, 4, dtype=torch.int32)),
        _invalid("not-tensor", TypeError, "ga must be a torch.Tensor", ga=[0.0]),
        _invalid("device", ValueError, "same device", b=torch.zeros(4, device="meta")),
    ],
)
def test_gated_update_validation(change, error, match):
    args = {name: torch.zeros(2, 3, 4) for name in ("a", "s", "ga", "gs")}
    args["b"] = torch.zeros(4)
    args.update(change)
    with pytest.raises(error, match=match):
        gated_update(**args)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
class TestGatedUpdateGPU:
    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
    def test_large(self, dtype, assert_close):
        # Ouro-1.4B hidden size over a 500-token chunk, batch 4.
        _run_and_compare(_inputs((4, 500, 2048), dtype, "cuda"), dtype, assert_close)

    def test_bf16_ragged(self, assert_close):
        _run_and_compare(_inputs((3, 7, 1000), torch.bfloat16, "cuda"), torch.bfloat16, assert_close)
