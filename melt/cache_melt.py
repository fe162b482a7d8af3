"""The key/value cache of MELT and of its exact LoopLM (Ouro) mode.

Each physical layer keeps a few *row slots*, each a buffer `[B, kv_heads, capacity, head_dim]`:

- `shared` (MELT): one slot. A token's row in it is written once, when all its loops are done (its
  final row); queries of later chunks read it. (The one-token step on a preallocated cache may instead write
  the token's row of each loop into its column as the loop makes it, `static_place_rows`: the column is the
  token's own, and the last loop leaves the final row there.)
- `per_loop` (Ouro): one slot per loop; loop t's queries read slot t. N*T rows per token.
- `shared` with the phase-1 blend (`kv_blend_alpha` < 1): T loop slots and the shared slot. Loop slot t
  holds the blended row `alpha * shared + (1 - alpha) * loop_t`, written once per token like the shared
  row, which is all that loop t's queries read.

The cache owns its policy: which slot loop t reads (`prefix_rows`), when a row is final (`commit_loop_rows`,
`commit_round`), the phase-1 blend (`begin_call`), and the token count (`end_call`). The model asks for prefix
rows and hands over rows to commit; nothing outside this file touches slots, buffers or lengths.

Two ways to hold rows:
- Preallocated (`MeltCache(..., max_cache_len=N)`, `model.new_cache(max_cache_len=N)`, and what `generate`
  builds from the prompt length and `max_new_tokens`): exactly N columns, allocated on the first write, never
  grown or copied. The column count is also kept as a device tensor, so a one-token decode step
  (`static_prefix_rows` / `static_place_rows` / `static_write_*` / `static_advance`) has fixed shapes and no
  host sync: it reads the whole buffer with a visibility mask and writes by `index_copy_`, which
  `torch.compile(fullgraph=True)` and CUDA graphs capture (`is_compileable`).
- Dynamic (no `max_cache_len`): allocated at the first call's length, then grown in steps of `GROW_COLUMNS`
  columns. Growing copies the buffer once (old and new exist together for that moment); at decode that is one
  copy per 256 tokens, against T full reads of the cache per token by attention. Preallocate to avoid it.
`nbytes()` counts the rows held; `capacity_nbytes()` what is allocated.

Every column of a slot is written once per forward, and a prefix read only covers written columns, so rows
are always written in place, also when they carry autograd history (training through the cache):

- Values go into the buffer, which never requires grad, through an alias with its own version counter
  (`buffer.data`), so the prefix views that earlier attention calls saved for backward stay valid.
- The written tensors are remembered (`_Written`). A prefix read in grad mode goes through `_RoutedRows`,
  whose output *is* the buffer view (no copy) and whose backward hands each remembered tensor the gradient
  of its own columns.

So training keeps ONE copy of each row per slot: O(L) per layer, whatever the number of chunks. (Writing
out of place instead, with `slice_scatter`, is correct too, but every chunk then leaves a full-length
buffer version alive for backward: O(L^2 / C) rows per layer.) `crop` and `reset` of rows that carry
history move the buffer to new storage before anything can be rewritten, so a graph that is still alive
keeps the values it read. Padded batch columns are stored like the others (as Hugging Face caches do) and
masked by the model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache

from .configuration_melt import MeltConfig, validate_num_loops


@dataclass(frozen=True)
class _Written:
    """Rows written into a slot with autograd history: where they went, to route gradients back to them.

    `key` / `value`: `[B, kv_heads, W, head_dim]` as written. Without `index` they fill columns
    `start .. start + W`; with `index = (batch, slot_pos, column)` only the picked rows were stored.
    """

    key: torch.Tensor
    value: torch.Tensor
    start: int
    index: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None


def _gradient_of(written: _Written, rows: torch.Tensor, grad: torch.Tensor | None) -> torch.Tensor | None:
    """The part of `grad` (`[B, kv_heads, P, head_dim]`, the gradient of a prefix read) that belongs to `rows`."""
    if grad is None or not rows.requires_grad:
        return None
    columns = grad.shape[2]
    out = torch.zeros_like(rows)
    if written.index is None:
        end = min(written.start + rows.shape[2], columns)
        if end > written.start:
            out[:, :, : end - written.start] = grad[:, :, written.start : end].to(rows.dtype)
        return out
    batch, slot_pos, column = written.index
    read = column < columns
    out.transpose(1, 2)[batch[read], slot_pos[read]] = grad.transpose(1, 2)[batch[read], column[read]].to(rows.dtype)
    return out


def _truncated(written: _Written, columns: int) -> _Written | None:
    """`written` restricted to the columns below `columns`; None when nothing is left."""
    if written.index is None:
        width = min(written.key.shape[2], columns - written.start)
        if width <= 0:
            return None
        return _Written(written.key[:, :, :width], written.value[:, :, :width], written.start, None)
    keep = written.index[2] < columns
    if not bool(keep.any()):
        return None
    return _Written(written.key, written.value, written.start, tuple(t[keep] for t in written.index))


class _RoutedRows(torch.autograd.Function):
    """A prefix read: the stored rows (a view of the buffer, no copy) with gradients routed to the writers."""

    @staticmethod
    def forward(ctx, key_rows, value_rows, written, *tensors):
        ctx.written = written
        return key_rows.view_as(key_rows), value_rows.view_as(value_rows)

    @staticmethod
    def backward(ctx, grad_key, grad_value):
        grads = [_gradient_of(w, w.key, grad_key) for w in ctx.written]
        grads += [_gradient_of(w, w.value, grad_value) for w in ctx.written]
        return None, None, None, *grads


GROW_COLUMNS = 256  # dynamic caches grow by whole steps of this many columns


class MeltCacheLayer:
    """Row slots of one physical layer. `keys[s]` / `values[s]`: `[B, kv_heads, capacity, head_dim]`.

    A container: which slot holds what, and how many columns are written, is `MeltCache`'s business.
    """

    is_compileable = False
    is_croppable = True
    is_sliding = False

    def __init__(self, num_slots: int):
        self.num_slots = num_slots
        self.keys: list[torch.Tensor] | None = None
        self.values: list[torch.Tensor] | None = None
        self.written: list[list[_Written]] = [[] for _ in range(num_slots)]  # rows with autograd history

    @property
    def is_initialized(self) -> bool:
        return self.keys is not None

    @property
    def capacity(self) -> int:
        return 0 if self.keys is None else self.keys[0].shape[2]

    @property
    def batch_size(self) -> int:
        return -1 if self.keys is None else self.keys[0].shape[0]

    def allocate(self, columns: int, like: torch.Tensor) -> None:
        """Buffers of `columns` columns; `like` ([B, kv_heads, *, head_dim]) gives batch, dtype, device."""
        # Zeros, not empty: masked rows are multiplied by zero attention weights, and 0 * NaN is NaN.
        shape = (like.shape[0], like.shape[1], columns, like.shape[3])
        self.keys = [like.new_zeros(shape) for _ in range(self.num_slots)]
        self.values = [like.new_zeros(shape) for _ in range(self.num_slots)]

    def grow(self, columns: int) -> None:
        self.keys = [_grow(buffer, columns) for buffer in self.keys]
        self.values = [_grow(buffer, columns) for buffer in self.values]

    def rows(self, slot: int, columns: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views `[B, kv_heads, columns, head_dim]` of the first `columns` rows of `slot`: read in place.

        In grad mode, rows written with autograd history pass their gradients back to where they came from.
        """
        key, value = self.keys[slot][:, :, :columns], self.values[slot][:, :, :columns]
        written = [w for w in self.written[slot] if w.index is not None or w.start < columns]
        if written and torch.is_grad_enabled():
            key, value = _RoutedRows.apply(key, value, tuple(written), *(w.key for w in written),
                                           *(w.value for w in written))
        return key, value

    def write(self, slot: int, key: torch.Tensor, value: torch.Tensor, start: int, index=None) -> None:
        """Store rows `[B, kv_heads, W, head_dim]` of `slot`.

        Without `index` the rows go to columns `start .. start + W`. With `index = (batch, slot_pos, column)`
        (three 1-D tensors) only row `slot_pos` of sequence `batch` is stored, at column `column`: the
        scattered form used when sequences of a padded batch have their chunk boundaries at different columns.
        """
        tracked = torch.is_grad_enabled() and (key.requires_grad or value.requires_grad)
        for buffers, rows in ((self.keys, key), (self.values, value)):
            # `.data`: a write with autograd history must not bump the version counter of the buffer views that
            # earlier reads saved for backward (their columns are not touched; see the module docstring).
            target = buffers[slot].data if tracked else buffers[slot]
            with torch.no_grad():
                if index is None:
                    target[:, :, start : start + rows.shape[2]].copy_(rows)
                else:
                    batch, slot_pos, column = index
                    picked = rows.transpose(1, 2)[batch, slot_pos].to(target.dtype)
                    target.transpose(1, 2).index_put_((batch, column), picked)
        if tracked:
            self.written[slot].append(_Written(key, value, start, index))

    def row_bytes(self) -> int:
        """Bytes of one column, all slots, keys and values."""
        if self.keys is None:
            return 0
        return sum(b[:, :, :1].numel() * b.element_size() for b in self.keys + self.values)

    def forget_history(self, columns: int) -> None:
        """After `crop` / `reset`: keep the history of the columns that remain, on new buffer storage.

        The dropped columns will be written again, while a graph that read them may still be waiting for its
        backward: moving the buffers to new storage keeps the values that graph saw.
        """
        if not any(self.written):
            return
        self.keys = [buffer.clone() for buffer in self.keys]
        self.values = [buffer.clone() for buffer in self.values]
        self.written = [[kept for w in slot if (kept := _truncated(w, columns)) is not None] for slot in self.written]

    def map_batch(self, fn, columns: int) -> None:
        if self.keys is None:
            return
        history = [bool(slot) and torch.is_grad_enabled() for slot in self.written]
        keys, values, written = [], [], []
        for slot in range(self.num_slots):
            # With history, map the routed read: the mapped rows stay differentiable functions of the writers.
            key, value = self.rows(slot, self.capacity) if history[slot] else (self.keys[slot], self.values[slot])
            key, value = fn(key), fn(value)
            keys.append(key.detach())
            values.append(value.detach())
            written.append([_Written(key[:, :, :columns], value[:, :, :columns], 0, None)] if history[slot] else [])
        self.keys, self.values, self.written = keys, values, written


