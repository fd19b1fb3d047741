"""onnxruntime serving of a kvpass-pruned ONNX model: decode latency, present-KV bytes and peak RSS, full vs pruned.

SmolLM2-135M (fp32) is exported once (`kvpass.export_onnx`, budget 1.0 = the full cache), then
pruned with `kvpass.onnx.optimize` at `evict_every` 1 (evict at every step) and at the serving
default (`kvpass.onnx.SERVING_EVICT_EVERY`); all run through `kvpass.onnx.Generator`.

Rows: every prompt length, for batch 1 and for a left-padded batch of 3 (rows of the full length,
7/8 and 3/4 of it, as a server batches requests of different lengths). For each row every model
runs alone, one after another, in a fresh worker process, so the peak RSS printed is that model's
(weights, prefill, cache). The prompt is prefilled in chunks (`--prefill-chunk`, as servers do: the
L x T attention of an unchunked 4K x 3 prefill already held ~6 GiB per model). Figures: the mean
decode-step latency over whole eviction periods (`--steps` rounded up to a multiple of the serving
`evict_every`, so the steps that evict are counted), the most bytes the cache (K, V, slots and
carried statistics) held from the prefill on, each as a ratio to the full cache of the same row,
and the worker's peak RSS. Run it on an otherwise idle machine: the models of a row are timed one
after another.

Run: HF_HUB_OFFLINE=1 python benchmarks/onnx_serving.py [--lengths 1024 2048 4096 8000] [--batches 1 3]
     [--steps 16] [--budget 0.5] [--threads 1] [--prefill-chunk 2048]
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


def serve(path: Path, provider: str, threads: int, chunks: list[slice], ids: np.ndarray, mask: np.ndarray,
          steps: int, channel: Connection) -> None:
    """A worker: one Generator; prefills `ids` chunk by chunk, decodes `steps` greedy steps, and sends
    back (mean seconds per step, most cache bytes from the prefill on, peak RSS in bytes)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    generator = kvpass.onnx.Generator(path, providers=[provider], session_options=options)
    generator.reset(ids.shape[0])
    for chunk in chunks:
        logits = generator.step(ids[:, chunk], mask[:, chunk])
    held, spent = generator.cache_bytes(), 0.0
    for _ in range(steps):
        tokens = logits[:, -1:].argmax(-1).astype(np.int64)
        start = time.perf_counter()
        logits = generator.step(tokens)
        spent += time.perf_counter() - start
        held = max(held, generator.cache_bytes())
    channel.send((spent / steps, held, peak_rss()))


def peak_rss() -> int:
    """This process's peak resident bytes (VmHWM: unlike getrusage's ru_maxrss, which Linux carries
    across exec, it starts afresh in a spawned worker)."""
    status = Path("/proc/self/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1]) * 1024


def measure(paths: dict[str, Path], provider: str, threads: int, chunks: list[slice], ids: np.ndarray,
            mask: np.ndarray, steps: int) -> dict[str, tuple[float, int, int]]:
    """(mean ms per decode step, most cache bytes, peak RSS) per model, each alone in a fresh process."""
    context = multiprocessing.get_context("spawn")
    figures = {}
    for name, path in paths.items():
        ours, theirs = context.Pipe(duplex=False)
        worker = context.Process(target=serve, args=(path, provider, threads, chunks, ids, mask, steps, theirs))
        worker.start()
        theirs.close()  # so that a worker that dies (out of memory) ends the wait with an error
        try:
            seconds, held, rss = ours.recv()
        except EOFError:
            worker.join()
            raise SystemExit(f"{name}: the worker died (exit code {worker.exitcode}); out of memory? "
                             "try a smaller --prefill-chunk") from None
        worker.join()
        figures[name] = (seconds * 1e3, held, rss)
    return figures


def prefill_chunks(mask: np.ndarray, size: int) -> list[slice]:
    """Slices of at most about `size` tokens that cover the prompt, the last ones `size` long; the first
    reaches past every row's padding (a chunk must end on a real token in every row)."""
    length = mask.shape[1]
    first_real = int((mask.argmax(axis=1)).max())
    bounds = list(range(length, first_real, -size))[::-1]
    return [slice(start, end) for start, end in zip([0, *bounds[:-1]], bounds)]


def left_padded(corpus: np.ndarray, length: int, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """[batch, length] ids and mask: row r holds the first (1 - r/8) x length tokens of the corpus'
    r-th stretch of `length` tokens, left-padded with id 0."""
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
    parser.add_argument("--prefill-chunk", type=int, default=2048,
                        help="prefill in chunks of this many tokens, as a server does (the L x T attention of one "
                             "8K x 3 chunk would not fit in 24 GiB)")
    args = parser.parse_args()
    if args.steps < 1 or args.threads < 0 or min(args.batches) < 1 or min(args.lengths) < 64 or args.prefill_chunk < 1:
        parser.error("--steps, --batches and --prefill-chunk must be >= 1, --lengths >= 64, --threads >= 0")
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
          f"onnxruntime {ort.__version__}, {args.threads or 'default'} intra-op thread(s), prefill in chunks of "
          f"{args.prefill_chunk}, one process per model and row, one after another")
    print(f"{'provider':<22}{'batch':>6}{'prompt':>7}  {'cache':<37}{'ms/step':>8}{'x full':>8}"
          f"{'KV MB':>8}{'x full':>8}{'peak RSS GiB':>13}")
    for provider in providers:
        for batch in args.batches:
            for length in args.lengths:
                ids, mask = left_padded(corpus, length, batch)
                chunks = prefill_chunks(mask, args.prefill_chunk)
                figures = measure(paths, provider, args.threads, chunks, ids, mask, steps)
                full_ms, full_bytes, _ = figures["full"]
                for name, (ms, held, rss) in figures.items():
                    print(f"{provider:<22}{batch:>6}{length:>7}  {name:<37}{ms:>8.2f}{ms / full_ms:>8.2f}"
                          f"{held / 1e6:>8.1f}{held / full_bytes:>8.3f}{rss / 2**30:>13.2f}", flush=True)


if __name__ == "__main__":
    main()
