"""Attention over a ragged (packed, per-head length) KV cache: Triton against the torch reference
(invariant 5), and the reference against a dense masked attention.

Without CUDA the Triton kernels run in the interpreter (TRITON_INTERPRET=1, set before triton is
first imported), so shapes stay tiny; with CUDA the same tests run on the GPU."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kvpass.kernels import ragged
from kvpass.kernels.reference import slot_mask

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
STATS = ["none", "column_sum", "window", "last_query"]


def ragged_inputs(lengths: list[list[int]], group: int, lq: int, tail: int, dim: int = 16, seed: int = 0):
    """A packed cache with these per-head lengths (slots a sorted subset of 0..59, one padding row),
    a tail of `tail` tokens at 60.., and `lq` queries: the newest tokens (in the tail, as the runtime
    calls it; with no tail, the positions right after the packed part)."""
    gen = torch.Generator().manual_seed(seed)
    lengths_t = torch.tensor(lengths, dtype=torch.int32)
    batch, kv_heads = lengths_t.shape
    rows = int(lengths_t.sum())
    slots = torch.cat([torch.sort(torch.randperm(60, generator=gen)[:n]).values for n in lengths_t.flatten().tolist()])
    slots = slots.int()
    slots[0] = -1 - slots[0]
    end = 60 + tail
    tail_slots = torch.arange(60, end, dtype=torch.int32).expand(batch, tail).contiguous()
    first = end - lq if tail else 60
    q_slots = torch.arange(first, first + lq, dtype=torch.int32).expand(batch, lq).contiguous()
    tensors = [torch.randn(rows, dim, generator=gen), torch.randn(rows, dim, generator=gen), slots, lengths_t,
               torch.randn(batch, kv_heads, tail, dim, generator=gen), torch.randn(batch, kv_heads, tail, dim,
                                                                                   generator=gen), tail_slots, q_slots]
    q = torch.randn(batch, kv_heads * group, lq, dim, generator=gen)
    return [x.to(DEVICE) for x in (q, *tensors)]


def dense_masked(q, packed_k, packed_v, packed_slots, lengths, tail_k, tail_v, tail_slots, q_slots, scale, causal):
    """The same attention written densely: every head padded to the longest, padding masked out."""
    batch, kv_heads = lengths.shape
    group = q.shape[1] // kv_heads
    width = int(lengths.max()) + tail_k.shape[2]
    keys = torch.zeros(batch, kv_heads, width, q.shape[-1])
    values, slots = torch.zeros_like(keys), torch.full((batch, kv_heads, width), -(10**6), dtype=torch.int32)
    row = 0
    for b in range(batch):
        for h in range(kv_heads):
            n = int(lengths[b, h])
            keys[b, h, :n], values[b, h, :n], slots[b, h, :n] = packed_k[row:row + n], packed_v[row:row + n], \
                packed_slots[row:row + n]
            keys[b, h, n:n + tail_k.shape[2]], values[b, h, n:n + tail_k.shape[2]] = tail_k[b, h], tail_v[b, h]
            slots[b, h, n:n + tail_k.shape[2]] = tail_slots[b]
            row += n
    mask = slot_mask(q_slots, slots, causal).repeat_interleave(group, 1)
    logits = q @ keys.repeat_interleave(group, 1).transpose(-1, -2) * scale
    return torch.softmax(logits.masked_fill(~mask, float("-inf")), -1) @ values.repeat_interleave(group, 1)


@pytest.mark.parametrize("lq,tail", [(1, 3), (3, 3), (20, 24)])
def test_reference_equals_a_dense_masked_attention(lq, tail) -> None:
    args = [x.cpu() for x in ragged_inputs([[5, 40, 0], [2, 17, 9]], group=3, lq=lq, tail=tail)]
    out, packed_stat, tail_stat = ragged.ragged_attention(*args, 0.25, True, "column_sum", 0)
    torch.testing.assert_close(out, dense_masked(*args, 0.25, True), atol=1e-5, rtol=1e-5)
    total = packed_stat.sum() + tail_stat.sum()  # every query row's probabilities sum to one, per group member
    torch.testing.assert_close(total, torch.tensor(float(args[0].shape[0] * args[0].shape[1] * lq)))


@pytest.mark.triton
@pytest.mark.parametrize("lq,tail,lengths", [(1, 3, [[5, 40], [0, 17]]), (4, 0, [[5, 40], [2, 17]]),
                                             (20, 24, [[5, 40], [2, 17]])])
@pytest.mark.parametrize("stat", STATS)
def test_triton_reads_the_packed_buffer_through_offsets(lq, tail, lengths, stat) -> None:
    pytest.importorskip("triton")
    from kvpass.kernels.triton_ragged import ragged_attention as triton_ragged_attention

    args = ragged_inputs(lengths, group=3, lq=lq, tail=tail, seed=lq)
    expected = ragged.ragged_attention(*[x.cpu() for x in args], 0.25, True, stat, 3)
    got = triton_ragged_attention(*args, 0.25, True, stat, 3)
    for value, reference in zip(got, expected):
        assert value.shape == reference.shape
        torch.testing.assert_close(value.cpu(), reference, atol=2e-5, rtol=2e-5)
