"""Kernel benchmarks: every figure is a ratio against a peer measured in the same run.

bf16, Hq=32, Hkv=8, d=128 (a Llama-3-8B-like site):
* decode, batch 8, 32K-128K context: full-cache SDPA vs kvpass decode over a compacted cache
  at budget 0.5 / 0.25 (speedup), and the naive peer `index_select` + SDPA; achieved K/V
  bandwidth as a fraction of `torch.empty_like(x).copy_(x)` bandwidth.
* prefill, batch 1, 8K-64K: kvpass prefill + WINDOW / COLUMN_SUM statistics vs SDPA alone.
* select + compact: bandwidth of the fused top-k + K/V gather vs the same copy.

Run: python benchmarks/kernels.py  (needs a CUDA GPU; prints a message and exits 0 without one).
"""

from __future__ import annotations

import sys

import torch

HQ, HKV, DIM, DTYPE = 32, 8, 128, torch.bfloat16
GB = 1e9


def _bench(fn) -> float:
    """Median milliseconds of fn()."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=10, rep=50, return_mode="median")


def _copy_bandwidth(nbytes: int) -> float:
    """Bytes/s of a plain device copy (read + write) of an `nbytes` buffer: the roofline peer."""
    x = torch.empty(nbytes // 2, dtype=DTYPE, device="cuda")
    return 2 * nbytes / (_bench(lambda: torch.empty_like(x).copy_(x)) * 1e-3)


def _cache(batch: int, length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    k, v = (torch.randn(batch, HKV, length, DIM, dtype=DTYPE, device="cuda") for _ in range(2))
    slots = torch.arange(length, device="cuda").expand(batch, HKV, length).contiguous()
    return k, v, slots


def bench_decode(batch: int = 8, contexts: tuple[int, ...] = (32768, 65536, 131072)) -> None:
    from kvpass.kernels.triton_attention import attention

    copy_bw = _copy_bandwidth(1 << 30)
    print(f"\n## decode  B={batch} Hq={HQ} Hkv={HKV} d={DIM} bf16   (copy bandwidth {copy_bw / GB:.0f} GB/s)")
    print("context  budget  sdpa_full/kvpass  sdpa_full/(index_select+sdpa)  kvpass_bw/copy_bw")
    for length in contexts:
        k, v, slots = _cache(batch, length)
        q = torch.randn(batch, HQ, 1, DIM, dtype=DTYPE, device="cuda")
        q_slots = torch.full((batch, 1), length, device="cuda")
        scale = DIM**-0.5
        full = _bench(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True))
        for budget in (0.5, 0.25):
            kept = int(length * budget)
            index = torch.sort(torch.randperm(length, device="cuda")[:kept]).values
            ck, cv, cs = (x.index_select(2, index).contiguous() for x in (k, v, slots))
            ours = _bench(lambda: attention(q, ck, cv, q_slots, cs, scale, True, "none", 0))
            naive = _bench(lambda: torch.nn.functional.scaled_dot_product_attention(
                q, k.index_select(2, index), v.index_select(2, index), scale=scale, enable_gqa=True))
            kv_bytes = 2 * ck.numel() * ck.element_size()
            print(f"{length:>7}  {budget:>6}  {full / ours:>16.2f}  {full / naive:>29.2f}  "
                  f"{kv_bytes / (ours * 1e-3) / copy_bw:>17.2f}")
        del k, v, slots


def bench_prefill(contexts: tuple[int, ...] = (8192, 16384, 32768, 65536)) -> None:
    from kvpass.kernels.triton_attention import attention

    print(f"\n## prefill  B=1 Hq={HQ} Hkv={HKV} d={DIM} bf16 causal   (time ratio vs SDPA alone; <1 is faster)")
    print("context  kvpass_none/sdpa  kvpass+window64/sdpa  kvpass+column_sum/sdpa")
    for length in contexts:
        k, v, slots = _cache(1, length)
        q = torch.randn(1, HQ, length, DIM, dtype=DTYPE, device="cuda")
        q_slots = slots[:, 0]
        scale = DIM**-0.5
        sdpa = _bench(lambda: torch.nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=True, scale=scale, enable_gqa=True))
        ratios = [
            _bench(lambda s=stat: attention(q, k, v, q_slots, slots, scale, True, s, 64)) / sdpa
            for stat in ("none", "window", "column_sum")
        ]
        print(f"{length:>7}  " + "  ".join(f"{r:>16.2f}" for r in ratios))
        del k, v, q


def bench_compact(batch: int = 8, length: int = 65536) -> None:
    from kvpass.kernels.triton_compact import select_and_compact

    k, v, slots = _cache(batch, length)
    scores = torch.rand(batch, HKV, length, device="cuda")
    copy_bw = _copy_bandwidth(2 * k.numel() * k.element_size())
    print(f"\n## select+compact  B={batch} Hkv={HKV} T={length} d={DIM} bf16   (bandwidth vs copy)")
    print("budget  compact_bw/copy_bw")
    for budget in (0.5, 0.25):
        keep = int(length * budget)
        ms = _bench(lambda: select_and_compact(k, v, slots, scores, keep))
        moved = 2 * (2 * batch * HKV * keep * DIM * k.element_size()) + scores.numel() * scores.element_size()
        print(f"{budget:>6}  {moved / (ms * 1e-3) / copy_bw:>18.2f}")


def main() -> int:
    if not torch.cuda.is_available():
        print("benchmarks/kernels.py: no CUDA device; the Triton kernels are benchmarked on GPU only. Skipping.")
        return 0
    bench_decode()
    bench_prefill()
    bench_compact()
    return 0


if __name__ == "__main__":
    sys.exit(main())
