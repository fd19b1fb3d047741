"""The symbolic cost model: what one attention site costs, in sympy, as a function of batch and length.

A plan is made once, before the first token runs, but the sequence length (and usually
the batch) is only known at run time. Writing every cost as an expression in those two
symbols lets the planner compare sites, show people the formula behind a number, and
evaluate it exactly at any length. Costs depend only on a site's geometry (heads, KV
heads, head dim, causality) and on the symbols, so an `AttentionSite` that the ONNX
rewriter produced costs the same as one from FX: only where the symbols come from differs
(`symbols_from_dims` for ONNX dim_params, `fx_symbols` for captured fake tensors).

The eviction arithmetic of `kvpass.plan.SiteSchedule` is written with `smin`, `smax` and
`where` from here, which act on Python ints as plain ints and on sympy expressions as
sympy: the runtime's caps and the formulas printed for people are one piece of code.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import sympy

from kvpass.site import AttentionSite

if TYPE_CHECKING:
    from kvpass.planning import SiteSchedule

BATCH = sympy.Symbol("batch", integer=True, positive=True)
SEQ = sympy.Symbol("seq", integer=True, positive=True)
"""Default symbols: tokens seen per sequence, and sequences in the batch."""


def _symbolic(*values: Any) -> bool:
    return any(isinstance(value, sympy.Basic) for value in values)


def smin(*values):
    """min() of ints, sympy.Min of expressions."""
    return sympy.Min(*values) if _symbolic(*values) else min(values)


def smax(*values):
    """max() of ints, sympy.Max of expressions."""
    return sympy.Max(*values) if _symbolic(*values) else max(values)


def where(condition, then, otherwise):
    """`then if condition else otherwise`, as a sympy Piecewise when the condition is symbolic."""
    if isinstance(condition, sympy.Basic) and not isinstance(condition, sympy.logic.boolalg.BooleanAtom):
        return sympy.Piecewise((then, condition), (otherwise, True))
    return then if bool(condition) else otherwise


@dataclass(frozen=True)
class Symbols:
    """The batch and sequence-length expressions a site's costs are written in.

    Example:
        >>> symbols_from_dims("batch_size", "past_sequence_length + 1").seq
        past_sequence_length + 1
    """

    batch: sympy.Expr = BATCH
    seq: sympy.Expr = SEQ


def _dim(value: Any, default: sympy.Expr) -> sympy.Expr:
    if hasattr(value, "value") and not isinstance(value, int):  # onnx_ir.SymbolicDim: its dim_param, or None
        value = value.value
    if value is None:
        return default
    if isinstance(value, str):  # ONNX dim_param: a name, or an expression of names
        names = {name: sympy.Symbol(name, integer=True, positive=True)
                 for name in re.findall(r"[A-Za-z_][A-Za-z0-9_]*", value)}
        return sympy.sympify(value, locals=names)
    node = getattr(value, "node", None)  # torch.SymInt: its expression is already sympy
    if node is not None and hasattr(node, "expr"):
        # Pattern matching reads sizes with int(), which specialises the shape env so that
        # `.expr` then answers the example's size; `_expr` keeps the symbol as traced.
        return sympy.sympify(getattr(node, "_expr", node.expr))
    return sympy.Integer(int(value))


def symbols_from_dims(batch: Any, seq: Any) -> Symbols:
    """Symbols from graph dims: ONNX dim_params (strings or `onnx_ir.SymbolicDim`), torch SymInts,
    or fixed ints; an unnamed dim becomes `BATCH` / `SEQ`.

    Example:
        >>> symbols_from_dims(1, "seq_len")
        Symbols(batch=1, seq=seq_len)
    """
    return Symbols(_dim(batch, BATCH), _dim(seq, SEQ))


def fx_symbols(site: AttentionSite, graph_module: Any | None) -> Symbols:
    """The batch and key-length dims of `site`'s keys in a captured FX graph, where symbolic.

    kvpass captures with a short made-up input, so a concrete size there is the example's,
    not the model's: only symbolic dims (a graph exported with dynamic shapes) are taken,
    each falling back to `BATCH` / `SEQ`.

    Example:
        >>> fx_symbols(site, None)       # doctest: +SKIP
        Symbols(batch=batch, seq=seq)
    """
    match = site.match
    if graph_module is None or not hasattr(match, "graph") or not hasattr(match, "k"):
        return Symbols()
    graph = graph_module.get_submodule(match.graph) if match.graph else graph_module
    node = next((n for n in graph.graph.nodes if n.name == match.k), None)
    value = node.meta.get("val") if node is not None else None
    if value is None or value.dim() < 3:
        return Symbols()
    batch, seq = value.shape[0], value.shape[-2]
    return symbols_from_dims(None if isinstance(batch, int) else batch, None if isinstance(seq, int) else seq)


@dataclass(frozen=True)
class SiteCost:
    """Costs of one site, each a sympy expression in `Symbols`.

    kv_bytes: bytes the cache holds after `seq` tokens; prefill_flops: multiply-adds x 2 of
    QK^T and PV (plus the extra QK^T rows a statistic needs, when pruned); decode_bytes:
    bytes read per decoded token (every held byte: K, V, slots, statistics).
    """

    kv_bytes: sympy.Expr
    prefill_flops: sympy.Expr
    decode_bytes: sympy.Expr


def site_cost(
    site: AttentionSite,
    dtype_bytes: int,
    symbols: Symbols = Symbols(),
    schedule: "SiteSchedule | None" = None,
    scored_queries: Any = 0,
) -> SiteCost:
    """Costs of `site` with a full cache, or under `schedule` (the kernel at a budget).

    `scored_queries` is how many prefill queries feed the method's statistic (the whole
    prefill for column sums, a window, one query): each costs one more QK^T row.

    Example:
        >>> site = AttentionSite("attn", 0, 9, 3, 64, None, True)
        >>> site_cost(site, 4).kv_bytes
        1536*batch*seq
    """
    batch, seq = symbols.batch, symbols.seq
    pairs = seq * (seq + 1) / 2 if site.causal else seq * seq
    flops = 4 * batch * site.num_heads * site.head_dim * pairs
    full = batch * seq * site.kv_bytes_per_token(dtype_bytes)
    if schedule is None or not schedule.prunes:
        return SiteCost(full, sympy.expand(flops), full)
    held = schedule.held_bytes(seq, batch)
    scoring = 2 * batch * site.num_heads * site.head_dim * scored_queries * seq
    return SiteCost(held, sympy.expand(flops + scoring), held)
