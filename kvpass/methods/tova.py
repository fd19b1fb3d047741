"""TOVA: keep what the newest query attends to (Oren et al., 2024)."""

from dataclasses import dataclass

import torch

from kvpass.methods.base import Method, Observation, Stat


@dataclass
class TOVA(Method):
    """Scores each token by the attention of the most recent query, averaged over heads
    (one keep set per layer, as in the paper)."""

    name = "tova"
    stat = Stat.LAST_QUERY
    shared_keep_set: bool = True

    def score(self, obs: Observation) -> torch.Tensor:
        return obs.stat
