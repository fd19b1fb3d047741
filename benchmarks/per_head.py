"""Per-head KV budgets on SmolLM2: AdaKV-style joint allocation and DuoAttention-style streaming heads.

Retrieval accuracy of the same method at the same byte budget with
  uniform  - every KV head of a layer keeps as many tokens (`kvpass.Evict(method)`);
  per-head - one joint top-k over the layer's heads, with a per-head floor (`Evict(method, per_head=True)`);
and of `kvpass.StreamingHeads(f)` (f of the KV heads keep only 4 sinks + 64 recent tokens, chosen by
calibration) against the same number of heads chosen at random: alone at budget 1.0, and with
`Evict(method)` at 0.5 against `Evict` alone. Both modes: query-aware (the question is in the prefill
that is evicted) and context-only (the context is evicted before the question arrives). One prefill
per sample and mode is shared by every plan (`kvpass.eval.sweep`).

Tasks (the quality suite with dev/test splits is not merged yet; `make_task_sample` is the one place
to switch to it): passkey (`kvpass.eval.passkey`, DESIGN.md's protocol), needle (a number for a named
item in varied prose), multikey (three such facts, one is asked). A sample is correct when the answer
appears in the 12 greedy tokens. Then CPU decode tokens/s after a long prompt, ragged (per-head,
streaming heads) vs uniform at equal bytes, in the same run, and KV MiB.

    python benchmarks/per_head.py --samples 8 --length 2000 --threads 1
    python benchmarks/per_head.py --skip-quality --speed-length 4096 --threads 1
"""

from __future__ import annotations

import argparse
import copy
import random
import time

import torch
from transformers import DynamicCache

import kvpass
from kvpass.eval.models import load_smollm2
from kvpass.eval.passkey import PasskeySample, make_sample
from kvpass.eval.sweep import cache_from_recording, record_prefill

MODES = ("query-aware", "context-only")
TASKS = ("passkey", "needle", "multikey")

SUBJECTS = ["The harbour master", "A retired teacher", "The night nurse", "Our neighbour", "The youngest clerk",
            "A travelling salesman", "The village doctor", "An old fisherman", "The mayor's cousin", "A quiet student"]
VERBS = ["repaired", "painted", "carried", "sold", "borrowed", "cleaned", "measured", "described", "hid", "found"]
OBJECTS = ["the green boat", "a broken clock", "the parish ledger", "two wooden chairs", "the orchard gate",
           "a box of letters", "the station lamp", "a pair of boots", "the brass telescope", "the kitchen table"]
PLACES = ["before the storm", "near the old mill", "on a windy Sunday", "behind the chapel", "at the market",
          "after the long winter", "by the river", "during the fair", "in the attic", "on the cliff path"]
ITEMS = ["violet umbrella", "iron anchor", "silver spoon", "painted drum", "cedar chest", "glass marble",
         "woollen scarf", "copper kettle", "linen map", "leather saddle", "amber brooch", "pewter mug"]


def _prose(rng: random.Random, sentences: int) -> list[str]:
    return [f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} {rng.choice(PLACES)}."
            for _ in range(sentences)]


def _facts_sample(tokenizer, length: int, rng: random.Random, facts: int) -> PasskeySample:
    """Varied prose with `facts` "The number of the <item> is <7 digits>." sentences; one item is asked."""
    items = rng.sample(ITEMS, facts)
    numbers = [f"{rng.randint(1_000_000, 9_999_999)}" for _ in items]
    per_sentence = len(tokenizer(" ".join(_prose(random.Random(0), 20))).input_ids) / 20
    sentences = _prose(rng, int((length - 120) / per_sentence))
    depths = [rng.uniform(0.1, 0.9) for _ in items]
    for item, number, depth in sorted(zip(items, numbers, depths), key=lambda fact: -fact[2]):
        sentences.insert(round(depth * len(sentences)), f"The number of the {item} is {number}.")
    messages = [{"role": "user", "content": "Read the story; it mentions numbers you will be asked about.\n\n"
                 + " ".join(sentences) + "\x00"}]
    asked = rng.randrange(facts)
    prefix = f"The number of the {items[asked]} is"
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) + prefix
    context_text, question_text = text.split("\x00")
    question = f"\n\nWhat is the number of the {items[asked]}? Answer with the 7-digit number."
    return PasskeySample(numbers[asked], depths[asked],
                         tokenizer(context_text, add_special_tokens=False, return_tensors="pt").input_ids,
                         tokenizer(question + question_text, add_special_tokens=False, return_tensors="pt").input_ids)


