"""Encoding moshi-finetune dialogues: the text row, Mimi codes per channel, resumable shards, bad files, the dataset."""

from __future__ import annotations

import io
import json
import math
import os
import random
import re

import numpy as np
import pytest
import sentencepiece
import soundfile
import soxr
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import MimiConfig, MimiModel
from transformers.testing_utils import CaptureLogger

from hf_moshi_userpred.data import encoding
from hf_moshi_userpred.data.audio import load_mimi, load_stereo
from hf_moshi_userpred.data.encoding import EncodedDialogues, encode_dataset
from hf_moshi_userpred.data.text_alignment import interleave_text, place_words

RATE = 24_000
NUM_CODEBOOKS = 3  # of the tiny Mimi's 4: encoding must truncate the residual stack
WORDS = "hello world this is a small test of the moshi text stream with extraordinary words".split()
MAIN, USER = "SPEAKER_MAIN", "SPEAKER_USER"
# a tiny Mimi is many small convolutions: intra-op threads only add synchronisation (2x faster with one)
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def mimi():
    """A tiny random Mimi whose codebooks are random (a fresh one has all-zero codebooks: every code would be 0)."""
    torch.manual_seed(0)
    config = MimiConfig(
        hidden_size=32, num_filters=4, num_residual_layers=1, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, head_dim=16, intermediate_size=64, codebook_dim=16,
        vector_quantization_hidden_dimension=16, upsample_groups=32, codebook_size=32, num_quantizers=4,
        num_semantic_quantizers=1,
    )  # fmt: skip
    model = MimiModel(config).eval()
    generator = torch.Generator().manual_seed(0)
    for name, buffer in model.named_buffers():
        if name.endswith("embed_sum"):
            buffer.copy_(torch.randn(buffer.shape, generator=generator))
    return model


@pytest.fixture(scope="module")
def tokenizer():
    rng = random.Random(0)
    sentences = [" ".join(rng.choice(WORDS) for _ in range(8)) for _ in range(200)]
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=model, vocab_size=32, unk_id=0, bos_id=1, eos_id=2, pad_id=3,
        minloglevel=2,
    )  # fmt: skip
    return sentencepiece.SentencePieceProcessor(model_proto=model.getvalue())


def stereo(seconds: float, rate: int = RATE, seed: int = 0) -> np.ndarray:
    """`[N, 2]` float32: a tone plus noise on the left (system), other noise on the right (user)."""
    rng = np.random.default_rng(seed)
    t = np.arange(round(seconds * rate)) / rate
    left = 0.3 * np.sin(2 * np.pi * (220 + 40 * seed) * t) + 0.05 * rng.standard_normal(t.size)
    right = 0.2 * rng.standard_normal(t.size)
    return np.stack([left, right], axis=1).astype(np.float32)


ALIGNMENTS = [
    ["hello", [0.05, 0.3], MAIN],
    ["moshi", [0.1, 0.4], USER],
    ["world", [0.41, 0.6], MAIN],
    ["test", [0.45, 0.5], MAIN],  # starts in the frame of "world": shifted
    ["xyz", [0.6, 0.7], MAIN],  # several tokens
    ["this", [0.7, 0.8], USER],
]


def write_dialogue(folder, name, audio=None, alignments=ALIGNMENTS, rate=RATE, subtype="FLOAT"):
    """Writes `name.wav` (float samples, so they read back exactly; + `name.json` unless `alignments` is None);
    returns the manifest line."""
    audio = stereo(1.0) if audio is None else audio
    soundfile.write(folder / f"{name}.wav", audio, rate, subtype=subtype)
    if alignments is not None:
        (folder / f"{name}.json").write_text(json.dumps({"alignments": alignments}))
    return json.dumps({"path": f"{name}.wav", "duration": len(audio) / rate})


