"""The preallocated cache: it allocates exactly what it holds, never moves while decoding, gives the same logits as
the dynamic cache and the full forward, and its decode step compiles as one graph with no recompile."""

import pytest
import torch

from melt import MeltCache
from melt_testing import assert_close, decode, tiny_model

ATOL = 1e-5



@pytest.mark.parametrize("cache_mode", ["shared", "per_loop"])
@pytest.mark.parametrize("padded", [False, True], ids=["dense", "left-padded"])
def test_static_equals_dynamic_equals_full_forward(cache_mode, padded):
    model = tiny_model(cache_mode=cache_mode, chunk_size=1)  # C = 1: token-by-token decode is the full forward
    ids = torch.randint(1, 61, (2, 9))
    mask = None
    if padded:
        mask = torch.ones_like(ids)
        mask[1, :2] = 0
    with torch.no_grad():
        full = model(ids, attention_mask=mask, use_cache=False).logits
    static = decode(model, ids, mask, model.new_cache(max_cache_len=16))
    dynamic = decode(model, ids, mask, model.new_cache())
    real = slice(None) if mask is None else mask.bool()
    assert_close(static[real], dynamic[real], atol=ATOL)
    assert_close(static[real], full[real], atol=ATOL)


def test_static_decode_with_chunked_prefill_equals_dynamic():
    model = tiny_model(chunk_size=2)
    ids = torch.randint(1, 61, (2, 8))
    static = decode(model, ids, None, model.new_cache(max_cache_len=8))
    assert_close(static, decode(model, ids, None, model.new_cache()), atol=ATOL)


def _slots(cache):
    return [buffer for layer in cache.layers for buffer in layer.keys + layer.values]


@pytest.mark.parametrize("cache_mode", ["shared", "per_loop"])
@pytest.mark.parametrize("padded", [False, True], ids=["dense", "padded"])
def test_in_place_step_equals_the_prefix_and_chunk_step_and_writes_the_same_rows(cache_mode, padded):
    """Off CUDA ("auto") and for "sdpa" the step writes the token's rows into its own column first and attends over
    the buffers (`cache_attention`); the reference step (forced "eager") attends over prefix + chunk rows and writes
    after. Same logits, same rows in every slot; a padded token that sees no key gets zeros, not NaN."""
    from melt import override_backend

    model = tiny_model(cache_mode=cache_mode, chunk_size=2)
    ids = torch.randint(1, 61, (2, 8))
    mask = None
    if padded:
        mask = torch.ones_like(ids)
        mask[1, :5] = 0  # row 1 decodes two padding tokens that see no key at all
    results = {}
    for backend in ("eager", "auto", "sdpa"):
        cache = model.new_cache(max_cache_len=10)
        with override_backend(backend):  # forced "sdpa" serves the steps only: prefill is decoded token by token
            results[backend] = decode(model, ids, mask, cache, prefill=1), _slots(cache)
    logits, rows = results["eager"]
    assert torch.isfinite(logits).all()
    for backend in ("auto", "sdpa"):
        assert_close(results[backend][0], logits, atol=ATOL, name=f"{backend} logits")
        for i, (buffer, expected) in enumerate(zip(results[backend][1], rows, strict=True)):
            assert_close(buffer, expected, atol=ATOL, name=f"{backend} buffer {i}")


def test_in_place_step_reads_the_written_columns_eager_and_the_whole_buffer_compiled(monkeypatch):
    """Eager, the host knows the fill: the attention gets the columns written (this token's included) and no mask
    without padding; compiled, the whole buffer under a mask (fixed shapes)."""
    import torch._dynamo

    import melt.modeling_melt as modeling

    seen, cache_attention = [], modeling.cache_attention

    def spy(q, keys, values, bias, no_key=None):
        seen.append((keys.shape[2], None if bias is None else bias.shape[-1]))
        return cache_attention(q, keys, values, bias, no_key)

    monkeypatch.setattr(modeling, "cache_attention", spy)
    model = tiny_model(chunk_size=2, num_hidden_layers=1, num_loops=2)
    ids = torch.randint(1, 61, (2, 7))
    mask = torch.ones_like(ids)
    decode(model, ids, None, model.new_cache(max_cache_len=16), prefill=5)
    assert seen == [(6, None)] * 2 + [(7, None)] * 2
    seen.clear()
    mask[1, 0] = 0
    decode(model, ids, mask, model.new_cache(max_cache_len=16), prefill=5)
    assert seen == [(6, 6)] * 2 + [(7, 7)] * 2
    seen.clear()
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager", dynamic=False)
    decode(model, ids, None, model.new_cache(max_cache_len=16), step=compiled, prefill=5)
    assert set(seen) == {(16, 16)}  # traced once: one graph for both steps


