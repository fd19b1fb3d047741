"""KernelSpec: the one place that turns an attention site's geometry into Triton launch parameters.

Every Triton kernel in kvpass is written once, generically; what differs between a
head_dim-64 fp16 MHA site and a head_dim-128 bf16 GQA site is only its constexprs (tile
sizes, head_dim, group size, causality, dot precision) and its launch config (warps,
stages, split-K). Keeping that mapping in one frozen, hashable dataclass means a site gets
specialised kernels without hand-written variants, and the same spec can be built from an
`AttentionSite` at rewrite time or from tensor shapes at call time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvpass.methods.base import Stat
from kvpass.site import AttentionSite

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}

DECODE_MAX_QUERIES = 16
"""Queries per step up to which the split-K decode kernel is used instead of the prefill kernel."""
DECODE_MAX_ROWS = 128
"""Largest GQA group x queries tile the decode kernel packs into one program."""


@dataclass(frozen=True)
class Launch:
    """Constexpr tile sizes plus the launch options of one kernel call."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int

    def options(self) -> dict[str, int]:
        """Keyword arguments for `kernel[grid](..., **options)`."""
        return {
            "BLOCK_M": self.block_m,
            "BLOCK_N": self.block_n,
            "num_warps": self.num_warps,
            "num_stages": self.num_stages,
        }


@dataclass(frozen=True)
class KernelSpec:
    """Specialisation key of kvpass's attention kernels for one site.

    Example:
        >>> spec = KernelSpec(head_dim=128, group_size=4, causal=True, stat=Stat.WINDOW,
        ...                   dtype=torch.bfloat16)
        >>> spec.constexprs()["BLOCK_D"], spec.prefill().block_m
        (128, 128)
    """

    head_dim: int
    group_size: int
    causal: bool
    stat: Stat
    dtype: torch.dtype
    interpreted: bool = False
    """True for TRITON_INTERPRET=1 runs on CPU tensors: small tiles keep numpy fast."""

    def __post_init__(self) -> None:
        if self.head_dim < 1 or self.head_dim > 256:
            raise ValueError(f"head_dim must be in [1, 256] for the Triton kernels, got {self.head_dim}")
        if self.group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {self.group_size}")
        if self.dtype not in _DTYPES.values():
            raise ValueError(f"dtype must be float16, bfloat16 or float32, got {self.dtype}")

    @classmethod
    def from_site(cls, site: AttentionSite, stat: Stat) -> KernelSpec:
        """Spec for a site found in a graph, before any tensor exists."""
        if site.dtype not in _DTYPES:
            raise ValueError(f"site {site.name!r}: dtype {site.dtype!r} has no Triton kernel")
        return cls(site.head_dim, site.group_size, site.causal, Stat(stat), _DTYPES[site.dtype])

    @classmethod
    def from_tensors(cls, q: torch.Tensor, k: torch.Tensor, causal: bool, stat: Stat | str) -> KernelSpec:
        """Spec read off call-time shapes: q [B, Hq, Lq, D], k [B, Hkv, Lk, D]."""
        if q.dim() != 4 or k.dim() != 4:
            raise ValueError(f"q and k must be 4-D [B, H, L, D], got q {tuple(q.shape)}, k {tuple(k.shape)}")
        if q.shape[1] % k.shape[1]:
            raise ValueError(f"q heads ({q.shape[1]}) must be a multiple of k heads ({k.shape[1]})")
        return cls(
            head_dim=q.shape[-1],
            group_size=q.shape[1] // k.shape[1],
            causal=bool(causal),
            stat=Stat(stat),
            dtype=q.dtype,
            interpreted=q.device.type != "cuda",
        )

    @property
    def block_d(self) -> int:
        """Head dimension padded to a power of two (>= 16, the smallest `tl.dot` operand)."""
        return max(16, next_power_of_2(self.head_dim))

    def constexprs(self) -> dict[str, object]:
        """Constexprs shared by every attention kernel of this site."""
        return {
            "HEAD_DIM": self.head_dim,
            "BLOCK_D": self.block_d,
            "GROUP": self.group_size,
            "CAUSAL": self.causal,
            # fp32 must not silently drop to tf32: the reference computes in full fp32.
            "PRECISION": "ieee" if self.dtype == torch.float32 else "tf32",
            # Triton 3.x's interpreter computes bf16 tl.dot wrongly; it gets fp32 dots of the bf16 values.
            "DOT_FP32": self.interpreted and self.dtype == torch.bfloat16,
        }

    def _tiles(self, big: Launch, small: Launch) -> Launch:
        if self.interpreted:
            return Launch(32, 32, 1, 1)
        return small if self.block_d > 128 or self.dtype == torch.float32 else big

    def prefill(self) -> Launch:
        """Flash-style forward: many queries per tile, keys streamed."""
        warps = 8 if self.block_d >= 128 else 4
        return self._tiles(Launch(128, 64, warps, 3), Launch(64, 32, 4, 2))

    def stats(self) -> Launch:
        """Column-statistics pass: one key tile per program, queries streamed."""
        return self._tiles(Launch(64, 64, 4, 3), Launch(32, 32, 4, 2))

    def uses_decode(self, lq: int) -> bool:
        """Whether a call with `lq` queries runs the split-K decode kernel."""
        return lq <= DECODE_MAX_QUERIES and self.group_size * lq <= DECODE_MAX_ROWS

    def decode(self, lq: int) -> Launch:
        """Split-K decode: all queries of one KV head's group packed into one tile."""
        rows = max(16, next_power_of_2(self.group_size * lq))
        if self.interpreted:
            return Launch(rows, 32, 1, 1)
        return Launch(rows, 64 if self.block_d <= 128 else 32, 4, 3)

    def decode_splits(self, lk: int, programs: int, sm_count: int) -> int:
        """Split-K factor: enough programs for ~2 waves over the SMs, at least 4 key tiles each."""
        tiles = -(-lk // self.decode(1).block_n)
        want = -(-2 * sm_count // max(programs, 1))
        return max(1, min(want, tiles // 4 or 1))


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n (triton.next_power_of_2 without importing triton here)."""
    return 1 << max(n - 1, 0).bit_length()