def write_manifest(folder, lines):
    (folder / "data.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "data.jsonl"


def encode(manifest, output_dir, mimi, tokenizer, **kwargs):
    kwargs = {"num_codebooks": NUM_CODEBOOKS, "progress": False, **kwargs}
    return encode_dataset(manifest, output_dir, mimi=mimi, tokenizer=tokenizer, **kwargs)


def read_shard(output_dir, source):
    index = json.loads((output_dir / "index.json").read_text())
    (shard,) = [s for s in index["shards"] if s["source"] == source]
    path = output_dir / shard["file"]
    with safe_open(path, "pt") as file:
        metadata = file.metadata()
    return load_file(path)["codes"], metadata


def leftovers(folder):
    return [p.name for p in folder.rglob("*") if p.name.endswith(".tmp")]


# ---------------------------------------------------------------------------------------------------- text row


class WordTokenizer:
    """Known token ids per word, so placements can be written out by hand."""

    ids = {"hello": [10], "world": [11, 12], "a": [13], "late": [14, 15, 16]}

    def encode(self, text):
        return self.ids.get(text, [])


def test_interleave_text_places_main_speaker_words_on_the_grid():
    alignments = [
        ["hello", [0.8, 0.9], MAIN],  # out of order: sorted by start
        [" hello ", [0.0, 0.3], MAIN],  # stripped; frame 0 has no frame before it to mark
        ["late", [0.1, 0.5], USER],  # the user's words are not in the text row
        ["world", [0.41, 0.6], MAIN],  # floor(0.41 * 12.5) = 5: end-of-padding at 4
        ["a", [0.45, 0.45], MAIN],  # frame 5 is taken: goes to 7, right after "world"; zero duration is kept
        ["", [0.5, 0.6], MAIN],  # no tokens
    ]
    text = interleave_text(alignments, WordTokenizer(), 13, padding_id=3, end_padding_id=0)
    assert text.dtype == torch.long
    assert text.tolist() == [10, 3, 3, 3, 0, 11, 12, 13, 3, 0, 10, 3, 3]
    # other ids and speaker label, and a word that exactly fills the last frames
    alignments = [["late", [0.8, 0.9], "A"], ["hello", [0.0, 0.1], "B"]]
    text = interleave_text(alignments, WordTokenizer(), 13, main_speaker="A", padding_id=7, end_padding_id=8)
    assert text.tolist() == [7] * 9 + [8, 14, 15, 16]
    assert interleave_text([], WordTokenizer(), 4).tolist() == [3, 3, 3, 3]


def moshi_finetune_stream(alignments, tokenizer, num_frames, frame_rate, padding_id, end_padding_id):
    """moshi-finetune's frame loop (`Interleaver.build_token_stream`, keep_main_only and keep_and_shift): at each
    frame, queue the tokens of the words started before the frame ends, emit one, mark a padding frame before it."""
    words = sorted((a for a in alignments if a[2] == MAIN), key=lambda a: a[1][0])
    text, queue, i = [padding_id] * num_frames, [], 0
    for t in range(num_frames):
        while i < len(words) and words[i][1][0] * frame_rate < t + 1:
            queue += tokenizer.encode(words[i][0].strip())
            i += 1
        if queue:
            if t > 0 and text[t - 1] == padding_id:
                text[t - 1] = end_padding_id
            text[t] = queue.pop(0)
    return text


def test_interleave_text_matches_moshi_finetune_frame_loop(tokenizer):
    rng = random.Random(0)
    for _ in range(50):
        alignments = []
        for _ in range(rng.randrange(12)):  # many words in 32 frames, up to 14 tokens each: lots of collisions
            start = rng.uniform(0, 2.5)
            word, speaker = rng.choice(WORDS + ["xyz"]), rng.choice([MAIN, USER])
            alignments.append([word, [start, start + rng.uniform(0.01, 0.5)], speaker])
        expected = moshi_finetune_stream(alignments, tokenizer, 200, 12.5, 3, 0)
        assert interleave_text(alignments, tokenizer, 200).tolist() == expected


def test_words_that_do_not_fit_at_the_end_are_truncated_or_dropped_and_counted():
    # "late" (3 tokens) from frame 10 of 12: its first two tokens are kept; "a" has no frame left.
    alignments = [["hello", [0.1, 0.2], MAIN], ["late", [0.85, 0.9], MAIN], ["a", [0.9, 0.95], MAIN]]
    placed = place_words(alignments, WordTokenizer(), 12)
    assert placed.tokens.tolist() == [0, 10, 3, 3, 3, 3, 3, 3, 3, 0, 14, 15]
    assert placed.num_words == 3 and placed.dropped == ["a"] and placed.truncated == ["late"]
    # Pushed back by the previous word (the collision that cannot shift any further): truncated, not refused.
    placed = place_words([["world", [0.0, 0.1], MAIN], ["late", [0.0, 0.1], MAIN]], WordTokenizer(), 4)
    assert placed.tokens.tolist() == [11, 12, 14, 15] and placed.truncated == ["late"] and not placed.dropped
    # interleave_text keeps the dialogue while few enough words are lost.
    many = [[w, [0.08 * i, 0.08 * i + 0.05], MAIN] for i, w in enumerate(["hello", "a"] * 5)]
    text = interleave_text([*many, ["late", [0.85, 0.9], MAIN]], WordTokenizer(), 12, max_dropped_fraction=0.1)
    assert text[-2:].tolist() == [14, 15]


def test_interleave_text_refuses_unusable_text():
    alignments = [["hello", [0.1, 0.2], MAIN], ["late", [0.85, 0.9], MAIN], ["a", [0.9, 0.95], MAIN]]
    with pytest.raises(ValueError, match=r"1 dropped and 1 truncated of 3 words \('a', 'late'\) do not fit in the "
                                         r"dialogue's 12 frames .*max_dropped_fraction=0.5"):
        interleave_text(alignments, WordTokenizer(), 12, max_dropped_fraction=0.5)
    assert interleave_text(alignments, WordTokenizer(), 12, max_dropped_fraction=1.0)[-1] == 15
    for bad in (-0.1, 1.5, "0.1", True):
        with pytest.raises(ValueError, match=rf"max_dropped_fraction={bad!r}"):
            interleave_text(alignments, WordTokenizer(), 12, max_dropped_fraction=bad)


@pytest.mark.parametrize(
    "entry, message",
    [
        (["hello", [0.1, 0.2]], r"expected \[word, \[start, end\], speaker\]"),
        ("hello", r"expected \[word"),
        ([3, [0.1, 0.2], MAIN], r"the word must be a string, got int"),
        (["hello", [0.1, 0.2], None], r"the speaker must be a string, got NoneType"),
        (["hello", 0.1, MAIN], r"the times must be \[start, end\]"),
        (["hello", [0.1, "0.2"], MAIN], r"start and end must be numbers"),
        (["hello", [True, 0.2], MAIN], r"start and end must be numbers"),
        (["hello", [0.1, math.inf], MAIN], r"must be finite"),
        (["hello", [math.nan, 0.2], MAIN], r"must be finite"),
        (["hello", [-0.1, 0.2], MAIN], r"start must be non-negative"),
        (["hello", [0.3, 0.2], MAIN], r"start is after end"),
    ],
)
def test_interleave_text_rejects_malformed_alignments(entry, message):
    alignments = [["hello", [0.0, 0.1], MAIN], entry]
    with pytest.raises(ValueError, match=r"alignment entry 1 .*" + message):
        interleave_text(alignments, WordTokenizer(), 20)


def test_interleave_text_rejects_a_non_list():
    with pytest.raises(ValueError, match=r"alignments must be a list .* got dict"):
        interleave_text({"hello": [0, 1]}, WordTokenizer(), 20)


# ------------------------------------------------------------------------------------------------------ audio


def test_load_stereo_reads_int_and_float_files_and_resamples(tmp_path):
    audio = stereo(0.5, rate=16_000)
    soundfile.write(tmp_path / "int.wav", audio, 16_000, subtype="PCM_16")
    soundfile.write(tmp_path / "float.flac", audio, 16_000)
    for name in ("int.wav", "float.flac"):
        loaded = load_stereo(tmp_path / name, 16_000)
        assert loaded.dtype == torch.float32 and loaded.shape == (2, 8000)
        torch.testing.assert_close(loaded, torch.from_numpy(audio.T.copy()), atol=1e-4, rtol=0)
    resampled = load_stereo(tmp_path / "int.wav", RATE)
    assert resampled.shape == (2, 12_000)
    expected = soxr.resample(soundfile.read(tmp_path / "int.wav", dtype="float32")[0], 16_000, RATE)
    torch.testing.assert_close(resampled, torch.from_numpy(expected.T.copy()))


@pytest.mark.parametrize(
    "audio, message",
    [
        (np.zeros(100, np.float32), r"has 1 channel\(s\): moshi-finetune dialogues are stereo, the system .* left"),
        (np.zeros((100, 3), np.float32), r"has 3 channel\(s\)"),
        (np.zeros((0, 2), np.float32), r"has no samples"),
    ],
)
def test_load_stereo_rejects_bad_audio(tmp_path, audio, message):
    soundfile.write(tmp_path / "a.wav", audio, RATE)
    with pytest.raises(ValueError, match=message):
        load_stereo(tmp_path / "a.wav", RATE)


def test_load_stereo_reports_soundfile_reason(tmp_path):
    (tmp_path / "a.wav").write_bytes(b"RIFF not really a wav file")
    with pytest.raises(ValueError, match=r"cannot read audio file .*a\.wav: .*Format not recognised"):
        load_stereo(tmp_path / "a.wav", RATE)


def test_load_mimi(tmp_path, mimi):
    assert load_mimi(mimi) is mimi and not mimi.training
    with pytest.raises(ValueError, match=r"Mimi folder '.*no-such-mimi' does not exist"):
        load_mimi(str(tmp_path / "no-such-mimi"))
    with pytest.raises(ValueError, match=r"mimi must be a MimiModel, a local path or a Hub repo id, got int"):
        load_mimi(3)


# --------------------------------------------------------------------------------------------------- dataset


def test_encode_dataset_codes_are_text_then_system_then_user(tmp_path, mimi, tokenizer):
    audios = {"a": stereo(1.0, seed=1), "b": stereo(1.5, seed=2)}
    manifest = write_manifest(tmp_path, [write_dialogue(tmp_path, name, audio) for name, audio in audios.items()])
    summary = encode(manifest, tmp_path / "out", mimi, tokenizer)
    assert summary.encoded == ["a.wav", "b.wav"] and not summary.skipped and not summary.failed

    for name, audio in audios.items():
        codes, metadata = read_shard(tmp_path / "out", f"{name}.wav")
        num_frames = math.ceil(len(audio) / 1920)  # Mimi pads the last frame
        assert codes.dtype == torch.int32 and codes.shape == (1 + 2 * NUM_CODEBOOKS, num_frames)
        with torch.no_grad():
            for channel, rows in ((0, slice(1, 1 + NUM_CODEBOOKS)), (1, slice(1 + NUM_CODEBOOKS, None))):
                signal = torch.from_numpy(audio[:, channel].copy())[None, None]
                expected = mimi.encode(signal, num_quantizers=NUM_CODEBOOKS).audio_codes[0]
                assert torch.equal(codes[rows].long(), expected)
        assert not torch.equal(codes[1], codes[1 + NUM_CODEBOOKS])  # the channels were not mixed up or merged
        assert len(codes[1:].unique()) > 5  # informative codes, not the zero codebooks of a fresh Mimi
        assert torch.equal(codes[0].long(), interleave_text(ALIGNMENTS, tokenizer, num_frames))
        assert metadata["source"] == f"{name}.wav" and metadata["num_frames"] == str(num_frames)
        assert float(metadata["duration"]) == pytest.approx(len(audio) / RATE)
        assert metadata["num_codebooks"] == str(NUM_CODEBOOKS) and metadata["text_padding_id"] == "3"
        assert metadata["audio_size"] == str(os.path.getsize(tmp_path / f"{name}.wav"))

    # the text row by hand: only SPEAKER_MAIN's words, each from its start frame
    hello, world, test, xyz = (tokenizer.encode(w) for w in ("hello", "world", "test", "xyz"))
    assert len(hello) == len(world) == len(test) == 1 and len(xyz) > 1
    text = [3] * 13
    text[0] = hello[0]  # 0.05 s: frame 0
    text[4:6] = [0, world[0]]  # 0.41 s: frame 5, the padding frame before it marks the end of padding
    text[6] = test[0]  # 0.45 s is frame 5 too, taken: the next free frame
    text[7 : 7 + len(xyz)] = xyz  # 0.6 s: frame 7, right after "test": no padding to mark
    codes, _ = read_shard(tmp_path / "out", "a.wav")
    assert codes[0].tolist() == text

    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert index["num_codebooks"] == NUM_CODEBOOKS and index["failed"] == {}
    assert [(s["source"], s["num_frames"]) for s in index["shards"]] == [("a.wav", 13), ("b.wav", 19)]
    assert not leftovers(tmp_path)
    assert "encoded 2, skipped 0 already encoded, failed 0" in str(summary)


def test_encode_dataset_resamples_other_rates(tmp_path, mimi, tokenizer):
    lines = [
        write_dialogue(tmp_path, "rate24k", stereo(1.0, rate=RATE), rate=RATE),
        write_dialogue(tmp_path, "rate16k", stereo(1.0, rate=16_000), rate=16_000, subtype="PCM_16"),
    ]
    summary = encode(write_manifest(tmp_path, lines), tmp_path / "out", mimi, tokenizer)
    assert summary.encoded == ["rate24k.wav", "rate16k.wav"]
    codes_24k, _ = read_shard(tmp_path / "out", "rate24k.wav")
    codes_16k, metadata = read_shard(tmp_path / "out", "rate16k.wav")
    assert codes_16k.shape == codes_24k.shape == (7, 13) and float(metadata["duration"]) == pytest.approx(1.0)
    with torch.no_grad():
        expected = mimi.encode(load_stereo(tmp_path / "rate16k.wav", RATE)[:, None], num_quantizers=3).audio_codes
    assert torch.equal(codes_16k[1:4].long(), expected[0]) and torch.equal(codes_16k[4:].long(), expected[1])


def test_encode_dataset_resumes(tmp_path, mimi, tokenizer):
    lines = [write_dialogue(tmp_path, name, stereo(1.0, seed=i)) for i, name in enumerate("abc")]
    manifest = write_manifest(tmp_path, lines)
    output_dir = tmp_path / "out"
    assert encode(manifest, output_dir, mimi, tokenizer).encoded == ["a.wav", "b.wav", "c.wav"]
    shards = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in (output_dir / "codes").iterdir()}
    before = {name: read_shard(output_dir, f"{name}.wav")[0] for name in "abc"}

    # same inputs: nothing to do, shards untouched (a saved copy of the same Mimi, loaded by path, matches too)
    mimi.save_pretrained(tmp_path / "mimi")
    summary = encode(manifest, output_dir, str(tmp_path / "mimi"), tokenizer)
    assert summary.skipped == ["a.wav", "b.wav", "c.wav"] and not summary.encoded
    assert "encoded 0, skipped 3 already encoded, failed 0" in str(summary)
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in (output_dir / "codes").iterdir()} == shards

    # a changed wav and a changed alignment are re-encoded
    write_dialogue(tmp_path, "a", stereo(1.0, seed=7))
    (tmp_path / "b.json").write_text(json.dumps({"alignments": [["hello", [0.5, 0.6], MAIN]]}))
    summary = encode(manifest, output_dir, mimi, tokenizer)
    assert summary.encoded == ["a.wav", "b.wav"] and summary.skipped == ["c.wav"]
    assert not torch.equal(read_shard(output_dir, "a.wav")[0], before["a"])
    assert torch.equal(read_shard(output_dir, "b.wav")[0][1:], before["b"][1:])  # same audio, new text
    assert read_shard(output_dir, "b.wav")[0][0].tolist() == [3] * 5 + [0, tokenizer.encode("hello")[0]] + [3] * 6
    assert torch.equal(read_shard(output_dir, "c.wav")[0], before["c"])

    # a damaged shard is re-encoded; another encoder setting re-encodes everything
    next((output_dir / "codes").iterdir()).write_bytes(b"not a shard")
    assert len(encode(manifest, output_dir, mimi, tokenizer).encoded) == 1
    assert encode(manifest, output_dir, mimi, tokenizer, text_padding_id=5).encoded == ["a.wav", "b.wav", "c.wav"]
    assert not leftovers(tmp_path)


