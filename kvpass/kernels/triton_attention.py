"""Triton attention over a (compacted) KV cache, with the eviction statistics methods need.

Three kernels, all specialised by `KernelSpec` constexprs:

* prefill: flash-style online softmax per query tile; writes the output and each query
  row's log-sum-exp (base 2), never the L x L matrix.
* decode: split-K over long caches, the whole GQA group's queries packed in one tile so
  every K/V byte is read once per KV head; a reduction kernel merges the splits.
* stats: one key tile per program re-derives the probabilities from the saved LSE and sums
  them over the scored queries and the GQA group (COLUMN_SUM / WINDOW / LAST_QUERY), so the
  statistic is deterministic (no atomics) and costs one extra QK^T, not an L x L buffer.

Masking follows `kvpass.kernels.reference.slot_mask` exactly. An optional `lengths [B, Hkv]`
bounds each head's keys (head-wise budgets): keys at or past it are never read. With `offsets`
too, the keys are a ragged cache's packed `[N, D]` buffer (slots `[N]`): head (b, h) is the
segment of `lengths[b, h]` rows starting at row `offsets[b, h]`, and nothing is padded.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kvpass.kernels.reference import first_scored_query
from kvpass.kernels.triton_spec import KernelSpec
from kvpass.methods.base import Stat

LOG2E = 1.4426950408889634


@triton.jit
def _visible(q_slot, k_slot, row_ok, col_ok, CAUSAL: tl.constexpr):
    """[M, N] visibility: key slot >= 0 (and <= query slot if causal), or the query's own padded slot."""
    qs = q_slot[:, None]
    ks = k_slot[None, :]
    vis = ks >= 0
    if CAUSAL:
        vis = vis & (ks <= qs)
    vis = vis | (ks == -1 - qs)
    return vis & row_ok[:, None] & col_ok[None, :]


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr, DOT_FP32: tl.constexpr):
    """tl.dot, or an fp32 dot of the same (already rounded) operands where the target mishandles them."""
    if DOT_FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _key_end(Lengths, b, h, n_kv_heads, lk, HAS_LENGTHS: tl.constexpr):
    """Number of keys this (batch, KV head) holds."""
    if HAS_LENGTHS:
        return tl.minimum(tl.load(Lengths + b * n_kv_heads + h).to(tl.int32), lk)
    return lk


@triton.jit
def _head_row(Offsets, b, h, n_kv_heads, lk, HAS_OFFSETS: tl.constexpr):
    """Row of the first key of this (batch, KV head) in the flattened key rows: its segment's offset in
    a packed ragged cache, or (b * Hkv + h) * Lk in a [B, Hkv, Lk, D] one."""
    if HAS_OFFSETS:
        return tl.load(Offsets + b * n_kv_heads + h).to(tl.int64)
    return (b * n_kv_heads + h).to(tl.int64) * lk


@triton.jit
def _head_keys(K, V, b, h, row, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
               HAS_OFFSETS: tl.constexpr):
    """Pointers to this (batch, KV head)'s first key and value."""
    if HAS_OFFSETS:
        return K + row * stride_kn, V + row * stride_vn
    return K + b * stride_kb + h * stride_kh, V + b * stride_vb + h * stride_vh


@triton.jit
def _attend(
    q, q_slot, row_ok, m_i, l_i, acc,
    K, V, KS, stride_kn, stride_kd, stride_vn, stride_vd,
    lo, hi, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
):
    """Online-softmax accumulation of keys [lo, hi) into (m_i, l_i, acc); tiles nobody sees are skipped."""
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_ok = offs_n < hi
        k_slot = tl.load(KS + offs_n, mask=n_ok, other=0)
        vis = _visible(q_slot, k_slot, row_ok, n_ok, CAUSAL)
        if tl.max(vis.to(tl.int32)) > 0:
            kt = tl.load(
                K + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                mask=n_ok[None, :] & d_ok[:, None], other=0.0,
            )
            s = _dot(q, kt, PRECISION, DOT_FP32) * qk_scale
            s = tl.where(vis, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(
                V + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                mask=n_ok[:, None] & d_ok[None, :], other=0.0,
            )
            acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PRECISION, DOT_FP32)
            m_i = m_new
    return m_i, l_i, acc


@triton.jit
def _finish(m_i, l_i, acc):
    """Normalised output and base-2 LSE; rows that saw nothing give 0 and -inf."""
    seen = l_i > 0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, m_i + tl.log2(tl.where(seen, l_i, 1.0)), float("-inf"))
    return out, lse


