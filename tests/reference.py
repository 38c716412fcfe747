"""Independent float64 references the tests compare against (loops, no code shared with the package)."""

import math

import torch
import torch.nn.functional as F


def nearest_centroid_decode(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Each sub-vector replaced by its nearest centroid, subspace by subspace, in float64."""
    H, S, K, d = centroids.shape
    x64, c64 = x.double(), centroids.double()
    out = torch.empty_like(x64)
    for s in range(S):
        sub = x64[..., s * d : (s + 1) * d]  # [B, H, T, d]
        dist = ((sub[..., None, :] - c64[None, :, None, s]) ** 2).sum(-1)  # [B, H, T, K]
        best = dist.argmin(-1)
        out[..., s * d : (s + 1) * d] = c64[:, s][torch.arange(H)[None, :, None], best]
    return out


def anchor_score_terms_loops(q, k, v, mask=None, scale=None):
    """(S1, S0) straight from the definition, one (query head, query, key) at a time, float64.
    q [B, Hq, L, D], k/v [B, Hkv, T, D], mask bool [L, T] or None."""
    B, Hq, L, D = q.shape
    Hkv, T = k.shape[1], k.shape[2]
    G = Hq // Hkv
    scale = 1 / math.sqrt(D) if scale is None else scale
    q, k, v = q.double(), k.double(), v.double()
    s1 = torch.zeros(B, Hkv, T, dtype=torch.float64)
    s0 = torch.zeros_like(s1)
    for b in range(B):
        for hq in range(Hq):
            h = hq // G
            for i in range(L):
                logits = torch.tensor([scale * q[b, hq, i] @ k[b, h, j] for j in range(T)], dtype=torch.float64)
                if mask is not None:
                    logits[~mask[i]] = float("-inf")
                if torch.isinf(logits).all():
                    continue
                a = torch.softmax(logits, 0)
                o = sum(a[j] * v[b, h, j] for j in range(T))
                for j in range(T):
                    s1[b, h, j] += a[j] * scale * q[b, hq, i].norm() * (v[b, h, j] - o).norm()
                    s0[b, h, j] += a[j]
    return s1, s0


def dense_from_parts(codes, centroids, anchor_rows, anchor_pos, window) -> torch.Tensor:
    """The dense float64 [B, H, T, D] one side of a compressed cache stands for: decoded codes, then
    the valid anchor rows (anchor_pos >= 0) at their positions, then the window over the last Tw."""
    B, H, T, S = codes.shape
    dense = centroids.double()[torch.arange(H)[:, None, None], torch.arange(S), codes.long()]
    dense = dense.flatten(-2).clone()  # [B, H, T, S*d]
    b, h, a = (anchor_pos >= 0).nonzero(as_tuple=True)
    dense[b, h, anchor_pos[b, h, a].long()] = anchor_rows[b, h, a].double()
    Tw = window.shape[2]
    dense[:, :, T - Tw:] = window.double()
    return dense


def attention_from_parts(q, k, v, mask, scale, is_causal):
    """(out, lse, S0, S1) in float64 over a compressed K and V given as records with the fields
    codes, centroids, anchor_rows, anchor_pos, window (read by name): out from torch SDPA on the dense cache (causal, top-left,
    folded into the mask when both are given, which SDPA itself refuses); S0, S1 [B, Hkv, Tw] the
    Anchor Score sums of the window tokens over the queries and query heads of their kv head."""
    B, Hq, L, D = q.shape
    parts = ("codes", "centroids", "anchor_rows", "anchor_pos", "window")
    kd, vd = (dense_from_parts(*(getattr(x, f) for f in parts)) for x in (k, v))
    Hkv, T, Tw = kd.shape[1], kd.shape[2], k.window.shape[2]
    G = Hq // Hkv
    scale = 1 / math.sqrt(D) if scale is None else scale
    keep = torch.ones(L, T, dtype=torch.bool).tril() if is_causal else None
    if mask is None:
        bias = torch.zeros(1, 1, 1, T, dtype=torch.float64)
    elif mask.dtype == torch.bool:
        bias = torch.zeros(mask.shape, dtype=torch.float64).masked_fill(~mask, -math.inf)
    else:
        bias = mask.double()
    if keep is not None:
        bias = bias.masked_fill(~keep, -math.inf)
    q64, kg, vg = q.double(), kd.repeat_interleave(G, 1), vd.repeat_interleave(G, 1)
    out = F.scaled_dot_product_attention(q64, kg, vg, attn_mask=bias, scale=scale)
    s = scale * q64 @ kg.transpose(-1, -2) + bias
    lse = torch.logsumexp(s, -1)
    a = torch.softmax(s, -1).nan_to_num(0.0)[..., T - Tw:]  # [B, Hq, L, Tw]
    dist = (out[..., :, None, :] - vg[:, :, None, T - Tw:, :]).norm(dim=-1)
    w1 = a * (scale * q64.norm(dim=-1))[..., None] * dist
    return out, lse, a.unflatten(1, (Hkv, G)).sum((2, 3)), w1.unflatten(1, (Hkv, G)).sum((2, 3))


def nearest_centroid_distances(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Squared distance of every sub-vector to every centroid of its (head, subspace), float64:
    x [B, H, T, S*d], centroids [H, S, K, d] -> [B, H, T, S, K] (subspace by subspace, a loop)."""
    H, S, K, d = centroids.shape
    x64, c64 = x.double(), centroids.double()
    out = []
    for s in range(S):
        sub = x64[..., s * d : (s + 1) * d]  # [B, H, T, d]
        out.append(((sub[..., None, :] - c64[None, :, None, s]) ** 2).sum(-1))  # [B, H, T, K]
    return torch.stack(out, 3)