def test_decode_step_copies_no_buffer_in_bf16():
    """The in-place step reads the cache in its own dtype: in bf16 it allocates activations only, where the reference
    step's fp32 softmax upcasts every buffer it reads (2 x 2 x N x T buffers per token)."""
    from melt import override_backend
    from melt_benchmarks.decode import DispatchTally

    model = tiny_model(max_position_embeddings=4096).to(torch.bfloat16)
    allocated = {}
    for backend in ("auto", "eager"):
        cache = model.new_cache(max_cache_len=4096)  # the reference reads (and upcasts) all of it, whatever the fill
        with torch.no_grad(), override_backend(backend):
            model(torch.randint(1, 61, (1, 3)), cache=cache)
            with DispatchTally() as tally:
                model(torch.randint(1, 61, (1, 1)), cache=cache)
        buffer = cache.layers[0].keys[0]
        allocated[backend] = tally.new_bytes / (buffer.numel() * buffer.element_size())
    # less than one buffer (no copy of any); the reference upcasts each it reads: 2 (k, v) x 2 (fp32) x layers x loops
    assert allocated["auto"] < 1 and allocated["eager"] >= 4 * 2 * 3, allocated


def test_preallocated_cache_allocates_once_and_never_moves():
    model = tiny_model(chunk_size=2)
    cache = model.new_cache(max_cache_len=12)
    ids = torch.randint(1, 61, (2, 12))
    with torch.no_grad():
        model(ids[:, :5], cache=cache)
        pointers = [buffer.data_ptr() for layer in cache.layers for buffer in layer.keys + layer.values]
        assert cache.capacity_nbytes() == cache.nbytes() * 12 // 5
        for i in range(5, 12):
            model(ids[:, i : i + 1], cache=cache)
            assert [buffer.data_ptr() for layer in cache.layers for buffer in layer.keys + layer.values] == pointers
    assert cache.get_seq_length() == 12 and cache.capacity_nbytes() == cache.nbytes()
    with torch.no_grad(), pytest.raises(ValueError, match="is full"):
        model(ids[:, :1], cache=cache)
    with torch.no_grad(), pytest.raises(ValueError, match="larger max_cache_len"):
        model(ids, cache=model.new_cache(max_cache_len=11))
    with pytest.raises(RuntimeError, match="no_grad"):
        model(ids[:, :1], cache=model.new_cache(max_cache_len=4))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model.new_cache(max_cache_len=model.config.max_position_embeddings + 1)


def test_crop_and_reorder_keep_the_static_counter():
    model = tiny_model(chunk_size=1)
    ids = torch.randint(1, 61, (2, 8))
    with torch.no_grad():
        cache = model.new_cache(max_cache_len=10)
        model(ids[:, :6], cache=cache)
        cache.crop(4)
        assert cache.get_seq_length() == 4
        cache.reorder_cache(torch.tensor([1, 0]))
        cropped = model(ids[[1, 0], 4:5], cache=cache).logits
        fresh = model(ids[[1, 0], 4:5], cache=model(ids[[1, 0], :4], use_cache=True).cache).logits
    assert_close(cropped, fresh, atol=ATOL)


