"""StreamingLLM: attention sinks plus the most recent tokens (Xiao et al., 2023)."""

from dataclasses import dataclass

import torch

from kvpass.methods.base import Method, Observation


@dataclass
class StreamingLLM(Method):
    """Keeps the sink tokens and a recent window; everything in between is evicted.

    Scores are recency (the slot itself), so the shared selector's carve-out for sinks
    plus top-k by score yields exactly "sinks + latest tokens".
    """

    name = "streaming_llm"
    shared_keep_set: bool = True

    def score(self, obs: Observation) -> torch.Tensor:
        return obs.slots.float()
