"""Calibration: how much attention each layer and KV head loses when its cache is cut.

A global budget is only worth spreading unevenly if some layers can lose tokens more
cheaply than others (attention entropy differs strongly between layers, seed §4.2). This
pass measures it on a few prompts, one prefill each, for the method that will evict:

* **entropy** of the last-window queries' attention, normalised by log(visible keys), per
  KV head (0: all mass on one token, 1: spread evenly);
* **retention curve**: the method ranks the tokens *before* the last window exactly as
  eviction would rank them at the end of a prefill (its statistic from those tokens' own
  queries, sinks and recent window protected); the curve is the share of the last-window
  queries' attention mass that survives when the top `x` of those tokens are kept (the
  window's own tokens always survive), for `x` on a grid from 0 to 1;
* **long-range share** of each KV head's attention (past the sinks and the recent window), and,
  when asked (`heads=True`, what head pruning ranks by), the **head removal error**: how far
  the model's own output moves when one KV head and its query group are removed (see
  `head_removal_errors`);
* **output-error curve**: on the same ranking, the relative L2 error of the last-window
  queries' attention *output* when only the top `x` are kept (softmax renormalised over what
  is left). Mass alone over-rewards diffuse layers, whose evicted mass was averaging similar
  values; the output error is what the next layer sees. `kvpass.plan` allocates budget to
  minimise the total predicted output error.

The last window stands for the queries to come, which eviction cannot see: a question that
arrives after the context was pruned. Ranking with the same queries whose mass is measured
would flatter layers with sharp, query-specific attention (retrieval heads), whose tokens
are exactly the ones a context-only ranking misses.
Only models whose attention dispatches through transformers' attention interface can be
calibrated (the same seam `kvpass.optimize` uses); other models use uniform or pyramid.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from kvpass.errors import UnsupportedModelError
from kvpass.eviction_cost import mass_kept, output_errors
from kvpass.hf_attention import attention_implementation
from kvpass.kernels import ops
from kvpass.kernels.reference import first_scored_query
from kvpass.methods import Method, Observation, Stat, get_method
from kvpass.methods.selection import ranking_scores
from kvpass.site import AttentionSite

RECORDER = "kvpass_calibrate"
WINDOW = 32
"""Queries at the end of each prompt whose attention is measured."""

_NEEDLE_FILLER = (
    "The library opens at nine and closes at six. Trains leave the north station every twenty minutes. "
    "Most of the orchard is apple trees, with a few rows of pears near the fence. "
    "The committee meets on the first Tuesday of each month to review the budget. "
    "Rain is expected in the afternoon, clearing by the evening. "
)
NEEDLE_PROMPT = (
    "Read the notes below carefully; one of them contains a secret code you will be asked for.\n\n"
    + _NEEDLE_FILLER * 5
    + "The secret code is 48213. Remember the code 48213. "
    + _NEEDLE_FILLER * 4
    + "\n\nWhat is the secret code? Answer with the five digits. The secret code is"
)
PARAGRAPH_PROMPT = (
    "Rivers have shaped where people live for as long as there have been settlements. A river brings fresh "
    "water for drinking and farming, fish to eat, and a road for boats long before there were paved roads. "
    "Floods are the price of that gift: the same water that makes the soil of a valley rich can sweep away a "
    "village in a single night. Early towns therefore grew on terraces a little above the flood plain, close "
    "enough to use the river and high enough to survive it. Bridges came later and changed everything again, "
    "because a crossing point gathers traders, inns, toll collectors and soldiers. Many of the great cities of "
    "Europe began as a ford or a bridge, and their oldest streets still run down to the water. Today the "
    "rivers are walled, dredged and measured by sensors, yet planners still argue about the same questions: "
    "how close to build, how high to raise the banks, and who pays when the water rises anyway. In summary, "
    "the history of a river city is the history of a bargain with"
)
DEFAULT_TEXT_PROMPTS = (NEEDLE_PROMPT, PARAGRAPH_PROMPT)


@dataclass
class Calibration:
    """What calibration measured, per site name.

    Example:
        >>> cal = calibrate(model, tokenizer=tokenizer)     # doctest: +SKIP
        >>> cal.curve("model.layers.0.self_attn")[GRID // 2]  # mass kept at half the tokens  # doctest: +SKIP
        0.97
    """

    method: str
    prompt_tokens: list[int]
    entropy: dict[str, list[float]]
    """Normalised attention entropy per KV head, averaged over prompts."""
    retention: dict[str, list[list[float]]]
    """Per KV head, the attention mass kept at kept fractions 0, 1/GRID, ..., 1 of the tokens."""
    output_error: dict[str, list[list[float]]]
    """Per KV head, the relative error of the attention output at the same kept fractions."""
    seconds: float
    head_error: dict[str, list[float]] = field(default_factory=dict)
    """Per KV head, how far the model's output moves when that head and its query group are
    removed (`head_removal_errors`): what head pruning ranks by. Measured only when asked
    (`calibrate(..., heads=True)`), for sites whose projections were found."""
    long_range: dict[str, list[float]] = field(default_factory=dict)
    """Per KV head, the share of the last-window queries' attention that goes past the sinks and
    the recent window (retrieval heads score high; a streaming head would lose exactly this)."""

    def curve(self, name: str, heads: Sequence[int] | None = None) -> list[float]:
        """The site's retention curve, averaged over its KV heads (one keep count per layer), or
        over `heads` only (those head pruning keeps)."""
        return _mean(_rows(self.retention[name], heads))

    def error_curve(self, name: str, heads: Sequence[int] | None = None) -> list[float]:
        """The site's output-error curve, averaged over its KV heads (or `heads` only)."""
        return _mean(_rows(self.output_error[name], heads))


def default_prompts(tokenizer: Any | None = None, vocab_size: int | None = None) -> list[str | torch.Tensor]:
    """A needle-like text and a generic paragraph, or token-id stand-ins when there is no tokenizer.

    Without a tokenizer, a repeated block of random ids with a unique span in it plays the
    needle (repetition is what retrieval heads latch onto) and plain random ids the paragraph.

    Example:
        >>> [p.shape[-1] for p in default_prompts(vocab_size=1000)]
        [494, 384]
    """
    if tokenizer is not None:
        return list(DEFAULT_TEXT_PROMPTS)
    if not isinstance(vocab_size, int) or vocab_size < 3:
        raise ValueError("default calibration prompts need a tokenizer or the model's vocab_size")
    generator = torch.Generator().manual_seed(0)
    block = torch.randint(1, vocab_size, (48,), generator=generator)
    needle = torch.randint(1, vocab_size, (10,), generator=generator)
    needle_prompt = torch.cat([block.repeat(4), needle, block.repeat(6), needle[:4]])
    return [needle_prompt, torch.randint(1, vocab_size, (384,), generator=generator)]


def calibrate(
    model: torch.nn.Module,
    method: str | Method | None = None,
    prompts: Sequence[str | torch.Tensor] | str | torch.Tensor | None = None,
    *,
    tokenizer: Any | None = None,
    sites: Sequence[AttentionSite] | None = None,
    sinks: int = 4,
    recent: int = 32,
    heads: bool = False,
) -> Calibration:
    """Entropy and retention curves of every site of a Hugging Face causal LM, one prefill per prompt.

    `prompts`: text (needs `tokenizer`) or token-id tensors ([L] or [1, L]); None uses
    `default_prompts`. Every module that calls the attention interface is measured, under its
    module path; `sites` (e.g. `kvpass.find_attention(model)`) must all be among them.
    `heads=True` also measures `head_error` for the sites whose projections were found: one more
    forward per KV head and prompt, so only head pruning asks for it.

    Example:
        >>> cal = kvpass.calibration.calibrate(model, "tova", tokenizer=tokenizer)   # doctest: +SKIP
        >>> round(sum(cal.entropy["model.layers.5.self_attn"]) / 3, 2)             # doctest: +SKIP
        0.41
    """
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "_attn_implementation"):
        raise UnsupportedModelError(
            f"calibration runs through transformers' attention interface; {type(model).__name__} has none: "
            "use allocation='uniform' or 'pyramid'"
        )
    chosen = get_method(method)
    ids = prompt_ids(model, prompts, tokenizer)
    recorder = _Recorder({module: name for name, module in model.named_modules()}, chosen, sinks, recent)
    started = time.perf_counter()
    device = next(model.parameters()).device
    with attention_implementation(model, RECORDER, recorder), torch.no_grad():
        for prompt in ids:
            model(input_ids=prompt.to(device), use_cache=False)
    silent = [site.name for site in sites or () if len(recorder.entropy.get(site.name, [])) != len(ids)]
    if silent:
        raise UnsupportedModelError(
            f"these sites do not dispatch through transformers' attention interface, so they cannot be "
            f"calibrated: {silent}"
        )
    return Calibration(
        method=chosen.name,
        prompt_tokens=[prompt.shape[-1] for prompt in ids],
        entropy={name: _mean(rows) for name, rows in recorder.entropy.items()},
        retention={name: [_mean(heads) for heads in zip(*rows)] for name, rows in recorder.retention.items()},
        output_error={name: [_mean(heads) for heads in zip(*rows)] for name, rows in recorder.output_error.items()},
        seconds=time.perf_counter() - started,
        head_error=head_removal_errors(model, ids, sites) if heads else {},
        long_range={name: _mean(rows) for name, rows in recorder.long_range.items()},
    )


