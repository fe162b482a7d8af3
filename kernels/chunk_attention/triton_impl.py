"""Chunk attention (Triton): C queries over [prefix rows | chunk rows], FA2-style.

Query i of a chunk (0..C-1) attends to all P prefix rows (final rows of earlier chunks, read in
place from the cache through their strides, never copied or concatenated) and to the chunk's own
rows j <= i (bottom-right causal), minus the keys that `key_mask` switches off (left padding).
GQA: query head h reads kv head h // (H // Hkv). A query row with no visible key outputs zeros and
has LSE = -inf.

Kernels:
    _attn_fwd_kernel             online softmax in base 2 (scores pre-scaled by scale * log2 e),
                                 fp32 accumulators; one program per (query tile, b, h, key split).
                                 With one split it writes o and LSE; with several (flash-decoding:
                                 too few programs for the device, long prefix) it writes fp32
                                 partials, and
    _attn_combine_kernel         merges the partials by their LSE.
    _attn_bwd_preprocess_kernel  delta = rowsum(do * o) - dlse.
    _attn_bwd_dkdv_kernel        one program per (key tile, b, kv head); loops over the query heads
                                 of its GQA group and over query tiles, accumulates dk, dv in fp32 and
                                 writes each key row exactly once (deterministic, no atomics).
                                 Launched once for the prefix keys and once for the chunk keys.
    _attn_bwd_dq_kernel          one program per (query tile, b, h); loops over prefix then chunk keys.

Layers: chunk_attention_fwd / chunk_attention_bwd launchers, ChunkAttentionFunction (autograd
glue), chunk_attention (public entry point with validation and backend choice).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .. import utils
from .naive import naive_chunk_attention

SUPPORTED_HEAD_DIMS = (64, 128)

# Query tiles: launches with C <= DECODE_MAX_C (decode, C = 1) use 16-row query tiles, the smallest
# tl.dot accepts, instead of the larger prefill tiles.
DECODE_MAX_C = 16
# Flash-decoding: when a launch has too few (query tile, b, h) programs to fill the device (decode,
# small batches), its keys are split over several programs, each with at least MIN_SPLIT_KEYS keys,
# and the partial results are merged by their LSE.
MIN_SPLIT_KEYS = 512
MAX_SPLITS = 128

LN2 = math.log(2.0)
LOG2E = 1.0 / LN2

# Autotune spaces, keyed on head_dim, flags and (implicitly, by Triton) the tensor dtypes: the
# production spaces, compiled ahead of time for sm_80 and sm_90 by tests/kernels/test_compile.py.
# Exactly one config under the interpreter or pytest (see utils.SINGLE_CONFIG); the interpreter's
# tiles are small so that the tests cover ragged query and key tiles and several tiles per loop.
def _configs(*spaces: tuple[int, int, int, int]) -> list[triton.Config]:
    """triton.Configs from (BLOCK_M, BLOCK_N, num_warps, num_stages) tuples."""
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=warps, num_stages=stages)
        for m, n, warps, stages in spaces
    ]


FWD_CONFIGS = _configs((128, 64, 8, 3), (128, 32, 4, 3), (64, 64, 4, 3), (64, 32, 4, 2))
FWD_DECODE_CONFIGS = _configs((16, 64, 4, 3), (16, 128, 4, 3), (16, 64, 4, 2))
BWD_DKDV_CONFIGS = _configs((32, 128, 8, 2), (32, 64, 4, 2), (64, 64, 8, 2))
BWD_DQ_CONFIGS = _configs((128, 32, 8, 2), (64, 32, 4, 2), (64, 64, 4, 2))


def _fp32_space(configs: list[triton.Config]) -> list[triton.Config]:
    """The space of fp32 launches: the same configs with half the key tile.

    fp32 tiles take twice the bytes of fp16/bf16 ones; at head_dim 128, five of the configs above
    need 176-272 KB of shared memory in fp32, over the 163 KB an A100 block may use (found by the
    ahead-of-time compile test, tests/kernels/test_compile.py). Halving BLOCK_N brings every one
    under it.
    """
    return [
        triton.Config({**c.kwargs, "BLOCK_N": c.kwargs["BLOCK_N"] // 2}, num_warps=c.num_warps, num_stages=c.num_stages)
        for c in configs
    ]


def _tuners(kernel, production: list[triton.Config], single: list[triton.Config], key: list[str]) -> dict:
    """{launch is fp32: autotuner}: `production` for fp16/bf16, `_fp32_space(production)` for fp32."""
    return {
        False: utils.autotuned(kernel, production, single, key),
        True: utils.autotuned(kernel, _fp32_space(production), single, key),
    }


_PREPROCESS_BLOCK_M = 32
# Split boundaries fall on multiples of the largest key tile, so no tile straddles two splits.
_SPLIT_ALIGN = max(c.kwargs["BLOCK_N"] for c in FWD_CONFIGS + FWD_DECODE_CONFIGS)
# The split heuristic runs before autotuning picks a query tile; it assumes the largest one.
_MAX_BLOCK_M = max(c.kwargs["BLOCK_M"] for c in FWD_CONFIGS)


def _dot_precision(dtype: torch.dtype) -> str | None:
    # fp32 inputs get exact fp32 dots (no TF32 truncation); fp16/bf16 inputs keep Triton's default.
    return "ieee" if dtype == torch.float32 else None


# ----------------------------------------------------------------------------------------------
# Set-up shared by every kernel: program ids, row tiles, key visibility
# ----------------------------------------------------------------------------------------------


@triton.jit
def _batch_and_head(pid, HEADS):
    """(b, head) of a program id over B * HEADS, as int64: offsets into a long cache exceed 2**31."""
    return (pid // HEADS).to(tl.int64), (pid % HEADS).to(tl.int64)


@triton.jit
def _query_tile(Q, stride_qb, stride_qh, stride_qm, H, GROUP, C, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr):
    """The query tile of a program over (query tile, b * H): (b, h, kv head, row offsets, q rows)."""
    off_b, off_h = _batch_and_head(tl.program_id(1), H)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    q = _load_rows(Q + off_b * stride_qb + off_h * stride_qh, offs_m, stride_qm, C, HEAD_DIM)
    return off_b, off_h, off_h // GROUP, offs_m, q


@triton.jit
def _prefix_end(PrefixLen, off_b, P, HAS_LENGTHS: tl.constexpr):
    """Prefix rows of sequence b that exist: P, or prefix_lengths[b] clamped to [0, P].

    Read on the device: a decode step with per-sequence lengths needs no host sync.
    """
    p_end = P
    if HAS_LENGTHS:
        p_end = tl.minimum(tl.maximum(tl.load(PrefixLen + off_b).to(tl.int32), 0), P)
    return p_end


@triton.jit
def _load_rows(Base, offs, stride, n, HEAD_DIM: tl.constexpr):
    """[len(offs), HEAD_DIM] tile of rows `offs` of one (b, head) segment; rows >= n read as 0."""
    offs_d = tl.arange(0, HEAD_DIM)
    return tl.load(Base + offs[:, None] * stride + offs_d[None, :], mask=(offs < n)[:, None], other=0.0)


@triton.jit
def _store_rows(Base, offs, stride, n, x, HEAD_DIM: tl.constexpr):
    """Store tile `x` as rows `offs` (< n) of one (b, head) segment, in the destination's dtype."""
    offs_d = tl.arange(0, HEAD_DIM)
    tl.store(Base + offs[:, None] * stride + offs_d[None, :], x.to(Base.dtype.element_ty), mask=(offs < n)[:, None])


