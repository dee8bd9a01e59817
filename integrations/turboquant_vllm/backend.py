"""The vLLM attention backend ``TQ_CODEC`` (vLLM's CUSTOM slot) and ``TurboQuantAttentionImpl``.

Thin glue: the codec and the paged-cache maths live in ``turboquant_torch`` (CPU tensors: NumPy reference;
CUDA tensors: the GPU backends of ``turboquant_codec``).

- ``customize_spec`` declares uint8 slots of ``R_k + R_v`` bytes per (token, KV head), so vLLM's block
  pool holds ``2 * head_dim * dtype_bytes / (R_k + R_v)`` times the tokens of a model-dtype cache (less the
  raw pool, which the worker reserves out of the budget: ``worker.py``).
- The metadata builder runs once per step, on the host: it updates the raw side pool's block map
  (``raw_pool.RawSlotManager``, in place) and counts the decode requests (vLLM orders them first).
  Every layer then makes two op calls: ``write_compressed`` (records and raw copies) and
  ``paged_attention`` over the block table (prefill, chunked prefill, prefix-cache hits and decode
  alike: the context comes from the cache, the new tokens raw); the attention does not read what
  the write writes, so on CUDA the write runs beside it (``write_beside``). A decode-only step synchronises
  nothing with the host, so vLLM captures it in a CUDA graph (uniform single-token decode).
- Channel permutations live in one tensor per (layer, K/V) from the first step on (identity until
  calibrated), and the first step with real tokens, eager, calibrates them in place: a graph
  captured on warm-up data reads the calibrated permutation on replay.
- Per rank, the layer's ``num_kv_heads`` KV heads are one codec stream each (tensor parallel safe).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch
from torch import Tensor
from turboquant_torch import TorchCodec, paged_attention, split_kv_cache, write_beside, write_compressed

from turboquant_codec import stream_seed

from .config import TurboQuantConfig
from .evidence import mark
from .raw_pool import RawSlotManager, blocks_per_seq

try:  # vLLM is optional: TurboQuantAttentionImpl also runs standalone
    from vllm.v1.attention.backend import (
        AttentionBackend,
        AttentionCGSupport,
        AttentionImpl,
        AttentionMetadataBuilder,
        CommonAttentionMetadata,
        MultipleOf,
    )
    from vllm.v1.attention.backends.utils import split_decodes_and_prefills
    from vllm.v1.kv_cache_interface import AttentionSpec, KVCacheLayout

    HAVE_VLLM = True
except ImportError:  # pragma: no cover - exercised where vLLM is absent
    HAVE_VLLM = False
    AttentionImpl = object  # type: ignore[misc,assignment]

NAME = "TQ_CODEC"


def layer_index(layer_name: str) -> int:
    """Index of a layer from vLLM's layer name (``model.layers.12.self_attn.attn`` -> 12)."""
    found = re.findall(r"\.(\d+)\.", f".{layer_name}.")
    if not found:
        raise ValueError(f"cannot find a layer index in layer name {layer_name!r}")
    return int(found[-1])


def make_codecs(cfg: TurboQuantConfig, head_dim: int, layer_idx: int) -> tuple[TorchCodec, TorchCodec]:
    """K and V codecs of one layer: seeds ``stream_seed(seed, 2 i)`` and ``stream_seed(seed, 2 i + 1)``."""
    k_seed, v_seed = stream_seed(cfg.seed, 2 * layer_idx), stream_seed(cfg.seed, 2 * layer_idx + 1)
    return (TorchCodec(d=head_dim, bits=cfg.k_bits, mode=cfg.k_mode, seed=k_seed, rotation=cfg.rotation),
            TorchCodec(d=head_dim, bits=cfg.v_bits, mode=cfg.v_mode, seed=v_seed, rotation=cfg.rotation))


@dataclass
class TQCodecMetadata:
    """Per-step metadata shared by every layer of the KV-cache group."""

    num_actual_tokens: int
    num_reqs: int
    max_query_len: int
    query_start_loc: Tensor  # [B + 1] int32
    seq_lens: Tensor  # [B] int32, new tokens included
    block_table: Tensor  # [B, max_blocks] int32
    slot_mapping: Tensor  # [num_tokens] int64, -1 = padding
    raw: RawSlotManager | None  # block -> raw-pool row map (None: no raw window)
    block_size: int
    num_decodes: int | None = None  # leading one-token requests (None: not counted)


