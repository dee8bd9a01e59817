"""Statistical checks of the NumPy reference against the paper (seeded, so deterministic).

Figures: Theorem 1 / Table "D_mse" of arXiv 2504.19874 for unit vectors, b = 1..4 bits:
0.3634, 0.1175, 0.0346, 0.0095 (Gaussian limit; the exact density at d=128 gives slightly less).
"""

from __future__ import annotations

import numpy as np
import pytest

import turboquant_codec as tq
from turboquant_codec.codebooks import codec_codebook, lloyd_max

from .conftest import unit_vectors

PAPER_MSE = {1: 0.3634, 2: 0.1175, 3: 0.0346, 4: 0.0095}
# The acceptance band around the paper's figures.
REL_TOL = 0.05
D = 128


def _mse(x: np.ndarray, **kw) -> float:
    x_hat = tq.decode(tq.encode(x.astype(np.float32), **kw))
    return float(np.mean(np.sum((x_hat - x) ** 2, -1) / np.sum(x * x, -1)))


def test_codebooks_match_paper_centroids() -> None:
    np.testing.assert_allclose(lloyd_max(1).centroids, [-0.7979, 0.7979], atol=1e-4)
    np.testing.assert_allclose(lloyd_max(2).centroids, [-1.5104, -0.4528, 0.4528, 1.5104], atol=1e-4)
    for b, paper in PAPER_MSE.items():
        assert lloyd_max(b).distortion == pytest.approx(paper, abs=6e-5)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_exact_density_codebook_close_to_gaussian(bits: int) -> None:
    exact, gauss = lloyd_max(bits, D), lloyd_max(bits)
    # Same shape as the Gaussian quantizer scaled by 1/sqrt(d), slightly tighter (bounded support).
    np.testing.assert_allclose(exact.centroids * np.sqrt(D), gauss.centroids, rtol=0.02)
    assert exact.distortion < gauss.distortion
    assert np.all(np.diff(exact.centroids) > 0)
    np.testing.assert_allclose(exact.centroids, -exact.centroids[::-1], atol=1e-12)


@pytest.mark.parametrize("d", [16, 64, 128, 256])
@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_codec_codebook_is_lloyd_max_on_the_float16_grid(bits: int, d: int) -> None:
    exact, book = lloyd_max(bits, d), codec_codebook(bits, d)
    scaled = book.centroids * np.sqrt(d)
    np.testing.assert_allclose(scaled, scaled.astype(np.float16).astype(np.float64), rtol=1e-15)
    np.testing.assert_allclose(book.centroids, exact.centroids, rtol=2.0**-11)
    np.testing.assert_allclose(book.boundaries, 0.5 * (book.centroids[1:] + book.centroids[:-1]), rtol=1e-15)
    # Off the optimum by at most 2**-11: the distortion moves by second-order amounts only.
    assert book.distortion == pytest.approx(exact.distortion, rel=3e-6)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_mse_of_random_unit_vectors(bits: int) -> None:
    x = unit_vectors(np.random.default_rng(bits), (4000, D))
    assert _mse(x, bits=bits, mode="mse", seed=bits) == pytest.approx(PAPER_MSE[bits], rel=REL_TOL)


