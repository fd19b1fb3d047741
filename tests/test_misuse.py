"""Misuse and faults: every bad input fails where it is given, with an error naming it, and what
users do to an optimized model afterwards (cast it, compile it, share it between threads) keeps
the byte cap and the tokens."""

from __future__ import annotations

import copy
import json
import math
import sys
import threading
from dataclasses import replace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

import kvpass
import kvpass.onnx
from kvpass.cost import BATCH, SEQ
from kvpass.methods import get_method
from kvpass.planning import Plan, SiteSchedule, build_plan
from kvpass.runtime.call_arguments import cache_argument, output_cache

HEADS, KV_HEADS, HEAD_DIM, VOCAB = 4, 2, 16, 128


def tiny_llama(layers: int = 2, kv_heads: int = KV_HEADS, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=HEADS * HEAD_DIM, num_attention_heads=HEADS, num_key_value_heads=kv_heads,
                         num_hidden_layers=layers, intermediate_size=128, vocab_size=VOCAB, pad_token_id=0)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def base() -> LlamaForCausalLM:
    return tiny_llama()


def prompt(length: int = 48, batch: int = 1, seed: int = 1) -> torch.Tensor:
    return torch.randint(1, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def full_bytes(model, tokens: int, batch: int = 1) -> int:
    """What the unmodified model's cache holds after `tokens` tokens, in the model's dtype now."""
    config = model.config
    element = next(model.parameters()).element_size()
    return config.num_hidden_layers * 2 * batch * config.num_key_value_heads * tokens * HEAD_DIM * element


# ----------------------------------------------------------------------------------------------- plans


def test_a_plan_for_another_model_is_refused(base) -> None:
    plan = kvpass.plan(base, budget=0.5, allocation="uniform")
    with pytest.raises(ValueError, match=r"another model.*model\.layers\.2\.self_attn.*not in the plan"):
        kvpass.optimize(tiny_llama(layers=3), plan=plan)  # an extra site
    with pytest.raises(ValueError, match=r"another model.*\(heads, KV heads, head dim\) \(4, 4, 16\) here but "
                                         r"\(4, 2, 16\) in the plan"):
        kvpass.optimize(tiny_llama(kv_heads=4), plan=plan)  # other geometry
    with pytest.raises(ValueError, match="plan was made for 4-byte elements but the model's cache uses 2-byte"):
        kvpass.optimize(copy.deepcopy(base).to(torch.bfloat16), plan=plan)  # another dtype
    model = copy.deepcopy(base)
    with pytest.raises(TypeError, match=r"plan must be a kvpass Plan .*Plan\.load\(path\).*got str"):
        kvpass.optimize(model, plan="plan.json")
    assert not hasattr(model, "kvpass_plan")  # nothing was changed by the refusals


@pytest.mark.parametrize("budget", [1.5, math.nan, -0.25, 0.0, "0.5", True])
def test_hand_edited_budgets_fail_to_load_naming_file_and_field(base, tmp_path, budget) -> None:
    path = tmp_path / "plan.json"
    kvpass.plan(base, budget=0.5, allocation="uniform").save(path)
    data = json.loads(path.read_text())
    data["budgets"]["model.layers.1.self_attn"] = budget
    path.write_text(json.dumps(data))  # NaN is written as JSON's NaN, which json reads back
    with pytest.raises(ValueError, match=rf"{path}: budgets\['model.layers.1.self_attn'\] must be a fraction in "
                                         r"\(0, 1\]"):
        Plan.load(path)


def test_hand_edited_options_fail_to_load_naming_file_and_field(base, tmp_path) -> None:
    path = tmp_path / "plan.json"
    kvpass.plan(base, budget=0.5, allocation="uniform").save(path)
    good = json.loads(path.read_text())
    edits = {
        "evict_every": (0, "evict_every must be an int >= 1"),
        "sinks": (-1, "sinks must be an int >= 0"),
        "dtype_bytes": (3, "dtype_bytes must be 1, 2, 4 or 8"),
        "format": (99, "plan format 99 is not supported"),
        "ceiling": (5, r"ceiling must be a number in \[0, 1\], got 5"),
        "floor": (math.nan, r"floor must be a number in \[0, 1\], got nan"),
        "method": ({"name": "tova", "options": {"span": -2}}, "span must be an int >= 0"),
    }
    for field, (value, message) in edits.items():
        path.write_text(json.dumps({**good, field: value}))
        with pytest.raises(ValueError, match=f"{path}: .*{message}"):
            Plan.load(path)


def test_corrupt_or_unreadable_plan_files_name_the_file(base, tmp_path) -> None:
    path = tmp_path / "plan.json"
    kvpass.plan(base, budget=0.5, allocation="uniform").save(path)
    path.write_text(path.read_text()[:100])  # truncated
    with pytest.raises(ValueError, match=f"{path}: not a JSON plan file"):
        Plan.load(path)
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ValueError, match=f"{path}: not a JSON plan file"):
        Plan.load(path)
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match=f"{path}: a plan is a JSON object, got list"):
        Plan.load(path)
    with pytest.raises(ValueError, match=f"{tmp_path}: cannot read the plan file"):
        Plan.load(tmp_path)  # a directory
    with pytest.raises(FileNotFoundError, match="missing.json"):
        Plan.load(tmp_path / "missing.json")


