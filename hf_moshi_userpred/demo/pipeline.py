"""The main job on the embedded default (`hf-moshi-userpred demo`): the whole pipeline on the shipped sample, offline.

1. encode the shipped dialogue sample (28 espeak-ng dialogues) with its small Mimi and tokenizer;
2. train a tiny model from scratch with the user-loss curriculum (no Moshi weights: nothing is downloaded), then
   add a voice-activity (turn-taking) head and train it alone on the alignments' voice activity, the rest frozen;
3. evaluate user prediction on the 5 held-out dialogues against repeating the last frame and the unigram, fit the
   turn-taking table on the training dialogues, score the turn-taking signals (head and table) at the held-out
   user pauses against silence timers (`turn_taking.py`) and measure the system's dialogue behaviour with and
   without the turn hold (`dialogue_behaviour.py`);
4. stream a held-out dialogue's user channel with speculation (hit rate, critical path saved) and check the tokens
   equal plain streaming;
5. save with `save_pretrained` (with the tokenizer, the Mimi and a model card) and reload through
   `trust_remote_code`;
6. write `report.md` with PNG plots and print a summary table.

About a minute on 2 CPU cores (one torch thread: the model is tiny).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import PrinterCallback
from transformers.utils import logging

from ..data.audio import load_mimi, load_stereo
from ..data.encoding import EncodedDialogues, encode_dataset
from ..data.voice_activity import (
    DEFAULT_HORIZON,
    DEFAULT_TURN_END_FRAMES,
    DialoguesWithVoiceActivity,
    dialogue_alignments,
    fit_turn_taking_statistics,
)
from ..evaluation.dialogue_behaviour import evaluate_dialogue_behaviour
from ..evaluation.turn_taking import evaluate_turn_taking
from ..evaluation.user_prediction import evaluate_user_prediction
from ..hub.conversion import progress_bars
from ..hub.push import build_model_card
from ..models.modeling_moshi_userpred import MoshiUserPredForConditionalGeneration
from ..sample import (
    SAMPLE_DIR,
    SAMPLE_MIMI,
    SAMPLE_NUM_CODEBOOKS,
    SAMPLE_TOKENIZER,
    sample_model_config,
    sample_training_arguments,
)
from ..serving.stream_recording import stream_user_audio
from ..training.modes import prepare_model_for_training
from ..training.train import write_training_config
from ..training.trainer import MoshiUserPredTrainer, MoshiUserPredTrainingArguments
from ..utils.cpu_threads import set_torch_threads
from ..utils.files import METRICS_NAME, MIMI_FOLDER, TOKENIZER_NAME, atomic_directory, atomic_write, write_json
from .report import TURN_HOLD_THRESHOLD, DemoResult, plot_demo, report_markdown, summarize

logger = logging.get_logger(__name__)

HEAD_STEPS_SHARE = 3  # the voice-activity head alone trains for a third of the steps (300: about 8 s, its loss settled)

def run_demo(
    output_dir: str | os.PathLike = "outputs/demo",
    *,
    steps: int = 900,
    speculate_top_k: int = 4,
    seed: int = 0,
    progress: bool = True,
) -> DemoResult:
    """Runs the demo (see the module docstring); `result.describe()` is its summary table.

    Args:
        output_dir: created if needed; a previous run's encoded data is reused (the encode is resumable), the rest is
            replaced.
        steps: training steps (900 reach the learning bar of the tests: held-out delay-0 accuracy above both
            baselines).
        speculate_top_k: candidate next user tokens precomputed per frame.
        seed: seeds the initialisation, the segment sampling and the streaming sampler.
        progress: progress bars.

    Raises:
        ValueError: `steps` or `speculate_top_k` out of range.
        ImportError: matplotlib is missing (`pip install 'hf_moshi_userpred[plots]'`).
    """
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if not 1 <= speculate_top_k <= 64:
        raise ValueError(f"speculate_top_k must be within 1..64 (the sample's audio vocabulary), got {speculate_top_k}")
    threads = torch.get_num_threads()
    try:
        with progress_bars(progress):  # Transformers' own bars (loading, saving) follow `progress` too
            return _run_demo(Path(output_dir), steps, speculate_top_k, seed, progress)
    finally:
        torch.set_num_threads(threads)


def _run_demo(out: Path, steps: int, speculate_top_k: int, seed: int, progress: bool) -> DemoResult:
    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = MoshiUserPredForConditionalGeneration(sample_model_config())
    set_torch_threads(model.num_parameters())  # the demo's model is tiny: one thread, however many cores
    mimi = load_mimi(SAMPLE_MIMI)

    _say("1/6 encoding the shipped dialogue sample")
    splits = {}
    for split in ("train", "eval"):
        summary = encode_dataset(SAMPLE_DIR / f"{split}.jsonl", out / "encoded" / split, mimi=mimi,
                                 tokenizer=SAMPLE_TOKENIZER, num_codebooks=SAMPLE_NUM_CODEBOOKS,
                                 progress=progress)
        if summary.failed:
            raise ValueError(f"the shipped sample failed to encode: {summary}")
        splits[split] = EncodedDialogues(out / "encoded" / split)
    train, held_out = splits["train"], splits["eval"]

    _say(f"2/6 training a tiny model for {steps} steps with the user-loss curriculum, then its turn-taking head")
    alignments = {split: dialogue_alignments(out / "encoded" / split) for split in ("train", "eval")}
    model, args, train_metrics, train_s, log_history = train_sample_model(
        model, train, held_out, alignments["train"], alignments["eval"], out, steps, seed, progress)

    _say("3/6 evaluating user prediction, turn taking and dialogue behaviour on the held-out dialogues")
    report = evaluate_user_prediction(model, held_out, reference=train, plot_dir=out / "plots")
    turn_statistics = fit_turn_taking_statistics(train, alignments["train"], model.config)
    turn_taking = evaluate_turn_taking(model, held_out, alignments["eval"], turn_statistics, plot_dir=out / "plots")
    behaviour = evaluate_dialogue_behaviour(model, held_out, alignments["eval"], turn_statistics,
                                            hold_thresholds=(None, TURN_HOLD_THRESHOLD), seed=seed,
                                            plot_dir=out / "plots")

    dialogue = _manifest_paths(SAMPLE_DIR / "eval.jsonl")[0]
    _say(f"4/6 streaming held-out dialogue {dialogue.name} with speculation (k={speculate_top_k})")
    user_audio = load_stereo(dialogue, mimi.config.sampling_rate)[1]  # the right channel is the user
    stream = stream_user_audio(model, user_audio, out / "stream", mimi=mimi, tokenizer=SAMPLE_TOKENIZER,
                               speculate_top_k=speculate_top_k, seed=seed, progress=progress)
    plain = model.generate(stream.user_codes[None], seed=seed, progress=False)  # the same frames, no speculation
    plain_ms = 1e3 * plain.speculation.critical_normal_s / max(plain.speculation.normal_steps, 1)
    lossless = torch.equal(plain.text_tokens[0], stream.text_tokens) and torch.equal(plain.audio_codes[0],
                                                                                    stream.audio_codes)

    _say("5/6 saving with save_pretrained and reloading through trust_remote_code")
    model_dir = out / "model"
    with atomic_directory(model_dir, overwrite=True) as staging:
        model.save_pretrained(staging)
        shutil.copy(SAMPLE_TOKENIZER, staging / TOKENIZER_NAME)  # what `stream` reads by default
        shutil.copytree(SAMPLE_MIMI, staging / MIMI_FOLDER)
        write_training_config(staging, args, train_metrics,
                              model={"init": "random (hf_moshi_userpred.sample.sample_model_config)",
                                     "training_mode": "full"},
                              data={"train_data": "hf_moshi_userpred/sample/train.jsonl (23 dialogues)",
                                    "eval_data": "hf_moshi_userpred/sample/eval.jsonl (5 dialogues)"})
        record = {"metrics": report.to_dict(), "markdown": report.to_markdown(), "dataset": "shipped sample, held out"}
        write_json(staging / METRICS_NAME, record)
        turn_statistics.save(staging)  # `serve` and `evaluate --turn-taking` read them from the model folder
        build_model_card(staging, "your-name/moshi-userpred-demo", base_model=None).save(staging / "README.md")
    window = held_out[0]["codes"][None, :, : model.config.context]
    with torch.no_grad():
        ours = model(window)
    theirs = logits_through_remote_code(model_dir, window)
    reload_identical = all(torch.equal(getattr(ours, name).nan_to_num(), theirs[name].nan_to_num()) for name in theirs)

    _say("6/6 writing the report")
    plots = {**report.plots, **turn_taking.plots, **behaviour.plots}
    plots.update(plot_demo(log_history, stream, out / "plots"))
    summary = summarize(report, stream, plain_ms, speculate_top_k, lossless, reload_identical, train_s,
                       time.perf_counter() - start, steps, _head_steps(steps), model, behaviour, turn_taking)
    result = DemoResult(out, report, stream, lossless, reload_identical, summary, plots, behaviour, turn_taking)
    write_json(out / "summary.json", summary)
    report_text = report_markdown(result)
    atomic_write(out / "report.md", lambda path: path.write_text(report_text, encoding="utf-8"))
    return result


_REMOTE_CODE_LOGITS = """
import sys
sys.modules["hf_moshi_userpred"] = None  # the reload must not fall back on the installed package
import torch
from transformers import AutoModel

