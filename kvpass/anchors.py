"""Typed anchors: the places around an attention site that transforms act on.

Eviction only needs the attention itself. Other kinds of pruning act elsewhere: head
pruning slices the Q/K/V/O projection weights, so discovery records, for every site, which
parameter of the model each projection reads and which of its features belong to this
attention (fused QKV weights share one parameter). Anchors name modules and parameters,
never graph nodes, so they survive `Plan.save`/`load` and mean the same in any capture.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Projection:
    """The features of one weight parameter that a projection role uses.

    `axis` is the weight axis those features run along: for Q/K/V the output features
    (0 for `nn.Linear`, 1 for GPT-2's `Conv1D`), for O the input features (1 for `nn.Linear`,
    0 for `Conv1D`). `start:stop` is this role's range on that axis; a fused QKV weight gives
    Q, K and V three ranges of one parameter.

    Example:
        >>> Projection("layers.0.attn.qkv", "weight", "bias", axis=0, start=64, stop=96).size
        32
    """

    module: str
    weight: str
    bias: str | None
    axis: int
    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start

    def parameter(self, model: torch.nn.Module, name: str | None = None) -> torch.nn.Parameter:
        """The weight (or the parameter `name`, e.g. the bias) on `model`."""
        return getattr(model.get_submodule(self.module), name or self.weight)

    def zero(self, model: torch.nn.Module, features: Sequence[int]) -> Callable[[], None]:
        """Zero `features` (offsets into this role's range) of the weight along `axis`, in place;
        returns the restore. Zeroing an O projection's input columns removes those heads' output
        exactly: the oracle of head removal, and how calibration measures what a head is worth."""
        weight = self.parameter(model)
        index = torch.tensor([self.start + feature for feature in features], device=weight.device)
        saved = weight.detach().index_select(self.axis, index).clone()
        with torch.no_grad():
            weight.index_fill_(self.axis, index, 0.0)

        def restore() -> None:
            with torch.no_grad():
                weight.index_copy_(self.axis, index, saved)

        return restore

    def to_dict(self) -> dict[str, Any]:
        return {"module": self.module, "weight": self.weight, "bias": self.bias, "axis": self.axis,
                "start": self.start, "stop": self.stop}


@dataclass(frozen=True)
class Projections:
    """The four projections of one attention: what head pruning slices.

    Example:
        >>> linear = lambda name, axis, size: Projection(name, "weight", None, axis, 0, size)
        >>> p = Projections(linear("q", 0, 64), linear("k", 0, 32), linear("v", 0, 32), linear("o", 1, 64))
        >>> p.fused
        False
    """

    q: Projection
    k: Projection
    v: Projection
    o: Projection

    @property
    def fused(self) -> bool:
        """True when Q, K and V (or two of them) share one weight parameter."""
        return len({(p.module, p.weight) for p in (self.q, self.k, self.v)}) < 3

    def to_dict(self) -> dict[str, Any]:
        return {role: getattr(self, role).to_dict() for role in ("q", "k", "v", "o")}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Projections":
        return cls(**{role: Projection(**data[role]) for role in ("q", "k", "v", "o")})


@dataclass(frozen=True)
class VisionBoundary:
    """Where a vision-language model's image features become language-model inputs: the op
    that writes the projected features into the token embeddings at the image tokens' positions.

    Patch pruning acts here: it drops image tokens from the sequence the language model
    receives (or, for FastV, from the sequence that reaches `language_layers[K]`), ranking them
    with the vision encoder's attention at `scoring_site`. Found by
    `kvpass.rewrites.vision_boundary`; every field is a module path, an input name or a number.

    Example:
        >>> b = VisionBoundary("model", "model.language_model", ("model.language_model.layers.0",),
        ...                    "model.language_model.embed_tokens", "model.vision_tower",
        ...                    "model.vision_tower.layers.0.attn", "model.vision_tower.layers.1.attn",
        ...                    "model.projector.linear_2", 1, "input_ids", (32000,), "masked_scatter")
        >>> b.image_token_ids
        (32000,)
    """

    owner: str
    """The module whose forward writes the features into the embeddings (it receives the token ids)."""
    language_model: str
    """The module that receives the merged embeddings (`inputs_embeds`)."""
    language_layers: tuple[str, ...]
    """The language model's decoder layers, one per attention site, in order."""
    embedding: str
    """The token embedding the features overwrite (rows still equal to it received no features)."""
    vision_encoder: str
    pixel_site: str
    """The vision encoder's first attention on the way to the features (its input rows are the patches)."""
    scoring_site: str
    """The vision encoder's last attention before the features: its attention ranks the patches, and
    nothing after it mixes tokens."""
    feature_module: str
    """The module whose output rows are the features written, one per image token, in order."""
    class_tokens: int
    """Learned tokens the vision encoder puts before each image's patches (a [CLS]); 0 if none."""
    token_input: str
    """The owner's input holding the token ids."""
    image_token_ids: tuple[int, ...]
    """Token ids whose positions receive the features."""
    op: str
    """The writing op: 'masked_scatter' or 'index_put'."""
    encoder_sites: tuple[str, ...] = ()
    """The vision encoder's attention sites (no KV cache: never planned, never evicted)."""
