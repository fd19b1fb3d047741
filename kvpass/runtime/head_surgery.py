"""Removing whole KV heads from a torch model: weights, module attributes and config, physically.

A KV head is removed with its query group, so the GQA ratio stays valid: Q loses the
group's rows, K and V the head's rows (a fused QKV weight loses all three ranges), O loses
the group's input columns, and biases follow their rows. The attention module's own code
must then see the new head counts: integer attributes under the usual names and a per-module
copy of its config are updated when they hold the old value. Anything kvpass cannot see
(a count hidden elsewhere, a per-head norm over all heads) is caught by `exactness_check`,
never left silently wrong.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from typing import Any

import torch

from kvpass.anchors import Projection
from kvpass.errors import UnsupportedModelError
from kvpass.site import AttentionSite

HEAD_COUNT_NAMES = ("num_heads", "num_attention_heads", "n_head", "n_heads", "num_attn_heads", "heads")
KV_HEAD_COUNT_NAMES = ("num_key_value_heads", "num_kv_heads", "n_kv_heads", "n_head_kv", "multi_query_group_num",
                       "kv_heads")
QUERY_WIDTH_NAMES = ("all_head_size", "embed_dim", "split_size", "q_size", "inner_dim", "projection_size")
KV_WIDTH_NAMES = ("kv_size", "kv_dim")
FEATURE_COUNT_NAMES = {0: ("out_features", "nx"), 1: ("in_features", "nf")}
"""Attributes of projection modules that hold a weight axis's length: `nn.Linear` stores
[out_features, in_features], transformers' `Conv1D` stores [nx, nf]."""


def _ranges(site: AttentionSite, heads: Iterable[int]) -> dict[str, list[range]]:
    """Per role, the feature ranges the removed KV heads occupy."""
    d = site.head_dim
    return {
        "q": [site.query_group_features(h) for h in heads],
        "k": [range(h * d, (h + 1) * d) for h in heads],
        "v": [range(h * d, (h + 1) * d) for h in heads],
        "o": [site.query_group_features(h) for h in heads],
    }


def _removed_features(site: AttentionSite, heads: list[int]) -> dict[tuple[str, str, int], set[int]]:
    """(module, parameter, axis) -> feature indices to remove, fused weights merged."""
    removed: dict[tuple[str, str, int], set[int]] = {}
    for role, ranges in _ranges(site, heads).items():
        projection: Projection = getattr(site.projections, role)
        indices = {projection.start + i for span in ranges for i in span}
        removed.setdefault((projection.module, projection.weight, projection.axis), set()).update(indices)
        if projection.bias is not None and role != "o":
            removed.setdefault((projection.module, projection.bias, 0), set()).update(indices)
    return removed


def zero_output_columns(model: torch.nn.Module, site: AttentionSite, heads: list[int]) -> Callable[[], None]:
    """The oracle of head removal: zero the O projection's input columns of `heads` in place;
    returns the restore."""
    return site.projections.o.zero(model, [i for span in _ranges(site, heads)["o"] for i in span])


def remove_kv_heads(model: torch.nn.Module, site: AttentionSite, heads: list[int]) -> tuple[Callable[[], None], int]:
    """Physically remove KV `heads` (original indices) of `site` from `model`.

    Returns (undo, parameters removed).
    """
    if site.projections is None:
        raise UnsupportedModelError(
            f"{site.name}: its Q/K/V/O projections were not found in the graph (weights that are not plain "
            "parameters, or a layout kvpass does not read), so its heads cannot be removed")
    undo: list[Callable[[], None]] = []
    removed_parameters = 0
    sizes: dict[tuple[str, int], tuple[int, int]] = {}
    for (module_name, parameter_name, axis), indices in _removed_features(site, heads).items():
        module = model.get_submodule(module_name)
        old = getattr(module, parameter_name)
        keep = torch.tensor(sorted(set(range(old.shape[axis])) - indices), device=old.device)
        new = torch.nn.Parameter(old.detach().index_select(axis, keep).contiguous(), requires_grad=old.requires_grad)
        setattr(module, parameter_name, new)
        undo.append(lambda module=module, name=parameter_name, old=old: setattr(module, name, old))
        removed_parameters += old.numel() - new.numel()
        if old.dim() == 2:  # a weight (biases have no count attribute of their own)
            sizes[(module_name, axis)] = (old.shape[axis], new.shape[axis])
    for (module_name, axis), (old_size, new_size) in sizes.items():
        undo += _set_counts(model.get_submodule(module_name), FEATURE_COUNT_NAMES[axis], old_size, new_size)
    undo += _update_attention_module(model.get_submodule(site.name), site, len(heads))

    def undo_all() -> None:
        for step in reversed(undo):
            step()

    return undo_all, removed_parameters


def _set_counts(owner: Any, names: Iterable[str], old: int, new: int) -> list[Callable[[], None]]:
    """Set every attribute of `owner` named in `names` that holds `old` to `new`; returns the undos."""
    undo = []
    for name in names:
        if isinstance(getattr(owner, name, None), int) and getattr(owner, name) == old:
            setattr(owner, name, new)
            undo.append(lambda name=name: setattr(owner, name, old))
    return undo


def _update_attention_module(module: torch.nn.Module, site: AttentionSite, removed: int) -> list[Callable[[], None]]:
    """Head counts and widths the attention module's code reads: its attributes and its config."""
    heads, kv_heads = site.num_heads - removed * site.group_size, site.num_kv_heads - removed
    counts = [
        (HEAD_COUNT_NAMES, site.num_heads, heads),
        (KV_HEAD_COUNT_NAMES, site.num_kv_heads, kv_heads),
        (QUERY_WIDTH_NAMES, site.num_heads * site.head_dim, heads * site.head_dim),
        (KV_WIDTH_NAMES, site.num_kv_heads * site.head_dim, kv_heads * site.head_dim),
    ]
    undo = [step for names, old, new in counts for step in _set_counts(module, names, old, new)]
    config = getattr(module, "config", None)
    if config is not None and any(hasattr(config, name) for name in HEAD_COUNT_NAMES + KV_HEAD_COUNT_NAMES):
        own = copy.copy(config)  # per layer: layers may keep different numbers of heads
        for names, old, new in counts[:2]:
            _set_counts(own, names, old, new)
        module.config = own
        undo.append(lambda: setattr(module, "config", config))
    return undo


def exactness_check(run: Callable[[], Any], reference: Any, what: str) -> None:
    """Raise UnsupportedModelError unless `run()` gives `reference` (every floating tensor leaf)."""
    try:
        result = run()
    except Exception as error:  # noqa: BLE001 - any failure of the pruned model is the model's code disagreeing
        raise UnsupportedModelError(
            f"{what}: the model's own code does not accept the removed heads ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''}); the model is left unchanged") from error
    expected = [t for t in torch.utils._pytree.tree_leaves(reference) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    actual = [t for t in torch.utils._pytree.tree_leaves(result) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    tolerance = 1e-4 if expected and expected[0].dtype in (torch.float32, torch.float64) else 2e-2
    for a, b in zip(actual, expected):
        scale = max(1.0, float(b.abs().max())) if b.numel() else 1.0
        if a.shape != b.shape or float((a - b).abs().max()) > tolerance * scale:
            raise UnsupportedModelError(
                f"{what}: removing the heads does not give the model with those heads' output columns zeroed "
                "(a head count or per-head weight kvpass does not see); the model is left unchanged")
    if len(actual) != len(expected):
        raise UnsupportedModelError(f"{what}: the pruned model returns different outputs; the model is left unchanged")
