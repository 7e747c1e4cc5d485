"""PyTorch Moshi with a user-audio Depformer, as a Transformers `PreTrainedModel`.

Architecture (moshi's `LMModel` plus one branch):

    codes [B, 1 + n_q, T] --delay rows, prepend initial tokens--> [B, 1 + n_q, T + 1]
    sum of row embeddings (emb, text_emb) -> transformer -> out_norm = hidden [B, T, dim]
    hidden -> text_linear                   text logits   [B, 1, T, text_card]
    hidden + text token -> depformer        system audio  [B, dep_q, T, card]      (codebook axis)
    hidden + text token -> user_depformer   user audio    [B, user_dep_q, T, card] (codebook axis, new)

With `config.user_depformer="shared"` (PersonaPlex's multistream layout) there is no `user_depformer`: the system
Depformer runs `dep_q + user_dep_q` steps, the last `user_dep_q` giving the user audio.

All logits are un-delayed: `logits[:, k, t]` scores `codes[:, row_k, t]`, with `mask` False where no
prediction exists (delay tails, filled with NaN) or the target is the zero token -1.

This file keeps the model; its streaming step API is `modeling_moshi_streaming_step.py` (a mixin), and the file I/O
around loading and saving (folder checks, load reports, kyutai checkpoint files) is `modeling_moshi_loading.py`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput, logging

from .configuration_moshi_userpred import USER_INITS, MoshiUserPredConfig
from .generation_moshi_userpred import MoshiUserPredGenerationMixin
from .modeling_moshi_checkpoint import convert_from_moshi, convert_to_moshi
from .modeling_moshi_codes import ZERO_TOKEN_ID, check_codes
from .modeling_moshi_depformer import MoshiDepformer, MoshiScaledEmbedding
from .modeling_moshi_loading import load_complete_model, make_weights_readable, read_moshi_checkpoint
from .modeling_moshi_streaming_step import MoshiStreamingStepMixin
from .modeling_moshi_user_branch import MoshiUserBranchMixin
from .modeling_moshi_transformer import MoshiLayerScale, MoshiRMSNorm, MoshiTransformer, create_norm
from .modeling_moshi_voice_activity import MoshiVoiceActivityHead, voice_activity_targets

logger = logging.get_logger(__name__)


@dataclass
class MoshiUserPredOutput(ModelOutput):
    r"""Outputs of [`MoshiUserPredForConditionalGeneration.forward`].

    Args:
        loss (`torch.FloatTensor` `[]`): `text_loss + audio_loss + user_loss_weight * user_loss
            + voice_activity_loss_weight * voice_activity_loss` (with `return_loss`).
        text_loss, audio_loss, user_loss (`torch.FloatTensor` `[]`): weighted masked mean cross-entropies.
        voice_activity_loss (`torch.FloatTensor` `[]`, *optional*): the voice-activity head's masked mean binary
            cross-entropy (with `return_loss`, a head and `user_activity`).
        text_logits (`torch.FloatTensor` `[B, 1, T, text_card_out]`): scores of `codes[:, 0]`.
        text_mask (`torch.BoolTensor` `[B, 1, T]`): where `text_logits` are valid targets.
        audio_logits (`torch.FloatTensor` `[B, dep_q, T, card]`): scores of the system rows `codes[:, 1:1 + dep_q]`.
        audio_mask (`torch.BoolTensor` `[B, dep_q, T]`).
        user_logits (`torch.FloatTensor` `[B, user_dep_q, T, card]`, *optional*): scores of the user rows
            `codes[:, 1 + dep_q:1 + dep_q + user_dep_q]`, each predicted `user_prediction_lookahead` steps ahead
            of its delayed position.
        user_mask (`torch.BoolTensor` `[B, user_dep_q, T]`, *optional*).
        last_hidden_state (`torch.FloatTensor` `[B, T, dim]`): main transformer output (after `out_norm`);
            position s has seen the delayed codes up to s - 1.
        voice_activity_logits (`torch.FloatTensor` `[B, T, voice_activity_horizon + 1]`, *optional*): the
            voice-activity head's logits at every position (position-aligned: position s forecasts the user's
            silence from frame `s + user_prediction_lookahead - 1` on; see `modeling_moshi_voice_activity.py`).
    """

    loss: torch.Tensor | None = None
    text_loss: torch.Tensor | None = None
    audio_loss: torch.Tensor | None = None
    user_loss: torch.Tensor | None = None
    voice_activity_loss: torch.Tensor | None = None
    text_logits: torch.Tensor | None = None
    text_mask: torch.Tensor | None = None
    audio_logits: torch.Tensor | None = None
    audio_mask: torch.Tensor | None = None
    user_logits: torch.Tensor | None = None
    user_mask: torch.Tensor | None = None
    last_hidden_state: torch.Tensor | None = None
    voice_activity_logits: torch.Tensor | None = None


def shift_time(
    x: torch.Tensor, shifts: list[int], length: int, fill: list[float] | float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row time shift: `out[:, k, t] = x[:, k, t + shifts[k]]` where that index exists, else `fill`.

    Args:
        x: `[B, K, T, ...]`.
        shifts: one integer per row.
        length: output length along time.
        fill: a value, or one per row.

    Returns:
        `out` `[B, K, length, ...]` and `valid` `[K, length]` (False where `fill` was used).
    """
    # Out of place (one gather, one select): in-place row writes would make autograd clone the whole tensor per
    # write in backward, which for the logits costs more than the Depformer heads.
    B, K, T = x.shape[:3]
    fills = fill if isinstance(fill, list) else [fill] * K
    source = torch.arange(length, device=x.device) + torch.tensor(shifts, device=x.device)[:, None]  # [K, length]
    valid = (source >= 0) & (source < T)
    trailing = (1,) * (x.dim() - 3)
    fill_values = torch.tensor(fills, dtype=x.dtype, device=x.device).view(1, K, 1, *trailing)
    if T == 0:
        return fill_values.expand(B, K, length, *x.shape[3:]).clone(), valid
    rows = torch.arange(K, device=x.device)[:, None]
    out = torch.where(valid.view(1, K, length, *trailing), x[:, rows, source.clamp(0, T - 1)], fill_values)
    return out, valid


