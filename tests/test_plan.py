"""Plans: the byte cap holds for every budget and length, bytes predicted = bytes held, budgets parse, errors are clear."""

from __future__ import annotations

import copy
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import DynamicCache

import kvpass
from kvpass.budget import parse_budget
from kvpass.calibration import Calibration, calibrate
from kvpass.eviction_cost import GRID
from kvpass.runtime.hf import KVPassCacheLayer
from kvpass.runtime.reallocation import ReallocationPolicy, Reallocator
from kvpass.cost import BATCH, SEQ, fx_symbols, site_cost, symbols_from_dims
from kvpass.methods import get_method
from kvpass.planning import Plan, build_plan
from kvpass.rewrites.fx import find_sites
from kvpass.site import AttentionSite
from kvpass.runtime.call_arguments import cache_argument
from test_optimize import prompt, tiny_llama

SITES = [AttentionSite(f"layers.{i}.attn", i, 8, 2 if i % 2 else 4, 16, None, True) for i in range(6)]
"""Mixed geometry, so byte weights differ between sites."""


def fake_calibration(sites: list[AttentionSite], errors: dict[str, list[float]] | None = None) -> Calibration:
    """Curves from sharply concentrated (low layers) to linear (diffuse, high layers); output
    errors are the lost mass unless given."""
    curves = {}
    for site in sites:
        sharpness = 1 + 40 / (1 + site.layer) ** 2
        curves[site.name] = [[1 - (1 - q / GRID) ** sharpness for q in range(GRID + 1)]]
    errors = errors or {name: [1 - kept for kept in heads[0]] for name, heads in curves.items()}
    return Calibration("tova", [100], {s.name: [0.5] for s in sites}, curves,
                       {name: [error] for name, error in errors.items()}, 0.0)


@pytest.fixture(scope="module")
def base():
    return tiny_llama()


@pytest.fixture(scope="module")
def calibrated(base) -> Calibration:
    return calibrate(base, "tova", sites=kvpass.find_attention(base))


@settings(max_examples=60, deadline=None)
@given(
    budget=st.floats(0.01, 1.0),
    seq_len=st.integers(0, 50_000),
    batch=st.integers(1, 3),
    allocation=st.sampled_from(["uniform", "pyramid", "adaptive"]),
    method=st.sampled_from(["tova", "h2o", "knorm", "paged"]),
    evict_every=st.integers(1, 4),
)
def test_kv_bytes_never_exceed_budget(budget, seq_len, batch, allocation, method, evict_every) -> None:
    plan = build_plan(SITES, budget, get_method(method), allocation, fake_calibration(SITES), evict_every=evict_every)
    held = plan.kv_bytes(seq_len, batch)
    assert held <= Fraction(budget) * plan.full_kv_bytes(seq_len, batch)
    weights = [s.kv_bytes_per_token(4) for s in SITES]
    spent = sum(Fraction(plan.budgets[s.name]) * w for s, w in zip(SITES, weights))
    assert spent <= Fraction(budget) * sum(weights) and float(spent / sum(weights)) == pytest.approx(budget, abs=1e-9)


@pytest.mark.parametrize("method,evict_every", [("paged", 3), ("tova", 1)])
def test_symbolic_bytes_are_the_runtime_arithmetic(method, evict_every) -> None:
    plan = build_plan(SITES, 0.37, get_method(method), "adaptive", fake_calibration(SITES), evict_every=evict_every)
    expression = plan.kv_bytes_expr
    for seq_len in (1, 7, 36, 100, 4095, 33_333):
        assert expression.subs({SEQ: seq_len, BATCH: 2}) == plan.kv_bytes(seq_len, 2)


