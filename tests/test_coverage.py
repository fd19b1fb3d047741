"""A representative slice of the coverage matrix (`benchmarks/coverage.py`): tiny random models of
transformers' causal LM families, each built from its own config class and checked end to end by
`kvpass.eval.coverage.check` (geometry, budget 1.0 tokens, budget 0.5 bytes, generate, and decoding
against the masked-full oracle), or refused with the reason named."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("transformers")

from kvpass.eval.coverage import check, tiny_config  # noqa: E402

SUPPORTED = [
    "llama",        # GQA, SDPA
    "gpt2",         # Conv1D projections, fused QKV, eager attention
    "gpt_neox",     # partial rotary
    "opt",          # learned absolute positions
    "gpt_bigcode",  # multi-query attention
    "qwen2_moe",    # mixture of experts, a sliding_window value with full-attention layers only
    "gemma2",       # logit soft-capping, sliding + full layers
    "cohere2",      # 3 sliding layers per full one
    "jetmoe",       # routed queries (mixture of attention heads), KV heads repeated whole rather than grouped
    "roc_bert",     # a BERT decoder with an encoder-decoder cache: the oracle reads its self-attention part
    # modules that compute attention themselves, outside transformers' attention interface:
    "bloom",        # ALiBi through baddbmm, batch and heads folded into one dimension
    "codegen",      # no **kwargs; its causal mask is a buffer sliced by the cache's length
    "falcon",       # multi-query, logits scaled in place (`scores /= sqrt(d)`), an SDPA branch it leaves
    "bigbird_pegasus",  # decoder attention flagged is_causal=False, masked causally by its model (eager)
]
# Mistral (every layer sliding), Gemma 3 (5 sliding per full) and GPT-OSS (sink logits, alternating
# layers) are built from their configs in tests/test_failure_classes.py.
REFUSED = {
    "prophetnet": "does not give [batch, heads, q, k] scores",  # n-gram streams: a 5-d score einsum
    "diffllama": "several attentions per forward",    # differential attention: two per layer
    "mamba": "recurrent state",                       # state-space
    "qwen3_next": "recurrent state",                  # linear attention beside full attention
    "deepseek_v3": "latent attention",                # MLA
}


@pytest.mark.parametrize("model_type", SUPPORTED)
def test_supported_family(model_type: str) -> None:
    verdict = check(model_type)
    assert (verdict.status, verdict.kind) == ("ok", "softmax"), verdict.detail


@pytest.mark.parametrize(("model_type", "reason"), sorted(REFUSED.items()))
def test_refused_family_names_why(model_type: str, reason: str) -> None:
    verdict = check(model_type)
    assert verdict.status == "refused" and reason in verdict.detail, verdict.detail


def test_tiny_configs_take_one_period_of_the_layer_pattern_and_short_windows() -> None:
    config = tiny_config("gemma3_text")
    assert config.layer_types == ["sliding_attention"] * 5 + ["full_attention"]
    assert (config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.sliding_window,
            config.vocab_size) == (64, 4, 2, 8, 128)


def test_per_layer_settings_keyed_by_layer_index_move_onto_the_tiny_layers() -> None:
    """Gemma 4 keys its global layers' head size by layer index (5, 11, ... of 30; twice the others'): in
    one period of six layers they are layer 5, still twice the tiny head size."""
    text = tiny_config("gemma4").get_text_config()
    assert text.layer_types[5] == "full_attention" and len(text.layer_types) == 6
    assert [text.per_layer_config[i].head_dim for i in range(6)] == [16] * 5 + [32]
