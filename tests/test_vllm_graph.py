"""The vLLM backend's per-layer glue (``TurboQuantAttentionImpl._attend``) without vLLM: a decode
step captured in a CUDA graph replays what eager execution computes, step after step.

vLLM cannot be installed on the GPU machine, so this drives the impl with the metadata vLLM's
builder would hand it (``TQCodecMetadata``): persistent step buffers, a raw side pool whose block map
the host updates in place between replays, and a first eager prefill that calibrates the channels.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

HEADS, KV_HEADS, D, BLOCK, BATCH, PROMPT, STEPS = 8, 2, 128, 16, 4, 150, 3


def _impl():  # type: ignore[no-untyped-def]
    from turboquant_vllm import TurboQuantAttentionImpl, TurboQuantConfig

    cfg = TurboQuantConfig(raw_window=64, sink_tokens=4, max_seq_len=1024)
    return TurboQuantAttentionImpl(num_heads=HEADS, head_size=D, scale=D**-0.5, num_kv_heads=KV_HEADS,
                                   tq_config=cfg, layer_idx=3), cfg


def _metadata(table: torch.Tensor, raw: Any, lens: list[int], q_lens: list[int], slots: torch.Tensor,
              qsl: torch.Tensor, seq: torch.Tensor) -> Any:
    """vLLM's step metadata for ``_attend``, after the raw pool's map is updated for the step."""
    from turboquant_vllm.backend import TQCodecMetadata

    raw.step(table, torch.tensor(lens), torch.tensor(q_lens))
    return TQCodecMetadata(num_actual_tokens=sum(q_lens), num_reqs=BATCH, max_query_len=max(q_lens),
                           query_start_loc=qsl, seq_lens=seq, block_table=table, slot_mapping=slots,
                           raw=raw, block_size=BLOCK, num_decodes=BATCH if max(q_lens) == 1 else 0)


def _slots(table: torch.Tensor, positions: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The cache slots of the tokens at ``positions`` of requests ``rows``."""
    return (table[rows, positions // BLOCK].long() * BLOCK + positions % BLOCK).long()


def test_decode_step_graph_replays_eager() -> None:
    from turboquant_vllm.backend import TQCodecMetadata
    from turboquant_vllm.raw_pool import RawSlotManager, blocks_per_seq

    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    impl, cfg = _impl()
    per_seq = -(-(PROMPT + STEPS + 1) // BLOCK)
    num_blocks = BATCH * per_seq + 3
    kv = torch.zeros(num_blocks, KV_HEADS, BLOCK, cfg.state_bytes(D), dtype=torch.uint8, device=dev)
    table = torch.randperm(num_blocks, generator=gen, device=dev)[: BATCH * per_seq]
    table = table.view(BATCH, per_seq).int()
    raw = RawSlotManager(num_blocks, BATCH * blocks_per_seq(BLOCK, 64, 4), BLOCK, 64, 4, dev)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device=dev, dtype=torch.bfloat16)

    # Eager prefill of every request (calibrates the channel permutations from real tokens).
    rows = torch.arange(BATCH, device=dev).repeat_interleave(PROMPT)
    pos = torch.arange(PROMPT, device=dev).repeat(BATCH)
    n = BATCH * PROMPT
    qsl = torch.arange(0, n + 1, PROMPT, device=dev, dtype=torch.int32)
    seq = torch.full((BATCH,), PROMPT, device=dev, dtype=torch.int32)
    md = _metadata(table, raw, [PROMPT] * BATCH, [PROMPT] * BATCH, _slots(table, pos, rows), qsl, seq)
    out = torch.empty(n, HEADS * D, device=dev, dtype=torch.bfloat16)
    impl._attend(rand(n, HEADS * D), rand(n, KV_HEADS * D), rand(n, KV_HEADS * D), kv, md, out, *impl.codecs)
    assert impl._calibrated

    # Persistent decode-step buffers, as vLLM keeps them for graph replay.
    q_buf, k_buf, v_buf = rand(BATCH, HEADS * D), rand(BATCH, KV_HEADS * D), rand(BATCH, KV_HEADS * D)
    slot_buf = torch.zeros(BATCH, dtype=torch.int64, device=dev)
    seq_buf = torch.zeros(BATCH, dtype=torch.int32, device=dev)
    qsl_buf = torch.arange(BATCH + 1, dtype=torch.int32, device=dev)
    out_buf = torch.zeros(BATCH, HEADS * D, device=dev, dtype=torch.bfloat16)
    batch = torch.arange(BATCH, device=dev)

    def load(length: int) -> TQCodecMetadata:
        slot_buf.copy_(_slots(table, torch.full((BATCH,), length - 1, device=dev), batch))
        seq_buf.fill_(length)
        for buf in (q_buf, k_buf, v_buf):
            buf.copy_(rand(*buf.shape))
        return _metadata(table, raw, [length] * BATCH, [1] * BATCH, slot_buf, qsl_buf, seq_buf)

    def step(md: TQCodecMetadata) -> None:
        impl._attend(q_buf, k_buf, v_buf, kv, md, out_buf, *impl.codecs)

    md = load(PROMPT + 1)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        kv_before = kv.clone()
        step(md)  # warm-up outside capture (kernel builds, scratch)
        kv.copy_(kv_before)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(md)
    for i in range(STEPS):
        md = load(PROMPT + 1 + i) if i else md
        kv_before = kv.clone()
        graph.replay()
        replayed, kv_replayed = out_buf.clone(), kv.clone()
        kv.copy_(kv_before)
        step(md)
        torch.cuda.synchronize()
        assert torch.equal(kv_replayed, kv), f"step {i}: the captured write differs from eager"
        assert torch.equal(replayed, out_buf), f"step {i}: the captured attention differs from eager"
        assert replayed.float().abs().max() > 0.01


def test_write_beside_attention_changes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """The layer's write on its side stream (``write_beside``) leaves the same cache bytes and output
    as the write, then the attention, on one stream: a prefill, then decode steps, both ways."""
    import turboquant_torch.paged as torch_paged
    import turboquant_vllm.backend as backend
    from turboquant_vllm.raw_pool import RawSlotManager, blocks_per_seq

    dev = torch.device("cuda")
    per_seq = -(-(PROMPT + STEPS + 1) // BLOCK)
    num_blocks = BATCH * per_seq

    def run() -> tuple[torch.Tensor, list[torch.Tensor]]:
        gen = torch.Generator(device=dev).manual_seed(1)
        impl, cfg = _impl()
        kv = torch.zeros(num_blocks, KV_HEADS, BLOCK, cfg.state_bytes(D), dtype=torch.uint8, device=dev)
        table = torch.randperm(num_blocks, generator=gen, device=dev).view(BATCH, per_seq).int()
        raw = RawSlotManager(num_blocks, BATCH * blocks_per_seq(BLOCK, 64, 4), BLOCK, 64, 4, dev)
        outs = []
        for length, q in [(PROMPT, PROMPT)] + [(PROMPT + 1 + i, 1) for i in range(STEPS)]:
            rows = torch.arange(BATCH, device=dev).repeat_interleave(q)
            pos = torch.arange(length - q, length, device=dev).repeat(BATCH)
            md = _metadata(table, raw, [length] * BATCH, [q] * BATCH, _slots(table, pos, rows),
                           torch.arange(0, BATCH * q + 1, q, device=dev, dtype=torch.int32),
                           torch.full((BATCH,), length, device=dev, dtype=torch.int32))
            x = [torch.randn(BATCH * q, h * D, generator=gen, device=dev, dtype=torch.bfloat16)
                 for h in (HEADS, KV_HEADS, KV_HEADS)]
            out = torch.zeros(BATCH * q, HEADS * D, device=dev, dtype=torch.bfloat16)
            impl._attend(*x, kv, md, out, *impl.codecs)
            outs.append(out)
        torch.cuda.synchronize()
        return kv, outs

    monkeypatch.setattr(torch_paged, "_SIDE", {})
    kv_beside, out_beside = run()
    assert torch_paged._SIDE  # the write took the side stream
    calls = []

    def in_order(write, attend, device):
        calls.append(device)
        write()
        attend()

    monkeypatch.setattr(backend, "write_beside", in_order)
    kv_order, out_order = run()
    assert len(calls) == 1 + STEPS
    assert torch.equal(kv_beside, kv_order)
    for a, b in zip(out_beside, out_order, strict=True):
        assert torch.equal(a, b)
        assert a.float().abs().max() > 0.01
