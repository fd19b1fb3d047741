"""Which tokens each KV head of a ragged cache keeps at an eviction, written once in torch.

The torch runtime (`kvpass.runtime.ragged_cache.RaggedKV`) calls this module, and the ONNX
rewrite exports the same module as a graph function (`kvpass.rewrites.onnx_scoring.torch_function`),
so both runtimes keep exactly the same tokens: streaming heads their sinks and recent window, the
budgeted heads an equal quota each or, with `joint`, a floor each plus what one joint top-k over
the layer hands them (AdaKV). The integer sizes that depend on the plan's arithmetic (`rows`,
quotas, floors, pages) come in as a small table computed by `kvpass.planning.HeadSchedule`, indexed
per sequence by how many rows its streaming heads keep, so no `Fraction` arithmetic is traced.
"""

from __future__ import annotations

import functools

import torch

from kvpass.planning.head_schedule import HeadSchedule


class RaggedKeep(torch.nn.Module):
    """keep [B, Hkv, T] (bool) of a padded view of one site's cache.

    Inputs: `scores`, `own` [B, Hb, T] float32, the budgeted heads' ranking (`own`: per head, for
    the joint top-k of a method that shares one keep set; else the same as `scores`); `slots` int32
    [B, Hkv, T] (negative: padding or no row); `seen`, `sinks`, `recent` int64 scalars (the
    streaming heads' window); `splits` int64 [C, Hb + 1]: each budgeted head's first tokens, then
    the rows the joint top-k hands out on top, for a sequence whose streaming heads keep c rows
    (`HeadSchedule.split_table`).

    Example:
        >>> keep = RaggedKeep(kv_heads=3, streaming=(1,), joint=True)
        >>> slots = torch.arange(6, dtype=torch.int32).expand(1, 3, 6)
        >>> scores = torch.tensor([[[5., 4, 3, 2, 1, 0], [0, 1, 2, 3, 4, 9]]])
        >>> keep(scores, scores, slots, torch.tensor(6), torch.tensor(1), torch.tensor(1),
        ...      torch.tensor([[0, 0, 0], [0, 0, 0], [1, 1, 3]])).int()
        tensor([[[1, 1, 1, 0, 0, 0],
                 [1, 0, 0, 0, 0, 1],
                 [0, 0, 0, 0, 1, 1]]], dtype=torch.int32)
    """

    def __init__(self, kv_heads: int, streaming: tuple[int, ...], joint: bool):
        super().__init__()
        self.budgeted = [head for head in range(kv_heads) if head not in streaming]
        self.joint = joint
        self.streaming_mask = [head in streaming for head in range(kv_heads)]
        positions = {head: index for index, head in enumerate(self.budgeted)}
        self.from_budgeted = [positions.get(head, 0) for head in range(kv_heads)]
        """For each head, its place among the budgeted heads (0 for streaming heads, masked after)."""

    def streaming_keep(self, slots: torch.Tensor, seen, sinks, recent) -> torch.Tensor:
        """[B, Hkv, T] the streaming heads' real tokens among the first `sinks` and the last `recent`."""
        streaming = torch.tensor(self.streaming_mask, device=slots.device)[:, None]
        return (slots >= 0) & streaming & ((slots < sinks) | (slots >= seen - recent))

    def forward(self, scores, own, slots, seen, sinks, recent, splits) -> torch.Tensor:
        keep = self.streaming_keep(slots, seen, sinks, recent)
        if not self.budgeted:
            return keep
        split = splits[keep.sum(dim=(1, 2))]  # [B, Hb + 1]
        first, extra = split[:, :-1, None], split[:, -1:, None]  # [B, Hb, 1], [B, 1, 1]
        budgeted = torch.tensor(self.budgeted, device=slots.device)
        candidates = slots.index_select(1, budgeted) >= 0
        rank = ranks(scores, candidates)
        if self.joint:
            rest = candidates & (rank >= first)
            joint_rank = ranks(own.flatten(1), rest.flatten(1)).view_as(rank)
            first = first + (rest & (joint_rank < extra)).sum(-1, keepdim=True)
        chosen = candidates & (rank < first)
        placed = chosen.index_select(1, torch.tensor(self.from_budgeted, device=slots.device))
        streaming = torch.tensor(self.streaming_mask, device=slots.device)[:, None]
        return keep | (placed & ~streaming)


def ranks(scores: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Each entry's place along the last dim among `candidates`, best score first (ties: earlier first);
    non-candidates come after every candidate (a candidate's -inf is lifted to the lowest float)."""
    lowest = torch.finfo(scores.dtype).min
    key = torch.where(candidates, scores.clamp_min(lowest), float("-inf"))
    if torch.compiler.is_exporting():  # ONNX TopK puts equal values in index order, as a stable sort does
        order = torch.topk(key, key.shape[-1], dim=-1).indices
    else:  # torch.topk does not promise an order for ties
        order = torch.sort(key, dim=-1, descending=True, stable=True).indices
    places = torch.arange(key.shape[-1], device=key.device).expand_as(order)
    return torch.empty_like(order).scatter_(-1, order, places)


@functools.lru_cache(maxsize=None)
def keep_rule(heads: HeadSchedule) -> RaggedKeep:
    """The keep rule of a site's ragged cache (one module per head layout), for the runtime and the exporter."""
    return RaggedKeep(heads.kv_heads, heads.streaming, heads.joint)
