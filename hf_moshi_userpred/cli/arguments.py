"""What the commands share: the parser classes, and the checks and loaders of their common arguments."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from pathlib import Path

DTYPES = ("float32", "bfloat16", "float16")


class Parser(argparse.ArgumentParser):
    """argparse with its mistakes (unknown flag, missing argument) on one stderr line, exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


class Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults appended to the help, except where the help already says its default (`(default: all)`)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help = action.help or ""
        return help if "default:" in help or "%(default)" in help else super()._get_help_string(action)


def add_command(commands: argparse._SubParsersAction, name: str, run: Callable, help: str,
                description: str | None = None) -> argparse.ArgumentParser:
    """A subcommand `name` whose parsed arguments go to `run(args)`."""
    sub = commands.add_parser(name, help=help, description=description or help, formatter_class=Formatter)
    sub.set_defaults(run=run)
    return sub


def _number_type(convert: Callable[[str], float], accepts: Callable[[float], bool], what: str) -> Callable:
    """An argparse type: the value converted by `convert` and refused unless `accepts` it, as the parser's one-line
    error (`argument --top-k: must be an integer >= 1, got 0`)."""

    def parse(value: str):
        try:
            number = convert(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {value!r}") from None
        if not accepts(number):
            raise argparse.ArgumentTypeError(f"must be {what}, got {number}")
        return number

    return parse


positive_int = _number_type(int, lambda number: number >= 1, "an integer >= 1")  # a count of frames, windows, steps
probability = _number_type(float, lambda number: 0 <= number <= 1, "a probability in [0, 1]")


def torch_dtype(name: str | None):
    """The torch dtype called `name` (None: keep the saved one)."""
    import torch

    return None if name is None else getattr(torch, name)


def existing_path(value: str) -> Path:
    """`value` as a Path, refused unless it exists."""
    path = Path(value)
    if not path.exists():
        raise ValueError(f"{value!r} does not exist")
    return path


def check_device(name: str) -> str:
    """`name` if torch can put tensors there, else a ValueError saying why (misspelled, no CUDA build, no GPU)."""
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as error:
        raise ValueError(f"--device {name!r} is not a torch device (e.g. cpu, cuda, cuda:1, mps)") from error
    if device.type == "cuda":
        if torch.version.cuda is None or not torch.cuda.is_available():
            why = "this torch is a CPU-only build" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ValueError(f"--device {name!r}: {why}; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name!r}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"--device {name!r}: MPS is not available on this machine; use --device cpu")
    elif device.type != "cpu" and not getattr(getattr(torch, device.type, None), "is_available", lambda: False)():
        raise ValueError(f"--device {name!r}: {device.type} is not available here; use --device cpu")
    return name


def load_model(path: str, dtype: str | None = None, device: str = "cpu"):
    """The model directory at `path` (refused unless it is a complete model of this package), on `device`."""
    import torch

    from ..models.modeling_moshi_userpred import MoshiUserPredForConditionalGeneration
    from ..utils.cpu_threads import set_torch_threads

    check_device(device)
    folder = existing_path(path)
    model = MoshiUserPredForConditionalGeneration.from_pretrained(folder, dtype=torch_dtype(dtype))
    if torch.device(device).type == "cpu":  # logged at debug: the long jobs (demo, train) say it at info
        set_torch_threads(model.num_parameters(), logging.DEBUG)
    return model.to(device).eval()
