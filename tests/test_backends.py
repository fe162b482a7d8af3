"""Forcing each attention backend gives the same logits and gradients on the same tiny model.

On CPU the Triton kernels run under TRITON_INTERPRET=1 (set in conftest.py), so shapes stay tiny; head_dim
is 64, a size the kernels compile for (others fall back to the reference and would test nothing).
"""

import pytest
import torch

from melt import override_backend
from melt.attention import resolve_backend
from melt_testing import assert_close, tiny_model

BACKENDS = ["eager", "sdpa", "triton"]


def _run(model, ids, mask, backend):
    model.zero_grad()
    with override_backend(backend):
        out = model(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100), use_cache=False)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), grads


@pytest.fixture(scope="module")
def setup():
    model = tiny_model(hidden_size=64, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1,
                       head_dim=64, num_hidden_layers=1, num_loops=2, chunk_size=3).train()
    ids = torch.randint(1, 61, (2, 7))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding, chunk boundaries misaligned with the first row
    return model, ids, mask, _run(model, ids, mask, "eager")


# "auto" on CPU is sdpa for calls without a prefix and eager for the others; forcing "sdpa" on this model (chunks
# of 3 over 7 tokens: prefix rows from the second chunk on) raises instead, see test_forced_backend_refusals.
@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_backends_agree_on_logits_and_gradients(setup, backend, monkeypatch):
    from melt_kernels.chunk_attention import triton_impl

    model, ids, mask, (ref_logits, ref_grads) = setup
    reference_calls = []
    original = triton_impl.naive_chunk_attention
    monkeypatch.setattr(triton_impl, "naive_chunk_attention",
                        lambda *a, **k: reference_calls.append(1) or original(*a, **k))
    logits, grads = _run(model, ids, mask, backend)
    assert not reference_calls, "the triton backend fell back to the reference: the kernels were not exercised"
    assert_close(logits, ref_logits, atol=1e-4)
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        assert_close(grad, ref_grads[name], rtol=1e-3, atol=1e-6, name=name)


def test_triton_backend_under_autocast_matches_eager(setup):
    """The converter trains fp32 weights under autocast: the gate's GEMMs come out in the autocast dtype while
    its other inputs stay fp32, and the Triton gate must compute what the plain lines do (fp16 here: the
    interpreter's bf16 is unreliable; the GPU suite runs bf16)."""
    model, ids, mask, _ = setup
    results = {}
    for backend in ("eager", "triton"):
        with torch.autocast("cpu", dtype=torch.float16):
            results[backend] = _run(model, ids, mask, backend)
    (logits, grads), (ref_logits, ref_grads) = results["triton"], results["eager"]
    assert logits.dtype == ref_logits.dtype
    assert_close(logits.float(), ref_logits.float(), atol=2e-2)
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        assert_close(grad, ref_grads[name], rtol=2e-2, atol=1e-6, name=name)


def test_triton_backend_cached_decode_matches_eager():
    model = tiny_model(hidden_size=64, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1,
                       head_dim=64, num_hidden_layers=1, num_loops=2, chunk_size=2)
    ids = torch.randint(1, 61, (1, 5))
    results = {}
    for backend in ("eager", "triton"):
        with override_backend(backend), torch.no_grad():
            cache = model(ids[:, :4]).cache
            results[backend] = model(ids[:, 4:], cache=cache).logits
    assert_close(results["eager"], results["triton"], atol=1e-4)


