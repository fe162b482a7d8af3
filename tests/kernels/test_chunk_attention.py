"""Triton chunk attention vs. its fp32 PyTorch reference (interpreter on CPU, native on GPU)."""

import pytest
import torch

from melt_kernels import utils as kernel_utils
from melt_kernels.chunk_attention import chunk_attention, chunk_attention_fwd, naive_chunk_attention
from melt_kernels.chunk_attention import triton_impl as attn_impl


def _case(B, H, Hkv, C, P, D):
    return pytest.param((B, H, Hkv, C, P, D), id=f"B{B}-H{H}-Hkv{Hkv}-C{C}-P{P}-D{D}")


CASES = [
    _case(1, 2, 2, 1, 0, 64),  # decode with nothing cached yet
    _case(2, 4, 2, 1, 100, 64),  # decode over a prefix, GQA
    _case(2, 4, 2, 7, 100, 64),
    _case(1, 4, 1, 63, 1, 64),  # MQA, ragged query and key tiles
    _case(2, 2, 2, 63, 100, 64),
    _case(1, 2, 1, 7, 100, 128),
    _case(1, 2, 2, 63, 0, 128),
]
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16")]
MASKS = ["none", "left-pad", "random"]


def _key_mask(kind, B, P, C, device, seed=2):
    """[B, P + C] bool or None.

    left-pad: sequence b starts with pads[b] pad tokens; the last one is padded past the prefix
    into the chunk, so its first queries have no visible key at all.
    random: scattered holes, and the last sequence entirely masked (every query row empty).
    """
    if kind == "none":
        return None
    if kind == "left-pad":
        pads = [P // 3] * (B - 1) + [P + C // 2]
        return torch.stack([torch.arange(P + C) >= pad for pad in pads]).to(device)
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(B, P + C, generator=gen) > 0.3
    mask[-1] = False
    return mask.to(device)


def _inputs(B, H, Hkv, C, P, D, dtype, device, seed=0):
    """Leaf tensors laid out as the model holds them; `_views` makes the kernel's arguments.

    q is stored [B, C, H, D] (a projection's output) and the prefix rows live in a
    [B, Hkv, capacity, D] cache buffer, so the q and prefix views are not contiguous.
    """
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(shape, generator=gen).to(device=device, dtype=dtype)

    return {
        "q": randn(B, C, H, D),
        "k": randn(B, Hkv, C, D),
        "v": randn(B, Hkv, C, D),
        "k_cache": randn(B, Hkv, P + C + 5, D),
        "v_cache": randn(B, Hkv, P + C + 5, D),
    }


def _views(leaves, P):
    """(q [B, H, C, D], k, v [B, Hkv, C, D], k_prefix, v_prefix [B, Hkv, P, D]) as strided views."""
    return (
        leaves["q"].transpose(1, 2),
        leaves["k"],
        leaves["v"],
        leaves["k_cache"][:, :, :P],
        leaves["v_cache"][:, :, :P],
    )


def _run_and_compare(leaves, P, key_mask, dtype, assert_close, return_lse=False, seed=1):
    """Forward + backward through the kernels and through the fp32 reference; compare everything."""
    tri = {n: t.detach().clone().requires_grad_() for n, t in leaves.items()}
    ref = {n: t.detach().float().requires_grad_() for n, t in leaves.items()}
    q, k, v, kp, vp = _views(tri, P)
    out = chunk_attention(q, k, v, kp, vp, key_mask=key_mask, return_lse=return_lse)
    ref_out = naive_chunk_attention(*_views(ref, P), key_mask=key_mask, return_lse=return_lse)
    outs, ref_outs = (out, ref_out) if return_lse else ((out,), (ref_out,))
    assert outs[0].dtype == dtype and outs[0].shape == q.shape
    for name, o, ro in zip(("o", "lse"), outs, ref_outs):
        assert_close(name, o, ro, dtype)

    gen = torch.Generator().manual_seed(seed)
    upstream = [torch.randn(o.shape, generator=gen).to(device=o.device, dtype=o.dtype) for o in outs]
    # With P = 0 the reference never touches the cache buffers: their gradient is zero.
    grads = torch.autograd.grad(outs, list(tri.values()), upstream, allow_unused=True, materialize_grads=True)
    ref_grads = torch.autograd.grad(
        ref_outs, list(ref.values()), [u.float() for u in upstream], allow_unused=True, materialize_grads=True
    )
    for name, g, rg in zip(tri, grads, ref_grads):
        assert_close(f"d{name}", g, rg, dtype)


@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", CASES)
def test_chunk_attention_matches_reference(shape, dtype, mask_kind, device, assert_close):
    B, H, Hkv, C, P, D = shape
    leaves = _inputs(*shape, dtype, device)
    _run_and_compare(leaves, P, _key_mask(mask_kind, B, P, C, device), dtype, assert_close)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [_case(2, 4, 2, 7, 100, 64), _case(1, 2, 1, 63, 1, 128)])
