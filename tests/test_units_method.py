"""tova_units: TOVA scores shared within units of alike adjacent values (digit runs, names)."""

from __future__ import annotations

import copy

import pytest
import torch

import kvpass
from kvpass.methods import TOVA, Observation
from kvpass.methods.selection import ranking_scores
from kvpass.methods.units import UnitTOVA, spread_along_links, unit_links
from test_optimize import full_kv_bytes, prefill, prompt, tiny_llama

TOKENS, HEADS, DIM = 40, 2, 8


def observation(unit: range, peak: int) -> Observation:
    """Random unrelated values, except one run of alike values (a number's digits); attention peaks inside it."""
    generator = torch.Generator().manual_seed(0)
    values = torch.randn(1, HEADS, TOKENS, DIM, generator=generator)
    digit = torch.randn(1, HEADS, 1, DIM, generator=generator)
    values[:, :, unit.start:unit.stop] = digit + 0.05 * torch.randn(1, HEADS, len(unit), DIM, generator=generator)
    stat = 0.01 * torch.rand(1, HEADS, TOKENS, generator=generator)
    stat[..., peak] = 1.0
    slots = torch.arange(TOKENS, dtype=torch.int32).expand(1, HEADS, TOKENS)
    return Observation(values.clone(), values, slots, stat, TOKENS, 1)


def test_links_join_the_run_and_little_else() -> None:
    obs = observation(range(20, 28), peak=21)
    linked = unit_links(obs.values, obs.slots, z=1.0)[0, 0]
    assert linked[21:28].all() and not linked[20] and not linked[28]
    assert linked.sum() <= 7 + 4


def test_a_kept_peak_keeps_its_whole_unit() -> None:
    obs = observation(range(20, 28), peak=21)
    keep = 4 + 2 + 10  # sinks, recent, one unit and its two neighbours (span=1)
    kept = set(ranking_scores(UnitTOVA(), obs, sinks=4, recent=2).topk(keep).indices[0, 0].tolist())
    assert set(range(20, 28)) <= kept
    plain = set(ranking_scores(TOVA(span=2), obs, sinks=4, recent=2).topk(keep).indices[0, 0].tolist())
    assert not set(range(20, 28)) <= plain  # the fixed +-2 span loses the number's last digits


def test_units_end_at_gaps_in_slots_and_reach() -> None:
    obs = observation(range(20, 28), peak=21)
    obs.slots = obs.slots.clone()
    obs.slots[..., 25:] += 100  # tokens 25.. were once far apart: no unit across the gap
    scores = UnitTOVA(span=0).score(obs)[0, 0]
    assert (scores[20:25] == 1.0).all() and (scores[25:28] < 1.0).all()
    short = spread_along_links(torch.tensor([[[0.0, 1.0, 0.0, 0.0, 0.0]]]), torch.ones(1, 1, 5, dtype=torch.bool), 2)
    assert short[0, 0].tolist() == [1.0, 1.0, 1.0, 1.0, 0.0]


def test_score_exports_without_data_dependent_branches() -> None:
    class Score(torch.nn.Module):
        def forward(self, keys, values, slots, stat):
            return UnitTOVA().score(Observation(keys, values, slots, stat, TOKENS, 1))

    obs = observation(range(20, 28), peak=21)
    exported = torch.export.export(Score(), (obs.keys, obs.values, obs.slots, obs.stat))
    torch.testing.assert_close(exported.module()(obs.keys, obs.values, obs.slots, obs.stat),
                               UnitTOVA().score(obs))


def test_runs_through_optimize_on_a_tiny_llama() -> None:
    base = tiny_llama()
    ids = prompt(length=200)
    model = kvpass.optimize(copy.deepcopy(base), budget=0.5, method=UnitTOVA())
    assert kvpass.cache_bytes(prefill(model, ids)) <= 0.5 * full_kv_bytes(200)
    out = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert out.shape == (1, 208)
    whole = kvpass.optimize(copy.deepcopy(base), budget=1.0, method=UnitTOVA())
    assert torch.equal(whole.generate(ids, max_new_tokens=8, do_sample=False),
                       base.generate(ids, max_new_tokens=8, do_sample=False))


def test_bad_options_are_refused() -> None:
    with pytest.raises(TypeError, match="method options"):
        kvpass.get_method(UnitTOVA(), z=2.0)
