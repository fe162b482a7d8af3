"""Semantics of the model: exact Ouro mode, MELT chunking and cache, gates, generation."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from melt import MeltCache, MeltConfig, MeltForCausalLM, override_backend
from melt.modeling_melt import GATE_MARKER, MeltLatentGate, select_exit_loop
from melt_kernels.gated_update import naive_gated_update
from melt_testing import assert_close, logits_in_pieces, max_diff, tiny_config, tiny_model, twin
from ouro_reference import exit_probs, ouro_forward, select_logits

ATOL = 1e-5



# 1. per_loop = Ouro ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_loops", [1, 3])
def test_per_loop_matches_independent_ouro_reference(num_loops):
    model = tiny_model(cache_mode="per_loop", num_loops=num_loops)
    ids = torch.randint(0, 61, (2, 13))
    out = model(ids, return_loop_outputs=True, use_cache=False)
    state, cfg = model.state_dict(), model.config.to_dict()
    for b in range(2):
        ref_logits, ref_exit = ouro_forward(state, cfg, ids[b], num_loops)
        assert_close(out.logits[b], ref_logits[-1], atol=ATOL)
        for t in range(num_loops):
            assert_close(out.loop_logits[t][b], ref_logits[t], atol=ATOL)
        assert_close(out.exit_probs[b].T, exit_probs(ref_exit), atol=ATOL)


@pytest.mark.parametrize("threshold", [0.3, 0.6, 0.95])
def test_exit_threshold_and_fixed_step_select_like_ouro(threshold):
    model = tiny_model(cache_mode="per_loop", num_loops=4)
    with torch.no_grad():
        model.model.early_exit_gate.weight.normal_(0, 2.0)
    ids = torch.randint(0, 61, (1, 17))
    _, ref_exit = ouro_forward(model.state_dict(), model.config.to_dict(), ids[0], 4)
    with torch.no_grad():  # centre the exit logits so that exits spread over the loops
        model.model.early_exit_gate.bias.sub_(ref_exit.median())
    ref_logits, ref_exit = ouro_forward(model.state_dict(), model.config.to_dict(), ids[0], 4)
    probs = exit_probs(ref_exit)
    # Ouro's forward runs every loop and picks each token's exit loop: the same selection, from every loop's
    # logits and the exit distribution (`early_exit_threshold` itself stops the loops: tests/test_early_exit.py).
    out = model(ids, return_loop_outputs=True)
    loop = select_exit_loop(out.exit_probs[0], threshold)  # [L]
    chosen = torch.stack(out.loop_logits)[loop, 0, torch.arange(ids.shape[1])]
    assert_close(chosen, select_logits(ref_logits, probs, threshold=threshold), atol=ATOL)
    # Stopping at the threshold changes nothing for the first token (no earlier row to differ).
    stopped = model(ids, early_exit_threshold=threshold).logits[0]
    assert_close(stopped[0], chosen[0], atol=ATOL)
    fixed = model(ids, exit_at_step=1).logits[0]
    assert_close(fixed, ref_logits[1], atol=ATOL)
    # the set-up is not vacuous: the threshold picks different loops for different tokens
    reached = probs.cumsum(0) >= threshold
    first = torch.where(reached.any(0), reached.float().argmax(0), 3)
    assert len(set(first.tolist())) > 1


def test_per_loop_decode_with_cache_matches_full_forward():
    model = tiny_model(cache_mode="per_loop")
    ids = torch.randint(0, 61, (2, 9))
    full = model(ids, use_cache=False).logits
    assert_close(logits_in_pieces(model, ids, list(range(10))), full, atol=ATOL)


# 2. shared: chunking and the cache --------------------------------------------------------------------------


def test_shared_chunk_size_one_equals_token_by_token_decode():
    model = tiny_model(chunk_size=1)
    ids = torch.randint(0, 61, (2, 10))
    full = model(ids, use_cache=False).logits
    assert_close(logits_in_pieces(model, ids, list(range(11))), full, atol=ATOL)


@pytest.mark.parametrize("chunk,splits", [(4, [4, 12]), (3, [3, 6, 9]), (5, [10])])
def test_chunked_forward_equals_cached_calls_split_at_chunk_multiples(chunk, splits):
    model = tiny_model(chunk_size=chunk)
    ids = torch.randint(0, 61, (2, 14))
    full = model(ids, use_cache=False).logits
    assert_close(logits_in_pieces(model, ids, [0, *splits, 14]), full, atol=ATOL)


def test_chunk_size_changes_shared_results():
    # the chunk size is a real semantic knob in shared mode (unlike per_loop), so tests above are not vacuous
    model = tiny_model(chunk_size=1)
    ids = torch.randint(0, 61, (1, 12))
    assert max_diff(model(ids).logits, twin(model, chunk_size=12)(ids).logits) > 1e-4


# 3. shared vs per_loop equivalences -----------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [1, 4, 16])
def test_blend_alpha_zero_equals_per_loop(chunk):
    model = tiny_model(chunk_size=chunk)
    ouro = twin(model, cache_mode="per_loop")
    ids = torch.randint(0, 61, (2, 11))
    blended = model(ids, kv_blend_alpha=0.0, return_loop_outputs=True, return_attention_outputs=True)
    reference = ouro(ids, return_loop_outputs=True, return_attention_outputs=True)
    assert_close(blended.logits, reference.logits, atol=ATOL)
    for t in range(3):
        for layer in range(2):
            assert_close(blended.attention_outputs[t][layer], reference.attention_outputs[t][layer], atol=ATOL)
    assert max_diff(model(ids, kv_blend_alpha=1.0).logits, model(ids).logits) == 0.0
    assert max_diff(model(ids, kv_blend_alpha=0.5).logits, reference.logits) > 1e-4


def test_blend_through_a_cache_equals_one_call_and_keeps_its_alpha():
    model = tiny_model(chunk_size=4)
    ids = torch.randint(0, 61, (2, 12))
    whole = model(ids, kv_blend_alpha=0.3).logits
    cache = model.new_cache(keep_loop_rows=True)
    parts = [model(ids[:, :8], kv_blend_alpha=0.3, cache=cache).logits,
             model(ids[:, 8:], kv_blend_alpha=0.3, cache=cache).logits]
    assert_close(torch.cat(parts, dim=1), whole, atol=ATOL)
    for alpha in (0.5, None):  # the loop slots hold rows blended with 0.3 (None: MELT alone writes no loop rows)
        with pytest.raises(ValueError, match="same kv_blend_alpha"):
            model(ids[:, :1], kv_blend_alpha=alpha, cache=cache)


@pytest.mark.parametrize("chunk", [1, 3, 32])
def test_single_loop_shared_equals_per_loop_for_any_chunk(chunk):
    model = tiny_model(num_loops=1, chunk_size=chunk)
    ouro = twin(model, cache_mode="per_loop")
    ids = torch.randint(0, 61, (2, 12))
    assert_close(model(ids).logits, ouro(ids).logits, atol=ATOL)


def test_last_gate_one_chunk_equals_per_loop():
    model = tiny_model(gate_type="last", chunk_size=64)
    ouro = twin(model, cache_mode="per_loop")
    ids = torch.randint(0, 61, (2, 15))
    assert_close(model(ids).logits, ouro(ids).logits, atol=ATOL)
    # with several chunks, queries see earlier chunks' FINAL rows instead of the current loop's: different
    assert max_diff(twin(model, chunk_size=4)(ids).logits, ouro(ids).logits) > 1e-4


# 4. cache bytes -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_loops", [1, 2, 4, 8])
def test_cache_bytes_shared_constant_per_loop_linear(num_loops):
    cfg = tiny_config(num_loops=num_loops)
    length, per_token = 9, cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * cfg.head_dim * 4
    ids = torch.randint(0, 61, (1, length))
    shared = tiny_model(num_loops=num_loops)(ids).cache
    per_loop = tiny_model(num_loops=num_loops, cache_mode="per_loop")(ids).cache
    assert shared.nbytes() == length * per_token
    assert per_loop.nbytes() == num_loops * length * per_token
    assert shared.get_seq_length() == per_loop.get_seq_length() == length


def test_dynamic_cache_grows_in_fixed_steps_and_tracks_tokens_apart_from_capacity():
    from melt.cache_melt import GROW_COLUMNS

    model = tiny_model(chunk_size=1)
    cache = model(torch.randint(0, 61, (1, 5))).cache
    assert cache.layers[0].capacity == 5 and cache.get_seq_length() == 5  # the first call allocates exactly
    assert cache.capacity_nbytes() == cache.nbytes()
    model(torch.randint(0, 61, (1, 1)), cache=cache)
    assert cache.layers[0].capacity == GROW_COLUMNS and cache.get_seq_length() == 6
    assert cache.capacity_nbytes() == cache.nbytes() * GROW_COLUMNS // 6


def test_num_loops_override_per_call_keeps_shared_memory():
    model = tiny_model()
    ids = torch.randint(0, 61, (1, 7))
    sizes = {t: model(ids, num_loops=t).cache.nbytes() for t in (1, 2, 5)}
    assert len(set(sizes.values())) == 1
    assert max_diff(model(ids, num_loops=5).logits, model(ids).logits) > 1e-4
    loaded = MeltForCausalLM(MeltConfig(**{**model.config.to_dict(), "num_loops": 5})).eval()
    loaded.load_state_dict(model.state_dict())
    assert_close(loaded(ids).logits, model(ids, num_loops=5).logits, atol=ATOL)


def test_cache_crop_reset_and_batch_select():
    model = tiny_model(chunk_size=1)
    ids = torch.randint(0, 61, (3, 8))
    cache = model(ids[:, :6]).cache
    cache.crop(-2)
    assert cache.get_seq_length() == 4
    cropped = model(ids[:, 4:8], cache=cache).logits
    fresh = model(ids[:, 4:8], cache=model(ids[:, :4]).cache).logits
    assert_close(cropped, fresh, atol=ATOL)
    cache.batch_select_indices(torch.tensor([2, 0]))
    cache.reset()
    assert cache.get_seq_length() == 0 and cache.nbytes() == 0
    again = model(ids[[2, 0], :3], cache=cache).logits
    assert_close(again, model(ids[[2, 0], :3]).logits, atol=ATOL)


def test_reorder_cache_permutes_sequences():
    model = tiny_model(chunk_size=2)
    ids = torch.randint(0, 61, (3, 6))
    cache = model(ids).cache
    cache.reorder_cache(torch.tensor([2, 2, 0]))
    nxt = torch.randint(0, 61, (3, 1))
    reordered = model(nxt, cache=cache).logits
    direct = model(nxt, cache=model(ids[[2, 2, 0]]).cache).logits
    assert_close(reordered, direct, atol=ATOL)


# padding and chunk boundaries per sequence ------------------------------------------------------------------


@pytest.mark.parametrize("cache_mode", ["shared", "per_loop"])
def test_left_padded_batch_forward_matches_each_sequence(cache_mode):
    model = tiny_model(chunk_size=3, cache_mode=cache_mode)
    lengths = [11, 7, 4]
    seqs = [torch.randint(1, 61, (n,)) for n in lengths]
    ids = torch.zeros(3, 11, dtype=torch.long)
    mask = torch.zeros(3, 11, dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, 11 - len(s) :], mask[b, 11 - len(s) :] = s, 1
    out = model(ids, attention_mask=mask)
    for b, s in enumerate(seqs):
        single = model(s[None]).logits[0]
        assert_close(out.logits[b, 11 - len(s) :], single, atol=ATOL)
    # continuing the padded cache equals continuing each sequence alone
    nxt = torch.randint(1, 61, (3, 4))
    cont = model(nxt, attention_mask=torch.cat([mask, torch.ones(3, 4, dtype=torch.long)], 1),
                 cache=out.cache).logits
    for b, s in enumerate(seqs):
        single_cache = model(s[None]).cache
        assert_close(cont[b], model(nxt[b : b + 1], cache=single_cache).logits[0], atol=ATOL)


# 5. generation ------------------------------------------------------------------------------------------------


def _left_pad(seqs, pad=0):
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, s in enumerate(seqs):
        ids[b, width - len(s) :], mask[b, width - len(s) :] = s, 1
    return ids, mask


@pytest.mark.parametrize("cache_mode", ["shared", "per_loop"])
def test_left_padded_batch_generate_equals_per_sequence(cache_mode):
    model = tiny_model(chunk_size=3, cache_mode=cache_mode)
    seqs = [torch.randint(1, 61, (n,)) for n in (9, 5, 2)]
    ids, mask = _left_pad(seqs)
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
    batch = model.generate(ids, attention_mask=mask, **kwargs)
    for b, s in enumerate(seqs):
        single = model.generate(s[None], attention_mask=torch.ones(1, len(s), dtype=torch.long), **kwargs)
        assert torch.equal(batch[b, ids.shape[1] :], single[0, len(s) :])


@pytest.mark.parametrize("cache_mode", ["shared", "per_loop"])
def test_beam_search_with_cache_equals_without(cache_mode):
    # chunk_size=1: without a cache every step re-runs the prefix, which is only the same computation as
    # cached decoding when prefill is token-exact (C = 1) -- in per_loop mode any chunk size is.
    model = tiny_model(chunk_size=1, cache_mode=cache_mode)
    ids = torch.randint(1, 61, (2, 5))
    kwargs = dict(max_new_tokens=5, num_beams=3, do_sample=False, pad_token_id=0, eos_token_id=None)
    with_cache = model.generate(ids, use_cache=True, **kwargs)
    without = model.generate(ids, use_cache=False, **kwargs)
    assert torch.equal(with_cache, without)


def test_sampling_is_seeded_reproducible_and_num_loops_passes_through_generate():
    model = tiny_model()
    ids = torch.randint(1, 61, (2, 4))
    kwargs = dict(max_new_tokens=8, do_sample=True, top_k=20, pad_token_id=0, eos_token_id=None)
    torch.manual_seed(7)
    first = model.generate(ids, **kwargs)
    torch.manual_seed(7)
    assert torch.equal(first, model.generate(ids, **kwargs))
    greedy = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
    deep = model.generate(ids, num_loops=8, **greedy)
    out = model(ids, num_loops=8)
    manual = torch.cat([ids, out.logits[:, -1:].argmax(-1)], 1)
    for _ in range(5):
        out = model(manual[:, -1:], num_loops=8, cache=out.cache)
        manual = torch.cat([manual, out.logits[:, -1:].argmax(-1)], 1)
    assert torch.equal(deep, manual)
    assert not torch.equal(deep, model.generate(ids, **greedy))


# 8. gates and gradients ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("gate_type", ["elementwise", "scalar", "mean", "ema", "last"])
def test_gate_types_follow_the_spec(gate_type):
    torch.manual_seed(0)
    gate = MeltLatentGate(tiny_config(gate_type=gate_type, ema_decay=0.3))
    for p in gate.parameters():
        torch.nn.init.normal_(p, 0, 0.5)
    inputs = [torch.randn(2, 3, 32) for _ in range(4)]
    s = None
    for t, a in enumerate(inputs):
        previous = s
        s = gate(a, s, t, "eager")
        if t == 0 or gate_type == "last":
            assert torch.equal(s, a)
        elif gate_type == "mean":
            assert_close(s, torch.stack(inputs[: t + 1]).mean(0), atol=1e-6)
        elif gate_type == "ema":
            assert_close(s, 0.3 * previous + 0.7 * a, atol=1e-6)
        else:
            z = torch.sigmoid(a @ gate.W.T + previous @ gate.U.T + gate.b)
            assert z.shape[-1] == (32 if gate_type == "elementwise" else 1)
            assert_close(s, z * previous + (1 - z) * a, atol=1e-6)
    expected = {"elementwise": 2 * 32 * 32 + 32, "scalar": 2 * 32 + 1}.get(gate_type, 0)
    assert sum(p.numel() for p in gate.parameters()) == expected


class OpNames(TorchDispatchMode):
    """The aten ops a block dispatches, by name, in order."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))

    def launches(self) -> list[str]:
        """The ops that would launch a kernel on a GPU (views and reshapes excluded)."""
        return [n for n in self.names
                if n not in ("view", "_unsafe_view", "t", "slice", "unsqueeze", "expand", "promote_types")]


