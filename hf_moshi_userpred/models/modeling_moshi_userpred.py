"""PyTorch Moshi with a user-audio Depformer, as a Transformers `PreTrainedModel`.

Architecture (moshi's `LMModel` plus one branch):

    codes [B, 1 + n_q, T] --delay rows, prepend initial tokens--> [B, 1 + n_q, T + 1]
    sum of row embeddings (emb, text_emb) -> transformer -> out_norm = hidden [B, T, dim]
    hidden -> text_linear                   text logits   [B, 1, T, text_card]
    hidden + text token -> depformer        system audio  [B, dep_q, T, card]      (codebook axis)
    hidden + text token -> user_depformer   user audio    [B, user_dep_q, T, card] (codebook axis, new)

All logits are un-delayed: `logits[:, k, t]` scores `codes[:, row_k, t]`, with `mask` False where no
prediction exists (delay tails, filled with NaN) or the target is the zero token -1.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_utils import load_state_dict
from transformers.utils import ModelOutput, logging

from .configuration_moshi_userpred import USER_INITS, MoshiUserPredConfig
from .generation_moshi_userpred import MoshiUserPredGenerationMixin
from .modeling_moshi_cache import MoshiKVCache
from .modeling_moshi_checkpoint import convert_from_moshi, convert_to_moshi
from .modeling_moshi_codes import ZERO_TOKEN_ID, check_codes
from .modeling_moshi_depformer import MoshiDepformer, MoshiScaledEmbedding
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


@dataclass
class MoshiStreamingCaches:
    """The key/value caches of one streaming session of `B` slots (see [`MoshiKVCache`]).

    Attributes:
        transformer: the main transformer's ring buffer, `config.streaming_window` positions, room for `k`
            alternatives per step when speculating.
        depformer: the system Depformer's cache for one frame of `B` slots.
        speculative_depformer: the same for `B * k` alternatives (speculation on), else None.
        user_depformer: the user Depformer's cache (user branch on), else None.
    """

    transformer: MoshiKVCache
    depformer: MoshiKVCache
    speculative_depformer: MoshiKVCache | None = None
    user_depformer: MoshiKVCache | None = None

    def nbytes(self) -> int:
        caches = (self.transformer, self.depformer, self.speculative_depformer, self.user_depformer)
        return sum(cache.nbytes() for cache in caches if cache is not None)


@dataclass
class MoshiSystemStepOutput(ModelOutput):
    r"""What [`MoshiUserPredForConditionalGeneration.system_step`] produced for `n` alternative inputs per slot.

    Args:
        hidden (`torch.FloatTensor` `[B, n, dim]`): the main transformer's output (after `out_norm`).
        text (`torch.LongTensor` `[B, n]`): the sampled text token.
        audio (`torch.LongTensor` `[B, n, dep_q]`): the sampled system audio codebooks.
        pending (`list`): the main transformer's new key/value entries, not yet in the cache: the caller commits
            the alternative it keeps (`MoshiKVCache.commit`).
    """

    hidden: torch.Tensor | None = None
    text: torch.Tensor | None = None
    audio: torch.Tensor | None = None
    pending: list | None = None


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
        name = None if pretrained_model_name_or_path is None else os.fspath(pretrained_model_name_or_path)
        if name is None or kwargs.get("state_dict") is not None or kwargs.get("gguf_file") is not None:
            return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        local = os.path.isdir(name)
        if local:
            problem = describe_model_folder(os.path.join(name, kwargs.get("subfolder") or ""),
                                            check_config=kwargs.get("config") is None)
            if problem is not None:
                raise ValueError(f"{name!r} is not a model directory of hf_moshi_userpred: {problem}")
        elif os.path.exists(name):
            raise ValueError(f"{name!r} is a file, not a model directory (a folder with config.json and "
                             "model.safetensors)")
        elif _looks_like_a_path(name):
            raise ValueError(f"model directory {name!r} does not exist")
        want_info = kwargs.pop("output_loading_info", False)
        ignore_mismatched = kwargs.pop("ignore_mismatched_sizes", False)
        where = f"{name!r}" if local else f"the Hub repository {name!r}"
        # Mis-shaped tensors are let through and reported below with their shapes; Transformers' multi-line load
        # report is dropped (every case it reports is refused here, in one line).
        report_logger = logging.get_logger("transformers.modeling_utils")
        report_filter = _DropLoadReport()
        report_logger.addFilter(report_filter)
        try:
            model, info = super().from_pretrained(pretrained_model_name_or_path, *model_args,
                                                  output_loading_info=True, ignore_mismatched_sizes=True, **kwargs)
        except OSError as error:
            if local:
                raise ValueError(f"cannot load the model in {name!r}: {_first_line(error)}") from error
            raise ValueError(f"{name!r} is neither a local model directory nor a Hub repository that can be "
                             f"loaded: {_first_line(error)}") from error
        except RuntimeError as error:
            if "size mismatch" in str(error) or "ignore_mismatched_sizes" in str(error):
                raise ValueError(f"the weights in {where} do not have the shapes its config.json describes (was "
                                 f"config.json edited or copied from another model?): {_first_line(error)}") from error
            if "automatic conversion of the weights" in str(error):  # e.g. a torchao layout with no kernel here
                # The cause is in the load report dropped above: its first exception line.
                cause = re.search(r"^\w+(?:Error|Exception): .+$", "\n".join(report_filter.dropped), re.MULTILINE)
                quantization = kwargs.get("quantization_config")
                scheme = getattr(quantization, "quant_type", quantization)
                how = "" if quantization is None else f" with {type(scheme).__name__}"
                raise ValueError(f"cannot convert the weights in {where}{how}: "
                                 f"{cause[0] if cause else _first_line(error)}") from error
            raise
        except Exception as error:  # safetensors' own error type (not importable from remote code)
            if type(error).__name__ == "SafetensorError":
                raise ValueError(f"the weights in {where} are truncated or corrupt ({error}): re-download or "
                                 "re-save the model") from error
            raise
        finally:
            report_logger.removeFilter(report_filter)
        bad = {kind: sorted(info.get(kind) or []) for kind in ("missing_keys", "unexpected_keys", "mismatched_keys")}
        if ignore_mismatched:
            bad["mismatched_keys"] = []
        if any(bad.values()):
            counts = ", ".join(f"{len(keys)} {kind.split('_')[0]}" for kind, keys in bad.items() if keys)
            examples = ", ".join(key if isinstance(key, str) else f"{key[0]}: checkpoint {tuple(key[1])} vs config {tuple(key[2])}"
                                 for keys in bad.values() for key in keys[:2])
            hint = (" (kyutai layout: run `hf-moshi-userpred convert` on it first)"
                    if any(_is_kyutai_key(str(key)) for key in bad["unexpected_keys"]) else "")
            raise ValueError(f"the weights in {where} do not match its config ({counts} tensors, e.g. {examples})"
                             f"{hint}: refusing to run a partly random model")
        return (model, info) if want_info else model

    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs):
        """`PreTrainedModel.save_pretrained`, with the weight files given the permissions the umask gives new files
        (safetensors writes them 0600, unlike config.json), so a saved model is as readable as the rest of its folder."""
        result = super().save_pretrained(save_directory, *args, **kwargs)
        mask = os.umask(0)
        os.umask(mask)
        if os.path.isdir(save_directory):
            for name in os.listdir(save_directory):
                path = os.path.join(save_directory, name)
                if name.endswith((".safetensors", ".bin")) and os.path.isfile(path) and not os.path.islink(path):
                    os.chmod(path, 0o666 & ~mask)
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


class _DropLoadReport(logging.logging.Filter):
    """Drops Transformers' multi-line weight-loading report (`from_pretrained` raises one line instead), keeping it in
    `dropped` for that line."""

    def __init__(self):
        super().__init__()
        self.dropped: list[str] = []

    def filter(self, record) -> bool:
        if "LOAD REPORT" in str(record.msg):
            self.dropped.append(str(record.msg))
            return False
        return True


_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")
_KYUTAI_ONLY_KEYS = re.compile(r"^(linears\.\d+\.|depformer_in\.|depformer_emb\.|depformer_text_emb\.|"
                               r"depformer_norms\.|depformer\.layers\.|.*\.self_attn\.(in_proj_weight|out_proj\.))")


def _is_kyutai_key(key: str) -> bool:
    """A tensor name only kyutai's moshi layout uses (ours groups the system Depformer under `depformer.`)."""
    return bool(_KYUTAI_ONLY_KEYS.match(key))


