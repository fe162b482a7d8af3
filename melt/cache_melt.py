"""The key/value cache of MELT and of its exact LoopLM (Ouro) mode.

Each physical layer keeps a few *row slots*, each a buffer `[B, kv_heads, capacity, head_dim]`:

- `shared` (MELT): one slot. A token's row in it is written once, when all its loops are done (its
  final row); queries of later chunks read it.
- `per_loop` (Ouro): one slot per loop; loop t's queries read slot t. N*T rows per token.
- `shared` with the phase-1 blend (`kv_blend_alpha` < 1): T loop slots and the shared slot. Loop slot t
  holds the blended row `alpha * shared + (1 - alpha) * loop_t`, written once per token like the shared
  row, which is all that loop t's queries read.

Buffers are preallocated and grow geometrically (x2), so the token count (`get_seq_length`) is kept
apart from the capacity. Every column of a slot is written once per forward, and a prefix read only
covers written columns, so rows are always written in place, also when they carry autograd history
(training through the cache):

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


class MeltCacheLayer:
    """Row slots of one physical layer. `keys[s]` / `values[s]`: `[B, kv_heads, capacity, head_dim]`."""

    is_compileable = False
    is_croppable = True
    is_sliding = False

    def __init__(self, num_slots: int):
        self.num_slots = num_slots
        self.keys: list[torch.Tensor] | None = None
        self.values: list[torch.Tensor] | None = None
        self.length = 0  # columns (tokens, padding included) whose rows are stored
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

    def get_seq_length(self) -> int:
        return self.length

    def reserve(self, columns: int, like: torch.Tensor) -> None:
        """Make room for `columns` columns; `like` ([B, kv_heads, *, head_dim]) gives batch, dtype, device."""
        if self.keys is None:
            # Zeros, not empty: masked rows are multiplied by zero attention weights, and 0 * NaN is NaN.
            shape = (like.shape[0], like.shape[1], max(columns, 1), like.shape[3])
            self.keys = [like.new_zeros(shape) for _ in range(self.num_slots)]
            self.values = [like.new_zeros(shape) for _ in range(self.num_slots)]
            return
        if columns <= self.capacity:
            return
        new_capacity = max(columns, 2 * self.capacity)
        self.keys = [_grow(buffer, new_capacity) for buffer in self.keys]
        self.values = [_grow(buffer, new_capacity) for buffer in self.values]

    def rows(self, slot: int, columns: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views `[B, kv_heads, columns, head_dim]` of the first `columns` rows of `slot`: read in place.

        In grad mode, rows written with autograd history pass their gradients back to where they came from.
        """
        key, value = self.keys[slot][:, :, :columns], self.values[slot][:, :, :columns]
        written = [w for w in self.written[slot] if w.index is not None or w.start < columns]
        if written and torch.is_grad_enabled():
            key, value = _RoutedRows.apply(key, value, tuple(written), *(w.key for w in written), *(w.value for w in written))
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
                    target.transpose(1, 2).index_put_((batch, column), rows.transpose(1, 2)[batch, slot_pos].to(target.dtype))
        if tracked:
            self.written[slot].append(_Written(key, value, start, index))

    def nbytes(self) -> int:
        if self.keys is None:
            return 0
        row_bytes = sum(b[:, :, :1].numel() * b.element_size() for b in self.keys + self.values)
        return self.length * row_bytes

    def reset(self) -> None:
        self.length = 0
        self._forget_history()

    def crop(self, max_length: int) -> None:
        # Hugging Face convention: a negative value removes that many tokens from the end.
        if max_length < 0:
            max_length = self.length + max_length
        self.length = max(0, min(self.length, max_length))
        self._forget_history()

    def _forget_history(self) -> None:
        """After `crop` / `reset`: keep the history of the columns that remain, on new buffer storage.

        The dropped columns will be written again, while a graph that read them may still be waiting for its
        backward: moving the buffers to new storage keeps the values that graph saw.
        """
        if not any(self.written):
            return
        self.keys = [buffer.clone() for buffer in self.keys]
        self.values = [buffer.clone() for buffer in self.values]
        self.written = [[kept for w in slot if (kept := _truncated(w, self.length)) is not None] for slot in self.written]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_batch(lambda buffer: buffer.index_select(0, beam_idx.to(buffer.device)))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda buffer: buffer[indices])

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda buffer: buffer.repeat_interleave(repeats, dim=0))

    def _map_batch(self, fn) -> None:
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
            columns = self.length
            written.append([_Written(key[:, :, :columns], value[:, :, :columns], 0, None)] if history[slot] else [])
        self.keys, self.values, self.written = keys, values, written


