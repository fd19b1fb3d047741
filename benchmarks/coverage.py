"""Coverage matrix: every decoder-only causal LM of the installed transformers, tiny and random, end to end.

Each model type of `MODEL_FOR_CAUSAL_LM_MAPPING_NAMES` runs in its own subprocess with a time limit
(a hang or a crash of one does not stop the run), through `kvpass.eval.coverage.check`: find_attention
geometry against the config, budget 1.0 greedy tokens against the unmodified model, budget 0.5 cache
bytes against the unmodified model's own cache, generate, and 8 decode steps against the masked-full
oracle. With `--transform select`, the check is prefill token selection instead (`kvpass.SelectLayer`
at layer 0, half the prompt kept, against the masked-key oracle). Prints one row per model type and the
counts; `--out` saves the same text.

    python benchmarks/coverage.py --out benchmarks/results/coverage.txt
    python benchmarks/coverage.py --transform select --out benchmarks/results/coverage_select.txt
    python benchmarks/coverage.py llama gemma2 gpt_oss      # some model types only
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import select
import subprocess
import sys
import time

STATUSES = ("ok", "refused", "wrong", "crashed", "could not build")


def run_worker(model_types: list[str], transform: str) -> None:
    """Worker: check each model type in turn and print its verdict as one JSON line."""
    import dataclasses
    import warnings

    import torch

    from kvpass.eval.coverage import check

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    for model_type in model_types:
        print("START " + model_type, flush=True)
        print("VERDICT " + json.dumps(dataclasses.asdict(check(model_type, transform))), flush=True)


def run_isolated(model_types: list[str], timeout: float, transform: str):
    """Yield the verdict of every model type, checked in a worker subprocess; a model type that
    hangs past `timeout` seconds or kills its worker is a crash, and a new worker takes the rest."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    remaining = list(model_types)
    while remaining:
        worker = subprocess.Popen([sys.executable, __file__, "--worker", "--transform", transform, *remaining],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        current, started, output = None, time.perf_counter(), []
        while True:
            ready, _, _ = select.select([worker.stdout], [], [], 5.0)
            if current is not None and time.perf_counter() - started > timeout:
                worker.kill()
                worker.wait()
                yield {"model_type": current, "status": "crashed", "detail": f"no answer within {timeout:.0f} s",
                       "kind": "", "seconds": timeout}
                remaining.remove(current)
                break
            if not ready:
                continue
            line = worker.stdout.readline()
            if not line:  # the worker died
                worker.wait()
                if current is not None:
                    tail = " ".join(output[-1:])[:300]
                    yield {"model_type": current, "status": "crashed", "kind": "",
                           "detail": f"worker died (exit {worker.returncode}): {tail}",
                           "seconds": time.perf_counter() - started}
                    remaining.remove(current)
                break
            if line.startswith("START "):
                current, started, output = line.split()[1], time.perf_counter(), []
            elif line.startswith("VERDICT "):
                verdict = json.loads(line.removeprefix("VERDICT "))
                remaining.remove(verdict["model_type"])
                current = None
                yield verdict
            elif line.strip():
                output.append(line.strip())


def summary(verdicts: list[dict]) -> list[str]:
    """The counts, overall and for the models whose attention is softmax over a KV cache."""
    counts = collections.Counter(v["status"] for v in verdicts)
    lines = ["", "counts: " + ", ".join(f"{counts[s]} {s}" for s in STATUSES) + f" (of {len(verdicts)})"]
    buildable = [v for v in verdicts if v["status"] != "could not build"]
    for kind in sorted({v["kind"] for v in buildable}):
        group = collections.Counter(v["status"] for v in buildable if v["kind"] == kind)
        total = sum(group.values())
        lines.append(f"  {kind or 'unknown'}: " + ", ".join(f"{group[s]} {s}" for s in STATUSES[:4])
                     + f" (of {total}; ok {100 * group['ok'] / total:.0f}%)")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_types", nargs="*", help="default: every causal LM model type")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per model type")
    parser.add_argument("--out", help="also write the table and counts to this file")
    parser.add_argument("--transform", choices=["evict", "select"], default="evict",
                        help="what to check: eviction (default) or prefill token selection (SelectLayer)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        run_worker(args.model_types, args.transform)
        return
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_types = args.model_types or list(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    lines = [f"transformers {transformers.__version__}; {len(model_types)} model types; "
             f"command: python benchmarks/coverage.py {' '.join(sys.argv[1:])}".rstrip(), ""]
    print("\n".join(lines), flush=True)
    verdicts = []
    for verdict in run_isolated(model_types, args.timeout, args.transform):
        verdicts.append(verdict)
        model_type = verdict["model_type"]
        row = f"{model_type:26s} {verdict['status']:15s} {verdict['kind']:20s} {verdict['seconds']:5.0f}s  {verdict['detail']}"
        lines.append(row)
        print(row, flush=True)
    counts = summary(verdicts)
    lines += counts
    print("\n".join(counts))
    if args.out:
        with open(args.out, "w") as out:
            out.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
