"""The asv suite stays runnable: ``asv check`` and a quick dry run of every benchmark in the
installed environment (``--python=same``: nothing is built or downloaded), on tiny data
(``TQ_ASV_SMOKE=1``). Fails when any benchmark errors; skipped combinations (unavailable backend,
capability table refusal) are fine.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ASV_DIR = Path(__file__).resolve().parent.parent / "asv_bench"
pytest.importorskip("asv", reason="asv not installed (pip install -e '.[asv]')")


def _config(tmp: Path) -> Path:
    """asv.conf.json with absolute paths, writing results/env/html under ``tmp``, not the repo."""
    text = (ASV_DIR / "asv.conf.json").read_text()
    conf = json.loads(re.sub(r"^\s*//.*$", "", text, flags=re.M))
    conf["repo"] = str(ASV_DIR.parent)
    conf["benchmark_dir"] = str(ASV_DIR / conf["benchmark_dir"])
    for key in ("results_dir", "html_dir", "env_dir"):
        conf[key] = str(tmp / key)
    path = tmp / "asv.conf.json"
    path.write_text(json.dumps(conf))
    return path


def _asv(args: list[str], home: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    # The simulator makes numba_cuda "available" at ~2.5 ms per thread: the suite skips it anyway.
    env.pop("NUMBA_ENABLE_CUDASIM", None)
    env.update(HOME=str(home), TQ_ASV_SMOKE="1", PYTHONHASHSEED="0")
    asv = shutil.which("asv", path=str(Path(sys.executable).parent)) or "asv"
    command = [asv, *args, "--config", str(home / "asv.conf.json")]
    return subprocess.run(command, cwd=ASV_DIR, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private HOME holding asv's machine file, so the user's ~/.asv-machine.json is untouched."""
    path = tmp_path_factory.mktemp("asv-home")
    _config(path)
    proc = _asv(["machine", "--yes", "--machine", "ci"], path, 60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return path


def test_asv_check(home: Path) -> None:
    proc = _asv(["check", "--python=same"], home, 120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "No problems found" in out, out


def test_asv_quick_run(home: Path) -> None:
    proc = _asv(
        ["run", "--python=same", "--quick", "--dry-run", "--show-stderr", "--machine", "ci"],
        home,
        600,  # a hang guard: ~200 s alone on 2 cores, longer beside another pytest worker
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-20000:]
    assert "failed" not in out, out[-20000:]
    for name in ("time_encode", "time_decode", "time_scores", "time_attention", "track_mse"):
        assert name in out, f"{name} did not run:\n{out[-5000:]}"
