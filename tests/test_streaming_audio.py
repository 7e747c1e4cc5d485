"""Streaming a user recording (the `stream` command): lossless tokens, the files written, pacing, bad inputs."""

from __future__ import annotations

import json
import re
import math
import time

import numpy as np
import pytest
import sentencepiece
import soundfile
import soxr
import torch

from helpers import GREEDY
from hf_moshi_userpred import MoshiUserPredConfig, MoshiUserPredForConditionalGeneration
from hf_moshi_userpred.data.audio import load_mimi, load_mono, load_stereo
from hf_moshi_userpred.serving.audio_limiter import AudioLimiter
from hf_moshi_userpred.sample import SAMPLE_DIR
from hf_moshi_userpred.sample import sample_model_config as sample_config
from hf_moshi_userpred.serving.stream_recording import stream_user_audio

pytestmark = pytest.mark.usefixtures("one_thread")
RATE = 24_000  # the sample Mimi's
SAMPLES_PER_FRAME = 1920  # 24 kHz / 12.5 Hz
FILE_RATE = 22_050  # the user's recording: another rate, resampled on reading
PADDING = (3, 0)  # the text padding and end-of-padding ids


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return MoshiUserPredForConditionalGeneration(sample_config(dim=32, num_layers=1)).eval()


@pytest.fixture(scope="module")
def mimi():
    return load_mimi(SAMPLE_DIR / "mimi")


@pytest.fixture(scope="module")
def tokenizer():
    return sentencepiece.SentencePieceProcessor(model_file=str(SAMPLE_DIR / "tokenizer.model"))


@pytest.fixture(scope="module")
def user_wav(tmp_path_factory):
    """The first 3 s of a sample dialogue's user (right channel), as a mono wav at 22.05 kHz."""
    audio, rate = soundfile.read(SAMPLE_DIR / "dialogues" / "000.flac", dtype="float32")
    path = tmp_path_factory.mktemp("audio") / "user.wav"
    soundfile.write(path, soxr.resample(audio[: 3 * rate, 1], rate, FILE_RATE), FILE_RATE)
    return path


@pytest.fixture(scope="module")
def streamed(model, mimi, user_wav, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("stream") / "out"  # created by the call
    result = stream_user_audio(model, user_wav, output_dir, mimi=mimi, tokenizer=SAMPLE_DIR / "tokenizer.model",
                               speculate_top_k=4, progress=False, **GREEDY)
    return result, output_dir


def changed_config(**change) -> MoshiUserPredConfig:
    """The tiny sample config with some fields changed (validated again)."""
    return MoshiUserPredConfig(**{**sample_config(dim=32, num_layers=1).to_dict(), **change})


def read_frames(output_dir) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "frames.jsonl").read_text().splitlines()]


def test_stream_is_lossless_and_logs_every_frame(streamed, model, mimi, user_wav, tokenizer):
    result, output_dir = streamed
    audio = load_mono(user_wav, RATE)
    expected_codes = mimi.encode(audio[None, None], num_quantizers=4).audio_codes[0]  # the user's 4 codebooks
    assert torch.equal(result.user_codes, expected_codes) and result.user_codes.shape == (4, 38)
    T = result.num_frames

    # speculation changes nothing: the same tokens as generate without it
    plain = model.generate(result.user_codes[None], progress=False, **GREEDY)
    assert torch.equal(result.text_tokens, plain.text_tokens[0]) and result.text_tokens.shape == (T - 1,)
    assert torch.equal(result.audio_codes, plain.audio_codes[0]) and result.audio_codes.shape == (4, T - 1)
    speculative = model.generate(result.user_codes[None], progress=False, speculate_top_k=4, **GREEDY).speculation
    assert (result.hits, result.misses) == (speculative.hits, speculative.misses)
    assert result.hits > 0 and result.misses > 0  # the log below covers both outcomes
    assert result.statuses[0] == "not_tried" and set(result.statuses[1:]) == {"hit", "miss"}
    assert result.statuses.count("hit") == result.hits and result.hit_rate == result.hits / (T - 1)

    frames = read_frames(output_dir)
    assert len(frames) == T
    for t, frame in enumerate(frames):
        assert frame["frame"] == t and math.isclose(frame["time_s"], t * 0.08)
        assert frame["user_tokens"] == [result.user_codes[0, t].item()]  # the one delay-0 user codebook
        assert frame["speculative"] == result.statuses[t]
        assert frame["critical_ms"] == result.critical_ms[t] > 0
        if t == 0:  # no prediction yet, no system output during the delay
            assert frame["predicted"] is frame["correct"] is frame["probability"] is frame["text_token"] is None
            continue
        # the prediction made at the previous call for this frame, and its probability
        predicted = plain.user_prediction[0, 0, t - 1].item()
        assert frame["predicted"] == [predicted]
        assert frame["correct"] is (predicted == result.user_codes[0, t].item()) is result.correct[t]
        assert frame["probability"] == pytest.approx([plain.user_probs[0, 0, t - 1].item()])
        assert frame["entropy"] == pytest.approx([plain.user_entropy[0, 0, t - 1].item()])
        assert result.confidence[t] == pytest.approx(frame["probability"][0])
        token = result.text_tokens[t - 1].item()
        assert frame["text_token"] == token
        assert frame["text"] == ("" if token in PADDING else tokenizer.id_to_piece(token).replace("▁", " "))
    assert result.correct[0] is None and result.confidence[0] is None

    words = [token for token in result.text_tokens.tolist() if token not in PADDING]
    assert words  # a random model still says something
    text = "".join(tokenizer.id_to_piece(token) for token in words).replace("▁", " ").strip()
    assert result.text == text == "".join(frame["text"] for frame in frames[1:]).strip()
    assert (output_dir / "text.txt").read_text() == text + "\n"


