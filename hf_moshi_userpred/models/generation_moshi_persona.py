"""Persona prompts, PersonaPlex's procedure: the frames a conversation starts from, and their one-call prefill.

A persona prompt gives the agent a voice and a role before the user speaks. Its frames, in order:

1. the voice prompt: the voice sample's Mimi codes in the agent's audio rows, text padding;
2. `silence_frames` (6) of silence: the agent's silence codes, text padding;
3. the role text `<system> ... <system>`, one text token per frame (agent silence);
4. `silence_frames` (6) of silence.

The user's rows hold a sine tone's codes throughout, the input PersonaPlex was trained with (a constant, audible
"nobody is talking" that is not Mimi's digital silence). Frame by frame through the streaming step is the reference;
`prefill_persona_prompt` runs the main transformer over all the prompt's positions in one call instead, and the
result (`MoshiPromptState`: keys and values, token ring, text history) is what a session copies into every slot that
starts with the same prompt (keyed by a digest of its codes), so a popular prompt costs one prefill, not one per
conversation.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .modeling_moshi_codes import UNGENERATED_TOKEN_ID

PROMPT_SILENCE_FRAMES = 6
SYSTEM_TAG = "<system>"


def role_text(text: str) -> str:
    """The role text as PersonaPlex's model reads it: `<system> {text} <system>` (tokenize the whole string)."""
    return f"{SYSTEM_TAG} {text.strip()} {SYSTEM_TAG}"


@dataclass
class MoshiPersonaPrompt:
    r"""The prefix of a conversation, in the training layout (`forward`'s codes, un-delayed).

    Args:
        codes (`torch.LongTensor` `[1 + n_q, P]`): text, agent audio and user audio rows of the `P` prompt frames.
    """

    codes: torch.Tensor

    @property
    def num_frames(self) -> int:
        return self.codes.shape[1]

    @classmethod
    def build(
        cls,
        config,
        *,
        silence_codes: torch.Tensor,
        user_codes: torch.Tensor,
        role_tokens: Sequence[int] | None = None,
        voice_codes: torch.Tensor | None = None,
        silence_frames: int = PROMPT_SILENCE_FRAMES,
    ) -> "MoshiPersonaPrompt":
        """PersonaPlex's prefix from its parts (see the module docstring).

        Args:
            config: the model's [`MoshiUserPredConfig`].
            silence_codes (`torch.LongTensor` `[dep_q]`): the agent's codes of a silent frame.
            user_codes (`torch.LongTensor` `[n_q - dep_q]`): the user's codes of a frame of the sine tone.
            role_tokens: the tokens of `role_text(text)`, one per frame; None or empty: no role.
            voice_codes (`torch.LongTensor` `[dep_q, F]`): the voice sample's Mimi codes; None: no voice prompt.
            silence_frames: frames of silence after the voice and after the role.

        Raises:
            ValueError: naming the part with a wrong shape or an out-of-vocabulary value.
        """
        dep_q, user_rows = config.dep_q, config.n_q - config.dep_q
        silence_codes = _check(silence_codes, (dep_q,), config.card, "silence_codes")
        user_codes = _check(user_codes, (user_rows,), config.card, "user_codes")
        if silence_frames < 0:
            raise ValueError(f"silence_frames={silence_frames}: must be >= 0")
        role = torch.tensor(list(role_tokens or []), dtype=torch.long)
        if role.numel() and (int(role.min()) < 0 or int(role.max()) >= config.text_card):
            bad = next(int(t) for t in role if not 0 <= int(t) < config.text_card)
            raise ValueError(f"role token {bad} is outside the text vocabulary (text_card={config.text_card})")
        voice = torch.zeros(dep_q, 0, dtype=torch.long) if voice_codes is None else voice_codes
        if voice.dim() != 2 or voice.shape[0] != dep_q:
            raise ValueError(f"voice_codes has shape {tuple(voice.shape)}: expected [dep_q={dep_q}, frames]")
        voice = _check(voice, tuple(voice.shape), config.card, "voice_codes")
        padding = config.existing_text_padding_id
        parts = []  # (text [n], agent [dep_q, n])
        parts.append((torch.full((voice.shape[1],), padding), voice))
        silence = silence_codes[:, None].expand(-1, silence_frames)
        parts.append((torch.full((silence_frames,), padding), silence))
        parts.append((role, silence_codes[:, None].expand(-1, role.numel())))
        parts.append((torch.full((silence_frames,), padding), silence))
        text = torch.cat([t for t, _ in parts])
        agent = torch.cat([a for _, a in parts], dim=1)
        user = user_codes[:, None].expand(-1, text.numel())
        return cls(torch.cat([text[None], agent, user]))


