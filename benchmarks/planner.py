"""The compile-time planner on SmolLM2: its plan table, planning time, and adaptive vs uniform at equal bytes.

Prints the adaptive plan (per-layer entropy, budget, predicted retention, bytes), how long
planning takes (site discovery and calibration separately), then retrieval accuracy of
uniform and adaptive plans of the same method at the same byte budget on two tasks:
  passkey - DESIGN.md's protocol (`kvpass.eval.passkey`), random depth;
  needle  - a 7-digit number in a varied (non-repeating) haystack, at fixed depths.
One prefill per sample and mode is shared by every plan (`kvpass.eval.sweep`). Modes:
context-only (the context is evicted before the question arrives, kvpress's protocol) and
query-aware (the question is part of the prefill that is evicted).

    python benchmarks/planner.py --samples 8 --length 3000 --depths 0.5 0.9 --budgets 0.5 0.25 0.125 --threads 1
"""

from __future__ import annotations

import argparse
import copy
import random
import time

import torch

import kvpass
from kvpass.calibration import calibrate
from kvpass.eval.models import load_smollm2
from kvpass.eval.passkey import PasskeySample, is_correct, make_sample
from kvpass.eval.sweep import cache_from_recording, record_prefill
from kvpass.runtime.call_arguments import cache_argument

HAYSTACK = [
    "The committee postponed its vote until the spring session.",
    "A narrow road winds through the hills towards the old monastery.",
    "Bakers in the town start work long before sunrise.",
    "The museum's new wing houses a collection of maritime maps.",
    "Most of the harvest was sold at the market on Saturday.",
    "Engineers inspected the bridge after the storm and found no damage.",
    "The choir rehearses in the chapel every Thursday evening.",
    "Several species of migratory birds rest at the lake in autumn.",
    "The library extended its opening hours during the exam period.",
    "A local historian wrote a short book about the railway station.",
    "The ferry schedule changes when the river is too low.",
    "Students planted a row of oak trees along the school fence.",
]
NEEDLE = "The special magic number is {key}. "
QUESTION = "\n\nWhat is the special magic number mentioned in the text? Answer with the 7-digit number."
ANSWER_PREFIX = "The special magic number is"


