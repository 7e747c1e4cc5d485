"""Encoding moshi-finetune dialogues into training codes, once, ahead of training.

A moshi-finetune dataset is a `.jsonl` with one `{"path": "dialogue.wav", "duration": seconds}` per line; each wav
is stereo (left channel: the system, Moshi; right channel: the user) and has its word alignments beside it in
`dialogue.json` (which may also give the dialogue a persona prompt: `"text_prompt"`, a role, and `"voice_prompt"`, a
voice file relative to it; encoded as the shard's `prompt`, read by the model before the dialogue and never learnt).
[`encode_dataset`] turns every dialogue into one `codes` tensor `[1 + 2 * num_codebooks, T]` at Mimi's frame rate
(12.5 Hz):

    row 0                                         text of the system speaker (`text_alignment.interleave_text`)
    rows 1 .. num_codebooks                       Mimi codes of the left channel (system)
    rows num_codebooks + 1 .. 2 * num_codebooks   Mimi codes of the right channel (user)

and writes it to `output_dir/codes/*.safetensors`, one shard per dialogue, with `output_dir/index.json` listing
them. [`EncodedDialogues`] reads them back as a `torch.utils.data.Dataset`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from collections.abc import Callable, Sequence
from types import SimpleNamespace
from dataclasses import dataclass, field
from pathlib import Path

import sentencepiece
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from transformers import MimiModel
from transformers.utils import logging

from ..models.modeling_moshi_codes import check_codes
from .persona import PersonaLibrary
from ..utils.files import atomic_write, read_json_object, write_json
from .audio import load_mimi, load_stereo, load_tokenizer
from .text_alignment import (
    DEFAULT_MAX_DROPPED_FRACTION,
    check_main_speaker,
    check_max_dropped_fraction,
    check_usable,
    place_words,
    validate_alignments,
)

logger = logging.get_logger(__name__)

SHARD_FORMAT_VERSION = "1"  # bump when the content of a shard changes for the same inputs: old shards re-encode


@dataclass
class EncodeSummary:
    """What [`encode_dataset`] did. Sources are the manifest's paths; bad manifest lines are `"name.jsonl:LINE"`."""

    encoded: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # source -> reason
    output_dir: Path | None = None
    # source -> (dropped, truncated) words at the end of the dialogue, for the files that lost any
    lost_words: dict[str, tuple[int, int]] = field(default_factory=dict)

    def __str__(self) -> str:
        line = f"encoded {len(self.encoded)}, skipped {len(self.skipped)} already encoded, failed {len(self.failed)}"
        if self.lost_words:
            dropped = sum(d for d, _ in self.lost_words.values())
            truncated = sum(t for _, t in self.lost_words.values())
            line += (f"; {dropped} word(s) dropped and {truncated} truncated at the end of "
                     f"{len(self.lost_words)} file(s) (per file in index.json)")
        if self.failed:
            shown = [f"{source} ({reason})" for source, reason in list(self.failed.items())[:10]]
            more = f"; and {len(self.failed) - 10} more (see index.json)" if len(self.failed) > 10 else ""
            line += ": " + "; ".join(shown) + more
        return f"{line} -> {self.output_dir}"