def test_backend_choice_override_environment_and_errors(monkeypatch):
    cpu = torch.device("cpu")
    assert resolve_backend("auto", cpu) == "auto"  # chosen per call: sdpa without a prefix, eager with one
    assert resolve_backend("eager", cpu) == "eager"
    monkeypatch.setenv("MELT_ATTENTION_BACKEND", "triton")
    assert resolve_backend("eager", cpu) == "triton"
    with override_backend("eager"):
        assert resolve_backend("sdpa", cpu) == "eager"
    monkeypatch.setenv("MELT_ATTENTION_BACKEND", "fast")
    with pytest.raises(ValueError, match="unknown attention backend"):
        resolve_backend("auto", cpu)
    monkeypatch.delenv("MELT_ATTENTION_BACKEND")
    with pytest.raises(ValueError, match="unknown attention backend"):
        with override_backend("fast"):
            pass
    import melt.attention as attention

    if attention.flash_attn_func is None:
        with pytest.raises(ImportError, match="flash-attn"):
            resolve_backend("flash", cpu)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_bf16_triton_matches_eager_model():
    model = tiny_model(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=64, num_hidden_layers=2, num_loops=3, chunk_size=16).cuda().to(torch.bfloat16)
    ids = torch.randint(1, 61, (2, 100), device="cuda")
    with torch.no_grad():
        with override_backend("eager"):
            ref = model(ids).logits.float()
        with override_backend("triton"):
            out = model(ids).logits.float()
    assert ((out - ref).norm() / ref.norm()) < 2e-2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("cache_mode", ["shared", "per_loop"])
def test_gpu_bf16_preallocated_decode_paths_match_the_reference(cache_mode):
    """On CUDA in bf16, a padded batch of two decoding on a preallocated cache: the Triton step (eager), the in-place
    SDPA step (forced "sdpa") and both captured as CUDA graphs (torch.compile's "cudagraphs" backend; the kernels are
    `melt::` operators in the graph) against the reference step (forced "eager")."""
    import torch._dynamo

    from melt_testing import decode

    model = tiny_model(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=64, num_hidden_layers=2, num_loops=3, chunk_size=4,
                       cache_mode=cache_mode).cuda().to(torch.bfloat16)
    ids = torch.randint(1, 61, (2, 40), device="cuda")
    mask = torch.ones_like(ids)
    mask[1, :9] = 0

    def run(backend, step=None):
        # prefill with the reference (forced "sdpa" cannot attend over a prefix), then the steps with `backend`
        cache = model.new_cache(max_cache_len=48)
        with override_backend("eager"):
            logits = [decode(model, ids[:, :20], mask[:, :20], cache, prefill=20)]
        wide = torch.nn.functional.pad(mask, (0, 8))  # [B, max_cache_len]: one shape for every step, as generate
        with override_backend(backend), torch.no_grad():
            for i in range(20, 40):
                torch.compiler.cudagraph_mark_step_begin()
                out = (model if step is None else step)(ids[:, i : i + 1], attention_mask=wide, cache=cache)
                logits.append(out.logits.clone())  # a graph's outputs are overwritten by its next replay
        return torch.cat(logits, dim=1).float()

    ref = run("eager")
    torch._dynamo.reset()
    graphs = torch.compile(model, fullgraph=True, dynamic=False, backend="cudagraphs")
    for name, out in (("triton", run("triton")), ("sdpa", run("sdpa")), ("triton, graphs", run("triton", graphs)),
                      ("auto, graphs", run("auto", graphs))):
        real = mask.bool()
        assert_close(out[real], ref[real], rtol=2e-2, atol=0.0, name=name)


# per-sequence prefix lengths through the entry point --------------------------------------------------------------


def _attention_inputs(B=3, H=4, Hkv=2, C=2, S=9, D=64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, C, D, generator=gen) for h in (H, Hkv, Hkv))
    k_buf, v_buf = (torch.randn(B, Hkv, S, D, generator=gen) for _ in range(2))
    key_mask = torch.rand(B, S + C, generator=gen) > 0.2
    key_mask[:, S:] = True
    return q, k, v, k_buf, v_buf, key_mask


