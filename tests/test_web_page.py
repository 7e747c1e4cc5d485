"""The web page (`hf_moshi_userpred/static/`) in a real browser: Debian's Chromium, headless, driven by Selenium,
against real `hf-moshi-userpred serve` processes on free localhost ports.

Chromium's fake microphone plays a held-out sample dialogue's user channel. The page exposes what it did in
`window.moshiStats` (frames received, samples played, text pieces, extras, chart points, state, message), which the
tests read; the recording is fetched from its blob URL inside the page and decoded here.

Needs `chromium` and `chromium-driver` (`bash scripts/setup.sh test` installs them); without them the tests fail, they
do not skip. Selenium never downloads anything: the driver is given, and `SE_OFFLINE` is set.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import signal
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import aiohttp
import numpy as np
import pytest
import soundfile
import soxr
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

from helpers import serving
from hf_moshi_userpred.sample import SAMPLE_DIR

pytestmark = pytest.mark.slow

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
SCREENSHOT = Path(__file__).resolve().parent.parent / "outputs" / "web_page.png"
TALK_S = 5.0  # talk at least this long (and until text came)
FRAME_S = 0.08


# ------------------------------------------------------------------------------------------------ helpers
@pytest.fixture(scope="module")
def fake_microphone(tmp_path_factory) -> Path:
    """The first held-out dialogue's user (right) channel as the 48 kHz 16-bit mono WAV Chromium's fake device plays."""
    path = json.loads((SAMPLE_DIR / "eval.jsonl").read_text().splitlines()[0])["path"]
    audio, rate = soundfile.read(SAMPLE_DIR / path, dtype="float32", always_2d=True)
    wav = tmp_path_factory.mktemp("web") / "user.wav"
    soundfile.write(wav, soxr.resample(audio[:, 1], rate, 48_000), 48_000, subtype="PCM_16")
    return wav


@pytest.fixture(scope="module")
def voices(tmp_path_factory) -> Path:
    """A `--voice-prompt-dir` of two voices: the first seconds of two sample dialogues' system channels at 24 kHz."""
    folder = tmp_path_factory.mktemp("voices")
    for name, line in zip(("alice", "bob"), (SAMPLE_DIR / "train.jsonl").read_text().splitlines()):
        audio, rate = soundfile.read(SAMPLE_DIR / json.loads(line)["path"], dtype="float32", always_2d=True)
        soundfile.write(folder / f"{name}.wav", soxr.resample(audio[:, 0], rate, 24_000)[: 3 * 24_000], 24_000)
    return folder


@contextmanager
def chromium(microphone: Path):
    """Headless Chromium with a fake microphone playing `microphone`, permissions granted, autoplay allowed."""
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not os.access(path, os.X_OK)]
    if missing:
        pytest.fail(f"{' and '.join(missing)} not found: the web page tests need Debian's chromium and "
                    "chromium-driver (run `bash scripts/setup.sh test`, or apt-get install chromium chromium-driver)")
    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must never download a browser or driver
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1280,1000",
                 "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
                 f"--use-file-for-fake-audio-capture={microphone}", "--autoplay-policy=no-user-gesture-required",
                 "--no-first-run", "--disable-extensions", "--disable-background-networking"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    try:
        yield driver
    except BaseException:
        logs = driver.get_log("browser")
        print("browser console:", *(f"{entry['level']} {entry['message']}" for entry in logs[-40:]), sep="\n")
        raise
    finally:
        driver.quit()


def stats(driver) -> dict:
    return driver.execute_script("return Object.assign({}, window.moshiStats)")


def wait_for(driver, condition, timeout: float, what: str) -> dict:
    """Polls `window.moshiStats` until `condition(stats)`; fails with the last stats after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        current = stats(driver)
        if condition(current):
            return current
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout:g} s: {current}"
        time.sleep(0.1)


def click(driver, element_id: str) -> None:
    button = driver.find_element(By.ID, element_id)
    assert button.is_displayed() and button.is_enabled(), f"#{element_id} is not clickable"
    button.click()


def visible_text(driver, element_id: str) -> str:
    element = driver.find_element(By.ID, element_id)
    return element.text if element.is_displayed() else ""


def line_pixels(driver) -> int:
    """Pixels of the confidence chart in the probability line's blue (the chart draws nothing blue when empty)."""
    return driver.execute_script("""
        const c = document.getElementById('confidence-chart');
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let n = 0;
        for (let i = 0; i < d.length; i += 4)
          if (Math.abs(d[i] - 47) < 40 && Math.abs(d[i + 1] - 111) < 40 && Math.abs(d[i + 2] - 237) < 40) n++;
        return n;""")


