"""kvpass methods and NVIDIA kvpress presses side by side: same model, prompts, budgets and modes.

kvpress releases pin transformers < 5.3, so kvpress runs in its own virtual environment,
which this script creates on first use (`.venv-kvpress/`: torch==2.13.0 first, a plain torch
requirement pulls a multi-GB CUDA build; then kvpress and gguf). The prompts are built and
scored here by kvpass (`kvpass.eval.tasks`); their token ids go to
`benchmarks/kvpress_worker.py`, which runs the presses imported from the installed kvpress.
Both sides share one prefill per prompt across all their settings.

    python benchmarks/vs_kvpress.py                               # smoke: 2 samples per task
    python benchmarks/vs_kvpress.py --samples 24 --out benchmarks/results/vs_kvpress_test   # the reported run
    python benchmarks/vs_kvpress.py --from-rows a.jsonl b.jsonl   # tables and plots of saved rows only
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm

import kvpass
from kvpass.eval import plots
from kvpass.eval.models import load_smollm2, smollm2_gguf_path
from kvpass.eval.report import FULL, accuracy_table, label, load_jsonl, mean_scores, retention, save_jsonl
from kvpass.eval.runner import MODES, Result, evaluate
from kvpass.eval.settings import make_plans
from kvpass.eval.tasks import COUNTED_TASKS, encode, grid_seeds, is_grid_seed, make_sample, score, seeds, token_counter

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv-kvpress"
KVPRESS = "kvpress==0.5.5"
PRESSES = ["TOVA", "SnapKV", "Knorm", "StreamingLLM", "ExpectedAttention", "ObservedAttention"]
"""AdaKV is not run: it evicts per head by masking keys inside kvpress's patched attention at decode time
(state kept on each attention module), which one shared prefill cannot give each press separately, and a
prefill per press, budget and mode does not fit the CPU time budget."""


def kvpress_python() -> Path:
    """The kvpress venv's python, creating the venv (torch==2.13.0 first, then kvpress) if it is missing."""
    python = VENV / "bin" / "python"
    if not python.exists() or subprocess.run([python, "-c", "import kvpress"], capture_output=True).returncode:
        print(f"creating {VENV} (torch==2.13.0, then {KVPRESS}, gguf)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", VENV], check=True)
        subprocess.run([python, "-m", "pip", "install", "-q", "torch==2.13.0"], check=True)
        subprocess.run([python, "-m", "pip", "install", "-q", KVPRESS, "gguf"], check=True)
    return python