def test_plan_lengths_take_numpy_ints_and_refuse_the_rest(base) -> None:
    plan = kvpass.plan(base, budget=0.3, allocation="uniform")
    assert plan.kv_bytes(np.int64(4096)) == plan.kv_bytes(4096)  # exact: no int64 overflow on the way
    for bad in (-1, 2.5, "8", None):
        with pytest.raises(ValueError, match="seq_len must be an int >= 0"):
            plan.kv_bytes(bad)


# ----------------------------------------------------------------------------------------------- options


@pytest.mark.parametrize("method, options, message", [
    ("tova", {"span": "2"}, r"TOVA: span must be an int >= 0 \(neighbours kept .*\), got '2'"),
    ("tova", {"span": -1}, r"TOVA: span must be an int >= 0 .*, got -1"),
    ("paged", {"page_size": 2.5}, r"Paged: page_size must be an int >= 1 \(tokens per evicted page\), got 2.5"),
    ("knorm", {"page_size": 0}, r"KNorm: page_size must be an int >= 1 .*, got 0"),
    ("snapkv", {"kernel": 4}, r"SnapKV: kernel must be odd .*got 4"),
    ("snapkv", {"kernel": 0}, r"SnapKV: kernel must be an int >= 1 \(pooling width in tokens\), got 0"),
    ("snapkv", {"window": 0}, r"SnapKV: window must be an int >= 1 \(queries observed .*\), got 0"),
    ("h2o", {"window": -3}, r"H2O: window must be an int >= 0 .*, got -3"),
    ("random", {"seed": "x"}, r"Random: seed must be an int, got 'x'"),
    ("h2o", {"shared_keep_set": "yes"}, r"H2O: shared_keep_set must be True or False, got 'yes'"),
    ("tova", {"span": True}, r"TOVA: span must be an int >= 0 .*, got True"),
])
def test_method_options_are_checked_when_given(method, options, message) -> None:
    with pytest.raises(ValueError, match=message):
        get_method(method, **options)
    with pytest.raises(ValueError, match=message):
        kvpass.Evict(method, **options)


def test_unknown_method_options_are_named_for_the_default_method_too() -> None:
    with pytest.raises(TypeError, match=r"method 'paged_tova' takes options .*not \['windw'\]"):
        kvpass.Evict(windw=3)


@pytest.mark.parametrize("options, message", [
    ({"sinks": -1}, "sinks must be an int >= 0"),
    ({"recent": 2.0}, "recent must be an int >= 0"),
    ({"evict_every": 0}, "evict_every must be an int >= 1"),
    ({"floor": 1.5}, r"Evict: floor must be a number in \[0, 1\] \(least fraction .*\), got 1.5"),
    ({"ceiling": 0}, r"Evict: ceiling must be a number in \(0, 1\] .*, got 0"),
    ({"ceiling": math.nan}, r"Evict: ceiling must be a number in \(0, 1\] .*, got nan"),
    ({"reallocate": -4}, r"Evict: reallocate must be an int >= 0 .*, got -4"),
    ({"allocation": "greedy"}, "allocation='greedy' is not one of"),
])
def test_evict_options_are_checked_when_given(options, message) -> None:
    with pytest.raises(ValueError, match=message):
        kvpass.Evict(**options)


