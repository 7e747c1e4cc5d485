// The page's one AudioWorklet: it plays the model's decoded audio and, on the same render quantum, captures the
// microphone, so the two channels of the recording are aligned sample for sample on the audio clock.
//
// Input 0: the microphone. Output 0: the model's voice (mono). Messages in: {type: "audio", pcm: Float32Array}
// (decoded model audio at the context's rate), {type: "capture", on: bool}, {type: "reset"}.
// Messages out, every `batch` quanta while capturing: {type: "block", mic, model, played, buffered, underruns,
// micLevel, modelLevel}; `mic` and `model` are the quanta's samples (what was heard, silence included).

class MoshiAudioProcessor extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const opts = (options && options.processorOptions) || {};
    this.batch = opts.batchQuanta || 8; // 8 x 128 samples: ~21 ms at 48 kHz
    this.startFrames = opts.startSamples || Math.round(sampleRate * 0.08); // buffer this much before playing
    this.maxBuffered = opts.maxSamples || Math.round(sampleRate * 0.8); // drop the oldest beyond this
    this.reset();
    this.port.onmessage = (event) => {
      const data = event.data;
      if (data.type === "audio") {
        // the server limits the model's voice to -1 dBFS; Opus can overshoot a little, and a model served by
        // anything else may not limit at all: never hand the speakers more than full scale
        for (let i = 0; i < data.pcm.length; i++) data.pcm[i] = Math.max(-1, Math.min(1, data.pcm[i]));
        this.queue.push(data.pcm);
        this.buffered += data.pcm.length;
        while (this.buffered > this.maxBuffered && this.queue.length > 1) {
          const dropped = this.queue.shift();
          this.buffered -= dropped.length - (this.offset || 0);
          this.offset = 0;
          this.dropped += dropped.length;
        }
      } else if (data.type === "capture") {
        if (data.on) {
          this.newBlock();
          this.capturing = true;
        } else {
          this.flushBlock(); // the last partial block, then the acknowledgement
          this.capturing = false;
          this.port.postMessage({ type: "captureStopped" });
        }
      } else if (data.type === "reset") {
        this.reset();
      }
    };
  }

  reset() {
    this.queue = [];
    this.offset = 0; // read position in queue[0]
    this.buffered = 0;
    this.playing = false;
    this.played = 0;
    this.dropped = 0;
    this.underruns = 0;
    this.capturing = false;
    this.newBlock();
  }

  newBlock() {
    const n = 128 * this.batch;
    this.mic = new Float32Array(n);
    this.model = new Float32Array(n);
    this.fill = 0;
  }

  flushBlock() {
    if (this.fill > 0 && this.capturing) {
      const mic = this.mic.slice(0, this.fill);
      const model = this.model.slice(0, this.fill);
      this.port.postMessage({
        type: "block", mic, model, played: this.played, buffered: this.buffered, underruns: this.underruns,
        dropped: this.dropped, micLevel: rms(mic), modelLevel: rms(model),
      }, [mic.buffer, model.buffer]);
    }
    this.newBlock();
  }

  process(inputs, outputs) {
    const out = outputs[0] && outputs[0][0];
    const frames = out ? out.length : 128;
    const block = new Float32Array(frames);
    if (!this.playing && this.buffered >= this.startFrames) this.playing = true;
    let written = 0;
    if (this.playing) {
      while (written < frames && this.queue.length > 0) {
        const head = this.queue[0];
        const take = Math.min(frames - written, head.length - this.offset);
        block.set(head.subarray(this.offset, this.offset + take), written);
        written += take;
        this.offset += take;
        if (this.offset >= head.length) {
          this.queue.shift();
          this.offset = 0;
        }
      }
      this.buffered -= written;
      this.played += written;
      if (written < frames) { // ran dry: wait for a fresh start buffer
        this.playing = false;
        this.underruns += 1;
      }
    }
    if (outputs[0]) for (const channel of outputs[0]) channel.set(block);
    if (this.capturing) {
      const input = inputs[0] && inputs[0][0];
      if (input) this.mic.set(input.subarray(0, frames), this.fill);
      this.model.set(block, this.fill);
      this.fill += frames;
      if (this.fill + frames > this.mic.length) this.flushBlock();
    }
    return true;
  }
}

function rms(x) {
  let sum = 0;
  for (let i = 0; i < x.length; i++) sum += x[i] * x[i];
  return x.length ? Math.sqrt(sum / x.length) : 0;
}

registerProcessor("moshi-audio", MoshiAudioProcessor);
