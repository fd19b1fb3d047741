"""Patch pruning (`kvpass.PrunePatches`): language-model prefill time and KV bytes against the unpruned model.

Two vision-language models, CPU, one process (every ratio is against the unpruned model of the
same run; the configurations take turns, one prefill each, and the medians are reported):

* `clip`: a LLaVA-style model with a 336-pixel CLIP-style tower (patch 14: 576 image tokens) and
  a SmolLM2-135M-sized Llama text model, random weights; every method at keep 0.5, 0.25, 0.1.
  Also times the vision encoder (for `dominant` and `similarity` it includes tracing patches to
  tokens) and the choice of tokens.
* `smolvlm`: an Idefics3 (SmolVLM) model whose text model carries the real SmolLM2-135M-Instruct
  weights (copied in) and whose small vision tower is random; 576 and 1,024 image tokens (9 and
  16 tiles of 64 tokens).

The image is synthetic and structured (a flat background with a few textured rectangles), so
`similarity` finds duplicates and keeps fewer tokens than its bound. Random weights make output
quality meaningless: no quality figure is reported. "kvpass, nothing pruned" runs the language
model through kvpass's cache with every token kept (the cost of the runtime itself).

Run: HF_HUB_OFFLINE=1 python benchmarks/vision.py [--part clip smolvlm] [--repeats 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import transformers

import kvpass
from kvpass.eval.models import load_smollm2
from kvpass.runtime.call_arguments import cache_argument

KEEPS = (0.5, 0.25, 0.1)
METHODS = ("similarity", "dominant", "fastv")


def structured_image(size: int, seed: int = 0) -> torch.Tensor:
    """[3, size, size]: a flat background and four textured rectangles (a quarter of the area)."""
    generator = torch.Generator().manual_seed(seed)
    image = torch.tensor([0.3, -0.2, 0.6])[:, None, None].repeat(1, size, size)
    for top, left in ((0.1, 0.1), (0.1, 0.6), (0.6, 0.15), (0.55, 0.6)):
        y, x, side = int(top * size), int(left * size), size // 4
        image[:, y:y + side, x:x + side] = torch.randn(3, side, side, generator=generator)
    return image


class Timer:
    """Times the vision encoding, the choice of tokens and the language model's forward of each call,
    with hooks around PrunePatches' own (registered first / prepended, or last)."""

    def __init__(self, model: torch.nn.Module, boundary) -> None:
        self.marks: dict[str, float] = {}
        encoder, language = model.get_submodule(boundary.vision_encoder), model.get_submodule(boundary.language_model)
        features = model.get_submodule(boundary.feature_module)
        mark = lambda name: (lambda *args, **kwargs: self.marks.__setitem__(name, time.perf_counter()))  # noqa: E731
        encoder.register_forward_pre_hook(mark("vision"), prepend=True)
        features.register_forward_hook(mark("vision_end"))
        language.register_forward_pre_hook(mark("choice"), prepend=True)
        language.register_forward_pre_hook(mark("language"))
        language.register_forward_hook(mark("language_end"))

    def spans(self) -> dict[str, float]:
        m = self.marks
        return {"vision_ms": (m["vision_end"] - m["vision"]) * 1e3, "choice_ms": (m["language"] - m["choice"]) * 1e3,
                "lm_ms": (m["language_end"] - m["language"]) * 1e3}


def prefill(model: torch.nn.Module, inputs: dict, timer: Timer) -> dict[str, float]:
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(**inputs, **cache_argument(model, cache), use_cache=True)
    figures = timer.spans()
    figures["kv_bytes"] = kvpass.cache_bytes(cache)
    patches = getattr(cache, "_kvpass_patches", None)
    figures["kept"] = patches.image_tokens_out if patches is not None else None
    return figures