@pytest.mark.parametrize("options, message", [
    ({"fraction": 1.0}, r"PruneHeads: fraction must be a number in \[0, 1\) \(the share .*\), got 1.0"),
    ({"fraction": math.nan}, r"PruneHeads: fraction must be .* got nan"),
    ({"fraction": "0.25"}, r"PruneHeads: fraction must be .* got '0.25'"),
    ({"fraction": 0.25, "max_per_layer": 1}, r"PruneHeads: max_per_layer must be a number in \(0, 1\) .*, got 1"),
    ({"fraction": 0.25, "seed": 1.5}, "PruneHeads: seed must be an int, got 1.5"),
    ({"fraction": 0.25, "importance": "magic"}, "PruneHeads: importance must be one of"),
])
def test_prune_heads_options_are_checked_when_given(options, message) -> None:
    with pytest.raises(ValueError, match=message):
        kvpass.PruneHeads(**options)


def test_numpy_numbers_are_numbers(base, tmp_path) -> None:
    """numpy scalars are accepted wherever a number is, and stored as plain Python numbers (plans are JSON)."""
    evict = kvpass.Evict("snapkv", window=np.int64(8), kernel=np.int32(5), sinks=np.int64(2), ceiling=np.float32(0.75))
    assert (type(evict.method.window), type(evict.method.kernel), type(evict.sinks), type(evict.ceiling)) == \
        (int, int, int, float)
    assert type(kvpass.PruneHeads(np.float32(0.25)).fraction) is float
    model = kvpass.optimize(copy.deepcopy(base), budget=np.float32(0.5), transforms=[evict])
    assert model.kvpass_plan.requested == "0.5"
    model.kvpass_plan.save(tmp_path / "plan.json")
    assert Plan.load(tmp_path / "plan.json") == model.kvpass_plan
    assert kvpass.optimize(copy.deepcopy(base), budget=np.float64(0.25)).kvpass_plan.requested == "0.25"


def test_other_bad_arguments_of_the_verbs_name_the_argument(base) -> None:
    model = copy.deepcopy(base)
    with pytest.raises(ValueError, match="calibration must be a Calibration, a prompt .* got int"):
        kvpass.optimize(model, allocation="adaptive", calibration=123)
    with pytest.raises(ValueError, match="tokenizer must be a callable tokenizer"):
        kvpass.plan(model, calibration="some text", tokenizer=5)
    with pytest.raises(ValueError, match=r"calibration prompt 0 has token ids from -1 to .*\[0, 128\)"):
        kvpass.plan(model, calibration=[torch.tensor([[-1, 2, 3]])])
    with pytest.raises(ValueError, match=r"calibration prompt 0 has token ids from .* to 500"):
        kvpass.plan(model, calibration=[torch.tensor([[1, 2, 500]])])
    for seq_len in (-5, 0, "x", 2.5):
        with pytest.raises(ValueError, match="seq_len must be an int >= 1"):
            kvpass.plan(model, budget="64 tokens", seq_len=seq_len, allocation="uniform")
    with pytest.raises(TypeError, match=r"\['sinks'\] are options of kvpass.Evict"):
        kvpass.plan(model, transforms=[kvpass.Evict()], sinks=2)
    with pytest.raises(TypeError, match=r"\['method'\] are options of kvpass.Evict"):
        kvpass.optimize(model, plan=kvpass.plan(model, allocation="uniform"), method="h2o")
    assert not hasattr(model, "kvpass_plan")