def masked_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Weighted mean cross-entropy over the positions where `mask` is True (moshi-finetune's loss).

    Args:
        logits: `[B, K, T, V]` (NaN allowed where `mask` is False).
        targets: `[B, K, T]`.
        mask: `[B, K, T]` bool.
        weights: `[B, K, T]` per-target weights, or None for 1.

    Returns:
        `sum(w * ce) / sum(w)` over valid targets; 0 when there is none.
    """
    w = mask.float() if weights is None else weights.float() * mask
    ce = F.cross_entropy(logits[mask].float(), targets[mask], reduction="none")
    selected = w[mask]
    return (ce * selected).sum() / selected.sum().clamp_min(torch.finfo(torch.float32).tiny)


def _trunc_normal_(weight: torch.Tensor, fan_in: int) -> None:
    # moshi's scheme: truncated normal, std 1/sqrt(fan_in), cut at 3 std; drawn in float32 for low precisions.
    std = 1 / math.sqrt(fan_in)
    values = torch.empty(weight.shape, dtype=torch.float32, device=weight.device)
    torch.nn.init.trunc_normal_(values, mean=0.0, std=std, a=-3 * std, b=3 * std)
    init.copy_(weight, values)


class MoshiUserPredPreTrainedModel(PreTrainedModel):
    """Weight init (moshi's scheme) and the Transformers plumbing shared by Moshi user-prediction models."""

    config_class = MoshiUserPredConfig
    base_model_prefix = ""  # one model class, no base model inside a head
    main_input_name = "codes"
    # The text embedding plays the language model's input embedding (Moshi sums one embedding per row): Transformers'
    # quantizers (torchao) and embedding utilities look it up by this name.
    _input_embed_layer = "text_emb"
    supports_gradient_checkpointing = True
    _no_split_modules = ["MoshiTransformerLayer"]
    _supports_sdpa = True

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike | None, *model_args, **kwargs):
        """`PreTrainedModel.from_pretrained` that only ever returns a complete model of this package.

        Before loading, a local folder is checked to be a model directory of this package (`config.json` with
        `model_type="moshi_userpred"`); after loading, every checkpoint tensor must have matched a parameter (no
        missing, unexpected or mis-shaped tensor), so a kyutai checkpoint, a Mimi codec, a LoRA adapter or a
        truncated file is refused instead of yielding a randomly initialised model. A path that does not exist is
        refused as such rather than looked up on the Hub. `ignore_mismatched_sizes=True` lets mis-shaped tensors
        through (they are then re-initialised, as in Transformers).

        Raises:
            ValueError: naming the folder (or repo id) and what it holds instead.
        """
        return load_complete_model(super().from_pretrained, pretrained_model_name_or_path, *model_args, **kwargs)

    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs):
        """`PreTrainedModel.save_pretrained`, with the weight files given the permissions the umask gives new files
        (safetensors writes them 0600, unlike config.json), so a saved model is as readable as the rest of its folder."""
        result = super().save_pretrained(save_directory, *args, **kwargs)
        make_weights_readable(save_directory)
        return result

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # moshi: truncated normal on embeddings, the main transformer's linears and the output heads;
        # PyTorch's default init everywhere else (Depformer layers, input projections, low-rank maps).
        if isinstance(module, MoshiScaledEmbedding):
            if not getattr(module.weight, "_is_hf_initialized", False):
                _trunc_normal_(module.weight, module.embedding_dim)
        elif isinstance(module, nn.Linear):
            if getattr(module, "_moshi_trunc_normal_init", False):
                if not getattr(module.weight, "_is_hf_initialized", False):
                    _trunc_normal_(module.weight, module.in_features)
                if module.bias is not None:
                    init.zeros_(module.bias)
            else:
                init.kaiming_uniform_(module.weight, a=math.sqrt(5))
                if module.bias is not None:
                    bound = 1 / math.sqrt(module.in_features)
                    init.uniform_(module.bias, -bound, bound)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, MoshiRMSNorm):
            init.ones_(module.alpha)
        elif isinstance(module, MoshiLayerScale):
            init.constant_(module.scale, module.init_value)


