"""The kernels inside compiled graphs: an inference call traced by torch.compile is an operator (`melt::*`) that the
graph keeps (fullgraph, no break) and CUDA graphs can capture, with the eager launch's results; a call that needs
gradients still runs outside the graph, with its backward."""

import pytest
import torch

from melt_kernels.chunk_attention import chunk_attention, naive_chunk_attention
from melt_kernels.gated_update import gated_update, naive_gated_update

D_SCALE = 64**-0.5


def _attention_inputs(prefix: bool, device, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    B, H, Hkv, C, S, D = 2, 4, 2, 1, 40, 64

    def randn(*shape):
        return torch.randn(shape, generator=gen).to(device=device, dtype=dtype)

    q, k, v = randn(B, H, C, D), randn(B, Hkv, C, D), randn(B, Hkv, C, D)
    if not prefix:
        return (q, k, v, None, None, None, None, D_SCALE)
    key_mask = torch.ones(B, S + C, dtype=torch.bool, device=device)
    key_mask[1, :7] = False  # left padding
    lengths = torch.tensor([13, 33], device=device)
    return (q, k, v, randn(B, Hkv, S, D), randn(B, Hkv, S, D), key_mask, lengths, D_SCALE)


def _gate_inputs(device, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(3, 1, 64)] * 4 + [(64,)]
    return tuple(torch.randn(shape, generator=gen).to(device=device, dtype=dtype) for shape in shapes)


@pytest.mark.parametrize("prefix", [False, True], ids=["no-prefix", "prefix-lengths-mask"])
def test_operators_are_registered_consistently(prefix, device):
    """torch.library's own checks: schema, fake (meta) outputs against real ones, no aliasing of inputs."""
    torch.library.opcheck(torch.ops.melt.chunk_attention_fwd.default, _attention_inputs(prefix, device),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.melt.gated_update_fwd.default, _gate_inputs(device),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_compiled_inference_keeps_the_kernels_in_one_graph(dtype, device, assert_close):
    q, k, v, k_buf, v_buf, key_mask, lengths, _ = _attention_inputs(True, device, dtype)
    a, s, ga, gs, b = _gate_inputs(device, dtype)

    def step(q, k, v, k_buf, v_buf, key_mask, lengths, a, s, ga, gs, b):
        out = chunk_attention(q, k, v, k_buf, v_buf, key_mask, prefix_lengths=lengths)
        return out, gated_update(a, s, ga, gs, b)

    args = (q, k, v, k_buf, v_buf, key_mask, lengths, a, s, ga, gs, b)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager", dynamic=False)
    with torch.no_grad():
        out, latent = compiled(*args)
        expected_out, expected_latent = step(*args)
        # New lengths are data: the same graph serves them.
        lengths = torch.tensor([40, 0], device=device)
        with torch.compiler.set_stance("fail_on_recompile"):
            later = compiled(*args[:6], lengths, *args[7:])[0]
    assert torch.equal(out, expected_out) and torch.equal(latent, expected_latent)
    f32 = [t if t is None or not t.is_floating_point() else t.float() for t in args]
    assert_close("attention", out, naive_chunk_attention(*f32[:6], D_SCALE, prefix_lengths=f32[6]), dtype)
    assert_close("new lengths", later, naive_chunk_attention(*f32[:6], D_SCALE, prefix_lengths=lengths), dtype)
    assert_close("latent", latent, naive_gated_update(*f32[7:]), dtype)


def test_compiled_call_that_needs_gradients_runs_the_autograd_path(device, assert_close):
    q, k, v, k_buf, v_buf, key_mask, lengths, _ = _attention_inputs(True, device)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, k_buf, v_buf)]

    def loss(q, k, v, k_buf, v_buf):
        return chunk_attention(q, k, v, k_buf, v_buf, key_mask, prefix_lengths=lengths).square().sum()

    grads = torch.autograd.grad(torch.compile(loss, backend="aot_eager")(*leaves), leaves)
    expected = torch.autograd.grad(loss(*leaves), leaves)
    for i, (grad, ref) in enumerate(zip(grads, expected, strict=True)):
        assert_close(f"gradient {i}", grad, ref, torch.float32)