@pytest.mark.parametrize("gate_type", ["elementwise", "scalar"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_learned_gate_is_two_gemms_a_sigmoid_and_a_lerp(gate_type, dtype):
    # Every backend but triton runs the plain lines ("auto" off CUDA, and compiled graphs that are not fused):
    # the bias and s U^T are added inside the GEMMs and the blend is one lerp, rounded once in bf16 as the fp32
    # reference (and the Triton kernel) round it.
    torch.manual_seed(0)
    gate = MeltLatentGate(tiny_config(gate_type=gate_type)).to(dtype)
    for p in gate.parameters():
        torch.nn.init.normal_(p, 0, 0.5)
    a, s = torch.randn(2, 3, 32, dtype=dtype), torch.randn(2, 3, 32, dtype=dtype)
    with torch.no_grad(), OpNames() as ops:  # as in decode
        out = gate(a, s, 1, "auto")
    assert ops.launches() == ["addmm", "addmm", "sigmoid", "lerp"]
    expected = naive_gated_update(a, s, F.linear(a.float(), gate.W.float()), F.linear(s.float(), gate.U.float()),
                                  gate.b.float())
    assert out.dtype == dtype and out.shape == a.shape
    assert_close(out, expected, atol=1e-6 if dtype == torch.float32 else 3e-2)


GRADCHECK_CASES = {
    "shared": dict(),
    "per_loop": dict(cache_mode="per_loop"),
    "blend": dict(kv_blend_alpha=0.5),
    "padded": dict(attention_mask=torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])),  # misaligned chunks: scatter
}


