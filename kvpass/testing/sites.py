"""`assert_sites`: kvpass finds the attention you expect, with the geometry you expect."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import fields
from typing import Any

from kvpass.site import AttentionSite, SiteReport

SITE_FIELDS = tuple(f.name for f in fields(AttentionSite) if f.name not in ("match", "projections", "nodes"))


def assert_sites(model: Any, expected: int | Sequence[Mapping[str, Any]], *example_inputs: Any,
                 unsupported: Sequence[str] = ()) -> SiteReport:
    """Assert `kvpass.find_attention(model, *example_inputs)` finds the `expected` sites; returns the report.

    `expected` is the number of sites, or one mapping per site in graph order holding the
    `AttentionSite` fields to check (`num_heads`, `num_kv_heads`, `head_dim`, `causal`, `cross`,
    `name`, `pattern`, ...; fields left out are not checked). `unsupported` names the modules
    expected in `report.unsupported` (none by default). `model` may also be an ONNX model (path
    or ModelProto) or a `SiteReport` already found.

    Example:
        >>> import torch
        >>> mha = torch.nn.MultiheadAttention(32, 4, batch_first=True)
        >>> x = torch.randn(1, 5, 32)
        >>> _ = assert_sites(mha, [{"num_heads": 4, "head_dim": 8, "causal": False}], x, x, x)
        >>> assert_sites(mha, [{"num_heads": 8}], x, x, x)
        Traceback (most recent call last):
        ...
        AssertionError: attention sites of MultiheadAttention differ from what was expected:
          site 0 (): num_heads is 4, expected 8
        found 1 site:
          0 : heads 4 / KV heads 4, head dim 8, bidirectional self, pattern eager_softmax_chain
    """
    report = _find(model, example_inputs)
    specs = [{} for _ in range(expected)] if isinstance(expected, int) else [dict(spec) for spec in expected]
    for spec in specs:
        unknown = set(spec) - set(SITE_FIELDS)
        if unknown:
            raise TypeError(f"expected: {sorted(unknown)} are not AttentionSite fields; use some of "
                            f"{list(SITE_FIELDS)}")
    problems = []
    if len(report) != len(specs):
        problems.append(f"found {len(report)} attention sites, expected {len(specs)}")
    for index, (site, spec) in enumerate(zip(report, specs)):
        for key, value in spec.items():
            if getattr(site, key) != value:
                problems.append(f"site {index} ({site.name}): {key} is {getattr(site, key)!r}, expected {value!r}")
    found_unsupported = [u.name for u in report.unsupported]
    if sorted(found_unsupported) != sorted(unsupported):
        reasons = "; ".join(f"{u.name}: {u.reason}" for u in report.unsupported) or "none"
        problems.append(f"unsupported attention is [{reasons}], expected {sorted(unsupported) or 'none'}")
    if problems:
        what = type(model).__name__ if not isinstance(model, (str, bytes)) else model
        raise AssertionError(f"attention sites of {what} differ from what was expected:\n  " + "\n  ".join(problems)
                             + f"\nfound {len(report)} site{'s' * (len(report) != 1)}:\n" + describe(report))
    return report


def describe(report: SiteReport) -> str:
    """One line per site, for failure messages."""
    lines = []
    for site in report:
        kind = "cross" if site.cross else "causal self" if site.causal else "bidirectional self"
        lines.append(f"  {site.layer} {site.name}: heads {site.num_heads} / KV heads {site.num_kv_heads}, "
                     f"head dim {site.head_dim}, {kind}, pattern {site.pattern}")
    return "\n".join(lines) or "  (none)"


def _find(model: Any, example_inputs: tuple) -> SiteReport:
    if isinstance(model, SiteReport):
        return model
    import torch

    if isinstance(model, torch.nn.Module):
        import kvpass

        return kvpass.find_attention(model, *example_inputs)
    from kvpass.onnx import find_attention

    return find_attention(model)
