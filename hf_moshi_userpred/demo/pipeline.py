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
from dataclasses import dataclass, field
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
from ..evaluation.dialogue_behaviour import DialogueBehaviourReport, evaluate_dialogue_behaviour, setting_name
from ..evaluation.turn_taking import evaluate_turn_taking
from ..evaluation.turn_taking_metrics import TurnTakingReport
from ..evaluation.user_prediction import UserPredictionReport, evaluate_user_prediction, save_figures
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
from ..serving.stream_recording import StreamResult, stream_user_audio
from ..training.modes import prepare_model_for_training
from ..training.train import write_training_config
from ..training.trainer import MoshiUserPredTrainer, MoshiUserPredTrainingArguments
from ..utils.cpu_threads import set_torch_threads
from ..utils.files import METRICS_NAME, MIMI_FOLDER, TOKENIZER_NAME, atomic_directory, atomic_write, write_json

logger = logging.get_logger(__name__)

TURN_HOLD_THRESHOLD = 0.5  # the demo's turn hold: no new word while P(turn end) < 0.5
HEAD_STEPS_SHARE = 3  # the voice-activity head alone trains for a third of the steps (300: about 8 s, its loss settled)

@dataclass
class DemoResult:
    """What [`run_demo`] measured and wrote.

    Args:
        output_dir: where everything is (`encoded/`, `model/`, `stream/`, `plots/`, `report.md`).
        report: the held-out user-prediction report.
        stream: the speculative streaming run over the held-out dialogue.
        lossless: the speculative run's tokens equal plain streaming's.
        reload_identical: the `trust_remote_code` reload gives identical logits.
        summary: the printed table's rows (name -> value) as numbers, also in `summary.json`.
        plots: name -> PNG path.
        behaviour: the system's dialogue behaviour on the held-out dialogues, without and with the turn hold.
        turn_taking: the turn-taking signals at the held-out user pauses against silence timers.
    """

    output_dir: Path
    report: UserPredictionReport
    stream: StreamResult
    lossless: bool
    reload_identical: bool
    summary: dict[str, float | int | bool | str] = field(default_factory=dict)
    plots: dict[str, str] = field(default_factory=dict)
    behaviour: DialogueBehaviourReport | None = None
    turn_taking: TurnTakingReport | None = None

    def describe(self) -> str:
        """The summary table and where the report and the model are."""
        return (f"{_summary_table(self.summary)}\n\nreport: {self.output_dir / 'report.md'}  "
                f"model: {self.output_dir / 'model'}")


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
    summary = _summary(report, stream, plain_ms, speculate_top_k, lossless, reload_identical, train_s,
                       time.perf_counter() - start, steps, model, behaviour, turn_taking)
    result = DemoResult(out, report, stream, lossless, reload_identical, summary, plots, behaviour, turn_taking)
    write_json(out / "summary.json", summary)
    report_text = _report_markdown(result)
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


def _summary(report: UserPredictionReport, stream: StreamResult, plain_ms: float, k: int, lossless: bool,
             reload_identical: bool, train_s: float, total_s: float, steps: int,
             model: MoshiUserPredForConditionalGeneration, behaviour: DialogueBehaviourReport,
             turn_taking: TurnTakingReport) -> dict:
    m, last, uni = report.model, report.repeat_last, report.unigram
    head, timer = turn_taking.predictors["vap_head"], turn_taking.predictors["timer_500ms"]
    free, held = behaviour.settings["model"], behaviour.settings[setting_name(TURN_HOLD_THRESHOLD)]
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "training_steps": steps,
        "training_s": round(train_s, 1),
        "held_out_delay0_accuracy": m.delay0_accuracy,
        "repeat_last_delay0_accuracy": last.delay0_accuracy,
        "unigram_delay0_accuracy": uni.delay0_accuracy,
        "held_out_accuracy": m.accuracy,
        f"held_out_delay0_top{report.top_k}_accuracy": m.delay0_top_k_accuracy,
        "delay0_ece": report.delay0_ece,
        "stream_frames": len(stream.statuses),
        "speculate_top_k": k,
        "speculation_hit_rate": stream.hit_rate,
        "critical_ms_hit_mean": stream.critical_ms_hit_mean,
        "critical_ms_normal_mean": stream.critical_ms_normal_mean,
        "critical_ms_mean": stream.critical_ms_mean,
        "critical_ms_mean_without_speculation": plain_ms,
        "critical_path_saved_fraction": 1 - stream.critical_ms_mean / plain_ms,
        "tokens_identical_to_plain_streaming": lossless,
        "trust_remote_code_reload_identical": reload_identical,
        "turn_signal_balanced_accuracy": head.shift_hold.balanced_accuracy,
        "turn_signal_auc": head.shift_hold.auc,
        "turn_signal_frame_auc": turn_taking.frames["vap_head"].auc,
        "turn_signal_pauses": turn_taking.num_shifts + turn_taking.num_holds,
        "timer_500ms_balanced_accuracy": timer.shift_hold.balanced_accuracy,
        "turn_hold_threshold": TURN_HOLD_THRESHOLD,
        "pause_takeover_rate": free.pause_takeover_rate,
        "pause_takeover_rate_with_turn_hold": held.pause_takeover_rate,
        "response_rate": free.response_rate,
        "response_rate_with_turn_hold": held.response_rate,
        "total_s": round(total_s, 1),
    }


