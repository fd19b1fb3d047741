"""onnxruntime serving of a kvpass-pruned ONNX model: decode latency, present-KV bytes and peak RSS, full vs pruned.

SmolLM2-135M (fp32) is exported once (`kvpass.export_onnx`, budget 1.0 = the full cache), then
pruned with `kvpass.onnx.optimize` at `evict_every` 1 (evict at every step) and at the serving
default (`kvpass.onnx.SERVING_EVICT_EVERY`); all run through `kvpass.onnx.Generator`.

Rows: every prompt length, for batch 1 and for a left-padded batch of 3 (rows of the full length,
7/8 and 3/4 of it, as a server batches requests of different lengths). For each row every model
runs in a fresh worker process of its own, so the peak RSS printed is that model's alone (weights,
prefill, cache). The workers prefill one after another, then decode in turns, one step each, so a
change of load on a shared machine hits all alike. Figures: the mean decode-step latency over whole
eviction periods (`--steps` rounded up to a multiple of the serving `evict_every`, so the steps that
evict are counted), the most bytes the cache (K, V, slots and carried statistics) held from the
prefill on, each as a ratio to the full cache of the same row, and the worker's peak RSS.

Run: HF_HUB_OFFLINE=1 python benchmarks/onnx_serving.py [--lengths 1024 2048 4096 8000] [--batches 1 3]
     [--steps 16] [--budget 0.5] [--threads 1]
"""

from __future__ import annotations

import argparse
import multiprocessing
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

import kvpass.onnx
from kvpass.eval.corpus import text as corpus_text
from kvpass.eval.models import load_smollm2
from kvpass.onnx.export import export_onnx


def serve(path: Path, provider: str, threads: int, channel: Connection) -> None:
    """A worker: one Generator, driven by ("prefill", ids, mask), ("step",) and ("stop",) messages.
    Each answer is (seconds, cache bytes, peak RSS in bytes)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    generator = kvpass.onnx.Generator(path, providers=[provider], session_options=options)
    tokens = None
    while (message := channel.recv())[0] != "stop":
        start = time.perf_counter()
        if message[0] == "prefill":
            _, ids, mask = message
            generator.reset(ids.shape[0])
            tokens = generator.step(ids, mask)[:, -1:].argmax(-1)
        else:
            tokens = generator.step(tokens.astype(np.int64))[:, -1:].argmax(-1)
        seconds = time.perf_counter() - start
        channel.send((seconds, generator.cache_bytes(), peak_rss()))


def peak_rss() -> int:
    """This process's peak resident bytes (VmHWM: unlike getrusage's ru_maxrss, which Linux carries
    across exec, it starts afresh in a spawned worker)."""
    status = Path("/proc/self/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1]) * 1024


def measure(paths: dict[str, Path], provider: str, threads: int, ids: np.ndarray, mask: np.ndarray,
            steps: int) -> dict[str, tuple[float, int, int]]:
    """(mean ms per decode step, most cache bytes from the prefill on, peak RSS) per model, each in its own process."""
    context = multiprocessing.get_context("spawn")
    workers = {}
    for name, path in paths.items():
        ours, theirs = context.Pipe()
        process = context.Process(target=serve, args=(path, provider, threads, theirs), daemon=True)
        process.start()
        workers[name] = (process, ours)
    held, spent, rss = {}, dict.fromkeys(paths, 0.0), {}
    for name, (_, channel) in workers.items():  # one prefill at a time: their transient buffers never overlap
        channel.send(("prefill", ids, mask))
        _, held[name], rss[name] = channel.recv()
    for _ in range(steps):
        for name, (_, channel) in workers.items():
            channel.send(("step",))
            seconds, cached, rss[name] = channel.recv()
            spent[name] += seconds
            held[name] = max(held[name], cached)
    for process, channel in workers.values():
        channel.send(("stop",))
        process.join()
    return {name: (spent[name] / steps * 1e3, held[name], rss[name]) for name in paths}


def left_padded(corpus: np.ndarray, length: int, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """[batch, length] ids and mask: row r holds the last (1 - r/8) x length tokens of a distinct
    stretch of the corpus, left-padded with id 0."""
    ids, mask = np.zeros((batch, length), np.int64), np.zeros((batch, length), np.int64)
    for row in range(batch):
        real = length - row * length // 8
        ids[row, length - real:] = corpus[0, row * length: row * length + real]
        mask[row, length - real:] = 1
    return ids, mask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8000])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 3])
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--budget", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads (0: its default)")
    args = parser.parse_args()
    if args.steps < 1 or args.threads < 0 or min(args.batches) < 1 or min(args.lengths) < 64:
        parser.error("--steps and --batches must be >= 1, --lengths >= 64, --threads >= 0")
    serving = kvpass.onnx.SERVING_EVICT_EVERY
    steps = -(-args.steps // serving) * serving

    model, tokenizer = load_smollm2()
    corpus = tokenizer(corpus_text("dev") + corpus_text("test"), return_tensors="np").input_ids
    needed = max(args.lengths) * max(args.batches)
    if corpus.shape[1] < needed:
        raise SystemExit(f"the shipped corpus has {corpus.shape[1]} tokens; these rows need {needed}")
    folder = Path(tempfile.mkdtemp(prefix="kvpass_onnx_"))
    paths = {"full": folder / "full.onnx"}
    full = export_onnx(model, paths["full"], budget=1.0)
    del model  # only the files stay: each worker loads its own
    for every in sorted({1, serving}):
        name = f"pruned, evict_every {every}" + (" (default)" if every == serving else "")
        paths[name] = folder / f"pruned_every_{every}.onnx"
        onnx.save(kvpass.onnx.optimize(full, budget=args.budget, evict_every=every), paths[name])
    del full
    providers = [p for p in ("CPUExecutionProvider", "CUDAExecutionProvider") if p in ort.get_available_providers()]
    print(f"SmolLM2-135M fp32, budget {args.budget}, default method, {steps} decode steps (mean), "
          f"onnxruntime {ort.__version__}, {args.threads or 'default'} intra-op thread(s), one process per model and row")
    print(f"{'provider':<22}{'batch':>6}{'prompt':>7}  {'cache':<37}{'ms/step':>8}{'x full':>8}"
          f"{'KV MB':>8}{'x full':>8}{'peak RSS GiB':>13}")
    for provider in providers:
        for batch in args.batches:
            for length in args.lengths:
                ids, mask = left_padded(corpus, length, batch)
                figures = measure(paths, provider, args.threads, ids, mask, steps)
                full_ms, full_bytes, _ = figures["full"]
                for name, (ms, held, rss) in figures.items():
                    print(f"{provider:<22}{batch:>6}{length:>7}  {name:<37}{ms:>8.2f}{ms / full_ms:>8.2f}"
                          f"{held / 1e6:>8.1f}{held / full_bytes:>8.3f}{rss / 2**30:>13.2f}", flush=True)


if __name__ == "__main__":
    main()