def test_chunk_attention_lse_is_differentiable(shape, dtype, device, assert_close):
    B, H, Hkv, C, P, D = shape
    leaves = _inputs(*shape, dtype, device)
    _run_and_compare(leaves, P, _key_mask("left-pad", B, P, C, device), dtype, assert_close, return_lse=True)


def test_chunk_attention_without_prefix_arguments(device, assert_close):
    # k_prefix=None is the same as an empty prefix.
    leaves = _inputs(2, 2, 1, 7, 0, 64, torch.float32, device)
    q, k, v, kp, vp = _views(leaves, 0)
    out = chunk_attention(q, k, v)
    assert_close("o", out, naive_chunk_attention(q, k, v), torch.float32)
    assert torch.equal(out, chunk_attention(q, k, v, kp, vp))


def test_chunk_attention_custom_scale(device, assert_close):
    leaves = _inputs(1, 2, 2, 7, 100, 64, torch.float32, device)
    views = _views(leaves, 100)
    out = chunk_attention(*views, scale=0.3)
    assert_close("o", out, naive_chunk_attention(*views, scale=0.3), torch.float32)


@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize(
    "shape, num_splits",
    [
        pytest.param((2, 4, 2, 1, 100, 64), 4, id="B2-H4-Hkv2-C1-P100-D64-S4"),
        pytest.param((1, 2, 1, 7, 300, 64), 7, id="B1-H2-Hkv1-C7-P300-D64-S7"),
        pytest.param((1, 2, 2, 1, 100, 128), 2, id="B1-H2-Hkv2-C1-P100-D128-S2"),
        pytest.param((1, 2, 1, 63, 100, 64), 3, id="B1-H2-Hkv1-C63-P100-D64-S3"),  # prefill tiles
    ],
)
def test_flash_decoding_matches_single_pass(shape, num_splits, mask_kind, device, assert_close):
    """Splitting the keys over programs and merging by LSE gives the single-pass result."""
    B, H, Hkv, C, P, D = shape
    views = _views(_inputs(*shape, torch.float32, device), P)
    key_mask = _key_mask(mask_kind, B, P, C, device)
    single = chunk_attention_fwd(*views, key_mask, D**-0.5, num_splits=1)
    split = chunk_attention_fwd(*views, key_mask, D**-0.5, num_splits=num_splits)
    assert split[0].shape == views[0].shape and split[1].shape == (B, H, C)
    ref_o, ref_lse = naive_chunk_attention(*views, key_mask=key_mask, return_lse=True)
    for name, s, r, ref in zip(("o", "lse"), split, single, (ref_o, ref_lse)):
        assert_close(f"{name} split vs single", s, r, torch.float32)
        assert_close(f"{name} split vs reference", s, ref, torch.float32)


def test_flash_decoding_split_count():
    # Only launches too small for the device split, and only over enough keys.
    cpu = torch.device("cpu")
    assert attn_impl._default_num_splits(batch_heads=1, C=1, num_keys=100_000, device=cpu) > 1
    assert attn_impl._default_num_splits(batch_heads=1, C=attn_impl.DECODE_MAX_C + 1, num_keys=100_000, device=cpu) > 1
    assert attn_impl._default_num_splits(batch_heads=10_000, C=1, num_keys=100_000, device=cpu) == 1
    assert attn_impl._default_num_splits(batch_heads=1, C=1, num_keys=attn_impl.MIN_SPLIT_KEYS - 1, device=cpu) == 1


def test_chunk_attention_backends(monkeypatch, device):
    calls = []

    def recording_naive(*args, **kwargs):
        calls.append(args)
        return naive_chunk_attention(*args, **kwargs)

    monkeypatch.setattr(attn_impl, "naive_chunk_attention", recording_naive)
    views64 = _views(_inputs(1, 2, 1, 7, 10, 64, torch.float32, device), 10)
    chunk_attention(*views64)
    assert not calls, "head_dim 64 must use the Triton path on CUDA and under the interpreter"

    # head_dim 32 is not compiled: the reference, bit for bit.
    views32 = _views(_inputs(1, 2, 1, 7, 10, 32, torch.float32, device), 10)
    out = chunk_attention(*views32)
    assert len(calls) == 1
    assert torch.equal(out, naive_chunk_attention(*views32))

    if device == "cpu":
        monkeypatch.setattr(kernel_utils, "INTERPRET", False)
        out, lse = chunk_attention(*views64, return_lse=True)
        assert len(calls) == 2
        ref_out, ref_lse = naive_chunk_attention(*views64, return_lse=True)
        assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)


