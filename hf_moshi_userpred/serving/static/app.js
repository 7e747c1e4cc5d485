// The browser client of `hf-moshi-userpred serve`: kyutai's moshi WebSocket protocol (0x00 handshake, 0x01 Ogg-Opus
// audio both ways, 0x02 text) plus 0x07 per-frame extras (the user branch's prediction, speculation, timings).
//
// Audio path: microphone -> AudioWorklet (audio-worklet.js, which also plays the model) -> opus-recorder's encoder
// worker (24 kHz Ogg Opus pages) -> WebSocket; WebSocket -> opus-recorder's decoder worker -> the same worklet.
// The worklet hands back every render quantum's microphone input and model output, so the recording (model left,
// user right, 24 kHz stereo WAV) is aligned on the audio clock. No build step: plain script, vendored workers.
"use strict";

(() => {
  const MODEL_RATE = 24000; // the protocol's sample rate
  const FRAME_MS = 80; // one model frame
  const MAX_POINTS = 200; // frames on the strip charts (16 s)
  const HANDSHAKE_TIMEOUT_MS = 30000;
  const VENDOR = "/static/vendor/";
  const KIND = { HANDSHAKE: 0x00, AUDIO: 0x01, TEXT: 0x02, EXTRAS: 0x07 };

  const $ = (id) => document.getElementById(id);
  const ui = {
    status: $("status"), start: $("start"), stop: $("stop"), retry: $("retry"), message: $("message"),
    transcript: $("transcript"), recording: $("recording"), download: $("download"), recordingInfo: $("recording-info"),
    clock: $("clock"), micLevel: $("mic-level"), modelLevel: $("model-level"),
    confidence: $("confidence-chart"), timing: $("timing-chart"),
    prob: $("tile-prob"), entropy: $("tile-entropy"), hits: $("tile-hits"), hitsDetail: $("tile-hits-detail"),
    critical: $("tile-critical"), criticalDetail: $("tile-critical-detail"), turnBox: $("tile-turn-box"),
    turn: $("tile-turn"), frames: $("tile-frames"), framesDetail: $("tile-frames-detail"),
    legendTurn: $("legend-turn"), role: $("role"), voice: $("voice"),
  };

  // What the page did, for people debugging and for the browser tests.
  const stats = {
    state: "idle", message: "", audioFramesReceived: 0, audioPagesSent: 0, audioSamplesPlayed: 0,
    audioSecondsPlayed: 0, underruns: 0, textPieces: 0, extrasReceived: 0, chartPoints: 0, hits: 0, misses: 0,
    notTried: 0, lateFrames: 0, gapFilled: 0, recordedSeconds: 0, talkSeconds: 0, contextSampleRate: null,
    closeCode: null, closeReason: null, recordingUrl: null, voices: null, persona: null,
  };
  window.moshiStats = stats;

  // ------------------------------------------------------------------------------------------------ state, messages
  function setState(state, message, kind) {
    stats.state = state;
    ui.status.dataset.state = state;
    ui.status.textContent = state === "live" ? "live" : state;
    const busy = state === "connecting" || state === "waiting" || state === "live" || state === "stopping";
    ui.start.disabled = busy || state === "unsupported";
    ui.start.hidden = ["busy", "lost", "error", "denied"].includes(state);
    ui.retry.hidden = !["busy", "lost", "error", "denied"].includes(state);
    ui.stop.disabled = !(state === "connecting" || state === "waiting" || state === "live");
    ui.role.disabled = ui.voice.disabled = busy; // the persona is read once, when the conversation starts
    if (message !== undefined) showMessage(message, kind);
  }

  function showMessage(text, kind) {
    stats.message = text || "";
    ui.message.hidden = !text;
    ui.message.textContent = text || "";
    ui.message.dataset.kind = kind || "info";
  }

  function unsupportedReason() {
    const missing = [];
    const mic = navigator.mediaDevices && navigator.mediaDevices.getUserMedia;
    if (!mic) missing.push("microphone access (getUserMedia)");
    if (!window.AudioContext || !window.AudioWorkletNode) missing.push("AudioWorklet");
    if (!window.OfflineAudioContext) missing.push("OfflineAudioContext");
    if (!window.WebSocket) missing.push("WebSocket");
    if (!window.WebAssembly) missing.push("WebAssembly");
    if (!window.Worker) missing.push("Web Workers");
    if (!missing.length) return null;
    let text = "This browser cannot run the conversation: it lacks " + missing.join(", ") + ".";
    if (!mic && !window.isSecureContext) {
      text += " Browsers only give the microphone to secure pages: open this page over https:// or on localhost" +
        " (e.g. through an SSH tunnel).";
    } else {
      text += " Use a recent Chrome, Edge, Firefox or Safari.";
    }
    return text;
  }

  // ------------------------------------------------------------------------------------------------ the conversation
  let session = null; // the current conversation, or null
  let sessionCount = 0;

  async function start() {
    if (session) return;
    const s = session = {
      id: ++sessionCount, live: false, ending: false, mic: [], model: [], samples: 0, lastBlock: null,
      startedAt: null, timers: [],
    };
    resetView();
    setState("connecting", "Opening the microphone\u2026");
    try {
      s.ctx = new AudioContext({ latencyHint: "interactive" });
      stats.contextSampleRate = s.ctx.sampleRate;
      const resumed = s.ctx.resume(); // inside the click, so autoplay rules let it run
      s.stream = await navigator.mediaDevices.getUserMedia({
        audio: { channelCount: 1, echoCancellation: true, noiseSuppression: true, autoGainControl: true },
      });
      await resumed;
    } catch (error) {
      if (s !== session) return;
      const name = error && error.name;
      if (name === "NotAllowedError" || name === "SecurityError" || name === "PermissionDeniedError") {
        return fail(s, "denied", "Microphone access was denied. Allow the microphone for this site (the icon in " +
          "the address bar or the site settings), then press Retry.");
      }
      if (name === "NotFoundError" || name === "OverconstrainedError") {
        return fail(s, "denied", "No microphone was found. Plug one in, then press Retry.");
      }
      return fail(s, "error", "Could not open the microphone: " + (error && error.message || error) + ".");
    }
    if (s !== session) return cleanup(s);
    connect(s); // the audio engine loads meanwhile; the handshake waits for it
    s.audioReady = setupAudio(s);
    s.audioReady.catch(async (error) => {
      await s.socketSettled; // a server that is down explains the failure better than a failed script load
      if (s === session && !s.ending) {
        fail(s, "error", "Could not start the audio engine: " + (error && error.message || error) + ".");
      }
    });
  }

  async function setupAudio(s) {
    await s.ctx.audioWorklet.addModule("/static/audio-worklet.js");
    if (s.ending) return;
    s.node = new AudioWorkletNode(s.ctx, "moshi-audio", {
      numberOfInputs: 1, numberOfOutputs: 1, outputChannelCount: [1], processorOptions: { batchQuanta: 8 },
    });
    s.node.port.onmessage = (event) => onWorklet(s, event.data);
    s.source = s.ctx.createMediaStreamSource(s.stream);
    s.source.connect(s.node);
    s.node.connect(s.ctx.destination);
    startDecoder(s);
    await startEncoder(s);
  }

  function startDecoder(s) {
    s.decoder = new Worker(VENDOR + "decoderWorker.min.js");
    s.decoder.onmessage = (event) => {
      const channels = event.data;
      if (!channels || !channels[0] || s.ending) return;
      s.node.port.postMessage({ type: "audio", pcm: channels[0] }, [channels[0].buffer]);
    };
    s.decoder.onerror = (event) => console.error("decoder worker", event.message);
    s.decoder.postMessage({
      command: "init", decoderSampleRate: MODEL_RATE, outputBufferSampleRate: s.ctx.sampleRate,
      bufferLength: Math.round(960 * s.ctx.sampleRate / MODEL_RATE), // 40 ms chunks
      resampleQuality: 0,
    });
  }

  function startEncoder(s) {
    s.encoder = new Worker(VENDOR + "encoderWorker.min.js");
    return new Promise((resolve, reject) => {
      s.encoder.onerror = (event) => reject(new Error("the Opus encoder did not load (" + (event.message || "error") + ")"));
      s.encoder.onmessage = (event) => {
        const data = event.data || {};
        if (data.message === "ready") resolve();
        else if (data.page) sendAudio(s, data.page);
      };
      s.encoder.postMessage({
        command: "init", encoderSampleRate: MODEL_RATE, originalSampleRate: s.ctx.sampleRate, numberOfChannels: 1,
        encoderFrameSize: 20, maxFramesPerPage: 2, encoderApplication: 2049, encoderComplexity: 0,
        resampleQuality: 3, streamPages: true,
      });
    });
  }

  function connect(s) {
    setState("connecting", "Connecting to the server\u2026");
    const scheme = location.protocol === "https:" ? "wss://" : "ws://";
    let ws;
    try {
      // PersonaPlex's query parameters: the role and the voice picked (empty: none, not the server's default)
      const persona = stats.persona = { text_prompt: ui.role.value.trim(), voice_prompt: ui.voice.value };
      const query = new URLSearchParams({ extras: "1", ...persona });
      ws = s.ws = new WebSocket(scheme + location.host + "/api/chat?" + query.toString());
    } catch (error) {
      s.socketSettled = Promise.resolve();
      return fail(s, "error", "Could not open a WebSocket to the server: " + error.message);
    }
    ws.binaryType = "arraybuffer";
    let settled;
    s.socketSettled = new Promise((resolve) => { settled = resolve; });
    ws.onopen = () => {
      settled();
      if (s === session && !s.live) setState("waiting", "Connected: waiting for a conversation slot\u2026");
    };
    ws.onmessage = (event) => onSocketMessage(s, event.data);
    ws.onclose = (event) => { settled(); onSocketClose(s, event); };
    s.timers.push(setTimeout(() => {
      if (s === session && !s.live && !s.ending) {
        fail(s, "error", "The server accepted the connection but did not start the conversation within " +
          HANDSHAKE_TIMEOUT_MS / 1000 + " s.");
      }
    }, HANDSHAKE_TIMEOUT_MS));
  }

  const textDecoder = new TextDecoder("utf-8");

  function onSocketMessage(s, data) {
    if (s !== session || s.ending || !(data instanceof ArrayBuffer) || data.byteLength === 0) return;
    const bytes = new Uint8Array(data);
    switch (bytes[0]) {
      case KIND.HANDSHAKE:
        onHandshake(s);
        break;
      case KIND.AUDIO:
        stats.audioFramesReceived += 1;
        if (bytes.length > 1 && s.decoder) {
          const pages = bytes.slice(1);
          s.decoder.postMessage({ command: "decode", pages }, [pages.buffer]);
        }
        break;
      case KIND.TEXT:
        appendText(textDecoder.decode(bytes.subarray(1)));
        break;
      case KIND.EXTRAS:
        try {
          onExtras(JSON.parse(textDecoder.decode(bytes.subarray(1))));
        } catch (error) {
          console.warn("bad extras message", error);
        }
        break;
      default:
        console.warn("ignoring a message of unknown kind", bytes[0]);
    }
  }

  async function onHandshake(s) {
    if (s.live) return;
    s.live = true;
    setState("live", "Talking: say something. Use headphones, or the model hears itself.");
    try {
      await s.audioReady;
    } catch (error) {
      return; // reported by start()
    }
    if (s !== session || s.ending) return;
    s.encoder.postMessage({ command: "getHeaderPages" }); // OpusHead + OpusTags first
    s.node.port.postMessage({ type: "capture", on: true });
    s.startedAt = performance.now();
    s.timers.push(setInterval(() => tickView(s), 100));
  }

  function onWorklet(s, data) {
    if (data.type === "captureStopped") {
      if (s.onCaptureStopped) s.onCaptureStopped();
      return;
    }
    if (data.type !== "block" || s.finished) return;
    s.mic.push(data.mic);
    s.model.push(data.model);
    s.samples += data.mic.length;
    s.lastBlock = data;
    stats.audioSamplesPlayed = data.played;
    stats.audioSecondsPlayed = data.played / s.ctx.sampleRate;
    stats.underruns = data.underruns;
    stats.recordedSeconds = s.samples / s.ctx.sampleRate;
    if (!s.ending && s.encoder) s.encoder.postMessage({ command: "encode", buffers: [data.mic] });
  }

  function sendAudio(s, page) {
    if (!s.ws || s.ws.readyState !== WebSocket.OPEN || s.ending) return;
    const message = new Uint8Array(page.length + 1);
    message[0] = KIND.AUDIO;
    message.set(page, 1);
    s.ws.send(message);
    stats.audioPagesSent += 1;
  }

  function onSocketClose(s, event) {
    stats.closeCode = event.code;
    stats.closeReason = event.reason;
    if (s !== session || s.ending) return;
    const reason = (event.reason || "").trim();
    if (event.code === 1013) {
      const match = /all (\d+) (?:conversation slots?|sessions?)/i.exec(reason);
      const text = match ? "Server busy: all " + match[1] + " conversation slots are in use, try again later."
        : "Server busy: " + (reason || "no conversation slot is free") + ". Try again later.";
      return fail(s, "busy", text, "warn");
    }
    if (!s.live) {
      if (event.code === 1006) {
        return fail(s, "lost", "Could not reach the server at " + location.host + ". Is it running? Press Retry.");
      }
      return fail(s, "error", "The server refused the conversation: " + (reason || "code " + event.code) + ".");
    }
    if (event.code === 1001) {
      return fail(s, "lost", "Connection lost: the server is shutting down" +
        (reason && !/shutting down/i.test(reason) ? " (" + reason + ")" : "") + ". Press Retry when it is back.");
    }
    if (event.code === 1006 || event.code === 1005 || !reason) {
      return fail(s, "lost", "Connection lost: the server stopped answering (code " + event.code + "). Press Retry.");
    }
    const what = {
      1003: "it received a message it does not understand", 1007: "it could not decode the audio",
      1008: "no audio arrived for too long", 1009: "a message was too big", 1011: "it hit an internal error",
    }[event.code];
    fail(s, "error", "The server ended the conversation" + (what ? " because " + what : "") + ": " + reason +
      " (code " + event.code + "). Press Retry to start again.");
  }

  async function stop() {
    const s = session;
    if (!s || s.ending) return;
    const wasLive = s.live;
    setState("stopping", "Finishing the recording\u2026");
    await endCapture(s);
    s.ending = true;
    if (s.ws && s.ws.readyState <= WebSocket.OPEN) s.ws.close(1000, "the user stopped");
    await finish(s, wasLive);
    setState("ended", wasLive ? "Conversation ended. The recording is below: the model on the left channel, you " +
      "on the right." : "Stopped before the conversation began.");
  }

  // An unexpected end: show why, keep what was recorded.
  async function fail(s, state, text, kind) {
    if (s !== session || s.ending) return;
    const wasLive = s.live;
    s.ending = true;
    setState(state, text, kind || "error");
    if (s.ws && s.ws.readyState <= WebSocket.OPEN) s.ws.close(1000, "client gave up");
    const kept = await finish(s, wasLive);
    if (stats.state === state) {
      setState(state, text + (kept ? " The conversation so far is recorded below." : ""), kind || "error");
    }
  }

  // Ask the worklet for its last partial block (so the recording ends at the button press).
  function endCapture(s) {
    if (!s.node || !s.live) return Promise.resolve();
    return new Promise((resolve) => {
      const timer = setTimeout(resolve, 500);
      s.onCaptureStopped = () => { clearTimeout(timer); resolve(); };
      s.node.port.postMessage({ type: "capture", on: false });
    });
  }

  async function finish(s, wasLive) {
    s.finished = true;
    for (const timer of s.timers) { clearTimeout(timer); clearInterval(timer); }
    if (s.startedAt !== null) stats.talkSeconds = (performance.now() - s.startedAt) / 1000;
    tickView(s);
    let wav = null;
    if (wasLive && s.samples > 0) {
      try {
        wav = await buildWav(s);
      } catch (error) {
        console.error("could not build the recording", error);
      }
    }
    cleanup(s);
    if (session === s) session = null;
    ui.micLevel.style.width = ui.modelLevel.style.width = "0";
    if (wav) offerRecording(wav.blob, wav.seconds);
    return Boolean(wav);
  }

  function cleanup(s) {
    s.ending = true;
    for (const timer of s.timers) { clearTimeout(timer); clearInterval(timer); }
    if (s.encoder) s.encoder.terminate();
    if (s.decoder) s.decoder.terminate();
    if (s.stream) s.stream.getTracks().forEach((track) => track.stop());
    if (s.source) s.source.disconnect();
    if (s.node) { s.node.port.onmessage = null; s.node.disconnect(); }
    if (s.ctx && s.ctx.state !== "closed") s.ctx.close().catch(() => {});
    if (s.ws && s.ws.readyState <= WebSocket.OPEN) s.ws.close(1000, "bye");
  }

  // ------------------------------------------------------------------------------------------------ the recording
  function concat(chunks, length) {
    const out = new Float32Array(length);
    let offset = 0;
    for (const chunk of chunks) { out.set(chunk, offset); offset += chunk.length; }
    return out;
  }

  async function buildWav(s) {
    const rate = s.ctx.sampleRate;
    const model = concat(s.model, s.samples);
    const mic = concat(s.mic, s.samples);
    let left = model, right = mic;
    if (rate !== MODEL_RATE) { // resample both channels to 24 kHz with the browser's resampler
      const length = Math.max(1, Math.round(s.samples * MODEL_RATE / rate));
      const offline = new OfflineAudioContext(2, length, MODEL_RATE);
      const buffer = offline.createBuffer(2, s.samples, rate);
      buffer.copyToChannel(model, 0);
      buffer.copyToChannel(mic, 1);
      const source = offline.createBufferSource();
      source.buffer = buffer;
      source.connect(offline.destination);
      source.start();
      const rendered = await offline.startRendering();
      left = rendered.getChannelData(0);
      right = rendered.getChannelData(1);
    }
    return { blob: encodeWav([left, right], MODEL_RATE), seconds: left.length / MODEL_RATE };
  }

  function encodeWav(channels, rate) {
    const frames = channels[0].length, count = channels.length, bytes = frames * count * 2;
    const view = new DataView(new ArrayBuffer(44 + bytes));
    const ascii = (offset, text) => { for (let i = 0; i < text.length; i++) view.setUint8(offset + i, text.charCodeAt(i)); };
    ascii(0, "RIFF"); view.setUint32(4, 36 + bytes, true); ascii(8, "WAVE");
    ascii(12, "fmt "); view.setUint32(16, 16, true); view.setUint16(20, 1, true); view.setUint16(22, count, true);
    view.setUint32(24, rate, true); view.setUint32(28, rate * count * 2, true); view.setUint16(32, count * 2, true);
    view.setUint16(34, 16, true);
    ascii(36, "data"); view.setUint32(40, bytes, true);
    let offset = 44;
    for (let i = 0; i < frames; i++) {
      for (let c = 0; c < count; c++) {
        const x = Math.max(-1, Math.min(1, channels[c][i]));
        view.setInt16(offset, x < 0 ? x * 0x8000 : x * 0x7fff, true);
        offset += 2;
      }
    }
    return new Blob([view], { type: "audio/wav" });
  }

  function offerRecording(blob, seconds) {
    if (stats.recordingUrl) URL.revokeObjectURL(stats.recordingUrl);
    const url = stats.recordingUrl = URL.createObjectURL(blob);
    const stamp = new Date().toISOString().slice(0, 19).replace(/[-:]/g, "").replace("T", "-");
    ui.download.href = url;
    ui.download.download = "moshi-conversation-" + stamp + ".wav";
    ui.recordingInfo.textContent = seconds.toFixed(1) + " s, stereo 24 kHz WAV: model left, you right";
    ui.recording.hidden = false;
  }

  // ------------------------------------------------------------------------------------------------ the view
  let points = [];
  let counts = { hit: 0, miss: 0, not_tried: 0, late: 0, gap: 0 };
  let entropyMax = 1;
  let showTurn = false;
  let drawPending = false;

  function resetView() {
    points = [];
    counts = { hit: 0, miss: 0, not_tried: 0, late: 0, gap: 0 };
    entropyMax = 1;
    showTurn = false;
    Object.assign(stats, {
      audioFramesReceived: 0, audioPagesSent: 0, audioSamplesPlayed: 0, audioSecondsPlayed: 0, underruns: 0,
      textPieces: 0, extrasReceived: 0, chartPoints: 0, hits: 0, misses: 0, notTried: 0, lateFrames: 0,
      gapFilled: 0, recordedSeconds: 0, talkSeconds: 0, closeCode: null, closeReason: null,
    });
    ui.transcript.textContent = "";
    ui.recording.hidden = true;
    ui.turnBox.hidden = ui.legendTurn.hidden = true;
    for (const tile of [ui.prob, ui.entropy, ui.hits, ui.critical, ui.turn]) tile.textContent = "\u2013";
    ui.hitsDetail.textContent = ui.framesDetail.textContent = "";
    ui.frames.textContent = "0";
    ui.clock.textContent = "0:00.0";
    scheduleDraw();
  }

  function appendText(piece) {
    if (!piece) return;
    stats.textPieces += 1;
    const nearBottom = ui.transcript.scrollHeight - ui.transcript.scrollTop - ui.transcript.clientHeight < 40;
    ui.transcript.append(piece);
    if (nearBottom) ui.transcript.scrollTop = ui.transcript.scrollHeight;
  }

  function onExtras(x) {
    if (!x || typeof x !== "object") return;
    stats.extrasReceived += 1;
    points.push(x);
    if (points.length > MAX_POINTS) points.shift();
    if (x.speculation === "hit") counts.hit += 1;
    else if (x.speculation === "miss") counts.miss += 1;
    else counts.not_tried += 1;
    if (x.late) counts.late += 1;
    if (x.gap_filled) counts.gap += 1;
    if (isNum(x.user_entropy) && x.user_entropy > entropyMax) entropyMax = Math.ceil(x.user_entropy / 4) * 4;
    if (isNum(x.turn_end) && !showTurn) {
      showTurn = true;
      ui.turnBox.hidden = ui.legendTurn.hidden = false;
    }
    stats.hits = counts.hit; stats.misses = counts.miss; stats.notTried = counts.not_tried;
    stats.lateFrames = counts.late; stats.gapFilled = counts.gap;
    scheduleDraw();
  }

  const isNum = (v) => typeof v === "number" && isFinite(v);
  const fmt = (v, digits) => isNum(v) ? v.toFixed(digits) : "\u2013";

  function tickView(s) {
    if (s.startedAt !== null) {
      const t = (performance.now() - s.startedAt) / 1000;
      ui.clock.textContent = Math.floor(t / 60) + ":" + (t % 60).toFixed(1).padStart(4, "0");
    }
    const b = s.lastBlock;
    if (b) {
      ui.micLevel.style.width = Math.min(100, Math.sqrt(b.micLevel) * 250) + "%";
      ui.modelLevel.style.width = Math.min(100, Math.sqrt(b.modelLevel) * 250) + "%";
    }
  }

  function scheduleDraw() {
    if (drawPending) return;
    drawPending = true;
    requestAnimationFrame(draw);
    setTimeout(draw, 250); // rAF does not run in hidden tabs
  }

  function draw() {
    if (!drawPending) return;
    drawPending = false;
    updateTiles();
    drawConfidence();
    drawTiming();
    stats.chartPoints = points.length;
  }

  function updateTiles() {
    const last = points[points.length - 1];
    if (!last) return;
    ui.prob.textContent = fmt(last.user_prob, 2);
    ui.entropy.textContent = fmt(last.user_entropy, 2);
    const tried = counts.hit + counts.miss;
    ui.hits.textContent = tried ? Math.round(100 * counts.hit / tried) + "%" : "\u2013";
    ui.hitsDetail.textContent = counts.hit + " hit / " + counts.miss + " miss" +
      (counts.not_tried ? " / " + counts.not_tried + " not tried" : "");
    const recent = points.map((p) => p.critical_ms).filter(isNum).sort((a, b) => a - b);
    ui.critical.textContent = isNum(last.critical_ms) ? last.critical_ms.toFixed(1) + " ms" : "\u2013";
    ui.critical.classList.toggle("over", isNum(last.critical_ms) && last.critical_ms > FRAME_MS);
    ui.criticalDetail.textContent = "of 80 ms" + (recent.length ? ", p95 " +
      recent[Math.min(recent.length - 1, Math.floor(0.95 * recent.length))].toFixed(1) : "");
    if (showTurn) ui.turn.textContent = isNum(last.turn_end) ? Math.round(100 * last.turn_end) + "%" : "\u2013";
    ui.frames.textContent = String(stats.extrasReceived);
    ui.framesDetail.textContent = counts.late + " late" + (counts.gap ? ", " + counts.gap + " gap-filled" : "");
  }

  const css = (name) => getComputedStyle(document.documentElement).getPropertyValue(name).trim();

  function prepareCanvas(canvas) {
    const ratio = window.devicePixelRatio || 1;
    const width = Math.max(200, Math.round(canvas.clientWidth || canvas.width));
    const height = Math.max(60, Math.round(canvas.clientHeight || canvas.height));
    if (canvas.width !== Math.round(width * ratio) || canvas.height !== Math.round(height * ratio)) {
      canvas.width = Math.round(width * ratio);
      canvas.height = Math.round(height * ratio);
    }
    const g = canvas.getContext("2d");
    g.setTransform(ratio, 0, 0, ratio, 0, 0);
    g.clearRect(0, 0, width, height);
    g.font = "11px system-ui, sans-serif";
    return { g, width, height };
  }

  // x of the point `i` of `points` (the newest on the right edge)
  function xOf(i, left, right) {
    return right - (points.length - 1 - i) * (right - left) / (MAX_POINTS - 1);
  }

  function line(g, left, right, value, y, color, dash) {
    g.strokeStyle = color;
    g.lineWidth = 1.8;
    g.setLineDash(dash || []);
    g.beginPath();
    let drawing = false;
    points.forEach((p, i) => {
      const v = value(p);
      if (!isNum(v)) { drawing = false; return; }
      const x = xOf(i, left, right);
      if (drawing) g.lineTo(x, y(v)); else g.moveTo(x, y(v));
      drawing = true;
    });
    g.stroke();
    g.setLineDash([]);
  }

  function drawConfidence() {
    const { g, width, height } = prepareCanvas(ui.confidence);
    const left = 34, right = width - 46, top = 8, strip = 12, bottom = height - strip - 10;
    const yProb = (v) => bottom - Math.max(0, Math.min(1, v)) * (bottom - top);
    const yEnt = (v) => bottom - Math.max(0, Math.min(1, v / entropyMax)) * (bottom - top);
    g.strokeStyle = "#eceef2";
    g.lineWidth = 1;
    g.fillStyle = "#8a93a5";
    g.textBaseline = "middle";
    for (const v of [0, 0.25, 0.5, 0.75, 1]) {
      const y = Math.round(yProb(v)) + 0.5;
      g.beginPath(); g.moveTo(left, y); g.lineTo(right, y); g.stroke();
      g.textAlign = "right"; g.fillText(v.toFixed(2), left - 4, y);
      g.textAlign = "left";
      g.fillText(String(+(v * entropyMax).toFixed(2)) + (v === 1 ? " nats" : ""), right + 4, y);
    }
    if (!points.length) {
      g.textAlign = "center";
      g.fillText("the user branch's prediction appears here, one point per 80 ms frame", (left + right) / 2,
        (top + bottom) / 2);
      return;
    }
    line(g, left, right, (p) => p.user_entropy, yEnt, css("--entropy"));
    if (showTurn) line(g, left, right, (p) => p.turn_end, yProb, css("--turn"), [5, 3]);
    line(g, left, right, (p) => p.user_prob, yProb, css("--prob"));
    // speculation ticks under the plot
    const colors = { hit: css("--hit"), miss: css("--miss"), not_tried: css("--nottried") };
    const w = Math.max(1.5, (right - left) / MAX_POINTS - 0.6);
    points.forEach((p, i) => {
      g.fillStyle = colors[p.speculation] || colors.not_tried;
      const tall = p.speculation === "hit" || p.speculation === "miss";
      g.fillRect(xOf(i, left, right) - w / 2, height - strip - 2 + (tall ? 0 : strip / 2), w, tall ? strip : strip / 2);
    });
  }

  function drawTiming() {
    const { g, width, height } = prepareCanvas(ui.timing);
    const left = 34, right = width - 46, top = 8, bottom = height - 16;
    let max = 100;
    for (const p of points) max = Math.max(max, isNum(p.tick_ms) ? p.tick_ms : 0, isNum(p.critical_ms) ? p.critical_ms : 0);
    const step = [20, 50, 100, 200, 500, 1000, 2000, 5000].find((s) => max / s <= 5) || 10000;
    max = Math.ceil(max / step) * step;
    const y = (v) => bottom - Math.max(0, Math.min(max, v)) / max * (bottom - top);
    g.strokeStyle = "#eceef2";
    g.lineWidth = 1;
    g.fillStyle = "#8a93a5";
    g.textBaseline = "middle";
    g.textAlign = "right";
    for (let v = 0; v <= max; v += step) {
      const yy = Math.round(y(v)) + 0.5;
      g.beginPath(); g.moveTo(left, yy); g.lineTo(right, yy); g.stroke();
      g.fillText(String(v), left - 4, yy);
    }
    g.textAlign = "left";
    g.fillText("ms", right + 4, y(max));
    // the 80 ms budget
    g.strokeStyle = css("--miss");
    g.setLineDash([4, 3]);
    g.beginPath(); g.moveTo(left, y(FRAME_MS)); g.lineTo(right, y(FRAME_MS)); g.stroke();
    g.setLineDash([]);
    g.fillStyle = css("--miss");
    g.fillText("80", right + 4, y(FRAME_MS));
    if (!points.length) return;
    line(g, left, right, (p) => p.tick_ms, y, css("--tick"));
    line(g, left, right, (p) => p.critical_ms, y, css("--critical"));
    g.fillStyle = css("--late");
    points.forEach((p, i) => {
      if (p.late || p.gap_filled) g.fillRect(xOf(i, left, right) - 1, bottom + 4, 2.5, 8);
    });
  }

  // The voices of the server's --voice-prompt-dir and its default persona, for the picker and the role box.
  async function loadPersonas() {
    try {
      const response = await fetch("/api/personas");
      if (!response.ok) return;
      const options = await response.json();
      stats.voices = options.voices || [];
      for (const name of stats.voices) {
        const option = document.createElement("option");
        option.value = option.textContent = name;
        ui.voice.appendChild(option);
      }
      if (options.voice_prompt && stats.voices.includes(options.voice_prompt)) ui.voice.value = options.voice_prompt;
      if (options.text_prompt && !ui.role.value) ui.role.value = options.text_prompt;
    } catch (error) {
      stats.voices = []; // an older server: no persona options, the model's own voice
    }
  }

  // ------------------------------------------------------------------------------------------------ wiring
  ui.start.addEventListener("click", start);
  ui.retry.addEventListener("click", start);
  ui.stop.addEventListener("click", stop);
  window.addEventListener("resize", scheduleDraw);
  window.addEventListener("pagehide", () => { if (session) cleanup(session); });

  const unsupported = unsupportedReason();
  if (unsupported) setState("unsupported", unsupported, "error");
  else setState("idle");
  scheduleDraw();
  loadPersonas();
  window.moshiApp = { start, stop };
})();
