"""Audio in and out of the model's world: reading audio files at a rate (whole, or lazily block by block), loading
the Mimi codec and the text tokenizer. Everything that touches soundfile, soxr, sentencepiece or
`MimiModel.from_pretrained` goes through here, with one clear `ValueError` per bad input.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import sentencepiece
import soundfile
import soxr
import torch
from transformers import MimiModel

from ..models.configuration_moshi_userpred import FRAME_RATE
from ..utils.errors import error_summary
from ..utils.files import MIMI_FOLDER


def load_mimi(name_or_path: str | os.PathLike | MimiModel, device: str | torch.device = "cpu") -> MimiModel:
    """Loads a Transformers Mimi codec (e.g. `"kyutai/mimi"` or a local folder), in eval mode on `device`.

    A `MimiModel` instance is moved to `device` and put in eval mode.

    A local folder must hold a Mimi codec (`config.json` with model_type "mimi") whose weights match it exactly: no
    missing, unexpected or mis-shaped tensor, so a wrong folder never encodes with a randomly initialised codec.

    Raises:
        ValueError: if `name_or_path` cannot be loaded as a `MimiModel`, naming the folder and what it holds instead.
    """
    if isinstance(name_or_path, MimiModel):
        mimi = name_or_path
    elif isinstance(name_or_path, (str, os.PathLike)):
        mimi = _load_mimi_checked(os.fspath(name_or_path))
    else:
        raise ValueError(f"mimi must be a MimiModel, a local path or a Hub repo id, got {type(name_or_path).__name__}")
    return mimi.to(device).eval()


def _mimi_folder_problem(folder: Path) -> str | None:
    """None when `folder` holds a Transformers Mimi codec, else what it holds instead."""
    config_file = folder / "config.json"
    if not config_file.is_file():
        if (folder / MIMI_FOLDER / "config.json").is_file():
            return f"it has no config.json but a {MIMI_FOLDER}/ folder: pass {str(folder / MIMI_FOLDER)!r}"
        return "it has no config.json (a Transformers Mimi folder, e.g. a download of kyutai/mimi, has one)"
    try:
        model_type = json.loads(config_file.read_text(encoding="utf-8")).get("model_type")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError) as error:
        return f"its config.json is not a JSON object ({error})"
    if model_type != "mimi":
        if model_type == "moshi_userpred":
            where = (f": its codec is in {str(folder / MIMI_FOLDER)!r}" if (folder / MIMI_FOLDER).is_dir() else "")
            return f"it is a hf_moshi_userpred model directory, not a Mimi codec{where}"
        if model_type is None and "moshi_name" in json.loads(config_file.read_text(encoding="utf-8")):
            return ("it is a kyutai moshi checkpoint (kyutai's Mimi is in its own format): use the Transformers "
                    "Mimi, e.g. kyutai/mimi")
        return f"its config.json has model_type={model_type!r}, expected 'mimi'"
    return None


def _load_mimi_checked(name: str) -> MimiModel:
    """`MimiModel.from_pretrained(name)`, refusing anything but a complete Mimi codec (see `load_mimi`)."""
    from safetensors import SafetensorError

    folder = Path(name)
    if folder.is_dir():
        problem = _mimi_folder_problem(folder)
        if problem is not None:
            raise ValueError(f"{name!r} is not a Mimi codec folder: {problem}")
    elif folder.exists():
        raise ValueError(f"{name!r} is a file, not a Mimi codec folder")
    elif name.startswith((".", "/", "~")) or name.count("/") > 1 or "/" in name and Path(name.split("/")[0]).is_dir():
        raise ValueError(f"Mimi folder {name!r} does not exist")
    try:
        mimi, info = MimiModel.from_pretrained(name, output_loading_info=True)
    except (OSError, ValueError, SafetensorError) as error:
        raise ValueError(f"could not load a Mimi model from {name!r}: {error_summary(error)}") from error
    bad = {kind: sorted(info.get(kind) or []) for kind in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if any(bad.values()):
        counts = ", ".join(f"{len(keys)} {kind.split('_')[0]}" for kind, keys in bad.items() if keys)
        examples = ", ".join(str(key if isinstance(key, str) else key[0]) for keys in bad.values() for key in keys[:2])
        raise ValueError(f"the Mimi weights in {name!r} do not match its config ({counts} tensors, e.g. {examples}): "
                         "refusing to encode with a partly random codec")
    return mimi


def check_mimi(mimi: MimiModel, config) -> None:
    """Mimi must produce the model's vocabulary, enough codebooks for both speakers, at the model's frame rate.

    Raises:
        ValueError: naming the mismatch.
    """
    if mimi.config.codebook_size != config.card:
        raise ValueError(f"this Mimi has codebooks of {mimi.config.codebook_size} entries but the model's audio "
                         f"vocabulary is card={config.card}: it is not the codec the model was trained with")
    needed = max(config.dep_q, config.n_q - config.dep_q)
    if mimi.config.num_quantizers < needed:
        raise ValueError(f"this Mimi has {mimi.config.num_quantizers} codebooks but the model needs {needed} "
                         f"(dep_q={config.dep_q} system, n_q - dep_q={config.n_q - config.dep_q} user)")
    if not math.isclose(mimi.config.frame_rate, FRAME_RATE):
        raise ValueError(f"this Mimi runs at {mimi.config.frame_rate} frames per second; the model streams at "
                         f"{FRAME_RATE}")


def load_tokenizer(
    tokenizer: str | os.PathLike | sentencepiece.SentencePieceProcessor,
) -> sentencepiece.SentencePieceProcessor:
    """The sentencepiece model at `tokenizer` (a processor is returned as it is).

    Raises:
        ValueError: the file is missing or is not a sentencepiece model.
    """
    if isinstance(tokenizer, sentencepiece.SentencePieceProcessor):
        return tokenizer
    try:
        return sentencepiece.SentencePieceProcessor(model_file=str(tokenizer))
    except (RuntimeError, OSError) as error:  # sentencepiece's errors for a missing or unparsable model
        raise ValueError(f"could not load a sentencepiece model from {str(tokenizer)!r}: {error}") from error


def padding_ids(config) -> tuple[int, int]:
    """The text stream's padding and end-of-padding ids: what the model writes between words."""
    return config.existing_text_padding_id, config.existing_text_end_padding_id


