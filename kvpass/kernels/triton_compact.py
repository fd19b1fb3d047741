"""Triton top-k selection + compaction of a KV cache, bit-identical to `reference.select_and_compact`.

Selection is a threshold, not a sort: with t = the `keep`-th largest score of a row, the
reference's stable descending sort keeps every score > t plus the earliest ties == t. A scan
kernel walks each (batch, KV head) row once in slot order, ranks the ties with a prefix sum,
and writes the kept indices (already in slot order) and slots; a gather kernel then copies
the kept K/V rows, parallel over (row tiles, batch x heads), so the copy runs at bandwidth.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvpass.kernels.triton_spec import next_power_of_2


@triton.jit
def _select_kernel(Scores, Kth, Slots, Index, OutSlots, t, keep, BLOCK_T: tl.constexpr):
    """Per row: indices of scores > kth, then the first `keep - count(> kth)` scores == kth."""
    row = tl.program_id(0)
    kth = tl.load(Kth + row)
    base = Scores + row.to(tl.int64) * t
    above = 0
    for start in range(0, t, BLOCK_T):
        offs = start + tl.arange(0, BLOCK_T)
        s = tl.load(base + offs, mask=offs < t, other=0)
        above += tl.sum(((s > kth) & (offs < t)).to(tl.int32))
    ties_wanted = keep - above
    written = 0
    ties_seen = 0
    for start in range(0, t, BLOCK_T):
        offs = start + tl.arange(0, BLOCK_T)
        ok = offs < t
        s = tl.load(base + offs, mask=ok, other=0)
        tie = ((s == kth) & ok).to(tl.int32)
        take = ((s > kth) & ok) | ((tie > 0) & (ties_seen + tl.cumsum(tie, 0) <= ties_wanted))
        pos = written + tl.cumsum(take.to(tl.int32), 0) - 1
        out = row.to(tl.int64) * keep + pos
        tl.store(Index + out, offs.to(tl.int64), mask=take)
        tl.store(OutSlots + out, tl.load(Slots + row.to(tl.int64) * t + offs, mask=take), mask=take)
        written += tl.sum(take.to(tl.int32))
        ties_seen += tl.sum(tie)


@triton.jit
def _gather_rows_kernel(
    Src, Dst, Index, heads, keep,
    stride_sb, stride_sh, stride_st, stride_sd,
    DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """Dst[b, h, j] = Src[b, h, Index[b, h, j]] for one tile of j."""
    pid_t = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // heads
    h = pid_bh % heads
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    t_ok = offs_t < keep
    mask = t_ok[:, None] & (offs_d < DIM)[None, :]
    idx = tl.load(Index + pid_bh.to(tl.int64) * keep + offs_t, mask=t_ok, other=0)
    src = Src + b.to(tl.int64) * stride_sb + h.to(tl.int64) * stride_sh
    rows = tl.load(src + idx[:, None] * stride_st + offs_d[None, :] * stride_sd, mask=mask)
    dst = Dst + (pid_bh.to(tl.int64) * keep + offs_t[:, None]) * DIM + offs_d[None, :]
    tl.store(dst, rows, mask=mask)


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, D] gathered along T by index [B, H, keep] into a new contiguous tensor."""
    batch, heads, _, dim = x.shape
    keep = index.shape[-1]
    out = x.new_empty(batch, heads, keep, dim)
    block_t = 32 if x.is_cuda else 16
    if keep:
        torch.library.wrap_triton(_gather_rows_kernel)[(triton.cdiv(keep, block_t), batch * heads)](
            x, out, index, heads, keep, *x.stride(),
            DIM=dim, BLOCK_D=next_power_of_2(dim), BLOCK_T=block_t, num_warps=4,
        )
    return out


def select_and_compact(
    k: torch.Tensor, v: torch.Tensor, k_slots: torch.Tensor, scores: torch.Tensor, keep: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton twin of `reference.select_and_compact`: same kept positions, ties to the earlier token."""
    batch, heads, t, _ = k.shape
    if tuple(scores.shape) != (batch, heads, t) or tuple(k_slots.shape) != (batch, heads, t):
        raise ValueError(
            f"scores {tuple(scores.shape)} and k_slots {tuple(k_slots.shape)} must be [B, Hkv, T] = {(batch, heads, t)}"
        )
    if not 0 <= keep <= t:
        raise ValueError(f"keep must be in [0, {t}], got {keep}")
    index = torch.empty(batch, heads, keep, dtype=torch.int64, device=k.device)
    slots = k_slots.new_empty(batch, heads, keep)
    if keep:
        scores = scores.contiguous()
        kth = torch.topk(scores, keep, dim=-1, sorted=False).values.amin(dim=-1).contiguous()
        torch.library.wrap_triton(_select_kernel)[(batch * heads,)](
            scores, kth, k_slots.contiguous(), index, slots, t, keep,
            BLOCK_T=1024 if k.is_cuda else 64, num_warps=4,
        )
    return gather_rows(k, index), gather_rows(v, index), slots, index
