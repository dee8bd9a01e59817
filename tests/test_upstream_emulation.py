"""``baselines.UpstreamCache``, the emulation of upstream vLLM's shipped TurboQuant recipe: boundary
layers raw, every other token quantized as written and read back quantized after the first chunk,
keys norm-corrected fixed-Hadamard MSE codes, values per-token uniform with float16 scale and zero."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from turboquant_torch.baselines import QuantizeOnWriteLayer, UpstreamCache  # noqa: E402

import turboquant_codec as tq  # noqa: E402
from turboquant_codec.backends import numpy_ref  # noqa: E402

from .conftest import kv_like  # noqa: E402

CONFIG = SimpleNamespace(num_attention_heads=4, num_key_value_heads=2, head_dim=64, hidden_size=256,
                         num_hidden_layers=6)


def _states(seed: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    return (torch.from_numpy(kv_like(rng, (1, 2, n, 64))),
            torch.from_numpy(rng.standard_normal((1, 2, n, 64)).astype(np.float32)))


def test_boundary_layers_raw_and_quantize_on_write() -> None:
    cache = UpstreamCache(CONFIG, key_bits=3, value_bits=4)
    assert cache.raw_layers == [0, 1, 4, 5]
    k1, v1 = _states(1, 10)
    k2, v2 = _states(2, 3)
    for i in range(6):
        first = cache.update(k1, v1, i)
        assert torch.equal(first[0], k1) and torch.equal(first[1], v1)  # first chunk: raw
        keys, values = cache.update(k2, v2, i)
        assert keys.shape == (1, 2, 13, 64)
        if i in cache.raw_layers:
            assert torch.equal(keys[..., 10:, :], k2)
            continue
        # Every token, the new ones included, is read back quantized.
        assert not torch.equal(keys[..., 10:, :], k2) and not torch.equal(values[..., :10, :], v1)
        rel = (keys - torch.cat([k1, k2], -2)).norm() / keys.norm()
        assert 0.01 < rel < 0.3
    layer = cache.layers[2]
    assert isinstance(layer, QuantizeOnWriteLayer)
    # Honest bytes: upstream's slot, ceil(64*3/8)+2 for a key and ceil(64*4/8)+4 for a value.
    assert layer.memory().records == 13 * 2 * ((24 + 2) + (32 + 4))


def test_keys_are_norm_corrected_hadamard_codes() -> None:
    cache = UpstreamCache(CONFIG, key_bits=3, value_bits=3)
    k, v = _states(3, 20)
    cache.update(k[..., :1, :], v[..., :1, :], 2)
    keys, values = cache.update(k, v, 2)
    got = keys[..., 1:, :]
    # The codec's own fixed-Hadamard records, rescaled to the stored norm.
    enc = tq.encode(k.numpy(), bits=3, rotation="hadamard")
    plain = torch.from_numpy(tq.decode(enc))
    norms = numpy_ref._norms(enc.records, enc.config.groups[0], 0)[..., None]
    norms = torch.from_numpy(norms.astype(np.float32))
    want = plain * norms / plain.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got, plain, rtol=1e-4, atol=0)  # the correction changes the values
    # Values: round to nearest of 8 levels between the float16 min and max of each vector.
    lo, hi = v.amin(-1, keepdim=True), v.amax(-1, keepdim=True)
    step = (hi - lo) / 7
    assert float(((values[..., 1:, :] - v).abs() / step).max()) <= 0.5 + 1e-2
    assert math.isclose(float(((values[..., 1:, :] - v) ** 2).mean() / (step**2).mean()), 1 / 12, rel_tol=0.3)
