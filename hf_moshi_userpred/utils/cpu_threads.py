"""How many intra-op threads torch gets on the CPU: from the model's size and the cores actually free.

torch starts with one thread per core. For a small model that is the wrong default: a forward or a streaming step
is hundreds of operations of a few microseconds each, and the threads spend their time synchronising; on a machine
where other work already holds the cores, they also spin against it. On a 2-core machine (2 vCPU, no GPU) the demo's
0.6 M-parameter model trained in 77 s when the machine was quiet and in 1503 s with two other jobs running (torch's
default 2 threads), and a streaming step of a tiny model is 10-25x slower with 2 threads than with 1 under load.
A large model's matrix products do split well over free cores, so it gets them all.
"""

from __future__ import annotations

import logging
import math
import os

import torch

logger = logging.getLogger(__name__)

# Below this a model's operations are too small to split over threads (the demo model: 0.6 M parameters; the
# moshiko-shaped benchmark config: 5 M). Moshiko (7.7 B) is far above.
SMALL_MODEL_PARAMETERS = 20_000_000


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity where the platform tells it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def free_cores() -> tuple[int, float]:
    """Cores not busy with other work, from the one-minute load average (at least 1), and that load average
    (0.0 where the platform has none)."""
    cores = usable_cores()
    try:
        busy = os.getloadavg()[0]
    except (AttributeError, OSError):  # Windows
        busy = 0.0
    return max(1, math.floor(cores - busy + 0.5)), busy


def choose_torch_threads(num_parameters: int) -> tuple[int, str]:
    """The intra-op thread count for a model of `num_parameters` on this machine now, and why (for the log).

    Raises:
        ValueError: `num_parameters` is negative.
    """
    if num_parameters < 0:
        raise ValueError(f"num_parameters must be >= 0, got {num_parameters}")
    free, busy = free_cores()
    cores = usable_cores()
    size = f"model of {num_parameters / 1e6:.1f} M parameters"
    load = f"{cores} cores, load {busy:.1f}"
    if num_parameters < SMALL_MODEL_PARAMETERS:
        return 1, f"{size}: too small to split over threads ({load})"
    return free, f"{size}: one per free core ({load})"


def set_torch_threads(num_parameters: int, log_level: int = logging.INFO) -> int:
    """Set torch's intra-op threads with [`choose_torch_threads`] and log the choice at `log_level`, unless the
    user chose (`OMP_NUM_THREADS` set: kept). Returns the count in effect."""
    if os.environ.get("OMP_NUM_THREADS"):
        threads = torch.get_num_threads()
        logger.log(log_level, f"torch threads: {threads} (OMP_NUM_THREADS)")
        return threads
    threads, reason = choose_torch_threads(num_parameters)
    torch.set_num_threads(threads)
    logger.log(log_level, f"torch threads: {threads}, {reason}")
    return threads


__all__ = ["SMALL_MODEL_PARAMETERS", "choose_torch_threads", "free_cores", "set_torch_threads", "usable_cores"]
