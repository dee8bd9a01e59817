"""``turboquant_torch.step_graph.StepGraph``'s states on the host (the capture replaced by a stand-in
that records the step and runs it on replay); the CUDA side runs in ``test_hf_attention``'s GPU test."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from turboquant_torch import step_graph  # noqa: E402
from turboquant_torch.step_graph import StepGraph  # noqa: E402

CUDA = torch.device("cuda", 0)


class _Recorded:
    def __init__(self, step):  # type: ignore[no-untyped-def]
        self.step = step

    def replay(self) -> None:
        self.step()


@pytest.fixture
def captures(monkeypatch):  # type: ignore[no-untyped-def]
    made: list[int] = []

    def capture(step, index):  # type: ignore[no-untyped-def]
        made.append(index)
        return _Recorded(step)

    monkeypatch.setattr(step_graph, "_capture", capture)
    return made


def test_eager_then_captured_then_replayed(captures) -> None:  # type: ignore[no-untyped-def]
    buf, runs = torch.zeros(3), []
    graph = StepGraph()
    assert not graph.replay((buf, 7, 0.5))  # nothing seen: nothing runs
    graph((buf, 7, 0.5), lambda: runs.append(1), CUDA)
    assert not graph.replay((buf, 7, 0.5)) and len(runs) == 1  # seen once, not captured
    for _ in range(3):
        graph((buf, 7, 0.5), lambda: runs.append(1), CUDA)
    assert len(runs) == 4  # eager, then captured and replayed, then replayed twice
    assert captures == [0]
    assert graph.replay((buf, 7, 0.5)) and len(runs) == 5  # the state used last, by identity
    # Numbers compare by value, tensors by identity: an equal new tensor is a new state.
    graph((torch.zeros(3), 7, 0.5), lambda: runs.append(2), CUDA)
    graph((buf, 8, 0.5), lambda: runs.append(3), CUDA)
    assert runs[5:] == [2, 3] and captures == [0]
    graph((buf, 7, 0.5), lambda: runs.append(4), CUDA)  # still kept: replays the recorded step
    assert runs[-1] == 1 and captures == [0]
    # Equal numbers that are other objects (a scale computed anew each step) are the same state.
    graph((buf, int("7"), float("0.5")), lambda: runs.append(5), CUDA)
    assert runs[-1] == 1 and captures == [0]


def test_keeps_the_states_used_last(captures) -> None:  # type: ignore[no-untyped-def]
    graph = StepGraph(keep=2)
    for state in (1, 2, 3, 1):  # 1 dropped when 3 came: first sight again, eager
        graph((state,), lambda: None, CUDA)
    assert captures == []
    graph((1,), lambda: None, CUDA)
    graph((3,), lambda: None, CUDA)
    assert len(captures) == 2
    assert [s for s, _ in graph.entries] == [(3,), (1,)]
    # Kept by last use: 3, replayed just before 2 came, survives 2 and 4; 1 does not.
    graph((2,), lambda: None, CUDA)
    graph((3,), lambda: None, CUDA)
    graph((4,), lambda: None, CUDA)
    assert [s for s, _ in graph.entries] == [(4,), (3,)]


def test_failed_capture_runs_eagerly_with_a_warning(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    def fail(step, index):  # type: ignore[no-untyped-def]
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(step_graph, "_capture", fail)
    runs: list[int] = []
    graph = StepGraph()
    graph((1,), lambda: runs.append(1), CUDA)
    with pytest.warns(RuntimeWarning, match="not captured"):
        graph((1,), lambda: runs.append(2), CUDA)
    graph((1,), lambda: runs.append(3), CUDA)
    assert runs == [1, 2, 3] and graph.disabled and graph.entries == []
