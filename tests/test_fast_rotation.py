"""The host's fast Hadamard rotations (``transforms.rotate``: sign flips and fast Walsh-Hadamard
transforms, in NumPy or compiled by Numba) against the dense matrices every GPU kernel reads.

Each path is checked on fresh random data against ``rotation_matrix``, so a fast path that agrees
only with another fast path (a shared mistake) still fails here.
"""

from __future__ import annotations

import numpy as np
import pytest

import turboquant_codec as tq
from turboquant_codec import CodecConfig, tuning
from turboquant_codec.backends import numpy_ref
from turboquant_codec.transforms import rotate, rotation_matrix, rotation_path, tables
from turboquant_codec.tuning import HostTuning

from .test_paged_ops import make, step

PATHS = ["numpy", "numba"]
KINDS = ["hadamard2", "hadamard"]


def _path(path: str) -> object:
    if path == "numba" and not tq.backends.availability("numba_cpu"):
        pytest.skip(tq.backends.availability("numba_cpu").reason)
    return tuning.using(host=HostTuning(rotation_path=path))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("bits", [3.5, 4.0])  # 3.5: two groups of d/2; 4.0: one group of d
def test_fast_path_equals_the_dense_matrix(path: str, kind: str, d: int, bits: float) -> None:
    cfg = CodecConfig(d, bits, "mse", seed=11 + d, rotation=kind)
    rng = np.random.default_rng(d + int(2 * bits))
    for g, t in zip(cfg.groups, tables(cfg), strict=True):
        dense = rotation_matrix(kind, cfg.seed, g.index, g.dim)
        x = rng.standard_normal((2, 37, 2 * g.dim))[..., ::2]  # strided rows, as a group's column slice
        with _path(path):
            assert rotation_path(kind) == path
            forward, back = rotate(x, t), rotate(x, t, inverse=True)
        scale = np.linalg.norm(x, axis=-1, keepdims=True)
        assert np.max(np.abs(forward - x @ dense.T) / scale) < 1e-14
        assert np.max(np.abs(back - x @ dense) / scale) < 1e-14
        assert forward.shape == x.shape


def test_haar_is_always_dense_and_auto_picks_numba_when_it_imports() -> None:
    with tuning.using(host=HostTuning(rotation_path="numpy")):
        assert rotation_path("haar") == "dense"
    with tuning.using(host=HostTuning()):
        assert rotation_path("hadamard2") == ("numba" if tq.backends.availability("numba_cpu") else "dense")
    with pytest.raises(ValueError, match="HostTuning.rotation_path must be one of"):
        HostTuning(rotation_path="fast")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(("kind", "bits"), [("hadamard2", 3.5), ("hadamard", 4.0), ("hadamard2", 2.5)])
def test_reference_codec_agrees_across_paths(path: str, kind: str, bits: float) -> None:
    """Encode, decode and scores of the NumPy reference: fast path against dense, same records."""
    cfg = CodecConfig(128, bits, "mse", seed=5, rotation=kind)
    rng = np.random.default_rng(9)
    x = rng.standard_normal((2, 300, 128)).astype(np.float32)
    q = rng.standard_normal((2, 4, 128)).astype(np.float32)
    with _path("dense"):
        records, channels = numpy_ref.encode(x, cfg, None)
        enc = tq.Encoded(records, channels, cfg)
        want_x, want_s = numpy_ref.decode(enc), numpy_ref.scores(q, enc)
    with _path(path):
        got_records, got_channels = numpy_ref.encode(x, cfg, None)
        got_x, got_s = numpy_ref.decode(enc), numpy_ref.scores(q, enc)
    assert np.array_equal(got_channels, channels)
    # A code may flip only where y sits within rounding of a boundary: none expected in 600 vectors.
    assert np.mean(got_records != records) < 1e-4
    np.testing.assert_allclose(got_x, want_x, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got_s, want_s, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("bits", "kind"), [(3.5, "hadamard2"), (4.0, "hadamard"), (2.5, "hadamard2")])
def test_numba_paged_decode_matches_the_dense_reference(bits: float, kind: str) -> None:
    """numba_cpu's query rotation and value un-rotation by fast transforms, against the reference
    computed with the dense matrices."""
    if not tq.backends.availability("numba_cpu"):
        pytest.skip(tq.backends.availability("numba_cpu").reason)
    with _path("dense"):
        p = make([45, 100, 20, 64], 64, bits, raw_blocks=2, seed=3, rotation=kind)
        query, key, value, seq, qsl = step(p, [1, 1, 1, 1], seed=4)
        ref = tq.paged_attention(p.cache, query, key, value, p.table, seq, qsl, scale=0.125, backend="numpy")
    got = tq.paged_attention(p.cache, query, key, value, p.table, seq, qsl, scale=0.125, backend="numba_cpu")
    np.testing.assert_allclose(got, ref, rtol=2e-5, atol=2e-5)
    assert np.abs(ref).max() > 0.05
