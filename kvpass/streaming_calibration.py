"""Which KV heads can stream: the error each head causes when it keeps only sinks and a recent window.

DuoAttention splits heads into retrieval heads, which read far back, and streaming heads, for which
attention sinks and a recent window suffice. kvpass measures, per KV head, the relative error of the
attention block's output (after the O projection) when that head alone attends to nothing but its
first `sinks` tokens and its `recent` latest ones, for the last queries of prompts that need
long-range retrieval: the question at the end asks for a fact stated deep in the context, so a
head that carries the answer shows a large error. The heads with the smallest errors stream.

The prompts are generated here (`retrieval_prompts`): with a tokenizer, varied prose with a few
coded facts at random depths and a question about one of them; without one, token ids in which a
random key span recurs at the end (the induction pattern retrieval heads serve).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import torch

from kvpass.calibration import WINDOW, head_output_errors, prompt_ids
from kvpass.errors import UnsupportedModelError
from kvpass.hf_attention import attention_implementation
from kvpass.site import AttentionSite

RECORDER = "kvpass_streaming_errors"

FILLER = (
    "The ferry crosses the bay twice each morning and once in the late afternoon.",
    "Old maps of the valley show a mill where the car park is now.",
    "Most visitors arrive in spring, when the orchards along the river are in bloom.",
    "The council voted to repaint the footbridge a dark shade of green.",
    "A small museum near the harbour keeps a collection of ship models and brass instruments.",
    "Heavy rain in the hills can raise the river by a metre within a few hours.",
    "The bakery on the corner sells rye bread on Tuesdays and Fridays only.",
    "Children from three villages share the school at the top of the lane.",
    "In winter the market moves indoors, into the hall behind the church.",
    "A path along the cliffs links the lighthouse to the next cove.",
    "The library lends tools as well as books, from ladders to sewing machines.",
    "Several families still keep bees on the slopes above the town.",
    "The station clock has been five minutes fast for as long as anyone remembers.",
    "Fishing boats unload at dawn, and the gulls know the timetable well.",
    "A stone wall marks the old boundary between the two parishes.",
    "The summer fair ends with a rowing race between the harbour crews.",
)
ITEMS = ("blue lantern", "copper key", "north gate", "silver kettle", "red ledger", "oak cabinet", "glass tower",
         "paper kite", "iron bell", "green door", "stone bridge", "velvet chair")


def retrieval_prompts(tokenizer: Any | None = None, vocab_size: int | None = None, count: int = 4,
                      length: int = 768, seed: int = 0) -> list[str | torch.Tensor]:
    """`count` prompts of about `length` tokens whose last tokens must retrieve a fact from deep inside.

    Text (with a tokenizer): filler prose with three "The <item> code is <5 digits>." facts at random
    depths, then a question about one of them and the start of the answer. Token ids (without): a
    random context with a key span inside, recalled at the end.

    Example:
        >>> [p.shape[-1] for p in retrieval_prompts(vocab_size=1000, count=2, length=300)]
        [300, 300]
    """
    rng = random.Random(seed)
    if tokenizer is None:
        if not isinstance(vocab_size, int) or vocab_size < 3:
            raise ValueError("retrieval prompts need a tokenizer or the model's vocab_size")
        generator = torch.Generator().manual_seed(seed)
        prompts = []
        for _ in range(count):
            ids = torch.randint(1, vocab_size, (length,), generator=generator)
            span = min(16, length // 4)
            at = rng.randint(length // 10, length // 2)
            ids[-span:] = ids[at:at + span]  # the end repeats a span from far back: reading it back is retrieval
            prompts.append(ids)
        return prompts
    prompts = []
    for _ in range(count):
        items = rng.sample(ITEMS, 3)
        facts = [f"The {item} code is {rng.randint(10000, 99999)}." for item in items]
        sentences = [rng.choice(FILLER) for _ in range(max(8, length // 16))]
        for fact in facts:
            sentences.insert(rng.randint(len(sentences) // 10, len(sentences) * 7 // 10), fact)
        asked = rng.choice(items)
        prompts.append("Read the notes; you will be asked for one of the codes in them.\n\n" + " ".join(sentences)
                       + f"\n\nWhat is the {asked} code? The {asked} code is")
    return prompts


def streaming_errors(model: torch.nn.Module, sites: Sequence[AttentionSite], prompts: Sequence[str | torch.Tensor],
                     *, sinks: int, recent: int, tokenizer: Any | None = None) -> dict[str, list[float]]:
    """Site name -> per KV head, ||Δo|| / ||o|| of the attention block's output over the last queries
    of each prompt when that head alone keeps only `sinks` + `recent` tokens, averaged over prompts.

    Example:
        >>> errors = streaming_errors(model, kvpass.find_attention(model), retrieval_prompts(tokenizer),
        ...                           sinks=4, recent=64, tokenizer=tokenizer)             # doctest: +SKIP
    """
    missing = [site.name for site in sites if site.projections is None]
    if missing:
        raise UnsupportedModelError(f"the layer-output error of a streaming head needs the O projection, which the "
                                    f"graph does not show for sites {missing}; choose heads with importance="
                                    "'long_range' instead")
    names = {module: name for name, module in model.named_modules()}
    projections = {site.name: site.projections.o for site in sites}
    measured: dict[str, list[list[float]]] = {}

    def record(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        out = torch.nn.functional.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scale,
                                                               enable_gqa=True)
        name = names[module]
        if name in projections:
            full, streaming = _window_outputs(query, key, value, scale, sinks, recent)
            errors = head_output_errors(full, streaming - full, projections[name], model, key.shape[1])
            measured.setdefault(name, []).append(errors[0].tolist())
        return out.transpose(1, 2).contiguous(), None

    device = next(model.parameters()).device
    ids = prompt_ids(model, prompts, tokenizer)
    with attention_implementation(model, RECORDER, record), torch.no_grad():
        for prompt in ids:
            model(input_ids=prompt.to(device), use_cache=False)
    silent = [site.name for site in sites if len(measured.get(site.name, [])) != len(ids)]
    if silent:
        raise UnsupportedModelError(f"these sites do not dispatch through transformers' attention interface, so "
                                    f"their heads cannot be measured: {silent}")
    return {site.name: [sum(values) / len(ids) for values in zip(*measured[site.name])] for site in sites}


def _window_outputs(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float, sinks: int,
                    recent: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention outputs [B, Hq, W, D] of the last W = WINDOW queries: causal, and streaming (each
    query sees only the first `sinks` keys and the keys at most `recent` positions behind it)."""
    length = query.shape[2]
    window = min(WINDOW, length)
    group = query.shape[1] // key.shape[1]
    keys, values = key.float().repeat_interleave(group, 1), value.float().repeat_interleave(group, 1)
    logits = query[:, :, -window:].float() @ keys.transpose(-1, -2) * scale
    rows = torch.arange(length - window, length, device=query.device)[:, None]
    columns = torch.arange(length, device=query.device)[None, :]
    causal = columns <= rows
    streaming = causal & ((columns < sinks) | (columns >= rows - recent))
    full = torch.softmax(logits.masked_fill(~causal, float("-inf")), -1) @ values
    kept = torch.softmax(logits.masked_fill(~streaming, float("-inf")), -1) @ values
    return full, kept
