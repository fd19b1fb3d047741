"""onnxruntime serving of a kvpass-pruned ONNX model: decode latency and present-KV bytes, full vs pruned.

SmolLM2-135M (fp32) is exported once (`kvpass.export_onnx`, budget 1.0 = the full cache),
then pruned with `kvpass.onnx.optimize` at `evict_every` 1 (evict at every step) and at
`--evict-every` (evict deeper, then only append in between); all run through
`kvpass.onnx.Generator` in the same process, on every available provider (CPU; CUDA when
onnxruntime-gpu is installed). For each prompt length the figures are the mean decode-step
latency over whole eviction periods (`--steps` rounded up to a multiple of `--evict-every`,
so the steps that evict are counted; the models decode in turns, one step each), the most
bytes the present cache (K, V and slots) held from the prefill on, and each as a ratio to
the full cache of the same run.

Run: HF_HUB_OFFLINE=1 python benchmarks/onnx_serving.py [--lengths 1024 2048 4096] [--steps 16] [--budget 0.5]
     [--evict-every 16] [--threads 1]
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

import kvpass.onnx
from kvpass.eval.models import load_smollm2
from kvpass.onnx.export import export_onnx


def measure(generators: dict[str, kvpass.onnx.Generator], ids: np.ndarray, steps: int) -> dict[str, tuple]:
    """(mean ms per decode step, most bytes the present cache held from the prefill on) per generator.
    They decode in turns, one step each, so a change of load on a shared machine hits all alike."""
    tokens, held, spent = {}, {}, dict.fromkeys(generators, 0.0)
    for name, generator in generators.items():
        generator.reset(ids.shape[0])
        tokens[name] = generator.step(ids)[:, -1:].argmax(-1)
        held[name] = generator.cache_bytes()
    for _ in range(steps):
        for name, generator in generators.items():
            start = time.perf_counter()
            tokens[name] = generator.step(tokens[name].astype(np.int64))[:, -1:].argmax(-1)
            spent[name] += time.perf_counter() - start
            held[name] = max(held[name], generator.cache_bytes())
    return {name: (spent[name] / steps * 1e3, held[name]) for name in generators}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--budget", type=float, default=0.5)
    parser.add_argument("--evict-every", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads (0: its default)")
    args = parser.parse_args()
    if args.steps < 1 or args.evict_every < 1 or args.threads < 0:
        parser.error("--steps and --evict-every must be >= 1, --threads >= 0")
    steps = -(-args.steps // args.evict_every) * args.evict_every

    model, tokenizer = load_smollm2()
    text = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
    corpus = tokenizer(text * (max(args.lengths) // 10), return_tensors="np").input_ids
    folder = Path(tempfile.mkdtemp(prefix="kvpass_onnx_"))
    paths = {"full": folder / "full.onnx"}
    full = export_onnx(model, paths["full"], budget=1.0)
    del model  # only the files stay: each session holds its own weights
    for every in sorted({1, args.evict_every}):
        path = paths[f"pruned, evict_every {every}"] = folder / f"pruned_every_{every}.onnx"
        onnx.save(kvpass.onnx.optimize(full, budget=args.budget, evict_every=every), path)
    del full
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    providers = [p for p in ("CPUExecutionProvider", "CUDAExecutionProvider") if p in ort.get_available_providers()]
    print(f"SmolLM2-135M fp32, budget {args.budget}, default method, {steps} decode steps (mean), "
          f"onnxruntime {ort.__version__}, {args.threads or 'default'} intra-op thread(s)")
    print(f"{'provider':<22}{'prompt':>7}  {'cache':<26}{'ms/step':>8}{'x full':>8}{'KV MB':>8}{'x full':>8}")
    for provider in providers:
        generators = {name: kvpass.onnx.Generator(path, providers=[provider], session_options=options)
                      for name, path in paths.items()}
        for length in args.lengths:
            ids = corpus[:, :length]
            figures = measure(generators, ids, steps)
            full_ms, full_bytes = figures["full"]
            for name, (ms, held) in figures.items():
                print(f"{provider:<22}{length:>7}  {name:<26}{ms:>8.2f}{ms / full_ms:>8.2f}"
                      f"{held / 1e6:>8.1f}{held / full_bytes:>8.3f}", flush=True)
    print(f"peak RSS of the process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")


if __name__ == "__main__":
    main()
