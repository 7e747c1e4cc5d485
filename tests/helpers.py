"""What the tests share: the parity configs, tiny models, random codes and the assertions several modules make.

Import it as `from helpers import ...` (pytest puts `tests/` on the path); fixtures live in `conftest.py`.
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from huggingface_hub import CommitInfo, HfApi, RepoUrl

from hf_moshi_userpred import MoshiUserPredConfig, MoshiUserPredForConditionalGeneration
from hf_moshi_userpred.sample import moshiko_shaped_lm_kwargs

# The three configs the parity bar names, as moshi LMModel kwargs.
PARITY_CONFIGS = {
    # moshiko-shaped, small: rope, rms_norm_f32, silu gating, context window, Depformer weights_per_step
    # + multi_linear + pos_emb none, moshiko's 17 delays.
    "moshiko_small": moshiko_shaped_lm_kwargs(dim=64, num_layers=2, num_heads=4, card=40, text_card=50, context=5,
                                              depformer_dim=32, depformer_num_heads=2),
    # sin positions, layer_norm, GELU MLP in the main transformer, low-rank normed Depformer embeddings,
    # a weights_per_step_schedule with per-set feed-forward widths, context 4, uneven delays, biased heads.
    "sin_lowrank_schedule": dict(
        dim=48, text_card=30, n_q=8, dep_q=4, card=24, num_heads=4, num_layers=2, hidden_scale=2,
        norm="layer_norm", positional_embedding="sin", gating="none", context=4, norm_emb=True, bias_proj=True,
        depformer_dim=32, depformer_num_heads=4, depformer_num_layers=2, depformer_gating="gelu",
        depformer_low_rank_embeddings=8, depformer_weights_per_step=True,
        depformer_weights_per_step_schedule=[0, 0, 1, 1], depformer_dim_feedforward=[40, 56],
        depformer_multi_linear=True, depformer_pos_emb="sin", depformer_norm="layer_norm",
        delays=[0, 0, 2, 1, 3, 1, 0, 2, 1],
    ),
    # grouped-query attention (kv_repeat 2), layer scale, sin_rope, float32 layer norm, unbounded context,
    # a separate text head size, extra heads, a GELU-MLP Depformer with rope_concat and f32 output norms.
    "gqa_layerscale": dict(
        dim=64, text_card=40, text_card_out=44, n_q=6, dep_q=3, card=32, num_heads=8, num_layers=2,
        hidden_scale=3, norm="layer_norm_f32", positional_embedding="sin_rope", gating="silu", kv_repeat=2,
        layer_scale=0.01, context=None, extra_heads_num_heads=2, extra_heads_dim=5, depformer_dim=32,
        depformer_num_heads=4, depformer_num_layers=1, depformer_gating="none", depformer_pos_emb="rope_concat",
        depformer_layer_scale=0.1, depformer_norm="layer_norm_f32", delays=[0, 0, 1, 2, 0, 1, 1],
    ),
}


GREEDY = dict(do_sample=False, audio_do_sample=False)  # greedy text and audio for a streaming session


def tiny_config(base: dict | None = None, **overrides) -> MoshiUserPredConfig:
    """Our config of `PARITY_CONFIGS["moshiko_small"]` (or of the config fields `base`), with `overrides`."""
    config = MoshiUserPredConfig(**base) if base is not None else MoshiUserPredConfig.from_moshi_lm_kwargs(
        PARITY_CONFIGS["moshiko_small"])
    return MoshiUserPredConfig(**{**config.to_dict(), **overrides})


def tiny_model(seed: int = 0, base: dict | None = None, **overrides) -> MoshiUserPredForConditionalGeneration:
    """A randomly initialised model of `tiny_config(base, **overrides)`, seeded, in eval mode."""
    torch.manual_seed(seed)
    return MoshiUserPredForConditionalGeneration(tiny_config(base, **overrides)).eval()


def greedy_stream_is_teacher_forced_argmax(model, user: torch.Tensor) -> tuple[list, torch.Tensor, object]:
    """Streams `user` `[B, n_q - dep_q, T]` greedily, rebuilds the training-layout codes of the stream and asserts that
    `forward` scores its text and system audio as its argmax.

    With delays `d`, out.tokens at call `o` holds frame `o - max(d)` of every generated row, and the streaming user frame
    `f` plays training frame `f - 1` (frame 0 is never read: moshi feeds initial tokens there).

    Returns:
        the step outputs, the codes `[B, 1 + n_q, T - max(d)]` and `forward`'s output on them.
    """
    c = model.config
    T, max_delay = user.shape[2], max(c.delays)
    with model.streaming(user.shape[0], **GREEDY) as stream:
        outs = [stream.step(user[:, :, t : t + 1]) for t in range(T)]
    frames = T - max_delay
    generated = torch.cat([o.tokens for o in outs[max_delay:]], dim=2)  # [B, 1 + dep_q, frames]
    codes = torch.cat([generated, user[:, :, 1 : frames + 1]], dim=1)
    with torch.no_grad():
        tf = model(codes)
    assert torch.equal(tf.text_logits[:, 0].argmax(-1), codes[:, 0])
    for k in range(c.dep_q):
        valid = frames - c.delays[1 + k]  # later frames' position is past the end
        assert torch.equal(tf.audio_logits[:, k, :valid].argmax(-1), codes[:, 1 + k, :valid]), f"codebook {k}"
    return outs, codes, tf


def make_reference(LMModel, lm_kwargs: dict, seed: int = 0):
    """A moshi LMModel with every parameter perturbed, so norms, scales and biases are not at their init."""
    torch.manual_seed(seed)
    model = LMModel(**lm_kwargs).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    return model


def random_codes(config, batch: int = 2, frames: int = 12, seed: int = 0, zero_fraction: float = 0.05):
    """Valid codes `[B, 1 + n_q, T]` with a sprinkling of zero tokens (-1)."""
    generator = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, config.card, (batch, 1 + config.n_q, frames), generator=generator)
    codes[:, 0] = torch.randint(0, config.text_card, (batch, frames), generator=generator)
    zeros = torch.rand(codes.shape, generator=generator) < zero_fraction
    return codes.masked_fill(zeros, -1)


def assert_same_as_moshi(output, expected) -> None:
    """Our forward output equals moshi `LMModel.forward`'s on everything they share (fp32, 1e-5)."""
    assert torch.equal(output.text_mask, expected.text_mask)
    assert torch.equal(output.audio_mask, expected.mask)
    torch.testing.assert_close(output.text_logits, expected.text_logits, rtol=0, atol=1e-5, equal_nan=True)
    torch.testing.assert_close(output.audio_logits, expected.logits, rtol=0, atol=1e-5, equal_nan=True)


