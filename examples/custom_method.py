"""A new eviction method in one file: value-aware attention (VATP, Guo et al., 2024).

    python examples/custom_method.py            # SmolLM2: passkey answers, TOVA vs this method
    python examples/custom_method.py --tiny     # a tiny random Llama: the exactness oracle and the byte cap

A method is a small dataclass: it names the attention statistic it needs (`stat`) and turns an
`Observation` of one layer's cache into a score per cached token (higher: kept). Sinks, the
recent window, top-k, compaction and the byte cap are kvpass's; so is running it in the torch
runtime, under torch.compile, and (for statistics an ONNX step can give) in onnxruntime.
Here: the newest query's attention, as TOVA, weighted by each token's value norm, since a token
that draws attention but carries a near-zero value changes little when evicted.
"""

from __future__ import annotations

import argparse
import copy
import random
from dataclasses import dataclass

import torch

import kvpass
from kvpass.methods import Method, Observation, Stat


@dataclass
class ValueAware(Method):
    """Attention of the newest query times the L1 norm of each token's value, per KV head."""

    name = "value_aware"
    stat = Stat.LAST_QUERY

    def score(self, obs: Observation) -> torch.Tensor:
        return obs.stat * obs.values.float().norm(p=1, dim=-1)


kvpass.METHODS[ValueAware.name] = ValueAware  # by name too: kvpass.Evict("value_aware"), saved plans


def check_on_tiny_model() -> None:
    """The method obeys kvpass's contracts on a tiny random model (kvpass.testing)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from kvpass.testing import assert_cache_within, assert_oracle

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                         num_hidden_layers=2, intermediate_size=128, vocab_size=128)).eval()
    assert_oracle(model, ValueAware(), budget=0.3, steps=4)
    assert_cache_within(model, 0.3, prompt_len=96, steps=8, method="value_aware", span=2)
    print("value_aware: decoding equals the full model with its evicted keys masked; the byte cap holds")


def passkey(samples: int, budget: float) -> None:
    """Passkey answers (DESIGN.md protocol) of SmolLM2 with TOVA and with this method, at `budget`."""
    from kvpass.eval.models import load_smollm2
    from kvpass.eval.passkey import is_correct, make_sample

    base, tokenizer = load_smollm2()
    rng = random.Random(0)
    prompts = [make_sample(tokenizer, 1500, rng) for _ in range(samples)]
    for method in ("tova", "value_aware"):
        model = kvpass.optimize(copy.deepcopy(base), budget=budget, method=method)
        correct = 0
        for sample in prompts:
            with torch.no_grad():
                out = model.generate(sample.prompt_ids, max_new_tokens=10, do_sample=False,
                                     pad_token_id=tokenizer.eos_token_id)
            correct += is_correct(tokenizer, sample, out[0, sample.prompt_ids.shape[1]:])
        print(f"{method} at budget {budget}: {correct}/{samples} pass keys found")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=0.25)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--tiny", action="store_true", help="check the method on a tiny random model only")
    args = parser.parse_args(argv)
    check_on_tiny_model()
    if not args.tiny:
        passkey(args.samples, args.budget)


if __name__ == "__main__":
    main()