def test_encode_dataset_writes_atomically(tmp_path, mimi, tokenizer, monkeypatch):
    manifest = write_manifest(tmp_path, [write_dialogue(tmp_path, "a"), write_dialogue(tmp_path, "b")])
    encode(manifest, tmp_path / "out", mimi, tokenizer)
    shards = {p.name: p.read_bytes() for p in (tmp_path / "out" / "codes").iterdir()}
    write_dialogue(tmp_path, "a", stereo(1.0, seed=5))  # a.wav must be re-encoded

    def full_disk(tensors, path, metadata):
        with open(path, "wb") as file:
            file.write(b"partial")
        raise OSError("No space left on device")

    monkeypatch.setattr(encoding, "save_file", full_disk)
    with pytest.raises(OSError, match="No space left"):  # not a problem of one file: stops the run
        encode(manifest, tmp_path / "out", mimi, tokenizer)
    assert {p.name: p.read_bytes() for p in (tmp_path / "out" / "codes").iterdir()} == shards
    assert not leftovers(tmp_path)


def test_encode_dataset_reports_bad_files_and_encodes_the_good_ones(tmp_path, mimi, tokenizer):
    lines = [
        write_dialogue(tmp_path, "good", stereo(1.0)),
        write_dialogue(tmp_path, "mono", stereo(1.0)[:, 0]),
        write_dialogue(tmp_path, "nojson", alignments=None),
        write_dialogue(tmp_path, "badjson"),
        write_dialogue(tmp_path, "noalign"),
        write_dialogue(tmp_path, "badentry", alignments=[["hello", [0.5, 0.2], MAIN]]),
        write_dialogue(tmp_path, "empty", np.zeros((0, 2), np.float32)),
        write_dialogue(tmp_path, "corrupt"),
        write_dialogue(tmp_path, "nofit", alignments=[["xyz", [0.99, 1.0], MAIN]]),
        json.dumps({"path": "missing.wav", "duration": 1.0}),
        '{"path": "good.wav", "duration": 1.0',  # line 11: not JSON
        json.dumps({"duration": 1.0}),  # line 12
        json.dumps({"path": "./good.wav", "duration": 1.0}),  # line 13: the same file again
        "",  # blank lines are fine
    ]
    (tmp_path / "badjson.json").write_text('{"alignments": [["hello", [0.1, 0.2], "SPEAKER_MAIN"]')
    (tmp_path / "noalign.json").write_text('{"words": []}')
    (tmp_path / "corrupt.wav").write_bytes(b"RIFF" + bytes(100))
    manifest = write_manifest(tmp_path, lines)
    with CaptureLogger(encoding.logger) as captured:
        summary = encode(manifest, tmp_path / "out", mimi, tokenizer, progress=True)

    assert summary.encoded == ["good.wav"] and not summary.skipped
    expected = {
        "mono.wav": r"has 1 channel\(s\): moshi-finetune dialogues are stereo",
        "nojson.wav": r"alignment file .*nojson\.json not found",
        "badjson.wav": r"alignment file .*badjson\.json is not valid JSON",
        "noalign.wav": r'noalign\.json has no "alignments" list',
        "badentry.wav": r"badentry\.json: alignment entry 0 .*start is after end",
        "empty.wav": r"empty\.wav has no samples",
        "corrupt.wav": r"cannot read audio file .*corrupt\.wav",
        "nofit.wav": r"nofit\.json: 0 dropped and 1 truncated of 1 words \('xyz'\) do not fit",
        "missing.wav": r"audio file .*missing\.wav not found",
        "data.jsonl:11": r"line 11 of .*data\.jsonl: not valid JSON",
        "data.jsonl:12": r'line 12 of .*data\.jsonl: expected \{"path"',
        "data.jsonl:13": r"good\.wav is already listed on line 1",
    }
    assert sorted(summary.failed) == sorted(expected)
    for source, pattern in expected.items():
        assert re.search(pattern, summary.failed[source]), (source, summary.failed[source])
    assert "encoded 1, skipped 0 already encoded, failed 12: mono.wav (" in captured.out

    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert [s["source"] for s in index["shards"]] == ["good.wav"] and index["failed"] == summary.failed
    assert [p.name for p in (tmp_path / "out" / "codes").iterdir()] == [index["shards"][0]["file"][len("codes/"):]]
    assert not leftovers(tmp_path)


