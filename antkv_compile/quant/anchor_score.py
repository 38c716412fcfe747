"""The Anchor Score: how much a token's quantization error can move the attention output.

With A_ij = softmax_j(scale * q_i . k_j) and o_i = sum_j A_ij v_j, to first order

    ||delta o_i|| <= sum_j A_ij (scale * ||q_i|| * ||v_j - o_i|| * ||delta k_j|| + ||delta v_j||)

so token j scores AS_j = e_k,j * S1_j + e_v,j * S0_j with

    S1_j = sum_i A_ij * scale * ||q_i|| * ||v_j - o_i||        S0_j = sum_i A_ij

summed over the queries i and the query heads sharing j's kv head (GQA). The two sums do not
depend on the errors, so they are computed once and combined with either the expected error per
head (a constant from calibration) or each token's actual error.

`anchor_score_terms_dense` is the reference; `anchor_score_terms_blockwise` computes the same
numbers in query x key tiles from the row log-sum-exp, as a FlashAttention pass would, never
holding the L x T attention matrix.
"""

from __future__ import annotations

import math

import torch


def group_query_heads(q: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """Queries [B, Hq, L, D] -> [B, Hkv, G, L, D]: the G query heads that share each kv head (GQA)."""
    B, Hq, L, D = q.shape
    if Hq % num_kv_heads:
        raise ValueError(f"{Hq} query heads cannot share {num_kv_heads} kv heads evenly")
    return q.view(B, num_kv_heads, Hq // num_kv_heads, L, D)


def grouped_mask(attn_mask: torch.Tensor | None, B: int, Hkv: int, G: int, L: int, T: int) -> torch.Tensor | None:
    """A SDPA mask broadcast to [B, Hkv, G, L, T] as a view (no copy of a broadcast mask)."""
    if attn_mask is None:
        return None
    return attn_mask.expand(B, Hkv * G, L, T).unflatten(1, (Hkv, G))


def apply_mask(s: torch.Tensor, mask: torch.Tensor | None, is_causal: bool, q0: int = 0, k0: int = 0) -> torch.Tensor:
    """Masked scores the way SDPA masks them. `is_causal` is top-left aligned, as in SDPA:
    query i sees keys j <= i. q0 / k0 are the tile's offsets."""
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask.to(s.dtype)
    if is_causal:
        L, T = s.shape[-2:]
        qi = torch.arange(q0, q0 + L, device=s.device)[:, None]
        kj = torch.arange(k0, k0 + T, device=s.device)[None, :]
        s = s.masked_fill(kj > qi, float("-inf"))
    return s


def pairwise_dist(o: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """||v_j - o_i|| for o [..., L, D], v [..., T, D] -> [..., L, T]. The Gram expansion cancels
    where o_i ~ v_j (a query attending to one token), so it runs in float64."""
    o, v = o.double(), v.double()
    sq = (o * o).sum(-1)[..., :, None] - 2 * o @ v.transpose(-1, -2) + (v * v).sum(-1)[..., None, :]
    return sq.clamp_min(0).sqrt()


def anchor_score_terms_dense(q, k, v, attn_mask=None, is_causal=False, scale=None):
    """Reference (S1, S0), each [B, Hkv, T], from the full attention matrix. Computes in q's dtype
    promoted to at least float32."""
    dt = torch.promote_types(q.dtype, torch.float32)
    B, Hkv, T, D = k.shape
    qg = group_query_heads(q.to(dt), Hkv)
    G, L = qg.shape[2], qg.shape[3]
    scale = 1 / math.sqrt(D) if scale is None else scale
    kd, vd = k.to(dt)[:, :, None], v.to(dt)[:, :, None]
    s = apply_mask(scale * qg @ kd.transpose(-1, -2), grouped_mask(attn_mask, B, Hkv, G, L, T), is_causal)
    a = torch.softmax(s, -1).nan_to_num(0.0)  # a fully masked query row attends to nothing
    o = a @ vd
    w1 = a * (scale * qg.norm(dim=-1))[..., None] * pairwise_dist(o, vd).to(dt)
    return w1.sum((2, 3)), a.sum((2, 3))


def anchor_score_terms_blockwise(q, k, v, attn_mask=None, is_causal=False, scale=None, block_q=128, block_k=128):
    """Same (S1, S0) as the dense reference, tile by tile. Pass 1 is an online-softmax attention
    that yields o and the row log-sum-exp; pass 2 revisits the tiles with A = exp(s - lse)."""
    dt = torch.promote_types(q.dtype, torch.float32)
    B, Hkv, T, D = k.shape
    qg = group_query_heads(q.to(dt), Hkv)
    G, L = qg.shape[2], qg.shape[3]
    scale = 1 / math.sqrt(D) if scale is None else scale
    mask = grouped_mask(attn_mask, B, Hkv, G, L, T)
    kd, vd = k.to(dt)[:, :, None], v.to(dt)[:, :, None]
    s1 = torch.zeros(B, Hkv, T, dtype=dt, device=q.device)
    s0 = torch.zeros_like(s1)

    def tile(qb, q0, k0):
        s = scale * qb @ kd[..., k0 : k0 + block_k, :].transpose(-1, -2)
        m = None if mask is None else mask[..., q0 : q0 + qb.shape[-2], k0 : k0 + block_k]
        return apply_mask(s, m, is_causal, q0, k0)

    for q0 in range(0, L, block_q):
        qb = qg[..., q0 : q0 + block_q, :]
        row_max = torch.full(qb.shape[:-1], float("-inf"), dtype=dt, device=q.device)
        row_sum = torch.zeros_like(row_max)
        acc = torch.zeros_like(qb)
        for k0 in range(0, T, block_k):
            s = tile(qb, q0, k0)
            new_max = torch.maximum(row_max, s.amax(-1))
            safe_max = new_max.nan_to_num(0.0, neginf=0.0)
            p = torch.exp(s - safe_max[..., None])
            alpha = torch.exp(row_max - safe_max)
            row_sum = row_sum * alpha + p.sum(-1)
            acc = acc * alpha[..., None] + p @ vd[..., k0 : k0 + block_k, :]
            row_max = new_max
        lse = row_max + row_sum.log()  # -inf for a fully masked row
        o = (acc / row_sum[..., None]).nan_to_num(0.0)
        qnorm = scale * qb.norm(dim=-1)
        for k0 in range(0, T, block_k):
            a = torch.exp(tile(qb, q0, k0) - lse[..., None]).nan_to_num(0.0)
            dist = pairwise_dist(o, vd[..., k0 : k0 + block_k, :]).to(dt)
            s1[..., k0 : k0 + block_k] += (a * qnorm[..., None] * dist).sum((2, 3))
            s0[..., k0 : k0 + block_k] += a.sum((2, 3))
    return s1, s0


def combine(s1: torch.Tensor, s0: torch.Tensor, e_k, e_v) -> torch.Tensor:
    """AS = e_k * S1 + e_v * S0. e_k / e_v: a number, per kv head [Hkv] (expected error) or per
    token [B, Hkv, T] (actual error)."""

    def per_token(e):
        e = torch.as_tensor(e, dtype=s1.dtype, device=s1.device)
        return e[:, None] if e.dim() == 1 else e

    return per_token(e_k) * s1 + per_token(e_v) * s0
