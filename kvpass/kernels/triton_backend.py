"""Plugs the Triton kernels in as the CUDA implementations of the `torch.ops.kvpass` custom ops.

CPU keeps the torch reference. Registration happens at import, only when Triton imports and
CUDA is available; attention inputs the kernels do not cover (float64, head_dim > 256, a model's
own mask, soft-capping, sink logits) fall back to the reference on CUDA too, so the ops never
refuse an input the reference accepts.

The plain functions `triton_attention`, `triton_ragged_attention`, `triton_select_and_compact` and
`triton_kv_similarity` call the Triton path directly; with TRITON_INTERPRET=1 set before triton is imported they run
on CPU tensors, which is how the tests check Triton against the reference without a GPU.
"""

from __future__ import annotations

import torch

from kvpass.kernels import ops, ragged, ragged_op, reference, similarity, similarity_op  # noqa: F401  (define the ops)

try:
    from kvpass.kernels.triton_attention import attention as triton_attention
    from kvpass.kernels.triton_compact import select_and_compact as triton_select_and_compact
    from kvpass.kernels.triton_ragged import ragged_attention as triton_ragged_attention
    from kvpass.kernels.triton_similarity import kv_similarity as triton_kv_similarity

    TRITON_AVAILABLE = True
except ImportError:
    TRITON_AVAILABLE = False

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _covered(x: torch.Tensor) -> bool:
    """Whether the Triton kernels handle this K/Q tensor's dtype and head_dim."""
    return x.dtype in _KERNEL_DTYPES and x.shape[-1] <= 256


def _attention_cuda(q, k, v, q_slots, k_slots, scale, causal, stat, window, mask=None, softcap=0.0, sinks=None):
    if not _covered(q) or q.shape[-1] != v.shape[-1] or mask is not None or softcap or sinks is not None:
        # a model's own mask, soft-capping and sink logits run on the reference (sliding windows,
        # custom masks, Gemma 2, GPT-OSS); the Triton kernels cover causal + padding attention
        return reference.attention(q, k, v, q_slots, k_slots, scale, causal, stat, window, mask, softcap, sinks)
    return triton_attention(q, k, v, q_slots, k_slots, scale, causal, stat, window)


def _ragged_attention_cuda(q, packed_k, packed_v, packed_slots, lengths, tail_k, tail_v, tail_slots, q_slots, scale,
                           causal, stat, window):
    args = (q, packed_k, packed_v, packed_slots, lengths, tail_k, tail_v, tail_slots, q_slots, scale, causal, stat,
            window)
    if not _covered(q) or q.shape[-1] != tail_v.shape[-1]:
        return ragged.ragged_attention(*args)
    return triton_ragged_attention(*args)


def _kv_similarity_cuda(k, v, anchor_k, anchor_v, valid, primed, gamma):
    if not _covered(k) or k.shape != v.shape:
        return similarity.kv_similarity(k, v, anchor_k, anchor_v, valid, primed, gamma)
    return triton_kv_similarity(k, v, anchor_k, anchor_v, valid, primed, gamma)


def register_cuda_kernels() -> bool:
    """Register the Triton kernels for CUDA tensors; returns whether they are now in use."""
    if not (TRITON_AVAILABLE and torch.cuda.is_available()):
        return False
    torch.library.register_kernel("kvpass::attention", "cuda", _attention_cuda)
    torch.library.register_kernel("kvpass::select_and_compact", "cuda", triton_select_and_compact)
    torch.library.register_kernel("kvpass::ragged_attention", "cuda", _ragged_attention_cuda)
    torch.library.register_kernel("kvpass::kv_similarity", "cuda", _kv_similarity_cuda)
    return True


CUDA_KERNELS = register_cuda_kernels()
"""True when `torch.ops.kvpass.*` on CUDA tensors run the Triton kernels."""