@pytest.mark.parametrize("case", list(GRADCHECK_CASES))
def test_gradients_flow_across_chunks_gradcheck(case):
    options = dict(GRADCHECK_CASES[case])
    model = tiny_model(hidden_size=8, intermediate_size=12, num_attention_heads=2, num_key_value_heads=1,
                       head_dim=4, num_hidden_layers=1, num_loops=2, chunk_size=2,
                       cache_mode=options.pop("cache_mode", "shared")).double()
    batch = 2 if "attention_mask" in options else 1
    embeds = torch.randn(batch, 5, 8, dtype=torch.double, requires_grad=True)

    def last_token_logits(x):
        return model(inputs_embeds=x, use_cache=False, **options).logits[:, -1]

    assert torch.autograd.gradcheck(last_token_logits, (embeds,), eps=1e-6, atol=1e-5)
    last_token_logits(embeds).sum().backward()
    # the last token (chunk 2 or 3) reaches the first chunk's tokens only through their cache rows
    assert embeds.grad[-1, 0].abs().sum() > 0
    if model.config.cache_mode == "shared":
        assert all(p.grad is not None and p.grad.abs().sum() > 0
                   for n, p in model.named_parameters() if GATE_MARKER in n)


@pytest.mark.parametrize("blend", [None, 0.5])
def test_training_keeps_one_copy_of_the_cache_rows(blend):
    """Backward needs the prefix rows of every chunk; they must all be views of the cache's one buffer per slot.

    Rows written out of place would leave a full-length buffer version per chunk alive for backward: O(L^2 / C).
    """
    model = tiny_model(chunk_size=4).train()
    ids = torch.randint(0, 61, (2, 32))  # 8 chunks
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = model(ids, use_cache=True, kv_blend_alpha=blend)
    cache = out.cache
    buffers = [buffer for layer in cache.layers for buffer in layer.keys + layer.values]
    buffer_storages = {buffer.untyped_storage().data_ptr() for buffer in buffers}
    # Saved tensors that are (views of) a full-length row buffer `[B, kv_heads, capacity, head_dim]`.
    row_buffers = {t.untyped_storage().data_ptr() for t in saved
                   if (t if t._base is None else t._base).shape == buffers[0].shape}
    prefix_reads = [t for t in saved if t.untyped_storage().data_ptr() in buffer_storages]
    assert len(prefix_reads) >= 7, "the prefix reads of chunks 2-8 must save views of the cache buffers"
    assert row_buffers <= buffer_storages  # and no other version of them is kept for backward
    out.logits.sum().backward()
    assert all(not buffer.requires_grad for buffer in buffers)


