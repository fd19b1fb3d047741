"""Random eviction: the floor every method must beat."""

from dataclasses import dataclass

import torch

from kvpass.methods.base import Method, Observation
from kvpass.validation import integer

_WORD = 0xFFFFFFFF
_MULTIPLIER = 0x45D9F3B
_RESOLUTION = 1 << 24
"""Scores take 2^24 values: exact in float32, so no two hashes round to one score."""


@dataclass
class Random(Method):
    """Uniformly spread scores from a seeded hash of (seed, seen, batch row, KV head, slot), so runs
    are reproducible, on any device, and the same function exported to ONNX ranks the same way.

    Example:
        >>> from kvpass.methods.base import Observation
        >>> slots = torch.arange(6, dtype=torch.int32).expand(1, 2, 6)
        >>> scores = Random(seed=1).score(Observation(None, None, slots, None, seen=6, group_size=1))
        >>> scores.shape, bool(((0 <= scores) & (scores < 1)).all()), bool((scores[0, 0] != scores[0, 1]).any())
        (torch.Size([1, 2, 6]), True, True)
    """

    name = "random"
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        self.seed = integer(self.seed, "Random: seed")

    def score(self, obs: Observation) -> torch.Tensor:
        slots = obs.slots.long()
        batch, heads, _ = slots.shape
        rows = torch.arange(batch, device=slots.device).view(-1, 1, 1)
        kv_heads = torch.arange(heads, device=slots.device).view(1, -1, 1)
        state = _hash(torch.as_tensor(obs.seen, device=slots.device).long() ^ (self.seed & _WORD))
        for part in (rows, kv_heads, slots):
            state = _hash(state ^ (part & _WORD))
        return (state % _RESOLUTION).float() / _RESOLUTION


def _hash(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mixer (xor-shift, multiply) in int64 arithmetic that never overflows and exports
    to ONNX (shifts written as divisions of non-negative values)."""
    x = x & _WORD
    for _ in range(2):
        x = ((x ^ (x // 65536)) * _MULTIPLIER) & _WORD
    return x ^ (x // 65536)
