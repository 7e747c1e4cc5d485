"""Files this package writes and reads: atomic writes of a file or a whole directory, JSON objects, and the names of
the files inside a model directory.

Every write goes through a temporary file or directory beside its target, renamed into place once complete, so a
reader (or a crash) never sees half a file; files get the permissions the umask gives, like any other file.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# Inside a model directory, beside Transformers' config.json, generation_config.json and weights:
TOKENIZER_NAME = "tokenizer.model"  # the sentencepiece model of the text stream
MIMI_FOLDER = "mimi"  # a Transformers `MimiModel` folder (also looked for inside a kyutai checkpoint directory)
TRAINING_CONFIG_NAME = "training_config.json"  # the training arguments `train` used (rendered into the model card)
METRICS_NAME = "user_prediction_metrics.json"  # what `evaluate` measured (rendered into the model card)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> None:
    """Writes `path` through `write(temporary_path)` and a rename, so readers never see a partial file.

    Raises:
        Whatever `write` raises; `path` is then left as it was.
    """
    path = Path(path)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        write(Path(temporary))
        os.chmod(temporary, 0o666 & ~_umask())  # mkstemp's 0600 is for the temporary file only
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def write_json(path: str | os.PathLike, content: Any) -> None:
    """Writes `content` as indented JSON to `path`, atomically."""
    text = json.dumps(content, indent=2, ensure_ascii=False, default=str) + "\n"
    atomic_write(path, lambda temporary: temporary.write_text(text, encoding="utf-8"))


def read_json_object(path: str | os.PathLike, what: str = "file") -> dict[str, Any]:
    """The JSON object in `path`.

    Raises:
        ValueError: the file cannot be read, is not JSON, or holds something else than an object (`what` names it).
    """
    try:
        content = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"cannot read the {what} {str(path)!r}: {error}") from error
    except ValueError as error:
        raise ValueError(f"the {what} {str(path)!r} is not valid JSON: {error}") from error
    if not isinstance(content, dict):
        raise ValueError(f"the {what} {str(path)!r} must hold a JSON object, got {type(content).__name__}")
    return content


def check_output_dir(output_dir: str | os.PathLike, overwrite: bool, source: Path | None = None) -> Path:
    """`output_dir` as an absolute path, refused when it is a file or inside one, a non-empty directory (without
    `overwrite`), a place this process cannot write, or would replace, contain or sit inside `source` (sources are
    never modified). Nothing is created: a command checks its output before any work, and creates it once its
    inputs have proved valid, so that a failed run leaves no empty folder behind.

    Raises:
        ValueError: naming the directory and the problem.
    """
    output = Path(output_dir).absolute()
    if source is not None:
        resolved, source_resolved = output.resolve(), source.resolve()
        if source_resolved in (resolved, *resolved.parents) or resolved in source_resolved.parents:
            raise ValueError(f"output directory {str(output_dir)!r} overlaps the source {str(source)!r}; sources are "
                             "never modified")
    if output.exists():
        if not output.is_dir():
            raise ValueError(f"output_dir {str(output_dir)!r} is a file: the output exists and is not a directory")
        if any(output.iterdir()) and not overwrite:
            raise ValueError(f"output directory {str(output_dir)!r} exists and is not empty (pass overwrite=True, "
                             "or --overwrite, to replace it)")
    existing = next(parent for parent in (output, *output.parents) if parent.exists())
    if not existing.is_dir():
        raise ValueError(f"output_dir {str(output_dir)!r} is inside a file ({existing}): it must be a folder")
    try:  # a probe rather than os.access: root passes every mode check, yet cannot create anything under /sys
        os.rmdir(tempfile.mkdtemp(prefix=".write-probe-", dir=existing))
    except OSError as error:
        raise ValueError(f"output_dir {str(output_dir)!r} cannot be written: {existing}: "
                         f"{error.strerror or error}") from error
    return output


def copy_codec_files(source_dir: str | os.PathLike, target_dir: str | os.PathLike) -> list[str]:
    """Copies the text tokenizer and the Mimi folder of the model folder `source_dir` into `target_dir`, those the
    target lacks, so that a model folder made from another (trained, quantized) streams, serves and is pushed as it
    is. Each is copied beside its final name, then renamed into place. Returns the names copied.
    """
    source, target = Path(source_dir), Path(target_dir)
    copied = []
    for name, copy in ((TOKENIZER_NAME, shutil.copyfile), (MIMI_FOLDER, shutil.copytree)):
        if (source / name).exists() and not (target / name).exists():
            staging = target / f".{name}.{uuid.uuid4().hex}.tmp"
            try:
                copy(source / name, staging)
                staging.rename(target / name)
            finally:
                if staging.is_dir():
                    shutil.rmtree(staging)
                elif staging.exists():
                    staging.unlink()
            copied.append(name)
    return copied


def _umask_modes(folder: Path) -> None:
    """Gives the files and folders under `folder` the modes the umask gives new ones (libraries such as safetensors
    write their files 0600), keeping execute bits where they were set."""
    mask = _umask()
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in dirnames:
            os.chmod(Path(dirpath) / name, 0o777 & ~mask)
        for name in filenames:
            path = Path(dirpath) / name
            if not path.is_symlink():
                executable = os.stat(path).st_mode & 0o111
                os.chmod(path, (0o777 if executable else 0o666) & ~mask)


@contextmanager
def atomic_directory(output_dir: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Writes a directory all at once: yields an empty staging directory next to `output_dir`, renamed to `output_dir`
    when the block exits cleanly (an existing `output_dir` is replaced only then). If the block raises, the staging
    directory is removed and `output_dir` is left as it was.

        with atomic_directory("outputs/model", overwrite=True) as staging:
            model.save_pretrained(staging)

    Args:
        output_dir: the directory to write (its parents are created).
        overwrite (`bool`): replace an existing non-empty `output_dir`.

    Yields:
        `Path`: the staging directory to write into.

    Raises:
        ValueError: `output_dir` is a file, or a non-empty directory without `overwrite`.
    """
    output = check_output_dir(output_dir, overwrite)
    output.parent.mkdir(parents=True, exist_ok=True)
    # mkdir (not mkdtemp, whose 0700 mode the output would keep) with a name no other writer uses.
    staging = output.parent / f".{output.name}.{uuid.uuid4().hex[:12]}.tmp"
    staging.mkdir()
    try:
        yield staging
        _umask_modes(staging)
        if not output.exists():
            os.replace(staging, output)
            return
        # A directory can only be renamed onto an empty one: move the old output aside first.
        previous = staging.with_suffix(".old")
        os.replace(output, previous)
        try:
            os.replace(staging, output)
        except BaseException:
            os.replace(previous, output)
            raise
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(previous)


__all__ = ["METRICS_NAME", "MIMI_FOLDER", "TOKENIZER_NAME", "TRAINING_CONFIG_NAME", "atomic_directory", "atomic_write",
           "check_output_dir", "copy_codec_files", "read_json_object", "write_json"]