def test_crop_and_rewrite_do_not_change_a_pending_backward():
    model = tiny_model(chunk_size=3).train()
    ids = torch.randint(0, 61, (1, 12))
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_()

    def gradient(rewrite: bool) -> torch.Tensor:
        x = embeds.detach().clone().requires_grad_()
        out = model(inputs_embeds=x, use_cache=True)
        if rewrite:  # crop and write other rows at the cropped columns before the first graph's backward
            out.cache.crop(4)
            model(inputs_embeds=torch.randn(1, 8, embeds.shape[-1]), cache=out.cache)
        out.logits[:, -1].sum().backward()
        return x.grad

    assert max_diff(gradient(True), gradient(False)) == 0.0


def test_gradients_follow_a_reordered_cache():
    model = tiny_model(chunk_size=3).train()
    first, second = torch.randint(0, 61, (2, 7)), torch.randint(0, 61, (2, 4))
    weights = torch.randn(2, 1, 61)

    def gradient(reorder: bool) -> torch.Tensor:
        x = model.get_input_embeddings()(first).detach().requires_grad_()
        cache = model(inputs_embeds=x, use_cache=True).cache
        order = torch.tensor([1, 0] if reorder else [0, 1])
        cache.reorder_cache(order)
        logits = model(second[order], cache=cache).logits
        (logits[:, -1:] * weights[order]).sum().backward()
        return x.grad

    assert_close(gradient(True), gradient(False), atol=1e-6)


