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
