"""Bounded memos of repeated GPU calls, keyed by what the calls' launches depend on.

A decode loop calls the same op with the same arrays (persistent buffers, or addresses the caching
allocator hands out again) step after step. The public ops keep, per call key, what a repeat needs:
the checked cache and its backend views (``paged``), or the backend's replay of the whole call, a
callable holding no array (``paged_attention``, ``attention`` with ``out``). A key is built from
``_interop.gpu_key`` of every array (address, shape, strides, dtype, device) plus the scalars, configurations
and backend asked for: every check the public API makes of GPU inputs is of that metadata, so an
equal key is a call the checks already passed, and an address reused by a new array of the same
layout is read and written as that array, as in a CUDA graph replay. A replay also runs only under
the tuning settings it was planned for (``Memo.replay``).
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable
from typing import Any

from . import _interop
from . import tuning as _tuning


class Memo:
    """Least-recently-inserted bounded dict (``size`` entries); ``replay`` / ``keep`` hold replays."""

    def __init__(self, size: int = 256) -> None:
        self.size = size
        self._items: collections.OrderedDict[Any, Any] = collections.OrderedDict()

    def get(self, key: Any) -> Any:
        return None if key is None else self._items.get(key)

    def put(self, key: Any, value: Any) -> None:
        self._items[key] = value
        if len(self._items) > self.size:
            self._items.popitem(last=False)

    def clear(self) -> None:
        self._items.clear()

    def __contains__(self, key: Any) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)

    def replay(self, key: Any) -> bool:
        """Run the replay kept under ``key``, if one was kept under the tuning now in force (the
        launches were planned for it; an identity test, as cheap as the lookup). Whether it ran."""
        entry = self.get(key)
        if entry is None or entry[0] is not _tuning.current():
            return False
        entry[1]()
        return True

    def keep(self, key: Any, replay: Callable[[], None] | None) -> None:
        """Keep ``replay`` (a backend's, or None: nothing kept) under ``key`` and the tuning in force."""
        if key is not None and replay is not None:
            self.put(key, (_tuning.current(), replay))


def arrays_key(arrays: Iterable[Any]) -> tuple[Any, ...] | None:
    """The ``gpu_key`` of every array (None entries allowed); None unless all are GPU arrays."""
    keys = tuple(_interop.gpu_key(a) for a in arrays)
    return None if None in keys else keys