def encode_dataset(
    manifest: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    mimi: str | os.PathLike | MimiModel,
    tokenizer: str | os.PathLike | sentencepiece.SentencePieceProcessor,
    num_codebooks: int,
    main_speaker: str = "SPEAKER_MAIN",
    text_padding_id: int = 3,
    text_end_padding_id: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
    max_dropped_fraction: float = DEFAULT_MAX_DROPPED_FRACTION,
) -> EncodeSummary:
    """Encodes a moshi-finetune dataset into one `codes` shard per dialogue; resumable.

    Each shard `output_dir/codes/<name>.safetensors` holds `codes` (int32 `[1 + 2 * num_codebooks, T]`, the layout
    of the module docstring) and string metadata: the source path, size and mtime of the audio and of its
    alignment json, the duration, `num_frames`, and a fingerprint of the encoder (Mimi weights and config,
    `num_codebooks`, tokenizer model, speaker, padding ids). A shard whose metadata matches its source and the
    fingerprint is skipped, so an interrupted run continues where it stopped and a changed file is re-encoded.
    Shards and `output_dir/index.json` are written atomically; the sources are only read.

    Words that do not fit before the end of the audio are dropped or truncated (see `text_alignment`), counted per
    file in index.json (`words`, `dropped_words`, `truncated_words`) and in the summary. A file that cannot be
    encoded (not stereo, empty or unreadable audio, missing or malformed alignment json, no word of `main_speaker`,
    more than `max_dropped_fraction` of its words dropped or truncated, a missing file, a malformed manifest line) is
    recorded in the summary and in index.json, and the other files are still encoded; a run in which every file
    fails raises (index.json still records why).

    Args:
        manifest: the `.jsonl`; relative paths in it are relative to its folder.
        output_dir: where `codes/` and `index.json` go (created if needed).
        mimi: a `MimiModel`, a local folder or a Hub repo id.
        tokenizer: a `sentencepiece.SentencePieceProcessor` or the path to its `.model` (moshiko's text tokenizer).
        num_codebooks (`int`): Mimi codebooks per channel (moshiko: 8).
        main_speaker (`str`): speaker label of the system in the alignments.
        text_padding_id, text_end_padding_id (`int`): the LM's text padding and end-of-padding ids (moshiko: 3, 0).
        device: where Mimi runs.
        progress (`bool`): show a progress bar.
        max_dropped_fraction (`float`): the largest fraction of a file's words that may be dropped or truncated
            at its end before the file fails (its alignment then does not match its audio).

    Returns:
        [`EncodeSummary`]: the sources encoded, skipped (already encoded) and failed (with the reason).

    Raises:
        ValueError: if the manifest cannot be read, Mimi, the tokenizer or `num_codebooks` are unusable, or no
            dialogue could be encoded (the message names the first failure).
    """
    manifest = Path(manifest)
    output_dir = Path(output_dir)
    check_max_dropped_fraction(max_dropped_fraction)
    try:  # before loading Mimi: a wrong path fails at once
        lines = manifest.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"cannot read the manifest {manifest}: {error}") from error
    mimi = load_mimi(mimi, device)
    tokenizer = load_tokenizer(tokenizer)
    if not 1 <= num_codebooks <= mimi.config.num_quantizers:
        raise ValueError(
            f"num_codebooks={num_codebooks} but this Mimi has {mimi.config.num_quantizers} codebooks (quantizers)"
        )

    fingerprint = _fingerprint(mimi, tokenizer, num_codebooks, main_speaker, text_padding_id, text_end_padding_id)
    # Persona prompts (a dialogue's `text_prompt` / `voice_prompt`) in the layout written here.
    layout = SimpleNamespace(dep_q=num_codebooks, n_q=2 * num_codebooks, card=mimi.config.codebook_size,
                             text_card=tokenizer.vocab_size(), existing_text_padding_id=text_padding_id)
    personas = functools.cache(lambda: PersonaLibrary(layout, mimi, tokenizer))  # built for the first prompt
    codes_dir = output_dir / "codes"
    codes_dir.mkdir(parents=True, exist_ok=True)
    summary = EncodeSummary(output_dir=output_dir)
    shards = []
    first_line = {}  # source -> manifest line, to catch duplicates
    for number, line in enumerate(logging.tqdm(lines, desc="Encoding dialogues", unit="file", disable=not progress), 1):
        if not line.strip():
            continue
        where = f"{manifest.name}:{number}"
        try:
            source = _manifest_source(line)
        except ValueError as error:
            summary.failed[where] = f"line {number} of {manifest}: {error}"
            continue
        if source in first_line:
            summary.failed[where] = f"{source} is already listed on line {first_line[source]} of {manifest}"
            continue
        first_line[source] = number
        try:
            shard, num_frames, skipped, words = _encode_file(
                manifest.parent / source,
                source,
                codes_dir,
                mimi=mimi,
                tokenizer=tokenizer,
                num_codebooks=num_codebooks,
                fingerprint=fingerprint,
                main_speaker=main_speaker,
                text_padding_id=text_padding_id,
                text_end_padding_id=text_end_padding_id,
                max_dropped_fraction=max_dropped_fraction,
                personas=personas,
            )
        except ValueError as error:
            summary.failed[source] = str(error)
            continue
        (summary.skipped if skipped else summary.encoded).append(source)
        shards.append({"source": source, "file": f"codes/{shard.name}", "num_frames": num_frames, **words})
        if words["dropped_words"] or words["truncated_words"]:
            summary.lost_words[source] = (len(words["dropped_words"]), len(words["truncated_words"]))

    index = {
        "manifest": str(manifest),
        "num_codebooks": num_codebooks,
        "frame_rate": mimi.config.frame_rate,
        "fingerprint": fingerprint,
        "shards": shards,
        "failed": summary.failed,
    }
    write_json(output_dir / "index.json", index)
    if not summary.encoded and not summary.skipped:  # a run that encodes nothing failed: an error, not a summary
        reasons = [f"{source}: {reason}" for source, reason in summary.failed.items()] or ["it lists none"]
        more = f" (and {len(reasons) - 1} more, reasons in {output_dir / 'index.json'})" if len(reasons) > 1 else ""
        raise ValueError(f"no dialogue of {manifest} could be encoded: {reasons[0]}{more}")
    if summary.failed:
        logger.warning(str(summary))
    else:
        logger.info(str(summary))
    return summary