def _looks_like_a_path(name: str) -> bool:
    """True when `name` cannot be a Hub repo id (`name` or `namespace/name`) and so must be a local path."""
    return (os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name
            or name.endswith("/") or "/" in name and os.path.isdir(name.split("/")[0]))


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def _safetensors_keys(path: str) -> list[str] | None:
    """The tensor names in a safetensors file's header (standard library only), None if it is not readable."""
    try:
        with open(path, "rb") as file:
            (size,) = struct.unpack("<Q", file.read(8))
            if size > 100_000_000:
                return None
            header = json.loads(file.read(size))
    except (OSError, ValueError, struct.error):
        return None
    return [key for key in header if key != "__metadata__"] if isinstance(header, dict) else None


def describe_model_folder(folder: str | os.PathLike, check_config: bool = True) -> str | None:
    """None when `folder` looks like a model directory of this package, else what it holds instead (one phrase).

    Only `config.json`'s `model_type` and the file names (plus, for a folder without config, the tensor names in
    the safetensors header) are read: cheap, and before any model is built.
    """
    folder = os.fspath(folder)
    config_file = os.path.join(folder, "config.json")
    files = set(os.listdir(folder)) if os.path.isdir(folder) else set()
    if not os.path.isfile(config_file):
        if "adapter_config.json" in files:
            return ("it holds a LoRA adapter (adapter_config.json) without its base model: load the base model and "
                    "the adapter with peft, or train with merge_lora")
        weights = [name for name in sorted(files) if name.endswith(".safetensors")]
        if weights:
            keys = _safetensors_keys(os.path.join(folder, weights[0])) or []
            if any(_is_kyutai_key(key) for key in keys) or "text_emb.weight" in keys:
                return (f"no config.json, and {weights[0]} is a moshi checkpoint (kyutai layout): run "
                        "`hf-moshi-userpred convert` on it first")
            return f"no config.json beside its weights ({', '.join(weights)}); it cannot be loaded without one"
        return "no config.json in it (convert a kyutai checkpoint or train a model first)"
    if check_config:
        try:
            with open(config_file, encoding="utf-8") as file:
                config = json.load(file)
        except (OSError, UnicodeDecodeError, ValueError) as error:
            return f"its config.json cannot be read as JSON ({error})"
        if not isinstance(config, dict):
            return f"its config.json holds a {type(config).__name__}, not a JSON object"
        model_type = config.get("model_type")
        if model_type != MoshiUserPredConfig.model_type:
            if model_type is None and ("moshi_name" in config or {"dep_q", "n_q", "card"} <= set(config)):
                return ("it is in kyutai's moshi layout (config.json of moshi LM kwargs, as `convert --to-moshi` "
                        "writes): run `hf-moshi-userpred convert` on it first")
            if model_type == "mimi":
                return "it holds a Mimi codec (model_type 'mimi'), not a Moshi model"
            return (f"its config.json has model_type={model_type!r}, expected {MoshiUserPredConfig.model_type!r}")
    if not files & set(_WEIGHT_FILES):
        return f"no weights beside its config.json (expected one of {', '.join(_WEIGHT_FILES)})"
    return None


