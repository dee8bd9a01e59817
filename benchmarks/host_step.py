"""Host time of one layer's Hugging Face decode step on the CUDA-graph path, measured without a GPU.

A decode step on the GPU is host-bound (``RESULTS-hf.md``): what counts there is the Python and the
launches around each layer's graph replay. This script runs that path on the CPU: one
``TurboQuantLayer`` (16 query / 4 KV heads, head_dim 128, bfloat16, batch 4, 1024 stored tokens) is
made to take the CUDA branch of ``run_step`` (its device reported as CUDA, graph capture replaced by
a recording whose replay does nothing), then ``TurboQuantCache.update`` plus the ``"turboquant"``
attention function are timed per call on fresh new-token tensors, as the model passes them. After
each call the layer's host counters are wound back one token, so every call is the same steady
step (no block edge, no flush). The staging ``torch.cat`` does its copy on the CPU here, where on
the GPU it is a launch: the figure is an estimate of the host cost, to compare code versions on one
machine (``PYTHONPATH`` pointing at another ``turboquant_torch``), not a GPU timing.

    python benchmarks/host_step.py [--calls 3000]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import types
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parents[1] / "integrations"))  # after PYTHONPATH: A/B runs

import torch  # noqa: E402
from transformers import LlamaConfig  # noqa: E402
from turboquant_torch import hf_attention, step_graph  # noqa: E402
from turboquant_torch.hf_cache import TurboQuantCache  # noqa: E402


class _Replayed:
    def replay(self) -> None:
        pass


class _CudaLike:
    """What ``run_step`` reads of the layer's device to take the graph branch."""
    type = "cuda"
    index = 0


@torch.no_grad()
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--calls", type=int, default=3000)
    p.add_argument("--warmup", type=int, default=500)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    step_graph._capture = lambda step, index: _Replayed()  # type: ignore[assignment]
    cfg = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=16, num_key_value_heads=4, head_dim=128)
    module = types.SimpleNamespace(config=cfg, is_causal=True, num_key_value_groups=4, training=False,
                                   layer_idx=0)
    cache = TurboQuantCache(cfg)
    gen = torch.Generator().manual_seed(0)
    b, t, scale = 4, 1024, 128 ** -0.5

    def new(heads: int, tokens: int = 1) -> torch.Tensor:
        return torch.randn(b, heads, tokens, 128, generator=gen).to(torch.bfloat16)

    def step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        keys, values = cache.update(k, v, 0)
        hf_attention.turboquant_attention(module, q, keys, values, None, scaling=scale)

    step(new(16, t), new(4, t), new(4, t))  # prefill
    for _ in range(6):  # past the first flush (the 4th step), onto the fast path
        step(new(16), new(4), new(4))
    layer = cache.layers[0]
    layer.device = _CudaLike()
    q, k, v = new(16), new(4), new(4)
    times = []
    for _ in range(args.calls):
        q1, k1, v1 = q.clone(), k.clone(), v.clone()
        t0 = time.perf_counter()
        step(q1, k1, v1)
        times.append(time.perf_counter() - t0)
        layer.n -= 1
        layer.length -= 1
        if hasattr(layer, "_fast_left"):  # older trees test the rows instead
            layer._fast_left += 1
    kept = times[args.warmup:]
    print(f"update + attention function, one layer: median {1e6 * statistics.median(kept):.1f} us, "
          f"min {1e6 * min(kept):.1f} us over {len(kept)} calls")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
