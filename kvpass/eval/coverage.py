"""Coverage of transformers' causal LMs: a tiny random model per architecture, checked end to end.

Every model type of `MODEL_FOR_CAUSAL_LM_MAPPING_NAMES` is built from its own config class with
tiny sizes (hidden 64, 2 layers, 4 heads, 2 KV heads where the config has them, vocab 128, fp32,
random weights). The sizes are set generically: `SIZES` maps each concept to the field names
configs use for it, and a config receives every name it declares. Hybrid models get one full
period of their layer-type pattern, with windows and chunks smaller than the prompt.

`check(model_type)` then runs what a user would and classifies the outcome:

* **ok**: `find_attention` finds one site per attention layer with the config's geometry;
  `optimize(budget=1.0)` generates the same greedy tokens; at `budget=0.5` the cache after
  prefill holds at most half the unmodified model's bytes, `generate` runs, and 8 decode steps
  equal the masked-full oracle (the unmodified model with the evicted keys masked out);
* with `transform="select"`, **ok** instead means: `kvpass.SelectLayer(layer=0)` keeping half the
  prompt gives, on the kept tokens and one decode step after, the logits of the unmodified model
  whose deeper layers' attention hides the unselected keys (`selection_oracle_mismatch`), and
  `generate` runs;
* **refused**: kvpass raised its own error, whose message says what is missing;
* **wrong**: a check gave a different answer; **crashed**: any other exception;
* **could not build**: the config, the model or the unmodified model's forward failed.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import re
import sys
import traceback
from dataclasses import dataclass
from typing import Any

import torch

from kvpass.runtime.call_arguments import cache_argument, output_cache

SIZES: dict[str, tuple[int, tuple[str, ...]]] = {
    "hidden": (64, ("hidden_size", "n_embd", "d_model", "dim", "embed_dim", "model_dim", "emb_dim", "embedding_size",
                    "word_embed_proj_dim", "attention_hidden_size", "hidden_dim", "n_embed")),
    "layers": (2, ("num_hidden_layers", "n_layer", "n_layers", "num_layers", "decoder_layers", "encoder_layers")),
    "heads": (4, ("num_attention_heads", "n_head", "n_heads", "num_heads", "decoder_attention_heads", "attention_heads",
                  "encoder_attention_heads", "swa_num_attention_heads", "num_attention_heads_per_layer")),
    "kv_heads": (2, ("num_key_value_heads", "num_kv_heads", "n_kv_heads", "swa_num_key_value_heads")),
    "head_dim": (16, ("head_dim", "d_head", "dim_head", "attention_head_dim", "attention_head_size", "kv_channels",
                      "swa_head_dim", "v_head_dim", "qk_head_dim", "global_head_dim")),
    "intermediate": (128, ("intermediate_size", "n_inner", "ffn_dim", "decoder_ffn_dim", "d_ff", "dim_ff", "d_inner",
                           "ffn_hidden_size", "feed_forward_size", "dense_intermediate_size", "intermediate_size_mlp",
                           "encoder_ffn_dim")),
    "expert_intermediate": (32, ("moe_intermediate_size", "shared_expert_intermediate_size", "expert_ffn_hidden_size",
                                 "shared_intermediate_size", "moe_shared_expert_intermediate_size",
                                 "shared_experts_intermediate_size")),
    "experts": (4, ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")),
    "experts_per_token": (2, ("num_experts_per_tok", "moe_topk", "moe_k")),
    "expert_groups": (1, ("n_group", "topk_group")),
    "rotary_dim": (8, ("rotary_dim",)),
    "latent_rank": (16, ("kv_lora_rank", "q_lora_rank")),
    "latent_head_dim": (8, ("qk_rope_head_dim", "qk_nope_head_dim")),
    "state_heads": (4, ("mamba_n_heads", "mamba_num_heads", "linear_num_value_heads", "linear_num_heads")),
    "state_key_heads": (2, ("linear_num_key_heads",)),
    "state_head_dim": (32, ("mamba_d_head", "mamba_head_dim", "linear_key_head_dim", "linear_value_head_dim",
                            "linear_head_dim")),
    "vocab": (128, ("vocab_size",)),
    "positions": (256, ("max_position_embeddings", "n_positions", "n_ctx", "max_target_positions")),
    "window": (8, ("sliding_window", "attention_chunk_size", "sliding_window_size", "attention_window_size",
                   "local_attention_window_len")),
}
"""concept -> (tiny value, the config field names that mean it). A field is set only where the config
class declares it and its default is an int (a None default means 'off', e.g. no sliding window),
except for the concepts in `DERIVED_WHEN_NONE`."""

DERIVED_WHEN_NONE = ("kv_heads", "head_dim")
"""Concepts whose None default means 'derived from another size' (KV heads = heads), not 'off'."""

PROMPT_LENGTH = 32
"""Longer than every window above, so sliding layers really drop tokens."""
DECODE_STEPS = 8
CHECKED_TRANSFORMS = ("evict", "select")
"""What `check` can run: eviction (`kvpass.optimize` with a budget) or prefill token selection (`kvpass.SelectLayer`)."""
SELECTION_WINDOW = 4
"""Observation queries of the selection check (half the prompt is kept, the window included)."""
ATTENTION_LAYER_TYPES = ("full_attention", "sliding_attention", "chunked_attention", "attention")
"""Layer types whose cache is softmax attention's K/V (other types: state-space, linear, latent, MLP)."""
TOKEN_ID = re.compile(r".*_token_(id|index)$")


