"""H2O: heavy hitters by accumulated attention (Zhang et al., 2023)."""

from dataclasses import dataclass

import torch

from kvpass.methods.base import Method, Observation, Stat


@dataclass
class H2O(Method):
    """Keeps the tokens that received the most attention, summed over every query so far."""

    name = "h2o"
    stat = Stat.COLUMN_SUM

    def score(self, obs: Observation) -> torch.Tensor:
        return obs.stat
