"""kvpass.testing: every assertion passes on kvpass's rewrite and fails, saying what broke, on a deliberately
broken one (the kit must be able to fail)."""

from __future__ import annotations

import copy

import pytest
import torch

import kvpass
import kvpass.onnx.generator
import kvpass.rewrites.fx
from kvpass.runtime.compacted_cache import CompactedKV
from kvpass.testing import (assert_cache_within, assert_golden, assert_identity, assert_onnx_parity, assert_oracle,
                            assert_sites, graph_summary)
from test_find_attention import CachedDecoder, decode_step_inputs
from test_optimize import tiny_llama

pytest_plugins = ["pytester"]


@pytest.fixture(scope="module")
def base():
    return tiny_llama()


def test_assert_sites(base, monkeypatch) -> None:
    report = assert_sites(base, [dict(name=f"model.layers.{i}.self_attn", num_heads=4, num_kv_heads=2, head_dim=16,
                                      causal=True, cross=False) for i in range(2)])
    assert len(report) == 2
    with pytest.raises(AssertionError, match=r"site 1 \(model.layers.1.self_attn\): num_kv_heads is 2, expected 4"):
        assert_sites(report, [dict(num_kv_heads=2), dict(num_kv_heads=4)])
    with pytest.raises(TypeError, match="'kv_heads'.* are not AttentionSite fields"):
        assert_sites(report, [dict(kv_heads=2)] * 2)
    monkeypatch.setattr(kvpass.rewrites.fx, "SDPA_OPS", {})  # a pattern table that lost SDPA
    with pytest.raises(AssertionError, match="found 0 attention sites, expected 2"):
        assert_sites(base, 2)


def test_assert_identity(base, monkeypatch) -> None:
    assert_identity(base)
    assert_identity(base, transforms=[kvpass.PruneHeads(0), kvpass.Evict()])
    attend = CompactedKV.attend

    def wrong_past_16_tokens(self, q, scale, *args, **options):  # optimize's short probe cannot see this one
        return attend(self, q, scale * 1.5 if self.seen + self.pending > 16 else scale, *args, **options)

    monkeypatch.setattr(CompactedKV, "attend", wrong_past_16_tokens)
    with pytest.raises(AssertionError, match=r"budget=1.0\) changed what LlamaForCausalLM computes: .*logits differ "
                                             r"by up to [\d.e-]+ \(atol 1e-05\), first at step 0"):
        assert_identity(base)


def test_assert_cache_within(base, monkeypatch) -> None:
    monkeypatch.setattr(CompactedKV, "_evict", lambda self, k_slots: None)  # keeps every token, claims a budget
    with pytest.raises(AssertionError, match=r"KV cache over budget 0.3 after call 0 of 5 \(0: the 64-token prompt; "
                                             r"64 tokens seen\): it holds 32,768 bytes, the cap is 9,830 \(the "
                                             r"unmodified cache holds 32,768\)\..*model.layers.0.self_attn: 64 tokens"):
        assert_cache_within(base, 0.3, prompt_len=64, steps=4, method="paged")  # paged keeps no per-token statistic


def test_assert_cache_within_passes_for_every_budget_spelling(base) -> None:
    assert_cache_within(base, 0.3, prompt_len=64, steps=4, method="h2o", evict_every=3)
    assert_cache_within(base, "40 tokens", prompt_len=64, steps=4)
    assert_cache_within(base, "24KiB", prompt_len=64, steps=4)


def test_assert_oracle(base, monkeypatch) -> None:
    """(It holds for every method: tests/test_optimize.py.)"""
    assert_oracle(base, "tova", budget=0.3, steps=2)
    evict = CompactedKV._evict

    def misaligned(self, k_slots):  # compaction that gathers keys one row off their slots
        evict(self, k_slots)
        self.keys = self.keys.roll(1, dims=-2)

    monkeypatch.setattr(CompactedKV, "_evict", misaligned)
    with pytest.raises(AssertionError, match=r"decode step 0 \(64 tokens seen\): the optimized model's logits differ "
                                             r"from the unmodified model with the evicted keys masked by"):
        assert_oracle(base, "tova", budget=0.3, steps=2)