# ----------------------------------------------------------------------------------------------- dtype and device


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cap_holds_after_casting_an_optimized_model(base, dtype) -> None:
    """The schedule sizes its cap by the bytes the cache's tensors really take: casting after
    `optimize` narrows K/V while slots and statistics keep their width."""
    budget, new_tokens = 0.5, 6
    model = kvpass.optimize(copy.deepcopy(base), budget=budget, method="h2o", sinks=2, recent=8).to(dtype)
    ids = prompt(length=100)
    cache = DynamicCache(config=model.config)
    token = ids
    with torch.no_grad():
        for step in range(new_tokens + 1):
            logits = model(token, **cache_argument(model, cache), use_cache=True).logits
            seen = ids.shape[1] + step
            assert cache.layers[0].keys.dtype == dtype
            assert kvpass.cache_bytes(cache) <= budget * full_bytes(model, seen), step
            assert kvpass.stats(model)["kv_bytes"] == kvpass.cache_bytes(cache)
            assert kvpass.stats(model)["full_kv_bytes"] == full_bytes(model, seen)
            token = logits[:, -1:].argmax(-1)
    held = cache.layers[0].keys.shape[-2]
    assert held > 0.3 * seen  # still pruning to the budget, not far below it


@pytest.mark.skipif(not torch.cuda.is_available(), reason="moving an optimized model to another device needs CUDA")
def test_an_optimized_model_moved_to_cuda_keeps_tokens_and_cap(base) -> None:
    ids = prompt(length=80)
    model = kvpass.optimize(copy.deepcopy(base), budget=0.5)
    expected = model.generate(ids, max_new_tokens=8, do_sample=False)
    model = model.to("cuda")
    out = model.generate(ids.cuda(), max_new_tokens=8, do_sample=False, return_dict_in_generate=True)
    assert torch.equal(out.sequences.cpu(), expected)
    assert kvpass.cache_bytes(output_cache(out)) <= 0.5 * full_bytes(model, 87)


# ----------------------------------------------------------------------------------------------- compile


def test_compiled_generate_with_dynamic_shapes_equals_eager(base) -> None:
    """`model.forward = torch.compile(model.forward)`: decode steps with and without an eviction,
    as the cache grows and shrinks, run compiled (a few graphs, not one per length) and give the
    eager tokens."""
    model = kvpass.optimize(tiny_llama(layers=1), budget=0.5, sinks=4, recent=8)
    ids = prompt(length=40)
    expected = model.generate(ids, max_new_tokens=8, do_sample=False)
    torch._dynamo.reset()
    model.forward = torch.compile(model.forward, backend="aot_eager", dynamic=True)
    with torch._dynamo.config.patch(recompile_limit=4, fail_on_recompile_limit_hit=True):
        out = model.generate(ids, max_new_tokens=8, do_sample=False)
    torch._dynamo.reset()
    assert torch.equal(out, expected)


# ----------------------------------------------------------------------------------------------- threads