LOAD_WITHOUT_PACKAGE = textwrap.dedent(
    """
    import sys
    sys.modules["hf_moshi_userpred"] = None  # any import of the package now fails
    import torch
    from transformers import AutoConfig, AutoModel

    folder = sys.argv[1]
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
    codes = torch.load(folder + "/codes.pt")
    with torch.no_grad():
        out = model(codes, return_loss=True)
        streamed = model.generate(codes[:, 1 + config.dep_q:], progress=False, do_sample=False,
                                  audio_do_sample=False)
    results = {name: getattr(out, name) for name in ("text_logits", "audio_logits", "user_logits", "loss")}
    results.update(text_tokens=streamed.text_tokens, audio_codes=streamed.audio_codes,
                   user_prediction=streamed.user_prediction)
    torch.save(results, folder + "/remote_out.pt")
    print(type(config).__name__, type(model).__name__, type(model.generation_config).__name__,
          model.generation_config.audio_top_k)
    """
)


def load_without_package(folder, codes: torch.Tensor, tmp_path) -> tuple[str, dict]:
    """Runs LOAD_WITHOUT_PACKAGE on `folder` (writing `codes.pt` into it) with an empty HF cache, offline; returns
    the script's stdout and the outputs it saved."""
    torch.save(codes, folder / "codes.pt")
    # The same intra-op thread count as here: a quantized kernel's sums need not be bit-identical across counts.
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": "",
           "OMP_NUM_THREADS": str(torch.get_num_threads())}
    result = subprocess.run([sys.executable, "-c", LOAD_WITHOUT_PACKAGE, str(folder)], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout, torch.load(folder / "remote_out.pt")


def assert_same_outputs(model, codes: torch.Tensor, remote: dict):
    """The outputs LOAD_WITHOUT_PACKAGE saved equal the local model's, NaN positions included."""
    with torch.no_grad():
        local = model(codes, return_loss=True)
    streamed = model.generate(codes[:, 1 + model.config.dep_q:], progress=False, do_sample=False,
                              audio_do_sample=False)
    for name, value in remote.items():
        expected = getattr(local if hasattr(local, name) else streamed, name)
        assert torch.equal(value.nan_to_num(), expected.nan_to_num()), name


def tiny_remote_model() -> MoshiUserPredForConditionalGeneration:
    torch.manual_seed(0)
    config = MoshiUserPredConfig(dim=32, num_heads=2, num_layers=2, depformer_dim=16, depformer_num_heads=2,
                                 depformer_num_layers=1, depformer_dim_feedforward=32, card=20, text_card=24, n_q=6,
                                 dep_q=3, context=6, delays=[0, 0, 1, 1, 0, 1, 1], user_prediction_lookahead=2)
    model = MoshiUserPredForConditionalGeneration(config).eval()
    model.generation_config.audio_top_k = 7  # travels in generation_config.json
    return model


class LocalHub(HfApi):
    """An `HfApi` whose `create_repo`, `create_branch` and `create_commit` write under a local folder,
    `<root>/<repo_id>/...` (branches are not modelled), and are recorded in `calls`; any other public method fails the
    test (nothing may reach the network)."""

    ALLOWED = ("create_repo", "create_branch", "create_commit")

    def __init__(self, root):
        super().__init__(token=False)
        self.root, self.calls = root, []

    def __getattribute__(self, name):
        value = super().__getattribute__(name)
        if callable(value) and not name.startswith("_") and name not in LocalHub.ALLOWED:
            raise AssertionError(f"push_to_hub called HfApi.{name}")
        return value

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))
        (self.root / repo_id).mkdir(parents=True, exist_ok=True)
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def create_branch(self, repo_id, **kwargs):
        self.calls.append(("create_branch", repo_id, kwargs))

    def create_commit(self, repo_id, operations, **kwargs):
        operations = list(operations)
        self.calls.append(("create_commit", repo_id, {**kwargs, "paths": [op.path_in_repo for op in operations]}))
        for operation in operations:
            target = self.root / repo_id / operation.path_in_repo
            target.parent.mkdir(parents=True, exist_ok=True)
            with operation.as_file() as file:
                target.write_bytes(file.read())
        oid = hashlib.sha1(repr(self.calls).encode()).hexdigest()
        return CommitInfo(commit_url=f"https://huggingface.co/{repo_id}/commit/{oid}",
                          commit_message=kwargs["commit_message"], commit_description="", oid=oid)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def serving(model_dir: Path, *args: str):
    """A `serve` process on a free port until the block ends (then SIGTERM); yields its base URL and process, whose
    `log` is the lines it wrote to stderr so far."""
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "NO_TORCH_COMPILE": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "hf_moshi_userpred", "serve", str(model_dir), "--host", "127.0.0.1", "--port", str(port),
         *args],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    log = process.log = []
    threading.Thread(target=lambda: log.extend(process.stderr), daemon=True).start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while not any(f"serving on {url}" in line for line in log):
            assert process.poll() is None, f"serve exited ({process.returncode}): {''.join(log)[-3000:]}"
            assert time.monotonic() < deadline, f"serve did not log 'serving on {url}' in 180 s: {''.join(log)[-3000:]}"
            time.sleep(0.2)
        while True:  # the log line comes just before the socket listens
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                assert time.monotonic() < deadline, "serve did not listen"
                time.sleep(0.1)
        yield url, process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def toy_turn_dialogues(config, n: int = 4, T: int = 40):
    """Turn-taking toy dialogues: codes whose user semantic token is 7 on silent frames, 20 + (position in the word run) on speech; alignments
    with the user speaking frames 5-14 and 25-29, the system 17-22."""
    from hf_moshi_userpred.data.voice_activity import voice_activity

    words = [["a", [5 * 0.08, 15 * 0.08], "SPEAKER_USER"], ["b", [25 * 0.08, 30 * 0.08], "SPEAKER_USER"],
             ["c", [17 * 0.08, 23 * 0.08], "SPEAKER_MAIN"]]
    row = 1 + config.dep_q
    items = []
    for i in range(n):
        torch.manual_seed(i)
        codes = torch.randint(0, config.card, (1 + config.n_q, T))
        codes[0] = torch.randint(0, config.text_card, (T,))
        user = voice_activity(words, T, user=True)
        semantic = torch.full((T,), 7)
        semantic[5:15] = 20 + torch.arange(10)
        semantic[25:30] = 40 + torch.arange(5)
        codes[row] = torch.where(user, semantic, 7)
        items.append({"codes": codes, "name": f"toy{i}"})
    return items, [words] * n