def _grow(buffer: torch.Tensor, capacity: int) -> torch.Tensor:
    extra = buffer.new_zeros(buffer.shape[0], buffer.shape[1], capacity - buffer.shape[2], buffer.shape[3])
    return torch.cat([buffer, extra], dim=2)


class MeltCache(Cache):
    """Cache of a `MeltForCausalLM`: created by the model's forward when `use_cache=True` and none is given.

    Args:
        config: the model's config (layers, loops, cache mode).
        num_loops: loops the cache serves; only `per_loop` (and the phase-1 blend) keep rows per loop, so
            only there must every call use this same number. Defaults to `config.num_loops`.
        cache_mode: "shared" or "per_loop"; defaults to `config.cache_mode`.
        keep_loop_rows: in shared mode, also keep per-loop rows (needed by the phase-1 blend, alpha < 1).
    """

    def __init__(
        self,
        config: MeltConfig,
        num_loops: int | None = None,
        cache_mode: str | None = None,
        keep_loop_rows: bool = False,
    ):
        self.num_loops = config.num_loops if num_loops is None else num_loops
        validate_num_loops(self.num_loops, "MeltCache num_loops")
        self.cache_mode = config.cache_mode if cache_mode is None else cache_mode
        if self.cache_mode not in ("shared", "per_loop"):
            raise ValueError(f"MeltCache cache_mode must be 'shared' or 'per_loop', got {self.cache_mode!r}")
        if keep_loop_rows and self.cache_mode != "shared":
            raise ValueError("MeltCache keep_loop_rows only applies to cache_mode='shared' (per_loop keeps them anyway)")
        self.keep_loop_rows = keep_loop_rows
        self.blend_alpha: float | None = None  # kv_blend_alpha of the rows in the loop slots (shared mode)
        # Slot layout: loop rows first (0 .. T-1) where kept, then the shared row.
        self.has_loop_rows = self.cache_mode == "per_loop" or keep_loop_rows
        self.has_shared_rows = self.cache_mode == "shared"
        num_slots = self.num_loops * self.has_loop_rows + self.has_shared_rows
        self.shared_slot = num_slots - 1 if self.has_shared_rows else None
        super().__init__(layers=[MeltCacheLayer(num_slots) for _ in range(config.num_hidden_layers)])

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.layers[layer_idx].length

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.get_seq_length(layer_idx) + query_length, 0

    @property
    def is_initialized(self) -> bool:
        return all(layer.is_initialized for layer in self.layers)

    @property
    def is_compileable(self) -> bool:
        return False

    def nbytes(self) -> int:
        """Bytes of the key/value rows held for the tokens seen (padding columns included), all layers."""
        return sum(layer.nbytes() for layer in self.layers)

    def capacity_nbytes(self) -> int:
        """Bytes allocated for key/value rows, spare capacity included."""
        return sum(
            sum(b.numel() * b.element_size() for b in layer.keys + layer.values)
            for layer in self.layers
            if layer.keys is not None
        )

    def loop_slot(self, loop: int) -> int:
        if not self.has_loop_rows:
            raise ValueError("this MeltCache keeps no per-loop rows")
        if loop >= self.num_loops:
            raise ValueError(
                f"this MeltCache keeps rows for {self.num_loops} loops but loop {loop + 1} was requested; "
                "per-loop caches need the same num_loops in every call (start a new cache to change it)"
            )
        return loop

    def __repr__(self) -> str:
        return (
            f"MeltCache(mode={self.cache_mode}, loops={self.num_loops}, layers={len(self.layers)}, "
            f"tokens={self.get_seq_length()}, bytes={self.nbytes()})"
        )
