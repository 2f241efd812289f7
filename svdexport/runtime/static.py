"""The GPU hot path: a graph replayed from a captured CUDA graph over static input buffers (as gpt-fast does).

A `StaticGraph` owns one buffer per input, allocated at the first call. Each call copies the new inputs into
those buffers in place (skipping inputs unchanged since the last copy: the bases, the conditioning) and
replays the captured graph, which reads the buffers and writes its outputs into the same output tensors
every time: a replay allocates nothing and launches once. The first `warmup` calls run the graph plainly
(kernel selection, lazy initialisation), then it is captured.

The outputs are handed out as copies of the static output tensors, since callers keep them across calls
(the predictor holds earlier coefficients, the cache the last residuals, true CFG calls the graph twice per
step): a copy of a step's outputs comes from PyTorch's caching allocator (no cudaMalloc, no sync) and is
small beside the step (the model output and k coefficients per token, plus R on full steps).

`capture` is how a graph becomes a replay: `cuda_capture` on a GPU; `replaying_capture` runs the graph again
into the captured outputs, which gives the buffer logic (in-place inputs, overwritten outputs) on a CPU.
"""

from __future__ import annotations

import os
import warnings
from typing import Callable

import torch

# Backends whose graphs can be captured: torch programs on PyTorch's allocator and current stream. ONNX
# Runtime has its own CUDA-graph mode (the CUDA provider's enable_cuda_graph), not used here.
CAPTURABLE = ("eager", "inductor", "aoti", "tensorrt")
Capture = Callable[[Callable[[], object]], tuple[object, Callable[[], None]]]


def _tuple(out) -> tuple[torch.Tensor, ...]:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _version(t: torch.Tensor) -> int | None:
    """The tensor's in-place version counter; None for inference tensors, which keep none (always copied)."""
    try:
        return t._version
    except RuntimeError:
        return None


def cuda_capture(fn: Callable[[], object]) -> tuple[object, Callable[[], None]]:
    """One warm-up call on a side stream (as torch.cuda.graphs asks), then the captured graph's replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return out, graph.replay


def replaying_capture(fn: Callable[[], object]) -> tuple[object, Callable[[], None]]:
    """A stand-in for CUDA-graph capture on a CPU: a replay recomputes into the captured output tensors."""
    out = fn()

    def replay() -> None:
        for static, new in zip(_tuple(out), _tuple(fn())):
            static.copy_(new)

    return out, replay


class StaticGraph:
    """A graph called over static input buffers and replayed from one capture; same calling convention."""

    def __init__(self, graph, capture: Capture = cuda_capture, warmup: int = 1):
        self.graph, self.capture, self.warmup = graph, capture, warmup
        self.input_names = list(graph.input_names)
        self.output_names = list(getattr(graph, "output_names", []))
        self.buffers: list[torch.Tensor] | None = None
        # The tensor each buffer last copied and its version: held, so that its identity cannot pass to a new one.
        self.sources: list[tuple[torch.Tensor, int | None]] = []
        self.outputs = None
        self.replay: Callable[[], None] | None = None
        self.calls = 0
        self.captured = False  # whether replays run (False: warming up, or capture failed and it runs plainly)

    def recapture(self) -> None:
        """Forget the capture (the graph's weights moved): the next calls warm up and capture again."""
        self.outputs, self.replay, self.calls, self.captured = None, None, 0, False

    def _load(self, args: tuple[torch.Tensor, ...]) -> None:
        if self.buffers is None:
            self.buffers = [a.clone() for a in args]
        else:
            for i, (buf, a) in enumerate(zip(self.buffers, args)):
                src, version = self.sources[i]
                if a is not buf and (a is not src or version is None or _version(a) != version):
                    buf.copy_(a)
        self.sources = [(a, _version(a)) for a in args]

    def _hand_out(self, out):
        outs = tuple(o.clone() for o in _tuple(out))
        return outs if isinstance(out, (tuple, list)) else outs[0]

    def __call__(self, *args: torch.Tensor):
        self._load(args)
        self.calls += 1
        if self.replay is not None:
            self.replay()
            return self._hand_out(self.outputs)
        if self.calls <= self.warmup or self.captured is None:
            return self._hand_out(self.graph(*self.buffers))
        try:
            self.outputs, self.replay = self.capture(lambda: self.graph(*self.buffers))
            self.replay()  # a capture records the kernels without running them
            self.captured = True
        except Exception as e:  # an op that cannot be captured: run plainly rather than fail the request
            warnings.warn(f"svdexport: CUDA-graph capture failed, running without it: {str(e).splitlines()[0]}")
            self.captured = None
            return self._hand_out(self.graph(*self.buffers))
        return self._hand_out(self.outputs)


def enabled(backend: str, device: str) -> bool:
    """CUDA graphs for a capturable backend on a GPU, unless SVDEXPORT_CUDA_GRAPHS=0."""
    return device == "cuda" and backend in CAPTURABLE and os.environ.get("SVDEXPORT_CUDA_GRAPHS", "1") != "0"


def static_pair(full, cached, capture: Capture = cuda_capture, warmup: int = 1) -> tuple[StaticGraph, StaticGraph]:
    return StaticGraph(full, capture, warmup), StaticGraph(cached, capture, warmup)
