"""The Method contract: turn attention statistics into per-token importance scores.

A method never sees FX, ONNX or Triton. It declares which statistic it needs from the
attention kernel (`stat`), and maps an `Observation` of the cache to a score per cached
token; higher means keep. Selection (sinks, recent window, top-k, compaction) is shared
and lives in `kvpass.methods.selection`.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import ClassVar

import torch

from kvpass.validation import boolean, integer


class Stat(str, Enum):
    """The attention statistic a method needs, accumulated per KV head and cached token.

    Each is computed by the attention kernel itself, summed over the query group (GQA),
    without materialising the whole L x L matrix at once.
    """

    NONE = "none"
    COLUMN_SUM = "column_sum"
    """Attention every key received from every query so far (H2O)."""
    WINDOW = "window"
    """Attention from the last `window` queries of the prefill, then from each decoded query (SnapKV)."""
    LAST_QUERY = "last_query"
    """Attention from the most recent query only (TOVA)."""

    @property
    def carried(self) -> bool:
        """Whether the statistic sums over every step so far, so it is state a cache must carry."""
        return self in (Stat.COLUMN_SUM, Stat.WINDOW)

    def combine(self, old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        """Fold a decode step's statistic into the running one."""
        return new if self is Stat.LAST_QUERY else old + new


@dataclass
class Observation:
    """What a method may look at to score the cached tokens of one layer.

    Shapes: keys/values [B, Hkv, T, D]; slots, stat [B, Hkv, T]. `slots` are logical token
    positions in the sequence (negative for padding); `seen` is the number of tokens the
    sequence has had so far, so `seen - slot` is how many queries could see a token.
    """

    keys: torch.Tensor
    values: torch.Tensor
    slots: torch.Tensor
    stat: torch.Tensor | None
    seen: int
    group_size: int


@dataclass
class Method:
    """Base of every pruning method: a small dataclass with a `score` function.

    Example:
        >>> from kvpass.methods import get_method
        >>> get_method("tova").stat
        <Stat.LAST_QUERY: 'last_query'>
    """

    name: ClassVar[str] = ""
    stat: ClassVar[Stat] = Stat.NONE
    shared_keep_set: bool = False
    """One keep set for the whole layer (scores averaged over its KV heads) instead of each KV head
    ranking its own tokens. Every head still keeps as many tokens: how many each head keeps is the
    budget's business (`kvpass.Evict(per_head=True)` gives heads different numbers)."""
    window: int = 0
    """Observation window for Stat.WINDOW methods (queries at the end of the prefill)."""
    page_size: int = 1
    """Eviction granularity in tokens: >1 evicts whole pages of a paged allocator."""
    span: int = 0
    """Max-pool scores over `span` tokens either side, so a kept token keeps its neighbours:
    numbers, names and keys are split over several tokens and are useless when half kept."""

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if "per_head" in cls.__dict__.get("__annotations__", {}):
            raise TypeError(f"{cls.__name__}: the Method field per_head was renamed shared_keep_set (its inverse: "
                            "per_head=False is shared_keep_set=True)")

    def __post_init__(self) -> None:
        """Check every option when the method is made, naming it (`span='2'` fails here, not in a kernel)."""
        owner = type(self).__name__
        self.shared_keep_set = boolean(self.shared_keep_set, f"{owner}: shared_keep_set")
        needs_window = self.stat is Stat.WINDOW
        self.window = integer(self.window, f"{owner}: window", minimum=1 if needs_window else 0,
                              meaning="queries observed at the end of the prompt")
        self.page_size = integer(self.page_size, f"{owner}: page_size", minimum=1, meaning="tokens per evicted page")
        self.span = integer(self.span, f"{owner}: span", minimum=0,
                            meaning="neighbours kept either side of a kept token")

    def score(self, obs: Observation) -> torch.Tensor:
        """Importance of each cached token, [B, Hkv, T]; higher is kept first."""
        raise NotImplementedError(f"{type(self).__name__} must implement score()")