class TurboQuantAttentionImpl(AttentionImpl):  # type: ignore[misc,valid-type]
    """TurboQuant attention over a compressed paged KV cache.

    In vLLM: built by the engine for every attention layer. Standalone (the original plugin's API)::

        impl = TurboQuantAttentionImpl(num_heads=32, head_size=128, scale=128 ** -0.5, num_kv_heads=8,
                                       tq_config=TurboQuantConfig(...), layer_idx=0)
        out = impl.forward(query, key, value)   # [T, Hq, d], [T, H, d], [T, H, d] -> [T, Hq, d]

    appends the tokens to a private single-sequence paged cache (same code path as in vLLM, with the
    raw recent window and sinks) and attends causally over everything seen so far; ``reset()`` starts
    a new sequence.
    """

    def __init__(
        self,
        num_heads: int,
        head_size: int,
        scale: float,
        num_kv_heads: int | None = None,
        alibi_slopes: list[float] | None = None,
        sliding_window: int | None = None,
        kv_cache_dtype: str = "auto",
        logits_soft_cap: float | None = None,
        attn_type: Any = "decoder",
        kv_sharing_target_layer_name: str | None = None,
        *,
        tq_config: TurboQuantConfig | None = None,
        layer_idx: int | None = None,
        **kwargs: Any,
    ) -> None:
        unsupported = []
        if alibi_slopes is not None:
            unsupported.append("ALiBi")
        if sliding_window is not None:
            unsupported.append("sliding window")
        if logits_soft_cap:
            unsupported.append("logits soft cap")
        if kv_sharing_target_layer_name is not None:
            unsupported.append("KV sharing between layers")
        if kwargs.get("sinks") is not None:
            unsupported.append("learned attention sinks")
        if str(getattr(attn_type, "value", attn_type)).lower() != "decoder":
            unsupported.append(f"attention type {attn_type}")
        if kv_cache_dtype not in ("auto", None):
            unsupported.append(f"kv_cache_dtype {kv_cache_dtype!r} (the cache is compressed by TQ_CODEC)")
        if unsupported:
            raise ValueError(f"{NAME} attention does not support: {', '.join(unsupported)}")
        self.num_heads = int(num_heads)
        self.head_size = int(head_size)
        self.scale = float(scale)
        self.num_kv_heads = int(num_kv_heads or num_heads)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        self.kv_cache_dtype = kv_cache_dtype
        self.kv_sharing_target_layer_name = None
        self.attn_type = attn_type
        if tq_config is None:
            tq_config = _engine_config()
        self.tq_config = tq_config.validate(head_dim=self.head_size)
        self.layer_idx = layer_idx
        self._codecs: tuple[TorchCodec, TorchCodec] | None = None
        self._raw_kv: tuple[Tensor, Tensor] | None = None
        self._marked = False
        self._standalone: _Standalone | None = None
        self._calibrated = False
        if layer_idx is not None:
            self._codecs = make_codecs(self.tq_config, self.head_size, layer_idx)

    # ------------------------------------------------------------------------------------ codecs
    @property
    def codecs(self) -> tuple[TorchCodec, TorchCodec]:
        if self._codecs is None:
            raise RuntimeError("layer index unknown: pass layer_idx= or run inside vLLM")
        return self._codecs

    def _layer_codecs(self, layer: Any) -> tuple[TorchCodec, TorchCodec]:
        if self._codecs is None:
            self.layer_idx = layer_index(getattr(layer, "layer_name", ""))
            self._codecs = make_codecs(self.tq_config, self.head_size, self.layer_idx)
        return self._codecs

    def _raw_pool(self, rows: int, block_size: int, like: Tensor) -> tuple[Tensor, Tensor]:
        if self._raw_kv is None or self._raw_kv[0].shape[0] != rows or self._raw_kv[0].shape[1] != block_size:
            shape = (rows, block_size, self.num_kv_heads, self.head_size)
            self._raw_kv = (torch.zeros(shape, dtype=like.dtype, device=like.device),
                            torch.zeros(shape, dtype=like.dtype, device=like.device))
        return self._raw_kv

    # ----------------------------------------------------------------------------------- forward
    def forward(  # type: ignore[override]
        self,
        layer: Any,
        query: Tensor | None = None,
        key: Tensor | None = None,
        value: Tensor | None = None,
        kv_cache: Tensor | None = None,
        attn_metadata: TQCodecMetadata | None = None,
        output: Tensor | None = None,
        output_scale: Tensor | None = None,
        output_block_scale: Tensor | None = None,
    ) -> Tensor:
        if isinstance(layer, Tensor):  # standalone: forward(query, key, value)
            return self._forward_standalone(layer, query, key)
        assert query is not None and output is not None
        if attn_metadata is None:  # profiling / dummy run: nothing is cached, nothing to write
            return output
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError(f"{NAME} does not produce quantized attention output")
        if key is None or value is None or kv_cache is None:
            raise NotImplementedError(f"{NAME} needs the layer's own key/value and cache")
        k_codec, v_codec = self._layer_codecs(layer)
        self._attend(query, key, value, kv_cache, attn_metadata, output, k_codec, v_codec)
        if not self._marked:
            self._marked = True
            if self.layer_idx == 0:
                mark("forward", backend=NAME, layer=getattr(layer, "layer_name", None),
                     kv_cache=[list(kv_cache.shape), str(kv_cache.dtype)], query=list(query.shape),
                     num_kv_heads=self.num_kv_heads, config=self.tq_config.describe(),
                     raw_rows=None if attn_metadata.raw is None else attn_metadata.raw.num_raw_blocks)
        return output

    def _attend(self, query: Tensor, key: Tensor, value: Tensor, kv_cache: Tensor, md: TQCodecMetadata,
                output: Tensor, k_codec: TorchCodec, v_codec: TorchCodec) -> None:
        k_cache, v_cache = split_kv_cache(kv_cache, k_codec, v_codec)
        n = md.num_actual_tokens
        slots = md.slot_mapping[:n]
        key = key.view(-1, self.num_kv_heads, self.head_size)
        value = value.view(-1, self.num_kv_heads, self.head_size)
        query = query.view(-1, self.num_heads, self.head_size)
        out = output.view(-1, self.num_heads, self.head_size)
        self._ready_channels(key, value, slots, k_codec, v_codec)
        raw: tuple[Tensor, Tensor, Tensor] | None = None
        if md.raw is not None and md.raw.enabled:
            pool_k, pool_v = self._raw_pool(md.raw.num_raw_blocks, md.block_size, key)
            raw = (pool_k, pool_v, md.raw.raw_slot_of_block)
        # TQ_CODEC_BACKEND names the backend for CUDA tensors; host tensors take the host's own.
        backend = self.tq_config.codec_backend if key.is_cuda else "auto"
        raw_k, raw_v, raw_map = raw if raw is not None else (None, None, None)
        write_beside(
            lambda: write_compressed(k_cache, v_cache, key, value, slots, k_codec, v_codec, raw=raw,
                                     backend=backend),
            lambda: paged_attention(query, key, value, k_cache, v_cache, md.block_table, md.seq_lens,
                                    md.query_start_loc, self.scale, k_codec, v_codec, raw_k, raw_v, raw_map,
                                    out=out, num_decodes=md.num_decodes, backend=backend),
            key.device)

    def _ready_channels(self, key: Tensor, value: Tensor, slots: Tensor, k_codec: TorchCodec,
                        v_codec: TorchCodec) -> None:
        """Give split codecs their permutation tensors before any write (module docstring)."""
        if self._calibrated or not (k_codec.split or v_codec.split):
            return
        capturing = key.is_cuda and torch.cuda.is_current_stream_capturing()
        rows = None if capturing else torch.nonzero(slots >= 0).squeeze(1)
        for codec, x in ((k_codec, key), (v_codec, value)):
            if not codec.split:
                continue
            if rows is not None and rows.numel():
                codec.calibrate(x[rows].transpose(0, 1))
            elif codec.channels is None:  # warm-up or capture: identity until real tokens come
                identity = torch.arange(self.head_size, device=key.device).expand(self.num_kv_heads, -1)
                codec.set_channels(identity.contiguous())
        self._calibrated = rows is not None and rows.numel() > 0

    # -------------------------------------------------------------------------------- standalone
    def reset(self) -> None:
        """Standalone use: forget the cached sequence."""
        self._standalone = None
        self._raw_kv = None

    def _forward_standalone(self, query: Tensor, key: Tensor | None, value: Tensor | None) -> Tensor:
        if key is None or value is None:
            raise ValueError("standalone forward takes (query, key, value)")
        key = key.view(key.shape[0], self.num_kv_heads, self.head_size)
        value = value.view(value.shape[0], self.num_kv_heads, self.head_size)
        q = query.view(query.shape[0], self.num_heads, self.head_size)
        if self._standalone is None:
            self._standalone = _Standalone(self.tq_config, self.num_kv_heads, self.head_size, key.device)
        st = self._standalone
        md, kv_cache = st.step(key.shape[0])
        out = torch.zeros_like(q)
        self._attend(q, key, value, kv_cache, md, out, *self.codecs)
        return out.view(query.shape)