@dataclass
class Verdict:
    """The outcome of `check` for one model type."""

    model_type: str
    status: str
    """'ok', 'refused', 'wrong', 'crashed' or 'could not build'."""
    detail: str = ""
    kind: str = ""
    """'softmax' (attention over a KV cache), 'state-space / linear', 'latent', 'no KV cache' (the
    model returns none), or '' if unknown."""
    seconds: float = 0.0


def _fields(config_class: type) -> dict[str, Any]:
    """The config class's declared fields and their defaults."""
    if dataclasses.is_dataclass(config_class):
        return {f.name: f.default for f in dataclasses.fields(config_class)}
    parameters = inspect.signature(config_class.__init__).parameters
    return {name: p.default for name, p in parameters.items() if name not in ("self", "kwargs")}


def _get(config: Any, name: str) -> Any:
    """A config attribute, None where the config refuses to give one value (per-layer attributes)."""
    try:
        return getattr(config, name, None)
    except Exception:  # noqa: BLE001 - heterogeneous configs raise for per-layer attributes
        return None


def _period(types: list) -> list:
    """One period of a repeating layer-type pattern (the shortest prefix that tiles the list)."""
    for size in range(1, len(types) + 1):
        if all(types[i] == types[i % size] for i in range(len(types))):
            return types[:size]
    return types


def tiny_kwargs(config_class: type, default: Any = None) -> dict[str, Any]:
    """Keyword arguments that make `config_class` tiny (see `SIZES`); sub-configs are made tiny too.

    Example:
        >>> from transformers import LlamaConfig
        >>> LlamaConfig(**tiny_kwargs(LlamaConfig)).num_key_value_heads
        2
    """
    fields = _fields(config_class)
    default = default if default is not None else config_class()
    kwargs: dict[str, Any] = {}
    for concept, (value, names) in SIZES.items():
        for name in names:
            current = _get(default, name) if name in fields else False
            if (isinstance(current, int) and not isinstance(current, bool)) or (
                    current is None and concept in DERIVED_WHEN_NONE):
                kwargs[name] = value
    if "is_decoder" in fields:  # the *ForCausalLM / LMHead classes of encoders are decoders when asked
        kwargs["is_decoder"] = True
    vocab = SIZES["vocab"][0]
    token_ids = sorted(name for name in fields if TOKEN_ID.match(name) and isinstance(_get(default, name), int))
    for offset, name in enumerate(token_ids):
        if _get(default, name) >= vocab:
            kwargs[name] = vocab - 1 - offset
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        if name in fields and isinstance(_get(default, name), int) and _get(default, name) >= vocab:
            kwargs[name] = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}[name]
    types = _get(default, "layer_types") if "layer_types" in fields else None
    layers = SIZES["layers"][0]
    if isinstance(types, list) and types:
        pattern = _period(list(types))
        pattern = pattern if len(pattern) <= 12 else list(dict.fromkeys(types))
        layers = max(len(pattern), layers)
        for name in SIZES["layers"][1]:
            if name in kwargs:
                kwargs[name] = layers
    default_layers = _first_int(default, "layers")
    sizes = {name: value for value, names in SIZES.values() for name in names}
    for name in fields:  # per-layer lists (layer types, sizes per layer) take the tiny layer count
        listed = _get(default, name)
        if isinstance(listed, list) and listed and len(listed) == default_layers and not name.endswith("_config"):
            kwargs[name] = [sizes[name]] * layers if name in sizes else (_period(listed) * layers)[:layers]
    if isinstance(types, list) and types:
        kwargs["layer_types"] = (pattern * layers)[:layers]
    serialized = default.to_dict() if hasattr(default, "to_dict") else {}
    for name, keyed in serialized.items():  # per-layer settings keyed by layer index: the same tiny layers
        if isinstance(keyed, dict) and keyed and all(str(key).isdigit() for key in keyed):
            period = len(pattern) if isinstance(types, list) and types else layers
            kwargs[name] = {f"{int(key) % period:0{len(str(key))}d}": {
                field: _tiny_override(field, value, serialized.get(field), sizes) for field, value in setting.items()}
                if isinstance(setting, dict) else setting for key, setting in keyed.items()}
    for name, value in fields.items():
        sub = _get(default, name)
        if name.endswith("_config") and hasattr(sub, "to_dict") and hasattr(type(sub), "model_type"):
            kwargs[name] = {**sub.to_dict(), **tiny_kwargs(type(sub), sub)}
    return kwargs


