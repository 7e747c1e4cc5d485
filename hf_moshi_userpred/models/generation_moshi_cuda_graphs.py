"""CUDA graphs for the streaming step: the critical path of a frame is hundreds of small kernels, whose launch cost a
graph replay removes (moshi's `CUDAGraphed`, `moshi/utils/compile.py`, does the same for `LMGen.step`).
"""

from __future__ import annotations

import torch


class CUDAGraphed:
    """Replays `func` as one CUDA graph, as moshi does for its step: an eager warm-up call, then a capture.

    Tensor arguments are copied into static buffers, so every call must use the same shapes; the outputs are
    static tensors that the next call overwrites. Non-tensor arguments must not change.
    """

    def __init__(self, func):
        self.func, self.graph, self.args, self.output, self.warm = func, None, None, None, False

    def __call__(self, *args):
        if not self.warm:
            self.warm = True
            return self.func(*args)
        if self.graph is None:
            self.args = tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.output = self.func(*self.args)
        else:
            for static, value in zip(self.args, args):
                if isinstance(static, torch.Tensor):
                    static.copy_(value)
        self.graph.replay()
        return self.output


__all__ = ["CUDAGraphed"]