@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_prefix_lengths_equal_truncated_prefix_per_sequence(backend):
    from melt.attention import chunk_attention

    q, k, v, k_buf, v_buf, key_mask = _attention_inputs()
    S = k_buf.shape[2]
    lengths = torch.tensor([0, 4, S])
    leaves = [t.clone().requires_grad_() for t in (q, k, v, k_buf, v_buf)]
    out = chunk_attention(*leaves, key_mask, backend, prefix_lengths=lengths)
    upstream = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, upstream)
    full = chunk_attention(q, k, v, k_buf, v_buf, key_mask, backend, prefix_lengths=torch.full((3,), S))
    assert_close(full, chunk_attention(q, k, v, k_buf, v_buf, key_mask, backend), atol=1e-5)
    for b, n in enumerate(lengths.tolist()):
        ref_leaves = [t[b : b + 1].clone().requires_grad_() for t in (q, k, v)]
        ref_leaves += [t[b : b + 1, :, :n].clone().requires_grad_() for t in (k_buf, v_buf)]
        mask_b = torch.cat([key_mask[b : b + 1, :n], key_mask[b : b + 1, S:]], dim=1)
        ref = chunk_attention(*ref_leaves, mask_b, "eager")
        assert_close(out[b : b + 1], ref, atol=1e-5)
        ref_grads = torch.autograd.grad(ref, ref_leaves, upstream[b : b + 1], allow_unused=True, materialize_grads=True)
        for i, (g, rg) in enumerate(zip(grads, ref_grads)):
            g = g[b : b + 1]
            if i >= 3:  # prefix buffers: the rows past the length get no gradient
                assert torch.equal(g[:, :, n:], torch.zeros_like(g[:, :, n:]))
                g = g[:, :, :n]
            assert_close(g, rg, atol=1e-5, name=f"gradient {i}")


def test_eager_prefix_lengths_compile_fullgraph():
    from melt.attention import chunk_attention

    q, k, v, k_buf, v_buf, key_mask = _attention_inputs()

    def step(q, k, v, k_buf, v_buf, key_mask, lengths):
        return chunk_attention(q, k, v, k_buf, v_buf, key_mask, "eager", prefix_lengths=lengths)

    compiled = torch.compile(step, fullgraph=True, dynamic=False)
    lengths = torch.tensor([0, 4, 9])
    out = compiled(q, k, v, k_buf, v_buf, key_mask, lengths)
    assert_close(out, step(q, k, v, k_buf, v_buf, key_mask, lengths), atol=1e-5)
    # New lengths are data, not shapes: the same graph serves them.
    lengths = torch.tensor([3, 3, 1])
    with torch.compiler.set_stance("fail_on_recompile"):
        out = compiled(q, k, v, k_buf, v_buf, key_mask, lengths)
    assert_close(out, step(q, k, v, k_buf, v_buf, key_mask, lengths), atol=1e-5)


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)], ids=["fp32", "bf16"])
def test_cache_attention_equals_prefix_and_chunk_attention(dtype, atol):
    """The in-place decode attention (the token's row written at its column, SDPA over the buffer) against the
    reference over prefix + chunk rows: per-sequence fills, GQA, padding, and a token that sees no key (zeros)."""
    from melt.attention import cache_attention, chunk_attention

    q, k, v, k_buf, v_buf, key_mask = (t.to(dtype) if t.is_floating_point() else t
                                       for t in _attention_inputs(C=1, S=12))
    B, S = q.shape[0], k_buf.shape[2]
    fill = torch.tensor([0, 5, S - 1])
    key_mask[2, S:] = False  # sequence 2: its token is padding ...
    key_mask[2, :S] = False  # ... and so is every row before it
    expected = chunk_attention(q, k, v, k_buf, v_buf, key_mask, "eager", prefix_lengths=fill)
    keys, values = k_buf.clone(), v_buf.clone()
    at = fill.view(B, 1, 1, 1).expand(B, k.shape[1], 1, k.shape[3])
    keys.scatter_(2, at, k)
    values.scatter_(2, at, v)
    visible = (torch.arange(S) <= fill[:, None]) & key_mask[:, :S].scatter(1, fill[:, None], key_mask[:, S:])
    bias = torch.zeros(B, S, dtype=dtype).masked_fill(~visible, float("-inf")).view(B, 1, 1, S)
    out = cache_attention(q, keys, values, bias, no_key=~visible.any(-1).view(B, 1, 1, 1))
    assert out.dtype == dtype and torch.equal(out[2], torch.zeros_like(out[2]))
    assert_close(out, expected, atol=atol)