def _tiny_override(field: str, value: Any, base: Any, sizes: dict[str, int]) -> Any:
    """A per-layer size, made tiny in the same proportion to the model-wide size (Gemma 4's global layers:
    twice the head size of the others, tiny or not)."""
    if field not in sizes or not isinstance(value, int) or isinstance(value, bool):
        return value
    return max(1, sizes[field] * value // base) if isinstance(base, int) and base > 0 else sizes[field]


def tiny_config(model_type: str):
    """The tiny config of `model_type` (a transformers model type such as 'llama')."""
    from transformers import CONFIG_MAPPING

    config_class = CONFIG_MAPPING[model_type]
    return config_class(**tiny_kwargs(config_class))


def text_config(config):
    """The decoder's config (multimodal configs keep theirs as `text_config`)."""
    return config.get_text_config(decoder=True)


def attention_kind(config) -> str:
    """What the model's cache holds: softmax attention K/V ('softmax'), recurrent state ('state-space / linear')
    or compressed latents ('latent'), read off the config."""
    text = text_config(config)
    types = set(_get(text, "layer_types") or [])
    if _get(text, "kv_lora_rank") or types & {"indexed_attention", "heavily_compressed_attention",
                                              "compressed_sparse_attention"}:
        return "latent"
    if types - set(ATTENTION_LAYER_TYPES) - {"moe", "mlp"} or _first_int(text, "heads") is None:
        return "state-space / linear"
    return "softmax"


def _first_int(config: Any, concept: str) -> int | None:
    return next((value for name in SIZES[concept][1] if isinstance(value := _get(config, name), int)
                 and not isinstance(value, bool)), None)


def expected_geometry(config, cache: Any = None) -> list[tuple[int, int, int]]:
    """(heads, KV heads, head dim) of every attention layer the config describes, read per layer
    (heterogeneous configs differ from layer to layer). KV heads and head dim come from the
    unmodified model's own `cache` where it holds keys: models may derive them in code (more KV
    heads in sliding layers), and the cache is what kvpass must match."""
    text = text_config(config)
    types = _get(text, "layer_types")
    layers = len(types) if types else _first_int(text, "layers")
    geometry = []
    for index in range(layers):
        if types and types[index] not in ATTENTION_LAYER_TYPES:
            continue
        layer = text.per_layer_config[index] if hasattr(text, "per_layer_config") else text
        heads = _first_int(layer, "heads")
        kv_heads = _first_int(layer, "kv_heads") or heads
        if _get(layer, "multi_query") and not _get(layer, "new_decoder_architecture"):
            kv_heads = 1
        head_dim = _get(layer, "head_dim") or _first_int(layer, "hidden") // heads
        keys = getattr(cache.layers[index], "keys", None) if index < len(getattr(cache, "layers", ())) else None
        if isinstance(keys, torch.Tensor) and keys.dim() == 4:
            kv_heads, head_dim = keys.shape[1], keys.shape[3]
        geometry.append((heads, kv_heads, head_dim))
    return geometry


def build(model_type: str) -> torch.nn.Module:
    """The tiny random fp32 causal LM of `model_type`, in eval mode."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config(model_type), dtype=torch.float32).eval()


def prompt(model: torch.nn.Module, length: int = PROMPT_LENGTH) -> torch.Tensor:
    """Random token ids that avoid the special ids at the top of the tiny vocabulary."""
    vocab = text_config(model.config).vocab_size
    return torch.randint(3, min(vocab, SIZES["vocab"][0]) - 8, (1, length), generator=torch.Generator().manual_seed(1))


def greedy(model: torch.nn.Module, ids: torch.Tensor, steps: int = DECODE_STEPS) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps, do_sample=False,
                              min_new_tokens=steps)


def prefill(model: torch.nn.Module, ids: torch.Tensor):
    """The cache a model returns after `ids` (None for a model that keeps none)."""
    with torch.no_grad():
        output = model(ids, use_cache=True)
    return output_cache(output)


def check(model_type: str, transform: str = "evict") -> Verdict:
    """Build `model_type` tiny and run `transform`'s checks on it (see the module docstring)."""
    import time

    from kvpass.errors import KVPassError

    if transform not in CHECKED_TRANSFORMS:
        raise ValueError(f"transform={transform!r} is not checked; expected one of {CHECKED_TRANSFORMS}")
    start = time.perf_counter()
    verdict = Verdict(model_type, "could not build")
    try:
        base = build(model_type)
        verdict.kind = attention_kind(base.config)
        ids = prompt(base)
        expected_tokens = greedy(base, ids)
        full_cache = prefill(base, ids)
        if full_cache is None and verdict.kind == "softmax":
            verdict.kind = "no KV cache"  # the model recomputes attention over the whole sequence each step
    except Exception as error:  # noqa: BLE001 - anything here is a transformers/config problem
        verdict.detail = _one_line(error)
        verdict.seconds = time.perf_counter() - start
        return verdict
    try:
        if transform == "select":
            verdict.status, verdict.detail = _run_selection_checks(base, ids)
        else:
            verdict.status, verdict.detail = _run_checks(base, ids, expected_tokens, full_cache)
    except KVPassError as error:
        verdict.status, verdict.detail = "refused", _one_line(error)
    except Exception as error:  # noqa: BLE001 - a crash is what the matrix reports
        verdict.status, verdict.detail = "crashed", _one_line(error) + " @ " + _where(error)
    verdict.seconds = time.perf_counter() - start
    return verdict


def _run_checks(base, ids, expected_tokens, full_cache) -> tuple[str, str]:
    import kvpass

    model = kvpass.optimize(copy.deepcopy(base), budget=1.0)
    report = model.kvpass_sites  # what find_attention found (optimize calls it)
    expected = expected_geometry(base.config, full_cache)
    found = [(s.num_heads, s.num_kv_heads, s.head_dim) for s in report]
    if found != expected:
        return "wrong", f"find_attention (heads, KV heads, head dim): {found}, the config says {expected}"
    tokens = greedy(model, ids)
    if not torch.equal(tokens, expected_tokens):
        return "wrong", f"budget=1.0 changed greedy tokens: {tokens[0, ids.shape[1]:].tolist()} vs " \
                        f"{expected_tokens[0, ids.shape[1]:].tolist()}"
    model = kvpass.optimize(model, budget=0.5)  # re-planned from the same sites
    pruned_bytes, full_bytes = kvpass.cache_bytes(prefill(model, ids)), kvpass.cache_bytes(full_cache)
    if pruned_bytes > 0.5 * full_bytes:
        return "wrong", f"budget=0.5 kept {pruned_bytes} of {full_bytes} cache bytes"
    greedy(model, ids)
    mismatch = masked_full_oracle_mismatch(base, model, ids)
    if mismatch:
        return "wrong", mismatch
    return "ok", f"{len(report)} sites, cache x{pruned_bytes / full_bytes:.3f}"


def _run_selection_checks(base, ids) -> tuple[str, str]:
    import kvpass

    keep = ids.shape[1] // 2
    model = kvpass.optimize(copy.deepcopy(base), budget=1.0, transforms=[
        kvpass.Evict("snapkv"), kvpass.SelectLayer(layer=0, keep=keep, window=SELECTION_WINDOW)])
    mismatch = selection_oracle_mismatch(base, model, ids, 0)
    if mismatch:
        return "wrong", mismatch
    greedy(model, ids)
    return "ok", f"layer 0 selected {keep} of {ids.shape[1]} tokens, equal to the masked-key oracle"


# --- the masked-full oracle ------------------------------------------------------------------------

ORACLE = "kvpass_coverage_oracle"
SELECTION_ORACLE = "kvpass_selection_oracle"


def masked_full_oracle_mismatch(base, pruned, ids, steps: int = DECODE_STEPS, atol: float = 1e-4) -> str:
    """'' if `steps` greedy decode steps of `pruned` after prefilling `ids` give the logits of `base`
    with, at every layer, the keys the pruned cache evicted masked out; else what differed.

    The oracle wraps the base model's attention function: each call gets an extra mask built from the
    logical slots the pruned model's cache layer holds for that layer (per KV head). Modules of `base` that
    compute attention themselves get kvpass's interface adapter for it (their own code still runs under the
    model's own implementation)."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    from kvpass import hf_attention
    from kvpass.runtime.interface_adapter import adapt_self_computing

    implementation, original = _attention_function(base)
    adapt_self_computing(base, pruned.kvpass_sites)
    visible: dict[int, torch.Tensor] = {}
    tiled = {base.get_submodule(site.name).layer_idx for site in pruned.kvpass_sites if site.kv_tiled}

    def oracle(module, query, key, value, attention_mask, *args, **kwargs):
        extra = visible.get(module.layer_idx)
        if extra is not None:
            keep = extra[..., -key.shape[-2]:]  # the base cache holds the last keys (sliding layers fewer)
            group = query.shape[1] // keep.shape[1]  # query heads per KV head, in the model's own order
            keep = (keep.repeat(1, group, 1) if module.layer_idx in tiled else keep.repeat_interleave(group, dim=1))
            attention_mask = _hide_keys(attention_mask, keep[:, :, None, :], query.shape[-2], implementation,
                                        query.dtype)
        return original(module, query, key, value, attention_mask, *args, **kwargs)

    hf_attention.register(ORACLE, oracle, masks=ALL_MASK_ATTENTION_FUNCTIONS[implementation])
    with torch.no_grad():
        full_cache, pruned_cache = prefill(base, ids), prefill(pruned, ids)
        token, seen = ids[:, -1:] * 0 + 5, ids.shape[1]
        previous = hf_attention.set_attn_implementation(base, ORACLE)
        try:
            for step in range(steps):
                visible.clear()
                self_attention = getattr(pruned_cache, "self_attention_cache", pruned_cache)  # encoder-decoder
                for index, layer in enumerate(getattr(self_attention, "layers", [])):
                    site_cache = getattr(layer, "site_cache", None)
                    if site_cache is not None and site_cache.slots is not None:
                        keep = torch.zeros(*site_cache.slots.shape[:2], seen + 1, dtype=torch.bool)
                        keep.scatter_(-1, site_cache.slots.long().clamp(min=0), True)
                        keep[..., seen] = True
                        visible[index] = keep
                if not any(hasattr(layer, "site_cache") for layer in getattr(self_attention, "layers", [])):
                    return f"decode step {step}: the pruned model's cache holds no kvpass layer to compare"
                got = pruned(token, **cache_argument(pruned, pruned_cache), use_cache=True).logits[:, -1]
                want = base(token, **cache_argument(base, full_cache), use_cache=True).logits[:, -1]
                if not torch.allclose(got, want, atol=atol, rtol=1e-4):
                    return f"decode step {step}: logits differ from the masked-full oracle by " \
                           f"{(got - want).abs().max().item():.2e}"
                token, seen = got.argmax(-1, keepdim=True), seen + 1
        finally:
            hf_attention.set_attn_implementation(base, previous)
    return ""


def _attention_function(base: torch.nn.Module):
    """(implementation name, the attention function `base` dispatches to) for an oracle to wrap."""
    from transformers import AttentionInterface

    implementation = base.config._attn_implementation
    original = AttentionInterface._global_mapping.get(implementation)
    if original is None:  # eager: each modeling file has its own eager function (or none: its modules compute
        # attention themselves, and the adapter kvpass gives them reaches the interface's SDPA)
        module = next((m for m in base.modules() if hasattr(m, "layer_idx") and hasattr(m, "config")), None)
        original = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None) if module else None
        original = original or AttentionInterface._global_mapping["sdpa"]
    return implementation, original


def _hide_keys(attention_mask, keep: torch.Tensor, queries: int, implementation: str, dtype: torch.dtype):
    """The model's attention mask (None, bool or additive) over the last `queries` of T tokens, with the keys
    where `keep` [B, H, 1, T] is False hidden. None means causal (SDPA's is_causal), so causality is added."""
    length = keep.shape[-1]
    if attention_mask is None:
        keep = keep & torch.ones(queries, length, dtype=torch.bool).tril(length - queries)
        return keep if implementation != "eager" else torch.zeros(keep.shape).masked_fill(~keep, torch.finfo(dtype).min)
    if attention_mask.dtype == torch.bool:
        return attention_mask[..., :length] & keep
    return attention_mask[..., :length].masked_fill(~keep, torch.finfo(dtype).min)


def selection_oracle_logits(base: torch.nn.Module, ids: torch.Tensor, after: int, indices: torch.Tensor,
                            prompt_length: int) -> torch.Tensor:
    """Logits of `base` on `ids` when the attention of every layer after `after` hides the prompt tokens
    (the first `prompt_length`) that are not in `indices` [B, K]: what `kvpass.SelectLayer` selecting
    `indices` at layer `after` must compute for the kept tokens and the tokens decoded after the prompt."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    from kvpass import hf_attention

    implementation, original = _attention_function(base)
    visible = torch.zeros(ids.shape, dtype=torch.bool)
    visible[torch.arange(ids.shape[0])[:, None], indices] = True
    visible[:, prompt_length:] = True

    def oracle(module, query, key, value, attention_mask, *args, **kwargs):
        if module.layer_idx > after:
            keep = visible[:, None, None, :key.shape[-2]].expand(-1, query.shape[1], -1, -1)
            attention_mask = _hide_keys(attention_mask, keep, query.shape[-2], implementation, query.dtype)
        return original(module, query, key, value, attention_mask, *args, **kwargs)

    hf_attention.register(SELECTION_ORACLE, oracle, masks=ALL_MASK_ATTENTION_FUNCTIONS[implementation])
    previous = hf_attention.set_attn_implementation(base, SELECTION_ORACLE)
    try:
        with torch.no_grad():
            return base(ids).logits
    finally:
        hf_attention.set_attn_implementation(base, previous)


def selection_oracle_mismatch(base: torch.nn.Module, selecting: torch.nn.Module, ids: torch.Tensor, layer: int,
                              atol: float = 1e-4) -> str:
    """'' if `selecting` (optimized with `kvpass.SelectLayer(layer=layer)`) gives, for the prompt `ids`,
    the logits of `selection_oracle_logits` on the tokens it kept and on one decode step after; else what differed."""
    from transformers import DynamicCache

    from kvpass.runtime.hf_selection import SELECTION_ATTRIBUTE

    cache = DynamicCache(config=base.config)
    with torch.no_grad():
        logits = selecting(ids, **cache_argument(selecting, cache), use_cache=True).logits
        state = getattr(cache, SELECTION_ATTRIBUTE, None)
        if state is None or state.indices is None:
            return "the prefill selected no tokens"
        token = logits[:, -1].argmax(-1, keepdim=True)
        step = selecting(token, **cache_argument(selecting, cache), use_cache=True).logits[:, -1]
    length = ids.shape[1]
    oracle = selection_oracle_logits(base, torch.cat([ids, token], dim=1), layer, state.indices, length)
    kept = torch.gather(oracle[:, :length], 1, state.indices[..., None].expand(-1, -1, oracle.shape[-1]))
    for what, got, want in (("prefill (kept tokens)", logits, kept), ("decode step", step, oracle[:, -1])):
        if got.shape != want.shape or not torch.allclose(got, want, atol=atol, rtol=1e-4):
            difference = (got - want).abs().max().item() if got.shape == want.shape else f"shape {tuple(got.shape)}"
            return f"{what}: logits differ from the masked-key oracle by {difference}"
    return ""


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:400]}"


def _where(error: BaseException) -> str:
    frames = traceback.extract_tb(error.__traceback__)
    return f"{frames[-1].filename.split('site-packages/')[-1]}:{frames[-1].lineno}" if frames else "?"