def _mean(rows: Sequence[Sequence[float]]) -> list[float]:
    return [sum(values) / len(rows) for values in zip(*rows)]


def _rows(rows: list[list[float]], heads: Sequence[int] | None) -> list[list[float]]:
    return rows if heads is None else [rows[head] for head in heads]


def prompt_ids(model: torch.nn.Module, prompts: Any, tokenizer: Any | None) -> list[torch.Tensor]:
    """Every prompt as a [1, L] long tensor, checked against the model's context length (the
    built-in prompts are cut to it, keeping their end: the question)."""
    built_in = prompts is None
    if built_in:
        prompts = default_prompts(tokenizer, getattr(model.config, "vocab_size", None))
    elif isinstance(prompts, (str, torch.Tensor)):
        prompts = [prompts]
    elif not isinstance(prompts, Sequence):
        raise ValueError(f"calibration must be a Calibration, a prompt (text or a token-id tensor), a list of "
                         f"prompts, or None; got {type(prompts).__name__}")
    if tokenizer is not None and not callable(tokenizer):
        raise ValueError(f"tokenizer must be a callable tokenizer (a transformers tokenizer), got {tokenizer!r:.80}")
    limit = getattr(model.config, "max_position_embeddings", None)
    vocab = getattr(model.config, "vocab_size", None)
    ids = []
    for index, prompt in enumerate(prompts):
        if isinstance(prompt, str):
            if tokenizer is None:
                raise ValueError(f"calibration prompt {index} is text but no tokenizer was given: "
                                 "pass tokenizer= or token-id tensors")
            prompt = tokenizer(prompt, return_tensors="pt").input_ids
        if built_in and isinstance(limit, int):
            prompt = prompt[..., -limit:]
        if not isinstance(prompt, torch.Tensor) or prompt.dtype not in (torch.int32, torch.int64) \
                or prompt.dim() not in (1, 2) or (prompt.dim() == 2 and prompt.shape[0] != 1) or prompt.shape[-1] < 2:
            raise ValueError(f"calibration prompt {index} must be text or an integer token tensor [L] or [1, L] "
                             f"with L >= 2, got {prompt!r:.80}")
        if prompt.min() < 0 or (isinstance(vocab, int) and prompt.max() >= vocab):
            vocabulary = f"[0, {vocab})" if isinstance(vocab, int) else ">= 0"
            raise ValueError(f"calibration prompt {index} has token ids from {int(prompt.min())} to "
                             f"{int(prompt.max())}; token ids are {vocabulary}")
        if isinstance(limit, int) and prompt.shape[-1] > limit:
            raise ValueError(f"calibration prompt {index} has {prompt.shape[-1]} tokens, more than the model's "
                             f"context (max_position_embeddings={limit})")
        ids.append(prompt.reshape(1, -1).long())
    if not ids:
        raise ValueError("calibration needs at least one prompt")
    return ids