def _check(codes: torch.Tensor, shape: tuple, card: int, name: str) -> torch.Tensor:
    if not isinstance(codes, torch.Tensor) or codes.dtype.is_floating_point or tuple(codes.shape) != shape:
        got = tuple(codes.shape) if isinstance(codes, torch.Tensor) else type(codes).__name__
        raise ValueError(f"{name} must be an integer tensor of shape {list(shape)}, got {got}")
    codes = codes.long().cpu()
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= card):
        raise ValueError(f"{name} holds a code outside 0..{card - 1} (min {int(codes.min())}, max {int(codes.max())})")
    return codes


@dataclass
class MoshiPromptState:
    """What a session holds for a slot after a prompt, computed once per prompt and copied into any slot.

    Args:
        kv: per main-transformer layer, the keys and values `[1, kv_heads, P, head_dim]` of positions `0..P-1`.
        ring (`torch.LongTensor` `[1 + n_q, ring]`): the session's token ring after the prompt.
        text_history (`torch.LongTensor` `[history]`): the last text tokens (the repetition penalties' history).
        num_frames: `P`, the offset the slot continues from.
    """

    kv: list[tuple[torch.Tensor, torch.Tensor]]
    ring: torch.Tensor
    text_history: torch.Tensor
    num_frames: int

    def nbytes(self) -> int:
        return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in self.kv)


def prompt_key(codes: torch.Tensor) -> str:
    """A session's prompt-cache key: a digest of the prompt's codes (equal codes, one prefill)."""
    codes = codes.detach().long().cpu().contiguous()
    return hashlib.sha1(str(tuple(codes.shape)).encode() + codes.numpy().tobytes()).hexdigest()


@torch.no_grad()
def prefill_persona_prompt(model, prompt: MoshiPersonaPrompt, ring_size: int, history: int) -> MoshiPromptState:
    """The prompt's prefill for one slot: the main transformer over its `P` positions in one call (the keys and values
    feeding the positions one at a time gives), and the token ring and text history a session holds after it.

    The inputs follow the streaming alignment (docs/design.md §2): position `s` reads frame `s - 1 - delay` of every
    row, the initial token before a row starts. The prompt's last user frame is never read: the microphone's first
    frame takes its place, as streaming user frame `f` plays training frame `f - 1`.
    """
    c = model.config
    codes = prompt.codes.to(model.device)
    P = codes.shape[1]
    delays = torch.tensor(c.delays, device=codes.device)
    initial = torch.tensor(model.initial_tokens(), device=codes.device)
    source = torch.arange(P, device=codes.device)[None] - 1 - delays[:, None]  # [K, P] the frame each position reads
    inputs = torch.where(source >= 0, codes.gather(1, source.clamp(min=0)), initial[:, None])
    kv = model.prefill_prompt(inputs)
    # The ring after P steps: step o wrote the system rows' tokens of position o + 1 (frame o - delay) into cell
    # (o + 1) % ring, and the user rows' frame o - 1 (the streaming alignment) into cell (o + delay) % ring.
    ring = torch.full((c.num_codebooks, ring_size), UNGENERATED_TOKEN_ID, device=codes.device)
    system, user = slice(0, 1 + c.dep_q), torch.arange(1 + c.dep_q, c.num_codebooks, device=codes.device)
    for o in range(max(0, P - ring_size - max(c.delays) - 1), P):
        frames = (o - delays).clamp(min=0)
        ring[system, (o + 1) % ring_size] = codes[system].gather(1, frames[system, None])[:, 0]
        ring[user, (o + delays[user]) % ring_size] = codes[user, max(o - 1, 0)]
    text = codes[0, max(0, P - history):]
    text_history = torch.cat([text.new_full((history - text.numel(),), c.existing_text_padding_id), text])
    return MoshiPromptState(kv, ring, text_history, P)


__all__ = ["MoshiPersonaPrompt", "MoshiPromptState", "PROMPT_SILENCE_FRAMES", "SYSTEM_TAG", "prefill_persona_prompt",
           "prompt_key", "role_text"]
