"""Which layers' selection scores keep the facts a question needs, and where ASL's test fires, on SmolLM2.

A selection layer can only be as good as its scores. For every layer and every prompt of the quality
suite this prints two things side by side:

* **kept**: the share of prompts whose answer tokens (every token overlapping an answer string in the
  context) all fall in that layer's top `keep - window` SnapKV scores, the tokens `kvpass.SelectLayer`
  would propagate if it selected there;
* **ratio**: ASL's relative rank variance at that layer under the default rule (`min_layer`,
  `observe`; top-k = keep - window), averaged per task, and the layer `SelectLayer(tau=...)` picks,
  with kvpass's `max_layer` bound and without it (the same ratio searched to the second last layer).

Scores come from kvpass's own selection runtime: `SelectLayer(tau=0)` never selects (the prompt's
hidden states stay whole), and with `observe` spanning every layer its state keeps each layer's scores. The ranking's stability (what
ASL measures) and the scores' quality (what decides the answer) are separate questions; this is where
one can see whether they agree on a model.

    python benchmarks/selection_layers.py --split dev --samples 8 --length 3000 --keeps 256 512
"""

from __future__ import annotations

import argparse
import copy
import re
import statistics
from collections import defaultdict

import torch
from transformers import DynamicCache

import kvpass
from kvpass.eval.models import load_smollm2
from kvpass.eval.tasks import COUNTED_TASKS, encode, make_sample, seeds, token_counter
from kvpass.runtime.call_arguments import cache_argument
from kvpass.runtime.hf_selection import SELECTION_ATTRIBUTE
from kvpass.runtime.layer_selection import rank_variance_ratio


def answer_tokens(tokenizer, context_ids: torch.Tensor, answers: tuple[str, ...]) -> list[int]:
    """Positions of the context tokens that overlap an occurrence of any answer string."""
    text = tokenizer.decode(context_ids[0])
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    if encoded.input_ids != context_ids[0].tolist():
        raise RuntimeError("the context does not re-tokenize to the same ids; answer positions would be wrong")
    spans = [match.span() for answer in answers for match in re.finditer(re.escape(answer), text)]
    return [index for index, (start, end) in enumerate(encoded.offset_mapping)
            if any(start < stop and end > begin for begin, stop in spans)]


def layer_scores(model, ids: torch.Tensor) -> list[torch.Tensor]:
    """SnapKV window scores [T - window] of every layer from 1 to the second last, from one prefill."""
    cache = DynamicCache()
    with torch.no_grad():
        model(ids, **cache_argument(model, cache), use_cache=True, logits_to_keep=1)
    return [scores[0] for scores in getattr(cache, SELECTION_ATTRIBUTE).history]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--split", choices=["dev", "test"], default="dev")
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--length", type=int, default=3000)
    parser.add_argument("--tasks", nargs="+", default=list(COUNTED_TASKS))
    parser.add_argument("--keeps", type=int, nargs="+", default=[256, 512], help="tokens propagated")
    parser.add_argument("--taus", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.4, 0.5])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    base, tokenizer = load_smollm2()
    layers = base.config.num_hidden_layers
    first = 1
    model = copy.deepcopy(base)
    kvpass.optimize(model, budget=f"{min(args.keeps)} tokens", transforms=[
        kvpass.Evict("snapkv"), kvpass.SelectLayer(tau=0.0, min_layer=first, max_layer=layers - 2, observe=layers)])
    default = kvpass.SelectLayer().rule(layers)
    count_tokens = token_counter(tokenizer)
    kept = defaultdict(list)  # (keep, task, layer) -> [bool]
    ratios = defaultdict(list)  # (keep, task, layer) -> [ratio]
    picked = defaultdict(list)  # (keep, tau, task) -> [layer]
    for seed in seeds(args.split, args.samples):
        for task in args.tasks:
            sample = make_sample(task, args.split, seed, args.length, count_tokens)
            prompt = encode(tokenizer, sample)
            needles = answer_tokens(tokenizer, prompt.context_ids, sample.answers)
            scores = layer_scores(model, prompt.prompt_ids)
            for keep in args.keeps:
                k = keep - default.window
                for offset, layer_score in enumerate(scores):
                    top = set(layer_score.topk(k).indices.tolist())
                    kept[keep, task, first + offset].append(all(index in top for index in needles))
                history = scores[default.first_scored - first:]
                chosen = {tau: None for tau in args.taus}
                for offset in range(len(history)):
                    window = [row[None] for row in history[max(0, offset - default.observe + 1):offset + 1]]
                    ratio = float(rank_variance_ratio(window, k)[0])
                    layer = default.first_scored + offset
                    ratios[keep, task, layer].append(ratio)
                    for tau in args.taus:
                        if chosen[tau] is None and ratio < tau:
                            chosen[tau] = layer
                for tau, layer in chosen.items():
                    picked[keep, tau, task].append(layer)
            print(f"{task} seed {seed}: {prompt.prompt_ids.shape[-1]} tokens, {len(needles)} answer tokens", flush=True)

    print(f"\nSmolLM2-135M-Instruct, {args.split} split, {args.samples} samples per task, ~{args.length} tokens; "
          f"default rule: min_layer {default.first_scored}, observe {default.observe}, max_layer {default.max_layer}")
    for keep in args.keeps:
        print(f"\n### keep {keep}: share of prompts whose answer tokens are all in the layer's top {keep - default.window}"
              f" (kept), and ASL's mean ratio (ratio)")
        print("| layer | " + " | ".join(f"{task} kept | ratio" for task in args.tasks) + " | kept, mean |")
        print("|" + "---|" * (2 * len(args.tasks) + 2))
        for layer in range(first, layers - 1):
            cells = []
            for task in args.tasks:
                values = ratios.get((keep, task, layer))
                cells.append(f"{100 * statistics.mean(kept[keep, task, layer]):.0f} | "
                             + (f"{statistics.mean(values):.2f}" if values else "-"))
            mean = statistics.mean(statistics.mean(kept[keep, task, layer]) for task in args.tasks)
            print(f"| {layer} | " + " | ".join(cells) + f" | {100 * mean:.0f} |")
        print("\nthe layer ASL picks, mean over prompts: with kvpass's bound (max_layer where the ratio has not fallen "
              "under tau by then) / without it (n: prompts that never fall under tau)")
        print("| tau | " + " | ".join(args.tasks) + " |")
        print("|" + "---|" * (len(args.tasks) + 1))
        for tau in args.taus:
            cells = []
            for task in args.tasks:
                layers_picked = picked[keep, tau, task]
                bounded = [default.max_layer if layer is None else min(layer, default.max_layer)
                           for layer in layers_picked]
                settled = [layer for layer in layers_picked if layer is not None]
                never = len(layers_picked) - len(settled)
                cells.append(f"{statistics.mean(bounded):.1f} / "
                             + (f"{statistics.mean(settled):.1f}" if settled else "-")
                             + (f" (n {never})" if never else ""))
            print(f"| {tau} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
