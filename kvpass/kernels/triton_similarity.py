"""Triton kernel for the token-filtering redundancy score (formula in `kvpass.kernels.similarity`).

One program per (batch, KV head) streams the row's keys and values twice: once for the mean
key/value, once for each token's two cosines and the running moments of both; the variance
weights are known only then, so the cosines are parked in the output and a scratch row and
mixed in a last pass over those (T floats, not T x D).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvpass.kernels.similarity import EPS
from kvpass.kernels.triton_spec import next_power_of_2


@triton.jit
def _cosine(x, mean, mean_norm, eps):
    """Cosine of each row of x [T, D] to mean [D]."""
    dots = tl.sum(x * mean[None, :], 1)
    return dots / tl.maximum(tl.sqrt(tl.sum(x * x, 1)) * mean_norm, eps)


@triton.jit
def _kv_similarity_kernel(
    K, V, Slots, Out, Scratch, heads, t, eps,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
):
    row = tl.program_id(0)
    b = row // heads
    h = row % heads
    k_row = K + b * stride_kb + h * stride_kh
    v_row = V + b * stride_vb + h * stride_vh
    out_row = Out + row.to(tl.int64) * t
    scratch_row = Scratch + row.to(tl.int64) * t
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < DIM
    k_sum = tl.zeros([BLOCK_D], tl.float32)
    v_sum = tl.zeros([BLOCK_D], tl.float32)
    count = 0.0
    for start in range(0, t, BLOCK_T):
        offs_t = start + tl.arange(0, BLOCK_T)
        valid = (tl.load(Slots + row.to(tl.int64) * t + offs_t, mask=offs_t < t, other=-1) >= 0)
        mask = valid[:, None] & d_ok[None, :]
        k = tl.load(k_row + offs_t[:, None] * stride_kt + offs_d[None, :] * stride_kd, mask=mask, other=0.0)
        v = tl.load(v_row + offs_t[:, None] * stride_vt + offs_d[None, :] * stride_vd, mask=mask, other=0.0)
        k_sum += tl.sum(k.to(tl.float32), 0)
        v_sum += tl.sum(v.to(tl.float32), 0)
        count += tl.sum(valid.to(tl.float32))
    count = tl.maximum(count, 1.0)
    k_mean = k_sum / count
    v_mean = v_sum / count
    k_mean_norm = tl.sqrt(tl.sum(k_mean * k_mean))
    v_mean_norm = tl.sqrt(tl.sum(v_mean * v_mean))
    sum_k = 0.0
    sum_v = 0.0
    squares_k = 0.0
    squares_v = 0.0
    for start in range(0, t, BLOCK_T):
        offs_t = start + tl.arange(0, BLOCK_T)
        valid = (tl.load(Slots + row.to(tl.int64) * t + offs_t, mask=offs_t < t, other=-1) >= 0)
        mask = valid[:, None] & d_ok[None, :]
        k = tl.load(k_row + offs_t[:, None] * stride_kt + offs_d[None, :] * stride_kd, mask=mask, other=0.0)
        v = tl.load(v_row + offs_t[:, None] * stride_vt + offs_d[None, :] * stride_vd, mask=mask, other=0.0)
        sim_k = tl.where(valid, _cosine(k.to(tl.float32), k_mean, k_mean_norm, eps), 0.0)
        sim_v = tl.where(valid, _cosine(v.to(tl.float32), v_mean, v_mean_norm, eps), 0.0)
        tl.store(out_row + offs_t, sim_k, mask=offs_t < t)
        tl.store(scratch_row + offs_t, sim_v, mask=offs_t < t)
        sum_k += tl.sum(sim_k)
        sum_v += tl.sum(sim_v)
        squares_k += tl.sum(sim_k * sim_k)
        squares_v += tl.sum(sim_v * sim_v)
    var_k = tl.maximum(squares_k / count - (sum_k / count) * (sum_k / count), 0.0)
    var_v = tl.maximum(squares_v / count - (sum_v / count) * (sum_v / count), 0.0)
    weight = (var_k + eps) / (var_k + var_v + 2 * eps)
    tl.debug_barrier()
    for start in range(0, t, BLOCK_T):
        offs_t = start + tl.arange(0, BLOCK_T)
        in_row = offs_t < t
        valid = (tl.load(Slots + row.to(tl.int64) * t + offs_t, mask=in_row, other=-1) >= 0)
        sim_k = tl.load(out_row + offs_t, mask=in_row, other=0.0)
        sim_v = tl.load(scratch_row + offs_t, mask=in_row, other=0.0)
        redundancy = weight * sim_k + (1 - weight) * sim_v
        tl.store(out_row + offs_t, tl.where(valid, redundancy, float("inf")), mask=in_row)


def kv_similarity(k: torch.Tensor, v: torch.Tensor, k_slots: torch.Tensor) -> torch.Tensor:
    """Triton twin of `kvpass.kernels.similarity.kv_similarity`: redundancy [B, Hkv, T], float32."""
    if k.shape != v.shape or tuple(k_slots.shape) != tuple(k.shape[:3]):
        raise ValueError(
            f"k {tuple(k.shape)} and v {tuple(v.shape)} must match and k_slots {tuple(k_slots.shape)} be [B, Hkv, T]"
        )
    batch, heads, t, dim = k.shape
    out = torch.empty(batch, heads, t, dtype=torch.float32, device=k.device)
    if t:
        scratch = torch.empty_like(out)
        torch.library.wrap_triton(_kv_similarity_kernel)[(batch * heads,)](
            k, v, k_slots.contiguous(), out, scratch, heads, t, EPS, *k.stride(), *v.stride(),
            DIM=dim, BLOCK_D=next_power_of_2(dim), BLOCK_T=64 if k.is_cuda else 32, num_warps=4,
        )
    return out
