"""paged_tova's score: quantiles of ||V|| / ||K|| and of the newest query's attention, among real tokens only."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvpass.methods import get_method
from kvpass.methods.base import Observation


def observation(padding: int, length: int, seed: int) -> Observation:
    generator = torch.Generator().manual_seed(seed)
    keys, values = (torch.randn(2, 3, length, 8, generator=generator) for _ in range(2))
    stat = torch.rand(2, 3, length, generator=generator)
    slots = (torch.arange(length) - padding).expand(2, 3, length)  # left padding: negative slots
    return Observation(keys, values, slots, stat, length - padding, 3)


@settings(max_examples=25, deadline=None)
@given(padding=st.integers(0, 6), seed=st.integers(0, 1000), pad_seed=st.integers(0, 1000))
def test_padding_moves_no_real_token(padding: int, seed: int, pad_seed: int) -> None:
    """Padding keys and values differ between runtimes (torch and onnxruntime make different things of pad
    tokens), so whatever they hold, the real tokens' scores stay the same."""
    method = get_method("paged_tova")
    obs = observation(padding, 20, seed)
    other = observation(padding, 20, pad_seed)
    mixed = Observation(torch.cat([other.keys[..., :padding, :], obs.keys[..., padding:, :]], -2),
                        torch.cat([other.values[..., :padding, :], obs.values[..., padding:, :]], -2),
                        obs.slots, torch.cat([other.stat[..., :padding], obs.stat[..., padding:]], -1), obs.seen, 3)
    torch.testing.assert_close(method.score(mixed)[..., padding:], method.score(obs)[..., padding:], rtol=0, atol=0)


def test_real_tokens_span_zero_to_one_and_the_weight_blends_the_two_orders() -> None:
    obs = observation(padding=3, length=12, seed=0)
    only_ratio = get_method("paged_tova", attention_weight=0.0).score(obs)[..., 3:]
    only_attention = get_method("paged_tova", attention_weight=1.0).score(obs)[..., 3:]
    assert only_ratio.amin() == only_attention.amin() == 0 and only_ratio.amax() == only_attention.amax() == 1
    ratio = obs.values[..., 3:, :].norm(dim=-1) / obs.keys[..., 3:, :].norm(dim=-1)
    assert torch.equal(only_ratio.argsort(-1), ratio.argsort(-1))
    assert torch.equal(only_attention.argsort(-1), obs.stat[..., 3:].argsort(-1))
    blended = get_method("paged_tova", attention_weight=0.25).score(obs)[..., 3:]
    torch.testing.assert_close(blended, 0.75 * only_ratio + 0.25 * only_attention)


@settings(max_examples=20, deadline=None)
@given(weight=st.sampled_from([0.125, 0.25, 0.5]), keep=st.integers(20, 200), seed=st.integers(0, 1000))
def test_interleaving_takes_the_attention_share_of_any_keep_set(weight: float, keep: int, seed: int) -> None:
    """Whatever the budget, the kept tokens are the top of the attention list and the top of the ratio list,
    taken in the proportion weight : 1 - weight, and each list's best token is kept."""
    obs = observation(padding=0, length=400, seed=seed)
    scores = get_method("paged_tova", attention_weight=weight, interleave=True).score(obs)
    ratio = get_method("paged_tova", attention_weight=0.0).score(obs)
    attention = get_method("paged_tova", attention_weight=1.0).score(obs)
    kept = scores.topk(keep, dim=-1).indices
    cut = scores.gather(-1, kept).amin(-1, keepdim=True)  # -D: the k-th token's distance
    for_attention = (attention >= 1 + cut * weight).sum(-1).float()
    for_ratio = (ratio >= 1 + cut * (1 - weight)).sum(-1).float()
    share = for_attention / (for_attention + for_ratio)
    assert (share - weight).abs().max() <= 2 / keep + 1e-6
    assert (scores.gather(-1, attention.argmax(-1, keepdim=True)) == 0).all()
    assert (scores.gather(-1, ratio.argmax(-1, keepdim=True)) == 0).all()
