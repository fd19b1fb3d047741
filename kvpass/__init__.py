"""kvpass: find every attention in a model's graph and rewrite it onto a pruned KV cache.

Example:
    >>> import kvpass
    >>> model = kvpass.optimize(model, budget=0.5)   # doctest: +SKIP
"""

from kvpass import kernels  # noqa: F401  (registers torch.ops.kvpass.*)
from kvpass.api import find_attention, optimize
from kvpass.memory import cache_bytes
from kvpass.methods import DEFAULT_METHOD, METHODS, Method, get_method
from kvpass.plan import Plan, uniform_plan
from kvpass.site import AttentionSite, SiteReport, UnsupportedAttention

__all__ = [
    "optimize", "find_attention", "cache_bytes", "AttentionSite", "SiteReport", "UnsupportedAttention",
    "Plan", "uniform_plan", "Method", "get_method", "METHODS", "DEFAULT_METHOD",
]
