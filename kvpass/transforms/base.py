"""The unit of rewrite: a `Transform` config, and the registry of its handlers per backend.

Every kind of pruning is a small frozen dataclass (torchao's `quantize_(model, config)`
style): it validates its options at construction, says which anchors it needs on every
attention site, decides its part of the plan (`decide`), and is applied by one handler per
backend, found in `HANDLERS`. A new kind of pruning is new files: a Transform subclass plus
`@register(MyTransform, Backend.HF, ...)` handlers; nothing in kvpass changes.

Transforms are planned and applied in `Phase` order whatever order the user lists them in:
structural changes first (they change what a cache holds per token), then selection, then
eviction (which supplies whatever saving the budget still needs).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum, IntEnum
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from kvpass.budget import Budget
from kvpass.errors import UnsupportedModelError
from kvpass.site import SiteReport

CALIBRATION_PROMPTS = ("general", "retrieval")
"""The kinds of kvpass's own calibration prompts (`PlanningContext.calibration`)."""
RETRIEVAL_CALIBRATION_TOKENS = 1500
"""Length of kvpass's generated retrieval calibration prompts (4 of them; calibrated per-head shares were
measured on this setting in `benchmarks/results/per_head_calibrated_on_retrieval_test.txt`)."""

if TYPE_CHECKING:
    from kvpass.calibration import Calibration
    from kvpass.methods import Method
    from kvpass.planning import Plan


class Phase(IntEnum):
    """When a transform is planned and applied, relative to the others."""

    STRUCTURE = 0
    """Removes weights (heads): changes the bytes a cached token costs."""
    SELECTION = 1
    """Chooses which tokens reach deeper layers."""
    EVICTION = 2
    """Bounds what the cache holds, within whatever budget is left."""


class Backend(str, Enum):
    """The kinds of model a handler can rewrite."""

    HF = "hf"
    """A transformers causal LM: `generate` owns a Cache object."""
    EXPLICIT_CACHE = "explicit_cache"
    """A torch module whose forward takes and returns its KV cache as tensors (FX rewrite)."""
    MODULE = "module"
    """Any other torch module: attention without a KV cache (encoders, vision towers)."""
    ONNX = "onnx"
    """An `onnx_ir` graph."""


@dataclass
class PlanningContext:
    """What transforms read while deciding, and the decisions taken so far (in phase order).

    Structural transforms write `pruned_heads` / `head_importance`, token filtering
    `kept_fraction` / `reserved_bytes`; `Evict` turns all of it into the final `plan`.
    Calibration runs at most once, on demand, for every transform."""

    model: Any
    sites: SiteReport
    budget: Budget
    dtype_bytes: int
    eviction_method: "Method"
    """The method calibration ranks tokens with (the Evict transform's, or the default)."""
    seq_len: int | None = None
    calibration_source: Any = None
    """A `Calibration` already measured, or prompts for one (text needs `tokenizer`)."""
    tokenizer: Any = None
    sinks: int = 4
    recent: int = 32
    pruned_heads: dict[str, list[int]] = field(default_factory=dict)
    head_importance: dict[str, list[float]] = field(default_factory=dict)
    streaming_heads: dict[str, list[int]] = field(default_factory=dict)
    """Site name -> original KV heads that keep only `streaming_window` (sinks, recent) tokens."""
    streaming_window: tuple[int, int] = (4, 64)
    kept_fraction: dict[str, float] = field(default_factory=dict)
    """Site name -> the share of its tokens a selection transform keeps in its cache (eviction caps it there)."""
    reserved_bytes: dict[str, int] = field(default_factory=dict)
    """Site name -> bytes per sequence a transform holds beside the site's cache (counted in its cap)."""
    plan: "Plan | None" = None
    _calibrations: "dict[str, Calibration]" = field(default_factory=dict)

    def calibration(self, heads: bool = False, prompts: str = "general") -> "Calibration":
        """The calibration of the model (measured once per kind of prompts, shared by every transform).

        The one the user gave (`calibration_source`) is always used; without it, `prompts` says which of
        kvpass's own to measure on: "general" (`kvpass.calibration.DEFAULT_TEXT_PROMPTS`, short) or
        "retrieval" (`kvpass.streaming_calibration.retrieval_prompts`: 4 of `RETRIEVAL_CALIBRATION_TOKENS`,
        facts deep in long text, which show the heads retrieval needs). `heads=True` also needs the per-head
        removal errors (`kvpass.calibration.head_removal_errors`), measured on the same prompts the first
        time they are asked for."""
        from kvpass.calibration import Calibration, calibrate, head_removal_errors, prompt_ids

        if prompts not in CALIBRATION_PROMPTS:
            raise ValueError(f"prompts={prompts!r} is not a kind of calibration prompts; expected one of "
                             f"{CALIBRATION_PROMPTS}")
        key = "given" if self.calibration_source is not None else prompts
        if key not in self._calibrations:
            given = self._source(key)
            self._calibrations[key] = given if isinstance(given, Calibration) else calibrate(
                self.model, self.eviction_method, given, tokenizer=self.tokenizer, sites=self.sites,
                sinks=self.sinks, recent=self.recent, heads=heads)
        measured = self._calibrations[key]
        if heads and not measured.head_error:
            given = self._source(key)
            ids = prompt_ids(self.model, None if isinstance(given, Calibration) else given, self.tokenizer)
            measured = self._calibrations[key] = dataclasses.replace(
                measured, head_error=head_removal_errors(self.model, ids, self.sites))
        return measured

    def _source(self, key: str) -> Any:
        """What calibration `key` is measured on: the user's source, kvpass's general prompts (None), or its
        generated retrieval prompts (made only when needed)."""
        if key != "retrieval":
            return self.calibration_source
        from kvpass.streaming_calibration import retrieval_prompts

        vocab_size = getattr(getattr(self.model, "config", None), "vocab_size", None)
        return retrieval_prompts(self.tokenizer, vocab_size, count=4, length=RETRIEVAL_CALIBRATION_TOKENS)