model_dir, codes_path, out_path = sys.argv[1:]
model = AutoModel.from_pretrained(model_dir, trust_remote_code=True).eval()
assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
with torch.no_grad():
    out = model(torch.load(codes_path))
torch.save({name: getattr(out, name) for name in ("text_logits", "audio_logits", "user_logits",
                                                 "voice_activity_logits") if getattr(out, name) is not None},
           out_path)
"""


def logits_through_remote_code(model_dir: str | os.PathLike, codes: torch.Tensor) -> dict[str, torch.Tensor]:
    """Loads `model_dir` with `AutoModel.from_pretrained(..., trust_remote_code=True)` in a fresh Python process in
    which `hf_moshi_userpred` cannot be imported (as on a machine without the package; offline), and returns its
    `text_logits`, `audio_logits`, `user_logits` (and `voice_activity_logits` with a head) for `codes`
    `[B, 1 + n_q, T]`.

    Raises:
        RuntimeError: the reload failed (its stderr's last lines are in the message).
    """
    with tempfile.TemporaryDirectory() as scratch:
        codes_path, out_path = os.path.join(scratch, "codes.pt"), os.path.join(scratch, "out.pt")
        torch.save(codes, codes_path)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
        result = subprocess.run([sys.executable, "-c", _REMOTE_CODE_LOGITS, os.path.abspath(model_dir), codes_path,
                                 out_path], cwd=scratch, env=env, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"loading {model_dir} through trust_remote_code failed:\n{result.stderr[-2000:]}")
        return torch.load(out_path)


def train_sample_model(
    model: MoshiUserPredForConditionalGeneration, train: Sequence, held_out: Sequence, train_alignments: Sequence,
    eval_alignments: Sequence, out: Path, steps: int, seed: int = 0, progress: bool = False,
) -> tuple[MoshiUserPredForConditionalGeneration, MoshiUserPredTrainingArguments, dict, float, list[dict]]:
    """The demo's recipe: `model` trained `steps` steps with the user-loss curriculum
    ([`sample_training_arguments`], outputs under `out / "training"`), then given a voice-activity head trained alone
    for a third as many steps on the dialogues' voice activity (`out / "training_head"`; what the model says and
    predicts stays as it is). Returns the model (in eval mode), the first run's arguments, its metrics, its seconds
    and its log history."""
    args = sample_training_arguments(out / "training", steps, seed, progress)
    trainer = MoshiUserPredTrainer(model=model, args=args, train_dataset=train, eval_dataset=held_out)
    if not progress:
        trainer.remove_callback(PrinterCallback)  # it prints every log dict when the progress bar is off
    train_start = time.perf_counter()
    train_metrics = trainer.train().metrics
    train_s = time.perf_counter() - train_start
    model.add_voice_activity_head(DEFAULT_HORIZON, DEFAULT_TURN_END_FRAMES)
    prepare_model_for_training(model, "voice_activity_head")
    head_trainer = MoshiUserPredTrainer(
        model=model, args=sample_training_arguments(out / "training_head", _head_steps(steps), seed, progress),
        train_dataset=DialoguesWithVoiceActivity(train, train_alignments),
        eval_dataset=DialoguesWithVoiceActivity(held_out, eval_alignments))
    if not progress:
        head_trainer.remove_callback(PrinterCallback)
    head_trainer.train()
    model.requires_grad_(True)
    return model.eval(), args, train_metrics, train_s, trainer.state.log_history


def _head_steps(steps: int) -> int:
    return max(steps // HEAD_STEPS_SHARE, 1)


def _say(message: str) -> None:
    logger.info(message)


def _manifest_paths(manifest: Path) -> list[Path]:
    lines = [line for line in manifest.read_text().splitlines() if line.strip()]
    return [manifest.parent / json.loads(line)["path"] for line in lines]


__all__ = ["DemoResult", "logits_through_remote_code", "run_demo", "train_sample_model"]
