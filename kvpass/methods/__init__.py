"""Pruning methods: one small dataclass per file, and the registry that names them.

Example:
    >>> from kvpass.methods import get_method
    >>> get_method("snapkv", window=16).window
    16
"""

from __future__ import annotations

from dataclasses import fields

from kvpass.methods.base import Method, Observation, Stat
from kvpass.methods.h2o import H2O
from kvpass.methods.knorm import KNorm
from kvpass.methods.paged import Paged
from kvpass.methods.paged_tova import PagedTOVA
from kvpass.methods.random import Random
from kvpass.methods.snapkv import SnapKV
from kvpass.methods.streaming_llm import StreamingLLM
from kvpass.methods.tova import TOVA
from kvpass.methods.units import UnitTOVA

METHODS: dict[str, type[Method]] = {
    cls.name: cls for cls in (StreamingLLM, H2O, SnapKV, TOVA, KNorm, Random, Paged, UnitTOVA, PagedTOVA)
}

DEFAULT_METHOD = "paged_tova"
DEFAULT_OPTIONS: dict = {}
"""`method=None` means PagedTOVA: 16-token pages ranked by ||V|| / ||K|| (weight 0.75) and the newest
query's attention (weight 0.25), as quantiles. Chosen on the development split of the varied task
suite, where it kept the most of the full cache's answers over both modes and both budgets: the
norm ratio needs no query, so it holds when the context is compressed before the question
arrives, and the attention finds what the question asks for once it is there. See README
"Choosing a method"."""


def get_method(method: str | Method | None = None, **options) -> Method:
    """Resolve a method name (or instance, or None for the default) into a Method instance."""
    if isinstance(method, Method):
        if options:
            raise TypeError(f"method options {sorted(options)} given with a Method instance; set them on the instance")
        return method
    name, defaults = (DEFAULT_METHOD, DEFAULT_OPTIONS) if method is None else (method, {})
    if not isinstance(name, str) or name not in METHODS:
        raise ValueError(f"method={method!r} is not a known method; expected one of {sorted(METHODS)} or a Method instance")
    cls = METHODS[name]
    allowed = {f.name for f in fields(cls)}
    unknown = set(options) - allowed
    if unknown:
        raise TypeError(f"method {name!r} takes options {sorted(allowed)}, not {sorted(unknown)}")
    return cls(**{**defaults, **options})


__all__ = ["Method", "Observation", "Stat", "METHODS", "DEFAULT_METHOD", "DEFAULT_OPTIONS", "get_method", *[c.__name__ for c in METHODS.values()]]
