"""Persona prompts from files and in the live path: voices (WAV or codes) and their errors, the engine's batched
conversations with their own personas (equal to solo runs, never leaking into another slot), a refused prompt that
takes no slot, `stream --text-prompt/--voice-prompt`, and `serve`'s query parameters, `/api/personas` and close
reasons over real WebSockets."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import aiohttp
import numpy as np
import pytest
import soundfile
import soxr
import torch

from helpers import serving
from hf_moshi_userpred import MoshiUserPredForConditionalGeneration
from hf_moshi_userpred.data.audio import load_mimi, load_tokenizer
from hf_moshi_userpred.data.persona import VOICE_RMS_DBFS, PersonaLibrary
from hf_moshi_userpred.models.generation_moshi_persona import PROMPT_SILENCE_FRAMES
from hf_moshi_userpred.sample import SAMPLE_DIR
from hf_moshi_userpred.serving.engine import RealtimeEngine

RATE, FRAME = 24_000, 1920
CLI = [sys.executable, "-m", "hf_moshi_userpred"]


def sample_voice(seconds: float = 1.2, index: int = 0) -> np.ndarray:
    """A system (left) channel of a shipped sample dialogue at 24 kHz: a voice to imitate."""
    path = json.loads((SAMPLE_DIR / "train.jsonl").read_text().splitlines()[index])["path"]
    audio, rate = soundfile.read(SAMPLE_DIR / path, dtype="float32", always_2d=True)
    return np.ascontiguousarray(soxr.resample(audio[:, 0], rate, RATE)[: int(seconds * RATE)])


@pytest.fixture(scope="module")
def parts(demo_model_dir, one_thread):
    model = MoshiUserPredForConditionalGeneration.from_pretrained(demo_model_dir).eval()
    return model, load_mimi(demo_model_dir / "mimi"), load_tokenizer(demo_model_dir / "tokenizer.model")


@pytest.fixture(scope="module")
def voice_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("voices")
    soundfile.write(folder / "alice.wav", sample_voice(index=0), RATE)
    soundfile.write(folder / "bob.wav", sample_voice(index=1), RATE)
    return folder


def test_voices_encode_and_bad_ones_name_the_problem(parts, voice_dir, tmp_path):
    model, mimi, tokenizer = parts
    c = model.config
    personas = PersonaLibrary(c, mimi, tokenizer, voice_dir)
    assert list(personas.voices) == ["alice", "bob"]
    alice = personas.voices["alice"]
    assert alice.shape == (c.dep_q, 15) and alice.dtype == torch.long  # 1.2 s at 12.5 frames per second
    # the loudness is normalised before encoding: a quieter copy of the same voice gives the same codes
    soundfile.write(tmp_path / "quiet.wav", 0.1 * sample_voice(index=0), RATE)
    assert torch.equal(personas.voice_codes(tmp_path / "quiet.wav"), alice)
    assert abs(VOICE_RMS_DBFS + 24) < 1e-9
    np.save(tmp_path / "codes.npy", alice.numpy())
    assert torch.equal(personas.voice_codes(tmp_path / "codes.npy"), alice)

    prompt = personas.prompt("You are a pirate.", "alice")
    role = tokenizer.encode("<system> You are a pirate. <system>")
    assert prompt.num_frames == 15 + 2 * PROMPT_SILENCE_FRAMES + len(role)
    assert torch.equal(prompt.codes[1 : 1 + c.dep_q, :15], alice)
    assert prompt.codes[0, 15 + PROMPT_SILENCE_FRAMES :][: len(role)].tolist() == role
    assert personas.prompt("", None) is None and personas.prompt("  ", "") is None

    soundfile.write(tmp_path / "48k.wav", sample_voice(), 48_000)
    soundfile.write(tmp_path / "silent.wav", np.zeros(RATE, np.float32), RATE)
    (tmp_path / "broken.wav").write_bytes(b"RIFF not really a wav")
    np.save(tmp_path / "wrong.npy", np.zeros((3, 4), np.int64))
    for path, message in [(tmp_path / "missing.wav", "no such file"), (tmp_path / "48k.wav", "sampled at 48000 Hz"),
                          (tmp_path / "silent.wav", "is silent"), (tmp_path / "broken.wav", "cannot read voice"),
                          (tmp_path / "wrong.npy", r"shape \(3, 4\)")]:
        with pytest.raises(ValueError, match=message):
            personas.voice_codes(path)
    with pytest.raises(ValueError, match="unknown voice prompt 'carol': the voices are alice, bob"):
        personas.prompt(None, "carol")
    with pytest.raises(ValueError, match="needs the model's text tokenizer"):
        PersonaLibrary(c, mimi).prompt("a role")
    with pytest.raises(ValueError, match="does not exist or is not a folder"):
        PersonaLibrary(c, mimi, tokenizer, tmp_path / "nowhere")


def run_engine(parts, voice_dir, joins: dict, ticks: int, slots: int, **kwargs) -> dict:
    """Ticks an engine by hand; `joins[name] = (audio, text_prompt, voice_prompt)`, all joining at tick 0."""
    engine = RealtimeEngine(*parts, max_conversations=slots, do_sample=False, audio_do_sample=False,
                            speculate_top_k=2, seed=0, frame_period_s=10.0, voice_prompt_dir=voice_dir, **kwargs)
    received = {name: [] for name in joins}
    try:
        conversations = {name: engine.join(received[name].append, text, voice)
                         for name, (_, text, voice) in joins.items()}
        for tick in range(ticks):
            for name, (audio, _, _) in joins.items():
                conversations[name].push_audio(audio[tick * FRAME : (tick + 1) * FRAME])
            engine.tick()
    finally:
        engine.stop()
    return {name: [(o.frame, o.text, None if o.audio is None else o.audio.round(decimals=4).tolist())
                   for o in outputs if o.extras is None] for name, outputs in received.items()}


def test_engine_personas_are_per_slot_and_equal_solo_runs(parts, voice_dir):
    user = sample_voice(2.0, index=2)
    joins = {"pirate": (user, "You are a pirate.", "alice"), "plain": (user, "", ""), "bob": (user, None, None)}
    batched = run_engine(parts, voice_dir, joins, 20, slots=3, voice_prompt="bob")  # "bob": the server's default
    for name, join in joins.items():
        solo = run_engine(parts, voice_dir, {name: join}, 20, slots=1, voice_prompt="bob")
        assert batched[name] == solo[name], name
    assert batched["pirate"] != batched["plain"] and batched["bob"] != batched["plain"]  # the prompts change the output


def test_a_refused_prompt_takes_no_slot(parts, voice_dir):
    engine = RealtimeEngine(*parts, max_conversations=1, voice_prompt_dir=voice_dir, frame_period_s=10.0)
    try:
        with pytest.raises(ValueError, match="unknown voice prompt 'carol'"):
            engine.join(lambda output: None, None, "carol")
        assert engine.active_conversations == 0
        assert engine.join(lambda output: None, "", "alice") is not None
        assert engine.persona_options() == {"voices": ["alice", "bob"], "text_prompt": None, "voice_prompt": None}
    finally:
        engine.stop()
    with pytest.raises(ValueError, match=r"default voice prompt 'carol' is neither a voice .* \(alice, bob\) nor a "
                                         "voice file"):  # a bad default fails at start
        RealtimeEngine(*parts, voice_prompt_dir=voice_dir, voice_prompt="carol")
    with pytest.raises(ValueError, match="leaves no room in the model's context"):
        RealtimeEngine(*parts, text_prompt="very long role " * 1200).join(lambda output: None)


def test_stream_cli_takes_a_persona(demo_model_dir, voice_dir, tmp_path):
    user = tmp_path / "user.wav"
    soundfile.write(user, sample_voice(1.6, index=3), RATE)
    outputs = {}
    for name, flags in [("plain", []), ("persona", ["--text-prompt", "You are a pirate.", "--voice-prompt",
                                                    str(voice_dir / "alice.wav")])]:
        done = subprocess.run([*CLI, "stream", str(demo_model_dir), str(user), "--out", str(tmp_path / name),
                               "--greedy", "--quiet", *flags], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        outputs[name] = json.loads((tmp_path / name / "summary.json").read_text())
    assert outputs["plain"]["frames"] == outputs["persona"]["frames"] == 20
    assert outputs["plain"]["settings"]["persona_frames"] == 0
    assert outputs["persona"]["settings"]["persona_frames"] > 2 * PROMPT_SILENCE_FRAMES + 20
    assert (tmp_path / "persona" / "system.wav").read_bytes() != (tmp_path / "plain" / "system.wav").read_bytes()
    bad = subprocess.run([*CLI, "stream", str(demo_model_dir), str(user), "--out", str(tmp_path / "bad"),
                          "--voice-prompt", str(tmp_path / "none.wav")], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "does not exist" in bad.stderr


@pytest.mark.slow
def test_serve_takes_personas_from_the_query_and_refuses_bad_ones(demo_model_dir, voice_dir):
    """`?text_prompt=&voice_prompt=` as PersonaPlex's server takes them; a bad one is closed with 1008 and a reason
    before any slot is taken, while a live conversation goes on."""
    user = sample_voice(4.0, index=2)

    async def main(url: str):
        ws_url = url.replace("http", "ws") + "/api/chat"
        async with aiohttp.ClientSession() as session:
            async with session.get(url + "/api/personas") as response:
                options = await response.json()
            async with session.ws_connect(ws_url + "?text_prompt=You%20are%20a%20pirate.&voice_prompt=alice") as live:
                assert (await live.receive(timeout=30)).data == b"\x00"
                closes = {}
                for query in ("?voice_prompt=carol", "?voice_prompt=../alice.wav"):
                    async with session.ws_connect(ws_url + query) as refused:
                        message = await refused.receive(timeout=30)
                        closes[query] = (refused.close_code, message.extra)
                async with session.get(url + "/health") as response:
                    health = await response.json()
                import sphn

                writer, received = sphn.OpusStreamWriter(RATE), 0
                for index in range(len(user) // FRAME):
                    pages = writer.append_pcm(user[index * FRAME : (index + 1) * FRAME])
                    if len(pages):
                        await live.send_bytes(b"\x01" + pages)
                    while True:
                        try:
                            message = await live.receive(timeout=0.06)
                        except asyncio.TimeoutError:
                            break
                        received += message.type == aiohttp.WSMsgType.BINARY and message.data[:1] == b"\x01"
        return options, closes, health, received

    with serving(demo_model_dir, "--max-sessions", "2", "--voice-prompt-dir", str(voice_dir), "--voice-prompt", "bob",
                 "--text-prompt", "You are helpful.") as (url, _):
        options, closes, health, received = asyncio.run(main(url))
    assert options == {"voices": ["alice", "bob"], "text_prompt": "You are helpful.", "voice_prompt": "bob"}
    for query, (code, reason) in closes.items():
        assert code == 1008 and reason.startswith("bad persona prompt: unknown voice prompt"), (query, reason)
    assert health["conversations"] == 1  # the refused ones took no slot, the live one kept its own
    assert received > 10  # the prompted conversation streamed audio back all along
