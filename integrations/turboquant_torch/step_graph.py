"""One cache layer's decode step as a CUDA graph, kept while the arrays it was captured on stay.

A Hugging Face decode step is host-bound: each layer's eager ops cost microseconds of Python and
launch overhead each, while the GPU waits. ``StepGraph`` replays a layer's fixed sequence of
launches (the paged attention into step buffers, the append of the new token, the length and slot
increments) as one graph launch. The caller names the *state* the sequence depends on (the tensors
it reads and writes, by identity); a state seen for the first time runs eagerly (which also builds
the op's kept launches and scratch: nothing is allocated while capturing), the second sight
captures, and later ones replay. Values inside those tensors may change between replays (the cache
rewrites its step metadata in place); their addresses may not, which the identity test guarantees.

Capture uses ``capture_begin`` / ``capture_end`` on a side stream of the device, not
``torch.cuda.graph``, whose entry synchronises the device, collects garbage and empties the
allocator's cache: milliseconds per layer at every new state. Graphs share one memory pool per
device (the sequence allocates nothing). A capture that fails (an op that cannot be captured)
disables graphs for that layer with a warning; its steps then run eagerly.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch

_STREAMS: dict[int, torch.cuda.Stream] = {}
_POOLS: dict[int, Any] = {}


def _capture(step: Callable[[], object], index: int) -> torch.cuda.CUDAGraph:
    """``step``'s launches on device ``index`` as a graph (captured, not run)."""
    if index not in _STREAMS:
        _STREAMS[index] = torch.cuda.Stream(index)
        _POOLS[index] = torch.cuda.graph_pool_handle()
    stream, main = _STREAMS[index], torch.cuda.current_stream(index)
    graph = torch.cuda.CUDAGraph()
    stream.wait_stream(main)
    with torch.cuda.stream(stream):
        graph.capture_begin(pool=_POOLS[index], capture_error_mode="thread_local")
        try:
            step()
        finally:
            graph.capture_end()
    main.wait_stream(stream)
    return graph


class StepGraph:
    """A layer's decode step, eager on a new state, captured on its second sight, then replayed."""

    def __init__(self) -> None:
        self.state: tuple[Any, ...] | None = None
        self.graph: torch.cuda.CUDAGraph | None = None
        self.disabled = False

    def __call__(self, state: tuple[Any, ...], step: Callable[[], object], device: torch.device) -> None:
        """Run ``step`` (launches on ``device`` only, no host synchronisation) for ``state``.

        Parameters
        ----------
        state : tuple
            Everything ``step``'s launches depend on: objects (tensors, the op's cache) compared
            by identity, numbers and strings by value.
        step : callable
            Enqueues the step's work on the current stream.
        device : torch.device
            A CUDA device.
        """
        same = self.state is not None and len(state) == len(self.state) and all(
            a is b or (isinstance(a, (int, float, str)) and type(a) is type(b) and a == b)
            for a, b in zip(state, self.state, strict=True))
        if same and self.graph is not None:
            self.graph.replay()
            return
        if not same or self.disabled:
            step()
            self.state, self.graph = state, None
            return
        index = torch.cuda.current_device() if device.index is None else device.index
        try:
            self.graph = _capture(step, index)
        except RuntimeError as err:
            warnings.warn(f"decode step not captured in a CUDA graph ({err}); this layer runs eagerly",
                          RuntimeWarning, stacklevel=2)
            self.disabled = True
            step()
            return
        self.graph.replay()