class EncodedDialogues(torch.utils.data.Dataset):
    """Encoded dialogues as a dataset: item i is `{"codes": LongTensor [K, T_i], "name": str}`.

    `EncodedDialogues(output_dir)` reads the shards of [`encode_dataset`] (those listed in `index.json`, or every
    `codes/*.safetensors` without one), loading each on access; `EncodedDialogues.from_codes` wraps codes already in
    memory. `K = 1 + 2 * num_codebooks` is the same for every item.
    """

    def __init__(self, output_dir: str | os.PathLike):
        output_dir = Path(output_dir)
        index = output_dir / "index.json"
        if not output_dir.is_dir():
            raise ValueError(f"no encoded dialogues in {output_dir}: " + (
                "no such directory (run `encode` first)" if not output_dir.exists() else "it is a file, not a directory"))
        if index.is_file():
            shards = read_json_object(index, "encoding index").get("shards")
            if not isinstance(shards, list) or not all(isinstance(s, dict) and isinstance(s.get("file"), str)
                                                       for s in shards):
                raise ValueError(f"{index} is not an index written by `encode`: it needs a list 'shards' of "
                                 "{'file': ...} entries (re-run `encode` into this folder)")
            files = [output_dir / shard["file"] for shard in shards]
        else:
            files = sorted((output_dir / "codes").glob("*.safetensors"))
        if not files:
            raise ValueError(f"no encoded dialogues in {output_dir} (run `encode_dataset` first)")
        names, shapes = [], []
        for file in files:
            try:
                with safe_open(file, "pt") as shard:
                    names.append(shard.metadata()["source"])
                    codes = shard.get_slice("codes")
                    dtype, shape = codes.get_dtype(), codes.get_shape()
            except (OSError, SafetensorError, KeyError, TypeError) as error:  # TypeError: no metadata
                raise ValueError(f"{file} is not a shard written by `encode_dataset`: {error!r}") from error
            # read from the header: float codes would be truncated by `.long()` and 1-D ones fail deep in a batch
            if not dtype.startswith(("I", "U")) or len(shape) != 2 or 0 in shape:
                raise ValueError(f"{file} holds codes of dtype {dtype} and shape {shape}: a shard written by `encode` "
                                 "holds integer codes [rows, frames] with at least one frame (re-run `encode`)")
            shapes.append(shape)
        self._set_items(names, files, shapes)

    @classmethod
    def from_codes(cls, codes_list: Sequence[torch.Tensor], names: Sequence[str] | None = None) -> EncodedDialogues:
        """Wraps pre-encoded codes: a list of integer tensors `[K, T_i]` with the same `K` and `T_i > 0`.

        Raises:
            ValueError: naming the offending item (not an integer tensor, not 2-D, another K, no frames, ids < -1).
        """
        if names is not None and len(names) != len(codes_list):
            raise ValueError(f"got {len(names)} names for {len(codes_list)} codes")
        if not codes_list:
            raise ValueError("codes_list is empty")
        for i, codes in enumerate(codes_list):
            check_codes(codes, name=f"codes_list[{i}]", batched=False)
        dataset = cls.__new__(cls)
        names = list(names) if names is not None else [f"codes_list[{i}]" for i in range(len(codes_list))]
        dataset._set_items(names, [codes.detach().cpu() for codes in codes_list], [codes.shape for codes in codes_list])
        return dataset

    def _set_items(self, names: list[str], items: list[Path | torch.Tensor], shapes: list[Sequence[int]]):
        for name, shape in zip(names, shapes):
            if shape[0] != shapes[0][0]:
                raise ValueError(f"{name} has {shape[0]} rows (K) but {names[0]} has {shapes[0][0]}")
        self._names, self._items = names, items
        self.num_rows = shapes[0][0]
        self.num_frames = [shape[1] for shape in shapes]

    @property
    def total_frames(self) -> int:
        return sum(self.num_frames)

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | str]:
        item = self._items[index]
        tensors = load_file(item) if isinstance(item, Path) else {"codes": item}
        out = {"codes": tensors["codes"].long(), "name": self._names[index]}
        if "prompt" in tensors:  # the dialogue's persona prompt (see the collator)
            out["prompt"] = tensors["prompt"].long()
        return out


