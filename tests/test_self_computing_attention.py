"""Attention modules that compute attention themselves (BLOOM, GPT-J, XGLM, BERT-style decoders, ...) are
traced, rewritten onto transformers' attention interface (`kvpass.runtime.interface_adapter`) and pruned like
any other, on a tiny Llama whose attention module is swapped for hand-written variants: GQA with batch and
heads folded into one dimension, a per-head linear bias over key positions (ALiBi's form), its own eager
mask, its probabilities returned. What the rewrite cannot express is refused by name."""

from __future__ import annotations

import copy
import os
import threading

import pytest
import torch

import kvpass
from kvpass.errors import UnsupportedModelError
from kvpass.eval.coverage import greedy, masked_full_oracle_mismatch, prefill
from kvpass.runtime.interface_adapter import InterfaceAdapter

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaAttention, apply_rotary_pos_emb, repeat_kv  # noqa: E402


class SelfComputingAttention(LlamaAttention):
    """Llama's projections and RoPE, then attention computed by hand, as older modeling files do: keys and
    values repeated for GQA, batch and heads folded for `bmm`, a per-head linear bias over the cache's logical
    positions, the model's mask added, softmax, `bmm` with the values; returns the probabilities too.
    `variant`: 'branches' changes its bias once the cache passes 30 tokens, 'sdpa' calls SDPA itself (with the model's mask) instead, 'reads_cache' also uses the cached keys
    beyond attention, 'mixes_probs' uses the probabilities beyond weighting the values."""

    variant = ""

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, past_key_values=None,
                **kwargs):  # the cache comes as `cache=` from transformers 5.24 on, `past_key_values=` before
        past_key_values = cache if cache is not None else past_key_values
        batch, length, _ = hidden_states.shape
        shape = (batch, length, -1, self.head_dim)
        q, k, v = (proj(hidden_states).view(shape).transpose(1, 2) for proj in (self.q_proj, self.k_proj, self.v_proj))
        q, k = apply_rotary_pos_emb(q, k, *position_embeddings)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)
        k, v = repeat_kv(k, self.num_key_value_groups), repeat_kv(v, self.num_key_value_groups)
        heads, total = q.shape[1], k.shape[-2]
        slopes = 0.5 ** torch.arange(1, heads + 1, dtype=torch.float32)
        if self.variant == "branches" and total > 30:  # code that branches on the cache's length
            slopes = slopes / 2
        bias = (slopes[:, None] * torch.arange(total, dtype=torch.float32)[None, :]).repeat(batch, 1)[:, None, :]
        if self.variant == "sdpa":  # the module's own call of SDPA, its mask sliced to the cache's length
            mask = None if attention_mask is None else attention_mask[:, :, :, :total]
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scaling)
            return self.o_proj(out.transpose(1, 2).reshape(batch, length, -1)), None
        q_folded = (q * self.scaling).reshape(batch * heads, length, self.head_dim)
        scores = torch.baddbmm(bias, q_folded, k.reshape(batch * heads, total, self.head_dim).transpose(1, 2))
        if attention_mask is not None:
            scores = scores.view(batch, heads, length, total) + attention_mask[:, :, :, :total]
            scores = scores.view(batch * heads, length, total)
        probs = scores.softmax(-1)
        out = torch.bmm(probs, v.reshape(batch * heads, total, self.head_dim))
        out = out.view(batch, heads, length, self.head_dim).transpose(1, 2).reshape(batch, length, -1)
        if self.variant == "reads_cache":
            out = out + k.mean()
        if self.variant == "mixes_probs":
            out = out + probs.amax()
        return self.o_proj(out), probs.view(batch, heads, length, total)


def self_computing_llama(variant: str = "") -> LlamaForCausalLM:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                         num_hidden_layers=2, intermediate_size=128, vocab_size=128,
                                         attn_implementation="eager")).eval()
    for layer in model.model.layers:
        layer.self_attn.__class__ = SelfComputingAttention
        layer.self_attn.variant = variant
    return model


