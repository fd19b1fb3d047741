"""Patch pruning at run time: hooks that drop image tokens before, or inside, the language model.

Installed by `kvpass.PrunePatches` on the modules its `VisionBoundary` anchor names:

* the boundary's *owner* (the module that writes image features into the token embeddings) notes
  each call's token ids (`PatchCall`), so the language model's hook knows the image tokens: an
  image-token id whose row of `inputs_embeds` is no longer its embedding received features;
* `similarity` / `dominant`: the *language model*'s pre-hook picks the image tokens that stay and
  gathers them (with the text) out of `inputs_embeds`, the position ids and the 2-D attention mask,
  then tells the cache where the remaining tokens sit (`TokenPositions`): they keep their original
  positions (1-D, or the (t, h, w) M-RoPE ids the model computed) and the cache keeps the logical
  length the unmodified model would have. What the vision encoder says about each token (pixels,
  attention) comes from `kvpass.runtime.token_regions`, recorded while it encoded the images;
* `fastv`: the attention of the last token at layer K-1 is recorded, and decoder layers K..L-1
  receive only the kept tokens (hidden states, position embeddings, masks); layers before K keep
  every token.

The language model's attention runs on kvpass's compacted cache (`kvpass.runtime.hf`), which
places every token by its logical slot: removed tokens are simply absent, in the cache and in the
arithmetic. Rows of a batch that keep different numbers of tokens are left-padded to the longest
(the padding is masked, and counted in the cache's bytes).
"""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar, Token
from dataclasses import dataclass, field
from typing import Any

import torch

from kvpass.anchors import VisionBoundary
from kvpass.errors import UnsupportedModelError
from kvpass.runtime.attention_recorder import AttentionRows, record_during
from kvpass.runtime.call_arguments import bind_call, cache_keyword, call_with, given_cache, output_cache
from kvpass.runtime.compacted_cache import TokenPositions
from kvpass.runtime.hf import POSITIONS_ATTRIBUTE
from kvpass.runtime.patch_selection import Selection, contextual_groups, representatives, token_budget, top_scores
from kvpass.runtime.token_regions import LAST_ENCODING, Encoding, TokenRegions

RECORD_ATTRIBUTE = "_kvpass_patches"
"""Where a cache keeps the `PatchRecord` of the calls that used it."""
ADDED_PADDING_SLOT = 2**30
"""Offset given to padding added between rows that keep different counts: beyond any real position."""


@dataclass(frozen=True)
class PatchOptions:
    """What the runtime needs of a `kvpass.PrunePatches` transform."""

    keep: float | int
    method: str
    source: str
    threshold: float
    merge: bool
    contextual: float
    layer: int


@dataclass
class PatchRecord:
    """What patch pruning did over the calls one cache served (per sequence; image tokens over all rows)."""

    image_tokens_in: int = 0
    image_tokens_out: int = 0
    sequence_length: int = 0
    """Tokens the unmodified model would have processed (per row, padding included)."""
    language_model_length: int = 0
    """Tokens that reached the language model (FastV: that reached layer K), per row, padding included."""
    kept_image_positions: list[list[int]] = field(default_factory=list)
    """Per row, the sequence positions of the image tokens kept by the last call that had images."""


@dataclass
class _Cut:
    """How one call's sequence was shortened: `index` [B, L'] positions in the call (-1: padding added)."""

    index: torch.Tensor
    span: int
    features: torch.Tensor
    """[B, L', H]: the rows that go on (merged tokens averaged)."""

    @property
    def added_padding(self) -> torch.Tensor:
        return self.index < 0

    @property
    def removes_nothing(self) -> bool:
        return self.index.shape[1] == self.span and not bool(self.added_padding.any())


@dataclass
class PatchCall:
    """One call of the boundary's owner, as the hooks it runs through share it."""

    token_ids: torch.Tensor | None
    image_mask: torch.Tensor | None = None
    """[B, L] True at the image tokens that received features (set by the language model's hook)."""
    encoding: Encoding | None = None
    last_token: torch.Tensor | None = None
    cut: _Cut | None = None
    cache: Any = None
    length: int = 0
    """Tokens of the call as the unmodified language model sees them."""
    token: Token | None = None