def _build_depformer(config: MoshiUserPredConfig, user: bool) -> MoshiDepformer:
    c = config
    # Each branch's own fields, read by name (the config has already filled the user branch's unset ones with the
    # system's values).
    if user:
        branch = dict(
            dim=c.user_depformer_dim, num_steps=c.user_dep_q, num_heads=c.user_depformer_num_heads,
            num_layers=c.user_depformer_num_layers, dim_feedforward=c.user_depformer_dim_feedforward,
            multi_linear=c.user_depformer_multi_linear, weights_per_step=c.user_depformer_weights_per_step,
            schedule=None, low_rank_embeddings=c.user_depformer_low_rank_embeddings, pos_emb=c.user_depformer_pos_emb,
            out_norm=c.user_depformer_norm,
        )
    else:
        branch = dict(
            dim=c.depformer_dim, num_steps=c.depformer_steps, num_heads=c.depformer_num_heads,
            num_layers=c.depformer_num_layers, dim_feedforward=c.depformer_dim_feedforward,
            multi_linear=c.depformer_multi_linear, weights_per_step=c.depformer_weights_per_step,
            schedule=c.depformer_weights_per_step_schedule, low_rank_embeddings=c.depformer_low_rank_embeddings,
            pos_emb=c.depformer_pos_emb, out_norm=c.depformer_norm,
        )
    return MoshiDepformer(
        input_dim=c.dim,
        card=c.card,
        text_card=c.text_card,
        **branch,
        # Transformer options the user Depformer shares with the system one.
        norm=c.norm,
        gating=c.depformer_gating,
        layer_scale=c.depformer_layer_scale,
        kv_repeat=c.depformer_kv_repeat,
        max_period=c.depformer_max_period,
        positional_scale=c.depformer_positional_scale,
        norm_emb=c.norm_emb,
        bias_proj=c.bias_proj,
    )


