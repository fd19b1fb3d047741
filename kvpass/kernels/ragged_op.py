"""`torch.ops.kvpass.ragged_attention`: attention over a ragged (packed, per-head length) KV cache.

CPU runs `kvpass.kernels.ragged.ragged_attention`; the Triton backend registers the CUDA path
(the decode, prefill and statistics kernels reading the packed buffer through per-head offsets).
"""

from __future__ import annotations

import torch

from kvpass.kernels import ragged


@torch.library.custom_op("kvpass::ragged_attention", mutates_args=())
def ragged_attention(
    q: torch.Tensor, packed_k: torch.Tensor, packed_v: torch.Tensor, packed_slots: torch.Tensor,
    lengths: torch.Tensor, tail_k: torch.Tensor, tail_v: torch.Tensor, tail_slots: torch.Tensor,
    q_slots: torch.Tensor, scale: float, causal: bool, stat: str, window: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """See `kvpass.kernels.ragged.ragged_attention` for shapes; returns (out, packed statistic, tail statistic)."""
    return ragged.ragged_attention(q, packed_k, packed_v, packed_slots, lengths, tail_k, tail_v, tail_slots, q_slots,
                                   scale, causal, stat, window)


@ragged_attention.register_fake
def _ragged_attention_fake(q, packed_k, packed_v, packed_slots, lengths, tail_k, tail_v, tail_slots, q_slots, scale,
                           causal, stat, window):
    packed_stat = q.new_empty((packed_k.shape[0],), dtype=torch.float32)
    return torch.empty_like(q), packed_stat, q.new_empty(tail_k.shape[:3], dtype=torch.float32)