def prompt(length: int = 28) -> torch.Tensor:
    return torch.randint(3, 120, (1, length), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("variant", ["", "sdpa", "branches"])
def test_a_self_computing_module_is_pruned_and_decodes_as_the_masked_full_oracle(variant: str) -> None:
    base, ids = self_computing_llama(variant), prompt()
    model = kvpass.optimize(copy.deepcopy(base), budget=1.0)
    assert all(isinstance(model.get_submodule(s.name).forward, InterfaceAdapter) for s in model.kvpass_sites)
    assert torch.equal(greedy(model, ids, steps=6), greedy(base, ids, steps=6))
    pruned = kvpass.optimize(model, budget=0.5, method="h2o", sinks=2, recent=4)
    assert kvpass.cache_bytes(prefill(pruned, ids)) <= 0.5 * kvpass.cache_bytes(prefill(base, ids))
    assert masked_full_oracle_mismatch(base, pruned, ids, steps=6) == ""


def test_a_left_padded_batch_decodes_as_the_unmodified_model_at_budget_one() -> None:
    base = self_computing_llama()
    ids = torch.randint(3, 120, (2, 20), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    model = kvpass.optimize(copy.deepcopy(base), budget=1.0)
    settings = {"max_new_tokens": 6, "do_sample": False, "attention_mask": mask, "pad_token_id": 0}
    assert torch.equal(model.generate(ids, **settings), base.generate(ids, **settings))


def test_its_probabilities_are_not_returned_over_a_pruned_cache() -> None:
    """The pruned model attends over the kept keys only; the module returns None where its own forward returns
    probabilities over every position, and still returns them when kvpass's implementation is not in force."""
    model = kvpass.optimize(self_computing_llama(), budget=0.5)
    attention = model.model.layers[0].self_attn
    seen = []
    hook = attention.register_forward_hook(lambda module, args, output: seen.append(output[1]))
    with torch.no_grad():
        model(prompt(), use_cache=True)
    hook.remove()
    assert seen == [None]


@pytest.mark.parametrize(("variant", "message"), [
    ("reads_cache", "reads its cached keys or values beyond attention"),
    ("mixes_probs", "uses its attention probabilities beyond weighting the values"),
])
def test_what_the_rewrite_cannot_express_is_refused_by_name(variant: str, message: str) -> None:
    model = self_computing_llama(variant)
    with pytest.raises(UnsupportedModelError, match=message):
        kvpass.optimize(model, budget=0.5)
    assert model.config._attn_implementation == "eager"


def test_adaptive_budgets_calibrate_through_the_adapter() -> None:
    """Calibration reads attention through transformers' interface, which the adapter reaches."""
    base = self_computing_llama()
    plan = kvpass.plan(base, budget=0.5, allocation="adaptive", calibration=[prompt(40)[0]])
    assert len(plan.sites) == 2
    model = kvpass.optimize(copy.deepcopy(base), plan=plan)
    assert kvpass.cache_bytes(prefill(model, prompt())) <= 0.5 * kvpass.cache_bytes(prefill(base, prompt()))


def test_two_threads_generating_with_one_model_each_get_their_own_answer() -> None:
    model = kvpass.optimize(self_computing_llama(), budget=0.5, method="tova", sinks=2, recent=4)
    prompts = [prompt(24), torch.randint(3, 120, (1, 31), generator=torch.Generator().manual_seed(5))]
    alone = [greedy(model, ids, steps=8) for ids in prompts]
    together: list = [None, None]

    def run(index: int) -> None:
        for _ in range(3):
            together[index] = greedy(model, prompts[index], steps=8)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(torch.equal(a, b) for a, b in zip(alone, together))


def test_heads_pruned_after_it_was_traced_are_traced_again() -> None:
    """Planning traces the module with all its heads; head surgery then narrows its projections, and the
    traces of the old geometry are dropped rather than run."""
    base, ids = self_computing_llama(), prompt()
    model = kvpass.optimize(copy.deepcopy(base), budget=0.5, transforms=[kvpass.PruneHeads(0.25), kvpass.Evict()])
    def kv_features(m):
        return sum(layer.self_attn.k_proj.out_features for layer in m.model.layers)

    assert kv_features(model) < kv_features(base)
    assert kvpass.cache_bytes(prefill(model, ids)) <= 0.5 * kvpass.cache_bytes(prefill(base, ids))
    assert greedy(model, ids, steps=4).shape == (1, ids.shape[1] + 4)


def test_a_compiled_forward_generates_the_eager_tokens() -> None:
    """`torch.compile` leaves the adapter's traced call out of its graphs and runs it between them."""
    model = kvpass.optimize(self_computing_llama(), budget=0.5, method="tova", sinks=2, recent=4)
    ids = prompt()
    eager = greedy(model, ids, steps=5)
    model.forward = torch.compile(model.forward, dynamic=True)
    assert torch.equal(greedy(model, ids, steps=5), eager)