@pytest.mark.parametrize("kwargs", [dict(), dict(num_beams=2)], ids=["greedy", "beam"])
def test_generate_preallocates_exactly_and_matches_the_dynamic_cache(kwargs):
    model = tiny_model(chunk_size=2)
    ids = torch.randint(1, 61, (2, 7))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    common = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0, **kwargs)
    default = model.generate(ids, return_dict_in_generate=True, **common)
    cache = default.cache
    assert isinstance(cache, MeltCache) and cache.is_preallocated and not cache.is_compileable
    assert cache.capacity_nbytes() == cache.nbytes()  # allocation == rows held
    static = model.generate(ids, cache_implementation="static", **common)
    dynamic = model.generate(ids, cache_implementation="dynamic", **common)
    assert torch.equal(default.sequences, static) and torch.equal(static, dynamic)
    with pytest.raises(ValueError, match="cache_implementation"):
        model.generate(ids, cache_implementation="offloaded", **common)


@pytest.mark.slow
def test_compiled_decode_step_is_one_graph_equal_to_eager():
    """`torch.compile(fullgraph=True)` of the one-token call: no graph break, no recompile across steps or across
    prompts of three lengths, and the same greedy tokens as eager over 64 steps."""
    import torch._dynamo

    model = tiny_model(chunk_size=2, max_position_embeddings=128)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager", dynamic=False)

    @torch.no_grad()
    def greedy(prompt, step, steps):
        cache = model.new_cache(max_cache_len=96)
        token = model(prompt, cache=cache, logits_to_keep=1).logits.argmax(-1)
        tokens = [token]
        for _ in range(steps):
            token = step(token, cache=cache).logits.argmax(-1)
            tokens.append(token)
        return torch.cat(tokens, dim=1)

    torch._dynamo.reset()
    prompts = [torch.randint(1, 61, (2, n)) for n in (5, 9, 17)]
    with torch._dynamo.config.patch(error_on_recompile=True):
        assert torch.equal(greedy(prompts[0], compiled, 64), greedy(prompts[0], model, 64))
        for prompt in prompts[1:]:
            assert torch.equal(greedy(prompt, compiled, 8), greedy(prompt, model, 8))


@pytest.mark.parametrize("cache_mode, threshold", [("per_loop", None), ("shared", 0.5), ("per_loop", 0.5)],
                         ids=["per_loop", "shared-early-exit", "per_loop-early-exit"])
