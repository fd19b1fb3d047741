"""Reading attention off whatever attention op one module call runs.

Patch pruning ranks image tokens by attention: `dominant` (VisionZip) by the attention the vision
encoder's [CLS] token, or all its tokens, pay to each patch at its last layer before the features;
`fastv` by the attention the last token pays at a language-model layer. Depending on its attention
implementation a model computes attention with `scaled_dot_product_attention`, an explicit softmax,
or kvpass's own op (`torch.ops.kvpass.attention`). A `TorchFunctionMode` entered for exactly one
module call (`record_during`) sees whichever runs and recomputes the requested query rows from the
op's operands; the op's own result is returned untouched.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.overrides import TorchFunctionMode

from kvpass.kernels.reference import slot_mask

SDPA = torch.nn.functional.scaled_dot_product_attention
SOFTMAXES = frozenset({torch.nn.functional.softmax, torch.softmax, torch.Tensor.softmax})
KVPASS_ATTENTION = torch.ops.kvpass.attention.default
QUERY_CHUNK = 256
"""Queries scored at once when averaging over all of them (bounds the [chunk, keys] matrix)."""


@dataclass
class AttentionRows(TorchFunctionMode):
    """While active, records every attention op's attention over its keys, averaged over heads and
    over the chosen queries: 'first' (a [CLS] token), 'last' (the newest token) or 'all'.

    `rows` holds one float32 [batch, keys] tensor per attention call, `keys` (when `with_keys`)
    one [batch, keys, head_dim] head-averaged key tensor per call.

    Example:
        >>> q = k = v = torch.randn(1, 2, 5, 4)
        >>> with AttentionRows("last") as recorder:
        ...     _ = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        >>> recorder.rows[0].shape, round(float(recorder.rows[0].sum()), 4)
        (torch.Size([1, 5]), 1.0)
    """

    queries: str
    with_keys: bool = False
    rows: list[torch.Tensor] = field(default_factory=list)
    keys: list[torch.Tensor] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__init__()
        if self.queries not in ("first", "last", "all"):
            raise ValueError(f"queries must be 'first', 'last' or 'all', got {self.queries!r}")

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is SDPA:
            self._record(*_sdpa_operands(*args, **kwargs))
        elif func is KVPASS_ATTENTION:
            self._record(*_kvpass_operands(*args, **kwargs))
        out = func(*args, **kwargs)
        if func in SOFTMAXES and _softmax_over_keys(out, args, kwargs):
            self.rows.append(self._average(lambda start, stop: out[..., start:stop, :].float(), out.shape[-2]))
        return out

    def _record(self, q: torch.Tensor, k: torch.Tensor, visible: Callable[[int, int], torch.Tensor | None],
                bias: Callable[[int, int], torch.Tensor | None], scale: float) -> None:
        k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3) if k.shape[-3] != q.shape[-3] else k

        def probabilities(start: int, stop: int) -> torch.Tensor:
            logits = (q[..., start:stop, :].float() @ k.float().transpose(-1, -2)) * scale
            if (added := bias(start, stop)) is not None:
                logits = logits + added
            if (allowed := visible(start, stop)) is not None:
                logits = logits.masked_fill(~allowed, float("-inf"))
            return torch.softmax(logits, dim=-1)

        self.rows.append(self._average(probabilities, q.shape[-2]))
        if self.with_keys:
            self.keys.append(k.float().mean(dim=-3).reshape(-1, *k.shape[-2:]))

    def _average(self, probabilities: Callable[[int, int], torch.Tensor], queries: int) -> torch.Tensor:
        """Mean over heads (and over the chosen queries) of [.., heads, queries, keys] probabilities."""
        if self.queries == "first":
            total, count = probabilities(0, 1).sum(dim=-2), 1
        elif self.queries == "last":
            total, count = probabilities(queries - 1, queries).sum(dim=-2), 1
        else:
            total = sum(probabilities(start, min(start + QUERY_CHUNK, queries)).sum(dim=-2)
                        for start in range(0, queries, QUERY_CHUNK))
            count = queries
        averaged = total.mean(dim=-2) / count
        return averaged.reshape(-1, averaged.shape[-1])


def _softmax_over_keys(out: object, args: tuple, kwargs: dict) -> bool:
    """A 4-D softmax over the last axis: attention probabilities [batch, heads, queries, keys]."""
    dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
    return isinstance(out, torch.Tensor) and out.dim() == 4 and dim is not None and dim % 4 == 3


def _sdpa_operands(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """(q, k, visible rows, additive bias rows, scale) of a `scaled_dot_product_attention` call."""
    scale = scale if scale is not None else 1.0 / math.sqrt(query.shape[-1])
    lq, lk = query.shape[-2], key.shape[-2]

    rows = lambda start, stop: attn_mask if attn_mask.shape[-2] == 1 else attn_mask[..., start:stop, :]  # noqa: E731

    def visible(start: int, stop: int) -> torch.Tensor | None:
        allowed = rows(start, stop) if attn_mask is not None and attn_mask.dtype == torch.bool else None
        if is_causal:
            causal = torch.ones(lq, lk, dtype=torch.bool, device=query.device).tril()[start:stop]
            allowed = causal if allowed is None else allowed & causal
        return allowed

    def bias(start: int, stop: int) -> torch.Tensor | None:
        return None if attn_mask is None or attn_mask.dtype == torch.bool else rows(start, stop).float()

    return query, key, visible, bias, scale


def _kvpass_operands(q, k, v, q_slots, k_slots, scale, causal, stat, window):
    """The same for `torch.ops.kvpass.attention`: visibility comes from the slots."""
    group = q.shape[1] // k.shape[1]

    def visible(start: int, stop: int) -> torch.Tensor:
        mask = slot_mask(q_slots[:, start:stop], k_slots, causal)
        return mask.repeat_interleave(group, dim=1) if group > 1 else mask

    return q, k, visible, lambda start, stop: None, scale


def record_during(module: torch.nn.Module, start: Callable[[], AttentionRows | None],
                  finish: Callable[[AttentionRows], None]) -> Callable[[], None]:
    """Record attention during each call of `module`: `start()` returns a recorder for this call (or
    None: nothing to record), `finish(recorder)` receives it once the call ends, even on error.
    Returns the undo."""
    active: list[AttentionRows | None] = []

    def enter(mod, args, kwargs):
        recorder = start()
        active.append(recorder)
        if recorder is not None:
            recorder.__enter__()

    def leave(mod, args, kwargs, output):
        recorder = active.pop()
        if recorder is not None:
            recorder.__exit__(None, None, None)
            finish(recorder)

    handles = [module.register_forward_pre_hook(enter, with_kwargs=True),
               module.register_forward_hook(leave, with_kwargs=True, always_call=True)]
    return lambda: [handle.remove() for handle in handles]
