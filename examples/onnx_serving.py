"""Export a pruned model to ONNX and serve it with onnxruntime.

    python examples/onnx_serving.py                  # SmolLM2-135M-Instruct, written to smollm2.pruned.onnx
    python examples/onnx_serving.py --tiny --out /tmp/tiny.onnx

`kvpass.export_onnx` exports one decode step (input ids, attention mask, positions and the cache in; logits and the
compacted cache out) whose eviction uses standard ONNX ops only, so any execution provider runs
it. `kvpass.onnx.Generator` feeds it the keep counts the torch runtime would use, so onnxruntime
keeps the same tokens as torch and generates the same text.
"""

from __future__ import annotations

import argparse
import copy

import numpy as np
import torch

import kvpass
import kvpass.onnx
from hf_generate import load


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=0.5)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--out", default="smollm2.pruned.onnx", help="where to write the ONNX model")
    parser.add_argument("--tiny", action="store_true", help="a tiny random model instead of SmolLM2")
    args = parser.parse_args(argv)

    base, tokenizer, ids = load(args.tiny)
    model = kvpass.optimize(copy.deepcopy(base), budget=args.budget, method="knorm")
    kvpass.export_onnx(model, args.out)                      # the torch model's plan, in an ONNX graph

    generator = kvpass.onnx.Generator(args.out)              # onnxruntime; CUDA when available
    tokens = generator.generate(ids, max_new_tokens=args.max_new_tokens)
    with torch.no_grad():
        expected = model.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=False,
                                  pad_token_id=model.generation_config.eos_token_id or 0).numpy()
    new = tokens[0, ids.shape[1]:]
    print("onnxruntime:", tokenizer.decode(new, skip_special_tokens=True) if tokenizer else new.tolist())
    held, full = generator.cache_bytes(), generator.full_cache_bytes()
    print(f"present KV cache: {held:,} bytes, {held / full:.3f} of the unpruned {full:,}")
    print("same tokens as torch:", np.array_equal(tokens, expected))
    assert np.array_equal(tokens, expected)


if __name__ == "__main__":
    main()
