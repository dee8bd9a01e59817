"""The ``"turboquant"`` attention for transformers: attends on ``TurboQuantCache``'s packed records.

Registered on import in ``transformers.AttentionInterface`` and, with transformers' ``sdpa_mask``, in
``AttentionMaskInterface`` (without the mask registration a padded batch would get no mask). Select
it with ``from_pretrained(..., attn_implementation="turboquant")`` or ``use(model)``.

What the function receives (transformers' attention-interface contract)::

    query            (B, H_q, q, d)   possibly a transposed view
    key, value       (B, H, q, d)     what the cache's ``update`` returned: only the new tokens, tagged
                                      with their ``TurboQuantLayer`` (untagged: a layer the cache does
                                      not serve, or no cache: plain SDPA)
    attention_mask   (B, 1, q, L + q) bool, True = attend, column j = padded position j; or None
    returns          (B, q, H_q, d), None

Paths, per layer and step:

- one new token per row, every one real, something compressed: ``turboquant_codec.paged_attention``
  over [sinks | records | window | new token] (the fused kernel on CUDA, the
  compiled CPU kernel on the host), GQA by head groups; no decoded history anywhere;
- otherwise (prefill, chunked prefill, a padded new token, nothing compressed yet): transformers'
  SDPA over the stored history decoded transiently and the new tokens. Rows keep only their real
  tokens, so with left padding each row's history is right-aligned in the padded columns and the
  mask's history columns are rebuilt from the row lengths.

Then the layer stores the new real tokens (``TurboQuantLayer.commit``). Which new tokens are real
comes from the mask's last query row (one host read per step, shared by the layers).
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch
from torch import Tensor
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from turboquant_codec import paged_attention

NAME = "turboquant"


def _real_new(cache: Any, mask: Tensor | None, kv_len: int, q: int) -> np.ndarray | None:
    """[B, q] bool: which new tokens are real (None: all), read from the mask once per step."""
    if mask is None:
        return None
    memo = cache.mask_memo if cache is not None else {}
    if memo.get("mask") is mask and memo.get("at") == (kv_len, q):
        return memo["real"]
    cols = mask[:, 0, -1, kv_len - q : kv_len]
    real = (cols if cols.dtype == torch.bool else cols == 0).cpu().numpy()
    result = None if real.all() else real
    memo.update(mask=mask, at=(kv_len, q), real=result)
    return result


def _dense(module: Any, layer: Any, query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None,
           scale: float, dropout: float, kwargs: dict[str, Any]) -> tuple[Tensor, Any]:
    """SDPA over [history decoded transiently | new tokens], in transformers' padded columns."""
    b, _, q, _ = key.shape
    past = layer.length - q
    n = layer.n
    if (n > past).any():
        raise RuntimeError(f"layer {layer.layer_idx} holds {int(n.max())} tokens in a row but the model "
                           f"counts {past} past positions")
    if not n.any():
        # Nothing stored: the new tokens alone, in the mask's last q columns.
        m = None if mask is None else mask[..., past : past + q]
        return sdpa_attention_forward(module, query, key, value, m, dropout=dropout, scaling=scale, **kwargs)
    hist_k, hist_v = layer.history()
    if (n == past).all():
        # Every padded column is a stored token: transformers' layout exactly.
        k_all, v_all = torch.cat([hist_k, key], dim=2), torch.cat([hist_v, value], dim=2)
        return sdpa_attention_forward(module, query, k_all, v_all, mask, dropout=dropout, scaling=scale,
                                      **kwargs)
    # Left padding: row r's n[r] tokens fill the last n[r] of the ``past`` history columns.
    dev = key.device
    start = torch.from_numpy(past - n).to(dev)
    cols = torch.arange(past, device=dev)
    valid = cols[None, :] >= start[:, None]  # (B, past)
    src = (cols[None, :] - start[:, None]).clamp(0, hist_k.shape[2] - 1)
    idx = src[:, None, :, None].expand(b, hist_k.shape[1], past, hist_k.shape[3])
    keep = valid[:, None, :, None]
    k_all = torch.cat([torch.gather(hist_k, 2, idx) * keep, key], dim=2)
    v_all = torch.cat([torch.gather(hist_v, 2, idx) * keep, value], dim=2)
    if mask is None:
        new = torch.ones(q, q, dtype=torch.bool, device=dev).tril()
        m = torch.cat([valid[:, None, None, :].expand(b, 1, q, past), new.expand(b, 1, q, q)], dim=-1)
    elif mask.dtype == torch.bool:
        m = torch.cat([valid[:, None, None, :].expand(b, 1, q, past), mask[..., past : past + q]], dim=-1)
    else:
        hist = torch.where(valid, 0.0, torch.finfo(mask.dtype).min).to(mask.dtype)
        m = torch.cat([hist[:, None, None, :].expand(b, 1, q, past), mask[..., past : past + q]], dim=-1)
    return sdpa_attention_forward(module, query, k_all, v_all, m, dropout=dropout, scaling=scale, **kwargs)


