"""Frame-by-frame Mimi for a batch of independent conversations ("slots"), each resettable on its own.

A real-time voice server feeds Mimi one frame at a time (80 ms, 1920 samples at 24 kHz, for the released codec) for
B conversations at once, and they join and leave independently. [`MimiStreamingCodec`] wraps a transformers
`MimiModel` for that: `encode` turns `[B, frame_size]` samples into `[B, num_codebooks, 1]` codes, `decode` turns
codes back into `[B, frame_size]` samples, and `reset(mask)` restarts some slots while the others carry on. The
streamed outputs equal the one-shot `MimiModel.encode` / `MimiModel.decode` of the whole sequence (up to float
rounding), because every layer is causal and each keeps exactly the past it needs:

- causal convolutions (`MimiConv1d`, encoder and decoder): the last `kernel - stride` input samples of the previous
  call, left-padded onto the next one. This is transformers' own streaming mechanism, `MimiConv1dPaddingCache`,
  which `MimiModel.encode(use_streaming=True)` already uses; `_SlotPaddingCache` extends it with per-slot reset
  (and serves the decoder convolutions, which transformers does not stream).
- transposed convolutions (`MimiConvTranspose1d`, decoder only): transformers trims the last `kernel - stride`
  output samples, which are incomplete until the next input arrives. Here that tail is kept (minus the bias, which
  the next output adds again) and added onto the head of the next output, as kyutai's `StreamingConvTranspose1d`
  does.
- the encoder and decoder transformers (sliding-window attention, `sliding_window` steps): transformers' caches
  keep one sequence length for the whole batch, so a slot cannot restart at position 0 while the others go on.
  `_SlotKVCache` keeps, per layer, the last `sliding_window - 1` keys and values of every slot and, per slot, the
  position each was computed at. Each step gets per-slot `position_ids` (rotary embeddings) and an explicit
  `[B, 1, steps, sliding_window - 1 + steps]` additive mask (causal, within the window, hiding emptied entries),
  which transformers' `MimiTransformerModel` takes as is; its attention layers call `_SlotKVCache.update` the way
  they call a `Cache`'s. Resetting a slot empties its keys and puts its position back to 0, so the slot computes
  bit for bit what a fresh codec would (same positions, same keys), not merely the same up to rounding (rotary
  embeddings are relative, so a slot restarted at a later position would only differ by rounding).

Everything is batched: the per-frame path loops over layers, never over slots. The encoder path is
`MimiModel.encode` itself, handed these caches. Transformers' decoder has no streaming mode for its convolutions,
so the decoder path runs the stages of `MimiDecoderModel.forward` (dequantize, upsample, transformer, SEANet
layers) itself, with these states. The model's modules are called as they are and never modified.
"""

from __future__ import annotations

import math

import torch
from transformers import MimiModel
from transformers.models.mimi.configuration_mimi import MimiConfig
from transformers.models.mimi.modeling_mimi import (
    MimiConv1d,
    MimiConv1dPaddingCache,
    MimiConvTranspose1d,
    MimiResnetBlock,
)

_SUPPORTED_ATTENTION = ("eager", "sdpa")  # the implementations that take an additive 4D mask as is


