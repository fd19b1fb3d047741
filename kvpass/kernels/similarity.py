"""Key–value similarity to running anchors: the redundancy signal behind token filtering.

A layer keeps two anchors per KV head: an exponential moving average of the keys it has
seen and one of the values. A new token whose key and value both point where the anchors
point adds little the layer has not already seen. This module holds the one formula
(the torch reference; `triton_similarity` is its Triton twin) and the fusion of the two
similarities into one redundancy per token.

Exact formula, per batch row b and KV head h, over the tokens t of one call in order
(x is k or v, a the matching anchor, float32):

    valid_t  : the token is not padding
    c_t      = 0 if not valid_t;  1 if valid_t and no valid token came before (the anchor starts
               as that token);  1 - gamma otherwise
    s_t      = cos(x_t, a_{t-1}) = <x_t, a_{t-1}> / max(|x_t| |a_{t-1}|, EPS)   when valid_t and an
               anchor exists (a valid token came before, in this call or an earlier one); 0 otherwise
    a_t      = (1 - c_t) a_{t-1} + c_t x_t

So a token is scored against the anchors built from every earlier valid token (0..t-1), and
then joins them. `kv_similarity` returns s for keys and values, [B, Hkv, L], and the anchors
after the last token.

Fusion into one redundancy per token (`redundancy`), from the per-head similarities s^K_{t,h},
s^V_{t,h} of the Hkv heads:

    "key":   r_t = mean_h s^K_{t,h}                    (KeyDiff-style: keys alone)
    "value": r_t = mean_h s^V_{t,h}
    "joint": variance-aware fusion. With var^K_t = Var_h s^K_{t,h} and var^V_t = Var_h s^V_{t,h}
             (population variance across the KV heads),
                 w_t   = (var^V_t + EPS) / (var^K_t + var^V_t + 2 EPS)
                 f_t,h = w_t s^K_{t,h} + (1 - w_t) s^V_{t,h}          (fused score per head)
                 r_t   = mean_h f_t,h
             Each similarity is weighted by the inverse of its spread across heads (a
             precision-weighted mean): the signal on which the heads agree decides, the one
             they disagree on counts less. With one KV head both weigh 1/2.

Higher r means more redundant; token filtering drops the most redundant tokens.
"""

from __future__ import annotations

import torch

EPS = 1e-6
CHUNK = 64
"""Tokens per block of the reference scan: the EMA inside a block is one matrix product."""
FUSIONS = ("joint", "key", "value")


