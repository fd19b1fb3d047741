"""Attention and compaction kernels behind the `torch.ops.kvpass` custom ops.

`reference.py` holds the torch implementation (CPU, and the oracle for every other
backend); `ops.py` registers the custom ops with fake implementations so `torch.compile`
and `torch.export` trace through them.
"""

import torch

from kvpass.kernels import ops, ragged_op, similarity_op  # noqa: F401  (registers torch.ops.kvpass.*)

if torch.cuda.is_available():  # importing triton is slow, and must follow TRITON_INTERPRET on CPU
    from kvpass.kernels import triton_backend  # noqa: F401  (registers the CUDA kernels)
