"""Evidence of what ran where: each event appends one JSON line to ``$TQ_MARKER_FILE`` (if set)."""

from __future__ import annotations

import json
import os
import time
from typing import Any

from .config import marker_file


def mark(event: str, **info: Any) -> None:
    path = marker_file()
    if not path:
        return
    line = json.dumps({"event": event, "pid": os.getpid(), "time": time.time(), **info}, default=str)
    with open(path, "a") as f:
        f.write(line + "\n")