def fetch_recording(driver) -> tuple[np.ndarray, int]:
    """The recording the download link offers, fetched from its blob URL in the page and decoded here."""
    encoded = driver.execute_async_script("""
        const done = arguments[arguments.length - 1];
        fetch(document.getElementById('download').href).then((r) => r.blob()).then((blob) => {
          const reader = new FileReader();
          reader.onload = () => done(reader.result.split(',')[1]);
          reader.readAsDataURL(blob);
        }).catch((e) => done('error: ' + e));""")
    assert not encoded.startswith("error"), encoded
    audio, rate = soundfile.read(io.BytesIO(base64.b64decode(encoded)), dtype="float32", always_2d=True)
    return audio, rate


class SlotHolder(threading.Thread):
    """A plain protocol client that takes a conversation slot (waits for the handshake) and holds it until `release`."""

    def __init__(self, url: str):
        super().__init__(daemon=True)
        self.url = url.replace("http://", "ws://") + "/api/chat"
        self.handshake = threading.Event()
        self.released = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            asyncio.run(self._hold())
        except BaseException as error:  # reported by the test
            self.error = error
            self.handshake.set()

    async def _hold(self) -> None:
        async with aiohttp.ClientSession() as session, session.ws_connect(self.url) as ws:
            message = await ws.receive(timeout=60)
            assert message.type == aiohttp.WSMsgType.BINARY and message.data[:1] == b"\x00", message
            self.handshake.set()
            while not self.released.is_set():
                await asyncio.sleep(0.05)

    def release(self) -> None:
        self.released.set()
        self.join(timeout=10)


async def _health(url: str) -> dict:
    async with aiohttp.ClientSession() as session, session.get(url + "/health") as response:
        return await response.json()


def wait_for_free_slot(url: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while (health := asyncio.run(_health(url)))["conversations"] > 0:
        assert time.monotonic() < deadline, f"the slot was not freed: {health}"
        time.sleep(0.2)


# ------------------------------------------------------------------------------------------------ tests
def test_conversation_in_the_browser(demo_model_dir, fake_microphone, voices):
    """Pick a voice and a role, start, talk (Chromium's fake microphone), hear the model, read its text, watch the
    user-prediction panel; Stop offers a 24 kHz stereo WAV (model left, user right) as long as the conversation."""
    with serving(demo_model_dir, "--speculate-top-k", "4", "--max-sessions", "1", "--voice-prompt-dir", str(voices),
                 "--voice-prompt", "alice", "--text-prompt", "You are a patient tutor.") as (url, _), \
            chromium(fake_microphone) as driver:
        driver.get(url + "/")
        assert driver.title.startswith("Moshi")
        wait_for(driver, lambda s: s["state"] == "idle" and s["voices"] is not None, 10, "the page loading")
        # the voice picker offers the server's voices with its default picked, the role box its default role
        options = driver.execute_script("return [...document.getElementById('voice').options].map(o => o.value);")
        assert options == ["", "alice", "bob"], options
        assert driver.execute_script("return document.getElementById('voice').value;") == "alice"
        role = driver.find_element(By.ID, "role")
        assert role.get_attribute("value") == "You are a patient tutor."
        role.clear()
        role.send_keys("You are a pirate.")
        driver.execute_script("document.getElementById('voice').value = 'bob';")
        empty_chart = line_pixels(driver)
        click(driver, "start")
        wait_for(driver, lambda s: s["state"] == "live", 60, "the handshake")
        talk_start = time.monotonic()
        live = wait_for(driver, lambda s: time.monotonic() - talk_start >= TALK_S and s["audioFramesReceived"] > 0
                        and s["audioSamplesPlayed"] > 0 and s["extrasReceived"] > 0 and s["chartPoints"] > 0
                        and s["textPieces"] > 0, 60, "audio, text and extras arriving")
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(SCREENSHOT))
        assert live["state"] == "live" and live["audioPagesSent"] > 0
        assert live["persona"] == {"text_prompt": "You are a pirate.", "voice_prompt": "bob"}, live["persona"]
        assert not role.is_enabled()  # the persona is read once, at the start
        assert visible_text(driver, "transcript").strip(), "no text in the transcript"
        assert line_pixels(driver) > empty_chart + 20, "the confidence chart did not draw the prediction"
        assert visible_text(driver, "tile-hits") != "\u2013" or live["hits"] + live["misses"] == 0
        click(driver, "stop")
        talked = time.monotonic() - talk_start
        ended = wait_for(driver, lambda s: s["state"] == "ended" and s["recordingUrl"], 30, "the recording")
        assert not visible_text(driver, "message").startswith("Connection lost")
        assert visible_text(driver, "download"), "no download link after Stop"
        link = driver.execute_script("const a = document.getElementById('download');"
                                     "return [a.href, a.hasAttribute('download'), a.download];")
        assert link[0].startswith("blob:") and link[1] and link[2].endswith(".wav"), link

        audio, rate = fetch_recording(driver)
    assert rate == 24_000 and audio.shape[1] == 2, (rate, audio.shape)
    seconds = len(audio) / rate
    # the recording runs from the handshake to Stop; this test saw both within a poll (0.1 s) and a round trip
    assert abs(seconds - talked) < 4 * FRAME_S, (seconds, talked)
    assert abs(seconds - ended["talkSeconds"]) < 2 * FRAME_S, (seconds, ended["talkSeconds"])
    model, user = audio[:, 0], audio[:, 1]
    assert np.sqrt(np.mean(user**2)) > 1e-3, "the user (right) channel is silent: the microphone was not recorded"
    # the model's audio played, by the page's count of the decoded samples it took from its queue (underruns not
    # counted): the 30-step model may well say nothing loud, so its loudness proves nothing
    assert ended["audioSecondsPlayed"] >= talked / 2, (ended["audioSecondsPlayed"], talked)
    assert np.abs(model).max() <= 1.0, "the page played the model's voice past full scale"