# forced backends serve a call or refuse it; "auto" chooses ----------------------------------------------------------


def test_forced_sdpa_serves_calls_without_prefix_and_refuses_a_prefix():
    from melt.attention import chunk_attention

    q, k, v, k_buf, v_buf, key_mask = _attention_inputs()
    chunk_mask = key_mask[:, k_buf.shape[2]:]
    eager = chunk_attention(q, k, v, None, None, chunk_mask, "eager")
    assert_close(chunk_attention(q, k, v, None, None, chunk_mask, "sdpa"), eager, atol=1e-5)
    # an empty prefix is no prefix
    empty = k_buf[:, :, :0]
    assert_close(chunk_attention(q, k, v, empty, empty, chunk_mask, "sdpa"), eager, atol=1e-5)
    with pytest.raises(ValueError, match=r"'sdpa' cannot attend over prefix rows \(P = 9\).*'eager'.*'auto'"):
        chunk_attention(q, k, v, k_buf, v_buf, key_mask, "sdpa")


def test_auto_picks_per_call_off_cuda(monkeypatch):
    import melt.attention as attention

    q, k, v, k_buf, v_buf, key_mask = _attention_inputs()
    calls = []
    for name in ("_sdpa", "eager_chunk_attention"):
        original = getattr(attention, name)
        monkeypatch.setattr(attention, name, lambda *a, _n=name, _f=original, **kw: calls.append(_n) or _f(*a, **kw))
    chunk_mask = key_mask[:, k_buf.shape[2]:]
    attention.chunk_attention(q, k, v, None, None, chunk_mask, "auto")
    out = attention.chunk_attention(q, k, v, k_buf, v_buf, key_mask, "auto")
    assert calls == ["_sdpa", "eager_chunk_attention"]
    assert torch.equal(out, attention.eager_chunk_attention(q, k, v, k_buf, v_buf, key_mask))


def _fake_flash(*args, **kwargs):
    raise AssertionError("a refused call must not reach flash-attn")


@pytest.mark.parametrize(
    "case, match",
    [
        ("cpu", "runs on CUDA only"),
        ("fp32", "float16/bfloat16 only"),
        ("key-mask", "no key mask"),
        ("lengths", "no per-sequence prefix_lengths"),
        ("prefix-grad", "prefix under autograd.*gradient flash-attn's backward ignores"),
    ],
)
def test_forced_flash_refuses_what_it_cannot_serve(case, match, monkeypatch):
    import melt.attention as attention

    monkeypatch.setattr(attention, "flash_attn_func", _fake_flash)
    q, k, v, k_buf, v_buf, key_mask = _attention_inputs()
    kwargs = {}
    mask = None
    if case == "key-mask":
        mask = key_mask
    elif case == "lengths":
        kwargs["prefix_lengths"] = torch.tensor([1, 2, 3])
    elif case == "prefix-grad":
        q.requires_grad_()
    with pytest.raises(ValueError, match=f"attention backend 'flash' cannot serve this call: .*{match}.*Use 'triton'"):
        attention.chunk_attention(q, k, v, k_buf, v_buf, mask, "flash", **kwargs)


def test_forced_flash_refuses_a_prefix_only_under_autograd(monkeypatch):
    import melt.attention as attention

    monkeypatch.setattr(attention, "flash_attn_func", _fake_flash)
    q, k, v, k_buf, v_buf, _ = _attention_inputs()
    q.requires_grad_()
    with torch.no_grad(), pytest.raises(ValueError) as refused:  # refused here for CPU/fp32 only
        attention.chunk_attention(q, k, v, k_buf, v_buf, None, "flash")
    assert "autograd" not in str(refused.value)


def test_forced_flash_without_flash_attn_says_so(monkeypatch):
    import melt.attention as attention

    monkeypatch.setattr(attention, "flash_attn_func", None)
    q, k, v, _, _, _ = _attention_inputs()
    with pytest.raises(ValueError, match="flash-attn is not installed"):
        attention.chunk_attention(q, k, v, None, None, None, "flash")