# Per-sequence prefix lengths: the prefix is a whole preallocated buffer of S rows, of which sequence b
# has prefix_lengths[b]. Rows past the lengths hold NaN: a kernel that read them into its sums would fail.


def _buffer_leaves(B, H, Hkv, C, S, D, dtype, device, lengths, seed=0):
    leaves = _inputs(B, H, Hkv, C, S, D, dtype, device, seed)
    for name in ("k_cache", "v_cache"):
        buf = leaves[name]
        for b, n in enumerate(lengths):
            buf[b, :, n:] = float("nan")
    return leaves


def _truncated(leaves, b, n):
    """Sequence b alone, with only its first n prefix rows (a contiguous copy: a different layout too)."""
    return {
        "q": leaves["q"][b : b + 1],
        "k": leaves["k"][b : b + 1],
        "v": leaves["v"][b : b + 1],
        "k_cache": leaves["k_cache"][b : b + 1, :, :n].contiguous(),
        "v_cache": leaves["v_cache"][b : b + 1, :, :n].contiguous(),
    }


def _truncated_mask(key_mask, b, n, S):
    if key_mask is None:
        return None
    return torch.cat([key_mask[b : b + 1, :n], key_mask[b : b + 1, S:]], dim=1)


LENGTH_CASES = [
    # (B, H, Hkv, C, S, D, lengths)
    pytest.param((3, 4, 2, 1, 200, 64, (0, 37, 200)), id="decode-B3-S200-L0,37,200"),
    pytest.param((2, 2, 1, 7, 100, 64, (64, 1)), id="C7-S100-L64,1"),
    pytest.param((2, 2, 2, 63, 100, 128, (100, 33)), id="C63-S100-D128-L100,33"),
]


@pytest.mark.parametrize("mask_kind", ["none", "random"])
@pytest.mark.parametrize("case", LENGTH_CASES)
def test_prefix_lengths_equal_the_truncated_prefix(case, mask_kind, device, assert_close):
    """lengths < width: each sequence gets what the call on its own truncated prefix gives, forward and
    backward; the rows past its length get zero gradient and are never read (they hold NaN)."""
    B, H, Hkv, C, S, D, lengths = case
    dtype = torch.float32
    leaves = _buffer_leaves(B, H, Hkv, C, S, D, dtype, device, lengths)
    key_mask = _key_mask(mask_kind, B, S, C, device)
    if key_mask is not None:
        key_mask[-1] = True  # keep the last sequence visible: its truncated call then has keys
    prefix_lengths = torch.tensor(lengths, dtype=torch.int32, device=device)

    tri = {n: t.detach().clone().requires_grad_() for n, t in leaves.items()}
    q, k, v, kp, vp = _views(tri, S)
    o, lse = chunk_attention(q, k, v, kp, vp, key_mask=key_mask, return_lse=True, prefix_lengths=prefix_lengths)
    gen = torch.Generator().manual_seed(3)
    do = torch.randn(o.shape, generator=gen).to(device=device, dtype=dtype)
    grads = dict(zip(tri, torch.autograd.grad(o, list(tri.values()), do)))

    for b, n in enumerate(lengths):
        ref = {name: t.detach().float().requires_grad_() for name, t in _truncated(leaves, b, n).items()}
        ref_o, ref_lse = naive_chunk_attention(
            *_views(ref, n), key_mask=_truncated_mask(key_mask, b, n, S), return_lse=True
        )
        assert_close(f"o[{b}]", o[b : b + 1], ref_o, dtype)
        assert_close(f"lse[{b}]", lse[b : b + 1], ref_lse, dtype)
        ref_grads = torch.autograd.grad(ref_o, list(ref.values()), do[b : b + 1].float(),
                                        allow_unused=True, materialize_grads=True)
        for name, rg in zip(ref, ref_grads):
            g = grads[name][b : b + 1]
            if name in ("k_cache", "v_cache"):
                assert torch.equal(g[:, :, n:], torch.zeros_like(g[:, :, n:])), f"d{name}[{b}] past length {n}"
                g = g[:, :, :n]
                rg = rg[:, :, :n]
            assert_close(f"d{name}[{b}]", g, rg, dtype)