def test_encode_refuses_a_dialogue_without_words_of_the_main_speaker(tmp_path, mimi, tokenizer):
    """A mistyped --main-speaker, alignments labelled otherwise and blank words would encode an all-padding text row:
    each file fails naming the labels it has, and a run in which every file fails raises with the first reason."""
    lines = [write_dialogue(tmp_path, "good"),
             write_dialogue(tmp_path, "ab", alignments=[["hi", [0.1, 0.2], "A"], ["yo", [0.3, 0.4], "B"]]),
             write_dialogue(tmp_path, "blank", alignments=[["", [0.1, 0.2], MAIN], [" ", [0.3, 0.4], MAIN]]),
             write_dialogue(tmp_path, "none", alignments=[])]
    summary = encode(write_manifest(tmp_path, lines), tmp_path / "out", mimi, tokenizer)
    assert summary.encoded == ["good.wav"] and sorted(summary.failed) == ["ab.wav", "blank.wav", "none.wav"]
    assert summary.failed["ab.wav"].endswith(f"no words of the main speaker {MAIN!r} (--main-speaker); its speakers "
                                             "are A, B")
    assert summary.failed["blank.wav"].endswith(f"every word of the main speaker {MAIN!r} is blank")
    assert summary.failed["none.wav"].endswith("it has no words at all")

    encode(write_manifest(tmp_path, lines[:1]), tmp_path / "out", mimi, tokenizer)  # an up-to-date shard: checked too
    with pytest.raises(ValueError, match=r"no dialogue of .*data\.jsonl could be encoded: good\.wav: alignment "
                                         r"file .*good\.json: no words of the main speaker 'SPEAKER_MIAN' "
                                         r"\(--main-speaker\); its speakers are SPEAKER_MAIN, SPEAKER_USER$"):
        encode(tmp_path / "data.jsonl", tmp_path / "out", mimi, tokenizer, main_speaker="SPEAKER_MIAN")
    assert json.loads((tmp_path / "out" / "index.json").read_text())["shards"] == []  # index.json says why
    with pytest.raises(ValueError, match=r"could be encoded: ab\.wav: .* \(and 2 more, reasons in .*index\.json\)$"):
        encode(write_manifest(tmp_path, lines[1:]), tmp_path / "out", mimi, tokenizer)


