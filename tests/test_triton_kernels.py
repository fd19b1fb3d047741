"""Triton kernels against the torch reference (invariant 5).

Without CUDA the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set here before
triton is first imported), so shapes stay tiny; with CUDA the same tests run on the GPU.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from kvpass.kernels import reference, similarity  # noqa: E402
from kvpass.kernels import similarity_op  # noqa: E402, F401  (registers torch.ops.kvpass.kv_similarity)
from kvpass.kernels.triton_attention import decode_attention, prefill_attention  # noqa: E402
from kvpass.kernels.triton_backend import (  # noqa: E402
    CUDA_KERNELS,
    triton_attention,
    triton_kv_similarity,
    triton_select_and_compact,
)
from kvpass.kernels.triton_spec import KernelSpec  # noqa: E402
from kvpass.methods.base import Stat  # noqa: E402
from kvpass.site import AttentionSite  # noqa: E402

pytestmark = pytest.mark.triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
STATS = [s.value for s in Stat]
TOLERANCE = {torch.float32: 2e-5, torch.float16: 2e-2, torch.bfloat16: 6e-2}


def _slots(batch: int, hkv: int, lq: int, old: int, kept: int, pad: int, seed: int):
    """q_slots [B, lq] and k_slots [B, Hkv, kept + lq]: per head a random sorted subset of `kept` of
    the `old` earlier positions (a compacted cache), then the queries' own positions. Batch row 0
    has its first `pad` positions as left padding (slot stored as -1 - slot)."""
    gen = torch.Generator().manual_seed(seed)
    new = torch.arange(old, old + lq)
    k_slots = torch.stack([
        torch.stack([torch.cat([torch.sort(torch.randperm(old, generator=gen)[:kept]).values, new])
                     for _ in range(hkv)])
        for _ in range(batch)
    ])
    padded = (torch.arange(batch)[:, None, None] == 0) & (k_slots < pad)
    return new.expand(batch, lq).contiguous(), torch.where(padded, -1 - k_slots, k_slots)


def _inputs(batch, hq, hkv, lq, old, kept, dim, dtype, pad=3, seed=0):
    q_slots, k_slots = _slots(batch, hkv, lq, old, kept, pad, seed)
    gen = torch.Generator().manual_seed(seed)
    lk = k_slots.shape[-1]
    q, k, v = (torch.randn(batch, h, n, dim, generator=gen) for h, n in ((hq, lq), (hkv, lk), (hkv, lk)))
    return [x.to(DEVICE, dtype) for x in (q, k, v)] + [q_slots.to(DEVICE), k_slots.to(DEVICE)]


def _assert_attention(args, causal, stat, window, dtype, **kwargs):
    scale = args[0].shape[-1] ** -0.5
    out, stats = triton_attention(*args, scale, causal, stat, window, **kwargs)
    ref_out, ref_stats = reference.attention(*args, scale, causal, stat, window)
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(out.float(), ref_out.float(), atol=tol, rtol=tol)
    torch.testing.assert_close(stats, ref_stats, atol=tol * 4, rtol=tol)
    assert out.dtype == dtype and stats.dtype == torch.float32


@pytest.mark.parametrize("group", [1, 3, 4])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("stat", STATS)
def test_prefill_matches_reference(group, causal, stat):
    args = _inputs(batch=2, hq=2 * group, hkv=2, lq=40, old=0, kept=0, dim=32, dtype=torch.float32)
    _assert_attention(args, causal, stat, window=7, dtype=torch.float32)


@pytest.mark.parametrize("stat", STATS)
def test_prefill_over_compacted_cache(stat):
    args = _inputs(batch=2, hq=6, hkv=2, lq=20, old=30, kept=12, dim=16, dtype=torch.float32, seed=1)
    assert not KernelSpec.from_tensors(args[0], args[1], True, stat).uses_decode(20)
    _assert_attention(args, True, stat, window=5, dtype=torch.float32)


@pytest.mark.parametrize("lq", [1, 4])
@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("stat", STATS)
def test_decode_matches_reference(lq, group, stat):
    args = _inputs(batch=2, hq=2 * group, hkv=2, lq=lq, old=90, kept=70, dim=32, dtype=torch.float32, seed=2)
    assert KernelSpec.from_tensors(args[0], args[1], True, stat).uses_decode(lq)
    _assert_attention(args, True, stat, window=2, dtype=torch.float32)


@pytest.mark.parametrize("splits", [1, 2, 5])
def test_decode_split_k_merges_exactly(splits):
    q, k, v, q_slots, k_slots = _inputs(2, 4, 2, 2, old=150, kept=120, dim=16, dtype=torch.float32, seed=3)
    out, lse = decode_attention(q, k, v, q_slots, k_slots, 0.25, True, num_splits=splits)
    ref_out, ref_lse = prefill_attention(q, k, v, q_slots, k_slots, 0.25, True)
    torch.testing.assert_close(out, ref_out, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse, ref_lse, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(out, reference.attention(q, k, v, q_slots, k_slots, 0.25, True, "none", 0)[0],
                               atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("lq", [2, 24])
def test_per_head_lengths_read_no_padding(lq):
    """Keys at or past lengths[b, h] behave as absent: equal to the reference with them masked,
    even when they hold NaN (so they are provably never read)."""
    q, k, v, q_slots, k_slots = _inputs(2, 4, 2, lq, old=40, kept=40, dim=16, dtype=torch.float32, pad=0, seed=4)
    lengths = torch.tensor([[30, 45], [41, 12]], device=DEVICE)
    beyond = torch.arange(k.shape[2], device=DEVICE) >= lengths[..., None]
    k_masked = torch.where(beyond, -(10**6), k_slots)
    ref = reference.attention(q, k, v, q_slots, k_masked, 0.25, True, "column_sum", 0)
    k_nan, v_nan = (x.masked_fill(beyond[..., None], float("nan")) for x in (k, v))
    out, stats = triton_attention(q, k_nan, v_nan, q_slots, k_slots, 0.25, True, "column_sum", 0, lengths=lengths)
    torch.testing.assert_close(out, ref[0], atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(stats, ref[1], atol=1e-4, rtol=2e-5)


@pytest.mark.parametrize("dim", [16, 24, 64])
def test_head_dims(dim):
    args = _inputs(1, 3, 1, 33, old=0, kept=0, dim=dim, dtype=torch.float32, seed=5)
    _assert_attention(args, True, "column_sum", 0, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("lq", [3, 34])
def test_half_precision(dtype, lq):
    args = _inputs(1, 4, 2, lq, old=20, kept=15, dim=32, dtype=dtype, seed=6)
    _assert_attention(args, True, "window", 4, dtype)


def test_strided_inputs():
    """q/k/v as transposed views of [B, L, H, D] buffers (what a model hands over) need no copy."""
    q, k, v, q_slots, k_slots = _inputs(1, 4, 2, 36, old=0, kept=0, dim=16, dtype=torch.float32, seed=7)
    q_t, k_t, v_t = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))
    assert not q_t.is_contiguous()
    _assert_attention([q_t, k_t, v_t, q_slots, k_slots], False, "column_sum", 0, torch.float32)


def test_kernel_spec_from_site_and_errors():
    site = AttentionSite(name="l0", layer=0, num_heads=32, num_kv_heads=8, head_dim=128, scale=None,
                         causal=True, dtype="bfloat16")
    spec = KernelSpec.from_site(site, Stat.WINDOW)
    assert (spec.group_size, spec.dtype, spec.constexprs()["BLOCK_D"]) == (4, torch.bfloat16, 128)
    assert spec.constexprs()["PRECISION"] == "tf32"
    assert KernelSpec(64, 1, False, Stat.NONE, torch.float32).constexprs()["PRECISION"] == "ieee"
    with pytest.raises(ValueError, match="head_dim"):
        KernelSpec(512, 1, True, Stat.NONE, torch.float16)
    with pytest.raises(ValueError, match="k_slots"):
        q, k, v, q_slots, k_slots = _inputs(1, 2, 1, 4, old=4, kept=4, dim=16, dtype=torch.float32)
        triton_attention(q, k, v, q_slots, k_slots[..., 1:], 0.25, True, "none", 0)


def _compact_case(batch, heads, t, dim, dtype, levels, seed):
    gen = torch.Generator().manual_seed(seed)
    k, v = (torch.randn(batch, heads, t, dim, generator=gen).to(DEVICE, dtype) for _ in range(2))
    k_slots = (torch.arange(t).expand(batch, heads, t) * 3 + 1).contiguous().to(DEVICE)
    scores = torch.randint(0, levels, (batch, heads, t), generator=gen).float().to(DEVICE)
    return k, v, k_slots, scores


def _assert_compact_equal(k, v, k_slots, scores, keep):
    got = triton_select_and_compact(k, v, k_slots, scores, keep)
    want = reference.select_and_compact(k, v, k_slots, scores, keep)
    for name, a, b in zip(("k", "v", "slots", "index"), got, want):
        assert a.dtype == b.dtype and torch.equal(a, b), name


@pytest.mark.parametrize("keep", [0, 1, 29, 70, 100])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_select_and_compact_exact_with_ties(keep, dtype):
    _assert_compact_equal(*_compact_case(2, 3, 100, 24, dtype, levels=4, seed=keep), keep)


@settings(max_examples=12, deadline=None)
@given(t=st.integers(1, 90), frac=st.floats(0, 1), levels=st.integers(1, 1000), seed=st.integers(0, 99))
def test_select_and_compact_property(t, frac, levels, seed):
    _assert_compact_equal(*_compact_case(1, 2, t, 16, torch.float16, levels, seed), round(frac * t))


def test_select_and_compact_reads_strided_cache():
    k, v, k_slots, scores = _compact_case(1, 2, 50, 16, torch.float32, levels=10, seed=9)
    k_t = k.transpose(1, 2).contiguous().transpose(1, 2)
    _assert_compact_equal(k_t, v, k_slots, scores.half(), 17)


def test_similarity_reference_formula():
    """Hand-checkable: each token against the moving average of the valid tokens before it; padding
    neither scores nor moves the anchor; a primed row continues from its anchor."""
    k = torch.tensor([[[[9.0, 9.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]]])
    valid = torch.tensor([[False, True, True, True]])
    zeros = torch.zeros(1, 1, 2)
    s_k, s_v, a_k, a_v = similarity.kv_similarity(k, 2 * k, zeros, zeros, valid, torch.tensor([False]), 0.5)
    torch.testing.assert_close(s_k, torch.tensor([[[0.0, 0.0, 1.0, 0.0]]]))  # padding, first token: no score
    torch.testing.assert_close(s_v, s_k)  # cosines ignore scale
    torch.testing.assert_close(a_k, torch.tensor([[[0.5, 0.5]]]))
    torch.testing.assert_close(a_v, 2 * a_k)
    more = torch.tensor([[[[1.0, 1.0]]]])
    s_k, _, a_k, _ = similarity.kv_similarity(more, more, a_k, a_v, torch.tensor([[True]]), torch.tensor([True]), 0.5)
    torch.testing.assert_close(s_k, torch.ones(1, 1, 1))
    torch.testing.assert_close(a_k, torch.tensor([[[0.75, 0.75]]]))


def test_similarity_fusion_weights_the_signal_heads_agree_on():
    agree = torch.tensor([[[0.2], [0.2], [0.2]]])
    disagree = torch.tensor([[[0.9], [0.1], [0.8]]])
    torch.testing.assert_close(similarity.redundancy(agree, disagree, "joint"), torch.tensor([[0.2]]), atol=1e-4,
                               rtol=0)
    torch.testing.assert_close(similarity.redundancy(disagree, agree, "joint"), torch.tensor([[0.2]]), atol=1e-4,
                               rtol=0)
    torch.testing.assert_close(similarity.redundancy(agree, disagree, "value"), disagree.mean(1))
    with pytest.raises(ValueError, match="fusion must be one of"):
        similarity.redundancy(agree, agree, "keys")


@pytest.mark.parametrize("dtype, dim", [(torch.float32, 24), (torch.float16, 16)])
def test_similarity_kernel_matches_reference(dtype, dim):
    """The kernel scans token by token (the interpreter runs each step in Python: few tokens here)."""
    gen = torch.Generator().manual_seed(dim)
    k, v = (torch.randn(2, 2, 20, dim, generator=gen).add(0.3).to(DEVICE, dtype) for _ in range(2))
    anchor_k, anchor_v = (torch.randn(2, 2, dim, generator=gen).to(DEVICE) for _ in range(2))
    valid = torch.ones(2, 20, dtype=torch.bool)
    valid[0, :6] = False
    valid, primed = valid.to(DEVICE), torch.tensor([False, True], device=DEVICE)
    got = triton_kv_similarity(k, v, anchor_k, anchor_v, valid, primed, 0.9)
    want = torch.ops.kvpass.kv_similarity(k, v, anchor_k, anchor_v, valid, primed, 0.9)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert not got[0][0, :, :7].any()  # padding and the row's first token carry no score


@pytest.mark.skipif(not CUDA_KERNELS, reason="needs CUDA: the ops dispatch to Triton only there")
def test_custom_ops_dispatch_to_triton_on_cuda():
    args = _inputs(1, 4, 2, 3, old=40, kept=30, dim=64, dtype=torch.bfloat16)
    out, stats = torch.ops.kvpass.attention(*args, 0.125, True, "column_sum", 0)
    ref = triton_attention(*args, 0.125, True, "column_sum", 0)
    assert torch.equal(out, ref[0]) and torch.equal(stats, ref[1])
