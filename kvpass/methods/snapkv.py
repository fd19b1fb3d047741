"""SnapKV: attention from an observation window at the end of the prompt, pooled (Li et al., 2024)."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvpass.methods.base import Method, Observation, Stat
from kvpass.validation import integer


@dataclass
class SnapKV(Method):
    """Scores keys by the attention the last `window` prompt queries give them, max-pooled
    over `kernel` neighbouring tokens so that clusters survive together."""

    name = "snapkv"
    stat = Stat.WINDOW
    window: int = 32
    kernel: int = 7
    """Pooling width in tokens, odd: a window centred on each token."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.kernel = integer(self.kernel, "SnapKV: kernel", minimum=1, meaning="pooling width in tokens")
        if self.kernel % 2 == 0:
            raise ValueError(f"SnapKV: kernel must be odd (a pooling window centred on each token), got {self.kernel}")

    def score(self, obs: Observation) -> torch.Tensor:
        batch, heads, tokens = obs.stat.shape
        pooled = F.avg_pool1d(
            obs.stat.reshape(batch * heads, 1, tokens), self.kernel, stride=1, padding=self.kernel // 2,
            count_include_pad=False,
        )
        return pooled.reshape(batch, heads, tokens)