def check_tokenizer(tokenizer: sentencepiece.SentencePieceProcessor, config) -> None:
    """The tokenizer must have a piece for every token of the model's text vocabulary.

    Raises:
        ValueError: naming both sizes.
    """
    if tokenizer.get_piece_size() < config.text_card_out:
        raise ValueError(f"the tokenizer has {tokenizer.get_piece_size()} pieces but the model's text vocabulary has "
                         f"{config.text_card_out} tokens: it is not the model's tokenizer")


def text_piece(tokenizer: sentencepiece.SentencePieceProcessor, token: int, config) -> str:
    """What moshi's server sends for a text token: the piece with "▁" as a space, nothing for padding."""
    if token in padding_ids(config):
        return ""
    return tokenizer.id_to_piece(token).replace("▁", " ")


def load_stereo(path: str | os.PathLike, sampling_rate: int) -> torch.FloatTensor:
    """Reads a stereo audio file (any format and sample type soundfile reads) at `sampling_rate`.

    Args:
        path: the audio file (wav, flac, ...).
        sampling_rate (`int`): the rate to return; the file is resampled (soxr) when it has another one.

    Returns:
        `torch.FloatTensor` of shape `[2, num_samples]`, values in [-1, 1]: row 0 the left channel (system),
        row 1 the right channel (user).

    Raises:
        ValueError: if the file cannot be read, is not stereo, is empty or holds a NaN or infinite sample.
    """
    sound = _open_audio(path)
    if sound.channels != 2:
        raise ValueError(
            f"{path} has {sound.channels} channel(s): moshi-finetune dialogues are stereo, the system (Moshi) on the "
            "left channel and the user on the right"
        )
    return torch.from_numpy(np.concatenate(list(_blocks(sound, path, sampling_rate, [0, 1]))).T.copy())


def load_mono(path: str | os.PathLike, sampling_rate: int, channel: int | None = None) -> torch.FloatTensor:
    """Reads a mono audio file, or one channel of a multi-channel file, at `sampling_rate`.

    Args:
        path: the audio file (wav, flac, ...; any format and sample type soundfile reads).
        sampling_rate (`int`): the rate to return; the file is resampled (soxr) when it has another one.
        channel (`int`, *optional*): the channel to take (0 is the left one); needed when the file has several.

    Returns:
        `torch.FloatTensor` of shape `[num_samples]`, values in [-1, 1]: the concatenation of
        [`read_mono_blocks`]'s blocks.

    Raises:
        ValueError: as [`read_mono_blocks`].
    """
    blocks, _ = read_mono_blocks(path, sampling_rate, channel)
    return torch.from_numpy(np.concatenate(list(blocks)))