def _grow(buffer: torch.Tensor, capacity: int) -> torch.Tensor:
    extra = buffer.new_zeros(buffer.shape[0], buffer.shape[1], capacity - buffer.shape[2], buffer.shape[3])
    return torch.cat([buffer, extra], dim=2)


class MeltCache(Cache):
    """Cache of a `MeltForCausalLM`: created by the model's forward when `use_cache=True` and none is given, by
    `generate`, or by `model.new_cache(...)`.

    Args:
        config: the model's config (layers, loops, cache mode).
        num_loops: loops the cache serves; only `per_loop` (and the phase-1 blend) keep rows per loop, so
            only there must every call use this same number. Defaults to `config.num_loops`.
        cache_mode: "shared" or "per_loop"; defaults to `config.cache_mode`.
        keep_loop_rows: in shared mode, also keep per-loop rows (needed by the phase-1 blend, alpha < 1).
        max_cache_len: preallocate exactly this many columns (tokens, left padding included) and never grow;
            None grows as needed (see the module docstring).
    """

    def __init__(
        self,
        config: MeltConfig,
        num_loops: int | None = None,
        cache_mode: str | None = None,
        keep_loop_rows: bool = False,
        max_cache_len: int | None = None,
    ):
        self.num_loops = config.num_loops if num_loops is None else num_loops
        validate_num_loops(self.num_loops, "MeltCache num_loops")
        self.cache_mode = config.cache_mode if cache_mode is None else cache_mode
        if self.cache_mode not in ("shared", "per_loop"):
            raise ValueError(f"MeltCache cache_mode must be 'shared' or 'per_loop', got {self.cache_mode!r}")
        if keep_loop_rows and self.cache_mode != "shared":
            raise ValueError(
                "MeltCache keep_loop_rows only applies to cache_mode='shared' (per_loop keeps them anyway)"
            )
        if max_cache_len is not None:
            if isinstance(max_cache_len, bool) or not isinstance(max_cache_len, int) or max_cache_len < 1:
                raise ValueError(f"max_cache_len must be a positive int (tokens to preallocate), got {max_cache_len!r}")
            if max_cache_len > config.max_position_embeddings:
                raise ValueError(
                    f"max_cache_len={max_cache_len} exceeds max_position_embeddings={config.max_position_embeddings}; "
                    "the model cannot attend over more positions"
                )
        self.max_cache_len = max_cache_len
        self.keep_loop_rows = keep_loop_rows
        self.blend_alpha: float | None = None  # kv_blend_alpha of the rows in the loop slots (shared mode)
        # Slot layout: loop rows first (0 .. T-1) where kept, then the shared row.
        self.has_loop_rows = self.cache_mode == "per_loop" or keep_loop_rows
        self.has_shared_rows = self.cache_mode == "shared"
        num_slots = self.num_loops * self.has_loop_rows + self.has_shared_rows
        self._shared_slot = num_slots - 1 if self.has_shared_rows else None
        self._length = 0  # columns written (host), the source of truth for dynamic caches
        self._fill: torch.Tensor | None = None  # the same as a device tensor `[1]` (preallocated caches)
        self._auto_compile = True
        super().__init__(layers=[MeltCacheLayer(num_slots) for _ in range(config.num_hidden_layers)])

    # -- what transformers asks ------------------------------------------------------------------------------

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Columns written (tokens seen, padding included). A preallocated cache reads its device counter."""
        return int(self._fill.item()) if self._fill is not None else self._length

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.get_seq_length(layer_idx) + query_length, 0

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return -1 if self.max_cache_len is None else self.max_cache_len

    @property
    def is_initialized(self) -> bool:
        return all(layer.is_initialized for layer in self.layers)

    @property
    def batch_size(self) -> int:
        """Sequences the rows are allocated for (-1 before the first write)."""
        return self.layers[0].batch_size

    @property
    def is_preallocated(self) -> bool:
        return self.max_cache_len is not None

    @property
    def is_compileable(self) -> bool:
        """True for a preallocated cache: its decode step has fixed shapes and no host sync (transformers'
        generate then compiles the decode forward on CUDA)."""
        return self.is_preallocated and self._auto_compile

    def nbytes(self) -> int:
        """Bytes of the key/value rows held for the tokens seen (padding columns included), all layers."""
        return self.get_seq_length() * sum(layer.row_bytes() for layer in self.layers)

    def capacity_nbytes(self) -> int:
        """Bytes allocated for key/value rows, spare capacity included."""
        return sum(layer.capacity * layer.row_bytes() for layer in self.layers)

    def reset(self) -> None:
        self._set_length(0)
        for layer in self.layers:
            layer.forget_history(0)

    def crop(self, max_length: int) -> None:
        # Hugging Face convention: a negative value removes that many tokens from the end.
        length = self.get_seq_length()
        if max_length < 0:
            max_length = length + max_length
        self._set_length(max(0, min(length, max_length)))
        for layer in self.layers:
            layer.forget_history(self.get_seq_length())

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_batch(lambda buffer: buffer.index_select(0, beam_idx.to(buffer.device)))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda buffer: buffer[indices])

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda buffer: buffer.repeat_interleave(repeats, dim=0))

    def _map_batch(self, fn) -> None:
        length = self.get_seq_length()
        for layer in self.layers:
            layer.map_batch(fn, length)
        self._mark_static()

    # -- what the model asks: one forward call ---------------------------------------------------------------

    def begin_call(self, num_loops: int, blend: float | None) -> None:
        """Check that a call with `num_loops` loops and phase-1 blend `blend` can use this cache, and record the
        blend its loop slots will hold."""
        if self.has_loop_rows and self.num_loops != num_loops:
            raise ValueError(
                f"this cache keeps per-loop rows for {self.num_loops} loops but the call runs {num_loops}; "
                "per-loop caches need the same num_loops in every call"
            )
        if blend is not None and not self.has_loop_rows:
            raise ValueError("kv_blend_alpha < 1 needs a MeltCache created with keep_loop_rows=True")
        if self.has_loop_rows and self.has_shared_rows and self.get_seq_length() and self.blend_alpha != blend:
            raise ValueError(
                f"this cache holds loop rows blended with kv_blend_alpha={self.blend_alpha} but the call uses "
                f"{blend}; every call on one cache needs the same kv_blend_alpha (start a new cache to change it)"
            )
        self.blend_alpha = blend

    def make_room(self, columns: int, like: torch.Tensor) -> None:
        """Allocate (or grow to) room for `columns` columns, as this cache's policy says; `like`
        (`[B, kv_heads, *, head_dim]`) gives batch, dtype, device."""
        layers = self.layers
        if self.max_cache_len is not None:
            if columns > self.max_cache_len:
                raise ValueError(
                    f"this cache was preallocated for {self.max_cache_len} tokens but the call needs {columns}; "
                    "create it with a larger max_cache_len (generate sizes it from the prompt and max_new_tokens)"
                )
            if not layers[0].is_initialized:
                for layer in layers:
                    layer.allocate(self.max_cache_len, like)
                self._fill = torch.full((1,), self._length, dtype=torch.long, device=like.device)
                self._mark_static()
            return
        if not layers[0].is_initialized:
            for layer in layers:
                layer.allocate(max(columns, 1), like)
        elif columns > layers[0].capacity:
            grown = -(-columns // GROW_COLUMNS) * GROW_COLUMNS
            for layer in layers:
                layer.grow(grown)

    def prefix_rows(self, layer_idx: int, loop: int, columns: int):
        """The rows loop `loop` of layer `layer_idx` reads for the first `columns` columns (views, no copy), or
        `(None, None)` when there are none. Per-loop caches, and shared ones under the blend, read the loop's
        slot; MELT reads the shared slot."""
        if columns == 0:
            return None, None
        return self.layers[layer_idx].rows(self._read_slot(loop), columns)

    def commit_loop_rows(self, layer_idx: int, loop: int, rows, at) -> None:
        """Per-loop rows (`per_loop` mode without a blend) are final as soon as they exist."""
        self.layers[layer_idx].write(self._loop_slot(loop), *rows, *at)

    def commit_round(self, final_rows, blend_rows, at) -> None:
        """The rows of a round (one chunk of each sequence) are final: store the shared rows (`final_rows[l]`)
        and, under the phase-1 blend, loop slot t's blended row `lerp(blend_rows[t][l], final_rows[l], alpha)`
        (written once, like the shared row)."""
        if not self.has_shared_rows:
            return
        blend = self.blend_alpha
        for idx, (key, value) in enumerate(final_rows):
            layer = self.layers[idx]
            layer.write(self._shared_slot, key, value, *at)
            if blend is not None:
                for loop, rows in enumerate(blend_rows):
                    (k_loop, v_loop) = rows[idx]
                    layer.write(self._loop_slot(loop), torch.lerp(k_loop, key, blend), torch.lerp(v_loop, value, blend),
                                *at)

    def end_call(self, columns: int) -> None:
        """The call wrote columns up to `columns`."""
        self._set_length(columns)

    # -- the captured decode step (preallocated caches) ------------------------------------------------------

    @property
    def fill(self) -> torch.Tensor:
        """`[1]` device tensor: columns written. Only for an allocated, preallocated cache."""
        return self._fill

    def static_prefix_rows(self, layer_idx: int, loop: int):
        """The whole buffers `[B, kv_heads, max_cache_len, head_dim]` loop `loop` reads; columns at or past `fill`
        are not rows yet and must be masked by the caller."""
        layer, slot = self.layers[layer_idx], self._read_slot(loop)
        return layer.keys[slot], layer.values[slot]

    def static_place_rows(self, layer_idx: int, loop: int, rows, columns: int):
        """Write the new token's rows of loop `loop` at column `fill` of the slot that loop reads, and return the
        first `columns` columns of that slot's buffers (views), for an attention that reads the token's own row in
        place (`cache_attention`).

        Shared mode: the column is the token's one row, overwritten by each loop; after the last loop it holds the
        final row (an exited token's latent, hence its row, is its exit loop's), so nothing is left to commit.
        Per-loop mode: the row is final at once, in the loop's own slot."""
        self._static_write(layer_idx, self._read_slot(loop), rows)
        keys, values = self.static_prefix_rows(layer_idx, loop)
        return keys[:, :, :columns], values[:, :, :columns]

    def static_write_loop_rows(self, layer_idx: int, loop: int, rows) -> None:
        self._static_write(layer_idx, self._loop_slot(loop), rows)

    def static_write_final_rows(self, layer_idx: int, rows) -> None:
        if self.has_shared_rows:
            self._static_write(layer_idx, self._shared_slot, rows)

    def static_advance(self, columns: int) -> None:
        self._fill.add_(columns)

    def _static_write(self, layer_idx: int, slot: int, rows) -> None:
        layer = self.layers[layer_idx]
        # Inference only: a preallocated cache stores rows without autograd history (training uses dynamic caches).
        with torch.no_grad():
            for buffer, row in ((layer.keys[slot], rows[0]), (layer.values[slot], rows[1])):
                buffer.index_copy_(2, self._fill, row.to(buffer.dtype))  # row: [B, kv_heads, 1, head_dim]

    # -- internals -------------------------------------------------------------------------------------------

    def _read_slot(self, loop: int) -> int:
        if self.cache_mode == "per_loop" or self.blend_alpha is not None:  # blended rows live in the loop slots
            return self._loop_slot(loop)
        return self._shared_slot

    def _loop_slot(self, loop: int) -> int:
        if not self.has_loop_rows:
            raise ValueError("this MeltCache keeps no per-loop rows")
        if loop >= self.num_loops:
            raise ValueError(
                f"this MeltCache keeps rows for {self.num_loops} loops but loop {loop + 1} was requested; "
                "per-loop caches need the same num_loops in every call (start a new cache to change it)"
            )
        return loop

    def _set_length(self, columns: int) -> None:
        self._length = columns
        if self._fill is not None:
            self._fill.fill_(columns)

    def _mark_static(self) -> None:
        """Tell torch.compile the buffers keep their addresses across calls (CUDA graphs may then write them)."""
        if self._fill is None:
            return
        mark = getattr(getattr(torch, "_dynamo", None), "mark_static_address", None)
        if mark is None:
            return
        for layer in self.layers:
            for buffer in layer.keys + layer.values:
                mark(buffer)
        mark(self._fill)

    def __repr__(self) -> str:
        return (
            f"MeltCache(mode={self.cache_mode}, loops={self.num_loops}, layers={len(self.layers)}, "
            f"tokens={self.get_seq_length()}, bytes={self.nbytes()}, allocated={self.capacity_nbytes()})"
        )
