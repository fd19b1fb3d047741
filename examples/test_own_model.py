"""Regression tests for your own model with kvpass.testing: `pytest examples/test_own_model.py`.

The model is the hand-written `TinyDecoder` of `explicit_cache_model.py`, which carries its own
cache tensors; a Hugging Face causal LM needs no `example_inputs` and can also use
`assert_oracle` (decoding equals the full model with the evicted keys masked) and
`assert_onnx_parity` (torch and onnxruntime keep the same tokens). These tests fail when a
change to the model, to torch or transformers, or to kvpass breaks pruning: a site no longer
found, an output that moves at budget 1.0, a cache over its cap, or a rewritten graph that
changed (`golden/`; refresh with `pytest --kvpass-update-golden` once a change is intended).
"""

from __future__ import annotations

import pytest
import torch

import kvpass
from explicit_cache_model import TinyDecoder, decode_step_inputs
from kvpass.testing import assert_cache_within, assert_identity, assert_sites


@pytest.fixture(scope="module")
def model() -> TinyDecoder:
    torch.manual_seed(0)
    return TinyDecoder().eval()


@pytest.fixture(scope="module")
def step(model) -> tuple:
    """One decode step after 40 cached tokens: what kvpass captures the model with, and where decoding starts."""
    return decode_step_inputs(model, past=40)


def test_every_attention_is_found(model, step) -> None:
    assert_sites(model, [dict(name=f"attentions.{i}", num_heads=4, num_kv_heads=2, head_dim=16, reads_cache=True)
                         for i in range(2)], *step)


def test_budget_one_changes_nothing(model, step) -> None:
    assert_identity(model, example_inputs=step, steps=8)
    assert_identity(model, example_inputs=step, steps=8, transforms=[kvpass.PruneHeads(0), kvpass.Evict()])


@pytest.mark.parametrize("budget", [0.5, 0.25])
def test_cache_stays_within_budget(model, step, budget) -> None:
    assert_cache_within(model, budget, steps=12, example_inputs=step, method="knorm", sinks=2, recent=4)


def test_rewritten_graph_is_unchanged(model, step, kvpass_golden) -> None:
    kvpass_golden(kvpass.optimize(model, budget=0.5, example_inputs=step))