def make_task_sample(task: str, tokenizer, length: int, rng: random.Random) -> PasskeySample:
    """One sample of `task` (the place to switch to `kvpass.eval.tasks` once the quality suite lands)."""
    if task == "passkey":
        return make_sample(tokenizer, length, rng)
    return _facts_sample(tokenizer, length, rng, 1 if task == "needle" else 3)


def answer(model, tokenizer, sample: PasskeySample, cache) -> bool:
    with torch.no_grad():
        out = model.generate(sample.prompt_ids, past_key_values=cache, max_new_tokens=12, do_sample=False,
                             pad_token_id=model.config.eos_token_id)
    return sample.key in tokenizer.decode(out[0, sample.prompt_ids.shape[-1]:], skip_special_tokens=True)


def plans(model, tokenizer, budgets, fractions, seeds) -> dict[str, kvpass.Plan]:
    """Label -> plan, every one for the same model (sites found once)."""
    evict = lambda **options: kvpass.Evict(None, **options)  # noqa: E731  (the default method: tova, span=2)
    result = {"full": kvpass.plan(model, 1.0, transforms=[evict()])}
    for budget in budgets:
        result[f"uniform@{budget}"] = kvpass.plan(model, budget, transforms=[evict()])
        result[f"per-head@{budget}"] = kvpass.plan(model, budget, transforms=[evict(per_head=True)])
    for fraction in fractions:
        label = f"{fraction:.2f}"
        chooser = {"calibrated": {}, **{f"random{seed}": {"importance": "random", "seed": seed} for seed in seeds}}
        for name, options in chooser.items():
            heads = kvpass.StreamingHeads(fraction, **options)
            result[f"streaming {label} {name}@1.0"] = kvpass.plan(model, 1.0, transforms=[heads], tokenizer=tokenizer)
            result[f"streaming {label} {name}+evict@0.5"] = kvpass.plan(model, 0.5, transforms=[heads, evict()],
                                                                         tokenizer=tokenizer)
    return result


def run_quality(args, model, tokenizer) -> None:
    started = time.perf_counter()
    table = plans(model, tokenizer, args.budgets, args.fractions, args.random_seeds)
    print(f"planning {len(table)} plans: {time.perf_counter() - started:.0f}s", flush=True)
    for label, plan in table.items():
        if plan.streaming_heads:
            heads = sorted((int(name.split(".")[2]), h) for name, hs in plan.streaming_heads.items() for h in hs)
            print(f"  {label}: streaming (layer, head) {heads}", flush=True)
    hits: dict[tuple[str, str, str], int] = {}
    for task in args.tasks:
        rng = random.Random(args.seed * 1000 + TASKS.index(task))
        for index in range(args.samples):
            sample = make_task_sample(task, tokenizer, args.length, rng)
            recordings = {"query-aware": record_prefill(model, sample.prompt_ids[:, :-1]),
                          "context-only": record_prefill(model, sample.context_ids)}
            for label, plan in table.items():
                for mode in MODES:
                    cache = cache_from_recording(model, recordings[mode], plan)
                    key = (task, label, mode)
                    hits[key] = hits.get(key, 0) + answer(model, tokenizer, sample, cache)
            print(f"  {task} {index + 1}/{args.samples} ({sample.prompt_ids.shape[-1]} tokens, depth "
                  f"{sample.depth:.2f}) {time.perf_counter() - started:.0f}s", flush=True)
    print_tables(args, table, hits)