def test_stream_writes_system_audio_dialogue_and_summary(streamed, mimi, user_wav):
    result, output_dir = streamed
    T = result.num_frames
    system, rate = soundfile.read(output_dir / "system.wav", dtype="float32")
    assert rate == RATE and system.shape == ((T - 1) * SAMPLES_PER_FRAME,)
    decoded = mimi.decode(result.audio_codes[None]).audio_values[0, 0]
    # the decoder's output through the limiter, frame by frame as `serve` sends it
    limited = AudioLimiter(1, RATE).limit_all(decoded.detach().numpy(), SAMPLES_PER_FRAME)
    torch.testing.assert_close(torch.from_numpy(system), torch.from_numpy(limited))
    assert np.abs(system).max() <= 10 ** (-1 / 20)

    # system frame j sits at user frame j + 1 (the training alignment), the user as recorded, zero-padded
    dialogue, rate = soundfile.read(output_dir / "dialogue.wav", dtype="float32")
    assert rate == RATE and dialogue.shape == (T * SAMPLES_PER_FRAME, 2)
    assert not dialogue[:SAMPLES_PER_FRAME, 0].any()
    np.testing.assert_array_equal(dialogue[SAMPLES_PER_FRAME:, 0], system)
    user = load_mono(user_wav, RATE).numpy()
    assert user.size == 3 * RATE < T * SAMPLES_PER_FRAME
    np.testing.assert_array_equal(dialogue[: user.size, 1], user)
    assert not dialogue[user.size :, 1].any()

    summary = json.loads((output_dir / "summary.json").read_text())
    assert summary == json.loads(json.dumps(result.to_dict()))
    hit_ms = [ms for ms, status in zip(result.critical_ms, result.statuses) if status == "hit"]
    normal_ms = [ms for ms, status in zip(result.critical_ms, result.statuses) if status != "hit"]
    assert (summary["frames"], summary["system_frames"], summary["seconds"]) == (T, T - 1, pytest.approx(T * 0.08))
    assert (summary["hits"], summary["misses"], summary["hit_rate"]) == (result.hits, result.misses, result.hit_rate)
    assert (summary["hit_frames"], summary["normal_frames"]) == (len(hit_ms), len(normal_ms))
    assert summary["critical_ms_hit_mean"] == pytest.approx(np.mean(hit_ms))
    assert summary["critical_ms_normal_p95"] == pytest.approx(np.percentile(normal_ms, 95))
    assert summary["critical_ms_p95"] == pytest.approx(np.percentile(result.critical_ms, 95))
    assert summary["delay0_accuracy"] == pytest.approx(np.mean(result.correct[1:]))
    assert summary["saved_ms"] > 0  # hit steps skip the LM step
    assert summary["settings"]["speculate_top_k"] == 4 and summary["settings"]["user_audio"] == str(user_wav)
    assert summary["settings"]["sampling"]["text"]["do_sample"] is False
    assert summary["text"] == result.text
    assert summary["files"] == {"system_audio": "system.wav", "dialogue_audio": "dialogue.wav", "text": "text.txt",
                                "frames": "frames.jsonl", "summary": "summary.json"}
    assert sorted(path.name for path in output_dir.iterdir()) == sorted(summary["files"].values())  # no temp files
    assert "hits" in result.describe() and result.text in result.describe()


