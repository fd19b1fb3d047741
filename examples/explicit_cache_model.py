"""A hand-written decoder that carries its own KV cache, pruned by kvpass.

    python examples/explicit_cache_model.py
    python examples/explicit_cache_model.py --tiny --tokens 48

No transformers here: `TinyDecoder.forward(input_ids, position_ids, past_keys, past_values)` returns
`(logits, keys, values)`, the cache as plain tensors. `kvpass.optimize(model, example_inputs=...)`
captures one decode step with torch.export, finds each attention that reads a past cache, and
rewrites it: the returned module has the same signature, but the keys and values it returns are
compacted to the budget (physically smaller tensors). Positions are an input, so RoPE stays right
for the tokens that remain.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import kvpass


class Attention(nn.Module):
    """Grouped-query attention with rotary positions over `cat(past, new)`."""

    def __init__(self, hidden: int, heads: int, kv_heads: int):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, hidden // heads
        self.q = nn.Linear(hidden, hidden, bias=False)
        self.k = nn.Linear(hidden, kv_heads * self.head_dim, bias=False)
        self.v = nn.Linear(hidden, kv_heads * self.head_dim, bias=False)
        self.o = nn.Linear(hidden, hidden, bias=False)

    def forward(self, x, cos, sin, past_k, past_v):
        batch, length, _ = x.shape
        q = self.q(x).view(batch, length, self.heads, self.head_dim).transpose(1, 2)
        k = self.k(x).view(batch, length, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v(x).view(batch, length, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        k, v = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
        group = self.heads // self.kv_heads
        out = nn.functional.scaled_dot_product_attention(
            q, k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1))
        return self.o(out.transpose(1, 2).reshape(batch, length, -1)), k, v


def rotate(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


class TinyDecoder(nn.Module):
    """Embedding, `layers` x (attention + MLP) with pre-norms, and a language-model head."""

    def __init__(self, vocab: int = 256, hidden: int = 64, heads: int = 4, kv_heads: int = 2, layers: int = 2):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.norms = nn.ModuleList(nn.LayerNorm(hidden) for _ in range(2 * layers))
        self.attentions = nn.ModuleList(Attention(hidden, heads, kv_heads) for _ in range(layers))
        self.mlps = nn.ModuleList(nn.Sequential(nn.Linear(hidden, 4 * hidden), nn.GELU(), nn.Linear(4 * hidden, hidden))
                                  for _ in range(layers))
        self.head = nn.Linear(hidden, vocab, bias=False)
        head_dim = hidden // heads
        self.register_buffer("inv_freq", 1.0 / 10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))

    def forward(self, input_ids, position_ids, past_keys, past_values):
        angles = position_ids[..., None].float() * self.inv_freq
        angles = torch.cat([angles, angles], dim=-1).unsqueeze(1)
        cos, sin = angles.cos(), angles.sin()
        x, keys, values = self.embed(input_ids), [], []
        for index, (attention, mlp) in enumerate(zip(self.attentions, self.mlps)):
            out, k, v = attention(self.norms[2 * index](x), cos, sin, past_keys[index], past_values[index])
            x = x + out
            x = x + mlp(self.norms[2 * index + 1](x))
            keys.append(k)
            values.append(v)
        return self.head(x), tuple(keys), tuple(values)

    def empty_cache(self, batch: int = 1, length: int = 0) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        """(past_keys, past_values) of `length` random tokens (0: an empty cache)."""
        attention = self.attentions[0]
        shape = (batch, attention.kv_heads, length, attention.head_dim)
        generator = torch.Generator().manual_seed(0)
        make = lambda: tuple(torch.randn(shape, generator=generator) for _ in self.attentions)  # noqa: E731
        return make(), make()


def decode_step_inputs(model: TinyDecoder, past: int = 8) -> tuple:
    """One decode step after `past` cached tokens: what `kvpass.optimize` captures the model with."""
    keys, values = model.empty_cache(length=past)
    return torch.tensor([[1]]), torch.tensor([[past]]), keys, values


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=0.25)
    parser.add_argument("--tokens", type=int, default=256, help="tokens to decode")
    parser.add_argument("--tiny", action="store_true", help="smaller layers (the model is random either way)")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    model = TinyDecoder(hidden=64, layers=2) if args.tiny else TinyDecoder(hidden=256, heads=8, kv_heads=2, layers=6)
    model.eval()
    pruned = kvpass.optimize(model, budget=args.budget, example_inputs=decode_step_inputs(model), method="knorm",
                             sinks=4, recent=8)
    print(f"{len(pruned.kvpass_sites)} attention sites rewritten: {[site.name for site in pruned.kvpass_sites]}")

    full_cache, pruned_cache = model.empty_cache(), model.empty_cache()
    token = torch.tensor([[1]])
    with torch.no_grad():
        for position in range(args.tokens):
            positions = torch.tensor([[position]])
            _, *full_cache = model(token, positions, *full_cache)
            logits, *pruned_cache = pruned(token, positions, *pruned_cache)
            token = logits[:, -1:].argmax(-1)
    full, held = kvpass.cache_bytes(full_cache), kvpass.cache_bytes(pruned_cache)
    print(f"after {args.tokens} tokens: the model's cache holds {full_cache[0][0].shape[2]} tokens per layer "
          f"({full:,} bytes); the pruned model's {pruned_cache[0][0].shape[2]} ({held:,} bytes, {held / full:.3f})")
    assert held <= args.budget * full


if __name__ == "__main__":
    main()