def test_encode_keeps_a_dialogue_whose_last_word_does_not_fit_and_counts_it(tmp_path, mimi, tokenizer):
    """A 1 s dialogue (13 frames) whose last word starts in its last frame: truncated, the dialogue kept; the count
    is in index.json, in the shard (a rerun reports it too) and in the summary line."""
    words = [["hello", [0.05 * i, 0.05 * i + 0.04], MAIN] for i in range(10)] + [["xyz", [0.99, 1.0], MAIN]]
    manifest = write_manifest(tmp_path, [write_dialogue(tmp_path, "long", alignments=words),
                                         write_dialogue(tmp_path, "fine")])
    summary = encode(manifest, tmp_path / "out", mimi, tokenizer)
    assert summary.encoded == ["long.wav", "fine.wav"] and not summary.failed
    assert summary.lost_words == {"long.wav": (0, 1)}
    assert "; 0 word(s) dropped and 1 truncated at the end of 1 file(s)" in str(summary)
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    long, fine = index["shards"]
    assert long["words"] == 11 and long["dropped_words"] == [] and long["truncated_words"] == ["xyz"]
    assert fine["dropped_words"] == fine["truncated_words"] == []
    codes, _ = read_shard(tmp_path / "out", "long.wav")
    assert codes[0, -1].item() == tokenizer.encode("xyz")[0]  # the first token of the truncated word is kept

    rerun = encode(manifest, tmp_path / "out", mimi, tokenizer)
    assert rerun.skipped == ["long.wav", "fine.wav"] and rerun.lost_words == summary.lost_words
    strict = encode(manifest, tmp_path / "out", mimi, tokenizer, max_dropped_fraction=0.0)
    assert sorted(strict.failed) == ["long.wav"] and "max_dropped_fraction=0" in strict.failed["long.wav"]
    with pytest.raises(ValueError, match=r"max_dropped_fraction=2"):
        encode(manifest, tmp_path / "out", mimi, tokenizer, max_dropped_fraction=2)