def test_compiled_step_equals_eager_for_per_loop_caches_and_early_exit(cache_mode, threshold):
    """The in-place step compiled with fullgraph in the other modes it serves: per-loop rows (written into each loop's
    slot as they are made) and early exit (exited tokens masked, every loop run), on a padded batch."""
    import torch._dynamo

    model = tiny_model(chunk_size=2, cache_mode=cache_mode)
    model.model.early_exit_gate.bias.data.fill_(0.0)  # tokens exit at different loops
    ids = torch.randint(1, 61, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager", dynamic=False)

    def with_threshold(step):
        def call(ids, attention_mask, **kwargs):  # the fixed-width mask a compiled generate passes: one graph
            wide = torch.nn.functional.pad(attention_mask, (0, 12 - attention_mask.shape[1]))
            return step(ids, attention_mask=wide, early_exit_threshold=threshold, **kwargs)

        return call

    eager = decode(model, ids, mask, model.new_cache(max_cache_len=12), step=with_threshold(model))
    steps = decode(model, ids, mask, model.new_cache(max_cache_len=12), step=with_threshold(compiled))
    real = mask.bool()
    assert_close(steps[real], eager[real], atol=ATOL)


def test_compiled_auto_step_where_auto_resolves_to_triton_is_one_graph_equal_to_eager(monkeypatch):
    """On CUDA "auto" resolves to the Triton kernels; compiled, "auto" takes the in-place step and the gate's plain
    lines instead. Here the resolution is forced to "triton" on CPU: the compiled step must trace as one graph
    (`fullgraph=True`) and equal the eager steps, which take the kernels' path."""
    import torch._dynamo

    import melt.modeling_melt as modeling

    monkeypatch.setattr(modeling, "resolve_backend", lambda configured, device: "triton")
    model = tiny_model(chunk_size=2)
    ids = torch.randint(1, 61, (2, 7))
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager", dynamic=False)
    assert_close(decode(model, ids, None, model.new_cache(max_cache_len=8), step=compiled),
                 decode(model, ids, None, model.new_cache(max_cache_len=8)), atol=ATOL)


def test_triton_step_eager_and_compiled_equals_the_reference():
    """The Triton kernels on a preallocated cache, a padded batch of two (the fill reaches the kernel expanded over
    the batch), eager and compiled with a forced "triton": the compiled step keeps the kernels in its graph (their
    `melt::` operators: no graph break, CUDA graphs capture them, unwritten columns still skipped). Both give the
    reference step's logits."""
    import torch._dynamo

    from melt import override_backend

    model = tiny_model(hidden_size=64, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1,
                       head_dim=64, num_hidden_layers=1, num_loops=2, chunk_size=2)  # a head_dim the kernels take
    ids = torch.randint(1, 61, (2, 6))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager", dynamic=False)
    with override_backend("eager"):
        expected = decode(model, ids, mask, model.new_cache(max_cache_len=8))
    with override_backend("triton"):
        assert_close(decode(model, ids, mask, model.new_cache(max_cache_len=8)), expected, atol=ATOL, name="eager")
        logits = decode(model, ids, mask, model.new_cache(max_cache_len=8), step=compiled)
    assert_close(logits, expected, atol=ATOL, name="compiled")


def test_decode_benchmark_reports_allocation_and_op_counts(tmp_path):
    from melt_benchmarks import decode

    result = decode.main(["--prompt", "40", "--new-tokens", "3", "--out-dir", str(tmp_path)])
    by_cache = {row["cache"]: row for row in result["allocation_after_generate"]}
    assert by_cache["default"]["allocated_over_rows"] == by_cache["static"]["allocated_over_rows"] == 1.0
    first = {(row["step"], row["dtype"]): row for row in result["first_decode_step"]}
    # The dynamic cache allocates new buffers (and copies itself) when the first decode step outgrows it; the
    # preallocated one, attending the same way (prefix + chunk), allocates only the step's activations.
    dynamic, reference = first[("dynamic", "float32")], first[("prefix + chunk (reference)", "float32")]
    assert dynamic["allocated_in_step_bytes"] - reference["allocated_in_step_bytes"] >= dynamic["cache_rows_bytes"]
    # In bf16 the reference upcasts every buffer it reads (2 x the rows' bytes per loop); the in-place step does not.
    in_place, upcast = first[("in place", "bfloat16")], first[("prefix + chunk (reference)", "bfloat16")]
    assert upcast["allocated_in_step_bytes"] - in_place["allocated_in_step_bytes"] > 2 * in_place["cache_rows_bytes"]
    assert all(row["aten_ops"] > 0 for row in result["ops_per_token"])
    assert list(tmp_path.glob("decode_tiny_*.json"))


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["aot_eager", "cudagraphs"])
def test_generate_compiles_the_decode_step_through_transformers(backend):
    """`generate(cache_implementation="static")` through transformers' own compile path (`compile_config`; on CPU
    only when asked for all devices): one graph for prompts of three lengths (a fixed `max_cache_len`), and the
    same tokens as the eager generate, with a left-padded row. "cudagraphs" (CUDA graphs of the traced step, no
    inductor) captures nothing on CPU: this checks that its trace takes the whole step."""
    import torch._dynamo
    from transformers import CompileConfig

    model = tiny_model(chunk_size=2, max_position_embeddings=128)
    config = CompileConfig(fullgraph=True, backend=backend, dynamic=False)
    config._compile_all_devices = True
    common = dict(max_new_tokens=12, do_sample=False, pad_token_id=0, cache_implementation="static", max_cache_len=64)
    torch._dynamo.reset()
    for i, length in enumerate((7, 5, 11)):
        ids = torch.randint(1, 61, (2, length))
        mask = torch.ones_like(ids)
        mask[0, :2] = 0
        eager = model.generate(ids, attention_mask=mask, disable_compile=True, **common)
        with torch._dynamo.config.patch(error_on_recompile=i > 0):
            compiled = model.generate(ids, attention_mask=mask, compile_config=config, **common)
        assert torch.equal(eager, compiled)
