"""One cache layer's decode step as a CUDA graph, kept while the arrays it was captured on stay.

A Hugging Face decode step is host-bound: each layer's eager ops cost microseconds of Python and
launch overhead each, while the GPU waits. ``StepGraph`` replays a layer's fixed sequence of
launches (the paged attention over the step buffers, the append of the new token, the length and
slot increments) as one graph launch. The caller names the *state* the sequence depends on: the
tensors it reads and writes (by identity) and its scalars (by value). A state seen for the first
time runs eagerly (which also builds the op's kept launches and scratch: nothing is allocated
while capturing), the second sight captures, and later ones replay; the last few states are kept.
Values inside the tensors may change between replays (the cache rewrites its step metadata in
place); their addresses may not, which the identity test guarantees.

Capture uses ``capture_begin`` / ``capture_end`` on a side stream of the device, not
``torch.cuda.graph``, whose entry synchronises the device, collects garbage and empties the
allocator's cache: milliseconds per layer at every new state. A capture that fails (an op that
cannot be captured) disables graphs for that layer with a warning; its steps then run eagerly.
"""

from __future__ import annotations

import operator
import warnings
from collections.abc import Callable
from typing import Any

import torch

_STREAMS: dict[int, torch.cuda.Stream] = {}


def _capture(step: Callable[[], object], index: int) -> torch.cuda.CUDAGraph:
    """``step``'s launches on device ``index`` as a graph (captured, not run)."""
    if index not in _STREAMS:
        _STREAMS[index] = torch.cuda.Stream(index)
    stream, main = _STREAMS[index], torch.cuda.current_stream(index)
    graph = torch.cuda.CUDAGraph()
    stream.wait_stream(main)
    with torch.cuda.stream(stream):
        # A private pool per graph (the step allocates nothing): a pool shared with graphs that
        # were since freed trips the caching allocator's pool bookkeeping (torch 2.11).
        graph.capture_begin(capture_error_mode="thread_local")
        try:
            step()
        finally:
            graph.capture_end()
    main.wait_stream(stream)
    return graph


class StepGraph:
    """A layer's decode step, kept as a CUDA graph per state (the ``keep`` states used last): eager
    on a state's first sight, captured on its second, replayed from then on."""

    def __init__(self, keep: int = 4) -> None:
        self.keep = keep
        self.entries: list[tuple[tuple[Any, ...], torch.cuda.CUDAGraph | None]] = []
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
        if self.replay(state):
            return
        entries = self.entries
        at = next((i for i, (s, _) in enumerate(entries) if _same(s, state)), None)
        if at is None or self.disabled:
            step()
            if not self.disabled:
                self.entries = [(state, None), *self.entries][: self.keep]
            return
        if at:  # most recent first: a steady decode finds its state at the first comparison
            self.entries.insert(0, self.entries.pop(at))
            at = 0
        graph = self.entries[at][1]
        if graph is None:
            index = torch.cuda.current_device() if device.index is None else device.index
            try:
                graph = _capture(step, index)
            except RuntimeError as err:
                warnings.warn(f"decode step not captured in a CUDA graph ({err}); this layer runs eagerly",
                              RuntimeWarning, stacklevel=2)
                self.disabled, self.entries = True, []
                step()
                return
            self.entries[at] = (state, graph)
        graph.replay()

    def replay(self, state: tuple[Any, ...]) -> bool:
        """Replay the graph of the state used last if ``state`` is it, part for part the same objects
        (a steady decode); False, doing nothing, otherwise. ``__call__`` tries this first; a caller
        that tries it itself builds its step only when it returns False."""
        if not self.entries:
            return False
        last, graph = self.entries[0]
        if graph is None or len(last) != len(state) or not all(map(operator.is_, last, state)):
            return False
        graph.replay()
        return True


def _same(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    return len(a) == len(b) and all(
        x is y or (isinstance(x, (int, float, str)) and type(x) is type(y) and x == y)
        for x, y in zip(a, b, strict=True))