def test_gradient_checkpointing_gives_the_same_gradients():
    model = tiny_model(chunk_size=4).train()
    ids = torch.randint(0, 61, (2, 10))
    model(ids, labels=ids, use_cache=False).loss.backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert len(plain) == len(list(model.parameters())) - 2  # all but the exit gate, unused by this loss
    model.zero_grad()
    model.activation_checkpointing_enable()
    assert all(layer.gradient_checkpointing for layer in model.model.layers)
    model(ids, labels=ids, use_cache=False).loss.backward()
    for name, grad in plain.items():
        assert_close(model.get_parameter(name).grad, grad, atol=1e-6, name=name)


# backends, GQA, validation ---------------------------------------------------------------------------------------


def test_eager_and_sdpa_backends_agree():
    # One chunk spans the batch, so no call has prefix rows: the calls "sdpa" serves (it refuses a prefix).
    model = tiny_model(chunk_size=16)
    ids, mask = _left_pad([torch.randint(1, 61, (n,)) for n in (10, 6)])
    with override_backend("eager"):
        eager = model(ids, attention_mask=mask).logits
    with override_backend("sdpa"):
        sdpa = model(ids, attention_mask=mask).logits
    assert_close(eager, sdpa, atol=ATOL)
    with override_backend("sdpa"), pytest.raises(ValueError, match="'sdpa' cannot attend over prefix rows"):
        tiny_model(chunk_size=4)(ids, attention_mask=mask)


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("num_key_value_heads", 3, "must divide"),
        ("num_loops", 0, "num_loops"),
        ("chunk_size", 0, "chunk_size"),
        ("gate_type", "max", "gate_type"),
        ("cache_mode", "both", "cache_mode"),
        ("attention_backend", "cuda", "attention_backend"),
        ("exit_at_step", 3, "exit_at_step"),
        ("early_exit_threshold", 1.5, "early_exit_threshold"),
    ],
)
def test_invalid_config_raises_naming_the_field(field, value, match):
    with pytest.raises(ValueError, match=match):
        tiny_config(**{field: value})