CALL: ContextVar[PatchCall | None] = ContextVar("kvpass_patch_call", default=None)
"""The owner call in progress in this thread."""


class PatchPruning:
    """The hooks of one `PrunePatches` transform on one model; `install()` returns the undo."""

    def __init__(self, model: torch.nn.Module, boundary: VisionBoundary, options: PatchOptions,
                 attention_sites: list[str]):
        self.model, self.boundary, self.options = model, boundary, options
        self.attention_sites = attention_sites

    def module(self, path: str) -> torch.nn.Module:
        return self.model.get_submodule(path)

    def install(self) -> Callable[[], None]:
        owner, language_model = self.module(self.boundary.owner), self.module(self.boundary.language_model)
        handles = [owner.register_forward_pre_hook(self._open_call, with_kwargs=True),
                   owner.register_forward_hook(self._close_call, always_call=True),
                   language_model.register_forward_pre_hook(self._enter_language_model, with_kwargs=True),
                   language_model.register_forward_hook(self._leave_language_model, always_call=True)]
        undos = [handle.remove for handle in handles]
        method = self.options.method
        if method == "dominant" or (method == "similarity" and self.options.source == "pixels"):
            regions = TokenRegions(self.model, self.boundary, pixels=method == "similarity",
                                   attention=("first" if self.boundary.class_tokens else "all")
                                   if method == "dominant" else None)
            undos.append(regions.install())
        if method == "fastv":
            undos.append(record_during(self.module(self.attention_sites[self.options.layer - 1]),
                                       self._start_last_token_record, self._finish_last_token_record))
            for layer in self.boundary.language_layers[self.options.layer:]:
                undos.append(self.module(layer).register_forward_pre_hook(self._enter_pruned_layer,
                                                                          with_kwargs=True).remove)
        return lambda: [undo() for undo in reversed(undos)]

    # ------------------------------------------------------------------ the owner's call

    def _open_call(self, module, args, kwargs):
        call = PatchCall(bind_call(module, args, kwargs).get(self.boundary.token_input))
        call.token = CALL.set(call)

    def _close_call(self, module, args, output):
        call = CALL.get()
        if call is not None and call.token is not None:
            CALL.reset(call.token)

    # ------------------------------------------------------------------ the language model's call

    def _enter_language_model(self, module, args, kwargs):
        call = CALL.get()
        if call is None or call.length:  # called outside the owner, or a second time in one owner call
            return None
        arguments = bind_call(module, args, kwargs)
        embeddings = arguments.get("inputs_embeds")
        if embeddings is None:
            return None
        call.length, call.cache = embeddings.shape[1], given_cache(arguments)
        if call.token_ids is not None:  # image tokens are known by their ids only
            call.image_mask = self._image_rows(call.token_ids, embeddings)
        if call.image_mask is None:
            return None
        if call.cache is None:  # the kept tokens' positions travel on the call's cache
            from transformers import DynamicCache

            call.cache = DynamicCache(config=getattr(module, "config", None))
            arguments[cache_keyword(module, arguments)] = call.cache
        if self.options.method == "fastv":
            return call_with(module, arguments)
        call.encoding = self._encoding(call)
        positions = arguments.get("position_ids")
        if positions is None:
            past = call.cache.get_seq_length()
            positions = torch.arange(past, past + embeddings.shape[1], device=embeddings.device)[None]
        cut = call.cut = self._cut(call, embeddings, self._choose(call, embeddings))
        if not cut.removes_nothing:
            arguments["inputs_embeds"] = cut.features
            arguments["position_ids"] = _gather_tokens(positions, cut.index, axis=-1)
            arguments["attention_mask"] = _cut_padding_mask(arguments.get("attention_mask"), cut)
            setattr(call.cache, POSITIONS_ATTRIBUTE, _positions(cut, arguments["attention_mask"]))
        return call_with(module, arguments)

    def _image_rows(self, ids: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor | None:
        """[B, L] image tokens that received features: an image-token id whose row is not its embedding
        (a generated image-token id, or one in a text-only call, received none)."""
        if ids.shape != embeddings.shape[:2]:
            return None
        candidates = torch.isin(ids, torch.tensor(self.boundary.image_token_ids, device=ids.device))
        if not bool(candidates.any()):
            return None
        plain = self.module(self.boundary.embedding)(ids[candidates]).to(embeddings.dtype)
        written = candidates.clone()
        written[candidates] = (embeddings[candidates] != plain).any(dim=-1)
        return written if bool(written.any()) else None

    def _encoding(self, call: PatchCall) -> Encoding | None:
        """The vision encoder's record of the images this call's features came from (if the method needs it)."""
        if self.options.method == "fastv" or (self.options.method == "similarity" and self.options.source == "features"):
            return None
        encoding = LAST_ENCODING.get()
        LAST_ENCODING.set(None)
        count = int(call.image_mask.sum())
        if encoding is None or encoding.row_token is None or encoding.tokens != count:
            raise UnsupportedModelError(
                f"PrunePatches(method={self.options.method!r}) reads the vision encoder's record of the images, but "
                f"{'none was made' if encoding is None or encoding.row_token is None else f'it has {encoding.tokens} tokens'}"
                f" for the {count} image tokens of this call (were the features computed outside "
                f"{self.boundary.vision_encoder} and {self.boundary.feature_module}?)")
        return encoding

    def _leave_language_model(self, module, args, output):
        call = CALL.get()
        cache = call.cache if call is not None and call.cache is not None else output_cache(output)
        if call is None or cache is None:
            return
        if hasattr(cache, POSITIONS_ATTRIBUTE):
            delattr(cache, POSITIONS_ATTRIBUTE)
        record = getattr(cache, RECORD_ATTRIBUTE, None) or PatchRecord()
        record.sequence_length += call.length
        record.language_model_length += call.cut.index.shape[1] if call.cut is not None else call.length
        if call.image_mask is not None:
            kept = self._kept_positions(call, cache.get_seq_length() - call.length)
            record.image_tokens_in += int(call.image_mask.sum())
            record.image_tokens_out += sum(map(len, kept))
            record.kept_image_positions = kept
        setattr(cache, RECORD_ATTRIBUTE, record)

    def _kept_positions(self, call: PatchCall, past: int) -> list[list[int]]:
        if call.cut is None:  # nothing was cut: every image token stayed
            return [(torch.nonzero(row).flatten() + past).tolist() for row in call.image_mask]
        kept = []
        for row, index in zip(call.image_mask, call.cut.index):
            index = index[index >= 0]
            kept.append((index[row[index]] + past).tolist())
        return kept

    # ------------------------------------------------------------------ choosing the kept tokens

    def _choose(self, call: PatchCall, embeddings: torch.Tensor) -> list[list[tuple[torch.Tensor, Selection]]]:
        """Per row, per image (a run of consecutive image tokens): its positions and what stays."""
        per_token = self._per_token(call, embeddings)
        choices, first = [], 0
        for row in call.image_mask:
            runs = _runs(row)
            selections = []
            for run, count in zip(runs, token_budget([len(run) for run in runs], self.options.keep)):
                tokens = slice(first, first + len(run))
                first += len(run)
                selections.append((run, self._select(per_token, tokens, count)))
            choices.append(selections)
        return choices

    def _select(self, per_token: dict[str, torch.Tensor], tokens: slice, count: int) -> Selection:
        size = tokens.stop - tokens.start
        if self.options.method == "similarity":
            chosen = representatives(per_token["vectors"][tokens], count, self.options.threshold)
            return chosen if self.options.merge else Selection(chosen.kept)
        if self.options.method == "dominant":
            contextual = min(round(self.options.contextual * count), count - 1) if count < size else 0
            return contextual_groups(per_token["scores"][tokens], per_token["keys"][tokens], count, contextual)
        return top_scores(per_token["scores"][tokens], count)

    def _per_token(self, call: PatchCall, embeddings: torch.Tensor) -> dict[str, torch.Tensor]:
        """What the method compares or ranks, one row per image token of the call (row-major)."""
        mask = call.image_mask.to(embeddings.device)
        if self.options.method == "fastv":
            own = call.last_token[:, -call.image_mask.shape[1]:]  # the attention paid to this call's tokens
            return {"scores": own[mask.to(own.device)]}
        if self.options.method == "similarity" and self.options.source == "features":
            return {"vectors": embeddings[mask]}
        encoding, count = call.encoding, int(mask.sum())
        if self.options.method == "similarity":
            return {"vectors": _values_per_token(encoding.pixels, encoding.pixel_token(), count)}
        attention = encoding.attention
        if attention is None or not attention.rows:
            raise UnsupportedModelError(f"PrunePatches(method='dominant'): no attention was seen at "
                                        f"{self.boundary.scoring_site} while the images were encoded")
        scores = torch.cat([rows.flatten() for rows in attention.rows])
        token = encoding.row_token.to(scores.device)
        if scores.numel() != token.numel():
            raise UnsupportedModelError(
                f"PrunePatches(method='dominant'): the attention at {self.boundary.scoring_site} covers "
                f"{scores.numel()} keys, but {token.numel()} rows reach it")
        inside = token >= 0
        per_token = {"scores": scores.new_zeros(count).index_add(0, token[inside], scores[inside])}
        if attention.keys:  # VisionZip merges by key similarity
            keys = torch.cat([k.reshape(-1, k.shape[-1]) for k in attention.keys])
            per_token["keys"] = keys.new_zeros(count, keys.shape[-1]).index_add(0, token[inside], keys[inside])
        else:  # an explicit-softmax attention shows no keys: the features stand in
            per_token["keys"] = embeddings[mask]
        return per_token

    # ------------------------------------------------------------------ cutting the sequence

    def _cut(self, call: PatchCall, embeddings: torch.Tensor, choices) -> _Cut:
        """The kept positions of every row (text and kept image tokens), left-padded to one length,
        and the rows that go on (merged tokens averaged)."""
        rows, features = [], embeddings.clone()
        for b, (image_row, selections) in enumerate(zip(call.image_mask.to(embeddings.device), choices)):
            dropped = torch.zeros_like(image_row)
            for run, selection in selections:
                run = run.to(embeddings.device)
                dropped[run] = True
                dropped[run[selection.kept]] = False
                for kept, members in zip(run[selection.kept], selection.members or []):
                    features[b, kept] = embeddings[b, run[members]].mean(dim=0)
            rows.append(torch.nonzero(~dropped).flatten())
        length = max(len(row) for row in rows)
        index = torch.stack([torch.cat([row.new_full((length - len(row),), -1), row]) for row in rows])
        return _Cut(index, embeddings.shape[1], _gather_tokens(features, index, axis=-2))

    # ------------------------------------------------------------------ FastV

    def _start_last_token_record(self) -> AttentionRows | None:
        call = CALL.get()
        wanted = call is not None and call.image_mask is not None and call.cut is None
        return AttentionRows("last") if wanted else None

    def _finish_last_token_record(self, recorder: AttentionRows) -> None:
        call = CALL.get()
        if call is not None and recorder.rows:
            call.last_token = recorder.rows[-1]

    def _enter_pruned_layer(self, module, args, kwargs):
        call = CALL.get()
        if call is None or call.image_mask is None:
            return None
        arguments = bind_call(module, args, kwargs)
        hidden = arguments["hidden_states"]
        if call.cut is None:
            if call.last_token is None:
                raise UnsupportedModelError(f"PrunePatches(method='fastv'): no attention was seen at "
                                            f"{self.attention_sites[self.options.layer - 1]}")
            call.cut = self._cut(call, hidden, self._choose(call, hidden))
            if not call.cut.removes_nothing:
                setattr(call.cache, POSITIONS_ATTRIBUTE, _positions(call.cut, None))
        cut = call.cut
        if cut.removes_nothing:
            return None
        if hidden.shape[1] == cut.span:
            arguments["hidden_states"] = cut.features
        for name, value in arguments.items():
            if name == "position_embeddings" and isinstance(value, (tuple, list)):
                arguments[name] = type(value)(_gather_tokens(t, cut.index, axis=-2) for t in value)
            elif name == "position_ids" and isinstance(value, torch.Tensor) and value.shape[-1] == cut.span:
                arguments[name] = _gather_tokens(value, cut.index, axis=-1)
            elif name == "attention_mask":
                arguments[name] = _cut_prepared_mask(value, cut)
        return call_with(module, arguments)


def _runs(row: torch.Tensor) -> list[torch.Tensor]:
    """Positions of each run of consecutive True values (one image each)."""
    positions = torch.nonzero(row).flatten()
    if not positions.numel():
        return []
    breaks = torch.nonzero(positions[1:] != positions[:-1] + 1).flatten() + 1
    return list(torch.tensor_split(positions, breaks.cpu()))


def _values_per_token(values: torch.Tensor, token: torch.Tensor, count: int) -> torch.Tensor:
    """[count, P]: the values each token covers, in input order (zero-padded to the largest region)."""
    token, values = token.flatten(), values.flatten().float()
    order = torch.sort(token, stable=True).indices
    token, values = token[order], values[order.to(values.device)]
    inside = token >= 0
    token, values = token[inside], values[inside.to(values.device)]
    sizes = torch.bincount(token, minlength=count)
    offsets = torch.arange(token.numel(), device=token.device) - (torch.cumsum(sizes, 0) - sizes)[token]
    vectors = values.new_zeros(count, int(sizes.max()) if token.numel() else 0)
    vectors[token, offsets] = values
    return vectors


def _gather_tokens(tensor: torch.Tensor, index: torch.Tensor, axis: int) -> torch.Tensor:
    """`tensor`'s tokens along `axis` (the axis before it is the batch) at `index` [B, L']; -1 gives zeros."""
    axis = axis % tensor.dim()
    batch, length = index.shape
    index = index.to(tensor.device)
    shape = list(tensor.shape)
    shape[axis - 1] = batch
    tensor = tensor.expand(shape)
    view = [1] * (axis - 1) + [batch, length] + [1] * (tensor.dim() - axis - 1)
    shape[axis] = length
    gathered = tensor.gather(axis, index.clamp(min=0).view(view).expand(shape))
    return gathered.masked_fill((index < 0).view(view).expand(shape), 0)


def _cut_padding_mask(mask: Any, cut: _Cut) -> torch.Tensor | None:
    """The 2-D padding mask [B, past + L'] of the shortened call: past columns kept, this call's gathered,
    added padding masked."""
    if mask is None:
        return (~cut.added_padding).long() if bool(cut.added_padding.any()) else None
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        raise UnsupportedModelError("PrunePatches needs the 2-D attention mask (batch, length) of the tokenizer's "
                                    "output; a prepared 4-D or per-layer mask cannot be cut")
    past = mask.shape[1] - cut.span
    return torch.cat([mask[:, :past], _gather_tokens(mask, cut.index, axis=-1)], dim=1)


def _cut_prepared_mask(mask: Any, cut: _Cut) -> Any:
    """A decoder layer's prepared mask [B, 1, L, past + L] (or None, or one per layer type) with this call's
    query rows and key columns cut the same way; added padding is hidden."""
    if isinstance(mask, dict):
        return {kind: _cut_prepared_mask(value, cut) for kind, value in mask.items()}
    if not isinstance(mask, torch.Tensor) or mask.dim() != 4 or mask.shape[-2] != cut.span:
        return mask
    index = cut.index.to(mask.device)
    batch, length = index.shape
    mask = mask.expand(batch, *mask.shape[1:])
    heads, past = mask.shape[1], mask.shape[-1] - cut.span
    rows = mask.gather(2, index.clamp(min=0)[:, None, :, None].expand(batch, heads, length, mask.shape[-1]))
    columns = rows[..., past:].gather(3, index.clamp(min=0)[:, None, None, :].expand(batch, heads, length, length))
    hidden = False if mask.dtype == torch.bool else torch.finfo(mask.dtype).min
    columns = columns.masked_fill((index < 0)[:, None, None, :], hidden)
    return torch.cat([rows[..., :past], columns], dim=-1)


def _positions(cut: _Cut, padding_mask: torch.Tensor | None) -> TokenPositions:
    """Where the kept tokens sit in the call, for the cache (padding: added, or masked by the model's mask).

    Added padding takes a slot no token of the sequence will ever have (a padding slot is visible to
    the query of the same slot, so it must not share one with a real token)."""
    padding = cut.added_padding
    offsets = torch.where(padding, ADDED_PADDING_SLOT, cut.index)
    if padding_mask is not None:
        padding = padding | (padding_mask[:, -cut.index.shape[1]:].to(padding.device) == 0)
    return TokenPositions(offsets, cut.span, padding if bool(padding.any()) else None)