def test_encode_dataset_global_errors(tmp_path, mimi, tokenizer):
    manifest = write_manifest(tmp_path, [write_dialogue(tmp_path, "a")])
    with pytest.raises(ValueError, match=r"num_codebooks=5 but this Mimi has 4 codebooks"):
        encode(manifest, tmp_path / "out", mimi, tokenizer, num_codebooks=5)
    with pytest.raises(ValueError, match=r"cannot read the manifest .*nothing\.jsonl"):
        encode(tmp_path / "nothing.jsonl", tmp_path / "out", mimi, tokenizer)
    with pytest.raises(ValueError, match=r"could not load a sentencepiece model from '.*no\.model'"):
        encode(manifest, tmp_path / "out", mimi, str(tmp_path / "no.model"))
    # a tokenizer given by path works
    (tmp_path / "text.model").write_bytes(tokenizer.serialized_model_proto())
    assert encode(manifest, tmp_path / "out", mimi, str(tmp_path / "text.model")).encoded == ["a.wav"]


def test_encoded_dialogues_round_trip(tmp_path, mimi, tokenizer):
    (tmp_path / "sub").mkdir()  # the manifest's "sub/../b.wav" is normalised to "b.wav"
    lines = [write_dialogue(tmp_path, "a", stereo(1.0)), write_dialogue(tmp_path, "b", stereo(2.0, seed=3))]
    lines[1] = json.dumps({"path": "sub/../b.wav", "duration": 2.0})
    output_dir = tmp_path / "out"
    encode(write_manifest(tmp_path, lines), output_dir, mimi, tokenizer)
    dataset = EncodedDialogues(output_dir)
    assert len(dataset) == 2 and dataset.num_rows == 7
    assert dataset.num_frames == [13, 25] and dataset.total_frames == 38
    for item, name in zip(dataset, ["a.wav", "b.wav"]):
        assert item["name"] == name and item["codes"].dtype == torch.long
        assert torch.equal(item["codes"], read_shard(output_dir, name)[0].long())

    (output_dir / "index.json").unlink()  # without the index: every shard in codes/
    assert sorted(item["name"] for item in EncodedDialogues(output_dir)) == ["a.wav", "b.wav"]
    with pytest.raises(ValueError, match=r"no encoded dialogues in"):
        EncodedDialogues(tmp_path / "empty")

    codes = [torch.randint(-1, 32, (7, 5)), torch.randint(-1, 32, (7, 3), dtype=torch.int32)]
    dataset = EncodedDialogues.from_codes(codes, names=["x", "y"])
    assert dataset[1]["name"] == "y" and dataset[1]["codes"].dtype == torch.long
    assert torch.equal(dataset[1]["codes"], codes[1].long()) and dataset.num_frames == [5, 3]
    assert EncodedDialogues.from_codes(codes)[0]["name"] == "codes_list[0]"


