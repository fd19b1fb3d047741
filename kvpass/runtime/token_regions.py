"""What the vision encoder says about each image token, recorded while it encodes the images.

Patch pruning needs, per image token: the raw pixels of its image region (`similarity`,
`source="pixels"`), and the attention its patches receive at the encoder's scoring layer
(`dominant`). How patches map to tokens differs between models (one patch per token, a 2x2
merger of consecutive patches, a pixel shuffle over spatial blocks, a dropped [CLS] row), so the
map is read off the computation itself, during the real encoding (wherever it runs: inside the
model's forward, or before it, as `generate` encodes images ahead of the prefill):

    pixels --(patch embedding: token-wise)--> rows at `pixel_site` ... `scoring_site` --(token-wise
    and regrouping only: nothing mixes tokens after the last attention)--> feature rows (image tokens)

On each token-wise stretch, a scalar s_t = F_t . w per output row t (random w) is back-propagated
twice, once weighted by t+1 and once by 1: for every input element x the two gradients are
(t+1) c(x) and c(x), so their ratio names the one output row x feeds. Elements feeding none (zero
gradient) or several (a non-integer ratio) map to -1. Two short backward passes per stretch
(another two, for another w, when some element's gradient happens to cancel).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch

from kvpass.anchors import VisionBoundary
from kvpass.errors import UnsupportedModelError
from kvpass.runtime.attention_recorder import AttentionRows, record_during
from kvpass.runtime.call_arguments import bind_call, call_with

NOISE = 1e-6
"""Gradients below this fraction of the largest are taken as zero."""
PROJECTIONS = 3
"""Random projections tried, at most, to resolve every element."""


@dataclass
class Encoding:
    """One run of the vision encoder over a batch of images, as patch pruning needs it."""

    pixels: torch.Tensor | None = None
    """The pixel input as the encoder received it (kept when pixels are compared)."""
    pixel_row: torch.Tensor | None = None
    """long, the pixels' shape: the row at `pixel_site` each pixel value feeds, -1 none."""
    attention: AttentionRows | None = None
    """Attention at `scoring_site` (one [batch, keys] tensor per attention call)."""
    row_token: torch.Tensor | None = None
    """long [rows at `scoring_site`, leading axes flattened]: the image token each row feeds, -1 none."""
    tokens: int = 0
    """Feature rows (image tokens) produced."""
    graph: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)
    """Keeps autograd on (and inference mode off) while a token-wise stretch is traced."""
    leaf: torch.Tensor | None = None

    def pixel_token(self) -> torch.Tensor:
        """long, the pixels' shape: the image token each pixel value feeds, -1 none."""
        if self.pixel_row is None or self.row_token is None:
            raise UnsupportedModelError("the vision encoder's pixels were not traced to its image tokens")
        inside = self.pixel_row >= 0
        token = torch.full_like(self.pixel_row, -1)
        token[inside] = self.row_token.to(self.pixel_row.device)[self.pixel_row[inside]]
        return token


LAST_ENCODING: ContextVar[Encoding | None] = ContextVar("kvpass_last_encoding", default=None)
"""The latest encoding in this thread, until the language model's call that uses its tokens."""