def _structured(kind: str, rng: np.random.Generator) -> np.ndarray:
    if kind == "one-hot":
        return np.eye(D)[rng.choice(D, 16, replace=False)]
    if kind == "constant":
        return np.ones((4, D)) * np.array([[1], [-1], [3], [-0.5]])
    if kind == "sparse":
        x = np.zeros((16, D))
        for row in x:
            row[rng.choice(D, 3, replace=False)] = rng.standard_normal(3)
        return x
    x = rng.standard_normal((16, D)) * 0.01  # spiky: a few huge channels over a small floor
    x[:, :2] = 50.0
    return x


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("kind", ["one-hot", "constant", "sparse", "spiky"])
def test_mse_bound_holds_for_structured_inputs(kind: str, bits: int) -> None:
    """Theorem 1 holds for every input in expectation over the rotation: average over seeds."""
    rng = np.random.default_rng(123)
    x = _structured(kind, rng)
    seeds = 48
    mse = np.mean([_mse(x, bits=bits, mode="mse", seed=s) for s in range(seeds)])
    assert mse == pytest.approx(PAPER_MSE[bits], rel=REL_TOL)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_prod_inner_products_unbiased_with_bounded_variance(bits: int) -> None:
    """Over independent seeds (rotation and QJL projection), <y, x~> is unbiased for each fixed x,
    with variance at most (pi/2) * D_mse(bits-1) / d * |y|^2 for unit x (paper, Theorem 2)."""
    rng = np.random.default_rng(bits)
    n, trials = 16, 400
    x = unit_vectors(rng, (1, n, D)).astype(np.float32)
    y = rng.standard_normal((1, 1, D)).astype(np.float32)
    true = (x[0].astype(np.float64) @ y[0, 0].astype(np.float64))
    est = np.stack(
        [tq.scores(y, tq.encode(x, bits=bits, mode="prod", seed=s))[0, 0] for s in range(trials)]
    )
    err = est - true  # (trials, n)
    # Per vector: the mean error is within 4.5 standard errors of 0 (all 16 at once: p < 1e-4).
    assert np.all(np.abs(err.mean(0)) < 4.5 * err.std(0) / np.sqrt(trials)), "QJL estimate is biased"
    bound = np.pi / 2 * lloyd_max(bits - 1, D).distortion / D * float(y[0, 0] @ y[0, 0])
    # Pooled over 6400 errors the variance estimate is within 6% of the truth at 3 sigma.
    assert np.mean(err**2) <= 1.06 * bound


def test_mse_mode_is_biased_but_prod_is_not() -> None:
    """The reason prod exists: TurboQuant_mse shrinks inner products (paper, Section 3.2)."""
    rng = np.random.default_rng(0)
    x = unit_vectors(rng, (1, 16, D)).astype(np.float32)
    seeds = range(60)
    # <x, x~> for each x with itself: the diagonal of the score matrix; E = 2/pi at b=1 (paper).
    mse_est = np.mean([np.diag(tq.scores(x, tq.encode(x, bits=1, seed=s))[0]) for s in seeds])
    prod_est = np.mean(
        [np.diag(tq.scores(x, tq.encode(x, bits=2, mode="prod", seed=s))[0]) for s in seeds]
    )
    assert mse_est == pytest.approx(2 / np.pi, abs=0.02)
    assert prod_est == pytest.approx(1.0, abs=0.03)


@pytest.mark.parametrize("bits", [2.5, 3.5])
def test_half_bits_land_between_neighbours(bits: float) -> None:
    rng = np.random.default_rng(5)
    x = unit_vectors(rng, (2000, D))
    lo, mid, hi = (_mse(x, bits=b, seed=1) for b in (bits - 0.5, bits, bits + 0.5))
    assert hi < mid < lo


def test_outlier_split_pays_on_kv_like_data() -> None:
    """With a few dominant channels, splitting at 3.5 bits beats the same bits without the choice."""
    rng = np.random.default_rng(9)
    x = rng.standard_normal((8, 512, D))
    x[..., rng.choice(D, 6, replace=False)] *= 10
    x = x.astype(np.float32)
    chosen = _mse(x, bits=3.5, seed=2)
    # The same split with a channel choice that ignores magnitude: identity permutation.
    ident = np.broadcast_to(np.arange(D, dtype=np.uint16), (8, D))
    naive = _mse(x, bits=3.5, seed=2, channels=ident)
    assert chosen < 0.9 * naive


def test_scores_equal_q_dot_decoded_keys() -> None:
    rng = np.random.default_rng(1)
    for bits, mode in [(3, "mse"), (3.5, "prod"), (2.5, "mse")]:
        k = rng.standard_normal((2, 40, D)).astype(np.float32)
        q = rng.standard_normal((2, 7, D)).astype(np.float32)
        enc = tq.encode(k, bits=bits, mode=mode, seed=4)
        want = q.astype(np.float64) @ tq.decode(enc).astype(np.float64).swapaxes(-1, -2)
        np.testing.assert_allclose(tq.scores(q, enc), want, rtol=1e-5, atol=1e-4)
