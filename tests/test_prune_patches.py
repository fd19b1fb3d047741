"""PrunePatches on three vision-language families (LLaVA/CLIP, Qwen2-VL, Idefics3/SmolVLM), tiny random weights.

Each family's graph is captured once (`report`); the models under test are copies of one base model
that reuse it (`model.kvpass_sites`), so a test optimizes in milliseconds instead of re-capturing.
What is pinned: the identity setting, exact token counts read off the language model's cache, two
exact oracles (tokens dropped before the language model, or at FastV's layer K, equal the unmodified
model with those tokens masked as keys from that layer on), similarity on synthetic images, the byte
cap when composed with `Evict`, and bad input.
"""

from __future__ import annotations

import copy
import functools
import re
import runpy
import sys
from pathlib import Path

import pytest
import torch
import transformers
from transformers import DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward

import kvpass
from kvpass.errors import UnsupportedModelError
from kvpass.hf_attention import attention_implementation
from kvpass.runtime.call_arguments import cache_argument, output_cache

VOCAB = 128
IMAGE = VOCAB - 1
FAMILIES = ("llava", "qwen2vl", "idefics3")
TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=VOCAB, pad_token_id=0)
IMAGE_SIZE, PATCH = 32, 4


def build(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if family == "llava":
        vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                               num_attention_heads=4, image_size=IMAGE_SIZE, patch_size=PATCH)
        config = transformers.LlavaConfig(vision_config=vision, text_config=transformers.LlamaConfig(**TEXT),
                                          image_token_id=IMAGE)
        return transformers.LlavaForConditionalGeneration(config).eval()
    if family == "qwen2vl":
        vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=4, mlp_ratio=2, patch_size=PATCH,
                      spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
        text = dict(TEXT, rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1e4})
        config = transformers.Qwen2VLConfig(vision_config=vision, text_config=text, image_token_id=IMAGE,
                                            video_token_id=IMAGE - 1, vision_start_token_id=IMAGE - 2,
                                            vision_end_token_id=IMAGE - 3, bos_token_id=1, eos_token_id=2)
        return transformers.Qwen2VLForConditionalGeneration(config).eval()
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  image_size=IMAGE_SIZE, patch_size=PATCH)
    config = transformers.Idefics3Config(vision_config=vision, text_config=TEXT, image_token_id=IMAGE, scale_factor=2)
    return transformers.Idefics3ForConditionalGeneration(config).eval()


