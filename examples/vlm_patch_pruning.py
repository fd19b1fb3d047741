"""Prune image tokens of a vision-language model before its language model, under one KV byte cap.

    python examples/vlm_patch_pruning.py [--keep 0.25] [--method dominant] [--budget 0.3]

Builds a tiny LLaVA (CLIP vision tower, Llama text model, random weights: nothing is downloaded),
feeds it one 336-pixel image (576 image tokens) and a short prompt, and compares the unmodified
model with the same model after `kvpass.optimize(..., transforms=[kvpass.PrunePatches(...),
kvpass.Evict()])`: the image tokens that reach the language model, the language model's
sequence and the KV-cache bytes. Random weights generate meaningless tokens: the point is the
mechanics (a real LLaVA or SmolVLM checkpoint is optimized the same way).
"""

from __future__ import annotations

import argparse
import copy

import torch
import transformers

import kvpass
from kvpass.runtime.call_arguments import output_cache

IMAGE_TOKEN = 511


def tiny_llava() -> transformers.LlavaForConditionalGeneration:
    vision = transformers.CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                           num_attention_heads=4, image_size=336, patch_size=14)
    text = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                                    num_key_value_heads=2, vocab_size=512, pad_token_id=0)
    config = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN)
    return transformers.LlavaForConditionalGeneration(config).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=float, default=0.25, help="fraction of image tokens that stay")
    parser.add_argument("--method", default="dominant", choices=["similarity", "dominant", "fastv"])
    parser.add_argument("--budget", type=float, default=0.3, help="KV bytes cap relative to the unmodified model")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = tiny_llava()
    # What a processor returns: 576 image tokens (24 x 24 patches of 14 pixels) between the prompt's words.
    image_tokens = (336 // 14) ** 2
    prompt = torch.cat([torch.tensor([5, 17, 33]), torch.full((image_tokens,), IMAGE_TOKEN), torch.tensor([40, 41, 42])])
    inputs = {"input_ids": prompt[None], "attention_mask": torch.ones(1, prompt.numel(), dtype=torch.long),
              "pixel_values": torch.randn(1, 3, 336, 336)}

    pruned = kvpass.optimize(copy.deepcopy(model), budget=args.budget, example_inputs=inputs,
                             transforms=[kvpass.PrunePatches(args.keep, method=args.method), kvpass.Evict()])
    print(pruned.kvpass_sites)

    with torch.no_grad():
        full = model.generate(**inputs, max_new_tokens=8, do_sample=False, return_dict_in_generate=True)
        out = pruned.generate(**inputs, max_new_tokens=8, do_sample=False)
    figures = kvpass.stats(pruned)
    patches = figures["PrunePatches"]
    print(f"image tokens: {patches['image_tokens_in']} in, {patches['image_tokens_out']} reach the language model")
    print(f"language model sequence: {patches['lm_sequence_length']} tokens instead of {patches['sequence_length']}")
    print(f"KV cache: {figures['kv_bytes']} bytes, unmodified model {kvpass.cache_bytes(output_cache(full))} "
          f"(x{figures['kv_bytes'] / figures['full_kv_bytes']:.3f}, budget {args.budget})")
    print("new tokens:", out[0, prompt.numel():].tolist())


if __name__ == "__main__":
    main()
