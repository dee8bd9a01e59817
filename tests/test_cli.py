"""The command line: ``info`` and the ``demo`` main job."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "turboquant_codec", *args], capture_output=True,
                          text=True, timeout=300)


def test_info_prints_every_backend_with_status() -> None:
    import turboquant_codec as tq

    out = _run("info")
    assert out.returncode == 0, out.stderr
    for row in tq.backends():
        line = next(line for line in out.stdout.splitlines() if line.startswith(row.name + " "))
        assert ("unavailable: " + row.reason if not row.available else "available") in line


def test_unknown_command_fails() -> None:
    out = _run("frobnicate")
    assert out.returncode == 2 and "choose info or demo" in out.stderr


def test_demo_writes_table_and_plot(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    out = _run("demo", "--out", str(tmp_path))
    assert out.returncode == 0, out.stderr
    rows = [line for line in (tmp_path / "demo.md").read_text().splitlines()
            if line.startswith(("| mse |", "| prod |"))]
    assert len(rows) == 14
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        measured, upper, lower = float(cells[4]), float(cells[5]), float(cells[6])
        # Every measured figure sits between the paper's bounds.
        assert lower < measured <= upper, row
    assert (tmp_path / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
