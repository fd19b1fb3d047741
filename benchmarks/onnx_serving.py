"""onnxruntime serving of a kvpass-pruned ONNX model: decode latency and present-KV bytes, full vs pruned.

SmolLM2-135M (fp32) is exported once (`kvpass.export_onnx`, budget 1.0 = the full cache),
then pruned with `kvpass.onnx.optimize`; both run through `kvpass.onnx.Generator` in the
same process, on every available provider (CPU; CUDA when onnxruntime-gpu is installed).
For each prompt length the figures are the median decode-step latency and the bytes of the
present cache (K, V and slots) after the prefill, and the pruned/full ratio of each.

Run: HF_HUB_OFFLINE=1 python benchmarks/onnx_serving.py [--lengths 1024 2048 4096] [--steps 16] [--budget 0.5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

import kvpass.onnx
from kvpass.eval.models import load_smollm2
from kvpass.onnx.export import export_onnx


def measure(generator: kvpass.onnx.Generator, ids: np.ndarray, steps: int) -> tuple[float, int]:
    """(median ms per decode step, bytes of the present cache right after the prefill)."""
    generator.reset(ids.shape[0])
    token = generator.step(ids)[:, -1:].argmax(-1)
    held = sum(t.nbytes for entry in generator.cache.values() for t in entry if t is not None)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        token = generator.step(token.astype(np.int64))[:, -1:].argmax(-1)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3, held


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--budget", type=float, default=0.5)
    args = parser.parse_args()

    model, tokenizer = load_smollm2()
    folder = Path(tempfile.mkdtemp(prefix="kvpass_onnx_"))
    full = export_onnx(model, folder / "full.onnx", budget=1.0)
    pruned = kvpass.onnx.optimize(full, budget=args.budget)
    text = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
    corpus = tokenizer(text * (max(args.lengths) // 10), return_tensors="np").input_ids
    providers = [p for p in ("CPUExecutionProvider", "CUDAExecutionProvider") if p in ort.get_available_providers()]
    print(f"SmolLM2-135M fp32, budget {args.budget}, default method, {args.steps} decode steps, onnxruntime {ort.__version__}")
    print(f"{'provider':<22}{'prompt':>7}{'full ms':>9}{'pruned ms':>10}{'ratio':>7}{'full MB':>9}{'pruned MB':>10}{'ratio':>7}")
    for provider in providers:
        generators = {name: kvpass.onnx.Generator(proto, providers=[provider]) for name, proto in
                      (("full", full), ("pruned", pruned))}
        for length in args.lengths:
            ids = corpus[:, :length]
            (full_ms, full_bytes), (pruned_ms, pruned_bytes) = (measure(generators[name], ids, args.steps)
                                                                for name in ("full", "pruned"))
            print(f"{provider:<22}{length:>7}{full_ms:>9.2f}{pruned_ms:>10.2f}{pruned_ms / full_ms:>7.2f}"
                  f"{full_bytes / 1e6:>9.1f}{pruned_bytes / 1e6:>10.1f}{pruned_bytes / full_bytes:>7.3f}")


if __name__ == "__main__":
    main()