@triton.jit
def _keys_on(KeyMask, stride_mj, offs_n, n, HAS_MASK: tl.constexpr):
    """Which keys `offs_n` of a segment exist (< n) and are not switched off by the key mask."""
    on = offs_n < n
    if HAS_MASK:
        on = on & (tl.load(KeyMask + offs_n * stride_mj, mask=on, other=0) != 0)
    return on


@triton.jit
def _visible(KeyMask, stride_mj, offs_m, offs_n, n, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr):
    """Query i sees key j of a segment: the key exists and is on, and j <= i in the (causal) chunk.

    [BLOCK_M, BLOCK_N] when CAUSAL, else [1, BLOCK_N] (the same for every query: broadcast).
    """
    visible = _keys_on(KeyMask, stride_mj, offs_n, n, HAS_MASK)[None, :]
    if CAUSAL:
        visible = visible & (offs_m[:, None] >= offs_n[None, :])
    return visible


# ----------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------


@triton.jit
def _attn_fwd_inner(
    acc, l_i, m_i, q,
    K, V, KeyMask, stride_kn, stride_vn, stride_mj,
    lo, hi, offs_m, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Fold keys [lo, hi) of one key segment (prefix or chunk) into the online softmax state.

    K, V, KeyMask point at key 0 of the segment for this (b, kv head). Scores are in base 2.
    """
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_rows(K, offs_n, stride_kn, hi, HEAD_DIM)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N]
        visible = _visible(KeyMask, stride_mj, offs_m, offs_n, hi, CAUSAL, HAS_MASK)
        qk = tl.where(visible, qk, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(qk, 1))
        # A row that has seen no visible key yet keeps m = -inf; subtracting 0 instead keeps its
        # exp2 terms at exactly 0 rather than NaN (-inf - -inf).
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(qk - m_ref[:, None])
        alpha = tl.exp2(m_i - m_ref)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_rows(V, offs_n, stride_vn, hi, HEAD_DIM)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, KP, VP, KeyMask, PrefixLen, O, LSE,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_kpb, stride_kph, stride_kpn,
    stride_vpb, stride_vph, stride_vpn,
    stride_mb, stride_mj,
    stride_ob, stride_oh, stride_os, stride_om,
    stride_lb, stride_lh, stride_ls,
    H, C, P, GROUP, SPLIT_LEN, qk_scale,
    HEAD_DIM: tl.constexpr, HAS_MASK: tl.constexpr, HAS_LENGTHS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    off_b, off_h, off_hkv, offs_m, q = _query_tile(Q, stride_qb, stride_qh, stride_qm, H, GROUP, C, BLOCK_M, HEAD_DIM)
    start_m = tl.program_id(0) * BLOCK_M
    pid_s = tl.program_id(2)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    # This program's keys, as indices into [existing prefix rows | chunk] (all of them when
    # unsplit). Prefix rows at or past the sequence's length are never loaded; with lengths, each
    # sequence spreads its own p_end + C keys over the splits.
    p_end = _prefix_end(PrefixLen, off_b, P, HAS_LENGTHS)
    split_len = SPLIT_LEN
    if HAS_LENGTHS:
        split_len = tl.cdiv(tl.cdiv(p_end + C, tl.num_programs(2)), BLOCK_N) * BLOCK_N
    key_start = pid_s * split_len
    key_end = tl.minimum(key_start + split_len, p_end + C)
    mask_row = KeyMask + off_b * stride_mb

    acc, l_i, m_i = _attn_fwd_inner(
        acc, l_i, m_i, q,
        KP + off_b * stride_kpb + off_hkv * stride_kph,
        VP + off_b * stride_vpb + off_hkv * stride_vph,
        mask_row, stride_kpn, stride_vpn, stride_mj,
        tl.minimum(key_start, p_end), tl.minimum(key_end, p_end), offs_m, qk_scale,
        HEAD_DIM, BLOCK_N, False, HAS_MASK, DOT_PRECISION,
    )
    # Chunk key j is key p_end + j here (column P + j of the key mask); no query of this tile sees
    # chunk keys past its last row.
    acc, l_i, m_i = _attn_fwd_inner(
        acc, l_i, m_i, q,
        K + off_b * stride_kb + off_hkv * stride_kh,
        V + off_b * stride_vb + off_hkv * stride_vh,
        mask_row + P * stride_mj, stride_kn, stride_vn, stride_mj,
        tl.maximum(key_start - p_end, 0), tl.minimum(key_end - p_end, start_m + BLOCK_M), offs_m, qk_scale,
        HEAD_DIM, BLOCK_N, True, HAS_MASK, DOT_PRECISION,
    )

    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)
    _store_rows(
        O + off_b * stride_ob + off_h * stride_oh + pid_s * stride_os, offs_m, stride_om, C,
        acc / l_safe[:, None], HEAD_DIM,
    )
    tl.store(LSE + off_b * stride_lb + off_h * stride_lh + pid_s * stride_ls + offs_m, lse, mask=offs_m < C)


@triton.jit
def _attn_combine_kernel(
    OPart, LSEPart, O, LSE,
    stride_pb, stride_ph, stride_ps, stride_pm,
    stride_qb, stride_qh, stride_qs,
    stride_ob, stride_oh, stride_om,
    stride_lb, stride_lh,
    H, NUM_SPLITS,
    HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Merge the per-split (o, lse) of one query row: o = sum_s exp(lse_s - lse) o_s."""
    pid_m = tl.program_id(0)
    off_b, off_h = _batch_and_head(tl.program_id(1), H)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, HEAD_DIM)
    in_splits = offs_s < NUM_SPLITS

    lse_s = tl.load(
        LSEPart + off_b * stride_qb + off_h * stride_qh + offs_s * stride_qs + pid_m,
        mask=in_splits, other=float("-inf"),
    )
    lse_max = tl.max(lse_s, 0)
    # Splits without a visible key have lse -inf and weight 0; so does everything if none has one.
    lse_ref = tl.where(lse_max == float("-inf"), 0.0, lse_max)
    w = tl.exp(lse_s - lse_ref)
    total = tl.sum(w, 0)
    # The splits of one query row are rows of a [NUM_SPLITS, HEAD_DIM] segment.
    o_s = _load_rows(OPart + off_b * stride_pb + off_h * stride_ph + pid_m * stride_pm, offs_s, stride_ps,
                     NUM_SPLITS, HEAD_DIM)
    total_safe = tl.where(total == 0.0, 1.0, total)
    o = tl.sum(w[:, None] * o_s, 0) / total_safe
    lse = tl.where(total == 0.0, float("-inf"), lse_ref + tl.log(total_safe))
    tl.store(O + off_b * stride_ob + off_h * stride_oh + pid_m * stride_om + offs_d, o.to(O.dtype.element_ty))
    tl.store(LSE + off_b * stride_lb + off_h * stride_lh + pid_m, lse)