def _fingerprint(
    mimi: MimiModel,
    tokenizer: sentencepiece.SentencePieceProcessor,
    num_codebooks: int,
    main_speaker: str,
    text_padding_id: int,
    text_end_padding_id: int,
) -> str:
    """A hash of everything, besides the source files, that the codes depend on."""
    weights = hashlib.sha256()
    for name, tensor in sorted(mimi.state_dict().items()):
        weights.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        weights.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    # the config minus fields that do not change the codes and differ between an instance and its saved copy
    # (the weights' dtype is in their hash)
    ignored = ("_name_or_path", "transformers_version", "architectures", "dtype")
    config = {k: v for k, v in mimi.config.to_dict().items() if k not in ignored}
    parts = {
        "format": SHARD_FORMAT_VERSION,
        "mimi_weights": weights.hexdigest(),
        "mimi_config": hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest(),
        "num_codebooks": num_codebooks,
        "tokenizer": hashlib.sha256(tokenizer.serialized_model_proto()).hexdigest(),
        "main_speaker": main_speaker,
        "text_padding_id": text_padding_id,
        "text_end_padding_id": text_end_padding_id,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _manifest_source(line: str) -> str:
    """The normalised `"path"` of a manifest line."""
    try:
        entry = json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(f"not valid JSON ({error})") from error
    if not isinstance(entry, dict) or not isinstance(entry.get("path"), str) or not entry["path"]:
        raise ValueError(f'expected {{"path": "file.wav", "duration": seconds}}, got {line.strip()!r}')
    return os.path.normpath(entry["path"])


def _shard_name(source: str) -> str:
    """A file name unique to `source`: readable, plus a hash so that `a/b_c.wav` and `a_b/c.wav` differ."""
    readable = re.sub(r"[^A-Za-z0-9.-]+", "_", os.path.splitext(source)[0]).strip("._")[-80:]
    return f"{readable}-{hashlib.sha256(source.encode()).hexdigest()[:12]}.safetensors"


def _encode_file(
    audio_path: Path,
    source: str,
    codes_dir: Path,
    *,
    mimi: MimiModel,
    tokenizer: sentencepiece.SentencePieceProcessor,
    num_codebooks: int,
    fingerprint: str,
    main_speaker: str,
    text_padding_id: int,
    text_end_padding_id: int,
    max_dropped_fraction: float,
    personas: Callable[[], PersonaLibrary],
) -> tuple[Path, int, bool, dict]:
    """Encodes one dialogue unless an up-to-date shard exists. A `text_prompt` / `voice_prompt` (a WAV or `.npy` path
    relative to the json) in its alignment json becomes the shard's `prompt` codes (`PersonaLibrary.prompt`).

    Returns:
        (shard, num_frames, skipped, words): `words` is `{"words": int, "dropped_words": [str], "truncated_words":
        [str]}`, the main speaker's words and those that did not fit (kept in the shard's metadata for reruns).
    """
    alignment_path = audio_path.with_suffix(".json")
    if not audio_path.is_file():
        raise ValueError(f"audio file {audio_path} not found")
    if not alignment_path.is_file():
        raise ValueError(f"alignment file {alignment_path} not found (moshi-finetune keeps it beside the audio)")
    audio_stat, alignment_stat = audio_path.stat(), alignment_path.stat()
    identity = {
        "source": source,
        "audio_size": str(audio_stat.st_size),
        "audio_mtime_ns": str(audio_stat.st_mtime_ns),
        "alignment_size": str(alignment_stat.st_size),
        "alignment_mtime_ns": str(alignment_stat.st_mtime_ns),
        "fingerprint": fingerprint,
    }
    try:
        data = json.loads(alignment_path.read_text(encoding="utf-8"))
    except OSError as error:
        raise ValueError(f"cannot read alignment file {alignment_path}: {error}") from error
    except ValueError as error:  # JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"alignment file {alignment_path} is not valid JSON: {error}") from error
    if not isinstance(data, dict) or "alignments" not in data:
        raise ValueError(f'alignment file {alignment_path} has no "alignments" list')
    try:
        alignments = validate_alignments(data["alignments"])
        check_main_speaker(alignments, main_speaker)  # before the up-to-date test: such a shard is no good either
    except ValueError as error:
        raise ValueError(f"alignment file {alignment_path}: {error}") from error

    text_prompt, voice_prompt = data.get("text_prompt"), data.get("voice_prompt")
    for field_name, value in (("text_prompt", text_prompt), ("voice_prompt", voice_prompt)):
        if value is not None and not isinstance(value, str):
            raise ValueError(f"alignment file {alignment_path}: {field_name} must be a string, got {value!r}")
    voice_path = alignment_path.parent / voice_prompt if voice_prompt else None
    if voice_path is not None:
        if not voice_path.is_file():
            raise ValueError(f"alignment file {alignment_path}: its voice_prompt {voice_path} is not a file")
        identity.update(voice_size=str(voice_path.stat().st_size), voice_mtime_ns=str(voice_path.stat().st_mtime_ns))
    if text_prompt:
        identity["text_prompt"] = text_prompt

    shard = codes_dir / _shard_name(source)
    existing = _read_metadata(shard)
    if existing is not None and all(existing.get(key) == value for key, value in identity.items()):
        words = json.loads(existing.get("words", "{}"))  # shards written before word counts: nothing was lost
        words = {"words": words.get("words"), "dropped_words": words.get("dropped_words", []),
                 "truncated_words": words.get("truncated_words", [])}
        if len(words["dropped_words"]) + len(words["truncated_words"]) > max_dropped_fraction * (words["words"] or 0):
            raise ValueError(f"{source}: {len(words['dropped_words'])} dropped and {len(words['truncated_words'])} "
                             f"truncated of {words['words']} words, more than max_dropped_fraction="
                             f"{max_dropped_fraction:g}")
        return shard, int(existing["num_frames"]), True, words

    audio = load_stereo(audio_path, mimi.config.sampling_rate)
    with torch.no_grad():  # the two channels as a batch of two mono signals: [2, 1, N] -> [2, num_codebooks, T]
        audio_codes = mimi.encode(audio[:, None].to(mimi.device, mimi.dtype), num_quantizers=num_codebooks).audio_codes
    num_frames = audio_codes.shape[-1]
    placed = place_words(alignments, tokenizer, num_frames, frame_rate=mimi.config.frame_rate,
                         main_speaker=main_speaker, padding_id=text_padding_id, end_padding_id=text_end_padding_id)
    try:
        check_usable(placed, num_frames, mimi.config.frame_rate, max_dropped_fraction)
    except ValueError as error:
        raise ValueError(f"alignment file {alignment_path}: {error}") from error
    words = {"words": placed.num_words, "dropped_words": placed.dropped, "truncated_words": placed.truncated}
    codes = torch.cat([placed.tokens[None], audio_codes[0].cpu(), audio_codes[1].cpu()]).to(torch.int32)
    tensors = {"codes": codes}
    if text_prompt or voice_path is not None:
        try:
            prompt = personas().prompt(text_prompt, voice_path)
        except ValueError as error:
            raise ValueError(f"alignment file {alignment_path}: {error}") from error
        if prompt is not None:
            tensors["prompt"] = prompt.codes.to(torch.int32)
    metadata = {
        **identity,
        "duration": f"{audio.shape[-1] / mimi.config.sampling_rate:.6f}",
        "num_frames": str(num_frames),
        "num_codebooks": str(num_codebooks),
        "mimi": str(mimi.name_or_path),
        "text_padding_id": str(text_padding_id),
        "text_end_padding_id": str(text_end_padding_id),
        "words": json.dumps(words),
    }
    atomic_write(shard, lambda path: save_file(tensors, path, metadata=metadata))
    return shard, num_frames, False, words


def _read_metadata(shard: Path) -> dict[str, str] | None:
    """The metadata of an existing shard; None when there is none or it cannot be read (it is then re-encoded)."""
    if not shard.is_file():
        return None
    try:
        with safe_open(shard, "pt") as file:
            return file.metadata()
    except (OSError, SafetensorError):
        return None


__all__ = ["EncodeSummary", "EncodedDialogues", "encode_dataset"]