def _attend(layer: Any, scale: float, query: Tensor, key: Tensor, value: Tensor, out: Tensor) -> None:
    """The codec's op on a layer's one-token step: ``query`` and ``out`` (B, H_q, d), ``key`` and
    ``value`` (B, H, d). Called directly, not through its torch.library wrapper, which only adds host
    time per call."""
    a = layer.paged_args()
    paged_attention(a["cache"], query, key, value, a["block_table"], a["seq_lens"], a["query_start_loc"],
                    scale=scale, out=out, num_decodes=a["num_decodes"])


def _paged(layer: Any, query: Tensor, key: Tensor, value: Tensor, scale: float) -> Tensor:
    """One token per row over the paged records: (B, 1, H_q, d)."""
    if layer.on_host:
        # NumPy views through the layer's decoder (cache and table checked once, not every layer
        # call); the kernel reads the strided views as they are.
        a = layer.paged_args()
        q, k, v = (t.detach().numpy()[:, :, 0] for t in (query, key, value))
        out = np.empty(q.shape, q.dtype)
        a["decoder"](q, k, v, a["seq_lens"], scale=scale, out=out)
        return torch.from_numpy(out).unsqueeze(1)
    if torch.is_grad_enabled():
        # Autograd may keep the output (o_proj's input) past this step: fresh tensors, not buffers
        # that the next step overwrites.
        q_t, k_t, v_t = (t[:, :, 0].detach().contiguous() for t in (query, key, value))
        out_t = torch.empty_like(q_t)
        _attend(layer, scale, q_t, k_t, v_t, out_t)
        return out_t.unsqueeze(1)
    # The new tokens go through the layer's step buffers: the op then sees the same arrays every
    # step and replays its prepared launches, and on CUDA the layer replays the op and its append
    # as one CUDA graph (``TurboQuantLayer.run_step``); the op runs only when the graph does not.
    return layer.run_step(query, key, value, functools.partial(_attend, layer, scale), scale)


def turboquant_attention(module: Any, query: Tensor, key: Tensor, value: Tensor,
                         attention_mask: Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                         **kwargs: Any) -> tuple[Tensor, Any]:
    """transformers attention function (contract in the module docstring)."""
    ref = getattr(key, "_tq_layer", None)
    layer = ref() if ref is not None else None
    if layer is None or layer.pending is None or layer.pending[0] is not key:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    cache_ref = getattr(key, "_tq_cache", None)
    cache = cache_ref() if cache_ref is not None else None
    q, d = query.shape[2], query.shape[3]
    scale = float(scaling) if scaling is not None else d ** -0.5
    try:
        if cache is not None and getattr(module, "config", None) is not None:
            cache.check_model(module.config)
        real = _real_new(cache, attention_mask, layer.length, q)
        if q == 1 and real is None and layer.can_page():
            result: tuple[Tensor, Any] = (_paged(layer, query, key, value, scale), None)
        else:
            result = _dense(module, layer, query, key, value, attention_mask, scale, dropout, kwargs)
    except BaseException:
        layer.pending = None
        layer.length -= q
        raise
    layer.commit(real)
    return result


def register(name: str = NAME) -> None:
    """Register the attention and its mask (transformers' ``sdpa_mask``) under ``name``."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(name, turboquant_attention)
    AttentionMaskInterface.register(name, sdpa_mask)


def use(model: Any) -> Any:
    """Switch ``model`` to the ``"turboquant"`` attention; returns it."""
    register()
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(NAME)
    else:
        model.config._attn_implementation = NAME
    return model


register()