class _Standalone:
    """One sequence in a private paged cache (block size 16, blocks in order)."""

    BLOCK = 16

    def __init__(self, cfg: TurboQuantConfig, heads: int, head_dim: int, device: torch.device) -> None:
        self.max_len = cfg.max_seq_len or 4096
        self.blocks = -(-self.max_len // self.BLOCK)
        self.kv_cache = torch.zeros(self.blocks, heads, self.BLOCK, cfg.state_bytes(head_dim),
                                    dtype=torch.uint8, device=device)
        rows = blocks_per_seq(self.BLOCK, cfg.raw_window, cfg.sink_tokens)
        self.raw = RawSlotManager(self.blocks, rows, self.BLOCK, cfg.raw_window, cfg.sink_tokens, device)
        self.length = 0
        self.device = device

    def step(self, n: int) -> tuple[TQCodecMetadata, Tensor]:
        if self.length + n > self.max_len:
            raise ValueError(f"sequence of {self.length + n} tokens exceeds max_seq_len={self.max_len} "
                             "(TQ_MAX_SEQ_LEN)")
        dev = self.device
        block_table = torch.arange(self.blocks, dtype=torch.int32, device=dev)[None]
        seq = torch.tensor([self.length + n], dtype=torch.int32, device=dev)
        qsl = torch.tensor([0, n], dtype=torch.int32, device=dev)
        slots = torch.arange(self.length, self.length + n, dtype=torch.int64, device=dev)
        self.raw.step(block_table, seq, torch.tensor([n]))
        self.length += n
        md = TQCodecMetadata(num_actual_tokens=n, num_reqs=1, max_query_len=n, query_start_loc=qsl,
                             seq_lens=seq, block_table=block_table, slot_mapping=slots,
                             raw=self.raw if self.raw.enabled else None, block_size=self.BLOCK,
                             num_decodes=1 if n == 1 else 0)
        return md, self.kv_cache


def _engine_config() -> TurboQuantConfig:
    """Inside vLLM: the env configuration validated against the served model; else from the env."""
    from .sizing import env_config, validated_config

    if HAVE_VLLM:
        try:
            from vllm.config import get_current_vllm_config

            vllm_config = get_current_vllm_config()
        except Exception:  # no config context (standalone use)
            vllm_config = None
        if vllm_config is not None and getattr(vllm_config, "model_config", None) is not None:
            return validated_config(vllm_config)
    return env_config()


if HAVE_VLLM:

    class TQCodecMetadataBuilder(AttentionMetadataBuilder[TQCodecMetadata]):
        # Decode-only steps run without host synchronisation; vLLM orders one-token requests first.
        _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE
        reorder_batch_threshold: ClassVar[int | None] = 1

        def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:  # type: ignore[no-untyped-def]
            super().__init__(kv_cache_spec, layer_names, vllm_config, device)
            from .sizing import env_config, raw_reservation

            self.tq_config = env_config()
            self.block_size = int(kv_cache_spec.block_size)
            self.reservation = raw_reservation(vllm_config, self.block_size)
            self.raw: RawSlotManager | None = None
            from . import worker

            if self.reservation.num_raw_blocks and not worker.RESERVED:
                import logging

                logging.getLogger("vllm.turboquant_vllm").warning(
                    "TQ_CODEC: this worker did not reserve the raw side pool (%.1f MiB) out of the KV "
                    "budget; use worker turboquant_vllm.worker.TQCPUWorker / TQGPUWorker for honest "
                    "capacity figures", self.reservation.bytes / 2**20)

        def _num_blocks(self) -> int:
            """Physical blocks of this group's cache tensors (what the raw map is indexed by)."""
            ctx = self.vllm_config.compilation_config.static_forward_context
            for name in self.layer_names:
                kv = getattr(ctx.get(name), "kv_cache", None)
                if isinstance(kv, list):
                    kv = kv[0] if kv else None
                if isinstance(kv, Tensor) and kv.dim() == 4:
                    return int(kv.shape[0])
            blocks = self.vllm_config.cache_config.num_gpu_blocks
            if not blocks:
                raise RuntimeError(f"{NAME}: cannot find the number of KV-cache blocks")
            return int(blocks)

        def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
                  fast_build: bool = False) -> TQCodecMetadata:
            m = common_attn_metadata
            b = m.num_reqs
            qsl_cpu = m.query_start_loc_cpu[: b + 1]
            seq_cpu = m.seq_lens[:b].cpu()
            block_table = m.block_table_tensor[:b]
            raw = None
            if self.reservation.num_raw_blocks:
                if self.raw is None:
                    num_blocks = self._num_blocks()
                    self.raw = RawSlotManager(num_blocks, self.reservation.num_raw_blocks, self.block_size,
                                              self.tq_config.raw_window, self.tq_config.sink_tokens,
                                              self.device)
                self.raw.step(block_table, seq_cpu, (qsl_cpu[1:] - qsl_cpu[:-1]))
                raw = self.raw
            num_decodes = split_decodes_and_prefills(m, decode_threshold=1)[0]
            return TQCodecMetadata(
                num_actual_tokens=m.num_actual_tokens, num_reqs=b, max_query_len=m.max_query_len,
                query_start_loc=m.query_start_loc[: b + 1], seq_lens=m.seq_lens[:b],
                block_table=block_table, slot_mapping=m.slot_mapping, raw=raw, block_size=self.block_size,
                num_decodes=num_decodes,
            )

    class TQCodecAttentionBackend(AttentionBackend):
        """vLLM backend (CUSTOM slot) named ``TQ_CODEC``: a TurboQuant-compressed paged KV cache."""

        forward_includes_kv_cache_update: bool = True
        accept_output_buffer: bool = True
        supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16, torch.float32]
        supported_kv_cache_dtypes: ClassVar[list[Any]] = ["auto"]

        @staticmethod
        def get_name() -> str:
            # vLLM 0.32 looks this up in AttentionBackendEnum (Attention.__init__), so it must be the
            # slot's name; "TQ_CODEC" (NAME) is what logs, markers and errors call the backend.
            return "CUSTOM"

        @staticmethod
        def get_impl_cls() -> type[TurboQuantAttentionImpl]:
            return TurboQuantAttentionImpl

        @staticmethod
        def get_builder_cls() -> type[TQCodecMetadataBuilder]:
            return TQCodecMetadataBuilder

        @staticmethod
        def get_supported_kernel_block_sizes(kv_cache_spec=None) -> list:  # type: ignore[no-untyped-def]
            return [MultipleOf(1)]

        @classmethod
        def supported_kv_cache_layouts(cls):  # type: ignore[no-untyped-def]
            return (KVCacheLayout.LBHNC,)

        @classmethod
        def customize_spec(cls, spec: AttentionSpec) -> AttentionSpec:
            """uint8 slots of ``R_k + R_v`` bytes per (token, KV head): the compressed page size."""
            if spec.state_content_bytes is not None:
                return spec  # already customised (vLLM calls this more than once)
            if spec.head_size_v not in (None, spec.head_size):
                raise ValueError(f"{NAME} needs equal key and value head sizes, got {spec.head_size} and "
                                 f"{spec.head_size_v}")
            from .sizing import env_config

            state = env_config().state_bytes(spec.head_size)
            return replace(spec, dtype=torch.uint8, state_content_bytes=state)
