"""Golden summaries of a rewritten graph: per attention site, the ops it became, and the custom ops used.

A summary is a few lines of text, stable from run to run, saved next to a test and compared on
every run: a model change, a transformers or torch upgrade, or a change of kvpass's rewrite that
alters what a site compiles to shows as a diff. `pytest --kvpass-update-golden` (the kvpass pytest
plugin) rewrites the files once a change is understood and intended.

What is summarised:

* a Hugging Face model optimized by kvpass: one decode step over its compacted cache, exported
  with `torch.export` (the graph `torch.compile` and `torch.export` users get);
* a model that carries its own cache, optimized by kvpass: the rewritten FX graph itself;
* a pruned ONNX model (path or ModelProto): its graph, `If` branches included.
"""

from __future__ import annotations

import difflib
import os
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from kvpass.runtime.call_arguments import cache_argument
from kvpass.rewrites.fx import module_stack

STANDARD_NAMESPACES = ("aten", "prims")
"""torch op namespaces that are not custom ops."""
HEADER = "# kvpass graph summary ({what}); refresh with: pytest --kvpass-update-golden"


def graph_summary(model: Any, prompt_len: int = 40) -> str:
    """The summary text of an optimized torch model or a pruned ONNX model (see the module docstring).

    `prompt_len`: tokens prefilled before the exported decode step of a Hugging Face model.

    Example:
        >>> print(graph_summary(kvpass.optimize(model, budget=0.5)))   # doctest: +SKIP
        # kvpass graph summary (decode step that evicts); refresh with: pytest --kvpass-update-golden
        custom ops:
          kvpass.attention.default x2
          kvpass.select_and_compact.default x2
        site model.layers.0.self_attn:
          aten.add.Tensor x2
        ...
    """
    if isinstance(model, (str, os.PathLike)) or type(model).__name__ == "ModelProto":
        return _onnx_summary(model)
    sites = getattr(model, "kvpass_sites", None)
    if not isinstance(model, torch.nn.Module) or sites is None:
        raise TypeError(f"graph_summary needs a model optimized by kvpass.optimize or a pruned ONNX model, got "
                        f"{type(model).__name__}")
    if isinstance(model, torch.fx.GraphModule):
        graph, what = model.graph, "rewritten FX graph"
    else:
        graph, what = _decode_step_graph(model, prompt_len)
    names = [site.name for site in sites]
    per_site: dict[str, Counter] = {name: Counter() for name in names}
    custom: Counter = Counter()
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        op = _op_name(node.target)
        if _is_custom(node.target):
            custom[op] += 1
        site = _site_of(node, names)
        if site is not None:
            per_site[site][op] += 1
    return _text(what, custom, per_site)


def assert_golden(summary: str, path: str | os.PathLike, update: bool = False) -> None:
    """Assert `summary` equals the golden file at `path`; with `update`, (re)write the file instead.

    Example:
        >>> assert_golden(graph_summary(model), "tests/golden/llama.txt")   # doctest: +SKIP
    """
    path = Path(path)
    if update:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(summary)
        return
    if not path.is_file():
        raise AssertionError(f"no golden graph summary at {path}; run pytest --kvpass-update-golden to write it, "
                             f"then review and commit it. The summary now:\n{summary}")
    expected = path.read_text()
    if summary != expected:
        diff = "".join(difflib.unified_diff(expected.splitlines(keepends=True), summary.splitlines(keepends=True),
                                            fromfile=f"{path} (golden)", tofile="now"))
        raise AssertionError(f"the rewritten graph changed from its golden summary {path}; if the change is intended, "
                             f"run pytest --kvpass-update-golden and commit the file:\n{diff}")