def picture(kind: str, seed: int = 0) -> torch.Tensor:
    """[3, H, W]: one flat colour, random texture, or flat top half over a textured bottom half."""
    flat = torch.tensor([0.5, -0.25, 0.75])[:, None, None].expand(3, IMAGE_SIZE, IMAGE_SIZE).clone()
    noise = torch.randn(3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(seed))
    if kind == "flat":
        return flat
    if kind == "noise":
        return noise
    return torch.cat([flat[:, :IMAGE_SIZE // 2], noise[:, IMAGE_SIZE // 2:]], dim=1)


def image_tokens(family: str) -> int:
    per_side = IMAGE_SIZE // PATCH
    return per_side ** 2 if family == "llava" else (per_side // 2) ** 2


def inputs(family: str, pictures: list[torch.Tensor] | None = None, seed: int = 1, text: tuple[int, int] = (5, 6)):
    """A batch (one row per picture) of `text[0]` tokens, one image's tokens, `text[1]` tokens."""
    pictures = pictures if pictures is not None else [picture("noise", seed)]
    generator = torch.Generator().manual_seed(seed)
    rows = [torch.cat([torch.randint(3, IMAGE - 4, (text[0],), generator=generator),
                       torch.full((image_tokens(family),), IMAGE),
                       torch.randint(3, IMAGE - 4, (text[1],), generator=generator)]) for _ in pictures]
    ids = torch.stack(rows)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if family == "llava":
        return {**batch, "pixel_values": torch.stack(pictures)}
    if family == "idefics3":
        return {**batch, "pixel_values": torch.stack(pictures)[:, None]}
    grid = IMAGE_SIZE // PATCH
    return {**batch, "pixel_values": torch.cat([qwen_patches(p) for p in pictures]),
            "image_grid_thw": torch.tensor([[1, grid, grid]] * len(pictures)), "mm_token_type_ids": (ids == IMAGE).int()}


def qwen_patches(image: torch.Tensor, merge: int = 2, temporal: int = 2) -> torch.Tensor:
    """Qwen2-VL's patch layout (its image processor's): merge-window-major rows of (C, T, P, P) values."""
    grid = IMAGE_SIZE // PATCH
    frames = image[None].expand(temporal, *image.shape)
    patches = frames.reshape(1, temporal, 3, grid // merge, merge, PATCH, grid // merge, merge, PATCH)
    patches = patches.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return patches.reshape(grid * grid, 3 * temporal * PATCH * PATCH)


@functools.cache
def base_and_report(family: str):
    model = build(family)
    return model, kvpass.find_attention(model, **inputs(family))


def optimized(family: str, *transforms, budget: float = 1.0):
    base, report = base_and_report(family)
    model = copy.deepcopy(base)
    model.kvpass_sites = report  # reuse the captured graph's sites and boundary
    return kvpass.optimize(model, budget=budget, transforms=list(transforms))


def greedy(model, batch: dict, steps: int = 4):
    out = model.generate(**batch, max_new_tokens=steps, min_new_tokens=steps, do_sample=False, output_logits=True,
                         return_dict_in_generate=True, pad_token_id=0)
    return out.sequences, torch.stack(out.logits)


@functools.cache
def unpruned_greedy(family: str):
    return greedy(base_and_report(family)[0], inputs(family))


def prefill(model, batch: dict):
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        logits = model(**batch, **cache_argument(model, cache), use_cache=True).logits
    return logits, cache


def dropped_positions(model, batch: dict) -> torch.Tensor:
    """[B, L] True at the image tokens the last call dropped (from its stats)."""
    kept = kvpass.stats(model)["PrunePatches"]["kept_image_positions"]
    dropped = batch["input_ids"] == IMAGE
    for row, positions in enumerate(kept):
        dropped[row, positions] = False
    return dropped


def masked_reference(family: str, dropped: torch.Tensor, from_layer: int):
    """The unmodified model with `dropped` tokens hidden as keys from language-model layer `from_layer` on."""
    base, report = base_and_report(family)
    language = {id(base.get_submodule(site.name)) for site in report}

    def attention(module, query, key, value, attention_mask, **kwargs):
        if id(module) in language and module.layer_idx >= from_layer:
            q_length, k_length = query.shape[-2], key.shape[-2]
            hidden = torch.nn.functional.pad(dropped, (0, k_length - dropped.shape[1]))  # generated tokens: visible
            visible = ~hidden[:, None, None, :]
            if attention_mask is None:
                causal = torch.ones(q_length, k_length, dtype=torch.bool).tril(k_length - q_length)
                attention_mask = visible & causal
            else:
                attention_mask = attention_mask & visible
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    return base, attention


# --- the boundary ------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_boundary_is_found_in_the_graph(family) -> None:
    _, report = base_and_report(family)
    boundary = report.vision
    assert boundary is not None, report.vision_note
    assert boundary.image_token_ids == (IMAGE,) and boundary.op == "masked_scatter"
    assert boundary.class_tokens == (1 if family == "llava" else 0)  # CLIP's [CLS]; SigLIP and Qwen2-VL have none
    assert [site.name for site in report] == [f"{layer}.{site.name.rsplit('.', 1)[1]}"
                                              for layer, site in zip(boundary.language_layers, report)]
    assert all(site.causal for site in report) and len(report) == 3
    # LLaVA reads the vision encoder's penultimate layer: its last attention before the features is layer 0 of 2
    assert boundary.scoring_site == boundary.encoder_sites[0 if family == "llava" else 1]


def test_models_without_a_boundary_are_refused() -> None:
    text_only = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TEXT)).eval()
    with pytest.raises(UnsupportedModelError, match="no place where vision features enter"):
        kvpass.optimize(text_only, budget=1.0, transforms=[kvpass.PrunePatches(0.5)])
    vision_language = build("llava")  # captured from text alone: the vision path is not in the graph
    with pytest.raises(UnsupportedModelError, match="capture a vision-language model with an image"):
        kvpass.optimize(vision_language, budget=1.0, transforms=[kvpass.PrunePatches(0.5)])


# --- identity and exact counts ------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["similarity", "dominant", "fastv"])
def test_keep_one_changes_nothing(family, method) -> None:
    base, _ = base_and_report(family)
    model = optimized(family, kvpass.PrunePatches(1.0, method=method))
    batch = inputs(family)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, base(**batch).logits)
    tokens, logits = greedy(model, batch)
    expected_tokens, expected_logits = unpruned_greedy(family)
    assert torch.equal(tokens, expected_tokens) and torch.equal(logits, expected_logits)
    figures = kvpass.stats(model)["PrunePatches"]
    assert figures["image_tokens_in"] == figures["image_tokens_out"] == image_tokens(family)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["dominant", "fastv"])
@pytest.mark.parametrize("keep", [0.25, 5])
def test_exactly_the_requested_image_tokens_reach_the_language_model(family, method, keep) -> None:
    model = optimized(family, kvpass.PrunePatches(keep, method=method))
    batch = inputs(family)
    total = image_tokens(family)
    kept = keep if isinstance(keep, int) else -(-total * keep // 1)
    text = batch["input_ids"].shape[1] - total
    _, cache = prefill(model, batch)
    lengths = [layer.keys.shape[-2] for layer in cache.layers]
    first_pruned = 2 if method == "fastv" else 0  # FastV's default layer K = 2: layers before it see every token
    assert lengths == [text + total] * first_pruned + [text + kept] * (3 - first_pruned)
    assert cache.get_seq_length() == text + total  # the logical length: positions continue after the prompt
    figures = kvpass.stats(model)["PrunePatches"]
    assert figures["image_tokens_in"] == total and figures["image_tokens_out"] == kept
    assert figures["lm_sequence_length"] == text + kept and figures["sequence_length"] == text + total


# --- exact oracles -------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method, from_layer", [("similarity", 0), ("dominant", 0), ("fastv", 2)])
def test_pruning_equals_masking_the_dropped_tokens(family, method, from_layer) -> None:
    """Tokens dropped before the language model (or at FastV's layer K) are exactly tokens hidden as keys
    from that layer on, with every kept token at its original (1-D or M-RoPE) position."""
    options = {"contextual": 0.0} if method == "dominant" else {}  # merged tokens have no masked equivalent
    model = optimized(family, kvpass.PrunePatches(0.5, method=method, **options))
    batch = inputs(family)
    tokens, logits = greedy(model, batch)
    dropped = dropped_positions(model, batch)
    assert int(dropped.sum()) == image_tokens(family) // 2
    reference, attention = masked_reference(family, dropped, from_layer)
    with attention_implementation(reference, "kvpass_test_masked", attention):
        expected_tokens, expected_logits = greedy(reference, batch)
    assert torch.equal(tokens, expected_tokens)
    torch.testing.assert_close(logits, expected_logits, rtol=0, atol=1e-5)


# --- similarity on synthetic images ----------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_similarity_on_synthetic_images(family) -> None:
    model = optimized(family, kvpass.PrunePatches(0.5, method="similarity", source="pixels"))
    total = image_tokens(family)

    def kept_positions(kind: str) -> list[int]:
        prefill(model, inputs(family, [picture(kind)]))
        return kvpass.stats(model)["PrunePatches"]["kept_image_positions"][0]

    assert len(kept_positions("flat")) == 1  # one colour: one group, the minimum
    assert len(kept_positions("noise")) == total // 2  # no duplicates: the bound
    half = kept_positions("half")
    first = 5  # the image starts after 5 text tokens; its top half is the flat one
    textured = [p for p in half if p >= first + total // 2]
    assert len(half) == total // 2 and len(textured) >= total // 2 - 1


@pytest.mark.parametrize("family", FAMILIES)
def test_similarity_of_features_is_an_upper_bound(family) -> None:
    model = optimized(family, kvpass.PrunePatches(0.25, method="similarity", source="features", merge=True))
    _, cache = prefill(model, inputs(family))
    figures = kvpass.stats(model)["PrunePatches"]
    assert 1 <= figures["image_tokens_out"] <= -(-image_tokens(family) // 4)
    assert cache.layers[0].keys.shape[-2] == figures["lm_sequence_length"]


# --- batches ----------------------------------------------------------------------------------------

def test_rows_that_keep_different_counts_are_padded_and_match_one_row_at_a_time() -> None:
    """A flat and a textured image keep 1 and 32 tokens; the second row is also left-padded by the
    caller (a shorter prompt). Each row generates what it generates alone, unpadded."""
    family = "llava"
    model = optimized(family, kvpass.PrunePatches(0.5, method="similarity"))
    pictures = [picture("flat"), picture("noise")]
    rows = [inputs(family, [pictures[0]], seed=1), inputs(family, [pictures[1]], seed=2, text=(2, 6))]
    width = rows[0]["input_ids"].shape[1]
    pad = lambda tensor: torch.nn.functional.pad(tensor, (width - tensor.shape[1], 0))  # noqa: E731
    batch = {"input_ids": torch.cat([rows[0]["input_ids"], pad(rows[1]["input_ids"])]),
             "attention_mask": torch.cat([rows[0]["attention_mask"], pad(rows[1]["attention_mask"])]),
             "pixel_values": torch.stack(pictures)}
    tokens, logits = greedy(model, batch)
    assert [len(row) for row in kvpass.stats(model)["PrunePatches"]["kept_image_positions"]] == [1, 32]
    for row, single in enumerate(rows):
        row_tokens, row_logits = greedy(model, single)
        assert torch.equal(tokens[row, -4:], row_tokens[0, -4:])
        torch.testing.assert_close(logits[:, row], row_logits[:, 0], rtol=0, atol=1e-5)


# --- composition with eviction -----------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["dominant", "fastv"])
def test_composed_with_evict_the_byte_cap_holds(family, method) -> None:
    budget = 0.3
    base, _ = base_and_report(family)
    model = optimized(family, kvpass.PrunePatches(0.5, method=method), kvpass.Evict(sinks=2, recent=4), budget=budget)
    batch = inputs(family)
    for steps in (1, 8):
        model.generate(**batch, max_new_tokens=steps, min_new_tokens=steps, do_sample=False, pad_token_id=0)
        figures = kvpass.stats(model)
        out = base.generate(**batch, max_new_tokens=steps, min_new_tokens=steps, do_sample=False, pad_token_id=0,
                            return_dict_in_generate=True)
        full = kvpass.cache_bytes(output_cache(out))  # the unmodified model on the same input
        assert figures["full_kv_bytes"] == full
        assert figures["kv_bytes"] <= budget * full
        assert figures["PrunePatches"]["image_tokens_out"] == image_tokens(family) // 2


def test_without_eviction_a_budget_below_one_is_refused() -> None:
    base, report = base_and_report("llava")
    model = copy.deepcopy(base)
    model.kvpass_sites = report
    with pytest.raises(ValueError, match="add kvpass.Evict"):
        kvpass.optimize(model, budget=0.5, transforms=[kvpass.PrunePatches(0.25)])


# --- bad input -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("keep", [0, 0.0, 1.5, -0.2, True, "half", float("nan"), -3])
def test_keep_outside_its_range_is_refused(keep) -> None:
    with pytest.raises(ValueError, match="keep must be a fraction in"):
        kvpass.PrunePatches(keep)


def test_options_of_other_methods_and_bad_layers_are_refused() -> None:
    with pytest.raises(ValueError, match=r"\['source'\] do not apply to method='fastv'"):
        kvpass.PrunePatches(0.5, method="fastv", source="features")
    with pytest.raises(ValueError, match="method must be one of"):
        kvpass.PrunePatches(0.5, method="visionzip")
    with pytest.raises(ValueError, match="layer must be an int >= 1"):
        kvpass.PrunePatches(0.5, method="fastv", layer=0)
    base, report = base_and_report("llava")
    model = copy.deepcopy(base)
    model.kvpass_sites = report
    with pytest.raises(ValueError, match="layer=3 must be below the language model's 3 decoder layers"):
        kvpass.optimize(model, budget=1.0, transforms=[kvpass.PrunePatches(0.5, method="fastv", layer=3)])


@pytest.mark.parametrize("family", FAMILIES)
def test_text_only_input_runs_unchanged_and_says_so(family) -> None:
    base, _ = base_and_report(family)
    model = optimized(family, kvpass.PrunePatches(0.25, method="dominant"))
    ids = torch.randint(3, IMAGE - 4, (1, 12), generator=torch.Generator().manual_seed(3))
    ids[0, 4] = IMAGE  # an image-token id with no image: it received no features, so it is text
    tokens, logits = greedy(model, {"input_ids": ids})
    expected_tokens, expected_logits = greedy(base, {"input_ids": ids})
    assert torch.equal(tokens, expected_tokens)
    torch.testing.assert_close(logits, expected_logits, rtol=0, atol=1e-5)
    figures = kvpass.stats(model)["PrunePatches"]
    assert figures["image_tokens_in"] == 0 and "nothing was pruned" in figures["note"]
    assert figures["lm_sequence_length"] == figures["sequence_length"] == 12 + 3


# --- the example ------------------------------------------------------------------------------------------

def test_example_runs_as_written(monkeypatch, capsys) -> None:
    example = Path(__file__).resolve().parents[1] / "examples" / "vlm_patch_pruning.py"
    monkeypatch.setattr(sys, "argv", [str(example)])
    runpy.run_path(str(example), run_name="__main__")
    out = capsys.readouterr().out
    assert "image tokens: 576 in, 144 reach the language model" in out
    ratio = float(re.search(r"\(x([0-9.]+), budget 0.3\)", out).group(1))
    assert ratio <= 0.3


def test_evict_alone_leaves_the_vision_encoder_to_its_own_attention() -> None:
    """A vision-language model captured from text only (no boundary) still takes Evict: only the language
    model's attention is routed through kvpass, so images still encode."""
    base, _ = base_and_report("llava")
    model = kvpass.optimize(copy.deepcopy(base), budget=0.5)
    batch = inputs("llava")
    model.generate(**batch, max_new_tokens=2, do_sample=False, pad_token_id=0)
    figures = kvpass.stats(model)
    assert figures["kv_bytes"] <= 0.5 * figures["full_kv_bytes"]
    assert model.config.vision_config._attn_implementation == base.config.vision_config._attn_implementation


def test_a_plan_records_and_restores_the_transform() -> None:
    transform = kvpass.PrunePatches(12, method="dominant", contextual=0.25)
    assert kvpass.transforms.from_record(transform.record()) == transform
