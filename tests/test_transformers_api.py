"""MELT speaks transformers' current API: the `cache` keyword and output field (5.24), generate through it, no
deprecation noise from the project's own calls, and no keyword dropped silently."""

import functools
import logging
import subprocess
import sys
import warnings

import pytest
import torch
from transformers.utils import logging as hf_logging

from melt import MeltCache
from melt_testing import assert_close, tiny_model


@pytest.fixture
def transformers_log():
    """Everything transformers logs during the test (its logger does not propagate to the root logger)."""
    records = []

    class Collect(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    handler = Collect(level=logging.DEBUG)
    logger = hf_logging.get_logger("transformers")
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


@pytest.mark.parametrize("cache_mode", ["shared", "per_loop"])
def test_cache_keyword_and_output_field(cache_mode):
    model = tiny_model(cache_mode=cache_mode, chunk_size=3)
    ids = torch.randint(0, 61, (2, 9))
    full = model(ids, use_cache=False).logits
    first = model(ids[:, :6], use_cache=True)  # split at a chunk boundary: shared mode then equals one call
    assert isinstance(first.cache, MeltCache) and first["cache"] is first.cache
    assert first.cache.get_seq_length() == 6
    rest = model(ids[:, 6:], cache=first.cache, use_cache=True)
    assert rest.cache is first.cache and first.cache.get_seq_length() == 9
    assert_close(torch.cat([first.logits, rest.logits], dim=1), full, atol=1e-5)


def test_past_key_values_is_the_deprecated_name_of_cache():
    model = tiny_model(chunk_size=3)
    ids = torch.randint(0, 61, (1, 7))
    new_cache = model(ids[:, :3], use_cache=True).cache
    expected = model(ids[:, 3:], cache=new_cache).logits
    old_cache = model(ids[:, :3], use_cache=True).cache
    with pytest.warns(FutureWarning, match="past_key_values"):
        old = model(ids[:, 3:], past_key_values=old_cache).logits
    assert old_cache.get_seq_length() == 7  # the cache was used, not dropped
    assert torch.equal(old, expected)
    with pytest.raises(ValueError, match="past_key_values"):
        model(ids, cache=model.new_cache(), past_key_values=model.new_cache())


def test_unknown_keywords_raise_instead_of_being_dropped():
    model = tiny_model()
    ids = torch.randint(0, 61, (1, 4))
    with pytest.raises(TypeError, match="cach"):
        model(ids, cach=model.new_cache())
    with pytest.raises(TypeError, match="num_loop"):
        model.model(ids, num_loop=2)
    with pytest.raises(ValueError, match="return_loop_outputs"):
        model(ids, output_hidden_states=True)
    with pytest.raises(ValueError, match="return_loop_outputs"):
        model(ids, output_attentions=True)
    model(ids, output_attentions=False, output_hidden_states=None)  # what generate passes when not asked
    as_tuple = model(ids, use_cache=True, return_dict=False)
    assert isinstance(as_tuple, tuple) and isinstance(as_tuple[1], MeltCache)
    labels = ids.clone()
    loss = model(ids, labels=labels, num_items_in_batch=torch.tensor(3)).loss
    assert torch.isfinite(loss)


@pytest.mark.parametrize("kwargs", [
    dict(do_sample=False),
    dict(do_sample=True, top_k=5),
    dict(do_sample=False, num_beams=3),
    dict(do_sample=False, num_loops=5),
], ids=["greedy", "sampling", "beam", "num_loops"])
def test_generate_passes_melt_cache_through_the_cache_keyword_quietly(kwargs, transformers_log):
    model = tiny_model(chunk_size=2)
    ids = torch.randint(1, 61, (2, 6))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # a left-padded row
    seen = []
    forward = model.forward

    @functools.wraps(forward)  # generate reads forward's signature to route num_loops=
    def spy(*args, **call_kwargs):
        seen.append(call_kwargs)
        return forward(*args, **call_kwargs)

    model.forward = spy
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = model.generate(ids, attention_mask=mask, max_new_tokens=4, pad_token_id=0, **kwargs)
    assert out.shape[1] == 10
    assert all("past_key_values" not in call for call in seen)
    decode_steps = [call for call in seen if call["input_ids"].shape[1] == 1]
    assert decode_steps and all(isinstance(call["cache"], MeltCache) for call in decode_steps)
    if "num_loops" in kwargs:
        assert all(call["num_loops"] == 5 for call in seen)
    assert not [m for m in transformers_log if "deprecat" in m.lower()], transformers_log


def test_older_transformers_is_refused_with_the_fix():
    code = (
        "import transformers; transformers.__version__ = '5.23.0'\n"
        "import melt"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode != 0
    assert "MELT needs transformers >= 5.24" in result.stderr and "pip install -U" in result.stderr


def test_bad_inputs_raise_one_clear_error_before_the_model_runs():
    model = tiny_model()
    with pytest.raises(ValueError, match="token id 61, outside this model's vocabulary"):
        model(torch.tensor([[1, 61]]))
    with pytest.raises(ValueError, match="token id -1"):
        model(torch.tensor([[-1, 3]]))
    with pytest.raises(TypeError, match="integer token ids"):
        model(torch.tensor([[1.0, 2.0]]))
    with pytest.raises(ValueError, match="hidden_size=32"):
        model(inputs_embeds=torch.randn(1, 3, 31))
    with pytest.raises(ValueError, match=r"early_exit_threshold must lie in \[0, 1\]"):
        model(torch.tensor([[1, 2]]), early_exit_threshold=2.0)
    cache = model(torch.randint(0, 61, (2, 3)), use_cache=True).cache
    with pytest.raises(ValueError, match="cache holds 2 sequences but the input has 3"):
        model(torch.randint(0, 61, (3, 1)), cache=cache)
