"""Atomic writes of files and directories, and reading JSON objects."""

from __future__ import annotations

import os
import stat

import pytest

from hf_moshi_userpred.utils.files import atomic_directory, atomic_write, read_json_object, write_json


def listing(folder) -> list[str]:
    return sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*"))


def test_atomic_directory(tmp_path):
    output = tmp_path / "nested" / "out"
    with atomic_directory(output) as staging:
        (staging / "a.txt").write_text("first")
        assert not output.exists()  # nothing visible until the block ends
    assert listing(tmp_path / "nested") == ["out", "out/a.txt"]
    assert output.stat().st_mode == output.parent.stat().st_mode  # a plain mkdir, not mkdtemp's private 0700
    with pytest.raises(ValueError, match="exists and is not empty"):
        with atomic_directory(output):
            pass
    with atomic_directory(output, overwrite=True) as staging:
        (staging / "b.txt").write_text("second")
    assert listing(tmp_path / "nested") == ["out", "out/b.txt"]


def test_a_failed_directory_write_keeps_the_old_one(tmp_path):
    output = tmp_path / "out"
    output.mkdir()
    (output / "old.txt").write_text("old")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_directory(output, overwrite=True) as staging:
            (staging / "new.txt").write_text("new")
            raise RuntimeError("disk full")
    assert listing(tmp_path) == ["out", "out/old.txt"]


def test_atomic_write_replaces_whole_and_respects_the_umask(tmp_path):
    path = tmp_path / "record.json"
    write_json(path, {"a": 1, "text": "é"})
    assert read_json_object(path) == {"a": 1, "text": "é"}
    previous = os.umask(0o022)
    try:
        write_json(path, {"a": 2})
        assert stat.S_IMODE(path.stat().st_mode) == 0o644  # what open() would give, not mkstemp's 0600
    finally:
        os.umask(previous)

    def failing(temporary):
        temporary.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, failing)
    assert read_json_object(path) == {"a": 2}  # the old content, and no temporary file left behind
    assert listing(tmp_path) == ["record.json"]


@pytest.mark.parametrize(
    "content, message",
    [(None, "cannot read the metrics file"), ("{not json", "is not valid JSON"), ("[1, 2]", "must hold a JSON object")],
)
def test_read_json_object_names_the_file_and_the_problem(tmp_path, content, message):
    path = tmp_path / "metrics.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ValueError, match=message):
        read_json_object(path, "metrics file")


def test_files_written_inside_an_atomic_directory_and_saved_weights_respect_the_umask(tmp_path):
    from helpers import tiny_model

    previous = os.umask(0o022)
    try:
        with atomic_directory(tmp_path / "out") as staging:
            (staging / "private").write_text("x")
            os.chmod(staging / "private", 0o600)  # how safetensors leaves its files
            (staging / "tool").write_text("#!/bin/sh\n")
            os.chmod(staging / "tool", 0o700)
            (staging / "sub").mkdir(mode=0o700)
        assert stat.S_IMODE((tmp_path / "out" / "private").stat().st_mode) == 0o644
        assert stat.S_IMODE((tmp_path / "out" / "tool").stat().st_mode) == 0o755
        assert stat.S_IMODE((tmp_path / "out" / "sub").stat().st_mode) == 0o755
        tiny_model().save_pretrained(tmp_path / "model")
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "model").iterdir()}
        assert modes["model.safetensors"] == modes["config.json"] == 0o644, modes
    finally:
        os.umask(previous)