def print_tables(args, table, hits) -> None:
    n = args.samples
    print(f"\nAccuracy (%), SmolLM2-135M-Instruct, ~{args.length} tokens, {n} samples per task; "
          f"method {kvpass.get_method()}")
    header = "| setting | mode | " + " | ".join(args.tasks) + " | mean |"
    print(header + "\n|" + "---|" * (header.count("|") - 1))
    for label in table:
        for mode in MODES:
            cells = [100 * hits[(task, label, mode)] / n for task in args.tasks]
            print(f"| {label} | {mode} | " + " | ".join(f"{c:.0f}" for c in cells)
                  + f" | {sum(cells) / len(cells):.1f} |")
    print("\nPer-head vs uniform (target: mean >= uniform at 0.25 and 0.125, no task more than 2 samples below):")
    for budget in args.budgets:
        for mode in MODES:
            diffs = [hits[(t, f"per-head@{budget}", mode)] - hits[(t, f"uniform@{budget}", mode)] for t in args.tasks]
            mean = sum(diffs) / len(diffs) / n * 100
            print(f"  budget {budget} {mode}: mean {mean:+.1f} points, per task (samples) {diffs}, "
                  f"{'met' if mean >= 0 and min(diffs) >= -2 else 'MISSED'}")
    print("\nStreaming heads (target at 1/3: >= 90% of the full cache, and above random):")
    full = {mode: sum(hits[(t, "full", mode)] for t in args.tasks) for mode in MODES}
    for label in table:
        if label.startswith("streaming"):
            for mode in MODES:
                got = sum(hits[(t, label, mode)] for t in args.tasks)
                print(f"  {label} {mode}: {got}/{n * len(args.tasks)} = {got / max(full[mode], 1):.2f} of full")


def decode_speed(model, recording, plan, first_token, steps: int) -> tuple[float, int]:
    """(tokens/s, peak KV bytes) of `steps` greedy decode steps from a cache evicted from `recording`."""
    cache = cache_from_recording(model, recording, plan)
    token, peak = first_token, kvpass.cache_bytes(cache)
    with torch.no_grad():
        model(token, past_key_values=cache, use_cache=True)  # warm-up step, not timed
        start = time.perf_counter()
        for _ in range(steps):
            token = model(token, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
            peak = max(peak, kvpass.cache_bytes(cache))
        elapsed = time.perf_counter() - start
    return steps / elapsed, peak


def run_speed(args, model, tokenizer) -> None:
    """Decode tokens/s and KV MiB after an `--speed-length` prompt: ragged vs uniform at equal bytes, same run."""
    sample = make_sample(tokenizer, args.speed_length, random.Random(7))
    recording = record_prefill(model, sample.prompt_ids)
    first = sample.prompt_ids[:, -1:]
    heads = kvpass.StreamingHeads(1 / 3, importance="random")  # the choice does not change the speed
    settings = {"full cache": kvpass.plan(model, 1.0, transforms=[kvpass.Evict()]),
                "streaming 1/3 @1.0": kvpass.plan(model, 1.0, transforms=[heads])}
    for every in args.evict_every:
        for budget in args.speed_budgets:
            settings[f"uniform @{budget} every {every}"] = kvpass.plan(model, budget, transforms=[
                kvpass.Evict(evict_every=every)])
            settings[f"per-head @{budget} every {every}"] = kvpass.plan(model, budget, transforms=[
                kvpass.Evict(evict_every=every, per_head=True)])
    results = {}
    for _ in range(args.repeats):  # interleaved repeats: a busy machine slows every setting alike
        for label, plan in settings.items():
            speed, held = decode_speed(model, recording, plan, first, args.steps)
            best, _ = results.get(label, (0.0, held))
            results[label] = (max(best, speed), held)
    print(f"\nDecode after a {recording.layers[0].keys.shape[2]}-token prompt, {args.steps} steps, best of "
          f"{args.repeats}, {torch.get_num_threads()} thread(s), CPU (same run):")
    full_speed, full_held = results["full cache"]
    for label, (speed, held) in results.items():
        peer = label.replace("per-head", "uniform") if label.startswith("per-head") else "full cache"
        print(f"  {label:<26}: {speed:5.2f} tok/s (x{speed / results[peer][0]:.2f} of {peer}), KV "
              f"{held / 2**20:6.1f} MiB (x{held / full_held:.3f} of full)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--length", type=int, default=2000)
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.25, 0.125])
    parser.add_argument("--fractions", type=float, nargs="+", default=[1 / 3, 2 / 3])
    parser.add_argument("--random-seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--speed-length", type=int, default=4096)
    parser.add_argument("--speed-budgets", type=float, nargs="+", default=[0.5])
    parser.add_argument("--evict-every", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    base, tokenizer = load_smollm2()
    model = kvpass.optimize(copy.deepcopy(base), budget=1.0)
    if not args.skip_quality:
        run_quality(args, model, tokenizer)
    if not args.skip_speed:
        run_speed(args, model, tokenizer)


if __name__ == "__main__":
    main()
