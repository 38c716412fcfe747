"""VQ attention in PyTorch: SDPA over a compressed K/V cache, read from the codes.

The cache of one layer is, for K and for V, a `state.Side`: codes for every token, exact anchor
rows at scattered positions, and an exact window of the most recent tokens (the query arrives
already mapped into the key basis, if there is one: ops.attention does that). The
result equals `sdpa(q, dequantize(K), dequantize(V))`; it is computed without decoding the cache
where that is cheaper:

- scores of encoded tokens from a per-query look-up table LUT[s, k] = q_s . centroid[s, k], one
  gather per code, when a query group is small (decode); by decoding keys and a matmul otherwise;
- values accumulated per centroid (a histogram of attention weight over each subspace's codes,
  multiplied by the codebook once), when the group is small; by decoding values otherwise.

Anchors and window rows are always exact. The same pass returns the Anchor Score sums (S1, S0)
of the window tokens, which the cache accumulates to choose its anchors when the window flushes.
"""

from __future__ import annotations

import math

import torch

from ..quant.anchor_score import apply_mask, grouped_mask, pairwise_dist
from ..quant.pq import decode
from ..state import Side


def _anchor_index(pos: torch.Tensor, dummy: int) -> torch.Tensor:
    """Anchor positions as int64 scatter indices, empty slots sent to a dummy column."""
    return torch.where(pos >= 0, pos.long(), dummy)


def _use_lookup(rows_per_head: int, num_subspaces: int, head_dim: int) -> bool:
    """A gather per (query, code) beats decoding + a matmul while rows * S <= D."""
    return rows_per_head * num_subspaces <= head_dim


def _code_scores(qg: torch.Tensor, k: Side, Tc: int) -> torch.Tensor:
    """scores [B, H, R, Tc] of R query rows against the encoded tokens 0..Tc-1 (unscaled)."""
    codes = k.codes[:, :, :Tc]
    H, S, K, d = k.centroids.shape
    B, _, R, D = qg.shape
    if not _use_lookup(R, S, D):
        return qg @ decode(codes, k.centroids).transpose(-1, -2)
    lut = torch.einsum("bhrsd,hskd->bhrsk", qg.unflatten(-1, (S, d)), k.centroids.float()).flatten(-2)
    idx = (codes.long() + torch.arange(S, device=codes.device) * K).flatten(-2)  # [B, H, Tc*S]
    picked = lut.gather(-1, idx[:, :, None].expand(B, H, R, Tc * S))
    return picked.view(B, H, R, Tc, S).sum(-1)


def _code_values(p: torch.Tensor, v: Side, Tc: int) -> torch.Tensor:
    """sum_t p[..., t] * decode(v)[t] over encoded tokens 0..Tc-1, p [B, H, R, Tc] -> [B, H, R, D]."""
    codes = v.codes[:, :, :Tc]
    H, S, K, d = v.centroids.shape
    B, _, R, _ = p.shape
    if not _use_lookup(R, S, S * d):
        return p @ decode(codes, v.centroids)
    idx = (codes.long() + torch.arange(S, device=codes.device) * K).flatten(-2)  # [B, H, Tc*S]
    weights = p[..., None].expand(B, H, R, Tc, S).reshape(B, H, R, Tc * S)
    hist = torch.zeros(B, H, R, S * K, dtype=p.dtype, device=p.device)
    hist.scatter_add_(-1, idx[:, :, None].expand(B, H, R, Tc * S), weights)
    return torch.einsum("bhrsk,hskd->bhrsd", hist.view(B, H, R, S, K), v.centroids.float()).flatten(-2)


def vq_attention(
    q: torch.Tensor,
    k: Side,
    v: Side,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    score_window: bool = True,
):
    """SDPA of q [B, Hq, L, D] over the compressed K and V (Hq a multiple of Hkv: GQA).

    Returns (out [B, Hq, L, D] in q's dtype, s1, s0): the Anchor Score sums [B, Hkv, Tw] of the
    window tokens (None if `score_window` is False). Computed in float32.
    """
    B, Hq, L, D = q.shape
    _, Hkv, T, _ = k.codes.shape
    Tw = k.window.shape[2]
    if v.window.shape[2] != Tw or v.codes.shape[2] != T:
        raise ValueError("key and value caches must hold the same tokens and the same window")
    G, Tc = Hq // Hkv, T - Tw
    scale = 1 / math.sqrt(D) if scale is None else scale
    qg = q.float().reshape(B, Hkv, G * L, D)

    # Scores: codes for the encoded part, exact rows at anchors (dummy column for empty slots),
    # exact window. Column order = token order, so masks apply unchanged.
    sc = torch.cat([_code_scores(qg, k, Tc), qg.new_zeros(B, Hkv, G * L, 1)], -1)
    a_idx = _anchor_index(k.anchor_pos, Tc)[:, :, None].expand(B, Hkv, G * L, -1)
    sc.scatter_(-1, a_idx, qg @ k.anchor_rows.float().transpose(-1, -2))
    s = torch.cat([sc[..., :Tc], qg @ k.window.float().transpose(-1, -2)], -1) * scale
    s = apply_mask(s.view(B, Hkv, G, L, T), grouped_mask(attn_mask, B, Hkv, G, L, T), is_causal)
    p = torch.softmax(s, -1).nan_to_num(0.0).view(B, Hkv, G * L, T)  # fully masked row -> 0, as SDPA

    # Values: anchors and window exact; the encoded part without the anchor columns.
    pc = torch.cat([p[..., :Tc], p.new_zeros(B, Hkv, G * L, 1)], -1)
    va_idx = _anchor_index(v.anchor_pos, Tc)[:, :, None].expand(B, Hkv, G * L, -1)
    p_anchor = pc.gather(-1, va_idx).masked_fill(v.anchor_pos[:, :, None] < 0, 0.0)
    pc.scatter_(-1, va_idx, 0.0)
    o = _code_values(pc[..., :Tc], v, Tc) + p_anchor @ v.anchor_rows.float()
    o = o + p[..., Tc:] @ v.window.float()
    out = o.reshape(B, Hq, L, D).to(q.dtype)  # o may keep the einsum's permuted strides (S = 1)
    if not score_window or Tw == 0:
        return out, None, None
    return (out, *window_sums(p[..., Tc:], scale * qg.norm(dim=-1, keepdim=True), o, v.window))


def window_sums(pw: torch.Tensor, qnorm: torch.Tensor, o: torch.Tensor, v_window: torch.Tensor) -> tuple:
    """Anchor Score sums (S1, S0) [B, Hkv, Tw] of the window tokens (see quant/anchor_score.py):
    from their attention weights pw [B, Hkv, R, Tw], each query row's scale x norm qnorm
    [B, Hkv, R, 1] (in the key basis) and output o [B, Hkv, R, D], and the window's values."""
    return (pw * qnorm * pairwise_dist(o, v_window).float()).sum(2), pw.sum(2)