def _build_depformer(config: MoshiUserPredConfig, user: bool) -> MoshiDepformer:
    prefix = "user_depformer_" if user else "depformer_"
    return MoshiDepformer(
        input_dim=config.dim,
        dim=getattr(config, prefix + "dim"),
        num_steps=config.user_dep_q if user else config.dep_q,
        num_heads=getattr(config, prefix + "num_heads"),
        num_layers=getattr(config, prefix + "num_layers"),
        dim_feedforward=getattr(config, prefix + "dim_feedforward"),
        card=config.card,
        text_card=config.text_card,
        multi_linear=getattr(config, prefix + "multi_linear"),
        weights_per_step=getattr(config, prefix + "weights_per_step"),
        schedule=None if user else config.depformer_weights_per_step_schedule,
        low_rank_embeddings=getattr(config, prefix + "low_rank_embeddings"),
        pos_emb=getattr(config, prefix + "pos_emb"),
        out_norm=getattr(config, prefix + "norm"),
        # Transformer options the user Depformer shares with the system one.
        norm=config.norm,
        gating=config.depformer_gating,
        layer_scale=config.depformer_layer_scale,
        kv_repeat=config.depformer_kv_repeat,
        max_period=config.depformer_max_period,
        positional_scale=config.depformer_positional_scale,
        norm_emb=config.norm_emb,
        bias_proj=config.bias_proj,
    )


