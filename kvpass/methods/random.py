"""Random eviction: the floor every method must beat."""

from dataclasses import dataclass

import torch

from kvpass.methods.base import Method, Observation
from kvpass.validation import integer


@dataclass
class Random(Method):
    """Uniformly random scores from a seeded generator, so runs are reproducible."""

    name = "random"
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        self.seed = integer(self.seed, "Random: seed")

    def score(self, obs: Observation) -> torch.Tensor:
        generator = torch.Generator(device="cpu").manual_seed(self.seed + obs.seen)
        return torch.rand(obs.slots.shape, generator=generator).to(obs.slots.device)