def test_bad_inputs_raise_clear_errors():
    model = tiny_model()
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match="empty input"):
        model(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="exactly one of"):
        model()
    with pytest.raises(ValueError, match="attention_mask"):
        model(torch.zeros(2, 4, dtype=torch.long), attention_mask=torch.ones(2, 3))
    with pytest.raises(ValueError, match="num_loops"):
        model(torch.zeros(1, 4, dtype=torch.long), num_loops=0)
    with pytest.raises(ValueError, match="kv_blend_alpha"):
        model(torch.zeros(1, 4, dtype=torch.long), kv_blend_alpha=1.5)
    per_loop = tiny_model(cache_mode="per_loop")
    with pytest.raises(ValueError, match="shared"):
        per_loop(torch.zeros(1, 4, dtype=torch.long), kv_blend_alpha=0.5)
    cache = per_loop(torch.zeros(1, 4, dtype=torch.long)).cache
    with pytest.raises(ValueError, match="same num_loops"):
        per_loop(torch.zeros(1, 1, dtype=torch.long), cache=cache, num_loops=5)
    with pytest.raises(TypeError, match="MeltCache"):
        model(torch.zeros(1, 4, dtype=torch.long), cache=object())
    with pytest.raises(ValueError, match="keep_loop_rows"):
        model(torch.zeros(1, 4, dtype=torch.long), kv_blend_alpha=0.5, cache=MeltCache(model.config))