def test_max_frames_tensor_input_without_tokenizer(streamed, model, mimi, user_wav, tmp_path):
    full, _ = streamed
    audio = load_mono(user_wav, RATE)  # a tensor is taken as already at Mimi's rate
    result = stream_user_audio(model, audio, tmp_path, mimi=mimi, max_frames=6, progress=False, **GREEDY)
    assert torch.equal(result.user_codes, full.user_codes[:, :6])
    assert torch.equal(result.text_tokens, full.text_tokens[:5])  # streaming is causal: a prefix of the full run
    assert len(read_frames(tmp_path)) == 6 and result.settings["user_audio"] == "tensor"
    words = [str(token) for token in result.text_tokens.tolist() if token not in PADDING]
    assert result.text == " ".join(words) and (tmp_path / "text.txt").read_text() == result.text + "\n"
    assert all(frame["text"] is None for frame in read_frames(tmp_path))
    assert soundfile.info(tmp_path / "dialogue.wav").frames == 6 * SAMPLES_PER_FRAME

    # a single frame: the system has not spoken yet (its first output comes after max(delays) frames)
    result = stream_user_audio(model, audio, tmp_path / "one", mimi=mimi, max_frames=1, progress=False, **GREEDY)
    assert result.text_tokens.shape == (0,) and result.audio_codes.shape == (4, 0) and result.text == ""
    assert soundfile.info(tmp_path / "one" / "system.wav").frames == 0
    assert soundfile.info(tmp_path / "one" / "dialogue.wav").frames == SAMPLES_PER_FRAME


def test_realtime_paces_frames_at_the_frame_rate(streamed, model, mimi, user_wav, tmp_path):
    full, _ = streamed
    start = time.perf_counter()
    result = stream_user_audio(model, user_wav, tmp_path, mimi=mimi, realtime=True, max_frames=5, progress=False,
                               **GREEDY)
    assert time.perf_counter() - start >= result.wall_s >= 4 * 0.08  # frame 4 arrives 320 ms after frame 0
    assert torch.equal(result.text_tokens, full.text_tokens[:4]) and result.settings["realtime"] is True


def test_file_is_read_and_encoded_frame_by_frame_as_one_shot(model, mimi, tmp_path):
    """A 16 kHz file ending mid-speech and mid-frame, read a second at a time (blocks that do not fall on frames):
    the codes of a one-shot encode of the recording zero-padded to whole frames, as many frames as the one-shot
    encode of the recording itself and the same codes on its whole frames."""
    audio, rate = soundfile.read(SAMPLE_DIR / "dialogues" / "001.flac", dtype="float32")
    soundfile.write(tmp_path / "loud.wav", 2.5 * audio[: int(2.5 * rate) + 123, 0], rate, subtype="FLOAT")
    result = stream_user_audio(model, tmp_path / "loud.wav", tmp_path / "out", mimi=mimi, progress=False, **GREEDY)
    user = load_mono(tmp_path / "loud.wav", RATE)
    num_frames = math.ceil(user.numel() / SAMPLES_PER_FRAME)
    padded = torch.nn.functional.pad(user, (0, num_frames * SAMPLES_PER_FRAME - user.numel()))
    with torch.no_grad():
        one_shot = mimi.encode(user[None, None], num_quantizers=4).audio_codes[0]
        one_shot_padded = mimi.encode(padded[None, None], num_quantizers=4).audio_codes[0]
    assert result.user_codes.shape == one_shot.shape == (4, num_frames) == (4, 32)
    assert torch.equal(result.user_codes, one_shot_padded)
    assert torch.equal(result.user_codes[:, :-1], one_shot[:, :-1])

    # past full scale in the file: clipped in dialogue.wav, and no output holds a non-finite sample
    dialogue, _ = soundfile.read(tmp_path / "out" / "dialogue.wav", dtype="float32")
    assert user.abs().max() > 1
    np.testing.assert_array_equal(dialogue[: user.numel(), 1], user.clamp(-1, 1).numpy())
    system, _ = soundfile.read(tmp_path / "out" / "system.wav", dtype="float32")
    assert np.isfinite(dialogue).all() and np.abs(dialogue).max() <= 1 and np.abs(system).max() <= 1


