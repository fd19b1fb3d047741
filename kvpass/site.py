"""AttentionSite: the framework-neutral description of one attention found in a graph.

Both graph worlds (FX and ONNX) produce and consume this class, so methods, the planner
and the rewriters never need to know which framework a site came from.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from kvpass.anchors import Projections, VisionBoundary
from kvpass.errors import UnsupportedModelError


@dataclass
class AttentionSite:
    """One attention computation found in a captured graph.

    Example:
        >>> site = AttentionSite(name="model.layers.0.self_attn", layer=0, num_heads=9,
        ...                      num_kv_heads=3, head_dim=64, scale=0.125, causal=True)
        >>> site.group_size
        3
    """

    name: str
    """Module path (FX) or node-name prefix (ONNX) of the attention."""
    layer: int
    """Index of the site among the model's attention sites, in graph order."""
    num_heads: int
    num_kv_heads: int
    head_dim: int
    scale: float | None
    """Softmax scale; None means the kernel default 1/sqrt(head_dim)."""
    causal: bool
    cross: bool = False
    """True when keys/values come from a different sequence than the queries."""
    masked: bool = False
    """True when an explicit additive/boolean mask (padding, bias) feeds the softmax."""
    reads_cache: bool = False
    """True when the site's keys/values are concatenated onto a past cache read from the graph inputs."""
    pattern: str = ""
    """Name of the pattern that matched (e.g. 'sdpa', 'eager_softmax_chain')."""
    logit_ops: list[str] = field(default_factory=list)
    """Ops on the logits besides scale and mask, by name: 'softcap' (cap·tanh(x/cap)), 'sinks' (learned
    sink logits in the softmax's denominator), 'tensor_factor' (logits multiplied by a tensor: a
    multiplicative mask or a per-head scale), 'clamp' (bounded from below)."""
    dtype: str = "float32"
    nodes: list[str] = field(default_factory=list)
    """Names of the graph nodes the site spans, in graph order."""
    kv_tiled: bool = False
    """Query head h reads KV head h mod num_kv_heads (K/V repeated whole, as in JetMoE's mixture of
    attention heads), rather than h // group_size (GQA's grouped repeat)."""
    window: int | None = None
    """Most past tokens the unmodified model keeps for this site: a sliding-window or chunked layer's
    bound (None: every token stays). Eviction budgets are relative to what the site keeps."""
    projections: Projections | None = None
    """Anchor: the Q/K/V/O projection weights (None when the graph does not show them)."""
    match: Any = field(default=None, compare=False, repr=False)
    """What the graph pass that found the site needs to rewrite it (`kvpass.rewrites.fx.FxMatch`
    or `kvpass.rewrites.onnx.OnnxMatch`); never read by methods, the planner or transforms, and
    not saved with a plan (it points into one captured graph)."""

    @property
    def group_size(self) -> int:
        """Query heads per KV head (GQA/MQA group)."""
        return self.num_heads // self.num_kv_heads

    def query_group_features(self, head: int) -> range:
        """The features KV head `head`'s query group occupies in Q's output and O's input."""
        width = self.group_size * self.head_dim
        return range(head * width, (head + 1) * width)

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """Bytes one cached token costs at this site (K and V, all KV heads), per sequence."""
        return 2 * self.num_kv_heads * self.head_dim * dtype_bytes

    def to_dict(self) -> dict[str, Any]:
        """The site as plain data (for a saved plan): everything but `match`."""
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("match", "projections")}
        data["projections"] = self.projections.to_dict() if self.projections is not None else None
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "AttentionSite":
        """The inverse of `to_dict`.

        Example:
            >>> site = AttentionSite("attn", 0, 4, 2, 16, None, True)
            >>> AttentionSite.from_dict(site.to_dict()) == site
            True
        """
        data = dict(data)
        projections = data.pop("projections", None)
        return cls(**data, projections=Projections.from_dict(projections) if projections else None)


@dataclass
class UnsupportedAttention:
    """An attention-like subgraph that was seen but cannot be rewritten, and why."""

    name: str
    pattern: str
    reason: str
    nodes: list[str] = field(default_factory=list)


class SiteReport(list):
    """The list of `AttentionSite` found in a model, plus what was seen but not supported.

    Example:
        >>> report = SiteReport([], unsupported=[UnsupportedAttention("blk", "eager", "no softmax")])
        >>> len(report), report.unsupported[0].reason
        (0, 'no softmax')
    """

    def __init__(self, sites=(), unsupported=(), capture: str = "", capture_note: str = ""):
        super().__init__(sites)
        self.unsupported: list[UnsupportedAttention] = list(unsupported)
        self.capture = capture
        """How the graph was captured: 'torch.export', 'concrete trace' or 'dynamo'."""
        self.capture_note = capture_note
        """Why the fallback capture was used, when it was."""
        self.vision: VisionBoundary | None = None
        """Anchor of a vision-language model: where image features enter the language model. The
        report's sites are then the language model's; the vision encoder's are listed in the anchor."""
        self.vision_note = ""
        """Why no vision boundary was found, when none was."""

    def require_rewritable(self, what: str) -> None:
        """Raise unless every attention-like subgraph of `what` is a supported site."""
        if self.unsupported:
            listed = "; ".join(f"{u.name} ({u.reason})" for u in self.unsupported)
            raise UnsupportedModelError(f"attention kvpass cannot rewrite, so the model is left unchanged: {listed}")
        if not self:
            raise UnsupportedModelError(f"no attention found in {what}: nothing to prune")
        names = [site.name for site in self]
        shared = sorted({name for name in names if names.count(name) > 1})
        if shared:
            raise UnsupportedModelError(
                f"attention modules {shared} of {what} each compute several attentions per forward (a module shared "
                "by several layers, or two attentions per layer as in differential attention): kvpass keeps one "
                "cache and one budget per attention module")

    def __repr__(self) -> str:
        rows = [f"SiteReport({len(self)} sites via {self.capture or '?'}"]
        rows += [
            f"  {s.name}: layer={s.layer} heads={s.num_heads}/{s.num_kv_heads} d={s.head_dim} "
            f"causal={s.causal} cross={s.cross} pattern={s.pattern}"
            + (f" logit_ops={s.logit_ops}" if s.logit_ops else "") + (f" window={s.window}" if s.window else "")
            for s in self
        ]
        rows += [f"  unsupported {u.name}: {u.reason}" for u in self.unsupported]
        if self.vision is not None:
            rows.append(f"  vision: {self.vision.vision_encoder} -> {self.vision.op} -> {self.vision.language_model} "
                        f"({len(self.vision.encoder_sites)} encoder sites, image tokens {self.vision.image_token_ids})")
        return "\n".join(rows) + ")"