def test_adaptive_looks_past_a_bump_in_an_error_curve() -> None:
    """A site whose error only falls once most tokens are kept still gets them when that is
    the best use of the bytes (greedy on the raw curve would see no gain and stop short)."""
    pair = [AttentionSite(f"layers.{i}.attn", i, 4, 2, 16, None, True) for i in range(2)]
    cliff = [1.0 if q < 0.7 * GRID else 0.0 for q in range(GRID + 1)]
    gentle = [0.3 * (1 - q / GRID) for q in range(GRID + 1)]
    calibration = fake_calibration(pair, {pair[0].name: cliff, pair[1].name: gentle})
    plan = build_plan(pair, 0.5, get_method("tova"), "adaptive", calibration, floor=0.1)
    assert plan.budgets[pair[0].name] > 0.7 and plan.output_error[pair[0].name] == 0.0
    uniform = build_plan(pair, 0.5, get_method("tova"), "uniform", calibration)
    assert sum(plan.output_error.values()) < sum(uniform.output_error.values())


@settings(max_examples=60, deadline=None)
@given(tokens=st.integers(40, 5000), seq_len=st.integers(1, 20_000), allocation=st.sampled_from(["uniform", "pyramid"]))
def test_token_budget_is_an_absolute_cap(tokens, seq_len, allocation) -> None:
    plan = build_plan(SITES, f"{tokens} tokens", get_method("h2o"), allocation, seq_len=8192)
    cap = tokens * sum(s.kv_bytes_per_token(4) for s in SITES)
    assert plan.kv_bytes(seq_len) <= cap
    assert plan.kv_bytes_expr.subs({SEQ: seq_len, BATCH: 1}) == plan.kv_bytes(seq_len)


def test_adaptive_gives_diffuse_layers_more_and_spends_everything() -> None:
    plan = build_plan(SITES, 0.5, get_method("tova"), "adaptive", fake_calibration(SITES))
    budgets = [plan.budgets[s.name] for s in SITES]
    assert budgets[-1] > budgets[0] and budgets[0] == pytest.approx(0.25)  # concentrated layer sits at the floor
    uniform = build_plan(SITES, 0.5, get_method("tova"), "uniform", fake_calibration(SITES))
    assert sum(plan.output_error.values()) < sum(uniform.output_error.values())
    pyramid = [build_plan(SITES, 0.5, get_method("tova"), "pyramid").budgets[s.name] for s in SITES]
    assert pyramid == sorted(pyramid, reverse=True) and pyramid[0] > pyramid[-1]


def test_cache_bytes_of_real_generation_match_the_plan(base, calibrated) -> None:
    model = copy.deepcopy(base)
    # TOVA evicts token by token; paged methods (the default, paged_tova, among them) free whole pages while
    # decoding and so may hold up to a page more than after a prefill of the same length (their byte cap is
    # checked step by step in test_optimize.py)
    plan = kvpass.plan(model, budget=0.4, method="tova", calibration=calibrated, sinks=2, recent=8)
    kvpass.optimize(model, plan=plan)
    ids = prompt(length=150)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        logits = model(ids, **cache_argument(model, cache), use_cache=True).logits
        assert kvpass.cache_bytes(cache) == plan.kv_bytes(150)
        slack = sum(plan.schedule(s, 4).kv_bytes_per_token + plan.schedule(s, 4).state_bytes_per_token
                    for s in plan.sites)  # one token per site: the cap rounds down one token at a time
        token = logits[:, -1:].argmax(-1)
        for seen in range(151, 171):
            token = model(token, **cache_argument(model, cache), use_cache=True).logits[:, -1:].argmax(-1)
            held = kvpass.cache_bytes(cache)
            assert plan.kv_bytes(seen) - slack <= held <= plan.kv_bytes(seen) <= 0.4 * plan.full_kv_bytes(seen)


@settings(max_examples=60, deadline=None)
@given(steps=st.lists(st.lists(st.lists(st.floats(0.0, 2.0), min_size=2, max_size=2), min_size=3, max_size=3),
                      min_size=1, max_size=8))
