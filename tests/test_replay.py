"""The replay memo (``turboquant_codec._replay``) on the host: what a kept replay needs to run again.

The GPU tests of the replays themselves (new contents read, another ``out`` refused) are in
``test_cupy_paged.py`` and ``test_cupy_raw.py``.
"""

from __future__ import annotations

import numpy as np

from turboquant_codec import _replay, tuning
from turboquant_codec.tuning import CupyRawTuning


def test_replay_runs_only_under_the_tuning_it_was_kept_for() -> None:
    calls: list[int] = []
    memo = _replay.Memo()
    memo.keep(("call",), lambda: calls.append(1))
    assert memo.replay(("call",)) and calls == [1]
    assert not memo.replay(("other",)) and not memo.replay(None)
    with tuning.using(cupy_raw=CupyRawTuning(attn_stages=2)):
        assert not memo.replay(("call",)), "a replay planned for other settings ran"
    assert memo.replay(("call",)) and calls == [1, 1]


def test_nothing_kept_for_no_replay_or_no_key() -> None:
    memo = _replay.Memo()
    memo.keep(("call",), None)
    memo.keep(None, lambda: None)
    assert len(memo) == 0


def test_bounded_oldest_first() -> None:
    memo = _replay.Memo(size=3)
    for i in range(5):
        memo.put(i, i)
    assert [memo.get(i) for i in range(5)] == [None, None, 2, 3, 4]


def test_keys_of_host_arrays_are_none() -> None:
    """Host arrays are checked by value on every call: never replayed."""
    a = np.zeros(3)
    assert _replay.arrays_key([a]) is None
    assert _replay.arrays_key([None]) == ((),)