def kv_similarity(
    k: torch.Tensor, v: torch.Tensor, anchor_k: torch.Tensor, anchor_v: torch.Tensor,
    valid: torch.Tensor, primed: torch.Tensor, gamma: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(s^K, s^V [B, Hkv, L] float32, anchors after the call [B, Hkv, D] float32 for K and V).

    k, v [B, Hkv, L, D]; anchor_k, anchor_v [B, Hkv, D] float32 (read only where `primed`);
    valid [B, L] bool (False: padding); primed [B] bool (the row has anchors from earlier calls).

    Example:
        >>> k = torch.tensor([[[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]]])
        >>> anchors = torch.zeros(1, 1, 2)
        >>> s_k, _, a_k, _ = kv_similarity(k, k, anchors, anchors, torch.ones(1, 3, dtype=torch.bool),
        ...                                torch.zeros(1, dtype=torch.bool), 0.5)
        >>> s_k.tolist(), a_k.tolist()
        ([[[0.0, 1.0, 0.0]]], [[[0.5, 0.5]]])
    """
    _check(k, v, anchor_k, anchor_v, valid, primed)
    if not 0.0 < gamma < 1.0:
        raise ValueError(f"gamma must be in (0, 1), got {gamma!r}")
    sim_k, new_k = _scan(k, anchor_k, valid, primed, gamma)
    sim_v, new_v = _scan(v, anchor_v, valid, primed, gamma)
    return sim_k, sim_v, new_k, new_v


def redundancy(sim_k: torch.Tensor, sim_v: torch.Tensor, fusion: str) -> torch.Tensor:
    """One redundancy per token [B, L] from the per-head similarities [B, Hkv, L] (rule in the module doc).

    Example:
        >>> s_k = torch.tensor([[[0.9], [0.9], [0.9]]])    # every head: the key is redundant
        >>> s_v = torch.tensor([[[0.9], [0.1], [0.5]]])    # the heads disagree on the value
        >>> round(redundancy(s_k, s_v, "joint").item(), 3)  # the key, on which they agree, decides
        0.9
    """
    if fusion == "key":
        return sim_k.mean(1)
    if fusion == "value":
        return sim_v.mean(1)
    if fusion != "joint":
        raise ValueError(f"fusion must be one of {FUSIONS}, got {fusion!r}")
    var_k = sim_k.var(1, correction=0)
    var_v = sim_v.var(1, correction=0)
    weight = (var_v + EPS) / (var_k + var_v + 2 * EPS)
    return weight * sim_k.mean(1) + (1 - weight) * sim_v.mean(1)


def _check(k, v, anchor_k, anchor_v, valid, primed) -> None:
    batch, heads, length, dim = k.shape
    if v.shape != k.shape:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape [B, Hkv, L, D]")
    for name, tensor in (("anchor_k", anchor_k), ("anchor_v", anchor_v)):
        if tuple(tensor.shape) != (batch, heads, dim) or tensor.dtype != torch.float32:
            raise ValueError(f"{name} must be float32 [B, Hkv, D] = {(batch, heads, dim)}, got {tensor.dtype} "
                             f"{tuple(tensor.shape)}")
    if tuple(valid.shape) != (batch, length) or valid.dtype != torch.bool:
        raise ValueError(f"valid must be bool [B, L] = {(batch, length)}, got {valid.dtype} {tuple(valid.shape)}")
    if tuple(primed.shape) != (batch,) or primed.dtype != torch.bool:
        raise ValueError(f"primed must be bool [B] = {(batch,)}, got {primed.dtype} {tuple(primed.shape)}")


def _scan(x: torch.Tensor, anchor: torch.Tensor, valid: torch.Tensor, primed: torch.Tensor,
          gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Similarities [B, H, L] of each token to the anchor before it, and the final anchor [B, H, D].

    The recurrence a_t = (1 - c_t) a_{t-1} + c_t x_t is solved in blocks of CHUNK tokens: inside
    a block the anchor before token t is exp(E_t) a_start + sum_{s<t} c_s exp(E_t - E_{s+1}) x_s,
    with E the exclusive running sum of log(1 - c) (decays multiply, so their logs add and no
    power of gamma underflows); the anchors between blocks are carried one block at a time.
    A row without anchors starts from its first valid token (c = 1 there is the same as starting
    from that token with c = 1 - gamma, which keeps every log finite); a row without anchors or
    valid tokens returns its anchor unchanged, as the token-by-token scan does.
    """
    batch, heads, length, dim = x.shape
    x = x.float()
    first = valid.float().argmax(-1)
    start = x[torch.arange(batch, device=x.device), :, first]
    anchor = torch.where((primed | ~valid.any(-1))[:, None, None], anchor, start)  # no valid token: unchanged
    blocks = -(-length // CHUNK)
    pad = blocks * CHUNK - length
    xs = torch.nn.functional.pad(x, (0, 0, 0, pad)).view(batch, heads, blocks, CHUNK, dim)
    c = torch.nn.functional.pad(valid.float() * (1.0 - gamma), (0, pad)).view(batch, blocks, CHUNK)
    log_decay = torch.log1p(-c)
    after = torch.cumsum(log_decay, -1)             # E_{s+1}: decay through token s
    before = after - log_decay                      # E_t: decay before token t
    causal = torch.ones(CHUNK, CHUNK, dtype=torch.bool, device=x.device).tril(-1)
    weights = torch.where(causal, c[..., None, :] * torch.exp(before[..., :, None] - after[..., None, :]), 0.0)
    inside = torch.einsum("bnts,bhnsd->bhntd", weights, xs)
    to_end = c * torch.exp(after[..., -1:] - after)   # weight of token s in the anchor after the block
    block_sums = torch.einsum("bns,bhnsd->bhnd", to_end, xs)
    block_decay = torch.exp(after[..., -1])         # [B, blocks]
    carried = []
    for block in range(blocks):
        carried.append(anchor)
        anchor = block_decay[:, block, None, None] * anchor + block_sums[:, :, block]
    starts = torch.stack(carried, 2)                # [B, H, blocks, D]
    anchors = inside + torch.exp(before)[:, None, ..., None] * starts[:, :, :, None, :]
    anchors = anchors.reshape(batch, heads, blocks * CHUNK, dim)[:, :, :length]
    norms = x.norm(dim=-1) * anchors.norm(dim=-1)
    cosine = (x * anchors).sum(-1) / norms.clamp_min(EPS)
    scored = valid & (primed[:, None] | (torch.cumsum(valid.int(), -1) > 1))
    return torch.where(scored[:, None, :], cosine, 0.0), anchor