class _SlotPaddingCache(MimiConv1dPaddingCache):
    """Left context of a list of causal `MimiConv1d`, `[B, in_channels, kernel - stride]` each, resettable per slot.

    A layer is identified by the order of the `update` calls since the last `rewind` (the order of `convs`), not by
    `layer_idx`: the decoder's convolutions have none. The base class pads a layer's very first input with zeros, or
    with copies of its first sample in "replicate" mode (the encoder's downsampling); a reset slot gets the same.
    """

    def __init__(self, convs: list[MimiConv1d], batch_size: int, device: torch.device):
        super().__init__(
            num_layers=len(convs),
            per_layer_padding=[int(conv.padding_total) for conv in convs],
            per_layer_padding_mode=[conv.pad_mode for conv in convs],
            per_layer_in_channels=[conv.in_channels for conv in convs],
        )
        # [num_layers, B]: slots reset since the layer's last update, to be padded like a first input
        self.fresh = torch.zeros(len(convs), batch_size, dtype=torch.bool, device=device)
        self.calls = 0

    def rewind(self) -> None:
        """Starts a new forward pass: the next `update` is the first layer's."""
        self.calls = 0

    def update(self, hidden_states: torch.Tensor, layer_idx: int | None = None) -> torch.Tensor:
        """Returns the layer's left context `[B, in_channels, padding]` and keeps the end of `hidden_states`."""
        index, self.calls = self.calls, self.calls + 1
        cache = self.padding_cache[index]
        if cache is not None and self.per_layer_padding_mode[index] == "replicate":
            self.padding_cache[index] = torch.where(self.fresh[index, :, None, None], hidden_states[..., :1], cache)
        self.fresh[index] = False
        return super().update(hidden_states, index)

    def snapshot(self) -> tuple[list[torch.Tensor | None], torch.Tensor]:
        """The state as it is now (the tensors are replaced, never written in place, by `update`)."""
        return list(self.padding_cache), self.fresh.clone()

    def restore(self, snapshot: tuple[list[torch.Tensor | None], torch.Tensor], held: torch.Tensor) -> None:
        """Gives the slots where `held` (`[B]` bool) is True their state of `snapshot` back; the others keep theirs.
        A layer that had no state yet (its first call) restarts those slots as `reset` does."""
        caches, fresh = snapshot
        self.fresh = torch.where(held[None], fresh, self.fresh)
        restored = []
        for index, (old, new) in enumerate(zip(caches, self.padding_cache)):
            if new is not None and old is None:
                self.fresh[index] |= held
                new = new.masked_fill(held[:, None, None], 0.0)
            elif new is not None:
                new = torch.where(held[:, None, None], old, new)
            restored.append(new)
        self.padding_cache = restored

    def reset(self, mask: torch.Tensor) -> None:
        """Puts the slots where `mask` (`[B]` bool) is True back to the initial (zero or first-sample) padding."""
        self.fresh |= mask
        self.padding_cache = [
            None if cache is None else cache.masked_fill(mask[:, None, None], 0.0) for cache in self.padding_cache
        ]


