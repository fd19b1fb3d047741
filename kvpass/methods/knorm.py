"""Key-norm: low-norm keys draw the most attention (Devoto et al., 2024)."""

from dataclasses import dataclass

import torch

from kvpass.methods.base import Method, Observation


@dataclass
class KNorm(Method):
    """Keeps the tokens whose keys have the smallest L2 norm; needs no attention statistic."""

    name = "knorm"

    def score(self, obs: Observation) -> torch.Tensor:
        return -obs.keys.float().norm(dim=-1)
