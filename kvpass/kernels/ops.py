"""`torch.ops.kvpass.*`: the custom ops rewritten attention sites call.

Registered with `torch.library.custom_op` plus a fake (meta) implementation, so that
`torch.compile(fullgraph=True)` and `torch.export` treat each as one opaque node instead
of breaking the graph. CPU runs the reference kernels; CUDA dispatches to Triton when the
Triton backend is available (see `kvpass.kernels.triton_backend`), else to the reference.
"""

from __future__ import annotations

import torch

from kvpass.kernels import reference


@torch.library.custom_op("kvpass::attention", mutates_args=())
def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_slots: torch.Tensor,
    k_slots: torch.Tensor,
    scale: float,
    causal: bool,
    stat: str,
    window: int,
    mask: torch.Tensor | None = None,
    softcap: float = 0.0,
    sinks: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over a compacted cache that also returns a per-key eviction statistic.

    See `kvpass.kernels.reference.attention` for shapes, the slot convention and the optional
    model mask, logit soft-capping and sink logits.
    """
    return reference.attention(q, k, v, q_slots, k_slots, scale, causal, stat, window, mask, softcap, sinks)


@attention.register_fake
def _attention_fake(q, k, v, q_slots, k_slots, scale, causal, stat, window, mask=None, softcap=0.0, sinks=None):
    stats = q.new_empty((k.shape[0], k.shape[1], k.shape[2]), dtype=torch.float32)
    return torch.empty_like(q), stats


@torch.library.custom_op("kvpass::select_and_compact", mutates_args=())
def select_and_compact(
    k: torch.Tensor, v: torch.Tensor, k_slots: torch.Tensor, scores: torch.Tensor, keep: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-`keep` tokens per (batch, KV head) gathered into new, smaller K/V/slot tensors."""
    return reference.select_and_compact(k, v, k_slots, scores, keep)


@select_and_compact.register_fake
def _select_and_compact_fake(k, v, k_slots, scores, keep):
    batch, heads, _, dim = k.shape
    return (
        k.new_empty((batch, heads, keep, dim)),
        v.new_empty((batch, heads, keep, v.shape[-1])),
        k_slots.new_empty((batch, heads, keep)),
        k_slots.new_empty((batch, heads, keep), dtype=torch.int64),
    )