class _SlotKVCache:
    """Sliding-window keys and values of a `MimiTransformerModel`, with a position per slot.

    Per layer, `keys` / `values` `[B, num_key_value_heads, sliding_window - 1, head_dim]` hold the last
    `sliding_window - 1` steps of every slot (the most any query of the next step can see besides the new ones), and
    `key_positions` `[B, sliding_window - 1]` the position each was computed at (`-sliding_window`, outside every
    window, where empty). `offset` `[B]` is each slot's next position.
    """

    def __init__(self, config: MimiConfig, batch_size: int, device: torch.device, dtype: torch.dtype):
        self.window = config.sliding_window
        shape = (batch_size, config.num_key_value_heads, self.window - 1, config.head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.key_positions = torch.full((batch_size, self.window - 1), -self.window, device=device)
        self.offset = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.dtype = dtype

    def step(self, num_steps: int) -> tuple[torch.LongTensor, torch.Tensor]:
        """Advances every slot by `num_steps` and returns what the transformer needs for them.

        Returns:
            `position_ids` `[B, num_steps]` and the additive attention mask
            `[B, 1, num_steps, sliding_window - 1 + num_steps]` over the cached keys followed by the new ones.
        """
        positions = self.offset[:, None] + torch.arange(num_steps, device=self.offset.device)
        key_positions = torch.cat([self.key_positions, positions], dim=1)
        distance = positions[:, :, None] - key_positions[:, None, :]
        visible = (distance >= 0) & (distance < self.window)  # transformers' sliding-window causal mask
        mask = torch.zeros(visible.shape, dtype=self.dtype, device=visible.device)
        mask = mask.masked_fill(~visible, torch.finfo(self.dtype).min)[:, None]
        self.key_positions = key_positions[:, num_steps:]
        self.offset = self.offset + num_steps
        return positions, mask

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """`Cache.update` as `MimiAttention` calls it: keys and values `[B, heads, steps, head_dim]` of this step in,
        the cached ones followed by them out, `[B, heads, sliding_window - 1 + steps, head_dim]`."""
        keys = torch.cat([self.keys[layer_idx], key_states], dim=2)
        values = torch.cat([self.values[layer_idx], value_states], dim=2)
        self.keys[layer_idx] = keys[:, :, key_states.shape[2] :]
        self.values[layer_idx] = values[:, :, key_states.shape[2] :]
        return keys, values

    def snapshot(self) -> tuple:
        """The state as it is now (`step` and `update` replace the tensors, never write them in place)."""
        return list(self.keys), list(self.values), self.key_positions, self.offset

    def restore(self, snapshot: tuple, held: torch.Tensor) -> None:
        """Gives the slots where `held` (`[B]` bool) is True their state of `snapshot` back; the others keep theirs."""
        keys, values, key_positions, offset = snapshot
        self.keys = [torch.where(held[:, None, None, None], old, new) for old, new in zip(keys, self.keys)]
        self.values = [torch.where(held[:, None, None, None], old, new) for old, new in zip(values, self.values)]
        self.key_positions = torch.where(held[:, None], key_positions, self.key_positions)
        self.offset = torch.where(held, offset, self.offset)

    def reset(self, mask: torch.Tensor) -> None:
        """Empties the slots where `mask` (`[B]` bool) is True and puts their position back to 0.

        Masking alone would hide the old keys, but not NaN ones (NaN times a zero weight is NaN): zeroing them lets a
        slot that was fed NaN recover.
        """
        self.keys = [keys.masked_fill(mask[:, None, None, None], 0.0) for keys in self.keys]
        self.values = [values.masked_fill(mask[:, None, None, None], 0.0) for values in self.values]
        self.key_positions = self.key_positions.masked_fill(mask[:, None], -self.window)
        self.offset = self.offset.masked_fill(mask, 0)


class MimiStreamingCodec:
    """Streaming Mimi encoder and decoder for `batch_size` independent slots, one frame per call.

    Args:
        mimi (`MimiModel`): the codec; its weights are used as they are, on their device and dtype (move it before
            building the codec). It needs causal convolutions (`use_causal_conv`, `trim_right_ratio` 1), one audio
            channel and "eager" or "sdpa" attention, as the released Mimi has.
        batch_size (`int`): the number of slots B.
        num_codebooks (`int`, *optional*): codebooks per frame, from `num_semantic_quantizers` (at least 1) to
            `num_quantizers`; all of them by default. `decode` expects that many.

    Raises:
        ValueError: on a bad argument or a Mimi that cannot stream, naming the value.
    """

    def __init__(self, mimi: MimiModel, batch_size: int, num_codebooks: int | None = None):
        if not isinstance(mimi, MimiModel):
            raise ValueError(f"mimi must be a transformers MimiModel, got {type(mimi).__name__}")
        config = mimi.config
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        lowest = max(1, config.num_semantic_quantizers)
        num_codebooks = config.num_quantizers if num_codebooks is None else num_codebooks
        if not isinstance(num_codebooks, int) or isinstance(num_codebooks, bool):
            raise ValueError(f"num_codebooks must be an int, got {num_codebooks!r}")
        if not lowest <= num_codebooks <= config.num_quantizers:
            raise ValueError(f"num_codebooks must be in [{lowest}, {config.num_quantizers}], got {num_codebooks}")
        if not config.use_causal_conv or config.trim_right_ratio != 1.0:
            raise ValueError(
                "streaming needs causal convolutions: got use_causal_conv="
                f"{config.use_causal_conv}, trim_right_ratio={config.trim_right_ratio}"
            )
        if config.audio_channels != 1:
            raise ValueError(f"only mono Mimi is supported, got audio_channels={config.audio_channels}")
        for half in (mimi.encoder, mimi.decoder):
            if half is not None and half.config._attn_implementation not in _SUPPORTED_ATTENTION:
                raise ValueError(
                    f"attention implementation {half.config._attn_implementation!r} cannot take the per-slot mask: "
                    f"load Mimi with attn_implementation in {_SUPPORTED_ATTENTION}"
                )

        self.mimi = mimi
        self.batch_size = batch_size
        self.num_codebooks = num_codebooks
        self.codebook_size = config.codebook_size
        # transformers builds the latent down/upsampling (stride `latent_stride`) only when the rates differ
        self.steps_per_frame = config.latent_stride if config.frame_rate != config.encodec_frame_rate else 1
        self.frame_size = math.prod(config.upsampling_ratios) * self.steps_per_frame
        self.device, self.dtype = mimi.device, mimi.dtype
        self._make_state()

    def _make_state(self) -> None:
        size, device, dtype = self.batch_size, self.device, self.dtype
        encoder, decoder = self.mimi.encoder, self.mimi.decoder
        if encoder is not None:
            convs = [m for m in encoder.encoder_seanet.modules() if isinstance(m, MimiConv1d)]
            convs += [encoder.downsample] if encoder.downsample is not None else []
            self._encoder_padding = _SlotPaddingCache(convs, size, device)
            self._encoder_kv = _SlotKVCache(encoder.config, size, device, dtype)
        if decoder is not None:
            convs = [m for m in decoder.decoder_seanet.modules() if isinstance(m, MimiConv1d)]
            self._decoder_padding = _SlotPaddingCache(convs, size, device)
            self._decoder_kv = _SlotKVCache(decoder.config, size, device, dtype)
            # per transposed convolution, the overlapping tail of its last output `[B, out_channels, kernel - stride]`
            self._overlaps = {
                layer: torch.zeros(
                    size, layer.conv.out_channels, layer.conv.kernel_size[0] - layer.conv.stride[0],
                    device=device, dtype=dtype,
                )
                for layer in decoder.modules()
                if isinstance(layer, MimiConvTranspose1d)
            }

    @torch.no_grad()
    def encode(self, audio: torch.Tensor, mask: torch.Tensor | None = None) -> torch.LongTensor:
        """Encodes the next frame of every slot (of the slots in `mask`).

        Args:
            audio (`torch.Tensor` `[B, frame_size]`): one frame of mono audio per slot, in Mimi's dtype.
            mask (`torch.BoolTensor` `[B]`, *optional*): the slots that have a frame; the others keep their state
                (a live server's slot whose frame is late), and their codes are meaningless. All slots by default.

        Returns:
            `torch.LongTensor` `[B, num_codebooks, 1]`: that frame's codes.

        Raises:
            ValueError: if `audio` is not a `[B, frame_size]` tensor of Mimi's dtype, `mask` not a `[B]` bool tensor,
                or Mimi has no encoder.
        """
        if self.mimi.encoder is None:
            raise ValueError("this Mimi has no encoder (encoder_config=None)")
        expected = (self.batch_size, self.frame_size)
        if not isinstance(audio, torch.Tensor) or tuple(audio.shape) != expected:
            shape = tuple(audio.shape) if isinstance(audio, torch.Tensor) else type(audio).__name__
            raise ValueError(f"audio must have shape [batch_size, frame_size] = {list(expected)}, got {shape}")
        if audio.dtype != self.dtype:
            raise ValueError(f"audio must be {self.dtype} (Mimi's dtype), got {audio.dtype}")
        held = self._held(mask)
        states = (self._encoder_padding, self._encoder_kv)
        snapshots = [state.snapshot() for state in states] if held is not None else None
        position_ids, attention_mask = self._encoder_kv.step(self.steps_per_frame)
        self._encoder_padding.rewind()
        # `position_ids` and `attention_mask` reach the encoder transformer through `encode`'s keyword arguments
        codes = self.mimi.encode(
            audio[:, None],
            num_quantizers=self.num_codebooks,
            encoder_cache=self._encoder_kv,
            padding_cache=self._encoder_padding,
            use_streaming=True,
            position_ids=position_ids,
            attention_mask=attention_mask,
        ).audio_codes
        if held is not None:
            for state, snapshot in zip(states, snapshots):
                state.restore(snapshot, held)
        return codes

    @torch.no_grad()
    def decode(self, codes: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Decodes the next frame of every slot (of the slots in `mask`).

        Args:
            codes (`torch.LongTensor` `[B, num_codebooks, 1]`): one frame of codes per slot (any integer dtype), each
                in `[0, codebook_size)` (in the slots of `mask`; the others' are not read).
            mask (`torch.BoolTensor` `[B]`, *optional*): the slots to decode; the others keep their state and their
                audio is meaningless. All slots by default.

        Returns:
            `torch.Tensor` `[B, frame_size]`: that frame's audio, in Mimi's dtype.

        Raises:
            ValueError: if `codes` is not a `[B, num_codebooks, 1]` integer tensor with values in range, `mask` not a
                `[B]` bool tensor, or Mimi has no decoder.
        """
        decoder = self.mimi.decoder
        if decoder is None:
            raise ValueError("this Mimi has no decoder (decoder_config=None)")
        expected = (self.batch_size, self.num_codebooks, 1)
        if not isinstance(codes, torch.Tensor) or tuple(codes.shape) != expected:
            shape = tuple(codes.shape) if isinstance(codes, torch.Tensor) else type(codes).__name__
            raise ValueError(f"codes must have shape [batch_size, num_codebooks, 1] = {list(expected)}, got {shape}")
        if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
            raise ValueError(f"codes must be an integer tensor, got {codes.dtype}")
        held = self._held(mask)
        out_of_range = (codes < 0) | (codes >= self.codebook_size)
        if held is not None:
            out_of_range &= ~held[:, None, None]
            codes = codes.masked_fill(held[:, None, None], 0)
        if out_of_range.any():
            raise ValueError(
                f"codes must be in [0, {self.codebook_size}), got {codes[out_of_range][0].item()} "
                f"(slot {out_of_range.nonzero()[0, 0].item()})"
            )
        states = (self._decoder_padding, self._decoder_kv)
        snapshots = [state.snapshot() for state in states] if held is not None else None
        overlaps = dict(self._overlaps)
        hidden = self.mimi.quantizer.decode(codes.long())  # [B, hidden_size, 1]
        if decoder.upsample is not None:
            hidden = self._conv_transpose(decoder.upsample, hidden)
        position_ids, attention_mask = self._decoder_kv.step(hidden.shape[-1])
        hidden = decoder.decoder_transformer(
            hidden.transpose(1, 2),
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=self._decoder_kv,
            use_cache=True,
        ).last_hidden_state.transpose(1, 2)
        self._decoder_padding.rewind()
        for layer in decoder.decoder_seanet.layers:
            if isinstance(layer, MimiConvTranspose1d):
                hidden = self._conv_transpose(layer, hidden)
            elif isinstance(layer, (MimiConv1d, MimiResnetBlock)):
                hidden = layer(hidden, padding_cache=self._decoder_padding)
            else:
                hidden = layer(hidden)
        if held is not None:
            for state, snapshot in zip(states, snapshots):
                state.restore(snapshot, held)
            self._overlaps = {
                layer: torch.where(held[:, None, None], overlaps[layer], overlap)
                for layer, overlap in self._overlaps.items()
            }
        return hidden[:, 0]

    def _conv_transpose(self, layer: MimiConvTranspose1d, hidden: torch.Tensor) -> torch.Tensor:
        """Streams `layer` on `hidden` `[B, in_channels, T]`: returns the `[B, out_channels, T * stride]` samples that
        are complete and keeps the rest (overlap-add)."""
        output = layer.conv(hidden)  # [B, out_channels, T * stride + kernel - stride]
        overlap = self._overlaps[layer]
        complete = output.shape[-1] - overlap.shape[-1]
        output[..., : overlap.shape[-1]] += overlap
        tail = output[..., complete:]
        # the next output carries the bias again
        self._overlaps[layer] = tail if layer.conv.bias is None else tail - layer.conv.bias[:, None]
        return output[..., :complete]

    def reset(self, mask: torch.Tensor | None = None) -> None:
        """Restarts slots: their next frame is encoded and decoded as a fresh codec's first frame would be.

        Args:
            mask (`torch.BoolTensor` `[B]`, *optional*): True for the slots to restart; all of them when None. The
                other slots are untouched.

        Raises:
            ValueError: if `mask` is not a `[B]` bool tensor.
        """
        mask = self._check_mask(torch.ones(self.batch_size, dtype=torch.bool) if mask is None else mask)
        if self.mimi.encoder is not None:
            self._encoder_padding.reset(mask)
            self._encoder_kv.reset(mask)
        if self.mimi.decoder is not None:
            self._decoder_padding.reset(mask)
            self._decoder_kv.reset(mask)
            self._overlaps = {
                layer: overlap.masked_fill(mask[:, None, None], 0.0) for layer, overlap in self._overlaps.items()
            }

    def _check_mask(self, mask: torch.Tensor) -> torch.Tensor:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != (self.batch_size,):
            described = f"{mask.dtype} {list(mask.shape)}" if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f"mask must be a bool tensor of shape [{self.batch_size}], got {described}")
        return mask.to(self.device)

    def _held(self, mask: torch.Tensor | None) -> torch.Tensor | None:
        """The slots a call with `mask` must leave as they are, or None when it runs them all."""
        if mask is None:
            return None
        held = ~self._check_mask(mask)
        return held if bool(held.any()) else None


__all__ = ["MimiStreamingCodec"]