class MoshiUserPredForConditionalGeneration(
    MoshiUserPredGenerationMixin, MoshiStreamingStepMixin, MoshiUserBranchMixin, MoshiUserPredPreTrainedModel
):
    """Moshi's LM (text head + system-audio Depformer) with a Depformer predicting the user's next audio tokens.

    Parameter names equal moshi `LMModel`'s except inside the system Depformer, grouped as `depformer.*`
    (see `modeling_moshi_checkpoint`); `from_moshi` / `moshi_state_dict` convert both ways.
    """

    def __init__(self, config: MoshiUserPredConfig):
        super().__init__(config)
        c = config
        self.emb = nn.ModuleList([MoshiScaledEmbedding(c.card + 1, c.dim, norm=c.norm_emb) for _ in range(c.n_q)])
        self.text_emb = MoshiScaledEmbedding(c.text_card + 1, c.dim, norm=c.norm_emb)
        self.transformer = MoshiTransformer(
            c.dim, c.num_heads, c.num_layers, int(c.hidden_scale * c.dim), c.norm, c.gating, c.positional_embedding,
            c.max_period, c.positional_scale, c.layer_scale, c.kv_repeat, c.context,
        )
        self.out_norm = create_norm(c.norm, c.dim)
        self.text_linear = nn.Linear(c.dim, c.text_card_out, bias=c.bias_proj)
        self.depformer = _build_depformer(c, user=False)
        separate = c.predict_user_audio and c.user_depformer == "separate"
        self.user_depformer = _build_depformer(c, user=True) if separate else None
        self.voice_activity_head = MoshiVoiceActivityHead(c) if c.voice_activity_horizon else None
        self.extra_heads = nn.ModuleList(
            [nn.Linear(c.dim, c.extra_heads_dim, bias=False) for _ in range(c.extra_heads_num_heads)]
        )
        heads = [*self.depformer.heads, *(self.user_depformer.heads if self.user_depformer is not None else [])]
        for module in [*self.transformer.modules(), self.text_linear, *heads]:
            if isinstance(module, nn.Linear):
                module._moshi_trunc_normal_init = True
        self.post_init()
        # On the meta device there is nothing to copy yet: `from_moshi` copies once the checkpoint is loaded, and
        # `from_pretrained` loads the saved user branch itself.
        if c.predict_user_audio and c.user_init == "copy_system" and not self.text_linear.weight.is_meta:
            self.init_user_branch("copy_system")

    # ----------------------------------------------------------------------------------------- layout
    @property
    def user_rows(self) -> slice:
        """Rows of `codes` the user Depformer predicts."""
        start = 1 + self.config.dep_q
        return slice(start, start + self.config.user_dep_q)

    def initial_tokens(self) -> list[int]:
        """Token fed before the first frame of every row: `text_card` for text, `card` for audio."""
        return [self.config.text_card] + [self.config.card] * self.config.n_q

    # ---------------------------------------------------------------------------------------- forward
    def embed(self, sequence: torch.Tensor) -> torch.Tensor:
        """Sum of the row embeddings of delayed codes `[B, 1 + n_q, S]` -> `[B, S, dim]`."""
        x = None
        for k, emb in enumerate(self.emb):
            e = emb(sequence[:, 1 + k])
            x = e if x is None else x + e
        return x + self.text_emb(sequence[:, 0])

    def forward(
        self,
        codes: torch.Tensor,
        return_loss: bool = False,
        user_loss_weight: float | None = None,
        predict_user: bool = True,
        user_activity: torch.Tensor | None = None,
        prompt_frames: torch.Tensor | None = None,
        **kwargs,
    ) -> MoshiUserPredOutput:
        r"""Teacher-forced logits of every stream (and losses with `return_loss`).

        Args:
            codes (`torch.LongTensor` `[B, 1 + n_q, T]`): text row, `dep_q` system rows, `n_q - dep_q` user rows;
                -1 marks "no token" (zero embedding, no loss).
            return_loss (`bool`): also compute `loss`, `text_loss`, `audio_loss`, `user_loss`.
            user_loss_weight (`float`, *optional*): weight of the user loss in `loss` (default: the config's).
            predict_user (`bool`): run the user Depformer; False skips it (no forward, no backward: `user_logits`,
                `user_mask` and `user_loss` are None), e.g. while a curriculum gives the user loss weight 0.
            user_activity (`torch.LongTensor` `[B, F]`, *optional*): the user's voice activity per frame from frame 0
                (1 speaks, 0 silent, -1 unknown; `F` may exceed `T` by the frames the head looks ahead), the targets
                of the voice-activity head's loss (see `voice_activity_targets`).
            prompt_frames (`torch.LongTensor` `[B]`, *optional*): the first frames of each sequence that are a persona
                prompt (`generation_moshi_persona.py`): the model reads them, but they are no target (their masks,
                hence their losses, are False).

        Returns:
            [`MoshiUserPredOutput`].
        """
        c = self.config
        # Values are checked outside training: the training data pipeline checks them once, on the CPU.
        codes = check_codes(codes, c, device=self.device, check_values=not self.training)
        T = codes.shape[2]
        delays = c.delays
        delayed, _ = shift_time(codes, [-1 - d for d in delays], T + 1, self.initial_tokens())
        hidden = self.out_norm(self.transformer(self.embed(delayed[:, :, :-1])))
        text_tokens = delayed[:, 0, 1:]

        text_logits, text_mask = self._undelay(self.text_linear(hidden)[:, None], codes[:, :1], delays[:1])
        system_rows, rows = slice(1, 1 + c.dep_q), self.user_rows
        predict_user = predict_user and c.predict_user_audio
        shared = predict_user and c.user_depformer == "shared"
        # A shared Depformer continues over the user rows: its step dep_q reads the system's last codebook.
        steps = c.depformer_steps if shared else c.dep_q
        depformer_logits = self.depformer(hidden, text_tokens, delayed[:, 1:steps, 1:], num_steps=steps)
        audio_logits, audio_mask = self._undelay(depformer_logits[:, : c.dep_q], codes[:, system_rows],
                                                 delays[system_rows])
        user_logits = user_mask = None
        if predict_user:
            lookahead = c.user_prediction_lookahead
            if shared:  # lookahead 1: the user rows of the system's own position
                raw = depformer_logits[:, c.dep_q :]
            else:
                # Position s predicts the delayed user tokens of position s + lookahead; past the end: zero tokens.
                future, _ = shift_time(delayed[:, rows], [lookahead] * c.user_dep_q, T, ZERO_TOKEN_ID)
                raw = self.user_depformer(hidden, text_tokens, future[:, :-1])
            user_logits, user_mask = self._undelay(raw, codes[:, rows], [d - (lookahead - 1) for d in delays[rows]])
            user_logits = self.calibrate_user_logits(user_logits, codebook_dim=1)
        voice_activity_logits = None
        if self.voice_activity_head is not None:  # cheap, and it reads the hidden state only: run even without the branch
            voice_activity_logits = self.voice_activity_head(hidden)

        if prompt_frames is not None:  # a persona prompt is read, never learnt
            target = torch.arange(T, device=codes.device)[None, None] >= prompt_frames.to(codes.device)[:, None, None]
            text_mask, audio_mask = text_mask & target, audio_mask & target
            user_mask = None if user_mask is None else user_mask & target
        output = MoshiUserPredOutput(
            text_logits=text_logits, text_mask=text_mask, audio_logits=audio_logits, audio_mask=audio_mask,
            user_logits=user_logits, user_mask=user_mask, last_hidden_state=hidden,
            voice_activity_logits=voice_activity_logits,
        )
        if return_loss:
            self._add_losses(output, codes, user_loss_weight, user_activity)
        return output

    def calibrate_user_logits(self, logits: torch.Tensor, codebook_dim: int) -> torch.Tensor:
        """`logits` of the user codebooks (`user_dep_q` along `codebook_dim`, e.g. `[B, user_dep_q, T, card]` or
        `[B, user_dep_q, card]`) divided by `config.user_logit_temperature` (unchanged when it is None)."""
        temperature = self.config.user_logit_temperature
        if temperature is None:
            return logits
        shape = [1] * logits.dim()
        shape[codebook_dim] = len(temperature)
        return logits / torch.tensor(temperature, dtype=logits.dtype, device=logits.device).view(shape)

    @staticmethod
    def _undelay(logits: torch.Tensor, targets: torch.Tensor, shifts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Position-aligned logits -> target-aligned logits (NaN where none) and the loss mask."""
        if any(shifts):
            logits, valid = shift_time(logits, shifts, logits.shape[2], float("nan"))
            return logits, valid[None] & (targets != ZERO_TOKEN_ID)
        return logits, targets != ZERO_TOKEN_ID

    def _add_losses(self, output: MoshiUserPredOutput, codes: torch.Tensor, user_loss_weight: float | None,
                    user_activity: torch.Tensor | None) -> None:
        c = self.config
        text_targets = codes[:, :1]
        padding = (text_targets == c.existing_text_padding_id) | (text_targets == c.existing_text_end_padding_id)
        text_weights = torch.where(padding, c.text_padding_weight, 1.0)
        output.text_loss = masked_cross_entropy(output.text_logits, text_targets, output.text_mask, text_weights)
        output.audio_loss = masked_cross_entropy(
            output.audio_logits, codes[:, 1 : 1 + c.dep_q], output.audio_mask, self._codebook_weights(c.dep_q, codes)
        )
        output.loss = output.text_loss + output.audio_loss
        if output.user_logits is not None:
            output.user_loss = masked_cross_entropy(
                output.user_logits, codes[:, self.user_rows], output.user_mask,
                self._codebook_weights(c.user_dep_q, codes),
            )
            weight = c.user_loss_weight if user_loss_weight is None else user_loss_weight
            output.loss = output.loss + weight * output.user_loss
        if output.voice_activity_logits is not None and user_activity is not None:
            targets, known = voice_activity_targets(
                user_activity.to(codes.device), codes.shape[2], c.user_prediction_lookahead - 1,
                c.voice_activity_horizon, c.voice_activity_turn_end_frames)
            losses = F.binary_cross_entropy_with_logits(output.voice_activity_logits.float(), targets, reduction="none")
            output.voice_activity_loss = (losses * known).sum() / known.sum().clamp_min(1)
            output.loss = output.loss + c.voice_activity_loss_weight * output.voice_activity_loss

    def _codebook_weights(self, num_codebooks: int, codes: torch.Tensor) -> torch.Tensor:
        weights = torch.ones(1, num_codebooks, 1, device=codes.device)
        weights[:, 0] = self.config.first_codebook_weight_multiplier
        return weights.expand(codes.shape[0], num_codebooks, codes.shape[2])

    def add_voice_activity_head(self, horizon: int = 10, turn_end_frames: int = 5) -> MoshiVoiceActivityHead:
        """Gives the model a new, randomly initialised voice-activity head (replacing any it has) and records it in
        the config (`voice_activity_horizon`, `voice_activity_turn_end_frames`); train it with the Trainer on
        dialogues that carry the user's voice activity (e.g. `training_mode="voice_activity_head"`).

        Raises:
            ValueError: no user branch, or bad frame counts (the config's checks).
        """
        before = (self.config.voice_activity_horizon, self.config.voice_activity_turn_end_frames)
        self.config.voice_activity_horizon, self.config.voice_activity_turn_end_frames = horizon, turn_end_frames
        try:
            self.config.validate_moshi_config()
        except ValueError:
            self.config.voice_activity_horizon, self.config.voice_activity_turn_end_frames = before
            raise
        head = MoshiVoiceActivityHead(self.config).to(device=self.device, dtype=self.text_linear.weight.dtype)
        head.apply(self._init_weights)
        self.voice_activity_head = head
        return head

    # ------------------------------------------------------------------------------- kyutai checkpoints
    @classmethod
    def from_moshi(
        cls,
        checkpoint: str | os.PathLike | Mapping[str, torch.Tensor],
        lm_kwargs: Mapping | None = None,
        user_init: str = "copy_system",
        *,
        dtype: torch.dtype | None = None,
        device: str | torch.device = "cpu",
        **config_overrides,
    ) -> "MoshiUserPredForConditionalGeneration":
        """Build the model from a kyutai Moshi checkpoint, with the user branch initialised by `user_init`.

        The model is created on the meta device and the checkpoint tensors are assigned, so a 7B
        checkpoint is never held twice in memory.

        Args:
            checkpoint: a moshi-format `.safetensors` file or a state dict with moshi's key names.
            lm_kwargs: moshi's LM kwargs or the checkpoint's `config.json` dict (default: moshiko's).
            user_init: `"copy_system"` (the system Depformer's weights where shapes match) or `"random"`.
            dtype: parameter dtype (default: the checkpoint's floating dtype).
            device: where the parameters live.
            **config_overrides: fields of [`MoshiUserPredConfig`] (e.g. `user_dep_q=1`).

        Raises:
            ValueError: the checkpoint does not match the config (every bad key and shape is listed).
        """
        if user_init not in USER_INITS:
            raise ValueError(f"user_init={user_init!r}: must be one of {USER_INITS}")
        config_overrides["user_init"] = user_init
        if lm_kwargs is None:
            config = MoshiUserPredConfig(**config_overrides)
        else:
            config = MoshiUserPredConfig.from_moshi_lm_kwargs(dict(lm_kwargs), **config_overrides)
        state_dict = read_moshi_checkpoint(checkpoint)
        if dtype is None:
            dtype = next((t.dtype for t in state_dict.values() if t.is_floating_point()), torch.float32)
        with torch.device("meta"):
            model = cls(config).to(dtype)
        model.load_moshi_state_dict(state_dict, device=device)
        # What the checkpoint did not hold (the user branch, unless a multistream checkpoint held it, and a voice-
        # activity head) is allocated and initialised.
        unloaded = [name for name, param in model.named_parameters() if param.is_meta]
        for name in unloaded:
            module_name, _, param_name = name.rpartition(".")
            module = model.get_submodule(module_name)
            param = getattr(module, param_name)
            setattr(module, param_name, nn.Parameter(torch.empty_like(param, device=device), param.requires_grad))
        if any(not name.startswith("voice_activity_head.") for name in unloaded):
            model.init_user_branch(user_init)
        if model.voice_activity_head is not None and any(name.startswith("voice_activity_head.") for name in unloaded):
            for module in model.voice_activity_head.modules():
                model._init_weights(module)
        return model.eval()

    def load_moshi_state_dict(self, state_dict: Mapping[str, torch.Tensor], device: str | torch.device | None = None) -> None:
        """Load moshi `LMModel` weights (released fused layout or moshi-finetune's) into the shared part.

        Tensors are cast to the model's dtype; parameters still on the meta device are assigned (no copy).

        Raises:
            ValueError: listing every missing, unexpected or mis-shaped key.
        """
        params = dict(self.named_parameters())
        c = self.config
        if c.predict_user_audio and c.user_depformer == "shared" and f"linears.{c.dep_q}.weight" not in state_dict:
            # A single-stream checkpoint (moshiko) into a shared user branch: its user steps are initialised later.
            params = {name: p for name, p in params.items() if not name.startswith(self.user_branch_prefixes)}
        converted = convert_from_moshi(state_dict, {name: p.shape for name, p in params.items()})
        on_meta = any(p.is_meta for name, p in params.items() if name in converted)
        target = device if device is not None else (None if on_meta else self.device)
        converted = {
            name: tensor.to(device=target, dtype=params[name].dtype if tensor.is_floating_point() else None)
            for name, tensor in converted.items()
        }
        self.load_state_dict(converted, strict=False, assign=on_meta)  # convert_from_moshi checked completeness

    def moshi_state_dict(self) -> dict[str, torch.Tensor]:
        """The shared part in kyutai's released layout: moshi's `LMModel(**config.to_moshi_lm_kwargs())`
        loads it with `strict=True`. The user branch is not part of it."""
        return convert_to_moshi(self.state_dict())


__all__ = [
    "MoshiUserPredForConditionalGeneration",
    "MoshiUserPredOutput",
    "MoshiUserPredPreTrainedModel",
    "masked_cross_entropy",
    "shift_time",
]