def read_mono_blocks(
    path: str | os.PathLike, sampling_rate: int, channel: int | None = None
) -> tuple[Iterator[np.ndarray], float]:
    """[`load_mono`], lazily: the file is read (and resampled) one block of about a second at a time, as the
    blocks are consumed, so that a caller needing only the start of a long recording reads only that.

    The file, its channels and `channel` are checked at once; each block is checked for NaN and infinite samples
    as it is read. Resampling carries the resampler's state from block to block (soxr's stream), so the blocks
    join into exactly the samples of a one-shot resampling of the whole file.

    Returns:
        The blocks (float32 `[n]` arrays at `sampling_rate`; a few may be empty while the resampler fills up) and
        the recording's duration in seconds.

    Raises:
        ValueError: if the file cannot be read or is empty, if it has several channels and `channel` is None, or if
            `channel` is not one of its channels; while iterating, at the first block holding a NaN or infinite
            sample (naming its time).
    """
    sound = _open_audio(path)
    if channel is None:
        if sound.channels != 1:
            raise ValueError(
                f"{path} has {sound.channels} channels: pick one with channel=0..{sound.channels - 1} (in a "
                "moshi-finetune dialogue the user is channel 1, the right one)"
            )
        channel = 0
    if not isinstance(channel, int) or not 0 <= channel < sound.channels:
        raise ValueError(f"channel={channel!r} but {path} has {sound.channels} channel(s) (0..{sound.channels - 1})")
    blocks = (block[:, 0] for block in _blocks(sound, path, sampling_rate, [channel]))
    return blocks, sound.frames / sound.samplerate


def check_finite(samples: np.ndarray, name: str | os.PathLike, sampling_rate: int, start: int = 0) -> None:
    """Refuses audio holding a NaN or infinite sample (Mimi would turn every frame after it into noise).

    Args:
        samples: `[num_samples]` or `[num_samples, channels]`, samples `start...` of the recording `name`.
        sampling_rate (`int`): the samples' rate, to say where the first bad one is.

    Raises:
        ValueError: naming `name`, the first bad sample and its time in seconds.
    """
    rows = samples if samples.ndim == 2 else samples[:, None]  # [num_samples, channels]
    bad = ~np.isfinite(rows)
    if bad.any():
        index = int(bad.any(axis=1).argmax())
        value = rows[index, bad[index]][0]
        kind = "NaN" if np.isnan(value) else f"{value:+}"
        raise ValueError(f"{name} has a non-finite sample ({kind}) at {(start + index) / sampling_rate:.3f} s: "
                         "audio samples must be finite")


def check_audio_file(path: str | os.PathLike) -> Path:
    """`path` as a Path if it is a non-empty regular file, else a ValueError saying what it is instead."""
    path = Path(path)
    problem = ("no such file" if not path.exists() else "it is a directory" if path.is_dir()
               else "it is not a regular file" if not path.is_file()  # a device such as /dev/null, a pipe
               else "it is empty (0 bytes)" if path.stat().st_size == 0 else None)
    if problem is not None:
        raise ValueError(f"cannot read audio file {path}: {problem}")
    return path


def _open_audio(path: str | os.PathLike) -> soundfile.SoundFile:
    """The file opened for reading, with at least one sample.

    Raises:
        ValueError: if it is not a non-empty regular file soundfile can read, or holds no samples.
    """
    check_audio_file(path)
    try:
        sound = soundfile.SoundFile(path)
    except (soundfile.SoundFileError, RuntimeError) as error:
        raise ValueError(f"cannot read audio file {path}: {error}") from error
    if sound.frames == 0:
        sound.close()
        raise ValueError(f"{path} has no samples")
    return sound


def _blocks(sound: soundfile.SoundFile, path: str | os.PathLike, sampling_rate: int,
            channels: list[int]) -> Iterator[np.ndarray]:
    """`channels` of `sound`, read a second at a time and resampled to `sampling_rate`: float32
    `[n, len(channels)]` blocks, each checked for non-finite samples before it is resampled. Closes `sound`."""
    with sound:
        resampler = None
        if sound.samplerate != sampling_rate:
            resampler = soxr.ResampleStream(sound.samplerate, sampling_rate, len(channels), dtype="float32")
        start = 0
        for block in sound.blocks(sound.samplerate, dtype="float32", always_2d=True):
            block = block[:, channels]  # a copy: the other channels are not kept
            check_finite(block, path, sound.samplerate, start)
            start += len(block)
            yield block if resampler is None else resampler.resample_chunk(block)
        if resampler is not None:  # the samples still in the resampler's filter
            yield resampler.resample_chunk(np.zeros((0, len(channels)), np.float32), last=True)


__all__ = [
    "FRAME_RATE", "check_audio_file", "check_finite", "check_mimi", "load_mimi", "load_mono", "load_stereo",
    "load_tokenizer", "padding_ids", "read_mono_blocks", "text_piece",
]