def run_kvpress(samples, prompts, presses, budgets, modes, threads, check=False) -> tuple[str, list[Result]]:
    """(kvpress version, result rows) of every press x budget x mode on the given prompts.

    `check`: first verify on the first prompt that the shared prefill leaves the very caches of
    kvpress's own `with press(model)` usage (one prefill per press, budget and mode)."""
    python = kvpress_python()
    job = dict(gguf=str(smollm2_gguf_path()), presses=presses, budgets=budgets, modes=modes, threads=threads,
               check=check,
               prompts=[dict(index=i, ids=p.prompt_ids[0].tolist(), context_length=p.context_ids.shape[-1],
                             max_new_tokens=s.max_new_tokens) for i, (s, p) in enumerate(zip(samples, prompts))])
    with tempfile.TemporaryDirectory() as folder:
        job_path, out_path = Path(folder) / "job.json", Path(folder) / "answers.json"
        job_path.write_text(json.dumps(job))
        subprocess.run([python, Path(__file__).parent / "kvpress_worker.py", job_path, out_path], check=True)
        answers = json.loads(out_path.read_text())
    rows = []
    for answer in answers["answers"]:
        sample, prompt = samples[answer["index"]], prompts[answer["index"]]
        rows.append(Result(sample.task, sample.seed, prompt.prompt_ids.shape[-1], sample.depth,
                           label(f"kvpress:{answer['press']}", answer["budget"]), answer["mode"],
                           score(sample, answer["text"]), answer["text"]))
    return answers["kvpress_version"], rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--split", choices=["dev", "test"], default="test")
    parser.add_argument("--samples", type=int, default=2, help="samples per task")
    parser.add_argument("--start", type=int, default=0, help="first seed index (to run a split in parts)")
    parser.add_argument("--tasks", nargs="+", default=list(COUNTED_TASKS))
    parser.add_argument("--length", type=int, default=1500)
    parser.add_argument("--methods", nargs="+", default=["default", "paged", "tova"],
                        help="kvpass method specs (kvpass.eval.settings)")
    parser.add_argument("--presses", nargs="+", default=["TOVA", "SnapKV", "Knorm", "ExpectedAttention"],
                        choices=PRESSES)
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.25])
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--niah-depths", type=float, nargs="*", default=[])
    parser.add_argument("--niah-lengths", type=int, nargs="*", default=[])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--check", action="store_true",
                        help="verify the shared kvpress prefill against kvpress's own usage on the first prompt")
    parser.add_argument("--out", default="", help="write rows to OUT.jsonl and plots to OUT_*.png")
    parser.add_argument("--from-rows", nargs="+", help="print tables and plots of saved rows, run nothing")
    args = parser.parse_args()

    if args.from_rows:
        rows = [row for path in args.from_rows for row in load_jsonl(path)]
        report(rows, args, version=None)
        return
    torch.set_num_threads(args.threads)
    base, tokenizer = load_smollm2()
    model = kvpass.optimize(copy.deepcopy(base), budget=1.0)
    plans = make_plans(model, args.methods, args.budgets, tokenizer)
    count_tokens = token_counter(tokenizer)
    samples = [make_sample(task, args.split, seed, args.length, count_tokens)
               for seed in seeds(args.split, args.samples, args.start) for task in args.tasks]
    samples += [make_sample("niah", args.split, seed, length, count_tokens, depth)
                for length in args.niah_lengths for depth in args.niah_depths
                for seed in grid_seeds(args.split, args.samples, args.start)]
    prompts = [encode(tokenizer, s) for s in samples]

    started = time.perf_counter()
    rows = []
    for sample in tqdm(samples, desc="kvpass", unit="sample"):
        rows += evaluate(model, tokenizer, sample, plans, tuple(args.modes))
    kvpass_seconds = time.perf_counter() - started
    if args.out:  # kept even if the kvpress stage fails
        save_jsonl(rows, f"{args.out}.jsonl")
    del model, base
    version, press_rows = run_kvpress(samples, prompts, args.presses, args.budgets, args.modes, args.threads,
                                      args.check)
    rows += press_rows
    print(f"\nkvpass: {len(samples)} samples in {kvpass_seconds:.0f}s; kvpress {version}: "
          f"{time.perf_counter() - started - kvpass_seconds:.0f}s", flush=True)
    if args.out:
        save_jsonl(rows, f"{args.out}.jsonl")
    report([r.__dict__ for r in rows], args, version)


def report(rows: list[dict], args, version: str | None) -> None:
    """The side-by-side table, retention per setting and mode, and the plots."""
    grid = [r for r in rows if is_grid_seed(r["seed"])]
    suite = [r for r in rows if r not in grid]
    tasks = [t for t in dict.fromkeys(r["task"] for r in suite)]
    counted = [t for t in COUNTED_TASKS if t in tasks]
    print(f"\nkvpass vs kvpress {version or ''} on SmolLM2-135M-Instruct, ~{args.length} tokens, "
          f"{args.split} split (kvpass default: {kvpass.get_method()})")
    print(accuracy_table(suite, args.modes, tasks, counted), flush=True)
    means = mean_scores(suite)
    print("\nRetention over counted tasks (%), and the samples behind each cell")
    print("| setting | " + " | ".join(args.modes) + " |\n|---|" + "---|" * len(args.modes))
    settings = sorted({r["setting"] for r in suite} - {FULL})
    for setting in settings:
        cells = [f"{100 * retention(suite, setting, mode, counted):.1f}" for mode in args.modes]
        print(f"| {setting} | " + " | ".join(cells) + " |")
    print(f"(cells hold {min(n for _, n in means.values())}-{max(n for _, n in means.values())} samples)")
    if args.out:
        plots.accuracy_vs_budget(suite, f"{args.out}_accuracy.png", counted)
        niah_rows = grid or [r for r in suite if r["task"] == "niah"]  # the grid alone when one was asked for
        best = best_press(suite, args.modes[-1], counted)
        for setting in (FULL, label("default", min(args.budgets)), best):
            if setting and any(r["setting"] == setting for r in niah_rows):
                plots.niah_heatmap(niah_rows, setting, args.modes[-1],
                                   f"{args.out}_niah_{setting.replace(':', '_')}.png")


def best_press(rows: list[dict], mode: str, counted: list[str]) -> str | None:
    """The kvpress setting with the highest retention in `mode` at the lowest budget present."""
    presses = [s for s in {r["setting"] for r in rows} if s.startswith("kvpress:")]
    if not presses:
        return None
    lowest = min(float(s.rpartition("@")[2]) for s in presses)
    return max((s for s in presses if float(s.rpartition("@")[2]) == lowest),
               key=lambda s: retention(rows, s, mode, counted))


if __name__ == "__main__":
    main()