class _Recorder:
    """The attention implementation calibration runs: normal attention, plus entropy, and the
    mass and output error of the last queries under the method's ranking of the earlier tokens."""

    def __init__(self, names: dict[torch.nn.Module, str], method: Method, sinks: int, recent: int):
        self.names, self.method, self.sinks, self.recent = names, method, sinks, recent
        self.long_range: dict[str, list[list[float]]] = {}
        self.entropy: dict[str, list[list[float]]] = {}
        self.retention: dict[str, list[list[list[float]]]] = {}
        self.output_error: dict[str, list[list[list[float]]]] = {}

    def __call__(self, module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        batch, heads, length, _ = query.shape
        kv_heads = key.shape[1]
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        out = torch.nn.functional.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scale,
                                                               enable_gqa=True)
        probs, entropy = _window_attention(query, key, scale)
        context = length - min(WINDOW, length - 1)  # tokens cached before the window's queries arrive
        slots = torch.arange(context, dtype=torch.int32, device=query.device)
        k_slots = slots.expand(batch, kv_heads, context).contiguous()
        keys, values = key[:, :, :context], value[:, :, :context]
        mode = self.method.stat
        stat = None
        if mode is not Stat.NONE:  # the statistic the runtime kernel gives at the end of a `context` prefill
            first = first_scored_query(mode, context, self.method.window)
            stat = ops.attention(query[:, :, first:context], keys, values,
                                 slots[first:].expand(batch, context - first).contiguous(), k_slots, scale, True,
                                 mode.value, self.method.window)[1]
        obs = Observation(keys, values, k_slots, stat, context, heads // kv_heads)
        scores = ranking_scores(self.method, obs, self.sinks, self.recent)
        name = self.names[module]
        self.entropy.setdefault(name, []).append(entropy[0].tolist())
        mass = probs.mean(dim=2).view(batch, kv_heads, heads // kv_heads, length).mean(dim=2)
        local = mass[..., context:].sum(-1, keepdim=True)  # the window's own tokens are never evicted
        self.retention.setdefault(name, []).append((local + mass_kept(scores, mass[..., :context]))[0].tolist())
        self.output_error.setdefault(name, []).append(output_errors(scores, probs, value, context)[0].tolist())
        self.long_range.setdefault(name, []).append(_long_range(probs, kv_heads, self.sinks, self.recent)[0].tolist())
        return out.transpose(1, 2).contiguous(), None


def _long_range(probs: torch.Tensor, kv_heads: int, sinks: int, recent: int) -> torch.Tensor:
    """[B, Hkv]: the window queries' attention share on keys past the sinks and their recent window."""
    batch, heads, window, length = probs.shape
    rows = torch.arange(length - window, length, device=probs.device)[:, None]
    keys = torch.arange(length, device=probs.device)[None, :]
    far = (keys >= sinks) & (keys < rows - recent)
    share = (probs * far).sum(-1)                                    # [B, Hq, W]
    return share.view(batch, kv_heads, heads // kv_heads, window).mean(dim=(2, 3))


def head_removal_errors(model: torch.nn.Module, ids: Sequence[torch.Tensor],
                        sites: Sequence[AttentionSite] | None) -> dict[str, list[float]]:
    """Per KV head of every site whose projections were found: the relative change ||Δy|| / ||y||
    of the model's output y (its logits, or its first output tensor), averaged over the prompts'
    tokens, when that head and its query group are removed (their O-projection input columns
    zeroed: exactly what removal does).

    Measured where it matters, at the model's output, rather than at the attention block's: a
    head whose block output is small can still carry what later layers read, and one whose
    block output is large can be redundant with the residual stream. On SmolLM2, ranking by the
    block's own error removed heads that raised perplexity more than random choices did.
    """
    measured = [site for site in sites or () if site.projections is not None]
    if not measured:
        return {}
    device = next(model.parameters()).device
    prompts = [prompt.to(device) for prompt in ids]
    with torch.no_grad():
        references = [_model_output(model, prompt) for prompt in prompts]
        errors: dict[str, list[float]] = {}
        for site in measured:
            for head in range(site.num_kv_heads):
                restore = site.projections.o.zero(model, site.query_group_features(head))
                try:
                    change = [_relative_change(reference, _model_output(model, prompt))
                              for reference, prompt in zip(references, prompts)]
                finally:
                    restore()
                errors.setdefault(site.name, []).append(sum(change) / len(change))
    return errors


def _model_output(model: torch.nn.Module, prompt: torch.Tensor) -> torch.Tensor:
    output = model(input_ids=prompt, use_cache=False)
    logits = getattr(output, "logits", None)
    return (logits if logits is not None else output[0]).float()


def _relative_change(reference: torch.Tensor, changed: torch.Tensor) -> float:
    """||Δy|| / ||y|| per token (last axis), averaged over tokens."""
    return float(((changed - reference).norm(dim=-1) / reference.norm(dim=-1).clamp_min(1e-12)).mean())


def _window_attention(query: torch.Tensor, key: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(probabilities [B, Hq, W, L], entropy [B, Hkv]) of the last W = WINDOW queries' causal
    attention; entropy averaged over those queries and each KV head's query group, normalised
    by log(visible keys)."""
    batch, heads, length, _ = query.shape
    kv_heads = key.shape[1]
    window = min(WINDOW, length)
    rows = torch.arange(length - window, length, device=query.device)
    logits = (query[:, :, -window:].float() @ key.float().repeat_interleave(heads // kv_heads, 1).transpose(-1, -2))
    visible = torch.arange(length, device=query.device)[None, :] <= rows[:, None]
    probs = torch.softmax((logits * scale).masked_fill(~visible, float("-inf")), dim=-1)
    entropy = -(probs * probs.clamp_min(1e-30).log()).sum(-1) / (rows + 1).clamp_min(2).float().log()
    group = (batch, kv_heads, heads // kv_heads)
    return probs, entropy.view(*group, window).mean(dim=(2, 3))
