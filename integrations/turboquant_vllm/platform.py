"""``vllm.platform_plugins`` entry point: where vLLM would pick its CPU platform, pick ours.

The platform class lives in ``cpu_platform`` so that this module does not import
``vllm.platforms.cpu`` while vLLM is still resolving ``current_platform``. vLLM skips platform plugins
when ``VLLM_TARGET_DEVICE=cpu`` is set; then ``--attention-backend CUSTOM`` is ignored on CPU (the
general plugin warns). ``TQ_DISABLE_PLATFORM=1`` turns this plugin off.
"""

from __future__ import annotations

from .config import platform_disabled

CPU_PLATFORM_QUALNAME = "turboquant_vllm.cpu_platform.TQCpuPlatform"


def detect() -> str | None:
    if platform_disabled():
        return None
    from vllm.platforms import cpu_platform_plugin

    if cpu_platform_plugin() is None:
        return None
    return CPU_PLATFORM_QUALNAME