_attn_fwd = _tuners(
    _attn_fwd_kernel, FWD_CONFIGS, _configs((32, 32, 4, 1)), key=["HEAD_DIM", "HAS_MASK", "HAS_LENGTHS"]
)
_attn_fwd_decode = _tuners(
    _attn_fwd_kernel, FWD_DECODE_CONFIGS, _configs((16, 32, 4, 1)), key=["HEAD_DIM", "HAS_MASK", "HAS_LENGTHS"]
)


def _default_num_splits(batch_heads: int, C: int, num_keys: int, device: torch.device) -> int:
    """Flash-decoding heuristic: split the keys when the launch would leave the device idle.

    Returns 1 (no split) when the (query tile, b, h) programs already fill the device; otherwise
    enough splits to fill it, each with at least MIN_SPLIT_KEYS keys (so short prefixes never split).
    """
    query_tiles = 1 if C <= DECODE_MAX_C else triton.cdiv(C, _MAX_BLOCK_M)
    programs = query_tiles * batch_heads
    target = utils.num_programs_target(device)
    if programs >= target:
        return 1
    return max(1, min(triton.cdiv(target, programs), num_keys // MIN_SPLIT_KEYS, MAX_SPLITS))


def _bhn_strides(t: torch.Tensor) -> tuple[int, int, int]:
    """Batch, head and row strides of a [B, heads, rows, D] tensor whose last dim has stride 1."""
    return t.stride(0), t.stride(1), t.stride(2)


def _mask_arg(key_mask: torch.Tensor | None, fallback: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """(pointer, (batch stride, key stride)) of the key mask as bytes; any valid pointer without one."""
    if key_mask is None:
        return fallback, (0, 0)
    mask_u8 = key_mask.view(torch.uint8)
    return mask_u8, (mask_u8.stride(0), mask_u8.stride(1))


def chunk_attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    k_prefix: torch.Tensor | None, v_prefix: torch.Tensor | None,
    key_mask: torch.Tensor | None,
    scale: float,
    num_splits: int | None = None,
    prefix_lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernels. Not differentiable (see `chunk_attention(return_lse=True)`).

    Args:
        q: [B, H, C, D]; k, v: [B, Hkv, C, D]; k_prefix, v_prefix: [B, Hkv, P, D] or None;
            all with stride 1 in the last dim (other strides arbitrary: read in place).
        key_mask: [B, P + C] bool or None.
        scale: softmax scale.
        num_splits: key splits (flash-decoding). None: `_default_num_splits` over P + C keys. The
            count actually launched may be lower: splits are whole multiples of the largest key
            tile. With `prefix_lengths` each sequence divides its own keys among the splits.
        prefix_lengths: [B] int32/int64 on the device of q, or None: rows of the prefix that exist
            per sequence (read by the kernel, clamped to [0, P]); key blocks past them are skipped.

    Returns:
        o: [B, H, C, D] in the dtype of q, allocated as a [B, C, H, D] buffer seen through a
           transpose, so that `o.transpose(1, 2).reshape(B, C, H * D)` is free.
        lse: [B, H, C] fp32 natural-log log-sum-exp of the scaled scores; -inf for rows with no
           visible key (their o is 0).
    """
    B, H, C, D = q.shape
    Hkv = k.shape[1]
    P = 0 if k_prefix is None else k_prefix.shape[2]
    if P == 0:
        # The prefix loops are empty and these pointers are never dereferenced; an empty tensor's
        # pointer may be null, which Triton refuses to launch with.
        k_prefix, v_prefix = k, v
    o = utils.new_empty((B, C, H, D), q.dtype, q.device).transpose(1, 2)
    lse = utils.new_empty((B, H, C), torch.float32, q.device)
    if B * H * C == 0:
        return o, lse
    mask, mask_strides = _mask_arg(key_mask, q)
    # The kernels read lengths[b] at b: one-element-per-sequence memory, whatever view was passed (a cache passes
    # its one fill expanded over the batch, stride 0).
    lengths = q if prefix_lengths is None else prefix_lengths.contiguous()

    num_keys = P + C
    if num_splits is None:
        num_splits = _default_num_splits(B * H, C, num_keys, q.device)
    split_len = triton.cdiv(triton.cdiv(num_keys, max(num_splits, 1)), _SPLIT_ALIGN) * _SPLIT_ALIGN
    num_splits = triton.cdiv(num_keys, split_len)

    if num_splits == 1:
        o_dst, lse_dst = o, lse
        o_split_stride, lse_split_stride = 0, 0
    else:
        o_dst = utils.new_empty((B, H, num_splits, C, D), torch.float32, q.device)
        lse_dst = utils.new_empty((B, H, num_splits, C), torch.float32, q.device)
        o_split_stride, lse_split_stride = o_dst.stride(2), lse_dst.stride(2)

    utils.launch(
        (_attn_fwd_decode if C <= DECODE_MAX_C else _attn_fwd)[q.dtype == torch.float32],
        lambda meta: (triton.cdiv(C, meta["BLOCK_M"]), B * H, num_splits),
        (
            q, k, v, k_prefix, v_prefix, mask, lengths, o_dst, lse_dst,
            *_bhn_strides(q), *_bhn_strides(k), *_bhn_strides(v),
            *_bhn_strides(k_prefix), *_bhn_strides(v_prefix),
            *mask_strides,
            o_dst.stride(0), o_dst.stride(1), o_split_stride, o_dst.stride(-2),
            lse_dst.stride(0), lse_dst.stride(1), lse_split_stride,
            H, C, P, H // Hkv, split_len, scale * LOG2E,
        ),
        dict(
            HEAD_DIM=D, HAS_MASK=key_mask is not None, HAS_LENGTHS=prefix_lengths is not None,
            DOT_PRECISION=_dot_precision(q.dtype),
        ),
    )
    if num_splits > 1:
        utils.launch(
            _attn_combine_kernel,
            (C, B * H),
            (
                o_dst, lse_dst, o, lse,
                o_dst.stride(0), o_dst.stride(1), o_dst.stride(2), o_dst.stride(3),
                lse_dst.stride(0), lse_dst.stride(1), lse_dst.stride(2),
                o.stride(0), o.stride(1), o.stride(2),
                lse.stride(0), lse.stride(1),
                H, num_splits,
            ),
            dict(HEAD_DIM=D, BLOCK_S=triton.next_power_of_2(num_splits)),
        )
    return o, lse


# ----------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------


@triton.jit
def _attn_bwd_preprocess_kernel(
    O, DO, DLSE, Delta,
    stride_ob, stride_oh, stride_om,
    stride_dob, stride_doh, stride_dom,
    H, C,
    HEAD_DIM: tl.constexpr, HAS_DLSE: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """delta = rowsum(do * o) - dlse, fp32 [B, H, C] contiguous.

    A gradient on the LSE output adds dlse_i * p_ij to each score gradient, the same as lowering
    delta_i by dlse_i in ds = p * (dp - delta).
    """
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    pid_bh = tl.program_id(1)
    off_b, off_h = _batch_and_head(pid_bh, H)
    o = _load_rows(O + off_b * stride_ob + off_h * stride_oh, offs_m, stride_om, C, HEAD_DIM).to(tl.float32)
    do = _load_rows(DO + off_b * stride_dob + off_h * stride_doh, offs_m, stride_dom, C, HEAD_DIM).to(tl.float32)
    delta = tl.sum(o * do, 1)
    row = pid_bh.to(tl.int64) * C + offs_m
    in_rows = offs_m < C
    if HAS_DLSE:
        delta -= tl.load(DLSE + row, mask=in_rows, other=0.0)
    tl.store(Delta + row, delta, mask=in_rows)


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, DO, LSE, Delta, K, V, DK, DV, KeyMask, PrefixLen,
    stride_qb, stride_qh, stride_qm,
    stride_dob, stride_doh, stride_dom,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn,
    stride_mb, stride_mj,
    H, C, N_KEYS, MASK_OFFSET, GROUP, scale, qk_scale,
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, HAS_LENGTHS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dk, dv for one tile of keys of one segment: the prefix (CAUSAL=False, MASK_OFFSET=0, lengths
    apply) or the chunk (CAUSAL=True, MASK_OFFSET=P). Works in the transposed frame: rows are keys.
    A prefix tile at or past its sequence's length loads no query and writes zeros."""
    pid_n = tl.program_id(0)
    off_b, off_hkv = _batch_and_head(tl.program_id(1), H // GROUP)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Rows at or past the sequence's prefix length are neither read nor used (their gradient is 0).
    n_on = _prefix_end(PrefixLen, off_b, N_KEYS, HAS_LENGTHS)
    k = _load_rows(K + off_b * stride_kb + off_hkv * stride_kh, offs_n, stride_kn, n_on, HEAD_DIM)
    v = _load_rows(V + off_b * stride_vb + off_hkv * stride_vh, offs_n, stride_vn, n_on, HEAD_DIM)
    key_on = _keys_on(KeyMask + off_b * stride_mb + MASK_OFFSET * stride_mj, stride_mj, offs_n, n_on, HAS_MASK)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)

    # Chunk key j is seen by queries i >= j only: start at the query tile holding this key tile.
    if CAUSAL:
        lo = (pid_n * BLOCK_N // BLOCK_M) * BLOCK_M
    else:
        lo = 0
    hi = tl.where(pid_n * BLOCK_N < n_on, C, lo)
    for g in range(GROUP):
        off_h = off_hkv * GROUP + g
        q_base = Q + off_b * stride_qb + off_h * stride_qh
        do_base = DO + off_b * stride_dob + off_h * stride_doh
        row_base = (off_b * H + off_h) * C
        for start_m in range(lo, hi, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            in_rows = offs_m < C
            q = _load_rows(q_base, offs_m, stride_qm, C, HEAD_DIM)
            do = _load_rows(do_base, offs_m, stride_dom, C, HEAD_DIM)
            # A row with no visible key has lse = -inf and exp2 gives inf for it, but every entry
            # of such a row is masked out below, and tl.where discards them.
            lse = tl.load(LSE + row_base + offs_m, mask=in_rows, other=0.0)
            delta = tl.load(Delta + row_base + offs_m, mask=in_rows, other=0.0)

            qk_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)  # [BLOCK_N, BLOCK_M]
            p_t = tl.exp2(qk_t * qk_scale - lse[None, :] * 1.4426950408889634)
            visible = key_on[:, None] & in_rows[None, :]
            if CAUSAL:
                visible = visible & (offs_m[None, :] >= offs_n[:, None])
            p_t = tl.where(visible, p_t, 0.0)
            dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION)
            dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
            ds_t = p_t * (dp_t - delta[None, :])
            dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PRECISION)

    _store_rows(DK + off_b * stride_dkb + off_hkv * stride_dkh, offs_n, stride_dkn, N_KEYS, dk * scale, HEAD_DIM)
    _store_rows(DV + off_b * stride_dvb + off_hkv * stride_dvh, offs_n, stride_dvn, N_KEYS, dv, HEAD_DIM)


@triton.jit
def _attn_bwd_dq_inner(
    dq, q, do, lse2, delta,
    K, V, KeyMask, stride_kn, stride_vn, stride_mj,
    hi, offs_m, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Accumulate ds @ k over keys [0, hi) of one key segment; lse2 is the LSE in base 2."""
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_rows(K, offs_n, stride_kn, hi, HEAD_DIM)
        v = _load_rows(V, offs_n, stride_vn, hi, HEAD_DIM)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        p = tl.exp2(qk * qk_scale - lse2[:, None])
        visible = _visible(KeyMask, stride_mj, offs_m, offs_n, hi, CAUSAL, HAS_MASK)
        p = tl.where(visible, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
    return dq


@triton.jit
def _attn_bwd_dq_kernel(
    Q, DO, LSE, Delta, K, V, KP, VP, KeyMask, PrefixLen, DQ,
    stride_qb, stride_qh, stride_qm,
    stride_dob, stride_doh, stride_dom,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_kpb, stride_kph, stride_kpn,
    stride_vpb, stride_vph, stride_vpn,
    stride_mb, stride_mj,
    stride_dqb, stride_dqh, stride_dqm,
    H, C, P, GROUP, scale, qk_scale,
    HEAD_DIM: tl.constexpr, HAS_MASK: tl.constexpr, HAS_LENGTHS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    off_b, off_h, off_hkv, offs_m, q = _query_tile(Q, stride_qb, stride_qh, stride_qm, H, GROUP, C, BLOCK_M, HEAD_DIM)
    start_m = tl.program_id(0) * BLOCK_M
    in_rows = offs_m < C
    do = _load_rows(DO + off_b * stride_dob + off_h * stride_doh, offs_m, stride_dom, C, HEAD_DIM)
    row = tl.program_id(1).to(tl.int64) * C + offs_m
    # Base-2 LSE. Rows with no visible key (lse = -inf) are fully masked in the inner loop.
    lse2 = tl.load(LSE + row, mask=in_rows, other=0.0) * 1.4426950408889634
    delta = tl.load(Delta + row, mask=in_rows, other=0.0)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    mask_row = KeyMask + off_b * stride_mb
    dq = _attn_bwd_dq_inner(
        dq, q, do, lse2, delta,
        KP + off_b * stride_kpb + off_hkv * stride_kph,
        VP + off_b * stride_vpb + off_hkv * stride_vph,
        mask_row, stride_kpn, stride_vpn, stride_mj,
        _prefix_end(PrefixLen, off_b, P, HAS_LENGTHS), offs_m, qk_scale,
        HEAD_DIM, BLOCK_N, False, HAS_MASK, DOT_PRECISION,
    )
    dq = _attn_bwd_dq_inner(
        dq, q, do, lse2, delta,
        K + off_b * stride_kb + off_hkv * stride_kh,
        V + off_b * stride_vb + off_hkv * stride_vh,
        mask_row + P * stride_mj, stride_kn, stride_vn, stride_mj,
        tl.minimum(C, start_m + BLOCK_M), offs_m, qk_scale,
        HEAD_DIM, BLOCK_N, True, HAS_MASK, DOT_PRECISION,
    )
    _store_rows(DQ + off_b * stride_dqb + off_h * stride_dqh, offs_m, stride_dqm, C, dq * scale, HEAD_DIM)


_attn_bwd_dkdv = _tuners(
    _attn_bwd_dkdv_kernel, BWD_DKDV_CONFIGS, _configs((16, 32, 4, 1)),
    key=["HEAD_DIM", "CAUSAL", "HAS_MASK", "HAS_LENGTHS"],
)
_attn_bwd_dq = _tuners(
    _attn_bwd_dq_kernel, BWD_DQ_CONFIGS, _configs((32, 16, 4, 1)), key=["HEAD_DIM", "HAS_MASK", "HAS_LENGTHS"]
)


def chunk_attention_bwd(
    do: torch.Tensor,
    dlse: torch.Tensor | None,
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    k_prefix: torch.Tensor | None, v_prefix: torch.Tensor | None,
    key_mask: torch.Tensor | None,
    o: torch.Tensor, lse: torch.Tensor,
    scale: float,
    prefix_lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ...]:
    """Launch the backward kernels.

    Args:
        do: [B, H, C, D] gradient of o (stride 1 in the last dim).
        dlse: [B, H, C] fp32 gradient of lse, or None.
        q, k, v, k_prefix, v_prefix, key_mask, scale, prefix_lengths: the forward inputs.
        o, lse: the forward outputs.

    Returns:
        (dq, dk, dv, dk_prefix, dv_prefix), contiguous, in the dtypes of their inputs;
        dk_prefix, dv_prefix are [B, Hkv, P, D] (None when k_prefix is None), zero in the rows at
        or past each sequence's prefix length.
    """
    B, H, C, D = q.shape
    Hkv = k.shape[1]
    group = H // Hkv
    has_prefix = k_prefix is not None
    P = k_prefix.shape[2] if has_prefix else 0
    dq = utils.new_empty(q.shape, q.dtype, q.device)
    dk = utils.new_empty(k.shape, k.dtype, k.device)
    dv = utils.new_empty(v.shape, v.dtype, v.device)
    dkp = utils.new_empty(k_prefix.shape, k_prefix.dtype, q.device) if has_prefix else None
    dvp = utils.new_empty(v_prefix.shape, v_prefix.dtype, q.device) if has_prefix else None
    if P == 0:
        # As in the forward: never launch with an empty (possibly null) prefix pointer.
        k_prefix, v_prefix = k, v
    if B * H * C == 0:
        for t in (dq, dk, dv, dkp, dvp):
            if t is not None:
                t.zero_()
        return dq, dk, dv, dkp, dvp

    mask, mask_strides = _mask_arg(key_mask, q)
    lengths = q if prefix_lengths is None else prefix_lengths.contiguous()  # read at b, as in the forward
    has_lengths = prefix_lengths is not None
    precision = _dot_precision(q.dtype)
    qk_scale = scale * LOG2E

    delta = utils.new_empty((B, H, C), torch.float32, q.device)
    has_dlse = dlse is not None
    utils.launch(
        _attn_bwd_preprocess_kernel,
        (triton.cdiv(C, _PREPROCESS_BLOCK_M), B * H),
        (o, do, dlse.contiguous() if has_dlse else delta, delta, *_bhn_strides(o), *_bhn_strides(do), H, C),
        dict(HEAD_DIM=D, HAS_DLSE=has_dlse, BLOCK_M=_PREPROCESS_BLOCK_M),
    )

    segments = [(k, v, dk, dv, C, P, True, False)]
    if P > 0:
        segments.append((k_prefix, v_prefix, dkp, dvp, P, 0, False, has_lengths))
    for seg_k, seg_v, seg_dk, seg_dv, n_keys, mask_offset, causal, seg_lengths in segments:
        utils.launch(
            _attn_bwd_dkdv[q.dtype == torch.float32],
            lambda meta, n=n_keys: (triton.cdiv(n, meta["BLOCK_N"]), B * Hkv),
            (
                q, do, lse, delta, seg_k, seg_v, seg_dk, seg_dv, mask, lengths,
                *_bhn_strides(q), *_bhn_strides(do),
                *_bhn_strides(seg_k), *_bhn_strides(seg_v),
                *_bhn_strides(seg_dk), *_bhn_strides(seg_dv),
                *mask_strides,
                H, C, n_keys, mask_offset, group, scale, qk_scale,
            ),
            dict(
                HEAD_DIM=D, CAUSAL=causal, HAS_MASK=key_mask is not None, HAS_LENGTHS=seg_lengths,
                DOT_PRECISION=precision,
            ),
        )

    utils.launch(
        _attn_bwd_dq[q.dtype == torch.float32],
        lambda meta: (triton.cdiv(C, meta["BLOCK_M"]), B * H),
        (
            q, do, lse, delta, k, v, k_prefix, v_prefix, mask, lengths, dq,
            *_bhn_strides(q), *_bhn_strides(do),
            *_bhn_strides(k), *_bhn_strides(v),
            *_bhn_strides(k_prefix), *_bhn_strides(v_prefix),
            *mask_strides,
            *_bhn_strides(dq),
            H, C, P, group, scale, qk_scale,
        ),
        dict(HEAD_DIM=D, HAS_MASK=key_mask is not None, HAS_LENGTHS=has_lengths, DOT_PRECISION=precision),
    )
    return dq, dk, dv, dkp, dvp


# ----------------------------------------------------------------------------------------------
# Autograd and public entry point
# ----------------------------------------------------------------------------------------------


class ChunkAttentionFunction(torch.autograd.Function):
    """Autograd glue: saves inputs, o and lse; o and lse are both differentiable outputs."""

    @staticmethod
    def forward(ctx, q, k, v, k_prefix, v_prefix, key_mask, prefix_lengths, scale):
        o, lse = chunk_attention_fwd(q, k, v, k_prefix, v_prefix, key_mask, scale, prefix_lengths=prefix_lengths)
        ctx.save_for_backward(q, k, v, k_prefix, v_prefix, key_mask, prefix_lengths, o, lse)
        ctx.scale = scale
        # Unused outputs (usually lse) arrive as None instead of zero tensors.
        ctx.set_materialize_grads(False)
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        q, k, v, k_prefix, v_prefix, key_mask, prefix_lengths, o, lse = ctx.saved_tensors
        do = torch.zeros_like(o) if do is None else utils.last_dim_contiguous(do)
        dq, dk, dv, dkp, dvp = chunk_attention_bwd(
            do, dlse, q, k, v, k_prefix, v_prefix, key_mask, o, lse, ctx.scale, prefix_lengths
        )
        return dq, dk, dv, dkp, dvp, None, None, None


@torch.compiler.disable
def _differentiable(*args) -> tuple[torch.Tensor, torch.Tensor]:
    """`ChunkAttentionFunction.apply`, outside any compiled graph (its backward launches kernels too)."""
    return ChunkAttentionFunction.apply(*args)


def _fake_fwd(q, k, v, k_prefix, v_prefix, key_mask, prefix_lengths, scale):
    B, H, C, D = q.shape
    return q.new_empty((B, C, H, D)).transpose(1, 2), q.new_empty((B, H, C), dtype=torch.float32)


@utils.graph_op("chunk_attention_fwd", _fake_fwd)
def _graph_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    k_prefix: torch.Tensor | None, v_prefix: torch.Tensor | None,
    key_mask: torch.Tensor | None, prefix_lengths: torch.Tensor | None,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward launch as an operator a compiled graph keeps (inference; see `utils.graph_op`)."""
    return chunk_attention_fwd(q, k, v, k_prefix, v_prefix, key_mask, scale, prefix_lengths=prefix_lengths)


def _validate(q, k, v, k_prefix, v_prefix, key_mask, prefix_lengths) -> int:
    """Check shapes, dtypes and devices; return P (0 without a prefix)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        utils.check_float(name, t)
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D [B, heads, C, D], got shape {tuple(t.shape)}")
    B, H, C, D = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[0] != B or k.shape[2] != C or k.shape[3] != D:
        raise ValueError(
            f"k/v must be [B, Hkv, C, D] = [{B}, Hkv, {C}, {D}] to match q {tuple(q.shape)}, got {tuple(k.shape)}"
        )
    Hkv = k.shape[1]
    if Hkv == 0 or H % Hkv != 0:
        raise ValueError(f"the number of query heads ({H}) must be a multiple of the kv heads ({Hkv})")
    if (k_prefix is None) != (v_prefix is None):
        raise ValueError("k_prefix and v_prefix must be given together (or both None)")
    P = 0
    if k_prefix is not None:
        for name, t in (("k_prefix", k_prefix), ("v_prefix", v_prefix)):
            utils.check_float(name, t)
            if t.dim() != 4 or t.shape[0] != B or t.shape[1] != Hkv or t.shape[3] != D:
                raise ValueError(f"{name} must be [B, Hkv, P, D] = [{B}, {Hkv}, P, {D}], got {tuple(t.shape)}")
        if k_prefix.shape != v_prefix.shape:
            raise ValueError(
                "k_prefix and v_prefix must have the same shape, "
                f"got {tuple(k_prefix.shape)} and {tuple(v_prefix.shape)}"
            )
        P = k_prefix.shape[2]
    for name, t in (("k", k), ("v", v), ("k_prefix", k_prefix), ("v_prefix", v_prefix)):
        if t is not None and t.dtype != q.dtype:
            raise TypeError(f"{name} must have the dtype of q ({q.dtype}), got {t.dtype}")
    if key_mask is not None:
        if key_mask.dtype != torch.bool:
            raise TypeError(f"key_mask must be a bool tensor, got {key_mask.dtype}")
        if key_mask.shape != (B, P + C):
            raise ValueError(f"key_mask must be [B, P + C] = [{B}, {P + C}], got {list(key_mask.shape)}")
    if prefix_lengths is not None:
        # Shape, dtype and device only: the values stay on the device (no host sync).
        if k_prefix is None:
            raise ValueError("prefix_lengths needs k_prefix and v_prefix (the rows it counts)")
        if not isinstance(prefix_lengths, torch.Tensor) or prefix_lengths.dtype not in (torch.int32, torch.int64):
            got = getattr(prefix_lengths, "dtype", type(prefix_lengths).__name__)
            raise TypeError(f"prefix_lengths must be an int32 or int64 tensor, got {got}")
        if prefix_lengths.shape != (B,):
            raise ValueError(f"prefix_lengths must be [B] = [{B}], got {list(prefix_lengths.shape)}")
    utils.check_same_device(
        q=q, k=k, v=v, k_prefix=k_prefix, v_prefix=v_prefix, key_mask=key_mask, prefix_lengths=prefix_lengths
    )
    return P


def chunk_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    k_prefix: torch.Tensor | None = None, v_prefix: torch.Tensor | None = None,
    key_mask: torch.Tensor | None = None,
    scale: float | None = None,
    return_lse: bool = False,
    *,
    prefix_lengths: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention of a chunk's C queries over [prefix rows | chunk rows], bottom-right causal.

    Args:
        q: [B, H, C, D] queries of the chunk.
        k, v: [B, Hkv, C, D] keys/values of the chunk's own rows; Hkv divides H (GQA: query
            head h reads kv head h // (H // Hkv)).
        k_prefix, v_prefix: [B, Hkv, P, D] final rows of earlier chunks, or both None (P = 0).
            Typically slices [:, :, :P] of a preallocated cache: every input is read in place
            through its strides (only a last dim with stride != 1 forces a copy).
        key_mask: [B, P + C] bool, True where a key may be attended (prefix keys, then chunk
            keys), e.g. False on left padding; None attends to everything.
        scale: softmax scale, default D ** -0.5.
        return_lse: also return the log-sum-exp, e.g. to merge with another partial attention.
        prefix_lengths: [B] int32/int64 tensor on the device of q, or None. Prefix row j of
            sequence b is visible only if j < prefix_lengths[b] (and key_mask allows it; key_mask
            stays [B, P + C] with P the prefix tensor's width). The prefix may then be a whole
            preallocated buffer [B, Hkv, S, D]: the kernels read the lengths on the device (no
            host sync) and skip every key block at or past them. Values outside [0, P] are
            clamped; rows past a length get zero gradient.

    Returns:
        o: [B, H, C, D] in the dtype of q (a transposed view of a [B, C, H, D] buffer on the
           Triton path). Query i sees all visible prefix keys and chunk keys j <= i; a query with
           no visible key gets zeros (and zero gradients).
        With return_lse: (o, lse), lse [B, H, C] fp32 natural-log LSE of the scaled scores
           (-inf for rows with no visible key); both are differentiable.

    Backends: Triton for head_dim 64/128 on CUDA tensors (and CPU tensors under
    TRITON_INTERPRET=1), in fp32 (exact fp32 dots), fp16 or bf16; every other case (CPU without
    the interpreter, other head dims) uses the PyTorch reference `naive_chunk_attention`.
    Launches too small to fill the device (decode, C = 1) with a long prefix split the keys over
    programs and merge the partial results by their LSE (flash-decoding).
    Under torch.compile an inference call (no input needs a gradient) is the operator
    `torch.ops.melt.chunk_attention_fwd`, which the graph keeps (fullgraph) and CUDA graphs
    capture; a call that needs gradients runs outside the graph (a graph break).
    """
    _validate(q, k, v, k_prefix, v_prefix, key_mask, prefix_lengths)
    D = q.shape[-1]
    if scale is None:
        scale = D**-0.5
    if not (utils.use_triton(q) and D in SUPPORTED_HEAD_DIMS):
        return naive_chunk_attention(
            q, k, v, k_prefix, v_prefix, key_mask, scale, return_lse, prefix_lengths=prefix_lengths
        )
    if k_prefix is not None:
        k_prefix, v_prefix = utils.last_dim_contiguous(k_prefix), utils.last_dim_contiguous(v_prefix)
    args = (
        utils.last_dim_contiguous(q), utils.last_dim_contiguous(k), utils.last_dim_contiguous(v),
        k_prefix, v_prefix, key_mask, prefix_lengths, float(scale),
    )
    if utils.traced_inference(q, k, v, k_prefix, v_prefix):
        o, lse = _graph_fwd(*args)
    else:
        o, lse = _differentiable(*args)
    return (o, lse) if return_lse else o
