"""Seed selection at calibration (``hf_cache.TurboQuantizer``): the stream keeps, among its candidate
seeds, the one whose records reconstruct the calibration tokens best, and its codec reads with it."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from turboquant_torch.hf_cache import TurboQuantizer  # noqa: E402

import turboquant_codec as tq  # noqa: E402

from .conftest import kv_like  # noqa: E402


def _calibration(seed: int) -> torch.Tensor:
    """(B=2, H=3, n=40, d=64) key-like tokens with per-channel scales (so seeds differ)."""
    return torch.from_numpy(kv_like(np.random.default_rng(seed), (2, 3, 40, 64)))


def _error(x: torch.Tensor, seed: int, channels: np.ndarray | None, bits: float, rotation: str) -> float:
    """Squared reconstruction error of the calibration tokens at ``seed``, through the NumPy API."""
    h = x.shape[1]
    pooled = x.transpose(0, 1).reshape(h, -1, x.shape[-1]).numpy()
    enc = tq.encode(pooled, bits=bits, seed=seed, channels=channels, rotation=rotation)
    return float(((tq.decode(enc).astype(np.float64) - pooled) ** 2).sum())


@pytest.mark.parametrize(("bits", "rotation"), [(3.5, "haar"), (2.5, "hadamard2"), (3.0, "haar")])
def test_calibration_keeps_the_best_candidate(bits: float, rotation: str) -> None:
    q = TurboQuantizer(64, bits, "mse", seed=1234, rotation=rotation, seed_candidates=5)
    seeds = q.candidate_seeds()
    assert len(set(seeds)) == 5 and seeds[0] == 1234
    x = _calibration(3)
    q.calibrate(x)
    channels = None if q.codec.channels is None else q.codec.channels.to(torch.int32).numpy()
    errors = [_error(x, s, channels, bits, rotation) for s in seeds]
    assert max(errors) > min(errors) * 1.001, "candidates must differ for the choice to mean anything"
    assert q.codec.config.seed == seeds[int(np.argmin(errors))]
    assert q.codec.config.rotation == rotation
    # The chosen seed is what records are written and read with.
    payload = q.encode(x)
    enc = tq.Encoded(payload[0].numpy(), channels, q.codec.config)
    np.testing.assert_array_equal(q.decode(payload)[0].numpy(), tq.decode(enc))
    q.reset()
    assert q.codec.config.seed == 1234 and q.codec.channels is None


def test_one_candidate_and_fixed_hadamard_keep_the_seed() -> None:
    x = _calibration(4)
    for rotation, n in (("haar", 1), ("hadamard", 6)):
        q = TurboQuantizer(64, 3.5, "mse", seed=77, rotation=rotation, seed_candidates=n)
        assert q.candidate_seeds() == [77]
        q.calibrate(x)
        assert q.codec.config.seed == 77
        assert q.metadata_nbytes() == 3 * 64 * 2  # channel lists only: no seed was chosen
    chosen = TurboQuantizer(64, 3.5, "mse", seed=77, seed_candidates=2)
    chosen.calibrate(x)
    assert chosen.metadata_nbytes() == 3 * 64 * 2 + 8  # plus the chosen seed
    with pytest.raises(ValueError, match="seed_candidates must be an integer >= 1"):
        TurboQuantizer(64, 3.5, "mse", seed=77, seed_candidates=0)