def test_reallocator_shares_never_sum_above_the_budget(steps) -> None:
    """Whatever the sites measure, at every step the fractions in force fit the budget (re-spreading
    every token, so a new target can arrive before the previous raise took effect)."""
    policy = ReallocationPolicy(every=1, fraction=0.4, floor=0.2, ceiling=0.9, weights=[1, 2, 1], shares=[0.4] * 3)
    reallocator = Reallocator(policy)
    for seen, ends in enumerate(steps, start=10):
        shares = [reallocator.fraction(i, seen) for i in range(3)]
        assert sum(share * w for share, w in zip(shares, policy.weights)) <= 0.4 * 4 + 1e-12
        for i, (start, end) in enumerate(ends):  # a straight error curve from `start` (nothing kept) to `end`
            reallocator.observe(i, [start + (end - start) * q / GRID for q in range(GRID + 1)], seen)


@pytest.mark.parametrize("every", [1, 3])
def test_reallocation_moves_budget_between_sites_and_never_exceeds_it(base, every) -> None:
    model = copy.deepcopy(base)
    plan = kvpass.plan(model, budget=0.4, allocation="uniform", sinks=2, recent=8, reallocate=every)
    kvpass.optimize(model, plan=plan)
    cache = DynamicCache(config=model.config)
    weights = {s.name: s.kv_bytes_per_token(4) for s in plan.sites}
    checked = []

    def within_budget(module, args, output) -> None:  # after every site, also in the middle of a step
        seen = max(layer.site_cache.seen for layer in cache.layers if isinstance(layer, KVPassCacheLayer))
        full = seen * sum(weights.values())
        assert kvpass.cache_bytes(cache) <= 0.4 * full
        checked.append(full)

    hooks = [module.register_forward_hook(within_budget) for name, module in model.named_modules()
             if name in weights]
    with torch.no_grad():
        token = model(prompt(length=120), **cache_argument(model, cache), use_cache=True).logits[:, -1:].argmax(-1)
        for _ in range(30):
            token = model(token, **cache_argument(model, cache), use_cache=True).logits[:, -1:].argmax(-1)
    for hook in hooks:
        hook.remove()
    reallocator = cache.layers[0].site_cache.reallocator
    shares = reallocator.shares
    assert reallocator.moves == 30 // every and len(checked) == 31 * len(weights)
    assert max(abs(a - b) for a, b in zip(shares, plan.budgets.values())) > 0.01  # budget really moved
    assert all(plan.floor <= share < 1.0 for share in shares)
    assert sum(s * w for s, w in zip(shares, weights.values())) <= 0.4 * sum(weights.values())


@pytest.mark.parametrize("method,budget", [("paged", 0.5), ("h2o", "40 tokens"), ("knorm", "24KiB")])
def test_prefill_bytes_match_for_pages_and_absolute_budgets(base, method, budget) -> None:
    model = kvpass.optimize(copy.deepcopy(base), budget=budget, method=method)
    for length in (20, 90):
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            model(prompt(length=length), **cache_argument(model, cache), use_cache=True)
        assert kvpass.cache_bytes(cache) == model.kvpass_plan.kv_bytes(length)


def test_save_load_roundtrip(base, tmp_path) -> None:
    plan = kvpass.plan(base, budget="60 tokens", method="snapkv", calibration=calibrated_for(base, "snapkv"),
                       sinks=2, recent=8, window=8)
    plan.save(tmp_path / "plan.json")
    loaded = Plan.load(tmp_path / "plan.json")
    assert loaded == plan
    assert loaded.method == get_method("snapkv", window=8) and loaded.kv_bytes(777) == plan.kv_bytes(777)
    model = kvpass.optimize(copy.deepcopy(base), plan=loaded)
    assert model.kvpass_plan is loaded and loaded.table(64).count("\n") == len(loaded.sites) + 2


def calibrated_for(model, method: str) -> Calibration:
    return calibrate(model, get_method(method, window=8), prompt(length=64))


