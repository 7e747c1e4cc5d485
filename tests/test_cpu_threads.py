"""The torch thread count from the model size and the free cores, and where the package applies it."""

from __future__ import annotations

import logging

import pytest
import torch

from hf_moshi_userpred.utils import cpu_threads
from hf_moshi_userpred.utils.cpu_threads import SMALL_MODEL_PARAMETERS, choose_torch_threads, free_cores, set_torch_threads


@pytest.fixture
def machine(monkeypatch):
    """A machine of `cores` cores with a one-minute load average of `load`."""
    def make(cores: int, load: float) -> None:
        monkeypatch.setattr(cpu_threads.os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
        monkeypatch.setattr(cpu_threads.os, "getloadavg", lambda: (load, load, load))
    return make


@pytest.mark.parametrize("cores, load, expected", [(8, 0.0, 8), (8, 3.2, 5), (8, 2.6, 5), (2, 2.0, 1), (2, 7.5, 1)])
def test_a_large_model_gets_the_free_cores(machine, cores, load, expected):
    machine(cores, load)
    assert free_cores() == (expected, load)
    threads, reason = choose_torch_threads(7_700_000_000)
    assert threads == expected
    assert reason == f"model of 7700.0 M parameters: one per free core ({cores} cores, load {load:.1f})"


@pytest.mark.parametrize("load", [0.0, 1.9])
def test_a_small_model_gets_one_thread_on_a_quiet_or_busy_machine(machine, load):
    machine(16, load)
    assert choose_torch_threads(SMALL_MODEL_PARAMETERS - 1)[0] == 1
    assert choose_torch_threads(SMALL_MODEL_PARAMETERS)[0] == 16 - round(load)


def test_negative_parameters_are_refused():
    with pytest.raises(ValueError, match="num_parameters must be >= 0, got -1"):
        choose_torch_threads(-1)


def test_set_torch_threads_logs_and_respects_omp_num_threads(machine, monkeypatch, caplog):
    machine(4, 0.0)
    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        with caplog.at_level(logging.INFO, logger="hf_moshi_userpred"):
            assert set_torch_threads(600_000) == 1
        assert torch.get_num_threads() == 1
        assert "torch threads: 1, model of 0.6 M parameters: too small to split over threads (4 cores, load 0.0)" \
            in caplog.text
        torch.set_num_threads(3)
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        assert set_torch_threads(600_000) == 3  # the user's choice stands
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


def test_the_cli_loads_a_small_model_with_one_thread(tmp_path, monkeypatch, caplog):
    from helpers import tiny_model

    from hf_moshi_userpred.cli.arguments import load_model

    tiny_model().save_pretrained(tmp_path)
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    torch.set_num_threads(2)
    try:
        with caplog.at_level(logging.DEBUG, logger="hf_moshi_userpred"):
            load_model(str(tmp_path))
        assert torch.get_num_threads() == 1
        assert "too small to split over threads" in caplog.text
    finally:
        torch.set_num_threads(before)
