"""Triton kernel for the key–value similarity to running anchors (formula in `kvpass.kernels.similarity`).

One program per (batch row, KV head) walks the call's tokens in order with both anchors in
registers: it scores each token against the anchors before it, then folds the token in. The
scan is sequential in the tokens but reads each key and value once; the fusion across heads
(`similarity.redundancy`) is a few elementwise torch ops on the [B, Hkv, L] result.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvpass.kernels.similarity import EPS, _check
from kvpass.kernels.triton_spec import next_power_of_2


@triton.jit
def _cosine(x, anchor, eps):
    return tl.sum(x * anchor) / tl.maximum(tl.sqrt(tl.sum(x * x)) * tl.sqrt(tl.sum(anchor * anchor)), eps)


@triton.jit
def _kv_similarity_kernel(
    K, V, AnchorK, AnchorV, Valid, Primed, SimK, SimV, OutK, OutV, heads, length, gamma, eps,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    DIM: tl.constexpr, BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0)
    b = row // heads
    h = row % heads
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < DIM
    anchor_k = tl.load(AnchorK + row * DIM + offs_d, mask=d_ok, other=0.0)
    anchor_v = tl.load(AnchorV + row * DIM + offs_d, mask=d_ok, other=0.0)
    primed = tl.load(Primed + b).to(tl.float32)
    k_row = K + b * stride_kb + h * stride_kh
    v_row = V + b * stride_vb + h * stride_vh
    out_row = row.to(tl.int64) * length
    for t in range(0, length):
        valid = tl.load(Valid + b.to(tl.int64) * length + t).to(tl.float32)
        k = tl.load(k_row + t * stride_kt + offs_d * stride_kd, mask=d_ok, other=0.0).to(tl.float32)
        v = tl.load(v_row + t * stride_vt + offs_d * stride_vd, mask=d_ok, other=0.0).to(tl.float32)
        scored = valid * primed
        tl.store(SimK + out_row + t, scored * _cosine(k, anchor_k, eps))
        tl.store(SimV + out_row + t, scored * _cosine(v, anchor_v, eps))
        c = valid * (primed * (1.0 - gamma) + (1.0 - primed))
        anchor_k = (1.0 - c) * anchor_k + c * k
        anchor_v = (1.0 - c) * anchor_v + c * v
        primed = tl.maximum(primed, valid)
    tl.store(OutK + row * DIM + offs_d, anchor_k, mask=d_ok)
    tl.store(OutV + row * DIM + offs_d, anchor_v, mask=d_ok)


def kv_similarity(k, v, anchor_k, anchor_v, valid, primed, gamma):
    """Triton twin of `kvpass.kernels.similarity.kv_similarity` (same arguments and results)."""
    _check(k, v, anchor_k, anchor_v, valid, primed)
    batch, heads, length, dim = k.shape
    sim_k = torch.zeros(batch, heads, length, dtype=torch.float32, device=k.device)
    sim_v = torch.zeros_like(sim_k)
    out_k, out_v = torch.empty_like(anchor_k), torch.empty_like(anchor_v)
    torch.library.wrap_triton(_kv_similarity_kernel)[(batch * heads,)](
        k, v, anchor_k.contiguous(), anchor_v.contiguous(), valid.to(torch.int8).contiguous(),
        primed.to(torch.int8), sim_k, sim_v, out_k, out_v, heads, length, float(gamma), EPS,
        *k.stride(), *v.stride(), DIM=dim, BLOCK_D=next_power_of_2(dim), num_warps=1,
    )
    return sim_k, sim_v, out_k, out_v
