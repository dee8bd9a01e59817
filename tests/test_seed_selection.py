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


def _criterion(x: torch.Tensor, seed: int, channels: np.ndarray | None, bits: float, rotation: str,
               criterion: str) -> float:
    """A candidate's error by ``criterion``, written here in NumPy (not through ``calibration_error``):
    the tokens of each sequence as queries over its earlier tokens."""
    b, h, n, d = x.shape
    pooled = x.transpose(0, 1).reshape(h, -1, d).numpy()
    enc = tq.encode(pooled, bits=bits, seed=seed, channels=channels, rotation=rotation)
    rec = tq.decode(enc).astype(np.float64).reshape(h, b, n, d).transpose(1, 0, 2, 3)
    k = x.numpy().astype(np.float64)
    total = 0.0
    for bi in range(b):
        for hi in range(h):
            for i in range(1, n):
                q, exact, approx = k[bi, hi, i], k[bi, hi, :i], rec[bi, hi, :i]
                if criterion == "scores":
                    total += float(np.sum((q @ (approx - exact).T) ** 2))
                else:
                    s, t = exact @ q / np.sqrt(d), approx @ q / np.sqrt(d)
                    log_p = s - s.max() - np.log(np.exp(s - s.max()).sum())
                    log_q = t - t.max() - np.log(np.exp(t - t.max()).sum())
                    total += float(np.sum(np.exp(log_p) * (log_p - log_q)))
    return total


@pytest.mark.parametrize("criterion", ["scores", "attention"])
def test_attention_criteria_keep_their_own_best_candidate(criterion: str) -> None:
    """The kept seed minimises the stated criterion, and on some data that is not the seed the
    reconstruction error would keep (otherwise the test could not tell the criteria apart)."""
    differs = 0
    for data in range(4):
        x = _calibration(10 + data)[:, :, :24]
        chosen = {}
        for crit in (criterion, "reconstruction"):
            q = TurboQuantizer(64, 2.5, "mse", seed=99, rotation="haar", seed_candidates=6, criterion=crit)
            q.calibrate(x)
            chosen[crit] = q.codec.config.seed
        channels = None if q.codec.channels is None else q.codec.channels.to(torch.int32).numpy()
        seeds = q.candidate_seeds()
        errors = [_criterion(x, s, channels, 2.5, "haar", criterion) for s in seeds]
        assert max(errors) > min(errors) * 1.001
        assert chosen[criterion] == seeds[int(np.argmin(errors))], (data, errors)
        differs += chosen[criterion] != chosen["reconstruction"]
    assert differs > 0


def test_caches_rank_key_seeds_by_the_criterion_and_value_seeds_by_reconstruction() -> None:
    from turboquant_torch.hf_cache import turboquant_factory

    make = turboquant_factory(seed_candidates=3, seed_criterion="attention")
    assert make("key", 2, 64).criterion == "attention"  # type: ignore[attr-defined]
    assert make("value", 2, 64).criterion == "reconstruction"  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="seed criterion must be one of"):
        TurboQuantizer(64, 3.5, "mse", seed=1, seed_candidates=2, criterion="kl")