def test_max_frames_reads_only_the_frames_streamed(model, mimi, tmp_path):
    """`max_frames=10` of a 10-minute recording reads its first block, not the whole file (which took 1.6 GB and
    12 s): the peak of Python's allocations, numpy's arrays included, stays far below the file's samples."""
    import tracemalloc

    soundfile.write(tmp_path / "long.wav", np.zeros(600 * 8000, np.int16), 8000)  # 10 minutes of silence
    tracemalloc.start()
    try:
        result = stream_user_audio(model, tmp_path / "long.wav", tmp_path / "out", mimi=mimi, max_frames=10,
                                   progress=False, **GREEDY)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    with torch.no_grad():
        silence = mimi.encode(torch.zeros(1, 1, 10 * SAMPLES_PER_FRAME), num_quantizers=4).audio_codes[0]
    assert torch.equal(result.user_codes, silence)
    assert peak < 4e6, peak  # the file as float32: 19 MB, at Mimi's 24 kHz: 58 MB


def test_load_mono_resamples_and_picks_a_channel(tmp_path):
    audio, rate = soundfile.read(SAMPLE_DIR / "dialogues" / "001.flac", dtype="float32", frames=8000)
    soundfile.write(tmp_path / "stereo.wav", audio, rate, subtype="FLOAT")
    right = load_mono(tmp_path / "stereo.wav", rate, channel=1)
    assert right.dtype == torch.float32 and right.shape == (8000,)
    np.testing.assert_array_equal(right.numpy(), audio[:, 1])
    resampled = load_mono(tmp_path / "stereo.wav", RATE, channel=1)
    torch.testing.assert_close(resampled, load_stereo(tmp_path / "stereo.wav", RATE)[1])
    soundfile.write(tmp_path / "mono.wav", audio[:, 0], rate, subtype="FLOAT")
    np.testing.assert_array_equal(load_mono(tmp_path / "mono.wav", rate).numpy(), audio[:, 0])
    with pytest.raises(ValueError, match=r"stereo\.wav has 2 channels: pick one with channel=0\.\.1"):
        load_mono(tmp_path / "stereo.wav", RATE)
    with pytest.raises(ValueError, match=r"channel=2 but .*stereo\.wav has 2 channel\(s\)"):
        load_mono(tmp_path / "stereo.wav", RATE, channel=2)


