"""Static ring-buffer key/value cache for streaming one Moshi transformer.

Every tensor is allocated once per session and updated in place, so memory stays flat however long a
session runs and the step can be captured in a CUDA graph. A step first *reads* the cache and keeps its
new keys/values apart (`pending`); `commit` then writes one of them per slot. The split is what
speculative streaming needs: several candidate inputs for the same position are run against the same
prefix, and only the one that turns out right is written. A step's new entries are copied into scratch
slots stored right after the ring, so attention reads one buffer: concatenating the whole cache with the
new entries in every layer would copy the cache on every step.
"""

from __future__ import annotations

import torch


class MoshiKVCache:
    """Keys and values of the last `capacity` positions of every layer, for `batch_size` independent slots.

    Attributes:
        keys, values: `[num_layers, B, num_kv_heads, capacity, head_dim]`, the ring part of buffers that hold
            `alternatives` scratch cells after it (the new entries of the current step, not yet committed).
        positions: `[B, capacity]` absolute position held by each ring cell, -1 for an empty one.
        pending: per layer, the `(keys, values)` `[B, num_kv_heads, n, head_dim]` of the last step, not yet written.
    """

    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        num_kv_heads: int,
        head_dim: int,
        capacity: int,
        device: torch.device,
        dtype: torch.dtype,
    ):
        shape = (num_layers, batch_size, num_kv_heads, capacity + 1, head_dim)  # one scratch cell: a plain step
        self._key_buffer = torch.zeros(shape, device=device, dtype=dtype)
        self._value_buffer = torch.zeros(shape, device=device, dtype=dtype)
        self._set_views(capacity)
        self.positions = torch.full((batch_size, capacity), -1, device=device, dtype=torch.long)
        self.pending: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * num_layers
        self._mask: torch.Tensor | None = None  # attention mask of the current step, built at layer 0
        self._batch_index = torch.arange(batch_size, device=device)

    @property
    def capacity(self) -> int:
        return self.positions.shape[1]

    @property
    def alternatives(self) -> int:
        """How many new entries per slot a step can hold (the scratch cells)."""
        return self._key_buffer.shape[3] - self.capacity

    def reserve(self, alternatives: int) -> None:
        """Make room for steps of up to `alternatives` new entries (speculation). Call it before streaming, so
        the buffers are allocated once (and stay put for CUDA graphs); `attend` grows them otherwise."""
        if alternatives <= self.alternatives:
            return
        capacity = self.capacity
        shape = (*self.keys.shape[:3], capacity + alternatives, self.keys.shape[4])
        self._key_buffer = torch.cat([self.keys, self.keys.new_zeros(shape)[:, :, :, capacity:]], dim=3)
        self._value_buffer = torch.cat([self.values, self.values.new_zeros(shape)[:, :, :, capacity:]], dim=3)
        self._set_views(capacity)

    def _set_views(self, capacity: int) -> None:
        self.keys = self._key_buffer[:, :, :, :capacity]
        self.values = self._value_buffer[:, :, :, :capacity]

    def attend(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, position: torch.Tensor, context: int | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keys, values and mask for `n` new entries that are *alternatives* for the same `position`.

        Each new entry attends to the cached positions inside the window and to itself only (tree attention
        with one level); with `n = 1` this is ordinary causal streaming attention.

        Args:
            layer: layer index.
            k, v: new keys/values `[B, num_kv_heads, n, head_dim]` (kept as `pending[layer]`).
            position: `[B]` position of the new entries.
            context: attention window (None: unbounded, then `capacity` must cover the whole stream).

        Returns:
            keys, values `[B, num_kv_heads, capacity + n, head_dim]` and a bool mask `[B, 1, n, capacity + n]`.
        """
        self.pending[layer] = (k, v)
        n, end = k.shape[2], self.capacity + k.shape[2]
        self.reserve(n)
        if layer == 0:  # every layer of a step shares positions and window: build the mask once per step
            delta = position[:, None] - self.positions
            cached = (self.positions >= 0) & (delta > 0)
            if context is not None:
                cached &= delta < context
            own = torch.eye(n, dtype=torch.bool, device=k.device).expand(k.shape[0], n, n)
            self._mask = torch.cat([cached[:, None, :].expand(-1, n, -1), own], dim=-1)[:, None]
        mask = self._mask
        keys, values = self._key_buffer[layer, :, :, :end], self._value_buffer[layer, :, :, :end]
        keys[:, :, self.capacity :] = k
        values[:, :, self.capacity :] = v
        return keys, values, mask

    def attend_sequence(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, context: int | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keys, values and mask for `n` new entries at *consecutive* positions (a prefill: a prompt, or the codebook
        steps a Depformer already knows), each attending to the cached positions and the new entries up to itself,
        inside the window: what feeding them one step at a time would give. For a one-off prefill, not a
        CUDA-graphed step (it allocates).

        Args:
            layer: layer index.
            k, v: new keys/values `[B, num_kv_heads, n, head_dim]` (kept as `pending[layer]`).
            positions: `[B, n]` their positions, consecutive.
            context: attention window (None: the ring's capacity, which a step-by-step stream cannot exceed).

        Returns:
            keys, values `[B, num_kv_heads, capacity + n, head_dim]` and a bool mask `[B, 1, n, capacity + n]`.
        """
        self.pending[layer] = (k, v)
        if layer == 0:
            window = self.capacity if context is None else min(context, self.capacity)
            to_cached = positions[:, :, None] - self.positions[:, None, :]  # [B, n, capacity]
            cached = (self.positions[:, None, :] >= 0) & (to_cached > 0) & (to_cached < window)
            to_new = positions[:, :, None] - positions[:, None, :]  # [B, n, n]
            self._mask = torch.cat([cached, (to_new >= 0) & (to_new < window)], dim=-1)[:, None]
        return torch.cat([self.keys[layer], k], dim=2), torch.cat([self.values[layer], v], dim=2), self._mask

    def commit_sequence(
        self, pending: list[tuple[torch.Tensor, torch.Tensor]], positions: torch.Tensor, mask: torch.Tensor | None = None
    ) -> None:
        """Write all `n` entries of an `attend_sequence` step at their `positions` `[B, n]` (only the last `capacity`
        fit the ring), for every slot `b` where `mask[b]` (default all)."""
        keep = min(positions.shape[1], self.capacity)
        positions = positions[:, -keep:]
        b = self._batch_index[:, None]
        cells = positions % self.capacity  # [B, keep]
        for layer, (k, v) in enumerate(pending):
            for store, new in ((self.keys[layer], k), (self.values[layer], v)):
                by_cell = store.transpose(1, 2)  # [B, capacity, num_kv_heads, head_dim], a view
                chosen = new[:, :, -keep:].transpose(1, 2)
                if mask is not None:
                    chosen = torch.where(mask[:, None, None, None], chosen, by_cell[b, cells])
                by_cell[b, cells] = chosen
        self.positions[b, cells] = positions if mask is None else torch.where(mask[:, None], positions,
                                                                              self.positions[b, cells])

    def take_pending(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The new keys/values of the last step (and forget them)."""
        pending, self.pending = self.pending, [None] * len(self.pending)
        return pending

    def commit(
        self,
        pending: list[tuple[torch.Tensor, torch.Tensor]],
        position: torch.Tensor,
        choice: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> None:
        """Write entry `choice[b]` of `pending` at `position[b]` for every slot `b` where `mask[b]`.

        Args:
            pending: what `take_pending` returned.
            position: `[B]` positions the entries belong to.
            choice: `[B]` which of the `n` alternatives to keep (default 0).
            mask: `[B]` bool, slots to write (default all).
        """
        b = self._batch_index
        cell = position % self.capacity
        for layer, (k, v) in enumerate(pending):
            for store, new in ((self.keys[layer], k), (self.values[layer], v)):
                chosen = new[:, :, 0] if choice is None else new[b, :, choice]  # [B, num_kv_heads, head_dim]
                if mask is not None:
                    chosen = torch.where(mask[:, None, None], chosen, store[b, :, cell])
                store[b, :, cell] = chosen
        new_position = position if mask is None else torch.where(mask, position, self.positions[b, cell])
        self.positions[b, cell] = new_position

    def reorder(self, index: torch.Tensor) -> None:
        """Make slot `b` hold what slot `index[b]` `[B]` held (beam search: a beam continues its parent's cache).
        In place, so the buffers stay put for CUDA graphs."""
        self.keys.copy_(self.keys[:, index])
        self.values.copy_(self.values[:, index])
        self.positions.copy_(self.positions[index])

    def reset(self, mask: torch.Tensor | None = None) -> None:
        """Empty the slots where `mask` `[B]` is True (all of them for None)."""
        if mask is None:
            self.positions.fill_(-1)
        else:
            self.positions.masked_fill_(mask[:, None], -1)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self._key_buffer, self._value_buffer, self.positions))


__all__ = ["MoshiKVCache"]