@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_prefix_lengths_at_full_width_change_nothing(dtype, mask_kind, device, assert_close):
    B, H, Hkv, C, P, D = 2, 4, 2, 7, 100, 64
    leaves = _inputs(B, H, Hkv, C, P, D, dtype, device)
    key_mask = _key_mask(mask_kind, B, P, C, device)
    full = torch.full((B,), P, dtype=torch.int64, device=device)
    outs, grads = [], []
    for lengths in (None, full):
        tri = {n: t.detach().clone().requires_grad_() for n, t in leaves.items()}
        o, lse = chunk_attention(*_views(tri, P), key_mask=key_mask, return_lse=True, prefix_lengths=lengths)
        outs.append((o, lse))
        grads.append(torch.autograd.grad((o, lse), list(tri.values()), (torch.ones_like(o), torch.ones_like(lse))))
    for name, a, b in zip(("o", "lse"), *outs):
        assert_close(name, b, a, dtype)
    for name, a, b in zip(leaves, *grads):
        assert_close(f"d{name}", b, a, dtype)


@pytest.mark.parametrize("layout", ["expanded", "strided"])
def test_prefix_lengths_of_any_layout(layout, device, assert_close):
    """Lengths as a preallocated cache passes them (its one fill expanded over the batch: stride 0), or any strided
    view, give what contiguous lengths give, forward and backward. The rows past the length hold NaN."""
    B, H, Hkv, C, S, D, n = 3, 2, 1, 1, 200, 64, 37
    if layout == "expanded":
        lengths = torch.tensor([n], device=device).expand(B)
    else:
        lengths = torch.tensor([n, -1] * B, device=device)[::2]
    leaves = _buffer_leaves(B, H, Hkv, C, S, D, torch.float32, device, (n,) * B)
    results = []
    for prefix_lengths in (lengths, lengths.contiguous()):
        tri = {name: t.detach().clone().requires_grad_() for name, t in leaves.items()}
        o = chunk_attention(*_views(tri, S), prefix_lengths=prefix_lengths)
        results.append((o, *torch.autograd.grad(o.square().sum(), list(tri.values()))))
    for name, got, expected in zip(("o", *leaves), *results):
        assert_close(name, got, expected, torch.float32)


@pytest.mark.parametrize("num_splits", [1, 3, 8])
def test_prefix_lengths_with_flash_decoding_splits(num_splits, device, assert_close):
    # Decode over a 1,000-row buffer: each sequence spreads its own keys over the splits.
    B, H, Hkv, C, S, D = 3, 2, 1, 1, 1000, 64
    lengths = (0, 130, 1000)
    views = _views(_buffer_leaves(B, H, Hkv, C, S, D, torch.float32, device, lengths), S)
    prefix_lengths = torch.tensor(lengths, device=device)
    o, lse = chunk_attention_fwd(*views, None, D**-0.5, num_splits=num_splits, prefix_lengths=prefix_lengths)
    ref_o, ref_lse = naive_chunk_attention(
        *[t.nan_to_num(0.0) for t in views], return_lse=True, prefix_lengths=prefix_lengths
    )
    assert_close("o", o, ref_o, torch.float32)
    assert_close("lse", lse, ref_lse, torch.float32)


def test_prefix_lengths_never_synchronise_with_the_host():
    # On `meta` tensors any .item() / int() / bool() / .cpu() of the lengths raises; the launchers run
    # through (their launches are recorded, not run).
    meta = torch.device("meta")
    B, H, Hkv, C, S, D = 2, 4, 2, 1, 4096, 128
    q = torch.empty(B, H, C, D, device=meta)
    k = torch.empty(B, Hkv, C, D, device=meta)
    buf = torch.empty(B, Hkv, S, D, device=meta)
    lengths = torch.empty(B, dtype=torch.int32, device=meta)
    with kernel_utils.capture_launches() as launches:
        o, lse = chunk_attention_fwd(q, k, k, buf, buf, None, D**-0.5, prefix_lengths=lengths)
        attn_impl.chunk_attention_bwd(o, None, q, k, k, buf, buf, None, o, lse, D**-0.5, prefix_lengths=lengths)
    with_lengths = [launch for launch in launches if launch.constexprs.get("HAS_LENGTHS")]
    assert with_lengths and all(any(a is lengths for a in launch.args) for launch in with_lengths)


def _invalid(case_id, error, match, **change):
    """A validation case: the valid arguments below with `change` applied must raise `error`."""
    return pytest.param(change, error, match, id=case_id)


def _zeros(*shape, **kwargs):
    return torch.zeros(shape, **kwargs)


