"""`torch.ops.kvpass.kv_similarity`: the token-filtering redundancy score as one opaque graph node.

CPU (and any device without Triton) runs `kvpass.kernels.similarity.kv_similarity`; the Triton
backend registers the CUDA kernel (`kvpass.kernels.triton_backend`).
"""

from __future__ import annotations

import torch

from kvpass.kernels import similarity


@torch.library.custom_op("kvpass::kv_similarity", mutates_args=())
def kv_similarity(k: torch.Tensor, v: torch.Tensor, k_slots: torch.Tensor) -> torch.Tensor:
    """Redundancy [B, Hkv, T] of each cached token; see `kvpass.kernels.similarity` for the formula."""
    return similarity.kv_similarity(k, v, k_slots)


@kv_similarity.register_fake
def _kv_similarity_fake(k, v, k_slots):
    return k.new_empty(k.shape[:3], dtype=torch.float32)