def make_needle(tokenizer, target_tokens: int, depth: float, rng: random.Random) -> PasskeySample:
    """A chat-formatted needle-in-a-haystack prompt of about `target_tokens` tokens, needle at `depth`."""
    key = f"{rng.randint(1_000_000, 9_999_999)}"
    sentence_tokens = sum(len(tokenizer(s + " ").input_ids) for s in HAYSTACK) / len(HAYSTACK)
    sentences = [rng.choice(HAYSTACK) for _ in range(int((target_tokens - 80) / sentence_tokens))]
    sentences.insert(round(depth * len(sentences)), NEEDLE.format(key=key).strip())
    messages = [{"role": "user", "content": " ".join(sentences) + "\x00"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) + ANSWER_PREFIX
    context_text, question_text = text.split("\x00")
    context = tokenizer(context_text, add_special_tokens=False, return_tensors="pt").input_ids
    question = tokenizer(QUESTION + question_text, add_special_tokens=False, return_tensors="pt").input_ids
    return PasskeySample(key, depth, context, question)


def answer(model, sample: PasskeySample, cache=None) -> torch.Tensor:
    with torch.no_grad():
        out = model.generate(sample.prompt_ids, **cache_argument(model, cache), max_new_tokens=12, do_sample=False,
                             pad_token_id=model.config.eos_token_id)
    return out[0, sample.prompt_ids.shape[-1]:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=8, help="samples per depth (needle) and for passkey")
    parser.add_argument("--length", type=int, default=3000)
    parser.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.7, 0.9])
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.25])
    parser.add_argument("--modes", nargs="+", choices=["context-only", "query-aware"],
                        default=["context-only", "query-aware"])
    parser.add_argument("--reallocate", type=int, default=0,
                        help="also run the adaptive plan re-allocating every N decoded tokens ('realloc' columns)")
    parser.add_argument("--skip-full", action="store_true", help="skip the full-cache baseline")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    base, tokenizer = load_smollm2()
    started = time.perf_counter()
    model = kvpass.optimize(copy.deepcopy(base), budget=1.0)  # finds the sites once; caches come from recordings
    found = time.perf_counter()
    calibration = calibrate(model, None, tokenizer=tokenizer, sites=model.kvpass_sites)
    calibrated = time.perf_counter()
    allocations = ("uniform", "adaptive") + (("realloc",) if args.reallocate else ())
    plans = {}
    for budget in args.budgets:
        for allocation in allocations:
            plans[(budget, allocation)] = kvpass.plan(
                model, budget, calibration=calibration, allocation="uniform" if allocation == "uniform" else "adaptive",
                reallocate=args.reallocate if allocation == "realloc" else 0)
    planned = time.perf_counter()
    print(f"planning: find_attention + rewrite {found - started:.1f}s, calibration {calibrated - found:.1f}s "
          f"({calibration.seconds:.1f}s inside; prompts {calibration.prompt_tokens} tokens), "
          f"{len(plans)} plans {planned - calibrated:.2f}s", flush=True)
    for budget in args.budgets:
        print(f"\nAdaptive plan, budget {budget} (bytes at {args.length} tokens):")
        print(plans[(budget, "adaptive")].table(args.length))
        for allocation in allocations:
            plan = plans[(budget, allocation)]
            print(f"  {allocation:8s}: kv_bytes({args.length}) = {plan.kv_bytes(args.length)} of "
                  f"{plan.full_kv_bytes(args.length)}; predicted mean retained mass "
                  f"{sum(plan.retention.values()) / len(plan.retention):.4f}, output error "
                  f"{sum(plan.output_error.values()) / len(plan.output_error):.4f}", flush=True)

    rng = random.Random(args.seed)
    tasks = [("passkey", None)] + [("needle", depth) for depth in args.depths]
    rows = [(mode, task, depth) for mode in args.modes for task, depth in tasks]
    hits: dict[tuple, int] = {}
    for task, depth in tasks:
        for index in range(args.samples):
            sample = (make_sample(tokenizer, args.length, rng) if task == "passkey"
                      else make_needle(tokenizer, args.length, depth, rng))
            if not args.skip_full:
                ok = is_correct(tokenizer, sample, answer(base, sample))
                for mode in args.modes:
                    hits[(mode, task, depth, "full")] = hits.get((mode, task, depth, "full"), 0) + ok
            for mode in args.modes:
                ids = sample.context_ids if mode == "context-only" else sample.prompt_ids[:, :-1]
                recording = record_prefill(model, ids)
                outcome = []
                for key, plan in plans.items():
                    cache = cache_from_recording(model, recording, plan)
                    ok = is_correct(tokenizer, sample, answer(model, sample, cache))
                    hits[(mode, task, depth, *key)] = hits.get((mode, task, depth, *key), 0) + ok
                    outcome.append(f"{key[1]} {key[0]}: {int(ok)}")
                print(f"  {mode} {task} depth {depth if depth is not None else 'random'} sample {index + 1}/"
                      f"{args.samples} ({sample.prompt_ids.shape[-1]} tokens) {', '.join(outcome)} "
                      f"{time.perf_counter() - planned:.0f}s", flush=True)

    print(f"\nAccuracy (%), SmolLM2-135M-Instruct, ~{args.length} tokens, {args.samples} samples per row,"
          f" method {plans[(args.budgets[0], 'uniform')].method}")
    columns = [] if args.skip_full else ["full"]
    columns += [f"{allocation} {budget}" for budget in args.budgets for allocation in allocations]
    print("| mode | task | depth | " + " | ".join(columns) + " |")
    print("|---|---|---|" + "---|" * len(columns))
    for mode, task, depth in rows:
        keys = [] if args.skip_full else [(mode, task, depth, "full")]
        keys += [(mode, task, depth, budget, allocation) for budget in args.budgets for allocation in allocations]
        cells = [f"{100 * hits[key] / args.samples:.0f}" for key in keys]
        print(f"| {mode} | {task} | {depth if depth is not None else 'random'} | " + " | ".join(cells) + " |")
    for budget in args.budgets:
        for allocation in allocations:
            total = sum(hits[(*row, budget, allocation)] for row in rows)
            print(f"overall {allocation} {budget}: {100 * total / (args.samples * len(rows)):.1f}%")

if __name__ == "__main__":
    main()