def test_budget_spellings() -> None:
    assert (parse_budget("2048 tokens").kind, parse_budget("2048 Tokens").value) == ("tokens", 2048)
    assert parse_budget("1.5GiB").value == 3 * 2**29 and parse_budget("512MB").value == 512 * 10**6
    assert parse_budget(1).value == parse_budget(1.0).value == 1.0
    for bad in ("2", "half", "2048 furlongs", "0.5 tokens", "0 tokens", 2, 1.5, True, None):
        with pytest.raises((ValueError, TypeError), match="budget"):
            parse_budget(bad)


def test_budget_one_means_the_same_as_one_point_zero() -> None:
    one, one_point_zero = (build_plan(SITES, b, get_method("tova")) for b in (1, 1.0))
    assert one.budgets == one_point_zero.budgets and set(one.budgets.values()) == {1.0}


def test_bad_input_is_refused_naming_the_argument(base, calibrated) -> None:
    with pytest.raises(ValueError, match=r"budget='1KB'.*sink/window floor"):
        kvpass.plan(base, budget="1KB", allocation="uniform")
    too_long = torch.ones(1, base.config.max_position_embeddings + 1, dtype=torch.long)
    with pytest.raises(ValueError, match=r"calibration prompt 0 has \d+ tokens.*max_position_embeddings"):
        kvpass.plan(base, calibration=[too_long])
    with pytest.raises(ValueError, match="calibration prompt 0 is text but no tokenizer"):
        kvpass.plan(base, calibration="some text")
    with pytest.raises(ValueError, match="allocation='nope'"):
        kvpass.plan(base, allocation="nope", method="tova", calibration=calibrated)
    with pytest.raises(ValueError, match="calibration was measured for method 'tova', not 'h2o'"):
        kvpass.plan(base, method="h2o", calibration=calibrated)
    with pytest.raises(ValueError, match=r"reallocate must be an int >= 0.*got True"):
        kvpass.plan(base, reallocate=True, method="tova", calibration=calibrated)
    with pytest.raises(ValueError, match="reallocate=8 needs a fraction budget"):
        kvpass.plan(base, budget="60 tokens", reallocate=8, method="tova", calibration=calibrated)
    with pytest.raises(ValueError, match="budget"):
        kvpass.optimize(copy.deepcopy(base), budget="3")


def test_costs_depend_only_on_geometry_and_symbols() -> None:
    fx_site, onnx_site = SITES[1], AttentionSite("/layers.1/attn", 1, 8, 2, 16, None, True, pattern="onnx")
    onnx = symbols_from_dims("batch_size", "past_sequence_length + sequence_length")
    assert site_cost(fx_site, 2, onnx) == site_cost(onnx_site, 2, onnx)
    assert str(site_cost(onnx_site, 2, onnx).kv_bytes) == "128*batch_size*(past_sequence_length + sequence_length)"

    class Attention(torch.nn.Module):
        def forward(self, q, k, v):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)

    q, k, v = (torch.randn(2, 4, 10, 16) for _ in range(3))
    seq = torch.export.Dim("seq", min=2, max=4096)
    exported = torch.export.export(Attention(), (q, k, v), dynamic_shapes=({2: seq},) * 3)
    gm = exported.module()
    (site,) = find_sites(gm)
    symbols = fx_symbols(site, gm)
    assert symbols.batch == BATCH and symbols.seq.free_symbols and symbols.seq != SEQ
    flops = site_cost(site, 4, symbols).prefill_flops
    assert flops.subs(symbols.seq, 10).subs(BATCH, 2) == 4 * 2 * 4 * 16 * 55


def test_onnx_symbolic_dims_name_the_symbols() -> None:
    ir = pytest.importorskip("onnx_ir")
    symbols = symbols_from_dims(ir.SymbolicDim("batch_size"), ir.SymbolicDim(None))
    assert str(symbols.batch) == "batch_size" and symbols.seq == SEQ