class MoshiUserPredForConditionalGeneration(MoshiUserPredGenerationMixin, MoshiUserPredPreTrainedModel):
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
        self.user_depformer = _build_depformer(c, user=True) if c.predict_user_audio else None
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
        if self.user_depformer is not None and c.user_init == "copy_system" and not self.text_linear.weight.is_meta:
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
        system_rows = slice(1, 1 + c.dep_q)
        audio_logits, audio_mask = self._undelay(
            self.depformer(hidden, text_tokens, delayed[:, 1 : c.dep_q, 1:]), codes[:, system_rows],
            delays[system_rows],
        )
        user_logits = user_mask = None
        if self.user_depformer is not None and predict_user:
            rows, lookahead = self.user_rows, c.user_prediction_lookahead
            # Position s predicts the delayed user tokens of position s + lookahead; past the end: zero tokens.
            future, _ = shift_time(delayed[:, rows], [lookahead] * c.user_dep_q, T, ZERO_TOKEN_ID)
            user_logits, user_mask = self._undelay(
                self.user_depformer(hidden, text_tokens, future[:, :-1]), codes[:, rows],
                [d - (lookahead - 1) for d in delays[rows]],
            )
            user_logits = self._calibrate_user_logits(user_logits, codebook_dim=1)
        voice_activity_logits = None
        if self.voice_activity_head is not None:  # cheap, and it reads the hidden state only: run even without the branch
            voice_activity_logits = self.voice_activity_head(hidden)

        output = MoshiUserPredOutput(
            text_logits=text_logits, text_mask=text_mask, audio_logits=audio_logits, audio_mask=audio_mask,
            user_logits=user_logits, user_mask=user_mask, last_hidden_state=hidden,
            voice_activity_logits=voice_activity_logits,
        )
        if return_loss:
            self._add_losses(output, codes, user_loss_weight, user_activity)
        return output

    def _calibrate_user_logits(self, logits: torch.Tensor, codebook_dim: int) -> torch.Tensor:
        """`logits` of the user codebooks (along `codebook_dim`) divided by `config.user_logit_temperature`."""
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

    # ------------------------------------------------------------------------------- streaming step API
    def make_streaming_caches(self, batch_size: int, speculate_top_k: int = 0) -> MoshiStreamingCaches:
        """Allocate the caches of a streaming session of `batch_size` slots, once (flat memory, CUDA-graph safe).

        Args:
            batch_size: slots.
            speculate_top_k: alternatives per step a speculative session runs (0: none).
        """
        transformer = self.transformer.make_cache(batch_size, self.config.streaming_window)
        speculative = None
        if speculate_top_k:
            transformer.reserve(speculate_top_k)
            speculative = self.depformer.make_cache(batch_size * speculate_top_k)
        user = self.user_depformer.make_cache(batch_size) if self.user_depformer is not None else None
        return MoshiStreamingCaches(transformer, self.depformer.make_cache(batch_size), speculative, user)

    def system_step(
        self,
        inputs: torch.Tensor,
        positions: torch.Tensor,
        caches: MoshiStreamingCaches,
        sample_text: Callable[[torch.Tensor], torch.Tensor],
        sample_audio: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor],
    ) -> MoshiSystemStepOutput:
        """One streaming position of the main transformer, then the text token and the system's audio codebooks:
        the critical path of a frame. Pure tensor work (no host synchronisation), so it can be CUDA-graphed.

        Args:
            inputs: `[B, n, 1 + n_q]` delayed tokens of the position, `n` alternatives per slot (n > 1: speculation;
                each alternative attends to the cache and itself).
            positions: `[B]` the position of every slot.
            caches: from `make_streaming_caches`; the transformer's new entries are left pending.
            sample_text: `sample_text(logits [B * n, text_card_out]) -> tokens [B * n]`.
            sample_audio: `sample_audio(step, logits [B * n, card], sequence [B * n, step + 1]) -> tokens [B * n]`
                (see `MoshiDepformer.generate_frame`).

        Returns:
            [`MoshiSystemStepOutput`].
        """
        B, n, K = inputs.shape
        x = self.embed(inputs.reshape(B * n, K, 1)).view(B, n, -1)
        hidden = self.out_norm(self.transformer(x, positions[:, None].expand(B, n), cache=caches.transformer))
        text = sample_text(self.text_linear(hidden).reshape(B * n, -1))
        depformer_cache = caches.depformer if n == 1 else caches.speculative_depformer
        audio, _ = self.depformer.generate_frame(hidden.reshape(B * n, -1), text, depformer_cache, sample_audio)
        return MoshiSystemStepOutput(hidden=hidden, text=text.view(B, n), audio=audio.view(B, n, -1),
                                     pending=caches.transformer.take_pending())

    def user_step(
        self,
        hidden: torch.Tensor,
        text: torch.Tensor,
        caches: MoshiStreamingCaches,
        sample: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The user Depformer on one frame: run after `system_step`, so it adds nothing to the critical path.

        Args:
            hidden: `[B, dim]` the committed `system_step` hidden state of every slot.
            text: `[B]` the committed text token.
            caches: from `make_streaming_caches`.
            sample: as `sample_audio` of `system_step`, over the user codebooks (it sees the calibrated logits).

        Returns:
            tokens `[B, user_dep_q]` and logits `[B, user_dep_q, card]` (calibrated by
            `config.user_logit_temperature` when set).
        """
        if self.user_depformer is None:
            raise ValueError("user_step: the model has no user branch (predict_user_audio=False)")
        temperature = self.config.user_logit_temperature
        if temperature is None:
            return self.user_depformer.generate_frame(hidden, text, caches.user_depformer, sample)

        def sample_calibrated(step: int, logits: torch.Tensor, sequence: torch.Tensor) -> torch.Tensor:
            return sample(step, logits / temperature[step], sequence)

        tokens, logits = self.user_depformer.generate_frame(hidden, text, caches.user_depformer, sample_calibrated)
        return tokens, self._calibrate_user_logits(logits, codebook_dim=1)

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
        state_dict = _read_checkpoint(checkpoint)
        if dtype is None:
            dtype = next((t.dtype for t in state_dict.values() if t.is_floating_point()), torch.float32)
        with torch.device("meta"):
            model = cls(config).to(dtype)
        model.load_moshi_state_dict(state_dict, device=device)
        if model.user_depformer is not None:
            model.user_depformer.to_empty(device=device)
            model.init_user_branch(user_init)
        return model.eval()

    def load_moshi_state_dict(self, state_dict: Mapping[str, torch.Tensor], device: str | torch.device | None = None) -> None:
        """Load moshi `LMModel` weights (released fused layout or moshi-finetune's) into the shared part.

        Tensors are cast to the model's dtype; parameters still on the meta device are assigned (no copy).

        Raises:
            ValueError: listing every missing, unexpected or mis-shaped key.
        """
        params = dict(self.named_parameters())
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

    @torch.no_grad()
    def init_user_branch(self, method: str = "copy_system") -> list[str]:
        """(Re)initialise the user Depformer: `"random"` (moshi's scheme) or `"copy_system"`.

        `"copy_system"` copies, for every user codebook step k, the weights the system Depformer uses at step k
        (its weight set, input projection, embedding, norm and head) wherever the shapes match, and leaves the
        rest randomly initialised.

        Returns:
            The user-branch parameter names that were not copied (all of them for `"random"`).
        """
        if self.user_depformer is None:
            raise ValueError("init_user_branch: the model has no user branch (predict_user_audio=False)")
        if method not in USER_INITS:
            raise ValueError(f"init_user_branch: method={method!r} must be one of {USER_INITS}")
        for param in self.user_depformer.parameters():
            param._is_hf_initialized = False
        self.user_depformer.apply(self._init_weights)
        user_params = dict(self.user_depformer.named_parameters())
        if method == "random":
            return sorted(user_params)
        system_params = dict(self.depformer.named_parameters())
        not_copied = []
        for name, param in user_params.items():
            source = system_params.get(self._system_counterpart(name))
            if source is not None and source.shape == param.shape:
                param.copy_(source)
            else:
                not_copied.append(name)
        if not_copied:
            logger.warning(f"copy_system: {len(not_copied)} user-branch tensors kept their random init "
                           f"(no system counterpart of the same shape): {not_copied}")
        return not_copied

    def _system_counterpart(self, name: str) -> str | None:
        """Name of the system-Depformer tensor that plays the role of user-Depformer tensor `name`, if any."""
        c = self.config
        if match := re.match(r"in_projs\.(\d+)\.(.+)", name):
            step = int(match[1])
            return f"in_projs.{self.depformer.in_proj_index(step)}.{match[2]}" if step < c.dep_q else None
        if match := re.match(r"(transformer\.layers\.\d+\.)(self_attn\.in_projs|self_attn\.out_projs|gating)\.(\d+)\.(.+)",
                             name):
            prefix, module, step, rest = match.groups()
            if int(step) >= c.dep_q:
                return None
            index = c.depformer_weight_set(int(step))
            if index is None:
                return f"{prefix}gating.{rest}" if module == "gating" else f"{prefix}{module}.0.{rest}"
            return f"{prefix}{module}.{index}.{rest}"
        if match := re.match(r"(transformer\.layers\.\d+\.)gating\.(linear_in|linear_out)\.(.+)", name):
            index = c.depformer_weight_set(0)
            return name if index is None else f"{match[1]}gating.{index}.{match[2]}.{match[3]}"
        return name


def _read_checkpoint(checkpoint: str | os.PathLike | Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    if isinstance(checkpoint, Mapping):
        return checkpoint
    path = os.fspath(checkpoint)
    if not path.endswith(".safetensors"):
        raise ValueError(f"moshi checkpoint {path!r}: expected a .safetensors file or a state dict")
    if not os.path.isfile(path):
        raise ValueError(f"moshi checkpoint {path!r} does not exist")
    return load_state_dict(path)


__all__ = [
    "MoshiStreamingCaches",
    "MoshiSystemStepOutput",
    "MoshiUserPredForConditionalGeneration",
    "MoshiUserPredOutput",
    "MoshiUserPredPreTrainedModel",
    "masked_cross_entropy",
    "shift_time",
]