@pytest.mark.parametrize(
    "case, message",
    [
        ("stereo", r"stereo\.wav has 2 channels: pick one with channel="),
        ("missing", r"cannot read audio file .*missing\.wav: no such file"),
        ("empty", r"empty\.wav has no samples"),
        ("output_is_file", r"output_dir '.*taken' is a file"),
        ("max_frames", r"max_frames=0: must be a positive integer"),
        ("tensor_2d", r"user_audio must be a 1-D float tensor \[num_samples\] at 24000 Hz, got shape \(1, 100\)"),
        ("tensor_channel", r"channel=0 picks a channel of an audio file; user_audio is already one signal"),
        ("folder", r"cannot read audio file .*folder: it is a directory"),
        ("device", r"cannot read audio file /dev/null: it is not a regular file"),
        ("zero_bytes", r"cannot read audio file .*zero\.wav: it is empty \(0 bytes\)"),
        ("nan", r"nan\.wav has a non-finite sample \(NaN\) at 1\.000 s"),
        ("inf", r"inf\.wav has a non-finite sample \(-inf\) at 0\.500 s"),
        ("tensor_nan", r"user_audio has a non-finite sample \(NaN\) at 0\.010 s"),
    ],
)
def test_stream_rejects_bad_input(case, message, model, mimi, tmp_path):
    soundfile.write(tmp_path / "stereo.wav", np.zeros((1000, 2), np.float32), FILE_RATE)
    soundfile.write(tmp_path / "empty.wav", np.zeros(0, np.float32), FILE_RATE)
    (tmp_path / "taken").write_text("not a folder")
    (tmp_path / "folder").mkdir()
    (tmp_path / "zero.wav").write_bytes(b"")
    noise = 0.1 * np.random.default_rng(0).standard_normal(2 * FILE_RATE).astype(np.float32)
    for name, value, start, length in (("nan", np.nan, FILE_RATE, 1), ("inf", -np.inf, FILE_RATE // 2, 132)):
        audio = noise.copy()
        audio[start : start + length] = value  # one sample at 1 s / 6 ms from 0.5 s on (in the file's time)
        soundfile.write(tmp_path / f"{name}.wav", audio, FILE_RATE, subtype="FLOAT")
    tensor_nan = torch.zeros(1000)
    tensor_nan[240] = float("nan")
    user_audio, kwargs = {
        "stereo": (tmp_path / "stereo.wav", {}),
        "missing": (tmp_path / "missing.wav", {}),
        "empty": (tmp_path / "empty.wav", {}),
        "output_is_file": (tmp_path / "stereo.wav", {"channel": 1, "output_dir": tmp_path / "taken"}),
        "max_frames": (tmp_path / "stereo.wav", {"channel": 1, "max_frames": 0}),
        "tensor_2d": (torch.zeros(1, 100), {}),
        "tensor_channel": (torch.zeros(100), {"channel": 0}),
        "folder": (tmp_path / "folder", {}),
        "device": ("/dev/null", {}),
        "zero_bytes": (tmp_path / "zero.wav", {}),
        "nan": (tmp_path / "nan.wav", {}),
        "inf": (tmp_path / "inf.wav", {}),
        "tensor_nan": (tensor_nan, {}),
    }[case]
    with pytest.raises(ValueError, match=message):
        stream_user_audio(model, user_audio, **{"output_dir": tmp_path / "out", **kwargs}, mimi=mimi, progress=False)
    assert (tmp_path / "taken").read_text() == "not a folder"
    assert not (tmp_path / "out").exists()  # nothing written, not even the folder


@pytest.mark.parametrize(
    "change, message",
    [
        ({"card": 32}, r"this Mimi has codebooks of 64 entries but the model's audio vocabulary is card=32"),
        ({"n_q": 18, "dep_q": 9, "delays": [0] * 19}, r"this Mimi has 8 codebooks but the model needs 9 \(dep_q=9"),
    ],
)
def test_stream_rejects_a_mimi_that_does_not_match_the_model(change, message, mimi, user_wav, tmp_path):
    model = MoshiUserPredForConditionalGeneration(changed_config(**change))
    with pytest.raises(ValueError, match=message):
        stream_user_audio(model, user_wav, tmp_path, mimi=mimi, progress=False)


def test_stream_rejects_a_tokenizer_smaller_than_the_text_vocabulary(mimi, user_wav, tmp_path):
    model = MoshiUserPredForConditionalGeneration(changed_config(text_card=300, text_card_out=300))
    with pytest.raises(ValueError, match=r"the tokenizer has 200 pieces but the model's text vocabulary has 300"):
        stream_user_audio(model, user_wav, tmp_path, mimi=mimi, tokenizer=SAMPLE_DIR / "tokenizer.model",
                          progress=False)


def test_realtime_warns_when_steps_cannot_keep_up(model, mimi, user_wav, tmp_path, monkeypatch):
    """Frames 10 us apart: no step keeps up, and the run says so (once while streaming, once at the end)."""
    from transformers.testing_utils import CaptureLogger

    import hf_moshi_userpred.serving.stream_recording as streaming_audio

    monkeypatch.setattr(streaming_audio, "FRAME_PERIOD_S", 1e-5)
    with CaptureLogger(streaming_audio.logger) as captured:
        stream_user_audio(model, user_wav, tmp_path, mimi=mimi, max_frames=8, realtime=True, progress=False, **GREEDY)
    assert "the steps cannot keep up with 0 ms frames" in captured.out
    assert re.search(r"realtime: \d of 8 frames were handed over more than 0 ms late", captured.out), captured.out
    monkeypatch.setattr(streaming_audio, "FRAME_PERIOD_S", 0.2)  # a slow microphone: every step keeps up
    with CaptureLogger(streaming_audio.logger) as captured:
        stream_user_audio(model, user_wav, tmp_path / "b", mimi=mimi, max_frames=3, realtime=True, progress=False,
                          **GREEDY)
    assert "realtime" not in captured.out