def test_assert_onnx_parity(base, monkeypatch) -> None:
    exported = assert_onnx_parity(base, budget=0.5, method="knorm", steps=6)
    evict_row = kvpass.onnx.generator.evict_row

    def one_fewer(schedule, total, seen):  # a host that feeds the graph the wrong keep count
        keep, *rest = evict_row(schedule, total, seen)
        return (keep - 1 if keep < total else keep, *rest)

    monkeypatch.setattr(kvpass.onnx.generator, "evict_row", one_fewer)
    with pytest.raises(AssertionError, match=r"torch and onnxruntime disagree on LlamaForCausalLM optimized at budget "
                                             r"0.5: .*layer 0 keeps other tokens: slots \[0, 1, 2, 3, 40, .*\] in "
                                             r"torch, \[0, 1, 2, 3, 39, .*\] in onnxruntime"):
        assert_onnx_parity(base, budget=0.5, method="knorm", steps=6, exported=exported)


def test_golden_summary_of_a_decode_step(base, kvpass_golden, monkeypatch, tmp_path) -> None:
    model = kvpass.optimize(copy.deepcopy(base), budget=0.5)
    kvpass_golden(model)
    summary = graph_summary(model)
    assert "custom ops:\n  kvpass.attention.default x2\n  kvpass.select_and_compact.default x2\n" in summary
    assert_golden(summary, tmp_path / "golden.txt", update=True)
    evict = CompactedKV._evict

    def copies(self, k_slots):  # a rewrite that copies the compacted keys once more on every eviction
        evict(self, k_slots)
        self.keys = self.keys.clone()

    monkeypatch.setattr(CompactedKV, "_evict", copies)
    with pytest.raises(AssertionError, match=r"changed from its golden summary (.|\n)*\n\+\s+aten.clone.default x1\n"):
        assert_golden(graph_summary(kvpass.optimize(copy.deepcopy(base), budget=0.5)), tmp_path / "golden.txt")


def test_explicit_cache_model_decodes_step_after_step_within_budget() -> None:
    """A model carrying its own cache, rewritten from one decode step, keeps decoding: its compacted caches
    grow and shrink from call to call (the graph is captured with free sizes)."""
    model, inputs = CachedDecoder().eval(), decode_step_inputs(past_len=40)
    assert_sites(model, [dict(name=f"layers.{i}", reads_cache=True, num_kv_heads=2) for i in range(2)], *inputs)
    assert_identity(model, example_inputs=inputs, steps=8)
    assert_cache_within(model, 0.5, steps=8, example_inputs=inputs, method="knorm", sinks=2, recent=4)


def test_golden_files_are_written_by_the_update_option(pytester) -> None:
    pytester.makepyfile(test_user="""
        def test_rewrite(kvpass_golden):
            kvpass_golden("custom ops: none\\n")
    """)
    missing = pytester.runpytest_inprocess("-p", "kvpass.testing.plugin")
    missing.assert_outcomes(failed=1)
    missing.stdout.fnmatch_lines(["*no golden graph summary at *golden/test_user.test_rewrite.txt; run pytest "
                                  "--kvpass-update-golden*"])
    pytester.runpytest_inprocess("-p", "kvpass.testing.plugin", "--kvpass-update-golden").assert_outcomes(passed=1)
    assert (pytester.path / "golden" / "test_user.test_rewrite.txt").read_text() == "custom ops: none\n"
    pytester.runpytest_inprocess("-p", "kvpass.testing.plugin").assert_outcomes(passed=1)


def test_assert_golden_shows_the_diff(tmp_path) -> None:
    assert_golden("site a:\n  aten.add.Tensor x1\n", tmp_path / "a.txt", update=True)
    with pytest.raises(AssertionError, match=r" site a:\n-  aten.add.Tensor x1\n\+  aten.add.Tensor x2"):
        assert_golden("site a:\n  aten.add.Tensor x2\n", tmp_path / "a.txt")
    with pytest.raises(TypeError, match="optimized by kvpass.optimize"):
        graph_summary(torch.nn.Linear(2, 2))
