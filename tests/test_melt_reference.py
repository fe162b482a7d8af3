"""Shared (MELT) mode against the independent reference of `melt_reference.py`: every gate type with random gate
weights, chunk sizes 1, 3 and larger than the sequence, left-padded batches, the phase-1 blend, token-by-token
decode after a chunked prefill."""

import pytest
import torch

from melt_reference import chunks_of, melt_forward
from melt_testing import assert_close, tiny_model

ATOL = 2e-5
GATES = ["elementwise", "scalar", "mean", "ema", "last"]


def reference(model, ids, chunks, blend=None):
    cfg = model.config.to_dict()
    return melt_forward(model.state_dict(), cfg, ids, cfg["num_loops"], chunks, blend)


@pytest.mark.parametrize("gate_type", GATES)
@pytest.mark.parametrize("chunk", [1, 3, 64])
def test_shared_mode_equals_the_reference(gate_type, chunk):
    model = tiny_model(gate_type=gate_type, chunk_size=chunk, ema_decay=0.3)
    ids = torch.randint(0, 61, (2, 10))
    with torch.no_grad():
        logits = model(ids, use_cache=False, logits_to_keep=0).logits
    for b in range(2):
        expected = reference(model, ids[b], chunks_of(10, chunk))
        assert_close(logits[b], expected, atol=ATOL)


def test_left_padded_batch_equals_the_reference_per_sequence():
    model = tiny_model(chunk_size=3)
    ids = torch.randint(1, 61, (2, 11))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # sequence 1 is 7 tokens: its chunks start at its own positions 0, 3, 6
    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits
    assert_close(logits[0], reference(model, ids[0], chunks_of(11, 3)), atol=ATOL)
    assert_close(logits[1, 4:], reference(model, ids[1, 4:], chunks_of(7, 3)), atol=ATOL)


def test_phase_one_blend_equals_the_reference():
    model = tiny_model(chunk_size=3)
    ids = torch.randint(0, 61, (1, 10))
    with torch.no_grad():
        logits = model(ids, kv_blend_alpha=0.3).logits[0]
    assert_close(logits, reference(model, ids[0], chunks_of(10, 3), blend=0.3), atol=ATOL)


@pytest.mark.parametrize("preallocated", [False, True], ids=["dynamic", "preallocated"])
def test_token_by_token_decode_equals_the_reference(preallocated):
    model = tiny_model(chunk_size=3)
    ids = torch.randint(0, 61, (1, 10))
    cache = model.new_cache(max_cache_len=10 if preallocated else None)
    with torch.no_grad():
        pieces = [model(ids[:, :6], cache=cache).logits]
        pieces += [model(ids[:, i : i + 1], cache=cache).logits for i in range(6, 10)]
    expected = reference(model, ids[0], chunks_of(10, 3, then_single_from=6))
    assert_close(torch.cat(pieces, dim=1)[0], expected, atol=ATOL)