@pytest.mark.parametrize("codes, message", [(torch.zeros(40, dtype=torch.int32), r"dtype I32 and shape \[40\]"),
                                            (torch.zeros(9, 40), r"dtype F32 and shape \[9, 40\]"),
                                            (torch.zeros(9, 0, dtype=torch.int32), r"dtype I32 and shape \[9, 0\]")])
def test_encoded_dialogues_refuse_a_shard_of_float_or_not_2d_codes(tmp_path, codes, message):
    """Float codes were truncated by `.long()` (2 % accuracy, no error) and 1-D ones failed as an IndexError."""
    (tmp_path / "codes").mkdir()
    save_file({"codes": codes}, tmp_path / "codes" / "d0.safetensors", metadata={"source": "d0.wav"})
    with pytest.raises(ValueError, match=r"d0\.safetensors holds codes of " + message + r": a shard written by "
                                         r"`encode` holds integer codes \[rows, frames\]"):
        EncodedDialogues(tmp_path)


@pytest.mark.parametrize(
    "codes, names, message",
    [
        ([torch.zeros(7, 5, dtype=torch.long), torch.zeros(7, 5)], None, r"codes_list\[1\] must be an integer tensor, got dtype torch.float32"),
        ([torch.zeros(7, 5, dtype=torch.bool)], None, r"codes_list\[0\] must be an integer tensor, got dtype torch.bool"),
        ([torch.zeros(1, 7, 5, dtype=torch.long)], None, r"codes_list\[0\] must have shape \[K, T\], got \(1, 7, 5\)"),
        ([torch.zeros(7, 5, dtype=torch.long), torch.zeros(5, 5, dtype=torch.long)], None,
         r"codes_list\[1\] has 5 rows \(K\) but codes_list\[0\] has 7"),
        ([torch.zeros(7, 0, dtype=torch.long)], None, r"codes_list\[0\] must have at least one frame"),
        ([torch.full((7, 5), -2)], None, r"codes_list\[0\]\[0, 0\] = -2 is out of range for row 0 .*-1 \(zero token\)"),
        ([[[0]]], None, r"codes_list\[0\] must be an integer tensor \[K, T\], got list"),
        ([], None, r"codes_list is empty"),
        ([torch.zeros(7, 5, dtype=torch.long)], ["a", "b"], r"got 2 names for 1 codes"),
    ],
)
def test_encoded_dialogues_from_codes_validation(codes, names, message):
    with pytest.raises(ValueError, match=message):
        EncodedDialogues.from_codes(codes, names)


