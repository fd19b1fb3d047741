"""`torch.ops.kvpass.kv_similarity`: key–value similarity to running anchors as one opaque graph node.

CPU (and any device without Triton) runs `kvpass.kernels.similarity.kv_similarity`; the Triton
backend registers the CUDA kernel (`kvpass.kernels.triton_backend`).
"""

from __future__ import annotations

import torch

from kvpass.kernels import similarity


@torch.library.custom_op("kvpass::kv_similarity", mutates_args=())
def kv_similarity(
    k: torch.Tensor, v: torch.Tensor, anchor_k: torch.Tensor, anchor_v: torch.Tensor, valid: torch.Tensor,
    primed: torch.Tensor, gamma: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(s^K, s^V [B, Hkv, L], anchors after the call [B, Hkv, D]); see `kvpass.kernels.similarity`."""
    return similarity.kv_similarity(k, v, anchor_k, anchor_v, valid, primed, gamma)


@kv_similarity.register_fake
def _kv_similarity_fake(k, v, anchor_k, anchor_v, valid, primed, gamma):
    sims = k.new_empty(k.shape[:3], dtype=torch.float32)
    return sims, torch.empty_like(sims), torch.empty_like(anchor_k), torch.empty_like(anchor_v)
