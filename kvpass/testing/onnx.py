"""`assert_onnx_parity`: the torch and onnxruntime paths of one pruned model keep the same tokens."""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kvpass.runtime.call_arguments import output_cache
from kvpass.testing.decoding import distinct_prompt


def assert_onnx_parity(model: torch.nn.Module, budget: float | str = 0.5, *, steps: int = 12, prompt_len: int = 64,
                       prompt: torch.Tensor | None = None, opset: int = 23, exported: Any = None,
                       **optimize_options: Any) -> Any:
    """Assert a Hugging Face causal LM optimized at `budget` generates the same greedy tokens in torch
    and, exported with `kvpass.export_onnx`, in onnxruntime (`kvpass.onnx.Generator`), and that both
    end with the same cache: per layer the same number of tokens held, at the same slots. Returns
    the ONNX model it checked; pass it back as `exported` to check other prompts without exporting again.

    `optimize_options` go to `kvpass.optimize` (method, transforms, ...). The default prompt is
    `prompt_len` distinct tokens: repeated tokens make exact score ties that the two runtimes'
    float rounding may break differently.

    Example:
        >>> onnx_model = assert_onnx_parity(model, budget=0.5, method="knorm")          # doctest: +SKIP
        >>> assert_onnx_parity(model, budget=0.5, method="knorm", exported=onnx_model,  # doctest: +SKIP
        ...                    prompt=other_prompt)
    """
    import kvpass
    from kvpass.onnx import Generator

    pruned = kvpass.optimize(copy.deepcopy(model), budget=budget, **optimize_options)
    ids = prompt if prompt is not None else distinct_prompt(model, prompt_len)
    if exported is None:
        with tempfile.TemporaryDirectory() as folder:
            exported = kvpass.export_onnx(pruned, Path(folder) / "model.onnx", opset=opset)
    generator = Generator(exported)
    onnx_tokens = generator.generate(ids, max_new_tokens=steps)
    with torch.no_grad():
        out = pruned.generate(ids, max_new_tokens=steps, do_sample=False, return_dict_in_generate=True,
                              pad_token_id=pruned.generation_config.pad_token_id or 0)
    torch_tokens = out.sequences.numpy()
    problems = []
    if onnx_tokens.shape != torch_tokens.shape or not np.array_equal(onnx_tokens, torch_tokens):
        new = slice(ids.shape[1], None)
        problems.append(f"greedy tokens differ: torch {torch_tokens[0, new].tolist()}, onnxruntime "
                        f"{onnx_tokens[0, new].tolist()}")
    for layer, torch_layer in enumerate(output_cache(out).layers):
        keys, _, slots = generator.cache[layer]
        held = torch_layer.keys.shape[-2]
        if keys.shape[2] != held:
            problems.append(f"layer {layer} holds {held} tokens in torch, {keys.shape[2]} in onnxruntime")
        elif slots is not None and getattr(torch_layer, "site_cache", None) is not None \
                and torch_layer.site_cache.slots is not None \
                and not np.array_equal(slots, torch_layer.site_cache.slots.numpy()):
            problems.append(f"layer {layer} keeps other tokens: slots {torch_layer.site_cache.slots[0, 0].tolist()} "
                            f"in torch, {slots[0, 0].tolist()} in onnxruntime (first KV head)")
    if problems:
        raise AssertionError(f"torch and onnxruntime disagree on {type(model).__name__} optimized at budget "
                             f"{budget!r}: " + "; ".join(problems))
    return exported