@dataclass
class RewriteTarget:
    """What handlers rewrite: the model (a handler may replace it, e.g. with a rewritten
    GraphModule), its sites and plan, the inputs it was captured with, and how to undo."""

    model: Any
    sites: SiteReport
    plan: "Plan"
    backend: Backend
    example_args: tuple = ()
    example_kwargs: dict[str, Any] = field(default_factory=dict)
    undo: list[Callable[[], None]] = field(default_factory=list)
    """Called in reverse order if any later step fails, so a failed optimize changes nothing."""

    def rollback(self) -> None:
        while self.undo:
            self.undo.pop()()


@dataclass(frozen=True)
class Transform:
    """Base of every transform: a frozen config dataclass.

    Subclasses set `name`, `phase` and `needs` (AttentionSite anchor fields every site must
    have, e.g. `("projections",)`), validate options in `__post_init__`, and write their
    decisions in `decide`.

    Example:
        >>> import kvpass
        >>> kvpass.PruneHeads(0.25).phase.name
        'STRUCTURE'
    """

    name: ClassVar[str] = ""
    phase: ClassVar[Phase] = Phase.EVICTION
    needs: ClassVar[tuple[str, ...]] = ()

    def decide(self, context: PlanningContext) -> None:
        """Record this transform's decisions in `context` (before any model is touched)."""

    def options(self) -> dict[str, Any]:
        """The transform's options as plain data (for plans, messages and `from_record`)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def record(self) -> dict[str, Any]:
        return {"name": self.name, "options": self.options()}

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> "Transform":
        """The inverse of `options`."""
        return cls(**options)

    def stats(self, plan: "Plan", cache: Any) -> dict[str, Any]:
        """This transform's figures for `kvpass.stats`, from the plan and one call's cache (or None)."""
        return {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.name:
            TRANSFORMS[cls.name] = cls


TRANSFORMS: dict[str, type[Transform]] = {}
"""Transform name -> class: every subclass with a `name` registers itself (plans are saved by name)."""

Handler = Callable[[Transform, RewriteTarget], None]
HANDLERS: dict[tuple[type[Transform], Backend], Handler] = {}


def register(transform: type[Transform], *backends: Backend | str) -> Callable[[Handler], Handler]:
    """Register the decorated function as `transform`'s handler for `backends`.

    Example:
        >>> @register(MyTransform, Backend.HF, Backend.EXPLICIT_CACHE)     # doctest: +SKIP
        ... def apply_my_transform(transform, target): ...
    """
    if not (isinstance(transform, type) and issubclass(transform, Transform)):
        raise TypeError(f"transform must be a Transform subclass, got {transform!r}")

    def decorator(handler: Handler) -> Handler:
        for backend in backends:
            HANDLERS[(transform, Backend(backend))] = handler
        return handler

    return decorator


def handler_for(transform: Transform, backend: Backend, what: str) -> Handler:
    """The handler that applies `transform` to a `backend` model (a subclass inherits its base's);
    a clear error naming what is supported otherwise."""
    for cls in type(transform).__mro__:
        handler = HANDLERS.get((cls, backend))  # type: ignore[arg-type]
        if handler is not None:
            return handler
    supported = sorted(b.value for (cls, b) in HANDLERS if isinstance(transform, cls))
    reason = {
        Backend.MODULE: f"{what} keeps no KV cache (an encoder, or a model that recomputes attention each call)",
        Backend.ONNX: "ONNX graphs are rewritten by eviction only",
    }.get(backend, f"{what} is a {backend.value} model")
    raise UnsupportedModelError(
        f"{type(transform).__name__} cannot be applied: {reason}; it supports {supported or 'no backend yet'}"
    )


def from_record(record: dict[str, Any]) -> Transform:
    """The transform a plan recorded (`Transform.record()`).

    Example:
        >>> import kvpass
        >>> from_record(kvpass.PruneHeads(0.25).record())
        PruneHeads(fraction=0.25, importance='output_error', max_per_layer=None, seed=0)
    """
    if not isinstance(record, dict) or record.get("name") not in TRANSFORMS:
        raise ValueError(f"plan transforms: {record!r} is not a recorded transform; known: {sorted(TRANSFORMS)}")
    return TRANSFORMS[record["name"]].from_options(record.get("options", {}))


def module_backend(model: torch.nn.Module, sites: SiteReport) -> Backend:
    """Which backend rewrites `model`: a HF causal LM, an explicit-cache model, or a plain module."""
    config = getattr(model, "config", None)
    if hasattr(model, "generate") and config is not None and hasattr(config, "_attn_implementation"):
        return Backend.HF
    if any(site.reads_cache for site in sites):
        return Backend.EXPLICIT_CACHE
    return Backend.MODULE
