"""Runs NVIDIA kvpress presses on given prompts; executed by benchmarks/vs_kvpress.py inside kvpress's own venv.

Reads a JSON job (model GGUF path, presses, budgets, prompts as token ids) and writes the
generated answers as JSON. Only kvpress, transformers and torch are imported here: the
prompts are built and scored by kvpass in the main environment, so both libraries see the
very same tokens.

kvpress compresses during prefill through a forward hook on every attention layer
(`press.forward_hook`). To afford many presses x budgets x modes on a CPU, one prefill per
prompt is shared: our hook on each attention layer hands every press its own cache, filled
with that layer's keys and values, and calls the press's own `forward_hook` on it, once with
the whole prompt but its last token (query-aware) and once with the context's slice of every
tensor (context-only; causal attention makes that slice exactly the context's own prefill).
Answers are then decoded by kvpress's pipeline (`generate_answer`: greedy, positions
continuing after the uncompressed length).

    python benchmarks/kvpress_worker.py job.json answers.json
"""

from __future__ import annotations

import json
import sys

import torch


def press_factory(name: str, budget: float):
    """The kvpress press `name` keeping `budget` of the cache (compression_ratio = 1 - budget)."""
    import kvpress

    classes = {
        "TOVA": kvpress.TOVAPress, "SnapKV": kvpress.SnapKVPress, "Knorm": kvpress.KnormPress,
        "StreamingLLM": kvpress.StreamingLLMPress, "ExpectedAttention": kvpress.ExpectedAttentionPress,
        "ObservedAttention": kvpress.ObservedAttentionPress,
    }
    return classes[name](compression_ratio=1 - budget)


def slice_kwargs(kwargs: dict, length: int, cache) -> dict:
    """The attention layer's kwargs as a prefill of the first `length` tokens into `cache` would see them."""
    cos, sin = kwargs["position_embeddings"]
    mask = kwargs.get("attention_mask")
    return {**kwargs, "hidden_states": kwargs["hidden_states"][:, :length], "past_key_values": cache,
            "cache_position": kwargs["cache_position"][:length],
            "position_embeddings": (cos[:, :length], sin[:, :length]),
            "attention_mask": mask[..., :length, :length] if mask is not None else None}


def load(job: dict):
    """(model, kvpress pipeline) for the job's GGUF file; eager attention when a press reads attention weights."""
    import kvpress  # noqa: F401  (registers the "kv-press-text-generation" pipeline)
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    torch.set_num_threads(job["threads"] or torch.get_num_threads())
    folder, name = job["gguf"].rsplit("/", 1)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    eager = "ObservedAttention" in job["presses"]
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32,
                                                 attn_implementation="eager" if eager else "sdpa").eval()
    return model, pipeline("kv-press-text-generation", model=model, tokenizer=tokenizer, device="cpu")


def run(job: dict) -> list[dict]:
    """Answers of every press x budget x mode on every prompt of `job` (one shared prefill per prompt)."""
    model, pipe = load(job)
    presses = {(p, b): press_factory(p, b) for p in job["presses"] for b in job["budgets"]}
    prepare(model, presses)

    answers = []
    for prompt in job["prompts"]:
        ids = torch.tensor([prompt["ids"]])
        cuts = {"query-aware": ids.shape[-1] - 1, "context-only": prompt["context_length"]}
        caches = shared_prefill(model, ids, presses, cuts, job["modes"])
        for ((press, budget), mode), cache in caches.items():
            length = cuts[mode]
            with torch.no_grad():
                text = pipe.generate_answer(ids[:, length:], cache, length, prompt["max_new_tokens"])
            answers.append(dict(index=prompt["index"], press=press, budget=budget, mode=mode, text=text))
        print(f"kvpress worker: prompt {prompt['index'] + 1}/{len(job['prompts'])}", file=sys.stderr, flush=True)
    return answers


def shared_prefill(model, ids: torch.Tensor, presses: dict, cuts: dict[str, int], modes: list[str]) -> dict:
    """(press key, mode) -> the cache that press leaves after prefilling ids[:, :cuts[mode]], from one prefill."""
    from transformers import DynamicCache

    caches = {(key, mode): DynamicCache(config=model.config) for key in presses for mode in modes}

    def hook(module, args, kwargs, output):
        full = kwargs["past_key_values"].layers[module.layer_idx]
        for (key, mode), cache in caches.items():
            length = cuts[mode]
            cache.update(full.keys[:, :, :length], full.values[:, :, :length], module.layer_idx)
            attentions = output[1][..., :length, :length] if output[1] is not None else None
            presses[key].forward_hook(module, args, slice_kwargs(kwargs, length, cache),
                                      (output[0][:, :length], attentions))
        return output

    hooks = [layer.self_attn.register_forward_hook(hook, with_kwargs=True) for layer in model.model.layers]
    try:
        with torch.no_grad():
            model.model(input_ids=ids[:, : max(cuts.values())], past_key_values=DynamicCache(config=model.config))
    finally:
        for handle in hooks:
            handle.remove()
    return caches


def check(job: dict) -> None:
    """The shared prefill leaves exactly the cache of kvpress's own usage (`with press(model): prefill`)."""
    from transformers import DynamicCache

    model, _ = load(job)
    prompt = job["prompts"][0]
    ids = torch.tensor([prompt["ids"]])
    cuts = {"query-aware": ids.shape[-1] - 1, "context-only": prompt["context_length"]}
    presses = {(p, b): press_factory(p, b) for p in job["presses"] for b in job["budgets"]}
    prepare(model, presses)
    shared = shared_prefill(model, ids, presses, cuts, job["modes"])
    for (key, mode), cache in shared.items():
        alone = DynamicCache(config=model.config)
        with presses[key](model), torch.no_grad():
            model.model(input_ids=ids[:, : cuts[mode]], past_key_values=alone)
        for mine, theirs in zip(cache.layers, alone.layers):
            torch.testing.assert_close(mine.keys, theirs.keys, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(mine.values, theirs.values, rtol=1e-4, atol=1e-4)
        print(f"check: {key} {mode}: shared prefill == kvpress's own prefill", file=sys.stderr, flush=True)


def prepare(model, presses: dict) -> None:
    """What each press's context manager does before hooking the layers."""
    for press in presses.values():
        press.post_init_from_model(model)
    for layer in model.model.layers:
        layer.self_attn.rotary_emb = model.model.rotary_emb


def main() -> None:
    from importlib.metadata import version

    job_path, out_path = sys.argv[1:3]
    job = json.loads(open(job_path).read())
    if job.get("check"):
        check(job)
    answers = run(job)
    with open(out_path, "w") as out:
        json.dump({"kvpress_version": version("kvpress"), "answers": answers}, out)


if __name__ == "__main__":
    main()