@pytest.mark.parametrize(
    "change, error, match",
    [
        _invalid("q-rank", ValueError, r"q must be 4-D", q=_zeros(2, 4, 64)),
        _invalid("kv-shape", ValueError, "k and v must have the same shape", v=_zeros(2, 2, 4, 64)),
        _invalid("head-dim", ValueError, r"k/v must be \[B, Hkv, C, D\]",
                 k=_zeros(2, 2, 3, 32), v=_zeros(2, 2, 3, 32)),
        _invalid("gqa", ValueError, "must be a multiple of the kv heads", k=_zeros(2, 3, 3, 64), v=_zeros(2, 3, 3, 64)),
        _invalid("prefix-pair", ValueError, "must be given together", v_prefix=None),
        _invalid("prefix-heads", ValueError, r"k_prefix must be \[B, Hkv, P, D\]", k_prefix=_zeros(2, 1, 5, 64)),
        _invalid("prefix-len", ValueError, "k_prefix and v_prefix must have the same shape",
                 v_prefix=_zeros(2, 2, 6, 64)),
        _invalid("dtype", TypeError, "k must have the dtype of q", k=_zeros(2, 2, 3, 64, dtype=torch.float16)),
        _invalid("int", TypeError, "q must be float32, float16 or bfloat16", q=_zeros(2, 4, 3, 64, dtype=torch.int64)),
        _invalid("mask-dtype", TypeError, "key_mask must be a bool tensor", key_mask=_zeros(2, 8)),
        _invalid("mask-shape", ValueError, r"key_mask must be \[B, P \+ C\] = \[2, 8\]",
                 key_mask=_zeros(2, 3, dtype=torch.bool)),
        _invalid("device", ValueError, "same device", k_prefix=_zeros(2, 2, 5, 64, device="meta")),
        _invalid("lengths-dtype", TypeError, "prefix_lengths must be an int32 or int64 tensor",
                 prefix_lengths=_zeros(2)),
        _invalid("lengths-shape", ValueError, r"prefix_lengths must be \[B\] = \[2\]",
                 prefix_lengths=_zeros(3, dtype=torch.int32)),
        _invalid("lengths-without-prefix", ValueError, "prefix_lengths needs k_prefix",
                 k_prefix=None, v_prefix=None, key_mask=None, prefix_lengths=_zeros(2, dtype=torch.int32)),
        _invalid("lengths-device", ValueError, "same device",
                 prefix_lengths=_zeros(2, dtype=torch.int32, device="meta")),
    ],
)
def test_chunk_attention_validation(change, error, match):
    # B=2, H=4, Hkv=2, C=3, P=5, D=64
    args = dict(
        q=_zeros(2, 4, 3, 64),
        k=_zeros(2, 2, 3, 64),
        v=_zeros(2, 2, 3, 64),
        k_prefix=_zeros(2, 2, 5, 64),
        v_prefix=_zeros(2, 2, 5, 64),
        key_mask=torch.ones(2, 8, dtype=torch.bool),
    )
    args.update(change)
    with pytest.raises(error, match=match):
        chunk_attention(**args)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
class TestChunkAttentionGPU:
    @pytest.mark.parametrize("mask_kind", MASKS)
    @pytest.mark.parametrize("shape", CASES[1:3] + [_case(2, 16, 4, 63, 300, 128)])
    def test_bf16(self, shape, mask_kind, assert_close):
        B, H, Hkv, C, P, D = shape
        leaves = _inputs(*shape, torch.bfloat16, "cuda")
        _run_and_compare(leaves, P, _key_mask(mask_kind, B, P, C, "cuda"), torch.bfloat16, assert_close)

    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
    def test_prefill_chunk_over_long_prefix(self, dtype, assert_close):
        # The published chunk size over an 8K-token prefix, Ouro-1.4B heads.
        B, H, Hkv, C, P, D = 1, 16, 16, 500, 8192, 128
        leaves = _inputs(B, H, Hkv, C, P, D, dtype, "cuda")
        _run_and_compare(leaves, P, _key_mask("left-pad", B, P, C, "cuda"), dtype, assert_close)

    @pytest.mark.parametrize("P", [8192, 32768])
    def test_decode_default_split(self, P, assert_close):
        B, H, Hkv, C, D = 1, 16, 4, 1, 128
        views = _views(_inputs(B, H, Hkv, C, P, D, torch.bfloat16, "cuda"), P)
        assert attn_impl._default_num_splits(B * H, C, P + C, torch.device("cuda")) > 1
        out, lse = chunk_attention(*views, return_lse=True)
        ref_out, ref_lse = naive_chunk_attention(*[t.float() for t in views], return_lse=True)
        assert_close("o", out, ref_out, torch.bfloat16)
        assert_close("lse", lse, ref_lse, torch.bfloat16)