def _summary_table(s: dict) -> str:
    def pct(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:.1f}%"

    def ms(x: float | None) -> str:  # None: no such step (e.g. no speculation hit in a short run)
        return "-" if x is None else f"{x:.1f} ms"

    k = s["speculate_top_k"]
    rows = [
        ("model", f"{s['parameters'] / 1e6:.2f} M parameters, {s['training_steps']} steps in {s['training_s']:.0f} s"),
        ("held-out next user token (delay-0)", f"{pct(s['held_out_delay0_accuracy'])} (repeat-last "
         f"{pct(s['repeat_last_delay0_accuracy'])}, unigram {pct(s['unigram_delay0_accuracy'])})"),
        (f"speculation hit rate (k={k}, {s['stream_frames']} frames)", pct(s["speculation_hit_rate"])),
        ("critical path per frame", f"{ms(s['critical_ms_mean'])} with speculation vs "
         f"{ms(s['critical_ms_mean_without_speculation'])} without "
         f"({pct(s['critical_path_saved_fraction'])} saved; hits {ms(s['critical_ms_hit_mean'])})"),
        ("speculative tokens identical to plain streaming",
         "yes" if s["tokens_identical_to_plain_streaming"] else "NO"),
        ("trust_remote_code reload: identical logits", "yes" if s["trust_remote_code_reload_identical"] else "NO"),
        (f"turn end at {s['turn_signal_pauses']} user pauses: balanced accuracy / AUC",
         f"{pct(s['turn_signal_balanced_accuracy'])} / {s['turn_signal_auc']:.2f} voice-activity head, at once "
         f"(500 ms timer: {pct(s['timer_500ms_balanced_accuracy'])}, 560 ms later)"),
        (f"pause takeover / turn ends answered (hold {s['turn_hold_threshold']:g})",
         f"{pct(s['pause_takeover_rate'])} / {pct(s['response_rate'])} without the turn hold, "
         f"{pct(s['pause_takeover_rate_with_turn_hold'])} / {pct(s['response_rate_with_turn_hold'])} with it"),
        ("total time", f"{s['total_s']:.0f} s"),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def _report_markdown(result: DemoResult) -> str:
    s, plots = result.summary, result.plots
    table = "\n".join(f"| {line[:line.index('  ')].strip()} | {line[line.index('  '):].strip()} |"
                      for line in _summary_table(s).splitlines())

    def image(name: str, caption: str) -> str:
        return f"![{caption}](plots/{Path(plots[name]).name})" if name in plots else ""

    return f"""# hf_moshi_userpred demo report

A tiny Moshi with the user-prediction Depformer, trained from scratch on the shipped espeak-ng dialogue sample
(23 dialogues; 5 held out), then streamed over a held-out dialogue with speculative streaming.

| | |
|---|---|
{table}

## Training

{image("loss_curves", "loss curves")}

## User prediction on the held-out dialogues

{result.report.to_markdown()}

{image("per_codebook_accuracy", "per-codebook accuracy")}
{image("reliability", "reliability")}

## Speculative streaming

At each frame the user Depformer proposes its {s['speculate_top_k']} most likely next user tokens and the next step is
precomputed for each while waiting for the frame; when the real frame matches one (a hit), only a commit is left on
the critical path. Tokens are identical to plain streaming: {"yes" if result.lossless else "NO"}.

{image("speculation", "speculation over time")}

## Turn taking

The turn-taking signal, P(the user's turn ends within the next {result.turn_taking.horizon * result.turn_taking.frame_ms:.0f} ms), at the held-out user pauses (shift: the
user's turn ended; hold: the user goes on), decided as soon as the last frame of user speech is in, next to silence
timers that decide later: `vap_head` is the model's voice-activity head (trained alone for {_head_steps(s["training_steps"])} steps after the
model), `model` the token table under the user branch's prediction. The sample's pauses inside a turn are all short,
so a timer of 500 ms or more is never wrong on it, only late; and a handful of pauses is not a measurement (one moves
a rate by 20-25 points): the per-frame table scores every frame, and `benchmarks/bench_turn_taking.py`
cross-validates over all 28 dialogues, also with longer pauses.

{result.turn_taking.to_markdown()}

{image("turn_taking_timeline", "turn-taking timeline")}
{image("turn_taking_roc", "shift vs hold ROC")}

## Dialogue behaviour (Full-Duplex-Bench style)

The held-out dialogues' user channels streamed through the model (sampling seed {result.behaviour.seed}), without and
with the turn hold (the text held on padding while the voice-activity head's P(turn end) is below
{s['turn_hold_threshold']:g}), scored at the recording's user events; `recorded` is the recorded system measured the
same way. Five short dialogues give a handful of events: a first look, not a result.

{result.behaviour.to_markdown()}

{image("dialogue_behaviour_timeline", "dialogue behaviour timeline")}

Files: `model/` (loads with `AutoModel.from_pretrained(..., trust_remote_code=True)`; `model/README.md` is its model
card; `model/turn_taking_statistics.json` the turn-taking table), `stream/` (system.wav, dialogue.wav,
text.txt, frames.jsonl), `encoded/`, `summary.json`.
"""


# ------------------------------------------------------------------------------------------------------ plots
def plot_demo(log_history: list[dict], stream: StreamResult, plot_dir: str | os.PathLike) -> dict[str, str]:
    """Writes `loss_curves.png` (training loss parts and the held-out losses over steps, the user weight) and
    `speculation.png` (hits and misses per frame with the rolling hit rate, and the critical path per frame).

    Returns:
        `{"loss_curves": path, "speculation": path}`.

    Raises:
        ImportError: matplotlib is missing (`pip install 'hf_moshi_userpred[plots]'`).
    """
    return save_figures(plot_dir, {"loss_curves": (lambda figure: _plot_losses(log_history, figure), (9, 4.5)),
                                   "speculation": (lambda figure: _plot_speculation(stream, figure), (9, 5))})


def _plot_losses(log_history: list[dict], figure):
    axes = figure.subplots()
    for part, label, color in (("text", "text", "tab:blue"), ("audio", "system audio", "tab:orange"),
                               ("user", "user audio", "tab:green")):
        for key, suffix, style in ((f"loss/{part}", "", "-"), (f"eval_loss/{part}", " (held out)", "--")):
            points = [(entry["step"], entry[key]) for entry in log_history if key in entry]
            if points:
                axes.plot(*zip(*points), style, color=color, label=label + suffix,
                          marker="o" if suffix else None, markersize=3)
    axes.set_xlabel("step")
    axes.set_ylabel("cross-entropy (nats)")
    weights = [(entry["step"], entry["user_weight"]) for entry in log_history if "user_weight" in entry]
    if weights:
        twin = axes.twinx()
        twin.step(*zip(*weights), where="post", color="grey", alpha=0.5, label="user loss weight")
        twin.set_ylabel("user loss weight (curriculum)")
        twin.set_ylim(0, 1.1 * max(1e-6, max(w for _, w in weights)))
        twin.legend(loc="upper center", fontsize=8)
    axes.legend(fontsize=8, ncols=2)
    axes.set_title("training and held-out losses")
    return figure


def _plot_speculation(stream: StreamResult, figure):
    top, bottom = figure.subplots(2, 1, sharex=True, height_ratios=(1, 1.4))
    times = [i / stream.frame_rate for i in range(len(stream.statuses))]
    hits = [1.0 if status == "hit" else 0.0 for status in stream.statuses]
    tried = [status != "not_tried" for status in stream.statuses]
    colors = {"hit": "tab:green", "miss": "tab:red", "not_tried": "lightgrey"}
    top.vlines(times, 0, 1, colors=[colors[status] for status in stream.statuses], linewidth=1.5)
    window = 12  # about one second of frames
    rolling = []
    for i in range(len(hits)):
        lo = max(0, i - window + 1)
        n = sum(tried[lo : i + 1])
        rolling.append(sum(hits[lo : i + 1]) / n if n else float("nan"))
    top.plot(times, rolling, color="black", label="hit rate (1 s window)")
    top.set_ylim(0, 1.05)
    top.set_ylabel("hit (green) / miss (red)")
    top.legend(loc="lower right", fontsize=8)
    top.set_title(f"speculation over a held-out dialogue: {100 * stream.hit_rate:.0f}% hits")
    for status in ("hit", "miss", "not_tried"):
        points = [(t, ms) for t, ms, s in zip(times, stream.critical_ms, stream.statuses) if s == status]
        if points:
            bottom.scatter(*zip(*points), s=8, color=colors[status], label=status.replace("_", " "))
    bottom.set_ylabel("critical path (ms)")
    bottom.set_xlabel("time (s)")
    bottom.legend(fontsize=8)
    return figure


__all__ = ["DemoResult", "logits_through_remote_code", "plot_demo", "run_demo"]