class TokenRegions:
    """Hooks on the vision path that fill an `Encoding` for every run of the encoder.

    `pixels`: trace pixels to rows (for comparing pixels); `attention`: record the scoring layer's
    attention ('first' for a [CLS] row, 'all' for the mean over queries; None: do not); the rows
    at the scoring layer are always traced to image tokens."""

    def __init__(self, model: torch.nn.Module, boundary: VisionBoundary, pixels: bool, attention: str | None):
        self.model, self.boundary, self.pixels, self.attention = model, boundary, pixels, attention

    def install(self) -> Callable[[], None]:
        module = self.model.get_submodule
        encoder, scoring = module(self.boundary.vision_encoder), module(self.boundary.scoring_site)
        hooks = [encoder.register_forward_pre_hook(self._start, with_kwargs=True),
                 scoring.register_forward_hook(self._trace_scoring_rows),
                 module(self.boundary.feature_module).register_forward_hook(self._finish, always_call=True)]
        if self.pixels:
            hooks.append(module(self.boundary.pixel_site).register_forward_pre_hook(self._trace_pixels,
                                                                                   with_kwargs=True))
        undos = [hook.remove for hook in hooks]
        if self.attention is not None:
            undos.append(record_during(scoring, self._start_attention, self._finish_attention))
        return lambda: [undo() for undo in reversed(undos)]

    def _start(self, module, args, kwargs):
        previous = LAST_ENCODING.get()
        if previous is not None:
            previous.graph.close()
        encoding = Encoding()
        LAST_ENCODING.set(encoding)
        if torch.is_inference_mode_enabled():
            raise UnsupportedModelError("PrunePatches traces image tokens with gradients through the vision encoder: "
                                        "run the model under torch.no_grad(), not torch.inference_mode()")
        if not self.pixels:
            return None
        arguments = bind_call(module, args, kwargs)
        name = next((n for n, v in arguments.items() if isinstance(v, torch.Tensor) and v.is_floating_point()), None)
        if name is None:
            raise UnsupportedModelError(f"{self.boundary.vision_encoder} was called without a floating-point "
                                        "(pixel) tensor")
        encoding.pixels = arguments[name].detach()
        encoding.graph.enter_context(torch.enable_grad())
        encoding.leaf = encoding.pixels.clone().requires_grad_(True)
        arguments[name] = encoding.leaf
        return call_with(module, arguments)

    def _trace_pixels(self, module, args, kwargs):
        encoding = LAST_ENCODING.get()
        if encoding is None or encoding.leaf is None:
            return None
        arguments = bind_call(module, args, kwargs)
        name, rows = next((n, v) for n, v in arguments.items() if isinstance(v, torch.Tensor))
        encoding.pixel_row = _feeds(rows.reshape(-1, rows.shape[-1]), encoding.leaf, per_row=False)
        encoding.graph.close()
        encoding.leaf = None
        arguments[name] = rows.detach()
        return call_with(module, arguments)

    def _trace_scoring_rows(self, module, args, output):
        encoding = LAST_ENCODING.get()
        if encoding is None:
            return None
        rows = output[0] if isinstance(output, (tuple, list)) else output
        encoding.graph.enter_context(torch.enable_grad())
        encoding.leaf = rows.detach().clone().requires_grad_(True)
        return (encoding.leaf, *output[1:]) if isinstance(output, (tuple, list)) else encoding.leaf

    def _finish(self, module, args, output):
        encoding = LAST_ENCODING.get()
        if encoding is None or encoding.leaf is None:
            return None
        try:
            if output is None:  # the call failed: only the graph is left to close
                return None
            if not isinstance(output, torch.Tensor):
                raise UnsupportedModelError(f"{self.boundary.feature_module} returns {type(output).__name__}, not the "
                                            "feature rows as one tensor")
            features = output.reshape(-1, output.shape[-1])
            encoding.row_token = _feeds(features, encoding.leaf, per_row=True)
            encoding.tokens = features.shape[0]
        finally:
            encoding.graph.close()
            encoding.leaf = None
        return output.detach()

    def _start_attention(self) -> AttentionRows | None:
        return AttentionRows(self.attention, with_keys=True) if LAST_ENCODING.get() is not None else None

    def _finish_attention(self, recorder: AttentionRows) -> None:
        encoding = LAST_ENCODING.get()
        if encoding is not None:
            encoding.attention = recorder


def _feeds(outputs: torch.Tensor, source: torch.Tensor, per_row: bool) -> torch.Tensor:
    """The row of `outputs` [n, d] that each element of `source` feeds (`per_row`: each row of `source`,
    leading axes flattened, by its strongest element); -1 for none or several (module docstring).

    An element whose gradient is tiny for one random projection (its weights happen to cancel) is
    retried with another, so a token is not left a pixel short."""
    found = None
    for seed in range(PROJECTIONS):
        row, unresolved = _feeds_along(outputs, source, per_row, seed, last=seed == PROJECTIONS - 1)
        found = row if found is None else torch.where(found < 0, row, found)
        if not bool((unresolved & (found < 0)).any()):
            break
    return found


def _feeds_along(outputs: torch.Tensor, source: torch.Tensor, per_row: bool, seed: int,
                 last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """`_feeds` for one random projection: (rows, elements that feed something but were not resolved)."""
    weights = torch.randn(outputs.shape[-1], generator=torch.Generator().manual_seed(seed)).to(outputs.device)
    scores = outputs.float() @ weights
    order = torch.arange(1, scores.shape[0] + 1, dtype=scores.dtype, device=scores.device)
    weighted, = torch.autograd.grad((scores * order).sum(), source, retain_graph=True, allow_unused=True)
    plain, = torch.autograd.grad(scores.sum(), source, retain_graph=not last, allow_unused=True)
    if plain is None:
        shape = (source.shape[:-1].numel(),) if per_row else source.shape
        none = torch.full(shape, -1, dtype=torch.long, device=source.device)
        return none, torch.zeros(shape, dtype=torch.bool, device=source.device)
    largest = plain.abs().max()
    if per_row:
        plain, weighted = plain.reshape(-1, plain.shape[-1]), weighted.reshape(-1, plain.shape[-1])
        strongest = plain.abs().argmax(dim=-1, keepdim=True)
        plain, weighted = plain.gather(-1, strongest).squeeze(-1), weighted.gather(-1, strongest).squeeze(-1)
    ratio = weighted.double() / torch.where(plain != 0, plain.double(), torch.ones_like(plain, dtype=torch.double))
    row = ratio.round()
    valid = (plain.abs() > NOISE * largest) & ((ratio - row).abs() < 0.05) & (row >= 1) & (row <= scores.shape[0])
    return torch.where(valid, row.long() - 1, torch.full_like(row, -1, dtype=torch.long)), (plain != 0) & ~valid