def _decode_step_graph(model: torch.nn.Module, prompt_len: int) -> tuple[torch.fx.Graph, str]:
    """torch.export of one decode step of an optimized Hugging Face model after a `prompt_len`-token prompt:
    the first step that evicts (within 64 steps), so the graph shows eviction, or else the first step."""
    from transformers import DynamicCache

    class DecodeStep(torch.nn.Module):
        def __init__(self, model: torch.nn.Module, cache: Any):
            super().__init__()
            self.model, self.cache = model, cache

        def forward(self, token):
            return self.model(token, **cache_argument(self.model, self.cache), use_cache=True).logits

    vocab = model.config.get_text_config(decoder=True).vocab_size
    ids = (torch.arange(prompt_len) % (vocab - 1) + 1)[None]
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, **cache_argument(model, cache), use_cache=True)
        token, evicts = ids[:, -1:], False
        for _ in range(64):
            evicts = any(_evicts_next(layer, cache.get_seq_length()) for layer in cache.layers)
            if evicts:
                break
            model(token, **cache_argument(model, cache), use_cache=True)
        graph = torch.export.export(DecodeStep(model, cache), (token,), strict=False).graph
    return graph, "decode step that evicts" if evicts else "decode step, no eviction due within 64 steps"


def _evicts_next(layer: Any, seen: int) -> bool:
    """Whether a kvpass cache layer evicts when the next token arrives (`CompactedKV.attend`'s rule)."""
    site_cache = getattr(layer, "site_cache", None)
    return site_cache is not None and site_cache.keys.shape[-2] + 1 > site_cache.schedule.cap(seen + 1)


def _site_of(node: torch.fx.Node, names: list[str]) -> str | None:
    """The site whose module (an `nn_module_stack` entry, possibly under a wrapper's prefix) ran `node`."""
    for path in module_stack(node):
        for name in names:
            if path == name or path.endswith("." + name):
                return name
    return None


def _op_name(target: Any) -> str:
    if isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return str(target)
    return getattr(target, "__name__", repr(target))


def _is_custom(target: Any) -> bool:
    """kvpass's (or anyone's) torch.library ops, and Python functions a rewrite put in the graph."""
    if isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return target.namespace not in STANDARD_NAMESPACES
    return getattr(target, "__module__", "") not in ("_operator", "builtins", "math", "torch")


def _onnx_summary(model: Any) -> str:
    """Per site: the op types of its attention nodes and of the nodes kvpass added for it (named
    `kvpass/<layer>/...`, inside `If` branches too); custom: the local functions called."""
    from kvpass.onnx import find_attention, load

    proto = load(model)
    sites = find_attention(proto)
    names = {site.name: site for site in sites}
    per_site: dict[str, Counter] = {name: Counter() for name in names}
    custom: Counter = Counter()
    functions = {(f.domain, f.name) for f in proto.functions}
    for node in _onnx_nodes(proto.graph.node):
        op = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
        if (node.domain, node.op_type) in functions or node.domain not in ("", "ai.onnx"):
            custom[op] += 1
        for name, site in names.items():
            if node.name in site.nodes or node.name.startswith(f"kvpass/{site.layer}/"):
                per_site[name][op] += 1
    return _text("ONNX graph", custom, per_site)


def _onnx_nodes(nodes: Iterable) -> Iterable:
    """Every node, and the nodes of the subgraphs (If branches, loops) inside it."""
    for node in nodes:
        yield node
        for attribute in node.attribute:
            if attribute.g is not None and attribute.g.node:
                yield from _onnx_nodes(attribute.g.node)
            for graph in attribute.graphs:
                yield from _onnx_nodes(graph.node)


def _text(what: str, custom: Counter, per_site: dict[str, Counter]) -> str:
    """One op per line, so a diff names exactly the op that appeared, vanished or changed count."""
    def listing(counts: Counter) -> list[str]:
        return [f"  {op} x{count}" for op, count in sorted(counts.items())] or ["  (none)"]

    lines = [HEADER.format(what=what), "custom ops:", *listing(custom)]
    for name, counts in per_site.items():
        lines += [f"site {name}:", *listing(counts)]
    return "\n".join(lines) + "\n"