@pytest.mark.parametrize("cache_mode, chunk, expect_rows", [
    ("per_loop", 4, False),  # the teacher's forward: one round, nothing reads its rows
    ("shared", 64, False),   # one chunk
    ("shared", 4, True),     # later chunks read earlier chunks' final rows
])
def test_forward_without_cache_allocates_only_rows_that_are_read(monkeypatch, cache_mode, chunk, expect_rows):
    from melt.cache_melt import MeltCacheLayer

    allocated = []
    original = MeltCacheLayer.allocate

    def spy(self, columns, like):
        allocated.append(columns)
        return original(self, columns, like)

    monkeypatch.setattr(MeltCacheLayer, "allocate", spy)
    model = tiny_model(cache_mode=cache_mode, chunk_size=chunk)
    ids = torch.randint(0, 61, (2, 12))
    out = model(ids, use_cache=False, return_loop_outputs=True)
    assert out.cache is None and bool(allocated) == expect_rows
    allocated.clear()
    assert model(ids, use_cache=True).cache.nbytes() > 0 and allocated


def test_attention_outputs_are_kept_only_when_asked_for():
    """Phase 1 distils loop logits only: collecting every (loop, layer) attention output there would hold T*N
    activations of [B, L, H*D] per sequence for nothing (~4 GB at the published shape)."""
    model = tiny_model(chunk_size=4)
    ids = torch.randint(0, 61, (2, 9))
    loops_only = model(ids, use_cache=False, return_loop_outputs=True)
    assert loops_only.attention_outputs is None and len(loops_only.loop_logits) == 3
    both = model(ids, use_cache=False, return_loop_outputs=True, return_attention_outputs=True)
    assert len(both.attention_outputs) == 3 and all(len(per_loop) == 2 for per_loop in both.attention_outputs)
    assert both.attention_outputs[0][0].shape == (2, 9, 4 * 8)
    assert max_diff(both.logits, loops_only.logits) == 0.0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_rms_norm_is_ouros_lines_bit_for_bit(dtype):
    from melt.modeling_melt import MeltRMSNorm

    norm = MeltRMSNorm(64, eps=1e-6)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    norm = norm.to(dtype)
    x = (torch.randn(3, 5, 64) * 4).to(dtype)
    hidden = x.to(torch.float32)  # Ouro: normalise in fp32, cast back, then scale
    hidden = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + 1e-6)
    expected = norm.weight * hidden.to(dtype)
    out = norm(x)
    assert out.dtype == dtype and torch.equal(out, expected)


def test_rotary_tables_come_in_the_activations_dtype_and_rotating_casts_nothing():
    # cos/sin are cast once per forward (rotary_cos_sin), not at each of the N*T*2 rotations: in bf16 each cast
    # would be one more kernel launch per (layer, loop) on a GPU.
    from melt.modeling_melt import apply_rotary, rotary_cos_sin

    positions = torch.arange(7)[None]
    cos32, sin32 = rotary_cos_sin(positions, 8, 10_000.0)
    cos, sin = rotary_cos_sin(positions, 8, 10_000.0, torch.bfloat16)
    assert cos.dtype == sin.dtype == torch.bfloat16
    assert torch.equal(cos, cos32.to(torch.bfloat16)) and torch.equal(sin, sin32.to(torch.bfloat16))
    x = torch.randn(1, 2, 7, 8, dtype=torch.bfloat16)
    with OpNames() as ops:
        rotated = apply_rotary(x, cos, sin)
    assert "_to_copy" not in ops.names and len([n for n in ops.names if n not in ("slice", "unsqueeze")]) == 4
    assert torch.equal(rotated, apply_rotary(x, cos32, sin32))
    # the rotate-half formula, bit for bit: the signed table only moves a (exact) sign flip
    cos_half, sin_half = cos[:, None, :, :4], sin[:, None, :, 4:]  # the table's halves: cos, +sin
    x1, x2 = x[..., :4], x[..., 4:]
    expected = torch.cat([x1 * cos_half - x2 * sin_half, x2 * cos_half + x1 * sin_half], dim=-1)
    assert torch.equal(rotated, expected)
