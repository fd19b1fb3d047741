"""kvpass: find every attention in a model's graph and rewrite it onto a pruned KV cache.

Example:
    >>> import kvpass
    >>> model = kvpass.optimize(model, budget=0.5)   # doctest: +SKIP
    >>> model = kvpass.optimize(model, budget=0.5, transforms=[kvpass.PruneHeads(0.25), kvpass.Evict()])  # doctest: +SKIP
    >>> model = kvpass.optimize(vlm, budget=0.3, transforms=[kvpass.PrunePatches(0.25), kvpass.Evict()],
    ...                         example_inputs=processor(images=image, text=prompt, return_tensors="pt"))  # doctest: +SKIP
    >>> kvpass.stats(model)["kv_bytes"]               # doctest: +SKIP
"""

from kvpass import kernels  # noqa: F401  (registers torch.ops.kvpass.*)
from kvpass.api import find_attention, optimize, plan
from kvpass.memory import cache_bytes
from kvpass.methods import DEFAULT_METHOD, METHODS, Method, get_method
from kvpass.planning import Plan, uniform_plan
from kvpass.site import AttentionSite, SiteReport, UnsupportedAttention
from kvpass.stats import stats
from kvpass.transforms import Evict, FilterTokens, PruneHeads, PrunePatches, SelectLayer, StreamingHeads, Transform


def __getattr__(name: str):
    """`kvpass.export_onnx` imports the ONNX stack (onnx, onnxscript) only when asked for."""
    if name == "export_onnx":
        from kvpass.onnx.export import export_onnx

        return export_onnx
    raise AttributeError(f"module 'kvpass' has no attribute {name!r}")


__all__ = [
    "optimize", "plan", "export_onnx", "find_attention", "cache_bytes", "stats", "Evict", "PruneHeads", "PrunePatches",
    "SelectLayer", "StreamingHeads", "FilterTokens", "Transform",
    "AttentionSite", "SiteReport", "UnsupportedAttention", "Plan", "uniform_plan", "Method", "get_method", "METHODS",
    "DEFAULT_METHOD",
]