# ------------------------------------------------------------------------------------------------ persona prompts
def test_a_dialogues_persona_prompt_is_encoded_beside_it(tmp_path, mimi, tokenizer):
    """`text_prompt` / `voice_prompt` in a dialogue's json become the shard's `prompt` (PersonaPlex's layout, in the
    shard's rows); the dataset hands it to the collator; a bad voice fails that dialogue alone, with the reason."""
    soundfile.write(tmp_path / "voice.wav", stereo(0.5, seed=3)[:, 0], RATE)
    lines = [write_dialogue(tmp_path, name, stereo(1.0, seed=i)) for i, name in enumerate(("prompted", "plain", "bad"))]
    for name, fields in (("prompted", {"text_prompt": "hello world", "voice_prompt": "voice.wav"}),
                         ("bad", {"voice_prompt": "missing.wav"})):
        data = json.loads((tmp_path / f"{name}.json").read_text())
        (tmp_path / f"{name}.json").write_text(json.dumps({**data, **fields}))
    summary = encode(write_manifest(tmp_path, lines), tmp_path / "out", mimi, tokenizer)
    assert sorted(summary.encoded) == ["plain.wav", "prompted.wav"]
    assert "its voice_prompt" in summary.failed["bad.wav"] and "missing.wav" in summary.failed["bad.wav"]
    items = {item["name"]: item for item in EncodedDialogues(tmp_path / "out")}
    assert "prompt" not in items["plain.wav"]
    prompt, codes = items["prompted.wav"]["prompt"], items["prompted.wav"]["codes"]
    role = tokenizer.encode("<system> hello world <system>")
    voice_frames = math.ceil(0.5 * 12.5)
    assert prompt.shape == (codes.shape[0], voice_frames + 12 + len(role))
    assert prompt[0, voice_frames + 6 : voice_frames + 6 + len(role)].tolist() == role
    assert (prompt[0, :voice_frames] == 3).all()  # text padding under the voice
    assert (prompt[1 + NUM_CODEBOOKS :] == prompt[1 + NUM_CODEBOOKS :, :1]).all()  # the user's tone, one frame repeated
    # the prompt is part of the shard's identity: editing the role re-encodes the dialogue
    data = json.loads((tmp_path / "prompted.json").read_text())
    (tmp_path / "prompted.json").write_text(json.dumps({**data, "text_prompt": "a small test"}))
    again = encode(write_manifest(tmp_path, lines[:2]), tmp_path / "out", mimi, tokenizer)
    assert again.encoded == ["prompted.wav"] and again.skipped == ["plain.wav"]