def test_two_threads_generating_with_one_model_get_what_each_gets_alone(base) -> None:
    """Per-call state travels with the call's cache, so concurrent generations never see each other's
    tokens, caches or figures."""
    model = kvpass.optimize(copy.deepcopy(base), budget=0.3, method="h2o", sinks=2, recent=4)
    prompts, new = [prompt(length=40, seed=1), prompt(length=53, seed=2)], 10
    alone = [model.generate(ids, max_new_tokens=new, do_sample=False) for ids in prompts]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible
    try:
        for _ in range(10):
            results, errors = [None, None], []

            def run(index: int) -> None:
                try:
                    results[index] = model.generate(prompts[index], max_new_tokens=new, do_sample=False,
                                                    return_dict_in_generate=True)
                except Exception as error:  # noqa: BLE001  (reported by the assertion below)
                    errors.append(error)

            threads = [threading.Thread(target=run, args=(index,)) for index in range(2)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            assert not errors
            for ids, result, expected in zip(prompts, results, alone):
                assert torch.equal(result.sequences, expected)
                figures = kvpass.stats(output_cache(result))
                seen = ids.shape[1] + new - 1
                assert {site["seen"] for site in figures["sites"].values()} == {seen}
                assert figures["kv_bytes"] <= 0.3 * full_bytes(model, seen)
    finally:
        sys.setswitchinterval(interval)


# ----------------------------------------------------------------------------------------------- slow options


def _target_by_loop(schedule: SiteSchedule, seen: int) -> int:
    """`SiteSchedule.target` as it was defined: the least cap over the next `evict_every` steps."""
    return max(0, min(schedule.cap(seen + j) - j for j in range(schedule.evict_every)))


@settings(max_examples=300, deadline=None)
@given(fraction=st.floats(0.001, 1.0), kv=st.integers(1, 96), state=st.integers(0, 24),
       max_tokens=st.none() | st.integers(0, 60), evict_every=st.integers(1, 40), seen=st.integers(0, 300),
       page_size=st.integers(1, 5))
def test_closed_form_target_equals_the_loop(fraction, kv, state, max_tokens, evict_every, seen, page_size) -> None:
    schedule = SiteSchedule(fraction, kv, state, sinks=2, recent=3, evict_every=evict_every, max_tokens=max_tokens,
                            page_size=page_size)
    assert schedule.target(seen) == _target_by_loop(schedule, seen)


@pytest.mark.parametrize("evict_every", [1, 3, 64, 10**6])
def test_any_evict_every_gives_a_formula_equal_to_its_bytes(sites, evict_every) -> None:
    plan = build_plan(sites, 0.3, get_method("h2o"), evict_every=evict_every)
    for length in (1, 7, 100, 4096, 10**7):
        assert plan.kv_bytes_expr.subs({SEQ: length, BATCH: 2}) == plan.kv_bytes(length, batch=2)
        assert plan.kv_bytes(length) <= 0.3 * plan.full_kv_bytes(length)


def test_a_huge_evict_every_optimizes_and_generates(base) -> None:
    model = kvpass.optimize(copy.deepcopy(base), budget=0.3, method="h2o", evict_every=10**6)
    assert model.generate(prompt(), max_new_tokens=4, do_sample=False).shape == (1, 52)


@pytest.fixture(scope="module")
def sites(base) -> list:
    return list(kvpass.find_attention(base))


# ----------------------------------------------------------------------------------------------- ONNX


@pytest.fixture(scope="module")
def cast_model() -> LlamaForCausalLM:
    """A one-layer tiny Llama optimized in float32, then cast to float16."""
    return kvpass.optimize(tiny_llama(layers=1), budget=0.5, method="knorm", sinks=2, recent=4).to(torch.float16)


@pytest.fixture(scope="module")
def exported(cast_model, tmp_path_factory) -> object:
    """`cast_model` exported with its own plan (kvpass metadata for the Generator)."""
    return kvpass.export_onnx(cast_model, tmp_path_factory.mktemp("onnx") / "tiny.onnx", opset=18)


def test_a_model_cast_after_optimize_exports_with_its_cap(cast_model, exported) -> None:
    """Its plan follows the cast, as in the torch runtime: the graph's schedule counts 2-byte K/V."""
    generator = kvpass.onnx.Generator(exported)
    ids = prompt(length=60)
    tokens = generator.generate(ids, max_new_tokens=6)
    assert np.array_equal(tokens, cast_model.generate(ids, max_new_tokens=6, do_sample=False).numpy())
    keys, values, slots = generator.cache[0]
    assert keys.dtype == np.float16 and keys.shape[2] < 65
    assert keys.nbytes + values.nbytes + slots.nbytes <= 0.5 * full_bytes(cast_model, 65)


@pytest.mark.parametrize("max_new_tokens", [2.5, None, -1, "4", True])
def test_generator_refuses_bad_max_new_tokens(exported, max_new_tokens) -> None:
    with pytest.raises(ValueError, match="max_new_tokens must be an int >= 0, got"):
        kvpass.onnx.Generator(exported).generate(np.ones((1, 4), np.int64), max_new_tokens)


def test_generator_refuses_bad_token_ids(exported) -> None:
    generator = kvpass.onnx.Generator(exported)
    with pytest.raises(ValueError, match="input_ids must hold integer token ids, got dtype float32"):
        generator.generate(np.ones((1, 4), np.float32), 2)
    with pytest.raises(ValueError, match="input_ids must hold integer token ids, got dtype bool"):
        generator.generate(torch.ones(1, 4, dtype=torch.bool), 2)
    with pytest.raises(ValueError, match=r"input_ids must be token ids \[0, 128\), got ids from -3 to 5"):
        generator.generate(np.array([[1, 5, -3]]), 2)
    with pytest.raises(ValueError, match=r"input_ids must be token ids \[0, 128\), got ids from 1 to 128"):
        generator.generate(torch.tensor([[1, 128]]), 2)
    with pytest.raises(ValueError, match=r"input_ids must be \[batch > 0, length > 0\], got shape \(3,\)"):
        generator.generate(np.array([1, 2, 3]), 2)
    with pytest.raises(ValueError, match="eos_token_id must be an int >= 0"):
        generator.generate(np.ones((1, 4), np.int64), 2, eos_token_id="2")
    generator.reset(2)
    with pytest.raises(ValueError, match=r"input_ids has 1 rows but the cache holds \[2\]: call reset\(batch\) first"):
        generator.step(np.ones((1, 4), np.int64))
    tokens = generator.generate(np.ones((1, 4), np.int32), np.int64(3))  # numpy ints are ints
    assert tokens.shape == (1, 7) and tokens.dtype == np.int64


def test_onnx_optimize_refuses_a_plan_for_another_graph(exported) -> None:
    sites = list(kvpass.onnx.find_attention(exported))
    method = get_method(None)
    extra = sites + [replace(sites[0], name="/model/layers.1/self_attn", layer=1)]
    other_geometry = [replace(site, num_kv_heads=1) for site in sites]
    with pytest.raises(ValueError, match="plan was made for another model"):
        kvpass.onnx.optimize(exported, plan=build_plan(extra, 0.5, method, dtype_bytes=2))
    with pytest.raises(ValueError, match=r"another model.*\(4, 2, 16\) here but \(4, 1, 16\) in the plan"):
        kvpass.onnx.optimize(exported, plan=build_plan(other_geometry, 0.5, method, dtype_bytes=2))
    with pytest.raises(ValueError, match="plan was made for 4-byte elements but the model's cache uses 2-byte"):
        kvpass.onnx.optimize(exported, plan=build_plan(sites, 0.5, method, dtype_bytes=4))
    with pytest.raises(TypeError, match="plan must be a kvpass Plan"):
        kvpass.onnx.optimize(exported, plan={"budgets": {}})
    with pytest.raises(TypeError, match=r"\['sinks'\] are options of kvpass.Evict"):
        kvpass.onnx.optimize(exported, transforms=[kvpass.Evict()], sinks=2)


def test_export_onnx_checks_its_arguments_before_exporting(base, tmp_path) -> None:
    with pytest.raises(ValueError, match=r"opset must be an int >= 18 .*, got 10"):
        kvpass.export_onnx(base, tmp_path / "m.onnx", opset=10)
    with pytest.raises(ValueError, match=r"opset must be an int >= 18 .*, got 'x'"):
        kvpass.export_onnx(base, tmp_path / "m.onnx", opset="x")
    with pytest.raises(TypeError, match="path must be a file path"):
        kvpass.export_onnx(base, None)
    with pytest.raises(ValueError, match="budget must be in"):
        kvpass.export_onnx(base, tmp_path / "m.onnx", budget=2)
    with pytest.raises(ValueError, match="method='nope' is not a known method"):
        kvpass.export_onnx(base, tmp_path / "m.onnx", method="nope")
    with pytest.raises(TypeError, match="plan must be a kvpass Plan"):
        kvpass.export_onnx(base, tmp_path / "m.onnx", plan="plan.json")
    with pytest.raises(TypeError, match="give method= or a plan, not both"):
        kvpass.export_onnx(kvpass.optimize(copy.deepcopy(base)), tmp_path / "m.onnx", method="knorm")
    assert not (tmp_path / "m.onnx").exists()