def test_error_states(demo_model_dir, fake_microphone):
    """What the page says when it cannot work: a browser without AudioWorklet; the microphone denied; the only slot
    taken (busy, Retry, and once free Retry starts a conversation); the server stopped mid-conversation (connection
    lost, Retry, the conversation so far still offered); no server at all."""
    with serving(demo_model_dir, "--speculate-top-k", "4", "--max-sessions", "1", "--idle-timeout", "60") as (url, process), \
            chromium(fake_microphone) as driver:
        for patch, state, expected in [
            ("delete window.AudioWorkletNode;", "unsupported", "lacks AudioWorklet"),
            ("navigator.mediaDevices.getUserMedia = () => "
             "Promise.reject(new DOMException('Permission denied', 'NotAllowedError'));", "denied",
             "Microphone access was denied"),
        ]:
            script = driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": patch})
            driver.get(url + "/")
            if state == "denied":
                click(driver, "start")
            shown = wait_for(driver, lambda s: s["state"] not in ("idle", "connecting"), 10, f"the {state} message")
            assert shown["state"] == state and expected in visible_text(driver, "message"), shown
            if state == "unsupported":
                assert not driver.find_element(By.ID, "start").is_enabled()
            else:
                assert visible_text(driver, "retry") == "Retry"
            driver.execute_cdp_cmd("Page.removeScriptToEvaluateOnNewDocument", script)
        assert asyncio.run(_health(url))["conversations"] == 0  # neither took a slot

        # a voice the server does not have (a page older than the server's voices): refused with the reason
        driver.get(url + "/")
        wait_for(driver, lambda s: s["voices"] is not None, 10, "the page loading")
        driver.execute_script("const v = document.getElementById('voice');"
                              "v.add(new Option('carol', 'carol')); v.value = 'carol';")
        click(driver, "start")
        refused = wait_for(driver, lambda s: s["state"] not in ("idle", "connecting", "waiting"), 30, "the refusal")
        assert refused["state"] == "error" and refused["closeCode"] == 1008, refused
        assert "bad persona prompt: unknown voice prompt 'carol'" in visible_text(driver, "message")
        assert asyncio.run(_health(url))["conversations"] == 0

        holder = SlotHolder(url)
        holder.start()
        assert holder.handshake.wait(60) and holder.error is None, holder.error
        try:
            driver.get(url + "/")
            click(driver, "start")
            busy = wait_for(driver, lambda s: s["state"] not in ("idle", "connecting", "waiting"), 30, "a refusal")
            assert busy["state"] == "busy" and busy["closeCode"] == 1013, busy
            message = visible_text(driver, "message")
            assert "all 1 conversation slots are in use" in message and "try again later" in message, message
            assert visible_text(driver, "retry") == "Retry"
        finally:
            holder.release()
        assert holder.error is None, holder.error
        wait_for_free_slot(url)

        click(driver, "retry")
        wait_for(driver, lambda s: s["state"] == "live" and s["audioFramesReceived"] > 0, 60,
                 "the retried conversation")
        process.send_signal(signal.SIGTERM)  # the server shuts down mid-conversation
        lost = wait_for(driver, lambda s: s["state"] != "live", 30, "the page noticing the shutdown")
        assert lost["state"] == "lost" and lost["closeCode"] == 1001, lost
        message = visible_text(driver, "message")
        assert message.startswith("Connection lost") and "shutting down" in message, message
        assert visible_text(driver, "retry") == "Retry"
        assert process.wait(timeout=30) == 0
        wait_for(driver, lambda s: s["recordingUrl"], 10, "the partial recording being offered")

        click(driver, "retry")  # nobody is listening now
        gone = wait_for(driver, lambda s: s["state"] not in ("connecting", "waiting"), 30, "the failed connection")
        assert gone["state"] == "lost", gone
        assert "Could not reach the server" in visible_text(driver, "message")
        assert visible_text(driver, "retry") == "Retry"
