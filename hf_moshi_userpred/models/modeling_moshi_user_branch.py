"""Which parameters are the user branch, and how it starts: a mixin of [`MoshiUserPredForConditionalGeneration`].

The user branch is the user Depformer (`config.user_depformer="separate"`) or, in the multistream layout
(`"shared"`), the system Depformer's per-step modules of the user steps; the voice-activity head belongs to it too.
`user_branch_prefixes` names its parameters (what `training_mode="user_branch"` trains), `init_user_branch`
initialises it (moshi's random scheme, or a copy of the system Depformer's step by step), and `system_counterpart`
maps each of its tensors to the system tensor that plays its role (the copy, and `convert`'s copied-steps report).
"""

from __future__ import annotations

import re

import torch
from transformers.utils import logging

from .configuration_moshi_userpred import USER_INITS

logger = logging.get_logger(__name__)


class MoshiUserBranchMixin:
    """The user branch's parameter names and initialisation (mixed into the model, which has `config`,
    `depformer`, `user_depformer`, `voice_activity_head` and `_init_weights`)."""

    @property
    def user_branch_prefixes(self) -> tuple[str, ...]:
        """Names (prefixes) of the user branch's parameters: the user Depformer, or a shared Depformer's per-step
        modules of the user steps, and the voice-activity head. What `training_mode="user_branch"` trains, and
        `copy_system` initialises.

        Raises:
            ValueError: a shared user branch without per-step weights (its steps share the system's transformer
                weights, so it has no parameters of its own to train alone).
        """
        c = self.config
        if not c.predict_user_audio:
            return ()
        head = ("voice_activity_head.",) if self.voice_activity_head is not None else ()
        if c.user_depformer == "separate":
            return ("user_depformer.", *head)
        if not (c.depformer_weights_per_step and c.depformer_multi_linear):
            raise ValueError("a shared user Depformer has parameters of its own only with depformer_weights_per_step "
                             "and depformer_multi_linear (its steps share the system's weights otherwise)")
        user_sets = {c.depformer_weight_set(k) for k in range(c.dep_q, c.depformer_steps)}
        if user_sets & {c.depformer_weight_set(k) for k in range(c.dep_q)}:
            raise ValueError(f"depformer_weights_per_step_schedule={c.depformer_weights_per_step_schedule} shares "
                             f"weight sets between the system and the user steps")
        return (*(prefix for k in range(c.dep_q, c.depformer_steps) for prefix in self.depformer_step_prefixes(k)),
                *head)

    def depformer_step_prefixes(self, step: int) -> tuple[str, ...]:
        """Names (prefixes) of the system Depformer's modules of codebook step `step` alone (with weights per step
        and one input projection per step): its head, norm, input embedding, input projection, and its weight set
        in every layer."""
        c = self.config
        index = c.depformer_weight_set(step)
        return (f"depformer.heads.{step}.", f"depformer.norms.{step}.", f"depformer.emb.{step - 1}.",
                f"depformer.in_projs.{self.depformer.in_proj_index(step)}.",
                *(f"depformer.transformer.layers.{layer}.{module}.{index}." for layer in range(c.depformer_num_layers)
                  for module in ("self_attn.in_projs", "self_attn.out_projs", "gating")))

    @torch.no_grad()
    def init_user_branch(self, method: str = "copy_system") -> list[str]:
        """(Re)initialise the user branch's Depformer part: `"random"` (moshi's scheme) or `"copy_system"`.

        `"copy_system"` copies, for every user codebook step k, the weights the system Depformer uses at step k
        (its weight set, input projection, embedding, norm and head) wherever the shapes match, and leaves the
        rest randomly initialised. With a shared Depformer, user step `dep_q + k` gets system step k's modules
        (PersonaPlex's loader can do the same); the embedding of step `dep_q`'s input, the system's last codebook,
        has no counterpart (the system's step 0 reads text).

        Returns:
            The user-branch parameter names (the model's) that were not copied (all of them for `"random"`).
        """
        if not self.config.predict_user_audio:
            raise ValueError("init_user_branch: the model has no user branch (predict_user_audio=False)")
        if method not in USER_INITS:
            raise ValueError(f"init_user_branch: method={method!r} must be one of {USER_INITS}")
        prefixes = tuple(prefix for prefix in self.user_branch_prefixes if prefix != "voice_activity_head.")
        user_params = {name: param for name, param in self.named_parameters() if name.startswith(prefixes)}
        for param in user_params.values():
            param._is_hf_initialized = False
        for name, module in self.named_modules():
            if f"{name}.".startswith(prefixes):
                self._init_weights(module)
        if method == "random":
            return sorted(user_params)
        params = dict(self.named_parameters())
        not_copied = []
        for name, param in user_params.items():
            source = params.get(self.system_counterpart(name))
            if source is not None and source.shape == param.shape:
                param.copy_(source)
            else:
                not_copied.append(name)
        if not_copied:
            logger.warning(f"copy_system: {len(not_copied)} user-branch tensors kept their random init "
                           f"(no system counterpart of the same shape): {not_copied}")
        return not_copied

    def system_counterpart(self, name: str) -> str | None:
        """Name of the system-Depformer parameter that plays the role of the user-branch parameter `name` (both the
        model's names, e.g. `user_depformer.heads.0.weight` -> `depformer.heads.0.weight`, or in a shared Depformer
        `depformer.heads.8.weight` -> `depformer.heads.0.weight`), if any."""
        c = self.config
        if c.user_depformer == "shared":
            return self._shared_counterpart(name)
        if not name.startswith("user_depformer."):
            return None
        name = name.removeprefix("user_depformer.")
        if match := re.match(r"in_projs\.(\d+)\.(.+)", name):
            step = int(match[1])
            return f"depformer.in_projs.{self.depformer.in_proj_index(step)}.{match[2]}" if step < c.dep_q else None
        if match := re.match(r"(transformer\.layers\.\d+\.)(self_attn\.in_projs|self_attn\.out_projs|gating)\.(\d+)\.(.+)",
                             name):
            prefix, module, step, rest = match.groups()
            if int(step) >= c.dep_q:
                return None
            index = c.depformer_weight_set(int(step))
            if index is None:
                return f"depformer.{prefix}gating.{rest}" if module == "gating" else f"depformer.{prefix}{module}.0.{rest}"
            return f"depformer.{prefix}{module}.{index}.{rest}"
        if match := re.match(r"(transformer\.layers\.\d+\.)gating\.(linear_in|linear_out)\.(.+)", name):
            index = c.depformer_weight_set(0)
            return f"depformer.{name}" if index is None else f"depformer.{match[1]}gating.{index}.{match[2]}.{match[3]}"
        return f"depformer.{name}"

    def _shared_counterpart(self, name: str) -> str | None:
        """`system_counterpart` in a shared Depformer: user step `dep_q + k`'s module -> system step k's."""
        c = self.config
        user_steps = range(c.dep_q, c.depformer_steps)
        if match := re.match(r"depformer\.(heads|norms)\.(\d+)\.(.+)", name):
            return f"depformer.{match[1]}.{int(match[2]) - c.dep_q}.{match[3]}"
        if match := re.match(r"depformer\.emb\.(\d+)\.(.+)", name):
            step = int(match[1]) + 1 - c.dep_q  # emb[i] is the input of step i + 1
            return f"depformer.emb.{step - 1}.{match[2]}" if step >= 1 else None
        if match := re.match(r"depformer\.in_projs\.(\d+)\.(.+)", name):
            step = next(k for k in user_steps if self.depformer.in_proj_index(k) == int(match[1]))
            return f"depformer.in_projs.{self.depformer.in_proj_index(step - c.dep_q)}.{match[2]}"
        if match := re.match(r"(depformer\.transformer\.layers\.\d+\.(?:self_attn\.in_projs|self_attn\.out_projs|gating))"
                             r"\.(\d+)\.(.+)", name):
            step = next(k for k in user_steps if c.depformer_weight_set(k) == int(match[2]))
            return f"{match[1]}.{c.depformer_weight_set(step - c.dep_q)}.{match[3]}"
        return None


__all__ = ["MoshiUserBranchMixin"]