@triton.jit
def _prefill_kernel(
    Q, K, V, QS, KS, Lengths, Offsets, Out, Lse,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    n_q_heads, lq, lk, qk_scale,
    HAS_LENGTHS: tl.constexpr, HAS_OFFSETS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
    PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // n_q_heads
    hq = pid_bh % n_q_heads
    hk = hq // GROUP
    n_kv_heads = n_q_heads // GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < lq
    tile_ok = row_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    q = tl.load(
        Q + b * stride_qb + hq * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
        mask=tile_ok, other=0.0,
    )
    q_slot = tl.load(QS + b * lq + offs_m, mask=row_ok, other=0)
    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    row = _head_row(Offsets, b, hk, n_kv_heads, lk, HAS_OFFSETS)
    k_head, v_head = _head_keys(K, V, b, hk, row, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
                                HAS_OFFSETS)
    m_i, l_i, acc = _attend(
        q, q_slot, row_ok, m_i, l_i, acc,
        k_head, v_head, KS + row, stride_kn, stride_kd, stride_vn, stride_vd,
        0, _key_end(Lengths, b, hk, n_kv_heads, lk, HAS_LENGTHS), qk_scale,
        HEAD_DIM, BLOCK_D, BLOCK_N, CAUSAL, PRECISION, DOT_FP32,
    )
    out, lse = _finish(m_i, l_i, acc)
    tl.store(
        Out + b * stride_ob + hq * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
        out.to(Out.dtype.element_ty), mask=tile_ok,
    )
    tl.store(Lse + pid_bh * lq + offs_m, lse, mask=row_ok)


@triton.jit
def _decode_split_kernel(
    Q, K, V, QS, KS, Lengths, Offsets, PartOut, PartLse,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    n_kv_heads, lq, lk, split_len, qk_scale,
    HAS_LENGTHS: tl.constexpr, HAS_OFFSETS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
    PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
):
    pid_s = tl.program_id(0)
    pid_bh = tl.program_id(1)
    n_splits = tl.num_programs(0)
    b = pid_bh // n_kv_heads
    hk = pid_bh % n_kv_heads
    rows = tl.arange(0, BLOCK_M)
    row_ok = rows < GROUP * lq
    g = rows // lq
    i = rows % lq
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q = tl.load(
        Q + b * stride_qb + (hk * GROUP + g)[:, None] * stride_qh + i[:, None] * stride_qm
        + offs_d[None, :] * stride_qd,
        mask=row_ok[:, None] & d_ok[None, :], other=0.0,
    )
    q_slot = tl.load(QS + b * lq + i, mask=row_ok, other=0)
    end = _key_end(Lengths, b, hk, n_kv_heads, lk, HAS_LENGTHS)
    lo = pid_s * split_len
    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    row = _head_row(Offsets, b, hk, n_kv_heads, lk, HAS_OFFSETS)
    k_head, v_head = _head_keys(K, V, b, hk, row, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
                                HAS_OFFSETS)
    m_i, l_i, acc = _attend(
        q, q_slot, row_ok, m_i, l_i, acc,
        k_head, v_head, KS + row, stride_kn, stride_kd, stride_vn, stride_vd,
        lo, tl.minimum(lo + split_len, end), qk_scale,
        HEAD_DIM, BLOCK_D, BLOCK_N, CAUSAL, PRECISION, DOT_FP32,
    )
    out, lse = _finish(m_i, l_i, acc)
    part = pid_bh * n_splits + pid_s
    tl.store(PartOut + (part * BLOCK_M + rows[:, None]) * BLOCK_D + offs_d[None, :], out)
    tl.store(PartLse + part * BLOCK_M + rows, lse)


@triton.jit
def _decode_reduce_kernel(
    PartOut, PartLse, Out, Lse,
    stride_ob, stride_oh, stride_om, stride_od,
    n_kv_heads, lq, n_splits,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """Merge the splits' normalised partial outputs by their LSEs (log-sum-exp of LSEs)."""
    pid_bh = tl.program_id(0)
    b = pid_bh // n_kv_heads
    hk = pid_bh % n_kv_heads
    rows = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m = tl.full([BLOCK_M], -1.0e30, tl.float32)
    w = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for s in range(n_splits):
        part = pid_bh * n_splits + s
        lse_s = tl.load(PartLse + part * BLOCK_M + rows)
        out_s = tl.load(PartOut + (part * BLOCK_M + rows[:, None]) * BLOCK_D + offs_d[None, :])
        m_new = tl.maximum(m, lse_s)
        alpha = tl.exp2(m - m_new)
        beta = tl.exp2(lse_s - m_new)
        acc = acc * alpha[:, None] + out_s * beta[:, None]
        w = w * alpha + beta
        m = m_new
    out, lse = _finish(m, w, acc)
    row_ok = rows < GROUP * lq
    g = rows // lq
    i = rows % lq
    hq = hk * GROUP + g
    tl.store(
        Out + b * stride_ob + hq[:, None] * stride_oh + i[:, None] * stride_om + offs_d[None, :] * stride_od,
        out.to(Out.dtype.element_ty), mask=row_ok[:, None] & (offs_d < HEAD_DIM)[None, :],
    )
    tl.store(Lse + (b * n_kv_heads * GROUP + hq) * lq + i, lse, mask=row_ok)


@triton.jit
def _stats_kernel(
    Q, K, QS, KS, Lengths, Offsets, Lse, Stats,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    n_kv_heads, lq, lk, first_row, qk_scale,
    HAS_LENGTHS: tl.constexpr, HAS_OFFSETS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
    PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
):
    """stats[b, h, n] = sum over the group's heads and queries >= first_row of softmax(q k^T)[q, n]
    (per packed row, for a ragged cache)."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // n_kv_heads
    hk = pid_bh % n_kv_heads
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    end = _key_end(Lengths, b, hk, n_kv_heads, lk, HAS_LENGTHS)
    n_ok = offs_n < end
    row = _head_row(Offsets, b, hk, n_kv_heads, lk, HAS_OFFSETS)
    k_head, _ = _head_keys(K, K, b, hk, row, stride_kb, stride_kh, stride_kn, stride_kb, stride_kh, stride_kn,
                           HAS_OFFSETS)
    kt = tl.load(
        k_head + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd,
        mask=n_ok[None, :] & d_ok[:, None], other=0.0,
    )
    k_slot = tl.load(KS + row + offs_n, mask=n_ok, other=0)
    total = tl.zeros([BLOCK_N], tl.float32)
    for g in range(GROUP):
        hq = hk * GROUP + g
        for start in range(first_row, lq, BLOCK_M):
            offs_m = start + tl.arange(0, BLOCK_M)
            row_ok = offs_m < lq
            q_slot = tl.load(QS + b * lq + offs_m, mask=row_ok, other=0)
            vis = _visible(q_slot, k_slot, row_ok, n_ok, CAUSAL)
            if tl.max(vis.to(tl.int32)) > 0:
                q = tl.load(
                    Q + b * stride_qb + hq * stride_qh + offs_m[:, None] * stride_qm
                    + offs_d[None, :] * stride_qd,
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0,
                )
                lse = tl.load(Lse + ((b * n_kv_heads * GROUP) + hq) * lq + offs_m, mask=row_ok, other=0.0)
                s = _dot(q, kt, PRECISION, DOT_FP32) * qk_scale
                p = tl.where(vis, tl.exp2(s - lse[:, None]), 0.0)
                total += tl.sum(p, 0)
    if HAS_OFFSETS:  # a packed segment ends where the next head's begins
        tl.store(Stats + row + offs_n, total, mask=n_ok)
    else:
        tl.store(Stats + row + offs_n, total, mask=offs_n < lk)


def _strides(x: torch.Tensor) -> tuple[int, ...]:
    return tuple(x.stride())


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_slots: torch.Tensor, k_slots: torch.Tensor) -> None:
    """Shape errors that name the argument, instead of an out-of-bounds read inside a kernel."""
    batch, _, lq, dim = q.shape
    if k.shape != v.shape or k.shape[0] != batch or k.shape[-1] != dim:
        raise ValueError(
            f"k {tuple(k.shape)} and v {tuple(v.shape)} must be [B, Hkv, Lk, {dim}] for q {tuple(q.shape)}"
        )
    if tuple(q_slots.shape) != (batch, lq):
        raise ValueError(f"q_slots must be [B, Lq] = {(batch, lq)}, got {tuple(q_slots.shape)}")
    if tuple(k_slots.shape) != tuple(k.shape[:3]):
        raise ValueError(f"k_slots must be [B, Hkv, Lk] = {tuple(k.shape[:3])}, got {tuple(k_slots.shape)}")


@dataclass(frozen=True)
class _Keys:
    """How the kernels read K/V: [B, Hkv, Lk, D] tensors, or a ragged cache's packed [N, D] buffers
    with each head's `offsets` and `lengths` (then `length` is the longest head)."""

    kv_heads: int
    length: int
    k_strides: tuple[int, ...]
    v_strides: tuple[int, ...]
    lengths: torch.Tensor
    offsets: torch.Tensor
    has_lengths: bool
    has_offsets: bool

    def spec(self, q: torch.Tensor, causal: bool, stat: Stat | str) -> KernelSpec:
        return KernelSpec(q.shape[-1], q.shape[1] // self.kv_heads, bool(causal), Stat(stat), q.dtype,
                          interpreted=q.device.type != "cuda")

    def constexprs(self) -> dict[str, bool]:
        return {"HAS_LENGTHS": self.has_lengths, "HAS_OFFSETS": self.has_offsets}


def _keys(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_slots: torch.Tensor, k_slots: torch.Tensor,
          lengths: torch.Tensor | None, offsets: torch.Tensor | None) -> _Keys:
    """The key layout of one call, with shape errors that name the argument."""
    if offsets is None:
        _check(q, k, v, q_slots, k_slots)
        if lengths is not None and tuple(lengths.shape) != tuple(k.shape[:2]):
            raise ValueError(f"lengths must be [B, Hkv] = {tuple(k.shape[:2])}, got {tuple(lengths.shape)}")
        lens = lengths.contiguous() if lengths is not None else _absent(k)
        if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
            raise ValueError(f"q heads ({q.shape[1]}) must be a multiple of k heads ({k.shape[1]})")
        return _Keys(k.shape[1], k.shape[2], _strides(k), _strides(v), lens, _absent(k), lengths is not None, False)
    batch, heads, lq, dim = q.shape
    if lengths is None or lengths.dim() != 2 or lengths.shape[0] != batch or heads % max(lengths.shape[1], 1):
        raise ValueError(f"a packed cache needs lengths [B, Hkv] with Hq % Hkv == 0 for q {tuple(q.shape)}, "
                         f"got {None if lengths is None else tuple(lengths.shape)}")
    if tuple(offsets.shape) != tuple(lengths.shape):
        raise ValueError(f"offsets must be [B, Hkv] = {tuple(lengths.shape)}, got {tuple(offsets.shape)}")
    if k.dim() != 2 or k.shape != v.shape or k.shape[1] != dim or tuple(k_slots.shape) != (k.shape[0],):
        raise ValueError(f"a packed cache has k, v [N, {dim}] and k_slots [N]; got k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}, k_slots {tuple(k_slots.shape)}")
    if tuple(q_slots.shape) != (batch, lq):
        raise ValueError(f"q_slots must be [B, Lq] = {(batch, lq)}, got {tuple(q_slots.shape)}")
    longest = int(lengths.max()) if lengths.numel() else 0
    return _Keys(lengths.shape[1], longest, (0, 0, *k.stride()), (0, 0, *v.stride()), lengths.contiguous(),
                 offsets.contiguous(), True, True)


def _absent(k: torch.Tensor) -> torch.Tensor:
    """A placeholder pointer for an absent optional tensor (never dereferenced)."""
    return k.new_empty(1, dtype=torch.int32)


def prefill_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_slots: torch.Tensor, k_slots: torch.Tensor,
    scale: float, causal: bool, lengths: torch.Tensor | None = None, offsets: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flash-style attention: out [B, Hq, Lq, D] and base-2 log-sum-exp [B, Hq, Lq] (float32).

    With `offsets [B, Hkv]`, k and v are a packed ragged cache [N, D] and k_slots [N] (see the module)."""
    keys = _keys(q, k, v, q_slots, k_slots, lengths, offsets)
    spec = keys.spec(q, causal, Stat.NONE)
    launch = spec.prefill()
    batch, hq, lq, _ = q.shape
    out = torch.empty_like(q)
    lse = torch.empty(batch, hq, lq, dtype=torch.float32, device=q.device)
    grid = (triton.cdiv(lq, launch.block_m), batch * hq)
    torch.library.wrap_triton(_prefill_kernel)[grid](
        q, k, v, q_slots.contiguous(), k_slots.contiguous(), keys.lengths, keys.offsets, out, lse,
        *_strides(q), *keys.k_strides, *keys.v_strides, *_strides(out),
        hq, lq, keys.length, scale * LOG2E,
        **keys.constexprs(), **spec.constexprs(), **launch.options(),
    )
    return out, lse


def decode_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_slots: torch.Tensor, k_slots: torch.Tensor,
    scale: float, causal: bool, lengths: torch.Tensor | None = None, num_splits: int | None = None,
    offsets: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split-K attention for a few queries over a long cache; same outputs as `prefill_attention`.

    `lengths [B, Hkv]` gives each head's number of valid keys (head-wise budgets): keys past
    it are not read; with `offsets [B, Hkv]` too, k and v are a packed ragged cache [N, D].
    `num_splits` overrides the spec's split-K factor.
    """
    keys = _keys(q, k, v, q_slots, k_slots, lengths, offsets)
    spec = keys.spec(q, causal, Stat.NONE)
    batch, hq, lq, _ = q.shape
    hkv, lk = keys.kv_heads, keys.length
    launch = spec.decode(lq)
    if num_splits is None:
        sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 2
        num_splits = spec.decode_splits(lk, batch * hkv, sms)
    split_len = triton.cdiv(triton.cdiv(max(lk, 1), num_splits), launch.block_n) * launch.block_n
    num_splits = max(1, triton.cdiv(lk, split_len))
    parts = batch * hkv * num_splits * launch.block_m
    part_out = torch.empty(parts * spec.block_d, dtype=torch.float32, device=q.device)
    part_lse = torch.empty(parts, dtype=torch.float32, device=q.device)
    consts = spec.constexprs()
    torch.library.wrap_triton(_decode_split_kernel)[(num_splits, batch * hkv)](
        q, k, v, q_slots.contiguous(), k_slots.contiguous(), keys.lengths, keys.offsets, part_out, part_lse,
        *_strides(q), *keys.k_strides, *keys.v_strides,
        hkv, lq, lk, split_len, scale * LOG2E,
        **keys.constexprs(), **consts, **launch.options(),
    )
    out = torch.empty_like(q)
    lse = torch.empty(batch, hq, lq, dtype=torch.float32, device=q.device)
    torch.library.wrap_triton(_decode_reduce_kernel)[(batch * hkv,)](
        part_out, part_lse, out, lse, *_strides(out), hkv, lq, num_splits,
        GROUP=consts["GROUP"], HEAD_DIM=consts["HEAD_DIM"], BLOCK_D=consts["BLOCK_D"],
        BLOCK_M=launch.block_m, num_warps=launch.num_warps,
    )
    return out, lse


def attention_stats(
    q: torch.Tensor, k: torch.Tensor, q_slots: torch.Tensor, k_slots: torch.Tensor, lse: torch.Tensor,
    scale: float, causal: bool, stat: Stat | str, window: int, lengths: torch.Tensor | None = None,
    offsets: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-key statistic [B, Hkv, Lk] (float32) from the attention's saved base-2 LSE; per packed
    row [N] with `offsets` (a ragged cache)."""
    keys = _keys(q, k, k, q_slots, k_slots, lengths, offsets)
    spec = keys.spec(q, causal, stat)
    batch, _, lq, _ = q.shape
    hkv, lk = keys.kv_heads, keys.length
    stats = torch.zeros(k_slots.shape, dtype=torch.float32, device=q.device)
    first = first_scored_query(spec.stat, lq, window)
    if first >= lq or lk == 0:
        return stats
    launch = spec.stats()
    torch.library.wrap_triton(_stats_kernel)[(triton.cdiv(lk, launch.block_n), batch * hkv)](
        q, k, q_slots.contiguous(), k_slots.contiguous(), keys.lengths, keys.offsets, lse, stats,
        *_strides(q), *keys.k_strides,
        hkv, lq, lk, first, scale * LOG2E,
        **keys.constexprs(), **spec.constexprs(), **launch.options(),
    )
    return stats


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_slots: torch.Tensor, k_slots: torch.Tensor,
    scale: float, causal: bool, stat: str, window: int, lengths: torch.Tensor | None = None,
    offsets: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of `reference.attention`: decode kernel for few queries, prefill kernel otherwise."""
    out, lse = attention_with_lse(q, k, v, q_slots, k_slots, scale, causal, lengths, offsets)
    return out, attention_stats(q, k, q_slots, k_slots, lse, scale, causal, stat, window, lengths, offsets)


def attention_with_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_slots: torch.Tensor, k_slots: torch.Tensor,
    scale: float, causal: bool, lengths: torch.Tensor | None = None, offsets: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, base-2 LSE): the decode kernel for few queries, the prefill kernel otherwise."""
    heads = lengths.shape[1] if offsets is not None else k.shape[1]
    if KernelSpec(q.shape[-1], q.shape[1] // heads, bool(causal), Stat.NONE, q.dtype).uses_decode(q.shape[2]):
        return decode_attention(q, k, v, q_slots, k_slots, scale, causal, lengths, offsets=offsets)
    return prefill_attention(q, k, v, q_slots, k_slots, scale, causal, lengths, offsets)
