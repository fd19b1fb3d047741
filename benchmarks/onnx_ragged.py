"""Ragged plans (per-head budgets, streaming heads) served by onnxruntime on SmolLM2: same tokens as torch,
bytes held, decode time against the uniform plan's graph at the same budget.

Each plan is made on the torch model (`kvpass.optimize`; streaming heads chosen by calibration),
exported with `kvpass.export_onnx` (packed caches for the ragged plans) and run by
`kvpass.onnx.Generator` on one prompt of varied prose from the corpus's test split. Printed per
plan: whether the greedy tokens equal the torch path's, whether every (layer, KV head) holds the
slots torch holds, the most bytes the cache held at any step as a ratio to the full cache, and the
mean decode-step time as a ratio to the uniform plan's graph (measured in the same run, one after
another, one thread). The method is tova, not the default paged_tova: its quantile ranks turn the
runtimes' float differences into whole-rank steps (see `tests/test_onnx.py`'s SmolLM2 test).

Run: HF_HUB_OFFLINE=1 python benchmarks/onnx_ragged.py [--length 1024] [--steps 32] [--budget 0.5]
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

import kvpass
import kvpass.onnx
from kvpass.eval.corpus import text as corpus_text
from kvpass.eval.models import load_smollm2
from kvpass.runtime.call_arguments import output_cache


def plans(budget: float) -> dict[str, list]:
    return {
        "uniform (peer)": [kvpass.Evict("tova")],
        "per-head": [kvpass.Evict("tova", per_head=True)],
        "streaming 1/3 + evict": [kvpass.StreamingHeads(1 / 3), kvpass.Evict("tova")],
        "streaming 1/3 + per-head": [kvpass.StreamingHeads(1 / 3), kvpass.Evict("tova", per_head=True)],
    }


def same_slots(generator, cache) -> bool:
    """Every packed (layer, sequence, KV head) holds the torch cache's slots, in order."""
    return all(np.array_equal(onnx_slots, torch_slots.numpy())
               for layer, site in generator.packed.items()
               for onnx_heads, torch_heads in zip(site.head_slots(), cache.layers[layer].site_cache.head_slots())
               for onnx_slots, torch_slots in zip(onnx_heads, torch_heads))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--budget", type=float, default=0.5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    model, tokenizer = load_smollm2()
    ids = tokenizer(corpus_text("test"), return_tensors="pt").input_ids[:, :args.length]
    rows, peer_step = [], None
    with tempfile.TemporaryDirectory() as folder:
        for name, transforms in plans(args.budget).items():
            optimized = kvpass.optimize(copy.deepcopy(model), budget=args.budget, transforms=transforms,
                                        tokenizer=tokenizer)
            out = optimized.generate(ids, max_new_tokens=args.steps, do_sample=False, return_dict_in_generate=True)
            generator = kvpass.onnx.Generator(kvpass.export_onnx(optimized, Path(folder) / "m.onnx"),
                                              session_options=options)
            generator.reset(1)
            tokens, most, times = ids.numpy(), 0, []
            for step in range(args.steps):
                start = time.perf_counter()
                logits = generator.step(tokens if step == 0 else tokens[:, -1:])
                if step:
                    times.append(time.perf_counter() - start)
                most = max(most, generator.cache_bytes() / generator.full_cache_bytes())
                tokens = np.concatenate([tokens, logits[:, -1].argmax(-1)[:, None]], axis=1)
            step_time = float(np.mean(times))
            peer_step = peer_step or step_time
            rows.append((name, np.array_equal(tokens, out.sequences.numpy()), same_slots(generator, output_cache(out)),
                         most, step_time * 1e3, step_time / peer_step))
    print(f"SmolLM2-135M, ONNX (onnxruntime CPU, 1 thread), tova, budget {args.budget}, prompt {ids.shape[1]} tokens "
          f"(corpus test split), {args.steps} steps")
    print(f"{'plan':26} {'tokens = torch':>14} {'slots = torch':>13} {'KV held / full':>14} {'ms/step':>8} "
          f"{'vs uniform':>10}")
    for name, tokens_equal, slots_equal, most, ms, ratio in rows:
        print(f"{name:26} {str(tokens_equal):>14} {str(slots_equal):>13} {most:>14.3f} {ms:>8.1f} {ratio:>9.2f}x")


if __name__ == "__main__":
    main()