def compare(base: torch.nn.Module, inputs: dict, configs: dict[str, list], repeats: int, title: str) -> list[str]:
    """Prefill every configuration `repeats` times in turns; one table row per configuration."""
    report = kvpass.find_attention(base, **inputs)
    models = {"unpruned": base}
    for label, transforms in configs.items():
        model = copy.deepcopy(base)
        model.kvpass_sites = report
        models[label] = kvpass.optimize(model, budget=1.0, transforms=transforms)
    timers = {label: Timer(model, report.vision) for label, model in models.items()}
    runs: dict[str, list[dict]] = {label: [] for label in models}
    for label, model in models.items():  # warm-up
        prefill(model, inputs, timers[label])
    for _ in range(repeats):
        for label, model in models.items():
            runs[label].append(prefill(model, inputs, timers[label]))
    median = {label: {key: statistics.median(r[key] for r in rows) if rows[0][key] is not None else None
                      for key in rows[0]} for label, rows in runs.items()}
    full = median["unpruned"]
    image = int((inputs["input_ids"] == report.vision.image_token_ids[0]).sum())
    lines = [f"### {title}: {image} image tokens, {inputs['input_ids'].shape[1]} prompt tokens",
             "| configuration | image tokens kept | vision encoder ms | choice ms | LM prefill ms | x unpruned | "
             "KV bytes | x unpruned |", "|---|---|---|---|---|---|---|---|"]
    for label, row in median.items():
        kept = image if row["kept"] is None else row["kept"]
        lines.append(f"| {label} | {kept} | {row['vision_ms']:.0f} | {row['choice_ms']:.1f} | {row['lm_ms']:.0f} | "
                     f"x{row['lm_ms'] / full['lm_ms']:.3f} | {row['kv_bytes']} | x{row['kv_bytes'] / full['kv_bytes']:.3f} |")
    return lines


def clip_model() -> transformers.LlavaForConditionalGeneration:
    vision = transformers.CLIPVisionConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                                           num_attention_heads=4, image_size=336, patch_size=14)
    text = transformers.LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                    num_attention_heads=9, num_key_value_heads=3, vocab_size=49152, pad_token_id=2)
    config = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_id=49151)
    torch.manual_seed(0)
    return transformers.LlavaForConditionalGeneration(config).eval()


def smolvlm_model() -> tuple[transformers.Idefics3ForConditionalGeneration, object]:
    """Idefics3 whose text model is SmolLM2-135M-Instruct (real weights) behind a small random SigLIP-style tower."""
    language, tokenizer = load_smollm2()
    vision = dict(hidden_size=192, intermediate_size=768, num_hidden_layers=4, num_attention_heads=3, image_size=256,
                  patch_size=16)
    text = {key: value for key, value in language.config.to_dict().items() if key != "quantization_config"}
    config = transformers.Idefics3Config(vision_config=vision, text_config=text,
                                         image_token_id=49151, scale_factor=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = transformers.Idefics3ForConditionalGeneration(config).eval()
    model.model.text_model.load_state_dict(language.model.state_dict())
    model.lm_head.weight = model.model.text_model.embed_tokens.weight
    return model, tokenizer


def prompt(tokenizer, image_token: int, tiles: int, per_tile: int) -> torch.Tensor:
    """A chat prompt with `tiles` runs of image tokens, one per tile, each behind a newline token."""
    head = tokenizer("<|im_start|>user\n").input_ids
    tail = tokenizer("Describe the image.<|im_end|>\n<|im_start|>assistant\n").input_ids
    newline = tokenizer("\n").input_ids
    tokens = list(head)
    for _ in range(tiles):
        tokens += newline + [image_token] * per_tile
    return torch.tensor([tokens + tail])


def run_clip(repeats: int) -> list[str]:
    model = clip_model()
    ids = torch.cat([torch.tensor([1, 4093, 198]), torch.full((576,), 49151), torch.tensor([37964, 451, 2443, 30])])
    inputs = {"input_ids": ids[None], "attention_mask": torch.ones(1, ids.numel(), dtype=torch.long),
              "pixel_values": structured_image(336)[None]}
    configs = {"kvpass, nothing pruned": [kvpass.PrunePatches(10**6, method="fastv")]}
    for method in METHODS:
        for keep in KEEPS:
            configs[f"{method} {keep}"] = [kvpass.PrunePatches(keep, method=method)]
    return compare(model, inputs, configs, repeats, "LLaVA-style, 336-px CLIP-style tower, random weights")


def run_smolvlm(repeats: int) -> list[str]:
    model, tokenizer = smolvlm_model()
    lines = []
    for tiles in (9, 16):
        ids = prompt(tokenizer, 49151, tiles, 64)
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                  "pixel_values": torch.stack([structured_image(256, seed) for seed in range(tiles)])[None]}
        configs = {f"{method} {keep}": [kvpass.PrunePatches(keep, method=method)]
                   for method in METHODS for keep in (0.5, 0.25)}
        lines += compare(model, inputs, configs, repeats,
                         f"SmolVLM (Idefics3) with SmolLM2-135M-Instruct weights, {tiles} tiles") + [""]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", nargs="+", default=["clip", "smolvlm"], choices=["clip", "smolvlm"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {args.threads} thread(s), "
          f"median of {args.repeats} prefills")
    parts = {"clip": run_clip, "smolvlm": run_smolvlm}
    for part in args.part:
        print("\n".join(parts[part](args.repeats)), flush=True)


if __name__ == "__main__":
    main()
