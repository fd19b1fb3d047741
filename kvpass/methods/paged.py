"""PagedEviction: evict whole fixed-size pages, scored without attention (EACL 2026 Findings)."""

from dataclasses import dataclass

import torch

from kvpass.methods.base import Method, Observation


@dataclass
class Paged(Method):
    """Block-wise eviction aligned to `page_size`-token pages, so a paged allocator frees
    whole pages. A token's importance is ||V|| / ||K|| (tokens with small keys and large
    values matter most), averaged over its page by the shared selector."""

    name = "paged"
    shared_keep_set: bool = True
    page_size: int = 16

    def score(self, obs: Observation) -> torch.Tensor:
        return value_key_ratio(obs)


def value_key_ratio(obs: Observation) -> torch.Tensor:
    """||V|| / ||K|| of every cached token, [B, Hkv, T]."""
    return obs.values.float().norm(dim=-1) / obs.keys.float().norm(dim=-1).clamp_min(1e-6)
